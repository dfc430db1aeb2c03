//! HTTP/1.1 to a backend: the request written and the response read here, in
//! the client's own task, instead of through hyper's client connection.
//!
//! Why not hyper's: its client connection runs in a task of its own, so every
//! request crosses to that task and back through two channels, and its
//! dispatcher and codec are general where a proxy needs little. With this
//! module a keep-alive request took 25 400 user-space instructions instead of
//! 32 700 (callgrind, `bench/profile.py instructions keepalive`).
//!
//! What it implements of RFC 9112 is what a proxy needs: the request head as
//! the proxy built it, the body passed through (with its `Content-Length`, or
//! chunked when its length is unknown), interim 1xx responses skipped, the
//! response body framed by the request method, status, `Transfer-Encoding` and
//! `Content-Length` (in that order), or by the connection's end, and 101
//! handing the connection over for a tunnel.
//!
//! A connection is reused only when both messages were complete and the
//! response allowed it; a body the client stops reading closes it.

use std::future::Future;
use std::io;
use std::mem::MaybeUninit;
use std::pin::Pin;
use std::task::{ready, Context, Poll, Waker};

use bytes::{Bytes, BytesMut};
use http::header::{HeaderMap, CONTENT_LENGTH};
use http::{Method, Request, Response, StatusCode, Version};
use http_body::{Body as _, Frame, SizeHint};
use http_body_util::{Either, Empty};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;

use super::{is_idempotent, OutBody, SendFailure};
use crate::failure::{Failure, ProxyError, Resend};
use crate::http1::{
    keeps_alive, BodyFailed, BodyFields, BodyFraming as Framing, Chunked, ConnectionTokens,
    FieldSpans, Fields, Outgoing, MAX_HEADERS, READ_CHUNK,
};

/// The largest response head accepted; a larger one fails the exchange (502).
const MAX_HEAD: usize = 64 * 1024;

/// A backend connection's socket, plain or TLS.
#[derive(Debug)]
pub enum Stream {
    Plain(TcpStream),
    Tls(Box<TlsStream<TcpStream>>),
}

impl Stream {
    fn tcp(&self) -> &TcpStream {
        match self {
            Stream::Plain(s) => s,
            Stream::Tls(s) => s.get_ref().0,
        }
    }
}

impl AsyncRead for Stream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Stream::Tls(s) => Pin::new(s).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Stream {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, b: &[u8]) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_write(cx, b),
            Stream::Tls(s) => Pin::new(s).poll_write(cx, b),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_flush(cx),
            Stream::Tls(s) => Pin::new(s).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Stream::Tls(s) => Pin::new(s).poll_shutdown(cx),
        }
    }
}

/// An open HTTP/1.1 connection to a backend, between exchanges.
#[derive(Debug)]
pub struct Conn {
    io: Stream,
    /// Bytes read and not yet used; empty between exchanges.
    buf: BytesMut,
}

/// Gives a connection back for another exchange.
pub trait Reuse: Send + Unpin + 'static {
    fn reuse(self, conn: Conn);
}

impl Conn {
    pub fn new(io: Stream) -> Conn {
        Conn {
            io,
            buf: BytesMut::new(),
        }
    }

    /// Whether an idle connection can no longer be used: the backend closed
    /// it, or sent something nobody asked for. Costs a system call only when
    /// the socket reports readable, which an idle healthy connection does not.
    pub fn is_closed(&mut self) -> bool {
        let mut cx = Context::from_waker(Waker::noop());
        if self.io.tcp().poll_read_ready(&mut cx).is_pending() {
            return false;
        }
        // Readable may also be stale (the last read filled the buffer): look.
        let mut byte = [0u8; 1];
        let mut probe = ReadBuf::new(&mut byte);
        Pin::new(&mut self.io)
            .poll_read(&mut cx, &mut probe)
            .is_ready()
    }

