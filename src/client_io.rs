//! A client connection's socket, wrapped to enforce the keep-alive and header-read timeouts.
//!
//! hyper's own `header_read_timeout` starts when it begins waiting for the next
//! request, so it would also cut idle keep-alive connections at the header
//! deadline. Here the two are kept apart, as NGINX does:
//! - idle (no request in progress, no byte received since): closed after `keepalive`;
//! - a request head started (bytes arrived while idle): it must complete within `header_read`.
//!
//! The proxy marks a request in progress with `Activity::begin`; the returned
//! guard rides with the response body, so "idle" starts when the response ends.
//!
//! Parking (HTTP/1 connections, plain or TLS; see `server.rs`): an idle
//! connection should hold no buffers while it waits for its next request, but
//! hyper keeps its read and write buffers for a connection's whole life. So,
//! when hyper asks for the next request and none has begun to arrive, and
//! everything written has been flushed, the wrapper answers end-of-file: hyper
//! ends the connection cleanly (without shutting the socket down, which is
//! skipped while parked) and hands the socket back. The server then waits for
//! readability with nothing but the socket (and, over TLS, the session), and
//! starts a new hyper connection on it when bytes arrive. Bytes hyper had read
//! but not used come back as `prefix` and are read first.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::{Instant, Sleep};

/// Requests in progress on one client connection (HTTP/2 may have many).
#[derive(Debug, Default)]
pub struct Activity {
    active: AtomicU32,
    /// Bumped by every request start, so the reader notices that a head was parsed.
    started: AtomicU32,
}

impl Activity {
    pub fn begin(self: &Arc<Self>) -> Busy {
        self.active.fetch_add(1, Ordering::Relaxed);
        self.started.fetch_add(1, Ordering::Relaxed);
        Busy(self.clone())
    }

    pub fn is_idle(&self) -> bool {
        self.active.load(Ordering::Relaxed) == 0
    }
}

/// One request in progress; dropping it ends the request.
#[derive(Debug)]
pub struct Busy(Arc<Activity>);

