//! An account's state as of a version or an instant, folded from its stored events with the
//! same `apply` the command side uses.

use chrono::{DateTime, Utc};
use cqrs_es::Aggregate;
use domain::{Account, AccountEvent};
use futures::TryStreamExt;
use service_kit::event_log::{EVENT_COLUMNS, LoggedEvent};
use sqlx::PgConnection;

use crate::ACCOUNT;

/// How far to fold a stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AsOf {
    /// Every stored event.
    Latest,
    /// Up to and including this version.
    Version(i64),
    /// The events recorded at or before this instant. `recorded_at` is when the appending
    /// transaction started, so two racing appends can commit out of that order; the fold
    /// takes the longest run of versions from 1 that were all recorded by then, so it never
    /// shows a state that skips a version.
    Instant(DateTime<Utc>),
}

/// The account as it was, and the version and time that state reflects.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AccountAsOf {
    pub version: i64,
    /// When the last folded event was recorded.
    pub recorded_at: DateTime<Utc>,
    pub account: Account,
}

#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error(transparent)]
    Database(#[from] sqlx::Error),
    #[error("stored event {aggregate_id}/{sequence} cannot be read as an account event: {reason}")]
    Unreadable {
        aggregate_id: String,
        sequence: i64,
        reason: String,
    },
}

/// Folds events of one account stream, given in version order, as far as `as_of` allows.
/// `None` if not even the first event is included: the account did not exist yet.
pub fn fold<'a>(
    events: impl IntoIterator<Item = &'a LoggedEvent>,
    as_of: AsOf,
) -> Result<Option<AccountAsOf>, StateError> {
    let mut fold = AsOfFold::new(as_of);
    for event in events {
        if !fold.push(event)? {
            break;
        }
    }
    Ok(fold.folded)
}

/// A fold as of `as_of`, fed one event at a time, so a stream is never held whole in memory.
struct AsOfFold {
    as_of: AsOf,
    folded: Option<AccountAsOf>,
}

impl AsOfFold {
    fn new(as_of: AsOf) -> Self {
        Self {
            as_of,
            folded: None,
        }
    }

    /// Folds the stream's next event if `as_of` includes it; false once it does not (the
    /// stream's later events are not part of the state either).
    fn push(&mut self, event: &LoggedEvent) -> Result<bool, StateError> {
        let expected = self.folded.as_ref().map_or(1, |state| state.version + 1);
        let included = event.sequence == expected
            && match self.as_of {
                AsOf::Latest => true,
                AsOf::Version(version) => event.sequence <= version,
                AsOf::Instant(at) => event.recorded_at <= at,
            };
        if !included {
            return Ok(false);
        }
        let state = self.folded.get_or_insert_with(|| AccountAsOf {
            version: 0,
            recorded_at: event.recorded_at,
            account: Account::default(),
        });
        state.account.apply(account_event(event)?);
        state.version = event.sequence;
        state.recorded_at = event.recorded_at;
        Ok(true)
    }
}

/// Reads a stored account event, upcast to the current version.
pub fn account_event(event: &LoggedEvent) -> Result<AccountEvent, StateError> {
    event.decode().map_err(|err| StateError::Unreadable {
        aggregate_id: event.aggregate_id.clone(),
        sequence: event.sequence,
        reason: err.to_string(),
    })
}

