//! Properties of the ledger as a whole, for any sequence of commands, not just the cases the
//! examples chose.
//!
//! A handful of accounts of one tenant (in two currencies, with various overdrafts and balance
//! ceilings) take any mix of clients' commands, now and then for another tenant or in another
//! currency, and transfers between them are requested and driven step by step the way the
//! process manager drives them: it asks the account its transfer's `next_step` names, and
//! records the answer on the transfer, sometimes crashing in between, so that its next try
//! asks the account again and gets the recorded answer. Every command goes through
//! [`Aggregate::handle`], on a copy of the state, as the command API runs it.
//!
//! After every command:
//! - money is conserved, per currency: the balances plus what transfers have debited and not
//!   yet credited or refunded equal what was deposited minus what was withdrawn;
//! - nothing moves money on a frozen account but a refund, nor on a closed one but a refund
//!   or a withdrawal of at most its balance;
//! - no balance is below `-overdraft_limit`; a deposit or credit never leaves one above
//!   `max_balance`, and only refunds (which are never refused) may take one above it, by no
//!   more than they gave back; a closed account's balance is never negative;
//! - every money event's `balance_after` is the balance before it plus or minus its amount;
//! - a refused command writes no event and leaves its aggregate as it was;
//! - an accepted account command writes exactly one event, so each gets a version of its
//!   own and a stream's versions run 1..=n without gaps;
//! - the state `handle` leaves (what the command API keeps in its cache) is the state read
//!   back from the stream's events as stored (JSON, through the upcasters), from version 1;
//! - each step of a transfer happens at most once on an account, declines included.
//!
//! And once every transfer is driven to its end: none is in flight, and each account holds the
//! record its transfer's outcome says it should.

use std::collections::{HashMap, HashSet};

use cqrs_es::event_sink::EventSink;
use cqrs_es::{Aggregate, DomainEvent};
use proptest::prelude::*;
use proptest::test_runner::TestCaseError;
use uuid::Uuid;

use crate::account::{
    Account, AccountCommand, AccountError, AccountEvent, AccountStatus, StepOutcome,
    TransferDecline, TransferStep,
};
use crate::history::History;
use crate::money::{Amount, Currency, MAX_AMOUNT, MAX_BALANCE, OverdraftLimit, Owner, Reference};
use crate::transfer::{
    NextStep, Transfer, TransferCommand, TransferError, TransferStatus, TransferTerms,
};
use crate::versions::{StoredEvent, read_stored};

const TENANT: &str = "acme";

fn eur() -> Currency {
    Currency::parse("EUR").unwrap()
}

fn usd() -> Currency {
    Currency::parse("USD").unwrap()
}

/// One account as it is opened: its currency, overdraft and balance ceiling. The ceiling is
/// whatever the opening event recorded (accounts opened today get [`MAX_BALANCE`]); small ones
/// let a short sequence reach it.
#[derive(Debug, Clone)]
struct Opening {
    currency: Currency,
    overdraft: i64,
    max_balance: i64,
}

/// What happens next.
#[derive(Debug, Clone)]
enum Op {
    /// A client's command on the account at this index (modulo the number of accounts).
    Client(usize, AccountCommand),
    /// A client withdraws the whole (positive) balance of the account at this index and
    /// closes it: how an account is emptied to be closed, whatever it holds in flight.
    EmptyAndClose(usize),
    /// A client deposits exactly what takes the account at this index to its ceiling, so that
    /// the ceiling is met often.
    FillUp(usize),
    /// A client asks to move money between two accounts (indices modulo the number of accounts).
    Request {
        from: usize,
        to: usize,
        amount: Amount,
        currency: Currency,
    },
    /// The process manager takes the next step of the transfer at this index (modulo the
    /// number of transfers); `crash`: it dies after the account answered, before recording the
    /// answer on the transfer.
    Advance { transfer: usize, crash: bool },
}

fn amount() -> impl Strategy<Value = Amount> {
    prop_oneof![8 => 1i64..2_000, 1 => 1i64..=MAX_AMOUNT].prop_map(|a| Amount::parse(a).unwrap())
}

