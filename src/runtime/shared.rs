//! What all cores of a node share: the settings, the node-wide counters, the mesh handle, the
//! limits and the audit trail.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::delivery::access::Authenticator;
use crate::delivery::limits::{LimitConfig, Limits};
use crate::delivery::ring::RingBounds;
use crate::delivery::session::SessionConfig;
use crate::delivery::tally::Tally;

use super::audit::Audit;
use super::mesh::Mesh;
use super::node::Broker;
use super::pending::EdgeLimits;

/// What the runtime needs from the configuration.
#[derive(Debug, Clone)]
pub struct Settings {
    pub ring: RingBounds,
    /// What every connection's session reads (heartbeat, queue bounds, rates, acks).
    pub session: SessionConfig,
    pub drain_timeout: Duration,
    pub max_message_bytes: usize,
    /// Socket.IO: the largest Engine.IO packet or polling body a client may send.
    pub socketio_max_payload: usize,
    /// Socket.IO: how long a session that went away can be recovered (zero: not at all).
    pub socketio_recovery: Duration,
    /// Event frames per second on the whole node (0: no limit), shared evenly by the cores.
    pub node_rate_limit: u32,
    /// permessage-deflate: event frames larger than this go compressed (`None`: not offered).
    pub compress_over: Option<u32>,
    /// Bytes per second per terminal output stream (0: no cap).
    pub terminal_max_bytes_per_sec: u64,
    /// Inflated bytes of compressed client messages per connection per second (0: no budget).
    pub max_inflated_bytes_per_sec: u64,
    /// Bounds of the HTTP edge: deadlines and counts of sockets that are not connections.
    pub edge: EdgeLimits,
    /// Channels that keep presence.
    pub presence: crate::delivery::presence::PresenceRule,
    /// Asks the process's allocator to give this thread's free memory back to the OS
    /// (`true`: all of it now, not only what has been free for a while).
    pub release_memory: fn(bool),
}

/// Node-wide counters, each core adding to shards of its own (for metrics, not for logic).
#[derive(Debug, Default)]
pub struct Stats {
    pub connections: Tally,
    pub connections_total: Tally,
    /// Messages sequenced that came through the publish API or a terminal stream.
    pub published: Tally,
    /// Audit records sequenced on the `audit` channel.
    pub audit_published: Tally,
    pub frames_queued: Tally,
    /// Channel states the owner cores hold (each core adds its changes as it makes them).
    pub channels: Tally,
}

/// State shared by all cores.
pub struct Shared {
    pub settings: Settings,
    /// Positions from another epoch cannot be resumed exactly. A single node takes a new one
    /// at every start; a cluster shares one, kept in Redis.
    pub epoch: String,
    pub(super) mesh: Mesh,
    /// Where publishes go: this node's owner cores, or Redis.
    pub broker: Broker,
    pub(super) draining: AtomicBool,
    pub stats: Stats,
    /// Checks the tokens of in-band `refresh` messages.
    pub auth: Arc<dyn Authenticator>,
    /// Connection limits of the whole node (counted once per connect and per disconnect).
    pub limits: Limits,
    /// Socket.IO sessions that went away, kept for their clients' recovery (node-wide: a
    /// reconnect lands on any core).
    pub recovery: std::sync::Mutex<crate::delivery::recovery::Store>,
    pub audit_trail: Audit,
    /// Sockets of the whole node that are not connections (see `runtime::pending`).
    pub pending_sockets: Arc<Tally>,
}

impl Shared {
    pub fn new(
        settings: Settings,
        mesh: Mesh,
        auth: Arc<dyn Authenticator>,
        limits: LimitConfig,
        audit_trail: Audit,
        broker: Broker,
    ) -> Shared {
        Shared {
            audit_trail,
            limits: Limits::new(limits),
            settings,
            epoch: match &broker {
                Broker::Local => new_epoch(),
                Broker::Redis(redis) => redis.epoch.clone(),
            },
            broker,
            mesh,
            draining: AtomicBool::new(false),
            stats: Stats::default(),
            auth,
            pending_sockets: Arc::new(Tally::new()),
            recovery: Default::default(),
        }
    }

    /// Records an audit event (see `runtime::audit`) and publishes it on the `audit` channel.
    pub fn audit(&self, kind: &str, fields: serde_json::Value) {
        let publication = self.audit_trail.record(kind, fields);
        self.publish_detached(publication, super::mesh::Source::Audit);
    }

    /// This node's name in the cluster (`None`: a single node).
    pub fn instance(&self) -> Option<&str> {
        match &self.broker {
            Broker::Local => None,
            Broker::Redis(redis) => Some(redis.instance()),
        }
    }

    /// A connection's id as clients and the admin API see it: unique in the cluster.
    pub fn conn_name(&self, conn: u64) -> String {
        match self.instance() {
            None => format!("{conn:x}"),
            Some(instance) => crate::cluster::control::conn_name(instance, conn),
        }
    }

    /// Who is on a presence channel: this node's owner core, or the cluster's members in
    /// Redis; `None` when Redis did not answer.
    pub async fn presence_members(&self, channel: Arc<str>) -> Option<Vec<String>> {
        match &self.broker {
            Broker::Redis(redis) => redis.presence_members(channel).await,
            Broker::Local => {
                let owner = crate::delivery::channel::owner_core(&channel, self.mesh.cores());
                let (reply, answer) = futures_channel::oneshot::channel();
                self.mesh
                    .send(owner, super::mesh::MeshMsg::Members { channel, reply });
                answer.await.ok()
            }
        }
    }

    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Acquire)
    }
}

fn new_epoch() -> String {
    format!("{:016x}", rand::random::<u64>())
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}
