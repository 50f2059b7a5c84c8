//! The current versions of the accounts the projector changed lately, as its notifications
//! told them: enough to answer `If-None-Match` with 304 without reading the row, and, once
//! the row at that version has been read, to answer with it from memory.

use std::num::NonZeroUsize;
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use lru::LruCache;
use service_kit::auth::MAX_TENANT_BYTES;
use service_kit::db::channels::{ReadModel, ReadModelChange};
use uuid::Uuid;

/// How many accounts are remembered. Bounded by count: an entry is an id, a version, a tenant
/// of at most `MAX_TENANT_BYTES` (64) and at most one view of the account (the caller keeps
/// none with more text than the domain allows: an owner of 200 characters), so about 1.2 KiB
/// at worst, and this a bound of about 60 MiB. Only accounts notified are entered, never ids a
/// caller names.
pub(crate) const CAPACITY: NonZeroUsize = NonZeroUsize::new(50_000).unwrap();

/// How long a notified version, and a view read at it, is trusted. Some changes of a row are
/// never notified (`projector rebuild` folds events the live projector then finds already
/// applied, and repairs rows at their version), and a listener whose connection died without a
/// reset hears nothing until the socket times out: past this age, the row is read instead, so
/// such a gap shows stale versions for seconds, not for good. Only a newer version renews the
/// trust: a notification of the same version again (anyone with a database login can send
/// one) does not keep a view alive.
pub const FRESH_FOR: Duration = Duration::from_secs(10);

/// Account id → (tenant, version, view), valid only while the listener listens: a notification
/// sent while it did not is lost, so the map starts empty each time it listens again, and an
/// account not notified since is unknown (read from the database).
///
/// `V` is the view of an account as read from the database. It is kept only for an account
/// already entered by a notification, and given out only while its version is the notified
/// one: it is then as fresh as a 304 is.
pub(crate) struct KnownVersions<V> {
    state: Mutex<State<V>>,
    fresh_for: Duration,
}

struct State<V> {
    /// Whether every change committed since the map was last emptied has been entered.
    listening: bool,
    /// The least recently changed or asked-for account goes first when full.
    accounts: LruCache<Uuid, Known<V>>,
}

struct Known<V> {
    tenant: Box<str>,
    version: i64,
    /// When `version` was notified.
    noted: Instant,
    /// The account as read at a version (which may be ahead of `version` for a moment, when a
    /// read saw a commit before its notification came).
    view: Option<View<V>>,
}

struct View<V> {
    version: i64,
    read_at: Instant,
    account: V,
}

impl<V: Clone> KnownVersions<V> {
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
    /// Notifications are not authenticated (any database login can send one), so one naming
    /// a tenant no token can name is ignored, and an account notified for two tenants is
    /// forgotten.
    pub(crate) fn record(&self, change: &ReadModelChange) {
        if change.model != ReadModel::Account || change.tenant.len() > MAX_TENANT_BYTES {
            return;
        }
        let mut state = self.state();
        if !state.listening {
            return;
        }
        match state.accounts.get_mut(&change.id) {
            Some(known) if *known.tenant == *change.tenant => {
                // Notifications come in commit order; a version is never taken back even so.
                if change.version > known.version {
                    known.version = change.version;
                    known.noted = Instant::now();
                    if known
                        .view
                        .as_ref()
                        .is_some_and(|view| view.version < known.version)
                    {
                        known.view = None;
                    }
                }
            }
            Some(_) => {
                state.accounts.pop(&change.id);
            }
            None => {
                state.accounts.put(
                    change.id,
                    Known {
                        tenant: change.tenant.as_str().into(),
                        version: change.version,
                        noted: Instant::now(),
                        view: None,
                    },
                );
            }
        }
    }

    /// The current version of `tenant`'s account `id`, if known. Another tenant's account is
    /// as unknown as one never notified.
    pub(crate) fn version(&self, tenant: &str, id: Uuid) -> Option<i64> {
        self.with_current(tenant, id, |known| known.version)
    }

    /// `tenant`'s account `id` as a read would return it now, if its current version is known
    /// and was read at that version, lately.
    pub(crate) fn view(&self, tenant: &str, id: Uuid) -> Option<V> {
        self.with_current(tenant, id, |known| match &known.view {
            Some(view)
                if view.version == known.version && view.read_at.elapsed() < self.fresh_for =>
            {
                Some(view.account.clone())
            }
            _ => None,
        })
        .flatten()
    }

