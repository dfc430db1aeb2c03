//! The innermost service of the request path: a request routed to an upstream
//! is sent to one of its backends (picked by its balance, sticky cookie and
//! health), with its headers rewritten, retried where that is safe, and its
//! response streamed back; a 101 becomes a tunnel.
//!
//! Routing and the checks before it are the entry's (`entry.rs`); the layers
//! a route carries run between the two (`stack.rs`).

pub mod body;
pub mod headers;

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::header::{HeaderValue, CONTENT_TYPE, HOST};
use http::uri::Scheme;
use http::{Request, Response, StatusCode, Uri, Version};
use http_body_util::{Either, Empty};
use tokio_util::task::TaskTracker;

use crate::access_log::AccessLogger;
use crate::client_io::Activity;
use crate::config::Balance;
use crate::failure::{Again, Attempt, ProxyError};
use crate::hash_key;
use crate::health;
use crate::http1::serve::PendingUpgrade;
use crate::pool::{h1, BackendBody, ClientBody, OutBody};
use crate::queue::{Admission, InFlight, Want};
use crate::upstream::Upstream;
pub use body::{Exchange, ProxyBody};

/// What the proxy knows of the client connection a request came on.
#[derive(Debug)]
pub struct ConnContext {
    /// The listener's bind address as configured: its key in the snapshot.
    pub listener: SocketAddr,
    pub peer: SocketAddr,
    /// The peer's IP, formatted once per connection for X-Forwarded-For.
    pub client_ip: HeaderValue,
    pub tls: bool,
    pub activity: Arc<Activity>,
    /// Upgraded connections (WebSocket) run here so that shutdown can wait for them.
    pub tunnels: TaskTracker,
    pub access_log: Option<AccessLogger>,
    /// The listener's `trusted_proxies`, when the peer is one of them.
    pub trusted_proxies: Option<Arc<[ipnet::IpNet]>>,
}

impl ConnContext {
    /// The client's address: the peer's, or the one a trusted proxy forwarded.
    #[inline]
    pub fn client(&self, headers: &http::HeaderMap) -> std::net::IpAddr {
        let peer = self.peer.ip();
        match &self.trusted_proxies {
            None => peer,
            Some(trusted) => headers::forwarded_client(headers, trusted).unwrap_or(peer),
        }
    }
}

/// A routed request on its way through its route's layers to the proxy: the
/// client's request, the connection it came on, and the record of the
/// exchange, which a layer that answers itself sends with its reply
/// (`ProxyBody::local`).
#[derive(Debug)]
pub struct RouteRequest {
    pub http: Request<ClientBody>,
    pub conn: Arc<ConnContext>,
    pub exchange: Exchange,
}

/// Forwards requests to the backends of one upstream. Cloning it is an `Arc`'s.
#[derive(Clone, Debug)]
pub struct Proxy {
    upstream: Arc<Upstream>,
}

impl Proxy {
    pub fn new(upstream: Arc<Upstream>) -> Self {
        Proxy { upstream }
    }

    pub fn upstream(&self) -> &Arc<Upstream> {
        &self.upstream
    }

    /// Serves one request. Never fails: every failure becomes a reply with a
    /// status.
    ///
    /// Not an async fn: an async block keeps its captures in place, where an
    /// async fn would also keep a moved-from copy of the request, in a future
    /// made for every request.
    #[allow(clippy::manual_async_fn)]
    pub fn serve<'a>(
        &'a self,
        cx: &'a ConnContext,
        req: Request<ClientBody>,
        mut ex: Exchange,
    ) -> impl Future<Output = Response<ProxyBody>> + Send + 'a {
        async move {
            let host = req.headers().get(HOST).cloned();
            let forwarded = self.forward(cx, req, host, &mut ex).await;
            respond(cx, forwarded, ex)
        }
    }

    /// The request sent on, and the backend's response as it came. `host` is
    /// the request's Host field, which the caller has looked up already. A
    /// route without layers calls this straight from the entry, in the
    /// entry's own future, then `respond`.
    // Inlined so that the future it returns is made where it is awaited, not moved there.
    #[inline(always)]
    pub fn forward<'a>(
        &'a self,
        cx: &'a ConnContext,
        req: Request<ClientBody>,
        host: Option<HeaderValue>,
        ex: &'a mut Exchange,
    ) -> impl Future<Output = Result<Response<BackendBody>, ProxyError>> + Send + 'a {
        if ex.upstream.is_none() {
            ex.upstream = Some(self.upstream.clone());
        }
        forward(cx, &self.upstream, req, host, ex)
    }
}

