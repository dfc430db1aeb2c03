//! Failure detection: active probes with a rise/fall state machine, and
//! passive ejection of backends that fail live requests.
//!
//! The decisions (`RiseFall::observe`, `Ejection::on_failure`) are pure and
//! tested alone; the probing task around them does the I/O. Each backend has one
//! probing task, so at most one probe is in flight per backend. Probes use their
//! own short-lived connection (`Connection: close`), not the request pool: a
//! backend that stopped accepting connections must fail its check even while
//! old pooled connections still work.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use metrics::Counter;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::task::AbortHandle;

use crate::backend::{now_ms, BackendState};
use crate::backend_tls::{BackendTls, Connector};
use crate::config::{HealthCheckConfig, PassiveConfig};
use crate::upstream::Upstream;

pub const USER_AGENT: &str = concat!("bascule-health-check/", env!("CARGO_PKG_VERSION"));

/// Rise/fall thresholds: consecutive passes to come up, failures to go down.
#[derive(Clone, Copy, Debug)]
pub struct RiseFall {
    pub rise: u32,
    pub fall: u32,
}

impl RiseFall {
    /// Feeds one probe result. `streak` counts consecutive results that disagree
    /// with the current state. Returns the new state when it flips.
    pub fn observe(self, healthy: bool, streak: &mut u32, passed: bool) -> Option<bool> {
        if passed == healthy {
            *streak = 0;
            return None;
        }
        *streak += 1;
        let needed = if healthy { self.fall } else { self.rise };
        if *streak >= needed {
            *streak = 0;
            Some(passed)
        } else {
            None
        }
    }
}

/// Passive ejection: how long, and whether the floor allows it.
#[derive(Clone, Copy, Debug)]
pub struct Ejection {
    pub base: Duration,
    pub max: Duration,
}

impl Ejection {
    /// The length of the `n`th ejection in a row (n from 0): base, 2×base, 4×base, ... up to max.
    pub fn length(self, n: u32) -> Duration {
        self.base.saturating_mul(1 << n.min(20)).min(self.max)
    }
}

/// Whether one more backend of `total` may be ejected while `ejected` already
/// are: at most `max_percent` of them, and never the last usable one.
pub fn ejection_allowed(total: usize, ejected: usize, max_percent: u32) -> bool {
    let cap = total * max_percent as usize / 100;
    ejected < cap && ejected + 1 < total
}

/// Records the outcome of one exchange with `upstream.backends[index]`; ejects
/// the backend when its consecutive failures reach the threshold.
pub fn record_exchange(upstream: &Upstream, index: usize, ok: bool) {
    let Some(passive) = &upstream.config.passive else {
        return;
    };
    let backend = &upstream.backends[index];
    let state = &backend.state;
    if ok {
        if state.failures.load(Ordering::Relaxed) != 0 {
            state.failures.store(0, Ordering::Relaxed);
        }
        return;
    }
    let failures = state.failures.fetch_add(1, Ordering::Relaxed) + 1;
    if failures < passive.consecutive_failures || state.ejected_for().is_some() {
        return;
    }
    // Deciding an ejection is rare, and must be one act: counted and ejected
    // under the upstream's lock, so that failures at once on several workers
    // cannot together eject past the cap, or the last usable backend.
    let _deciding = upstream.ejecting.lock().unwrap_or_else(|e| e.into_inner());
    if state.ejected_for().is_some() {
        return;
    }
    let ejected = upstream
        .backends
        .iter()
        .filter(|b| b.state.ejected_for().is_some())
        .count();
    if !ejection_allowed(
        upstream.backends.len(),
        ejected,
        passive.max_ejected_percent,
    ) {
        return;
    }
    // Without active checks nothing else forgets old ejections: a backend
    // that has served cleanly since its last one starts again from the base.
    decay_ejections(state, passive);
    state.failures.store(0, Ordering::Relaxed);
    let rule = Ejection {
        base: passive.ejection,
        max: passive.max_ejection,
    };
    let n = state.ejections.fetch_add(1, Ordering::Relaxed);
    let length = rule.length(n);
    let until = now_ms() + length.as_millis() as u64;
    state.ejected_until.store(until, Ordering::Relaxed);
    // When it comes back, it ramps up from there.
    state.start_ramp(until);
    tracing::warn!(
        upstream = %upstream.config.name,
        backend = %backend.address,
        "ejected for {} after {failures} failed requests in a row",
        humantime::format_duration(length)
    );
}

