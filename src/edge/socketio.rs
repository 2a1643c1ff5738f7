//! `/socket.io/`: Engine.IO v4 and Socket.IO v5 for `socket.io-client` v4.
//!
//! The websocket transport: the upgrade needs no token (browsers pass it in Socket.IO's
//! CONNECT, as `auth: { token }`), so between the `101` and the CONNECT the socket is still a
//! pending socket of the edge: evictable, with the head deadline, reading at most
//! `PREAUTH_MAX_BYTES`. A CONNECT with a good token (and room in the limits) makes it a
//! connection like any other, whose session speaks Socket.IO; a bad one gets `CONNECT_ERROR`,
//! which the client's `connect_error` handler sees.

use std::future::{poll_fn, Future};
use std::net::IpAddr;
use std::pin::Pin;
use std::rc::Rc;
use std::sync::Arc;
use std::task::Poll as TaskPoll;
use std::time::Instant;

use base64::Engine as _;
use bytes::{Bytes, BytesMut};
use futures_channel::oneshot;
use monoio::io::AsyncWriteRentExt;
use monoio::net::TcpStream;
use serde_json::{json, Value};

use crate::delivery::sequencer::Resume;
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
use crate::runtime::polling::{Answer, Connecting, PollError, Probe, Upgraded};
use crate::runtime::socket::Socket;

use super::http::{read_some, Edge, Reply};
use super::upgrade::{self, Opening};

/// Most bytes a client may send before its CONNECT is answered (a token is a few KiB).
pub const PREAUTH_MAX_BYTES: usize = 16 * 1024;
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

pub async fn serve(
    edge: &Arc<Edge>,
    core: Rc<Core>,
    mut stream: TcpStream,
    peer: IpAddr,
    req: Request,
    leftover: Vec<u8>,
    ticket: Ticket,
) {
    let refusal = if req.query_param("EIO").as_deref() != Some("4") {
        Some(engine_error(400, 5, "Unsupported protocol version"))
    } else if req.query_param("transport").as_deref() != Some("websocket") {
        Some(engine_error(400, 0, "Transport unknown"))
    } else if core.shared.is_draining() {
        Some(
            Reply::error(503, "node is draining; reconnect to another node")
                .with_header("Retry-After", "1"),
        )
    } else {
        None
    };
    if let Some(reply) = refusal {
        send(&ticket, &mut stream, reply.encode(false)).await;
        return;
    }
    let upgrade = match http::websocket_upgrade(&req) {
        Ok(u) => u,
        Err(refusal) => {
            send(&ticket, &mut stream, refusal.response()).await;
            return;
        }
    };
    let settings = &core.shared.settings;
    // The upgrade of a polling session goes on uncompressed: that session was made without
    // permessage-deflate and its connection cannot inflate, so the offer is declined (a
    // browser compresses every message it sends once the extension is accepted).
    let upgrading = req.query_param("sid").is_some();
    let extensions = settings
        .compress_over
        .filter(|_| !upgrading)
        .and_then(|_| deflate::negotiate(req.tokens("sec-websocket-extensions")));
    let compress_over = settings.compress_over.filter(|_| extensions.is_some());
    let accept = http::accept_response(&upgrade.key, None, extensions.as_deref());
    let mut acc = BytesMut::from(&leftover[..]);
    let mut decoder = Decoder::new(PREAUTH_MAX_BYTES);
    if compress_over.is_some() {
        decoder = decoder.with_deflate();
    }
    ticket.stage(Stage::Head, Instant::now());
    if let Some(sid) = req.query_param("sid") {
        // An upgrade of a polling session: the probe, then the socket moves to the session.
        if send(&ticket, &mut stream, accept).await {
            let ws = PreAuth {
                core: &core,
                ticket: &ticket,
                decoder: &mut decoder,
                acc: &mut acc,
            };
            upgrade_polling(ws, stream, &sid).await;
        }
        return;
    }
    let sid = sid_of(core.next_conn_id(), "ws");
    let mut out = accept;
    out.extend_from_slice(&msg::engineio_frame(&handshake(&core, &sid, &[])));
    if !send(&ticket, &mut stream, out).await {
        return;
    }
    let ws = PreAuth {
        core: &core,
        ticket: &ticket,
        decoder: &mut decoder,
        acc: &mut acc,
    };
    let Some(opening) = wait_for_connect(edge, ws, &mut stream, peer, &req).await else {
        return;
    };
    let (id, projects) = match upgrade::admit(&core, peer, &opening, "socket.io").await {
        Ok(admitted) => admitted,
        Err(reply) => {
            let last = [refused_frame(&reply), codec::close_frame(1008, "refused")].concat();
            send(&ticket, &mut stream, last).await;
            return;
        }
    };
    drop(ticket);
    drop((req, upgrade));
    let format = Format {
        encoding: Encoding::SocketIo,
        compress_over,
    };
    let resumes = resumes_of(&opening);
    let socket = Socket::new(stream);
    let conn = upgrade::start(
        &core,
        id,
        peer,
        Some(&socket),
        projects,
        opening,
        format,
        resumes,
        None,
    );
    monoio::spawn(conn::run(core, socket, conn, acc));
}

