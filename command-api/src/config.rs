//! The command API's settings, read once at start-up.

use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::num::{NonZeroU64, NonZeroUsize};
use std::time::Duration;

use axum::http::HeaderValue;
use service_kit::auth::AuthConfig;
use service_kit::config::{ConfigError, Setting, Settings};
use service_kit::db::DatabaseConfig;
use service_kit::kafka::KafkaConfig;
use service_kit::server::{ANY_LOCAL_PORT, ServerLimits};

pub use crate::engine::EngineConfig;
use crate::relay::RelayConfig;

#[derive(Debug, Clone)]
pub struct Config {
    /// [`COMMAND_API_ADDR`]: where to listen (port 0 picks one).
    pub listen: SocketAddr,
    /// [`COMMAND_API_OPS_ADDR`]: where the health probes and `/metrics` are served (port 0
    /// picks one), never on the public port.
    pub ops_listen: SocketAddr,
    pub database: DatabaseConfig,
    pub auth: AuthConfig,
    /// [`COMMAND_API_MAX_BODY_BYTES`]: larger request bodies are answered 413.
    pub max_body_bytes: usize,
    /// How commands run: see [`EngineConfig`].
    pub engine: EngineConfig,
    /// [`COMMAND_API_RELAY`]: run the Kafka relay in this process (one replica leads at a
    /// time); off when the relay runs as `command-api relay` elsewhere.
    pub relay: Option<RelayConfig>,
    /// `CORS_ALLOWED_ORIGINS`: see `service_kit::http::cors_origins_from_env` (default: none).
    pub cors_origins: Vec<HeaderValue>,
    /// The bounds of the listener: see `service_kit::server`.
    pub server: ServerLimits,
    /// [`QUERY_API_PUBLIC_URL`]: the query API as clients reach it, without a trailing
    /// slash. `Location` (201) and `status_url` (202) point there, where the resources are.
    pub query_api_url: String,
    /// [`COMMAND_API_MAX_TRANSFERS_IN_FLIGHT`]: new transfers are refused (503) while this
    /// many are not final (see `crate::backlog`).
    pub max_transfers_in_flight: NonZeroUsize,
    /// [`COMMAND_API_MAX_TRANSFERS_IN_FLIGHT_PER_TENANT`]: a tenant's new transfers are
    /// refused (503) while this many of its own are not final.
    pub max_transfers_in_flight_per_tenant: NonZeroUsize,
}

