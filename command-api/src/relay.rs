//! The relay: publishes the event log to Kafka in commit order, at least once.
//!
//! One relay is active among all replicas: the holder of a Postgres advisory lock, taken on a
//! connection of its own, so the lock goes when the leader's process or connection dies and
//! another replica takes over at its next try. The leader moves its checkpoint on that same
//! connection, so every batch proves it still holds the lock: a leader whose connection was
//! cut stops at its next batch, and its checkpoint never moves again. Server-side TCP
//! keepalives on the connection let Postgres notice a leader whose host vanished within
//! [`LEADER_KEEPALIVE`]'s bound, rather than the two hours of the kernel's default. The leader reads batches of final events after
//! its checkpoint (see `service_kit::event_log`) and sends them with an idempotent producer,
//! which keeps their order per partition. A few batches may be in flight at once while a read
//! fills a whole batch (a backlog); the checkpoint passes a batch only once the broker
//! acknowledged it and every batch before. A failure before that resends from the checkpoint:
//! duplicates are possible (consumers dedupe by `ce_id`), loss is not.
//!
//! Once caught up, it sleeps until an append in this process, a `NOTIFY ledger_events` from
//! another replica, or a slow poll, whichever comes first; but while a batch that did not fill
//! up is unacknowledged, appends do not wake it: what they add goes out as one batch when the
//! acknowledgement comes, so an append may wait for the batches in flight to be acknowledged
//! before it is sent. Under load a batch then holds what one round trip gathered, rather than each
//! append becoming a batch of its own: every batch costs produce requests (one per
//! partition), their acknowledgements and a checkpoint commit, and at a few thousand events a
//! second those, not the events, were most of the relay's work (`cargo xtask bench commands`
//! as deployed: the command API's CPU per deposit fell by a fifth with this). An append with
//! nothing in flight goes out at once. The relay reads only when something announced events
//! (an append, a notification, the poll) or its last read filled a batch, and one read also
//! tells whether events wait behind an open transaction: at a few hundred appends a second each
//! append costs it one read and one checkpoint move, not reads that find nothing.

use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

use std::collections::VecDeque;
use std::convert::Infallible;

use backon::BackoffBuilder;
use cqrs_es::Aggregate;
use domain::{Account, Transfer};
use rdkafka::error::KafkaError;
use rdkafka::producer::{DeliveryFuture, FutureProducer, FutureRecord, Producer, PurgeConfig};
use rdkafka::types::RDKafkaErrorCode;
use service_kit::db::channels;
use service_kit::event_log::{self, LogPosition, LoggedEvent};
use service_kit::kafka::{self, KafkaConfig};
use service_kit::retry;
use sqlx::postgres::PgListener;
use sqlx::{Connection, PgConnection, PgPool};

use crate::engine::AppendSignal;

/// The `log_checkpoints` row of the Kafka relay.
pub const READER: &str = "kafka-relay";
/// Key of the leadership advisory lock (`hashtext('ledger.relay')` would do as well; a
/// constant is easier to find in `pg_locks`).
const LEADER_LOCK: i64 = 0x4c45_4447_4552;
/// Server-side TCP keepalive of the leader's lock connection: idle seconds before the first
/// probe, seconds between probes, probes lost before Postgres drops the connection (and the
/// lock with it). A vanished leader is replaced within about 10 + 3 × 5 = 25 s plus
/// `RELAY_LEADER_RETRY_MS`.
const LEADER_KEEPALIVE: (u32, u32, u32) = (10, 5, 3);
/// How often a leader checks that its lock connection is alive when no checkpoint move has
/// shown it: while it waits for the broker, and when it is woken.
const LOCK_CHECK: Duration = Duration::from_secs(1);
/// How long the lock's connection may take to answer before the leader steps down: well
/// under the keepalives' 25 s, after which Postgres gives the lock to another replica.
const LOCK_TIMEOUT: Duration = Duration::from_secs(5);
/// Batches sent but not yet acknowledged, at most.
const MAX_IN_FLIGHT: usize = 4;
/// How soon the relay looks again when events wait behind an open transaction.
const PENDING_POLL: Duration = Duration::from_millis(10);
/// How often the leader measures its lag for `/metrics`.
const LAG_INTERVAL: Duration = Duration::from_secs(1);

