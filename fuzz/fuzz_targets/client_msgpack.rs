//! Client messages as MessagePack, handled as the connection loop does: MessagePack →
//! `serde_json::Value` → JSON text → the same parser as JSON clients.
//!
//! Invariants: no panic, and the work happens on a thread with a worker's stack (2 MiB, the
//! default of a spawned thread), so nesting that would overflow a worker is found here too.
#![no_main]

use libfuzzer_sys::fuzz_target;
use ringcast::proto::msg::parse_client_message;

fuzz_target!(|data: &[u8]| {
    let data = data.to_vec();
    std::thread::Builder::new()
        .stack_size(2 << 20)
        .spawn(move || {
            if let Ok(value) = rmp_serde::from_slice::<serde_json::Value>(&data) {
                let _ = parse_client_message(value.to_string().as_bytes());
            }
        })
        .expect("spawn")
        .join()
        .expect("no panic");
});
