//! Presence: which users are on a channel marked for it, and their joins and leaves, told to
//! the channel's subscribers as `presence` events.
//!
//! Each channel's owner core keeps the count of subscriptions per user (from every core of
//! the node). Changes are not told one by one: every `flush` (once per tick) compares who is
//! there with who was last announced and says only the difference. A join is told at the
//! next flush; a leave only once the user has been gone at two flushes in a row, so a user
//! whose connection dropped and came back within a tick or so (a reconnect storm) causes no
//! event at all.
//!
//! Invariant: `announced` is exactly what the flushes said (joined minus left, from the
//! start); a channel is forgotten once nobody is on it and nobody is announced.
//! Bound: one count per user per channel with a subscription of that user.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;

/// Which channels keep presence: exact names and prefixes (`task:*`).
#[derive(Debug, Clone, Default)]
pub struct PresenceRule(Vec<String>);

impl PresenceRule {
    /// From a comma-separated list of names and `prefix*` patterns.
    pub fn parse(list: &str) -> Result<PresenceRule, String> {
        let mut patterns = Vec::new();
        for p in list.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let name = p.strip_suffix('*').unwrap_or(p);
            if name.contains('*') || (!name.is_empty() && super::channel::validate(name).is_err()) {
                return Err(format!(
                    "presence_channels: {p:?} is neither a channel name nor a prefix ending in *"
                ));
            }
            patterns.push(p.to_owned());
        }
        Ok(PresenceRule(patterns))
    }

    pub fn matches(&self, channel: &str) -> bool {
        self.0.iter().any(|p| match p.strip_suffix('*') {
            Some(prefix) => channel.starts_with(prefix),
            None => p == channel,
        })
    }
}

/// What changed on one channel since the last flush.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Change {
    pub channel: Arc<str>,
    pub joined: Vec<String>,
    pub left: Vec<String>,
}

#[derive(Debug, Default)]
struct Room {
    /// Subscriptions per user now.
    counts: BTreeMap<Box<str>, u32>,
    /// The users the flushes left present.
    announced: BTreeSet<Box<str>>,
    /// Announced users found gone at the last flush: told as left at the next if still gone.
    leaving: BTreeSet<Box<str>>,
    dirty: bool,
}

/// The presence of the channels one core owns.
#[derive(Debug, Default)]
pub struct Presence {
    rooms: HashMap<Arc<str>, Room>,
}

impl Presence {
    /// One more subscription of `user` on `channel`.
    pub fn join(&mut self, channel: &Arc<str>, user: &str) {
        let room = self.rooms.entry(channel.clone()).or_default();
        *room.counts.entry(user.into()).or_default() += 1;
        room.dirty = true;
    }

    /// One subscription fewer (a leave without its join is ignored).
    pub fn leave(&mut self, channel: &str, user: &str) {
        let Some(room) = self.rooms.get_mut(channel) else {
            return;
        };
        if let Some(n) = room.counts.get_mut(user) {
            *n -= 1;
            if *n == 0 {
                room.counts.remove(user);
            }
            room.dirty = true;
        }
    }

    /// The users on `channel` now, in order.
    pub fn members(&self, channel: &str) -> Vec<String> {
        self.rooms.get(channel).map_or_else(Vec::new, |r| {
            r.counts.keys().map(|u| u.to_string()).collect()
        })
    }

    /// What changed since the last flush, per channel, in chunks of at most `chunk` users.
    pub fn flush(&mut self, chunk: usize) -> Vec<Change> {
        let mut out = Vec::new();
        self.rooms.retain(|channel, room| {
            if room.dirty {
                let joined: Vec<String> = room
                    .counts
                    .keys()
                    .filter(|u| !room.announced.contains(*u))
                    .map(|u| u.to_string())
                    .collect();
                let gone: BTreeSet<Box<str>> = room
                    .announced
                    .iter()
                    .filter(|u| !room.counts.contains_key(*u))
                    .cloned()
                    .collect();
                let (left, leaving): (BTreeSet<_>, BTreeSet<_>) =
                    gone.into_iter().partition(|u| room.leaving.contains(u));
                for u in &left {
                    room.announced.remove(u);
                }
                room.announced
                    .extend(joined.iter().map(|u| u.as_str().into()));
                room.dirty = !leaving.is_empty();
                room.leaving = leaving;
                let left: Vec<String> = left.iter().map(|u| u.to_string()).collect();
                let chunks = joined.len().max(left.len()).div_ceil(chunk.max(1));
                for i in 0..chunks {
                    let part = |v: &[String]| {
                        v.iter()
                            .skip(i * chunk)
                            .take(chunk)
                            .cloned()
                            .collect::<Vec<_>>()
                    };
                    out.push(Change {
                        channel: channel.clone(),
                        joined: part(&joined),
                        left: part(&left),
                    });
                }
            }
            !(room.counts.is_empty() && room.announced.is_empty())
        });
        out
    }

