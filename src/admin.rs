//! The admin listener: `GET /status` (JSON) and `GET /metrics` (Prometheus text).
//!
//! It runs on the control thread (with health checks), so a busy request path
//! never delays a scrape, and a slow scraper never takes a worker's time.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::header::{HeaderValue, CONTENT_TYPE};
use http::{Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use serde_json::json;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

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
            let service = service_fn(move |req| {
                let state = state.clone();
                async move { Ok::<_, std::convert::Infallible>(respond(&state, &req)) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(Duration::from_secs(10))
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

fn respond(state: &State, req: &Request<Incoming>) -> Response<Full<Bytes>> {
    let path = req.uri().path();
    if !matches!(path, "/status" | "/metrics") {
        return text(
            StatusCode::NOT_FOUND,
            "404 Not Found: try /status or /metrics\n".into(),
        );
    }
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return text(
            StatusCode::METHOD_NOT_ALLOWED,
            "405 Method Not Allowed: use GET\n".into(),
        );
    }
    let snapshot = state.load_full();
    let (body, content_type) = if path == "/status" {
        (status(&snapshot).to_string() + "\n", "application/json")
    } else {
        (metrics(&snapshot), "text/plain; version=0.0.4")
    };
    let mut resp = Response::new(Full::new(Bytes::from(body)));
    resp.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
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
                    json!({
                        "address": b.address,
                        "weight": b.weight,
                        "healthy": b.state.is_healthy(),
                        "active_requests": b.state.active_requests(),
                    })
                })
                .collect();
            (
                u.name.clone(),
                json!({ "balance": u.balance.name(), "backends": backends }),
            )
        })
        .collect();
    let listeners: Vec<_> = snapshot
        .listeners
        .iter()
        .map(|l| json!({ "name": l.config.name, "bind": l.config.bind.to_string() }))
        .collect();
    json!({ "upstreams": upstreams, "listeners": listeners })
}

/// Sets the gauges that mirror backend state, then renders every metric.
fn metrics(snapshot: &Snapshot) -> String {
    for u in &snapshot.upstreams {
        for b in &u.backends {
            let labels = [("upstream", u.name.clone()), ("backend", b.address.clone())];
            metrics::gauge!(m::BACKEND_HEALTHY, &labels)
                .set(f64::from(u8::from(b.state.is_healthy())));
            metrics::gauge!(m::BACKEND_ACTIVE, &labels).set(b.state.active_requests() as f64);
        }
    }
    m::handle().render()
}
