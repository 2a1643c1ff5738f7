//! One WebSocket connection on its core: the shared handle (`Conn`), the reader loop that turns
//! socket bytes into client messages, and the writer loop that drains the send queue.
//!
//! Invariant: the send queue holds clones of shared frames (refcounts, never copies); nothing is
//! queued after the close frame; the writer writes a frame alone when it is the only one queued
//! and coalesces a backlog into one write, so a connection that keeps up gets each frame at
//! once and one that is behind costs one syscall per batch.

use std::cell::{Cell, RefCell};
use std::collections::{HashMap, VecDeque};
use std::future::poll_fn;
use std::rc::{Rc, Weak};
use std::sync::Arc;
use std::task::{Poll, Waker};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};

use crate::delivery::access::Claims;
use crate::delivery::filter::{parse_list, text_match, Filter, FilterError, TextMatch};
use crate::delivery::heartbeat::{Beat, Heartbeat};
use crate::delivery::queue::{Bucket, Next, Pushed, SendQueue};
use crate::delivery::sequencer::Resume;
use crate::delivery::sse::SseStream;
use crate::delivery::{terminal, Delivery, Priority};
use crate::proto::msg::{self, ClientMessage, Control, Encoding, ErrorCode, Format};
use crate::proto::ws::codec::{self, Decoder, Event};
use crate::proto::ws::deflate::InflateBudget;

use super::core::{Core, Received, Settings};
use super::socket::Socket;

/// Most bytes the writer puts into one coalesced write.
const MAX_WRITE_BATCH: usize = 256 * 1024;
/// Largest coalescing buffer a connection keeps between batches.
const SPARE_WRITE_BUF: usize = 4096;
/// Critical events one connection may have unacknowledged.
const MAX_UNACKED: usize = 1000;
/// `filter` messages one connection may send per second.
const FILTER_UPDATES_PER_SEC: u32 = 10;
/// How long a close handshake we started may take before the socket is cut.
const CLOSE_GRACE: Duration = Duration::from_secs(2);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SubState {
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
    /// The reader is done; the writer flushes what is queued and ends.
    Finished,
}

pub struct Conn {
    pub id: u64,
    /// Replaced by a `refresh`.
    pub claims: RefCell<Claims>,
    pub peer: std::net::IpAddr,
    /// The close code and reason the connection ended with (for the audit trail).
    pub closed_with: RefCell<Option<(u16, String)>>,
    /// Projects named at the handshake (counted against the per-project limit until the end).
    pub handshake_projects: RefCell<Vec<String>>,
    /// Start of the current one-second window of client messages, and how many came in it.
    msg_window: Cell<(Instant, u32)>,
    /// Opened with `ack=critical`: critical events are re-sent until acknowledged.
    pub acks: Cell<bool>,
    /// Critical events sent and not yet acknowledged: (event, last sent, sends so far).
    unacked: RefCell<VecDeque<(Arc<Delivery>, Instant, u32)>>,
    /// What this client asked to see (narrows, never widens, what `claims` allow).
    pub filter: RefCell<Filter>,
    /// Start of the current one-second window of `filter` messages, and how many came in it.
    filter_window: Cell<(Instant, u32)>,
    /// The token's `exp` (Unix seconds): past it (and the leeway) the connection closes 4001.
    expires_at: Cell<Option<u64>>,
    pub subs: RefCell<HashMap<Arc<str>, SubState>>,
    queue: RefCell<SendQueue>,
    /// Past this many bytes queued the client is too slow and is closed at once.
    max_queue_bytes: usize,
    /// The encoding of every frame this connection gets.
    pub encoding: Encoding,
    /// permessage-deflate: event frames larger than this go compressed.
    compress_over: Option<u32>,
    /// This connection's share of the outbound rate limit.
    bucket: RefCell<Bucket>,
    /// Since when the client has been behind without catching up (for `slow_client_timeout`).
    behind_since: Cell<Option<Instant>>,
    writer: Cell<Option<Waker>>,
    /// Set by every push, so a writer waiting out a rate or key interval looks again.
    kicked: Cell<bool>,
    phase: Cell<Phase>,
    welcome: RefCell<Option<Bytes>>,
    initial_pending: Cell<usize>,
    heartbeat: RefCell<Heartbeat>,
    /// The socket, while its reader or writer still runs (cut by `abort`).
    socket: Weak<Socket>,
    /// Set for a Server-Sent Events stream (`/events`): its position, written as `id:`.
    pub sse: Option<Box<SseStream>>,
    /// Set while the client has paused: what it skipped so far.
    paused: RefCell<Option<Box<Skipped>>>,
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

impl Conn {
    pub fn new(
        id: u64,
        peer: std::net::IpAddr,
        claims: Claims,
        socket: Weak<Socket>,
        settings: &Settings,
        format: Format,
    ) -> Conn {
        let mut queue = SendQueue::new(settings.queue_threshold, settings.key_interval);
        queue.set_format(format);
        let max_queue_bytes = settings.max_queue_bytes;
        let heartbeat = Heartbeat::new(Instant::now(), &settings.heartbeat);
        Conn {
            id,
            peer,
            closed_with: RefCell::new(None),
            expires_at: Cell::new(claims.exp),
            filter: RefCell::new(Filter::default()),
            acks: Cell::new(false),
            unacked: RefCell::new(VecDeque::new()),
            handshake_projects: RefCell::new(Vec::new()),
            msg_window: Cell::new((Instant::now(), 0)),
            filter_window: Cell::new((Instant::now(), 0)),
            claims: RefCell::new(claims),
            subs: RefCell::new(HashMap::new()),
            queue: RefCell::new(queue),
            kicked: Cell::new(false),
            encoding: format.encoding,
            compress_over: format.compress_over,
            max_queue_bytes,
            behind_since: Cell::new(None),
            bucket: RefCell::new(Bucket::new(settings.connection_rate_limit)),
            writer: Cell::new(None),
            phase: Cell::new(Phase::Greeting),
            welcome: RefCell::new(None),
            initial_pending: Cell::new(0),
            heartbeat: RefCell::new(heartbeat),
            socket,
            sse: None,
            paused: RefCell::new(None),
        }
    }

