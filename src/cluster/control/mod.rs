//! Cluster mode, the control plane: who is connected where (the registry), connection limits
//! counted over every node, admin commands that reach every node (`admin`), the admins'
//! changes to users' access kept in Redis, and presence across nodes (`presence`).
//!
//! Keys (all in one hash slot, `P:{c}:…`, so that one script may touch them on a Redis Cluster):
//! - `P:{c}:nodes` — hash: instance id → the node's lease (Unix ms, Redis's clock).
//! - `P:{c}:n:I` — hash: node I's connections, id → `[connected_at, user, [projects]]` (JSON).
//! - `P:{c}:u:U` — sorted set: user U's connections (`I.id`) by connect time.
//! - `P:{c}:ev:U` — set: those of them told to close for a newer one (not counted for U).
//! - `P:{c}:p:X` — set: the connections that named project X.
//! - `P:{c}:ip:A` — sorted set: connection attempts from address A in the last minute.
//! - `P:{c}:ov`, `P:{c}:ov:v` — hash: user → the admins' changes (JSON); their version.
//! - `P:{c}:control` — the Pub/Sub channel of admin commands, their answers and evictions.
//!
//! And the registry the operators read, one hash per connection: `ws:connections:I.id`.
//!
//! Invariant: a node's hash `n:I` says which connections it holds; the user and project sets
//! are indexes of it, changed in the same script. Every `refresh` the node sends the list of
//! connections it really holds and the script makes `n:I` (and the indexes) match, so a
//! release that never reached Redis, or connections admitted while Redis was away, are right
//! again within one interval. A node whose lease ran out (it crashed) is forgotten by the
//! next admission anywhere, and its registry hashes are deleted by the node that admitted.

mod admin;
pub mod presence;
mod scripts;

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use redis::{Script, Value};
use serde::{Deserialize, Serialize};

use crate::delivery::access::Overrides;
use crate::delivery::limits::{LimitConfig, Refused, UserPolicy};
use crate::runtime::core::{AdminAnswer, AdminCmd, ConnInfo};
use crate::runtime::shared::now_ms;
use crate::runtime::worker::SharedRateLimitedLog;

use super::{Conn, Ctx};
pub use admin::Elsewhere;
pub(super) use admin::{load_overrides, on_message, reload_overrides};
use admin::{publish, Message};

/// Why the control plane could not do what an admin asked.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ControlError {
    #[error("Redis did not answer in time")]
    Timeout,
    #[error("Redis: {0}")]
    Redis(String),
    #[error("the stored change is not readable: {0}")]
    Stored(String),
    #[error("the user's access kept changing; try again")]
    Busy,
    #[error("the Redis thread ended")]
    Ended,
}

/// How the node takes part in the control plane.
#[derive(Debug, Clone)]
pub struct ControlSettings {
    /// This node's name in the cluster: stable across restarts (its stale entries are
    /// cleared when it starts again), unique among the nodes.
    pub instance: String,
    /// Time to live of a registry hash, refreshed every `refresh`.
    pub registry_ttl: Duration,
    /// How often the node writes its connections (registry, counts, lease) in one batch.
    pub refresh: Duration,
    /// Connections in the whole cluster (0: no cap).
    pub max_connections: u32,
    /// The per-IP, per-user and per-project limits, applied to the cluster's counts.
    pub limits: LimitConfig,
    /// Event frames per second in the whole cluster (0: no limit), split among live nodes.
    pub rate_limit: u32,
    /// The node's own frame rate limit (0: none): the most its share may be, and what holds
    /// while Redis does not answer.
    pub node_rate_limit: u32,
}

impl ControlSettings {
    /// How long a node counts as live after its last refresh.
    fn lease(&self, timeout: Duration) -> Duration {
        self.refresh * 3 + timeout
    }
}

/// What the registry holds of one connection.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Member {
    pub conn: u64,
    pub user: String,
    pub projects: Vec<String>,
    pub ip: IpAddr,
    /// Unix ms.
    pub connected_at: u64,
    /// Unix ms of the client's last answered ping.
    pub last_heartbeat: u64,
    pub transport: &'static str,
}

