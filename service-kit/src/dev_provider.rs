//! The development OpenID Connect provider of `deploy/oidc-dev`: the certified `oidc-provider`
//! (Node.js) on loopback. `cargo xtask up --oidc` runs it beside the services, and the tests
//! get their tokens from it, so that what they check is what a real provider sends. Installs
//! its npm packages (`npm ci`, the versions `package-lock.json` pins) the first time.

use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use serde::Deserialize;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

/// How long the provider may take to start and print its issuer. Generous: with the whole test
/// suite loading two cores, Node loading `oidc-provider` has taken longer than 30 s.
const START_WITHIN: Duration = Duration::from_secs(90);

/// Providers starting at once in this process. A test binary starts one per test, all
/// together; nine Node processes loading `oidc-provider` on two cores at once each took so
/// long that one missed [`START_WITHIN`] in CI, where one after the other each starts in a
/// second or two.
static STARTING: tokio::sync::Semaphore = tokio::sync::Semaphore::const_new(2);

/// Why the provider could not be started or asked.
#[derive(Debug, thiserror::Error)]
pub enum DevProviderError {
    #[error("cannot run {what}: {source}")]
    Spawn {
        what: &'static str,
        source: std::io::Error,
    },
    #[error("`npm ci` in deploy/oidc-dev failed")]
    Install,
    #[error("the provider did not print its issuer: {0}")]
    NoIssuer(String),
    #[error(transparent)]
    Http(#[from] reqwest::Error),
}

/// A signing key of the provider, with its private half (for tests that forge tokens with
/// the provider's own key).
#[derive(Debug, Clone, Deserialize)]
pub struct ProviderKey {
    pub kid: String,
    pub alg: String,
    pub private_pem: String,
    pub public_pem: String,
}

/// A running provider; killed when dropped.
pub struct DevProvider {
    /// The issuer URL, e.g. `http://127.0.0.1:40123`.
    pub issuer: String,
    child: Child,
    http: reqwest::Client,
}

#[derive(Deserialize)]
struct Started {
    issuer: String,
}

#[derive(Deserialize)]
struct TokenResponse {
    access_token: String,
}

#[derive(Deserialize)]
struct Stats {
    jwks_requests: u64,
    authorizations: Vec<Authorization>,
}

/// An authorization request the provider received (its `/auth` endpoint), as the client sent
/// it: what a test of a sign-in checks the client asked for.
#[derive(Debug, Clone, Deserialize)]
pub struct Authorization {
    pub client_id: Option<String>,
    pub response_type: Option<String>,
    pub code_challenge_method: Option<String>,
    pub has_code_challenge: bool,
}

/// Loopback ports below Linux's default ephemeral range (32768-60999), which `bind` to port 0
/// never hands out.
const SPARE_PORTS: std::ops::Range<u16> = 20_000..32_768;

/// A loopback port free now, for a process that binds it later: one outside the ephemeral
/// range, so that no other test's listener on port 0 takes it meanwhile (a port from
/// `bind(0)`, released, is soon handed to the next `bind(0)`).
pub fn spare_port() -> std::io::Result<u16> {
    let span = u128::from(SPARE_PORTS.end - SPARE_PORTS.start);
    for _ in 0..100 {
        let offset =
            u16::try_from(uuid::Uuid::new_v4().as_u128() % span).expect("below the span, a u16");
        let port = SPARE_PORTS.start + offset;
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return Ok(port);
        }
    }
    Err(std::io::Error::new(
        std::io::ErrorKind::AddrInUse,
        "no spare loopback port in 100 tries",
    ))
}

/// A free loopback port held for a provider that starts later, and the issuer it will have
/// there: for a test of a service started before its provider, or that the provider's
/// configuration must name (a redirect URI on the service's own port).
pub struct ProviderSlot {
    pub port: u16,
    /// `http://127.0.0.1:<port>`.
    pub issuer: String,
}

impl ProviderSlot {
    /// A port free now; nothing listens on it until [`ProviderSlot::start`].
    pub fn reserve() -> std::io::Result<Self> {
        let port = spare_port()?;
        Ok(Self {
            port,
            issuer: format!("http://127.0.0.1:{port}"),
        })
    }

    /// Starts the provider there (see [`DevProvider::start`]).
    pub async fn start(&self, config: &serde_json::Value) -> Result<DevProvider, DevProviderError> {
        DevProvider::start(self.port, config).await
    }
}

/// `deploy/oidc-dev`, where the launcher and its `package-lock.json` are.
pub fn launcher_directory() -> PathBuf {
    PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy/oidc-dev"))
}

