use cqrs_es::test::{AggregateTestExecutor, TestFramework};

use super::*;
use crate::money::{MAX_AMOUNT, MAX_BALANCE};

type AccountTest = TestFramework<Account>;

/// A test on an account whose stream holds `events`, with the transfer steps among them
/// recorded, as the command engine looks them up in the store.
fn given_stream(events: Vec<AccountEvent>) -> AggregateTestExecutor<Account> {
    let recorded = events.iter().collect();
    AccountTest::with(recorded).given(events)
}

const TENANT: &str = "acme";

fn eur() -> Currency {
    Currency::parse("EUR").unwrap()
}

fn usd() -> Currency {
    Currency::parse("USD").unwrap()
}

fn amount(minor_units: i64) -> Amount {
    Amount::parse(minor_units).unwrap()
}

fn opened(overdraft: i64) -> AccountEvent {
    AccountEvent::AccountOpened {
        tenant: TENANT.into(),
        owner: Owner::parse("Ada Lovelace").unwrap(),
        currency: eur(),
        overdraft_limit: OverdraftLimit::parse(overdraft).unwrap(),
        max_balance: MAX_BALANCE,
    }
}

fn deposited(minor_units: i64, balance_after: i64) -> AccountEvent {
    AccountEvent::MoneyDeposited {
        amount: amount(minor_units),
        currency: eur(),
        balance_after,
    }
}

fn open(tenant: &str) -> AccountCommand {
    AccountCommand::Open {
        tenant: tenant.into(),
        owner: Owner::parse("Ada Lovelace").unwrap(),
        currency: eur(),
        overdraft_limit: OverdraftLimit::default(),
    }
}

fn deposit(minor_units: i64) -> AccountCommand {
    AccountCommand::Deposit {
        tenant: TENANT.into(),
        amount: amount(minor_units),
        currency: eur(),
    }
}

fn withdraw(minor_units: i64) -> AccountCommand {
    AccountCommand::Withdraw {
        tenant: TENANT.into(),
        amount: amount(minor_units),
        currency: eur(),
    }
}

fn freeze() -> AccountCommand {
    AccountCommand::Freeze {
        tenant: TENANT.into(),
    }
}

fn unfreeze() -> AccountCommand {
    AccountCommand::Unfreeze {
        tenant: TENANT.into(),
    }
}

fn close() -> AccountCommand {
    AccountCommand::Close {
        tenant: TENANT.into(),
    }
}

fn every_command() -> Vec<AccountCommand> {
    vec![
        open(TENANT),
        deposit(10),
        withdraw(10),
        freeze(),
        unfreeze(),
        close(),
    ]
}

#[test]
fn open_a_new_account() {
    AccountTest::with(RecordedSteps::default())
        .given_no_previous_events()
        .when(open(TENANT))
        .then_expect_events(vec![opened(0)]);
}

#[test]
fn every_command_but_open_on_a_missing_account_is_not_found() {
    for command in every_command().into_iter().skip(1) {
        AccountTest::with(RecordedSteps::default())
            .given_no_previous_events()
            .when(command)
            .then_expect_error(AccountError::NotFound);
    }
}

#[test]
fn opening_twice_is_refused() {
    given_stream(vec![opened(0)])
        .when(open(TENANT))
        .then_expect_error(AccountError::AlreadyOpen);
}

#[test]
fn another_tenant_sees_no_account_whatever_the_command() {
    let commands = [
        open("globex"),
        AccountCommand::Deposit {
            tenant: "globex".into(),
            amount: amount(1),
            currency: eur(),
        },
        AccountCommand::Withdraw {
            tenant: "globex".into(),
            amount: amount(1),
            currency: eur(),
        },
        AccountCommand::Freeze {
            tenant: "globex".into(),
        },
        AccountCommand::Unfreeze {
            tenant: "globex".into(),
        },
        AccountCommand::Close {
            tenant: "globex".into(),
        },
    ];
    for command in commands {
        given_stream(vec![opened(0), deposited(50, 50)])
            .when(command)
            .then_expect_error(AccountError::NotFound);
    }
}