/// The answer of the cluster's limits to a connection attempt.
#[derive(Debug)]
pub enum Admission {
    /// Counted; the user's oldest connection (instance, id) is to be closed, if any.
    Admitted {
        evict: Option<(String, u64)>,
    },
    Refused(Refused),
}

/// What the cores ask of the control plane (run on the Redis thread).
pub(super) enum Cmd {
    Admit {
        member: Member,
        reply: futures_channel::oneshot::Sender<Option<Admission>>,
    },
    Release {
        conn: u64,
    },
    /// Tell `instance` to close its connection `conn` (the user's oldest, displaced).
    Evict {
        instance: String,
        conn: u64,
    },
    /// Run an admin command on every other node; the answers of those that answered.
    Admin {
        cmd: AdminCmd,
        reply: futures_channel::oneshot::Sender<Result<Elsewhere, ControlError>>,
    },
    /// This node's presence changes on one channel (or a refresh of its users there): the
    /// cluster's are published.
    Presence(crate::delivery::presence::Change),
    /// Who is on a presence channel, in the whole cluster (`None`: Redis did not answer).
    Members {
        channel: Arc<str>,
        reply: futures_channel::oneshot::Sender<Option<Vec<String>>>,
    },
    /// Store an admin's change of `user`'s access; answers the user's changes now in force.
    Store {
        user: String,
        change: Change,
        reply: futures_channel::oneshot::Sender<Result<Overrides, ControlError>>,
    },
    /// Keep a Socket.IO session that went away for its client's recovery on any node.
    KeepSession {
        pid: String,
        record: String,
        ttl: Duration,
    },
    /// Take a kept session (once): `None` if there is none, or Redis did not answer.
    TakeSession {
        pid: String,
        reply: futures_channel::oneshot::Sender<Option<String>>,
    },
}

/// A revocation or a grant, as the admin API took it.
#[derive(Debug, Clone)]
pub enum Change {
    Revoke {
        channels: Vec<String>,
        projects: Vec<String>,
    },
    Grant {
        channels: Vec<String>,
        projects: Vec<String>,
    },
}

impl Change {
    fn apply(&self, o: &mut Overrides) {
        match self {
            Change::Revoke { channels, projects } => o.revoke(channels, projects),
            Change::Grant { channels, projects } => o.grant(channels, projects),
        }
    }
}

/// One node's answer to an admin command.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct NodeAnswer {
    pub instance: String,
    /// Connections (disconnect, grant) or subscriptions (revoke) affected.
    pub count: usize,
    /// `List`: the node's page of connections.
    #[serde(default)]
    pub connections: Vec<ConnInfo>,
}

impl NodeAnswer {
    pub fn of(instance: &str, answers: Vec<AdminAnswer>) -> NodeAnswer {
        let mut out = NodeAnswer {
            instance: instance.to_owned(),
            count: 0,
            connections: Vec::new(),
        };
        for a in answers {
            match a {
                AdminAnswer::Count(n) => out.count += n,
                AdminAnswer::Connections(list) => out.connections.extend(list),
                AdminAnswer::Members(_) | AdminAnswer::Overrides(_) => {}
            }
        }
        out.count += out.connections.len();
        out
    }
}

/// The control plane's state on the Redis thread.
pub(super) struct State {
    pub settings: ControlSettings,
    admit: Script,
    release: Script,
    sync: Script,
    reset: Script,
    live: Script,
    store: Script,
    presence: Script,
    /// Admin commands of this node waiting for other nodes' answers, by id.
    waiting: Mutex<HashMap<u64, tokio::sync::mpsc::UnboundedSender<NodeAnswer>>>,
    next_id: AtomicU64,
    /// Connections released since the running refresh asked the cores: kept out of its
    /// writes, and released again once they are done.
    released: Mutex<Option<Vec<u64>>>,
    /// This node's connections Redis counts, by id, with their connect time (Unix ms): the
    /// others (admitted while Redis was away) are settled by the next refresh.
    held: Mutex<HashMap<u64, u64>>,
    /// The version of the admins' changes this node holds.
    version: AtomicU64,
    /// Presence changes, to the one task that records them in order.
    /// Bounded: while Redis stalls, changes past `PRESENCE_QUEUE` are dropped (logged); the
    /// refreshes after it announce who is there again.
    presence_queue: tokio::sync::mpsc::Sender<crate::delivery::presence::Change>,
    /// Member lists read from Redis in the last second, by channel (see `presence::members`).
    members: presence::Recent,
    /// This run of the node, told apart from another node that took the same instance id.
    run: String,
}