/// Relay settings.
#[derive(Debug, Clone)]
pub struct RelayConfig {
    pub kafka: KafkaConfig,
    /// Events per batch read and sent.
    pub batch_size: i64,
    /// The fallback poll, when nothing wakes the relay.
    pub idle_poll: Duration,
    /// How often a non-leader tries to become the leader.
    pub leader_retry: Duration,
}

#[derive(Debug, thiserror::Error)]
enum RelayError {
    #[error(transparent)]
    Database(#[from] sqlx::Error),
    #[error("kafka: {0}")]
    Kafka(#[from] rdkafka::error::KafkaError),
    #[error("another relay moved the checkpoint: leadership lost")]
    Deposed,
    #[error("the producer dropped a delivery")]
    ProducerGone,
    #[error("the leadership lock's connection did not answer: leadership given up")]
    LockUnanswered,
}

/// Checks that the lock's connection, and so the lock, is alive. A connection the network
/// dropped silently would not fail for many minutes: not answering in time ends the term too,
/// since Postgres will have released the lock by the time the keepalives give up.
async fn still_leader(lock: &mut PgConnection) -> Result<(), RelayError> {
    tokio::time::timeout(LOCK_TIMEOUT, lock.ping())
        .await
        .map_err(|_| RelayError::LockUnanswered)??;
    Ok(())
}

pub struct Relay {
    config: RelayConfig,
    pool: PgPool,
    signal: AppendSignal,
}

impl Relay {
    /// Checks the producer settings; connects only when run.
    pub fn new(
        config: RelayConfig,
        pool: PgPool,
        signal: AppendSignal,
    ) -> Result<Self, rdkafka::error::KafkaError> {
        let _validated: FutureProducer = config.kafka.producer().create()?;
        Ok(Self {
            config,
            pool,
            signal,
        })
    }

    /// Runs until `shutdown` resolves: waits for leadership, relays while leader, and starts
    /// over after any failure (with the pause [`retry::policy`] gives), so a broker or
    /// database outage heals itself.
    pub async fn run(self, shutdown: impl Future<Output = ()> + Send) {
        tokio::pin!(shutdown);
        metrics::gauge!("ledger_relay_leader").set(0.0);
        let mut pauses = retry::policy().build();
        loop {
            let started = tokio::time::Instant::now();
            let err = tokio::select! {
                () = &mut shutdown => return,
                result = self.lead() => {
                    let Err(err) = result;
                    err
                }
            };
            self.signal.set_local_relay_leads(false);
            // Only a leader measures lag; a deposed one must not report a frozen value.
            metrics::gauge!("ledger_relay_leader").set(0.0);
            metrics::gauge!("ledger_relay_lag_events").set(0.0);
            metrics::gauge!("ledger_relay_lag_seconds").set(0.0);
            // A leader that ran for a while and then failed starts its retries afresh.
            if started.elapsed() > retry::MAX_DELAY {
                pauses = retry::policy().build();
            }
            let pause = pauses.next().unwrap_or(retry::MAX_DELAY);
            tracing::warn!(error = %err, retry_in_ms = pause.as_millis() as u64, "relay interrupted");
            tokio::select! {
                () = &mut shutdown => return,
                () = tokio::time::sleep(pause) => {}
            }
        }
    }

    /// Becomes the leader, then relays until something fails.
    async fn lead(&self) -> Result<Infallible, RelayError> {
        let mut lock = PgConnection::connect_with(&self.pool.connect_options()).await?;
        let (idle, interval, count) = LEADER_KEEPALIVE;
        // The checkpoint's commits need not wait for the disk: one lost in a crash of
        // Postgres only moves it back a little, and what it covered is published again, as
        // after any failure (at least once). Waiting for the flush cost each batch a WAL
        // flush, and the next batch's read waited for it.
        sqlx::query(
            "SELECT set_config('tcp_keepalives_idle', $1, false),
                    set_config('tcp_keepalives_interval', $2, false),
                    set_config('tcp_keepalives_count', $3, false),
                    set_config('synchronous_commit', 'off', false)",
        )
        .bind(idle.to_string())
        .bind(interval.to_string())
        .bind(count.to_string())
        .execute(&mut lock)
        .await?;
        loop {
            let acquired: bool = sqlx::query_scalar("SELECT pg_try_advisory_lock($1)")
                .bind(LEADER_LOCK)
                .fetch_one(&mut lock)
                .await?;
            if acquired {
                break;
            }
            tokio::time::sleep(self.config.leader_retry).await;
        }
        tracing::info!("relay is the leader");
        metrics::gauge!("ledger_relay_leader").set(1.0);
        self.signal.set_local_relay_leads(true);
        // A producer per term: one that hit a fatal error (an idempotence violation after a
        // broker lost state, say) cannot be used again.
        let producer: FutureProducer = self.config.kafka.producer().create()?;
        let mut unconfirmed = 0;
        let ended = self.publish(&mut lock, &producer, &mut unconfirmed).await;
        // Nothing more from this term: what it still holds would reach the topic after what
        // the next leader publishes, out of order.
        producer.purge(PurgeConfig::default().queue().inflight());
        // Handed to the broker but not under the checkpoint: the next term sends them again.
        metrics::counter!("ledger_relay_republished_events_total").increment(unconfirmed);
        ended
    }

    /// Publishes from the checkpoint while `lock` holds the leadership, until something
    /// fails. `unconfirmed` counts the events sent but not yet under the checkpoint.
    async fn publish(
        &self,
        lock: &mut PgConnection,
        producer: &FutureProducer,
        unconfirmed: &mut u64,
    ) -> Result<Infallible, RelayError> {
        let topics = vec![
            self.config.kafka.events_topic(Account::TYPE),
            self.config.kafka.events_topic(Transfer::TYPE),
            self.config.kafka.deadletter_topic(),
        ];
        if let Err(err) = self.config.kafka.ensure_topics(&topics).await {
            tracing::warn!(error = %err, "could not ensure topics exist");
        }
        let mut listener = PgListener::connect_with(&self.pool).await?;
        listener.listen(channels::EVENTS_APPENDED).await?;
        // `acked`: the checkpoint, everything up to it acknowledged. `sent`: the last event
        // handed to the producer. Up to MAX_IN_FLIGHT batches are between the two, so reading
        // the next batch overlaps waiting for the broker.
        let mut acked = event_log::load_checkpoint(&self.pool, READER).await?;
        let mut sent = acked;
        let mut in_flight: VecDeque<(LogPosition, Sent)> = VecDeque::new();
        // Whether the last read filled a batch: then more are likely waiting, and the next
        // read need not wait for an acknowledgement.
        let mut backlog = false;
        let mut lag_measured = tokio::time::Instant::now() - LAG_INTERVAL;
        // When the lock's connection last answered: a ping or a checkpoint's move. Not yet in
        // this term (setting up the topics and the listener may have taken a while): the
        // first wake-up pings.
        let mut lock_proven = tokio::time::Instant::now() - LOCK_CHECK;
        // Whether the log may hold events after `sent` that no read has seen: set by whatever
        // wakes the relay (every appender signals after its commit), cleared by a read that did
        // not fill a batch. So an acknowledgement with nothing appended meanwhile costs no
        // read that would find nothing.
        let mut unread = true;
        // Whether the last read saw events behind an open transaction.
        let mut pending = false;
        loop {
            if lag_measured.elapsed() >= LAG_INTERVAL {
                // Best effort: a failed measurement is no reason to stop relaying.
                match event_log::lag(&self.pool, acked).await {
                    Ok(lag) => {
                        metrics::gauge!("ledger_relay_lag_events").set(lag.events as f64);
                        metrics::gauge!("ledger_relay_lag_seconds").set(lag.seconds);
                        metrics::gauge!("ledger_relay_oldest_transaction_seconds")
                            .set(lag.oldest_transaction_seconds);
                    }
                    Err(err) => tracing::debug!(error = %err, "measuring relay lag failed"),
                }
                lag_measured = tokio::time::Instant::now();
            }
            let may_read =
                unread && (in_flight.is_empty() || (backlog && in_flight.len() < MAX_IN_FLIGHT));
            if may_read {
                let read =
                    event_log::read_committed(&self.pool, sent, self.config.batch_size).await?;
                let batch = read.events;
                backlog = batch.len() as i64 >= self.config.batch_size;
                unread = backlog;
                pending = read.pending;
                if let Some(last) = batch.last().map(|event| event.position) {
                    metrics::histogram!("ledger_relay_batch_events").record(batch.len() as f64);
                    *unconfirmed += batch.len() as u64;
                    in_flight.push_back((last, send(producer, &self.config.kafka, &batch).await?));
                    sent = last;
                    continue;
                }
            }
            // Nothing more to send now. Sleep until an acknowledgement, an append (only with
            // nothing in flight: see the module's doc), or the poll: soon if something waits
            // behind an open transaction.
            let idle = in_flight.is_empty();
            let wait = if idle && pending {
                PENDING_POLL
            } else if idle {
                self.config.idle_poll
            } else {
                // Deliveries never time out (see `KafkaConfig::producer`), so a broker outage
                // holds batches in flight: the lock is checked this often meanwhile.
                LOCK_CHECK
            };
            let wake_at = tokio::time::Instant::now() + wait;
            let acknowledged = loop {
                let front = async {
                    match in_flight.front_mut() {
                        Some((_, batch)) => (&mut batch.acknowledged).await,
                        None => std::future::pending().await,
                    }
                };
                tokio::select! {
                    result = front => break Some(result),
                    () = self.signal.appended_here(), if idle => break None,
                    notification = listener.recv() => {
                        notification?;
                        unread = true;
                        // Taken even while a batch is in flight, or they would pile up in
                        // Postgres's notification queue; what they announce goes out after
                        // the acknowledgement.
                        if idle {
                            break None;
                        }
                    }
                    () = tokio::time::sleep_until(wake_at) => break None,
                }
            };
            let Some(result) = acknowledged else {
                unread = true;
                // Not on every wake-up: at a few hundred appends a second that was a round
                // trip per append, and each batch's checkpoint proves the lock anyway. A leader
                // whose lock was taken from it within the last LOCK_CHECK / 2 may so send one
                // more batch before its checkpoint fails: duplicates, as after any term.
                if lock_proven.elapsed() >= LOCK_CHECK / 2 {
                    still_leader(lock).await?;
                    lock_proven = tokio::time::Instant::now();
                }
                continue;
            };
            result?;
            let (last, batch) = in_flight
                .pop_front()
                .expect("the acknowledgement came from the front batch");
            let batch_events: u64 = batch.per_topic.iter().map(|(_, count)| count).sum();
            for (topic, count) in batch.per_topic {
                metrics::counter!("ledger_relay_published_total", "topic" => topic)
                    .increment(count);
            }
            // On the lock's connection: if that was cut, so was the lock, and this fails.
            let advance = event_log::advance_checkpoint(&mut *lock, READER, acked, last);
            let advanced = tokio::time::timeout(LOCK_TIMEOUT, advance)
                .await
                .map_err(|_| RelayError::LockUnanswered)??;
            if !advanced {
                return Err(RelayError::Deposed);
            }
            lock_proven = tokio::time::Instant::now();
            *unconfirmed -= batch_events;
            acked = last;
        }
    }
}

/// A batch handed to the producer.
struct Sent {
    /// Resolves once the broker acknowledged every message of the batch.
    acknowledged: Pin<Box<dyn Future<Output = Result<(), RelayError>> + Send>>,
    /// Messages per topic, counted once acknowledged.
    per_topic: Vec<(String, u64)>,
}

/// Hands `batch` to the producer, in order.
async fn send(
    producer: &FutureProducer,
    config: &KafkaConfig,
    batch: &[LoggedEvent],
) -> Result<Sent, RelayError> {
    let mut deliveries = Vec::with_capacity(batch.len());
    let mut per_topic: Vec<(String, u64)> = Vec::new();
    for event in batch {
        let envelope = kafka::envelope(event);
        let topic = config.events_topic(&event.aggregate_type);
        match per_topic.iter_mut().find(|(name, _)| *name == topic) {
            Some((_, count)) => *count += 1,
            None => per_topic.push((topic.clone(), 1)),
        }
        let mut record = FutureRecord::to(&topic)
            .key(&envelope.key)
            .payload(&envelope.value)
            .headers(envelope.headers);
        loop {
            match producer.send_result(record) {
                Ok(delivery) => {
                    deliveries.push(delivery);
                    break;
                }
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), returned)) => {
                    record = returned;
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
                Err((err, _)) => return Err(err.into()),
            }
        }
    }
    Ok(Sent {
        acknowledged: Box::pin(acknowledged(deliveries)),
        per_topic,
    })
}

/// Waits until the broker acknowledged every one of `deliveries`.
async fn acknowledged(deliveries: Vec<DeliveryFuture>) -> Result<(), RelayError> {
    for delivery in deliveries {
        match delivery.await {
            Ok(Ok(_)) => {}
            Ok(Err((err, _))) => return Err(err.into()),
            Err(_) => return Err(RelayError::ProducerGone),
        }
    }
    Ok(())
}