/// Forgets past ejections of a backend that has served cleanly for a while (its
/// last ejection ended more than `max_ejection` ago), so that the next ejection
/// starts again from the base length.
fn decay_ejections(state: &BackendState, passive: &PassiveConfig) {
    let until = state.ejected_until.load(Ordering::Relaxed);
    if until != 0 && now_ms() > until + passive.max_ejection.as_millis() as u64 {
        state.ejected_until.store(0, Ordering::Relaxed);
        state.ejections.store(0, Ordering::Relaxed);
    }
}

// ---- active probes ---------------------------------------------------------------------

/// One probe: connect (with TLS when given), send a GET, read the status line.
/// The whole exchange must fit in `timeout`.
pub async fn probe(
    addr: SocketAddr,
    tls: Option<&Connector>,
    request: &[u8],
    timeout: Duration,
) -> Result<u16, String> {
    let exchange = async {
        let stream = TcpStream::connect(addr)
            .await
            .map_err(|e| format!("connect: {e}"))?;
        match tls {
            None => status_line(stream, request).await,
            Some(tls) => {
                let stream = tls.connect(stream).await.map_err(|e| format!("TLS: {e}"))?;
                status_line(stream, request).await
            }
        }
    };
    match tokio::time::timeout(timeout, exchange).await {
        Ok(result) => result,
        Err(_) => Err(format!(
            "no answer within {}",
            humantime::format_duration(timeout)
        )),
    }
}

async fn status_line<S>(mut stream: S, request: &[u8]) -> Result<u16, String>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    stream
        .write_all(request)
        .await
        .map_err(|e| format!("send: {e}"))?;
    let mut buf = [0u8; 64];
    let mut len = 0;
    // "HTTP/1.1 200" is 12 bytes.
    while len < 12 {
        match stream.read(&mut buf[len..]).await {
            Ok(0) => return Err("closed before a status line".to_string()),
            Ok(n) => len += n,
            Err(e) => return Err(format!("read: {e}")),
        }
    }
    let line = &buf[..len];
    if !line.starts_with(b"HTTP/1.") || line[8] != b' ' {
        return Err("not an HTTP/1 response".to_string());
    }
    std::str::from_utf8(&line[9..12])
        .ok()
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| "no status code".to_string())
}

/// Everything one backend's probing task needs.
struct Target {
    upstream: String,
    address: String,
    addr: SocketAddr,
    tls: Option<Connector>,
    state: Arc<BackendState>,
    config: HealthCheckConfig,
    passive: Option<PassiveConfig>,
    /// Its upstream's queue: a backend back in rotation serves waiting requests.
    load: Arc<crate::queue::Load>,
}

impl Target {
    fn request(&self) -> Vec<u8> {
        let host = self.config.host.as_deref().unwrap_or(&self.address);
        format!(
            "GET {} HTTP/1.1\r\nHost: {host}\r\nUser-Agent: {USER_AGENT}\r\nConnection: close\r\n\r\n",
            self.config.path
        )
        .into_bytes()
    }

    /// A fixed offset within the interval, different for each backend, so that
    /// many backends' probes spread out instead of firing together.
    fn phase(&self) -> Duration {
        let h = crate::sticky::backend_id(&self.upstream, &self.address);
        Duration::from_nanos(h % self.config.interval.as_nanos().max(1) as u64)
    }

