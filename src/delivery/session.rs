//! One connection's state as a sans-IO state machine: what a client asked for, what it may
//! see, what waits to be written to it, and when it must be pinged, paced or closed.
//!
//! A `Session` owns no socket, no task and no clock. Its inputs are data — a client's
//! WebSocket event, a delivery, the owner core's answer to a subscribe, a tick with the time —
//! and so are its outputs: frames to write come out of `poll_transmit`, and requests for the
//! rest of the node (subscribe at a channel's owner, leave a room, record an audit event, cut
//! the socket) are pushed as `Effect`s for the caller to carry out. The runtime's IO driver
//! feeds it from a socket; the unit tests below feed it from a fake clock.
//!
//! Invariants: nothing is queued after the close frame; every `Effect::Subscribe` is matched
//! by exactly one `Effect::Unsubscribe` (when the client, the server or the end of the
//! connection ends it), so the owner's interest counts stay exact; a subscription joins its
//! room only when its own ack arrives (`on_subscribed` says so), so no live event at or below
//! the seq it was handed over at is ever queued; the welcome is the first frame written, after
//! every initial subscription's `subscribed`/`replayed` is queued behind it.

use std::collections::VecDeque;
use std::net::IpAddr;
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;

use super::access::{Authenticator, Claims, Overrides};
use super::channel;
use super::filter::{parse_list, text_match, Filter, FilterError, TextMatch};
use super::heartbeat::{self, Beat, Heartbeat, HeartbeatConfig};
use super::queue::{Bucket, Next, Pushed, SendQueue};
use super::sequencer::{Resume, SubscribeAck};
use super::sse::SseStream;
use super::{terminal, Delivery, Priority};
use crate::proto::msg::{self, ClientMessage, Control, Encoding, ErrorCode, Format};
use crate::proto::ws::codec::{self, Event};

/// Critical events one connection may have unacknowledged.
pub const MAX_UNACKED: usize = 1000;
/// `filter` messages one connection may send per second.
pub const FILTER_UPDATES_PER_SEC: u32 = 10;
/// How long a close handshake we started may take before the socket is cut.
pub const CLOSE_GRACE: Duration = Duration::from_secs(2);

/// What every session of a node reads from the configuration (one copy per node).
#[derive(Debug, Clone)]
pub struct SessionConfig {
    pub heartbeat: HeartbeatConfig,
    /// Engine.IO's heartbeat for Socket.IO sessions (`pingInterval`, `pingTimeout`; one missed
    /// pong closes).
    pub socketio_heartbeat: HeartbeatConfig,
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
    /// Least time between two events of one `coalesce_key` to one connection (zero: none).
    pub key_interval: Duration,
    /// How long an event may wait in the queue (unless its `ttl_ms` says otherwise).
    pub queue_ttl: Duration,
    /// `ack=critical`: re-send an unacknowledged critical event after this long...
    pub ack_timeout: Duration,
    /// ...until it has been sent this many times.
    pub ack_max_sends: u32,
}

/// What a session needs from its surroundings for one input: the time, the node's settings,
/// the epoch clients resume in and the token verifier (for `refresh`).
pub struct Ctx<'a> {
    pub now: Instant,
    /// Wall-clock time, Unix seconds (token expiry).
    pub unix_secs: u64,
    pub config: &'a SessionConfig,
    pub epoch: &'a str,
    pub auth: &'a dyn Authenticator,
}

/// A request of the session to the rest of the node.
#[derive(Debug)]
pub enum Effect {
    /// Ask the channel's owner for a subscription; its ack comes back through
    /// `on_subscribed` with the same `sub`.
    Subscribe {
        channel: Arc<str>,
        sub: u64,
        resume: Resume,
    },
    /// A subscription ended: tell the owner, and leave the room if `joined`.
    Unsubscribe { channel: Arc<str>, joined: bool },
    /// Record an audit event about this connection.
    Audit {
        kind: &'static str,
        fields: serde_json::Value,
    },
    /// Cut the socket both ways (the peer did not finish the close handshake in time).
    Cut,
    /// Answer who is on `channel` (the client may read it).
    Presence { channel: Arc<str> },
}

/// What the driver should write next.
#[derive(Debug)]
pub enum Transmit {
    /// `prefix` (an SSE `id:` line) if any, then `frame`.
    Frame { prefix: Option<Bytes>, frame: Bytes },
    /// Nothing may go for this long (rate limits); anything new queued may change that.
    Wait(Duration),
    /// Nothing to write now.
    Idle,
    /// Everything is written and the connection is over: the socket may close.
    Done,
}

/// Whether the driver should keep reading.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flow {
    Continue,
    /// The peer's close arrived: the reader is done.
    Stop,
}

/// A subscribe refused, answered with an `error` frame (or HTTP 403/400 at the handshake).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SubscribeError {
    pub code: ErrorCode,
    pub message: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SubState {
    /// Asked at connect; the welcome waits for it. Carries the subscription's id, which its
    /// ack must match (an ack of an earlier, since cancelled subscription is ignored).
    PendingInitial(u64),
    Pending(u64),
    Active,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Initial subscriptions are being set up; frames queue but are not written yet.
    Greeting,
    Open,
    /// Our close frame is queued or sent; waiting for the peer's.
    Closing {
        since: Instant,
    },
    /// The reader is done; what is queued is flushed and the connection ends.
    Finished,
}

