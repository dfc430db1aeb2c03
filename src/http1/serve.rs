//! HTTP/1.1 from clients: a connection's requests read, handed to a service,
//! and their replies written, all in the connection's own task.
//!
//! Why not hyper's server: its connection keeps a dispatcher, a codec and
//! buffers for its whole life, hands each request body over through a channel
//! even when there is none, and needs the socket taken apart and rebuilt to
//! drop its buffers between requests. Here a connection per request costs 23%
//! fewer instructions and a keep-alive request as many (README, Performance),
//! and a connection between requests holds no buffer at all: the next
//! request's first bytes are read onto the stack, and only what arrived is kept.
//!
//! Timeouts are kept apart, as NGINX keeps them: a connection waiting for the
//! first byte of a request is closed after `keepalive`; once a head has begun
//! it must be complete within `header_read`. Mid-exchange, a client that sends
//! no body bytes for `body`, or takes no reply bytes for `send`, is given up.
//!
//! Each request goes to a `tower::Service` (in bascule, the request path) as a
//! `Request<RequestBody>`, and its `Response` is written back; this module
//! knows nothing of what the service does. A request body is read from the
//! socket as the service asks for it (a `RequestBody` is the service's end of
//! that), so that an upload streams at the backend's pace; `Expect: 100-continue` is answered when the body is first
//! asked for. What is left of a body nobody read is read past when it is small
//! (`DRAIN_MAX`); a larger one closes the connection after its reply, since
//! what follows on the socket is not a request.

use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::mem::MaybeUninit;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{ready, Context, Poll, Waker};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http::header::{HeaderValue, CONTENT_LENGTH, DATE, HOST};
use http::{Method, Request, Response, StatusCode, Uri, Version};
use http_body::{Body, Frame, SizeHint};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};

use crate::client_io::Activity;
use tokio::sync::oneshot;
use tokio::time::{Instant, Sleep};
use tokio_util::sync::{CancellationToken, WaitForCancellationFutureOwned};
use tower::Service;

use super::{
    keeps_alive, BodyFraming, BoxError, Chunked, FieldSpans, Fields, Outgoing, MAX_HEADERS,
    READ_CHUNK,
};

/// What a connection holding no buffer reads at once: a usual request head fits.
const FIRST_READ: usize = 4096;
/// The most of an unread request body read and dropped to keep its connection.
const DRAIN_MAX: u64 = 64 * 1024;
/// How long a closing TLS connection may take to send its close_notify.
const CLOSE_NOTIFY: Duration = Duration::from_secs(1);

/// The first bytes of HTTP/2's connection preface.
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0";

/// What a listener's configuration says about each of its HTTP/1 connections.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    pub keepalive: Duration,
    pub header_read: Duration,
    /// The longest wait for the next bytes of a request body.
    pub body: Duration,
    /// The longest a reply may wait on a client that does not read it.
    pub send: Duration,
    /// The most bytes a request head may take; beyond it, 431.
    pub head: usize,
    /// Room kept in each request's field map for fields the service adds
    /// (growing the map costs more than filling it).
    pub added_fields: usize,
}

/// The connection being served: who is at the other end, and how.
#[derive(Clone, Debug)]
pub struct Connection {
    pub peer: SocketAddr,
    /// Over TLS: a closing connection sends its close_notify.
    pub tls: bool,
    pub limits: Limits,
    /// The service marks here a request that waits (for a backend with room):
    /// the socket is then watched, and a client that leaves ends the request.
    pub activity: Arc<Activity>,
}

/// A client connection's stream, plain or TLS.
pub trait ClientStream: AsyncRead + AsyncWrite + Send + Unpin + 'static {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin + 'static> ClientStream for T {}

/// An upgraded client connection, and the bytes it sent after its request head.
pub type Upgraded = (Box<dyn ClientStream>, Bytes);

/// In an upgrade request's extensions: the connection comes through it once
/// the 101 reply is written. (Extensions must be `Clone`: the first to take
/// the receiver has it.)
#[derive(Clone)]
pub struct PendingUpgrade(Arc<Mutex<Option<oneshot::Receiver<Upgraded>>>>);

impl PendingUpgrade {
    /// The upgraded connection, once the 101 is written; `None` if it never was.
    pub async fn upgraded(self) -> Option<Upgraded> {
        let rx = self.0.lock().unwrap_or_else(|e| e.into_inner()).take()?;
        rx.await.ok()
    }
}

