//! WebSocket (RFC 6455), server side.

pub mod codec;
pub mod deflate;
