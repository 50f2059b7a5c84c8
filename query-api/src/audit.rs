//! The auditors' routes (role `auditor`): the event history itself, read from the event
//! store, never from a read model. Tenant-scoped like everything else: another tenant's
//! stream is answered 404, exactly like a missing one.

use audit::ACCOUNT;
use audit::history::{self, EventMetadata};
use audit::state::{self, AsOf, StateError};
use axum::extract::State;
use axum::routing::get;
use axum::{Json, Router};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use service_kit::auth::{Authorized, RequiredRoles, Role};
use service_kit::event_log::{self, LogPosition, LoggedEvent};
use service_kit::http::PathId;
use service_kit::problem::ProblemDocument;
use sqlx::PgConnection;
use utoipa::{IntoParams, ToSchema};
use uuid::Uuid;

use crate::AppState;
use crate::api::{AccountId, Params, limit};
use crate::error::QueryError;

/// Events per page when `limit` is absent.
const DEFAULT_LIMIT: i64 = 100;

pub(crate) fn router() -> Router<AppState> {
    Router::new()
        .route("/v1/audit/accounts/{id}/events", get(stream_events))
        .route("/v1/audit/accounts/{id}/state", get(account_state))
        .route("/v1/audit/accounts/{id}/verify", get(verify_account))
        .route("/v1/audit/log", get(tenant_log))
}

/// Role `auditor`: every audit route needs it (`Authorized<Auditor>`).
pub(crate) enum Auditor {}

impl RequiredRoles for Auditor {
    const ROLES: &'static [Role] = &[Role::Auditor];
}

/// One stored event with who caused it, where it sits in the log and its hash-chain links.
#[derive(Debug, Serialize, Deserialize, ToSchema, async_graphql::SimpleObject)]
#[graphql(name = "AuditEvent")]
pub(crate) struct AuditEventView {
    aggregate_type: String,
    aggregate_id: String,
    /// The stream version this event created.
    version: i64,
    event_id: Uuid,
    event_type: String,
    event_version: String,
    recorded_at: DateTime<Utc>,
    /// `<tx_id>-<global_position>`: the event's place in the commit-ordered log.
    position: String,
    /// The token subject that issued the command.
    actor: Option<String>,
    correlation_id: Option<String>,
    causation_id: Option<String>,
    request_id: Option<String>,
    idempotency_key: Option<String>,
    /// The stored payload.
    payload: serde_json::Value,
    /// Hex; absent for version 1.
    prev_hash: Option<String>,
    /// Hex SHA-256 over the previous hash and this event's stored fields.
    hash: String,
}

impl From<LoggedEvent> for AuditEventView {
    fn from(event: LoggedEvent) -> Self {
        let metadata = EventMetadata::of(&event);
        let payload = serde_json::from_str(&event.payload)
            .unwrap_or_else(|_| serde_json::Value::String(event.payload.clone()));
        Self {
            position: event.position.to_string(),
            prev_hash: event.prev_hash.as_ref().map(hex::encode),
            hash: hex::encode(&event.hash),
            aggregate_type: event.aggregate_type,
            aggregate_id: event.aggregate_id,
            version: event.sequence,
            event_id: event.event_id,
            event_type: event.event_type,
            event_version: event.event_version,
            recorded_at: event.recorded_at,
            actor: metadata.actor,
            correlation_id: metadata.correlation_id,
            causation_id: metadata.causation_id,
            request_id: metadata.request_id,
            idempotency_key: metadata.idempotency_key,
            payload,
        }
    }
}

/// A page of a stream's events; pass `next_from_version` as `from_version` for the next.
#[derive(Debug, Serialize, Deserialize, ToSchema, async_graphql::SimpleObject)]
#[graphql(name = "AuditEventPage")]
pub(crate) struct EventPage {
    items: Vec<AuditEventView>,
    next_from_version: Option<i64>,
}

/// A page of the tenant's log. `next_after` is always set: passing it as `after` continues
/// exactly after the last event returned (or where this page started, if it was empty), so
/// polling with it never skips or repeats an event.
#[derive(Debug, Serialize, Deserialize, ToSchema, async_graphql::SimpleObject)]
#[graphql(name = "AuditLogPage")]
pub(crate) struct LogPage {
    items: Vec<AuditEventView>,
    next_after: String,
}

/// The account as folded from its events up to a version or instant.
#[derive(Debug, Serialize, Deserialize, ToSchema, async_graphql::SimpleObject)]
#[graphql(name = "AccountState")]
pub(crate) struct AccountStateView {
    account_id: Uuid,
    /// The last version folded.
    version: i64,
    /// When that version was recorded.
    recorded_at: DateTime<Utc>,
    owner: String,
    currency: String,
    overdraft_limit: i64,
    balance: i64,
    /// `active`, `frozen` or `closed`.
    status: String,
}

/// The result of recomputing a stream's hash chain.
#[derive(Debug, Serialize, Deserialize, ToSchema, async_graphql::SimpleObject)]
#[graphql(name = "Verification")]
pub(crate) struct VerificationView {
    account_id: Uuid,
    intact: bool,
    events_checked: u64,
    /// The last stored version.
    head_version: i64,
    /// The hash of the last version whose link held (hex).
    verified_head_hash: Option<String>,
    first_break: Option<BreakView>,
}

