//! The `/v1` handlers, `/metrics` and the health checks. Documented in `docs/api.md`.

use std::sync::Arc;
use std::time::Duration;

use axum::extract::rejection::PathRejection;
use axum::extract::{Path, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use floodgate::{
    AcquireError, AcquireOptions, AdaptiveSpec, Feedback, LimiterBackend, LimiterName, LimiterSpec,
    LimiterStatus, PermitId, RateSpec, Refusal, ReservationId, Store, StoreError,
};
use serde::{Deserialize, Serialize};

use super::error::ApiError;
use super::extract::JsonBody;
use super::AppState;
use crate::wire::{millis, non_null, AdaptiveBody, RateBody};

mod pacing;
mod permits;

pub(super) use self::pacing::{feedback, schedule, unschedule};
pub(super) use self::permits::{extend, release};

type AppStateRef<S> = State<Arc<AppState<S>>>;

fn path_param(path: Result<Path<String>, PathRejection>, field: &str) -> Result<String, ApiError> {
    path.map(|Path(p)| p)
        .map_err(|e| ApiError::bad_field(field, e.body_text()))
}

fn limiter_name(path: Result<Path<String>, PathRejection>) -> Result<LimiterName, ApiError> {
    let raw = path_param(path, "name")?;
    LimiterName::new(&raw).map_err(|e| ApiError::bad_field("name", e))
}

fn permit_id(path: Result<Path<String>, PathRejection>) -> Result<PermitId, ApiError> {
    let raw = path_param(path, "permit_id")?;
    raw.parse::<PermitId>()
        .map_err(|e| ApiError::bad_field("permit_id", e))
}

/// A limiter as the API shows it.
#[derive(Debug, Serialize)]
pub(crate) struct LimiterBody {
    name: String,
    /// The configured concurrency (the adaptive starting point); null for rate only.
    concurrency: Option<u32>,
    /// The concurrency limit in force (moved by adaptive feedback); null for rate only.
    limit: Option<u32>,
    rate: Option<RateBody>,
    adaptive: Option<AdaptiveBody>,
    lease_ms: u64,
    max_wait_ms: u64,
    max_queue: u32,
    in_use: u32,
    holders: u32,
    waiting: u32,
    waiting_permits: u64,
    counters: CountersBody,
    /// In a learning window after state loss (docs/learning.md): nothing is granted until it
    /// ends.
    learning: bool,
    /// A keyed limiter's per-key limits and busiest keys (docs/keyed.md); absent otherwise.
    #[serde(skip_serializing_if = "Option::is_none")]
    keyed: Option<super::keyed::KeyedBody>,
}

#[derive(Debug, Serialize)]
struct CountersBody {
    granted: u64,
    released: u64,
    expired: u64,
    timed_out: u64,
    cancelled: u64,
    queue_full: u64,
    rejected: u64,
    extend_lost: u64,
    paced: u64,
    scheduled: u64,
    feedback_ok: u64,
    feedback_throttled: u64,
    feedback_error: u64,
    limit_decreases: u64,
    limit_increases: u64,
    adopted: u64,
}

impl From<LimiterStatus> for LimiterBody {
    fn from(s: LimiterStatus) -> Self {
        let c = s.counters;
        LimiterBody {
            name: s.name.to_string(),
            concurrency: s.spec.concurrency,
            limit: s.limit,
            rate: s.spec.rate.map(RateBody::from),
            adaptive: s.spec.adaptive.map(AdaptiveBody::from),
            lease_ms: millis(s.spec.default_lease),
            max_wait_ms: millis(s.spec.max_wait),
            max_queue: s.spec.max_queue,
            in_use: s.in_use,
            holders: s.holders,
            waiting: s.waiting,
            waiting_permits: s.waiting_permits,
            counters: CountersBody {
                granted: c.granted,
                released: c.released,
                expired: c.expired,
                timed_out: c.timed_out,
                cancelled: c.cancelled,
                queue_full: c.queue_full,
                rejected: c.rejected,
                extend_lost: c.extend_lost,
                paced: c.paced,
                scheduled: c.scheduled,
                feedback_ok: c.feedback_ok,
                feedback_throttled: c.feedback_throttled,
                feedback_error: c.feedback_error,
                limit_decreases: c.limit_decreases,
                limit_increases: c.limit_increases,
                adopted: c.adopted,
            },
            learning: s.learning,
            keyed: None,
        }
    }
}

#[derive(Debug, Serialize)]
pub(crate) struct LimiterList {
    limiters: Vec<LimiterBody>,
    /// Whether limiters may be changed over the API: `limiter apply --dry-run` reads it to
    /// predict a 403 `read_only` without writing.
    api_writes: bool,
    /// The store's cap on limiters (`null`: none), for the dry run's 409 `too_many_limiters`.
    max_limiters: Option<usize>,
}

pub(super) async fn list_limiters<S: Store>(
    State(state): AppStateRef<S>,
) -> Result<Json<LimiterList>, ApiError> {
    let all = bounded_listing(&state).await?;
    Ok(Json(LimiterList {
        limiters: all.into_iter().map(LimiterBody::from).collect(),
        api_writes: state.options.api_writes,
        max_limiters: state.gate.store().max_limiters(),
    }))
}

/// Longest a listing (`GET /v1/limiters`, `/metrics`) may take before it is answered 503: a
/// slow store must not hold these requests (and their connections) open indefinitely.
const LISTING_TIMEOUT: Duration = Duration::from_secs(10);

async fn bounded_listing<S: Store>(state: &AppState<S>) -> Result<Vec<LimiterStatus>, ApiError> {
    match tokio::time::timeout(LISTING_TIMEOUT, state.gate.limiters()).await {
        Ok(listed) => Ok(listed?),
        Err(_) => Err(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "store_unavailable",
            format!(
                "listing the limiters took longer than {} s",
                LISTING_TIMEOUT.as_secs()
            ),
        )),
    }
}

