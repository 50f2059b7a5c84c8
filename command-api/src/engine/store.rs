//! The event streams of one aggregate type (accounts, transfers) in the event store: loading
//! and folding them, appending to them (through `append`'s batches), snapshotting them, and
//! finding the event that spent an idempotency key. No state is kept here; `stream` keeps it
//! between commands.
//!
//! A load costs the events since the stream's last snapshot, read in pages of bounded size,
//! never the whole stream at once: a stream with millions of events loads like a short one.
//! A snapshot is written off the command's path every `snapshot_every` events, and after a
//! load that had to fold more than that (a stream older than its snapshots).

use std::num::NonZeroU64;
use std::sync::Arc;

use cqrs_es::{Aggregate, DomainEvent};
use domain::{Account, AccountEvent, History, RecordedSteps, StoredEvent};
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

/// The transfer steps recorded on an account for some transfers: one lookup per transfer in
/// the `events_transfer_step` index, whose predicate this repeats so that the planner uses it.
/// Each transfer is looked up on its own (`LATERAL`, kept from being flattened by `OFFSET 0`)
/// because the statement is prepared: with `= ANY($2)`, the generic plan Postgres settles on
/// searched the index by account alone and filtered the transfers, reading every step the
/// account ever took (0.5 ms a call on an account of a few hundred transfers, growing with
/// its history); an equality per transfer is searched on both columns in any plan.
const RECORDED_STEPS: &str = "
SELECT e.event_type, e.event_version, e.payload
  FROM (SELECT DISTINCT unnest($2::text[])) AS t(transfer_id)
 CROSS JOIN LATERAL (
       SELECT event_type, event_version, payload
         FROM events
        WHERE aggregate_type = 'account' AND aggregate_id = $1
          AND event_type IN ('TransferDebited', 'TransferDebitDeclined', 'TransferCredited',
                             'TransferCreditDeclined', 'TransferRefunded')
          AND (payload -> event_type ->> 'transfer_id') = t.transfer_id
       OFFSET 0) AS e";

/// Events read by one statement of a load: bounds a load's memory and each statement's time,
/// whatever the stream's length.
const PAGE: i64 = 1000;

const EVENTS_AFTER: &str = "
SELECT event_type, event_version, payload
  FROM events
 WHERE aggregate_type = $1 AND aggregate_id = $2 AND sequence > $3
 ORDER BY sequence
 LIMIT $4";

/// The stream's snapshot, if the stream still holds the very event it was taken at.
const SNAPSHOT: &str = "
SELECT s.version, s.state_version, s.state
  FROM snapshots s
  JOIN events e ON e.aggregate_type = s.aggregate_type AND e.aggregate_id = s.aggregate_id
               AND e.sequence = s.version AND e.hash = s.event_hash
 WHERE s.aggregate_type = $1 AND s.aggregate_id = $2";

/// Replaces an older snapshot only: snapshots written out of order keep the latest.
const SAVE_SNAPSHOT: &str = "
INSERT INTO snapshots (aggregate_type, aggregate_id, version, state_version, state, event_hash)
SELECT $1, $2, $3, $4, $5, e.hash
  FROM events e
 WHERE e.aggregate_type = $1 AND e.aggregate_id = $2 AND e.sequence = $3
    ON CONFLICT (aggregate_type, aggregate_id) DO UPDATE
   SET version = EXCLUDED.version, state_version = EXCLUDED.state_version,
       state = EXCLUDED.state, event_hash = EXCLUDED.event_hash, taken_at = now()
 WHERE snapshots.version < EXCLUDED.version OR snapshots.state_version <> EXCLUDED.state_version";

/// The streams of aggregate type `A` in the event store.
pub(crate) struct Store<A> {
    pool: PgPool,
    appender: Appender,
    snapshot_every: NonZeroU64,
    _aggregate: std::marker::PhantomData<fn() -> A>,
}

