//! One stream in this process: its cached state, the commands waiting for it, and the groups
//! in which those commands are decided and appended together.
//!
//! Commands for one stream take turns in this process under a per-stream async lock. The
//! command that gets the lock takes every command waiting for it, decides them in turn and
//! appends all their events at once (`run_group`): on a busy stream that is one commit for
//! many commands instead of one each, since a stream's next append may only start once the last
//! one has committed. The state each group leaves behind is kept (bounded, least recently
//! used), so a command on a cached stream costs no read, only its rows in the next batched
//! INSERT (see `append`). The cache is never trusted for correctness: the insert names the next
//! sequence number, so a stale state (another replica wrote meanwhile) fails on the primary key
//! and the command is retried on fresh state.
//!
//! Ordering rule of the event log (docs/ARCHITECTURE.md): a transaction may only write to a
//! stream after the version it builds on has committed. Both the load and the cache respect
//! that: a state is cached only after its insert committed, and the stream stays locked until
//! then.

use std::num::NonZeroUsize;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use cqrs_es::Aggregate;
use cqrs_es::event_sink::EventSink;
use domain::{
    Account, AccountCommand, AccountError, History, RecordedSteps, StoredEvent, Transfer,
    TransferCommand, TransferError,
};
use lru::LruCache;
use tokio::sync::{Mutex as AsyncMutex, OwnedMutexGuard, oneshot};
use tracing::Instrument;
use uuid::Uuid;

use service_kit::auth::MAX_TENANT_BYTES;

use super::EngineConfig;
use super::append::{AppendError, EventRow};
use super::error::CommandError;
use super::signal::AppendSignal;
use super::store::{LoadError, Store, Versioned, event_row};

/// What running commands needs to know of an aggregate beyond cqrs-es's trait.
pub(crate) trait Stream:
    History<Command: Clone + Send + Sync, Event: StoredEvent, Error: Into<CommandError>>
    + Default
    + Clone
    + 'static
{
    /// The record in the stream's history that deciding `command` needs and the state does
    /// not keep (see `domain::history`): for a transfer step, the transfer's steps so far.
    fn needs(command: &Self::Command) -> Option<Uuid>;

    /// The records `keys` name, read from the store once per group, under the stream's lock.
    fn look_up(
        store: &Store<Self>,
        aggregate_id: &str,
        keys: Vec<Uuid>,
    ) -> impl Future<Output = Result<Self::Services, LoadError>> + Send;

    /// True if the stream exists and belongs to `tenant`.
    fn belongs_to(&self, tenant: &str) -> bool;
    /// True for the command that starts a stream.
    fn starts(command: &Self::Command) -> bool;
    fn tenant(command: &Self::Command) -> &str;
    fn name(command: &Self::Command) -> &'static str;
    /// The refusal for a stream that does not exist for the caller's tenant.
    fn not_found() -> Self::Error;

    /// The most heap memory one state can hold: each of its strings at the longest the edge
    /// and the domain accept (four bytes a character). With the fixed sizes of a cache entry
    /// it bounds the cache's memory (see [`cache_capacity`]).
    const MAX_STATE_HEAP_BYTES: usize;
}

/// The most memory one cached stream takes: its id (36 characters), the LRU's node and table
/// slot for it, the shared handle with its state, and the state's strings at their longest.
/// The waiting list is not counted: it is empty between groups and gives its memory back.
fn entry_bytes<A: Stream>() -> usize {
    use std::mem::size_of;
    let word = size_of::<usize>();
    let lru_node = size_of::<String>() + size_of::<Arc<StreamHandle<A>>>() + 2 * word;
    let lru_slot = 2 * word + 1;
    let handle = 2 * word + size_of::<StreamHandle<A>>();
    let slot = 2 * word + size_of::<AsyncMutex<Slot<A>>>();
    36 + lru_node + lru_slot + handle + slot + A::MAX_STATE_HEAP_BYTES
}

/// How many streams the cache holds: `entries`, or fewer if that many entries at their
/// largest would take more than `bytes`.
fn cache_capacity<A: Stream>(entries: NonZeroUsize, bytes: NonZeroUsize) -> NonZeroUsize {
    NonZeroUsize::new(bytes.get() / entry_bytes::<A>())
        .map_or(NonZeroUsize::MIN, |fit| fit.min(entries))
}

impl Stream for Account {
    fn needs(command: &AccountCommand) -> Option<Uuid> {
        command.transfer_id()
    }

    async fn look_up(
        store: &Store<Self>,
        aggregate_id: &str,
        transfers: Vec<Uuid>,
    ) -> Result<RecordedSteps, LoadError> {
        store.recorded_steps(aggregate_id, &transfers).await
    }

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

    fn not_found() -> AccountError {
        AccountError::NotFound
    }

