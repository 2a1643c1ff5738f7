//! One core's state and its side of the mesh: connections, rooms, owned channels.
//!
//! Invariant: everything here is touched only by this core's thread. A connection joins a room
//! only when the owner's `SubscribeAck` arrives, so it never sees a live event at or below the
//! seq it was handed over at; every subscription (pending or active) is matched by exactly one
//! `Unsubscribe` to the owner when it ends, keeping the owner's interest counts exact.

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::delivery::access::{Authenticator, Claims, Overrides};
use crate::delivery::channel;
use crate::delivery::heartbeat::HeartbeatConfig;
use crate::delivery::limits::{LimitConfig, Limits, Refused};
use crate::delivery::queue::Bucket;
use crate::delivery::ring::RingBounds;
use crate::delivery::rooms::Rooms;
use crate::delivery::sequencer::{Resume, Sequencer, SubscribeAck};
use crate::delivery::tally::Tally;
use crate::delivery::Delivery;
use crate::proto::msg::{Control, Encoding, ErrorCode};

use super::audit::Audit;
use super::conn::{Conn, SubState};
use super::mesh::{Mesh, MeshMsg, Source};
use super::pending::{EdgeLimits, Pending};
use super::socket;

/// What the runtime needs from the configuration.
#[derive(Debug, Clone)]
pub struct Settings {
    pub ring: RingBounds,
    pub heartbeat: HeartbeatConfig,
    pub drain_timeout: Duration,
    pub max_message_bytes: usize,
    pub max_channels_per_connection: usize,
    /// Bytes a connection may have waiting to be written before it is closed as too slow.
    pub max_queue_bytes: usize,
    /// Client messages per second before `rate_limited`; twice that closes the connection.
    pub max_client_messages_per_sec: u32,
    /// Queued messages past which a client is behind (low, then normal events yield).
    pub queue_threshold: usize,
    /// How long a client may stay behind before it is closed with 1008.
    pub slow_client_timeout: Duration,
    /// Event frames per second per connection (0: no limit).
    pub connection_rate_limit: u32,
    /// Event frames per second on the whole node (0: no limit), shared evenly by the cores.
    pub node_rate_limit: u32,
    /// Least time between two events of one `coalesce_key` to one connection (zero: no pacing).
    pub key_interval: Duration,
    /// permessage-deflate: event frames larger than this go compressed (`None`: not offered).
    pub compress_over: Option<u32>,
    /// Bytes per second per terminal output stream (0: no cap).
    pub terminal_max_bytes_per_sec: u64,
    /// Inflated bytes of compressed client messages per connection per second (0: no budget).
    pub max_inflated_bytes_per_sec: u64,
    /// How long an event may wait in a connection's queue (unless its `ttl_ms` says otherwise).
    pub queue_ttl: Duration,
    /// Bounds of the HTTP edge: deadlines and counts of sockets that are not connections.
    pub edge: EdgeLimits,
    /// `ack=critical`: re-send an unacknowledged critical event after this long...
    pub ack_timeout: Duration,
    /// ...until it has been sent this many times.
    pub ack_max_sends: u32,
    /// Asks the process's allocator to give this thread's free memory back to the OS
    /// (`true`: all of it now, not only what has been free for a while).
    pub release_memory: fn(bool),
}

/// Node-wide counters, each core adding to shards of its own (for metrics, not for logic).
#[derive(Debug, Default)]
pub struct Stats {
    pub connections: Tally,
    pub connections_total: Tally,
    /// Messages sequenced that came through the publish API or a terminal stream.
    pub published: Tally,
    /// Audit records sequenced on the `audit` channel.
    pub audit_published: Tally,
    pub frames_queued: Tally,
    /// Channel states the owner cores hold (each core adds its changes as it makes them).
    pub channels: Tally,
}

/// State shared by all cores.
pub struct Shared {
    pub settings: Settings,
    /// Changes at every start: positions from another epoch cannot be resumed exactly.
    pub epoch: String,
    pub mesh: Mesh,
    pub draining: AtomicBool,
    pub stats: Stats,
    /// Checks the tokens of in-band `refresh` messages.
    pub auth: Arc<dyn Authenticator>,
    /// Connection limits of the whole node (counted once per connect and per disconnect).
    pub limits: Limits,
    pub audit_trail: Audit,
    /// Sockets of the whole node that are not connections (see `runtime::pending`).
    pub pending_sockets: Arc<Tally>,
}

