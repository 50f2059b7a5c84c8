//! Running one account command: idempotency, optimistic concurrency and bounded retries around
//! the aggregate's decision.

use std::num::NonZeroUsize;

use cqrs_es::Aggregate;
use cqrs_es::event_sink::EventSink;
use domain::{AccountCommand, AccountError};
use serde::Serialize;
use sqlx::PgPool;
use uuid::Uuid;

use crate::error::ApiError;
use crate::relay::AppendSignal;
use crate::store::{AccountStore, AppendError, Versioned};

/// Who asked for a command and why: becomes the metadata of every event it appends.
#[derive(Debug, Clone)]
pub(crate) struct CommandContext {
    pub(crate) tenant: String,
    pub(crate) actor: String,
    pub(crate) request_id: String,
    pub(crate) correlation_id: String,
    pub(crate) traceparent: Option<String>,
    pub(crate) idempotency: Option<Idempotency>,
}

/// A client's `Idempotency-Key` and the fingerprint of the request it was sent with.
#[derive(Debug, Clone)]
pub(crate) struct Idempotency {
    pub(crate) key: String,
    pub(crate) request_hash: String,
}

#[derive(Serialize)]
struct EventMetadata<'a> {
    tenant: &'a str,
    actor: &'a str,
    correlation_id: &'a str,
    causation_id: &'a str,
    request_id: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    traceparent: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    idempotency_key: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    request_hash: Option<&'a str>,
}

impl CommandContext {
    fn metadata(&self) -> String {
        let metadata = EventMetadata {
            tenant: &self.tenant,
            actor: &self.actor,
            correlation_id: &self.correlation_id,
            // An HTTP command is caused by the request that carried it.
            causation_id: &self.request_id,
            request_id: &self.request_id,
            traceparent: self.traceparent.as_deref(),
            idempotency_key: self.idempotency.as_ref().map(|i| i.key.as_str()),
            request_hash: self.idempotency.as_ref().map(|i| i.request_hash.as_str()),
        };
        // Serialising a struct of strings cannot fail.
        serde_json::to_string(&metadata).unwrap_or_default()
    }
}

/// A command that took effect, now or (for an idempotent replay) earlier.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Committed {
    pub(crate) account_id: Uuid,
    /// The stream version after the command.
    pub(crate) version: u64,
    /// True when this is the stored outcome of an earlier request with the same key.
    pub(crate) replayed: bool,
}

/// The stream a command targets.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Target {
    /// A stream id generated for this request: nothing to load.
    New(Uuid),
    Existing(Uuid),
}

impl Target {
    fn id(self) -> Uuid {
        match self {
            Self::New(id) | Self::Existing(id) => id,
        }
    }
}

/// Executes account commands against the event store.
pub(crate) struct CommandService {
    store: AccountStore,
    conflict_retries: u32,
    /// Wakes the relay after each append.
    appended: AppendSignal,
}

impl CommandService {
    pub(crate) fn new(
        pool: PgPool,
        cache_capacity: NonZeroUsize,
        conflict_retries: u32,
        appended: AppendSignal,
    ) -> Self {
        Self {
            store: AccountStore::new(pool, cache_capacity),
            conflict_retries,
            appended,
        }
    }

    /// Runs `command` on `target`. With `expected_version` (from `If-Match`) the command only
    /// applies to that version; without it, a lost race is retried on fresh state.
    #[tracing::instrument(skip_all, fields(command = command.name(), account_id = %target.id()))]
    pub(crate) async fn execute(
        &self,
        context: &CommandContext,
        target: Target,
        command: AccountCommand,
        expected_version: Option<u64>,
    ) -> Result<Committed, ApiError> {
        let aggregate_id = target.id().to_string();
        let metadata = context.metadata();
        let mut last_seen = None;
        for attempt in 0..=self.conflict_retries {
            if let Some(replay) = self.replay(context).await? {
                return Ok(replay);
            }
            let mut slot = self.store.lock(&aggregate_id).await;
            let fresh = slot.is_none();
            let mut state = match slot.take() {
                Some(cached) => cached,
                None if matches!(target, Target::New(_)) => Versioned::default(),
                None => self.store.load(&aggregate_id).await?,
            };
            let mut decision = decide(&state, &command, expected_version).await;
            if decision.is_err() && !fresh {
                // A refusal may come from state another replica has since changed: only a
                // refusal on the latest state is final.
                self.store.catch_up(&aggregate_id, &mut state).await?;
                decision = decide(&state, &command, expected_version).await;
            }
            let current_version = state.version;
            let (next, events) = match decision {
                Ok(decided) => decided,
                Err(err) => {
                    *slot = Some(state);
                    return Err(err);
                }
            };
            match self
                .store
                .append(&aggregate_id, current_version, &events, &metadata)
                .await
            {
                Ok(()) => {
                    self.appended.appended();
                    let version = next.version;
                    *slot = Some(next);
                    return Ok(Committed {
                        account_id: target.id(),
                        version,
                        replayed: false,
                    });
                }
                Err(AppendError::StreamConflict) => {
                    tracing::debug!(attempt, "lost a race on the stream, retrying");
                    self.store.catch_up(&aggregate_id, &mut state).await?;
                    last_seen = Some(state.version);
                    *slot = Some(state);
                }
                Err(AppendError::IdempotencyKeyTaken) => {
                    // The racing request committed: the next attempt replays its outcome.
                    *slot = Some(state);
                }
                Err(AppendError::Database(err)) => return Err(err.into()),
            }
        }
        Err(ApiError::Conflict {
            current_version: last_seen,
        })
    }

    /// The stored outcome of an earlier request with the same idempotency key, if any.
    async fn replay(&self, context: &CommandContext) -> Result<Option<Committed>, ApiError> {
        let Some(idempotency) = &context.idempotency else {
            return Ok(None);
        };
        let Some(earlier) = self
            .store
            .find_idempotency_key(&context.tenant, &idempotency.key)
            .await?
        else {
            return Ok(None);
        };
        if earlier.request_hash.as_deref() != Some(idempotency.request_hash.as_str()) {
            return Err(ApiError::IdempotencyKeyReused);
        }
        let account_id = earlier.aggregate_id.parse().map_err(|_| {
            ApiError::Internal(anyhow::anyhow!(
                "idempotent event has a non-uuid aggregate id"
            ))
        })?;
        Ok(Some(Committed {
            account_id,
            version: earlier.sequence,
            replayed: true,
        }))
    }
}

/// The aggregate's decision on `state`: the next state and the events that lead to it.
async fn decide(
    state: &Versioned,
    command: &AccountCommand,
    expected_version: Option<u64>,
) -> Result<(Versioned, Vec<domain::AccountEvent>), ApiError> {
    let opening = matches!(command, AccountCommand::Open { .. });
    if !opening && !state.account.belongs_to(command.tenant()) {
        // Before the version check, so other tenants learn nothing, not even a version.
        return Err(ApiError::NotFound);
    }
    if let Some(expected) = expected_version
        && expected != state.version
    {
        return Err(ApiError::Conflict {
            current_version: Some(state.version),
        });
    }
    let mut next = state.clone();
    let sink = EventSink::default();
    next.account
        .handle(command.clone(), &(), &sink)
        .await
        .map_err(|err| match err {
            AccountError::NotFound => ApiError::NotFound,
            rule => ApiError::Rule(rule),
        })?;
    let events = sink.collect().await;
    next.version += events.len() as u64;
    Ok((next, events))
}
