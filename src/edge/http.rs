//! The front door of every accepted socket: HTTP/1.1 requests (publish, health, metrics) with
//! keep-alive, and WebSocket upgrades handed to the runtime.
//!
//! Invariant: a request that is refused gets a complete HTTP response that says why; only a
//! request that passed every check (upgrade headers, token, channels) becomes a connection.

use std::net::SocketAddr;
use std::rc::Rc;
use std::sync::Arc;

use bytes::BytesMut;
use monoio::io::{AsyncReadRent, AsyncWriteRentExt};
use monoio::net::TcpStream;

use crate::proto::http::{self, HeadError, Parse, Request};
use crate::runtime::core::Core;

use super::jwt::Verifier;
use super::{admin, publish, sse, terminal, upgrade};

/// Largest request body accepted (a publish batch).
pub const MAX_BODY_BYTES: usize = 8 << 20;
/// First read of a request: a WebSocket handshake fits, and thousands of sockets connecting at
/// once do not each pin a large buffer. Reads that fill it get bigger ones (bodies).
const FIRST_READ_CHUNK: usize = 1024;
const MAX_READ_CHUNK: usize = 64 * 1024;

/// What the HTTP edge needs besides the core.
pub struct Edge {
    pub verifier: Arc<Verifier>,
    pub api_key: String,
    /// Browser origins allowed to upgrade and to call the HTTP API; `None` allows every origin.
    pub allowed_origins: Option<Vec<String>>,
}

impl Edge {
    /// Whether a request's `Origin` (if it has one) is allowed. Requests without `Origin` are
    /// not from a browser page and are not subject to the policy.
    pub fn origin_allowed(&self, req: &Request) -> bool {
        match (req.header("origin"), &self.allowed_origins) {
            (None, _) | (_, None) => true,
            (Some(origin), Some(list)) => list.iter().any(|o| o == "*" || o == origin),
        }
    }
}

/// A response to write, and whether the connection goes on afterwards.
pub struct Reply {
    pub status: u16,
    pub content_type: &'static str,
    pub headers: Vec<(&'static str, String)>,
    pub body: Vec<u8>,
}

impl Reply {
    pub fn json(status: u16, body: Vec<u8>) -> Reply {
        Reply {
            status,
            content_type: "application/json",
            headers: Vec::new(),
            body,
        }
    }

    pub fn text(status: u16, body: impl Into<String>) -> Reply {
        let mut body = body.into().into_bytes();
        body.push(b'\n');
        Reply {
            status,
            content_type: "text/plain; charset=utf-8",
            headers: Vec::new(),
            body,
        }
    }

    /// `{"error": "..."}` with the given status.
    pub fn error(status: u16, message: &str) -> Reply {
        Reply::json(
            status,
            serde_json::to_vec(&serde_json::json!({ "error": message })).expect("json"),
        )
    }

    pub fn with_header(mut self, name: &'static str, value: impl Into<String>) -> Reply {
        self.headers.push((name, value.into()));
        self
    }

