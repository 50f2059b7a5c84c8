use projector::{Config, Projector, rebuild};
use service_kit::db;
use service_kit::http::shutdown_signal;
use service_kit::telemetry::{self, LogFormat};

const USAGE: &str = "usage: projector [run|rebuild]
  run (default)  consume the event topics into the read models
  rebuild        replay the event store into fresh read-model tables and swap them in";

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    telemetry::init(LogFormat::from_env()?);
    match std::env::args().nth(1).as_deref() {
        None | Some("run") => {
            Projector::build(Config::from_env()?)
                .await?
                .run_until_stopped(shutdown_signal())
                .await;
        }
        Some("rebuild") => {
            let pool = db::connect(&db::DatabaseConfig::from_env()?).await?;
            db::migrate(&pool).await?;
            let report = rebuild::rebuild(&pool, true).await?;
            tracing::info!(
                events = report.events,
                accounts = report.accounts,
                seconds = report.elapsed.as_secs_f64(),
                "read models rebuilt and swapped in"
            );
        }
        Some(_) => anyhow::bail!(USAGE),
    }
    Ok(())
}
