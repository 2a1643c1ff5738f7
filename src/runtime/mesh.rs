//! Cross-core queues: one crossbeam channel per core, with batched wake-ups.
//!
//! Invariant: messages from one core to another arrive in the order they were sent (the
//! sequencer's hand-over between replay and live delivery relies on it). A send wakes the
//! receiving core only if it registered to sleep since its last wake-up, so a burst costs one
//! wake-up and an idle core costs nothing: there is no polling loop.
//!
//! Bound: every lane counts the bytes of publications and deliveries waiting in it. A send
//! never fails and never blocks (a core waiting on another's full queue could deadlock with
//! it, and a message once accepted must arrive: subscription counts and seqs depend on it);
//! instead the edge asks `is_behind` before it accepts a publish, and refuses it (503) while
//! any core has more than `queue_bytes` waiting. What is waiting is then at most the bound
//! plus what the publishes already let in were fanning out.

use std::future::poll_fn;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::Poll;

use atomic_waker::AtomicWaker;
use crossbeam_channel::{Receiver, Sender, TryRecvError};

use crate::delivery::sequencer::{Resume, SubscribeAck};

use super::core::{AdminAnswer, AdminCmd};
use crate::delivery::{Delivery, Publication};

/// Answer to a publish: (index in the request, assigned seq) per message.
pub type PublishReply = futures_channel::oneshot::Sender<Vec<(usize, u64)>>;

/// Everything that crosses between cores.
pub enum MeshMsg {
    /// Work to do on the receiving core (an Engine.IO long-polling request reaching the
    /// core its session does not live on is carried out at home).
    Run(Box<dyn FnOnce(std::rc::Rc<super::core::Core>) + Send>),
    /// To the owner core of every channel in the batch.
    Publish {
        batch: Vec<(usize, Publication)>,
        reply: PublishReply,
        source: Source,
    },
    /// From an owner core to a core with subscribers of the channel.
    Deliver(Arc<Delivery>),
    /// To the owner core: one more subscription from `core`.
    Subscribe {
        channel: Arc<str>,
        core: usize,
        conn: u64,
        /// The subscribing core's id of this subscription, echoed in the ack.
        sub: u64,
        resume: Resume,
    },
    /// From the owner core back to the subscribing core.
    SubscribeAck {
        channel: Arc<str>,
        conn: u64,
        sub: u64,
        ack: SubscribeAck,
    },
    /// To the owner core: one subscription fewer from `core`.
    Unsubscribe { channel: Arc<str>, core: usize },
    /// An admin command for every core; each answers on its own `reply`.
    Admin {
        cmd: Arc<AdminCmd>,
        reply: futures_channel::oneshot::Sender<AdminAnswer>,
    },
    /// Close one connection of this core (e.g. displaced by its user's newer one).
    Close {
        conn: u64,
        code: u16,
        reason: &'static str,
    },
    /// Cluster mode, from the Redis thread to the channel's owner core: one publish batch.
    Remote(crate::cluster::wire::Batch),
    /// Cluster mode, the same: the answer to a read of a channel's stream (`None`: Redis did
    /// not answer).
    Read {
        channel: Arc<str>,
        /// Which read this answers (the owner core's id for it).
        id: u64,
        read: Option<crate::cluster::wire::Read>,
    },
    /// Cluster mode, to every core: the Pub/Sub connection came back, messages may have been
    /// missed.
    Resync,
    /// To the owner core of a presence channel: one subscription more or fewer of `user`.
    Presence {
        channel: Arc<str>,
        user: Box<str>,
        join: bool,
    },
    /// To the owner core of a presence channel: who is on it (this node's count).
    Members {
        channel: Arc<str>,
        reply: futures_channel::oneshot::Sender<Vec<String>>,
    },
    /// Begin the graceful drain: notify every connection.
    Drain,
    /// End of the drain: close the connections still open with 1012.
    ForceClose,
}

/// Who published a batch (each is counted in its own metric).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// The publish API or a terminal stream.
    Api,
    /// The node's own audit trail.
    Audit,
}

/// Bytes counted for a message besides its payload (the message and its allocations).
const OVERHEAD_BYTES: usize = 64;

impl MeshMsg {
    /// What this message counts against its lane's bound: the publications and deliveries
    /// that the edge lets in, by size; control traffic counts nothing.
    fn weight(&self) -> usize {
        match self {
            MeshMsg::Publish { batch, .. } => batch
                .iter()
                .map(|(_, p)| p.data.len() + p.event.len() + p.channel.len() + OVERHEAD_BYTES)
                .sum(),
            MeshMsg::Deliver(d) => d.frame.len() + OVERHEAD_BYTES,
            MeshMsg::Remote(b) => b
                .entries
                .iter()
                .map(|e| e.data.len() + e.event.len() + OVERHEAD_BYTES)
                .sum(),
            MeshMsg::Read { read: Some(r), .. } => r
                .entries
                .iter()
                .map(|s| s.entry.data.len() + s.entry.event.len() + OVERHEAD_BYTES)
                .sum(),
            _ => 0,
        }
    }
}

/// Bytes waiting in one lane (its own cache line: written by every sender and its receiver).
#[repr(align(128))]
#[derive(Default)]
struct Waiting(AtomicUsize);

struct Lane {
    tx: Sender<MeshMsg>,
    waker: Arc<AtomicWaker>,
    waiting: Arc<Waiting>,
}

