//! The signing keys of an OpenID Connect provider: found through its discovery document,
//! fetched from its `jwks_uri`, kept in memory by `kid`, and refreshed.
//!
//! - Each key's algorithm is read from the key (`alg`, else `kty` and `crv`): RS256 (an RSA key
//!   without `alg`), PS256, ES256 (P-256), EdDSA (Ed25519). Nothing else is kept, symmetric
//!   keys (`kty: oct`) least of all: a secret published in a JWKS is no secret.
//! - A token names its key by `kid` only: `jku`, `x5u` and an embedded `jwk` are never read,
//!   so a token cannot bring the key it is checked with.
//! - An unknown `kid` (a key the provider just added) fetches the JWKS again, at most once per
//!   [`OIDC_JWKS_MIN_REFRESH_MS`]: a flood of tokens with made-up `kid`s costs the provider one
//!   request per interval, not one per token. The keys are also fetched every
//!   [`OIDC_JWKS_REFRESH_MS`], which is when a key the provider removed stops being accepted.
//! - A failed fetch keeps the keys of the last good one, so tokens keep verifying while the
//!   provider is away. Until the first fetch succeeds no token can be checked: requests get
//!   503 and the readiness probe fails.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use jsonwebtoken::jwk::{AlgorithmParameters, EllipticCurve, Jwk, KeyAlgorithm, PublicKeyUse};
use jsonwebtoken::{Algorithm, DecodingKey};
use serde::Deserialize;

use super::AuthError;
use crate::config::{ConfigError, Optional, Setting};

pub const OIDC_ISSUER: Optional<&str> = Optional::new(
    "OIDC_ISSUER",
    "(none)",
    "OpenID Connect issuer URL (e.g. `https://keycloak.example/realms/ledger`): tokens are checked with the keys it publishes, and must name it as `iss`; instead of `JWT_HS256_SECRET`/`JWT_PUBLIC_KEY_PEM`",
);
pub const OIDC_JWKS_REFRESH_MS: Setting<Duration> = Setting::new(
    "OIDC_JWKS_REFRESH_MS",
    Duration::from_secs(300),
    "with `OIDC_ISSUER`: how often the provider's keys are fetched again; a key it removed is refused from the next fetch on",
);
pub const OIDC_JWKS_MIN_REFRESH_MS: Setting<Duration> = Setting::new(
    "OIDC_JWKS_MIN_REFRESH_MS",
    Duration::from_secs(10),
    "with `OIDC_ISSUER`: a token signed with an unknown key fetches the keys again at most once per this interval, whatever the number of such tokens",
);

pub const OIDC_SWAGGER_CLIENT_ID: Optional<&str> = Optional::new(
    "OIDC_SWAGGER_CLIENT_ID",
    "(none)",
    "with `OIDC_ISSUER`: the provider's public client (authorization code with PKCE, redirect URI `<API>/docs/oauth2-redirect.html`) people sign in with on the APIs' Swagger UI; unset: they paste a token",
);

/// How long one request to the provider may take.
const FETCH_TIMEOUT: Duration = Duration::from_secs(5);

/// Where an OpenID Connect provider is and how often its keys are fetched.
#[derive(Debug, Clone)]
pub struct OidcConfig {
    /// The issuer, exactly as tokens name it and the discovery document repeats it.
    pub issuer: String,
    /// [`OIDC_JWKS_REFRESH_MS`].
    pub refresh: Duration,
    /// [`OIDC_JWKS_MIN_REFRESH_MS`].
    pub min_refresh: Duration,
    /// [`OIDC_SWAGGER_CLIENT_ID`].
    pub swagger_client_id: Option<String>,
}

impl OidcConfig {
    /// `issuer` with the default intervals.
    pub fn new(issuer: &str) -> Self {
        Self {
            issuer: issuer.to_owned(),
            refresh: OIDC_JWKS_REFRESH_MS.default,
            min_refresh: OIDC_JWKS_MIN_REFRESH_MS.default,
            swagger_client_id: None,
        }
    }

    /// Reads [`OIDC_ISSUER`] and, when it is set, the intervals.
    pub fn from_env() -> Result<Option<Self>, ConfigError> {
        let Some(issuer) = OIDC_ISSUER.read()? else {
            return Ok(None);
        };
        if !(issuer.starts_with("https://") || issuer.starts_with("http://")) {
            return Err(ConfigError::Invalid {
                name: OIDC_ISSUER.name,
                reason: "expected an http(s) URL".into(),
            });
        }
        Ok(Some(Self {
            issuer,
            refresh: OIDC_JWKS_REFRESH_MS.read()?,
            min_refresh: OIDC_JWKS_MIN_REFRESH_MS.read()?,
            swagger_client_id: OIDC_SWAGGER_CLIENT_ID.read()?,
        }))
    }

