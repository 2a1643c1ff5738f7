//! The admin API: disconnect a user, revoke and grant access, list connections — on every core
//! of the node at once.
//!
//! Invariant: an answer comes only after every core applied the command, so when
//! `POST /api/v1/admin/revoke` answers, no core will deliver the revoked channels to that user
//! any more (live or replayed) until a grant.

use serde::Deserialize;

use crate::cluster::control::{Change, NodeAnswer};
use crate::delivery::channel::{self, ChannelKind};
use crate::proto::http::Request;
use crate::runtime::core::{AdminAnswer, AdminCmd, ConnInfo, Core, ListQuery};
use crate::runtime::node::Broker;

use super::http::{bearer, same_secret, Edge, Reply};

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Target {
    user_id: String,
    #[serde(default)]
    reason: Option<String>,
    #[serde(default)]
    channels: Vec<String>,
    #[serde(default)]
    project_id: Option<String>,
}

/// Routes `/api/v1/admin/*`; None when the path is not an admin endpoint.
pub async fn handle(edge: &Edge, core: &Core, req: &Request, body: &[u8]) -> Option<Reply> {
    let action = req.path.strip_prefix("/api/v1/admin/")?;
    if !matches!(action, "disconnect" | "revoke" | "grant" | "connections") {
        return None;
    }
    match bearer(req) {
        Some(key) if same_secret(key, &edge.api_key) => {}
        _ => {
            return Some(
                Reply::error(401, "the admin API needs Authorization: Bearer <API key>")
                    .with_header("WWW-Authenticate", "Bearer"),
            )
        }
    }
    let method = if action == "connections" {
        "GET"
    } else {
        "POST"
    };
    if req.method != method {
        return Some(Reply::error(405, "method not allowed").with_header("Allow", method));
    }
    if action == "connections" {
        return Some(list(core, req).await);
    }
    let target: Target = match serde_json::from_slice(body) {
        Ok(t) => t,
        Err(e) => return Some(Reply::error(400, &format!("bad JSON body: {e}"))),
    };
    if target.user_id.trim().is_empty() {
        return Some(Reply::error(400, "user_id must not be empty or blank"));
    }
    for name in &target.channels {
        if let Err(e) = channel::validate(name) {
            return Some(Reply::error(400, &format!("channels: {e}")));
        }
        // A grant is for the app's channels: the admin channels stay the admin role's, and a
        // user's own channel stays that user's.
        let closed = match channel::kind(name) {
            ChannelKind::Admin => true,
            ChannelKind::User(owner) => owner != target.user_id,
            _ => false,
        };
        if action == "grant" && closed {
            let msg =
                format!("channels: a grant cannot open {name} (admins only, or another user's)");
            return Some(Reply::error(400, &msg));
        }
    }
    if let Some(p) = &target.project_id {
        if let Err(e) = channel::validate(&format!("project:{p}")) {
            return Some(Reply::error(400, &format!("project_id: {e}")));
        }
        if p.is_empty() {
            return Some(Reply::error(400, "project_id must not be empty"));
        }
    }
    let projects: Vec<String> = target.project_id.iter().cloned().collect();
    let user = target.user_id.clone();
    let (mut cmd, key) = match action {
        "disconnect" => (
            AdminCmd::Disconnect {
                user: user.clone(),
                reason: target
                    .reason
                    .unwrap_or_else(|| "disconnected by an admin".into()),
            },
            "disconnected",
        ),
        _ if target.channels.is_empty() && projects.is_empty() => {
            return Some(Reply::error(400, "give channels or project_id"));
        }
        "revoke" => (
            AdminCmd::Revoke {
                user: user.clone(),
                channels: target.channels,
                projects,
                then: None,
            },
            "unsubscribed",
        ),
        _ => (
            AdminCmd::Grant {
                user: user.clone(),
                channels: target.channels,
                projects,
                then: None,
            },
            "connections",
        ),
    };
    let change = serde_json::json!({
        "action": action,
        "user_id": target.user_id,
        "channels": match &cmd {
            AdminCmd::Revoke { channels, .. } | AdminCmd::Grant { channels, .. } => channels.clone(),
            _ => Vec::new(),
        },
        "project_id": target.project_id,
    });
    let redis = match &core.shared.broker {
        Broker::Redis(redis) => Some(redis),
        Broker::Local => None,
    };
    // Cluster mode: the change is stored first (it outlives every node), then every node
    // sets what was stored.
    if let (
        Some(redis),
        AdminCmd::Revoke {
            channels,
            projects,
            then,
            ..
        }
        | AdminCmd::Grant {
            channels,
            projects,
            then,
            ..
        },
    ) = (redis, &mut cmd)
    {
        let stored = match action {
            "revoke" => Change::Revoke {
                channels: channels.clone(),
                projects: projects.clone(),
            },
            _ => Change::Grant {
                channels: channels.clone(),
                projects: projects.clone(),
            },
        };
        match redis.store(user.clone(), stored).await {
            Ok(o) => *then = Some(o),
            Err(e) => {
                let msg = format!("the change was not stored in Redis, nothing changed: {e}");
                return Some(Reply::error(503, &msg).with_header("Retry-After", "1"));
            }
        }
    }
    let here = NodeAnswer::of(
        core.shared.instance().unwrap_or(""),
        core.shared.admin(cmd.clone()).await,
    );
    let mut body = serde_json::json!({ "user_id": user });
    let mut total = here.count;
    if let Some(redis) = redis {
        let (elsewhere, missing) = match redis.admin_elsewhere(cmd).await {
            Ok(answers) => answers,
            Err(e) => {
                tracing::warn!(error = %e, "an admin command reached this node only");
                (
                    Vec::new(),
                    vec!["(the other nodes: Redis did not answer)".to_owned()],
                )
            }
        };
        let mut nodes = vec![serde_json::json!({"instance_id": here.instance, key: here.count})];
        for a in elsewhere {
            total += a.count;
            nodes.push(serde_json::json!({"instance_id": a.instance, key: a.count}));
        }
        body["nodes"] = nodes.into();
        body["unanswered"] = missing.into();
    }
    body[key] = total.into();
    let mut change = change;
    change["affected"] = total.into();
    core.shared.audit("permission_change", change);
    Some(Reply::json(200, body.to_string().into_bytes()))
}

