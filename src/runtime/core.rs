//! One core's state and its side of the mesh: connections, rooms, owned channels.
//!
//! Invariant: everything here is touched only by this core's thread. A connection joins a room
//! only when the owner's `SubscribeAck` arrives, so it never sees a live event at or below the
//! seq it was handed over at; every subscription (pending or active) is matched by exactly one
//! `Unsubscribe` to the owner when it ends, keeping the owner's interest counts exact.

use std::cell::{Cell, RefCell};
use std::collections::{HashMap, HashSet};
use std::rc::{Rc, Weak};
use std::sync::Arc;
use std::time::Instant;

use crate::cluster::control::Admission;
use crate::delivery::access::{Claims, Overrides};
use crate::delivery::channel;
use crate::delivery::limits::{Checks, Refused};
use crate::delivery::presence::Presence;
use crate::delivery::queue::Bucket;
use crate::delivery::recovery::Record;
use crate::delivery::rooms::Rooms;
use crate::delivery::sequencer::{Answer, Outcome, Sequencer, SubscribeAck, Subscribed};
use crate::delivery::session::{Ctx, Effect, Flow, Session};
use crate::delivery::{Delivery, Publication};
use crate::proto::msg::{Control, Encoding};
use crate::proto::ws::codec::Event;

mod admin;

use super::conn::Conn;
use super::mesh::{MeshMsg, Source};
use super::node::Broker;
use super::pending::Pending;
use super::shared::{now_ms, Shared};
use super::socket;
use super::writer::Writer;

pub use crate::delivery::session::SubscribeError;
pub use admin::{transport, AdminAnswer, AdminCmd, ConnInfo, ListQuery};

/// What a non-blocking receive found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Received {
    Data,
    /// A spurious wake-up: nothing to read yet.
    NotReady,
    /// End of stream or a socket error.
    Closed,
}

/// A close for a connection not registered yet.
struct EarlyClose {
    conn: u64,
    code: u16,
    reason: &'static str,
    at: Instant,
}

/// Most closes kept for connections not registered yet, and for how long (a handshake's
/// answer takes far less).
const MAX_EARLY_CLOSES: usize = 1024;
const EARLY_CLOSE_KEPT: std::time::Duration = std::time::Duration::from_secs(10);

/// How long a recovering Socket.IO client's CONNECT waits for the session it left to be
/// seen to end (see `Core::take_recovery`).
const RECOVERY_WAIT: std::time::Duration = std::time::Duration::from_millis(500);

/// Most users one `presence` event names (a storm of joins goes out in several).
const PRESENCE_CHUNK: usize = 100;

/// Bytes one receive may take through the core's scratch buffer.
const SCRATCH_BYTES: usize = 64 * 1024;

pub struct Core {
    pub id: usize,
    pub shared: Arc<Shared>,
    pub sequencer: RefCell<Sequencer>,
    rooms: RefCell<Rooms<Rc<Conn>>>,
    conns: RefCell<HashMap<u64, Rc<Conn>>>,
    next_conn: Cell<u64>,
    /// This core itself (for the tasks it spawns).
    pub(super) me: Weak<Core>,
    /// A run of deliveries of one channel being fanned out together (kept for its allocation).
    runs: Cell<Vec<Arc<Delivery>>>,
    /// Writes what this core's connections have queued (see `runtime::writer`).
    pub(super) writer: Writer,
    /// Claims of this core's connections, one copy for all that present the same (see
    /// `share_claims`).
    claims: RefCell<HashSet<Rc<Claims>>>,
    /// Effects of a session's input, carried out right after it (kept for its allocation).
    effects: Cell<Vec<Effect>>,
    /// This core's share of `stats.channels`.
    channels_reported: Cell<usize>,
    /// This core's share of the node-wide outbound rate limit.
    pub(super) bucket: RefCell<Bucket>,
    /// Who is on the presence channels this core owns.
    presence: RefCell<Presence>,
    /// Closes that came for connections not registered yet (displaced while their handshake
    /// was being answered): carried out when they register. Bounded; forgotten after a while.
    early_closes: RefCell<Vec<EarlyClose>>,
    /// Admin changes per user, the same on every core (each command reaches all of them).
    overrides: RefCell<HashMap<String, Overrides>>,
    /// Every connection's reads pass through here, so none holds a read buffer of its own.
    scratch: RefCell<Box<[u8]>>,
    /// Sockets of this core that are not a connection (yet): counted, bounded, timed out.
    pub pending: Rc<Pending>,
    /// Refused sockets being drained before they close (bounded by the edge).
    pub lingering: Cell<usize>,
    /// Engine.IO long-polling sessions whose home is this core.
    pub(super) polls: super::polling::Polls,
}