impl Drop for Busy {
    fn drop(&mut self) {
        self.0.active.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A connection idle this long is parked. Under load the next request comes
/// sooner, and the connection keeps its hyper state instead of rebuilding it per request.
const PARK_AFTER: Duration = Duration::from_millis(5);

#[derive(Clone, Copy, Debug)]
pub struct Timeouts {
    pub keepalive: Duration,
    pub header_read: Duration,
}

pin_project_lite::pin_project! {
    pub struct ClientIo<S> {
        #[pin]
        inner: S,
        activity: Arc<Activity>,
        timeouts: Timeouts,
        // Boxed so that the wrapper is Unpin, as hyper's connection wants its IO.
        timer: Pin<Box<Sleep>>,
        // The deadline the timer is set to, when armed.
        armed: Option<Instant>,
        idle_since: Instant,
        head_started: Option<Instant>,
        seen_started: u32,
        // Set by the first bytes: None before them. HTTP/2 frames arrive on idle
        // connections (WINDOW_UPDATE, PING), so the header deadline is for HTTP/1 only.
        http2: Option<bool>,
        // Parking, when enabled: see the module docs.
        park: bool,
        parked: bool,
        // Written since the last completed flush: no parking before the reply is out.
        unflushed: bool,
        prefix: Bytes,
    }
}

impl<S> ClientIo<S> {
    pub fn new(inner: S, activity: Arc<Activity>, timeouts: Timeouts) -> Self {
        let now = Instant::now();
        ClientIo {
            inner,
            activity,
            timeouts,
            timer: Box::pin(tokio::time::sleep_until(now + timeouts.keepalive)),
            armed: None,
            idle_since: now,
            head_started: None,
            seen_started: 0,
            http2: None,
            park: false,
            parked: false,
            unflushed: false,
            prefix: Bytes::new(),
        }
    }

    /// Hands the connection back when it goes idle (HTTP/1 only). It starts
    /// parked: nothing is built for it before its first bytes arrive.
    pub fn parking(mut self) -> Self {
        self.park = true;
        self.parked = true;
        self
    }

    /// Whether the end of the last hyper connection was this wrapper parking it.
    pub fn is_parked(&self) -> bool {
        self.parked
    }

    /// When a parked connection's keep-alive timeout runs out.
    pub fn keepalive_deadline(&self) -> Instant {
        self.idle_since + self.timeouts.keepalive
    }

    /// Ready to serve again; `prefix` (what the last connection read but did not use) comes first.
    pub fn unpark(&mut self, prefix: Bytes) {
        self.parked = false;
        self.armed = None;
        self.prefix = prefix;
    }

    /// For a connection found to speak HTTP/2: it is never parked.
    pub fn without_parking(mut self) -> Self {
        self.park = false;
        self
    }

    pub fn activity(&self) -> &Arc<Activity> {
        &self.activity
    }
}

impl<S: AsyncRead + Unpin> ClientIo<S> {
    /// Waits, parked, for the next request's first bytes (or the end of the
    /// connection), reads what has arrived, and unparks; fails at the keep-alive
    /// deadline. Ready(true) when those are the first bytes of the connection and
    /// begin HTTP/2's connection preface (HTTP/2 without TLS, with prior knowledge).
    ///
    /// The bytes are read here, not peeked at and left for hyper: one system
    /// call, not two, for each connection and each return from parking.
    pub fn poll_unpark(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<bool>> {
        let mut storage = [std::mem::MaybeUninit::<u8>::uninit(); UNPARK_READ];
        let mut read = ReadBuf::uninit(&mut storage);
        if let Poll::Ready(r) = Pin::new(&mut self.inner).poll_read(cx, &mut read) {
            r?;
            let got = read.filled();
            note_arrival(&mut self.http2, &mut self.head_started, true, got);
            let h2c = self.http2 == Some(true);
            self.unpark(Bytes::copy_from_slice(got));
            return Poll::Ready(Ok(h2c));
        }
        let deadline = self.keepalive_deadline();
        if self.armed != Some(deadline) {
            self.timer.as_mut().reset(deadline);
            self.armed = Some(deadline);
        }
        ready!(self.timer.as_mut().poll(cx));
        Poll::Ready(Err(io::ErrorKind::TimedOut.into()))
    }
}

/// What a parked connection reads before hyper takes over: a usual request head
/// fits; hyper reads the rest of a longer one.
const UNPARK_READ: usize = 4096;

/// The first bytes of HTTP/2's connection preface.
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0";

/// Bytes have arrived: the first ones tell HTTP/2 from HTTP/1, and on an idle
/// HTTP/1 connection they start a request head and its deadline.
fn note_arrival(
    http2: &mut Option<bool>,
    head_started: &mut Option<Instant>,
    idle: bool,
    got: &[u8],
) {
    if got.is_empty() {
        return;
    }
    let http2 = *http2.get_or_insert_with(|| {
        // A preface cut short counts from "PRI" on, which no HTTP/1 method begins
        // with; one or two bytes ("P", "PR") could be POST or PUT as well.
        let n = got.len().min(H2_PREFACE.len());
        n >= 3 && got[..n] == H2_PREFACE[..n]
    });
    if idle && !http2 && head_started.is_none() {
        *head_started = Some(Instant::now());
    }
}

impl<S: AsyncRead> AsyncRead for ClientIo<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.project();
        let started = this.activity.started.load(Ordering::Relaxed);
        let idle = this.activity.is_idle();
        if started != *this.seen_started {
            // A request began since we last looked: its head is complete.
            *this.seen_started = started;
            *this.head_started = None;
            *this.armed = None;
        }
        if !this.prefix.is_empty() {
            let n = this.prefix.len().min(buf.remaining());
            buf.put_slice(&this.prefix[..n]);
            // Emptied, it is dropped: an empty slice would still hold its allocation.
            if n == this.prefix.len() {
                *this.prefix = Bytes::new();
            } else {
                bytes::Buf::advance(this.prefix, n);
            }
            return Poll::Ready(Ok(()));
        }
        let before = buf.filled().len();
        match this.inner.poll_read(cx, buf) {
            Poll::Ready(r) => {
                note_arrival(this.http2, this.head_started, idle, &buf.filled()[before..]);
                return Poll::Ready(r);
            }
            Poll::Pending if !idle => {
                *this.armed = None;
                return Poll::Pending;
            }
            Poll::Pending => {}
        }
        if this.armed.is_none() {
            // First wait since the connection opened or a request ended: the idle clock starts now.
            *this.idle_since = Instant::now();
        }
        let parkable = *this.park && this.head_started.is_none();
        loop {
            let deadline = match *this.head_started {
                Some(t) => t + this.timeouts.header_read,
                None if parkable => {
                    let park_at = this.armed.map_or(*this.idle_since + PARK_AFTER, |a| a);
                    park_at.min(*this.idle_since + this.timeouts.keepalive)
                }
                None => *this.idle_since + this.timeouts.keepalive,
            };
            if *this.armed != Some(deadline) {
                this.timer.as_mut().reset(deadline);
                *this.armed = Some(deadline);
            }
            ready!(this.timer.as_mut().poll(cx));
            if !parkable {
                break;
            }
            if !*this.unflushed {
                *this.parked = true;
                return Poll::Ready(Ok(())); // end of file: see the module docs
            }
            // The reply is still going out: look again a little later.
            let again = Instant::now() + PARK_AFTER;
            this.timer.as_mut().reset(again);
            *this.armed = Some(again);
        }
        let what = if this.head_started.is_some() {
            "the request head did not arrive in time"
        } else {
            "idle keep-alive connection timed out"
        };
        Poll::Ready(Err(io::Error::new(io::ErrorKind::TimedOut, what)))
    }
}

impl<S: AsyncWrite> AsyncWrite for ClientIo<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.project();
        *this.unflushed = true;
        this.inner.poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.project();
        *this.unflushed = true;
        this.inner.poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.project();
        let flushed = ready!(this.inner.poll_flush(cx));
        if flushed.is_ok() {
            // hyper flushes the socket only once its own buffer is written out.
            *this.unflushed = false;
        }
        Poll::Ready(flushed)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if self.parked {
            return Poll::Ready(Ok(())); // the socket lives on
        }
        self.project().inner.poll_shutdown(cx)
    }
}
