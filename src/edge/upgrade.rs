//! `GET /ws` and `GET /ws/projects/{id}`: the WebSocket handshake with token and channels.
//!
//! Invariant: the `101` goes out only after the upgrade headers, the token and every requested
//! channel passed; otherwise the client gets the HTTP status the contract names (400, 401, 403,
//! 404, 426, 503) and a body saying why.

use std::net::IpAddr;
use std::rc::Rc;

use bytes::BytesMut;
use monoio::io::AsyncWriteRentExt;
use monoio::net::TcpStream;
use serde_json::json;

use crate::delivery::access::Claims;
use crate::delivery::channel;
use crate::delivery::filter::{parse_list, text_match, Filter};
use crate::delivery::limits::Refused;
use crate::delivery::sequencer::Resume;
use crate::delivery::session::{socketio, Session};
use crate::delivery::sse::SseStream;
use crate::proto::http::{self, Request};
use crate::proto::msg::{Control, Encoding, Format};
use crate::proto::ws::deflate;
use crate::runtime::audit::AUDIT_CHANNEL;
use crate::runtime::conn::{self, Conn};
use crate::runtime::core::Core;
use crate::runtime::socket::Socket;

use super::http::{bearer, Edge, Reply};

/// Subprotocol a browser offers (with `bearer.<token>`) and the server selects.
pub const SUBPROTOCOL: &str = "ringcast";
/// Prefix of the subprotocol offer that carries the token.
pub const TOKEN_PROTOCOL_PREFIX: &str = "bearer.";

/// What a valid handshake asked for.
#[derive(Debug)]
pub(super) struct Opening {
    pub claims: Claims,
    pub channels: Vec<String>,
    pub resume: Resume,
    pub encoding: Encoding,
    /// Why `encoding` is not what was asked for.
    pub encoding_note: Option<String>,
    /// `ack=critical`
    pub acks: bool,
    pub filter: Filter,
    pub protocol: Option<&'static str>,
    /// Per channel, where it resumes (empty: all at `resume`).
    pub resumes: Vec<Resume>,
    /// A Socket.IO client recovering its session: its private id, and whether every
    /// channel's position was known.
    pub recovering: Option<(String, bool)>,
}

pub async fn serve(
    edge: &Edge,
    core: Rc<Core>,
    mut stream: TcpStream,
    peer: IpAddr,
    req: Request,
    leftover: BytesMut,
) {
    let upgrade = match http::websocket_upgrade(&req) {
        Ok(u) => u,
        Err(refusal) => {
            let _ = stream.write_all(refusal.response()).await;
            return;
        }
    };
    let opening = path_channels(&req.path).and_then(|(channels, audit)| {
        open(edge, &core, peer, &req, &upgrade.protocols, channels, audit)
    });
    let opening = match opening {
        Ok(o) => o,
        Err(reply) => {
            let _ = stream.write_all(reply.encode(false)).await;
            return;
        }
    };
    let (id, projects) = match admit(&core, peer, &opening, "websocket").await {
        Ok(admitted) => admitted,
        Err(reply) => {
            let _ = stream.write_all(reply.encode(false)).await;
            return;
        }
    };
    // permessage-deflate, if offered and on: frames past the threshold go compressed.
    let extensions = core
        .shared
        .settings
        .compress_over
        .and_then(|_| deflate::negotiate(req.tokens("sec-websocket-extensions")));
    let compress_over = core
        .shared
        .settings
        .compress_over
        .filter(|_| extensions.is_some());
    let accept = http::accept_response(&upgrade.key, opening.protocol, extensions.as_deref());
    // The request lives no longer than the handshake: a connection lasts hours.
    drop((req, upgrade));
    let (res, _) = stream.write_all(accept).await;
    if res.is_err() {
        core.release(id, &opening.claims.sub, &projects);
        return;
    }
    let format = Format {
        encoding: opening.encoding,
        compress_over,
    };
    let resumes = vec![opening.resume; opening.channels.len()];
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
        None,
    );
    // The connection lives on in a task of its own, sized for its socket loop alone: this
    // handshake's (and the HTTP router's) state is freed now, not held for hours.
    monoio::spawn(conn::run(core, socket, conn, leftover));
}

