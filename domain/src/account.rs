//! The `Account` aggregate.
//!
//! An account belongs to one tenant; a command carrying another tenant is answered exactly as
//! if the account did not exist, so that ids of other tenants cannot be probed.

use std::collections::HashMap;

use cqrs_es::event_sink::EventSink;
use cqrs_es::{Aggregate, DomainEvent};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::money::{Amount, Currency, MAX_BALANCE, OverdraftLimit, Owner};

/// What a client asks an account to do. Every variant names the tenant it acts for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AccountCommand {
    Open {
        tenant: String,
        owner: Owner,
        currency: Currency,
        overdraft_limit: OverdraftLimit,
    },
    Deposit {
        tenant: String,
        amount: Amount,
        currency: Currency,
    },
    Withdraw {
        tenant: String,
        amount: Amount,
        currency: Currency,
    },
    Freeze {
        tenant: String,
    },
    Unfreeze {
        tenant: String,
    },
    Close {
        tenant: String,
    },
    /// A transfer's first step: take its amount from this, the source account.
    DebitForTransfer {
        tenant: String,
        transfer_id: Uuid,
        amount: Amount,
        currency: Currency,
    },
    /// A debited transfer's second step: pay its amount into this, the destination account.
    CreditForTransfer {
        tenant: String,
        transfer_id: Uuid,
        amount: Amount,
        currency: Currency,
    },
    /// Gives back what a transfer debited from this account, after its destination declined.
    RefundTransfer {
        tenant: String,
        transfer_id: Uuid,
        amount: Amount,
        currency: Currency,
    },
}

impl AccountCommand {
    pub fn tenant(&self) -> &str {
        match self {
            Self::Open { tenant, .. }
            | Self::Deposit { tenant, .. }
            | Self::Withdraw { tenant, .. }
            | Self::Freeze { tenant }
            | Self::Unfreeze { tenant }
            | Self::Close { tenant }
            | Self::DebitForTransfer { tenant, .. }
            | Self::CreditForTransfer { tenant, .. }
            | Self::RefundTransfer { tenant, .. } => tenant,
        }
    }

    /// The command that asks an account for `step` of transfer `transfer_id`.
    pub fn for_transfer_step(
        step: TransferStep,
        tenant: String,
        transfer_id: Uuid,
        amount: Amount,
        currency: Currency,
    ) -> Self {
        match step {
            TransferStep::Debit => Self::DebitForTransfer {
                tenant,
                transfer_id,
                amount,
                currency,
            },
            TransferStep::Credit => Self::CreditForTransfer {
                tenant,
                transfer_id,
                amount,
                currency,
            },
            TransferStep::Refund => Self::RefundTransfer {
                tenant,
                transfer_id,
                amount,
                currency,
            },
        }
    }

    /// The transfer whose step this command is, if it is one.
    pub fn transfer_id(&self) -> Option<Uuid> {
        match self {
            Self::DebitForTransfer { transfer_id, .. }
            | Self::CreditForTransfer { transfer_id, .. }
            | Self::RefundTransfer { transfer_id, .. } => Some(*transfer_id),
            _ => None,
        }
    }

    /// A stable name for logs and metrics.
    pub fn name(&self) -> &'static str {
        match self {
            Self::Open { .. } => "open",
            Self::Deposit { .. } => "deposit",
            Self::Withdraw { .. } => "withdraw",
            Self::Freeze { .. } => "freeze",
            Self::Unfreeze { .. } => "unfreeze",
            Self::Close { .. } => "close",
            Self::DebitForTransfer { .. } => "debit_for_transfer",
            Self::CreditForTransfer { .. } => "credit_for_transfer",
            Self::RefundTransfer { .. } => "refund_transfer",
        }
    }
}

/// A step a transfer takes on an account. Each happens at most once per transfer and account:
/// its outcome is recorded, and asking again is refused with that outcome.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TransferStep {
    Debit,
    Credit,
    Refund,
}

/// Why an account declined a transfer's debit or credit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum TransferDecline {
    InsufficientFunds,
    CurrencyMismatch,
    Frozen,
    Closed,
    BalanceLimitExceeded,
}

impl TransferDecline {
    /// A stable name for APIs and read models.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::InsufficientFunds => "insufficient_funds",
            Self::CurrencyMismatch => "currency_mismatch",
            Self::Frozen => "frozen",
            Self::Closed => "closed",
            Self::BalanceLimitExceeded => "balance_limit_exceeded",
        }
    }
}

