//! `cargo xtask bench commands`: deposit throughput, latency and CPU per deposit of the real
//! command API (release build, real Postgres) beside pgbench inserting rows of the same size,
//! then the same deposits with the system as deployed (relay publishing, projector consuming),
//! in one run on one machine, written to `BENCHMARKS.md`.

use std::fmt::Write as _;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use serde_json::json;
use service_kit::auth::{TokenRequest, mint_hs256};
use service_kit::db::{self, DatabaseConfig};
use service_kit::{ExposeSecret, SecretString};
use tokio::process::Command;
use uuid::Uuid;

use crate::cpu;
use crate::dev::workspace_root;
use crate::launch::{self, Launch, Profile, Service, free_address};

pub(crate) const SECRET: &str = "benchmark-secret-0123456789abcdef0123456789";
const ACCOUNTS: usize = 1000;
const CONCURRENCY: [usize; 3] = [1, 16, 64];
/// The clients of the run with the system as deployed, compared with the relay-off run of as
/// many.
const DEPLOYED_CLIENTS: usize = 16;
/// Longest wait for the relay and the projector to catch up, before the deployed run and after.
const CATCH_UP_WITHIN: Duration = Duration::from_secs(60);

/// The outcome of one timed run.
pub(crate) struct Run {
    pub(crate) label: String,
    pub(crate) concurrency: usize,
    pub(crate) ok: usize,
    pub(crate) errors: usize,
    pub(crate) server_errors: usize,
    pub(crate) elapsed: Duration,
    /// Sorted latencies of successful requests, microseconds.
    pub(crate) latencies: Vec<u32>,
    /// Mean events per group commit, from the command API's own metrics.
    pub(crate) events_per_commit: Option<f64>,
}

/// What one load worker counted: ok, errors, of which server errors, and the latencies of the
/// ok requests in microseconds.
pub(crate) type WorkerCount = (usize, usize, usize, Vec<u32>);

impl Run {
    /// The workers' counts summed into one run that began at `started`, its latencies sorted.
    pub(crate) fn of_workers(
        label: &str,
        concurrency: usize,
        started: Instant,
        workers: impl IntoIterator<Item = WorkerCount>,
    ) -> Self {
        let mut run = Run {
            label: label.to_owned(),
            concurrency,
            ok: 0,
            errors: 0,
            server_errors: 0,
            elapsed: Duration::ZERO,
            latencies: Vec::new(),
            events_per_commit: None,
        };
        for (ok, errors, server_errors, latencies) in workers {
            run.ok += ok;
            run.errors += errors;
            run.server_errors += server_errors;
            run.latencies.extend(latencies);
        }
        run.elapsed = started.elapsed();
        run.latencies.sort_unstable();
        run
    }

    pub(crate) fn throughput(&self) -> f64 {
        self.ok as f64 / self.elapsed.as_secs_f64()
    }

    pub(crate) fn percentile_ms(&self, p: f64) -> f64 {
        percentile_ms(&self.latencies, p)
    }
}

/// `cargo xtask bench <name>`
#[derive(clap::Subcommand)]
pub(crate) enum Bench {
    /// Command throughput and latency against pgbench.
    Commands(CommandsOptions),
    /// Relay, projector, rebuild throughput and end-to-end latency.
    Pipeline(crate::pipeline_bench::Options),
    /// Verify, replay, export, check throughput; audit query latency.
    Audit(crate::audit_bench::Options),
    /// Transfers end to end through the process manager, beside deposits.
    Transfers(crate::transfer_bench::Options),
    /// The hot path on a store of 10 M events: cold loads, memory, sweep, lag probe.
    Scale(crate::scale_bench::Options),
    /// GraphQL subscribers under a steady deposit load; GraphQL against REST reads.
    Graphql(crate::graphql_bench::Options),
    /// Account reads through the query API against pgbench; CPU per read.
    Reads(crate::reads_bench::Options),
}

