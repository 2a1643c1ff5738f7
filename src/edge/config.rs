//! Settings: a TOML file, overridden by `RINGCAST_*` environment variables, overridden by flags;
//! checked once at start with errors that say what to fix.
//!
//! Invariant: a `Config` that left `load` is complete and valid; nothing downstream re-checks it.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::Parser;
use serde::Deserialize;

use crate::delivery::heartbeat::HeartbeatConfig;
use crate::delivery::limits::LimitConfig;
use crate::delivery::ring::RingBounds;
use crate::runtime::pending::EdgeLimits;

/// Which io driver the workers run on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum IoDriver {
    /// io_uring when the kernel allows it, else epoll with a warning.
    Auto,
    /// io_uring or refuse to start.
    Uring,
    /// epoll (monoio's legacy driver).
    Legacy,
}

/// Command-line flags; each also reads its `RINGCAST_*` variable. Unset ones fall back to the
/// file, then to the defaults, which the help text states (the fields stay `Option`s so that a
/// flag left out does not hide the file's value).
#[derive(Debug, Default, Parser)]
#[command(
    name = "ringcast",
    version,
    about = "Real-time push server (WebSocket fan-out on io_uring)",
    after_help = "With no command, ringcast serves. Settings: a TOML file (--config), then \
                  RINGCAST_* variables, then flags; docs/ringcast.example.toml lists them all."
)]
pub struct Flags {
    #[command(subcommand)]
    pub command: Option<Command>,
    /// TOML settings file [default: none]
    #[arg(long, env = "RINGCAST_CONFIG", global = true)]
    pub config: Option<PathBuf>,
    /// Address to listen on, IP or host name with a port [default: 127.0.0.1:8080]
    #[arg(long, env = "RINGCAST_LISTEN", value_parser = parse_listen)]
    pub listen: Option<SocketAddr>,
    /// Worker threads, each pinned to a core [default: one per core]
    #[arg(long, env = "RINGCAST_WORKERS")]
    pub workers: Option<usize>,
    /// HS256 secret for client tokens, at least 16 bytes [default: none; on loopback a random one (development mode)]
    #[arg(
        long,
        env = "RINGCAST_JWT_SECRET",
        hide_env_values = true,
        global = true
    )]
    pub jwt_secret: Option<String>,
    /// Public keys for RS256/ES256 tokens: `[kid@]ALG:path.pem`, comma-separated [default: none]
    #[arg(long, env = "RINGCAST_JWT_PUBLIC_KEYS")]
    pub jwt_public_keys: Option<String>,
    /// Required `aud` of every token [default: none, not checked]
    #[arg(long, env = "RINGCAST_JWT_AUDIENCE")]
    pub jwt_audience: Option<String>,
    /// Required `iss` of every token [default: none, not checked]
    #[arg(long, env = "RINGCAST_JWT_ISSUER")]
    pub jwt_issuer: Option<String>,
    /// Key publishers send as `Authorization: Bearer <key>`, at least 16 bytes [default: none; on loopback a random one (development mode)]
    #[arg(long, env = "RINGCAST_API_KEY", hide_env_values = true)]
    pub api_key: Option<String>,
    /// Redis URL for cluster mode, e.g. redis://127.0.0.1:6379 [default: none, a single node in memory]
    #[arg(long, env = "RINGCAST_REDIS_URL")]
    pub redis_url: Option<String>,
    /// Cluster mode: prefix of every Redis key and Pub/Sub channel of this deployment [default: ringcast]
    #[arg(long, env = "RINGCAST_REDIS_PREFIX")]
    pub redis_prefix: Option<String>,
    /// Cluster mode: bound of every Redis call; a publish Redis has not taken by then gets 503 [default: 1000]
    #[arg(long, env = "RINGCAST_REDIS_TIMEOUT_MS")]
    pub redis_timeout_ms: Option<u64>,
    /// Cluster mode: Redis sources whose messages are published, comma-separated stream:KEY or pubsub:CHANNEL [default: none]
    #[arg(long, env = "RINGCAST_REDIS_INGEST")]
    pub redis_ingest: Option<String>,
    /// Cluster mode: this node's name, stable across its restarts and unique in the cluster [default: HOSTNAME-PORT]
    #[arg(long, env = "RINGCAST_INSTANCE_ID")]
    pub instance_id: Option<String>,
    /// Cluster mode: time to live of a connection's registry entry in Redis, refreshed while it lives [default: 86400]
    #[arg(long, env = "RINGCAST_REGISTRY_TTL_SECS")]
    pub registry_ttl_secs: Option<u64>,
    /// Cluster mode: how often a node writes its connections to Redis in one batch (at most a third of the TTL) [default: 10000]
    #[arg(long, env = "RINGCAST_REGISTRY_REFRESH_MS")]
    pub registry_refresh_ms: Option<u64>,
    /// Cluster mode: connections in the whole cluster (0: no cap) [default: 0]
    #[arg(long, env = "RINGCAST_CLUSTER_MAX_CONNECTIONS")]
    pub cluster_max_connections: Option<u32>,
    /// Cluster mode: event frames per second in the whole cluster (0: no limit), split evenly among the live nodes [default: 0]
    #[arg(long, env = "RINGCAST_CLUSTER_RATE_LIMIT")]
    pub cluster_rate_limit: Option<u32>,
    /// io driver: io_uring with an epoll fallback, io_uring or refuse, or epoll [default: auto]
    #[arg(long, env = "RINGCAST_IO_DRIVER", value_enum)]
    pub io_driver: Option<IoDriver>,
    /// Replay: newest events kept per channel for resuming clients [default: 1000]
    #[arg(long, env = "RINGCAST_REPLAY_MAX_MESSAGES")]
    pub replay_max_messages: Option<usize>,
    /// Replay: oldest event age kept per channel, in seconds [default: 300]
    #[arg(long, env = "RINGCAST_REPLAY_MAX_AGE_SECS")]
    pub replay_max_age_secs: Option<u64>,
    /// WebSocket ping to every client this often [default: 30000]
    #[arg(long, env = "RINGCAST_PING_INTERVAL_MS")]
    pub ping_interval_ms: Option<u64>,
    /// How long a ping waits for its pong before it counts as missed [default: 10000]
    #[arg(long, env = "RINGCAST_PONG_TIMEOUT_MS")]
    pub pong_timeout_ms: Option<u64>,
    /// Missed pongs in a row that close a connection with 4002 [default: 3]
    #[arg(long, env = "RINGCAST_MAX_MISSED_PONGS")]
    pub max_missed_pongs: Option<u32>,
    /// Socket.IO: Engine.IO ping to every client this often (`pingInterval`) [default: 25000]
    #[arg(long, env = "RINGCAST_SOCKETIO_PING_INTERVAL_MS")]
    pub socketio_ping_interval_ms: Option<u64>,
    /// Socket.IO: how long a ping waits for its pong before the session closes (`pingTimeout`) [default: 20000]
    #[arg(long, env = "RINGCAST_SOCKETIO_PING_TIMEOUT_MS")]
    pub socketio_ping_timeout_ms: Option<u64>,
    /// Socket.IO: largest Engine.IO packet or polling body a client may send (`maxPayload`) [default: 1000000]
    #[arg(long, env = "RINGCAST_SOCKETIO_MAX_PAYLOAD")]
    pub socketio_max_payload: Option<usize>,
    /// Socket.IO: how long a session that went away can be recovered, in seconds (`connectionStateRecovery.maxDisconnectionDuration`; 0: off) [default: 120]
    #[arg(long, env = "RINGCAST_SOCKETIO_RECOVERY_SECS")]
    pub socketio_recovery_secs: Option<u64>,
    /// After SIGTERM, how long clients have to leave before the rest are closed with 1012 [default: 30000]
    #[arg(long, env = "RINGCAST_DRAIN_TIMEOUT_MS")]
    pub drain_timeout_ms: Option<u64>,
    /// Largest client message in bytes; larger ones close with 1009 [default: 1048576]
    #[arg(long, env = "RINGCAST_MAX_MESSAGE_BYTES")]
    pub max_message_bytes: Option<usize>,
    /// Channels one connection may be subscribed to at once [default: 100]
    #[arg(long, env = "RINGCAST_MAX_CHANNELS_PER_CONNECTION")]
    pub max_channels_per_connection: Option<usize>,
    /// Seconds of clock drift allowed when checking a token's `exp` and `nbf` [default: 5]
    #[arg(long, env = "RINGCAST_JWT_LEEWAY_SECS")]
    pub jwt_leeway_secs: Option<u64>,
    /// Bytes waiting to be written to one client before it is closed as too slow (1008) [default: 8388608]
    #[arg(long, env = "RINGCAST_MAX_QUEUE_BYTES")]
    pub max_queue_bytes: Option<usize>,
    /// Messages queued for one client past which it counts as behind (low, then normal yield) [default: 100]
    #[arg(long, env = "RINGCAST_QUEUE_THRESHOLD")]
    pub queue_threshold: Option<usize>,
    /// How long a client may stay behind before it is closed with 1008 "too slow" [default: 30000]
    #[arg(long, env = "RINGCAST_SLOW_CLIENT_TIMEOUT_MS")]
    pub slow_client_timeout_ms: Option<u64>,
    /// Event frames per second to one connection (0: no limit); critical events are not counted [default: 100]
    #[arg(long, env = "RINGCAST_CONNECTION_RATE_LIMIT")]
    pub connection_rate_limit: Option<u32>,
    /// Event frames per second on the whole node (0: no limit) [default: 10000]
    #[arg(long, env = "RINGCAST_NODE_RATE_LIMIT")]
    pub node_rate_limit: Option<u32>,
    /// Least time between two events of one coalesce_key to one client (0: no pacing) [default: 100]
    #[arg(long, env = "RINGCAST_KEY_INTERVAL_MS")]
    pub key_interval_ms: Option<u64>,
    /// How long an event may wait in a connection's queue before it is dropped [default: 5000]
    #[arg(long, env = "RINGCAST_QUEUE_TTL_MS")]
    pub queue_ttl_ms: Option<u64>,
    /// `ack=critical`: re-send an unacknowledged critical event after this many ms [default: 5000]
    #[arg(long, env = "RINGCAST_ACK_TIMEOUT_MS")]
    pub ack_timeout_ms: Option<u64>,
    /// `ack=critical`: send an unacknowledged critical event at most this many times [default: 5]
    #[arg(long, env = "RINGCAST_ACK_MAX_SENDS")]
    pub ack_max_sends: Option<u32>,
    /// Append audit events (JSON lines) to this file [default: none]
    #[arg(long, env = "RINGCAST_AUDIT_LOG")]
    pub audit_log: Option<PathBuf>,
    /// Browser origins allowed (comma-separated); others get 403 [default: every origin]
    #[arg(long, env = "RINGCAST_ALLOWED_ORIGINS")]
    pub allowed_origins: Option<String>,
    /// New connections per minute from one IP (0: no limit) [default: 10]
    #[arg(long, env = "RINGCAST_CONNECTIONS_PER_IP_PER_MINUTE")]
    pub connections_per_ip_per_minute: Option<u32>,
    /// Count loopback peers against the per-IP rate too [default: false]
    #[arg(long, env = "RINGCAST_LIMIT_LOOPBACK")]
    pub limit_loopback: Option<bool>,
    /// Concurrent connections per user (0: no limit) [default: 5]
    #[arg(long, env = "RINGCAST_MAX_CONNECTIONS_PER_USER")]
    pub max_connections_per_user: Option<u32>,
    /// `reject` (429) or `close-oldest` (close 4008) past the per-user limit [default: reject]
    #[arg(long, env = "RINGCAST_USER_LIMIT_POLICY")]
    pub user_limit_policy: Option<String>,
    /// Concurrent connections naming one project at the handshake (0: no limit) [default: 50]
    #[arg(long, env = "RINGCAST_MAX_CONNECTIONS_PER_PROJECT")]
    pub max_connections_per_project: Option<u32>,
    /// WebSocket/SSE connections the node holds in all (0: as many as the open-file limit
    /// allows; never more than that, less 64 sockets kept for HTTP) [default: 100000]
    #[arg(long, env = "RINGCAST_MAX_CONNECTIONS")]
    pub max_connections: Option<u32>,
    /// Client messages per second per connection before `rate_limited`; twice that closes 1008 [default: 50]
    #[arg(long, env = "RINGCAST_MAX_CLIENT_MESSAGES_PER_SEC")]
    pub max_client_messages_per_sec: Option<u32>,
    /// Bytes per second one terminal output stream may publish (0: no cap) [default: 1000000]
    #[arg(long, env = "RINGCAST_TERMINAL_MAX_BYTES_PER_SEC")]
    pub terminal_max_bytes_per_sec: Option<u64>,
    /// Offer permessage-deflate to clients that ask for it [default: true]
    #[arg(long, env = "RINGCAST_COMPRESSION")]
    pub compression: Option<bool>,
    /// Event frames larger than this many bytes go compressed [default: 1024]
    #[arg(long, env = "RINGCAST_COMPRESSION_THRESHOLD")]
    pub compression_threshold: Option<u32>,
    /// Bytes of messages waiting in one core's inbox past which publishes get 503
    /// [default: 67108864]
    #[arg(long, env = "RINGCAST_MESH_QUEUE_BYTES")]
    pub mesh_queue_bytes: Option<usize>,
    /// Let the kernel back the heap with transparent huge pages (costs RSS: every touched 2 MiB
    /// range stays resident whole; measured no faster here) [default: false]
    #[arg(long, env = "RINGCAST_TRANSPARENT_HUGE_PAGES")]
    pub transparent_huge_pages: Option<bool>,
    /// Bytes one client's compressed messages may inflate to per second before it is closed
    /// with 1008 (0: no budget) [default: 8388608]
    #[arg(long, env = "RINGCAST_MAX_INFLATED_BYTES_PER_SEC")]
    pub max_inflated_bytes_per_sec: Option<u64>,
    /// Channels that keep presence (join/leave events, a member list): names and prefixes ending in *, comma-separated, e.g. task:* [default: none]
    #[arg(long, env = "RINGCAST_PRESENCE_CHANNELS")]
    pub presence_channels: Option<String>,
    /// Time a new socket (or a keep-alive request's first byte) has for its whole request
    /// head, then 408 and close [default: 10000]
    #[arg(long, env = "RINGCAST_HEADER_TIMEOUT_MS")]
    pub header_timeout_ms: Option<u64>,
    /// Time an idle keep-alive HTTP socket is kept between requests [default: 60000]
    #[arg(long, env = "RINGCAST_KEEPALIVE_TIMEOUT_MS")]
    pub keepalive_timeout_ms: Option<u64>,
    /// Time a request body has to arrive after its head, then 408 and close [default: 30000]
    #[arg(long, env = "RINGCAST_BODY_TIMEOUT_MS")]
    pub body_timeout_ms: Option<u64>,
    /// Sockets the node holds that are not WebSocket/SSE connections (requests on their way,
    /// idle keep-alive, terminal producers); at the bound the oldest that has not sent a
    /// complete request is closed to make room [default: 4096]
    #[arg(long, env = "RINGCAST_MAX_PENDING_SOCKETS")]
    pub max_pending_sockets: Option<usize>,
    /// Such sockets per client IP (0: no limit; loopback only with RINGCAST_LIMIT_LOOPBACK);
    /// past it new sockets from that IP get 429 [default: 64]
    #[arg(long, env = "RINGCAST_MAX_PENDING_PER_IP")]
    pub max_pending_per_ip: Option<u32>,
    /// Bytes of request bodies over 16 KiB one worker buffers at once; past it such
    /// publishes get 503 with Retry-After [default: 67108864]
    #[arg(long, env = "RINGCAST_MAX_BODY_BUFFER_BYTES")]
    pub max_body_buffer_bytes: Option<usize>,
}