/// Serves HTTP/1.1 (and 1.0) requests on `io` until the client or a timeout
/// ends the connection, or `stop` is cancelled while it is idle: each request
/// to `service`, and its response back. A request refused before its head
/// could be read (400, 431, 505) is answered here and told to `refused`, with
/// the service, its status and the length of the body sent, once: the
/// connection closes after it. With `http2`, a connection that opens with HTTP/2's preface (prior
/// knowledge) is handed to the task it makes.
///
/// Not an async fn: an async block keeps its captures in place, where an async
/// fn would also keep a moved-from copy of every argument, and this future is
/// most of what an idle connection costs.
pub fn serve<S, V, B, H>(
    mut io: S,
    conn: Connection,
    mut service: V,
    refused: impl FnOnce(&V, StatusCode, u64) + Send,
    stop: CancellationToken,
    http2: Option<H>,
) -> impl Future<Output = ()> + Send
where
    S: ClientStream,
    V: Service<Request<RequestBody>, Response = Response<B>, Error = Infallible> + Send,
    V::Future: Send,
    B: ReplyBody,
    B::Error: Into<BoxError>,
    H: FnOnce(S, Bytes) -> Pin<Box<dyn Future<Output = ()> + Send>> + Send,
{
    // Taken apart: the limits live in the reader, and the future keeps one copy.
    let Connection {
        peer,
        tls,
        limits,
        activity,
    } = conn;
    let mut reader = HeadReader {
        activity,
        buf: BytesMut::new(),
        limits,
        detect_h2: http2.is_some(),
        // Boxed: the timer is larger than the rest of an idle connection's state.
        timer: Box::pin(tokio::time::sleep(limits.keepalive)),
        armed: None,
        waiting_since: None,
        stalled_since: None,
        stopped: Box::pin(stop.clone().cancelled_owned()),
        stop,
    };
    async move {
        loop {
            let head = std::future::poll_fn(|task| reader.poll_head(task, &mut io)).await;
            let head = match head {
                Ok(Next::Request(head)) => head,
                Ok(Next::Http2) => {
                    if let Some(http2) = http2 {
                        http2(io, reader.buf.split().freeze()).await;
                    }
                    return;
                }
                Ok(Next::Closed) => return,
                Err(HeadError::Refused(status, why)) => {
                    tracing::debug!(peer = %peer, "request refused: {why}");
                    let (reply, body) = refusal(status, why);
                    let _ =
                        tokio::time::timeout(reader.limits.header_read, io.write_all(&reply)).await;
                    refused(&service, status, body as u64);
                    return;
                }
                Err(HeadError::Io(e)) => {
                    tracing::debug!(peer = %peer, "client connection ended: {e}");
                    return;
                }
            };
            if std::future::poll_fn(|task| service.poll_ready(task))
                .await
                .is_err()
            {
                return;
            }
            // Boxed: a request's state is several times an idle connection's,
            // and lives only while the request does.
            match Box::pin(exchange(&mut io, &mut reader, peer, &mut service, head)).await {
                After::KeepAlive => reader.between_requests(),
                After::Close => {
                    if tls {
                        let _ = tokio::time::timeout(CLOSE_NOTIFY, io.shutdown()).await;
                    }
                    return;
                }
                After::Upgrade(tx) => {
                    let _ = tx.send((Box::new(io), reader.buf.split().freeze()));
                    return;
                }
            }
        }
    }
}

/// What becomes of the connection after an exchange.
enum After {
    KeepAlive,
    Close,
    /// The 101 is out: the connection goes to the tunnel waiting on the other end.
    Upgrade(oneshot::Sender<Upgraded>),
}

/// One request: handed to the service, its body read as the service asks, and
/// the reply written.
fn exchange<'a, S, V, B>(
    io: &'a mut S,
    reader: &'a mut HeadReader,
    peer: SocketAddr,
    service: &'a mut V,
    head: Head,
) -> impl Future<Output = After> + Send + 'a
where
    S: ClientStream,
    V: Service<Request<RequestBody>, Response = Response<B>, Error = Infallible> + Send,
    V::Future: Send,
    B: ReplyBody,
    B::Error: Into<BoxError>,
{
    let Head {
        mut req,
        body,
        mut keep_alive,
        expect_continue,
        trailers,
        upgrade,
    } = head;
    let version = req.version();
    let head_only = req.method() == Method::HEAD;
    let (request_body, mut inbound) = match body {
        None => (RequestBody::empty(), None),
        Some(framing) => {
            let pipe = Arc::new(Mutex::new(Pipe::default()));
            let size = match framing {
                BodyFraming::Length(n) => Some(n),
                _ => None,
            };
            let continue_owed = expect_continue && version == Version::HTTP_11;
            let inbound = Inbound {
                pipe: pipe.clone(),
                framing,
                continue_left: if continue_owed { CONTINUE } else { b"" },
                gone: false,
                failed: false,
                delivered: 0,
            };
            (RequestBody::new(pipe, size), Some(inbound))
        }
    };
    let upgrade = upgrade.then(|| {
        let (tx, rx) = oneshot::channel();
        req.extensions_mut()
            .insert(PendingUpgrade(Arc::new(Mutex::new(Some(rx)))));
        tx
    });
    let req = req.map(|()| request_body);
    async move {
        // Made here, not before the block: the block would keep room for it
        // twice. In a scope of its own, so that the reply's state can reuse its room.
        let mut left = false;
        let resp = {
            let mut call = std::pin::pin!(service.call(req));
            std::future::poll_fn(|task| {
                if let Some(inbound) = inbound.as_mut() {
                    let delivered = inbound.delivered;
                    let waiting = inbound.poll_pump(task, io, &mut reader.buf);
                    let progressed = inbound.delivered != delivered;
                    let limit = reader.limits.body;
                    if reader
                        .poll_stalled(task, waiting, progressed, limit)
                        .is_ready()
                    {
                        let stalled = "no bytes of the request body within timeouts.body";
                        inbound.fail(io::Error::new(io::ErrorKind::TimedOut, stalled));
                    }
                } else if reader.activity.is_waiting() && reader.poll_left(task, io) {
                    // The request, with no body to read, waits for a backend,
                    // and its client has left: it leaves the queue (the
                    // service's future is dropped). The empty reply stands in
                    // for the one it will not get; the service's own is passed
                    // on below as it comes, unwrapped and unmoved.
                    left = true;
                    return Poll::Ready(Ok(Response::new(B::default())));
                }
                call.as_mut().poll(task)
            })
            .await
        };
        let Ok(resp) = resp;
        let (parts, body) = resp.into_parts();
        if left {
            tracing::debug!(peer = %peer, "the client left while its request waited");
            return After::Close;
        }
        keep_alive &= !reader.stopping();
        let (head, framing) = encode_reply_head(&parts, version, head_only, &body, &mut keep_alive);
        let upgrading = parts.status == StatusCode::SWITCHING_PROTOCOLS;
        drop(parts);
        let (sent_body, held_body) = match framing {
            ReplyFraming::None => (None, Some(body)),
            _ => (Some(body), None),
        };
        let length = match framing {
            ReplyFraming::Length(n) => Some(n),
            _ => None,
        };
        let chunked = framing == ReplyFraming::Chunked;
        let mut out = Outgoing::new(head, sent_body, chunked, length).with_trailers(trailers);
        let sent = std::future::poll_fn(|task| {
            // An HTTP/2 backend may still be taking the upload while its reply streams back.
            if let Some(inbound) = inbound.as_mut() {
                inbound.poll_pump(task, io, &mut reader.buf);
            }
            let written = out.written();
            let sent = out.poll_send(task, io);
            let waiting = sent.is_pending() && out.is_write_blocked();
            let progressed = out.written() != written;
            let limit = reader.limits.send;
            if reader
                .poll_stalled(task, waiting, progressed, limit)
                .is_ready()
            {
                let stalled = "the client took no bytes of the reply within timeouts.send";
                return Poll::Ready(Err(io::Error::new(io::ErrorKind::TimedOut, stalled)));
            }
            sent
        })
        .await;
        // The exchange is accounted for when its body goes: after the last byte is out.
        drop(out);
        drop(held_body);
        if let Err(e) = sent {
            tracing::debug!(peer = %peer, "client connection ended: {e}");
            return After::Close;
        }
        match upgrade {
            Some(tx) if upgrading => return After::Upgrade(tx),
            _ => {}
        }
        if !keep_alive {
            return After::Close;
        }
        if let Some(inbound) = inbound.as_mut().filter(|i| !i.framing.is_done()) {
            let mut budget = DRAIN_MAX;
            let drained = std::future::poll_fn(|task| {
                let before = budget;
                let drained = inbound.poll_drain(task, io, &mut reader.buf, &mut budget);
                let (waiting, progressed) = (drained.is_pending(), budget != before);
                let limit = reader.limits.body;
                if reader
                    .poll_stalled(task, waiting, progressed, limit)
                    .is_ready()
                {
                    return Poll::Ready(false);
                }
                drained
            })
            .await;
            if !drained {
                return After::Close;
            }
        }
        After::KeepAlive
    }
}