#[test]
fn deposit_adds_to_the_balance() {
    given_stream(vec![opened(0), deposited(100, 100)])
        .when(deposit(250))
        .then_expect_events(vec![deposited(250, 350)]);
}

#[test]
fn deposit_in_another_currency_is_refused() {
    given_stream(vec![opened(0)])
        .when(AccountCommand::Deposit {
            tenant: TENANT.into(),
            amount: amount(1),
            currency: usd(),
        })
        .then_expect_error(AccountError::CurrencyMismatch {
            account: eur(),
            requested: usd(),
        });
}

#[test]
fn deposit_beyond_the_maximum_balance_is_refused() {
    given_stream(vec![opened(0), deposited(MAX_AMOUNT, MAX_BALANCE)])
        .when(deposit(1))
        .then_expect_error(AccountError::BalanceLimitExceeded {
            max_balance: MAX_BALANCE,
        });
}

#[test]
fn an_account_keeps_the_balance_ceiling_it_was_opened_with() {
    let mut opened = opened(0);
    if let AccountEvent::AccountOpened { max_balance, .. } = &mut opened {
        *max_balance = 1000;
    }
    given_stream(vec![opened, deposited(600, 600)])
        .when(deposit(401))
        .then_expect_error(AccountError::BalanceLimitExceeded { max_balance: 1000 });
}

#[test]
fn withdraw_down_to_zero() {
    given_stream(vec![opened(0), deposited(100, 100)])
        .when(withdraw(100))
        .then_expect_events(vec![AccountEvent::MoneyWithdrawn {
            amount: amount(100),
            currency: eur(),
            balance_after: 0,
        }]);
}

#[test]
fn withdraw_into_the_overdraft_up_to_its_limit() {
    given_stream(vec![opened(50), deposited(100, 100)])
        .when(withdraw(150))
        .then_expect_events(vec![AccountEvent::MoneyWithdrawn {
            amount: amount(150),
            currency: eur(),
            balance_after: -50,
        }]);
}

#[test]
fn withdraw_beyond_the_overdraft_is_refused() {
    given_stream(vec![opened(50), deposited(100, 100)])
        .when(withdraw(151))
        .then_expect_error(AccountError::InsufficientFunds {
            available: 150,
            requested: 151,
        });
}

#[test]
fn withdraw_in_another_currency_is_refused() {
    given_stream(vec![opened(0), deposited(100, 100)])
        .when(AccountCommand::Withdraw {
            tenant: TENANT.into(),
            amount: amount(1),
            currency: usd(),
        })
        .then_expect_error(AccountError::CurrencyMismatch {
            account: eur(),
            requested: usd(),
        });
}

#[test]
fn freeze_and_unfreeze() {
    given_stream(vec![opened(0)])
        .when(freeze())
        .then_expect_events(vec![AccountEvent::AccountFrozen]);
    given_stream(vec![opened(0), AccountEvent::AccountFrozen])
        .when(unfreeze())
        .then_expect_events(vec![AccountEvent::AccountUnfrozen]);
}

#[test]
fn unfreezing_an_active_account_is_refused() {
    given_stream(vec![opened(0)])
        .when(unfreeze())
        .then_expect_error(AccountError::NotFrozen);
}

#[test]
fn nothing_but_unfreeze_works_on_a_frozen_account() {
    for command in [open(TENANT), deposit(1), withdraw(1), freeze(), close()] {
        let expected = match command {
            AccountCommand::Open { .. } => AccountError::AlreadyOpen,
            _ => AccountError::Frozen,
        };
        given_stream(vec![opened(0), AccountEvent::AccountFrozen])
            .when(command)
            .then_expect_error(expected);
    }
}

#[test]
fn frozen_then_unfrozen_account_moves_money_again() {
    given_stream(vec![
        opened(0),
        AccountEvent::AccountFrozen,
        AccountEvent::AccountUnfrozen,
    ])
    .when(deposit(5))
    .then_expect_events(vec![deposited(5, 5)]);
}

