//! An HTTP/2 client connection's socket, wrapped to close it once it has been
//! idle (no stream in progress) for the keep-alive timeout.
//!
//! hyper's HTTP/2 server has no idle timeout of its own, and frames arrive on
//! idle connections (WINDOW_UPDATE, PING), so "idle" cannot be read off the
//! socket: the proxy marks each request in progress with `Activity::begin`,
//! and the returned guard rides with the response body, so that "idle" starts
//! when the last response ends. HTTP/1 connections keep their own time
//! (`http1/serve.rs`).

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use bytes::{Buf, Bytes};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::{Instant, Sleep};

/// Requests in progress on one client connection (HTTP/2 may have many).
#[derive(Debug, Default)]
pub struct Activity {
    active: AtomicU32,
    /// Of those, the ones waiting in an upstream's queue: an HTTP/1
    /// connection watches its socket meanwhile, to notice a client that
    /// leaves (HTTP/2 tells of it by resetting the stream).
    waiting: AtomicU32,
}

impl Activity {
    /// Marks a request of this connection as waiting, until the guard drops.
    /// An HTTP/1 connection looks at the mark each time it polls its request,
    /// before the request's own future: so this yields once, and the next
    /// poll, at once, starts the watch.
    pub async fn mark_waiting(self: &Arc<Self>) -> Waiting {
        self.waiting.fetch_add(1, Ordering::Relaxed);
        let waiting = Waiting(self.clone());
        tokio::task::yield_now().await;
        waiting
    }

    pub fn is_waiting(&self) -> bool {
        self.waiting.load(Ordering::Relaxed) > 0
    }

    pub fn begin(self: &Arc<Self>) -> Busy {
        self.active.fetch_add(1, Ordering::Relaxed);
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

/// A request waiting in a queue; dropping it ends the wait.
#[derive(Debug)]
pub struct Waiting(Arc<Activity>);

impl Drop for Waiting {
    fn drop(&mut self) {
        self.0.waiting.fetch_sub(1, Ordering::Relaxed);
    }
}

pin_project_lite::pin_project! {
    pub struct ClientIo<S> {
        #[pin]
        inner: S,
        activity: Arc<Activity>,
        keepalive: Duration,
        // Boxed so that the wrapper is Unpin, as hyper's connection wants its IO.
        timer: Pin<Box<Sleep>>,
        // The deadline the timer is set to, when armed.
        armed: Option<Instant>,
        // Bytes read before hyper took the connection, served first.
        prefix: Bytes,
    }
}

impl<S> ClientIo<S> {
    pub fn new(inner: S, activity: Arc<Activity>, keepalive: Duration) -> Self {
        ClientIo {
            inner,
            activity,
            keepalive,
            timer: Box::pin(tokio::time::sleep(keepalive)),
            armed: None,
            prefix: Bytes::new(),
        }
    }

    /// `prefix` (what was read to tell HTTP/2 from HTTP/1) is read first.
    pub fn with_prefix(mut self, prefix: Bytes) -> Self {
        self.prefix = prefix;
        self
    }

    pub fn activity(&self) -> &Arc<Activity> {
        &self.activity
    }
}

impl<S: AsyncRead> AsyncRead for ClientIo<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.project();
        if !this.prefix.is_empty() {
            let n = this.prefix.len().min(buf.remaining());
            buf.put_slice(&this.prefix[..n]);
            this.prefix.advance(n);
            return Poll::Ready(Ok(()));
        }
        if let Poll::Ready(r) = this.inner.poll_read(cx, buf) {
            return Poll::Ready(r);
        }
        if !this.activity.is_idle() {
            *this.armed = None;
            return Poll::Pending;
        }
        // First wait since the connection opened or its last request ended: the idle clock starts now.
        let deadline = *this
            .armed
            .get_or_insert_with(|| Instant::now() + *this.keepalive);
        if this.timer.deadline() != deadline {
            this.timer.as_mut().reset(deadline);
        }
        ready!(this.timer.as_mut().poll(cx));
        Poll::Ready(Err(io::Error::new(
            io::ErrorKind::TimedOut,
            "idle keep-alive connection timed out",
        )))
    }
}

impl<S: AsyncWrite> AsyncWrite for ClientIo<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.project().inner.poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        self.project().inner.poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.project().inner.poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.project().inner.poll_shutdown(cx)
    }
}
