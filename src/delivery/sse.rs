//! The position of a Server-Sent Events stream, as the `id:` of every message it writes.
//!
//! Invariant: an id never claims more than the client has been told. Per channel (in the
//! order the URL names them) it holds the last seq written, an empty slot ("nothing yet: start
//! live") or `?` ("unknown: tell the client to reload"), so that `Last-Event-ID` resumes every
//! channel exactly — or says `recovered:false` again rather than skip a gap silently.
//!
//! Format: `{epoch}:{list}:{slots}` where `list` is a hash of the ordered channel list (an id
//! made for other channels resumes nothing) and `slots` is comma-separated, e.g.
//! `7927bf06b962a6a8:1c9a3f20:17,,?`.
//!
//! Pure: no sockets, no clocks.

use std::cell::RefCell;
use std::sync::Arc;

use bytes::Bytes;

use super::sequencer::Resume;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Slot {
    /// Nothing written yet and nothing owed: a reconnect starts live.
    Empty,
    /// The position is lost (another epoch, evicted): a reconnect gets `recovered:false`.
    Unknown,
    /// Everything up to this seq was written.
    At(u64),
}

pub struct SseStream {
    /// `{epoch}:{list hash}`.
    prefix: Box<str>,
    channels: Vec<Arc<str>>,
    slots: RefCell<Vec<Slot>>,
}

impl SseStream {
    /// A stream over `channels`, starting from where `resumes[i]` puts channel i.
    pub fn new(epoch: &str, channels: &[String], resumes: &[Resume]) -> SseStream {
        let slot = |r: Option<&Resume>| match r {
            Some(Resume::After(seq)) => Slot::At(*seq),
            Some(Resume::OtherEpoch | Resume::Held) => Slot::Unknown,
            Some(Resume::Live) | None => Slot::Empty,
        };
        SseStream {
            prefix: prefix(epoch, channels).into(),
            channels: channels.iter().map(|c| Arc::from(c.as_str())).collect(),
            slots: RefCell::new((0..channels.len()).map(|i| slot(resumes.get(i))).collect()),
        }
    }

    /// Up to `seq` of `channel` is written (an event, or the notice that settles a position).
    pub fn advance(&self, channel: &str, seq: u64) {
        if let Some(i) = self.channels.iter().position(|c| &**c == channel) {
            let mut slots = self.slots.borrow_mut();
            slots[i] = match slots[i] {
                Slot::At(old) => Slot::At(old.max(seq)),
                Slot::Empty | Slot::Unknown => Slot::At(seq),
            };
        }
    }

    /// `id: …` followed by its newline.
    pub fn id_line(&self) -> Bytes {
        let mut line = format!("id: {}:", self.prefix);
        for (i, slot) in self.slots.borrow().iter().enumerate() {
            if i > 0 {
                line.push(',');
            }
            match slot {
                Slot::Empty => {}
                Slot::Unknown => line.push('?'),
                Slot::At(seq) => line.push_str(itoa::Buffer::new().format(*seq)),
            }
        }
        line.push('\n');
        Bytes::from(line)
    }

    /// Reads a `Last-Event-ID` for `channels`: per channel, where to resume. An id from another
    /// epoch, for another channel list, or malformed, resumes nothing (`OtherEpoch`).
    pub fn parse_id(id: &str, epoch: &str, channels: &[String]) -> Vec<Resume> {
        let expected = prefix(epoch, channels);
        let parsed: Option<Vec<Resume>> = id
            .rsplit_once(':')
            .filter(|(p, _)| *p == expected)
            .and_then(|(_, list)| {
                list.split(',')
                    .map(|slot| match slot {
                        "" => Some(Resume::Live),
                        "?" => Some(Resume::OtherEpoch),
                        n => n.parse().ok().map(Resume::After),
                    })
                    .collect()
            })
            .filter(|v: &Vec<Resume>| v.len() == channels.len());
        parsed.unwrap_or_else(|| vec![Resume::OtherEpoch; channels.len()])
    }
}

/// `{epoch}:{FNV-1a of the ordered channel list, 32 bits in hex}`.
fn prefix(epoch: &str, channels: &[String]) -> String {
    let mut hash: u32 = 0x811c_9dc5;
    for (i, name) in channels.iter().enumerate() {
        let sep: &[u8] = if i > 0 { b"," } else { b"" };
        for &b in sep.iter().chain(name.as_bytes()) {
            hash ^= u32::from(b);
            hash = hash.wrapping_mul(0x0100_0193);
        }
    }
    format!("{epoch}:{hash:08x}")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(list: &[&str]) -> Vec<String> {
        list.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn ids_round_trip_every_slot_kind() {
        let ch = names(&["task:a", "task:b", "task:c"]);
        let s = SseStream::new(
            "e1",
            &ch,
            &[Resume::Live, Resume::After(4), Resume::OtherEpoch],
        );
        let id = |s: &SseStream| {
            let line = String::from_utf8(s.id_line().to_vec()).unwrap();
            line.strip_prefix("id: ").unwrap().trim_end().to_owned()
        };
        assert!(id(&s).ends_with(":,4,?"), "{}", id(&s));
        assert_eq!(
            SseStream::parse_id(&id(&s), "e1", &ch),
            vec![Resume::Live, Resume::After(4), Resume::OtherEpoch]
        );
        s.advance("task:a", 7);
        s.advance("task:b", 3); // never backwards
        s.advance("task:c", 9);
        s.advance("task:zz", 1); // not ours: ignored
        assert!(id(&s).ends_with(":7,4,9"), "{}", id(&s));
    }

    #[test]
    fn ids_of_another_epoch_or_channel_list_resume_nothing() {
        let ab = names(&["task:a", "task:b"]);
        let ba = names(&["task:b", "task:a"]);
        let s = SseStream::new("e1", &ab, &[Resume::After(1), Resume::After(2)]);
        let line = String::from_utf8(s.id_line().to_vec()).unwrap();
        let id = line.strip_prefix("id: ").unwrap().trim_end();
        let lost = vec![Resume::OtherEpoch; 2];
        assert_eq!(SseStream::parse_id(id, "e2", &ab), lost);
        assert_eq!(
            SseStream::parse_id(id, "e1", &ba),
            lost,
            "same count, other list"
        );
        assert_eq!(SseStream::parse_id("garbage", "e1", &ab), lost);
        assert_eq!(SseStream::parse_id(&format!("{id},5"), "e1", &ab), lost);
        assert_eq!(
            SseStream::parse_id(id, "e1", &ab),
            vec![Resume::After(1), Resume::After(2)]
        );
    }
}
