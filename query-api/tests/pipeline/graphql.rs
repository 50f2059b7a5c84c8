//! `/graphql`: queries read what REST reads, with the same roles, tenant scope and problem
//! codes; subscriptions, through a client that is not ours (Python `gql` over websockets,
//! `graphql-transport-ws`), deliver every committed change in order, across a reconnect and
//! across replicas, and only the caller's tenant's.

use std::process::Stdio;
use std::time::Duration;

use reqwest::StatusCode;
use serde_json::{Value, json};
use service_kit::db::ServiceRole;
use service_kit::testing;
use tokio::io::{AsyncBufReadExt, BufReader, Lines};
use tokio::process::{Child, ChildStdout};
use uuid::Uuid;

use query_api::config::GraphqlConfig;

use crate::system::{System, TENANT, token};
use crate::transfers::{funded, transfer};

const SUBSCRIBER: &str = include_str!("graphql_subscriber.py");
/// Another tenant, for the walls between tenants.
const OTHER: &str = "globex";

/// POSTs a GraphQL document to `base`'s `/graphql`, with `token` if any: the JSON answer.
async fn graphql_at(
    system: &System,
    base: &str,
    token: Option<&str>,
    query: &str,
    variables: Value,
) -> Value {
    let mut request = system
        .client
        .post(format!("{base}/graphql"))
        .json(&json!({"query": query, "variables": variables}));
    if let Some(token) = token {
        request = request.bearer_auth(token);
    }
    let response = request.send().await.expect("POST /graphql");
    assert_eq!(response.status(), StatusCode::OK);
    response.json().await.expect("a JSON answer")
}

async fn graphql(system: &System, token: Option<&str>, query: &str, variables: Value) -> Value {
    graphql_at(system, &system.queries, token, query, variables).await
}

/// The `extensions.code` of each error of a GraphQL answer.
fn codes(answer: &Value) -> Vec<&str> {
    answer["errors"]
        .as_array()
        .map(|errors| {
            errors
                .iter()
                .map(|error| error["extensions"]["code"].as_str().unwrap_or("(none)"))
                .collect()
        })
        .unwrap_or_default()
}

/// The messages of each error of a GraphQL answer.
fn messages(answer: &Value) -> String {
    answer["errors"]
        .as_array()
        .map(|errors| {
            errors
                .iter()
                .map(|error| error["message"].as_str().unwrap_or_default())
                .collect::<Vec<_>>()
                .join("; ")
        })
        .unwrap_or_default()
}

/// Another query API on the same database, as a second replica would be.
async fn replica(system: &System, graphql: GraphqlConfig) -> String {
    let app = query_api::Application::build(query_api::Config {
        graphql,
        ..query_api::Config::for_tests(
            system.database.config_as(ServiceRole::TenantReader),
            testing::auth(),
        )
    })
    .await
    .expect("start another query API");
    let base = format!("http://127.0.0.1:{}", app.port());
    tokio::spawn(app.run_until_stopped(std::future::pending()));
    base
}

const ACCOUNT: &str = "query($id: UUID!, $v: Int) {
    account(id: $id, minVersion: $v) {
        id owner currency balance status version
        entries(first: 1) { edges { cursor node { version kind amount balanceAfter } }
                            pageInfo { hasNextPage endCursor } }
        transfers { edges { node { id status amount } } }
    }
}";

