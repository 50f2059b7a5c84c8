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

pub const QUERY_API_TRANSFER_STALLED_AFTER: Setting<Duration> = Setting::new(
    "QUERY_API_TRANSFER_STALLED_AFTER_MS",
    Duration::from_secs(120),
    "a transfer not yet final whose last step is older than this is shown `stalled: true` (the process manager keeps retrying it; by default long enough for several of its sweeps to have tried it)",
);

pub const GRAPHQL_MAX_DEPTH: Setting<usize> = Setting::new(
    "GRAPHQL_MAX_DEPTH",
    16,
    "deepest GraphQL selection accepted (GraphiQL's introspection query needs 13); deeper documents are refused before they run",
);
pub const GRAPHQL_MAX_COMPLEXITY: Setting<usize> = Setting::new(
    "GRAPHQL_MAX_COMPLEXITY",
    1000,
    "largest GraphQL document cost accepted (each field 1, a list or connection field times its `first`)",
);
pub const GRAPHQL_INTROSPECTION: Setting<bool> = Setting::new(
    "GRAPHQL_INTROSPECTION",
    true,
    "whether `/graphql` answers introspection (`__schema`, `__type`) queries",
);
pub const GRAPHIQL: Setting<bool> = Setting::new(
    "GRAPHIQL",
    true,
    "whether `GET /graphql` serves the GraphiQL page",
);
pub const GRAPHQL_SUBSCRIPTIONS_PER_CONNECTION: Setting<usize> = Setting::new(
    "GRAPHQL_SUBSCRIPTIONS_PER_CONNECTION",
    16,
    "most subscriptions one WebSocket connection may hold at once",
);
pub const GRAPHQL_CONNECTIONS_PER_TENANT: Setting<usize> = Setting::new(
    "GRAPHQL_CONNECTIONS_PER_TENANT",
    2000,
    "most WebSocket connections one tenant may hold at once on one query API",
);
pub const GRAPHQL_SUBSCRIBER_BUFFER: Setting<usize> = Setting::new(
    "GRAPHQL_SUBSCRIBER_BUFFER",
    1024,
    "read-model changes an `accountsChanged` subscriber may fall behind before it is disconnected (close code 4008)",
);

/// The variables the query API reads, beyond [`service_kit::config::SETTINGS`].
pub const SETTINGS: Settings = &[
    &QUERY_API_ADDR,
    &QUERY_API_OPS_ADDR,
    &QUERY_API_MAX_WAIT,
    &QUERY_API_TRANSFER_STALLED_AFTER,
    &GRAPHQL_MAX_DEPTH,
    &GRAPHQL_MAX_COMPLEXITY,
    &GRAPHQL_INTROSPECTION,
    &GRAPHIQL,
    &GRAPHQL_SUBSCRIPTIONS_PER_CONNECTION,
    &GRAPHQL_CONNECTIONS_PER_TENANT,
    &GRAPHQL_SUBSCRIBER_BUFFER,
];

/// The `/graphql` endpoint's limits and switches.
#[derive(Debug, Clone)]
pub struct GraphqlConfig {
    /// [`GRAPHQL_MAX_DEPTH`].
    pub max_depth: usize,
    /// [`GRAPHQL_MAX_COMPLEXITY`].
    pub max_complexity: usize,
    /// [`GRAPHQL_INTROSPECTION`].
    pub introspection: bool,
    /// [`GRAPHIQL`].
    pub graphiql: bool,
    /// [`GRAPHQL_SUBSCRIPTIONS_PER_CONNECTION`].
    pub subscriptions_per_connection: usize,
    /// [`GRAPHQL_CONNECTIONS_PER_TENANT`].
    pub connections_per_tenant: usize,
    /// [`GRAPHQL_SUBSCRIBER_BUFFER`]: the capacity of the in-process fan-out of every change
    /// to `accountsChanged`, which is how far each of its subscribers may lag.
    pub subscriber_buffer: usize,
}

impl GraphqlConfig {
    pub fn from_env() -> Result<Self, ConfigError> {
        Ok(Self {
            max_depth: GRAPHQL_MAX_DEPTH.read()?,
            max_complexity: GRAPHQL_MAX_COMPLEXITY.read()?,
            introspection: GRAPHQL_INTROSPECTION.read()?,
            graphiql: GRAPHIQL.read()?,
            subscriptions_per_connection: GRAPHQL_SUBSCRIPTIONS_PER_CONNECTION.read()?,
            connections_per_tenant: GRAPHQL_CONNECTIONS_PER_TENANT.read()?,
            subscriber_buffer: GRAPHQL_SUBSCRIBER_BUFFER.read()?,
        })
    }
}

impl Default for GraphqlConfig {
    fn default() -> Self {
        Self {
            max_depth: GRAPHQL_MAX_DEPTH.default,
            max_complexity: GRAPHQL_MAX_COMPLEXITY.default,
            introspection: GRAPHQL_INTROSPECTION.default,
            graphiql: GRAPHIQL.default,
            subscriptions_per_connection: GRAPHQL_SUBSCRIPTIONS_PER_CONNECTION.default,
            connections_per_tenant: GRAPHQL_CONNECTIONS_PER_TENANT.default,
            subscriber_buffer: GRAPHQL_SUBSCRIBER_BUFFER.default,
        }
    }
}

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
    /// [`QUERY_API_TRANSFER_STALLED_AFTER`]: how old a transfer's last step may be before the
    /// transfer is shown stalled.
    pub transfer_stalled_after: Duration,
    /// `CORS_ALLOWED_ORIGINS`: see `service_kit::http::cors_origins_from_env` (default: none).
    pub cors_origins: Vec<HeaderValue>,
    /// The bounds of the listener: see `service_kit::server`.
    pub server: ServerLimits,
    /// `/graphql`: see [`GraphqlConfig`].
    pub graphql: GraphqlConfig,
}

impl Config {
    pub fn from_env() -> Result<Self, ConfigError> {
        Ok(Self {
            listen: QUERY_API_ADDR.read()?,
            ops_listen: QUERY_API_OPS_ADDR.read()?,
            database: DatabaseConfig::from_env()?,
            auth: AuthConfig::from_env()?,
            max_wait: QUERY_API_MAX_WAIT.read()?,
            transfer_stalled_after: QUERY_API_TRANSFER_STALLED_AFTER.read()?,
            cors_origins: service_kit::http::cors_origins_from_env()?,
            server: ServerLimits::from_env()?,
            graphql: GraphqlConfig::from_env()?,
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
            transfer_stalled_after: QUERY_API_TRANSFER_STALLED_AFTER.default,
            cors_origins: Vec::new(),
            server: ServerLimits::default(),
            graphql: GraphqlConfig::default(),
        }
    }
}
