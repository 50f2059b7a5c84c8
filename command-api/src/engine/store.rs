//! The event streams of one aggregate type (accounts, transfers) in the event store: loading
//! and folding them, appending to them (through `append`'s batches), and finding the event that
//! spent an idempotency key. No state is kept here; `stream` keeps it between commands.

use std::sync::Arc;

use cqrs_es::persist::{PersistedEventRepository, SerializedEvent};
use cqrs_es::{Aggregate, DomainEvent};
use domain::{Account, AccountEvent, RecordedSteps, StoredEvent};
use postgres_es::PostgresEventRepository;
use sqlx::PgPool;
use uuid::Uuid;

use super::append::{Append, AppendError, Appender, EventRow};

/// A stream's state and the version (last sequence) it reflects.
#[derive(Debug, Clone, Default)]
pub(crate) struct Versioned<A> {
    pub(crate) state: A,
    pub(crate) version: u64,
}

impl<A: Aggregate> Versioned<A> {
    pub(crate) fn apply(&mut self, events: impl IntoIterator<Item = A::Event>) {
        for event in events {
            self.state.apply(event);
            self.version += 1;
        }
    }
}

/// A stored event that carries an idempotency key.
#[derive(Debug, Clone)]
pub(crate) struct KeyedEvent {
    pub(crate) aggregate_id: String,
    pub(crate) sequence: u64,
    pub(crate) request_hash: Option<String>,
}

