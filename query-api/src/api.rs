//! Routes, response bodies and the OpenAPI document.

use std::time::Duration;

use axum::extract::{FromRequestParts, Query, State};
use axum::http::request::Parts;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use service_kit::auth::{AuthConfig, Authorized, RequiredRoles, Role};
use service_kit::db;
use service_kit::db::channels::ReadModel;
use service_kit::db::kept::KeptConnections;
use service_kit::http::{PathId, PathResource};
use sqlx::{PgConnection, PgPool};
use utoipa::{IntoParams, OpenApi, ToSchema};
use uuid::Uuid;

use service_kit::problem::{BearerAuth, ProblemDocument, StandardProblems, swagger_ui};

use crate::AppState;
use crate::error::QueryError;

/// Page size when `limit` is absent, and the largest accepted.
const DEFAULT_LIMIT: i64 = 50;
const MAX_LIMIT: i64 = 500;
/// How often a `min_version` query looks at the read model again when no notification of its
/// account's projection woke it first (one missed while the listener reconnected).
pub const WAIT_POLL: Duration = Duration::from_millis(100);

pub(crate) fn router(state: AppState, auth: &AuthConfig) -> Router {
    Router::new()
        .route("/v1/accounts", get(list_accounts))
        .route("/v1/accounts/{id}", get(get_account))
        .route("/v1/accounts/{id}/entries", get(list_entries))
        .merge(crate::audit::router())
        .merge(crate::transfers::router())
        .merge(swagger_ui(ApiDoc::openapi(), auth))
        .route(
            "/asyncapi.json",
            get(asyncapi(crate::contract::asyncapi_text())),
        )
        .with_state(state.clone())
        .merge(crate::graphql::router(state))
}

/// Roles `viewer` or `teller`: reading the read models (`Authorized<Reader>`).
pub(crate) enum Reader {}

impl RequiredRoles for Reader {
    const ROLES: &'static [Role] = &[Role::Viewer, Role::Teller];
}

/// An account named in the path; anything but a UUID names none.
pub(crate) enum Account {}

impl PathResource for Account {
    type Rejection = QueryError;

    fn not_found() -> QueryError {
        QueryError::NotFound
    }
}

/// The `{id}` of an account path.
pub(crate) type AccountId = PathId<Account>;

/// Query-string parameters, with malformed ones answered as problem+json.
pub(crate) struct Params<T>(pub(crate) T);

impl<T: serde::de::DeserializeOwned + Send, S: Send + Sync> FromRequestParts<S> for Params<T> {
    type Rejection = QueryError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        Query::<T>::from_request_parts(parts, state)
            .await
            .map(|Query(params)| Params(params))
            .map_err(|rejection| QueryError::InvalidQuery(rejection.body_text()))
    }
}

/// An account as the read model holds it.
#[derive(
    Debug, Clone, Serialize, Deserialize, ToSchema, sqlx::FromRow, async_graphql::SimpleObject,
)]
#[graphql(name = "Account", complex)]
pub(crate) struct AccountView {
    pub(crate) id: Uuid,
    owner: String,
    /// ISO 4217 code.
    currency: String,
    /// Minor units.
    balance: i64,
    overdraft_limit: i64,
    /// `active`, `frozen` or `closed`.
    status: String,
    /// The last stream version applied to this view.
    pub(crate) version: i64,
    opened_at: DateTime<Utc>,
    updated_at: DateTime<Utc>,
}

impl AccountView {
    /// The most text an account the projector wrote holds: its owner at 4 bytes a character,
    /// a currency code and a status.
    const MAX_TEXT_BYTES: usize = 4 * domain::money::MAX_OWNER_CHARS + 16;

    fn text_bytes(&self) -> usize {
        self.owner.len() + self.currency.len() + self.status.len()
    }
}

/// A money movement.
#[derive(
    Debug, Clone, Serialize, Deserialize, ToSchema, sqlx::FromRow, async_graphql::SimpleObject,
)]
#[graphql(name = "Entry")]
pub(crate) struct EntryView {
    /// The stream version of the event that moved the money.
    pub(crate) version: i64,
    /// `deposit`, `withdrawal`, `transfer_debit`, `transfer_credit` or `transfer_refund`.
    kind: String,
    amount: i64,
    currency: String,
    balance_after: i64,
    event_id: Uuid,
    recorded_at: DateTime<Utc>,
    /// The transfer behind the movement, if any.
    transfer_id: Option<Uuid>,
}

