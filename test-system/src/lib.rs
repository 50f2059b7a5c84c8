//! The whole Ledger in one test: its own database (cloned from the migrated template) and its
//! own topics; the command API and the query API on free ports; the relay, the projector and
//! the transfer process manager as tasks that a test can kill and restart, as a crash would.
//!
//! # Why a crate of its own
//! What every test needs lives in `service_kit::testing`: the database from the template, the
//! broker, the test token, [`eventually`]. But service-kit sits below the services and cannot
//! start them; starting them all takes command-api, projector and query-api together, which
//! only a crate above them can depend on. Hence this crate, a dev-dependency of each test
//! binary that runs the system (query-api's pipeline tests, audit's CLI tests), so there is
//! one way to start it. (Cargo allows the dev-dependency cycle: those test binaries link the
//! same service crates as this one.) The command API's own tests need no broker and no other
//! service: they start `command_api::Application` alone, with `Config::for_tests`.
//!
//! Every service is configured by its `Config::for_tests`; what differs here is said where it
//! is set.

use std::time::Duration;

use command_api::AppendSignal;
use command_api::process::{ProcessConfig, ProcessManager};
use command_api::relay::{Relay, RelayConfig};
use projector::Projector;
use reqwest::StatusCode;
use serde_json::{Value, json};
use service_kit::db::ServiceRole;
use service_kit::kafka::KafkaConfig;
use service_kit::server::ServerLimits;
use service_kit::testing::{self, TestDatabase};
pub use service_kit::testing::{eventually, token};
use sqlx::PgPool;
use tokio::task::JoinHandle;
use uuid::Uuid;

/// The tenant the helpers act for.
pub const TENANT: &str = "acme";

/// How long [`TestSystem::start`]'s query API lets `min_version` wait: long enough for a slow
/// machine running many tests, so that [`TestSystem::account_at`] is a wait, not a race.
const MAX_WAIT: Duration = Duration::from_secs(15);

pub struct TestSystem {
    /// The owner's pool (the test's superuser), for setting up and checking.
    pub pool: PgPool,
    /// As the relay connects: the writer's login.
    writer: PgPool,
    pub database: TestDatabase,
    pub kafka: KafkaConfig,
    /// The command API's base URL.
    pub commands: String,
    /// The query API's base URL.
    pub queries: String,
    pub client: reqwest::Client,
    relay: Option<JoinHandle<()>>,
    projector: Option<Detached>,
    /// The running projector's health probes and `/metrics`.
    pub projector_ops: String,
    process_manager: Option<Detached>,
}

impl TestSystem {
    /// Every service, on this test's own topics of the test broker.
    pub async fn start() -> Self {
        Self::start_with_wait(MAX_WAIT).await
    }

    /// As [`TestSystem::start`], with the query API's `min_version` wait at `max_wait`.
    pub async fn start_with_wait(max_wait: Duration) -> Self {
        Self::start_with(max_wait, testing::kafka().await).await
    }

    /// As [`TestSystem::start_with_wait`], on the broker and topics of `kafka`.
    pub async fn start_with(max_wait: Duration, kafka: KafkaConfig) -> Self {
        testing::init_logs();
        let database = TestDatabase::create().await;
        let query_api = query_api::Application::build(query_api::Config {
            max_wait,
            // So that a test sees a transfer shown stalled within seconds.
            transfer_stalled_after: Duration::from_secs(3),
            // The wait must end before the request does (the query API refuses to start
            // otherwise).
            server: ServerLimits {
                request_timeout: max_wait + Duration::from_secs(5),
                ..ServerLimits::default()
            },
            ..query_api::Config::for_tests(
                database.config_as(ServiceRole::TenantReader),
                testing::auth(),
            )
        })
        .await
        .expect("start the query API");
        let queries = format!("http://127.0.0.1:{}", query_api.port());
        tokio::spawn(query_api.run_until_stopped(std::future::pending()));
        let command_api = command_api::Application::build(command_api::Config {
            // Where `Location` and `status_url` point: this system's query API.
            query_api_url: queries.clone(),
            ..command_api::Config::for_tests(
                database.config_as(ServiceRole::Writer),
                testing::auth(),
            )
        })
        .await
        .expect("start the command API");
        let commands = format!("http://127.0.0.1:{}", command_api.port());
        tokio::spawn(command_api.run_until_stopped(std::future::pending()));
        let writer = service_kit::db::connect(&database.config_as(ServiceRole::Writer))
            .await
            .expect("connect as the writer");
        let mut system = Self {
            pool: database.pool.clone(),
            writer,
            database,
            kafka,
            commands,
            queries,
            // A hang anywhere in the system fails the test instead of stalling it.
            client: reqwest::Client::builder()
                .timeout(Duration::from_secs(60))
                .build()
                .expect("an HTTP client"),
            relay: None,
            projector: None,
            projector_ops: String::new(),
            process_manager: None,
        };
        system.start_relay().await;
        system.start_projector().await;
        system.start_process_manager().await;
        system
    }