/// A WebSocket before its session: read under the edge's deadline, within a small bound.
struct PreAuth<'a> {
    core: &'a Rc<Core>,
    ticket: &'a Ticket,
    decoder: &'a mut Decoder,
    acc: &'a mut BytesMut,
}

impl PreAuth<'_> {
    /// The next Engine.IO text packet; None if the socket closed, broke the protocol (it was
    /// told why) or ran out of time.
    async fn next_text(&mut self, stream: &mut TcpStream) -> Option<String> {
        let mut buf = Vec::new();
        loop {
            match self.decoder.decode(self.acc) {
                Ok(Some(Event::Text(text))) => {
                    return Some(String::from_utf8_lossy(&text).into_owned())
                }
                Ok(Some(Event::Close { .. })) => {
                    send(self.ticket, stream, codec::close_frame(1000, "")).await;
                    return None;
                }
                // Nothing binary means anything before the CONNECT; pings get no pong yet.
                Ok(Some(_)) => continue,
                Ok(None) => {}
                Err(e) => {
                    let close = codec::close_frame(e.close_code(), e.reason());
                    send(self.ticket, stream, close).await;
                    return None;
                }
            }
            let room = PREAUTH_MAX_BYTES.saturating_sub(self.acc.len()).max(1);
            match read_some(self.core, stream, self.ticket, &mut buf, room, room).await {
                Ok(true) => {
                    self.acc.extend_from_slice(&buf);
                    buf.clear();
                }
                Ok(false) | Err(Expired::Evicted) => return None,
                Err(Expired::Deadline) => {
                    // Past the deadline: one try to say why, no waiting for it.
                    let close = codec::close_frame(1008, "no CONNECT in time");
                    let _ = crate::runtime::socket::try_send(stream, &close);
                    return None;
                }
            }
        }
    }
}

/// The WebSocket of a polling session's upgrade: `2probe` answered `3probe` (the session's
/// held GET gets a noop), then on the client's `5` the socket moves to the session's core.
async fn upgrade_polling(mut ws: PreAuth<'_>, mut stream: TcpStream, sid: &str) {
    let unknown = codec::close_frame(1008, "Session ID unknown");
    let Some((id, key)) = parse_sid(sid) else {
        send(ws.ticket, &mut stream, unknown).await;
        return;
    };
    let home = (id >> 48) as usize;
    if home >= ws.core.cores() {
        send(ws.ticket, &mut stream, unknown).await;
        return;
    }
    let me = ws.core.clone();
    if ws.next_text(&mut stream).await.as_deref() != Some("2probe") {
        let close = codec::close_frame(1008, "expected the probe");
        send(ws.ticket, &mut stream, close).await;
        return;
    }
    // A probe may come before the CONNECT opened the session (a client sends both at once):
    // it waits for that, within the socket's deadline, then asks again.
    let key_home: Box<str> = key.into();
    let probed = loop {
        let key_home = key_home.clone();
        let probe = me
            .at_home(home, move |core, tx| {
                let _ = tx.send(core.poll_probed(id, &key_home));
            })
            .await;
        match probe {
            Some(Probe::Ready) => break true,
            Some(Probe::NotYet(opened)) => match ws.ticket.guard(opened).await {
                Ok(Ok(())) => continue,
                _ => break false,
            },
            Some(Probe::Unknown) | None => break false,
        }
    };
    if !probed {
        send(ws.ticket, &mut stream, unknown).await;
        return;
    }
    let unprobe = |me: Rc<Core>| {
        let key: Box<str> = key.into();
        async move {
            me.at_home(home, move |core, tx| {
                core.poll_unprobed(id, &key);
                let _ = tx.send(());
            })
            .await;
        }
    };
    if !send(ws.ticket, &mut stream, msg::engineio_frame("3probe")).await {
        return unprobe(me).await;
    }
    if ws.next_text(&mut stream).await.as_deref() != Some("5") {
        let close = codec::close_frame(1008, "expected the upgrade");
        send(ws.ticket, &mut stream, close).await;
        return unprobe(me).await;
    }
    // The socket, and what was read past the upgrade packet, go to the session's core.
    let leftover = std::mem::take(ws.acc);
    let std_stream = {
        use std::os::fd::{FromRawFd, IntoRawFd};
        // SAFETY: the descriptor comes out of `stream`, which gives it up here.
        unsafe { std::net::TcpStream::from_raw_fd(stream.into_raw_fd()) }
    };
    let key_home: Box<str> = key.into();
    let moved = me
        .at_home(home, move |core, tx| {
            let moved = match TcpStream::from_std(std_stream) {
                Ok(stream) => core.poll_upgrade(
                    id,
                    &key_home,
                    Upgraded {
                        socket: Socket::new(stream),
                        leftover,
                    },
                ),
                Err(_) => false,
            };
            let _ = tx.send(moved);
        })
        .await;
    if moved != Some(true) {
        tracing::debug!(sid, "a polling session went away during its upgrade");
    }
}

