//! The admin listener: `GET /status` (JSON) and `GET /metrics` (Prometheus text),
//! drains and cache purges; behind a bearer token when `admin.token` is set.
//!
//! It runs on the control thread (with health checks), so a busy request path
//! never delays a scrape, and a slow scraper never takes a worker's time.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::header::{HeaderValue, CONTENT_TYPE};
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use serde_json::json;
use subtle::ConstantTimeEq;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::cache;
use crate::metrics as m;
use crate::state::{Snapshot, State};

/// Serves the admin endpoints until `shutdown`.
pub async fn serve(socket: std::net::TcpListener, state: Arc<State>, shutdown: CancellationToken) {
    let _ = socket.set_nonblocking(true);
    let listener = match TcpListener::from_std(socket) {
        Ok(l) => l,
        Err(e) => return tracing::error!("cannot use the admin socket: {e}"),
    };
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
        let state = state.clone();
        tokio::spawn(async move {
            let service = service_fn(move |req: Request<Incoming>| {
                let state = state.clone();
                async move {
                    if !authorized(&state, &req) {
                        return Ok(unauthorized());
                    }
                    let resp = match req.uri().path().strip_prefix("/caches/") {
                        Some(rest) => {
                            let rest = rest.to_string();
                            purge(&state, &rest, req).await
                        }
                        None => respond(&state, &req),
                    };
                    Ok::<_, std::convert::Infallible>(resp)
                }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(Duration::from_secs(10))
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

/// With `admin.token` set, every request but `GET /metrics` (which
/// Prometheus scrapes, and which changes nothing) and the status page's own
/// HTML carries the token as a bearer token, compared in constant time.
fn authorized<B>(state: &State, req: &Request<B>) -> bool {
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

fn unauthorized() -> Response<Full<Bytes>> {
    let mut resp = text(
        StatusCode::UNAUTHORIZED,
        "401 Unauthorized: this admin endpoint needs Authorization: Bearer TOKEN (admin.token)\n"
            .into(),
    );
    resp.headers_mut().insert(
        http::header::WWW_AUTHENTICATE,
        HeaderValue::from_static("Bearer"),
    );
    resp
}

fn respond(state: &State, req: &Request<Incoming>) -> Response<Full<Bytes>> {
    let path = req.uri().path();
    let method = req.method();
    if let Some(rest) = path.strip_prefix("/upstreams/") {
        if method != Method::POST {
            return text(
                StatusCode::METHOD_NOT_ALLOWED,
                "405 Method Not Allowed: use POST\n".into(),
            );
        }
        return drain(state, rest);
    }
    if path == "/" && matches!(*method, Method::GET | Method::HEAD) {
        let mut resp = Response::new(Full::new(Bytes::from_static(STATUS_PAGE.as_bytes())));
        resp.headers_mut().insert(
            CONTENT_TYPE,
            HeaderValue::from_static("text/html; charset=utf-8"),
        );
        return resp;
    }
    if !matches!(path, "/status" | "/metrics" | "/explain") {
        return text(
            StatusCode::NOT_FOUND,
            "404 Not Found: try /status, /metrics, /explain?url=URL or POST /upstreams/NAME/backends/ADDRESS/drain\n"
                .into(),
        );
    }
    if method != Method::GET && method != Method::HEAD {
        return text(
            StatusCode::METHOD_NOT_ALLOWED,
            "405 Method Not Allowed: use GET\n".into(),
        );
    }
    let snapshot = state.load_full();
    if path == "/explain" {
        return match crate::explain::explain(&snapshot, req.uri().query().unwrap_or("")) {
            Ok(answer) => json_reply(answer),
            Err(why) => text(StatusCode::BAD_REQUEST, format!("400 Bad Request: {why}\n")),
        };
    }
    let (body, content_type) = if path == "/status" {
        let mut json = status(&snapshot);
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
        (json.to_string() + "\n", "application/json")
    } else {
        (metrics(&snapshot), "text/plain; version=0.0.4")
    };
    let mut resp = Response::new(Full::new(Bytes::from(body)));
    resp.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    resp
}

/// `GET /`: the live status page, one file with its style and script (no
/// external asset), which polls `/status`.
const STATUS_PAGE: &str = include_str!("status_page.html");

/// The largest purge request read.
const PURGE_BODY_LIMIT: usize = 1 << 20;

/// `POST /caches/{cache}/purge` with `{"urls": [...]}`, `{"tags": [...]}` or
/// `{"all": true}`: drops those entries from this process's memory tier, and
/// answers `{"dropped": N}`.
async fn purge(state: &State, rest: &str, req: Request<Incoming>) -> Response<Full<Bytes>> {
    let Some(name) = rest.strip_suffix("/purge").filter(|n| !n.contains('/')) else {
        return text(
            StatusCode::NOT_FOUND,
            "404 Not Found: POST /caches/NAME/purge\n".into(),
        );
    };
    if req.method() != Method::POST {
        return text(
            StatusCode::METHOD_NOT_ALLOWED,
            "405 Method Not Allowed: use POST\n".into(),
        );
    }
    let snapshot = state.load_full();
    let Some(cache) = snapshot.cache(name) else {
        return text(
            StatusCode::NOT_FOUND,
            format!("404 Not Found: no cache named {name}\n"),
        );
    };
    let body = match http_body_util::Limited::new(req.into_body(), PURGE_BODY_LIMIT)
        .collect()
        .await
    {
        Ok(b) => b.to_bytes(),
        Err(_) => {
            return text(
                StatusCode::PAYLOAD_TOO_LARGE,
                "413 Payload Too Large: a purge request is at most 1 MiB\n".into(),
            )
        }
    };
    let purge = match cache::Purge::from_json(&body) {
        Ok(p) => p,
        Err(why) => return text(StatusCode::BAD_REQUEST, format!("400 Bad Request: {why}\n")),
    };
    let dropped = cache.purge_everywhere(purge, cache::Source::Admin).await;
    json_reply(json!({ "dropped": dropped }))
}

fn json_reply(body: serde_json::Value) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(Bytes::from(body.to_string() + "\n")));
    resp.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    resp
}

/// `POST /upstreams/{upstream}/backends/{address}/drain` (or `/undrain`): a
/// draining backend gets no new requests or sticky pins and finishes the ones
/// in flight; its `active_requests` in the reply and in /status tells a deploy
/// script when it is idle. The flag is kept across reloads that keep the backend.
fn drain(state: &State, rest: &str) -> Response<Full<Bytes>> {
    let parts: Vec<&str> = rest.split('/').collect();
    let [upstream, "backends", address, action] = parts[..] else {
        return text(
            StatusCode::NOT_FOUND,
            "404 Not Found: POST /upstreams/NAME/backends/ADDRESS/drain or /undrain\n".into(),
        );
    };
    let draining = match action {
        "drain" => true,
        "undrain" => false,
        _ => {
            return text(
                StatusCode::NOT_FOUND,
                "404 Not Found: the action is drain or undrain\n".into(),
            )
        }
    };
    let snapshot = state.load_full();
    let Some(backend) = snapshot
        .upstream(upstream)
        .and_then(|u| u.backends.iter().find(|b| b.address == address))
    else {
        return text(
            StatusCode::NOT_FOUND,
            format!("404 Not Found: no backend {address} in upstream {upstream}\n"),
        );
    };
    backend.state.set_draining(draining);
    if let Some(u) = snapshot.upstream(upstream) {
        // Requests waiting for room may now use it.
        u.load.dispatch();
    }
    tracing::info!(
        upstream,
        backend = address,
        "{}",
        if draining {
            "draining"
        } else {
            "no longer draining"
        }
    );
    let body = json!({
        "upstream": upstream,
        "address": address,
        "draining": draining,
        "active_requests": backend.state.active_requests(),
    });
    let mut resp = Response::new(Full::new(Bytes::from(body.to_string() + "\n")));
    resp.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    resp
}

fn text(status: StatusCode, body: String) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(Bytes::from(body)));
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
                .map(|b| {
                    let (requests, errors) = b.requests.totals();
                    json!({
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
                    })
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
    m::handle().render()
}