/// A request head as parsed, with what the connection needs to know of it.
struct Head {
    req: Request<()>,
    /// None: the request has no body.
    body: Option<BodyFraming>,
    keep_alive: bool,
    expect_continue: bool,
    /// The client said `TE: trailers`: a chunked reply may carry them.
    trailers: bool,
    /// It has an `Upgrade` field: the connection may pass to a tunnel.
    upgrade: bool,
}

// Made once per request and taken apart at once: boxing the head would cost an allocation.
#[allow(clippy::large_enum_variant)]
enum Next {
    Request(Head),
    Http2,
    Closed,
}

enum HeadError {
    /// A reply is owed before the connection closes.
    Refused(StatusCode, &'static str),
    Io(io::Error),
}

impl From<io::Error> for HeadError {
    fn from(e: io::Error) -> Self {
        HeadError::Io(e)
    }
}

/// Reads request heads: the connection's buffer, its timer, and the stop signal.
struct HeadReader {
    /// Bytes read and not yet used; between requests usually empty and unallocated.
    buf: BytesMut,
    activity: Arc<Activity>,
    limits: Limits,
    detect_h2: bool,
    timer: Pin<Box<Sleep>>,
    /// The deadline the timer is set to, when armed.
    armed: Option<Instant>,
    /// When the current wait began: for a head not yet begun, the keep-alive
    /// clock; for one begun, the header-read clock.
    waiting_since: Option<(Instant, bool)>,
    /// Mid-exchange, since when bascule has waited on the client (for body
    /// bytes, or to take reply bytes) without progress.
    stalled_since: Option<Instant>,
    stop: CancellationToken,
    /// `stop`'s cancellation, waited for while idle; kept, so that it registers once.
    stopped: Pin<Box<WaitForCancellationFutureOwned>>,
}

impl HeadReader {
    /// Whether the server is shutting down: the reply in progress is the connection's last.
    fn stopping(&self) -> bool {
        self.stop.is_cancelled()
    }

    /// Mid-exchange, for the body and send timeouts: ready once bascule has
    /// been `waiting` on the client (for body bytes, or to take reply bytes)
    /// for `limit` without it making progress. The head's timer is idle during
    /// an exchange, so it serves.
    fn poll_stalled(
        &mut self,
        task: &mut Context<'_>,
        waiting: bool,
        progressed: bool,
        limit: Duration,
    ) -> Poll<()> {
        if !waiting || progressed {
            self.stalled_since = None;
        }
        if !waiting {
            return Poll::Pending;
        }
        let since = *self.stalled_since.get_or_insert_with(Instant::now);
        self.poll_timer(task, since + limit)
    }

    /// The connection's timer, set to `deadline` unless it already is.
    fn poll_timer(&mut self, task: &mut Context<'_>, deadline: Instant) -> Poll<()> {
        if self.armed != Some(deadline) {
            self.timer.as_mut().reset(deadline);
            self.armed = Some(deadline);
        }
        self.timer.as_mut().poll(task)
    }

    /// A reply is out and the connection stays: the next head starts afresh.
    fn between_requests(&mut self) {
        self.waiting_since = None;
        self.stalled_since = None;
        self.detect_h2 = false;
        if self.buf.is_empty() {
            // An empty buffer may still hold an allocation: dropped while idle.
            self.buf = BytesMut::new();
        }
    }