/// What to do instead of serving.
#[derive(Debug, clap::Subcommand)]
pub enum Command {
    /// Print a client token signed with the configured HS256 secret
    Token(crate::edge::token::TokenArgs),
}

impl Flags {
    /// Parses the command line and the `RINGCAST_*` variables. `--help` and `--version` print
    /// and exit; a bad value is an error that names where it came from: the flag, or the
    /// variable when the flag was not given.
    pub fn from_args() -> Result<Flags, ConfigError> {
        Flags::try_parse().map_err(|e| match e.kind() {
            clap::error::ErrorKind::DisplayHelp | clap::error::ErrorKind::DisplayVersion => {
                e.exit()
            }
            _ => ConfigError::Invalid(describe_parse_error(&e, std::env::args_os().skip(1))),
        })
    }
}

/// clap names the flag even when the value came from its variable; say which it was.
fn describe_parse_error(e: &clap::Error, args: impl Iterator<Item = std::ffi::OsString>) -> String {
    use clap::error::{ContextKind, ContextValue};
    let rendered = || {
        e.render()
            .to_string()
            .trim_end()
            .trim_start_matches("error: ")
            .to_string()
    };
    let Some(ContextValue::String(arg)) = e.get(ContextKind::InvalidArg) else {
        return rendered();
    };
    let long = arg.split_whitespace().next().unwrap_or(arg);
    let flag_given = args
        .map(|a| a.to_string_lossy().into_owned())
        .any(|a| a == long || a.starts_with(&format!("{long}=")));
    let command = <Flags as clap::CommandFactory>::command();
    let env = command
        .get_arguments()
        .find(|a| {
            a.get_long()
                .is_some_and(|l| long.strip_prefix("--") == Some(l))
        })
        .and_then(|a| a.get_env())
        .map(|v| v.to_string_lossy().into_owned());
    match env {
        Some(var) if !flag_given && std::env::var_os(&var).is_some() => {
            let value = match e.get(ContextKind::InvalidValue) {
                Some(ContextValue::String(v)) => v.clone(),
                _ => String::new(),
            };
            let why = match (std::error::Error::source(e), e.get(ContextKind::ValidValue)) {
                (Some(source), _) => source.to_string(),
                (None, Some(valid)) => format!("expected one of {valid}"),
                (None, None) => "not a valid value".into(),
            };
            format!("invalid value '{value}' in {var}: {why}")
        }
        _ => rendered(),
    }
}

