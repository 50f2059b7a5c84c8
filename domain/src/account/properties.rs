//! Properties that hold for any sequence of commands, not just the cases the examples chose.

use cqrs_es::Aggregate;
use proptest::prelude::*;
use uuid::Uuid;

use super::*;
use crate::money::MAX_BALANCE;

const TENANT: &str = "acme";

fn eur() -> Currency {
    Currency::parse("EUR").unwrap()
}

/// Any command on the account, amounts across the whole range, now and then in another
/// currency or for another tenant, transfer steps for a handful of transfers.
fn command() -> impl Strategy<Value = AccountCommand> {
    let amount = prop_oneof![1i64..1_000, 1i64..=crate::money::MAX_AMOUNT]
        .prop_map(|a| Amount::parse(a).unwrap());
    let currency = prop_oneof![9 => Just(eur()), 1 => Just(Currency::parse("USD").unwrap())];
    let tenant = prop_oneof![19 => Just(TENANT.to_owned()), 1 => Just("globex".to_owned())];
    let transfer = (0u128..4).prop_map(Uuid::from_u128);
    let step = prop_oneof![
        Just(TransferStep::Debit),
        Just(TransferStep::Credit),
        Just(TransferStep::Refund)
    ];
    prop_oneof![
        4 => (tenant.clone(), amount.clone(), currency.clone())
            .prop_map(|(tenant, amount, currency)| AccountCommand::Deposit { tenant, amount, currency }),
        4 => (tenant.clone(), amount.clone(), currency.clone())
            .prop_map(|(tenant, amount, currency)| AccountCommand::Withdraw { tenant, amount, currency }),
        1 => tenant.clone().prop_map(|tenant| AccountCommand::Freeze { tenant }),
        1 => tenant.clone().prop_map(|tenant| AccountCommand::Unfreeze { tenant }),
        1 => tenant.clone().prop_map(|tenant| AccountCommand::Close { tenant }),
        4 => (step, tenant, transfer, amount, currency).prop_map(
            |(step, tenant, transfer, amount, currency)| {
                AccountCommand::for_transfer_step(step, tenant, transfer, amount, currency)
            }
        ),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn any_command_sequence_keeps_the_account_within_its_limits(
        overdraft in 0i64..10_000,
        commands in prop::collection::vec(command(), 0..80),
    ) {
        let mut account = Account::default();
        let mut events = Vec::new();
        let opened = account
            .decide(AccountCommand::Open {
                tenant: TENANT.into(),
                owner: Owner::parse("Ada").unwrap(),
                currency: eur(),
                overdraft_limit: OverdraftLimit::parse(overdraft).unwrap(),
            })
            .unwrap();
        account.apply(opened.clone());
        events.push(opened);
        for command in commands {
            if let Ok(event) = account.decide(command) {
                account.apply(event.clone());
                events.push(event);
            }
            let state = account.state().unwrap();
            prop_assert!(state.balance >= -overdraft, "balance {} below the limit", state.balance);
            prop_assert!(state.balance <= MAX_BALANCE);
            prop_assert_eq!(state.tenant.as_str(), TENANT);
        }
        // One event per accepted command, so versions are dense; and folding the events
        // anew gives the same account.
        let mut refolded = Account::default();
        for event in events {
            refolded.apply(event);
        }
        prop_assert_eq!(refolded, account);
    }
}