    /// How this connection's event frames are built.
    pub fn format(&self) -> Format {
        Format {
            encoding: self.encoding,
            compress_over: self.compress_over,
        }
    }

    /// Whether this connection gets `d`: its permissions allow it and its filters pass it.
    pub fn wants(&self, d: &Delivery) -> bool {
        self.claims
            .borrow()
            .can_see(d.project_id.as_deref(), d.user_id.as_deref())
            && {
                let f = self.filter.borrow();
                f.is_empty() || {
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
                }
            }
    }

    /// Counts a client message against `per_sec` (0: no limit).
    fn count_message(&self, now: Instant, per_sec: u32) -> Pace {
        if per_sec == 0 {
            return Pace::Fine;
        }
        let (start, n) = self.msg_window.get();
        let (start, n) = if now.duration_since(start) >= Duration::from_secs(1) {
            (now, 0)
        } else {
            (start, n)
        };
        let n = n + 1;
        self.msg_window.set((start, n));
        match n {
            n if n <= per_sec => Pace::Fine,
            n if n == per_sec + 1 => Pace::Warn,
            n if n <= 2 * per_sec => Pace::Ignore,
            _ => Pace::Flooding,
        }
    }

    /// Counts a `filter` message; false past `FILTER_UPDATES_PER_SEC` in one second.
    fn filter_update_allowed(&self, now: Instant) -> bool {
        let (start, n) = self.filter_window.get();
        let (start, n) = if now.duration_since(start) >= Duration::from_secs(1) {
            (now, 0)
        } else {
            (start, n)
        };
        self.filter_window.set((start, n + 1));
        n < FILTER_UPDATES_PER_SEC
    }

    /// Queues a control frame (or a replayed event) unless the connection is closing.
    pub fn push(&self, frame: Bytes) {
        if !matches!(self.phase.get(), Phase::Greeting | Phase::Open) {
            return;
        }
        if self.over_byte_bound(frame.len()) {
            return;
        }
        self.queue.borrow_mut().push_control(frame);
        self.wake_writer();
    }