/// Where a connection stands against its message rate.
enum Pace {
    Fine,
    /// The first message over the limit in this second: answered with `rate_limited`.
    Warn,
    /// Over the limit: dropped unanswered.
    Ignore,
    /// Over twice the limit: the connection is closed with 1008.
    Flooding,
}

/// A one-second counting window.
#[derive(Debug, Clone, Copy)]
struct Window {
    start: Instant,
    count: u32,
}

impl Window {
    fn new(now: Instant) -> Window {
        Window {
            start: now,
            count: 0,
        }
    }

    /// Counts one more at `now`; the count within the current second.
    fn count(&mut self, now: Instant) -> u32 {
        if now.duration_since(self.start) >= Duration::from_secs(1) {
            *self = Window::new(now);
        }
        self.count += 1;
        self.count
    }
}

/// What a paused connection did not get: events, and the terminal output bytes among them.
#[derive(Debug, Default)]
struct Skipped {
    events: u64,
    bytes: u64,
}

impl Skipped {
    /// Counts `d` if a pause skips it (everything but the end of a terminal stream).
    fn skips(&mut self, d: &Delivery) -> bool {
        if d.channel.starts_with(terminal::CHANNEL_PREFIX) && &*d.event == "end" {
            return false;
        }
        self.events += 1;
        if terminal::is_output(&d.channel, &d.event) {
            self.bytes += terminal::chunk_len(msg::event_data(&d.frame));
        }
        true
    }
}

/// State most connections never use, allocated the first time one does and freed when it is
/// back to nothing.
#[derive(Default)]
struct Cold {
    /// What this client asked to see (narrows, never widens, what the claims allow).
    filter: Filter,
    filter_window: Option<Window>,
    /// Critical events sent and not yet acknowledged: (event, last sent, sends so far).
    unacked: VecDeque<(Arc<Delivery>, Instant, u32)>,
    /// Set while the client has paused: what it skipped so far.
    paused: Option<Skipped>,
    /// The welcome, held until the initial subscriptions are set up.
    welcome: Option<Bytes>,
    /// Projects named at the handshake (counted against the per-project limit until the end).
    handshake_projects: Vec<String>,
    /// The close code and reason the connection ended with (for the audit trail).
    closed_with: Option<(u16, String)>,
    /// Since when the client has been behind without catching up.
    behind_since: Option<Instant>,
    /// Socket.IO sessions: acknowledgements and state replies in flight.
    sio: socketio::Pending,
}

impl Cold {
    fn is_idle(&self) -> bool {
        self.filter.is_empty()
            && self.filter_window.is_none()
            && self.unacked.is_empty()
            && self.paused.is_none()
            && self.welcome.is_none()
            && self.handshake_projects.is_empty()
            && self.closed_with.is_none()
            && self.behind_since.is_none()
            && self.sio.is_idle()
    }
}

/// One connection's state (see the module docs).
pub struct Session {
    id: u64,
    peer: IpAddr,
    /// Replaced by a `refresh`; admin changes land in its `overrides`.
    claims: Rc<Claims>,
    /// The token's `exp` (Unix seconds): past it (and the leeway) the connection closes 4001.
    expires_at: Option<u64>,
    /// Opened with `ack=critical`: critical events are re-sent until acknowledged.
    acks: bool,
    phase: Phase,
    /// Initial subscriptions the welcome still waits for.
    initial_pending: u32,
    next_sub: u64,
    subs: Vec<(Arc<str>, SubState)>,
    queue: SendQueue,
    format: Format,
    /// This connection's share of the outbound rate limit.
    bucket: Bucket,
    heartbeat: Heartbeat,
    messages: Window,
    /// When the connection opened (`heartbeat::coarse`).
    connected: u32,
    /// Set for a Server-Sent Events stream: its position, written as `id:`.
    sse: Option<Box<SseStream>>,
    cold: Option<Box<Cold>>,
}

impl Session {
    pub fn new(
        id: u64,
        peer: IpAddr,
        claims: Rc<Claims>,
        format: Format,
        config: &SessionConfig,
        now: Instant,
    ) -> Session {
        let mut queue = SendQueue::new(config.queue_threshold, config.key_interval);
        queue.set_format(format);
        Session {
            id,
            peer,
            expires_at: claims.exp,
            claims,
            acks: false,
            phase: Phase::Greeting,
            initial_pending: 0,
            next_sub: 0,
            subs: Vec::new(),
            queue,
            format,
            bucket: Bucket::new(config.connection_rate_limit),
            heartbeat: Heartbeat::new(now, socketio::heartbeat_config(format, config)),
            messages: Window::new(now),
            connected: heartbeat::coarse(now),
            sse: None,
            cold: None,
        }
    }

    /// When the connection opened, and when its client last answered a ping.
    pub fn times(&self) -> (Instant, Instant) {
        (
            heartbeat::from_coarse(self.connected),
            self.heartbeat.last_pong(),
        )
    }

    /// Makes this an event stream (`/events`) at the position `sse` holds.
    pub fn set_sse(&mut self, sse: Box<SseStream>) {
        self.sse = Some(sse);
    }

    /// `ack=critical`: critical events are re-sent until the client acknowledges them.
    pub fn set_acks(&mut self, on: bool) {
        self.acks = on;
    }

    /// The filter the client opened with.
    pub fn set_filter(&mut self, filter: Filter) {
        if !filter.is_empty() {
            self.cold().filter = filter;
        }
    }

    /// Projects named at the handshake (the caller releases them from the limits at the end).
    pub fn set_handshake_projects(&mut self, projects: Vec<String>) {
        if !projects.is_empty() {
            self.cold().handshake_projects = projects;
        }
    }