/// Reads Engine.IO packets until the client's CONNECT to `/` carries a token that opens a
/// connection; None if the socket closed, misbehaved or ran out of time.
async fn wait_for_connect(
    edge: &Edge,
    mut ws: PreAuth<'_>,
    stream: &mut TcpStream,
    peer: IpAddr,
    req: &Request,
) -> Option<Opening> {
    let mut attempts = 0;
    loop {
        let text = ws.next_text(stream).await?;
        let packet = match engineio::decode_text(&text) {
            Ok(EnginePacket::Message(engineio::Data::Text(packet))) => packet,
            Ok(EnginePacket::Close) => return None,
            Ok(_) => continue,
            Err(_) => return refuse(ws.ticket, stream, "malformed Engine.IO packet").await,
        };
        let packet = match socketio::decode(packet) {
            Ok(p) => p,
            Err(_) => return refuse(ws.ticket, stream, "malformed Socket.IO packet").await,
        };
        if packet.kind != Kind::Connect {
            continue; // nothing is connected yet: there is nobody to give it to
        }
        if packet.namespace != "/" {
            let refusal = connect_error_frame(packet.namespace, "Invalid namespace", None);
            if !send(ws.ticket, stream, refusal).await {
                return None;
            }
        } else {
            match open_for_connect(edge, ws.core, peer, req, packet.data).await {
                Ok(opening) => return Some(opening),
                Err(refusal) => {
                    if !send(ws.ticket, stream, refusal).await {
                        return None;
                    }
                }
            }
        }
        // Every CONNECT refused counts, whatever it was refused for.
        attempts += 1;
        if attempts >= MAX_CONNECT_ATTEMPTS {
            return refuse(ws.ticket, stream, "too many refused CONNECT packets").await;
        }
    }
}

/// A session id: the home core's connection id and the secret key (`<id hex>-<key>`).
fn parse_sid(sid: &str) -> Option<(u64, &str)> {
    let (id, key) = sid.split_once('-')?;
    Some((u64::from_str_radix(id, 16).ok()?, key))
}

fn sid_of(id: u64, key: &str) -> String {
    format!("{id:x}-{key}")
}

fn unknown_sid() -> Reply {
    engine_error(400, 1, "Session ID unknown")
}

fn text(body: Vec<u8>) -> Reply {
    Reply {
        status: 200,
        content_type: "text/plain; charset=UTF-8",
        headers: Vec::new(),
        body,
    }
}

/// Whether a request carries a body this module reads (a polling POST), and how large it
/// may be.
pub fn takes_body(req: &Request) -> bool {
    req.method == "POST" && route(&req.path) && req.query_param("sid").is_some()
}

pub use crate::runtime::polling::Standing;

