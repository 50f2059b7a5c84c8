//! Typed settings from environment variables, read once at start-up, and their reference.
//!
//! Each variable is declared once, beside the config struct that holds it, as a `const`
//! [`Setting`] (name, typed default, meaning) or, when unset means "no value" rather than a
//! default, an [`Optional`]:
//!
//! ```
//! # use service_kit::config::Setting;
//! pub const MAX_CONNECTIONS: Setting<u32> =
//!     Setting::new("DATABASE_MAX_CONNECTIONS", 16, "pool size per process");
//! # fn main() -> Result<(), service_kit::config::ConfigError> {
//! let max_connections: u32 = MAX_CONNECTIONS.read()?; // the variable, or 16 when unset
//! # Ok(()) }
//! ```
//!
//! The code reads the declaration (`read`), code that needs the default without reading
//! (`Config::for_tests`, `Default` impls) takes its `default`, and `cargo xtask config-reference`
//! renders the README's table from the same declarations (each crate lists its own in a
//! `SETTINGS` slice), so a default is written once and cannot drift. Reading is only possible
//! through a declaration, and the reference's tests fail when a declaration is not listed.

use std::marker::PhantomData;
use std::net::SocketAddr;
use std::num::{NonZeroU32, NonZeroU64, NonZeroUsize};
use std::str::FromStr;
use std::time::Duration;

/// A setting that is missing or cannot be used. Always names the variable; never echoes a
/// value, which may be a secret.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{name} must be set: {hint}")]
    Missing {
        name: &'static str,
        hint: &'static str,
    },
    #[error("{name} is invalid: {reason}")]
    Invalid { name: &'static str, reason: String },
}

/// Where settings are read from: the process environment in services, a closure over fixed
/// values in unit tests. Gives the raw value of a variable, if set and not empty.
pub type Source<'a> = &'a dyn Fn(&str) -> Option<String>;

/// The process environment as a [`Source`]: an empty variable counts as unset.
pub fn environment(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|value| !value.is_empty())
}

/// A type a setting can have: how a raw value is parsed, and how a default is shown.
pub trait Value: Sized {
    /// What a read gives: `Self`, or its owned form (`String` for `&'static str`).
    type Owned;
    /// Parses a raw value. The error is the reason only; it never quotes a value that may be
    /// secret (the caller adds the variable's name).
    fn parse(raw: &str) -> Result<Self::Owned, String>;
    /// This value, owned.
    fn to_owned_value(&self) -> Self::Owned;
    /// This value as written in the variable, e.g. `16`, `127.0.0.1:8080`.
    fn show(&self) -> String;
}

/// Values parsed with [`FromStr`] and shown with [`Display`].
macro_rules! from_str_values {
    ($($type:ty),* $(,)?) => {$(
        impl Value for $type {
            type Owned = Self;
            fn parse(raw: &str) -> Result<Self, String> {
                raw.parse().map_err(|err: <$type as FromStr>::Err| err.to_string())
            }
            fn to_owned_value(&self) -> Self {
                *self
            }
            fn show(&self) -> String {
                self.to_string()
            }
        }
    )*};
}

from_str_values!(
    bool,
    i32,
    i64,
    u16,
    u32,
    u64,
    usize,
    f64,
    NonZeroU32,
    NonZeroU64,
    NonZeroUsize,
    SocketAddr
);

impl Value for &'static str {
    type Owned = String;
    fn parse(raw: &str) -> Result<String, String> {
        Ok(raw.to_owned())
    }
    fn to_owned_value(&self) -> String {
        (*self).to_owned()
    }
    fn show(&self) -> String {
        (*self).to_owned()
    }
}

/// A duration in whole milliseconds: for the `*_MS` variables only.
impl Value for Duration {
    type Owned = Self;
    fn parse(raw: &str) -> Result<Self, String> {
        raw.parse()
            .map(Duration::from_millis)
            .map_err(|err: std::num::ParseIntError| format!("milliseconds expected: {err}"))
    }
    fn to_owned_value(&self) -> Self {
        *self
    }
    fn show(&self) -> String {
        self.as_millis().to_string()
    }
}

