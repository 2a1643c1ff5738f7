//! Engine.IO long-polling sessions of one core: a connection whose writes go out as the
//! answers to held GETs instead of onto a socket of its own.
//!
//! A session lives on the core that answered its handshake (its id names the core, so a
//! request reaching another core is handed over here). Before its CONNECT it is only an
//! entry here (a secret key, an outbox, a deadline); after, it is a `Conn` like any other
//! whose session speaks Socket.IO, registered, counted and drained like a WebSocket's. What
//! the session writes waits in its send queue until a GET is held; the flush then answers
//! that GET with every queued packet (up to `MAX_BODY_BYTES`), the shared frames' payloads
//! joined by the record separator, no packet re-encoded. A GET whose client went away is
//! noticed (its answer channel is cancelled) and what it would have carried waits for the
//! next one. A WebSocket upgrade hands the session its socket: from the client's upgrade
//! packet on it is an ordinary WebSocket connection.
//!
//! Bounds: at most `MAX_UNCONNECTED` sessions per core wait for their CONNECT at once (and
//! the per-IP share of pending sockets from one address), each until the head deadline, with
//! at most `MAX_REFUSED` refused CONNECTs; one GET held per session (a second one is an error
//! that ends it); one GET answer carries at most `MAX_BODY_BYTES` of packets.

use std::cell::{Cell, RefCell};
use std::collections::{HashMap, VecDeque};
use std::future::{poll_fn, Future};
use std::net::IpAddr;
use std::pin::Pin;
use std::rc::Rc;
use std::task::Poll as TaskPoll;
use std::time::Instant;

use bytes::{Bytes, BytesMut};
use futures_channel::oneshot;

use crate::delivery::session::{Ctx, Transmit};

use super::conn::{self, Conn};
use super::core::Core;
use super::socket::Socket;

/// Sessions per core that may wait for their CONNECT at once.
pub const MAX_UNCONNECTED: usize = 4096;
/// Most bytes of packets one GET answer carries (the rest waits for the next GET).
const MAX_BODY_BYTES: usize = 256 * 1024;
/// CONNECTs one session may have refused; the next refusal ends it.
pub const MAX_REFUSED: u8 = 3;

/// This core's polling sessions.
#[derive(Default)]
pub struct Polls {
    map: RefCell<HashMap<u64, Entry>>,
    /// Sessions waiting for their CONNECT, in all and by client address.
    unconnected: Cell<usize>,
    per_ip: RefCell<HashMap<IpAddr, u32>>,
}

impl Polls {
    fn count(&self, ip: IpAddr) {
        self.unconnected.set(self.unconnected.get() + 1);
        *self.per_ip.borrow_mut().entry(ip).or_default() += 1;
    }

    /// An unconnected session connected or went.
    fn uncount(&self, ip: IpAddr) {
        self.unconnected
            .set(self.unconnected.get().saturating_sub(1));
        let mut per_ip = self.per_ip.borrow_mut();
        if let Some(n) = per_ip.get_mut(&ip) {
            *n -= 1;
            if *n == 0 {
                per_ip.remove(&ip);
            }
        }
    }
}

struct Entry {
    /// The client's address (for the per-address bound before the CONNECT).
    ip: IpAddr,
    /// CONNECTs refused so far.
    refused: u8,
    /// The secret half of the session id: a request must present it.
    key: Box<str>,
    /// Set once the CONNECT opened the session.
    conn: Option<Rc<Conn>>,
    /// Packets (server frames) for the next GET: a CONNECT_ERROR, or what a GET that went
    /// away would have carried.
    outbox: VecDeque<Bytes>,
    /// The GET being held.
    held: Option<oneshot::Sender<Vec<u8>>>,
    /// Until its CONNECT: when the entry goes.
    expires: Instant,
    /// A CONNECT is being checked (one at a time).
    connecting: bool,
    /// The session's task, waiting for a WebSocket to move to.
    upgrade: Option<oneshot::Sender<Upgraded>>,
    /// A WebSocket probed: the GET being held is answered with a noop and no packet goes
    /// out any more until the upgrade is done.
    probed: bool,
    /// A probe that came before the CONNECT opened the session (a client sends both at
    /// once): told when it did; dropped if the CONNECT is refused or the entry goes.
    probe_waiting: Option<oneshot::Sender<()>>,
}