/// Handle for sending to any core; cheap to clone, `Send`.
#[derive(Clone)]
pub struct Mesh {
    lanes: Arc<[Lane]>,
    /// Bytes waiting in one lane past which the edge refuses publishes (at least 1).
    queue_bytes: usize,
}

impl Mesh {
    /// Runs `cmd` on every core and collects their answers (those of cores still running).
    pub async fn admin(&self, cmd: AdminCmd) -> Vec<AdminAnswer> {
        let cmd = Arc::new(cmd);
        let mut waits = Vec::with_capacity(self.cores());
        for c in 0..self.cores() {
            let (reply, answer) = futures_channel::oneshot::channel();
            let cmd = cmd.clone();
            self.send(c, MeshMsg::Admin { cmd, reply });
            waits.push(answer);
        }
        let mut answers = Vec::with_capacity(waits.len());
        for w in waits {
            if let Ok(a) = w.await {
                answers.push(a);
            }
        }
        answers
    }
}

/// One core's receiving end.
pub struct Inbox {
    rx: Receiver<MeshMsg>,
    waker: Arc<AtomicWaker>,
    waiting: Arc<Waiting>,
}

/// Builds the mesh for `cores` cores: the sending handle and one inbox per core; publishes are
/// refused while a core has more than `queue_bytes` waiting.
pub fn mesh(cores: usize, queue_bytes: usize) -> (Mesh, Vec<Inbox>) {
    let mut lanes = Vec::with_capacity(cores);
    let mut inboxes = Vec::with_capacity(cores);
    for _ in 0..cores {
        let (tx, rx) = crossbeam_channel::unbounded();
        let waker = Arc::new(AtomicWaker::new());
        let waiting = Arc::new(Waiting::default());
        lanes.push(Lane {
            tx,
            waker: waker.clone(),
            waiting: waiting.clone(),
        });
        inboxes.push(Inbox { rx, waker, waiting });
    }
    (
        Mesh {
            lanes: lanes.into(),
            queue_bytes,
        },
        inboxes,
    )
}

impl Mesh {
    pub fn cores(&self) -> usize {
        self.lanes.len()
    }

    /// Whether some core has more than the bound waiting: a publish now is refused (the core
    /// that is behind may be the owner, or one its deliveries would fan out to).
    pub fn is_behind(&self) -> bool {
        self.lanes
            .iter()
            .any(|l| l.waiting.0.load(Ordering::Relaxed) > self.queue_bytes)
    }

    /// Queues `msg` for `core` and wakes it if it is waiting. Never blocks, never refuses.
    pub fn send(&self, core: usize, msg: MeshMsg) {
        let lane = &self.lanes[core];
        let weight = msg.weight();
        if weight > 0 {
            lane.waiting.0.fetch_add(weight, Ordering::Relaxed);
        }
        // The inbox lives as long as its worker; a send after shutdown is dropped on purpose.
        let _ = lane.tx.send(msg);
        lane.waker.wake();
    }
}

impl Inbox {
    /// Waits until at least one message is queued, then moves up to `max` of them into `out`.
    pub async fn recv_batch(&self, out: &mut Vec<MeshMsg>, max: usize) {
        poll_fn(|cx| {
            if self.drain_into(out, max) {
                return Poll::Ready(());
            }
            self.waker.register(cx.waker());
            // A send between the first drain and the registration would otherwise be missed.
            if self.drain_into(out, max) {
                Poll::Ready(())
            } else {
                Poll::Pending
            }
        })
        .await
    }

    fn drain_into(&self, out: &mut Vec<MeshMsg>, max: usize) -> bool {
        let before = out.len();
        let mut taken = 0;
        while out.len() - before < max {
            match self.rx.try_recv() {
                Ok(msg) => {
                    taken += msg.weight();
                    out.push(msg);
                }
                Err(TryRecvError::Empty | TryRecvError::Disconnected) => break,
            }
        }
        if taken > 0 {
            self.waiting.0.fetch_sub(taken, Ordering::Relaxed);
        }
        out.len() > before
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::delivery::Publication;

    fn publish(data_bytes: usize) -> MeshMsg {
        let data = "1".repeat(data_bytes);
        let (reply, _) = futures_channel::oneshot::channel();
        MeshMsg::Publish {
            batch: vec![(0, Publication::new("c".into(), "e", &data))],
            reply,
            source: Source::Api,
        }
    }

    #[test]
    fn publishes_are_refused_while_any_core_is_over_its_bound_and_sends_never_fail() {
        let bound = 900;
        let (mesh, inboxes) = mesh(2, bound);
        let size = 400 + 1 + 1 + OVERHEAD_BYTES;
        mesh.send(1, publish(400));
        assert!(!mesh.is_behind(), "{size} of {bound} waiting");
        mesh.send(1, publish(400));
        assert!(mesh.is_behind(), "{} of {bound} waiting", 2 * size);
        // Over the bound a send still goes through: nothing accepted is ever dropped.
        mesh.send(1, publish(400));
        mesh.send(1, MeshMsg::Drain); // control traffic counts nothing
        let mut out = Vec::new();
        assert!(inboxes[1].drain_into(&mut out, 1));
        assert!(mesh.is_behind(), "two publications still wait");
        assert!(inboxes[1].drain_into(&mut out, 1));
        assert!(!mesh.is_behind(), "one waits: under the bound again");
        assert!(inboxes[1].drain_into(&mut out, 10));
        assert_eq!(out.len(), 4, "every message arrived");
        assert_eq!(inboxes[1].waiting.0.load(Ordering::Relaxed), 0);
        assert!(!inboxes[0].drain_into(&mut out, 10));
    }
}
