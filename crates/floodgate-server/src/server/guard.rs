//! Checks on a request's head, made before any handler reads the body: the media type of a body
//! (so a web page cannot post to the API without a CORS preflight) and a declared body length
//! above the limit (refused at once, before the body is read).

use axum::extract::Request;
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use super::error::ApiError;

/// Whether the request says it carries a body: a `Content-Length` above zero, or any
/// `Transfer-Encoding` (a chunked body may still turn out empty, but it was sent as one).
fn has_body(headers: &HeaderMap) -> bool {
    if headers.contains_key(header::TRANSFER_ENCODING) {
        return true;
    }
    headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok())
        .is_some_and(|n| n > 0)
}

/// `application/json`, with or without parameters (`; charset=utf-8`), in any letter case.
fn is_json(value: &HeaderValue) -> bool {
    let Ok(text) = value.to_str() else {
        return false;
    };
    let essence = text.split(';').next().unwrap_or("").trim();
    essence.eq_ignore_ascii_case("application/json")
}

/// POST and PUT on `/v1` need `Content-Type: application/json`: browsers send that type
/// cross-origin only after a CORS preflight, which this server never approves (it sends no CORS
/// headers). The one exception is a release without a body, which clients send bare and which a
/// page cannot aim without knowing a live permit's id.
pub(super) async fn require_json(request: Request, next: Next) -> Response {
    let method = request.method();
    if method != Method::POST && method != Method::PUT {
        return next.run(request).await;
    }
    let headers = request.headers();
    let json = headers.get(header::CONTENT_TYPE).is_some_and(is_json);
    let bare_release = request.uri().path().ends_with("/release")
        && !has_body(headers)
        && !headers.contains_key(header::CONTENT_TYPE);
    if json || bare_release {
        return next.run(request).await;
    }
    let shown = headers
        .get(header::CONTENT_TYPE)
        .map_or("none".to_owned(), |v| {
            format!("{:?}", String::from_utf8_lossy(v.as_bytes()))
        });
    ApiError::new(
        StatusCode::UNSUPPORTED_MEDIA_TYPE,
        "unsupported_media_type",
        format!("content-type: must be application/json (got {shown})"),
    )
    .into_response()
}

/// Refuses a declared `Content-Length` above `max` with 413 before anything reads the body,
/// and closes the connection rather than draining a body nobody wants.
pub(super) async fn refuse_declared_oversize(max: usize, request: Request, next: Next) -> Response {
    let declared = request
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok());
    match declared {
        Some(n) if n > u64::try_from(max).unwrap_or(u64::MAX) => {
            // (413 answers close the connection: see `ApiError::into_response`.)
            ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "payload_too_large",
                format!("the request body declares {n} bytes; the server's limit is {max}"),
            )
            .into_response()
        }
        _ => next.run(request).await,
    }
}

#[cfg(test)]
mod tests {
    use super::is_json;
    use axum::http::HeaderValue;

    #[test]
    fn json_media_types() {
        for ok in [
            "application/json",
            "Application/JSON",
            "application/json; charset=utf-8",
        ] {
            assert!(is_json(&HeaderValue::from_static(ok)), "{ok}");
        }
        for bad in [
            "text/plain",
            "application/x-www-form-urlencoded",
            "application/jsonx",
            "multipart/form-data",
        ] {
            assert!(!is_json(&HeaderValue::from_static(bad)), "{bad}");
        }
    }
}
