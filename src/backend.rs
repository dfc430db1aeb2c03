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
    /// `max_connections`: requests in flight at once; `usize::MAX` when unlimited.
    /// Here rather than in `Backend` so that a reload's new limit reaches the
    /// requests already queued on the old snapshot.
    limit: AtomicUsize,
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
            limit: AtomicUsize::new(usize::MAX),
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

    /// Its `max_connections`, if it has one.
    pub fn limit(&self) -> Option<usize> {
        Some(self.limit.load(Ordering::Relaxed)).filter(|&l| l != usize::MAX)
    }

    pub fn set_limit(&self, limit: Option<usize>) {
        self.limit
            .store(limit.unwrap_or(usize::MAX), Ordering::Relaxed);
    }

    /// Below its `max_connections` (always, without one).
    pub fn has_room(&self) -> bool {
        self.active.load(Ordering::Relaxed) < self.limit.load(Ordering::Relaxed)
    }

    /// Counts a request in flight, whatever the limit.
    pub(crate) fn acquire(&self) {
        self.active.fetch_add(1, Ordering::Relaxed);
    }

    /// Counts a request in flight if that keeps the backend within its limit:
    /// exact across threads, where a check then an increment would let two
    /// workers both take the last place.
    pub(crate) fn try_acquire(&self) -> bool {
        let limit = self.limit.load(Ordering::Relaxed);
        self.active
            .fetch_update(Ordering::SeqCst, Ordering::Relaxed, |n| {
                (n < limit).then_some(n + 1)
            })
            .is_ok()
    }

    /// Ends a request's count. Sequentially consistent with the queue's
    /// count of waiters (`queue::Load`): whoever comes second of a release
    /// and a request joining the queue sees the other.
    pub(crate) fn release(&self) {
        self.active.fetch_sub(1, Ordering::SeqCst);
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_limit_holds_exactly_when_threads_race_for_the_last_place() {
        let state = Arc::new(BackendState::default());
        state.set_limit(Some(2));
        let peak = AtomicUsize::new(0);
        // On a busy machine the threads may take turns for a while: they go on
        // until two have held places at once (the limit reached), within reason.
        let deadline = Instant::now() + Duration::from_secs(10);
        std::thread::scope(|scope| {
            for _ in 0..4 {
                scope.spawn(|| {
                    let mut round = 0;
                    while round < 20_000
                        || (peak.load(Ordering::Relaxed) < 2 && Instant::now() < deadline)
                    {
                        round += 1;
                        if state.try_acquire() {
                            peak.fetch_max(state.active_requests(), Ordering::Relaxed);
                            state.release();
                        }
                    }
                });
            }
        });
        assert_eq!(peak.load(Ordering::Relaxed), 2);
        assert_eq!(state.active_requests(), 0);
    }
}
