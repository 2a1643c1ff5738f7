//! Protocol, sans-IO: bytes in, frames and messages out. No sockets, no clocks.

pub mod engineio;
pub mod http;
pub mod msg;
pub mod socketio;
pub mod ws;
