//! HTTP/1.1 on the wire, for both of bascule's sides: what the client
//! connections (`serve.rs`) and the backend connections (`pool/h1.rs`) share.
//! The fields that frame a message, the chunked decoder, and the writer that
//! sends a body with its framing.

pub mod serve;

use std::io;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use bytes::{Buf, Bytes, BytesMut};
use http::header::{HeaderMap, HeaderName, HeaderValue};
use http::Version;
use http_body::Body;
use smallvec::SmallVec;

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// What a message's `Transfer-Encoding` and `Content-Length` fields say about
/// its body, read while parsing. `Transfer-Encoding` is hop-by-hop and stays
/// out of the map; beside it `Content-Length` is removed too (RFC 9112 §6.3):
/// the body passed on is the decoded one.
#[derive(Debug, Default)]
pub struct BodyFields {
    /// Whether the last coding of the last `Transfer-Encoding` field is
    /// `chunked`, if there is one.
    pub chunked: Option<bool>,
    /// A coding other than `chunked` is named, or `chunked` more than once
    /// (RFC 9112 §6.1: chunked is applied once, last).
    pub other_codings: bool,
    pub content_length: Option<u64>,
    /// A `Content-Length` that is not a number, or copies that disagree.
    pub bad_length: bool,
    /// `Content-Length` values seen, as fields or in lists: more than one
    /// (all the same, or `bad_length`) is passed on as one plain value.
    pub length_values: u32,
}

impl BodyFields {
    pub fn add_transfer_encoding(&mut self, value: &[u8]) {
        for coding in value.split(|&b| b == b',').map(<[u8]>::trim_ascii) {
            if coding.is_empty() {
                continue;
            }
            let chunked = coding.eq_ignore_ascii_case(b"chunked");
            // Anything after a chunked coding, or a second chunked, cannot be framed.
            if !chunked || self.chunked == Some(true) {
                self.other_codings = true;
            }
            self.chunked = Some(chunked);
        }
    }

