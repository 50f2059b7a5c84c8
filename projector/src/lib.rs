//! The projector: turns the account and transfer events on Kafka into the read models the query
//! API serves.
//!
//! # Layout
//! - [`model`]: the account read-model rows and how one event changes them.
//! - [`store`]: reading and writing those rows; reading streams back from the event store.
//! - [`transfers`]: the `transfers` read model, refolded from the event store per message.
//! - [`projection`]: the [`projection::ReadModel`] abstraction over both, and the list of
//!   read models that `rebuild` and `check` cover.
//! - [`rebuild`]: replaying the event store into fresh tables and swapping them in.
//! - [`check`]: comparing the read models with a fold of the event store.
//! - `Projector` (here): the consumer loop.
//!
//! Guarantees: offsets are committed only after the read-model transaction committed; each row
//! records the last stream version applied, so a re-delivered event is skipped and a gap (an
//! event arriving before its predecessors) is healed from the event store. Kafka is not
//! trusted: an account message only says "stream S reached version N"; it is accepted only if
//! it is exactly the stored event at (S, N) (id, hash, data, headers), and what is applied is
//! always read from the event store. A message that is not (forged, or malformed) goes to the
//! dead-letter topic with the reason, counted in `ledger_projector_unverified_total`, and the
//! partition moves on. A stored event the projection cannot read parks its stream (recorded in
//! `projector_parked_streams`, counted, shown by readiness) while every other stream goes on;
//! the stream resumes with its next event once a build can read it, or with `projector
//! rebuild`. Database failures are retried until they pass: nothing is skipped because
//! Postgres was down.

use std::collections::HashMap;
use std::future::Future;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::time::Duration;

use cqrs_es::Aggregate;
use domain::{Account, Transfer};
use futures::StreamExt;
use rdkafka::consumer::{CommitMode, Consumer, StreamConsumer};
use rdkafka::error::KafkaError;
use rdkafka::message::{BorrowedMessage, Header, Headers, Message, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::types::RDKafkaErrorCode;
use service_kit::config::{ConfigError, Setting, Settings};
use service_kit::db::{self, DatabaseConfig, DatabaseError};
use service_kit::http::{Need, OpsServer, Readiness};
use service_kit::kafka::{self, BrokerProbe, ConsumerLag, KafkaConfig, headers};
use service_kit::retry;
use service_kit::server::{ANY_LOCAL_PORT, ServerLimits};
use service_kit::telemetry;
use sqlx::{Connection, PgConnection, PgPool};
use uuid::Uuid;

use crate::model::{AccountRow, EntryRow};
use crate::store::{Parked, Tables};

pub mod check;
pub mod model;
pub mod projection;
pub mod rebuild;
pub mod store;
pub mod transfers;

/// Largest message (key, value and headers) copied whole to the dead-letter topic, well under
/// librdkafka's default `message.max.bytes` (1,000,000) with room for our headers. Only a
/// foreign producer makes bigger ones; those are dead-lettered with our headers alone, and
/// `ledger_truncated` giving the original size, rather than failing to be dead-lettered forever.
const DEAD_LETTER_COPY_LIMIT: usize = 512 * 1024;

/// Messages applied in one read-model transaction, at most.
const MAX_BATCH: usize = 1000;

pub const PROJECTOR_GROUP: Setting<&str> = Setting::new(
    "PROJECTOR_GROUP",
    "ledger-projector",
    "the projector's consumer group",
);
pub const PROJECTOR_ADDR: Setting<SocketAddr> = Setting::new(
    "PROJECTOR_ADDR",
    SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::LOCALHOST, 8082)),
    "the projector's ops server: `/metrics`, `/health/live`, `/health/ready`",
);

/// The variables the projector reads, beyond [`service_kit::config::SETTINGS`].
pub const SETTINGS: Settings = &[&PROJECTOR_GROUP, &PROJECTOR_ADDR];

