//! The Kafka contract for analysts: an AsyncAPI 3.0 document of every topic, and a JSON Schema
//! (draft 2020-12) of every event type and version, generated from the event types and the
//! envelope's header names. `GET /asyncapi.json` serves the document; the same files are
//! checked in under `contracts/`, and a test fails when they differ from what this generates
//! (`UPDATE_CONTRACTS=1 cargo test -p query-api --lib contract` rewrites them). The same test
//! holds `contracts/schema.graphql`, the SDL of the GraphQL schema (`crate::graphql`).

use domain::contract::{self, EventContract};
use serde_json::{Map, Value, json};
use service_kit::kafka::{self, headers};

/// Where each aggregate type's events go, and what identifies its streams.
const CHANNELS: [(&str, &str, &str); 2] = [
    ("accountEvents", "account", "the account id"),
    ("transferEvents", "transfer", "the transfer id"),
];

const DEADLETTER_CHANNEL: &str = "deadLetters";

const DESCRIPTION: &str = "\
Every event of the ledger's event store, published by the command API's relay in commit order, \
at least once. One topic per aggregate type; the message key is the aggregate id, so a \
stream's events are in one partition, in order of `ce_sequence`.

Messages are CloudEvents 1.0 in Kafka binary content mode: the value is the event's data as \
JSON (`{}` for events without data) and the attributes are `ce_*` headers.

Deduplicate by `ce_id`, or by (`ce_subject`, `ce_sequence`): a relay failover or retry may \
deliver an event again, never out of order within its stream.

Versions: `ce_type` is `ledger.<aggregate>.<EventType>.v<version>` and names the schema of the \
value. Events are published as they were stored, never rewritten: an event stored at an older \
version keeps that version's `ce_type` and data, also when published again. Both versions of \
`AccountOpened` are current in this sense: v1 (stored before accounts recorded their balance \
ceiling) reads as v2 with `max_balance` = 100000000000000000.

Kafka keeps events for a limited time; the complete history is the event store, which \
auditors read with `ledger-audit`.";

/// The AsyncAPI document.
fn asyncapi() -> Value {
    let contracts = contract::event_contracts();
    let mut channels = Map::new();
    let mut operations = Map::new();
    let mut messages = Map::new();
    for (channel, aggregate_type, key) in CHANNELS {
        let mut channel_messages = Map::new();
        let mut refs = Vec::new();
        for contract in contracts
            .iter()
            .filter(|c| c.aggregate_type == aggregate_type)
        {
            let id = message_id(contract);
            channel_messages.insert(
                id.clone(),
                json!({"$ref": format!("#/components/messages/{id}")}),
            );
            refs.push(json!({"$ref": format!("#/channels/{channel}/messages/{id}")}));
            messages.insert(id, event_message(contract, key));
        }
        channels.insert(
            channel.into(),
            json!({
                "address": format!("{{prefix}}.{aggregate_type}.events"),
                "title": format!("{aggregate_type} events"),
                "description": format!(
                    "Every event of every {aggregate_type} stream. Key: {key}."
                ),
                "parameters": {"prefix": {"$ref": "#/components/parameters/prefix"}},
                "messages": channel_messages,
            }),
        );
        operations.insert(
            format!("receive{}", capitalized(channel)),
            json!({
                "action": "receive",
                "channel": {"$ref": format!("#/channels/{channel}")},
                "summary": format!("Consume {aggregate_type} events."),
                "messages": refs,
            }),
        );
    }
    channels.insert(
        DEADLETTER_CHANNEL.into(),
        json!({
            "address": "{prefix}.deadletter",
            "title": "dead letters",
            "description": "Event messages the projector could not process, copied with their key, \
                value and headers, plus why and where they came from. Nothing is dropped: \
                an operator repairs the cause and replays from the event store.",
            "parameters": {"prefix": {"$ref": "#/components/parameters/prefix"}},
            "messages": {"deadLetter": {"$ref": "#/components/messages/deadLetter"}},
        }),
    );
    operations.insert(
        "receiveDeadLetters".into(),
        json!({
            "action": "receive",
            "channel": {"$ref": format!("#/channels/{DEADLETTER_CHANNEL}")},
            "summary": "Inspect messages that could not be processed.",
            "messages": [{"$ref": format!("#/channels/{DEADLETTER_CHANNEL}/messages/deadLetter")}],
        }),
    );
    messages.insert("deadLetter".into(), dead_letter_message());
    json!({
        "asyncapi": "3.0.0",
        "info": {
            "title": "Ledger events",
            "version": "1.0.0",
            "description": DESCRIPTION,
        },
        "defaultContentType": "application/json",
        "channels": channels,
        "operations": operations,
        "components": {
            "parameters": {
                "prefix": {
                    "description": "KAFKA_TOPIC_PREFIX of the deployment.",
                    "default": "ledger",
                },
            },
            "messages": messages,
        },
    })
}

