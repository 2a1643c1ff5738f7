//! What travels through Redis, and what a replay read from it means. Pure: no sockets.
//!
//! A channel's messages live in Redis as one stream (`{prefix}:{channel}:s`, entry id
//! `{seq}-0`, fields `p` = seq of the previous durable entry and `e` = the entry) next to a
//! meta hash (`{prefix}:{channel}:m`: `l` = the seq the channel's life started after, `s` = its
//! last seq, `p` = its last durable seq). Each publish batch of one channel is also sent to the
//! nodes as one Pub/Sub message: `{life} {first seq} {channel} ` followed by the entries, each
//! as `{length}:{flag}{entry}` (flag `d` durable, `e` ephemeral).
//!
//! Invariant: a life's seqs start above every seq of the channel's earlier lives (a life starts
//! at Redis's clock in microseconds), so a position from a lost life is below the life's start
//! and can never be resumed into the wrong events.

use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::delivery::{Priority, Publication};

/// One message as it is kept in Redis and sent to the nodes: a publication without its
/// channel, with the time it was published.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Entry {
    pub ts: u64,
    pub event: Box<str>,
    pub data: Box<str>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub project_id: Option<Box<str>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user_id: Option<Box<str>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agent_id: Option<Box<str>>,
    /// 0 low, 1 normal, 2 high, 3 critical.
    #[serde(default = "normal")]
    pub priority: u8,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub coalesce_key: Option<Box<str>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ttl_ms: Option<u64>,
    #[serde(default)]
    pub ephemeral: bool,
}

fn normal() -> u8 {
    1
}

impl Entry {
    /// The entry of a publication published at `ts` (Unix ms).
    pub fn new(p: Publication, ts: u64) -> Entry {
        Entry {
            ts,
            event: p.event,
            data: p.data,
            project_id: p.project_id,
            user_id: p.user_id,
            agent_id: p.agent_id,
            priority: p.priority as u8,
            coalesce_key: p.coalesce_key,
            ttl_ms: p.ttl.map(|t| t.as_millis() as u64),
            ephemeral: p.ephemeral,
        }
    }

    /// Back to a publication of `channel`, and its publish time.
    pub fn into_publication(self, channel: Arc<str>) -> (Publication, u64) {
        let priority = match self.priority {
            0 => Priority::Low,
            2 => Priority::High,
            3 => Priority::Critical,
            _ => Priority::Normal,
        };
        let p = Publication {
            channel,
            event: self.event,
            data: self.data,
            project_id: self.project_id,
            user_id: self.user_id,
            agent_id: self.agent_id,
            priority,
            coalesce_key: self.coalesce_key,
            ttl: self.ttl_ms.map(Duration::from_millis),
            compute_eta: false,
            ephemeral: self.ephemeral,
        };
        (p, self.ts)
    }

    /// The script argument for this entry: its flag, then the entry.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = vec![if self.ephemeral { b'e' } else { b'd' }];
        out.extend(rmp_serde::to_vec_named(self).expect("plain fields serialize"));
        out
    }

    /// An entry as `encode` made it (with or without its flag byte).
    pub fn decode(bytes: &[u8]) -> Result<Entry, WireError> {
        let body = match bytes.first() {
            Some(b'd' | b'e') => &bytes[1..],
            _ => bytes,
        };
        rmp_serde::from_slice(body).map_err(|e| WireError(format!("bad entry: {e}")))
    }
}

/// A message from Redis that this node cannot read (logged and skipped).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct WireError(pub String);

/// One publish batch of one channel as the nodes receive it.
#[derive(Debug, Clone, PartialEq)]
pub struct Batch {
    pub channel: Arc<str>,
    /// The seq the channel's life started after.
    pub life: u64,
    /// Seq of the first entry; the others follow one by one.
    pub first: u64,
    pub entries: Vec<Entry>,
}