/// `HOST:PORT` with an IP address or a host name; a name resolves to its first IPv4 address
/// (so `localhost` means 127.0.0.1), else its first address.
pub fn parse_listen(s: &str) -> Result<SocketAddr, String> {
    if let Ok(addr) = s.parse() {
        return Ok(addr);
    }
    let hint = "expected HOST:PORT such as 127.0.0.1:8080 or localhost:8080";
    let addrs: Vec<SocketAddr> = std::net::ToSocketAddrs::to_socket_addrs(s)
        .map_err(|e| format!("cannot resolve '{s}' ({e}); {hint}"))?
        .collect();
    addrs
        .iter()
        .find(|a| a.is_ipv4())
        .or(addrs.first())
        .copied()
        .ok_or_else(|| format!("'{s}' resolves to no address; {hint}"))
}

/// The same settings as the file holds them (all optional).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileSettings {
    listen: Option<String>,
    workers: Option<usize>,
    jwt_secret: Option<String>,
    jwt_public_keys: Option<String>,
    jwt_audience: Option<String>,
    jwt_issuer: Option<String>,
    api_key: Option<String>,
    redis_url: Option<String>,
    redis_prefix: Option<String>,
    redis_timeout_ms: Option<u64>,
    redis_ingest: Option<String>,
    instance_id: Option<String>,
    registry_ttl_secs: Option<u64>,
    registry_refresh_ms: Option<u64>,
    cluster_max_connections: Option<u32>,
    cluster_rate_limit: Option<u32>,
    io_driver: Option<IoDriver>,
    replay_max_messages: Option<usize>,
    replay_max_age_secs: Option<u64>,
    ping_interval_ms: Option<u64>,
    pong_timeout_ms: Option<u64>,
    max_missed_pongs: Option<u32>,
    socketio_ping_interval_ms: Option<u64>,
    socketio_ping_timeout_ms: Option<u64>,
    socketio_max_payload: Option<usize>,
    socketio_recovery_secs: Option<u64>,
    drain_timeout_ms: Option<u64>,
    max_message_bytes: Option<usize>,
    max_channels_per_connection: Option<usize>,
    jwt_leeway_secs: Option<u64>,
    max_queue_bytes: Option<usize>,
    allowed_origins: Option<String>,
    audit_log: Option<PathBuf>,
    queue_threshold: Option<usize>,
    slow_client_timeout_ms: Option<u64>,
    ack_timeout_ms: Option<u64>,
    ack_max_sends: Option<u32>,
    connection_rate_limit: Option<u32>,
    node_rate_limit: Option<u32>,
    queue_ttl_ms: Option<u64>,
    key_interval_ms: Option<u64>,
    connections_per_ip_per_minute: Option<u32>,
    limit_loopback: Option<bool>,
    max_connections_per_user: Option<u32>,
    user_limit_policy: Option<String>,
    max_connections_per_project: Option<u32>,
    max_connections: Option<u32>,
    max_client_messages_per_sec: Option<u32>,
    compression: Option<bool>,
    compression_threshold: Option<u32>,
    terminal_max_bytes_per_sec: Option<u64>,
    header_timeout_ms: Option<u64>,
    keepalive_timeout_ms: Option<u64>,
    body_timeout_ms: Option<u64>,
    max_pending_sockets: Option<usize>,
    max_pending_per_ip: Option<u32>,
    max_body_buffer_bytes: Option<usize>,
    mesh_queue_bytes: Option<usize>,
    transparent_huge_pages: Option<bool>,
    max_inflated_bytes_per_sec: Option<u64>,
    presence_channels: Option<String>,
}

