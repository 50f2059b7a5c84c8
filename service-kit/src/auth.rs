//! JWT bearer authentication.
//!
//! A token never chooses how it is checked: the key and its one algorithm come from the
//! deployment, never from the token's header. Either one key for the whole deployment (HS256
//! with a shared secret in development, RS256 or ES256 with a public key), or, with
//! [`OIDC_ISSUER`], the keys an OpenID Connect provider publishes, chosen by the token's `kid`
//! (see [`oidc`]). `alg: none`, HS256-signed-with-the-public-key tokens, and `jku`, `x5u` and
//! embedded `jwk` headers get nowhere. `exp`, `iss`, `aud` and `sub` are required and checked;
//! `nbf` is checked when present. The tenant and the roles are read from configurable claims
//! ([`ClaimMapping`]), since every provider puts them somewhere else.

use std::collections::BTreeSet;
use std::fmt;
use std::future::Future;
use std::marker::PhantomData;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::extract::{FromRef, FromRequestParts};
use axum::http::request::Parts;
use axum::http::{HeaderValue, header};
use axum::response::{IntoResponse, Response};
use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use secrecy::{ExposeSecret, SecretString};
use serde::{Deserialize, Serialize};

use crate::config::{ConfigError, Optional, Setting};
use crate::problem::{Problem, ProblemType};
use crate::rate_limit::{RateLimit, TenantBudgets};

/// Shortest HS256 secret accepted: 256 bits, the size of the MAC.
const MIN_SECRET_BYTES: usize = 32;
/// Clock skew tolerated between the token issuer and us.
const LEEWAY_SECONDS: u64 = 5;

pub mod oidc;
mod verified;

pub use oidc::OidcConfig;

/// How tokens are verified.
#[derive(Debug, Clone)]
pub enum VerificationKey {
    /// Development: a shared secret, HS256.
    Hs256(SecretString),
    /// One PEM public key for the deployment and the one algorithm it is used with.
    PublicKey { algorithm: Algorithm, pem: String },
    /// The keys an OpenID Connect provider publishes, fetched and kept fresh.
    Oidc(OidcConfig),
}

pub const JWT_HS256_SECRET: Optional<&str> = Optional::new(
    "JWT_HS256_SECRET",
    "(none)",
    "development: shared HS256 secret, at least 32 bytes",
);
pub const JWT_PUBLIC_KEY_PEM: Optional<&str> = Optional::new(
    "JWT_PUBLIC_KEY_PEM",
    "(none)",
    "production without `OIDC_ISSUER`: PEM public key (instead of the secret)",
);
pub const JWT_ALGORITHM: Optional<&str> = Optional::new(
    "JWT_ALGORITHM",
    "(none)",
    "`RS256` or `ES256`, with `JWT_PUBLIC_KEY_PEM`",
);
pub const JWT_ISSUER: Setting<&str> = Setting::new(
    "JWT_ISSUER",
    "ledger",
    "required `iss` (with `OIDC_ISSUER`: that issuer instead)",
);
pub const JWT_AUDIENCE: Setting<&str> = Setting::new(
    "JWT_AUDIENCE",
    "ledger",
    "required `aud` (one of its values when it is an array)",
);
pub const JWT_TENANT_CLAIM: Setting<&str> = Setting::new(
    "JWT_TENANT_CLAIM",
    "tenant",
    "claim holding the caller's tenant: a dotted path into nested objects (`ledger.tenant`); a key that itself contains dots (`https://ledger.example/tenant`) is matched whole first",
);
pub const JWT_ROLES_CLAIM: Setting<&str> = Setting::new(
    "JWT_ROLES_CLAIM",
    "roles",
    "claim holding the caller's roles (an array of names, or one name), a path like `JWT_TENANT_CLAIM`: Keycloak `realm_access.roles`, Entra `roles`, Auth0 a namespaced claim",
);
pub const JWT_ROLES_FROM_SCOPE: Setting<bool> = Setting::new(
    "JWT_ROLES_FROM_SCOPE",
    false,
    "also take roles from the space-separated `scope` claim (a scope named `teller` grants the role)",
);

