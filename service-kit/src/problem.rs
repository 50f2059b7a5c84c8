//! RFC 9457 problem details: the one shape every error response of every service has.

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use serde_json::{Map, Value};

use crate::auth::Role;

/// The media type of every error body.
pub const PROBLEM_JSON: &str = "application/problem+json";

const URN_PREFIX: &str = "urn:ledger:problem:";

/// Every kind of problem any service answers, the one list of them: its `type` URN's slug
/// (the variant's name in kebab case, e.g. `insufficient-funds`) and its status. README.md's
/// error table is checked against this list.
#[derive(Debug, Clone, Copy, PartialEq, Eq, strum::EnumIter, strum::IntoStaticStr)]
#[strum(serialize_all = "kebab-case")]
pub enum ProblemType {
    MalformedJson,
    UnknownField,
    MissingField,
    WrongType,
    InvalidHeader,
    /// The query API's: a query parameter, cursor or page size it does not take.
    InvalidQuery,
    MissingToken,
    InvalidToken,
    ExpiredToken,
    Forbidden,
    NotFound,
    /// The audit routes': no state at that version or instant.
    NoStateAt,
    MethodNotAllowed,
    Conflict,
    PayloadTooLarge,
    UnsupportedMediaType,
    AmountOutOfRange,
    OverdraftOutOfRange,
    UnsupportedCurrency,
    InvalidOwner,
    InvalidReference,
    SameAccount,
    IdempotencyKeyReused,
    InsufficientFunds,
    CurrencyMismatch,
    AccountFrozen,
    AccountNotFrozen,
    AccountClosed,
    NonZeroBalance,
    BalanceLimitExceeded,
    RateLimited,
    Internal,
    ServiceUnavailable,
    Overloaded,
    Timeout,
    /// The query API's: `min_version` not reached in time.
    NotYetVisible,
    /// The query API's GraphQL: a connection asked for more subscriptions than it may hold.
    TooManySubscriptions,
}

impl ProblemType {
    /// The slug of the `type` URN, e.g. `insufficient-funds`.
    pub fn slug(self) -> &'static str {
        self.into()
    }

    /// The `type` URN, e.g. `urn:ledger:problem:insufficient-funds`.
    pub fn urn(self) -> String {
        format!("{URN_PREFIX}{}", self.slug())
    }

    pub fn status(self) -> StatusCode {
        use ProblemType as P;
        match self {
            P::MalformedJson
            | P::UnknownField
            | P::MissingField
            | P::WrongType
            | P::InvalidHeader
            | P::InvalidQuery => StatusCode::BAD_REQUEST,
            P::MissingToken | P::InvalidToken | P::ExpiredToken => StatusCode::UNAUTHORIZED,
            P::Forbidden => StatusCode::FORBIDDEN,
            P::NotFound | P::NoStateAt => StatusCode::NOT_FOUND,
            P::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            P::Conflict => StatusCode::CONFLICT,
            P::PayloadTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            P::UnsupportedMediaType => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            P::AmountOutOfRange
            | P::OverdraftOutOfRange
            | P::UnsupportedCurrency
            | P::InvalidOwner
            | P::InvalidReference
            | P::SameAccount
            | P::IdempotencyKeyReused
            | P::InsufficientFunds
            | P::CurrencyMismatch
            | P::AccountFrozen
            | P::AccountNotFrozen
            | P::AccountClosed
            | P::NonZeroBalance
            | P::BalanceLimitExceeded => StatusCode::UNPROCESSABLE_ENTITY,
            P::RateLimited | P::TooManySubscriptions => StatusCode::TOO_MANY_REQUESTS,
            P::Internal => StatusCode::INTERNAL_SERVER_ERROR,
            P::ServiceUnavailable | P::Overloaded | P::Timeout | P::NotYetVisible => {
                StatusCode::SERVICE_UNAVAILABLE
            }
        }
    }
}

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

impl Problem {
    /// The slug of its type, e.g. `insufficient-funds`: what GraphQL errors carry as
    /// `extensions.code`.
    pub fn code(&self) -> &str {
        self.problem_type
            .strip_prefix(URN_PREFIX)
            .unwrap_or(&self.problem_type)
    }

