//! Extractors whose rejections are [`ApiError`]s, so every malformed request gets the same
//! problem+json as every other error.

use axum::extract::{FromRequest, FromRequestParts, MatchedPath, Request};
use axum::http::header;
use axum::http::request::Parts;
use bytes::Bytes;
use domain::AccountError;
use serde::de::DeserializeOwned;
use service_kit::auth::{RequiredRoles, Role};
use service_kit::http::{PathId, PathResource, RequestId};

use crate::AppState;
use crate::error::ApiError;

/// The longest accepted `Idempotency-Key`, `X-Correlation-Id` or `traceparent`.
const MAX_HEADER_CHARS: usize = 255;

/// Middleware: a request whose `Content-Length` is over `max` bytes is answered 413 before its
/// body is read, so the client learns it at once instead of uploading it to a closed
/// connection. Bodies without a declared length are still cut at `max` as they are read.
pub(crate) async fn refuse_declared_oversize(
    max: usize,
    request: Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    let declared = request
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.parse::<u64>().ok());
    if declared.is_some_and(|length| length > max as u64) {
        return axum::response::IntoResponse::into_response(ApiError::PayloadTooLarge);
    }
    next.run(request).await
}

/// A JSON body. Malformed JSON, unknown or missing fields and wrong types are told apart.
pub(crate) struct AppJson<T>(pub(crate) T);

impl<T: DeserializeOwned> FromRequest<AppState> for AppJson<T> {
    type Rejection = ApiError;

    async fn from_request(request: Request, state: &AppState) -> Result<Self, Self::Rejection> {
        let is_json = request
            .headers()
            .get(header::CONTENT_TYPE)
            .and_then(|value| value.to_str().ok())
            .and_then(|value| value.split(';').next())
            .map(|mime| {
                let mime = mime.trim();
                mime.eq_ignore_ascii_case("application/json")
                    || (mime.starts_with("application/") && mime.ends_with("+json"))
            })
            .unwrap_or(false);
        if !is_json {
            return Err(ApiError::UnsupportedMediaType);
        }
        let body = Bytes::from_request(request, state)
            .await
            .map_err(|rejection| {
                if rejection.status() == axum::http::StatusCode::PAYLOAD_TOO_LARGE {
                    ApiError::PayloadTooLarge
                } else {
                    ApiError::MalformedJson("the body could not be read".into())
                }
            })?;
        serde_json::from_slice(&body).map(AppJson).map_err(classify)
    }
}

fn classify(err: serde_json::Error) -> ApiError {
    use serde_json::error::Category;
    let message = err.to_string();
    match err.classify() {
        Category::Syntax | Category::Eof | Category::Io => ApiError::MalformedJson(message),
        Category::Data if message.starts_with("unknown field") => ApiError::UnknownField(message),
        Category::Data if message.starts_with("missing field") => ApiError::MissingField(message),
        // Which of the two values was meant is anyone's guess: the JSON is ambiguous.
        Category::Data if message.starts_with("duplicate field") => {
            ApiError::MalformedJson(message)
        }
        Category::Data => ApiError::WrongType(message),
    }
}

/// Role `teller`: every command needs it (`Authorized<Teller>`).
pub(crate) enum Teller {}

impl RequiredRoles for Teller {
    const ROLES: &'static [Role] = &[Role::Teller];
}

/// An account named in the path; anything but a UUID names none: 404.
pub(crate) enum Account {}

impl PathResource for Account {
    type Rejection = ApiError;

    fn not_found() -> ApiError {
        AccountError::NotFound.into()
    }
}

/// The `{id}` of an account path.
pub(crate) type AccountId = PathId<Account>;

/// The headers a command reads besides authentication, and its route.
#[derive(Debug, Clone)]
pub(crate) struct CommandHeaders {
    /// The method and the route's template, e.g. `POST /v1/accounts/{id}/deposits`.
    pub(crate) route: String,
    pub(crate) request_id: String,
    /// `If-Match: "<version>"`; `*` or absent means any version.
    pub(crate) if_match: Option<u64>,
    pub(crate) idempotency_key: Option<String>,
    /// `X-Correlation-Id`, defaulting to the request id.
    pub(crate) correlation_id: String,
    /// W3C `traceparent`, carried into event metadata when well-formed.
    pub(crate) traceparent: Option<String>,
}