impl State {
    /// The state, and the receiving end of the presence queue (for `presence::run`).
    pub fn new(
        settings: ControlSettings,
    ) -> (
        State,
        tokio::sync::mpsc::Receiver<crate::delivery::presence::Change>,
    ) {
        let script = |body: &str| Script::new(&format!("{}{body}", scripts::PRELUDE));
        let (presence_queue, changes) = tokio::sync::mpsc::channel(PRESENCE_QUEUE);
        let state = State {
            settings,
            admit: script(scripts::ADMIT),
            release: script(scripts::RELEASE),
            sync: script(scripts::SYNC),
            reset: script(scripts::RESET),
            live: script(scripts::LIVE),
            store: script(scripts::STORE),
            presence: Script::new(scripts::PRESENCE),
            waiting: Default::default(),
            next_id: Default::default(),
            released: Default::default(),
            held: Default::default(),
            version: Default::default(),
            presence_queue,
            members: Default::default(),
            run: format!("{:016x}", rand::random::<u64>()),
        };
        (state, changes)
    }

    /// Queues one channel's presence changes (in the order they come).
    pub fn queue_presence(&self, change: crate::delivery::presence::Change) {
        static LOG: SharedRateLimitedLog = SharedRateLimitedLog::new();
        if self.presence_queue.try_send(change).is_err() {
            if let Some(held_back) = LOG.ready() {
                tracing::warn!(
                    held_back,
                    "presence changes wait for Redis past the bound: dropped"
                );
            }
        }
    }

    fn version(&self) -> u64 {
        self.version.load(Ordering::Relaxed)
    }

    pub(in crate::cluster) fn seen_version(&self, v: u64) {
        self.version.store(v, Ordering::Relaxed);
    }
}

/// Presence changes that may wait for Redis at once (one per channel and tick that changed).
const PRESENCE_QUEUE: usize = 65_536;

/// The name of a connection across the cluster (the registry's and the admin API's).
pub fn conn_name(instance: &str, conn: u64) -> String {
    format!("{instance}.{conn:x}")
}

fn key_prefix(ctx: &Ctx) -> String {
    format!("{}:{{c}}:", ctx.keys.prefix)
}

/// A key of the control plane's slot: named to every script so that a Redis Cluster runs it
/// on the master that holds them all.
fn slot_key(ctx: &Ctx) -> String {
    format!("{}nodes", key_prefix(ctx))
}

/// The Pub/Sub channel of the control plane.
pub(in crate::cluster) fn channel(prefix: &str) -> String {
    format!("{prefix}:{{c}}:control")
}

fn registry_key(instance: &str, conn: u64) -> String {
    registry_key_of(&conn_name(instance, conn))
}

/// The registry hash of a connection named `name` (`conn_name`).
fn registry_key_of(name: &str) -> String {
    format!("ws:connections:{name}")
}

/// The commands that delete these registry hashes.
fn registry_deletes(keys: impl IntoIterator<Item = String>) -> Vec<redis::Cmd> {
    keys.into_iter()
        .map(|key| redis::cmd("DEL").arg(key).clone())
        .collect()
}

/// The commands that write one connection's registry hash.
fn registry_write(s: &ControlSettings, m: &Member) -> [redis::Cmd; 2] {
    let key = registry_key(&s.instance, m.conn);
    let mut hset = redis::cmd("HSET");
    hset.arg(&key)
        .arg("user_id")
        .arg(&m.user)
        .arg("connected_at")
        .arg(m.connected_at)
        .arg("last_heartbeat")
        .arg(m.last_heartbeat)
        .arg("instance_id")
        .arg(&s.instance)
        .arg("ip")
        .arg(m.ip.to_string())
        .arg("project_ids")
        .arg(m.projects.join(","))
        .arg("transport")
        .arg(m.transport);
    let mut expire = redis::cmd("PEXPIRE");
    expire.arg(&key).arg(s.registry_ttl.as_millis() as u64);
    [hset, expire]
}