    fn poll_head<S: AsyncRead + Unpin>(
        &mut self,
        task: &mut Context<'_>,
        io: &mut S,
    ) -> Poll<Result<Next, HeadError>> {
        loop {
            if !self.buf.is_empty() {
                if self.detect_h2 {
                    // A preface cut short counts from "PRI" on, which no HTTP/1 method
                    // begins with; one or two bytes ("P", "PR") could be POST or PUT as well.
                    let n = self.buf.len().min(H2_PREFACE.len());
                    if n >= 3 {
                        if self.buf[..n] == H2_PREFACE[..n] {
                            return Poll::Ready(Ok(Next::Http2));
                        }
                        self.detect_h2 = false;
                    }
                }
                if let Some(head) = parse_request(&mut self.buf, self.limits.added_fields)? {
                    self.armed = None;
                    return Poll::Ready(Ok(Next::Request(head)));
                }
                if self.buf.len() > self.limits.head {
                    return Poll::Ready(Err(HeadError::Refused(
                        StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
                        "the request head is too large",
                    )));
                }
            }
            match self.poll_read(task, io) {
                Poll::Ready(Ok(0)) => return Poll::Ready(Ok(Next::Closed)),
                Poll::Ready(Ok(_)) => continue,
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e.into())),
                Poll::Pending => {}
            }
            let begun = !self.buf.is_empty();
            if !begun && self.stopped.as_mut().poll(task).is_ready() {
                return Poll::Ready(Ok(Next::Closed));
            }
            // The clocks start at the first wait, which under load is the only clock read.
            let since = match self.waiting_since {
                Some((t, b)) if b == begun => t,
                _ => {
                    let now = Instant::now();
                    self.waiting_since = Some((now, begun));
                    now
                }
            };
            let deadline = since
                + if begun {
                    self.limits.header_read
                } else {
                    self.limits.keepalive
                };
            ready!(self.poll_timer(task, deadline));
            let what = if begun {
                "the request head did not arrive in time"
            } else {
                "idle keep-alive connection timed out"
            };
            return Poll::Ready(Err(io::Error::new(io::ErrorKind::TimedOut, what).into()));
        }
    }

    /// Whether the client has closed its end (or the connection failed),
    /// read while its request has nothing else to read. Bytes that arrive
    /// meanwhile, a pipelined request, are kept for their turn, up to a head's
    /// limit; past it the socket is not read.
    #[cold]
    #[inline(never)]
    fn poll_left<S: AsyncRead + Unpin>(&mut self, task: &mut Context<'_>, io: &mut S) -> bool {
        while self.buf.len() < self.limits.head {
            self.buf.reserve(READ_CHUNK);
            match tokio_util::io::poll_read_buf(Pin::new(&mut *io), task, &mut self.buf) {
                Poll::Pending => return false,
                Poll::Ready(Ok(0) | Err(_)) => return true,
                Poll::Ready(Ok(_)) => {}
            }
        }
        false
    }

    /// Reads once; 0 is the end. With no buffer held, reads onto the stack and
    /// keeps only what arrived.
    fn poll_read<S: AsyncRead + Unpin>(
        &mut self,
        task: &mut Context<'_>,
        io: &mut S,
    ) -> Poll<io::Result<usize>> {
        if self.buf.capacity() == 0 {
            let mut storage = [MaybeUninit::<u8>::uninit(); FIRST_READ];
            let mut read = ReadBuf::uninit(&mut storage);
            ready!(Pin::new(io).poll_read(task, &mut read))?;
            self.buf.extend_from_slice(read.filled());
            return Poll::Ready(Ok(read.filled().len()));
        }
        self.buf.reserve(READ_CHUNK);
        tokio_util::io::poll_read_buf(Pin::new(io), task, &mut self.buf)
    }
}

