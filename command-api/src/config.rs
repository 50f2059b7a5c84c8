//! The command API's settings, read once at start-up.

use std::net::SocketAddr;

use axum::http::HeaderValue;
use std::num::NonZeroUsize;
use std::time::Duration;

use service_kit::auth::AuthConfig;
use service_kit::config::{self, ConfigError, Setting};
use service_kit::db::DatabaseConfig;
use service_kit::kafka::KafkaConfig;
use service_kit::server::ServerLimits;

use crate::relay::RelayConfig;

#[derive(Debug, Clone)]
pub struct Config {
    /// `COMMAND_API_ADDR`: where to listen (default `127.0.0.1:8080`; port 0 picks one).
    pub listen: SocketAddr,
    /// `COMMAND_API_OPS_ADDR`: where the health probes and `/metrics` are served (default
    /// `127.0.0.1:9080`; port 0 picks one), never on the public port.
    pub ops_listen: SocketAddr,
    pub database: DatabaseConfig,
    pub auth: AuthConfig,
    /// `COMMAND_API_MAX_BODY_BYTES`: larger request bodies are answered 413 (default 16 KiB).
    pub max_body_bytes: usize,
    /// `COMMAND_API_AGGREGATE_CACHE`: accounts whose state is kept in memory between
    /// commands (default 100,000).
    pub aggregate_cache: NonZeroUsize,
    /// `COMMAND_API_CONFLICT_RETRIES`: how often a command without `If-Match` is retried
    /// after losing a race on its stream before answering 409 (default 5).
    pub conflict_retries: u32,
    /// `COMMAND_API_APPEND_WRITERS`: batches of appends in flight at once (default 2).
    pub append_writers: NonZeroUsize,
    /// `COMMAND_API_RELAY` (`true` by default): run the Kafka relay in this process (one
    /// replica leads at a time). `false` when the relay runs as `command-api relay` elsewhere.
    pub relay: Option<RelayConfig>,
    /// `CORS_ALLOWED_ORIGINS`: see `service_kit::http::cors_origins_from_env` (default: none).
    pub cors_origins: Vec<HeaderValue>,
    /// The bounds of the listener: see `service_kit::server`.
    pub server: ServerLimits,
    /// `QUERY_API_PUBLIC_URL` (default `http://127.0.0.1:8081`): the query API as clients
    /// reach it, without a trailing slash. `Location` (201) and `status_url` (202) point there,
    /// where the resources are.
    pub query_api_url: String,
}

impl Config {
    pub fn from_env() -> Result<Self, ConfigError> {
        Ok(Self {
            listen: config::parsed_or(
                "COMMAND_API_ADDR",
                SocketAddr::from(([127, 0, 0, 1], 8080)),
            )?,
            ops_listen: config::parsed_or(
                "COMMAND_API_OPS_ADDR",
                SocketAddr::from(([127, 0, 0, 1], 9080)),
            )?,
            database: DatabaseConfig::from_env()?,
            auth: AuthConfig::from_env()?,
            max_body_bytes: config::parsed_or("COMMAND_API_MAX_BODY_BYTES", 16 * 1024)?,
            aggregate_cache: aggregate_cache()?,
            conflict_retries: conflict_retries()?,
            append_writers: append_writers()?,
            relay: if config::parsed_or("COMMAND_API_RELAY", true)? {
                Some(RelayConfig::from_env()?)
            } else {
                None
            },
            cors_origins: service_kit::http::cors_origins_from_env()?,
            server: ServerLimits::from_env()?,
            query_api_url: query_api_url()?,
        })
    }
}

fn query_api_url() -> Result<String, ConfigError> {
    let url =
        config::optional("QUERY_API_PUBLIC_URL").unwrap_or_else(|| "http://127.0.0.1:8081".into());
    if !(url.starts_with("http://") || url.starts_with("https://")) {
        return Err(ConfigError::Invalid {
            name: "QUERY_API_PUBLIC_URL",
            reason: "must be an absolute http(s) URL".into(),
        });
    }
    Ok(url.trim_end_matches('/').to_owned())
}

