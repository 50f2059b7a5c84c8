//! Running one command on a stream (an account or a transfer): idempotency, optimistic
//! concurrency and bounded retries around the aggregate's decision.

use std::num::NonZeroUsize;

use cqrs_es::Aggregate;
use cqrs_es::event_sink::EventSink;
use domain::{
    Account, AccountCommand, AccountError, StepOutcome, StoredEvent, Transfer, TransferCommand,
    TransferError, TransferStep,
};
use serde::Serialize;
use sqlx::PgPool;
use uuid::Uuid;

use crate::append::{AppendError, Appender};
use crate::error::ApiError;
use crate::relay::AppendSignal;
use crate::store::{Store, Versioned, find_idempotency_key};

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
    pub(crate) stream_id: Uuid,
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

/// What running commands needs to know of an aggregate beyond cqrs-es's trait.
pub(crate) trait Stream:
    Aggregate<Services = (), Command: Clone, Event: StoredEvent> + Default + Clone
{
    /// True if the stream exists and belongs to `tenant`.
    fn belongs_to(&self, tenant: &str) -> bool;
    /// True for the command that starts a stream.
    fn starts(command: &Self::Command) -> bool;
    fn tenant(command: &Self::Command) -> &str;
    fn name(command: &Self::Command) -> &'static str;
    /// The HTTP answer to a refused command.
    fn refusal(error: Self::Error) -> ApiError;
    /// The HTTP answer for a stream that does not exist for the caller's tenant.
    fn not_found() -> ApiError;
}

impl Stream for Account {
    fn belongs_to(&self, tenant: &str) -> bool {
        Account::belongs_to(self, tenant)
    }

    fn starts(command: &AccountCommand) -> bool {
        matches!(command, AccountCommand::Open { .. })
    }

    fn tenant(command: &AccountCommand) -> &str {
        command.tenant()
    }

    fn name(command: &AccountCommand) -> &'static str {
        command.name()
    }

    fn refusal(error: AccountError) -> ApiError {
        match error {
            AccountError::NotFound => ApiError::NotFound,
            rule => ApiError::Rule(rule),
        }
    }

    fn not_found() -> ApiError {
        ApiError::NotFound
    }
}

impl Stream for Transfer {
    fn belongs_to(&self, tenant: &str) -> bool {
        Transfer::belongs_to(self, tenant)
    }

    fn starts(command: &TransferCommand) -> bool {
        matches!(command, TransferCommand::Request(_))
    }

    fn tenant(command: &TransferCommand) -> &str {
        command.tenant()
    }

    fn name(command: &TransferCommand) -> &'static str {
        command.name()
    }

    fn refusal(error: TransferError) -> ApiError {
        match error {
            TransferError::NotFound => ApiError::TransferNotFound,
            rule => ApiError::TransferRule(rule),
        }
    }

    fn not_found() -> ApiError {
        ApiError::TransferNotFound
    }
}

/// Executes commands against the event store.
pub(crate) struct CommandService {
    pool: PgPool,
    accounts: Store<Account>,
    transfers: Store<Transfer>,
    conflict_retries: u32,
    /// Wakes the relay after each append.
    appended: AppendSignal,
}

impl CommandService {
    pub(crate) fn new(
        pool: PgPool,
        cache_capacity: NonZeroUsize,
        conflict_retries: u32,
        append_writers: NonZeroUsize,
        appended: AppendSignal,
    ) -> Self {
        let appender = Appender::start(pool.clone(), append_writers.get());
        Self {
            accounts: Store::new(pool.clone(), appender.clone(), cache_capacity),
            transfers: Store::new(pool.clone(), appender, cache_capacity),
            pool,
            conflict_retries,
            appended,
        }
    }

    pub(crate) async fn account(
        &self,
        context: &CommandContext,
        target: Target,
        command: AccountCommand,
        expected_version: Option<u64>,
    ) -> Result<Committed, ApiError> {
        self.execute(&self.accounts, context, target, command, expected_version)
            .await
    }

    pub(crate) async fn transfer(
        &self,
        context: &CommandContext,
        target: Target,
        command: TransferCommand,
    ) -> Result<Committed, ApiError> {
        self.execute(&self.transfers, context, target, command, None)
            .await
    }

    /// True if account `id` exists and belongs to `tenant`. An account never changes hands or
    /// disappears, so a cached one that does is the answer without asking the database.
    pub(crate) async fn account_belongs_to(
        &self,
        id: Uuid,
        tenant: &str,
    ) -> Result<bool, ApiError> {
        {
            let slot = self.accounts.lock(&id.to_string()).await;
            if slot
                .as_ref()
                .is_some_and(|cached| cached.state.belongs_to(tenant))
            {
                return Ok(true);
            }
        }
        Ok(self
            .latest(&self.accounts, id)
            .await?
            .state
            .belongs_to(tenant))
    }

    /// What became of `step` of `transfer_id` on account `id`, as far as this process knows:
    /// after it took the step itself, that is the step's outcome.
    pub(crate) async fn step_outcome(
        &self,
        id: Uuid,
        transfer_id: Uuid,
        step: TransferStep,
    ) -> Result<Option<StepOutcome>, ApiError> {
        let account = self.known(&self.accounts, id).await?;
        Ok(account
            .state
            .state()
            .and_then(|open| open.step_outcome(transfer_id, step)))
    }

    /// The transfer as far as this process knows. It may be behind another process's writes:
    /// acting on it then repeats a step, which the accounts and the transfer answer without
    /// change, so it costs work, never correctness, and saves a query per step.
    pub(crate) async fn transfer_state(&self, id: Uuid) -> Result<Versioned<Transfer>, ApiError> {
        self.known(&self.transfers, id).await
    }