/// The settings in force.
#[derive(Debug, Clone)]
pub struct Config {
    pub listen: SocketAddr,
    pub workers: usize,
    /// `None` in development mode (before `main` picks a random one) or with public keys only.
    pub jwt_secret: Option<String>,
    /// RS256/ES256 public keys: (kid, algorithm, PEM path).
    pub jwt_public_keys: Vec<(Option<String>, jsonwebtoken::Algorithm, PathBuf)>,
    pub jwt_audience: Option<String>,
    pub jwt_issuer: Option<String>,
    pub api_key: Option<String>,
    pub io_driver: IoDriver,
    pub ring: RingBounds,
    pub heartbeat: HeartbeatConfig,
    /// Engine.IO's `pingInterval` and `pingTimeout` (one missed pong closes).
    pub socketio_heartbeat: HeartbeatConfig,
    /// Engine.IO's `maxPayload`.
    pub socketio_max_payload: usize,
    /// How long a Socket.IO session that went away can be recovered (zero: not at all).
    pub socketio_recovery: Duration,
    pub drain_timeout: Duration,
    pub max_message_bytes: usize,
    pub max_channels_per_connection: usize,
    pub jwt_leeway_secs: u64,
    pub max_queue_bytes: usize,
    pub limits: LimitConfig,
    pub max_client_messages_per_sec: u32,
    /// `None`: every origin.
    pub allowed_origins: Option<Vec<String>>,
    pub audit_log: Option<PathBuf>,
    pub queue_threshold: usize,
    pub slow_client_timeout: Duration,
    pub ack_timeout: Duration,
    pub ack_max_sends: u32,
    pub connection_rate_limit: u32,
    pub node_rate_limit: u32,
    pub queue_ttl: Duration,
    pub key_interval: Duration,
    /// permessage-deflate: compress event frames larger than this (`None`: not offered).
    pub compress_over: Option<u32>,
    /// Bytes per second per terminal output stream (0: no cap).
    pub terminal_max_bytes_per_sec: u64,
    /// Deadlines and bounds of the HTTP edge (`max_sockets` is set by `main` from the
    /// open-file limit).
    pub edge: EdgeLimits,
    /// Bytes waiting in one core's inbox past which publishes are refused (503).
    pub mesh_queue_bytes: usize,
    /// Whether the heap may use transparent huge pages.
    pub transparent_huge_pages: bool,
    /// Inflated bytes of compressed client messages per connection per second (0: no budget).
    pub max_inflated_bytes_per_sec: u64,
    /// Channels that keep presence.
    pub presence: crate::delivery::presence::PresenceRule,
    /// Cluster mode (`None`: a single node in memory).
    pub redis: Option<RedisConfig>,
}

