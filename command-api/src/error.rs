//! The HTTP edge's one error type, and its one mapping to problem+json: what the request
//! itself got wrong, and why the engine did not run its command.

use axum::http::{HeaderValue, header};
use axum::response::{IntoResponse, Response};
use domain::{AccountError, TransferError, ValueError};
use service_kit::auth::AuthError;
use service_kit::problem::{Problem, ProblemType};

use crate::engine::CommandError;

#[derive(Debug, thiserror::Error)]
pub(crate) enum ApiError {
    #[error(transparent)]
    Auth(#[from] AuthError),
    #[error("request body is not JSON: {0}")]
    MalformedJson(String),
    #[error("{0}")]
    UnknownField(String),
    #[error("{0}")]
    MissingField(String),
    #[error("{0}")]
    WrongType(String),
    #[error("request body must be application/json")]
    UnsupportedMediaType,
    #[error("request body too large")]
    PayloadTooLarge,
    #[error(transparent)]
    InvalidValue(#[from] ValueError),
    #[error("invalid {header} header: {reason}")]
    InvalidHeader {
        header: &'static str,
        reason: &'static str,
    },
    /// `COMMAND_API_MAX_TRANSFERS_IN_FLIGHT` transfers are not final yet, or
    /// `COMMAND_API_MAX_TRANSFERS_IN_FLIGHT_PER_TENANT` of the caller's tenant.
    #[error("too many transfers in flight")]
    TransfersBacklogged,
    #[error(transparent)]
    Command(#[from] CommandError),
}

impl From<AccountError> for ApiError {
    fn from(err: AccountError) -> Self {
        Self::Command(err.into())
    }
}

impl From<TransferError> for ApiError {
    fn from(err: TransferError) -> Self {
        Self::Command(err.into())
    }
}

/// The problem of a refused account command, or `None` for the refusals that only the
/// engine's own commands can meet (an account opened twice, a transfer step recorded twice, a
/// refund of nothing): no HTTP request can cause them, so they are bugs, not the client's doing.
fn rule_problem(err: &AccountError) -> Option<ProblemType> {
    use ProblemType as P;
    Some(match err {
        AccountError::NotFound => P::NotFound,
        AccountError::CurrencyMismatch { .. } => P::CurrencyMismatch,
        AccountError::InsufficientFunds { .. } => P::InsufficientFunds,
        AccountError::BalanceLimitExceeded { .. } => P::BalanceLimitExceeded,
        AccountError::Frozen => P::AccountFrozen,
        AccountError::NotFrozen => P::AccountNotFrozen,
        AccountError::Closed => P::AccountClosed,
        AccountError::NonZeroBalance { .. } => P::NonZeroBalance,
        AccountError::AlreadyOpen
        | AccountError::TransferStepRecorded { .. }
        | AccountError::NothingToRefund { .. } => return None,
    })
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        use ProblemType as P;
        let problem = match self {
            Self::Auth(err) => return err.into_response(),
            Self::MalformedJson(detail) => {
                Problem::new(P::MalformedJson, "Malformed JSON").detail(detail)
            }
            Self::UnknownField(detail) => {
                Problem::new(P::UnknownField, "Unknown field").detail(detail)
            }
            Self::MissingField(detail) => {
                Problem::new(P::MissingField, "Missing field").detail(detail)
            }
            Self::WrongType(detail) => Problem::new(P::WrongType, "Wrong type").detail(detail),
            Self::UnsupportedMediaType => {
                Problem::new(P::UnsupportedMediaType, "Unsupported media type")
                    .detail("Send the body as `Content-Type: application/json`.")
            }
            Self::PayloadTooLarge => Problem::new(P::PayloadTooLarge, "Payload too large")
                .detail("The request body exceeds the size limit."),
            Self::InvalidValue(err) => {
                let (kind, title) = match err {
                    ValueError::AmountOutOfRange { .. } => {
                        (P::AmountOutOfRange, "Amount out of range")
                    }
                    ValueError::OverdraftOutOfRange { .. } => {
                        (P::OverdraftOutOfRange, "Overdraft limit out of range")
                    }
                    ValueError::UnsupportedCurrency(_) => {
                        (P::UnsupportedCurrency, "Unsupported currency")
                    }
                    ValueError::InvalidOwner => (P::InvalidOwner, "Invalid owner"),
                    ValueError::InvalidReference => (P::InvalidReference, "Invalid reference"),
                };
                Problem::new(kind, title).detail(err.to_string())
            }
            Self::InvalidHeader { header, reason } => {
                Problem::new(P::InvalidHeader, "Invalid header")
                    .detail(format!("{header}: {reason}"))
                    .extension("header", header)
            }
            Self::TransfersBacklogged => {
                Problem::new(P::Overloaded, "Too many transfers in flight")
                    .detail(
                        "Transfers are being requested faster than they complete; retry shortly.",
                    )
                    .header(header::RETRY_AFTER, HeaderValue::from_static("1"))
            }
            Self::Command(err) => command_problem(err),
        };
        problem.into_response()
    }
}

fn command_problem(err: CommandError) -> Problem {
    use ProblemType as P;
    match err {
        CommandError::Account(AccountError::NotFound) => {
            Problem::new(P::NotFound, "Account not found")
                .detail("No account with this id exists for your tenant.")
        }
        CommandError::Conflict { current_version } => {
            let mut problem = Problem::new(P::Conflict, "Version conflict").detail(
                    "The account changed concurrently; read it again and retry with its current version.",
                );
            if let Some(version) = current_version {
                problem = problem.extension("current_version", version);
                if let Ok(etag) = HeaderValue::from_str(&format!("\"{version}\"")) {
                    problem = problem.header(header::ETAG, etag);
                }
            }
            problem
        }
        CommandError::Account(err) => {
            let Some(kind) = rule_problem(&err) else {
                tracing::error!(error = %err, "account command refused");
                return Problem::internal();
            };
            let mut problem = Problem::new(kind, "Business rule violated").detail(err.to_string());
            if let AccountError::InsufficientFunds {
                available,
                requested,
            } = err
            {
                problem = problem
                    .extension("available", available)
                    .extension("requested", requested);
            }
            problem
        }
        CommandError::Transfer(TransferError::NotFound) => {
            Problem::new(P::NotFound, "Transfer not found")
                .detail("No transfer with this id exists for your tenant.")
        }
        CommandError::Transfer(TransferError::SameAccount) => {
            Problem::new(P::SameAccount, "Business rule violated")
                .detail(TransferError::SameAccount.to_string())
        }
        // Only the process manager records steps, and the accounts decide each step once:
        // any other refusal of a transfer command is a bug, not the client's doing.
        CommandError::Transfer(err) => {
            tracing::error!(error = %err, "transfer command refused");
            Problem::internal()
        }
        CommandError::IdempotencyKeyReused => {
            Problem::new(P::IdempotencyKeyReused, "Idempotency key reused")
                .detail("This Idempotency-Key was already used with a different request.")
        }
        CommandError::Unavailable(err) => {
            tracing::warn!(error = %err, "database unavailable");
            Problem::unavailable("The database")
        }
        CommandError::Internal(err) => {
            tracing::error!(error = ?err, "internal error");
            Problem::internal()
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::Duration;

    use axum::body::Body;
    use axum::http::{Request, StatusCode};
    use serde_json::{Value, json};

    use super::*;
    use crate::testing::{send, teller};

    /// Status, headers and JSON body of `error` as the API answers it.
    async fn answer(error: ApiError) -> (StatusCode, axum::http::HeaderMap, Value) {
        let response = error.into_response();
        let status = response.status();
        let headers = response.headers().clone();
        let bytes = axum::body::to_bytes(response.into_body(), usize::MAX)
            .await
            .unwrap();
        (status, headers, serde_json::from_slice(&bytes).unwrap())
    }

    #[tokio::test]
    async fn each_refusal_has_its_status_and_type() {
        use StatusCode as S;
        let cases: Vec<(CommandError, S, &str)> = vec![
            (AccountError::NotFound.into(), S::NOT_FOUND, "not-found"),
            (
                AccountError::Frozen.into(),
                S::UNPROCESSABLE_ENTITY,
                "account-frozen",
            ),
            (
                AccountError::Closed.into(),
                S::UNPROCESSABLE_ENTITY,
                "account-closed",
            ),
            (
                AccountError::BalanceLimitExceeded { max_balance: 10 }.into(),
                S::UNPROCESSABLE_ENTITY,
                "balance-limit-exceeded",
            ),
            (TransferError::NotFound.into(), S::NOT_FOUND, "not-found"),
            (
                TransferError::SameAccount.into(),
                S::UNPROCESSABLE_ENTITY,
                "same-account",
            ),
            (
                CommandError::IdempotencyKeyReused,
                S::UNPROCESSABLE_ENTITY,
                "idempotency-key-reused",
            ),
            (
                CommandError::Conflict {
                    current_version: None,
                },
                S::CONFLICT,
                "conflict",
            ),
        ];
        for (error, status, slug) in cases {
            let described = error.to_string();
            let (got, headers, body) = answer(ApiError::Command(error)).await;
            assert_eq!(
                (got, body["type"].as_str()),
                (status, Some(&*format!("urn:ledger:problem:{slug}"))),
                "{described}"
            );
            assert_eq!(headers["content-type"], "application/problem+json");
            assert!(body.get("current_version").is_none(), "{body}");
        }
    }

    #[tokio::test]
    async fn refusals_carry_what_the_client_needs_to_retry() {
        let (status, headers, body) = answer(
            CommandError::Conflict {
                current_version: Some(7),
            }
            .into(),
        )
        .await;
        assert_eq!(status, StatusCode::CONFLICT);
        assert_eq!(headers["etag"], "\"7\"");
        assert_eq!(body["current_version"], 7);

        let (status, _, body) = answer(
            AccountError::InsufficientFunds {
                available: 30,
                requested: 50,
            }
            .into(),
        )
        .await;
        assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
        assert_eq!(body["type"], "urn:ledger:problem:insufficient-funds");
        assert_eq!(
            (body["available"].clone(), body["requested"].clone()),
            (json!(30), json!(50))
        );
    }

    /// What went wrong inside is logged, never sent: the client learns only which kind of
    /// failure it was.
    #[tokio::test]
    async fn failures_inside_say_nothing_of_their_cause() {
        let cases = [
            (
                CommandError::Internal(anyhow::anyhow!("secret table ledger_internal broke")),
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal",
            ),
            (
                CommandError::Unavailable(Arc::new(sqlx::Error::Protocol(
                    "secret table ledger_internal broke".into(),
                ))),
                StatusCode::SERVICE_UNAVAILABLE,
                "service-unavailable",
            ),
            (
                TransferError::AlreadyRequested.into(),
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal",
            ),
            (
                AccountError::AlreadyOpen.into(),
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal",
            ),
        ];
        for (error, status, slug) in cases {
            let (got, headers, body) = answer(ApiError::Command(error)).await;
            assert_eq!(got, status);
            assert_eq!(body["type"], format!("urn:ledger:problem:{slug}"));
            assert!(!body.to_string().contains("secret"), "{body}");
            assert!(!body.to_string().contains("already"), "{body}");
            if status == StatusCode::SERVICE_UNAVAILABLE {
                assert_eq!(headers["retry-after"], "1");
            }
        }
    }

    #[tokio::test]
    async fn invalid_values_are_422_before_the_engine() {
        let account = "0193a3f2-7c4e-7000-8000-000000000001";
        let other = "0193a3f2-7c4e-7000-8000-000000000002";
        let cases = [
            (
                format!("/v1/accounts/{account}/deposits"),
                json!({"amount": 0, "currency": "EUR"}),
                "amount-out-of-range",
            ),
            (
                format!("/v1/accounts/{account}/withdrawals"),
                json!({"amount": 5, "currency": "ZZZ"}),
                "unsupported-currency",
            ),
            (
                "/v1/accounts".to_owned(),
                json!({"owner": "", "currency": "EUR"}),
                "invalid-owner",
            ),
            (
                "/v1/accounts".to_owned(),
                json!({"owner": "Ada", "currency": "EUR", "overdraft_limit": -1}),
                "overdraft-out-of-range",
            ),
            (
                "/v1/transfers".to_owned(),
                json!({"from_account": account, "to_account": other, "amount": 1,
                       "currency": "EUR", "reference": "x".repeat(141)}),
                "invalid-reference",
            ),
            (
                "/v1/transfers".to_owned(),
                json!({"from_account": account, "to_account": account, "amount": 1,
                       "currency": "EUR"}),
                "same-account",
            ),
        ];
        for (path, body, slug) in cases {
            let answer = send(teller(&path).body(Body::from(body.to_string())).unwrap()).await;
            assert_eq!(answer.status, StatusCode::UNPROCESSABLE_ENTITY, "{body}");
            assert_eq!(answer.problem(), slug, "{body}");
        }
    }

    #[tokio::test]
    async fn routing_errors_are_problems_too() {
        let unknown = send(Request::get("/nope").body(Body::empty()).unwrap()).await;
        assert_eq!(unknown.status, StatusCode::NOT_FOUND);
        assert_eq!(unknown.problem(), "not-found");
        let wrong = send(Request::get("/v1/accounts").body(Body::empty()).unwrap()).await;
        assert_eq!(wrong.status, StatusCode::METHOD_NOT_ALLOWED);
        assert_eq!(wrong.problem(), "method-not-allowed");
        assert_eq!(wrong.headers["allow"], "POST");
    }

    /// With the database gone, a command is answered 503 within the pool's acquire timeout
    /// (300 ms here), never left hanging.
    #[tokio::test]
    async fn a_database_outage_is_503_not_a_hang() {
        let request = teller("/v1/accounts")
            .body(Body::from(
                json!({"owner": "Ada", "currency": "EUR"}).to_string(),
            ))
            .unwrap();
        let answer = tokio::time::timeout(Duration::from_secs(5), send(request))
            .await
            .expect("answered within 5 s");
        assert_eq!(answer.status, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(answer.problem(), "service-unavailable");
        assert_eq!(answer.headers["retry-after"], "1");
    }
}
