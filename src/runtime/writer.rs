//! The core's write path: one flush per wake-up writes what every connection has queued.
//!
//! A connection that gets output (a delivery, an answer, a notice) is put on the core's flush
//! list once; the flush task runs after the tasks and mesh messages of the current wake-up
//! have been handled, so a burst of deliveries to one connection leaves in one `send`, and no
//! connection has a writer task of its own to wake, poll and park. The frames of one
//! connection are coalesced in the core's buffer (a single frame goes as it is, shared, not
//! copied); what the kernel does not take stays with the connection (`backlog`) and a small
//! task waits for the socket to take more. Rate limits that hold a connection back set one
//! entry in the core's timer heap; one timer task serves them all.
//!
//! Bound: a flush writes at most `MAX_WRITE_BATCH` bytes per connection before it moves on to
//! the next one (the rest waits for the next turn), so one fast-filling queue cannot hold up
//! the others.

use std::cell::{Cell, RefCell};
use std::cmp::Reverse;
use std::collections::{BinaryHeap, VecDeque};
use std::future::{poll_fn, Future};
use std::io;
use std::rc::{Rc, Weak};
use std::task::{Poll, Waker};
use std::time::Instant;

use bytes::Bytes;

use crate::delivery::session::{Ctx, Transmit};

use super::conn::{Conn, Writing};
use super::core::Core;
use super::socket::Socket;

/// Most bytes one connection writes per flush.
const MAX_WRITE_BATCH: usize = 256 * 1024;
/// Connections one turn of the flush task writes to before the core's other tasks (a publish
/// waiting for its seq, a subscribe) get a turn.
const FLUSH_TURN: usize = 256;
/// Largest coalescing buffer the core keeps between flushes.
const KEPT_BUFFER: usize = 1024 * 1024;

/// A connection's rate-limit wake-up.
type Due = crate::delivery::deadline::Due<Instant, Weak<Conn>>;

#[derive(Default)]
pub struct Writer {
    /// Connections with output, in the order they got it.
    scheduled: RefCell<VecDeque<Rc<Conn>>>,
    /// The flush task, waiting for `scheduled` to fill.
    flusher: Cell<Option<Waker>>,
    /// The coalescing buffer every connection's writes go through.
    buf: RefCell<Vec<u8>>,
    timers: RefCell<BinaryHeap<Reverse<Due>>>,
    /// The timer task, waiting for an earlier deadline than it sleeps to.
    timer_task: Cell<Option<Waker>>,
}

/// What one connection's turn in a flush collected.
enum Out {
    Nothing,
    One(Bytes),
    /// Coalesced in the core's buffer.
    Many,
}

impl Core {
    /// Puts the connection on the flush list if it has something to write.
    pub fn schedule(&self, conn: &Rc<Conn>) {
        if conn.session.borrow().wants_transmit() {
            self.schedule_always(conn);
        }
    }

    /// Writes what the connection has queued now, unless it waits for its turn in the flush
    /// list or for its socket.
    pub(super) fn write_now(&self, conn: &Rc<Conn>, ctx: &Ctx) {
        if conn.writing() == Writing::Idle {
            self.write_out(conn, ctx);
        }
    }

    /// Writes what the first `FLUSH_TURN` scheduled connections have queued.
    fn flush(&self) {
        let ctx = self.ctx(Instant::now());
        for _ in 0..FLUSH_TURN {
            let Some(conn) = self.writer.scheduled.borrow_mut().pop_front() else {
                break;
            };
            if conn.writing() == Writing::Scheduled {
                conn.set_writing(Writing::Idle);
                self.write_out(&conn, &ctx);
            }
        }
    }

