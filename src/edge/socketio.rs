//! `/socket.io/`: Engine.IO v4 and Socket.IO v5 for `socket.io-client` v4.
//!
//! The websocket transport: the upgrade needs no token (browsers pass it in Socket.IO's
//! CONNECT, as `auth: { token }`), so between the `101` and the CONNECT the socket is still a
//! pending socket of the edge: evictable, with the head deadline, reading at most
//! `PREAUTH_MAX_BYTES`. A CONNECT with a good token (and room in the limits) makes it a
//! connection like any other, whose session speaks Socket.IO; a bad one gets `CONNECT_ERROR`,
//! which the client's `connect_error` handler sees.

use std::net::IpAddr;
use std::rc::Rc;

use bytes::BytesMut;
use monoio::io::AsyncWriteRentExt;
use monoio::net::TcpStream;
use serde_json::{json, Value};

use crate::delivery::session::socketio::connect_error_frame;
use crate::proto::engineio::{self, Handshake, Packet as EnginePacket};
use crate::proto::http::{self, Request};
use crate::proto::msg::{self, Encoding, Format};
use crate::proto::socketio::{self, Kind};
use crate::proto::ws::codec::{self, Decoder, Event};
use crate::proto::ws::deflate;
use crate::runtime::conn;
use crate::runtime::core::Core;
use crate::runtime::pending::{Expired, Stage, Ticket};
use crate::runtime::socket::Socket;

use super::http::{read_some, Edge, Reply};
use super::upgrade::{self, Opening};

/// Most bytes a client may send before its CONNECT is answered (a token is a few KiB).
const PREAUTH_MAX_BYTES: usize = 16 * 1024;
/// CONNECT packets one socket may try before it is closed.
const MAX_CONNECT_ATTEMPTS: u32 = 3;

/// Whether a path is served here.
pub fn route(path: &str) -> bool {
    path == "/socket.io/" || path == "/socket.io"
}

/// An Engine.IO error answer: `{"code":…,"message":…}` with HTTP 400 (403 for a refused
/// origin), as the reference server sends them.
fn engine_error(status: u16, code: u8, message: &str) -> Reply {
    Reply::json(
        status,
        serde_json::to_vec(&json!({ "code": code, "message": message })).expect("json"),
    )
}

/// A `/socket.io/` request that is not a WebSocket upgrade: the long-polling transport, which
/// this version does not serve.
pub fn answer(req: &Request) -> Reply {
    if req.query_param("EIO").as_deref() != Some("4") {
        return engine_error(400, 5, "Unsupported protocol version");
    }
    engine_error(400, 0, "Transport unknown")
}

pub async fn serve(
    edge: &Edge,
    core: Rc<Core>,
    mut stream: TcpStream,
    peer: IpAddr,
    req: Request,
    leftover: Vec<u8>,
    ticket: Ticket,
) {
    if req.query_param("EIO").as_deref() != Some("4") {
        let reply = engine_error(400, 5, "Unsupported protocol version");
        let _ = stream.write_all(reply.encode(false)).await;
        return;
    }
    let transport = req.query_param("transport");
    match transport.as_deref() {
        Some("websocket") if req.query_param("sid").is_none() => {}
        Some("websocket") | Some("polling") => {
            // Long-polling (and upgrading from it) is not served yet: the client is told so
            // and, with its default options, falls back to nothing; `transports:
            // ["websocket"]` connects.
            let reply = engine_error(400, 0, "Transport unknown");
            let _ = stream.write_all(reply.encode(false)).await;
            return;
        }
        _ => {
            let reply = engine_error(400, 0, "Transport unknown");
            let _ = stream.write_all(reply.encode(false)).await;
            return;
        }
    }
    if core.shared.is_draining() {
        let reply = Reply::error(503, "node is draining; reconnect to another node")
            .with_header("Retry-After", "1");
        let _ = stream.write_all(reply.encode(false)).await;
        return;
    }
    let upgrade = match http::websocket_upgrade(&req) {
        Ok(u) => u,
        Err(refusal) => {
            let _ = stream.write_all(refusal.response()).await;
            return;
        }
    };
    let settings = &core.shared.settings;
    let extensions = settings
        .compress_over
        .and_then(|_| deflate::negotiate(req.tokens("sec-websocket-extensions")));
    let compress_over = settings.compress_over.filter(|_| extensions.is_some());
    let sid = core.shared.conn_name(core.next_conn_id());
    let open = Handshake {
        sid: &sid,
        upgrades: &[],
        ping_interval: settings
            .session
            .socketio_heartbeat
            .ping_interval
            .as_millis() as u64,
        ping_timeout: settings.session.socketio_heartbeat.pong_timeout.as_millis() as u64,
        max_payload: settings.socketio_max_payload as u64,
    };
    let mut out = http::accept_response(&upgrade.key, None, extensions.as_deref());
    out.extend_from_slice(&msg::engineio_frame(&open.packet()));
    let (res, _) = stream.write_all(out).await;
    if res.is_err() {
        return;
    }
    ticket.stage(Stage::Head, std::time::Instant::now());
    let mut acc = BytesMut::from(&leftover[..]);
    let mut decoder = Decoder::new(PREAUTH_MAX_BYTES);
    if compress_over.is_some() {
        decoder = decoder.with_deflate();
    }
    let Some(opening) = wait_for_connect(
        edge,
        &core,
        &mut stream,
        peer,
        &req,
        &ticket,
        &mut decoder,
        &mut acc,
    )
    .await
    else {
        return;
    };
    drop(ticket);
    let (id, projects) = match upgrade::admit(&core, peer, &opening, "socket.io").await {
        Ok(admitted) => admitted,
        Err(reply) => {
            let message = reply_message(&reply);
            let refusal = connect_error_frame("/", &message, Some(json!({"status": reply.status})));
            let _ = stream.write_all(refusal).await;
            let _ = stream.write_all(codec::close_frame(1008, "refused")).await;
            return;
        }
    };
    drop((req, upgrade));
    let format = Format {
        encoding: Encoding::SocketIo,
        compress_over,
    };
    let resumes = vec![opening.resume; opening.channels.len()];
    let socket = Socket::new(stream);
    let conn = upgrade::start(
        &core, id, peer, &socket, projects, opening, format, resumes, None,
    );
    monoio::spawn(conn::run(core, socket, conn, acc));
}

