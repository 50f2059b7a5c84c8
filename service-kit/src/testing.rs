//! What each test needs, isolated from every other test: a fresh, migrated database and its
//! own Kafka topics; a token the test services accept; [`eventually`] for what happens
//! asynchronously.
//!
//! The Postgres server is `DATABASE_URL` when set (tests create their own database next to
//! it), otherwise a container started once per test binary with testcontainers. Each test
//! binary migrates one template database once, and each test's database is a copy of it
//! (`CREATE DATABASE ... TEMPLATE`), which takes a fraction of running the migrations. All of
//! them are named after the run ([`db::test_database_name`]), so that `cargo xtask test` drops
//! its own and no others. The broker is `KAFKA_BROKERS` when set (`cargo xtask test` starts
//! one), otherwise a Kafka container.
//!
//! This module cannot start the services: service-kit sits below every one of them. The
//! harness that runs the whole system on these pieces is the `test-system` crate; the command
//! API's own tests start the command API alone (it needs no broker).

use std::fmt::Display;
use std::future::Future;
use std::time::Duration;

use sqlx::postgres::PgConnectOptions;
use sqlx::{ConnectOptions, Connection, PgConnection, PgPool};
use testcontainers_modules::kafka::apache::{KAFKA_PORT, Kafka};
use testcontainers_modules::postgres::Postgres;
use testcontainers_modules::testcontainers::ContainerAsync;
use testcontainers_modules::testcontainers::runners::AsyncRunner;
use tokio::sync::OnceCell;

use crate::SecretString;
use crate::auth::{AuthConfig, TokenRequest, mint_hs256};
use crate::db::{self, DatabaseConfig, ServiceRole};
use crate::event_log::{self, LogPosition, LoggedEvent};
use crate::kafka::KafkaConfig;

/// The HS256 secret of every test service: [`auth`] verifies with it, [`token`] signs with it.
pub const SECRET: &str = "ledger-test-secret-0123456789abcdefghij";

/// How services under test verify tokens: [`SECRET`], no rate limit.
pub fn auth() -> AuthConfig {
    AuthConfig::for_tests(SECRET)
}

/// A token of `tenant` with `roles`, for the subject `tester`, valid for ten minutes.
pub fn token(tenant: &str, roles: &[&str]) -> String {
    mint_hs256(
        &SecretString::from(SECRET),
        crate::auth::JWT_ISSUER.default,
        crate::auth::JWT_AUDIENCE.default,
        &TokenRequest {
            subject: "tester",
            tenant,
            roles,
            ttl_seconds: 600,
        },
    )
    .expect("mint a test token")
}

/// Sends the logs of the code under test to the test output when `TEST_LOG` is set (filtered
/// by `RUST_LOG`, else `info`), so that a passing run stays readable. Call it at the start of
/// a harness; only the first call of a test binary counts.
pub fn init_logs() {
    static LOGS: std::sync::Once = std::sync::Once::new();
    LOGS.call_once(|| {
        if std::env::var_os("TEST_LOG").is_some() {
            let filter = tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
            let _ = tracing_subscriber::fmt()
                .with_env_filter(filter)
                .with_test_writer()
                .try_init();
        }
    });
}

/// How long [`eventually`] waits between attempts.
const RETRY_EVERY: Duration = Duration::from_millis(100);

