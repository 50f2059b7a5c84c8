//! The Postgres pool and the schema migrations.

use std::str::FromStr;
use std::time::Duration;

use secrecy::{ExposeSecret, SecretString};
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
pub const DATABASE_MAX_CONNECTIONS: Setting<u32> = Setting::new(
    "DATABASE_MAX_CONNECTIONS",
    16,
    "pool size per process (at least 2)",
);
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

pub mod kept;

/// `LISTEN`/`NOTIFY` channels between the processes.
pub mod channels {
    /// Notified after events were appended: wakes relays of other replicas.
    pub const EVENTS_APPENDED: &str = "ledger_events";
    /// Notified when the projector committed a change, once per changed row with that row's
    /// [`ReadModelChange`] as JSON: wakes `min_version` queries and feeds the query API's
    /// subscriptions.
    pub const READ_MODELS_CHANGED: &str = "ledger_projected";

    use sqlx::PgConnection;
    use uuid::Uuid;

    /// One changed row of a read model, as notified on [`READ_MODELS_CHANGED`]. Small on
    /// purpose (a notification carries at most 8000 bytes): a listener reads the row itself.
    #[derive(Debug, Clone, PartialEq, Eq, serde::Deserialize)]
    pub struct ReadModelChange {
        pub model: ReadModel,
        pub tenant: String,
        pub id: Uuid,
        /// The row's stream version once the change committed.
        pub version: i64,
    }

    #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Deserialize)]
    #[serde(rename_all = "snake_case")]
    pub enum ReadModel {
        Account,
        Transfer,
    }

    impl ReadModel {
        fn table(self) -> &'static str {
            match self {
                Self::Account => "accounts",
                Self::Transfer => "transfers",
            }
        }

        fn name(self) -> &'static str {
            match self {
                Self::Account => "account",
                Self::Transfer => "transfer",
            }
        }
    }

    /// A `SELECT` notifying [`READ_MODELS_CHANGED`] of each row of `rows` (an SQL source with
    /// columns `tenant`, `id` and `version`, such as a table or an `INSERT ... RETURNING`),
    /// as a change of `model`: the one form of the notification, used by [`notify_changed`] and
    /// by statements that notify what they wrote. The channel and the model are constants, not
    /// input.
    pub fn notify_rows_sql(model: ReadModel, rows: &str) -> String {
        format!(
            "SELECT count(pg_notify('{READ_MODELS_CHANGED}',
                                     json_build_object('model', '{}', 'tenant', tenant, 'id', id,
                                                       'version', version)::text))
               FROM {rows}",
            model.name()
        )
    }

    /// Notifies [`READ_MODELS_CHANGED`] of the rows `ids` of `model`, as they are in the
    /// caller's transaction: Postgres delivers the notifications only when it commits, so a
    /// listener that reads the row on receipt sees this change.
    pub async fn notify_changed(
        connection: &mut PgConnection,
        model: ReadModel,
        ids: &[Uuid],
    ) -> Result<(), sqlx::Error> {
        sqlx::query(&notify_rows_sql(
            model,
            &format!("{} WHERE id = ANY($1)", model.table()),
        ))
        .bind(ids)
        .execute(connection)
        .await?;
        Ok(())
    }
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
#[derive(Debug, Clone)]
pub struct DatabaseConfig {
    /// Connection URL; may hold a password, so it is a secret: never printed.
    pub url: SecretString,
    pub max_connections: u32,
    /// How long a request waits for a free connection before it is answered 503.
    pub acquire_timeout: Duration,
    /// Server-side cap on any one statement, so no request can hang on the database.
    pub statement_timeout: Duration,
}

impl DatabaseConfig {
    /// Reads [`DATABASE_URL`], [`DATABASE_MAX_CONNECTIONS`], [`DATABASE_ACQUIRE_TIMEOUT`] and
    /// [`DATABASE_STATEMENT_TIMEOUT`].
    pub fn from_env() -> Result<Self, ConfigError> {
        Self {
            url: DATABASE_URL.read()?.into(),
            max_connections: DATABASE_MAX_CONNECTIONS.read()?,
            acquire_timeout: DATABASE_ACQUIRE_TIMEOUT.read()?,
            statement_timeout: DATABASE_STATEMENT_TIMEOUT.read()?,
        }
        .checked()
    }