/// Where the session a polling request names stands (asked of its home core).
pub async fn standing(core: &Rc<Core>, req: &Request) -> Standing {
    let Some((id, key)) = req.query_param("sid").as_deref().and_then(|s| {
        let (id, key) = parse_sid(s)?;
        Some((id, Box::<str>::from(key)))
    }) else {
        return Standing::Unknown;
    };
    let home = (id >> 48) as usize;
    if home >= core.cores() {
        return Standing::Unknown;
    }
    core.at_home(home, move |core, tx| {
        let _ = tx.send(core.poll_standing(id, &key));
    })
    .await
    .unwrap_or(Standing::Unknown)
}

fn handshake(core: &Core, sid: &str, upgrades: &[&str]) -> String {
    let settings = &core.shared.settings;
    Handshake {
        sid,
        upgrades,
        ping_interval: settings
            .session
            .socketio_heartbeat
            .ping_interval
            .as_millis() as u64,
        ping_timeout: settings.session.socketio_heartbeat.pong_timeout.as_millis() as u64,
        max_payload: settings.socketio_max_payload as u64,
    }
    .packet()
}

/// A `/socket.io/` request that is not a WebSocket upgrade: the long-polling transport. None
/// if the client went away while its GET was held.
pub async fn polling(
    edge: &Arc<Edge>,
    core: &Rc<Core>,
    stream: &TcpStream,
    ticket: &mut Ticket,
    peer: IpAddr,
    req: &Request,
    body: &[u8],
) -> Option<Reply> {
    if req.query_param("EIO").as_deref() != Some("4") {
        return Some(engine_error(400, 5, "Unsupported protocol version"));
    }
    if req.query_param("transport").as_deref() != Some("polling") {
        return Some(engine_error(400, 0, "Transport unknown"));
    }
    let Some(sid) = req.query_param("sid") else {
        if req.method != "GET" {
            return Some(engine_error(400, 2, "Bad handshake method"));
        }
        return Some(open_polling(core, peer));
    };
    let Some((id, key)) = parse_sid(&sid) else {
        return Some(unknown_sid());
    };
    let home = (id >> 48) as usize;
    if home >= core.cores() {
        return Some(unknown_sid());
    }
    let key: Box<str> = key.into();
    match req.method.as_str() {
        "GET" => {
            let answer = core
                .at_home(home, move |core, tx| {
                    let _ = tx.send(core.poll_get(id, &key));
                })
                .await;
            match answer {
                None | Some(Err(PollError::Unknown | PollError::Full | PollError::PerIp)) => {
                    Some(unknown_sid())
                }
                Some(Err(PollError::Overlap)) => Some(engine_error(400, 3, "Bad request")),
                Some(Ok(Answer::Now(body))) => Some(text(body)),
                // A connected session's GET is the connection's: no pending socket meanwhile.
                Some(Ok(Answer::Later {
                    answer,
                    connected: true,
                })) => {
                    ticket.hold();
                    let body = held(stream, answer).await;
                    ticket.unhold(Stage::Body, Instant::now());
                    body.map(text)
                }
                // Before the CONNECT it is one still: evictable, with the head deadline.
                Some(Ok(Answer::Later { answer, .. })) => {
                    ticket.stage(Stage::Head, Instant::now());
                    ticket.guard(held(stream, answer)).await.ok()?.map(text)
                }
            }
        }
        "POST" => {
            let (edge, body, req) = (edge.clone(), body.to_vec(), req.clone());
            core.at_home(home, move |core, tx| {
                monoio::spawn(async move {
                    let _ = tx.send(post(&edge, &core, id, &key, peer, &req, &body).await);
                });
            })
            .await
            .or_else(|| Some(unknown_sid()))
        }
        _ => Some(engine_error(400, 2, "Bad request method")),
    }
}

/// The handshake of a polling session: it lives on this core, waiting for its CONNECT until
/// the head deadline.
fn open_polling(core: &Core, peer: IpAddr) -> Reply {
    if core.shared.is_draining() {
        return Reply::error(503, "node is draining; reconnect to another node")
            .with_header("Retry-After", "1");
    }
    let key = format!("{:032x}", rand::random::<u128>());
    let limits = core.pending.limits();
    let expires = Instant::now() + limits.header_timeout;
    // The same share per address as pending sockets have (loopback alike, unless limited).
    let per_ip = match limits.max_pending_per_ip {
        _ if peer.is_loopback() && !limits.limit_loopback => 0,
        0 => 0,
        n => n.div_ceil(core.cores() as u32),
    };
    match core.poll_open(key.clone().into(), expires, peer, per_ip) {
        Ok(id) => text(handshake(core, &sid_of(id, &key), &["websocket"]).into_bytes()),
        Err(PollError::PerIp) => Reply::error(
            429,
            "too many Socket.IO sessions from this address are waiting for their CONNECT",
        )
        .with_header("Retry-After", "1"),
        Err(_) => Reply::error(
            503,
            "too many Socket.IO sessions are waiting for their CONNECT",
        )
        .with_header("Retry-After", "1"),
    }
}