    pub fn add_content_length(&mut self, value: &[u8]) {
        for part in value.split(|&b| b == b',').map(<[u8]>::trim_ascii) {
            self.length_values += 1;
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

/// What a message's `Connection` fields say about its connection. The fields
/// themselves reach the map only when they also name other fields, for
/// `headers::strip_hop_by_hop` to remove: the usual `Connection: keep-alive`
/// costs a map entry, a lookup and a removal otherwise.
#[derive(Debug, Default, Clone, Copy)]
pub struct ConnectionTokens {
    pub close: bool,
    pub keep_alive: bool,
}

impl ConnectionTokens {
    /// Adds one field value's tokens; false if it names anything else.
    pub fn add(&mut self, value: &[u8]) -> bool {
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

/// HTTP/1.1 keeps the connection unless told `close`; HTTP/1.0 closes it unless told `keep-alive`.
pub fn keeps_alive(version: Version, connection: ConnectionTokens) -> bool {
    match version {
        Version::HTTP_11 => !connection.close,
        _ => connection.keep_alive,
    }
}

/// The most header fields in a head, as hyper's default.
pub const MAX_HEADERS: usize = 100;

/// Where each field of a parsed head lies in its buffer, taken while httparse
/// still borrows the buffer, so that the values can share its memory once it is frozen.
pub struct FieldSpans {
    /// Name offset and length, value offset and length, per field. Inline up to
    /// `INLINE_SPANS`: a full `MAX_HEADERS` array was zeroed and copied per head,
    /// which cost more than reading the fields.
    spans: SmallVec<[(u32, u32, u32, u32); INLINE_SPANS]>,
}

/// Fields kept without an allocation; browsers send 10 to 20.
const INLINE_SPANS: usize = 24;

/// A head's fields: the map, and what the framing and connection fields said.
pub struct Fields {
    pub headers: HeaderMap,
    pub connection: ConnectionTokens,
    pub body: BodyFields,
}

impl FieldSpans {
    #[inline]
    pub fn of(buf: &[u8], headers: &[httparse::Header<'_>]) -> Self {
        let base = buf.as_ptr() as usize;
        let mut spans = FieldSpans {
            spans: SmallVec::new(),
        };
        for h in headers {
            spans.spans.push((
                (h.name.as_ptr() as usize - base) as u32,
                h.name.len() as u32,
                (h.value.as_ptr() as usize - base) as u32,
                h.value.len() as u32,
            ));
        }
        spans
    }

    /// The fields of `head` (the buffer these spans were taken from, frozen),
    /// in a map with room for `room` more. `Connection` reaches the map only
    /// when it names other fields, `Transfer-Encoding` never; `Content-Length`
    /// leaves it beside `Transfer-Encoding` (RFC 9112 §6.3). `each` sees every
    /// field that enters the map.
    pub fn fields(
        &self,
        head: &Bytes,
        room: usize,
        mut each: impl FnMut(&[u8], &[u8]),
    ) -> Result<Fields, InvalidField> {
        let mut fields = Fields {
            headers: HeaderMap::with_capacity(self.spans.len() + room),
            connection: ConnectionTokens::default(),
            body: BodyFields::default(),
        };
        for &(n, nl, v, vl) in &self.spans {
            let name = &head[n as usize..(n + nl) as usize];
            let raw = &head[v as usize..(v + vl) as usize];
            if name.eq_ignore_ascii_case(b"connection") && fields.connection.add(raw) {
                continue;
            }
            if name.eq_ignore_ascii_case(b"transfer-encoding") {
                fields.body.add_transfer_encoding(raw);
                continue;
            }
            if name.eq_ignore_ascii_case(b"content-length") {
                fields.body.add_content_length(raw);
            }
            each(name, raw);
            let name = HeaderName::from_bytes(name).map_err(|_| InvalidField)?;
            let value = HeaderValue::from_maybe_shared(head.slice(v as usize..(v + vl) as usize))
                .map_err(|_| InvalidField)?;
            fields.headers.append(name, value);
        }
        if fields.body.chunked.is_some() && fields.body.content_length.is_some() {
            fields.headers.remove(http::header::CONTENT_LENGTH);
        } else if let (Some(n), true) = (fields.body.content_length, fields.body.length_values > 1)
        {
            // Copies that agree go on as one plain value (RFC 9110 §8.6).
            fields
                .headers
                .insert(http::header::CONTENT_LENGTH, HeaderValue::from(n));
        }
        Ok(fields)
    }
}

/// A field name or value that HTTP does not allow.
#[derive(Debug, thiserror::Error)]
#[error("malformed header field")]
pub struct InvalidField;

/// Where a chunked body's decoder is.
#[derive(Debug, Default)]
pub enum Chunked {
    /// Reading a chunk-size line (with any extensions).
    #[default]
    Size,
    /// This many bytes of chunk data left.
    Data(u64),
    /// The CRLF after a chunk's data.
    DataEnd,
    /// Trailer fields, up to the empty line, and the bytes of trailer lines
    /// read so far. Boxed, once there is one: they are rare, and every chunked
    /// body carries a decoder, moved many times over.
    Trailers(Option<Box<HeaderMap>>, u32),
    End,
}

/// What the decoder found at the front of the buffer.
#[derive(Debug, PartialEq)]
pub enum Decoded {
    Data(Bytes),
    /// The trailer fields, the body's last frame.
    Trailers(HeaderMap),
    /// Needs more bytes.
    More,
    End,
}

impl Chunked {
    /// Decodes from the front of `buf`, consuming what it used.
    pub fn decode(&mut self, buf: &mut BytesMut) -> io::Result<Decoded> {
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
                        Chunked::Trailers(None, 0)
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
                Chunked::Trailers(fields, bytes) => {
                    let Some(line) = take_line(buf)? else {
                        return Ok(Decoded::More);
                    };
                    // Bounded as hyper bounds them: a sender cannot grow the map
                    // (or hold the body open) with trailer lines for ever.
                    *bytes = bytes.saturating_add(line.len() as u32 + 2);
                    let count = fields.as_ref().map_or(0, |f| f.len());
                    if *bytes > MAX_TRAILER_BYTES || count >= MAX_HEADERS {
                        return Err(io::Error::new(
                            io::ErrorKind::InvalidData,
                            "the trailer fields are too large",
                        ));
                    }
                    if line.is_empty() {
                        let fields = fields.take();
                        *self = Chunked::End;
                        if let Some(fields) = fields {
                            return Ok(Decoded::Trailers(*fields));
                        }
                    } else if let Some((name, value)) = trailer_field(&line) {
                        fields.get_or_insert_default().append(name, value);
                    }
                }
                Chunked::End => return Ok(Decoded::End),
            }
        }
    }
}

/// The most bytes of trailer fields a chunked body may end with (hyper's limit);
/// at most `MAX_HEADERS` fields.
pub const MAX_TRAILER_BYTES: u32 = 16 * 1024;

/// The chunked decoder's promise, for the fuzz target (`fuzz/`) and the
/// property tests: whatever the bytes, and however the reads split them
/// (`step` bytes at a time), the decoder ends in the same place: the same data
/// and trailers, or an error; never more data than it was given.
#[doc(hidden)]
pub fn check_chunked(bytes: &[u8], step: usize) -> Result<(), String> {
    let decode = |step: usize| -> Result<(Vec<u8>, usize), ()> {
        let mut decoder = Chunked::default();
        let mut buf = BytesMut::new();
        let (mut data, mut trailers, mut fed) = (Vec::new(), 0, 0);
        loop {
            match decoder.decode(&mut buf).map_err(|_| ())? {
                Decoded::Data(d) => data.extend_from_slice(&d),
                Decoded::Trailers(t) => trailers = t.len(),
                Decoded::End => return Ok((data, trailers)),
                Decoded::More if fed == bytes.len() => return Err(()),
                Decoded::More => {
                    let end = (fed + step.max(1)).min(bytes.len());
                    buf.extend_from_slice(&bytes[fed..end]);
                    fed = end;
                }
            }
        }
    };
    let whole = decode(bytes.len());
    let split = decode(step);
    if whole != split {
        return Err(format!(
            "read whole: {whole:?}, {step} at a time: {split:?}"
        ));
    }
    match whole {
        Ok((data, _)) if data.len() > bytes.len() => Err("more data out than in".into()),
        _ => Ok(()),
    }
}

/// Room made in a read buffer before each read.
pub const READ_CHUNK: usize = 8 * 1024;
/// The most read at once for a large body.
pub const READ_MAX: usize = 64 * 1024;

/// How a message body ends on the wire (RFC 9112 §6.3), and how much of it is left.
#[derive(Debug)]
pub enum BodyFraming {
    Length(u64),
    Chunked(Chunked),
    /// Until the sender closes the connection.
    UntilClose,
    /// Read to its end.
    Done,
    /// None follows a 101: the connection now carries another protocol.
    Upgrade,
}

impl BodyFraming {
    pub fn is_done(&self) -> bool {
        matches!(self, BodyFraming::Done)
    }

    /// The body's next frame from `buf`, reading from `io` when it runs dry;
    /// `None` at the body's end. The connection closing before that end is an
    /// error, except for a body framed by the close.
    pub fn poll_frame<S: tokio::io::AsyncRead + Unpin>(
        &mut self,
        cx: &mut Context<'_>,
        io: &mut S,
        buf: &mut BytesMut,
    ) -> Poll<io::Result<Option<http_body::Frame<Bytes>>>> {
        use http_body::Frame;
        loop {
            let want = match self {
                BodyFraming::Done | BodyFraming::Upgrade => return Poll::Ready(Ok(None)),
                BodyFraming::Length(left) if !buf.is_empty() => {
                    let n = (*left).min(buf.len() as u64);
                    *left -= n;
                    if *left == 0 {
                        *self = BodyFraming::Done;
                    }
                    return Poll::Ready(Ok(Some(Frame::data(buf.split_to(n as usize).freeze()))));
                }
                // Room for one byte more than is left: a read that ends the body then
                // comes up short, which tells tokio the socket is drained. A read that
                // fills the buffer exactly leaves the socket marked readable, and the
                // next use of the connection pays a system call to learn it is not.
                BodyFraming::Length(left) => (*left + 1).min(READ_MAX as u64) as usize,
                BodyFraming::Chunked(decoder) => match decoder.decode(buf)? {
                    Decoded::Data(data) => return Poll::Ready(Ok(Some(Frame::data(data)))),
                    Decoded::Trailers(fields) => {
                        // Trailers are a chunked body's last frame.
                        *self = BodyFraming::Done;
                        return Poll::Ready(Ok(Some(Frame::trailers(fields))));
                    }
                    Decoded::End => {
                        *self = BodyFraming::Done;
                        return Poll::Ready(Ok(None));
                    }
                    Decoded::More => READ_CHUNK,
                },
                BodyFraming::UntilClose if !buf.is_empty() => {
                    return Poll::Ready(Ok(Some(Frame::data(buf.split().freeze()))));
                }
                BodyFraming::UntilClose => READ_CHUNK,
            };
            buf.reserve(want);
            if ready!(tokio_util::io::poll_read_buf(Pin::new(&mut *io), cx, buf))? == 0 {
                if matches!(self, BodyFraming::UntilClose) {
                    *self = BodyFraming::Done;
                    return Poll::Ready(Ok(None));
                }
                return Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "the connection closed mid-body",
                )));
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
/// A line is at most `MAX_LINE` bytes, however the reads that brought it split it.
fn take_line(buf: &mut BytesMut) -> io::Result<Option<BytesMut>> {
    match buf.iter().position(|&b| b == b'\n') {
        Some(i) if i > MAX_LINE => Err(bad_chunk()),
        Some(i) => {
            let mut line = buf.split_to(i + 1);
            line.truncate(i);
            if line.last() == Some(&b'\r') {
                line.truncate(i - 1);
            }
            Ok(Some(line))
        }
        None if buf.len() > MAX_LINE => Err(bad_chunk()),
        None => Ok(None),
    }
}

/// The longest chunk-size line (with its extensions) or trailer line.
const MAX_LINE: usize = 4096;

fn bad_chunk() -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, "malformed chunked body")
}

/// Frames and small data gathered into one write: below this, a copy costs
/// less than another system call.
pub(crate) const GATHER: usize = 16 * 1024;

/// A message on its way out: what is left of its head, then its body framed
/// as the head said (as it is, or chunked). Small frames are gathered into one
/// write with the head; a large frame is written as it came, without a copy.
pub struct Outgoing<B> {
    body: Option<B>,
    chunked: bool,
    /// Whether trailer fields may go out (chunked, and the receiver said `TE: trailers`).
    trailers: bool,
    /// For a body framed by `Content-Length`: what it may still send.
    remaining: Option<u64>,
    /// Bytes to write first: the head, framing, small frames.
    front: BytesMut,
    /// A large frame, written after `front`.
    back: Bytes,
    /// The CRLF that ends a chunk held in `back`.
    crlf_owed: bool,
    /// Bytes written so far.
    written: u64,
    /// The last poll ended waiting on the receiver, not on the body.
    write_blocked: bool,
}

impl<B> Outgoing<B>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
{
    /// `head` is written first. A body of known length (`remaining`) that sends
    /// more or less than that is an error: the receiver would misread what follows.
    pub fn new(head: BytesMut, body: Option<B>, chunked: bool, remaining: Option<u64>) -> Self {
        Outgoing {
            body,
            chunked,
            trailers: false,
            remaining: remaining.filter(|_| !chunked),
            front: head,
            back: Bytes::new(),
            crlf_owed: false,
            written: 0,
            write_blocked: false,
        }
    }

    /// Bytes written so far: progress, for a caller timing a stalled receiver.
    pub fn written(&self) -> u64 {
        self.written
    }

    /// Whether the last poll ended waiting on the receiver to take bytes.
    pub fn is_write_blocked(&self) -> bool {
        self.write_blocked
    }

    pub fn with_trailers(mut self, allowed: bool) -> Self {
        self.trailers = allowed && self.chunked;
        self
    }

    /// Whether the body has ended and everything has been written.
    pub fn is_done(&self) -> bool {
        self.body.is_none() && self.front.is_empty() && self.back.is_empty()
    }

    /// Writes what it can; ready once the whole message is written and flushed.
    pub fn poll_send<W>(&mut self, cx: &mut Context<'_>, io: &mut W) -> Poll<io::Result<()>>
    where
        W: tokio::io::AsyncWrite + Unpin,
    {
        loop {
            while self.back.is_empty() && self.front.len() < GATHER {
                let Some(body) = self.body.as_mut() else {
                    break;
                };
                match Pin::new(body).poll_frame(cx) {
                    Poll::Pending => break,
                    Poll::Ready(Some(Ok(frame))) => match frame.into_data() {
                        Ok(data) => self.push(data)?,
                        Err(frame) => self.end(frame.into_trailers().ok())?,
                    },
                    Poll::Ready(None) => self.end(None)?,
                    // The body broke off: the receiver must not take it as whole.
                    Poll::Ready(Some(Err(e))) => {
                        return Poll::Ready(Err(io::Error::other(BodyFailed(e.into()))))
                    }
                }
            }
            if self.front.is_empty() && self.back.is_empty() {
                // TLS holds written bytes until flushed; a plain socket's flush does nothing.
                self.write_blocked = true;
                ready!(Pin::new(&mut *io).poll_flush(cx))?;
                self.write_blocked = false;
                return match self.body {
                    Some(_) => Poll::Pending, // the body's waker is registered
                    None => Poll::Ready(Ok(())),
                };
            }
            self.write_blocked = true;
            let n = if self.front.is_empty() {
                ready!(Pin::new(&mut *io).poll_write(cx, &self.back))?
            } else if self.back.is_empty() {
                ready!(Pin::new(&mut *io).poll_write(cx, &self.front))?
            } else {
                let both = [io::IoSlice::new(&self.front), io::IoSlice::new(&self.back)];
                ready!(Pin::new(&mut *io).poll_write_vectored(cx, &both))?
            };
            self.write_blocked = false;
            self.written += n as u64;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            let from_front = n.min(self.front.len());
            self.front.advance(from_front);
            self.back.advance(n - from_front);
        }
    }

    fn push(&mut self, data: Bytes) -> io::Result<()> {
        if data.is_empty() {
            return Ok(());
        }
        if let Some(left) = self.remaining.as_mut() {
            *left = left
                .checked_sub(data.len() as u64)
                .ok_or_else(|| io::Error::other("body longer than its Content-Length"))?;
        }
        if self.crlf_owed {
            self.front.extend_from_slice(b"\r\n");
            self.crlf_owed = false;
        }
        if self.chunked {
            push_hex(&mut self.front, data.len());
            self.front.extend_from_slice(b"\r\n");
        }
        if self.front.len() + data.len() <= GATHER {
            self.front.extend_from_slice(&data);
            if self.chunked {
                self.front.extend_from_slice(b"\r\n");
            }
        } else {
            self.back = data;
            self.crlf_owed = self.chunked;
        }
        Ok(())
    }

    fn end(&mut self, trailers: Option<HeaderMap>) -> io::Result<()> {
        self.body = None;
        if self.remaining.is_some_and(|left| left > 0) {
            return Err(io::Error::other("body shorter than its Content-Length"));
        }
        if self.crlf_owed {
            self.front.extend_from_slice(b"\r\n");
            self.crlf_owed = false;
        }
        if !self.chunked {
            return Ok(());
        }
        self.front.extend_from_slice(b"0\r\n");
        if let Some(fields) = trailers.filter(|_| self.trailers) {
            for (name, value) in &fields {
                self.front.extend_from_slice(name.as_str().as_bytes());
                self.front.extend_from_slice(b": ");
                self.front.extend_from_slice(value.as_bytes());
                self.front.extend_from_slice(b"\r\n");
            }
        }
        self.front.extend_from_slice(b"\r\n");
        Ok(())
    }
}

/// What `Outgoing` fails with when the body it sends fails, as distinct from
/// the connection it writes to: for the proxy, an upload that broke off is the
/// client's doing, not the backend's.
#[derive(Debug, thiserror::Error)]
#[error("the body being sent failed: {0}")]
pub struct BodyFailed(pub BoxError);

impl BodyFailed {
    /// The body failure inside `e`, if that is what `e` is.
    pub fn of(e: &io::Error) -> Option<&BodyFailed> {
        e.get_ref()?.downcast_ref::<BodyFailed>()
    }

    /// Whether the body stopped arriving in time (rather than breaking off or being malformed).
    pub fn timed_out(&self) -> bool {
        self.0
            .downcast_ref::<io::Error>()
            .is_some_and(|e| e.kind() == io::ErrorKind::TimedOut)
    }
}

/// `n` in hexadecimal, as a chunk size.
fn push_hex(out: &mut BytesMut, n: usize) {
    let mut digits = [0u8; 16];
    let mut at = digits.len();
    let mut n = n;
    loop {
        at -= 1;
        digits[at] = b"0123456789abcdef"[n & 15];
        n >>= 4;
        if n == 0 {
            break;
        }
    }
    out.extend_from_slice(&digits[at..]);
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body::Frame;

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
            // What follows the body stays for the connection (a next message, or a broken peer's extra bytes).
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
    fn trailer_fields_are_bounded_in_bytes_and_count() {
        let body = |trailers: &str| format!("1\r\na\r\n0\r\n{trailers}\r\n").into_bytes();
        // The same name again and again (extra values), then many distinct names.
        let repeated = "x-a: 1\r\n".repeat(3_000);
        let distinct: String = (0..MAX_HEADERS + 1)
            .map(|i| format!("x-{i}: 1\r\n"))
            .collect();
        for (what, trailers) in [("repeated", repeated), ("distinct", distinct)] {
            let e = decode_all(&body(&trailers), 4096).unwrap_err();
            assert_eq!(e.to_string(), "the trailer fields are too large", "{what}");
        }
        // Within both bounds, they arrive.
        let fine: String = (0..50)
            .map(|i| format!("x-{i}: {}\r\n", "v".repeat(100)))
            .collect();
        let (_, trailers, _) = decode_all(&body(&fine), 4096).unwrap();
        assert_eq!(trailers.len(), 50);
    }

    proptest::proptest! {
        #[test]
        fn any_bytes_decode_alike_however_the_reads_split(
            bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..256),
            step in 1usize..17,
        ) {
            check_chunked(&bytes, step).map_err(proptest::test_runner::TestCaseError::fail)?;
        }

        #[test]
        fn plausible_chunked_bodies_decode_alike(
            sizes in proptest::collection::vec(0usize..40, 0..6),
            ext in proptest::sample::select(vec!["", ";a=b", ";x", " ", "x"]),
            trailer in proptest::sample::select(vec!["", "x-a: 1\r\n", "bad\r\n"]),
            step in 1usize..9,
        ) {
            let mut body = String::new();
            for n in sizes {
                body += &format!("{n:x}{ext}\r\n{}\r\n", "d".repeat(n));
            }
            body += &format!("0\r\n{trailer}\r\n");
            check_chunked(body.as_bytes(), step).map_err(proptest::test_runner::TestCaseError::fail)?;
        }
    }

    #[test]
    fn a_long_size_line_is_refused_however_it_arrives() {
        let line = format!("5;{}\r\nhello\r\n0\r\n\r\n", "e".repeat(5000));
        assert!(decode_all(line.as_bytes(), line.len()).is_err());
        assert!(decode_all(line.as_bytes(), 100).is_err());
    }

    /// A body that hands out its frames, all ready.
    struct Frames(std::collections::VecDeque<Result<Frame<Bytes>, io::Error>>);

    impl Body for Frames {
        type Data = Bytes;
        type Error = io::Error;
        fn poll_frame(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<Bytes>, io::Error>>> {
            Poll::Ready(self.0.pop_front())
        }
    }

    fn data(text: &[u8]) -> Result<Frame<Bytes>, io::Error> {
        Ok(Frame::data(Bytes::copy_from_slice(text)))
    }

    /// Everything an `Outgoing` writes for these frames, or its error.
    fn written(
        frames: Vec<Result<Frame<Bytes>, io::Error>>,
        chunked: bool,
        length: Option<u64>,
    ) -> io::Result<Vec<u8>> {
        let body = Frames(frames.into());
        let head = BytesMut::from(&b"HEAD\r\n"[..]);
        let mut out = Outgoing::new(head, Some(body), chunked, length).with_trailers(true);
        let mut sink = Vec::new();
        let mut cx = Context::from_waker(std::task::Waker::noop());
        match out.poll_send(&mut cx, &mut sink) {
            Poll::Ready(r) => r.map(|()| sink),
            Poll::Pending => panic!("a body whose frames are all ready is written at once"),
        }
    }

    #[test]
    fn bodies_go_out_framed_small_frames_gathered_large_ones_whole() {
        let large = vec![b'x'; GATHER + 1];
        let mut trailers = HeaderMap::new();
        trailers.insert("x-sum", HeaderValue::from_static("7"));
        let out = written(
            vec![
                data(b"hello"),
                data(b""),
                data(&large),
                Ok(Frame::trailers(trailers)),
            ],
            true,
            None,
        )
        .unwrap();
        let mut expected = b"HEAD\r\n5\r\nhello\r\n4001\r\n".to_vec();
        expected.extend_from_slice(&large);
        expected.extend_from_slice(b"\r\n0\r\nx-sum: 7\r\n\r\n");
        assert_eq!(out, expected);

        let out = written(vec![data(b"hel"), data(b"lo")], false, Some(5)).unwrap();
        assert_eq!(out, b"HEAD\r\nhello");
    }

    #[test]
    fn a_body_that_breaks_its_length_or_breaks_off_is_an_error() {
        assert!(written(vec![data(b"hello!")], false, Some(5)).is_err());
        assert!(written(vec![data(b"hell")], false, Some(5)).is_err());
        let broken = vec![data(b"he"), Err(io::ErrorKind::ConnectionReset.into())];
        assert!(written(broken, true, None).is_err());
    }

    #[test]
    fn chunk_sizes_are_hexadecimal() {
        for (n, text) in [(0, "0"), (9, "9"), (10, "a"), (255, "ff"), (4096, "1000")] {
            let mut out = BytesMut::new();
            push_hex(&mut out, n);
            assert_eq!(&out[..], text.as_bytes());
        }
    }
}