/// Where the tenant and the roles are in a token's claims: each provider puts them elsewhere
/// (Keycloak under `realm_access.roles`, Auth0 under a namespaced claim, Entra under `roles`).
#[derive(Debug, Clone)]
pub struct ClaimMapping {
    /// Path of the tenant claim, see [`JWT_TENANT_CLAIM`].
    pub tenant: String,
    /// Path of the roles claim, see [`JWT_ROLES_CLAIM`].
    pub roles: String,
    /// Whether the `scope` claim grants roles too.
    pub roles_from_scope: bool,
}

impl ClaimMapping {
    /// Reads [`JWT_TENANT_CLAIM`], [`JWT_ROLES_CLAIM`] and [`JWT_ROLES_FROM_SCOPE`].
    pub fn from_env() -> Result<Self, ConfigError> {
        Ok(Self {
            tenant: JWT_TENANT_CLAIM.read()?,
            roles: JWT_ROLES_CLAIM.read()?,
            roles_from_scope: JWT_ROLES_FROM_SCOPE.read()?,
        })
    }
}

impl Default for ClaimMapping {
    fn default() -> Self {
        Self {
            tenant: JWT_TENANT_CLAIM.default.into(),
            roles: JWT_ROLES_CLAIM.default.into(),
            roles_from_scope: JWT_ROLES_FROM_SCOPE.default,
        }
    }
}

/// Token verification settings.
#[derive(Debug, Clone)]
pub struct AuthConfig {
    pub issuer: String,
    pub audience: String,
    pub key: VerificationKey,
    pub claims: ClaimMapping,
    /// Each tenant's request budget; `None`: unlimited.
    pub rate_limit: Option<RateLimit>,
}

impl AuthConfig {
    /// Reads [`JWT_AUDIENCE`], the claim mapping, the rate limit, and one way of getting keys:
    /// [`oidc::OIDC_ISSUER`] (whose issuer tokens must name), or [`JWT_ISSUER`] with either
    /// [`JWT_HS256_SECRET`] or [`JWT_PUBLIC_KEY_PEM`] and [`JWT_ALGORITHM`].
    pub fn from_env() -> Result<Self, ConfigError> {
        let secret = JWT_HS256_SECRET.read()?;
        let pem = JWT_PUBLIC_KEY_PEM.read()?;
        let (issuer, key) = match (OidcConfig::from_env()?, secret, pem) {
            (Some(oidc), None, None) => (oidc.issuer.clone(), VerificationKey::Oidc(oidc)),
            (Some(_), _, _) => {
                return Err(ConfigError::Invalid {
                    name: oidc::OIDC_ISSUER.name,
                    reason: "set either OIDC_ISSUER or a fixed key (JWT_HS256_SECRET, JWT_PUBLIC_KEY_PEM), not both".into(),
                });
            }
            (None, Some(secret), None) => {
                (JWT_ISSUER.read()?, VerificationKey::Hs256(secret.into()))
            }
            (None, None, Some(pem)) => {
                let algorithm = match JWT_ALGORITHM
                    .require("RS256 or ES256, the algorithm of JWT_PUBLIC_KEY_PEM")?
                    .as_str()
                {
                    "RS256" => Algorithm::RS256,
                    "ES256" => Algorithm::ES256,
                    other => {
                        return Err(ConfigError::Invalid {
                            name: JWT_ALGORITHM.name,
                            reason: format!("expected RS256 or ES256, got `{other}`"),
                        });
                    }
                };
                (
                    JWT_ISSUER.read()?,
                    VerificationKey::PublicKey { algorithm, pem },
                )
            }
            (None, Some(_), Some(_)) => {
                return Err(ConfigError::Invalid {
                    name: JWT_HS256_SECRET.name,
                    reason: "set either JWT_HS256_SECRET or JWT_PUBLIC_KEY_PEM, not both".into(),
                });
            }
            (None, None, None) => {
                return Err(ConfigError::Missing {
                    name: JWT_HS256_SECRET.name,
                    hint: "set OIDC_ISSUER, JWT_HS256_SECRET (development) or JWT_PUBLIC_KEY_PEM",
                });
            }
        };
        Ok(Self {
            issuer,
            audience: JWT_AUDIENCE.read()?,
            key,
            claims: ClaimMapping::from_env()?,
            rate_limit: RateLimit::from_env()?,
        })
    }

