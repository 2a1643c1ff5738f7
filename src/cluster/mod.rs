//! Cluster mode: the Redis broker.
//!
//! The Redis client (redis-rs) runs on one thread of its own with a single-threaded tokio
//! runtime; the cores talk to it through an unbounded channel and it answers through the mesh
//! (reads, Pub/Sub batches) or a oneshot (publish answers). So a Redis that answers slowly or
//! not at all never blocks an io_uring worker: what waits is a future on the worker, bounded
//! by `timeout`.
//!
//! - Publish: all requests that reach the thread in one wake-up go out in one pipeline, one
//!   script call per request (atomic on one Redis: every channel of the request or none). The
//!   script assigns seqs, appends to the channels' streams and publishes one batch per channel
//!   to the nodes (see `wire`).
//! - Fan-out: one Pub/Sub subscription per node; each batch goes to the owner core of its
//!   channel, which delivers it in seq order (see `delivery::sequencer`).
//! - After the Pub/Sub connection comes back, every core re-reads its channels (`Resync`).
//!
//! Bound: the queue to the thread holds one entry per publish request in flight (each is a
//! request on an open HTTP connection, and those are bounded) and one per stream read in
//! flight (at most one per channel and resume position).

pub mod control;
pub mod ingest;
pub mod wire;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use redis::aio::{ConnectionLike, ConnectionManager};
use redis::cluster_async::ClusterConnection;
use redis::{Cmd as RedisCmd, Pipeline, RedisFuture, RedisResult, Script, Value};

use std::collections::HashMap;

use crate::delivery::access::Overrides;
use crate::delivery::channel;
use crate::delivery::ring::RingBounds;
use crate::delivery::Publication;
use crate::runtime::mesh::{Mesh, MeshMsg};
use crate::runtime::worker::SharedRateLimitedLog;
use wire::{Batch, Entry, Keys, Read, Stored};

/// How the node reaches Redis.
#[derive(Debug, Clone)]
pub struct ClusterSettings {
    pub url: String,
    /// Prefix of every key and Pub/Sub channel of this deployment.
    pub prefix: String,
    /// Bound of every Redis call (and of a publish's answer).
    pub timeout: Duration,
    /// The replay bounds: the stream's length and the channel keys' time to live.
    pub ring: RingBounds,
    /// Redis streams and Pub/Sub channels whose messages are published (see `ingest`).
    pub ingest: Vec<ingest::Source>,
    /// The registry, the cluster-wide limits and the admin commands (see `control`).
    pub control: control::ControlSettings,
}

/// Redis did not take a publish (away, stalled, or it answered an error).
#[derive(Debug, Clone, thiserror::Error)]
#[error("{0}")]
pub struct Unavailable(pub String);

/// Seqs of a publish: (index in the request, seq) per message.
type Seqs = Vec<(usize, u64)>;

/// Where a publish's answer goes.
type Reply = futures_channel::oneshot::Sender<Result<Seqs, Unavailable>>;

/// The messages of one channel in a publish request, in the request's order.
struct Group {
    channel: Arc<str>,
    /// Each message's index in the request.
    indexes: Vec<usize>,
    /// Each message's script argument (`Entry::encode`).
    entries: Vec<Vec<u8>>,
}

enum Cmd {
    Publish {
        groups: Vec<Group>,
        reply: Option<Reply>,
    },
    Read(ReadCmd),
    /// Sharded mode: this node no longer keeps the channel.
    Unsubscribe(Arc<str>),
    Control(control::Cmd),
}

/// A read of `channel`'s stream after `after`, answered to the owner `core` as read `id`.
struct ReadCmd {
    channel: Arc<str>,
    after: u64,
    core: usize,
    id: u64,
}

/// The command connection: to one Redis, or to a Redis Cluster (routed by key slot).
#[derive(Clone)]
enum Conn {
    Single(ConnectionManager),
    Cluster(ClusterConnection),
}

impl ConnectionLike for Conn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a RedisCmd) -> RedisFuture<'a, Value> {
        match self {
            Conn::Single(c) => c.req_packed_command(cmd),
            Conn::Cluster(c) => c.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            Conn::Single(c) => c.req_packed_commands(pipeline, offset, count),
            Conn::Cluster(c) => c.req_packed_commands(pipeline, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Conn::Single(c) => c.get_db(),
            Conn::Cluster(c) => c.get_db(),
        }
    }
}

/// The cores' handle on the Redis thread.
pub struct Redis {
    tx: tokio::sync::mpsc::UnboundedSender<Cmd>,
    health: Arc<Health>,
    /// The cluster's epoch: the same on every node of the deployment.
    pub epoch: String,
    /// Redis runs as a Redis Cluster: each channel is subscribed on its own (sharded Pub/Sub).
    sharded: bool,
    instance: String,
    /// The admins' changes to users' access as Redis held them when the node started.
    pub overrides_at_start: HashMap<String, Overrides>,
}

#[derive(Default)]
struct Health {
    pubsub: AtomicBool,
    commands: AtomicBool,
    /// Messages published from the ingest sources.
    ingested: AtomicU64,
    /// Ingest messages that could not be published (malformed); logged.
    ingest_refused: AtomicU64,
    /// Sharded mode: a connection was lost; subscribe every channel again on its next read.
    resubscribe: AtomicBool,
    /// The connection limits are this node's own, not the cluster's (Redis did not answer).
    limits_local: AtomicBool,
}

