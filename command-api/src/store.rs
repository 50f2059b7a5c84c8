//! The event streams of one aggregate type (accounts, transfers): loading, appending, and the
//! in-memory state between commands.
//!
//! Commands for one stream are serialised in this process by a per-stream async lock, and
//! the state each one leaves behind is kept (bounded, least recently used). A command on a
//! cached stream therefore costs one round trip: a single-statement INSERT. The cache is never
//! trusted for correctness: the insert names the next sequence number, so a stale state (another
//! replica wrote meanwhile) fails on the primary key and the command is retried on fresh state.
//!
//! Ordering rule of the event log (DESIGN.md): a transaction may only write to a stream after
//! the version it builds on has committed. Both the load and the cache respect that: a state is
//! cached only after its insert committed, and the insert is the transaction's first write.

use std::num::NonZeroUsize;
use std::sync::{Arc, Mutex};

use cqrs_es::persist::{PersistedEventRepository, SerializedEvent};
use cqrs_es::{Aggregate, DomainEvent};
use domain::StoredEvent;
use lru::LruCache;
use postgres_es::PostgresEventRepository;
use sqlx::PgPool;
use tokio::sync::{Mutex as AsyncMutex, OwnedMutexGuard};

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

/// A stored event that carries an idempotency key.
#[derive(Debug, Clone)]
pub(crate) struct KeyedEvent {
    pub(crate) aggregate_id: String,
    pub(crate) sequence: u64,
    pub(crate) request_hash: Option<String>,
}

#[derive(Debug, thiserror::Error)]
pub(crate) enum AppendError {
    /// Another writer appended to the stream first.
    #[error("stream was appended to concurrently")]
    StreamConflict,
    /// The idempotency key was spent by a concurrent request.
    #[error("idempotency key already used")]
    IdempotencyKeyTaken,
    #[error(transparent)]
    Database(#[from] sqlx::Error),
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

const APPEND: &str = "
INSERT INTO events (aggregate_type, aggregate_id, sequence, event_type, event_version, payload, metadata)
SELECT $1, $2, $3 + e.ordinality, e.event_type, e.event_version, e.payload::json, $4::json
  FROM UNNEST($5::text[], $6::text[], $7::text[]) WITH ORDINALITY
       AS e(event_type, event_version, payload, ordinality)";

const FIND_IDEMPOTENCY_KEY: &str = "
SELECT aggregate_id, sequence, metadata ->> 'request_hash'
  FROM events
 WHERE (metadata ->> 'tenant') = $1 AND (metadata ->> 'idempotency_key') = $2
 ORDER BY sequence DESC
 LIMIT 1";

/// The streams of aggregate type `A` in the event store.
pub(crate) struct Store<A: Aggregate> {
    pool: PgPool,
    repository: PostgresEventRepository,
    cache: Mutex<LruCache<String, Arc<AsyncMutex<Slot<A>>>>>,
}

impl<A: Aggregate<Event: StoredEvent> + Default> Store<A> {
    pub(crate) fn new(pool: PgPool, cache_capacity: NonZeroUsize) -> Self {
        Self {
            repository: PostgresEventRepository::new(pool.clone()),
            pool,
            cache: Mutex::new(LruCache::new(cache_capacity)),
        }
    }

    /// Locks the stream's slot; commands on one stream run one at a time in this process.
    pub(crate) async fn lock(&self, aggregate_id: &str) -> OwnedMutexGuard<Slot<A>> {
        let slot = {
            let mut cache = self
                .cache
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner());
            cache.get_or_insert_ref(aggregate_id, Arc::default).clone()
        };
        slot.lock_owned().await
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

    /// Appends `events` after `version` in one statement (one round trip, atomic).
    pub(crate) async fn append(
        &self,
        aggregate_id: &str,
        version: u64,
        events: &[A::Event],
        metadata: &str,
    ) -> Result<(), AppendError> {
        let mut types = Vec::with_capacity(events.len());
        let mut versions = Vec::with_capacity(events.len());
        let mut payloads = Vec::with_capacity(events.len());
        for event in events {
            types.push(event.event_type());
            versions.push(event.event_version());
            payloads.push(
                serde_json::to_string(event)
                    .map_err(|err| AppendError::Database(sqlx::Error::Encode(Box::new(err))))?,
            );
        }
        let result = sqlx::query(APPEND)
            .bind(A::TYPE)
            .bind(aggregate_id)
            .bind(version as i64)
            .bind(metadata)
            .bind(&types)
            .bind(&versions)
            .bind(&payloads)
            .execute(&self.pool)
            .await;
        match result {
            Ok(_) => Ok(()),
            Err(sqlx::Error::Database(err)) if err.is_unique_violation() => {
                match err.constraint() {
                    Some("events_idempotency_key") => Err(AppendError::IdempotencyKeyTaken),
                    _ => Err(AppendError::StreamConflict),
                }
            }
            Err(err) => Err(err.into()),
        }
    }
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
