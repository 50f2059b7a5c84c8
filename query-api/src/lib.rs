//! The query API: serves the read models the projector maintains.
//!
//! # Layout
//! - [`config`]: settings, read once from the environment.
//! - `api`: routes, response bodies, OpenAPI document.
//! - `contract`: the AsyncAPI document and JSON Schemas of the Kafka topics, for analysts.
//! - `transfers`: transfers and an account's transfers.
//! - `audit`: the auditors' routes, which read the event store itself, never a read model.
//! - `graphql`: `/graphql`, the same reads as GraphQL queries, and live subscriptions.
//! - `error`: the one error type and its mapping to problem+json (and GraphQL errors).
//! - `versions`: the accounts' current versions as the projector's notifications tell them,
//!   and the accounts as read at them.
//!
//! Every query is scoped to the caller's tenant. [`Application::build`] starts exactly what
//! production starts; tests call it with port 0.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::FromRef;
use config::GraphqlConfig;
use service_kit::auth::Authenticator;
use service_kit::config::ConfigError;
use service_kit::db::channels::ReadModelChange;
use service_kit::db::kept::KeptConnections;
use service_kit::db::{self, DatabaseError};
use service_kit::http::{self, OpsServer, Readiness};
use service_kit::server::{self, ServerLimits, Stopping};
use sqlx::PgPool;
use tokio::net::TcpListener;

mod api;
mod audit;
pub mod config;
mod contract;
mod error;
mod graphql;
mod transfers;
mod versions;

pub use api::WAIT_POLL;
pub use config::Config;
pub use versions::FRESH_FOR;

/// Shared by every request.
#[derive(Clone)]
pub(crate) struct AppState {
    pool: PgPool,
    /// Some of `pool`'s connections, kept for the one-statement account reads (`db::kept`).
    account_reads: KeptConnections,
    /// Verifies bearer tokens.
    auth: Arc<Authenticator>,
    /// Longest wait for a `min_version`.
    max_wait: Duration,
    /// How old a transfer's last step may be before the transfer is shown stalled.
    transfer_stalled_after: Duration,
    /// Held by every copy of the state: the projections' listener stops with the last.
    _listening: tokio::sync::watch::Receiver<()>,
    /// Every committed read-model change, for `min_version` waiters and the subscriptions.
    /// Bounded: a subscriber that falls `graphql.subscriber_buffer` changes behind is dropped,
    /// nobody waits for it.
    changes: Arc<graphql::Changes>,
    /// The accounts' versions as notified, to answer `If-None-Match` without a read, and
    /// the accounts as read at those versions, to answer the next read from memory.
    known: Arc<KnownAccounts>,
    /// `/graphql`'s limits and switches.
    graphql: GraphqlConfig,
    /// The WebSocket connections each tenant holds, against `graphql.connections_per_tenant`.
    tenant_connections: Arc<graphql::TenantConnections>,
}

/// The accounts' versions as notified, with the accounts as read at them.
pub(crate) type KnownAccounts = versions::KnownVersions<api::AccountView>;

impl AppState {
    /// A transaction that can see `tenant`'s rows only (row-level security), for every read.
    pub(crate) async fn scope(
        &self,
        tenant: &str,
    ) -> Result<sqlx::Transaction<'static, sqlx::Postgres>, sqlx::Error> {
        db::tenant_scope(&self.pool, tenant).await
    }
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
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: std::net::SocketAddr,
        source: std::io::Error,
    },
}

