//! Cluster mode, the control plane: who is connected where (the registry), connection limits
//! counted over every node, admin commands that reach every node, and the admins' changes to
//! users' access kept in Redis.
//!
//! Keys (all in one hash slot, `P:{c}:…`, so that one script may touch them on a Redis Cluster):
//! - `P:{c}:nodes` — hash: instance id → the node's lease (Unix ms it is live until).
//! - `P:{c}:n:I` — hash: node I's connections, id → `[connected_at, user, [projects]]` (JSON).
//! - `P:{c}:u:U` — sorted set: user U's connections (`I.id`) by connect time.
//! - `P:{c}:p:X` — set: the connections that named project X.
//! - `P:{c}:ip:A` — sorted set: connection attempts from address A in the last minute.
//! - `P:{c}:ov` — hash: user → the admins' changes to that user's access (JSON).
//! - `P:{c}:control` — the Pub/Sub channel of admin commands, their answers and evictions.
//!
//! And the registry the operators read, one hash per connection: `ws:connections:I.id`.
//!
//! Invariant: a node's hash `n:I` says which connections it holds; the user and project sets
//! are indexes of it, changed in the same script. Every `refresh` the node sends the list of
//! connections it really holds and the script makes `n:I` (and the indexes) match, so a
//! release that never reached Redis, or connections admitted while Redis was away, are right
//! again within one interval. A node whose lease ran out (it crashed) is forgotten by the
//! next admission anywhere; its registry hashes expire by their TTL.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use redis::{Script, Value};
use serde::{Deserialize, Serialize};

use crate::delivery::access::Overrides;
use crate::delivery::limits::{LimitConfig, Refused, UserPolicy};
use crate::runtime::core::{AdminAnswer, AdminCmd};
use crate::runtime::shared::now_ms;

use super::{Conn, Ctx};

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
        reply: futures_channel::oneshot::Sender<Result<Elsewhere, String>>,
    },
    /// This node's presence changes on one channel: the cluster's are published.
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
        reply: futures_channel::oneshot::Sender<Result<Overrides, String>>,
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
    pub connections: Vec<crate::runtime::core::ConnInfo>,
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
                AdminAnswer::Members(_) | AdminAnswer::Presence(_) => {}
            }
        }
        out.count += out.connections.len();
        out
    }
}

/// What crosses between nodes on the control channel.
#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "t", rename_all = "snake_case")]
enum Message {
    Close {
        to: String,
        conn: u64,
    },
    Admin {
        from: String,
        id: u64,
        cmd: AdminCmd,
    },
    Answer {
        to: String,
        id: u64,
        answer: NodeAnswer,
    },
}

/// The control plane's state on the Redis thread.
pub(super) struct State {
    pub settings: ControlSettings,
    admit: Script,
    release: Script,
    sync: Script,
    reset: Script,
    store: Script,
    presence: Script,
    /// Admin commands of this node waiting for other nodes' answers, by id.
    waiting: std::sync::Mutex<HashMap<u64, tokio::sync::mpsc::UnboundedSender<NodeAnswer>>>,
    next_id: std::sync::atomic::AtomicU64,
    /// Connections released since the running refresh asked the cores (kept out of it).
    released: std::sync::Mutex<Option<Vec<u64>>>,
    /// This node's connections Redis counts, by id, with their connect time (Unix ms): the
    /// others (admitted while Redis was away) are settled by the next refresh.
    held: std::sync::Mutex<HashMap<u64, u64>>,
}

/// Lua shared by the scripts: add and forget one connection of node `inst`, forget a node.
const PRELUDE: &str = r#"
local pre = ARGV[1]
local function add(inst, conn, value)
  local v = cjson.decode(value)
  local member = inst .. '.' .. conn
  redis.call('HSET', pre .. 'n:' .. inst, conn, value)
  redis.call('ZADD', pre .. 'u:' .. v[2], v[1], member)
  for _, p in ipairs(v[3]) do redis.call('SADD', pre .. 'p:' .. p, member) end
end
local function forget(inst, conn, value)
  local v = cjson.decode(value)
  local member = inst .. '.' .. conn
  redis.call('HDEL', pre .. 'n:' .. inst, conn)
  redis.call('ZREM', pre .. 'u:' .. v[2], member)
  for _, p in ipairs(v[3]) do redis.call('SREM', pre .. 'p:' .. p, member) end
