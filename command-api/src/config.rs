//! The command API's settings, read once at start-up.

use std::net::SocketAddr;

use axum::http::HeaderValue;
use std::num::NonZeroUsize;
use std::time::Duration;

use service_kit::auth::AuthConfig;
use service_kit::config::{self, ConfigError};
use service_kit::db::DatabaseConfig;
use service_kit::kafka::KafkaConfig;

use crate::relay::RelayConfig;

#[derive(Debug, Clone)]
pub struct Config {
    /// `COMMAND_API_ADDR`: where to listen (default `127.0.0.1:8080`; port 0 picks one).
    pub listen: SocketAddr,
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
    /// `COMMAND_API_RELAY` (`true` by default): run the Kafka relay in this process (one
    /// replica leads at a time). `false` when the relay runs as `command-api relay` elsewhere.
    pub relay: Option<RelayConfig>,
    /// `CORS_ALLOWED_ORIGINS`: see `service_kit::http::cors_origins_from_env` (default: none).
    pub cors_origins: Vec<HeaderValue>,
}

impl Config {
    pub fn from_env() -> Result<Self, ConfigError> {
        Ok(Self {
            listen: config::parsed_or(
                "COMMAND_API_ADDR",
                SocketAddr::from(([127, 0, 0, 1], 8080)),
            )?,
            database: DatabaseConfig::from_env()?,
            auth: AuthConfig::from_env()?,
            max_body_bytes: config::parsed_or("COMMAND_API_MAX_BODY_BYTES", 16 * 1024)?,
            aggregate_cache: config::parsed_or(
                "COMMAND_API_AGGREGATE_CACHE",
                NonZeroUsize::new(100_000).unwrap_or(NonZeroUsize::MIN),
            )?,
            conflict_retries: config::parsed_or("COMMAND_API_CONFLICT_RETRIES", 5)?,
            relay: if config::parsed_or("COMMAND_API_RELAY", true)? {
                Some(RelayConfig::from_env()?)
            } else {
                None
            },
            cors_origins: service_kit::http::cors_origins_from_env()?,
        })
    }
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