    async fn run(self, transitions: [Counter; 2]) {
        let request = self.request();
        let rule = RiseFall {
            rise: self.config.healthy_threshold,
            fall: self.config.unhealthy_threshold,
        };
        let mut next = tokio::time::Instant::now() + self.phase();
        let mut passes_while_ejected = 0;
        loop {
            tokio::time::sleep_until(next).await;
            next += self.config.interval;
            let result = probe(self.addr, self.tls.as_ref(), &request, self.config.timeout).await;
            let passed = matches!(&result, Ok(code) if self.config.expected_status.iter().any(|(lo, hi)| (lo..=hi).contains(&code)));
            let mut streak = self.state.probe_streak.load(Ordering::Relaxed);
            let flip = rule.observe(self.state.is_healthy(), &mut streak, passed);
            self.state.probe_streak.store(streak, Ordering::Relaxed);
            if let Some(up) = flip {
                self.state.set_healthy(up);
                if up {
                    self.state.start_ramp(now_ms());
                    self.load.dispatch();
                }
                transitions[usize::from(up)].increment(1);
                let why = match &result {
                    Ok(code) => format!("status {code}"),
                    Err(e) => e.clone(),
                };
                if up {
                    tracing::info!(upstream = %self.upstream, backend = %self.address, "backend is up ({why})");
                } else {
                    tracing::warn!(upstream = %self.upstream, backend = %self.address, "backend is down ({why})");
                }
            }
            // Active checks may end a passive ejection early.
            if passed && self.state.ejected_for().is_some() {
                passes_while_ejected += 1;
                if passes_while_ejected >= rule.rise {
                    self.state.ejected_until.store(now_ms(), Ordering::Relaxed);
                    self.load.dispatch();
                    tracing::info!(upstream = %self.upstream, backend = %self.address, "ejection ended by health checks");
                }
            } else {
                passes_while_ejected = 0;
            }
            if let Some(passive) = &self.passive {
                decay_ejections(&self.state, passive);
            }
        }
    }
}

/// What a probing task was started with: a change restarts it.
type Probing = (HealthCheckConfig, Option<BackendTls>);

/// The probing tasks, one per checked backend, kept in step with the snapshot.
#[derive(Default)]
pub struct HealthChecks {
    tasks: HashMap<(String, String), (Probing, AbortHandle)>,
}

impl HealthChecks {
    /// Starts probing new backends, stops probing removed ones, and restarts the
    /// ones whose check changed. State lives in `BackendState`, so a restarted
    /// task carries on where the old one was.
    pub fn sync(&mut self, upstreams: &[Arc<Upstream>]) {
        let mut wanted = HashMap::new();
        for u in upstreams {
            let Some(config) = &u.config.health_check else {
                continue;
            };
            for b in &u.backends {
                let probing = (config.clone(), u.config.tls.clone());
                wanted.insert((u.config.name.clone(), b.address.clone()), (probing, b, u));
            }
        }
        self.tasks.retain(|key, (config, handle)| {
            let keep = wanted.get(key).is_some_and(|(c, _, _)| c == config);
            if !keep {
                handle.abort();
            }
            keep
        });
        for (key, (probing, backend, upstream)) in wanted {
            if self.tasks.contains_key(&key) {
                continue;
            }
            let target = Target {
                upstream: key.0.clone(),
                address: key.1.clone(),
                addr: backend.addr,
                tls: backend.probe_tls.clone(),
                state: backend.state.clone(),
                config: probing.0.clone(),
                passive: upstream.config.passive.clone(),
                load: upstream.load.clone(),
            };
            let transitions = [
                crate::metrics::health_transition(&key.0, &key.1, false),
                crate::metrics::health_transition(&key.0, &key.1, true),
            ];
            let handle = tokio::spawn(target.run(transitions)).abort_handle();
            self.tasks.insert(key, (probing, handle));
        }
    }
}

