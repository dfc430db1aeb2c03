//! The service every client connection calls: the request path's way in.
//!
//! For each request it takes the current snapshot, makes the exchange's
//! record, answers what needs no route (an HTTP/1.1 request without Host, a
//! head over the listener's limit, the listener's HTTPS redirect), routes the
//! request, and hands it to its route's stack: straight to the proxy on a
//! route without layers, through the layers on one with them.
//!
//! ```text
//! client connection (http1::serve, or hyper's HTTP/2)
//!   └─ Entry           snapshot, exchange record, Host and size checks, redirect, routing
//!       └─ route stack  the route's layers, outermost first (none by default)
//!           └─ Proxy    backend choice, headers, retries, tunnel
//!               └─ Pool  backend connections: HTTP/1.1 (pool/h1.rs) or HTTP/2
//! ```

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::header::{HeaderValue, HOST};
use http::{Request, Response, StatusCode, Version};
use hyper::body::Incoming;
use tower::ServiceExt;

use crate::access_log::RequestLine;
use crate::failure::ProxyError;
use crate::http1::serve::RequestBody;
use crate::pool::ClientBody;
use crate::proxy::{self, ConnContext, Exchange, ProxyBody, RouteRequest};
use crate::stack::Stack;
use crate::state::{ListenerRoutes, Route, State};

/// One client connection's way into the request path. A request does not
/// clone it: the state is only read in the call, and a future that outlives
/// the call takes the connection's context alone (every worker shares the
/// state's `Arc`, and a count changed by every request would be a cache line
/// that every core writes). It holds no state of its own, and it is kept
/// small: an idle connection holds it.
#[derive(Clone, Debug)]
pub struct Entry {
    state: Arc<State>,
    cx: Arc<ConnContext>,
}

/// The response to every request: always one, since failures are replies.
pub type EntryFuture =
    Pin<Box<dyn Future<Output = Result<Response<ProxyBody>, Infallible>> + Send>>;

impl Entry {
    pub fn new(state: Arc<State>, cx: Arc<ConnContext>) -> Self {
        Entry { state, cx }
    }

    /// The exchange's record for a request refused before its head could be
    /// read (400, 431, 505): counted and logged as a reply made without a
    /// route, as NGINX logs its 400s, so that malformed traffic shows in the
    /// metrics.
    pub fn refused(&self, status: StatusCode, bytes: u64) {
        let log = self
            .cx
            .access_log
            .as_ref()
            .map(|l| (l.clone(), Box::new(RequestLine::unread(self.cx.peer.ip()))));
        let mut ex = Exchange::new(self.cx.activity.begin(), log);
        ex.status = status.as_u16();
        ex.bytes = bytes;
    }

    /// Serves one request. What needs no waiting is done in the call itself:
    /// the exchange's record, routing, the replies made without a route and a
    /// cache's fresh hit, which is answered here in a future that holds only
    /// the reply. The proxy's work runs in one future (boxed, as
    /// `tower::Service` needs a type it can name), not in futures nested
    /// inside it: each level would copy the request into the next.
    fn serve(&self, req: Request<ClientBody>) -> EntryFuture {
        let Entry { state, cx } = self;
        let log = cx.access_log.as_ref().map(|l| {
            (
                l.clone(),
                Box::new(RequestLine::capture(&req, cx.client(req.headers()))),
            )
        });
        let mut ex = Exchange::new(cx.activity.begin(), log);
        let snapshot = state.load();
        // None: the listener was removed by a reload; its connections drain with 404s.
        let listener = snapshot.listener(cx.listener);
        if let Some(location) = listener.and_then(|l| https_redirect(l, &req)) {
            let mut resp = proxy::local_reply(
                StatusCode::MOVED_PERMANENTLY,
                Bytes::from_static(b"301 Moved Permanently: use https\n"),
                ex,
            );
            resp.headers_mut().insert(http::header::LOCATION, location);
            return answered(resp);
        }
        let (route, host) = match route(listener, &req) {
            Ok(routed) => routed,
            Err(e) => return answered(proxy::fail(cx, e, ex)),
        };
        ex.upstream = Some(route.upstream.clone());
        match &route.stack {
            Stack::Proxy(proxy) => {
                // The route's proxy is its upstream's `Arc`: the future holds
                // that, not the snapshot.
                let (proxy, cx) = (proxy.clone(), cx.clone());
                Box::pin(async move {
                    let forwarded = proxy.forward(&cx, req, host, &mut ex).await;
                    Ok(proxy::respond(&cx, forwarded, ex))
                })
            }
            Stack::Cached(cached) => {
                let req = RouteRequest {
                    http: req,
                    conn: cx.clone(),
                    exchange: ex,
                };
                match cached.fresh_hit(req) {
                    Ok(resp) => answered(resp),
                    Err(req) => {
                        let cached = cached.clone();
                        Box::pin(async move { Ok(cached.serve(req).await) })
                    }
                }
            }
            Stack::Layered(service) => {
                let req = RouteRequest {
                    http: req,
                    conn: cx.clone(),
                    exchange: ex,
                };
                let service = service.clone();
                Box::pin(async move {
                    let Ok(resp) = service.oneshot(req).await;
                    Ok(resp)
                })
            }
        }
    }
}

