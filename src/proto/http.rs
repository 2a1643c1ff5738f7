//! HTTP/1.1 request-head parsing and the RFC 6455 upgrade decision, sans-IO.
//!
//! Owns turning raw bytes into an owned [`Request`] (via `httparse`), deciding whether a request
//! is a valid WebSocket opening handshake, and formatting the small responses the server sends
//! (`101 Switching Protocols`, errors, plain bodies).
//!
//! Invariant: a request head is never accepted beyond [`MAX_HEAD_BYTES`] or 64 headers, and every
//! response produced here is a complete, well-formed HTTP/1.1 message (header values are
//! stripped of CR/LF so callers cannot inject headers by accident).

use std::fmt;
use tungstenite::handshake::derive_accept_key;

/// Largest request head (request line + headers + blank line) we accept.
pub const MAX_HEAD_BYTES: usize = 16 * 1024;

const MAX_HEADERS: usize = 64;

/// An owned, parsed request head.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    /// e.g. "GET".
    pub method: String,
    /// Request target up to '?', e.g. "/ws".
    pub path: String,
    /// Raw query after '?', "" if none.
    pub query: String,
    /// Minor version: 0 or 1 (HTTP/1.0 or HTTP/1.1).
    pub version: u8,
    /// Names lower-cased, values as sent (trimmed; non-UTF-8 bytes replaced).
    pub headers: Vec<(String, String)>,
}

impl Request {
    /// First value of header `name` (given lower-case).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    /// Whether any `name` header (lower-case) holds `token` in its comma-separated list,
    /// compared case-insensitively.
    pub fn has_token(&self, name: &str, token: &str) -> bool {
        self.tokens(name).any(|t| t.eq_ignore_ascii_case(token))
    }

    /// First query parameter `name`, percent-decoded ('+' → space). A key without '=' yields "".
    pub fn query_param(&self, name: &str) -> Option<String> {
        self.query
            .split('&')
            .filter(|pair| !pair.is_empty())
            .map(|pair| pair.split_once('=').unwrap_or((pair, "")))
            .find(|(k, _)| percent_decode(k) == name)
            .map(|(_, v)| percent_decode(v))
    }

    /// Declared body length; 0 if absent. Conflicting or non-numeric values, and any
    /// `Transfer-Encoding` (unsupported; would desynchronise framing), are errors.
    pub fn content_length(&self) -> Result<usize, HeadError> {
        if self.header("transfer-encoding").is_some() {
            return Err(HeadError::Malformed("Transfer-Encoding not supported"));
        }
        let mut found: Option<usize> = None;
        for (_, value) in self.headers.iter().filter(|(n, _)| n == "content-length") {
            if value.is_empty() || !value.bytes().all(|b| b.is_ascii_digit()) {
                return Err(HeadError::BadContentLength);
            }
            let len = value.parse().map_err(|_| HeadError::BadContentLength)?;
            if found.is_some_and(|f| f != len) {
                return Err(HeadError::BadContentLength);
            }
            found = Some(len);
        }
        Ok(found.unwrap_or(0))
    }

    /// HTTP/1.1: true unless `Connection: close`. HTTP/1.0: only with `Connection: keep-alive`.
    pub fn keep_alive(&self) -> bool {
        if self.version >= 1 {
            !self.has_token("connection", "close")
        } else {
            self.has_token("connection", "keep-alive")
        }
    }

    /// The comma-separated items of every `name` header (lower-case), trimmed, in order.
    pub fn tokens<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a str> + 'a {
        self.headers
            .iter()
            .filter(move |(n, _)| n == name)
            .flat_map(|(_, v)| v.split(','))
            .map(str::trim)
            .filter(|t| !t.is_empty())
    }
}

/// Outcome of [`parse_request`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Parse {
    /// More bytes needed (and the head still fits in [`MAX_HEAD_BYTES`]).
    Partial,
    /// A complete head occupying `buf[..head_len]`; any body follows.
    Complete { request: Request, head_len: usize },
}

/// Why a request head was rejected; [`HeadError::status`] gives the response status.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HeadError {
    /// Head exceeds [`MAX_HEAD_BYTES`] (431).
    TooLarge,
    /// More than 64 headers (431).
    TooManyHeaders,
    /// Syntax error (400).
    Malformed(&'static str),
    /// Invalid or conflicting Content-Length (400).
    BadContentLength,
}