/// Where the chain first fails and why.
#[derive(Debug, Serialize, Deserialize, ToSchema, async_graphql::SimpleObject)]
#[graphql(name = "ChainBreak")]
pub(crate) struct BreakView {
    version: i64,
    /// `sequence-gap`, `previous-hash-mismatch` or `hash-mismatch`.
    reason: String,
    explanation: String,
}

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub(crate) struct StreamEventsParams {
    /// First version to return (default 1).
    #[param(minimum = 1)]
    pub(crate) from_version: Option<i64>,
    /// 1 to 500, default 100.
    #[param(minimum = 1, maximum = 500)]
    pub(crate) limit: Option<i64>,
}

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub(crate) struct StateParams {
    /// An RFC 3339 instant: the state from the events recorded by then.
    pub(crate) at: Option<DateTime<Utc>>,
    /// A version: the state right after it. At most one of `at` and `version`; neither means
    /// the latest state.
    #[param(minimum = 1)]
    pub(crate) version: Option<i64>,
}

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub(crate) struct LogParams {
    /// A `next_after` from an earlier page; absent for the start of the log.
    pub(crate) after: Option<String>,
    /// 1 to 500, default 100.
    #[param(minimum = 1, maximum = 500)]
    pub(crate) limit: Option<i64>,
}

/// 404 unless the account's stream exists and belongs to the caller's tenant.
async fn own_stream(
    connection: &mut PgConnection,
    tenant: &str,
    id: Uuid,
) -> Result<(), QueryError> {
    let owner = history::stream_tenant(connection, ACCOUNT, &id.to_string()).await?;
    if owner.as_deref() == Some(tenant) {
        Ok(())
    } else {
        Err(QueryError::NotFound)
    }
}

impl From<StateError> for QueryError {
    fn from(err: StateError) -> Self {
        match err {
            StateError::Database(err) => err.into(),
            unreadable @ StateError::Unreadable { .. } => Self::Internal(unreadable.into()),
        }
    }
}

#[utoipa::path(
    get, path = "/v1/audit/accounts/{id}/events", tag = "audit",
    params(("id" = Uuid, Path, description = "Account id"), StreamEventsParams),
    responses(
        (status = 200, description = "The stream's events in version order, with metadata and hashes", body = EventPage),
        (status = 400, description = "Invalid query", body = ProblemDocument, content_type = "application/problem+json"),
        (status = 404, description = "No such account for this tenant", body = ProblemDocument, content_type = "application/problem+json"),
    ),
    security(("bearer" = []))
)]
pub(crate) async fn stream_events(
    State(state): State<AppState>,
    Authorized { principal, .. }: Authorized<Auditor>,
    PathId { id, .. }: AccountId,
    Params(params): Params<StreamEventsParams>,
) -> Result<Json<EventPage>, QueryError> {
    Ok(Json(
        events_page(&state, &principal.tenant, id, &params).await?,
    ))
}

/// A page of account `id`'s stored events, in version order.
pub(crate) async fn events_page(
    state: &AppState,
    tenant: &str,
    id: Uuid,
    params: &StreamEventsParams,
) -> Result<EventPage, QueryError> {
    let limit = limit(params.limit, DEFAULT_LIMIT)?;
    let from_version = params.from_version.unwrap_or(1);
    if from_version < 1 {
        return Err(QueryError::InvalidQuery(
            "from_version must be at least 1".into(),
        ));
    }
    let mut scope = state.scope(tenant).await?;
    own_stream(&mut scope, tenant, id).await?;
    let mut events = history::stream_events(
        &mut scope,
        ACCOUNT,
        &id.to_string(),
        from_version,
        limit + 1,
    )
    .await?;
    let next_from_version = (events.len() as i64 > limit)
        .then(|| events.pop().map(|next| next.sequence))
        .flatten();
    Ok(EventPage {
        items: events.into_iter().map(AuditEventView::from).collect(),
        next_from_version,
    })
}

#[utoipa::path(
    get, path = "/v1/audit/accounts/{id}/state", tag = "audit",
    params(("id" = Uuid, Path, description = "Account id"), StateParams),
    responses(
        (status = 200, description = "The account's state folded from its events up to that point", body = AccountStateView),
        (status = 400, description = "Invalid query, or both `at` and `version`", body = ProblemDocument, content_type = "application/problem+json"),
        (status = 404, description = "No such account for this tenant, or none yet at that point", body = ProblemDocument, content_type = "application/problem+json"),
    ),
    security(("bearer" = []))
)]
pub(crate) async fn account_state(
    State(state): State<AppState>,
    Authorized { principal, .. }: Authorized<Auditor>,
    PathId { id, .. }: AccountId,
    Params(params): Params<StateParams>,
) -> Result<Json<AccountStateView>, QueryError> {
    Ok(Json(
        state_as_of(&state, &principal.tenant, id, &params).await?,
    ))
}

