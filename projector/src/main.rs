//! `projector`: runs, rebuilds or checks the read models. `clap` parses the subcommand: usage,
//! `--help` and errors from a maintained parser.

use std::io::Write;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use projector::{Config, Projector, check, rebuild};
use service_kit::db;
use service_kit::http::shutdown_signal;
use service_kit::telemetry::{self, LogFormat, TracingConfig};

/// The allocator of every Ledger service: why in `command-api/src/main.rs`.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// The projector: keeps the read models, rebuilds them, checks them. Configured by environment
/// variables (README.md).
#[derive(Parser)]
#[command(name = "projector", version)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Consume the event topics into the read models (the default).
    Run,
    /// Replay the event store into fresh read-model tables and swap them in.
    Rebuild,
    /// Compare the read models with a fold of the event store; exit 1 on any difference.
    Check,
}

#[tokio::main]
async fn main() -> anyhow::Result<ExitCode> {
    let command = Cli::parse().command;
    let _telemetry = telemetry::init(
        LogFormat::from_env()?,
        &TracingConfig::from_env("projector")?,
    )?;
    match command {
        None | Some(Command::Run) => {
            Projector::build(Config::from_env()?)
                .await?
                .run_until_stopped(shutdown_signal())
                .await;
        }
        Some(Command::Rebuild) => {
            let pool = db::connect(&db::DatabaseConfig::from_env()?).await?;
            db::migrate(&pool).await?;
            let report = rebuild::rebuild(&pool, true).await?;
            tracing::info!(
                events = report.events,
                rows = ?report.rows,
                seconds = report.elapsed.as_secs_f64(),
                "read models rebuilt and swapped in"
            );
        }
        Some(Command::Check) => {
            let pool = db::connect(&db::DatabaseConfig::from_env()?).await?;
            let report = check::check(&pool).await?;
            let mut out = std::io::stdout().lock();
            for difference in &report.differences {
                writeln!(out, "{}: {}", difference.id, difference.what)?;
            }
            for (model, rows) in &report.rows {
                write!(out, "{model}: {rows}, ")?;
            }
            writeln!(
                out,
                "events: {}, differences: {}, time taken: {:.2} s",
                report.events,
                report.differences.len(),
                report.elapsed.as_secs_f64()
            )?;
            if !report.differences.is_empty() {
                return Ok(ExitCode::FAILURE);
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}