end
local function forget_node(inst)
  local all = redis.call('HGETALL', pre .. 'n:' .. inst)
  local conns = {}
  for i = 1, #all, 2 do
    forget(inst, all[i], all[i + 1])
    conns[#conns + 1] = all[i]
  end
  redis.call('DEL', pre .. 'n:' .. inst)
  redis.call('HDEL', pre .. 'nodes', inst)
  return conns
end
"#;

/// ARGV: prefix, instance, conn, now, lease until, value, per_user, close_oldest,
/// per_project, cap, ip_limit, ip. Answers {'ok', evicted member or ''} or {kind, detail}.
const ADMIT: &str = r#"
local inst, conn, now = ARGV[2], ARGV[3], tonumber(ARGV[4])
local value, per_user, close_oldest = ARGV[6], tonumber(ARGV[7]), ARGV[8] == '1'
local per_project, cap, ip_limit = tonumber(ARGV[9]), tonumber(ARGV[10]), tonumber(ARGV[11])
local v = cjson.decode(value)
local nodes = redis.call('HGETALL', pre .. 'nodes')
local live = {inst}
for i = 1, #nodes, 2 do
  if nodes[i] ~= inst then
    if tonumber(nodes[i + 1]) < now then forget_node(nodes[i]) else live[#live + 1] = nodes[i] end
  end
end
redis.call('HSET', pre .. 'nodes', inst, ARGV[5])
local member = inst .. '.' .. conn
if ip_limit > 0 then
  local key = pre .. 'ip:' .. ARGV[12]
  redis.call('ZREMRANGEBYSCORE', key, '-inf', now - 60000)
  if redis.call('ZCARD', key) >= ip_limit then
    local oldest = redis.call('ZRANGE', key, 0, 0, 'WITHSCORES')
    return {'ip', tostring(tonumber(oldest[2]) + 60000 - now)}
  end
  redis.call('ZADD', key, now, member)
  redis.call('PEXPIRE', key, 60000)
end
if cap > 0 then
  local total = 0
  for _, n in ipairs(live) do total = total + redis.call('HLEN', pre .. 'n:' .. n) end
  if total >= cap then return {'total', tostring(cap)} end
end
if per_project > 0 then
  for _, p in ipairs(v[3]) do
    if redis.call('SCARD', pre .. 'p:' .. p) >= per_project then return {'project', p} end
  end
end
local evict = ''
if per_user > 0 then
  local key = pre .. 'u:' .. v[2]
  if redis.call('ZCARD', key) >= per_user then
    if not close_oldest then return {'user', ''} end
    evict = redis.call('ZRANGE', key, 0, 0)[1]
    redis.call('ZREM', key, evict)
  end
end
add(inst, conn, value)
return {'ok', evict}
"#;

/// ARGV: prefix, instance, conn.
const RELEASE: &str = r#"
local inst, conn = ARGV[2], ARGV[3]
local value = redis.call('HGET', pre .. 'n:' .. inst, conn)
if value then forget(inst, conn, value) end
return value and 1 or 0
"#;

/// ARGV: prefix, instance, lease until, since, now, then (conn, value) pairs of every
/// connection the node holds. Answers {added, removed, live nodes}.
const SYNC: &str = r#"
local inst, since = ARGV[2], tonumber(ARGV[4])
redis.call('HSET', pre .. 'nodes', inst, ARGV[3])
local live = {}
for i = 6, #ARGV, 2 do live[ARGV[i]] = ARGV[i + 1] end
local held = redis.call('HGETALL', pre .. 'n:' .. inst)
local have, added, removed = {}, 0, 0
for i = 1, #held, 2 do
  local conn, value = held[i], held[i + 1]
  have[conn] = true
  if not live[conn] and cjson.decode(value)[1] < since then
    forget(inst, conn, value)
    removed = removed + 1
  end
end
for conn, value in pairs(live) do
  if not have[conn] then
    add(inst, conn, value)
    added = added + 1
  end
end
local nodes, now, alive = redis.call('HGETALL', pre .. 'nodes'), tonumber(ARGV[5]), 0
for i = 2, #nodes, 2 do
  if tonumber(nodes[i]) >= now then alive = alive + 1 end
end
return {added, removed, alive}
"#;

/// ARGV: prefix, instance, lease until. Forgets what Redis holds of an earlier run of this
/// node; answers the connection ids it held.
const RESET: &str = r#"
local conns = forget_node(ARGV[2])
redis.call('HSET', pre .. 'nodes', ARGV[2], ARGV[3])
return conns
"#;

/// ARGV: prefix, user, the value read, the new value ('' deletes). Answers 1, or the value
/// in force when another admin changed it in between.
const STORE: &str = r#"
local key = pre .. 'ov'
local now = redis.call('HGET', key, ARGV[2]) or ''
if now ~= ARGV[3] then return {0, now} end
if ARGV[4] == '' then redis.call('HDEL', key, ARGV[2]) else redis.call('HSET', key, ARGV[2], ARGV[4]) end
return {1, ''}
"#;

/// KEYS: the channel's presence hash. ARGV: instance, now, lease until, joined count, then
/// the joined users and the left ones. Answers {joined, left} of the cluster: a user joins
/// when no other node has them on the channel, and leaves when no node has.
const PRESENCE: &str = r#"
local key, inst, now, lease = KEYS[1], ARGV[1], tonumber(ARGV[2]), ARGV[3]
local n = tonumber(ARGV[4])
local elsewhere = {}
local all = redis.call('HGETALL', key)
for i = 1, #all, 2 do
  local at = string.find(all[i], '|', 1, true)
  local node, user = string.sub(all[i], 1, at - 1), string.sub(all[i], at + 1)
  if tonumber(all[i + 1]) < now then
    redis.call('HDEL', key, all[i])
  elseif node ~= inst then
    elsewhere[user] = true
  end
end
local joined, left = {}, {}
for i = 5, 4 + n do
  local user = ARGV[i]
  if redis.call('HSET', key, inst .. '|' .. user, lease) == 1 and not elsewhere[user] then
    joined[#joined + 1] = user
  end
end
for i = 5 + n, #ARGV do
  local user = ARGV[i]
  if redis.call('HDEL', key, inst .. '|' .. user) == 1 and not elsewhere[user] then
    left[#left + 1] = user
  end
end
redis.call('PEXPIRE', key, tonumber(lease) - now)
return {joined, left}
"#;

fn encode_overrides(o: &Overrides) -> String {
    if o.is_empty() {
        return String::new();
    }
    serde_json::to_string(o).expect("serializable")
}

fn decode_overrides(s: &str) -> Overrides {
    serde_json::from_str(s).unwrap_or_default()
}

impl State {
    pub fn new(settings: ControlSettings) -> State {
        let script = |body: &str| Script::new(&format!("{PRELUDE}{body}"));
        State {
            settings,
            admit: script(ADMIT),
            release: script(RELEASE),
            sync: script(SYNC),
            reset: script(RESET),
            store: script(STORE),
            presence: Script::new(PRESENCE),
            waiting: Default::default(),
            next_id: Default::default(),
            released: Default::default(),
            held: Default::default(),
        }
    }
}

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
pub(super) fn channel(prefix: &str) -> String {
    format!("{prefix}:{{c}}:control")
}

fn registry_key(instance: &str, conn: u64) -> String {
    format!("ws:connections:{}", conn_name(instance, conn))
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
            let answer = admit(&ctx, &member).await;
            if matches!(answer, Some(Admission::Admitted { .. })) {
                let s = &ctx.control.settings;
                ctx.control
                    .held
                    .lock()
                    .expect("not poisoned")
                    .insert(member.conn, member.connected_at);
                send_all(&ctx, registry_write(s, &member).into()).await;
            }
            let _ = reply.send(answer);
        }
        Cmd::Release { conn } => {
            if let Some(released) = ctx.control.released.lock().expect("not poisoned").as_mut() {
                released.push(conn);
            }
            let held = ctx.control.held.lock().expect("not poisoned").remove(&conn);
            if held.is_none() {
                return; // admitted while Redis was away: the next refresh settles it
            }
            let s = &ctx.control.settings;
            let mut release = ctx.control.release.prepare_invoke();
            release.key(slot_key(&ctx));
            release
                .arg(key_prefix(&ctx))
                .arg(&s.instance)
                .arg(format!("{conn:x}"));
            let mut c = ctx.conn();
            let _ =
                tokio::time::timeout(ctx.settings.timeout, release.invoke_async::<Value>(&mut c))
                    .await;
            send_all(
                &ctx,
                vec![redis::cmd("DEL")
                    .arg(registry_key(&s.instance, conn))
                    .clone()],
            )
            .await;
        }
        Cmd::Evict { instance, conn } => {
            publish(&ctx, &Message::Close { to: instance, conn }).await;
        }
        Cmd::Admin { cmd, reply } => {
            let _ = reply.send(admin_everywhere(&ctx, cmd).await);
        }
        Cmd::Presence(change) => presence(&ctx, change).await,
        Cmd::Members { channel, reply } => {
            let _ = reply.send(members(&ctx, &channel).await);
        }
        Cmd::Store {
            user,
            change,
            reply,
        } => {
            let _ = reply.send(store(&ctx, &user, &change).await);
        }
    }
}

/// Asks the cluster's counts; `None` when Redis did not answer in time.
async fn admit(ctx: &Ctx, m: &Member) -> Option<Admission> {
    let s = &ctx.control.settings;
    let l = s.limits;
    let now = now_ms();
    let ip_limit = if l.limit_loopback || !m.ip.is_loopback() {
        l.per_ip_per_minute
    } else {
        0
    };
    let mut call = ctx.control.admit.prepare_invoke();
    call.key(slot_key(ctx));
    call.arg(key_prefix(ctx))
        .arg(&s.instance)
        .arg(format!("{:x}", m.conn))
        .arg(now)
        .arg(now + s.lease(ctx.settings.timeout).as_millis() as u64)
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
        call.invoke_async::<Vec<String>>(&mut conn),
    );
    let answer = match answer.await {
        Ok(Ok(a)) if a.len() == 2 => a,
        Ok(Err(e)) => {
            tracing::debug!(error = %e, "cluster admission failed");
            return None;
        }
        _ => return None,
    };
    let (kind, detail) = (answer[0].as_str(), answer[1].as_str());
    let refused = |status, retry_after_secs, reason| {
        Some(Admission::Refused(Refused {
            status,
            retry_after_secs: Some(retry_after_secs),
            reason,
        }))
    };
    match kind {
        "ok" => Some(Admission::Admitted {
            evict: detail.rsplit_once('.').and_then(|(instance, conn)| {
                Some((instance.to_owned(), u64::from_str_radix(conn, 16).ok()?))
            }),
        }),
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
    }
}

/// Clears what Redis holds of an earlier run of this node (same instance id): its counts and
/// its registry hashes.
pub(super) async fn reset(ctx: &Ctx) -> redis::RedisResult<usize> {
    let s = &ctx.control.settings;
    let mut call = ctx.control.reset.prepare_invoke();
    call.key(slot_key(ctx));
    call.arg(key_prefix(ctx))
        .arg(&s.instance)
        .arg(now_ms() + s.lease(ctx.settings.timeout).as_millis() as u64);
    let mut conn = ctx.conn();
    let stale: Vec<String> = call.invoke_async(&mut conn).await?;
    let dels = stale
        .iter()
        .filter_map(|c| u64::from_str_radix(c, 16).ok())
        .map(|c| redis::cmd("DEL").arg(registry_key(&s.instance, c)).clone())
        .collect();
    send_all(ctx, dels).await;
    Ok(stale.len())
}

/// Every `refresh`: the node's connections as the cores hold them go to Redis in one batch
/// (counts, registry hashes with their TTL, the node's lease).
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
        let released = ctx
            .control
            .released
            .lock()
            .expect("not poisoned")
            .take()
            .unwrap_or_default();
        members.retain(|m| !released.contains(&m.conn));
        let since = started.saturating_sub(ADMISSION_MARGIN_MS);
        {
            let mut held = ctx.control.held.lock().expect("not poisoned");
            held.retain(|_, at| *at >= since);
            held.extend(members.iter().map(|m| (m.conn, m.connected_at)));
        }
        let mut call = ctx.control.sync.prepare_invoke();
        call.key(slot_key(&ctx));
        call.arg(key_prefix(&ctx))
            .arg(&s.instance)
            .arg(started + s.lease(ctx.settings.timeout).as_millis() as u64)
            // Connections admitted but not yet registered by their core are not in the list:
            // only older entries count as gone.
            .arg(since)
            .arg(started);
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
                tracing::debug!(error = %e, "registry refresh failed");
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
            ctx.mesh.admin(AdminCmd::NodeRate(rate)).await;
        }
        let mut writes: Vec<redis::Cmd> =
            members.iter().flat_map(|m| registry_write(s, m)).collect();
        let lease = started + s.lease(ctx.settings.timeout).as_millis() as u64;
        for a in ctx.mesh.admin(AdminCmd::Presence).await {
            if let AdminAnswer::Presence(channels) = a {
                for (channel, users) in channels {
                    let key = ctx.keys.presence(&channel);
                    let mut hset = redis::cmd("HSET");
                    hset.arg(&key);
                    for u in users {
                        hset.arg(format!("{}|{u}", s.instance)).arg(lease);
                    }
                    let mut expire = redis::cmd("PEXPIRE");
                    expire.arg(&key).arg(lease - started);
                    writes.extend([hset, expire]);
                }
            }
        }
        send_all(&ctx, writes).await;
    }
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

