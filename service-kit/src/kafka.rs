//! Kafka: client settings, topic names, and the CloudEvents envelope analysts read.
//!
//! Messages use CloudEvents 1.0 in Kafka binary content mode: the value is the event's data as
//! JSON, and the attributes are `ce_*` headers. The header names and their meaning are the
//! contract with analysts; change them only with a new documented version.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use rdkafka::ClientConfig;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::ClientContext;
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext};
use rdkafka::message::{Header, Headers, OwnedHeaders};
use rdkafka::statistics::Statistics;
use rdkafka::types::RDKafkaErrorCode;
use secrecy::{ExposeSecret, SecretString};

use crate::config::{ConfigError, Optional, Setting, Source};
use crate::event_log::LoggedEvent;

pub const KAFKA_BROKERS: Optional<&str> = Optional::new(
    "KAFKA_BROKERS",
    "(none)",
    "bootstrap servers; required by the relay and the projector",
);
pub const KAFKA_TOPIC_PREFIX: Setting<&str> = Setting::new(
    "KAFKA_TOPIC_PREFIX",
    "ledger",
    "topics are `<prefix>.account.events`, `<prefix>.transfer.events`, `<prefix>.deadletter`",
);
pub const KAFKA_PARTITIONS: Setting<i32> = Setting::new(
    "KAFKA_PARTITIONS",
    3,
    "partitions of the topics the services create",
);
/// The default suits the compose cluster's single broker.
pub const KAFKA_REPLICATION_FACTOR: Setting<i32> = Setting::new(
    "KAFKA_REPLICATION_FACTOR",
    1,
    "replicas of each topic the services create (3 on a production cluster)",
);
pub const KAFKA_MIN_INSYNC_REPLICAS: Optional<i32> = Optional::new(
    "KAFKA_MIN_INSYNC_REPLICAS",
    "the broker's",
    "`min.insync.replicas` of the topics the services create (2 with 3 replicas); with `acks=all`, a write is acknowledged once that many replicas have it",
);
pub const KAFKA_FETCH_WAIT: Setting<u32> = Setting::new(
    "KAFKA_FETCH_WAIT_MS",
    10,
    "how long a consumer's fetch may wait at the broker for data: short for latency, longer to idle cheaply (`cargo xtask up` uses 500: with nisshi, idle CPU 1 core → 0.1, end to end p50 24 → 59 ms)",
);
pub const KAFKA_SECURITY_PROTOCOL: Setting<&str> = Setting::new(
    "KAFKA_SECURITY_PROTOCOL",
    "plaintext",
    "`plaintext`, `ssl`, `sasl_plaintext` or `sasl_ssl`, for every Kafka client",
);
pub const KAFKA_SASL_MECHANISM: Setting<&str> = Setting::new(
    "KAFKA_SASL_MECHANISM",
    "PLAIN",
    "`PLAIN`, `SCRAM-SHA-256` or `SCRAM-SHA-512`, with a `sasl_*` protocol",
);
pub const KAFKA_SASL_USERNAME: Optional<&str> = Optional::new(
    "KAFKA_SASL_USERNAME",
    "(none)",
    "required with a `sasl_*` protocol",
);
pub const KAFKA_SASL_PASSWORD: Optional<&str> = Optional::new(
    "KAFKA_SASL_PASSWORD",
    "(none)",
    "required with a `sasl_*` protocol; never logged",
);
pub const KAFKA_SSL_CA_LOCATION: Optional<&str> = Optional::new(
    "KAFKA_SSL_CA_LOCATION",
    "the system's CAs",
    "CA certificate (PEM file) that the brokers' certificates must chain to",
);
pub const KAFKA_PROPERTIES_FILE: Optional<&str> = Optional::new(
    "KAFKA_PROPERTIES_FILE",
    "(none)",
    "a file of `key=value` lines: any librdkafka property, set on every client after the settings above (client certificates, OAUTHBEARER, ...)",
);