/// What became of a transfer step on an account.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StepOutcome {
    Applied,
    Declined(TransferDecline),
}

/// What happened to an account. Names are past tense; `event_type` and `event_version` are
/// explicit, and events stored by older versions are read through [`crate::versions`].
///
/// The doc comments are the descriptions analysts read in the event contracts.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum AccountEvent {
    /// An account was opened, with a zero balance. Version 2 records the account's balance
    /// ceiling; version 1 events predate it and had the ceiling of 10^17 minor units.
    AccountOpened {
        tenant: String,
        owner: Owner,
        currency: Currency,
        overdraft_limit: OverdraftLimit,
        /// The highest balance the account may hold, in minor units.
        max_balance: i64,
    },
    /// Money was paid in from outside the ledger.
    MoneyDeposited {
        amount: Amount,
        currency: Currency,
        /// The account's balance after this event, in minor units.
        balance_after: i64,
    },
    /// Money was paid out of the ledger.
    MoneyWithdrawn {
        amount: Amount,
        currency: Currency,
        /// The account's balance after this event, in minor units.
        balance_after: i64,
    },
    /// Nothing moves on the account until it is unfrozen.
    AccountFrozen,
    AccountUnfrozen,
    /// Final: the account held zero and takes no more commands.
    AccountClosed,
    /// A transfer took its amount from this, the source account.
    TransferDebited {
        transfer_id: Uuid,
        amount: Amount,
        currency: Currency,
        /// The account's balance after this event, in minor units.
        balance_after: i64,
    },
    /// The account refused a transfer's debit; the transfer is rejected. Recorded, so that
    /// the refusal is final and every retry of the step gets the same answer.
    TransferDebitDeclined {
        transfer_id: Uuid,
        reason: TransferDecline,
    },
    /// A transfer paid its amount into this, the destination account.
    TransferCredited {
        transfer_id: Uuid,
        amount: Amount,
        currency: Currency,
        /// The account's balance after this event, in minor units.
        balance_after: i64,
    },
    /// The account refused a transfer's credit; the source is refunded.
    TransferCreditDeclined {
        transfer_id: Uuid,
        reason: TransferDecline,
    },
    /// A transfer whose destination declined gave its amount back to this, the source account.
    TransferRefunded {
        transfer_id: Uuid,
        amount: Amount,
        currency: Currency,
        /// The account's balance after this event, in minor units.
        balance_after: i64,
    },
}

/// The data of `AccountOpened` version 1, as stored before accounts recorded their balance
/// ceiling. Kept for the event contract (such events are still published as stored); readers
/// upcast them to version 2 with `max_balance` = [`MAX_BALANCE`], the ceiling every account had
/// then (see [`crate::versions`]).
#[derive(Debug, JsonSchema)]
pub struct AccountOpenedV1 {
    pub tenant: String,
    pub owner: Owner,
    pub currency: Currency,
    pub overdraft_limit: OverdraftLimit,
}

impl AccountEvent {
    /// The transfer step this event records, if it records one.
    pub fn transfer_step(&self) -> Option<(Uuid, TransferStep, StepOutcome)> {
        use StepOutcome::{Applied, Declined};
        match self {
            Self::TransferDebited { transfer_id, .. } => {
                Some((*transfer_id, TransferStep::Debit, Applied))
            }
            Self::TransferDebitDeclined {
                transfer_id,
                reason,
            } => Some((*transfer_id, TransferStep::Debit, Declined(*reason))),
            Self::TransferCredited { transfer_id, .. } => {
                Some((*transfer_id, TransferStep::Credit, Applied))
            }
            Self::TransferCreditDeclined {
                transfer_id,
                reason,
            } => Some((*transfer_id, TransferStep::Credit, Declined(*reason))),
            Self::TransferRefunded { transfer_id, .. } => {
                Some((*transfer_id, TransferStep::Refund, Applied))
            }
            _ => None,
        }
    }
}

impl DomainEvent for AccountEvent {
    fn event_type(&self) -> String {
        match self {
            Self::AccountOpened { .. } => "AccountOpened",
            Self::MoneyDeposited { .. } => "MoneyDeposited",
            Self::MoneyWithdrawn { .. } => "MoneyWithdrawn",
            Self::AccountFrozen => "AccountFrozen",
            Self::AccountUnfrozen => "AccountUnfrozen",
            Self::AccountClosed => "AccountClosed",
            Self::TransferDebited { .. } => "TransferDebited",
            Self::TransferDebitDeclined { .. } => "TransferDebitDeclined",
            Self::TransferCredited { .. } => "TransferCredited",
            Self::TransferCreditDeclined { .. } => "TransferCreditDeclined",
            Self::TransferRefunded { .. } => "TransferRefunded",
        }
        .to_owned()
    }

