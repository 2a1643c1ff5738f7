//! What the rest of the program asks of the node's cores: publish, run an admin command on
//! every core, drain. The edge calls these and never speaks the mesh protocol itself.
//!
//! Every publisher (the publish API, terminal streams, the audit trail) goes through
//! `Core::publish` or `Shared::publish_detached`, and those through the node's broker: in
//! memory, each channel's owner core assigns its seqs; in cluster mode, Redis does, and every
//! node's owner cores receive the messages back from it (see `cluster`).

use crate::cluster::Redis;
use crate::delivery::{channel, Publication};

use super::core::{AdminAnswer, AdminCmd, Core};
use super::mesh::{MeshMsg, Source};
use super::shared::{now_ms, Shared};

/// Who assigns seqs and carries messages to the cores that have subscribers.
pub enum Broker {
    /// This node alone: each channel's owner core.
    Local,
    /// A cluster of nodes sharing one Redis.
    Redis(Redis),
}

/// Why messages were not sequenced.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NotSequenced {
    /// A core has more than `mesh_queue_bytes` waiting: nothing of the request was accepted.
    Behind,
    /// The node stopped before answering.
    ShuttingDown,
    /// Cluster mode: Redis did not take the messages within its timeout (nothing was
    /// delivered; the messages may still have been stored, see the operations guide).
    Unavailable,
}

impl Core {
    /// Sends each message to its channel's owner core and waits for the seqs (in the order
    /// of `publications`); refuses the whole request (nothing sent) while a core is behind.
    /// Messages this core owns are sequenced at once, without a trip through its own inbox
    /// (their deliveries still take it, so the hand-over order holds).
    pub async fn publish(
        &self,
        mut publications: Vec<Publication>,
        source: Source,
    ) -> Result<Vec<u64>, NotSequenced> {
        let mesh = &self.shared.mesh;
        if mesh.is_behind() {
            return Err(NotSequenced::Behind);
        }
        if let Broker::Redis(redis) = &self.shared.broker {
            // The ETA of a progress event is computed by the core that took the publish.
            let now = now_ms();
            for p in &mut publications {
                self.annotate(p, now);
            }
            let n = publications.len();
            let answer = redis.publish(publications, now).await;
            let mut seqs = vec![0; n];
            for (i, seq) in answer.map_err(|_| NotSequenced::Unavailable)? {
                seqs[i] = seq;
            }
            self.count_published(source, n);
            return Ok(seqs);
        }
        let mut seqs = vec![0; publications.len()];
        let mut per_owner: Vec<Vec<(usize, Publication)>> =
            (0..mesh.cores()).map(|_| Vec::new()).collect();
        for (i, p) in publications.into_iter().enumerate() {
            per_owner[channel::owner_core(&p.channel, mesh.cores())].push((i, p));
        }
        let mut waits = Vec::new();
        for (owner, batch) in per_owner.into_iter().enumerate() {
            if batch.is_empty() {
                continue;
            }
            let (reply, answer) = futures_channel::oneshot::channel();
            let msg = MeshMsg::Publish {
                batch,
                reply,
                source,
            };
            if owner == self.id {
                self.handle(msg);
            } else {
                mesh.send(owner, msg);
            }
            waits.push(answer);
        }
        for answer in waits {
            for (i, seq) in answer.await.map_err(|_| NotSequenced::ShuttingDown)? {
                seqs[i] = seq;
            }
        }
        Ok(seqs)
    }
}

impl Shared {
    /// Publishes one message nobody waits for (an audit record): dropped if the node is behind
    /// or Redis is away.
    pub fn publish_detached(&self, publication: Publication, source: Source) {
        match &self.broker {
            Broker::Local => {
                let owner = channel::owner_core(&publication.channel, self.mesh.cores());
                let (reply, _) = futures_channel::oneshot::channel();
                let batch = vec![(0, publication)];
                self.mesh.send(
                    owner,
                    MeshMsg::Publish {
                        batch,
                        reply,
                        source,
                    },
                );
            }
            Broker::Redis(redis) => {
                redis.publish_detached(vec![publication], now_ms());
                match source {
                    Source::Api => self.stats.published.add(1),
                    Source::Audit => self.stats.audit_published.add(1),
                }
            }
        }
    }

    /// Whether the broker can take publishes (always, in memory).
    pub fn broker_ready(&self) -> bool {
        match &self.broker {
            Broker::Local => true,
            Broker::Redis(redis) => redis.is_up(),
        }
    }

    /// Runs `cmd` on every core of this node and collects their answers.
    pub async fn admin(&self, cmd: AdminCmd) -> Vec<AdminAnswer> {
        self.mesh.admin(cmd).await
    }

    /// Drain, first step: every connection is told `shutdown` (and new ones are refused).
    pub fn drain(&self) {
        self.draining
            .store(true, std::sync::atomic::Ordering::Release);
        for core in 0..self.mesh.cores() {
            self.mesh.send(core, MeshMsg::Drain);
        }
    }

    /// Drain, last step: the connections still open are closed with 1012.
    pub fn force_close(&self) {
        for core in 0..self.mesh.cores() {
            self.mesh.send(core, MeshMsg::ForceClose);
        }
    }
}