    /// A stream's cached state, or its state loaded from the store if none is cached.
    async fn known<A: Stream>(&self, store: &Store<A>, id: Uuid) -> Result<Versioned<A>, ApiError> {
        let aggregate_id = id.to_string();
        let mut slot = store.lock(&aggregate_id).await;
        if let Some(cached) = slot.as_ref() {
            return Ok(cached.clone());
        }
        let state = store.load(&aggregate_id).await?;
        *slot = Some(state.clone());
        Ok(state)
    }

    /// A stream's state, brought up to date with the store (the cache may be behind another
    /// replica's writes) and cached again.
    async fn latest<A: Stream>(
        &self,
        store: &Store<A>,
        id: Uuid,
    ) -> Result<Versioned<A>, ApiError> {
        let aggregate_id = id.to_string();
        let mut slot = store.lock(&aggregate_id).await;
        let state = match slot.take() {
            Some(mut cached) => {
                store.catch_up(&aggregate_id, &mut cached).await?;
                cached
            }
            None => store.load(&aggregate_id).await?,
        };
        *slot = Some(state.clone());
        Ok(state)
    }

    /// Runs `command` on `target` and counts its outcome in `ledger_commands_total`.
    #[tracing::instrument(skip_all, fields(aggregate = A::TYPE, command = A::name(&command), id = %target.id()))]
    async fn execute<A: Stream>(
        &self,
        store: &Store<A>,
        context: &CommandContext,
        target: Target,
        command: A::Command,
        expected_version: Option<u64>,
    ) -> Result<Committed, ApiError> {
        let name = A::name(&command);
        let result = self
            .decide_and_append(store, context, target, command, expected_version)
            .await;
        let outcome = match &result {
            Ok(_) => "accepted",
            Err(ApiError::Conflict { .. }) => "conflict",
            Err(ApiError::Unavailable(_) | ApiError::Internal(_)) => "error",
            Err(_) => "rejected",
        };
        metrics::counter!("ledger_commands_total", "command" => name, "outcome" => outcome)
            .increment(1);
        result
    }

    /// With `expected_version` (from `If-Match`) the command only applies to that version;
    /// without it, a lost race is retried on fresh state.
    async fn decide_and_append<A: Stream>(
        &self,
        store: &Store<A>,
        context: &CommandContext,
        target: Target,
        command: A::Command,
        expected_version: Option<u64>,
    ) -> Result<Committed, ApiError> {
        let aggregate_id = target.id().to_string();
        let metadata = context.metadata();
        let mut last_seen = None;
        for attempt in 0..=self.conflict_retries {
            if let Some(replay) = self.replay(context).await? {
                return Ok(replay);
            }
            let mut slot = store.lock(&aggregate_id).await;
            let fresh = slot.is_none();
            let mut state = match slot.take() {
                Some(cached) => cached,
                None if matches!(target, Target::New(_)) => Versioned::default(),
                None => store.load(&aggregate_id).await?,
            };
            let mut decision = decide(&state, &command, expected_version).await;
            if decision.is_err() && !fresh {
                // A refusal may come from state another replica has since changed: only a
                // refusal on the latest state is final.
                store.catch_up(&aggregate_id, &mut state).await?;
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
            if events.is_empty() {
                // Nothing to record (a step already taken): no append, no new version.
                *slot = Some(next);
                return Ok(Committed {
                    stream_id: target.id(),
                    version: current_version,
                    replayed: false,
                });
            }
            match store
                .append(&aggregate_id, current_version, &events, &metadata)
                .await
            {
                Ok(()) => {
                    self.appended.appended();
                    let version = next.version;
                    *slot = Some(next);
                    return Ok(Committed {
                        stream_id: target.id(),
                        version,
                        replayed: false,
                    });
                }
                Err(AppendError::StreamConflict) => {
                    tracing::debug!(attempt, "lost a race on the stream, retrying");
                    store.catch_up(&aggregate_id, &mut state).await?;
                    last_seen = Some(state.version);
                    *slot = Some(state);
                }
                Err(AppendError::IdempotencyKeyTaken) => {
                    // The racing request committed: the next attempt replays its outcome.
                    *slot = Some(state);
                }
                Err(err @ (AppendError::Database(_) | AppendError::WriterStopped)) => {
                    return Err(err.into());
                }
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
        let Some(earlier) =
            find_idempotency_key(&self.pool, &context.tenant, &idempotency.key).await?
        else {
            return Ok(None);
        };
        if earlier.request_hash.as_deref() != Some(idempotency.request_hash.as_str()) {
            return Err(ApiError::IdempotencyKeyReused);
        }
        let stream_id = earlier.aggregate_id.parse().map_err(|_| {
            ApiError::Internal(anyhow::anyhow!(
                "idempotent event has a non-uuid aggregate id"
            ))
        })?;
        Ok(Some(Committed {
            stream_id,
            version: earlier.sequence,
            replayed: true,
        }))
    }
}

/// The aggregate's decision on `state`: the next state and the events that lead to it.
async fn decide<A: Stream>(
    state: &Versioned<A>,
    command: &A::Command,
    expected_version: Option<u64>,
) -> Result<(Versioned<A>, Vec<A::Event>), ApiError> {
    if !A::starts(command) && !state.state.belongs_to(A::tenant(command)) {
        // Before the version check, so other tenants learn nothing, not even a version.
        return Err(A::not_found());
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
    next.state
        .handle(command.clone(), &(), &sink)
        .await
        .map_err(A::refusal)?;
    let events = sink.collect().await;
    next.version += events.len() as u64;
    Ok((next, events))
}
