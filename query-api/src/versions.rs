//! The current versions of the accounts the projector changed lately, as its notifications
//! told them: enough to answer `If-None-Match` with 304 without reading the row.

use std::num::NonZeroUsize;
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use lru::LruCache;
use service_kit::db::channels::{ReadModel, ReadModelChange};
use uuid::Uuid;

/// How many accounts are remembered. Bounded by count: an entry is an id, a version and a
/// tenant of at most `MAX_TENANT_BYTES` (64), so this is also a bound of about 15 MiB. Only
/// rows the projector committed are entered, never ids a caller names.
pub(crate) const CAPACITY: NonZeroUsize = NonZeroUsize::new(100_000).unwrap();

/// How long a notified version is trusted. Some changes of a row are never notified (`projector
/// rebuild` folds events the live projector then finds already applied), and a listener whose
/// connection died without a reset hears nothing until the socket times out: past this age,
/// the row is read instead, so such a gap shows stale versions for seconds, not for good.
pub(crate) const FRESH_FOR: Duration = Duration::from_secs(10);

/// Account id → (tenant, version), valid only while the listener listens: a notification sent
/// while it did not is lost, so the map starts empty each time it listens again, and an
/// account not notified since is unknown (read from the database).
pub(crate) struct KnownVersions {
    state: Mutex<State>,
    fresh_for: Duration,
}

struct State {
    /// Whether every change committed since the map was last emptied has been entered.
    listening: bool,
    /// The least recently changed or asked-for account goes first when full.
    accounts: LruCache<Uuid, Known>,
}

struct Known {
    tenant: Box<str>,
    version: i64,
    /// When the version was last notified.
    noted: Instant,
}

impl KnownVersions {
    pub(crate) fn new(capacity: NonZeroUsize, fresh_for: Duration) -> Self {
        Self {
            state: Mutex::new(State {
                listening: false,
                accounts: LruCache::new(capacity),
            }),
            fresh_for,
        }
    }

    /// The listener listens (again), from now on: what changed before is forgotten, since
    /// changes may have been missed.
    pub(crate) fn listening(&self) {
        let mut state = self.state();
        state.accounts.clear();
        state.listening = true;
    }

    /// The listener lost its connection: nothing is known until it listens again.
    pub(crate) fn deaf(&self) {
        let mut state = self.state();
        state.accounts.clear();
        state.listening = false;
    }

    /// Enters a committed change (of an account; other read models are not kept).
    pub(crate) fn record(&self, change: &ReadModelChange) {
        if change.model != ReadModel::Account {
            return;
        }
        let mut state = self.state();
        if !state.listening {
            return;
        }
        match state.accounts.get_mut(&change.id) {
            // Notifications come in commit order; `max` keeps a version even so.
            Some(known) => {
                known.version = known.version.max(change.version);
                known.noted = Instant::now();
            }
            None => {
                state.accounts.put(
                    change.id,
                    Known {
                        tenant: change.tenant.as_str().into(),
                        version: change.version,
                        noted: Instant::now(),
                    },
                );
            }
        }
    }

    /// The current version of `tenant`'s account `id`, if known. Another tenant's account is
    /// as unknown as one never notified.
    pub(crate) fn version(&self, tenant: &str, id: Uuid) -> Option<i64> {
        let mut state = self.state();
        if !state.listening {
            return None;
        }
        state
            .accounts
            .get(&id)
            .filter(|known| &*known.tenant == tenant && known.noted.elapsed() < self.fresh_for)
            .map(|known| known.version)
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn change(model: ReadModel, tenant: &str, id: u128, version: i64) -> ReadModelChange {
        ReadModelChange {
            model,
            tenant: tenant.into(),
            id: Uuid::from_u128(id),
            version,
        }
    }

    #[test]
    fn only_accounts_notified_while_listening_are_known_and_only_to_their_tenant() {
        let known = KnownVersions::new(NonZeroUsize::new(2).unwrap(), FRESH_FOR);
        let id = Uuid::from_u128;
        known.record(&change(ReadModel::Account, "acme", 1, 3));
        assert_eq!(known.version("acme", id(1)), None, "not listening yet");

        known.listening();
        known.record(&change(ReadModel::Account, "acme", 1, 3));
        known.record(&change(ReadModel::Transfer, "acme", 2, 5));
        assert_eq!(known.version("acme", id(1)), Some(3));
        assert_eq!(known.version("globex", id(1)), None);
        assert_eq!(
            known.version("acme", id(2)),
            None,
            "a transfer is no account"
        );

        known.record(&change(ReadModel::Account, "acme", 1, 5));
        known.record(&change(ReadModel::Account, "acme", 1, 4));
        assert_eq!(known.version("acme", id(1)), Some(5));

        // Full: the account least recently changed or asked for goes.
        known.record(&change(ReadModel::Account, "acme", 3, 1));
        known.record(&change(ReadModel::Account, "acme", 4, 1));
        assert_eq!(known.version("acme", id(1)), None);
        assert_eq!(known.version("acme", id(4)), Some(1));

        known.deaf();
        assert_eq!(known.version("acme", id(4)), None);
        known.listening();
        assert_eq!(known.version("acme", id(4)), None, "forgotten, not paused");
    }

    #[test]
    fn a_version_notified_longer_ago_than_it_is_trusted_is_unknown() {
        let stale = KnownVersions::new(CAPACITY, Duration::ZERO);
        stale.listening();
        stale.record(&change(ReadModel::Account, "acme", 1, 3));
        assert_eq!(stale.version("acme", Uuid::from_u128(1)), None);
    }
}