impl HeadError {
    pub fn status(&self) -> u16 {
        match self {
            HeadError::TooLarge | HeadError::TooManyHeaders => 431,
            HeadError::Malformed(_) | HeadError::BadContentLength => 400,
        }
    }

    pub fn reason(&self) -> &'static str {
        match self {
            HeadError::TooLarge => "request head too large",
            HeadError::TooManyHeaders => "too many headers",
            HeadError::Malformed(why) => why,
            HeadError::BadContentLength => "invalid Content-Length",
        }
    }
}

impl fmt::Display for HeadError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.reason())
    }
}

impl std::error::Error for HeadError {}

/// Parses the request head at the front of `buf` (up to 64 headers, [`MAX_HEAD_BYTES`]).
pub fn parse_request(buf: &[u8]) -> Result<Parse, HeadError> {
    let window = &buf[..buf.len().min(MAX_HEAD_BYTES)];
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut headers);
    let head_len = match req.parse(window) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) if buf.len() >= MAX_HEAD_BYTES => {
            return Err(HeadError::TooLarge);
        }
        Ok(httparse::Status::Partial) => return Ok(Parse::Partial),
        Err(e) => return Err(map_httparse_error(e)),
    };
    let (Some(method), Some(target), Some(version)) = (req.method, req.path, req.version) else {
        return Err(HeadError::Malformed("incomplete request line"));
    };
    if req
        .headers
        .iter()
        .filter(|h| h.name.eq_ignore_ascii_case("host"))
        .count()
        > 1
    {
        return Err(HeadError::Malformed("more than one Host header"));
    }
    let (path, query) = target.split_once('?').unwrap_or((target, ""));
    let headers = req
        .headers
        .iter()
        .map(|h| {
            let value = String::from_utf8_lossy(h.value).trim().to_owned();
            (h.name.to_ascii_lowercase(), value)
        })
        .collect();
    Ok(Parse::Complete {
        request: Request {
            method: method.to_owned(),
            path: path.to_owned(),
            query: query.to_owned(),
            version,
            headers,
        },
        head_len,
    })
}

fn map_httparse_error(e: httparse::Error) -> HeadError {
    match e {
        httparse::Error::TooManyHeaders => HeadError::TooManyHeaders,
        httparse::Error::HeaderName => HeadError::Malformed("invalid header name"),
        httparse::Error::HeaderValue => HeadError::Malformed("invalid header value"),
        httparse::Error::NewLine => HeadError::Malformed("invalid line ending"),
        httparse::Error::Status => HeadError::Malformed("invalid status"),
        httparse::Error::Token => HeadError::Malformed("invalid token"),
        httparse::Error::Version => HeadError::Malformed("invalid HTTP version"),
    }
}

/// An accepted WebSocket upgrade.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Upgrade {
    /// The client's `Sec-WebSocket-Key`, as sent.
    pub key: String,
    /// Offered subprotocols in order, trimmed.
    pub protocols: Vec<String>,
}

/// Why an upgrade was refused. Send [`Refusal::response`] (or `status` plus
/// [`Refusal::headers`]) and close.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Refusal {
    pub status: u16,
    pub reason: &'static str,
}

impl Refusal {
    /// Headers the response must carry: `Allow: GET` for 405, `Sec-WebSocket-Version: 13` for 426.
    pub fn headers(&self) -> &'static [(&'static str, &'static str)] {
        match self.status {
            405 => &[("Allow", "GET")],
            426 => &[("Sec-WebSocket-Version", "13")],
            _ => &[],
        }
    }

    /// A complete `text/plain` response with `reason` as body and `Connection: close`.
    pub fn response(&self) -> Vec<u8> {
        let body = format!("{}\n", self.reason);
        response(
            self.status,
            "text/plain; charset=utf-8",
            self.headers(),
            body.as_bytes(),
            false,
        )
    }
}

const fn refuse(status: u16, reason: &'static str) -> Refusal {
    Refusal { status, reason }
}