    fn event_version(&self) -> String {
        Self::current_version(&self.event_type()).to_owned()
    }
}

impl AccountEvent {
    /// The version new events of `event_type` are written as. Raise it with every change of
    /// an event's data, and add an upcaster from the previous version in [`crate::versions`].
    pub fn current_version(event_type: &str) -> &'static str {
        match event_type {
            "AccountOpened" => "2",
            _ => "1",
        }
    }
}

/// A broken business rule. The `Display` text is written for the client who sent the command.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AccountError {
    #[error("account not found")]
    NotFound,
    #[error("account is already open")]
    AlreadyOpen,
    #[error("account holds {account}, the command is in {requested}")]
    CurrencyMismatch {
        account: Currency,
        requested: Currency,
    },
    #[error("insufficient funds: {available} available, {requested} requested")]
    InsufficientFunds { available: i64, requested: i64 },
    #[error("the balance would exceed the account's maximum of {max_balance}")]
    BalanceLimitExceeded { max_balance: i64 },
    #[error("account is frozen")]
    Frozen,
    #[error("account is not frozen")]
    NotFrozen,
    #[error("account is closed")]
    Closed,
    #[error("only an account with a zero balance can be closed; the balance is {balance}")]
    NonZeroBalance { balance: i64 },
    #[error("the {step:?} of transfer {transfer_id} was already recorded: {outcome:?}")]
    TransferStepRecorded {
        transfer_id: Uuid,
        step: TransferStep,
        outcome: StepOutcome,
    },
    #[error(
        "transfer {transfer_id} debited nothing from this account, so there is nothing to refund"
    )]
    NothingToRefund { transfer_id: Uuid },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AccountStatus {
    Active,
    Frozen,
    Closed,
}

impl AccountStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Active => "active",
            Self::Frozen => "frozen",
            Self::Closed => "closed",
        }
    }
}

/// The state of an opened account.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OpenAccount {
    pub tenant: String,
    pub owner: Owner,
    pub currency: Currency,
    pub overdraft_limit: OverdraftLimit,
    /// The highest balance allowed, in minor units.
    pub max_balance: i64,
    /// Minor units; negative down to `-overdraft_limit`.
    pub balance: i64,
    pub status: AccountStatus,
}

/// The steps already taken on an account by the transfers a decision concerns, with their
/// outcomes, so that no step happens twice however often it is asked for.
///
/// They live in the event store, not in the account's state: kept in the state, they would
/// grow with every transfer the account ever took part in, and every load, snapshot and
/// decision would carry them. The command engine looks up, by index, the steps of the
/// transfers named by the commands it is about to decide, and passes them in as the
/// aggregate's services (the store's unique index on a step is the backstop).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RecordedSteps(HashMap<(Uuid, TransferStep), StepOutcome>);

impl RecordedSteps {
    /// What became of `step` of `transfer_id` on this account, if it happened.
    pub fn outcome(&self, transfer_id: Uuid, step: TransferStep) -> Option<StepOutcome> {
        self.0.get(&(transfer_id, step)).copied()
    }

    /// Remembers the step `event` took, if it is a transfer step.
    pub fn record(&mut self, event: &AccountEvent) {
        if let Some((transfer_id, step, outcome)) = event.transfer_step() {
            self.0.insert((transfer_id, step), outcome);
        }
    }
}

impl<'a> FromIterator<&'a AccountEvent> for RecordedSteps {
    fn from_iter<I: IntoIterator<Item = &'a AccountEvent>>(events: I) -> Self {
        let mut recorded = Self::default();
        for event in events {
            recorded.record(event);
        }
        recorded
    }
}

/// The aggregate: nothing until `AccountOpened`, then an [`OpenAccount`].
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Account {
    opened: Option<OpenAccount>,
}

impl Account {
    pub fn state(&self) -> Option<&OpenAccount> {
        self.opened.as_ref()
    }

    /// True if the account is open and belongs to `tenant`.
    pub fn belongs_to(&self, tenant: &str) -> bool {
        self.opened
            .as_ref()
            .is_some_and(|account| account.tenant == tenant)
    }

