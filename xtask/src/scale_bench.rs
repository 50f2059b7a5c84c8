//! `cargo xtask bench scale`: the hot path on years of history. Seeds a store of about 10 M
//! events through the hash-chain trigger (so `ledger-audit verify` accepts it): one account
//! credited by 1 M finished transfers, their 1 M transfer streams and source debits, 100
//! transfers in flight, 100 k other accounts, and deposits on the source accounts. Then
//! measures, against the release command API on that store: the first command on the big
//! account after a restart (cold cache), the command API's memory after touching 100 k
//! accounts and after 100 k unknown ids, the stuck-transfer sweep, the relay's lag probe, and
//! deposits on that store and on an empty one, in turns. Writes its section of `BENCHMARKS.md`.

use std::fmt::Write as _;
use std::time::{Duration, Instant};

use anyhow::Context;
use futures::StreamExt;
use serde_json::json;
use service_kit::db::{self, DatabaseConfig};
use service_kit::event_log::{self, LogPosition};
use sqlx::PgPool;
use uuid::Uuid;

use crate::bench::{
    CommandApi, SECRET, load, machine, percentile_ms, reset_database, rss_kib, service,
    service_token, write_section,
};
use crate::launch::{self, Profile, Running, Service, free_address};
use service_kit::progress::Progress;

const TENANT: &str = "bench";
/// Source accounts: each pays 1,000 of the transfers and takes the deposits.
const SOURCES: i64 = 1000;
const DEPOSITS_PER_SOURCE: i64 = 4000;
const IN_FLIGHT: i64 = 100;
/// Streams per seeding statement: a few hundred thousand events each.
const CHUNK: i64 = 25_000;
/// Deposit runs on each store, in turns.
const ROUNDS: usize = 3;
/// Runs of the sweep's query and of the lag probe.
const PROBES: usize = 200;

/// `cargo xtask bench scale`
#[derive(clap::Args)]
pub(crate) struct Options {
    /// Finished transfers, all into one account (its stream gets one event per transfer).
    #[arg(long, default_value_t = 1_000_000)]
    transfers: i64,
    /// Other accounts, opened only: touched once each to measure the cache's memory.
    #[arg(long, default_value_t = 100_000)]
    accounts: i64,
    /// Restarts of the command API, each followed by one command on the big account.
    #[arg(long, default_value_t = 20)]
    restarts: usize,
    /// Length of each deposit run.
    #[arg(long, default_value_t = 10)]
    seconds: u64,
    /// The server to benchmark on (its database is dropped and created); default
    /// `DATABASE_URL`, else `postgres://postgres@127.0.0.1:5432/ledger_bench`.
    #[arg(long, value_name = "URL")]
    database_url: Option<String>,
}

fn source(j: i64) -> Uuid {
    Uuid::new_v5(&Uuid::NAMESPACE_OID, format!("source-{j}").as_bytes())
}