impl Health {
    /// Records whether the limits in force are the node's own; says so when that changes.
    fn set_limits_local(&self, local: bool) {
        if self.limits_local.swap(local, Ordering::Relaxed) != local {
            if local {
                tracing::warn!(
                    "Redis does not answer: connection limits are this node's own until it does"
                );
            } else {
                tracing::info!("connection limits are the cluster's again");
            }
        }
    }
}

/// Assigns seqs, appends to each channel's stream and sends each channel's batch to the nodes,
/// for every channel of one publish request at once (see `wire` for the layout).
const PUBLISH: &str = r#"
local events, maxlen, ttl = ARGV[1], ARGV[2], ARGV[3]
local out = {}
local a = 4
for g = 1, #KEYS / 2 do
  local meta, stream = KEYS[2 * g - 1], KEYS[2 * g]
  local channel, n = ARGV[a], tonumber(ARGV[a + 1])
  a = a + 2
  local life = redis.call('HGET', meta, 'l')
  if not life then
    local t = redis.call('TIME')
    life = string.format('%d', tonumber(t[1]) * 1000000 + tonumber(t[2]))
    redis.call('DEL', stream)
    redis.call('HSET', meta, 'l', life, 's', life, 'p', life)
  end
  local last = redis.call('HINCRBY', meta, 's', n)
  local first = last - n + 1
  local prev = redis.call('HGET', meta, 'p')
  local parts = {life, ' ', string.format('%d', first), ' ', channel, ' '}
  for i = 0, n - 1 do
    local e = ARGV[a + i]
    if string.byte(e, 1) == 100 then
      local seq = string.format('%d', first + i)
      redis.call('XADD', stream, 'MAXLEN', '~', maxlen, seq .. '-0', 'p', prev, 'e', e)
      prev = seq
    end
    parts[#parts + 1] = string.format('%d', string.len(e)) .. ':' .. e
  end
  a = a + n
  redis.call('HSET', meta, 'p', prev)
  redis.call('PEXPIRE', meta, ttl)
  redis.call('PEXPIRE', stream, ttl)
  if events == '' then
    -- A Redis Cluster: the channel's own shard channel, in its keys' slot.
    redis.call('SPUBLISH', string.sub(meta, 1, -2) .. 'p', table.concat(parts))
  else
    redis.call('PUBLISH', events, table.concat(parts))
  end
  out[g] = {life, string.format('%d', first)}
end
return out
"#;

/// A channel's life and last seq, a page of its stream from ARGV[1] on, and its last durable seq.
const READ: &str = r#"
local m = redis.call('HMGET', KEYS[1], 'l', 's', 'p')
if not m[1] then return {} end
return {m[1], m[2], redis.call('XRANGE', KEYS[2], ARGV[1], '+', 'COUNT', ARGV[2]), m[3]}
"#;

/// How often the Pub/Sub connection is pinged.
const PUBSUB_PING: Duration = Duration::from_secs(2);
/// Entries per page of a stream read.
const PAGE: usize = 1000;
/// How long the node waits for Redis when it starts.
const START_WAIT: Duration = Duration::from_secs(10);

impl Redis {
    /// Connects, agrees on the cluster's epoch and subscribes to the nodes' Pub/Sub channel,
    /// then keeps doing so on a thread of its own. Fails if Redis cannot be reached within
    /// a few seconds.
    pub fn start(settings: ClusterSettings, mesh: Mesh) -> Result<Redis, String> {
        let settings_instance = settings.control.instance.clone();
        let client = redis::Client::open(settings.url.as_str())
            .map_err(|e| format!("RINGCAST_REDIS_URL: {e}"))?;
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        let (started_tx, started_rx) = std::sync::mpsc::channel::<Result<Started, String>>();
        let health = Arc::new(Health::default());
        let thread_health = health.clone();
        let commands = tx.clone();
        std::thread::Builder::new()
            .name("ringcast-redis".into())
            .spawn(move || {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .expect("a tokio runtime");
                rt.block_on(run(
                    client,
                    settings,
                    mesh,
                    (commands, rx),
                    thread_health,
                    started_tx,
                ));
            })
            .map_err(|e| format!("cannot start the Redis thread: {e}"))?;
        let instance = settings_instance;
        let started = started_rx
            .recv()
            .map_err(|_| "the Redis thread ended".to_owned())??;
        Ok(Redis {
            tx,
            health,
            epoch: started.epoch,
            sharded: started.sharded,
            instance,
            overrides_at_start: started.overrides,
        })
    }

    /// This node's name in the cluster.
    pub fn instance(&self) -> &str {
        &self.instance
    }

    /// Whether the connection limits in force are this node's own (Redis did not answer).
    pub fn limits_local(&self) -> bool {
        self.health.limits_local.load(Ordering::Relaxed)
    }

    /// Counts a connection attempt against the cluster's limits; `None` when Redis did not
    /// answer in time (then the node's own limits decide).
    pub async fn admit(&self, member: control::Member) -> Option<control::Admission> {
        if !self.is_up() {
            // Known to be away (checked every second): no handshake waits for it meanwhile.
            self.health.set_limits_local(true);
            return None;
        }
        let (reply, answer) = futures_channel::oneshot::channel();
        let sent = self
            .tx
            .send(Cmd::Control(control::Cmd::Admit { member, reply }));
        // A failure here decides for this connection only; the health check (every second)
        // decides whether the limits are the node's own.
        match sent {
            Ok(()) => answer.await.ok().flatten(),
            Err(_) => None,
        }
    }

    /// Takes a connection off the cluster's counts and the registry.
    pub fn release(&self, conn: u64) {
        let _ = self.tx.send(Cmd::Control(control::Cmd::Release { conn }));
    }

    /// Asks node `instance` to close its connection `conn` (displaced by a newer one).
    pub fn evict(&self, instance: String, conn: u64) {
        let _ = self
            .tx
            .send(Cmd::Control(control::Cmd::Evict { instance, conn }));
    }

    /// Runs an admin command on every other live node; their answers.
    pub async fn admin_elsewhere(
        &self,
        cmd: crate::runtime::core::AdminCmd,
    ) -> Result<control::Elsewhere, control::ControlError> {
        let (reply, answer) = futures_channel::oneshot::channel();
        self.tx
            .send(Cmd::Control(control::Cmd::Admin { cmd, reply }))
            .map_err(|_| control::ControlError::Ended)?;
        answer.await.unwrap_or(Err(control::ControlError::Ended))
    }

    /// This node's presence changes of a channel (the cluster's are published).
    pub fn presence(&self, change: crate::delivery::presence::Change) {
        let _ = self.tx.send(Cmd::Control(control::Cmd::Presence(change)));
    }

    /// Who is on a presence channel in the whole cluster; `None` if Redis did not answer.
    pub async fn presence_members(&self, channel: Arc<str>) -> Option<Vec<String>> {
        let (reply, answer) = futures_channel::oneshot::channel();
        self.tx
            .send(Cmd::Control(control::Cmd::Members { channel, reply }))
            .ok()?;
        answer.await.ok().flatten()
    }

    /// Stores an admin's change of `user`'s access in Redis; the user's changes now in force.
    pub async fn store(
        &self,
        user: String,
        change: control::Change,
    ) -> Result<Overrides, control::ControlError> {
        let (reply, answer) = futures_channel::oneshot::channel();
        self.tx
            .send(Cmd::Control(control::Cmd::Store {
                user,
                change,
                reply,
            }))
            .map_err(|_| control::ControlError::Ended)?;
        answer.await.unwrap_or(Err(control::ControlError::Ended))
    }

    /// Keeps a Socket.IO session that went away, for `ttl`, where any node can recover it.
    pub fn keep_session(&self, pid: String, record: String, ttl: std::time::Duration) {
        let _ = self
            .tx
            .send(Cmd::Control(control::Cmd::KeepSession { pid, record, ttl }));
    }

    /// Takes a kept Socket.IO session, once.
    pub async fn take_session(&self, pid: String) -> Option<String> {
        let (reply, answer) = futures_channel::oneshot::channel();
        self.tx
            .send(Cmd::Control(control::Cmd::TakeSession { pid, reply }))
            .ok()?;
        answer.await.ok().flatten()
    }

    /// Whether each channel is subscribed in Redis on its own (a Redis Cluster).
    pub fn sharded(&self) -> bool {
        self.sharded
    }

    /// Sharded mode: stops receiving `channel`'s messages (this node forgot it).
    pub fn unsubscribe(&self, channel: Arc<str>) {
        if self.sharded {
            let _ = self.tx.send(Cmd::Unsubscribe(channel));
        }
    }

    /// Whether Redis is reachable as of the last check (both connections).
    pub fn is_up(&self) -> bool {
        self.health.pubsub.load(Ordering::Relaxed) && self.health.commands.load(Ordering::Relaxed)
    }

    /// Messages published from the ingest sources, and those refused, since start.
    pub fn ingest_counts(&self) -> (u64, u64) {
        (
            self.health.ingested.load(Ordering::Relaxed),
            self.health.ingest_refused.load(Ordering::Relaxed),
        )
    }

    /// Publishes a request's messages (published at `ts`); answers their seqs once Redis has
    /// stored them and sent them to the nodes, or `Unavailable` within the timeout.
    pub async fn publish(
        &self,
        publications: Vec<Publication>,
        ts: u64,
    ) -> Result<Seqs, Unavailable> {
        let (reply, answer) = futures_channel::oneshot::channel();
        self.send_publish(publications, ts, Some(reply));
        answer
            .await
            .unwrap_or_else(|_| Err(Unavailable("the Redis thread ended".into())))
    }

    /// The same, with nobody waiting for the answer (the audit trail).
    pub fn publish_detached(&self, publications: Vec<Publication>, ts: u64) {
        self.send_publish(publications, ts, None);
    }

    fn send_publish(&self, publications: Vec<Publication>, ts: u64, reply: Option<Reply>) {
        let groups = groups(publications, ts);
        if let Err(e) = self.tx.send(Cmd::Publish { groups, reply }) {
            if let Cmd::Publish {
                reply: Some(reply), ..
            } = e.0
            {
                let _ = reply.send(Err(Unavailable("the Redis thread ended".into())));
            }
        }
    }

    /// Asks for `channel`'s stream after `after`; the answer reaches `core` as read `id`.
    pub fn read(&self, channel: Arc<str>, after: u64, core: usize, id: u64) {
        let _ = self.tx.send(Cmd::Read(ReadCmd {
            channel,
            after,
            core,
            id,
        }));
    }
}

/// A request's messages grouped by channel, in the request's order.
fn groups(publications: Vec<Publication>, ts: u64) -> Vec<Group> {
    let mut groups: Vec<Group> = Vec::new();
    for (i, p) in publications.into_iter().enumerate() {
        let channel = p.channel.clone();
        let entry = Entry::new(p, ts).encode();
        match groups.iter_mut().find(|g| g.channel == channel) {
            Some(g) => {
                g.indexes.push(i);
                g.entries.push(entry);
            }
            None => groups.push(Group {
                channel,
                indexes: vec![i],
                entries: vec![entry],
            }),
        }
    }
    groups
}

/// Connects to `client`'s Redis: a Redis Cluster (found by asking the node) gets a cluster
/// connection with sharded Pub/Sub delivered to `pushes`.
async fn connect(
    client: &redis::Client,
    settings: &ClusterSettings,
    pushes: tokio::sync::mpsc::UnboundedSender<redis::PushInfo>,
) -> RedisResult<Conn> {
    let config = redis::aio::ConnectionManagerConfig::new()
        .set_connection_timeout(Some(settings.timeout))
        .set_response_timeout(Some(settings.timeout))
        .set_max_delay(Duration::from_secs(2));
    let mut single = ConnectionManager::new_with_config(client.clone(), config).await?;
    let info: String = redis::cmd("INFO")
        .arg("cluster")
        .query_async(&mut single)
        .await?;
    if !info.contains("cluster_enabled:1") {
        return Ok(Conn::Single(single));
    }
    let cluster = redis::cluster::ClusterClientBuilder::new(vec![settings.url.as_str()])
        .use_protocol(redis::ProtocolVersion::RESP3)
        .push_sender(pushes)
        .connection_timeout(settings.timeout)
        .response_timeout(settings.timeout)
        .build()?;
    Ok(Conn::Cluster(cluster.get_async_connection().await?))
}

/// Everything the Redis thread does.
async fn run(
    client: redis::Client,
    settings: ClusterSettings,
    mesh: Mesh,
    (commands, mut rx): (
        tokio::sync::mpsc::UnboundedSender<Cmd>,
        tokio::sync::mpsc::UnboundedReceiver<Cmd>,
    ),
    health: Arc<Health>,
    started: std::sync::mpsc::Sender<Result<Started, String>>,
) {
    let keys = Keys {
        prefix: settings.prefix.clone(),
    };
    let (push_tx, push_rx) = tokio::sync::mpsc::unbounded_channel();
    let first = tokio::time::timeout(START_WAIT, async {
        let mut conn = connect(&client, &settings, push_tx.clone()).await?;
        let epoch =
            agree_on_epoch(&mut conn, &keys, &format!("{:016x}", rand::random::<u64>())).await?;
        RedisResult::Ok((conn, epoch))
    })
    .await;
    let (conn, epoch) = match first {
        Ok(Ok(x)) => x,
        Ok(Err(e)) => {
            let _ = started.send(Err(format!("cannot reach Redis at {}: {e}", settings.url)));
            return;
        }
        Err(_) => {
            let _ = started.send(Err(format!(
                "cannot reach Redis at {} within {} s",
                settings.url,
                START_WAIT.as_secs()
            )));
            return;
        }
    };
    let sharded = matches!(conn, Conn::Cluster(_));
    health.commands.store(true, Ordering::Relaxed);
    let (control, presence_changes) = control::State::new(settings.control.clone());
    let ctx = Arc::new(Ctx {
        control,
        settings,
        keys,
        mesh,
        health,
        publish: Script::new(PUBLISH),
        read: Script::new(READ),
        epoch: epoch.clone(),
        commands,
        sharded,
        conn: std::sync::RwLock::new(conn.clone()),
    });
    // What Redis holds of this node's earlier run goes; what the admins changed stays.
    let prepared = tokio::time::timeout(START_WAIT, async {
        let stale = control::reset(&ctx).await?;
        let overrides = control::load_overrides(&ctx.keys.prefix, &mut ctx.conn()).await?;
        RedisResult::Ok((stale, overrides))
    })
    .await;
    let overrides = match prepared {
        Ok(Ok((stale, (overrides, version)))) => {
            if stale > 0 {
                tracing::info!(
                    stale,
                    "cleared this node's entries of an earlier run from Redis"
                );
            }
            ctx.control.seen_version(version);
            overrides
        }
        Ok(Err(e)) => {
            let _ = started.send(Err(format!(
                "cannot prepare the cluster state in Redis: {e}"
            )));
            return;
        }
        Err(_) => {
            let _ = started.send(Err("Redis did not answer while the node started".into()));
            return;
        }
    };
    // Reads go through the subscription task where each channel is subscribed on its own.
    let subscriptions = if sharded {
        ctx.health.pubsub.store(true, Ordering::Relaxed);
        let Conn::Cluster(mut cluster) = ctx.conn() else {
            unreachable!("sharded means a cluster connection")
        };
        if let Err(e) = cluster.ssubscribe(control::channel(&ctx.keys.prefix)).await {
            let _ = started.send(Err(format!("cannot subscribe to the control channel: {e}")));
            return;
        }
        tokio::spawn(shard_messages(ctx.clone(), push_rx));
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        tokio::spawn(subscription_loop(ctx.clone(), rx));
        Some(tx)
    } else {
        let (subscribed_tx, subscribed_rx) = tokio::sync::oneshot::channel();
        tokio::spawn(pubsub_loop(
            client.clone(),
            ctx.clone(),
            conn.clone(),
            subscribed_tx,
        ));
        if subscribed_rx.await.is_err() {
            let _ = started.send(Err("cannot subscribe to Redis Pub/Sub".into()));
            return;
        }
        None
    };
    tokio::spawn(health_loop(ctx.clone(), (client.clone(), push_tx)));
    if sharded && !ctx.settings.ingest.is_empty() {
        tracing::warn!("redis_ingest is not supported on a Redis Cluster yet: ignored");
    } else {
        ingest::start(&ctx, &client, &ctx.settings.ingest);
    }
    tokio::spawn(control::refresh_loop(ctx.clone()));
    tokio::spawn(control::presence::run(ctx.clone(), presence_changes));
    let _ = started.send(Ok(Started {
        epoch,
        sharded,
        overrides,
    }));
    let mut publishes = Vec::new();
    while let Some(cmd) = rx.recv().await {
        let mut next = Some(cmd);
        while let Some(cmd) = next.take().or_else(|| rx.try_recv().ok()) {
            match cmd {
                Cmd::Publish { groups, reply } => publishes.push((groups, reply)),
                Cmd::Read(_) | Cmd::Unsubscribe(_) if subscriptions.is_some() => {
                    let _ = subscriptions.as_ref().expect("checked").send(cmd);
                }
                Cmd::Read(read) => {
                    tokio::spawn(read_and_answer(ctx.clone(), ctx.conn(), read));
                }
                Cmd::Unsubscribe(_) => {}
                // In the order they came: a refresh must not overtake a leave.
                Cmd::Control(control::Cmd::Presence(change)) => ctx.control.queue_presence(change),
                Cmd::Control(cmd) => {
                    tokio::spawn(control::handle(ctx.clone(), cmd));
                }
            }
        }
        if !publishes.is_empty() {
            let batch = std::mem::take(&mut publishes);
            tokio::spawn(publish_all(ctx.clone(), ctx.conn(), batch));
        }
    }
}

/// Reads `channel`'s stream after `after` and sends the answer to its owner `core`.
async fn read_and_answer(ctx: Arc<Ctx>, mut conn: Conn, cmd: ReadCmd) {
    let ReadCmd {
        channel,
        after,
        core,
        id,
    } = cmd;
    let read = read_stream(&ctx, &mut conn, &channel, after).await;
    debug_assert_eq!(channel::owner_core(&channel, ctx.mesh.cores()), core);
    let read = read.ok();
    ctx.mesh.send(core, MeshMsg::Read { channel, id, read });
}

/// Sharded mode: subscribes a channel before its first read and unsubscribes it when the node
/// forgot it, one operation at a time, in the order the cores asked (so an unsubscribe and a
/// new subscription of the same channel cannot overtake each other).
async fn subscription_loop(ctx: Arc<Ctx>, mut rx: tokio::sync::mpsc::UnboundedReceiver<Cmd>) {
    let mut subscribed: std::collections::HashSet<Arc<str>> = Default::default();
    while let Some(cmd) = rx.recv().await {
        let conn = ctx.conn();
        let Conn::Cluster(mut cluster) = conn.clone() else {
            return;
        };
        match cmd {
            Cmd::Read(read) => {
                if ctx.health.resubscribe.swap(false, Ordering::Relaxed) {
                    subscribed.clear(); // after a disconnection: subscribe everything again
                }
                if !subscribed.contains(&read.channel) {
                    let shard = ctx.keys.shard_channel(&read.channel);
                    let done =
                        tokio::time::timeout(ctx.settings.timeout, cluster.ssubscribe(&shard))
                            .await;
                    if matches!(done, Ok(Ok(()))) {
                        subscribed.insert(read.channel.clone());
                    } else {
                        // Not subscribed: the read fails too, and the next one tries again.
                        let (channel, id) = (read.channel, read.id);
                        ctx.mesh.send(
                            read.core,
                            MeshMsg::Read {
                                channel,
                                id,
                                read: None,
                            },
                        );
                        continue;
                    }
                }
                tokio::spawn(read_and_answer(ctx.clone(), conn, read));
            }
            Cmd::Unsubscribe(channel) => {
                if subscribed.remove(&channel) {
                    let shard = ctx.keys.shard_channel(&channel);
                    let _ =
                        tokio::time::timeout(ctx.settings.timeout, cluster.sunsubscribe(&shard))
                            .await;
                }
            }
            Cmd::Publish { .. } | Cmd::Control(_) => {}
        }
    }
}

/// Sharded mode: the messages of the channels this node subscribed, to their owner cores; a
/// lost connection to a shard means messages may have been missed, so every core reads its
/// channels again once it is back.
async fn shard_messages(
    ctx: Arc<Ctx>,
    mut pushes: tokio::sync::mpsc::UnboundedReceiver<redis::PushInfo>,
) {
    let control = control::channel(&ctx.keys.prefix);
    while let Some(push) = pushes.recv().await {
        match push.kind {
            redis::PushKind::SMessage => {
                let Some(Value::BulkString(payload)) = push.data.get(1) else {
                    continue;
                };
                if matches!(push.data.first(), Some(Value::BulkString(c)) if *c == control.as_bytes())
                {
                    control::on_message(&ctx, payload);
                    continue;
                }
                match Batch::parse(payload) {
                    Ok(batch) => {
                        let owner = channel::owner_core(&batch.channel, ctx.mesh.cores());
                        ctx.mesh.send(owner, MeshMsg::Remote(batch));
                    }
                    Err(e) => unreadable(&e),
                }
            }
            redis::PushKind::Disconnection => {
                tracing::warn!("lost a Redis Cluster connection; reading every channel again");
                ctx.health.resubscribe.store(true, Ordering::Relaxed);
                let ctx = ctx.clone();
                tokio::spawn(async move {
                    // The client reconnects (and resubscribes) by itself; give it a moment.
                    tokio::time::sleep(Duration::from_millis(500)).await;
                    for core in 0..ctx.mesh.cores() {
                        ctx.mesh.send(core, MeshMsg::Resync);
                    }
                    control::reload_overrides(&ctx).await;
                });
            }
            _ => {}
        }
    }
}

/// What the Redis thread tells `Redis::start` once the node may serve.
struct Started {
    epoch: String,
    sharded: bool,
    overrides: HashMap<String, Overrides>,
}

struct Ctx {
    settings: ClusterSettings,
    control: control::State,
    keys: Keys,
    mesh: Mesh,
    health: Arc<Health>,
    publish: Script,
    read: Script,
    epoch: String,
    /// The way into this thread's command loop (for the ingest's publishes).
    commands: tokio::sync::mpsc::UnboundedSender<Cmd>,
    /// Redis is a Redis Cluster: one script call per channel, sharded Pub/Sub.
    sharded: bool,
    /// The command connection in use (a Redis Cluster's is made anew when it stops answering).
    conn: std::sync::RwLock<Conn>,
}

impl Ctx {
    fn conn(&self) -> Conn {
        self.conn.read().expect("not poisoned").clone()
    }
}

type Request = (Vec<Group>, Option<Reply>);

/// Sets the cluster's epoch if Redis has none (a new deployment, or Redis lost its data:
/// then this node's epoch carries on) and returns the one in force.
async fn agree_on_epoch(conn: &mut Conn, keys: &Keys, mine: &str) -> RedisResult<String> {
    let (_, epoch): (Value, String) = redis::pipe()
        .cmd("SET")
        .arg(keys.epoch())
        .arg(mine)
        .arg("NX")
        .cmd("GET")
        .arg(keys.epoch())
        .query_async(conn)
        .await?;
    Ok(epoch)
}

/// One pipeline for every request of a wake-up, one script call per request (on a Redis
/// Cluster: per channel, since a script's keys must share a slot); a script Redis has
/// forgotten (it restarted) is loaded and the calls that met it are sent again.
async fn publish_all(ctx: Arc<Ctx>, mut conn: Conn, requests: Vec<Request>) {
    let timeout = ctx.settings.timeout;
    // Each call: (its request, the groups it carries).
    let calls: Vec<(usize, &[Group])> = requests
        .iter()
        .enumerate()
        .flat_map(|(r, (groups, _))| {
            let calls: Vec<(usize, &[Group])> = if ctx.sharded {
                groups.chunks(1).map(|g| (r, g)).collect()
            } else {
                vec![(r, &groups[..])]
            };
            calls
        })
        .collect();
    let outcome = tokio::time::timeout(timeout, async {
        let mut results = run_publishes(&ctx, &mut conn, calls.iter().map(|c| c.1)).await?;
        let forgotten: Vec<usize> = (0..results.len())
            .filter(|&i| matches!(&results[i], Err(e) if e.kind() == redis::ErrorKind::Server(redis::ServerErrorKind::NoScript)))
            .collect();
        if !forgotten.is_empty() {
            ctx.publish.prepare_invoke().load_async(&mut conn).await?;
            let again = forgotten.iter().map(|&i| calls[i].1);
            let retried = run_publishes(&ctx, &mut conn, again).await?;
            for (i, r) in forgotten.into_iter().zip(retried) {
                results[i] = r;
            }
        }
        RedisResult::Ok(results)
    })
    .await;
    let results: Vec<Result<Value, String>> = match outcome {
        Ok(Ok(results)) => results
            .into_iter()
            .map(|r| r.map_err(|e| e.to_string()))
            .collect(),
        Ok(Err(e)) => vec![Err(e.to_string()); calls.len()],
        Err(_) => vec![Err(format!("no answer within {} ms", timeout.as_millis())); calls.len()],
    };
    let failed = results.iter().any(|r| r.is_err());
    ctx.health.commands.store(!failed, Ordering::Relaxed);
    let mut answers: Vec<Result<Seqs, Unavailable>> = vec![Ok(Vec::new()); requests.len()];
    for ((r, groups), result) in calls.iter().zip(results) {
        let seqs = result.map_err(Unavailable).and_then(|v| {
            seqs_of(groups, &v).ok_or_else(|| Unavailable("unexpected answer from Redis".into()))
        });
        match (&mut answers[*r], seqs) {
            (Ok(all), Ok(seqs)) => all.extend(seqs),
            (answer @ Ok(_), Err(e)) => *answer = Err(e),
            (Err(_), _) => {}
        }
    }
    for ((_, reply), answer) in requests.into_iter().zip(answers) {
        if let Err(e) = &answer {
            tracing::warn!(error = %e, "publish to Redis failed");
        }
        if let Some(reply) = reply {
            let _ = reply.send(answer);
        }
    }
}

async fn run_publishes<'a>(
    ctx: &Ctx,
    conn: &mut Conn,
    calls: impl IntoIterator<Item = &'a [Group]>,
) -> RedisResult<Vec<RedisResult<Value>>> {
    if ctx.sharded {
        // A cluster pipeline must stay in one slot: each call goes on its own, all at once
        // (the cluster connection batches what goes to one master).
        let calls = calls.into_iter().map(|groups| {
            let mut conn = conn.clone();
            let inv = invocation(ctx, "", groups);
            async move { inv.invoke_async::<Value>(&mut conn).await }
        });
        return Ok(futures_util::future::join_all(calls).await);
    }
    let mut pipe = redis::pipe();
    pipe.ignore_errors();
    let events = ctx.keys.events();
    for groups in calls {
        pipe.invoke_script(&invocation(ctx, &events, groups));
    }
    if pipe.is_empty() {
        return Ok(Vec::new());
    }
    pipe.query_async(conn).await
}