/// The channels a WebSocket path subscribes to by itself, and whether it is the audit stream.
fn path_channels(path: &str) -> Result<(Vec<String>, bool), Reply> {
    match path {
        "/ws" => Ok((Vec::new(), false)),
        "/ws/audit" => Ok((vec![AUDIT_CHANNEL.to_owned()], true)),
        path if path.starts_with("/ws/terminal/") => match path.strip_prefix("/ws/terminal/") {
            Some(task) if !task.is_empty() && !task.contains('/') => {
                Ok((vec![format!("terminal:{task}")], false))
            }
            _ => Err(Reply::error(404, "no such endpoint")),
        },
        path => match path.strip_prefix("/ws/projects/") {
            Some(project) if !project.is_empty() && !project.contains('/') => {
                Ok((vec![format!("project:{project}")], false))
            }
            _ => Err(Reply::error(404, "no such endpoint")),
        },
    }
}

/// Node-wide connection limits, before the stream opens: the connection's id and the projects
/// it counts against.
pub(super) async fn admit(
    core: &Core,
    peer: IpAddr,
    opening: &Opening,
    transport: &'static str,
) -> Result<(u64, Vec<String>), Reply> {
    let id = core.next_conn_id();
    admit_as(core, id, peer, opening, transport)
        .await
        .map(|projects| (id, projects))
}

/// `admit` for a connection whose id was given out already (a Socket.IO polling session's,
/// at its handshake): the projects it counts against.
pub(super) async fn admit_as(
    core: &Core,
    id: u64,
    peer: IpAddr,
    opening: &Opening,
    transport: &'static str,
) -> Result<Vec<String>, Reply> {
    let projects: Vec<String> = opening
        .channels
        .iter()
        .filter_map(|c| c.strip_prefix("project:").map(str::to_owned))
        .collect();
    match core
        .admit(id, peer, &opening.claims.sub, &projects, transport)
        .await
    {
        Ok(()) => Ok(projects),
        Err(refused) => {
            core.shared.audit(
                "limit_hit",
                json!({"ip": peer, "user_id": opening.claims.sub, "reason": refused.reason}),
            );
            Err(reply_for(refused))
        }
    }
}

/// Sets up an accepted stream (WebSocket or SSE) on its core: registers it, queues the
/// welcome and subscribes its channels (`resumes[i]` for `opening.channels[i]`).
#[allow(clippy::too_many_arguments)]
pub(super) fn start(
    core: &Rc<Core>,
    id: u64,
    peer: IpAddr,
    socket: Option<&Rc<Socket>>,
    projects: Vec<String>,
    opening: Opening,
    format: Format,
    resumes: Vec<Resume>,
    sse: Option<Box<SseStream>>,
) -> Rc<Conn> {
    let settings = &core.shared.settings;
    let now = std::time::Instant::now();
    let claims = core.share_claims(opening.claims);
    let mut session = Session::new(id, peer, claims, format, &core.shared.settings.session, now);
    let transport = match (&sse, format.encoding) {
        (Some(_), _) => "sse",
        (None, Encoding::SocketIo) => "socket.io",
        (None, _) => "websocket",
    };
    if let Some(sse) = sse {
        session.set_sse(sse);
    }
    session.set_handshake_projects(projects);
    session.set_acks(opening.acks);
    session.set_filter(opening.filter);
    core.shared.audit(
        "connect",
        json!({"ip": peer, "user_id": session.user(), "connection_id": core.shared.conn_name(id),
               "core": core.id, "channels": opening.channels, "transport": transport}),
    );
    let encoding = session.encoding();
    let conn = Rc::new(match socket {
        Some(socket) => Conn::new(session, socket.clone()),
        None => Conn::polling(session),
    });
    core.register(conn.clone());
    if core.shared.is_draining() {
        // Drain began while the answer was on its way: this connection missed the notice.
        core.push(&conn, crate::runtime::core::shutdown_frame(encoding));
    }
    let welcome = Control::Welcome {
        connection_id: &core.shared.conn_name(id),
        epoch: &core.shared.epoch,
        heartbeat_ms: match encoding {
            Encoding::SocketIo => settings.session.socketio_heartbeat.ping_interval,
            _ => settings.session.heartbeat.ping_interval,
        }
        .as_millis() as u64,
        channels: &opening.channels,
        encoding: encoding.name(),
        note: opening.encoding_note.as_deref(),
    }
    .frame_in(encoding);
    core.with_session(&conn, |s, ctx, out| {
        // Socket.IO: the answer to the client's CONNECT comes first. It carries a private id
        // for recovery (when on): the client's own if it recovers its session, unless its
        // replays turn out not to hold everything missed.
        let welcome = match encoding {
            Encoding::SocketIo => {
                let sid = core.shared.conn_name(id);
                let on = !core.shared.settings.socketio_recovery.is_zero();
                let fresh = on.then(|| format!("{:032x}", rand::random::<u128>()));
                let connect = |pid: Option<&str>| -> bytes::Bytes {
                    [socketio::connect_frame(&sid, pid), welcome.clone()]
                        .concat()
                        .into()
                };
                match (fresh, &opening.recovering) {
                    (Some(fresh), Some((pid, true))) => {
                        let if_lost = (fresh.as_str().into(), connect(Some(&fresh)));
                        s.set_recovery(pid.as_str().into(), Some(if_lost));
                        connect(Some(pid))
                    }
                    (Some(fresh), _) => {
                        s.set_recovery(fresh.as_str().into(), None);
                        connect(Some(&fresh))
                    }
                    (None, _) => connect(None),
                }
            }
            _ => welcome,
        };
        let mut subscribed = 0;
        for (name, resume) in opening.channels.iter().zip(resumes) {
            match s.subscribe(name, resume, true, ctx, out) {
                Ok(()) => subscribed += 1,
                // Checked in `open`; reaching here is a bug, so say so rather than hang the
                // welcome.
                Err(e) => tracing::error!(conn = id, "initial subscribe failed: {}", e.message),
            }
        }
        s.greet_after(welcome, subscribed);
    });
    // Displaced by a newer connection of its user while it was being set up.
    core.close_if_displaced(&conn);
    conn
}