#[tokio::test]
async fn graphql_queries_read_what_rest_reads_with_the_same_roles_and_problems() {
    let system = System::start().await;
    let from = funded(&system, "EUR", 100).await;
    let to = funded(&system, "EUR", 0).await;
    let transfer_id = transfer(&system, from, to, 30, "EUR").await;
    crate::transfers::settled(&system, transfer_id).await;
    let version = system.move_money(from, 5).await;
    let viewer = system.viewer();

    let rest = system.account_at(from, version).await;
    let answer = graphql(
        &system,
        Some(&viewer),
        ACCOUNT,
        json!({"id": from, "v": version}),
    )
    .await;
    assert_eq!(answer["errors"], Value::Null, "{answer}");
    let account = &answer["data"]["account"];
    for (field, rest_field) in [
        ("id", "id"),
        ("owner", "owner"),
        ("balance", "balance"),
        ("version", "version"),
        ("status", "status"),
    ] {
        assert_eq!(account[field], rest[rest_field], "{field}: {answer}");
    }
    assert_eq!(account["balance"], 75);
    // Relay-style pages over the same cursors: the first entry, then the rest after it.
    let first = &account["entries"]["edges"][0];
    assert_eq!(first["node"]["kind"], "deposit");
    assert_eq!(account["entries"]["pageInfo"]["hasNextPage"], true);
    let after = account["entries"]["pageInfo"]["endCursor"].clone();
    assert_eq!(after, first["cursor"]);
    let rest_entries = system
        .query(&format!("/v1/accounts/{from}/entries?limit=1"), &viewer)
        .await
        .2;
    assert_eq!(rest_entries["next_cursor"], after);
    let next = graphql(
        &system,
        Some(&viewer),
        "query($id: UUID!, $after: String) { account(id: $id) {
            entries(first: 10, after: $after) { edges { node { version kind } }
                                               pageInfo { hasNextPage hasPreviousPage } } } }",
        json!({"id": from, "after": after}),
    )
    .await;
    let kinds: Vec<&str> = next["data"]["account"]["entries"]["edges"]
        .as_array()
        .unwrap()
        .iter()
        .map(|edge| edge["node"]["kind"].as_str().unwrap())
        .collect();
    assert_eq!(kinds, ["transfer_debit", "deposit"], "{next}");
    assert_eq!(
        account["transfers"]["edges"][0]["node"],
        json!({"id": transfer_id, "status": "completed", "amount": 30})
    );
    let by_id = graphql(
        &system,
        Some(&viewer),
        "query($id: UUID!) { transfer(id: $id) { fromAccount toAccount status version } }",
        json!({"id": transfer_id}),
    )
    .await;
    assert_eq!(by_id["data"]["transfer"]["fromAccount"], json!(from));
    assert_eq!(by_id["data"]["transfer"]["status"], "completed");

    // The audit views need `auditor`, exactly as the REST routes do.
    let audit = "query($id: UUID!) {
        auditVerify(accountId: $id) { intact eventsChecked headVersion }
        auditState(accountId: $id, version: 2) { version balance }
        auditEvents(accountId: $id, first: 2) { items { version eventType hash } nextFromVersion }
        auditLog(first: 1) { items { aggregateId } nextAfter }
    }";
    let refused = graphql(&system, Some(&viewer), audit, json!({"id": from})).await;
    assert_eq!(refused["data"], Value::Null, "{refused}");
    assert!(
        codes(&refused).iter().all(|code| *code == "forbidden"),
        "{refused}"
    );
    assert!(!codes(&refused).is_empty());
    let auditor = token(TENANT, &["auditor"]);
    let audited = graphql(&system, Some(&auditor), audit, json!({"id": from})).await;
    assert_eq!(audited["errors"], Value::Null, "{audited}");
    let rest_verify = system
        .query(&format!("/v1/audit/accounts/{from}/verify"), &auditor)
        .await
        .2;
    assert_eq!(audited["data"]["auditVerify"]["intact"], true);
    assert_eq!(
        audited["data"]["auditVerify"]["eventsChecked"],
        rest_verify["events_checked"]
    );
    assert_eq!(audited["data"]["auditState"]["balance"], 100);
    assert_eq!(audited["data"]["auditEvents"]["nextFromVersion"], 3);
    // And an auditor is no reader.
    let not_reader = graphql(&system, Some(&auditor), ACCOUNT, json!({"id": from})).await;
    assert_eq!(codes(&not_reader), ["forbidden"], "{not_reader}");

    // The REST problem types, as `extensions.code`.
    let missing = graphql(&system, None, ACCOUNT, json!({"id": from})).await;
    assert_eq!(codes(&missing), ["missing-token"], "{missing}");
    let forged = graphql(&system, Some("not-a-jwt"), ACCOUNT, json!({"id": from})).await;
    assert_eq!(codes(&forged), ["invalid-token"], "{forged}");
    let unknown = graphql(
        &system,
        Some(&viewer),
        ACCOUNT,
        json!({"id": Uuid::new_v4()}),
    )
    .await;
    assert_eq!(codes(&unknown), ["not-found"], "{unknown}");
    assert_eq!(unknown["errors"][0]["extensions"]["status"], 404);
    let bad_page = graphql(
        &system,
        Some(&viewer),
        "{ accounts(first: 0) { edges { node { id } } } }",
        json!({}),
    )
    .await;
    assert_eq!(codes(&bad_page), ["invalid-query"], "{bad_page}");
    let bad_state = graphql(
        &system,
        Some(&auditor),
        "query($id: UUID!) { auditState(accountId: $id, version: 99) { version } }",
        json!({"id": from}),
    )
    .await;
    assert_eq!(codes(&bad_state), ["no-state-at"], "{bad_state}");
}

