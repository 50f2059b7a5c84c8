//! The read models and how an account event changes them. Shared by the live projection and
//! the rebuild, so both fold events the same way.

use chrono::{DateTime, Utc};
use domain::AccountEvent;
use uuid::Uuid;

/// A row of `accounts`.
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct AccountRow {
    pub id: Uuid,
    pub tenant: String,
    pub owner: String,
    pub currency: String,
    pub overdraft_limit: i64,
    pub balance: i64,
    pub status: String,
    /// The last stream version applied.
    pub version: i64,
    pub opened_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

/// A row of `account_entries`: one money movement.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EntryRow {
    pub account_id: Uuid,
    pub version: i64,
    pub tenant: String,
    pub kind: &'static str,
    pub amount: i64,
    pub currency: String,
    pub balance_after: i64,
    pub event_id: Uuid,
    pub recorded_at: DateTime<Utc>,
    /// The transfer behind the movement, if any.
    pub transfer_id: Option<Uuid>,
}

/// One event of an account stream, as the projection needs it.
#[derive(Debug, Clone)]
pub struct StreamEvent {
    pub account_id: Uuid,
    pub sequence: i64,
    pub tenant: String,
    pub event_id: Uuid,
    pub recorded_at: DateTime<Utc>,
    pub event: AccountEvent,
}

/// An event that cannot follow the row it would apply to.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FoldError {
    #[error("event {sequence} of account {account} arrived before the account was opened")]
    NotOpened { account: Uuid, sequence: i64 },
    #[error("account {account} opened again at version {sequence}")]
    OpenedTwice { account: Uuid, sequence: i64 },
    #[error(
        "event {sequence} of account {account} names tenant {got}, the account is {expected}'s"
    )]
    TenantMismatch {
        account: Uuid,
        sequence: i64,
        expected: String,
        got: String,
    },
}

/// Applies `event`, the next version of its stream, to `row`; a money movement also adds an
/// entry.
pub fn apply(
    row: &mut Option<AccountRow>,
    event: &StreamEvent,
    entries: &mut Vec<EntryRow>,
) -> Result<(), FoldError> {
    let at = event.recorded_at;
    if let AccountEvent::AccountOpened {
        tenant,
        owner,
        currency,
        overdraft_limit,
        ..
    } = &event.event
    {
        if row.is_some() {
            return Err(FoldError::OpenedTwice {
                account: event.account_id,
                sequence: event.sequence,
            });
        }
        *row = Some(AccountRow {
            id: event.account_id,
            tenant: tenant.clone(),
            owner: owner.as_str().to_owned(),
            currency: currency.to_string(),
            overdraft_limit: overdraft_limit.minor_units(),
            balance: 0,
            status: "active".into(),
            version: event.sequence,
            opened_at: at,
            updated_at: at,
        });
        return Ok(());
    }
    let Some(account) = row.as_mut() else {
        return Err(FoldError::NotOpened {
            account: event.account_id,
            sequence: event.sequence,
        });
    };
    if account.tenant != event.tenant {
        return Err(FoldError::TenantMismatch {
            account: event.account_id,
            sequence: event.sequence,
            expected: account.tenant.clone(),
            got: event.tenant.clone(),
        });
    }
    let mut movement =
        |kind, amount: i64, balance_after: i64, currency: String, transfer_id: Option<Uuid>| {
            account.balance = balance_after;
            entries.push(EntryRow {
                account_id: event.account_id,
                version: event.sequence,
                tenant: account.tenant.clone(),
                kind,
                amount,
                currency,
                balance_after,
                event_id: event.event_id,
                recorded_at: at,
                transfer_id,
            });
        };
    match &event.event {
        AccountEvent::AccountOpened { .. } => {}
        AccountEvent::MoneyDeposited {
            amount,
            currency,
            balance_after,
        } => movement(
            "deposit",
            amount.minor_units(),
            *balance_after,
            currency.to_string(),
            None,
        ),
        AccountEvent::MoneyWithdrawn {
            amount,
            currency,
            balance_after,
        } => movement(
            "withdrawal",
            amount.minor_units(),
            *balance_after,
            currency.to_string(),
            None,
        ),
        AccountEvent::TransferDebited {
            transfer_id,
            amount,
            currency,
            balance_after,
        } => movement(
            "transfer_debit",
            amount.minor_units(),
            *balance_after,
            currency.to_string(),
            Some(*transfer_id),
        ),
        AccountEvent::TransferCredited {
            transfer_id,
            amount,
            currency,
            balance_after,
        } => movement(
            "transfer_credit",
            amount.minor_units(),
            *balance_after,
            currency.to_string(),
            Some(*transfer_id),
        ),
        AccountEvent::TransferRefunded {
            transfer_id,
            amount,
            currency,
            balance_after,
        } => movement(
            "transfer_refund",
            amount.minor_units(),
            *balance_after,
            currency.to_string(),
            Some(*transfer_id),
        ),
        // A declined step moves no money; the version still advances.
        AccountEvent::TransferDebitDeclined { .. }
        | AccountEvent::TransferCreditDeclined { .. } => {}
        AccountEvent::AccountFrozen => account.status = "frozen".into(),
        AccountEvent::AccountUnfrozen => account.status = "active".into(),
        AccountEvent::AccountClosed => account.status = "closed".into(),
    }
    account.version = event.sequence;
    account.updated_at = at;
    Ok(())
}