async fn publish(ctx: &Ctx, msg: &Message) -> bool {
    let payload = serde_json::to_string(msg).expect("serializable");
    let command = if ctx.sharded { "SPUBLISH" } else { "PUBLISH" };
    let mut cmd = redis::cmd(command);
    cmd.arg(channel(&ctx.keys.prefix)).arg(payload);
    let mut conn = ctx.conn();
    matches!(
        tokio::time::timeout(ctx.settings.timeout, cmd.query_async::<Value>(&mut conn)).await,
        Ok(Ok(_))
    )
}

/// A message on the control channel, from any node (this one included).
pub(super) fn on_message(ctx: &Arc<Ctx>, payload: &[u8]) {
    let msg: Message = match serde_json::from_slice(payload) {
        Ok(m) => m,
        Err(e) => {
            tracing::debug!(error = %e, "unreadable control message");
            return;
        }
    };
    let me = &ctx.control.settings.instance;
    match msg {
        Message::Close { to, conn } if &to == me => {
            ctx.mesh.send(
                (conn >> 48) as usize % ctx.mesh.cores(),
                crate::runtime::mesh::MeshMsg::Close {
                    conn,
                    code: 4008,
                    reason: "replaced by a newer connection of this user",
                },
            );
        }
        Message::Admin { from, id, cmd } if &from != me => {
            let ctx = ctx.clone();
            tokio::spawn(async move {
                let answer =
                    NodeAnswer::of(&ctx.control.settings.instance, ctx.mesh.admin(cmd).await);
                publish(
                    &ctx,
                    &Message::Answer {
                        to: from,
                        id,
                        answer,
                    },
                )
                .await;
            });
        }
        Message::Answer { to, id, answer } if &to == me => {
            if let Some(tx) = ctx.control.waiting.lock().expect("not poisoned").get(&id) {
                let _ = tx.send(answer);
            }
        }
        _ => {}
    }
}

