//! Reading and writing the read-model tables, and reading streams back from the event store.

use std::collections::HashMap;

use domain::AccountEvent;
use service_kit::event_log::{EVENT_COLUMNS, LoggedEvent};
use sqlx::{PgConnection, Postgres, Transaction};
use uuid::Uuid;

use crate::model::{AccountRow, EntryRow, StreamEvent};

/// Which pair of tables to write: the live ones, or the ones a rebuild fills.
#[derive(Debug, Clone, Copy)]
pub struct Tables {
    pub accounts: &'static str,
    pub entries: &'static str,
}

impl Tables {
    pub const LIVE: Self = Self {
        accounts: "accounts",
        entries: "account_entries",
    };
    pub const REBUILD: Self = Self {
        accounts: "accounts_rebuild",
        entries: "account_entries_rebuild",
    };
}

/// The rows of `ids`, locked until the transaction ends, in id order (so that two projectors
/// during a rebalance cannot deadlock).
pub async fn lock_rows(
    tx: &mut Transaction<'_, Postgres>,
    tables: Tables,
    ids: &[Uuid],
) -> Result<HashMap<Uuid, AccountRow>, sqlx::Error> {
    let rows: Vec<AccountRow> = sqlx::query_as(&format!(
        "SELECT id, tenant, owner, currency, overdraft_limit, balance, status, version, opened_at, updated_at
           FROM {} WHERE id = ANY($1) ORDER BY id FOR UPDATE",
        tables.accounts
    ))
    .bind(ids)
    .fetch_all(&mut **tx)
    .await?;
    Ok(rows.into_iter().map(|row| (row.id, row)).collect())
}

/// Writes `rows` (insert or move forward, never back) and `entries` (once each).
pub async fn save(
    connection: &mut PgConnection,
    tables: Tables,
    rows: &[&AccountRow],
    entries: &[EntryRow],
) -> Result<(), sqlx::Error> {
    if !rows.is_empty() {
        sqlx::query(&format!(
            "INSERT INTO {0} (id, tenant, owner, currency, overdraft_limit, balance, status, version, opened_at, updated_at)
             SELECT * FROM UNNEST($1::uuid[], $2::text[], $3::text[], $4::text[], $5::int8[], $6::int8[],
                                  $7::text[], $8::int8[], $9::timestamptz[], $10::timestamptz[])
             ON CONFLICT (id) DO UPDATE
                SET balance = EXCLUDED.balance, status = EXCLUDED.status,
                    version = EXCLUDED.version, updated_at = EXCLUDED.updated_at
              WHERE {0}.version < EXCLUDED.version",
            tables.accounts
        ))
        .bind(rows.iter().map(|r| r.id).collect::<Vec<_>>())
        .bind(rows.iter().map(|r| r.tenant.as_str()).collect::<Vec<_>>())
        .bind(rows.iter().map(|r| r.owner.as_str()).collect::<Vec<_>>())
        .bind(rows.iter().map(|r| r.currency.as_str()).collect::<Vec<_>>())
        .bind(rows.iter().map(|r| r.overdraft_limit).collect::<Vec<_>>())
        .bind(rows.iter().map(|r| r.balance).collect::<Vec<_>>())
        .bind(rows.iter().map(|r| r.status.as_str()).collect::<Vec<_>>())
        .bind(rows.iter().map(|r| r.version).collect::<Vec<_>>())
        .bind(rows.iter().map(|r| r.opened_at).collect::<Vec<_>>())
        .bind(rows.iter().map(|r| r.updated_at).collect::<Vec<_>>())
        .execute(&mut *connection)
        .await?;
    }
    if !entries.is_empty() {
        sqlx::query(&format!(
            "INSERT INTO {} (account_id, version, tenant, kind, amount, currency, balance_after, event_id, recorded_at, transfer_id)
             SELECT * FROM UNNEST($1::uuid[], $2::int8[], $3::text[], $4::text[], $5::int8[], $6::text[],
                                  $7::int8[], $8::uuid[], $9::timestamptz[], $10::uuid[])
             ON CONFLICT (account_id, version) DO NOTHING",
            tables.entries
        ))
        .bind(entries.iter().map(|e| e.account_id).collect::<Vec<_>>())
        .bind(entries.iter().map(|e| e.version).collect::<Vec<_>>())
        .bind(entries.iter().map(|e| e.tenant.as_str()).collect::<Vec<_>>())
        .bind(entries.iter().map(|e| e.kind).collect::<Vec<_>>())
        .bind(entries.iter().map(|e| e.amount).collect::<Vec<_>>())
        .bind(entries.iter().map(|e| e.currency.as_str()).collect::<Vec<_>>())
        .bind(entries.iter().map(|e| e.balance_after).collect::<Vec<_>>())
        .bind(entries.iter().map(|e| e.event_id).collect::<Vec<_>>())
        .bind(entries.iter().map(|e| e.recorded_at).collect::<Vec<_>>())
        .bind(entries.iter().map(|e| e.transfer_id).collect::<Vec<_>>())
        .execute(&mut *connection)
        .await?;
    }
    Ok(())
}

