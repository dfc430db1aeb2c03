//! The cache as a layer on a route's stack: GET and HEAD answered from the
//! store when it may, one request to the backend per key when it may not,
//! the response stored as it streams to its client, and `Cache-Status` on
//! every reply (RFC 9211).

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::{Instant, SystemTime};

use bytes::{Bytes, BytesMut};
use http::header::{
    HeaderMap, HeaderName, HeaderValue, AGE, CACHE_CONTROL, CONTENT_LENGTH, CONTENT_LOCATION, DATE,
    ETAG, EXPIRES, IF_MODIFIED_SINCE, IF_NONE_MATCH, LAST_MODIFIED, RANGE, VARY,
};
use http::{Method, Request, Response, StatusCode, Version};
use http_body::{Body, Frame, SizeHint};
use http_body_util::{BodyExt, Either};
use tower::{Layer, Service, ServiceExt};

use super::policy::{self, Ask, Asked, Lifetime};
use super::store::{Entry, Freshness, CACHE_STATUS};
use super::{key, Cache, Fill, Filled, Join, Outcome, Purge, Source};
use crate::client_io::Activity;
use crate::http1::serve::RequestBody;
use crate::http1::BoxError;
use crate::proxy::{self, ConnContext, Exchange, Failed, ProxyBody, RouteRequest};
use crate::upstream::Upstream;

const HIT_MEMORY: &str = "bascule; hit; detail=memory";

/// Puts a cache in front of a route's services.
#[derive(Clone, Debug)]
pub struct CacheLayer {
    cache: Arc<Cache>,
    upstream: Arc<Upstream>,
}

impl CacheLayer {
    /// `upstream`: the route's, which replies from the cache are counted under.
    pub fn new(cache: Arc<Cache>, upstream: Arc<Upstream>) -> Self {
        CacheLayer { cache, upstream }
    }
}

impl<S> Layer<S> for CacheLayer {
    type Service = CacheService<S>;

    fn layer(&self, inner: S) -> CacheService<S> {
        CacheService {
            cache: self.cache.clone(),
            upstream: self.upstream.clone(),
            inner,
            encoded_heads: false,
        }
    }
}

#[derive(Clone, Debug)]
pub struct CacheService<S> {
    cache: Arc<Cache>,
    upstream: Arc<Upstream>,
    inner: S,
    /// Replies to HTTP/1 clients carry the entry's fields encoded once
    /// (`EncodedFields`), not a copy of its map: only where no layer above
    /// reads the reply's fields.
    encoded_heads: bool,
}

impl<S> CacheService<S> {
    /// Replies with fields encoded once per entry: for a cache nothing wraps.
    pub fn with_encoded_heads(mut self, on: bool) -> Self {
        self.encoded_heads = on;
        self
    }
}

impl<S> Service<RouteRequest> for CacheService<S>
where
    S: Service<RouteRequest, Response = Response<ProxyBody>, Error = Infallible>
        + Clone
        + Send
        + Sync
        + 'static,
    S::Future: Send + 'static,
{
    type Response = Response<ProxyBody>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Response<ProxyBody>, Infallible>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: RouteRequest) -> Self::Future {
        // A fresh hit is answered here, in a future that holds only the reply:
        // the whole of `serve`'s would be made, moved and dropped for nothing.
        match self.fresh_hit(req) {
            Ok(resp) => Box::pin(std::future::ready(Ok(resp))),
            Err(req) => {
                let this = self.clone();
                Box::pin(async move { Ok(this.serve(req).await) })
            }
        }
    }
}

