//! The front door of every accepted socket: HTTP/1.1 requests (publish, health, metrics) with
//! keep-alive, and WebSocket upgrades handed to the runtime.
//!
//! Invariant: a request that is refused gets a complete HTTP response that says why; only a
//! request that passed every check (upgrade headers, token, channels) becomes a connection.

use std::net::SocketAddr;
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use monoio::io::{AsyncReadRent, AsyncWriteRentExt};
use monoio::net::TcpStream;

use crate::proto::http::{self, HeadError, Parse, Request};
use crate::runtime::core::{Core, Received};
use crate::runtime::node::Broker;
use crate::runtime::pending::{Expired, Full, Stage, Ticket};

use super::jwt::Verifier;
use super::socketio::Standing;
use super::{admin, publish, socketio, sse, terminal, upgrade};

/// Largest request body accepted (a publish batch).
pub const MAX_BODY_BYTES: usize = 8 << 20;

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
///
/// The socket is registered with its core's pending sockets from the start: it has a deadline
/// for its head, then (authenticated) for its body, then for idling between keep-alive
/// requests, and may be evicted while it has sent no complete head when the node needs room.
pub async fn serve(edge: Arc<Edge>, core: Rc<Core>, mut stream: TcpStream, peer: SocketAddr) {
    let admitted = core.pending.admit(
        peer.ip(),
        Instant::now(),
        &core.shared.pending_sockets,
        core.shared.stats.connections.sum() as usize,
    );
    let mut ticket = match admitted {
        Ok(t) => t,
        Err(full) => return refuse_full(&core, stream, full).await,
    };
    // What came from the socket and is not consumed yet: a head arriving, a body, or the start
    // of the next pipelined request. Grown in small exact steps, freed while idle.
    let mut buf: Vec<u8> = Vec::new();
    let mut requests = 0;
    loop {
        let (request, head_len) = loop {
            if let Some(parsed) = parse_if_complete(&buf) {
                match parsed {
                    Ok(Parse::Complete { request, head_len }) => break (request, head_len),
                    Ok(Parse::Partial) => {}
                    Err(e) => {
                        refuse_head(&mut stream, &e).await;
                        drop(buf);
                        return linger_close(stream, LINGER).await;
                    }
                }
            }
            let had_bytes = !buf.is_empty();
            // No more than a head can hold: pipelined requests wait in the kernel, not here.
            let room = http::MAX_HEAD_BYTES - buf.len().min(http::MAX_HEAD_BYTES - 1);
            match read_some(&core, &stream, &ticket, &mut buf, room, HEAD_GROWTH).await {
                Ok(true) => {}
                Ok(false) => return,
                Err(Expired::Evicted) => return,
                Err(Expired::Deadline) if had_bytes => {
                    let reply = Reply::error(408, "request head not received in time");
                    let _ = stream.write_all(reply.encode(false)).await;
                    drop(buf);
                    return linger_close(stream, SHORT_LINGER).await;
                }
                Err(Expired::Deadline) => return, // idle or silent: nothing to answer
            }
            if !had_bytes {
                ticket.stage(Stage::Head, Instant::now());
            }
        };
        buf.drain(..head_len);
        if !edge.origin_allowed(&request) {
            let reply = Reply::error(403, "origin not allowed");
            let _ = stream.write_all(reply.encode(false)).await;
            drop(buf);
            return linger_close(stream, LINGER).await;
        }
        if let (Some(channels), "GET") = (sse::route(&request.path), request.method.as_str()) {
            // An event stream lives for hours inside this future too; from here it counts as
            // a connection, not a pending socket.
            drop((ticket, buf));
            // Boxed: a socket still sending its head holds none of the stream's state.
            return Box::pin(sse::serve(
                &edge,
                core,
                stream,
                peer.ip(),
                request,
                channels,
            ))
            .await;
        }
        if let (Some(_), "POST") = (terminal::route(&request.path), request.method.as_str()) {
            // A producer's body stays open while its task runs: authenticated on its head by
            // `produce`, it has no deadline.
            ticket.stage(Stage::Stream, Instant::now());
            let leftover = BytesMut::from(&buf[..]);
            drop(buf);
            return Box::pin(terminal::produce(&edge, core, stream, request, leftover)).await;
        }
        if socketio::route(&request.path)
            && request.method == "GET"
            && http::is_upgrade_request(&request)
        {
            // Until its CONNECT the socket stays a pending one (deadline, eviction).
            let leftover = std::mem::take(&mut buf);
            return Box::pin(socketio::serve(
                &edge,
                core,
                stream,
                peer.ip(),
                request,
                leftover,
                ticket,
            ))
            .await;
        }
        if request.path.starts_with("/ws") && request.method == "GET" {
            // A WebSocket lives for hours in a task of its own: keep none of the HTTP buffers.
            let leftover = BytesMut::from(&buf[..]);
            drop((ticket, buf));
            return Box::pin(upgrade::serve(
                &edge,
                core,
                stream,
                peer.ip(),
                request,
                leftover,
            ))
            .await;
        }
        let body_len = match request.content_length() {
            Ok(n) => n,
            Err(e) => {
                refuse_head(&mut stream, &e).await;
                drop(buf);
                return linger_close(stream, LINGER).await;
            }
        };
        // A body is read only for a route that takes one, from a publisher holding the API
        // key, and within the core's budget; anything else is answered on its head alone.
        // A Socket.IO polling POST carries a session's packets: read only for a session that
        // exists, up to Engine.IO's maxPayload once it is connected; before its CONNECT, a
        // small body in the head's (evictable) stage.
        let polling_post = match socketio::takes_body(&request) {
            true => Some(socketio::standing(&core, &request).await),
            false => None,
        };
        let read_body = body_len > 0
            && ((takes_body(&request) && has_api_key(&edge, &request))
                || polling_post.is_some_and(|s| s != Standing::Unknown));
        let body_limit = match polling_post {
            Some(Standing::Connected) => core.shared.settings.socketio_max_payload,
            Some(_) => socketio::PREAUTH_MAX_BYTES,
            None => usize::MAX,
        };
        let refusal = if !read_body {
            None
        } else if body_len > body_limit {
            Some(Reply::error(413, "the packets are larger than maxPayload"))
        } else if body_len > max_body(&core) {
            let message = match max_body(&core) {
                MAX_BODY_BYTES => "request body is larger than 8 MiB".to_owned(),
                n => format!("request body is larger than {n} bytes"),
            };
            Some(Reply::error(413, &message))
        } else if body_len > SMALL_BODY_BYTES && !ticket.reserve_body(body_len) {
            Some(
                Reply::error(
                    503,
                    "request bodies buffered on this node are at their bound",
                )
                .with_header("Retry-After", "1"),
            )
        } else {
            None
        };
        if let Some(reply) = refusal {
            let _ = stream.write_all(reply.encode(false)).await;
            drop(buf);
            return linger_close(stream, LINGER).await;
        }
        let body = if read_body {
            let stage = match polling_post {
                Some(Standing::Unconnected) => Stage::Head,
                _ => Stage::Body,
            };
            ticket.stage(stage, Instant::now());
            if buf.len() < body_len && request.has_token("expect", "100-continue") {
                let (res, _) = stream
                    .write_all(&b"HTTP/1.1 100 Continue\r\n\r\n"[..])
                    .await;
                if res.is_err() {
                    return;
                }
            }
            buf.reserve_exact(body_len.saturating_sub(buf.len()));
            while buf.len() < body_len {
                let left = body_len - buf.len();
                match read_some(&core, &stream, &ticket, &mut buf, left, left).await {
                    Ok(true) => {}
                    Ok(false) | Err(Expired::Evicted) => return,
                    Err(Expired::Deadline) => {
                        let reply = Reply::error(408, "request body not received in time");
                        let _ = stream.write_all(reply.encode(false)).await;
                        drop(buf);
                        return linger_close(stream, SHORT_LINGER).await;
                    }
                }
            }
            buf.drain(..body_len).collect::<Vec<u8>>()
        } else {
            Vec::new()
        };
        // An announced body we did not read cannot be skipped: answer, then close. A socket
        // also closes after MAX_REQUESTS_PER_CONNECTION, so that pipelining thousands of
        // requests buys no more of the core than a new connection would.
        requests += 1;
        let keep_alive = request.keep_alive()
            && (read_body || body_len == 0)
            && requests < MAX_REQUESTS_PER_CONNECTION;
        let mut reply = if request.method == "OPTIONS" {
            preflight()
        } else if socketio::route(&request.path) {
            // A held GET is answered when its session has something to say.
            let polled = socketio::polling(
                &edge,
                &core,
                &stream,
                &mut ticket,
                peer.ip(),
                &request,
                &body,
            );
            let reply = polled.await;
            match reply {
                Some(reply) => reply,
                None => return, // the client went away while its GET was held
            }
        } else {
            route(&edge, &core, &request, &body).await
        };
        drop(body);
        ticket.release_body();
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
        // A client that does not read its answer holds the socket no longer than a body.
        ticket.stage(Stage::Body, Instant::now());
        match ticket.guard(stream.write_all(bytes)).await {
            Ok((Ok(_), _)) => {}
            _ => return,
        }
        ticket.served();
        if !keep_alive {
            drop(buf);
            return linger_close(stream, LINGER).await;
        }
        if buf.is_empty() {
            buf = Vec::new(); // an idle keep-alive socket holds no buffer
        }
        ticket.stage(
            if buf.is_empty() {
                Stage::Idle
            } else {
                Stage::Head
            },
            Instant::now(),
        );
    }
}