    /// The transfer process manager, resuming transfers stuck for more than two seconds
    /// (rather than thirty), so that tests of a lost message do not wait long.
    pub async fn start_process_manager(&mut self) {
        let config = ProcessConfig {
            stuck_after: Duration::from_secs(2),
            ..ProcessConfig::for_tests(
                self.database.config_as(ServiceRole::Writer),
                self.kafka.clone(),
            )
        };
        let (started, manager) = Detached::start(async move {
            let manager = ProcessManager::build(config)
                .await
                .expect("start the process manager");
            ((), manager.run(std::future::pending()))
        })
        .await;
        self.process_manager = Some(manager);
        started
    }

    /// Kills the process manager mid-stream, as a crash would.
    pub async fn kill_process_manager(&mut self) {
        if let Some(manager) = self.process_manager.take() {
            manager.kill().await;
        }
    }

    pub async fn start_relay(&mut self) {
        self.relay = Some(self.spawn_relay());
    }

    /// A relay task of its own, as another replica would run.
    pub fn spawn_relay(&self) -> JoinHandle<()> {
        let relay = Relay::new(
            RelayConfig::for_tests(self.kafka.clone()),
            self.writer.clone(),
            AppendSignal::default(),
        )
        .expect("create the relay");
        tokio::spawn(relay.run(std::future::pending()))
    }

    /// Kills the relay mid-stream, as a crash would.
    pub async fn kill_relay(&mut self) {
        if let Some(relay) = self.relay.take() {
            relay.abort();
            let _ = relay.await;
        }
    }

    pub async fn start_projector(&mut self) {
        let config = projector::Config::for_tests(
            self.database.config_as(ServiceRole::Projector),
            self.kafka.clone(),
        );
        let (ops_port, projector) = Detached::start(async move {
            let projector = Projector::build(config).await.expect("start the projector");
            (
                projector.ops_port(),
                projector.run_until_stopped(std::future::pending()),
            )
        })
        .await;
        self.projector_ops = format!("http://127.0.0.1:{ops_port}");
        self.projector = Some(projector);
    }

    /// The running projector's `/metrics`.
    pub async fn projector_metrics(&self) -> String {
        self.client
            .get(format!("{}/metrics", self.projector_ops))
            .send()
            .await
            .expect("GET the projector's /metrics")
            .text()
            .await
            .expect("the projector's /metrics")
    }

    /// Kills the projector mid-stream, as a crash would.
    pub async fn kill_projector(&mut self) {
        if let Some(projector) = self.projector.take() {
            projector.kill().await;
        }
    }

    /// POSTs `body` to the command API as a teller of [`TENANT`]: the status and the JSON
    /// answer (`null` if none).
    pub async fn command(
        &self,
        path: &str,
        body: Option<Value>,
        headers: &[(&str, &str)],
    ) -> (StatusCode, Value) {
        let mut request = self
            .client
            .post(format!("{}{path}", self.commands))
            .bearer_auth(token(TENANT, &["teller"]));
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        if let Some(body) = body {
            request = request.json(&body);
        }
        let response = request.send().await.expect("POST to the command API");
        let status = response.status();
        (status, response.json().await.unwrap_or(Value::Null))
    }

