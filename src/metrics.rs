//! Metric names, the Prometheus recorder, and pre-registered handles for the hot path.
//!
//! Labels come only from the configuration (upstream and backend names), never
//! from request data, so the series count is bounded by the config. Handles are
//! looked up once, when a runtime snapshot is built, so a request only bumps
//! atomics: no label formatting or registry lookup per request.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;

use metrics::{Counter, Histogram};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

pub const REQUESTS_TOTAL: &str = "bascule_requests_total";
pub const REQUEST_DURATION: &str = "bascule_request_duration_seconds";
pub const BACKEND_HEALTHY: &str = "bascule_backend_healthy";
pub const BACKEND_ACTIVE: &str = "bascule_backend_active_requests";
pub const CONFIG_RELOADS: &str = "bascule_config_reloads_total";
pub const CONNECTIONS_OPENED: &str = "bascule_backend_connections_opened_total";
pub const HEALTH_TRANSITIONS: &str = "bascule_health_transitions_total";
pub const RETRIES: &str = "bascule_retries_total";
pub const STICKY_REJECTED: &str = "bascule_sticky_rejected_total";
pub const CACHE_REQUESTS: &str = "bascule_cache_requests_total";
pub const CACHE_INVALIDATIONS: &str = "bascule_cache_invalidations_total";
pub const CACHE_BYTES: &str = "bascule_cache_bytes";
pub const CACHE_ENTRIES: &str = "bascule_cache_entries";
pub const QUEUE_DEPTH: &str = "bascule_queue_depth";
pub const QUEUE_WAIT: &str = "bascule_queue_wait_seconds";
pub const QUEUE_REJECTED: &str = "bascule_queue_rejected_total";
pub const DISCOVERY_LOOKUPS: &str = "bascule_discovery_lookups_total";
pub const PROXY_PROTOCOL_REFUSED: &str = "bascule_proxy_protocol_refused_total";

/// The label value for replies made without a backend (and without an upstream when no route matched).
pub const NONE: &str = "none";

const DURATION_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
    60.0,
];

/// The process-wide Prometheus recorder, installed on first use.
///
/// Handles made before the recorder exists record nothing, so everything that
/// makes handles calls this first.
pub fn handle() -> &'static PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE.get_or_init(|| {
        let recorder = PrometheusBuilder::new()
            .set_buckets_for_metric(Matcher::Full(REQUEST_DURATION.into()), DURATION_BUCKETS)
            .and_then(|b| {
                b.set_buckets_for_metric(Matcher::Full(QUEUE_WAIT.into()), DURATION_BUCKETS)
            })
            .expect("the bucket list is not empty")
            .build_recorder();
        let handle = recorder.handle();
        // Fails only when a program embedding bascule installed its own recorder first;
        // bascule's metrics then go to that recorder, which is the embedder's choice.
        let _ = metrics::set_global_recorder(recorder);
        handle
    })
}

/// `bascule_requests_total` for one (upstream, backend) pair, one counter per status code,
/// registered on first use of each code. The table for a class of codes (2xx, 5xx...) is
/// made when the first code of the class is seen, so an upstream of thousands of backends
/// costs a few words per backend until traffic arrives.
#[derive(Debug)]
pub struct RequestCounters {
    upstream: String,
    backend: String,
    by_class: [OnceLock<Box<[OnceLock<Counter>]>>; 5],
    /// Every reply, and the 5xx among them, readable for `/status` (and the
    /// status page's rates), where the recorder's counters are not.
    total: AtomicU64,
    errors: AtomicU64,
}

impl RequestCounters {
    pub fn new(upstream: &str, backend: &str) -> Self {
        handle();
        RequestCounters {
            upstream: upstream.to_string(),
            backend: backend.to_string(),
            by_class: Default::default(),
            total: AtomicU64::new(0),
            errors: AtomicU64::new(0),
        }
    }

    /// Replies counted, and the 5xx among them.
    pub fn totals(&self) -> (u64, u64) {
        (
            self.total.load(Ordering::Relaxed),
            self.errors.load(Ordering::Relaxed),
        )
    }

    pub fn count(&self, status: u16) {
        let status = status.clamp(100, 599);
        self.total.fetch_add(1, Ordering::Relaxed);
        if status >= 500 {
            self.errors.fetch_add(1, Ordering::Relaxed);
        }
        let class = self.by_class[usize::from(status / 100 - 1)]
            .get_or_init(|| (0..100).map(|_| OnceLock::new()).collect());
        class[usize::from(status % 100)]
            .get_or_init(|| {
                metrics::counter!(REQUESTS_TOTAL,
                    "upstream" => self.upstream.clone(),
                    "backend" => self.backend.clone(),
                    "status" => status.to_string())
            })
            .increment(1);
    }
}

