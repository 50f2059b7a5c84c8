//! JWT bearer authentication.
//!
//! Exactly one algorithm is accepted per deployment (HS256 with a shared secret in development,
//! RS256 or ES256 with a public key in production), so a token cannot choose how it is checked:
//! `alg: none` and HS256-signed-with-the-public-key tokens are refused. `exp`, `iss` and `aud`
//! are required and checked; `nbf` is checked when present.

use std::collections::BTreeSet;
use std::fmt;
use std::marker::PhantomData;
use std::sync::Arc;
use std::time::Duration;

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

/// How tokens are verified.
#[derive(Debug, Clone)]
pub enum VerificationKey {
    /// Development: a shared secret, HS256.
    Hs256(SecretString),
    /// Production: a PEM public key and the one algorithm it is used with.
    PublicKey { algorithm: Algorithm, pem: String },
}

pub const JWT_HS256_SECRET: Optional<&str> = Optional::new(
    "JWT_HS256_SECRET",
    "(none)",
    "development: shared HS256 secret, at least 32 bytes",
);
pub const JWT_PUBLIC_KEY_PEM: Optional<&str> = Optional::new(
    "JWT_PUBLIC_KEY_PEM",
    "(none)",
    "production: PEM public key (instead of the secret)",
);
pub const JWT_ALGORITHM: Optional<&str> = Optional::new(
    "JWT_ALGORITHM",
    "(none)",
    "`RS256` or `ES256`, with `JWT_PUBLIC_KEY_PEM`",
);
pub const JWT_ISSUER: Setting<&str> = Setting::new("JWT_ISSUER", "ledger", "required `iss`");
pub const JWT_AUDIENCE: Setting<&str> = Setting::new("JWT_AUDIENCE", "ledger", "required `aud`");

/// Token verification settings.
#[derive(Debug, Clone)]
pub struct AuthConfig {
    pub issuer: String,
    pub audience: String,
    pub key: VerificationKey,
    /// Each tenant's request budget; `None`: unlimited.
    pub rate_limit: Option<RateLimit>,
}

impl AuthConfig {
    /// Reads [`JWT_ISSUER`], [`JWT_AUDIENCE`], and either [`JWT_HS256_SECRET`] or
    /// [`JWT_PUBLIC_KEY_PEM`] with [`JWT_ALGORITHM`], and the rate limit.
    pub fn from_env() -> Result<Self, ConfigError> {
        let issuer = JWT_ISSUER.read()?;
        let audience = JWT_AUDIENCE.read()?;
        let key = match (JWT_HS256_SECRET.read()?, JWT_PUBLIC_KEY_PEM.read()?) {
            (Some(secret), None) => VerificationKey::Hs256(secret.into()),
            (None, Some(pem)) => {
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
                VerificationKey::PublicKey { algorithm, pem }
            }
            (Some(_), Some(_)) => {
                return Err(ConfigError::Invalid {
                    name: JWT_HS256_SECRET.name,
                    reason: "set either JWT_HS256_SECRET or JWT_PUBLIC_KEY_PEM, not both".into(),
                });
            }
            (None, None) => {
                return Err(ConfigError::Missing {
                    name: JWT_HS256_SECRET.name,
                    hint: "set JWT_HS256_SECRET (development) or JWT_PUBLIC_KEY_PEM",
                });
            }
        };
        Ok(Self {
            issuer,
            audience,
            key,
            rate_limit: RateLimit::from_env()?,
        })
    }