/// The AsyncAPI document as served and checked in: pretty-printed, with a final newline.
pub(crate) fn asyncapi_text() -> String {
    pretty(&asyncapi())
}

fn pretty(document: &Value) -> String {
    let mut text = serde_json::to_string_pretty(document).expect("JSON values serialize");
    text.push('\n');
    text
}

fn message_id(contract: &EventContract) -> String {
    format!(
        "{}.{}.v{}",
        contract.aggregate_type, contract.event_type, contract.event_version
    )
}

fn capitalized(name: &str) -> String {
    let mut chars = name.chars();
    chars
        .next()
        .map(|first| first.to_uppercase().chain(chars).collect())
        .unwrap_or_default()
}

fn event_message(contract: &EventContract, key: &str) -> Value {
    let ce_type = kafka::cloudevent_type(
        contract.aggregate_type,
        &contract.event_type,
        contract.event_version,
    );
    let mut message = json!({
        "name": contract.event_type,
        "title": ce_type,
        "contentType": "application/json",
        "headers": event_headers(contract.aggregate_type, &ce_type),
        "payload": contract.schema,
        "correlationId": {"location": format!("$message.header#/{}", headers::CORRELATION_ID)},
        "bindings": {"kafka": {
            "key": {"type": "string", "format": "uuid", "description": key},
            "bindingVersion": "0.5.0",
        }},
    });
    if let Some(summary) = contract.schema.get("description") {
        message["summary"] = summary.clone();
    }
    if !contract.current {
        message["description"] = json!(
            "An older version: no longer written, but stored events of this version are \
             published as they were stored."
        );
    }
    message
}

/// The headers of an event message: the CloudEvents attributes and our extensions.
fn event_headers(aggregate_type: &str, ce_type: &str) -> Value {
    let properties = json!({
        headers::SPECVERSION: {"const": "1.0"},
        headers::ID: {"type": "string", "format": "uuid",
                      "description": "The event id: unique, stable across redeliveries."},
        headers::SOURCE: {"const": format!("/ledger/{aggregate_type}")},
        headers::TYPE: {"const": ce_type},
        headers::SUBJECT: {"type": "string", "format": "uuid",
                           "description": "The aggregate id; also the message key."},
        headers::TIME: {"type": "string", "format": "date-time",
                        "description": "When the event was recorded (RFC 3339, UTC)."},
        headers::CONTENT_TYPE: {"const": "application/json"},
        headers::SEQUENCE: {"type": "string", "pattern": "^[1-9][0-9]*$",
                            "description": "The stream version this event made: 1, 2, 3, ... per aggregate."},
        headers::TENANT: {"type": "string", "minLength": 1},
        headers::CORRELATION_ID: {"type": "string",
                                  "description": "Shared by every event one request caused, directly or through a transfer."},
        headers::CAUSATION_ID: {"type": "string",
                                "description": "What caused this event: the request id, or the event id of the step before."},
        headers::HASH: {"type": "string", "pattern": "^[0-9a-f]{64}$",
                        "description": "Hex SHA-256 link of the stream's hash chain, as stored (`ledger-audit verify --kafka` checks it)."},
        headers::TRACEPARENT: {"type": "string",
                               "pattern": "^[0-9a-f]{2}-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}$",
                               "description": "W3C trace context, when the command carried one."},
    });
    let required: Vec<&str> = properties
        .as_object()
        .map(|properties| {
            properties
                .keys()
                .map(String::as_str)
                .filter(|name| *name != headers::TRACEPARENT)
                .collect()
        })
        .unwrap_or_default();
    json!({
        "type": "object",
        "properties": properties,
        "required": required,
        "additionalProperties": false,
    })
}