/// Runs `attempt` until it returns `Ok`, every 100 ms, and returns that value. Once `within`
/// has passed (an attempt still running then is abandoned), panics with the last error, which
/// should say what was awaited and what was seen instead:
///
/// ```no_run
/// # use std::time::Duration;
/// # use service_kit::testing::eventually;
/// # async fn read_model_version(_: u64) -> i64 { 0 }
/// # async fn example(account: u64, wanted: i64) {
/// eventually(Duration::from_secs(30), || async {
///     let version = read_model_version(account).await;
///     if version >= wanted { Ok(()) } else { Err(format!("{account} at version {version}")) }
/// })
/// .await;
/// # }
/// ```
pub async fn eventually<T, E, F, Fut>(within: Duration, mut attempt: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, E>>,
    E: Display,
{
    let deadline = tokio::time::Instant::now() + within;
    let mut last = String::from("no attempt finished");
    loop {
        match tokio::time::timeout_at(deadline, attempt()).await {
            Ok(Ok(value)) => return value,
            Ok(Err(err)) => last = err.to_string(),
            Err(_) => last = format!("the last attempt did not finish; before it: {last}"),
        }
        if tokio::time::Instant::now() + RETRY_EVERY > deadline {
            panic!("not within {within:?}: {last}");
        }
        tokio::time::sleep(RETRY_EVERY).await;
    }
}

/// The `count` events of the log after `after`, once exactly that many are readable (within
/// `within`): the log shows no event committed after the cluster's oldest open transaction
/// began (see `event_log`), and another test's may be open for a while.
pub async fn readable_events(
    pool: &PgPool,
    after: LogPosition,
    count: usize,
    within: Duration,
) -> Vec<LoggedEvent> {
    eventually(within, || async {
        let read = event_log::read_committed(pool, after, 100)
            .await
            .map_err(|err| err.to_string())?
            .events;
        match read.len() {
            n if n == count => Ok(read),
            n => Err(format!("{n} of {count} events readable")),
        }
    })
    .await
}

struct Server {
    url: String,
    /// Kept alive for the whole test binary; the container stops when the process exits.
    _container: Option<ContainerAsync<Postgres>>,
}

static SERVER: OnceCell<Server> = OnceCell::const_new();

async fn server() -> &'static Server {
    SERVER
        .get_or_init(|| async {
            if let Ok(url) = std::env::var("DATABASE_URL") {
                return Server {
                    url,
                    _container: None,
                };
            }
            let container = Postgres::default()
                .start()
                .await
                .expect("DATABASE_URL is not set and no Postgres container could be started");
            let port = container
                .get_host_port_ipv4(5432)
                .await
                .expect("postgres container port");
            Server {
                url: format!("postgres://postgres:postgres@127.0.0.1:{port}/postgres"),
                _container: Some(container),
            }
        })
        .await
}

struct Broker {
    address: String,
    _container: Option<ContainerAsync<Kafka>>,
}

static BROKER: OnceCell<Broker> = OnceCell::const_new();

/// Kafka settings with topics and groups no other test uses.
pub async fn kafka() -> KafkaConfig {
    let broker = BROKER
        .get_or_init(|| async {
            if let Ok(address) = std::env::var("KAFKA_BROKERS") {
                return Broker {
                    address,
                    _container: None,
                };
            }
            let container = Kafka::default()
                .start()
                .await
                .expect("KAFKA_BROKERS is not set and no Kafka container could be started");
            let port = container
                .get_host_port_ipv4(KAFKA_PORT)
                .await
                .expect("kafka container port");
            Broker {
                address: format!("127.0.0.1:{port}"),
                _container: Some(container),
            }
        })
        .await;
    KafkaConfig {
        topic_prefix: format!("test{}", uuid::Uuid::new_v4().simple()),
        ..KafkaConfig::with_brokers(broker.address.clone())
    }
}

/// The nisshi broker binary, for tests that stop and restart a broker of their own:
/// `NISSHI_BIN` (set by `cargo xtask test`), else `~/.cargo/bin/nisshi`.
pub fn nisshi_binary() -> Option<std::path::PathBuf> {
    std::env::var_os("NISSHI_BIN")
        .map(std::path::PathBuf::from)
        .or_else(|| {
            std::env::var_os("HOME")
                .map(|home| std::path::PathBuf::from(home).join(".cargo/bin/nisshi"))
        })
        .filter(|path| path.is_file())
}

/// The URL of a new, empty database (no migrations), for a broker's storage.
pub async fn empty_database_url() -> String {
    let server = server().await;
    let name = db::test_database_name();
    create_database(&server.url, &name, None).await;
    url_with_database(&server.url, &name)
}

/// The migrated database every test database of this test binary is copied from: created on
/// first use, with the services' login roles (those belong to the server, not the database).
/// Nobody stays connected to it, as Postgres copies only a database nobody uses.
static TEMPLATE: OnceCell<String> = OnceCell::const_new();

async fn template() -> &'static str {
    TEMPLATE
        .get_or_init(|| async {
            let server = server().await;
            let name = db::test_database_name();
            create_database(&server.url, &name, None).await;
            let config = DatabaseConfig::with_url(url_with_database(&server.url, &name));
            let pool = db::connect(&config)
                .await
                .expect("connect to the template database");
            db::migrate(&pool)
                .await
                .expect("migrate the template database");
            ServiceRole::ensure_development_logins(&pool)
                .await
                .expect("create the services' login roles");
            pool.close().await;
            name
        })
        .await
}

/// `url` naming database `name` instead, through sqlx's own URL handling. Without sqlx's
/// parameters: the broker reads such a URL too.
fn url_with_database(url: &str, name: &str) -> String {
    let options: PgConnectOptions = url.parse().expect("DATABASE_URL");
    let mut url = options.database(name).to_url_lossy();
    url.set_query(None);
    url.into()
}

