//! Integration tests of the command API: real HTTP against a real Postgres, one fresh database
//! per test.

mod auth;
mod commands;
mod concurrency;
mod errors;
mod event_store;
mod helpers;
mod hostile;
mod idempotency;
mod oidc;
mod operations;
mod privileges;
mod secrets;