/// Mostly less than a few deposits bring in, so that many transfers go through.
fn transfer_amount() -> impl Strategy<Value = Amount> {
    prop_oneof![8 => 1i64..600, 1 => 1i64..=MAX_AMOUNT].prop_map(|a| Amount::parse(a).unwrap())
}

fn currency() -> impl Strategy<Value = Currency> {
    prop_oneof![5 => Just(eur()), 1 => Just(usd()), 1 => Just(Currency::parse("GBP").unwrap())]
}

fn opening() -> impl Strategy<Value = Opening> {
    (
        prop_oneof![3 => Just(eur()), 1 => Just(usd())],
        prop_oneof![Just(0i64), 0i64..3_000],
        prop_oneof![3 => 200i64..6_000, 1 => Just(MAX_BALANCE)],
    )
        .prop_map(|(currency, overdraft, max_balance)| Opening {
            currency,
            overdraft,
            max_balance,
        })
}

/// Any command a client can send to an existing account, mostly for its tenant.
fn client_command() -> impl Strategy<Value = AccountCommand> {
    let tenant = prop_oneof![19 => Just(TENANT.to_owned()), 1 => Just("globex".to_owned())];
    prop_oneof![
        6 => (tenant.clone(), amount(), currency()).prop_map(|(tenant, amount, currency)| {
            AccountCommand::Deposit { tenant, amount, currency }
        }),
        6 => (tenant.clone(), amount(), currency()).prop_map(|(tenant, amount, currency)| {
            AccountCommand::Withdraw { tenant, amount, currency }
        }),
        1 => tenant.clone().prop_map(|tenant| AccountCommand::Freeze { tenant }),
        1 => tenant.clone().prop_map(|tenant| AccountCommand::Unfreeze { tenant }),
        1 => tenant.clone().prop_map(|tenant| AccountCommand::Close { tenant }),
        1 => tenant.prop_map(|tenant| AccountCommand::Open {
            tenant,
            owner: Owner::parse("Eve").unwrap(),
            currency: eur(),
            overdraft_limit: OverdraftLimit::default(),
        }),
    ]
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        6 => (any::<usize>(), client_command()).prop_map(|(account, command)| Op::Client(account, command)),
        1 => any::<usize>().prop_map(Op::EmptyAndClose),
        1 => any::<usize>().prop_map(Op::FillUp),
        2 => (any::<usize>(), any::<usize>(), transfer_amount(), currency()).prop_map(
            |(from, to, amount, currency)| Op::Request { from, to, amount, currency }
        ),
        5 => (any::<usize>(), prop::bool::weighted(0.2))
            .prop_map(|(transfer, crash)| Op::Advance { transfer, crash }),
    ]
}

/// One aggregate's stream: its events, in order (the event at index `i` is version `i + 1`),
/// and the state the command API would cache.
struct Stream<A: History> {
    state: A,
    events: Vec<A::Event>,
    /// What the store would answer to the engine's look-up for any command: every recorded fact.
    recorded: A::Services,
}

impl<A: History> Default for Stream<A> {
    fn default() -> Self {
        Self {
            state: A::default(),
            events: Vec::new(),
            recorded: A::Services::default(),
        }
    }
}

