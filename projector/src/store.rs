//! Reading and writing the read-model tables, and reading streams back from the event store.

use std::collections::HashMap;

use domain::AccountEvent;
use service_kit::db::channels;
use service_kit::event_log::{EVENT_COLUMNS, LoggedEvent};
use sqlx::postgres::PgRow;
use sqlx::{FromRow, PgConnection, Row};
use uuid::Uuid;

use crate::model::{AccountRow, EntryRow};

/// Which pair of tables to write: the live ones, whose changes are notified, or the ones a
/// rebuild fills.
#[derive(Debug, Clone, Copy)]
pub struct Tables {
    pub accounts: &'static str,
    pub entries: &'static str,
    /// Whether [`save`] notifies the rows it moved ([`channels::READ_MODELS_CHANGED`]).
    pub notified: bool,
}

impl Tables {
    pub const LIVE: Self = Self {
        accounts: "accounts",
        entries: "account_entries",
        notified: true,
    };
    pub const REBUILD: Self = Self {
        accounts: "accounts_rebuild",
        entries: "account_entries_rebuild",
        notified: false,
    };
}

/// The columns of an `accounts` row, in the order [`save`] binds them, with their types: the one
/// list the upsert and the reads are generated from, so a column cannot be written on insert
/// and forgotten on update.
const ACCOUNT_COLUMNS: &[(&str, &str)] = &[
    ("id", "uuid"),
    ("tenant", "text"),
    ("owner", "text"),
    ("currency", "text"),
    ("overdraft_limit", "int8"),
    ("balance", "int8"),
    ("status", "text"),
    ("version", "int8"),
    ("opened_at", "timestamptz"),
    ("updated_at", "timestamptz"),
];

fn column_list(columns: &[(&str, &str)]) -> String {
    columns
        .iter()
        .map(|(name, _)| *name)
        .collect::<Vec<_>>()
        .join(", ")
}

/// `INSERT` of rows given as one array per column (`$1` the first of `columns`, which is the
/// key), moving an existing row forward (every column) only to a higher `version`.
pub fn upsert(table: &str, columns: &[(&str, &str)]) -> String {
    let arrays: Vec<String> = columns
        .iter()
        .enumerate()
        .map(|(i, (_, kind))| format!("${}::{kind}[]", i + 1))
        .collect();
    let updates: Vec<String> = columns
        .iter()
        .skip(1)
        .map(|(name, _)| format!("{name} = EXCLUDED.{name}"))
        .collect();
    format!(
        "INSERT INTO {table} ({}) SELECT * FROM UNNEST({})
         ON CONFLICT ({}) DO UPDATE SET {} WHERE {table}.version < EXCLUDED.version",
        column_list(columns),
        arrays.join(", "),
        columns[0].0,
        updates.join(", "),
    )
}

/// What the live read model holds for the accounts `ids`: their rows, and where each parked one
/// stopped (the first version not applied). One round trip; each row is looked up in the primary
/// key on its own (as in [`announced_events`]): as `id = ANY($1)`, the prepared statement's
/// generic plan scanned a table of a thousand accounts whole, comparing each row with every id
/// of the batch, and cost three times as much under load.
///
/// With `lock`, the rows are locked until the transaction ends, in id order (so that two
/// projectors cannot deadlock). The usual batch needs no lock: [`save`] moves a row only to a
/// higher version and writes each entry once, and every row is the fold of its stream up to its
/// version, so two projectors that overlap during a rebalance write the same rows and entries,
/// and the newer fold wins. Unlocked, the reads need no transaction around them, and the batch
/// costs three round trips (this, [`announced_events`], [`save`]) where `FOR UPDATE` took six.
/// Parking and resuming streams is what needs the lock: a parking written from a stale read
/// would stop a stream that another projector moved past.
pub async fn live_state(
    connection: &mut PgConnection,
    ids: &[Uuid],
    lock: bool,
) -> Result<(HashMap<Uuid, AccountRow>, HashMap<Uuid, i64>), sqlx::Error> {
    let found: Vec<PgRow> = sqlx::query(&format!(
        "SELECT a.*, p.account_id AS parked_account, p.sequence AS parked_sequence
           FROM (SELECT a.* FROM UNNEST($1::uuid[]) AS w(id),
                        LATERAL (SELECT {} FROM {} WHERE id = w.id OFFSET 0 {}) AS a) AS a
           FULL JOIN (SELECT account_id, sequence FROM projector_parked_streams
                       WHERE account_id = ANY($1)) AS p ON p.account_id = a.id",
        column_list(ACCOUNT_COLUMNS),
        Tables::LIVE.accounts,
        if lock { "FOR UPDATE" } else { "" },
    ))
    .bind(ids)
    .fetch_all(connection)
    .await?;
    let (mut rows, mut parked) = (HashMap::new(), HashMap::new());
    for found in &found {
        if found.try_get::<Option<Uuid>, _>("id")?.is_some() {
            let row = AccountRow::from_row(found)?;
            rows.insert(row.id, row);
        }
        if let Some(id) = found.try_get::<Option<Uuid>, _>("parked_account")? {
            parked.insert(id, found.try_get("parked_sequence")?);
        }
    }
    Ok((rows, parked))
}

