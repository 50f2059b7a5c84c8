//! `projector check`: the read models (accounts, their entries, transfers) compared with a
//! fold of the event store, row by row.
//! Run it once the projector has caught up: a row that is merely behind shows as a difference.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use service_kit::event_log::{self, LogPosition};
use sqlx::PgPool;
use uuid::Uuid;

use crate::model::AccountRow;
use crate::rebuild::{Fold, RebuildError};
use crate::transfers;

/// Events read per query.
const BATCH: i64 = 20_000;

/// One way a row of a read model differs from its events.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Difference {
    /// The account or transfer.
    pub id: Uuid,
    pub what: String,
}

#[derive(Debug, Clone)]
pub struct CheckReport {
    pub accounts: usize,
    pub transfers: usize,
    pub events: u64,
    pub differences: Vec<Difference>,
    pub elapsed: Duration,
}

/// An account as the read model holds it, with its number of entries.
#[derive(sqlx::FromRow)]
struct ReadRow {
    id: Uuid,
    tenant: String,
    owner: String,
    currency: String,
    overdraft_limit: i64,
    balance: i64,
    status: String,
    version: i64,
    entries: i64,
}

/// Folds every committed event and compares each account's balance, status, version,
/// owner, currency, overdraft limit and number of entries with the read models.
pub async fn check(pool: &PgPool) -> Result<CheckReport, RebuildError> {
    let started = Instant::now();
    let mut fold = Fold::default();
    let mut entry_counts: HashMap<Uuid, i64> = HashMap::new();
    let mut position = LogPosition::START;
    loop {
        let batch = event_log::read_committed(pool, position, BATCH).await?;
        let Some(last) = batch.last() else { break };
        position = last.position;
        for event in &batch {
            fold.apply(event)?;
        }
        for entry in fold.entries.drain(..) {
            *entry_counts.entry(entry.account_id).or_default() += 1;
        }
    }
    let rows: Vec<ReadRow> = sqlx::query_as(
        "SELECT a.id, a.tenant, a.owner, a.currency, a.overdraft_limit, a.balance, a.status,
                a.version, (SELECT count(*) FROM account_entries e WHERE e.account_id = a.id) AS entries
           FROM accounts a",
    )
    .fetch_all(pool)
    .await?;
    let mut differences = Vec::new();
    let mut seen = HashMap::with_capacity(rows.len());
    for row in rows {
        let id = row.id;
        seen.insert(id, ());
        let Some(expected) = fold.rows.get(&id) else {
            differences.push(Difference {
                id,
                what: "in the read model, but no such account in the event store".into(),
            });
            continue;
        };
        let entries = entry_counts.get(&id).copied().unwrap_or(0);
        compare(expected, entries, &row, &mut differences);
    }
    for id in fold.rows.keys().filter(|id| !seen.contains_key(id)) {
        differences.push(Difference {
            id: *id,
            what: "account in the event store, missing from the read model".into(),
        });
    }
    let transfers = check_transfers(pool, &mut differences).await?;
    differences.sort_by(|a, b| (a.id, &a.what).cmp(&(b.id, &b.what)));
    Ok(CheckReport {
        accounts: fold.rows.len(),
        transfers,
        events: fold.events,
        differences,
        elapsed: started.elapsed(),
    })
}

fn compare(expected: &AccountRow, entries: i64, row: &ReadRow, out: &mut Vec<Difference>) {
    let ReadRow {
        id,
        tenant,
        owner,
        currency,
        overdraft_limit: overdraft,
        balance,
        status,
        version,
        entries: entry_count,
    } = row;
    let mut differ = |field: &str, events: String, read_model: String| {
        if events != read_model {
            out.push(Difference {
                id: *id,
                what: format!("{field}: events say {events}, read model has {read_model}"),
            });
        }
    };
    differ("tenant", expected.tenant.clone(), tenant.clone());
    differ("owner", expected.owner.clone(), owner.clone());
    differ("currency", expected.currency.clone(), currency.clone());
    differ(
        "overdraft_limit",
        expected.overdraft_limit.to_string(),
        overdraft.to_string(),
    );
    differ("balance", expected.balance.to_string(), balance.to_string());
    differ("status", expected.status.clone(), status.clone());
    differ("version", expected.version.to_string(), version.to_string());
    differ("entries", entries.to_string(), entry_count.to_string());
}

type TransferReadRow = (Uuid, String, String, Option<String>, i64, i64);

/// Compares every transfer row (status, reason, version, amount, tenant) with a fold of its
/// stream; returns how many transfers the store holds.
async fn check_transfers(
    pool: &PgPool,
    differences: &mut Vec<Difference>,
) -> Result<usize, RebuildError> {
    let mut connection = pool.acquire().await?;
    let events = transfers::stored_events(&mut connection, None).await?;
    let (expected, unreadable) = transfers::fold_all(&events);
    for (id, reason) in unreadable {
        differences.push(Difference {
            id,
            what: format!("transfer events cannot be folded: {reason}"),
        });
    }
    let rows: Vec<TransferReadRow> =
        sqlx::query_as("SELECT id, tenant, status, reason, version, amount FROM transfers")
            .fetch_all(&mut *connection)
            .await?;
    let mut rows: HashMap<Uuid, TransferReadRow> =
        rows.into_iter().map(|row| (row.0, row)).collect();
    for transfer in &expected {
        let Some((id, tenant, status, reason, version, amount)) = rows.remove(&transfer.id) else {
            differences.push(Difference {
                id: transfer.id,
                what: "transfer in the event store, missing from the read model".into(),
            });
            continue;
        };
        let ours = (
            tenant.as_str(),
            status.as_str(),
            reason.as_deref(),
            version,
            amount,
        );
        let theirs = (
            transfer.tenant.as_str(),
            transfer.status.as_str(),
            transfer.reason.as_deref(),
            transfer.version,
            transfer.amount,
        );
        if ours != theirs {
            differences.push(Difference {
                id,
                what: format!("transfer: events say {theirs:?}, read model has {ours:?}"),
            });
        }
    }
    for id in rows.keys() {
        differences.push(Difference {
            id: *id,
            what: "transfer in the read model, but not in the event store".into(),
        });
    }
    Ok(expected.len())
}
