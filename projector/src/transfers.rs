//! The `transfers` read model. A transfer stream is short (at most six events), so a row is
//! not folded event by event from Kafka: any message about a transfer refolds its whole stream
//! from the event store, which has every committed version. Duplicates and gaps need no
//! special case, and the row never moves back (it is written only with a higher version).

use chrono::{DateTime, Utc};
use cqrs_es::Aggregate;
use domain::{Transfer, TransferEvent};
use service_kit::event_log::{EVENT_COLUMNS, LoggedEvent};
use sqlx::PgConnection;
use uuid::Uuid;

use crate::store;

/// A row of `transfers`.
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct TransferRow {
    pub id: Uuid,
    pub tenant: String,
    pub from_account: Uuid,
    pub to_account: Uuid,
    pub amount: i64,
    pub currency: String,
    pub reference: String,
    pub status: String,
    pub reason: Option<String>,
    pub version: i64,
    pub requested_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

/// The live table, and the one a rebuild fills before it is swapped in.
pub const TABLE: &str = "transfers";
pub const REBUILD_TABLE: &str = "transfers_rebuild";

/// One transfer folded so far, event by event in version order.
#[derive(Debug, Default)]
pub struct TransferFold {
    transfer: Transfer,
    version: i64,
    requested_at: Option<DateTime<Utc>>,
    updated_at: Option<DateTime<Utc>>,
}

impl TransferFold {
    /// Folds the stream's next event; `Err` names what cannot be read.
    pub fn apply(&mut self, id: Uuid, event: &LoggedEvent) -> Result<(), String> {
        if event.sequence != self.version + 1 {
            return Err(format!("transfer {id} lacks version {}", self.version + 1));
        }
        let decoded: TransferEvent = event
            .decode()
            .map_err(|err| format!("transfer {id} version {}: {err}", event.sequence))?;
        self.transfer.apply(decoded);
        self.version = event.sequence;
        self.requested_at.get_or_insert(event.recorded_at);
        self.updated_at = Some(event.recorded_at);
        Ok(())
    }

    /// The row of the transfer folded so far; `None` before it was requested.
    pub fn row(&self, id: Uuid) -> Option<TransferRow> {
        let state = self.transfer.state()?;
        let terms = &state.terms;
        Some(TransferRow {
            id,
            tenant: terms.tenant.clone(),
            from_account: terms.from,
            to_account: terms.to,
            amount: terms.amount.minor_units(),
            currency: terms.currency.to_string(),
            reference: terms.reference.as_str().to_owned(),
            status: state.status.as_str().to_owned(),
            reason: state.reason.map(|reason| reason.as_str().to_owned()),
            version: self.version,
            requested_at: self.requested_at?,
            updated_at: self.updated_at?,
        })
    }
}

/// Folds one transfer's events, in version order, into its row; `Err` names what cannot be read.
pub fn fold(id: Uuid, events: &[LoggedEvent]) -> Result<Option<TransferRow>, String> {
    let mut fold = TransferFold::default();
    for event in events {
        fold.apply(id, event)?;
    }
    Ok(fold.row(id))
}

/// The stored events of the transfers `ids` (every transfer when `None`), by stream and version.
pub async fn stored_events(
    connection: &mut PgConnection,
    ids: Option<&[Uuid]>,
) -> Result<Vec<LoggedEvent>, sqlx::Error> {
    let ids: Option<Vec<String>> = ids.map(|ids| ids.iter().map(Uuid::to_string).collect());
    sqlx::query_as(&format!(
        "SELECT {EVENT_COLUMNS}
           FROM events
          WHERE aggregate_type = $1 AND ($2::text[] IS NULL OR aggregate_id = ANY($2))
          ORDER BY aggregate_id, sequence"
    ))
    .bind(Transfer::TYPE)
    .bind(ids)
    .fetch_all(connection)
    .await
}

/// Folds stored events of many transfers (grouped by stream) into rows. Streams that cannot
/// be folded are returned with the reason instead.
pub fn fold_all(events: &[LoggedEvent]) -> (Vec<TransferRow>, Vec<(Uuid, String)>) {
    let mut rows = Vec::new();
    let mut unreadable = Vec::new();
    for stream in events.chunk_by(|a, b| a.aggregate_id == b.aggregate_id) {
        let Ok(id) = stream[0].aggregate_id.parse::<Uuid>() else {
            unreadable.push((
                Uuid::nil(),
                format!("transfer id {} is not a UUID", stream[0].aggregate_id),
            ));
            continue;
        };
        match fold(id, stream) {
            Ok(Some(row)) => rows.push(row),
            Ok(None) => unreadable.push((id, format!("transfer {id} was never requested"))),
            Err(reason) => unreadable.push((id, reason)),
        }
    }
    (rows, unreadable)
}

/// Brings the rows of `ids` up to their streams in the event store. Returns the transfers
/// whose streams cannot be folded, with the reason.
pub async fn project(
    connection: &mut PgConnection,
    ids: &[Uuid],
) -> Result<Vec<(Uuid, String)>, sqlx::Error> {
    let events = stored_events(connection, Some(ids)).await?;
    let (rows, unreadable) = fold_all(&events);
    save(connection, TABLE, &rows).await?;
    Ok(unreadable)
}

/// The columns of a row, in the order [`save`] binds them, with their types: the one list the
/// upsert is generated from, so a column cannot be written on insert and forgotten on update.
const COLUMNS: &[(&str, &str)] = &[
    ("id", "uuid"),
    ("tenant", "text"),
    ("from_account", "uuid"),
    ("to_account", "uuid"),
    ("amount", "int8"),
    ("currency", "text"),
    ("reference", "text"),
    ("status", "text"),
    ("reason", "text"),
    ("version", "int8"),
    ("requested_at", "timestamptz"),
    ("updated_at", "timestamptz"),
];

/// Inserts `rows` into `table`, or moves existing ones forward (never back).
pub async fn save(
    connection: &mut PgConnection,
    table: &str,
    rows: &[TransferRow],
) -> Result<(), sqlx::Error> {
    if rows.is_empty() {
        return Ok(());
    }
    sqlx::query(&store::upsert(table, COLUMNS))
        .bind(rows.iter().map(|r| r.id).collect::<Vec<_>>())
        .bind(rows.iter().map(|r| r.tenant.as_str()).collect::<Vec<_>>())
        .bind(rows.iter().map(|r| r.from_account).collect::<Vec<_>>())
        .bind(rows.iter().map(|r| r.to_account).collect::<Vec<_>>())
        .bind(rows.iter().map(|r| r.amount).collect::<Vec<_>>())
        .bind(rows.iter().map(|r| r.currency.as_str()).collect::<Vec<_>>())
        .bind(
            rows.iter()
                .map(|r| r.reference.as_str())
                .collect::<Vec<_>>(),
        )
        .bind(rows.iter().map(|r| r.status.as_str()).collect::<Vec<_>>())
        .bind(rows.iter().map(|r| r.reason.as_deref()).collect::<Vec<_>>())
        .bind(rows.iter().map(|r| r.version).collect::<Vec<_>>())
        .bind(rows.iter().map(|r| r.requested_at).collect::<Vec<_>>())
        .bind(rows.iter().map(|r| r.updated_at).collect::<Vec<_>>())
        .execute(connection)
        .await?;
    Ok(())
}

/// Every row of the live table.
pub async fn all_rows(connection: &mut PgConnection) -> Result<Vec<TransferRow>, sqlx::Error> {
    let columns: Vec<&str> = COLUMNS.iter().map(|(name, _)| *name).collect();
    sqlx::query_as(&format!("SELECT {} FROM {TABLE}", columns.join(", ")))
        .fetch_all(connection)
        .await
}