impl Drop for HealthChecks {
    fn drop(&mut self) {
        for (_, handle) in self.tasks.values() {
            handle.abort();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rise_and_fall_need_consecutive_results() {
        let rule = RiseFall { rise: 2, fall: 3 };
        let (mut healthy, mut streak) = (true, 0);
        let mut feed = |passed: bool| {
            if let Some(up) = rule.observe(healthy, &mut streak, passed) {
                healthy = up;
            }
            healthy
        };
        assert!(feed(false));
        assert!(feed(false));
        assert!(feed(true)); // a pass resets the failure streak
        assert!(feed(false));
        assert!(feed(false));
        assert!(!feed(false)); // third failure in a row: down
        assert!(!feed(true));
        assert!(!feed(false)); // a failure resets the pass streak
        assert!(!feed(true));
        assert!(feed(true)); // second pass in a row: up
    }

    #[test]
    fn ejections_double_up_to_the_cap() {
        let rule = Ejection {
            base: Duration::from_secs(30),
            max: Duration::from_secs(300),
        };
        let lengths: Vec<u64> = (0..6).map(|n| rule.length(n).as_secs()).collect();
        assert_eq!(lengths, [30, 60, 120, 240, 300, 300]);
        assert_eq!(rule.length(u32::MAX).as_secs(), 300);
    }

    #[test]
    fn ejection_floor_keeps_a_share_and_the_last_backend() {
        assert!(ejection_allowed(10, 4, 50));
        assert!(!ejection_allowed(10, 5, 50));
        assert!(!ejection_allowed(2, 1, 100)); // never the last one
        assert!(ejection_allowed(2, 0, 100));
        assert!(!ejection_allowed(1, 0, 100));
        assert!(!ejection_allowed(3, 0, 0));
    }

    /// The first upstream of a config with `backends` backends and `passive` settings.
    fn upstream(backends: usize, passive: &str) -> Arc<Upstream> {
        let list: Vec<String> = (0..backends)
            .map(|i| format!("127.0.0.1:{}", 20000 + i))
            .collect();
        let yaml = format!(
            "listeners:\n  - bind: 127.0.0.1:0\n    routes: [{{upstream: app}}]\nupstreams:\n  app:\n    passive: {passive}\n    backends: [{}]\n",
            list.join(", ")
        );
        let config = crate::config::decode(&yaml, std::path::Path::new(".")).unwrap();
        let snapshot = crate::state::Snapshot::build(Arc::new(config), None);
        snapshot.upstreams[0].clone()
    }

    #[test]
    fn a_backend_clean_since_its_last_ejection_starts_again_from_the_base() {
        let u = upstream(
            4,
            "{ consecutive_failures: 1, ejection: 10ms, max_ejection: 20ms }",
        );
        let state = &u.backends[0].state;
        record_exchange(&u, 0, false);
        assert_eq!(state.ejections.load(Ordering::Relaxed), 1);
        // Its ejection ended at the clock's start, longer ago than max_ejection,
        // with no active checks to notice.
        state.ejected_until.store(1, Ordering::Relaxed);
        while now_ms() < 30 {
            std::thread::yield_now();
        }
        record_exchange(&u, 0, false);
        let left = state.ejected_for().expect("ejected again");
        assert!(
            left <= Duration::from_millis(10),
            "{left:?}: doubled, not decayed"
        );
        assert_eq!(state.ejections.load(Ordering::Relaxed), 1);
        // Failing again as soon as it comes back still doubles.
        state.ejected_until.store(now_ms(), Ordering::Relaxed);
        record_exchange(&u, 0, false);
        assert!(state.ejected_for().unwrap() > Duration::from_millis(10));
    }

    #[test]
    fn concurrent_failures_never_eject_past_the_cap() {
        // Many backends: counting them is the window in which two failures at
        // once could both see room for one more ejection.
        let u = upstream(
            64,
            "{ consecutive_failures: 1, ejection: 1h, max_ejected_percent: 50 }",
        );
        for _ in 0..300 {
            for b in &u.backends {
                b.state.ejected_until.store(0, Ordering::Relaxed);
                b.state.failures.store(0, Ordering::Relaxed);
            }
            // Every backend fails at once, each on its own thread.
            let start = std::sync::Barrier::new(u.backends.len());
            std::thread::scope(|scope| {
                for i in 0..u.backends.len() {
                    let (u, start) = (&u, &start);
                    scope.spawn(move || {
                        start.wait();
                        record_exchange(u, i, false);
                    });
                }
            });
            let ejected = u
                .backends
                .iter()
                .filter(|b| b.state.ejected_for().is_some())
                .count();
            assert_eq!(ejected, 32, "50% of 64");
        }
    }

    #[tokio::test]
    async fn probe_reads_the_status_and_times_out() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.unwrap();
            let mut buf = [0u8; 1024];
            let n = s.read(&mut buf).await.unwrap();
            assert!(buf[..n].starts_with(b"GET /hc HTTP/1.1\r\n"));
            s.write_all(b"HTTP/1.1 503 Service Unavailable\r\n\r\n")
                .await
                .unwrap();
            // The second connection never answers.
            let (_s, _) = listener.accept().await.unwrap();
            tokio::time::sleep(Duration::from_secs(5)).await;
        });
        let req = b"GET /hc HTTP/1.1\r\nHost: x\r\n\r\n";
        assert_eq!(
            probe(addr, None, req, Duration::from_secs(2)).await,
            Ok(503)
        );
        let late = probe(addr, None, req, Duration::from_millis(100))
            .await
            .unwrap_err();
        assert!(late.contains("no answer"), "{late}");
    }
}
