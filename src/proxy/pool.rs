//! Keep-alive HTTP/1.1 connections to one backend, shared by every worker thread.
//!
//! Each connection's I/O task runs on the worker that opened it. Idle
//! connections are kept in one list per worker; a worker takes from its own
//! list first, so in the common case a request and its backend connection stay
//! on one thread, and only when its own list is empty does it borrow another
//! worker's idle connection before opening a new one. Lists are LIFO: the most
//! recently used connections stay hot and surplus ones age out after `idle`.
//!
//! A connection goes back to the pool only once its response body has been
//! read to the end (see `body.rs`); a response cut short closes it.
//!
//! A backend may close an idle keep-alive connection just as a request is sent
//! on it. If the request never left, it is sent again on another connection. If
//! it left but no answer came, it is sent again only when that is safe: an
//! idempotent method without a body, on a connection that had been idle long
//! enough for the backend to have timed it out (under load connections are idle
//! for microseconds, and the copy this takes is not made).

use std::cell::Cell;
use std::io;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, Response};
use http_body_util::{Either, Empty};
use hyper::body::Incoming;
use hyper::client::conn::http1::{self, SendRequest};
use hyper_util::rt::TokioIo;
use metrics::Counter;
use tokio::net::TcpStream;
use tokio::time::Instant;

thread_local! {
    static WORKER: Cell<usize> = const { Cell::new(0) };
}

/// Called once by each worker thread with its index, before it serves anything.
pub fn set_worker(index: usize) {
    WORKER.with(|w| w.set(index));
}

#[derive(Debug)]
pub enum SendError {
    /// No connection could take the request; it comes back unsent.
    Connect(io::Error, Box<Request<OutBody>>),
    /// The backend took the request, or part of it, and failed before answering.
    Exchange(hyper::Error),
}

/// What goes to a backend: the client's body, or nothing for a request sent again.
pub type OutBody = Either<Incoming, Empty<Bytes>>;

/// A connection idle this long may have been closed by the backend's keep-alive timeout.
const STALE_AFTER: Duration = Duration::from_millis(100);

struct Idle {
    sender: SendRequest<OutBody>,
    since: Instant,
}

pub struct Pool {
    addr: SocketAddr,
    connect_timeout: Duration,
    idle_timeout: Duration,
    idle: Box<[Mutex<Vec<Idle>>]>,
    opened: Counter,
}

impl std::fmt::Debug for Pool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pool").field("addr", &self.addr).finish()
    }
}

/// A connection lent out for one exchange. `release` gives it back; dropping it closes it.
#[derive(Debug)]
pub struct Lease {
    pool: Arc<Pool>,
    sender: SendRequest<OutBody>,
    home: usize,
}

impl Lease {
    pub fn release(self) {
        let list = &self.pool.idle[self.home];
        list.lock().unwrap_or_else(|e| e.into_inner()).push(Idle {
            sender: self.sender,
            since: Instant::now(),
        });
    }
}

impl Pool {
    pub fn new(
        addr: SocketAddr,
        workers: usize,
        connect_timeout: Duration,
        idle_timeout: Duration,
        opened: Counter,
    ) -> Self {
        Pool {
            addr,
            connect_timeout,
            idle_timeout,
            idle: (0..workers.max(1))
                .map(|_| Mutex::new(Vec::new()))
                .collect(),
            opened,
        }
    }

    pub fn settings(&self) -> (Duration, Duration) {
        (self.connect_timeout, self.idle_timeout)
    }

    fn home(&self) -> usize {
        WORKER.with(Cell::get) % self.idle.len()
    }

    /// An idle connection, this worker's own first; expired and closed ones are dropped.
    /// Also says for how long the connection had been idle.
    fn checkout(&self) -> Option<(SendRequest<OutBody>, usize, Duration)> {
        let own = self.home();
        let now = Instant::now();
        for i in (0..self.idle.len()).map(|k| (own + k) % self.idle.len()) {
            let mut list = self.idle[i].lock().unwrap_or_else(|e| e.into_inner());
            while let Some(idle) = list.pop() {
                let idle_for = now.duration_since(idle.since);
                if !idle.sender.is_closed() && idle_for < self.idle_timeout {
                    return Some((idle.sender, i, idle_for));
                }
            }
        }
        None
    }