/// What a WebSocket probing a session finds.
pub enum Probe {
    /// The session is open and now probed: its held GET got a noop.
    Ready,
    /// Its CONNECT has not opened it yet: the receiver fires once it has (and fails if the
    /// CONNECT is refused, the session goes, or another probe takes the wait over).
    NotYet(oneshot::Receiver<()>),
    /// No such session.
    Unknown,
}

/// A probed WebSocket the session moves to.
pub struct Upgraded {
    pub socket: Rc<Socket>,
    pub leftover: BytesMut,
}

/// Why a request names no session it may use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PollError {
    /// No such session (ended, expired, or a wrong key).
    Unknown,
    /// A GET while another is held: the session ends.
    Overlap,
    /// Too many sessions wait for their CONNECT on this core.
    Full,
    /// Too many of them come from the client's address.
    PerIp,
}

/// What a GET gets.
pub enum Answer {
    Now(Vec<u8>),
    /// Held until the session has something to say; `connected`: the session is a
    /// connection (its GET is no pending socket while held).
    Later {
        answer: oneshot::Receiver<Vec<u8>>,
        connected: bool,
    },
}

/// Where the session a request names stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Standing {
    Unknown,
    /// Waiting for its CONNECT.
    Unconnected,
    Connected,
}

/// Where an unconnected session stands for a CONNECT.
pub enum Connecting {
    /// Go on: check the token.
    Check,
    /// Connected already, or a CONNECT is being checked: nothing to do.
    Busy,
}

impl Core {
    /// How many cores the node runs.
    pub fn cores(&self) -> usize {
        self.shared.mesh.cores()
    }

