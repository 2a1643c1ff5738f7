//! Connection limits, node-wide: connection rate per IP, concurrent connections per user, per
//! project and in all. Pure bookkeeping; the runtime holds one `Limits` behind a mutex shared
//! by every core (taken once per connect and once per disconnect, never per message).
//!
//! Invariant: every admitted connection is counted exactly once in `total`, under its user and
//! under each project it named at the handshake, until `release`.

use std::collections::HashMap;
use std::net::IpAddr;

/// What to do with a user's connection beyond `per_user`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UserPolicy {
    /// Refuse the new connection (HTTP 429).
    Reject,
    /// Admit it and close the user's oldest connection (close 4008).
    CloseOldest,
}

/// Limits in force; 0 means "no limit".
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LimitConfig {
    pub per_ip_per_minute: u32,
    /// Whether loopback peers count against `per_ip_per_minute` (off by default: behind a local
    /// proxy every client would share 127.0.0.1).
    pub limit_loopback: bool,
    pub per_user: u32,
    pub user_policy: UserPolicy,
    pub per_project: u32,
    pub total: u32,
}

impl std::str::FromStr for UserPolicy {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "reject" => Ok(UserPolicy::Reject),
            "close-oldest" => Ok(UserPolicy::CloseOldest),
            other => Err(format!("\"{other}\": expected reject or close-oldest")),
        }
    }
}

impl Default for LimitConfig {
    fn default() -> Self {
        LimitConfig {
            per_ip_per_minute: 10,
            limit_loopback: false,
            per_user: 5,
            user_policy: UserPolicy::Reject,
            per_project: 50,
            total: 100_000,
        }
    }
}

/// Why a connection was refused: the HTTP status, a `Retry-After` in seconds, and the reason.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refused {
    pub status: u16,
    pub retry_after_secs: Option<u64>,
    pub reason: String,
}

/// An admitted connection, and the older one it displaces, if any.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Admitted {
    pub evict: Option<u64>,
}

#[derive(Debug, Default)]
pub struct Limits {
    cfg: LimitConfig,
    /// Per IP: the minute (since the epoch) of the window and how many connects came in it.
    ip_windows: HashMap<IpAddr, (u64, u32)>,
    /// Per user: connection ids, oldest first.
    users: HashMap<String, Vec<u64>>,
    /// Connections told to close for a newer one, not yet released: not counted, not chosen.
    evicting: Vec<u64>,
    projects: HashMap<String, u32>,
    total: u32,
}

impl Limits {
    pub fn new(cfg: LimitConfig) -> Limits {
        Limits {
            cfg,
            ..Limits::default()
        }
    }

    /// Decides on a connection attempt from `ip` by `user` naming `projects`, at `now_secs`.
    pub fn admit(
        &mut self,
        conn: u64,
        ip: IpAddr,
        user: &str,
        projects: &[String],
        now_secs: u64,
    ) -> Result<Admitted, Refused> {
        let c = self.cfg;
        if c.per_ip_per_minute > 0 && (c.limit_loopback || !ip.is_loopback()) {
            let minute = now_secs / 60;
            let window = self.ip_windows.entry(ip).or_insert((minute, 0));
            if window.0 != minute {
                *window = (minute, 0);
            }
            if window.1 >= c.per_ip_per_minute {
                return Err(Refused {
                    status: 429,
                    retry_after_secs: Some(60 - now_secs % 60),
                    reason: format!(
                        "more than {} connections per minute from {ip}",
                        c.per_ip_per_minute
                    ),
                });
            }
            window.1 += 1;
        }
        if c.total > 0 && self.total >= c.total {
            return Err(Refused {
                status: 503,
                retry_after_secs: Some(5),
                reason: format!("the node holds its maximum of {} connections", c.total),
            });
        }
        if c.per_project > 0 {
            if let Some(p) = projects
                .iter()
                .find(|p| self.projects.get(*p).copied().unwrap_or(0) >= c.per_project)
            {
                return Err(Refused {
                    status: 503,
                    retry_after_secs: Some(5),
                    reason: format!(
                        "project {p} has its maximum of {} connections",
                        c.per_project
                    ),
                });
            }
        }
        let mut evict = None;
        let live = |ids: &Vec<u64>| ids.iter().filter(|id| !self.evicting.contains(id)).count();
        let held = self.users.get(user).map_or(0, live);
        if c.per_user > 0 && held >= c.per_user as usize {
            match c.user_policy {
                UserPolicy::Reject => {
                    return Err(Refused {
                        status: 429,
                        retry_after_secs: Some(5),
                        reason: format!("user {user} already has {} connections", c.per_user),
                    })
                }
                UserPolicy::CloseOldest => {
                    evict = self
                        .users
                        .get(user)
                        .and_then(|ids| ids.iter().copied().find(|id| !self.evicting.contains(id)));
                    self.evicting.extend(evict);
                }
            }
        }
        self.users.entry(user.to_string()).or_default().push(conn);
        for p in projects {
            *self.projects.entry(p.clone()).or_default() += 1;
        }
        self.total += 1;
        Ok(Admitted { evict })
    }