    /// Opens an account of Ada's in EUR.
    pub async fn open(&self, overdraft: i64) -> Uuid {
        let (status, body) = self
            .command(
                "/v1/accounts",
                Some(json!({"owner": "Ada", "currency": "EUR", "overdraft_limit": overdraft})),
                &[],
            )
            .await;
        assert_eq!(status, StatusCode::CREATED, "{body}");
        account_id(&body)
    }

    /// Opens an account for `owner` in `tenant`, which may be another tenant than the tests'.
    pub async fn open_in(&self, tenant: &str, owner: &str) -> Uuid {
        let reply: Value = self
            .client
            .post(format!("{}/v1/accounts", self.commands))
            .bearer_auth(token(tenant, &["teller"]))
            .json(&json!({"owner": owner, "currency": "EUR"}))
            .send()
            .await
            .expect("POST /v1/accounts")
            .json()
            .await
            .expect("a JSON answer");
        account_id(&reply)
    }

    /// Deposits (positive) or withdraws (negative) and returns the new version.
    pub async fn move_money(&self, account: Uuid, amount: i64) -> i64 {
        let action = if amount >= 0 {
            "deposits"
        } else {
            "withdrawals"
        };
        let (status, body) = self
            .command(
                &format!("/v1/accounts/{account}/{action}"),
                Some(json!({"amount": amount.abs(), "currency": "EUR"})),
                &[],
            )
            .await;
        assert_eq!(status, StatusCode::OK, "{body}");
        body["version"].as_i64().expect("a version")
    }

    /// GETs `path` from the query API with `token`: the status, the headers and the JSON
    /// answer (`null` if none).
    pub async fn query(
        &self,
        path: &str,
        token: &str,
    ) -> (StatusCode, reqwest::header::HeaderMap, Value) {
        let response = self
            .client
            .get(format!("{}{path}", self.queries))
            .bearer_auth(token)
            .send()
            .await
            .expect("GET from the query API");
        let status = response.status();
        let headers = response.headers().clone();
        (
            status,
            headers,
            response.json().await.unwrap_or(Value::Null),
        )
    }

    /// A viewer's token for [`TENANT`].
    pub fn viewer(&self) -> String {
        token(TENANT, &["viewer"])
    }

    /// The account as the query API shows it once it reached `version`.
    pub async fn account_at(&self, account: Uuid, version: i64) -> Value {
        let (status, _, body) = self
            .query(
                &format!("/v1/accounts/{account}?min_version={version}"),
                &self.viewer(),
            )
            .await;
        assert_eq!(status, StatusCode::OK, "{body}");
        body
    }

    /// Waits (up to 30 s) until the read model holds `version` of `account`, looking at the
    /// table itself rather than through the query API.
    pub async fn projected(&self, account: Uuid, version: i64) {
        eventually(Duration::from_secs(30), || async move {
            let current: Option<i64> =
                sqlx::query_scalar("SELECT version FROM accounts WHERE id = $1")
                    .bind(account)
                    .fetch_optional(&self.pool)
                    .await
                    .map_err(|err| err.to_string())?;
            match current {
                Some(current) if current >= version => Ok(()),
                _ => Err(format!(
                    "account {account} is at version {current:?}, not {version}"
                )),
            }
        })
        .await;
    }

    /// Waits (up to 30 s) until the relay has published every stored event.
    pub async fn published(&self) {
        eventually(Duration::from_secs(30), || async move {
            let (published, stored): (i64, i64) = sqlx::query_as(
                "SELECT coalesce((SELECT max(global_position) FROM log_checkpoints), 0),
                        coalesce((SELECT max(global_position) FROM events), 0)",
            )
            .fetch_one(&self.pool)
            .await
            .map_err(|err| err.to_string())?;
            if published >= stored {
                Ok(())
            } else {
                Err(format!("published up to {published} of {stored}"))
            }
        })
        .await;
    }

