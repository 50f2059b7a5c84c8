//! Plumbing every Ledger process needs, so that each service crate holds only its own logic.
//!
//! # Layout
//! - [`config`]: reading typed settings from the environment, with errors that name the variable.
//! - [`telemetry`]: `tracing` subscriber (human or JSON lines).
//! - [`problem`]: RFC 9457 `application/problem+json` responses.
//! - [`auth`]: JWT bearer authentication, claims and roles.
//! - [`http`]: request ids, request tracing, health probes, `/metrics`, graceful shutdown.
//! - [`server`]: serving a router with timeouts and bounds on connections and requests.
//! - [`metrics`]: the Prometheus recorder and the request metrics.
//! - [`db`]: the Postgres pool and the embedded migrations.
//! - [`event_log`]: reading the global event log in commit order, and readers' checkpoints.
//! - [`kafka`]: Kafka client settings, topic names, the CloudEvents envelope.
//! - [`hash_chain`]: the event log's per-stream hash chain, recomputed from stored rows.
//! - [`progress`]: a progress bar on stderr for long command-line jobs.
//! - [`rate_limit`]: per-tenant request budgets.
//! - `testing` (feature `test-support`): per-test databases cloned from a migrated template,
//!   per-test topics, test tokens, `eventually`.

pub mod auth;
pub mod config;
pub mod db;
pub mod event_log;
pub mod hash_chain;
pub mod http;
pub mod kafka;
pub mod metrics;
pub mod problem;
pub mod progress;
pub mod rate_limit;
pub mod server;
pub mod telemetry;
#[cfg(feature = "test-support")]
pub mod testing;