pub(super) async fn get_limiter<S: Store>(
    State(state): AppStateRef<S>,
    path: Result<Path<String>, PathRejection>,
) -> Result<Json<LimiterBody>, ApiError> {
    let name = limiter_name(path)?;
    let limiter = state.gate.store().limiter(&name).await?;
    let mut body = LimiterBody::from(limiter.status().await?);
    body.keyed = super::keyed::section(&limiter).await?;
    Ok(Json(body))
}

/// `PUT /v1/limiters/{name}`. Fields left out keep their current value (or the default, for a
/// new limiter), so a resize is `{"concurrency": 80}`.
/// `null` removes `concurrency`, `rate` or `adaptive`; leaving a field out keeps it.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct PutLimiter {
    #[serde(default, deserialize_with = "present")]
    concurrency: Option<Option<u32>>,
    #[serde(default, deserialize_with = "non_null")]
    lease_ms: Option<u64>,
    #[serde(default, deserialize_with = "non_null")]
    max_wait_ms: Option<u64>,
    #[serde(default, deserialize_with = "non_null")]
    max_queue: Option<u32>,
    #[serde(default, deserialize_with = "present")]
    rate: Option<Option<RateBody>>,
    #[serde(default, deserialize_with = "present")]
    adaptive: Option<Option<AdaptiveBody>>,
    /// Makes the limiter keyed (docs/keyed.md): limits per key under the total.
    #[serde(default, deserialize_with = "present")]
    per_key: Option<Option<super::keyed::PerKeyBody>>,
    /// A keyed limiter's cap on keys tracked at once.
    #[serde(default, deserialize_with = "non_null")]
    max_keys: Option<u32>,
}

/// Tells a field given as `null` (`Some(None)`) from one left out (`None`).
fn present<'de, T: Deserialize<'de>, D: serde::Deserializer<'de>>(
    d: D,
) -> Result<Option<Option<T>>, D::Error> {
    Option::<T>::deserialize(d).map(Some)
}