/// How long a refused socket is drained before it is closed (see `linger_close`); a
/// lingering socket holds no request bytes (they are dropped first).
pub(super) const LINGER: Duration = Duration::from_secs(2);
/// The same for sockets closed by a deadline, which have proven to be slow already.
const SHORT_LINGER: Duration = Duration::from_millis(200);
/// Bodies up to this size are read without touching the core's body budget, so that ordinary
/// publishes never wait on large ones; what they hold is bounded by the pending sockets.
const SMALL_BODY_BYTES: usize = 16 * 1024;
/// Smallest step a request head's buffer grows by: its cost stays within this of its size.
const HEAD_GROWTH: usize = 1024;
/// Requests one keep-alive socket may make before it is closed (as nginx's keepalive_requests).
const MAX_REQUESTS_PER_CONNECTION: u32 = 1000;
/// Refused sockets one core drains at once; past it they are closed at once.
const MAX_LINGERING: usize = 64;

/// Largest body this node reads: the fixed bound, or the core's whole budget if smaller.
fn max_body(core: &Core) -> usize {
    MAX_BODY_BYTES.min(core.pending.limits().body_buffer_bytes)
}

/// Whether a request's route reads a body (everything else is answered on its head).
fn takes_body(req: &Request) -> bool {
    req.method == "POST"
        && (req.path == "/api/v1/publish" || req.path.starts_with("/api/v1/admin/"))
}

