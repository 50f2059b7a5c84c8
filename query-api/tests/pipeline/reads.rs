//! `GET /v1/accounts/{id}` in one round trip behind both tenant walls, and `If-None-Match`
//! and reads answered from the projector's notifications. The query API alone on a database of its own:
//! rows are written as the projector writes them, and notified as it notifies them
//! (`notify_changed`), so no broker is needed.

use std::time::{Duration, Instant};

use reqwest::StatusCode;
use service_kit::db::ServiceRole;
use service_kit::db::channels::{ReadModel, notify_changed};
use service_kit::testing::{self, TestDatabase, eventually};
use sqlx::PgPool;
use uuid::Uuid;

use crate::system::{TENANT, token};

struct QueryApi {
    database: TestDatabase,
    base: String,
    client: reqwest::Client,
}

impl QueryApi {
    async fn start() -> Self {
        let database = TestDatabase::create().await;
        let api = query_api::Application::build(query_api::Config::for_tests(
            database.config_as(ServiceRole::TenantReader),
            testing::auth(),
        ))
        .await
        .expect("start the query API");
        let base = format!("http://127.0.0.1:{}", api.port());
        tokio::spawn(api.run_until_stopped(std::future::pending()));
        Self {
            database,
            base,
            client: reqwest::Client::new(),
        }
    }

    fn pool(&self) -> &PgPool {
        &self.database.pool
    }

    /// The status and `ETag` of `tenant` reading `path`, sending `If-None-Match: "tag"`.
    async fn get(&self, tenant: &str, path: &str, tag: Option<i64>) -> (StatusCode, String) {
        let mut request = self
            .client
            .get(format!("{}{path}", self.base))
            .bearer_auth(token(tenant, &["viewer"]));
        if let Some(tag) = tag {
            request = request.header("if-none-match", format!("\"{tag}\""));
        }
        let response = request.send().await.unwrap();
        let etag = response
            .headers()
            .get("etag")
            .map(|value| value.to_str().unwrap().to_owned())
            .unwrap_or_default();
        (response.status(), etag)
    }

    /// Ends the connection the query API listens to notifications on, as a database restart
    /// would.
    async fn cut_listener(&self) {
        let ended: Vec<bool> = sqlx::query_scalar(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity
              WHERE datname = current_database() AND query LIKE 'LISTEN%'",
        )
        .fetch_all(self.pool())
        .await
        .unwrap();
        assert_eq!(ended, [true], "one listener");
    }

    /// Projects [`TENANT`]'s account `id` at `version`, notified, and waits until the query API
    /// has heard the notification: notified at `version` while the row says the next one, only
    /// the notification can answer `If-None-Match` for `version` with 304. The row is then put
    /// back at `version`.
    async fn notify_until_heard(&self, id: Uuid, version: i64) {
        let path = format!("/v1/accounts/{id}");
        project(self.pool(), TENANT, id, version, true).await;
        project(self.pool(), TENANT, id, version + 1, false).await;
        eventually(Duration::from_secs(30), || async {
            match self.get(TENANT, &path, Some(version)).await {
                (StatusCode::NOT_MODIFIED, _) => Ok(()),
                seen => Err(format!("notification not heard yet: {seen:?}")),
            }
        })
        .await;
        project(self.pool(), TENANT, id, version, false).await;
    }

    /// The status and body of `tenant` reading `path`.
    async fn read(&self, tenant: &str, path: &str) -> (StatusCode, serde_json::Value) {
        let response = self
            .client
            .get(format!("{}{path}", self.base))
            .bearer_auth(token(tenant, &["viewer"]))
            .send()
            .await
            .unwrap();
        let status = response.status();
        (status, response.json().await.unwrap_or_default())
    }
}