/// Where the brokers are and how topics are named.
#[derive(Debug, Clone)]
pub struct KafkaConfig {
    /// [`KAFKA_BROKERS`]: comma-separated `host:port` list.
    pub brokers: String,
    /// [`KAFKA_TOPIC_PREFIX`]: topics are `<prefix>.<aggregate>.events` and
    /// `<prefix>.deadletter`.
    pub topic_prefix: String,
    /// [`KAFKA_PARTITIONS`]: partitions of topics this deployment creates.
    pub partitions: i32,
    /// How the topics this deployment creates are replicated.
    pub replication: Replication,
    /// Every other client property: security (TLS, SASL) and `KAFKA_PROPERTIES_FILE`.
    pub properties: ClientProperties,
    /// [`KAFKA_FETCH_WAIT`]: how long a consumer's fetch may wait at the broker for data. Short for latency (some brokers, nisshi among them, answer late within the
    /// wait even when data came); longer to idle cheaply.
    pub fetch_wait_ms: u32,
}

/// [`KAFKA_REPLICATION_FACTOR`] and [`KAFKA_MIN_INSYNC_REPLICAS`]: with `acks=all`, a write
/// is acknowledged once that many replicas have it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Replication {
    pub factor: i32,
    pub min_insync_replicas: Option<i32>,
}

impl Default for Replication {
    fn default() -> Self {
        Self {
            factor: KAFKA_REPLICATION_FACTOR.default,
            min_insync_replicas: None,
        }
    }
}

/// librdkafka properties set on every client after ours, so a deployment can set anything
/// librdkafka knows. Values may be secrets (`sasl.password`, key passwords), so each is a
/// [`SecretString`]: `Debug` shows the keys only, and nothing logs the values.
#[derive(Debug, Clone, Default)]
pub struct ClientProperties(Vec<(String, SecretString)>);

/// The SASL mechanisms we document and test the configuration of; librdkafka knows others
/// (GSSAPI, OAUTHBEARER), which `KAFKA_PROPERTIES_FILE` can select.
const SASL_MECHANISMS: &[&str] = &["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"];
const SECURITY_PROTOCOLS: &[&str] = &["plaintext", "ssl", "sasl_plaintext", "sasl_ssl"];

impl ClientProperties {
    /// [`KAFKA_SECURITY_PROTOCOL`], [`KAFKA_SASL_MECHANISM`], [`KAFKA_SASL_USERNAME`],
    /// [`KAFKA_SASL_PASSWORD`], [`KAFKA_SSL_CA_LOCATION`], then every `key=value` line of
    /// [`KAFKA_PROPERTIES_FILE`] (Java client style; `#` starts a comment), which win.
    pub fn from_env() -> Result<Self, ConfigError> {
        let file = match KAFKA_PROPERTIES_FILE.read()? {
            None => None,
            Some(path) => {
                Some(
                    std::fs::read_to_string(&path).map_err(|err| ConfigError::Invalid {
                        name: KAFKA_PROPERTIES_FILE.name,
                        reason: format!("cannot read {path}: {err}"),
                    })?,
                )
            }
        };
        Self::from_settings(&crate::config::environment, file.as_deref())
    }