/// Waits for a held GET's answer, noticing a client that goes away meanwhile (its GET is
/// then cancelled and what it would have carried goes with the next one).
async fn held(stream: &TcpStream, rx: oneshot::Receiver<Vec<u8>>) -> Option<Vec<u8>> {
    let mut rx = rx;
    let mut watching = true;
    loop {
        if !watching {
            return Some(rx.await.unwrap_or_else(|_| b"1".to_vec()));
        }
        let mut readable: Pin<Box<dyn Future<Output = _>>> = Box::pin(stream.readable(false));
        let outcome = poll_fn(|cx| {
            if let TaskPoll::Ready(answer) = Pin::new(&mut rx).poll(cx) {
                return TaskPoll::Ready(Some(answer));
            }
            match readable.as_mut().poll(cx) {
                TaskPoll::Ready(_) => TaskPoll::Ready(None),
                TaskPoll::Pending => TaskPoll::Pending,
            }
        })
        .await;
        drop(readable);
        match outcome {
            // The session ended without a last word: the close packet says so.
            Some(answer) => return Some(answer.unwrap_or_else(|_| b"1".to_vec())),
            None if crate::runtime::socket::peer_closed(stream) => return None,
            // Something pipelined behind the GET: it waits in the kernel; stop watching.
            None => watching = false,
        }
    }
}

/// A polling POST at the session's home: its packets, in order, to the session (or, before
/// the session exists, its CONNECT).
async fn post(
    edge: &Edge,
    core: &Rc<Core>,
    id: u64,
    key: &str,
    peer: IpAddr,
    req: &Request,
    body: &[u8],
) -> Reply {
    let conn = match core.poll_conn(id, key) {
        Ok(conn) => conn,
        Err(_) => return unknown_sid(),
    };
    let Ok(text) = std::str::from_utf8(body) else {
        core.poll_close(id, key);
        return engine_error(400, 3, "Bad request");
    };
    if let Some(conn) = conn {
        for record in text.split('\x1e') {
            let event = match record.strip_prefix('b') {
                Some(b64) => match base64::engine::general_purpose::STANDARD.decode(b64) {
                    Ok(bytes) => Event::Binary(bytes.into()),
                    Err(_) => {
                        core.close(&conn, 1008, "bad base64 in a binary message");
                        return engine_error(400, 3, "Bad request");
                    }
                },
                None => Event::Text(Bytes::copy_from_slice(record.as_bytes())),
            };
            core.on_ws_event(&conn, event);
        }
        return text_ok();
    }
    for record in text.split('\x1e') {
        // Ended (refused too often) or connected: the rest of the body has nobody to go to.
        if core.poll_standing(id, key) != Standing::Unconnected {
            break;
        }
        let packet = match engineio::decode_text(record) {
            Ok(EnginePacket::Message(engineio::Data::Text(p))) => p,
            Ok(EnginePacket::Close) => {
                core.poll_close(id, key);
                return text_ok();
            }
            Ok(_) => continue,
            Err(_) => {
                core.poll_close(id, key);
                return engine_error(400, 3, "Bad request");
            }
        };
        let Ok(packet) = socketio::decode(packet) else {
            core.poll_close(id, key);
            return engine_error(400, 3, "Bad request");
        };
        if packet.kind != Kind::Connect {
            continue;
        }
        if packet.namespace != "/" {
            let refusal = connect_error_frame(packet.namespace, "Invalid namespace", None);
            core.poll_refused(id, key, refusal);
            continue;
        }
        if let Ok(Connecting::Check) = core.poll_connecting(id, key) {
            connect_polling(edge, core, id, key, peer, req, packet.data).await;
        }
    }
    text_ok()
}

fn text_ok() -> Reply {
    text(b"ok".to_vec())
}

