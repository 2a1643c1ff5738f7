//! Connection limits, node-wide: connection rate per IP, concurrent connections per user, per
//! project and in all. Pure bookkeeping, shared by every core: checked once per connect and
//! once per disconnect, never per message, with no lock that every handshake takes.
//!
//! Invariant: every admitted connection is counted exactly once in `total`, under its user and
//! under each project it named at the handshake, until `release`.

use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::net::IpAddr;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Mutex, MutexGuard};

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

/// Which limits a node checks itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Checks {
    /// Every limit, on this node's counts alone.
    All,
    /// Only the node's own capacity (`total`): the others were checked cluster-wide. The
    /// connection is still counted everywhere, for the node-local fallback.
    CapacityOnly,
}

/// An admitted connection, and the older one it displaces, if any.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Admitted {
    pub evict: Option<u64>,
}

/// The node's connection counts, shared by every core. No lock is shared by all handshakes:
/// the total is an atomic and the per-IP, per-user and per-project counts are split over
/// `SHARDS` locks by key, each taken alone and briefly.
#[derive(Debug, Default)]
pub struct Limits {
    cfg: LimitConfig,
    /// Per IP: the minute (since the epoch) of the window and how many connects came in it.
    ip_windows: Shards<HashMap<IpAddr, (u64, u32)>>,
    users: Shards<UserShard>,
    projects: Shards<HashMap<String, u32>>,
    total: AtomicU32,
}

#[derive(Debug, Default)]
struct UserShard {
    /// Per user: connection ids, oldest first.
    users: HashMap<String, Vec<u64>>,
    /// Connections told to close for a newer one, not yet released: not counted, not chosen.
    evicting: Vec<u64>,
}

/// Locks by a key's hash.
const SHARDS: usize = 16;

#[derive(Debug, Default)]
struct Shards<T>([Mutex<T>; SHARDS]);

impl<T> Shards<T> {
    fn of(&self, key: &(impl Hash + ?Sized)) -> MutexGuard<'_, T> {
        let mut h = std::collections::hash_map::DefaultHasher::new();
        key.hash(&mut h);
        let shard = &self.0[h.finish() as usize % SHARDS];
        // A panic while a count was held leaves the counts as they were: keep going.
        shard.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Per-IP windows a shard keeps before it forgets those of earlier minutes.
const MAX_WINDOWS_PER_SHARD: usize = 1024;

impl Limits {
    pub fn new(cfg: LimitConfig) -> Limits {
        Limits {
            cfg,
            ..Limits::default()
        }
    }

    /// Decides on a connection attempt from `ip` by `user` naming `projects`, at `now_secs`.
    /// An admitted connection is counted until `release`; a refused one is not counted (its
    /// attempt still counts against the per-IP rate).
    pub fn admit(
        &self,
        conn: u64,
        ip: IpAddr,
        user: &str,
        projects: &[String],
        now_secs: u64,
        checks: Checks,
    ) -> Result<Admitted, Refused> {
        let mut c = self.cfg;
        if checks == Checks::CapacityOnly {
            (c.per_ip_per_minute, c.per_project, c.per_user) = (0, 0, 0);
        }
        if c.per_ip_per_minute > 0 && (c.limit_loopback || !ip.is_loopback()) {
            let minute = now_secs / 60;
            let mut windows = self.ip_windows.of(&ip);
            if windows.len() > MAX_WINDOWS_PER_SHARD {
                windows.retain(|_, w| w.0 == minute);
            }
            let window = windows.entry(ip).or_insert((minute, 0));
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
        let counted_in_total = self
            .total
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (c.total == 0 || n < c.total).then_some(n + 1)
            })
            .is_ok();
        if !counted_in_total {
            return Err(Refused {
                status: 503,
                retry_after_secs: Some(5),
                reason: format!("the node holds its maximum of {} connections", c.total),
            });
        }
        for (i, p) in projects.iter().enumerate() {
            let mut counts = self.projects.of(p.as_str());
            let n = counts.entry(p.clone()).or_default();
            if c.per_project > 0 && *n >= c.per_project {
                if *n == 0 {
                    counts.remove(p);
                }
                drop(counts);
                self.uncount(&projects[..i]);
                return Err(Refused {
                    status: 503,
                    retry_after_secs: Some(5),
                    reason: format!(
                        "project {p} has its maximum of {} connections",
                        c.per_project
                    ),
                });
            }
            *n += 1;
        }
        let mut shard = self.users.of(user);
        let UserShard { users, evicting } = &mut *shard;
        let mut evict = None;
        let held = users.get(user).map_or(0, |ids| {
            ids.iter().filter(|id| !evicting.contains(id)).count()
        });
        if c.per_user > 0 && held >= c.per_user as usize {
            match c.user_policy {
                UserPolicy::Reject => {
                    drop(shard);
                    self.uncount(projects);
                    return Err(Refused {
                        status: 429,
                        retry_after_secs: Some(5),
                        reason: format!("user {user} already has {} connections", c.per_user),
                    });
                }
                UserPolicy::CloseOldest => {
                    evict = users
                        .get(user)
                        .and_then(|ids| ids.iter().copied().find(|id| !evicting.contains(id)));
                    evicting.extend(evict);
                }
            }
        }
        users.entry(user.to_string()).or_default().push(conn);
        Ok(Admitted { evict })
    }