impl Shared {
    pub fn new(
        settings: Settings,
        mesh: Mesh,
        auth: Arc<dyn Authenticator>,
        limits: LimitConfig,
        audit_trail: Audit,
    ) -> Shared {
        Shared {
            audit_trail,
            limits: Limits::new(limits),
            settings,
            epoch: new_epoch(),
            mesh,
            draining: AtomicBool::new(false),
            stats: Stats::default(),
            auth,
            pending_sockets: Arc::new(Tally::new()),
        }
    }

    /// Records an audit event (see `runtime::audit`).
    pub fn audit(&self, kind: &str, fields: serde_json::Value) {
        self.audit_trail.record(&self.mesh, kind, fields);
    }

    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Acquire)
    }
}

fn new_epoch() -> String {
    format!("{:016x}", rand::random::<u64>())
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// What an admin asks of every core (see the admin API in docs/protocol.md).
#[derive(Debug, Clone)]
pub enum AdminCmd {
    /// Close every connection of the user with 4003 and this reason.
    Disconnect { user: String, reason: String },
    /// Take channels/projects away from the user: unsubscribed at once, refused afterwards.
    Revoke {
        user: String,
        channels: Vec<String>,
        projects: Vec<String>,
    },
    /// Lift revocations and allow channels beyond the token.
    Grant {
        user: String,
        channels: Vec<String>,
        projects: Vec<String>,
    },
    /// Who is connected.
    List,
}

/// One core's answer to an admin command.
#[derive(Debug)]
pub enum AdminAnswer {
    /// Connections (disconnect, grant) or subscriptions (revoke) affected on this core.
    Count(usize),
    Connections(Vec<ConnInfo>),
}

#[derive(Debug, serde::Serialize)]
pub struct ConnInfo {
    pub connection_id: String,
    pub core: usize,
    pub user_id: String,
    pub channels: Vec<String>,
}

/// Refusal of a subscribe, answered with an `error` frame (or HTTP 403/400 at the handshake).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SubscribeError {
    pub code: ErrorCode,
    pub message: String,
}

/// What a non-blocking receive found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Received {
    Data,
    /// A spurious wake-up: nothing to read yet.
    NotReady,
    /// End of stream or a socket error.
    Closed,
}

/// Bytes one receive may take through the core's scratch buffer.
const SCRATCH_BYTES: usize = 64 * 1024;

pub struct Core {
    pub id: usize,
    pub shared: Arc<Shared>,
    pub sequencer: RefCell<Sequencer>,
    pub rooms: RefCell<Rooms<Rc<Conn>>>,
    pub conns: RefCell<HashMap<u64, Rc<Conn>>>,
    next_conn: Cell<u64>,
    next_sub: Cell<u64>,
    /// This core's share of `stats.channels`.
    channels_reported: Cell<usize>,
    /// This core's share of the node-wide outbound rate limit.
    pub bucket: RefCell<Bucket>,
    /// Admin changes per user, the same on every core (each command reaches all of them).
    overrides: RefCell<HashMap<String, Overrides>>,
    /// Every connection's reads pass through here, so none holds a read buffer of its own.
    scratch: RefCell<Box<[u8]>>,
    /// Sockets of this core that are not a connection (yet): counted, bounded, timed out.
    pub pending: Rc<Pending>,
    /// Refused sockets being drained before they close (bounded by the edge).
    pub lingering: Cell<usize>,
}

impl Core {
    pub fn new(id: usize, shared: Arc<Shared>) -> Core {
        let node_share = shared
            .settings
            .node_rate_limit
            .div_ceil(shared.mesh.cores() as u32);
        let cores = shared.mesh.cores();
        let bounds = shared.settings.ring;
        Core {
            id,
            sequencer: RefCell::new(Sequencer::new(cores, bounds)),
            rooms: RefCell::new(Rooms::default()),
            conns: RefCell::new(HashMap::new()),
            next_conn: Cell::new(0),
            next_sub: Cell::new(0),
            channels_reported: Cell::new(0),
            bucket: RefCell::new(Bucket::new(node_share)),
            overrides: RefCell::new(HashMap::new()),
            scratch: RefCell::new(vec![0; SCRATCH_BYTES].into_boxed_slice()),
            pending: Rc::new(Pending::new(shared.settings.edge, cores)),
            lingering: Cell::new(0),
            shared,
        }
    }