#[tokio::test]
async fn graphql_reads_only_the_callers_tenant() {
    let system = System::start().await;
    let ours = system.open_in(TENANT, "Ada").await;
    let theirs = system.open_in(OTHER, "Bob").await;
    system.projected(ours, 1).await;
    system.projected(theirs, 1).await;
    let other_viewer = token(OTHER, &["viewer"]);

    let foreign = graphql(&system, Some(&other_viewer), ACCOUNT, json!({"id": ours})).await;
    assert_eq!(codes(&foreign), ["not-found"], "{foreign}");
    let own = graphql(&system, Some(&other_viewer), ACCOUNT, json!({"id": theirs})).await;
    assert_eq!(own["data"]["account"]["owner"], "Bob", "{own}");
    let listed = graphql(
        &system,
        Some(&other_viewer),
        "{ accounts { edges { node { id owner } } } }",
        json!({}),
    )
    .await;
    assert_eq!(
        listed["data"]["accounts"]["edges"],
        json!([{"node": {"id": theirs, "owner": "Bob"}}]),
        "{listed}"
    );
    let audited = graphql(
        &system,
        Some(&token(OTHER, &["auditor"])),
        "query($id: UUID!) { auditVerify(accountId: $id) { intact } }",
        json!({"id": ours}),
    )
    .await;
    assert_eq!(codes(&audited), ["not-found"], "{audited}");
}

#[tokio::test]
async fn graphql_refuses_documents_over_its_limits_and_can_hide_its_schema() {
    let system = System::start().await;
    let viewer = system.viewer();
    // Accounts > entries at 500 each: 250,000 nodes' worth, over the default 1,000.
    let costly = graphql(
        &system,
        Some(&viewer),
        "{ accounts(first: 500) { edges { node { entries(first: 500) { edges { node { version } } } } } } }",
        json!({}),
    )
    .await;
    assert_eq!(costly["data"], Value::Null, "{costly}");
    assert!(messages(&costly).contains("complex"), "{costly}");
    let cheap = graphql(
        &system,
        Some(&viewer),
        "{ accounts(first: 5) { edges { node { entries(first: 5) { edges { node { version } } } } } } }",
        json!({}),
    )
    .await;
    assert_eq!(cheap["errors"], Value::Null, "{cheap}");
    // Seven levels: within the default, over a replica's four.
    let deep = "{ accounts(first: 1) { edges { node { transfers(first: 1) { edges { node { id } } } } } } }";
    let accepted = graphql(&system, Some(&viewer), deep, json!({})).await;
    assert_eq!(accepted["errors"], Value::Null, "{accepted}");

    let introspection = "{ __schema { queryType { name } } }";
    let open = graphql(&system, Some(&viewer), introspection, json!({})).await;
    assert_eq!(
        open["data"]["__schema"]["queryType"]["name"], "Query",
        "{open}"
    );
    let page = system
        .client
        .get(format!("{}/graphql", system.queries))
        .send()
        .await
        .unwrap();
    assert_eq!(page.status(), StatusCode::OK);
    assert!(
        page.headers()[reqwest::header::CONTENT_SECURITY_POLICY]
            .to_str()
            .unwrap()
            .contains("script-src 'self'")
    );
    assert!(
        page.text()
            .await
            .unwrap()
            .contains("/graphql/assets/graphiql.min.js")
    );
    let asset = system
        .client
        .get(format!("{}/graphql/assets/graphiql.min.js", system.queries))
        .send()
        .await
        .unwrap();
    assert_eq!(asset.status(), StatusCode::OK);

    let closed = replica(
        &system,
        GraphqlConfig {
            introspection: false,
            graphiql: false,
            max_depth: 4,
            ..GraphqlConfig::default()
        },
    )
    .await;
    let refused = graphql_at(&system, &closed, Some(&viewer), deep, json!({})).await;
    assert_eq!(refused["data"], Value::Null, "{refused}");
    assert!(messages(&refused).contains("nested too deep"), "{refused}");
    let hidden = graphql_at(&system, &closed, Some(&viewer), introspection, json!({})).await;
    assert_eq!(hidden["data"]["__schema"], Value::Null, "{hidden}");
    let no_page = system
        .client
        .get(format!("{closed}/graphql"))
        .send()
        .await
        .unwrap();
    assert_eq!(no_page.status(), StatusCode::METHOD_NOT_ALLOWED);
    let no_assets = system
        .client
        .get(format!("{closed}/graphql/assets/graphiql.min.js"))
        .send()
        .await
        .unwrap();
    assert_eq!(no_assets.status(), StatusCode::NOT_FOUND);
}

/// A subscriber process, read line by line as it prints.
struct Subscriber {
    child: Child,
    lines: Lines<BufReader<ChildStdout>>,
}

impl Subscriber {
    fn start(
        base: &str,
        init: Value,
        document: &str,
        variables: Value,
        hang_up_after: i64,
    ) -> Self {
        Self::spawn(base, init, document, variables, hang_up_after, 1)
    }