/// A page of results; pass `next_cursor` as `cursor` for the next one.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub(crate) struct Page<T> {
    pub(crate) items: Vec<T>,
    pub(crate) next_cursor: Option<String>,
}

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub(crate) struct ReadParams {
    /// Wait (bounded) until the view reflects at least this stream version, e.g. the version
    /// a command returned; 503 with `Retry-After` if it does not in time.
    #[param(minimum = 1)]
    pub(crate) min_version: Option<i64>,
}

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub(crate) struct ListAccountsParams {
    pub(crate) owner: Option<String>,
    /// `active`, `frozen` or `closed`.
    pub(crate) status: Option<String>,
    /// 1 to 500, default 50.
    #[param(minimum = 1, maximum = 500)]
    pub(crate) limit: Option<i64>,
    pub(crate) cursor: Option<String>,
}

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub(crate) struct ListEntriesParams {
    /// 1 to 500, default 50.
    #[param(minimum = 1, maximum = 500)]
    pub(crate) limit: Option<i64>,
    pub(crate) cursor: Option<String>,
    /// As for the account: wait until the account's view reached this version.
    #[param(minimum = 1)]
    pub(crate) min_version: Option<i64>,
}

const ACCOUNT_COLUMNS: &str =
    "id, owner, currency, balance, overdraft_limit, status, version, opened_at, updated_at";

/// Account `id` as `tenant` sees it now. From memory when the projector's latest notification
/// of the account names the version last read (`versions`); else from the database.
pub(crate) async fn find_account(
    state: &AppState,
    tenant: &str,
    id: Uuid,
) -> Result<Option<AccountView>, QueryError> {
    match state.known.view(tenant, id) {
        Some(account) => Ok(Some(account)),
        None => read_account(state, tenant, id).await,
    }
}

/// Up to `size` of `pool`'s connections kept for [`read_account`]. They act as the reader role
/// for their whole session, so `ledger_account` need not switch to it (and back) on every read.
pub(crate) fn account_reads(pool: PgPool, size: usize) -> KeptConnections {
    KeptConnections::acting_as(pool, size, db::TENANT_READER_ROLE)
}

/// Account `id` as `tenant` sees it, read in one statement, one round trip (`ledger_account`,
/// in `migrations/`, reads as the reader role with the tenant set for the call, as
/// [`AppState::scope`] does for a transaction); kept in memory if it is at or past the version
/// last notified. A row with more text than the domain allows (one not written by the
/// projector) is not kept: it would break the memory's bound.
async fn read_account(
    state: &AppState,
    tenant: &str,
    id: Uuid,
) -> Result<Option<AccountView>, QueryError> {
    let mut connection = state.account_reads.get().await?;
    let account: Result<Option<AccountView>, _> = sqlx::query_as(&format!(
        "SELECT {ACCOUNT_COLUMNS} FROM ledger_account($1, $2)"
    ))
    .bind(tenant)
    .bind(id)
    .fetch_optional(&mut *connection)
    .await;
    connection.keep_if_usable(&account);
    let account = account?;
    if let Some(account) = &account
        && account.text_bytes() <= AccountView::MAX_TEXT_BYTES
    {
        state.known.keep(tenant, id, account.version, account);
    }
    Ok(account)
}

/// Account `id` as `scope` (a tenant scope) sees it, for reads that need it in one snapshot
/// with others.
pub(crate) async fn account_in(
    scope: &mut PgConnection,
    tenant: &str,
    id: Uuid,
) -> Result<Option<AccountView>, sqlx::Error> {
    sqlx::query_as(&format!(
        "SELECT {ACCOUNT_COLUMNS} FROM accounts WHERE id = $1 AND tenant = $2"
    ))
    .bind(id)
    .bind(tenant)
    .fetch_optional(scope)
    .await
}

