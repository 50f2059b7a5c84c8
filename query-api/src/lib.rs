//! The query API: serves the read models the projector maintains.
//!
//! # Layout
//! - [`config`]: settings, read once from the environment.
//! - `api`: routes, response bodies, OpenAPI document.
//! - `error`: the one error type and its mapping to problem+json.
//!
//! Every query is scoped to the caller's tenant. [`Application::build`] starts exactly what
//! production starts; tests call it with port 0.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::FromRef;
use service_kit::auth::Authenticator;
use service_kit::config::ConfigError;
use service_kit::db::{self, DatabaseError};
use sqlx::PgPool;
use tokio::net::TcpListener;

mod api;
pub mod config;
mod error;

pub use config::Config;

/// Shared by every request.
#[derive(Clone)]
pub(crate) struct AppState {
    pool: PgPool,
    /// Verifies bearer tokens.
    auth: Arc<Authenticator>,
    /// Longest wait for a `min_version`.
    max_wait: Duration,
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

/// A query API bound to its port, ready to serve.
pub struct Application {
    listener: TcpListener,
    router: Router,
}

impl Application {
    /// Connects to and migrates the database, binds the listener and assembles the routes.
    pub async fn build(config: Config) -> Result<Self, StartError> {
        let pool = db::connect(&config.database).await?;
        db::migrate(&pool).await?;
        let state = AppState {
            pool,
            auth: Arc::new(Authenticator::new(&config.auth)?),
            max_wait: config.max_wait,
        };
        let router = service_kit::http::with_standard_layers(api::router(state));
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
        tracing::info!(addr = ?self.listener.local_addr().ok(), "query-api listening");
        axum::serve(self.listener, self.router)
            .with_graceful_shutdown(shutdown)
            .await
    }
}
