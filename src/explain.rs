//! `GET /explain`: which backend a request would go to now, and why.
//!
//! The request is made from the query (`url`, `method`, `header=NAME:VALUE`,
//! `cookie=NAME=VALUE`, `client_ip`) and put through the live snapshot's own
//! code: the listener's router, the upstream's hash key and sticky cookie,
//! and its selection (`Upstream::explain`), which looks without changing
//! anything: no rotation moves, nothing is counted in flight.

use std::net::{IpAddr, Ipv4Addr};

use http::header::{HeaderName, HeaderValue, COOKIE, HOST};
use http::{Method, Request, Uri};
use serde_json::{json, Value};

use crate::config::{HashKey, HostMatch, RouteConfig};
use crate::state::Snapshot;
use crate::upstream::Upstream;

/// The answer for `query` (the request's query string): JSON, or a one-line reason for a 400.
pub fn explain(snapshot: &Snapshot, query: &str) -> Result<Value, String> {
    let asked = Asked::parse(query)?;
    let req = &asked.request;
    // The listener the URL's port names, else the first.
    let port = req.uri().port_u16();
    let listener = snapshot
        .listeners
        .iter()
        .find(|l| Some(l.config.bind.port()) == port)
        .or_else(|| snapshot.listeners.first())
        .ok_or("no listener")?;
    let host = req.headers().get(HOST).and_then(|h| h.to_str().ok());
    let Some(index) = listener.router.route(host, req.uri().path(), req.method()) else {
        return Ok(json!({
            "listener": listener.config.name,
            "route": null,
            "upstream": null,
            "backend": null,
            "skipped": [],
            "why": "no route matches: the request would get 404",
        }));
    };
    let route = &listener.routes[index];
    let upstream = &route.upstream;
    let config = &upstream.config;
    let key = match config.balance {
        crate::config::Balance::ConsistentHash => {
            crate::hash_key::key_hash(&config.hash_key, req, asked.client)
        }
        _ => None,
    };
    let shown_key = key.map(|_| {
        let value = match config.hash_key {
            HashKey::ClientIp => Some(asked.client.to_string()),
            _ => crate::hash_key::with_key(&config.hash_key, req, asked.client, |v| {
                String::from_utf8_lossy(v).into_owned()
            }),
        };
        json!({ "source": key_source(&config.hash_key), "value": value })
    });
    let pinned = upstream
        .sticky
        .as_ref()
        .and_then(|s| s.peek_pinned(&config.name, req));
    let explained = upstream.explain(key, pinned);
    let address = |i: usize| upstream.backends[i].address.clone();
    let skipped: Vec<Value> = explained
        .skipped
        .iter()
        .map(|&(i, reason)| json!({ "address": address(i), "reason": reason }))
        .collect();
    let why = why(upstream, &explained, shown_key.as_ref(), pinned);
    Ok(json!({
        "listener": listener.config.name,
        "route": { "index": index, "match": route_match(&listener.config.routes[index]) },
        "upstream": config.name,
        "balance": config.balance.name(),
        "key": shown_key,
        "backend": explained.backend.map(address),
        "queued": explained.waits,
        "skipped": skipped,
        "why": why,
    }))
}

/// The request `/explain` was asked about.
struct Asked {
    request: Request<()>,
    client: IpAddr,
}