/// Checks everything a stream is opened with: draining, token, channels and their
/// permissions, resume position, encoding, filters. `channels` holds those the path implies.
pub(super) fn open(
    edge: &Edge,
    core: &Core,
    peer: IpAddr,
    req: &Request,
    protocols: &[String],
    channels: Vec<String>,
    audit_stream: bool,
) -> Result<Opening, Reply> {
    let token = request_token(req, protocols);
    open_with_token(
        edge,
        core,
        peer,
        req,
        protocols,
        token,
        channels,
        audit_stream,
    )
}

/// The token a request carries: `?token=`, `Authorization: Bearer`, or a `bearer.<token>`
/// subprotocol offer.
pub(super) fn request_token(req: &Request, protocols: &[String]) -> Option<String> {
    req.query_param("token")
        .filter(|t| !t.is_empty())
        .or_else(|| bearer(req).map(str::to_owned))
        .or_else(|| {
            protocols
                .iter()
                .find_map(|p| p.strip_prefix(TOKEN_PROTOCOL_PREFIX).map(str::to_owned))
        })
}

/// `open` with the token given (a Socket.IO client sends it after the upgrade).
#[allow(clippy::too_many_arguments)]
pub(super) fn open_with_token(
    edge: &Edge,
    core: &Core,
    peer: IpAddr,
    req: &Request,
    protocols: &[String],
    token: Option<String>,
    mut channels: Vec<String>,
    audit_stream: bool,
) -> Result<Opening, Reply> {
    if core.shared.is_draining() {
        return Err(
            Reply::error(503, "node is draining; reconnect to another node")
                .with_header("Retry-After", "1"),
        );
    }
    let audit = |kind: &str, fields: serde_json::Value| core.shared.audit(kind, fields);
    let Some(token) = token else {
        audit(
            "auth_failure",
            json!({"ip": peer, "reason": "missing token"}),
        );
        return Err(unauthorized(
            "missing token: pass ?token=, Authorization: Bearer, or a bearer.<token> subprotocol",
        ));
    };
    let mut claims = edge.verifier.verify(&token).map_err(|e| {
        audit("auth_failure", json!({"ip": peer, "reason": e.to_string()}));
        unauthorized(&e.to_string())
    })?;
    if audit_stream && !claims.is_admin() {
        audit(
            "subscribe_denied",
            json!({"ip": peer, "user_id": claims.sub, "channel": AUDIT_CHANNEL}),
        );
        return Err(Reply::error(403, "the audit stream is for admins"));
    }
    // An admin's revocations and grants for this user apply from the handshake on.
    core.apply_overrides(&mut claims);
    // A terminal reader may name the task's project up front: refused at once if not allowed
    // (without it, output of a project it may not see simply never reaches it).
    if let Some(project) = req.query_param("project_id") {
        if channels.iter().any(|c| c.starts_with("terminal:"))
            && !claims.can_see(Some(&project), None)
        {
            audit(
                "subscribe_denied",
                json!({"ip": peer, "user_id": claims.sub, "project_id": project}),
            );
            return Err(Reply::error(
                403,
                &format!("not allowed to see project {project}"),
            ));
        }
    }
    if let Some(list) = req.query_param("channels") {
        for name in list.split(',').map(str::trim).filter(|s| !s.is_empty()) {
            if !channels.iter().any(|c| c == name) {
                channels.push(name.to_owned());
            }
        }
    }
    let max = core.shared.settings.session.max_channels_per_connection;
    if channels.len() > max {
        return Err(Reply::error(
            400,
            &format!("at most {max} channels per connection"),
        ));
    }
    for name in &channels {
        if let Err(e) = channel::validate(name) {
            return Err(Reply::error(400, &format!("channels: {e}")));
        }
        if !claims.can_subscribe(name) {
            audit(
                "subscribe_denied",
                json!({"ip": peer, "user_id": claims.sub, "channel": name}),
            );
            return Err(Reply::error(
                403,
                &format!("not allowed to subscribe to {name}"),
            ));
        }
    }
    let resume = match req.query_param("last_sequence_id") {
        None => Resume::Live,
        Some(raw) => {
            let seq: u64 = raw.parse().map_err(|_| {
                Reply::error(400, "last_sequence_id must be a non-negative integer")
            })?;
            match req.query_param("epoch") {
                Some(e) if e == core.shared.epoch => Resume::After(seq),
                Some(_) => Resume::OtherEpoch,
                None => {
                    return Err(Reply::error(
                        400,
                        "last_sequence_id needs epoch (from welcome)",
                    ))
                }
            }
        }
    };
    let list = |field: &'static str| -> Result<Vec<Box<str>>, Reply> {
        match req.query_param(field) {
            None => Ok(Vec::new()),
            Some(raw) => parse_list(field, raw.split(',').map(str::trim))
                .map_err(|e| Reply::error(400, &format!("{e}"))),
        }
    };
    let (encoding, encoding_note) = match req.query_param("encoding") {
        None => (Encoding::Json, None),
        Some(name) => match Encoding::parse(&name) {
            Some(e) => (e, None),
            None => {
                let shown: String = name.chars().take(32).collect();
                let note = format!("encoding \"{shown}\" is not supported; using json");
                (Encoding::Json, Some(note))
            }
        },
    };
    let acks = match req.query_param("ack").as_deref() {
        None | Some("") | Some("none") => false,
        Some("critical") => true,
        Some(_) => return Err(Reply::error(400, "ack must be critical or none")),
    };
    let filter = Filter {
        agent_ids: list("agent_ids")?,
        project_ids: list("project_ids")?,
        event_types: list("event_types")?,
        text: text_match(
            req.query_param("search").as_deref(),
            req.query_param("regex").as_deref(),
        )
        .map_err(|e| Reply::error(400, &format!("{e}")))?,
        levels: list("levels")?,
    };
    let protocol = protocols
        .iter()
        .any(|p| p == SUBPROTOCOL)
        .then_some(SUBPROTOCOL);
    Ok(Opening {
        claims,
        channels,
        resume,
        encoding,
        encoding_note,
        acks,
        filter,
        protocol,
        resumes: Vec::new(),
        recovering: None,
    })
}

fn reply_for(refused: Refused) -> Reply {
    let reply = Reply::error(refused.status, &refused.reason);
    match refused.retry_after_secs {
        Some(secs) => reply.with_header("Retry-After", secs.to_string()),
        None => reply,
    }
}

fn unauthorized(message: &str) -> Reply {
    Reply::error(401, message).with_header("WWW-Authenticate", "Bearer")
}