    /// Keeps `view`, `tenant`'s account `id` as just read at `version`, if the account is
    /// known: an account never notified, or one whose version has since moved past the
    /// read, gains nothing.
    pub(crate) fn keep(&self, tenant: &str, id: Uuid, version: i64, view: &V) {
        let mut state = self.state();
        if !state.listening {
            return;
        }
        if let Some(known) = state.accounts.peek_mut(&id)
            && &*known.tenant == tenant
            && version >= known.version
        {
            known.view = Some(View {
                version,
                read_at: Instant::now(),
                account: view.clone(),
            });
        }
    }

    fn with_current<T>(&self, tenant: &str, id: Uuid, f: impl FnOnce(&Known<V>) -> T) -> Option<T> {
        let mut state = self.state();
        if !state.listening {
            return None;
        }
        state
            .accounts
            .get(&id)
            .filter(|known| &*known.tenant == tenant && known.noted.elapsed() < self.fresh_for)
            .map(f)
    }

    fn state(&self) -> MutexGuard<'_, State<V>> {
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
        let known = KnownVersions::<()>::new(NonZeroUsize::new(2).unwrap(), FRESH_FOR);
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
        known.record(&change(ReadModel::Account, "globex", 1, 6));
        assert_eq!(
            known.version("acme", id(1)),
            None,
            "notified for two tenants"
        );
        assert_eq!(known.version("globex", id(1)), None);
        known.record(&change(ReadModel::Account, "acme", 1, 5));
        let long = "t".repeat(MAX_TENANT_BYTES + 1);
        known.record(&change(ReadModel::Account, &long, 2, 1));
        assert_eq!(
            known.version(&long, id(2)),
            None,
            "no token names such a tenant"
        );

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
        stale.keep("acme", Uuid::from_u128(1), 3, &"read at 3");
        assert_eq!(stale.version("acme", Uuid::from_u128(1)), None);
        assert_eq!(stale.view("acme", Uuid::from_u128(1)), None);
    }

    #[test]
    fn only_a_newer_version_renews_the_trust_and_a_view_is_trusted_as_long_from_its_read() {
        let fresh_for = Duration::from_millis(500);
        let known = KnownVersions::new(CAPACITY, fresh_for);
        let id = Uuid::from_u128(1);
        known.listening();
        known.record(&change(ReadModel::Account, "acme", 1, 1));
        known.keep("acme", id, 1, &"read at 1");
        std::thread::sleep(fresh_for);
        known.record(&change(ReadModel::Account, "acme", 1, 1));
        assert_eq!(
            known.version("acme", id),
            None,
            "notified again, not renewed"
        );
        assert_eq!(known.view("acme", id), None);

        known.record(&change(ReadModel::Account, "acme", 1, 2));
        assert_eq!(known.version("acme", id), Some(2));
        // Read ahead of its notification, which comes only once the read is too old.
        known.keep("acme", id, 3, &"read at 3");
        std::thread::sleep(fresh_for);
        known.record(&change(ReadModel::Account, "acme", 1, 3));
        assert_eq!(known.version("acme", id), Some(3));
        assert_eq!(known.view("acme", id), None, "read too long ago");
    }

    #[test]
    fn a_view_is_given_out_only_at_the_notified_version_and_only_to_its_tenant() {
        let known = KnownVersions::new(CAPACITY, FRESH_FOR);
        let id = Uuid::from_u128(1);
        known.listening();
        known.keep("acme", id, 1, &"read at 1");
        assert_eq!(known.view("acme", id), None, "never notified: not kept");

        known.record(&change(ReadModel::Account, "acme", 1, 3));
        known.keep("acme", id, 2, &"read at 2");
        assert_eq!(
            known.view("acme", id),
            None,
            "read before the notified version"
        );
        known.keep("globex", id, 3, &"read at 3 by globex");
        assert_eq!(known.view("globex", id), None);
        assert_eq!(
            known.view("acme", id),
            None,
            "another tenant's read is not kept"
        );

        known.keep("acme", id, 3, &"read at 3");
        assert_eq!(known.view("acme", id), Some("read at 3"));
        assert_eq!(known.view("globex", id), None);

        // A read that saw a commit before its notification came is given out from then on.
        known.keep("acme", id, 4, &"read at 4");
        assert_eq!(known.view("acme", id), None, "version 4 not notified yet");
        known.record(&change(ReadModel::Account, "acme", 1, 4));
        assert_eq!(known.view("acme", id), Some("read at 4"));

        known.record(&change(ReadModel::Account, "acme", 1, 5));
        assert_eq!(known.view("acme", id), None, "changed since it was read");

        known.keep("acme", id, 5, &"read at 5");
        known.deaf();
        known.listening();
        assert_eq!(known.view("acme", id), None, "forgotten with the versions");
    }
}
