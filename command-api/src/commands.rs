//! Running commands on a stream (an account or a transfer): idempotency, optimistic
//! concurrency and bounded retries around the aggregate's decision, and the groups in which
//! commands waiting for one stream are decided and appended together.

use std::num::NonZeroUsize;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use cqrs_es::Aggregate;
use cqrs_es::event_sink::EventSink;
use domain::{
    Account, AccountCommand, AccountError, Currency, StepOutcome, StoredEvent, Transfer,
    TransferCommand, TransferError, TransferStep,
};
use serde::Serialize;
use sqlx::PgPool;
use tokio::sync::{OwnedMutexGuard, oneshot};
use tracing::Instrument;
use uuid::Uuid;

use crate::append::{AppendError, Appender, EventRow};
use crate::error::ApiError;
use crate::relay::AppendSignal;
use crate::store::{Slot, Store, Versioned, event_row, find_idempotency_key};

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
    Aggregate<Services = (), Command: Clone + Send + Sync, Event: StoredEvent>
    + Default
    + Clone
    + 'static
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
    accounts: Arc<Store<Account>>,
    transfers: Arc<Store<Transfer>>,
    /// Tells a command's entry among its stream's waiters from the others'.
    tickets: AtomicU64,
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
            accounts: Arc::new(Store::new(pool.clone(), appender.clone(), cache_capacity)),
            transfers: Arc::new(Store::new(pool.clone(), appender, cache_capacity)),
            tickets: AtomicU64::new(0),
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

    /// The currency of account `id` if it exists and belongs to `tenant`, else `None`. An
    /// account never changes hands or currency, so a cached state answers without asking the
    /// database.
    pub(crate) async fn account_currency(
        &self,
        id: Uuid,
        tenant: &str,
    ) -> Result<Option<Currency>, ApiError> {
        let currency_for = |account: &Account| {
            account
                .state()
                .filter(|open| open.tenant == tenant)
                .map(|open| open.currency)
        };
        {
            let slot = self.accounts.lock(&id.to_string()).await;
            if let Some(currency) = slot.as_ref().and_then(|cached| currency_for(&cached.state)) {
                return Ok(Some(currency));
            }
        }
        Ok(currency_for(&self.latest(&self.accounts, id).await?.state))
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
        store: &Arc<Store<A>>,
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
    ///
    /// Commands on one stream run in groups: the command that gets the stream's lock takes
    /// every command waiting for it, decides them in turn and appends all their events at once
    /// (see `run_group`). On a busy stream that is one commit for many commands instead of one
    /// each, since a stream's next append may only start once the last one has committed.
    async fn decide_and_append<A: Stream>(
        &self,
        store: &Arc<Store<A>>,
        context: &CommandContext,
        target: Target,
        command: A::Command,
        expected_version: Option<u64>,
    ) -> Result<Committed, ApiError> {
        let aggregate_id = target.id().to_string();
        let metadata = context.metadata();
        let key = context.idempotency.as_ref().map(|i| i.key.clone());
        let mut last_seen = None;
        for _attempt in 0..=self.conflict_retries {
            if let Some(replay) = self.replay(context).await? {
                return Ok(replay);
            }
            let stream = store.stream(&aggregate_id);
            let (answer, mut answered) = oneshot::channel();
            let ticket = self.tickets.fetch_add(1, Ordering::Relaxed);
            stream.waiting().push(Waiter {
                ticket,
                command: command.clone(),
                expected_version,
                metadata: metadata.clone(),
                key: key.clone(),
                answer,
            });
            // A group answers every waiter it took before it lets go of the lock, so a waiter
            // either is answered or gets the lock with its own entry still queued.
            let answer = tokio::select! {
                biased;
                answer = &mut answered => answer,
                mut slot = stream.slot.clone().lock_owned() => {
                    let (state, fresh) = match slot.take() {
                        Some(cached) => (cached, false),
                        None if matches!(target, Target::New(_)) => (Versioned::default(), true),
                        None => match store.load(&aggregate_id).await {
                            Ok(loaded) => (loaded, true),
                            Err(err) => {
                                // Only this command fails; the next waiter loads for itself.
                                stream.waiting().retain(|waiter| waiter.ticket != ticket);
                                return Err(err.into());
                            }
                        },
                    };
                    let waiters = std::mem::take(&mut *stream.waiting());
                    let alone = matches!(waiters.as_slice(), [only] if only.ticket == ticket);
                    let group = run_group(Group {
                        store: store.clone(),
                        appended: self.appended.clone(),
                        slot,
                        aggregate_id: aggregate_id.clone(),
                        stream_id: target.id(),
                        state,
                        fresh,
                        waiters,
                    });
                    if alone {
                        group.await;
                    } else {
                        // Spawned, so that a client hanging up cannot cancel the others'
                        // commands half way through.
                        tokio::spawn(group.in_current_span());
                    }
                    answered.await
                }
            };
            match answer {
                Ok(Answer::Done(result)) => return result,
                Ok(Answer::Retry { current_version }) => {
                    tracing::debug!("lost a race on the stream, retrying");
                    last_seen = current_version.or(last_seen);
                }
                Err(_) => {
                    return Err(ApiError::Internal(anyhow::anyhow!(
                        "the command's group stopped without answering"
                    )));
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

/// A command waiting for its stream.
pub(crate) struct Waiter<A: Aggregate> {
    ticket: u64,
    command: A::Command,
    expected_version: Option<u64>,
    metadata: String,
    key: Option<String>,
    answer: oneshot::Sender<Answer>,
}

enum Answer {
    Done(Result<Committed, ApiError>),
    /// The group lost a race (another replica wrote, or spent an idempotency key): run the
    /// command again, from the replay check.
    Retry {
        current_version: Option<u64>,
    },
}

/// Commands on one stream, decided and appended together while its lock is held.
struct Group<A: Stream> {
    store: Arc<Store<A>>,
    appended: AppendSignal,
    slot: OwnedMutexGuard<Slot<A>>,
    aggregate_id: String,
    stream_id: Uuid,
    state: Versioned<A>,
    /// True if `state` was just read from the store rather than cached.
    fresh: bool,
    waiters: Vec<Waiter<A>>,
}

/// The group's decisions on one starting state.
struct Decided<A: Aggregate> {
    next: Versioned<A>,
    rows: Vec<EventRow>,
    /// Each waiter's outcome if the rows commit: the stream version after its command.
    outcomes: Vec<Result<u64, ApiError>>,
}

async fn run_group<A: Stream>(group: Group<A>) {
    let Group {
        store,
        appended,
        mut slot,
        aggregate_id,
        stream_id,
        mut state,
        fresh,
        waiters,
    } = group;
    let waiters = answer_foreign(&state, waiters);
    // One key twice in one append would fail it as a whole: a repeat runs again instead, and
    // its replay check finds what the first one did. Keys are per tenant, as the store's
    // unique index is. Waiters whose request is gone are dropped: they have nobody to answer.
    let mut keys = std::collections::HashSet::new();
    let (waiters, repeats): (Vec<_>, Vec<_>) = waiters
        .into_iter()
        .filter(|waiter| !waiter.answer.is_closed())
        .partition(|waiter| {
            waiter
                .key
                .as_ref()
                .is_none_or(|key| keys.insert((A::tenant(&waiter.command).to_owned(), key.clone())))
        });
    retry(repeats, None);

    let mut decided = decide_group(&state, &waiters).await;
    if !fresh && decided.outcomes.iter().any(Result::is_err) {
        // A refusal may come from state another replica has since changed: only a refusal on
        // the latest state is final.
        if let Err(err) = store.catch_up(&aggregate_id, &mut state).await {
            return fail(waiters, err.into());
        }
        decided = decide_group(&state, &waiters).await;
    }
    let Decided {
        next,
        rows,
        outcomes,
    } = decided;
    if !rows.is_empty() {
        match store.append(&aggregate_id, state.version, rows).await {
            Ok(()) => appended.appended(),
            Err(AppendError::StreamConflict) => {
                if let Err(err) = store.catch_up(&aggregate_id, &mut state).await {
                    return fail(waiters, err.into());
                }
                // The stream may have come into being since the group began (a stale empty
                // cache): only its own tenant's commands learn its version.
                let waiters = answer_foreign(&state, waiters);
                let current_version = Some(state.version);
                *slot = Some(state);
                return retry(waiters, current_version);
            }
            Err(AppendError::IdempotencyKeyTaken) => {
                *slot = Some(state);
                return retry(waiters, None);
            }
            Err(err) => return fail(waiters, err.into()),
        }
    }
    *slot = Some(next);
    for (waiter, outcome) in waiters.into_iter().zip(outcomes) {
        let result = outcome.map(|version| Committed {
            stream_id,
            version,
            replayed: false,
        });
        let _ = waiter.answer.send(Answer::Done(result));
    }
    // Only now is the stream unlocked (as `slot` drops): see `decide_and_append`.
}

/// Answers "not found" now to the waiters of another tenant than the existing stream's and
/// returns the rest. A stream never changes tenant, so that answer is final whatever becomes of
/// the group's append; retried with the others after a lost race, such a command would end in
/// a 409 naming the stream's version.
fn answer_foreign<A: Stream>(state: &Versioned<A>, waiters: Vec<Waiter<A>>) -> Vec<Waiter<A>> {
    let exists = state.version > 0;
    let (own, foreign): (Vec<_>, Vec<_>) = waiters.into_iter().partition(|waiter| {
        !exists || A::starts(&waiter.command) || state.state.belongs_to(A::tenant(&waiter.command))
    });
    for waiter in foreign {
        let _ = waiter.answer.send(Answer::Done(Err(A::not_found())));
    }
    own
}

/// Decides each waiter's command on the state its predecessors in the group left.
async fn decide_group<A: Stream>(state: &Versioned<A>, waiters: &[Waiter<A>]) -> Decided<A> {
    let mut next = state.clone();
    let mut rows = Vec::new();
    let mut outcomes = Vec::with_capacity(waiters.len());
    for waiter in waiters {
        let outcome = match decide(&next, &waiter.command, waiter.expected_version).await {
            Ok((after, events)) => events
                .iter()
                .map(|event| event_row(event, &waiter.metadata))
                .collect::<Result<Vec<_>, _>>()
                .map(|mut events| {
                    rows.append(&mut events);
                    next = after;
                    next.version
                })
                .map_err(ApiError::from),
            Err(err) => Err(err),
        };
        outcomes.push(outcome);
    }
    Decided {
        next,
        rows,
        outcomes,
    }
}

fn retry<A: Aggregate>(waiters: Vec<Waiter<A>>, current_version: Option<u64>) {
    for waiter in waiters {
        let _ = waiter.answer.send(Answer::Retry { current_version });
    }
}

/// The store failed the whole group: every command gets the failure.
fn fail<A: Aggregate>(waiters: Vec<Waiter<A>>, err: ApiError) {
    for waiter in waiters {
        let _ = waiter.answer.send(Answer::Done(Err(err.duplicate())));
    }
}

#[cfg(test)]
mod tests {
    use std::num::NonZeroUsize;

    use domain::{Amount, Currency, OverdraftLimit, Owner};
    use service_kit::testing::TestDatabase;

    use super::*;

    fn deposit() -> AccountCommand {
        AccountCommand::Deposit {
            tenant: "acme".into(),
            amount: Amount::parse(5).unwrap(),
            currency: Currency::parse("EUR").unwrap(),
        }
    }

    fn deposit_of(tenant: &str) -> AccountCommand {
        AccountCommand::Deposit {
            tenant: tenant.into(),
            amount: Amount::parse(5).unwrap(),
            currency: Currency::parse("EUR").unwrap(),
        }
    }

    fn waiter(
        command: AccountCommand,
        key: Option<&str>,
    ) -> (Waiter<Account>, oneshot::Receiver<Answer>) {
        let (answer, answered) = oneshot::channel();
        let tenant = command.tenant().to_owned();
        let waiter = Waiter {
            ticket: 0,
            command,
            expected_version: None,
            metadata: serde_json::json!({"tenant": tenant, "idempotency_key": key}).to_string(),
            key: key.map(str::to_owned),
            answer,
        };
        (waiter, answered)
    }

    /// What `waiter` was told, within a bound: a waiter nobody answers fails the test.
    async fn answer(answered: oneshot::Receiver<Answer>) -> Answer {
        tokio::time::timeout(std::time::Duration::from_secs(5), answered)
            .await
            .expect("the waiter is answered")
            .expect("the group answers rather than dropping the waiter")
    }

    /// Runs `waiters` as one group on `id`, as the command that took the stream's lock would.
    async fn run(store: &Arc<Store<Account>>, id: Uuid, waiters: Vec<Waiter<Account>>) {
        let mut slot = store.lock(&id.to_string()).await;
        let state = slot.take().unwrap_or_default();
        run_group(Group {
            store: store.clone(),
            appended: AppendSignal::default(),
            slot,
            aggregate_id: id.to_string(),
            stream_id: id,
            state,
            fresh: true,
            waiters,
        })
        .await;
    }

    /// Opens account `id` for tenant `acme` through a group of its own.
    async fn open(store: &Arc<Store<Account>>, id: Uuid) {
        let (open, opened) = waiter(
            AccountCommand::Open {
                tenant: "acme".into(),
                owner: Owner::parse("Ada").unwrap(),
                currency: Currency::parse("EUR").unwrap(),
                overdraft_limit: OverdraftLimit::parse(0).unwrap(),
            },
            None,
        );
        run(store, id, vec![open]).await;
        assert!(matches!(
            answer(opened).await,
            Answer::Done(Ok(Committed { version: 1, .. }))
        ));
    }

    fn store(db: &TestDatabase) -> Arc<Store<Account>> {
        let appender = Appender::start(db.pool.clone(), 1);
        Arc::new(Store::<Account>::new(
            db.pool.clone(),
            appender,
            NonZeroUsize::new(10).unwrap(),
        ))
    }

    /// A group that loses its race is told to run again, but never another tenant's command
    /// in it: that one is "not found", final, and learns no version.
    #[tokio::test]
    async fn another_tenants_command_in_a_group_that_loses_a_race_is_not_found() {
        let db = TestDatabase::create().await;
        let store = store(&db);
        let id = Uuid::new_v4();
        open(&store, id).await;
        // The group decides on a stale state: another replica appended version 2 since.
        let mut slot = store.lock(&id.to_string()).await;
        let stale = slot.take().unwrap();
        sqlx::query(
            r#"INSERT INTO events (aggregate_type, aggregate_id, sequence, event_type, event_version, payload, metadata)
               VALUES ('account', $1, 2, 'AccountFrozen', '1', '"AccountFrozen"',
                       '{"tenant":"acme","actor":"t","correlation_id":"c","causation_id":"c","request_id":"r"}')"#,
        )
        .bind(id.to_string())
        .execute(&db.pool)
        .await
        .unwrap();
        let (own, own_answer) = waiter(deposit(), None);
        let (foreign, foreign_answer) = waiter(deposit_of("globex"), None);
        run_group(Group {
            store: store.clone(),
            appended: AppendSignal::default(),
            slot,
            aggregate_id: id.to_string(),
            stream_id: id,
            state: stale,
            fresh: true,
            waiters: vec![own, foreign],
        })
        .await;
        assert!(matches!(
            answer(own_answer).await,
            Answer::Retry {
                current_version: Some(2)
            }
        ));
        match answer(foreign_answer).await {
            Answer::Done(Err(err)) => assert!(matches!(err, ApiError::NotFound), "{err:?}"),
            _ => panic!("another tenant's command was told to retry"),
        }
    }

    /// The same idempotency key from two tenants is two keys: in one group, neither is
    /// taken for a repeat of the other.
    #[tokio::test]
    async fn one_key_of_two_tenants_is_two_keys() {
        let db = TestDatabase::create().await;
        let store = store(&db);
        let id = Uuid::new_v4();
        let opening = |tenant: &str| AccountCommand::Open {
            tenant: tenant.into(),
            owner: Owner::parse("Ada").unwrap(),
            currency: Currency::parse("EUR").unwrap(),
            overdraft_limit: OverdraftLimit::parse(0).unwrap(),
        };
        let (acme, acme_answer) = waiter(opening("acme"), Some("k"));
        let (globex, globex_answer) = waiter(opening("globex"), Some("k"));
        run(&store, id, vec![acme, globex]).await;
        assert!(matches!(
            answer(acme_answer).await,
            Answer::Done(Ok(Committed { version: 1, .. }))
        ));
        // Decided in the group (the account is taken), not sent round again as a repeat.
        assert!(matches!(answer(globex_answer).await, Answer::Done(Err(_))));
    }

    #[tokio::test]
    async fn a_repeated_idempotency_key_in_a_group_runs_again_and_the_rest_commit() {
        let db = TestDatabase::create().await;
        let store = store(&db);
        let id = Uuid::new_v4();
        open(&store, id).await;

        let (first, first_answer) = waiter(deposit(), Some("k"));
        let (repeat, repeat_answer) = waiter(deposit(), Some("k"));
        let (other, other_answer) = waiter(deposit(), None);
        run(&store, id, vec![first, repeat, other]).await;
        assert!(matches!(
            answer(first_answer).await,
            Answer::Done(Ok(Committed { version: 2, .. }))
        ));
        assert!(matches!(answer(repeat_answer).await, Answer::Retry { .. }));
        assert!(matches!(
            answer(other_answer).await,
            Answer::Done(Ok(Committed { version: 3, .. }))
        ));
        let stored: i64 = sqlx::query_scalar("SELECT count(*) FROM events")
            .fetch_one(&db.pool)
            .await
            .unwrap();
        assert_eq!(stored, 3);
    }
}