/// The publish script's call for `groups`; `events` is the nodes' Pub/Sub channel, or empty
/// for each channel's own shard channel (a Redis Cluster).
fn invocation<'s>(ctx: &'s Ctx, events: &str, groups: &[Group]) -> redis::ScriptInvocation<'s> {
    let mut inv = ctx.publish.prepare_invoke();
    inv.arg(events)
        .arg(ctx.settings.ring.max_messages)
        .arg(ctx.settings.ring.max_age_ms.max(1));
    for g in groups {
        inv.key(ctx.keys.meta(&g.channel))
            .key(ctx.keys.stream(&g.channel))
            .arg(&*g.channel)
            .arg(g.indexes.len());
        for e in &g.entries {
            inv.arg(e.as_slice());
        }
    }
    inv
}

/// The seqs of a request from the script's answer: per channel, its first seq.
fn seqs_of(groups: &[Group], answer: &Value) -> Option<Seqs> {
    let Value::Array(per_channel) = answer else {
        return None;
    };
    let mut seqs = Vec::new();
    for (g, v) in groups.iter().zip(per_channel) {
        let Value::Array(pair) = v else { return None };
        let first = number(pair.get(1)?)?;
        seqs.extend(
            g.indexes
                .iter()
                .enumerate()
                .map(|(k, &i)| (i, first + k as u64)),
        );
    }
    (seqs.len() == groups.iter().map(|g| g.indexes.len()).sum::<usize>()).then_some(seqs)
}

