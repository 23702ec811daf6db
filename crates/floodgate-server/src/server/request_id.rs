//! A request id on every request: an incoming `X-Request-Id` is kept when it is 1-128 visible
//! ASCII characters, otherwise one is generated. It is echoed in the response's `X-Request-Id`
//! and recorded on a `request` span, so every log line written while serving the request
//! carries it (`span.request_id` in JSON logs); with the access log on, one line per request
//! (target `floodgate::access`) gives method, path, status and duration.

use std::hash::{BuildHasher, RandomState};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Instant;

use axum::extract::{Request, State};
use axum::http::HeaderValue;
use axum::middleware::Next;
use axum::response::Response;
use floodgate::Store;
use tracing::Instrument;

use super::AppState;

/// The header carrying the id both ways.
pub const REQUEST_ID_HEADER: &str = "x-request-id";

/// Longest id accepted from a client (the same bound as an acquire's `request_id`).
const MAX_LEN: usize = 128;

/// Whether a client's id can be used as is: 1-128 visible ASCII characters, so it cannot break
/// a log line or a header.
pub(crate) fn valid(id: &str) -> bool {
    !id.is_empty() && id.len() <= MAX_LEN && id.bytes().all(|b| b.is_ascii_graphic())
}

/// A new id: 16 hex digits, a counter hashed with this process's random keys, so ids are
/// unique within a process and unlikely to collide across servers without a dependency.
pub(crate) fn generate() -> String {
    static KEYS: OnceLock<RandomState> = OnceLock::new();
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    format!("{:016x}", KEYS.get_or_init(RandomState::new).hash_one(n))
}

pub(super) async fn request_id<S: Store>(
    State(state): State<Arc<AppState<S>>>,
    request: Request,
    next: Next,
) -> Response {
    let id = request
        .headers()
        .get(REQUEST_ID_HEADER)
        .and_then(|v| v.to_str().ok())
        .filter(|v| valid(v))
        .map_or_else(generate, str::to_owned);
    let method = request.method().clone();
    let path = request.uri().path().to_owned();
    // At ERROR level so the span is enabled whenever any line is: under `RUST_LOG=warn` the
    // warnings of a request still carry its id.
    let span = tracing::error_span!("request", request_id = %id);
    let started = Instant::now();
    let mut response = next.run(request).instrument(span.clone()).await;
    if let Ok(value) = HeaderValue::from_str(&id) {
        response.headers_mut().insert(REQUEST_ID_HEADER, value);
    }
    if state.options.access_log {
        let status = response.status().as_u16();
        let duration_ms = started.elapsed().as_secs_f64() * 1000.0;
        span.in_scope(|| {
            tracing::info!(
                target: "floodgate::access",
                request_id = %id,
                %method,
                path,
                status,
                duration_ms,
                "request"
            );
        });
    }
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_checked_and_generated_unique() {
        assert!(valid("abc-123"));
        assert!(!valid(""));
        assert!(!valid("has space"));
        assert!(!valid(&"x".repeat(129)));
        let a = generate();
        let b = generate();
        assert_ne!(a, b);
        assert!(valid(&a) && a.len() == 16);
    }
}