    fn from_settings(source: Source<'_>, file: Option<&str>) -> Result<Self, ConfigError> {
        let mut properties: Vec<(String, SecretString)> = Vec::new();
        let protocol = KAFKA_SECURITY_PROTOCOL.read_from(source)?.to_lowercase();
        if !SECURITY_PROTOCOLS.contains(&protocol.as_str()) {
            return Err(ConfigError::Invalid {
                name: KAFKA_SECURITY_PROTOCOL.name,
                reason: format!("must be one of {}", SECURITY_PROTOCOLS.join(", ")),
            });
        }
        let sasl = protocol.starts_with("sasl_");
        properties.push(("security.protocol".to_owned(), protocol.into()));
        if sasl {
            let mechanism = KAFKA_SASL_MECHANISM.read_from(source)?;
            if !SASL_MECHANISMS.contains(&mechanism.as_str()) {
                return Err(ConfigError::Invalid {
                    name: KAFKA_SASL_MECHANISM.name,
                    reason: format!("must be one of {}", SASL_MECHANISMS.join(", ")),
                });
            }
            let hint = "the SASL credentials, with KAFKA_SECURITY_PROTOCOL=sasl_*";
            let username = KAFKA_SASL_USERNAME.require_from(source, hint)?;
            let password = KAFKA_SASL_PASSWORD.require_from(source, hint)?;
            properties.push(("sasl.mechanism".to_owned(), mechanism.into()));
            properties.push(("sasl.username".to_owned(), username.into()));
            properties.push(("sasl.password".to_owned(), password.into()));
        }
        if let Some(ca) = KAFKA_SSL_CA_LOCATION.read_from(source)? {
            properties.push(("ssl.ca.location".to_owned(), ca.into()));
        }
        for (number, line) in file.unwrap_or_default().lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let Some((key, value)) = line.split_once('=') else {
                return Err(ConfigError::Invalid {
                    name: KAFKA_PROPERTIES_FILE.name,
                    reason: format!("line {} is not key=value", number + 1),
                });
            };
            properties.push((key.trim().to_owned(), value.trim().into()));
        }
        Ok(Self(properties))
    }
}

impl KafkaConfig {
    pub fn from_env() -> Result<Self, ConfigError> {
        Ok(Self {
            brokers: KAFKA_BROKERS.require("the Kafka bootstrap servers, host:port")?,
            topic_prefix: KAFKA_TOPIC_PREFIX.read()?,
            partitions: KAFKA_PARTITIONS.read()?,
            replication: Replication {
                factor: KAFKA_REPLICATION_FACTOR.read()?,
                min_insync_replicas: KAFKA_MIN_INSYNC_REPLICAS.read()?,
            },
            properties: ClientProperties::from_env()?,
            fetch_wait_ms: KAFKA_FETCH_WAIT.read()?,
        })
    }

    /// The brokers at `brokers` with every other setting at its default (no client
    /// properties): for tests and developer tools.
    pub fn with_brokers(brokers: impl Into<String>) -> Self {
        Self {
            brokers: brokers.into(),
            topic_prefix: KAFKA_TOPIC_PREFIX.default.into(),
            partitions: KAFKA_PARTITIONS.default,
            replication: Replication::default(),
            properties: ClientProperties::default(),
            fetch_wait_ms: KAFKA_FETCH_WAIT.default,
        }
    }

    /// The topic of one aggregate type's events, e.g. `ledger.account.events`.
    pub fn events_topic(&self, aggregate_type: &str) -> String {
        format!("{}.{aggregate_type}.events", self.topic_prefix)
    }

    /// Where messages that cannot be processed go, with the error in headers.
    pub fn deadletter_topic(&self) -> String {
        format!("{}.deadletter", self.topic_prefix)
    }

    /// Base client settings shared by producers and consumers, then the deployment's own
    /// properties (security, `KAFKA_PROPERTIES_FILE`).
    pub fn client(&self) -> ClientConfig {
        let mut config = ClientConfig::new();
        config
            .set("bootstrap.servers", &self.brokers)
            .set("client.id", "ledger")
            .set("socket.nagle.disable", "true")
            .set("log_level", "4");
        self.deployment_properties(config)
    }

    /// `config` with the deployment's properties set last, so they win over ours.
    fn deployment_properties(&self, mut config: ClientConfig) -> ClientConfig {
        for (key, value) in &self.properties.0 {
            config.set(key, value.expose_secret());
        }
        config
    }