/// Writes account `id` of `tenant` at `version`, as the projector would; tells the query API
/// (in the same transaction, as the projector does) if `notify`.
async fn project(pool: &PgPool, tenant: &str, id: Uuid, version: i64, notify: bool) {
    let mut tx = pool.begin().await.unwrap();
    sqlx::query(
        "INSERT INTO accounts (id, tenant, owner, currency, overdraft_limit, balance, status,
                               version, opened_at, updated_at)
         VALUES ($1, $2, 'Ada', 'EUR', 0, 0, 'active', $3, now(), now())
         ON CONFLICT (id) DO UPDATE SET version = excluded.version",
    )
    .bind(id)
    .bind(tenant)
    .bind(version)
    .execute(&mut *tx)
    .await
    .unwrap();
    if notify {
        notify_changed(&mut tx, ReadModel::Account, &[id])
            .await
            .unwrap();
    }
    tx.commit().await.unwrap();
}

/// What `ledger_account` returns for `tenant` and `id` when called on `connection`.
async fn read_through_function(
    connection: &mut sqlx::PgConnection,
    tenant: &str,
    id: Uuid,
) -> Vec<Uuid> {
    sqlx::query_scalar("SELECT id FROM ledger_account($1, $2)")
        .bind(tenant)
        .bind(id)
        .fetch_all(connection)
        .await
        .unwrap()
}

/// Makes the reader's policy on `accounts` show no row (`hide`), or its tenant's rows again.
async fn hide_accounts(owner: &PgPool, hide: bool) {
    let rows = if hide {
        "false"
    } else {
        "tenant = current_setting('ledger.tenant', true)"
    };
    sqlx::query(&format!(
        "ALTER POLICY tenant_rows ON accounts USING ({rows})"
    ))
    .execute(owner)
    .await
    .unwrap();
}

/// The role and the tenant setting of `connection`'s session.
async fn session(connection: &mut sqlx::PgConnection) -> (String, Option<String>) {
    sqlx::query_as("SELECT current_user::text, nullif(current_setting('ledger.tenant', true), '')")
        .fetch_one(connection)
        .await
        .unwrap()
}

#[tokio::test]
async fn an_account_read_is_one_statement_behind_both_tenant_walls() {
    let api = QueryApi::start().await;
    let (mine, theirs) = (Uuid::new_v4(), Uuid::new_v4());
    project(api.pool(), TENANT, mine, 3, false).await;
    project(api.pool(), "globex", theirs, 2, false).await;
    let path = |id: Uuid| format!("/v1/accounts/{id}");

    assert_eq!(
        api.get(TENANT, &path(mine), None).await,
        (StatusCode::OK, "\"3\"".into())
    );
    assert_eq!(
        api.get(TENANT, &path(theirs), None).await.0,
        StatusCode::NOT_FOUND
    );
    assert_eq!(
        api.get("globex", &path(theirs), None).await.0,
        StatusCode::OK
    );

    // Row-level security is a wall of its own under the function, even for a caller that
    // would bypass it (the owner here is a superuser): a policy that shows nothing hides the
    // row its own filter would find.
    let mut owner = api.pool().acquire().await.unwrap();
    assert_eq!(
        read_through_function(&mut owner, TENANT, mine).await,
        [mine]
    );
    hide_accounts(api.pool(), true).await;
    assert!(
        read_through_function(&mut owner, TENANT, mine)
            .await
            .is_empty()
    );
    assert_eq!(
        api.get(TENANT, &path(mine), None).await.0,
        StatusCode::NOT_FOUND
    );
    hide_accounts(api.pool(), false).await;

    // Neither the role nor the tenant outlives the call on the pooled connection, not even
    // inside the caller's transaction.
    let before = session(&mut owner).await;
    assert_eq!(before.1, None);
    let mut tx = sqlx::Connection::begin(&mut *owner).await.unwrap();
    assert_eq!(read_through_function(&mut tx, TENANT, mine).await, [mine]);
    assert_eq!(session(&mut tx).await, before);
    tx.rollback().await.unwrap();
    assert_eq!(
        read_through_function(&mut owner, TENANT, mine).await,
        [mine]
    );
    assert_eq!(session(&mut owner).await, before);

    // A caller acting as the reader role already (the query API's kept connections): the
    // policy still hides the row, and the tenant does not outlive the call, not even inside
    // the caller's transaction.
    owner.close_on_drop();
    sqlx::query("SET ROLE ledger_tenant_reader")
        .execute(&mut *owner)
        .await
        .unwrap();
    let reader = session(&mut owner).await;
    assert_eq!(reader, ("ledger_tenant_reader".into(), None));
    assert_eq!(
        read_through_function(&mut owner, TENANT, mine).await,
        [mine]
    );
    assert_eq!(session(&mut owner).await, reader);
    let mut tx = sqlx::Connection::begin(&mut *owner).await.unwrap();
    assert_eq!(read_through_function(&mut tx, TENANT, mine).await, [mine]);
    assert_eq!(session(&mut tx).await, reader);
    tx.rollback().await.unwrap();
    hide_accounts(api.pool(), true).await;
    assert!(
        read_through_function(&mut owner, TENANT, mine)
            .await
            .is_empty()
    );
    hide_accounts(api.pool(), false).await;
    drop(owner);

    // A rebuild swaps in a new table and drops the old; the function reads the new one.
    projector::rebuild::rebuild(api.pool(), false)
        .await
        .unwrap();
    project(api.pool(), TENANT, mine, 4, false).await;
    assert_eq!(
        api.get(TENANT, &path(mine), None).await,
        (StatusCode::OK, "\"4\"".into())
    );
}