    /// The discovery document's URL (OpenID Connect Discovery 1.0, section 4).
    pub fn discovery_url(&self) -> String {
        format!(
            "{}/.well-known/openid-configuration",
            self.issuer.trim_end_matches('/')
        )
    }
}

/// A key and the one algorithm tokens checked with it must use.
pub(crate) struct VerifyingKey {
    pub(crate) key: DecodingKey,
    pub(crate) algorithm: Algorithm,
}

/// A key of the provider's, with the JWKS entry it was read from, to know it again at the next
/// fetch.
struct FetchedKey {
    key: Arc<VerifyingKey>,
    jwk: serde_json::Value,
}

/// The provider's keys by `kid`.
type KeySet = HashMap<String, FetchedKey>;

/// The keys of one provider, shared by every request.
pub(crate) struct ProviderKeys {
    config: OidcConfig,
    http: reqwest::Client,
    /// From the last successful fetch; `None` until the first.
    keys: RwLock<Option<Arc<KeySet>>>,
    /// Held while fetching, so that fetches never overlap and requests waiting for one reuse
    /// its outcome.
    fetching: tokio::sync::Mutex<Fetching>,
}

/// What the fetches remember.
#[derive(Default)]
struct Fetching {
    /// From the discovery document, once read.
    jwks_uri: Option<String>,
    /// The last fetch an unknown `kid` caused.
    last_for_unknown_kid: Option<Instant>,
}

/// Why the keys could not be fetched.
#[derive(Debug, thiserror::Error)]
enum FetchError {
    #[error(transparent)]
    Http(#[from] reqwest::Error),
    #[error("the discovery document names the issuer `{0}`, not the configured one")]
    IssuerMismatch(String),
    #[error("the JWKS holds no RS256, PS256, ES256 or EdDSA signing key")]
    NoUsableKey,
}

/// Why a fetch happened, for the logs and the metric.
#[derive(Debug, Clone, Copy)]
enum Trigger {
    Schedule,
    UnknownKid,
}

impl Trigger {
    fn as_str(self) -> &'static str {
        match self {
            Self::Schedule => "schedule",
            Self::UnknownKid => "unknown_kid",
        }
    }
}

#[derive(Deserialize)]
struct Discovery {
    issuer: String,
    jwks_uri: String,
}

/// A JWKS whose keys are parsed one by one: a key of a kind we do not know must not make us
/// lose the others.
#[derive(Deserialize)]
struct RawKeySet {
    keys: Vec<serde_json::Value>,
}

impl ProviderKeys {
    pub(crate) fn new(config: OidcConfig) -> Result<Self, ConfigError> {
        let http = reqwest::Client::builder()
            .timeout(FETCH_TIMEOUT)
            .build()
            .map_err(|err| ConfigError::Invalid {
                name: OIDC_ISSUER.name,
                reason: format!("cannot build the HTTP client: {err}"),
            })?;
        Ok(Self {
            config,
            http,
            keys: RwLock::new(None),
            fetching: tokio::sync::Mutex::default(),
        })
    }

    pub(crate) fn issuer(&self) -> &str {
        &self.config.issuer
    }

    pub(crate) fn loaded(&self) -> bool {
        self.current().is_some()
    }

