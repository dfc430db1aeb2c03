//! The admin listener: the status page, `GET /status` (JSON), `GET /metrics`
//! (Prometheus text), `GET /explain`, drains, runtime backend changes and
//! cache purges; behind a bearer token when `admin.token` is set.
//!
//! It runs on the control thread (with health checks), so a busy request path
//! never delays a scrape, and a slow scraper never takes a worker's time.
//! Routing is axum's, served by the same hyper as the request path.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::{DefaultBodyLimit, Path, RawQuery, Request, State as Shared};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use axum::Router;
use http::header::{HeaderValue, CONTENT_TYPE};
use http::{Method, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use serde::Deserialize;
use serde_json::json;
use subtle::ConstantTimeEq;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::cache;
use crate::membership::Refused;
use crate::metrics as m;
use crate::state::{Snapshot, State};

type Reply = Response;

/// Serves the admin endpoints until `shutdown`.
pub async fn serve(socket: std::net::TcpListener, state: Arc<State>, shutdown: CancellationToken) {
    let _ = socket.set_nonblocking(true);
    let listener = match TcpListener::from_std(socket) {
        Ok(l) => l,
        Err(e) => return tracing::error!("cannot use the admin socket: {e}"),
    };
    let service = TowerToHyperService::new(router(state));
    loop {
        let (stream, _) = tokio::select! {
            _ = shutdown.cancelled() => return,
            r = listener.accept() => match r {
                Ok(pair) => pair,
                Err(e) => {
                    tracing::warn!("admin accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let service = service.clone();
        tokio::spawn(async move {
            let _ = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(Duration::from_secs(10))
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

/// Every admin endpoint.
pub fn router(state: Arc<State>) -> Router {
    let backend = "/upstreams/{upstream}/backends/{address}";
    Router::new()
        .route("/", get(page))
        .route("/status", get(status_reply))
        .route("/metrics", get(metrics_reply))
        .route("/explain", get(explain))
        .route("/upstreams/{upstream}/backends", post(add_backend))
        .route(backend, axum::routing::delete(remove_backend))
        .route(&format!("{backend}/weight"), put(set_weight))
        .route(&format!("{backend}/{{action}}"), post(drain))
        .route("/caches/{cache}/purge", post(purge))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(DefaultBodyLimit::max(BODY_LIMIT))
        .layer(middleware::from_fn_with_state(state.clone(), authorize))
        .with_state(state)
}

/// The largest request body read (a purge's list of URLs, a backend to add).
const BODY_LIMIT: usize = 1 << 20;

/// With `admin.token` set, every request but `GET /metrics` (which
/// Prometheus scrapes, and which changes nothing) and the status page's own
/// HTML carries the token as a bearer token, compared in constant time.
async fn authorize(Shared(state): Shared<Arc<State>>, req: Request, next: Next) -> Reply {
    if authorized(&state, &req) {
        next.run(req).await
    } else {
        let mut resp = text(
            StatusCode::UNAUTHORIZED,
            "401 Unauthorized: this admin endpoint needs Authorization: Bearer TOKEN (admin.token)",
        );
        resp.headers_mut().insert(
            http::header::WWW_AUTHENTICATE,
            HeaderValue::from_static("Bearer"),
        );
        resp
    }
}

fn authorized<B>(state: &State, req: &http::Request<B>) -> bool {
    let snapshot = state.load();
    let Some(token) = snapshot
        .config
        .admin
        .as_ref()
        .and_then(|a| a.token.as_ref())
    else {
        return true;
    };
    // The status page is static: it asks for its figures from /status, with the token.
    if matches!(req.uri().path(), "/metrics" | "/")
        && matches!(*req.method(), Method::GET | Method::HEAD)
    {
        return true;
    }
    let Some(field) = req.headers().get(http::header::AUTHORIZATION) else {
        return false;
    };
    // The scheme's name is case-insensitive (RFC 9110, section 11.1).
    match field.as_bytes().split_at_checked(7) {
        Some((scheme, given)) if scheme.eq_ignore_ascii_case(b"bearer ") => {
            bool::from(given.ct_eq(token.as_bytes()))
        }
        _ => false,
    }
}

async fn not_found() -> Reply {
    text(
        StatusCode::NOT_FOUND,
        "404 Not Found: try /, /status, /metrics, /explain?url=URL, /upstreams/NAME/backends/ADDRESS \
         or /caches/NAME/purge",
    )
}

async fn method_not_allowed(method: Method) -> Reply {
    text(
        StatusCode::METHOD_NOT_ALLOWED,
        &format!("405 Method Not Allowed: {method} is not used here"),
    )
}

/// `GET /`: the live status page, one file with its style and script (no
/// external asset), which polls `/status`.
const STATUS_PAGE: &str = include_str!("status_page.html");

async fn page() -> Reply {
    ([(CONTENT_TYPE, "text/html; charset=utf-8")], STATUS_PAGE).into_response()
}

async fn status_reply(Shared(state): Shared<Arc<State>>) -> Reply {
    let mut json = status(&state.load_full());
    if let Some(last) = state
        .last_reload
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .clone()
    {
        json["last_reload"] = json!({
            "result": if last.success { "success" } else { "failure" },
            "at": last.at,
            "error": last.error,
        });
    }
    json_reply(json)
}

async fn metrics_reply(Shared(state): Shared<Arc<State>>) -> Reply {
    (
        [(CONTENT_TYPE, "text/plain; version=0.0.4")],
        metrics(&state.load_full()),
    )
        .into_response()
}

async fn explain(Shared(state): Shared<Arc<State>>, RawQuery(query): RawQuery) -> Reply {
    match crate::explain::explain(&state.load_full(), query.as_deref().unwrap_or("")) {
        Ok(answer) => json_reply(answer),
        Err(why) => text(StatusCode::BAD_REQUEST, &format!("400 Bad Request: {why}")),
    }
}

/// `POST /caches/{cache}/purge` with `{"urls": [...]}`, `{"tags": [...]}` or
/// `{"all": true}`: drops those entries from every instance, and answers
/// `{"dropped": N}` (this process's count).
async fn purge(Shared(state): Shared<Arc<State>>, Path(name): Path<String>, body: Bytes) -> Reply {
    let Some(cache) = state.load().cache(&name).cloned() else {
        return text(
            StatusCode::NOT_FOUND,
            &format!("404 Not Found: no cache named {name}"),
        );
    };
    let purge = match cache::Purge::from_json(&body) {
        Ok(p) => p,
        Err(why) => return text(StatusCode::BAD_REQUEST, &format!("400 Bad Request: {why}")),
    };
    let dropped = cache.purge_everywhere(purge, cache::Source::Admin).await;
    json_reply(json!({ "dropped": dropped }))
}

/// `POST /upstreams/{upstream}/backends/{address}/drain` (or `/undrain`): a
/// draining backend gets no new requests or sticky pins and finishes the ones
/// in flight; its `active_requests` in the reply and in /status tells a deploy
/// script when it is idle. The flag is kept across reloads that keep the backend.
async fn drain(
    Shared(state): Shared<Arc<State>>,
    Path((upstream, address, action)): Path<(String, String, String)>,
) -> Reply {
    let draining = match action.as_str() {
        "drain" => true,
        "undrain" => false,
        _ => {
            return text(
                StatusCode::NOT_FOUND,
                "404 Not Found: the action is drain or undrain",
            )
        }
    };
    let snapshot = state.load_full();
    let Some(u) = snapshot.upstream(&upstream) else {
        return text(
            StatusCode::NOT_FOUND,
            &format!("404 Not Found: no upstream named {upstream}"),
        );
    };
    let Some(backend) = u.backends.iter().find(|b| b.address == address) else {
        return text(
            StatusCode::NOT_FOUND,
            &format!("404 Not Found: no backend {address} in upstream {upstream}"),
        );
    };
    backend.state.set_draining(draining);
    // Requests waiting for room may now use it.
    u.load.dispatch();
    let what = if draining {
        "draining"
    } else {
        "no longer draining"
    };
    tracing::info!(upstream, backend = address, "{what}");
    json_reply(json!({
        "upstream": upstream,
        "address": address,
        "draining": draining,
        "active_requests": backend.state.active_requests(),
    }))
}

/// Runtime changes hold until the next reload or restart: said in each reply.
const UNTIL_RELOAD: &str =
    "until the next reload or restart; write it to the config file to keep it";

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Weight {
    weight: u32,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NewBackend {
    address: String,
    #[serde(default = "one")]
    weight: u32,
}

fn one() -> u32 {
    1
}

/// `PUT /upstreams/{upstream}/backends/{address}/weight` with `{"weight": N}`.
async fn set_weight(
    Shared(state): Shared<Arc<State>>,
    Path((upstream, address)): Path<(String, String)>,
    body: Bytes,
) -> Reply {
    let Weight { weight } = match parse(&body, r#"{"weight": N}"#) {
        Ok(w) => w,
        Err(why) => return text(StatusCode::BAD_REQUEST, &why),
    };
    let result = state.change_membership(|m| split(m.set_weight(&upstream, &address, weight)));
    changed(result, StatusCode::OK, || {
        tracing::info!(
            upstream,
            backend = address,
            "weight set to {weight} over the admin API"
        );
        json!({ "upstream": upstream, "address": address, "weight": weight, "holds": UNTIL_RELOAD })
    })
}

/// `POST /upstreams/{upstream}/backends` with `{"address": "ip:port", "weight": N}`:
/// a new backend, with health checks and slow start as for a reload's.
async fn add_backend(
    Shared(state): Shared<Arc<State>>,
    Path(upstream): Path<String>,
    body: Bytes,
) -> Reply {
    let shape = r#"{"address": "ip:port", "weight": N}"#;
    let NewBackend { address, weight } = match parse(&body, shape) {
        Ok(b) => b,
        Err(why) => return text(StatusCode::BAD_REQUEST, &why),
    };
    let Ok(addr) = address.parse::<SocketAddr>() else {
        return text(
            StatusCode::BAD_REQUEST,
            &format!("400 Bad Request: `{address}` is not an address (expected ip:port)"),
        );
    };
    let result = state.change_membership(|m| split(m.add(&upstream, addr, weight)));
    changed(result, StatusCode::CREATED, || {
        tracing::info!(upstream, backend = %addr, "added over the admin API");
        json!({ "upstream": upstream, "address": addr.to_string(), "weight": weight, "holds": UNTIL_RELOAD })
    })
}

/// `DELETE /upstreams/{upstream}/backends/{address}`: answers at once; the
/// backend takes no new requests, and goes when those in flight have finished.
async fn remove_backend(
    Shared(state): Shared<Arc<State>>,
    Path((upstream, address)): Path<(String, String)>,
) -> Reply {
    let result = state.change_membership(|m| split(m.remove(&upstream, &address)));
    changed(result, StatusCode::ACCEPTED, || {
        tracing::info!(
            upstream,
            backend = address,
            "removed over the admin API: draining"
        );
        json!({ "upstream": upstream, "address": address, "leaving": true, "holds": UNTIL_RELOAD })
    })
}

/// A membership change's result, as `change_membership` takes it.
fn split<T>(result: Result<T, Refused>) -> (Option<T>, Result<(), Refused>) {
    match result {
        Ok(config) => (Some(config), Ok(())),
        Err(refused) => (None, Err(refused)),
    }
}

fn changed(
    result: Result<(), Refused>,
    status: StatusCode,
    reply: impl FnOnce() -> serde_json::Value,
) -> Reply {
    match result {
        Ok(()) => {
            let mut resp = json_reply(reply());
            *resp.status_mut() = status;
            resp
        }
        Err(Refused { status, reason }) => {
            let status = StatusCode::from_u16(status).unwrap_or(StatusCode::BAD_REQUEST);
            let phrase = status.canonical_reason().unwrap_or("");
            text(status, &format!("{} {phrase}: {reason}", status.as_u16()))
        }
    }
}

/// A JSON body of the shape shown, or a 400 that shows it.
fn parse<T: serde::de::DeserializeOwned>(body: &[u8], shape: &str) -> Result<T, String> {
    serde_json::from_slice(body)
        .map_err(|e| format!("400 Bad Request: expected JSON {shape} ({e})"))
}

fn json_reply(body: serde_json::Value) -> Reply {
    (
        [(CONTENT_TYPE, "application/json")],
        body.to_string() + "\n",
    )
        .into_response()
}

/// A one-line plain-text reply.
fn text(status: StatusCode, line: &str) -> Reply {
    let mut resp = Response::new(Body::from(format!("{line}\n")));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    resp
}

/// The JSON of `GET /status`.
pub fn status(snapshot: &Snapshot) -> serde_json::Value {
    let upstreams: serde_json::Map<String, serde_json::Value> = snapshot
        .upstreams
        .iter()
        .map(|u| {
            let backends: Vec<_> = u
                .backends
                .iter()
                .zip(&u.config.backends)
                .map(|(b, config)| {
                    let (requests, errors) = b.requests.totals();
                    let mut json = json!({
                        "address": b.address,
                        "requests": requests,
                        "errors": errors,
                        "weight": b.weight,
                        "healthy": b.state.is_healthy(),
                        "draining": b.state.is_draining(),
                        "ejected": b.state.ejected_for().is_some(),
                        "active_requests": b.state.active_requests(),
                        "max_connections": b.state.limit(),
                        "slow_start": u.config.slow_start.is_some_and(|w| b.state.ramp(w) < 1.0),
                        "leaving": config.leaving,
                    });
                    // Where it came from: a name it resolved from, or the admin API.
                    if let Some(from) = &config.from {
                        json["from"] = json!(from);
                    }
                    json
                })
                .collect();
            (
                u.config.name.clone(),
                json!({
                    "balance": u.config.balance.name(),
                    "backends": backends,
                    "queue_depth": u.load.waiting(),
                }),
            )
        })
        .collect();
    let listeners: Vec<_> = snapshot
        .listeners
        .iter()
        .map(|l| json!({ "name": l.config.name, "bind": l.config.bind.to_string() }))
        .collect();
    let caches: serde_json::Map<String, serde_json::Value> = snapshot
        .caches
        .iter()
        .map(|c| {
            let (hit_ratio, last_minute) = c.stats.hit_ratios();
            (
                c.config.name.clone(),
                json!({
                    "entries": c.store.entries(),
                    "bytes": c.store.bytes(),
                    "hit_ratio": hit_ratio,
                    "hit_ratio_last_minute": last_minute,
                }),
            )
        })
        .collect();
    json!({
        "pid": std::process::id(),
        "version": env!("CARGO_PKG_VERSION"),
        "upstreams": upstreams,
        "listeners": listeners,
        "caches": caches,
    })
}

/// Sets the gauges that mirror backend state, then renders every metric.
fn metrics(snapshot: &Snapshot) -> String {
    for u in &snapshot.upstreams {
        for b in &u.backends {
            let labels = [
                ("upstream", u.config.name.clone()),
                ("backend", b.address.clone()),
            ];
            metrics::gauge!(m::BACKEND_HEALTHY, &labels)
                .set(f64::from(u8::from(b.state.is_healthy())));
            metrics::gauge!(m::BACKEND_ACTIVE, &labels).set(b.state.active_requests() as f64);
        }
        let labels = [("upstream", u.config.name.clone())];
        metrics::gauge!(m::QUEUE_DEPTH, &labels).set(u.load.waiting() as f64);
    }
    for c in &snapshot.caches {
        let labels = [("cache", c.config.name.clone())];
        metrics::gauge!(m::CACHE_BYTES, &labels).set(c.store.bytes() as f64);
        metrics::gauge!(m::CACHE_ENTRIES, &labels).set(c.store.entries() as f64);
    }
    m::render(|upstream, backend| {
        snapshot
            .upstream(upstream)
            .is_some_and(|u| u.backends.iter().any(|b| b.address == backend))
    })
}