/// The account `id` as of `as_of`, from the event store, read as a stream of rows.
pub async fn account_as_of(
    connection: &mut PgConnection,
    id: &str,
    as_of: AsOf,
) -> Result<Option<AccountAsOf>, StateError> {
    let (version, at) = match as_of {
        AsOf::Latest => (None, None),
        AsOf::Version(version) => (Some(version), None),
        AsOf::Instant(at) => (None, Some(at)),
    };
    let query = format!(
        "SELECT {EVENT_COLUMNS} FROM events
          WHERE aggregate_type = $1 AND aggregate_id = $2
            AND ($3::int8 IS NULL OR sequence <= $3)
            AND ($4::timestamptz IS NULL OR recorded_at <= $4)
          ORDER BY sequence"
    );
    let mut events = sqlx::query_as::<_, LoggedEvent>(&query)
        .bind(ACCOUNT)
        .bind(id)
        .bind(version)
        .bind(at)
        .fetch(connection);
    let mut fold = AsOfFold::new(as_of);
    while let Some(event) = events.try_next().await? {
        if !fold.push(&event)? {
            break;
        }
    }
    Ok(fold.folded)
}

#[cfg(test)]
mod tests {
    use chrono::TimeDelta;
    use service_kit::event_log::LogPosition;

    use super::*;

    /// A stored event; `AccountOpened` as version 1 wrote it, which must still fold.
    fn event(sequence: i64, at: DateTime<Utc>, payload: &str) -> LoggedEvent {
        let event_type = payload.split('"').nth(1).unwrap_or_default();
        LoggedEvent {
            position: LogPosition::START,
            aggregate_type: ACCOUNT.into(),
            aggregate_id: "a".into(),
            sequence,
            event_type: event_type.into(),
            event_version: "1".into(),
            event_id: uuid::Uuid::nil(),
            recorded_at: at,
            tenant: String::new(),
            payload: payload.into(),
            metadata: "{}".into(),
            prev_hash: None,
            hash: Vec::new(),
        }
    }

    fn stream(t0: DateTime<Utc>) -> Vec<LoggedEvent> {
        let second = TimeDelta::seconds(1);
        vec![
            event(
                1,
                t0,
                r#"{"AccountOpened":{"tenant":"acme","owner":"Ada","currency":"EUR","overdraft_limit":0}}"#,
            ),
            event(
                2,
                t0 + second,
                r#"{"MoneyDeposited":{"amount":100,"currency":"EUR","balance_after":100}}"#,
            ),
            // Recorded before version 2 (its transaction started first, committed later).
            event(
                3,
                t0 + second / 2,
                r#"{"MoneyDeposited":{"amount":5,"currency":"EUR","balance_after":105}}"#,
            ),
        ]
    }

    fn balance(state: &AccountAsOf) -> i64 {
        state.account.state().unwrap().balance
    }

    #[test]
    fn folds_to_a_version_or_an_instant() {
        let t0 = Utc::now();
        let events = stream(t0);
        assert_eq!(
            fold(&events, AsOf::Instant(t0 - TimeDelta::seconds(1))).unwrap(),
            None
        );
        let opened = fold(&events, AsOf::Instant(t0)).unwrap().unwrap();
        assert_eq!((opened.version, balance(&opened)), (1, 0));
        let two = fold(&events, AsOf::Version(2)).unwrap().unwrap();
        assert_eq!((two.version, balance(&two)), (2, 100));
        let latest = fold(&events, AsOf::Latest).unwrap().unwrap();
        assert_eq!((latest.version, balance(&latest)), (3, 105));
    }

    #[test]
    fn an_instant_never_skips_a_version() {
        let t0 = Utc::now();
        let events = stream(t0);
        // Version 3 was recorded by t0 + 0.5 s, version 2 was not: the state stops at 1.
        let state = fold(&events, AsOf::Instant(t0 + TimeDelta::milliseconds(700)))
            .unwrap()
            .unwrap();
        assert_eq!(state.version, 1);
    }

    #[test]
    fn stops_at_a_missing_version_and_refuses_unreadable_payloads() {
        let t0 = Utc::now();
        let mut events = stream(t0);
        events.remove(1);
        assert_eq!(fold(&events, AsOf::Latest).unwrap().unwrap().version, 1);
        events[0].payload = "{".into();
        assert!(matches!(
            fold(&events, AsOf::Latest),
            Err(StateError::Unreadable { sequence: 1, .. })
        ));
    }
}
