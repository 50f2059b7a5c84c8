use command_api::{Application, Config};
use service_kit::telemetry::{self, LogFormat};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    telemetry::init(LogFormat::from_env()?);
    let config = Config::from_env()?;
    let app = Application::build(config).await?;
    app.run_until_stopped(service_kit::http::shutdown_signal())
        .await?;
    Ok(())
}