fn member_value(m: &Member) -> String {
    serde_json::json!([m.connected_at, m.user, m.projects]).to_string()
}

/// Sends `cmds` without looking at their answers: one pipeline on one Redis, each on its own
/// on a Redis Cluster (their keys live in different slots).
async fn send_all(ctx: &Ctx, cmds: Vec<redis::Cmd>) -> bool {
    if cmds.is_empty() {
        return true;
    }
    let mut conn = ctx.conn();
    let timeout = ctx.settings.timeout;
    let sent = match &mut conn {
        Conn::Single(_) => {
            let mut pipe = redis::pipe();
            for c in cmds {
                pipe.add_command(c).ignore();
            }
            let done = tokio::time::timeout(timeout, pipe.query_async::<()>(&mut conn)).await;
            matches!(done, Ok(Ok(())))
        }
        Conn::Cluster(_) => {
            let calls = cmds.into_iter().map(|c| {
                let mut conn = conn.clone();
                async move { c.query_async::<Value>(&mut conn).await.is_ok() }
            });
            let all = futures_util::future::join_all(calls);
            matches!(tokio::time::timeout(timeout, all).await, Ok(v) if v.iter().all(|ok| *ok))
        }
    };
    sent
}

/// Runs one control command (on its own task of the Redis thread).
pub(super) async fn handle(ctx: Arc<Ctx>, cmd: Cmd) {
    match cmd {
        Cmd::Admit { member, reply } => {
            let (answer, gone) = match admit(&ctx, &member).await {
                Some((answer, gone)) => (Some(answer), gone),
                None => (None, Vec::new()),
            };
            let admitted = matches!(answer, Some(Admission::Admitted { .. }));
            if admitted {
                let held = &ctx.control.held;
                held.lock()
                    .expect("not poisoned")
                    .insert(member.conn, member.connected_at);
            }
            // The handshake goes on now; the registry is written behind it.
            let _ = reply.send(answer);
            let s = &ctx.control.settings;
            let mut writes = registry_deletes(gone.iter().map(|name| registry_key_of(name)));
            if admitted {
                writes.extend(registry_write(s, &member));
            }
            send_all(&ctx, writes).await;
        }
        Cmd::Release { conn } => {
            if let Some(released) = ctx.control.released.lock().expect("not poisoned").as_mut() {
                released.push(conn);
            }
            let held = ctx.control.held.lock().expect("not poisoned").remove(&conn);
            if held.is_some() {
                release(&ctx, &[conn]).await;
            } // else admitted while Redis was away: the next refresh settles it
        }
        Cmd::Evict { instance, conn } => {
            publish(&ctx, &Message::Close { to: instance, conn }).await;
        }
        Cmd::Admin { cmd, reply } => {
            let _ = reply.send(admin::everywhere(&ctx, cmd).await);
        }
        Cmd::Presence(change) => ctx.control.queue_presence(change),
        Cmd::Members { channel, reply } => {
            let list = presence::members(&ctx, &channel).await;
            let _ = reply.send(list.map(|l| l.as_ref().clone()));
        }
        Cmd::Store {
            user,
            change,
            reply,
        } => {
            let _ = reply.send(admin::store(&ctx, &user, &change).await);
        }
        Cmd::KeepSession { pid, record, ttl } => keep_session(&ctx, &pid, &record, ttl).await,
        Cmd::TakeSession { pid, reply } => {
            let _ = reply.send(take_session(&ctx, &pid).await);
        }
    }
}

/// The key of a kept Socket.IO session.
fn session_key(ctx: &Ctx, pid: &str) -> String {
    format!("{}:sio:{pid}", ctx.keys.prefix)
}