#[test]
fn close_at_zero_balance() {
    given_stream(vec![opened(0)])
        .when(close())
        .then_expect_events(vec![AccountEvent::AccountClosed]);
}

#[test]
fn close_with_money_or_debt_is_refused() {
    given_stream(vec![opened(0), deposited(10, 10)])
        .when(close())
        .then_expect_error(AccountError::NonZeroBalance { balance: 10 });
    given_stream(vec![
        opened(20),
        AccountEvent::MoneyWithdrawn {
            amount: amount(20),
            currency: eur(),
            balance_after: -20,
        },
    ])
    .when(close())
    .then_expect_error(AccountError::NonZeroBalance { balance: -20 });
}

#[test]
fn nothing_works_on_a_closed_account() {
    for command in every_command() {
        let expected = match command {
            AccountCommand::Open { .. } => AccountError::AlreadyOpen,
            _ => AccountError::Closed,
        };
        given_stream(vec![opened(0), AccountEvent::AccountClosed])
            .when(command)
            .then_expect_error(expected);
    }
}

#[test]
fn folding_the_events_gives_the_state() {
    let mut account = Account::default();
    for event in [
        opened(30),
        deposited(100, 100),
        AccountEvent::MoneyWithdrawn {
            amount: amount(120),
            currency: eur(),
            balance_after: -20,
        },
        AccountEvent::AccountFrozen,
    ] {
        account.apply(event);
    }
    let state = account.state().unwrap();
    assert_eq!(state.balance, -20);
    assert_eq!(state.status, AccountStatus::Frozen);
    assert_eq!(state.overdraft_limit.minor_units(), 30);
}

#[test]
fn events_name_their_type_and_version() {
    let events = [
        (opened(0), "AccountOpened", "2"),
        (deposited(1, 1), "MoneyDeposited", "1"),
        (AccountEvent::AccountFrozen, "AccountFrozen", "1"),
        (AccountEvent::AccountUnfrozen, "AccountUnfrozen", "1"),
        (AccountEvent::AccountClosed, "AccountClosed", "1"),
    ];
    for (event, event_type, event_version) in events {
        assert_eq!(event.event_type(), event_type);
        assert_eq!(event.event_version(), event_version);
    }
}

mod transfer_steps {
    use super::*;

    const TRANSFER: Uuid = Uuid::from_u128(7);

    fn step(
        step: TransferStep,
        tenant: &str,
        minor_units: i64,
        currency: Currency,
    ) -> AccountCommand {
        AccountCommand::for_transfer_step(
            step,
            tenant.into(),
            TRANSFER,
            amount(minor_units),
            currency,
        )
    }

    fn debit(minor_units: i64) -> AccountCommand {
        step(TransferStep::Debit, TENANT, minor_units, eur())
    }

    fn credit(minor_units: i64) -> AccountCommand {
        step(TransferStep::Credit, TENANT, minor_units, eur())
    }

    fn refund(minor_units: i64) -> AccountCommand {
        step(TransferStep::Refund, TENANT, minor_units, eur())
    }

    fn debited(minor_units: i64, balance_after: i64) -> AccountEvent {
        AccountEvent::TransferDebited {
            transfer_id: TRANSFER,
            amount: amount(minor_units),
            currency: eur(),
            balance_after,
        }
    }

    fn debit_declined(reason: TransferDecline) -> AccountEvent {
        AccountEvent::TransferDebitDeclined {
            transfer_id: TRANSFER,
            reason,
        }
    }

    fn credit_declined(reason: TransferDecline) -> AccountEvent {
        AccountEvent::TransferCreditDeclined {
            transfer_id: TRANSFER,
            reason,
        }
    }

    fn recorded(step: TransferStep, outcome: StepOutcome) -> AccountError {
        AccountError::TransferStepRecorded {
            transfer_id: TRANSFER,
            step,
            outcome,
        }
    }

    #[test]
    fn a_debit_takes_the_money_down_to_the_overdraft() {
        given_stream(vec![opened(50), deposited(100, 100)])
            .when(debit(150))
            .then_expect_events(vec![debited(150, -50)]);
    }