    /// A subscriber holding `copies` subscriptions of `document` at once on one connection;
    /// each event says which (`"subscription": i`).
    fn spawn(
        base: &str,
        init: Value,
        document: &str,
        variables: Value,
        hang_up_after: i64,
        copies: usize,
    ) -> Self {
        let url = format!("{}/graphql/ws", base.replacen("http://", "ws://", 1));
        let mut child = tokio::process::Command::new("python3")
            .args([
                "-c",
                SUBSCRIBER,
                &url,
                &init.to_string(),
                document,
                &variables.to_string(),
                &hang_up_after.to_string(),
                &copies.to_string(),
            ])
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .expect("python3 must be installed");
        let lines = BufReader::new(child.stdout.take().unwrap()).lines();
        Self { child, lines }
    }

    fn bearer(
        base: &str,
        token: &str,
        document: &str,
        variables: Value,
        hang_up_after: i64,
    ) -> Self {
        Self::start(
            base,
            json!({"Authorization": format!("Bearer {token}")}),
            document,
            variables,
            hang_up_after,
        )
    }

    /// The next event the subscriber printed.
    async fn next(&mut self) -> Value {
        let line = tokio::time::timeout(Duration::from_secs(60), self.lines.next_line())
            .await
            .expect("the subscriber printed nothing for a minute")
            .unwrap()
            .expect(
                "the subscriber ended without a word (run `cargo xtask test`, which installs gql)",
            );
        serde_json::from_str(&line).unwrap()
    }

    /// The first event after changes made by `change`, made again until one comes: how a
    /// tenant-wide subscriber, which gets nothing at first, shows that it listens.
    async fn first_after<F, Fut>(&mut self, mut change: F) -> Value
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = ()>,
    {
        for _ in 0..20 {
            change().await;
            if let Ok(event) = tokio::time::timeout(Duration::from_secs(2), self.next()).await {
                return event;
            }
        }
        panic!("the subscriber got nothing after 20 changes");
    }

    /// Reads `field`'s results until one is at `version`, each of them of account `id` only.
    async fn only_until(&mut self, field: &str, id: Uuid, version: i64) {
        loop {
            let event = self.next().await;
            let change = &event["data"][field];
            assert_eq!(change["id"], json!(id), "another account's change: {event}");
            if change["version"].as_i64() == Some(version) {
                return;
            }
        }
    }

    /// The problem code the subscription was refused with.
    async fn refusal(&mut self) -> Value {
        let refused = self.next().await;
        assert!(refused["errors"].is_array(), "{refused}");
        refused["errors"][0]["extensions"]["code"].clone()
    }

    /// The server closes the connection with `code` and `reason`, and the subscriber ends.
    async fn closed_with(mut self, code: u16, reason: &str) {
        assert_eq!(self.next().await, json!({"closed": code, "reason": reason}));
        self.finished().await;
    }

    /// Sends the subscriber's process `signal` (`STOP`: a client that stops reading and keeps
    /// its connection open; `CONT`: reading again).
    fn signal(&self, signal: &str) {
        let pid = self.child.id().expect("the subscriber runs").to_string();
        let status = std::process::Command::new("kill")
            .args([&format!("-{signal}"), &pid])
            .status()
            .unwrap();
        assert!(status.success());
    }

    /// Waits for the process to end by itself.
    async fn finished(mut self) {
        let status = tokio::time::timeout(Duration::from_secs(60), self.child.wait())
            .await
            .expect("the subscriber did not end")
            .unwrap();
        assert!(status.success());
    }
}

const ACCOUNT_CHANGED: &str = "subscription($id: UUID!, $after: Int!) {
    accountChanged(id: $id, afterVersion: $after) {
        version account { balance version } entries { version amount }
    }
}";

/// Reads changes until one reaches `version`: the versions of the entries they carried, and
/// of the changes themselves.
async fn changes_until(subscriber: &mut Subscriber, version: i64) -> (Vec<i64>, Vec<i64>) {
    let (mut entries, mut changes) = (Vec::new(), Vec::new());
    while changes.last().is_none_or(|last| *last < version) {
        let event = subscriber.next().await;
        let change = &event["data"]["accountChanged"];
        assert!(change.is_object(), "{event}");
        assert_eq!(change["account"]["version"], change["version"]);
        changes.push(change["version"].as_i64().unwrap());
        entries.extend(
            change["entries"]
                .as_array()
                .unwrap()
                .iter()
                .map(|entry| entry["version"].as_i64().unwrap()),
        );
    }
    (entries, changes)
}