impl<S: Send + Sync> FromRequestParts<S> for CommandHeaders {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        let Ok(RequestId(request_id)) = RequestId::from_request_parts(parts, state).await;
        let template = parts
            .extensions
            .get::<MatchedPath>()
            .map_or_else(|| parts.uri.path(), MatchedPath::as_str);
        let route = format!("{} {template}", parts.method);
        let text = |name: &str, header: &'static str| -> Result<Option<String>, ApiError> {
            match parts.headers.get(name) {
                None => Ok(None),
                Some(value) => {
                    let value = value.to_str().ok().map(str::trim).filter(|value| {
                        !value.is_empty()
                            && value.len() <= MAX_HEADER_CHARS
                            && value.bytes().all(|b| b.is_ascii_graphic() || b == b' ')
                    });
                    match value {
                        Some(value) => Ok(Some(value.to_owned())),
                        None => Err(ApiError::InvalidHeader {
                            header,
                            reason: "must be 1 to 255 printable ASCII characters",
                        }),
                    }
                }
            }
        };
        let if_match = match text("if-match", "If-Match")?.as_deref() {
            None | Some("*") => None,
            Some(value) => Some(parse_etag_version(value).ok_or(ApiError::InvalidHeader {
                header: "If-Match",
                reason: "expected a version in quotes, e.g. \"3\"",
            })?),
        };
        let idempotency_key = text("idempotency-key", "Idempotency-Key")?;
        let correlation_id =
            text("x-correlation-id", "X-Correlation-Id")?.unwrap_or_else(|| request_id.clone());
        // Exporting traces, the events carry this request's span, a child of the caller's;
        // otherwise the caller's own traceparent, so their trace still reaches the events.
        let traceparent = match service_kit::telemetry::current_traceparent() {
            Some(ours) => Some(ours),
            None => text("traceparent", "traceparent")?.filter(|value| is_traceparent(value)),
        };
        Ok(Self {
            route,
            request_id,
            if_match,
            idempotency_key,
            correlation_id,
            traceparent,
        })
    }
}

fn parse_etag_version(value: &str) -> Option<u64> {
    value.strip_prefix('"')?.strip_suffix('"')?.parse().ok()
}

/// `00-<32 hex>-<16 hex>-<2 hex>`.
fn is_traceparent(value: &str) -> bool {
    let parts: Vec<&str> = value.split('-').collect();
    parts.len() == 4
        && [2, 32, 16, 2]
            .iter()
            .zip(&parts)
            .all(|(len, part)| part.len() == *len && part.bytes().all(|b| b.is_ascii_hexdigit()))
}

#[cfg(test)]
mod tests {
    use axum::body::Body;
    use axum::http::{Request, StatusCode};

    use super::*;
    use crate::testing::{Answer, send, teller};

    /// Any account: the extractors refuse before the engine would look it up.
    const DEPOSITS: &str = "/v1/accounts/0193a3f2-7c4e-7000-8000-000000000001/deposits";

    async fn deposit(body: &str, headers: &[(&str, &str)]) -> Answer {
        let mut request = teller(DEPOSITS);
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        send(request.body(Body::from(body.to_owned())).unwrap()).await
    }

    const VALID: &str = r#"{"amount":5,"currency":"EUR"}"#;

