//! The dashboard's routes: the page and its assets, its JSON data, its event streams and its
//! admin actions. Everything but the sign-in page is behind [`super::require_session`].

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::rejection::PathRejection;
use axum::extract::{Path, State};
use axum::http::{header, StatusCode};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post, put};
use axum::{Json, Router};
use floodgate::{FencingToken, LimiterBackend, LimiterName, LimiterStatus, Store, StoreError};
use futures_util::Stream;
use serde::Deserialize;
use serde_json::{json, Value};

use super::assets;
use super::holders::{parse_name, HoldersBody};
use crate::server::error::ApiError;
use crate::server::{AppState, JsonBody};

type AppStateRef<S> = State<Arc<AppState<S>>>;

/// Holders a limiter page shows (the API lists up to 10,000 on request).
const PAGE_HOLDERS: usize = 200;

/// Routes that need a session (or the bearer token), to be wrapped by the caller.
pub(crate) fn routes<S: Store>() -> Router<Arc<AppState<S>>> {
    Router::new()
        .route("/", get(assets::index))
        .route("/dashboard/assets/app.js", get(assets::app_js))
        .route("/dashboard/assets/app.css", get(assets::app_css))
        .route("/dashboard/api/overview", get(overview::<S>))
        .route("/dashboard/api/limiters/{name}", get(limiter_page::<S>))
        .route(
            "/dashboard/api/limiters/{name}",
            delete(delete_limiter::<S>),
        )
        .route("/dashboard/api/limiters/{name}/limit", put(set_limit::<S>))
        .route("/dashboard/api/limiters/{name}/release", post(release::<S>))
        .route("/dashboard/events", get(overview_events::<S>))
        .route("/dashboard/events/{name}", get(limiter_events::<S>))
}

/// Routes anyone may reach: the sign-in page and the sign-in itself.
pub(crate) fn public_routes<S: Store>() -> Router<Arc<AppState<S>>> {
    Router::new()
        .route("/login", get(assets::login))
        .route("/login.js", get(assets::login_js))
        .route("/dashboard/login", post(super::auth::login::<S>))
        .route("/dashboard/logout", post(super::auth::logout::<S>))
}

fn json_text(text: Arc<str>) -> Response {
    (
        [(header::CONTENT_TYPE, "application/json")],
        text.to_string(),
    )
        .into_response()
}

async fn overview<S: Store>(State(state): AppStateRef<S>) -> Response {
    let text = state.dashboard.overview.borrow().full.clone();
    json_text(text)
}

fn status_json(s: &LimiterStatus, api_writes: bool) -> Value {
    let c = s.counters;
    json!({
        "name": s.name.as_str(),
        "concurrency": s.spec.concurrency,
        "limit": s.limit,
        "rate": s.spec.rate.map(|r| json!({"limit": r.limit, "period_ms": crate::wire::millis(r.period), "burst": r.burst})),
        "adaptive": s.spec.adaptive.map(|a| json!({"min": a.min, "max": a.max})),
        "lease_ms": crate::wire::millis(s.spec.default_lease),
        "max_wait_ms": crate::wire::millis(s.spec.max_wait),
        "in_use": s.in_use,
        "holders": s.holders,
        "waiting": s.waiting,
        "counters": {"granted": c.granted, "released": c.released, "expired": c.expired,
                     "timed_out": c.timed_out, "feedback_throttled": c.feedback_throttled,
                     "limit_decreases": c.limit_decreases, "limit_increases": c.limit_increases},
        "api_writes": api_writes,
    })
}

/// Status, holders and waiters of one limiter; with `history`, its 15 minutes of samples too.
async fn limiter_json<S: Store>(
    state: &AppState<S>,
    name: &LimiterName,
    history: bool,
) -> Result<Value, ApiError> {
    let limiter = state.gate.store().limiter(name).await?;
    let status = limiter.status().await?;
    let holders = limiter.holders(PAGE_HOLDERS).await?;
    let mut out = json!({
        "status": status_json(&status, state.options.api_writes),
        "holders": HoldersBody::new(name, holders),
    });
    let ring = state.dashboard.lock_history();
    let ring = ring.get(name.as_str());
    if history {
        let (start, samples) = ring.map(|r| r.expand()).unwrap_or_default();
        out["history"] = json!({"start": start, "samples": samples});
    } else if let Some(r) = ring {
        let (start, samples) = r.expand();
        out["sample"] = json!({"t": start + samples.len() as u64 - 1, "s": r.last()});
    }
    Ok(out)
}

async fn limiter_page<S: Store>(
    State(state): AppStateRef<S>,
    path: Result<Path<String>, PathRejection>,
) -> Result<Json<Value>, ApiError> {
    let name = parse_name(path)?;
    Ok(Json(limiter_json(&state, &name, true).await?))
}

