//! A fresh, migrated database for each test.
//!
//! The server is `DATABASE_URL` when set (any database on it; tests create their own next to
//! it), otherwise a Postgres container started once per test binary with testcontainers.

use sqlx::postgres::PgConnectOptions;
use sqlx::{Connection, PgConnection, PgPool};
use testcontainers_modules::postgres::Postgres;
use testcontainers_modules::testcontainers::ContainerAsync;
use testcontainers_modules::testcontainers::runners::AsyncRunner;
use tokio::sync::OnceCell;

use crate::db::{self, DatabaseConfig, TEST_DATABASE_PREFIX};

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

/// A database that exists for one test.
pub struct TestDatabase {
    pub config: DatabaseConfig,
    pub pool: PgPool,
}

impl TestDatabase {
    /// Creates and migrates a database with a unique name.
    pub async fn create() -> Self {
        let server = server().await;
        let options: PgConnectOptions = server.url.parse().expect("DATABASE_URL");
        let name = format!("{TEST_DATABASE_PREFIX}{}", uuid::Uuid::new_v4().simple());
        let mut admin = PgConnection::connect_with(&options)
            .await
            .expect("connect to the test database server");
        sqlx::query(&format!("CREATE DATABASE {name}"))
            .execute(&mut admin)
            .await
            .expect("create test database");
        let url = url_with_database(&server.url, &name);
        let config = DatabaseConfig::with_url(url);
        let pool = db::connect(&config)
            .await
            .expect("connect to test database");
        db::migrate(&pool).await.expect("migrate test database");
        Self { config, pool }
    }
}

/// `url` with its path (the database name) replaced by `database`.
fn url_with_database(url: &str, database: &str) -> String {
    let (base, query) = match url.split_once('?') {
        Some((base, query)) => (base, Some(query)),
        None => (url, None),
    };
    let authority_end = base
        .find("://")
        .map(|scheme| scheme + 3)
        .and_then(|start| base[start..].find('/').map(|slash| start + slash))
        .unwrap_or(base.len());
    let mut result = format!("{}/{database}", &base[..authority_end]);
    if let Some(query) = query {
        result.push('?');
        result.push_str(query);
    }
    result
}

#[cfg(test)]
mod tests {
    use super::url_with_database;

    #[test]
    fn replaces_the_database_name() {
        assert_eq!(
            url_with_database("postgres://u@h:5432/postgres?sslmode=disable", "x"),
            "postgres://u@h:5432/x?sslmode=disable"
        );
        assert_eq!(url_with_database("postgres://u@h", "x"), "postgres://u@h/x");
    }
}
