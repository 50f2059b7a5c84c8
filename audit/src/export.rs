//! Exports of the event store that carry every hashed field and both chain links, so that the
//! export itself can be re-verified offline with [`crate::verify::verify_events`].

use std::io::{BufRead, Write};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use futures::TryStreamExt;
use serde::{Deserialize, Serialize};
use service_kit::event_log::{self, EVENT_COLUMNS, LogPosition, LoggedEvent};
use service_kit::progress::Progress;
use sqlx::postgres::PgArguments;
use sqlx::{Arguments, PgPool};
use uuid::Uuid;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// One JSON object per line.
    JsonLines,
    /// RFC 4180, with a header row.
    Csv,
}

impl Format {
    /// `.csv` means CSV; anything else JSON Lines.
    pub fn from_path(path: &std::path::Path) -> Self {
        match path.extension().and_then(|ext| ext.to_str()) {
            Some(ext) if ext.eq_ignore_ascii_case("csv") => Self::Csv,
            _ => Self::JsonLines,
        }
    }
}

/// One exported event. `payload` and `metadata` are the stored JSON text, byte for byte (the
/// hash covers the text), and hashes are lowercase hex.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExportRecord {
    pub global_position: i64,
    pub aggregate_type: String,
    pub aggregate_id: String,
    pub sequence: i64,
    pub event_type: String,
    pub event_version: String,
    pub event_id: Uuid,
    pub recorded_at: DateTime<Utc>,
    pub payload: String,
    pub metadata: String,
    pub prev_hash: Option<String>,
    pub hash: String,
}

impl From<&LoggedEvent> for ExportRecord {
    fn from(event: &LoggedEvent) -> Self {
        Self {
            global_position: event.position.global_position,
            aggregate_type: event.aggregate_type.clone(),
            aggregate_id: event.aggregate_id.clone(),
            sequence: event.sequence,
            event_type: event.event_type.clone(),
            event_version: event.event_version.clone(),
            event_id: event.event_id,
            recorded_at: event.recorded_at,
            payload: event.payload.clone(),
            metadata: event.metadata.clone(),
            prev_hash: event.prev_hash.as_ref().map(hex::encode),
            hash: hex::encode(&event.hash),
        }
    }
}

impl TryFrom<ExportRecord> for LoggedEvent {
    type Error = ExportError;