/// The account, once its view reached `min_version` (waiting at most the configured time).
pub(crate) async fn account_at(
    state: &AppState,
    tenant: &str,
    id: Uuid,
    min_version: Option<i64>,
) -> Result<AccountView, QueryError> {
    check_min_version(min_version)?;
    let Some(wanted) = min_version else {
        return find_account(state, tenant, id)
            .await?
            .ok_or(QueryError::NotFound);
    };
    let deadline = tokio::time::Instant::now() + state.max_wait;
    // Subscribed before the first look, so a change between the look and the wait is not missed.
    // To this account's changes only: a waiter looks again when its account reached the
    // version, not at every commit of every account.
    let mut changes = state.changes.subscribe(Some((ReadModel::Account, id)));
    let mut stream_checked = false;
    // While the account's notified version is short of `wanted`, the row reaches it by a
    // commit whose notification is on its way: the first look waits for that instead of
    // reading a row that is almost always still behind (under a steady load, half of the
    // database's reads for `min_version` queries). A wait that ends without it, the
    // notification lost or never sent (a `projector rebuild` swaps rows in unnotified),
    // looks in the database after at most `WAIT_POLL`, as before.
    let mut look = state
        .known
        .version(tenant, id)
        .is_none_or(|notified| notified >= wanted);
    loop {
        if look {
            // Memory only when it answers: a waiter looks again in the database, where a
            // version whose notification was lost shows.
            let account = match state.known.view(tenant, id) {
                Some(account) if account.version >= wanted => Some(account),
                _ => read_account(state, tenant, id).await?,
            };
            match account {
                Some(account) if account.version >= wanted => return Ok(account),
                // Not projected yet, or no such account at all: only the event store can
                // tell, and a mistyped id must not be told to retry.
                None if !stream_checked => {
                    if !stream_exists(state, tenant, id).await? {
                        return Err(QueryError::NotFound);
                    }
                    stream_checked = true;
                }
                _ => {}
            }
            // Refused only after a look, however short the wait allowed.
            if tokio::time::Instant::now() >= deadline {
                return Err(QueryError::NotYetVisible { wanted });
            }
        }
        let wake = deadline.min(tokio::time::Instant::now() + WAIT_POLL);
        let _ = tokio::time::timeout_at(wake, changes.reached(wanted)).await;
        look = true;
    }
}

fn check_min_version(min_version: Option<i64>) -> Result<(), QueryError> {
    if min_version.is_some_and(|version| version < 1) {
        return Err(QueryError::InvalidQuery(
            "min_version must be at least 1".into(),
        ));
    }
    Ok(())
}

/// Whether the event store holds account `id` for `tenant` (row-level security shows only
/// that tenant's events).
async fn stream_exists(state: &AppState, tenant: &str, id: Uuid) -> Result<bool, QueryError> {
    let exists: bool = sqlx::query_scalar(
        "SELECT EXISTS (SELECT 1 FROM events
                         WHERE aggregate_type = 'account' AND aggregate_id = $1 AND sequence = 1)",
    )
    .bind(id.to_string())
    .fetch_one(&mut *state.scope(tenant).await?)
    .await?;
    Ok(exists)
}

pub(crate) fn limit(requested: Option<i64>, default: i64) -> Result<i64, QueryError> {
    match requested {
        None => Ok(default),
        Some(limit) if (1..=MAX_LIMIT).contains(&limit) => Ok(limit),
        Some(_) => Err(QueryError::InvalidQuery(format!(
            "limit must be between 1 and {MAX_LIMIT}"
        ))),
    }
}

/// Cursors are opaque to clients: the hex of the last key of the previous page.
fn encode_cursor(key: &str) -> String {
    hex::encode(key)
}

pub(crate) fn decode_cursor<T: std::str::FromStr>(
    cursor: Option<&str>,
) -> Result<Option<T>, QueryError> {
    cursor
        .map(|cursor| {
            hex::decode(cursor)
                .ok()
                .and_then(|bytes| String::from_utf8(bytes).ok())
                .and_then(|key| key.parse().ok())
                .ok_or_else(|| QueryError::InvalidQuery("cursor is not one this API issued".into()))
        })
        .transpose()
}

#[utoipa::path(
    get, path = "/v1/accounts/{id}", tag = "accounts",
    params(("id" = Uuid, Path, description = "Account id"), ReadParams),
    responses(
        (status = 200, description = "The account; `ETag` is its version", body = AccountView),
        (status = 304, description = "Unchanged since the `If-None-Match` version"),
        (status = 400, description = "Invalid query", body = ProblemDocument, content_type = "application/problem+json"),
        (status = 404, description = "No such account for this tenant", body = ProblemDocument, content_type = "application/problem+json"),
        (status = 503, description = "`min_version` not reached in time, or database unavailable", body = ProblemDocument, content_type = "application/problem+json"),
    ),
    security(("bearer" = []))
)]
async fn get_account(
    State(state): State<AppState>,
    Authorized { principal, .. }: Authorized<Reader>,
    PathId { id, .. }: AccountId,
    Params(params): Params<ReadParams>,
    headers: HeaderMap,
) -> Result<Response, QueryError> {
    check_min_version(params.min_version)?;
    // The projector's notifications say which version is current: a client that has it is
    // answered without a read. A `min_version` past it waits as usual.
    if let Some(version) = state.known.version(&principal.tenant, id)
        && params.min_version.is_none_or(|wanted| wanted <= version)
    {
        let etag = etag(version);
        if if_none_match(&headers, &etag) {
            return Ok(not_modified(etag));
        }
    }
    let account = account_at(&state, &principal.tenant, id, params.min_version).await?;
    let version = account.version;
    Ok(versioned(account, version, &headers))
}

