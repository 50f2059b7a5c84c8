//! Why a command did not take effect, in the engine's terms: the aggregate's refusal, a lost
//! race, or the store failing. The HTTP edge (`crate::error`) maps it to problem+json.

use std::sync::Arc;

use domain::{AccountError, TransferError};

use super::append::AppendError;
use super::store::LoadError;

#[derive(Debug, thiserror::Error)]
pub(crate) enum CommandError {
    /// The account refused the command (including "not found" for another tenant's account).
    #[error(transparent)]
    Account(#[from] AccountError),
    /// The transfer refused the command (including "not found").
    #[error(transparent)]
    Transfer(#[from] TransferError),
    /// The stream is not at the version the command was decided for, after every retry.
    #[error("version conflict")]
    Conflict { current_version: Option<u64> },
    #[error("idempotency key reused with a different request")]
    IdempotencyKeyReused,
    #[error("database unavailable: {0}")]
    Unavailable(#[source] Arc<sqlx::Error>),
    #[error(transparent)]
    Internal(#[from] anyhow::Error),
}

impl CommandError {
    /// The same failure for another command that shared the operation that failed (a group of
    /// commands on one stream).
    pub(crate) fn duplicate(&self) -> Self {
        match self {
            Self::Unavailable(err) => Self::Unavailable(err.clone()),
            other => Self::Internal(anyhow::anyhow!("{other:#}")),
        }
    }

    /// The outcome label of `ledger_commands_total`.
    pub(crate) fn outcome(&self) -> &'static str {
        match self {
            Self::Conflict { .. } => "conflict",
            Self::Unavailable(_) | Self::Internal(_) => "error",
            _ => "rejected",
        }
    }
}

impl From<sqlx::Error> for CommandError {
    fn from(err: sqlx::Error) -> Self {
        Arc::new(err).into()
    }
}

impl From<Arc<sqlx::Error>> for CommandError {
    fn from(err: Arc<sqlx::Error>) -> Self {
        if service_kit::db::is_outage(&err) {
            Self::Unavailable(err)
        } else {
            Self::Internal(err.into())
        }
    }
}

impl From<AppendError> for CommandError {
    fn from(err: AppendError) -> Self {
        match err {
            AppendError::Database(err) => err.into(),
            other => Self::Internal(other.into()),
        }
    }
}

impl From<LoadError> for CommandError {
    fn from(err: LoadError) -> Self {
        match err {
            LoadError::Database(err) => err.into(),
            other => Self::Internal(other.into()),
        }
    }
}
