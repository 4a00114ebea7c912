//! The HTTP/1.1 upstream codec: a request head out, a response head and its body's framing in.
//!
//! Why: hyper's client puts a connection task and a channel each way between a request and its
//! socket, and that costs more per request than the whole gap between luma-proxy and nginx
//! (docs/profile.md, "The upstream exchange"). An exchange done inline, in the request's own
//! task, needs only this codec; the connection and its pool stay the backend's job.
//!
//! This module is pure logic over byte buffers, so every rule below has a unit test:
//! - **Head.** `httparse` with hyper's limits (100 headers; the caller bounds the head's bytes).
//!   Interim answers (1xx other than 101) are consumed and skipped, as hyper's client does.
//!   Header values stay in the read buffer: the head is frozen and sliced, not copied.
//! - **Framing** (RFC 9112 section 6.3), in this order: no body for a HEAD request, 1xx, 204
//!   and 304; chunked when `Transfer-Encoding` ends in `chunked`; read until close for any
//!   other `Transfer-Encoding`; `Content-Length` when every value agrees; otherwise until
//!   close. Where two parsers could read two different messages, the answer is refused, not
//!   guessed at: lengths that disagree, both `Transfer-Encoding` and `Content-Length`,
//!   `Transfer-Encoding` in HTTP/1.0, and a 101 nobody asked for.
//! - **Keep-alive.** HTTP/1.1 unless `Connection: close`; HTTP/1.0 only with
//!   `Connection: keep-alive`; never after a body read until close.
//! - **Chunks.** Size lines of at most 16 hex digits, extensions ignored but bounded per body,
//!   CRLF strictly and no other control byte; trailers bounded, CRLF strictly, and stripped of
//!   the fields that frame or route a message before they are handed over.
//!
//! The inline client (`inline`) runs on it; `benches/upstream_exchange.rs` measures it against
//! hyper's client (docs/profile.md).

use bytes::{Buf, Bytes, BytesMut};
use hyper::header::{HeaderName, HeaderValue, CONNECTION, CONTENT_LENGTH, TRANSFER_ENCODING};
use hyper::http::request::Parts;
use hyper::{HeaderMap, Method, StatusCode, Version};

/// Most header lines in a response head or its trailers (hyper's limit too).
pub const MAX_HEADERS: usize = 100;
/// Most bytes of a chunk-size line, extensions included.
const MAX_SIZE_LINE: usize = 1024;
/// Most bytes of a chunked body's trailers.
const MAX_TRAILERS: usize = 16 * 1024;
/// Most bytes of all of a chunked body's size lines beyond their digits' worth (hyper allows
/// extensions as much).
const MAX_SIZE_LINES: usize = 16 * 1024;
/// Most bytes of a response head the codec takes, whatever a caller asks.
const MAX_HEAD: usize = 1024 * 1024;

/// Writes the request head: method, path and query, HTTP/1.1, the headers as they are.
pub fn encode_request_head(parts: &Parts, out: &mut Vec<u8>) {
    out.clear();
    out.extend_from_slice(parts.method.as_str().as_bytes());
    out.push(b' ');
    let target = parts.uri.path_and_query().map_or("/", |p| p.as_str());
    out.extend_from_slice(target.as_bytes());
    out.extend_from_slice(b" HTTP/1.1\r\n");
    for (name, value) in &parts.headers {
        out.extend_from_slice(name.as_str().as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(value.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b"\r\n");
}

/// How a response's body ends.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Framing {
    Empty,
    Length(u64),
    Chunked,
    UntilClose,
}

/// A final response head.
#[derive(Debug)]
pub struct ResponseHead {
    pub status: StatusCode,
    pub version: Version,
    pub headers: HeaderMap,
    pub framing: Framing,
    /// The connection may carry another request once the body has been read.
    pub keep_alive: bool,
}

/// Why a response (head or body) cannot be used; the connection is closed after any of them.
#[derive(Debug, PartialEq, Eq)]
pub enum Malformed {
    Head(String),
    TooManyHeaders,
    ContentLength,
    Chunk(&'static str),
    /// The connection closed before the body's end.
    Truncated,
}

impl std::fmt::Display for Malformed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Malformed::Head(e) => write!(f, "malformed response head: {e}"),
            Malformed::TooManyHeaders => write!(f, "more than {MAX_HEADERS} response headers"),
            Malformed::ContentLength => write!(f, "invalid or conflicting Content-Length"),
            Malformed::Chunk(e) => write!(f, "malformed chunked body: {e}"),
            Malformed::Truncated => write!(f, "the connection closed before the body ended"),
        }
    }
}

