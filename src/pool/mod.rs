//! Keep-alive HTTP/1.1 connections to one backend, shared by every worker thread.
//!
//! Each connection's socket is registered with the event loop of the worker
//! that opened it. Idle connections are kept in one list per worker; a worker
//! takes from its own list first, so in the common case a request and its
//! backend connection stay on one thread, and only when its own list is empty
//! does it borrow another worker's idle connection before opening a new one.
//! Lists are LIFO: the most recently used connections stay hot and surplus
//! ones age out after `idle`.
//!
//! With upstream TLS, a backend that picks h2 by ALPN gets HTTP/2: one
//! connection per worker, shared by that worker's requests, instead of an idle
//! list.
//!
//! An HTTP/1.1 exchange runs in the request's own task (`h1.rs`), with no task
//! per connection. The connection goes back to the pool only once its response
//! body has been read to the end; a response cut short closes it.
//!
//! A request that finds no idle connection opens one, with at most
//! `OPENING_PER_WORKER` times the number of workers opening at once (one limit
//! for the whole pool); beyond that it waits in turn for a connection given
//! back or a turn to open one (`connect_queue.rs`), all of it within the
//! connect timeout.
//!
//! A backend may close an idle keep-alive connection just as a request is sent
//! on it. If the request never left, it is sent again on another connection. If
//! it left but no answer came, it is sent again only when that is safe: an
//! idempotent method without a body, on a connection that had been idle long
//! enough for the backend to have timed it out (under load connections are idle
//! for microseconds, and the copy this takes is not made).

mod connect_queue;
pub mod h1;

use std::cell::Cell;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, Response};
use http_body::{Body, Frame, SizeHint};
use http_body_util::{Either, Empty};
use hyper::body::Incoming;
use hyper::client::conn::http2;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use metrics::Counter;
use tokio::net::TcpStream;
use tokio::time::Instant;

use connect_queue::{ConnectQueue, Entry, Turn};
use h1::Stream;

use crate::backend_tls::{self, Connector};
use crate::failure::{Again, Attempt, Failure, ProxyError, Resend};
use crate::http1::serve::RequestBody;
use crate::http1::{BodyFailed, BoxError};

thread_local! {
    static WORKER: Cell<usize> = const { Cell::new(0) };
}

/// Called once by each worker thread with its index, before it serves anything.
pub fn set_worker(index: usize) {
    WORKER.with(|w| w.set(index));
}

/// A failed exchange, with what is left of the request (`crate::failure`).
pub type SendFailure = Failure<Request<OutBody>>;

/// A client's request body: read from an HTTP/1 connection by bascule (left),
/// or an HTTP/2 stream's from hyper (right).
pub type ClientBody = Either<RequestBody, Incoming>;

/// What goes to a backend: the client's body, or nothing for a request sent again.
pub type OutBody = Either<ClientBody, Empty<Bytes>>;

/// What comes back: an HTTP/1.1 body read in the request's task, or an HTTP/2 stream's.
pub type BackendBody = Either<h1::Body<Return>, Incoming>;

/// Idle connections beyond `max_idle` unused this long are closed. Not at once:
/// a load that comes in waves (HTTP/2 clients' batches of streams) needs its
/// connections back a moment later, and reopening them costs far more.
const SURPLUS_AFTER: Duration = Duration::from_secs(1);

/// The most times one request is sent again on another connection to the same
/// backend (a pooled connection found closed, or an HTTP/2 one that failed it).
const MAX_RESENDS: u32 = 4;

/// A connection idle this long may have been closed by the backend's keep-alive timeout.
const STALE_AFTER: Duration = Duration::from_millis(100);

/// Connections opening to one backend at once, per worker (the pool's limit is
/// this times the number of workers, shared by all of them). Measured with 640
/// HTTP/2 streams arriving together at a fresh balancer (one worker, three
/// backends): 16 opened about 300 connections and the mean reply took 25 to
/// 38 ms, 8 took 12 to 13 (49 to 83 ms with no limit, about 610 connections
/// opened). Each connect also costs the backend, and the exchanges
/// already running give their connections back within a moment. A backend
/// that closes every connection after one reply is not held back by it on
/// 127.0.0.1 (the same requests/s with 4 or no limit).
const OPENING_PER_WORKER: usize = 8;

/// A backend connection, ready for a request.
#[derive(Debug)]
enum Sender {
    Http1(h1::Conn),
    /// A clone of a worker's shared HTTP/2 connection.
    Http2(http2::SendRequest<H2Body>),
}

/// A connection for a request, and where it came from.
struct Checkout {
    sender: Sender,
    /// The worker whose idle list it goes back to.
    home: usize,
    /// Taken from the pool (or given by another request), not opened for this request.
    reused: bool,
    /// How long it had been idle.
    idle_for: Duration,
}