    /// Every channel's announced users (what Redis holds of this node, refreshed in cluster
    /// mode).
    pub fn announced(&self) -> Vec<(Arc<str>, Vec<String>)> {
        self.rooms
            .iter()
            .filter(|(_, r)| !r.announced.is_empty())
            .map(|(c, r)| {
                (
                    c.clone(),
                    r.announced.iter().map(|u| u.to_string()).collect(),
                )
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ch(name: &str) -> Arc<str> {
        name.into()
    }

    #[test]
    fn the_rule_takes_names_and_prefixes() {
        let rule = PresenceRule::parse("task:*, dashboard").unwrap();
        assert!(rule.matches("task:t1") && rule.matches("dashboard"));
        assert!(!rule.matches("dashboards") && !rule.matches("project:p1"));
        assert!(PresenceRule::parse("ta*sk").is_err());
        assert!(PresenceRule::parse("bad name").is_err());
        assert!(
            !PresenceRule::parse("").unwrap().matches("task:t1"),
            "none by default"
        );
    }

    #[test]
    fn a_user_joins_once_and_leaves_with_the_last_subscription() {
        let mut p = Presence::default();
        let c = ch("task:1");
        p.join(&c, "alice");
        p.join(&c, "alice");
        p.join(&c, "bob");
        let changes = p.flush(100);
        assert_eq!(
            changes,
            [Change {
                channel: c.clone(),
                joined: vec!["alice".into(), "bob".into()],
                left: vec![],
            }]
        );
        assert_eq!(p.members("task:1"), ["alice", "bob"]);
        p.leave("task:1", "alice");
        assert!(p.flush(100).is_empty(), "alice still has one subscription");
        p.leave("task:1", "alice");
        assert!(p.flush(100).is_empty(), "gone at one flush: not yet told");
        assert_eq!(p.flush(100)[0].left, ["alice"], "gone at two in a row");
        p.leave("task:1", "bob");
        p.flush(100);
        assert_eq!(p.flush(100)[0].left, ["bob"]);
        assert!(p.rooms.is_empty(), "forgotten once empty");
    }

    #[test]
    fn a_reconnect_between_two_flushes_or_across_one_is_no_event() {
        let mut p = Presence::default();
        let c = ch("task:1");
        p.join(&c, "alice");
        p.flush(100);
        for _ in 0..1000 {
            p.leave("task:1", "alice");
            p.join(&c, "alice");
        }
        assert!(p.flush(100).is_empty());
        // Gone at one flush, back before the next.
        p.leave("task:1", "alice");
        assert!(p.flush(100).is_empty());
        p.join(&c, "alice");
        assert!(p.flush(100).is_empty());
        assert!(p.flush(100).is_empty(), "and nothing pending after");
    }

    #[test]
    fn a_storm_of_joins_goes_out_in_chunks() {
        let mut p = Presence::default();
        let c = ch("task:1");
        for i in 0..250 {
            p.join(&c, &format!("u{i:03}"));
        }
        let changes = p.flush(100);
        let sizes: Vec<usize> = changes.iter().map(|c| c.joined.len()).collect();
        assert_eq!(sizes, [100, 100, 50]);
        assert_eq!(p.announced()[0].1.len(), 250);
    }

    #[test]
    fn a_leave_without_a_join_changes_nothing() {
        let mut p = Presence::default();
        p.leave("task:1", "ghost");
        assert!(p.flush(100).is_empty());
    }
}
