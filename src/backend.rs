//! One backend server: what the config says of it, and its runtime state.
//!
//! The config part (`Backend`) is rebuilt on every reload; the runtime part
//! (`BackendState`) is shared by `Arc` and carried over to the new snapshot when
//! the backend's (upstream, address) stays, so a reload that only changes a
//! weight keeps its health and in-flight count.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use http::uri::Authority;

use crate::config::BackendConfig;
use crate::metrics::RequestCounters;
use crate::pool::Pool;

/// Milliseconds on a process-wide monotonic clock; never 0.
pub fn now_ms() -> u64 {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    EPOCH.get_or_init(Instant::now).elapsed().as_millis() as u64 + 1
}

/// Mutable facts about a backend, shared by every thread and kept across reloads.
#[derive(Debug)]
pub struct BackendState {
    /// The active health checks' verdict.
    healthy: AtomicBool,
    /// Set by an operator: no new requests or sticky pins; in-flight ones finish.
    draining: AtomicBool,
    /// Consecutive probe results that disagree with `healthy` (rise/fall progress).
    pub(crate) probe_streak: AtomicU32,
    active: AtomicUsize,
    /// Consecutive failed exchanges with live traffic.
    pub(crate) failures: AtomicU32,
    /// Ejected from rotation until this `now_ms()`; 0 when not ejected.
    pub(crate) ejected_until: AtomicU64,
    /// Ejections in a row without a clean spell between them: each doubles the next.
    pub(crate) ejections: AtomicU32,
    /// When the backend last came (back) into rotation, for slow start; 0: not ramping.
    pub(crate) ramp_started: AtomicU64,
}

impl Default for BackendState {
    fn default() -> Self {
        BackendState::new(true)
    }
}

impl BackendState {
    pub fn new(healthy: bool) -> Self {
        BackendState {
            healthy: AtomicBool::new(healthy),
            draining: AtomicBool::new(false),
            probe_streak: AtomicU32::new(0),
            active: AtomicUsize::new(0),
            failures: AtomicU32::new(0),
            ejected_until: AtomicU64::new(0),
            ejections: AtomicU32::new(0),
            ramp_started: AtomicU64::new(0),
        }
    }

    /// Starts a slow-start ramp at `at` (a `now_ms()` time).
    pub fn start_ramp(&self, at: u64) {
        self.ramp_started.store(at, Ordering::Relaxed);
    }

    /// The share of its weight a backend in slow start should get now (0 to 1);
    /// 1 when it is not ramping.
    pub fn ramp(&self, window: Duration) -> f64 {
        let started = self.ramp_started.load(Ordering::Relaxed);
        if started == 0 {
            return 1.0;
        }
        let now = now_ms();
        let elapsed = now.saturating_sub(started) as f64;
        let window = window.as_millis().max(1) as f64;
        if now >= started && elapsed >= window {
            self.ramp_started.store(0, Ordering::Relaxed);
            return 1.0;
        }
        // Before `started` (an ejection not yet over) counts as the ramp's start.
        (elapsed / window).max(0.01)
    }

    pub fn is_healthy(&self) -> bool {
        self.healthy.load(Ordering::Relaxed)
    }

    pub fn set_healthy(&self, healthy: bool) {
        self.healthy.store(healthy, Ordering::Relaxed);
    }

    /// Ejected by passive detection, and for how much longer.
    pub fn ejected_for(&self) -> Option<Duration> {
        let until = self.ejected_until.load(Ordering::Relaxed);
        if until == 0 {
            return None;
        }
        let now = now_ms();
        (now < until).then(|| Duration::from_millis(until - now))
    }

    /// May new requests go here: healthy and not ejected.
    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Relaxed)
    }

    pub fn set_draining(&self, draining: bool) {
        self.draining.store(draining, Ordering::Relaxed);
    }

    pub fn is_usable(&self) -> bool {
        if !self.is_healthy() || self.is_draining() {
            return false;
        }
        // The clock is read only for a backend with an ejection on record.
        let until = self.ejected_until.load(Ordering::Relaxed);
        until == 0 || until <= now_ms()
    }

    /// Requests sent to this backend whose response has not finished.
    pub fn active_requests(&self) -> usize {
        self.active.load(Ordering::Relaxed)
    }

    /// Counts a request as in flight, here and in its upstream's `total`, until
    /// the returned guard is dropped.
    pub fn begin_request(self: &Arc<Self>, total: &Arc<AtomicUsize>) -> InFlight {
        self.active.fetch_add(1, Ordering::Relaxed);
        total.fetch_add(1, Ordering::Relaxed);
        InFlight(self.clone(), total.clone())
    }
}

/// Keeps one request counted in `BackendState::active_requests`. It rides with the
/// response body, so the count drops when the body ends or the client goes away,
/// not when the headers arrive.
#[derive(Debug)]
pub struct InFlight(Arc<BackendState>, Arc<AtomicUsize>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.active.fetch_sub(1, Ordering::Relaxed);
        self.1.fetch_sub(1, Ordering::Relaxed);
    }
}

#[derive(Debug)]
pub struct Backend {
    /// The address as written in the config: the backend's name in logs, metrics and status.
    pub address: String,
    pub addr: SocketAddr,
    pub weight: u32,
    /// `addr` as a URI authority, made once so requests need not format it.
    pub authority: Authority,
    pub state: Arc<BackendState>,
    /// Keep-alive connections to this backend; kept across reloads like `state`.
    pub pool: Arc<Pool>,
    /// With upstream TLS: how health probes reach it.
    pub probe_tls: Option<crate::backend_tls::Connector>,
    pub requests: RequestCounters,
}

impl Backend {
    pub fn new(
        upstream: &str,
        config: &BackendConfig,
        state: Arc<BackendState>,
        pool: Arc<Pool>,
        probe_tls: Option<crate::backend_tls::Connector>,
    ) -> Self {
        let authority = Authority::try_from(config.addr.to_string())
            .expect("a socket address is a valid authority");
        Backend {
            address: config.address.clone(),
            addr: config.addr,
            weight: config.weight,
            authority,
            state,
            pool,
            probe_tls,
            requests: RequestCounters::new(upstream, &config.address),
        }
    }
}