/// `body` with `tag` (its stream version, and whatever else changes the body) as `ETag`, or
/// 304 when `If-None-Match` names that tag.
pub(crate) fn versioned(
    body: impl serde::Serialize,
    tag: impl std::fmt::Display,
    headers: &HeaderMap,
) -> Response {
    let etag = etag(tag);
    if if_none_match(headers, &etag) {
        return not_modified(etag);
    }
    with_etag(Json(body).into_response(), etag)
}

fn etag(tag: impl std::fmt::Display) -> String {
    format!("\"{tag}\"")
}

/// Whether `If-None-Match` names `etag`. It compares weakly (RFC 9110 13.1.2): `W/"15"`
/// matches `"15"`.
fn if_none_match(headers: &HeaderMap, etag: &str) -> bool {
    headers
        .get(header::IF_NONE_MATCH)
        .and_then(|value| value.to_str().ok())
        .is_some_and(|value| {
            value
                .split(',')
                .map(str::trim)
                .any(|tag| tag == "*" || tag.strip_prefix("W/").unwrap_or(tag) == etag)
        })
}

fn not_modified(etag: String) -> Response {
    with_etag(StatusCode::NOT_MODIFIED.into_response(), etag)
}

fn with_etag(mut response: Response, etag: String) -> Response {
    if let Ok(value) = HeaderValue::try_from(etag) {
        response.headers_mut().insert(header::ETAG, value);
    }
    response
}

#[utoipa::path(
    get, path = "/v1/accounts", tag = "accounts",
    params(ListAccountsParams),
    responses(
        (status = 200, description = "A page of the tenant's accounts, by id", body = Page<AccountView>),
        (status = 400, description = "Invalid query", body = ProblemDocument, content_type = "application/problem+json"),
    ),
    security(("bearer" = []))
)]
async fn list_accounts(
    State(state): State<AppState>,
    Authorized { principal, .. }: Authorized<Reader>,
    Params(params): Params<ListAccountsParams>,
) -> Result<Json<Page<AccountView>>, QueryError> {
    Ok(Json(
        accounts_page(&state, &principal.tenant, &params).await?,
    ))
}

/// A page of `tenant`'s accounts, by id, filtered as `params` say.
pub(crate) async fn accounts_page(
    state: &AppState,
    tenant: &str,
    params: &ListAccountsParams,
) -> Result<Page<AccountView>, QueryError> {
    let limit = limit(params.limit, DEFAULT_LIMIT)?;
    if let Some(status) = &params.status
        && !matches!(status.as_str(), "active" | "frozen" | "closed")
    {
        return Err(QueryError::InvalidQuery(
            "status must be active, frozen or closed".into(),
        ));
    }
    let after: Option<Uuid> = decode_cursor(params.cursor.as_deref())?;
    let accounts: Vec<AccountView> = sqlx::query_as(&format!(
        "SELECT {ACCOUNT_COLUMNS} FROM accounts
          WHERE tenant = $1
            AND ($2::text IS NULL OR owner = $2)
            AND ($3::text IS NULL OR status = $3)
            AND ($4::uuid IS NULL OR id > $4)
          ORDER BY id
          LIMIT $5"
    ))
    .bind(tenant)
    .bind(&params.owner)
    .bind(&params.status)
    .bind(after)
    .bind(limit + 1)
    .fetch_all(&mut *state.scope(tenant).await?)
    .await?;
    Ok(page(accounts, limit, AccountView::key))
}

#[utoipa::path(
    get, path = "/v1/accounts/{id}/entries", tag = "accounts",
    params(("id" = Uuid, Path, description = "Account id"), ListEntriesParams),
    responses(
        (status = 200, description = "A page of the account's money movements, oldest first", body = Page<EntryView>),
        (status = 400, description = "Invalid query", body = ProblemDocument, content_type = "application/problem+json"),
        (status = 404, description = "No such account for this tenant", body = ProblemDocument, content_type = "application/problem+json"),
        (status = 503, description = "`min_version` not reached in time, or database unavailable", body = ProblemDocument, content_type = "application/problem+json"),
    ),
    security(("bearer" = []))
)]
async fn list_entries(
    State(state): State<AppState>,
    Authorized { principal, .. }: Authorized<Reader>,
    PathId { id, .. }: AccountId,
    Params(params): Params<ListEntriesParams>,
) -> Result<Json<Page<EntryView>>, QueryError> {
    Ok(Json(
        entries_page(&state, &principal.tenant, id, &params).await?,
    ))
}

