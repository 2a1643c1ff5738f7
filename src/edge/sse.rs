//! `GET /events` (and `GET /api/v1/proposals/{id}/events`): the Server-Sent Events fallback.
//!
//! The same events, permissions and filters as `/ws`, on the same cores and send queues; each
//! message is the JSON object a WebSocket client gets, in `data:` lines (shared bytes, built
//! once per message), preceded by an `id:` line holding the stream's position per channel, so
//! that a reconnect with `Last-Event-ID` resumes every channel exactly (see `SseStream`).
//!
//! Invariant: the `200` goes out only after the same checks as a WebSocket handshake; a refused
//! request gets the status and JSON body `/ws` would get.

use std::net::IpAddr;
use std::rc::Rc;

use monoio::io::AsyncWriteRentExt;
use monoio::net::TcpStream;

use crate::delivery::sse::SseStream;
use crate::proto::http::Request;
use crate::proto::msg::{Encoding, Format};
use crate::runtime::conn;
use crate::runtime::core::Core;
use crate::runtime::socket::Socket;

use super::http::{Edge, Reply};
use super::upgrade::{admit, open, start};

/// Whether `path` is an event-stream endpoint, and the channel its path implies.
pub fn route(path: &str) -> Option<Vec<String>> {
    if path == "/events" {
        return Some(Vec::new());
    }
    let proposal = path
        .strip_prefix("/api/v1/proposals/")?
        .strip_suffix("/events")?;
    (!proposal.is_empty() && !proposal.contains('/')).then(|| vec![format!("proposal:{proposal}")])
}

pub async fn serve(
    edge: &Edge,
    core: Rc<Core>,
    mut stream: TcpStream,
    peer: IpAddr,
    req: Request,
    path_channels: Vec<String>,
) {
    let mut opening = match open(edge, &core, peer, &req, &[], path_channels, false) {
        Ok(o) => o,
        Err(reply) => return refuse(&mut stream, &req, reply).await,
    };
    opening.acks = false; // an event stream cannot acknowledge
    let (id, projects) = match admit(&core, peer, &opening, "sse").await {
        Ok(admitted) => admitted,
        Err(reply) => return refuse(&mut stream, &req, reply).await,
    };
    let epoch = core.shared.epoch.as_str();
    let resumes = match req
        .header("last-event-id")
        .map(str::to_owned)
        .or_else(|| req.query_param("last_event_id"))
    {
        Some(last) => SseStream::parse_id(last.trim(), epoch, &opening.channels),
        None => vec![opening.resume; opening.channels.len()],
    };
    let sse = SseStream::new(epoch, &opening.channels, &resumes);
    let mut head = String::from(
        "HTTP/1.1 200 OK\r\nContent-Type: text/event-stream; charset=utf-8\r\n\
         Cache-Control: no-cache\r\nX-Accel-Buffering: no\r\nConnection: close\r\n",
    );
    if let Some(origin) = req.header("origin") {
        // Allowed (checked by the router): let the page read the stream.
        head.push_str(&format!(
            "Access-Control-Allow-Origin: {origin}\r\nVary: Origin\r\n"
        ));
    }
    // Then, as the stream's first bytes: reconnect after 1 s (browsers default to ~3 s).
    head.push_str("\r\nretry: 1000\n\n");
    drop(req);
    let (res, _) = stream.write_all(head.into_bytes()).await;
    if res.is_err() {
        core.release(id, &opening.claims.sub, &projects);
        return;
    }
    // An event stream cannot answer pings: a peer that vanished is found by the kernel when
    // the comment pings (or events) stay unacknowledged this long, as a WebSocket that stops
    // answering pongs would be.
    let hb = &core.shared.settings.session.heartbeat;
    let dead_after = hb.ping_interval + hb.pong_timeout * hb.max_missed;
    set_user_timeout(&stream, dead_after);
    let format = Format {
        encoding: Encoding::Sse,
        compress_over: None,
    };
    let sse = Some(Box::new(sse));
    let socket = Socket::new(stream);
    let conn = start(
        &core,
        id,
        peer,
        Some(&socket),
        projects,
        opening,
        format,
        resumes,
        sse,
    );
    monoio::spawn(conn::run_sse(core, socket, conn));
}

fn set_user_timeout(stream: &TcpStream, after: std::time::Duration) {
    if let Err(e) = crate::runtime::socket::set_user_timeout(stream, after) {
        tracing::debug!("TCP_USER_TIMEOUT not set: {e}");
    }
}

async fn refuse(stream: &mut TcpStream, req: &Request, mut reply: Reply) {
    if let Some(origin) = req.header("origin") {
        reply = reply
            .with_header("Access-Control-Allow-Origin", origin)
            .with_header("Vary", "Origin");
    }
    let _ = stream.write_all(reply.encode(false)).await;
}
