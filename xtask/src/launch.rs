//! Everything xtask runs in the background: building the service binaries, starting a
//! process with its environment and log handling, waiting until it is ready, killing and
//! restarting it, stopping it. `up`, `fuzz`, `chaos`, the benchmarks and the broker all start
//! their processes here, so each is started, probed and stopped the same way.

use std::path::PathBuf;
use std::process::{ExitStatus, Stdio};
use std::time::Duration;

use anyhow::{Context, anyhow, bail};
use tokio::process::{Child, Command};

use crate::dev::workspace_root;

/// How long a process may take to become ready: long enough for a service that waits for a
/// restarting Postgres (chaos) and for a broker opening its storage.
const READY_WITHIN: Duration = Duration::from_secs(30);
const READY_POLL: Duration = Duration::from_millis(100);
/// One readiness probe that takes longer has hung and the next one is tried; above what the
/// services allow their own checks (1.5 s each for the database and the broker).
const PROBE_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a service may take to drain after SIGTERM before it is killed.
const STOP_WITHIN: Duration = Duration::from_secs(10);

/// Which build of the workspace a binary comes from.
#[derive(Clone, Copy)]
pub(crate) enum Profile {
    /// Quick to build: for checks of behaviour, not of speed.
    Debug,
    Release,
}

impl Profile {
    fn directory(self) -> &'static str {
        match self {
            Self::Debug => "debug",
            Self::Release => "release",
        }
    }
}

/// `cargo build` of `packages` in `profile`, with cargo's progress shown.
pub(crate) async fn build(profile: Profile, packages: &[&str]) -> anyhow::Result<()> {
    let mut cargo = Command::new(env!("CARGO"));
    cargo.current_dir(workspace_root()).arg("build");
    if let Profile::Release = profile {
        cargo.arg("--release");
    }
    for package in packages {
        cargo.args(["--package", package]);
    }
    let status = cargo.status().await.context("running cargo build")?;
    if !status.success() {
        bail!("cargo build of {} failed", packages.join(", "));
    }
    Ok(())
}

/// Where [`build`] leaves the binary `name`.
pub(crate) fn binary(profile: Profile, name: &str) -> PathBuf {
    workspace_root()
        .join("target")
        .join(profile.directory())
        .join(name)
}

/// A free loopback address (`127.0.0.1:port`), for a process that runs beside others.
pub(crate) fn free_address() -> anyhow::Result<String> {
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    Ok(format!("127.0.0.1:{port}"))
}

/// The system's services: a binary, its arguments, and the variable that places its ops
/// listener, where it answers `/health/ready`.
#[derive(Clone, Copy)]
pub(crate) enum Service {
    /// The command API, with the relay unless `COMMAND_API_RELAY=false`.
    CommandApi,
    /// `command-api process-transfers`.
    ProcessManager,
    Projector,
    QueryApi,
}

impl Service {
    pub(crate) fn label(self) -> &'static str {
        match self {
            Self::CommandApi => "command-api",
            Self::ProcessManager => "process-manager",
            Self::Projector => "projector",
            Self::QueryApi => "query-api",
        }
    }

    fn binary(self) -> &'static str {
        match self {
            Self::CommandApi | Self::ProcessManager => "command-api",
            Self::Projector => "projector",
            Self::QueryApi => "query-api",
        }
    }

    fn args(self) -> &'static [&'static str] {
        match self {
            Self::ProcessManager => &["process-transfers"],
            _ => &[],
        }
    }

    fn ops_variable(self) -> &'static str {
        match self {
            Self::CommandApi => "COMMAND_API_OPS_ADDR",
            Self::ProcessManager => "PROCESS_MANAGER_ADDR",
            Self::Projector => "PROJECTOR_ADDR",
            Self::QueryApi => "QUERY_API_OPS_ADDR",
        }
    }
}

/// Where a process's output goes.
#[derive(Clone, Copy)]
pub(crate) enum Logs {
    /// Stdout and stderr on the terminal, as a developer watching `up` wants them.
    Shown,
    /// Stdout (where the services log) discarded, stderr kept: a process that fails to start
    /// still says why.
    ErrorsOnly,
    /// Nothing: the process is killed on purpose and its complaints are expected.
    Discarded,
}

/// How a process shows that it is ready.
enum Readiness {
    /// `GET http://{address}/health/ready` answers 2xx.
    Health(String),
    /// `address` accepts TCP connections.
    Listening(String),
}

impl Readiness {
    async fn reached(&self, client: &reqwest::Client) -> bool {
        match self {
            Self::Health(address) => matches!(
                client.get(format!("http://{address}/health/ready")).send().await,
                Ok(response) if response.status().is_success()
            ),
            Self::Listening(address) => tokio::net::TcpStream::connect(address).await.is_ok(),
        }
    }
}

/// What to start, kept whole so that a killed process can be started again as it was.
pub(crate) struct Launch {
    label: String,
    program: PathBuf,
    args: Vec<String>,
    env: Vec<(String, String)>,
    logs: Logs,
    readiness: Readiness,
}