/// Parses a request head at the front of `buf` and removes it; `None` while
/// incomplete. Header values share the buffer's memory.
fn parse_request(buf: &mut BytesMut, added_fields: usize) -> Result<Option<Head>, HeadError> {
    let bad = |why| HeadError::Refused(StatusCode::BAD_REQUEST, why);
    let mut slots = [const { MaybeUninit::<httparse::Header<'_>>::uninit() }; MAX_HEADERS];
    let mut parsed = httparse::Request::new(&mut []);
    let len = match httparse::ParserConfig::default().parse_request_with_uninit_headers(
        &mut parsed,
        buf,
        &mut slots,
    ) {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(httparse::Error::TooManyHeaders) => {
            return Err(HeadError::Refused(
                StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
                "too many header fields",
            ))
        }
        Err(httparse::Error::Version) => {
            return Err(HeadError::Refused(
                StatusCode::HTTP_VERSION_NOT_SUPPORTED,
                "only HTTP/1.0 and HTTP/1.1 are served here",
            ))
        }
        Err(_) => return Err(bad("malformed request head")),
    };
    let method = Method::from_bytes(parsed.method.unwrap_or_default().as_bytes())
        .map_err(|_| bad("malformed method"))?;
    let version = if parsed.version == Some(0) {
        Version::HTTP_10
    } else {
        Version::HTTP_11
    };
    // Where the target and each field lie in the buffer, so that they can share it.
    let base = buf.as_ptr() as usize;
    let target = parsed.path.unwrap_or_default();
    let target = (target.as_ptr() as usize - base, target.len());
    let spans = FieldSpans::of(buf, parsed.headers);
    let head = buf.split_to(len).freeze();
    let uri = Uri::from_maybe_shared(head.slice(target.0..target.0 + target.1))
        .map_err(|_| bad("malformed request target"))?;
    let mut expect_continue = false;
    let mut trailers = false;
    let mut upgrade = false;
    let mut hosts = 0u32;
    let mut host_valid = true;
    // With room for the fields the service adds: growing the map costs more than filling it.
    let fields = spans
        .fields(&head, added_fields, |name, raw| {
            if name.eq_ignore_ascii_case(b"host") {
                hosts += 1;
                host_valid &= is_authority(raw);
            } else if name.eq_ignore_ascii_case(b"upgrade") {
                upgrade = true;
            } else if name.eq_ignore_ascii_case(b"expect") {
                expect_continue |= raw.eq_ignore_ascii_case(b"100-continue");
            } else if name.eq_ignore_ascii_case(b"te") {
                trailers |= raw
                    .split(|&b| b == b',')
                    .any(|t| t.trim_ascii().eq_ignore_ascii_case(b"trailers"));
            }
        })
        .map_err(|_| bad("malformed header field"))?;
    let Fields {
        mut headers,
        connection,
        body,
    } = fields;
    // RFC 9112 §3.2: one Host, and a valid one.
    if hosts > 1 {
        return Err(bad("more than one Host field"));
    }
    if !host_valid {
        return Err(bad("the Host field is not a host and port"));
    }
    // RFC 9112 §3.2.2: an absolute-form target's authority replaces Host, for
    // routing and for the backend alike.
    if let Some(authority) = uri.authority() {
        let host = HeaderValue::from_str(authority.as_str())
            .map_err(|_| bad("malformed request target"))?;
        headers.insert(HOST, host);
    }
    let mut keep_alive = keeps_alive(version, connection);
    if body.chunked.is_some() && version == Version::HTTP_10 {
        // RFC 9112 §6.1: HTTP/1.0 has no transfer codings; such framing is faulty.
        return Err(bad("Transfer-Encoding in an HTTP/1.0 request"));
    }
    if body.chunked == Some(true) && body.other_codings {
        // RFC 9112 §6.1: a coding bascule does not apply is not dropped silently.
        return Err(HeadError::Refused(
            StatusCode::NOT_IMPLEMENTED,
            "transfer codings other than chunked are not supported",
        ));
    }
    // RFC 9112 §6.3: a final chunked coding frames the body, and a
    // Content-Length beside it is dropped; any other coding cannot be framed.
    let body = match body.chunked {
        Some(true) => {
            if body.content_length.is_some() {
                // A request framed two ways may be an attempt at smuggling: this is its last.
                keep_alive = false;
            }
            Some(BodyFraming::Chunked(Chunked::default()))
        }
        Some(false) => return Err(bad("a request body must end with the chunked coding")),
        None if body.bad_length => return Err(bad("invalid Content-Length")),
        None => match body.content_length {
            None | Some(0) => None,
            Some(n) => Some(BodyFraming::Length(n)),
        },
    };
    let mut req = Request::new(());
    *req.method_mut() = method;
    *req.uri_mut() = uri;
    *req.version_mut() = version;
    *req.headers_mut() = headers;
    Ok(Some(Head {
        req,
        body,
        keep_alive,
        expect_continue,
        trailers,
        upgrade,
    }))
}

/// The request-head parser's promise, for the fuzz target (`fuzz/`) and the
/// property tests: any input comes to a request taken from the front of the
/// buffer (framed by what its every Content-Length says, when it has one), a
/// wait for more with the buffer untouched, or a refusal with an error status.
/// `Err` names the promise broken.
#[doc(hidden)]
pub fn check_request_head(bytes: &[u8]) -> Result<(), String> {
    let mut buf = BytesMut::from(bytes);
    match parse_request(&mut buf, 0) {
        Ok(Some(head)) => {
            if buf.len() >= bytes.len() {
                return Err("a head consumed nothing".into());
            }
            if !bytes.ends_with(&buf) {
                return Err("what is left is not the rest".into());
            }
            if let Some(BodyFraming::Length(n)) = head.body {
                let mut said = head.req.headers().get_all(CONTENT_LENGTH).iter();
                let agrees = said.all(|v| {
                    let parts = v.to_str().unwrap_or("").split(',');
                    parts.map(str::trim).all(|p| p.parse::<u64>() == Ok(n))
                });
                if !agrees {
                    return Err(format!("framed by {n} against {:?}", head.req.headers()));
                }
            }
            Ok(())
        }
        Ok(None) if buf[..] == *bytes => Ok(()),
        Ok(None) => Err("a wait for more changed the buffer".into()),
        Err(HeadError::Refused(status, _))
            if status.is_client_error() || status.is_server_error() =>
        {
            Ok(())
        }
        Err(HeadError::Refused(status, _)) => Err(format!("refused with {status}")),
        Err(HeadError::Io(e)) => Err(format!("not a refusal: {e}")),
    }
}

/// A Host value as RFC 9110 §7.2 has it: a host (a name, an IPv4 address or a
/// bracketed IPv6 one) and a port or not, in the characters RFC 3986 allows
/// there; no user information, path, query or spaces. Checked by byte, with no
/// allocation: every request's Host passes through here.
fn is_authority(raw: &[u8]) -> bool {
    !raw.is_empty()
        && raw.iter().all(|&b| {
            b.is_ascii_alphanumeric()
                || matches!(
                    b,
                    b'-' | b'.'
                        | b'_'
                        | b'~'
                        | b'!'
                        | b'$'
                        | b'&'
                        | b'\''
                        | b'('
                        | b')'
                        | b'*'
                        | b'+'
                        | b','
                        | b';'
                        | b'='
                        | b':'
                        | b'['
                        | b']'
                        | b'%'
                )
        })
}

/// The interim reply to `Expect: 100-continue`.
const CONTINUE: &[u8] = b"HTTP/1.1 100 Continue\r\n\r\n";

/// Where a request body's frames pass from the connection to the service.
#[derive(Default)]
struct Pipe {
    /// A frame read and not yet taken.
    frame: Option<io::Result<Frame<Bytes>>>,
    /// No frame follows `frame`.
    ended: bool,
    /// The service is waiting for a frame.
    wanted: bool,
    reader: Option<Waker>,
    writer: Option<Waker>,
    /// The service let go of the body.
    dropped: bool,
}

impl std::fmt::Debug for Pipe {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pipe").field("ended", &self.ended).finish()
    }
}

fn lock(pipe: &Mutex<Pipe>) -> std::sync::MutexGuard<'_, Pipe> {
    pipe.lock().unwrap_or_else(|e| e.into_inner())
}

