//! Tokens verified lately. A client sends the same token with every request until it expires,
//! and checking it again each time (its signature, then its claims parsed as JSON) took about
//! a tenth of the query API's CPU per account read (perf, `cargo xtask bench reads`). A token
//! is kept only once it passed every check, so a made-up one costs its full check each time
//! and never enters.
//!
//! A kept token stays valid as long as what made it valid: until its `exp` (with the same
//! leeway as the check) and while the key that verified it is still one of ours. Each refresh
//! of a provider's keys keeps only the keys it found again unchanged (`oidc`), so a key the
//! provider withdrew or replaced stops vouching for the tokens it signed at the refresh, as it
//! does for tokens checked afresh, and the others stay answered. Kept by the token's SHA-256,
//! so that the bearer tokens themselves are not held in memory; the `lru` crate bounds the
//! entries at [`CAPACITY`]. A token longer than [`MAX_TOKEN_BYTES`] is neither looked up nor
//! kept, so a client without one cannot make every request hash a huge header.

use std::sync::{Arc, Mutex, PoisonError, Weak};
use std::time::{Duration, SystemTime};

use lru::LruCache;
use sha2::{Digest, Sha256};

use super::Principal;
use super::oidc::VerifyingKey;

/// Tokens kept at most: many more than the clients of one instance at once.
const CAPACITY: usize = 4096;
/// A longer token is checked each time.
const MAX_TOKEN_BYTES: usize = 4096;

type TokenHash = [u8; 32];

/// The key `token` is kept under, if it may be kept at all.
fn key_of(token: &str) -> Option<TokenHash> {
    (token.len() <= MAX_TOKEN_BYTES).then(|| Sha256::digest(token.as_bytes()).into())
}

/// One verified token: who it speaks for, until when, and the key that verified it.
#[derive(Clone)]
struct Verified {
    principal: Principal,
    expires: SystemTime,
    key: Weak<VerifyingKey>,
}

pub(super) struct VerifiedTokens {
    tokens: Mutex<LruCache<TokenHash, Verified>>,
    /// As the check's: a token is still taken this long after its `exp`.
    leeway: Duration,
}

impl VerifiedTokens {
    pub(super) fn new(leeway: Duration) -> Self {
        Self {
            tokens: Mutex::new(LruCache::new(CAPACITY.try_into().expect("not zero"))),
            leeway,
        }
    }

    /// Who `token` speaks for and when it expires, if it was verified with a key still in use
    /// and has not expired by `now`.
    pub(super) fn get(&self, token: &str, now: SystemTime) -> Option<(Principal, SystemTime)> {
        let key = key_of(token)?;
        let mut tokens = self.tokens.lock().unwrap_or_else(PoisonError::into_inner);
        let verified = tokens.get(&key)?;
        let until = verified.expires.checked_add(self.leeway);
        if verified.key.strong_count() > 0 && until.is_some_and(|until| now <= until) {
            Some((verified.principal.clone(), verified.expires))
        } else {
            tokens.pop(&key);
            None
        }
    }

    /// Keeps `token`, which `key` verified just now.
    pub(super) fn keep(
        &self,
        token: &str,
        principal: &Principal,
        expires: SystemTime,
        key: &Arc<VerifyingKey>,
    ) {
        let Some(hash) = key_of(token) else {
            return;
        };
        let verified = Verified {
            principal: principal.clone(),
            expires,
            key: Arc::downgrade(key),
        };
        self.tokens
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .put(hash, verified);
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use jsonwebtoken::{Algorithm, DecodingKey};

    use super::*;

    const LEEWAY: Duration = Duration::from_secs(5);

    fn key() -> Arc<VerifyingKey> {
        Arc::new(VerifyingKey {
            key: DecodingKey::from_secret(b"0123456789abcdef0123456789abcdef"),
            algorithm: Algorithm::HS256,
        })
    }

    fn alice() -> Principal {
        Principal {
            subject: "alice".into(),
            tenant: "acme".into(),
            roles: BTreeSet::new(),
        }
    }

    #[test]
    fn a_token_is_answered_until_its_expiry_and_leeway() {
        let (tokens, key, now) = (VerifiedTokens::new(LEEWAY), key(), SystemTime::now());
        let expires = now + Duration::from_secs(60);
        tokens.keep("t", &alice(), expires, &key);
        let (principal, until) = tokens.get("t", now).expect("kept");
        assert_eq!((principal.tenant.as_str(), until), ("acme", expires));
        assert!(tokens.get("t", expires + LEEWAY).is_some());
        assert!(
            tokens
                .get("t", expires + LEEWAY + Duration::from_secs(1))
                .is_none()
        );
        assert!(
            tokens.get("t", now).is_none(),
            "an expired token stayed kept"
        );
        assert!(tokens.get("other", now).is_none());
    }

    #[test]
    fn a_token_is_not_answered_once_its_key_is_gone() {
        let (tokens, now) = (VerifiedTokens::new(LEEWAY), SystemTime::now());
        let withdrawn = key();
        tokens.keep("t", &alice(), now + Duration::from_secs(60), &withdrawn);
        drop(withdrawn);
        assert!(tokens.get("t", now).is_none());
    }

    #[test]
    fn a_token_expiring_at_the_end_of_time_is_not_answered_from_memory() {
        let (tokens, key, now) = (VerifiedTokens::new(LEEWAY), key(), SystemTime::now());
        let expires = SystemTime::UNIX_EPOCH + Duration::from_secs(i64::MAX as u64);
        assert!(expires.checked_add(LEEWAY).is_none());
        tokens.keep("t", &alice(), expires, &key);
        assert!(tokens.get("t", now).is_none());
    }

    #[test]
    fn memory_is_bounded() {
        let (tokens, key, now) = (VerifiedTokens::new(LEEWAY), key(), SystemTime::now());
        let expires = now + Duration::from_secs(60);
        let long = "x".repeat(MAX_TOKEN_BYTES + 1);
        tokens.keep(&long, &alice(), expires, &key);
        assert!(
            tokens.get(&long, now).is_none(),
            "a too long token was kept"
        );
        for n in 0..=CAPACITY {
            tokens.keep(&n.to_string(), &alice(), expires, &key);
        }
        assert!(tokens.get("0", now).is_none(), "the oldest token stayed");
        assert!(tokens.get(&CAPACITY.to_string(), now).is_some());
    }
}