    /// For tests: HS256 tokens signed with `secret`, the default issuer, audience and claims,
    /// and no rate limit.
    pub fn for_tests(secret: &str) -> Self {
        Self {
            issuer: JWT_ISSUER.default.into(),
            audience: JWT_AUDIENCE.default.into(),
            key: VerificationKey::Hs256(SecretString::from(secret)),
            claims: ClaimMapping::default(),
            rate_limit: None,
        }
    }

    /// For tests: the keys of the OpenID Connect provider at `issuer`, with the default
    /// audience, claims and refresh intervals, and no rate limit.
    pub fn for_provider(issuer: &str) -> Self {
        let oidc = OidcConfig::new(issuer);
        Self {
            issuer: oidc.issuer.clone(),
            audience: JWT_AUDIENCE.default.into(),
            key: VerificationKey::Oidc(oidc),
            claims: ClaimMapping::default(),
            rate_limit: None,
        }
    }
}

/// What a caller may do. Unknown role names in a token grant nothing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Role {
    Teller,
    Viewer,
    Auditor,
    Admin,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Teller => "teller",
            Self::Viewer => "viewer",
            Self::Auditor => "auditor",
            Self::Admin => "admin",
        }
    }

    pub fn parse(name: &str) -> Option<Self> {
        match name {
            "teller" => Some(Self::Teller),
            "viewer" => Some(Self::Viewer),
            "auditor" => Some(Self::Auditor),
            "admin" => Some(Self::Admin),
            _ => None,
        }
    }
}

/// The claims of a Ledger token.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Claims {
    pub sub: String,
    pub tenant: String,
    #[serde(default)]
    pub roles: Vec<String>,
    pub iss: String,
    pub aud: String,
    pub exp: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nbf: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iat: Option<u64>,
}

/// The authenticated caller of a request.
#[derive(Debug, Clone)]
pub struct Principal {
    /// The token's `sub`: recorded as the actor of every event it causes.
    pub subject: String,
    /// The only tenant whose data this caller may read or change.
    pub tenant: String,
    pub roles: BTreeSet<Role>,
}

impl Principal {
    /// Succeeds if the caller holds any of `roles`.
    pub fn require_any(&self, roles: &[Role]) -> Result<(), AuthError> {
        if roles.iter().any(|role| self.roles.contains(role)) {
            Ok(())
        } else {
            Err(AuthError::Forbidden {
                needed: roles.iter().map(|role| role.as_str()).collect(),
            })
        }
    }
}

/// The roles an [`Authorized`] caller needs: any one of them.
pub trait RequiredRoles {
    const ROLES: &'static [Role];
}

/// An authenticated caller holding one of `R`'s roles: 401 without a valid token, 429 once
/// the tenant's budget is spent, 403 without the role.
pub struct Authorized<R> {
    pub principal: Principal,
    roles: PhantomData<R>,
}

impl<S, R> FromRequestParts<S> for Authorized<R>
where
    S: Send + Sync,
    Arc<Authenticator>: FromRef<S>,
    R: RequiredRoles,
{
    type Rejection = AuthError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        let principal = Principal::from_request_parts(parts, state).await?;
        principal.require_any(R::ROLES)?;
        Ok(Self {
            principal,
            roles: PhantomData,
        })
    }
}