fn require_writes<S: Store>(state: &AppState<S>) -> Result<(), ApiError> {
    if state.options.api_writes {
        return Ok(());
    }
    Err(ApiError::new(
        StatusCode::FORBIDDEN,
        "read_only",
        "this server does not allow changing limiters over the API (api_writes = false)",
    ))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct SetLimit {
    concurrency: u32,
}

/// `PUT /dashboard/api/limiters/{name}/limit` with `{"concurrency": N}`: the rest of the spec
/// is kept (as `PUT /v1/limiters/{name}` with only `concurrency`).
async fn set_limit<S: Store>(
    State(state): AppStateRef<S>,
    path: Result<Path<String>, PathRejection>,
    JsonBody(body): JsonBody<SetLimit>,
) -> Result<Json<Value>, ApiError> {
    require_writes(&state)?;
    let name = parse_name(path)?;
    let limiter = state.gate.store().limiter(&name).await?;
    let mut spec = limiter.status().await?.spec;
    spec.concurrency = Some(body.concurrency);
    let status = state.gate.store().put_limiter(&name, spec).await?;
    tracing::info!(limiter = %name, concurrency = body.concurrency, "limit set from the dashboard");
    Ok(Json(status_json(&status, true)))
}

async fn delete_limiter<S: Store>(
    State(state): AppStateRef<S>,
    path: Result<Path<String>, PathRejection>,
) -> Result<Json<Value>, ApiError> {
    require_writes(&state)?;
    let name = parse_name(path)?;
    if !state.gate.store().delete_limiter(&name).await? {
        return Err(StoreError::UnknownLimiter(name).into());
    }
    tracing::info!(limiter = %name, "limiter deleted from the dashboard");
    Ok(Json(json!({"deleted": true})))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct Release {
    fencing_token: u64,
}

/// Releases a (stuck) permit by its fencing token.
async fn release<S: Store>(
    State(state): AppStateRef<S>,
    path: Result<Path<String>, PathRejection>,
    JsonBody(body): JsonBody<Release>,
) -> Result<Json<Value>, ApiError> {
    require_writes(&state)?;
    let name = parse_name(path)?;
    let limiter = state.gate.store().limiter(&name).await?;
    let released = limiter.release(FencingToken(body.fencing_token)).await?;
    tracing::info!(limiter = %name, token = body.fencing_token, released, "permit released from the dashboard");
    Ok(Json(json!({"released": released})))
}

/// Ends when the server starts shutting down, so open dashboards never hold up a shutdown.
fn ticks<S: Store>(state: Arc<AppState<S>>) -> impl Stream<Item = (Arc<AppState<S>>, bool)> + Send {
    let rx = state.dashboard.overview.subscribe();
    let down = state.shutting_down.clone();
    futures_util::stream::unfold(
        (state, rx, down, true),
        |(state, mut rx, mut down, first)| async move {
            if !first {
                tokio::select! {
                    changed = rx.changed() => changed.ok()?,
                    _ = down.wait_for(|d| *d) => return None,
                }
            }
            if *down.borrow() {
                return None;
            }
            rx.borrow_and_update();
            Some(((Arc::clone(&state), first), (state, rx, down, false)))
        },
    )
}

fn sse<St: Stream<Item = Result<Event, Infallible>> + Send + 'static>(stream: St) -> Response {
    Sse::new(stream)
        .keep_alive(KeepAlive::new().interval(Duration::from_secs(15)))
        .into_response()
}

/// `GET /dashboard/events`: the whole overview now, then after every sample what changed
/// (`overview-delta`), or the whole again if this stream missed a render (a slow reader).
async fn overview_events<S: Store>(State(state): AppStateRef<S>) -> Response {
    use futures_util::StreamExt;
    let mut sent: Option<u64> = None;
    sse(ticks(state).map(move |(state, _)| {
        let now = state.dashboard.overview.borrow().clone();
        let follows = sent.is_some_and(|seq| seq + 1 == now.seq);
        sent = Some(now.seq);
        Ok(if follows {
            Event::default().event("overview-delta").data(&*now.delta)
        } else {
            Event::default().event("overview").data(&*now.full)
        })
    }))
}

/// `GET /dashboard/events/{name}`: the limiter's newest sample, holders and waiters, once now
/// and after every sample; a `gone` event when it no longer exists.
async fn limiter_events<S: Store>(
    State(state): AppStateRef<S>,
    path: Result<Path<String>, PathRejection>,
) -> Result<Response, ApiError> {
    use futures_util::StreamExt;
    let name = parse_name(path)?;
    // Refuse an unknown name at once rather than streaming `gone`.
    limiter_json(&state, &name, false).await?;
    Ok(sse(ticks(state).then(move |(state, _)| {
        let name = name.clone();
        async move {
            Ok(match limiter_json(&state, &name, false).await {
                Ok(v) => Event::default().event("limiter").data(v.to_string()),
                Err(e) if e.code == "unknown_limiter" => Event::default().event("gone").data("{}"),
                Err(e) => Event::default()
                    .event("store_error")
                    .data(json!({"message": e.message}).to_string()),
            })
        }
    })))
}
