use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use futures::StreamExt;
use projector::model::{AccountRow, EntryRow};
use projector::store::{self, Tables};
use rdkafka::Message;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::message::{Header, Headers, OwnedHeaders, OwnedMessage};
use rdkafka::producer::{FutureProducer, FutureRecord};
use reqwest::StatusCode;
use serde_json::json;
use service_kit::event_log::LogPosition;
use service_kit::kafka::{KafkaConfig, header, headers};

use crate::system::{System, TENANT, token};

/// Every message now on `topic`, read by a fresh consumer group.
pub(crate) async fn read_all(
    kafka: &KafkaConfig,
    topic: &str,
    at_least: usize,
) -> Vec<OwnedMessage> {
    let messages = read_until(kafka, topic, |messages| messages.len() >= at_least).await;
    assert!(
        messages.len() >= at_least,
        "only {} of {at_least} messages on {topic}",
        messages.len()
    );
    messages
}

/// The messages on `topic` read by a fresh consumer group until `enough` says so, or what
/// 30 s gave. A group may be handed a partition again while it reads (nisshi rebalances a
/// new group), so what it reads can repeat messages.
async fn read_until(
    kafka: &KafkaConfig,
    topic: &str,
    mut enough: impl FnMut(&[OwnedMessage]) -> bool,
) -> Vec<OwnedMessage> {
    let consumer: StreamConsumer = kafka
        .consumer(&format!("reader-{}", uuid::Uuid::new_v4()))
        .create()
        .unwrap();
    consumer.subscribe(&[topic]).unwrap();
    let mut messages = Vec::new();
    let mut stream = consumer.stream();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while !enough(&messages) {
        match tokio::time::timeout_at(deadline, stream.next()).await {
            Ok(Some(Ok(message))) => messages.push(message.detach()),
            Ok(Some(Err(err))) => panic!("consumer error: {err}"),
            Ok(None) | Err(_) => break,
        }
    }
    messages
}

/// The relay and the projector are each killed three times while they have work in hand
/// (each kill checks it: events committed before it and not yet published, messages published
/// before it and not yet applied), under a steady load; nothing is lost.
#[tokio::test]
async fn killing_the_relay_and_the_projector_mid_stream_loses_nothing() {
    let mut system = System::start().await;
    let mut accounts = Vec::new();
    for _ in 0..8 {
        accounts.push(system.open(0).await);
    }
    let (done, load) = deposits_until_done(&system, accounts, true);
    for _ in 0..3 {
        let unpublished = system.kill_relay_mid_stream().await;
        system.start_relay().await;
        let unapplied = system.kill_projector_mid_stream().await;
        system.start_projector().await;
        eprintln!(
            "killed the relay with {unpublished} events to publish, the projector with {unapplied} to apply"
        );
    }
    done.store(true, Ordering::Relaxed);
    let sent = load.await.unwrap();
    let deposits: i64 =
        sqlx::query_scalar("SELECT count(*) FROM events WHERE event_type = 'MoneyDeposited'")
            .fetch_one(&system.pool)
            .await
            .unwrap();
    assert_eq!(deposits, sent);
    system.converged(Duration::from_secs(60)).await;
    // The read models alone would not show a message the relay lost: the projector heals a
    // gap from the event store when the stream's next message comes.
    every_account_event_on_the_topic(&system).await;
}