    fn try_from(record: ExportRecord) -> Result<Self, Self::Error> {
        let bad_hash = |field| {
            ExportError::Malformed(format!(
                "{field} of {}/{} version {} is not hex",
                record.aggregate_type, record.aggregate_id, record.sequence
            ))
        };
        let prev_hash = match &record.prev_hash {
            Some(hash) => Some(hex::decode(hash).map_err(|_| bad_hash("prev_hash"))?),
            None => None,
        };
        let hash = hex::decode(&record.hash).map_err(|_| bad_hash("hash"))?;
        Ok(Self {
            position: LogPosition {
                tx_id: 0,
                global_position: record.global_position,
            },
            aggregate_type: record.aggregate_type,
            aggregate_id: record.aggregate_id,
            sequence: record.sequence,
            event_type: record.event_type,
            event_version: record.event_version,
            event_id: record.event_id,
            recorded_at: record.recorded_at,
            tenant: event_log::tenant_of(&record.metadata),
            payload: record.payload,
            metadata: record.metadata,
            prev_hash,
            hash,
        })
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    #[error(transparent)]
    Database(#[from] sqlx::Error),
    #[error("writing the export: {0}")]
    Io(#[from] std::io::Error),
    #[error("CSV: {0}")]
    Csv(#[from] csv::Error),
    #[error("JSON: {0}")]
    Json(#[from] serde_json::Error),
    #[error("malformed export: {0}")]
    Malformed(String),
}

/// Which events to export; every set filter must hold.
#[derive(Debug, Clone, Default)]
pub struct Selection {
    pub aggregate_type: Option<String>,
    pub aggregate_id: Option<String>,
    pub tenant: Option<String>,
    /// Recorded at or after.
    pub from: Option<DateTime<Utc>>,
    /// Recorded before.
    pub to: Option<DateTime<Utc>>,
}

impl Selection {
    /// The SQL condition over `events`, with a placeholder for each set filter, numbered in
    /// the order [`Self::arguments`] binds them.
    fn condition(&self) -> String {
        let mut conditions = Vec::new();
        let mut next = 0;
        let mut placeholder = |set: bool, condition: &str| {
            if set {
                next += 1;
                conditions.push(condition.replace('?', &format!("${next}")));
            }
        };
        placeholder(self.aggregate_type.is_some(), "aggregate_type = ?");
        placeholder(self.aggregate_id.is_some(), "aggregate_id = ?");
        placeholder(self.tenant.is_some(), "tenant = ?");
        placeholder(self.from.is_some(), "recorded_at >= ?");
        placeholder(self.to.is_some(), "recorded_at < ?");
        if conditions.is_empty() {
            "true".into()
        } else {
            conditions.join(" AND ")
        }
    }

    fn arguments(&self) -> Result<PgArguments, sqlx::Error> {
        let mut arguments = PgArguments::default();
        for text in [&self.aggregate_type, &self.aggregate_id, &self.tenant]
            .into_iter()
            .flatten()
        {
            arguments.add(text.clone()).map_err(sqlx::Error::Encode)?;
        }
        for instant in [self.from, self.to].into_iter().flatten() {
            arguments.add(instant).map_err(sqlx::Error::Encode)?;
        }
        Ok(arguments)
    }
}

#[derive(Debug, Clone, Copy)]
pub struct ExportReport {
    pub events: u64,
    pub elapsed: Duration,
}

/// Writes the selected events, grouped by stream in version order, to `out`.
pub async fn export(
    pool: &PgPool,
    selection: &Selection,
    format: Format,
    out: impl Write,
    show_progress: bool,
) -> Result<ExportReport, ExportError> {
    let started = Instant::now();
    let total: i64 = sqlx::query_scalar_with(
        &format!(
            "SELECT count(*) FROM events WHERE {}",
            selection.condition()
        ),
        selection.arguments()?,
    )
    .fetch_one(pool)
    .await?;
    let progress = Progress::new("events", total as u64, show_progress);
    let query = format!(
        "SELECT {EVENT_COLUMNS} FROM events WHERE {}
          ORDER BY aggregate_type, aggregate_id, sequence",
        selection.condition()
    );
    let mut rows =
        sqlx::query_as_with::<_, LoggedEvent, _>(&query, selection.arguments()?).fetch(pool);
    let mut writer = RecordWriter::new(format, out);
    let mut events = 0u64;
    while let Some(event) = rows.try_next().await? {
        writer.write(&ExportRecord::from(&event))?;
        events += 1;
        if events.is_multiple_of(10_000) {
            progress.update(events);
        }
    }
    writer.finish()?;
    progress.finish(events);
    Ok(ExportReport {
        events,
        elapsed: started.elapsed(),
    })
}

enum RecordWriter<W: Write> {
    JsonLines(std::io::BufWriter<W>),
    Csv(Box<csv::Writer<W>>),
}

impl<W: Write> RecordWriter<W> {
    fn new(format: Format, out: W) -> Self {
        match format {
            Format::JsonLines => Self::JsonLines(std::io::BufWriter::new(out)),
            Format::Csv => Self::Csv(Box::new(csv::Writer::from_writer(out))),
        }
    }

    fn write(&mut self, record: &ExportRecord) -> Result<(), ExportError> {
        match self {
            Self::JsonLines(out) => {
                serde_json::to_writer(&mut *out, record)?;
                out.write_all(b"\n")?;
            }
            Self::Csv(out) => out.serialize(record)?,
        }
        Ok(())
    }

    fn finish(self) -> Result<(), ExportError> {
        match self {
            Self::JsonLines(mut out) => out.flush()?,
            Self::Csv(mut out) => out.flush()?,
        }
        Ok(())
    }
}

/// Reads an export back, record by record.
pub fn read(
    format: Format,
    input: impl BufRead + 'static,
) -> Box<dyn Iterator<Item = Result<LoggedEvent, ExportError>>> {
    match format {
        Format::JsonLines => Box::new(
            input
                .lines()
                .filter(|line| !matches!(line, Ok(line) if line.trim().is_empty()))
                .map(|line| {
                    let record: ExportRecord = serde_json::from_str(&line?)?;
                    LoggedEvent::try_from(record)
                }),
        ),
        Format::Csv => Box::new(
            csv::Reader::from_reader(input)
                .into_deserialize::<ExportRecord>()
                .map(|record| LoggedEvent::try_from(record?)),
        ),
    }
}