    /// Moves what the socket holds into `acc` without blocking (after a readiness wake-up).
    pub fn recv_into(
        &self,
        stream: &monoio::net::TcpStream,
        acc: &mut bytes::BytesMut,
    ) -> Received {
        self.recv_with(stream, SCRATCH_BYTES, |bytes| acc.extend_from_slice(bytes))
    }

    /// One non-blocking receive of at most `max` bytes through the core's scratch buffer;
    /// `take` gets what came.
    pub fn recv_with(
        &self,
        stream: &monoio::net::TcpStream,
        max: usize,
        take: impl FnOnce(&[u8]),
    ) -> Received {
        let mut scratch = self.scratch.borrow_mut();
        let len = max.clamp(1, scratch.len());
        loop {
            match socket::recv(stream, &mut scratch[..len]) {
                Ok(0) => return Received::Closed,
                Ok(n) => {
                    // One read per wake-up: the decoder sees these bytes before more are read,
                    // so a fast sender can neither grow `acc` past one frame nor hog the core.
                    take(&scratch[..n]);
                    return Received::Data;
                }
                Err(e) => match e.kind() {
                    std::io::ErrorKind::WouldBlock => return Received::NotReady,
                    std::io::ErrorKind::Interrupted => continue,
                    _ => return Received::Closed,
                },
            }
        }
    }

    /// A node-unique connection id: the core in the top 16 bits.
    pub fn next_conn_id(&self) -> u64 {
        let n = self.next_conn.get() + 1;
        self.next_conn.set(n);
        ((self.id as u64) << 48) | n
    }

    /// Counts a new connection against the node's limits; displaces the user's oldest one
    /// when the policy says so.
    pub fn admit(
        &self,
        conn: u64,
        ip: std::net::IpAddr,
        user: &str,
        projects: &[String],
    ) -> Result<(), Refused> {
        let admitted = self
            .shared
            .limits
            .admit(conn, ip, user, projects, now_ms() / 1000)?;
        if let Some(old) = admitted.evict {
            let msg = MeshMsg::Close {
                conn: old,
                code: 4008,
                reason: "replaced by a newer connection of this user",
            };
            self.shared.mesh.send((old >> 48) as usize, msg);
        }
        Ok(())
    }

    pub fn release(&self, conn: u64, user: &str, projects: &[String]) {
        self.shared.limits.release(conn, user, projects);
    }

    /// Ends the subscriptions the connection's (changed) claims no longer allow, telling the
    /// client why; returns how many.
    pub fn end_forbidden_subscriptions(&self, conn: &Conn, reason: &str) -> usize {
        let lost: Vec<Arc<str>> = conn
            .subs
            .borrow()
            .keys()
            .filter(|c| !conn.claims.borrow().can_subscribe(c))
            .cloned()
            .collect();
        lost.iter()
            .filter(|c| self.unsubscribe(conn, c, Some(reason)).is_ok())
            .count()
    }

    /// Puts the admin's changes for this user over freshly read claims.
    pub fn apply_overrides(&self, claims: &mut Claims) {
        if let Some(o) = self.overrides.borrow().get(&claims.sub) {
            claims.overrides = o.clone();
        }
    }

    pub fn register(&self, conn: Rc<Conn>) {
        self.shared.stats.connections.add(1);
        self.shared.stats.connections_total.add(1);
        self.conns.borrow_mut().insert(conn.id, conn);
    }

