//! An upstream: a named group of backends, how to choose among them, how to
//! reach them, and when to try another.

use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::Arc;

use metrics::{Counter, Histogram};

use crate::backend::Backend;
use crate::balance::{LeastConnections, Ring, RoundRobin, Selector, Step};
use crate::config::{Balance, RetryBudgetConfig, UpstreamConfig};
use crate::metrics::{self as m, RequestCounters};
use crate::queue::{Admission, Admit, InFlight, Load, Rejected, Want};
use crate::sticky::Sticky;

#[derive(Debug)]
pub struct Upstream {
    /// Its settings as decoded (name, balance, timeouts, checks, retries, TLS):
    /// read here, not copied.
    pub config: Arc<UpstreamConfig>,
    /// In config order; selectors answer with indexes into this.
    pub backends: Vec<Backend>,
    selector: Selector,
    /// Requests in flight to all its backends, and its queue; kept across
    /// reloads with the upstream's name.
    pub load: Arc<Load>,
    /// Whether any backend has a `max_connections`: if none has, requests
    /// never queue, and no limit is checked.
    limited: bool,
    queue_wait: Histogram,
    /// `bascule_queue_rejected_total`, by `Rejected::Full` and `Rejected::Timeout`.
    queue_rejected: [Counter; 2],
    pub retry_budget: RetryBudget,
    pub retried: Counter,
    pub sticky: Option<Sticky>,
    /// Held while a passive ejection is decided (`health::record_exchange`).
    pub ejecting: std::sync::Mutex<()>,
    /// Drives slow start's admissions: a counter hashed into a fraction.
    admissions: AtomicU64,
    pub duration: Histogram,
    /// Replies made for this upstream without a backend (503: none usable).
    pub unserved: RequestCounters,
}

impl Upstream {
    pub fn new(config: Arc<UpstreamConfig>, backends: Vec<Backend>, load: Arc<Load>) -> Self {
        let sticky = config.sticky.as_ref().map(|s| {
            let addresses: Vec<&str> = backends.iter().map(|b| b.address.as_str()).collect();
            Sticky::new(s, &config.name, &addresses)
        });
        let weights: Vec<u32> = backends.iter().map(|b| b.weight).collect();
        Upstream {
            load,
            limited: backends.iter().any(|b| b.state.limit().is_some()),
            queue_wait: m::queue_wait(&config.name),
            queue_rejected: [
                m::queue_rejected(&config.name, "full"),
                m::queue_rejected(&config.name, "timeout"),
            ],
            selector: match config.balance {
                Balance::RoundRobin => Selector::RoundRobin(RoundRobin::new(&weights)),
                Balance::LeastConnections => {
                    Selector::LeastConnections(LeastConnections::new(&weights))
                }
                Balance::ConsistentHash => {
                    let names: Vec<&str> = backends.iter().map(|b| b.address.as_str()).collect();
                    Selector::ConsistentHash(
                        Ring::new(&names, &weights, config.hash_balance_factor),
                        RoundRobin::new(&weights),
                    )
                }
            },
            backends,
            retry_budget: RetryBudget::new(config.retry_budget),
            retried: m::retries(&config.name),
            sticky,
            ejecting: std::sync::Mutex::new(()),
            admissions: AtomicU64::new(0),
            duration: m::request_duration(&config.name),
            unserved: RequestCounters::new(&config.name, m::NONE),
            config,
        }
    }

    /// The index in `backends` of the backend for the next request, leaving out
    /// the ones already `tried`; `None` when no backend is usable. With
    /// `fail_open`, unusable backends are tried when no usable one is left.
    /// `key` is the request's consistent-hashing key, if it has one.
    #[inline]
    pub fn pick_index(&self, tried: &[usize], key: Option<u64>) -> Option<usize> {
        self.pick_where(Step::Take, tried, key, |_| true)
    }

    /// As `pick_index`, among the backends `allowed` allows.
    #[inline(always)]
    fn pick_where(
        &self,
        step: Step,
        tried: &[usize],
        key: Option<u64>,
        allowed: impl Fn(usize) -> bool,
    ) -> Option<usize> {
        let untried = |i: usize| !tried.contains(&i) && allowed(i);
        let load = |i: usize| self.backends[i].state.active_requests();
        let total = || self.load.in_flight();
        let usable =
            |i: usize| untried(i) && self.backends[i].state.is_usable() && self.admits(i, step);
        match self.selector.pick(step, key, usable, load, total) {
            None if self.config.fail_open => self.selector.pick(step, key, untried, load, total),
            chosen => chosen,
        }
    }

