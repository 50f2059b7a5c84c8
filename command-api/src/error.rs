//! The HTTP edge's one error type, and its one mapping to problem+json: what the request
//! itself got wrong, and why the engine did not run its command.

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use domain::{AccountError, TransferError, ValueError};
use service_kit::auth::AuthError;
use service_kit::problem::Problem;

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

fn rule_slug(err: &AccountError) -> &'static str {
    match err {
        AccountError::NotFound => "not-found",
        AccountError::AlreadyOpen => "account-already-open",
        AccountError::CurrencyMismatch { .. } => "currency-mismatch",
        AccountError::InsufficientFunds { .. } => "insufficient-funds",
        AccountError::BalanceLimitExceeded { .. } => "balance-limit-exceeded",
        AccountError::Frozen => "account-frozen",
        AccountError::NotFrozen => "account-not-frozen",
        AccountError::Closed => "account-closed",
        AccountError::NonZeroBalance { .. } => "non-zero-balance",
        AccountError::TransferStepRecorded { .. } => "transfer-step-recorded",
        AccountError::NothingToRefund { .. } => "nothing-to-refund",
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        use StatusCode as S;
        let problem = match self {
            Self::Auth(err) => return err.into_response(),
            Self::MalformedJson(detail) => {
                Problem::new(S::BAD_REQUEST, "malformed-json", "Malformed JSON").detail(detail)
            }
            Self::UnknownField(detail) => {
                Problem::new(S::BAD_REQUEST, "unknown-field", "Unknown field").detail(detail)
            }
            Self::MissingField(detail) => {
                Problem::new(S::BAD_REQUEST, "missing-field", "Missing field").detail(detail)
            }
            Self::WrongType(detail) => {
                Problem::new(S::BAD_REQUEST, "wrong-type", "Wrong type").detail(detail)
            }
            Self::UnsupportedMediaType => Problem::new(
                S::UNSUPPORTED_MEDIA_TYPE,
                "unsupported-media-type",
                "Unsupported media type",
            )
            .detail("Send the body as `Content-Type: application/json`."),
            Self::PayloadTooLarge => Problem::new(
                S::PAYLOAD_TOO_LARGE,
                "payload-too-large",
                "Payload too large",
            )
            .detail("The request body exceeds the size limit."),
            Self::InvalidValue(err) => {
                let (slug, title) = match err {
                    ValueError::AmountOutOfRange { .. } => {
                        ("amount-out-of-range", "Amount out of range")
                    }
                    ValueError::OverdraftOutOfRange { .. } => {
                        ("overdraft-out-of-range", "Overdraft limit out of range")
                    }
                    ValueError::UnsupportedCurrency(_) => {
                        ("unsupported-currency", "Unsupported currency")
                    }
                    ValueError::InvalidOwner => ("invalid-owner", "Invalid owner"),
                    ValueError::InvalidReference => ("invalid-reference", "Invalid reference"),
                };
                Problem::new(S::UNPROCESSABLE_ENTITY, slug, title).detail(err.to_string())
            }
            Self::InvalidHeader { header, reason } => {
                Problem::new(S::BAD_REQUEST, "invalid-header", "Invalid header")
                    .detail(format!("{header}: {reason}"))
                    .extension("header", header)
            }
            Self::Command(err) => command_problem(err),
        };
        problem.into_response()
    }
}

fn command_problem(err: CommandError) -> Problem {
    use StatusCode as S;
    match err {
        CommandError::Account(AccountError::NotFound) => {
            Problem::new(S::NOT_FOUND, "not-found", "Account not found")
                .detail("No account with this id exists for your tenant.")
        }
        CommandError::Conflict { current_version } => {
            let mut problem = Problem::new(S::CONFLICT, "conflict", "Version conflict").detail(
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
            let mut problem = Problem::new(
                S::UNPROCESSABLE_ENTITY,
                rule_slug(&err),
                "Business rule violated",
            )
            .detail(err.to_string());
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
            Problem::new(S::NOT_FOUND, "not-found", "Transfer not found")
                .detail("No transfer with this id exists for your tenant.")
        }
        CommandError::Transfer(TransferError::SameAccount) => Problem::new(
            S::UNPROCESSABLE_ENTITY,
            "same-account",
            "Business rule violated",
        )
        .detail(TransferError::SameAccount.to_string()),
        // Only the process manager records steps, and the accounts decide each step once:
        // any other refusal of a transfer command is a bug, not the client's doing.
        CommandError::Transfer(err) => {
            tracing::error!(error = %err, "transfer command refused");
            Problem::internal()
        }
        CommandError::IdempotencyKeyReused => Problem::new(
            S::UNPROCESSABLE_ENTITY,
            "idempotency-key-reused",
            "Idempotency key reused",
        )
        .detail("This Idempotency-Key was already used with a different request."),
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