    pub fn id(&self) -> u64 {
        self.id
    }

    pub fn peer(&self) -> IpAddr {
        self.peer
    }

    pub fn claims(&self) -> &Claims {
        &self.claims
    }

    pub fn user(&self) -> &str {
        &self.claims.sub
    }

    pub fn format(&self) -> Format {
        self.format
    }

    pub fn encoding(&self) -> Encoding {
        self.format.encoding
    }

    pub fn is_sse(&self) -> bool {
        self.sse.is_some()
    }

    pub fn handshake_projects(&self) -> &[String] {
        self.cold
            .as_ref()
            .map_or(&[], |c| c.handshake_projects.as_slice())
    }

    /// The close code and reason the connection ended with (1006 if it just went away).
    pub fn closed_with(&self) -> (u16, String) {
        self.cold
            .as_ref()
            .and_then(|c| c.closed_with.clone())
            .unwrap_or((1006, "connection lost".into()))
    }

    /// Channels subscribed or being subscribed.
    pub fn channels(&self) -> impl Iterator<Item = &Arc<str>> {
        self.subs.iter().map(|(c, _)| c)
    }

    /// Bytes waiting to be written.
    pub fn queued_bytes(&self) -> usize {
        self.queue.bytes()
    }

    /// Whether `poll_transmit` may have something for the driver.
    pub fn wants_transmit(&self) -> bool {
        match self.phase {
            Phase::Greeting => false,
            Phase::Open | Phase::Closing { .. } => !self.queue.is_empty(),
            Phase::Finished => true,
        }
    }

    fn cold(&mut self) -> &mut Cold {
        self.cold.get_or_insert_with(Box::default)
    }

    /// Frees the cold state once nothing in it is in use.
    fn shed_cold(&mut self) {
        if self.cold.as_ref().is_some_and(|c| c.is_idle()) {
            self.cold = None;
        }
    }

    fn is_live(&self) -> bool {
        matches!(self.phase, Phase::Greeting | Phase::Open)
    }

    fn filter(&self) -> Option<&Filter> {
        self.cold
            .as_ref()
            .map(|c| &c.filter)
            .filter(|f| !f.is_empty())
    }

    fn paused(&self) -> bool {
        self.cold.as_ref().is_some_and(|c| c.paused.is_some())
    }

    // ---- output ------------------------------------------------------------------------

    /// Queues a control frame (or any frame of the server's) unless the connection is closing.
    pub fn push_control(&mut self, frame: Bytes, now: Instant, config: &SessionConfig) {
        if !self.is_live() || self.over_byte_bound(frame.len(), now, config) {
            return;
        }
        self.queue.push_control(frame);
    }

    fn control(&mut self, control: Control<'_>, ctx: &Ctx) {
        // Socket.IO: the first answer to an event sent with an acknowledgement id is that
        // acknowledgement.
        let frame = match self.take_ack() {
            Some(id) => control.ack_frame(id),
            None => control.frame_in(self.encoding()),
        };
        self.push_control(frame, ctx.now, ctx.config);
    }

    fn error(&mut self, code: ErrorCode, message: &str, channel: Option<&str>, ctx: &Ctx) {
        let channel = channel.map(channel::shown);
        self.control(
            Control::Error {
                code,
                message,
                channel: channel.as_deref(),
            },
            ctx,
        );
    }

    /// A client whose queue would pass `max_queue_bytes` is not keeping up whatever the
    /// priorities: its backlog is dropped and it is closed with 1008.
    fn over_byte_bound(&mut self, more: usize, now: Instant, config: &SessionConfig) -> bool {
        let queued = self.queue.bytes() + more + super::queue::ENTRY_BYTES;
        if queued <= config.max_queue_bytes {
            return false;
        }
        tracing::debug!(conn = self.id, queued, "send queue over its bound: closing");
        self.queue.clear();
        self.close(1008, "too slow", now);
        true
    }

    /// Queues a close frame; nothing more is queued after it.
    pub fn close(&mut self, code: u16, reason: &str, now: Instant) {
        if !self.is_live() {
            return;
        }
        self.cold()
            .closed_with
            .get_or_insert_with(|| (code, reason.to_owned()));
        self.open_now();
        if self.encoding() == Encoding::SocketIo && !reason.is_empty() {
            // Socket.IO clients see no close frame: they hear why as an event first.
            let why = Control::Closed { code, reason }.frame_in(Encoding::SocketIo);
            self.queue.push_control(why);
        }
        let last = match self.sse {
            Some(_) => Control::Closed { code, reason }.frame_in(Encoding::Sse),
            None => codec::close_frame(code, reason),
        };
        self.queue.push_control(last);
        self.phase = Phase::Closing { since: now };
    }

    /// Sets the welcome frame and how many initial subscriptions it waits for.
    pub fn greet_after(&mut self, welcome: Bytes, initial: usize) {
        self.cold().welcome = Some(welcome);
        self.initial_pending = initial as u32;
        if initial == 0 {
            self.open_now();
        }
    }

    fn initial_subscribed(&mut self) {
        self.initial_pending = self.initial_pending.saturating_sub(1);
        if self.initial_pending == 0 {
            self.open_now();
        }
    }

    fn open_now(&mut self) {
        if self.phase == Phase::Greeting {
            if let Some(welcome) = self.cold.as_mut().and_then(|c| c.welcome.take()) {
                self.queue.push_control_front(welcome);
            }
            self.phase = Phase::Open;
            self.shed_cold();
        }
    }

