//! The admin commands as one core carries them out: disconnect, revoke and grant, the
//! connection list, the registry's and presence's snapshots, the node's frame rate. Every core
//! gets each command (see `Mesh::admin`); in cluster mode it crosses to the other nodes too.

use std::collections::HashMap;
use std::time::Instant;

use crate::delivery::access::Overrides;
use crate::delivery::presence::Change;
use crate::delivery::session::Session;

use super::super::node::Broker;
use super::super::shared::now_ms;
use super::Core;

/// What an admin asks of every core (see the admin API in docs/protocol.md); in cluster
/// mode it also crosses to the other nodes.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
#[serde(tag = "cmd", rename_all = "snake_case")]
pub enum AdminCmd {
    /// Close every connection of the user with 4003 and this reason.
    Disconnect { user: String, reason: String },
    /// Take channels/projects away from the user: unsubscribed at once, refused afterwards.
    /// `then`: the user's changes as stored in Redis after this one (cluster mode), set as
    /// they are instead of merging.
    Revoke {
        user: String,
        channels: Vec<String>,
        projects: Vec<String>,
        #[serde(default)]
        then: Option<Overrides>,
    },
    /// Lift revocations and allow channels beyond the token.
    Grant {
        user: String,
        channels: Vec<String>,
        projects: Vec<String>,
        #[serde(default)]
        then: Option<Overrides>,
    },
    /// Who is connected: a page of those that match.
    List(ListQuery),
    /// Every user's changes, read again from Redis: they replace what the core holds.
    Replace(HashMap<String, Overrides>),
    /// What the registry holds of every connection (cluster mode).
    Registry,
    /// Event frames per second the whole node may send (0: no limit), shared by its cores.
    NodeRate { rate: u32 },
    /// Renew in Redis the users each presence channel of this core has announced (cluster
    /// mode; they go the way its presence changes go, after them).
    PresenceRefresh,
    /// Every user's changes this core holds (the same on every core).
    Overrides,
}

/// Which connections a list shows: all filters must match; ordered by connection id, the
/// first `limit` after `after`.
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
#[serde(default)]
pub struct ListQuery {
    pub user_id: Option<String>,
    pub project_id: Option<String>,
    pub channel: Option<String>,
    pub after: Option<String>,
    pub limit: usize,
}

impl ListQuery {
    /// Keeps the first `limit` of `list` after `after`, in id order; says whether more match.
    pub fn page(&self, list: &mut Vec<ConnInfo>) -> bool {
        self.first(list, self.limit + 1);
        let more = list.len() > self.limit;
        list.truncate(self.limit);
        more
    }

    /// What one core (or node) contributes to a page: its first `limit + 1` after `after`,
    /// so that the page knows whether more follow.
    pub fn part(&self, list: &mut Vec<ConnInfo>) {
        self.first(list, self.limit + 1);
    }

    fn first(&self, list: &mut Vec<ConnInfo>, n: usize) {
        list.sort_by(|a, b| a.connection_id.cmp(&b.connection_id));
        if let Some(after) = &self.after {
            list.retain(|c| c.connection_id.as_str() > after.as_str());
        }
        list.truncate(n);
    }
}

/// One core's answer to an admin command.
#[derive(Debug)]
pub enum AdminAnswer {
    /// Connections (disconnect, grant) or subscriptions (revoke) affected on this core.
    Count(usize),
    Connections(Vec<ConnInfo>),
    Members(Vec<crate::cluster::control::Member>),
    Overrides(HashMap<String, Overrides>),
}

#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct ConnInfo {
    pub connection_id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub instance_id: Option<String>,
    pub core: usize,
    pub user_id: String,
    pub channels: Vec<String>,
    #[serde(default)]
    pub project_ids: Vec<String>,
    pub ip: std::net::IpAddr,
    pub transport: String,
    /// Unix ms.
    pub connected_at: u64,
}

