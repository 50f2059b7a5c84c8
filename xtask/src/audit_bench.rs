//! `cargo xtask bench audit`: what an auditor waits for. Verify, replay, export and the
//! read-model check over a large event store, beside a plain read of the same rows in the
//! same order (the floor any of them can reach); and the latency of the per-account audit
//! queries. Writes its section of `BENCHMARKS.md`.

use std::fmt::Write as _;
use std::time::{Duration, Instant};

use audit::export::{self, Format, Selection};
use audit::state::{self, AsOf};
use audit::verify::{self, Scope};
use futures::TryStreamExt;
use service_kit::db::{self, DatabaseConfig};
use service_kit::event_log::{EVENT_COLUMNS, LoggedEvent};
use sqlx::PgPool;

use crate::bench::{machine, reset_database, write_section};
use crate::pipeline_bench::{SEED_ACCOUNTS, seed};

/// Per-account queries timed for the latency rows.
const SAMPLES: usize = 300;

/// `cargo xtask bench audit`
#[derive(clap::Args)]
pub(crate) struct Options {
    /// Events in the store each pass runs over.
    #[arg(long, default_value_t = 1_000_000)]
    events: i64,
}

pub(crate) async fn run(options: &Options) -> anyhow::Result<()> {
    let events = options.events;
    let url = std::env::var("DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/ledger_bench_audit".into());
    let mut database = DatabaseConfig::with_url(&url);
    // As `ledger-audit` connects: one scan may cover the whole history.
    database.statement_timeout = Duration::ZERO;
    reset_database(&database).await?;
    let pool = db::connect(&database).await?;
    println!("seeding {events} events...");
    seed(&pool, events).await?;
    sqlx::query("VACUUM ANALYZE events").execute(&pool).await?;
    let total: i64 = sqlx::query_scalar("SELECT count(*) FROM events")
        .fetch_one(&pool)
        .await?;

    // Warm the cache once, so that every measured pass starts from the same place.
    plain_read(&pool).await?;
    println!("measuring...");
    let (read, read_time) = timed(plain_read(&pool)).await?;
    let (verified, verify_time) = timed(verify::verify_store(&pool, &Scope::All, false)).await?;
    anyhow::ensure!(
        verified.intact() && verified.events == read,
        "verify disagrees"
    );
    let (replayed, replay_time) = timed(audit::replay::replay(
        &pool,
        chrono::Utc::now(),
        None,
        false,
    ))
    .await?;
    let (exported, export_time) = timed(export::export(
        &pool,
        &Selection::default(),
        Format::JsonLines,
        std::io::sink(),
        false,
    ))
    .await?;
    projector::rebuild::rebuild(&pool, false).await?;
    let (checked, check_time) = timed(projector::check::check(&pool)).await?;
    anyhow::ensure!(checked.differences.is_empty(), "check found differences");

    let accounts: Vec<String> =
        sqlx::query_scalar("SELECT DISTINCT aggregate_id FROM events ORDER BY 1")
            .fetch_all(&pool)
            .await?;
    let mut verify_one = Vec::with_capacity(SAMPLES);
    let mut state_at = Vec::with_capacity(SAMPLES);
    // As the audit API runs them: each in its own tenant-scoped transaction.
    for account in accounts.iter().cycle().take(SAMPLES) {
        let started = Instant::now();
        let mut scope = db::tenant_scope(&pool, "bench").await?;
        verify::verify_stream(&mut scope, audit::ACCOUNT, account).await?;
        drop(scope);
        verify_one.push(started.elapsed());
        let started = Instant::now();
        let mut scope = db::tenant_scope(&pool, "bench").await?;
        state::account_as_of(&mut scope, account, AsOf::Instant(chrono::Utc::now())).await?;
        drop(scope);
        state_at.push(started.elapsed());
    }
    pool.close().await;

    let per_account = total / SEED_ACCOUNTS;
    let rate = |count: u64, time: Duration| count as f64 / time.as_secs_f64();
    let floor = rate(read, read_time);
    let mut out = String::new();
    writeln!(out, "## Audit: verify, replay, export, check\n")?;
    writeln!(
        out,
        "{}. `cargo xtask bench audit --events {events}`: {total} events over {SEED_ACCOUNTS} \
         accounts ({per_account} per stream), seeded through the hash-chain trigger, the table \
         cached by one unmeasured read. Each row is one pass over every event, in process, with \
         the code `ledger-audit` and `projector check` run; \"plain read\" streams the same rows \
         in the same order and does nothing with them: the floor for the others.\n",
        machine().await
    )?;
    writeln!(
        out,
        "| pass over {total} events | time | events/s | vs plain read | target |"
    )?;
    writeln!(out, "|---|---:|---:|---:|---:|")?;
    for (name, count, time, target) in [
        ("plain read (sqlx, stream order)", read, read_time, "-"),
        (
            "`ledger-audit verify` (every hash recomputed)",
            verified.events,
            verify_time,
            "≥ 100,000",
        ),
        (
            "`ledger-audit replay --until now` (every event folded)",
            replayed.events,
            replay_time,
            "-",
        ),
        (
            "`ledger-audit export` (JSON Lines, to /dev/null)",
            exported.events,
            export_time,
            "-",
        ),
        (
            "`projector check` (fold + compare every row)",
            checked.events,
            check_time,
            "-",
        ),
    ] {
        writeln!(
            out,
            "| {name} | {:.2} s | {:.0} | {:.2}x | {target} |",
            time.as_secs_f64(),
            rate(count, time),
            rate(count, time) / floor
        )?;
    }
    writeln!(
        out,
        "\nPer-account audit queries ({SAMPLES} calls each, streams of {per_account} events, one at a time):\n"
    )?;
    writeln!(out, "| query | p50 ms | p99 ms |")?;
    writeln!(out, "|---|---:|---:|")?;
    for (name, samples) in [
        ("verify one stream (`GET .../verify`)", &mut verify_one),
        (
            "state as of an instant (`GET .../state?at=`)",
            &mut state_at,
        ),
    ] {
        samples.sort();
        writeln!(
            out,
            "| {name} | {:.2} | {:.2} |",
            quantile(samples, 0.50),
            quantile(samples, 0.99)
        )?;
    }
    println!("{out}");
    write_section("audit", &out)?;
    println!("written to BENCHMARKS.md");
    Ok(())
}

async fn timed<T, E>(work: impl Future<Output = Result<T, E>>) -> Result<(T, Duration), E> {
    let started = Instant::now();
    let result = work.await?;
    Ok((result, started.elapsed()))
}

/// Every event, decoded as verify decodes it, in verify's order.
async fn plain_read(pool: &PgPool) -> anyhow::Result<u64> {
    let query = format!(
        "SELECT {EVENT_COLUMNS} FROM events ORDER BY aggregate_type, aggregate_id, sequence"
    );
    let mut rows = sqlx::query_as::<_, LoggedEvent>(&query).fetch(pool);
    let mut count = 0;
    while rows.try_next().await?.is_some() {
        count += 1;
    }
    Ok(count)
}

fn quantile(sorted: &[Duration], p: f64) -> f64 {
    let index = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[index].as_secs_f64() * 1000.0
}