/// A polling session's CONNECT: the token checked and the limits asked, the session opened
/// (its `40` and welcome wait for the next GET) or refused with CONNECT_ERROR.
async fn connect_polling(
    edge: &Edge,
    core: &Rc<Core>,
    id: u64,
    key: &str,
    peer: IpAddr,
    req: &Request,
    auth: Option<&str>,
) {
    let opening = match open_for_connect(edge, core, peer, req, auth).await {
        Ok(o) => o,
        Err(refusal) => return core.poll_refused(id, key, refusal),
    };
    let projects = match upgrade::admit_as(core, id, peer, &opening, "socket.io").await {
        Ok(projects) => projects,
        Err(reply) => return core.poll_refused(id, key, refused_frame(&reply)),
    };
    let format = Format::from(Encoding::SocketIo);
    let resumes = resumes_of(&opening);
    let conn = upgrade::start(
        core, id, peer, None, projects, opening, format, resumes, None,
    );
    core.poll_connected(id, key, conn);
}

/// A CONNECT's token checked like a WebSocket handshake's (`auth.token`, else the request's
/// `?token=` or `Authorization`): the opening, or the CONNECT_ERROR frame. A client that
/// sends the private id of a session that went away (`pid`, with the `offset` of the last
/// event it got) gets that session's channels back, each resuming where the client left it.
async fn open_for_connect(
    edge: &Edge,
    core: &Core,
    peer: IpAddr,
    req: &Request,
    auth: Option<&str>,
) -> Result<Opening, Bytes> {
    let auth = auth.and_then(|d| serde_json::from_str::<Value>(d).ok());
    let field = |name: &str| {
        auth.as_ref()
            .and_then(|a| a.get(name))
            .and_then(Value::as_str)
            .map(str::to_owned)
    };
    let token = field("token").or_else(|| upgrade::request_token(req, &[]));
    let mut opening =
        match upgrade::open_with_token(edge, core, peer, req, &[], token, Vec::new(), false) {
            Ok(opening) => opening,
            Err(reply) => return Err(refused_frame(&reply)),
        };
    opening.encoding = Encoding::SocketIo;
    if let Some(pid) = field("pid").filter(|_| !core.shared.settings.socketio_recovery.is_zero()) {
        let record = core
            .take_recovery(&pid, &opening.claims.sub)
            .await
            .filter(|r| r.user == opening.claims.sub && r.epoch == core.shared.epoch);
        if let Some(record) = record {
            let (resumes, mut exact) = record.resumes(field("offset").as_deref());
            for (channel, resume) in resumes {
                // What the token (or an admin since) no longer allows is not restored.
                if opening.claims.can_subscribe(&channel) {
                    opening.channels.push(channel.to_string());
                    opening.resumes.push(resume);
                } else {
                    exact = false;
                }
            }
            opening.recovering = Some((pid, exact));
        }
    }
    Ok(opening)
}

/// Where each channel of an opening resumes.
fn resumes_of(opening: &Opening) -> Vec<Resume> {
    if opening.resumes.len() == opening.channels.len() {
        opening.resumes.clone()
    } else {
        vec![opening.resume; opening.channels.len()]
    }
}

fn refused_frame(reply: &Reply) -> Bytes {
    let message = reply_message(reply);
    connect_error_frame("/", &message, Some(json!({ "status": reply.status })))
}

/// Closes a socket that broke the protocol before it connected.
async fn refuse(ticket: &Ticket, stream: &mut TcpStream, reason: &str) -> Option<Opening> {
    send(ticket, stream, codec::close_frame(1008, reason)).await;
    None
}

/// Writes `bytes` to a socket that is not a connection yet, within its deadline: false if the
/// write failed or the deadline (or an eviction) came first. A client that does not read
/// cannot hold the socket.
async fn send<B: monoio::buf::IoBuf + 'static>(
    ticket: &Ticket,
    stream: &mut TcpStream,
    bytes: B,
) -> bool {
    matches!(ticket.guard(stream.write_all(bytes)).await, Ok((Ok(_), _)))
}

/// The message of an error reply (`{"error": …}`).
fn reply_message(reply: &Reply) -> String {
    serde_json::from_slice::<Value>(&reply.body)
        .ok()
        .and_then(|v| v["error"].as_str().map(str::to_owned))
        .unwrap_or_else(|| format!("refused ({})", reply.status))
}