/// Every live account row, with its number of entries.
pub async fn all_rows(
    connection: &mut PgConnection,
) -> Result<HashMap<Uuid, (AccountRow, i64)>, sqlx::Error> {
    #[derive(sqlx::FromRow)]
    struct Counted {
        #[sqlx(flatten)]
        row: AccountRow,
        entries: i64,
    }
    let rows: Vec<Counted> = sqlx::query_as(&format!(
        "SELECT {}, (SELECT count(*) FROM {} e WHERE e.account_id = a.id) AS entries
           FROM {} a",
        column_list(ACCOUNT_COLUMNS),
        Tables::LIVE.entries,
        Tables::LIVE.accounts,
    ))
    .fetch_all(connection)
    .await?;
    Ok(rows
        .into_iter()
        .map(|counted| (counted.row.id, (counted.row, counted.entries)))
        .collect())
}

/// The columns of an `account_entries` row, in the order [`save`] binds them.
const ENTRY_COLUMNS: &[(&str, &str)] = &[
    ("account_id", "uuid"),
    ("version", "int8"),
    ("tenant", "text"),
    ("kind", "text"),
    ("amount", "int8"),
    ("currency", "text"),
    ("balance_after", "int8"),
    ("event_id", "uuid"),
    ("recorded_at", "timestamptz"),
    ("transfer_id", "uuid"),
];

/// The statement of [`save`]: one round trip for the rows, the entries and, for tables that are
/// [`Tables::notified`], the notifications of the rows it moved (delivered at commit).
fn save_sql(tables: Tables) -> String {
    let entry_arrays: Vec<String> = ENTRY_COLUMNS
        .iter()
        .enumerate()
        .map(|(i, (_, kind))| format!("${}::{kind}[]", ACCOUNT_COLUMNS.len() + i + 1))
        .collect();
    let result = if tables.notified {
        channels::notify_rows_sql(channels::ReadModel::Account, "saved")
    } else {
        "SELECT count(*) FROM saved".to_owned()
    };
    format!(
        "WITH saved AS ({} RETURNING tenant, id, version),
              entered AS (INSERT INTO {} ({}) SELECT * FROM UNNEST({})
                          ON CONFLICT (account_id, version) DO NOTHING)
         {result}",
        upsert(tables.accounts, ACCOUNT_COLUMNS),
        tables.entries,
        column_list(ENTRY_COLUMNS),
        entry_arrays.join(", "),
    )
}

