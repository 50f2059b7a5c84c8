//! `cargo xtask chaos`: faults under load, on loopback, bounded in time.
//!
//! Starts the command API (with its relay), the projector, the transfer process manager and a
//! broker as separate processes on a fresh database. Clients send deposits and transfers, each
//! with an `Idempotency-Key` that they reuse when they retry after a failure, as a careful
//! client does. Meanwhile, one at a time: `kill -9` and restart the command API, the projector
//! and the process manager, freeze the broker, and restart Postgres itself. A probe watches
//! every service's `/health/ready` throughout.
//!
//! The broker is frozen (SIGSTOP, SIGCONT), not killed: nisshi keeps its data either in memory,
//! lost with the process, or in Postgres, where it serves consumers at a few messages a second
//! (measured here: the projector fell hours behind). A `kill -9` of a broker that keeps its
//! data is `faults::a_broker_outage_delays_events_but_loses_none` in the test suite.
//!
//! Then it waits for the system to settle and checks: every acknowledged command is in the
//! store exactly once; every stored event reached Kafka; the read models equal a fold of the
//! store; every transfer is final; money is conserved. The report goes to stdout and to
//! `RELIABILITY.md`; the exit status says whether every check passed.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use futures::StreamExt;
use rdkafka::Message;
use rdkafka::consumer::{Consumer, StreamConsumer};
use serde_json::{Value, json};
use service_kit::ExposeSecret;
use service_kit::db::{self, DatabaseConfig};
use service_kit::event_log;
use service_kit::kafka::{KafkaConfig, header, headers};
use sqlx::PgPool;
use tokio::process::Command;
use uuid::Uuid;

use crate::bench::{SECRET, machine, open_accounts, service_token};
use crate::broker;
use crate::launch::{self, Launch, Logs, Profile, Running, Service, free_address};

/// Accounts the clients move money between.
const ACCOUNTS: usize = 20;
/// A request that takes longer has hung: the check fails.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// Attempts per request, with the same idempotency key, before a client gives up on it.
const ATTEMPTS: u32 = 20;
/// How long the system may take to settle after the load stops.
const SETTLE: Duration = Duration::from_secs(180);

/// `cargo xtask chaos`
#[derive(clap::Args)]
pub(crate) struct Options {
    /// How long the load runs; the faults are spread over it.
    #[arg(long, default_value_t = 60)]
    seconds: u64,
    /// Concurrent clients sending deposits and transfers.
    #[arg(long, default_value_t = 8)]
    clients: usize,
    /// Whether to restart the machine's Postgres (it cuts every connection on the machine).
    #[arg(long, value_enum, value_name = "yes|no", default_value_t = YesNo::Yes)]
    restart_postgres: YesNo,
}

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum YesNo {
    Yes,
    No,
}