/// Runs `npm ci` in [`launcher_directory`] unless its packages are installed; once per
/// process.
pub async fn ensure_installed() -> Result<(), DevProviderError> {
    static INSTALLED: tokio::sync::OnceCell<()> = tokio::sync::OnceCell::const_new();
    INSTALLED
        .get_or_try_init(|| async {
            let directory = launcher_directory();
            if directory.join("node_modules/oidc-provider").exists() {
                return Ok(());
            }
            let status = Command::new("npm")
                .args(["ci", "--no-audit", "--no-fund", "--loglevel=error"])
                .current_dir(&directory)
                .status()
                .await
                .map_err(|source| DevProviderError::Spawn {
                    what: "npm",
                    source,
                })?;
            if status.success() {
                Ok(())
            } else {
                Err(DevProviderError::Install)
            }
        })
        .await
        .map(|_| ())
}

impl DevProvider {
    /// Starts the provider on `port` of 127.0.0.1 (0: any free port) with `config`, the
    /// launcher's `LEDGER_OIDC_CONFIG` (see `deploy/oidc-dev/server.mjs`), and waits until it
    /// listens.
    pub async fn start(port: u16, config: &serde_json::Value) -> Result<Self, DevProviderError> {
        ensure_installed().await?;
        let _starting = STARTING
            .acquire()
            .await
            .expect("the semaphore is never closed");
        let mut child = Command::new("node")
            .arg("server.mjs")
            .current_dir(launcher_directory())
            .env("PORT", port.to_string())
            .env("LEDGER_OIDC_CONFIG", config.to_string())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .map_err(|source| DevProviderError::Spawn {
                what: "node",
                source,
            })?;
        let stdout = child
            .stdout
            .take()
            .ok_or_else(|| DevProviderError::NoIssuer("no stdout".into()))?;
        let mut lines = BufReader::new(stdout).lines();
        // The provider's warnings come first; the issuer is the first JSON line.
        let issuer = tokio::time::timeout(START_WITHIN, async {
            while let Some(line) = lines.next_line().await.ok().flatten() {
                if let Ok(started) = serde_json::from_str::<Started>(&line) {
                    return Ok(started.issuer);
                }
            }
            Err(DevProviderError::NoIssuer("it exited".into()))
        })
        .await
        .map_err(|_| DevProviderError::NoIssuer(format!("not within {START_WITHIN:?}")))??;
        // Keep reading, so that the provider never blocks on a full pipe.
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        Ok(Self {
            issuer,
            child,
            http: reqwest::Client::new(),
        })
    }

    /// An access token for `client_id` from the token endpoint (client credentials grant).
    pub async fn token(
        &self,
        client_id: &str,
        client_secret: &str,
        scope: &str,
    ) -> Result<String, DevProviderError> {
        let response: TokenResponse = self
            .http
            .post(format!("{}/token", self.issuer))
            .basic_auth(client_id, Some(client_secret))
            .form(&[("grant_type", "client_credentials"), ("scope", scope)])
            .send()
            .await?
            .error_for_status()?
            .json()
            .await?;
        Ok(response.access_token)
    }

    /// The signing keys, the one the provider signs with first.
    pub async fn keys(&self) -> Result<Vec<ProviderKey>, DevProviderError> {
        Ok(self
            .http
            .get(format!("{}/admin/keys", self.issuer))
            .send()
            .await?
            .error_for_status()?
            .json()
            .await?)
    }

    /// Adds a new key for each of `add` (signing with them from now on) and removes the keys
    /// `remove`; returns the keys after.
    pub async fn rotate(
        &self,
        add: &[&str],
        remove: &[&str],
    ) -> Result<Vec<ProviderKey>, DevProviderError> {
        Ok(self
            .http
            .post(format!("{}/admin/keys", self.issuer))
            .json(&serde_json::json!({ "add": add, "remove": remove }))
            .send()
            .await?
            .error_for_status()?
            .json()
            .await?)
    }

    /// How often the JWKS was fetched since the provider started.
    pub async fn jwks_requests(&self) -> Result<u64, DevProviderError> {
        Ok(self.stats().await?.jwks_requests)
    }

    /// The authorization requests since the provider started, oldest first.
    pub async fn authorizations(&self) -> Result<Vec<Authorization>, DevProviderError> {
        Ok(self.stats().await?.authorizations)
    }

    async fn stats(&self) -> Result<Stats, DevProviderError> {
        Ok(self
            .http
            .get(format!("{}/admin/stats", self.issuer))
            .send()
            .await?
            .error_for_status()?
            .json()
            .await?)
    }

    /// Kills the provider and waits until it is gone, so that its port is closed.
    pub async fn stop(mut self) {
        let _ = self.child.kill().await;
    }

    /// Waits until the provider exits, for `cargo xtask up`.
    pub async fn wait(&mut self) -> std::io::Result<std::process::ExitStatus> {
        self.child.wait().await
    }
}
