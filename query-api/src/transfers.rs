//! Transfers as the projector last saw them, and an account's transfers (either side).

use std::time::Duration;

use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::Response;
use axum::routing::get;
use axum::{Json, Router};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use service_kit::auth::Authorized;
use service_kit::http::{PathId, PathResource};
use service_kit::problem::ProblemDocument;
use utoipa::{IntoParams, ToSchema};
use uuid::Uuid;

use crate::AppState;
use crate::api::{AccountId, Page, Params, Reader, decode_cursor, find_account, limit, page};
use crate::error::QueryError;

const DEFAULT_LIMIT: i64 = 50;

pub(crate) fn router() -> Router<AppState> {
    Router::new()
        .route("/v1/transfers/{id}", get(get_transfer))
        .route("/v1/accounts/{id}/transfers", get(account_transfers))
}

/// A transfer named in the path; anything but a UUID names none.
pub(crate) enum Transfer {}

impl PathResource for Transfer {
    type Rejection = QueryError;

    fn not_found() -> QueryError {
        QueryError::TransferNotFound
    }
}

/// The `{id}` of a transfer path.
pub(crate) type TransferId = PathId<Transfer>;

/// A transfer and how far it got.
#[derive(
    Debug, Clone, Serialize, Deserialize, ToSchema, sqlx::FromRow, async_graphql::SimpleObject,
)]
#[graphql(name = "Transfer")]
pub(crate) struct TransferView {
    pub(crate) id: Uuid,
    from_account: Uuid,
    to_account: Uuid,
    /// Minor units.
    amount: i64,
    currency: String,
    /// The client's reference; `null` when the transfer was requested without one.
    reference: Option<String>,
    /// `requested`, `debited` (in flight), `completed`, `rejected` (the source declined:
    /// nothing moved), `refunding` (the destination declined) or `failed` (refunded: nothing
    /// moved in the end).
    pub(crate) status: String,
    /// Why it was rejected or failed: `insufficient_funds`, `currency_mismatch`, `frozen`,
    /// `closed` or `balance_limit_exceeded`.
    reason: Option<String>,
    /// The last transfer stream version applied to this view.
    pub(crate) version: i64,
    requested_at: DateTime<Utc>,
    /// When the transfer's last step was recorded.
    updated_at: DateTime<Utc>,
    /// Not final, and no step recorded for longer than the query API's
    /// `QUERY_API_TRANSFER_STALLED_AFTER_MS`: the process manager is retrying it (or is down),
    /// and operators are alerted (`LedgerTransfersStuck`). Money already debited stays
    /// reserved for the transfer until it completes or is refunded.
    #[sqlx(skip)]
    stalled: bool,
}

/// The columns of a [`TransferView`]; a transfer requested without a reference has an empty
/// one, shown as `null`.
const TRANSFER_COLUMNS: &str = "id, from_account, to_account, amount, currency, NULLIF(reference, '') AS reference, status, reason, version, requested_at, updated_at";

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub(crate) struct AccountTransfersParams {
    /// 1 to 500, default 50.
    #[param(minimum = 1, maximum = 500)]
    pub(crate) limit: Option<i64>,
    pub(crate) cursor: Option<String>,
}

#[utoipa::path(
    get, path = "/v1/transfers/{id}", tag = "transfers",
    params(("id" = Uuid, Path, description = "Transfer id")),
    responses(
        (status = 200, description = "The transfer; `ETag` is its version, with an `s` after it while the transfer is stalled", body = TransferView),
        (status = 304, description = "Unchanged since the `If-None-Match` version"),
        (status = 404, description = "No such transfer for this tenant (yet: it appears once projected)", body = ProblemDocument, content_type = "application/problem+json"),
    ),
    security(("bearer" = []))
)]
pub(crate) async fn get_transfer(
    State(state): State<AppState>,
    Authorized { principal, .. }: Authorized<Reader>,
    PathId { id, .. }: TransferId,
    headers: HeaderMap,
) -> Result<Response, QueryError> {
    let transfer = find_transfer(&state, &principal.tenant, id)
        .await?
        .ok_or(QueryError::TransferNotFound)?;
    // `stalled` changes with time alone, so it is part of the entity tag.
    let tag = format!(
        "{}{}",
        transfer.version,
        if transfer.stalled { "s" } else { "" }
    );
    Ok(crate::api::versioned(transfer, tag, &headers))
}

/// Transfer `id` of `tenant`, as the projector last saw it.
pub(crate) async fn find_transfer(
    state: &AppState,
    tenant: &str,
    id: Uuid,
) -> Result<Option<TransferView>, QueryError> {
    let transfer = sqlx::query_as(&format!(
        "SELECT {TRANSFER_COLUMNS} FROM transfers WHERE id = $1 AND tenant = $2"
    ))
    .bind(id)
    .bind(tenant)
    .fetch_optional(&mut *state.scope(tenant).await?)
    .await?;
    Ok(transfer.map(|transfer: TransferView| transfer.seen(state.transfer_stalled_after)))
}