/// The reply to the client: the backend's response with the exchange's
/// record riding on its body, or the failure's reply.
pub fn respond(
    cx: &ConnContext,
    forwarded: Result<Response<BackendBody>, ProxyError>,
    mut ex: Exchange,
) -> Response<ProxyBody> {
    match forwarded {
        Ok(resp) => {
            ex.status = resp.status().as_u16();
            resp.map(|body| ProxyBody::backend(body, ex))
        }
        Err(e) => fail(cx, e, ex),
    }
}

/// The proxy at the bottom of a route's layers.
impl tower::Service<RouteRequest> for Proxy {
    type Response = Response<ProxyBody>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Response<ProxyBody>, Infallible>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: RouteRequest) -> Self::Future {
        let proxy = self.clone();
        Box::pin(async move {
            let RouteRequest {
                http,
                conn,
                exchange,
            } = req;
            Ok(proxy.serve(&conn, http, exchange).await)
        })
    }
}

/// The reply to a request that failed, logged by whose doing it was: the
/// one place a failure becomes a status and body.
pub fn fail(cx: &ConnContext, e: ProxyError, ex: Exchange) -> Response<ProxyBody> {
    // A failed attempt was logged, with its cause, when it failed; a request
    // the queue turned away is counted in its metrics (a line each would
    // flood the log just when the fleet is overloaded).
    if e.is_clients() || e.is_attempts() || e.is_queue() {
        tracing::debug!(peer = %cx.peer, "{e}");
    } else {
        let backend = ex
            .upstream
            .as_ref()
            .zip(ex.backend)
            .map(|(u, b)| &u.backends[b].address);
        tracing::warn!(
            upstream = ex.upstream.as_ref().map(|u| u.config.name.as_str()),
            backend = backend.map(String::as_str),
            "{e}"
        );
    }
    let mut resp = local_reply(e.status(), Bytes::from(e.body()), ex);
    if e.is_queue() {
        resp.headers_mut()
            .insert(http::header::RETRY_AFTER, HeaderValue::from_static("1"));
    }
    resp.extensions_mut().insert(Failed(e));
    resp
}

/// Marks a reply as the proxy's own for a failure (no backend answered), for
/// the layers above it: a cache serves stale content in its place.
#[derive(Clone, Copy, Debug)]
pub struct Failed(pub ProxyError);

/// A plain-text reply bascule makes itself, accounted for with `ex`.
pub fn local_reply(status: StatusCode, body: Bytes, mut ex: Exchange) -> Response<ProxyBody> {
    ex.status = status.as_u16();
    let mut resp = Response::new(ProxyBody::local(body, Some(ex)));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    resp
}

/// Not an async fn, for the reason `Proxy::serve` gives.
#[allow(clippy::manual_async_fn)]
fn forward<'a>(
    cx: &'a ConnContext,
    upstream: &'a Arc<Upstream>,
    mut req: Request<ClientBody>,
    host_field: Option<HeaderValue>,
    ex: &'a mut Exchange,
) -> impl std::future::Future<Output = Result<Response<BackendBody>, ProxyError>> + Send + 'a {
    async move {
        let key = match upstream.config.balance {
            Balance::ConsistentHash => {
                hash_key::key_hash(&upstream.config.hash_key, &req, cx.client(req.headers()))
            }
            _ => None,
        };
        let pinned = upstream
            .sticky
            .as_ref()
            .and_then(|sticky| sticky.pinned(&upstream.config.name, &req));
        // An upgrade (WebSocket) is an HTTP/1.1 affair; HTTP/2 has no Upgrade header.
        let upgrade = headers::upgrade_protocol(req.headers());
        let client_upgrade = upgrade
            .as_ref()
            .and_then(|_| req.extensions_mut().remove::<PendingUpgrade>());

        let (mut parts, body) = req.into_parts();
        let host_field = host_field.or_else(|| {
            // HTTP/2 carries the host in :authority; an HTTP/1.1 backend needs it as Host.
            let value = HeaderValue::from_str(parts.uri.authority()?.as_str()).ok()?;
            parts.headers.insert(HOST, value.clone());
            Some(value)
        });
        headers::strip_hop_by_hop(&mut parts.headers);
        // An HTTP/1.0 request may come without a host; an HTTP/1.1 one may not go without.
        let hostless = host_field.is_none();
        headers::add_forwarded(&mut parts.headers, &cx.client_ip, cx.tls, host_field);
        if let Some(protocol) = &upgrade {
            headers::set_upgrade(&mut parts.headers, protocol.clone());
        }
        if parts.uri.path_and_query().is_none() {
            parts.uri = Uri::from_static("/");
        }
        parts.version = Version::HTTP_11;
        let mut out = Request::from_parts(parts, Either::Left(body));
        let mut resp = send_with_retries(cx, upstream, key, pinned, hostless, &mut out, ex).await?;
        if let (Some(sticky), Some(chosen)) = (&upstream.sticky, ex.backend) {
            // A client pinned to the backend that served it needs no new cookie.
            if pinned != Some(chosen) {
                let cookie =
                    sticky.set_cookie(&upstream.config.name, chosen, sticky.ids[chosen], cx.tls);
                resp.headers_mut().append(http::header::SET_COOKIE, cookie);
            }
        }

        if resp.status() == StatusCode::SWITCHING_PROTOCOLS {
            let protocol = resp.headers().get(http::header::UPGRADE).cloned();
            let (mut parts, body) = resp.into_parts();
            // A switch nobody asked for cannot be carried to the client; only
            // HTTP/1.1 switches protocols (an HTTP/2 backend cannot send a 101).
            let ends = match (client_upgrade, protocol, body) {
                (Some(client), Some(protocol), Either::Left(body)) => body
                    .into_upgraded()
                    .map(|backend| (client, protocol, backend)),
                _ => None,
            };
            let Some((client_upgrade, protocol, backend)) = ends else {
                tracing::warn!(
                    upstream = %upstream.config.name,
                    "the backend switched protocols where the client cannot follow"
                );
                return Err(ProxyError::Broken);
            };
            headers::strip_hop_by_hop(&mut parts.headers);
            headers::set_upgrade(&mut parts.headers, protocol);
            let in_flight = ex.in_flight.take();
            cx.tunnels.spawn(tunnel(client_upgrade, backend, in_flight));
            return Ok(Response::from_parts(parts, Either::Left(h1::Body::empty())));
        }
        headers::strip_hop_by_hop(resp.headers_mut());
        Ok(resp)
    }
}

