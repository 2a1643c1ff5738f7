//! Engine.IO polling payloads and Socket.IO packets, as a client sends them.
//!
//! Invariants: no panic; every record of a payload decodes or is an error; a Socket.IO packet
//! that decodes encodes to a text that decodes to the same packet.
#![no_main]

use libfuzzer_sys::fuzz_target;
use ringcast::proto::engineio::{self, Data, Packet};
use ringcast::proto::socketio;

fuzz_target!(|data: &[u8]| {
    let _ = engineio::decode_payload(data);
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    for record in text.split('\x1e') {
        if let Ok(Packet::Message(Data::Text(packet))) = engineio::decode_text(record) {
            if let Ok(p) = socketio::decode(packet) {
                let again = socketio::encode(&p);
                assert_eq!(socketio::decode(&again).as_ref(), Ok(&p), "{packet:?} -> {again:?}");
            }
        }
    }
});
