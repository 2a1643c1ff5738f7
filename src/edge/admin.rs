//! The admin API: disconnect a user, revoke and grant access, list connections — on every core
//! of the node at once.
//!
//! Invariant: an answer comes only after every core applied the command, so when
//! `POST /api/v1/admin/revoke` answers, no core will deliver the revoked channels to that user
//! any more (live or replayed) until a grant.

use serde::Deserialize;

use crate::delivery::channel;
use crate::proto::http::Request;
use crate::runtime::core::{AdminAnswer, AdminCmd, ConnInfo, Core};

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
        let mut all: Vec<ConnInfo> = Vec::new();
        for answer in core.shared.admin(AdminCmd::List).await {
            if let AdminAnswer::Connections(list) = answer {
                all.extend(list);
            }
        }
        let body = serde_json::json!({ "count": all.len(), "connections": all });
        return Some(Reply::json(200, body.to_string().into_bytes()));
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
    }
    let projects: Vec<String> = target.project_id.iter().cloned().collect();
    let (cmd, key) = match action {
        "disconnect" => (
            AdminCmd::Disconnect {
                user: target.user_id.clone(),
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
                user: target.user_id.clone(),
                channels: target.channels,
                projects,
            },
            "unsubscribed",
        ),
        _ => (
            AdminCmd::Grant {
                user: target.user_id.clone(),
                channels: target.channels,
                projects,
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
    let total: usize = core
        .shared
        .admin(cmd)
        .await
        .into_iter()
        .map(|a| match a {
            AdminAnswer::Count(n) => n,
            AdminAnswer::Connections(_) => 0,
        })
        .sum();
    let mut change = change;
    change["affected"] = total.into();
    core.shared.audit("permission_change", change);
    let body = serde_json::json!({ "user_id": target.user_id, key: total });
    Some(Reply::json(200, body.to_string().into_bytes()))
}