impl Core {
    pub fn new(id: usize, shared: Arc<Shared>, me: Weak<Core>) -> Core {
        let node_share = shared
            .settings
            .node_rate_limit
            .div_ceil(shared.mesh.cores() as u32);
        let cores = shared.mesh.cores();
        let bounds = shared.settings.ring;
        Core {
            id,
            sequencer: RefCell::new(match &shared.broker {
                Broker::Local => Sequencer::new(cores, bounds),
                Broker::Redis(redis) => Sequencer::for_cluster(cores, bounds, redis.sharded()),
            }),
            rooms: RefCell::new(Rooms::default()),
            conns: RefCell::new(HashMap::new()),
            next_conn: Cell::new(0),
            me,
            runs: Cell::new(Vec::new()),
            writer: Writer::default(),
            effects: Cell::new(Vec::new()),
            claims: RefCell::new(HashSet::new()),
            channels_reported: Cell::new(0),
            bucket: RefCell::new(Bucket::new(node_share)),
            presence: RefCell::new(Presence::default()),
            early_closes: RefCell::new(Vec::new()),
            overrides: RefCell::new(match &shared.broker {
                Broker::Local => HashMap::new(),
                Broker::Redis(redis) => redis.overrides_at_start.clone(),
            }),
            scratch: RefCell::new(vec![0; SCRATCH_BYTES].into_boxed_slice()),
            pending: Rc::new(Pending::new(shared.settings.edge, cores)),
            lingering: Cell::new(0),
            polls: Default::default(),
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

    /// What a session needs for one input at `now`.
    pub fn ctx(&self, now: Instant) -> Ctx<'_> {
        Ctx {
            now,
            unix_secs: now_ms() / 1000,
            config: &self.shared.settings.session,
            epoch: &self.shared.epoch,
            auth: &*self.shared.auth,
        }
    }

    /// Runs `f` on the connection's session, then carries out what it asked for and
    /// schedules a flush if it queued something.
    pub fn with_session<R>(
        &self,
        conn: &Rc<Conn>,
        f: impl FnOnce(&mut Session, &Ctx, &mut Vec<Effect>) -> R,
    ) -> R {
        let mut effects = self.effects.take();
        let result = {
            let ctx = self.ctx(Instant::now());
            let mut session = conn.session.borrow_mut();
            f(&mut session, &ctx, &mut effects)
        };
        self.apply(conn, &mut effects);
        self.effects.replace(effects);
        self.schedule(conn);
        result
    }

    /// One WebSocket event from the client.
    pub fn on_ws_event(&self, conn: &Rc<Conn>, event: Event) -> Flow {
        self.with_session(conn, |s, ctx, out| s.on_ws_event(event, ctx, out))
    }

    /// Queues a close frame for the connection.
    pub fn close(&self, conn: &Rc<Conn>, code: u16, reason: &str) {
        self.with_session(conn, |s, ctx, _| s.close(code, reason, ctx.now));
    }

    /// Queues a frame of the server's (a notice) for the connection.
    pub fn push(&self, conn: &Rc<Conn>, frame: bytes::Bytes) {
        self.with_session(conn, |s, ctx, _| s.push_control(frame, ctx.now, ctx.config));
    }

    /// Carries out what a session asked of the node.
    fn apply(&self, conn: &Rc<Conn>, effects: &mut Vec<Effect>) {
        for effect in effects.drain(..) {
            match effect {
                Effect::Subscribe {
                    channel,
                    sub,
                    resume,
                } => {
                    let owner = channel::owner_core(&channel, self.shared.mesh.cores());
                    let conn = conn.id();
                    let msg = MeshMsg::Subscribe {
                        channel,
                        core: self.id,
                        conn,
                        sub,
                        resume,
                    };
                    self.shared.mesh.send(owner, msg);
                }
                Effect::Unsubscribe { channel, joined } => {
                    if joined {
                        self.rooms.borrow_mut().leave(&channel, conn.id());
                        self.tell_presence(&channel, conn, false);
                    }
                    self.send_unsubscribe(channel);
                }
                Effect::Presence { channel } => self.answer_presence(conn, channel),
                Effect::Audit { kind, mut fields } => {
                    if let (Some(_), Some(all)) = (self.shared.instance(), fields.as_object_mut()) {
                        all.insert(
                            "connection_id".into(),
                            self.shared.conn_name(conn.id()).into(),
                        );
                    }
                    self.shared.audit(kind, fields)
                }
                Effect::Cut => conn.cut(),
            }
        }
    }

    /// Counts a new connection against the limits (in cluster mode, the cluster's, falling
    /// back to this node's while Redis does not answer); displaces the user's oldest one when
    /// the policy says so.
    pub async fn admit(
        &self,
        conn: u64,
        ip: std::net::IpAddr,
        user: &str,
        projects: &[String],
        transport: &'static str,
    ) -> Result<(), Refused> {
        let now = now_ms();
        let limits = &self.shared.limits;
        let Broker::Redis(redis) = &self.shared.broker else {
            let admitted = limits.admit(conn, ip, user, projects, now / 1000, Checks::All)?;
            self.evict_here(admitted.evict);
            return Ok(());
        };
        let member = crate::cluster::control::Member {
            conn,
            user: user.to_owned(),
            projects: projects.to_vec(),
            ip,
            connected_at: now,
            last_heartbeat: now,
            transport,
        };
        match redis.admit(member).await {
            Some(Admission::Refused(refused)) => Err(refused),
            Some(Admission::Admitted { evict }) => {
                let counted =
                    limits.admit(conn, ip, user, projects, now / 1000, Checks::CapacityOnly);
                if let Err(refused) = counted {
                    redis.release(conn);
                    return Err(refused);
                }
                match evict {
                    Some((node, old)) if node == redis.instance() => self.evict_here(Some(old)),
                    Some((node, old)) => redis.evict(node, old),
                    None => {}
                }
                Ok(())
            }
            None => {
                // Redis did not answer: this node's own counts decide (logged once).
                let admitted = limits.admit(conn, ip, user, projects, now / 1000, Checks::All)?;
                self.evict_here(admitted.evict);
                Ok(())
            }
        }
    }

    /// Closes a connection of this node displaced by its user's newer one.
    fn evict_here(&self, old: Option<u64>) {
        if let Some(old) = old {
            let msg = MeshMsg::Close {
                conn: old,
                code: 4008,
                reason: "replaced by a newer connection of this user",
            };
            self.shared.mesh.send((old >> 48) as usize, msg);
        }
    }

    pub fn release(&self, conn: u64, user: &str, projects: &[String]) {
        self.shared.limits.release(conn, user, projects);
        if let Broker::Redis(redis) = &self.shared.broker {
            redis.release(conn);
        }
    }

    /// The claims for a new connection: connections of one token (a user's tabs, a fleet of
    /// agents) share one copy. Copies no connection uses any more go at the next `tick`.
    pub fn share_claims(&self, claims: Claims) -> Rc<Claims> {
        let mut all = self.claims.borrow_mut();
        if let Some(shared) = all.get(&claims) {
            return shared.clone();
        }
        let claims = Rc::new(claims);
        all.insert(claims.clone());
        claims
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
        self.conns.borrow_mut().insert(conn.id(), conn);
    }

    /// Forgets a finished connection and gives back its subscriptions.
    pub fn deregister(&self, conn: &Rc<Conn>) {
        let id = conn.id();
        if self.conns.borrow_mut().remove(&id).is_none() {
            return;
        }
        self.shared.stats.connections.add(-1);
        let fields = {
            let session = conn.session.borrow();
            self.release(id, session.user(), session.handshake_projects());
            let (code, reason) = session.closed_with();
            self.keep_for_recovery(&session);
            serde_json::json!({"ip": session.peer(), "user_id": session.user(),
                "connection_id": self.shared.conn_name(id), "code": code, "reason": reason})
        };
        self.shared.audit("disconnect", fields);
        let mut effects = self.effects.take();
        conn.session.borrow_mut().end_subscriptions(&mut effects);
        self.apply(conn, &mut effects);
        self.effects.replace(effects);
    }

    /// A Socket.IO session that went away: kept for its client's recovery, for the window.
    fn keep_for_recovery(&self, session: &Session) {
        let window = self.shared.settings.socketio_recovery;
        if session.encoding() != Encoding::SocketIo || window.is_zero() {
            return;
        }
        let Some((pid, record)) = session.recovery(&self.shared.epoch) else {
            return;
        };
        match &self.shared.broker {
            // Any node may get the reconnect.
            Broker::Redis(redis) => {
                let json = serde_json::to_string(&record).expect("a record serializes");
                redis.keep_session(pid, json, window);
            }
            Broker::Local => {
                let mut store = self.recovery_store();
                store.put(pid, record, Instant::now(), window);
            }
        }
    }

    fn recovery_store(&self) -> std::sync::MutexGuard<'_, crate::delivery::recovery::Store> {
        // The store is consistent after any single call: a panic elsewhere leaves it usable.
        self.shared
            .recovery
            .lock()
            .unwrap_or_else(|p| p.into_inner())
    }