    /// Sends `req` and reads the response head; the body is read as the
    /// returned response's body is polled, and the connection is handed to
    /// `reuse` once both messages are complete.
    ///
    /// Not an async fn: an async block keeps its captures in place, where an
    /// async fn would also keep a moved-from copy of the request, in a future
    /// made, and moved, for every request.
    #[allow(clippy::manual_async_fn)]
    pub fn send<R: Reuse>(
        mut self,
        req: Request<OutBody>,
        reuse: R,
    ) -> impl Future<Output = Result<Response<Body<R>>, SendFailure>> + Send {
        async move {
            let head_only = req.method() == Method::HEAD;
            let chunked =
                !req.body().is_end_stream() && !req.headers().contains_key(CONTENT_LENGTH);
            let head = encode_head(&req, chunked);
            let written =
                match std::future::poll_fn(|cx| Pin::new(&mut self.io).poll_write(cx, &head)).await
                {
                    Ok(0) => return Err(unsent(io::ErrorKind::WriteZero.into(), req)),
                    Ok(n) => n,
                    Err(e) => return Err(unsent(e, req)),
                };
            let (parts, body) = req.into_parts();
            let bodyless = body.is_end_stream();
            let mut upload = Outgoing::new(
                BytesMut::from(&head[written..]),
                (!bodyless).then_some(body),
                chunked,
                None,
            );
            let mut got_any = false;
            // Set when writing the upload failed: the backend stopped reading.
            let mut cut_off: Option<io::Error> = None;
            let parsed = std::future::poll_fn(|cx| {
                // The request body goes out while the response is awaited: a backend
                // may answer (and stop reading) before the upload is over.
                if cut_off.is_none() {
                    if let Poll::Ready(Err(e)) = upload.poll_send(cx, &mut self.io) {
                        if BodyFailed::of(&e).is_some() {
                            return Poll::Ready(Err(e));
                        }
                        // A backend that refuses an upload answers and closes (a 413):
                        // its answer may be waiting to be read, and is the one to pass on.
                        cut_off = Some(e);
                    }
                }
                match self.poll_head(cx, &mut got_any) {
                    Poll::Ready(Err(e)) => Poll::Ready(Err(cut_off.take().unwrap_or(e))),
                    polled => polled,
                }
            })
            .await
            .and_then(|head| Ok((framing(head_only, head.status, &head.body)?, head)));
            let (framing, parsed) = match parsed {
                Ok(parsed) => parsed,
                Err(e) if BodyFailed::of(&e).is_some() => {
                    let failed = e.into_inner().and_then(|inner| inner.downcast().ok());
                    let failed = failed.unwrap_or_else(|| Box::new(BodyFailed("upload".into())));
                    return Err(Failure::upload(*failed));
                }
                Err(e) => {
                    // With no body, nothing of the request is lost: it may be replayed.
                    let resend = if bodyless && is_idempotent(&parts.method) {
                        let again = Request::from_parts(parts, Either::Right(Empty::new()));
                        Resend::Replayable(Box::new(again))
                    } else {
                        Resend::Never
                    };
                    let error = if got_any {
                        ProxyError::Broken
                    } else {
                        ProxyError::Closed
                    };
                    return Err(Failure::new(error, resend, e));
                }
            };
            drop(parts);
            let upload_done = upload.is_done();
            drop(upload);

            let mut resp = Response::new(());
            *resp.status_mut() = parsed.status;
            *resp.version_mut() = parsed.version;
            *resp.headers_mut() = parsed.headers;
            let keep_alive = upload_done
                && !matches!(framing, Framing::UntilClose | Framing::Upgrade)
                && keeps_alive(parsed.version, parsed.connection);
            let mut body = Body {
                conn: Some(self),
                framing,
                keep_alive,
                reuse: Some(reuse),
            };
            if matches!(body.framing, Framing::Done) {
                // Nothing to read (HEAD, 204, 304, a zero length): free for the next request now.
                body.finish();
            }
            Ok(resp.map(|()| body))
        }
    }

    /// Reads until a final (not 1xx, except 101) response head is complete.
    fn poll_head(&mut self, cx: &mut Context<'_>, got_any: &mut bool) -> Poll<io::Result<Head>> {
        loop {
            if !self.buf.is_empty() {
                *got_any = true;
                if let Some(head) = parse_head(&mut self.buf)? {
                    if head.status.is_informational()
                        && head.status != StatusCode::SWITCHING_PROTOCOLS
                    {
                        continue;
                    }
                    return Poll::Ready(Ok(head));
                }
                if self.buf.len() > MAX_HEAD {
                    return Poll::Ready(Err(io::Error::other("response head too large")));
                }
            }
            if ready!(self.poll_fill(cx, READ_CHUNK))? == 0 {
                return Poll::Ready(Err(io::ErrorKind::UnexpectedEof.into()));
            }
        }
    }

