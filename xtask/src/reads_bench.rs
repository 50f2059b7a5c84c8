//! `cargo xtask bench reads`: `GET /v1/accounts/{id}` of the real query API (release build,
//! real Postgres, as its least-privileged login) under wrk, beside pgbench inserting one row
//! and selecting one row by primary key, in one run on one machine, with the CPU each read
//! costs the query API and Postgres; written to `BENCHMARKS.md`.

use std::fmt::Write as _;
use std::time::Duration;

use anyhow::{Context, bail};
use service_kit::ExposeSecret;
use service_kit::db::channels::{ReadModel, notify_changed};
use service_kit::db::{self, DatabaseConfig, ServiceRole};
use tokio::process::Command;
use uuid::Uuid;

use crate::bench::{
    SECRET, machine, pgbench, pgbench_insert, reset_database, service, service_token, write_section,
};
use crate::cpu;
use crate::launch::{self, Profile, Service, free_address};

/// Accounts read in each run; twice as many are seeded: the first half is notified as the
/// projector notifies its commits, the second never is.
const ACCOUNTS: u32 = 1000;
const CONCURRENCY: [usize; 3] = [1, 16, 64];
const TENANT: &str = "bench";
/// The account columns the API returns, for pgbench's SELECT of the same row.
const COLUMNS: &str =
    "id, owner, currency, balance, overdraft_limit, status, version, opened_at, updated_at";

/// `cargo xtask bench reads`
#[derive(clap::Args)]
pub(crate) struct Options {
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
}

/// One timed run and what it cost.
struct Row {
    label: &'static str,
    clients: usize,
    ok: u64,
    errors: u64,
    elapsed: Duration,
    p50_ms: f64,
    p99_ms: f64,
    cpu: cpu::Ticks,
}

impl Row {
    fn throughput(&self) -> f64 {
        self.ok as f64 / self.elapsed.as_secs_f64()
    }

    /// CPU microseconds per operation of `ticks`.
    fn micros_per_op(&self, ticks: u64) -> f64 {
        cpu::Ticks::micros_per_op(ticks, self.ok as usize)
    }
}

const READ: &str = "query API: `GET /v1/accounts/{id}`, not notified lately (read from Postgres)";
const NOT_MODIFIED: &str =
    "query API: same, changed and notified just before, `If-None-Match` the current tag (304)";
const REMEMBERED: &str =
    "query API: same, each account changed and notified every second (mostly from memory)";
const INSERT: &str = "pgbench: INSERT one ~300-byte event row";
const SELECT: &str = "pgbench: SELECT one account row by primary key";