    #[test]
    fn a_debit_the_account_cannot_pay_is_declined_and_recorded() {
        let cases = [
            (
                vec![opened(0), deposited(100, 100)],
                debit(101),
                TransferDecline::InsufficientFunds,
            ),
            (
                vec![opened(0), deposited(100, 100), AccountEvent::AccountFrozen],
                debit(1),
                TransferDecline::Frozen,
            ),
            (
                vec![opened(0), AccountEvent::AccountClosed],
                debit(1),
                TransferDecline::Closed,
            ),
            (
                vec![opened(0), deposited(100, 100)],
                step(TransferStep::Debit, TENANT, 1, usd()),
                TransferDecline::CurrencyMismatch,
            ),
        ];
        for (given, command, reason) in cases {
            given_stream(given)
                .when(command)
                .then_expect_events(vec![debit_declined(reason)]);
        }
    }

    #[test]
    fn a_step_happens_once_and_a_repeat_gets_the_first_answer() {
        given_stream(vec![opened(0), deposited(100, 100), debited(30, 70)])
            .when(debit(30))
            .then_expect_error(recorded(TransferStep::Debit, StepOutcome::Applied));
        // Even once the account could pay, a declined debit stays declined.
        given_stream(vec![
            opened(0),
            debit_declined(TransferDecline::InsufficientFunds),
            deposited(100, 100),
        ])
        .when(debit(30))
        .then_expect_error(recorded(
            TransferStep::Debit,
            StepOutcome::Declined(TransferDecline::InsufficientFunds),
        ));
        given_stream(vec![opened(0), credit_declined(TransferDecline::Frozen)])
            .when(credit(5))
            .then_expect_error(recorded(
                TransferStep::Credit,
                StepOutcome::Declined(TransferDecline::Frozen),
            ));
    }

    #[test]
    fn a_credit_pays_in_unless_the_account_cannot_take_it() {
        given_stream(vec![opened(0), deposited(100, 100)])
            .when(credit(40))
            .then_expect_events(vec![AccountEvent::TransferCredited {
                transfer_id: TRANSFER,
                amount: amount(40),
                currency: eur(),
                balance_after: 140,
            }]);
        let cases = [
            (
                vec![opened(0), AccountEvent::AccountFrozen],
                credit(1),
                TransferDecline::Frozen,
            ),
            (
                vec![opened(0), AccountEvent::AccountClosed],
                credit(1),
                TransferDecline::Closed,
            ),
            (
                vec![opened(0)],
                step(TransferStep::Credit, TENANT, 1, usd()),
                TransferDecline::CurrencyMismatch,
            ),
            (
                vec![opened(0), deposited(MAX_AMOUNT, MAX_BALANCE)],
                credit(1),
                TransferDecline::BalanceLimitExceeded,
            ),
        ];
        for (given, command, reason) in cases {
            given_stream(given)
                .when(command)
                .then_expect_events(vec![credit_declined(reason)]);
        }
    }

    #[test]
    fn a_refund_returns_a_debit_even_to_a_frozen_or_closed_account() {
        for later in [
            vec![],
            vec![AccountEvent::AccountFrozen],
            vec![AccountEvent::AccountClosed],
        ] {
            let mut given = vec![opened(0), deposited(30, 30), debited(30, 0)];
            given.extend(later);
            given_stream(given)
                .when(refund(30))
                .then_expect_events(vec![AccountEvent::TransferRefunded {
                    transfer_id: TRANSFER,
                    amount: amount(30),
                    currency: eur(),
                    balance_after: 30,
                }]);
        }
    }

