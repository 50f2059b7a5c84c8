//! Recomputing hash chains: over the event store (one stream, one tenant, or everything) and
//! over an export, where nothing but the file is needed.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use futures::TryStreamExt;
use serde::Serialize;
use service_kit::event_log::{EVENT_COLUMNS, LoggedEvent};
use service_kit::hash_chain::{ChainBreak, ChainVerifier};
use service_kit::progress::Progress;
use sqlx::postgres::PgArguments;
use sqlx::{Arguments, PgConnection, PgPool};

/// Which streams of the store to verify.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Scope {
    Stream {
        aggregate_type: String,
        aggregate_id: String,
    },
    Tenant(String),
    All,
}

/// Where one stream's chain first fails.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct StreamBreak {
    pub aggregate_type: String,
    pub aggregate_id: String,
    pub version: i64,
    /// `sequence-gap`, `previous-hash-mismatch` or `hash-mismatch`.
    pub reason: &'static str,
    pub explanation: String,
}

impl StreamBreak {
    fn new(event: &LoggedEvent, chain_break: &ChainBreak) -> Self {
        Self {
            aggregate_type: event.aggregate_type.clone(),
            aggregate_id: event.aggregate_id.clone(),
            version: chain_break.sequence,
            reason: chain_break.reason.as_str(),
            explanation: chain_break.explain(),
        }
    }
}

/// What a verification found.
#[derive(Debug, Clone, Default, Serialize)]
pub struct VerifyReport {
    pub streams: u64,
    pub events: u64,
    /// The first break of each broken stream.
    pub breaks: Vec<StreamBreak>,
    /// Streams of an export that start after version 1: each is checked from the `prev_hash`
    /// of its first exported event, which the export alone cannot vouch for.
    pub anchored_streams: u64,
    #[serde(skip)]
    pub elapsed: Duration,
}

impl VerifyReport {
    pub fn intact(&self) -> bool {
        self.breaks.is_empty()
    }
}

/// Verifies rows that arrive grouped by stream, each stream from version 1 in order, holding
/// one stream's last link at a time.
struct GroupedStreams {
    current: Option<(String, String)>,
    verifier: ChainVerifier,
    broken: bool,
    report: VerifyReport,
}

impl GroupedStreams {
    fn new() -> Self {
        Self {
            current: None,
            verifier: ChainVerifier::new(),
            broken: false,
            report: VerifyReport::default(),
        }
    }

    fn push(&mut self, event: &LoggedEvent) {
        let same_stream = self
            .current
            .as_ref()
            .is_some_and(|(kind, id)| *kind == event.aggregate_type && *id == event.aggregate_id);
        if !same_stream {
            self.current = Some((event.aggregate_type.clone(), event.aggregate_id.clone()));
            self.verifier = ChainVerifier::new();
            self.broken = false;
            self.report.streams += 1;
        }
        self.report.events += 1;
        if self.broken {
            return;
        }
        if let Err(chain_break) = self.verifier.check(&event.chained()) {
            self.broken = true;
            self.report
                .breaks
                .push(StreamBreak::new(event, &chain_break));
        }
    }
}

/// Recomputes the chains of every stream in `scope` from the stored rows.
pub async fn verify_store(
    pool: &PgPool,
    scope: &Scope,
    show_progress: bool,
) -> Result<VerifyReport, sqlx::Error> {
    let started = Instant::now();
    let (filter, values): (&str, Vec<&str>) = match scope {
        Scope::Stream {
            aggregate_type,
            aggregate_id,
        } => (
            "aggregate_type = $1 AND aggregate_id = $2",
            vec![aggregate_type, aggregate_id],
        ),
        Scope::Tenant(tenant) => ("tenant = $1", vec![tenant]),
        Scope::All => ("true", vec![]),
    };
    let total: i64 = sqlx::query_scalar_with(
        &format!("SELECT count(*) FROM events WHERE {filter}"),
        scope_arguments(&values)?,
    )
    .fetch_one(pool)
    .await?;
    let progress = Progress::new("events", total as u64, show_progress);
    let mut streams = GroupedStreams::new();
    let query = format!(
        "SELECT {EVENT_COLUMNS} FROM events WHERE {filter}
          ORDER BY aggregate_type, aggregate_id, sequence"
    );
    let mut rows =
        sqlx::query_as_with::<_, LoggedEvent, _>(&query, scope_arguments(&values)?).fetch(pool);
    while let Some(event) = rows.try_next().await? {
        streams.push(&event);
        if streams.report.events.is_multiple_of(10_000) {
            progress.update(streams.report.events);
        }
    }
    progress.finish(streams.report.events);
    let mut report = streams.report;
    report.elapsed = started.elapsed();
    Ok(report)
}

/// The scope's filter values, bound as `$1` (and `$2`).
fn scope_arguments(values: &[&str]) -> Result<PgArguments, sqlx::Error> {
    let mut arguments = PgArguments::default();
    for value in values {
        arguments
            .add(value.to_owned())
            .map_err(sqlx::Error::Encode)?;
    }
    Ok(arguments)
}

/// One stream's verification, for the audit API.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamVerification {
    pub events: u64,
    /// The last stored version.
    pub head_version: i64,
    /// The hash of the last version whose link held.
    pub verified_head: Option<[u8; 32]>,
    pub first_break: Option<ChainBreak>,
}

/// Recomputes one stream's chain.
pub async fn verify_stream(
    connection: &mut PgConnection,
    aggregate_type: &str,
    aggregate_id: &str,
) -> Result<StreamVerification, sqlx::Error> {
    let query = format!(
        "SELECT {EVENT_COLUMNS} FROM events
          WHERE aggregate_type = $1 AND aggregate_id = $2
          ORDER BY sequence"
    );
    let mut rows = sqlx::query_as::<_, LoggedEvent>(&query)
        .bind(aggregate_type)
        .bind(aggregate_id)
        .fetch(connection);
    let mut verifier = ChainVerifier::new();
    let mut result = StreamVerification {
        events: 0,
        head_version: 0,
        verified_head: None,
        first_break: None,
    };
    while let Some(event) = rows.try_next().await? {
        result.events += 1;
        result.head_version = event.sequence;
        if result.first_break.is_none() {
            match verifier.check(&event.chained()) {
                Ok(()) => result.verified_head = verifier.head().copied(),
                Err(chain_break) => result.first_break = Some(chain_break),
            }
        }
    }
    Ok(result)
}

/// Verifies exported events, in any order across streams but in version order within each:
/// a stream that starts after version 1 is checked from its first event's `prev_hash`.
pub fn verify_events<E>(
    events: impl IntoIterator<Item = Result<LoggedEvent, E>>,
) -> Result<VerifyReport, E> {
    let started = Instant::now();
    let mut report = VerifyReport::default();
    // `None` once the stream broke: its later events are counted, not checked.
    let mut streams: HashMap<(String, String), Option<ChainVerifier>> = HashMap::new();
    for event in events {
        let event = event?;
        report.events += 1;
        let key = (event.aggregate_type.clone(), event.aggregate_id.clone());
        let verifier = streams.entry(key).or_insert_with(|| {
            report.streams += 1;
            if event.sequence != 1 {
                report.anchored_streams += 1;
            }
            Some(ChainVerifier::resume(
                event.sequence,
                event.prev_hash.as_deref(),
            ))
        });
        if let Some(chain) = verifier
            && let Err(chain_break) = chain.check(&event.chained())
        {
            report.breaks.push(StreamBreak::new(&event, &chain_break));
            *verifier = None;
        }
    }
    report.elapsed = started.elapsed();
    Ok(report)
}
