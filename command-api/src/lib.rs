//! The command API: validates requests into `Account` commands and appends their events to the
//! event store.
//!
//! # Layout
//! - [`config`]: settings, read once from the environment.
//! - `api`: routes, request/response bodies, OpenAPI document.
//! - `extract`: extractors whose rejections are problem+json.
//! - `commands`: one command end to end (idempotency, If-Match, retries).
//! - `store`: loading and appending account streams; the per-account lock and state cache.
//! - `error`: the one error type and its mapping to problem+json.
//!
//! [`Application::build`] starts exactly what production starts; tests call it with port 0.

use std::future::Future;
use std::sync::Arc;

use axum::Router;
use axum::extract::{DefaultBodyLimit, FromRef};
use service_kit::auth::Authenticator;
use service_kit::config::ConfigError;
use service_kit::db::{self, DatabaseError};
use sqlx::PgPool;
use tokio::net::TcpListener;

mod api;
mod commands;
pub mod config;
mod error;
mod extract;
mod store;

pub use config::Config;

/// Shared by every request.
#[derive(Clone)]
pub(crate) struct AppState {
    /// Runs commands; holds the per-account state cache for the life of the process.
    commands: Arc<commands::CommandService>,
    /// Verifies bearer tokens.
    auth: Arc<Authenticator>,
    /// For the readiness probe.
    pool: PgPool,
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

/// A command API bound to its port, ready to serve.
pub struct Application {
    listener: TcpListener,
    router: Router,
}

impl Application {
    /// Connects to and migrates the database, binds the listener and assembles the routes.
    pub async fn build(config: Config) -> Result<Self, StartError> {
        let pool = db::connect(&config.database).await?;
        db::migrate(&pool).await?;
        let auth = Arc::new(Authenticator::new(&config.auth)?);
        let state = AppState {
            commands: Arc::new(commands::CommandService::new(
                pool.clone(),
                config.aggregate_cache,
                config.conflict_retries,
            )),
            auth,
            pool,
        };
        let router = service_kit::http::with_standard_layers(
            api::router(state).layer(DefaultBodyLimit::max(config.max_body_bytes)),
        );
        let listener =
            TcpListener::bind(config.listen)
                .await
                .map_err(|source| StartError::Bind {
                    addr: config.listen,
                    source,
                })?;
        Ok(Self { listener, router })
    }

    /// The bound port (useful when configured with port 0).
    pub fn port(&self) -> u16 {
        self.listener
            .local_addr()
            .map(|addr| addr.port())
            .unwrap_or_default()
    }

    /// Serves until `shutdown` resolves, then lets in-flight requests finish.
    pub async fn run_until_stopped(
        self,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> std::io::Result<()> {
        tracing::info!(addr = ?self.listener.local_addr().ok(), "command-api listening");
        axum::serve(self.listener, self.router)
            .with_graceful_shutdown(shutdown)
            .await
    }
}