struct Idle {
    conn: h1::Conn,
    since: Instant,
}

/// How a backend's connections are opened and kept.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct PoolSettings {
    pub connect_timeout: Duration,
    /// An unused connection is closed after this.
    pub idle_timeout: Duration,
    /// Idle connections kept for good; more are closed once unused for
    /// `SURPLUS_AFTER`, so that a burst's surplus does not stay open (holding
    /// its buffers) until the idle timeout. Counts every worker's connections:
    /// each keeps its share.
    pub max_idle: usize,
}

pub struct Pool {
    addr: SocketAddr,
    settings: PoolSettings,
    /// Each worker's share of `settings.max_idle`.
    max_idle_per_worker: usize,
    /// HTTP/1.1 connections, one list per worker.
    idle: Box<[Mutex<Vec<Idle>>]>,
    /// Each worker's HTTP/2 connection, when the backend speaks it.
    shared: Box<[Mutex<Option<http2::SendRequest<H2Body>>>]>,
    tls: Option<Connector>,
    opened: Counter,
    /// The limit on connections opening at once, and the requests waiting for
    /// a turn or for an HTTP/1.1 connection another request gives back (with
    /// the worker it goes back to).
    opening: Arc<ConnectQueue<(h1::Conn, usize)>>,
}

impl std::fmt::Debug for Pool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pool").field("addr", &self.addr).finish()
    }
}

/// Where an HTTP/1.1 connection goes back when its exchange is over: the idle
/// list of the worker that opened it (or last borrowed it).
#[derive(Debug)]
pub struct Return {
    pool: Arc<Pool>,
    home: usize,
}

impl h1::Reuse for Return {
    fn reuse(self, conn: h1::Conn) {
        let Some((conn, _)) = self.pool.opening.offer((conn, self.home)) else {
            return;
        };
        let list = &self.pool.idle[self.home];
        list.lock().unwrap_or_else(|e| e.into_inner()).push(Idle {
            conn,
            since: Instant::now(),
        });
    }
}

impl Pool {
    pub fn new(
        addr: SocketAddr,
        workers: usize,
        settings: PoolSettings,
        tls: Option<Connector>,
        opened: Counter,
    ) -> Self {
        let workers = workers.max(1);
        Pool {
            addr,
            settings,
            max_idle_per_worker: settings.max_idle.div_ceil(workers),
            idle: (0..workers).map(|_| Mutex::new(Vec::new())).collect(),
            shared: (0..workers).map(|_| Mutex::new(None)).collect(),
            tls,
            opened,
            opening: ConnectQueue::new(OPENING_PER_WORKER * workers),
        }
    }

    pub fn settings(&self) -> PoolSettings {
        self.settings
    }

    fn home(&self) -> usize {
        WORKER.with(Cell::get) % self.idle.len()
    }

    /// This worker's HTTP/2 connection, or an idle HTTP/1.1 one, this worker's own
    /// first; expired and closed ones are dropped. Also says for how long the
    /// connection had been idle.
    fn checkout(&self) -> Option<Checkout> {
        let own = self.home();
        if self.tls.is_some() {
            let mut slot = self.shared[own].lock().unwrap_or_else(|e| e.into_inner());
            match slot.as_ref() {
                Some(h2) if !h2.is_closed() => {
                    return Some(Checkout {
                        sender: Sender::Http2(h2.clone()),
                        home: own,
                        reused: true,
                        idle_for: Duration::ZERO,
                    })
                }
                Some(_) => *slot = None,
                None => {}
            }
        }
        let now = Instant::now();
        for i in (0..self.idle.len()).map(|k| (own + k) % self.idle.len()) {
            let mut list = self.idle[i].lock().unwrap_or_else(|e| e.into_inner());
            while let Some(mut idle) = list.pop() {
                let idle_for = now.duration_since(idle.since);
                if idle_for < self.settings.idle_timeout && !idle.conn.is_closed() {
                    return Some(Checkout {
                        sender: Sender::Http1(idle.conn),
                        home: i,
                        reused: true,
                        idle_for,
                    });
                }
            }
        }
        None
    }

