//! The ledger's business rules, free of IO.
//!
//! # Layout
//! - [`money`]: validated value types (currency, amount, owner) so that an invalid value cannot
//!   reach an aggregate.
//! - [`account`]: the `Account` aggregate: its commands, events, errors and rules, including
//!   the steps transfers take on it.
//! - [`transfer`]: the `Transfer` aggregate: the outcomes of a transfer's steps, in order.
//! - [`versions`]: reading events stored at older versions (upcasting).
//! - [`history`]: what an aggregate's state keeps and what it leaves in its stream (the
//!   snapshot form's version, the facts looked up for a decision).
//! - [`contract`]: the JSON Schema of every event type and version, for analysts.
//!
//! Every rule lives here and is tested with cqrs-es's given/when/then `TestFramework`, and the
//! properties the design leans on (money conserved, balances within their limits, dense
//! versions, refusals without effect) are checked over arbitrary command sequences in
//! `properties`; the services only translate HTTP and storage into these types.

pub mod account;
pub mod contract;
pub mod history;
pub mod money;
pub mod transfer;
pub mod versions;

#[cfg(test)]
mod properties;

pub use account::{
    Account, AccountCommand, AccountError, AccountEvent, AccountOpenedV1, AccountStatus,
    RecordedSteps, StepOutcome, TransferDecline, TransferStep,
};
pub use history::History;
pub use money::{Amount, Currency, OverdraftLimit, Owner, Reference, ValueError};
pub use transfer::{
    NextStep, Transfer, TransferCommand, TransferError, TransferEvent, TransferStatus,
    TransferTerms,
};
pub use versions::{ReadError, StoredEvent, read_stored};
