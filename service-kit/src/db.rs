//! The Postgres pool and the schema migrations.

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use sqlx::migrate::Migrator;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{ConnectOptions, Connection, PgConnection, PgPool};

use crate::config::{ConfigError, Setting};

/// Every schema change of the ledger, embedded so that each binary can migrate on start-up.
/// sqlx takes an advisory lock while migrating, so replicas starting together are safe.
pub static MIGRATOR: Migrator = sqlx::migrate!("../migrations");

pub const DATABASE_URL: Setting<&str> = Setting::new(
    "DATABASE_URL",
    "postgres://postgres@127.0.0.1:5432/ledger",
    "the event store",
);
pub const DATABASE_MAX_CONNECTIONS: Setting<u32> =
    Setting::new("DATABASE_MAX_CONNECTIONS", 16, "pool size per process");
pub const DATABASE_ACQUIRE_TIMEOUT: Setting<Duration> = Setting::new(
    "DATABASE_ACQUIRE_TIMEOUT_MS",
    Duration::from_secs(3),
    "wait for a pooled connection before answering 503",
);
pub const DATABASE_STATEMENT_TIMEOUT: Setting<Duration> = Setting::new(
    "DATABASE_STATEMENT_TIMEOUT_MS",
    Duration::from_secs(5),
    "server-side cap on any statement",
);

/// `LISTEN`/`NOTIFY` channels between the processes.
pub mod channels {
    /// Notified after events were appended: wakes relays of other replicas.
    pub const EVENTS_APPENDED: &str = "ledger_events";
    /// Notified when the projector committed a change: wakes `min_version` queries.
    pub const READ_MODELS_CHANGED: &str = "ledger_projected";
}

/// Prefix of every database a test creates.
const TEST_DATABASE_PREFIX: &str = "ledger_test_";

/// The variable `cargo xtask test` sets to name its run, so that afterwards it drops its own
/// databases, and only those: another run on the same server keeps its own.
pub const TEST_RUN_VARIABLE: &str = "LEDGER_TEST_RUN";

/// The name of a new test database: `ledger_test_<run>_<unique>`, the run being
/// [`TEST_RUN_VARIABLE`] (`adhoc` outside `cargo xtask test`).
pub fn test_database_name() -> String {
    let run = std::env::var(TEST_RUN_VARIABLE).unwrap_or_else(|_| "adhoc".into());
    format!("{}{}", test_run_prefix(&run), uuid::Uuid::new_v4().simple())
}

/// What the names of one run's test databases start with.
pub fn test_run_prefix(run: &str) -> String {
    format!("{TEST_DATABASE_PREFIX}{run}_")
}

/// Where the database is and how the pool behaves.
#[derive(Clone)]
pub struct DatabaseConfig {
    /// Connection URL; may hold a password, so it is never printed.
    pub url: String,
    pub max_connections: u32,
    /// How long a request waits for a free connection before it is answered 503.
    pub acquire_timeout: Duration,
    /// Server-side cap on any one statement, so no request can hang on the database.
    pub statement_timeout: Duration,
}

impl fmt::Debug for DatabaseConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DatabaseConfig")
            .field("url", &"[redacted]")
            .field("max_connections", &self.max_connections)
            .field("acquire_timeout", &self.acquire_timeout)
            .field("statement_timeout", &self.statement_timeout)
            .finish()
    }
}

impl DatabaseConfig {
    /// Reads [`DATABASE_URL`], [`DATABASE_MAX_CONNECTIONS`], [`DATABASE_ACQUIRE_TIMEOUT`] and
    /// [`DATABASE_STATEMENT_TIMEOUT`].
    pub fn from_env() -> Result<Self, ConfigError> {
        let config = Self {
            url: DATABASE_URL.read()?,
            max_connections: DATABASE_MAX_CONNECTIONS.read()?,
            acquire_timeout: DATABASE_ACQUIRE_TIMEOUT.read()?,
            statement_timeout: DATABASE_STATEMENT_TIMEOUT.read()?,
        };
        config.connect_options()?;
        Ok(config)
    }

    /// A config for `url` with the settings' defaults.
    pub fn with_url(url: impl Into<String>) -> Self {
        Self {
            url: url.into(),
            max_connections: DATABASE_MAX_CONNECTIONS.default,
            acquire_timeout: DATABASE_ACQUIRE_TIMEOUT.default,
            statement_timeout: DATABASE_STATEMENT_TIMEOUT.default,
        }
    }

    fn connect_options(&self) -> Result<PgConnectOptions, ConfigError> {
        // The parse error may quote the URL, password included: it is not passed on.
        let options = PgConnectOptions::from_str(&self.url).map_err(|_| ConfigError::Invalid {
            name: DATABASE_URL.name,
            reason: "not a valid postgres:// URL".to_owned(),
        })?;
        let timeout_ms = self.statement_timeout.as_millis().to_string();
        Ok(options
            .options([("statement_timeout", timeout_ms.as_str())])
            .log_statements(tracing::log::LevelFilter::Trace))
    }
}