/// Asserts that every stored account event is on the topic, some perhaps twice (a relay's
/// unconfirmed batch is sent again by the next term), and returns the topic's messages.
async fn every_account_event_on_the_topic(system: &System) -> Vec<OwnedMessage> {
    let events: i64 =
        sqlx::query_scalar("SELECT count(*) FROM events WHERE aggregate_type = 'account'")
            .fetch_one(&system.pool)
            .await
            .unwrap();
    let topic = system.kafka.events_topic("account");
    let on_topic = on_topic(&system.kafka, &topic).await;
    assert!(
        on_topic >= events,
        "{on_topic} messages for {events} events"
    );
    let key = |message: &OwnedMessage| {
        let headers = message.headers().unwrap();
        (
            header(headers, headers::SUBJECT).unwrap().to_owned(),
            header(headers, headers::SEQUENCE).unwrap().to_owned(),
        )
    };
    let distinct = |messages: &[OwnedMessage]| {
        messages
            .iter()
            .map(key)
            .collect::<std::collections::HashSet<_>>()
    };
    // Read until every event was seen once, not until as many messages came: repeats (of a
    // batch sent again, or of a partition read again) must not stand in for missing ones.
    let published = read_until(&system.kafka, &topic, |messages| {
        distinct(messages).len() as i64 >= events
    })
    .await;
    let seen = distinct(&published);
    let stored: Vec<(String, i64)> = sqlx::query_as(
        "SELECT aggregate_id, sequence FROM events WHERE aggregate_type = 'account'
          ORDER BY aggregate_id, sequence",
    )
    .fetch_all(&system.pool)
    .await
    .unwrap();
    let missing: Vec<&(String, i64)> = stored
        .iter()
        .filter(|(id, sequence)| !seen.contains(&(id.clone(), sequence.to_string())))
        .collect();
    assert!(
        missing.is_empty(),
        "{} of {events} events missing from the topic ({} messages read): {missing:?}",
        missing.len(),
        published.len()
    );
    published
}

/// Deposits into `accounts` until the flag is set (in parallel across the accounts, or one
/// after the other), asserting each is accepted; the task returns how many it made.
fn deposits_until_done(
    system: &System,
    accounts: Vec<uuid::Uuid>,
    parallel: bool,
) -> (Arc<AtomicBool>, tokio::task::JoinHandle<i64>) {
    let base = system.commands.clone();
    let client = system.client.clone();
    let done = Arc::new(AtomicBool::new(false));
    let load = tokio::spawn({
        let done = done.clone();
        async move {
            let teller = token(TENANT, &["teller"]);
            let deposit = |account: uuid::Uuid, amount: i64| {
                client
                    .post(format!("{base}/v1/accounts/{account}/deposits"))
                    .bearer_auth(&teller)
                    .json(&json!({"amount": amount, "currency": "EUR"}))
                    .send()
            };
            let mut sent = 0;
            let mut round = 0;
            while !done.load(Ordering::Relaxed) {
                round += 1;
                let responses = if parallel {
                    futures::future::join_all(accounts.iter().map(|a| deposit(*a, round))).await
                } else {
                    let mut responses = Vec::new();
                    for account in &accounts {
                        responses.push(deposit(*account, round).await);
                    }
                    responses
                };
                for response in responses {
                    assert!(response.unwrap().status().is_success());
                    sent += 1;
                }
            }
            sent
        }
    });
    (done, load)
}

#[tokio::test]
async fn redelivered_messages_change_nothing() {
    let system = System::start().await;
    let account = system.open(0).await;
    for amount in [10, 20, 30] {
        system.move_money(account, amount).await;
    }
    system.account_at(account, 4).await;
    let topic = system.kafka.events_topic("account");
    let messages = read_all(&system.kafka, &topic, 4).await;

    let producer: FutureProducer = system.kafka.producer().create().unwrap();
    for message in &messages {
        let mut record = FutureRecord::to(&topic)
            .key(message.key().unwrap())
            .payload(message.payload().unwrap());
        if let Some(headers) = message.headers() {
            record = record.headers(headers.clone());
        }
        producer
            .send(record, Duration::from_secs(10))
            .await
            .unwrap();
    }
    // Same key, same partition: once this one is applied, the duplicates before it were seen.
    let version = system.move_money(account, 1).await;
    let view = system.account_at(account, version).await;
    assert_eq!(view["balance"], 61);
    let (_, _, entries) = system
        .query(&format!("/v1/accounts/{account}/entries"), &system.viewer())
        .await;
    assert_eq!(entries["items"].as_array().unwrap().len(), 4);
    assert!(system.differences().await.is_empty());
}