    /// The config, if a service can run with it.
    fn checked(self) -> Result<Self, ConfigError> {
        if self.max_connections < 2 {
            return Err(ConfigError::Invalid {
                name: DATABASE_MAX_CONNECTIONS.name,
                reason: "must be at least 2: the hot paths keep connections out of the pool \
                         (`kept`), and everything else needs one"
                    .into(),
            });
        }
        self.connect_options()?;
        Ok(self)
    }

    /// A config for `url` with the settings' defaults.
    pub fn with_url(url: impl Into<String>) -> Self {
        Self {
            url: url.into().into(),
            max_connections: DATABASE_MAX_CONNECTIONS.default,
            acquire_timeout: DATABASE_ACQUIRE_TIMEOUT.default,
            statement_timeout: DATABASE_STATEMENT_TIMEOUT.default,
        }
    }

    /// The same server, login and pool settings, for the database `name` (`postgres`, say,
    /// to create or drop others).
    pub fn with_database(&self, name: &str) -> Result<Self, ConfigError> {
        self.rewritten(|options| options.database(name))
    }

    /// The same server and database, as `user` with `password`.
    pub fn with_login(&self, user: &str, password: &str) -> Result<Self, ConfigError> {
        self.rewritten(|options| options.username(user).password(password))
    }

    fn rewritten(
        &self,
        change: impl FnOnce(PgConnectOptions) -> PgConnectOptions,
    ) -> Result<Self, ConfigError> {
        let url = change(parse_url(self.url.expose_secret())?).to_url_lossy();
        Ok(Self {
            url: String::from(url).into(),
            ..self.clone()
        })
    }

    fn connect_options(&self) -> Result<PgConnectOptions, ConfigError> {
        let timeout_ms = self.statement_timeout.as_millis().to_string();
        Ok(parse_url(self.url.expose_secret())?
            .options([("statement_timeout", timeout_ms.as_str())])
            .log_statements(tracing::log::LevelFilter::Trace))
    }
}

/// `url` as sqlx reads it. The parse error may quote the URL, password included: it is not
/// passed on.
fn parse_url(url: &str) -> Result<PgConnectOptions, ConfigError> {
    PgConnectOptions::from_str(url).map_err(|_| ConfigError::Invalid {
        name: "DATABASE_URL",
        reason: "not a valid postgres:// URL".to_owned(),
    })
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
    #[error(
        "the event log holds transaction ids up to {newest}, but this cluster's next one is {next}: it was restored (logically) into a cluster whose transaction counter is behind, and new events would sort before published ones and never be read. Advance the counter past {newest} (pg_resetwal --next-transaction-id, with the cluster stopped) before starting"
    )]
    TransactionCounterBehind { newest: u64, next: u64 },
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

/// sqlx pings a pooled connection twice per use: when it hands it out (`test_before_acquire`)
/// and when it takes it back. The second ping already keeps a connection that died in use out
/// of the pool. The first only matters for a connection that died while it sat idle, as when
/// Postgres restarts, so it is sent only to one idle longer than [`PING_IF_IDLE_FOR`]. That
/// saves a round trip per statement; `cargo xtask bench commands` has not shown a gain larger
/// than its run-to-run spread (BENCHMARKS.md).
fn pool_options(config: &DatabaseConfig) -> PgPoolOptions {
    PgPoolOptions::new()
        .max_connections(config.max_connections)
        .acquire_timeout(config.acquire_timeout)
        .test_before_acquire(false)
        .before_acquire(|connection, meta| {
            Box::pin(async move {
                if meta.idle_for > PING_IF_IDLE_FOR {
                    connection.ping().await?;
                }
                Ok(true)
            })
        })
}

/// How long a pooled connection may have sat idle and still be handed out without a ping: a
/// restart of Postgres that cut it takes longer than this, so a connection that sat through
/// one is pinged and replaced, and one used a moment ago is not.
pub const PING_IF_IDLE_FOR: Duration = Duration::from_secs(1);

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

    /// `url` with [`Self::development_login`] as its user and password (`url` itself if it
    /// is not a database URL).
    pub fn development_url(self, url: &str) -> String {
        let login = self.development_login();
        DatabaseConfig::with_url(url)
            .with_login(login, login)
            .map_or_else(
                |_| url.to_owned(),
                |config| config.url.expose_secret().to_owned(),
            )
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
        return check_transaction_counter(pool).await;
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
    check_transaction_counter(pool).await
}