#[derive(Debug, thiserror::Error)]
pub(crate) enum LoadError {
    #[error(transparent)]
    Database(#[from] sqlx::Error),
    #[error("loading events failed: {0}")]
    Repository(#[from] cqrs_es::persist::PersistenceError),
    #[error("a stored event cannot be read: {0}")]
    Corrupt(#[from] domain::ReadError),
}

const FIND_IDEMPOTENCY_KEY: &str = "
SELECT aggregate_id, sequence, metadata ->> 'request_hash'
  FROM events
 WHERE tenant = $1 AND (metadata ->> 'idempotency_key') = $2
 ORDER BY sequence DESC
 LIMIT 1";

const FIRST_EVENT: &str = "
SELECT event_type, event_version, payload
  FROM events
 WHERE aggregate_type = $1 AND aggregate_id = $2 AND sequence = 1";

/// The transfer steps recorded on an account for some transfers: the `events_transfer_step`
/// index, whose predicate this repeats so that the planner uses it.
const RECORDED_STEPS: &str = "
SELECT event_type, event_version, payload
  FROM events
 WHERE aggregate_type = 'account' AND aggregate_id = $1
   AND event_type IN ('TransferDebited', 'TransferDebitDeclined', 'TransferCredited',
                      'TransferCreditDeclined', 'TransferRefunded')
   AND (payload -> event_type ->> 'transfer_id') = ANY($2)";

/// The streams of aggregate type `A` in the event store.
pub(crate) struct Store<A: Aggregate> {
    pool: PgPool,
    appender: Appender,
    repository: PostgresEventRepository,
    _aggregate: std::marker::PhantomData<fn() -> A>,
}

impl<A: Aggregate<Event: StoredEvent> + Default> Store<A> {
    pub(crate) fn new(pool: PgPool, appender: Appender) -> Self {
        Self {
            repository: PostgresEventRepository::new(pool.clone()),
            pool,
            appender,
            _aggregate: std::marker::PhantomData,
        }
    }

    /// The event that started the stream, if it exists: read by primary key, without the
    /// stream's lock and whatever the stream's length.
    pub(crate) async fn first_event(
        &self,
        aggregate_id: &str,
    ) -> Result<Option<A::Event>, LoadError> {
        let row: Option<(String, String, serde_json::Value)> = sqlx::query_as(FIRST_EVENT)
            .bind(A::TYPE)
            .bind(aggregate_id)
            .fetch_optional(&self.pool)
            .await?;
        Ok(row
            .map(|(event_type, event_version, payload)| {
                domain::read_stored(&event_type, &event_version, payload)
            })
            .transpose()?)
    }

    /// The whole stream, folded.
    pub(crate) async fn load(&self, aggregate_id: &str) -> Result<Versioned<A>, LoadError> {
        let events = self.repository.get_events::<A>(aggregate_id).await?;
        let mut state = Versioned::default();
        state.apply(deserialize::<A>(events)?);
        Ok(state)
    }

    /// Brings `state` up to the stream's latest version.
    pub(crate) async fn catch_up(
        &self,
        aggregate_id: &str,
        state: &mut Versioned<A>,
    ) -> Result<(), LoadError> {
        let events = self
            .repository
            .get_last_events::<A>(aggregate_id, state.version as usize)
            .await?;
        state.apply(deserialize::<A>(events)?);
        Ok(())
    }

    /// Appends `events` after `version`, atomically, in the next batch the appender writes.
    pub(crate) async fn append(
        &self,
        aggregate_id: &str,
        version: u64,
        events: Vec<EventRow>,
    ) -> Result<(), AppendError> {
        self.appender
            .append(Append {
                aggregate_type: A::TYPE,
                aggregate_id: aggregate_id.to_owned(),
                version,
                events,
            })
            .await
    }
}

impl Store<Account> {
    /// The steps `transfers` took on account `aggregate_id`: an index lookup, a few rows
    /// whatever the account's history.
    pub(crate) async fn recorded_steps(
        &self,
        aggregate_id: &str,
        transfers: &[Uuid],
    ) -> Result<RecordedSteps, LoadError> {
        let transfers: Vec<String> = transfers.iter().map(Uuid::to_string).collect();
        let rows: Vec<(String, String, serde_json::Value)> = sqlx::query_as(RECORDED_STEPS)
            .bind(aggregate_id)
            .bind(&transfers)
            .fetch_all(&self.pool)
            .await?;
        let events = rows
            .into_iter()
            .map(|(event_type, event_version, payload)| {
                domain::read_stored::<AccountEvent>(&event_type, &event_version, payload)
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(events.iter().collect())
    }
}

/// `event` as the row it is stored in, with its command's metadata.
pub(crate) fn event_row<E: DomainEvent>(
    event: &E,
    metadata: &str,
) -> Result<EventRow, AppendError> {
    Ok(EventRow {
        event_type: event.event_type(),
        event_version: event.event_version(),
        payload: serde_json::to_string(event)
            .map_err(|err| AppendError::Database(Arc::new(sqlx::Error::Encode(Box::new(err)))))?,
        metadata: metadata.to_owned(),
    })
}

/// The event that spent `key` for `tenant`, in any stream, if any.
pub(crate) async fn find_idempotency_key(
    pool: &PgPool,
    tenant: &str,
    key: &str,
) -> Result<Option<KeyedEvent>, sqlx::Error> {
    let row: Option<(String, i64, Option<String>)> = sqlx::query_as(FIND_IDEMPOTENCY_KEY)
        .bind(tenant)
        .bind(key)
        .fetch_optional(pool)
        .await?;
    Ok(
        row.map(|(aggregate_id, sequence, request_hash)| KeyedEvent {
            aggregate_id,
            sequence: sequence as u64,
            request_hash,
        }),
    )
}

/// The events as the current code knows them: older versions upcast.
fn deserialize<A: Aggregate<Event: StoredEvent>>(
    events: Vec<SerializedEvent>,
) -> Result<Vec<A::Event>, domain::ReadError> {
    events
        .into_iter()
        .map(|event| domain::read_stored(&event.event_type, &event.event_version, event.payload))
        .collect()
}

#[cfg(test)]
mod tests {
    use cqrs_es::persist::PersistedEventRepository;
    use domain::{Account, AccountEvent, Amount, Currency};
    use service_kit::db::{self, ServiceRole};
    use service_kit::event_log::{self, LogPosition};
    use service_kit::testing::TestDatabase;

    use super::*;

    /// The migrations promise that postgres-es's own INSERT keeps working (it names the seven
    /// columns the writer may insert; defaults, the tenant column and the hash chain do the
    /// rest), and that what it writes reads back like our own appends.
    #[tokio::test]
    async fn an_event_appended_by_postgres_es_as_the_writer_is_chained_and_reads_back() {
        let database = TestDatabase::create().await;
        let writer = db::connect(&database.config_as(ServiceRole::Writer))
            .await
            .unwrap();
        let id = uuid::Uuid::new_v4().to_string();
        let appender = Appender::start(writer.clone(), 1);
        let store = Store::<Account>::new(writer.clone(), appender);
        let opened = serde_json::json!({"AccountOpened": {
            "tenant": "acme", "owner": "Ada", "currency": "EUR",
            "overdraft_limit": 0, "max_balance": 1000
        }});
        let deposited = AccountEvent::MoneyDeposited {
            amount: Amount::parse(7).unwrap(),
            currency: Currency::parse("EUR").unwrap(),
            balance_after: 7,
        };
        let metadata = serde_json::json!({"tenant": "acme", "actor": "t"});
        let events = [
            SerializedEvent::new(
                id.clone(),
                1,
                "account".into(),
                "AccountOpened".into(),
                "2".into(),
                opened,
                metadata.clone(),
            ),
            SerializedEvent::new(
                id.clone(),
                2,
                "account".into(),
                "MoneyDeposited".into(),
                "1".into(),
                serde_json::to_value(&deposited).unwrap(),
                metadata,
            ),
        ];
        PostgresEventRepository::new(writer.clone())
            .persist::<Account>(&events, None)
            .await
            .unwrap();

        let loaded = store.load(&id).await.unwrap();
        assert_eq!(loaded.version, 2);
        assert_eq!(loaded.state.state().map(|open| open.balance), Some(7));
        let logged = event_log::read_committed(&database.pool, LogPosition::START, 10)
            .await
            .unwrap();
        assert_eq!(logged.len(), 2);
        assert!(logged.iter().all(|event| event.tenant == "acme"));
        assert_eq!(
            logged[1].prev_hash.as_deref(),
            Some(logged[0].hash.as_slice())
        );
        assert!(matches!(logged[1].decode::<AccountEvent>(), Ok(event) if event == deposited));
    }
}