/// The projector reads rows without locking them, so two projectors that overlap during a
/// rebalance may both write an account: a write folded from an older row must neither move the
/// row back nor replace an entry.
#[tokio::test]
async fn a_write_folded_from_an_older_row_changes_nothing() {
    let system = System::start().await;
    let account = system.open(0).await;
    for amount in [10, 20, 30] {
        system.move_money(account, amount).await;
    }
    system.projected(account, 4).await;
    let mut connection = system.pool.acquire().await.unwrap();
    let (rows, parked) = store::live_state(&mut connection, &[account], false)
        .await
        .unwrap();
    assert!(parked.is_empty());
    let newest = rows[&account].clone();
    assert_eq!((newest.version, newest.balance), (4, 60));
    let older = AccountRow {
        version: 2,
        balance: 999,
        ..newest.clone()
    };
    let stale_entry = EntryRow {
        account_id: account,
        version: 2,
        tenant: newest.tenant.clone(),
        kind: "deposit",
        amount: 999,
        currency: newest.currency.clone(),
        balance_after: 999,
        event_id: uuid::Uuid::now_v7(),
        recorded_at: newest.updated_at,
        transfer_id: None,
    };
    store::save(&mut connection, Tables::LIVE, &[&older], &[stale_entry])
        .await
        .unwrap();

    let (rows, _) = store::live_state(&mut connection, &[account], false)
        .await
        .unwrap();
    assert_eq!(rows[&account], newest);
    let entry: (i64, i64) = sqlx::query_as(
        "SELECT amount, balance_after FROM account_entries WHERE account_id = $1 AND version = 2",
    )
    .bind(account)
    .fetch_one(&system.pool)
    .await
    .unwrap();
    assert_eq!(entry, (10, 10));
    assert!(system.differences().await.is_empty());
}