/// Refuses a cluster whose transaction counter is behind the event log's newest `tx_id`. The
/// log is read in `(tx_id, global_position)` order from a checkpoint, so events appended with
/// lower ids than those already published would never be read: the relay, the projector and
/// the audit log would all stop in silence. Only a logical restore (pg_dump, logical
/// replication) into another cluster brings that about. One index lookup.
async fn check_transaction_counter(pool: &PgPool) -> Result<(), DatabaseError> {
    let (newest, next): (Option<String>, String) = sqlx::query_as(
        "SELECT (SELECT tx_id FROM events ORDER BY tx_id DESC LIMIT 1)::text,
                pg_snapshot_xmax(pg_current_snapshot())::text",
    )
    .fetch_one(pool)
    .await
    .map_err(DatabaseError::Check)?;
    let parse = |id: &str| id.parse::<u64>().unwrap_or_default();
    let (newest, next) = (newest.as_deref().map_or(0, parse), parse(&next));
    if newest >= next {
        return Err(DatabaseError::TransactionCounterBehind { newest, next });
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

#[cfg(test)]
mod tests {
    use sqlx::postgres::PgSslMode;

    use super::*;

    const URL: &str = "postgres://alice:p%40ss@db.example:6432/ledger?sslmode=require";

    #[test]
    fn a_pool_of_one_connection_is_refused() {
        let one = DatabaseConfig {
            max_connections: 1,
            ..DatabaseConfig::with_url(URL)
        };
        assert!(matches!(
            one.checked(),
            Err(ConfigError::Invalid {
                name: "DATABASE_MAX_CONNECTIONS",
                ..
            })
        ));
        let two = DatabaseConfig {
            max_connections: 2,
            ..DatabaseConfig::with_url(URL)
        };
        assert!(two.checked().is_ok());
    }

    #[test]
    fn another_database_or_login_keeps_the_rest_of_the_url() {
        let config = DatabaseConfig::with_url(URL);
        let admin = config.with_database("postgres").unwrap();
        let options = admin.connect_options().unwrap();
        assert_eq!(options.get_database(), Some("postgres"));
        assert_eq!(options.get_username(), "alice");
        assert_eq!(options.get_host(), "db.example");
        assert_eq!(options.get_port(), 6432);
        assert!(matches!(options.get_ssl_mode(), PgSslMode::Require));
        assert!(admin.url.expose_secret().contains(":p%40ss@"));
        assert_eq!(admin.statement_timeout, config.statement_timeout);

        let writer = DatabaseConfig::with_url(ServiceRole::Writer.development_url(URL));
        let options = writer.connect_options().unwrap();
        assert_eq!(options.get_username(), "ledger_dev_writer");
        assert_eq!(options.get_database(), Some("ledger"));
        assert!(!writer.url.expose_secret().contains("p%40ss"));
        assert_eq!(ServiceRole::Writer.development_url("no URL"), "no URL");
    }

    #[tokio::test]
    async fn a_pooled_connection_cut_while_idle_is_replaced_not_handed_out() {
        let database = crate::testing::TestDatabase::create().await;
        let pool = connect(&DatabaseConfig {
            max_connections: 1,
            ..database.config.clone()
        })
        .await
        .unwrap();
        let backend = || async {
            sqlx::query_scalar::<_, i32>("SELECT pg_backend_pid()")
                .fetch_one(&pool)
                .await
        };
        let cut = backend().await.unwrap();
        database.cut_backends(&[cut]).await;
        tokio::time::sleep(PING_IF_IDLE_FOR + Duration::from_millis(200)).await;
        let replacement = backend().await.expect("the cut connection was handed out");
        assert_ne!(replacement, cut);
    }

    #[test]
    fn the_url_and_its_password_never_print() {
        let config = DatabaseConfig::with_url(URL);
        assert!(!format!("{config:?}").contains("p%40ss"));
        let invalid = DatabaseConfig::with_url("postgres://alice:p%40ss@db.example:port/ledger");
        let err = invalid.connect_options().unwrap_err();
        assert!(!err.to_string().contains("p%40ss"), "{err}");
    }
}
