//! Runtime: worker threads on monoio (io_uring), the socket loops, the cross-core mesh.

pub mod audit;
pub mod conn;
pub mod core;
pub mod mesh;
pub mod node;
pub mod pending;
pub mod polling;
pub mod shared;
pub mod socket;
pub mod worker;
pub mod writer;
