//! The IO driver of one connection: a `Session` (all of the connection's state and rules, in
//! `delivery::session`) and its socket. One task per connection reads; writing is the core's:
//! whatever a wake-up of the core queues for any connection is written by the core's flush,
//! one `send` per connection, after all of that wake-up's input was handled (see `Core::flush`).
//!
//! Invariant: a connection holds no buffer while idle: reads go through the core's scratch,
//! writes through the core's coalescing buffer; only what the kernel did not take of a write
//! (a slow client) stays with the connection, as `backlog`, until the socket takes it.

use std::cell::{Cell, RefCell};
use std::future::{poll_fn, Future};
use std::pin::Pin;
use std::rc::Rc;
use std::task::{Poll, Waker};
use std::time::Instant;

use bytes::{Bytes, BytesMut};

use crate::delivery::session::{Flow, Session, CLOSE_GRACE};
use crate::proto::msg::Encoding;
use crate::proto::ws::codec::Decoder;
use crate::proto::ws::deflate::InflateBudget;

use super::core::{Core, Received};
use super::socket::Socket;

/// Where a connection's writing stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Writing {
    /// Nothing scheduled; the next output schedules a flush.
    Idle,
    /// In the core's flush list.
    Scheduled,
    /// The kernel took only part of a write: waiting until the socket takes more.
    Blocked,
    /// Everything is written (or the socket failed): nothing more goes out.
    Over,
}

pub struct Conn {
    pub session: RefCell<Session>,
    /// The socket, until writing is over.
    socket: Cell<Option<Rc<Socket>>>,
    /// The rest of a write the kernel did not take yet.
    backlog: Cell<Option<Bytes>>,
    writing: Cell<Writing>,
    /// A rate-limit wake-up is due for this connection (see `Core::wake_at`).
    pub(super) timer_set: Cell<bool>,
    /// The reader, waiting for writing to be over (the end of a connection).
    over_waiter: Cell<Option<Waker>>,
}

impl Conn {
    pub fn new(session: Session, socket: Rc<Socket>) -> Conn {
        Conn::new_inner(session, Some(socket))
    }

    fn new_inner(session: Session, socket: Option<Rc<Socket>>) -> Conn {
        Conn {
            session: RefCell::new(session),
            socket: Cell::new(socket),
            backlog: Cell::new(None),
            writing: Cell::new(Writing::Idle),
            timer_set: Cell::new(false),
            over_waiter: Cell::new(None),
        }
    }

    /// A connection without a socket yet: an Engine.IO long-polling session, whose writes
    /// answer held GETs (see `runtime::polling`) until a WebSocket upgrade gives it one.
    pub fn polling(session: Session) -> Conn {
        Conn::new_inner(session, None)
    }

    /// The socket a polling session upgraded to.
    pub(super) fn set_socket(&self, socket: Rc<Socket>) {
        self.socket.set(Some(socket));
    }

    pub fn id(&self) -> u64 {
        self.session.borrow().id()
    }

    pub(super) fn writing(&self) -> Writing {
        self.writing.get()
    }

    pub(super) fn set_writing(&self, w: Writing) {
        self.writing.set(w);
    }

    pub(super) fn socket(&self) -> Option<Rc<Socket>> {
        let socket = self.socket.take();
        self.socket.set(socket.clone());
        socket
    }

    pub(super) fn take_backlog(&self) -> Option<Bytes> {
        self.backlog.take()
    }

    pub(super) fn set_backlog(&self, rest: Bytes) {
        self.backlog.set(Some(rest));
    }

    /// Writing is over: the socket is let go (it closes once the reader lets go too).
    pub(super) fn end_writing(&self) {
        self.writing.set(Writing::Over);
        self.backlog.take();
        self.socket.take();
        if let Some(w) = self.over_waiter.take() {
            w.wake();
        }
    }

    /// Cuts the socket both ways: the reader's next wait fails and writing is over.
    pub(super) fn cut(&self) {
        if let Some(socket) = self.socket() {
            socket.shutdown();
        }
        self.end_writing();
    }

    pub(super) async fn writing_over(&self) {
        poll_fn(|cx| {
            if self.writing.get() == Writing::Over {
                Poll::Ready(())
            } else {
                self.over_waiter.set(Some(cx.waker().clone()));
                Poll::Pending
            }
        })
        .await
    }
}

/// Runs an upgraded WebSocket connection until it ends. `leftover` holds bytes read after the
/// handshake.
pub async fn run(core: Rc<Core>, socket: Rc<Socket>, conn: Rc<Conn>, leftover: BytesMut) {
    if read_loop(&core, &conn, &socket, leftover).await == End::Violation {
        // After a violation the decoder reads no further, but the socket still does.
        Box::pin(discard_input(&core, &socket)).await;
    }
    finish(&core, &conn).await;
}

/// Runs a Server-Sent Events stream until it ends: the reader only watches for the client
/// going away (whatever it sends is dropped).
pub async fn run_sse(core: Rc<Core>, socket: Rc<Socket>, conn: Rc<Conn>) {
    discard_input(&core, &socket).await;
    finish(&core, &conn).await;
}