impl Launch {
    /// `service` from the `profile` build, its ops listener on `ops` (`host:port`).
    pub(crate) fn service(service: Service, profile: Profile, ops: &str) -> Self {
        Self {
            label: service.label().to_owned(),
            program: binary(profile, service.binary()),
            args: service.args().iter().map(|&arg| arg.to_owned()).collect(),
            env: vec![(service.ops_variable().to_owned(), ops.to_owned())],
            logs: Logs::ErrorsOnly,
            readiness: Readiness::Health(ops.to_owned()),
        }
    }

    /// `program args`, ready once it accepts connections on `address`.
    pub(crate) fn listener(label: &str, program: PathBuf, args: &[&str], address: &str) -> Self {
        Self {
            label: label.to_owned(),
            program,
            args: args.iter().map(|&arg| arg.to_owned()).collect(),
            env: Vec::new(),
            logs: Logs::ErrorsOnly,
            readiness: Readiness::Listening(address.to_owned()),
        }
    }

    pub(crate) fn env(mut self, name: &str, value: impl Into<String>) -> Self {
        self.env.push((name.to_owned(), value.into()));
        self
    }

    pub(crate) fn logs(mut self, logs: Logs) -> Self {
        self.logs = logs;
        self
    }

    /// Starts the process without waiting for it to be ready.
    pub(crate) fn spawn(self) -> anyhow::Result<Running> {
        let child = self.spawn_child()?;
        Ok(Running {
            launch: self,
            child,
        })
    }

    fn spawn_child(&self) -> anyhow::Result<Child> {
        let mut command = Command::new(&self.program);
        command
            .args(&self.args)
            .envs(self.env.iter().map(|(name, value)| (name, value)))
            .stdin(Stdio::null())
            // A failed start-up anywhere leaves nothing running behind it.
            .kill_on_drop(true);
        match self.logs {
            Logs::Shown => {}
            Logs::ErrorsOnly => {
                command.stdout(Stdio::null());
            }
            Logs::Discarded => {
                command.stdout(Stdio::null()).stderr(Stdio::null());
            }
        }
        command
            .spawn()
            .with_context(|| format!("starting {} ({})", self.label, self.program.display()))
    }
}

/// Starts every process, then waits until each is ready.
pub(crate) async fn start(launches: Vec<Launch>) -> anyhow::Result<Vec<Running>> {
    let mut running = launches
        .into_iter()
        .map(Launch::spawn)
        .collect::<anyhow::Result<Vec<_>>>()?;
    for process in &mut running {
        process.wait_ready().await?;
    }
    Ok(running)
}

/// Stops every process, each as [`Running::stop`] does.
pub(crate) async fn stop(running: &mut [Running]) {
    for process in running {
        process.stop().await;
    }
}

/// A started process; killed if dropped while it runs.
pub(crate) struct Running {
    launch: Launch,
    child: Child,
}

impl Running {
    pub(crate) fn label(&self) -> &str {
        &self.launch.label
    }

    /// Its process id; `None` once it has exited and been waited for.
    pub(crate) fn pid(&self) -> Option<u32> {
        self.child.id()
    }

    /// Its exit status if it has exited.
    pub(crate) fn exited(&mut self) -> anyhow::Result<Option<ExitStatus>> {
        Ok(self.child.try_wait()?)
    }

    /// Waits until it is ready; fails at once if it exits first, and after [`READY_WITHIN`].
    pub(crate) async fn wait_ready(&mut self) -> anyhow::Result<()> {
        let Self { launch, child } = self;
        let client = reqwest::Client::builder().timeout(PROBE_TIMEOUT).build()?;
        let waiting = async {
            loop {
                if let Some(status) = child.try_wait()? {
                    bail!("{} exited during start-up: {status}", launch.label);
                }
                if launch.readiness.reached(&client).await {
                    return Ok(());
                }
                tokio::time::sleep(READY_POLL).await;
            }
        };
        tokio::time::timeout(READY_WITHIN, waiting)
            .await
            .unwrap_or_else(|_| {
                Err(anyhow!(
                    "{} did not become ready within {} s",
                    launch.label,
                    READY_WITHIN.as_secs()
                ))
            })
    }

    /// SIGKILL, as a crash: no chance to finish anything.
    pub(crate) async fn kill(&mut self) -> anyhow::Result<()> {
        self.child
            .kill()
            .await
            .with_context(|| format!("killing {}", self.launch.label))
    }

    /// Starts it again as it was first started, without waiting for it to be ready.
    pub(crate) fn restart(&mut self) -> anyhow::Result<()> {
        self.child = self.launch.spawn_child()?;
        Ok(())
    }

    /// SIGTERM (graceful shutdown), then SIGKILL if it has not exited within [`STOP_WITHIN`].
    pub(crate) async fn stop(&mut self) {
        if let Some(pid) = self.pid() {
            let _ = Command::new("kill")
                .args(["-TERM", &pid.to_string()])
                .status()
                .await;
        }
        if tokio::time::timeout(STOP_WITHIN, self.child.wait())
            .await
            .is_err()
        {
            let _ = self.child.kill().await;
        }
    }
}