pub fn request_duration(upstream: &str) -> Histogram {
    handle();
    metrics::histogram!(REQUEST_DURATION, "upstream" => upstream.to_string())
}

/// How long requests waited in an upstream's queue for a backend with room.
pub fn queue_wait(upstream: &str) -> Histogram {
    handle();
    metrics::histogram!(QUEUE_WAIT, "upstream" => upstream.to_string())
}

/// Requests the queue turned away: `full` or `timeout`.
pub fn queue_rejected(upstream: &str, reason: &'static str) -> Counter {
    handle();
    metrics::counter!(QUEUE_REJECTED, "upstream" => upstream.to_string(), "reason" => reason)
}

/// New TCP connections opened to a backend: with `bascule_requests_total`, it shows connection reuse.
pub fn connections_opened(upstream: &str, backend: &str) -> Counter {
    handle();
    metrics::counter!(CONNECTIONS_OPENED, "upstream" => upstream.to_string(), "backend" => backend.to_string())
}

pub fn health_transition(upstream: &str, backend: &str, to_healthy: bool) -> Counter {
    handle();
    let to = if to_healthy { "healthy" } else { "unhealthy" };
    metrics::counter!(HEALTH_TRANSITIONS, "upstream" => upstream.to_string(), "backend" => backend.to_string(), "to" => to)
}

/// Requests sent again to another backend.
pub fn retries(upstream: &str) -> Counter {
    handle();
    metrics::counter!(RETRIES, "upstream" => upstream.to_string())
}

/// Sticky cookies not honoured, by reason.
pub fn sticky_rejected(upstream: &str, reason: &str) -> Counter {
    handle();
    metrics::counter!(STICKY_REJECTED, "upstream" => upstream.to_string(), "reason" => reason.to_string())
}

pub fn config_reload(success: bool) {
    handle();
    let result = if success { "success" } else { "failure" };
    metrics::counter!(CONFIG_RELOADS, "result" => result).increment(1);
}

/// Every metric in Prometheus text, without the series of backends for
/// which `present(upstream, backend)` is false: those that discovery, the
/// admin API or a reload removed. (The recorder keeps their handles, a few
/// hundred bytes each, as it offers no way to drop a series.)
pub fn render(present: impl Fn(&str, &str) -> bool) -> String {
    let text = handle().render();
    let mut out = String::with_capacity(text.len());
    for line in text.lines() {
        let gone = match (label(line, "upstream"), label(line, "backend")) {
            (Some(upstream), Some(backend)) => backend != NONE && !present(upstream, backend),
            _ => false,
        };
        if !gone {
            out.push_str(line);
            out.push('\n');
        }
    }
    out
}

/// The value of label `name` in one line of Prometheus text.
fn label<'a>(line: &'a str, name: &str) -> Option<&'a str> {
    let (_, labels) = line.split_once('{')?;
    let labels = labels.rsplit_once('}')?.0;
    labels.split(',').find_map(|pair| {
        let (key, value) = pair.split_once('=')?;
        (key == name).then(|| value.trim_matches('"'))
    })
}

/// A connection closed on a `proxy_protocol` listener: its header `missing`,
/// `invalid`, or not whole in time (`timeout`).
pub fn proxy_protocol_refused(listener: &str, reason: &'static str) {
    handle();
    metrics::counter!(PROXY_PROTOCOL_REFUSED, "listener" => listener.to_string(), "reason" => reason)
        .increment(1);
}

/// One lookup of a backend name: `found`, `no_address` or `failed`.
pub fn discovery_lookup(upstream: &str, name: &str, result: &'static str) {
    handle();
    let labels = [
        ("upstream", upstream.to_string()),
        ("name", name.to_string()),
        ("result", result.to_string()),
    ];
    metrics::counter!(DISCOVERY_LOOKUPS, &labels).increment(1);
}

/// Counters for replies made when no route matched (`upstream="none"`, `backend="none"`).
pub fn unrouted() -> &'static RequestCounters {
    static UNROUTED: OnceLock<RequestCounters> = OnceLock::new();
    UNROUTED.get_or_init(|| RequestCounters::new(NONE, NONE))
}