    /// An idempotent producer: acks from all in-sync replicas, no duplicates or reordering
    /// from its own retries. A message never times out (`message.timeout.ms` 0): one that
    /// expired would leave a gap that later messages of its key jump, and be resent after
    /// them. It is retried until the broker takes it, and any other failure that would leave
    /// a gap is fatal (gapless), so the relay ends its term and the next resends from the
    /// checkpoint, in order.
    ///
    /// `linger.ms` is half a millisecond: the relay hands the producer a whole batch at once and
    /// waits for its acknowledgement before the next small one, so the batching that matters is
    /// the relay's, and a longer linger only adds itself to every event's way to the consumers.
    /// None at all costs throughput: the first message of a batch then leaves alone and the rest
    /// follow in more requests (`cargo xtask bench commands --clients 16 --deployed`: 4,790 and
    /// 4,833 deposits/s with 0 ms against 5,409 and 5,425 with 0.5 ms and 5,495 to 5,573 with
    /// 2 ms; `bench pipeline --events 50000` at 500 commands/s, end to end p50 / p99 11.7 /
    /// 24.0 ms with 0.5 ms against 14.6 / 29.5 ms with 2 ms).
    pub fn producer(&self) -> ClientConfig {
        let mut config = self.client();
        config
            .set("enable.idempotence", "true")
            .set("enable.gapless.guarantee", "true")
            .set("acks", "all")
            .set("linger.ms", "0.5")
            .set("message.timeout.ms", "0");
        self.deployment_properties(config)
    }

    /// A consumer in `group` that commits offsets only when told to.
    pub fn consumer(&self, group: &str) -> ClientConfig {
        let mut config = self.client();
        config
            .set("group.id", group)
            .set("enable.auto.commit", "false")
            .set("enable.auto.offset.store", "false")
            .set("auto.offset.reset", "earliest")
            .set("fetch.wait.max.ms", self.fetch_wait_ms.to_string())
            .set("session.timeout.ms", "10000")
            .set("heartbeat.interval.ms", "1000")
            // For [`ConsumerLag`]: how often librdkafka reports each partition's lag.
            .set("statistics.interval.ms", "5000");
        self.deployment_properties(config)
    }

    /// Creates `topics` if missing. Brokers differ in what else they support (partition
    /// changes, topic-config reads), so this does nothing else.
    pub async fn ensure_topics(&self, topics: &[String]) -> Result<(), KafkaSetupError> {
        let admin: AdminClient<DefaultClientContext> =
            self.client().create().map_err(KafkaSetupError::Client)?;
        let min_insync = self
            .replication
            .min_insync_replicas
            .map(|replicas| replicas.to_string());
        let new_topics: Vec<NewTopic<'_>> = topics
            .iter()
            .map(|name| {
                let topic = NewTopic::new(
                    name,
                    self.partitions,
                    TopicReplication::Fixed(self.replication.factor),
                );
                match &min_insync {
                    Some(replicas) => topic.set("min.insync.replicas", replicas),
                    None => topic,
                }
            })
            .collect();
        let options = AdminOptions::new().operation_timeout(Some(Duration::from_secs(10)));
        let results = admin
            .create_topics(&new_topics, &options)
            .await
            .map_err(KafkaSetupError::Client)?;
        for result in results {
            match result {
                Ok(_) | Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
                Err((topic, code)) => return Err(KafkaSetupError::Topic { topic, code }),
            }
        }
        Ok(())
    }
}