fn number(v: &Value) -> Option<u64> {
    match v {
        Value::Int(n) => u64::try_from(*n).ok(),
        Value::BulkString(b) => std::str::from_utf8(b).ok()?.parse().ok(),
        Value::SimpleString(s) => s.parse().ok(),
        _ => None,
    }
}

/// `channel`'s life, last seq and its durable entries after `after`, page by page.
async fn read_stream(
    ctx: &Ctx,
    conn: &mut Conn,
    channel: &str,
    after: u64,
) -> Result<Read, String> {
    let mut read = Read::default();
    let mut from = after + 1;
    loop {
        let mut inv = ctx.read.key(ctx.keys.meta(channel));
        inv.key(ctx.keys.stream(channel)).arg(from).arg(PAGE);
        let page: Value = tokio::time::timeout(ctx.settings.timeout, inv.invoke_async(conn))
            .await
            .map_err(|_| "no answer".to_owned())?
            .map_err(|e| e.to_string())?;
        let Value::Array(parts) = page else {
            return Err("unexpected answer".into());
        };
        if parts.is_empty() {
            return Ok(Read::default()); // no such channel in Redis
        }
        let (life, last) = match (
            parts.first().and_then(number),
            parts.get(1).and_then(number),
        ) {
            (Some(l), Some(s)) => (l, s),
            _ => return Err("unexpected meta".into()),
        };
        if read.life != 0 && read.life != life {
            return Ok(Read::default()); // the channel started a new life while we read
        }
        read.life = life;
        read.last = last;
        read.last_durable = parts.get(3).and_then(number).unwrap_or(life);
        let entries = match parts.get(2) {
            Some(Value::Array(e)) => e,
            _ => return Err("unexpected entries".into()),
        };
        for e in entries {
            match stored(e) {
                Some(s) => read.entries.push(s),
                None => return Err("unreadable stream entry".into()),
            }
        }
        if entries.len() < PAGE {
            return Ok(read);
        }
        from = read.entries.last().map_or(from, |s| s.seq + 1);
    }
}