fn has_api_key(edge: &Edge, req: &Request) -> bool {
    bearer(req).is_some_and(|key| same_secret(key, &edge.api_key))
}

/// Parses `buf` once it holds the end of a head (or too much to be one): re-parsing a head
/// that arrives a byte at a time would cost its length squared.
fn parse_if_complete(buf: &[u8]) -> Option<Result<Parse, HeadError>> {
    if buf.is_empty() {
        return None;
    }
    let window = &buf[..buf.len().min(http::MAX_HEAD_BYTES)];
    let ended =
        window.windows(2).any(|w| w == b"\n\n") || window.windows(4).any(|w| w == b"\r\n\r\n");
    (ended || buf.len() >= http::MAX_HEAD_BYTES).then(|| http::parse_request(buf))
}

/// Waits (within the socket's deadline) for bytes and appends what one receive brings, at
/// most `max` bytes, growing `buf` by at least `step` at a time. Ok(false) at the end of the
/// stream.
pub(super) async fn read_some(
    core: &Core,
    stream: &TcpStream,
    ticket: &Ticket,
    buf: &mut Vec<u8>,
    max: usize,
    step: usize,
) -> Result<bool, Expired> {
    loop {
        if ticket.guard(stream.readable(false)).await?.is_err() {
            return Ok(false);
        }
        let received = core.recv_with(stream, max, |bytes| {
            if buf.capacity() - buf.len() < bytes.len() {
                buf.reserve_exact(bytes.len().max(step.min(MAX_READ_STEP)));
            }
            buf.extend_from_slice(bytes);
        });
        match received {
            Received::Data => return Ok(true),
            Received::NotReady => continue,
            Received::Closed => return Ok(false),
        }
    }
}

/// Largest step a buffer grows by ahead of its data.
const MAX_READ_STEP: usize = 64 * 1024;