#[tokio::test]
async fn poison_messages_are_dead_lettered_and_the_partition_moves_on() {
    let system = System::start().await;
    let account = system.open(0).await;
    system.account_at(account, 1).await;
    let topic = system.kafka.events_topic("account");
    let producer: FutureProducer = system.kafka.producer().create().unwrap();
    let key = account.to_string();

    // Not JSON, no CloudEvents headers.
    producer
        .send(
            FutureRecord::to(&topic)
                .key(&key)
                .payload("not json at all"),
            Duration::from_secs(10),
        )
        .await
        .unwrap();
    // Well-formed, but version 9 of a stream the event store knows only to version 1.
    let mut forged = OwnedHeaders::new();
    for (name, value) in [
        (headers::SPECVERSION, "1.0"),
        (headers::ID, "7d0f1a52-7c4b-4d6b-9a1e-2f3c4d5e6f70"),
        (headers::TYPE, "ledger.account.MoneyDeposited.v1"),
        (headers::SUBJECT, key.as_str()),
        (headers::TIME, "2026-01-01T00:00:00Z"),
        (headers::SEQUENCE, "9"),
        (headers::TENANT, TENANT),
    ] {
        forged = forged.insert(Header {
            key: name,
            value: Some(value),
        });
    }
    producer
        .send(
            FutureRecord::to(&topic)
                .key(&key)
                .payload(r#"{"amount":1000000,"currency":"EUR","balance_after":1000000}"#)
                .headers(forged),
            Duration::from_secs(10),
        )
        .await
        .unwrap();

    // The next good event on the same partition is applied.
    let version = system.move_money(account, 5).await;
    assert_eq!(system.account_at(account, version).await["balance"], 5);

    let dead = read_all(&system.kafka, &system.kafka.deadletter_topic(), 2).await;
    let reasons: Vec<&str> = dead
        .iter()
        .map(|m| header(m.headers().unwrap(), headers::ERROR).unwrap())
        .collect();
    assert!(reasons[0].contains("header"), "{reasons:?}");
    assert!(reasons[1].contains("not in the event store"), "{reasons:?}");
    for message in &dead {
        assert_eq!(message.key(), Some(key.as_bytes()));
        assert_eq!(
            header(message.headers().unwrap(), headers::ORIGINAL_TOPIC),
            Some(topic.as_str())
        );
    }
    assert_eq!(dead[0].payload(), Some(&b"not json at all"[..]));
    assert!(system.differences().await.is_empty());
}

#[tokio::test]
async fn one_relay_leads_and_another_takes_over_when_it_dies() {
    let mut system = System::start().await;
    let account = system.open(0).await;
    // The first relay has published, so it leads; the standby starts after it.
    system.account_at(account, 1).await;
    let leader = system.leader_pid().await.expect("a leader");
    let since = system.database_now().await;
    let standby = system.spawn_relay();
    // The standby asked for the lock and was refused: still one leader, the same.
    let refused = system.refused_standby(since).await;
    assert_ne!(refused, leader);
    assert_eq!(
        system.leaders().await,
        1,
        "exactly one relay holds the leadership lock"
    );
    assert_eq!(system.leader_pid().await, Some(leader));

    system.kill_relay().await;
    let version = system.move_money(account, 9).await;
    // The standby's next try (every 200 ms here) finds the lock free.
    assert_eq!(system.account_at(account, version).await["balance"], 9);
    standby.abort();
}

/// The leader's lock connection is cut by the server (as when its host vanished and the
/// keepalives gave up, or an operator terminated it) while it has events to publish: the
/// standby leads within the bound, the old leader stops at its next batch, and every event
/// arrives.
#[tokio::test]
async fn a_leader_whose_lock_connection_is_cut_mid_stream_hands_over_and_loses_nothing() {
    let system = System::start().await;
    let mut accounts = Vec::new();
    for _ in 0..4 {
        accounts.push(system.open(0).await);
    }
    system.account_at(accounts[3], 1).await;
    let standby = system.spawn_relay();
    let (done, load) = deposits_until_done(&system, accounts, false);

    // The cut hits while the leader has events to publish, and that is checked: once the
    // server ended the session (only that session moves the checkpoint), events committed
    // before the cut are still not under the checkpoint.
    let mut cut = None;
    for _ in 0..10 {
        let leader = system.leader_other_than(None).await;
        let head = system.relay_backlog().await;
        let terminated: bool = sqlx::query_scalar("SELECT pg_terminate_backend($1, 5000)")
            .bind(leader)
            .fetch_one(&system.pool)
            .await
            .unwrap();
        assert!(terminated);
        if system.unpublished_up_to(&head).await > 0 {
            cut = Some(leader);
            break;
        }
        // The other relay took over and published them before the look: cut it in turn.
    }
    let first = cut.expect("every cut came after the leader had published all it had");
    let second = system.leader_other_than(Some(first)).await;
    done.store(true, Ordering::Relaxed);
    load.await.unwrap();
    system.converged(Duration::from_secs(60)).await;
    // Every event reached the topic, some perhaps twice (the old leader's unconfirmed batch).
    let published = every_account_event_on_the_topic(&system).await;
    assert_per_key_order(&published);
    // Leadership stays with one session: the relay that was cut is back, asks for the lock,
    // and is refused.
    let since = system.database_now().await;
    let refused = system.refused_standby(since).await;
    assert_ne!(refused, second);
    assert_eq!(system.leaders().await, 1);
    assert_eq!(system.leader_pid().await, Some(second));
    standby.abort();
}

/// A broker of this test's own, storing in Postgres so that a restart keeps what it
/// acknowledged, killed with SIGKILL and restarted on the same port.
struct OwnBroker {
    binary: std::path::PathBuf,
    address: String,
    storage: String,
    process: Option<tokio::process::Child>,
}

impl OwnBroker {
    async fn start() -> Self {
        let binary = service_kit::testing::nisshi_binary().expect(
            "this test needs the nisshi broker binary: run `cargo xtask test`, which installs it",
        );
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let mut broker = Self {
            binary,
            address: format!("127.0.0.1:{port}"),
            storage: format!(
                "{}?sslmode=disable",
                service_kit::testing::empty_database_url().await
            ),
            process: None,
        };
        broker.restart().await;
        broker
    }

    async fn restart(&mut self) {
        let url = format!("tcp://{}", self.address);
        self.process = Some(
            tokio::process::Command::new(&self.binary)
                .args([
                    "broker",
                    "--listener-url",
                    &url,
                    "--advertised-listener-url",
                    &url,
                ])
                .args(["--storage-engine", &self.storage])
                .env("RUST_LOG", "warn")
                .stdout(std::process::Stdio::null())
                .kill_on_drop(true)
                .spawn()
                .expect("start nisshi"),
        );
        let address = &self.address;
        test_system::eventually(Duration::from_secs(10), || async move {
            tokio::net::TcpStream::connect(address)
                .await
                .map_err(|err| format!("nisshi did not start on {address}: {err}"))
        })
        .await;
    }

    async fn kill(&mut self) {
        if let Some(mut process) = self.process.take() {
            process.kill().await.unwrap();
        }
    }

    /// Sends `signal` (`STOP` freezes the broker: it neither answers nor closes a connection;
    /// `CONT` thaws it).
    async fn signal(&self, signal: &str) {
        let pid = self
            .process
            .as_ref()
            .and_then(tokio::process::Child::id)
            .expect("the broker runs");
        let status = tokio::process::Command::new("kill")
            .args([format!("-{signal}"), pid.to_string()])
            .status()
            .await
            .unwrap();
        assert!(status.success(), "kill -{signal} {pid}: {status}");
    }
}

/// While a batch the relay sent is unacknowledged, appends do not each become a batch of
/// their own: with the broker frozen under the first deposit's batch, nine more deposits wait
/// and go out together once it answers. Each acknowledged batch moves the checkpoint once, so
/// the checkpoint's moves count the batches: two (the first deposit's, then the other nine's),
/// where a relay that reads on every append had sent four batches by the time it filled its
/// window.
#[tokio::test]
async fn appends_made_while_a_batch_is_unacknowledged_go_out_as_one_batch() {
    let broker = OwnBroker::start().await;
    let mut system = System::start_with(
        Duration::from_secs(30),
        KafkaConfig {
            topic_prefix: "batching".into(),
            partitions: 2,
            ..KafkaConfig::with_brokers(&broker.address)
        },
    )
    .await;
    let account = system.open(0).await;
    system.published().await;
    sqlx::raw_sql(&format!(
        "CREATE TABLE checkpoint_moves (global_position bigint NOT NULL);
         CREATE FUNCTION record_checkpoint_move() RETURNS trigger
             LANGUAGE plpgsql SECURITY DEFINER AS
         $$ BEGIN INSERT INTO checkpoint_moves VALUES (NEW.global_position); RETURN NEW; END $$;
         CREATE TRIGGER record_checkpoint_move AFTER UPDATE ON log_checkpoints
             FOR EACH ROW WHEN (NEW.reader = '{}') EXECUTE FUNCTION record_checkpoint_move();",
        command_api::relay::READER
    ))
    .execute(&system.pool)
    .await
    .unwrap();

    let before: i64 = sqlx::query_scalar("SELECT count(*) FROM events")
        .fetch_one(&system.pool)
        .await
        .unwrap();
    broker.signal("STOP").await;
    for deposit in 1..=10 {
        system.move_money(account, 1).await;
        // Readable to the relay (another test's open transaction can hide it for a while), and
        // time for a relay that reads on every append to read it on its own.
        service_kit::testing::readable_events(
            &system.pool,
            LogPosition::START,
            (before + deposit) as usize,
            Duration::from_secs(30),
        )
        .await;
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    broker.signal("CONT").await;
    system.published().await;

    let moves: Vec<i64> =
        sqlx::query_scalar("SELECT global_position FROM checkpoint_moves ORDER BY global_position")
            .fetch_all(&system.pool)
            .await
            .unwrap();
    let head: i64 = sqlx::query_scalar("SELECT max(global_position) FROM events")
        .fetch_one(&system.pool)
        .await
        .unwrap();
    assert!(
        moves.len() == 2 && moves[1] == head,
        "the checkpoint moved to {moves:?} (the log's head is {head})"
    );
    assert_eq!(system.account_at(account, 11).await["balance"], 10);
    // Kafka clients leave their group on drop, which needs the broker: stop them first.
    system.kill_relay().await;
    system.kill_projector().await;
    system.kill_process_manager().await;
    drop(broker);
}

#[tokio::test]
async fn a_broker_outage_delays_events_but_loses_none() {
    let mut broker = OwnBroker::start().await;
    let mut system = System::start_with(
        Duration::from_secs(30),
        KafkaConfig {
            topic_prefix: "outage".into(),
            partitions: 2,
            ..KafkaConfig::with_brokers(&broker.address)
        },
    )
    .await;
    let account = system.open(0).await;
    system.move_money(account, 1).await;
    system.account_at(account, 2).await;

    let ready = format!("{}/health/ready", system.projector_ops);
    assert_eq!(readiness(&system, &ready).await, StatusCode::OK);

    broker.kill().await;
    // Commands do not depend on the broker: they are accepted and stored meanwhile.
    for _ in 0..10 {
        system.move_money(account, 1).await;
    }
    // The projector cannot work without the broker, and says so.
    eventually(&system, &ready, StatusCode::SERVICE_UNAVAILABLE).await;
    broker.restart().await;
    eventually(&system, &ready, StatusCode::OK).await;

    assert_eq!(system.account_at(account, 12).await["balance"], 11);
    system.converged(Duration::from_secs(30)).await;
    let metrics = system.projector_metrics().await;
    assert!(
        metrics
            .lines()
            .any(|line| line.starts_with("ledger_projector_applied_total")
                && line.contains("outage.account.events")),
        "{metrics}"
    );
    // Nothing timed out and was resent behind later events of its key.
    let topic = system.kafka.events_topic("account");
    let published = read_all(
        &system.kafka,
        &topic,
        on_topic(&system.kafka, &topic).await as usize,
    )
    .await;
    assert_per_key_order(&published);
    // Kafka clients leave their group on drop, which needs the broker: stop them first.
    system.kill_relay().await;
    system.kill_projector().await;
    drop(broker);
}

/// Messages now on `topic`, over all its partitions.
async fn on_topic(kafka: &KafkaConfig, topic: &str) -> i64 {
    let consumer: rdkafka::consumer::BaseConsumer = kafka.consumer("watermarks").create().unwrap();
    (0..kafka.partitions)
        .map(|partition| {
            let (low, high) = consumer
                .fetch_watermarks(topic, partition, Duration::from_secs(10))
                .unwrap();
            high - low
        })
        .sum()
}

/// Per key, in the order read: no event arrives before its predecessor first did (repeats
/// of earlier events, at-least-once, are fine).
fn assert_per_key_order(messages: &[OwnedMessage]) {
    let mut highest: std::collections::HashMap<String, i64> = std::collections::HashMap::new();
    for message in messages {
        let headers = message.headers().unwrap();
        let key = header(headers, headers::SUBJECT).unwrap().to_owned();
        let sequence: i64 = header(headers, headers::SEQUENCE).unwrap().parse().unwrap();
        let seen = highest.entry(key.clone()).or_default();
        assert!(
            sequence <= *seen + 1,
            "{key}: event {sequence} arrived before event {}",
            *seen + 1
        );
        *seen = (*seen).max(sequence);
    }
}

async fn readiness(system: &System, url: &str) -> StatusCode {
    system.client.get(url).send().await.unwrap().status()
}

/// Waits (at most 20 s) until the probe at `url` answers `expected`.
async fn eventually(system: &System, url: &str, expected: StatusCode) {
    test_system::eventually(Duration::from_secs(20), || async {
        match readiness(system, url).await {
            status if status == expected => Ok(()),
            status => Err(format!("{url} answered {status}, not {expected}")),
        }
    })
    .await;
}

/// Anyone who can produce to the topic can copy a genuine message's headers. The projector
/// applies nothing a message says that the event store does not hold, byte for byte.
#[tokio::test]
async fn forged_messages_never_reach_a_read_model() {
    let system = System::start().await;
    let account = system.open(0).await;
    system.move_money(account, 100).await;
    system.account_at(account, 2).await;
    let topic = system.kafka.events_topic("account");
    let key = account.to_string();
    let genuine = read_all(&system.kafka, &topic, 2)
        .await
        .into_iter()
        .find(|message| {
            let headers = message.headers().unwrap();
            header(headers, headers::SUBJECT) == Some(key.as_str())
                && header(headers, headers::SEQUENCE) == Some("2")
        })
        .expect("the deposit's message");
    let inflated = r#"{"amount":1000000000000,"currency":"EUR","balance_after":1000000000000}"#;
    let producer: FutureProducer = system.kafka.producer().create().unwrap();
    // The genuine headers with a bigger amount.
    producer
        .send(
            FutureRecord::to(&topic)
                .key(&key)
                .payload(inflated)
                .headers(genuine.headers().unwrap().clone()),
            Duration::from_secs(10),
        )
        .await
        .unwrap();
    // The same, announcing the next version before the genuine one exists.
    let mut next = OwnedHeaders::new();
    let forged_id = uuid::Uuid::new_v4().to_string();
    for copied in genuine.headers().unwrap().iter() {
        let value = match copied.key {
            headers::SEQUENCE => Some("3".as_bytes()),
            headers::ID => Some(forged_id.as_bytes()),
            _ => copied.value,
        };
        next = next.insert(Header {
            key: copied.key,
            value,
        });
    }
    producer
        .send(
            FutureRecord::to(&topic)
                .key(&key)
                .payload(inflated)
                .headers(next),
            Duration::from_secs(10),
        )
        .await
        .unwrap();

    // The genuine next deposit is applied; the balance is the event store's.
    let version = system.move_money(account, 50).await;
    assert_eq!(version, 3);
    assert_eq!(system.account_at(account, version).await["balance"], 150);
    let (_, _, entries) = system
        .query(&format!("/v1/accounts/{account}/entries"), &system.viewer())
        .await;
    let amounts: Vec<i64> = entries["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|entry| entry["amount"].as_i64().unwrap())
        .collect();
    assert_eq!(amounts.len(), 2, "{entries}");
    assert!(
        amounts.iter().all(|amount| [100, 50].contains(amount)),
        "{entries}"
    );
    assert!(system.differences().await.is_empty());

    let dead = read_all(&system.kafka, &system.kafka.deadletter_topic(), 2).await;
    for message in &dead {
        let reason = header(message.headers().unwrap(), headers::ERROR).unwrap();
        assert!(
            reason.contains("differs from the stored event")
                || reason.contains("not in the event store"),
            "{reason}"
        );
        assert_eq!(message.payload(), Some(inflated.as_bytes()));
    }
    let metrics = system.projector_metrics().await;
    let unverified: f64 = metrics
        .lines()
        .find(|line| line.starts_with("ledger_projector_unverified_total"))
        .and_then(|line| line.rsplit(' ').next())
        .and_then(|value| value.parse().ok())
        .expect("ledger_projector_unverified_total");
    assert!(unverified >= 2.0, "{unverified}");
}

/// A stored event this build cannot read (a version from a later release) stops its own
/// stream only: it is parked, visible in readiness, and every other account keeps projecting.
#[tokio::test]
async fn an_unreadable_stored_event_parks_its_stream_and_no_other() {
    let system = System::start().await;
    let stuck = system.open(0).await;
    let other = system.open(0).await;
    system.account_at(stuck, 1).await;
    system.account_at(other, 1).await;
    for (sequence, version) in [(2, "99"), (3, "1")] {
        sqlx::query(
            r#"INSERT INTO events (aggregate_type, aggregate_id, sequence, event_type, event_version, payload, metadata)
               VALUES ('account', $1, $2, 'MoneyDeposited', $3,
                       '{"MoneyDeposited":{"amount":70,"currency":"EUR","balance_after":70}}',
                       json_build_object('tenant', $4::text, 'actor', 'test', 'correlation_id', 'c', 'causation_id', 'c', 'request_id', 'r'))"#,
        )
        .bind(stuck.to_string())
        .bind(sequence)
        .bind(version)
        .bind(TENANT)
        .execute(&system.pool)
        .await
        .unwrap();
    }
    // The other accounts go on, on every partition.
    let mut others = vec![other];
    for _ in 0..5 {
        others.push(system.open(0).await);
    }
    for account in &others {
        let version = system.move_money(*account, 5).await;
        system.account_at(*account, version).await;
    }

    let parked: (i64, String) = test_system::eventually(Duration::from_secs(20), || async {
        sqlx::query_as(
            "SELECT sequence, reason FROM projector_parked_streams WHERE account_id = $1",
        )
        .bind(stuck)
        .fetch_optional(&system.pool)
        .await
        .unwrap()
        .ok_or("the stream was never parked")
    })
    .await;
    assert_eq!(parked.0, 2);
    assert!(parked.1.contains("99"), "{}", parked.1);
    let version: i64 = sqlx::query_scalar("SELECT version FROM accounts WHERE id = $1")
        .bind(stuck)
        .fetch_one(&system.pool)
        .await
        .unwrap();
    assert_eq!(version, 1);

    let ready = format!("{}/health/ready", system.projector_ops);
    let body = test_system::eventually(Duration::from_secs(5), || async {
        let body: serde_json::Value = system
            .client
            .get(&ready)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        if body["parked_streams"] == 1 {
            Ok(body)
        } else {
            Err(format!(
                "readiness never reported the parked stream: {body}"
            ))
        }
    })
    .await;
    assert_eq!(body["status"], "degraded");
}

/// A foreign producer's message too big to copy whole to the dead-letter topic is
/// dead-lettered as a stub naming its size, instead of blocking the partition forever.
#[tokio::test]
async fn an_oversized_foreign_message_is_dead_lettered_as_a_stub() {
    let system = System::start().await;
    let account = system.open(0).await;
    system.account_at(account, 1).await;
    let topic = system.kafka.events_topic("account");
    let producer: FutureProducer = system.kafka.producer().create().unwrap();
    let key = account.to_string();
    let huge = "x".repeat(600_000);
    producer
        .send(
            FutureRecord::to(&topic).key(&key).payload(&huge),
            Duration::from_secs(10),
        )
        .await
        .unwrap();
    let version = system.move_money(account, 5).await;
    assert_eq!(system.account_at(account, version).await["balance"], 5);
    let dead = read_all(&system.kafka, &system.kafka.deadletter_topic(), 1).await;
    let headers = dead[0].headers().unwrap();
    let size = key.len() + huge.len();
    assert_eq!(
        header(headers, headers::TRUNCATED),
        Some(size.to_string().as_str())
    );
    assert_eq!(
        header(headers, headers::ORIGINAL_TOPIC),
        Some(topic.as_str())
    );
    assert!(dead[0].payload().is_none_or(<[u8]>::is_empty));
}
