//! The one shape of every error answer: `{"error": code, "message": text}` with a fitting status.

use std::time::Duration;

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use floodgate::{AcquireError, ExtendError, Refusal, StoreError};
use serde::Serialize;

/// An error answer. `code` is stable (clients match on it); `message` is for people and names
/// the field at fault where there is one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiError {
    /// HTTP status.
    pub status: StatusCode,
    /// Stable machine-readable code.
    pub code: &'static str,
    /// Human-readable explanation.
    pub message: String,
    /// For 429s: when to come back (sent as `Retry-After` and `retry_after_ms`).
    pub retry_after: Option<Duration>,
}

#[derive(Serialize)]
struct Body<'a> {
    error: &'a str,
    message: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    retry_after_ms: Option<u64>,
}

impl ApiError {
    /// An error without a retry hint.
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        ApiError {
            status,
            code,
            message: message.into(),
            retry_after: None,
        }
    }

    /// 400 naming the field at fault.
    pub fn bad_field(field: &str, message: impl std::fmt::Display) -> Self {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_request",
            format!("{field}: {message}"),
        )
    }

    pub(crate) fn unknown_limiter(name: &str) -> Self {
        ApiError::new(
            StatusCode::NOT_FOUND,
            "unknown_limiter",
            format!("no limiter is named {name:?}"),
        )
    }

    pub(crate) fn shutting_down() -> Self {
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "shutting_down",
            "the server is shutting down; retry against another instance",
        )
    }

    fn with_retry(mut self, retry_after: Duration) -> Self {
        self.retry_after = Some(retry_after);
        self
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let retry_ms = self
            .retry_after
            .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
        let body = Body {
            error: self.code,
            message: &self.message,
            retry_after_ms: retry_ms,
        };
        let mut response = (self.status, Json(body)).into_response();
        if let Some(ms) = retry_ms {
            // Retry-After is in whole seconds; round up so a client never comes back early.
            let secs = ms.div_ceil(1000).max(1);
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        if self.status == StatusCode::REQUEST_TIMEOUT
            || self.status == StatusCode::PAYLOAD_TOO_LARGE
        {
            // The rest of the body may still be on its way: close rather than read it.
            response
                .headers_mut()
                .insert(header::CONNECTION, HeaderValue::from_static("close"));
        }
        if self.status == StatusCode::UNAUTHORIZED {
            response
                .headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        response
    }
}

/// 429 `too_many_keys`: a new key beyond a keyed limiter's `max_keys` (an acquire's or a
/// schedule's), with the hint.
fn too_many_keys(max_keys: u32, retry_after: std::time::Duration) -> ApiError {
    ApiError::new(
        StatusCode::TOO_MANY_REQUESTS,
        "too_many_keys",
        format!(
            "key: this keyed limiter already tracks its max_keys ({max_keys}) keys and this is \
             a new one; retry after the hint, when idle keys have dropped out"
        ),
    )
    .with_retry(retry_after)
}

/// 503 `store_unavailable` for an error this server does not know (a newer library's).
fn unavailable(e: impl std::fmt::Display) -> ApiError {
    ApiError::new(
        StatusCode::SERVICE_UNAVAILABLE,
        "store_unavailable",
        e.to_string(),
    )
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::UnknownLimiter(name) => ApiError::unknown_limiter(name.as_str()),
            StoreError::BadName(e) => ApiError::bad_field("name", e),
            StoreError::Invalid(f) => ApiError::bad_field(f.field, f.message),
            StoreError::TooManyLimiters(max) => ApiError::new(
                StatusCode::CONFLICT,
                "too_many_limiters",
                format!("the server already holds its maximum of {max} limiters"),
            ),
            StoreError::Unavailable(u) => ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "store_unavailable",
                u.message(),
            ),
            StoreError::TooManyKeys {
                max_keys,
                retry_after,
            } => too_many_keys(max_keys, retry_after),
            // A failure of a newer library (the enums are non-exhaustive): the operation could
            // not be carried out, which is what 503 says.
            other => unavailable(other),
        }
    }
}

impl From<AcquireError> for ApiError {
    fn from(e: AcquireError) -> Self {
        match e {
            AcquireError::Refused(Refusal::WaitTimeout { retry_after }) => ApiError::new(
                StatusCode::TOO_MANY_REQUESTS,
                "wait_timeout",
                "no permit was free within the wait; re-enqueue the work and retry after the hint",
            )
            .with_retry(retry_after),
            AcquireError::Refused(Refusal::QueueFull { retry_after }) => ApiError::new(
                StatusCode::TOO_MANY_REQUESTS,
                "queue_full",
                "the limiter's wait queue is full; retry after the hint",
            )
            .with_retry(retry_after),
            AcquireError::Refused(Refusal::PermitsExceedLimit { requested, limit }) => {
                ApiError::new(
                    StatusCode::BAD_REQUEST,
                    "permits_exceed_limit",
                    format!(
                        "permits: asked for {requested} but at most {limit} can ever be granted \
                         at once (the smallest of the limiter's concurrency, its rate burst and, \
                         for a keyed limiter, the key's limit)"
                    ),
                )
            }
            AcquireError::Refused(Refusal::LimiterDeleted) => ApiError::new(
                StatusCode::NOT_FOUND,
                "unknown_limiter",
                "the limiter was deleted while the acquire waited",
            ),
            AcquireError::Refused(Refusal::Invalid(f)) => ApiError::bad_field(f.field, f.message),
            AcquireError::Refused(Refusal::TooManyKeys {
                max_keys,
                retry_after,
            }) => too_many_keys(max_keys, retry_after),
            AcquireError::Store(e) => e.into(),
            AcquireError::Superseded => ApiError::new(
                StatusCode::CONFLICT,
                "superseded",
                "request_id: a repeat with the same request_id took this wait over while it \
                 waited; that repeat gets the wait's outcome (send one attempt at a time)",
            ),
            other => unavailable(other),
        }
    }
}

impl From<ExtendError> for ApiError {
    fn from(e: ExtendError) -> Self {
        match e {
            ExtendError::Lost => ApiError::new(
                StatusCode::GONE,
                "permit_lost",
                "the permit expired or was released; it is not revived",
            ),
            ExtendError::Invalid(f) => ApiError::bad_field(f.field, f.message),
            ExtendError::Store(e) => e.into(),
            other => unavailable(other),
        }
    }
}