impl Core {
    pub(super) fn admin(&self, cmd: &AdminCmd) -> AdminAnswer {
        let conns = self.connections();
        let of_user = |user: &str| {
            conns
                .iter()
                .filter(|c| c.session.borrow().user() == user)
                .cloned()
                .collect::<Vec<_>>()
        };
        match cmd {
            AdminCmd::Disconnect { user, reason } => {
                let hit = of_user(user);
                for conn in &hit {
                    self.close(conn, 4003, reason);
                }
                AdminAnswer::Count(hit.len())
            }
            AdminCmd::Revoke {
                user,
                channels,
                projects,
                then,
            }
            | AdminCmd::Grant {
                user,
                channels,
                projects,
                then,
            } => {
                let revoke = matches!(cmd, AdminCmd::Revoke { .. });
                let overrides = {
                    let mut all = self.overrides.borrow_mut();
                    let o = all.entry(user.clone()).or_default();
                    match then {
                        Some(stored) => *o = stored.clone(),
                        None if revoke => o.revoke(channels, projects),
                        None => o.grant(channels, projects),
                    }
                    o.clone()
                };
                let mut count = 0;
                for conn in of_user(user) {
                    count += self.with_session(&conn, |s, ctx, out| {
                        s.set_overrides(overrides.clone());
                        if !revoke {
                            return 1;
                        }
                        s.purge(|d| {
                            d.project_id
                                .as_deref()
                                .is_some_and(|p| projects.iter().any(|r| r == p))
                        });
                        s.end_forbidden_subscriptions("revoked", ctx, out)
                    });
                }
                AdminAnswer::Count(count)
            }
            AdminCmd::Replace(all) => {
                let before = self.overrides.replace(all.clone());
                let mut count = 0;
                for conn in &conns {
                    let user = conn.session.borrow().user().to_owned();
                    let now = all.get(&user).cloned().unwrap_or_default();
                    if before.get(&user).cloned().unwrap_or_default() == now {
                        continue;
                    }
                    count += self.with_session(conn, |s, ctx, out| {
                        s.set_overrides(now.clone());
                        s.purge(|d| {
                            d.project_id
                                .as_deref()
                                .is_some_and(|p| now.revoked_projects.iter().any(|r| r == p))
                        });
                        s.end_forbidden_subscriptions("revoked", ctx, out)
                    });
                }
                AdminAnswer::Count(count)
            }
            AdminCmd::List(query) => {
                let mut list: Vec<ConnInfo> = conns
                    .iter()
                    .filter_map(|c| {
                        let s = c.session.borrow();
                        let wanted = query.user_id.as_ref().is_none_or(|u| u == s.user())
                            && query
                                .project_id
                                .as_ref()
                                .is_none_or(|p| s.handshake_projects().contains(p))
                            && query
                                .channel
                                .as_ref()
                                .is_none_or(|ch| s.channels().any(|k| **k == **ch));
                        wanted.then(|| self.conn_info(&s))
                    })
                    .collect();
                query.part(&mut list);
                AdminAnswer::Connections(list)
            }
            AdminCmd::PresenceRefresh => {
                if let Broker::Redis(redis) = &self.shared.broker {
                    for (channel, joined) in self.presence.borrow().announced() {
                        let left = Vec::new();
                        redis.presence(Change {
                            channel,
                            joined,
                            left,
                        });
                    }
                }
                AdminAnswer::Count(0)
            }
            AdminCmd::Overrides => AdminAnswer::Overrides(self.overrides.borrow().clone()),
            AdminCmd::NodeRate { rate } => {
                let share = rate.div_ceil(self.shared.mesh.cores() as u32);
                self.bucket.borrow_mut().set_rate(share);
                AdminAnswer::Count(0)
            }
            AdminCmd::Registry => AdminAnswer::Members(
                conns
                    .iter()
                    .map(|c| {
                        let s = c.session.borrow();
                        let (connected, pong) = s.times();
                        crate::cluster::control::Member {
                            conn: s.id(),
                            user: s.user().to_owned(),
                            projects: s.handshake_projects().to_vec(),
                            ip: s.peer(),
                            connected_at: wall_ms(connected),
                            last_heartbeat: wall_ms(pong),
                            transport: transport(&s),
                        }
                    })
                    .collect(),
            ),
        }
    }

    fn conn_info(&self, s: &Session) -> ConnInfo {
        ConnInfo {
            connection_id: self.shared.conn_name(s.id()),
            instance_id: self.shared.instance().map(str::to_owned),
            core: self.id,
            user_id: s.user().to_owned(),
            channels: s.channels().map(|k| k.to_string()).collect(),
            project_ids: s.handshake_projects().to_vec(),
            ip: s.peer(),
            transport: transport(s).to_owned(),
            connected_at: wall_ms(s.times().0),
        }
    }
}

/// The wall-clock time (Unix ms) of a past `Instant`.
fn wall_ms(at: Instant) -> u64 {
    now_ms().saturating_sub(at.elapsed().as_millis() as u64)
}

/// How a connection's client reaches it.
pub fn transport(s: &Session) -> &'static str {
    if s.is_sse() {
        "sse"
    } else if s.encoding() == crate::proto::msg::Encoding::SocketIo {
        "socket.io"
    } else {
        "websocket"
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info(id: &str) -> ConnInfo {
        ConnInfo {
            connection_id: id.into(),
            instance_id: None,
            core: 0,
            user_id: "u".into(),
            channels: Vec::new(),
            project_ids: Vec::new(),
            ip: std::net::Ipv4Addr::LOCALHOST.into(),
            transport: "websocket".into(),
            connected_at: 0,
        }
    }

    #[test]
    fn pages_of_one_walk_every_connection_of_every_core() {
        let cores = [vec!["1", "2", "3", "a"], vec!["1000000000001"], vec![]];
        let mut seen = Vec::new();
        let mut after = None;
        loop {
            let query = ListQuery {
                after: after.clone(),
                limit: 1,
                ..ListQuery::default()
            };
            let mut page: Vec<ConnInfo> = Vec::new();
            for core in &cores {
                let mut part: Vec<ConnInfo> = core.iter().map(|id| info(id)).collect();
                query.part(&mut part);
                page.extend(part);
            }
            let more = query.page(&mut page);
            seen.extend(page.iter().map(|c| c.connection_id.clone()));
            if !more {
                break;
            }
            after = page.last().map(|c| c.connection_id.clone());
        }
        assert_eq!(seen, ["1", "1000000000001", "2", "3", "a"]);
    }
}
