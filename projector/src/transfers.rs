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

/// A row of `transfers`.
#[derive(Debug, Clone, PartialEq, Eq)]
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

/// Folds one transfer's events, in version order, into its row; `Err` names what cannot be read.
pub fn fold(id: Uuid, events: &[LoggedEvent]) -> Result<Option<TransferRow>, String> {
    let mut transfer = Transfer::default();
    let mut version = 0;
    for event in events {
        if event.sequence != version + 1 {
            return Err(format!("transfer {id} lacks version {}", version + 1));
        }
        let unreadable = |err: &dyn std::fmt::Display| {
            format!("transfer {id} version {}: {err}", event.sequence)
        };
        let decoded: TransferEvent = event.decode().map_err(|err| unreadable(&err))?;
        transfer.apply(decoded);
        version = event.sequence;
    }
    let (Some(state), Some(first), Some(last)) = (transfer.state(), events.first(), events.last())
    else {
        return Ok(None);
    };
    let terms = &state.terms;
    Ok(Some(TransferRow {
        id,
        tenant: terms.tenant.clone(),
        from_account: terms.from,
        to_account: terms.to,
        amount: terms.amount.minor_units(),
        currency: terms.currency.to_string(),
        reference: terms.reference.as_str().to_owned(),
        status: state.status.as_str().to_owned(),
        reason: state.reason.map(|reason| reason.as_str().to_owned()),
        version,
        requested_at: first.recorded_at,
        updated_at: last.recorded_at,
    }))
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
    save(connection, &rows).await?;
    Ok(unreadable)
}

/// Inserts `rows`, or moves existing ones forward (never back).
pub async fn save(connection: &mut PgConnection, rows: &[TransferRow]) -> Result<(), sqlx::Error> {
    if rows.is_empty() {
        return Ok(());
    }
    sqlx::query(
        "INSERT INTO transfers (id, tenant, from_account, to_account, amount, currency, reference,
                                status, reason, version, requested_at, updated_at)
         SELECT * FROM UNNEST($1::uuid[], $2::text[], $3::uuid[], $4::uuid[], $5::int8[],
                              $6::text[], $7::text[], $8::text[], $9::text[], $10::int8[],
                              $11::timestamptz[], $12::timestamptz[])
         ON CONFLICT (id) DO UPDATE
            SET status = EXCLUDED.status, reason = EXCLUDED.reason, version = EXCLUDED.version,
                updated_at = EXCLUDED.updated_at
          WHERE transfers.version < EXCLUDED.version",
    )
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