    /// For a request that found no idle connection: a new one, or one given
    /// back by another request if that comes first (module docs), by the
    /// connect timeout.
    async fn open(&self) -> io::Result<Checkout> {
        let deadline = Instant::now() + self.settings.connect_timeout;
        let turn = match self.opening.enter() {
            Entry::Open(turn) => turn,
            Entry::Wait(waiting) => match tokio::time::timeout_at(deadline, waiting).await {
                Ok(Ok(Turn::Conn((conn, home)))) => {
                    return Ok(Checkout {
                        sender: Sender::Http1(conn),
                        home,
                        reused: true,
                        idle_for: Duration::ZERO,
                    })
                }
                // While this request waited, connections may have gone idle
                // unseen (`ConnectQueue::offer`), or an HTTP/2 one been opened.
                Ok(Ok(Turn::Open(turn))) => match self.checkout() {
                    Some(idle) => return Ok(idle),
                    None => turn,
                },
                // `Ok(Err(_))`, the queue gone without an answer, cannot happen
                // while this pool lives; it is read as the timeout all the same.
                Ok(Err(_)) | Err(_) => return Err(io::ErrorKind::TimedOut.into()),
            },
        };
        let sender = self.connect(deadline).await;
        drop(turn);
        Ok(Checkout {
            sender: sender?,
            home: self.home(),
            reused: false,
            idle_for: Duration::ZERO,
        })
    }

    async fn connect(&self, deadline: Instant) -> io::Result<Sender> {
        let connecting = async {
            let stream = TcpStream::connect(self.addr).await?;
            let _ = stream.set_nodelay(true);
            match &self.tls {
                None => Ok(Sender::Http1(h1::Conn::new(Stream::Plain(stream)))),
                Some(tls) => {
                    let stream = tls.connect(stream).await?;
                    if backend_tls::is_h2(&stream) {
                        self.handshake_http2(stream).await
                    } else {
                        Ok(Sender::Http1(h1::Conn::new(Stream::Tls(Box::new(stream)))))
                    }
                }
            }
        };
        let sender = match tokio::time::timeout_at(deadline, connecting).await {
            Ok(r) => r?,
            Err(_) => return Err(io::ErrorKind::TimedOut.into()),
        };
        self.opened.increment(1);
        Ok(sender)
    }

    /// Opens this worker's shared HTTP/2 connection; it replaces any earlier one.
    async fn handshake_http2<S>(&self, stream: S) -> io::Result<Sender>
    where
        S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin + 'static,
    {
        let (sender, conn) = http2::Builder::new(TokioExecutor::new())
            .timer(TokioTimer::new())
            .handshake(TokioIo::new(stream))
            .await
            .map_err(io::Error::other)?;
        let addr = self.addr;
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(backend = %addr, "backend HTTP/2 connection ended: {e}");
            }
        });
        *self.shared[self.home()]
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = Some(sender.clone());
        Ok(Sender::Http2(sender))
    }

    /// Sends `req` on a pooled connection, or a new one. When a pooled
    /// connection fails it (module docs), it is sent again on another
    /// connection to this backend where the retry policy allows
    /// (`Failure::again`); `replay`: the upstream retries requests that
    /// reached a backend.
    ///
    /// Not an async fn, for the reason `h1::Conn::send` gives.
    #[allow(clippy::manual_async_fn)]
    pub fn send(
        self: &Arc<Self>,
        mut req: Request<OutBody>,
        replay: bool,
    ) -> impl std::future::Future<Output = Result<Response<BackendBody>, SendFailure>> + Send + '_
    {
        async move {
            let mut resends = 0;
            loop {
                let Checkout {
                    sender,
                    home,
                    reused,
                    idle_for,
                } = match self.checkout() {
                    Some(idle) => idle,
                    // Boxed: connecting (a TLS handshake above all) needs far more
                    // state than a pooled exchange, and every request's future would
                    // otherwise be that large, to be allocated and copied each time.
                    None => match Box::pin(self.open()).await {
                        Ok(opened) => opened,
                        Err(e) => {
                            let unsent = Resend::Unsent(Box::new(req));
                            return Err(Failure::new(ProxyError::Connect, unsent, e));
                        }
                    },
                };
                let attempt = Attempt {
                    reused,
                    stale: reused && idle_for >= STALE_AFTER,
                    replay,
                };
                let failure = match sender {
                    Sender::Http1(conn) => {
                        let back = Return {
                            pool: self.clone(),
                            home,
                        };
                        match conn.send(req, back).await {
                            Ok(resp) => return Ok(resp.map(Either::Left)),
                            Err(failure) => failure,
                        }
                    }
                    Sender::Http2(h2) => match self.send_http2(h2, req, attempt).await {
                        Ok(resp) => return Ok(resp.map(Either::Right)),
                        Err(failure) => failure,
                    },
                };
                resends += 1;
                match failure.again(attempt) {
                    // Bounded even so: a backend whose pooled connections keep
                    // failing the same way must not hold the request here.
                    Again::SameBackend if resends <= MAX_RESENDS => match failure.into_request() {
                        Some(again) => req = *again,
                        None => unreachable!("the policy resends only what came back"),
                    },
                    _ => return Err(failure),
                }
            }
        }
    }

    /// One exchange on this worker's HTTP/2 connection.
    async fn send_http2(
        &self,
        mut h2: http2::SendRequest<H2Body>,
        req: Request<OutBody>,
        attempt: Attempt,
    ) -> Result<Response<Incoming>, SendFailure> {
        if let Err(e) = h2.ready().await {
            return Err(Failure::new(
                ProxyError::Connect,
                Resend::Unsent(Box::new(req)),
                e,
            ));
        }
        // hyper keeps the request once sent: a copy, where the policy may send it again.
        let copy = if attempt.replay || attempt.stale {
            copy_replayable(&req)
        } else {
            None
        };
        let (watched, upload) = H2Body::watch(req);
        let mut e = match h2.try_send_request(watched).await {
            Ok(resp) => return Ok(resp),
            Err(e) => e,
        };
        if let Some(unsent) = e.take_message() {
            let unsent = Resend::Unsent(Box::new(unsent.map(|b| b.body)));
            return Err(Failure::new(ProxyError::Connect, unsent, e.into_error()));
        }
        if let Some(failed) = upload.failed() {
            return Err(Failure::upload(failed));
        }
        let error = if e.error().is_incomplete_message() {
            ProxyError::Closed
        } else {
            ProxyError::Broken
        };
        let resend = copy.map_or(Resend::Never, |c| Resend::Replayable(Box::new(c)));
        Err(Failure::new(error, resend, e.into_error()))
    }

    /// Closes this worker's connections that have been idle longer than the
    /// idle timeout, and its surplus beyond `max_idle` (see `SURPLUS_AFTER`).
    pub fn purge_idle(&self) {
        let now = Instant::now();
        let mut list = self.idle[self.home()]
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        list.retain_mut(|idle| {
            now.duration_since(idle.since) < self.settings.idle_timeout && !idle.conn.is_closed()
        });
        // Oldest first: connections are pushed as they come back.
        let surplus = list.len().saturating_sub(self.max_idle_per_worker);
        let unused = list[..surplus]
            .iter()
            .take_while(|idle| now.duration_since(idle.since) >= SURPLUS_AFTER)
            .count();
        list.drain(..unused);
        drop(list);
        let mut slot = self.shared[self.home()]
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if slot.as_ref().is_some_and(http2::SendRequest::is_closed) {
            *slot = None;
        }
    }
}