    /// Forgets a finished connection and gives back its subscriptions.
    pub fn deregister(&self, conn: &Conn) {
        if self.conns.borrow_mut().remove(&conn.id).is_none() {
            return;
        }
        self.shared.stats.connections.add(-1);
        self.release(
            conn.id,
            &conn.claims.borrow().sub,
            &conn.handshake_projects.borrow(),
        );
        let (code, reason) = conn
            .closed_with
            .borrow()
            .clone()
            .unwrap_or((1006, "connection lost".into()));
        self.shared.audit(
            "disconnect",
            serde_json::json!({"ip": conn.peer, "user_id": conn.claims.borrow().sub,
                "connection_id": format!("{:x}", conn.id), "code": code, "reason": reason}),
        );
        let subs = std::mem::take(&mut *conn.subs.borrow_mut());
        let mut rooms = self.rooms.borrow_mut();
        for (channel, state) in subs {
            if state == SubState::Active {
                rooms.leave(&channel, conn.id);
            }
            self.send_unsubscribe(channel);
        }
    }

    /// Starts a subscription; the connection gets `subscribed` once the owner answers.
    pub fn subscribe(
        &self,
        conn: &Rc<Conn>,
        name: &str,
        resume: Resume,
        initial: bool,
    ) -> Result<(), SubscribeError> {
        check_subscribe(&self.shared, conn, name)?;
        let channel: Arc<str> = name.into();
        let sub = self.next_sub.get() + 1;
        self.next_sub.set(sub);
        let state = if initial {
            SubState::PendingInitial(sub)
        } else {
            SubState::Pending(sub)
        };
        conn.subs.borrow_mut().insert(channel.clone(), state);
        let owner = channel::owner_core(name, self.shared.mesh.cores());
        self.shared.mesh.send(
            owner,
            MeshMsg::Subscribe {
                channel,
                core: self.id,
                conn: conn.id,
                sub,
                resume,
            },
        );
        Ok(())
    }

    /// Ends a subscription, at the client's request (`reason` None) or the server's.
    pub fn unsubscribe(
        &self,
        conn: &Conn,
        name: &str,
        reason: Option<&str>,
    ) -> Result<(), SubscribeError> {
        let Some((channel, state)) = conn.subs.borrow_mut().remove_entry(name) else {
            return Err(SubscribeError {
                code: ErrorCode::NotSubscribed,
                message: format!("not subscribed to {}", channel::shown(name)),
            });
        };
        conn.purge(|d| d.channel == channel);
        match state {
            SubState::Active => {
                self.rooms.borrow_mut().leave(&channel, conn.id);
            }
            // The welcome no longer waits for this one.
            SubState::PendingInitial(_) => conn.initial_subscribed(),
            SubState::Pending(_) => {}
        }
        conn.push(
            Control::Unsubscribed {
                channel: &channel,
                reason,
            }
            .frame_in(conn.encoding),
        );
        self.send_unsubscribe(channel);
        Ok(())
    }

    fn send_unsubscribe(&self, channel: Arc<str>) {
        let owner = channel::owner_core(&channel, self.shared.mesh.cores());
        self.shared.mesh.send(
            owner,
            MeshMsg::Unsubscribe {
                channel,
                core: self.id,
            },
        );
    }

    /// Handles one message from the mesh.
    pub fn handle(&self, msg: MeshMsg) {
        match msg {
            MeshMsg::Publish {
                batch,
                reply,
                source,
            } => {
                let now = now_ms();
                let mesh = &self.shared.mesh;
                let mut sequencer = self.sequencer.borrow_mut();
                let seqs = batch
                    .into_iter()
                    .map(|(index, p)| {
                        let seq = sequencer.publish(p, now, |core, d| {
                            mesh.send(core, MeshMsg::Deliver(d.clone()))
                        });
                        (index, seq)
                    })
                    .collect::<Vec<_>>();
                drop(sequencer);
                self.report_channels();
                let counter = match source {
                    Source::Api => &self.shared.stats.published,
                    Source::Audit => &self.shared.stats.audit_published,
                };
                counter.add(seqs.len() as i64);
                // The publisher may have gone away; the messages are sequenced regardless.
                let _ = reply.send(seqs);
            }
            MeshMsg::Deliver(delivery) => self.deliver(&delivery),
            MeshMsg::Subscribe {
                channel,
                core,
                conn,
                sub,
                resume,
            } => {
                let ack = self
                    .sequencer
                    .borrow_mut()
                    .subscribe(&channel, core, resume, now_ms());
                self.report_channels();
                let ack = MeshMsg::SubscribeAck {
                    channel,
                    conn,
                    sub,
                    ack,
                };
                self.shared.mesh.send(core, ack);
            }
            MeshMsg::SubscribeAck {
                channel,
                conn,
                sub,
                ack,
            } => self.activate(channel, conn, sub, ack),
            MeshMsg::Unsubscribe { channel, core } => {
                self.sequencer.borrow_mut().unsubscribe(&channel, core);
                self.report_channels();
            }
            MeshMsg::Admin { cmd, reply } => {
                let _ = reply.send(self.admin(&cmd));
            }
            MeshMsg::Close { conn, code, reason } => {
                if let Some(c) = self.conns.borrow().get(&conn).cloned() {
                    c.close(code, reason);
                }
            }
            MeshMsg::Drain => self.drain(),
            MeshMsg::ForceClose => self.force_close(),
        }
    }