#[tokio::test]
async fn a_subscriber_gets_every_version_in_order_across_a_reconnect_and_replicas() {
    let system = System::start().await;
    let account = system.open(0).await;
    let viewer = system.viewer();

    let mut first = Subscriber::bearer(
        &system.queries,
        &viewer,
        ACCOUNT_CHANGED,
        json!({"id": account, "after": 0}),
        4,
    );
    // The account as it is (version 1, no money yet) comes first.
    let (entries, changes) = changes_until(&mut first, 1).await;
    assert_eq!((entries, changes), (vec![], vec![1]));
    for amount in [10, 20, 30] {
        system.move_money(account, amount).await;
    }
    let (entries, changes) = changes_until(&mut first, 4).await;
    assert_eq!(entries, [2, 3, 4], "every movement once, in order");
    assert!(
        changes.is_sorted() && changes.last() == Some(&4),
        "{changes:?}"
    );
    // It hung up at version 4; what happens meanwhile is not lost.
    first.finished().await;
    system.move_money(account, 1).await;
    let version = system.move_money(account, 2).await;
    system.projected(account, version).await;

    // Back, on another replica: fed by the same projector's notifications.
    let other = replica(&system, GraphqlConfig::default()).await;
    let mut again = Subscriber::bearer(
        &other,
        &viewer,
        ACCOUNT_CHANGED,
        json!({"id": account, "after": 4}),
        7,
    );
    let (entries, changes) = changes_until(&mut again, 6).await;
    assert_eq!(entries, [5, 6]);
    assert_eq!(changes, [6]);
    let version = system.move_money(account, 3).await;
    assert_eq!(version, 7);
    let (entries, changes) = changes_until(&mut again, 7).await;
    assert_eq!((entries, changes), (vec![7], vec![7]));
    // Delivered after the commit: a query made on receipt sees it.
    let seen = graphql(
        &system,
        Some(&viewer),
        "query($id: UUID!) { account(id: $id) { version balance } }",
        json!({"id": account}),
    )
    .await;
    assert_eq!(
        seen["data"]["account"],
        json!({"version": 7, "balance": 66})
    );
    again.finished().await;
}

#[tokio::test]
async fn a_transfer_is_followed_until_it_is_final() {
    let system = System::start().await;
    let from = funded(&system, "EUR", 100).await;
    let to = funded(&system, "EUR", 0).await;
    system.projected(from, 2).await;
    let id = transfer(&system, from, to, 40, "EUR").await;
    let mut subscriber = Subscriber::bearer(
        &system.queries,
        &system.viewer(),
        "subscription($id: UUID!) { transferChanged(id: $id) { status version } }",
        json!({"id": id}),
        0,
    );
    let mut seen = Vec::new();
    loop {
        let event = subscriber.next().await;
        if event == json!({"complete": true}) {
            break;
        }
        let change = event["data"]["transferChanged"].clone();
        assert!(change.is_object(), "{event}");
        seen.push(change);
    }
    let versions: Vec<i64> = seen
        .iter()
        .map(|c| c["version"].as_i64().unwrap())
        .collect();
    assert!(
        versions.is_sorted() && versions.windows(2).all(|w| w[0] < w[1]),
        "{seen:?}"
    );
    assert_eq!(seen.last().unwrap()["status"], "completed", "{seen:?}");
    subscriber.finished().await;
}

#[tokio::test]
async fn subscriptions_see_one_tenant_and_need_a_valid_token() {
    let system = System::start().await;
    let ours = system.open_in(TENANT, "Ada").await;
    let theirs = system.open_in(OTHER, "Bob").await;
    system.projected(ours, 1).await;
    system.projected(theirs, 1).await;
    let other_viewer = token(OTHER, &["viewer"]);

    // Another tenant's account does not exist for them.
    let mut foreign = Subscriber::bearer(
        &system.queries,
        &other_viewer,
        ACCOUNT_CHANGED,
        json!({"id": ours, "after": 0}),
        0,
    );
    assert_eq!(foreign.refusal().await, "not-found");

    // A tenant-wide subscriber of the other tenant: our change comes first, theirs after, and
    // they see theirs only. The token comes as `token` this time.
    let mut watcher = Subscriber::start(
        &system.queries,
        json!({"token": other_viewer}),
        "subscription { accountsChanged { id owner version } }",
        json!({}),
        0,
    );
    // Subscribed once a change of theirs arrives.
    let their_teller = token(OTHER, &["teller"]);
    let deposit = |amount: i64| {
        let request = system
            .client
            .post(format!("{}/v1/accounts/{theirs}/deposits", system.commands))
            .bearer_auth(&their_teller)
            .json(&json!({"amount": amount, "currency": "EUR"}));
        async move {
            let response = request.send().await.unwrap();
            assert_eq!(response.status(), StatusCode::OK);
            response.json::<Value>().await.unwrap()["version"]
                .as_i64()
                .expect("their deposit's version")
        }
    };
    let first = watcher
        .first_after(|| async {
            deposit(1).await;
        })
        .await;
    assert_eq!(
        first["data"]["accountsChanged"]["id"],
        json!(theirs),
        "{first}"
    );
    let ours_now = system.move_money(ours, 50).await;
    system.projected(ours, ours_now).await;
    // `move_money` acts for our tenant; theirs takes their own teller.
    let theirs_now = deposit(7).await;
    watcher
        .only_until("accountsChanged", theirs, theirs_now)
        .await;

    // Tokens in `connection_init`: missing, forged, expired; refused with 4401.
    let forged = service_kit::auth::mint_hs256(
        &secrecy::SecretString::from("another-secret-of-enough-length-000000"),
        "ledger",
        "ledger",
        &service_kit::auth::TokenRequest {
            subject: "mallory",
            tenant: TENANT,
            roles: &["viewer"],
            ttl_seconds: 600,
        },
    )
    .unwrap();
    let expired = signed(json!({
        "sub": "x", "tenant": TENANT, "roles": ["viewer"], "iss": "ledger", "aud": "ledger",
        "exp": now() - 3600,
    }));
    for (init, why) in [
        (json!({}), "missing token"),
        (
            json!({"Authorization": format!("Bearer {forged}")}),
            "invalid token",
        ),
        (json!({"token": expired}), "token expired"),
    ] {
        Subscriber::start(
            &system.queries,
            init,
            ACCOUNT_CHANGED,
            json!({"id": ours, "after": 0}),
            0,
        )
        .closed_with(4401, why)
        .await;
    }

    // A token that expires while connected ends the connection then.
    let short = signed(json!({
        "sub": "x", "tenant": TENANT, "roles": ["viewer"], "iss": "ledger", "aud": "ledger",
        "exp": now() + 3,
    }));
    let mut subscriber = Subscriber::bearer(
        &system.queries,
        &short,
        ACCOUNT_CHANGED,
        json!({"id": ours, "after": 0}),
        0,
    );
    let event = subscriber.next().await;
    assert_eq!(
        event["data"]["accountChanged"]["version"], ours_now,
        "{event}"
    );
    subscriber.closed_with(4401, "token expired").await;
}

fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

/// An HS256 JWT over any claims, signed with the test secret.
fn signed(claims: Value) -> String {
    jsonwebtoken::encode(
        &jsonwebtoken::Header::default(),
        &claims,
        &jsonwebtoken::EncodingKey::from_secret(testing::SECRET.as_bytes()),
    )
    .unwrap()
}

/// Commits a change of account `id` the way the projector does: the row, its entry, and the
/// notification, in one transaction (the projector's own `notify_changed`).
async fn project(pool: &sqlx::PgPool, tenant: &str, id: Uuid, version: i64, balance: i64) {
    let mut tx = pool.begin().await.unwrap();
    sqlx::query(
        "INSERT INTO accounts VALUES ($1, $2, 'Ada', 'EUR', 0, $4, 'active', $3, now(), now())
         ON CONFLICT (id) DO UPDATE SET version = $3, balance = $4",
    )
    .bind(id)
    .bind(tenant)
    .bind(version)
    .bind(balance)
    .execute(&mut *tx)
    .await
    .unwrap();
    if version > 1 {
        sqlx::query(
            "INSERT INTO account_entries (account_id, version, tenant, kind, amount, currency,
                                          balance_after, event_id, recorded_at)
             VALUES ($1, $2, $3, 'deposit', 10, 'EUR', $4, gen_random_uuid(), now())",
        )
        .bind(id)
        .bind(version)
        .bind(tenant)
        .bind(balance)
        .execute(&mut *tx)
        .await
        .unwrap();
    }
    service_kit::db::channels::notify_changed(
        &mut tx,
        service_kit::db::channels::ReadModel::Account,
        &[id],
    )
    .await
    .unwrap();
    tx.commit().await.unwrap();
}

/// A query API alone on a fresh database, with `graphql`'s limits: fed by read-model commits
/// made as the projector makes them ([`project`]), what a subscriber gets does not depend on
/// the broker.
async fn lone_query_api(graphql: GraphqlConfig) -> (testing::TestDatabase, String) {
    testing::init_logs();
    let database = testing::TestDatabase::create().await;
    let app = query_api::Application::build(query_api::Config {
        graphql,
        ..query_api::Config::for_tests(
            database.config_as(ServiceRole::TenantReader),
            testing::auth(),
        )
    })
    .await
    .unwrap();
    let base = format!("http://127.0.0.1:{}", app.port());
    tokio::spawn(app.run_until_stopped(std::future::pending()));
    (database, base)
}