    /// Takes back the total and the project counts of an attempt that was refused after them.
    fn uncount(&self, projects: &[String]) {
        for p in projects {
            let mut counts = self.projects.of(p.as_str());
            if let Some(n) = counts.get_mut(p) {
                *n -= 1;
                if *n == 0 {
                    counts.remove(p);
                }
            }
        }
        self.total.fetch_sub(1, Ordering::AcqRel);
    }

    /// Forgets an admitted connection (call exactly once, when it ends).
    pub fn release(&self, conn: u64, user: &str, projects: &[String]) {
        {
            let mut shard = self.users.of(user);
            shard.evicting.retain(|&id| id != conn);
            if let Some(ids) = shard.users.get_mut(user) {
                ids.retain(|&id| id != conn);
                if ids.is_empty() {
                    shard.users.remove(user);
                }
            }
        }
        self.uncount(projects);
    }

    pub fn total(&self) -> u32 {
        self.total.load(Ordering::Acquire)
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
        let l = limits(|c| c.per_ip_per_minute = 2);
        let a = ip("10.0.0.1");
        assert!(l.admit(1, a, "u", &[], 120, Checks::All).is_ok());
        assert!(l.admit(2, a, "u", &[], 130, Checks::All).is_ok());
        let r = l.admit(3, a, "u", &[], 150, Checks::All).unwrap_err();
        assert_eq!((r.status, r.retry_after_secs), (429, Some(30)));
        assert!(
            l.admit(4, ip("10.0.0.2"), "u", &[], 150, Checks::All)
                .is_ok(),
            "other IPs unaffected"
        );
        assert!(
            l.admit(5, a, "u", &[], 180, Checks::All).is_ok(),
            "next minute"
        );
    }

    #[test]
    fn loopback_is_exempt_unless_asked() {
        let l = limits(|c| {
            c.per_ip_per_minute = 1;
            c.limit_loopback = false;
        });
        for id in 0..5 {
            assert!(l
                .admit(id, ip("127.0.0.1"), "u", &[], 0, Checks::All)
                .is_ok());
        }
    }