/// Logs a Pub/Sub message this node could not read, at most one line every 10 s (a flood of
/// them must not become a flood of log lines).
fn unreadable(e: &wire::WireError) {
    static LOG: SharedRateLimitedLog = SharedRateLimitedLog::new();
    if let Some(held_back) = LOG.ready() {
        tracing::warn!(error = %e, held_back, "unreadable message on Redis Pub/Sub: skipped");
    }
}

/// One `XRANGE` item: `[id, [field, value, …]]`.
fn stored(v: &Value) -> Option<Stored> {
    let Value::Array(item) = v else { return None };
    let id = match item.first()? {
        Value::BulkString(b) => std::str::from_utf8(b).ok()?,
        _ => return None,
    };
    let seq = id.split_once('-')?.0.parse().ok()?;
    let Value::Array(fields) = item.get(1)? else {
        return None;
    };
    let (mut prev, mut entry) = (None, None);
    for pair in fields.chunks(2) {
        match (&pair[0], pair.get(1)) {
            (Value::BulkString(k), Some(v)) if k == b"p" => prev = number(v),
            (Value::BulkString(k), Some(Value::BulkString(v))) if k == b"e" => {
                entry = Entry::decode(v).ok()
            }
            _ => {}
        }
    }
    Some(Stored {
        seq,
        prev: prev?,
        entry: entry?,
    })
}