/// A variable with a default: `name` holds a `T`, and unset means `default`.
#[derive(Debug, Clone, Copy)]
pub struct Setting<T: 'static> {
    pub name: &'static str,
    /// Used when the variable is unset or empty; the reference shows it.
    pub default: T,
    /// For the reference: what the setting does (Markdown).
    pub meaning: &'static str,
}

impl<T: Value> Setting<T> {
    pub const fn new(name: &'static str, default: T, meaning: &'static str) -> Self {
        Self {
            name,
            default,
            meaning,
        }
    }

    /// The variable's value, or the default when unset.
    pub fn read(&self) -> Result<T::Owned, ConfigError> {
        self.read_from(&environment)
    }

    /// As [`Setting::read`], from `source`.
    pub fn read_from(&self, source: Source<'_>) -> Result<T::Owned, ConfigError> {
        match source(self.name) {
            None => Ok(self.default.to_owned_value()),
            Some(raw) => parse::<T>(self.name, &raw),
        }
    }
}

/// A variable without a default value: unset means "none", or that someone else decides
/// (the broker's own default, the system's CAs), as `unset` says for the reference.
#[derive(Debug, Clone, Copy)]
pub struct Optional<T: 'static> {
    pub name: &'static str,
    /// For the reference: what unset means (Markdown), e.g. "(none)", "the broker's".
    pub unset: &'static str,
    /// For the reference: what the setting does (Markdown).
    pub meaning: &'static str,
    value: PhantomData<fn() -> T>,
}

impl<T: Value> Optional<T> {
    pub const fn new(name: &'static str, unset: &'static str, meaning: &'static str) -> Self {
        Self {
            name,
            unset,
            meaning,
            value: PhantomData,
        }
    }

    /// The variable's value, if set.
    pub fn read(&self) -> Result<Option<T::Owned>, ConfigError> {
        self.read_from(&environment)
    }

    /// As [`Optional::read`], from `source`.
    pub fn read_from(&self, source: Source<'_>) -> Result<Option<T::Owned>, ConfigError> {
        source(self.name)
            .map(|raw| parse::<T>(self.name, &raw))
            .transpose()
    }

    /// The variable's value, or [`ConfigError::Missing`] with `hint` when this use needs it.
    pub fn require(&self, hint: &'static str) -> Result<T::Owned, ConfigError> {
        self.require_from(&environment, hint)
    }

    /// As [`Optional::require`], from `source`.
    pub fn require_from(
        &self,
        source: Source<'_>,
        hint: &'static str,
    ) -> Result<T::Owned, ConfigError> {
        self.read_from(source)?.ok_or(ConfigError::Missing {
            name: self.name,
            hint,
        })
    }
}

fn parse<T: Value>(name: &'static str, raw: &str) -> Result<T::Owned, ConfigError> {
    T::parse(raw).map_err(|reason| ConfigError::Invalid { name, reason })
}

/// A setting as the configuration reference (README) shows it.
pub trait Documented: Sync {
    fn name(&self) -> &'static str;
    /// The default as Markdown: a value in backticks, or words such as "(none)".
    fn default_markdown(&self) -> String;
    fn meaning(&self) -> &'static str;
}

impl<T: Value + Sync> Documented for Setting<T> {
    fn name(&self) -> &'static str {
        self.name
    }
    fn default_markdown(&self) -> String {
        format!("`{}`", self.default.show())
    }
    fn meaning(&self) -> &'static str {
        self.meaning
    }
}

impl<T: Value> Documented for Optional<T> {
    fn name(&self) -> &'static str {
        self.name
    }
    fn default_markdown(&self) -> String {
        self.unset.to_owned()
    }
    fn meaning(&self) -> &'static str {
        self.meaning
    }
}

/// A crate's list of the settings it declares, in the order the reference shows them.
pub type Settings = &'static [&'static dyn Documented];