pub(super) fn require_writes<S: Store>(state: &AppState<S>) -> Result<(), ApiError> {
    if state.options.api_writes {
        Ok(())
    } else {
        Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "read_only",
            super::READ_ONLY_MESSAGE,
        ))
    }
}

pub(super) async fn put_limiter<S: Store>(
    State(state): AppStateRef<S>,
    path: Result<Path<String>, PathRejection>,
    JsonBody(body): JsonBody<PutLimiter>,
) -> Result<Json<LimiterBody>, ApiError> {
    require_writes(&state)?;
    let name = limiter_name(path)?;
    // Some stores hand out handles without a round trip, so "unknown" may come from either call.
    let (current, current_keyed) = match state.gate.store().limiter(&name).await {
        Ok(limiter) => match limiter.status().await {
            Ok(status) => (
                Some(status.spec),
                limiter.keys(0).await?.map(|view| view.spec),
            ),
            Err(StoreError::UnknownLimiter(_)) => (None, None),
            Err(e) => return Err(e.into()),
        },
        Err(StoreError::UnknownLimiter(_)) => (None, None),
        Err(e) => return Err(e.into()),
    };
    let keyed = super::keyed::keyed_spec(body.per_key, body.max_keys, current_keyed)?;
    if current.is_none() && keyed.is_some() && body.concurrency.is_none() && body.rate.is_none() {
        // A keyed limiter may have no total: its per-key limits bound it.
        if matches!(body.adaptive, Some(Some(_))) {
            // An adaptive limit moves the total; per-key adaptive limits are not built.
            return Err(ApiError::bad_field(
                "adaptive",
                "needs a total concurrency to adjust: give `concurrency` too (a keyed limiter's \
                 per-key limits are not adaptive)",
            ));
        }
        let d = LimiterSpec::default();
        let mut spec = LimiterSpec::default()
            .with_default_lease(body.lease_ms.map_or(d.default_lease, Duration::from_millis))
            .with_max_wait(body.max_wait_ms.map_or(d.max_wait, Duration::from_millis))
            .with_max_queue(body.max_queue.unwrap_or(d.max_queue));
        spec.concurrency = None;
        let keyed = keyed.unwrap_or_default();
        let status = super::keyed::put(&state, &name, spec, keyed).await?;
        let mut reply = LimiterBody::from(status);
        reply.keyed = super::keyed::section(&state.gate.store().limiter(&name).await?).await?;
        return Ok(Json(reply));
    }
    if current.is_none() && body.concurrency.is_none() && body.rate.is_none() {
        return Err(ApiError::bad_field(
            "concurrency",
            "required when creating a limiter (or give a rate)",
        ));
    }
    let base = current.unwrap_or_else(|| {
        let mut spec = LimiterSpec::default();
        spec.concurrency = None;
        spec
    });
    let adaptive = body
        .adaptive
        .map_or(base.adaptive, |a| a.map(AdaptiveSpec::from));
    let concurrency = match (body.concurrency, adaptive) {
        (Some(given), _) => given,
        // A new adaptive range with the starting limit left out: the kept starting limit is
        // moved into the range, so the limit in force lies within it (not refused as invalid).
        (None, Some(a)) if body.adaptive.is_some() => {
            base.concurrency.map(|c| c.clamp(a.min.min(a.max), a.max))
        }
        (None, _) => base.concurrency,
    };
    let mut spec = LimiterSpec::default()
        .with_default_lease(
            body.lease_ms
                .map_or(base.default_lease, Duration::from_millis),
        )
        .with_max_wait(
            body.max_wait_ms
                .map_or(base.max_wait, Duration::from_millis),
        )
        .with_max_queue(body.max_queue.unwrap_or(base.max_queue));
    spec.concurrency = concurrency;
    spec.rate = body.rate.map_or(base.rate, |r| r.map(RateSpec::from));
    spec.adaptive = adaptive;
    let status = match keyed {
        Some(keyed) => super::keyed::put(&state, &name, spec, keyed).await?,
        None => state.gate.store().put_limiter(&name, spec).await?,
    };
    tracing::info!(limiter = %name, concurrency = ?status.spec.concurrency, rate = ?status.spec.rate, "limiter set");
    let mut reply = LimiterBody::from(status);
    reply.keyed = super::keyed::section(&state.gate.store().limiter(&name).await?).await?;
    Ok(Json(reply))
}