#[tokio::test]
async fn if_none_match_is_answered_from_the_notified_version_for_its_tenant_only() {
    let api = QueryApi::start().await;
    let id = Uuid::new_v4();
    let path = format!("/v1/accounts/{id}");
    let within = Duration::from_secs(30);

    // Never notified: read, and answered by what the row says.
    project(api.pool(), TENANT, id, 3, false).await;
    assert_eq!(
        api.get(TENANT, &path, Some(3)).await,
        (StatusCode::NOT_MODIFIED, "\"3\"".into())
    );
    project(api.pool(), TENANT, id, 4, false).await;
    assert_eq!(
        api.get(TENANT, &path, Some(3)).await,
        (StatusCode::OK, "\"4\"".into())
    );

    // Notified at 4, then changed to 5 behind the query API's back: a 304 for "4" can only
    // come from the notification, since the row says 5.
    project(api.pool(), TENANT, id, 4, true).await;
    project(api.pool(), TENANT, id, 5, false).await;
    eventually(within, || async {
        match api.get(TENANT, &path, Some(4)).await {
            (StatusCode::NOT_MODIFIED, etag) if etag == "\"4\"" => Ok(()),
            seen => Err(format!("not yet answered from the notification: {seen:?}")),
        }
    })
    .await;
    // Another tag, another tenant, or a `min_version` past the known version: read.
    assert_eq!(
        api.get(TENANT, &path, Some(3)).await,
        (StatusCode::OK, "\"5\"".into())
    );
    assert_eq!(
        api.get("globex", &path, Some(4)).await.0,
        StatusCode::NOT_FOUND
    );
    assert_eq!(
        api.get(TENANT, &format!("{path}?min_version=5"), Some(4))
            .await,
        (StatusCode::OK, "\"5\"".into())
    );
    assert_eq!(
        api.get(TENANT, &format!("{path}?min_version=4"), Some(4))
            .await,
        (StatusCode::NOT_MODIFIED, "\"4\"".into())
    );
    assert_eq!(
        api.get(TENANT, &format!("{path}?min_version=0"), Some(4))
            .await
            .0,
        StatusCode::BAD_REQUEST
    );

    // The listener's connection dies: what was notified may be stale now, so it is forgotten
    // and the row read again.
    api.cut_listener().await;
    eventually(within, || async {
        match api.get(TENANT, &path, Some(4)).await {
            (StatusCode::OK, etag) if etag == "\"5\"" => Ok(()),
            seen => Err(format!("still answered from before the gap: {seen:?}")),
        }
    })
    .await;
    // Once it listens again, notifications count again.
    project(api.pool(), TENANT, id, 6, true).await;
    project(api.pool(), TENANT, id, 7, false).await;
    eventually(within, || async {
        match api.get(TENANT, &path, Some(6)).await {
            (StatusCode::NOT_MODIFIED, _) => Ok(()),
            seen => {
                // Notified before the listener was back: notify again.
                project(api.pool(), TENANT, id, 6, true).await;
                project(api.pool(), TENANT, id, 7, false).await;
                Err(format!("not answered from the notification: {seen:?}"))
            }
        }
    })
    .await;
}

