//! Per-tenant request budgets: a bucket per tenant, refilled continuously, so that one
//! tenant's burst cannot starve the others. Checked once the token is verified (the tenant a
//! forged token names is never charged).
//!
//! `governor` keeps the buckets (GCRA, a token bucket's equivalent, lock-free per tenant): a
//! maintained limiter instead of our own.

use std::num::NonZeroU32;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use governor::clock::{Clock, DefaultClock, Reference};
use governor::middleware::NoOpMiddleware;
use governor::state::keyed::DashMapStateStore;
use governor::{Quota, RateLimiter};

use crate::config::{ConfigError, Optional, Setting};

/// The default is far above what one tenant's clients need, low enough that one tenant cannot
/// take a whole process (the commands benchmark reaches ~10,000/s on one).
pub const RATE_LIMIT_PER_TENANT: Setting<f64> = Setting::new(
    "RATE_LIMIT_PER_TENANT",
    1000.0,
    "requests per second each tenant may sustain, per process; `0`: unlimited",
);
/// Unset: one second's worth, at least 1.
pub const RATE_LIMIT_BURST: Optional<NonZeroU32> = Optional::new(
    "RATE_LIMIT_BURST",
    "one second's worth",
    "requests a tenant may send at once after being idle",
);

/// How often tenants whose bucket is full again are forgotten. A full bucket is what a new one
/// starts as, so forgetting it changes nothing; the tenants remembered are those that sent a
/// request within about one refill of their burst before the last pass, however many tenants
/// there are.
const FORGET_IDLE_EVERY: Duration = Duration::from_secs(1);

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RateLimit {
    /// Sustained requests per second per tenant.
    pub per_second: f64,
    /// Requests a tenant may send at once after being idle.
    pub burst: NonZeroU32,
}

impl RateLimit {
    /// [`RATE_LIMIT_PER_TENANT`] (0: no limit) and [`RATE_LIMIT_BURST`].
    pub fn from_env() -> Result<Option<Self>, ConfigError> {
        let per_second = RATE_LIMIT_PER_TENANT.read()?;
        if per_second.is_nan() || per_second < 0.0 {
            return Err(ConfigError::Invalid {
                name: RATE_LIMIT_PER_TENANT.name,
                reason: "must be a non-negative number of requests per second".into(),
            });
        }
        if per_second == 0.0 {
            return Ok(None);
        }
        // `as` saturates: a rate beyond u32::MAX per second gets the largest burst.
        let one_second = NonZeroU32::new(per_second as u32).unwrap_or(NonZeroU32::MIN);
        let burst = RATE_LIMIT_BURST
            .read()
            .map_err(|_| ConfigError::Invalid {
                name: RATE_LIMIT_BURST.name,
                reason: "must be a whole number of requests, at least 1".into(),
            })?
            .unwrap_or(one_second);
        Ok(Some(Self { per_second, burst }))
    }

    /// One request's worth of the budget comes back every `1 / per_second` seconds (at least
    /// every nanosecond), up to `burst`.
    fn quota(self) -> Quota {
        let period = Duration::try_from_secs_f64(self.per_second.recip())
            .unwrap_or(Duration::MAX)
            .max(Duration::from_nanos(1));
        Quota::with_period(period)
            .expect("the period is at least a nanosecond")
            .allow_burst(self.burst)
    }
}

type KeyedLimiter<C> =
    RateLimiter<String, DashMapStateStore<String>, C, NoOpMiddleware<<C as Clock>::Instant>>;

/// The buckets of the tenants seen lately.
pub struct TenantBudgets<C: Clock = DefaultClock> {
    limiter: KeyedLimiter<C>,
    clock: C,
    started: C::Instant,
    /// When idle tenants were last forgotten: nanoseconds after `started`.
    forgotten_at: AtomicU64,
}

impl<C: Clock> std::fmt::Debug for TenantBudgets<C> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TenantBudgets")
            .field("tenants", &self.limiter.len())
            .finish_non_exhaustive()
    }
}

impl TenantBudgets {
    pub fn new(limit: RateLimit) -> Self {
        Self::with_clock(limit, DefaultClock::default())
    }
}

impl<C: Clock + Clone> TenantBudgets<C> {
    fn with_clock(limit: RateLimit, clock: C) -> Self {
        Self {
            limiter: RateLimiter::dashmap_with_clock(limit.quota(), clock.clone()),
            started: clock.now(),
            clock,
            forgotten_at: AtomicU64::new(0),
        }
    }