/// Sends `out` to a backend of `upstream`, and again to others when the first
/// could not take it and that is safe: the connection failed (nothing was sent),
/// or the backend broke off before answering a request that can be replayed
/// (idempotent, no body). Never the same backend twice, at most `retries` extra
/// attempts, and, for requests that reached a backend, only as the retry budget
/// allows. A timeout is not retried: the backend may still be working on it.
/// `hostless`: the request has no Host (HTTP/1.0 may omit it), so each attempt
/// names its backend's address.
async fn send_with_retries(
    cx: &ConnContext,
    upstream: &Arc<Upstream>,
    key: Option<u64>,
    pinned: Option<usize>,
    hostless: bool,
    out: &mut Request<OutBody>,
    ex: &mut Exchange,
) -> Result<Response<BackendBody>, ProxyError> {
    let replay = upstream.config.retries > 0;
    upstream.retry_budget.deposit();
    let mut tried = [0usize; MAX_ATTEMPTS];
    let mut last = ProxyError::NoBackend;
    // A request that reached no backend (the connection failed) is sent again
    // without spending the budget: it loaded nobody.
    let mut reached_backend = false;
    for attempt in 0..=(upstream.config.retries as usize).min(MAX_ATTEMPTS - 1) {
        if attempt > 0 {
            if reached_backend && !upstream.retry_budget.withdraw() {
                break;
            }
            upstream.retried.increment(1);
        }
        let pinned = pinned.filter(|_| attempt == 0);
        if pinned.is_some_and(|i| !upstream.is_usable(i)) {
            if let Some(sticky) = &upstream.sticky {
                sticky.count_unusable();
            }
        }
        let want = Want {
            key,
            pinned: pinned.filter(|&i| upstream.is_usable(i)),
            tried: &tried[..attempt],
        };
        let (chosen, in_flight) = match upstream.load.admit_now(&**upstream, &want) {
            Admission::Now(chosen, in_flight) => (chosen, in_flight),
            Admission::Nowhere => break,
            // Boxed: its state (a timer, a channel) would otherwise widen
            // every request's future, and be moved with it, waiting or not.
            Admission::Full => Box::pin(queue(cx, upstream, &want, ex)).await?,
        };
        tried[attempt] = chosen;
        let backend = &upstream.backends[chosen];
        ex.backend = Some(chosen);
        ex.attempts += 1;
        ex.in_flight = Some(in_flight);
        let mut target = std::mem::take(out.uri_mut()).into_parts();
        target.scheme = Some(match upstream.config.tls {
            Some(_) => Scheme::HTTPS,
            None => Scheme::HTTP,
        });
        target.authority = Some(backend.authority.clone());
        *out.uri_mut() = Uri::from_parts(target)
            .map_err(|_| ProxyError::BadRequest("unusable request target"))?;
        if hostless {
            // The backend's own address, as NGINX sends its upstream's.
            if let Ok(host) = HeaderValue::from_str(backend.authority.as_str()) {
                out.headers_mut().insert(HOST, host);
            }
        }

        let request = std::mem::replace(out, Request::new(Either::Right(Empty::new())));
        // The timer beside the exchange, not wrapped around it: a wrapper
        // would move the exchange's future, a kilobyte or two, twice over.
        let mut sent = std::pin::pin!(backend.pool.send(request, replay));
        let mut deadline = std::pin::pin!(tokio::time::sleep(upstream.config.response_timeout));
        let outcome = std::future::poll_fn(|task| match sent.as_mut().poll(task) {
            std::task::Poll::Ready(r) => std::task::Poll::Ready(Ok(r)),
            std::task::Poll::Pending => deadline.as_mut().poll(task).map(Err),
        })
        .await;
        let failure = match outcome {
            Ok(Ok(resp)) => {
                health::record_exchange(upstream, chosen, !resp.status().is_server_error());
                return Ok(resp);
            }
            Err(_) => {
                health::record_exchange(upstream, chosen, false);
                return Err(ProxyError::Timeout);
            }
            Ok(Err(failure)) => failure,
        };
        let error = failure.error;
        // An upload that broke off is the client's doing: no mark against the backend.
        if error.is_clients() {
            tracing::debug!(backend = %backend.address, "{error}: {}", failure.cause);
        } else {
            // Each failed attempt, retried or not, as NGINX logs each upstream it gave up on.
            tracing::warn!(
                upstream = %upstream.config.name,
                backend = %backend.address,
                "{error}: {}",
                failure.cause
            );
            health::record_exchange(upstream, chosen, false);
        }
        let Again::OtherBackend { budgeted } = failure.again(Attempt {
            replay,
            ..Attempt::default()
        }) else {
            return Err(error);
        };
        match failure.into_request() {
            Some(again) => *out = *again,
            None => return Err(error),
        }
        reached_backend = budgeted;
        last = error;
    }
    Err(last)
}