pub const COMMAND_API_ADDR: Setting<SocketAddr> = Setting::new(
    "COMMAND_API_ADDR",
    SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::LOCALHOST, 8080)),
    "listen address (port 0 picks one)",
);
pub const QUERY_API_PUBLIC_URL: Setting<&str> = Setting::new(
    "QUERY_API_PUBLIC_URL",
    "http://127.0.0.1:8081",
    "the query API as clients reach it: `Location` (201) and `status_url` (202) of the command API point there",
);
pub const COMMAND_API_OPS_ADDR: Setting<SocketAddr> = Setting::new(
    "COMMAND_API_OPS_ADDR",
    SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::LOCALHOST, 9080)),
    "the command API's ops server: `/metrics`, `/health/live`, `/health/ready` (never on the public port)",
);
pub const COMMAND_API_MAX_BODY_BYTES: Setting<usize> = Setting::new(
    "COMMAND_API_MAX_BODY_BYTES",
    16 * 1024,
    "larger bodies get 413",
);
/// The process manager reads it too, as it runs commands.
pub const COMMAND_API_AGGREGATE_CACHE: Setting<NonZeroUsize> = Setting::new(
    "COMMAND_API_AGGREGATE_CACHE",
    NonZeroUsize::new(100_000).unwrap(),
    "accounts whose state stays in memory between commands (and as many transfers)",
);
/// For the command API and the process manager.
pub const COMMAND_API_AGGREGATE_CACHE_BYTES: Setting<NonZeroUsize> = Setting::new(
    "COMMAND_API_AGGREGATE_CACHE_BYTES",
    NonZeroUsize::new(256 * 1024 * 1024).unwrap(),
    "most memory the cached states of each aggregate type may take, counting every entry at the largest size the domain allows; lowers `COMMAND_API_AGGREGATE_CACHE` when that many would not fit",
);
/// For the command API and the process manager.
pub const COMMAND_API_CONFLICT_RETRIES: Setting<u32> = Setting::new(
    "COMMAND_API_CONFLICT_RETRIES",
    5,
    "retries after losing a race, without `If-Match`",
);
/// For the command API and the process manager.
pub const COMMAND_API_SNAPSHOT_EVERY: Setting<NonZeroU64> = Setting::new(
    "COMMAND_API_SNAPSHOT_EVERY",
    NonZeroU64::new(500).unwrap(),
    "a stream's state is snapshotted every this many events, so a load reads at most about as many",
);
/// For the command API and the process manager.
pub const COMMAND_API_APPEND_WRITERS: Setting<NonZeroUsize> = Setting::new(
    "COMMAND_API_APPEND_WRITERS",
    NonZeroUsize::new(2).unwrap(),
    "batches of appends in flight at once (each is one INSERT of every append queued when it starts)",
);
/// Read by `main`, which builds the runtime before anything else runs.
pub const COMMAND_API_WORKER_THREADS: Setting<NonZeroUsize> = Setting::new(
    "COMMAND_API_WORKER_THREADS",
    NonZeroUsize::new(1).unwrap(),
    "threads of the process's async runtime: with one, a request's hops between its connection, stream and writer tasks need no wake-ups across threads (`cargo xtask bench commands` at 1 client, four interleaved pairs: 2.3 context switches per deposit against 4.0 with two, 207-284 µs of CPU against 329-414, p50 0.71-0.93 ms against 0.90-1.13; at 16 clients about a tenth less CPU, 5,000-6,000 deposits/s); more where the command API has cores of its own",
);
pub const COMMAND_API_MAX_TRANSFERS_IN_FLIGHT: Setting<NonZeroUsize> = Setting::new(
    "COMMAND_API_MAX_TRANSFERS_IN_FLIGHT",
    NonZeroUsize::new(1000).unwrap(),
    "new transfers are refused with 503 `overloaded` and `Retry-After` while this many are not final, so that a burst cannot pile up faster than the process manager completes them",
);
pub const COMMAND_API_MAX_TRANSFERS_IN_FLIGHT_PER_TENANT: Setting<NonZeroUsize> = Setting::new(
    "COMMAND_API_MAX_TRANSFERS_IN_FLIGHT_PER_TENANT",
    NonZeroUsize::new(500).unwrap(),
    "a tenant's new transfers are refused with 503 `overloaded` and `Retry-After` while this many of its own are not final, so that one tenant cannot fill the whole pile and have every other tenant's transfers refused",
);
pub const COMMAND_API_RELAY: Setting<bool> = Setting::new(
    "COMMAND_API_RELAY",
    true,
    "run the Kafka relay inside the command API",
);
pub const RELAY_BATCH_SIZE: Setting<i64> =
    Setting::new("RELAY_BATCH_SIZE", 1000, "events per relay batch");
pub const RELAY_IDLE_POLL: Setting<Duration> = Setting::new(
    "RELAY_IDLE_POLL_MS",
    Duration::from_secs(1),
    "fallback poll when nothing wakes the relay",
);
pub const RELAY_LEADER_RETRY: Setting<Duration> = Setting::new(
    "RELAY_LEADER_RETRY_MS",
    Duration::from_secs(2),
    "how often a standby relay tries to become leader",
);

/// The variables the command API, its relay and the process manager read, beyond
/// [`service_kit::config::SETTINGS`].
pub const SETTINGS: Settings = &[
    &COMMAND_API_ADDR,
    &QUERY_API_PUBLIC_URL,
    &COMMAND_API_OPS_ADDR,
    &COMMAND_API_MAX_BODY_BYTES,
    &COMMAND_API_AGGREGATE_CACHE,
    &COMMAND_API_AGGREGATE_CACHE_BYTES,
    &COMMAND_API_CONFLICT_RETRIES,
    &COMMAND_API_APPEND_WRITERS,
    &COMMAND_API_WORKER_THREADS,
    &COMMAND_API_SNAPSHOT_EVERY,
    &COMMAND_API_MAX_TRANSFERS_IN_FLIGHT,
    &COMMAND_API_MAX_TRANSFERS_IN_FLIGHT_PER_TENANT,
    &COMMAND_API_RELAY,
    &RELAY_BATCH_SIZE,
    &RELAY_IDLE_POLL,
    &RELAY_LEADER_RETRY,
    &crate::process::PROCESS_MANAGER_GROUP,
    &crate::process::PROCESS_MANAGER_ADDR,
    &crate::process::PROCESS_MANAGER_STUCK_AFTER,
];