    /// Counts a request that found no backend with room and waited in the
    /// queue, however that ended.
    pub fn count_queued(&self, waited: std::time::Duration, outcome: Result<(), Rejected>) {
        self.queue_wait.record(waited.as_secs_f64());
        match outcome {
            Err(Rejected::Full) => self.queue_rejected[0].increment(1),
            Err(Rejected::Timeout) => self.queue_rejected[1].increment(1),
            _ => {}
        }
    }

    /// Backend `i`, counted in flight if it has room.
    fn take(&self, i: usize) -> Admission {
        match InFlight::try_begin(&self.backends[i].state, &self.load) {
            Some(in_flight) => Admission::Now(i, in_flight),
            None => Admission::Full,
        }
    }

    /// Whether backend `i` may take a request now (health, ejection; no slow-start draw).
    pub fn is_usable(&self, i: usize) -> bool {
        self.backends[i].state.is_usable()
    }

    /// Slow start: a backend ramping up takes a pick with probability equal to
    /// its ramp (0 to 1), so its share of round robin or least connections
    /// grows linearly over the window. Consistent hashing is left alone: keys
    /// must not flap between backends.
    fn admits(&self, i: usize, step: Step) -> bool {
        let Some(window) = self.config.slow_start else {
            return true;
        };
        if self.config.balance == Balance::ConsistentHash {
            return true;
        }
        let ramp = self.backends[i].state.ramp(window);
        if ramp >= 1.0 {
            return true;
        }
        let admission = match step {
            Step::Take => self.admissions.fetch_add(1, Ordering::Relaxed),
            Step::Peek => self.admissions.load(Ordering::Relaxed),
        };
        let draw = crate::balance::hash::mix(admission);
        ((draw % 10_000) as f64) < ramp * 10_000.0
    }
}

/// The upstream's balance under `max_connections`. A request pinned by its
/// sticky cookie, or carrying a consistent-hashing key, waits for its own
/// backend (the ring's bounded loads may still send the key on, as they do
/// without limits); any other goes to the backend its balance picks among
/// those with room.
impl Admit for Upstream {
    // Inlined: without limits, a request's pick is what it was before them.
    #[inline(always)]
    fn admit(&self, want: &Want<'_>) -> Admission {
        if self.limited {
            return self.admit_limited(want);
        }
        let pinned = want.pinned.filter(|&i| self.is_usable(i));
        match pinned.or_else(|| self.pick_index(want.tried, want.key)) {
            Some(i) => Admission::Now(i, InFlight::begin(&self.backends[i].state, &self.load)),
            None => Admission::Nowhere,
        }
    }
}

impl Upstream {
    fn admit_limited(&self, want: &Want<'_>) -> Admission {
        if let Some(pinned) = want.pinned.filter(|&i| self.is_usable(i)) {
            return self.take(pinned);
        }
        if want.key.is_some() {
            return match self.pick_index(want.tried, want.key) {
                Some(i) => self.take(i),
                None => Admission::Nowhere,
            };
        }
        let room = |i: usize| self.backends[i].state.has_room();
        match self.pick_where(Step::Take, want.tried, None, room) {
            Some(i) => self.take(i),
            None if self.any_usable(want.tried) => Admission::Full,
            None => Admission::Nowhere,
        }
    }

    /// Whether any backend not `tried` could take a request, room aside.
    fn any_usable(&self, tried: &[usize]) -> bool {
        (0..self.backends.len())
            .any(|i| !tried.contains(&i) && (self.config.fail_open || self.is_usable(i)))
    }
}

