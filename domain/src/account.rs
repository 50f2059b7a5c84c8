//! The `Account` aggregate.
//!
//! An account belongs to one tenant; a command carrying another tenant is answered exactly as
//! if the account did not exist, so that ids of other tenants cannot be probed.

use cqrs_es::event_sink::EventSink;
use cqrs_es::{Aggregate, DomainEvent};
use serde::{Deserialize, Serialize};

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
}

impl AccountCommand {
    pub fn tenant(&self) -> &str {
        match self {
            Self::Open { tenant, .. }
            | Self::Deposit { tenant, .. }
            | Self::Withdraw { tenant, .. }
            | Self::Freeze { tenant }
            | Self::Unfreeze { tenant }
            | Self::Close { tenant } => tenant,
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
        }
    }
}

/// What happened to an account. Names are past tense; `event_type` and `event_version` are
/// explicit so that a v2 can be introduced next to v1 with an upcaster.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum AccountEvent {
    AccountOpened {
        tenant: String,
        owner: Owner,
        currency: Currency,
        overdraft_limit: OverdraftLimit,
    },
    MoneyDeposited {
        amount: Amount,
        currency: Currency,
        balance_after: i64,
    },
    MoneyWithdrawn {
        amount: Amount,
        currency: Currency,
        balance_after: i64,
    },
    AccountFrozen,
    AccountUnfrozen,
    AccountClosed,
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
        }
        .to_owned()
    }

    fn event_version(&self) -> String {
        "1".to_owned()
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
    #[error("the balance would exceed the maximum of {max}", max = MAX_BALANCE)]
    BalanceLimitExceeded,
    #[error("account is frozen")]
    Frozen,
    #[error("account is not frozen")]
    NotFrozen,
    #[error("account is closed")]
    Closed,
    #[error("only an account with a zero balance can be closed; the balance is {balance}")]
    NonZeroBalance { balance: i64 },
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
    /// Minor units; negative down to `-overdraft_limit`.
    pub balance: i64,
    pub status: AccountStatus,
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

    /// Decides which event a command produces, without changing anything.
    pub fn decide(&self, command: AccountCommand) -> Result<AccountEvent, AccountError> {
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
        match account.status {
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
                    .filter(|balance| *balance <= MAX_BALANCE)
                    .ok_or(AccountError::BalanceLimitExceeded)?;
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
        }
    }
}

impl OpenAccount {
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
    type Services = ();

    async fn handle(
        &mut self,
        command: Self::Command,
        _services: &Self::Services,
        sink: &EventSink<Self>,
    ) -> Result<(), Self::Error> {
        let event = self.decide(command)?;
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
            } => {
                self.opened = Some(OpenAccount {
                    tenant,
                    owner,
                    currency,
                    overdraft_limit,
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
                }
            }
        }
    }
}

#[cfg(test)]
mod tests;
