//! What an aggregate keeps in memory, and what it leaves in its stream.
//!
//! A state is kept small, whatever the stream's length, so that loading it, caching it,
//! snapshotting it and cloning it for a decision stay cheap for years of history. Facts a
//! decision needs that would grow with the stream (the transfer steps an account ever took)
//! stay in the event store; the command engine looks up the ones the commands at hand need and
//! passes them in as the aggregate's cqrs-es `Services`.

use cqrs_es::Aggregate;

use crate::account::{Account, AccountEvent, RecordedSteps};
use crate::transfer::Transfer;

pub trait History: Aggregate<Services: Default + Clone> {
    /// The shape of the state as a snapshot stores it (its serde form). Bump it with any change
    /// to that form: a snapshot of another shape is ignored and the stream folded from its
    /// first event, so changing an aggregate never misreads an old snapshot.
    const STATE_VERSION: u32;

    /// Adds to `services` what `event` records, so that decisions made after it, before it is
    /// stored, see it.
    fn remember(services: &mut Self::Services, event: &Self::Event);
}

impl History for Account {
    const STATE_VERSION: u32 = 1;

    fn remember(recorded: &mut RecordedSteps, event: &AccountEvent) {
        recorded.record(event);
    }
}

impl History for Transfer {
    const STATE_VERSION: u32 = 1;

    fn remember(_: &mut (), _: &crate::TransferEvent) {}
}

#[cfg(test)]
mod tests {
    use serde::Serialize;

    use super::*;
    use crate::money::{Amount, Currency, OverdraftLimit, Owner, Reference};
    use crate::{TransferCommand, TransferTerms};

    /// Pins each state's snapshot form to its `STATE_VERSION`: when this fails, the form
    /// changed, so bump the version and update the expected JSON here.
    #[test]
    fn a_change_to_a_states_snapshot_form_comes_with_a_new_state_version() {
        fn form<A: History + Serialize>(state: &A) -> (u32, serde_json::Value) {
            (A::STATE_VERSION, serde_json::to_value(state).unwrap())
        }
        let eur = Currency::parse("EUR").unwrap();
        let mut account = Account::default();
        account.apply(AccountEvent::AccountOpened {
            tenant: "acme".into(),
            owner: Owner::parse("Ada").unwrap(),
            currency: eur,
            overdraft_limit: OverdraftLimit::default(),
            max_balance: 100,
        });
        assert_eq!(
            form(&account),
            (
                1,
                serde_json::json!({"opened": {
                    "tenant": "acme", "owner": "Ada", "currency": "EUR", "overdraft_limit": 0,
                    "max_balance": 100, "balance": 0, "status": "active"
                }})
            )
        );
        let mut transfer = Transfer::default();
        let terms = TransferTerms {
            tenant: "acme".into(),
            from: uuid::Uuid::from_u128(1),
            to: uuid::Uuid::from_u128(2),
            amount: Amount::parse(5).unwrap(),
            currency: eur,
            reference: Reference::parse("rent").unwrap(),
        };
        for event in transfer.decide(TransferCommand::Request(terms)).unwrap() {
            transfer.apply(event);
        }
        assert_eq!(
            form(&transfer),
            (
                1,
                serde_json::json!({"requested": {
                    "terms": {
                        "tenant": "acme",
                        "from": "00000000-0000-0000-0000-000000000001",
                        "to": "00000000-0000-0000-0000-000000000002",
                        "amount": 5, "currency": "EUR", "reference": "rent"
                    },
                    "status": "requested", "reason": null
                }})
            )
        );
    }
}
