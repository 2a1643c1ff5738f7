//! Ingest: messages that backends already publish to Redis, published into ringcast channels.
//!
//! Sources (`redis_ingest`, comma-separated):
//! - `stream:KEY` — read through the consumer group `{prefix}:ingest`: each entry is published
//!   by one node, acknowledged (`XACK`) only once Redis took the publish, so nothing is lost
//!   across a node restart (at least once: an entry whose node died before acknowledging it is
//!   claimed by another node after `CLAIM_IDLE`). The entry's `message` field is the message.
//! - `pubsub:CHANNEL` (a pattern when it holds `*`) — at most once, as Pub/Sub is: only the node
//!   holding the ingest lease publishes, so a cluster publishes each message once.
//!
//! A message is a publish body (one message or an array, exactly as `POST /api/v1/publish`
//! takes it), or a JSON object without `channel`/`event`, which is published as `data` to
//! `project:{project_id}` with the event named after the source (the part after its last `:`,
//! lowercased), carrying the object's `project_id`, `user_id` and `agent_id`.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use redis::aio::ConnectionManager;
use redis::{RedisResult, Value};
use serde_json::{json, Map};

use super::{Cmd, Ctx};
use crate::delivery::Publication;
use crate::edge::publish;
use crate::runtime::shared::now_ms;

/// One configured source.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    Stream(String),
    PubSub(String),
}

impl Source {
    /// Reads `stream:KEY` or `pubsub:CHANNEL`.
    pub fn parse(s: &str) -> Result<Source, String> {
        match s.split_once(':') {
            Some(("stream", key)) if !key.is_empty() => Ok(Source::Stream(key.to_owned())),
            Some(("pubsub", ch)) if !ch.is_empty() => Ok(Source::PubSub(ch.to_owned())),
            _ => Err(format!(
                "redis_ingest: {s:?} is neither stream:KEY nor pubsub:CHANNEL"
            )),
        }
    }
}

/// Entries read per `XREADGROUP`.
const BATCH: usize = 100;
/// How long one `XREADGROUP` waits for new entries.
const BLOCK: Duration = Duration::from_secs(1);
/// Pub/Sub ingest messages being published at once; past it the node reads no more from
/// Redis until some are done (Redis then buffers them, as for any slow subscriber).
const IN_FLIGHT: usize = 256;
/// An entry read by a node that has not acknowledged it for this long is taken by another.
pub const CLAIM_IDLE: Duration = Duration::from_secs(30);
/// How long the Pub/Sub ingest lease lasts without renewal.
const LEASE: Duration = Duration::from_secs(10);

/// The publications a message from `source_name` stands for.
pub fn publications(source_name: &str, payload: &[u8]) -> Result<Vec<Publication>, String> {
    let value: serde_json::Value =
        serde_json::from_slice(payload).map_err(|e| format!("not JSON: {e}"))?;
    let is_publish_body = match &value {
        serde_json::Value::Array(_) => true,
        serde_json::Value::Object(o) => o.contains_key("channel") && o.contains_key("event"),
        _ => false,
    };
    if is_publish_body {
        return publish::publications(payload).map(|(p, _)| p);
    }
    let serde_json::Value::Object(object) = value else {
        return Err("neither a publish message nor a JSON object".into());
    };
    let Some(project) = object.get("project_id").and_then(|p| p.as_str()) else {
        return Err("no channel and no project_id to name one".into());
    };
    let event = source_name
        .rsplit(':')
        .next()
        .unwrap_or(source_name)
        .to_ascii_lowercase();
    let mut message = Map::new();
    message.insert("channel".into(), json!(format!("project:{project}")));
    message.insert("event".into(), json!(event));
    for field in ["project_id", "user_id", "agent_id"] {
        if let Some(v) = object.get(field) {
            message.insert(field.into(), v.clone());
        }
    }
    message.insert("data".into(), serde_json::Value::Object(object));
    let body = serde_json::to_vec(&message).expect("json");
    publish::publications(&body).map(|(p, _)| p)
}