    pub fn encode(&self, keep_alive: bool) -> Vec<u8> {
        let headers: Vec<(&str, &str)> =
            self.headers.iter().map(|(n, v)| (*n, v.as_str())).collect();
        http::response(
            self.status,
            self.content_type,
            &headers,
            &self.body,
            keep_alive,
        )
    }
}

/// Serves one accepted socket until it closes or becomes a WebSocket.
pub async fn serve(edge: Arc<Edge>, core: Rc<Core>, mut stream: TcpStream, peer: SocketAddr) {
    let mut buf = BytesMut::new();
    let mut chunk: Vec<u8> = Vec::new();
    loop {
        let (request, head_len) = loop {
            match http::parse_request(&buf) {
                Ok(Parse::Complete { request, head_len }) => break (request, head_len),
                Ok(Parse::Partial) => {}
                Err(e) => return refuse_head(&mut stream, &e).await,
            }
            if !read_more(&mut stream, &mut buf, &mut chunk).await {
                return;
            }
        };
        let _ = buf.split_to(head_len);
        if !edge.origin_allowed(&request) {
            let reply = Reply::error(403, "origin not allowed");
            let _ = stream.write_all(reply.encode(false)).await;
            return;
        }
        if let (Some(channels), "GET") = (sse::route(&request.path), request.method.as_str()) {
            // An event stream lives for hours inside this future too.
            drop((chunk, buf));
            return sse::serve(&edge, core, stream, peer.ip(), request, channels).await;
        }
        if let (Some(_), "POST") = (terminal::route(&request.path), request.method.as_str()) {
            // A producer's body stays open while its task runs.
            drop(chunk);
            return terminal::produce(&edge, core, stream, request, buf).await;
        }
        if request.path.starts_with("/ws") && request.method == "GET" {
            // A WebSocket lives for hours inside this future: keep none of the HTTP buffers.
            drop(chunk);
            let leftover = BytesMut::from(&buf[..]);
            drop(buf);
            return upgrade::serve(&edge, core, stream, peer.ip(), request, leftover).await;
        }
        let body_len = match request.content_length() {
            Ok(n) if n <= MAX_BODY_BYTES => n,
            Ok(_) => {
                let reply = Reply::error(413, "request body is larger than 8 MiB");
                let _ = stream.write_all(reply.encode(false)).await;
                return linger_close(stream).await;
            }
            Err(e) => return refuse_head(&mut stream, &e).await,
        };
        if buf.len() < body_len && request.has_token("expect", "100-continue") {
            let (res, _) = stream
                .write_all(&b"HTTP/1.1 100 Continue\r\n\r\n"[..])
                .await;
            if res.is_err() {
                return;
            }
        }
        while buf.len() < body_len {
            if !read_more(&mut stream, &mut buf, &mut chunk).await {
                return;
            }
        }
        let body = buf.split_to(body_len);
        let keep_alive = request.keep_alive();
        let mut reply = if request.method == "OPTIONS" {
            preflight()
        } else {
            route(&edge, &core, &request, &body).await
        };
        if let Some(origin) = request.header("origin") {
            // Allowed (checked above): let the browser page read the answer.
            reply = reply
                .with_header("Access-Control-Allow-Origin", origin)
                .with_header("Vary", "Origin");
        }
        let mut bytes = reply.encode(keep_alive);
        if request.method == "HEAD" {
            bytes.truncate(bytes.len() - reply.body.len()); // headers only, length kept
        }
        let (res, _) = stream.write_all(bytes).await;
        if res.is_err() || !keep_alive {
            return;
        }
    }
}

/// The answer to a CORS preflight from an allowed origin.
fn preflight() -> Reply {
    Reply {
        status: 204,
        content_type: "text/plain",
        headers: vec![
            ("Access-Control-Allow-Methods", "GET, POST, OPTIONS".into()),
            (
                "Access-Control-Allow-Headers",
                "Authorization, Content-Type".into(),
            ),
            ("Access-Control-Max-Age", "600".into()),
        ],
        body: Vec::new(),
    }
}

async fn read_more(stream: &mut TcpStream, buf: &mut BytesMut, chunk: &mut Vec<u8>) -> bool {
    let mut owned = std::mem::take(chunk);
    let want = if buf.is_empty() {
        FIRST_READ_CHUNK
    } else {
        (buf.len() * 2).clamp(FIRST_READ_CHUNK, MAX_READ_CHUNK)
    };
    owned.reserve(want);
    let (res, mut owned) = stream.read(owned).await;
    let ok = match res {
        Ok(n) if n > 0 => {
            buf.extend_from_slice(&owned[..n]);
            true
        }
        _ => false,
    };
    owned.clear();
    *chunk = owned;
    ok
}

/// Closes after a refusal without resetting the connection: stop sending, then read and drop
/// what the client is still sending for a moment, so it reads our answer instead of an RST.
async fn linger_close(mut stream: TcpStream) {
    // SAFETY: shutdown of the write side of a socket we own.
    unsafe { libc::shutdown(std::os::fd::AsRawFd::as_raw_fd(&stream), libc::SHUT_WR) };
    let mut sink = vec![0u8; 16 * 1024];
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(2);
    while std::time::Instant::now() < deadline {
        let read = monoio::time::timeout(std::time::Duration::from_millis(500), stream.read(sink));
        match read.await {
            Ok((Ok(n), buf)) if n > 0 => sink = buf,
            _ => return,
        }
    }
}

async fn refuse_head(stream: &mut TcpStream, e: &HeadError) {
    let reply = Reply::text(e.status(), e.reason());
    let _ = stream.write_all(reply.encode(false)).await;
}

async fn route(edge: &Edge, core: &Core, req: &Request, body: &[u8]) -> Reply {
    match (req.method.as_str(), req.path.as_str()) {
        ("GET" | "HEAD", "/healthz") => Reply::text(200, "ok"),
        ("GET" | "HEAD", "/readyz") => {
            if core.shared.is_draining() {
                Reply::text(503, "draining")
            } else {
                Reply::text(200, "ready")
            }
        }
        ("GET", "/metrics") => metrics(core),
        ("POST", "/api/v1/publish") => publish::handle(edge, core, req, body).await,
        (_, path) if path.starts_with("/api/v1/admin/") => admin::handle(edge, core, req, body)
            .await
            .unwrap_or_else(|| Reply::error(404, "no such endpoint")),
        (_, "/healthz" | "/readyz" | "/metrics") => {
            Reply::error(405, "method not allowed").with_header("Allow", "GET")
        }
        (_, path) if terminal::route(path).is_some() => {
            Reply::error(405, "method not allowed").with_header("Allow", "POST")
        }
        (_, path) if sse::route(path).is_some() => {
            Reply::error(405, "method not allowed").with_header("Allow", "GET")
        }
        (_, "/api/v1/publish") => {
            Reply::error(405, "method not allowed").with_header("Allow", "POST")
        }
        _ => Reply::error(404, "no such endpoint"),
    }
}

fn metrics(core: &Core) -> Reply {
    // Each core counts in shards of its own; this sums them, whichever core serves the scrape.
    let s = &core.shared.stats;
    let text = format!(
        "# HELP ringcast_connections Open WebSocket connections.\n\
         # TYPE ringcast_connections gauge\n\
         ringcast_connections {}\n\
         # HELP ringcast_connections_total WebSocket connections accepted since start.\n\
         # TYPE ringcast_connections_total counter\n\
         ringcast_connections_total {}\n\
         # HELP ringcast_published_total Messages sequenced from the publish API and terminal streams since start.\n\
         # TYPE ringcast_published_total counter\n\
         ringcast_published_total {}\n\
         # HELP ringcast_audit_events_total Audit records sequenced on the audit channel since start.\n\
         # TYPE ringcast_audit_events_total counter\n\
         ringcast_audit_events_total {}\n\
         # HELP ringcast_frames_queued_total Event frames queued to subscribers since start.\n\
         # TYPE ringcast_frames_queued_total counter\n\
         ringcast_frames_queued_total {}\n\
         # HELP ringcast_compressed_messages_total Compressed event frames built and shared (permessage-deflate), one per message and encoding.\n\
         # TYPE ringcast_compressed_messages_total counter\n\
         ringcast_compressed_messages_total {}\n\
         # HELP ringcast_draining 1 while the node drains.\n\
         # TYPE ringcast_draining gauge\n\
         ringcast_draining {}\n",
        s.connections.sum(),
        s.connections_total.sum(),
        s.published.sum(),
        s.audit_published.sum(),
        s.frames_queued.sum(),
        crate::delivery::compressed_total(),
        u8::from(core.shared.is_draining()),
    );
    Reply {
        status: 200,
        content_type: "text/plain; version=0.0.4",
        headers: Vec::new(),
        body: text.into_bytes(),
    }
}

/// Compares secrets in time independent of where they differ.
pub fn same_secret(a: &str, b: &str) -> bool {
    a.len() == b.len()
        && a.bytes()
            .zip(b.bytes())
            .fold(0u8, |acc, (x, y)| acc | (x ^ y))
            == 0
}

/// The bearer token of an `Authorization` header, if any.
pub fn bearer(req: &Request) -> Option<&str> {
    let value = req.header("authorization")?;
    let (scheme, token) = value.split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| token.trim())
        .filter(|t| !t.is_empty())
}
