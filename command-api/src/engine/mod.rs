//! The command engine: runs `Account` and `Transfer` commands against the event store. It knows
//! nothing of HTTP; the command API's handlers and the transfer process manager both drive it,
//! and each maps its [`CommandError`] in its own terms.
//!
//! # Layout (imports run down this list, never up)
//! - this module: [`CommandService`], one command end to end (idempotent replay, retries after
//!   a lost race, the outcome metric).
//! - `stream`: one stream in this process: the waiting commands, the groups that decide and
//!   append them together, the cache of stream states.
//! - `store`: reading and folding streams, and handing appends to `append`.
//! - `append`: group commit, many streams' appends in one INSERT and one transaction.
//! - `signal`: how an append wakes the relay. `error`: [`CommandError`].

use std::num::{NonZeroU64, NonZeroUsize};
use std::sync::{Arc, Mutex};

use domain::{Account, AccountCommand, AccountEvent, Currency, Transfer, TransferCommand};
use lru::LruCache;
use serde::Serialize;
use service_kit::db::kept::KeptConnections;
use sqlx::PgPool;
use uuid::Uuid;

mod append;
mod error;
mod signal;
mod store;
mod stream;

pub(crate) use error::CommandError;
pub use signal::AppendSignal;
pub(crate) use store::Versioned;

use append::Appender;
use store::{Store, find_idempotency_key};
use stream::{Answer, Request, Stream, Streams};

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
#[derive(Debug)]
pub(crate) struct Committed<E> {
    pub(crate) stream_id: Uuid,
    /// The stream version after the command.
    pub(crate) version: u64,
    /// What the command decided: the events it appended. Empty for a replay, whose events
    /// were appended by the earlier request.
    pub(crate) events: Vec<E>,
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

/// What never changes about an open account, so it may be cached without its stream's lock.
#[derive(Debug, Clone)]
struct AccountFacts {
    tenant: String,
    currency: Currency,
}

/// How the engine runs commands, in the command API and the process manager alike (read from
/// the environment by `crate::config`).
#[derive(Debug, Clone)]
pub struct EngineConfig {
    /// `COMMAND_API_AGGREGATE_CACHE`: streams whose state is kept in memory between
    /// commands, per aggregate type.
    pub aggregate_cache: NonZeroUsize,
    /// `COMMAND_API_AGGREGATE_CACHE_BYTES`: the memory those states may take, per aggregate
    /// type, each counted at its largest (see `stream::cache_capacity`).
    pub aggregate_cache_bytes: NonZeroUsize,
    /// `COMMAND_API_CONFLICT_RETRIES`: how often a command without `If-Match` is retried
    /// after losing a race on its stream before answering 409.
    pub conflict_retries: u32,
    /// `COMMAND_API_APPEND_WRITERS`: batches of appends in flight at once.
    pub append_writers: NonZeroUsize,
    /// `COMMAND_API_SNAPSHOT_EVERY`: events between two snapshots of a stream.
    pub snapshot_every: NonZeroU64,
}

/// Executes commands against the event store.
pub(crate) struct CommandService {
    pool: PgPool,
    accounts: Arc<Streams<Account>>,
    transfers: Arc<Streams<Transfer>>,
    /// Tenant and currency of recently named accounts: only accounts that exist enter.
    facts: Mutex<LruCache<Uuid, AccountFacts>>,
    conflict_retries: u32,
    append_connections: KeptConnections,
}

impl CommandService {
    pub(crate) fn new(pool: PgPool, config: &EngineConfig, appended: AppendSignal) -> Self {
        let appender = Appender::start(pool.clone(), config.append_writers.get());
        let accounts = Streams::new(
            Store::new(pool.clone(), appender.clone(), config.snapshot_every),
            config,
            appended.clone(),
        );
        // At most one entry per cached account, and far smaller than the account's.
        let facts = LruCache::new(accounts.capacity());
        let append_connections = appender.connections().clone();
        Self {
            accounts: Arc::new(accounts),
            transfers: Arc::new(Streams::new(
                Store::new(pool.clone(), appender, config.snapshot_every),
                config,
                appended,
            )),
            facts: Mutex::new(facts),
            pool,
            conflict_retries: config.conflict_retries,
            append_connections,
        }
    }

    /// The connections the append writers keep out of the pool, for its gauges.
    pub(crate) fn append_connections(&self) -> KeptConnections {
        self.append_connections.clone()
    }

    pub(crate) async fn account(
        &self,
        context: &CommandContext,
        target: Target,
        command: AccountCommand,
        expected_version: Option<u64>,
    ) -> Result<Committed<AccountEvent>, CommandError> {
        self.execute(&self.accounts, context, target, command, expected_version)
            .await
    }