    /// Runs `work` on core `home` (at once if that is this one): where a request for a
    /// polling session is carried out. None if it did not answer.
    pub async fn at_home<R: Send + 'static>(
        self: &Rc<Self>,
        home: usize,
        work: impl FnOnce(Rc<Core>, oneshot::Sender<R>) + Send + 'static,
    ) -> Option<R> {
        let (tx, rx) = oneshot::channel();
        if home == self.id {
            work(self.clone(), tx);
        } else {
            let work = Box::new(move |core| work(core, tx));
            self.shared.mesh.send(home, super::mesh::MeshMsg::Run(work));
        }
        rx.await.ok()
    }

    /// A new session waiting for its CONNECT, from `ip` (at most `per_ip` of them from one
    /// address on this core; 0: no bound): its id.
    pub fn poll_open(
        &self,
        key: Box<str>,
        expires: Instant,
        ip: IpAddr,
        per_ip: u32,
    ) -> Result<u64, PollError> {
        if self.polls.unconnected.get() >= MAX_UNCONNECTED {
            return Err(PollError::Full);
        }
        let from_ip = self.polls.per_ip.borrow().get(&ip).copied().unwrap_or(0);
        if per_ip > 0 && from_ip >= per_ip {
            return Err(PollError::PerIp);
        }
        let id = self.next_conn_id();
        self.polls.count(ip);
        self.polls.map.borrow_mut().insert(
            id,
            Entry {
                ip,
                refused: 0,
                key,
                conn: None,
                outbox: VecDeque::new(),
                held: None,
                expires,
                connecting: false,
                upgrade: None,
                probed: false,
                probe_waiting: None,
            },
        );
        Ok(id)
    }

    fn poll_entry<R>(
        &self,
        id: u64,
        key: &str,
        f: impl FnOnce(&mut Entry) -> R,
    ) -> Result<R, PollError> {
        let mut map = self.polls.map.borrow_mut();
        match map.get_mut(&id) {
            Some(e) if *e.key == *key => Ok(f(e)),
            _ => Err(PollError::Unknown),
        }
    }

    /// The session's connection, once its CONNECT opened it.
    pub fn poll_conn(&self, id: u64, key: &str) -> Result<Option<Rc<Conn>>, PollError> {
        self.poll_entry(id, key, |e| e.conn.clone())
    }

    /// Whether the session exists, and is connected.
    pub fn poll_standing(&self, id: u64, key: &str) -> Standing {
        match self.poll_entry(id, key, |e| e.conn.is_some()) {
            Ok(true) => Standing::Connected,
            Ok(false) => Standing::Unconnected,
            Err(_) => Standing::Unknown,
        }
    }

    /// A CONNECT arrived: whether to check it.
    pub fn poll_connecting(&self, id: u64, key: &str) -> Result<Connecting, PollError> {
        self.poll_entry(id, key, |e| {
            if e.conn.is_some() || e.connecting {
                Connecting::Busy
            } else {
                e.connecting = true;
                Connecting::Check
            }
        })
    }

    /// A CONNECT was refused: `frame` (its CONNECT_ERROR) waits for the next GET; past
    /// `MAX_REFUSED` refusals the session ends instead.
    pub fn poll_refused(&self, id: u64, key: &str, frame: Bytes) {
        let over = self.poll_entry(id, key, |e| {
            e.connecting = false;
            e.probe_waiting = None;
            e.refused += 1;
            if e.refused > MAX_REFUSED {
                return true;
            }
            e.outbox.push_back(frame);
            answer_held(e);
            false
        });
        if over == Ok(true) {
            self.poll_end(id, None);
        }
    }

    /// The CONNECT opened the session as `conn` (registered, welcome queued).
    pub fn poll_connected(&self, id: u64, key: &str, conn: Rc<Conn>) {
        let (tx, rx) = oneshot::channel();
        let attached = self.poll_entry(id, key, |e| {
            e.connecting = false;
            e.conn = Some(conn.clone());
            e.upgrade = Some(tx);
            if let Some(probe) = e.probe_waiting.take() {
                let _ = probe.send(());
            }
            e.ip
        });
        match attached {
            Ok(ip) => self.polls.uncount(ip),
            // Gone while the CONNECT was checked (expired, or closed): so is the session.
            Err(_) => return conn.cut(),
        }
        let Some(core) = self.me.upgrade() else {
            return;
        };
        monoio::spawn(run(core, conn.clone(), id, rx));
        self.schedule(&conn);
    }

    /// A GET: answered now if anything waits, else held until something does.
    pub fn poll_get(&self, id: u64, key: &str) -> Result<Answer, PollError> {
        let mut map = self.polls.map.borrow_mut();
        let Some(e) = map.get_mut(&id).filter(|e| *e.key == *key) else {
            return Err(PollError::Unknown);
        };
        if e.held.as_ref().is_some_and(|h| !h.is_canceled()) {
            // One GET at a time: the reference server ends such a session too.
            e.held = None;
            let conn = e.conn.clone();
            drop(map);
            self.poll_end(id, conn);
            return Err(PollError::Overlap);
        }
        if e.probed {
            return Ok(Answer::Now(b"6".to_vec())); // upgrading: nothing goes this way
        }
        if !e.outbox.is_empty() {
            let mut frames = Vec::new();
            let mut size = 0;
            while size < MAX_BODY_BYTES {
                let Some(frame) = e.outbox.pop_front() else {
                    break;
                };
                size += frame.len();
                frames.push(frame);
            }
            return Ok(Answer::Now(payload(&frames).0));
        }
        let (tx, rx) = oneshot::channel();
        e.held = Some(tx);
        let conn = e.conn.clone();
        drop(map);
        let connected = conn.is_some();
        if let Some(conn) = conn {
            self.schedule_always(&conn);
        }
        Ok(Answer::Later {
            answer: rx,
            connected,
        })
    }

    /// The client closed the session (a close packet), or broke it: it ends.
    pub fn poll_close(&self, id: u64, key: &str) {
        let conn = self.poll_entry(id, key, |e| e.conn.clone());
        if let Ok(conn) = conn {
            self.poll_end(id, conn);
        }
    }

    fn poll_end(&self, id: u64, conn: Option<Rc<Conn>>) {
        match conn {
            Some(conn) => {
                self.close(&conn, 1000, "");
                conn.end_writing(); // nobody will fetch the close: the session is over
            }
            None => {
                let gone = self.polls.map.borrow_mut().remove(&id);
                if let Some(e) = gone.filter(|e| e.conn.is_none()) {
                    self.polls.uncount(e.ip);
                }
            }
        }
    }

    /// A WebSocket sent the probe: if the session is open, the held GET gets a noop and
    /// nothing more goes out until the upgrade packet. Before the CONNECT opened it, the
    /// session is left as it is (its GETs still carry the CONNECT's answer) and the probe
    /// is told when to ask again.
    pub fn poll_probed(&self, id: u64, key: &str) -> Probe {
        self.poll_entry(id, key, |e| {
            if e.conn.is_none() {
                let (tx, rx) = oneshot::channel();
                e.probe_waiting = Some(tx);
                return Probe::NotYet(rx);
            }
            e.probed = true;
            if let Some(held) = e.held.take() {
                let _ = held.send(b"6".to_vec());
            }
            Probe::Ready
        })
        .unwrap_or(Probe::Unknown)
    }

    /// The probed WebSocket went away before the upgrade: polling goes on.
    pub fn poll_unprobed(&self, id: u64, key: &str) {
        let conn = self.poll_entry(id, key, |e| {
            e.probed = false;
            e.conn.clone()
        });
        if let Ok(Some(conn)) = conn {
            self.schedule_always(&conn);
        }
    }

    /// The client sent the upgrade packet on the probed socket: the session moves to it.
    pub fn poll_upgrade(&self, id: u64, key: &str, upgraded: Upgraded) -> bool {
        match self.poll_entry(id, key, |e| e.upgrade.take()) {
            Ok(Some(tx)) => tx.send(upgraded).is_ok(),
            _ => false,
        }
    }

    /// Unconnected sessions past their deadline go.
    pub(super) fn poll_sweep(&self, now: Instant) {
        let mut gone = Vec::new();
        self.polls.map.borrow_mut().retain(|_, e| {
            let keep = e.conn.is_some() || e.connecting || e.expires > now;
            if !keep {
                gone.push(e.ip);
            }
            keep
        });
        for ip in gone {
            self.polls.uncount(ip);
        }
    }

    /// A polling connection's turn in the flush: answers the held GET with what is queued.
    pub(super) fn write_polling(&self, conn: &Rc<Conn>, ctx: &Ctx) {
        let id = conn.id();
        let mut map = self.polls.map.borrow_mut();
        let Some(e) = map.get_mut(&id) else {
            return;
        };
        if e.probed {
            return; // the WebSocket takes over
        }
        let Some(held) = e.held.take().filter(|h| !h.is_canceled()) else {
            return;
        };
        let mut frames: Vec<Bytes> = e.outbox.drain(..).collect();
        let mut size: usize = frames.iter().map(Bytes::len).sum();
        let mut last = Transmit::Idle;
        {
            let mut session = conn.session.borrow_mut();
            let mut bucket = self.bucket.borrow_mut();
            while size < MAX_BODY_BYTES {
                match session.poll_transmit(ctx, &mut bucket) {
                    Transmit::Frame { frame, .. } => {
                        size += frame.len();
                        frames.push(frame);
                    }
                    other => {
                        last = other;
                        break;
                    }
                }
            }
            if !frames.is_empty() {
                session.on_written();
            }
        }
        if frames.is_empty() && !matches!(last, Transmit::Done) {
            e.held = Some(held);
            drop(map);
            if let Transmit::Wait(wait) = last {
                self.wake_at(conn, ctx.now + wait);
            }
            return;
        }
        let (body, closed) = payload(&frames);
        if let Err(body) = held.send(body) {
            // The GET went away meanwhile: these packets go with the next one.
            drop(body);
            e.outbox.extend(frames);
            return;
        }
        drop(map);
        if closed || matches!(last, Transmit::Done) {
            conn.end_writing();
        } else if size >= MAX_BODY_BYTES {
            self.schedule_always(conn);
        } else if let Transmit::Wait(wait) = last {
            self.wake_at(conn, ctx.now + wait);
        }
    }
}

