//! A stream's stored events and what their metadata says about who did what.

use serde::{Deserialize, Serialize};
use service_kit::event_log::{EVENT_COLUMNS, LoggedEvent};
use sqlx::PgConnection;

/// The tenant a stream belongs to, from its earliest stored event; `None` if the stream does
/// not exist.
pub async fn stream_tenant(
    connection: &mut PgConnection,
    aggregate_type: &str,
    aggregate_id: &str,
) -> Result<Option<String>, sqlx::Error> {
    let tenant: Option<Option<String>> = sqlx::query_scalar(
        "SELECT tenant FROM events
          WHERE aggregate_type = $1 AND aggregate_id = $2
          ORDER BY sequence LIMIT 1",
    )
    .bind(aggregate_type)
    .bind(aggregate_id)
    .fetch_optional(connection)
    .await?;
    Ok(tenant.flatten())
}

/// Up to `limit` events of a stream from version `from_version` on, in version order.
pub async fn stream_events(
    connection: &mut PgConnection,
    aggregate_type: &str,
    aggregate_id: &str,
    from_version: i64,
    limit: i64,
) -> Result<Vec<LoggedEvent>, sqlx::Error> {
    sqlx::query_as(&format!(
        "SELECT {EVENT_COLUMNS} FROM events
          WHERE aggregate_type = $1 AND aggregate_id = $2 AND sequence >= $3
          ORDER BY sequence LIMIT $4"
    ))
    .bind(aggregate_type)
    .bind(aggregate_id)
    .bind(from_version)
    .bind(limit)
    .fetch_all(connection)
    .await
}

/// Who caused an event and in which request, as recorded in its metadata.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct EventMetadata {
    #[serde(default)]
    pub tenant: String,
    /// The token subject that issued the command.
    pub actor: Option<String>,
    pub correlation_id: Option<String>,
    pub causation_id: Option<String>,
    pub request_id: Option<String>,
    pub idempotency_key: Option<String>,
    pub traceparent: Option<String>,
}

impl EventMetadata {
    /// Reads an event's metadata; fields it lacks (or unreadable metadata, which the hash
    /// chain would flag) are left empty rather than hiding the event.
    pub fn of(event: &LoggedEvent) -> Self {
        serde_json::from_str(&event.metadata).unwrap_or_default()
    }
}