impl<A> Stream<A>
where
    A: History + Clone + PartialEq,
    A::Event: StoredEvent,
{
    /// Runs `command` as the command API does: `handle` on a copy of the state, whose events
    /// are appended and which becomes the state if it succeeds. A refusal must leave no trace.
    fn handle(
        &mut self,
        command: A::Command,
    ) -> Result<Result<Vec<A::Event>, A::Error>, TestCaseError> {
        let mut next = self.state.clone();
        let sink = EventSink::default();
        let result = futures::executor::block_on(next.handle(command, &self.recorded, &sink));
        let events = futures::executor::block_on(sink.collect());
        match result {
            Err(error) => {
                prop_assert!(
                    events.is_empty(),
                    "refused ({error:?}) but wrote {events:?}"
                );
                prop_assert!(
                    next == self.state,
                    "refused ({error:?}) but changed the state"
                );
                Ok(Err(error))
            }
            Ok(()) => {
                for event in &events {
                    A::remember(&mut self.recorded, event);
                }
                self.events.extend(events.iter().cloned());
                self.state = next;
                self.reads_back()?;
                Ok(Ok(events))
            }
        }
    }

    /// The cached state is the stream read back from version 1, as the store reads it.
    fn reads_back(&self) -> Result<(), TestCaseError> {
        let mut read = A::default();
        for event in &self.events {
            let payload = serde_json::to_value(event).unwrap();
            let stored =
                read_stored::<A::Event>(&event.event_type(), &event.event_version(), payload)
                    .map_err(|err| {
                        TestCaseError::fail(format!("a written event does not read back: {err}"))
                    })?;
            read.apply(stored);
        }
        prop_assert!(
            read == self.state,
            "the cached state differs from the stream read back"
        );
        Ok(())
    }
}

/// The ledger under test, and the totals that no aggregate keeps.
struct Ledger {
    accounts: Vec<(Uuid, Stream<Account>)>,
    transfers: Vec<(Uuid, Stream<Transfer>)>,
    /// Per currency, minor units deposited and withdrawn (as the events say).
    deposited: HashMap<Currency, i128>,
    withdrawn: HashMap<Currency, i128>,
    /// Per account, minor units its refunds gave back.
    refunded: HashMap<Uuid, i64>,
    /// Transfers whose last step an account took but the crashed manager did not record.
    unrecorded: HashSet<Uuid>,
}

impl Ledger {
    fn open(openings: &[Opening]) -> Self {
        let accounts = openings
            .iter()
            .enumerate()
            .map(|(index, opening)| {
                let opened = AccountEvent::AccountOpened {
                    tenant: TENANT.into(),
                    owner: Owner::parse("Ada").unwrap(),
                    currency: opening.currency,
                    overdraft_limit: OverdraftLimit::parse(opening.overdraft).unwrap(),
                    max_balance: opening.max_balance,
                };
                let mut stream = Stream::<Account>::default();
                stream.state.apply(opened.clone());
                stream.events.push(opened);
                (Uuid::from_u128(index as u128 + 1), stream)
            })
            .collect();
        Self {
            accounts,
            transfers: Vec::new(),
            deposited: HashMap::new(),
            withdrawn: HashMap::new(),
            refunded: HashMap::new(),
            unrecorded: HashSet::new(),
        }
    }

    fn run(&mut self, op: Op) -> Result<(), TestCaseError> {
        match op {
            Op::Client(index, command) => {
                let index = index % self.accounts.len();
                let _refusal_is_fine = self.on_account(index, command)?;
            }
            Op::EmptyAndClose(index) => {
                let index = index % self.accounts.len();
                let account = self.accounts[index].1.state.state().unwrap();
                let tenant = TENANT.to_owned();
                if account.balance > 0 {
                    let withdraw = AccountCommand::Withdraw {
                        tenant: tenant.clone(),
                        amount: Amount::parse(account.balance.min(MAX_AMOUNT)).unwrap(),
                        currency: account.currency,
                    };
                    let _refusal_is_fine = self.on_account(index, withdraw)?;
                }
                let _refusal_is_fine = self.on_account(index, AccountCommand::Close { tenant })?;
            }
            Op::FillUp(index) => {
                let index = index % self.accounts.len();
                let account = self.accounts[index].1.state.state().unwrap();
                let headroom = account.max_balance.saturating_sub(account.balance);
                if let Ok(amount) = Amount::parse(headroom.min(MAX_AMOUNT)) {
                    let deposit = AccountCommand::Deposit {
                        tenant: TENANT.to_owned(),
                        amount,
                        currency: account.currency,
                    };
                    let _refusal_is_fine = self.on_account(index, deposit)?;
                }
            }
            Op::Request {
                from,
                to,
                amount,
                currency,
            } => {
                let terms = TransferTerms {
                    tenant: TENANT.into(),
                    from: self.accounts[from % self.accounts.len()].0,
                    to: self.accounts[to % self.accounts.len()].0,
                    amount,
                    currency,
                    reference: Reference::parse("rent").unwrap(),
                };
                let same = terms.from == terms.to;
                let mut transfer = Stream::<Transfer>::default();
                match transfer.handle(TransferCommand::Request(terms))? {
                    Ok(events) => {
                        prop_assert!(!same, "a transfer from an account to itself: {events:?}");
                        let id = Uuid::from_u128(1_000 + self.transfers.len() as u128);
                        self.transfers.push((id, transfer));
                    }
                    Err(error) => prop_assert!(
                        same && error == TransferError::SameAccount,
                        "request refused: {error:?}"
                    ),
                }
            }
            Op::Advance { transfer, crash } => {
                if !self.transfers.is_empty() {
                    self.advance(transfer % self.transfers.len(), crash)?;
                }
            }
        }
        self.check()
    }

