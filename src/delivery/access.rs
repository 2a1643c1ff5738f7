//! Who may see what: token claims → channels and message visibility.
//!
//! Invariant: deny unless a rule allows. The rules are the contract's: `user:X` for X and
//! admins, `project:X` for holders of X or `*`, `system`/`alerts`/`audit` for admins, and any
//! other channel only through the `channels` claim (exact names, `prefix:*` patterns, or `*`).

use serde::Deserialize;

use super::channel::{self, ChannelKind};

/// Turns a token into claims (the edge's verifier; a trait so the runtime need not know it).
pub trait Authenticator: Send + Sync {
    /// The claims of a valid token, or why it is not valid.
    fn authenticate(&self, token: &str) -> Result<Claims, String>;
    /// Seconds past `exp` a token is still honoured (clock skew).
    fn leeway_secs(&self) -> u64;
}

/// The claims ringcast reads from a token. Unknown claims are ignored.
#[derive(Debug, Clone, Default, Deserialize, PartialEq, Eq, Hash)]
pub struct Claims {
    /// The user id.
    pub sub: String,
    #[serde(default)]
    pub roles: Vec<String>,
    /// Project ids this user may see; `"*"` means all.
    #[serde(default)]
    pub projects: Vec<String>,
    /// Further channel names or `prefix:*` patterns (`"*"` allows every channel).
    #[serde(default)]
    pub channels: Vec<String>,
    /// Expiry, seconds since the Unix epoch.
    #[serde(default)]
    pub exp: Option<u64>,
    /// What an admin changed for this user since the token was issued (never from the token).
    #[serde(skip)]
    pub overrides: Overrides,
}

/// An admin's changes to one user's access, applied over whatever the token says.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(default)]
pub struct Overrides {
    /// Channels the user may not subscribe to, whatever the token says.
    pub revoked_channels: Vec<String>,
    /// Projects the user may not see: `project:X` and every message carrying `project_id` X.
    pub revoked_projects: Vec<String>,
    /// Channels the user may subscribe to beyond the token (exact names).
    pub granted_channels: Vec<String>,
}

impl Overrides {
    pub fn is_empty(&self) -> bool {
        self.revoked_channels.is_empty()
            && self.revoked_projects.is_empty()
            && self.granted_channels.is_empty()
    }

    /// Revokes channels and projects (and withdraws grants of those channels).
    pub fn revoke(&mut self, channels: &[String], projects: &[String]) {
        for c in channels {
            self.granted_channels.retain(|g| g != c);
            if !self.revoked_channels.contains(c) {
                self.revoked_channels.push(c.clone());
            }
        }
        for p in projects {
            if !self.revoked_projects.contains(p) {
                self.revoked_projects.push(p.clone());
            }
        }
    }

    /// Lifts revocations of these channels and projects and grants the channels.
    pub fn grant(&mut self, channels: &[String], projects: &[String]) {
        for c in channels {
            self.revoked_channels.retain(|r| r != c);
            if let ChannelKind::Project(p) = channel::kind(c) {
                self.revoked_projects.retain(|r| r != p);
            }
            if !self.granted_channels.contains(c) {
                self.granted_channels.push(c.clone());
            }
        }
        for p in projects {
            self.revoked_projects.retain(|r| r != p);
            let c = format!("project:{p}");
            if !self.granted_channels.contains(&c) {
                self.granted_channels.push(c);
            }
        }
    }

    /// A grant of `project:X` opens X's messages on every channel too.
    fn grants_project(&self, project: &str) -> bool {
        self.granted_channels
            .iter()
            .any(|c| c.strip_prefix("project:") == Some(project))
    }

    fn revokes_channel(&self, name: &str) -> bool {
        self.revoked_channels.iter().any(|c| c == name)
            || matches!(channel::kind(name), ChannelKind::Project(p) if self.revoked_projects.iter().any(|r| r == p))
    }
}

impl Claims {
    pub fn is_admin(&self) -> bool {
        self.roles.iter().any(|r| r == "admin")
    }

    pub fn has_project(&self, project: &str) -> bool {
        self.projects.iter().any(|p| p == "*" || p == project)
    }

    fn channels_claim_allows(&self, name: &str) -> bool {
        self.channels
            .iter()
            .any(|pattern| match pattern.strip_suffix('*') {
                Some(prefix) => name.starts_with(prefix),
                None => pattern == name,
            })
    }