    /// The session a Socket.IO client recovers, once. The connection it left may not have
    /// been seen to end yet (its client noticed first): looked for again a few times, for at
    /// most `RECOVERY_WAIT`.
    pub async fn take_recovery(&self, pid: &str, user: &str) -> Option<Record> {
        let deadline = Instant::now() + RECOVERY_WAIT;
        loop {
            let found = match &self.shared.broker {
                Broker::Redis(redis) => redis
                    .take_session(pid.to_owned())
                    .await
                    .and_then(|json| serde_json::from_str(&json).ok()),
                Broker::Local => {
                    let mut store = self.recovery_store();
                    store.take(pid, user, Instant::now())
                }
            };
            if found.is_some() || Instant::now() >= deadline {
                return found;
            }
            monoio::time::sleep(RECOVERY_WAIT / 10).await;
        }
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

    /// Handles a batch of mesh messages in order; consecutive deliveries of one channel are
    /// fanned out together, so each subscriber is visited once and gets them in one write.
    pub fn handle_batch(&self, batch: &mut Vec<MeshMsg>) {
        let mut run = self.runs.take();
        for msg in batch.drain(..) {
            match msg {
                MeshMsg::Deliver(d) => {
                    if run.last().is_some_and(|last| last.channel != d.channel) {
                        self.deliver(&run);
                        run.clear();
                    }
                    run.push(d);
                }
                other => {
                    if !run.is_empty() {
                        self.deliver(&run);
                        run.clear();
                    }
                    self.handle(other);
                }
            }
        }
        if !run.is_empty() {
            self.deliver(&run);
            run.clear();
        }
        self.runs.set(run);
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
                self.count_published(source, seqs.len());
                // The publisher may have gone away; the messages are sequenced regardless.
                let _ = reply.send(seqs);
            }
            MeshMsg::Deliver(delivery) => self.deliver(std::slice::from_ref(&delivery)),
            MeshMsg::Subscribe {
                channel,
                core,
                conn,
                sub,
                resume,
            } => {
                let now = now_ms();
                let mut sequencer = self.sequencer.borrow_mut();
                let ack = match &self.shared.broker {
                    Broker::Local => sequencer.subscribe(&channel, core, resume, now),
                    Broker::Redis(redis) => {
                        match sequencer.subscribe_cluster(&channel, (core, conn, sub), resume, now)
                        {
                            Subscribed::Now(ack) => ack,
                            Subscribed::Later(read) => {
                                if let Some((id, after)) = read {
                                    redis.read(channel, after, self.id, id);
                                }
                                return;
                            }
                        }
                    }
                };
                drop(sequencer);
                self.report_channels();
                self.answer_subscribe(
                    Answer {
                        core,
                        conn,
                        sub,
                        ack,
                    },
                    channel,
                );
            }
            MeshMsg::Remote(batch) => {
                let channel = batch.channel.clone();
                let mesh = &self.shared.mesh;
                let outcome = self.sequencer.borrow_mut().apply(batch, |core, d| {
                    mesh.send(core, MeshMsg::Deliver(d.clone()))
                });
                self.report_channels();
                self.carry_out(channel, outcome);
            }
            MeshMsg::Read { channel, id, read } => {
                let mesh = &self.shared.mesh;
                let outcome =
                    self.sequencer
                        .borrow_mut()
                        .on_read(&channel, id, read, now_ms(), |core, d| {
                            mesh.send(core, MeshMsg::Deliver(d.clone()))
                        });
                self.report_channels();
                self.carry_out(channel, outcome);
            }
            MeshMsg::Resync => {
                let reads = self.sequencer.borrow_mut().resync();
                self.report_channels();
                if let Broker::Redis(redis) = &self.shared.broker {
                    for (channel, (id, after)) in reads {
                        redis.read(channel, after, self.id, id);
                    }
                }
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
            MeshMsg::Close { conn, code, reason } => match self.conn(conn) {
                Some(c) => self.close(&c, code, reason),
                // Not registered yet, or already gone (ids are never reused): kept a while.
                None => {
                    let mut early = self.early_closes.borrow_mut();
                    if early.len() >= MAX_EARLY_CLOSES {
                        early.remove(0);
                    }
                    early.push(EarlyClose {
                        conn,
                        code,
                        reason,
                        at: Instant::now(),
                    });
                }
            },
            MeshMsg::Presence {
                channel,
                user,
                join,
            } => {
                let mut presence = self.presence.borrow_mut();
                if join {
                    presence.join(&channel, &user);
                } else {
                    presence.leave(&channel, &user);
                }
            }
            MeshMsg::Members { channel, reply } => {
                let _ = reply.send(self.presence.borrow().members(&channel));
            }
            MeshMsg::Drain => self.drain(),
            MeshMsg::Run(work) => {
                if let Some(me) = self.me.upgrade() {
                    work(me);
                }
            }
            MeshMsg::ForceClose => self.force_close(),
        }
    }

