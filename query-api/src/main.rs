use query_api::{Application, Config};
use service_kit::telemetry::{self, LogFormat};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    telemetry::init(LogFormat::from_env()?);
    let app = Application::build(Config::from_env()?).await?;
    app.run_until_stopped(service_kit::http::shutdown_signal())
        .await?;
    Ok(())
}