/// Writes `entries` with `COPY`, several times faster than INSERT for the bulk of a rebuild.
/// Every field is a UUID, a number, a timestamp or a short validated token (tenant, kind,
/// currency), so no value needs COPY escaping; `\N` is COPY's NULL.
pub async fn copy_entries(
    connection: &mut PgConnection,
    tables: Tables,
    entries: &[EntryRow],
) -> Result<(), sqlx::Error> {
    use std::fmt::Write as _;
    if entries.is_empty() {
        return Ok(());
    }
    let mut data = String::with_capacity(entries.len() * 160);
    for e in entries {
        let _ = writeln!(
            data,
            "{}\t{}\t{}\t{}\t{}\t{}\t{}\t{}\t{}\t{}",
            e.account_id,
            e.version,
            e.tenant,
            e.kind,
            e.amount,
            e.currency,
            e.balance_after,
            e.event_id,
            e.recorded_at
                .to_rfc3339_opts(chrono::SecondsFormat::Micros, true),
            e.transfer_id
                .map_or_else(|| "\\N".to_owned(), |id| id.to_string())
        );
    }
    let mut copy = connection
        .copy_in_raw(&format!(
            "COPY {} (account_id, version, tenant, kind, amount, currency, balance_after, event_id, recorded_at, transfer_id) FROM STDIN",
            tables.entries
        ))
        .await?;
    copy.send(data.into_bytes()).await?;
    copy.finish().await?;
    Ok(())
}

/// Why a stored event could not be read.
#[derive(Debug, thiserror::Error)]
pub enum StoredEventError {
    #[error(transparent)]
    Database(#[from] sqlx::Error),
    #[error("stored event {aggregate_id}/{sequence} is unreadable: {reason}")]
    Unreadable {
        aggregate_id: String,
        sequence: i64,
        reason: String,
    },
}

/// The account events that a batch of messages needs from the event store, by stream and
/// version: each of `exact` (announced versions a read model already holds, to check their
/// messages against), and every version in each of `ranges` (`after < sequence <= up_to`:
/// from where a read model is up to the highest version announced, to apply). The cost is
/// bounded by the events that exist: a message announcing a version far beyond the stream's
/// end reads nothing more.
pub async fn announced_events(
    connection: &mut PgConnection,
    exact: &[(Uuid, i64)],
    ranges: &[(Uuid, i64, i64)],
) -> Result<HashMap<(Uuid, i64), LoggedEvent>, sqlx::Error> {
    let events: Vec<LoggedEvent> = sqlx::query_as(&format!(
        "SELECT {EVENT_COLUMNS}
           FROM events JOIN UNNEST($1::text[], $2::int8[]) AS m(stream, at)
             ON aggregate_id = m.stream AND sequence = m.at
          WHERE aggregate_type = 'account'
         UNION ALL
         SELECT {EVENT_COLUMNS}
           FROM events JOIN UNNEST($3::text[], $4::int8[], $5::int8[]) AS r(stream, after_seq, up_to)
             ON aggregate_id = r.stream AND sequence > r.after_seq AND sequence <= r.up_to
          WHERE aggregate_type = 'account'"
    ))
    .bind(exact.iter().map(|(id, _)| id.to_string()).collect::<Vec<_>>())
    .bind(exact.iter().map(|(_, at)| *at).collect::<Vec<_>>())
    .bind(ranges.iter().map(|(id, _, _)| id.to_string()).collect::<Vec<_>>())
    .bind(ranges.iter().map(|(_, after, _)| *after).collect::<Vec<_>>())
    .bind(ranges.iter().map(|(_, _, up_to)| *up_to).collect::<Vec<_>>())
    .fetch_all(connection)
    .await?;
    Ok(events
        .into_iter()
        .filter_map(|event| {
            let id = event.aggregate_id.parse().ok()?;
            Some(((id, event.sequence), event))
        })
        .collect())
}

/// A stream the projection stopped at, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Parked {
    pub account_id: Uuid,
    /// The first version not applied.
    pub sequence: i64,
    pub reason: String,
}