    /// Runs a command on an account, checks what the events say about money, and counts it.
    fn on_account(
        &mut self,
        index: usize,
        command: AccountCommand,
    ) -> Result<Result<AccountEvent, AccountError>, TestCaseError> {
        let (id, stream) = &mut self.accounts[index];
        let before = stream.state.state().unwrap().clone();
        let version = stream.events.len();
        let events = match stream.handle(command)? {
            Ok(events) => events,
            Err(error) => return Ok(Err(error)),
        };
        prop_assert_eq!(events.len(), 1, "one event per accepted account command");
        prop_assert_eq!(stream.events.len(), version + 1);
        let event = events.into_iter().next().unwrap();
        let after = stream.state.state().unwrap();
        let currency = before.currency;
        let (delta, inflow) = match &event {
            AccountEvent::MoneyDeposited { amount, .. } => {
                *self.deposited.entry(currency).or_default() += i128::from(amount.minor_units());
                (amount.minor_units(), true)
            }
            AccountEvent::MoneyWithdrawn { amount, .. } => {
                *self.withdrawn.entry(currency).or_default() += i128::from(amount.minor_units());
                (-amount.minor_units(), false)
            }
            AccountEvent::TransferDebited { amount, .. } => (-amount.minor_units(), false),
            AccountEvent::TransferCredited { amount, .. } => (amount.minor_units(), true),
            AccountEvent::TransferRefunded { amount, .. } => {
                *self.refunded.entry(*id).or_default() += amount.minor_units();
                (amount.minor_units(), false)
            }
            _ => (0, false),
        };
        prop_assert_eq!(
            after.balance,
            before.balance + delta,
            "{:?} on a balance of {}",
            event,
            before.balance
        );
        // Nothing moves on a frozen account but a refund; a closed one also pays out.
        let may_move = match before.status {
            AccountStatus::Active => true,
            AccountStatus::Frozen => matches!(event, AccountEvent::TransferRefunded { .. }),
            AccountStatus::Closed => matches!(
                event,
                AccountEvent::TransferRefunded { .. } | AccountEvent::MoneyWithdrawn { .. }
            ),
        };
        prop_assert!(
            delta == 0 || may_move,
            "{:?} moved money on a {:?} account",
            event,
            before.status
        );
        if inflow {
            prop_assert!(
                after.balance <= after.max_balance,
                "{event:?} took the balance above the ceiling {}",
                after.max_balance
            );
        }
        Ok(Ok(event))
    }

