//! Admin commands across nodes, and the admins' changes to users' access kept in Redis.
//!
//! A command goes to every other node on the control channel; each runs it on its cores and
//! answers on the same channel, addressed to the asking node, which waits for the nodes whose
//! lease is live. Revocations and grants are stored first (`P:{c}:ov`, with a version in
//! `P:{c}:ov:v`); every node then sets the stored value, and every refresh compares the
//! version and reads them all again when it moved, so a node that missed a message, or got
//! two admins' messages in another order than Redis stored them, agrees within one refresh.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::delivery::access::Overrides;
use crate::runtime::core::{AdminAnswer, AdminCmd};
use crate::runtime::mesh::MeshMsg;

use super::super::{Conn, Ctx};
use super::{key_prefix, slot_key, Change, ControlError, NodeAnswer};

/// What crosses between nodes on the control channel.
#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "t", rename_all = "snake_case")]
pub(super) enum Message {
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

/// The answers of the other nodes to an admin command, and the nodes that did not answer in
/// time.
pub type Elsewhere = (Vec<NodeAnswer>, Vec<String>);

/// Sends a message to every node (this one included).
pub(super) async fn publish(ctx: &Ctx, msg: &Message) -> bool {
    let payload = serde_json::to_string(msg).expect("control messages serialize");
    let command = if ctx.sharded { "SPUBLISH" } else { "PUBLISH" };
    let mut cmd = redis::cmd(command);
    cmd.arg(super::channel(&ctx.keys.prefix)).arg(payload);
    let mut conn = ctx.conn();
    matches!(
        tokio::time::timeout(
            ctx.settings.timeout,
            cmd.query_async::<redis::Value>(&mut conn)
        )
        .await,
        Ok(Ok(_))
    )
}

/// A message on the control channel, from any node (this one included).
pub(in crate::cluster) fn on_message(ctx: &Arc<Ctx>, payload: &[u8]) {
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
                MeshMsg::Close {
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

/// The live nodes other than this one, as their leases say (by Redis's clock).
async fn other_nodes(ctx: &Ctx) -> redis::RedisResult<Vec<String>> {
    let mut call = ctx.control.live.prepare_invoke();
    call.key(slot_key(ctx)).arg(key_prefix(ctx));
    let mut conn = ctx.conn();
    let nodes: Vec<String> = call.invoke_async(&mut conn).await?;
    let me = &ctx.control.settings.instance;
    Ok(nodes.into_iter().filter(|n| n != me).collect())
}

/// Sends `cmd` to every other live node and gathers their answers until each of them
/// answered or twice the timeout passed.
pub(super) async fn everywhere(ctx: &Ctx, cmd: AdminCmd) -> Result<Elsewhere, ControlError> {
    let timeout = ctx.settings.timeout;
    let expected: HashSet<String> = match tokio::time::timeout(timeout, other_nodes(ctx)).await {
        Ok(Ok(n)) => n.into_iter().collect(),
        Ok(Err(e)) => return Err(ControlError::Redis(e.to_string())),
        Err(_) => return Err(ControlError::Timeout),
    };
    if expected.is_empty() {
        return Ok((Vec::new(), Vec::new()));
    }
    let id = ctx
        .control
        .next_id
        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let waiting = &ctx.control.waiting;
    waiting.lock().expect("not poisoned").insert(id, tx);
    let from = ctx.control.settings.instance.clone();
    let mut answers: HashMap<String, NodeAnswer> = HashMap::new();
    if publish(ctx, &Message::Admin { from, id, cmd }).await {
        let deadline = tokio::time::Instant::now() + timeout * 2;
        while !expected.iter().all(|n| answers.contains_key(n)) {
            match tokio::time::timeout_at(deadline, rx.recv()).await {
                Ok(Some(a)) => {
                    answers.insert(a.instance.clone(), a);
                }
                _ => break,
            }
        }
    }
    waiting.lock().expect("not poisoned").remove(&id);
    let mut missing: Vec<String> = expected
        .into_iter()
        .filter(|n| !answers.contains_key(n))
        .collect();
    missing.sort();
    for node in &missing {
        tracing::warn!(%node, "a node did not answer an admin command in time");
    }
    let mut answers: Vec<NodeAnswer> = answers.into_values().collect();
    answers.sort_by(|a, b| a.instance.cmp(&b.instance));
    Ok((answers, missing))
}

pub(super) fn encode_overrides(o: &Overrides) -> String {
    if o.is_empty() {
        return String::new();
    }
    serde_json::to_string(o).expect("overrides serialize")
}

/// A stored value; one that is not ours (Redis is trusted, but a person may write to it) is
/// refused, not read as "no changes".
pub(super) fn decode_overrides(s: &str) -> Result<Overrides, ControlError> {
    serde_json::from_str(s).map_err(|e| ControlError::Stored(e.to_string()))
}

/// Applies `change` to `user`'s stored changes (again if another admin changed them in
/// between) and answers the result with the changes' new version.
pub(super) async fn store(
    ctx: &Ctx,
    user: &str,
    change: &Change,
) -> Result<Overrides, ControlError> {
    let mut conn = ctx.conn();
    let key = format!("{}ov", key_prefix(ctx));
    let timeout = ctx.settings.timeout;
    for _ in 0..8 {
        let read = redis::cmd("HGET").arg(&key).arg(user).clone();
        let held: Option<String> =
            match tokio::time::timeout(timeout, read.query_async(&mut conn)).await {
                Ok(Ok(v)) => v,
                Ok(Err(e)) => return Err(ControlError::Redis(e.to_string())),
                Err(_) => return Err(ControlError::Timeout),
            };
        let held = held.unwrap_or_default();
        let mut o = if held.is_empty() {
            Overrides::default()
        } else {
            decode_overrides(&held)?
        };
        change.apply(&mut o);
        let mut call = ctx.control.store.prepare_invoke();
        call.key(slot_key(ctx))
            .arg(key_prefix(ctx))
            .arg(user)
            .arg(&held)
            .arg(encode_overrides(&o));
        let stored = tokio::time::timeout(timeout, call.invoke_async::<(u8, String)>(&mut conn));
        match stored.await {
            Ok(Ok((1, version))) => {
                // Only the next version: one this node did not see lies between otherwise,
                // and the next refresh reads them all.
                let version: u64 = version.parse().unwrap_or(0);
                if version == ctx.control.version() + 1 {
                    ctx.control.seen_version(version);
                }
                return Ok(o);
            }
            Ok(Ok(_)) => continue,
            Ok(Err(e)) => return Err(ControlError::Redis(e.to_string())),
            Err(_) => return Err(ControlError::Timeout),
        }
    }
    Err(ControlError::Busy)
}

/// Every user's stored changes, and their version.
pub(in crate::cluster) async fn load_overrides(
    prefix: &str,
    conn: &mut Conn,
) -> redis::RedisResult<(HashMap<String, Overrides>, u64)> {
    let (all, version): (HashMap<String, String>, Option<u64>) = redis::pipe()
        .cmd("HGETALL")
        .arg(format!("{prefix}:{{c}}:ov"))
        .cmd("GET")
        .arg(format!("{prefix}:{{c}}:ov:v"))
        .query_async(conn)
        .await?;
    let mut out = HashMap::new();
    for (user, v) in all {
        match decode_overrides(&v) {
            Ok(o) => {
                out.insert(user, o);
            }
            Err(e) => tracing::warn!(%user, error = %e, "an admin's stored change is unreadable"),
        }
    }
    Ok((out, version.unwrap_or(0)))
}

/// Makes this node's cores hold what Redis holds. A version below the one this node saw
/// means Redis lost the changes (a restart without persistence, a failover to an empty
/// replica): this node writes back the ones it holds first, without overwriting any stored
/// since.
pub(in crate::cluster) async fn reload_overrides(ctx: &Ctx) {
    let mut conn = ctx.conn();
    let (mut all, mut version) = match load_overrides(&ctx.keys.prefix, &mut conn).await {
        Ok(x) => x,
        Err(e) => {
            tracing::warn!(error = %e, "cannot read the admins' changes from Redis");
            return;
        }
    };
    if version < ctx.control.version() {
        let mut held = HashMap::new();
        for a in ctx.mesh.admin(AdminCmd::Overrides).await {
            if let AdminAnswer::Overrides(o) = a {
                held = o; // every core holds the same
                break;
            }
        }
        let key = format!("{}ov", key_prefix(ctx));
        let mut pipe = redis::pipe();
        for (user, o) in held.iter().filter(|(_, o)| !o.is_empty()) {
            pipe.cmd("HSETNX")
                .arg(&key)
                .arg(user)
                .arg(encode_overrides(o))
                .ignore();
        }
        pipe.cmd("INCR").arg(format!("{key}:v")).ignore();
        match pipe.query_async::<()>(&mut conn).await {
            Ok(()) => tracing::warn!(
                users = held.len(),
                "Redis had lost the admins' changes: this node wrote back the ones it held"
            ),
            Err(e) => {
                tracing::warn!(error = %e, "cannot write the admins' changes back to Redis");
                return;
            }
        }
        match load_overrides(&ctx.keys.prefix, &mut conn).await {
            Ok(x) => (all, version) = x,
            Err(e) => {
                tracing::warn!(error = %e, "cannot read the admins' changes from Redis");
                return;
            }
        }
    }
    ctx.control.seen_version(version);
    ctx.mesh.admin(AdminCmd::Replace(all)).await;
}

/// Reads the admins' changes again if their version in Redis is not the one this node holds
/// (a message it missed, or two in another order than Redis stored them).
pub(super) async fn settle_overrides(ctx: &Ctx) {
    let mut conn = ctx.conn();
    let get = redis::cmd("GET")
        .arg(format!("{}ov:v", key_prefix(ctx)))
        .clone();
    let version = tokio::time::timeout(
        ctx.settings.timeout,
        get.query_async::<Option<u64>>(&mut conn),
    );
    if let Ok(Ok(version)) = version.await {
        if version.unwrap_or(0) != ctx.control.version() {
            reload_overrides(ctx).await;
        }
    }
}
