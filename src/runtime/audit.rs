//! The audit trail: connection and security events, as JSON lines in a file (written by a
//! thread of its own, never by a worker) and as events on the admin-only `audit` channel, so
//! admins watch them live on `/ws/audit` and can resume them like any channel.
//!
//! Invariant: an audit event names who (user, IP, connection) and what, never a token or a
//! secret.

use crossbeam_channel::Sender;
use serde_json::{json, Value};
use std::io::Write;
use std::path::Path;

use crate::delivery::Publication;

use super::shared::now_ms;

/// The channel audit events travel on (admins only, by the channel rules).
pub const AUDIT_CHANNEL: &str = "audit";

pub struct Audit {
    file: Option<Sender<String>>,
}

impl Audit {
    /// Opens (appends to) the JSON-lines file, if any, with its writer thread.
    pub fn new(path: Option<&Path>) -> std::io::Result<Audit> {
        let Some(path) = path else {
            return Ok(Audit { file: None });
        };
        let mut out = std::io::BufWriter::new(
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)?,
        );
        let (tx, rx) = crossbeam_channel::unbounded::<String>();
        std::thread::Builder::new()
            .name("ringcast-audit".into())
            .spawn(move || {
                while let Ok(line) = rx.recv() {
                    let _ = writeln!(out, "{line}");
                    // Flush when the burst is over, not per line.
                    if rx.is_empty() {
                        let _ = out.flush();
                    }
                }
            })?;
        Ok(Audit { file: Some(tx) })
    }

    /// Writes one event of `kind` (`connect`, `auth_failure`, `disconnect`,
    /// `subscribe_denied`, `limit_hit`, `permission_change`) with its fields.
    pub fn record(&self, kind: &str, mut fields: Value) -> Publication {
        let ts = now_ms();
        if let Some(obj) = fields.as_object_mut() {
            obj.insert("type".into(), json!(kind));
            obj.insert("ts".into(), json!(ts));
        }
        let line = fields.to_string();
        if let Some(file) = &self.file {
            let _ = file.send(line.clone());
        }
        Publication::new(AUDIT_CHANNEL.into(), &format!("audit:{kind}"), &line)
    }
}
