//! `cargo xtask fuzz`: schema-driven HTTP fuzzing of both APIs from their own OpenAPI
//! documents, with schemathesis (PyPI, pinned), against the real services on a scratch
//! database. Every check is on (no 5xx, every response as documented, problem+json errors,
//! invalid input refused) except `positive_data_acceptance`: the domain refuses some
//! schema-valid requests on purpose (an account that does not exist, a transfer to the same
//! account). Exits non-zero if schemathesis finds anything.

use std::process::Stdio;

use anyhow::{Context, bail};
use service_kit::db::{self, DatabaseConfig};
use tokio::process::Command;

use crate::bench::{free_port, service_token, wait_ready};
use crate::dev::{stop, workspace_root};

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

    let status = Command::new(env!("CARGO"))
        .args(["build", "-p", "command-api", "-p", "query-api"])
        .status()
        .await?;
    if !status.success() {
        bail!("cargo build failed");
    }
    let (command_port, query_port) = (free_port()?, free_port()?);
    let (command_ops, query_ops) = (free_port()?, free_port()?);
    let service = |name: &str| {
        let mut command = Command::new(workspace_root().join("target/debug").join(name));
        command
            .env("DATABASE_URL", &database.url)
            .env("JWT_HS256_SECRET", SECRET)
            .env("COMMAND_API_RELAY", "false")
            .env("COMMAND_API_ADDR", format!("127.0.0.1:{command_port}"))
            .env("QUERY_API_ADDR", format!("127.0.0.1:{query_port}"))
            .env("COMMAND_API_OPS_ADDR", format!("127.0.0.1:{command_ops}"))
            .env("QUERY_API_OPS_ADDR", format!("127.0.0.1:{query_ops}"))
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stdin(Stdio::null())
            .kill_on_drop(true);
        command
    };
    let mut children = vec![
        service("command-api")
            .spawn()
            .context("starting command-api")?,
        service("query-api").spawn().context("starting query-api")?,
    ];
    let apis = [
        ("command API", format!("http://127.0.0.1:{command_port}")),
        ("query API", format!("http://127.0.0.1:{query_port}")),
    ];
    for ops in [command_ops, query_ops] {
        wait_ready(&format!("http://127.0.0.1:{ops}")).await?;
    }
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
    for child in &mut children {
        stop(child).await;
    }
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
