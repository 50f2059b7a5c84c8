//! Routes, request and response bodies, and the OpenAPI document.

use axum::extract::State;
use axum::http::{HeaderName, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Json, Router};
use domain::{
    AccountCommand, AccountError, Amount, Currency, OverdraftLimit, Owner, Reference,
    TransferCommand, TransferError, TransferTerms,
};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use utoipa::{OpenApi, ToSchema};
use uuid::Uuid;

use service_kit::auth::AuthConfig;
use service_kit::auth::{Authorized, RequiredRoles};
use service_kit::http::PathId;
use service_kit::problem::{BearerAuth, ProblemDocument, StandardProblems, swagger_ui};

use crate::AppState;
use crate::engine::{CommandContext, Committed, Idempotency, Target};
use crate::error::ApiError;
use crate::extract::{AccountId, AppJson, CommandHeaders, Teller};

const IDEMPOTENT_REPLAYED: HeaderName = HeaderName::from_static("idempotent-replayed");

pub(crate) fn router(state: AppState, auth: &AuthConfig) -> Router {
    Router::new()
        .route("/v1/accounts", post(open_account))
        .route("/v1/accounts/{id}/deposits", post(deposit))
        .route("/v1/accounts/{id}/withdrawals", post(withdraw))
        .route("/v1/accounts/{id}/freeze", post(freeze))
        .route("/v1/accounts/{id}/unfreeze", post(unfreeze))
        .route("/v1/accounts/{id}/close", post(close))
        .route("/v1/transfers", post(request_transfer))
        .merge(swagger_ui(ApiDoc::openapi(), auth))
        .with_state(state)
}

/// Opens an account.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct OpenAccountRequest {
    /// The holder's name, 1 to 200 characters.
    #[schema(min_length = 1, max_length = 200, example = "Ada Lovelace")]
    owner: String,
    /// ISO 4217 code.
    #[schema(min_length = 3, max_length = 3, example = "EUR")]
    currency: String,
    /// How far below zero the balance may go, in minor units.
    #[serde(default)]
    #[schema(minimum = 0, maximum = 1_000_000_000_000_000_i64, example = 0)]
    overdraft_limit: i64,
}

/// Moves money into or out of an account.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct MoneyRequest {
    /// Minor units (cents for EUR), strictly positive.
    #[schema(minimum = 1, maximum = 1_000_000_000_000_000_i64, example = 2500)]
    amount: i64,
    /// ISO 4217 code; must be the account's currency.
    #[schema(min_length = 3, max_length = 3, example = "EUR")]
    currency: String,
}

/// The outcome of a command.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub(crate) struct CommandAccepted {
    account_id: Uuid,
    /// The account's stream version after the command: pass it as `If-Match` to build on it,
    /// or as `min_version` to the query API to read your write.
    version: u64,
}

/// Moves money between two accounts of the caller's tenant.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct TransferRequest {
    from_account: Uuid,
    to_account: Uuid,
    /// Minor units, strictly positive.
    #[schema(minimum = 1, maximum = 1_000_000_000_000_000_i64, example = 2500)]
    amount: i64,
    /// ISO 4217 code; both accounts must hold it.
    #[schema(min_length = 3, max_length = 3, example = "EUR")]
    currency: String,
    /// Free text for both account holders, up to 140 characters.
    #[serde(default)]
    #[schema(max_length = 140, example = "November rent")]
    reference: String,
}

/// A transfer taken on: the accounts are debited and credited asynchronously.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub(crate) struct TransferAccepted {
    transfer_id: Uuid,
    /// Where the query API reports the transfer's progress (`GET`, role `viewer`): an absolute
    /// URL under `QUERY_API_PUBLIC_URL`. Also the response's `Location`.
    status_url: String,
}

/// Documents an account command handler: all share parameters, security and error kinds.
macro_rules! account_command {
    ($path:literal, $summary:literal, body: [$($body:ty)?], $handler:item) => {
        #[utoipa::path(
            post, path = $path, tag = "accounts", summary = $summary,
            $(request_body = $body,)?
            params(
                ("id" = Uuid, Path, description = "Account id"),
                ("If-Match" = Option<String>, Header, description = "Apply only at this version, e.g. \"3\"; 409 otherwise.", pattern = r#"^"[0-9]{1,18}"$"#),
                ("Idempotency-Key" = Option<String>, Header, description = "Retries with the same key and body return the first response.", min_length = 1, max_length = 255, pattern = "^[ -~]*[!-~][ -~]*$"),
                ("X-Correlation-Id" = Option<String>, Header, description = "Recorded on the event; defaults to the request id.", min_length = 1, max_length = 255, pattern = "^[ -~]*[!-~][ -~]*$"),
            ),
            responses(
                (status = 200, description = "Applied", body = CommandAccepted),
                (status = 404, description = "No such account for this tenant", body = ProblemDocument, content_type = "application/problem+json"),
                (status = 409, description = "Version conflict; `current_version` is the current one", body = ProblemDocument, content_type = "application/problem+json"),
                (status = 422, description = "Invalid value or business rule violated", body = ProblemDocument, content_type = "application/problem+json"),
            ),
            security(("bearer" = []))
        )]
        $handler
    };
}

