//! What auditors need from the event store, without reading SQL: a stream's history with who
//! did what, an account's state as of any version or instant, proof that the history was not
//! rewritten, exports that can be re-verified offline, and balances replayed to any instant.
//! The query API's audit endpoints and the `ledger-audit` command line both use it.
//!
//! # Layout
//! - [`history`]: reading stored events of one stream, with their metadata.
//! - [`state`]: folding a stream's prefix into the account's state as of a version or instant.
//! - [`verify`]: recomputing hash chains over the store (one stream, a tenant, everything)
//!   or over an export.
//! - [`export`]: exports as JSON Lines or CSV, carrying every hashed field and both links.
//! - [`replay`]: every account's balance as of an instant.
//! - [`kafka_check`]: comparing the hashes carried on Kafka messages with the store, which
//!   catches a history rewritten in Postgres after it was published.
//!
//! Everything reads `events` directly (never a read model) and only reads.

pub mod export;
pub mod history;
pub mod kafka_check;
pub mod replay;
pub mod state;
pub mod verify;

/// The aggregate type of accounts in `events`.
pub const ACCOUNT: &str = "account";
/// The transfers' aggregate type, as stored and in topic names.
pub const TRANSFER: &str = "transfer";