/// Turns the projector's notifications into changes for `min_version` waiters and the
/// subscriptions, and into known versions, until the state holding `lifetime`'s receivers is
/// gone. One connection for the whole process, however many waiters and subscribers.
/// Reconnects after a failure; waiters also poll slowly, so a gap only costs latency (a
/// subscriber gets the change with the next one of its account), and the known versions are
/// forgotten, since the gap's changes are not in them.
async fn watch_projections(
    pool: PgPool,
    lifetime: tokio::sync::watch::Sender<()>,
    changes: Arc<graphql::Changes>,
    known: Arc<KnownAccounts>,
) {
    while !lifetime.is_closed() {
        let listening = async {
            let mut listener = sqlx::postgres::PgListener::connect_with(&pool).await?;
            listener.listen(db::channels::READ_MODELS_CHANGED).await?;
            known.listening();
            // A lost connection ends this listener (`None`), and the known versions are
            // forgotten before a new one listens: what was notified in between is lost.
            listener.eager_reconnect(false);
            while let Some(notification) = listener.try_recv().await? {
                match serde_json::from_str::<ReadModelChange>(notification.payload()) {
                    Ok(change) => {
                        // Entered before it is published: a `min_version` waiter that found
                        // the version short subscribed first, so it hears the change.
                        known.record(&change);
                        changes.publish(change);
                    }
                    Err(err) => tracing::warn!(error = %err, "unreadable read-model notification"),
                }
            }
            Ok(())
        };
        let result: Result<(), sqlx::Error> = tokio::select! {
            result = listening => result,
            () = lifetime.closed() => return,
        };
        known.deaf();
        match result {
            Ok(()) => tracing::warn!("listening for projections lost its connection; retrying"),
            Err(err) => tracing::warn!(error = %err, "listening for projections failed; retrying"),
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

/// A query API bound to its port, ready to serve.
pub struct Application {
    listener: TcpListener,
    router: Router,
    limits: ServerLimits,
    ops: OpsServer,
    /// Kept fresh in the background while serving.
    auth: Arc<Authenticator>,
}

impl Application {
    /// Connects to and migrates the database, binds the listener and assembles the routes.
    pub async fn build(config: Config) -> Result<Self, StartError> {
        // A `min_version` wait the request timeout cuts short would answer 503 `timeout`
        // instead of the documented `not-yet-visible`.
        if config.max_wait >= config.server.request_timeout {
            return Err(StartError::Config(ConfigError::Invalid {
                name: "QUERY_API_MAX_WAIT_MS",
                reason: "must be below HTTP_REQUEST_TIMEOUT_MS".into(),
            }));
        }
        let pool = db::connect(&config.database).await?;
        db::migrate(&pool).await?;
        let (lifetime, listening) = tokio::sync::watch::channel(());
        let changes = Arc::new(graphql::Changes::new(config.graphql.subscriber_buffer));
        let known = Arc::new(versions::KnownVersions::new(
            versions::CAPACITY,
            versions::FRESH_FOR,
        ));
        tokio::spawn(watch_projections(
            pool.clone(),
            lifetime,
            changes.clone(),
            known.clone(),
        ));
        let auth = Arc::new(Authenticator::new(&config.auth)?);
        // As many as `KeptConnections` keeps: half the pool, so that transactions (lists,
        // transfers, GraphQL) always find the rest.
        let account_reads =
            api::account_reads(pool.clone(), config.database.max_connections as usize);
        let ops = OpsServer::bind(
            config.ops_listen,
            Readiness::new(pool.clone())
                .with_token_keys(auth.clone())
                .with_kept_connections(account_reads.clone()),
            "query-api",
            config.server,
        )
        .await
        .map_err(|source| StartError::Bind {
            addr: config.ops_listen,
            source,
        })?;
        let state = AppState {
            account_reads,
            pool,
            auth: auth.clone(),
            max_wait: config.max_wait,
            transfer_stalled_after: config.transfer_stalled_after,
            _listening: listening,
            changes,
            known,
            graphql: config.graphql,
            tenant_connections: Arc::default(),
        };
        let router = http::with_standard_layers(
            http::with_cors(api::router(state, &config.auth), config.cors_origins),
            &config.server,
        );
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
            auth,
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

    /// Serves until `shutdown` resolves, then lets in-flight requests finish.
    pub async fn run_until_stopped(self, shutdown: impl Future<Output = ()> + Send + 'static) {
        if let Ok(addr) = self.listener.local_addr() {
            tracing::info!(%addr, "query-api listening");
        }
        let stopping = Stopping::on(shutdown);
        let ops = tokio::spawn(self.ops.serve(stopping.wait()));
        let keys = tokio::spawn(self.auth.keep_keys_fresh(stopping.wait()));
        server::serve(self.listener, self.router, self.limits, stopping.wait()).await;
        let _ = tokio::join!(ops, keys);
    }
}
