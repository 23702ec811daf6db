//! Request bodies: JSON parsed with the path of the field at fault in every error, and body-size
//! and read errors answered in the API's JSON shape rather than axum's plain text.

use axum::body::Bytes;
use axum::extract::{FromRequest, Request};
use axum::http::StatusCode;
use serde::de::DeserializeOwned;

use super::error::ApiError;

/// How long a handler waits for a request body (a request extension set by the router).
#[derive(Debug, Clone, Copy)]
pub(crate) struct BodyTimeout(pub(crate) std::time::Duration);

/// A JSON body; an empty body deserializes as `{}` (every field optional).
pub(crate) struct JsonBody<T>(pub(crate) T);

impl<T: DeserializeOwned, S: Send + Sync> FromRequest<S> for JsonBody<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        let limit = req
            .extensions()
            .get::<BodyTimeout>()
            .map_or(super::DEFAULT_BODY_TIMEOUT, |t| t.0);
        let read = tokio::time::timeout(limit, Bytes::from_request(req, state)).await;
        let Ok(read) = read else {
            return Err(ApiError::new(
                StatusCode::REQUEST_TIMEOUT,
                "body_timeout",
                format!(
                    "the request body did not arrive within {} ms",
                    limit.as_millis()
                ),
            ));
        };
        let bytes = read.map_err(|e| {
            if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
                ApiError::new(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    "payload_too_large",
                    "the request body is larger than the server's limit",
                )
            } else {
                ApiError::new(e.status(), "bad_body", e.body_text())
            }
        })?;
        // No body at all means every field left out; anything else must be one JSON object
        // (whitespace alone is not JSON, as the OpenAPI file says).
        let text: &[u8] = if bytes.is_empty() { b"{}" } else { &bytes };
        let bad = |field: &str, message: &dyn std::fmt::Display| {
            ApiError::new(
                StatusCode::BAD_REQUEST,
                "invalid_request",
                format!("{field}: {message}"),
            )
        };
        let mut de = serde_json::Deserializer::from_slice(text);
        let value = match serde_path_to_error::deserialize(&mut de) {
            Ok(value) => value,
            Err(e) => {
                let path = e.path().to_string();
                let inner = e.into_inner();
                // "." is the whole body; "?" is where a syntax error left no field to name.
                let field = if path == "." || path.starts_with('?') {
                    "body"
                } else {
                    &path
                };
                // JSON, but not an object (`5`, `"x"`, `[]`): said so, not as serde's "expected
                // struct AcquireBody" or a struct read from an array by position.
                let not_object = field == "body"
                    && serde_json::from_slice::<serde_json::Value>(text)
                        .is_ok_and(|v| !v.is_object());
                if not_object {
                    return Err(bad("body", &"must be a JSON object"));
                }
                let message = inner.to_string();
                // A required field left out is reported at its parent (the body, `rate`): the
                // message starts with the field itself instead, as every other one does.
                if let Some(missing) = missing_field(&message) {
                    let field = if field == "body" {
                        missing.to_owned()
                    } else {
                        format!("{field}.{missing}")
                    };
                    return Err(bad(&field, &message));
                }
                return Err(bad(field, &without_type_names(&message)));
            }
        };
        // Anything after the JSON value (a second object, garbage) is an error, not ignored.
        de.end().map_err(|e| bad("body", &e))?;
        // serde's derived structs also take arrays (fields by position); no body of this API
        // has an array anywhere, so one is refused rather than read positionally. The typed
        // parse above came first for its messages; this one only looks at the shape.
        let tree: serde_json::Value = serde_json::from_slice(text).map_err(|e| bad("body", &e))?;
        if !tree.is_object() {
            return Err(bad("body", &"must be a JSON object"));
        }
        if let Some(path) = first_array(&tree, String::new()) {
            return Err(bad(&path, &"must not be an array"));
        }
        Ok(JsonBody(value))
    }
}

/// serde's message without the server's own type names: "expected struct RateBody" reads
/// "expected a JSON object" (a client has no use for the name of a Rust type).
fn without_type_names(message: &str) -> String {
    const STRUCT: &str = "expected struct ";
    let mut out = String::with_capacity(message.len());
    let mut rest = message;
    while let Some(at) = rest.find(STRUCT) {
        out.push_str(&rest[..at]);
        out.push_str("expected a JSON object");
        let after = &rest[at + STRUCT.len()..];
        let name_len = after
            .find(|c: char| !(c.is_alphanumeric() || c == '_'))
            .unwrap_or(after.len());
        rest = &after[name_len..];
    }
    out.push_str(rest);
    out
}

/// The field serde's "missing field `x`" message names.
fn missing_field(message: &str) -> Option<&str> {
    let rest = message.strip_prefix("missing field `")?;
    rest.split('`').next().filter(|name| !name.is_empty())
}

/// The path (`rate.limit`) of the first array in `value`, if any.
fn first_array(value: &serde_json::Value, path: String) -> Option<String> {
    match value {
        serde_json::Value::Array(_) => Some(if path.is_empty() {
            "body".to_owned()
        } else {
            path
        }),
        serde_json::Value::Object(map) => map.iter().find_map(|(key, v)| {
            let inner = if path.is_empty() {
                key.clone()
            } else {
                format!("{path}.{key}")
            };
            first_array(v, inner)
        }),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::{missing_field, without_type_names};

    #[test]
    fn a_missing_field_is_named() {
        assert_eq!(
            missing_field("missing field `count` at line 1 column 2"),
            Some("count")
        );
        assert_eq!(missing_field("unknown field `x`"), None);
        assert_eq!(missing_field("missing field ``"), None);
    }

    #[test]
    fn type_names_are_left_out_of_messages() {
        assert_eq!(
            without_type_names("invalid type: integer `5`, expected struct RateBody at line 1"),
            "invalid type: integer `5`, expected a JSON object at line 1"
        );
        assert_eq!(
            without_type_names("expected struct A_b, expected struct C"),
            "expected a JSON object, expected a JSON object"
        );
        assert_eq!(without_type_names("missing field `x`"), "missing field `x`");
    }
}