impl std::error::Error for Malformed {}

/// Parses the final response head at the start of `buf`, consuming it (and any interim 1xx
/// heads before it). `None`: more bytes are needed.
pub fn parse_response_head(
    buf: &mut BytesMut,
    method: &Method,
    max_head: usize,
) -> Result<Option<ResponseHead>, Malformed> {
    // u32 offsets below: a head is bounded far below 4 GiB.
    let max_head = max_head.min(MAX_HEAD);
    loop {
        // Left uninitialized: httparse writes the ones it returns (zeroing 100 entries per
        // response cost more than parsing them).
        let mut parsed = [std::mem::MaybeUninit::<httparse::Header<'_>>::uninit(); MAX_HEADERS];
        let mut resp = httparse::Response::new(&mut []);
        let config = httparse::ParserConfig::default();
        let len = match config.parse_response_with_uninit_headers(&mut resp, buf, &mut parsed) {
            Ok(httparse::Status::Complete(len)) if len > max_head => {
                return Err(Malformed::Head("response head too large".into()))
            }
            Ok(httparse::Status::Complete(len)) => len,
            Ok(httparse::Status::Partial) if buf.len() > max_head => {
                return Err(Malformed::Head("response head too large".into()))
            }
            Ok(httparse::Status::Partial) => return Ok(None),
            Err(httparse::Error::TooManyHeaders) => return Err(Malformed::TooManyHeaders),
            Err(e) => return Err(Malformed::Head(e.to_string())),
        };
        let code = resp.code.unwrap_or(0);
        let status =
            StatusCode::from_u16(code).map_err(|_| Malformed::Head(format!("status {code}")))?;
        let version = if resp.version == Some(0) {
            Version::HTTP_10
        } else {
            Version::HTTP_11
        };
        // Where each name and value lies in the head, so they can be sliced once it is frozen
        // (u32: a head is bounded far below 4 GiB by the caller).
        let base = buf.as_ptr() as usize;
        let mut at = [(0u32, 0u32, 0u32, 0u32); MAX_HEADERS];
        let count = resp.headers.len();
        let offset = |p: *const u8| (p as usize - base) as u32;
        for (slot, h) in at.iter_mut().zip(resp.headers.iter()) {
            let (name, value) = (offset(h.name.as_ptr()), offset(h.value.as_ptr()));
            *slot = (name, h.name.len() as u32, value, h.value.len() as u32);
        }
        let head = buf.split_to(len).freeze();
        // 101 would switch protocols; the codec never asks for that (no Upgrade is sent).
        if status.is_informational() && status != StatusCode::SWITCHING_PROTOCOLS {
            continue;
        }
        let mut headers = HeaderMap::with_capacity(count);
        let mut framed_by = FramedBy::default();
        for &(name, name_len, value, value_len) in &at[..count] {
            let (name, value) = (name as usize, value as usize);
            let (name_len, value_len) = (name_len as usize, value_len as usize);
            let name = HeaderName::from_bytes(&head[name..name + name_len])
                .map_err(|_| Malformed::Head("invalid header name".into()))?;
            let value = HeaderValue::from_maybe_shared(head.slice(value..value + value_len))
                .map_err(|_| Malformed::Head(format!("invalid value of {name}")))?;
            framed_by.note(&name);
            headers.append(name, value);
        }
        // A 101 was never asked for (no Upgrade is sent): whatever follows it is not HTTP/1.1.
        if status == StatusCode::SWITCHING_PROTOCOLS {
            return Err(Malformed::Head(
                "101 Switching Protocols, not asked for".into(),
            ));
        }
        let framing = framing(method, status, version, &headers, framed_by)?;
        let keep_alive =
            framing != Framing::UntilClose && keeps_alive(version, &headers, framed_by);
        return Ok(Some(ResponseHead {
            status,
            version,
            headers,
            framing,
            keep_alive,
        }));
    }
}

/// Which of the names the framing rules read a head carries, noted while its headers are
/// built: a comparison per name there is cheaper than hashed look-ups of names that are
/// mostly absent afterwards.
#[derive(Debug, Default, Clone, Copy)]
struct FramedBy {
    content_length: bool,
    transfer_encoding: bool,
    connection: bool,
}

impl FramedBy {
    fn note(&mut self, name: &HeaderName) {
        self.content_length |= name == CONTENT_LENGTH;
        self.transfer_encoding |= name == TRANSFER_ENCODING;
        self.connection |= name == CONNECTION;
    }
}

/// The body's framing, and false when the head framed it in a way the connection should not
/// outlive (both Transfer-Encoding and Content-Length).
fn framing(
    method: &Method,
    status: StatusCode,
    version: Version,
    headers: &HeaderMap,
    framed_by: FramedBy,
) -> Result<Framing, Malformed> {
    if method == Method::HEAD
        || status.is_informational()
        || status == StatusCode::NO_CONTENT
        || status == StatusCode::NOT_MODIFIED
    {
        return Ok(Framing::Empty);
    }
    let has_length = framed_by.content_length;
    if framed_by.transfer_encoding {
        // Both framings, or chunks from HTTP/1.0: two parsers could read two different
        // messages here (how responses are smuggled). Refused, as nginx and hyper refuse them.
        if has_length {
            return Err(Malformed::Head(
                "both Transfer-Encoding and Content-Length".into(),
            ));
        }
        if version == Version::HTTP_10 {
            return Err(Malformed::Head("Transfer-Encoding in HTTP/1.0".into()));
        }
        // The last coding of the last line decides.
        let last = headers
            .get_all(TRANSFER_ENCODING)
            .iter()
            .next_back()
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.rsplit(',').next())
            .map(str::trim);
        return Ok(if last.is_some_and(|c| c.eq_ignore_ascii_case("chunked")) {
            Framing::Chunked
        } else {
            Framing::UntilClose
        });
    }
    if !has_length {
        return Ok(Framing::UntilClose);
    }
    let mut length = None;
    for value in headers.get_all(CONTENT_LENGTH) {
        for part in value
            .to_str()
            .map_err(|_| Malformed::ContentLength)?
            .split(',')
        {
            let part = part.trim();
            if part.is_empty() || part.len() > 19 || !part.bytes().all(|b| b.is_ascii_digit()) {
                return Err(Malformed::ContentLength);
            }
            let n: u64 = part.parse().map_err(|_| Malformed::ContentLength)?;
            if length.is_some_and(|l| l != n) {
                return Err(Malformed::ContentLength);
            }
            length = Some(n);
        }
    }
    match length {
        Some(0) => Ok(Framing::Empty),
        Some(n) => Ok(Framing::Length(n)),
        None => Err(Malformed::ContentLength),
    }
}