/// Keeps one Pub/Sub subscription for the node, reconnecting with backoff; after a reconnect
/// every core re-reads its channels. The first subscription is reported on `subscribed`.
async fn pubsub_loop(
    client: redis::Client,
    ctx: Arc<Ctx>,
    mut conn: Conn,
    subscribed: tokio::sync::oneshot::Sender<()>,
) {
    let mut subscribed = Some(subscribed);
    let mut backoff = Duration::from_millis(50);
    let events = ctx.keys.events();
    let control = control::channel(&ctx.keys.prefix);
    loop {
        let connected = tokio::time::timeout(ctx.settings.timeout, async {
            let mut pubsub = client.get_async_pubsub().await?;
            pubsub.subscribe(&[&events, &control]).await?;
            RedisResult::Ok(pubsub)
        })
        .await;
        let pubsub = match connected {
            Ok(Ok(p)) => p,
            _ => {
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(2));
                continue;
            }
        };
        backoff = Duration::from_millis(50);
        ctx.health.pubsub.store(true, Ordering::Relaxed);
        match subscribed.take() {
            Some(first) => {
                let _ = first.send(());
            }
            None => {
                // Redis may have lost everything (a restart without persistence): the epoch
                // carries on, and every channel is read again.
                if let Err(e) = agree_on_epoch(&mut conn, &ctx.keys, &ctx.epoch).await {
                    tracing::warn!(error = %e, "cannot check the cluster epoch in Redis");
                }
                tracing::info!("Redis Pub/Sub is back; reading every channel's stream again");
                for core in 0..ctx.mesh.cores() {
                    ctx.mesh.send(core, MeshMsg::Resync);
                }
                // Admin changes made meanwhile reached this node by no message: read them.
                let ctx = ctx.clone();
                tokio::spawn(async move { control::reload_overrides(&ctx).await });
            }
        }
        // A connection that went away without a word (a lost host, a failover behind a
        // virtual address) shows as a ping without answer.
        let (mut sink, mut messages) = pubsub.split();
        let mut ping = tokio::time::interval(PUBSUB_PING);
        loop {
            tokio::select! {
                msg = messages.next() => {
                    let Some(msg) = msg else { break };
                    if msg.get_channel_name() == control {
                        control::on_message(&ctx, msg.get_payload_bytes());
                        continue;
                    }
                    match Batch::parse(msg.get_payload_bytes()) {
                        Ok(batch) => {
                            let owner = channel::owner_core(&batch.channel, ctx.mesh.cores());
                            ctx.mesh.send(owner, MeshMsg::Remote(batch));
                        }
                        Err(e) => unreadable(&e),
                    }
                }
                _ = ping.tick() => {
                    let answer = tokio::time::timeout(ctx.settings.timeout, sink.ping::<Value>()).await;
                    if !matches!(answer, Ok(Ok(_))) {
                        break;
                    }
                }
            }
        }
        ctx.health.pubsub.store(false, Ordering::Relaxed);
        tracing::warn!("lost the Redis Pub/Sub connection; reconnecting");
    }
}