/// The variables the shared plumbing reads: database, tokens, limits, Kafka, logs, traces.
/// (The HTTP listeners' bounds are [`crate::server::SETTINGS`].)
pub const SETTINGS: Settings = &[
    &crate::db::DATABASE_URL,
    &crate::db::DATABASE_MAX_CONNECTIONS,
    &crate::db::DATABASE_ACQUIRE_TIMEOUT,
    &crate::db::DATABASE_STATEMENT_TIMEOUT,
    &crate::auth::JWT_HS256_SECRET,
    &crate::auth::JWT_PUBLIC_KEY_PEM,
    &crate::auth::JWT_ALGORITHM,
    &crate::auth::JWT_ISSUER,
    &crate::auth::JWT_AUDIENCE,
    &crate::auth::JWT_TENANT_CLAIM,
    &crate::auth::JWT_ROLES_CLAIM,
    &crate::auth::JWT_ROLES_FROM_SCOPE,
    &crate::auth::oidc::OIDC_ISSUER,
    &crate::auth::oidc::OIDC_JWKS_REFRESH_MS,
    &crate::auth::oidc::OIDC_JWKS_MIN_REFRESH_MS,
    &crate::auth::oidc::OIDC_SWAGGER_CLIENT_ID,
    &crate::http::CORS_ALLOWED_ORIGINS,
    &crate::rate_limit::RATE_LIMIT_PER_TENANT,
    &crate::rate_limit::RATE_LIMIT_BURST,
    &crate::kafka::KAFKA_BROKERS,
    &crate::kafka::KAFKA_TOPIC_PREFIX,
    &crate::kafka::KAFKA_PARTITIONS,
    &crate::kafka::KAFKA_REPLICATION_FACTOR,
    &crate::kafka::KAFKA_MIN_INSYNC_REPLICAS,
    &crate::kafka::KAFKA_FETCH_WAIT,
    &crate::kafka::KAFKA_SECURITY_PROTOCOL,
    &crate::kafka::KAFKA_SASL_MECHANISM,
    &crate::kafka::KAFKA_SASL_USERNAME,
    &crate::kafka::KAFKA_SASL_PASSWORD,
    &crate::kafka::KAFKA_SSL_CA_LOCATION,
    &crate::kafka::KAFKA_PROPERTIES_FILE,
    &crate::telemetry::LOG_FORMAT,
    &crate::telemetry::RUST_LOG,
    &crate::telemetry::OTEL_EXPORTER_OTLP_ENDPOINT,
    &crate::telemetry::OTEL_EXPORTER_OTLP_PROTOCOL,
    &crate::telemetry::OTEL_SERVICE_NAME,
];

#[cfg(test)]
mod tests {
    use super::*;

    const PORT: Setting<u16> = Setting::new("TEST_PORT", 8080, "a port");
    const WAIT: Setting<Duration> = Setting::new("TEST_WAIT_MS", Duration::from_secs(2), "a wait");
    const SECRET: Optional<&str> = Optional::new("TEST_SECRET", "(none)", "a secret");

    fn source(pairs: &'static [(&'static str, &'static str)]) -> impl Fn(&str) -> Option<String> {
        move |name| {
            pairs
                .iter()
                .find(|(key, _)| *key == name)
                .map(|(_, value)| (*value).to_owned())
        }
    }

    #[test]
    fn unset_is_the_default_and_set_is_parsed() {
        assert_eq!(PORT.read_from(&source(&[])).unwrap(), 8080);
        assert_eq!(PORT.read_from(&source(&[("TEST_PORT", "9")])).unwrap(), 9);
        assert_eq!(
            WAIT.read_from(&source(&[("TEST_WAIT_MS", "250")])).unwrap(),
            Duration::from_millis(250)
        );
        assert_eq!(SECRET.read_from(&source(&[])).unwrap(), None);
    }

    #[test]
    fn errors_name_the_variable_and_never_quote_the_value() {
        let invalid = PORT
            .read_from(&source(&[("TEST_PORT", "hunter2")]))
            .unwrap_err()
            .to_string();
        assert!(invalid.starts_with("TEST_PORT is invalid"), "{invalid}");
        assert!(!invalid.contains("hunter2"), "{invalid}");
        let missing = SECRET
            .require_from(&source(&[]), "the secret")
            .unwrap_err()
            .to_string();
        assert_eq!(missing, "TEST_SECRET must be set: the secret");
    }

    #[test]
    fn the_reference_shows_the_typed_default() {
        assert_eq!(PORT.default_markdown(), "`8080`");
        assert_eq!(WAIT.default_markdown(), "`2000`");
        assert_eq!(SECRET.default_markdown(), "(none)");
    }
}