impl<S> CacheService<S>
where
    S: Service<RouteRequest, Response = Response<ProxyBody>, Error = Infallible>
        + Clone
        + Send
        + Sync
        + 'static,
    S::Future: Send + 'static,
{
    /// The reply to a plain GET or HEAD that a fresh entry in memory answers,
    /// or the request back.
    // The request comes back by value as it went in: boxing it would cost every miss.
    #[allow(clippy::result_large_err)]
    pub fn fresh_hit(&self, req: RouteRequest) -> Result<Response<ProxyBody>, RouteRequest> {
        let http = &req.http;
        if (http.method() != Method::GET && http.method() != Method::HEAD)
            || policy::ask(http.headers()) != Ask::Plain
            || http.headers().contains_key(RANGE)
        {
            return Err(req);
        }
        let Some(key) = key::of_request(http, req.conn.tls) else {
            return Err(req);
        };
        let now = req.exchange.started();
        match self.cache.store.get(&key, http.headers()) {
            Some(entry) if entry.freshness(now) == Freshness::Fresh => {
                self.cache.stats.count_at(Outcome::HitMemory, now);
                Ok(self.reply(&entry, req, now, Outcome::HitMemory, HIT_MEMORY))
            }
            _ => Err(req),
        }
    }

    /// Serves a request that `fresh_hit` gave back (or any request).
    pub async fn serve(self, req: RouteRequest) -> Response<ProxyBody> {
        let method = req.http.method().clone();
        if method != Method::GET && method != Method::HEAD {
            return self.other_method(req).await;
        }
        let Some(key) = key::of_request(&req.http, req.conn.tls) else {
            return self.bypass(req).await;
        };
        let ask = policy::ask(req.http.headers());
        if ask == Ask::Bypass || req.http.headers().contains_key(RANGE) {
            return self.bypass(req).await;
        }
        let now = req.exchange.started();
        let found = self.cache.store.get(&key, req.http.headers());
        if let Some(entry) = &found {
            let freshness = entry.freshness(now);
            let fresh = match ask {
                Ask::Plain => freshness == Freshness::Fresh,
                _ => policy::satisfies(&entry.policy, &head_of(&req.http), SystemTime::now()),
            };
            if fresh {
                self.cache.stats.count_at(Outcome::HitMemory, now);
                return self.reply(entry, req, now, Outcome::HitMemory, HIT_MEMORY);
            }
            if ask == Ask::Plain
                && matches!(
                    freshness,
                    Freshness::Stale {
                        while_revalidating: true,
                        ..
                    }
                )
            {
                self.refresh_in_background(&key, &req, entry.clone());
                self.cache.stats.count(Outcome::Stale);
                return self.reply(entry, req, now, Outcome::Stale, "bascule; fwd=stale");
            }
        }
        match self.cache.join(&key) {
            Join::Lead(fill) if method == Method::HEAD => {
                self.fill_for_head(req, fill, found).await
            }
            Join::Lead(fill) => self.fill(req, fill, found).await,
            Join::Wait(mut rx) => {
                let filled = match rx.wait_for(Option::is_some).await {
                    Ok(filled) => filled.clone(),
                    Err(_) => None,
                };
                self.cache.stats.count(Outcome::Miss);
                match filled {
                    Some(Filled::Stored(entry)) if entry.matches(req.http.headers()) => self.reply(
                        &entry,
                        req,
                        Instant::now(),
                        Outcome::Miss,
                        "bascule; fwd=uri-miss; collapsed",
                    ),
                    _ => with_status(self.forward(req, Outcome::Miss).await, "bascule; fwd=miss"),
                }
            }
        }
    }

    /// A HEAD that misses fills with a GET, as NGINX does
    /// (`proxy_cache_convert_head`): the client gets the head, and the body is
    /// read to its end in the background to be stored (up to `max_object`; a
    /// response that is not being stored is not read on).
    async fn fill_for_head(
        &self,
        mut req: RouteRequest,
        fill: Fill,
        stale: Option<Arc<Entry>>,
    ) -> Response<ProxyBody> {
        *req.http.method_mut() = Method::GET;
        let (parts, mut body) = self.fill(req, fill, stale).await.into_parts();
        let storing = parts
            .headers
            .get(CACHE_STATUS)
            .is_some_and(|v| v.as_bytes().ends_with(b"stored"));
        if storing {
            let limit = self.cache.config.max_object;
            tokio::spawn(async move {
                let mut read = 0u64;
                while let Some(Ok(frame)) = body.frame().await {
                    read += frame.data_ref().map_or(0, |d| d.len() as u64);
                    if read > limit {
                        break;
                    }
                }
            });
        }
        Response::from_parts(parts, ProxyBody::local(Bytes::new(), None))
    }

    /// Goes to the backend for `fill`'s key, revalidating `stale` when there
    /// is one, and stores what may be stored as it streams to the client.
    async fn fill(
        &self,
        mut req: RouteRequest,
        mut fill: Fill,
        mut stale: Option<Arc<Entry>>,
    ) -> Response<ProxyBody> {
        if let Some(tier) = &self.cache.redis {
            // Another instance may have it: read before going to the backend.
            let began = tier.begin(fill.key()).await;
            fill.redis_generation = began.generation;
            if let Some(shared) = began.entry.filter(|e| e.matches(req.http.headers())) {
                let shared = Arc::new(shared);
                if shared.freshness(Instant::now()) == Freshness::Fresh {
                    fill.promote(shared.clone());
                    self.cache.stats.count(Outcome::HitRedis);
                    return self.reply(
                        &shared,
                        req,
                        Instant::now(),
                        Outcome::HitRedis,
                        "bascule; hit; detail=redis",
                    );
                }
                stale = stale.or(Some(shared));
            }
        }
        let client = head_of(&req.http);
        if let Some(stale) = &stale {
            // The stored response's validators replace the client's own, whose
            // conditional is answered from the refreshed entry.
            let headers = req.http.headers_mut();
            headers.remove(IF_NONE_MATCH);
            headers.remove(IF_MODIFIED_SINCE);
            if let Some(etag) = stale.headers.get(ETAG) {
                headers.insert(IF_NONE_MATCH, etag.clone());
            }
            if let Some(modified) = stale.headers.get(LAST_MODIFIED) {
                headers.insert(IF_MODIFIED_SINCE, modified.clone());
            }
        }
        let resp = self.forward(req, Outcome::Miss).await;
        let status = resp.status();
        if let Some(stale) = stale {
            if status == StatusCode::NOT_MODIFIED {
                let refreshed = refresh(&stale, resp.headers(), &client, &self.cache.defaults());
                let ex = exchange_of(resp);
                self.cache.stats.count(Outcome::Stale);
                let reply_status = "bascule; fwd=stale; fwd-status=304";
                let entry = match refreshed {
                    Some(entry) => {
                        fill.store(entry.clone());
                        entry
                    }
                    None => stale,
                };
                return self.reply_to(
                    &entry,
                    (&client.method, client.version, &client.headers),
                    ex,
                    Instant::now(),
                    Outcome::Stale,
                    reply_status,
                );
            }
            if is_failure(&resp) {
                let now = Instant::now();
                if let Freshness::Stale { if_error: true, .. } = stale.freshness(now) {
                    let ex = exchange_of(resp);
                    self.cache.stats.count(Outcome::Stale);
                    let reply_status =
                        format!("bascule; fwd=stale; fwd-status={}", status.as_u16());
                    return self.reply_to(
                        &stale,
                        (&client.method, client.version, &client.headers),
                        ex,
                        now,
                        Outcome::Stale,
                        &reply_status,
                    );
                }
                if stale.lifetime.must_revalidate && resp.extensions().get::<Failed>().is_some() {
                    // RFC 9111 §4.2.4: a response that must be revalidated and
                    // cannot be is answered with 504, never served stale.
                    self.cache.stats.count(Outcome::Miss);
                    let ex = exchange_of(resp);
                    let body = "504 Gateway Timeout: the stored response must be revalidated, and the backend did not answer\n";
                    return with_status(
                        proxy::local_reply(
                            StatusCode::GATEWAY_TIMEOUT,
                            Bytes::from_static(body.as_bytes()),
                            ex,
                        ),
                        "bascule; fwd=stale; fwd-status=504",
                    );
                }
            }
        }
        self.cache.stats.count(Outcome::Miss);
        let (mut parts, body) = resp.into_parts();
        let storable = (status != StatusCode::NOT_MODIFIED
            && status != StatusCode::PARTIAL_CONTENT
            && parts.extensions.get::<Failed>().is_none())
        .then(|| policy::storable(&client, &parts, &self.cache.defaults(), SystemTime::now()))
        .flatten()
        .filter(|_| {
            content_length(&parts.headers).is_none_or(|n| n <= self.cache.config.max_object)
        });
        let Some(lifetime) = storable else {
            drop(fill);
            parts
                .headers
                .insert(CACHE_STATUS, HeaderValue::from_static("bascule; fwd=miss"));
            return Response::from_parts(parts, body);
        };
        let filling = Filling {
            template: Template {
                status,
                headers: parts.headers.clone(),
                vary: policy::vary_values(&parts.headers, &client.headers),
                tags: policy::tags(&parts.headers),
                asked: Asked::of(&client),
                lifetime,
            },
            // Its length, when given, is what it will hold: no regrowth on the way.
            buf: BytesMut::with_capacity(content_length(&parts.headers).map_or(0, |n| n as usize)),
            limit: self.cache.config.max_object,
            fill,
        };
        parts.headers.insert(
            CACHE_STATUS,
            HeaderValue::from_static("bascule; fwd=miss; stored"),
        );
        let tee = Tee {
            inner: body,
            filling: Some(filling),
        };
        Response::from_parts(parts, ProxyBody::wrap(tee))
    }

    /// A stale entry served while it is revalidated: one refresh in the
    /// background, on a request of its own made from this one.
    fn refresh_in_background(&self, key: &str, req: &RouteRequest, stale: Arc<Entry>) {
        let Some(fill) = self.cache.lead(key) else {
            return; // one refresh is already on its way
        };
        let mut http = Request::new(Either::Left(RequestBody::empty()));
        *http.method_mut() = Method::GET;
        *http.uri_mut() = req.http.uri().clone();
        *http.version_mut() = req.http.version();
        *http.headers_mut() = req.http.headers().clone();
        let c = &req.conn;
        let conn = Arc::new(ConnContext {
            listener: c.listener,
            peer: c.peer,
            client_ip: c.client_ip.clone(),
            tls: c.tls,
            activity: Arc::new(Activity::default()),
            tunnels: c.tunnels.clone(),
            access_log: None,
            trusted_proxies: c.trusted_proxies.clone(),
        });
        let exchange = Exchange::new(conn.activity.begin(), None);
        let this = self.clone();
        tokio::spawn(async move {
            let refresh = RouteRequest {
                http,
                conn,
                exchange,
            };
            let resp = this.fill(refresh, fill, Some(stale)).await;
            // Read to its end: the body stores itself as it goes.
            let _ = resp.into_body().collect().await;
        });
    }

    async fn other_method(&self, req: RouteRequest) -> Response<ProxyBody> {
        // RFC 9111 §4.4: a successful unsafe method invalidates what is stored for its URL.
        let is_unsafe = !matches!(*req.http.method(), Method::OPTIONS | Method::TRACE);
        let key = key::of_request(&req.http, req.conn.tls).filter(|_| is_unsafe);
        let resp = self.forward(req, Outcome::Bypass).await;
        let status = resp.status();
        if let Some(key) = key {
            if status.is_success() || status.is_redirection() {
                let purge = Purge::Keys(vec![key]);
                self.cache
                    .purge_everywhere(purge, Source::UnsafeMethod)
                    .await;
            }
        }
        with_status(resp, "bascule; fwd=method")
    }

    async fn bypass(&self, req: RouteRequest) -> Response<ProxyBody> {
        self.cache.stats.count(Outcome::Bypass);
        with_status(
            self.forward(req, Outcome::Bypass).await,
            "bascule; fwd=bypass",
        )
    }

    /// Sends the request on, its access log line marked with `outcome`.
    async fn forward(&self, mut req: RouteRequest, outcome: Outcome) -> Response<ProxyBody> {
        req.exchange.cache = Some(outcome.name());
        match self.inner.clone().oneshot(req).await {
            Ok(resp) => resp,
            Err(never) => match never {},
        }
    }

    fn reply(
        &self,
        entry: &Entry,
        req: RouteRequest,
        now: Instant,
        outcome: Outcome,
        status: &str,
    ) -> Response<ProxyBody> {
        let RouteRequest { http, exchange, .. } = req;
        self.reply_to(
            entry,
            (http.method(), http.version(), http.headers()),
            exchange,
            now,
            outcome,
            status,
        )
    }

    /// The stored response (or a 304 for a conditional it satisfies), counted
    /// under the route's upstream as a reply made without a backend, and
    /// logged with `outcome`.
    #[allow(clippy::too_many_arguments)]
    fn reply_to(
        &self,
        entry: &Entry,
        (method, version, request): (&Method, Version, &HeaderMap),
        mut ex: Exchange,
        now: Instant,
        outcome: Outcome,
        cache_status: &str,
    ) -> Response<ProxyBody> {
        if ex.upstream.is_none() {
            ex.upstream = Some(self.upstream.clone());
        }
        ex.cache = Some(outcome.name());
        let not_modified = conditional_matches(request, &entry.headers);
        let encoded = self.encoded_heads && version != Version::HTTP_2 && !not_modified;
        let (status, mut headers, body) = if not_modified {
            (
                StatusCode::NOT_MODIFIED,
                not_modified_fields(&entry.headers),
                Bytes::new(),
            )
        } else if encoded {
            // The map holds only what frames the body: a GET's length comes
            // from the body itself, a HEAD's must be given.
            let mut headers = HeaderMap::new();
            let body = if method == Method::HEAD {
                if let Some(length) = entry.headers.get(CONTENT_LENGTH) {
                    headers.insert(CONTENT_LENGTH, length.clone());
                }
                Bytes::new()
            } else {
                entry.body.clone()
            };
            (entry.status, headers, body)
        } else {
            let body = if method == Method::HEAD {
                Bytes::new()
            } else {
                entry.body.clone()
            };
            (entry.status, entry.headers.clone(), body)
        };
        let age = entry.age(now).as_secs();
        let mut fields = None;
        if encoded {
            let mut own = Vec::with_capacity(48 + cache_status.len());
            own.extend_from_slice(b"age: ");
            own.extend_from_slice(itoa::Buffer::new().format(age).as_bytes());
            own.extend_from_slice(b"\r\ncache-status: ");
            own.extend_from_slice(cache_status.as_bytes());
            own.extend_from_slice(b"\r\n");
            let mut f = entry.encoded.clone();
            f.lines[0] = Bytes::from(own);
            fields = Some(f);
        } else {
            headers.insert(AGE, HeaderValue::from(age));
            let value = match cache_status {
                HIT_MEMORY => Ok(HeaderValue::from_static(HIT_MEMORY)),
                other => HeaderValue::from_str(other),
            };
            if let Ok(v) = value {
                headers.insert(CACHE_STATUS, v);
            }
        }
        ex.status = status.as_u16();
        let mut body = ProxyBody::local(body, Some(ex));
        if let Some(f) = fields {
            body = body.with_encoded_fields(f);
        }
        let mut resp = Response::new(body);
        *resp.status_mut() = status;
        *resp.headers_mut() = headers;
        resp
    }
}