    /// Whether an event may be queued: the connection is not closing, not paused (a pause
    /// counts it instead) and has room for it (else it is closed as too slow).
    fn takes(&self, d: &Delivery) -> bool {
        if !matches!(self.phase.get(), Phase::Greeting | Phase::Open) {
            return false;
        }
        if let Some(skipped) = self.paused.borrow_mut().as_mut() {
            if skipped.skips(d) {
                return false;
            }
        }
        !self.over_byte_bound(d.frame_in(self.format()).len())
    }

    /// An SSE stream's position of `channel` moves to `seq` once what is queued now is written.
    pub fn settle_after_queued(&self, channel: Arc<str>, seq: u64) {
        if self.sse.is_some() && matches!(self.phase.get(), Phase::Greeting | Phase::Open) {
            self.queue.borrow_mut().push_mark(channel, seq);
            self.wake_writer();
        }
    }

    /// Queues a replayed event (never dropped) unless the connection is closing; a paused
    /// connection skips it like a live one.
    pub fn push_replay(&self, d: &Arc<Delivery>) {
        if !self.takes(d) {
            return;
        }
        self.queue.borrow_mut().push_replay(d.clone());
        self.wake_writer();
    }

    /// Offers a live event: a client that is behind may have it dropped or conflated by its
    /// priority and `coalesce_key` (see `delivery::queue`).
    pub fn push_event(&self, d: &Arc<Delivery>) {
        if !self.takes(d) {
            return;
        }
        let (pushed, behind) = {
            let mut q = self.queue.borrow_mut();
            (q.push_event(d), q.is_behind())
        };
        // Terminal output goes as critical (never dropped) but is not acknowledged.
        if self.acks.get()
            && d.priority == Priority::Critical
            && !terminal::is_output(&d.channel, &d.event)
        {
            let mut unacked = self.unacked.borrow_mut();
            if unacked.len() >= MAX_UNACKED {
                unacked.pop_front(); // bounded: the oldest gives up first
            }
            unacked.push_back((d.clone(), Instant::now(), 1));
        }
        if behind && self.behind_since.get().is_none() {
            self.behind_since.set(Some(Instant::now()));
        }
        if pushed != Pushed::Dropped {
            self.wake_writer();
        }
    }

    /// Bytes waiting to be written.
    pub fn queued_bytes(&self) -> usize {
        self.queue.borrow().bytes()
    }

    /// Forgets queued and unacknowledged events `gone` picks: nothing of an ended subscription
    /// or a revoked project goes out after the fact.
    pub fn purge(&self, gone: impl Fn(&Delivery) -> bool) {
        self.queue.borrow_mut().purge(&gone);
        self.unacked.borrow_mut().retain(|(d, _, _)| !gone(d));
    }

    /// `pause`: from now on (and of what is queued) events are skipped, and counted.
    fn pause(&self) {
        let mut skipped = self.paused.borrow_mut().take().unwrap_or_default();
        let counted = RefCell::new(&mut skipped);
        self.queue
            .borrow_mut()
            .purge(|d| counted.borrow_mut().skips(d));
        *self.paused.borrow_mut() = Some(skipped);
        self.push(Control::Paused.frame_in(self.encoding));
    }

    /// `resume`: live events flow again; the answer says what was skipped.
    fn resume(&self) {
        let skipped = self.paused.borrow_mut().take().unwrap_or_default();
        self.push(
            Control::Resumed {
                skipped: skipped.events,
                skipped_bytes: skipped.bytes,
            }
            .frame_in(self.encoding),
        );
    }

    /// The client acknowledged a critical event.
    fn ack(&self, channel: &str, seq: u64) {
        self.unacked
            .borrow_mut()
            .retain(|(d, _, _)| !(d.seq == seq && &*d.channel == channel));
    }

    /// Re-sends critical events not acknowledged within `timeout`, at most `max_sends` times.
    fn resend_unacked(&self, now: Instant, timeout: Duration, max_sends: u32) {
        if self.paused.borrow().is_some() {
            return; // a paused client gets nothing; the clock restarts at resume
        }
        let due: Vec<Bytes> = {
            let mut unacked = self.unacked.borrow_mut();
            unacked.retain(|(_, _, sends)| *sends < max_sends);
            unacked
                .iter_mut()
                .filter(|(_, at, _)| now.duration_since(*at) >= timeout)
                .map(|(d, at, sends)| {
                    *at = now;
                    *sends += 1;
                    d.frame_for(self.format())
                })
                .collect()
        };
        for frame in due {
            self.push(frame); // same bytes, same seq: the client can tell a repeat
        }
    }