/// Answers the held GET with the outbox, if both are there.
fn answer_held(e: &mut Entry) {
    if e.outbox.is_empty() {
        return;
    }
    if let Some(held) = e.held.take().filter(|h| !h.is_canceled()) {
        let frames: Vec<Bytes> = e.outbox.drain(..).collect();
        if let Err(body) = held.send(payload(&frames).0) {
            drop(body);
            e.outbox.extend(frames);
        }
    }
}

/// A polling body from server frames: each text frame's payload a record, a close frame the
/// close packet (and true: the session is over). One `Bytes` may hold several frames.
fn payload(frames: &[Bytes]) -> (Vec<u8>, bool) {
    let mut out = Vec::with_capacity(frames.iter().map(Bytes::len).sum());
    let mut closed = false;
    for frame in frames {
        let mut rest: &[u8] = frame;
        while rest.len() >= 2 {
            let (opcode, len, header) = match rest[1] & 0x7f {
                126 if rest.len() >= 4 => (
                    rest[0] & 0x0f,
                    u16::from_be_bytes([rest[2], rest[3]]) as usize,
                    4,
                ),
                127 if rest.len() >= 10 => {
                    let mut n = [0u8; 8];
                    n.copy_from_slice(&rest[2..10]);
                    (rest[0] & 0x0f, u64::from_be_bytes(n) as usize, 10)
                }
                n @ 0..=125 => (rest[0] & 0x0f, n as usize, 2),
                _ => break,
            };
            let Some(body) = rest.get(header..header + len) else {
                break;
            };
            let record: &[u8] = match opcode {
                0x1 => body,
                0x8 => {
                    closed = true;
                    b"1"
                }
                _ => &[], // WebSocket pings and pongs have no polling form
            };
            if !record.is_empty() {
                if !out.is_empty() {
                    out.push(0x1e);
                }
                out.extend_from_slice(record);
            }
            rest = &rest[header + len..];
        }
    }
    (out, closed)
}

/// A polling session's task: it ends with the session, or moves it to a WebSocket.
async fn run(core: Rc<Core>, conn: Rc<Conn>, id: u64, upgrade: oneshot::Receiver<Upgraded>) {
    let mut upgrade = Some(upgrade);
    let mut over: Pin<Box<dyn Future<Output = ()>>> = Box::pin(conn.writing_over());
    let moved = poll_fn(|cx| {
        if over.as_mut().poll(cx).is_ready() {
            return TaskPoll::Ready(None);
        }
        if let Some(rx) = upgrade.as_mut() {
            match Pin::new(rx).poll(cx) {
                TaskPoll::Ready(Ok(u)) => return TaskPoll::Ready(Some(u)),
                TaskPoll::Ready(Err(_)) => upgrade = None,
                TaskPoll::Pending => {}
            }
        }
        TaskPoll::Pending
    })
    .await;
    drop(over);
    core.polls.map.borrow_mut().remove(&id);
    match moved {
        None => {
            core.deregister(&conn);
            conn.session.borrow_mut().on_read_closed();
        }
        Some(Upgraded { socket, leftover }) => {
            conn.set_socket(socket.clone());
            core.schedule_always(&conn);
            conn::run(core, socket, conn, leftover).await;
        }
    }
}