    /// Whether this connection gets `d`: its permissions allow it and its filters pass it.
    pub fn wants(&self, d: &Delivery) -> bool {
        self.claims
            .can_see(d.project_id.as_deref(), d.user_id.as_deref())
            && self.filter().is_none_or(|f| {
                let data = if f.reads_data() {
                    msg::event_data(&d.frame)
                } else {
                    ""
                };
                f.passes(
                    d.agent_id.as_deref(),
                    d.project_id.as_deref(),
                    &d.event,
                    data,
                )
            })
    }

    /// Whether an event may be queued: the connection is not closing, not paused (a pause
    /// counts it instead) and has room for it (else it is closed as too slow).
    fn takes(&mut self, d: &Delivery, now: Instant, config: &SessionConfig) -> bool {
        if !self.is_live() {
            return false;
        }
        if let Some(skipped) = self.cold.as_mut().and_then(|c| c.paused.as_mut()) {
            if skipped.skips(d) {
                return false;
            }
        }
        let len = d.frame_in(self.format).len();
        !self.over_byte_bound(len, now, config)
    }

    /// Offers a live event of a channel this connection's room holds: queued if the client
    /// may see it and wants it; a client that is behind may have it dropped or conflated by
    /// its priority and `coalesce_key`. True if something new waits to be written.
    pub fn deliver(&mut self, d: &Arc<Delivery>, now: Instant, config: &SessionConfig) -> bool {
        if !self.wants(d) || !self.takes(d, now, config) {
            return false;
        }
        let pushed = self.queue.push_event_at(d, now);
        let behind = self.queue.is_behind();
        // Terminal output goes as critical (never dropped) but is not acknowledged.
        if self.acks
            && d.priority == Priority::Critical
            && !terminal::is_output(&d.channel, &d.event)
        {
            let unacked = &mut self.cold().unacked;
            if unacked.len() >= MAX_UNACKED {
                unacked.pop_front(); // bounded: the oldest gives up first
            }
            unacked.push_back((d.clone(), now, 1));
        }
        if behind && self.cold.as_ref().is_none_or(|c| c.behind_since.is_none()) {
            self.cold().behind_since = Some(now);
        }
        pushed != Pushed::Dropped
    }

    /// The next thing to write (see `Transmit`); `node` is the core's share of the node-wide
    /// outbound rate limit.
    pub fn poll_transmit(&mut self, ctx: &Ctx, node: &mut Bucket) -> Transmit {
        if self.phase == Phase::Greeting {
            return Transmit::Idle;
        }
        loop {
            match self
                .queue
                .next(ctx.now, ctx.config.queue_ttl, &mut [&mut self.bucket, node])
            {
                Next::Empty => {
                    // Events may have expired on the way to an empty queue: say so.
                    if self.queue_dropped_notices() {
                        continue;
                    }
                    let sse_done =
                        self.sse.is_some() && matches!(self.phase, Phase::Closing { .. });
                    return if self.phase == Phase::Finished || sse_done {
                        Transmit::Done
                    } else {
                        Transmit::Idle
                    };
                }
                Next::Frame(frame) => {
                    // SSE: every message but a comment carries the stream's position.
                    let prefix = match self.sse.as_deref() {
                        Some(sse) if !frame.starts_with(b":") => Some(sse.id_line()),
                        _ => None,
                    };
                    return Transmit::Frame { prefix, frame };
                }
                Next::Event(d) => {
                    if self.encoding() == Encoding::SocketIo {
                        self.note_written(&d);
                    }
                    let prefix = self.sse.as_deref().map(|sse| {
                        sse.advance(&d.channel, d.seq);
                        sse.id_line()
                    });
                    let frame = d.frame_in(self.format).clone();
                    return Transmit::Frame { prefix, frame };
                }
                Next::Mark(channel, seq) => {
                    if let Some(sse) = self.sse.as_deref() {
                        sse.advance(&channel, seq);
                    }
                }
                Next::Blocked(wait) => return Transmit::Wait(wait),
            }
        }
    }

    /// Queues the `dropped` notices due once the client has caught up; true if any.
    fn queue_dropped_notices(&mut self) -> bool {
        if !self.is_live() {
            return false; // nothing goes after the close frame
        }
        let notices = self.queue.take_dropped_if_drained();
        let any = !notices.is_empty();
        for (channel, count) in notices {
            let notice = Control::Dropped {
                channel: &channel,
                count,
            };
            self.queue.push_control(notice.frame_in(self.encoding()));
        }
        any
    }

    /// What `poll_transmit` gave is written: a client that caught up is no longer behind,
    /// and hears what it lost.
    pub fn on_written(&mut self) {
        if !self.queue.is_behind() {
            if let Some(cold) = self.cold.as_mut() {
                cold.behind_since = None;
            }
            self.shed_cold();
        }
        self.queue_dropped_notices();
    }

    /// The reader is done (the peer closed, or the socket failed): what is queued is flushed,
    /// then `poll_transmit` says `Done`.
    pub fn on_read_closed(&mut self) {
        self.phase = Phase::Finished;
    }

    // ---- subscriptions -----------------------------------------------------------------