/// Records this node's presence changes of a channel and publishes the cluster's, if any.
async fn presence(ctx: &Ctx, change: crate::delivery::presence::Change) {
    let s = &ctx.control.settings;
    let now = now_ms();
    let mut call = ctx.control.presence.prepare_invoke();
    call.key(ctx.keys.presence(&change.channel))
        .arg(&s.instance)
        .arg(now)
        .arg(now + s.lease(ctx.settings.timeout).as_millis() as u64)
        .arg(change.joined.len())
        .arg(&change.joined)
        .arg(&change.left);
    let mut conn = ctx.conn();
    let answer = tokio::time::timeout(
        ctx.settings.timeout,
        call.invoke_async::<(Vec<String>, Vec<String>)>(&mut conn),
    )
    .await;
    match answer {
        Ok(Ok((joined, left))) if !(joined.is_empty() && left.is_empty()) => {
            let event = crate::delivery::Publication::presence(change.channel, &joined, &left);
            let _ = ctx.commands.send(super::Cmd::Publish {
                groups: super::groups(vec![event], now),
                reply: None,
            });
        }
        Ok(Ok(_)) => {}
        // Redis holds this node's users again at the next refresh; the event is lost.
        _ => tracing::debug!(channel = %change.channel, "presence change not recorded"),
    }
}