    /// For tests: HS256 tokens signed with `secret`, the default issuer and audience, and no
    /// rate limit.
    pub fn for_tests(secret: &str) -> Self {
        Self {
            issuer: JWT_ISSUER.default.into(),
            audience: JWT_AUDIENCE.default.into(),
            key: VerificationKey::Hs256(SecretString::from(secret)),
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
#[derive(Debug, thiserror::Error)]
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
}

impl IntoResponse for AuthError {
    fn into_response(self) -> Response {
        let challenge = HeaderValue::from_static("Bearer");
        let problem = match self {
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
        };
        problem.into_response()
    }
}

/// Verifies bearer tokens, and charges each verified request to its tenant's budget when
/// there is one. Built once at start-up; shared by every request.
pub struct Authenticator {
    key: DecodingKey,
    validation: Validation,
    budgets: Option<TenantBudgets>,
}

impl fmt::Debug for Authenticator {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Authenticator")
            .field("algorithms", &self.validation.algorithms)
            .finish_non_exhaustive()
    }
}

impl Authenticator {
    pub fn new(config: &AuthConfig) -> Result<Self, ConfigError> {
        let (key, algorithm) = match &config.key {
            VerificationKey::Hs256(secret) => {
                if secret.expose_secret().len() < MIN_SECRET_BYTES {
                    return Err(ConfigError::Invalid {
                        name: "JWT_HS256_SECRET",
                        reason: format!("must be at least {MIN_SECRET_BYTES} bytes"),
                    });
                }
                (
                    DecodingKey::from_secret(secret.expose_secret().as_bytes()),
                    Algorithm::HS256,
                )
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
                (key, *algorithm)
            }
        };
        let mut validation = Validation::new(algorithm);
        validation.algorithms = vec![algorithm];
        validation.set_issuer(&[&config.issuer]);
        validation.set_audience(&[&config.audience]);
        validation.set_required_spec_claims(&["exp", "iss", "aud", "sub"]);
        validation.validate_nbf = true;
        validation.leeway = LEEWAY_SECONDS;
        Ok(Self {
            key,
            validation,
            budgets: config.rate_limit.map(TenantBudgets::new),
        })
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
    pub fn verify(&self, token: &str) -> Result<Principal, AuthError> {
        let claims = jsonwebtoken::decode::<Claims>(token, &self.key, &self.validation)
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
        if !valid_tenant(&claims.tenant) {
            return Err(AuthError::InvalidToken("malformed tenant"));
        }
        if claims.sub.is_empty() || claims.sub.len() > 256 {
            return Err(AuthError::InvalidToken("malformed subject"));
        }
        Ok(Principal {
            subject: claims.sub,
            tenant: claims.tenant,
            roles: claims.roles.iter().filter_map(|r| Role::parse(r)).collect(),
        })
    }
}

/// Tenants are short identifiers: 1 to 64 of `A-Z a-z 0-9 . _ -`.
fn valid_tenant(tenant: &str) -> bool {
    (1..=64).contains(&tenant.len())
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
            .and_then(|value| {
                value
                    .strip_prefix("Bearer ")
                    .or_else(|| value.strip_prefix("bearer "))
            })
            .map(str::trim)
            .filter(|token| !token.is_empty())
            .ok_or(AuthError::InvalidToken("expected `Bearer <token>`"))?;
        let authenticator = Arc::<Authenticator>::from_ref(state);
        let principal = authenticator.verify(token)?;
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

    #[test]
    fn accepts_a_valid_token_and_ignores_unknown_roles() {
        let principal = authenticator().verify(&token("acme", 60)).unwrap();
        assert_eq!(principal.subject, "alice");
        assert_eq!(principal.tenant, "acme");
        assert_eq!(principal.roles, BTreeSet::from([Role::Teller]));
        assert!(principal.require_any(&[Role::Viewer]).is_err());
    }

    #[test]
    fn refuses_short_secrets_and_malformed_tenants() {
        assert!(Authenticator::new(&AuthConfig::for_tests("short")).is_err());
        assert!(matches!(
            authenticator().verify(&token("a b", 60)),
            Err(AuthError::InvalidToken(_))
        ));
    }

    #[test]
    fn secrets_do_not_print() {
        let secret = SecretString::from(SECRET);
        assert!(!format!("{secret:?}").contains(SECRET));
        assert!(!format!("{:?}", AuthConfig::for_tests(SECRET)).contains(SECRET));
    }
}