/// Why a request was not authenticated or not authorised.
#[derive(Debug, Clone, thiserror::Error)]
pub enum AuthError {
    #[error("no bearer token")]
    MissingToken,
    #[error("token expired")]
    ExpiredToken,
    #[error("invalid token: {0}")]
    InvalidToken(&'static str),
    #[error("missing role, needs one of {needed:?}")]
    Forbidden { needed: Vec<&'static str> },
    #[error("the tenant's request budget is spent; retry in {retry_after:?}")]
    RateLimited { retry_after: Duration },
    /// The identity provider's keys are not loaded yet (it was unreachable since start-up):
    /// the token can be neither accepted nor called invalid, so the request is answered 503
    /// and may be retried, rather than 401, which would tell a client with a good token to
    /// sign in again.
    #[error("the identity provider's signing keys are not loaded yet")]
    KeysUnavailable,
}

impl IntoResponse for AuthError {
    fn into_response(self) -> Response {
        self.problem().into_response()
    }
}

impl AuthError {
    /// The problem details of this error: the one mapping, whatever protocol carries it.
    pub fn problem(self) -> Problem {
        let challenge = HeaderValue::from_static("Bearer");
        match self {
            Self::MissingToken => {
                Problem::new(ProblemType::MissingToken, "Authentication required")
                    .detail("Send an `Authorization: Bearer <token>` header.")
                    .header(header::WWW_AUTHENTICATE, challenge)
            }
            Self::ExpiredToken => Problem::new(ProblemType::ExpiredToken, "Token expired")
                .detail("The bearer token has expired; obtain a new one.")
                .header(header::WWW_AUTHENTICATE, challenge),
            Self::InvalidToken(reason) => Problem::new(ProblemType::InvalidToken, "Invalid token")
                .detail(format!("The bearer token was refused: {reason}."))
                .header(header::WWW_AUTHENTICATE, challenge),
            Self::Forbidden { needed } => Problem::new(ProblemType::Forbidden, "Forbidden").detail(
                format!("This action needs one of the roles: {}.", needed.join(", ")),
            ),
            Self::RateLimited { retry_after } => {
                // Whole seconds, rounded up: `Retry-After` has no finer unit.
                let seconds = retry_after.as_secs() + u64::from(retry_after.subsec_nanos() > 0);
                let mut problem = Problem::new(ProblemType::RateLimited, "Too many requests")
                    .detail("Your tenant's request rate is over its limit; retry later.")
                    .extension("retry_after_seconds", seconds);
                if let Ok(value) = HeaderValue::from_str(&seconds.max(1).to_string()) {
                    problem = problem.header(header::RETRY_AFTER, value);
                }
                problem
            }
            Self::KeysUnavailable => Problem::unavailable("Token verification")
                .detail("The identity provider's signing keys are not loaded yet; retry later."),
        }
    }
}

/// Verifies bearer tokens, and charges each verified request to its tenant's budget when
/// there is one. Built once at start-up; shared by every request. With an OpenID Connect
/// provider, [`Authenticator::keep_keys_fresh`] must run beside it (the services run it with
/// their other background tasks).
pub struct Authenticator {
    keys: Keys,
    /// Everything but the algorithm, which comes with each key.
    validation: Validation,
    claims: ClaimMapping,
    budgets: Option<TenantBudgets>,
    verified: verified::VerifiedTokens,
}

/// Where the key that checks a token comes from.
enum Keys {
    /// One key and its algorithm for every token.
    Fixed(Arc<oidc::VerifyingKey>),
    /// The provider's published keys, by `kid`.
    Provider(oidc::ProviderKeys),
}

impl fmt::Debug for Authenticator {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let keys = match &self.keys {
            Keys::Fixed(key) => format!("fixed {:?}", key.algorithm),
            Keys::Provider(provider) => format!("provider {}", provider.issuer()),
        };
        f.debug_struct("Authenticator")
            .field("keys", &keys)
            .finish_non_exhaustive()
    }
}

impl Authenticator {
    pub fn new(config: &AuthConfig) -> Result<Self, ConfigError> {
        let keys = match &config.key {
            VerificationKey::Hs256(secret) => {
                if secret.expose_secret().len() < MIN_SECRET_BYTES {
                    return Err(ConfigError::Invalid {
                        name: "JWT_HS256_SECRET",
                        reason: format!("must be at least {MIN_SECRET_BYTES} bytes"),
                    });
                }
                Keys::Fixed(Arc::new(oidc::VerifyingKey {
                    key: DecodingKey::from_secret(secret.expose_secret().as_bytes()),
                    algorithm: Algorithm::HS256,
                }))
            }
            VerificationKey::PublicKey { algorithm, pem } => {
                let key = match algorithm {
                    Algorithm::ES256 => DecodingKey::from_ec_pem(pem.as_bytes()),
                    _ => DecodingKey::from_rsa_pem(pem.as_bytes()),
                }
                .map_err(|err| ConfigError::Invalid {
                    name: "JWT_PUBLIC_KEY_PEM",
                    reason: err.to_string(),
                })?;
                Keys::Fixed(Arc::new(oidc::VerifyingKey {
                    key,
                    algorithm: *algorithm,
                }))
            }
            VerificationKey::Oidc(oidc) => Keys::Provider(oidc::ProviderKeys::new(oidc.clone())?),
        };
        let mut validation = Validation::default();
        validation.set_issuer(&[&config.issuer]);
        validation.set_audience(&[&config.audience]);
        validation.set_required_spec_claims(&["exp", "iss", "aud", "sub"]);
        validation.validate_nbf = true;
        validation.leeway = LEEWAY_SECONDS;
        Ok(Self {
            keys,
            validation,
            claims: config.claims.clone(),
            budgets: config.rate_limit.map(TenantBudgets::new),
            verified: verified::VerifiedTokens::new(Duration::from_secs(LEEWAY_SECONDS)),
        })
    }