    /// Starts a subscription (`initial`: one the welcome waits for); the client gets
    /// `subscribed` once the owner answers (`on_subscribed`).
    pub fn subscribe(
        &mut self,
        name: &str,
        resume: Resume,
        initial: bool,
        ctx: &Ctx,
        out: &mut Vec<Effect>,
    ) -> Result<(), SubscribeError> {
        self.check_subscribe(name, ctx, out)?;
        let channel: Arc<str> = name.into();
        self.next_sub += 1;
        let sub = self.next_sub;
        let state = if initial {
            SubState::PendingInitial(sub)
        } else {
            SubState::Pending(sub)
        };
        // Most connections hold one or a few channels: room for exactly what they hold.
        self.subs.reserve_exact(1);
        self.subs.push((channel.clone(), state));
        out.push(Effect::Subscribe {
            channel,
            sub,
            resume,
        });
        Ok(())
    }

    fn check_subscribe(
        &self,
        name: &str,
        ctx: &Ctx,
        out: &mut Vec<Effect>,
    ) -> Result<(), SubscribeError> {
        let max = ctx.config.max_channels_per_connection;
        let fail = |code, message: String| Err(SubscribeError { code, message });
        if let Err(e) = channel::validate(name) {
            let shown = channel::shown(name);
            return fail(
                ErrorCode::BadChannel,
                format!("bad channel \"{shown}\": {e}"),
            );
        }
        if !self.claims.can_subscribe(name) {
            out.push(self.audit("subscribe_denied", serde_json::json!({ "channel": name })));
            return fail(
                ErrorCode::Forbidden,
                format!("not allowed to subscribe to {name}"),
            );
        }
        if self.subs.iter().any(|(c, _)| &**c == name) {
            return fail(
                ErrorCode::AlreadySubscribed,
                format!("already subscribed to {name}"),
            );
        }
        if self.subs.len() >= max {
            return fail(
                ErrorCode::TooManyChannels,
                format!("at most {max} channels per connection"),
            );
        }
        Ok(())
    }

    /// An audit event about this connection, with `extra` fields added to the usual ones.
    fn audit(&self, kind: &'static str, extra: serde_json::Value) -> Effect {
        let mut fields = serde_json::json!({"ip": self.peer, "user_id": self.claims.sub,
            "connection_id": format!("{:x}", self.id)});
        if let (Some(all), serde_json::Value::Object(more)) = (fields.as_object_mut(), extra) {
            all.extend(more);
        }
        Effect::Audit { kind, fields }
    }

    /// Ends a subscription, at the client's request (`reason` None) or the server's.
    pub fn unsubscribe(
        &mut self,
        name: &str,
        reason: Option<&str>,
        ctx: &Ctx,
        out: &mut Vec<Effect>,
    ) -> Result<(), SubscribeError> {
        let Some(at) = self.subs.iter().position(|(c, _)| &**c == name) else {
            return Err(SubscribeError {
                code: ErrorCode::NotSubscribed,
                message: format!("not subscribed to {}", channel::shown(name)),
            });
        };
        let (channel, state) = self.subs.swap_remove(at);
        self.purge(|d| d.channel == channel);
        self.note_unsubscribed(&channel);
        if let SubState::PendingInitial(_) = state {
            self.initial_subscribed(); // the welcome no longer waits for this one
        }
        self.control(
            Control::Unsubscribed {
                channel: &channel,
                reason,
            },
            ctx,
        );
        out.push(Effect::Unsubscribe {
            channel,
            joined: state == SubState::Active,
        });
        Ok(())
    }

    /// The owner handed over subscription `sub` of `channel`: `subscribed`, then the replay,
    /// are queued. True if the connection now joins the channel's room for live events (false
    /// for the ack of a subscription since cancelled). `channel` replaces the session's own
    /// copy of the name, so the room and the subscription share one.
    pub fn on_subscribed(
        &mut self,
        channel: &Arc<str>,
        sub: u64,
        ack: SubscribeAck,
        ctx: &Ctx,
    ) -> bool {
        // Only the ack of the subscription now pending counts: one that was cancelled (its
        // Unsubscribe already sent) may be overtaken by a newer one of the channel.
        let Some(entry) = self.subs.iter_mut().find(|(c, _)| c == channel) else {
            return false;
        };
        let initial = match entry.1 {
            SubState::PendingInitial(id) if id == sub => true,
            SubState::Pending(id) if id == sub => false,
            _ => return false,
        };
        *entry = (channel.clone(), SubState::Active);
        self.ack_subscribed(channel);
        self.control(
            Control::Subscribed {
                channel,
                seq: ack.last_seq,
            },
            ctx,
        );
        if self.answer_state(channel, &ack, ctx) {
            if initial {
                self.initial_subscribed();
            }
            return true;
        }
        if self.encoding() == Encoding::SocketIo {
            // Where the client stands: up to the replay's start (it is written next), else
            // the head.
            let start = match &ack.replay {
                Some(r) if r.recovered => r.deliveries.first().map(|d| d.seq - 1),
                _ => None,
            };
            self.note_subscribed(channel, start.unwrap_or(ack.last_seq));
            if initial && ack.replay.as_ref().is_some_and(|r| !r.recovered) {
                self.recovery_lost();
            }
        }
        // An SSE stream starting live owes nothing before the head: its position is the head.
        if let (None, Some(sse)) = (&ack.replay, self.sse.as_deref()) {
            sse.advance(channel, ack.last_seq);
        }
        if let Some(mut replay) = ack.replay {
            // A replay that would overflow the send queue is not sent: the client reloads
            // (recovered:false) instead of being closed as too slow again and again.
            let bytes: usize = replay
                .deliveries
                .iter()
                .map(|d| d.frame_for(self.format).len())
                .sum::<usize>()
                + self.queue.bytes();
            if bytes > ctx.config.max_queue_bytes / 2 {
                replay.deliveries.clear();
                replay.recovered = false;
            }
            let mut count = 0;
            for d in &replay.deliveries {
                // Never dropped; a paused connection skips it like a live one (and `count`
                // says how many were re-sent).
                if self.wants(d) && self.takes(d, ctx.now, ctx.config) {
                    self.queue.push_replay(d.clone());
                    count += 1;
                }
            }
            self.control(
                Control::Replayed {
                    channel,
                    recovered: replay.recovered,
                    count,
                },
                ctx,
            );
            if !replay.recovered && self.sse.is_some() && self.is_live() {
                // Told to reload: from here the stream's position is the head, but only once
                // that notice is written (a reconnect before it must hear it again).
                self.queue.push_mark(channel.clone(), ack.last_seq);
            }
        }
        if initial {
            self.initial_subscribed();
        }
        true
    }

