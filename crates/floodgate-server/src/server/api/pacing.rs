//! Pacing and feedback: `schedule`, `unschedule` and `feedback` of `/v1/limiters/{name}`.

use super::*;

/// `POST /v1/limiters/{name}/schedule`: `{"count": 5000}`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct ScheduleBody {
    count: u32,
    /// A keyed limiter's key: the reservation takes the total's and this key's rate.
    #[serde(default, deserialize_with = "non_null")]
    key: Option<String>,
}

#[derive(Debug, Serialize)]
pub(crate) struct Scheduled {
    count: usize,
    /// When each child may start, in milliseconds from now (rounded up: never early).
    offsets_ms: Vec<u64>,
    /// The reservation's id, to give back what the producer does not use (a keyed one gives
    /// back the total's and its key's tokens).
    reservation: u64,
}

pub(crate) async fn schedule<S: Store>(
    State(state): AppStateRef<S>,
    path: Result<Path<String>, PathRejection>,
    JsonBody(body): JsonBody<ScheduleBody>,
) -> Result<Json<Scheduled>, ApiError> {
    let name = limiter_name(path)?;
    let limiter = state.gate.store().limiter(&name).await?;
    let scheduled = match &body.key {
        Some(key) => {
            crate::server::keyed::check(key)?;
            limiter.schedule_keyed(key, body.count).await?
        }
        None => limiter.schedule(body.count).await?,
    };
    let (offsets, reservation) = (scheduled.offsets, scheduled.reservation.0);
    Ok(Json(Scheduled {
        count: offsets.len(),
        offsets_ms: offsets
            .iter()
            .map(|d| u64::try_from(d.as_micros().div_ceil(1000)).unwrap_or(u64::MAX))
            .collect(),
        reservation,
    }))
}

/// `POST /v1/limiters/{name}/unschedule`: `{"reservation": 812, "count": 2000}`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct UnscheduleBody {
    reservation: u64,
    count: u32,
}

#[derive(Debug, Serialize)]
pub(crate) struct Unscheduled {
    /// Tokens given back (at most `count`; 0 when they can no longer be).
    returned: u32,
}

pub(crate) async fn unschedule<S: Store>(
    State(state): AppStateRef<S>,
    path: Result<Path<String>, PathRejection>,
    JsonBody(body): JsonBody<UnscheduleBody>,
) -> Result<Json<Unscheduled>, ApiError> {
    let name = limiter_name(path)?;
    let limiter = state.gate.store().limiter(&name).await?;
    let returned = limiter
        .unschedule(ReservationId(body.reservation), body.count)
        .await?;
    Ok(Json(Unscheduled { returned }))
}

/// `POST /v1/limiters/{name}/feedback`: `{"outcome": "throttled", "latency_ms": 120}`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct FeedbackBody {
    outcome: FeedbackOutcome,
    /// The call's latency, its start to its answer: the `gradient` controller uses it (AIMD
    /// uses outcomes only). Fractions of a millisecond are kept.
    #[serde(default, deserialize_with = "non_null")]
    latency_ms: Option<f64>,
    /// A keyed limiter's key whose call this was. Checked (a valid key, of a keyed limiter);
    /// the adaptive limit moved is the total's (per-key adaptive limits are not built).
    #[serde(default, deserialize_with = "non_null")]
    key: Option<String>,
}

/// The longest latency a feedback report may carry: a day, like the longest lease.
const MAX_FEEDBACK_LATENCY_MS: f64 = 86_400_000.0;

#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(rename_all = "snake_case")]
enum FeedbackOutcome {
    Ok,
    Throttled,
    Error,
}

#[derive(Debug, Serialize)]
pub(crate) struct FeedbackReply {
    /// The concurrency limit in force after this report.
    limit: Option<u32>,
}

pub(crate) async fn feedback<S: Store>(
    State(state): AppStateRef<S>,
    path: Result<Path<String>, PathRejection>,
    JsonBody(body): JsonBody<FeedbackBody>,
) -> Result<Json<FeedbackReply>, ApiError> {
    let name = limiter_name(path)?;
    let limiter = state.gate.store().limiter(&name).await?;
    let outcome = match body.outcome {
        FeedbackOutcome::Ok => Feedback::Ok,
        FeedbackOutcome::Throttled => Feedback::Throttled,
        FeedbackOutcome::Error => Feedback::Error,
    };
    if let Some(key) = &body.key {
        crate::server::keyed::check(key)?;
        if limiter.keys(0).await?.is_none() {
            return Err(ApiError::bad_field(
                "key",
                "this limiter is not keyed: create it with per_key to use keys",
            ));
        }
    }
    let latency = match body.latency_ms {
        None => None,
        Some(ms) if ms.is_finite() && (0.0..=MAX_FEEDBACK_LATENCY_MS).contains(&ms) => {
            Some(Duration::from_secs_f64(ms / 1000.0))
        }
        Some(_) => {
            return Err(ApiError::bad_field(
                "latency_ms",
                "must be a number of milliseconds from 0 to 86400000 (24 h)",
            ))
        }
    };
    let limit = limiter.feedback_with_latency(outcome, latency).await?;
    Ok(Json(FeedbackReply { limit }))
}