async fn keep_session(ctx: &Ctx, pid: &str, record: &str, ttl: Duration) {
    let mut cmd = redis::cmd("SET");
    cmd.arg(session_key(ctx, pid))
        .arg(record)
        .arg("PX")
        .arg(ttl.as_millis().max(1) as u64);
    let mut conn = ctx.conn();
    let done = tokio::time::timeout(ctx.settings.timeout, cmd.query_async::<()>(&mut conn));
    if !matches!(done.await, Ok(Ok(()))) {
        tracing::debug!("a Socket.IO session could not be kept in Redis: it will not recover");
    }
}

async fn take_session(ctx: &Ctx, pid: &str) -> Option<String> {
    let mut cmd = redis::cmd("GETDEL");
    cmd.arg(session_key(ctx, pid));
    let mut conn = ctx.conn();
    let taken = tokio::time::timeout(
        ctx.settings.timeout,
        cmd.query_async::<Option<String>>(&mut conn),
    );
    taken.await.ok()?.ok()?
}

/// Takes connections off the cluster's counts and the registry (again, harmlessly, if they
/// were already).
async fn release(ctx: &Ctx, conns: &[u64]) {
    let s = &ctx.control.settings;
    let mut c = ctx.conn();
    for conn in conns {
        let mut call = ctx.control.release.prepare_invoke();
        call.key(slot_key(ctx))
            .arg(key_prefix(ctx))
            .arg(&s.instance)
            .arg(format!("{conn:x}"));
        let _ =
            tokio::time::timeout(ctx.settings.timeout, call.invoke_async::<Value>(&mut c)).await;
    }
    let dels = registry_deletes(conns.iter().map(|&conn| registry_key(&s.instance, conn)));
    send_all(ctx, dels).await;
}

/// Asks the cluster's counts: the answer and the members of dead nodes Redis forgot (whose
/// registry hashes go too); `None` when Redis did not answer in time.
async fn admit(ctx: &Ctx, m: &Member) -> Option<(Admission, Vec<String>)> {
    let s = &ctx.control.settings;
    let l = s.limits;
    let ip_limit = if l.limit_loopback || !m.ip.is_loopback() {
        l.per_ip_per_minute
    } else {
        0
    };
    let mut call = ctx.control.admit.prepare_invoke();
    call.key(slot_key(ctx))
        .arg(key_prefix(ctx))
        .arg(&s.instance)
        .arg(format!("{:x}", m.conn))
        .arg(s.lease(ctx.settings.timeout).as_millis() as u64)
        .arg(member_value(m))
        .arg(l.per_user)
        .arg(u8::from(l.user_policy == UserPolicy::CloseOldest))
        .arg(l.per_project)
        .arg(s.max_connections)
        .arg(ip_limit)
        .arg(m.ip.to_string());
    let mut conn = ctx.conn();
    let answer = tokio::time::timeout(
        ctx.settings.timeout,
        call.invoke_async::<(String, String, Vec<String>)>(&mut conn),
    );
    let (kind, detail, gone) = match answer.await {
        Ok(Ok(a)) => a,
        Ok(Err(e)) => {
            admission_failed(&e.to_string());
            return None;
        }
        Err(_) => {
            admission_failed("timed out");
            return None;
        }
    };
    let refused = |status, retry_after_secs, reason| {
        Admission::Refused(Refused {
            status,
            retry_after_secs: Some(retry_after_secs),
            reason,
        })
    };
    let admission = match kind.as_str() {
        "ok" => Admission::Admitted {
            evict: detail.rsplit_once('.').and_then(|(instance, conn)| {
                Some((instance.to_owned(), u64::from_str_radix(conn, 16).ok()?))
            }),
        },
        "ip" => refused(
            429,
            detail
                .parse::<u64>()
                .unwrap_or(60_000)
                .div_ceil(1000)
                .max(1),
            format!(
                "more than {} connections per minute from {}",
                l.per_ip_per_minute, m.ip
            ),
        ),
        "total" => refused(
            503,
            5,
            format!("the cluster holds its maximum of {detail} connections"),
        ),
        "project" => refused(
            503,
            5,
            format!(
                "project {detail} has its maximum of {} connections",
                l.per_project
            ),
        ),
        _ => refused(
            429,
            5,
            format!("user {} already has {} connections", m.user, l.per_user),
        ),
    };
    Some((admission, gone))
}