    #[tokio::test]
    async fn each_kind_of_bad_body_has_its_own_type() {
        let deep = format!("{}{}", "[".repeat(5000), "]".repeat(5000));
        let cases: &[(&str, &str)] = &[
            (r#"{"amount": 5, "#, "malformed-json"),
            ("not json", "malformed-json"),
            ("", "malformed-json"),
            // Which of the two was meant is anyone's guess.
            (
                r#"{"amount":5,"amount":6,"currency":"EUR"}"#,
                "malformed-json",
            ),
            (
                r#"{"amount":5,"currency":"EUR","memo":"x"}"#,
                "unknown-field",
            ),
            (r#"{"amount":5}"#, "missing-field"),
            (r#"{"amount":"5","currency":"EUR"}"#, "wrong-type"),
            (r#"{"amount":1.5,"currency":"EUR"}"#, "wrong-type"),
            (&deep, "wrong-type"),
        ];
        for (body, expected) in cases {
            let answer = deposit(body, &[]).await;
            assert_eq!(answer.status, StatusCode::BAD_REQUEST, "{body:.40}");
            assert_eq!(answer.problem(), *expected, "{body:.40}");
        }
    }

    #[tokio::test]
    async fn only_json_is_read() {
        for content_type in [None, Some("text/plain"), Some("application/xml")] {
            let mut request = Request::post(DEPOSITS).header(
                "authorization",
                format!(
                    "Bearer {}",
                    service_kit::testing::token(crate::testing::TENANT, &["teller"])
                ),
            );
            if let Some(content_type) = content_type {
                request = request.header("content-type", content_type);
            }
            let answer = send(request.body(Body::from(VALID)).unwrap()).await;
            assert_eq!(answer.status, StatusCode::UNSUPPORTED_MEDIA_TYPE);
            assert_eq!(answer.problem(), "unsupported-media-type");
        }
        // A `+json` type with parameters is JSON: the command goes on to the engine, whose
        // database this app cannot reach.
        let answer = send(
            teller(DEPOSITS)
                .header("content-type", "application/vnd.ledger+json; charset=utf-8")
                .body(Body::from(VALID))
                .unwrap(),
        )
        .await;
        assert_eq!(answer.problem(), "service-unavailable");
    }

    #[tokio::test]
    async fn malformed_headers_are_refused_and_named() {
        let long = "k".repeat(MAX_HEADER_CHARS + 1);
        let cases: &[(&str, &str, &str)] = &[
            ("if-match", "3", "If-Match"),
            ("if-match", "\"x\"", "If-Match"),
            ("if-match", "W/\"3\"", "If-Match"),
            ("idempotency-key", "", "Idempotency-Key"),
            ("idempotency-key", "   ", "Idempotency-Key"),
            ("idempotency-key", &long, "Idempotency-Key"),
            ("x-correlation-id", "tab\there", "X-Correlation-Id"),
        ];
        for (name, value, header) in cases {
            let answer = deposit(VALID, &[(name, value)]).await;
            assert_eq!(answer.status, StatusCode::BAD_REQUEST, "{name}: {value}");
            assert_eq!(answer.problem(), "invalid-header", "{name}: {value}");
            assert_eq!(answer.body["header"], *header);
        }
        // Any version, a key at the bound and a malformed traceparent (ignored) pass on.
        let longest = "k".repeat(MAX_HEADER_CHARS);
        let answer = deposit(
            VALID,
            &[
                ("if-match", "*"),
                ("idempotency-key", &longest),
                ("traceparent", "00-not-a-trace-01"),
            ],
        )
        .await;
        assert_eq!(answer.problem(), "service-unavailable");
    }

    #[tokio::test]
    async fn a_path_that_names_no_account_is_404() {
        let answer = send(
            teller("/v1/accounts/not-a-uuid/deposits")
                .body(Body::from(VALID))
                .unwrap(),
        )
        .await;
        assert_eq!(answer.status, StatusCode::NOT_FOUND);
        assert_eq!(answer.problem(), "not-found");
    }

    #[tokio::test]
    async fn the_token_and_its_role_come_first() {
        let anonymous = send(
            Request::post(DEPOSITS)
                .header("content-type", "application/json")
                .body(Body::from("not even json"))
                .unwrap(),
        )
        .await;
        assert_eq!(anonymous.status, StatusCode::UNAUTHORIZED);
        assert_eq!(anonymous.problem(), "missing-token");
        assert_eq!(anonymous.headers["www-authenticate"], "Bearer");

        let viewer = send(
            Request::post(DEPOSITS)
                .header(
                    "authorization",
                    format!(
                        "Bearer {}",
                        service_kit::testing::token(crate::testing::TENANT, &["viewer"])
                    ),
                )
                .header("content-type", "application/json")
                .body(Body::from(VALID))
                .unwrap(),
        )
        .await;
        assert_eq!(viewer.status, StatusCode::FORBIDDEN);
        assert_eq!(viewer.problem(), "forbidden");
    }

    #[tokio::test]
    async fn a_body_over_the_limit_is_413_declared_or_not() {
        let limit = crate::config::COMMAND_API_MAX_BODY_BYTES.default;
        let declared = send(
            teller(DEPOSITS)
                .header("content-length", (limit + 1).to_string())
                .body(Body::empty())
                .unwrap(),
        )
        .await;
        assert_eq!(declared.status, StatusCode::PAYLOAD_TOO_LARGE);
        assert_eq!(declared.problem(), "payload-too-large");

        // No declared length: cut while it is read.
        let padded = format!(
            r#"{{"amount":1,"currency":"EUR","pad":"{}"}}"#,
            "x".repeat(limit)
        );
        let chunks = futures::stream::iter([Ok::<_, std::io::Error>(padded)]);
        let streamed = send(teller(DEPOSITS).body(Body::from_stream(chunks)).unwrap()).await;
        assert_eq!(streamed.status, StatusCode::PAYLOAD_TOO_LARGE);
        assert_eq!(streamed.problem(), "payload-too-large");
    }

    #[test]
    fn etag_versions() {
        assert_eq!(parse_etag_version("\"3\""), Some(3));
        assert_eq!(parse_etag_version("3"), None);
        assert_eq!(parse_etag_version("W/\"3\""), None);
        assert_eq!(parse_etag_version("\"-1\""), None);
    }

    #[test]
    fn traceparents() {
        assert!(is_traceparent(
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
        ));
        assert!(!is_traceparent("00-xyz-00f067aa0ba902b7-01"));
    }
}