/// A copy of a request's head, for the policy and for replies made later.
fn head_of<B>(req: &Request<B>) -> http::request::Parts {
    let mut head = Request::new(());
    *head.method_mut() = req.method().clone();
    *head.uri_mut() = req.uri().clone();
    *head.version_mut() = req.version();
    *head.headers_mut() = req.headers().clone();
    head.into_parts().0
}

fn with_status(mut resp: Response<ProxyBody>, status: &'static str) -> Response<ProxyBody> {
    resp.headers_mut()
        .insert(CACHE_STATUS, HeaderValue::from_static(status));
    resp
}

/// The reply's record of the exchange, taken back from a reply not passed on.
fn exchange_of(resp: Response<ProxyBody>) -> Exchange {
    resp.into_body()
        .into_exchange()
        .unwrap_or_else(|| Exchange::new(Arc::new(Activity::default()).begin(), None))
}

/// RFC 5861 §4: an error is what would be a 500, 502, 503 or 504.
fn is_failure(resp: &Response<ProxyBody>) -> bool {
    resp.extensions().get::<Failed>().is_some()
        || matches!(resp.status().as_u16(), 500 | 502 | 503 | 504)
}

fn content_length(headers: &HeaderMap) -> Option<u64> {
    headers.get(CONTENT_LENGTH)?.to_str().ok()?.parse().ok()
}