/// A page of account `id`'s money movements, oldest first.
pub(crate) async fn entries_page(
    state: &AppState,
    tenant: &str,
    id: Uuid,
    params: &ListEntriesParams,
) -> Result<Page<EntryView>, QueryError> {
    let limit = limit(params.limit, DEFAULT_LIMIT)?;
    let after: Option<i64> = decode_cursor(params.cursor.as_deref())?;
    account_at(state, tenant, id, params.min_version).await?;
    let entries = entries_in(
        &mut *state.scope(tenant).await?,
        tenant,
        id,
        after,
        limit + 1,
    )
    .await?;
    Ok(page(entries, limit, EntryView::key))
}

/// Up to `limit` of account `id`'s money movements after version `after`, oldest first, as
/// `scope` (a tenant scope) sees them.
pub(crate) async fn entries_in(
    scope: &mut PgConnection,
    tenant: &str,
    id: Uuid,
    after: Option<i64>,
    limit: i64,
) -> Result<Vec<EntryView>, sqlx::Error> {
    sqlx::query_as(
        "SELECT version, kind, amount, currency, balance_after, event_id, recorded_at, transfer_id
           FROM account_entries
          WHERE account_id = $1 AND tenant = $2 AND ($3::int8 IS NULL OR version > $3)
          ORDER BY version
          LIMIT $4",
    )
    .bind(id)
    .bind(tenant)
    .bind(after)
    .bind(limit)
    .fetch_all(scope)
    .await
}

/// The first `limit` of `items` (fetched with one extra, to know whether more follow).
pub(crate) fn page<T>(mut items: Vec<T>, limit: i64, key: impl Fn(&T) -> String) -> Page<T> {
    let more = items.len() as i64 > limit;
    items.truncate(limit as usize);
    let next_cursor = more
        .then(|| items.last().map(|last| encode_cursor(&key(last))))
        .flatten();
    Page { items, next_cursor }
}

impl<T: async_graphql::OutputType> Page<T> {
    /// The page as a GraphQL (Relay) connection: each item's cursor is the one that continues
    /// after it, `key` being the same key the page was cut by.
    pub(crate) fn connection(
        self,
        after: Option<&str>,
        key: impl Fn(&T) -> String,
    ) -> async_graphql::connection::Connection<String, T> {
        let mut connection =
            async_graphql::connection::Connection::new(after.is_some(), self.next_cursor.is_some());
        connection.edges.extend(
            self.items
                .into_iter()
                .map(|item| async_graphql::connection::Edge::new(encode_cursor(&key(&item)), item)),
        );
        connection
    }
}

impl AccountView {
    /// What pages of accounts are cut by.
    pub(crate) fn key(&self) -> String {
        self.id.to_string()
    }
}

impl EntryView {
    /// What pages of entries are cut by.
    pub(crate) fn key(&self) -> String {
        self.version.to_string()
    }
}

/// Serves the Kafka contract, unauthenticated like `/openapi.json`: it describes message
/// formats, never data.
fn asyncapi(
    document: String,
) -> impl Fn() -> std::future::Ready<Response> + Clone + Send + 'static {
    let body = axum::body::Bytes::from(document);
    move || {
        std::future::ready(
            ([(header::CONTENT_TYPE, "application/json")], body.clone()).into_response(),
        )
    }
}

#[derive(OpenApi)]
#[openapi(
    info(title = "Ledger query API", description = "Read models of the ledger (accounts, their money movements, transfers) and, for auditors, the event history itself."),
    paths(
        get_account, list_accounts, list_entries,
        crate::transfers::get_transfer, crate::transfers::account_transfers,
        crate::audit::stream_events, crate::audit::account_state, crate::audit::tenant_log,
        crate::audit::verify_account,
    ),
    components(schemas(
        AccountView, EntryView, Page<AccountView>, Page<EntryView>, ProblemDocument,
        crate::transfers::TransferView, Page<crate::transfers::TransferView>,
        crate::audit::AuditEventView, crate::audit::EventPage, crate::audit::LogPage,
        crate::audit::AccountStateView, crate::audit::VerificationView, crate::audit::BreakView,
    )),
    modifiers(&BearerAuth, &PROBLEMS),
)]
pub(crate) struct ApiDoc;

/// 401, 403, 429 and 503 on every operation (all take a token).
const PROBLEMS: StandardProblems = StandardProblems {
    roles: &[
        ("accounts", Reader::ROLES),
        ("transfers", Reader::ROLES),
        ("audit", crate::audit::Auditor::ROLES),
    ],
};