    /// `projector check`: the differences between the read models and a fold of the event
    /// store (empty when consistent).
    pub async fn differences(&self) -> Vec<String> {
        let report = projector::check::check(&self.pool)
            .await
            .expect("projector check");
        report
            .differences
            .into_iter()
            .map(|difference| format!("{}: {}", difference.id, difference.what))
            .collect()
    }

    /// Waits until the read models equal a fold of the event store.
    pub async fn converged(&self, within: Duration) {
        eventually(within, || async move {
            let differences = self.differences().await;
            if differences.is_empty() {
                Ok(())
            } else {
                Err(format!("read models did not converge: {differences:#?}"))
            }
        })
        .await;
    }
}

fn account_id(body: &Value) -> Uuid {
    body["account_id"]
        .as_str()
        .and_then(|id| id.parse().ok())
        .unwrap_or_else(|| panic!("no account_id in {body}"))
}

/// The slug of a problem+json `type` (`urn:ledger:problem:<slug>`), or "" for anything else.
pub fn problem(body: &Value) -> &str {
    body["type"]
        .as_str()
        .and_then(|t| t.strip_prefix("urn:ledger:problem:"))
        .unwrap_or_default()
}

/// The relay's row in `log_checkpoints`.
const RELAY_READER: &str = "kafka-relay";

/// How the relay asks for the leadership lock, as `pg_stat_activity` shows it.
const TRY_LOCK: &str = "SELECT pg_try_advisory_lock($1)";

/// A log position, `(tx_id, global_position)`, with the `tx_id` as text.
pub type LogPosition = (String, i64);

/// Evidence that a process was stopped while it had work: what it had not done yet of what
/// existed when it was stopped.
impl TestSystem {
    /// The newest committed event's position in the log.
    pub async fn log_head(&self) -> Option<LogPosition> {
        sqlx::query_as(
            "SELECT tx_id::text, global_position FROM events
              ORDER BY tx_id DESC, global_position DESC LIMIT 1",
        )
        .fetch_optional(&self.pool)
        .await
        .unwrap()
    }

    /// The relay's checkpoint: everything up to it is on the topics.
    pub async fn relay_checkpoint(&self) -> Option<LogPosition> {
        sqlx::query_as("SELECT tx_id::text, global_position FROM log_checkpoints WHERE reader = $1")
            .bind(RELAY_READER)
            .fetch_optional(&self.pool)
            .await
            .unwrap()
    }

    /// Events at or before `head` that are not under the relay's checkpoint.
    pub async fn unpublished_up_to(&self, head: &LogPosition) -> i64 {
        sqlx::query_scalar(
            "SELECT count(*) FROM events e
              WHERE (e.tx_id, e.global_position) <= ($1::text::xid8, $2)
                AND NOT EXISTS (SELECT 1 FROM log_checkpoints c
                                 WHERE c.reader = $3
                                   AND (e.tx_id, e.global_position) <= (c.tx_id, c.global_position))",
        )
        .bind(&head.0)
        .bind(head.1)
        .bind(RELAY_READER)
        .fetch_one(&self.pool)
        .await
        .unwrap()
    }