    /// Ends the subscriptions the (changed) claims no longer allow, telling the client why;
    /// returns how many.
    pub fn end_forbidden_subscriptions(
        &mut self,
        reason: &str,
        ctx: &Ctx,
        out: &mut Vec<Effect>,
    ) -> usize {
        let lost: Vec<Arc<str>> = self
            .subs
            .iter()
            .filter(|(c, _)| !self.claims.can_subscribe(c))
            .map(|(c, _)| c.clone())
            .collect();
        lost.iter()
            .filter(|c| self.unsubscribe(c, Some(reason), ctx, out).is_ok())
            .count()
    }

    /// The connection is over: every subscription ends (each with its `Unsubscribe`).
    pub fn end_subscriptions(&mut self, out: &mut Vec<Effect>) {
        for (channel, state) in self.subs.drain(..) {
            out.push(Effect::Unsubscribe {
                channel,
                joined: state == SubState::Active,
            });
        }
    }

    /// An admin changed what this user may see.
    pub fn set_overrides(&mut self, overrides: Overrides) {
        Rc::make_mut(&mut self.claims).overrides = overrides;
    }

    /// Forgets queued and unacknowledged events `gone` picks: nothing of an ended
    /// subscription or a revoked project goes out after the fact.
    pub fn purge(&mut self, gone: impl Fn(&Delivery) -> bool) {
        self.queue.purge(&gone);
        if let Some(cold) = self.cold.as_mut() {
            cold.unacked.retain(|(d, _, _)| !gone(d));
        }
    }

    // ---- input -------------------------------------------------------------------------

    /// One WebSocket event from the client.
    pub fn on_ws_event(&mut self, event: Event, ctx: &Ctx, out: &mut Vec<Effect>) -> Flow {
        // Our close frame is out: only the peer's close matters now. Reading on until it comes
        // (or the close grace cuts the socket) lets the TCP connection end with a FIN.
        if matches!(self.phase, Phase::Closing { .. }) && !matches!(event, Event::Close { .. }) {
            return Flow::Continue;
        }
        if matches!(event, Event::Text(_) | Event::Binary(_)) {
            match self.count_message(ctx) {
                Pace::Fine => {}
                Pace::Warn => {
                    let message = "too many messages: slow down or be disconnected";
                    self.error(ErrorCode::RateLimited, message, None, ctx);
                    return Flow::Continue;
                }
                Pace::Ignore => return Flow::Continue,
                Pace::Flooding => {
                    out.push(
                        self.audit("limit_hit", serde_json::json!({"reason": "message flood"})),
                    );
                    self.close(1008, "flooding", ctx.now);
                    return Flow::Continue;
                }
            }
        }
        match event {
            Event::Text(text) if self.encoding() == Encoding::SocketIo => {
                let text = std::str::from_utf8(&text).unwrap_or_default();
                self.on_socketio_text(text, ctx, out)
            }
            Event::Binary(_) if self.encoding() == Encoding::SocketIo => {
                self.on_socketio_binary(ctx)
            }
            Event::Text(text) => self.on_message(&text, ctx, out),
            // MessagePack clients may send their messages as MessagePack maps too.
            Event::Binary(bytes) if self.encoding() == Encoding::MessagePack => {
                match rmp_serde::from_slice::<serde_json::Value>(&bytes) {
                    Ok(value) => self.on_message(value.to_string().as_bytes(), ctx, out),
                    Err(e) => {
                        let message = format!("malformed MessagePack: {e}");
                        self.error(ErrorCode::BadJson, &message, None, ctx)
                    }
                }
            }
            Event::Binary(_) => {
                let message = "send client messages as JSON text frames";
                self.error(ErrorCode::BinaryNotSupported, message, None, ctx)
            }
            Event::Ping(payload) => {
                let pong = codec::pong_frame(&payload);
                if !self.over_byte_bound(pong.len(), ctx.now, ctx.config) {
                    self.queue.push_pong(pong);
                }
            }
            Event::Pong(_) => self.heartbeat.handle_pong(ctx.now),
            Event::Close { code, .. } => {
                // Answer the peer's close with its own code, unless we started the handshake.
                let code = code.unwrap_or(1000);
                self.cold()
                    .closed_with
                    .get_or_insert_with(|| (code, "closed by the client".into()));
                self.close(code, "", ctx.now);
                return Flow::Stop;
            }
        }
        Flow::Continue
    }