impl Batch {
    /// Reads a Pub/Sub payload.
    pub fn parse(payload: &[u8]) -> Result<Batch, WireError> {
        let bad = |what: &str| WireError(format!("bad batch: {what}"));
        let mut rest = payload;
        let mut word = || -> Result<&[u8], WireError> {
            let end = rest
                .iter()
                .position(|&b| b == b' ')
                .ok_or_else(|| bad("header"))?;
            let (w, r) = rest.split_at(end);
            rest = &r[1..];
            Ok(w)
        };
        let number = |w: &[u8]| -> Result<u64, WireError> {
            std::str::from_utf8(w)
                .ok()
                .and_then(|s| s.parse().ok())
                .ok_or_else(|| bad("number"))
        };
        let life = number(word()?)?;
        let first = number(word()?)?;
        let channel = std::str::from_utf8(word()?).map_err(|_| bad("channel"))?;
        crate::delivery::channel::validate(channel).map_err(|_| bad("channel name"))?;
        let channel: Arc<str> = channel.into();
        let mut entries = Vec::new();
        while !rest.is_empty() {
            let colon = rest
                .iter()
                .position(|&b| b == b':')
                .ok_or_else(|| bad("entry length"))?;
            let len = usize::try_from(number(&rest[..colon])?).map_err(|_| bad("entry length"))?;
            let end = (colon + 1)
                .checked_add(len)
                .filter(|&end| end <= rest.len())
                .ok_or_else(|| bad("entry cut short"))?;
            entries.push(Entry::decode(&rest[colon + 1..end])?);
            rest = &rest[end..];
        }
        if entries.is_empty() {
            return Err(bad("no entries"));
        }
        // A life's seqs start above it; the batch's last must be a seq (far below u64::MAX).
        if life == 0
            || first <= life
            || first
                .checked_add(entries.len() as u64)
                .is_none_or(|e| e >= u64::MAX / 2)
        {
            return Err(bad("seqs"));
        }
        Ok(Batch {
            channel,
            life,
            first,
            entries,
        })
    }

    /// The payload the publish script builds (for tests and tools; the script is the writer).
    pub fn payload(&self) -> Vec<u8> {
        let mut out = format!("{} {} {} ", self.life, self.first, self.channel).into_bytes();
        for e in &self.entries {
            let body = e.encode();
            out.extend(format!("{}:", body.len()).as_bytes());
            out.extend(body);
        }
        out
    }
}

/// One durable entry read back from a channel's stream.
#[derive(Debug, Clone, PartialEq)]
pub struct Stored {
    pub seq: u64,
    /// Seq of the durable entry before it (the life's start for the first one).
    pub prev: u64,
    pub entry: Entry,
}

/// A channel as read from Redis: its life and last seq, and the durable entries after the
/// position asked for, oldest first.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Read {
    /// 0: the channel has no state in Redis (never published, expired or lost).
    pub life: u64,
    pub last: u64,
    /// The channel's last durable seq (its stream's newest entry, unless the stream lost it).
    pub last_durable: u64,
    pub entries: Vec<Stored>,
}

impl Read {
    /// Whether `entries` are every durable message after `since` that is still within the age
    /// bound (`oldest_ms`, Unix ms): the position is in this life and not ahead of it, no
    /// durable entry after it was trimmed (each entry's `prev` is the one before it, and the
    /// newest is the channel's last durable one) and none after it has aged out.
    pub fn recovered(&self, since: u64, oldest_ms: u64) -> bool {
        if self.life == 0 || since < self.life || since > self.last {
            return false;
        }
        let newest = self.entries.last().map_or(self.life, |s| s.seq);
        if self.last_durable > since && newest != self.last_durable {
            return false; // the stream lost its newest entries (or all of them)
        }
        let mut expect = None;
        for s in self.entries.iter().filter(|s| s.seq > since) {
            let chained = match expect {
                None => s.prev <= since,
                Some(prev) => s.prev == prev,
            };
            if !chained || s.entry.ts < oldest_ms {
                return false;
            }
            expect = Some(s.seq);
        }
        true
    }
}

/// Redis key names of one deployment (`prefix` lets several share one Redis).
#[derive(Debug, Clone)]
pub struct Keys {
    pub prefix: String,
}

impl Keys {
    /// The meta hash of a channel. The channel name is the key's hash tag, so both keys of a
    /// channel live in one slot of a Redis Cluster.
    pub fn meta(&self, channel: &str) -> String {
        format!("{}:{{{channel}}}:m", self.prefix)
    }

    pub fn stream(&self, channel: &str) -> String {
        format!("{}:{{{channel}}}:s", self.prefix)
    }

    /// A channel's presence: hash `instance|user` → the Unix ms the entry lives until.
    pub fn presence(&self, channel: &str) -> String {
        format!("{}:{{{channel}}}:pr", self.prefix)
    }