fn keeps_alive(version: Version, headers: &HeaderMap, framed_by: FramedBy) -> bool {
    if !framed_by.connection {
        return version == Version::HTTP_11;
    }
    let mut close = false;
    let mut keep = false;
    // Bytes, not text: a value with one non-ASCII byte must not hide its `close`.
    for value in headers.get_all(CONNECTION) {
        for token in value.as_bytes().split(|&b| b == b',') {
            let token = token.trim_ascii();
            close |= token.eq_ignore_ascii_case(b"close");
            keep |= token.eq_ignore_ascii_case(b"keep-alive");
        }
    }
    !close && (version == Version::HTTP_11 || keep)
}

/// What the body decoder got from the buffered bytes.
#[derive(Debug, PartialEq, Eq)]
pub enum Decoded {
    Data(Bytes),
    /// A chunked body's trailers; the body has ended.
    Trailers(HeaderMap),
    /// Nothing yet: read more bytes into the buffer.
    NeedMore,
    /// The body has ended (the bytes after it, if any, stay in the buffer).
    Done,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Length(u64),
    UntilClose,
    SizeLine,
    Data(u64),
    DataEnd,
    Trailers,
    Done,
}

/// Takes a response body out of the connection's read buffer, frame by frame.
#[derive(Debug)]
pub struct Decoder {
    state: State,
    /// Size-line bytes a chunked body may still spend (extensions could otherwise cost a
    /// thousand bytes of work per byte of data).
    size_lines_left: usize,
}

impl Decoder {
    pub fn new(framing: Framing) -> Decoder {
        let state = match framing {
            Framing::Empty | Framing::Length(0) => State::Done,
            Framing::Length(n) => State::Length(n),
            Framing::Chunked => State::SizeLine,
            Framing::UntilClose => State::UntilClose,
        };
        Decoder {
            state,
            size_lines_left: MAX_SIZE_LINES,
        }
    }

    pub fn is_done(&self) -> bool {
        self.state == State::Done
    }

    /// Body bytes still to come, when the framing says (a length, or the end).
    pub fn remaining(&self) -> Option<u64> {
        match self.state {
            State::Length(n) => Some(n),
            State::Done => Some(0),
            _ => None,
        }
    }