/// `cargo xtask bench commands`
#[derive(clap::Args)]
pub(crate) struct CommandsOptions {
    /// Length of each timed run.
    #[arg(long, default_value_t = 10)]
    seconds: u64,
    /// The server to benchmark on (its database is dropped and created); default
    /// `DATABASE_URL`, else `postgres://postgres@127.0.0.1:5432/ledger_bench`.
    #[arg(long, value_name = "URL")]
    database_url: Option<String>,
    /// One concurrency only, for profiling; nothing is written to BENCHMARKS.md.
    #[arg(long)]
    clients: Option<usize>,
    /// With `--clients`: the system as deployed too, at 16 clients as in the full report
    /// (its ratio is to the relay-off run at 16, so pair it with `--clients 16`).
    #[arg(long, requires = "clients")]
    deployed: bool,
}

/// Runs `bench` in a release build of xtask: a debug-built load generator would eat the CPU the
/// measured services need.
pub(crate) async fn run(bench: &Bench) -> anyhow::Result<()> {
    if cfg!(debug_assertions) {
        let status = Command::new(env!("CARGO"))
            .current_dir(workspace_root())
            .args(["run", "--quiet", "--release", "--package", "xtask", "--"])
            .args(std::env::args_os().skip(1))
            .status()
            .await?;
        if !status.success() {
            bail!("benchmark failed");
        }
        return Ok(());
    }
    match bench {
        Bench::Commands(options) => commands(options).await,
        Bench::Pipeline(options) => crate::pipeline_bench::run(options).await,
        Bench::Audit(options) => crate::audit_bench::run(options).await,
        Bench::Transfers(options) => crate::transfer_bench::run(options).await,
        Bench::Scale(options) => crate::scale_bench::run(options).await,
        Bench::Graphql(options) => crate::graphql_bench::run(options).await,
        Bench::Reads(options) => crate::reads_bench::run(options).await,
    }
}

/// A run of `bench commands` and the CPU it took.
struct Measured {
    run: Run,
    cpu: cpu::Ticks,
}

impl From<(Run, cpu::Ticks)> for Measured {
    fn from((run, cpu): (Run, cpu::Ticks)) -> Self {
        Self { run, cpu }
    }
}

async fn commands(options: &CommandsOptions) -> anyhow::Result<()> {
    // `--clients 16` runs one concurrency only (for profiling); the report needs all three.
    let concurrencies: Vec<usize> = match options.clients {
        Some(clients) => vec![clients],
        None => CONCURRENCY.to_vec(),
    };
    let seconds = options.seconds;
    let duration = Duration::from_secs(seconds);
    let server_url = options
        .database_url
        .clone()
        .or_else(|| std::env::var("DATABASE_URL").ok())
        .unwrap_or_else(|| "postgres://postgres@127.0.0.1:5432/ledger_bench".to_owned());

    launch::build(Profile::Release, &["command-api", "projector"]).await?;
    let database = DatabaseConfig::with_url(&server_url);
    reset_database(&database).await?;
    let owner = db::connect(&database).await?;

    let (address, ops) = (free_address()?, free_address()?);
    let api = CommandApi {
        base: format!("http://{address}"),
        ops: format!("http://{ops}"),
    };
    let mut server = launch::start(vec![
        service(Service::CommandApi, &ops, &database)
            .env("COMMAND_API_ADDR", &address)
            // The command path alone: the system as deployed is the last run.
            .env("COMMAND_API_RELAY", "false")
            // One tenant at full speed: the per-tenant limit would be what is measured.
            .env("RATE_LIMIT_PER_TENANT", "0"),
    ])
    .await?;
    let watched = cpu::Watched::new(
        server
            .first()
            .and_then(launch::Running::pid)
            .context("the command API's pid")?,
        &owner,
    )
    .await?;

    let token = service_token(SECRET, "bench", "bench", &["teller"])?;
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(128)
        .build()?;
    let accounts = open_accounts(&client, &api.base, &token, ACCOUNTS).await?;
    let hot = vec![accounts[0]];
    let deposits = |accounts: &'static str, of: &[Uuid], concurrency: usize| {
        let (client, api, token, of) = (&client, &api, &token, of.to_vec());
        async move {
            let label = format!("deposits, {accounts}");
            Ok(load(client, api, token, &of, concurrency, duration, &label).await)
        }
    };

    let mut runs = Vec::new();
    for concurrency in concurrencies {
        // A short warm-up fills the state cache and the connection pools.
        load(
            &client,
            &api,
            &token,
            &accounts,
            concurrency,
            Duration::from_secs(1),
            "",
        )
        .await;
        runs.push(
            watched
                .around(deposits("1000 accounts", &accounts, concurrency))
                .await?
                .into(),
        );
        runs.push(
            watched
                .around(deposits("one hot account", &hot, concurrency))
                .await?
                .into(),
        );
        runs.push(
            watched
                .around(pgbench_insert(
                    database.url.expose_secret(),
                    concurrency,
                    seconds,
                ))
                .await?
                .into(),
        );
    }
    let long_stream = watched
        .around(deposits("hot account (after the runs above)", &hot, 16))
        .await?
        .into();
    let hot_events: i64 = sqlx::query_scalar("SELECT count(*) FROM events WHERE aggregate_id = $1")
        .bind(hot[0].to_string())
        .fetch_one(&owner)
        .await?;
    runs.push(long_stream);
    launch::stop(&mut server).await;
    owner.close().await;

    let deployed = if options.clients.is_none() || options.deployed {
        Some(as_deployed(&database, &watched, &client, &token, duration).await?)
    } else {
        None
    };

    let report = report(&runs, deployed.as_ref(), seconds, hot_events).await?;
    println!("{report}");
    if options.clients.is_none() {
        write_section("commands", &report)?;
        println!("written to BENCHMARKS.md");
    }
    Ok(())
}

