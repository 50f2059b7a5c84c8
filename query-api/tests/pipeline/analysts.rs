//! What an analyst sees, read with a Kafka client that is not ours: the PyPI `confluent-kafka`
//! wheel (`cargo xtask test` installs it).

use std::collections::HashMap;
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde_json::Value;
use uuid::Uuid;

use crate::system::{System, TENANT};

const CONSUMER: &str = r#"
import json, sys, time
from confluent_kafka import Consumer
brokers, topic, group, want = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
consumer = Consumer({"bootstrap.servers": brokers, "group.id": group,
                     "auto.offset.reset": "earliest", "enable.auto.commit": False})
consumer.subscribe([topic])
seen, deadline = [], time.time() + 60
while len(seen) < want and time.time() < deadline:
    message = consumer.poll(1.0)
    if message is None:
        continue
    if message.error():
        sys.exit(str(message.error()))
    seen.append({
        "key": message.key().decode(),
        "value": json.loads(message.value()),
        "headers": {k: v.decode() for k, v in (message.headers() or [])},
        "partition": message.partition(),
        "offset": message.offset(),
    })
consumer.close()
print(json.dumps(seen))
"#;

#[tokio::test]
async fn a_python_consumer_finds_every_event_with_the_documented_key_and_headers() {
    let system = System::start().await;
    let first = system.open(0).await;
    let second = system.open(25).await;
    system.move_money(first, 500).await;
    system.move_money(second, -20).await;
    system
        .command(&format!("/v1/accounts/{first}/freeze"), None, &[])
        .await;
    type Stored = (
        String,
        i64,
        String,
        String,
        Uuid,
        DateTime<Utc>,
        Vec<u8>,
        String,
    );
    let stored: Vec<Stored> = sqlx::query_as(
        "SELECT aggregate_id, sequence, event_type, event_version, event_id, recorded_at, hash,
                payload::text
           FROM events ORDER BY global_position",
    )
    .fetch_all(&system.pool)
    .await
    .unwrap();
    assert_eq!(stored.len(), 5);

    let topic = system.kafka.events_topic("account");
    let output = tokio::time::timeout(
        Duration::from_secs(90),
        tokio::process::Command::new("python3")
            .args([
                "-c",
                CONSUMER,
                &system.kafka.brokers,
                &topic,
                "analyst",
                "5",
            ])
            .output(),
    )
    .await
    .expect("python consumer timed out")
    .expect("python3 must be installed");
    assert!(
        output.status.success(),
        "python consumer failed (run `cargo xtask test`, which installs confluent-kafka): {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let messages: Vec<Value> = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(messages.len(), 5);
    let by_id: HashMap<&str, &Value> = messages
        .iter()
        .map(|m| (m["headers"]["ce_id"].as_str().unwrap(), m))
        .collect();
    for (aggregate_id, sequence, event_type, event_version, event_id, recorded_at, hash, payload) in
        &stored
    {
        let message = by_id[event_id.to_string().as_str()];
        let headers = &message["headers"];
        assert_eq!(message["key"], aggregate_id.as_str());
        assert_eq!(headers["ce_specversion"], "1.0");
        assert_eq!(headers["ce_source"], "/ledger/account");
        assert_eq!(
            headers["ce_type"],
            format!("ledger.account.{event_type}.v{event_version}").as_str()
        );
        assert_eq!(headers["ce_subject"], aggregate_id.as_str());
        assert_eq!(headers["ce_sequence"], sequence.to_string().as_str());
        assert_eq!(headers["ce_tenant"], TENANT);
        assert_eq!(headers["ce_hash"], hex::encode(hash).as_str());
        assert_eq!(headers["content-type"], "application/json");
        assert!(
            headers["ce_correlationid"]
                .as_str()
                .is_some_and(|c| !c.is_empty())
        );
        let time: DateTime<Utc> = headers["ce_time"].as_str().unwrap().parse().unwrap();
        assert_eq!(time.timestamp_micros(), recorded_at.timestamp_micros());
        // The value is the event's data, without the storage wrapper.
        let stored: Value = serde_json::from_str(payload).unwrap();
        let data = stored
            .get(event_type.as_str())
            .cloned()
            .unwrap_or(serde_json::json!({}));
        assert_eq!(message["value"], data);
    }
    // A stream's events are in one partition, in order.
    for account in [first, second] {
        let mut mine: Vec<&Value> = messages
            .iter()
            .filter(|m| m["key"] == account.to_string().as_str())
            .collect();
        mine.sort_by_key(|m| m["offset"].as_i64());
        let partitions: Vec<i64> = mine
            .iter()
            .map(|m| m["partition"].as_i64().unwrap())
            .collect();
        assert!(partitions.windows(2).all(|w| w[0] == w[1]));
        let sequences: Vec<i64> = mine
            .iter()
            .map(|m| {
                m["headers"]["ce_sequence"]
                    .as_str()
                    .unwrap()
                    .parse()
                    .unwrap()
            })
            .collect();
        assert!(sequences.windows(2).all(|w| w[0] < w[1]), "{sequences:?}");
    }
}
