//! Signing in to the dashboard when the server has a bearer token, without the token ever
//! appearing in a URL or a log: the sign-in page POSTs it as JSON, and the server answers with
//! an `HttpOnly; SameSite=Strict` session cookie (a random id, not the token) that the page,
//! its data and its event streams then carry. Requests with the bearer token work as well.

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::{Request, State};
use axum::http::{header, HeaderMap, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Redirect, Response};
use floodgate::Store;
use serde::Deserialize;

use crate::server::error::ApiError;
use crate::server::AppState;

/// The session cookie's name.
const COOKIE: &str = "floodgate_session";
/// How long a sign-in lasts.
const SESSION_TTL: Duration = Duration::from_secs(12 * 3600);
/// Most sessions kept at once; the oldest goes first (bounds memory against sign-in floods).
const MAX_SESSIONS: usize = 1_000;
/// Header every state-changing dashboard request carries: a cross-site form cannot set it,
/// so a forged request is refused even where `SameSite` is not honoured.
pub(crate) const CSRF_HEADER: &str = "x-floodgate-dashboard";

/// Compares without an early exit (same reasoning as the API's token check).
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

fn session_of(headers: &HeaderMap) -> Option<&str> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|kv| kv.trim().split_once('='))
        .find(|(k, _)| *k == COOKIE)
        .map(|(_, v)| v)
}

/// Whether the request is signed in: no token configured, the bearer token, or a live session.
pub(crate) fn signed_in<S: Store>(state: &AppState<S>, headers: &HeaderMap) -> bool {
    let Some(expected) = state.options.token.as_deref() else {
        return true;
    };
    let bearer = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        // The API's parsing: the scheme in any letter case (RFC 7235), as `/v1` takes it.
        .and_then(crate::server::bearer_token);
    if bearer.is_some_and(|t| constant_time_eq(t.as_bytes(), expected.as_bytes())) {
        return true;
    }
    let Some(id) = session_of(headers) else {
        return false;
    };
    let mut sessions = state
        .dashboard
        .sessions
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    match sessions.get(id) {
        Some(until) if *until > Instant::now() => true,
        Some(_) => {
            sessions.remove(id);
            false
        }
        None => false,
    }
}

/// Guards the dashboard's page, data and actions. The page itself redirects to the sign-in
/// page; everything else answers 401 JSON. State-changing requests also need [`CSRF_HEADER`].
pub(crate) async fn require_session<S: Store>(
    State(state): State<Arc<AppState<S>>>,
    request: Request,
    next: Next,
) -> Response {
    if !signed_in(&state, request.headers()) {
        if request.method() == Method::GET && request.uri().path() == "/" {
            return Redirect::to("/login").into_response();
        }
        return ApiError::new(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "sign in at /login (or send Authorization: Bearer TOKEN)",
        )
        .into_response();
    }
    if request.method() != Method::GET && !request.headers().contains_key(CSRF_HEADER) {
        return ApiError::new(
            StatusCode::FORBIDDEN,
            "csrf",
            format!("dashboard actions need the {CSRF_HEADER} header"),
        )
        .into_response();
    }
    next.run(request).await
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct SignIn {
    token: String,
}

fn new_session_id() -> Result<String, ApiError> {
    let mut bytes = [0u8; 24];
    getrandom::fill(&mut bytes).map_err(|_| {
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "no_randomness",
            "the system's random source failed; try again",
        )
    })?;
    Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
}

/// `POST /dashboard/login` with `{"token": "..."}`: sets the session cookie.
pub(crate) async fn login<S: Store>(
    State(state): State<Arc<AppState<S>>>,
    crate::server::JsonBody(body): crate::server::JsonBody<SignIn>,
) -> Result<Response, ApiError> {
    let Some(expected) = state.options.token.as_deref() else {
        return Ok(StatusCode::NO_CONTENT.into_response());
    };
    if !constant_time_eq(body.token.as_bytes(), expected.as_bytes()) {
        tracing::warn!("dashboard sign-in with a wrong token");
        return Err(ApiError::new(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "wrong token",
        ));
    }
    let id = new_session_id()?;
    {
        let mut sessions = state
            .dashboard
            .sessions
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let now = Instant::now();
        sessions.retain(|_, until| *until > now);
        if sessions.len() >= MAX_SESSIONS {
            if let Some(oldest) = sessions
                .iter()
                .min_by_key(|(_, until)| **until)
                .map(|(k, _)| k.clone())
            {
                sessions.remove(&oldest);
            }
        }
        sessions.insert(id.clone(), now + SESSION_TTL);
    }
    let cookie = format!(
        "{COOKIE}={id}; HttpOnly; SameSite=Strict; Path=/; Max-Age={}",
        SESSION_TTL.as_secs()
    );
    Ok(([(header::SET_COOKIE, cookie)], StatusCode::NO_CONTENT).into_response())
}

/// `POST /dashboard/logout`: ends the session.
pub(crate) async fn logout<S: Store>(
    State(state): State<Arc<AppState<S>>>,
    headers: HeaderMap,
) -> Response {
    if let Some(id) = session_of(&headers) {
        state
            .dashboard
            .sessions
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .remove(id);
    }
    let cookie = format!("{COOKIE}=; HttpOnly; SameSite=Strict; Path=/; Max-Age=0");
    ([(header::SET_COOKIE, cookie)], StatusCode::NO_CONTENT).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_session_cookie_is_found_among_others() {
        let mut h = HeaderMap::new();
        h.insert(
            header::COOKIE,
            "a=1; floodgate_session=abc; b=2"
                .parse()
                .unwrap_or_else(|_| unreachable!()),
        );
        assert_eq!(session_of(&h), Some("abc"));
        assert!(constant_time_eq(b"abc", b"abc"));
        assert!(!constant_time_eq(b"abc", b"abd"));
        assert!(!constant_time_eq(b"abc", b"ab"));
    }
}