#[utoipa::path(
    post, path = "/v1/accounts", tag = "accounts",
    request_body = OpenAccountRequest,
    params(
        ("Idempotency-Key" = Option<String>, Header, description = "Retries with the same key and body return the first response.", min_length = 1, max_length = 255, pattern = "^[ -~]*[!-~][ -~]*$"),
        ("X-Correlation-Id" = Option<String>, Header, description = "Recorded on the event; defaults to the request id.", min_length = 1, max_length = 255, pattern = "^[ -~]*[!-~][ -~]*$"),
    ),
    responses(
        (status = 201, description = "Account opened; `Location` is its absolute URL on the query API (`QUERY_API_PUBLIC_URL`)", body = CommandAccepted),
        (status = 422, description = "Invalid value or reused idempotency key", body = ProblemDocument, content_type = "application/problem+json"),
    ),
    security(("bearer" = []))
)]
async fn open_account(
    State(state): State<AppState>,
    Authorized { principal, .. }: Authorized<Teller>,
    headers: CommandHeaders,
    AppJson(body): AppJson<OpenAccountRequest>,
) -> Result<Response, ApiError> {
    let command = AccountCommand::Open {
        tenant: principal.tenant.clone(),
        owner: Owner::parse(&body.owner)?,
        currency: Currency::parse(&body.currency)?,
        overdraft_limit: OverdraftLimit::parse(body.overdraft_limit)?,
    };
    let target = Target::New(Uuid::now_v7());
    let context = context(&principal, &headers, None, &body);
    let committed = state
        .commands
        .account(&context, target, command, None)
        .await?;
    let location = format!(
        "{}/v1/accounts/{}",
        state.query_api_url, committed.stream_id
    );
    Ok(accepted(StatusCode::CREATED, committed, Some(&location)))
}

account_command!(
"/v1/accounts/{id}/deposits",
"Deposit money",
body: [MoneyRequest],
async fn deposit(
    State(state): State<AppState>,
    Authorized { principal, .. }: Authorized<Teller>,
    PathId { id, .. }: AccountId,
    headers: CommandHeaders,
    AppJson(body): AppJson<MoneyRequest>,
) -> Result<Response, ApiError> {
    let command = AccountCommand::Deposit {
        tenant: principal.tenant.clone(),
        amount: Amount::parse(body.amount)?,
        currency: Currency::parse(&body.currency)?,
    };
    run(&state, &principal, &headers, id, command, &body).await
});

account_command!(
"/v1/accounts/{id}/withdrawals",
"Withdraw money",
body: [MoneyRequest],
async fn withdraw(
    State(state): State<AppState>,
    Authorized { principal, .. }: Authorized<Teller>,
    PathId { id, .. }: AccountId,
    headers: CommandHeaders,
    AppJson(body): AppJson<MoneyRequest>,
) -> Result<Response, ApiError> {
    let command = AccountCommand::Withdraw {
        tenant: principal.tenant.clone(),
        amount: Amount::parse(body.amount)?,
        currency: Currency::parse(&body.currency)?,
    };
    run(&state, &principal, &headers, id, command, &body).await
});

account_command!(
"/v1/accounts/{id}/freeze",
"Freeze: no money moves until unfrozen",
body: [],
async fn freeze(
    State(state): State<AppState>,
    Authorized { principal, .. }: Authorized<Teller>,
    PathId { id, .. }: AccountId,
    headers: CommandHeaders,
) -> Result<Response, ApiError> {
    let command = AccountCommand::Freeze {
        tenant: principal.tenant.clone(),
    };
    run(&state, &principal, &headers, id, command, &()).await
});

account_command!(
"/v1/accounts/{id}/unfreeze",
"Unfreeze",
body: [],
async fn unfreeze(
    State(state): State<AppState>,
    Authorized { principal, .. }: Authorized<Teller>,
    PathId { id, .. }: AccountId,
    headers: CommandHeaders,
) -> Result<Response, ApiError> {
    let command = AccountCommand::Unfreeze {
        tenant: principal.tenant.clone(),
    };
    run(&state, &principal, &headers, id, command, &()).await
});

