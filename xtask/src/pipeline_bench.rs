//! `cargo xtask bench pipeline`: relay, projector and rebuild throughput over a large event
//! store, and end-to-end latency (command answered → visible in the query API) at a steady
//! command rate. Writes its section of `BENCHMARKS.md`.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use anyhow::{Context, bail};
use command_api::AppendSignal;
use command_api::relay::{Relay, RelayConfig};
use futures::StreamExt;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::message::{Message, Timestamp};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{Offset, TopicPartitionList};
use serde_json::json;
use service_kit::db::channels::{READ_MODELS_CHANGED, ReadModel, ReadModelChange};
use service_kit::db::{self, DatabaseConfig};
use service_kit::kafka::{self, KafkaConfig};
use sqlx::PgPool;
use sqlx::postgres::PgListener;
use uuid::Uuid;

use crate::bench::{SECRET, machine, percentile_ms, reset_database, service_token, write_section};
use crate::broker;
use crate::cpu;
use crate::launch::{self, Launch, Profile, Service, free_address};

pub(crate) const SEED_ACCOUNTS: i64 = 1000;

/// `cargo xtask bench pipeline`
#[derive(clap::Args)]
pub(crate) struct Options {
    /// Events in the store the relay, the projector and the rebuild run over.
    #[arg(long, default_value_t = 1_000_000)]
    events: i64,
    /// Commands per second for the end-to-end latency.
    #[arg(long, default_value_t = 500)]
    rate: u64,
    /// How long the end-to-end latency is measured.
    #[arg(long, default_value_t = 20)]
    seconds: u64,
}