    /// Whether tokens can be checked: always with a fixed key; with a provider, once its
    /// keys were loaded (they stay loaded through later outages). The readiness probe's.
    pub fn keys_loaded(&self) -> bool {
        match &self.keys {
            Keys::Fixed(_) => true,
            Keys::Provider(provider) => provider.loaded(),
        }
    }

    /// Loads the provider's keys (retrying until it answers), then refreshes them every
    /// `OIDC_JWKS_REFRESH_MS`, until `stop` resolves. Returns at once with a fixed key.
    pub async fn keep_keys_fresh(self: Arc<Self>, stop: impl Future<Output = ()> + Send) {
        if let Keys::Provider(provider) = &self.keys {
            tokio::select! {
                () = provider.keep_fresh() => {}
                () = stop => {}
            }
        }
    }

    /// Charges one request to `principal`'s tenant.
    pub fn admit(&self, principal: &Principal) -> Result<(), AuthError> {
        match &self.budgets {
            Some(budgets) => budgets
                .admit(&principal.tenant)
                .map_err(|retry_after| AuthError::RateLimited { retry_after }),
            None => Ok(()),
        }
    }

    /// Verifies `token` and returns who it speaks for.
    pub async fn verify(&self, token: &str) -> Result<Principal, AuthError> {
        self.verify_until(token)
            .await
            .map(|(principal, _)| principal)
    }

    /// As [`Authenticator::verify`], with the instant the token expires: for connections that
    /// outlive a request and must end with their token.
    pub async fn verify_until(&self, token: &str) -> Result<(Principal, SystemTime), AuthError> {
        if let Some(verified) = self.verified.get(token, SystemTime::now()) {
            return Ok(verified);
        }
        let key = match &self.keys {
            Keys::Fixed(key) => key.clone(),
            Keys::Provider(provider) => provider.key_for(token).await?,
        };
        let mut validation = self.validation.clone();
        validation.algorithms = vec![key.algorithm];
        let claims = jsonwebtoken::decode::<serde_json::Value>(token, &key.key, &validation)
            .map_err(|err| match err.kind() {
                ErrorKind::ExpiredSignature => AuthError::ExpiredToken,
                ErrorKind::ImmatureSignature => AuthError::InvalidToken("not valid yet"),
                ErrorKind::InvalidIssuer => AuthError::InvalidToken("wrong issuer"),
                ErrorKind::InvalidAudience => AuthError::InvalidToken("wrong audience"),
                ErrorKind::InvalidSignature => AuthError::InvalidToken("bad signature"),
                ErrorKind::InvalidAlgorithm => AuthError::InvalidToken("algorithm not accepted"),
                ErrorKind::MissingRequiredClaim(_) | ErrorKind::Json(_) => {
                    AuthError::InvalidToken("missing or malformed claims")
                }
                _ => AuthError::InvalidToken("malformed"),
            })?
            .claims;
        // `exp` is required and was checked by the validation above.
        let expires = claims
            .get("exp")
            .and_then(serde_json::Value::as_u64)
            .and_then(|exp| UNIX_EPOCH.checked_add(Duration::from_secs(exp)))
            .ok_or(AuthError::InvalidToken("missing or malformed claims"))?;
        let principal = self.principal(&claims)?;
        self.verified.keep(token, &principal, expires, &key);
        Ok((principal, expires))
    }

