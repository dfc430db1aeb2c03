//! An upstream: a named group of backends, how to choose among them, and the
//! timeouts used to reach them.

use std::sync::Arc;
use std::time::Duration;

use metrics::Histogram;

use crate::backend::Backend;
use crate::balance::RoundRobin;
use crate::config::{Balance, UpstreamConfig};
use crate::metrics::{self as m, RequestCounters};

#[derive(Debug)]
pub struct Upstream {
    pub name: String,
    pub balance: Balance,
    /// In config order; selectors answer with indexes into this.
    pub backends: Vec<Backend>,
    selector: RoundRobin,
    pub response_timeout: Duration,
    pub duration: Histogram,
    /// Replies made for this upstream without a backend (503: none usable).
    pub unserved: RequestCounters,
}

impl Upstream {
    pub fn new(config: &UpstreamConfig, backends: Vec<Backend>) -> Self {
        let weights: Vec<u32> = backends.iter().map(|b| b.weight).collect();
        Upstream {
            name: config.name.clone(),
            balance: config.balance,
            selector: RoundRobin::new(&weights),
            backends,
            response_timeout: config.response_timeout,
            duration: m::request_duration(&config.name),
            unserved: RequestCounters::new(&config.name, m::NONE),
        }
    }

    /// The index in `backends` of the backend for the next request, or `None`
    /// when no backend is usable.
    pub fn pick_index(&self) -> Option<usize> {
        self.selector.pick(|i| self.backends[i].state.is_healthy())
    }
}

pub type SharedUpstream = Arc<Upstream>;
