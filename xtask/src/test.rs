//! `cargo xtask test`: the README's test command.

use anyhow::{Context, bail};
use service_kit::db::{TEST_RUN_VARIABLE, test_run_prefix};
use sqlx::{Connection, PgConnection};
use tokio::process::Command;

use crate::broker;

/// Where tests look for Postgres when `DATABASE_URL` is not set.
const LOCAL_POSTGRES: &str = "postgres://postgres@127.0.0.1:5432/postgres";

/// `cargo xtask test [ARGS]... [-- TEST_ARGS]...`, as `cargo test --workspace` takes them.
#[derive(clap::Args)]
pub(crate) struct Options {
    /// Passed to cargo test, e.g. `-p domain`.
    #[arg(allow_hyphen_values = true)]
    args: Vec<String>,
    /// Passed to the test binaries, e.g. `--nocapture`.
    #[arg(last = true)]
    test_args: Vec<String>,
}

impl Options {
    /// The arguments for `cargo test --workspace`, as they were given: clap keeps a `--` that
    /// follows other arguments in `args`, but takes a leading one as its own separator and
    /// drops it, so it is put back here.
    pub(crate) fn cargo_test_args(&self) -> Vec<String> {
        let mut all = self.args.clone();
        if !self.test_args.is_empty() {
            all.push("--".to_owned());
            all.extend(self.test_args.iter().cloned());
        }
        all
    }
}

pub(crate) async fn run(options: &Options) -> anyhow::Result<()> {
    let database_url = match std::env::var("DATABASE_URL") {
        Ok(url) => Some(url),
        Err(_) => match PgConnection::connect(LOCAL_POSTGRES).await {
            Ok(connection) => {
                let _ = connection.close().await;
                Some(LOCAL_POSTGRES.to_owned())
            }
            Err(_) => {
                println!(
                    "no DATABASE_URL and no Postgres on 127.0.0.1:5432: tests will start one with testcontainers"
                );
                None
            }
        },
    };
    crate::python::ensure_tools().await?;
    // The OpenID Connect tests' provider: `npm ci` here, once, rather than inside a test.
    service_kit::dev_provider::ensure_installed().await?;
    ensure_browser().await?;
    let run = uuid::Uuid::new_v4().simple().to_string()[..8].to_owned();
    // A broker for the tests, unless one is named; it stops when this command ends.
    let broker = match std::env::var("KAFKA_BROKERS") {
        Ok(_) => None,
        Err(_) => Some(broker::start(broker::Storage::Memory).await?),
    };
    let mut cargo = Command::new(env!("CARGO"));
    cargo
        .current_dir(crate::dev::workspace_root())
        .args(["test", "--workspace"])
        .args(options.cargo_test_args());
    if let Some(url) = &database_url {
        cargo.env("DATABASE_URL", url);
    }
    if let Some(broker) = &broker {
        cargo.env("KAFKA_BROKERS", &broker.address);
    }
    // For the tests that stop and restart a broker of their own.
    cargo.env("NISSHI_BIN", broker::ensure_installed().await?);
    cargo.env(TEST_RUN_VARIABLE, &run);
    // The analyst tests read topics with a Kafka client that is not ours (confluent-kafka,
    // which bundles a current librdkafka), and the fuzz tests run schemathesis: both from the
    // project's venv, found first on the PATH.
    let path = std::env::var_os("PATH").unwrap_or_default();
    cargo.env(
        "PATH",
        std::env::join_paths(
            std::iter::once(crate::python::bin()).chain(std::env::split_paths(&path)),
        )?,
    );
    let status = cargo.status().await?;
    let databases = match &database_url {
        Some(url) => run_databases(url, &run).await?,
        None => Vec::new(),
    };
    if !status.success() {
        if !databases.is_empty() {
            println!(
                "\nkept for inspection, this run's test databases: {}",
                databases.join(", ")
            );
        }
        bail!("tests failed");
    }
    if let Some(url) = &database_url {
        drop_databases(url, &databases).await?;
    }
    Ok(())
}

/// The browser tests' Chromium and its WebDriver: Debian's `chromium` and `chromium-driver`,
/// installed when either is missing (the package lists refreshed only if the install needs it).
async fn ensure_browser() -> anyhow::Result<()> {
    const PACKAGES: [(&str, &str); 2] = [
        ("chromium", "/usr/bin/chromium"),
        ("chromium-driver", "/usr/bin/chromedriver"),
    ];
    if PACKAGES
        .iter()
        .all(|(_, binary)| std::path::Path::new(binary).exists())
    {
        return Ok(());
    }
    println!("installing chromium and chromium-driver for the browser tests (apt-get)");
    let install = || async {
        Command::new("apt-get")
            .args(["install", "-y", "-qq"])
            .args(PACKAGES.map(|(package, _)| package))
            .env("DEBIAN_FRONTEND", "noninteractive")
            .status()
            .await
            .context("apt-get must be available to install chromium")
    };
    if install().await?.success() {
        return Ok(());
    }
    let updated = Command::new("apt-get")
        .args(["update", "-qq"])
        .status()
        .await?;
    if !(updated.success() && install().await?.success()) {
        bail!("could not install chromium and chromium-driver with apt-get (as root)");
    }
    Ok(())
}

/// The databases the tests of `run` created (one per test).
async fn run_databases(url: &str, run: &str) -> anyhow::Result<Vec<String>> {
    let mut connection = PgConnection::connect(url).await?;
    let names = sqlx::query_scalar(
        "SELECT datname FROM pg_database WHERE starts_with(datname, $1) ORDER BY datname",
    )
    .bind(test_run_prefix(run))
    .fetch_all(&mut connection)
    .await?;
    connection.close().await?;
    Ok(names)
}

async fn drop_databases(url: &str, names: &[String]) -> anyhow::Result<()> {
    let mut connection = PgConnection::connect(url).await?;
    for name in names {
        sqlx::query(&format!("DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)"))
            .execute(&mut connection)
            .await?;
    }
    connection.close().await?;
    Ok(())
}
