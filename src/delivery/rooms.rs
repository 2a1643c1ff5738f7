//! One core's room index: channel → the local subscribers of that channel.
//!
//! Invariant: a subscriber appears at most once per channel; an empty room is removed, so the
//! map holds only channels with local subscribers. Generic over the subscriber handle so it is
//! tested without sockets.

use std::collections::HashMap;
use std::sync::Arc;

use indexmap::IndexMap;

#[derive(Debug)]
pub struct Rooms<T> {
    rooms: HashMap<Arc<str>, IndexMap<u64, T>>,
}

impl<T> Default for Rooms<T> {
    fn default() -> Self {
        Rooms {
            rooms: HashMap::new(),
        }
    }
}

impl<T> Rooms<T> {
    /// Adds `id` to the room of `channel`; false if it was already there.
    pub fn join(&mut self, channel: &Arc<str>, id: u64, member: T) -> bool {
        let room = self.rooms.entry(channel.clone()).or_default();
        if room.contains_key(&id) {
            return false;
        }
        room.insert(id, member);
        true
    }

    /// The room's own copy of a channel's name, if the room exists (so members can share it).
    pub fn name(&self, channel: &str) -> Option<Arc<str>> {
        self.rooms.get_key_value(channel).map(|(k, _)| k.clone())
    }

    /// Removes `id` from the room of `channel`; true if it was there.
    pub fn leave(&mut self, channel: &str, id: u64) -> bool {
        let Some(room) = self.rooms.get_mut(channel) else {
            return false;
        };
        let was_there = room.swap_remove(&id).is_some();
        if room.is_empty() {
            self.rooms.remove(channel);
        }
        was_there
    }

    /// The local subscribers of `channel`, in no particular order.
    pub fn members(&self, channel: &str) -> impl Iterator<Item = &T> {
        self.rooms.get(channel).into_iter().flat_map(|r| r.values())
    }

    pub fn len(&self, channel: &str) -> usize {
        self.rooms.get(channel).map_or(0, |r| r.len())
    }

    /// Number of channels with at least one local subscriber.
    pub fn channel_count(&self) -> usize {
        self.rooms.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn join_leave_and_cleanup() {
        let mut rooms = Rooms::default();
        let ch: Arc<str> = "a".into();
        assert!(rooms.join(&ch, 1, "one"));
        assert!(!rooms.join(&ch, 1, "one again"));
        assert!(rooms.join(&ch, 2, "two"));
        let mut got: Vec<_> = rooms.members("a").copied().collect();
        got.sort();
        assert_eq!(got, vec!["one", "two"]);
        assert!(rooms.leave("a", 1));
        assert!(!rooms.leave("a", 1));
        assert_eq!(rooms.len("a"), 1);
        assert!(rooms.leave("a", 2));
        assert_eq!(rooms.channel_count(), 0);
        assert_eq!(rooms.members("a").count(), 0);
    }
}
