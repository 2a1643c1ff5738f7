//! Presence across nodes: each node tells Redis its users of each presence channel
//! (`P:{C}:pr`, `instance|user` → lease), and the script turns node-level joins and leaves
//! into the cluster's, which the node then publishes as the channel's `presence` event.
//!
//! Invariant: one task sends a node's presence changes and refreshes, in the order the owner
//! cores made them, so a refresh never brings back a user whose leave went before it.

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::delivery::presence::Change;
use crate::delivery::Publication;
use crate::runtime::shared::now_ms;

use super::super::{groups, Cmd as RedisCmd, Ctx};

/// Runs this node's presence changes one after the other.
pub(in crate::cluster) async fn run(
    ctx: Arc<Ctx>,
    mut changes: tokio::sync::mpsc::Receiver<Change>,
) {
    while let Some(change) = changes.recv().await {
        if !ctx
            .health
            .commands
            .load(std::sync::atomic::Ordering::Relaxed)
        {
            // Redis away: waiting a timeout per change would only grow the queue. What was
            // announced is renewed by the refreshes once it is back; a leave shows when the
            // entry runs out.
            continue;
        }
        record(&ctx, change).await;
    }
}

/// Records one channel's changes (or, with nobody left, a refresh of who is there) and
/// publishes what changed for the cluster.
async fn record(ctx: &Ctx, change: Change) {
    let s = &ctx.control.settings;
    let mut call = ctx.control.presence.prepare_invoke();
    call.key(ctx.keys.presence(&change.channel))
        .arg(&s.instance)
        .arg(s.lease(ctx.settings.timeout).as_millis() as u64)
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
            let event = Publication::presence(change.channel, &joined, &left);
            let _ = ctx.commands.send(RedisCmd::Publish {
                groups: groups(vec![event], now_ms()),
                reply: None,
            });
        }
        Ok(Ok(_)) => {}
        // The next refresh records this node's users again (a join then shows); a leave
        // shows when the node's entry runs out.
        _ => tracing::debug!(channel = %change.channel, "presence change not recorded"),
    }
}

/// Member lists read in the last `FRESH`, by channel: a flood of `presence` questions costs
/// Redis one read per channel per `FRESH`, however many clients ask.
#[derive(Default)]
pub(super) struct Recent(Mutex<HashMap<String, Read>>);

/// When a member list was read, and what it held.
type Read = (Instant, Arc<Vec<String>>);

const FRESH: Duration = Duration::from_secs(1);
/// Channels whose lists are kept at once (all are forgotten past it).
const MAX_RECENT: usize = 10_000;

/// The users on a presence channel on any live node, as of at most a second ago.
pub(super) async fn members(ctx: &Ctx, channel: &str) -> Option<Arc<Vec<String>>> {
    let recent = &ctx.control.members.0;
    if let Some((at, list)) = recent.lock().expect("not poisoned").get(channel) {
        if at.elapsed() < FRESH {
            return Some(list.clone());
        }
    }
    let list = Arc::new(read_members(ctx, channel).await?);
    let mut recent = recent.lock().expect("not poisoned");
    if recent.len() >= MAX_RECENT {
        recent.clear();
    }
    recent.insert(channel.to_owned(), (Instant::now(), list.clone()));
    Some(list)
}

/// The users on a presence channel on any live node (by Redis's clock).
async fn read_members(ctx: &Ctx, channel: &str) -> Option<Vec<String>> {
    let mut conn = ctx.conn();
    let read = redis::pipe()
        .cmd("TIME")
        .cmd("HGETALL")
        .arg(ctx.keys.presence(channel))
        .clone();
    let answer = tokio::time::timeout(
        ctx.settings.timeout,
        read.query_async::<((u64, u64), Vec<(String, u64)>)>(&mut conn),
    );
    let ((secs, micros), all) = match answer.await {
        Ok(Ok(x)) => x,
        _ => return None,
    };
    let now = secs * 1000 + micros / 1000;
    let users: BTreeSet<String> = all
        .into_iter()
        .filter(|(_, lease)| *lease >= now)
        .filter_map(|(field, _)| Some(field.split_once('|')?.1.to_owned()))
        .collect();
    Some(users.into_iter().collect())
}