/// The stored entry updated by a 304's fields (RFC 9111 §4.3.4), or `None`
/// when the updated response may no longer be stored.
fn refresh(
    stale: &Entry,
    not_modified: &HeaderMap,
    client: &http::request::Parts,
    defaults: &policy::Defaults,
) -> Option<Arc<Entry>> {
    let mut headers = stale.headers.clone();
    for name in not_modified.keys() {
        if name == CONTENT_LENGTH {
            continue;
        }
        headers.remove(name);
        for v in not_modified.get_all(name) {
            headers.append(name.clone(), v.clone());
        }
    }
    let mut head = Response::new(());
    *head.status_mut() = stale.status;
    *head.headers_mut() = headers;
    let head = head.into_parts().0;
    let lifetime = policy::storable(client, &head, defaults, SystemTime::now())?;
    Some(Arc::new(Entry::new(
        stale.status,
        head.headers.clone(),
        stale.body.clone(),
        policy::vary_values(&head.headers, &client.headers),
        policy::tags(&head.headers),
        Asked::of(client),
        lifetime,
        SystemTime::now(),
    )))
}

/// Whether the client's conditional is satisfied by the stored fields
/// (RFC 9110 §13.1.2 and §13.1.3: `If-None-Match` by weak comparison, else
/// `If-Modified-Since`).
fn conditional_matches(request: &HeaderMap, stored: &HeaderMap) -> bool {
    if let Some(inm) = request.get(IF_NONE_MATCH).and_then(|v| v.to_str().ok()) {
        let Some(etag) = stored.get(ETAG).and_then(|v| v.to_str().ok()) else {
            return false;
        };
        let opaque = |t: &str| t.trim().trim_start_matches("W/").to_string();
        let etag = opaque(etag);
        return inm.trim() == "*" || inm.split(',').any(|t| opaque(t) == etag);
    }
    let Some(since) = request.get(IF_MODIFIED_SINCE) else {
        return false;
    };
    let since = httpdate::parse_http_date(since.to_str().unwrap_or_default()).ok();
    let modified = stored
        .get(LAST_MODIFIED)
        .and_then(|v| httpdate::parse_http_date(v.to_str().ok()?).ok());
    matches!((since, modified), (Some(s), Some(m)) if m <= s)
}

