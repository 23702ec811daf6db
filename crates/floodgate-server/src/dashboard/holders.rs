//! `GET /v1/limiters/{name}/holders?limit=N`: who holds (bounded) and who waits.

use std::sync::Arc;

use axum::extract::rejection::{PathRejection, QueryRejection};
use axum::extract::{Path, Query, State};
use axum::Json;
use floodgate::{HoldersView, LimiterBackend, LimiterName, PermitId, Store, MAX_HOLDERS_LISTED};
use serde::{Deserialize, Serialize};

use crate::server::error::ApiError;
use crate::server::AppState;
use crate::wire::millis;

/// Holders listed when `limit` is not given.
pub(crate) const DEFAULT_LIMIT: usize = 100;

#[derive(Debug, Deserialize)]
pub(crate) struct HoldersQuery {
    /// Parsed by `parse_limit`, so its errors name `limit` and say what it takes.
    limit: Option<String>,
    /// Any other parameter: refused by `parse_limit`, naming it (a `deny_unknown_fields`
    /// rejection blamed `limit` for it).
    #[serde(flatten)]
    other: std::collections::BTreeMap<String, String>,
}

/// One holder as the API shows it.
#[derive(Debug, Serialize)]
pub(crate) struct HolderBody {
    permit_id: String,
    fencing_token: u64,
    permits: u32,
    /// The label sent with the acquire (`holder`), or null.
    label: Option<String>,
    /// How long ago it was granted.
    age_ms: u64,
    /// How long until its lease ends unless extended.
    lease_left_ms: u64,
}

/// The answer of `GET /v1/limiters/{name}/holders`.
#[derive(Debug, Serialize)]
pub(crate) struct HoldersBody {
    limiter: String,
    /// Grants out now in total.
    total_holders: u32,
    /// Whether more holders exist than were listed.
    truncated: bool,
    holders: Vec<HolderBody>,
    waiting: u32,
    waiting_permits: u64,
    /// How long the oldest waiter has waited; null when nobody waits.
    oldest_wait_ms: Option<u64>,
    /// Rate tokens available now; null without a rate limit.
    rate_tokens: Option<f64>,
}

impl HoldersBody {
    pub(crate) fn new(name: &LimiterName, v: HoldersView) -> Self {
        HoldersBody {
            limiter: name.to_string(),
            total_holders: v.total_holders,
            truncated: v.holders.len() < v.total_holders as usize,
            holders: v
                .holders
                .iter()
                .map(|h| HolderBody {
                    permit_id: PermitId {
                        limiter: name.clone(),
                        token: h.token,
                    }
                    .to_string(),
                    fencing_token: h.token.0,
                    permits: h.permits,
                    label: h.label.as_deref().map(str::to_owned),
                    age_ms: millis(v.now.since(h.granted_at)),
                    lease_left_ms: millis(h.lease_deadline.since(v.now)),
                })
                .collect(),
            waiting: v.waiting,
            waiting_permits: v.waiting_permits,
            oldest_wait_ms: v.oldest_wait.map(millis),
            rate_tokens: v.rate_tokens.map(|t| (t * 1000.0).round() / 1000.0),
        }
    }
}

pub(crate) fn parse_name(
    path: Result<Path<String>, PathRejection>,
) -> Result<LimiterName, ApiError> {
    let raw = path
        .map(|Path(p)| p)
        .map_err(|e| ApiError::bad_field("name", e.body_text()))?;
    LimiterName::new(&raw).map_err(|e| ApiError::bad_field("name", e))
}

pub(crate) fn parse_limit(
    query: Result<Query<HoldersQuery>, QueryRejection>,
) -> Result<usize, ApiError> {
    // What is left to fail here is `limit` given twice.
    let Query(q) = query.map_err(|e| ApiError::bad_field("limit", e.body_text()))?;
    if let Some(name) = q.other.keys().next() {
        let shown: String = name.chars().take(64).collect();
        return Err(ApiError::bad_field(
            &shown,
            "unknown query parameter (this route takes only `limit`)",
        ));
    }
    match q.limit.map(|l| l.parse::<usize>()) {
        None => Ok(DEFAULT_LIMIT),
        Some(Ok(n)) if n <= MAX_HOLDERS_LISTED => Ok(n),
        Some(_) => Err(ApiError::bad_field(
            "limit",
            format!("must be a whole number from 0 to {MAX_HOLDERS_LISTED}"),
        )),
    }
}

pub(crate) async fn list_holders<S: Store>(
    State(state): State<Arc<AppState<S>>>,
    path: Result<Path<String>, PathRejection>,
    query: Result<Query<HoldersQuery>, QueryRejection>,
) -> Result<Json<HoldersBody>, ApiError> {
    let name = parse_name(path)?;
    let limit = parse_limit(query)?;
    let limiter = state.gate.store().limiter(&name).await?;
    let view = limiter.holders(limit).await?;
    Ok(Json(HoldersBody::new(&name, view)))
}