/// How far behind the relay and the projector were.
#[derive(Debug, Clone, Copy)]
struct Behind {
    /// Events the relay has not published (acknowledged by the broker) yet.
    unpublished: i64,
    /// Account events not yet in the read model: every account's version counts the events of
    /// its stream applied.
    unprojected: i64,
}

impl Behind {
    async fn now(owner: &sqlx::PgPool) -> anyhow::Result<Self> {
        let relay =
            service_kit::event_log::load_checkpoint(owner, command_api::relay::READER).await?;
        let unpublished = service_kit::event_log::lag(owner, relay).await?.events;
        let unprojected = sqlx::query_scalar(
            "SELECT (SELECT count(*) FROM events WHERE aggregate_type = 'account')
                  - (SELECT coalesce(sum(version), 0) FROM accounts)::int8",
        )
        .fetch_one(owner)
        .await?;
        Ok(Self {
            unpublished,
            unprojected,
        })
    }

    fn caught_up(self) -> bool {
        self.unpublished == 0 && self.unprojected == 0
    }
}

/// The run with the system as deployed, and the relay and projector behind it.
struct Deployed {
    measured: Measured,
    /// When the load stopped.
    behind: Behind,
    /// How long after the load they both had caught up; `None`: not within
    /// [`CATCH_UP_WITHIN`].
    caught_up_after: Option<Duration>,
    /// Ticks of the projector's and the broker's processes over the same span as
    /// `measured.cpu`: in neither of its columns, but on the same cores.
    projector: u64,
    broker: u64,
}

