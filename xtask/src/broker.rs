//! The Kafka-protocol broker for development and tests: nisshi (the renamed Tansu), a Rust
//! crate, installed with cargo and started on a loopback port. Every command that needs a broker
//! (`up`, `test`, `chaos`, the benchmarks) starts it here, and only when `KAFKA_BROKERS` does
//! not name one already.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, bail};
use service_kit::kafka::{ClientProperties, KafkaConfig, Replication};
use tokio::process::Command;

use crate::launch::{self, Launch, Running};

const VERSION: &str = "0.8.1";

/// Where the broker keeps its data.
pub(crate) enum Storage {
    /// Fast, gone when the broker stops: for tests.
    Memory,
    /// Survives broker restarts: a Postgres database URL.
    Postgres(String),
}

/// A running broker; stopped when dropped.
pub(crate) struct Broker {
    pub(crate) address: String,
    process: Running,
}

/// The nisshi binary, installed first if missing (about 13 minutes on a fresh machine: its
/// dependencies need a newer Rust than stable 1.95, so it is built with the nightly toolchain).
pub(crate) async fn ensure_installed() -> anyhow::Result<PathBuf> {
    if let Some(path) = find() {
        return Ok(path);
    }
    println!(
        "installing nisshi {VERSION} (the Kafka-protocol broker; once per machine, ~13 min)..."
    );
    let status = Command::new("cargo")
        .args([
            "+nightly",
            "install",
            "--locked",
            &format!("nisshi@{VERSION}"),
        ])
        .status()
        .await
        .context("running cargo +nightly install nisshi")?;
    if !status.success() {
        bail!(
            "installing nisshi failed (needs the nightly toolchain: rustup toolchain install nightly)"
        );
    }
    find().context("nisshi was installed but is not in ~/.cargo/bin")
}

fn find() -> Option<PathBuf> {
    let home = std::env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|home| PathBuf::from(home).join(".cargo")))?;
    let installed = home.join("bin").join("nisshi");
    if installed.is_file() {
        return Some(installed);
    }
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|dir| dir.join("nisshi"))
            .find(|path| path.is_file())
    })
}

/// Starts a broker on a free loopback port and waits until it accepts connections.
pub(crate) async fn start(storage: Storage) -> anyhow::Result<Broker> {
    start_at(storage, launch::free_address()?).await
}

/// Starts a broker on `address` (which must be free) and waits until it accepts connections.
pub(crate) async fn start_at(storage: Storage, address: String) -> anyhow::Result<Broker> {
    // Checked first: a broker already there would answer the readiness wait below.
    std::net::TcpListener::bind(&address).with_context(|| {
        format!(
            "{address} is taken: set LEDGER_DEV_BROKER_ADDR to another address, or KAFKA_BROKERS to use the broker there"
        )
    })?;
    let storage = match storage {
        Storage::Memory => "memory://nisshi/".to_owned(),
        Storage::Postgres(url) => url,
    };
    let url = format!("tcp://{address}");
    let mut process = Launch::listener(
        "nisshi",
        ensure_installed().await?,
        &[
            "broker",
            "--listener-url",
            &url,
            "--advertised-listener-url",
            &url,
            "--storage-engine",
            &storage,
        ],
        &address,
    )
    .env("RUST_LOG", "warn")
    .spawn()?;
    process.wait_ready().await?;
    Ok(Broker { address, process })
}

impl Broker {
    /// How the processes and checks of a benchmark or chaos run reach this broker: the
    /// default topics, three partitions, fetches answered at once.
    pub(crate) fn kafka(&self) -> KafkaConfig {
        KafkaConfig {
            brokers: self.address.clone(),
            topic_prefix: "ledger".into(),
            partitions: 3,
            replication: Replication::default(),
            properties: ClientProperties::default(),
            fetch_wait_ms: 10,
        }
    }

    /// Its process id, while it runs.
    pub(crate) fn pid(&self) -> Option<u32> {
        self.process.pid()
    }

    /// SIGSTOP, then SIGCONT after `pause`: the broker neither answers nor closes its
    /// connections meanwhile, as in a network partition or a long stall, and keeps its data.
    pub(crate) async fn freeze(&self, pause: Duration) -> anyhow::Result<()> {
        let pid = self
            .process
            .pid()
            .context("the broker is not running")?
            .to_string();
        Command::new("kill").args(["-STOP", &pid]).status().await?;
        tokio::time::sleep(pause).await;
        Command::new("kill").args(["-CONT", &pid]).status().await?;
        Ok(())
    }
}
