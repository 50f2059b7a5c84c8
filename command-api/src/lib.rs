//! The command API: validates requests into `Account` and `Transfer` commands and appends their
//! events to the event store.
//!
//! # Layout
//! - [`config`]: settings, read once from the environment.
//! - `api`: routes, request/response bodies, OpenAPI document.
//! - `extract`: extractors whose rejections are problem+json.
//! - `error`: the HTTP edge's one error type and its mapping to problem+json.
//! - `engine`: runs commands against the event store; knows nothing of HTTP.
//! - `backlog`: whether new transfers are admitted, from the count of those in flight.
//! - [`relay`]: publishing the event log to Kafka, in commit order, from one leader.
//! - [`process`]: the transfer process manager (`command-api process-transfers`).
//!
//! Imports run from the HTTP edge (`api`, `extract`, `error`) and the two background
//! processes (`relay`, `process`) into `engine`, never back.
//!
//! [`Application::build`] starts exactly what production starts; tests call it with port 0.

use std::future::Future;
use std::sync::Arc;

use axum::Router;
use axum::extract::{DefaultBodyLimit, FromRef};
use service_kit::auth::Authenticator;
use service_kit::config::ConfigError;
use service_kit::db::{self, DatabaseError};
use service_kit::http::{self, Need, OpsServer, Readiness};
use service_kit::kafka::BrokerProbe;
use service_kit::server::{self, ServerLimits, Stopping};
use sqlx::PgPool;
use tokio::net::TcpListener;

mod api;
mod backlog;
pub mod config;
mod engine;
mod error;
mod extract;
pub mod process;
pub mod relay;
#[cfg(test)]
mod testing;

pub use config::Config;
pub use engine::AppendSignal;
use relay::Relay;

/// Shared by every request.
#[derive(Clone)]
pub(crate) struct AppState {
    /// Runs commands; holds the per-account state cache for the life of the process.
    commands: Arc<engine::CommandService>,
    /// Verifies bearer tokens.
    auth: Arc<Authenticator>,
    /// `QUERY_API_PUBLIC_URL`: where `Location` and `status_url` point.
    query_api_url: Arc<str>,
    /// Whether new transfers are admitted; kept counted while serving.
    transfer_backlog: Arc<backlog::TransferBacklog>,
}

impl FromRef<AppState> for Arc<Authenticator> {
    fn from_ref(state: &AppState) -> Self {
        state.auth.clone()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Database(#[from] DatabaseError),
    #[error("cannot create the Kafka producer: {0}")]
    Kafka(#[from] rdkafka::error::KafkaError),
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: std::net::SocketAddr,
        source: std::io::Error,
    },
}

/// The public routes with every layer they are served with: what [`Application::build`]
/// serves, and what the `oneshot` tests call without a socket.
fn router(state: AppState, config: &Config) -> Router {
    let max_body_bytes = config.max_body_bytes;
    http::with_standard_layers(
        http::with_cors(
            api::router(state, &config.auth)
                .layer(DefaultBodyLimit::max(max_body_bytes))
                .layer(axum::middleware::from_fn(move |request, next| {
                    extract::refuse_declared_oversize(max_body_bytes, request, next)
                })),
            config.cors_origins.clone(),
        ),
        &config.server,
    )
}

/// A command API bound to its port, ready to serve.
pub struct Application {
    listener: TcpListener,
    router: Router,
    limits: ServerLimits,
    ops: OpsServer,
    pool: PgPool,
    signal: AppendSignal,
    relay: Option<Relay>,
    /// Kept fresh in the background while serving.
    auth: Arc<Authenticator>,
    /// Kept counted in the background while serving, against `transfer_limits`.
    transfer_backlog: Arc<backlog::TransferBacklog>,
    transfer_limits: backlog::Limits,
}

impl Application {
    /// Connects to and migrates the database, binds the listener and assembles the routes.
    pub async fn build(config: Config) -> Result<Self, StartError> {
        let pool = db::connect(&config.database).await?;
        db::migrate(&pool).await?;
        let auth = Arc::new(Authenticator::new(&config.auth)?);
        let signal = AppendSignal::default();
        let commands = Arc::new(engine::CommandService::new(
            pool.clone(),
            &config.engine,
            signal.clone(),
        ));
        let mut readiness = Readiness::new(pool.clone())
            .with_token_keys(auth.clone())
            .with_kept_connections(commands.append_connections());
        if let Some(relay) = &config.relay {
            readiness = readiness.with_broker(BrokerProbe::new(&relay.kafka)?, Need::Reported);
        }
        let relay = config
            .relay
            .clone()
            .map(|relay| Relay::new(relay, pool.clone(), signal.clone()))
            .transpose()?;
        let transfer_backlog = Arc::new(backlog::TransferBacklog::default());
        let state = AppState {
            commands,
            auth: auth.clone(),
            query_api_url: config.query_api_url.clone().into(),
            transfer_backlog: transfer_backlog.clone(),
        };
        let router = router(state, &config);
        let ops = OpsServer::bind(config.ops_listen, readiness, "command-api", config.server)
            .await
            .map_err(|source| StartError::Bind {
                addr: config.ops_listen,
                source,
            })?;
        let listener =
            TcpListener::bind(config.listen)
                .await
                .map_err(|source| StartError::Bind {
                    addr: config.listen,
                    source,
                })?;
        Ok(Self {
            listener,
            router,
            limits: config.server,
            ops,
            pool,
            signal,
            relay,
            auth,
            transfer_backlog,
            transfer_limits: backlog::Limits {
                total: config.max_transfers_in_flight.get(),
                per_tenant: config.max_transfers_in_flight_per_tenant.get(),
            },
        })
    }

    /// The bound port (useful when configured with port 0).
    pub fn port(&self) -> u16 {
        self.listener
            .local_addr()
            .map(|addr| addr.port())
            .unwrap_or_default()
    }

    /// The port of the health probes and `/metrics`.
    pub fn ops_port(&self) -> u16 {
        self.ops.port()
    }

    /// Serves (and relays, if configured) until `shutdown` resolves, then lets in-flight
    /// requests finish and stops the background tasks.
    pub async fn run_until_stopped(self, shutdown: impl Future<Output = ()> + Send + 'static) {
        let stopping = Stopping::on(shutdown);
        let mut background = tokio::task::JoinSet::new();
        background.spawn(self.signal.forward(self.pool.clone(), stopping.wait()));
        background.spawn(self.ops.serve(stopping.wait()));
        background.spawn(self.auth.keep_keys_fresh(stopping.wait()));
        background.spawn(self.transfer_backlog.keep_counted(
            self.pool.clone(),
            self.transfer_limits,
            stopping.wait(),
        ));
        if let Some(relay) = self.relay {
            background.spawn(relay.run(stopping.wait()));
        }
        if let Ok(addr) = self.listener.local_addr() {
            tracing::info!(%addr, "command-api listening");
        }
        server::serve(self.listener, self.router, self.limits, stopping.wait()).await;
        background.join_all().await;
    }
}
