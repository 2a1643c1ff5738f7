//! A publish batch as it arrives from Redis Pub/Sub (cluster mode).
//!
//! Invariants: no panic; a batch that parses has a valid channel name, at least one entry and
//! seqs above its life, and writing it out again reads back as the same batch.
#![no_main]

use libfuzzer_sys::fuzz_target;
use ringcast::cluster::wire::Batch;

fuzz_target!(|data: &[u8]| {
    let Ok(batch) = Batch::parse(data) else {
        return;
    };
    assert!(ringcast::delivery::channel::validate(&batch.channel).is_ok());
    assert!(!batch.entries.is_empty());
    assert!(batch.first > batch.life && batch.life > 0);
    assert_eq!(Batch::parse(&batch.payload()).as_ref(), Ok(&batch));
});