/// Why the database could not be used at start-up.
#[derive(Debug, thiserror::Error)]
pub enum DatabaseError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("cannot connect to the database named by DATABASE_URL: {0}")]
    Connect(#[source] sqlx::Error),
    #[error("migrating the database failed: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    #[error(
        "the database lacks {pending} migration(s) of this build, and this role may not apply them: migrate as the database's owner first (`command-api migrate` with the owner's DATABASE_URL)"
    )]
    NotMigrated { pending: usize },
    #[error("checking the database's migrations failed: {0}")]
    Check(#[source] sqlx::Error),
}

/// Opens the pool, failing fast if the database is unreachable.
pub async fn connect(config: &DatabaseConfig) -> Result<PgPool, DatabaseError> {
    pool_options(config)
        .connect_with(config.connect_options()?)
        .await
        .map_err(DatabaseError::Connect)
}

/// A pool that connects on first use: for tests of what a service does before (or without)
/// reaching the database, such as refusing a malformed request.
pub fn connect_lazy(config: &DatabaseConfig) -> Result<PgPool, ConfigError> {
    Ok(pool_options(config).connect_lazy_with(config.connect_options()?))
}

fn pool_options(config: &DatabaseConfig) -> PgPoolOptions {
    PgPoolOptions::new()
        .max_connections(config.max_connections)
        .acquire_timeout(config.acquire_timeout)
}

/// What a service may do in the database: each service connects as a login role that is a
/// member of one of these (created by the migrations; README.md, "Database roles").
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ServiceRole {
    /// The command API, its relay and the process manager: read and append the event store.
    Writer,
    /// The projector: read the event store, write the read models.
    Projector,
    /// The query API: read one tenant's rows at a time.
    TenantReader,
}

impl ServiceRole {
    /// The group role the migrations grant to.
    pub fn group(self) -> &'static str {
        match self {
            Self::Writer => "ledger_writer",
            Self::Projector => "ledger_projector",
            Self::TenantReader => TENANT_READER_ROLE,
        }
    }

    /// The login role development and tests run the service as (`cargo xtask up`, the test
    /// harness); production names its own.
    pub fn development_login(self) -> &'static str {
        match self {
            Self::Writer => "ledger_dev_writer",
            Self::Projector => "ledger_dev_projector",
            Self::TenantReader => "ledger_dev_reader",
        }
    }

    /// Every role a service runs as.
    pub const ALL: [Self; 3] = [Self::Writer, Self::Projector, Self::TenantReader];

    /// Creates every role's [`Self::development_login`] that is missing.
    pub async fn ensure_development_logins(admin: &PgPool) -> Result<(), sqlx::Error> {
        for role in Self::ALL {
            role.ensure_development_login(admin).await?;
        }
        Ok(())
    }

    /// Creates [`Self::development_login`] if missing, a member of [`Self::group`] with its
    /// own name as password (for servers that ask for one). Needs CREATEROLE; development only.
    async fn ensure_development_login(self, admin: &PgPool) -> Result<(), sqlx::Error> {
        let (login, group) = (self.development_login(), self.group());
        sqlx::query(&format!(
            "DO $$
             BEGIN
                 IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = '{login}') THEN
                     CREATE ROLE {login} LOGIN PASSWORD '{login}' IN ROLE {group};
                 END IF;
             EXCEPTION WHEN duplicate_object OR unique_violation THEN
                 NULL;
             END
             $$"
        ))
        .execute(admin)
        .await?;
        Ok(())
    }

    /// `url` with [`Self::development_login`] as its user and password.
    pub fn development_url(self, url: &str) -> String {
        let login = self.development_login();
        let Some((scheme, rest)) = url.split_once("://") else {
            return url.to_owned();
        };
        let host = rest.split_once('@').map_or(rest, |(_, host)| host);
        format!("{scheme}://{login}:{login}@{host}")
    }
}

/// The role tenant-scoped reads run as: row-level security shows it one tenant's rows.
pub const TENANT_READER_ROLE: &str = "ledger_tenant_reader";

/// A transaction that sees `tenant`'s rows only. It runs as [`TENANT_READER_ROLE`] with
/// `ledger.tenant` set, so row-level security filters every read model and event row: a
/// second wall behind each query's own `tenant` filter. It only reads, so callers may drop it
/// (rolling back) instead of committing. The connecting role must be a superuser or a member
/// of the reader role.
pub async fn tenant_scope(
    pool: &PgPool,
    tenant: &str,
) -> Result<sqlx::Transaction<'static, sqlx::Postgres>, sqlx::Error> {
    let mut tx = pool.begin().await?;
    sqlx::query("SELECT set_config('role', $1, true), set_config('ledger.tenant', $2, true)")
        .bind(TENANT_READER_ROLE)
        .bind(tenant)
        .execute(&mut *tx)
        .await?;
    Ok(tx)
}