fn wait_on(slot: &mut Option<Waker>, task: &Context<'_>) {
    match slot {
        Some(w) if w.will_wake(task.waker()) => {}
        _ => *slot = Some(task.waker().clone()),
    }
}

/// The connection's end of a request body: reads it from the socket as the service asks.
struct Inbound {
    pipe: Arc<Mutex<Pipe>>,
    framing: BodyFraming,
    /// What is left to write of the 100 Continue owed before the body is read.
    continue_left: &'static [u8],
    /// The service let go of it, or it failed: nothing more is read.
    gone: bool,
    /// It failed: what is left on the socket cannot be read as its rest.
    failed: bool,
    /// Frames handed over: progress, for the body timeout.
    delivered: u64,
}

impl Inbound {
    /// Reads the next frame when the service wants one and hands it over. A
    /// failure goes to the service (as its upload failing), not to the caller:
    /// the reply decides what becomes of the connection. True when it ends
    /// waiting on the client.
    fn poll_pump<S: AsyncRead + AsyncWrite + Unpin>(
        &mut self,
        task: &mut Context<'_>,
        io: &mut S,
        buf: &mut BytesMut,
    ) -> bool {
        while !self.framing.is_done() && !self.gone {
            {
                let mut pipe = lock(&self.pipe);
                if pipe.dropped {
                    self.gone = true;
                    return false;
                }
                if pipe.frame.is_some() || !pipe.wanted {
                    wait_on(&mut pipe.writer, task);
                    return false;
                }
            }
            let frame = if self.continue_left.is_empty() {
                match self.framing.poll_frame(task, io, buf) {
                    Poll::Pending => return true,
                    Poll::Ready(frame) => frame,
                }
            } else {
                match Pin::new(&mut *io).poll_write(task, self.continue_left) {
                    Poll::Pending => return true,
                    Poll::Ready(Ok(n)) if n > 0 => {
                        self.continue_left = &self.continue_left[n..];
                        continue;
                    }
                    Poll::Ready(Ok(_)) => Err(io::ErrorKind::WriteZero.into()),
                    Poll::Ready(Err(e)) => Err(e),
                }
            };
            let mut pipe = lock(&self.pipe);
            match frame {
                Ok(frame) => {
                    // A last frame ends the body at once: the service need not ask
                    // again to learn it.
                    pipe.frame = frame.map(Ok);
                    pipe.ended = self.framing.is_done();
                }
                Err(e) => {
                    pipe.frame = Some(Err(e));
                    pipe.ended = true;
                    self.gone = true;
                    self.failed = true;
                }
            }
            pipe.wanted = false;
            self.delivered += 1;
            if let Some(reader) = pipe.reader.take() {
                reader.wake();
            }
        }
        false
    }

    /// Ends the body in an error for whoever reads it; nothing more is read.
    fn fail(&mut self, e: io::Error) {
        self.gone = true;
        self.failed = true;
        let mut pipe = lock(&self.pipe);
        if !pipe.ended {
            pipe.ended = true;
            // In place of any frame still waiting: after a frame, the end would
            // pass the body off as whole.
            pipe.frame = Some(Err(e));
            if let Some(reader) = pipe.reader.take() {
                reader.wake();
            }
        }
    }

    /// Reads and drops what is left of a body nobody read to its end (a
    /// request refused before its upload), so that the connection can serve
    /// its next request, as NGINX discards such bodies. False when that cannot
    /// be: the body failed, something still reads it, its client was never
    /// invited to send it (a 100 Continue still owed), or more than `budget`
    /// bytes of it are left.
    fn poll_drain<S: AsyncRead + Unpin>(
        &mut self,
        task: &mut Context<'_>,
        io: &mut S,
        buf: &mut BytesMut,
        budget: &mut u64,
    ) -> Poll<bool> {
        // A reader still holding the body (an HTTP/2 backend's stream) is owed its frames.
        if self.failed || !self.continue_left.is_empty() || !lock(&self.pipe).dropped {
            return Poll::Ready(false);
        }
        loop {
            if matches!(self.framing, BodyFraming::Length(left) if left > *budget) {
                return Poll::Ready(false);
            }
            match ready!(self.framing.poll_frame(task, io, buf)) {
                Ok(None) => return Poll::Ready(true),
                Ok(Some(frame)) => {
                    let n = frame.data_ref().map_or(0, |d| d.len() as u64);
                    let Some(left) = budget.checked_sub(n) else {
                        return Poll::Ready(false);
                    };
                    *budget = left;
                }
                Err(_) => return Poll::Ready(false),
            }
        }
    }
}

