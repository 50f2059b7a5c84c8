//! The read models as one abstraction: every read model folds the event log the same way for
//! `rebuild` (into fresh tables, swapped in) and `check` (compared with the live tables).
//!
//! Adding a read model: its rows and fold beside the others (`model`, `transfers`), its tables
//! in `migrations/` (and in `ledger_protect_read_models`), an implementation of [`ReadModel`],
//! and one line in [`read_models`]. The live projector applies each model from the messages
//! that concern it (`lib.rs`): accounts event by event, verified against the store; transfers
//! refolded from the store per message.

use std::collections::HashMap;

use cqrs_es::Aggregate;
use domain::{Account, Transfer};
use futures::future::BoxFuture;
use service_kit::event_log::LoggedEvent;
use sqlx::PgConnection;
use uuid::Uuid;

use crate::model::{self, AccountRow, EntryRow};
use crate::rebuild::RebuildError;
use crate::store::{self, Tables};
use crate::transfers::{self, TransferFold, TransferRow};

/// Rows written per statement.
const WRITE_CHUNK: usize = 10_000;

/// One way a row of a read model differs from its events.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Difference {
    /// The account or transfer.
    pub id: Uuid,
    pub what: String,
}

/// What a fold is for: a rebuild keeps every row it writes; a check only compares, so it keeps
/// counts where a rebuild keeps rows it can write and forget (account entries).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Purpose {
    #[default]
    Rebuild,
    Check,
}

/// A read model, folded from the whole event log in commit order.
pub trait ReadModel: Send {
    /// What its rows are, for reports: "accounts", "transfers".
    fn name(&self) -> &'static str;
    /// Its tables. A rebuild fills a `<table>_rebuild` copy of each and swaps them in.
    fn tables(&self) -> &'static [&'static str];
    /// Folds the log's next event, whatever its stream type.
    fn fold(&mut self, event: &LoggedEvent) -> Result<(), RebuildError>;
    /// Writes into the rebuild tables what can be written before the fold ends (`finished`
    /// false), or everything that is left (`finished` true).
    fn write<'a>(
        &'a mut self,
        connection: &'a mut PgConnection,
        finished: bool,
    ) -> BoxFuture<'a, Result<(), sqlx::Error>>;
    /// How the live tables differ from the fold.
    fn differences<'a>(
        &'a self,
        connection: &'a mut PgConnection,
    ) -> BoxFuture<'a, Result<Vec<Difference>, sqlx::Error>>;
    /// Rows folded: accounts, transfers.
    fn rows(&self) -> usize;
}

/// Every read model: what `rebuild` and `check` cover.
pub fn read_models(purpose: Purpose) -> Vec<Box<dyn ReadModel>> {
    vec![
        Box::new(Accounts {
            purpose,
            ..Accounts::default()
        }),
        Box::new(Transfers::default()),
    ]
}

/// `accounts` and `account_entries`.
#[derive(Default)]
struct Accounts {
    purpose: Purpose,
    rows: HashMap<Uuid, AccountRow>,
    /// Entries not yet written (rebuild).
    entries: Vec<EntryRow>,
    /// Entries per account (check).
    entry_counts: HashMap<Uuid, i64>,
}

impl ReadModel for Accounts {
    fn name(&self) -> &'static str {
        "accounts"
    }

    fn tables(&self) -> &'static [&'static str] {
        &[Tables::LIVE.accounts, Tables::LIVE.entries]
    }

    fn fold(&mut self, event: &LoggedEvent) -> Result<(), RebuildError> {
        if event.aggregate_type != Account::TYPE {
            return Ok(());
        }
        let (account, decoded) = store::decode(event)?;
        let mut row = self.rows.remove(&account);
        let written = self.entries.len();
        let applied = model::apply(&mut row, account, event, &decoded, &mut self.entries);
        if let Some(row) = row {
            self.rows.insert(account, row);
        }
        applied?;
        if self.purpose == Purpose::Check {
            for entry in self.entries.drain(written..) {
                *self.entry_counts.entry(entry.account_id).or_default() += 1;
            }
        }
        Ok(())
    }

    fn write<'a>(
        &'a mut self,
        connection: &'a mut PgConnection,
        finished: bool,
    ) -> BoxFuture<'a, Result<(), sqlx::Error>> {
        Box::pin(async move {
            store::copy_entries(connection, Tables::REBUILD, &self.entries).await?;
            self.entries.clear();
            if finished {
                let rows: Vec<&AccountRow> = self.rows.values().collect();
                for chunk in rows.chunks(WRITE_CHUNK) {
                    store::save(connection, Tables::REBUILD, chunk, &[]).await?;
                }
            }
            Ok(())
        })
    }

    fn differences<'a>(
        &'a self,
        connection: &'a mut PgConnection,
    ) -> BoxFuture<'a, Result<Vec<Difference>, sqlx::Error>> {
        Box::pin(async move {
            let live = store::all_rows(connection).await?;
            let mut differences = Vec::new();
            for (id, (row, entries)) in &live {
                let Some(expected) = self.rows.get(id) else {
                    differences.push(Difference {
                        id: *id,
                        what: "in the read model, but no such account in the event store".into(),
                    });
                    continue;
                };
                let expected_entries = self.entry_counts.get(id).copied().unwrap_or(0);
                compare_account(expected, expected_entries, row, *entries, &mut differences);
            }
            for id in self.rows.keys().filter(|id| !live.contains_key(id)) {
                differences.push(Difference {
                    id: *id,
                    what: "account in the event store, missing from the read model".into(),
                });
            }
            Ok(differences)
        })
    }

    fn rows(&self) -> usize {
        self.rows.len()
    }
}