/// What a 304 carries of the stored response (RFC 9110 §15.4.5).
fn not_modified_fields(stored: &HeaderMap) -> HeaderMap {
    let mut out = HeaderMap::new();
    for name in [
        CACHE_CONTROL,
        CONTENT_LOCATION,
        DATE,
        ETAG,
        EXPIRES,
        VARY,
        LAST_MODIFIED,
    ] {
        for v in stored.get_all(&name) {
            out.append(name.clone(), v.clone());
        }
    }
    out
}

/// A response as it will be stored, but for its body.
struct Template {
    status: StatusCode,
    headers: HeaderMap,
    vary: Vec<(HeaderName, Option<HeaderValue>)>,
    tags: Vec<String>,
    asked: Asked,
    lifetime: Lifetime,
}

/// A body being stored as it passes.
struct Filling {
    template: Template,
    buf: BytesMut,
    limit: u64,
    fill: Fill,
}

impl Filling {
    fn finish(self) {
        // A body that grew as it came may hold up to twice its length: stored
        // at its length, it weighs what the cache counts.
        let body = if self.buf.capacity() > self.buf.len() + self.buf.len() / 8 {
            Bytes::copy_from_slice(&self.buf)
        } else {
            self.buf.freeze()
        };
        let t = self.template;
        let entry = Entry::new(
            t.status,
            t.headers,
            body,
            t.vary,
            t.tags,
            t.asked,
            t.lifetime,
            SystemTime::now(),
        );
        self.fill.store(Arc::new(entry));
    }
}