    /// Counts a client message against the per-second limit.
    fn count_message(&mut self, ctx: &Ctx) -> Pace {
        let per_sec = ctx.config.max_client_messages_per_sec;
        if per_sec == 0 {
            return Pace::Fine;
        }
        match self.messages.count(ctx.now) {
            n if n <= per_sec => Pace::Fine,
            n if n == per_sec + 1 => Pace::Warn,
            n if n <= 2 * per_sec => Pace::Ignore,
            _ => Pace::Flooding,
        }
    }

    /// One client message (JSON text).
    fn on_message(&mut self, text: &[u8], ctx: &Ctx, out: &mut Vec<Effect>) {
        let parsed = msg::parse_client_message(text);
        // Each channel of a message gets its own answer, so one message naming more channels
        // than a connection may hold gets one error instead of a flood of them.
        let max = ctx.config.max_channels_per_connection;
        if let Ok(
            ClientMessage::Subscribe { channels, .. } | ClientMessage::Unsubscribe { channels },
        ) = &parsed
        {
            if channels.len() > max {
                let message = format!("a message may name at most {max} channels");
                return self.error(ErrorCode::TooManyChannels, &message, None, ctx);
            }
        }
        match parsed {
            Err(e) => self.error(e.code, &e.message, None, ctx),
            Ok(ClientMessage::Subscribe {
                channels,
                since,
                epoch,
            }) => {
                if !since.is_empty() && epoch.is_none() {
                    let message = "\"since\" needs the \"epoch\" it came from (see welcome)";
                    return self.error(ErrorCode::BadMessage, message, None, ctx);
                }
                let same_epoch = epoch.as_deref() == Some(ctx.epoch);
                for name in &channels {
                    let resume = match since.get(name) {
                        None => Resume::Live,
                        Some(&seq) if same_epoch => Resume::After(seq),
                        Some(_) => Resume::OtherEpoch,
                    };
                    if let Err(e) = self.subscribe(name, resume, false, ctx, out) {
                        self.error(e.code, &e.message, Some(name), ctx);
                    }
                }
            }
            Ok(ClientMessage::Unsubscribe { channels }) => {
                for name in &channels {
                    if let Err(e) = self.unsubscribe(name, None, ctx, out) {
                        self.error(e.code, &e.message, Some(name), ctx);
                    }
                }
            }
            Ok(ClientMessage::Refresh { token }) => self.refresh(&token, ctx, out),
            Ok(ClientMessage::Ack { channel, seq }) => self.ack(&channel, seq),
            Ok(ClientMessage::Pause) => self.pause(ctx),
            Ok(ClientMessage::Presence { channel }) => {
                if let Err(e) = channel::validate(&channel) {
                    let message = e.to_string();
                    self.error(ErrorCode::BadChannel, &message, Some(&channel), ctx);
                } else if !self.claims.can_subscribe(&channel) {
                    let message = format!("not allowed to read {channel}");
                    self.error(ErrorCode::Forbidden, &message, Some(&channel), ctx);
                } else {
                    out.push(Effect::Presence {
                        channel: channel.into(),
                    });
                }
            }
            Ok(ClientMessage::Resume) => self.resume(ctx),
            Ok(ClientMessage::Filter {
                agent_ids,
                project_ids,
                event_types,
                search,
                regex,
                levels,
            }) => {
                let window = self
                    .cold()
                    .filter_window
                    .get_or_insert_with(|| Window::new(ctx.now));
                if window.count(ctx.now) > FILTER_UPDATES_PER_SEC {
                    let message = "at most 10 filter updates per second";
                    return self.error(ErrorCode::RateLimited, message, None, ctx);
                }
                let parsed = (|| {
                    let list = |name, values: &[String]| {
                        parse_list(name, values.iter().map(String::as_str))
                    };
                    Ok::<_, FilterError>(Filter {
                        agent_ids: list("agent_ids", &agent_ids)?,
                        project_ids: list("project_ids", &project_ids)?,
                        event_types: list("event_types", &event_types)?,
                        text: text_match(search.as_deref(), regex.as_deref())?,
                        levels: list("levels", &levels)?,
                    })
                })();
                match parsed {
                    Err(e) => self.error(ErrorCode::BadFilter, &e.to_string(), None, ctx),
                    Ok(filter) => {
                        let answer = Control::Filtered {
                            agent_ids: &filter.agent_ids,
                            project_ids: &filter.project_ids,
                            event_types: &filter.event_types,
                            search: match &filter.text {
                                Some(TextMatch::Substring(s)) => Some(s),
                                _ => None,
                            },
                            regex: match &filter.text {
                                Some(TextMatch::Regex(r)) => Some(r.as_str()),
                                _ => None,
                            },
                            levels: &filter.levels,
                        }
                        .frame_in(self.encoding());
                        self.push_control(answer, ctx.now, ctx.config);
                        self.cold().filter = filter;
                    }
                }
            }
        }
    }

    /// A fresh token extends the connection; its claims replace the old ones (keeping the
    /// admin's changes), and subscriptions the new claims no longer allow end at once.
    fn refresh(&mut self, token: &str, ctx: &Ctx, out: &mut Vec<Effect>) {
        let mut claims = match ctx.auth.authenticate(token) {
            Ok(c) => c,
            Err(reason) => return self.error(ErrorCode::BadToken, &reason, None, ctx),
        };
        if claims.sub != self.claims.sub {
            let message = "the refresh token is for another user";
            return self.error(ErrorCode::BadToken, message, None, ctx);
        }
        let exp = claims.exp;
        claims.overrides = self.claims.overrides.clone();
        self.claims = Rc::new(claims);
        self.expires_at = exp;
        self.end_forbidden_subscriptions("forbidden", ctx, out);
        self.control(Control::Refreshed { exp }, ctx);
    }