    /// Waits (up to 30 s) until the relay has published something and events it has not
    /// published exist; returns the newest of those.
    pub async fn relay_backlog(&self) -> LogPosition {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            if self.relay_checkpoint().await.is_some()
                && let Some(head) = self.log_head().await
                && self.unpublished_up_to(&head).await > 0
            {
                return head;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "the relay never had events to publish (or never published: is its checkpoint \
                 still named {RELAY_READER:?}?)"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// The session holding the relay's leadership lock in this database, if any.
    pub async fn leader_pid(&self) -> Option<i32> {
        sqlx::query_scalar(
            "SELECT pid FROM pg_locks WHERE locktype = 'advisory' AND granted
                AND database = (SELECT oid FROM pg_database WHERE datname = current_database())",
        )
        .fetch_optional(&self.pool)
        .await
        .unwrap()
    }

    /// Waits (up to 5 s) for a session other than `not` to hold the leadership lock.
    pub async fn leader_other_than(&self, not: Option<i32>) -> i32 {
        eventually(Duration::from_secs(5), || async {
            match self.leader_pid().await {
                Some(pid) if Some(pid) != not => Ok(pid),
                leader => Err(format!("no relay took over: the leader is {leader:?}")),
            }
        })
        .await
    }

    /// Sessions holding the relay's leadership lock in this database.
    pub async fn leaders(&self) -> i64 {
        sqlx::query_scalar(
            "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND granted
                AND database = (SELECT oid FROM pg_database WHERE datname = current_database())",
        )
        .fetch_one(&self.pool)
        .await
        .unwrap()
    }

    /// The database's clock, to compare with `pg_stat_activity`'s.
    pub async fn database_now(&self) -> chrono::DateTime<chrono::Utc> {
        sqlx::query_scalar("SELECT clock_timestamp()")
            .fetch_one(&self.pool)
            .await
            .unwrap()
    }

    /// Waits (up to 10 s) until a relay that does not lead has asked for the leadership after
    /// `since` and been refused (its request answered, the lock still another's); returns its
    /// session.
    pub async fn refused_standby(&self, since: chrono::DateTime<chrono::Utc>) -> i32 {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            let refused: Option<i32> = sqlx::query_scalar(
                "SELECT a.pid FROM pg_stat_activity a
                  WHERE a.datname = current_database() AND a.state = 'idle'
                    AND a.query = $1 AND a.query_start > $2
                    AND NOT EXISTS (SELECT 1 FROM pg_locks l
                                     WHERE l.pid = a.pid AND l.locktype = 'advisory' AND l.granted)
                  LIMIT 1",
            )
            .bind(TRY_LOCK)
            .bind(since)
            .fetch_optional(&self.pool)
            .await
            .unwrap();
            if let Some(pid) = refused {
                return pid;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "no relay was refused the leadership lock (asking with {TRY_LOCK:?}) since {since}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Kills the relay while events it has not published exist, and proves the kill hit
    /// then: once its lock connection is gone (so its checkpoint can no longer move), events
    /// committed before the kill are still not under its checkpoint. Returns how many.
    pub async fn kill_relay_mid_stream(&mut self) -> i64 {
        for _ in 0..20 {
            let head = self.relay_backlog().await;
            self.kill_relay().await;
            self.no_relay_leads().await;
            let left = self.unpublished_up_to(&head).await;
            if left > 0 {
                return left;
            }
            // It published them between the look and the kill: again.
            self.start_relay().await;
        }
        panic!("the relay always caught up before it was killed");
    }

    /// Waits (up to 10 s) until no session holds the leadership lock.
    async fn no_relay_leads(&self) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while self.leaders().await > 0 {
            assert!(
                tokio::time::Instant::now() < deadline,
                "a killed relay still holds its lock"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// Account events published (under the relay's checkpoint), and those the read model
    /// applied (its versions add up to them).
    async fn account_events_published_and_applied(&self) -> (i64, i64) {
        sqlx::query_as(
            "SELECT (SELECT count(*) FROM events e, log_checkpoints c
                      WHERE c.reader = $1 AND e.aggregate_type = 'account'
                        AND (e.tx_id, e.global_position) <= (c.tx_id, c.global_position)),
                    (SELECT coalesce(sum(version), 0)::int8 FROM accounts)",
        )
        .bind(RELAY_READER)
        .fetch_one(&self.pool)
        .await
        .unwrap()
    }

    /// Kills the projector while messages it has not applied are on the topic, and proves the
    /// kill hit then: once none of its sessions is in a statement or a transaction (so the
    /// read model can no longer move), account events published before the kill are still
    /// not applied. Returns how many.
    pub async fn kill_projector_mid_stream(&mut self) -> i64 {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        loop {
            let (published, applied) = self.account_events_published_and_applied().await;
            if published > applied {
                self.kill_projector().await;
                self.projector_settled().await;
                let (_, applied) = self.account_events_published_and_applied().await;
                if applied < published {
                    return published - applied;
                }
                // It applied them between the look and the kill: again.
                self.start_projector().await;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "the projector never had messages to apply when it was to be killed"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// Waits (up to 10 s) until no session of the projector's login in this database is in a
    /// statement or a transaction.
    async fn projector_settled(&self) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            let busy: i64 = sqlx::query_scalar(
                "SELECT count(*) FROM pg_stat_activity
                  WHERE datname = current_database() AND usename = $1 AND state <> 'idle'",
            )
            .bind(ServiceRole::Projector.development_login())
            .fetch_one(&self.pool)
            .await
            .unwrap();
            if busy == 0 {
                return;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "a killed projector's sessions are still busy"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// Kills the process manager while transfers it was told of (their request is on the
    /// topic) are unsettled, and proves the kill hit then: some of those are unsettled still
    /// after it. Returns how many.
    pub async fn kill_process_manager_mid_stream(&mut self) -> usize {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        loop {
            let in_flight: Vec<String> = sqlx::query_scalar(
                "SELECT e.aggregate_id FROM events e, log_checkpoints c
                  WHERE c.reader = $1 AND e.event_type = 'TransferRequested'
                    AND (e.tx_id, e.global_position) <= (c.tx_id, c.global_position)
                    AND NOT EXISTS (SELECT 1 FROM events f
                                     WHERE f.aggregate_id = e.aggregate_id
                                       AND f.event_type IN ('TransferCompleted', 'TransferRejected', 'TransferFailed'))",
            )
            .bind(RELAY_READER)
            .fetch_all(&self.pool)
            .await
            .unwrap();
            if !in_flight.is_empty() {
                self.kill_process_manager().await;
                let unsettled: i64 = sqlx::query_scalar(
                    "SELECT count(*) FROM unnest($1::text[]) AS t(id)
                      WHERE NOT EXISTS (SELECT 1 FROM events f
                                         WHERE f.aggregate_id = t.id
                                           AND f.event_type IN ('TransferCompleted', 'TransferRejected', 'TransferFailed'))",
                )
                .bind(&in_flight)
                .fetch_one(&self.pool)
                .await
                .unwrap();
                if unsettled > 0 {
                    return unsettled as usize;
                }
                self.start_process_manager().await;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "the process manager never had a transfer in flight when it was to be killed"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
}

/// A service with a Kafka consumer, run on a runtime and a thread of its own. librdkafka can
/// hang forever closing a consumer, in `rd_kafka_assign` from the revoke (librdkafka issue
/// 4884), and a consumer is closed when it is dropped: a service killed here is dropped on its
/// own thread, which nobody waits for, so that hang cannot stall a test (the test binary's
/// exit ends the thread). Once `kill` returns, the service does nothing more.
struct Detached {
    stop: Option<tokio::sync::oneshot::Sender<tokio::sync::oneshot::Sender<()>>>,
}

impl Detached {
    /// Runs `start` on the new thread: it builds the service and returns what the caller
    /// needs to know of it, and the future that runs it.
    async fn start<T, F, R>(start: F) -> (T, Self)
    where
        T: Send + 'static,
        F: Future<Output = (T, R)> + Send + 'static,
        R: Future<Output = ()> + Send + 'static,
    {
        let (started, built) = tokio::sync::oneshot::channel();
        let (stop, stopped) = tokio::sync::oneshot::channel::<tokio::sync::oneshot::Sender<()>>();
        std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("a runtime for the service");
            runtime.block_on(async move {
                let (known, run) = start.await;
                let _ = started.send(known);
                let service = tokio::spawn(run);
                if let Ok(killed) = stopped.await {
                    // On this single-threaded runtime the service runs only when this task
                    // awaits: aborted now, it never runs again.
                    service.abort();
                    let _ = killed.send(());
                }
            });
        });
        let known = built.await.expect("the service started");
        (known, Self { stop: Some(stop) })
    }

    async fn kill(mut self) {
        if let Some(stop) = self.stop.take() {
            let (killed, done) = tokio::sync::oneshot::channel();
            if stop.send(killed).is_ok() {
                let _ = done.await;
            }
        }
    }
}

impl Drop for Detached {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let (killed, _) = tokio::sync::oneshot::channel();
            let _ = stop.send(killed);
        }
    }
}
