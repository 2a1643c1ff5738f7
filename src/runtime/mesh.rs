//! Cross-core queues: one crossbeam channel per core, with batched wake-ups.
//!
//! Invariant: messages from one core to another arrive in the order they were sent (the
//! sequencer's hand-over between replay and live delivery relies on it). A send wakes the
//! receiving core only if it registered to sleep since its last wake-up, so a burst costs one
//! wake-up and an idle core costs nothing: there is no polling loop.

use std::future::poll_fn;
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

struct Lane {
    tx: Sender<MeshMsg>,
    waker: Arc<AtomicWaker>,
}

/// Handle for sending to any core; cheap to clone, `Send`.
#[derive(Clone)]
pub struct Mesh {
    lanes: Arc<[Lane]>,
}

/// One core's receiving end.
pub struct Inbox {
    rx: Receiver<MeshMsg>,
    waker: Arc<AtomicWaker>,
}

/// Builds the mesh for `cores` cores: the sending handle and one inbox per core.
pub fn mesh(cores: usize) -> (Mesh, Vec<Inbox>) {
    let mut lanes = Vec::with_capacity(cores);
    let mut inboxes = Vec::with_capacity(cores);
    for _ in 0..cores {
        let (tx, rx) = crossbeam_channel::unbounded();
        let waker = Arc::new(AtomicWaker::new());
        lanes.push(Lane {
            tx,
            waker: waker.clone(),
        });
        inboxes.push(Inbox { rx, waker });
    }
    (
        Mesh {
            lanes: lanes.into(),
        },
        inboxes,
    )
}

impl Mesh {
    pub fn cores(&self) -> usize {
        self.lanes.len()
    }

    /// Queues `msg` for `core` and wakes it if it is waiting.
    pub fn send(&self, core: usize, msg: MeshMsg) {
        let lane = &self.lanes[core];
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
        while out.len() - before < max {
            match self.rx.try_recv() {
                Ok(msg) => out.push(msg),
                Err(TryRecvError::Empty | TryRecvError::Disconnected) => break,
            }
        }
        out.len() > before
    }
}