fn dead_letter_message() -> Value {
    json!({
        "name": "DeadLetter",
        "title": "A message the projector could not process",
        "contentType": "application/octet-stream",
        "headers": {
            "type": "object",
            "description": "The original message's headers, plus these.",
            "properties": {
                headers::ERROR: {"type": "string", "description": "Why it could not be processed."},
                headers::ORIGINAL_TOPIC: {"type": "string"},
                headers::ORIGINAL_PARTITION: {"type": "string", "pattern": "^[0-9]+$"},
                headers::ORIGINAL_OFFSET: {"type": "string", "pattern": "^[0-9]+$"},
            },
            "required": [
                headers::ERROR, headers::ORIGINAL_TOPIC, headers::ORIGINAL_PARTITION,
                headers::ORIGINAL_OFFSET,
            ],
        },
        "payload": {"description": "The original message's value, byte for byte."},
        "bindings": {"kafka": {
            "key": {"type": "string", "description": "The original message's key."},
            "bindingVersion": "0.5.0",
        }},
    })
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::path::{Path, PathBuf};

    use super::*;

    /// Every checked-in contract file (path under `contracts/`, content), each pretty-printed
    /// with a final newline.
    fn files() -> BTreeMap<String, String> {
        let mut files = BTreeMap::new();
        files.insert("asyncapi.json".to_owned(), asyncapi_text());
        files.insert("schema.graphql".to_owned(), crate::graphql::sdl());
        for contract in contract::event_contracts() {
            files.insert(
                format!(
                    "events/{}/{}.v{}.json",
                    contract.aggregate_type, contract.event_type, contract.event_version
                ),
                pretty(&contract::standalone(&contract)),
            );
        }
        files
    }

    fn contracts_dir() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../contracts")
    }

    fn checked_in(dir: &Path, under: &Path, found: &mut BTreeMap<String, String>) {
        for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
            let path = entry.path();
            if path.is_dir() {
                checked_in(&path, under, found);
            } else if path
                .extension()
                .is_some_and(|ext| ext == "json" || ext == "graphql")
            {
                let name = path
                    .strip_prefix(under)
                    .unwrap()
                    .to_string_lossy()
                    .into_owned();
                found.insert(name, std::fs::read_to_string(&path).unwrap());
            }
        }
    }

    #[test]
    fn the_checked_in_contracts_are_what_the_code_generates() {
        let dir = contracts_dir();
        let generated = files();
        if std::env::var_os("UPDATE_CONTRACTS").is_some() {
            let _ = std::fs::remove_dir_all(dir.join("events"));
            for (name, content) in &generated {
                let path = dir.join(name);
                std::fs::create_dir_all(path.parent().unwrap()).unwrap();
                std::fs::write(path, content).unwrap();
            }
        }
        let mut found = BTreeMap::new();
        checked_in(&dir, &dir, &mut found);
        let stale: Vec<&String> = found
            .keys()
            .filter(|name| !generated.contains_key(*name))
            .collect();
        let differing: Vec<&String> = generated
            .iter()
            .filter(|(name, content)| found.get(*name) != Some(content))
            .map(|(name, _)| name)
            .collect();
        assert!(
            stale.is_empty() && differing.is_empty(),
            "contracts/ is out of date (missing or different: {differing:?}; not generated: \
             {stale:?}); run `UPDATE_CONTRACTS=1 cargo test -p query-api --lib contract` and \
             review the diff"
        );
    }

    #[test]
    fn every_message_is_in_its_channel_and_operation() {
        let document = asyncapi();
        let messages = document["components"]["messages"].as_object().unwrap();
        assert_eq!(messages.len(), contract::event_contracts().len() + 1);
        for (channel, aggregate_type, _) in CHANNELS {
            let listed = document["channels"][channel]["messages"]
                .as_object()
                .unwrap();
            let operation = &document["operations"][format!("receive{}", capitalized(channel))];
            assert_eq!(
                operation["messages"].as_array().unwrap().len(),
                listed.len()
            );
            for id in listed.keys() {
                assert!(id.starts_with(&format!("{aggregate_type}.")));
                assert_eq!(
                    messages[id]["headers"]["properties"]["ce_type"]["const"],
                    format!("ledger.{id}")
                );
            }
        }
        assert!(messages.contains_key("account.AccountOpened.v1"));
        assert!(messages.contains_key("account.AccountOpened.v2"));
    }
}
