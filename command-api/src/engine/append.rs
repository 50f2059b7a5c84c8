//! Group commit: the appends of concurrent commands written to the event store together, one
//! statement and one transaction per batch.
//!
//! An append is one stream's events after the version they were decided on, from one command
//! or from a group of commands on that stream (see `stream`). The stream stays locked until
//! the append is answered, so a batch never carries two appends to one stream. Every append in
//! a batch was decided on a committed version before the batch's transaction takes its xid (at
//! its INSERT), so the log's per-stream order (docs/ARCHITECTURE.md) holds. What a batch saves
//! is the per-transaction cost: one round trip, one statement and one commit (one WAL flush)
//! for many appends instead of one each. Batches form without waiting: a writer takes whatever
//! is queued when it comes free, so a lone command goes out at once and a busy service writes
//! bigger batches.

use std::sync::Arc;

use service_kit::db::kept::KeptConnections;
use sqlx::{PgExecutor, PgPool};
use tokio::sync::{Mutex, mpsc, oneshot};
use tracing::Instrument;

/// Appends one batch holds at most: bounds the statement's size and a batch's latency.
const MAX_BATCH: usize = 128;

const INSERT: &str = "
INSERT INTO events (aggregate_type, aggregate_id, sequence, event_type, event_version, payload, metadata)
SELECT e.aggregate_type, e.aggregate_id, e.sequence, e.event_type, e.event_version,
       e.payload::json, e.metadata::json
  FROM UNNEST($1::text[], $2::text[], $3::int8[], $4::text[], $5::text[], $6::text[], $7::text[])
       AS e(aggregate_type, aggregate_id, sequence, event_type, event_version, payload, metadata)";

/// Events appended to one stream after `version`, serialised: one command's, or several
/// commands' decided in turn.
#[derive(Debug)]
pub(crate) struct Append {
    pub(crate) aggregate_type: &'static str,
    pub(crate) aggregate_id: String,
    pub(crate) version: u64,
    pub(crate) events: Vec<EventRow>,
}

#[derive(Debug)]
pub(crate) struct EventRow {
    pub(crate) event_type: String,
    pub(crate) event_version: String,
    pub(crate) payload: String,
    /// The metadata of the command that produced the event.
    pub(crate) metadata: String,
}

#[derive(Debug, Clone, thiserror::Error)]
pub(crate) enum AppendError {
    /// Another writer appended to the stream first.
    #[error("stream was appended to concurrently")]
    StreamConflict,
    /// The idempotency key was spent by a concurrent request.
    #[error("idempotency key already used")]
    IdempotencyKeyTaken,
    /// The batch failed as a whole, so every command in it shares the one error; whether it
    /// committed is unknown when the connection was lost, so nothing here retries it.
    #[error(transparent)]
    Database(Arc<sqlx::Error>),
    #[error("the event store writer has stopped")]
    WriterStopped,
}

struct Pending {
    append: Append,
    answer: oneshot::Sender<Result<(), AppendError>>,
    span: tracing::Span,
}

/// The queue to the writers; they stop when the last handle is dropped.
#[derive(Clone)]
pub(crate) struct Appender {
    queue: mpsc::Sender<Pending>,
    connections: KeptConnections,
}

impl Appender {
    /// Starts `writers` writers, each with at most one batch in flight on `pool`. A batch is
    /// one statement, so the writers keep their connections out of the pool between batches
    /// (`KeptConnections`: no ping on each release).
    pub(crate) fn start(pool: PgPool, writers: usize) -> Self {
        let (queue, receiver) = mpsc::channel(MAX_BATCH * writers);
        let receiver = Arc::new(Mutex::new(receiver));
        let connections = KeptConnections::new(pool.clone(), writers);
        for _ in 0..writers {
            tokio::spawn(write_batches(
                pool.clone(),
                connections.clone(),
                receiver.clone(),
            ));
        }
        Self { queue, connections }
    }

    /// The connections the writers keep out of the pool.
    pub(crate) fn connections(&self) -> &KeptConnections {
        &self.connections
    }

    /// Writes `append` with whatever else is queued, once its batch has committed.
    pub(crate) async fn append(&self, append: Append) -> Result<(), AppendError> {
        let (answer, answered) = oneshot::channel();
        let pending = Pending {
            append,
            answer,
            span: tracing::Span::current(),
        };
        self.queue
            .send(pending)
            .await
            .map_err(|_| AppendError::WriterStopped)?;
        answered.await.map_err(|_| AppendError::WriterStopped)?
    }
}

