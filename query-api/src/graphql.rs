//! `/graphql`: the same reads as the REST routes, as GraphQL queries, and live subscriptions
//! over WebSocket (`graphql-transport-ws`, at `/graphql/ws`).
//!
//! Every resolver calls the function its REST route calls, inside the same tenant scope and
//! row-level security, after the same role check; errors are the REST problems, their slug in
//! `extensions.code`. Subscriptions are fed by the projector's notifications (see
//! `service_kit::db::channels`): one listener per process fans them out to every
//! subscriber, who then reads the committed row itself through its own tenant scope.
//!
//! GraphiQL is served whole from here, not from a CDN (async-graphql's `GraphiQLSource` page
//! loads it from unpkg): the page then works where the query API has no way out to the
//! internet, it runs the build that `graphiql/package-lock.json` pins rather than whatever
//! the CDN serves that day, and it can be held to a same-origin Content-Security-Policy.
//! `graphiql/assets/` is that build (`npm ci && npm run vendor` there refreshes it), committed
//! so that building the query API needs no npm.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::{Duration, SystemTime};

use async_graphql::connection::Connection;
use async_graphql::http::{WebSocketProtocols, WsMessage};
use async_graphql::{
    ComplexObject, Context, Data, EmptyMutation, Object, Schema, SimpleObject, Subscription,
};
use async_graphql_axum::{GraphQLRequest, GraphQLResponse};
use axum::Router;
use axum::extract::ws::{CloseFrame, Message, WebSocket, WebSocketUpgrade};
use axum::extract::{FromRef, Path, State};
use axum::http::{HeaderMap, HeaderValue, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use chrono::{DateTime, Utc};
use futures::{SinkExt, Stream, StreamExt};
use service_kit::auth::{AuthError, Authenticator, Principal, RequiredRoles, bearer_token};
use service_kit::db::channels::{ReadModel, ReadModelChange};
use tokio::sync::{OnceCell, OwnedSemaphorePermit, Semaphore, broadcast, mpsc, watch};
use uuid::Uuid;

use crate::AppState;
use crate::api::{AccountView, EntryView, ListAccountsParams, ListEntriesParams, Reader};
use crate::audit::{
    AccountStateView, Auditor, EventPage, LogPage, LogParams, StateParams, StreamEventsParams,
    VerificationView,
};
use crate::config::GraphqlConfig;
use crate::error::QueryError;
use crate::transfers::{AccountTransfersParams, TransferView};

/// What a resolver answers: `?` on a [`QueryError`] goes through [`GraphqlError`], so the error
/// keeps its problem code (async-graphql's own conversion of any displayable error would not).
type Answer<T> = Result<T, GraphqlError>;

/// A [`QueryError`] as a GraphQL error. Deliberately not `Display`: that keeps it out of
/// async-graphql's catch-all conversion.
#[derive(Clone)]
pub(crate) struct GraphqlError(async_graphql::Error);

impl From<QueryError> for GraphqlError {
    fn from(err: QueryError) -> Self {
        Self(err.into_graphql())
    }
}

impl From<GraphqlError> for async_graphql::Error {
    fn from(GraphqlError(err): GraphqlError) -> Self {
        err
    }
}

/// The schema `/graphql` serves.
pub(crate) type LedgerSchema = Schema<QueryRoot, EmptyMutation, SubscriptionRoot>;

/// WebSocket close codes beyond the protocol's own.
mod close {
    /// The token in `connection_init` is missing, invalid or expired, or expired since.
    pub(super) const UNAUTHORIZED: u16 = 4401;
    /// The tenant holds as many connections as it may.
    pub(super) const TOO_MANY_CONNECTIONS: u16 = 4429;
    /// A subscriber fell further behind the changes than its buffer holds.
    pub(super) const TOO_SLOW: u16 = 4008;
}

/// How long one message may wait for the client to take it before the connection is dropped:
/// a client that stops reading must not hold its connection's resources forever.
const SEND_TIMEOUT: Duration = Duration::from_secs(10);
/// Entries read per page while catching a subscriber up.
const CATCH_UP_PAGE: i64 = 500;

/// The schema with its limits and data; `state` is what every resolver reads through.
fn schema(state: AppState, config: &GraphqlConfig) -> LedgerSchema {
    let builder = Schema::build(QueryRoot, EmptyMutation, SubscriptionRoot)
        .data(state)
        .limit_depth(config.max_depth)
        .limit_complexity(config.max_complexity);
    if config.introspection {
        builder.finish()
    } else {
        builder.disable_introspection().finish()
    }
}

/// The schema's SDL: the contract checked in under `contracts/`.
#[cfg(test)]
pub(crate) fn sdl() -> String {
    Schema::build(QueryRoot, EmptyMutation, SubscriptionRoot)
        .finish()
        .sdl()
}

/// What the GraphQL routes share.
#[derive(Clone)]
struct GraphqlState {
    schema: LedgerSchema,
    app: AppState,
}

impl FromRef<GraphqlState> for Arc<Authenticator> {
    fn from_ref(state: &GraphqlState) -> Self {
        state.app.auth.clone()
    }
}

/// `POST /graphql`, `GET /graphql/ws`, and unless turned off GraphiQL: `GET /graphql` and
/// `GET /graphql/assets/{file}`.
pub(crate) fn router(app: AppState) -> Router {
    let config = app.graphql.clone();
    let state = GraphqlState {
        schema: schema(app.clone(), &config),
        app,
    };
    let router = Router::new().route("/graphql/ws", get(subscribe));
    let router = if config.graphiql {
        router
            .route("/graphql", post(execute).get(graphiql))
            .route("/graphql/assets/{file}", get(graphiql_asset))
    } else {
        router.route("/graphql", post(execute))
    };
    router.with_state(state)
}

/// Everything GraphiQL's page loads comes from its own origin; it connects only there too.
const GRAPHIQL_POLICY: &str = "default-src 'none'; script-src 'self'; \
    style-src 'self' 'unsafe-inline'; img-src 'self' data:; font-src 'self' data:; \
    connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'";

/// GraphiQL's files: name, content type, content.
const GRAPHIQL_ASSETS: &[(&str, &str, &[u8])] = &[
    (
        "graphiql.min.css",
        "text/css; charset=utf-8",
        include_bytes!("../graphiql/assets/graphiql.min.css"),
    ),
    (
        "graphiql.min.js",
        "text/javascript; charset=utf-8",
        include_bytes!("../graphiql/assets/graphiql.min.js"),
    ),
    (
        "graphql-ws.min.js",
        "text/javascript; charset=utf-8",
        include_bytes!("../graphiql/assets/graphql-ws.min.js"),
    ),
    (
        "react.production.min.js",
        "text/javascript; charset=utf-8",
        include_bytes!("../graphiql/assets/react.production.min.js"),
    ),
    (
        "react-dom.production.min.js",
        "text/javascript; charset=utf-8",
        include_bytes!("../graphiql/assets/react-dom.production.min.js"),
    ),
    (
        "ledger-graphiql.js",
        "text/javascript; charset=utf-8",
        include_bytes!("../graphiql/ledger-graphiql.js"),
    ),
];

async fn graphiql() -> Response {
    (
        [
            (header::CONTENT_TYPE, "text/html; charset=utf-8"),
            (header::CONTENT_SECURITY_POLICY, GRAPHIQL_POLICY),
        ],
        include_str!("../graphiql/index.html"),
    )
        .into_response()
}

async fn graphiql_asset(Path(file): Path<String>) -> Response {
    let Some((_, content_type, content)) =
        GRAPHIQL_ASSETS.iter().find(|(name, _, _)| *name == file)
    else {
        return service_kit::http::no_such_route().await.into_response();
    };
    (
        [
            (header::CONTENT_TYPE, HeaderValue::from_static(content_type)),
            (
                header::CACHE_CONTROL,
                HeaderValue::from_static("public, max-age=3600"),
            ),
        ],
        *content,
    )
        .into_response()
}

/// Who asks: the principal of the request's bearer token, or why there is none. Checked by
/// each field, so that a document without a token fails the way REST does, field by field.
struct Caller(Result<Principal, AuthError>);

async fn execute(
    State(state): State<GraphqlState>,
    caller: Result<Principal, AuthError>,
    request: GraphQLRequest,
) -> GraphQLResponse {
    state
        .schema
        .execute(request.into_inner().data(Caller(caller)))
        .await
        .into()
}

/// The caller, if it holds one of `R`'s roles.
fn caller<'a, R: RequiredRoles>(ctx: &Context<'a>) -> Result<&'a Principal, QueryError> {
    let Caller(caller) = ctx
        .data::<Caller>()
        .map_err(|_| QueryError::Auth(AuthError::MissingToken))?;
    let principal = caller
        .as_ref()
        .map_err(|err| QueryError::Auth(err.clone()))?;
    principal.require_any(R::ROLES)?;
    Ok(principal)
}

