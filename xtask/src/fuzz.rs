//! `cargo xtask fuzz`: schema-driven HTTP fuzzing of both APIs from their own OpenAPI
//! documents, with schemathesis (PyPI, pinned), against the real services on a scratch
//! database. Every check is on (no 5xx, every response as documented, problem+json errors,
//! invalid input refused) except `positive_data_acceptance`: the domain refuses some
//! schema-valid requests on purpose (an account that does not exist, a transfer to the same
//! account). Exits non-zero if schemathesis finds anything.

use anyhow::{Context, bail};
use service_kit::ExposeSecret;
use service_kit::db::{self, DatabaseConfig};
use tokio::process::Command;

use crate::bench::service_token;
use crate::dev::workspace_root;
use crate::launch::{self, Launch, Profile, Service, free_address};

/// The version pinned in `xtask/python-constraints.txt`.
const SCHEMATHESIS: &str = "schemathesis";
const SECRET: &str = "fuzz-secret-0123456789abcdef0123456789abcdef";

/// `cargo xtask fuzz`
#[derive(clap::Args)]
pub(crate) struct Options {
    /// Examples schemathesis generates per operation.
    #[arg(long, value_name = "N", default_value_t = 50)]
    examples: u32,
}

pub(crate) async fn run(options: &Options) -> anyhow::Result<()> {
    ensure_schemathesis().await?;
    let url = std::env::var("DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/ledger_fuzz".into());
    let database = DatabaseConfig::with_url(&url);
    db::ensure_database_exists(&database).await?;
    let pool = db::connect(&database).await?;
    db::migrate(&pool).await?;
    pool.close().await;

    launch::build(Profile::Debug, &["command-api", "query-api"]).await?;
    let (command_addr, query_addr) = (free_address()?, free_address()?);
    let service = |which: Service| -> anyhow::Result<Launch> {
        Ok(Launch::service(which, Profile::Debug, &free_address()?)
            .env("DATABASE_URL", database.url.expose_secret())
            .env("JWT_HS256_SECRET", SECRET)
            .env("COMMAND_API_RELAY", "false")
            .env("COMMAND_API_ADDR", &command_addr)
            .env("QUERY_API_ADDR", &query_addr)
            .env("RUST_LOG", "warn"))
    };
    let mut services = launch::start(vec![
        service(Service::CommandApi)?,
        service(Service::QueryApi)?,
    ])
    .await?;
    let apis = [
        ("command API", format!("http://{command_addr}")),
        ("query API", format!("http://{query_addr}")),
    ];
    let token = service_token(SECRET, "fuzz", "fuzzer", &["teller", "viewer", "auditor"])?;
    let config = workspace_root().join("xtask/fuzz/schemathesis.toml");
    let mut failed = Vec::new();
    for (name, base) in &apis {
        println!("\n==> {name}: {base}/openapi.json");
        let status = Command::new("schemathesis")
            .arg("--config-file")
            .arg(&config)
            .args(["run", &format!("{base}/openapi.json")])
            .args(["--header", &format!("Authorization: Bearer {token}")])
            .args([
                "--checks",
                "all",
                "--exclude-checks",
                "positive_data_acceptance",
            ])
            .args([
                "--max-examples",
                &options.examples.to_string(),
                "--workers",
                "2",
            ])
            .arg("--report-dir")
            .arg(workspace_root().join("target/fuzz"))
            .status()
            .await
            .context("running schemathesis")?;
        if !status.success() {
            failed.push(*name);
        }
    }
    launch::stop(&mut services).await;
    if !failed.is_empty() {
        bail!(
            "schemathesis found failures in the {}",
            failed.join(" and the ")
        );
    }
    println!("\nno failures in either API");
    Ok(())
}

/// Installs schemathesis and everything it pulls in at the pinned versions, every time: a
/// package left at another version by something else (a newer hypothesis crashed on this
/// machine's Python) is put back. Quick when all are in place already.
async fn ensure_schemathesis() -> anyhow::Result<()> {
    crate::test::pip_install(SCHEMATHESIS).await
}
