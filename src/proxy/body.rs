//! The bodies the proxy passes on: a client's request body, whichever protocol
//! it came by, and the response body bascule sends to clients, with the record
//! of the exchange that it carries until the last byte is gone.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Either, Full};

use crate::access_log::{AccessLogger, RequestLine};
use crate::client_io::Busy;
use crate::http1::serve::{EncodedFields, ReplyBody};
use crate::http1::BoxError;
use crate::metrics::{self as m, RequestCounters};
use crate::pool::BackendBody;
use crate::queue::InFlight;
use crate::upstream::Upstream;

/// Everything to account for one request, done when it is dropped: after the
/// response body has ended, or when the client went away.
#[derive(Debug)]
pub struct Exchange {
    started: Instant,
    pub status: u16,
    pub bytes: u64,
    pub upstream: Option<Arc<Upstream>>,
    /// Index of the backend in `upstream.backends`.
    pub backend: Option<usize>,
    pub in_flight: Option<InFlight>,
    /// Microseconds it waited in its upstream's queue, in all its attempts
    /// (saturating: 71 minutes). Not a `Duration`: the record moves with every
    /// body, and this keeps it as small as it was.
    pub queued_us: u32,
    /// Backends this request was sent to, retries included.
    pub attempts: u8,
    /// How the route's cache served it, if it has one (`hit_memory`, `miss`...).
    pub cache: Option<&'static str>,
    log: Option<(AccessLogger, Box<RequestLine>)>,
    _busy: Busy,
}

impl Exchange {
    pub fn new(busy: Busy, log: Option<(AccessLogger, Box<RequestLine>)>) -> Self {
        Exchange {
            started: Instant::now(),
            status: 0,
            bytes: 0,
            upstream: None,
            backend: None,
            in_flight: None,
            queued_us: 0,
            attempts: 0,
            cache: None,
            log,
            _busy: busy,
        }
    }

    /// When the request began: the request path's reading of the clock,
    /// which the layers use rather than read it again.
    pub fn started(&self) -> Instant {
        self.started
    }

    fn counters(&self) -> &RequestCounters {
        match (&self.upstream, self.backend) {
            (Some(u), Some(b)) => &u.backends[b].requests,
            (Some(u), None) => &u.unserved,
            (None, _) => m::unrouted(),
        }
    }
}

impl Drop for Exchange {
    fn drop(&mut self) {
        let took = self.started.elapsed();
        self.counters().count(self.status);
        if let Some(u) = &self.upstream {
            u.duration.record(took.as_secs_f64());
        }
        if let Some((logger, line)) = self.log.take() {
            let upstream = self
                .upstream
                .as_ref()
                .map_or(m::NONE, |u| u.config.name.as_str());
            let backend = match (&self.upstream, self.backend) {
                (Some(u), Some(b)) => u.backends[b].address.as_str(),
                _ => m::NONE,
            };
            logger.log(
                &line,
                &crate::access_log::Outcome {
                    status: self.status,
                    bytes: self.bytes,
                    upstream,
                    backend,
                    took,
                    queued: Duration::from_micros(self.queued_us.into()),
                    attempts: self.attempts,
                    cache: self.cache,
                },
            );
        }
    }
}

pin_project_lite::pin_project! {
    /// A backend's body passed through, a reply bascule made, or a body a
    /// layer made (the cache's), with the exchange record.
    pub struct ProxyBody {
        #[pin]
        inner: Either<BackendBody, Either<Full<Bytes>, UnsyncBoxBody<Bytes, BoxError>>>,
        exchange: Option<Exchange>,
        // A stored reply's fields, encoded once when it was stored. Boxed:
        // every body moves several times, and few carry these.
        fields: Option<Box<EncodedFields>>,
    }
}

/// An empty body, with no exchange to account for.
impl Default for ProxyBody {
    fn default() -> Self {
        ProxyBody::local(Bytes::new(), None)
    }
}

impl ProxyBody {
    pub fn backend(body: BackendBody, exchange: Exchange) -> Self {
        ProxyBody {
            inner: Either::Left(body),
            exchange: Some(exchange),
            fields: None,
        }
    }

    pub fn local(text: Bytes, exchange: Option<Exchange>) -> Self {
        ProxyBody {
            inner: Either::Right(Either::Left(Full::new(text))),
            exchange,
            fields: None,
        }
    }

    /// A reply with fields of its head already encoded for HTTP/1.
    pub fn with_encoded_fields(mut self, fields: EncodedFields) -> Self {
        self.fields = Some(Box::new(fields));
        self
    }

    /// The record of the exchange, from a reply that will not be sent (a
    /// layer answering in its place).
    pub fn into_exchange(mut self) -> Option<Exchange> {
        self.exchange.take()
    }

    /// Any body, such as a layer's wrapping of another `ProxyBody` (which
    /// keeps its own exchange record).
    pub fn wrap<B>(body: B) -> Self
    where
        B: Body<Data = Bytes> + Send + 'static,
        B::Error: Into<BoxError>,
    {
        ProxyBody {
            inner: Either::Right(Either::Right(body.map_err(Into::into).boxed_unsync())),
            exchange: None,
            fields: None,
        }
    }
}

impl Body for ProxyBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.project();
        let Poll::Ready(polled) = this.inner.poll_frame(cx) else {
            return Poll::Pending;
        };
        match &polled {
            Some(Ok(frame)) => {
                if let Some(ex) = this.exchange.as_mut() {
                    ex.bytes += frame.data_ref().map_or(0, |d| d.len() as u64);
                }
            }
            None => drop(this.exchange.take()),
            // A backend that broke off mid-body: the exchange is over, the connection closed.
            Some(Err(_)) => drop(this.exchange.take()),
        }
        Poll::Ready(polled)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl ReplyBody for ProxyBody {
    fn encoded_fields(&self) -> Option<&EncodedFields> {
        self.fields.as_deref()
    }
}
