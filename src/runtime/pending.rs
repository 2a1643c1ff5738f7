//! Sockets of one core that are not (yet) a connection: a request head on its way, a request
//! being served, an idle keep-alive socket, a terminal producer. They are what an anonymous
//! client can hold, so every one of them is counted, bounded and has a deadline.
//!
//! Invariant: every accepted socket is registered here from its accept until it becomes a
//! WebSocket/SSE connection or closes (the [`Ticket`] unregisters it when dropped), so
//! `pending sockets + connections` is every client socket of the node. A socket past its
//! deadline, or evicted to make room for a newer one, is told so through its ticket: its task
//! sees it at its next await and closes it.

use std::cell::{Cell, RefCell};
use std::collections::{BTreeMap, HashMap};
use std::future::{poll_fn, Future};
use std::net::IpAddr;
use std::pin::pin;
use std::rc::Rc;
use std::sync::Arc;
use std::task::{Poll, Waker};
use std::time::{Duration, Instant};

use crate::delivery::tally::Tally;

/// Bounds of the HTTP edge (see the settings in docs/operations.md).
#[derive(Debug, Clone, Copy)]
pub struct EdgeLimits {
    /// From a socket's accept (or the first byte of a keep-alive request) to its complete head.
    pub header_timeout: Duration,
    /// How long a keep-alive socket may sit idle between requests.
    pub keepalive_timeout: Duration,
    /// From a complete head to the last byte of its body.
    pub body_timeout: Duration,
    /// Sockets the node holds that are not WebSocket/SSE connections.
    pub max_pending: usize,
    /// Such sockets per client IP (0: no limit), where per-IP limits apply.
    pub max_pending_per_ip: u32,
    /// Whether loopback peers count against `max_pending_per_ip`.
    pub limit_loopback: bool,
    /// Client sockets of every kind the node holds at most: below the open-file limit, so that
    /// a socket at the bound can still be accepted and answered.
    pub max_sockets: usize,
    /// Bytes of request bodies one core buffers at once.
    pub body_buffer_bytes: usize,
}

impl Default for EdgeLimits {
    fn default() -> Self {
        EdgeLimits {
            header_timeout: Duration::from_secs(10),
            keepalive_timeout: Duration::from_secs(60),
            body_timeout: Duration::from_secs(30),
            max_pending: 4096,
            max_pending_per_ip: 64,
            limit_loopback: false,
            max_sockets: usize::MAX,
            body_buffer_bytes: 64 << 20,
        }
    }
}

/// Why a pending socket must close now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Expired {
    /// Its deadline passed.
    Deadline,
    /// It was the oldest idle socket when the node needed room.
    Evicted,
}

/// Why a new socket is refused at once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Full {
    /// Its IP holds `max_pending_per_ip` pending sockets (429).
    PerIp,
    /// The node holds its bound of sockets and none is idle to make room (503).
    Node,
}

/// What a pending socket is doing, which decides its deadline and whether it may be evicted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    /// No byte of a request yet (a new socket, or keep-alive between requests): evictable.
    Idle,
    /// A request head is arriving: evictable (it has proven nothing yet).
    Head,
    /// An authenticated request is being read or answered: kept until `body_timeout`.
    Body,
    /// A long-lived authenticated stream (a terminal producer): no deadline, not evicted.
    Stream,
}

#[derive(Default)]
struct Signal {
    fired: Cell<Option<Expired>>,
    waker: Cell<Option<Waker>>,
}

impl Signal {
    fn fire(&self, why: Expired) {
        if self.fired.get().is_none() {
            self.fired.set(Some(why));
        }
        if let Some(w) = self.waker.take() {
            w.wake();
        }
    }
}

struct Entry {
    ip: IpAddr,
    /// Whether a request of this socket was answered (a keep-alive client that proved itself).
    served: Cell<bool>,
    stage: Stage,
    deadline: Option<Instant>,
    signal: Rc<Signal>,
}

/// One core's pending sockets. `node_pending` (a `Tally`: each core writes its own shard) counts
/// the node's, once per accept and once per close, never per message.
pub struct Pending {
    limits: EdgeLimits,
    /// By ticket id, which rises: the first idle entry is the oldest.
    entries: RefCell<BTreeMap<u64, Entry>>,
    per_ip: RefCell<HashMap<IpAddr, u32>>,
    next: Cell<u64>,
    /// Per-IP bound on this core (the node's bound split over the cores).
    per_ip_here: u32,
    /// Request-body bytes this core has promised to buffer.
    body_bytes: Cell<usize>,
}