    /// Brings this core's share of the node's channel gauge up to date (a write only when the
    /// count changed).
    pub fn report_channels(&self) {
        let count = self.sequencer.borrow().channel_count();
        let before = self.channels_reported.replace(count);
        if count != before {
            self.shared.stats.channels.add(count as i64 - before as i64);
        }
    }

    fn deliver(&self, d: &Arc<Delivery>) {
        let mut queued = 0;
        for conn in self.rooms.borrow().members(&d.channel) {
            if conn.wants(d) {
                conn.push_event(d);
                queued += 1;
            }
        }
        self.shared.stats.frames_queued.add(queued);
    }

    /// The owner has handed over: replay what was missed, then join the room for live events.
    fn activate(&self, channel: Arc<str>, conn_id: u64, sub: u64, ack: SubscribeAck) {
        let Some(conn) = self.conns.borrow().get(&conn_id).cloned() else {
            return; // gone; its deregister already sent the matching Unsubscribe
        };
        let initial = {
            let mut subs = conn.subs.borrow_mut();
            // Only the ack of the subscription now pending counts: one that was cancelled
            // (its Unsubscribe already sent) may be overtaken by a newer one of the channel.
            let initial = match subs.get(&channel) {
                Some(SubState::PendingInitial(id)) if *id == sub => true,
                Some(SubState::Pending(id)) if *id == sub => false,
                _ => return,
            };
            subs.insert(channel.clone(), SubState::Active);
            initial
        };
        conn.push(
            Control::Subscribed {
                channel: &channel,
                seq: ack.last_seq,
            }
            .frame_in(conn.encoding),
        );
        // An SSE stream starting live owes nothing before the head: its position is the head.
        if let (None, Some(sse)) = (&ack.replay, conn.sse.as_deref()) {
            sse.advance(&channel, ack.last_seq);
        }
        if let Some(mut replay) = ack.replay {
            // A replay that would overflow the send queue is not sent: the client reloads
            // (recovered:false) instead of being closed as too slow again and again.
            let bytes: usize = replay
                .deliveries
                .iter()
                .map(|d| d.frame_for(conn.format()).len())
                .sum::<usize>()
                + conn.queued_bytes();
            if bytes > self.shared.settings.max_queue_bytes / 2 {
                replay.deliveries.clear();
                replay.recovered = false;
            }
            let mut count = 0;
            for d in &replay.deliveries {
                if conn.wants(d) {
                    conn.push_replay(d);
                    count += 1;
                }
            }
            conn.push(
                Control::Replayed {
                    channel: &channel,
                    recovered: replay.recovered,
                    count,
                }
                .frame_in(conn.encoding),
            );
            if !replay.recovered {
                // Told to reload: from here the stream's position is the head, but only once
                // that notice is written (a reconnect before it must hear it again).
                conn.settle_after_queued(channel.clone(), ack.last_seq);
            }
        }
        self.rooms
            .borrow_mut()
            .join(&channel, conn.id, conn.clone());
        if initial {
            conn.initial_subscribed();
        }
    }