    /// Who verified `claims` speak for, read where [`ClaimMapping`] says.
    fn principal(&self, claims: &serde_json::Value) -> Result<Principal, AuthError> {
        let subject = claims
            .get("sub")
            .and_then(serde_json::Value::as_str)
            .filter(|sub| !sub.is_empty() && sub.len() <= 256)
            .ok_or(AuthError::InvalidToken("malformed subject"))?;
        let tenant = claim(claims, &self.claims.tenant)
            .and_then(serde_json::Value::as_str)
            .filter(|tenant| valid_tenant(tenant))
            .ok_or(AuthError::InvalidToken("missing or malformed tenant"))?;
        let mut roles: BTreeSet<Role> = match claim(claims, &self.claims.roles) {
            Some(serde_json::Value::Array(names)) => names
                .iter()
                .filter_map(serde_json::Value::as_str)
                .filter_map(Role::parse)
                .collect(),
            Some(serde_json::Value::String(name)) => Role::parse(name).into_iter().collect(),
            _ => BTreeSet::new(),
        };
        if self.claims.roles_from_scope
            && let Some(scope) = claims.get("scope").and_then(serde_json::Value::as_str)
        {
            roles.extend(scope.split(' ').filter_map(Role::parse));
        }
        Ok(Principal {
            subject: subject.to_owned(),
            tenant: tenant.to_owned(),
            roles,
        })
    }
}

/// The claim at `path` in `claims`: a key containing dots (a namespaced claim such as
/// `https://ledger.example/roles`) is matched whole before the path is split at a dot into
/// nested objects (`realm_access.roles`).
fn claim<'a>(claims: &'a serde_json::Value, path: &str) -> Option<&'a serde_json::Value> {
    if let Some(value) = claims.get(path) {
        return Some(value);
    }
    path.match_indices('.').find_map(|(at, _)| {
        claims
            .get(&path[..at])
            .and_then(|inner| claim(inner, &path[at + 1..]))
    })
}

/// The token of an `Authorization` value `Bearer <token>`.
pub fn bearer_token(value: &str) -> Option<&str> {
    value
        .strip_prefix("Bearer ")
        .or_else(|| value.strip_prefix("bearer "))
        .map(str::trim)
        .filter(|token| !token.is_empty())
}

/// The longest tenant a token may name, in bytes.
pub const MAX_TENANT_BYTES: usize = 64;

/// Tenants are short identifiers: 1 to [`MAX_TENANT_BYTES`] of `A-Z a-z 0-9 . _ -`.
fn valid_tenant(tenant: &str) -> bool {
    (1..=MAX_TENANT_BYTES).contains(&tenant.len())
        && tenant
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

impl<S> FromRequestParts<S> for Principal
where
    S: Send + Sync,
    Arc<Authenticator>: FromRef<S>,
{
    type Rejection = AuthError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        let header = parts
            .headers
            .get(header::AUTHORIZATION)
            .ok_or(AuthError::MissingToken)?;
        let token = header
            .to_str()
            .ok()
            .and_then(bearer_token)
            .ok_or(AuthError::InvalidToken("expected `Bearer <token>`"))?;
        let authenticator = Arc::<Authenticator>::from_ref(state);
        let principal = authenticator.verify(token).await?;
        tracing::Span::current().record("tenant", principal.tenant.as_str());
        authenticator.admit(&principal)?;
        Ok(principal)
    }
}

/// What a minted token says. For development tools and tests; production tokens come from an
/// identity provider.
#[derive(Debug, Clone)]
pub struct TokenRequest<'a> {
    pub subject: &'a str,
    pub tenant: &'a str,
    pub roles: &'a [&'a str],
    pub ttl_seconds: u64,
}