/// Checks Redis once a second, so that a stalled Redis shows in `/readyz` even while nobody
/// publishes.
/// It also keeps the cluster's epoch in Redis (it is written again within a second of Redis
/// losing it), and says so when Redis holds another one than this node's.
///
/// A Redis Cluster connection that has not answered for `REBUILD_AFTER` checks in a row is
/// made anew (we have seen one stay stuck after a master restarted under load), and every
/// core then reads its channels again, subscribing them on the new connection.
async fn health_loop(
    ctx: Arc<Ctx>,
    (client, pushes): (
        redis::Client,
        tokio::sync::mpsc::UnboundedSender<redis::PushInfo>,
    ),
) {
    const REBUILD_AFTER: u32 = 3;
    let mut was_up = true;
    let mut other_epoch = None;
    let mut failures = 0;
    loop {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let mut conn = ctx.conn();
        let check = agree_on_epoch(&mut conn, &ctx.keys, &ctx.epoch);
        let answer = tokio::time::timeout(ctx.settings.timeout, check).await;
        let up = matches!(answer, Ok(Ok(_)));
        failures = if up { 0 } else { failures + 1 };
        if ctx.sharded && failures >= REBUILD_AFTER {
            failures = 0;
            let fresh = tokio::time::timeout(
                ctx.settings.timeout,
                connect(&client, &ctx.settings, pushes.clone()),
            )
            .await;
            if let Ok(Ok(mut fresh @ Conn::Cluster(_))) = fresh {
                tracing::warn!("the Redis Cluster connection stopped answering: made anew");
                if let Conn::Cluster(c) = &mut fresh {
                    let control = control::channel(&ctx.keys.prefix);
                    if let Err(e) = c.ssubscribe(control).await {
                        tracing::warn!(error = %e, "cannot subscribe to the control channel");
                    }
                }
                *ctx.conn.write().expect("not poisoned") = fresh;
                let again = ctx.clone();
                tokio::spawn(async move { control::reload_overrides(&again).await });
                ctx.health.resubscribe.store(true, Ordering::Relaxed);
                for core in 0..ctx.mesh.cores() {
                    ctx.mesh.send(core, MeshMsg::Resync);
                }
            }
        }
        if let Ok(Ok(epoch)) = answer {
            if epoch != ctx.epoch && other_epoch.as_ref() != Some(&epoch) {
                tracing::error!(
                    redis = %epoch,
                    node = %ctx.epoch,
                    "Redis holds another cluster epoch than this node: clients moving to or \
                     from this node get recovered:false; restart it to take Redis's"
                );
            }
            other_epoch = (epoch != ctx.epoch).then_some(epoch);
        }
        ctx.health.commands.store(up, Ordering::Relaxed);
        ctx.health.set_limits_local(!up);
        if up != was_up {
            if up {
                tracing::info!("Redis answers again");
            } else {
                tracing::warn!("Redis does not answer; publishes get 503 until it does");
            }
            was_up = up;
        }
    }
}