/// Where each of `ids` that is parked stopped: the first version not applied.
pub async fn parked_at(
    connection: &mut PgConnection,
    ids: &[Uuid],
) -> Result<HashMap<Uuid, i64>, sqlx::Error> {
    let rows: Vec<(Uuid, i64)> = sqlx::query_as(
        "SELECT account_id, sequence FROM projector_parked_streams WHERE account_id = ANY($1)",
    )
    .bind(ids)
    .fetch_all(connection)
    .await?;
    Ok(rows.into_iter().collect())
}

/// Longest reason kept: a reason quotes the stored event, which anyone who could write it chose.
const MAX_REASON: usize = 500;

/// Records `parked` streams and forgets the parking of `resumed` ones.
pub async fn park(
    connection: &mut PgConnection,
    parked: &[Parked],
    resumed: &[Uuid],
) -> Result<(), sqlx::Error> {
    if !parked.is_empty() {
        sqlx::query(
            "INSERT INTO projector_parked_streams (account_id, sequence, reason)
             SELECT * FROM UNNEST($1::uuid[], $2::int8[], $3::text[])
             ON CONFLICT (account_id) DO UPDATE
                SET sequence = EXCLUDED.sequence, reason = EXCLUDED.reason",
        )
        .bind(parked.iter().map(|p| p.account_id).collect::<Vec<_>>())
        .bind(parked.iter().map(|p| p.sequence).collect::<Vec<_>>())
        .bind(
            parked
                .iter()
                .map(|p| {
                    p.reason
                        .replace('\0', "")
                        .chars()
                        .take(MAX_REASON)
                        .collect()
                })
                .collect::<Vec<String>>(),
        )
        .execute(&mut *connection)
        .await?;
    }
    if !resumed.is_empty() {
        sqlx::query("DELETE FROM projector_parked_streams WHERE account_id = ANY($1)")
            .bind(resumed)
            .execute(&mut *connection)
            .await?;
    }
    Ok(())
}

/// How many streams are parked.
pub async fn parked_count(pool: &sqlx::PgPool) -> Result<i64, sqlx::Error> {
    sqlx::query_scalar("SELECT count(*) FROM projector_parked_streams")
        .fetch_one(pool)
        .await
}

/// Reads one stored account event of `account`, upcast to the current version.
pub fn stored_event(account: Uuid, event: &LoggedEvent) -> Result<StreamEvent, StoredEventError> {
    let sequence = event.sequence;
    let unreadable = |reason: String| StoredEventError::Unreadable {
        aggregate_id: account.to_string(),
        sequence,
        reason,
    };
    let payload =
        serde_json::from_str(&event.payload).map_err(|err| unreadable(err.to_string()))?;
    let decoded: AccountEvent =
        domain::read_stored(&event.event_type, &event.event_version, payload)
            .map_err(|err| unreadable(err.to_string()))?;
    let metadata: serde_json::Value =
        serde_json::from_str(&event.metadata).map_err(|err| unreadable(err.to_string()))?;
    let tenant = metadata["tenant"]
        .as_str()
        .ok_or_else(|| unreadable("metadata has no tenant".into()))?
        .to_owned();
    Ok(StreamEvent {
        account_id: account,
        sequence,
        tenant,
        event_id: event.event_id,
        recorded_at: event.recorded_at,
        event: decoded,
    })
}