/// Mints an HS256 token accepted by an [`Authenticator`] configured with the same secret,
/// issuer and audience.
pub fn mint_hs256(
    secret: &SecretString,
    issuer: &str,
    audience: &str,
    request: &TokenRequest<'_>,
) -> Result<String, jsonwebtoken::errors::Error> {
    let now = jsonwebtoken::get_current_timestamp();
    let claims = Claims {
        sub: request.subject.to_owned(),
        tenant: request.tenant.to_owned(),
        roles: request.roles.iter().map(|r| (*r).to_owned()).collect(),
        iss: issuer.to_owned(),
        aud: audience.to_owned(),
        exp: now + request.ttl_seconds,
        nbf: None,
        iat: Some(now),
    };
    jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        &claims,
        &EncodingKey::from_secret(secret.expose_secret().as_bytes()),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECRET: &str = "0123456789abcdef0123456789abcdef";

    fn authenticator() -> Authenticator {
        Authenticator::new(&AuthConfig::for_tests(SECRET)).unwrap()
    }

    fn token(tenant: &str, ttl: u64) -> String {
        mint_hs256(
            &SecretString::from(SECRET),
            "ledger",
            "ledger",
            &TokenRequest {
                subject: "alice",
                tenant,
                roles: &["teller", "astronaut"],
                ttl_seconds: ttl,
            },
        )
        .unwrap()
    }

    #[tokio::test]
    async fn accepts_a_valid_token_and_ignores_unknown_roles() {
        let principal = authenticator().verify(&token("acme", 60)).await.unwrap();
        assert_eq!(principal.subject, "alice");
        assert_eq!(principal.tenant, "acme");
        assert_eq!(principal.roles, BTreeSet::from([Role::Teller]));
        assert!(principal.require_any(&[Role::Viewer]).is_err());
    }

    #[tokio::test]
    async fn refuses_short_secrets_and_malformed_tenants() {
        assert!(Authenticator::new(&AuthConfig::for_tests("short")).is_err());
        assert!(matches!(
            authenticator().verify(&token("a b", 60)).await,
            Err(AuthError::InvalidToken(_))
        ));
    }

    /// An authenticator reading the tenant and roles where `claims` says, and a token of the
    /// audience `["account", "ledger"]` with `extra` claims.
    fn mapped(claims: ClaimMapping, extra: serde_json::Value) -> (Authenticator, String) {
        let authenticator = Authenticator::new(&AuthConfig {
            claims,
            ..AuthConfig::for_tests(SECRET)
        })
        .unwrap();
        let mut payload = serde_json::json!({
            "sub": "alice", "iss": "ledger", "aud": ["account", "ledger"],
            "exp": jsonwebtoken::get_current_timestamp() + 60,
        });
        payload
            .as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        let token = jsonwebtoken::encode(
            &Header::new(Algorithm::HS256),
            &payload,
            &EncodingKey::from_secret(SECRET.as_bytes()),
        )
        .unwrap();
        (authenticator, token)
    }

    #[tokio::test]
    async fn reads_keycloak_nested_roles_and_an_audience_array() {
        let (authenticator, token) = mapped(
            ClaimMapping {
                tenant: "tenant".into(),
                roles: "realm_access.roles".into(),
                roles_from_scope: false,
            },
            serde_json::json!({"tenant": "acme",
                               "realm_access": {"roles": ["offline_access", "viewer"]}}),
        );
        let principal = authenticator.verify(&token).await.unwrap();
        assert_eq!(principal.roles, BTreeSet::from([Role::Viewer]));
    }

    #[tokio::test]
    async fn reads_auth0_namespaced_claims_whole() {
        let (authenticator, token) = mapped(
            ClaimMapping {
                tenant: "https://ledger.example/tenant".into(),
                roles: "https://ledger.example/roles".into(),
                roles_from_scope: false,
            },
            serde_json::json!({"https://ledger.example/tenant": "acme",
                               "https://ledger.example/roles": ["auditor"]}),
        );
        let principal = authenticator.verify(&token).await.unwrap();
        assert_eq!(principal.tenant, "acme");
        assert_eq!(principal.roles, BTreeSet::from([Role::Auditor]));
    }

    #[tokio::test]
    async fn scope_grants_roles_only_when_configured() {
        let claims = serde_json::json!({"tenant": "acme", "scope": "openid teller"});
        let (without, token) = mapped(ClaimMapping::default(), claims.clone());
        assert!(without.verify(&token).await.unwrap().roles.is_empty());
        let (with, token) = mapped(
            ClaimMapping {
                roles_from_scope: true,
                ..ClaimMapping::default()
            },
            claims,
        );
        assert_eq!(
            with.verify(&token).await.unwrap().roles,
            BTreeSet::from([Role::Teller])
        );
    }

    #[tokio::test]
    async fn refuses_a_token_without_the_tenant_claim() {
        let (authenticator, token) = mapped(
            ClaimMapping {
                tenant: "org.tenant".into(),
                ..ClaimMapping::default()
            },
            serde_json::json!({"tenant": "acme", "org": {"name": "acme"}}),
        );
        assert!(matches!(
            authenticator.verify(&token).await,
            Err(AuthError::InvalidToken("missing or malformed tenant"))
        ));
    }

    #[test]
    fn secrets_do_not_print() {
        let secret = SecretString::from(SECRET);
        assert!(!format!("{secret:?}").contains(SECRET));
        assert!(!format!("{:?}", AuthConfig::for_tests(SECRET)).contains(SECRET));
    }
}