impl Pending {
    pub fn new(limits: EdgeLimits, cores: usize) -> Pending {
        let per_ip_here = match limits.max_pending_per_ip {
            0 => u32::MAX,
            n => n.div_ceil(cores.max(1) as u32),
        };
        Pending {
            limits,
            entries: RefCell::new(BTreeMap::new()),
            per_ip: RefCell::new(HashMap::new()),
            next: Cell::new(0),
            per_ip_here,
            body_bytes: Cell::new(0),
        }
    }

    pub fn limits(&self) -> &EdgeLimits {
        &self.limits
    }

    /// Registers a new socket from `ip`, making room by evicting this core's oldest idle socket
    /// when the node is at a bound. `open_connections` is the node's WebSocket/SSE count.
    pub fn admit(
        self: &Rc<Self>,
        ip: IpAddr,
        now: Instant,
        node_pending: &Arc<Tally>,
        open_connections: usize,
    ) -> Result<Ticket, Full> {
        let l = &self.limits;
        let per_ip_applies = l.limit_loopback || !ip.is_loopback();
        if per_ip_applies && self.per_ip.borrow().get(&ip).copied().unwrap_or(0) >= self.per_ip_here
        {
            return Err(Full::PerIp);
        }
        let pending = node_pending.sum() as usize;
        if (pending >= l.max_pending || pending + open_connections >= l.max_sockets)
            && !self.evict_oldest_idle()
        {
            return Err(Full::Node);
        }
        let id = self.next.get() + 1;
        self.next.set(id);
        let signal = Rc::new(Signal::default());
        self.entries.borrow_mut().insert(
            id,
            Entry {
                ip,
                served: Cell::new(false),
                stage: Stage::Head,
                deadline: Some(now + l.header_timeout),
                signal: signal.clone(),
            },
        );
        *self.per_ip.borrow_mut().entry(ip).or_default() += 1;
        node_pending.add(1);
        Ok(Ticket {
            pending: self.clone(),
            node: node_pending.clone(),
            id,
            ip,
            held: false,
            signal,
            body_bytes: 0,
        })
    }

    /// Tells one of this core's sockets that wait for a request to close: the oldest that has
    /// never completed one, else the oldest idle keep-alive socket; false if there is none.
    pub fn evict_oldest_idle(&self) -> bool {
        let entries = self.entries.borrow();
        let waiting = |e: &&Entry| {
            matches!(e.stage, Stage::Idle | Stage::Head) && e.signal.fired.get().is_none()
        };
        let oldest = entries
            .values()
            .filter(waiting)
            .find(|e| !e.served.get())
            .or_else(|| entries.values().find(waiting));
        match oldest {
            Some(e) => {
                e.signal.fire(Expired::Evicted);
                true
            }
            None => false,
        }
    }

    /// Fires every deadline that has passed (the core's sweep calls this).
    pub fn sweep(&self, now: Instant) {
        for e in self.entries.borrow().values() {
            if e.deadline.is_some_and(|d| d <= now) {
                e.signal.fire(Expired::Deadline);
            }
        }
    }

    /// Sockets registered on this core.
    pub fn len(&self) -> usize {
        self.entries.borrow().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn remove(&self, id: u64) {
        if let Some(e) = self.entries.borrow_mut().remove(&id) {
            let mut per_ip = self.per_ip.borrow_mut();
            if let Some(n) = per_ip.get_mut(&e.ip) {
                *n -= 1;
                if *n == 0 {
                    per_ip.remove(&e.ip);
                }
            }
        }
    }
}

/// A registered pending socket; dropping it unregisters the socket.
pub struct Ticket {
    pending: Rc<Pending>,
    node: Arc<Tally>,
    id: u64,
    ip: IpAddr,
    /// Serving a connection for now (see `hold`): not registered meanwhile.
    held: bool,
    signal: Rc<Signal>,
    /// Body bytes this socket holds of its core's budget.
    body_bytes: usize,
}

impl Ticket {
    /// Moves the socket to `stage`, with the deadline that stage has from `now`.
    pub fn stage(&self, stage: Stage, now: Instant) {
        let l = &self.pending.limits;
        let deadline = match stage {
            Stage::Idle => Some(now + l.keepalive_timeout),
            Stage::Head => Some(now + l.header_timeout),
            Stage::Body => Some(now + l.body_timeout),
            Stage::Stream => None,
        };
        if let Some(e) = self.pending.entries.borrow_mut().get_mut(&self.id) {
            e.stage = stage;
            e.deadline = deadline;
        }
    }

    /// A request of this socket was answered: it is evicted only after sockets that never
    /// completed one.
    pub fn served(&self) {
        if let Some(e) = self.pending.entries.borrow().get(&self.id) {
            e.served.set(true);
        }
    }

