//! The Kafka contract holds: every event type, produced through the command API and the relay,
//! arrives with headers and a value that the AsyncAPI document and the JSON Schemas under
//! `contracts/` accept, and every message they describe was seen. So neither can drift from
//! what is published.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use jsonschema::{Draft, Validator};
use rdkafka::Message;
use rdkafka::message::{Headers, OwnedMessage};
use reqwest::StatusCode;
use serde_json::{Map, Value, json};
use service_kit::kafka::{header, headers};
use uuid::Uuid;

use crate::faults::read_all;
use crate::system::{System, TENANT};
use crate::transfers::{funded, settled, transfer};

const TRACEPARENT: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

fn contracts() -> &'static Path {
    Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/../contracts"))
}

fn read_json(path: &Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

/// AsyncAPI schemas are a superset of JSON Schema draft 7; validate as such, formats included.
fn draft7(schema: &Value) -> Validator {
    jsonschema::options()
        .with_draft(Draft::Draft7)
        .should_validate_formats(true)
        .build(schema)
        .unwrap_or_else(|err| panic!("invalid schema {schema}: {err}"))
}

fn assert_valid(validator: &Validator, instance: &Value, what: &str) {
    let errors: Vec<String> = validator
        .iter_errors(instance)
        .map(|err| format!("{} at {}", err, err.instance_path()))
        .collect();
    assert!(
        errors.is_empty(),
        "{what} {instance} is invalid: {errors:#?}"
    );
}

/// A message's headers as the JSON object a schema describes; each name at most once.
fn header_object(message: &OwnedMessage) -> Value {
    let mut object = Map::new();
    for header in message
        .headers()
        .into_iter()
        .flat_map(|headers| headers.iter())
    {
        let value = std::str::from_utf8(header.value.unwrap_or_default()).unwrap();
        assert!(
            object.insert(header.key.to_owned(), json!(value)).is_none(),
            "header {} repeated",
            header.key
        );
    }
    Value::Object(object)
}

#[tokio::test]
async fn every_event_type_is_published_as_the_contract_documents() {
    let system = System::start().await;

    // The served document is the checked-in one, and needs no token.
    let response = system
        .client
        .get(format!("{}/asyncapi.json", system.queries))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(response.headers()["content-type"], "application/json");
    let served = response.text().await.unwrap();
    assert_eq!(
        served,
        std::fs::read_to_string(contracts().join("asyncapi.json")).unwrap()
    );
    let asyncapi: Value = serde_json::from_str(&served).unwrap();

    // An account opened by the code before AccountOpened v2, stored as it stored it. The
    // projector reads its v1 message from Kafka (nothing else brings version 1 into the read
    // model), and the command API loads it to take a deposit.
    let old = Uuid::new_v4();
    sqlx::query(
        "INSERT INTO events (aggregate_type, aggregate_id, sequence, event_type, event_version, payload, metadata)
         VALUES ('account', $1, 1, 'AccountOpened', '1', $2, $3)",
    )
    .bind(old.to_string())
    .bind(json!({"AccountOpened": {"tenant": TENANT, "owner": "Old Ada", "currency": "EUR",
                                   "overdraft_limit": 0}}))
    .bind(json!({"tenant": TENANT, "actor": "tester", "correlation_id": "c-old",
                 "causation_id": "r-old", "request_id": "r-old"}))
    .execute(&system.pool)
    .await
    .unwrap();
    system.projected(old, 1).await;
    let (status, body) = system
        .command(
            &format!("/v1/accounts/{old}/deposits"),
            Some(json!({"amount": 300, "currency": "EUR"})),
            &[("traceparent", TRACEPARENT)],
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(system.account_at(old, 2).await["balance"], 300);

    // Every other event type, declines and refunds included.
    let source = funded(&system, "EUR", 1000).await;
    let destination = funded(&system, "EUR", 0).await;
    system.move_money(source, -100).await;
    let completed = transfer(&system, source, destination, 200, "EUR").await;
    assert_eq!(settled(&system, completed).await["status"], "completed");
    let rejected = transfer(&system, source, destination, 1_000_000, "EUR").await;
    assert_eq!(settled(&system, rejected).await["status"], "rejected");
    let (status, _) = system
        .command(&format!("/v1/accounts/{destination}/freeze"), None, &[])
        .await;
    assert_eq!(status, StatusCode::OK);
    let failed = transfer(&system, source, destination, 50, "EUR").await;
    assert_eq!(settled(&system, failed).await["status"], "failed");
    let (status, _) = system
        .command(&format!("/v1/accounts/{destination}/unfreeze"), None, &[])
        .await;
    assert_eq!(status, StatusCode::OK);
    let closing = funded(&system, "EUR", 0).await;
    let (status, _) = system
        .command(&format!("/v1/accounts/{closing}/close"), None, &[])
        .await;
    assert_eq!(status, StatusCode::OK);

    let messages_by_type: BTreeMap<String, &Value> = asyncapi["components"]["messages"]
        .as_object()
        .unwrap()
        .values()
        .filter_map(|message| {
            let ce_type = message["headers"]["properties"][headers::TYPE]["const"].as_str()?;
            Some((ce_type.to_owned(), message))
        })
        .collect();
    let mut seen = BTreeSet::new();
    for (channel, aggregate_type) in [("accountEvents", "account"), ("transferEvents", "transfer")]
    {
        let address = asyncapi["channels"][channel]["address"].as_str().unwrap();
        let topic = address.replace("{prefix}", &system.kafka.topic_prefix);
        assert_eq!(topic, system.kafka.events_topic(aggregate_type));
        let stored: i64 =
            sqlx::query_scalar("SELECT count(*) FROM events WHERE aggregate_type = $1")
                .bind(aggregate_type)
                .fetch_one(&system.pool)
                .await
                .unwrap();
        let listed = asyncapi["channels"][channel]["messages"]
            .as_object()
            .unwrap();
        for message in read_all(&system.kafka, &topic, stored as usize).await {
            let headers = header_object(&message);
            let ce_type = headers[headers::TYPE].as_str().unwrap().to_owned();
            let documented = messages_by_type
                .get(&ce_type)
                .unwrap_or_else(|| panic!("{ce_type} is not in the AsyncAPI document"));
            assert!(
                listed.keys().any(|id| format!("ledger.{id}") == ce_type),
                "{ce_type} is not listed in channel {channel}"
            );
            assert_valid(&draft7(&documented["headers"]), &headers, "headers");
            let key = json!(std::str::from_utf8(message.key().unwrap()).unwrap());
            assert_valid(
                &draft7(&documented["bindings"]["kafka"]["key"]),
                &key,
                "key",
            );
            assert_eq!(key, headers[headers::SUBJECT]);
            let value: Value = serde_json::from_slice(message.payload().unwrap()).unwrap();
            assert_valid(&draft7(&documented["payload"]), &value, "value");
            // The standalone JSON Schema (draft 2020-12, from its `$schema`) agrees.
            let (event_type, version) = ce_type
                .strip_prefix(&format!("ledger.{aggregate_type}."))
                .and_then(|rest| rest.rsplit_once(".v"))
                .unwrap();
            let file = contracts().join(format!(
                "events/{aggregate_type}/{event_type}.v{version}.json"
            ));
            let schema = jsonschema::options()
                .should_validate_formats(true)
                .build(&read_json(&file))
                .unwrap();
            assert_valid(&schema, &value, &file.display().to_string());
            if header(message.headers().unwrap(), headers::SUBJECT) == Some(&old.to_string()) {
                match event_type {
                    // Published as stored, not upcast.
                    "AccountOpened" => assert_eq!(version, "1"),
                    _ => assert_eq!(headers[headers::TRACEPARENT], TRACEPARENT),
                }
            }
            seen.insert(ce_type);
        }
    }
    let documented: BTreeSet<String> = messages_by_type.into_keys().collect();
    assert_eq!(
        seen, documented,
        "the document and what was published differ"
    );
}