/// Decides whether `req` is a valid RFC 6455 (§4.2.1) opening handshake: GET, HTTP/1.1,
/// `Upgrade: websocket`, `Connection: upgrade` (token lists, case-insensitive),
/// `Sec-WebSocket-Version: 13` and a `Sec-WebSocket-Key` that base64-decodes to 16 bytes.
pub fn websocket_upgrade(req: &Request) -> Result<Upgrade, Refusal> {
    if req.method != "GET" {
        return Err(refuse(405, "WebSocket upgrade requires GET"));
    }
    if req.version < 1 {
        return Err(refuse(400, "WebSocket upgrade requires HTTP/1.1"));
    }
    if !req.has_token("upgrade", "websocket") {
        return Err(refuse(400, "missing Upgrade: websocket"));
    }
    if !req.has_token("connection", "upgrade") {
        return Err(refuse(400, "missing Connection: upgrade"));
    }
    for (name, what) in [
        ("sec-websocket-key", "more than one Sec-WebSocket-Key"),
        (
            "sec-websocket-version",
            "more than one Sec-WebSocket-Version",
        ),
    ] {
        if req.headers.iter().filter(|(n, _)| n == name).count() > 1 {
            return Err(refuse(400, what));
        }
    }
    match req.header("sec-websocket-version") {
        Some("13") => {}
        Some(_) => return Err(refuse(426, "unsupported Sec-WebSocket-Version")),
        None => return Err(refuse(426, "missing Sec-WebSocket-Version")),
    }
    let key = match req.header("sec-websocket-key") {
        Some(key) if is_base64_16(key) => key,
        Some(_) => return Err(refuse(400, "invalid Sec-WebSocket-Key")),
        None => return Err(refuse(400, "missing Sec-WebSocket-Key")),
    };
    Ok(Upgrade {
        key: key.to_owned(),
        protocols: req
            .tokens("sec-websocket-protocol")
            .map(str::to_owned)
            .collect(),
    })
}

/// Whether the request carries `Upgrade: websocket` at all (valid or not).
pub fn is_upgrade_request(req: &Request) -> bool {
    req.has_token("upgrade", "websocket")
}

/// `101 Switching Protocols` completing the handshake for `key`, echoing `protocol` if chosen
/// and naming the accepted `extensions`, if any.
pub fn accept_response(key: &str, protocol: Option<&str>, extensions: Option<&str>) -> Vec<u8> {
    let mut out = format!(
        "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Accept: {}\r\n",
        derive_accept_key(key.as_bytes())
    );
    if let Some(protocol) = protocol {
        push_header(&mut out, "Sec-WebSocket-Protocol", protocol);
    }
    if let Some(extensions) = extensions {
        push_header(&mut out, "Sec-WebSocket-Extensions", extensions);
    }
    out.push_str("\r\n");
    out.into_bytes()
}

/// A complete small HTTP/1.1 response: status line, `Content-Type`, `Content-Length`,
/// `extra_headers`, `Connection: close` when `!keep_alive`, blank line, `body`.
pub fn response(
    status: u16,
    content_type: &str,
    extra_headers: &[(&str, &str)],
    body: &[u8],
    keep_alive: bool,
) -> Vec<u8> {
    let mut head = format!("HTTP/1.1 {status} {}\r\n", reason_phrase(status));
    push_header(&mut head, "Content-Type", content_type);
    push_header(&mut head, "Content-Length", &body.len().to_string());
    for (name, value) in extra_headers {
        push_header(&mut head, name, value);
    }
    if !keep_alive {
        head.push_str("Connection: close\r\n");
    }
    head.push_str("\r\n");
    let mut out = head.into_bytes();
    out.extend_from_slice(body);
    out
}

/// Standard reason phrase for `status`; "" for codes we never send.
pub fn reason_phrase(status: u16) -> &'static str {
    match status {
        100 => "Continue",
        101 => "Switching Protocols",
        200 => "OK",
        201 => "Created",
        202 => "Accepted",
        204 => "No Content",
        301 => "Moved Permanently",
        302 => "Found",
        304 => "Not Modified",
        307 => "Temporary Redirect",
        308 => "Permanent Redirect",
        400 => "Bad Request",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        409 => "Conflict",
        411 => "Length Required",
        413 => "Content Too Large",
        414 => "URI Too Long",
        415 => "Unsupported Media Type",
        426 => "Upgrade Required",
        429 => "Too Many Requests",
        431 => "Request Header Fields Too Large",
        500 => "Internal Server Error",
        501 => "Not Implemented",
        502 => "Bad Gateway",
        503 => "Service Unavailable",
        504 => "Gateway Timeout",
        505 => "HTTP Version Not Supported",
        _ => "",
    }
}