#[derive(Debug, thiserror::Error)]
pub enum KafkaSetupError {
    #[error("kafka client: {0}")]
    Client(#[source] rdkafka::error::KafkaError),
    #[error("creating topic {topic}: {code}")]
    Topic {
        topic: String,
        code: RDKafkaErrorCode,
    },
}

/// A consumer context that publishes each assigned partition's lag (messages between the
/// committed offset and the end of the partition, from librdkafka's statistics) as the gauge
/// named here, labelled by topic and partition.
pub struct ConsumerLag(pub &'static str);

impl ClientContext for ConsumerLag {
    fn stats(&self, statistics: Statistics) {
        for (topic, stats) in statistics.topics {
            for (partition, stats) in stats.partitions {
                // -1 is librdkafka's internal "unassigned" partition.
                if partition < 0 {
                    continue;
                }
                // A negative lag: the partition is not ours (any more), so another consumer
                // reports it; 0 keeps a sum over consumers right after a rebalance.
                metrics::gauge!(
                    self.0,
                    "topic" => topic.clone(),
                    "partition" => partition.to_string()
                )
                .set(stats.consumer_lag.max(0) as f64);
            }
        }
    }
}

impl ConsumerContext for ConsumerLag {}

/// Asks the brokers for metadata, which needs a live connection: the readiness probe's view of
/// the broker. One client for the life of the process, since each client starts threads.
#[derive(Clone)]
pub struct BrokerProbe(Arc<BaseConsumer>);

impl BrokerProbe {
    pub fn new(config: &KafkaConfig) -> Result<Self, rdkafka::error::KafkaError> {
        Ok(Self(Arc::new(config.client().create()?)))
    }

    /// Whether a broker answered within `timeout`.
    pub async fn reachable(&self, timeout: Duration) -> bool {
        let client = self.0.clone();
        // librdkafka's metadata call blocks its thread.
        tokio::task::spawn_blocking(move || client.fetch_metadata(None, timeout).is_ok())
            .await
            .unwrap_or(false)
    }
}

/// Header names of the CloudEvents binary mode, plus our extensions.
pub mod headers {
    pub const SPECVERSION: &str = "ce_specversion";
    pub const ID: &str = "ce_id";
    pub const SOURCE: &str = "ce_source";
    pub const TYPE: &str = "ce_type";
    pub const SUBJECT: &str = "ce_subject";
    pub const TIME: &str = "ce_time";
    pub const CONTENT_TYPE: &str = "content-type";
    pub const SEQUENCE: &str = "ce_sequence";
    pub const TENANT: &str = "ce_tenant";
    pub const CORRELATION_ID: &str = "ce_correlationid";
    pub const CAUSATION_ID: &str = "ce_causationid";
    pub const HASH: &str = "ce_hash";
    pub const TRACEPARENT: &str = "traceparent";
    /// On dead letters: why the message could not be processed, and where it came from.
    pub const ERROR: &str = "ledger_error";
    pub const ORIGINAL_TOPIC: &str = "ledger_original_topic";
    pub const ORIGINAL_PARTITION: &str = "ledger_original_partition";
    pub const ORIGINAL_OFFSET: &str = "ledger_original_offset";
    /// On a dead letter too big to copy: the original message's size; its key, value and
    /// headers are left out.
    pub const TRUNCATED: &str = "ledger_truncated";
}

/// `ce_type` of an event, e.g. `ledger.account.MoneyDeposited.v1`.
pub fn cloudevent_type(aggregate_type: &str, event_type: &str, event_version: &str) -> String {
    format!("ledger.{aggregate_type}.{event_type}.v{event_version}")
}

/// An event as published: the message value and headers.
pub struct Envelope {
    pub key: String,
    pub value: Vec<u8>,
    pub headers: OwnedHeaders,
}

#[derive(serde::Deserialize, Default)]
struct MetadataView {
    #[serde(default)]
    correlation_id: String,
    #[serde(default)]
    causation_id: String,
    #[serde(default)]
    traceparent: Option<String>,
}

/// The CloudEvents message for a stored event.
pub fn envelope(event: &LoggedEvent) -> Envelope {
    let metadata: MetadataView = serde_json::from_str(&event.metadata).unwrap_or_default();
    let time = event
        .recorded_at
        .to_rfc3339_opts(chrono::SecondsFormat::Micros, true);
    let source = format!("/ledger/{}", event.aggregate_type);
    let ce_type = cloudevent_type(
        &event.aggregate_type,
        &event.event_type,
        &event.event_version,
    );
    let sequence = event.sequence.to_string();
    let id = event.event_id.to_string();
    let hash = hex::encode(&event.hash);
    let mut headers = OwnedHeaders::new_with_capacity(14);
    for (key, value) in [
        (headers::SPECVERSION, "1.0"),
        (headers::ID, id.as_str()),
        (headers::SOURCE, source.as_str()),
        (headers::TYPE, ce_type.as_str()),
        (headers::SUBJECT, event.aggregate_id.as_str()),
        (headers::TIME, time.as_str()),
        (headers::CONTENT_TYPE, "application/json"),
        (headers::SEQUENCE, sequence.as_str()),
        (headers::TENANT, event.tenant.as_str()),
        (headers::CORRELATION_ID, metadata.correlation_id.as_str()),
        (headers::CAUSATION_ID, metadata.causation_id.as_str()),
        (headers::HASH, hash.as_str()),
    ] {
        headers = headers.insert(Header {
            key,
            value: Some(value),
        });
    }
    if let Some(traceparent) = &metadata.traceparent {
        headers = headers.insert(Header {
            key: headers::TRACEPARENT,
            value: Some(traceparent),
        });
    }
    Envelope {
        key: event.aggregate_id.clone(),
        value: event_data(&event.payload, &event.event_type),
        headers,
    }
}

/// The event's data: the stored payload without cqrs-es's `{"<EventType>": ...}` wrapper, so
/// analysts see `{"amount": 100, ...}`; `{}` for events without fields.
pub fn event_data(payload: &str, event_type: &str) -> Vec<u8> {
    match serde_json::from_str::<serde_json::Value>(payload) {
        Ok(serde_json::Value::Object(mut wrapper)) if wrapper.len() == 1 => wrapper
            .remove(event_type)
            .map(|data| serde_json::to_vec(&data).unwrap_or_default())
            .unwrap_or_else(|| payload.as_bytes().to_vec()),
        Ok(serde_json::Value::String(unit)) if unit == event_type => b"{}".to_vec(),
        _ => payload.as_bytes().to_vec(),
    }
}

/// Whether a message is the one the relay publishes for `stored`: the same key, value (as
/// JSON) and CloudEvents headers. Anyone who can produce to a topic can copy a genuine
/// message's headers, so consumers that act on a message's content check it against the
/// event store first; the `Err` names the first field that differs.
pub fn verify(
    stored: &LoggedEvent,
    key: Option<&[u8]>,
    headers: Option<&impl Headers>,
    value: Option<&[u8]>,
) -> Result<(), String> {
    let expected = envelope(stored);
    if key != Some(expected.key.as_bytes()) {
        return Err("the key differs from the stored event".into());
    }
    for wanted in expected.headers.iter() {
        let got = headers.and_then(|headers| {
            headers
                .iter()
                .find(|header| header.key == wanted.key)
                .and_then(|header| header.value)
        });
        if got != wanted.value {
            return Err(format!("{} differs from the stored event", wanted.key));
        }
    }
    let parse = |bytes: &[u8]| serde_json::from_slice::<serde_json::Value>(bytes).ok();
    let data = value.and_then(parse);
    if data.is_none() || data != parse(&expected.value) {
        return Err("the data differs from the stored event".into());
    }
    Ok(())
}

/// A header's value as UTF-8, if present.
pub fn header<'a>(headers: &'a impl Headers, name: &str) -> Option<&'a str> {
    headers
        .iter()
        .find(|header| header.key == name)
        .and_then(|header| header.value)
        .and_then(|value| std::str::from_utf8(value).ok())
}