fn app<'a>(ctx: &Context<'a>) -> &'a AppState {
    ctx.data_unchecked::<AppState>()
}

/// The cost of a page of `first` items whose fields cost `child` each.
fn page_cost(first: Option<i64>, default: i64, child: usize) -> usize {
    usize::try_from(first.unwrap_or(default))
        .unwrap_or(1)
        .max(1)
        .saturating_mul(child)
}

pub(crate) struct QueryRoot;

#[Object(name = "Query")]
impl QueryRoot {
    /// Account `id`; with `minVersion`, once its view reached that version (a bounded wait,
    /// then `not-yet-visible`). Roles `viewer` or `teller`.
    async fn account(
        &self,
        ctx: &Context<'_>,
        id: Uuid,
        #[graphql(validator(minimum = 1))] min_version: Option<i64>,
    ) -> Answer<AccountView> {
        let principal = caller::<Reader>(ctx)?;
        Ok(crate::api::account_at(app(ctx), &principal.tenant, id, min_version).await?)
    }

    /// The tenant's accounts by id, optionally only one owner's or one status's. Roles
    /// `viewer` or `teller`.
    #[graphql(complexity = "page_cost(first, 50, child_complexity)")]
    async fn accounts(
        &self,
        ctx: &Context<'_>,
        owner: Option<String>,
        #[graphql(desc = "`active`, `frozen` or `closed`")] status: Option<String>,
        #[graphql(desc = "1 to 500, default 50")] first: Option<i64>,
        after: Option<String>,
    ) -> Answer<Connection<String, AccountView>> {
        let principal = caller::<Reader>(ctx)?;
        let params = ListAccountsParams {
            owner,
            status,
            limit: first,
            cursor: after,
        };
        let page = crate::api::accounts_page(app(ctx), &principal.tenant, &params).await?;
        Ok(page.connection(params.cursor.as_deref(), AccountView::key))
    }