impl Asked {
    fn parse(query: &str) -> Result<Asked, String> {
        let mut url = None;
        let mut method = Method::GET;
        let mut client = IpAddr::V4(Ipv4Addr::LOCALHOST);
        let mut headers = Vec::new();
        let mut cookies = Vec::new();
        for (name, value) in form_urlencoded::parse(query.as_bytes()) {
            match &*name {
                "url" => url = Some(value.into_owned()),
                "method" => {
                    method = Method::from_bytes(value.as_bytes())
                        .map_err(|_| format!("`{value}` is not a method"))?
                }
                "client_ip" => {
                    client = value
                        .parse()
                        .map_err(|_| format!("`{value}` is not an IP address"))?
                }
                "header" => {
                    let (n, v) = value
                        .split_once(':')
                        .ok_or("a header is given as header=NAME:VALUE")?;
                    let n = HeaderName::from_bytes(n.trim().as_bytes())
                        .map_err(|_| format!("`{n}` is not a header name"))?;
                    let v = HeaderValue::from_str(v.trim())
                        .map_err(|_| format!("`{v}` is not a header value"))?;
                    headers.push((n, v));
                }
                "cookie" => cookies.push(value.into_owned()),
                other => return Err(format!("unknown parameter `{other}`")),
            }
        }
        let url = url.ok_or("give the request's url=")?;
        let uri: Uri = url.parse().map_err(|_| format!("`{url}` is not a URL"))?;
        let authority = uri
            .authority()
            .ok_or("give an absolute URL (http://HOST/PATH)")?;
        let mut request = Request::builder().method(method).uri(uri.clone());
        if let Ok(host) = HeaderValue::from_str(authority.as_str()) {
            request = request.header(HOST, host);
        }
        let mut request = request.body(()).map_err(|e| e.to_string())?;
        for (n, v) in headers {
            request.headers_mut().append(n, v);
        }
        if !cookies.is_empty() {
            let joined = HeaderValue::from_str(&cookies.join("; "))
                .map_err(|_| "a cookie holds bytes a header cannot")?;
            request.headers_mut().append(COOKIE, joined);
        }
        Ok(Asked { request, client })
    }
}

fn key_source(key: &HashKey) -> String {
    match key {
        HashKey::ClientIp => "client_ip".into(),
        HashKey::Path => "path".into(),
        HashKey::Header(name) => format!("header:{name}"),
        HashKey::Cookie(name) => format!("cookie:{name}"),
        HashKey::Query(name) => format!("query:{name}"),
    }
}

fn route_match(route: &RouteConfig) -> Value {
    let host = route.host.as_ref().map(|h| match h {
        HostMatch::Exact(name) => name.clone(),
        HostMatch::Suffix(suffix) => format!("*{suffix}"),
    });
    let methods: Vec<&str> = route.methods.iter().map(Method::as_str).collect();
    json!({ "host": host, "path_prefix": route.path_prefix, "methods": methods })
}

/// The one-line account of the choice.
fn why(
    upstream: &Upstream,
    e: &crate::upstream::Explained,
    key: Option<&Value>,
    pinned: Option<usize>,
) -> String {
    let address = |i: usize| upstream.backends[i].address.as_str();
    let passed = |i: usize| {
        e.skipped
            .iter()
            .find(|(j, _)| *j == i)
            .map_or("unusable", |(_, r)| r)
    };
    let mut why = match (e.backend, key) {
        (None, _) if e.waits => {
            "every usable backend is at its max_connections: it would wait in the queue".into()
        }
        (None, _) => "no backend is usable: it would get 503".into(),
        (Some(b), _) if e.pinned => format!("its sticky cookie pins it to {}", address(b)),
        (Some(b), Some(key)) => {
            let source = key["source"].as_str().unwrap_or_default();
            let shown = format!("{source} = {}", key["value"]);
            match e.home {
                Some(home) if home != b => format!(
                    "consistent_hash on {shown}: the key's backend {} is {}, so the next along the ring, {}",
                    address(home),
                    passed(home),
                    address(b)
                ),
                _ => format!("consistent_hash on {shown}: the key's backend, {}", address(b)),
            }
        }
        (Some(b), None) => match upstream.config.balance {
            crate::config::Balance::LeastConnections => format!(
                "least_connections: {} has the fewest requests in flight per unit of weight ({})",
                address(b),
                upstream.backends[b].state.active_requests()
            ),
            _ => format!("round_robin: {} is next in the rotation", address(b)),
        },
    };
    if let Some(p) = pinned.filter(|_| !e.pinned) {
        why += &format!(
            " (its sticky cookie's backend {} is {})",
            address(p),
            passed(p)
        );
    }
    if e.waits && e.backend.is_some() {
        why += ", which is at its max_connections: it would wait in the queue for it";
    }
    why
}