impl Config {
    pub fn from_env() -> Result<Self, ConfigError> {
        Ok(Self {
            listen: COMMAND_API_ADDR.read()?,
            ops_listen: COMMAND_API_OPS_ADDR.read()?,
            database: DatabaseConfig::from_env()?,
            auth: AuthConfig::from_env()?,
            max_body_bytes: COMMAND_API_MAX_BODY_BYTES.read()?,
            engine: EngineConfig::from_env()?,
            relay: if COMMAND_API_RELAY.read()? {
                Some(RelayConfig::from_env()?)
            } else {
                None
            },
            cors_origins: service_kit::http::cors_origins_from_env()?,
            server: ServerLimits::from_env()?,
            query_api_url: query_api_url(QUERY_API_PUBLIC_URL.read()?)?,
            max_transfers_in_flight: COMMAND_API_MAX_TRANSFERS_IN_FLIGHT.read()?,
            max_transfers_in_flight_per_tenant: COMMAND_API_MAX_TRANSFERS_IN_FLIGHT_PER_TENANT
                .read()?,
        })
    }

    /// For tests: `database` and `auth`, both listeners on free ports, no relay (tests run
    /// it as a task of its own, or set [`RelayConfig::for_tests`]), and every other setting
    /// at its default.
    pub fn for_tests(database: DatabaseConfig, auth: AuthConfig) -> Self {
        Self {
            listen: ANY_LOCAL_PORT,
            ops_listen: ANY_LOCAL_PORT,
            database,
            auth,
            max_body_bytes: COMMAND_API_MAX_BODY_BYTES.default,
            engine: EngineConfig::default(),
            relay: None,
            cors_origins: Vec::new(),
            server: ServerLimits::default(),
            query_api_url: QUERY_API_PUBLIC_URL.default.into(),
            max_transfers_in_flight: COMMAND_API_MAX_TRANSFERS_IN_FLIGHT.default,
            max_transfers_in_flight_per_tenant: COMMAND_API_MAX_TRANSFERS_IN_FLIGHT_PER_TENANT
                .default,
        }
    }
}

impl EngineConfig {
    pub fn from_env() -> Result<Self, ConfigError> {
        Ok(Self {
            aggregate_cache: COMMAND_API_AGGREGATE_CACHE.read()?,
            aggregate_cache_bytes: COMMAND_API_AGGREGATE_CACHE_BYTES.read()?,
            conflict_retries: COMMAND_API_CONFLICT_RETRIES.read()?,
            append_writers: COMMAND_API_APPEND_WRITERS.read()?,
            snapshot_every: COMMAND_API_SNAPSHOT_EVERY.read()?,
        })
    }
}

/// Every setting at its default.
impl Default for EngineConfig {
    fn default() -> Self {
        Self {
            aggregate_cache: COMMAND_API_AGGREGATE_CACHE.default,
            aggregate_cache_bytes: COMMAND_API_AGGREGATE_CACHE_BYTES.default,
            conflict_retries: COMMAND_API_CONFLICT_RETRIES.default,
            append_writers: COMMAND_API_APPEND_WRITERS.default,
            snapshot_every: COMMAND_API_SNAPSHOT_EVERY.default,
        }
    }
}

/// The query API's public URL, checked and without a trailing slash.
fn query_api_url(url: String) -> Result<String, ConfigError> {
    if !(url.starts_with("http://") || url.starts_with("https://")) {
        return Err(ConfigError::Invalid {
            name: QUERY_API_PUBLIC_URL.name,
            reason: "must be an absolute http(s) URL".into(),
        });
    }
    Ok(url.trim_end_matches('/').to_owned())
}

impl RelayConfig {
    /// `KAFKA_*` (see `KafkaConfig`), [`RELAY_BATCH_SIZE`], [`RELAY_IDLE_POLL`],
    /// [`RELAY_LEADER_RETRY`].
    pub fn from_env() -> Result<Self, ConfigError> {
        Ok(Self {
            kafka: KafkaConfig::from_env()?,
            batch_size: RELAY_BATCH_SIZE.read()?,
            idle_poll: RELAY_IDLE_POLL.read()?,
            leader_retry: RELAY_LEADER_RETRY.read()?,
        })
    }

    /// For tests: the relay of `kafka`, polling and trying for leadership every 200 ms
    /// instead of every second or two, so that a test sees a standby take over, or a relay
    /// woken by no append, within a few hundred milliseconds.
    pub fn for_tests(kafka: KafkaConfig) -> Self {
        Self {
            kafka,
            batch_size: RELAY_BATCH_SIZE.default,
            idle_poll: Duration::from_millis(200),
            leader_retry: Duration::from_millis(200),
        }
    }
}