pin_project_lite::pin_project! {
    /// The backend's body on its way to the client, kept as it goes and
    /// stored when it ends whole. Over the cache's `max_object`, or broken
    /// off, it is passed on and not stored.
    struct Tee {
        #[pin]
        inner: ProxyBody,
        filling: Option<Filling>,
    }
}

impl Body for Tee {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.project();
        let polled = ready!(this.inner.poll_frame(cx));
        match &polled {
            Some(Ok(frame)) => {
                if let (Some(data), Some(f)) = (frame.data_ref(), this.filling.as_mut()) {
                    if f.buf.len() as u64 + data.len() as u64 > f.limit {
                        *this.filling = None;
                    } else {
                        f.buf.extend_from_slice(data);
                    }
                }
            }
            Some(Err(_)) => *this.filling = None,
            None => {
                if let Some(f) = this.filling.take() {
                    f.finish();
                }
            }
        }
        Poll::Ready(polled)
    }

    fn is_end_stream(&self) -> bool {
        // Polled to its end while filling, so that the end is seen and stored.
        self.filling.is_none() && self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fields(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        pairs
            .iter()
            .map(|(k, v)| (HeaderName::from_static(k), HeaderValue::from_static(v)))
            .collect()
    }

    #[test]
    fn conditionals_are_answered_from_the_stored_validators() {
        let stored = fields(&[
            ("etag", "\"v1\""),
            ("last-modified", "Tue, 01 Dec 2026 10:00:00 GMT"),
        ]);
        for (request, matches) in [
            (fields(&[("if-none-match", "\"v1\"")]), true),
            (fields(&[("if-none-match", "W/\"v1\"")]), true),
            (fields(&[("if-none-match", "\"v0\", \"v1\"")]), true),
            (fields(&[("if-none-match", "*")]), true),
            (fields(&[("if-none-match", "\"v2\"")]), false),
            // If-None-Match decides when both are given.
            (
                fields(&[
                    ("if-none-match", "\"v2\""),
                    ("if-modified-since", "Wed, 02 Dec 2026 10:00:00 GMT"),
                ]),
                false,
            ),
            (
                fields(&[("if-modified-since", "Wed, 02 Dec 2026 10:00:00 GMT")]),
                true,
            ),
            (
                fields(&[("if-modified-since", "Mon, 30 Nov 2026 10:00:00 GMT")]),
                false,
            ),
            (fields(&[]), false),
        ] {
            assert_eq!(
                conditional_matches(&request, &stored),
                matches,
                "{request:?}"
            );
        }
    }
}