    /// Transfer `id`, as far as it got. Roles `viewer` or `teller`.
    async fn transfer(&self, ctx: &Context<'_>, id: Uuid) -> Answer<TransferView> {
        let principal = caller::<Reader>(ctx)?;
        Ok(
            crate::transfers::find_transfer(app(ctx), &principal.tenant, id)
                .await?
                .ok_or(QueryError::TransferNotFound)?,
        )
    }

    /// Account `id`'s stored events in version order, with metadata and hashes. Role
    /// `auditor`.
    async fn audit_events(
        &self,
        ctx: &Context<'_>,
        account_id: Uuid,
        from_version: Option<i64>,
        #[graphql(desc = "1 to 500, default 100")] first: Option<i64>,
    ) -> Answer<EventPage> {
        let principal = caller::<Auditor>(ctx)?;
        let params = StreamEventsParams {
            from_version,
            limit: first,
        };
        Ok(crate::audit::events_page(app(ctx), &principal.tenant, account_id, &params).await?)
    }

    /// Account `id` folded from its events up to `version` or `at` (at most one; neither
    /// means the latest). Role `auditor`.
    async fn audit_state(
        &self,
        ctx: &Context<'_>,
        account_id: Uuid,
        version: Option<i64>,
        at: Option<DateTime<Utc>>,
    ) -> Answer<AccountStateView> {
        let principal = caller::<Auditor>(ctx)?;
        let params = StateParams { at, version };
        Ok(crate::audit::state_as_of(app(ctx), &principal.tenant, account_id, &params).await?)
    }

    /// Account `id`'s hash chain recomputed from the stored rows. Role `auditor`.
    async fn audit_verify(&self, ctx: &Context<'_>, account_id: Uuid) -> Answer<VerificationView> {
        let principal = caller::<Auditor>(ctx)?;
        Ok(crate::audit::verification(app(ctx), &principal.tenant, account_id).await?)
    }

    /// The tenant's events in commit order, after `after` (a `nextAfter` of an earlier
    /// page). Role `auditor`.
    async fn audit_log(
        &self,
        ctx: &Context<'_>,
        after: Option<String>,
        #[graphql(desc = "1 to 500, default 100")] first: Option<i64>,
    ) -> Answer<LogPage> {
        let principal = caller::<Auditor>(ctx)?;
        let params = LogParams {
            after,
            limit: first,
        };
        Ok(crate::audit::log_page(app(ctx), &principal.tenant, &params).await?)
    }
}

#[ComplexObject]
impl AccountView {
    /// The account's money movements, oldest first.
    #[graphql(complexity = "page_cost(first, 50, child_complexity)")]
    async fn entries(
        &self,
        ctx: &Context<'_>,
        #[graphql(desc = "1 to 500, default 50")] first: Option<i64>,
        after: Option<String>,
    ) -> Answer<Connection<String, EntryView>> {
        let principal = caller::<Reader>(ctx)?;
        let params = ListEntriesParams {
            limit: first,
            cursor: after,
            min_version: None,
        };
        let page = crate::api::entries_page(app(ctx), &principal.tenant, self.id, &params).await?;
        Ok(page.connection(params.cursor.as_deref(), EntryView::key))
    }

    /// The transfers from or to the account, by id.
    #[graphql(complexity = "page_cost(first, 50, child_complexity)")]
    async fn transfers(
        &self,
        ctx: &Context<'_>,
        #[graphql(desc = "1 to 500, default 50")] first: Option<i64>,
        after: Option<String>,
    ) -> Answer<Connection<String, TransferView>> {
        let principal = caller::<Reader>(ctx)?;
        let params = AccountTransfersParams {
            limit: first,
            cursor: after,
        };
        let page =
            crate::transfers::transfers_page(app(ctx), &principal.tenant, self.id, &params).await?;
        Ok(page.connection(params.cursor.as_deref(), TransferView::key))
    }
}

/// A committed change of an account: its version, its state then, and the money movements
/// since the change delivered before it (or since `afterVersion`), so that a subscriber who
/// reconnects with the last version it saw misses nothing.
#[derive(SimpleObject)]
struct AccountChange {
    version: i64,
    account: AccountView,
    entries: Vec<EntryView>,
}

pub(crate) struct SubscriptionRoot;