    /// Reads once into the buffer, making room for `want` bytes; 0 is the end.
    fn poll_fill(&mut self, cx: &mut Context<'_>, want: usize) -> Poll<io::Result<usize>> {
        self.buf.reserve(want);
        tokio_util::io::poll_read_buf(Pin::new(&mut self.io), cx, &mut self.buf)
    }
}

/// A request not a byte of which was written.
fn unsent(e: io::Error, req: Request<OutBody>) -> SendFailure {
    Failure::new(ProxyError::Connect, Resend::Unsent(Box::new(req)), e)
}

/// The request line and headers, as the proxy left them, in origin form.
fn encode_head(req: &Request<OutBody>, chunked: bool) -> Vec<u8> {
    let target = req.uri().path_and_query().map_or("/", |p| p.as_str());
    let size = req.headers().iter().fold(target.len() + 64, |n, (k, v)| {
        n + k.as_str().len() + v.len() + 4
    });
    let mut head = Vec::with_capacity(size);
    head.extend_from_slice(req.method().as_str().as_bytes());
    head.push(b' ');
    head.extend_from_slice(target.as_bytes());
    head.extend_from_slice(b" HTTP/1.1\r\n");
    for (name, value) in req.headers() {
        head.extend_from_slice(name.as_str().as_bytes());
        head.extend_from_slice(b": ");
        head.extend_from_slice(value.as_bytes());
        head.extend_from_slice(b"\r\n");
    }
    if chunked {
        head.extend_from_slice(b"transfer-encoding: chunked\r\n");
    }
    head.extend_from_slice(b"\r\n");
    head
}

/// A response head taken from the front of `buf`.
#[derive(Debug)]
struct Head {
    status: StatusCode,
    version: Version,
    headers: HeaderMap,
    connection: ConnectionTokens,
    body: BodyFields,
}

/// Parses a response head at the front of `buf` and removes it; `None` while
/// incomplete. Header values share the buffer's memory.
fn parse_head(buf: &mut BytesMut) -> io::Result<Option<Head>> {
    let mut slots = [const { MaybeUninit::<httparse::Header<'_>>::uninit() }; MAX_HEADERS];
    let mut resp = httparse::Response::new(&mut []);
    let len = match httparse::ParserConfig::default()
        .parse_response_with_uninit_headers(&mut resp, buf, &mut slots)
    {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(e) => return Err(io::Error::new(io::ErrorKind::InvalidData, e)),
    };
    let status = StatusCode::from_u16(resp.code.unwrap_or(0))
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
    let version = if resp.version == Some(0) {
        Version::HTTP_10
    } else {
        Version::HTTP_11
    };
    let spans = FieldSpans::of(buf, resp.headers);
    let head = buf.split_to(len).freeze();
    // With room for a sticky session's cookie: growing the map costs more than filling it.
    let Fields {
        headers,
        connection,
        body,
    } = spans
        .fields(&head, 1, |_, _| {})
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
    Ok(Some(Head {
        status,
        version,
        headers,
        connection,
        body,
    }))
}

/// The response-head parser's promise, for the fuzz target (`fuzz/`) and the
/// property tests: any input comes to a head taken from the front of the
/// buffer with a framing for its body (or an error), a wait for more with the
/// buffer untouched, or an error; never a panic.
#[doc(hidden)]
pub fn check_response_head(bytes: &[u8]) -> Result<(), String> {
    let mut buf = BytesMut::from(bytes);
    match parse_head(&mut buf) {
        Ok(Some(head)) => {
            if buf.len() >= bytes.len() || !bytes.ends_with(&buf) {
                return Err("the head is not a prefix of the input".into());
            }
            for head_only in [false, true] {
                let _ = framing(head_only, head.status, &head.body);
            }
            Ok(())
        }
        Ok(None) if buf[..] == *bytes => Ok(()),
        Ok(None) => Err("a wait for more changed the buffer".into()),
        Err(_) => Ok(()),
    }
}

/// How the response body ends (RFC 9112 §6.3).
fn framing(head_only: bool, status: StatusCode, body: &BodyFields) -> io::Result<Framing> {
    if status == StatusCode::SWITCHING_PROTOCOLS {
        return Ok(Framing::Upgrade);
    }
    if head_only || status == StatusCode::NO_CONTENT || status == StatusCode::NOT_MODIFIED {
        return Ok(Framing::Done);
    }
    // A coding other than `chunked` would have to be passed on as a transfer
    // coding, which HTTP/2 clients cannot take, or undone, which bascule does not
    // do: dropping it would hand the client encoded bytes as the content. NGINX
    // refuses these too.
    if body.other_codings {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "a transfer coding other than chunked from the backend",
        ));
    }
    if body.chunked == Some(true) {
        return Ok(Framing::Chunked(Chunked::default()));
    }
    if body.bad_length {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "invalid Content-Length from the backend",
        ));
    }
    Ok(match body.content_length {
        Some(0) => Framing::Done,
        Some(n) => Framing::Length(n),
        None => Framing::UntilClose,
    })
}