#[derive(Debug, Clone)]
pub struct Config {
    pub database: DatabaseConfig,
    pub kafka: KafkaConfig,
    /// [`PROJECTOR_GROUP`]: the consumer group.
    pub group: String,
    /// [`PROJECTOR_ADDR`] (port 0 picks one): where the health probes and `/metrics` are
    /// served.
    pub listen: SocketAddr,
    /// The bounds of that listener: see `service_kit::server`.
    pub server: ServerLimits,
}

impl Config {
    pub fn from_env() -> Result<Self, ConfigError> {
        Ok(Self {
            database: DatabaseConfig::from_env()?,
            kafka: KafkaConfig::from_env()?,
            group: PROJECTOR_GROUP.read()?,
            listen: PROJECTOR_ADDR.read()?,
            server: ServerLimits::from_env()?,
        })
    }

    /// For tests: `database` and `kafka`, a consumer group of the test's own (named after its
    /// topic prefix, so that tests sharing a broker do not rebalance each other), and the ops
    /// listener on a free port.
    pub fn for_tests(database: DatabaseConfig, kafka: KafkaConfig) -> Self {
        Self {
            database,
            group: format!("{}-projector", kafka.topic_prefix),
            kafka,
            listen: ANY_LOCAL_PORT,
            server: ServerLimits::default(),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ProjectorError {
    #[error(transparent)]
    Database(#[from] DatabaseError),
    #[error("kafka: {0}")]
    Kafka(#[from] rdkafka::error::KafkaError),
    #[error(transparent)]
    Setup(#[from] kafka::KafkaSetupError),
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
}

/// A message that will not be applied, and why.
struct Rejected {
    partition: i32,
    offset: i64,
    reason: String,
}

pub struct Projector {
    pool: PgPool,
    consumer: StreamConsumer<ConsumerLag>,
    dead_letters: FutureProducer,
    /// Health probes and `/metrics`, until served.
    ops: Option<OpsServer>,
    transfer_topic: String,
    deadletter_topic: String,
}

impl Projector {
    /// Connects to the database (migrating it) and the brokers, creates the topics if needed,
    /// and joins the consumer group.
    pub async fn build(config: Config) -> Result<Self, ProjectorError> {
        let pool = db::connect(&config.database).await?;
        db::migrate(&pool).await?;
        let account_topic = config.kafka.events_topic(Account::TYPE);
        let transfer_topic = config.kafka.events_topic(Transfer::TYPE);
        let deadletter_topic = config.kafka.deadletter_topic();
        config
            .kafka
            .ensure_topics(&[
                account_topic.clone(),
                transfer_topic.clone(),
                deadletter_topic.clone(),
            ])
            .await?;
        let consumer: StreamConsumer<ConsumerLag> = config
            .kafka
            .consumer(&config.group)
            .create_with_context(ConsumerLag("ledger_projector_lag_messages"))?;
        consumer.subscribe(&[&account_topic, &transfer_topic])?;
        let readiness = Readiness::new(pool.clone())
            .with_broker(BrokerProbe::new(&config.kafka)?, Need::Required)
            .reporting_parked_streams();
        let ops = OpsServer::bind(config.listen, readiness, "projector", config.server)
            .await
            .map_err(|source| ProjectorError::Bind {
                addr: config.listen,
                source,
            })?;
        // Streams parked before a restart stay parked: the gauge (and its alert) says so from
        // the start, not only once another stream parks. After `bind`, which installs the
        // metrics recorder.
        record_parked_streams(&pool).await;
        Ok(Self {
            pool,
            consumer,
            ops: Some(ops),
            dead_letters: config
                .kafka
                .producer()
                // Dead letters need no order, and a gap must not leave this producer unusable.
                .set("enable.gapless.guarantee", "false")
                .create()?,
            transfer_topic,
            deadletter_topic,
        })
    }

    /// The port of the health probes and `/metrics` (useful when configured with port 0).
    pub fn ops_port(&self) -> u16 {
        self.ops.as_ref().map_or(0, OpsServer::port)
    }

    /// Projects until `shutdown` resolves. The batch in hand is finished first.
    pub async fn run_until_stopped(mut self, shutdown: impl Future<Output = ()> + Send) {
        tokio::pin!(shutdown);
        let (stop_ops, ops_stopped) = tokio::sync::oneshot::channel::<()>();
        let ops = self.ops.take().map(|ops| {
            tokio::spawn(ops.serve(async {
                let _ = ops_stopped.await;
            }))
        });
        let mut batches = self.consumer.stream().ready_chunks(MAX_BATCH);
        loop {
            let batch = tokio::select! {
                () = &mut shutdown => break,
                batch = batches.next() => match batch {
                    Some(batch) => batch,
                    None => break,
                },
            };
            let messages: Vec<BorrowedMessage<'_>> = batch
                .into_iter()
                .filter_map(|message| {
                    message
                        .map_err(|err| tracing::warn!(error = %err, "kafka consumer error"))
                        .ok()
                })
                .collect();
            self.handle(&messages).await;
        }
        let _ = stop_ops.send(());
        if let Some(ops) = ops {
            let _ = ops.await;
        }
        tracing::info!("projector stopped");
    }

    /// Applies a batch and commits its offsets; retries database failures until they pass.
    #[tracing::instrument(skip_all, fields(messages = messages.len()))]
    async fn handle(&self, messages: &[BorrowedMessage<'_>]) {
        // One span per traced message, in the trace of the command that caused it, open until
        // the batch that applies it is done.
        let _traced: Vec<tracing::Span> = if telemetry::exporting() {
            messages.iter().filter_map(message_span).collect()
        } else {
            Vec::new()
        };
        let mut notices = Vec::with_capacity(messages.len());
        let mut rejected = Vec::new();
        let mut transfers: Vec<(i32, i64, Uuid)> = Vec::new();
        for message in messages {
            if message.topic() == self.transfer_topic {
                match transfer_id(message) {
                    Ok(id) => transfers.push((message.partition(), message.offset(), id)),
                    Err(reason) => rejected.push(Rejected {
                        partition: message.partition(),
                        offset: message.offset(),
                        reason,
                    }),
                }
                continue;
            }
            match notice(message) {
                Ok((account_id, sequence)) => notices.push(Notice {
                    message,
                    account_id,
                    sequence,
                }),
                Err(reason) => {
                    // Our relay writes no such message: someone else produced it.
                    metrics::counter!("ledger_projector_unverified_total").increment(1);
                    rejected.push(Rejected {
                        partition: message.partition(),
                        offset: message.offset(),
                        reason,
                    });
                }
            }
        }
        let refused = retry::until_ok(
            || self.apply(&notices),
            |err, pause| tracing::error!(error = %err, retry_in_ms = pause.as_millis() as u64, "applying a batch failed; retrying"),
        )
        .await;
        rejected.extend(refused);
        if !transfers.is_empty() {
            rejected.extend(self.project_transfers(&transfers).await);
        }
        for rejection in &rejected {
            if let Some(message) = messages
                .iter()
                .find(|m| m.partition() == rejection.partition && m.offset() == rejection.offset)
            {
                self.dead_letter(message, &rejection.reason).await;
            }
        }
        for message in messages {
            let applied = !rejected
                .iter()
                .any(|r| r.partition == message.partition() && r.offset == message.offset());
            if applied {
                metrics::counter!("ledger_projector_applied_total", "topic" => message.topic().to_owned())
                    .increment(1);
            }
            if let Err(err) = self.consumer.store_offset_from_message(message) {
                tracing::warn!(error = %err, "storing offset failed");
            }
        }
        if let Err(err) = self.consumer.commit_consumer_state(CommitMode::Async) {
            tracing::warn!(error = %err, "committing offsets failed; they will be re-delivered");
        }
    }

    /// Applies what `notices` announce, from the event store. Returns the messages refused:
    /// those that are not exactly the stored event they name.
    ///
    /// The usual batch is read without locks and written by one statement (see
    /// `store::live_state` for why that is safe). A batch that parks or resumes a stream is
    /// folded again in a transaction with its rows locked, so that its parking and its rows
    /// agree with what another projector overlapping it during a rebalance wrote meanwhile.
    async fn apply(&self, notices: &[Notice<'_, '_>]) -> Result<Vec<Rejected>, sqlx::Error> {
        let mut connection = self.pool.acquire().await?;
        let mut folded = fold(&mut connection, notices, false).await?;
        if folded.parked.is_empty() && folded.resumed.is_empty() {
            // Its notifications, delivered at commit, wake queries waiting for a `min_version`
            // and feed subscriptions.
            store::save(
                &mut connection,
                Tables::LIVE,
                &folded.changed_rows(),
                &folded.entries,
            )
            .await?;
        } else {
            let mut tx = connection.begin().await?;
            folded = fold(&mut tx, notices, true).await?;
            store::save(
                &mut tx,
                Tables::LIVE,
                &folded.changed_rows(),
                &folded.entries,
            )
            .await?;
            store::park(&mut tx, &folded.parked, &folded.resumed).await?;
            tx.commit().await?;
            record_parked_streams(&self.pool).await;
        }
        for parked in &folded.parked {
            tracing::error!(account = %parked.account_id, sequence = parked.sequence, reason = parked.reason, "parked an account stream the projection cannot continue");
            metrics::counter!("ledger_projector_parked_total").increment(1);
        }
        metrics::counter!("ledger_projector_unverified_total")
            .increment(folded.refused.len() as u64);
        Ok(folded.refused)
    }

    /// Refolds the transfers the messages name; retries database failures until they pass.
    /// Returns the messages of transfers whose streams cannot be folded.
    async fn project_transfers(&self, messages: &[(i32, i64, Uuid)]) -> Vec<Rejected> {
        let mut ids: Vec<Uuid> = messages.iter().map(|(_, _, id)| *id).collect();
        ids.sort_unstable();
        ids.dedup();
        let ids = &ids;
        let unreadable = retry::until_ok(
            || async move {
                let mut tx = self.pool.begin().await?;
                let unreadable = transfers::project(&mut tx, ids).await?;
                db::channels::notify_changed(&mut tx, db::channels::ReadModel::Transfer, ids)
                    .await?;
                tx.commit().await?;
                Ok::<_, sqlx::Error>(unreadable)
            },
            |err, pause| tracing::error!(error = %err, retry_in_ms = pause.as_millis() as u64, "projecting transfers failed; retrying"),
        )
        .await;
        messages
            .iter()
            .filter_map(|(partition, offset, id)| {
                unreadable
                    .iter()
                    .find(|(bad, _)| bad == id)
                    .map(|(_, reason)| Rejected {
                        partition: *partition,
                        offset: *offset,
                        reason: reason.clone(),
                    })
            })
            .collect()
    }

    /// Publishes `message` to the dead-letter topic with `reason`, retrying until the broker
    /// takes it: a poison message is never dropped.
    async fn dead_letter(&self, message: &BorrowedMessage<'_>, reason: &str) {
        tracing::warn!(
            partition = message.partition(),
            offset = message.offset(),
            reason,
            "dead-lettering a message"
        );
        metrics::counter!("ledger_projector_deadletters_total", "topic" => message.topic().to_owned())
            .increment(1);
        let original_headers = message.headers();
        let key = message.key().unwrap_or_default();
        let payload = message.payload().unwrap_or_default();
        let size = key.len()
            + payload.len()
            + original_headers.map_or(0, |headers| {
                headers
                    .iter()
                    .map(|header| header.key.len() + header.value.map_or(0, <[u8]>::len))
                    .sum()
            });
        let mut whole = size <= DEAD_LETTER_COPY_LIMIT;
        loop {
            let (record_key, record_payload, record_headers) = if whole {
                (key, payload, original_headers)
            } else {
                (&[][..], &[][..], None)
            };
            let mut headers = OwnedHeaders::new();
            for header in record_headers.iter().flat_map(|headers| headers.iter()) {
                headers = headers.insert(header);
            }
            let partition = message.partition().to_string();
            let offset = message.offset().to_string();
            let truncated = size.to_string();
            let mut ours = vec![
                (headers::ERROR, reason),
                (headers::ORIGINAL_TOPIC, message.topic()),
                (headers::ORIGINAL_PARTITION, partition.as_str()),
                (headers::ORIGINAL_OFFSET, offset.as_str()),
            ];
            if !whole {
                ours.push((headers::TRUNCATED, truncated.as_str()));
            }
            for (key, value) in ours {
                headers = headers.insert(Header {
                    key,
                    value: Some(value),
                });
            }
            let record = FutureRecord::to(&self.deadletter_topic)
                .key(record_key)
                .payload(record_payload)
                .headers(headers);
            match self
                .dead_letters
                .send(record, Duration::from_secs(10))
                .await
            {
                Ok(_) => return,
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::MessageSizeTooLarge), _))
                    if whole =>
                {
                    whole = false;
                }
                Err((err, _)) => {
                    tracing::error!(error = %err, "dead-lettering failed; retrying");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
            }
        }
    }
}

/// What a batch of account messages changes in the read model.
struct Folded {
    rows: HashMap<Uuid, AccountRow>,
    /// The accounts whose rows moved, in id order.
    changed: Vec<Uuid>,
    entries: Vec<EntryRow>,
    /// Streams parked by this batch (not those parked before at the same event).
    parked: Vec<Parked>,
    /// Streams parked before that moved on.
    resumed: Vec<Uuid>,
    refused: Vec<Rejected>,
}

impl Folded {
    fn changed_rows(&self) -> Vec<&AccountRow> {
        self.changed
            .iter()
            .filter_map(|id| self.rows.get(id))
            .collect()
    }
}

/// Folds what `notices` announce onto the live rows, from the stored events (with the rows
/// locked if `lock`); writes nothing.
async fn fold(
    connection: &mut PgConnection,
    notices: &[Notice<'_, '_>],
    lock: bool,
) -> Result<Folded, sqlx::Error> {
    let mut ids: Vec<Uuid> = notices.iter().map(|notice| notice.account_id).collect();
    ids.sort_unstable();
    ids.dedup();
    // `already_parked`: streams parked earlier. Only their blocking event is read again (it
    // may be readable now), never the tail behind it, whatever a message announces.
    let (mut rows, already_parked) = store::live_state(connection, &ids, lock).await?;
    let version_of =
        |rows: &HashMap<Uuid, AccountRow>, id: &Uuid| rows.get(id).map_or(0, |row| row.version);
    let mut exact = Vec::new();
    let mut up_to: HashMap<Uuid, i64> = HashMap::new();
    for notice in notices {
        let id = notice.account_id;
        if notice.sequence <= version_of(&rows, &id) || already_parked.contains_key(&id) {
            exact.push((id, notice.sequence));
        }
        if notice.sequence > version_of(&rows, &id) {
            let limit = already_parked.get(&id).copied().unwrap_or(i64::MAX);
            let highest = up_to.entry(id).or_default();
            *highest = (*highest).max(notice.sequence.min(limit));
        }
    }
    let ranges: Vec<(Uuid, i64, i64)> = up_to
        .iter()
        .map(|(id, highest)| (*id, version_of(&rows, id), *highest))
        .collect();
    let stored = store::announced_events(connection, &exact, &ranges).await?;

    let mut changed: Vec<Uuid> = Vec::new();
    let mut entries: Vec<EntryRow> = Vec::new();
    let mut parked: Vec<Parked> = Vec::new();
    let mut refused = Vec::new();
    for notice in notices {
        let id = notice.account_id;
        let message = notice.message;
        let verified = match stored.get(&(id, notice.sequence)) {
            None => Err(format!(
                "event {} of account {id} is not in the event store",
                notice.sequence
            )),
            Some(event) => {
                kafka::verify(event, message.key(), message.headers(), message.payload())
            }
        };
        if let Err(reason) = verified {
            refused.push(Rejected {
                partition: message.partition(),
                offset: message.offset(),
                reason,
            });
            continue;
        }
        if parked.iter().any(|parked| parked.account_id == id) {
            continue;
        }
        let mut row = rows.remove(&id);
        let before = row.as_ref().map_or(0, |row| row.version);
        let mut version = before;
        while version < notice.sequence {
            let next = version + 1;
            let event = stored.get(&(id, next));
            if event.is_none() && already_parked.get(&id).is_some_and(|at| next > *at) {
                // Resumed, but only its blocking event was read: the account's next
                // message (or `projector rebuild`) brings the rest.
                break;
            }
            let applied = match event {
                None => Err(format!("event {next} is missing from the event store")),
                Some(stored) => store::decode(stored)
                    .map_err(|err| err.to_string())
                    .and_then(|(_, event)| {
                        model::apply(&mut row, id, stored, &event, &mut entries)
                            .map_err(|err| err.to_string())
                    }),
            };
            if let Err(reason) = applied {
                parked.push(Parked {
                    account_id: id,
                    sequence: next,
                    reason,
                });
                break;
            }
            version = next;
        }
        if version > before {
            changed.push(id);
        }
        if let Some(row) = row {
            rows.insert(id, row);
        }
    }
    changed.sort_unstable();
    changed.dedup();
    let resumed: Vec<Uuid> = changed
        .iter()
        .filter(|id| already_parked.contains_key(id))
        .filter(|id| !parked.iter().any(|parked| parked.account_id == **id))
        .copied()
        .collect();
    parked.retain(|parked| already_parked.get(&parked.account_id) != Some(&parked.sequence));
    // In id order, as the rows: two projectors parking the same streams cannot deadlock.
    parked.sort_by_key(|parked| parked.account_id);
    Ok(Folded {
        rows,
        changed,
        entries,
        parked,
        resumed,
        refused,
    })
}

/// Sets `ledger_projector_parked_streams` from the table.
async fn record_parked_streams(pool: &PgPool) {
    match store::parked_count(pool).await {
        Ok(count) => metrics::gauge!("ledger_projector_parked_streams").set(count as f64),
        Err(err) => tracing::warn!(error = %err, "counting parked streams failed"),
    }
}

/// A span continuing the trace `message` carries, if it carries one.
fn message_span(message: &BorrowedMessage<'_>) -> Option<tracing::Span> {
    let traceparent = message
        .headers()
        .and_then(|headers| kafka::header(headers, headers::TRACEPARENT))?;
    let span = tracing::info_span!(
        "project",
        topic = message.topic(),
        partition = message.partition(),
        offset = message.offset()
    );
    telemetry::continue_trace(&span, Some(traceparent));
    Some(span)
}

/// The transfer a message of the transfer topic is about, or why it names none.
fn transfer_id(message: &BorrowedMessage<'_>) -> Result<Uuid, String> {
    let received = kafka::decode(Transfer::TYPE, message.headers(), message.payload())
        .map_err(|err| err.to_string())?;
    received
        .aggregate_id
        .parse()
        .map_err(|_| "ce_subject is not a transfer id".to_owned())
}

/// An account message: the stream and version it announces. Only its stream and version are
/// read from it; what is applied comes from the event store, and only once the message is
/// exactly the stored event it names.
struct Notice<'b, 'm> {
    message: &'b BorrowedMessage<'m>,
    account_id: Uuid,
    sequence: i64,
}

/// The account stream and version a message announces, or why it announces none.
fn notice(message: &BorrowedMessage<'_>) -> Result<(Uuid, i64), String> {
    let received = kafka::decode(Account::TYPE, message.headers(), message.payload())
        .map_err(|err| err.to_string())?;
    let account_id: Uuid = received
        .aggregate_id
        .parse()
        .map_err(|_| "ce_subject is not an account id".to_owned())?;
    if message.key() != Some(received.aggregate_id.as_bytes()) {
        return Err("message key is not ce_subject".into());
    }
    Ok((account_id, received.sequence))
}