    /// A channel's own sharded Pub/Sub channel (on a Redis Cluster), in its keys' slot.
    pub fn shard_channel(&self, channel: &str) -> String {
        format!("{}:{{{channel}}}:p", self.prefix)
    }

    /// The Pub/Sub channel every node listens on (one Redis).
    pub fn events(&self) -> String {
        format!("{}:events", self.prefix)
    }

    /// The cluster's epoch (what `welcome` carries).
    pub fn epoch(&self) -> String {
        format!("{}:epoch", self.prefix)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(ts: u64, ephemeral: bool) -> Entry {
        let mut p = Publication::new("c".into(), "task:update", r#"{"a":1}"#);
        p.ephemeral = ephemeral;
        p.user_id = Some("u1".into());
        p.priority = Priority::Critical;
        p.ttl = Some(Duration::from_millis(1500));
        Entry::new(p, ts)
    }

    #[test]
    fn a_batch_survives_the_trip() {
        let b = Batch {
            channel: "task:t 9".replace(' ', "").into(),
            life: 1_764_000_000_000_000,
            first: 1_764_000_000_000_001,
            entries: vec![entry(5, false), entry(6, true)],
        };
        assert_eq!(Batch::parse(&b.payload()).unwrap(), b);
        let (p, ts) = b.entries[0].clone().into_publication("c".into());
        assert_eq!(
            (ts, p.priority, p.ttl),
            (5, Priority::Critical, Some(Duration::from_millis(1500)))
        );
        assert_eq!(p.user_id.as_deref(), Some("u1"));
    }

    #[test]
    fn broken_payloads_are_errors_not_panics() {
        let good = Batch {
            channel: "c".into(),
            life: 1,
            first: 2,
            entries: vec![entry(1, false)],
        }
        .payload();
        assert!(Batch::parse(&good).is_ok());
        let tail = &good[good.iter().position(|&b| b == b'c').unwrap()..];
        let with = |head: &str| [head.as_bytes(), tail].concat();
        for bad in [
            &b""[..],
            b"1 2",
            b"1 2 c ",
            b"x 2 c 3:d",
            b"1 2 c 99:dxx",
            b"1 2 c 2:d\xc1",
            b"1 2 c 18446744073709551615:d",
            &with("0 2 ")[..],
            &with("5 5 ")[..],
            &with("1 18446744073709551614 ")[..],
            b"1 2 bad\"name 3:dxx",
        ] {
            assert!(Batch::parse(bad).is_err(), "{bad:?}");
        }
    }

    fn stored(seq: u64, prev: u64, ts: u64) -> Stored {
        Stored {
            seq,
            prev,
            entry: entry(ts, false),
        }
    }

    #[test]
    fn recovered_only_when_the_chain_after_the_position_is_whole() {
        let read = Read {
            life: 100,
            last: 110,
            last_durable: 109,
            // 103 and 108 were ephemeral (not in the stream), 110 too.
            entries: vec![
                stored(102, 101, 50),
                stored(104, 102, 50),
                stored(109, 104, 60),
            ],
        };
        assert!(
            read.recovered(101, 0),
            "101 itself was the last durable before 102"
        );
        assert!(!read.recovered(100, 0), "101 was trimmed");
        assert!(read.recovered(103, 0), "only an ephemeral between");
        assert!(read.recovered(110, 0), "at the end");
        assert!(!read.recovered(111, 0), "ahead of the channel");
        assert!(!read.recovered(99, 0), "from an earlier life");
        assert!(read.recovered(104, 60), "109 is just within the age bound");
        assert!(!read.recovered(104, 61), "109 aged out");
        assert!(!Read::default().recovered(0, 0), "no such channel in Redis");
        let emptied = Read {
            entries: vec![],
            ..read.clone()
        };
        assert!(
            !emptied.recovered(101, 0),
            "the stream was deleted under the meta hash"
        );
        assert!(
            emptied.recovered(109, 0),
            "nothing durable after the position"
        );
    }

    #[test]
    fn both_keys_of_a_channel_share_its_hash_tag() {
        let k = Keys {
            prefix: "rc".into(),
        };
        assert_eq!(k.meta("project:42"), "rc:{project:42}:m");
        assert_eq!(k.stream("project:42"), "rc:{project:42}:s");
    }
}