    pub(crate) async fn transfer(
        &self,
        context: &CommandContext,
        target: Target,
        command: TransferCommand,
    ) -> Result<Committed<domain::TransferEvent>, CommandError> {
        self.execute(&self.transfers, context, target, command, None)
            .await
    }

    /// The currency of account `id` if it exists and belongs to `tenant`, else `None`. Read
    /// from the account's first event, not its state, so that it never waits for the
    /// account's stream lock behind a busy account's commands; an account never changes hands
    /// or currency, so the answer is cached.
    pub(crate) async fn account_currency(
        &self,
        id: Uuid,
        tenant: &str,
    ) -> Result<Option<Currency>, CommandError> {
        let cached = self
            .facts
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .get(&id)
            .cloned();
        let facts = match cached {
            Some(facts) => facts,
            None => {
                let Some(AccountEvent::AccountOpened {
                    tenant, currency, ..
                }) = self.accounts.store().first_event(&id.to_string()).await?
                else {
                    return Ok(None);
                };
                let facts = AccountFacts { tenant, currency };
                self.facts
                    .lock()
                    .unwrap_or_else(|poisoned| poisoned.into_inner())
                    .put(id, facts.clone());
                facts
            }
        };
        Ok((facts.tenant == tenant).then_some(facts.currency))
    }

    /// The transfer as far as this process knows. It may be behind another process's writes:
    /// acting on it then repeats a step, which the accounts and the transfer answer without
    /// change, so it costs work, never correctness, and saves a query per step.
    pub(crate) async fn transfer_state(
        &self,
        id: Uuid,
    ) -> Result<Versioned<Transfer>, CommandError> {
        self.transfers.known(id).await
    }

    /// Runs `command` on `target` and counts its outcome in `ledger_commands_total`. With
    /// `expected_version` (from `If-Match`) the command only applies to that version; without
    /// it, a lost race is retried on fresh state.
    #[tracing::instrument(skip_all, fields(aggregate = A::TYPE, command = A::name(&command), id = %target.id()))]
    async fn execute<A: Stream>(
        &self,
        streams: &Arc<Streams<A>>,
        context: &CommandContext,
        target: Target,
        command: A::Command,
        expected_version: Option<u64>,
    ) -> Result<Committed<A::Event>, CommandError> {
        let metadata = context.metadata();
        let request = Request {
            command: &command,
            expected_version,
            metadata: &metadata,
            key: context.idempotency.as_ref().map(|i| i.key.as_str()),
            new: matches!(target, Target::New(_)),
        };
        let result = async {
            let mut last_seen = None;
            for _attempt in 0..=self.conflict_retries {
                if let Some(replay) = self.replay(context).await? {
                    return Ok(replay);
                }
                match streams.take_turn(target.id(), request.clone()).await? {
                    Answer::Done(result) => {
                        return result.map(|appended| Committed {
                            stream_id: target.id(),
                            version: appended.version,
                            events: appended.events,
                            replayed: false,
                        });
                    }
                    Answer::Retry { current_version } => {
                        tracing::debug!("lost a race on the stream, retrying");
                        last_seen = current_version.or(last_seen);
                    }
                }
            }
            Err(CommandError::Conflict {
                current_version: last_seen,
            })
        }
        .await;
        let outcome = result
            .as_ref()
            .map_or_else(CommandError::outcome, |_| "accepted");
        metrics::counter!("ledger_commands_total", "command" => A::name(&command), "outcome" => outcome)
            .increment(1);
        result
    }

    /// The stored outcome of an earlier request with the same idempotency key, if any.
    pub(crate) async fn replay<E>(
        &self,
        context: &CommandContext,
    ) -> Result<Option<Committed<E>>, CommandError> {
        let Some(idempotency) = &context.idempotency else {
            return Ok(None);
        };
        let Some(earlier) =
            find_idempotency_key(&self.pool, &context.tenant, &idempotency.key).await?
        else {
            return Ok(None);
        };
        if earlier.request_hash.as_deref() != Some(idempotency.request_hash.as_str()) {
            return Err(CommandError::IdempotencyKeyReused);
        }
        let stream_id = earlier.aggregate_id.parse().map_err(|_| {
            CommandError::Internal(anyhow::anyhow!(
                "idempotent event has a non-uuid aggregate id"
            ))
        })?;
        Ok(Some(Committed {
            stream_id,
            version: earlier.sequence,
            events: Vec::new(),
            replayed: true,
        }))
    }
}
