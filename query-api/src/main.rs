use query_api::{Application, Config};
use service_kit::telemetry::{self, LogFormat, TracingConfig};

/// The allocator of every Ledger service: why in `command-api/src/main.rs`.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let _telemetry = telemetry::init(
        LogFormat::from_env()?,
        &TracingConfig::from_env("query-api")?,
    )?;
    let app = Application::build(Config::from_env()?).await?;
    app.run_until_stopped(service_kit::http::shutdown_signal())
        .await;
    Ok(())
}