#[derive(Debug, Serialize)]
pub(crate) struct Deleted {
    deleted: bool,
}

pub(super) async fn delete_limiter<S: Store>(
    State(state): AppStateRef<S>,
    path: Result<Path<String>, PathRejection>,
) -> Result<Json<Deleted>, ApiError> {
    require_writes(&state)?;
    let name = limiter_name(path)?;
    if state.gate.store().delete_limiter(&name).await? {
        state.metrics.forget(name.as_str());
        tracing::info!(limiter = %name, "limiter deleted");
        Ok(Json(Deleted { deleted: true }))
    } else {
        Err(ApiError::unknown_limiter(name.as_str()))
    }
}

/// `POST /v1/limiters/{name}/acquire`; every field optional.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct AcquireBody {
    #[serde(default, deserialize_with = "non_null")]
    permits: Option<u32>,
    #[serde(default, deserialize_with = "non_null")]
    lease_ms: Option<u64>,
    #[serde(default, deserialize_with = "non_null")]
    wait_ms: Option<u64>,
    #[serde(default, deserialize_with = "non_null")]
    holder: Option<String>,
    /// Idempotency key (also the `Idempotency-Key` header): a retry with the same one gets
    /// the same grant or joins the same wait.
    #[serde(default, deserialize_with = "non_null")]
    request_id: Option<String>,
    /// A keyed limiter's key (a tenant, an organization): required by a keyed limiter,
    /// refused by a plain one.
    #[serde(default, deserialize_with = "non_null")]
    key: Option<String>,
}

/// Longest idempotency key accepted.
const MAX_REQUEST_ID_LEN: usize = 128;

/// The acquire's idempotency key from the body or the `Idempotency-Key` header (which must
/// agree when both are given): 1 to 128 visible ASCII characters.
fn request_id(
    body: Option<String>,
    headers: &axum::http::HeaderMap,
) -> Result<Option<Arc<str>>, ApiError> {
    let header = match headers.get("idempotency-key") {
        None => None,
        Some(value) => Some(
            value
                .to_str()
                .map_err(|_| {
                    ApiError::bad_field("Idempotency-Key", "must be visible ASCII characters")
                })?
                .to_owned(),
        ),
    };
    let (field, id) = match (body, header) {
        (Some(b), Some(h)) if b != h => {
            return Err(ApiError::bad_field(
                "request_id",
                "differs from the Idempotency-Key header",
            ))
        }
        (Some(b), _) => ("request_id", b),
        (None, Some(h)) => ("Idempotency-Key", h),
        (None, None) => return Ok(None),
    };
    if id.is_empty() || id.len() > MAX_REQUEST_ID_LEN || !id.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(ApiError::bad_field(
            field,
            format!("must be 1 to {MAX_REQUEST_ID_LEN} visible ASCII characters"),
        ));
    }
    Ok(Some(Arc::from(id)))
}

/// A granted permit.
#[derive(Debug, Serialize)]
pub(crate) struct PermitBody {
    permit_id: String,
    fencing_token: u64,
    permits: u32,
    lease_ms: u64,
    waited_ms: u64,
}

/// Counts an acquire's outcome exactly once; if the handler is dropped first (the client went
/// away while waiting), it counts `cancelled`.
struct OutcomeRecorder<'a, S: Store> {
    state: &'a AppState<S>,
    limiter: &'a str,
    started: tokio::time::Instant,
    recorded: bool,
}