pub(crate) async fn run(options: &Options) -> anyhow::Result<()> {
    let Options {
        events,
        rate,
        seconds,
    } = *options;
    let server = std::env::var("DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/ledger_bench_pipeline".into());
    let database = DatabaseConfig::with_url(&server);
    reset_database(&database).await?;
    let pool = db::connect(&database).await?;
    let broker = broker::start(broker::Storage::Memory).await?;
    let kafka = broker.kafka();

    println!("seeding {events} events...");
    let seeded = Instant::now();
    seed(&pool, events).await?;
    let seed_rate = events as f64 / seeded.elapsed().as_secs_f64();

    println!("relaying...");
    let relay_rate = relay(&pool, &kafka).await?;
    println!("projecting...");
    let projector_rate = project(&database, &kafka).await?;
    println!("rebuilding...");
    let report = projector::rebuild::rebuild(&pool, true).await?;
    let rebuild_rate = report.events as f64 / report.elapsed.as_secs_f64();
    pool.close().await;

    println!("timing the broker's answers to waiting fetches...");
    let mut fetch_delays = Vec::new();
    for wait_ms in [FETCH_WAIT_PROBED, kafka.fetch_wait_ms] {
        fetch_delays.push(fetch_delay(&kafka, wait_ms).await?);
    }

    println!("end-to-end latency at {rate} commands/s for {seconds} s...");
    let broker_pid = broker.pid().context("the broker's pid")?;
    let latency = end_to_end(&database, &kafka, broker_pid, rate, seconds).await?;
    drop(broker);

    let mut out = String::new();
    writeln!(out, "## Pipeline: relay, projector, rebuild, end to end\n")?;
    writeln!(
        out,
        "{}; broker nisshi 0.8.1 (memory storage) on the same machine. `cargo xtask bench pipeline \
         --events {events}`: the event store is seeded with {events} deposits over {SEED_ACCOUNTS} accounts \
         ({seed_rate:.0} events/s through the hash-chain trigger). The relay and the projector run from an \
         empty checkpoint and an empty read model; rates are events over wall time until caught up \
         (for the projector, from its first applied event, after joining its consumer group). \
         End to end: command-api (with its relay), projector and query-api as release processes; each \
         command's latency is from its response to the query API answering it with `min_version`.\n",
        machine().await
    )?;
    writeln!(out, "| stage | result | target |")?;
    writeln!(out, "|---|---:|---:|")?;
    writeln!(
        out,
        "| relay: event store → broker ack | {relay_rate:.0} events/s | ≥ 20,000 |"
    )?;
    writeln!(
        out,
        "| projector: broker → read models committed | {projector_rate:.0} events/s | ≥ 10,000 |"
    )?;
    writeln!(
        out,
        "| rebuild: event store → fresh tables, swapped in | {rebuild_rate:.0} events/s | ≥ 50,000 |"
    )?;
    writeln!(
        out,
        "| end to end at {rate} commands/s ({} commands, {} failed) | p50 {:.1} ms, p99 {:.1} ms | p99 ≤ 250 ms |",
        latency.samples.len(),
        latency.failed,
        percentile_ms(&latency.samples, 0.50),
        percentile_ms(&latency.samples, 0.99),
    )?;
    writeln!(
        out,
        "\nWhere the end-to-end time goes: {} of the {} answered commands traced through every \
         milestone. Each milestone is read on this machine's clock: the client's response, the \
         Kafka message's create time (set when the relay hands the event to its producer), its \
         receipt by a consumer reading the account topic with the projector's settings (in the \
         bench process, its own group), the projector's `ledger_projected` notification of the \
         version's commit (the one the query API waits for), and the query API's answer. A \
         stage's p50s do not add up to the total's: each percentile is of its own stage.\n",
        latency.traced,
        latency.samples.len(),
    )?;
    writeln!(out, "| stage | p50 ms | p99 ms |")?;
    writeln!(out, "|---|---:|---:|")?;
    for stage in &latency.stages {
        writeln!(
            out,
            "| {} | {:.1} | {:.1} |",
            stage.name,
            percentile_ms(&stage.samples, 0.50),
            percentile_ms(&stage.samples, 0.99),
        )?;
    }
    let spent = &latency.cpu;
    writeln!(
        out,
        "\nCPU while the commands ran ({:.1} s), in cores of the machine's {} and per command \
         answered: the processes the stages above wait on share the machine with each other \
         and with the bench (its client, the topic probe, the notification listener: the \
         rest).\n",
        spent.processes.elapsed.as_secs_f64(),
        std::thread::available_parallelism().map_or(0, usize::from),
    )?;
    writeln!(out, "| process | cores | µs per command |")?;
    writeln!(out, "|---|---:|---:|")?;
    let commands = latency.samples.len();
    for (name, ticks) in spent.rows() {
        writeln!(
            out,
            "| {name} | {:.2} | {:.0} |",
            spent.processes.cores(ticks),
            cpu::Ticks::micros_per_op(ticks, commands),
        )?;
    }
    writeln!(
        out,
        "\nThe broker's answer to a waiting fetch ({FETCH_PROBES} messages, one at a time, on an \
         idle broker): from the producer's ack to a consumer's receipt.\n"
    )?;
    writeln!(out, "| consumer `fetch.wait.max.ms` | p50 ms | max ms |")?;
    writeln!(out, "|---:|---:|---:|")?;
    for delay in &fetch_delays {
        writeln!(
            out,
            "| {} | {:.1} | {:.1} |",
            delay.wait_ms,
            percentile_ms(&delay.samples, 0.50),
            percentile_ms(&delay.samples, 1.0),
        )?;
    }
    println!("{out}");
    write_section("pipeline", &out)?;
    println!("written to BENCHMARKS.md");
    Ok(())
}

/// `events` deposits spread over [`SEED_ACCOUNTS`] accounts (plus their openings), appended
/// through the real table and trigger.
pub(crate) async fn seed(pool: &PgPool, events: i64) -> anyhow::Result<()> {
    sqlx::query(
        r#"INSERT INTO events (aggregate_type, aggregate_id, sequence, event_type, event_version, payload, metadata)
           SELECT 'account', md5('bench' || a)::uuid::text, 1, 'AccountOpened', '2',
                  '{"AccountOpened":{"tenant":"bench","owner":"Bench","currency":"EUR","overdraft_limit":0,"max_balance":100000000000000000}}',
                  '{"tenant":"bench","actor":"bench","correlation_id":"seed","causation_id":"seed","request_id":"seed"}'
             FROM generate_series(1, $1) AS a"#,
    )
    .bind(SEED_ACCOUNTS)
    .execute(pool)
    .await?;
    let per_account = (events - SEED_ACCOUNTS).max(0) / SEED_ACCOUNTS;
    let chunk = 50;
    let mut from = 2;
    while from <= per_account + 1 {
        let to = (from + chunk - 1).min(per_account + 1);
        sqlx::query(
            r#"INSERT INTO events (aggregate_type, aggregate_id, sequence, event_type, event_version, payload, metadata)
               SELECT 'account', md5('bench' || a)::uuid::text, s, 'MoneyDeposited', '1',
                      json_build_object('MoneyDeposited', json_build_object('amount', 100, 'currency', 'EUR', 'balance_after', 100 * (s - 1))),
                      '{"tenant":"bench","actor":"bench","correlation_id":"seed","causation_id":"seed","request_id":"seed"}'
                 FROM generate_series($1::int8, $2::int8) AS s, generate_series(1, $3) AS a
                ORDER BY s, a"#,
        )
        .bind(from)
        .bind(to)
        .bind(SEED_ACCOUNTS)
        .execute(pool)
        .await?;
        from = to + 1;
    }
    Ok(())
}

