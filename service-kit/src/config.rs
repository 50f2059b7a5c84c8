//! Typed settings from environment variables, read once at start-up, and their reference.

use std::str::FromStr;

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

/// The raw value of `name`, if set and not empty.
pub fn optional(name: &'static str) -> Option<String> {
    std::env::var(name).ok().filter(|value| !value.is_empty())
}

/// The value of `name`, or an error naming it.
pub fn required(name: &'static str, hint: &'static str) -> Result<String, ConfigError> {
    optional(name).ok_or(ConfigError::Missing { name, hint })
}

/// `name` parsed as `T`, or `default` when unset.
pub fn parsed_or<T>(name: &'static str, default: T) -> Result<T, ConfigError>
where
    T: FromStr,
    T::Err: std::fmt::Display,
{
    match optional(name) {
        None => Ok(default),
        Some(raw) => raw.parse().map_err(|err: T::Err| ConfigError::Invalid {
            name,
            reason: err.to_string(),
        }),
    }
}

/// One environment variable, as the configuration reference (README) shows it. Each crate
/// lists the variables it reads beside its config structs; `cargo xtask config-reference`
/// renders them all, and its tests fail when the code reads a variable not listed.
#[derive(Debug, Clone, Copy)]
pub struct Setting {
    pub name: &'static str,
    /// Markdown: a value in backticks, or words such as "(none)".
    pub default: &'static str,
    pub meaning: &'static str,
}

/// The variables the shared plumbing reads: database, tokens, limits, Kafka, logs, traces.
pub const SETTINGS: &[Setting] = &[
    Setting {
        name: "DATABASE_URL",
        default: "`postgres://postgres@127.0.0.1:5432/ledger`",
        meaning: "the event store",
    },
    Setting {
        name: "DATABASE_MAX_CONNECTIONS",
        default: "`16`",
        meaning: "pool size per process",
    },
    Setting {
        name: "DATABASE_ACQUIRE_TIMEOUT_MS",
        default: "`3000`",
        meaning: "wait for a pooled connection before answering 503",
    },
    Setting {
        name: "DATABASE_STATEMENT_TIMEOUT_MS",
        default: "`5000`",
        meaning: "server-side cap on any statement",
    },
    Setting {
        name: "JWT_HS256_SECRET",
        default: "(none)",
        meaning: "development: shared HS256 secret, at least 32 bytes",
    },
    Setting {
        name: "JWT_PUBLIC_KEY_PEM",
        default: "(none)",
        meaning: "production: PEM public key (instead of the secret)",
    },
    Setting {
        name: "JWT_ALGORITHM",
        default: "(none)",
        meaning: "`RS256` or `ES256`, with `JWT_PUBLIC_KEY_PEM`",
    },
    Setting {
        name: "JWT_ISSUER",
        default: "`ledger`",
        meaning: "required `iss`",
    },
    Setting {
        name: "JWT_AUDIENCE",
        default: "`ledger`",
        meaning: "required `aud`",
    },
    Setting {
        name: "CORS_ALLOWED_ORIGINS",
        default: "(none)",
        meaning: "origins whose pages may call the APIs from a browser, comma-separated (`https://app.example.com`); none: no CORS headers, cross-origin calls stay closed",
    },
    Setting {
        name: "RATE_LIMIT_PER_TENANT",
        default: "`1000`",
        meaning: "requests per second each tenant may sustain, per process; `0`: unlimited",
    },
    Setting {
        name: "RATE_LIMIT_BURST",
        default: "one second's worth",
        meaning: "requests a tenant may send at once after being idle",
    },
    Setting {
        name: "KAFKA_BROKERS",
        default: "(none)",
        meaning: "bootstrap servers; required by the relay and the projector",
    },
    Setting {
        name: "KAFKA_TOPIC_PREFIX",
        default: "`ledger`",
        meaning: "topics are `<prefix>.account.events`, `<prefix>.transfer.events`, `<prefix>.deadletter`",
    },
    Setting {
        name: "KAFKA_PARTITIONS",
        default: "`3`",
        meaning: "partitions of the topics the services create",
    },
    Setting {
        name: "KAFKA_REPLICATION_FACTOR",
        default: "`1`",
        meaning: "replicas of each topic the services create (3 on a production cluster)",
    },
    Setting {
        name: "KAFKA_MIN_INSYNC_REPLICAS",
        default: "the broker's",
        meaning: "`min.insync.replicas` of the topics the services create (2 with 3 replicas); with `acks=all`, a write is acknowledged once that many replicas have it",
    },
    Setting {
        name: "KAFKA_FETCH_WAIT_MS",
        default: "`10`",
        meaning: "how long a consumer's fetch may wait at the broker for data: short for latency, longer to idle cheaply (`cargo xtask up` uses 500: with nisshi, idle CPU 1 core → 0.1, end to end p50 24 → 59 ms)",
    },
    Setting {
        name: "KAFKA_SECURITY_PROTOCOL",
        default: "`plaintext`",
        meaning: "`plaintext`, `ssl`, `sasl_plaintext` or `sasl_ssl`, for every Kafka client",
    },
    Setting {
        name: "KAFKA_SASL_MECHANISM",
        default: "`PLAIN`",
        meaning: "`PLAIN`, `SCRAM-SHA-256` or `SCRAM-SHA-512`, with a `sasl_*` protocol",
    },
    Setting {
        name: "KAFKA_SASL_USERNAME",
        default: "(none)",
        meaning: "required with a `sasl_*` protocol",
    },
    Setting {
        name: "KAFKA_SASL_PASSWORD",
        default: "(none)",
        meaning: "required with a `sasl_*` protocol; never logged",
    },
    Setting {
        name: "KAFKA_SSL_CA_LOCATION",
        default: "the system's CAs",
        meaning: "CA certificate (PEM file) that the brokers' certificates must chain to",
    },
    Setting {
        name: "KAFKA_PROPERTIES_FILE",
        default: "(none)",
        meaning: "a file of `key=value` lines: any librdkafka property, set on every client after the settings above (client certificates, OAUTHBEARER, ...)",
    },
    Setting {
        name: "LOG_FORMAT",
        default: "`pretty`",
        meaning: "`json` for one JSON object per line",
    },
    Setting {
        name: "RUST_LOG",
        default: "`info`",
        meaning: "log filter",
    },
    Setting {
        name: "OTEL_EXPORTER_OTLP_ENDPOINT",
        default: "(none)",
        meaning: "OpenTelemetry collector for traces, by OTLP (`http://jaeger:4318`); unset: no export",
    },
    Setting {
        name: "OTEL_EXPORTER_OTLP_PROTOCOL",
        default: "`http/protobuf`",
        meaning: "`http/json` for collectors that take OTLP as JSON",
    },
    Setting {
        name: "OTEL_SERVICE_NAME",
        default: "the service",
        meaning: "the service name the traces carry; the compose file and `deploy/k8s/` set it for each process",
    },
];