#[Subscription(name = "Subscription")]
impl SubscriptionRoot {
    /// Account `id`'s committed changes in version order: first one with everything after
    /// `afterVersion`, if the account is past it, then each change as the projector commits
    /// it. Roles `viewer` or `teller`.
    async fn account_changed(
        &self,
        ctx: &Context<'_>,
        id: Uuid,
        #[graphql(validator(minimum = 0), default = 0)] after_version: i64,
    ) -> Result<impl Stream<Item = Answer<AccountChange>> + use<>, GraphqlError> {
        let mut feed = Feed::open(ctx, Some((ReadModel::Account, id)))?;
        let state = app(ctx).clone();
        // Just opened and not projected yet is no reason to refuse; no such account is.
        crate::api::account_at(&state, &feed.tenant, id, Some(1)).await?;
        Ok(async_stream::stream! {
            let mut delivered = after_version;
            let mut published: Option<Arc<Published>> = None;
            loop {
                let change = match &published {
                    Some(published) => published.account_change(&state, id, delivered).await,
                    None => account_change(&state, &feed.tenant, id, delivered).await,
                };
                match change {
                    Ok(Some(change)) => {
                        delivered = change.version;
                        yield Ok(change);
                    }
                    Ok(None) => {}
                    Err(err) => {
                        yield Err(GraphqlError::from(err));
                        break;
                    }
                }
                let wanted = |change: &ReadModelChange| {
                    change.model == ReadModel::Account && change.id == id && change.version > delivered
                };
                published = feed.next(wanted).await;
                if published.is_none() {
                    break;
                }
            }
        })
    }

    /// Every committed change of the caller's tenant's accounts, as the account is then.
    /// Roles `viewer` or `teller`.
    async fn accounts_changed(
        &self,
        ctx: &Context<'_>,
    ) -> Result<impl Stream<Item = Answer<AccountView>> + use<>, GraphqlError> {
        let mut feed = Feed::open(ctx, None)?;
        let state = app(ctx).clone();
        Ok(async_stream::stream! {
            while let Some(published) = feed.next(|change| change.model == ReadModel::Account).await {
                match crate::api::find_account(&state, &feed.tenant, published.change.id).await {
                    Ok(Some(account)) => yield Ok(account),
                    Ok(None) => {}
                    Err(err) => {
                        yield Err(GraphqlError::from(err));
                        break;
                    }
                }
            }
        })
    }

    /// Transfer `id` as it is now (once it is projected) and after each committed change,
    /// until it is final (`completed`, `rejected` or `failed`). Roles `viewer` or `teller`.
    async fn transfer_changed(
        &self,
        ctx: &Context<'_>,
        id: Uuid,
    ) -> Result<impl Stream<Item = Answer<TransferView>> + use<>, GraphqlError> {
        let mut feed = Feed::open(ctx, Some((ReadModel::Transfer, id)))?;
        let state = app(ctx).clone();
        Ok(async_stream::stream! {
            let mut delivered = 0;
            let mut published: Option<Arc<Published>> = None;
            loop {
                let transfer = match &published {
                    Some(published) => published.transfer(&state, id).await,
                    None => crate::transfers::find_transfer(&state, &feed.tenant, id).await,
                };
                match transfer {
                    Ok(Some(transfer)) if transfer.version > delivered => {
                        delivered = transfer.version;
                        let done = transfer.is_final();
                        yield Ok(transfer);
                        if done {
                            break;
                        }
                    }
                    Ok(_) => {}
                    Err(err) => {
                        yield Err(GraphqlError::from(err));
                        break;
                    }
                }
                let wanted = |change: &ReadModelChange| {
                    change.model == ReadModel::Transfer && change.id == id && change.version > delivered
                };
                published = feed.next(wanted).await;
                if published.is_none() {
                    break;
                }
            }
        })
    }
}

/// The change of account `id` after version `after`, if its view is past it: the row, then its
/// entries, in one transaction.
async fn account_change(
    state: &AppState,
    tenant: &str,
    id: Uuid,
    after: i64,
) -> Result<Option<AccountChange>, QueryError> {
    let mut scope = state.scope(tenant).await?;
    let Some(account) = crate::api::account_in(&mut scope, tenant, id).await? else {
        return Ok(None);
    };
    if account.version <= after {
        return Ok(None);
    }
    // Entries are committed with the account row that counts them, so every entry up to the
    // row's version is there; later ones belong to the next change.
    let mut entries = Vec::new();
    let mut last = after;
    loop {
        let page =
            crate::api::entries_in(&mut scope, tenant, id, Some(last), CATCH_UP_PAGE).await?;
        let full = page.len() as i64 == CATCH_UP_PAGE;
        entries.extend(
            page.into_iter()
                .filter(|entry| entry.version <= account.version),
        );
        match entries.last() {
            Some(entry) if full && entry.version < account.version => last = entry.version,
            _ => break,
        }
    }
    Ok(Some(AccountChange {
        version: account.version,
        account,
        entries,
    }))
}

/// The projector's committed changes, fanned out to the subscriptions. A subscription to one
/// row (`accountChanged`, `transferChanged`) is told only of that row's latest change: it reads
/// the row from where it was (with the row's other subscribers, see [`Published`]), so
/// intermediate changes are nothing to it, and a thousand
/// subscribers spread over a hundred accounts take ten wake-ups per change, not a thousand. A
/// subscription to every row (`accountsChanged`) gets each change through a bounded broadcast
/// and is dropped when it falls `GRAPHQL_SUBSCRIBER_BUFFER` changes behind.
pub(crate) struct Changes {
    every: broadcast::Sender<Arc<Published>>,
    /// The latest change of each row someone subscribed to, gone with its last subscriber.
    rows: Mutex<HashMap<Row, watch::Sender<Option<Arc<Published>>>>>,
}