async fn total_events(pool: &PgPool) -> anyhow::Result<i64> {
    Ok(sqlx::query_scalar("SELECT count(*) FROM events")
        .fetch_one(pool)
        .await?)
}

/// Runs the relay until its checkpoint passed every event; events per second.
async fn relay(pool: &PgPool, kafka: &KafkaConfig) -> anyhow::Result<f64> {
    let total = total_events(pool).await?;
    let last: i64 = sqlx::query_scalar(
        "SELECT global_position FROM events ORDER BY tx_id DESC, global_position DESC LIMIT 1",
    )
    .fetch_one(pool)
    .await?;
    let relay = Relay::new(
        RelayConfig {
            kafka: kafka.clone(),
            batch_size: 5000,
            idle_poll: Duration::from_millis(100),
            leader_retry: Duration::from_millis(100),
        },
        pool.clone(),
        AppendSignal::default(),
    )?;
    let started = Instant::now();
    let task = tokio::spawn(relay.run(std::future::pending()));
    loop {
        let done: Option<i64> = sqlx::query_scalar(
            "SELECT global_position FROM log_checkpoints WHERE reader = 'kafka-relay'",
        )
        .fetch_optional(pool)
        .await?;
        if done == Some(last) {
            break;
        }
        if started.elapsed() > Duration::from_secs(1800) {
            bail!("the relay did not catch up within 30 minutes");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let rate = total as f64 / started.elapsed().as_secs_f64();
    task.abort();
    Ok(rate)
}

/// Runs the projector over the whole topic until the read model holds every event.
async fn project(database: &DatabaseConfig, kafka: &KafkaConfig) -> anyhow::Result<f64> {
    let pool = db::connect(database).await?;
    let total = total_events(&pool).await?;
    let projector = projector::Projector::build(projector::Config {
        database: database.clone(),
        kafka: kafka.clone(),
        group: "bench-projector".into(),
        listen: "127.0.0.1:0".parse()?,
        server: service_kit::server::ServerLimits::default(),
    })
    .await?;
    let task = tokio::spawn(projector.run_until_stopped(std::future::pending()));
    // Timed from the first applied event: joining the consumer group takes a few seconds
    // whatever the volume, and is not throughput.
    let mut started = None;
    loop {
        let applied: Option<i64> = sqlx::query_scalar("SELECT sum(version)::int8 FROM accounts")
            .fetch_one(&pool)
            .await?;
        if started.is_none() && applied.is_some() {
            started = Some(Instant::now());
        }
        if applied == Some(total) {
            break;
        }
        if started.is_some_and(|started| started.elapsed() > Duration::from_secs(1800)) {
            bail!("the projector did not catch up within 30 minutes");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let elapsed = started.map_or(Duration::ZERO, |started| started.elapsed());
    let rate = total as f64 / elapsed.as_secs_f64().max(0.001);
    task.abort();
    pool.close().await;
    Ok(rate)
}

/// A broker's answer to a consumer's fetch: how long after the producer's ack a consumer with
/// `fetch.wait.max.ms` = `wait_ms` receives a message, one message at a time. A broker that
/// answers a waiting fetch as soon as data arrives gives about the same for every `wait_ms`.
struct FetchDelay {
    wait_ms: u32,
    /// Sorted, microseconds.
    samples: Vec<u32>,
}

/// librdkafka's default `fetch.wait.max.ms`, probed beside ours.
const FETCH_WAIT_PROBED: u32 = 500;
/// Messages timed per [`FetchDelay`].
const FETCH_PROBES: usize = 20;

async fn fetch_delay(kafka: &KafkaConfig, wait_ms: u32) -> anyhow::Result<FetchDelay> {
    let kafka = KafkaConfig {
        fetch_wait_ms: wait_ms,
        ..kafka.clone()
    };
    // A fresh topic read from its beginning: no message can slip in before the consumer
    // knows where to start.
    let topic = format!("{}.fetch-probe-{wait_ms}", kafka.topic_prefix);
    kafka.ensure_topics(std::slice::from_ref(&topic)).await?;
    let consumer = assigned(
        &kafka,
        &format!("bench-fetch-probe-{wait_ms}"),
        &topic,
        Offset::Beginning,
    )?;
    let producer: FutureProducer = kafka.producer().create()?;
    let mut stream = consumer.stream();
    let mut samples = Vec::with_capacity(FETCH_PROBES);
    // The first message waits for the consumer's start (metadata, first fetch): not a sample.
    for n in 0..=FETCH_PROBES {
        let key = n.to_string();
        producer
            .send(
                FutureRecord::to(&topic).key(&key).payload(&key),
                Duration::from_secs(10),
            )
            .await
            .map_err(|(err, _)| err)?;
        let acked = Instant::now();
        loop {
            let message = tokio::time::timeout(Duration::from_secs(10), stream.next())
                .await
                .context("the fetch probe received nothing for 10 s")?
                .context("the fetch probe's stream ended")??;
            if message.key() == Some(key.as_bytes()) {
                break;
            }
        }
        if n > 0 {
            samples.push(acked.elapsed().as_micros() as u32);
        }
        // Varied pauses, so that messages arrive at every point of a waiting fetch.
        tokio::time::sleep(Duration::from_millis(7 + (n as u64 * 13) % 29)).await;
    }
    samples.sort_unstable();
    Ok(FetchDelay { wait_ms, samples })
}

struct Latency {
    samples: Vec<u32>,
    failed: usize,
    stages: Vec<Stage>,
    /// Commands whose every milestone was seen, of those answered.
    traced: usize,
    cpu: CpuSpent,
}

/// CPU spent while the commands ran: by the services and the broker (by name) and the
/// machine, and by Postgres.
struct CpuSpent {
    processes: cpu::Spent,
    postgres: u64,
}

impl CpuSpent {
    /// Each process, Postgres, the rest of the machine, and the machine as a whole.
    fn rows(&self) -> Vec<(String, u64)> {
        let mut rows = self.processes.processes.clone();
        rows.push(("Postgres".into(), self.postgres));
        let named: u64 = rows.iter().map(|(_, ticks)| ticks).sum();
        rows.push(("the rest".into(), self.processes.busy.saturating_sub(named)));
        rows.push(("the whole machine".into(), self.processes.busy));
        rows
    }
}

/// One stage of the way from a command's response to the query API's answer: each traced
/// command's time in it, sorted, microseconds (negative when the stage ended before it began
/// from the client's view: the relay may publish an event before its command's response
/// reaches the client).
struct Stage {
    name: &'static str,
    samples: Vec<i32>,
}

/// Microseconds since the epoch: the clock every milestone is read on (all the processes run
/// on this machine).
fn now_micros() -> i64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |since| since.as_micros() as i64)
}

/// A command that was answered, then found visible.
struct Trace {
    account: Uuid,
    version: i64,
    /// When its response arrived, and when the query API's answer did.
    answered: i64,
    visible: i64,
}

/// A consumer with the services' settings in `group`, reading every partition of `topic`
/// from `start`.
fn assigned(
    kafka: &KafkaConfig,
    group: &str,
    topic: &str,
    start: Offset,
) -> anyhow::Result<StreamConsumer> {
    let consumer: StreamConsumer = kafka.consumer(group).create()?;
    let mut partitions = TopicPartitionList::new();
    for partition in 0..kafka.partitions {
        partitions.add_partition_offset(topic, partition, start)?;
    }
    consumer.assign(&partitions)?;
    Ok(consumer)
}

/// Each event as a consumer with the services' settings saw it on its topic: when the relay
/// handed it to its producer (the message's create time, milliseconds precision) and when the
/// consumer received it; by stream and sequence.
pub(crate) type Sightings = Arc<Mutex<HashMap<(Uuid, i64), (Option<i64>, i64)>>>;

/// Watches `aggregate`'s topic from its current end, as the projector's and the process
/// manager's consumers would receive it (same settings, a group of its own), until aborted.
pub(crate) fn watch_topic(
    kafka: &KafkaConfig,
    aggregate: &'static str,
) -> anyhow::Result<(tokio::task::JoinHandle<anyhow::Result<()>>, Sightings)> {
    let probe = assigned(
        kafka,
        &format!("bench-{aggregate}-probe"),
        &kafka.events_topic(aggregate),
        Offset::End,
    )?;
    let sightings = Sightings::default();
    let recording = sightings.clone();
    let watching = tokio::spawn(async move {
        let mut stream = probe.stream();
        while let Some(message) = stream.next().await {
            let message = message?;
            let received = now_micros();
            let Ok(event) = kafka::decode(aggregate, message.headers(), message.payload()) else {
                continue;
            };
            let Ok(id) = event.aggregate_id.parse() else {
                continue;
            };
            let produced = match message.timestamp() {
                Timestamp::CreateTime(millis) => Some(millis * 1000),
                Timestamp::LogAppendTime(_) | Timestamp::NotAvailable => None,
            };
            recording
                .lock()
                .expect("sightings lock")
                .entry((id, event.sequence))
                .or_insert((produced, received));
        }
        Ok(())
    });
    Ok((watching, sightings))
}

/// The projector's commits as its notifications announce them: per account, each version
/// committed and when the notification arrived, in order of arrival.
type Commits = Arc<Mutex<HashMap<Uuid, Vec<(i64, i64)>>>>;

async fn watch_commits(mut listener: PgListener, commits: Commits) -> anyhow::Result<()> {
    loop {
        let notification = listener.recv().await?;
        let at = now_micros();
        let change: ReadModelChange = serde_json::from_str(notification.payload())?;
        if change.model == ReadModel::Account {
            commits
                .lock()
                .expect("commits lock")
                .entry(change.id)
                .or_default()
                .push((change.version, at));
        }
    }
}

/// Splits each trace at the milestones between its response and the query API's answer.
fn stages(traces: &[Trace], sightings: &Sightings, commits: &Commits) -> (Vec<Stage>, usize) {
    let sightings = sightings.lock().expect("sightings lock");
    let commits = commits.lock().expect("commits lock");
    let mut stages = [
        "relay: response → handed to the producer (message create time, ms precision)",
        "producer → broker → consumer (linger, ack, fetch)",
        "projector: consumer received → read model committed (its `NOTIFY`)",
        "query API: notified → answered",
    ]
    .map(|name| Stage {
        name,
        samples: Vec::with_capacity(traces.len()),
    });
    let mut traced = 0;
    for trace in traces {
        let Some(&(Some(produced), received)) = sightings.get(&(trace.account, trace.version))
        else {
            continue;
        };
        // A commit may carry several versions of the account: the first that covers this one.
        let Some(committed) = commits.get(&trace.account).and_then(|versions| {
            versions
                .iter()
                .find(|(version, _)| *version >= trace.version)
                .map(|(_, at)| *at)
        }) else {
            continue;
        };
        let milestones = [trace.answered, produced, received, committed, trace.visible];
        for (stage, pair) in stages.iter_mut().zip(milestones.windows(2)) {
            stage.samples.push((pair[1] - pair[0]) as i32);
        }
        traced += 1;
    }
    for stage in &mut stages {
        stage.samples.sort_unstable();
    }
    (stages.into(), traced)
}

/// The three services as processes; deposits at `rate`/s; each timed until visible, and
/// through each stage on the way.
async fn end_to_end(
    database: &DatabaseConfig,
    kafka: &KafkaConfig,
    broker: u32,
    rate: u64,
    seconds: u64,
) -> anyhow::Result<Latency> {
    // Watching before anything is appended: the topic from its current end, the projector's
    // notifications from now.
    let (watching_topic, sightings) = watch_topic(kafka, "account")?;
    let pool = db::connect(database).await?;
    let mut listener = PgListener::connect_with(&pool).await?;
    listener.listen(READ_MODELS_CHANGED).await?;
    let commits = Commits::default();
    let watching_commits = tokio::spawn(watch_commits(listener, commits.clone()));

    launch::build(Profile::Release, &["command-api", "projector", "query-api"]).await?;
    let (command_addr, query_addr) = (free_address()?, free_address()?);
    let service = |which: Service| -> anyhow::Result<Launch> {
        Ok(crate::bench::service(which, &free_address()?, database)
            .env("KAFKA_BROKERS", &kafka.brokers)
            // The group that already projected the seeded events: it resumes at their end.
            .env("PROJECTOR_GROUP", "bench-projector")
            .env("COMMAND_API_ADDR", &command_addr)
            .env("QUERY_API_ADDR", &query_addr)
            .env("QUERY_API_MAX_WAIT_MS", "5000"))
    };
    let mut services = launch::start(vec![
        service(Service::CommandApi)?,
        service(Service::Projector)?,
        service(Service::QueryApi)?,
    ])
    .await?;
    let commands = format!("http://{command_addr}");
    let queries = format!("http://{query_addr}");
    let token = service_token(SECRET, "bench", "bench", &["teller", "viewer"])?;
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(256)
        .build()?;
    let accounts = crate::bench::open_accounts(&client, &commands, &token, 100).await?;
    // Warm-up: the projector has joined its group and every account is visible.
    for account in &accounts {
        client
            .get(format!("{queries}/v1/accounts/{account}?min_version=1"))
            .bearer_auth(&token)
            .send()
            .await?
            .error_for_status()
            .context("warm-up: accounts not visible")?;
    }
    // The topic probe is reading: it saw every opening.
    let probing = Instant::now();
    while accounts.iter().any(|account| {
        !sightings
            .lock()
            .expect("sightings lock")
            .contains_key(&(*account, 1))
    }) {
        if probing.elapsed() > Duration::from_secs(30) {
            bail!("the topic probe did not see the accounts' openings within 30 s");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut processes: Vec<(String, u32)> = services
        .iter()
        .map(|service| {
            Ok((
                service.label().to_owned(),
                service.pid().context("a service exited")?,
            ))
        })
        .collect::<anyhow::Result<_>>()?;
    processes.push(("broker (nisshi)".into(), broker));
    // Postgres, through a watcher whose own service (the broker) goes unused: the processes
    // are read by `cpu::Sample`.
    let postgres = cpu::Watched::new(broker, &pool).await?;
    let (cpu_before, postgres_before) = (cpu::Sample::take(&processes)?, postgres.sample()?);
    let mut ticker = tokio::time::interval(Duration::from_micros(1_000_000 / rate.max(1)));
    let mut tasks = tokio::task::JoinSet::new();
    let total = rate * seconds;
    for n in 0..total {
        ticker.tick().await;
        let account = accounts[n as usize % accounts.len()];
        let (client, token, commands, queries) = (
            client.clone(),
            token.clone(),
            commands.clone(),
            queries.clone(),
        );
        tasks.spawn(async move {
            let reply: serde_json::Value = client
                .post(format!("{commands}/v1/accounts/{account}/deposits"))
                .bearer_auth(&token)
                .json(&json!({"amount": 1, "currency": "EUR"}))
                .send()
                .await
                .ok()?
                .error_for_status()
                .ok()?
                .json()
                .await
                .ok()?;
            let answered = now_micros();
            let version = reply["version"].as_i64()?;
            client
                .get(format!(
                    "{queries}/v1/accounts/{account}?min_version={version}"
                ))
                .bearer_auth(&token)
                .send()
                .await
                .ok()?
                .error_for_status()
                .ok()?;
            Some(Trace {
                account,
                version,
                answered,
                visible: now_micros(),
            })
        });
    }
    let (mut samples, mut failed) = (Vec::new(), 0);
    let mut traces = Vec::with_capacity(total as usize);
    while let Some(result) = tasks.join_next().await {
        match result.ok().flatten() {
            Some(trace) => {
                samples.push((trace.visible - trace.answered) as u32);
                traces.push(trace);
            }
            None => failed += 1,
        }
    }
    let cpu = CpuSpent {
        processes: cpu::Sample::take(&processes)?.since(&cpu_before),
        // Postgres's count can fall back by a backend that ended while it was read.
        postgres: postgres
            .sample()?
            .postgres
            .saturating_sub(postgres_before.postgres),
    };
    samples.sort_unstable();
    launch::stop(&mut services).await;
    // Every traced event was on the topic before its query answered, but the probe fetches on
    // its own schedule.
    let catching_up = Instant::now();
    while catching_up.elapsed() < Duration::from_secs(10) {
        let all_seen = {
            let seen = sightings.lock().expect("sightings lock");
            traces
                .iter()
                .all(|trace| seen.contains_key(&(trace.account, trace.version)))
        };
        if all_seen {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    watching_topic.abort();
    watching_commits.abort();
    pool.close().await;
    let (stages, traced) = stages(&traces, &sightings, &commits);
    Ok(Latency {
        samples,
        failed,
        stages,
        traced,
        cpu,
    })
}