impl Drop for Inbound {
    /// A body the connection stops reading (its reply is out, or the
    /// connection failed) ends in an error for whoever still reads it: an
    /// HTTP/2 backend's stream, read in another task, would otherwise wait on
    /// it for good.
    fn drop(&mut self) {
        if !self.framing.is_done() {
            self.fail(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "the client's connection stopped before its body ended",
            ));
        }
    }
}

/// Field lines a service has already encoded (`name: value\r\n` each), in a
/// reply's extensions: written after the reply's own fields, as they are, so
/// that a reply made from stored fields is not copied into a map to be
/// encoded again. They must not hold the fields this module reads or writes
/// for framing (`Content-Length`, `Transfer-Encoding`, `Connection`), which
/// stay in the map; `dated`: they hold a `Date`. HTTP/2 replies (hyper's)
/// do not read them.
#[derive(Clone, Debug, Default)]
pub struct EncodedFields {
    /// Written in order: a reply's own lines, then those it shares (stored ones).
    pub lines: [Bytes; 2],
    pub dated: bool,
}

/// A reply's body, which may carry fields of its head already encoded
/// (`EncodedFields`): carried by the body rather than the reply's extensions,
/// whose map would be made and dropped for every reply.
pub trait ReplyBody: Body<Data = Bytes> + Default + Send + Unpin {
    fn encoded_fields(&self) -> Option<&EncodedFields> {
        None
    }
}

/// A request body as the service sees it: frames read from the client's
/// connection as they are asked for.
#[derive(Debug)]
pub struct RequestBody {
    pipe: Option<Arc<Mutex<Pipe>>>,
    /// Its Content-Length, when it has one.
    size: Option<u64>,
}

impl RequestBody {
    /// A request without a body.
    pub fn empty() -> Self {
        RequestBody {
            pipe: None,
            size: None,
        }
    }

    fn new(pipe: Arc<Mutex<Pipe>>, size: Option<u64>) -> Self {
        RequestBody {
            pipe: Some(pipe),
            size,
        }
    }
}

impl Body for RequestBody {
    type Data = Bytes;
    type Error = io::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        task: &mut Context<'_>,
    ) -> Poll<Option<io::Result<Frame<Bytes>>>> {
        let Some(pipe) = &self.pipe else {
            return Poll::Ready(None);
        };
        let mut pipe = lock(pipe);
        if let Some(frame) = pipe.frame.take() {
            return Poll::Ready(Some(frame));
        }
        if pipe.ended {
            return Poll::Ready(None);
        }
        pipe.wanted = true;
        wait_on(&mut pipe.reader, task);
        if let Some(writer) = pipe.writer.take() {
            writer.wake();
        }
        Poll::Pending
    }

    fn is_end_stream(&self) -> bool {
        self.pipe.is_none()
    }

    fn size_hint(&self) -> SizeHint {
        match (&self.pipe, self.size) {
            (None, _) => SizeHint::with_exact(0),
            (Some(_), Some(n)) => SizeHint::with_exact(n),
            (Some(_), None) => SizeHint::default(),
        }
    }
}

impl Drop for RequestBody {
    fn drop(&mut self) {
        if let Some(pipe) = &self.pipe {
            let mut pipe = lock(pipe);
            pipe.dropped = true;
            if let Some(writer) = pipe.writer.take() {
                writer.wake();
            }
        }
    }
}

/// How a reply's body is framed on the wire.
#[derive(Clone, Copy, Debug, PartialEq)]
enum ReplyFraming {
    /// No body: HEAD, 1xx, 204, 304.
    None,
    Length(u64),
    Chunked,
    /// Until the connection closes (an HTTP/1.0 client, a body of unknown length).
    UntilClose,
}

/// The reply's status line and fields, and how its body goes out. Adds
/// `Date` when missing, the framing field the body needs, and `Connection`
/// when the connection's fate differs from the version's default; a body
/// that can only end with the connection clears `keep_alive`.
fn encode_reply_head(
    parts: &http::response::Parts,
    version: Version,
    head_only: bool,
    body: &impl ReplyBody,
    keep_alive: &mut bool,
) -> (BytesMut, ReplyFraming) {
    let status = parts.status;
    let mut add_length = None;
    let framing = if head_only
        || status.is_informational()
        || status == StatusCode::NO_CONTENT
        || status == StatusCode::NOT_MODIFIED
    {
        ReplyFraming::None
    } else if let Some(value) = parts.headers.get(CONTENT_LENGTH) {
        // A backend's length, checked when its head was read; a body that
        // breaks it fails the reply rather than misframe the connection.
        match std::str::from_utf8(value.as_bytes())
            .ok()
            .and_then(|v| v.parse().ok())
        {
            Some(n) => ReplyFraming::Length(n),
            None => ReplyFraming::UntilClose,
        }
    } else if let Some(n) = body.size_hint().exact() {
        add_length = Some(n);
        ReplyFraming::Length(n)
    } else if version == Version::HTTP_11 {
        ReplyFraming::Chunked
    } else {
        ReplyFraming::UntilClose
    };
    if framing == ReplyFraming::UntilClose {
        *keep_alive = false;
    }
    // Room for the fields without a pass over them to measure, and for a
    // small body, which is gathered into the same write.
    let small_body = match framing {
        ReplyFraming::Length(n) if n as usize <= super::GATHER => n as usize,
        _ => 0,
    };
    let encoded = body.encoded_fields();
    let encoded_len = encoded.map_or(0, |e| e.lines[0].len() + e.lines[1].len());
    let mut head =
        BytesMut::with_capacity(256 + 64 * parts.headers.len() + encoded_len + small_body);
    if status == StatusCode::OK {
        head.extend_from_slice(b"HTTP/1.1 200 OK\r\n");
    } else {
        head.extend_from_slice(b"HTTP/1.1 ");
        head.extend_from_slice(status.as_str().as_bytes());
        head.extend_from_slice(b" ");
        head.extend_from_slice(status.canonical_reason().unwrap_or("").as_bytes());
        head.extend_from_slice(b"\r\n");
    }
    let mut dated = false;
    for (name, value) in &parts.headers {
        dated |= name == DATE;
        head.extend_from_slice(name.as_str().as_bytes());
        head.extend_from_slice(b": ");
        head.extend_from_slice(value.as_bytes());
        head.extend_from_slice(b"\r\n");
    }
    if let Some(e) = encoded {
        head.extend_from_slice(&e.lines[0]);
        head.extend_from_slice(&e.lines[1]);
        dated |= e.dated;
    }
    if !dated {
        head.extend_from_slice(b"date: ");
        date::push(&mut head);
        head.extend_from_slice(b"\r\n");
    }
    if let Some(n) = add_length {
        head.extend_from_slice(b"content-length: ");
        head.extend_from_slice(itoa::Buffer::new().format(n).as_bytes());
        head.extend_from_slice(b"\r\n");
    }
    if framing == ReplyFraming::Chunked {
        head.extend_from_slice(b"transfer-encoding: chunked\r\n");
    }
    if status != StatusCode::SWITCHING_PROTOCOLS {
        match (version, *keep_alive) {
            (Version::HTTP_11, false) => head.extend_from_slice(b"connection: close\r\n"),
            (Version::HTTP_10, true) => head.extend_from_slice(b"connection: keep-alive\r\n"),
            _ => {}
        }
    }
    head.extend_from_slice(b"\r\n");
    (head, framing)
}