pub(crate) async fn run(options: &Options) -> anyhow::Result<()> {
    let concurrencies: Vec<usize> = match options.clients {
        Some(clients) => vec![clients],
        None => CONCURRENCY.to_vec(),
    };
    let seconds = options.seconds;
    let server_url = options
        .database_url
        .clone()
        .or_else(|| std::env::var("DATABASE_URL").ok())
        .unwrap_or_else(|| "postgres://postgres@127.0.0.1:5432/ledger_bench".to_owned());

    launch::build(Profile::Release, &["query-api"]).await?;
    let database = DatabaseConfig::with_url(&server_url);
    reset_database(&database).await?;
    let owner = db::connect(&database).await?;
    ServiceRole::ensure_development_logins(&owner)
        .await
        .context("creating the services' development logins (needs CREATEROLE)")?;
    seed(&owner).await?;
    let notified: Vec<Uuid> = (1..=ACCOUNTS).map(account_id).collect();

    let (address, ops) = (free_address()?, free_address()?);
    let reader = DatabaseConfig::with_url(
        ServiceRole::TenantReader.development_url(database.url.expose_secret()),
    );
    let mut server = launch::start(vec![
        service(Service::QueryApi, &ops, &reader)
            .env("QUERY_API_ADDR", &address)
            // One tenant at full speed: the per-tenant limit would be what is measured.
            .env("RATE_LIMIT_PER_TENANT", "0"),
    ])
    .await?;
    let query_api = server
        .first()
        .and_then(launch::Running::pid)
        .context("the query API's pid")?;

    let token = service_token(SECRET, TENANT, "bench", &["viewer"])?;
    check_answers(&address, &token, notified[0]).await?;
    check_answers(&address, &token, account_id(ACCOUNTS + 1)).await?;
    let dir = std::env::temp_dir().join(format!("ledger-reads-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let read = dir.join("read.lua");
    std::fs::write(&read, wrk_script(&token, ACCOUNTS, None))?;
    let remembered = dir.join("remembered.lua");
    std::fs::write(&remembered, wrk_script(&token, 0, None))?;
    let unchanged = dir.join("unchanged.lua");
    let select = format!(
        "\\set n random(1, {ACCOUNTS})\n\
         SELECT {COLUMNS} FROM accounts WHERE id = {};\n",
        account_id_sql(":n")
    );

    let url = format!("http://{address}/");
    let owner_url = database.url.expose_secret().to_owned();
    let pids = cpu::Watched::new(query_api, &owner).await?;
    let mut rows = Vec::new();
    for clients in concurrencies {
        // A short warm-up fills the connection pool and the statement caches.
        wrk(&url, &read, clients, 1).await?;
        rows.push(measured(READ, clients, &pids, wrk(&url, &read, clients, seconds)).await?);

        let version = change(&owner, &notified).await?;
        std::fs::write(&unchanged, wrk_script(&token, 0, Some(version)))?;
        rows.push(
            measured(
                NOT_MODIFIED,
                clients,
                &pids,
                wrk(&url, &unchanged, clients, seconds),
            )
            .await?,
        );

        let changing = tokio::spawn(keep_changing(owner.clone(), notified.clone()));
        wrk(&url, &remembered, clients, 1).await?;
        let row = measured(
            REMEMBERED,
            clients,
            &pids,
            wrk(&url, &remembered, clients, seconds),
        )
        .await?;
        if changing.is_finished() {
            changing.await??;
            bail!("the accounts stopped changing");
        }
        changing.abort();
        rows.push(row);
        rows.push(
            measured(INSERT, clients, &pids, async {
                pgbench_insert(&owner_url, clients, seconds)
                    .await
                    .map(Timed::of)
            })
            .await?,
        );
        rows.push(
            measured(SELECT, clients, &pids, async {
                pgbench(
                    &owner_url,
                    clients,
                    seconds,
                    &select,
                    &["-M", "prepared"],
                    SELECT,
                )
                .await
                .map(Timed::of)
            })
            .await?,
        );
    }
    launch::stop(&mut server).await;
    owner.close().await;
    std::fs::remove_dir_all(&dir)?;

    let report = report(&rows, seconds).await?;
    println!("{report}");
    if options.clients.is_none() {
        write_section("reads", &report)?;
        println!("written to BENCHMARKS.md");
    }
    Ok(())
}

/// The SQL of account number `n`'s id: ids are numbered, so that pgbench can pick one.
fn account_id_sql(n: &str) -> String {
    format!("('00000000-0000-0000-0000-' || lpad(({n})::text, 12, '0'))::uuid")
}

/// Changes every account of `ids` to its next version, as the projector commits a change: in
/// one transaction with its notification. The query API then knows each account's version for
/// a while (`query-api/src/versions.rs`): it answers a client that has it with 304, and reads
/// the account once to answer the next reads from memory. Returns the new version (the
/// accounts change together, so they share it).
async fn change(owner: &sqlx::PgPool, ids: &[Uuid]) -> anyhow::Result<i64> {
    let mut tx = owner.begin().await?;
    let version = sqlx::query_scalar(
        "UPDATE accounts SET version = version + 1, updated_at = now() WHERE id = ANY($1)
         RETURNING version",
    )
    .bind(ids)
    .fetch_all(&mut *tx)
    .await?
    .into_iter()
    .max()
    .context("no account to change")?;
    notify_changed(&mut tx, ReadModel::Account, ids).await?;
    tx.commit().await?;
    Ok(version)
}

/// [`change`]s `ids` every second.
async fn keep_changing(owner: sqlx::PgPool, ids: Vec<Uuid>) -> anyhow::Result<()> {
    let mut every = tokio::time::interval(Duration::from_secs(1));
    loop {
        every.tick().await;
        change(&owner, &ids).await?;
    }
}

/// Seeds the read model with twice [`ACCOUNTS`] accounts of [`TENANT`] at version 1, as the
/// projector writes them, numbered from 1 ([`account_id`]).
async fn seed(owner: &sqlx::PgPool) -> anyhow::Result<()> {
    sqlx::query(&format!(
        "INSERT INTO accounts (id, tenant, owner, currency, overdraft_limit, balance, status,
                               version, opened_at, updated_at)
         SELECT {}, $1, 'Benchmark', 'EUR', 0, 12300, 'active', 1, now(), now()
           FROM generate_series(1, $2) AS n",
        account_id_sql("n")
    ))
    .bind(TENANT)
    .bind(2 * ACCOUNTS as i32)
    .execute(owner)
    .await?;
    sqlx::query("ANALYZE accounts").execute(owner).await?;
    Ok(())
}

/// The id of account number `n`, as [`account_id_sql`] makes it and the wrk script asks for it.
fn account_id(n: u32) -> Uuid {
    format!("00000000-0000-0000-0000-{n:012}")
        .parse()
        .expect("a numbered account id")
}

/// Refuses to measure answers other than those the rows name: the account with its tag, and
/// 304 for that tag.
async fn check_answers(address: &str, token: &str, id: Uuid) -> anyhow::Result<()> {
    let client = reqwest::Client::new();
    let url = format!("http://{address}/v1/accounts/{id}");
    let read = client.get(&url).bearer_auth(token).send().await?;
    let etag = read.headers().get("etag").cloned();
    if read.status() != reqwest::StatusCode::OK || etag.as_ref().is_none_or(|tag| tag != "\"1\"") {
        bail!("reading an account answered {} {etag:?}", read.status());
    }
    let unchanged = client
        .get(&url)
        .bearer_auth(token)
        .header("if-none-match", "\"1\"")
        .send()
        .await?;
    if unchanged.status() != reqwest::StatusCode::NOT_MODIFIED {
        bail!("If-None-Match answered {}", unchanged.status());
    }
    Ok(())
}

/// wrk's script: each connection reads [`ACCOUNTS`] accounts in turn from number `first + 1`
/// (threads start at different ones), as `token`'s tenant, with `version` as the tag in
/// `If-None-Match` if given.
fn wrk_script(token: &str, first: u32, version: Option<i64>) -> String {
    let tag = version
        .map(|version| format!("wrk.headers[\"If-None-Match\"] = '\"{version}\"'\n"))
        .unwrap_or_default();
    format!(
        "wrk.headers[\"Authorization\"] = \"Bearer {token}\"\n\
         {tag}\
         local next = math.random(0, {last})\n\
         request = function()\n\
         \x20 next = (next + 1) % {ACCOUNTS}\n\
         \x20 return wrk.format(\"GET\", string.format(\"/v1/accounts/00000000-0000-0000-0000-%012d\", next + {first} + 1))\n\
         end\n",
        last = ACCOUNTS - 1
    )
}

/// Counts and latencies of a run, as the load generator reports them.
struct Timed {
    ok: u64,
    errors: u64,
    elapsed: Duration,
    p50_ms: f64,
    p99_ms: f64,
}

impl Timed {
    fn of(run: crate::bench::Run) -> Self {
        Self {
            ok: run.ok as u64,
            errors: run.errors as u64,
            elapsed: run.elapsed,
            p50_ms: run.percentile_ms(0.50),
            p99_ms: run.percentile_ms(0.99),
        }
    }
}

/// wrk on `clients` connections (HTTP/1.1 keep-alive) for `seconds`.
async fn wrk(
    url: &str,
    script: &std::path::Path,
    clients: usize,
    seconds: u64,
) -> anyhow::Result<Timed> {
    let output = Command::new("wrk")
        .args([
            "--latency",
            "-t",
            &clients.min(2).to_string(),
            "-c",
            &clients.to_string(),
            "-d",
            &format!("{seconds}s"),
            "-s",
        ])
        .arg(script)
        .arg(url)
        .output()
        .await
        .context("running wrk (Debian package wrk)")?;
    let text = String::from_utf8_lossy(&output.stdout);
    if !output.status.success() {
        bail!(
            "wrk failed: {text}{}",
            String::from_utf8_lossy(&output.stderr)
        );
    }
    parse_wrk(&text, Duration::from_secs(seconds)).with_context(|| format!("wrk said: {text}"))
}

/// The requests, errors and latency percentiles of wrk's `--latency` output.
fn parse_wrk(text: &str, elapsed: Duration) -> anyhow::Result<Timed> {
    let line = |prefix: &str| text.lines().map(str::trim).find(|l| l.starts_with(prefix));
    let requests: u64 = text
        .lines()
        .find(|l| l.contains(" requests in "))
        .and_then(|l| l.split_whitespace().next())
        .context("requests")?
        .parse()?;
    // `Non-2xx or 3xx responses: N` and `Socket errors: connect N, read N, write N, timeout N`
    // appear only when there were any.
    let failed: u64 = line("Non-2xx or 3xx responses:")
        .and_then(|l| l.rsplit(' ').next())
        .map_or(Ok(0), str::parse)?;
    let socket: u64 = line("Socket errors:").map_or(0, |l| {
        l.split(',')
            .filter_map(|part| part.split_whitespace().last()?.parse::<u64>().ok())
            .sum()
    });
    let percentile = |p: &str| -> anyhow::Result<f64> {
        let value = line(p)
            .and_then(|l| l.split_whitespace().nth(1))
            .with_context(|| format!("{p} latency"))?;
        milliseconds(value)
    };
    Ok(Timed {
        ok: requests - failed,
        errors: failed + socket,
        elapsed,
        p50_ms: percentile("50%")?,
        p99_ms: percentile("99%")?,
    })
}

/// wrk's `635.00us`, `1.20ms` or `1.01s` in milliseconds.
fn milliseconds(value: &str) -> anyhow::Result<f64> {
    let (number, factor) = if let Some(n) = value.strip_suffix("us") {
        (n, 0.001)
    } else if let Some(n) = value.strip_suffix("ms") {
        (n, 1.0)
    } else if let Some(n) = value.strip_suffix('s') {
        (n, 1000.0)
    } else {
        bail!("unknown unit in {value}")
    };
    Ok(number.parse::<f64>()? * factor)
}

/// Runs `load`, sampling CPU around it.
async fn measured(
    label: &'static str,
    clients: usize,
    pids: &cpu::Watched,
    load: impl Future<Output = anyhow::Result<Timed>>,
) -> anyhow::Result<Row> {
    println!("{label}, {clients} clients...");
    let (timed, cpu) = pids.around(load).await?;
    Ok(Row {
        label,
        clients,
        ok: timed.ok,
        errors: timed.errors,
        elapsed: timed.elapsed,
        p50_ms: timed.p50_ms,
        p99_ms: timed.p99_ms,
        cpu,
    })
}

async fn report(rows: &[Row], seconds: u64) -> anyhow::Result<String> {
    let mut out = String::new();
    writeln!(
        out,
        "## Reads: one account through the query API vs pgbench\n"
    )?;
    writeln!(
        out,
        "{}. `cargo xtask bench reads`: the query API is the release build with JSON logs at \
         `info` (to /dev/null), connected as its least-privileged login (row-level security \
         applies), per-tenant rate limit off; {seeded} accounts of one tenant seeded into the \
         read model. Each run reads {ACCOUNTS} of them. The first, accounts never notified, which \
         the query API reads from Postgres. The other two, accounts the projector's notification \
         names (trusted for 10 s), each changed to its next version and notified in one \
         transaction as the projector commits: for the 304 run, once just before it; for the last \
         run, every second, so that the query API reads each from Postgres once after each \
         change and answers the rest from memory. wrk (HTTP/1.1 \
         keep-alive, one connection per client, up to 2 threads) reads the accounts in turn; \
         pgbench inserts one ~300-byte row per transaction (as in `bench commands`) and selects \
         one account row by primary key (prepared, as superuser: no row-level security), the \
         ceiling of a one-row read. Load generators and Postgres share the machine's cores. \
         Each run lasts {seconds} s; the query API's runs follow a 1 s warm-up. Latency is \
         measured by the load generator. CPU per operation is from /proc: the query API \
         process, and every Postgres process (backends, pgbench's included, and background \
         processes; ended ones through the postmaster's children's times), divided by the \
         operations done; in the last run it also holds the accounts' changes and notifications \
         (1000 a second). Machine busy is every process's CPU, the load generators' included. A \
         version is trusted 10 s from its notification, so in a 304 run of 10 s the last moments \
         are read from Postgres.\n",
        machine().await,
        seeded = 2 * ACCOUNTS,
    )?;
    writeln!(
        out,
        "| workload | clients | ok/s | p50 ms | p99 ms | errors | vs INSERT | vs SELECT | query API µs/op | Postgres µs/op | machine busy |"
    )?;
    writeln!(
        out,
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
    )?;
    for row in rows {
        let baseline = |label: &str| {
            rows.iter()
                .find(|other| other.label == label && other.clients == row.clients)
                .map(Row::throughput)
        };
        let ratio = |label: &str| match baseline(label) {
            Some(base) if !row.label.starts_with("pgbench") => {
                format!("{:.2}x", row.throughput() / base)
            }
            _ => "-".into(),
        };
        let query_api = if row.label.starts_with("pgbench") {
            "-".to_owned()
        } else {
            format!("{:.0}", row.micros_per_op(row.cpu.service))
        };
        writeln!(
            out,
            "| {} | {} | {:.0} | {:.2} | {:.2} | {} | {} | {} | {} | {:.0} | {:.2} cores |",
            row.label,
            row.clients,
            row.throughput(),
            row.p50_ms,
            row.p99_ms,
            row.errors,
            ratio(INSERT),
            ratio(SELECT),
            query_api,
            row.micros_per_op(row.cpu.postgres),
            row.cpu.busy as f64 / cpu::TICKS_PER_SECOND / row.elapsed.as_secs_f64(),
        )?;
    }
    writeln!(out)?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wrk_output_is_read_with_its_units_and_its_failures() {
        let text = "Running 1s test @ http://127.0.0.1:1/\n\
            \x20 2 threads and 16 connections\n\
            \x20 Latency Distribution\n\
            \x20    50%  635.00us\n\
            \x20    75%    1.20ms\n\
            \x20    99%    1.01s\n\
            \x20 12345 requests in 1.00s, 5.00MB read\n\
            \x20 Socket errors: connect 0, read 2, write 0, timeout 3\n\
            \x20 Non-2xx or 3xx responses: 12\n\
            Requests/sec:  12345.00\n";
        let timed = parse_wrk(text, Duration::from_secs(1)).unwrap();
        assert_eq!((timed.ok, timed.errors), (12333, 17));
        assert!((timed.p50_ms - 0.635).abs() < 1e-9);
        assert!((timed.p99_ms - 1010.0).abs() < 1e-9);
    }
}