account_command!(
"/v1/accounts/{id}/close",
"Close an account whose balance is zero",
body: [],
async fn close(
    State(state): State<AppState>,
    Authorized { principal, .. }: Authorized<Teller>,
    PathId { id, .. }: AccountId,
    headers: CommandHeaders,
) -> Result<Response, ApiError> {
    let command = AccountCommand::Close {
        tenant: principal.tenant.clone(),
    };
    run(&state, &principal, &headers, id, command, &()).await
});

#[utoipa::path(
    post, path = "/v1/transfers", tag = "transfers",
    summary = "Transfer money between two accounts of yours",
    request_body = TransferRequest,
    params(
        ("Idempotency-Key" = Option<String>, Header, description = "Retries with the same key and body return the first response.", min_length = 1, max_length = 255, pattern = "^[ -~]*[!-~][ -~]*$"),
        ("X-Correlation-Id" = Option<String>, Header, description = "Recorded on the event; defaults to the request id.", min_length = 1, max_length = 255, pattern = "^[ -~]*[!-~][ -~]*$"),
    ),
    responses(
        (status = 202, description = "Accepted: the process manager debits the source, then credits the destination (or refunds the source). Follow `status_url` on the query API.", body = TransferAccepted),
        (status = 404, description = "An account does not exist for this tenant", body = ProblemDocument, content_type = "application/problem+json"),
        (status = 422, description = "Invalid value, the same account twice, or a reused idempotency key", body = ProblemDocument, content_type = "application/problem+json"),
        (status = 503, description = "Too many transfers in flight (`overloaded`, nothing recorded; retry after `Retry-After` seconds; a retry of an accepted transfer with its `Idempotency-Key` is still answered 202), or the database is unavailable", body = ProblemDocument, content_type = "application/problem+json",
            headers(("Retry-After" = u32, description = "Seconds to wait before retrying"))),
    ),
    security(("bearer" = []))
)]
async fn request_transfer(
    State(state): State<AppState>,
    Authorized { principal, .. }: Authorized<Teller>,
    headers: CommandHeaders,
    AppJson(body): AppJson<TransferRequest>,
) -> Result<Response, ApiError> {
    let terms = TransferTerms {
        tenant: principal.tenant.clone(),
        from: body.from_account,
        to: body.to_account,
        amount: Amount::parse(body.amount)?,
        currency: Currency::parse(&body.currency)?,
        reference: Reference::parse(&body.reference)?,
    };
    if terms.from == terms.to {
        return Err(TransferError::SameAccount.into());
    }
    let context = context(&principal, &headers, None, &body);
    let committed = if state.transfer_backlog.admits(&principal.tenant) {
        request_new_transfer(&state, &principal.tenant, &context, terms).await?
    } else {
        // A retry of a transfer that was accepted is answered as it was, full or not: told to
        // retry, its client would only ask again for what is already done.
        state
            .commands
            .replay(&context)
            .await?
            .ok_or(ApiError::TransfersBacklogged)?
    };
    let status_url = format!(
        "{}/v1/transfers/{}",
        state.query_api_url, committed.stream_id
    );
    let mut response = (
        StatusCode::ACCEPTED,
        Json(TransferAccepted {
            transfer_id: committed.stream_id,
            status_url: status_url.clone(),
        }),
    )
        .into_response();
    let response_headers = response.headers_mut();
    if let Ok(location) = HeaderValue::from_str(&status_url) {
        response_headers.insert(header::LOCATION, location);
    }
    if committed.replayed {
        response_headers.insert(IDEMPOTENT_REPLAYED, HeaderValue::from_static("true"));
    }
    Ok(response)
}

/// Records a new transfer, once both accounts exist for `tenant` in the transfer's currency.
async fn request_new_transfer(
    state: &AppState,
    tenant: &str,
    context: &CommandContext,
    terms: TransferTerms,
) -> Result<Committed<domain::TransferEvent>, ApiError> {
    // Another tenant's account is as absent as a missing one: nothing about it leaks. A
    // transfer neither account's currency allows is refused now, not after a debit and a
    // refund; what can change (funds, status) is judged by the accounts, later.
    for account in [terms.from, terms.to] {
        match state.commands.account_currency(account, tenant).await? {
            None => return Err(AccountError::NotFound.into()),
            Some(currency) if currency != terms.currency => {
                return Err(AccountError::CurrencyMismatch {
                    account: currency,
                    requested: terms.currency,
                }
                .into());
            }
            Some(_) => {}
        }
    }
    Ok(state
        .commands
        .transfer(
            context,
            Target::New(Uuid::now_v7()),
            TransferCommand::Request(terms),
        )
        .await?)
}