    fn current(&self) -> Option<Arc<KeySet>> {
        self.keys
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// The key `token`'s `kid` names, fetching the keys again (rate-limited) when it is not
    /// among them.
    pub(crate) async fn key_for(&self, token: &str) -> Result<Arc<VerifyingKey>, AuthError> {
        if !self.loaded() {
            return Err(AuthError::KeysUnavailable);
        }
        let header =
            jsonwebtoken::decode_header(token).map_err(|_| AuthError::InvalidToken("malformed"))?;
        let kid = header.kid.ok_or(AuthError::InvalidToken("no key id"))?;
        if let Some(key) = self.lookup(&kid)? {
            return Ok(key);
        }
        self.fetch_for_unknown(&kid).await;
        self.lookup(&kid)?
            .ok_or(AuthError::InvalidToken("unknown signing key"))
    }

    fn lookup(&self, kid: &str) -> Result<Option<Arc<VerifyingKey>>, AuthError> {
        let keys = self.current().ok_or(AuthError::KeysUnavailable)?;
        Ok(keys.get(kid).map(|fetched| fetched.key.clone()))
    }

    async fn fetch_for_unknown(&self, kid: &str) {
        let mut fetching = self.fetching.lock().await;
        if matches!(self.lookup(kid), Ok(Some(_))) {
            return;
        }
        if let Some(at) = fetching.last_for_unknown_kid
            && at.elapsed() < self.config.min_refresh
        {
            tracing::debug!(
                kid,
                "unknown key id; keys fetched too recently to fetch again"
            );
            return;
        }
        fetching.last_for_unknown_kid = Some(Instant::now());
        if let Err(err) = self.fetch(&mut fetching, Trigger::UnknownKid).await {
            tracing::warn!(error = %err, "cannot fetch the identity provider's keys");
        }
    }

    /// Loads the keys, retrying until the provider answers, then fetches them every
    /// [`OidcConfig::refresh`]. Never returns.
    pub(crate) async fn keep_fresh(&self) {
        loop {
            crate::retry::until_ok(
                || async {
                    let mut fetching = self.fetching.lock().await;
                    self.fetch(&mut fetching, Trigger::Schedule).await
                },
                |err, pause| {
                    tracing::warn!(
                        error = %err,
                        issuer = %self.config.issuer,
                        retry_in_ms = pause.as_millis() as u64,
                        keys_loaded = self.loaded(),
                        "cannot fetch the identity provider's keys"
                    );
                },
            )
            .await;
            tokio::time::sleep(self.config.refresh).await;
        }
    }

    async fn fetch(&self, fetching: &mut Fetching, trigger: Trigger) -> Result<(), FetchError> {
        let outcome = self.fetch_keys(fetching).await;
        metrics::counter!(
            "auth_jwks_fetches_total",
            "trigger" => trigger.as_str(),
            "outcome" => if outcome.is_ok() { "ok" } else { "error" },
        )
        .increment(1);
        let keys = keep_unchanged(self.current().as_deref(), outcome?);
        tracing::debug!(
            trigger = trigger.as_str(),
            keys = keys.len(),
            "fetched the identity provider's keys"
        );
        *self
            .keys
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(Arc::new(keys));
        Ok(())
    }

    async fn fetch_keys(&self, fetching: &mut Fetching) -> Result<KeySet, FetchError> {
        let jwks_uri = match &fetching.jwks_uri {
            Some(uri) => uri.clone(),
            None => {
                let discovery: Discovery = self
                    .http
                    .get(self.config.discovery_url())
                    .send()
                    .await?
                    .error_for_status()?
                    .json()
                    .await?;
                // OpenID Connect Discovery 1.0, section 4.3: a document naming another issuer
                // must not be used.
                if discovery.issuer != self.config.issuer {
                    return Err(FetchError::IssuerMismatch(discovery.issuer));
                }
                fetching.jwks_uri = Some(discovery.jwks_uri.clone());
                discovery.jwks_uri
            }
        };
        let raw: RawKeySet = self
            .http
            .get(&jwks_uri)
            .send()
            .await?
            .error_for_status()?
            .json()
            .await?;
        let keys = usable_keys(raw.keys);
        if keys.is_empty() {
            return Err(FetchError::NoUsableKey);
        }
        Ok(keys)
    }
}

/// `fetched`, with each key that `previous` holds under the same `kid` from the same JWKS
/// entry kept as it was. Tokens verified lately are remembered while the key that verified
/// them is still one of ours (`super::verified`): a refresh that found the same keys would
/// otherwise forget them all, and every client's next request would pay a full check again.
fn keep_unchanged(previous: Option<&KeySet>, fetched: KeySet) -> KeySet {
    let Some(previous) = previous else {
        return fetched;
    };
    fetched
        .into_iter()
        .map(|(kid, fetched)| match previous.get(&kid) {
            Some(kept) if kept.jwk == fetched.jwk => {
                let key = kept.key.clone();
                (kid, FetchedKey { key, ..fetched })
            }
            _ => (kid, fetched),
        })
        .collect()
}

/// The signing keys of `raw` we can use, by `kid`; the others are skipped.
fn usable_keys(raw: Vec<serde_json::Value>) -> KeySet {
    let mut keys = KeySet::new();
    for raw in raw {
        let Ok(jwk) = Jwk::deserialize(&raw) else {
            tracing::debug!("skipping a JWKS entry that is not a key we can read");
            continue;
        };
        let Some(kid) = jwk.common.key_id.clone() else {
            continue;
        };
        if matches!(
            jwk.common.public_key_use,
            Some(PublicKeyUse::Encryption | PublicKeyUse::Other(_))
        ) {
            continue;
        }
        let Some(algorithm) = algorithm_of(&jwk) else {
            tracing::debug!(
                kid,
                "skipping a key that is not RS256, PS256, ES256 or EdDSA"
            );
            continue;
        };
        match DecodingKey::from_jwk(&jwk) {
            Ok(key) => {
                keys.entry(kid).or_insert_with(|| FetchedKey {
                    key: Arc::new(VerifyingKey { key, algorithm }),
                    jwk: raw,
                });
            }
            Err(err) => tracing::warn!(kid, error = %err, "skipping a malformed key"),
        }
    }
    keys
}

/// The algorithm a key is for, from the key alone: its `alg` when it has one, else its type
/// and curve. `None` for what we do not accept.
fn algorithm_of(jwk: &Jwk) -> Option<Algorithm> {
    let declared = jwk.common.key_algorithm;
    match &jwk.algorithm {
        AlgorithmParameters::RSA(_) => match declared {
            None | Some(KeyAlgorithm::RS256) => Some(Algorithm::RS256),
            Some(KeyAlgorithm::PS256) => Some(Algorithm::PS256),
            Some(_) => None,
        },
        AlgorithmParameters::EllipticCurve(params)
            if params.curve == EllipticCurve::P256
                && matches!(declared, None | Some(KeyAlgorithm::ES256)) =>
        {
            Some(Algorithm::ES256)
        }
        AlgorithmParameters::OctetKeyPair(params)
            if params.curve == EllipticCurve::Ed25519
                && matches!(declared, None | Some(KeyAlgorithm::EdDSA)) =>
        {
            Some(Algorithm::EdDSA)
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_signing_keys_by_kid_with_the_algorithm_of_the_key() {
        let keys = usable_keys(vec![
            serde_json::json!({"kty": "RSA", "kid": "rsa", "n": "sXch", "e": "AQAB"}),
            serde_json::json!({"kty": "RSA", "kid": "pss", "alg": "PS256", "n": "sXch", "e": "AQAB"}),
            serde_json::json!({"kty": "OKP", "kid": "ed", "crv": "Ed25519",
                               "x": "11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo"}),
            serde_json::json!({"kty": "oct", "kid": "secret", "alg": "HS256", "k": "c2VjcmV0"}),
            serde_json::json!({"kty": "RSA", "kid": "enc", "use": "enc", "n": "sXch", "e": "AQAB"}),
            serde_json::json!({"kty": "RSA", "kid": "rs512", "alg": "RS512", "n": "sXch", "e": "AQAB"}),
            serde_json::json!({"kty": "EC", "kid": "p384", "crv": "P-384", "x": "AA", "y": "AA"}),
            serde_json::json!({"kty": "RSA", "n": "sXch", "e": "AQAB"}),
            serde_json::json!({"kty": "future", "kid": "unknown"}),
        ]);
        let mut found: Vec<(&str, Algorithm)> = keys
            .iter()
            .map(|(kid, fetched)| (kid.as_str(), fetched.key.algorithm))
            .collect();
        found.sort_by_key(|(kid, _)| *kid);
        assert_eq!(
            found,
            [
                ("ed", Algorithm::EdDSA),
                ("pss", Algorithm::PS256),
                ("rsa", Algorithm::RS256)
            ]
        );
    }

    #[test]
    fn a_refresh_keeps_the_keys_it_found_unchanged_and_only_those() {
        let ed = |kid: &str, x: &str| serde_json::json!({"kty": "OKP", "kid": kid, "crv": "Ed25519", "x": x});
        let first = "11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo";
        let second = "A".repeat(43);
        let before = usable_keys(vec![
            ed("same", first),
            ed("rotated", first),
            ed("withdrawn", first),
        ]);
        let after = keep_unchanged(
            Some(&before),
            usable_keys(vec![
                ed("same", first),
                ed("rotated", &second),
                ed("new", first),
            ]),
        );
        assert!(Arc::ptr_eq(&before["same"].key, &after["same"].key));
        assert!(
            !Arc::ptr_eq(&before["rotated"].key, &after["rotated"].key),
            "a key whose material changed under the same kid kept vouching"
        );
        assert_eq!(after["rotated"].jwk["x"], second.as_str());
        assert!(after.contains_key("new"));
        assert!(!after.contains_key("withdrawn"), "a withdrawn key was kept");
    }
}