impl<S: Store> OutcomeRecorder<'_, S> {
    fn record(&mut self, outcome: &'static str) {
        self.recorded = true;
        if outcome == "unknown_limiter" {
            // Not a limiter (or no longer one): it gets no series (they would never be pruned
            // on a store that hands out handles for any name, and anyone can make up names).
            return;
        }
        if matches!(outcome, "fail_open" | "store_unavailable")
            && !self.state.metrics.knows(self.limiter)
        {
            // The store could not say whether the name is a limiter: only one with series
            // already is counted. Any name is granted under fail_open, and /metrics (which
            // prunes series of names that are not limiters) answers 503 while the store is
            // down, so made-up names would each add series for the whole outage.
            return;
        }
        self.state.metrics.acquire(self.limiter, outcome);
        self.state
            .metrics
            .waited(self.limiter, self.started.elapsed().as_secs_f64());
    }
}

impl<S: Store> Drop for OutcomeRecorder<'_, S> {
    fn drop(&mut self) {
        if !self.recorded {
            self.record("cancelled");
            tracing::debug!(limiter = self.limiter, "client left while waiting");
        }
    }
}

fn outcome_label(result: &Result<floodgate::Grant, AcquireError>) -> &'static str {
    match result {
        Ok(_) => "granted",
        Err(AcquireError::Refused(Refusal::WaitTimeout { .. })) => "wait_timeout",
        Err(AcquireError::Refused(Refusal::QueueFull { .. })) => "queue_full",
        Err(AcquireError::Refused(Refusal::LimiterDeleted))
        | Err(AcquireError::Store(StoreError::UnknownLimiter(_))) => "unknown_limiter",
        Err(AcquireError::Store(StoreError::Unavailable(_))) => "store_unavailable",
        Err(AcquireError::Superseded) => "superseded",
        Err(_) => "rejected",
    }
}

pub(super) async fn acquire<S: Store>(
    State(state): AppStateRef<S>,
    path: Result<Path<String>, PathRejection>,
    headers: axum::http::HeaderMap,
    JsonBody(body): JsonBody<AcquireBody>,
) -> Result<Json<PermitBody>, ApiError> {
    let name = limiter_name(path)?;
    let request_id = request_id(body.request_id, &headers)?;
    if let Some(holder) = &body.holder {
        // Here, not only in `Limiter::acquire`: this handler calls the store's limiter, which
        // does not check it.
        floodgate::spec::check_holder(holder)
            .map_err(|f| ApiError::bad_field(f.field, f.message))?;
    }
    if let Some(key) = &body.key {
        super::keyed::check(key)?;
    }
    let limiter = state.gate.store().limiter(&name).await?;
    let mut request = AcquireOptions::new().permits(body.permits.unwrap_or(1));
    if let Some(ms) = body.lease_ms {
        request = request.lease(Duration::from_millis(ms));
    }
    if let Some(ms) = body.wait_ms {
        request = request.wait(Duration::from_millis(ms));
    }
    if let Some(holder) = body.holder {
        request = request.holder(holder);
    }
    if let Some(id) = request_id {
        request = request.request_id(id);
    }
    let mut recorder = OutcomeRecorder {
        state: &state,
        limiter: name.as_str(),
        started: tokio::time::Instant::now(),
        recorded: false,
    };
    let mut shutting_down = state.shutting_down.clone();
    if *shutting_down.borrow() {
        recorder.record("shutting_down");
        return Err(ApiError::shutting_down());
    }
    // An acquire the store decides at once (the embedded store, not durable, nobody queued
    // and the permits free, or a try-once) is answered without building a wait, as
    // `Limiter::acquire` does; `None` (Redis, durable, keyed, a wait that may queue): the
    // general path. The answers are the same either way (`tests/at_once_http.rs`).
    let at_once = match &body.key {
        Some(_) => None,
        None => limiter.acquire_at_once(&request),
    };
    let result = match at_once {
        Some(decided) => decided,
        None => tokio::select! {
            result = async {
                match &body.key {
                    Some(key) => limiter.acquire_keyed(key, request).await,
                    None => limiter.acquire(request).await,
                }
            } => result,
            _ = shutting_down.wait_for(|down| *down) => {
                recorder.record("shutting_down");
                return Err(ApiError::shutting_down());
            }
        },
    };
    if options_fail_open(&state, &result) {
        recorder.record("fail_open");
        tracing::warn!(limiter = %name, "store unavailable: granting without accounting (fail_open)");
        return Ok(Json(PermitBody {
            permit_id: PermitId {
                limiter: name.clone(),
                token: floodgate::FencingToken(0),
            }
            .to_string(),
            fencing_token: 0,
            permits: 1,
            lease_ms: 0,
            waited_ms: 0,
        }));
    }
    recorder.record(outcome_label(&result));
    let grant = result?;
    Ok(Json(PermitBody {
        permit_id: PermitId {
            limiter: name.clone(),
            token: grant.token,
        }
        .to_string(),
        fencing_token: grant.token.0,
        permits: grant.permits,
        lease_ms: millis(grant.lease),
        waited_ms: millis(grant.waited),
    }))
}