async fn run(
    state: &AppState,
    principal: &service_kit::auth::Principal,
    headers: &CommandHeaders,
    id: Uuid,
    command: AccountCommand,
    body: &impl Serialize,
) -> Result<Response, ApiError> {
    let context = context(principal, headers, Some(id), body);
    let committed = state
        .commands
        .account(&context, Target::Existing(id), command, headers.if_match)
        .await?;
    Ok(accepted(StatusCode::OK, committed, None))
}

/// What a command carries besides itself; `account` is the account its path names.
fn context(
    principal: &service_kit::auth::Principal,
    headers: &CommandHeaders,
    account: Option<Uuid>,
    body: &impl Serialize,
) -> CommandContext {
    let idempotency = headers.idempotency_key.clone().map(|key| {
        // The fingerprint of what was asked: the route (with the account id) and the parsed
        // body, so formatting differences in the JSON do not count as a different request.
        let route = match account {
            Some(id) => headers.route.replace("{id}", &id.to_string()),
            None => headers.route.clone(),
        };
        let mut hasher = Sha256::new();
        hasher.update(route.as_bytes());
        hasher.update([0]);
        hasher.update(serde_json::to_vec(body).unwrap_or_default());
        Idempotency {
            key,
            request_hash: hex::encode(hasher.finalize()),
        }
    });
    CommandContext {
        tenant: principal.tenant.clone(),
        actor: principal.subject.clone(),
        request_id: headers.request_id.clone(),
        correlation_id: headers.correlation_id.clone(),
        traceparent: headers.traceparent.clone(),
        idempotency,
    }
}

/// The answer to a command; `location` (201 only) is where the query API shows the account.
fn accepted<E>(status: StatusCode, committed: Committed<E>, location: Option<&str>) -> Response {
    let mut response = (
        status,
        Json(CommandAccepted {
            account_id: committed.stream_id,
            version: committed.version,
        }),
    )
        .into_response();
    let headers = response.headers_mut();
    if let Ok(etag) = HeaderValue::from_str(&format!("\"{}\"", committed.version)) {
        headers.insert(header::ETAG, etag);
    }
    if let Some(location) = location.and_then(|location| HeaderValue::from_str(location).ok()) {
        headers.insert(header::LOCATION, location);
    }
    if committed.replayed {
        headers.insert(IDEMPOTENT_REPLAYED, HeaderValue::from_static("true"));
    }
    response
}

#[derive(OpenApi)]
#[openapi(
    info(title = "Ledger command API", description = "Open accounts and move money. Every change is an event in the ledger's event store."),
    paths(open_account, deposit, withdraw, freeze, unfreeze, close, request_transfer),
    components(schemas(
        OpenAccountRequest, MoneyRequest, CommandAccepted, TransferRequest, TransferAccepted,
        ProblemDocument,
    )),
    modifiers(&BearerAuth, &PROBLEMS),
)]
pub(crate) struct ApiDoc;

/// 401, 403, 429, 503 on every command; 400, 413 and 415 too, since every one is a POST.
const PROBLEMS: StandardProblems = StandardProblems {
    roles: &[("accounts", Teller::ROLES), ("transfers", Teller::ROLES)],
};

#[cfg(test)]
mod tests {
    use super::*;

    /// Keys already spent were fingerprinted with the route as the client called it (the
    /// account id in it) and the parsed body; the route template from `MatchedPath` must give
    /// the same fingerprint, or their retries would be refused as another request.
    #[test]
    fn the_idempotency_fingerprint_is_the_called_route_and_the_parsed_body() {
        let account = Uuid::from_u128(0x0193_0000_0000_7000_8000_0000_0000_0001);
        let headers = CommandHeaders {
            route: "POST /v1/accounts/{id}/deposits".into(),
            request_id: "request".into(),
            if_match: None,
            idempotency_key: Some("key".into()),
            correlation_id: "correlation".into(),
            traceparent: None,
        };
        let principal = service_kit::auth::Principal {
            subject: "alice".into(),
            tenant: "acme".into(),
            roles: Default::default(),
        };
        let body = serde_json::json!({"amount": 1, "currency": "EUR"});
        let context = context(&principal, &headers, Some(account), &body);
        let mut expected = Sha256::new();
        expected.update(format!("POST /v1/accounts/{account}/deposits").as_bytes());
        expected.update([0]);
        expected.update(serde_json::to_vec(&body).unwrap());
        let idempotency = context.idempotency.unwrap();
        assert_eq!(idempotency.request_hash, hex::encode(expected.finalize()));
    }
}
