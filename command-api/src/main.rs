use command_api::process::{ProcessConfig, ProcessManager};
use command_api::relay::{Relay, RelayConfig};
use command_api::{AppendSignal, Application, Config};
use service_kit::db::{self, DatabaseConfig};
use service_kit::http::shutdown_signal;
use service_kit::telemetry::{self, LogFormat, TracingConfig};

const USAGE: &str = "usage: command-api [relay|process-transfers|migrate]
  (no argument)      serve the command API (and the Kafka relay unless COMMAND_API_RELAY=false)
  relay              run only the Kafka relay
  process-transfers  run the transfer process manager
  migrate            apply the pending migrations (as the database's owner) and exit";

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let command = std::env::args().nth(1);
    let service = match command.as_deref() {
        Some("process-transfers") => "process-manager",
        Some("relay") => "relay",
        _ => "command-api",
    };
    let _telemetry = telemetry::init(LogFormat::from_env()?, &TracingConfig::from_env(service)?)?;
    match command.as_deref() {
        None => {
            let app = Application::build(Config::from_env()?).await?;
            app.run_until_stopped(shutdown_signal()).await;
        }
        Some("relay") => {
            let pool = db::connect(&DatabaseConfig::from_env()?).await?;
            db::migrate(&pool).await?;
            Relay::new(RelayConfig::from_env()?, pool, AppendSignal::default())?
                .run(shutdown_signal())
                .await;
        }
        Some("process-transfers") => {
            ProcessManager::build(ProcessConfig::from_env()?)
                .await?
                .run(shutdown_signal())
                .await;
        }
        Some("migrate") => {
            let pool = db::connect(&DatabaseConfig::from_env()?).await?;
            db::migrate(&pool).await?;
            tracing::info!("migrations applied");
        }
        Some(_) => anyhow::bail!(USAGE),
    }
    Ok(())
}