/// Starts one task per source.
pub(super) fn start(ctx: &Arc<Ctx>, client: &redis::Client, sources: &[Source]) {
    for source in sources {
        let (ctx, client) = (ctx.clone(), client.clone());
        match source.clone() {
            Source::Stream(key) => {
                tokio::spawn(async move { stream_loop(ctx, client, key).await });
            }
            Source::PubSub(channel) => {
                tokio::spawn(async move { pubsub_loop(ctx, client, channel).await });
            }
        }
    }
}

/// Publishes through the node's own publish pipeline; true once Redis took it.
async fn publish(ctx: &Ctx, publications: Vec<Publication>) -> bool {
    let (reply, answer) = futures_channel::oneshot::channel();
    let groups = super::groups(publications, now_ms());
    if ctx
        .commands
        .send(Cmd::Publish {
            groups,
            reply: Some(reply),
        })
        .is_err()
    {
        return false;
    }
    matches!(answer.await, Ok(Ok(_)))
}

/// Turns a source's message into publications and publishes them; `false` when Redis did not
/// take them (try again), `true` when they are published or can never be (refused, counted).
async fn ingest_one(ctx: &Ctx, source_name: &str, payload: &[u8]) -> bool {
    match publications(source_name, payload) {
        Ok(p) => {
            let n = p.len() as u64;
            let ok = publish(ctx, p).await;
            if ok {
                ctx.health.ingested.fetch_add(n, Ordering::Relaxed);
            }
            ok
        }
        Err(e) => {
            ctx.health.ingest_refused.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(source = source_name, error = %e, "ingest: message refused");
            true
        }
    }
}

