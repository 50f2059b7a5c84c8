//! The command API alone, on a database of its own: what these tests run against. It needs no
//! broker and no other service (the whole system is the `test-system` crate's).

use command_api::{Application, Config};
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};
use service_kit::auth::{TokenRequest, mint_hs256};
use service_kit::db::{DatabaseConfig, ServiceRole};
use service_kit::testing::{self, TestDatabase};
use service_kit::{ExposeSecret, SecretString};
use sqlx::PgPool;
use uuid::Uuid;

pub(crate) use service_kit::testing::SECRET;
pub(crate) const TENANT: &str = "acme";

/// A running command API on its own database.
pub(crate) struct TestApp {
    pub(crate) base: String,
    /// The ops listener: health probes and `/metrics`.
    pub(crate) ops: String,
    pub(crate) pool: PgPool,
    /// As the command API connects: the writer's login.
    pub(crate) database: DatabaseConfig,
    /// As the owner connects (the test's own superuser), for what services may not do.
    pub(crate) owner: DatabaseConfig,
    client: reqwest::Client,
}

/// A JSON response: status, headers and body.
pub(crate) struct Reply {
    pub(crate) status: StatusCode,
    pub(crate) headers: reqwest::header::HeaderMap,
    pub(crate) body: Value,
}

impl Reply {
    /// The problem `type` slug, asserting the media type is problem+json.
    pub(crate) fn problem(&self) -> &str {
        assert_eq!(
            self.headers["content-type"], "application/problem+json",
            "status {} body {}",
            self.status, self.body
        );
        assert_eq!(self.body["status"], self.status.as_u16());
        self.body["type"]
            .as_str()
            .and_then(|t| t.strip_prefix("urn:ledger:problem:"))
            .expect("problem type")
    }

    pub(crate) fn version(&self) -> i64 {
        assert!(self.status.is_success(), "{} {}", self.status, self.body);
        self.body["version"].as_i64().expect("version")
    }
}

impl TestApp {
    pub(crate) async fn spawn() -> Self {
        Self::spawn_adjusted(|_| {}).await
    }

    /// An app whose configuration `adjust` changed from [`Config::for_tests`].
    pub(crate) async fn spawn_adjusted(adjust: impl FnOnce(&mut Config)) -> Self {
        let database = TestDatabase::create().await;
        let mut config =
            Config::for_tests(database.config_as(ServiceRole::Writer), testing::auth());
        adjust(&mut config);
        Self::spawn_with(config, database.pool, database.config).await
    }

    /// Another replica on the same database (its own cache and locks).
    pub(crate) async fn replica(&self) -> Self {
        Self::spawn_with(
            Config::for_tests(self.database.clone(), testing::auth()),
            self.pool.clone(),
            self.owner.clone(),
        )
        .await
    }

    /// The README's restore procedure: this app's database dumped (`pg_dump -Fc`), restored
    /// into a new database of the same server (`pg_restore`), and a command API on it.
    pub(crate) async fn restored(&self) -> Self {
        let dump = std::env::temp_dir().join(format!("ledger-{}.dump", Uuid::new_v4()));
        // libpq takes the URL without sqlx's own parameters.
        let libpq = |config: &DatabaseConfig| {
            let url = config.url.expose_secret();
            url.split('?').next().unwrap_or(url).to_owned()
        };
        let owner_url = &libpq(&self.owner);
        let ran = |program: &str, args: &[&str]| {
            let status = std::process::Command::new(program)
                .args(args)
                .status()
                .unwrap_or_else(|err| panic!("{program} could not start: {err}"));
            assert!(status.success(), "{program} failed: {status}");
        };
        ran(
            "pg_dump",
            &[
                "--format=custom",
                "--file",
                dump.to_str().unwrap(),
                owner_url,
            ],
        );
        let name = service_kit::db::test_database_name();
        let owner = self.owner.with_database(&name).unwrap();
        service_kit::db::ensure_database_exists(&owner)
            .await
            .unwrap();
        ran(
            "pg_restore",
            &[
                "--exit-on-error",
                "--dbname",
                &libpq(&owner),
                dump.to_str().unwrap(),
            ],
        );
        let _ = std::fs::remove_file(&dump);
        let login = ServiceRole::Writer.development_login();
        let writer = owner.with_login(login, login).unwrap();
        let pool = service_kit::db::connect(&owner).await.unwrap();
        Self::spawn_with(Config::for_tests(writer, testing::auth()), pool, owner).await
    }

    async fn spawn_with(config: Config, pool: PgPool, owner: DatabaseConfig) -> Self {
        testing::init_logs();
        let database = config.database.clone();
        let app = Application::build(config).await.expect("build app");
        let base = format!("http://127.0.0.1:{}", app.port());
        let ops = format!("http://127.0.0.1:{}", app.ops_port());
        tokio::spawn(app.run_until_stopped(std::future::pending()));
        Self {
            base,
            ops,
            pool,
            database,
            owner,
            client: reqwest::Client::new(),
        }
    }