    /// One connection's turn: its backlog first, then what the session gives, coalesced.
    fn write_out(&self, conn: &Rc<Conn>, ctx: &Ctx) {
        let now = ctx.now;
        let Some(socket) = conn.socket() else {
            if conn.writing() != Writing::Over {
                self.write_polling(conn, ctx);
            }
            return;
        };
        if let Some(rest) = conn.take_backlog() {
            match socket.send(&rest) {
                Ok(n) if n == rest.len() => {}
                Ok(n) => return self.wait_writable(conn, socket, rest.slice(n..)),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    return self.wait_writable(conn, socket, rest)
                }
                Err(_) => return conn.cut(),
            }
            conn.session.borrow_mut().on_written();
        }
        let mut written = 0;
        loop {
            let mut buf = self.writer.buf.borrow_mut();
            buf.clear();
            let (out, last) = {
                let mut session = conn.session.borrow_mut();
                let mut bucket = self.bucket.borrow_mut();
                let mut out = Out::Nothing;
                let last = loop {
                    match session.poll_transmit(ctx, &mut bucket) {
                        Transmit::Frame { prefix, frame } => {
                            for frame in prefix.into_iter().chain([frame]) {
                                out = match out {
                                    Out::Nothing => Out::One(frame),
                                    Out::One(one) => {
                                        buf.extend_from_slice(&one);
                                        buf.extend_from_slice(&frame);
                                        Out::Many
                                    }
                                    Out::Many => {
                                        buf.extend_from_slice(&frame);
                                        Out::Many
                                    }
                                };
                            }
                            if buf.len() >= MAX_WRITE_BATCH {
                                break Transmit::Idle;
                            }
                        }
                        other => break other,
                    }
                };
                (out, last)
            };
            let data: &[u8] = match &out {
                Out::Nothing => {
                    drop(buf);
                    match last {
                        Transmit::Done => {
                            if conn.session.borrow().is_sse() {
                                conn.cut(); // an event stream's end is the TCP connection's
                            } else {
                                conn.end_writing();
                            }
                        }
                        Transmit::Wait(wait) => self.wake_at(conn, now + wait),
                        Transmit::Idle | Transmit::Frame { .. } => {}
                    }
                    return;
                }
                Out::One(frame) => frame,
                Out::Many => &buf,
            };
            match socket.send(data) {
                Ok(n) if n == data.len() => {
                    written += n;
                }
                Ok(n) => {
                    let rest = match out {
                        Out::One(frame) => frame.slice(n..),
                        _ => Bytes::copy_from_slice(&buf[n..]),
                    };
                    drop(buf);
                    return self.wait_writable(conn, socket, rest);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    let rest = match out {
                        Out::One(frame) => frame,
                        _ => Bytes::copy_from_slice(&buf),
                    };
                    drop(buf);
                    return self.wait_writable(conn, socket, rest);
                }
                Err(_) => {
                    drop(buf);
                    return conn.cut();
                }
            }
            if buf.capacity() > KEPT_BUFFER {
                *buf = Vec::new();
            }
            drop(buf);
            conn.session.borrow_mut().on_written();
            if written >= MAX_WRITE_BATCH {
                // Its turn is over; the rest goes in the next flush.
                return self.schedule(conn);
            }
            if let Transmit::Wait(wait) = last {
                // Written what the limits let through; the rest when they allow.
                return self.wake_at(conn, now + wait);
            }
        }
    }

    /// The kernel took part of a write: keep the rest, and go on once the socket takes more.
    fn wait_writable(&self, conn: &Rc<Conn>, socket: Rc<Socket>, rest: Bytes) {
        conn.set_backlog(rest);
        conn.set_writing(Writing::Blocked);
        let Some(core) = self.me.upgrade() else {
            return; // the core is going away
        };
        let conn = conn.clone();
        monoio::spawn(async move {
            let ready = socket.stream().writable(false).await;
            drop(socket);
            if conn.writing() != Writing::Blocked {
                return; // cut meanwhile
            }
            if ready.is_err() {
                return conn.cut();
            }
            conn.set_writing(Writing::Idle);
            core.schedule_always(&conn);
        });
    }

    /// Puts the connection on the flush list unless it is on it or waits for its socket (a
    /// backlog or an elapsed rate-limit wait may need a flush with nothing new queued).
    pub(super) fn schedule_always(&self, conn: &Rc<Conn>) {
        if conn.writing() == Writing::Idle {
            conn.set_writing(Writing::Scheduled);
            self.writer.scheduled.borrow_mut().push_back(conn.clone());
            if let Some(w) = self.writer.flusher.take() {
                w.wake();
            }
        }
    }

    /// Flushes the connection again at `at` (a rate limit's wait is over).
    pub(super) fn wake_at(&self, conn: &Rc<Conn>, at: Instant) {
        if conn.timer_set.replace(true) {
            return; // one wake-up pending is enough: the flush then asks again
        }
        let mut timers = self.writer.timers.borrow_mut();
        let earliest = timers.peek().is_none_or(|Reverse(d)| at < d.at);
        timers.push(Reverse(Due {
            at,
            item: Rc::downgrade(conn),
        }));
        if earliest {
            if let Some(w) = self.writer.timer_task.take() {
                w.wake();
            }
        }
    }
}

/// The core's flush task: runs whenever connections were scheduled.
pub async fn flush_loop(core: Rc<Core>) {
    loop {
        poll_fn(|cx| {
            if core.writer.scheduled.borrow().is_empty() {
                core.writer.flusher.set(Some(cx.waker().clone()));
                Poll::Pending
            } else {
                Poll::Ready(())
            }
        })
        .await;
        core.flush();
        super::worker::yield_now().await;
    }
}

/// The core's timer task: schedules connections whose rate-limit wait is over.
pub async fn timer_loop(core: Rc<Core>) {
    loop {
        let next = core.writer.timers.borrow().peek().map(|Reverse(d)| d.at);
        let now = Instant::now();
        match next {
            Some(at) if at <= now => {
                let Some(Reverse(due)) = core.writer.timers.borrow_mut().pop() else {
                    continue;
                };
                if let Some(conn) = due.item.upgrade() {
                    conn.timer_set.set(false);
                    core.schedule_always(&conn);
                }
            }
            next => {
                // Until the earliest deadline (if any), or until an earlier one is set.
                let mut sleep = next.map(|at| Box::pin(monoio::time::sleep_until(at.into())));
                let mut first = true;
                poll_fn(|cx| {
                    if let Some(sleep) = sleep.as_mut() {
                        if sleep.as_mut().poll(cx).is_ready() {
                            return Poll::Ready(());
                        }
                    }
                    if !first && core.writer.timer_task.take().is_none() {
                        return Poll::Ready(()); // woken by `wake_at`
                    }
                    first = false;
                    core.writer.timer_task.set(Some(cx.waker().clone()));
                    Poll::Pending
                })
                .await;
            }
        }
    }
}
