//! Comparing the hashes carried on Kafka messages (`ce_hash`) with the store. The relay
//! copies each event's hash into its message when it publishes, so a history rewritten in
//! Postgres afterwards, even with every hash recomputed, no longer matches what was published.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use futures::StreamExt;
use rdkafka::Message;
use rdkafka::consumer::{Consumer, StreamConsumer};
use serde::Serialize;
use service_kit::kafka::{KafkaConfig, header, headers};
use sqlx::PgPool;

use crate::verify::Scope;

/// Messages compared with the store per query.
const BATCH: usize = 1000;
/// Broker calls and the wait for the next message give up after this long.
const TIMEOUT: Duration = Duration::from_secs(30);

/// A message whose hash is not the stored one.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct HashMismatch {
    pub partition: i32,
    pub offset: i64,
    pub aggregate_id: String,
    pub version: i64,
    pub published_hash: String,
    /// `None`: the store has no such event any more.
    pub stored_hash: Option<String>,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct KafkaCheckReport {
    pub topic: String,
    /// Messages on the topic when the check started.
    pub messages: u64,
    /// Messages compared with the store (all of them, or the sample).
    pub compared: u64,
    pub mismatches: Vec<HashMismatch>,
    /// Messages without the headers that name an event and its hash.
    pub unreadable: u64,
    #[serde(skip)]
    pub elapsed: Duration,
}

impl KafkaCheckReport {
    pub fn intact(&self) -> bool {
        self.mismatches.is_empty() && self.unreadable == 0
    }
}

#[derive(Debug, thiserror::Error)]
pub enum KafkaCheckError {
    #[error("kafka: {0}")]
    Kafka(#[from] rdkafka::error::KafkaError),
    #[error(transparent)]
    Database(#[from] sqlx::Error),
    #[error("topic {0} does not exist")]
    NoTopic(String),
    #[error("no message arrived for {0:?} while {1} were still expected")]
    Stalled(Duration, u64),
}

/// A published event's identity and hash.
struct Published {
    partition: i32,
    offset: i64,
    aggregate_id: String,
    version: i64,
    hash: String,
}

/// Compares the messages on `aggregate_type`'s topic within `scope` (one stream, one tenant's,
/// or all) with the store: every one, or about `sample` of them spread evenly over those.
pub async fn check_topic(
    pool: &PgPool,
    kafka: &KafkaConfig,
    aggregate_type: &str,
    scope: &Scope,
    sample: Option<u64>,
) -> Result<KafkaCheckReport, KafkaCheckError> {
    let started = Instant::now();
    let topic = kafka.events_topic(aggregate_type);
    let consumer: StreamConsumer = kafka
        .consumer(&format!("ledger-audit-{}", uuid::Uuid::new_v4()))
        .create()?;
    let metadata = consumer.fetch_metadata(Some(&topic), TIMEOUT)?;
    let partitions: Vec<i32> = metadata
        .topics()
        .iter()
        .find(|t| t.name() == topic && t.error().is_none())
        .map(|t| t.partitions().iter().map(|p| p.id()).collect())
        .filter(|partitions: &Vec<i32>| !partitions.is_empty())
        .ok_or_else(|| KafkaCheckError::NoTopic(topic.clone()))?;
    // Where each partition ends now: the check covers what was published before it started.
    let mut ends = HashMap::new();
    let mut total = 0u64;
    for partition in partitions {
        let (low, high) = consumer.fetch_watermarks(&topic, partition, TIMEOUT)?;
        if high > low {
            ends.insert(partition, high);
            total += (high - low) as u64;
        }
    }
    // A sample spreads over the whole topic; a narrower scope is compared whole.
    let stride = match scope {
        Scope::All => sample.map_or(1, |sample| (total / sample.max(1)).max(1)),
        Scope::Stream { .. } | Scope::Tenant(_) => 1,
    };
    let mut report = KafkaCheckReport {
        topic: topic.clone(),
        messages: total,
        ..KafkaCheckReport::default()
    };
    if ends.is_empty() {
        report.elapsed = started.elapsed();
        return Ok(report);
    }
    consumer.subscribe(&[&topic])?;
    let mut stream = consumer.stream();
    let mut pending = Vec::new();
    let mut read = 0u64;
    let mut seen = 0u64;
    while !ends.is_empty() {
        let message = match tokio::time::timeout(TIMEOUT, stream.next()).await {
            Ok(Some(message)) => message?,
            Ok(None) | Err(_) => return Err(KafkaCheckError::Stalled(TIMEOUT, total - read)),
        };
        let partition = message.partition();
        let Some(&end) = ends.get(&partition) else {
            continue;
        };
        if message.offset() + 1 >= end {
            ends.remove(&partition);
        }
        if message.offset() >= end {
            continue;
        }
        read += 1;
        let in_scope = match scope {
            Scope::All => true,
            Scope::Stream { aggregate_id, .. } => message
                .headers()
                .and_then(|h| header(h, headers::SUBJECT))
                .is_some_and(|subject| subject == aggregate_id),
            Scope::Tenant(tenant) => message
                .headers()
                .and_then(|h| header(h, headers::TENANT))
                .is_some_and(|of| of == tenant),
        };
        if !in_scope {
            continue;
        }
        seen += 1;
        if !seen.is_multiple_of(stride) {
            continue;
        }
        report.compared += 1;
        let published = message.headers().and_then(|h| {
            Some(Published {
                partition,
                offset: message.offset(),
                aggregate_id: header(h, headers::SUBJECT)?.to_owned(),
                version: header(h, headers::SEQUENCE)?.parse().ok()?,
                hash: header(h, headers::HASH)?.to_owned(),
            })
        });
        match published {
            Some(published) => pending.push(published),
            None => report.unreadable += 1,
        }
        if pending.len() >= BATCH {
            compare(pool, aggregate_type, &mut pending, &mut report).await?;
        }
    }
    compare(pool, aggregate_type, &mut pending, &mut report).await?;
    report.elapsed = started.elapsed();
    Ok(report)
}

async fn compare(
    pool: &PgPool,
    aggregate_type: &str,
    pending: &mut Vec<Published>,
    report: &mut KafkaCheckReport,
) -> Result<(), sqlx::Error> {
    if pending.is_empty() {
        return Ok(());
    }
    let stored: Vec<(String, i64, Vec<u8>)> = sqlx::query_as(
        "SELECT e.aggregate_id, e.sequence, e.hash
           FROM UNNEST($2::text[], $3::int8[]) AS published (aggregate_id, sequence)
           JOIN events e ON e.aggregate_type = $1
                        AND e.aggregate_id = published.aggregate_id
                        AND e.sequence = published.sequence",
    )
    .bind(aggregate_type)
    .bind(
        pending
            .iter()
            .map(|p| p.aggregate_id.as_str())
            .collect::<Vec<_>>(),
    )
    .bind(pending.iter().map(|p| p.version).collect::<Vec<_>>())
    .fetch_all(pool)
    .await?;
    let stored: HashMap<(String, i64), String> = stored
        .into_iter()
        .map(|(id, sequence, hash)| ((id, sequence), hex::encode(hash)))
        .collect();
    for published in pending.drain(..) {
        let stored_hash = stored
            .get(&(published.aggregate_id.clone(), published.version))
            .cloned();
        if stored_hash.as_deref() != Some(published.hash.as_str()) {
            report.mismatches.push(HashMismatch {
                partition: published.partition,
                offset: published.offset,
                aggregate_id: published.aggregate_id,
                version: published.version,
                published_hash: published.hash,
                stored_hash,
            });
        }
    }
    Ok(())
}