/// A row of a read model.
pub(crate) type Row = (ReadModel, Uuid);

impl Changes {
    pub(crate) fn new(buffer: usize) -> Self {
        Self {
            every: broadcast::channel(buffer.max(1)).0,
            rows: Mutex::default(),
        }
    }

    /// Hands a committed change to its subscribers; nobody waits for them.
    pub(crate) fn publish(&self, change: ReadModelChange) {
        let published = Arc::new(Published::new(change));
        // No subscriber is no error.
        let _ = self.every.send(published.clone());
        if let Some(row) = self
            .rows()
            .get(&(published.change.model, published.change.id))
        {
            row.send_replace(Some(published));
        }
    }

    fn rows(&self) -> MutexGuard<'_, HashMap<Row, watch::Sender<Option<Arc<Published>>>>> {
        self.rows
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// The changes of `row`, or of every row.
    pub(crate) fn subscribe(self: &Arc<Self>, row: Option<Row>) -> Receiving {
        match row {
            Some(row) => Receiving::Row {
                latest: self
                    .rows()
                    .entry(row)
                    .or_insert_with(|| watch::Sender::new(None))
                    .subscribe(),
                _release: RowRelease {
                    changes: self.clone(),
                    row,
                },
            },
            None => Receiving::Every(self.every.subscribe()),
        }
    }
}

/// A committed change as its subscribers get it. The row's subscribers usually all stand at
/// the version before it and want the same answer, so the row is read once, by the first of
/// them to wake, and the others share that read: ten subscribers of an account cost one read
/// per change, not ten.
pub(crate) struct Published {
    change: ReadModelChange,
    account: OnceCell<SharedAccountChange>,
    transfer: OnceCell<Option<TransferView>>,
}

/// An account change read for every subscriber of the account that had delivered `after`.
struct SharedAccountChange {
    after: i64,
    change: Option<AccountChange>,
}

impl Published {
    fn new(change: ReadModelChange) -> Self {
        Self {
            change,
            account: OnceCell::new(),
            transfer: OnceCell::new(),
        }
    }

    /// What [`account_change`] would answer for account `id` after version `delivered`. The
    /// read is in the change's tenant, which is the subscriber's: [`Feed::next`] hands a
    /// subscriber its own tenant's changes only.
    async fn account_change(
        &self,
        state: &AppState,
        id: Uuid,
        delivered: i64,
    ) -> Result<Option<AccountChange>, QueryError> {
        let tenant = &self.change.tenant;
        let shared = self
            .account
            .get_or_try_init(|| async {
                Ok::<_, QueryError>(SharedAccountChange {
                    after: delivered,
                    change: account_change(state, tenant, id, delivered).await?,
                })
            })
            .await?;
        if shared.after > delivered {
            // Behind the subscriber that read: the shared read left out entries it needs.
            return account_change(state, tenant, id, delivered).await;
        }
        Ok(shared
            .change
            .as_ref()
            .filter(|change| change.version > delivered)
            .map(|change| AccountChange {
                version: change.version,
                account: change.account.clone(),
                entries: change
                    .entries
                    .iter()
                    .filter(|entry| entry.version > delivered)
                    .cloned()
                    .collect(),
            }))
    }

    /// Transfer `id` as it is since this change, read once for all its subscribers.
    async fn transfer(
        &self,
        state: &AppState,
        id: Uuid,
    ) -> Result<Option<TransferView>, QueryError> {
        let transfer = self
            .transfer
            .get_or_try_init(|| crate::transfers::find_transfer(state, &self.change.tenant, id))
            .await?;
        Ok(transfer.clone())
    }
}

/// One subscriber's end of [`Changes`].
pub(crate) enum Receiving {
    Every(broadcast::Receiver<Arc<Published>>),
    Row {
        latest: watch::Receiver<Option<Arc<Published>>>,
        /// Declared after `latest`, so dropped after it: it counts the row's other subscribers.
        _release: RowRelease,
    },
}

impl Receiving {
    async fn recv(&mut self) -> Result<Arc<Published>, broadcast::error::RecvError> {
        match self {
            Self::Every(changes) => changes.recv().await,
            Self::Row { latest, .. } => loop {
                latest
                    .changed()
                    .await
                    .map_err(|_| broadcast::error::RecvError::Closed)?;
                if let Some(published) = latest.borrow_and_update().clone() {
                    return Ok(published);
                }
            },
        }
    }

    /// Resolves at the first change at `version` or later: never, once the process stops.
    pub(crate) async fn reached(&mut self, version: i64) {
        loop {
            match self.recv().await {
                Ok(published) if published.change.version >= version => return,
                Ok(_) | Err(broadcast::error::RecvError::Lagged(_)) => {}
                Err(broadcast::error::RecvError::Closed) => std::future::pending().await,
            }
        }
    }
}