async fn write_batches(
    pool: PgPool,
    kept: KeptConnections,
    queue: Arc<Mutex<mpsc::Receiver<Pending>>>,
) {
    loop {
        let batch = {
            let mut queue = queue.lock().await;
            let Some(first) = queue.recv().await else {
                return;
            };
            let mut batch = vec![first];
            while batch.len() < MAX_BATCH {
                match queue.try_recv() {
                    Ok(next) => batch.push(next),
                    Err(_) => break,
                }
            }
            batch
        };
        let span = tracing::debug_span!("append_batch", appends = batch.len());
        for pending in &batch {
            span.follows_from(&pending.span);
        }
        write(&pool, &kept, batch).instrument(span).await;
    }
}

async fn write(pool: &PgPool, kept: &KeptConnections, batch: Vec<Pending>) {
    let events: usize = batch
        .iter()
        .map(|pending| pending.append.events.len())
        .sum();
    metrics::histogram!("ledger_append_batch_events").record(events as f64);
    let result = match kept.get().await {
        Ok(mut connection) => {
            let result = insert(
                &mut *connection,
                batch.iter().map(|pending| &pending.append),
            )
            .await;
            connection.keep_if_usable(&result);
            result
        }
        Err(err) => Err(err),
    };
    match result {
        Ok(()) => {
            for pending in batch {
                let _ = pending.answer.send(Ok(()));
            }
        }
        Err(err) if batch.len() > 1 && is_unique_violation(&err) => {
            // The statement failed as a whole, so nothing of it committed: writing each append
            // on its own finds the one that conflicts and commits the others.
            tracing::debug!("a batched append conflicted; writing the batch's appends one by one");
            let results = futures::future::join_all(
                batch
                    .iter()
                    .map(|pending| insert(pool, std::iter::once(&pending.append))),
            )
            .await;
            for (pending, result) in batch.into_iter().zip(results) {
                let _ = pending.answer.send(result.map_err(classify));
            }
        }
        Err(err) => {
            let err = classify(err);
            for pending in batch {
                let _ = pending.answer.send(Err(err.clone()));
            }
        }
    }
}

async fn insert<'a>(
    executor: impl PgExecutor<'_>,
    appends: impl Iterator<Item = &'a Append>,
) -> Result<(), sqlx::Error> {
    let mut aggregate_types = Vec::new();
    let mut aggregate_ids = Vec::new();
    let mut sequences = Vec::new();
    let mut event_types = Vec::new();
    let mut event_versions = Vec::new();
    let mut payloads = Vec::new();
    let mut metadata = Vec::new();
    for append in appends {
        for (sequence, event) in (append.version + 1..).zip(&append.events) {
            aggregate_types.push(append.aggregate_type);
            aggregate_ids.push(append.aggregate_id.as_str());
            sequences.push(sequence as i64);
            event_types.push(event.event_type.as_str());
            event_versions.push(event.event_version.as_str());
            payloads.push(event.payload.as_str());
            metadata.push(event.metadata.as_str());
        }
    }
    sqlx::query(INSERT)
        .bind(aggregate_types)
        .bind(aggregate_ids)
        .bind(sequences)
        .bind(event_types)
        .bind(event_versions)
        .bind(payloads)
        .bind(metadata)
        .execute(executor)
        .await?;
    Ok(())
}

fn is_unique_violation(err: &sqlx::Error) -> bool {
    matches!(err, sqlx::Error::Database(err) if err.is_unique_violation())
}

fn classify(err: sqlx::Error) -> AppendError {
    match &err {
        sqlx::Error::Database(db) if db.is_unique_violation() => match db.constraint() {
            Some("events_idempotency_key") => AppendError::IdempotencyKeyTaken,
            // The primary key (another writer took the version), or `events_transfer_step`
            // (another writer of the stream recorded the step first): a lost race either way,
            // and the retry, on the caught-up stream, finds what the other writer did.
            _ => AppendError::StreamConflict,
        },
        _ => AppendError::Database(Arc::new(err)),
    }
}

#[cfg(test)]
mod tests {
    use service_kit::testing::TestDatabase;

    use super::*;

    fn deposit(stream: &str, version: u64, key: Option<&str>) -> Append {
        let metadata = match key {
            Some(key) => serde_json::json!({"tenant": "acme", "idempotency_key": key}),
            None => serde_json::json!({"tenant": "acme"}),
        };
        Append {
            aggregate_type: "account",
            aggregate_id: stream.to_owned(),
            version,
            events: vec![EventRow {
                event_type: "MoneyDeposited".into(),
                event_version: "1".into(),
                payload: r#"{"amount": 1}"#.into(),
                metadata: metadata.to_string(),
            }],
        }
    }