/// Waits in `upstream`'s queue for a backend `want` may use (every one it
/// may use is at its `max_connections`, or others wait already).
async fn queue(
    cx: &ConnContext,
    upstream: &Arc<Upstream>,
    want: &Want<'_>,
    ex: &mut Exchange,
) -> Result<(usize, InFlight), ProxyError> {
    let since = std::time::Instant::now();
    let queue = upstream.config.queue;
    // Logged so if the client leaves while it waits (NGINX's "client closed request").
    ex.status = CLIENT_LEFT;
    let waiting = cx.activity.mark_waiting().await;
    let admitted = upstream
        .load
        .wait(upstream.clone(), want, queue.size, queue.timeout)
        .await;
    drop(waiting);
    let waited = since.elapsed();
    let waited_us = u32::try_from(waited.as_micros()).unwrap_or(u32::MAX);
    ex.queued_us = ex.queued_us.saturating_add(waited_us);
    upstream.count_queued(waited, admitted.as_ref().map(|_| ()).map_err(|r| *r));
    Ok(admitted?)
}

/// The status logged for a request whose client left before its reply.
const CLIENT_LEFT: u16 = 499;

/// One first attempt and at most this many minus one retries.
const MAX_ATTEMPTS: usize = 11;

/// The head-size limit the connection enforces for a configured `max_header_bytes`.
///
/// The connection refuses a longer head itself, before any of it is parsed.
/// Its limit is set above ours, so that heads between the two reach `forward`
/// and get the proxy's 431, counted and logged like any reply; only grossly
/// oversized heads meet the connection's.
pub fn head_limit(max_header_bytes: usize) -> usize {
    max_header_bytes
        .saturating_mul(2)
        .max(max_header_bytes + 8192)
}

/// The size of a request head as HTTP/1.1 would write it.
pub fn head_size<B>(req: &Request<B>) -> usize {
    let target = req.uri().path_and_query().map_or(1, |p| p.as_str().len());
    let line = req.method().as_str().len() + target + 11;
    req.headers().iter().fold(line, |n, (name, value)| {
        n + name.as_str().len() + value.len() + 4
    })
}

/// Copies bytes both ways between an upgraded client and backend until either
/// side closes, starting with what each sent after its head. The backend
/// counts the tunnel as a request in flight for as long as it is open.
async fn tunnel(
    client: PendingUpgrade,
    (mut backend, early): (h1::Stream, Bytes),
    _in_flight: Option<InFlight>,
) {
    use tokio::io::AsyncWriteExt;
    let Some((mut client, client_early)) = client.upgraded().await else {
        return tracing::debug!("upgrade failed: the 101 did not reach the client");
    };
    let early = async {
        client.write_all(&early).await?;
        backend.write_all(&client_early).await
    };
    if let Err(e) = early.await {
        return tracing::debug!("tunnel closed: {e}");
    }
    if let Err(e) = tokio::io::copy_bidirectional(&mut client, &mut backend).await {
        tracing::debug!("tunnel closed: {e}");
    }
}