/// An admission Redis did not answer: said at most every 10 s.
fn admission_failed(why: &str) {
    static LOG: SharedRateLimitedLog = SharedRateLimitedLog::new();
    if let Some(held_back) = LOG.ready() {
        tracing::warn!(
            why,
            held_back,
            "a cluster admission failed: this node's counts decided"
        );
    }
}

/// Clears what Redis holds of an earlier run of this node (same instance id): its counts and
/// its registry hashes.
pub(super) async fn reset(ctx: &Ctx) -> redis::RedisResult<usize> {
    let s = &ctx.control.settings;
    let mut call = ctx.control.reset.prepare_invoke();
    call.key(slot_key(ctx))
        .arg(key_prefix(ctx))
        .arg(&s.instance)
        .arg(s.lease(ctx.settings.timeout).as_millis() as u64);
    let mut conn = ctx.conn();
    let stale: Vec<String> = call.invoke_async(&mut conn).await?;
    // This run's token: another live node with the same instance id overwrites it.
    redis::cmd("SET")
        .arg(run_key(ctx))
        .arg(&ctx.control.run)
        .query_async::<()>(&mut conn)
        .await?;
    let dels = registry_deletes(stale.iter().map(|name| registry_key_of(name)));
    send_all(ctx, dels).await;
    Ok(stale.len())
}

/// Every `refresh`: the node's connections as the cores hold them go to Redis in one batch
/// (counts, registry hashes with their TTL, the node's lease); the cores' presence users are
/// renewed; the admins' changes are read again if their version moved.
pub(super) async fn refresh_loop(ctx: Arc<Ctx>) {
    let s = &ctx.control.settings;
    let mut tick = tokio::time::interval(s.refresh);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut node_rate_now = s.node_rate_limit;
    loop {
        tick.tick().await;
        let started = now_ms();
        *ctx.control.released.lock().expect("not poisoned") = Some(Vec::new());
        let mut members: Vec<Member> = Vec::new();
        for a in ctx.mesh.admin(AdminCmd::Registry).await {
            if let AdminAnswer::Members(m) = a {
                members.extend(m);
            }
        }
        let released_early = released_so_far(&ctx);
        members.retain(|m| !released_early.contains(&m.conn));
        let since = started.saturating_sub(ADMISSION_MARGIN_MS);
        {
            let mut held = ctx.control.held.lock().expect("not poisoned");
            held.retain(|_, at| *at >= since);
            held.extend(members.iter().map(|m| (m.conn, m.connected_at)));
        }
        let mut call = ctx.control.sync.prepare_invoke();
        call.key(slot_key(&ctx))
            .arg(key_prefix(&ctx))
            .arg(&s.instance)
            .arg(s.lease(ctx.settings.timeout).as_millis() as u64)
            // Connections admitted but not yet registered by their core are not in the list:
            // only older entries count as gone.
            .arg(since);
        for m in &members {
            call.arg(format!("{:x}", m.conn)).arg(member_value(m));
        }
        let mut conn = ctx.conn();
        let synced = tokio::time::timeout(
            ctx.settings.timeout * 4,
            call.invoke_async::<(u64, u64, u32)>(&mut conn),
        )
        .await;
        let live_nodes = match synced {
            Ok(Ok((added, removed, live))) => {
                if added + removed > 0 {
                    tracing::info!(
                        added,
                        removed,
                        "the cluster's connection counts were set right"
                    );
                }
                Some(live)
            }
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "registry refresh failed");
                None
            }
            Err(_) => {
                tracing::debug!("registry refresh timed out");
                None
            }
        };
        let rate = node_rate(s, live_nodes);
        if rate != node_rate_now {
            node_rate_now = rate;
            ctx.mesh.admin(AdminCmd::NodeRate { rate }).await;
        }
        let released_now = released_so_far(&ctx);
        let writes = members
            .iter()
            .filter(|m| !released_now.contains(&m.conn))
            .flat_map(|m| registry_write(s, m))
            .collect();
        send_all(&ctx, writes).await;
        // Released while the refresh ran: the refresh may have counted them or written their
        // registry hash again after their release.
        let late = ctx
            .control
            .released
            .lock()
            .expect("not poisoned")
            .take()
            .unwrap_or_default();
        if !late.is_empty() {
            release(&ctx, &late).await;
        }
        ctx.mesh.admin(AdminCmd::PresenceRefresh).await;
        admin::settle_overrides(&ctx).await;
        check_instance_unique(&ctx).await;
    }
}