    /// The socket carries an established connection's traffic for a while (a Socket.IO
    /// polling session's held GET): meanwhile it is not a pending socket (not counted, no
    /// deadline, never evicted), as the connection it serves is counted already.
    pub fn hold(&mut self) {
        if !self.held {
            self.pending.remove(self.id);
            self.node.add(-1);
            self.held = true;
        }
    }

    /// Back from `hold`: a pending socket again, in `stage`.
    pub fn unhold(&mut self, stage: Stage, now: Instant) {
        if !self.held {
            return;
        }
        self.held = false;
        self.pending.entries.borrow_mut().insert(
            self.id,
            Entry {
                ip: self.ip,
                served: Cell::new(true),
                stage,
                deadline: None,
                signal: self.signal.clone(),
            },
        );
        *self.pending.per_ip.borrow_mut().entry(self.ip).or_default() += 1;
        self.node.add(1);
        self.stage(stage, now);
    }

    /// Runs `work` unless, or until, the socket expires.
    pub async fn guard<F: Future>(&self, work: F) -> Result<F::Output, Expired> {
        let mut work = pin!(work);
        poll_fn(|cx| {
            if let Some(why) = self.signal.fired.get() {
                return Poll::Ready(Err(why));
            }
            match work.as_mut().poll(cx) {
                Poll::Ready(out) => Poll::Ready(Ok(out)),
                Poll::Pending => {
                    self.signal.waker.set(Some(cx.waker().clone()));
                    Poll::Pending
                }
            }
        })
        .await
    }

    /// Whether the socket has expired.
    pub fn expired(&self) -> Option<Expired> {
        self.signal.fired.get()
    }

    /// Takes `bytes` of the core's request-body budget; false (nothing taken) if they do not fit.
    pub fn reserve_body(&mut self, bytes: usize) -> bool {
        let budget = &self.pending.body_bytes;
        if budget.get() + bytes > self.pending.limits.body_buffer_bytes {
            return false;
        }
        budget.set(budget.get() + bytes);
        self.body_bytes += bytes;
        true
    }