pub(crate) async fn run(options: &Options) -> anyhow::Result<()> {
    let (seconds, clients) = (options.seconds, options.clients);
    let restart_postgres = options.restart_postgres == YesNo::Yes;
    let url = std::env::var("DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/ledger_chaos".into());
    let database = DatabaseConfig::with_url(&url);
    crate::bench::recreate_database(&database, "ledger_chaos").await?;
    let pool = db::connect(&database).await?;
    db::migrate(&pool).await?;

    launch::build(Profile::Release, &["command-api", "projector"]).await?;
    let broker = broker::start(broker::Storage::Memory).await?;
    let kafka = broker.kafka();
    let address = free_address()?;
    let mut launches = Vec::new();
    let mut probed = Vec::new();
    for service in [
        Service::CommandApi,
        Service::Projector,
        Service::ProcessManager,
    ] {
        let ops = free_address()?;
        probed.push((service.label(), format!("http://{ops}")));
        launches.push(
            Launch::service(service, Profile::Release, &ops)
                .env("COMMAND_API_ADDR", &address)
                .env("DATABASE_URL", database.url.expose_secret())
                .env("JWT_HS256_SECRET", SECRET)
                // One tenant at full speed: the per-tenant limit would be what is measured.
                .env("RATE_LIMIT_PER_TENANT", "0")
                .env("KAFKA_BROKERS", &kafka.brokers)
                // Stuck transfers are looked for this often: the sweep is part of what is tested.
                .env("PROCESS_MANAGER_STUCK_AFTER_MS", "5000")
                .env("LOG_FORMAT", "json")
                .env("RUST_LOG", "warn")
                .logs(Logs::Discarded),
        );
    }
    let mut services = launch::start(launches).await?;
    let base = format!("http://{address}");

    let token = service_token(SECRET, "chaos", "chaos", &["teller"])?;
    let client = reqwest::Client::builder()
        .timeout(REQUEST_TIMEOUT)
        .build()?;
    let accounts = open_accounts(&client, &base, &token, ACCOUNTS).await?;
    println!("chaos: {clients} clients for {seconds} s over {ACCOUNTS} accounts; faults follow");

    let tally = Arc::new(Tally::default());
    let load_started = tokio::time::Instant::now();
    let deadline = Instant::now() + Duration::from_secs(seconds);
    let mut load = tokio::task::JoinSet::new();
    for client_number in 0..clients {
        let (client, base, token, accounts, tally) = (
            client.clone(),
            base.clone(),
            token.clone(),
            accounts.clone(),
            tally.clone(),
        );
        load.spawn(async move {
            let mut turn = client_number;
            while Instant::now() < deadline {
                turn += clients;
                let request = Request::pick(turn, &accounts);
                request.send(&client, &base, &token, &tally).await;
            }
        });
    }
    let probe = Probe::start(probed);

    // Five faults at even intervals, each over well before the load ends.
    let step = Duration::from_secs(seconds) / 6;
    let mut faults = Vec::new();
    for (fault, at) in (1..=5u32).map(|n| step * n).enumerate() {
        tokio::time::sleep_until(load_started + at).await;
        let started = Instant::now();
        let what = match fault {
            0 => crash_and_restart(&mut services[0]).await?,
            1 => crash_and_restart(&mut services[1]).await?,
            2 => {
                broker.freeze(Duration::from_secs(8)).await?;
                "freeze the broker for 8 s (SIGSTOP, SIGCONT)".to_owned()
            }
            3 if restart_postgres => restart_postgres_server(&pool).await?,
            3 => "Postgres restart skipped (--restart-postgres no)".to_owned(),
            _ => crash_and_restart(&mut services[2]).await?,
        };
        println!("  {:>5.1} s  {what}", started.elapsed().as_secs_f64());
        faults.push(what);
    }
    while load.join_next().await.is_some() {}
    println!(
        "load done; waiting for the system to settle (at most {} s)",
        SETTLE.as_secs()
    );

    let settle_started = Instant::now();
    let settled = settle(&pool).await;
    let mut recovered = true;
    for service in &mut services {
        if let Err(err) = service.wait_ready().await {
            println!("{err}");
            recovered = false;
        }
    }
    let not_ready = probe.stop().await;
    let mut report =
        Report::gather(&pool, &kafka, &tally, settled, settle_started.elapsed()).await?;
    report.recovered = recovered;
    launch::stop(&mut services).await;
    drop(broker);

    let table = report.table(clients, seconds, &faults, &not_ready, &machine().await);
    println!("\n{table}");
    crate::bench::write_section_in("RELIABILITY.md", "chaos", &table)?;
    if !report.passed() {
        bail!("chaos: a check failed (see the table)");
    }
    Ok(())
}

/// SIGKILL mid-work, then a restart two seconds later, as a supervisor would.
async fn crash_and_restart(service: &mut Running) -> anyhow::Result<String> {
    service.kill().await?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    service.restart()?;
    Ok(format!("kill -9 {}, restart after 2 s", service.label()))
}