/// A reply made in the call: its future holds it and nothing else.
fn answered(resp: Response<ProxyBody>) -> EntryFuture {
    Box::pin(std::future::ready(Ok(resp)))
}

/// The route for `req` on `listener`, after the checks every request must
/// pass first, and the request's Host field (looked up once for routing and
/// for the proxy).
fn route<'a, B>(
    listener: Option<&'a ListenerRoutes>,
    req: &Request<B>,
) -> Result<(&'a Route, Option<HeaderValue>), ProxyError> {
    let host_field = req.headers().get(HOST);
    if req.version() == Version::HTTP_11 && host_field.is_none() {
        return Err(ProxyError::BadRequest(
            "an HTTP/1.1 request needs a Host header",
        ));
    }
    let listener = listener.ok_or(ProxyError::NoRoute)?;
    if proxy::head_size(req) > listener.config.max_header_bytes {
        return Err(ProxyError::HeadTooLarge);
    }
    let host = match host_field {
        Some(h) => h.to_str().ok(),
        None => req.uri().authority().map(|a| a.as_str()),
    };
    let index = listener
        .router
        .route(host, req.uri().path(), req.method())
        .ok_or(ProxyError::NoRoute)?;
    Ok((&listener.routes[index], host_field.cloned()))
}

/// On a `redirect_https` listener: `https://HOST/PATH?QUERY`, the client's host
/// without its port.
fn https_redirect<B>(listener: &ListenerRoutes, req: &Request<B>) -> Option<HeaderValue> {
    if !listener.config.redirect_https {
        return None;
    }
    let host = request_host(req)?;
    let host = match host.rsplit_once(':') {
        Some((name, port)) if port.bytes().all(|b| b.is_ascii_digit()) => name,
        _ => host,
    };
    let target = req.uri().path_and_query().map_or("/", |p| p.as_str());
    HeaderValue::from_str(&format!("https://{host}{target}")).ok()
}

/// The host the client asked for: Host, or :authority for HTTP/2.
fn request_host<B>(req: &Request<B>) -> Option<&str> {
    match req.headers().get(HOST) {
        Some(h) => h.to_str().ok(),
        None => req.uri().authority().map(|a| a.as_str()),
    }
}

/// A request body as a client connection reads it: HTTP/1's (`http1::serve`)
/// or an HTTP/2 stream's (hyper).
pub trait ClientBodyKind {
    fn into_client_body(self) -> ClientBody;
}

impl ClientBodyKind for RequestBody {
    fn into_client_body(self) -> ClientBody {
        ClientBody::Left(self)
    }
}

impl ClientBodyKind for Incoming {
    fn into_client_body(self) -> ClientBody {
        ClientBody::Right(self)
    }
}

/// HTTP/1 requests as `http1::serve` reads them, and HTTP/2 streams as hyper does.
impl<B: ClientBodyKind> tower::Service<Request<B>> for Entry {
    type Response = Response<ProxyBody>;
    type Error = Infallible;
    type Future = EntryFuture;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request<B>) -> EntryFuture {
        self.serve(req.map(B::into_client_body))
    }
}