    /// What the process manager does for one transfer: ask the account the next step names,
    /// then record its answer on the transfer (unless it crashes in between).
    fn advance(&mut self, index: usize, crash: bool) -> Result<(), TestCaseError> {
        let (id, transfer) = &self.transfers[index];
        let id = *id;
        let NextStep::Ask { account, step } = transfer.state.next_step() else {
            return Ok(());
        };
        let terms = transfer.state.state().unwrap().terms.clone();
        let account = self
            .accounts
            .iter()
            .position(|(account_id, _)| *account_id == account)
            .unwrap();
        let command = AccountCommand::for_transfer_step(
            step,
            terms.tenant.clone(),
            id,
            terms.amount,
            terms.currency,
        );
        let outcome = match self.on_account(account, command)? {
            Ok(event) => match event.transfer_step() {
                Some((recorded_for, recorded_step, outcome))
                    if recorded_for == id && recorded_step == step =>
                {
                    outcome
                }
                _ => return Err(TestCaseError::fail(format!("{step:?} answered {event:?}"))),
            },
            // A step already taken (the manager crashed before recording it): its answer.
            Err(AccountError::TransferStepRecorded { outcome, .. }) => outcome,
            Err(error) => {
                return Err(TestCaseError::fail(format!(
                    "the {step:?} of a transfer was refused: {error:?}"
                )));
            }
        };
        if step == TransferStep::Refund {
            prop_assert_eq!(outcome, StepOutcome::Applied, "a refund is never declined");
        }
        if crash {
            self.unrecorded.insert(id);
            return Ok(());
        }
        self.unrecorded.remove(&id);
        let tenant = terms.tenant.clone();
        let record = match step {
            TransferStep::Debit => TransferCommand::RecordDebit { tenant, outcome },
            TransferStep::Credit => TransferCommand::RecordCredit { tenant, outcome },
            TransferStep::Refund => TransferCommand::RecordRefund { tenant },
        };
        let transfer = &mut self.transfers[index].1;
        match transfer.handle(record)? {
            Ok(events) => prop_assert!(!events.is_empty(), "a new answer recorded nothing"),
            Err(error) => {
                return Err(TestCaseError::fail(format!(
                    "recording the {step:?} failed: {error:?}"
                )));
            }
        }
        Ok(())
    }

    /// Drives every transfer to its end, as the manager's sweep for stuck transfers would.
    fn settle(&mut self) -> Result<(), TestCaseError> {
        for index in 0..self.transfers.len() {
            // At most debit, credit, refund; and a crash left at most one step unrecorded.
            for _ in 0..3 {
                self.advance(index, false)?;
                self.check()?;
            }
            let transfer = self.transfers[index].1.state.state().unwrap();
            prop_assert!(
                transfer.status.is_final(),
                "{:?} after three steps",
                transfer.status
            );
        }
        Ok(())
    }

    fn check(&self) -> Result<(), TestCaseError> {
        let mut money: HashMap<Currency, i128> = HashMap::new();
        for (id, stream) in &self.accounts {
            let account = stream.state.state().unwrap();
            prop_assert_eq!(account.tenant.as_str(), TENANT);
            *money.entry(account.currency).or_default() += i128::from(account.balance);
            prop_assert!(
                account.balance >= -account.overdraft_limit.minor_units(),
                "balance {} below the overdraft of {}",
                account.balance,
                account.overdraft_limit.minor_units()
            );
            let refunded = self.refunded.get(id).copied().unwrap_or_default();
            prop_assert!(
                account.balance <= account.max_balance + refunded,
                "balance {} above the ceiling {} and the {} refunded",
                account.balance,
                account.max_balance,
                refunded
            );
            if account.status == AccountStatus::Closed {
                prop_assert!(account.balance >= 0, "closed at {}", account.balance);
            }
            let mut steps = HashMap::new();
            for event in &stream.events {
                if let Some((transfer, step, _)) = event.transfer_step() {
                    *steps.entry((transfer, step)).or_insert(0) += 1;
                }
            }
            prop_assert!(
                steps.values().all(|&count| count == 1),
                "a step taken twice: {steps:?}"
            );
        }
        // Money in flight, as the accounts' records say: debited by a transfer and neither
        // credited to its destination nor refunded yet.
        let mut in_flight: HashMap<Uuid, i64> = HashMap::new();
        for (_, stream) in &self.accounts {
            for event in &stream.events {
                let (transfer, amount, currency) = match event {
                    AccountEvent::TransferDebited {
                        transfer_id,
                        amount,
                        currency,
                        ..
                    } => (transfer_id, amount.minor_units(), currency),
                    AccountEvent::TransferCredited {
                        transfer_id,
                        amount,
                        currency,
                        ..
                    }
                    | AccountEvent::TransferRefunded {
                        transfer_id,
                        amount,
                        currency,
                        ..
                    } => (transfer_id, -amount.minor_units(), currency),
                    _ => continue,
                };
                *in_flight.entry(*transfer).or_default() += amount;
                *money.entry(*currency).or_default() += i128::from(amount);
            }
        }
        // The transfers agree, except one whose last answer the manager has yet to record.
        for (id, transfer) in &self.transfers {
            let transfer = transfer.state.state().unwrap();
            let says = match transfer.status {
                TransferStatus::Debited | TransferStatus::Refunding => {
                    transfer.terms.amount.minor_units()
                }
                _ => 0,
            };
            let records = in_flight.get(id).copied().unwrap_or_default();
            prop_assert!(records >= 0, "more arrived than left: {records}");
            if !self.unrecorded.contains(id) {
                prop_assert_eq!(
                    records,
                    says,
                    "the accounts hold {} in flight, the transfer ({:?}) {}",
                    records,
                    transfer.status,
                    says
                );
            }
        }
        for currency in [eur(), usd(), Currency::parse("GBP").unwrap()] {
            let held = money.get(&currency).copied().unwrap_or_default();
            let brought = self.deposited.get(&currency).copied().unwrap_or_default()
                - self.withdrawn.get(&currency).copied().unwrap_or_default();
            prop_assert_eq!(
                held,
                brought,
                "{} held (balances and transfers in flight) against {} deposited minus withdrawn",
                currency,
                brought
            );
        }
        Ok(())
    }