    /// Makes the reads and sends the answers a batch or a read of `channel` led to.
    fn carry_out(&self, channel: Arc<str>, outcome: Outcome) {
        if let Broker::Redis(redis) = &self.shared.broker {
            for (id, after) in outcome.reads {
                redis.read(channel.clone(), after, self.id, id);
            }
        }
        for answer in outcome.answers {
            self.answer_subscribe(answer, channel.clone());
        }
    }

    /// Sends an owner's answer to a subscription to the subscribing core.
    fn answer_subscribe(&self, answer: Answer, channel: Arc<str>) {
        let msg = MeshMsg::SubscribeAck {
            channel,
            conn: answer.conn,
            sub: answer.sub,
            ack: answer.ack,
        };
        self.shared.mesh.send(answer.core, msg);
    }

    /// Counts messages sequenced for `source`.
    pub(super) fn count_published(&self, source: Source, n: usize) {
        let counter = match source {
            Source::Api => &self.shared.stats.published,
            Source::Audit => &self.shared.stats.audit_published,
        };
        counter.add(n as i64);
    }

    /// Adds a progress event's server-computed ETA to its data, if it asked for one.
    pub(super) fn annotate(&self, p: &mut Publication, now_ms: u64) {
        self.sequencer.borrow_mut().annotate(p, now_ms);
    }