    /// `pause`: from now on (and of what is queued) events are skipped, and counted.
    fn pause(&mut self, ctx: &Ctx) {
        let mut skipped = self
            .cold
            .as_mut()
            .and_then(|c| c.paused.take())
            .unwrap_or_default();
        // A skipped critical event was never sent: it is not waiting for an ack either.
        let mut lost: Vec<(Arc<str>, u64)> = Vec::new();
        self.queue.purge(|d| {
            let skips = skipped.skips(d);
            if skips && d.priority == Priority::Critical {
                lost.push((d.channel.clone(), d.seq));
            }
            skips
        });
        let cold = self.cold();
        cold.unacked
            .retain(|(d, _, _)| !lost.iter().any(|(c, s)| *s == d.seq && *c == d.channel));
        cold.paused = Some(skipped);
        self.control(Control::Paused, ctx);
    }

    /// `resume`: live events flow again; the answer says what was skipped.
    fn resume(&mut self, ctx: &Ctx) {
        let skipped = self
            .cold
            .as_mut()
            .and_then(|c| c.paused.take())
            .unwrap_or_default();
        // Unacknowledged events get a full timeout again from now: the client could not
        // acknowledge what it was not sent while paused.
        if let Some(cold) = self.cold.as_mut() {
            for (_, at, _) in cold.unacked.iter_mut() {
                *at = ctx.now;
            }
        }
        self.shed_cold();
        self.control(
            Control::Resumed {
                skipped: skipped.events,
                skipped_bytes: skipped.bytes,
            },
            ctx,
        );
    }

    /// The client acknowledged a critical event.
    fn ack(&mut self, channel: &str, seq: u64) {
        if let Some(cold) = self.cold.as_mut() {
            cold.unacked
                .retain(|(d, _, _)| !(d.seq == seq && &*d.channel == channel));
        }
        self.shed_cold();
    }

    /// Re-sends critical events not acknowledged within the timeout, at most `ack_max_sends`
    /// times each.
    fn resend_unacked(&mut self, ctx: &Ctx) {
        if self.paused() {
            return; // a paused client gets nothing; the clock restarts at resume
        }
        let Some(cold) = self.cold.as_mut() else {
            return;
        };
        let (now, config, format) = (ctx.now, ctx.config, self.format);
        cold.unacked
            .retain(|(_, _, sends)| *sends < config.ack_max_sends);
        let due: Vec<Bytes> = cold
            .unacked
            .iter_mut()
            .filter(|(_, at, _)| now.duration_since(*at) >= config.ack_timeout)
            .map(|(d, at, sends)| {
                *at = now;
                *sends += 1;
                d.frame_for(format)
            })
            .collect();
        for frame in due {
            self.push_control(frame, now, config); // same bytes, same seq: a repeat shows
        }
        self.shed_cold();
    }

    /// Heartbeat, token expiry, slow client, acknowledgements and the close handshake's
    /// deadline, at `ctx.now`.
    pub fn tick(&mut self, ctx: &Ctx, out: &mut Vec<Effect>) {
        let now = ctx.now;
        // An idle connection keeps no queue memory from its last burst.
        self.queue.release_if_empty();
        // Only while live: once closing, the backlog ends with our close frame, which must not
        // be cleared with it (the close grace bounds how long the backlog is kept).
        let behind_since = self.cold.as_ref().and_then(|c| c.behind_since);
        if let Some(since) = behind_since.filter(|_| self.is_live()) {
            if now.duration_since(since) >= ctx.config.slow_client_timeout {
                self.cold().behind_since = None;
                self.queue.clear();
                self.close(1008, "too slow", now);
            }
        }
        if self.acks {
            self.resend_unacked(ctx);
        }
        if let Some(exp) = self.expires_at {
            if ctx.unix_secs > exp.saturating_add(ctx.auth.leeway_secs()) {
                self.expires_at = None;
                self.close(4001, "token expired", now);
            }
        }
        match self.phase {
            Phase::Closing { since } if now.duration_since(since) >= CLOSE_GRACE => {
                out.push(Effect::Cut)
            }
            Phase::Open => match self
                .heartbeat
                .poll(now, socketio::heartbeat_config(self.format, ctx.config))
            {
                Beat::Nothing => {}
                Beat::SendPing if self.sse.is_some() => {
                    // An SSE client cannot answer: the comment keeps proxies and the browser's
                    // idle timers happy, and a dead peer fails the write.
                    self.push_control(Bytes::from_static(b": ping\n\n"), now, ctx.config);
                    self.heartbeat.handle_pong(now);
                }
                Beat::SendPing if self.encoding() == Encoding::SocketIo => {
                    self.push_control(socketio::ping_frame(), now, ctx.config)
                }
                Beat::SendPing => {
                    self.push_control(Bytes::from_static(&[0x89, 0x00]), now, ctx.config)
                }
                Beat::Dead => {
                    // The close frame goes out first; the close grace then cuts the socket if
                    // the peer is truly gone.
                    tracing::debug!(conn = self.id, "no pong: closing");
                    self.close(4002, "heartbeat timeout", now);
                }
            },
            _ => {}
        }
    }
}

pub mod socketio;
#[cfg(test)]
mod tests;
