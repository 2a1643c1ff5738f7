//! ringcast: a real-time push server. One publish becomes one shared WebSocket frame that
//! every subscriber's socket receives.
//!
//! Four layers, each naming only the ones below it:
//! 1. [`proto`] — sans-IO protocol: HTTP heads, the WebSocket codec, event/control frames and
//!    client messages.
//! 2. [`delivery`] — pure delivery core: channel names and owners, seq assignment, replay rings,
//!    rooms, access rules, heartbeats.
//! 3. [`runtime`] — thread-per-core monoio workers, socket loops, the cross-core mesh.
//! 4. [`edge`] — HTTP endpoints, tokens, configuration; `main` only wires.
//!
//! The flow of one publish: HTTP `POST /api/v1/publish` on any core → the channel's owner core
//! (seq, frame built once, ring append) → every core with subscribers, over crossbeam → each
//! subscriber's send queue (a clone of the same `Bytes`) → one write per connection per batch.

pub mod cluster;
pub mod delivery;
pub mod edge;
pub mod proto;
pub mod runtime;