/// The users on a presence channel on any live node.
async fn members(ctx: &Ctx, channel: &str) -> Option<Vec<String>> {
    let mut conn = ctx.conn();
    let read = redis::cmd("HGETALL")
        .arg(ctx.keys.presence(channel))
        .clone();
    let all: HashMap<String, u64> =
        match tokio::time::timeout(ctx.settings.timeout, read.query_async(&mut conn)).await {
            Ok(Ok(all)) => all,
            _ => return None,
        };
    let now = now_ms();
    let users: std::collections::BTreeSet<String> = all
        .into_iter()
        .filter(|(_, lease)| *lease >= now)
        .filter_map(|(field, _)| Some(field.split_once('|')?.1.to_owned()))
        .collect();
    Some(users.into_iter().collect())
}

/// The live nodes other than this one, as their leases say.
async fn other_nodes(ctx: &Ctx) -> redis::RedisResult<Vec<String>> {
    let mut conn = ctx.conn();
    let nodes: HashMap<String, u64> = redis::cmd("HGETALL")
        .arg(format!("{}nodes", key_prefix(ctx)))
        .query_async(&mut conn)
        .await?;
    let now = now_ms();
    let me = &ctx.control.settings.instance;
    Ok(nodes
        .into_iter()
        .filter(|(n, lease)| n != me && *lease >= now)
        .map(|(n, _)| n)
        .collect())
}