pub(crate) async fn run(options: &Options) -> anyhow::Result<()> {
    let server_url = options
        .database_url
        .clone()
        .or_else(|| std::env::var("DATABASE_URL").ok())
        .unwrap_or_else(|| "postgres://postgres@127.0.0.1:5432/ledger_bench".to_owned());
    let database = DatabaseConfig::with_url(&server_url);
    launch::build(Profile::Release, &["command-api"]).await?;
    let token = service_token(SECRET, TENANT, "bench", &["teller"])?;
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(128)
        .build()?;
    let sources: Vec<Uuid> = (0..SOURCES).map(source).collect();
    let mut out = String::new();

    // The baseline: the same accounts in a store of their own, holding nothing else.
    let empty_store = database.with_database("ledger_bench_empty")?;
    reset_database(&empty_store).await?;
    let empty_pool = db::connect(&empty_store).await?;
    sqlx::query("CREATE EXTENSION IF NOT EXISTS \"uuid-ossp\"")
        .execute(&empty_pool)
        .await?;
    seed_sources(&empty_pool, 0, 0).await?;
    empty_pool.close().await;

    reset_database(&database).await?;
    // Each seeding statement writes a few hundred thousand events: far past the services'
    // statement timeout, which the probes measured below keep.
    let seeder = db::connect(&DatabaseConfig {
        statement_timeout: Duration::from_secs(600),
        ..database.clone()
    })
    .await?;
    let started = Instant::now();
    let events = seed(&seeder, options).await?;
    let seeding = started.elapsed();
    println!(
        "seeded {events} events in {:.0} s; analysing",
        seeding.as_secs_f64()
    );
    // What autovacuum does on a live store: the seed inserted and deleted a million rows of
    // `transfers_in_flight` within minutes, and wrote ten million events at once.
    sqlx::query("VACUUM ANALYZE").execute(&seeder).await?;
    seeder.close().await;
    let pool = db::connect(&database).await?;

    let big = Uuid::new_v5(&Uuid::NAMESPACE_OID, b"big");
    let deposit = json!({"amount": 1, "currency": "EUR"});
    let first_command = |api: &CommandApi, account: Uuid| {
        let request = client
            .post(format!("{}/v1/accounts/{account}/deposits", api.base))
            .bearer_auth(&token)
            .json(&deposit);
        async move {
            let sent = Instant::now();
            let response = request.send().await?.error_for_status()?;
            let _ = response.bytes().await?;
            anyhow::Ok(sent.elapsed())
        }
    };
    // The very first load of the big account has no snapshot yet: it folds the whole stream
    // once, in pages, and leaves a snapshot.
    // It may outlast the request's timeout (the load goes on in its own task), so it is timed
    // until the snapshot is written, whatever the client was answered.
    let (mut api, mut server) = start(&database).await?;
    let sent = Instant::now();
    let answer = match first_command(&api, big).await {
        Ok(_) => "answered 200".to_owned(),
        Err(err) => format!("answered: {err}"),
    };
    wait_for_snapshot(&pool, big).await?;
    let unsnapshotted = sent.elapsed();
    launch::stop(&mut server).await;
    // After each restart, a first command on an account of one event, never touched before,
    // takes what a new process pays once (connections, statement plans): the control.
    let (mut cold, mut control) = (Vec::new(), Vec::new());
    for restart in 0..options.restarts {
        (api, server) = start(&database).await?;
        let small = other(options.accounts - 1 - restart as i64);
        control.push(first_command(&api, small).await?.as_micros() as u32);
        cold.push(first_command(&api, big).await?.as_micros() as u32);
        launch::stop(&mut server).await;
    }
    cold.sort_unstable();
    control.sort_unstable();

    (api, server) = start(&database).await?;
    let pid = server[0].pid().context("the command API's pid")?;
    let rss_start = rss_kib(pid)?;
    let others: Vec<Uuid> = (0..options.accounts).map(other).collect();
    let touched = touch(&client, &api, &token, &others).await;
    let rss_touched = rss_kib(pid)?;
    let unknown: Vec<Uuid> = (0..options.accounts).map(|_| Uuid::new_v4()).collect();
    let probed = touch(&client, &api, &token, &unknown).await;
    let rss_probed = rss_kib(pid)?;
    // Deposits on both stores, taking turns, so that whatever else the machine does weighs
    // on both alike.
    let (empty_api, mut empty_server) = start(&empty_store).await?;
    let (mut empty, mut full) = (Vec::new(), Vec::new());
    for _ in 0..ROUNDS {
        empty.push(deposits(&client, &empty_api, &token, &sources, options.seconds).await);
        full.push(deposits(&client, &api, &token, &sources, options.seconds).await);
    }
    launch::stop(&mut empty_server).await;
    launch::stop(&mut server).await;

    let sweep = timed(PROBES, || async {
        let (count, ids) = command_api::process::stuck_transfers(
            &pool,
            Duration::ZERO,
            command_api::process::MAX_SWEEP,
        )
        .await?;
        anyhow::ensure!(
            count == IN_FLIGHT && ids.len() == IN_FLIGHT as usize,
            "the sweep found {count} transfers in flight, not {IN_FLIGHT}"
        );
        Ok(())
    })
    .await?;
    let lag = timed(PROBES, || async {
        event_log::lag(&pool, LogPosition::START).await?;
        Ok(())
    })
    .await?;
    let stored: i64 = sqlx::query_scalar("SELECT count(*) FROM events")
        .fetch_one(&pool)
        .await?;
    let big_events: i64 = sqlx::query_scalar("SELECT count(*) FROM events WHERE aggregate_id = $1")
        .bind(big.to_string())
        .fetch_one(&pool)
        .await?;
    pool.close().await;

    writeln!(
        out,
        "## Scale: the hot path on a store of {stored} events\n"
    )?;
    writeln!(
        out,
        "{}. `cargo xtask bench scale`: seeded through the hash-chain trigger in {:.0} s \
         ({:.0} events/s): one account credited by {} finished transfers ({big_events} events), \
         the transfers' streams (4 events each) and their debits on {SOURCES} source accounts \
         (each also holding {DEPOSITS_PER_SOURCE} deposits), {IN_FLIGHT} transfers in flight, \
         {} other accounts; then `VACUUM ANALYZE`, autovacuum's work on a live store. No \
         snapshot was seeded: each stream gets its first on its first load. The command API is \
         the release build with default settings (snapshot every 500 events, cache of 100,000 \
         streams) and its relay off. The deposit runs start after one deposit to each account \
         (its first load) and a 1 s warm-up. Other builds were running on the machine's 2 cores \
         during this run.\n",
        machine().await,
        seeding.as_secs_f64(),
        events as f64 / seeding.as_secs_f64(),
        options.transfers,
        options.accounts,
    )?;
    writeln!(out, "| measure | result | target |")?;
    writeln!(out, "|---|---:|---:|")?;
    writeln!(
        out,
        "| first command on the big account, its first load ever (no snapshot yet: folds every event, 1,000 a page), until its snapshot is written; {answer} | {:.0} ms | - |",
        unsnapshotted.as_secs_f64() * 1000.0
    )?;
    writeln!(
        out,
        "| first command on the big account after a restart, p50 / p99 of {} restarts (snapshot + tail) | {:.1} / {:.1} ms | p99 <= 20 ms |",
        options.restarts,
        percentile_ms(&cold, 0.50),
        percentile_ms(&cold, 0.99)
    )?;
    writeln!(
        out,
        "| control: the command before it, the process's first, on an untouched account of one event | {:.1} / {:.1} ms | - |",
        percentile_ms(&control, 0.50),
        percentile_ms(&control, 0.99)
    )?;
    writeln!(
        out,
        "| command API RSS: started / after deposits to {} distinct accounts ({} ok) / after as many unknown ids ({} answered 404) | {} / {} / {} MiB | unknown ids add nothing |",
        options.accounts,
        touched.ok,
        probed.not_found,
        rss_start / 1024,
        rss_touched / 1024,
        rss_probed / 1024
    )?;
    writeln!(
        out,
        "| stuck-transfer sweep ({} finished, {IN_FLIGHT} in flight), p50 / p99 of {PROBES} | {:.2} / {:.2} ms | <= 20 ms |",
        options.transfers,
        percentile_ms(&sweep, 0.50),
        percentile_ms(&sweep, 0.99)
    )?;
    writeln!(
        out,
        "| relay lag probe, p50 / p99 of {PROBES} | {:.2} / {:.2} ms | <= 5 ms |",
        percentile_ms(&lag, 0.50),
        percentile_ms(&lag, 0.99)
    )?;
    let rate =
        |runs: &[(f64, f64, f64)]| runs.iter().map(|run| run.0).sum::<f64>() / runs.len() as f64;
    let rates = |runs: &[(f64, f64, f64)]| {
        runs.iter()
            .map(|run| format!("{:.0}", run.0))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let latencies = |runs: &[(f64, f64, f64)]| {
        runs.iter()
            .map(|run| format!("{:.2} / {:.2}", run.1, run.2))
            .collect::<Vec<_>>()
            .join(", ")
    };
    writeln!(
        out,
        "| deposits/s, 16 clients over {SOURCES} accounts, {ROUNDS} runs each in turns: empty store ({}) / this store ({}) | {:.2}x | >= 0.9x |",
        rates(&empty),
        rates(&full),
        rate(&full) / rate(&empty)
    )?;
    writeln!(
        out,
        "| deposit p50 / p99 ms per run: empty store / this store | {}; {} | - |\n",
        latencies(&empty),
        latencies(&full)
    )?;
    println!("{out}");
    write_section("scale", &out)?;
    println!("written to BENCHMARKS.md");
    Ok(())
}

fn other(i: i64) -> Uuid {
    Uuid::new_v5(&Uuid::NAMESPACE_OID, format!("account-{i}").as_bytes())
}

/// The release command API on `database`, relay off, no rate limit, ready.
async fn start(database: &DatabaseConfig) -> anyhow::Result<(CommandApi, Vec<Running>)> {
    let (address, ops) = (free_address()?, free_address()?);
    let server = launch::start(vec![
        service(Service::CommandApi, &ops, database)
            .env("COMMAND_API_ADDR", &address)
            .env("COMMAND_API_RELAY", "false")
            .env("RATE_LIMIT_PER_TENANT", "0"),
    ])
    .await?;
    Ok((
        CommandApi {
            base: format!("http://{address}"),
            ops: format!("http://{ops}"),
        },
        server,
    ))
}

/// Deposits at 16 clients over `accounts` for `seconds`, after one deposit to each (the
/// cold loads, measured above) and a 1 s warm-up: ok/s, p50, p99.
async fn deposits(
    client: &reqwest::Client,
    api: &CommandApi,
    token: &str,
    accounts: &[Uuid],
    seconds: u64,
) -> (f64, f64, f64) {
    touch(client, api, token, accounts).await;
    load(client, api, token, accounts, 16, Duration::from_secs(1), "").await;
    let run = load(
        client,
        api,
        token,
        accounts,
        16,
        Duration::from_secs(seconds),
        "deposits",
    )
    .await;
    (
        run.throughput(),
        run.percentile_ms(0.50),
        run.percentile_ms(0.99),
    )
}

#[derive(Default)]
struct Touched {
    ok: usize,
    not_found: usize,
}

/// One deposit to each of `accounts`, 16 at a time.
async fn touch(
    client: &reqwest::Client,
    api: &CommandApi,
    token: &str,
    accounts: &[Uuid],
) -> Touched {
    let statuses: Vec<Option<reqwest::StatusCode>> = futures::stream::iter(accounts)
        .map(|id| {
            let request = client
                .post(format!("{}/v1/accounts/{id}/deposits", api.base))
                .bearer_auth(token)
                .json(&json!({"amount": 1, "currency": "EUR"}));
            async move { request.send().await.ok().map(|response| response.status()) }
        })
        .buffer_unordered(16)
        .collect()
        .await;
    let mut touched = Touched::default();
    for status in statuses.into_iter().flatten() {
        if status.is_success() {
            touched.ok += 1;
        } else if status == reqwest::StatusCode::NOT_FOUND {
            touched.not_found += 1;
        }
    }
    touched
}

/// `times` runs of `attempt`, sorted, in microseconds.
async fn timed<F, Fut>(times: usize, mut attempt: F) -> anyhow::Result<Vec<u32>>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = anyhow::Result<()>>,
{
    let mut samples = Vec::with_capacity(times);
    for _ in 0..times {
        let started = Instant::now();
        attempt().await?;
        samples.push(started.elapsed().as_micros() as u32);
    }
    samples.sort_unstable();
    Ok(samples)
}

async fn wait_for_snapshot(pool: &PgPool, stream: Uuid) -> anyhow::Result<()> {
    for _ in 0..3000 {
        let taken: Option<i64> =
            sqlx::query_scalar("SELECT version FROM snapshots WHERE aggregate_id = $1")
                .bind(stream.to_string())
                .fetch_optional(pool)
                .await?;
        if taken.is_some() {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    anyhow::bail!("no snapshot of the big account after five minutes")
}

const INSERT: &str = "INSERT INTO events (aggregate_type, aggregate_id, sequence, event_type, event_version, payload, metadata) ";

/// An `AccountOpened` payload in SQL.
const OPENED: &str = "json_build_object('AccountOpened', json_build_object('tenant', 'bench', \
     'owner', 'Benchmark', 'currency', 'EUR', 'overdraft_limit', 0, 'max_balance', 100000000000000000))";

const METADATA: &str = "'{\"tenant\":\"bench\",\"actor\":\"seed\"}'::json";

/// The source accounts `j` in `0..SOURCES`, opened, with `deposits` deposits each and their
/// debits for the transfers `j * per .. (j + 1) * per` (`per` = `transfers / SOURCES`).
async fn seed_sources(pool: &PgPool, deposits: i64, transfers: i64) -> anyhow::Result<i64> {
    let per = transfers / SOURCES;
    let last = 1 + deposits + per;
    let mut written = 0;
    for first in (0..SOURCES).step_by(20) {
        let sql = format!(
            "{INSERT}
             SELECT 'account', uuid_generate_v5(uuid_ns_oid(), 'source-' || j)::text, s,
                    CASE WHEN s = 1 THEN 'AccountOpened' WHEN s <= {deposits} THEN 'MoneyDeposited' ELSE 'TransferDebited' END,
                    CASE WHEN s = 1 THEN '2' ELSE '1' END,
                    CASE WHEN s = 1 THEN {OPENED}
                         WHEN s <= {deposits} THEN json_build_object('MoneyDeposited', json_build_object(
                              'amount', 1000, 'currency', 'EUR', 'balance_after', (s - 1) * 1000))
                         ELSE json_build_object('TransferDebited', json_build_object(
                              'transfer_id', uuid_generate_v5(uuid_ns_oid(), 'transfer-' || (j * {per} + s - {deposits} - 1)),
                              'amount', 1, 'currency', 'EUR',
                              'balance_after', {balance} - (s - {deposits})))
                    END,
                    {METADATA}
               FROM generate_series($1::int8, $2::int8) AS j, generate_series(1, {last}) AS s
              ORDER BY j, s",
            deposits = 1 + deposits,
            balance = deposits * 1000,
        );
        written += sqlx::query(&sql)
            .bind(first)
            .bind((first + 19).min(SOURCES - 1))
            .execute(pool)
            .await?
            .rows_affected() as i64;
    }
    Ok(written)
}

/// Runs `sql` for the ranges `first..=last` ($1, $2) that cover `0..total`, `chunk` at a time,
/// moving `bar` on from `before` events; returns the rows written.
async fn in_chunks(
    pool: &PgPool,
    sql: &str,
    total: i64,
    chunk: i64,
    bar: &Progress,
    before: i64,
) -> anyhow::Result<i64> {
    let mut written = 0;
    for first in (0..total).step_by(chunk as usize) {
        let last = (first + chunk).min(total) - 1;
        written += sqlx::query(sql)
            .bind(first)
            .bind(last)
            .execute(pool)
            .await?
            .rows_affected() as i64;
        bar.update((before + written) as u64);
    }
    Ok(written)
}

/// The whole store; returns the number of events written.
async fn seed(pool: &PgPool, options: &Options) -> anyhow::Result<i64> {
    sqlx::query("CREATE EXTENSION IF NOT EXISTS \"uuid-ossp\"")
        .execute(pool)
        .await?;
    let bar = Progress::new(
        "seeding",
        (SOURCES * (1 + DEPOSITS_PER_SOURCE) + 6 * options.transfers + options.accounts) as u64,
        true,
    );
    let mut written = seed_sources(pool, DEPOSITS_PER_SOURCE, options.transfers).await?;
    bar.update(written as u64);
    let big = "uuid_generate_v5(uuid_ns_oid(), 'big')::text";
    written += sqlx::query(&format!(
        "{INSERT} SELECT 'account', {big}, 1, 'AccountOpened', '2', {OPENED}, {METADATA}"
    ))
    .execute(pool)
    .await?
    .rows_affected() as i64;
    let sql = format!(
        "{INSERT}
             SELECT 'account', {big}, k + 2, 'TransferCredited', '1',
                    json_build_object('TransferCredited', json_build_object(
                        'transfer_id', uuid_generate_v5(uuid_ns_oid(), 'transfer-' || k),
                        'amount', 1, 'currency', 'EUR', 'balance_after', k + 1)),
                    {METADATA}
               FROM generate_series($1::int8, $2::int8) AS k ORDER BY k"
    );
    written += in_chunks(pool, &sql, options.transfers, CHUNK * 4, &bar, written).await?;
    let per = options.transfers / SOURCES;
    let sql = format!(
            "{INSERT}
             SELECT 'transfer', uuid_generate_v5(uuid_ns_oid(), 'transfer-' || k)::text, s,
                    (ARRAY['TransferRequested', 'SourceDebited', 'DestinationCredited', 'TransferCompleted'])[s],
                    '1',
                    CASE s WHEN 1 THEN json_build_object('TransferRequested', json_build_object(
                                'tenant', 'bench',
                                'from', uuid_generate_v5(uuid_ns_oid(), 'source-' || (k / {per})),
                                'to', {big}, 'amount', 1, 'currency', 'EUR', 'reference', ''))
                           ELSE to_json((ARRAY['', 'SourceDebited', 'DestinationCredited', 'TransferCompleted'])[s])
                    END,
                    {METADATA}
               FROM generate_series($1::int8, $2::int8) AS k, generate_series(1, 4) AS s
              ORDER BY k, s"
    );
    written += in_chunks(pool, &sql, options.transfers, CHUNK, &bar, written).await?;
    written += sqlx::query(&format!(
        "{INSERT}
         SELECT 'transfer', uuid_generate_v5(uuid_ns_oid(), 'in-flight-' || k)::text, 1,
                'TransferRequested', '1',
                json_build_object('TransferRequested', json_build_object(
                    'tenant', 'bench', 'from', uuid_generate_v5(uuid_ns_oid(), 'source-0'),
                    'to', {big}, 'amount', 1, 'currency', 'EUR', 'reference', '')),
                {METADATA}
           FROM generate_series(1, {IN_FLIGHT}) AS k"
    ))
    .execute(pool)
    .await?
    .rows_affected() as i64;
    let sql = format!(
        "{INSERT}
             SELECT 'account', uuid_generate_v5(uuid_ns_oid(), 'account-' || i)::text, 1,
                    'AccountOpened', '2', {OPENED}, {METADATA}
               FROM generate_series($1::int8, $2::int8) AS i"
    );
    written += in_chunks(pool, &sql, options.accounts, CHUNK * 4, &bar, written).await?;
    bar.finish(written as u64);
    Ok(written)
}
