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
    #[error("more than {limit} subscriptions on one connection")]
    TooManySubscriptions { limit: usize },
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
        self.problem().into_response()
    }
}

impl QueryError {
    /// GraphQL carries the same problem: `extensions.code` is the problem type's slug (as in
    /// `urn:ledger:problem:<code>`), with `type`, `status` and the problem's extension members.
    pub(crate) fn into_graphql(self) -> async_graphql::Error {
        use async_graphql::ErrorExtensions;
        let problem = self.problem();
        let code = problem.code().to_owned();
        async_graphql::Error::new(problem.detail.as_deref().unwrap_or(problem.title)).extend_with(
            |_, extensions| {
                extensions.set("code", code);
                extensions.set("type", problem.problem_type.as_str());
                extensions.set("status", problem.status.as_u16());
                for (key, value) in &problem.extensions {
                    if let Ok(value) = async_graphql::Value::from_json(value.clone()) {
                        extensions.set(key.as_str(), value);
                    }
                }
            },
        )
    }

    /// The problem details of this error, whichever protocol carries them; logs what the
    /// caller must not see.
    fn problem(self) -> Problem {
        match self {
            Self::Auth(err) => err.problem(),
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
            Self::TooManySubscriptions { limit } => {
                Problem::new(ProblemType::TooManySubscriptions, "Too many subscriptions")
                    .detail(format!(
                        "A connection may hold at most {limit} subscriptions; end one or open another connection."
                    ))
                    .extension("limit", limit)
            }
            Self::Unavailable(err) => {
                tracing::warn!(error = %err, "database unavailable");
                Problem::unavailable("The database")
            }
            Self::Internal(err) => {
                tracing::error!(error = ?err, "internal error");
                Problem::internal()
            }
        }
    }
}