    const MAX_STATE_HEAP_BYTES: usize = MAX_TENANT_BYTES + 4 * domain::money::MAX_OWNER_CHARS;
}

impl Stream for Transfer {
    fn needs(_: &TransferCommand) -> Option<Uuid> {
        None
    }

    async fn look_up(_: &Store<Self>, _: &str, _: Vec<Uuid>) -> Result<(), LoadError> {
        Ok(())
    }

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

    fn not_found() -> TransferError {
        TransferError::NotFound
    }

    const MAX_STATE_HEAP_BYTES: usize = MAX_TENANT_BYTES + 4 * domain::money::MAX_REFERENCE_CHARS;
}

/// A command's events once appended, and the stream version after them.
#[derive(Debug)]
pub(crate) struct Appended<E> {
    pub(crate) version: u64,
    pub(crate) events: Vec<E>,
}

/// A command for a stream, as it waits for its turn.
pub(crate) struct Request<'a, A: Aggregate> {
    pub(crate) command: &'a A::Command,
    /// The version the command only applies to (`If-Match`), if any.
    pub(crate) expected_version: Option<u64>,
    /// The metadata every event of the command carries, serialised.
    pub(crate) metadata: &'a str,
    pub(crate) key: Option<&'a str>,
    /// True if the stream id was generated for this command: nothing to load.
    pub(crate) new: bool,
}

// Not derived: a derive would ask `A: Clone` of the aggregate, not only of its parts.
impl<A: Aggregate> Clone for Request<'_, A> {
    fn clone(&self) -> Self {
        Self { ..*self }
    }
}

/// What became of a command's turn on its stream.
pub(crate) enum Answer<E> {
    Done(Result<Appended<E>, CommandError>),
    /// The group lost a race (another replica wrote, or spent an idempotency key): run the
    /// command again, from the replay check.
    Retry {
        current_version: Option<u64>,
    },
}

/// The cached state of one stream; `None` until loaded or after a failed append.
type Slot<A> = Option<Versioned<A>>;

/// One stream in this process: its state, locked while commands run on it, and the commands
/// waiting to run.
struct StreamHandle<A: Aggregate> {
    slot: Arc<AsyncMutex<Slot<A>>>,
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
    fn waiting(&self) -> std::sync::MutexGuard<'_, Vec<Waiter<A>>> {
        self.waiting
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// The streams of one aggregate type in this process, the recently used ones cached.
pub(crate) struct Streams<A: Aggregate> {
    store: Store<A>,
    cache: Mutex<LruCache<String, Arc<StreamHandle<A>>>>,
    /// Tells a command's entry among its stream's waiters from the others'.
    tickets: AtomicU64,
    /// Wakes the relay after each append.
    appended: AppendSignal,
}

impl<A: Stream> Streams<A> {
    pub(crate) fn new(store: Store<A>, config: &EngineConfig, appended: AppendSignal) -> Self {
        let capacity = cache_capacity::<A>(config.aggregate_cache, config.aggregate_cache_bytes);
        Self {
            store,
            cache: Mutex::new(LruCache::new(capacity)),
            tickets: AtomicU64::new(0),
            appended,
        }
    }

    pub(crate) fn store(&self) -> &Store<A> {
        &self.store
    }

    /// How many streams the cache holds at most.
    pub(crate) fn capacity(&self) -> NonZeroUsize {
        self.cache().cap()
    }

    fn handle(&self, aggregate_id: &str) -> Arc<StreamHandle<A>> {
        let mut cache = self.cache();
        if let Some(handle) = cache.get(aggregate_id) {
            metrics::counter!("ledger_stream_cache_lookups_total", "aggregate" => A::TYPE, "result" => "hit")
                .increment(1);
            return handle.clone();
        }
        metrics::counter!("ledger_stream_cache_lookups_total", "aggregate" => A::TYPE, "result" => "miss")
            .increment(1);
        let handle = Arc::<StreamHandle<A>>::default();
        if cache
            .push(aggregate_id.to_owned(), handle.clone())
            .is_some()
        {
            metrics::counter!("ledger_stream_cache_evictions_total", "aggregate" => A::TYPE)
                .increment(1);
        }
        handle
    }

    /// Drops a stream that turned out not to exist from the cache: ids that answer "not found"
    /// must not evict real streams. Commands already queued on its handle still run on it; one
    /// that arrives later starts a new handle, which the store's primary key keeps correct.
    fn forget_if_absent(&self, aggregate_id: &str, state: &Versioned<A>) {
        if state.version == 0 {
            self.cache().pop(aggregate_id);
        }
    }

    fn cache(&self) -> std::sync::MutexGuard<'_, LruCache<String, Arc<StreamHandle<A>>>> {
        self.cache
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    async fn lock(&self, aggregate_id: &str) -> OwnedMutexGuard<Slot<A>> {
        self.handle(aggregate_id).slot.clone().lock_owned().await
    }