    /// A refund is never refused, so it can take the balance above the ceiling: the ceiling
    /// bounds what comes in (deposits, transfer credits), not money coming back. Further
    /// inflows are refused until the balance is below the ceiling again.
    #[test]
    fn a_refund_may_exceed_the_balance_ceiling_and_inflows_wait_until_below_it() {
        let mut capped = opened(0);
        if let AccountEvent::AccountOpened { max_balance, .. } = &mut capped {
            *max_balance = 1000;
        }
        let given = vec![
            capped,
            deposited(600, 600),
            debited(500, 100),
            deposited(900, 1000),
        ];
        given_stream(given.clone())
            .when(refund(500))
            .then_expect_events(vec![AccountEvent::TransferRefunded {
                transfer_id: TRANSFER,
                amount: amount(500),
                currency: eur(),
                balance_after: 1500,
            }]);
        let mut refunded = given;
        refunded.push(AccountEvent::TransferRefunded {
            transfer_id: TRANSFER,
            amount: amount(500),
            currency: eur(),
            balance_after: 1500,
        });
        given_stream(refunded)
            .when(deposit(1))
            .then_expect_error(AccountError::BalanceLimitExceeded { max_balance: 1000 });
    }

    /// Emptied and closed while its transfer was in flight, the account takes the refund;
    /// the money is then paid out, never stranded, and nothing else moves the account.
    #[test]
    fn a_refund_into_a_closed_account_can_be_paid_out_and_nothing_more() {
        let refunded = vec![
            opened(0),
            deposited(30, 30),
            debited(30, 0),
            AccountEvent::AccountClosed,
            AccountEvent::TransferRefunded {
                transfer_id: TRANSFER,
                amount: amount(30),
                currency: eur(),
                balance_after: 30,
            },
        ];
        given_stream(refunded.clone())
            .when(withdraw(30))
            .then_expect_events(vec![AccountEvent::MoneyWithdrawn {
                amount: amount(30),
                currency: eur(),
                balance_after: 0,
            }]);
        for command in [withdraw(31), deposit(1)] {
            given_stream(refunded.clone())
                .when(command)
                .then_expect_error(AccountError::Closed);
        }
        let mut given = refunded;
        given.push(AccountEvent::MoneyWithdrawn {
            amount: amount(30),
            currency: eur(),
            balance_after: 0,
        });
        given_stream(given)
            .when(withdraw(1))
            .then_expect_error(AccountError::Closed);
    }

    #[test]
    fn only_an_applied_debit_is_refunded_and_only_once() {
        for given in [
            vec![opened(0)],
            vec![
                opened(0),
                debit_declined(TransferDecline::InsufficientFunds),
            ],
        ] {
            given_stream(given)
                .when(refund(30))
                .then_expect_error(AccountError::NothingToRefund {
                    transfer_id: TRANSFER,
                });
        }
        given_stream(vec![
            opened(0),
            deposited(30, 30),
            debited(30, 0),
            AccountEvent::TransferRefunded {
                transfer_id: TRANSFER,
                amount: amount(30),
                currency: eur(),
                balance_after: 30,
            },
        ])
        .when(refund(30))
        .then_expect_error(recorded(TransferStep::Refund, StepOutcome::Applied));
    }

    #[test]
    fn another_tenant_or_a_missing_account_takes_no_step() {
        for kind in [
            TransferStep::Debit,
            TransferStep::Credit,
            TransferStep::Refund,
        ] {
            given_stream(vec![opened(0), deposited(50, 50)])
                .when(step(kind, "globex", 1, eur()))
                .then_expect_error(AccountError::NotFound);
            AccountTest::with(RecordedSteps::default())
                .given_no_previous_events()
                .when(step(kind, TENANT, 1, eur()))
                .then_expect_error(AccountError::NotFound);
        }
    }

    #[test]
    fn folding_records_balances_and_the_steps_are_recorded_from_the_events() {
        let events = [opened(0), deposited(100, 100), debited(60, 40)];
        let mut account = Account::default();
        for event in events.clone() {
            account.apply(event);
        }
        assert_eq!(account.state().unwrap().balance, 40);
        let recorded: RecordedSteps = events.iter().collect();
        assert_eq!(
            recorded.outcome(TRANSFER, TransferStep::Debit),
            Some(StepOutcome::Applied)
        );
        assert_eq!(recorded.outcome(TRANSFER, TransferStep::Credit), None);
    }
}