#[cfg(test)]
mod tests {
    use domain::{Amount, Currency, OverdraftLimit, Owner};

    use super::*;

    fn event(sequence: i64, tenant: &str, event: AccountEvent) -> StreamEvent {
        StreamEvent {
            account_id: Uuid::nil(),
            sequence,
            tenant: tenant.into(),
            event_id: Uuid::new_v4(),
            recorded_at: Utc::now(),
            event,
        }
    }

    fn opened() -> AccountEvent {
        AccountEvent::AccountOpened {
            tenant: "acme".into(),
            owner: Owner::parse("Ada").unwrap(),
            currency: Currency::parse("EUR").unwrap(),
            overdraft_limit: OverdraftLimit::default(),
            max_balance: 1_000_000,
        }
    }

    #[test]
    fn folds_a_stream_into_a_row_and_entries() {
        let mut row = None;
        let mut entries = Vec::new();
        let deposited = AccountEvent::MoneyDeposited {
            amount: Amount::parse(30).unwrap(),
            currency: Currency::parse("EUR").unwrap(),
            balance_after: 30,
        };
        for e in [
            event(1, "acme", opened()),
            event(2, "acme", deposited),
            event(3, "acme", AccountEvent::AccountFrozen),
        ] {
            apply(&mut row, &e, &mut entries).unwrap();
        }
        let row = row.unwrap();
        assert_eq!(
            (row.balance, row.status.as_str(), row.version),
            (30, "frozen", 3)
        );
        assert_eq!(entries.len(), 1);
        assert_eq!(entries[0].kind, "deposit");
    }

    #[test]
    fn refuses_events_that_cannot_follow() {
        let mut entries = Vec::new();
        let mut row = None;
        assert!(matches!(
            apply(
                &mut row,
                &event(2, "acme", AccountEvent::AccountFrozen),
                &mut entries
            ),
            Err(FoldError::NotOpened { .. })
        ));
        apply(&mut row, &event(1, "acme", opened()), &mut entries).unwrap();
        assert!(matches!(
            apply(
                &mut row,
                &event(2, "globex", AccountEvent::AccountFrozen),
                &mut entries
            ),
            Err(FoldError::TenantMismatch { .. })
        ));
        assert!(matches!(
            apply(&mut row, &event(2, "acme", opened()), &mut entries),
            Err(FoldError::OpenedTwice { .. })
        ));
    }
}