/// Removes a row's entry of [`Changes`] with its last subscriber, so the entries follow the
/// subscriptions, not every id ever asked for.
pub(crate) struct RowRelease {
    changes: Arc<Changes>,
    row: Row,
}

impl Drop for RowRelease {
    fn drop(&mut self) {
        let mut rows = self.changes.rows();
        if rows
            .get(&self.row)
            .is_some_and(|latest| latest.receiver_count() == 0)
        {
            rows.remove(&self.row);
        }
    }
}

/// One subscription's view of the committed changes: of its row (or of every row), its
/// tenant's only, within the connection's limit of subscriptions.
struct Feed {
    tenant: String,
    changes: Receiving,
    connection: Arc<Socket>,
    /// Held while the subscription lives: one of the connection's subscriptions.
    _slot: OwnedSemaphorePermit,
}

impl Feed {
    /// Subscribed before anything is read, so that no change committed meanwhile is missed.
    fn open(ctx: &Context<'_>, row: Option<Row>) -> Result<Self, QueryError> {
        let principal = caller::<Reader>(ctx)?;
        let connection = ctx
            .data::<Arc<Socket>>()
            .map_err(|_| {
                QueryError::InvalidQuery("subscriptions are served at /graphql/ws".into())
            })?
            .clone();
        let slot = connection
            .subscriptions
            .clone()
            .try_acquire_owned()
            .map_err(|_| QueryError::TooManySubscriptions {
                limit: connection.subscription_limit,
            })?;
        Ok(Self {
            tenant: principal.tenant.clone(),
            changes: app(ctx).changes.subscribe(row),
            connection,
            _slot: slot,
        })
    }

    /// The next change of this tenant that `wanted` accepts; `None` once the process stops.
    /// A subscriber that fell too far behind gets none: its connection is closed (4008).
    async fn next(&mut self, wanted: impl Fn(&ReadModelChange) -> bool) -> Option<Arc<Published>> {
        loop {
            match self.changes.recv().await {
                Ok(published)
                    if published.change.tenant == self.tenant && wanted(&published.change) =>
                {
                    return Some(published);
                }
                Ok(_) => {}
                Err(broadcast::error::RecvError::Lagged(missed)) => {
                    tracing::warn!(missed, tenant = %self.tenant, "dropping a subscriber that fell behind");
                    self.connection.close(
                        close::TOO_SLOW,
                        "subscriber too slow: it fell behind the changes",
                    );
                    // Ending the stream would tell the client the subscription is complete;
                    // it is not, the connection is closing, and its end drops this stream.
                    return std::future::pending().await;
                }
                Err(broadcast::error::RecvError::Closed) => return None,
            }
        }
    }
}

