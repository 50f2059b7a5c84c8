//! The query API's one error type, and its one mapping to problem+json.

use axum::http::{HeaderValue, header};
use axum::response::{IntoResponse, Response};
use service_kit::auth::AuthError;
use service_kit::problem::{Problem, ProblemType};

#[derive(Debug, thiserror::Error)]
pub(crate) enum QueryError {
    #[error(transparent)]
    Auth(#[from] AuthError),
    #[error("invalid query: {0}")]
    InvalidQuery(String),
    #[error("account not found")]
    NotFound,
    #[error("transfer not found")]
    TransferNotFound,
    #[error("no state at that point: {0}")]
    NoStateAt(String),
    #[error("read model has not reached version {wanted} yet")]
    NotYetVisible { wanted: i64 },
    #[error("database unavailable: {0}")]
    Unavailable(#[source] sqlx::Error),
    #[error(transparent)]
    Internal(#[from] anyhow::Error),
}

impl From<sqlx::Error> for QueryError {
    fn from(err: sqlx::Error) -> Self {
        if service_kit::db::is_outage(&err) {
            Self::Unavailable(err)
        } else {
            Self::Internal(err.into())
        }
    }
}

impl IntoResponse for QueryError {
    fn into_response(self) -> Response {
        let problem = match self {
            Self::Auth(err) => return err.into_response(),
            Self::InvalidQuery(detail) => {
                Problem::new(ProblemType::InvalidQuery, "Invalid query").detail(detail)
            }
            Self::NotFound => Problem::new(ProblemType::NotFound, "Account not found")
                .detail("No account with this id exists for your tenant."),
            Self::TransferNotFound => Problem::new(ProblemType::NotFound, "Transfer not found")
                .detail("No transfer with this id exists for your tenant."),
            Self::NoStateAt(detail) => {
                Problem::new(ProblemType::NoStateAt, "No state at that point").detail(detail)
            }
            Self::NotYetVisible { wanted } => {
                Problem::new(ProblemType::NotYetVisible, "Not yet visible")
                    .detail(format!(
                        "The read model has not reached version {wanted} yet; retry shortly."
                    ))
                    .extension("min_version", wanted)
                    .header(header::RETRY_AFTER, HeaderValue::from_static("1"))
            }
            Self::Unavailable(err) => {
                tracing::warn!(error = %err, "database unavailable");
                Problem::unavailable("The database")
            }
            Self::Internal(err) => {
                tracing::error!(error = ?err, "internal error");
                Problem::internal()
            }
        };
        problem.into_response()
    }
}