    pub(crate) fn token(&self, tenant: &str, roles: &[&str]) -> String {
        testing::token(tenant, roles)
    }

    pub(crate) fn teller(&self) -> String {
        self.token(TENANT, &["teller"])
    }

    pub(crate) async fn send(
        &self,
        method: Method,
        path: &str,
        token: Option<&str>,
        headers: &[(&str, &str)],
        body: Option<Vec<u8>>,
    ) -> Reply {
        let mut request = self.client.request(method, format!("{}{path}", self.base));
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        if let Some(body) = body {
            request = request.body(body);
        }
        reply(request.send().await.expect("request")).await
    }

    /// GET `path` from the ops listener.
    pub(crate) async fn ops_get(&self, path: &str) -> Reply {
        let response = self.client.get(format!("{}{path}", self.ops)).send().await;
        reply(response.expect("request")).await
    }

    /// POST a JSON body as a teller of [`TENANT`].
    pub(crate) async fn post(&self, path: &str, body: Value) -> Reply {
        self.post_with(path, &self.teller(), &[], Some(body)).await
    }

    pub(crate) async fn post_with(
        &self,
        path: &str,
        token: &str,
        headers: &[(&str, &str)],
        body: Option<Value>,
    ) -> Reply {
        let mut all = vec![("content-type", "application/json")];
        all.extend_from_slice(headers);
        let body = body.map(|b| serde_json::to_vec(&b).unwrap());
        self.send(Method::POST, path, Some(token), &all, body).await
    }

    pub(crate) async fn open_account(&self, token: &str, overdraft: i64) -> Uuid {
        let reply = self
            .post_with(
                "/v1/accounts",
                token,
                &[],
                Some(json!({"owner": "Ada", "currency": "EUR", "overdraft_limit": overdraft})),
            )
            .await;
        assert_eq!(reply.status, StatusCode::CREATED, "{}", reply.body);
        reply.body["account_id"].as_str().unwrap().parse().unwrap()
    }

    pub(crate) async fn deposit(&self, account: Uuid, amount: i64) -> Reply {
        self.post(
            &format!("/v1/accounts/{account}/deposits"),
            json!({"amount": amount, "currency": "EUR"}),
        )
        .await
    }

    pub(crate) async fn event_count(&self) -> i64 {
        sqlx::query_scalar("SELECT count(*) FROM events")
            .fetch_one(&self.pool)
            .await
            .unwrap()
    }

    /// The balance recorded by the stream's last money event (0 if none).
    pub(crate) async fn balance(&self, account: Uuid) -> i64 {
        let payloads: Vec<Value> = sqlx::query_scalar(
            "SELECT payload::jsonb FROM events WHERE aggregate_id = $1 ORDER BY sequence",
        )
        .bind(account.to_string())
        .fetch_all(&self.pool)
        .await
        .unwrap();
        payloads
            .iter()
            .rev()
            .find_map(|p| {
                p.as_object()?
                    .values()
                    .next()?
                    .get("balance_after")?
                    .as_i64()
            })
            .unwrap_or(0)
    }
}

/// A token signed with `secret` (perhaps not the services'), valid for `ttl` seconds.
pub(crate) fn token_with(secret: &str, tenant: &str, roles: &[&str], ttl: u64) -> String {
    mint_hs256(
        &SecretString::from(secret),
        "ledger",
        "ledger",
        &TokenRequest {
            subject: "tester",
            tenant,
            roles,
            ttl_seconds: ttl,
        },
    )
    .unwrap()
}

async fn reply(response: reqwest::Response) -> Reply {
    let status = response.status();
    let headers = response.headers().clone();
    let bytes = response.bytes().await.expect("body");
    let body = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
    Reply {
        status,
        headers,
        body,
    }
}

/// What the server wrote on a raw connection until its problem+json body began, if that came
/// within `within`; for requests a client library would not send (half a body, a huge
/// declared length).
pub(crate) async fn problem_on(
    socket: &mut tokio::net::TcpStream,
    within: std::time::Duration,
) -> Option<String> {
    use tokio::io::AsyncReadExt;
    let mut response = Vec::new();
    tokio::time::timeout(within, async {
        let mut buffer = [0u8; 4096];
        while !String::from_utf8_lossy(&response).contains("urn:ledger:problem:") {
            let read = socket.read(&mut buffer).await.unwrap();
            assert!(read > 0, "closed without an answer");
            response.extend_from_slice(&buffer[..read]);
        }
    })
    .await
    .ok()?;
    Some(String::from_utf8_lossy(&response).into_owned())
}