/// A socket refused at accept (its IP or the node holds too many): a short answer, no read.
async fn refuse_full(core: &Core, mut stream: TcpStream, full: Full) {
    let reply = match full {
        Full::PerIp => Reply::error(
            429,
            "too many connections from this address are still sending their request",
        )
        .with_header("Retry-After", "1"),
        Full::Node => {
            Reply::error(503, "the node is at its connection limit").with_header("Retry-After", "1")
        }
    };
    let _ = stream.write_all(reply.encode(false)).await;
    if core.lingering.get() < MAX_LINGERING {
        core.lingering.set(core.lingering.get() + 1);
        linger_close(stream, SHORT_LINGER).await;
        core.lingering.set(core.lingering.get() - 1);
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

/// Closes after an answer without resetting the connection: stop sending, then read and drop
/// what the client is still sending for at most `within`, so it reads our answer instead of
/// an RST (closing a socket with unread input resets it).
pub(super) async fn linger_close(mut stream: TcpStream, within: Duration) {
    let _ = crate::runtime::socket::shutdown(&stream, std::net::Shutdown::Write);
    let mut sink = vec![0u8; 4 * 1024];
    let deadline = Instant::now() + within;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return;
        }
        match monoio::time::timeout(left, stream.read(sink)).await {
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
            } else if !core.shared.broker_ready() {
                Reply::text(503, "redis unavailable")
            } else {
                Reply::text(200, "ready")
            }
        }
        ("GET", "/metrics") => metrics(core),
        ("POST", "/api/v1/publish") => publish::handle(edge, core, req, body).await,
        ("GET", "/api/v1/presence") => presence(edge, core, req).await,
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
        (_, "/api/v1/presence") => {
            Reply::error(405, "method not allowed").with_header("Allow", "GET")
        }
        _ => Reply::error(404, "no such endpoint"),
    }
}

/// `GET /api/v1/presence?channel=C`: who is on a presence channel, for the API key or a token
/// that may read the channel.
async fn presence(edge: &Edge, core: &Core, req: &Request) -> Reply {
    let Some(channel) = req.query_param("channel") else {
        return Reply::error(400, "give ?channel=");
    };
    if let Err(e) = crate::delivery::channel::validate(&channel) {
        return Reply::error(400, &format!("channel: {e}"));
    }
    let allowed = match bearer(req) {
        Some(key) if same_secret(key, &edge.api_key) => true,
        Some(token) => match edge.verifier.verify(token) {
            Ok(mut claims) => {
                core.apply_overrides(&mut claims);
                if !claims.can_subscribe(&channel) {
                    return Reply::error(403, &format!("not allowed to read {channel}"));
                }
                true
            }
            Err(e) => return Reply::error(401, &e.to_string()),
        },
        None => false,
    };
    if !allowed {
        return Reply::error(
            401,
            "presence needs Authorization: Bearer <API key or a token that may read the channel>",
        )
        .with_header("WWW-Authenticate", "Bearer");
    }
    if !core.shared.settings.presence.matches(&channel) {
        return Reply::error(404, &format!("{channel} does not keep presence"));
    }
    match core.shared.presence_members(channel.as_str().into()).await {
        Some(members) => {
            let body = serde_json::json!({ "channel": channel, "members": members });
            Reply::json(200, body.to_string().into_bytes())
        }
        None => Reply::error(503, "Redis did not answer in time").with_header("Retry-After", "1"),
    }
}

fn metrics(core: &Core) -> Reply {
    // Each core counts in shards of its own; this sums them, whichever core serves the scrape.
    let s = &core.shared.stats;
    let mut text = format!(
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
         # HELP ringcast_channels Channel states held (channels with replay history or subscribers).\n\
         # TYPE ringcast_channels gauge\n\
         ringcast_channels {}\n\
         # HELP ringcast_draining 1 while the node drains.\n\
         # TYPE ringcast_draining gauge\n\
         ringcast_draining {}\n",
        s.connections.sum(),
        s.connections_total.sum(),
        s.published.sum(),
        s.audit_published.sum(),
        s.frames_queued.sum(),
        crate::delivery::compressed_total(),
        s.channels.sum(),
        u8::from(core.shared.is_draining()),
    );
    if let Broker::Redis(redis) = &core.shared.broker {
        let (ingested, refused) = redis.ingest_counts();
        text += &format!(
            "# HELP ringcast_redis_up 1 while Redis answers (cluster mode).\n\
             # TYPE ringcast_redis_up gauge\n\
             ringcast_redis_up {}\n\
             # HELP ringcast_ingested_total Messages published from the Redis ingest sources since start.\n\
             # TYPE ringcast_ingested_total counter\n\
             ringcast_ingested_total {ingested}\n\
             # HELP ringcast_ingest_refused_total Ingest messages that could not be published (malformed) since start.\n\
             # TYPE ringcast_ingest_refused_total counter\n\
             ringcast_ingest_refused_total {refused}\n\
             # HELP ringcast_limits_node_local 1 while the connection limits are this node's own because Redis does not answer (cluster mode).\n\
             # TYPE ringcast_limits_node_local gauge\n\
             ringcast_limits_node_local {}\n",
            u8::from(redis.is_up()),
            u8::from(redis.limits_local()),
        );
    }
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