    fn conn(&self, id: u64) -> Option<Rc<Conn>> {
        self.conns.borrow().get(&id).cloned()
    }

    /// Every connection of this core, as of now.
    pub fn connections(&self) -> Vec<Rc<Conn>> {
        self.conns.borrow().values().cloned().collect()
    }

    /// Brings this core's share of the node's channel gauge up to date (a write only when the
    /// count changed).
    /// Also unsubscribes, in Redis, the channels this core forgot (sharded cluster mode).
    pub fn report_channels(&self) {
        let mut sequencer = self.sequencer.borrow_mut();
        let count = sequencer.channel_count();
        let before = self.channels_reported.replace(count);
        if count != before {
            self.shared.stats.channels.add(count as i64 - before as i64);
        }
        if let Broker::Redis(redis) = &self.shared.broker {
            for channel in sequencer.take_freed() {
                redis.unsubscribe(channel);
            }
        }
    }

    /// Fans out deliveries of one channel (in seq order) to the channel's room, and writes
    /// each subscriber's share at once: one visit and one `send` per subscriber, like the
    /// floor, while what a slow subscriber cannot take waits in its queue.
    fn deliver(&self, run: &[Arc<Delivery>]) {
        let Some(channel) = run.first().map(|d| &d.channel) else {
            return;
        };
        let ctx = self.ctx(Instant::now());
        let mut queued = 0;
        for conn in self.rooms.borrow().members(channel) {
            let mut wants = false;
            {
                let mut session = conn.session.borrow_mut();
                for d in run {
                    if session.deliver(d, ctx.now, ctx.config) {
                        wants = true;
                        queued += 1;
                    }
                }
            }
            if wants {
                self.write_now(conn, &ctx);
            }
        }
        self.shared.stats.frames_queued.add(queued);
    }

    /// The owner has handed over: replay what was missed, then join the room for live events.
    fn activate(&self, channel: Arc<str>, conn_id: u64, sub: u64, ack: SubscribeAck) {
        let Some(conn) = self.conn(conn_id) else {
            return; // gone; its deregister already sent the matching Unsubscribe
        };
        // The room's copy of the name, shared with the subscription.
        let channel = self.rooms.borrow().name(&channel).unwrap_or(channel);
        let joins = self.with_session(&conn, |s, ctx, _| s.on_subscribed(&channel, sub, ack, ctx));
        if joins {
            self.rooms
                .borrow_mut()
                .join(&channel, conn_id, conn.clone());
            self.tell_presence(&channel, &conn, true);
        }
    }