    /// Gives back the body budget this socket holds.
    pub fn release_body(&mut self) {
        let budget = &self.pending.body_bytes;
        budget.set(budget.get() - self.body_bytes);
        self.body_bytes = 0;
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        self.release_body();
        if !self.held {
            self.pending.remove(self.id);
            self.node.add(-1);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn pending(f: impl FnOnce(&mut EdgeLimits)) -> (Rc<Pending>, Arc<Tally>) {
        let mut l = EdgeLimits::default();
        f(&mut l);
        (Rc::new(Pending::new(l, 1)), Arc::new(Tally::new()))
    }

    #[test]
    fn tickets_count_until_dropped() {
        let (p, node) = pending(|_| {});
        let now = Instant::now();
        let a = p.admit(ip("10.0.0.1"), now, &node, 0).unwrap();
        let b = p.admit(ip("10.0.0.1"), now, &node, 0).unwrap();
        assert_eq!((p.len(), node.sum()), (2, 2));
        drop(a);
        assert_eq!((p.len(), node.sum()), (1, 1));
        drop(b);
        assert_eq!((p.len(), node.sum()), (0, 0));
        assert!(p.per_ip.borrow().is_empty());
    }

    #[test]
    fn per_ip_bound_applies_to_loopback_only_when_asked() {
        let (p, node) = pending(|l| l.max_pending_per_ip = 2);
        let now = Instant::now();
        let held: Vec<_> = (0..5)
            .map(|_| p.admit(ip("127.0.0.1"), now, &node, 0).unwrap())
            .collect();
        let a = p.admit(ip("10.0.0.1"), now, &node, 0).unwrap();
        let b = p.admit(ip("10.0.0.1"), now, &node, 0).unwrap();
        assert_eq!(
            p.admit(ip("10.0.0.1"), now, &node, 0).err(),
            Some(Full::PerIp)
        );
        assert!(p.admit(ip("10.0.0.2"), now, &node, 0).is_ok());
        drop(a);
        assert!(p.admit(ip("10.0.0.1"), now, &node, 0).is_ok());
        drop((held, b));

        let (p, node) = pending(|l| {
            l.max_pending_per_ip = 1;
            l.limit_loopback = true;
        });
        let _a = p.admit(ip("127.0.0.1"), now, &node, 0).unwrap();
        assert_eq!(
            p.admit(ip("127.0.0.1"), now, &node, 0).err(),
            Some(Full::PerIp)
        );
    }

    #[test]
    fn at_the_node_bound_the_oldest_idle_socket_makes_room() {
        let (p, node) = pending(|l| l.max_pending = 2);
        let now = Instant::now();
        let first = p.admit(ip("10.0.0.1"), now, &node, 0).unwrap();
        let second = p.admit(ip("10.0.0.2"), now, &node, 0).unwrap();
        second.stage(Stage::Body, now); // authenticated: not evictable
        let third = p.admit(ip("10.0.0.3"), now, &node, 0).unwrap();
        assert_eq!(first.expired(), Some(Expired::Evicted));
        assert_eq!(second.expired(), None);
        // The evicted one has not closed yet; no other idle socket is left to evict.
        third.stage(Stage::Stream, now);
        assert_eq!(
            p.admit(ip("10.0.0.4"), now, &node, 0).err(),
            Some(Full::Node)
        );
        drop(first);
        drop(second);
        assert!(p.admit(ip("10.0.0.4"), now, &node, 0).is_ok());
    }

    #[test]
    fn sockets_that_never_completed_a_request_make_room_first() {
        let (p, node) = pending(|l| l.max_pending = 3);
        let now = Instant::now();
        let publisher = p.admit(ip("10.0.0.1"), now, &node, 0).unwrap();
        publisher.served();
        publisher.stage(Stage::Idle, now);
        let half_head = p.admit(ip("10.0.0.2"), now, &node, 0).unwrap();
        let silent = p.admit(ip("10.0.0.3"), now, &node, 0).unwrap();
        let _newcomer = p.admit(ip("10.0.0.4"), now, &node, 0).unwrap();
        assert_eq!(half_head.expired(), Some(Expired::Evicted));
        assert_eq!((publisher.expired(), silent.expired()), (None, None));
        let _another = p.admit(ip("10.0.0.5"), now, &node, 0).unwrap();
        assert_eq!(silent.expired(), Some(Expired::Evicted));
        // Only served sockets are left waiting: the oldest idle one goes.
        drop((half_head, silent));
        let (_a, _b) = (
            p.admit(ip("10.0.0.6"), now, &node, 0).unwrap(),
            p.admit(ip("10.0.0.7"), now, &node, 0).unwrap(),
        );
        assert_eq!(
            publisher.expired(),
            None,
            "newer unproven sockets went first"
        );
    }

    #[test]
    fn connections_count_against_the_socket_bound() {
        let (p, node) = pending(|l| l.max_sockets = 10);
        let now = Instant::now();
        assert_eq!(
            p.admit(ip("10.0.0.1"), now, &node, 10).err(),
            Some(Full::Node)
        );
        let t = p.admit(ip("10.0.0.1"), now, &node, 9).unwrap();
        t.stage(Stage::Stream, now);
        assert_eq!(
            p.admit(ip("10.0.0.1"), now, &node, 9).err(),
            Some(Full::Node)
        );
    }

    #[test]
    fn deadlines_by_stage() {
        let (p, node) = pending(|l| {
            l.header_timeout = Duration::from_secs(1);
            l.keepalive_timeout = Duration::from_secs(5);
            l.body_timeout = Duration::from_secs(3);
        });
        let t0 = Instant::now();
        let head = p.admit(ip("10.0.0.1"), t0, &node, 0).unwrap();
        let idle = p.admit(ip("10.0.0.1"), t0, &node, 0).unwrap();
        idle.stage(Stage::Idle, t0);
        let body = p.admit(ip("10.0.0.1"), t0, &node, 0).unwrap();
        body.stage(Stage::Body, t0);
        let stream = p.admit(ip("10.0.0.1"), t0, &node, 0).unwrap();
        stream.stage(Stage::Stream, t0);
        p.sweep(t0 + Duration::from_millis(999));
        assert_eq!(head.expired(), None);
        p.sweep(t0 + Duration::from_secs(1));
        assert_eq!(head.expired(), Some(Expired::Deadline));
        p.sweep(t0 + Duration::from_secs(4));
        assert_eq!(
            (idle.expired(), body.expired()),
            (None, Some(Expired::Deadline))
        );
        p.sweep(t0 + Duration::from_secs(3600));
        assert_eq!(idle.expired(), Some(Expired::Deadline));
        assert_eq!(stream.expired(), None);
    }

    #[test]
    fn the_body_budget_is_per_core_and_given_back() {
        let (p, node) = pending(|l| l.body_buffer_bytes = 100);
        let now = Instant::now();
        let mut a = p.admit(ip("10.0.0.1"), now, &node, 0).unwrap();
        let mut b = p.admit(ip("10.0.0.1"), now, &node, 0).unwrap();
        assert!(a.reserve_body(60));
        assert!(!b.reserve_body(41));
        assert!(b.reserve_body(40));
        a.release_body();
        assert!(b.reserve_body(60));
        drop(b);
        assert_eq!(p.body_bytes.get(), 0);
    }
}
