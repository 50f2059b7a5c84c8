//! Plumbing every Ledger process needs, so that each service crate holds only its own logic.
//!
//! # Layout
//! - [`config`]: reading typed settings from the environment, with errors that name the variable.
//! - [`db`]: the Postgres pool and the embedded migrations.
//! - [`event_log`]: reading the global event log in commit order, and readers' checkpoints.
//! - [`kafka`]: Kafka client settings, topic names, the CloudEvents envelope.
//! - [`hash_chain`]: the event log's per-stream hash chain, recomputed from stored rows.
//! - [`progress`]: a progress bar on stderr for long command-line jobs.
//! - [`retry`]: the one backoff policy of every retry loop.
//!
//! Feature `telemetry`:
//! - [`telemetry`]: `tracing` subscriber (human or JSON lines), OpenTelemetry trace export.
//!
//! Feature `http` (with `telemetry`), for the services that serve HTTP:
//! - [`problem`]: RFC 9457 `application/problem+json` responses, and the parts every OpenAPI
//!   document shares.
//! - [`auth`]: JWT bearer authentication, claims, roles, and the extractor that checks them.
//! - [`http`]: request ids, request tracing, health probes, `/metrics`, graceful shutdown, and
//!   the extractor of an id in the path.
//! - [`server`]: serving a router with timeouts and bounds on connections and requests.
//! - [`metrics`]: the Prometheus recorder and the request metrics.
//! - [`rate_limit`]: per-tenant request budgets.
//! - `dev_provider` (feature `dev-provider`): the development OpenID Connect provider of
//!   `deploy/oidc-dev`, for `cargo xtask up --oidc` and the tests.
//! - `testing` (feature `test-support`): per-test databases cloned from a migrated template,
//!   per-test topics, test tokens, `eventually`.
//! - `browser` (feature `browser`): a headless Chromium over WebDriver, for the tests of the
//!   pages people use.
//!
//! The workspace takes this crate without default features, so that each crate names the
//! parts it uses: `ledger-audit` builds without axum, utoipa or OpenTelemetry.

/// Secrets (the JWT secret, the database URL, Kafka properties): `secrecy` keeps them out of
/// `Debug` and logs, and wipes them from memory when dropped. Re-exported so that every crate
/// names them the same way.
pub use secrecy::{ExposeSecret, SecretString};

#[cfg(feature = "http")]
pub mod auth;
#[cfg(feature = "browser")]
pub mod browser;
pub mod config;
pub mod db;
#[cfg(feature = "dev-provider")]
pub mod dev_provider;
pub mod event_log;
pub mod hash_chain;
#[cfg(feature = "http")]
pub mod http;
pub mod kafka;
#[cfg(feature = "http")]
pub mod metrics;
#[cfg(feature = "http")]
pub mod problem;
pub mod progress;
#[cfg(feature = "http")]
pub mod rate_limit;
pub mod retry;
#[cfg(feature = "http")]
pub mod server;
#[cfg(feature = "telemetry")]
pub mod telemetry;
#[cfg(feature = "test-support")]
pub mod testing;