/// Account `id` folded from its events up to the point `params` name.
pub(crate) async fn state_as_of(
    state: &AppState,
    tenant: &str,
    id: Uuid,
    params: &StateParams,
) -> Result<AccountStateView, QueryError> {
    let as_of = match (params.at, params.version) {
        (Some(_), Some(_)) => {
            return Err(QueryError::InvalidQuery(
                "give at most one of `at` and `version`".into(),
            ));
        }
        (Some(at), None) => AsOf::Instant(at),
        (None, Some(version)) if version < 1 => {
            return Err(QueryError::InvalidQuery(
                "version must be at least 1".into(),
            ));
        }
        (None, Some(version)) => AsOf::Version(version),
        (None, None) => AsOf::Latest,
    };
    let mut scope = state.scope(tenant).await?;
    own_stream(&mut scope, tenant, id).await?;
    // A version past the stream's head folds to the head: that is not the version asked for.
    let folded = state::account_as_of(&mut scope, &id.to_string(), as_of)
        .await?
        .filter(|folded| !matches!(as_of, AsOf::Version(wanted) if wanted != folded.version))
        .ok_or_else(|| missing(as_of))?;
    let open = folded.account.state().ok_or_else(|| missing(as_of))?;
    Ok(AccountStateView {
        account_id: id,
        version: folded.version,
        recorded_at: folded.recorded_at,
        owner: open.owner.as_str().to_owned(),
        currency: open.currency.to_string(),
        overdraft_limit: open.overdraft_limit.minor_units(),
        balance: open.balance,
        status: open.status.as_str().to_owned(),
    })
}

fn missing(as_of: AsOf) -> QueryError {
    QueryError::NoStateAt(match as_of {
        AsOf::Instant(at) => format!("The account did not exist yet at {at}."),
        AsOf::Version(version) => format!("The account has no version {version}."),
        AsOf::Latest => "The account has no state.".into(),
    })
}

#[utoipa::path(
    get, path = "/v1/audit/log", tag = "audit",
    params(LogParams),
    responses(
        (status = 200, description = "The tenant's events in commit order (the order the relay publishes)", body = LogPage),
        (status = 400, description = "Invalid query or cursor", body = ProblemDocument, content_type = "application/problem+json"),
    ),
    security(("bearer" = []))
)]
pub(crate) async fn tenant_log(
    State(state): State<AppState>,
    Authorized { principal, .. }: Authorized<Auditor>,
    Params(params): Params<LogParams>,
) -> Result<Json<LogPage>, QueryError> {
    Ok(Json(log_page(&state, &principal.tenant, &params).await?))
}

/// A page of `tenant`'s events in commit order.
pub(crate) async fn log_page(
    state: &AppState,
    tenant: &str,
    params: &LogParams,
) -> Result<LogPage, QueryError> {
    let limit = limit(params.limit, DEFAULT_LIMIT)?;
    let after = match params.after.as_deref() {
        None => LogPosition::START,
        Some(after) => after.parse().map_err(|_| {
            QueryError::InvalidQuery("after is not a position this API issued".into())
        })?,
    };
    let events =
        event_log::read_committed_of_tenant(&mut *state.scope(tenant).await?, tenant, after, limit)
            .await?
            .events;
    let next_after = events.last().map_or(after, |last| last.position);
    Ok(LogPage {
        items: events.into_iter().map(AuditEventView::from).collect(),
        next_after: next_after.to_string(),
    })
}

#[utoipa::path(
    get, path = "/v1/audit/accounts/{id}/verify", tag = "audit",
    params(("id" = Uuid, Path, description = "Account id")),
    responses(
        (status = 200, description = "The chain recomputed from the raw rows: intact, or where it first breaks", body = VerificationView),
        (status = 404, description = "No such account for this tenant", body = ProblemDocument, content_type = "application/problem+json"),
    ),
    security(("bearer" = []))
)]
pub(crate) async fn verify_account(
    State(state): State<AppState>,
    Authorized { principal, .. }: Authorized<Auditor>,
    PathId { id, .. }: AccountId,
) -> Result<Json<VerificationView>, QueryError> {
    Ok(Json(verification(&state, &principal.tenant, id).await?))
}

/// Account `id`'s hash chain, recomputed from the raw rows.
pub(crate) async fn verification(
    state: &AppState,
    tenant: &str,
    id: Uuid,
) -> Result<VerificationView, QueryError> {
    let mut scope = state.scope(tenant).await?;
    own_stream(&mut scope, tenant, id).await?;
    let verification = audit::verify::verify_stream(&mut scope, ACCOUNT, &id.to_string()).await?;
    Ok(VerificationView {
        account_id: id,
        intact: verification.first_break.is_none(),
        events_checked: verification.events,
        head_version: verification.head_version,
        verified_head_hash: verification.verified_head.map(hex::encode),
        first_break: verification.first_break.map(|found| BreakView {
            version: found.sequence,
            reason: found.reason.as_str().to_owned(),
            explanation: found.explain(),
        }),
    })
}