    fn admin(&self, cmd: &AdminCmd) -> AdminAnswer {
        let conns: Vec<Rc<Conn>> = self.conns.borrow().values().cloned().collect();
        let of_user = |user: &str| {
            conns
                .iter()
                .filter(|c| c.claims.borrow().sub == user)
                .cloned()
                .collect::<Vec<_>>()
        };
        match cmd {
            AdminCmd::Disconnect { user, reason } => {
                let hit = of_user(user);
                for conn in &hit {
                    conn.close(4003, reason);
                }
                AdminAnswer::Count(hit.len())
            }
            AdminCmd::Revoke {
                user,
                channels,
                projects,
            }
            | AdminCmd::Grant {
                user,
                channels,
                projects,
            } => {
                let revoke = matches!(cmd, AdminCmd::Revoke { .. });
                let overrides = {
                    let mut all = self.overrides.borrow_mut();
                    let o = all.entry(user.clone()).or_default();
                    if revoke {
                        o.revoke(channels, projects);
                    } else {
                        o.grant(channels, projects);
                    }
                    o.clone()
                };
                let mut count = 0;
                for conn in of_user(user) {
                    conn.claims.borrow_mut().overrides = overrides.clone();
                    if revoke {
                        conn.purge(|d| {
                            d.project_id
                                .as_deref()
                                .is_some_and(|p| projects.iter().any(|r| r == p))
                        });
                    }
                    count += if revoke {
                        self.end_forbidden_subscriptions(&conn, "revoked")
                    } else {
                        1
                    };
                }
                AdminAnswer::Count(count)
            }
            AdminCmd::List => AdminAnswer::Connections(
                conns
                    .iter()
                    .map(|c| ConnInfo {
                        connection_id: format!("{:x}", c.id),
                        core: self.id,
                        user_id: c.claims.borrow().sub.clone(),
                        channels: c.subs.borrow().keys().map(|k| k.to_string()).collect(),
                    })
                    .collect(),
            ),
        }
    }

    /// Drain, first step: tell every connection to go elsewhere (`shutdown`); clients leave on
    /// their own while the node waits.
    fn drain(&self) {
        let conns: Vec<Rc<Conn>> = self.conns.borrow().values().cloned().collect();
        let encodings = [Encoding::Json, Encoding::MessagePack, Encoding::Sse];
        let notice = encodings.map(shutdown_frame);
        for conn in conns {
            let at = encodings.iter().position(|e| *e == conn.encoding);
            conn.push(notice[at.expect("every encoding has its notice")].clone());
        }
    }

    /// Drain, last step: close whoever is still here with 1012.
    fn force_close(&self) {
        let conns: Vec<Rc<Conn>> = self.conns.borrow().values().cloned().collect();
        for conn in conns {
            conn.close(1012, "server restarting");
        }
    }
}

/// The drain notice, the same bytes for every connection.
pub fn shutdown_frame(encoding: Encoding) -> bytes::Bytes {
    Control::Shutdown {
        reason: "server is shutting down; reconnect and resume",
    }
    .frame_in(encoding)
}

fn check_subscribe(shared: &Shared, conn: &Conn, name: &str) -> Result<(), SubscribeError> {
    let max = shared.settings.max_channels_per_connection;
    let fail = |code, message: String| Err(SubscribeError { code, message });
    if let Err(e) = channel::validate(name) {
        let shown = channel::shown(name);
        return fail(
            ErrorCode::BadChannel,
            format!("bad channel \"{shown}\": {e}"),
        );
    }
    if !conn.claims.borrow().can_subscribe(name) {
        shared.audit(
            "subscribe_denied",
            serde_json::json!({"ip": conn.peer, "user_id": conn.claims.borrow().sub,
                "connection_id": format!("{:x}", conn.id), "channel": name}),
        );
        return fail(
            ErrorCode::Forbidden,
            format!("not allowed to subscribe to {name}"),
        );
    }
    let subs = conn.subs.borrow();
    if subs.contains_key(name) {
        return fail(
            ErrorCode::AlreadySubscribed,
            format!("already subscribed to {name}"),
        );
    }
    if subs.len() >= max {
        return fail(
            ErrorCode::TooManyChannels,
            format!("at most {max} channels per connection"),
        );
    }
    Ok(())
}