/// The answers of the other nodes to an admin command, and the nodes that did not answer in
/// time.
pub type Elsewhere = (Vec<NodeAnswer>, Vec<String>);

/// Sends `cmd` to every other live node and gathers their answers until all came or the
/// timeout passed.
async fn admin_everywhere(ctx: &Ctx, cmd: AdminCmd) -> Result<Elsewhere, String> {
    let timeout = ctx.settings.timeout;
    let expected = match tokio::time::timeout(timeout, other_nodes(ctx)).await {
        Ok(Ok(n)) => n,
        Ok(Err(e)) => return Err(format!("Redis: {e}")),
        Err(_) => return Err("Redis did not answer in time".into()),
    };
    if expected.is_empty() {
        return Ok((Vec::new(), Vec::new()));
    }
    let id = ctx
        .control
        .next_id
        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    ctx.control
        .waiting
        .lock()
        .expect("not poisoned")
        .insert(id, tx);
    let from = ctx.control.settings.instance.clone();
    let mut answers: Vec<NodeAnswer> = Vec::new();
    if publish(ctx, &Message::Admin { from, id, cmd }).await {
        let deadline = tokio::time::Instant::now() + timeout * 2;
        while answers.len() < expected.len() {
            match tokio::time::timeout_at(deadline, rx.recv()).await {
                Ok(Some(a)) => answers.push(a),
                _ => break,
            }
        }
    }
    ctx.control
        .waiting
        .lock()
        .expect("not poisoned")
        .remove(&id);
    let missing: Vec<String> = expected
        .into_iter()
        .filter(|n| !answers.iter().any(|a| &a.instance == n))
        .collect();
    for node in &missing {
        tracing::warn!(%node, "a node did not answer an admin command in time");
    }
    Ok((answers, missing))
}

/// Applies `change` to `user`'s stored changes (again if another admin changed them in
/// between) and answers the result.
async fn store(ctx: &Ctx, user: &str, change: &Change) -> Result<Overrides, String> {
    let mut conn = ctx.conn();
    let key = format!("{}ov", key_prefix(ctx));
    for _ in 0..8 {
        let read = redis::cmd("HGET").arg(&key).arg(user).clone();
        let now: Option<String> =
            match tokio::time::timeout(ctx.settings.timeout, read.query_async(&mut conn)).await {
                Ok(Ok(v)) => v,
                Ok(Err(e)) => return Err(format!("Redis: {e}")),
                Err(_) => return Err("Redis did not answer in time".into()),
            };
        let now = now.unwrap_or_default();
        let mut o = if now.is_empty() {
            Overrides::default()
        } else {
            decode_overrides(&now)
        };
        change.apply(&mut o);
        let mut call = ctx.control.store.prepare_invoke();
        call.key(slot_key(ctx));
        call.arg(key_prefix(ctx))
            .arg(user)
            .arg(&now)
            .arg(encode_overrides(&o));
        let stored = tokio::time::timeout(
            ctx.settings.timeout,
            call.invoke_async::<(u8, String)>(&mut conn),
        )
        .await;
        match stored {
            Ok(Ok((1, _))) => return Ok(o),
            Ok(Ok(_)) => continue,
            Ok(Err(e)) => return Err(format!("Redis: {e}")),
            Err(_) => return Err("Redis did not answer in time".into()),
        }
    }
    Err("the user's access kept changing; try again".into())
}

/// Every user's stored changes (read at start and after Redis came back).
pub(super) async fn load_overrides(
    ctx_prefix: &str,
    conn: &mut Conn,
) -> redis::RedisResult<HashMap<String, Overrides>> {
    let all: HashMap<String, String> = redis::cmd("HGETALL")
        .arg(format!("{ctx_prefix}:{{c}}:ov"))
        .query_async(conn)
        .await?;
    Ok(all
        .into_iter()
        .map(|(user, v)| (user, decode_overrides(&v)))
        .collect())
}

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
        let mut o = Overrides::default();
        assert_eq!(encode_overrides(&o), "", "an empty value deletes the field");
        o.revoke(&["task:1".into()], &["p1".into()]);
        assert_eq!(decode_overrides(&encode_overrides(&o)), o);
        assert_eq!(decode_overrides("not json"), Overrides::default());
    }
}