    /// A stream's cached state, or its state loaded from the store if none is cached.
    pub(crate) async fn known(&self, id: Uuid) -> Result<Versioned<A>, CommandError> {
        let aggregate_id = id.to_string();
        let mut slot = self.lock(&aggregate_id).await;
        if let Some(cached) = slot.as_ref() {
            return Ok(cached.clone());
        }
        let state = self.store.load(&aggregate_id).await?;
        self.forget_if_absent(&aggregate_id, &state);
        *slot = Some(state.clone());
        Ok(state)
    }

    /// Gives `request` its turn on stream `id`: it joins the stream's waiters, and either a
    /// group that holds the lock answers it, or it gets the lock and runs the group itself.
    #[tracing::instrument(skip_all)]
    pub(crate) async fn take_turn(
        self: &Arc<Self>,
        id: Uuid,
        request: Request<'_, A>,
    ) -> Result<Answer<A::Event>, CommandError> {
        let aggregate_id = id.to_string();
        let stream = self.handle(&aggregate_id);
        let (answer, mut answered) = oneshot::channel();
        let ticket = self.tickets.fetch_add(1, Ordering::Relaxed);
        stream.waiting().push(Waiter {
            ticket,
            command: request.command.clone(),
            expected_version: request.expected_version,
            metadata: request.metadata.to_owned(),
            key: request.key.map(str::to_owned),
            answer,
        });
        // A group answers every waiter it took before it lets go of the lock, so a waiter
        // either is answered or gets the lock with its own entry still queued.
        let answer = tokio::select! {
            biased;
            answer = &mut answered => answer,
            mut slot = stream.slot.clone().lock_owned() => {
                // Spawned, even for a lone command: a client hanging up drops this future,
                // and a load or a group cancelled half way would leave commands unanswered
                // and the stream's state out of the cache, to be loaded again (a long stream's
                // first load, never finished, again and again).
                let streams = self.clone();
                let stream = stream.clone();
                let new = request.new;
                let turn = async move {
                    let (state, fresh) = match slot.take() {
                        Some(cached) => (cached, false),
                        None if new => (Versioned::default(), true),
                        None => match streams.store.load(&aggregate_id).await {
                            Ok(loaded) => (loaded, true),
                            Err(err) => {
                                // Only this command fails; the next waiter loads for itself.
                                let mine = {
                                    let mut waiting = stream.waiting();
                                    let index =
                                        waiting.iter().position(|waiter| waiter.ticket == ticket);
                                    index.map(|index| waiting.remove(index))
                                };
                                if let Some(waiter) = mine {
                                    let _ = waiter.answer.send(Answer::Done(Err(err.into())));
                                }
                                return;
                            }
                        },
                    };
                    let waiters = std::mem::take(&mut *stream.waiting());
                    run_group(Group {
                        streams,
                        slot,
                        aggregate_id,
                        state,
                        fresh,
                        waiters,
                    })
                    .await;
                };
                tokio::spawn(turn.in_current_span());
                answered.await
            }
        };
        answer.map_err(|_| {
            CommandError::Internal(anyhow::anyhow!(
                "the command's group stopped without answering"
            ))
        })
    }
}

/// The aggregate's decision on `state`: the next state and the events that lead to it.
async fn decide<A: Stream>(
    state: &Versioned<A>,
    services: &A::Services,
    command: &A::Command,
    expected_version: Option<u64>,
) -> Result<(Versioned<A>, Vec<A::Event>), CommandError> {
    if !A::starts(command) && !state.state.belongs_to(A::tenant(command)) {
        // Before the version check, so other tenants learn nothing, not even a version.
        return Err(A::not_found().into());
    }
    if let Some(expected) = expected_version
        && expected != state.version
    {
        return Err(CommandError::Conflict {
            current_version: Some(state.version),
        });
    }
    let mut next = state.clone();
    let sink = EventSink::default();
    next.state
        .handle(command.clone(), services, &sink)
        .await
        .map_err(Into::into)?;
    let events = sink.collect().await;
    next.version += events.len() as u64;
    Ok((next, events))
}

/// A command waiting for its stream.
struct Waiter<A: Aggregate> {
    ticket: u64,
    command: A::Command,
    expected_version: Option<u64>,
    metadata: String,
    key: Option<String>,
    answer: oneshot::Sender<Answer<A::Event>>,
}

/// Commands on one stream, decided and appended together while its lock is held.
struct Group<A: Stream> {
    streams: Arc<Streams<A>>,
    slot: OwnedMutexGuard<Slot<A>>,
    aggregate_id: String,
    state: Versioned<A>,
    /// True if `state` was just read from the store rather than cached.
    fresh: bool,
    waiters: Vec<Waiter<A>>,
}

/// The group's decisions on one starting state.
struct Decided<A: Aggregate> {
    next: Versioned<A>,
    rows: Vec<EventRow>,
    /// Each waiter's outcome if the rows commit: its events and the version after them.
    outcomes: Vec<Result<Appended<A::Event>, CommandError>>,
}

async fn run_group<A: Stream>(group: Group<A>) {
    let Group {
        streams,
        mut slot,
        aggregate_id,
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

    let keys: Vec<Uuid> = waiters
        .iter()
        .filter_map(|w| A::needs(&w.command))
        .collect();
    let look_up = || async {
        match keys.is_empty() {
            true => Ok(A::Services::default()),
            false => A::look_up(&streams.store, &aggregate_id, keys.clone()).await,
        }
    };
    let mut services = match look_up().await {
        Ok(services) => services,
        Err(err) => return fail(waiters, err.into()),
    };
    let mut decided = decide_group(&state, &services, &waiters).await;
    if !fresh && decided.outcomes.iter().any(Result::is_err) {
        // A refusal may come from state another replica has since changed: only a refusal on
        // the latest state is final.
        if let Err(err) = streams.store.catch_up(&aggregate_id, &mut state).await {
            return fail(waiters, err.into());
        }
        services = match look_up().await {
            Ok(services) => services,
            Err(err) => return fail(waiters, err.into()),
        };
        decided = decide_group(&state, &services, &waiters).await;
    }
    let Decided {
        next,
        rows,
        outcomes,
    } = decided;
    if !rows.is_empty() {
        match streams
            .store
            .append(&aggregate_id, state.version, rows)
            .await
        {
            Ok(()) => {
                streams.appended.appended();
                streams
                    .store
                    .snapshot_if_due(&aggregate_id, state.version, &next);
            }
            Err(AppendError::StreamConflict) => {
                if let Err(err) = streams.store.catch_up(&aggregate_id, &mut state).await {
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
    streams.forget_if_absent(&aggregate_id, &next);
    *slot = Some(next);
    for (waiter, outcome) in waiters.into_iter().zip(outcomes) {
        let _ = waiter.answer.send(Answer::Done(outcome));
    }
    // Only now is the stream unlocked (as `slot` drops): see `Streams::take_turn`.
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
        let _ = waiter.answer.send(Answer::Done(Err(A::not_found().into())));
    }
    own
}

/// Decides each waiter's command on the state (and the recorded facts) its predecessors in the
/// group left.
async fn decide_group<A: Stream>(
    state: &Versioned<A>,
    services: &A::Services,
    waiters: &[Waiter<A>],
) -> Decided<A> {
    let mut next = state.clone();
    let mut services = services.clone();
    let mut rows = Vec::new();
    let mut outcomes = Vec::with_capacity(waiters.len());
    for waiter in waiters {
        let outcome = async {
            let (after, events) =
                decide(&next, &services, &waiter.command, waiter.expected_version).await?;
            let mut serialised = events
                .iter()
                .map(|event| event_row(event, &waiter.metadata))
                .collect::<Result<Vec<_>, _>>()?;
            rows.append(&mut serialised);
            for event in &events {
                A::remember(&mut services, event);
            }
            next = after;
            Ok(Appended {
                version: next.version,
                events,
            })
        }
        .await;
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
fn fail<A: Aggregate>(waiters: Vec<Waiter<A>>, err: CommandError) {
    for waiter in waiters {
        let _ = waiter.answer.send(Answer::Done(Err(err.duplicate())));
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use domain::{
        AccountEvent, Amount, Currency, OverdraftLimit, Owner, StepOutcome, TransferDecline,
        TransferStep,
    };
    use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusRecorder};
    use service_kit::testing::{TestDatabase, eventually};

    use super::super::append::Appender;
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
    ) -> (Waiter<Account>, oneshot::Receiver<Answer<AccountEvent>>) {
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
    async fn answer(answered: oneshot::Receiver<Answer<AccountEvent>>) -> Answer<AccountEvent> {
        tokio::time::timeout(Duration::from_secs(5), answered)
            .await
            .expect("the waiter is answered")
            .expect("the group answers rather than dropping the waiter")
    }

    /// Runs `waiters` as one group on `id`, as the command that took the stream's lock would.
    /// The state is the cached one, else loaded from the store.
    async fn run(streams: &Arc<Streams<Account>>, id: Uuid, waiters: Vec<Waiter<Account>>) {
        let mut slot = streams.lock(&id.to_string()).await;
        let state = match slot.take() {
            Some(cached) => cached,
            None => streams.store.load(&id.to_string()).await.unwrap(),
        };
        run_group(Group {
            streams: streams.clone(),
            slot,
            aggregate_id: id.to_string(),
            state,
            fresh: true,
            waiters,
        })
        .await;
    }

    /// Opens account `id` for tenant `acme` through a group of its own.
    async fn open(streams: &Arc<Streams<Account>>, id: Uuid) {
        let (open, opened) = waiter(
            AccountCommand::Open {
                tenant: "acme".into(),
                owner: Owner::parse("Ada").unwrap(),
                currency: Currency::parse("EUR").unwrap(),
                overdraft_limit: OverdraftLimit::parse(0).unwrap(),
            },
            None,
        );
        run(streams, id, vec![open]).await;
        assert!(matches!(
            answer(opened).await,
            Answer::Done(Ok(Appended { version: 1, .. }))
        ));
    }

    fn streams(db: &TestDatabase) -> Arc<Streams<Account>> {
        let appender = Appender::start(db.pool.clone(), 1);
        Arc::new(Streams::new(
            // Snapshots every few events, so that these tests load through them too.
            Store::new(
                db.pool.clone(),
                appender,
                std::num::NonZeroU64::new(3).unwrap(),
            ),
            &EngineConfig {
                aggregate_cache: NonZeroUsize::new(10).unwrap(),
                ..EngineConfig::default()
            },
            AppendSignal::default(),
        ))
    }

    #[test]
    fn the_cache_holds_fewer_streams_when_that_many_at_their_largest_exceed_its_bytes() {
        let entries = NonZeroUsize::new(100_000).unwrap();
        let largest = entry_bytes::<Account>();
        assert!(largest > Account::MAX_STATE_HEAP_BYTES);
        let bytes = |n: usize| NonZeroUsize::new(n).unwrap();
        assert_eq!(cache_capacity::<Account>(entries, bytes(1 << 30)), entries);
        assert_eq!(
            cache_capacity::<Account>(entries, bytes(1000 * largest + 1)).get(),
            1000
        );
        // Never none at all: a group needs its stream's entry.
        assert_eq!(cache_capacity::<Account>(entries, bytes(1)).get(), 1);
        // The defaults keep the entry count: 100,000 accounts fit in the default bytes.
        let defaults = EngineConfig::default();
        assert_eq!(
            cache_capacity::<Account>(defaults.aggregate_cache, defaults.aggregate_cache_bytes),
            defaults.aggregate_cache
        );
    }

    /// A group that loses its race is told to run again, but never another tenant's command
    /// in it: that one is "not found", final, and learns no version.
    #[tokio::test]
    async fn another_tenants_command_in_a_group_that_loses_a_race_is_not_found() {
        let db = TestDatabase::create().await;
        let streams = streams(&db);
        let id = Uuid::new_v4();
        open(&streams, id).await;
        // The group decides on a stale state: another replica appended version 2 since.
        let mut slot = streams.lock(&id.to_string()).await;
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
            streams: streams.clone(),
            slot,
            aggregate_id: id.to_string(),
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
            Answer::Done(Err(err)) => assert!(
                matches!(err, CommandError::Account(AccountError::NotFound)),
                "{err:?}"
            ),
            _ => panic!("another tenant's command was told to retry"),
        }
    }

    /// The same idempotency key from two tenants is two keys: in one group, neither is
    /// taken for a repeat of the other.
    #[tokio::test]
    async fn one_key_of_two_tenants_is_two_keys() {
        let db = TestDatabase::create().await;
        let streams = streams(&db);
        let id = Uuid::new_v4();
        let opening = |tenant: &str| AccountCommand::Open {
            tenant: tenant.into(),
            owner: Owner::parse("Ada").unwrap(),
            currency: Currency::parse("EUR").unwrap(),
            overdraft_limit: OverdraftLimit::parse(0).unwrap(),
        };
        let (acme, acme_answer) = waiter(opening("acme"), Some("k"));
        let (globex, globex_answer) = waiter(opening("globex"), Some("k"));
        run(&streams, id, vec![acme, globex]).await;
        assert!(matches!(
            answer(acme_answer).await,
            Answer::Done(Ok(Appended { version: 1, .. }))
        ));
        // Decided in the group (the account is taken), not sent round again as a repeat.
        assert!(matches!(answer(globex_answer).await, Answer::Done(Err(_))));
    }

    #[tokio::test]
    async fn a_repeated_idempotency_key_in_a_group_runs_again_and_the_rest_commit() {
        let db = TestDatabase::create().await;
        let streams = streams(&db);
        let id = Uuid::new_v4();
        open(&streams, id).await;

        let (first, first_answer) = waiter(deposit(), Some("k"));
        let (repeat, repeat_answer) = waiter(deposit(), Some("k"));
        let (other, other_answer) = waiter(deposit(), None);
        run(&streams, id, vec![first, repeat, other]).await;
        assert!(matches!(
            answer(first_answer).await,
            Answer::Done(Ok(Appended { version: 2, .. }))
        ));
        assert!(matches!(answer(repeat_answer).await, Answer::Retry { .. }));
        assert!(matches!(
            answer(other_answer).await,
            Answer::Done(Ok(Appended { version: 3, .. }))
        ));
        let stored: i64 = sqlx::query_scalar("SELECT count(*) FROM events")
            .fetch_one(&db.pool)
            .await
            .unwrap();
        assert_eq!(stored, 3);
    }

    fn step(step: TransferStep, transfer_id: Uuid) -> AccountCommand {
        AccountCommand::for_transfer_step(
            step,
            "acme".into(),
            transfer_id,
            Amount::parse(5).unwrap(),
            Currency::parse("EUR").unwrap(),
        )
    }

    /// The outcome `answered` carries: the step applied, or the one recorded earlier.
    async fn step_outcome(answered: oneshot::Receiver<Answer<AccountEvent>>) -> StepOutcome {
        match answer(answered).await {
            Answer::Done(Ok(Appended { events, .. })) => {
                let [event] = events.as_slice() else {
                    panic!("a step appends one event: {events:?}")
                };
                event.transfer_step().expect("a step event").2
            }
            Answer::Done(Err(CommandError::Account(AccountError::TransferStepRecorded {
                outcome,
                ..
            }))) => outcome,
            _ => panic!("a step is decided or found recorded"),
        }
    }

    /// The account's state keeps no steps: a step asked again, after many others and on a
    /// stream loaded afresh from the store, is answered with its recorded outcome; a refund
    /// still needs the debit it gives back; and a repeat in the same group as the step itself
    /// sees the step its predecessor decided.
    #[tokio::test]
    async fn a_transfer_step_happens_once_though_the_state_keeps_no_steps() {
        let db = TestDatabase::create().await;
        let warm = streams(&db);
        let id = Uuid::new_v4();
        open(&warm, id).await;
        let (funds, funded) = waiter(deposit(), None);
        run(&warm, id, vec![funds]).await;
        assert!(matches!(answer(funded).await, Answer::Done(Ok(_))));

        let (declined, applied) = (Uuid::new_v4(), Uuid::new_v4());
        let (first, first_answer) = waiter(step(TransferStep::Debit, declined), None);
        let (again, again_answer) = waiter(step(TransferStep::Debit, declined), None);
        let (credit, credit_answer) = waiter(step(TransferStep::Credit, applied), None);
        // 5 in the account: the first debit of 5 applies, the repeat finds it recorded.
        run(&warm, id, vec![first, again, credit]).await;
        assert_eq!(step_outcome(first_answer).await, StepOutcome::Applied);
        assert_eq!(step_outcome(again_answer).await, StepOutcome::Applied);
        assert_eq!(step_outcome(credit_answer).await, StepOutcome::Applied);
        for _ in 0..20 {
            let (other, other_answer) = waiter(step(TransferStep::Credit, Uuid::new_v4()), None);
            run(&warm, id, vec![other]).await;
            assert_eq!(step_outcome(other_answer).await, StepOutcome::Applied);
        }

        let cold = streams(&db);
        let (repeat, repeat_answer) = waiter(step(TransferStep::Debit, declined), None);
        let (refund, refund_answer) = waiter(step(TransferStep::Refund, applied), None);
        run(&cold, id, vec![repeat, refund]).await;
        assert_eq!(step_outcome(repeat_answer).await, StepOutcome::Applied);
        match answer(refund_answer).await {
            Answer::Done(Err(CommandError::Account(AccountError::NothingToRefund { .. }))) => {}
            _ => panic!("a refund of a transfer this account never paid was not refused"),
        }
        let (refund, refund_answer) = waiter(step(TransferStep::Refund, declined), None);
        run(&cold, id, vec![refund]).await;
        assert_eq!(step_outcome(refund_answer).await, StepOutcome::Applied);
        let steps: i64 =
            sqlx::query_scalar("SELECT count(*) FROM events WHERE event_type LIKE 'Transfer%'")
                .fetch_one(&db.pool)
                .await
                .unwrap();
        assert_eq!(steps, 1 + 1 + 20 + 1);
    }

    /// Whatever a writer does, the store keeps one record of a step: a second record, even at
    /// the stream's next version, is refused by `events_transfer_step`.
    #[tokio::test]
    async fn the_store_refuses_a_second_record_of_a_step() {
        let db = TestDatabase::create().await;
        let streams = streams(&db);
        let id = Uuid::new_v4();
        open(&streams, id).await;
        let transfer = Uuid::new_v4();
        let declined = |reason| AccountEvent::TransferDebitDeclined {
            transfer_id: transfer,
            reason,
        };
        let row = |event: &AccountEvent| event_row(event, r#"{"tenant":"acme"}"#).unwrap();
        let store = streams.store();
        store
            .append(
                &id.to_string(),
                1,
                vec![row(&declined(TransferDecline::Frozen))],
            )
            .await
            .unwrap();
        let second = store
            .append(
                &id.to_string(),
                2,
                vec![row(&declined(TransferDecline::InsufficientFunds))],
            )
            .await;
        assert!(
            matches!(second, Err(AppendError::StreamConflict)),
            "{second:?}"
        );
        let recorded = store
            .recorded_steps(&id.to_string(), &[transfer])
            .await
            .unwrap();
        assert_eq!(
            recorded.outcome(transfer, TransferStep::Debit),
            Some(StepOutcome::Declined(TransferDecline::Frozen))
        );
    }

    /// `command` on a stream of tenant `acme`, as a handler asks for it.
    fn request(command: &AccountCommand) -> Request<'_, Account> {
        Request {
            command,
            expected_version: None,
            metadata: r#"{"tenant":"acme"}"#,
            key: None,
            new: false,
        }
    }

    /// The account streams loaded so far as `recorder` counted them.
    fn loads(recorder: &PrometheusRecorder) -> u64 {
        recorder
            .handle()
            .render()
            .lines()
            .find_map(|line| {
                line.strip_prefix(r#"ledger_stream_loads_total{aggregate="account"} "#)
            })
            .map_or(0, |count| count.parse().expect("a counter's value"))
    }

    /// A transaction that holds `table` in lock `mode` until it ends.
    async fn lock_table(
        db: &TestDatabase,
        table: &str,
        mode: &str,
    ) -> sqlx::Transaction<'static, sqlx::Postgres> {
        let mut blocker = db.pool.begin().await.unwrap();
        sqlx::query(&format!("LOCK TABLE {table} IN {mode} MODE"))
            .execute(&mut *blocker)
            .await
            .unwrap();
        blocker
    }

    /// Resolves once a statement of this test's database that contains `statement` waits
    /// for a lock.
    async fn blocked(db: &TestDatabase, statement: &str) {
        eventually(Duration::from_secs(5), || async {
            let waiting: i64 = sqlx::query_scalar(
                "SELECT count(*) FROM pg_stat_activity
                  WHERE datname = current_database() AND wait_event_type = 'Lock'
                    AND position($1 in query) > 0",
            )
            .bind(statement)
            .fetch_one(&db.pool)
            .await
            .map_err(|err| err.to_string())?;
            match waiting {
                0 => Err(format!("no statement with {statement:?} waits")),
                _ => Ok(()),
            }
        })
        .await;
    }

    /// Starts a deposit on `id` and drops it, as axum drops the handler of a client that hung
    /// up, once a statement that contains `statement` waits for a lock.
    async fn hang_up_when_blocked(
        db: &TestDatabase,
        streams: &Arc<Streams<Account>>,
        id: Uuid,
        statement: &str,
    ) {
        let command = deposit();
        tokio::select! {
            _ = streams.take_turn(id, request(&command)) => {
                panic!("the command finished while the store was locked")
            }
            () = blocked(db, statement) => {}
        }
    }

    /// What `turn` answered, within a bound: a stream whose lock nobody lets go fails the test.
    async fn version_committed(
        turn: impl Future<Output = Result<Answer<AccountEvent>, CommandError>>,
    ) -> u64 {
        match tokio::time::timeout(Duration::from_secs(5), turn)
            .await
            .expect("the command got its turn")
        {
            Ok(Answer::Done(Ok(Appended { version, .. }))) => version,
            Ok(Answer::Done(Err(err))) | Err(err) => panic!("the command failed: {err:?}"),
            Ok(Answer::Retry { .. }) => panic!("the command was told to retry"),
        }
    }

    /// Asserts that stream `id` holds `deposits` deposits in the store and that its cached
    /// state, once no group holds it, is at the stored version.
    async fn assert_cached_as_stored(
        db: &TestDatabase,
        streams: &Arc<Streams<Account>>,
        id: Uuid,
        deposits: i64,
    ) {
        let (version, stored_deposits): (i64, i64) = sqlx::query_as(
            "SELECT max(sequence), count(*) FILTER (WHERE event_type = 'MoneyDeposited')
               FROM events WHERE aggregate_id = $1",
        )
        .bind(id.to_string())
        .fetch_one(&db.pool)
        .await
        .unwrap();
        assert_eq!(stored_deposits, deposits);
        let slot = tokio::time::timeout(Duration::from_secs(5), streams.lock(&id.to_string()))
            .await
            .expect("the stream's lock is let go");
        assert_eq!(
            slot.as_ref().map(|cached| cached.version),
            Some(version as u64)
        );
    }

    /// A client that hangs up while its stream is being loaded cancels nothing: the load
    /// finishes and is cached, the command (which no group had taken yet) is not applied, and
    /// the next command loads nothing.
    #[tokio::test]
    async fn a_client_hanging_up_during_a_load_leaves_the_loaded_state_cached() {
        // This test's own count: a `#[tokio::test]` runs the tasks it spawns on its thread.
        let recorder = PrometheusBuilder::new().build_recorder();
        let _recording = metrics::set_default_local_recorder(&recorder);
        let db = TestDatabase::create().await;
        let id = Uuid::new_v4();
        open(&streams(&db), id).await;
        let cold = streams(&db);
        let loads_before = loads(&recorder);

        let blocker = lock_table(&db, "snapshots", "ACCESS EXCLUSIVE").await;
        hang_up_when_blocked(&db, &cold, id, "FROM snapshots").await;
        blocker.commit().await.unwrap();

        let command = deposit();
        assert_eq!(
            version_committed(cold.take_turn(id, request(&command))).await,
            2
        );
        assert_eq!(
            loads(&recorder) - loads_before,
            1,
            "the stream was loaded again"
        );
        assert_cached_as_stored(&db, &cold, id, 1).await;
    }

    /// A client that hangs up while its command is being appended cancels nothing: the
    /// command commits, the stream's state stays cached at the new version, and the command
    /// queued behind it gets the lock and loads nothing.
    #[tokio::test]
    async fn a_client_hanging_up_mid_append_leaves_its_command_committed_and_cached() {
        let recorder = PrometheusBuilder::new().build_recorder();
        let _recording = metrics::set_default_local_recorder(&recorder);
        let db = TestDatabase::create().await;
        let streams = streams(&db);
        let id = Uuid::new_v4();
        open(&streams, id).await;
        let loads_before = loads(&recorder);

        let blocker = lock_table(&db, "events", "EXCLUSIVE").await;
        hang_up_when_blocked(&db, &streams, id, "INSERT INTO events").await;
        let command = deposit();
        let next = streams.take_turn(id, request(&command));
        tokio::pin!(next);
        // Queued while the hung-up command's group still holds the stream.
        assert!(futures::poll!(&mut next).is_pending());
        blocker.commit().await.unwrap();

        assert_eq!(version_committed(next).await, 3);
        assert_eq!(
            loads(&recorder),
            loads_before,
            "the stream was loaded again"
        );
        assert_cached_as_stored(&db, &streams, id, 2).await;
    }

    /// A client that hangs up while its command waits for the stream's lock leaves nothing
    /// behind: the group before it commits, the next group drops the command unapplied, and
    /// nothing is loaded.
    #[tokio::test]
    async fn a_client_hanging_up_while_waiting_for_its_turn_changes_nothing() {
        let recorder = PrometheusBuilder::new().build_recorder();
        let _recording = metrics::set_default_local_recorder(&recorder);
        let db = TestDatabase::create().await;
        let streams = streams(&db);
        let id = Uuid::new_v4();
        open(&streams, id).await;
        let loads_before = loads(&recorder);

        let blocker = lock_table(&db, "events", "EXCLUSIVE").await;
        let command = deposit();
        let appending = streams.take_turn(id, request(&command));
        tokio::pin!(appending);
        tokio::select! {
            _ = &mut appending => panic!("the command finished while the store was locked"),
            () = blocked(&db, "INSERT INTO events") => {}
        }
        // Queued behind the appending group, then gone before that group lets go.
        let mut waiting = Box::pin(streams.take_turn(id, request(&command)));
        assert!(futures::poll!(&mut waiting).is_pending());
        drop(waiting);
        blocker.commit().await.unwrap();

        assert_eq!(version_committed(appending).await, 2);
        assert_eq!(
            version_committed(streams.take_turn(id, request(&command))).await,
            3
        );
        assert_eq!(
            loads(&recorder),
            loads_before,
            "the stream was loaded again"
        );
        assert_cached_as_stored(&db, &streams, id, 2).await;
    }

    /// Ids that answer "not found" take no cache slot, so probing random ids cannot evict
    /// the streams that exist.
    #[tokio::test]
    async fn unknown_streams_do_not_enter_the_cache() {
        let db = TestDatabase::create().await;
        let streams = streams(&db);
        let id = Uuid::new_v4();
        open(&streams, id).await;
        let command = deposit();
        for _ in 0..20 {
            let request = Request {
                command: &command,
                expected_version: None,
                metadata: "{}",
                key: None,
                new: false,
            };
            let answer = streams.take_turn(Uuid::new_v4(), request).await.unwrap();
            assert!(matches!(
                answer,
                Answer::Done(Err(CommandError::Account(AccountError::NotFound)))
            ));
        }
        let cache = streams.cache();
        assert_eq!(cache.len(), 1);
        assert!(cache.contains(&id.to_string()));
    }
}