/// The reader is done: forget the connection, let the core flush what is queued (a close
/// frame, at least), but a peer that stopped reading does not get to hold the socket: after
/// the grace it is cut.
async fn finish(core: &Rc<Core>, conn: &Rc<Conn>) {
    core.deregister(conn);
    conn.session.borrow_mut().on_read_closed();
    core.schedule(conn);
    let over: Pin<Box<dyn Future<Output = _>>> =
        Box::pin(monoio::time::timeout(CLOSE_GRACE, conn.writing_over()));
    if over.await.is_err() {
        conn.cut();
    }
}

#[derive(PartialEq, Eq)]
enum End {
    /// The peer closed or the socket failed.
    Closed,
    /// A protocol violation or an exhausted budget: our close frame is queued.
    Violation,
}

async fn read_loop(core: &Rc<Core>, conn: &Rc<Conn>, socket: &Socket, mut acc: BytesMut) -> End {
    let settings = &core.shared.settings;
    let max = match conn.session.borrow().encoding() {
        Encoding::SocketIo => settings.socketio_max_payload,
        _ => settings.max_message_bytes,
    };
    let mut decoder = Decoder::new(max);
    // Only a connection that negotiated compression can inflate, so only it holds a budget.
    let mut inflate_budget = None;
    if conn.session.borrow().format().compress_over.is_some() {
        decoder = decoder.with_deflate();
        let budget = InflateBudget::new(settings.max_inflated_bytes_per_sec);
        inflate_budget = Some(Box::new(budget));
    }
    loop {
        loop {
            match decoder.decode(&mut acc) {
                Ok(Some(event)) => {
                    let inflated = decoder.take_inflated_bytes();
                    let spent = |b: &mut Box<InflateBudget>| b.spend(Instant::now(), inflated);
                    if inflated > 0 && !inflate_budget.as_mut().is_some_and(spent) {
                        // Stop reading at once: whatever else it sent would be inflated too.
                        tracing::debug!(conn = conn.id(), "inflate budget spent: closing");
                        core.close(conn, 1008, "too much compressed input");
                        return End::Violation;
                    }
                    if core.on_ws_event(conn, event) == Flow::Stop {
                        return End::Closed;
                    }
                }
                Ok(None) => break,
                Err(e) => {
                    tracing::debug!(conn = conn.id(), error = e.reason(), "protocol error");
                    core.close(conn, e.close_code(), e.reason());
                    return End::Violation;
                }
            }
        }
        if acc.is_empty() && acc.capacity() > 0 {
            acc = BytesMut::new(); // hold no read-side memory between messages
        }
        // Wait for readiness holding no buffer, then drain the socket through the core's
        // scratch buffer: an idle connection owns no read buffer at all.
        if socket.stream().readable(false).await.is_err() {
            return End::Closed;
        }
        match core.recv_into(socket.stream(), &mut acc) {
            Received::Data | Received::NotReady => {}
            Received::Closed => return End::Closed,
        }
    }
}

/// What the peer sends is dropped until it closes, or until the close grace cuts the socket.
/// Closing with unread input would reset the connection, and the peer could lose our close
/// frame.
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

/// Bytes in the future of a connection's task (for the size budget test).
#[cfg(test)]
pub(crate) fn task_size() -> usize {
    fn size<A, B, C, D, F: Future>(_: fn(A, B, C, D) -> F) -> usize {
        std::mem::size_of::<F>()
    }
    size(run)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The future of a connection's task (its reader, and the end of the connection), which
    /// every idle connection holds: today 392 bytes. monoio adds 40 bytes of header and join
    /// waker, so up to 408 the task is one 448-byte allocator block (the next is 512). Cold
    /// paths (discarding input after a violation, the close grace's timer, the inflate budget
    /// of a compressed connection) are boxed so that they cost nothing until used.
    const TASK_BUDGET_BYTES: usize = 408;
    /// `Conn`: the session and the socket's write state, today 432 bytes: with its `Rc` counts
    /// a 448-byte allocator block (the next one is 512).
    const CONN_BUDGET_BYTES: usize = 432;

    #[test]
    fn an_idle_connection_stays_within_its_byte_budget() {
        let task = task_size();
        assert!(
            task <= TASK_BUDGET_BYTES,
            "a connection's task future is {task} bytes, over its budget of \
             {TASK_BUDGET_BYTES}: something held across an await in `run`/`read_loop`/`finish` \
             grew (a timer or a buffer held inline belongs in a Box, or in the core)"
        );
        let conn = std::mem::size_of::<Conn>();
        assert!(
            conn <= CONN_BUDGET_BYTES,
            "`Conn` is {conn} bytes, over its budget of {CONN_BUDGET_BYTES}: see which field of \
             `Conn` or `Session` grew (state few connections use belongs in `Cold`)"
        );
    }
}
