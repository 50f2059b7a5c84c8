//! The ledger's business rules, free of IO.
//!
//! # Layout
//! - [`money`]: validated value types (currency, amount, owner) so that an invalid value cannot
//!   reach an aggregate.
//! - [`account`]: the `Account` aggregate: its commands, events, errors and rules.
//!
//! Every rule lives here and is tested with cqrs-es's given/when/then `TestFramework`; the
//! services only translate HTTP and storage into these types.

pub mod account;
pub mod money;

pub use account::{Account, AccountCommand, AccountError, AccountEvent, AccountStatus};
pub use money::{Amount, Currency, OverdraftLimit, Owner, ValueError};