    /// Decides which event a command produces, without changing anything. `recorded` holds
    /// the steps already taken by the transfers the command concerns, if it is a transfer step.
    pub fn decide(
        &self,
        command: AccountCommand,
        recorded: &RecordedSteps,
    ) -> Result<AccountEvent, AccountError> {
        let account = match &self.opened {
            None => {
                return match command {
                    AccountCommand::Open {
                        tenant,
                        owner,
                        currency,
                        overdraft_limit,
                    } => Ok(AccountEvent::AccountOpened {
                        tenant,
                        owner,
                        currency,
                        overdraft_limit,
                        max_balance: MAX_BALANCE,
                    }),
                    _ => Err(AccountError::NotFound),
                };
            }
            Some(account) if account.tenant != command.tenant() => {
                return Err(AccountError::NotFound);
            }
            Some(account) => account,
        };
        if let AccountCommand::Open { .. } = command {
            return Err(AccountError::AlreadyOpen);
        }
        if let Some(decided) = account.decide_transfer_step(&command, recorded) {
            return decided;
        }
        match account.status {
            // A refund can land in a closed account (it was emptied and closed while its
            // transfer was in flight, and the credit was declined). That money is paid out by
            // a withdrawal of at most the balance; nothing else moves a closed account.
            AccountStatus::Closed
                if matches!(&command, AccountCommand::Withdraw { amount, .. }
                    if amount.minor_units() <= account.balance) => {}
            AccountStatus::Closed => return Err(AccountError::Closed),
            AccountStatus::Frozen if !matches!(command, AccountCommand::Unfreeze { .. }) => {
                return Err(AccountError::Frozen);
            }
            _ => {}
        }
        match command {
            AccountCommand::Open { .. } => Err(AccountError::AlreadyOpen),
            AccountCommand::Deposit {
                amount, currency, ..
            } => {
                account.check_currency(currency)?;
                let balance_after = account
                    .balance
                    .checked_add(amount.minor_units())
                    .filter(|balance| *balance <= account.max_balance)
                    .ok_or(AccountError::BalanceLimitExceeded {
                        max_balance: account.max_balance,
                    })?;
                Ok(AccountEvent::MoneyDeposited {
                    amount,
                    currency,
                    balance_after,
                })
            }
            AccountCommand::Withdraw {
                amount, currency, ..
            } => {
                account.check_currency(currency)?;
                let available = account.balance + account.overdraft_limit.minor_units();
                if amount.minor_units() > available {
                    return Err(AccountError::InsufficientFunds {
                        available,
                        requested: amount.minor_units(),
                    });
                }
                Ok(AccountEvent::MoneyWithdrawn {
                    amount,
                    currency,
                    balance_after: account.balance - amount.minor_units(),
                })
            }
            AccountCommand::Freeze { .. } => Ok(AccountEvent::AccountFrozen),
            AccountCommand::Unfreeze { .. } => match account.status {
                AccountStatus::Frozen => Ok(AccountEvent::AccountUnfrozen),
                _ => Err(AccountError::NotFrozen),
            },
            AccountCommand::Close { .. } => match account.balance {
                0 => Ok(AccountEvent::AccountClosed),
                balance => Err(AccountError::NonZeroBalance { balance }),
            },
            AccountCommand::DebitForTransfer { .. }
            | AccountCommand::CreditForTransfer { .. }
            | AccountCommand::RefundTransfer { .. } => {
                unreachable!("transfer steps are decided by decide_transfer_step")
            }
        }
    }
}