/// One WebSocket connection, as its subscriptions see it.
struct Socket {
    subscriptions: Arc<Semaphore>,
    subscription_limit: usize,
    /// Asks the connection to close with a code and reason.
    closing: mpsc::Sender<(u16, &'static str)>,
    /// Set once `connection_init` is accepted: when its token expires.
    expires: watch::Sender<Option<SystemTime>>,
    /// Why `connection_init` was refused, for the close frame.
    refused: OnceLock<(u16, &'static str)>,
}

impl Socket {
    fn close(&self, code: u16, reason: &'static str) {
        // One close is enough: a full queue already holds one.
        let _ = self.closing.try_send((code, reason));
    }
}

/// The WebSocket connections each tenant holds; only tenants holding one have an entry.
#[derive(Default)]
pub(crate) struct TenantConnections(Mutex<HashMap<String, usize>>);

/// One of a tenant's connections, given back when dropped.
struct TenantSlot {
    tenants: Arc<TenantConnections>,
    tenant: String,
}

impl TenantConnections {
    fn take(self: &Arc<Self>, tenant: &str, limit: usize) -> Option<TenantSlot> {
        let mut held = self
            .0
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let count = held.entry(tenant.to_owned()).or_default();
        if *count >= limit {
            return None;
        }
        *count += 1;
        Some(TenantSlot {
            tenants: self.clone(),
            tenant: tenant.to_owned(),
        })
    }
}

impl Drop for TenantSlot {
    fn drop(&mut self) {
        let mut held = self
            .tenants
            .0
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if let Some(count) = held.get_mut(&self.tenant) {
            *count -= 1;
            if *count == 0 {
                held.remove(&self.tenant);
            }
        }
    }
}

/// The one WebSocket subprotocol served.
const PROTOCOL: &str = "graphql-transport-ws";

async fn subscribe(
    State(state): State<GraphqlState>,
    headers: HeaderMap,
    upgrade: WebSocketUpgrade,
) -> Response {
    let offered = headers
        .get(header::SEC_WEBSOCKET_PROTOCOL)
        .and_then(|value| value.to_str().ok())
        .is_some_and(|protocols| protocols.split(',').any(|p| p.trim() == PROTOCOL));
    if !offered {
        return QueryError::InvalidQuery(format!("subscriptions need the {PROTOCOL} subprotocol"))
            .into_response();
    }
    upgrade
        .protocols([PROTOCOL])
        .on_upgrade(move |socket| serve_socket(socket, state))
        .into_response()
}

/// The token of a `connection_init` payload: `{"Authorization": "Bearer <token>"}` or
/// `{"token": "<token>"}`.
fn init_token(payload: &serde_json::Value) -> Option<&str> {
    ["Authorization", "authorization"]
        .iter()
        .find_map(|name| payload.get(name)?.as_str())
        .and_then(bearer_token)
        .or_else(|| payload.get("token")?.as_str())
}

/// Accepts `connection_init`: a valid token within its tenant's budgets; the connection ends
/// when the token expires.
async fn admit(
    app: &AppState,
    connection: &Arc<Socket>,
    payload: &serde_json::Value,
) -> async_graphql::Result<Data> {
    // The close frame says why; the protocol's own refusal is replaced by it.
    let refuse = |code: u16, reason: &'static str| {
        let _ = connection.refused.set((code, reason));
        Err(async_graphql::Error::new(reason))
    };
    let Some(token) = init_token(payload) else {
        return refuse(close::UNAUTHORIZED, "missing token");
    };
    let (principal, expires) = match app.auth.verify_until(token).await {
        Ok(verified) => verified,
        Err(AuthError::ExpiredToken) => return refuse(close::UNAUTHORIZED, "token expired"),
        Err(_) => return refuse(close::UNAUTHORIZED, "invalid token"),
    };
    if app.auth.admit(&principal).is_err() {
        return refuse(
            close::TOO_MANY_CONNECTIONS,
            "the tenant's request budget is spent",
        );
    }
    let Some(slot) = app
        .tenant_connections
        .take(&principal.tenant, app.graphql.connections_per_tenant)
    else {
        return refuse(
            close::TOO_MANY_CONNECTIONS,
            "too many connections for this tenant",
        );
    };
    connection.expires.send_replace(Some(expires));
    let mut data = Data::default();
    data.insert(Caller(Ok(principal)));
    data.insert(slot);
    data.insert(connection.clone());
    Ok(data)
}

/// Runs one connection: async-graphql speaks the protocol; this loop adds the close frames
/// it does not know (expired token, slow subscriber, refusals with their own codes).
async fn serve_socket(socket: WebSocket, state: GraphqlState) {
    let (closing, mut close_requests) = mpsc::channel(1);
    let connection = Arc::new(Socket {
        subscriptions: Arc::new(Semaphore::new(
            state.app.graphql.subscriptions_per_connection,
        )),
        subscription_limit: state.app.graphql.subscriptions_per_connection,
        closing,
        expires: watch::Sender::new(None),
        refused: OnceLock::new(),
    });
    let mut expires = connection.expires.subscribe();
    let (mut sink, stream) = socket.split();
    let input = stream
        .take_while(|message| futures::future::ready(message.is_ok()))
        .filter_map(|message| {
            futures::future::ready(match message {
                Ok(message @ (Message::Text(_) | Message::Binary(_))) => Some(message.into_data()),
                _ => None,
            })
        });
    let init_connection = connection.clone();
    let app = state.app.clone();
    let messages = async_graphql::http::WebSocket::new(
        state.schema.clone(),
        input,
        WebSocketProtocols::GraphQLWS,
    )
    .on_connection_init(
        move |payload| async move { admit(&app, &init_connection, &payload).await },
    );
    futures::pin_mut!(messages);
    loop {
        let expiry = *expires.borrow_and_update();
        let expired = async {
            match expiry {
                Some(at) => {
                    let left = at.duration_since(SystemTime::now()).unwrap_or_default();
                    tokio::time::sleep(left).await;
                }
                None => std::future::pending().await,
            }
        };
        let outgoing = tokio::select! {
            message = messages.next() => match message {
                Some(WsMessage::Text(text)) => Message::Text(text.into()),
                Some(WsMessage::Close(code, reason)) => {
                    let (code, reason) = connection
                        .refused
                        .get()
                        .map_or((code, reason), |(code, reason)| (*code, (*reason).to_owned()));
                    closing_frame(code, &reason)
                }
                None => break,
            },
            Some((code, reason)) = close_requests.recv() => closing_frame(code, reason),
            () = expired => closing_frame(close::UNAUTHORIZED, "token expired"),
            Ok(()) = expires.changed() => continue,
        };
        let last = matches!(outgoing, Message::Close(_));
        match tokio::time::timeout(SEND_TIMEOUT, sink.send(outgoing)).await {
            Ok(Ok(())) if !last => {}
            _ => break,
        }
    }
}

/// A close frame; the reason cut to the 123 bytes a frame can carry.
fn closing_frame(code: u16, reason: &str) -> Message {
    let mut end = reason.len().min(123);
    while !reason.is_char_boundary(end) {
        end -= 1;
    }
    Message::Close(Some(CloseFrame {
        code,
        reason: reason[..end].into(),
    }))
}

#[cfg(test)]
mod tests {
    use service_kit::testing::{self, TestDatabase};

    use super::*;

    fn change(id: u128, version: i64) -> ReadModelChange {
        ReadModelChange {
            model: ReadModel::Account,
            tenant: "acme".into(),
            id: Uuid::from_u128(id),
            version,
        }
    }