    /// A client whose queue would pass `max_queue_bytes` is not keeping up whatever the
    /// priorities: its backlog is dropped and it is closed with 1008.
    fn over_byte_bound(&self, more: usize) -> bool {
        let queued = self.queue.borrow().bytes() + more;
        if queued <= self.max_queue_bytes {
            return false;
        }
        tracing::debug!(conn = self.id, queued, "send queue over its bound: closing");
        self.queue.borrow_mut().clear();
        self.close(1008, "too slow");
        true
    }

    /// After a write: once the client has caught up, tell it what it lost.
    fn after_write(&self) {
        let notices = {
            let mut q = self.queue.borrow_mut();
            if !q.is_behind() {
                self.behind_since.set(None);
            }
            q.take_dropped_if_drained()
        };
        for (channel, count) in notices {
            self.push(
                Control::Dropped {
                    channel: &channel,
                    count,
                }
                .frame_in(self.encoding),
            );
        }
    }

    fn wake_writer(&self) {
        self.kicked.set(true);
        if let Some(w) = self.writer.take() {
            w.wake();
        }
    }

    /// Queues a close frame; nothing more is queued after it.
    pub fn close(&self, code: u16, reason: &str) {
        if matches!(self.phase.get(), Phase::Greeting | Phase::Open) {
            self.closed_with
                .borrow_mut()
                .get_or_insert_with(|| (code, reason.to_owned()));
            self.open_now();
            let last = match self.sse {
                Some(_) => Control::Closed { code, reason }.frame_in(Encoding::Sse),
                None => codec::close_frame(code, reason),
            };
            self.queue.borrow_mut().push_control(last);
            self.phase.set(Phase::Closing {
                since: Instant::now(),
            });
            self.wake_writer();
        }
    }

    /// Sets the welcome frame and how many initial subscriptions it waits for.
    pub fn greet_after(&self, welcome: Bytes, initial: usize) {
        *self.welcome.borrow_mut() = Some(welcome);
        self.initial_pending.set(initial);
        if initial == 0 {
            self.open_now();
        }
    }

    /// One initial subscription is active.
    pub fn initial_subscribed(&self) {
        let left = self.initial_pending.get().saturating_sub(1);
        self.initial_pending.set(left);
        if left == 0 {
            self.open_now();
        }
    }

    fn open_now(&self) {
        if self.phase.get() == Phase::Greeting {
            if let Some(welcome) = self.welcome.borrow_mut().take() {
                self.queue.borrow_mut().push_control_front(welcome);
            }
            self.phase.set(Phase::Open);
            self.wake_writer();
        }
    }

    /// Cuts the socket: a pending read or write fails and both loops end.
    fn abort(&self) {
        if let Some(socket) = self.socket.upgrade() {
            socket.shutdown();
        }
    }