impl OpenAccount {
    /// Decides a transfer step; `None` for any other command. A debit or credit the account
    /// cannot take is not an error but a recorded decline: the transfer's outcome must not
    /// depend on which retry of the step happened to run.
    fn decide_transfer_step(
        &self,
        command: &AccountCommand,
        recorded: &RecordedSteps,
    ) -> Option<Result<AccountEvent, AccountError>> {
        let (transfer_id, step, amount, currency) = match command {
            AccountCommand::DebitForTransfer {
                transfer_id,
                amount,
                currency,
                ..
            } => (*transfer_id, TransferStep::Debit, *amount, *currency),
            AccountCommand::CreditForTransfer {
                transfer_id,
                amount,
                currency,
                ..
            } => (*transfer_id, TransferStep::Credit, *amount, *currency),
            AccountCommand::RefundTransfer {
                transfer_id,
                amount,
                currency,
                ..
            } => (*transfer_id, TransferStep::Refund, *amount, *currency),
            _ => return None,
        };
        if let Some(outcome) = recorded.outcome(transfer_id, step) {
            return Some(Err(AccountError::TransferStepRecorded {
                transfer_id,
                step,
                outcome,
            }));
        }
        let minor_units = amount.minor_units();
        let decline = match self.status {
            AccountStatus::Closed => Some(TransferDecline::Closed),
            AccountStatus::Frozen => Some(TransferDecline::Frozen),
            AccountStatus::Active => None,
        }
        .or((currency != self.currency).then_some(TransferDecline::CurrencyMismatch));
        Some(match step {
            TransferStep::Debit => {
                let available = self.balance + self.overdraft_limit.minor_units();
                match decline
                    .or((minor_units > available).then_some(TransferDecline::InsufficientFunds))
                {
                    Some(reason) => Ok(AccountEvent::TransferDebitDeclined {
                        transfer_id,
                        reason,
                    }),
                    None => Ok(AccountEvent::TransferDebited {
                        transfer_id,
                        amount,
                        currency,
                        balance_after: self.balance - minor_units,
                    }),
                }
            }
            TransferStep::Credit => {
                let balance_after = self
                    .balance
                    .checked_add(minor_units)
                    .filter(|balance| *balance <= self.max_balance);
                match (decline, balance_after) {
                    (Some(reason), _) => Ok(AccountEvent::TransferCreditDeclined {
                        transfer_id,
                        reason,
                    }),
                    (None, None) => Ok(AccountEvent::TransferCreditDeclined {
                        transfer_id,
                        reason: TransferDecline::BalanceLimitExceeded,
                    }),
                    (None, Some(balance_after)) => Ok(AccountEvent::TransferCredited {
                        transfer_id,
                        amount,
                        currency,
                        balance_after,
                    }),
                }
            }
            // Money this account sent comes back whatever its state since: frozen or even
            // closed (it was emptied while the transfer was in flight), it is never lost.
            TransferStep::Refund => match recorded.outcome(transfer_id, TransferStep::Debit) {
                Some(StepOutcome::Applied) => Ok(AccountEvent::TransferRefunded {
                    transfer_id,
                    amount,
                    currency,
                    balance_after: self.balance + minor_units,
                }),
                _ => Err(AccountError::NothingToRefund { transfer_id }),
            },
        })
    }

    fn check_currency(&self, requested: Currency) -> Result<(), AccountError> {
        if requested == self.currency {
            Ok(())
        } else {
            Err(AccountError::CurrencyMismatch {
                account: self.currency,
                requested,
            })
        }
    }
}

impl Aggregate for Account {
    const TYPE: &'static str = "account";
    type Command = AccountCommand;
    type Event = AccountEvent;
    type Error = AccountError;
    type Services = RecordedSteps;

    async fn handle(
        &mut self,
        command: Self::Command,
        recorded: &RecordedSteps,
        sink: &EventSink<Self>,
    ) -> Result<(), Self::Error> {
        let event = self.decide(command, recorded)?;
        sink.write(event, self).await;
        Ok(())
    }

    fn apply(&mut self, event: Self::Event) {
        match event {
            AccountEvent::AccountOpened {
                tenant,
                owner,
                currency,
                overdraft_limit,
                max_balance,
            } => {
                self.opened = Some(OpenAccount {
                    tenant,
                    owner,
                    currency,
                    overdraft_limit,
                    max_balance,
                    balance: 0,
                    status: AccountStatus::Active,
                });
            }
            event => {
                let Some(account) = self.opened.as_mut() else {
                    return;
                };
                match event {
                    AccountEvent::AccountOpened { .. } => {}
                    AccountEvent::MoneyDeposited { balance_after, .. }
                    | AccountEvent::MoneyWithdrawn { balance_after, .. } => {
                        account.balance = balance_after;
                    }
                    AccountEvent::AccountFrozen => account.status = AccountStatus::Frozen,
                    AccountEvent::AccountUnfrozen => account.status = AccountStatus::Active,
                    AccountEvent::AccountClosed => account.status = AccountStatus::Closed,
                    AccountEvent::TransferDebited { balance_after, .. }
                    | AccountEvent::TransferCredited { balance_after, .. }
                    | AccountEvent::TransferRefunded { balance_after, .. } => {
                        account.balance = balance_after;
                    }
                    AccountEvent::TransferDebitDeclined { .. }
                    | AccountEvent::TransferCreditDeclined { .. } => {}
                }
            }
        }
    }
}

#[cfg(test)]
mod tests;