    /// Writes `appends` as one batch and returns each one's answer.
    async fn write_batch(pool: &PgPool, appends: Vec<Append>) -> Vec<Result<(), AppendError>> {
        let (batch, answers): (Vec<_>, Vec<_>) = appends
            .into_iter()
            .map(|append| {
                let (answer, answered) = oneshot::channel();
                let span = tracing::Span::none();
                (
                    Pending {
                        append,
                        answer,
                        span,
                    },
                    answered,
                )
            })
            .unzip();
        write(pool, &KeptConnections::new(pool.clone(), 1), batch).await;
        futures::future::join_all(answers)
            .await
            .into_iter()
            .map(|answer| answer.expect("every append is answered"))
            .collect()
    }

    /// The first append to each of `streams`.
    fn first_deposits(streams: &[&str]) -> Vec<Append> {
        streams
            .iter()
            .map(|stream| deposit(stream, 0, None))
            .collect()
    }

    async fn transactions(pool: &PgPool) -> i64 {
        sqlx::query_scalar("SELECT count(DISTINCT tx_id) FROM events")
            .fetch_one(pool)
            .await
            .unwrap()
    }

    async fn streams(pool: &PgPool) -> Vec<(String, i64)> {
        sqlx::query_as(
            "SELECT aggregate_id, max(sequence) FROM events GROUP BY aggregate_id ORDER BY 1",
        )
        .fetch_all(pool)
        .await
        .unwrap()
    }

    #[tokio::test]
    async fn a_batch_commits_every_append_in_one_transaction() {
        let db = TestDatabase::create().await;
        let answers = write_batch(&db.pool, first_deposits(&["a", "b", "c"])).await;
        assert!(answers.iter().all(Result::is_ok), "{answers:?}");
        assert_eq!(transactions(&db.pool).await, 1);
        assert_eq!(
            streams(&db.pool).await,
            [("a".into(), 1), ("b".into(), 1), ("c".into(), 1)]
        );
    }

    #[tokio::test]
    async fn a_stale_append_fails_alone_and_the_rest_of_its_batch_commits() {
        let db = TestDatabase::create().await;
        assert!(write_batch(&db.pool, vec![deposit("b", 0, None)]).await[0].is_ok());

        // "b" builds on version 0, which another writer has already taken.
        let answers = write_batch(&db.pool, first_deposits(&["a", "b", "c"])).await;
        assert!(answers[0].is_ok(), "{answers:?}");
        assert!(matches!(answers[1], Err(AppendError::StreamConflict)));
        assert!(answers[2].is_ok(), "{answers:?}");
        assert_eq!(
            streams(&db.pool).await,
            [("a".into(), 1), ("b".into(), 1), ("c".into(), 1)]
        );
    }

    #[tokio::test]
    async fn one_idempotency_key_twice_in_a_batch_is_spent_once() {
        let db = TestDatabase::create().await;
        let answers = write_batch(
            &db.pool,
            vec![deposit("a", 0, Some("k")), deposit("b", 0, Some("k"))],
        )
        .await;
        let taken = answers
            .iter()
            .filter(|answer| matches!(answer, Err(AppendError::IdempotencyKeyTaken)))
            .count();
        assert_eq!(taken, 1, "{answers:?}");
        assert_eq!(answers.iter().filter(|answer| answer.is_ok()).count(), 1);
        assert_eq!(streams(&db.pool).await.len(), 1);
    }

    #[tokio::test]
    async fn any_other_failure_is_every_appends_answer_and_commits_nothing() {
        let db = TestDatabase::create().await;
        let mut broken = deposit("b", 0, None);
        broken.events[0].payload = "not json".into();
        let answers = write_batch(
            &db.pool,
            vec![deposit("a", 0, None), broken, deposit("c", 0, None)],
        )
        .await;
        assert!(
            answers
                .iter()
                .all(|answer| matches!(answer, Err(AppendError::Database(_)))),
            "{answers:?}"
        );
        assert!(streams(&db.pool).await.is_empty());
    }

    #[tokio::test]
    async fn concurrent_appends_share_transactions() {
        let db = TestDatabase::create().await;
        let appender = Appender::start(db.pool.clone(), 2);
        let streams_written = 50;
        let answers = futures::future::join_all(
            (0..streams_written).map(|n| appender.append(deposit(&format!("s{n:02}"), 0, None))),
        )
        .await;
        assert!(answers.iter().all(Result::is_ok), "{answers:?}");
        assert_eq!(streams(&db.pool).await.len(), streams_written);
        let transactions = transactions(&db.pool).await;
        assert!(
            transactions < streams_written as i64,
            "{transactions} transactions"
        );
    }
}
