//! `cargo xtask bench pipeline`: relay, projector and rebuild throughput over a large event
//! store, and end-to-end latency (command answered → visible in the query API) at a steady
//! command rate. Writes its section of `BENCHMARKS.md`.

use std::fmt::Write as _;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use command_api::AppendSignal;
use command_api::relay::{Relay, RelayConfig};
use serde_json::json;
use service_kit::db::{self, DatabaseConfig};
use service_kit::kafka::KafkaConfig;
use sqlx::PgPool;

use crate::bench::{SECRET, machine, percentile_ms, reset_database, service_token, write_section};
use crate::broker;
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

    println!("end-to-end latency at {rate} commands/s for {seconds} s...");
    let latency = end_to_end(&database, &kafka, rate, seconds).await?;
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

struct Latency {
    samples: Vec<u32>,
    failed: usize,
}

/// The three services as processes; deposits at `rate`/s; each timed until visible.
async fn end_to_end(
    database: &DatabaseConfig,
    kafka: &KafkaConfig,
    rate: u64,
    seconds: u64,
) -> anyhow::Result<Latency> {
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
            let answered = Instant::now();
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
            Some(answered.elapsed().as_micros() as u32)
        });
    }
    let mut latency = Latency {
        samples: Vec::new(),
        failed: 0,
    };
    while let Some(result) = tasks.join_next().await {
        match result.ok().flatten() {
            Some(sample) => latency.samples.push(sample),
            None => latency.failed += 1,
        }
    }
    latency.samples.sort_unstable();
    launch::stop(&mut services).await;
    Ok(latency)
}
