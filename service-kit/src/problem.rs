//! RFC 9457 problem details: the one shape every error response of every service has.

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use serde_json::{Map, Value};

/// The media type of every error body.
pub const PROBLEM_JSON: &str = "application/problem+json";

/// A problem details object. `type` is a stable URN per kind of error, so clients can branch
/// on it; `detail` is written for a person and never carries internal error text.
#[derive(Debug, Clone, Serialize)]
pub struct Problem {
    #[serde(rename = "type")]
    pub problem_type: String,
    pub title: &'static str,
    #[serde(serialize_with = "serialize_status")]
    pub status: StatusCode,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
    /// Extension members, flattened into the object.
    #[serde(flatten)]
    pub extensions: Map<String, Value>,
    #[serde(skip)]
    headers: Vec<(header::HeaderName, HeaderValue)>,
}

fn serialize_status<S: serde::Serializer>(status: &StatusCode, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_u16(status.as_u16())
}

/// The `type` URN of a problem kind, e.g. `urn:ledger:problem:insufficient-funds`.
pub fn problem_type(slug: &str) -> String {
    format!("urn:ledger:problem:{slug}")
}

impl Problem {
    pub fn new(status: StatusCode, slug: &str, title: &'static str) -> Self {
        Self {
            problem_type: problem_type(slug),
            title,
            status,
            detail: None,
            extensions: Map::new(),
            headers: Vec::new(),
        }
    }

    #[must_use]
    pub fn detail(mut self, detail: impl Into<String>) -> Self {
        self.detail = Some(detail.into());
        self
    }

    #[must_use]
    pub fn extension(mut self, key: &str, value: impl Into<Value>) -> Self {
        self.extensions.insert(key.to_owned(), value.into());
        self
    }

    #[must_use]
    pub fn header(mut self, name: header::HeaderName, value: HeaderValue) -> Self {
        self.headers.push((name, value));
        self
    }

    /// 500 with nothing about the cause: the caller logs the cause.
    pub fn internal() -> Self {
        Self::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            "Internal server error",
        )
        .detail("The server failed to handle the request; it has been logged.")
    }

    /// 503 for a dependency that is down; clients may retry.
    pub fn unavailable(what: &str) -> Self {
        Self::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "service-unavailable",
            "Service unavailable",
        )
        .detail(format!("{what} is unavailable; retry later."))
        .header(header::RETRY_AFTER, HeaderValue::from_static("1"))
    }
}

impl IntoResponse for Problem {
    fn into_response(self) -> Response {
        let body = serde_json::to_vec(&self).unwrap_or_default();
        let mut response = (self.status, body).into_response();
        let headers = response.headers_mut();
        headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(PROBLEM_JSON));
        for (name, value) in self.headers {
            headers.insert(name, value);
        }
        response
    }
}

/// The schema of [`Problem`] for OpenAPI documents.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct ProblemDocument {
    /// Stable URN per error kind, e.g. `urn:ledger:problem:insufficient-funds`.
    pub r#type: String,
    pub title: String,
    pub status: u16,
    pub detail: Option<String>,
}

/// Adds the `bearer` (JWT) security scheme to an OpenAPI document.
pub struct BearerAuth;

impl utoipa::Modify for BearerAuth {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .bearer_format("JWT")
                    .build(),
            ),
        );
    }
}

/// Documents the per-tenant rate limit: a 429 problem with `Retry-After` on every operation
/// that takes a token (the ones documenting a 401), since the limit is per tenant.
pub struct RateLimitedResponses;

impl utoipa::Modify for RateLimitedResponses {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        use utoipa::openapi::schema::{ObjectBuilder, Type};
        use utoipa::openapi::{ContentBuilder, HeaderBuilder, Ref, ResponseBuilder};
        let response = ResponseBuilder::new()
            .description("The tenant's request budget is spent (see `RATE_LIMIT_PER_TENANT`)")
            .content(
                PROBLEM_JSON,
                ContentBuilder::new()
                    .schema(Some(Ref::from_schema_name("ProblemDocument")))
                    .build(),
            )
            .header(
                "Retry-After",
                HeaderBuilder::new()
                    .schema(ObjectBuilder::new().schema_type(Type::Integer))
                    .description(Some("Seconds until a request will be accepted again"))
                    .build(),
            )
            .build();
        for item in openapi.paths.paths.values_mut() {
            for operation in [&mut item.get, &mut item.post].into_iter().flatten() {
                if operation.responses.responses.contains_key("401") {
                    operation
                        .responses
                        .responses
                        .insert("429".into(), response.clone().into());
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn serializes_as_rfc9457_with_extensions() {
        let problem = Problem::new(StatusCode::CONFLICT, "conflict", "Conflict")
            .detail("stale")
            .extension("current_version", 7);
        let json = serde_json::to_value(&problem).unwrap();
        assert_eq!(
            json,
            serde_json::json!({
                "type": "urn:ledger:problem:conflict",
                "title": "Conflict",
                "status": 409,
                "detail": "stale",
                "current_version": 7
            })
        );
    }

    #[test]
    fn response_has_problem_media_type() {
        let response = Problem::internal().into_response();
        assert_eq!(response.status(), StatusCode::INTERNAL_SERVER_ERROR);
        assert_eq!(response.headers()[header::CONTENT_TYPE], PROBLEM_JSON);
    }
}