/// How a node of a cluster reaches its Redis.
#[derive(Debug, Clone)]
pub struct RedisConfig {
    pub url: String,
    pub prefix: String,
    pub timeout: Duration,
    pub ingest: Vec<crate::cluster::ingest::Source>,
    /// `None`: the host's name and the port the node listens on.
    pub instance: Option<String>,
    pub registry_ttl: Duration,
    pub registry_refresh: Duration,
    pub max_connections: u32,
    pub rate_limit: u32,
}

/// An instance id is part of Redis keys and connection ids: letters, digits, `-`, `_`, `.`.
pub fn valid_instance(id: &str) -> Result<(), String> {
    let ok = !id.is_empty()
        && id.len() <= 64
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'));
    if ok {
        Ok(())
    } else {
        Err(format!(
            "instance_id {id:?}: 1 to 64 letters, digits, '-', '_' or '.'"
        ))
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config file {path}: {source}")]
    Parse {
        path: PathBuf,
        source: Box<toml::de::Error>,
    },
    #[error("{0}")]
    Invalid(String),
}

impl Config {
    /// Merges file, environment (already folded into `flags` by clap) and flags, then checks.
    pub fn load(flags: Flags) -> Result<Config, ConfigError> {
        let file = match &flags.config {
            Some(path) => read_file(path)?,
            None => FileSettings::default(),
        };
        let redis = match flags.redis_url.or(file.redis_url).filter(|u| !u.is_empty()) {
            None => None,
            Some(url) => {
                if !(url.starts_with("redis://") || url.starts_with("rediss://")) {
                    return Err(ConfigError::Invalid(format!(
                        "redis_url must start with redis:// or rediss://, not {url:?}"
                    )));
                }
                let prefix = flags
                    .redis_prefix
                    .or(file.redis_prefix)
                    .unwrap_or_else(|| "ringcast".into());
                if prefix.is_empty() || prefix.contains(['{', '}', ' ']) {
                    return Err(ConfigError::Invalid(
                        "redis_prefix must be non-empty, without braces or spaces".into(),
                    ));
                }
                let timeout_ms = flags
                    .redis_timeout_ms
                    .or(file.redis_timeout_ms)
                    .unwrap_or(1000);
                if timeout_ms == 0 {
                    return Err(ConfigError::Invalid(
                        "redis_timeout_ms must be at least 1".into(),
                    ));
                }
                let ingest = flags
                    .redis_ingest
                    .or(file.redis_ingest)
                    .unwrap_or_default()
                    .split(',')
                    .map(str::trim)
                    .filter(|s| !s.is_empty())
                    .map(crate::cluster::ingest::Source::parse)
                    .collect::<Result<Vec<_>, _>>()
                    .map_err(ConfigError::Invalid)?;
                let instance = flags.instance_id.or(file.instance_id);
                if let Some(i) = &instance {
                    valid_instance(i).map_err(ConfigError::Invalid)?;
                }
                let ttl_secs = flags
                    .registry_ttl_secs
                    .or(file.registry_ttl_secs)
                    .unwrap_or(86_400);
                if ttl_secs == 0 {
                    return Err(ConfigError::Invalid(
                        "registry_ttl_secs must be at least 1".into(),
                    ));
                }
                let refresh_ms = flags
                    .registry_refresh_ms
                    .or(file.registry_refresh_ms)
                    .unwrap_or(10_000)
                    .clamp(100, ttl_secs * 1000 / 3);
                Some(RedisConfig {
                    url,
                    prefix,
                    timeout: Duration::from_millis(timeout_ms),
                    ingest,
                    instance,
                    registry_ttl: Duration::from_secs(ttl_secs),
                    registry_refresh: Duration::from_millis(refresh_ms),
                    max_connections: flags
                        .cluster_max_connections
                        .or(file.cluster_max_connections)
                        .unwrap_or(0),
                    rate_limit: flags
                        .cluster_rate_limit
                        .or(file.cluster_rate_limit)
                        .unwrap_or(0),
                })
            }
        };
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        let file_listen = match file.listen {
            Some(s) => {
                Some(parse_listen(&s).map_err(|e| ConfigError::Invalid(format!("listen: {e}")))?)
            }
            None => None,
        };
        let config = Config {
            listen: flags
                .listen
                .or(file_listen)
                .unwrap_or_else(|| "127.0.0.1:8080".parse().expect("valid literal")),
            workers: flags.workers.or(file.workers).unwrap_or(cores),
            jwt_secret: flags.jwt_secret.or(file.jwt_secret),
            jwt_public_keys: match flags.jwt_public_keys.or(file.jwt_public_keys) {
                None => Vec::new(),
                Some(list) => crate::edge::jwt::parse_key_list(&list)
                    .map_err(|e| ConfigError::Invalid(format!("RINGCAST_JWT_PUBLIC_KEYS: {e}")))?
                    .into_iter()
                    .map(|(kid, alg, path)| (kid, alg, PathBuf::from(path)))
                    .collect(),
            },
            jwt_audience: flags.jwt_audience.or(file.jwt_audience),
            jwt_issuer: flags.jwt_issuer.or(file.jwt_issuer),
            api_key: flags.api_key.or(file.api_key),
            io_driver: flags.io_driver.or(file.io_driver).unwrap_or(IoDriver::Auto),
            ring: RingBounds {
                max_messages: flags
                    .replay_max_messages
                    .or(file.replay_max_messages)
                    .unwrap_or(1000),
                max_age_ms: flags
                    .replay_max_age_secs
                    .or(file.replay_max_age_secs)
                    .unwrap_or(300)
                    .saturating_mul(1000),
            },
            heartbeat: HeartbeatConfig {
                ping_interval: ms(flags.ping_interval_ms.or(file.ping_interval_ms), 30_000),
                pong_timeout: ms(flags.pong_timeout_ms.or(file.pong_timeout_ms), 10_000),
                max_missed: flags
                    .max_missed_pongs
                    .or(file.max_missed_pongs)
                    .unwrap_or(3),
            },
            socketio_heartbeat: HeartbeatConfig {
                ping_interval: ms(
                    flags
                        .socketio_ping_interval_ms
                        .or(file.socketio_ping_interval_ms),
                    25_000,
                ),
                pong_timeout: ms(
                    flags
                        .socketio_ping_timeout_ms
                        .or(file.socketio_ping_timeout_ms),
                    20_000,
                ),
                max_missed: 1,
            },
            socketio_max_payload: flags
                .socketio_max_payload
                .or(file.socketio_max_payload)
                .unwrap_or(1_000_000),
            socketio_recovery: Duration::from_secs(
                flags
                    .socketio_recovery_secs
                    .or(file.socketio_recovery_secs)
                    .unwrap_or(120),
            ),
            drain_timeout: ms(flags.drain_timeout_ms.or(file.drain_timeout_ms), 30_000),
            max_message_bytes: flags
                .max_message_bytes
                .or(file.max_message_bytes)
                .unwrap_or(1 << 20),
            max_channels_per_connection: flags
                .max_channels_per_connection
                .or(file.max_channels_per_connection)
                .unwrap_or(100),
            jwt_leeway_secs: flags.jwt_leeway_secs.or(file.jwt_leeway_secs).unwrap_or(5),
            max_queue_bytes: flags
                .max_queue_bytes
                .or(file.max_queue_bytes)
                .unwrap_or(8 << 20),
            limits: {
                let d = LimitConfig::default();
                LimitConfig {
                    per_ip_per_minute: flags
                        .connections_per_ip_per_minute
                        .or(file.connections_per_ip_per_minute)
                        .unwrap_or(d.per_ip_per_minute),
                    limit_loopback: flags
                        .limit_loopback
                        .or(file.limit_loopback)
                        .unwrap_or(d.limit_loopback),
                    per_user: flags
                        .max_connections_per_user
                        .or(file.max_connections_per_user)
                        .unwrap_or(d.per_user),
                    user_policy: match flags.user_limit_policy.or(file.user_limit_policy) {
                        None => d.user_policy,
                        Some(p) => p.parse().map_err(|e| {
                            ConfigError::Invalid(format!("RINGCAST_USER_LIMIT_POLICY: {e}"))
                        })?,
                    },
                    per_project: flags
                        .max_connections_per_project
                        .or(file.max_connections_per_project)
                        .unwrap_or(d.per_project),
                    total: flags
                        .max_connections
                        .or(file.max_connections)
                        .unwrap_or(d.total),
                }
            },
            max_client_messages_per_sec: flags
                .max_client_messages_per_sec
                .or(file.max_client_messages_per_sec)
                .unwrap_or(50),
            audit_log: flags.audit_log.or(file.audit_log),
            ack_timeout: ms(flags.ack_timeout_ms.or(file.ack_timeout_ms), 5_000),
            connection_rate_limit: flags
                .connection_rate_limit
                .or(file.connection_rate_limit)
                .unwrap_or(100),
            node_rate_limit: flags
                .node_rate_limit
                .or(file.node_rate_limit)
                .unwrap_or(10_000),
            queue_ttl: ms(flags.queue_ttl_ms.or(file.queue_ttl_ms), 5_000),
            key_interval: ms(flags.key_interval_ms.or(file.key_interval_ms), 100),
            terminal_max_bytes_per_sec: flags
                .terminal_max_bytes_per_sec
                .or(file.terminal_max_bytes_per_sec)
                .unwrap_or(1_000_000),
            mesh_queue_bytes: flags
                .mesh_queue_bytes
                .or(file.mesh_queue_bytes)
                .unwrap_or(64 << 20),
            transparent_huge_pages: flags
                .transparent_huge_pages
                .or(file.transparent_huge_pages)
                .unwrap_or(false),
            max_inflated_bytes_per_sec: flags
                .max_inflated_bytes_per_sec
                .or(file.max_inflated_bytes_per_sec)
                .unwrap_or(8 << 20),
            presence: crate::delivery::presence::PresenceRule::parse(
                flags
                    .presence_channels
                    .as_deref()
                    .or(file.presence_channels.as_deref())
                    .unwrap_or(""),
            )
            .map_err(ConfigError::Invalid)?,
            redis,
            compress_over: flags
                .compression
                .or(file.compression)
                .unwrap_or(true)
                .then(|| {
                    flags
                        .compression_threshold
                        .or(file.compression_threshold)
                        .unwrap_or(1024)
                }),
            ack_max_sends: flags.ack_max_sends.or(file.ack_max_sends).unwrap_or(5),
            queue_threshold: flags
                .queue_threshold
                .or(file.queue_threshold)
                .unwrap_or(100),
            slow_client_timeout: ms(
                flags.slow_client_timeout_ms.or(file.slow_client_timeout_ms),
                30_000,
            ),
            edge: {
                let d = EdgeLimits::default();
                EdgeLimits {
                    header_timeout: ms(
                        flags.header_timeout_ms.or(file.header_timeout_ms),
                        d.header_timeout.as_millis() as u64,
                    ),
                    keepalive_timeout: ms(
                        flags.keepalive_timeout_ms.or(file.keepalive_timeout_ms),
                        d.keepalive_timeout.as_millis() as u64,
                    ),
                    body_timeout: ms(
                        flags.body_timeout_ms.or(file.body_timeout_ms),
                        d.body_timeout.as_millis() as u64,
                    ),
                    max_pending: flags
                        .max_pending_sockets
                        .or(file.max_pending_sockets)
                        .unwrap_or(d.max_pending),
                    max_pending_per_ip: flags
                        .max_pending_per_ip
                        .or(file.max_pending_per_ip)
                        .unwrap_or(d.max_pending_per_ip),
                    limit_loopback: flags
                        .limit_loopback
                        .or(file.limit_loopback)
                        .unwrap_or(LimitConfig::default().limit_loopback),
                    max_sockets: d.max_sockets,
                    body_buffer_bytes: flags
                        .max_body_buffer_bytes
                        .or(file.max_body_buffer_bytes)
                        .unwrap_or(d.body_buffer_bytes),
                }
            },
            allowed_origins: flags.allowed_origins.or(file.allowed_origins).map(|list| {
                list.split(',')
                    .map(|o| o.trim().trim_end_matches('/').to_string())
                    .filter(|o| !o.is_empty())
                    .collect()
            }),
        };
        config.check()?;
        Ok(config)
    }

    fn check(&self) -> Result<(), ConfigError> {
        let fail = |m: &str| Err(ConfigError::Invalid(m.to_string()));
        if self.workers == 0 || self.workers > 1024 {
            return fail("workers must be between 1 and 1024");
        }
        if self.ring.max_messages == 0 {
            return fail("replay_max_messages must be at least 1");
        }
        if self.heartbeat.ping_interval.is_zero() || self.heartbeat.pong_timeout.is_zero() {
            return fail("ping_interval_ms and pong_timeout_ms must be above 0");
        }
        let sio = &self.socketio_heartbeat;
        if sio.ping_interval.is_zero() || sio.pong_timeout.is_zero() {
            return fail("socketio_ping_interval_ms and socketio_ping_timeout_ms must be above 0");
        }
        if self.socketio_max_payload < 1024 {
            return fail("socketio_max_payload must be at least 1024");
        }
        if self.heartbeat.max_missed == 0 {
            return fail("max_missed_pongs must be at least 1");
        }
        if self.max_message_bytes < 125 {
            return fail("max_message_bytes must be at least 125");
        }
        // Every subscriber must be able to take the largest event frame (1 MiB of data plus
        // its envelope) into its queue.
        if self.mesh_queue_bytes == 0 {
            return fail("mesh_queue_bytes must be at least 1");
        }
        if self.max_queue_bytes < (2 << 20) {
            return fail("max_queue_bytes must be at least 2 MiB (the largest event frame)");
        }
        let e = &self.edge;
        if e.header_timeout.is_zero() || e.keepalive_timeout.is_zero() || e.body_timeout.is_zero() {
            return fail(
                "header_timeout_ms, keepalive_timeout_ms and body_timeout_ms must be above 0",
            );
        }
        if e.max_pending == 0 {
            return fail("max_pending_sockets must be at least 1");
        }
        if e.body_buffer_bytes < (64 << 10) {
            return fail("max_body_buffer_bytes must be at least 64 KiB");
        }
        if self.max_channels_per_connection == 0 {
            return fail("max_channels_per_connection must be at least 1");
        }
        if matches!(&self.jwt_secret, Some(s) if s.len() < 16) {
            return fail("RINGCAST_JWT_SECRET must be at least 16 bytes");
        }
        if matches!(&self.api_key, Some(k) if k.len() < 16) {
            return fail("RINGCAST_API_KEY must be at least 16 bytes");
        }
        if !self.is_dev_mode() && self.api_key.is_none() {
            return fail(
                "token keys are set (RINGCAST_JWT_SECRET or RINGCAST_JWT_PUBLIC_KEYS) but \
                 RINGCAST_API_KEY is not: set it too (or none of them, on a loopback address, \
                 for development mode)",
            );
        }
        if !self.listen.ip().is_loopback() && (self.is_dev_mode() || self.api_key.is_none()) {
            return Err(ConfigError::Invalid(format!(
                "refusing to listen on {} without token keys (RINGCAST_JWT_SECRET or \
                 RINGCAST_JWT_PUBLIC_KEYS) and RINGCAST_API_KEY: \
                 development mode (random secrets) is only for loopback addresses",
                self.listen
            )));
        }
        Ok(())
    }

    /// Development mode: loopback and no token keys configured.
    pub fn is_dev_mode(&self) -> bool {
        self.jwt_secret.is_none() && self.jwt_public_keys.is_empty()
    }
}

/// What `ringcast token` signs with and what the server will require of the token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenSettings {
    pub jwt_secret: Option<String>,
    /// RS256/ES256 public keys are configured (the server holds no private key to sign with).
    pub has_public_keys: bool,
    pub jwt_audience: Option<String>,
    pub jwt_issuer: Option<String>,
}