#[tokio::test]
async fn an_account_read_at_its_notified_version_is_answered_from_memory_until_notified_or_cut_off()
{
    let api = QueryApi::start().await;
    let id = Uuid::new_v4();
    let path = format!("/v1/accounts/{id}");
    let owner = || async {
        let (status, body) = api.read(TENANT, &path).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        (
            body["version"].as_i64().unwrap(),
            body["owner"].as_str().unwrap().to_owned(),
        )
    };
    let pool = api.pool();
    let change_owner_unnotified = move |name: &'static str| async move {
        sqlx::query("UPDATE accounts SET owner = $2 WHERE id = $1")
            .bind(id)
            .bind(name)
            .execute(pool)
            .await
            .unwrap();
    };

    api.notify_until_heard(id, 3).await;
    assert_eq!(
        owner().await,
        (3, "Ada".into()),
        "read at the notified version"
    );

    // Changed behind the query API's back at the same version: only memory still says "Ada".
    change_owner_unnotified("Changed unnotified").await;
    assert_eq!(owner().await, (3, "Ada".into()), "answered from memory");
    assert_eq!(
        api.read("globex", &path).await.0,
        StatusCode::NOT_FOUND,
        "memory is the reading tenant's only"
    );
    // A `min_version` past what memory holds is looked for in the database, where a version
    // whose notification never came shows.
    project(api.pool(), TENANT, id, 4, false).await;
    let (status, body) = api.read(TENANT, &format!("{path}?min_version=4")).await;
    assert_eq!(
        (status, body["version"].as_i64()),
        (StatusCode::OK, Some(4))
    );

    // The next notified version is read, and then remembered in turn.
    api.notify_until_heard(id, 4).await;
    assert_eq!(owner().await, (4, "Changed unnotified".into()));
    change_owner_unnotified("Changed again").await;
    assert_eq!(owner().await, (4, "Changed unnotified".into()));

    // The listener's connection dies: memory is forgotten with the versions at once, well
    // before they would have been too old to trust.
    api.cut_listener().await;
    eventually(Duration::from_secs(3), || async {
        match owner().await {
            (4, name) if name == "Changed again" => Ok(()),
            seen => Err(format!("still answered from before the gap: {seen:?}")),
        }
    })
    .await;
}

/// A `min_version` past the account's notified version is not read at once: the row reaches it
/// only by a commit whose notification is on its way, so the query waits for that. A version
/// whose notification never comes is still found, by the look after the wait.
#[tokio::test]
async fn a_min_version_past_the_notified_version_waits_for_its_notification_before_reading() {
    let api = QueryApi::start().await;
    let id = Uuid::new_v4();
    api.notify_until_heard(id, 3).await;
    project(api.pool(), TENANT, id, 4, false).await;

    let asked = Instant::now();
    let (status, body) = api
        .read(TENANT, &format!("/v1/accounts/{id}?min_version=4"))
        .await;
    assert_eq!(
        (status, body["version"].as_i64()),
        (StatusCode::OK, Some(4))
    );
    assert!(
        asked.elapsed() >= query_api::WAIT_POLL,
        "answered in {:?}: the row was read before the wait for its notification",
        asked.elapsed()
    );
}