    /// May this token (with the admin's overrides) subscribe to `name` (a valid channel name)?
    pub fn can_subscribe(&self, name: &str) -> bool {
        if !self.overrides.is_empty() {
            if self.overrides.revokes_channel(name) {
                return false;
            }
            if self.overrides.granted_channels.iter().any(|g| g == name) {
                return true;
            }
        }
        match channel::kind(name) {
            ChannelKind::User(user) => self.sub == user || self.is_admin(),
            ChannelKind::Project(project) => self.has_project(project),
            ChannelKind::Admin => self.is_admin(),
            ChannelKind::Terminal => true,
            ChannelKind::Other => self.channels_claim_allows(name),
        }
    }

    /// May this token see a message published with these visibility fields?
    pub fn can_see(&self, project_id: Option<&str>, user_id: Option<&str>) -> bool {
        project_id.is_none_or(|p| {
            (self.has_project(p) || self.overrides.grants_project(p))
                && !self.overrides.revoked_projects.iter().any(|r| r == p)
        }) && user_id.is_none_or(|u| self.sub == u || self.is_admin())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn claims(sub: &str, roles: &[&str], projects: &[&str], channels: &[&str]) -> Claims {
        let owned = |v: &[&str]| v.iter().map(|s| s.to_string()).collect();
        Claims {
            sub: sub.into(),
            roles: owned(roles),
            projects: owned(projects),
            channels: owned(channels),
            exp: None,
            overrides: Overrides::default(),
        }
    }

    #[test]
    fn user_channels() {
        let alice = claims("alice", &[], &[], &[]);
        assert!(alice.can_subscribe("user:alice"));
        assert!(!alice.can_subscribe("user:bob"));
        assert!(claims("root", &["admin"], &[], &[]).can_subscribe("user:bob"));
    }

    #[test]
    fn project_channels() {
        let u = claims("u", &[], &["p1"], &[]);
        assert!(u.can_subscribe("project:p1"));
        assert!(!u.can_subscribe("project:p2"));
        assert!(!u.can_subscribe("project:p1x"));
        assert!(claims("u", &[], &["*"], &[]).can_subscribe("project:anything"));
        // admin alone does not open projects: the rule is the projects claim
        assert!(!claims("root", &["admin"], &[], &[]).can_subscribe("project:p1"));
    }

    #[test]
    fn admin_channels() {
        for ch in ["system", "alerts", "audit"] {
            assert!(claims("root", &["admin"], &[], &[]).can_subscribe(ch));
            assert!(!claims("u", &[], &["*"], &["*"]).can_subscribe(ch));
        }
    }

    #[test]
    fn other_channels_need_the_channels_claim() {
        let u = claims("u", &[], &["*"], &["task:*", "dashboard"]);
        assert!(u.can_subscribe("task:t9"));
        assert!(u.can_subscribe("dashboard"));
        assert!(!u.can_subscribe("agent:a1"));
        assert!(!claims("u", &[], &["*"], &[]).can_subscribe("dashboard"));
        assert!(claims("u", &[], &[], &["*"]).can_subscribe("agent:a1"));
    }

    #[test]
    fn revocations_and_grants_override_the_token() {
        let mut u = claims("u", &[], &["*"], &["task:*"]);
        u.overrides.revoke(&["task:t1".into()], &["p1".into()]);
        assert!(!u.can_subscribe("task:t1"));
        assert!(u.can_subscribe("task:t2"));
        assert!(!u.can_subscribe("project:p1"));
        assert!(u.can_subscribe("project:p2"));
        assert!(!u.can_see(Some("p1"), None));
        assert!(u.can_see(Some("p2"), None));
        u.overrides
            .grant(&["project:p1".into(), "dashboard".into()], &[]);
        assert!(u.can_subscribe("project:p1"));
        assert!(u.can_see(Some("p1"), None));
        assert!(u.can_subscribe("dashboard"), "granted beyond the token");
        let mut narrow = claims("n", &[], &[], &[]);
        narrow.overrides.grant(&["project:p9".into()], &[]);
        assert!(narrow.can_subscribe("project:p9"));
        assert!(
            narrow.can_see(Some("p9"), None),
            "a granted project's messages are visible"
        );
        u.overrides.grant(&[], &[]);
        u.overrides.revoke(&["dashboard".into()], &[]);
        assert!(!u.can_subscribe("dashboard"));
    }

    #[test]
    fn message_visibility() {
        let u = claims("u", &[], &["p1"], &[]);
        assert!(u.can_see(None, None));
        assert!(u.can_see(Some("p1"), None));
        assert!(!u.can_see(Some("p2"), None));
        assert!(u.can_see(None, Some("u")));
        assert!(!u.can_see(None, Some("v")));
        assert!(!u.can_see(Some("p1"), Some("v")));
        assert!(claims("root", &["admin"], &[], &[]).can_see(None, Some("v")));
    }
}