/// Deposits over [`ACCOUNTS`] accounts at [`DEPLOYED_CLIENTS`] clients with the command API's
/// relay publishing to a broker and the projector consuming, on a new database (the relay-off
/// runs left events that were never published); then how far behind the relay and the
/// projector were when the load stopped, and how long they took to catch up.
async fn as_deployed(
    database: &DatabaseConfig,
    watched: &cpu::Watched,
    client: &reqwest::Client,
    token: &str,
    duration: Duration,
) -> anyhow::Result<Deployed> {
    reset_database(database).await?;
    let owner = db::connect(database).await?;
    let broker = crate::broker::start(crate::broker::Storage::Memory).await?;
    let kafka = broker.kafka();
    let (address, ops) = (free_address()?, free_address()?);
    let api = CommandApi {
        base: format!("http://{address}"),
        ops: format!("http://{ops}"),
    };
    let mut system = launch::start(vec![
        service(Service::CommandApi, &ops, database)
            .env("COMMAND_API_ADDR", &address)
            .env("KAFKA_BROKERS", &kafka.brokers)
            .env("RATE_LIMIT_PER_TENANT", "0"),
        service(Service::Projector, &free_address()?, database)
            .env("KAFKA_BROKERS", &kafka.brokers),
    ])
    .await?;
    let pid = |which: usize, what: &str| {
        system
            .get(which)
            .and_then(launch::Running::pid)
            .with_context(|| format!("the {what}'s pid"))
    };
    let watched = watched.with_service(pid(0, "command API")?);
    let (projector, broker_pid) = (
        pid(1, "projector")?,
        broker.pid().context("the broker's pid")?,
    );
    let companion_ticks = || -> anyhow::Result<[u64; 2]> {
        Ok([
            cpu::process_ticks(projector)?,
            cpu::process_ticks(broker_pid)?,
        ])
    };
    let accounts = open_accounts(client, &api.base, token, ACCOUNTS).await?;
    let waited = Instant::now();
    while !Behind::now(&owner).await?.caught_up() {
        if waited.elapsed() > CATCH_UP_WITHIN {
            bail!("the relay and the projector did not catch up with the accounts' openings");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    load(
        client,
        &api,
        token,
        &accounts,
        DEPLOYED_CLIENTS,
        Duration::from_secs(1),
        "",
    )
    .await;
    // CPU until the relay and the projector have caught up: their share of the deposits'
    // cost includes what they still had to do when the load stopped.
    let companions_before = companion_ticks()?;
    let ((run, behind, caught_up_after), cpu) = watched
        .around(async {
            let run = load(
                client,
                &api,
                token,
                &accounts,
                DEPLOYED_CLIENTS,
                duration,
                "deposits, 1000 accounts, as deployed (relay publishing, projector consuming)",
            )
            .await;
            let stopped = Instant::now();
            let behind = Behind::now(&owner).await?;
            let mut caught_up_after = None;
            while stopped.elapsed() < CATCH_UP_WITHIN {
                if Behind::now(&owner).await?.caught_up() {
                    caught_up_after = Some(stopped.elapsed());
                    break;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Ok((run, behind, caught_up_after))
        })
        .await?;
    let companions_after = companion_ticks()?;
    launch::stop(&mut system).await;
    drop(broker);
    owner.close().await;
    Ok(Deployed {
        measured: Measured { run, cpu },
        behind,
        caught_up_after,
        projector: companions_after[0] - companions_before[0],
        broker: companions_after[1] - companions_before[1],
    })
}

/// A service as the benchmarks run it: the release build on `database`, its ops listener on
/// `ops`, taking tokens signed with [`SECRET`], logging JSON at `info` to nowhere (writing the
/// logs is part of the cost measured, reading them is not).
pub(crate) fn service(which: Service, ops: &str, database: &DatabaseConfig) -> Launch {
    Launch::service(which, Profile::Release, ops)
        .env("DATABASE_URL", database.url.expose_secret())
        .env("JWT_HS256_SECRET", SECRET)
        .env("LOG_FORMAT", "json")
        .env("RUST_LOG", "info")
}

/// An hour-long token for services started with `secret` (and the default issuer and
/// audience), as benchmarks and checks need.
pub(crate) fn service_token(
    secret: &str,
    tenant: &str,
    subject: &str,
    roles: &[&str],
) -> anyhow::Result<String> {
    Ok(mint_hs256(
        &SecretString::from(secret),
        "ledger",
        "ledger",
        &TokenRequest {
            subject,
            tenant,
            roles,
            ttl_seconds: 3600,
        },
    )?)
}

/// The `p` quantile of sorted microsecond samples (signed ones: the time between two milestones
/// that need not come in order), in milliseconds.
pub(crate) fn percentile_ms<T: Copy + Into<f64>>(sorted: &[T], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let index = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[index].into() / 1000.0
}

/// Replaces the `name` section of `BENCHMARKS.md` (between its markers), keeping the others.
pub(crate) fn write_section(name: &str, content: &str) -> anyhow::Result<()> {
    write_section_in("BENCHMARKS.md", name, content)
}

/// Replaces the `name` section of `file` (between its markers), keeping the rest; a missing
/// section is added at the end.
pub(crate) fn write_section_in(file: &str, name: &str, content: &str) -> anyhow::Result<()> {
    let path = workspace_root().join(file);
    let existing = std::fs::read_to_string(&path).unwrap_or_default();
    let begin = format!("<!-- generated:{name} -->");
    let end = format!("<!-- /generated:{name} -->");
    let section = format!("{begin}\n{content}{end}\n");
    let header = "# Benchmarks\n\nEach section is written by the `cargo xtask bench` command it names; do not edit by hand.\n\n";
    let updated = match (existing.find(&begin), existing.find(&end)) {
        (Some(start), Some(stop)) => {
            let rest = existing[stop + end.len()..].trim_start_matches('\n');
            // Sections stack directly; prose after one keeps its blank line.
            let gap = if rest.is_empty() || rest.starts_with("<!-- generated:") {
                ""
            } else {
                "\n"
            };
            format!("{}{section}{gap}{rest}", &existing[..start])
        }
        _ if !existing.is_empty() => format!("{}\n\n{section}", existing.trim_end()),
        _ => format!("{header}{section}"),
    };
    std::fs::write(path, updated)?;
    Ok(())
}

/// Drops and creates `database`, whose name must start with `prefix` (a guard against
/// dropping anything else).
pub(crate) async fn recreate_database(
    database: &DatabaseConfig,
    prefix: &str,
) -> anyhow::Result<()> {
    let name = database
        .url
        .expose_secret()
        .rsplit('/')
        .next()
        .and_then(|tail| tail.split('?').next())
        .filter(|name| name.starts_with(prefix))
        .with_context(|| format!("the database's name must start with {prefix}"))?;
    let admin_url = database
        .url
        .expose_secret()
        .replace(&format!("/{name}"), "/postgres");
    let admin = sqlx::PgPool::connect(&admin_url)
        .await
        .context("is Postgres running? Set DATABASE_URL")?;
    sqlx::query(&format!("DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)"))
        .execute(&admin)
        .await?;
    admin.close().await;
    db::ensure_database_exists(database).await?;
    Ok(())
}

/// A new, empty, migrated database (the old one is dropped), plus the pgbench baseline table.
pub(crate) async fn reset_database(database: &DatabaseConfig) -> anyhow::Result<()> {
    recreate_database(database, "ledger_bench").await?;
    let pool = db::connect(database).await?;
    db::migrate(&pool).await?;
    // The baseline: the same columns and key as postgres-es's table, no trigger, no extra index.
    sqlx::query(
        "CREATE TABLE pgbench_events (
             aggregate_type text NOT NULL, aggregate_id text NOT NULL, sequence bigint NOT NULL,
             event_type text NOT NULL, event_version text NOT NULL, payload json NOT NULL,
             metadata json NOT NULL, PRIMARY KEY (aggregate_type, aggregate_id, sequence))",
    )
    .execute(&pool)
    .await?;
    pool.close().await;
    Ok(())
}

/// Opens `count` accounts in EUR, one request each.
pub(crate) async fn open_accounts(
    client: &reqwest::Client,
    base: &str,
    token: &str,
    count: usize,
) -> anyhow::Result<Vec<Uuid>> {
    let mut ids = Vec::with_capacity(count);
    for _ in 0..count {
        let response: serde_json::Value = client
            .post(format!("{base}/v1/accounts"))
            .bearer_auth(token)
            .json(&json!({"owner": "Benchmark", "currency": "EUR"}))
            .send()
            .await?
            .error_for_status()?
            .json()
            .await?;
        ids.push(
            response["account_id"]
                .as_str()
                .context("account_id")?
                .parse()?,
        );
    }
    Ok(ids)
}

/// Where the benchmarked command API listens: its public port and its ops listener.
pub(crate) struct CommandApi {
    pub(crate) base: String,
    pub(crate) ops: String,
}

/// `concurrency` clients, each sending deposits back to back for `duration`.
pub(crate) async fn load(
    client: &reqwest::Client,
    api: &CommandApi,
    token: &str,
    accounts: &[Uuid],
    concurrency: usize,
    duration: Duration,
    label: &str,
) -> Run {
    let (base, ops) = (api.base.as_str(), api.ops.as_str());
    let before = batch_events(client, ops).await;
    let started = Instant::now();
    let deadline = started + duration;
    let workers = (0..concurrency).map(|worker| {
        let client = client.clone();
        let urls: Vec<String> = accounts
            .iter()
            .map(|id| format!("{base}/v1/accounts/{id}/deposits"))
            .collect();
        let token = token.to_owned();
        tokio::spawn(async move {
            let body =
                serde_json::to_vec(&json!({"amount": 100, "currency": "EUR"})).unwrap_or_default();
            let (mut ok, mut errors, mut server_errors) = (0, 0, 0);
            let mut latencies = Vec::new();
            let mut next = worker;
            while Instant::now() < deadline {
                let url = &urls[next % urls.len()];
                next += concurrency;
                let sent = Instant::now();
                let result = client
                    .post(url)
                    .bearer_auth(&token)
                    .header("content-type", "application/json")
                    .body(body.clone())
                    .send()
                    .await;
                match result {
                    Ok(response) if response.status().is_success() => {
                        let _ = response.bytes().await;
                        ok += 1;
                        latencies.push(sent.elapsed().as_micros() as u32);
                    }
                    Ok(response) => {
                        if response.status().is_server_error() {
                            server_errors += 1;
                        }
                        errors += 1;
                    }
                    Err(_) => errors += 1,
                }
            }
            (ok, errors, server_errors, latencies)
        })
    });
    let mut run = Run::of_workers(
        label,
        concurrency,
        started,
        futures_join(workers.collect()).await,
    );
    if let (Some((sum_before, count_before)), Some((sum, count))) =
        (before, batch_events(client, ops).await)
        && count > count_before
    {
        run.events_per_commit = Some((sum - sum_before) / (count - count_before));
    }
    run
}

/// The sum and count of `ledger_append_batch_events` as the command API's `/metrics` has them.
async fn batch_events(client: &reqwest::Client, ops: &str) -> Option<(f64, f64)> {
    let text = client
        .get(format!("{ops}/metrics"))
        .send()
        .await
        .ok()?
        .text()
        .await
        .ok()?;
    // A series line is `name{labels} value`.
    let value = |name: &str| {
        text.lines().find_map(|line| {
            let rest = line.strip_prefix(name)?;
            let value = match rest.strip_prefix('{') {
                Some(labelled) => labelled.split_once('}')?.1,
                None => rest,
            };
            value.trim().parse::<f64>().ok()
        })
    };
    Some((
        value("ledger_append_batch_events_sum")?,
        value("ledger_append_batch_events_count")?,
    ))
}

async fn futures_join<T>(handles: Vec<tokio::task::JoinHandle<T>>) -> Vec<T> {
    let mut results = Vec::with_capacity(handles.len());
    for handle in handles {
        if let Ok(result) = handle.await {
            results.push(result);
        }
    }
    results
}

/// The INSERT of [`pgbench_insert`]: one ~300-byte event row, autocommitted.
pub(crate) const PGBENCH_INSERT: &str = "INSERT INTO pgbench_events VALUES ('account', md5(random()::text), 1, 'MoneyDeposited', '1', \
     '{\"MoneyDeposited\":{\"amount\":100,\"currency\":\"EUR\",\"balance_after\":12300}}', \
     '{\"tenant\":\"bench\",\"actor\":\"bench\",\"correlation_id\":\"0b4c3a8e-6d2f-4f6e-9a59-1f0d3c5e7a21\",\
     \"causation_id\":\"0b4c3a8e-6d2f-4f6e-9a59-1f0d3c5e7a21\",\"request_id\":\"0b4c3a8e-6d2f-4f6e-9a59-1f0d3c5e7a21\"}');\n";

/// pgbench inserting one event-sized row (~300 bytes) per transaction into a table with the
/// event store's columns and primary key.
pub(crate) async fn pgbench_insert(
    url: &str,
    concurrency: usize,
    seconds: u64,
) -> anyhow::Result<Run> {
    pgbench(
        url,
        concurrency,
        seconds,
        PGBENCH_INSERT,
        &[],
        "pgbench: INSERT one ~300-byte event row",
    )
    .await
}

/// pgbench running `script` (with `options`, e.g. the query protocol) for `seconds` on
/// `concurrency` connections, one transaction per run of the script.
pub(crate) async fn pgbench(
    url: &str,
    concurrency: usize,
    seconds: u64,
    script: &str,
    options: &[&str],
    label: &str,
) -> anyhow::Result<Run> {
    let dir = std::env::temp_dir().join(format!("ledger-pgbench-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let script_path = dir.join("script.sql");
    std::fs::write(&script_path, script)?;
    let output = Command::new("pgbench")
        .current_dir(&dir)
        .args([
            "-n",
            "-c",
            &concurrency.to_string(),
            "-j",
            "2",
            "-T",
            &seconds.to_string(),
            "-l",
        ])
        .args(options)
        .arg("-f")
        .arg(&script_path)
        .arg(url)
        .output()
        .await
        .context("running pgbench (Debian package postgresql-contrib / postgresql-client)")?;
    if !output.status.success() {
        bail!(
            "pgbench failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
    }
    let mut latencies = Vec::new();
    for entry in std::fs::read_dir(&dir)? {
        let path = entry?.path();
        if path
            .file_name()
            .is_some_and(|n| n.to_string_lossy().starts_with("pgbench_log"))
        {
            for line in std::fs::read_to_string(&path)?.lines() {
                // client_id transaction_no time_us script_no time_epoch time_us_fraction
                if let Some(micros) = line.split_whitespace().nth(2).and_then(|v| v.parse().ok()) {
                    latencies.push(micros);
                }
            }
        }
    }
    std::fs::remove_dir_all(&dir)?;
    latencies.sort_unstable();
    Ok(Run {
        label: label.into(),
        concurrency,
        ok: latencies.len(),
        errors: 0,
        server_errors: 0,
        elapsed: Duration::from_secs(seconds),
        latencies,
        // One transaction per run of the script, autocommitted.
        events_per_commit: Some(1.0),
    })
}

/// The resident memory of process `pid`, in KiB.
pub(crate) fn rss_kib(pid: u32) -> anyhow::Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|kib| kib.parse().ok())
        .context("VmRSS")
}

/// The machine and database the numbers come from.
pub(crate) async fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|info| {
            info.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|m| m.trim().to_owned())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(0);
    let memory_gib = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .next()
                .and_then(|l| l.split_whitespace().nth(1))
                .map(str::to_owned)
        })
        .and_then(|kb| kb.parse::<u64>().ok())
        .map_or(0, |kb| kb / 1024 / 1024);
    let postgres = Command::new("psql")
        .arg("--version")
        .output()
        .await
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_default();
    format!(
        "Machine: {cpu}, {cores} cores, {memory_gib} GiB RAM; {postgres} on the same machine (default settings)"
    )
}

async fn report(
    runs: &[Measured],
    deployed: Option<&Deployed>,
    seconds: u64,
    hot_events: i64,
) -> anyhow::Result<String> {
    let mut out = String::new();
    writeln!(
        out,
        "## Commands: deposits through the command API vs pgbench\n"
    )?;
    writeln!(
        out,
        "{}. `cargo xtask bench commands`: the command API is the release build with JSON logs at \
         `info` (to /dev/null) and its Kafka relay off, but for the last row; the load generator \
         (HTTP/1.1 keep-alive, one connection per client) and pgbench run on the same cores. \
         Each run lasts {seconds} s after a 1 s warm-up; latency is measured by the client, successful \
         requests only. pgbench inserts one ~300-byte row per transaction into a table with the event \
         store's columns and primary key (no hash-chain trigger), committing each row on its own. \
         The command API group-commits: commands waiting for one stream are decided in turn and \
         appended together, and the appends of concurrent streams go out as one INSERT and one \
         commit (`command-api/src/engine/stream.rs`, `command-api/src/engine/append.rs`); the \
         events per commit are the mean from its `/metrics`. CPU per operation is from /proc: the \
         command API process, and every Postgres process (backends, pgbench's included, and \
         background processes; ended ones through the postmaster's children's times), divided by \
         the operations done; the load generator's is in neither.\n",
        machine().await
    )?;
    writeln!(
        out,
        "| workload | clients | ok/s | p50 ms | p99 ms | non-2xx | 5xx | vs pgbench | events per commit | command API µs/op | Postgres µs/op |"
    )?;
    writeln!(
        out,
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
    )?;
    let pgbench = |concurrency: usize| {
        runs.iter()
            .find(|m| m.run.label.starts_with("pgbench") && m.run.concurrency == concurrency)
            .map(|m| m.run.throughput())
    };
    for Measured { run, cpu } in runs.iter().chain(deployed.map(|d| &d.measured)) {
        let is_pgbench = run.label.starts_with("pgbench");
        let ratio = match pgbench(run.concurrency) {
            Some(b) if !is_pgbench => format!("{:.2}x", run.throughput() / b),
            _ => "-".into(),
        };
        writeln!(
            out,
            "| {} | {} | {:.0} | {:.2} | {:.2} | {} | {} | {} | {} | {} | {:.0} |",
            run.label,
            run.concurrency,
            run.throughput(),
            run.percentile_ms(0.50),
            run.percentile_ms(0.99),
            run.errors,
            run.server_errors,
            ratio,
            run.events_per_commit
                .map_or_else(|| "-".to_owned(), |mean| format!("{mean:.1}")),
            if is_pgbench {
                "-".to_owned()
            } else {
                format!("{:.0}", cpu::Ticks::micros_per_op(cpu.service, run.ok))
            },
            cpu::Ticks::micros_per_op(cpu.postgres, run.ok),
        )?;
    }
    writeln!(
        out,
        "\nThe hot account's stream had grown to {hot_events} events for the row \"after the runs \
         above\": a command costs the same on a long stream, because the account's state is cached \
         between commands and an append only inserts (see `command-api/src/engine/stream.rs`).\n"
    )?;
    if let Some(deployed) = deployed {
        let relay_off = runs.iter().find(|m| {
            m.run.label == "deposits, 1000 accounts" && m.run.concurrency == DEPLOYED_CLIENTS
        });
        let on = &deployed.measured;
        let per_deposit = |ticks: u64| cpu::Ticks::micros_per_op(ticks, on.run.ok);
        let machine = |m: &Measured| cpu::Ticks::micros_per_op(m.cpu.busy, m.run.ok);
        writeln!(
            out,
            "As deployed (last row): a new database, the command API with its relay publishing to \
             the broker (nisshi 0.8.1, memory storage, on the same machine) and the projector \
             consuming. Its CPU is counted until both had caught up after the load: the command \
             API's column holds its relay too, the Postgres column the relay's and the projector's \
             work in Postgres, and the bench's own look at how far behind they were (every \
             100 ms once the load stopped). The projector's and the broker's own processes, in \
             neither column, spent **{:.0} µs** and **{:.0} µs** per deposit; the whole machine \
             (the load generator too) {:.0} µs per deposit as deployed against {} relay-off: on \
             two saturated cores, the machine's CPU per deposit is what bounds the rate. \
             The relay-off runs were made on the database the earlier runs had grown, this one on \
             a new one (1000 accounts opened, then a 1 s warm-up). Against the relay-off run of {DEPLOYED_CLIENTS} \
             clients over 1000 accounts above: **{}** (target ≥ 0.8x). When the load stopped, the \
             relay had {} events unpublished and the projector {} account events unapplied; both \
             had caught up {}.\n",
            per_deposit(deployed.projector),
            per_deposit(deployed.broker),
            machine(on),
            relay_off.map_or_else(|| "-".to_owned(), |off| format!("{:.0} µs", machine(off))),
            relay_off.map_or_else(
                || "-".to_owned(),
                |off| format!("{:.2}x", on.run.throughput() / off.run.throughput())
            ),
            deployed.behind.unpublished,
            deployed.behind.unprojected,
            deployed.caught_up_after.map_or_else(
                || format!("not within {} s", CATCH_UP_WITHIN.as_secs()),
                |after| format!("{:.1} s later", after.as_secs_f64())
            ),
        )?;
    }
    Ok(out)
}

/// The ticks the whole machine has spent busy since boot, from `/proc/stat`.
pub(crate) fn machine_busy_ticks() -> anyhow::Result<u64> {
    let stat = std::fs::read_to_string("/proc/stat")?;
    // `cpu  user nice system idle iowait irq softirq steal ...`: busy is all but idle and
    // iowait.
    let fields: Vec<u64> = stat
        .lines()
        .next()
        .context("/proc/stat is empty")?
        .split_whitespace()
        .skip(1)
        .take(8)
        .map(str::parse)
        .collect::<Result<_, _>>()?;
    Ok(fields.iter().sum::<u64>() - fields[3] - fields[4])
}
