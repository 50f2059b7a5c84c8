//! Per-tenant request budgets: a token bucket per tenant, refilled continuously, so that one
//! tenant's burst cannot starve the others. Checked once the token is verified (the tenant a
//! forged token names is never charged).

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::config::{ConfigError, Optional, Setting};

/// The default is far above what one tenant's clients need, low enough that one tenant cannot
/// take a whole process (the commands benchmark reaches ~10,000/s on one).
pub const RATE_LIMIT_PER_TENANT: Setting<f64> = Setting::new(
    "RATE_LIMIT_PER_TENANT",
    1000.0,
    "requests per second each tenant may sustain, per process; `0`: unlimited",
);
/// Unset: one second's worth, at least 1.
pub const RATE_LIMIT_BURST: Optional<f64> = Optional::new(
    "RATE_LIMIT_BURST",
    "one second's worth",
    "requests a tenant may send at once after being idle",
);

/// Beyond this many tracked tenants, full (idle) buckets are forgotten: a full bucket is what
/// a new one starts as, so forgetting it changes nothing.
const PRUNE_ABOVE: usize = 10_000;

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RateLimit {
    /// Sustained requests per second per tenant.
    pub per_second: f64,
    /// Requests a tenant may send at once after being idle.
    pub burst: f64,
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
        let burst = RATE_LIMIT_BURST.read()?.unwrap_or(per_second.max(1.0));
        if burst.is_nan() || burst < 1.0 {
            return Err(ConfigError::Invalid {
                name: RATE_LIMIT_BURST.name,
                reason: "must be at least 1".into(),
            });
        }
        Ok(Some(Self { per_second, burst }))
    }
}

#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    updated: Instant,
}

/// The buckets of every tenant seen.
#[derive(Debug)]
pub struct TenantBudgets {
    limit: RateLimit,
    buckets: Mutex<HashMap<String, Bucket>>,
}

impl TenantBudgets {
    pub fn new(limit: RateLimit) -> Self {
        Self {
            limit,
            buckets: Mutex::new(HashMap::new()),
        }
    }

    /// Takes one request from `tenant`'s budget, or says how long until one is available.
    pub fn admit(&self, tenant: &str) -> Result<(), Duration> {
        self.admit_at(tenant, Instant::now())
    }

    fn admit_at(&self, tenant: &str, now: Instant) -> Result<(), Duration> {
        let RateLimit { per_second, burst } = self.limit;
        let mut buckets = self
            .buckets
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if buckets.len() > PRUNE_ABOVE {
            buckets.retain(|_, bucket| {
                bucket.tokens + now.duration_since(bucket.updated).as_secs_f64() * per_second
                    < burst
            });
        }
        let bucket = buckets.entry(tenant.to_owned()).or_insert(Bucket {
            tokens: burst,
            updated: now,
        });
        let refilled = now.saturating_duration_since(bucket.updated).as_secs_f64() * per_second;
        bucket.tokens = (bucket.tokens + refilled).min(burst);
        bucket.updated = now;
        if bucket.tokens >= 1.0 {
            bucket.tokens -= 1.0;
            Ok(())
        } else {
            Err(Duration::from_secs_f64((1.0 - bucket.tokens) / per_second))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_burst_then_the_sustained_rate_per_tenant() {
        let budgets = TenantBudgets::new(RateLimit {
            per_second: 10.0,
            burst: 3.0,
        });
        let start = Instant::now();
        for _ in 0..3 {
            assert_eq!(budgets.admit_at("acme", start), Ok(()));
        }
        let wait = budgets.admit_at("acme", start).unwrap_err();
        assert!(
            wait > Duration::ZERO && wait <= Duration::from_millis(100),
            "{wait:?}"
        );
        // Another tenant has its own budget.
        assert_eq!(budgets.admit_at("globex", start), Ok(()));
        // A tenth of a second later, one more request fits, and only one.
        let later = start + Duration::from_millis(100);
        assert_eq!(budgets.admit_at("acme", later), Ok(()));
        assert!(budgets.admit_at("acme", later).is_err());
        // Idle long enough, the bucket is full again, never fuller.
        let idle = later + Duration::from_secs(60);
        for _ in 0..3 {
            assert_eq!(budgets.admit_at("acme", idle), Ok(()));
        }
        assert!(budgets.admit_at("acme", idle).is_err());
    }
}