/// Reads Engine.IO packets until the client's CONNECT to `/` carries a token that opens a
/// connection; None if the socket closed, misbehaved or ran out of time.
#[allow(clippy::too_many_arguments)]
async fn wait_for_connect(
    edge: &Edge,
    core: &Core,
    stream: &mut TcpStream,
    peer: IpAddr,
    req: &Request,
    ticket: &Ticket,
    decoder: &mut Decoder,
    acc: &mut BytesMut,
) -> Option<Opening> {
    let mut attempts = 0;
    let mut buf = Vec::new();
    loop {
        while let Some(event) = match decoder.decode(acc) {
            Ok(event) => event,
            Err(e) => {
                let _ = stream
                    .write_all(codec::close_frame(e.close_code(), e.reason()))
                    .await;
                return None;
            }
        } {
            let text = match event {
                Event::Text(text) => text,
                Event::Close { .. } => {
                    let _ = stream.write_all(codec::close_frame(1000, "")).await;
                    return None;
                }
                // Nothing binary means anything before the CONNECT; pings get no pong yet.
                _ => continue,
            };
            let text = std::str::from_utf8(&text).unwrap_or_default();
            let packet = match engineio::decode_text(text) {
                Ok(EnginePacket::Message(engineio::Data::Text(packet))) => packet,
                Ok(EnginePacket::Close) => return None,
                Ok(_) => continue,
                Err(_) => return refuse(stream, "malformed Engine.IO packet").await,
            };
            let packet = match socketio::decode(packet) {
                Ok(p) => p,
                Err(_) => return refuse(stream, "malformed Socket.IO packet").await,
            };
            if packet.kind != Kind::Connect {
                continue; // nothing is connected yet: there is nobody to give it to
            }
            if packet.namespace != "/" {
                let refusal = connect_error_frame(packet.namespace, "Invalid namespace", None);
                if stream.write_all(refusal).await.0.is_err() {
                    return None;
                }
                continue;
            }
            attempts += 1;
            let token = packet
                .data
                .and_then(|d| serde_json::from_str::<Value>(d).ok())
                .and_then(|auth| auth.get("token").and_then(Value::as_str).map(str::to_owned))
                .or_else(|| upgrade::request_token(req, &[]));
            match upgrade::open_with_token(edge, core, peer, req, &[], token, Vec::new(), false) {
                Ok(mut opening) => {
                    opening.encoding = Encoding::SocketIo;
                    return Some(opening);
                }
                Err(reply) => {
                    let message = reply_message(&reply);
                    let data = json!({ "status": reply.status });
                    let refusal = connect_error_frame("/", &message, Some(data));
                    if stream.write_all(refusal).await.0.is_err() {
                        return None;
                    }
                    if attempts >= MAX_CONNECT_ATTEMPTS {
                        return refuse(stream, "too many refused CONNECT packets").await;
                    }
                }
            }
        }
        let room = PREAUTH_MAX_BYTES.saturating_sub(acc.len()).max(1);
        match read_some(core, stream, ticket, &mut buf, room, room).await {
            Ok(true) => {
                acc.extend_from_slice(&buf);
                buf.clear();
            }
            Ok(false) | Err(Expired::Evicted) => return None,
            Err(Expired::Deadline) => {
                let _ = stream
                    .write_all(codec::close_frame(1008, "no CONNECT in time"))
                    .await;
                return None;
            }
        }
    }
}

/// Closes a socket that broke the protocol before it connected.
async fn refuse(stream: &mut TcpStream, reason: &str) -> Option<Opening> {
    let _ = stream.write_all(codec::close_frame(1008, reason)).await;
    None
}

/// The message of an error reply (`{"error": …}`).
fn reply_message(reply: &Reply) -> String {
    serde_json::from_slice::<Value>(&reply.body)
        .ok()
        .and_then(|v| v["error"].as_str().map(str::to_owned))
        .unwrap_or_else(|| format!("refused ({})", reply.status))
}