    /// Takes one request from `tenant`'s budget, or says how long until one is available.
    pub fn admit(&self, tenant: &str) -> Result<(), Duration> {
        self.forget_idle();
        self.limiter
            .check_key(&tenant.to_owned())
            .map_err(|not_until| not_until.wait_time_from(self.clock.now()))
    }

    /// At most once every [`FORGET_IDLE_EVERY`], and by one caller only: drops the tenants
    /// whose bucket is full again, so memory follows the tenants active lately, not every
    /// tenant ever seen.
    fn forget_idle(&self) {
        let now = self.clock.now().duration_since(self.started).as_u64();
        let last = self.forgotten_at.load(Ordering::Relaxed);
        if now.saturating_sub(last) < FORGET_IDLE_EVERY.as_nanos() as u64 {
            return;
        }
        if self
            .forgotten_at
            .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
            .is_ok()
        {
            self.limiter.retain_recent();
            self.limiter.shrink_to_fit();
        }
    }
}

#[cfg(test)]
mod tests {
    use governor::clock::FakeRelativeClock;

    use super::*;

    fn budgets(
        per_second: f64,
        burst: u32,
    ) -> (TenantBudgets<FakeRelativeClock>, FakeRelativeClock) {
        let clock = FakeRelativeClock::default();
        let limit = RateLimit {
            per_second,
            burst: NonZeroU32::new(burst).unwrap(),
        };
        (TenantBudgets::with_clock(limit, clock.clone()), clock)
    }

    #[test]
    fn a_burst_then_the_sustained_rate_per_tenant() {
        let (budgets, clock) = budgets(10.0, 3);
        for _ in 0..3 {
            assert_eq!(budgets.admit("acme"), Ok(()));
        }
        let wait = budgets.admit("acme").unwrap_err();
        assert!(
            wait > Duration::ZERO && wait <= Duration::from_millis(100),
            "{wait:?}"
        );
        // Another tenant has its own budget.
        assert_eq!(budgets.admit("globex"), Ok(()));
        // A tenth of a second later, one more request fits, and only one.
        clock.advance(Duration::from_millis(100));
        assert_eq!(budgets.admit("acme"), Ok(()));
        assert!(budgets.admit("acme").is_err());
        // Idle long enough, the bucket is full again, never fuller.
        clock.advance(Duration::from_secs(60));
        for _ in 0..3 {
            assert_eq!(budgets.admit("acme"), Ok(()));
        }
        assert!(budgets.admit("acme").is_err());
    }

    #[test]
    fn slow_rates_tell_the_wait_in_seconds() {
        // Half a request per second: the next one two seconds after the burst.
        let (budgets, _clock) = budgets(0.5, 1);
        assert_eq!(budgets.admit("acme"), Ok(()));
        let wait = budgets.admit("acme").unwrap_err();
        assert!(
            wait > Duration::from_millis(1900) && wait <= Duration::from_secs(2),
            "{wait:?}"
        );
    }

    #[test]
    fn idle_tenants_are_forgotten_so_memory_stays_bounded() {
        let (budgets, clock) = budgets(10.0, 10);
        for tenant in 0..20_000 {
            assert_eq!(budgets.admit(&format!("tenant-{tenant}")), Ok(()));
        }
        assert_eq!(budgets.limiter.len(), 20_000);
        clock.advance(FORGET_IDLE_EVERY / 2);
        for _ in 0..10 {
            assert_eq!(budgets.admit("busy"), Ok(()));
        }
        // The next request after a second passes over the buckets: those full again go.
        clock.advance(FORGET_IDLE_EVERY / 2);
        assert_eq!(budgets.admit("acme"), Ok(()));
        assert_eq!(budgets.limiter.len(), 2);
        // The busy tenant's spent budget stayed: half of it has come back, no more.
        for _ in 0..5 {
            assert_eq!(budgets.admit("busy"), Ok(()));
        }
        assert!(budgets.admit("busy").is_err());
    }

    #[test]
    fn rates_from_a_trickle_to_a_flood_make_a_quota() {
        for per_second in [1e-6, 0.5, 1.0, 1000.0, 1e12, f64::INFINITY] {
            let limit = RateLimit {
                per_second,
                burst: NonZeroU32::MIN,
            };
            assert!(limit.quota().replenish_interval() >= Duration::from_nanos(1));
        }
    }
}