    #[test]
    fn per_user_reject_or_close_oldest() {
        let l = limits(|c| c.per_user = 2);
        assert!(l.admit(1, ip("10.0.0.1"), "u", &[], 0, Checks::All).is_ok());
        assert!(l.admit(2, ip("10.0.0.1"), "u", &[], 0, Checks::All).is_ok());
        assert_eq!(
            l.admit(3, ip("10.0.0.1"), "u", &[], 0, Checks::All)
                .unwrap_err()
                .status,
            429
        );
        assert!(l.admit(3, ip("10.0.0.1"), "v", &[], 0, Checks::All).is_ok());
        l.release(1, "u", &[]);
        assert!(l.admit(4, ip("10.0.0.1"), "u", &[], 0, Checks::All).is_ok());

        let l = limits(|c| {
            c.per_user = 2;
            c.user_policy = UserPolicy::CloseOldest;
        });
        l.admit(1, ip("10.0.0.1"), "u", &[], 0, Checks::All)
            .unwrap();
        l.admit(2, ip("10.0.0.1"), "u", &[], 0, Checks::All)
            .unwrap();
        assert_eq!(
            l.admit(3, ip("10.0.0.1"), "u", &[], 0, Checks::All)
                .unwrap()
                .evict,
            Some(1)
        );
        // Before 1 is gone, a fourth displaces 2, not 1 again: the user never holds more.
        assert_eq!(
            l.admit(4, ip("10.0.0.1"), "u", &[], 0, Checks::All)
                .unwrap()
                .evict,
            Some(2)
        );
        l.release(1, "u", &[]);
        l.release(2, "u", &[]);
        assert_eq!(
            l.admit(5, ip("10.0.0.1"), "u", &[], 0, Checks::All)
                .unwrap()
                .evict,
            Some(3)
        );
    }

    #[test]
    fn per_project_and_total() {
        let l = limits(|c| {
            c.per_project = 1;
            c.total = 3;
        });
        let p = vec!["p1".to_string()];
        l.admit(1, ip("10.0.0.1"), "u", &p, 0, Checks::All).unwrap();
        assert_eq!(
            l.admit(2, ip("10.0.0.1"), "v", &p, 0, Checks::All)
                .unwrap_err()
                .status,
            503
        );
        l.admit(2, ip("10.0.0.1"), "v", &[], 0, Checks::All)
            .unwrap();
        l.admit(3, ip("10.0.0.1"), "w", &[], 0, Checks::All)
            .unwrap();
        assert_eq!(
            l.admit(4, ip("10.0.0.1"), "x", &[], 0, Checks::All)
                .unwrap_err()
                .status,
            503
        );
        l.release(1, "u", &p);
        assert_eq!(l.total(), 2);
        l.admit(5, ip("10.0.0.1"), "y", &p, 0, Checks::All).unwrap();
    }

    #[test]
    fn cores_admitting_at_once_never_pass_a_limit() {
        let l = std::sync::Arc::new(limits(|c| {
            c.per_user = 3;
            c.per_project = 5;
            c.total = 7;
        }));
        let peak = std::sync::Arc::new(AtomicU32::new(0));
        let threads: Vec<_> = (0..4u64)
            .map(|t| {
                let (l, peak) = (l.clone(), peak.clone());
                std::thread::spawn(move || {
                    let p = vec!["p".to_string()];
                    for i in 0..2_000u64 {
                        let id = t << 32 | i;
                        let user = if i % 2 == 0 { "u" } else { "v" };
                        if l.admit(id, ip("10.0.0.1"), user, &p, 0, Checks::All)
                            .is_ok()
                        {
                            peak.fetch_max(l.total(), Ordering::Relaxed);
                            l.release(id, user, &p);
                        }
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        assert!(peak.load(Ordering::Relaxed) <= 7);
        assert_eq!(l.total(), 0, "every admit released");
        assert!(l.projects.of("p").is_empty() && l.users.of("u").users.is_empty());
    }

    #[test]
    fn old_per_ip_windows_are_forgotten() {
        // A window is needed for its minute only: addresses seen in earlier minutes go once a
        // shard has more than MAX_WINDOWS_PER_SHARD.
        let l = limits(|c| c.per_ip_per_minute = 5);
        let addr = |i: u32| IpAddr::from(std::net::Ipv4Addr::from(0x0a00_0000 + i));
        for i in 0..20_000u32 {
            l.admit(i as u64, addr(i), "u", &[], 0, Checks::All)
                .unwrap();
        }
        for i in 20_000..40_000u32 {
            l.admit(i as u64, addr(i), "u", &[], 600, Checks::All)
                .unwrap();
        }
        let kept: usize = l.ip_windows.0.iter().map(|s| s.lock().unwrap().len()).sum();
        assert!(
            kept <= 20_000 + SHARDS * (MAX_WINDOWS_PER_SHARD + 1),
            "{kept}"
        );
    }
}