    async fn connect(&self) -> Result<(SendRequest<OutBody>, usize), io::Error> {
        let stream =
            match tokio::time::timeout(self.connect_timeout, TcpStream::connect(self.addr)).await {
                Ok(Ok(s)) => s,
                Ok(Err(e)) => return Err(e),
                Err(_) => return Err(io::ErrorKind::TimedOut.into()),
            };
        let _ = stream.set_nodelay(true);
        let (sender, conn) = http1::Builder::new()
            .handshake(TokioIo::new(stream))
            .await
            .map_err(io::Error::other)?;
        self.opened.increment(1);
        let addr = self.addr;
        tokio::spawn(async move {
            if let Err(e) = conn.with_upgrades().await {
                tracing::debug!(backend = %addr, "backend connection ended: {e}");
            }
        });
        Ok((sender, self.home()))
    }

    /// Sends `req` on a pooled connection, or a new one. When a pooled
    /// connection fails it (module docs), it is sent again on another connection
    /// to this backend: as is, if it never left, or as a copy of `template` (or
    /// of itself, for a replayable request on a long-idle connection).
    pub async fn send(
        self: &Arc<Self>,
        mut req: Request<OutBody>,
        template: Option<&Request<OutBody>>,
    ) -> Result<(Response<Incoming>, Lease), SendError> {
        let mut own_copy = None;
        loop {
            let (mut sender, home, idle_for, reused) = match self.checkout() {
                Some((sender, home, idle_for)) => (sender, home, idle_for, true),
                None => match self.connect().await {
                    Ok((sender, home)) => (sender, home, Duration::ZERO, false),
                    Err(e) => return Err(SendError::Connect(e, Box::new(req))),
                },
            };
            if sender.ready().await.is_err() {
                if reused {
                    continue;
                }
                return Err(SendError::Connect(
                    io::ErrorKind::ConnectionReset.into(),
                    Box::new(req),
                ));
            }
            if template.is_none() && own_copy.is_none() && reused && idle_for >= STALE_AFTER {
                own_copy = replayable(&req);
            }
            match sender.try_send_request(req).await {
                Ok(resp) => {
                    return Ok((
                        resp,
                        Lease {
                            pool: self.clone(),
                            sender,
                            home,
                        },
                    ))
                }
                Err(mut e) => match e.take_message() {
                    Some(unsent) if reused => req = unsent,
                    Some(unsent) => {
                        return Err(SendError::Connect(
                            io::Error::other(e.into_error()),
                            Box::new(unsent),
                        ))
                    }
                    None => match template.or(own_copy.as_ref()) {
                        Some(t) if reused && e.error().is_incomplete_message() => {
                            req = copy_request(t)
                        }
                        _ => return Err(SendError::Exchange(e.into_error())),
                    },
                },
            }
        }
    }

    /// Closes this worker's connections that have been idle longer than the idle timeout.
    pub fn purge_idle(&self) {
        let now = Instant::now();
        let mut list = self.idle[self.home()]
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        list.retain(|idle| {
            !idle.sender.is_closed() && now.duration_since(idle.since) < self.idle_timeout
        });
    }
}

/// A copy of a request that may be sent twice: an idempotent method and no body.
pub fn replayable(req: &Request<OutBody>) -> Option<Request<OutBody>> {
    use http_body::Body;
    let idempotent = matches!(
        *req.method(),
        Method::GET | Method::HEAD | Method::OPTIONS | Method::PUT | Method::DELETE | Method::TRACE
    );
    (idempotent && req.body().is_end_stream()).then(|| copy_request(req))
}

/// The same method, target, version and headers, with no body.
pub fn copy_request(req: &Request<OutBody>) -> Request<OutBody> {
    let mut copy = Request::new(Either::Right(Empty::new()));
    *copy.method_mut() = req.method().clone();
    *copy.uri_mut() = req.uri().clone();
    *copy.version_mut() = req.version();
    *copy.headers_mut() = req.headers().clone();
    copy
}