/// Whether to grant without accounting: the store is unreachable and the server fails open.
/// Not when Redis answers but may evict keys: the store refuses it for the limit's sake, and
/// grants without accounting would drop the limit the evicting Redis still keeps.
fn options_fail_open<S: Store>(
    state: &AppState<S>,
    result: &Result<floodgate::Grant, AcquireError>,
) -> bool {
    state.options.fail_open
        && matches!(result, Err(AcquireError::Store(e @ StoreError::Unavailable(_)))
            if !super::evicting_redis(e))
}

pub(super) async fn metrics<S: Store>(State(state): AppStateRef<S>) -> Response {
    let statuses = match bounded_listing(&state).await {
        Ok(s) => s,
        Err(e) => return e.into_response(),
    };
    super::keyed::record_key_counts(&state, &statuses).await;
    match state.metrics.encode(statuses) {
        Ok(text) => (
            [(
                header::CONTENT_TYPE,
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
            )],
            text,
        )
            .into_response(),
        Err(_) => ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "metrics_encoding",
            "metrics could not be encoded",
        )
        .into_response(),
    }
}

pub(super) async fn healthz() -> &'static str {
    "ok"
}

pub(super) async fn readyz<S: Store>(State(state): AppStateRef<S>) -> Response {
    if *state.shutting_down.borrow() {
        return ApiError::shutting_down().into_response();
    }
    // One round trip whatever the number of limiters: probes are frequent and need no token.
    match state.gate.store().ping().await {
        Ok(()) => "ready".into_response(),
        Err(e) => ApiError::from(e).into_response(),
    }
}

pub(super) async fn not_found() -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        "not_found",
        "no such route; see docs/api.md",
    )
}

pub(super) async fn method_not_allowed() -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        "this route does not take that method; see docs/api.md",
    )
}

#[cfg(test)]
mod outcome_tests {
    use super::*;
    use crate::dashboard::Dashboard;
    use crate::metrics::Metrics;
    use crate::server::ServerOptions;

    /// An outcome the store could not judge (it was down: any name is granted under
    /// `fail_open`) adds no series for a name this server never counted: made-up names would
    /// each add series for the whole outage, /metrics (which prunes them) answering 503
    /// meanwhile (dashboard review). A limiter with series already is still counted.
    #[tokio::test]
    async fn a_store_outage_adds_no_series_for_names_never_counted() {
        let (_down, shutting_down) = tokio::sync::watch::channel(false);
        let state = AppState {
            gate: floodgate::Floodgate::in_memory(),
            options: ServerOptions::default(),
            metrics: Metrics::new(),
            shutting_down,
            dashboard: Arc::new(Dashboard::new()),
        };
        let record = |limiter: &str, outcome| {
            OutcomeRecorder {
                state: &state,
                limiter,
                started: tokio::time::Instant::now(),
                recorded: false,
            }
            .record(outcome)
        };
        record("real", "granted");
        for outcome in ["fail_open", "store_unavailable"] {
            record("made-up", outcome);
            record("real", outcome);
        }
        assert!(!state.metrics.knows("made-up"));
        assert!(state.metrics.knows("real"));
    }
}