    /// Heartbeat, token-expiry and close-handshake deadlines; called by the core's sweep with
    /// the monotonic and the wall-clock time (Unix seconds).
    pub fn tick(&self, now: Instant, unix_secs: u64, core: &Core) {
        if let Some(since) = self.behind_since.get() {
            if now.duration_since(since) >= core.shared.settings.slow_client_timeout {
                self.behind_since.set(None);
                self.queue.borrow_mut().clear();
                self.close(1008, "too slow");
            }
        }
        if self.acks.get() {
            let s = &core.shared.settings;
            self.resend_unacked(now, s.ack_timeout, s.ack_max_sends);
        }
        if let Some(exp) = self.expires_at.get() {
            if unix_secs > exp.saturating_add(core.shared.auth.leeway_secs()) {
                self.expires_at.set(None);
                self.close(4001, "token expired");
            }
        }
        let phase = self.phase.get();
        let beat = match phase {
            Phase::Open => self
                .heartbeat
                .borrow_mut()
                .poll(now, &core.shared.settings.heartbeat),
            _ => Beat::Nothing,
        };
        match phase {
            Phase::Closing { since } if now.duration_since(since) >= CLOSE_GRACE => self.abort(),
            Phase::Open => match beat {
                Beat::Nothing => {}
                Beat::SendPing if self.sse.is_some() => {
                    // An SSE client cannot answer: the comment keeps proxies and the
                    // browser's idle timers happy, and a dead peer fails the write.
                    self.push(Bytes::from_static(b": ping\n\n"));
                    self.heartbeat.borrow_mut().handle_pong();
                }
                Beat::SendPing => self.push(Bytes::from_static(&[0x89, 0x00])),
                Beat::Dead => {
                    // The close frame goes out first; the close grace then cuts the socket
                    // if the peer is truly gone.
                    tracing::debug!(conn = self.id, "no pong: closing");
                    self.close(4002, "heartbeat timeout");
                }
            },
            _ => {}
        }
    }
}

/// Runs a Server-Sent Events stream until it ends: the writer drains the queue; the reader
/// only watches for the client going away (whatever it sends is dropped).
pub async fn run_sse(core: Rc<Core>, socket: Rc<Socket>, conn: Rc<Conn>) {
    let write_task = monoio::spawn({
        let (core, conn, socket) = (core.clone(), conn.clone(), socket.clone());
        async move {
            write_loop(core, conn.clone(), socket).await;
            conn.abort(); // the stream's end is the end of the TCP connection
        }
    });
    let mut sink = BytesMut::new();
    loop {
        if socket.stream().readable(false).await.is_err() {
            break;
        }
        match core.recv_into(socket.stream(), &mut sink) {
            Received::Closed => break,
            Received::Data | Received::NotReady => sink = BytesMut::new(),
        }
    }
    finish(&core, &conn, write_task).await;
}

/// Runs an upgraded connection until it ends. `leftover` holds bytes read after the handshake.
pub async fn run(core: Rc<Core>, socket: Rc<Socket>, conn: Rc<Conn>, leftover: BytesMut) {
    let write_task = monoio::spawn(write_loop(core.clone(), conn.clone(), socket.clone()));
    read_loop(&core, &conn, &socket, leftover).await;
    finish(&core, &conn, write_task).await;
}

/// The reader is done: forget the connection, let the writer flush what is queued (a close
/// frame, at least), but a peer that stopped reading does not get to hold the socket: after
/// the grace it is cut and the writer fails out.
async fn finish(core: &Core, conn: &Conn, mut write_task: monoio::task::JoinHandle<()>) {
    core.deregister(conn);
    conn.phase.set(Phase::Finished);
    conn.wake_writer();
    if monoio::time::timeout(CLOSE_GRACE, &mut write_task)
        .await
        .is_err()
    {
        conn.abort();
        write_task.await;
    }
}

async fn read_loop(core: &Core, conn: &Rc<Conn>, socket: &Socket, mut acc: BytesMut) {
    let mut decoder = Decoder::new(core.shared.settings.max_message_bytes);
    if conn.compress_over.is_some() {
        decoder = decoder.with_deflate();
    }
    let mut inflate_budget = InflateBudget::new(core.shared.settings.max_inflated_bytes_per_sec);
    loop {
        loop {
            match decoder.decode(&mut acc) {
                Ok(Some(event)) => {
                    let inflated = decoder.take_inflated_bytes();
                    if inflated > 0 && !inflate_budget.spend(Instant::now(), inflated) {
                        // Stop reading at once: whatever else it sent would be inflated too.
                        tracing::debug!(conn = conn.id, "inflate budget spent: closing");
                        conn.close(1008, "too much compressed input");
                        return discard_input(core, socket).await;
                    }
                    if handle_event(core, conn, event) == Flow::Stop {
                        return;
                    }
                }
                Ok(None) => break,
                Err(e) => {
                    tracing::debug!(conn = conn.id, error = e.reason(), "protocol error");
                    conn.close(e.close_code(), e.reason());
                    return discard_input(core, socket).await;
                }
            }
        }
        if acc.is_empty() && acc.capacity() > 0 {
            acc = BytesMut::new(); // hold no read-side memory between messages
        }
        // Wait for readiness holding no buffer, then drain the socket through the core's
        // scratch buffer: an idle connection owns no read buffer at all.
        if socket.stream().readable(false).await.is_err() {
            return;
        }
        match core.recv_into(socket.stream(), &mut acc) {
            Received::Data | Received::NotReady => {}
            Received::Closed => return,
        }
    }
}

/// After a violation the decoder reads no further, but the socket still does: what the peer
/// sends is dropped until it closes, or until the close grace cuts the socket. Closing with
/// unread input would reset the connection, and the peer could lose our close frame.
async fn discard_input(core: &Core, socket: &Socket) {
    loop {
        if socket.stream().readable(false).await.is_err() {
            return;
        }
        if core.recv_with(socket.stream(), usize::MAX, |_| {}) == Received::Closed {
            return;
        }
    }
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

#[derive(PartialEq, Eq)]
enum Flow {
    Continue,
    Stop,
}

fn handle_event(core: &Core, conn: &Rc<Conn>, event: Event) -> Flow {
    // Our close frame is out: only the peer's close matters now. Reading on until it comes
    // (or the close grace cuts the socket) lets the TCP connection end with a FIN; closing with
    // unread bytes would reset it, and the peer could lose our close frame.
    if matches!(conn.phase.get(), Phase::Closing { .. }) && !matches!(event, Event::Close { .. }) {
        return Flow::Continue;
    }
    if matches!(event, Event::Text(_) | Event::Binary(_)) {
        match conn.count_message(
            Instant::now(),
            core.shared.settings.max_client_messages_per_sec,
        ) {
            Pace::Fine => {}
            Pace::Warn => {
                let message = "too many messages: slow down or be disconnected";
                send_error(conn, ErrorCode::RateLimited, message, None);
                return Flow::Continue;
            }
            Pace::Ignore => return Flow::Continue,
            Pace::Flooding => {
                core.shared.audit(
                    "limit_hit",
                    serde_json::json!({"ip": conn.peer, "user_id": conn.claims.borrow().sub,
                        "connection_id": format!("{:x}", conn.id), "reason": "message flood"}),
                );
                conn.close(1008, "flooding");
                return Flow::Continue;
            }
        }
    }
    match event {
        Event::Text(text) => handle_message(core, conn, &text),
        // MessagePack clients may send their messages as MessagePack maps too.
        Event::Binary(bytes) if conn.encoding == Encoding::MessagePack => {
            match rmp_serde::from_slice::<serde_json::Value>(&bytes) {
                Ok(value) => handle_message(core, conn, value.to_string().as_bytes()),
                Err(e) => send_error(
                    conn,
                    ErrorCode::BadJson,
                    &format!("malformed MessagePack: {e}"),
                    None,
                ),
            }
        }
        Event::Binary(_) => send_error(
            conn,
            ErrorCode::BinaryNotSupported,
            "send client messages as JSON text frames",
            None,
        ),
        Event::Ping(payload) => conn.push(codec::pong_frame(&payload)),
        Event::Pong(_) => conn.heartbeat.borrow_mut().handle_pong(),
        Event::Close { code, .. } => {
            // Answer the peer's close with its own code, unless we started the handshake.
            let code = code.unwrap_or(1000);
            conn.closed_with
                .borrow_mut()
                .get_or_insert_with(|| (code, "closed by the client".into()));
            conn.close(code, "");
            return Flow::Stop;
        }
    }
    Flow::Continue
}

fn handle_message(core: &Core, conn: &Rc<Conn>, text: &[u8]) {
    let parsed = msg::parse_client_message(text);
    // Each channel of a message gets its own answer, so one message naming more channels than
    // a connection may hold gets one error instead of a flood of them.
    let max = core.shared.settings.max_channels_per_connection;
    if let Ok(ClientMessage::Subscribe { channels, .. } | ClientMessage::Unsubscribe { channels }) =
        &parsed
    {
        if channels.len() > max {
            let message = format!("a message may name at most {max} channels");
            return send_error(conn, ErrorCode::TooManyChannels, &message, None);
        }
    }
    match parsed {
        Err(e) => send_error(conn, e.code, &e.message, None),
        Ok(ClientMessage::Subscribe {
            channels,
            since,
            epoch,
        }) => {
            if !since.is_empty() && epoch.is_none() {
                let message = "\"since\" needs the \"epoch\" it came from (see welcome)";
                return send_error(conn, ErrorCode::BadMessage, message, None);
            }
            let same_epoch = epoch.as_deref() == Some(core.shared.epoch.as_str());
            for name in &channels {
                let resume = match since.get(name) {
                    None => Resume::Live,
                    Some(&seq) if same_epoch => Resume::After(seq),
                    Some(_) => Resume::OtherEpoch,
                };
                if let Err(e) = core.subscribe(conn, name, resume, false) {
                    send_error(conn, e.code, &e.message, Some(name));
                }
            }
        }
        Ok(ClientMessage::Unsubscribe { channels }) => {
            for name in &channels {
                if let Err(e) = core.unsubscribe(conn, name, None) {
                    send_error(conn, e.code, &e.message, Some(name));
                }
            }
        }
        Ok(ClientMessage::Refresh { token }) => refresh(core, conn, &token),
        Ok(ClientMessage::Ack { channel, seq }) => conn.ack(&channel, seq),
        Ok(ClientMessage::Pause) => conn.pause(),
        Ok(ClientMessage::Resume) => conn.resume(),
        Ok(ClientMessage::Filter {
            agent_ids,
            project_ids,
            event_types,
            search,
            regex,
            levels,
        }) => {
            if !conn.filter_update_allowed(Instant::now()) {
                let message = "at most 10 filter updates per second";
                return send_error(conn, ErrorCode::RateLimited, message, None);
            }
            let parsed = (|| {
                Ok::<_, FilterError>(Filter {
                    agent_ids: parse_list("agent_ids", agent_ids.iter().map(String::as_str))?,
                    project_ids: parse_list("project_ids", project_ids.iter().map(String::as_str))?,
                    event_types: parse_list("event_types", event_types.iter().map(String::as_str))?,
                    text: text_match(search.as_deref(), regex.as_deref())?,
                    levels: parse_list("levels", levels.iter().map(String::as_str))?,
                })
            })();
            match parsed {
                Err(e) => send_error(conn, ErrorCode::BadFilter, &e.to_string(), None),
                Ok(filter) => {
                    conn.push(
                        Control::Filtered {
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
                        .frame_in(conn.encoding),
                    );
                    *conn.filter.borrow_mut() = filter;
                }
            }
        }
    }
}

/// A fresh token extends the connection; its claims replace the old ones, and subscriptions
/// the new claims no longer allow end at once.
fn refresh(core: &Core, conn: &Rc<Conn>, token: &str) {
    let mut claims = match core.shared.auth.authenticate(token) {
        Ok(c) => c,
        Err(reason) => return send_error(conn, ErrorCode::BadToken, &reason, None),
    };
    if claims.sub != conn.claims.borrow().sub {
        let message = "the refresh token is for another user";
        return send_error(conn, ErrorCode::BadToken, message, None);
    }
    let exp = claims.exp;
    core.apply_overrides(&mut claims);
    *conn.claims.borrow_mut() = claims;
    conn.expires_at.set(exp);
    core.end_forbidden_subscriptions(conn, "forbidden");
    conn.push(Control::Refreshed { exp }.frame_in(conn.encoding));
}

fn send_error(conn: &Conn, code: ErrorCode, message: &str, channel: Option<&str>) {
    let channel = channel.map(crate::delivery::channel::shown);
    conn.push(
        Control::Error {
            code,
            message,
            channel: channel.as_deref(),
        }
        .frame_in(conn.encoding),
    );
}

/// What one wake of the writer collected: a frame alone goes out as it is (shared bytes, no
/// copy); a backlog is coalesced into one buffer.
#[derive(Default)]
struct Out {
    first: Option<Bytes>,
    many: Option<Vec<u8>>,
}

impl Out {
    fn is_empty(&self) -> bool {
        self.first.is_none() && self.many.is_none()
    }

    fn add(&mut self, frame: Bytes, spare: &mut Vec<u8>) {
        match (&mut self.many, self.first.take()) {
            (Some(buf), _) => buf.extend_from_slice(&frame),
            (None, None) => self.first = Some(frame),
            (None, Some(one)) => {
                let mut buf = std::mem::take(spare);
                buf.extend_from_slice(&one);
                buf.extend_from_slice(&frame);
                self.many = Some(buf);
            }
        }
    }
}

enum Batch {
    One(Bytes),
    Many(Vec<u8>),
    /// The rate limits hold the front event back for this long.
    Wait(Duration),
}

async fn write_loop(core: Rc<Core>, conn: Rc<Conn>, socket: Rc<Socket>) {
    let mut spare: Vec<u8> = Vec::new();
    let ttl = core.shared.settings.queue_ttl;
    loop {
        let batch = poll_fn(|cx| {
            let phase = conn.phase.get();
            if phase != Phase::Greeting {
                let now = Instant::now();
                let mut queue = conn.queue.borrow_mut();
                let mut mine = conn.bucket.borrow_mut();
                let mut cores = core.bucket.borrow_mut();
                let mut out = Out::default();
                let mut blocked = None;
                let format = conn.format();
                loop {
                    let next = match queue.next(now, ttl, &mut [&mut mine, &mut cores]) {
                        // Events may have expired on the way to an empty queue: say so.
                        Next::Empty if out.is_empty() => {
                            let notices = queue.take_dropped_if_drained();
                            if notices.is_empty() {
                                Next::Empty
                            } else {
                                for (channel, count) in notices {
                                    let notice = Control::Dropped {
                                        channel: &channel,
                                        count,
                                    };
                                    queue.push_control(notice.frame_in(conn.encoding));
                                }
                                continue;
                            }
                        }
                        other => other,
                    };
                    match next {
                        Next::Frame(frame) => {
                            // SSE: every message but a comment carries the stream's position.
                            if let Some(sse) = conn.sse.as_deref() {
                                if !frame.starts_with(b":") {
                                    out.add(sse.id_line(), &mut spare);
                                }
                            }
                            out.add(frame, &mut spare);
                        }
                        Next::Event(d) => {
                            if let Some(sse) = conn.sse.as_deref() {
                                sse.advance(&d.channel, d.seq);
                                out.add(sse.id_line(), &mut spare);
                            }
                            out.add(d.frame_in(format).clone(), &mut spare);
                        }
                        Next::Mark(channel, seq) => {
                            if let Some(sse) = conn.sse.as_deref() {
                                sse.advance(&channel, seq);
                            }
                        }
                        Next::Blocked(wait) => {
                            blocked = Some(wait);
                            break;
                        }
                        Next::Empty => break,
                    }
                    if out
                        .many
                        .as_ref()
                        .is_some_and(|b| b.len() >= MAX_WRITE_BATCH)
                    {
                        break;
                    }
                }
                if let Some(buf) = out.many {
                    return Poll::Ready(Some(Batch::Many(buf)));
                }
                if let Some(one) = out.first {
                    return Poll::Ready(Some(Batch::One(one)));
                }
                if let Some(wait) = blocked {
                    return Poll::Ready(Some(Batch::Wait(wait)));
                }
            }
            // An event stream has no close handshake: once its last message is out, it ends.
            let sse_done = conn.sse.is_some() && matches!(phase, Phase::Closing { .. });
            if phase == Phase::Finished || sse_done {
                return Poll::Ready(None);
            }
            conn.writer.set(Some(cx.waker().clone()));
            Poll::Pending
        })
        .await;
        let result = match batch {
            None => return,
            Some(Batch::Wait(wait)) => {
                // Until the wait is over, or until something new is queued (it may be free
                // to go: another channel, a control frame).
                conn.kicked.set(false);
                let pushed = poll_fn(|cx| {
                    if conn.kicked.get() {
                        Poll::Ready(())
                    } else {
                        conn.writer.set(Some(cx.waker().clone()));
                        Poll::Pending
                    }
                });
                let _ = monoio::time::timeout(wait, pushed).await;
                conn.after_write(); // events may have expired: tell the client
                continue;
            }
            Some(Batch::One(frame)) => socket.write_all(&frame).await,
            Some(Batch::Many(mut buf)) => {
                let res = socket.write_all(&buf).await;
                // Keep a small buffer for the next batch; an idle connection holds no big one.
                buf.clear();
                if buf.capacity() <= SPARE_WRITE_BUF {
                    spare = buf;
                }
                res
            }
        };
        if result.is_err() {
            conn.abort();
            return;
        }
        conn.after_write();
    }
}