impl TokenSettings {
    /// The token settings of the file, the variables and the flags, without the checks that
    /// only serving needs (a script that mints tokens needs no API key).
    pub fn load(flags: &Flags) -> Result<TokenSettings, ConfigError> {
        let file = match &flags.config {
            Some(path) => read_file(path)?,
            None => FileSettings::default(),
        };
        Ok(TokenSettings {
            jwt_secret: flags.jwt_secret.clone().or(file.jwt_secret),
            has_public_keys: flags
                .jwt_public_keys
                .clone()
                .or(file.jwt_public_keys)
                .is_some_and(|list| !list.trim().is_empty()),
            jwt_audience: flags.jwt_audience.clone().or(file.jwt_audience),
            jwt_issuer: flags.jwt_issuer.clone().or(file.jwt_issuer),
        })
    }
}

fn ms(value: Option<u64>, default_ms: u64) -> Duration {
    Duration::from_millis(value.unwrap_or(default_ms))
}

fn read_file(path: &Path) -> Result<FileSettings, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.to_owned(),
        source,
    })?;
    toml::from_str(&text).map_err(|source| ConfigError::Parse {
        path: path.to_owned(),
        source: Box::new(source),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_a_working_dev_node() {
        let c = Config::load(Flags::default()).unwrap();
        assert_eq!(c.listen, "127.0.0.1:8080".parse().unwrap());
        assert!(c.is_dev_mode());
        assert_eq!(c.ring, RingBounds::default());
        assert_eq!(c.heartbeat, HeartbeatConfig::default());
        assert_eq!(c.max_message_bytes, 1 << 20);
    }

    #[test]
    fn public_address_needs_secrets() {
        let flags = Flags {
            listen: Some("0.0.0.0:8080".parse().unwrap()),
            ..Flags::default()
        };
        let err = Config::load(flags).unwrap_err().to_string();
        assert!(err.contains("refusing to listen on 0.0.0.0:8080"), "{err}");
    }

    #[test]
    fn flags_beat_the_file() {
        let dir = std::env::temp_dir().join(format!("ringcast-cfg-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("ringcast.toml");
        std::fs::write(&path, "workers = 3\nreplay_max_messages = 50\n").unwrap();
        let flags = Flags {
            config: Some(path.clone()),
            workers: Some(1),
            ..Flags::default()
        };
        let c = Config::load(flags).unwrap();
        assert_eq!(c.workers, 1);
        assert_eq!(c.ring.max_messages, 50);
        std::fs::write(&path, "wokers = 3\n").unwrap();
        let err = Config::load(Flags {
            config: Some(path),
            ..Flags::default()
        })
        .unwrap_err()
        .to_string();
        assert!(err.contains("wokers"), "{err}");
    }

    const EXAMPLE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/docs/ringcast.example.toml");

    /// The example file's keys, set (`key = v`) or shown commented out (`# key = v`).
    fn example_keys() -> Vec<(String, Option<String>)> {
        std::fs::read_to_string(EXAMPLE)
            .unwrap()
            .lines()
            .filter_map(|line| {
                let (set, rest) = match line.strip_prefix("# ") {
                    Some(rest) => (false, rest),
                    None => (true, line),
                };
                let (key, value) = rest.split_once(" = ")?;
                key.chars()
                    .all(|c| c.is_ascii_lowercase() || c == '_')
                    .then(|| {
                        (
                            key.to_owned(),
                            set.then(|| value.trim_matches('"').to_owned()),
                        )
                    })
            })
            .collect()
    }

    /// Every key the file accepts, as the file parser itself lists them.
    fn accepted_keys() -> Vec<String> {
        let err = toml::from_str::<FileSettings>("no_such_key = 1")
            .unwrap_err()
            .to_string();
        let list = err
            .split("expected one of")
            .nth(1)
            .expect("serde lists the fields");
        list.split('`')
            .skip(1)
            .step_by(2)
            .map(str::to_owned)
            .collect()
    }

    #[test]
    fn the_example_file_names_every_setting_at_its_default() {
        let mut in_file: Vec<String> = example_keys().into_iter().map(|(k, _)| k).collect();
        let mut accepted = accepted_keys();
        in_file.sort();
        accepted.sort();
        assert_eq!(
            in_file, accepted,
            "docs/ringcast.example.toml vs the keys the file takes"
        );
        // Every flag but --config is a file key too.
        let mut flags: Vec<String> = <Flags as clap::CommandFactory>::command()
            .get_arguments()
            .filter_map(|a| a.get_long())
            .filter(|l| *l != "config")
            .map(|l| l.replace('-', "_"))
            .collect();
        flags.sort();
        assert_eq!(flags, accepted);
        // Loading it changes nothing: its values are the defaults.
        let example = Config::load(Flags {
            config: Some(EXAMPLE.into()),
            ..Flags::default()
        })
        .unwrap();
        let defaults = Config::load(Flags::default()).unwrap();
        assert_eq!(format!("{example:?}"), format!("{defaults:?}"));
    }

    #[test]
    fn help_states_the_defaults_the_example_file_sets() {
        let set: std::collections::HashMap<String, String> = example_keys()
            .into_iter()
            .filter_map(|(k, v)| Some((k, v?)))
            .collect();
        for arg in <Flags as clap::CommandFactory>::command().get_arguments() {
            let Some(long) = arg.get_long() else { continue };
            let help = arg.get_help().map(|h| h.to_string()).unwrap_or_default();
            let default = help
                .split("[default: ")
                .nth(1)
                .and_then(|d| d.split(']').next())
                .unwrap_or_else(|| panic!("--{long}: no [default: ...] in {help:?}"));
            if let Some(value) = set.get(&long.replace('-', "_")) {
                assert_eq!(default, value, "--{long}");
            }
        }
    }

    #[test]
    fn host_names_resolve_and_bad_addresses_say_what_to_write() {
        assert_eq!(
            parse_listen("127.0.0.1:9000"),
            Ok("127.0.0.1:9000".parse().unwrap())
        );
        assert_eq!(
            parse_listen("[::1]:9000"),
            Ok("[::1]:9000".parse().unwrap())
        );
        assert_eq!(
            parse_listen("localhost:9000"),
            Ok("127.0.0.1:9000".parse().unwrap())
        );
        let err = parse_listen("localhost").unwrap_err();
        assert!(err.contains("such as 127.0.0.1:8080"), "{err}");
    }

    #[test]
    fn mesh_and_inflate_bounds_have_defaults_and_toml_keys() {
        let c = Config::load(Flags::default()).unwrap();
        assert_eq!(c.mesh_queue_bytes, 64 << 20);
        assert_eq!(c.max_inflated_bytes_per_sec, 8 << 20);
        let dir = std::env::temp_dir().join(format!("ringcast-bounds-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("ringcast.toml");
        std::fs::write(
            &path,
            "mesh_queue_bytes = 1\nmax_inflated_bytes_per_sec = 0\n",
        )
        .unwrap();
        let file = |path: &std::path::Path| Flags {
            config: Some(path.to_owned()),
            ..Flags::default()
        };
        let c = Config::load(file(&path)).unwrap();
        assert_eq!((c.mesh_queue_bytes, c.max_inflated_bytes_per_sec), (1, 0));
        std::fs::write(&path, "mesh_queue_bytes = 0\n").unwrap();
        let err = Config::load(file(&path)).unwrap_err().to_string();
        assert!(err.contains("mesh_queue_bytes must be at least 1"), "{err}");
    }

    #[test]
    fn bad_values_are_named() {
        let err = Config::load(Flags {
            workers: Some(0),
            ..Flags::default()
        })
        .unwrap_err()
        .to_string();
        assert!(err.contains("workers"), "{err}");
        let err = Config::load(Flags {
            redis_url: Some("127.0.0.1:6379".into()),
            ..Flags::default()
        })
        .unwrap_err()
        .to_string();
        assert!(err.contains("redis://"), "{err}");
        let config = Config::load(Flags {
            redis_url: Some("redis://127.0.0.1".into()),
            ..Flags::default()
        })
        .unwrap();
        let redis = config.redis.unwrap();
        assert_eq!(
            (redis.prefix.as_str(), redis.timeout),
            ("ringcast", Duration::from_secs(1))
        );
    }
}