/// The query API alone, fed by read-model commits as the projector makes them.
#[tokio::test]
async fn the_query_api_streams_each_committed_read_model_change_to_its_tenant_only() {
    let (database, base) = lone_query_api(GraphqlConfig::default()).await;
    let (ours, theirs) = (Uuid::new_v4(), Uuid::new_v4());
    project(&database.pool, TENANT, ours, 1, 0).await;
    project(&database.pool, OTHER, theirs, 1, 0).await;
    let viewer = token(TENANT, &["viewer"]);

    let mut subscriber = Subscriber::bearer(
        &base,
        &viewer,
        ACCOUNT_CHANGED,
        json!({"id": ours, "after": 0}),
        4,
    );
    assert_eq!(changes_until(&mut subscriber, 1).await, (vec![], vec![1]));
    // Another tenant's tenant-wide subscriber, and its first change as the sign it listens.
    let mut watcher = Subscriber::start(
        &base,
        json!({"token": token(OTHER, &["viewer"])}),
        "subscription { accountsChanged { id version } }",
        json!({}),
        0,
    );
    let mut version = 1;
    let first = watcher
        .first_after(|| {
            version += 1;
            project(&database.pool, OTHER, theirs, version, version * 10)
        })
        .await;
    assert_eq!(
        first["data"]["accountsChanged"]["id"],
        json!(theirs),
        "{first}"
    );
    for (version, balance) in [(2, 10), (3, 20), (4, 30)] {
        project(&database.pool, TENANT, ours, version, balance).await;
    }
    let (entries, changes) = changes_until(&mut subscriber, 4).await;
    assert_eq!(entries, [2, 3, 4]);
    assert!(
        changes.is_sorted() && changes.last() == Some(&4),
        "{changes:?}"
    );
    subscriber.finished().await;
    // Ours came first; the watcher sees only theirs.
    project(&database.pool, OTHER, theirs, version + 1, 0).await;
    watcher
        .only_until("accountsChanged", theirs, version + 1)
        .await;

    let mut foreign = Subscriber::bearer(
        &base,
        &token(OTHER, &["viewer"]),
        ACCOUNT_CHANGED,
        json!({"id": ours, "after": 0}),
        0,
    );
    assert_eq!(foreign.refusal().await, "not-found");
    for (init, why) in [
        (json!({}), "missing token"),
        (json!({"token": "not-a-jwt"}), "invalid token"),
        (
            json!({"token": signed(json!({
                "sub": "x", "tenant": TENANT, "roles": ["viewer"], "iss": "ledger",
                "aud": "ledger", "exp": now() - 3600,
            }))}),
            "token expired",
        ),
    ] {
        Subscriber::start(
            &base,
            init,
            ACCOUNT_CHANGED,
            json!({"id": ours, "after": 0}),
            0,
        )
        .closed_with(4401, why)
        .await;
    }
    let short = signed(json!({
        "sub": "x", "tenant": TENANT, "roles": ["viewer"], "iss": "ledger", "aud": "ledger",
        "exp": now() + 3,
    }));
    let mut subscriber = Subscriber::bearer(
        &base,
        &short,
        ACCOUNT_CHANGED,
        json!({"id": ours, "after": 3}),
        0,
    );
    let event = subscriber.next().await;
    assert_eq!(
        event["data"]["accountChanged"]["entries"],
        json!([{"version": 4, "amount": 10}])
    );
    subscriber.closed_with(4401, "token expired").await;
}

#[tokio::test]
async fn a_tenant_over_its_connection_limit_is_refused_with_4429_and_no_other_tenant_is() {
    let (database, base) = lone_query_api(GraphqlConfig {
        connections_per_tenant: 2,
        ..GraphqlConfig::default()
    })
    .await;
    let (ours, theirs) = (Uuid::new_v4(), Uuid::new_v4());
    project(&database.pool, TENANT, ours, 1, 0).await;
    project(&database.pool, OTHER, theirs, 1, 0).await;
    let viewer = token(TENANT, &["viewer"]);
    let subscribe = |token: &str, id: Uuid| {
        Subscriber::bearer(
            &base,
            token,
            ACCOUNT_CHANGED,
            json!({"id": id, "after": 0}),
            0,
        )
    };

    let mut held = Vec::new();
    for _ in 0..2 {
        let mut subscriber = subscribe(&viewer, ours);
        assert_eq!(changes_until(&mut subscriber, 1).await, (vec![], vec![1]));
        held.push(subscriber);
    }
    subscribe(&viewer, ours)
        .closed_with(4429, "too many connections for this tenant")
        .await;
    // Another tenant's connections are counted apart.
    let mut other = subscribe(&token(OTHER, &["viewer"]), theirs);
    assert_eq!(changes_until(&mut other, 1).await, (vec![], vec![1]));
    // A connection that ends gives its place back.
    drop(held.pop());
    testing::eventually(Duration::from_secs(15), || async {
        let mut subscriber = subscribe(&viewer, ours);
        let event = subscriber.next().await;
        if event["closed"] == 4429 {
            return Err(format!("still refused: {event}"));
        }
        assert_eq!(event["data"]["accountChanged"]["version"], 1, "{event}");
        Ok(())
    })
    .await;
}