async fn stream_loop(ctx: Arc<Ctx>, client: redis::Client, key: String) {
    let group = format!("{}:ingest", ctx.keys.prefix);
    let consumer = format!("{:016x}", rand::random::<u64>());
    let source_name = key.clone();
    // A connection of its own (XREADGROUP blocks the connection it runs on), whose answers may
    // take as long as the blocking read.
    let config = redis::aio::ConnectionManagerConfig::new()
        .set_connection_timeout(Some(ctx.settings.timeout))
        .set_response_timeout(Some(BLOCK + ctx.settings.timeout));
    let mut last_claim: Option<tokio::time::Instant> = None;
    loop {
        let connect = ConnectionManager::new_with_config(client.clone(), config.clone());
        let conn = tokio::time::timeout(ctx.settings.timeout, connect).await;
        let Ok(Ok(mut conn)) = conn else {
            tokio::time::sleep(Duration::from_secs(1)).await;
            continue;
        };
        let created: RedisResult<Value> = redis::cmd("XGROUP")
            .arg("CREATE")
            .arg(&key)
            .arg(&group)
            .arg("$")
            .arg("MKSTREAM")
            .query_async(&mut conn)
            .await;
        if let Err(e) = created {
            if !e.to_string().contains("BUSYGROUP") {
                tracing::warn!(stream = %key, error = %e, "ingest: cannot create the consumer group");
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
        }
        // Entries this consumer holds unacknowledged first ("0"), then new ones (">").
        let mut own_first = true;
        loop {
            if last_claim.is_none_or(|at| at.elapsed() >= CLAIM_IDLE / 3) {
                last_claim = Some(tokio::time::Instant::now());
                own_first |= claim(&mut conn, &key, &group, &consumer).await;
            }
            let mut read = redis::cmd("XREADGROUP");
            read.arg("GROUP")
                .arg(&group)
                .arg(&consumer)
                .arg("COUNT")
                .arg(BATCH);
            if !own_first {
                read.arg("BLOCK").arg(BLOCK.as_millis() as u64);
            }
            read.arg("STREAMS")
                .arg(&key)
                .arg(if own_first { "0" } else { ">" });
            let reply: RedisResult<Value> = read.query_async(&mut conn).await;
            let entries = match reply {
                Ok(v) => entries_of(&v),
                Err(e) => {
                    tracing::warn!(stream = %key, error = %e, "ingest: cannot read");
                    break;
                }
            };
            if own_first && entries.is_empty() {
                own_first = false;
                continue;
            }
            for (id, message) in entries {
                let done = match message {
                    Some(m) => ingest_one(&ctx, &source_name, &m).await,
                    None => {
                        ctx.health.ingest_refused.fetch_add(1, Ordering::Relaxed);
                        tracing::warn!(stream = %key, id = %id, "ingest: entry without a message field");
                        true
                    }
                };
                if !done {
                    // Redis did not take it: it stays pending and is read again.
                    own_first = true;
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    break;
                }
                let _: RedisResult<Value> = redis::cmd("XACK")
                    .arg(&key)
                    .arg(&group)
                    .arg(&id)
                    .query_async(&mut conn)
                    .await;
            }
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Takes over the entries other consumers (nodes that died) have held unacknowledged for
/// `CLAIM_IDLE`, following `XAUTOCLAIM`'s cursor; whether any were taken.
async fn claim(conn: &mut ConnectionManager, key: &str, group: &str, consumer: &str) -> bool {
    let mut cursor = "0-0".to_owned();
    let mut took = false;
    for _ in 0..100 {
        let claimed: RedisResult<Value> = redis::cmd("XAUTOCLAIM")
            .arg(key)
            .arg(group)
            .arg(consumer)
            .arg(CLAIM_IDLE.as_millis() as u64)
            .arg(&cursor)
            .arg("COUNT")
            .arg(BATCH)
            .query_async(conn)
            .await;
        let Ok(Value::Array(parts)) = claimed else {
            break;
        };
        took |= matches!(parts.get(1), Some(Value::Array(e)) if !e.is_empty());
        cursor = match parts.first() {
            Some(Value::BulkString(c)) => String::from_utf8_lossy(c).into_owned(),
            Some(Value::SimpleString(c)) => c.clone(),
            _ => break,
        };
        if cursor == "0-0" {
            break;
        }
    }
    took
}

/// `XREADGROUP`'s answer as (entry id, its `message` field).
fn entries_of(v: &Value) -> Vec<(String, Option<Vec<u8>>)> {
    let text = |v: &Value| match v {
        Value::BulkString(b) => Some(b.clone()),
        Value::SimpleString(s) => Some(s.clone().into_bytes()),
        _ => None,
    };
    let mut out = Vec::new();
    // RESP2: [[key, [[id, [f, v, …]], …]]]; RESP3 may answer a map {key: [...]}.
    let streams: Vec<&Value> = match v {
        Value::Array(s) => s
            .iter()
            .filter_map(|s| match s {
                Value::Array(kv) => kv.get(1),
                _ => None,
            })
            .collect(),
        Value::Map(m) => m.iter().map(|(_, v)| v).collect(),
        _ => Vec::new(),
    };
    for stream in streams {
        let Value::Array(items) = stream else {
            continue;
        };
        for item in items {
            let Value::Array(pair) = item else { continue };
            let Some(id) = pair.first().and_then(text) else {
                continue;
            };
            let message = match pair.get(1) {
                Some(Value::Array(fields)) => fields
                    .chunks(2)
                    .find(|kv| kv.first().and_then(text).as_deref() == Some(b"message"))
                    .and_then(|kv| kv.get(1).and_then(text)),
                _ => None,
            };
            out.push((String::from_utf8_lossy(&id).into_owned(), message));
        }
    }
    out
}

async fn pubsub_loop(ctx: Arc<Ctx>, client: redis::Client, channel: String) {
    let lease_key = format!("{}:ingest:lease", ctx.keys.prefix);
    let me = format!("{:016x}", rand::random::<u64>());
    let holding = Arc::new(std::sync::atomic::AtomicBool::new(false));
    {
        let (holding, ctx, client, me) = (holding.clone(), ctx.clone(), client.clone(), me.clone());
        tokio::spawn(async move { lease_loop(ctx, client, lease_key, me, holding).await });
    }
    loop {
        let connected = tokio::time::timeout(ctx.settings.timeout, async {
            let mut pubsub = client.get_async_pubsub().await?;
            if channel.contains('*') {
                pubsub.psubscribe(&channel).await?;
            } else {
                pubsub.subscribe(&channel).await?;
            }
            RedisResult::Ok(pubsub)
        })
        .await;
        let Ok(Ok(mut pubsub)) = connected else {
            tokio::time::sleep(Duration::from_secs(1)).await;
            continue;
        };
        let mut messages = pubsub.on_message();
        let slots = Arc::new(tokio::sync::Semaphore::new(IN_FLIGHT));
        while let Some(msg) = messages.next().await {
            if !holding.load(Ordering::Relaxed) {
                continue;
            }
            let Ok(slot) = slots.clone().acquire_owned().await else {
                break;
            };
            let ctx = ctx.clone();
            tokio::spawn(async move {
                ingest_one(&ctx, msg.get_channel_name(), msg.get_payload_bytes()).await;
                drop(slot);
            });
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Takes or renews the cluster's Pub/Sub ingest lease every third of its length.
async fn lease_loop(
    ctx: Arc<Ctx>,
    client: redis::Client,
    key: String,
    me: String,
    holding: Arc<std::sync::atomic::AtomicBool>,
) {
    const RENEW: &str = r#"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2]) return 1
end
if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then return 1 end
return 0
"#;
    let script = redis::Script::new(RENEW);
    let mut conn = None;
    loop {
        if conn.is_none() {
            conn =
                tokio::time::timeout(ctx.settings.timeout, ConnectionManager::new(client.clone()))
                    .await
                    .ok()
                    .and_then(Result::ok);
        }
        let held = match conn.as_mut() {
            Some(c) => {
                let mut invocation = script.key(&key);
                invocation.arg(&me).arg(LEASE.as_millis() as u64);
                let call = invocation.invoke_async::<i64>(c);
                matches!(
                    tokio::time::timeout(ctx.settings.timeout, call).await,
                    Ok(Ok(1))
                )
            }
            None => false,
        };
        holding.store(held, Ordering::Relaxed);
        tokio::time::sleep(LEASE / 3).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sources_are_named_by_kind() {
        assert_eq!(
            Source::parse("stream:ws:in"),
            Ok(Source::Stream("ws:in".into()))
        );
        assert_eq!(
            Source::parse("pubsub:events:*"),
            Ok(Source::PubSub("events:*".into()))
        );
        assert!(Source::parse("events").is_err());
        assert!(Source::parse("stream:").is_err());
    }

    #[test]
    fn a_publish_body_passes_as_it_is() {
        let p = publications("x", br#"{"channel":"task:t1","event":"e","data":{"a":1}}"#).unwrap();
        assert_eq!(
            (&*p[0].channel, &*p[0].event, &*p[0].data),
            ("task:t1", "e", r#"{"a":1}"#)
        );
        assert_eq!(
            publications(
                "x",
                br#"[{"channel":"a","event":"e"},{"channel":"b","event":"e"}]"#
            )
            .unwrap()
            .len(),
            2
        );
        assert!(publications("x", br#"{"channel":"bad name","event":"e"}"#).is_err());
    }

    #[test]
    fn a_backend_event_goes_to_its_project() {
        let payload =
            br#"{"agent_id":"a1","old_status":"idle","new_status":"working","project_id":"42"}"#;
        let p = publications("events:AGENT_STATUS_CHANGED", payload).unwrap();
        assert_eq!(&*p[0].channel, "project:42");
        assert_eq!(&*p[0].event, "agent_status_changed");
        assert_eq!(p[0].agent_id.as_deref(), Some("a1"));
        assert_eq!(p[0].project_id.as_deref(), Some("42"));
        let data: serde_json::Value = serde_json::from_str(&p[0].data).unwrap();
        assert_eq!(data["new_status"], "working");
        assert!(
            publications("events:X", br#"{"agent_id":"a1"}"#).is_err(),
            "no project"
        );
        assert!(publications("events:X", b"not json").is_err());
    }
}