/// A backend's response body, read from its connection as it is polled.
pub struct Body<R: Reuse> {
    conn: Option<Conn>,
    framing: Framing,
    keep_alive: bool,
    reuse: Option<R>,
}

impl<R: Reuse> std::fmt::Debug for Body<R> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Body")
            .field("framing", &self.framing)
            .finish()
    }
}

impl<R: Reuse> Body<R> {
    /// A body with nothing to read.
    pub fn empty() -> Self {
        Body {
            conn: None,
            framing: Framing::Done,
            keep_alive: false,
            reuse: None,
        }
    }

    /// For a 101 response: the connection and any bytes the backend sent after the head.
    pub fn into_upgraded(mut self) -> Option<(Stream, Bytes)> {
        match self.framing {
            Framing::Upgrade => self.conn.take().map(|c| (c.io, c.buf.freeze())),
            _ => None,
        }
    }

    /// The body is over: the connection goes back if it may serve another exchange.
    fn finish(&mut self) {
        self.framing = Framing::Done;
        if let (Some(conn), Some(reuse)) = (self.conn.take(), self.reuse.take()) {
            // Bytes beyond the response are a broken backend: not reused.
            if self.keep_alive && conn.buf.is_empty() {
                reuse.reuse(conn);
            }
        }
    }
}

impl<R: Reuse> http_body::Body for Body<R> {
    type Data = Bytes;
    type Error = io::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<io::Result<Frame<Bytes>>>> {
        let this = self.get_mut();
        let Some(conn) = this.conn.as_mut() else {
            return Poll::Ready(None);
        };
        let frame = ready!(this.framing.poll_frame(cx, &mut conn.io, &mut conn.buf))?;
        if matches!(this.framing, Framing::Done | Framing::Upgrade) {
            // Over: the connection goes back if it may serve another exchange.
            this.finish();
        }
        Poll::Ready(frame.map(Ok))
    }

    fn is_end_stream(&self) -> bool {
        matches!(self.framing, Framing::Done)
    }

