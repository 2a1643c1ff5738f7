//! Delivery core: channels, sequencing, replay rings, rooms, access rules and heartbeats.
//!
//! Pure: no sockets, no clocks (time comes in as `now_ms` / `Instant` arguments), no threads.
//! The runtime is the only caller.

use std::sync::{Arc, OnceLock};

use bytes::Bytes;

use crate::proto::msg::{self, Encoding, Format};
use crate::proto::ws::deflate;

pub mod access;
pub mod channel;
pub mod deadline;
pub mod filter;
pub mod heartbeat;
pub mod limits;
pub mod presence;
pub mod progress;
pub mod queue;
pub mod recovery;
pub mod ring;
pub mod rooms;
pub mod sequencer;
pub mod session;
pub mod sse;
pub mod tally;
pub mod terminal;

/// One sequenced message, as every subscriber receives it: the frame is built once and shared.
#[derive(Debug)]
pub struct Delivery {
    pub channel: Arc<str>,
    pub seq: u64,
    /// The complete WebSocket frame (header and JSON payload), the same bytes for every socket.
    pub frame: Bytes,
    /// Message-level visibility: only connections allowed to see this project / user get it.
    pub project_id: Option<Box<str>>,
    pub user_id: Option<Box<str>>,
    /// What connection filters look at (besides `project_id`).
    pub agent_id: Option<Box<str>>,
    pub event: Box<str>,
    /// What yields when a client is behind (see `queue`).
    pub priority: Priority,
    /// For a client that is behind, only the newest queued event with this key is kept.
    pub coalesce_key: Option<Box<str>>,
    /// Dropped if still queued for a connection after this long (critical events never are).
    pub ttl: Option<std::time::Duration>,
    /// The same message in the other formats, each built the first time a subscriber needs it.
    pub twins: Twins,
}

/// Compressed frames shared by subscribers since start: one per message and encoding that some
/// subscriber got compressed (see `Twins`).
static COMPRESSED: tally::Tally = tally::Tally::new();

/// How many compressed frames this process has built and shared (for metrics and tests).
pub fn compressed_total() -> u64 {
    COMPRESSED.sum()
}

/// A message's frame in other formats than plain JSON: built once each, on first use, and
/// shared by every subscriber that uses that format.
///
/// A twin is built outside its cell, so a core that needs it while another core is building
/// it (a compression of up to 1 MiB) builds its own instead of waiting: the first one stored is
/// the one every subscriber shares, and the other is dropped. That duplicate is rare (two
/// cores meeting on the same message in the same microseconds) and costs time, never bytes
/// on the wire.
#[derive(Debug, Default)]
pub struct Twins {
    msgpack: OnceLock<Bytes>,
    /// The Server-Sent Events message.
    sse: OnceLock<Bytes>,
    /// The Socket.IO EVENT packet.
    socketio: OnceLock<Bytes>,
    /// permessage-deflate frames, by encoding (JSON, MessagePack, Socket.IO).
    deflated: [OnceLock<Bytes>; 3],
}

impl Delivery {
    /// The shared frame in `format`: one encode (and one compression) per message per format
    /// in use, whatever the number of subscribers.
    pub fn frame_for(&self, format: impl Into<Format>) -> Bytes {
        self.frame_in(format).clone()
    }

    /// The same, borrowed.
    pub fn frame_in(&self, format: impl Into<Format>) -> &Bytes {
        let format = format.into();
        let plain = match format.encoding {
            Encoding::Json => &self.frame,
            Encoding::MessagePack => {
                shared(&self.twins.msgpack, || {
                    msg::event_frame_msgpack(&self.frame)
                })
                .0
            }
            Encoding::SocketIo => {
                shared(&self.twins.socketio, || {
                    msg::event_frame_socketio(&self.frame, &self.channel, self.seq, &self.event)
                })
                .0
            }
            // Not a WebSocket frame: never compressed.
            Encoding::Sse => return shared(&self.twins.sse, || msg::event_sse(&self.frame)).0,
        };
        match format.compress_over {
            Some(min) if plain.len() > min as usize => {
                let slot = match format.encoding {
                    Encoding::MessagePack => 1,
                    Encoding::SocketIo => 2,
                    _ => 0,
                };
                let cell = &self.twins.deflated[slot];
                let (frame, stored) = shared(cell, || {
                    deflate::compress_frame(plain).unwrap_or_else(|| plain.clone())
                });
                if stored {
                    COMPRESSED.add(1);
                }
                frame
            }
            _ => plain,
        }
    }
}

/// The twin in `cell`, built by `build` if it is not there yet; true if this call stored it.
fn shared(cell: &OnceLock<Bytes>, build: impl FnOnce() -> Bytes) -> (&Bytes, bool) {
    if let Some(twin) = cell.get() {
        return (twin, false);
    }
    let stored = cell.set(build()).is_ok();
    (
        cell.get().expect("stored by us or by the core we raced"),
        stored,
    )
}

impl Publication {
    /// A `presence` event: who joined and who left `channel` (never replayed).
    pub fn presence(channel: Arc<str>, joined: &[String], left: &[String]) -> Publication {
        let data = serde_json::json!({ "joined": joined, "left": left }).to_string();
        Publication {
            ephemeral: true,
            ..Publication::new(channel, "presence", &data)
        }
    }

