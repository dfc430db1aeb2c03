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

use std::io;
use std::mem::MaybeUninit;
use std::pin::Pin;
use std::task::{ready, Context, Poll, Waker};

use bytes::{Buf, Bytes, BytesMut};
use http::header::{HeaderMap, HeaderName, HeaderValue, CONTENT_LENGTH};
use http::{Method, Request, Response, StatusCode, Version};
use http_body::{Body as _, Frame, SizeHint};
use http_body_util::{Either, Empty};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;

use super::pool::OutBody;

/// The largest response head accepted; a larger one fails the exchange (502).
const MAX_HEAD: usize = 64 * 1024;
/// The most header fields in a response head, as hyper's default.
const MAX_HEADERS: usize = 100;
/// Room made in the read buffer before each read.
const READ_CHUNK: usize = 8 * 1024;
/// The most read at once for a large body.
const READ_MAX: usize = 64 * 1024;

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

/// Why an exchange failed, which decides whether it may be sent again. A
/// request that had no body comes back with the last two, so that it can be
/// sent again where that is safe, without a copy made beforehand in case.
#[derive(Debug)]
pub enum Failure {
    /// Not a byte was written: the request comes back as it was.
    Unsent(io::Error, Box<Request<OutBody>>),
    /// The request was written, wholly or in part, and the connection ended
    /// before a byte of response: a backend closing an idle connection looks
    /// like this.
    Incomplete(io::Error, Option<Box<Request<OutBody>>>),
    /// Anything else: a malformed response, or the connection failing mid-response.
    Broken(io::Error, Option<Box<Request<OutBody>>>),
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
    pub async fn send<R: Reuse>(
        mut self,
        req: Request<OutBody>,
        reuse: R,
    ) -> Result<Response<Body<R>>, Failure> {
        let head_only = req.method() == Method::HEAD;
        let chunked = !req.body().is_end_stream() && !req.headers().contains_key(CONTENT_LENGTH);
        let head = encode_head(&req, chunked);
        let written =
            match std::future::poll_fn(|cx| Pin::new(&mut self.io).poll_write(cx, &head)).await {
                Ok(0) => {
                    return Err(Failure::Unsent(
                        io::ErrorKind::WriteZero.into(),
                        Box::new(req),
                    ))
                }
                Ok(n) => n,
                Err(e) => return Err(Failure::Unsent(e, Box::new(req))),
            };
        let (parts, body) = req.into_parts();
        let bodyless = body.is_end_stream();
        let mut upload = Upload {
            body: (!bodyless).then_some(body),
            chunked,
            pending: Bytes::copy_from_slice(&head[written..]),
        };
        let mut got_any = false;
        let parsed = std::future::poll_fn(|cx| {
            // The request body goes out while the response is awaited: a backend
            // may answer (and stop reading) before the upload is over.
            if let Err(e) = upload.poll_send(cx, &mut self.io) {
                return Poll::Ready(Err(e));
            }
            self.poll_head(cx, &mut got_any)
        })
        .await
        .and_then(|head| Ok((framing(head_only, head.status, &head.body)?, head)));
        let (framing, parsed) = match parsed {
            Ok(parsed) => parsed,
            Err(e) => {
                let back = bodyless
                    .then(|| Box::new(Request::from_parts(parts, Either::Right(Empty::new()))));
                return Err(if got_any {
                    Failure::Broken(e, back)
                } else {
                    Failure::Incomplete(e, back)
                });
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

/// The request body on its way out.
struct Upload {
    body: Option<OutBody>,
    chunked: bool,
    /// Bytes taken from the body (or the head) and not yet written.
    pending: Bytes,
}

impl Upload {
    fn is_done(&self) -> bool {
        self.body.is_none() && self.pending.is_empty()
    }

    /// Writes what it can; `Ok` when done or waiting.
    fn poll_send(&mut self, cx: &mut Context<'_>, io: &mut Stream) -> io::Result<()> {
        loop {
            while !self.pending.is_empty() {
                match Pin::new(&mut *io).poll_write(cx, &self.pending) {
                    Poll::Ready(Ok(0)) => return Err(io::ErrorKind::WriteZero.into()),
                    Poll::Ready(Ok(n)) => self.pending.advance(n),
                    Poll::Ready(Err(e)) => return Err(e),
                    Poll::Pending => return Ok(()),
                }
            }
            let Some(body) = self.body.as_mut() else {
                return flush(cx, io);
            };
            match Pin::new(body).poll_frame(cx) {
                // TLS holds written bytes until flushed; a plain socket's flush does nothing.
                Poll::Pending => return flush(cx, io),
                Poll::Ready(Some(Ok(frame))) => {
                    if let Ok(data) = frame.into_data() {
                        self.pending = if self.chunked && !data.is_empty() {
                            chunk(&data)
                        } else {
                            data
                        };
                    }
                }
                Poll::Ready(None) => {
                    self.body = None;
                    if self.chunked {
                        self.pending = Bytes::from_static(b"0\r\n\r\n");
                    }
                }
                // The client's upload broke off: the backend must not take it as whole.
                Poll::Ready(Some(Err(e))) => return Err(io::Error::other(e)),
            }
        }
    }
}

fn flush(cx: &mut Context<'_>, io: &mut Stream) -> io::Result<()> {
    match Pin::new(io).poll_flush(cx) {
        Poll::Ready(Err(e)) => Err(e),
        _ => Ok(()),
    }
}

/// One chunk of a chunked body.
fn chunk(data: &[u8]) -> Bytes {
    let mut out = BytesMut::with_capacity(data.len() + 20);
    out.extend_from_slice(format!("{:x}\r\n", data.len()).as_bytes());
    out.extend_from_slice(data);
    out.extend_from_slice(b"\r\n");
    out.freeze()
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

/// What the response's `Transfer-Encoding` and `Content-Length` fields say
/// about its body, read while parsing. `Transfer-Encoding` is hop-by-hop and
/// stays out of the map; beside it `Content-Length` is removed too (RFC 9112
/// §6.3): the body that reaches the client is the decoded one.
#[derive(Debug, Default)]
struct BodyFields {
    /// Whether the last coding of the last `Transfer-Encoding` field is
    /// `chunked`, if there is one.
    chunked: Option<bool>,
    content_length: Option<u64>,
    /// A `Content-Length` that is not a number, or copies that disagree.
    bad_length: bool,
}

impl BodyFields {
    fn add_transfer_encoding(&mut self, value: &[u8]) {
        let last = value.rsplit(|&b| b == b',').next().unwrap_or_default();
        self.chunked = Some(last.trim_ascii().eq_ignore_ascii_case(b"chunked"));
    }

    fn add_content_length(&mut self, value: &[u8]) {
        for part in value.split(|&b| b == b',').map(<[u8]>::trim_ascii) {
            let n = std::str::from_utf8(part)
                .ok()
                .filter(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()))
                .and_then(|p| p.parse::<u64>().ok());
            match n {
                Some(n) if self.content_length.is_none_or(|l| l == n) => {
                    self.content_length = Some(n)
                }
                _ => self.bad_length = true,
            }
        }
    }
}

/// What the response's `Connection` fields say about this connection. The
/// fields themselves reach the map only when they also name other fields, for
/// `headers::strip_hop_by_hop` to remove: a backend's usual `Connection:
/// keep-alive` costs a map entry, a lookup and a removal otherwise.
#[derive(Debug, Default, Clone, Copy)]
struct ConnectionTokens {
    close: bool,
    keep_alive: bool,
}

impl ConnectionTokens {
    /// Adds one field value's tokens; false if it names anything else.
    fn add(&mut self, value: &[u8]) -> bool {
        let mut only_ours = true;
        for token in value.split(|&b| b == b',').map(<[u8]>::trim_ascii) {
            if token.eq_ignore_ascii_case(b"close") {
                self.close = true;
            } else if token.eq_ignore_ascii_case(b"keep-alive") {
                self.keep_alive = true;
            } else if !token.is_empty() {
                only_ours = false;
            }
        }
        only_ours
    }
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
    // Where each field lies in the buffer, so that the values can share it.
    let base = buf.as_ptr() as usize;
    let mut fields = [(0u32, 0u32, 0u32, 0u32); MAX_HEADERS];
    let count = resp.headers.len();
    for (slot, h) in fields.iter_mut().zip(resp.headers.iter()) {
        *slot = (
            (h.name.as_ptr() as usize - base) as u32,
            h.name.len() as u32,
            (h.value.as_ptr() as usize - base) as u32,
            h.value.len() as u32,
        );
    }
    let head = buf.split_to(len).freeze();
    let mut headers = HeaderMap::with_capacity(count);
    let mut connection = ConnectionTokens::default();
    let mut body = BodyFields::default();
    for &(n, nl, v, vl) in &fields[..count] {
        let name = &head[n as usize..(n + nl) as usize];
        let raw = &head[v as usize..(v + vl) as usize];
        if name.eq_ignore_ascii_case(b"connection") && connection.add(raw) {
            continue;
        }
        if name.eq_ignore_ascii_case(b"transfer-encoding") {
            body.add_transfer_encoding(raw);
            continue;
        }
        if name.eq_ignore_ascii_case(b"content-length") {
            body.add_content_length(raw);
        }
        let name = HeaderName::from_bytes(name)
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
        let value = HeaderValue::from_maybe_shared(head.slice(v as usize..(v + vl) as usize))
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
        headers.append(name, value);
    }
    if body.chunked.is_some() && body.content_length.is_some() {
        headers.remove(CONTENT_LENGTH);
    }
    Ok(Some(Head {
        status,
        version,
        headers,
        connection,
        body,
    }))
}

/// How the response body ends (RFC 9112 §6.3).
#[derive(Debug)]
enum Framing {
    /// Nothing left to read.
    Done,
    Length(u64),
    Chunked(Chunked),
    /// Until the backend closes the connection.
    UntilClose,
    /// 101: the connection now carries another protocol.
    Upgrade,
}

fn framing(head_only: bool, status: StatusCode, body: &BodyFields) -> io::Result<Framing> {
    if status == StatusCode::SWITCHING_PROTOCOLS {
        return Ok(Framing::Upgrade);
    }
    if head_only || status == StatusCode::NO_CONTENT || status == StatusCode::NOT_MODIFIED {
        return Ok(Framing::Done);
    }
    // Only a final `chunked` frames the body; any other coding runs to the close.
    match body.chunked {
        Some(true) => return Ok(Framing::Chunked(Chunked::default())),
        Some(false) => return Ok(Framing::UntilClose),
        None => {}
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

/// HTTP/1.1 keeps the connection unless told `close`; HTTP/1.0 closes it unless told `keep-alive`.
fn keeps_alive(version: Version, connection: ConnectionTokens) -> bool {
    match version {
        Version::HTTP_11 => !connection.close,
        _ => connection.keep_alive,
    }
}

/// Where a chunked body's decoder is.
#[derive(Debug, Default)]
enum Chunked {
    /// Reading a chunk-size line (with any extensions).
    #[default]
    Size,
    /// This many bytes of chunk data left.
    Data(u64),
    /// The CRLF after a chunk's data.
    DataEnd,
    /// Trailer fields, up to the empty line.
    Trailers(HeaderMap),
    End,
}

/// What the decoder found at the front of the buffer.
#[derive(Debug, PartialEq)]
enum Decoded {
    Data(Bytes),
    /// The trailer fields, the body's last frame.
    Trailers(HeaderMap),
    /// Needs more bytes.
    More,
    End,
}

impl Chunked {
    /// Decodes from the front of `buf`, consuming what it used.
    fn decode(&mut self, buf: &mut BytesMut) -> io::Result<Decoded> {
        loop {
            match self {
                Chunked::Size => {
                    let Some(line) = take_line(buf)? else {
                        return Ok(Decoded::More);
                    };
                    let digits = line[..].split(|&b| b == b';').next().unwrap_or(&[]);
                    let digits = std::str::from_utf8(digits)
                        .map_err(|_| bad_chunk())?
                        .trim_matches([' ', '\t']);
                    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_hexdigit()) {
                        return Err(bad_chunk());
                    }
                    let size = u64::from_str_radix(digits, 16).map_err(|_| bad_chunk())?;
                    *self = if size == 0 {
                        Chunked::Trailers(HeaderMap::new())
                    } else {
                        Chunked::Data(size)
                    };
                }
                Chunked::Data(left) => {
                    if buf.is_empty() {
                        return Ok(Decoded::More);
                    }
                    let n = (*left).min(buf.len() as u64);
                    let data = buf.split_to(n as usize).freeze();
                    *left -= n;
                    if *left == 0 {
                        *self = Chunked::DataEnd;
                    }
                    return Ok(Decoded::Data(data));
                }
                Chunked::DataEnd => {
                    let Some(line) = take_line(buf)? else {
                        return Ok(Decoded::More);
                    };
                    if !line.is_empty() {
                        return Err(bad_chunk());
                    }
                    *self = Chunked::Size;
                }
                Chunked::Trailers(fields) => {
                    let Some(line) = take_line(buf)? else {
                        return Ok(Decoded::More);
                    };
                    if line.is_empty() {
                        let fields = std::mem::take(fields);
                        *self = Chunked::End;
                        if !fields.is_empty() {
                            return Ok(Decoded::Trailers(fields));
                        }
                    } else if let Some((name, value)) = trailer_field(&line) {
                        fields.append(name, value);
                    }
                }
                Chunked::End => return Ok(Decoded::End),
            }
        }
    }
}

/// A `name: value` trailer line; fields that are not valid are dropped.
fn trailer_field(line: &[u8]) -> Option<(HeaderName, HeaderValue)> {
    let colon = line.iter().position(|&b| b == b':')?;
    let name = HeaderName::from_bytes(&line[..colon]).ok()?;
    let value = line[colon + 1..].trim_ascii();
    Some((name, HeaderValue::from_bytes(value).ok()?))
}

/// One line (without its CRLF, or a bare LF) from the front of `buf`.
fn take_line(buf: &mut BytesMut) -> io::Result<Option<BytesMut>> {
    match buf.iter().position(|&b| b == b'\n') {
        Some(i) => {
            let mut line = buf.split_to(i + 1);
            line.truncate(i);
            if line.last() == Some(&b'\r') {
                line.truncate(i - 1);
            }
            Ok(Some(line))
        }
        None if buf.len() > 4096 => Err(bad_chunk()),
        None => Ok(None),
    }
}

fn bad_chunk() -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidData,
        "malformed chunked body from the backend",
    )
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
        loop {
            let Some(conn) = this.conn.as_mut() else {
                return Poll::Ready(None);
            };
            let data = match &mut this.framing {
                Framing::Done | Framing::Upgrade => {
                    this.finish();
                    return Poll::Ready(None);
                }
                Framing::Length(left) => {
                    if conn.buf.is_empty() {
                        let want = (*left).min(READ_MAX as u64) as usize;
                        if ready!(conn.poll_fill(cx, want))? == 0 {
                            return Poll::Ready(Some(Err(io::ErrorKind::UnexpectedEof.into())));
                        }
                    }
                    let n = (*left).min(conn.buf.len() as u64);
                    *left -= n;
                    let data = conn.buf.split_to(n as usize).freeze();
                    if *left == 0 {
                        this.finish();
                    }
                    data
                }
                Framing::Chunked(decoder) => match decoder.decode(&mut conn.buf)? {
                    Decoded::Data(data) => data,
                    Decoded::Trailers(fields) => {
                        // The trailers end the body: the decoder has read its last line.
                        this.finish();
                        return Poll::Ready(Some(Ok(Frame::trailers(fields))));
                    }
                    Decoded::End => {
                        this.finish();
                        return Poll::Ready(None);
                    }
                    Decoded::More => {
                        if ready!(conn.poll_fill(cx, READ_CHUNK))? == 0 {
                            return Poll::Ready(Some(Err(io::ErrorKind::UnexpectedEof.into())));
                        }
                        continue;
                    }
                },
                Framing::UntilClose => {
                    if conn.buf.is_empty() && ready!(conn.poll_fill(cx, READ_CHUNK))? == 0 {
                        this.finish();
                        return Poll::Ready(None);
                    }
                    conn.buf.split().freeze()
                }
            };
            return Poll::Ready(Some(Ok(Frame::data(data))));
        }
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

    /// The body, the trailers and what was left in the buffer.
    fn decode_all(input: &[u8], step: usize) -> io::Result<(Vec<u8>, HeaderMap, BytesMut)> {
        let mut decoder = Chunked::default();
        let mut buf = BytesMut::new();
        let mut out = Vec::new();
        let mut trailers = HeaderMap::new();
        let mut fed = 0;
        loop {
            match decoder.decode(&mut buf)? {
                Decoded::Data(d) => out.extend_from_slice(&d),
                Decoded::Trailers(t) => trailers = t,
                Decoded::End => return Ok((out, trailers, buf)),
                Decoded::More => {
                    if fed == input.len() {
                        return Err(io::ErrorKind::UnexpectedEof.into());
                    }
                    let end = (fed + step).min(input.len());
                    buf.extend_from_slice(&input[fed..end]);
                    fed = end;
                }
            }
        }
    }

    #[test]
    fn chunked_bodies_decode_whatever_the_reads_split() {
        let input = b"5;ext=1\r\nhello\r\n1A\r\nabcdefghijklmnopqrstuvwxyz\r\n0\r\nx-trailer:  1 \r\n\r\nNEXT";
        for step in [1, 2, 3, 7, input.len()] {
            let (body, trailers, rest) = decode_all(input, step).unwrap();
            assert_eq!(body, b"helloabcdefghijklmnopqrstuvwxyz", "step {step}");
            assert_eq!(trailers["x-trailer"], "1", "step {step}");
            // What follows the body stays for the connection (here: a broken backend's extra bytes).
            assert!(b"NEXT".starts_with(&rest), "step {step}");
        }
    }

    #[test]
    fn malformed_chunks_are_errors() {
        for bad in [
            &b"zz\r\nhello\r\n0\r\n\r\n"[..],
            b"+5\r\nhello\r\n0\r\n\r\n",
            b"5\r\nhelloXX0\r\n\r\n",
            b"\r\n",
        ] {
            assert!(
                decode_all(bad, 1).is_err(),
                "{:?}",
                String::from_utf8_lossy(bad)
            );
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
        assert!(matches!(
            framing(false, ok, &both).unwrap(),
            Framing::Chunked(_)
        ));
        // Transfer-Encoding is hop-by-hop, and beside it Content-Length is dropped too.
        let both = head(&[("Content-Length", "10"), ("Transfer-Encoding", "chunked")]).headers;
        assert!(both.is_empty(), "{both:?}");
        let gzip = fields(&[("transfer-encoding", "gzip")]);
        assert!(matches!(
            framing(false, ok, &gzip).unwrap(),
            Framing::UntilClose
        ));
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