/// Restarts the machine's Postgres cluster (fast mode: every connection is cut), and checks
/// through `pool` that the server the services use is the one that restarted.
async fn restart_postgres_server(pool: &PgPool) -> anyhow::Result<String> {
    let started_before: chrono::DateTime<chrono::Utc> =
        sqlx::query_scalar("SELECT pg_postmaster_start_time()")
            .fetch_one(pool)
            .await?;
    let clusters = Command::new("pg_lsclusters")
        .arg("--no-header")
        .output()
        .await
        .context("pg_lsclusters (Debian's postgresql-common) is needed to restart Postgres; or pass --restart-postgres no")?;
    let listing = String::from_utf8_lossy(&clusters.stdout);
    let mut fields = listing
        .lines()
        .find(|line| line.split_whitespace().nth(2) == Some("5432"))
        .context("no Postgres cluster on port 5432 here; pass --restart-postgres no")?
        .split_whitespace();
    let (Some(version), Some(name)) = (fields.next(), fields.next()) else {
        bail!("unexpected pg_lsclusters output: {listing}");
    };
    let status = Command::new("pg_ctlcluster")
        .args([
            "--skip-systemctl-redirect",
            version,
            name,
            "restart",
            "-m",
            "fast",
        ])
        .status()
        .await?;
    if !status.success() {
        bail!("pg_ctlcluster restart failed");
    }
    let mut started_after = started_before;
    for _ in 0..50 {
        if let Ok(time) = sqlx::query_scalar("SELECT pg_postmaster_start_time()")
            .fetch_one(pool)
            .await
        {
            started_after = time;
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    if started_after == started_before {
        bail!(
            "the services' Postgres did not restart: DATABASE_URL is not the cluster on port 5432"
        );
    }
    Ok(format!(
        "restart Postgres ({version}/{name}, fast: every connection cut)"
    ))
}

/// What the clients saw.
#[derive(Default)]
struct Tally {
    inner: Mutex<TallyInner>,
}

#[derive(Default)]
struct TallyInner {
    /// Idempotency key → deposit amount (0 for transfers), for requests answered 2xx.
    acknowledged: HashMap<String, i64>,
    /// Deposits and transfers that no attempt got through, by key and amount.
    abandoned: HashMap<String, i64>,
    /// Failed attempts by what the client saw: a status and problem type, or a transport error.
    failures: BTreeMap<String, u64>,
    attempts: u64,
    /// Attempts that ran into [`REQUEST_TIMEOUT`].
    timeouts: u64,
    /// 2xx that answered a retry from the original's stored response.
    replayed: u64,
}

/// One client request: a deposit or a transfer, retried with the same key until it is
/// answered or refused.
struct Request {
    key: String,
    path: String,
    body: Value,
    deposit: i64,
}

impl Request {
    /// Four deposits for each transfer, over accounts chosen by `turn`.
    fn pick(turn: usize, accounts: &[Uuid]) -> Self {
        let key = Uuid::new_v4().to_string();
        let account = accounts[turn % accounts.len()];
        if turn.is_multiple_of(5) {
            let to = accounts[(turn / 5 + 1) % accounts.len()];
            let to = if to == account {
                accounts[(turn + 1) % accounts.len()]
            } else {
                to
            };
            return Self {
                key,
                path: "/v1/transfers".into(),
                body: json!({"from_account": account, "to_account": to, "amount": 7, "currency": "EUR"}),
                deposit: 0,
            };
        }
        let amount = 10 + (turn % 90) as i64;
        Self {
            key,
            path: format!("/v1/accounts/{account}/deposits"),
            body: json!({"amount": amount, "currency": "EUR"}),
            deposit: amount,
        }
    }

    async fn send(&self, client: &reqwest::Client, base: &str, token: &str, tally: &Tally) {
        for attempt in 0..ATTEMPTS {
            let mut retry_after = None;
            let sent = client
                .post(format!("{base}{}", self.path))
                .bearer_auth(token)
                .header("Idempotency-Key", &self.key)
                .json(&self.body)
                .send()
                .await;
            let failure = match sent {
                Ok(response) if response.status().is_success() => {
                    let replayed = response.headers().contains_key("idempotent-replayed");
                    let mut tally = tally.inner.lock().unwrap_or_else(|e| e.into_inner());
                    tally.attempts += 1;
                    tally.replayed += u64::from(replayed);
                    tally.acknowledged.insert(self.key.clone(), self.deposit);
                    return;
                }
                Ok(response) => {
                    let status = response.status();
                    retry_after = response
                        .headers()
                        .get("retry-after")
                        .and_then(|value| value.to_str().ok()?.parse().ok())
                        .map(Duration::from_secs);
                    let problem: Value = response.json().await.unwrap_or(Value::Null);
                    let kind = problem["type"]
                        .as_str()
                        .and_then(|t| t.strip_prefix("urn:ledger:problem:"))
                        .unwrap_or("(not problem+json)")
                        .to_owned();
                    format!("{} {kind}", status.as_u16())
                }
                Err(err) if err.is_timeout() => "timed out".to_owned(),
                Err(err) if err.is_connect() => "connection refused (API down)".to_owned(),
                Err(_) => "connection dropped mid-request".to_owned(),
            };
            let retry = failure.starts_with("503")
                || failure.starts_with("conn")
                || failure.starts_with("timed");
            {
                let mut tally = tally.inner.lock().unwrap_or_else(|e| e.into_inner());
                tally.attempts += 1;
                tally.timeouts += u64::from(failure == "timed out");
                *tally.failures.entry(failure).or_default() += 1;
                if !retry || attempt + 1 == ATTEMPTS {
                    tally.abandoned.insert(self.key.clone(), self.deposit);
                    return;
                }
            }
            tokio::time::sleep(retry_after.unwrap_or(Duration::from_millis(250))).await;
        }
    }
}

/// Polls every service's readiness; records for how long each was not ready.
struct Probe {
    stop: tokio::sync::watch::Sender<bool>,
    task: tokio::task::JoinHandle<BTreeMap<&'static str, Duration>>,
}

impl Probe {
    fn start(services: Vec<(&'static str, String)>) -> Self {
        let (stop, stopped) = tokio::sync::watch::channel(false);
        let task = tokio::spawn(async move {
            let client = reqwest::Client::builder()
                .timeout(Duration::from_secs(3))
                .build()
                .unwrap_or_default();
            let mut not_ready: BTreeMap<&'static str, Duration> = BTreeMap::new();
            let interval = Duration::from_millis(250);
            let mut last_round = Instant::now();
            while !*stopped.borrow() {
                let mut down = Vec::new();
                for (label, base) in &services {
                    let ready = matches!(
                        client.get(format!("{base}/health/ready")).send().await,
                        Ok(response) if response.status().is_success()
                    );
                    if !ready {
                        down.push(*label);
                    }
                }
                tokio::time::sleep(interval).await;
                // The whole round counts: a probe that hung is time not ready.
                let round = last_round.elapsed();
                last_round = Instant::now();
                for (label, _) in &services {
                    let entry = not_ready.entry(label).or_default();
                    if down.contains(label) {
                        *entry += round;
                    }
                }
            }
            not_ready
        });
        Self { stop, task }
    }

    async fn stop(self) -> BTreeMap<&'static str, Duration> {
        let _ = self.stop.send(true);
        self.task.await.unwrap_or_default()
    }
}

/// Waits until the relay has published the whole log and the read models match the store.
async fn settle(pool: &PgPool) -> bool {
    let deadline = Instant::now() + SETTLE;
    while Instant::now() < deadline {
        let published = async {
            let checkpoint = event_log::load_checkpoint(pool, "kafka-relay").await?;
            let after = event_log::read_committed(pool, checkpoint, 1).await?;
            Ok::<_, sqlx::Error>(after.events.is_empty() && !after.pending)
        };
        if matches!(published.await, Ok(true))
            && matches!(projector::check::check(pool).await, Ok(report) if report.differences.is_empty())
            && matches!(unsettled_transfers(pool).await, Ok(0))
        {
            return true;
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    false
}

async fn unsettled_transfers(pool: &PgPool) -> Result<i64, sqlx::Error> {
    sqlx::query_scalar(
        "SELECT count(*) FROM transfers WHERE status NOT IN ('completed', 'rejected', 'failed')",
    )
    .fetch_one(pool)
    .await
}

/// The checks, after the system settled (or gave up settling).
struct Report {
    settled: bool,
    /// Every service answered ready again at the end.
    recovered: bool,
    settle_time: Duration,
    attempts: u64,
    acknowledged: usize,
    replayed: u64,
    abandoned: usize,
    abandoned_but_stored: usize,
    failures: BTreeMap<String, u64>,
    timeouts: u64,
    /// Acknowledged requests whose key is in the store other than exactly once.
    acknowledged_missing: usize,
    duplicated_keys: usize,
    events: i64,
    events_on_kafka: usize,
    events_missing_on_kafka: usize,
    messages: usize,
    read_model_differences: usize,
    transfers: i64,
    unsettled_transfers: i64,
    balance_sum: i64,
    deposited_sum: i64,
}

impl Report {
    async fn gather(
        pool: &PgPool,
        kafka: &KafkaConfig,
        tally: &Tally,
        settled: bool,
        settle_time: Duration,
    ) -> anyhow::Result<Self> {
        let keys: Vec<(String, i64)> = sqlx::query_as(
            "SELECT metadata->>'idempotency_key', count(*) FROM events \
             WHERE metadata->>'idempotency_key' IS NOT NULL GROUP BY 1",
        )
        .fetch_all(pool)
        .await?;
        let stored: HashMap<String, i64> = keys.into_iter().collect();
        let event_ids: Vec<Uuid> = sqlx::query_scalar("SELECT event_id FROM events")
            .fetch_all(pool)
            .await?;
        let (messages, on_kafka) = read_event_ids(kafka).await?;
        let check = projector::check::check(pool).await?;
        let (transfers, unsettled): (i64, i64) = sqlx::query_as(
            "SELECT count(*), count(*) FILTER (WHERE status NOT IN ('completed', 'rejected', 'failed')) FROM transfers",
        )
        .fetch_one(pool)
        .await?;
        let balance_sum: i64 =
            sqlx::query_scalar("SELECT coalesce(sum(balance), 0)::bigint FROM accounts")
                .fetch_one(pool)
                .await?;
        let tally = tally.inner.lock().unwrap_or_else(|e| e.into_inner());
        // Money in: every deposit the store holds, acknowledged or not (a crash can come
        // between the commit and the answer; the client gave up on it, the ledger did not).
        let deposited_sum = tally
            .acknowledged
            .iter()
            .chain(&tally.abandoned)
            .filter(|(key, _)| stored.contains_key(*key))
            .map(|(_, amount)| amount)
            .sum();
        Ok(Self {
            settled,
            recovered: false,
            settle_time,
            attempts: tally.attempts,
            acknowledged: tally.acknowledged.len(),
            replayed: tally.replayed,
            abandoned: tally.abandoned.len(),
            abandoned_but_stored: tally
                .abandoned
                .keys()
                .filter(|key| stored.contains_key(*key))
                .count(),
            failures: tally.failures.clone(),
            timeouts: tally.timeouts,
            acknowledged_missing: tally
                .acknowledged
                .keys()
                .filter(|key| stored.get(*key) != Some(&1))
                .count(),
            duplicated_keys: stored.values().filter(|count| **count > 1).count(),
            events: event_ids.len() as i64,
            events_on_kafka: on_kafka.len(),
            events_missing_on_kafka: event_ids.iter().filter(|id| !on_kafka.contains(id)).count(),
            messages,
            read_model_differences: check.differences.len(),
            transfers,
            unsettled_transfers: unsettled,
            balance_sum,
            deposited_sum,
        })
    }

    /// Failed attempts that were not a clear, retryable answer: a 5xx other than 503, or a
    /// body that is not problem+json. A process being down (connection refused or dropped)
    /// is clear.
    fn unclear_failures(&self) -> u64 {
        self.failures
            .iter()
            .filter(|(kind, _)| {
                kind.contains("(not problem+json)")
                    || (kind.starts_with('5') && !kind.starts_with("503"))
            })
            .map(|(_, count)| count)
            .sum()
    }

    fn passed(&self) -> bool {
        self.settled
            && self.recovered
            && self.unclear_failures() == 0
            && self.timeouts == 0
            && self.acknowledged_missing == 0
            && self.duplicated_keys == 0
            && self.events_missing_on_kafka == 0
            && self.read_model_differences == 0
            && self.unsettled_transfers == 0
            && self.balance_sum == self.deposited_sum
    }

    fn table(
        &self,
        clients: usize,
        seconds: u64,
        faults: &[String],
        not_ready: &BTreeMap<&'static str, Duration>,
        machine: &str,
    ) -> String {
        let verdict = |ok: bool| if ok { "pass" } else { "**FAIL**" };
        let failures = if self.failures.is_empty() {
            "none".to_owned()
        } else {
            self.failures
                .iter()
                .map(|(kind, count)| format!("{count} × {kind}"))
                .collect::<Vec<_>>()
                .join(", ")
        };
        let not_ready = not_ready
            .iter()
            .map(|(label, time)| format!("{label} {:.1} s", time.as_secs_f64()))
            .collect::<Vec<_>>()
            .join(", ");
        let faults = faults.join("; ");
        format!(
            "Last run of `cargo xtask chaos` ({seconds} s of load from {clients} clients, on {machine}).\n\
             Faults, one at a time: {faults}.\n\n\
             | what | result | check |\n|---|---|---|\n\
             | requests (deposits, transfers) | {} acknowledged ({} of them retries answered from the original), {} given up | |\n\
             | attempts | {}; failed attempts, with what the client saw: {failures} | |\n\
             | failed attempts without a clear answer (a 5xx other than 503, or not problem+json) | {} | {} |\n\
             | attempts that hung past {} s | {} | {} |\n\
             | acknowledged requests in the store exactly once | {} missing or repeated | {} |\n\
             | idempotency keys stored more than once | {} | {} |\n\
             | given-up requests the store holds anyway | {} of {} (committed, answer lost; a retry would be answered from it) | |\n\
             | events in the store | {} | |\n\
             | events on Kafka | {} distinct in {} messages; {} stored events missing | {} |\n\
             | read models vs a fold of the store (`projector check`) | {} differences | {} |\n\
             | transfers | {} requested, {} not final | {} |\n\
             | money: sum of balances = sum of stored deposits | {} = {} | {} |\n\
             | settled after the load stopped | {} in {:.1} s | {} |\n\
             | every service ready again, without manual action | {} | {} |\n\
             | time each service answered not-ready | {not_ready} | |\n",
            self.acknowledged,
            self.replayed,
            self.abandoned,
            self.attempts,
            self.unclear_failures(),
            verdict(self.unclear_failures() == 0),
            REQUEST_TIMEOUT.as_secs(),
            self.timeouts,
            verdict(self.timeouts == 0),
            self.acknowledged_missing,
            verdict(self.acknowledged_missing == 0),
            self.duplicated_keys,
            verdict(self.duplicated_keys == 0),
            self.abandoned_but_stored,
            self.abandoned,
            self.events,
            self.events_on_kafka,
            self.messages,
            self.events_missing_on_kafka,
            verdict(self.events_missing_on_kafka == 0),
            self.read_model_differences,
            verdict(self.read_model_differences == 0),
            self.transfers,
            self.unsettled_transfers,
            verdict(self.unsettled_transfers == 0),
            self.balance_sum,
            self.deposited_sum,
            verdict(self.balance_sum == self.deposited_sum),
            if self.settled { "yes" } else { "no" },
            self.settle_time.as_secs_f64(),
            verdict(self.settled),
            if self.recovered { "yes" } else { "no" },
            verdict(self.recovered),
        )
    }
}

/// Reads both event topics to their end with a fresh consumer group: the number of messages
/// and the distinct event ids (`ce_id`) among them.
async fn read_event_ids(kafka: &KafkaConfig) -> anyhow::Result<(usize, HashSet<Uuid>)> {
    let consumer: StreamConsumer = kafka
        .consumer(&format!("chaos-check-{}", Uuid::new_v4()))
        .create()?;
    let topics = [
        kafka.events_topic("account"),
        kafka.events_topic("transfer"),
    ];
    let mut expected = 0;
    for topic in &topics {
        let metadata = consumer.fetch_metadata(Some(topic), Duration::from_secs(10))?;
        for partition in metadata.topics().iter().flat_map(|t| t.partitions()) {
            let (low, high) =
                consumer.fetch_watermarks(topic, partition.id(), Duration::from_secs(10))?;
            expected += (high - low).max(0) as usize;
        }
    }
    consumer.subscribe(&topics.iter().map(String::as_str).collect::<Vec<_>>())?;
    let mut ids = HashSet::new();
    let mut messages = 0;
    let mut stream = consumer.stream();
    while messages < expected {
        let message = tokio::time::timeout(Duration::from_secs(30), stream.next())
            .await
            .context("Kafka stopped delivering before the end of the topics")?
            .context("the consumer stream ended")??;
        messages += 1;
        if let Some(id) = message
            .headers()
            .and_then(|h| header(h, headers::ID))
            .and_then(|id| id.parse().ok())
        {
            ids.insert(id);
        }
    }
    Ok((messages, ids))
}
