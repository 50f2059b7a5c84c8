//! The event streams of one aggregate type (accounts, transfers): loading, appending, and the
//! in-memory state between commands.
//!
//! Commands for one stream take turns in this process under a per-stream async lock, in groups
//! (see `commands`), and the state each group leaves behind is kept (bounded, least recently
//! used). A command on a cached stream therefore costs no read, only its rows in the next
//! batched INSERT (see `append`). The cache is never trusted for correctness: the insert names
//! the next sequence number, so a stale state (another replica wrote meanwhile) fails on the
//! primary key and the command is retried on fresh state.
//!
//! Ordering rule of the event log (DESIGN.md): a transaction may only write to a stream after
//! the version it builds on has committed. Both the load and the cache respect that: a state is
//! cached only after its insert committed, and the stream stays locked until then.

use std::num::NonZeroUsize;
use std::sync::{Arc, Mutex};

use cqrs_es::persist::{PersistedEventRepository, SerializedEvent};
use cqrs_es::{Aggregate, DomainEvent};
use domain::StoredEvent;
use lru::LruCache;
use postgres_es::PostgresEventRepository;
use sqlx::PgPool;
use tokio::sync::{Mutex as AsyncMutex, OwnedMutexGuard};

use crate::append::{Append, AppendError, Appender, EventRow};
use crate::commands::Waiter;

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

/// The cached state of one stream; `None` until loaded or after a failed append.
pub(crate) type Slot<A> = Option<Versioned<A>>;

/// One stream in this process: its state, locked while commands run on it, and the commands
/// waiting to run (see `commands::CommandService::decide_and_append`).
pub(crate) struct StreamHandle<A: Aggregate> {
    pub(crate) slot: Arc<AsyncMutex<Slot<A>>>,
    waiting: Mutex<Vec<Waiter<A>>>,
}

impl<A: Aggregate> Default for StreamHandle<A> {
    fn default() -> Self {
        Self {
            slot: Arc::default(),
            waiting: Mutex::default(),
        }
    }
}

impl<A: Aggregate> StreamHandle<A> {
    pub(crate) fn waiting(&self) -> std::sync::MutexGuard<'_, Vec<Waiter<A>>> {
        self.waiting
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
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
 WHERE (metadata ->> 'tenant') = $1 AND (metadata ->> 'idempotency_key') = $2
 ORDER BY sequence DESC
 LIMIT 1";

/// The streams of aggregate type `A` in the event store.
pub(crate) struct Store<A: Aggregate> {
    appender: Appender,
    repository: PostgresEventRepository,
    cache: Mutex<LruCache<String, Arc<StreamHandle<A>>>>,
}

impl<A: Aggregate<Event: StoredEvent> + Default> Store<A> {
    pub(crate) fn new(pool: PgPool, appender: Appender, cache_capacity: NonZeroUsize) -> Self {
        Self {
            repository: PostgresEventRepository::new(pool),
            appender,
            cache: Mutex::new(LruCache::new(cache_capacity)),
        }
    }

    pub(crate) fn stream(&self, aggregate_id: &str) -> Arc<StreamHandle<A>> {
        let mut cache = self
            .cache
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        cache.get_or_insert_ref(aggregate_id, Arc::default).clone()
    }

    /// Locks the stream's slot; commands on one stream run one at a time in this process.
    pub(crate) async fn lock(&self, aggregate_id: &str) -> OwnedMutexGuard<Slot<A>> {
        self.stream(aggregate_id).slot.clone().lock_owned().await
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