    async fn next(receiving: &mut Receiving) -> ReadModelChange {
        tokio::time::timeout(Duration::from_secs(1), receiving.recv())
            .await
            .expect("a change within a second")
            .expect("the channel is open")
            .change
            .clone()
    }

    #[tokio::test]
    async fn a_row_subscriber_is_told_its_rows_latest_change_and_the_row_goes_with_its_last_subscriber()
     {
        let changes = Arc::new(Changes::new(8));
        let row = (ReadModel::Account, Uuid::from_u128(1));
        let mut first = changes.subscribe(Some(row));
        let second = changes.subscribe(Some(row));
        let mut every = changes.subscribe(None);
        changes.publish(change(2, 7));
        changes.publish(change(1, 2));
        changes.publish(change(1, 3));
        let latest = next(&mut first).await;
        assert_eq!((latest.id, latest.version), (row.1, 3));
        assert_eq!(next(&mut every).await.id, Uuid::from_u128(2));
        assert_eq!(next(&mut every).await.version, 2);
        drop(second);
        assert_eq!(changes.rows().len(), 1, "a subscriber is left");
        drop(first);
        assert!(changes.rows().is_empty(), "nobody watches the row any more");
    }

    /// A query API's state on `database`, for calling the resolvers' helpers directly.
    fn state(database: &TestDatabase) -> AppState {
        AppState {
            pool: database.pool.clone(),
            account_reads: crate::api::account_reads(database.pool.clone(), 1),
            auth: Arc::new(Authenticator::new(&testing::auth()).unwrap()),
            max_wait: Duration::from_secs(1),
            transfer_stalled_after: Duration::from_secs(120),
            _listening: watch::channel(()).1,
            changes: Arc::new(Changes::new(8)),
            known: Arc::new(crate::versions::KnownVersions::new(
                crate::versions::CAPACITY,
                crate::versions::FRESH_FOR,
            )),
            graphql: GraphqlConfig::default(),
            tenant_connections: Arc::default(),
        }
    }

    /// Commits account `id` at `version` with an entry for each version after the first, as
    /// the projector would (without its notification: the test publishes by hand).
    async fn project(database: &TestDatabase, id: Uuid, version: i64) {
        sqlx::query(
            "INSERT INTO accounts VALUES ($1, 'acme', 'Ada', 'EUR', 0, $2 * 10, 'active', $2, now(), now())
             ON CONFLICT (id) DO UPDATE SET version = $2, balance = $2 * 10",
        )
        .bind(id)
        .bind(version)
        .execute(&database.pool)
        .await
        .unwrap();
        sqlx::query(
            "INSERT INTO account_entries (account_id, version, tenant, kind, amount, currency,
                                          balance_after, event_id, recorded_at)
             SELECT $1, v, 'acme', 'deposit', 10, 'EUR', v * 10, gen_random_uuid(), now()
             FROM generate_series(2, $2) AS v ON CONFLICT DO NOTHING",
        )
        .bind(id)
        .bind(version)
        .execute(&database.pool)
        .await
        .unwrap();
    }

    fn entry_versions(change: &AccountChange) -> Vec<i64> {
        change.entries.iter().map(|entry| entry.version).collect()
    }

    #[tokio::test]
    async fn an_accounts_subscribers_share_the_read_of_a_change_unless_they_are_behind_it() {
        let database = TestDatabase::create().await;
        let state = state(&database);
        let id = Uuid::from_u128(1);
        project(&database, id, 4).await;
        let published = Published::new(change(1, 4));

        let read = |delivered| published.account_change(&state, id, delivered);
        let first = read(3).await.unwrap().expect("a change after 3");
        assert_eq!((first.version, entry_versions(&first)), (4, vec![4]));
        // Committed after the change was published: a shared read does not see it, an own one does.
        project(&database, id, 5).await;
        let shared = read(3).await.unwrap().expect("a change after 3");
        assert_eq!(
            (shared.account.version, entry_versions(&shared)),
            (4, vec![4]),
            "the other subscribers at 3 get the first one's read"
        );
        let behind = read(1).await.unwrap().expect("a change after 1");
        assert_eq!(
            (behind.version, entry_versions(&behind)),
            (5, vec![2, 3, 4, 5]),
            "one behind the shared read reads what it missed itself"
        );
    }

    /// What a `min_version` query waits on: its account reaching the version, not every commit.
    #[tokio::test]
    async fn a_version_waiter_wakes_once_its_row_reaches_the_version() {
        let changes = Arc::new(Changes::new(8));
        let row = (ReadModel::Account, Uuid::from_u128(1));
        let mut waiter = changes.subscribe(Some(row));
        let reached = waiter.reached(3);
        tokio::pin!(reached);
        changes.publish(change(2, 9));
        changes.publish(change(1, 2));
        assert!(
            futures::poll!(&mut reached).is_pending(),
            "another row's change, or this row's before the version"
        );
        changes.publish(change(1, 4));
        tokio::time::timeout(Duration::from_secs(1), reached)
            .await
            .expect("woken once the row passed the version");
    }
}
