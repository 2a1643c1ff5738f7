//! Edges: the HTTP endpoints, tokens and configuration.

pub mod admin;
pub mod config;
pub mod http;
pub mod jwt;
pub mod publish;
pub mod socketio;
pub mod sse;
pub mod terminal;
pub mod token;
pub mod upgrade;