    /// A plain durable message: normal priority, no visibility fields, no key, no TTL.
    pub fn new(channel: Arc<str>, event: &str, data: &str) -> Publication {
        Publication {
            channel,
            event: event.into(),
            data: data.into(),
            project_id: None,
            user_id: None,
            agent_id: None,
            priority: Priority::Normal,
            coalesce_key: None,
            ttl: None,
            compute_eta: false,
            ephemeral: false,
        }
    }
}

/// How much a message matters to a client that cannot keep up.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord)]
pub enum Priority {
    Low,
    #[default]
    Normal,
    High,
    /// Never dropped while the connection lives.
    Critical,
}

impl Priority {
    pub fn parse(s: &str) -> Option<Priority> {
        match s {
            "low" => Some(Priority::Low),
            "normal" => Some(Priority::Normal),
            "high" => Some(Priority::High),
            "critical" => Some(Priority::Critical),
            _ => None,
        }
    }
}

/// A message as a publisher sent it, before it has a seq.
#[derive(Debug, Clone)]
pub struct Publication {
    pub channel: Arc<str>,
    pub event: Box<str>,
    /// The publisher's `data`, exactly as sent (raw JSON text).
    pub data: Box<str>,
    pub project_id: Option<Box<str>>,
    pub user_id: Option<Box<str>>,
    pub agent_id: Option<Box<str>>,
    pub priority: Priority,
    pub coalesce_key: Option<Box<str>>,
    pub ttl: Option<std::time::Duration>,
    /// The publisher asked the server to add `eta_seconds` to this progress event's data.
    pub compute_eta: bool,
    /// Never kept for replay.
    pub ephemeral: bool,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_encoding_is_built_once_per_message_and_shared() {
        let frame = msg::event_frame("c", 7, "e", 1, r#"{"a":[1,2],"b":"x"}"#);
        let d = Delivery {
            channel: "c".into(),
            seq: 7,
            frame,
            project_id: None,
            user_id: None,
            agent_id: None,
            event: "e".into(),
            priority: Priority::Normal,
            coalesce_key: None,
            ttl: None,
            twins: Default::default(),
        };
        let a = d.frame_for(Encoding::MessagePack);
        let b = d.frame_for(Encoding::MessagePack);
        assert_eq!(a.as_ptr(), b.as_ptr(), "one MessagePack encode, shared");
        assert_eq!(a[0], 0x82, "FIN + binary");
        let map: serde_json::Value = rmp_serde::from_slice(&a[2..]).unwrap();
        assert_eq!(
            map,
            serde_json::json!({"channel":"c","seq":7,"event":"e","ts":1,"data":{"a":[1,2],"b":"x"}})
        );
        assert_eq!(d.frame_for(Encoding::Json).as_ptr(), d.frame.as_ptr());
    }

    #[test]
    fn a_core_needing_a_twin_another_core_is_building_does_not_wait_for_it() {
        use std::sync::mpsc;
        let twin = OnceLock::new();
        let cell = &twin;
        let (building_tx, building_rx) = mpsc::channel();
        let (done_tx, done_rx) = mpsc::channel();
        std::thread::scope(|s| {
            let slow = s.spawn(move || {
                shared(cell, || {
                    building_tx.send(()).unwrap();
                    // Still building when the other core finds the cell empty.
                    let other = done_rx.recv_timeout(std::time::Duration::from_secs(10));
                    assert!(other.is_ok(), "the other core waited for this build");
                    Bytes::from_static(b"slow")
                })
                .1
            });
            building_rx.recv().unwrap();
            let (fast, stored) = shared(cell, || Bytes::from_static(b"fast"));
            assert!(stored);
            assert_eq!(fast.as_ref(), b"fast");
            done_tx.send(()).unwrap();
            assert!(!slow.join().unwrap(), "the slower duplicate is dropped");
        });
        assert_eq!(twin.get().unwrap().as_ref(), b"fast", "one twin, shared");
    }

    #[test]
    fn compressed_frames_are_built_once_per_format_and_only_past_the_threshold() {
        let data = format!("{{\"log\":\"{}\"}}", "all tests passed; ".repeat(200));
        let d = Delivery {
            channel: "c".into(),
            seq: 1,
            frame: msg::event_frame("c", 1, "log", 1, &data),
            project_id: None,
            user_id: None,
            agent_id: None,
            event: "log".into(),
            priority: Priority::Normal,
            coalesce_key: None,
            ttl: None,
            twins: Default::default(),
        };
        let deflate = |encoding, min| Format {
            encoding,
            compress_over: Some(min),
        };
        let before = compressed_total();
        let a = d.frame_for(deflate(Encoding::Json, 1024));
        let b = d.frame_for(deflate(Encoding::Json, 1024));
        assert_eq!(a.as_ptr(), b.as_ptr(), "one compression, shared");
        assert_eq!(a[0], 0xC1, "FIN + RSV1 + text");
        assert!(
            a.len() * 5 < d.frame.len(),
            "{} vs {}",
            a.len(),
            d.frame.len()
        );
        let m = d.frame_for(deflate(Encoding::MessagePack, 1024));
        assert_eq!(m[0], 0xC2, "FIN + RSV1 + binary");
        assert_eq!(
            d.frame_for(deflate(Encoding::MessagePack, 1024)).as_ptr(),
            m.as_ptr()
        );
        // Other threads may compress too; this message was compressed exactly twice.
        assert!(compressed_total() >= before + 2);
        // Under the threshold: the plain frame itself.
        let big = d.frame.len() as u32;
        assert_eq!(
            d.frame_for(deflate(Encoding::Json, big)).as_ptr(),
            d.frame.as_ptr()
        );
    }
}