    fn size_hint(&self) -> SizeHint {
        match self.framing {
            Framing::Done | Framing::Upgrade => SizeHint::with_exact(0),
            Framing::Length(n) => SizeHint::with_exact(n),
            _ => SizeHint::default(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::header::CONNECTION;

    proptest::proptest! {
        #[test]
        fn any_bytes_make_a_head_a_wait_or_an_error(
            bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..512),
        ) {
            check_response_head(&bytes).map_err(proptest::test_runner::TestCaseError::fail)?;
        }

        #[test]
        fn plausible_heads_make_a_head_a_wait_or_an_error(
            status in proptest::sample::select(vec!["200 OK", "101 x", "204 x", "304 x", "999 x", "20 x", ""]),
            fields in proptest::collection::vec(proptest::sample::select(vec![
                "content-length: 5", "content-length: 5, 6", "transfer-encoding: chunked",
                "transfer-encoding: gzip", "connection: close", "x a: b", "x-a: \u{1}",
            ]), 0..5),
            cut in 0usize..200,
        ) {
            let mut text = format!("HTTP/1.1 {status}\r\n");
            for f in fields {
                text += f;
                text += "\r\n";
            }
            text += "\r\nbody";
            let bytes = text.as_bytes();
            check_response_head(bytes).map_err(proptest::test_runner::TestCaseError::fail)?;
            check_response_head(&bytes[..cut.min(bytes.len())]).map_err(proptest::test_runner::TestCaseError::fail)?;
        }
    }

    #[test]
    fn response_heads_parse_across_reads_and_skip_nothing() {
        let text = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nX-Backend: 2\r\nSet-Cookie: a=1\r\nSet-Cookie: b=2\r\n\r\nhello";
        let mut buf = BytesMut::from(&text[..20]);
        assert!(parse_head(&mut buf).unwrap().is_none());
        buf.extend_from_slice(&text[20..]);
        let head = parse_head(&mut buf).unwrap().unwrap();
        assert_eq!(head.status, StatusCode::OK);
        assert_eq!(head.version, Version::HTTP_11);
        assert_eq!(head.headers["x-backend"], "2");
        assert_eq!(head.headers.get_all("set-cookie").iter().count(), 2);
        assert_eq!(&buf[..], b"hello");
    }

    #[test]
    fn connection_fields_are_read_and_kept_only_when_they_name_other_fields() {
        let parse = |text: &[u8]| parse_head(&mut BytesMut::from(text)).unwrap().unwrap();
        let head = parse(b"HTTP/1.1 200 OK\r\nconnection: Keep-Alive\r\nCONNECTION: close\r\n\r\n");
        assert!(head.connection.keep_alive && head.connection.close);
        assert!(!head.headers.contains_key(CONNECTION));

        // A field naming others stays, for strip_hop_by_hop to remove them by it.
        let head =
            parse(b"HTTP/1.1 200 OK\r\nConnection: keep-alive, X-Trace\r\nX-Trace: 1\r\n\r\n");
        assert!(head.connection.keep_alive && !head.connection.close);
        assert_eq!(head.headers[CONNECTION], "keep-alive, X-Trace");
    }

    #[test]
    fn framing_follows_rfc_9112() {
        let head = |pairs: &[(&str, &str)]| {
            let mut text = String::from("HTTP/1.1 200 OK\r\n");
            for (k, v) in pairs {
                text += &format!("{k}: {v}\r\n");
            }
            text += "\r\n";
            parse_head(&mut BytesMut::from(text.as_bytes()))
                .unwrap()
                .unwrap()
        };
        let fields = |pairs: &[(&str, &str)]| head(pairs).body;
        let ok = StatusCode::OK;
        let length = fields(&[("content-length", "10")]);
        assert!(matches!(framing(true, ok, &length).unwrap(), Framing::Done));
        assert!(matches!(
            framing(false, StatusCode::NO_CONTENT, &length).unwrap(),
            Framing::Done
        ));
        assert!(matches!(
            framing(false, StatusCode::NOT_MODIFIED, &length).unwrap(),
            Framing::Done
        ));
        assert!(matches!(
            framing(false, ok, &length).unwrap(),
            Framing::Length(10)
        ));
        let both = fields(&[
            ("transfer-encoding", "gzip, chunked"),
            ("content-length", "10"),
        ]);
        assert!(framing(false, ok, &both).is_err());
        let chunked = fields(&[("transfer-encoding", "chunked"), ("content-length", "10")]);
        assert!(matches!(
            framing(false, ok, &chunked).unwrap(),
            Framing::Chunked(_)
        ));
        // Transfer-Encoding is hop-by-hop, and beside it Content-Length is dropped too.
        let both = head(&[("Content-Length", "10"), ("Transfer-Encoding", "chunked")]).headers;
        assert!(both.is_empty(), "{both:?}");
        let gzip = fields(&[("transfer-encoding", "gzip")]);
        assert!(framing(false, ok, &gzip).is_err());
        assert!(matches!(
            framing(false, ok, &fields(&[])).unwrap(),
            Framing::UntilClose
        ));
        assert!(matches!(
            framing(false, ok, &fields(&[("content-length", "7, 7")])).unwrap(),
            Framing::Length(7)
        ));
        for bad in ["7, 8", "-1", "", "0x10"] {
            assert!(
                framing(false, ok, &fields(&[("content-length", bad)])).is_err(),
                "{bad}"
            );
        }
    }

    #[test]
    fn keep_alive_follows_the_version_and_connection_tokens() {
        let conn = |v: &str| {
            let mut tokens = ConnectionTokens::default();
            tokens.add(v.as_bytes());
            tokens
        };
        let none = ConnectionTokens::default();
        assert!(keeps_alive(Version::HTTP_11, none));
        assert!(!keeps_alive(Version::HTTP_11, conn("foo, Close")));
        assert!(!keeps_alive(Version::HTTP_10, none));
        assert!(keeps_alive(Version::HTTP_10, conn("Keep-Alive")));
    }
}