/// Migrations whose text changed after databases applied it, without changing what it does to
/// them: each version with the checksum (hex SHA-384) of the text it was first applied with.
/// Such databases are re-stamped with the current checksum, which sqlx would otherwise refuse.
/// 20261126000004 creates its role only when missing, so an owner without CREATEROLE can run it.
const REWRITTEN: &[(i64, &str)] = &[(
    20261126000004,
    "958a80dcc9d8622c3539aff4524d89f006aa47abd982b4a9cbc0ad81119dacc9997024f77f21293d364974af41bf27f0",
)];

/// Brings the schema to this build's. The database's owner applies what is pending; a service running as its own unprivileged role only checks that
/// nothing is, and fails start-up naming the fix otherwise.
pub async fn migrate(pool: &PgPool) -> Result<(), DatabaseError> {
    // The database's owner (or a superuser), not "may create in the schema": before Postgres
    // 15 every role may create in `public`.
    let owner: bool = sqlx::query_scalar(
        "SELECT pg_has_role(current_user, datdba, 'MEMBER')
           FROM pg_database WHERE datname = current_database()",
    )
    .fetch_one(pool)
    .await
    .map_err(DatabaseError::Check)?;
    if owner {
        restamp_rewritten(pool)
            .await
            .map_err(DatabaseError::Check)?;
        MIGRATOR.run(pool).await?;
        return Ok(());
    }
    let applied: Vec<i64> =
        sqlx::query_scalar("SELECT version FROM _sqlx_migrations WHERE success")
            .fetch_all(pool)
            .await
            .map_err(DatabaseError::Check)?;
    let pending = MIGRATOR
        .iter()
        .filter(|migration| !applied.contains(&migration.version))
        .count();
    if pending > 0 {
        return Err(DatabaseError::NotMigrated { pending });
    }
    Ok(())
}

async fn restamp_rewritten(pool: &PgPool) -> Result<(), sqlx::Error> {
    let tracked: bool = sqlx::query_scalar("SELECT to_regclass('_sqlx_migrations') IS NOT NULL")
        .fetch_one(pool)
        .await?;
    if !tracked {
        return Ok(());
    }
    for (version, applied_with) in REWRITTEN {
        let Some(current) = MIGRATOR.iter().find(|m| m.version == *version) else {
            continue;
        };
        sqlx::query(
            "UPDATE _sqlx_migrations SET checksum = $2
              WHERE version = $1 AND checksum = decode($3, 'hex')",
        )
        .bind(version)
        .bind(current.checksum.as_ref())
        .bind(applied_with)
        .execute(pool)
        .await?;
    }
    Ok(())
}

/// Creates the database named in `config.url` if it does not exist, by connecting to the
/// server's `postgres` database.
pub async fn ensure_database_exists(config: &DatabaseConfig) -> Result<(), DatabaseError> {
    let options = config.connect_options()?;
    let name = options.get_database().unwrap_or("postgres").to_owned();
    let mut admin = PgConnection::connect_with(&options.database("postgres"))
        .await
        .map_err(DatabaseError::Connect)?;
    let exists: bool =
        sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM pg_database WHERE datname = $1)")
            .bind(&name)
            .fetch_one(&mut admin)
            .await
            .map_err(DatabaseError::Connect)?;
    if !exists {
        let statement = format!("CREATE DATABASE \"{}\"", name.replace('"', "\"\""));
        match sqlx::query(&statement).execute(&mut admin).await {
            Ok(_) => {}
            // Another process created it between our check and our CREATE.
            Err(sqlx::Error::Database(err)) if err.code().as_deref() == Some("42P04") => {}
            Err(err) => return Err(DatabaseError::Connect(err)),
        }
    }
    admin.close().await.map_err(DatabaseError::Connect)
}

/// True if `err` means the database cannot serve right now, rather than that a statement is
/// wrong: the caller should answer 503, not 500. Connection and pool failures, and the SQLSTATEs
/// of connection exceptions (08), insufficient resources (53), statement timeout (57014),
/// shutdown (57P0x), a database not accepting connections (55000) or missing (3D000).
pub fn is_outage(err: &sqlx::Error) -> bool {
    match err {
        sqlx::Error::Io(_)
        | sqlx::Error::Tls(_)
        | sqlx::Error::PoolTimedOut
        | sqlx::Error::PoolClosed
        | sqlx::Error::WorkerCrashed => true,
        sqlx::Error::Database(db) => db.code().is_some_and(|code| {
            code.starts_with("08")
                || code.starts_with("53")
                || code.starts_with("57P0")
                || matches!(code.as_ref(), "57014" | "55000" | "3D000")
        }),
        _ => false,
    }
}