/// A received event message, decoded and checked.
#[derive(Debug, Clone)]
pub struct ReceivedEvent {
    pub event_id: uuid::Uuid,
    pub aggregate_id: String,
    pub sequence: i64,
    /// `ce_type` split back into its parts.
    pub event_type: String,
    pub event_version: String,
    pub tenant: String,
    pub time: chrono::DateTime<chrono::Utc>,
    pub data: serde_json::Value,
}

/// Why a message is not a valid event message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EnvelopeError(pub String);

impl fmt::Display for EnvelopeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for EnvelopeError {}

/// Decodes the message of an event of `aggregate_type`.
pub fn decode(
    aggregate_type: &str,
    headers: Option<&impl Headers>,
    value: Option<&[u8]>,
) -> Result<ReceivedEvent, EnvelopeError> {
    let missing = |name: &str| EnvelopeError(format!("missing or non-UTF-8 header {name}"));
    let headers = headers.ok_or_else(|| EnvelopeError("no headers".into()))?;
    let get = |name: &'static str| header(headers, name).ok_or_else(|| missing(name));
    if get(headers::SPECVERSION)? != "1.0" {
        return Err(EnvelopeError("unsupported ce_specversion".into()));
    }
    let ce_type = get(headers::TYPE)?;
    let prefix = format!("ledger.{aggregate_type}.");
    let (event_type, event_version) = ce_type
        .strip_prefix(&prefix)
        .and_then(|rest| rest.rsplit_once(".v"))
        .ok_or_else(|| EnvelopeError(format!("unexpected ce_type {ce_type}")))?;
    let data = serde_json::from_slice(value.ok_or_else(|| EnvelopeError("no value".into()))?)
        .map_err(|err| EnvelopeError(format!("value is not JSON: {err}")))?;
    Ok(ReceivedEvent {
        event_id: get(headers::ID)?
            .parse()
            .map_err(|_| EnvelopeError("ce_id is not a UUID".into()))?,
        aggregate_id: get(headers::SUBJECT)?.to_owned(),
        sequence: get(headers::SEQUENCE)?
            .parse()
            .ok()
            .filter(|sequence: &i64| *sequence >= 1)
            .ok_or_else(|| EnvelopeError("ce_sequence is not a positive integer".into()))?,
        event_type: event_type.to_owned(),
        event_version: event_version.to_owned(),
        tenant: get(headers::TENANT)?.to_owned(),
        time: chrono::DateTime::parse_from_rfc3339(get(headers::TIME)?)
            .map_err(|_| EnvelopeError("ce_time is not RFC 3339".into()))?
            .with_timezone(&chrono::Utc),
        data,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn properties(
        settings: &[(&'static str, &str)],
        file: Option<&str>,
    ) -> Result<ClientProperties, ConfigError> {
        ClientProperties::from_settings(
            &|name| {
                settings
                    .iter()
                    .find(|(key, _)| *key == name)
                    .map(|(_, value)| (*value).to_owned())
            },
            file,
        )
    }

    fn config_with(properties: ClientProperties) -> KafkaConfig {
        KafkaConfig {
            properties,
            ..KafkaConfig::with_brokers("127.0.0.1:9092")
        }
    }

    #[test]
    fn sasl_scram_over_tls_reaches_every_client_and_debug_hides_the_password() {
        let properties = properties(
            &[
                ("KAFKA_SECURITY_PROTOCOL", "SASL_SSL"),
                ("KAFKA_SASL_MECHANISM", "SCRAM-SHA-512"),
                ("KAFKA_SASL_USERNAME", "relay"),
                ("KAFKA_SASL_PASSWORD", "hunter2-secret"),
                ("KAFKA_SSL_CA_LOCATION", "/etc/ledger/kafka-ca.pem"),
            ],
            None,
        )
        .unwrap();
        assert!(!format!("{properties:?}").contains("hunter2"));
        let config = config_with(properties);
        assert!(!format!("{config:?}").contains("hunter2"));
        for client in [config.client(), config.producer(), config.consumer("g")] {
            assert_eq!(client.get("security.protocol"), Some("sasl_ssl"));
            assert_eq!(client.get("sasl.mechanism"), Some("SCRAM-SHA-512"));
            assert_eq!(client.get("sasl.username"), Some("relay"));
            assert_eq!(client.get("sasl.password"), Some("hunter2-secret"));
            assert_eq!(
                client.get("ssl.ca.location"),
                Some("/etc/ledger/kafka-ca.pem")
            );
        }
    }

    #[test]
    fn sasl_needs_credentials_and_a_known_mechanism() {
        let missing = properties(&[("KAFKA_SECURITY_PROTOCOL", "sasl_plaintext")], None);
        assert!(
            matches!(
                missing,
                Err(ConfigError::Missing {
                    name: "KAFKA_SASL_USERNAME",
                    ..
                })
            ),
            "{missing:?}"
        );
        let unknown = properties(
            &[
                ("KAFKA_SECURITY_PROTOCOL", "sasl_plaintext"),
                ("KAFKA_SASL_MECHANISM", "MD5"),
                ("KAFKA_SASL_USERNAME", "u"),
                ("KAFKA_SASL_PASSWORD", "p"),
            ],
            None,
        );
        assert!(
            matches!(
                unknown,
                Err(ConfigError::Invalid {
                    name: "KAFKA_SASL_MECHANISM",
                    ..
                })
            ),
            "{unknown:?}"
        );
        let protocol = properties(&[("KAFKA_SECURITY_PROTOCOL", "tls")], None);
        assert!(
            matches!(
                protocol,
                Err(ConfigError::Invalid {
                    name: "KAFKA_SECURITY_PROTOCOL",
                    ..
                })
            ),
            "{protocol:?}"
        );
    }

    #[test]
    fn the_properties_file_sets_any_property_last_and_librdkafka_checks_the_names() {
        let file = "# client certificate\nssl.certificate.location = /etc/ledger/client.pem\n\nsocket.nagle.disable=false\n";
        let config = config_with(properties(&[], Some(file)).unwrap());
        let client = config.producer();
        assert_eq!(
            client.get("ssl.certificate.location"),
            Some("/etc/ledger/client.pem")
        );
        // The file wins over our own defaults, the producer's and the consumer's too.
        assert_eq!(client.get("socket.nagle.disable"), Some("false"));
        let tuned = config_with(properties(&[], Some("fetch.wait.max.ms=250")).unwrap());
        assert_eq!(tuned.consumer("g").get("fetch.wait.max.ms"), Some("250"));

        let typo = config_with(properties(&[], Some("sasl.pasword=x")).unwrap());
        let created: Result<rdkafka::producer::BaseProducer, _> = typo.producer().create();
        assert!(created.is_err(), "librdkafka accepted an unknown property");

        let malformed = properties(&[], Some("just-a-key"));
        assert!(
            matches!(
                malformed,
                Err(ConfigError::Invalid {
                    name: "KAFKA_PROPERTIES_FILE",
                    ..
                })
            ),
            "{malformed:?}"
        );
    }

    #[test]
    fn the_producer_turns_a_gap_into_a_fatal_error() {
        let producer = config_with(ClientProperties::default()).producer();
        assert_eq!(producer.get("enable.idempotence"), Some("true"));
        assert_eq!(producer.get("enable.gapless.guarantee"), Some("true"));
        assert_eq!(producer.get("message.timeout.ms"), Some("0"));
        assert_eq!(producer.get("acks"), Some("all"));
    }

    #[test]
    fn data_drops_the_enum_wrapper() {
        assert_eq!(
            event_data(r#"{"MoneyDeposited":{"amount":1}}"#, "MoneyDeposited"),
            br#"{"amount":1}"#
        );
        assert_eq!(event_data(r#""AccountFrozen""#, "AccountFrozen"), b"{}");
    }

    #[test]
    fn envelope_round_trips() {
        let event = LoggedEvent {
            position: crate::event_log::LogPosition::START,
            aggregate_type: "account".into(),
            aggregate_id: "a1".into(),
            sequence: 7,
            event_type: "MoneyDeposited".into(),
            event_version: "1".into(),
            event_id: uuid::Uuid::new_v4(),
            recorded_at: chrono::Utc::now(),
            tenant: "acme".into(),
            payload: r#"{"MoneyDeposited":{"amount":5}}"#.into(),
            metadata: r#"{"tenant":"acme","correlation_id":"c","causation_id":"r"}"#.into(),
            prev_hash: None,
            hash: vec![1, 2],
        };
        let envelope = envelope(&event);
        assert_eq!(header(&envelope.headers, headers::HASH), Some("0102"));
        let received = decode("account", Some(&envelope.headers), Some(&envelope.value)).unwrap();
        assert_eq!(received.sequence, 7);
        assert_eq!(received.tenant, "acme");
        assert_eq!(received.event_type, "MoneyDeposited");
        assert_eq!(received.event_version, "1");
        assert_eq!(received.data, serde_json::json!({"amount": 5}));
        assert!(decode("account", Some(&envelope.headers), Some(b"{")).is_err());
        assert!(decode("transfer", Some(&envelope.headers), Some(&envelope.value)).is_err());
    }
}
