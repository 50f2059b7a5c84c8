//! The query API's settings, read once at start-up.

use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::time::Duration;

use axum::http::HeaderValue;

use service_kit::auth::AuthConfig;
use service_kit::config::{ConfigError, Setting, Settings};
use service_kit::db::DatabaseConfig;
use service_kit::server::{ANY_LOCAL_PORT, ServerLimits};

pub const QUERY_API_ADDR: Setting<SocketAddr> = Setting::new(
    "QUERY_API_ADDR",
    SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::LOCALHOST, 8081)),
    "query API listen address",
);
pub const QUERY_API_OPS_ADDR: Setting<SocketAddr> = Setting::new(
    "QUERY_API_OPS_ADDR",
    SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::LOCALHOST, 9081)),
    "the query API's ops server: `/metrics`, `/health/live`, `/health/ready` (never on the public port)",
);
pub const QUERY_API_MAX_WAIT: Setting<Duration> = Setting::new(
    "QUERY_API_MAX_WAIT_MS",
    Duration::from_secs(2),
    "longest wait for `min_version`",
);

/// The variables the query API reads, beyond [`service_kit::config::SETTINGS`].
pub const SETTINGS: Settings = &[&QUERY_API_ADDR, &QUERY_API_OPS_ADDR, &QUERY_API_MAX_WAIT];

#[derive(Debug, Clone)]
pub struct Config {
    /// [`QUERY_API_ADDR`]: where to listen (port 0 picks one).
    pub listen: SocketAddr,
    /// [`QUERY_API_OPS_ADDR`]: where the health probes and `/metrics` are served (port 0
    /// picks one), never on the public port.
    pub ops_listen: SocketAddr,
    pub database: DatabaseConfig,
    pub auth: AuthConfig,
    /// [`QUERY_API_MAX_WAIT`]: how long a query with `min_version` waits for the read model
    /// to catch up before answering 503.
    pub max_wait: Duration,
    /// `CORS_ALLOWED_ORIGINS`: see `service_kit::http::cors_origins_from_env` (default: none).
    pub cors_origins: Vec<HeaderValue>,
    /// The bounds of the listener: see `service_kit::server`.
    pub server: ServerLimits,
}

impl Config {
    pub fn from_env() -> Result<Self, ConfigError> {
        Ok(Self {
            listen: QUERY_API_ADDR.read()?,
            ops_listen: QUERY_API_OPS_ADDR.read()?,
            database: DatabaseConfig::from_env()?,
            auth: AuthConfig::from_env()?,
            max_wait: QUERY_API_MAX_WAIT.read()?,
            cors_origins: service_kit::http::cors_origins_from_env()?,
            server: ServerLimits::from_env()?,
        })
    }

    /// For tests: `database` and `auth`, both listeners on free ports, and every other
    /// setting at its default.
    pub fn for_tests(database: DatabaseConfig, auth: AuthConfig) -> Self {
        Self {
            listen: ANY_LOCAL_PORT,
            ops_listen: ANY_LOCAL_PORT,
            database,
            auth,
            max_wait: QUERY_API_MAX_WAIT.default,
            cors_origins: Vec::new(),
            server: ServerLimits::default(),
        }
    }
}