/// Most connections one page of the list holds.
const MAX_PAGE: usize = 1000;

/// `GET /api/v1/admin/connections`: a page of the connections that match the query's
/// `user_id`, `project_id` and `channel`, in id order after `after`; `next` continues it.
async fn list(core: &Core, req: &Request) -> Reply {
    let limit = match req.query_param("limit").map(|l| l.parse::<usize>()) {
        None => 100,
        Some(Ok(n)) if (1..=MAX_PAGE).contains(&n) => n,
        Some(_) => return Reply::error(400, &format!("limit must be 1 to {MAX_PAGE}")),
    };
    if let Some(name) = req.query_param("channel") {
        if let Err(e) = channel::validate(&name) {
            return Reply::error(400, &format!("channel: {e}"));
        }
    }
    let query = ListQuery {
        user_id: req.query_param("user_id"),
        project_id: req.query_param("project_id"),
        channel: req.query_param("channel"),
        after: req.query_param("after"),
        limit,
    };
    let mut all: Vec<ConnInfo> = Vec::new();
    for answer in core.shared.admin(AdminCmd::List(query.clone())).await {
        if let AdminAnswer::Connections(list) = answer {
            all.extend(list);
        }
    }
    let mut unanswered = Vec::new();
    if let Broker::Redis(redis) = &core.shared.broker {
        match redis.admin_elsewhere(AdminCmd::List(query.clone())).await {
            Ok((answers, missing)) => {
                all.extend(answers.into_iter().flat_map(|a| a.connections));
                unanswered = missing;
            }
            Err(e) => {
                let msg = format!("cannot reach the other nodes: {e}");
                return Reply::error(503, &msg).with_header("Retry-After", "1");
            }
        }
    }
    let more = query.page(&mut all);
    let next = more
        .then(|| all.last().map(|c| c.connection_id.clone()))
        .flatten();
    let body = serde_json::json!({
        "count": all.len(),
        "connections": all,
        "next": next,
        "unanswered": unanswered,
    });
    Reply::json(200, body.to_string().into_bytes())
}