/// Writes `rows` (insert or move forward, never back) and `entries` (once each); notifies the
/// rows it moved if `tables` are [`Tables::notified`].
pub async fn save(
    connection: &mut PgConnection,
    tables: Tables,
    rows: &[&AccountRow],
    entries: &[EntryRow],
) -> Result<(), sqlx::Error> {
    if rows.is_empty() && entries.is_empty() {
        return Ok(());
    }
    sqlx::query(&save_sql(tables))
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
        .bind(entries.iter().map(|e| e.account_id).collect::<Vec<_>>())
        .bind(entries.iter().map(|e| e.version).collect::<Vec<_>>())
        .bind(
            entries
                .iter()
                .map(|e| e.tenant.as_str())
                .collect::<Vec<_>>(),
        )
        .bind(entries.iter().map(|e| e.kind).collect::<Vec<_>>())
        .bind(entries.iter().map(|e| e.amount).collect::<Vec<_>>())
        .bind(
            entries
                .iter()
                .map(|e| e.currency.as_str())
                .collect::<Vec<_>>(),
        )
        .bind(entries.iter().map(|e| e.balance_after).collect::<Vec<_>>())
        .bind(entries.iter().map(|e| e.event_id).collect::<Vec<_>>())
        .bind(entries.iter().map(|e| e.recorded_at).collect::<Vec<_>>())
        .bind(entries.iter().map(|e| e.transfer_id).collect::<Vec<_>>())
        .execute(connection)
        .await?;
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
            "COPY {} ({}) FROM STDIN",
            tables.entries,
            column_list(ENTRY_COLUMNS)
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
///
/// Each wanted stream is looked up in the event store's primary key on its own (`LATERAL`,
/// kept from being flattened into a plain join by `OFFSET 0`), whatever the statistics say.
/// As a plain join, the plan followed the table's statistics: on a store that had grown since
/// they were taken, Postgres scanned every account event for each stream of the batch, or
/// hashed the whole table, once per batch.
pub async fn announced_events(
    connection: &mut PgConnection,
    exact: &[(Uuid, i64)],
    ranges: &[(Uuid, i64, i64)],
) -> Result<HashMap<(Uuid, i64), LoggedEvent>, sqlx::Error> {
    let (exact_streams, exact_versions): (Vec<String>, Vec<i64>) =
        exact.iter().map(|(id, at)| (id.to_string(), *at)).unzip();
    let range_streams: Vec<String> = ranges.iter().map(|(id, _, _)| id.to_string()).collect();
    let range_afters: Vec<i64> = ranges.iter().map(|(_, after, _)| *after).collect();
    let range_ends: Vec<i64> = ranges.iter().map(|(_, _, up_to)| *up_to).collect();
    let events: Vec<LoggedEvent> = sqlx::query_as(&format!(
        "SELECT {EVENT_COLUMNS}
           FROM UNNEST($1::text[], $2::int8[]) AS m(stream, at),
                LATERAL (SELECT * FROM events
                          WHERE aggregate_type = 'account' AND aggregate_id = m.stream
                            AND sequence = m.at
                         OFFSET 0) AS e
         UNION ALL
         SELECT {EVENT_COLUMNS}
           FROM UNNEST($3::text[], $4::int8[], $5::int8[]) AS r(stream, after_seq, up_to),
                LATERAL (SELECT * FROM events
                          WHERE aggregate_type = 'account' AND aggregate_id = r.stream
                            AND sequence > r.after_seq AND sequence <= r.up_to
                         OFFSET 0) AS e"
    ))
    .bind(exact_streams)
    .bind(exact_versions)
    .bind(range_streams)
    .bind(range_afters)
    .bind(range_ends)
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

/// The account a stored account event belongs to, and the event as this code reads it.
pub fn decode(stored: &LoggedEvent) -> Result<(Uuid, AccountEvent), StoredEventError> {
    let unreadable = |reason: String| StoredEventError::Unreadable {
        aggregate_id: stored.aggregate_id.clone(),
        sequence: stored.sequence,
        reason,
    };
    let account = stored
        .aggregate_id
        .parse()
        .map_err(|_| unreadable("aggregate id is not a UUID".into()))?;
    if stored.tenant.is_empty() {
        return Err(unreadable("metadata names no tenant".into()));
    }
    let event = stored.decode().map_err(|err| unreadable(err.to_string()))?;
    Ok((account, event))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_upsert_moves_every_column_but_the_key_forward() {
        let sql = upsert("accounts", ACCOUNT_COLUMNS);
        let (insert, update) = sql.split_once("DO UPDATE").unwrap();
        assert!(insert.contains(&format!("({})", column_list(ACCOUNT_COLUMNS))));
        for (i, (name, kind)) in ACCOUNT_COLUMNS.iter().enumerate() {
            assert!(insert.contains(&format!("${}::{kind}[]", i + 1)), "{name}");
            assert_eq!(
                update.contains(&format!("{name} = EXCLUDED.{name}")),
                i > 0,
                "{name}"
            );
        }
        assert!(update.ends_with("WHERE accounts.version < EXCLUDED.version"));
    }
}