    /// A subscription of a presence channel began or ended: its owner counts it.
    fn tell_presence(&self, channel: &Arc<str>, conn: &Rc<Conn>, join: bool) {
        if !self.shared.settings.presence.matches(channel) {
            return;
        }
        let msg = MeshMsg::Presence {
            channel: channel.clone(),
            user: conn.session.borrow().user().into(),
            join,
        };
        let owner = channel::owner_core(channel, self.shared.mesh.cores());
        if owner == self.id {
            self.handle(msg);
        } else {
            self.shared.mesh.send(owner, msg);
        }
    }

    /// The answer to a client's `presence`: the channel's members, once known.
    fn answer_presence(&self, conn: &Rc<Conn>, channel: Arc<str>) {
        let encoding = conn.session.borrow().encoding();
        if !self.shared.settings.presence.matches(&channel) {
            let message = format!("{channel} does not keep presence");
            let error = Control::Error {
                code: crate::proto::msg::ErrorCode::BadChannel,
                message: &message,
                channel: Some(&channel),
            };
            self.push(conn, error.frame_in(encoding));
            return;
        }
        let (Some(core), id) = (self.me.upgrade(), conn.id()) else {
            return;
        };
        monoio::spawn(async move {
            let members = core.shared.presence_members(channel.clone()).await;
            let Some(conn) = core.conn(id) else { return };
            let frame = match &members {
                Some(members) => Control::Presence {
                    channel: &channel,
                    members,
                }
                .frame_in(encoding),
                None => Control::Error {
                    code: crate::proto::msg::ErrorCode::Unavailable,
                    message: "presence is not available (Redis did not answer); try again",
                    channel: Some(&channel),
                }
                .frame_in(encoding),
            };
            core.push(&conn, frame);
        });
    }

    /// Tells each presence channel's subscribers who joined and who left since the last time.
    fn flush_presence(&self) {
        let changes = self.presence.borrow_mut().flush(PRESENCE_CHUNK);
        for c in changes {
            match &self.shared.broker {
                Broker::Local => self.shared.publish_detached(
                    crate::delivery::Publication::presence(c.channel, &c.joined, &c.left),
                    Source::Api,
                ),
                Broker::Redis(redis) => redis.presence(c),
            }
        }
    }

    /// Closes `conn` if a close came for it before it registered.
    pub fn close_if_displaced(&self, conn: &Rc<Conn>) {
        let mut early = self.early_closes.borrow_mut();
        if let Some(at) = early.iter().position(|e| e.conn == conn.id()) {
            let e = early.swap_remove(at);
            drop(early);
            self.close(conn, e.code, e.reason);
        }
    }

    /// Runs the periodic checks of every connection (heartbeats, deadlines).
    pub fn tick(&self) {
        self.early_closes
            .borrow_mut()
            .retain(|e| e.at.elapsed() < EARLY_CLOSE_KEPT);
        for conn in self.connections() {
            self.with_session(&conn, |s, ctx, out| s.tick(ctx, out));
        }
        self.claims.borrow_mut().retain(|c| Rc::strong_count(c) > 1);
        self.poll_sweep(Instant::now());
        self.flush_presence();
    }

    /// Drain, first step: tell every connection to go elsewhere (`shutdown`); clients leave on
    /// their own while the node waits.
    fn drain(&self) {
        let encodings = [
            Encoding::Json,
            Encoding::MessagePack,
            Encoding::Sse,
            Encoding::SocketIo,
        ];
        let notice = encodings.map(shutdown_frame);
        for conn in self.connections() {
            let encoding = conn.session.borrow().encoding();
            let at = encodings.iter().position(|e| *e == encoding);
            self.push(
                &conn,
                notice[at.expect("every encoding has its notice")].clone(),
            );
            if encoding == Encoding::SocketIo {
                // socket.io-client does not leave on a notice: closing the transport makes
                // it reconnect (elsewhere) and recover what it missed.
                self.close(&conn, 1012, "server restarting");
            }
        }
    }

    /// Drain, last step: close whoever is still here with 1012.
    fn force_close(&self) {
        for conn in self.connections() {
            self.close(&conn, 1012, "server restarting");
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