    /// Each settled transfer's accounts hold the records its outcome says they should.
    fn check_outcomes(&self) -> Result<(), TestCaseError> {
        for (id, transfer) in &self.transfers {
            let transfer = transfer.state.state().unwrap();
            let records = |account: Uuid| -> Vec<(TransferStep, StepOutcome)> {
                let (_, stream) = self.accounts.iter().find(|(a, _)| *a == account).unwrap();
                stream
                    .events
                    .iter()
                    .filter_map(AccountEvent::transfer_step)
                    .filter(|(transfer, _, _)| transfer == id)
                    .map(|(_, step, outcome)| (step, outcome))
                    .collect()
            };
            let (from, to) = (records(transfer.terms.from), records(transfer.terms.to));
            let applied = StepOutcome::Applied;
            match (transfer.status, transfer.reason) {
                (TransferStatus::Completed, None) => {
                    prop_assert_eq!(from, vec![(TransferStep::Debit, applied)]);
                    prop_assert_eq!(to, vec![(TransferStep::Credit, applied)]);
                }
                (TransferStatus::Rejected, Some(reason)) => {
                    prop_assert_eq!(
                        from,
                        vec![(TransferStep::Debit, StepOutcome::Declined(reason))]
                    );
                    prop_assert_eq!(to, vec![]);
                }
                (TransferStatus::Failed, Some(reason)) => {
                    prop_assert_eq!(
                        from,
                        vec![
                            (TransferStep::Debit, applied),
                            (TransferStep::Refund, applied)
                        ]
                    );
                    prop_assert_eq!(
                        to,
                        vec![(TransferStep::Credit, StepOutcome::Declined(reason))]
                    );
                    prop_assert!(reason != TransferDecline::InsufficientFunds);
                }
                other => return Err(TestCaseError::fail(format!("settled as {other:?}"))),
            }
        }
        Ok(())
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn any_command_sequence_conserves_money_and_keeps_every_rule(
        openings in prop::collection::vec(opening(), 2..=4),
        ops in prop::collection::vec(op(), 0..120),
    ) {
        let mut ledger = Ledger::open(&openings);
        ledger.check()?;
        for op in ops {
            ledger.run(op)?;
        }
        ledger.settle()?;
        ledger.check_outcomes()?;
        for (_, transfer) in &ledger.transfers {
            prop_assert!(transfer.state.state().unwrap().status.is_final());
        }
    }
}
