//! What each test needs, isolated from every other test: a fresh, migrated database and its
//! own Kafka topics.
//!
//! The Postgres server is `DATABASE_URL` when set (tests create their own database next to
//! it), otherwise a container started once per test binary with testcontainers. The broker is
//! `KAFKA_BROKERS` when set (`cargo xtask test` starts one), otherwise a Kafka container.

use sqlx::postgres::PgConnectOptions;
use sqlx::{ConnectOptions, Connection, PgConnection, PgPool};
use testcontainers_modules::kafka::apache::{KAFKA_PORT, Kafka};
use testcontainers_modules::postgres::Postgres;
use testcontainers_modules::testcontainers::ContainerAsync;
use testcontainers_modules::testcontainers::runners::AsyncRunner;
use tokio::sync::OnceCell;

use crate::db::{self, DatabaseConfig, ServiceRole};
use crate::kafka::KafkaConfig;

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
        brokers: broker.address.clone(),
        topic_prefix: format!("test{}", uuid::Uuid::new_v4().simple()),
        partitions: 3,
        replication: crate::kafka::Replication::default(),
        properties: crate::kafka::ClientProperties::default(),
        fetch_wait_ms: 10,
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

/// A new, empty database (no migrations) on the test server, and how to reach it.
async fn create_database() -> PgConnectOptions {
    let server: PgConnectOptions = server().await.url.parse().expect("DATABASE_URL");
    let name = db::test_database_name();
    let mut admin = PgConnection::connect_with(&server)
        .await
        .expect("connect to the test database server");
    sqlx::query(&format!("CREATE DATABASE {name}"))
        .execute(&mut admin)
        .await
        .expect("create test database");
    server.database(&name)
}

/// The URL of a new, empty database (no migrations), for a broker's storage.
pub async fn empty_database_url() -> String {
    let mut url = create_database().await.to_url_lossy();
    // Another program reads it: none of sqlx's own parameters.
    url.set_query(None);
    url.into()
}

/// A database that exists for one test.
pub struct TestDatabase {
    pub config: DatabaseConfig,
    pub pool: PgPool,
}

impl TestDatabase {
    /// Creates and migrates a database with a unique name.
    pub async fn create() -> Self {
        let config = DatabaseConfig::with_url(create_database().await.to_url_lossy());
        let pool = db::connect(&config)
            .await
            .expect("connect to test database");
        db::migrate(&pool).await.expect("migrate test database");
        ServiceRole::ensure_development_logins(&pool)
            .await
            .expect("create the services' login roles");
        Self { config, pool }
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
