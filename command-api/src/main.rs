//! `command-api`: the command API, or the relay, the process manager or the migrations alone.
//! `clap` parses the subcommand: usage, `--help` and errors from a maintained parser.

use clap::{Parser, Subcommand};
use command_api::config::COMMAND_API_WORKER_THREADS;
use command_api::process::{ProcessConfig, ProcessManager};
use command_api::relay::{Relay, RelayConfig};
use command_api::{AppendSignal, Application, Config};
use service_kit::db::{self, DatabaseConfig};
use service_kit::http::shutdown_signal;
use service_kit::telemetry::{self, LogFormat, TracingConfig};

/// A request allocates and frees many small buffers, often on another thread than the one that
/// allocated them: glibc's allocator spent about a tenth of the command API's CPU under load
/// (perf, `cargo xtask bench commands`).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Serves the command API (and the Kafka relay unless COMMAND_API_RELAY=false), or runs one
/// of the processes that share its code. Configured by environment variables (README.md).
#[derive(Parser)]
#[command(name = "command-api", version)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Run only the Kafka relay.
    Relay,
    /// Run the transfer process manager.
    ProcessTransfers,
    /// Apply the pending migrations (as the database's owner) and exit.
    Migrate,
}

fn main() -> anyhow::Result<()> {
    let command = Cli::parse().command;
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(COMMAND_API_WORKER_THREADS.read()?.get())
        .enable_all()
        .build()?
        .block_on(run(command))
}

async fn run(command: Option<Command>) -> anyhow::Result<()> {
    let service = match command {
        Some(Command::ProcessTransfers) => "process-manager",
        Some(Command::Relay) => "relay",
        None | Some(Command::Migrate) => "command-api",
    };
    let _telemetry = telemetry::init(LogFormat::from_env()?, &TracingConfig::from_env(service)?)?;
    match command {
        None => {
            let app = Application::build(Config::from_env()?).await?;
            app.run_until_stopped(shutdown_signal()).await;
        }
        Some(Command::Relay) => {
            let pool = db::connect(&DatabaseConfig::from_env()?).await?;
            db::migrate(&pool).await?;
            Relay::new(RelayConfig::from_env()?, pool, AppendSignal::default())?
                .run(shutdown_signal())
                .await;
        }
        Some(Command::ProcessTransfers) => {
            ProcessManager::build(ProcessConfig::from_env()?)
                .await?
                .run(shutdown_signal())
                .await;
        }
        Some(Command::Migrate) => {
            let pool = db::connect(&DatabaseConfig::from_env()?).await?;
            db::migrate(&pool).await?;
            tracing::info!("migrations applied");
        }
    }
    Ok(())
}