/// A reply bascule owes before closing a connection whose request it could not
/// read, and the length of its body.
fn refusal(status: StatusCode, why: &str) -> (BytesMut, usize) {
    let reason = status.canonical_reason().unwrap_or("");
    let body = format!("{} {reason}: {why}\n", status.as_str());
    let mut reply = BytesMut::from(
        format!(
            "HTTP/1.1 {} {reason}\r\ncontent-type: text/plain; charset=utf-8\r\ncontent-length: {}\r\nconnection: close\r\ndate: ",
            status.as_str(),
            body.len()
        )
        .as_bytes(),
    );
    date::push(&mut reply);
    reply.extend_from_slice(b"\r\n\r\n");
    reply.extend_from_slice(body.as_bytes());
    (reply, body.len())
}

/// The `Date` field's value, formatted once a second per thread.
mod date {
    use std::cell::RefCell;
    use std::time::{SystemTime, UNIX_EPOCH};

    use bytes::BytesMut;

    thread_local! {
        static CACHED: RefCell<(u64, String)> = const { RefCell::new((0, String::new())) };
    }

    pub fn push(out: &mut BytesMut) {
        let now = SystemTime::now();
        let second = now.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
        CACHED.with_borrow_mut(|(at, text)| {
            if *at != second || text.is_empty() {
                *at = second;
                *text = httpdate::fmt_http_date(now);
            }
            out.extend_from_slice(text.as_bytes());
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn parses_or_refuses(bytes: &[u8]) -> Result<(), TestCaseError> {
        check_request_head(bytes).map_err(TestCaseError::fail)
    }

    /// A request head from plausible pieces, some of them broken.
    fn head() -> impl Strategy<Value = Vec<u8>> {
        let method = prop::sample::select(vec!["GET", "POST", "HEAD", "PUT", "G\tT", ""]);
        let target = prop::sample::select(vec!["/", "/a?b=c", "http://h/x", "*", "/\u{7f}", ""]);
        let version = prop::sample::select(vec!["HTTP/1.1", "HTTP/1.0", "HTTP/2.0", "HTTP/1.", ""]);
        let name = prop::sample::select(vec![
            "Host",
            "Content-Length",
            "Transfer-Encoding",
            "Connection",
            "Expect",
            "TE",
            "Upgrade",
            "X-A",
            "Bad Name",
            "",
        ]);
        let value = prop::sample::select(vec![
            "x",
            "5",
            "0",
            "-1",
            "1, 1",
            "1, 2",
            "chunked",
            "gzip, chunked",
            "gzip",
            "close",
            "keep-alive, x",
            "100-continue",
            "trailers",
            "\u{1}",
            "",
        ]);
        let fields = prop::collection::vec((name, value), 0..8);
        let tail = prop::collection::vec(any::<u8>(), 0..16);
        (method, target, version, fields, any::<bool>(), tail).prop_map(
            |(method, target, version, fields, ended, tail)| {
                let mut text = format!("{method} {target} {version}\r\n").into_bytes();
                for (name, value) in fields {
                    text.extend_from_slice(format!("{name}: {value}\r\n").as_bytes());
                }
                if ended {
                    text.extend_from_slice(b"\r\n");
                }
                text.extend_from_slice(&tail);
                text
            },
        )
    }

    proptest! {
        #[test]
        fn any_bytes_parse_wait_or_are_refused(bytes in prop::collection::vec(any::<u8>(), 0..512)) {
            parses_or_refuses(&bytes)?;
        }

        #[test]
        fn plausible_heads_parse_wait_or_are_refused(bytes in head()) {
            parses_or_refuses(&bytes)?;
            // However the head is cut, a prefix waits or is refused: never a different request.
            for cut in [1, bytes.len() / 2] {
                if cut < bytes.len() {
                    parses_or_refuses(&bytes[..cut])?;
                }
            }
        }
    }
}