fn compare_account(
    expected: &AccountRow,
    expected_entries: i64,
    row: &AccountRow,
    entries: i64,
    out: &mut Vec<Difference>,
) {
    let mut differ = |field: &str, events: String, read_model: String| {
        if events != read_model {
            out.push(Difference {
                id: row.id,
                what: format!("{field}: events say {events}, read model has {read_model}"),
            });
        }
    };
    differ("tenant", expected.tenant.clone(), row.tenant.clone());
    differ("owner", expected.owner.clone(), row.owner.clone());
    differ("currency", expected.currency.clone(), row.currency.clone());
    differ(
        "overdraft_limit",
        expected.overdraft_limit.to_string(),
        row.overdraft_limit.to_string(),
    );
    differ(
        "balance",
        expected.balance.to_string(),
        row.balance.to_string(),
    );
    differ("status", expected.status.clone(), row.status.clone());
    differ(
        "version",
        expected.version.to_string(),
        row.version.to_string(),
    );
    differ("entries", expected_entries.to_string(), entries.to_string());
}

/// `transfers`.
#[derive(Default)]
struct Transfers {
    folds: HashMap<Uuid, TransferFold>,
    /// Streams that cannot be folded, and why.
    unreadable: HashMap<Uuid, String>,
}

impl Transfers {
    fn folded_rows(&self) -> Vec<TransferRow> {
        self.folds
            .iter()
            .filter(|(id, _)| !self.unreadable.contains_key(id))
            .filter_map(|(id, fold)| fold.row(*id))
            .collect()
    }
}

impl ReadModel for Transfers {
    fn name(&self) -> &'static str {
        "transfers"
    }

    fn tables(&self) -> &'static [&'static str] {
        &[transfers::TABLE]
    }

    fn fold(&mut self, event: &LoggedEvent) -> Result<(), RebuildError> {
        if event.aggregate_type != Transfer::TYPE {
            return Ok(());
        }
        let Ok(id) = event.aggregate_id.parse::<Uuid>() else {
            return Err(store::StoredEventError::Unreadable {
                aggregate_id: event.aggregate_id.clone(),
                sequence: event.sequence,
                reason: "aggregate id is not a UUID".into(),
            }
            .into());
        };
        if self.unreadable.contains_key(&id) {
            return Ok(());
        }
        if let Err(reason) = self.folds.entry(id).or_default().apply(id, event) {
            self.unreadable.insert(id, reason);
        }
        Ok(())
    }

    fn write<'a>(
        &'a mut self,
        connection: &'a mut PgConnection,
        finished: bool,
    ) -> BoxFuture<'a, Result<(), sqlx::Error>> {
        Box::pin(async move {
            if finished {
                let rows = self.folded_rows();
                for chunk in rows.chunks(WRITE_CHUNK) {
                    transfers::save(connection, transfers::REBUILD_TABLE, chunk).await?;
                }
            }
            Ok(())
        })
    }

    fn differences<'a>(
        &'a self,
        connection: &'a mut PgConnection,
    ) -> BoxFuture<'a, Result<Vec<Difference>, sqlx::Error>> {
        Box::pin(async move {
            let mut differences: Vec<Difference> = self
                .unreadable
                .iter()
                .map(|(id, reason)| Difference {
                    id: *id,
                    what: format!("transfer events cannot be folded: {reason}"),
                })
                .collect();
            let mut live: HashMap<Uuid, TransferRow> = transfers::all_rows(connection)
                .await?
                .into_iter()
                .map(|row| (row.id, row))
                .collect();
            for expected in self.folded_rows() {
                let Some(row) = live.remove(&expected.id) else {
                    differences.push(Difference {
                        id: expected.id,
                        what: "transfer in the event store, missing from the read model".into(),
                    });
                    continue;
                };
                if row != expected {
                    differences.push(Difference {
                        id: row.id,
                        what: format!("transfer: events say {expected:?}, read model has {row:?}"),
                    });
                }
            }
            for id in live.keys().filter(|id| !self.unreadable.contains_key(id)) {
                differences.push(Difference {
                    id: *id,
                    what: "transfer in the read model, but not in the event store".into(),
                });
            }
            Ok(differences)
        })
    }

    fn rows(&self) -> usize {
        self.folds.len()
    }
}