/// A request body on its way to an HTTP/2 backend, which keeps its own failure for the
/// request's task to see: hyper's client resets the stream when the body fails, and the error
/// the request then gets does not say it was the body (the client's doing, not the backend's).
struct H2Body {
    body: OutBody,
    failed: Arc<Mutex<Option<BoxError>>>,
}

/// Where an `H2Body`'s failure is found once the request is over.
struct UploadWatch(Arc<Mutex<Option<BoxError>>>);

impl H2Body {
    fn watch(req: Request<OutBody>) -> (Request<H2Body>, UploadWatch) {
        let failed = Arc::new(Mutex::new(None));
        let watch = UploadWatch(failed.clone());
        (req.map(|body| H2Body { body, failed }), watch)
    }
}

impl UploadWatch {
    /// The body's failure, if it failed.
    fn failed(self) -> Option<BodyFailed> {
        let mut slot = self.0.lock().unwrap_or_else(|e| e.into_inner());
        slot.take().map(BodyFailed)
    }
}

impl Body for H2Body {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match Pin::new(&mut self.body).poll_frame(cx) {
            Poll::Ready(Some(Err(e))) => {
                *self.failed.lock().unwrap_or_else(|e| e.into_inner()) = Some(e);
                Poll::Ready(Some(Err("the request body failed".into())))
            }
            other => other,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

/// Whether a request may be sent twice (with no body, which the caller checks).
pub(crate) fn is_idempotent(method: &Method) -> bool {
    matches!(
        *method,
        Method::GET | Method::HEAD | Method::OPTIONS | Method::PUT | Method::DELETE | Method::TRACE
    )
}

/// A copy of a request that may be sent twice: an idempotent method and no
/// body. The same method, target, version and headers.
fn copy_replayable(req: &Request<OutBody>) -> Option<Request<OutBody>> {
    use http_body::Body;
    if !is_idempotent(req.method()) || !req.body().is_end_stream() {
        return None;
    }
    let mut copy = Request::new(Either::Right(Empty::new()));
    *copy.method_mut() = req.method().clone();
    *copy.uri_mut() = req.uri().clone();
    *copy.version_mut() = req.version();
    *copy.headers_mut() = req.headers().clone();
    Some(copy)
}