#[tokio::test]
async fn a_connection_over_its_subscription_limit_is_refused_the_extra_one_only() {
    let (database, base) = lone_query_api(GraphqlConfig {
        subscriptions_per_connection: 2,
        ..GraphqlConfig::default()
    })
    .await;
    let ours = Uuid::new_v4();
    project(&database.pool, TENANT, ours, 1, 0).await;
    let mut three = Subscriber::spawn(
        &base,
        json!({"token": token(TENANT, &["viewer"])}),
        ACCOUNT_CHANGED,
        json!({"id": ours, "after": 0}),
        0,
        3,
    );
    let mut admitted = Vec::new();
    let mut refused = Vec::new();
    for _ in 0..3 {
        let event = three.next().await;
        let which = event["subscription"].as_i64().expect("which subscription");
        if event["errors"].is_array() {
            refused.push((which, event["errors"][0]["extensions"]["code"].clone()));
        } else {
            assert_eq!(event["data"]["accountChanged"]["version"], 1, "{event}");
            admitted.push(which);
        }
    }
    assert_eq!(admitted.len(), 2, "{admitted:?} {refused:?}");
    assert_eq!(refused.len(), 1, "{admitted:?} {refused:?}");
    assert_eq!(refused[0].1, "too-many-subscriptions");
    // The connection and its two subscriptions go on.
    project(&database.pool, TENANT, ours, 2, 10).await;
    let mut next = Vec::new();
    for _ in 0..2 {
        let event = three.next().await;
        assert_eq!(event["data"]["accountChanged"]["version"], 2, "{event}");
        next.push(event["subscription"].as_i64().unwrap());
    }
    next.sort_unstable();
    admitted.sort_unstable();
    assert_eq!(next, admitted);
}

/// A client that stops reading (its process stopped, its connection open) while changes flow
/// falls behind: once the socket's buffers are full it stops taking changes, and when it is
/// further behind than `GRAPHQL_SUBSCRIBER_BUFFER` it is closed with 4008. Meanwhile a fast
/// subscriber of the same tenant gets its change at once.
#[tokio::test]
async fn a_subscriber_that_stops_reading_is_closed_with_4008_and_delays_nobody() {
    let (database, base) = lone_query_api(GraphqlConfig {
        // Room for bursts a busy machine delivers at once, not for the stalled client.
        subscriber_buffer: 64,
        ..GraphqlConfig::default()
    })
    .await;
    let (big, small) = (Uuid::new_v4(), Uuid::new_v4());
    project(&database.pool, TENANT, big, 1, 0).await;
    project(&database.pool, TENANT, small, 1, 0).await;
    // 200 kB a change: a few dozen fill the sockets' buffers, then the subscriber falls
    // behind; by far more than its 64 by the last.
    const LAST: i64 = 250;
    sqlx::query("UPDATE accounts SET owner = repeat('x', 200000) WHERE id = $1")
        .bind(big)
        .execute(&database.pool)
        .await
        .unwrap();
    let viewer = token(TENANT, &["viewer"]);
    // The tenant-wide feed is the one a laggard can hold up: a subscriber of one account is
    // only ever told its account's latest change, and reads on from where it was.
    let mut slow = Subscriber::bearer(
        &base,
        &viewer,
        "subscription { accountsChanged { id version owner } }",
        json!({}),
        0,
    );
    let mut version = 1;
    let first = slow
        .first_after(|| {
            version += 1;
            project(&database.pool, TENANT, big, version, version)
        })
        .await;
    assert_eq!(
        first["data"]["accountsChanged"]["id"],
        json!(big),
        "{first}"
    );
    let mut fast = Subscriber::bearer(
        &base,
        &viewer,
        ACCOUNT_CHANGED,
        json!({"id": small, "after": 0}),
        0,
    );
    assert_eq!(changes_until(&mut fast, 1).await, (vec![], vec![1]));

    slow.signal("STOP");
    for version in version + 1..=LAST {
        project(&database.pool, TENANT, big, version, version).await;
    }
    project(&database.pool, TENANT, small, 2, 10).await;
    let fast_change = tokio::time::timeout(Duration::from_secs(3), changes_until(&mut fast, 2))
        .await
        .expect("the fast subscriber waited on the slow one");
    assert_eq!(fast_change, (vec![2], vec![2]));

    slow.signal("CONT");
    let mut versions = Vec::new();
    let closed = loop {
        let event = slow.next().await;
        match event["data"]["accountsChanged"]["version"].as_i64() {
            Some(version) => versions.push(version),
            None => break event,
        }
    };
    assert_eq!(
        closed,
        json!({"closed": 4008, "reason": "subscriber too slow: it fell behind the changes"}),
        "after versions {versions:?}"
    );
    assert!(
        versions.last().is_some_and(|last| *last < LAST),
        "{versions:?}"
    );
    slow.finished().await;
}