impl TransferView {
    /// What pages of transfers are cut by.
    pub(crate) fn key(&self) -> String {
        self.id.to_string()
    }

    /// Whether the transfer can change no more.
    pub(crate) fn is_final(&self) -> bool {
        matches!(self.status.as_str(), "completed" | "rejected" | "failed")
    }

    /// The view as a client sees it now, stalled if it made no progress for `stalled_after`.
    fn seen(self, stalled_after: Duration) -> Self {
        self.seen_at(Utc::now(), stalled_after)
    }

    fn seen_at(mut self, now: DateTime<Utc>, stalled_after: Duration) -> Self {
        self.stalled = !self.is_final()
            && now
                .signed_duration_since(self.updated_at)
                .to_std()
                .unwrap_or_default()
                > stalled_after;
        self
    }
}

#[utoipa::path(
    get, path = "/v1/accounts/{id}/transfers", tag = "transfers",
    params(("id" = Uuid, Path, description = "Account id"), AccountTransfersParams),
    responses(
        (status = 200, description = "A page of the transfers from or to the account, oldest first", body = Page<TransferView>),
        (status = 400, description = "Invalid query", body = ProblemDocument, content_type = "application/problem+json"),
        (status = 404, description = "No such account for this tenant", body = ProblemDocument, content_type = "application/problem+json"),
    ),
    security(("bearer" = []))
)]
pub(crate) async fn account_transfers(
    State(state): State<AppState>,
    Authorized { principal, .. }: Authorized<Reader>,
    PathId { id: account, .. }: AccountId,
    Params(params): Params<AccountTransfersParams>,
) -> Result<Json<Page<TransferView>>, QueryError> {
    Ok(Json(
        transfers_page(&state, &principal.tenant, account, &params).await?,
    ))
}

/// A page of the transfers from or to `account`, by id.
pub(crate) async fn transfers_page(
    state: &AppState,
    tenant: &str,
    account: Uuid,
    params: &AccountTransfersParams,
) -> Result<Page<TransferView>, QueryError> {
    let limit = limit(params.limit, DEFAULT_LIMIT)?;
    let after: Option<Uuid> = decode_cursor(params.cursor.as_deref())?;
    find_account(state, tenant, account)
        .await?
        .ok_or(QueryError::NotFound)?;
    // Two index range scans, merged: either side of the transfer.
    let transfers: Vec<TransferView> = sqlx::query_as(&format!(
        "SELECT {TRANSFER_COLUMNS} FROM (
             (SELECT {TRANSFER_COLUMNS} FROM transfers
               WHERE tenant = $1 AND from_account = $2 AND ($3::uuid IS NULL OR id > $3)
               ORDER BY id LIMIT $4)
             UNION ALL
             (SELECT {TRANSFER_COLUMNS} FROM transfers
               WHERE tenant = $1 AND to_account = $2 AND ($3::uuid IS NULL OR id > $3)
               ORDER BY id LIMIT $4)
         ) AS either ORDER BY id LIMIT $4"
    ))
    .bind(tenant)
    .bind(account)
    .bind(after)
    .bind(limit + 1)
    .fetch_all(&mut *state.scope(tenant).await?)
    .await?;
    let transfers = transfers
        .into_iter()
        .map(|transfer| transfer.seen(state.transfer_stalled_after))
        .collect();
    Ok(page(transfers, limit, TransferView::key))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn transfer(status: &str, updated_at: DateTime<Utc>) -> TransferView {
        TransferView {
            id: Uuid::nil(),
            from_account: Uuid::nil(),
            to_account: Uuid::nil(),
            amount: 1,
            currency: "EUR".into(),
            reference: None,
            status: status.into(),
            reason: None,
            version: 2,
            requested_at: updated_at,
            updated_at,
            stalled: false,
        }
    }

    #[test]
    fn a_transfer_in_flight_is_stalled_only_once_its_last_step_is_older_than_the_limit() {
        let step = Utc::now();
        let limit = Duration::from_secs(120);
        let at = |seconds| step + chrono::Duration::seconds(seconds);
        for status in ["requested", "debited", "refunding"] {
            assert!(!transfer(status, step).seen_at(at(120), limit).stalled);
            assert!(transfer(status, step).seen_at(at(121), limit).stalled);
        }
        for status in ["completed", "rejected", "failed"] {
            assert!(!transfer(status, step).seen_at(at(3600), limit).stalled);
        }
        // A clock behind the database's: never stalled by a negative age.
        assert!(!transfer("debited", step).seen_at(at(-5), limit).stalled);
    }
}