/// Appends `name: value\r\n`, dropping any CR/LF so a header can never be split.
fn push_header(out: &mut String, name: &str, value: &str) {
    let clean = |s: &str| {
        s.chars()
            .filter(|c| !matches!(c, '\r' | '\n'))
            .collect::<String>()
    };
    out.push_str(&clean(name));
    out.push_str(": ");
    out.push_str(&clean(value));
    out.push_str("\r\n");
}

/// Percent-decodes `s` ('+' → space); malformed escapes are kept literally, invalid UTF-8 is
/// replaced.
fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' => match (
                bytes.get(i + 1).and_then(hex),
                bytes.get(i + 2).and_then(hex),
            ) {
                (Some(hi), Some(lo)) => {
                    out.push(hi << 4 | lo);
                    i += 2;
                }
                _ => out.push(b'%'),
            },
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn hex(b: &u8) -> Option<u8> {
    (*b as char).to_digit(16).map(|d| d as u8)
}

/// Whether `key` is standard base64 for exactly 16 bytes: 22 alphabet chars then "==".
fn is_base64_16(key: &str) -> bool {
    let b = key.as_bytes();
    b.len() == 24
        && &b[22..] == b"=="
        && b[..22]
            .iter()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'+' | b'/'))
}

/// Incremental decoder of a `Transfer-Encoding: chunked` request body (RFC 9112 §7.1): hands
/// out data as soon as it is buffered, not chunk by chunk, and keeps nothing of it.
#[derive(Debug, Default)]
pub struct ChunkedBody {
    state: ChunkState,
    /// Trailer bytes seen so far (bounded).
    trailer_bytes: usize,
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
enum ChunkState {
    #[default]
    Size,
    Data(usize),
    DataEnd,
    Trailers,
    Done,
}

/// What [`ChunkedBody::next`] found.
#[derive(Debug, PartialEq, Eq)]
pub enum BodyPart {
    Data(bytes::Bytes),
    /// Read more, then call again.
    More,
    /// The body is complete (the zero chunk and the trailers are consumed).
    End,
}

/// Longest chunk-size line (with extensions) and longest trailer section accepted.
const MAX_CHUNK_LINE: usize = 1024;
const MAX_TRAILERS: usize = 8 * 1024;

impl ChunkedBody {
    /// The next piece of the body at the front of `buf`, consuming what it used.
    pub fn next(&mut self, buf: &mut bytes::BytesMut) -> Result<BodyPart, HeadError> {
        loop {
            match self.state {
                ChunkState::Done => return Ok(BodyPart::End),
                ChunkState::Size => {
                    // The same bound however the line arrives: a buffered line and its CR
                    // may wait for the LF; a whole line may not be longer either.
                    let Some(end) = find_crlf(buf) else {
                        if buf.len() > MAX_CHUNK_LINE + 1 {
                            return Err(HeadError::Malformed("chunk size line too long"));
                        }
                        return Ok(BodyPart::More);
                    };
                    if end > MAX_CHUNK_LINE {
                        return Err(HeadError::Malformed("chunk size line too long"));
                    }
                    let line = buf.split_to(end + 2);
                    let size = parse_chunk_size(&line[..end])?;
                    self.state = if size == 0 {
                        ChunkState::Trailers
                    } else {
                        ChunkState::Data(size)
                    };
                }
                ChunkState::Data(left) => {
                    if buf.is_empty() {
                        return Ok(BodyPart::More);
                    }
                    let take = left.min(buf.len());
                    let data = buf.split_to(take).freeze();
                    self.state = if take == left {
                        ChunkState::DataEnd
                    } else {
                        ChunkState::Data(left - take)
                    };
                    return Ok(BodyPart::Data(data));
                }
                ChunkState::DataEnd => {
                    if buf.len() < 2 {
                        return Ok(BodyPart::More);
                    }
                    if &buf[..2] != b"\r\n" {
                        return Err(HeadError::Malformed("chunk data not followed by CRLF"));
                    }
                    let _ = buf.split_to(2);
                    self.state = ChunkState::Size;
                }
                ChunkState::Trailers => {
                    let Some(end) = find_crlf(buf) else {
                        if self.trailer_bytes + buf.len() > MAX_TRAILERS {
                            return Err(HeadError::Malformed("chunked trailers too long"));
                        }
                        return Ok(BodyPart::More);
                    };
                    let _ = buf.split_to(end + 2);
                    self.trailer_bytes += end + 2;
                    if self.trailer_bytes > MAX_TRAILERS {
                        return Err(HeadError::Malformed("chunked trailers too long"));
                    }
                    if end == 0 {
                        self.state = ChunkState::Done;
                    }
                }
            }
        }
    }
}

fn find_crlf(buf: &[u8]) -> Option<usize> {
    buf.windows(2).position(|w| w == b"\r\n")
}

/// `1a3f` or `1a3f;name=value`: hex digits, at most 15 of them (no overflow).
fn parse_chunk_size(line: &[u8]) -> Result<usize, HeadError> {
    let digits = line
        .split(|&b| b == b';')
        .next()
        .unwrap_or_default()
        .trim_ascii_end();
    if digits.is_empty() || digits.len() > 15 || !digits.iter().all(u8::is_ascii_hexdigit) {
        return Err(HeadError::Malformed("bad chunk size"));
    }
    let text = std::str::from_utf8(digits).map_err(|_| HeadError::Malformed("bad chunk size"))?;
    usize::from_str_radix(text, 16).map_err(|_| HeadError::Malformed("bad chunk size"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const UPGRADE: &[u8] = b"GET /ws?token=a%20b&x=1+2 HTTP/1.1\r\n\
        Host: example.com\r\n\
        Upgrade: websocket\r\n\
        Connection: keep-alive, Upgrade\r\n\
        Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
        Sec-WebSocket-Protocol: chat , superchat\r\n\
        Sec-WebSocket-Version: 13\r\n\r\n";

    fn req(bytes: &[u8]) -> Request {
        match parse_request(bytes) {
            Ok(Parse::Complete { request, .. }) => request,
            other => panic!("not complete: {other:?}"),
        }
    }

    fn get(headers: &[(&str, &str)]) -> Request {
        let mut s = String::from("GET /ws HTTP/1.1\r\nHost: h\r\n");
        for (n, v) in headers {
            s.push_str(&format!("{n}: {v}\r\n"));
        }
        s.push_str("\r\n");
        req(s.as_bytes())
    }

    fn good_headers() -> Vec<(&'static str, &'static str)> {
        vec![
            ("Upgrade", "websocket"),
            ("Connection", "Upgrade"),
            ("Sec-WebSocket-Version", "13"),
            ("Sec-WebSocket-Key", "dGhlIHNhbXBsZSBub25jZQ=="),
        ]
    }

    #[test]
    fn a_duplicate_host_key_or_version_is_refused() {
        let twice_host = b"GET / HTTP/1.1\r\nHost: a\r\nhost: b\r\n\r\n";
        assert_eq!(
            parse_request(twice_host),
            Err(HeadError::Malformed("more than one Host header"))
        );
        for name in ["Sec-WebSocket-Key", "Sec-WebSocket-Version"] {
            let mut headers = good_headers();
            let value = headers.iter().find(|(n, _)| *n == name).unwrap().1;
            headers.push((name, value)); // the same value twice is still ambiguous
            let refusal = websocket_upgrade(&get(&headers)).unwrap_err();
            assert_eq!(refusal.status, 400, "{name}");
            assert!(refusal.reason.contains(name), "{name}: {}", refusal.reason);
        }
        assert!(websocket_upgrade(&get(&good_headers())).is_ok());
    }

    #[test]
    fn parses_upgrade_request() {
        let mut buf = UPGRADE.to_vec();
        buf.extend_from_slice(b"trailing");
        let Ok(Parse::Complete { request, head_len }) = parse_request(&buf) else {
            panic!("incomplete");
        };
        assert_eq!(head_len, UPGRADE.len());
        assert_eq!(request.method, "GET");
        assert_eq!(request.path, "/ws");
        assert_eq!(request.query, "token=a%20b&x=1+2");
        assert_eq!(request.version, 1);
        assert_eq!(request.header("host"), Some("example.com"));
        assert_eq!(request.header("Host"), None);
        assert_eq!(request.content_length(), Ok(0));
        let up = websocket_upgrade(&request).unwrap();
        assert_eq!(up.key, "dGhlIHNhbXBsZSBub25jZQ==");
        assert_eq!(up.protocols, ["chat", "superchat"]);
        assert!(is_upgrade_request(&request));
    }

    #[test]
    fn every_prefix_is_partial() {
        for i in 0..UPGRADE.len() {
            assert_eq!(
                parse_request(&UPGRADE[..i]),
                Ok(Parse::Partial),
                "prefix {i}"
            );
        }
    }

    #[test]
    fn oversize_head() {
        let mut big = b"GET / HTTP/1.1\r\nX-Pad: ".to_vec();
        big.resize(MAX_HEAD_BYTES, b'a');
        assert_eq!(parse_request(&big), Err(HeadError::TooLarge));
        big.extend_from_slice(b"\r\n\r\n");
        assert_eq!(parse_request(&big), Err(HeadError::TooLarge));
        assert_eq!(HeadError::TooLarge.status(), 431);
        // A head of exactly MAX_HEAD_BYTES is fine.
        let mut exact = b"GET / HTTP/1.1\r\nX-Pad: ".to_vec();
        exact.resize(MAX_HEAD_BYTES - 4, b'a');
        exact.extend_from_slice(b"\r\n\r\n");
        assert!(matches!(
            parse_request(&exact),
            Ok(Parse::Complete { head_len, .. }) if head_len == MAX_HEAD_BYTES
        ));
    }

    #[test]
    fn too_many_headers_and_malformed() {
        let mut s = String::from("GET / HTTP/1.1\r\n");
        for i in 0..65 {
            s.push_str(&format!("X-{i}: v\r\n"));
        }
        s.push_str("\r\n");
        let err = parse_request(s.as_bytes()).unwrap_err();
        assert_eq!(err, HeadError::TooManyHeaders);
        assert_eq!(err.status(), 431);
        let err = parse_request(b"GET / HTTP/1.1\r\nBad Name: x\r\n\r\n").unwrap_err();
        assert!(matches!(err, HeadError::Malformed(_)));
        assert_eq!(err.status(), 400);
        assert!(parse_request(b"GET / HTTP/2.0\r\n\r\n").is_err());
    }

    #[test]
    fn query_params() {
        let mut r = get(&[]);
        r.query = "a=1&b=hello%20w%C3%B6rld&c=x+y&b=second&flag&e=%zz%4&k%65y=v".into();
        assert_eq!(r.query_param("a").as_deref(), Some("1"));
        assert_eq!(r.query_param("b").as_deref(), Some("hello wörld"));
        assert_eq!(r.query_param("c").as_deref(), Some("x y"));
        assert_eq!(r.query_param("flag").as_deref(), Some(""));
        assert_eq!(r.query_param("e").as_deref(), Some("%zz%4"));
        assert_eq!(r.query_param("key").as_deref(), Some("v"));
        assert_eq!(r.query_param("missing"), None);
        r.query.clear();
        assert_eq!(r.query_param("a"), None);
    }

    #[test]
    fn content_length_rules() {
        assert_eq!(get(&[("Content-Length", "42")]).content_length(), Ok(42));
        let dup = get(&[("Content-Length", "5"), ("Content-Length", "5")]);
        assert_eq!(dup.content_length(), Ok(5));
        for bad in [
            get(&[("Content-Length", "5"), ("Content-Length", "6")]),
            get(&[("Content-Length", "-1")]),
            get(&[("Content-Length", "+1")]),
            get(&[("Content-Length", "")]),
            get(&[("Content-Length", "99999999999999999999999")]),
        ] {
            assert_eq!(bad.content_length(), Err(HeadError::BadContentLength));
        }
        let te = get(&[("Transfer-Encoding", "chunked")]);
        assert!(matches!(te.content_length(), Err(HeadError::Malformed(_))));
    }

    #[test]
    fn keep_alive_rules() {
        assert!(get(&[]).keep_alive());
        assert!(!get(&[("Connection", "Close")]).keep_alive());
        assert!(!get(&[("Connection", "foo, close")]).keep_alive());
        let http10 = |h: &str| req(format!("GET / HTTP/1.0\r\n{h}\r\n").as_bytes());
        assert!(!http10("").keep_alive());
        assert!(http10("Connection: Keep-Alive\r\n").keep_alive());
        assert!(!http10("Connection: close\r\n").keep_alive());
    }

    #[test]
    fn refusals() {
        let post = req(b"POST /ws HTTP/1.1\r\nUpgrade: websocket\r\n\r\n");
        let r = websocket_upgrade(&post).unwrap_err();
        assert_eq!(r.status, 405);
        assert_eq!(r.headers(), &[("Allow", "GET")]);

        let old = req(b"GET /ws HTTP/1.0\r\nUpgrade: websocket\r\n\r\n");
        assert_eq!(websocket_upgrade(&old).unwrap_err().status, 400);

        let cases: [(&str, Option<&str>, u16, &str); 8] = [
            ("Upgrade", None, 400, "missing Upgrade: websocket"),
            ("Upgrade", Some("h2c"), 400, "missing Upgrade: websocket"),
            ("Connection", None, 400, "missing Connection: upgrade"),
            (
                "Connection",
                Some("keep-alive"),
                400,
                "missing Connection: upgrade",
            ),
            (
                "Sec-WebSocket-Version",
                None,
                426,
                "missing Sec-WebSocket-Version",
            ),
            (
                "Sec-WebSocket-Version",
                Some("8"),
                426,
                "unsupported Sec-WebSocket-Version",
            ),
            ("Sec-WebSocket-Key", None, 400, "missing Sec-WebSocket-Key"),
            (
                "Sec-WebSocket-Key",
                Some("c2hvcnQ="),
                400,
                "invalid Sec-WebSocket-Key",
            ),
        ];
        for (name, value, status, reason) in cases {
            let mut headers = good_headers();
            headers.retain(|(n, _)| *n != name);
            if let Some(v) = value {
                headers.push((name, v));
            }
            let refusal = websocket_upgrade(&get(&headers)).unwrap_err();
            assert_eq!((refusal.status, refusal.reason), (status, reason), "{name}");
        }
        for bad_key in [
            "dGhlIHNhbXBsZSBub25jZQ=",
            "dGhlIHNhbXBsZSBub25jZQ!=",
            "dGhlIHNhbXBsZSBub25jZQ===",
            "dGhlIHNhbXBsZSBub25jZQAA",
        ] {
            let mut headers = good_headers();
            headers[3].1 = bad_key;
            assert_eq!(websocket_upgrade(&get(&headers)).unwrap_err().status, 400);
        }

        let mut headers = good_headers();
        headers[1].1 = "Upgrade";
        headers.remove(2);
        let refusal = websocket_upgrade(&get(&headers)).unwrap_err();
        let resp = String::from_utf8(refusal.response()).unwrap();
        assert!(resp.starts_with("HTTP/1.1 426 Upgrade Required\r\n"));
        assert!(resp.contains("\r\nSec-WebSocket-Version: 13\r\n"));
        assert!(resp.contains("\r\nConnection: close\r\n"));
    }

    #[test]
    fn upgrade_tokens_are_case_insensitive_lists() {
        let mut headers = good_headers();
        headers[0].1 = "foo, WebSocket";
        headers[1].1 = "keep-alive,UPGRADE";
        let up = websocket_upgrade(&get(&headers)).unwrap();
        assert!(up.protocols.is_empty());
        assert!(is_upgrade_request(&get(&headers)));
        assert!(!is_upgrade_request(&get(&[("Connection", "upgrade")])));
    }

    #[test]
    fn accept_key_rfc_example() {
        let resp =
            String::from_utf8(accept_response("dGhlIHNhbXBsZSBub25jZQ==", None, None)).unwrap();
        assert_eq!(
            resp,
            "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n\r\n"
        );
        let resp = accept_response("dGhlIHNhbXBsZSBub25jZQ==", Some("chat"), None);
        assert!(resp.ends_with(b"\r\nSec-WebSocket-Protocol: chat\r\n\r\n"));
    }

    #[test]
    fn responses() {
        let resp = response(200, "text/plain", &[("X-A", "1")], b"hi", true);
        assert_eq!(
            resp,
            b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 2\r\nX-A: 1\r\n\r\nhi"
        );
        let resp = response(
            404,
            "text/plain",
            &[("X-Evil", "a\r\nSet-Cookie: x")],
            b"",
            false,
        );
        assert_eq!(
            resp,
            &b"HTTP/1.1 404 Not Found\r\nContent-Type: text/plain\r\nContent-Length: 0\r\n\
               X-Evil: aSet-Cookie: x\r\nConnection: close\r\n\r\n"[..]
        );
        assert_eq!(reason_phrase(431), "Request Header Fields Too Large");
        assert_eq!(reason_phrase(599), "");
    }

    proptest! {
        #[test]
        fn prop_arbitrary_input_never_panics(input in proptest::collection::vec(any::<u8>(), 0..2048)) {
            if let Ok(Parse::Complete { request, head_len }) = parse_request(&input) {
                prop_assert!(head_len <= input.len().min(MAX_HEAD_BYTES));
                let _ = request.content_length();
                let _ = request.keep_alive();
                let _ = request.query_param("a");
                let _ = websocket_upgrade(&request);
            }
        }

        #[test]
        fn prop_request_like_input_never_panics(
            target in "[ -~]{0,40}",
            headers in proptest::collection::vec(("[A-Za-z-]{1,12}", "[ -~]{0,30}"), 0..8),
            cut in any::<usize>(),
        ) {
            let mut s = format!("GET {target} HTTP/1.1\r\n");
            for (n, v) in &headers {
                s.push_str(&format!("{n}: {v}\r\n"));
            }
            s.push_str("\r\n");
            let bytes = s.as_bytes();
            let _ = parse_request(&bytes[..cut % (bytes.len() + 1)]);
            if let Ok(Parse::Complete { request, .. }) = parse_request(bytes) {
                for key in ["a", "b", ""] {
                    let _ = request.query_param(key);
                }
                let _ = websocket_upgrade(&request);
                let _ = request.content_length();
            }
        }
    }

    fn dechunk(input: &[u8], step: usize) -> Result<Vec<u8>, HeadError> {
        let mut body = ChunkedBody::default();
        let mut buf = bytes::BytesMut::new();
        let mut out = Vec::new();
        let mut fed = 0;
        loop {
            match body.next(&mut buf)? {
                BodyPart::Data(d) => out.extend_from_slice(&d),
                BodyPart::End => return Ok(out),
                BodyPart::More if fed < input.len() => {
                    let to = (fed + step).min(input.len());
                    buf.extend_from_slice(&input[fed..to]);
                    fed = to;
                }
                BodyPart::More => return Err(HeadError::Malformed("truncated")),
            }
        }
    }

    #[test]
    fn chunked_bodies_decode_however_they_are_split() {
        let wire =
            b"5\r\nhello\r\n1;ext=1\r\n \r\nB \r\n\x1b[31mworld\r\r\n0\r\nX-Trailer: 1\r\n\r\n";
        for step in 1..=wire.len() {
            assert_eq!(
                dechunk(wire, step).unwrap(),
                b"hello \x1b[31mworld\r",
                "step {step}"
            );
        }
        assert_eq!(dechunk(b"0\r\n\r\n", 3).unwrap(), b"");
    }

    #[test]
    fn bad_chunked_bodies_are_refused() {
        for wire in [
            &b"x\r\nhello\r\n"[..],
            b"\r\n",
            b"5\r\nhelloXX0\r\n\r\n",
            b"ffffffffffffffff0\r\n",
            b"-1\r\n",
        ] {
            assert!(
                matches!(dechunk(wire, 4), Err(HeadError::Malformed(_))),
                "{:?}",
                String::from_utf8_lossy(wire)
            );
        }
        let long = vec![b'1'; 2000];
        assert!(dechunk(&long, 2000).is_err());
    }

    /// Found by fuzzing (fuzz/ chunked_body): a chunk-size line over the bound was refused when
    /// it arrived in pieces but accepted when it arrived whole.
    #[test]
    fn chunk_size_line_bound_does_not_depend_on_how_it_arrives() {
        let line = |ext: usize| {
            let mut wire = b"1;".to_vec();
            wire.resize(2 + ext, b'e');
            wire.extend_from_slice(b"\r\na\r\n0\r\n\r\n");
            wire
        };
        let longest = line(MAX_CHUNK_LINE - 2);
        let too_long = line(MAX_CHUNK_LINE - 1);
        for step in [1, 7, 1000, too_long.len()] {
            assert_eq!(dechunk(&longest, step).unwrap(), b"a", "step {step}");
            assert!(
                matches!(dechunk(&too_long, step), Err(HeadError::Malformed(_))),
                "step {step}"
            );
        }
    }
}
