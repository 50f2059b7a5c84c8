//! The query API's settings, read once at start-up.

use std::net::SocketAddr;
use std::time::Duration;

use axum::http::HeaderValue;

use service_kit::auth::AuthConfig;
use service_kit::config::{self, ConfigError, Setting};
use service_kit::db::DatabaseConfig;
use service_kit::server::ServerLimits;

#[derive(Debug, Clone)]
pub struct Config {
    /// `QUERY_API_ADDR`: where to listen (default `127.0.0.1:8081`; port 0 picks one).
    pub listen: SocketAddr,
    /// `QUERY_API_OPS_ADDR`: where the health probes and `/metrics` are served (default
    /// `127.0.0.1:9081`; port 0 picks one), never on the public port.
    pub ops_listen: SocketAddr,
    pub database: DatabaseConfig,
    pub auth: AuthConfig,
    /// `QUERY_API_MAX_WAIT_MS`: how long a query with `min_version` waits for the read model
    /// to catch up before answering 503 (default 2000).
    pub max_wait: Duration,
    /// `CORS_ALLOWED_ORIGINS`: see `service_kit::http::cors_origins_from_env` (default: none).
    pub cors_origins: Vec<HeaderValue>,
    /// The bounds of the listener: see `service_kit::server`.
    pub server: ServerLimits,
}

impl Config {
    pub fn from_env() -> Result<Self, ConfigError> {
        Ok(Self {
            listen: config::parsed_or("QUERY_API_ADDR", SocketAddr::from(([127, 0, 0, 1], 8081)))?,
            ops_listen: config::parsed_or(
                "QUERY_API_OPS_ADDR",
                SocketAddr::from(([127, 0, 0, 1], 9081)),
            )?,
            database: DatabaseConfig::from_env()?,
            auth: AuthConfig::from_env()?,
            max_wait: Duration::from_millis(config::parsed_or("QUERY_API_MAX_WAIT_MS", 2000)?),
            cors_origins: service_kit::http::cors_origins_from_env()?,
            server: ServerLimits::from_env()?,
        })
    }
}

/// The variables the query API reads, beyond [`service_kit::config::SETTINGS`].
pub const SETTINGS: &[Setting] = &[
    Setting {
        name: "QUERY_API_ADDR",
        default: "`127.0.0.1:8081`",
        meaning: "query API listen address",
    },
    Setting {
        name: "QUERY_API_OPS_ADDR",
        default: "`127.0.0.1:9081`",
        meaning: "the query API's ops server: `/metrics`, `/health/live`, `/health/ready` (never on the public port)",
    },
    Setting {
        name: "QUERY_API_MAX_WAIT_MS",
        default: "`2000`",
        meaning: "longest wait for `min_version`",
    },
];