    /// Forgets an admitted connection (call exactly once, when it ends).
    pub fn release(&mut self, conn: u64, user: &str, projects: &[String]) {
        self.evicting.retain(|&id| id != conn);
        if let Some(ids) = self.users.get_mut(user) {
            ids.retain(|&id| id != conn);
            if ids.is_empty() {
                self.users.remove(user);
            }
        }
        for p in projects {
            if let Some(n) = self.projects.get_mut(p) {
                *n -= 1;
                if *n == 0 {
                    self.projects.remove(p);
                }
            }
        }
        self.total = self.total.saturating_sub(1);
    }

    /// Old per-IP windows: drop them now and then.
    pub fn forget_old_windows(&mut self, now_secs: u64) {
        let minute = now_secs / 60;
        self.ip_windows.retain(|_, w| w.0 == minute);
    }

    pub fn total(&self) -> u32 {
        self.total
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn limits(f: impl FnOnce(&mut LimitConfig)) -> Limits {
        let mut cfg = LimitConfig {
            per_ip_per_minute: 0,
            limit_loopback: true,
            per_user: 0,
            user_policy: UserPolicy::Reject,
            per_project: 0,
            total: 0,
        };
        f(&mut cfg);
        Limits::new(cfg)
    }

    #[test]
    fn per_ip_rate_per_minute_with_retry_after() {
        let mut l = limits(|c| c.per_ip_per_minute = 2);
        let a = ip("10.0.0.1");
        assert!(l.admit(1, a, "u", &[], 120).is_ok());
        assert!(l.admit(2, a, "u", &[], 130).is_ok());
        let r = l.admit(3, a, "u", &[], 150).unwrap_err();
        assert_eq!((r.status, r.retry_after_secs), (429, Some(30)));
        assert!(
            l.admit(4, ip("10.0.0.2"), "u", &[], 150).is_ok(),
            "other IPs unaffected"
        );
        assert!(l.admit(5, a, "u", &[], 180).is_ok(), "next minute");
    }

    #[test]
    fn loopback_is_exempt_unless_asked() {
        let mut l = limits(|c| {
            c.per_ip_per_minute = 1;
            c.limit_loopback = false;
        });
        for id in 0..5 {
            assert!(l.admit(id, ip("127.0.0.1"), "u", &[], 0).is_ok());
        }
    }

    #[test]
    fn per_user_reject_or_close_oldest() {
        let mut l = limits(|c| c.per_user = 2);
        assert!(l.admit(1, ip("10.0.0.1"), "u", &[], 0).is_ok());
        assert!(l.admit(2, ip("10.0.0.1"), "u", &[], 0).is_ok());
        assert_eq!(
            l.admit(3, ip("10.0.0.1"), "u", &[], 0).unwrap_err().status,
            429
        );
        assert!(l.admit(3, ip("10.0.0.1"), "v", &[], 0).is_ok());
        l.release(1, "u", &[]);
        assert!(l.admit(4, ip("10.0.0.1"), "u", &[], 0).is_ok());

        let mut l = limits(|c| {
            c.per_user = 2;
            c.user_policy = UserPolicy::CloseOldest;
        });
        l.admit(1, ip("10.0.0.1"), "u", &[], 0).unwrap();
        l.admit(2, ip("10.0.0.1"), "u", &[], 0).unwrap();
        assert_eq!(
            l.admit(3, ip("10.0.0.1"), "u", &[], 0).unwrap().evict,
            Some(1)
        );
        // Before 1 is gone, a fourth displaces 2, not 1 again: the user never holds more.
        assert_eq!(
            l.admit(4, ip("10.0.0.1"), "u", &[], 0).unwrap().evict,
            Some(2)
        );
        l.release(1, "u", &[]);
        l.release(2, "u", &[]);
        assert_eq!(
            l.admit(5, ip("10.0.0.1"), "u", &[], 0).unwrap().evict,
            Some(3)
        );
    }

    #[test]
    fn per_project_and_total() {
        let mut l = limits(|c| {
            c.per_project = 1;
            c.total = 3;
        });
        let p = vec!["p1".to_string()];
        l.admit(1, ip("10.0.0.1"), "u", &p, 0).unwrap();
        assert_eq!(
            l.admit(2, ip("10.0.0.1"), "v", &p, 0).unwrap_err().status,
            503
        );
        l.admit(2, ip("10.0.0.1"), "v", &[], 0).unwrap();
        l.admit(3, ip("10.0.0.1"), "w", &[], 0).unwrap();
        assert_eq!(
            l.admit(4, ip("10.0.0.1"), "x", &[], 0).unwrap_err().status,
            503
        );
        l.release(1, "u", &p);
        assert_eq!(l.total(), 2);
        l.admit(5, ip("10.0.0.1"), "y", &p, 0).unwrap();
    }
}