impl<A: History<Event: StoredEvent> + Default + Clone + 'static> Store<A> {
    pub(crate) fn new(pool: PgPool, appender: Appender, snapshot_every: NonZeroU64) -> Self {
        Self {
            pool,
            appender,
            snapshot_every,
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

    /// The stream's latest state: its snapshot, if one of the current shape fits the stream,
    /// with the events after it folded in.
    pub(crate) async fn load(&self, aggregate_id: &str) -> Result<Versioned<A>, LoadError> {
        // Counted as it begins: a load costs reads whether or not it finishes, and a stream
        // loaded again and again is one whose cached state keeps being lost.
        metrics::counter!("ledger_stream_loads_total", "aggregate" => A::TYPE).increment(1);
        let mut state = self.snapshot(aggregate_id).await?.unwrap_or_default();
        let folded = self.catch_up(aggregate_id, &mut state).await?;
        if folded >= self.snapshot_every.get() {
            self.save_snapshot(aggregate_id, &state);
        }
        Ok(state)
    }

    /// Brings `state` up to the stream's latest version, a page at a time, and tells how many
    /// events that took.
    pub(crate) async fn catch_up(
        &self,
        aggregate_id: &str,
        state: &mut Versioned<A>,
    ) -> Result<u64, LoadError> {
        let from = state.version;
        loop {
            let page: Vec<(String, String, serde_json::Value)> = sqlx::query_as(EVENTS_AFTER)
                .bind(A::TYPE)
                .bind(aggregate_id)
                .bind(state.version as i64)
                .bind(PAGE)
                .fetch_all(&self.pool)
                .await?;
            let full = page.len() as i64 == PAGE;
            let events = page
                .into_iter()
                .map(|(event_type, event_version, payload)| {
                    domain::read_stored(&event_type, &event_version, payload)
                })
                .collect::<Result<Vec<_>, _>>()?;
            state.apply(events);
            if !full {
                return Ok(state.version - from);
            }
        }
    }

    /// The stream's snapshot, if it has one of the state's current shape that still fits it.
    async fn snapshot(&self, aggregate_id: &str) -> Result<Option<Versioned<A>>, LoadError> {
        let row: Option<(i64, i32, serde_json::Value)> = sqlx::query_as(SNAPSHOT)
            .bind(A::TYPE)
            .bind(aggregate_id)
            .fetch_optional(&self.pool)
            .await?;
        let Some((version, state_version, state)) = row else {
            return Ok(None);
        };
        if state_version != A::STATE_VERSION as i32 {
            metrics::counter!("ledger_snapshots_ignored_total", "aggregate" => A::TYPE, "reason" => "old_shape")
                .increment(1);
            return Ok(None);
        }
        match serde_json::from_value(state) {
            Ok(state) => Ok(Some(Versioned {
                state,
                version: version as u64,
            })),
            Err(err) => {
                tracing::warn!(aggregate_id, error = %err, "a snapshot does not read as the current state; folding the stream instead");
                metrics::counter!("ledger_snapshots_ignored_total", "aggregate" => A::TYPE, "reason" => "unreadable")
                    .increment(1);
                Ok(None)
            }
        }
    }

    /// Snapshots `state` if appending up to `after` crossed a multiple of `snapshot_every`.
    pub(crate) fn snapshot_if_due(&self, aggregate_id: &str, before: u64, after: &Versioned<A>) {
        let every = self.snapshot_every.get();
        if after.version / every > before / every {
            self.save_snapshot(aggregate_id, after);
        }
    }

    /// Writes `state` as the stream's snapshot, off the caller's path: a snapshot only saves
    /// later loads work, so a failure is counted and logged, and the next one tries again.
    fn save_snapshot(&self, aggregate_id: &str, state: &Versioned<A>) {
        let pool = self.pool.clone();
        let aggregate_id = aggregate_id.to_owned();
        let state = state.clone();
        tokio::spawn(async move {
            let saved = async {
                let json = serde_json::to_value(&state.state)
                    .map_err(|err| sqlx::Error::Encode(Box::new(err)))?;
                sqlx::query(SAVE_SNAPSHOT)
                    .bind(A::TYPE)
                    .bind(&aggregate_id)
                    .bind(state.version as i64)
                    .bind(A::STATE_VERSION as i32)
                    .bind(json)
                    .execute(&pool)
                    .await
            }
            .await;
            let result = match &saved {
                Ok(_) => "written",
                Err(err) => {
                    tracing::warn!(aggregate_id, error = %err, "writing a snapshot failed");
                    "failed"
                }
            };
            metrics::counter!("ledger_snapshots_total", "aggregate" => A::TYPE, "result" => result)
                .increment(1);
        });
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

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use cqrs_es::persist::{PersistedEventRepository, SerializedEvent};
    use domain::{Amount, Currency};
    use postgres_es::PostgresEventRepository;
    use service_kit::db::{self, ServiceRole};
    use service_kit::event_log::LogPosition;
    use service_kit::testing::{TestDatabase, eventually, readable_events};

    use super::*;

    /// A step is looked up by account and transfer together, in the plan Postgres settles on
    /// for the prepared statement too: so a lookup reads the few index entries of the
    /// transfers at hand, however many transfers the account took part in.
    #[tokio::test]
    async fn recorded_steps_are_searched_by_account_and_transfer_in_the_generic_plan() {
        let database = TestDatabase::create().await;
        let mut conn = database.pool.acquire().await.unwrap();
        sqlx::query("SET plan_cache_mode = force_generic_plan")
            .execute(&mut *conn)
            .await
            .unwrap();
        sqlx::query(&format!("PREPARE steps(text, text[]) AS {RECORDED_STEPS}"))
            .execute(&mut *conn)
            .await
            .unwrap();
        let plan: serde_json::Value =
            sqlx::query_scalar("EXPLAIN (FORMAT JSON) EXECUTE steps('a', ARRAY['t'])")
                .fetch_one(&mut *conn)
                .await
                .unwrap();
        fn index_conditions(node: &serde_json::Value, found: &mut Vec<String>) {
            if node["Index Name"] == "events_transfer_step" {
                found.push(node["Index Cond"].as_str().unwrap_or_default().to_owned());
            }
            for child in node["Plans"].as_array().into_iter().flatten() {
                index_conditions(child, found);
            }
        }
        let mut conditions = Vec::new();
        index_conditions(&plan[0]["Plan"], &mut conditions);
        assert!(
            !conditions.is_empty() && conditions.iter().all(|cond| cond.contains("transfer_id")),
            "the index is not searched by transfer: {conditions:?} in {plan}"
        );
    }

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
        let store = Store::<Account>::new(writer.clone(), appender, NonZeroU64::MIN);
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
        // Readable once no older transaction of the cluster (another test's) is open.
        let logged = readable_events(
            &database.pool,
            LogPosition::START,
            2,
            Duration::from_secs(10),
        )
        .await;
        assert!(logged.iter().all(|event| event.tenant == "acme"));
        assert_eq!(
            logged[1].prev_hash.as_deref(),
            Some(logged[0].hash.as_slice())
        );
        assert!(matches!(logged[1].decode::<AccountEvent>(), Ok(event) if event == deposited));
    }

    mod snapshots {

        use domain::{
            AccountCommand, History, OverdraftLimit, Owner, Reference, StepOutcome, Transfer,
            TransferCommand, TransferStep, TransferTerms,
        };
        use proptest::prelude::*;
        use uuid::Uuid;

        use super::*;

        fn eur() -> Currency {
            Currency::parse("EUR").unwrap()
        }

        /// A command on the test's account, chosen to be accepted often enough that streams
        /// grow: money in and out, freezes, and transfer steps (repeats included).
        fn account_command() -> impl Strategy<Value = AccountCommand> {
            let amount = (1i64..500).prop_map(|units| Amount::parse(units).unwrap());
            let transfer = (0u128..6).prop_map(Uuid::from_u128);
            let step = prop_oneof![
                Just(TransferStep::Debit),
                Just(TransferStep::Credit),
                Just(TransferStep::Refund)
            ];
            prop_oneof![
                4 => amount.clone().prop_map(|amount| AccountCommand::Deposit {
                    tenant: "acme".into(), amount, currency: eur(),
                }),
                2 => amount.clone().prop_map(|amount| AccountCommand::Withdraw {
                    tenant: "acme".into(), amount, currency: eur(),
                }),
                1 => Just(AccountCommand::Freeze { tenant: "acme".into() }),
                1 => Just(AccountCommand::Unfreeze { tenant: "acme".into() }),
                3 => (step, transfer, amount).prop_map(|(step, transfer, amount)| {
                    AccountCommand::for_transfer_step(step, "acme".into(), transfer, amount, eur())
                }),
            ]
        }

        /// Appends `events` to stream `id` one command at a time, as groups do, with the
        /// snapshots falling due on the way.
        async fn append_all<A: History<Event: StoredEvent> + Default + Clone + 'static>(
            store: &Store<A>,
            id: &str,
            events: &[A::Event],
        ) -> Versioned<A> {
            let mut state = Versioned::<A>::default();
            for event in events {
                let before = state.version;
                let row = event_row(event, r#"{"tenant":"acme"}"#).unwrap();
                store.append(id, before, vec![row]).await.unwrap();
                state.apply([event.clone()]);
                store.snapshot_if_due(id, before, &state);
            }
            state
        }

        /// The version of stream `id`'s snapshot, once it is `expected`.
        async fn snapshot_reaches(pool: &PgPool, id: &str, expected: u64) {
            eventually(Duration::from_secs(5), || async {
                let version: Option<i64> =
                    sqlx::query_scalar("SELECT version FROM snapshots WHERE aggregate_id = $1")
                        .bind(id)
                        .fetch_optional(pool)
                        .await
                        .unwrap();
                match version == Some(expected as i64) {
                    true => Ok(()),
                    false => Err(format!("snapshot at {version:?}, not {expected}")),
                }
            })
            .await;
        }

        fn store<A: History<Event: StoredEvent> + Default + Clone + 'static>(
            pool: &PgPool,
            every: u64,
        ) -> Store<A> {
            let appender = Appender::start(pool.clone(), 1);
            Store::new(pool.clone(), appender, NonZeroU64::new(every).unwrap())
        }

        /// Loading reads the latest snapshot and the events after it; whatever the snapshot
        /// interval, that is the state folded from the first event, for accounts and transfers.
        #[test]
        fn a_snapshot_and_the_events_after_it_fold_to_the_whole_stream() {
            let runtime = tokio::runtime::Runtime::new().unwrap();
            let db = runtime.block_on(TestDatabase::create());
            let config = ProptestConfig {
                cases: 24,
                ..ProptestConfig::default()
            };
            proptest!(config, |(commands in prop::collection::vec(account_command(), 1..40), every in 1u64..8)| {
                runtime.block_on(async {
                    let mut account = Account::default();
                    let mut recorded = RecordedSteps::default();
                    let mut events = vec![AccountEvent::AccountOpened {
                        tenant: "acme".into(),
                        owner: Owner::parse("Ada").unwrap(),
                        currency: eur(),
                        overdraft_limit: OverdraftLimit::parse(100).unwrap(),
                        max_balance: 1_000_000,
                    }];
                    account.apply(events[0].clone());
                    for command in commands {
                        if let Ok(event) = account.decide(command, &recorded) {
                            recorded.record(&event);
                            account.apply(event.clone());
                            events.push(event);
                        }
                    }
                    let id = Uuid::new_v4().to_string();
                    let writing = store::<Account>(&db.pool, every);
                    let written = append_all(&writing, &id, &events).await;
                    let last_due = written.version / every * every;
                    if last_due > 0 {
                        snapshot_reaches(&db.pool, &id, last_due).await;
                    }
                    let loaded = store::<Account>(&db.pool, every).load(&id).await.unwrap();
                    prop_assert_eq!(loaded.version, written.version);
                    prop_assert_eq!(&loaded.state, &account);

                    let transfer_id = Uuid::new_v4();
                    let mut transfer = Transfer::default();
                    let mut transfer_events = transfer
                        .decide(TransferCommand::Request(TransferTerms {
                            tenant: "acme".into(),
                            from: Uuid::new_v4(),
                            to: Uuid::new_v4(),
                            amount: Amount::parse(5).unwrap(),
                            currency: eur(),
                            reference: Reference::parse("rent").unwrap(),
                        }))
                        .unwrap();
                    transfer_events.iter().cloned().for_each(|event| transfer.apply(event));
                    for record in [
                        TransferCommand::RecordDebit { tenant: "acme".into(), outcome: StepOutcome::Applied },
                        TransferCommand::RecordCredit {
                            tenant: "acme".into(),
                            outcome: StepOutcome::Declined(domain::TransferDecline::Frozen),
                        },
                        TransferCommand::RecordRefund { tenant: "acme".into() },
                    ] {
                        for event in transfer.decide(record).unwrap() {
                            transfer.apply(event.clone());
                            transfer_events.push(event);
                        }
                    }
                    let writing = store::<Transfer>(&db.pool, every);
                    let written =
                        append_all(&writing, &transfer_id.to_string(), &transfer_events).await;
                    let last_due = written.version / every * every;
                    if last_due > 0 {
                        snapshot_reaches(&db.pool, &transfer_id.to_string(), last_due).await;
                    }
                    let loaded = store::<Transfer>(&db.pool, every)
                        .load(&transfer_id.to_string())
                        .await
                        .unwrap();
                    prop_assert_eq!(loaded.version, written.version);
                    prop_assert_eq!(&loaded.state, &transfer);
                    Ok(())
                })?;
            });
        }

        /// A snapshot the current code must not trust is ignored and the stream folded from
        /// its first event: one of another state shape, one whose event is no longer the
        /// stream's (a restore, a rewrite), and one that does not read as the state.
        #[tokio::test]
        async fn a_snapshot_of_another_shape_or_another_history_is_ignored() {
            let db = TestDatabase::create().await;
            let writing = store::<Account>(&db.pool, 2);
            let id = Uuid::new_v4().to_string();
            let opened = AccountEvent::AccountOpened {
                tenant: "acme".into(),
                owner: Owner::parse("Ada").unwrap(),
                currency: eur(),
                overdraft_limit: OverdraftLimit::default(),
                max_balance: 1000,
            };
            let deposit = |balance_after| AccountEvent::MoneyDeposited {
                amount: Amount::parse(10).unwrap(),
                currency: eur(),
                balance_after,
            };
            let written = append_all(
                &writing,
                &id,
                &[opened, deposit(10), deposit(20), deposit(30)],
            )
            .await;
            snapshot_reaches(&db.pool, &id, 4).await;
            let balance = |state: &Versioned<Account>| state.state.state().map(|a| a.balance);
            let load = || async { store::<Account>(&db.pool, 100).load(&id).await.unwrap() };
            assert_eq!(balance(&load().await), Some(30));

            // Each tampering claims a balance of 999 at version 4; none may be believed.
            let tamperings = [
                "UPDATE snapshots SET state = jsonb_set(state, '{opened,balance}', '999'), state_version = state_version + 1",
                "UPDATE snapshots SET state = jsonb_set(state, '{opened,balance}', '999'), event_hash = sha256('another history')",
                "UPDATE snapshots SET state = '{\"opened\": {\"balance\": 999}}'",
            ];
            for tampering in tamperings {
                let mut tx = db.pool.begin().await.unwrap();
                sqlx::query(tampering).execute(&mut *tx).await.unwrap();
                tx.commit().await.unwrap();
                let loaded = load().await;
                assert_eq!(loaded.version, written.version, "{tampering}");
                assert_eq!(balance(&loaded), Some(30), "{tampering}");
                sqlx::query("DELETE FROM snapshots")
                    .execute(&db.pool)
                    .await
                    .unwrap();
                writing.snapshot_if_due(&id, 3, &written);
                snapshot_reaches(&db.pool, &id, 4).await;
            }
            // The control: an intact snapshot is used, so tampering with its state shows.
            sqlx::query("UPDATE snapshots SET state = jsonb_set(state, '{opened,balance}', '999')")
                .execute(&db.pool)
                .await
                .unwrap();
            assert_eq!(balance(&load().await), Some(999));
        }

        /// A stream longer than a page and without a snapshot (older than snapshots) loads
        /// page by page, and that load leaves a snapshot behind for the next one.
        #[tokio::test]
        async fn a_long_stream_without_a_snapshot_loads_in_pages_and_is_snapshotted() {
            let db = TestDatabase::create().await;
            let id = Uuid::new_v4().to_string();
            let events = PAGE as usize * 2 + 7;
            sqlx::query(
                r#"INSERT INTO events (aggregate_type, aggregate_id, sequence, event_type, event_version, payload, metadata)
                   SELECT 'account', $1, 1, 'AccountOpened', '2',
                          '{"AccountOpened":{"tenant":"acme","owner":"Ada","currency":"EUR","overdraft_limit":0,"max_balance":100000000}}'::json,
                          '{"tenant":"acme"}'::json
                   UNION ALL
                   SELECT 'account', $1, n, 'MoneyDeposited', '1',
                          json_build_object('MoneyDeposited', json_build_object('amount', 1, 'currency', 'EUR', 'balance_after', n - 1)),
                          '{"tenant":"acme"}'
                     FROM generate_series(2, $2) AS n"#,
            )
            .bind(&id)
            .bind(events as i64)
            .execute(&db.pool)
            .await
            .unwrap();
            let loaded = store::<Account>(&db.pool, 500).load(&id).await.unwrap();
            assert_eq!(loaded.version, events as u64);
            assert_eq!(
                loaded.state.state().map(|account| account.balance),
                Some(events as i64 - 1)
            );
            snapshot_reaches(&db.pool, &id, events as u64).await;
        }
    }
}