/// `COMMAND_API_AGGREGATE_CACHE`; the process manager reads it too, as it runs commands.
pub(crate) fn aggregate_cache() -> Result<NonZeroUsize, ConfigError> {
    config::parsed_or(
        "COMMAND_API_AGGREGATE_CACHE",
        NonZeroUsize::new(100_000).unwrap_or(NonZeroUsize::MIN),
    )
}

/// `COMMAND_API_CONFLICT_RETRIES`, for the command API and the process manager.
pub(crate) fn conflict_retries() -> Result<u32, ConfigError> {
    config::parsed_or("COMMAND_API_CONFLICT_RETRIES", 5)
}

/// `COMMAND_API_APPEND_WRITERS`, for the command API and the process manager.
pub(crate) fn append_writers() -> Result<NonZeroUsize, ConfigError> {
    config::parsed_or(
        "COMMAND_API_APPEND_WRITERS",
        NonZeroUsize::new(2).unwrap_or(NonZeroUsize::MIN),
    )
}

impl RelayConfig {
    /// `KAFKA_*` (see `KafkaConfig`), `RELAY_BATCH_SIZE` (default 1000), `RELAY_IDLE_POLL_MS`
    /// (default 1000), `RELAY_LEADER_RETRY_MS` (default 2000).
    pub fn from_env() -> Result<Self, ConfigError> {
        Ok(Self {
            kafka: KafkaConfig::from_env()?,
            batch_size: config::parsed_or("RELAY_BATCH_SIZE", 1000)?,
            idle_poll: Duration::from_millis(config::parsed_or("RELAY_IDLE_POLL_MS", 1000)?),
            leader_retry: Duration::from_millis(config::parsed_or("RELAY_LEADER_RETRY_MS", 2000)?),
        })
    }
}

/// The variables the command API, its relay and the process manager read, beyond
/// [`service_kit::config::SETTINGS`].
pub const SETTINGS: &[Setting] = &[
    Setting {
        name: "COMMAND_API_ADDR",
        default: "`127.0.0.1:8080`",
        meaning: "listen address (port 0 picks one)",
    },
    Setting {
        name: "QUERY_API_PUBLIC_URL",
        default: "`http://127.0.0.1:8081`",
        meaning: "the query API as clients reach it: `Location` (201) and `status_url` (202) of the command API point there",
    },
    Setting {
        name: "COMMAND_API_OPS_ADDR",
        default: "`127.0.0.1:9080`",
        meaning: "the command API's ops server: `/metrics`, `/health/live`, `/health/ready` (never on the public port)",
    },
    Setting {
        name: "COMMAND_API_MAX_BODY_BYTES",
        default: "`16384`",
        meaning: "larger bodies get 413",
    },
    Setting {
        name: "COMMAND_API_AGGREGATE_CACHE",
        default: "`100000`",
        meaning: "accounts whose state stays in memory between commands",
    },
    Setting {
        name: "COMMAND_API_CONFLICT_RETRIES",
        default: "`5`",
        meaning: "retries after losing a race, without `If-Match`",
    },
    Setting {
        name: "COMMAND_API_APPEND_WRITERS",
        default: "`2`",
        meaning: "batches of appends in flight at once (each is one INSERT of every append queued when it starts)",
    },
    Setting {
        name: "COMMAND_API_RELAY",
        default: "`true`",
        meaning: "run the Kafka relay inside the command API",
    },
    Setting {
        name: "RELAY_BATCH_SIZE",
        default: "`1000`",
        meaning: "events per relay batch",
    },
    Setting {
        name: "RELAY_IDLE_POLL_MS",
        default: "`1000`",
        meaning: "fallback poll when nothing wakes the relay",
    },
    Setting {
        name: "RELAY_LEADER_RETRY_MS",
        default: "`2000`",
        meaning: "how often a standby relay tries to become leader",
    },
    Setting {
        name: "PROCESS_MANAGER_GROUP",
        default: "`ledger-process-manager`",
        meaning: "the transfer process manager's consumer group",
    },
    Setting {
        name: "PROCESS_MANAGER_ADDR",
        default: "`127.0.0.1:8083`",
        meaning: "the process manager's ops server: `/metrics`, `/health/live`, `/health/ready`",
    },
    Setting {
        name: "PROCESS_MANAGER_STUCK_AFTER_MS",
        default: "`30000`",
        meaning: "a transfer without progress this long is resumed from the event store (also how often that is looked for)",
    },
];