    pub fn new(kind: ProblemType, title: &'static str) -> Self {
        Self {
            problem_type: kind.urn(),
            title,
            status: kind.status(),
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
        Self::new(ProblemType::Internal, "Internal server error")
            .detail("The server failed to handle the request; it has been logged.")
    }

    /// 503 for a dependency that is down; clients may retry.
    pub fn unavailable(what: &str) -> Self {
        Self::new(ProblemType::ServiceUnavailable, "Service unavailable")
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

/// Swagger UI at `/docs` over `openapi`, which it serves at `/openapi.json`. With an OpenID
/// Connect provider and [`crate::auth::oidc::OIDC_SWAGGER_CLIENT_ID`], people sign in there
/// with the provider (authorization code with PKCE, the endpoints from its discovery
/// document): every operation that takes a bearer token also takes the provider's.
pub fn swagger_ui(
    mut openapi: utoipa::openapi::OpenApi,
    auth: &crate::auth::AuthConfig,
) -> utoipa_swagger_ui::SwaggerUi {
    use utoipa::openapi::security::{OpenIdConnect, SecurityRequirement, SecurityScheme};

    let ui = utoipa_swagger_ui::SwaggerUi::new("/docs");
    let crate::auth::VerificationKey::Oidc(oidc) = &auth.key else {
        return ui.url("/openapi.json", openapi);
    };
    let Some(client_id) = &oidc.swagger_client_id else {
        return ui.url("/openapi.json", openapi);
    };
    openapi
        .components
        .get_or_insert_with(Default::default)
        .add_security_scheme(
            "oidc",
            SecurityScheme::OpenIdConnect(OpenIdConnect::new(oidc.discovery_url())),
        );
    for item in openapi.paths.paths.values_mut() {
        for operation in [&mut item.get, &mut item.post].into_iter().flatten() {
            if let Some(security) = operation.security.as_mut().filter(|s| !s.is_empty()) {
                security.push(SecurityRequirement::new("oidc", ["openid"]));
            }
        }
    }
    ui.url("/openapi.json", openapi).oauth(
        utoipa_swagger_ui::oauth::Config::new()
            .client_id(client_id)
            .scopes(vec!["openid".into()])
            .use_pkce_with_authorization_code_grant(true),
    )
}

/// The problems every operation that takes a token shares, added to the OpenAPI document so
/// that each `#[utoipa::path]` lists only its own: 401, 403 (the roles of the operation's
/// tag), 429 with `Retry-After` (the per-tenant rate limit) and 503 (database unavailable);
/// on every POST also 400 (malformed body or header), 413 and 415. An operation that documents
/// one of these itself keeps its own description. GET and POST are the only methods the APIs
/// serve, and the only ones looked at.
pub struct StandardProblems {
    /// The roles each tag's operations need (any one of them): their
    /// [`crate::auth::RequiredRoles::ROLES`].
    pub roles: &'static [(&'static str, &'static [Role])],
}

impl utoipa::Modify for StandardProblems {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        for item in openapi.paths.paths.values_mut() {
            for (post, operation) in [(false, &mut item.get), (true, &mut item.post)] {
                let Some(operation) = operation else { continue };
                if operation.security.as_ref().is_none_or(Vec::is_empty) {
                    continue;
                }
                let mut standard = vec![
                    ("401", problem("Missing, invalid or expired token")),
                    ("429", rate_limited()),
                    ("503", problem("Database unavailable")),
                ];
                let roles = operation.tags.iter().flatten().find_map(|tag| {
                    self.roles
                        .iter()
                        .find(|(name, _)| name == tag)
                        .map(|(_, roles)| roles)
                });
                if let Some(roles) = roles {
                    let names: Vec<String> = roles
                        .iter()
                        .map(|role| format!("`{}`", role.as_str()))
                        .collect();
                    standard.push((
                        "403",
                        problem(&format!("Role {} required", names.join(" or "))),
                    ));
                }
                if post {
                    standard.extend([
                        ("400", problem("Malformed body or header")),
                        ("413", problem("Body too large")),
                        ("415", problem("Body is not JSON")),
                    ]);
                }
                for (status, response) in standard {
                    operation
                        .responses
                        .responses
                        .entry(status.to_owned())
                        .or_insert_with(|| response.build().into());
                }
            }
        }
    }
}

/// A problem+json response described as `description`.
fn problem(description: &str) -> utoipa::openapi::ResponseBuilder {
    use utoipa::openapi::{ContentBuilder, Ref, ResponseBuilder};
    ResponseBuilder::new().description(description).content(
        PROBLEM_JSON,
        ContentBuilder::new()
            .schema(Some(Ref::from_schema_name("ProblemDocument")))
            .build(),
    )
}

/// 429: the tenant's budget is spent; `Retry-After` says when to try again.
fn rate_limited() -> utoipa::openapi::ResponseBuilder {
    use utoipa::openapi::HeaderBuilder;
    use utoipa::openapi::schema::{ObjectBuilder, Type};
    problem("The tenant's request budget is spent (see `RATE_LIMIT_PER_TENANT`)").header(
        "Retry-After",
        HeaderBuilder::new()
            .schema(ObjectBuilder::new().schema_type(Type::Integer))
            .description(Some("Seconds until a request will be accepted again"))
            .build(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn serializes_as_rfc9457_with_extensions() {
        let problem = Problem::new(ProblemType::Conflict, "Conflict")
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

    /// README.md's error table lists exactly the problem types, each under its status: a
    /// client reading it learns every `type` it can get, and none it cannot.
    #[test]
    fn the_readme_lists_every_problem_type_under_its_status() {
        use std::collections::BTreeSet;

        use strum::IntoEnumIterator;

        let readme = include_str!("../../README.md");
        let table = readme
            .split("| status | `type` (`urn:ledger:problem:...`) |\n")
            .nth(1)
            .expect("README.md has the error table");
        let mut listed = BTreeSet::new();
        for row in table.lines().skip(1).take_while(|row| row.starts_with('|')) {
            let mut cells = row.split('|').skip(1);
            let status: u16 = cells.next().unwrap_or_default().trim().parse().unwrap();
            // Slugs are the code spans in kebab case; the others name headers and settings.
            let slugs = cells
                .next()
                .unwrap_or_default()
                .split('`')
                .skip(1)
                .step_by(2);
            for slug in
                slugs.filter(|span| span.chars().all(|c| c.is_ascii_lowercase() || c == '-'))
            {
                listed.insert((status, slug.to_owned()));
            }
        }
        let defined: BTreeSet<(u16, String)> = ProblemType::iter()
            .map(|kind| (kind.status().as_u16(), kind.slug().to_owned()))
            .collect();
        assert_eq!(
            listed.difference(&defined).collect::<Vec<_>>(),
            Vec::<&(u16, String)>::new(),
            "in README.md's error table, not among the ProblemTypes"
        );
        assert_eq!(
            defined.difference(&listed).collect::<Vec<_>>(),
            Vec::<&(u16, String)>::new(),
            "ProblemTypes missing from README.md's error table"
        );
    }

    #[test]
    fn response_has_problem_media_type() {
        let response = Problem::internal().into_response();
        assert_eq!(response.status(), StatusCode::INTERNAL_SERVER_ERROR);
        assert_eq!(response.headers()[header::CONTENT_TYPE], PROBLEM_JSON);
    }
}