    /// The next frame from `buf`.
    pub fn decode(&mut self, buf: &mut BytesMut) -> Result<Decoded, Malformed> {
        loop {
            match self.state {
                State::Done => return Ok(Decoded::Done),
                State::Length(_) | State::Data(_) if buf.is_empty() => {
                    return Ok(Decoded::NeedMore);
                }
                State::Length(left) => {
                    let (data, rest) = take(buf, left);
                    self.state = if rest == 0 {
                        State::Done
                    } else {
                        State::Length(rest)
                    };
                    return Ok(Decoded::Data(data));
                }
                State::UntilClose => {
                    if buf.is_empty() {
                        return Ok(Decoded::NeedMore);
                    }
                    return Ok(Decoded::Data(buf.split().freeze()));
                }
                State::Data(left) => {
                    let (data, rest) = take(buf, left);
                    self.state = if rest == 0 {
                        State::DataEnd
                    } else {
                        State::Data(rest)
                    };
                    return Ok(Decoded::Data(data));
                }
                State::DataEnd => {
                    if buf.len() < 2 {
                        return Ok(Decoded::NeedMore);
                    }
                    if &buf[..2] != b"\r\n" {
                        return Err(Malformed::Chunk("no CRLF after chunk data"));
                    }
                    buf.advance(2);
                    self.state = State::SizeLine;
                }
                State::SizeLine => {
                    let Some(end) = find_crlf(buf, MAX_SIZE_LINE)? else {
                        return Ok(Decoded::NeedMore);
                    };
                    let size = chunk_size(&buf[..end])?;
                    // A size line's own digits are free: data in 1-byte chunks is legal.
                    let spent = (end + 2).saturating_sub(20);
                    self.size_lines_left = self
                        .size_lines_left
                        .checked_sub(spent)
                        .ok_or(Malformed::Chunk("chunk extensions too long"))?;
                    buf.advance(end + 2);
                    self.state = if size == 0 {
                        State::Trailers
                    } else {
                        State::Data(size)
                    };
                }
                State::Trailers => {
                    if buf.starts_with(b"\r\n") {
                        buf.advance(2);
                        self.state = State::Done;
                        return Ok(Decoded::Done);
                    }
                    let mut parsed = [httparse::EMPTY_HEADER; MAX_HEADERS];
                    let (len, count) = match httparse::parse_headers(buf, &mut parsed) {
                        Ok(httparse::Status::Complete((len, _))) if len > MAX_TRAILERS => {
                            return Err(Malformed::Chunk("trailers too long"))
                        }
                        Ok(httparse::Status::Complete((len, h))) => (len, h.len()),
                        Ok(httparse::Status::Partial) if buf.len() > MAX_TRAILERS => {
                            return Err(Malformed::Chunk("trailers too long"))
                        }
                        Ok(httparse::Status::Partial) => return Ok(Decoded::NeedMore),
                        Err(_) => return Err(Malformed::Chunk("malformed trailers")),
                    };
                    if bare_lf(&buf[..len]) {
                        return Err(Malformed::Chunk("bare LF in trailers"));
                    }
                    let mut trailers = HeaderMap::with_capacity(count);
                    for h in &parsed[..count] {
                        let name = HeaderName::from_bytes(h.name.as_bytes())
                            .map_err(|_| Malformed::Chunk("invalid trailer name"))?;
                        let value = HeaderValue::from_bytes(h.value)
                            .map_err(|_| Malformed::Chunk("invalid trailer value"))?;
                        // Fields that frame or route a message never come from a trailer.
                        if !FORBIDDEN_TRAILERS.contains(&name) {
                            trailers.append(name, value);
                        }
                    }
                    buf.advance(len);
                    self.state = State::Done;
                    return Ok(Decoded::Trailers(trailers));
                }
            }
        }
    }

    /// The connection reached its end: fine only for a body read until close, or one that had
    /// already ended.
    pub fn eof(&mut self) -> Result<(), Malformed> {
        match self.state {
            State::UntilClose | State::Done => {
                self.state = State::Done;
                Ok(())
            }
            _ => Err(Malformed::Truncated),
        }
    }
}

/// Dropped from trailers (RFC 9110 section 6.5.1: framing, routing, connection control).
const FORBIDDEN_TRAILERS: [HeaderName; 7] = [
    CONTENT_LENGTH,
    TRANSFER_ENCODING,
    CONNECTION,
    hyper::header::HOST,
    hyper::header::TE,
    hyper::header::TRAILER,
    hyper::header::CONTENT_TYPE,
];