/// Where a node's run token is kept.
fn run_key(ctx: &Ctx) -> String {
    format!("{}run:{}", key_prefix(ctx), ctx.control.settings.instance)
}

/// Says so (at every refresh) when another node started with this node's instance id: the two
/// would undo each other's counts.
async fn check_instance_unique(ctx: &Ctx) {
    let mut conn = ctx.conn();
    let get = redis::cmd("GET").arg(run_key(ctx)).clone();
    let held = tokio::time::timeout(
        ctx.settings.timeout,
        get.query_async::<Option<String>>(&mut conn),
    );
    match held.await {
        Ok(Ok(Some(token))) if token != ctx.control.run => tracing::error!(
            instance = %ctx.control.settings.instance,
            "another node runs with this node's instance id: the cluster's counts of both are \
             wrong; give each node its own RINGCAST_INSTANCE_ID"
        ),
        Ok(Ok(None)) => {
            // Redis lost it (a restart without persistence): this run's again.
            let set = redis::cmd("SET")
                .arg(run_key(ctx))
                .arg(&ctx.control.run)
                .clone();
            let _ =
                tokio::time::timeout(ctx.settings.timeout, set.query_async::<()>(&mut conn)).await;
        }
        _ => {}
    }
}

/// The connections released since the running refresh began.
fn released_so_far(ctx: &Ctx) -> Vec<u64> {
    let released = ctx.control.released.lock().expect("not poisoned");
    released.clone().unwrap_or_default()
}

/// Event frames per second this node may send: its share of the cluster's rate among the live
/// nodes (and no more than its own limit); its own limit alone while Redis does not answer.
fn node_rate(s: &ControlSettings, live_nodes: Option<u32>) -> u32 {
    match (s.rate_limit, live_nodes) {
        (0, _) | (_, None) => s.node_rate_limit,
        (cluster, Some(live)) => {
            let share = cluster.div_ceil(live.max(1));
            match s.node_rate_limit {
                0 => share,
                own => share.min(own),
            }
        }
    }
}

/// A connection admitted less than this long before a refresh may still be on its way to its
/// core's table.
const ADMISSION_MARGIN_MS: u64 = 5_000;

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(rate_limit: u32, node_rate_limit: u32) -> ControlSettings {
        ControlSettings {
            instance: "n".into(),
            registry_ttl: Duration::from_secs(60),
            refresh: Duration::from_secs(10),
            max_connections: 0,
            limits: LimitConfig::default(),
            rate_limit,
            node_rate_limit,
        }
    }

    #[test]
    fn a_nodes_rate_is_its_share_of_the_clusters_and_its_own_while_redis_is_away() {
        assert_eq!(
            node_rate(&settings(0, 500), Some(3)),
            500,
            "no cluster rate"
        );
        assert_eq!(node_rate(&settings(1000, 0), Some(3)), 334);
        assert_eq!(
            node_rate(&settings(1000, 200), Some(3)),
            200,
            "never above its own"
        );
        assert_eq!(node_rate(&settings(1000, 200), None), 200, "Redis away");
        assert_eq!(node_rate(&settings(1000, 0), Some(0)), 1000);
    }

    #[test]
    fn stored_overrides_read_back_as_written_and_empty_ones_are_deleted() {
        use admin::{decode_overrides, encode_overrides};
        let mut o = Overrides::default();
        assert_eq!(encode_overrides(&o), "", "an empty value deletes the field");
        o.revoke(&["task:1".into()], &["p1".into()]);
        assert_eq!(decode_overrides(&encode_overrides(&o)).unwrap(), o);
        assert!(
            decode_overrides("not json").is_err(),
            "refused, not read as no changes"
        );
    }
}