/// Creates database `name` on the server at `url`, empty or as a copy of `template`.
async fn create_database(url: &str, name: &str, template: Option<&str>) {
    let options: PgConnectOptions = url.parse().expect("DATABASE_URL");
    let mut admin = PgConnection::connect_with(&options)
        .await
        .expect("connect to the test database server");
    let statement = match template {
        None => format!("CREATE DATABASE {name}"),
        Some(template) => format!("CREATE DATABASE {name} TEMPLATE {template}"),
    };
    sqlx::query(&statement)
        .execute(&mut admin)
        .await
        .unwrap_or_else(|err| panic!("{statement}: {err}"));
    let _ = admin.close().await;
}

/// A database that exists for one test.
pub struct TestDatabase {
    /// As the owner (the test's superuser) connects.
    pub config: DatabaseConfig,
    /// The owner's pool, for setting up and checking what the services may not touch.
    pub pool: PgPool,
}

impl TestDatabase {
    /// A migrated database with a unique name, copied from this binary's template.
    pub async fn create() -> Self {
        let template = template().await;
        let server = server().await;
        let name = db::test_database_name();
        create_database(&server.url, &name, Some(template)).await;
        let config = DatabaseConfig::with_url(url_with_database(&server.url, &name));
        let pool = db::connect(&config)
            .await
            .expect("connect to test database");
        Self { config, pool }
    }

    /// Ends the sessions of `backends` from outside their pools, as a restart of Postgres
    /// does, and waits until none is connected any more.
    pub async fn cut_backends(&self, backends: &[i32]) {
        let terminated: Vec<bool> =
            sqlx::query_scalar("SELECT pg_terminate_backend(pid) FROM unnest($1::int4[]) AS pid")
                .bind(backends)
                .fetch_all(&self.pool)
                .await
                .expect("terminate backends");
        assert!(
            terminated.iter().all(|&done| done),
            "{backends:?}: {terminated:?}"
        );
        eventually(Duration::from_secs(5), || async {
            let left: i64 =
                sqlx::query_scalar("SELECT count(*) FROM pg_stat_activity WHERE pid = ANY($1)")
                    .bind(backends)
                    .fetch_one(&self.pool)
                    .await
                    .map_err(|err| err.to_string())?;
            if left == 0 {
                Ok(())
            } else {
                Err(format!("{left} of {backends:?} still connected"))
            }
        })
        .await;
    }

    /// This database as a service connects to it: as `role`'s login, with only the
    /// privileges production grants it.
    pub fn config_as(&self, role: ServiceRole) -> DatabaseConfig {
        let login = role.development_login();
        self.config.with_login(login, login).expect("DATABASE_URL")
    }
}

/// Rewrites history as someone with direct database access would: in one transaction with
/// triggers off (so the append-only guard and the hash trigger stay out of the way), runs each
/// `;`-separated statement with `stream_id` bound as `$1`. For tests that prove tampering is
/// caught.
pub async fn tamper(pool: &PgPool, statements: &str, stream_id: &str) {
    let mut tx = pool.begin().await.expect("begin");
    sqlx::query("SET LOCAL session_replication_role = replica")
        .execute(&mut *tx)
        .await
        .expect("disable triggers (needs a superuser)");
    for statement in statements.split(';') {
        sqlx::query(statement)
            .bind(stream_id)
            .execute(&mut *tx)
            .await
            .expect("tampering statement");
    }
    tx.commit().await.expect("commit");
}

/// A statement for [`tamper`] that sets `version`'s payload to `payload` and recomputes its
/// hash exactly as the trigger does: the rewritten event holds up on its own, and only its
/// successor's link (or the hash published to Kafka) gives it away.
pub fn rewrite_and_rehash(version: i64, payload: &str) -> String {
    let payload = payload.replace('\'', "''");
    format!(
        "UPDATE events
            SET payload = '{payload}',
                hash = sha256(coalesce(prev_hash, '\\x{zeros}'::bytea)
                    || event_hash_field(aggregate_type) || event_hash_field(aggregate_id)
                    || event_hash_field(sequence::text) || event_hash_field(event_type)
                    || event_hash_field(event_version) || event_hash_field(event_id::text)
                    || event_hash_field(((extract(epoch FROM recorded_at) * 1000000)::bigint)::text)
                    || event_hash_field('{payload}')
                    || event_hash_field(metadata::text))
          WHERE aggregate_id = $1 AND sequence = {version}",
        zeros = "00".repeat(32)
    )
}
