//! `POST /api/v1/publish`: one message or a batch, sequenced by each channel's owner core.
//!
//! Invariant: the answer carries the seq of every message, in request order, and comes as soon
//! as the owners have sequenced them — never after waiting for delivery to subscribers.

use std::sync::Arc;

use serde::Deserialize;
use serde_json::value::RawValue;

use crate::delivery::{channel, Priority, Publication};
use crate::proto::http::Request;
use crate::proto::msg;
use crate::runtime::core::Core;
use crate::runtime::mesh::Source;
pub(super) use crate::runtime::node::NotSequenced;

use super::http::{bearer, same_secret, Edge, Reply};

/// Most messages in one publish request.
pub const MAX_BATCH: usize = 10_000;
/// Largest `data` of one message: every subscriber must be able to take it as one frame.
pub const MAX_DATA_BYTES: usize = 1 << 20;

#[derive(Deserialize)]
struct Incoming<'a> {
    channel: String,
    event: String,
    #[serde(borrow, default)]
    data: Option<&'a RawValue>,
    #[serde(default)]
    project_id: Option<String>,
    #[serde(default)]
    user_id: Option<String>,
    #[serde(default)]
    agent_id: Option<String>,
    #[serde(default)]
    priority: Option<String>,
    #[serde(default)]
    ephemeral: bool,
    #[serde(default)]
    coalesce_key: Option<String>,
    #[serde(default)]
    ttl_ms: Option<u64>,
    #[serde(default)]
    compute_eta: bool,
}

pub async fn handle(edge: &Edge, core: &Core, req: &Request, body: &[u8]) -> Reply {
    match bearer(req) {
        Some(key) if same_secret(key, &edge.api_key) => {}
        _ => {
            return Reply::error(401, "publishing needs Authorization: Bearer <API key>")
                .with_header("WWW-Authenticate", "Bearer")
        }
    }
    if core.shared.is_draining() {
        return Reply::error(503, "node is draining; publish to another node");
    }
    let (publications, single) = match publications(body) {
        Ok(parsed) => parsed,
        Err(message) => return Reply::error(400, &message),
    };
    let channels: Vec<Arc<str>> = publications.iter().map(|p| p.channel.clone()).collect();
    let results = match core.publish(publications, Source::Api).await {
        Ok(seqs) => channels
            .into_iter()
            .zip(seqs)
            .map(|(channel, seq)| Sequenced { channel, seq })
            .collect::<Vec<_>>(),
        Err(NotSequenced::Behind) => {
            return Reply::error(503, BEHIND).with_header("Retry-After", RETRY_AFTER_SECS)
        }
        Err(NotSequenced::ShuttingDown) => return Reply::error(503, "node is shutting down"),
        Err(NotSequenced::Unavailable) => {
            return Reply::error(
                503,
                "redis did not answer in time; the messages may still be stored and delivered",
            )
            .with_header("Retry-After", RETRY_AFTER_SECS)
        }
    };
    let body = if single {
        serde_json::to_vec(&results[0])
    } else {
        serde_json::to_vec(&results)
    };
    Reply::json(200, body.expect("json"))
}

/// A publish body (one message or an array) checked and made publications, and whether it
/// was one message; the error says what is wrong, naming the message of a batch.
pub fn publications(body: &[u8]) -> Result<(Vec<Publication>, bool), String> {
    let (incoming, single) = parse_body(body)?;
    let publications = incoming
        .into_iter()
        .enumerate()
        .map(|(i, m)| {
            check(m).map_err(|e| {
                if single {
                    e
                } else {
                    format!("message {i}: {e}")
                }
            })
        })
        .collect::<Result<Vec<_>, _>>()?;
    Ok((publications, single))
}

#[derive(serde::Serialize)]
struct Sequenced {
    channel: Arc<str>,
    seq: u64,
}

fn parse_body(body: &[u8]) -> Result<(Vec<Incoming<'_>>, bool), String> {
    let first = body.iter().find(|b| !b.is_ascii_whitespace());
    match first {
        Some(b'[') => {
            let batch: Vec<Incoming> =
                serde_json::from_slice(body).map_err(|e| format!("bad JSON body: {e}"))?;
            if batch.is_empty() {
                return Err("empty batch".into());
            }
            if batch.len() > MAX_BATCH {
                return Err(format!("at most {MAX_BATCH} messages per request"));
            }
            Ok((batch, false))
        }
        Some(b'{') => {
            let one: Incoming =
                serde_json::from_slice(body).map_err(|e| format!("bad JSON body: {e}"))?;
            Ok((vec![one], true))
        }
        _ => Err("body must be a JSON object or an array of objects".into()),
    }
}

fn check(m: Incoming<'_>) -> Result<Publication, String> {
    channel::validate(&m.channel).map_err(|e| format!("{e}"))?;
    if m.event.is_empty() || m.event.len() > 200 {
        return Err("event must be 1 to 200 bytes".into());
    }
    let priority = match m.priority.as_deref() {
        None => Priority::Normal,
        Some(p) => Priority::parse(p)
            .ok_or_else(|| "priority must be critical, high, normal or low".to_string())?,
    };
    if m.channel.starts_with("terminal:") && m.project_id.is_none() {
        // Anyone may subscribe to a terminal channel: the project is what guards it.
        return Err("messages on terminal: channels need project_id".into());
    }
    if m.coalesce_key
        .as_deref()
        .is_some_and(|k| k.is_empty() || k.len() > 200)
    {
        return Err("coalesce_key must be 1 to 200 bytes".into());
    }
    if m.data.is_some_and(|d| d.get().len() > MAX_DATA_BYTES) {
        return Err("data is larger than 1 MiB".into());
    }
    // A raw value is only skimmed by the parser: make sure it really is JSON every client can
    // read (no lone surrogates, numbers in range, bounded nesting) before it is sequenced.
    if let Some(raw) = m.data {
        let depth = msg::nesting_depth(raw.get().as_bytes());
        if depth > msg::MAX_DATA_DEPTH {
            return Err(format!(
                "data is not valid JSON: nested deeper than {}",
                msg::MAX_DATA_DEPTH
            ));
        }
        msg::parse_data::<serde_json::Value>(raw.get().as_bytes())
            .map_err(|e| format!("data is not valid JSON: {e}"))?;
    }
    Ok(Publication {
        channel: m.channel.into(),
        event: m.event.into(),
        data: m.data.map_or("null", |d| d.get()).into(),
        project_id: m.project_id.map(Into::into),
        user_id: m.user_id.map(Into::into),
        agent_id: m.agent_id.map(Into::into),
        priority,
        coalesce_key: m.coalesce_key.map(Into::into),
        ttl: m.ttl_ms.map(std::time::Duration::from_millis),
        compute_eta: m.compute_eta,
        ephemeral: m.ephemeral,
    })
}

/// The answer to a publish refused because a core is behind (with `Retry-After`).
pub(super) const BEHIND: &str = "node is behind: a core has too much waiting; retry shortly";
/// Seconds a publisher refused with `BEHIND` is asked to wait.
const RETRY_AFTER_SECS: &str = "1";