/// What the upstream would do with a request now, and why: `/explain`.
#[derive(Debug)]
pub struct Explained {
    /// The backend it would go to (at once, or once it has room); `None`
    /// when none is usable, or when it would wait for whichever frees first.
    pub backend: Option<usize>,
    /// Its sticky cookie's backend, when that is the one.
    pub pinned: bool,
    /// For a hash key: the key's own backend, were every backend usable.
    pub home: Option<usize>,
    /// It would wait in the queue (every backend it may use is full).
    pub waits: bool,
    /// Backends a pick passes over now, each with the reason.
    pub skipped: Vec<(usize, &'static str)>,
}

impl Upstream {
    /// The pick a request with `key` and `pinned` would get now, made by the
    /// same selection as requests' (`pick_where`), looking only: no rotation
    /// moves, no slow-start draw is taken, nothing is counted in flight.
    pub fn explain(&self, key: Option<u64>, pinned: Option<usize>) -> Explained {
        let skipped = (0..self.backends.len())
            .filter_map(|i| Some((i, self.passed_over(i)?)))
            .collect();
        let room = |i: usize| self.backends[i].state.has_room();
        let pinned = pinned.filter(|&i| self.is_usable(i));
        let unkeyed_with_limits = self.limited && key.is_none() && pinned.is_none();
        let backend = match pinned {
            Some(i) => Some(i),
            None if unkeyed_with_limits => self.pick_where(Step::Peek, &[], None, room),
            None => self.pick_where(Step::Peek, &[], key, |_| true),
        };
        let waits = match backend {
            Some(i) => self.limited && !room(i),
            None => unkeyed_with_limits && self.any_usable(&[]),
        };
        let load = |i: usize| self.backends[i].state.active_requests();
        let home = key.and_then(|k| {
            let total = || self.load.in_flight();
            self.selector
                .pick(Step::Peek, Some(k), |_| true, load, total)
        });
        Explained {
            backend,
            pinned: pinned.is_some(),
            home,
            waits,
            skipped,
        }
    }

    /// Why a pick passes backend `i` over now, if it does.
    fn passed_over(&self, i: usize) -> Option<&'static str> {
        let state = &self.backends[i].state;
        Some(if !state.is_healthy() {
            "down"
        } else if state.ejected_for().is_some() {
            "ejected"
        } else if state.is_draining() {
            "draining"
        } else if !state.has_room() {
            "full"
        } else if !self.admits(i, Step::Peek) {
            "slow_start"
        } else {
            return None;
        })
    }
}

/// Caps retries at a share of the requests, plus a small floor per second, so
/// that a failing fleet is not hit with `1 + retries` times its normal load.
/// A token bucket in thousandths of a retry: each request deposits `ratio`,
/// each retry withdraws one, and a per-second top-up provides the floor.
#[derive(Debug)]
pub struct RetryBudget {
    balance: AtomicI64,
    deposit: i64,
    floor: i64,
    cap: i64,
}

const ONE_RETRY: i64 = 1000;

impl RetryBudget {
    pub fn new(config: RetryBudgetConfig) -> Self {
        let floor = i64::from(config.min_per_second) * ONE_RETRY;
        RetryBudget {
            balance: AtomicI64::new(floor),
            deposit: (config.ratio * ONE_RETRY as f64) as i64,
            floor,
            // Unused budget accumulates up to 10 seconds' floor or 100 retries, whichever is more.
            cap: (floor * 10).max(100 * ONE_RETRY),
        }
    }

    /// Called once per request (not per attempt).
    pub fn deposit(&self) {
        if self.deposit > 0 && self.balance.load(Ordering::Relaxed) < self.cap {
            self.balance.fetch_add(self.deposit, Ordering::Relaxed);
        }
    }

    /// Takes one retry from the budget, if there is one.
    pub fn withdraw(&self) -> bool {
        let before = self.balance.fetch_sub(ONE_RETRY, Ordering::Relaxed);
        if before >= ONE_RETRY {
            return true;
        }
        self.balance.fetch_add(ONE_RETRY, Ordering::Relaxed);
        false
    }

    /// Called every second: the floor is always available.
    pub fn top_up(&self) {
        self.balance.fetch_max(self.floor, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn budget_allows_a_share_of_requests_plus_the_floor() {
        let budget = RetryBudget::new(RetryBudgetConfig {
            ratio: 0.2,
            min_per_second: 3,
        });
        let mut allowed = 0;
        for _ in 0..100 {
            budget.deposit();
            allowed += usize::from(budget.withdraw());
        }
        // The floor (3) plus 20% of 100 requests.
        assert_eq!(allowed, 23);
        budget.top_up();
        assert!(budget.withdraw() && budget.withdraw() && budget.withdraw());
        assert!(!budget.withdraw());
    }
}