/// An LF without the CR before it.
fn bare_lf(bytes: &[u8]) -> bool {
    bytes
        .iter()
        .enumerate()
        .any(|(i, &b)| b == b'\n' && (i == 0 || bytes[i - 1] != b'\r'))
}

/// Up to `left` body bytes off the front of `buf`, and how many are still to come.
fn take(buf: &mut BytesMut, left: u64) -> (Bytes, u64) {
    let n = usize::try_from(left).map_or(buf.len(), |l| l.min(buf.len()));
    (buf.split_to(n).freeze(), left - n as u64)
}

/// Where the CRLF ending a line is, within `max` bytes.
fn find_crlf(buf: &[u8], max: usize) -> Result<Option<usize>, Malformed> {
    match buf.iter().take(max).position(|&b| b == b'\n') {
        Some(0) => Err(Malformed::Chunk("bare LF")),
        Some(i) if buf[i - 1] != b'\r' => Err(Malformed::Chunk("bare LF")),
        Some(i) => Ok(Some(i - 1)),
        None if buf.len() >= max => Err(Malformed::Chunk("chunk-size line too long")),
        None => Ok(None),
    }
}

/// The hex size at the start of a chunk-size line (extensions after `;` are ignored).
fn chunk_size(line: &[u8]) -> Result<u64, Malformed> {
    let digits = line
        .iter()
        .position(|b| !b.is_ascii_hexdigit())
        .unwrap_or(line.len());
    if digits == 0 || digits > 16 {
        return Err(Malformed::Chunk("invalid chunk size"));
    }
    // After the digits: blanks, then nothing or `;` and extensions. No CR or other control
    // byte anywhere (a CR without its LF is where two parsers part ways).
    let rest = &line[digits..];
    if rest.iter().any(|&b| b.is_ascii_control() && b != b'\t') {
        return Err(Malformed::Chunk("control byte in chunk-size line"));
    }
    let after_blanks = rest.iter().position(|b| !matches!(b, b' ' | b'\t'));
    if after_blanks.is_some_and(|i| rest[i] != b';') {
        return Err(Malformed::Chunk("invalid chunk size"));
    }
    let size = line[..digits].iter().fold(0u64, |n, &d| {
        (n << 4) | u64::from((d as char).to_digit(16).unwrap_or(0))
    });
    Ok(size)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn head(text: &str, method: &Method) -> Result<Option<ResponseHead>, Malformed> {
        let mut buf = BytesMut::from(text.as_bytes());
        parse_response_head(&mut buf, method, MAX_HEAD)
    }

    fn get(text: &str) -> ResponseHead {
        head(text, &Method::GET).expect("parses").expect("complete")
    }

    #[test]
    fn encodes_method_target_and_headers() {
        let req = hyper::Request::get("http://a.test/x?y=1")
            .header("host", "a.test")
            .header("x-forwarded-for", "10.0.0.9")
            .body(())
            .unwrap();
        let (parts, _) = req.into_parts();
        let mut out = Vec::new();
        encode_request_head(&parts, &mut out);
        assert_eq!(
            out,
            b"GET /x?y=1 HTTP/1.1\r\nhost: a.test\r\nx-forwarded-for: 10.0.0.9\r\n\r\n"
        );
    }

    #[test]
    fn a_partial_head_asks_for_more_and_keeps_the_bytes() {
        let mut buf = BytesMut::from(&b"HTTP/1.1 200 OK\r\ncontent-le"[..]);
        assert!(parse_response_head(&mut buf, &Method::GET, MAX_HEAD)
            .unwrap()
            .is_none());
        assert_eq!(buf.len(), 27);
    }

    #[test]
    fn content_length_frames_and_leaves_the_body_in_the_buffer() {
        let mut buf =
            BytesMut::from(&b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\nx-a: b\r\n\r\nhello"[..]);
        let h = parse_response_head(&mut buf, &Method::GET, MAX_HEAD)
            .unwrap()
            .unwrap();
        assert_eq!(h.status, StatusCode::OK);
        assert_eq!(h.framing, Framing::Length(5));
        assert!(h.keep_alive);
        assert_eq!(h.headers["x-a"], "b");
        assert_eq!(&buf[..], b"hello");
    }

    #[test]
    fn interim_answers_are_skipped() {
        let h = get("HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nlink: </a>\r\n\r\nHTTP/1.1 204 No Content\r\n\r\n");
        assert_eq!(h.status, StatusCode::NO_CONTENT);
        assert_eq!(h.framing, Framing::Empty);
        assert!(!h.headers.contains_key("link"));
    }

    #[test]
    fn no_body_for_head_204_and_304_whatever_the_length_says() {
        let h = head(
            "HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\n",
            &Method::HEAD,
        )
        .unwrap()
        .unwrap();
        assert_eq!(h.framing, Framing::Empty);
        assert!(h.keep_alive);
        for status in ["204 No Content", "304 Not Modified"] {
            let h = get(&format!("HTTP/1.1 {status}\r\ncontent-length: 10\r\n\r\n"));
            assert_eq!(h.framing, Framing::Empty, "{status}");
            assert!(h.keep_alive);
        }
    }

    #[test]
    fn ambiguous_framing_is_refused() {
        for text in [
            "HTTP/1.1 200 OK\r\ntransfer-encoding: gzip, chunked\r\ncontent-length: 3\r\n\r\n",
            "HTTP/1.0 200 OK\r\nconnection: keep-alive\r\ntransfer-encoding: chunked\r\n\r\n",
            "HTTP/1.1 101 Switching Protocols\r\nupgrade: websocket\r\n\r\n",
        ] {
            assert!(
                matches!(head(text, &Method::GET), Err(Malformed::Head(_))),
                "{text:?}"
            );
        }
        let h = get("HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n");
        assert_eq!(h.framing, Framing::Chunked);
        assert!(h.keep_alive);
        // The last line's last coding decides.
        let h =
            get("HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\ntransfer-encoding: gzip\r\n\r\n");
        assert_eq!(h.framing, Framing::UntilClose);
    }

    #[test]
    fn empty_header_values_are_sliced_right() {
        let h = get("HTTP/1.1 200 OK\r\nx-e:\r\nx-f: \r\nx-g: g\r\ncontent-length: 0\r\n\r\n");
        assert_eq!(h.headers["x-e"], "");
        assert_eq!(h.headers["x-f"], "");
        assert_eq!(h.headers["x-g"], "g");
    }

    #[test]
    fn a_close_among_unreadable_bytes_still_closes() {
        let mut buf = BytesMut::from(
            &b"HTTP/1.1 200 OK\r\nconnection: close, \xff\r\ncontent-length: 0\r\n\r\n"[..],
        );
        let h = parse_response_head(&mut buf, &Method::GET, MAX_HEAD)
            .unwrap()
            .unwrap();
        assert!(!h.keep_alive);
        let two = "HTTP/1.1 200 OK\r\nconnection: keep-alive\r\nconnection: close\r\ncontent-length: 0\r\n\r\n";
        assert!(!get(two).keep_alive);
    }

    #[test]
    fn a_coding_other_than_chunked_last_reads_until_close() {
        let h = get("HTTP/1.1 200 OK\r\ntransfer-encoding: chunked, gzip\r\n\r\n");
        assert_eq!(h.framing, Framing::UntilClose);
        assert!(!h.keep_alive);
    }

    #[test]
    fn no_length_reads_until_close() {
        let h = get("HTTP/1.1 200 OK\r\n\r\n");
        assert_eq!(h.framing, Framing::UntilClose);
        assert!(!h.keep_alive);
    }

    #[test]
    fn lengths_must_agree_and_be_digits() {
        assert_eq!(
            get("HTTP/1.1 200 OK\r\ncontent-length: 4, 4\r\ncontent-length: 4\r\n\r\n").framing,
            Framing::Length(4)
        );
        for bad in [
            "4, 5",
            "+4",
            "-1",
            "0x10",
            "",
            "4 4",
            "99999999999999999999",
        ] {
            let text = format!("HTTP/1.1 200 OK\r\ncontent-length: {bad}\r\n\r\n");
            assert_eq!(
                head(&text, &Method::GET).unwrap_err(),
                Malformed::ContentLength,
                "{bad:?}"
            );
        }
        let two = "HTTP/1.1 200 OK\r\ncontent-length: 4\r\ncontent-length: 5\r\n\r\n";
        assert_eq!(
            head(two, &Method::GET).unwrap_err(),
            Malformed::ContentLength
        );
    }

    #[test]
    fn keep_alive_follows_version_and_connection() {
        assert!(
            !get("HTTP/1.1 200 OK\r\nconnection: Close\r\ncontent-length: 0\r\n\r\n").keep_alive
        );
        assert!(!get("HTTP/1.0 200 OK\r\ncontent-length: 0\r\n\r\n").keep_alive);
        let h = get("HTTP/1.0 200 OK\r\nconnection: keep-alive\r\ncontent-length: 0\r\n\r\n");
        assert!(h.keep_alive);
        assert_eq!(h.version, Version::HTTP_10);
    }

    #[test]
    fn bad_heads_are_errors() {
        assert!(matches!(
            head("HTTP/1.1 200 OK\r\nbad header\r\n\r\n", &Method::GET),
            Err(Malformed::Head(_))
        ));
        assert!(matches!(
            head("HTTP/1.1 2000 OK\r\n\r\n", &Method::GET),
            Err(Malformed::Head(_))
        ));
        let many: String = (0..=MAX_HEADERS).map(|i| format!("x-{i}: v\r\n")).collect();
        assert_eq!(
            head(&format!("HTTP/1.1 200 OK\r\n{many}\r\n"), &Method::GET).unwrap_err(),
            Malformed::TooManyHeaders
        );
    }

    /// Feeds `wire` to a decoder `step` bytes at a time; returns the data, the trailers, and
    /// the bytes after the body (those left in the buffer, then those never fed).
    fn decode_all(
        framing: Framing,
        wire: &[u8],
        step: usize,
    ) -> (Vec<u8>, Option<HeaderMap>, Vec<u8>) {
        let mut d = Decoder::new(framing);
        let mut buf = BytesMut::new();
        let (mut data, mut trailers) = (Vec::new(), None);
        let mut fed = 0;
        loop {
            match d.decode(&mut buf).expect("decodes") {
                Decoded::Data(b) => data.extend_from_slice(&b),
                Decoded::Trailers(t) => trailers = Some(t),
                Decoded::Done => return (data, trailers, [&buf[..], &wire[fed..]].concat()),
                Decoded::NeedMore => {
                    assert!(fed < wire.len(), "ran out of input");
                    let end = (fed + step).min(wire.len());
                    buf.extend_from_slice(&wire[fed..end]);
                    fed = end;
                }
            }
        }
    }

    #[test]
    fn chunked_bodies_decode_whatever_the_reads() {
        let wire = b"5\r\nhello\r\n7;ext=1\r\n, world\r\n0\r\nx-sum: 12\r\n\r\nNEXT";
        for step in [1, 2, 3, 7, 64] {
            let (data, trailers, rest) = decode_all(Framing::Chunked, wire, step);
            assert_eq!(data, b"hello, world", "step {step}");
            assert_eq!(trailers.expect("trailers")["x-sum"], "12");
            // What follows the body is the next response's: it stays (when it was read).
            assert_eq!(rest, b"NEXT", "step {step}");
        }
        let (data, trailers, _) = decode_all(Framing::Chunked, b"3\r\nabc\r\n0\r\n\r\n", 1);
        assert_eq!(data, b"abc");
        assert!(trailers.is_none());
    }

    /// Random bodies in random chunk sizes (some with extensions and trailers), fed in random
    /// read sizes: what comes out is what went in, and the next response's bytes stay.
    #[test]
    fn random_chunked_bodies_round_trip() {
        let mut rng = fastrand::Rng::with_seed(11);
        for _ in 0..300 {
            let body: Vec<u8> = (0..rng.usize(0..3000)).map(|_| rng.u8(..)).collect();
            let mut wire = Vec::new();
            let mut rest = &body[..];
            while !rest.is_empty() {
                let n = rng.usize(1..=rest.len().min(700));
                let ext = if rng.bool() { ";a=b" } else { "" };
                let hex = if rng.bool() {
                    format!("{n:x}")
                } else {
                    format!("{n:X}")
                };
                wire.extend_from_slice(format!("{hex}{ext}\r\n").as_bytes());
                wire.extend_from_slice(&rest[..n]);
                wire.extend_from_slice(b"\r\n");
                rest = &rest[n..];
            }
            let trailer = rng.bool();
            wire.extend_from_slice(if trailer {
                b"0\r\nx-t: 1\r\n\r\n"
            } else {
                b"0\r\n\r\n"
            });
            wire.extend_from_slice(b"HTTP/1.1");
            let step = rng.usize(1..200);
            let (data, trailers, left) = decode_all(Framing::Chunked, &wire, step);
            assert_eq!(data, body, "step {step}");
            assert_eq!(trailers.is_some(), trailer);
            assert_eq!(left, b"HTTP/1.1");
        }
    }

    #[test]
    fn length_bodies_stop_at_their_length() {
        for step in [1, 3, 64] {
            let (data, _, rest) = decode_all(Framing::Length(5), b"helloHTTP", step);
            assert_eq!(data, b"hello");
            assert_eq!(rest, b"HTTP");
        }
    }

    #[test]
    fn bad_chunks_are_errors() {
        for wire in [
            &b"z\r\n"[..],
            b"5\nhello",
            b"12345678901234567\r\n",
            b"5\r\nhelloXX",
            b"5 x\r\n",
            b"5;a\rX\r\nhello\r\n",
            b"0\r\nx: y\n\n",
        ] {
            let mut d = Decoder::new(Framing::Chunked);
            let mut buf = BytesMut::from(wire);
            let mut result = Ok(Decoded::NeedMore);
            for _ in 0..4 {
                result = d.decode(&mut buf);
                if !matches!(result, Ok(Decoded::Data(_))) {
                    break;
                }
            }
            assert!(
                result.is_err(),
                "{:?} gave {result:?}",
                String::from_utf8_lossy(wire)
            );
        }
        let mut d = Decoder::new(Framing::Chunked);
        let mut buf = BytesMut::from(&[b'1'; MAX_SIZE_LINE][..]);
        assert!(d.decode(&mut buf).is_err(), "an endless size line");
        // Just under the bound is a size line like any other.
        let mut line = b"1;".to_vec();
        line.resize(MAX_SIZE_LINE - 2, b'x');
        line.extend_from_slice(b"\r\nA\r\n0\r\n\r\n");
        let (data, _, _) = decode_all(Framing::Chunked, &line, 64);
        assert_eq!(data, b"A");
        // Blanks before the end of a size line are fine.
        let (data, _, _) = decode_all(Framing::Chunked, b"1 \r\nB\r\n0\r\n\r\n", 64);
        assert_eq!(data, b"B");
    }

    #[test]
    fn extensions_are_bounded_per_body() {
        let mut wire = Vec::new();
        for _ in 0..40 {
            wire.extend_from_slice(b"1;");
            wire.extend_from_slice(&[b'e'; 500]);
            wire.extend_from_slice(b"\r\nA\r\n");
        }
        let mut d = Decoder::new(Framing::Chunked);
        let mut buf = BytesMut::from(&wire[..]);
        let err = loop {
            match d.decode(&mut buf) {
                Ok(Decoded::Data(_)) => continue,
                other => break other,
            }
        };
        assert_eq!(err, Err(Malformed::Chunk("chunk extensions too long")));
        // Plain 1-byte chunks spend nothing of it.
        let mut wire: Vec<u8> = (0..20_000).flat_map(|_| b"1\r\nA\r\n".to_vec()).collect();
        wire.extend_from_slice(b"0\r\n\r\n");
        let (data, _, _) = decode_all(Framing::Chunked, &wire, 4096);
        assert_eq!(data.len(), 20_000);
    }

    #[test]
    fn trailers_are_bounded_and_cleaned() {
        let (_, trailers, _) = decode_all(
            Framing::Chunked,
            b"0\r\ncontent-length: 9\r\nhost: evil\r\nx-sum: 1\r\n\r\n",
            64,
        );
        let trailers = trailers.expect("trailers");
        assert_eq!(trailers.len(), 1);
        assert_eq!(trailers["x-sum"], "1");
        let mut wire = b"0\r\n".to_vec();
        for i in 0..40 {
            wire.extend_from_slice(format!("x-{i}: {}\r\n", "v".repeat(500)).as_bytes());
        }
        wire.extend_from_slice(b"\r\n");
        let mut d = Decoder::new(Framing::Chunked);
        let mut buf = BytesMut::from(&wire[..]);
        assert_eq!(
            d.decode(&mut buf),
            Err(Malformed::Chunk("trailers too long"))
        );
    }

    #[test]
    fn the_end_of_the_connection_ends_only_a_body_read_until_close() {
        let mut d = Decoder::new(Framing::UntilClose);
        let mut buf = BytesMut::from(&b"all of it"[..]);
        assert_eq!(
            d.decode(&mut buf).unwrap(),
            Decoded::Data(Bytes::from_static(b"all of it"))
        );
        assert_eq!(d.decode(&mut buf).unwrap(), Decoded::NeedMore);
        assert_eq!(d.eof(), Ok(()));
        assert!(d.is_done());
        assert_eq!(
            Decoder::new(Framing::Length(3)).eof(),
            Err(Malformed::Truncated)
        );
        assert_eq!(
            Decoder::new(Framing::Chunked).eof(),
            Err(Malformed::Truncated)
        );
        assert_eq!(Decoder::new(Framing::Empty).eof(), Ok(()));
    }
}
