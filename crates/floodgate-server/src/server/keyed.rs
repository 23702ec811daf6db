//! The HTTP surface of keyed limiters (docs/keyed.md): the `per_key` and `max_keys` fields of
//! a limiter, its keys in the status, and `PUT|DELETE /v1/limiters/{name}/keys/{key}`.

use std::sync::Arc;

use axum::extract::path::ErrorKind;
use axum::extract::rejection::PathRejection;
use axum::extract::{Path, State};
use axum::Json;
use floodgate::{
    KeyOverride, KeyedSpec, KeysView, LimiterBackend, LimiterName, LimiterSpec, Store,
};
use serde::{Deserialize, Serialize};

use super::error::ApiError;
use super::extract::JsonBody;
use super::AppState;
use crate::wire::{non_null, RateBody};

type AppStateRef<S> = State<Arc<AppState<S>>>;

/// Busiest keys a limiter's status lists.
pub(crate) const KEYS_IN_STATUS: usize = 10;

/// Why `"per_key": null` is refused for a keyed limiter (field `per_key`); `limiter apply`
/// (its dry run too) and a SIGHUP apply report the same.
pub(crate) const KEYED_STAYS_KEYED: &str =
    "a keyed limiter stays keyed; delete it to re-create it without keys";

/// `"per_key": {"concurrency": 5, "rate": {...}}` in a limiter's PUT body.
#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct PerKeyBody {
    #[serde(default, deserialize_with = "non_null")]
    concurrency: Option<u32>,
    #[serde(default, deserialize_with = "non_null")]
    rate: Option<RateBody>,
}

/// The keyed part of a limiter's PUT: `per_key` (with `null`: refused, a keyed limiter stays
/// keyed) and `max_keys`, over the current keyed spec if there is one.
pub(crate) fn keyed_spec(
    per_key: Option<Option<PerKeyBody>>,
    max_keys: Option<u32>,
    current: Option<KeyedSpec>,
) -> Result<Option<KeyedSpec>, ApiError> {
    if let Some(max) = max_keys {
        // Checked whatever else the body says, so it is never accepted and ignored.
        let max_allowed = floodgate::core::keyed::MAX_KEYS;
        if max == 0 || max > max_allowed {
            return Err(ApiError::bad_field(
                "max_keys",
                format!("must be from 1 to {max_allowed}"),
            ));
        }
        if matches!(per_key, Some(None)) || (per_key.is_none() && current.is_none()) {
            return Err(ApiError::bad_field(
                "max_keys",
                "only a keyed limiter has keys: give per_key too",
            ));
        }
    }
    if per_key.is_none() && max_keys.is_none() {
        return Ok(current);
    }
    let mut spec = match (per_key, current) {
        (Some(None), Some(_)) => return Err(ApiError::bad_field("per_key", KEYED_STAYS_KEYED)),
        (Some(None), None) => return Ok(None),
        (Some(Some(body)), current) => KeyedSpec {
            concurrency: body.concurrency,
            rate: body.rate.map(Into::into),
            max_keys: current.map_or(floodgate::core::keyed::DEFAULT_MAX_KEYS, |c| c.max_keys),
        },
        (None, Some(current)) => current,
        (None, None) => KeyedSpec::default(),
    };
    if let Some(max) = max_keys {
        spec.max_keys = max;
    }
    Ok(Some(spec))
}

/// Creates or changes a keyed limiter (the store refuses if it has no keyed limiters).
pub(crate) async fn put<S: Store>(
    state: &AppState<S>,
    name: &LimiterName,
    spec: LimiterSpec,
    keyed: KeyedSpec,
) -> Result<floodgate::LimiterStatus, ApiError> {
    Ok(state
        .gate
        .store()
        .put_keyed_limiter(name, spec, keyed)
        .await?)
}

/// A keyed limiter's keys, as its status shows them.
#[derive(Debug, Serialize)]
pub(crate) struct KeyedBody {
    per_key: PerKeyOut,
    max_keys: u32,
    /// Keys with holders, waiters or rate debt now.
    key_count: u64,
    overrides: u64,
    /// Acquires refused because `max_keys` keys were tracked.
    too_many_keys: u64,
    /// The keys with the most holders plus waiters, busiest first.
    busiest_keys: Vec<KeyBody>,
}

#[derive(Debug, Serialize)]
struct PerKeyOut {
    concurrency: Option<u32>,
    rate: Option<RateBody>,
}

#[derive(Debug, Serialize)]
struct KeyBody {
    key: String,
    in_use: u32,
    holders: u32,
    waiting: u32,
    limit: Option<u32>,
    weight: u32,
}

impl From<KeysView> for KeyedBody {
    fn from(v: KeysView) -> Self {
        KeyedBody {
            per_key: PerKeyOut {
                concurrency: v.spec.concurrency,
                rate: v.spec.rate.map(RateBody::from),
            },
            max_keys: v.spec.max_keys,
            key_count: v.count,
            overrides: v.overrides,
            too_many_keys: v.counters.too_many_keys,
            busiest_keys: v
                .busiest
                .into_iter()
                .map(|k| KeyBody {
                    key: k.key.to_string(),
                    in_use: k.in_use,
                    holders: k.holders,
                    waiting: k.waiting,
                    limit: k.limit,
                    weight: k.weight,
                })
                .collect(),
        }
    }
}

/// The keyed section of a limiter's status; `None` for a plain limiter.
pub(crate) async fn section<B: LimiterBackend>(limiter: &B) -> Result<Option<KeyedBody>, ApiError> {
    Ok(limiter.keys(KEYS_IN_STATUS).await?.map(KeyedBody::from))
}

/// `PUT /v1/limiters/{name}/keys/{key}`: `{"concurrency": 2, "weight": 3}`; fields left out
/// take the defaults (the per-key concurrency, weight 1).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct PutKey {
    #[serde(default, deserialize_with = "non_null")]
    concurrency: Option<u32>,
    #[serde(default, deserialize_with = "non_null")]
    weight: Option<u32>,
}

#[derive(Debug, Serialize)]
pub(crate) struct KeyOverrideBody {
    key: String,
    /// This key's concurrency limit; null: the per-key default.
    concurrency: Option<u32>,
    weight: u32,
}

fn path_pair(
    path: Result<Path<(String, String)>, PathRejection>,
) -> Result<(LimiterName, String), ApiError> {
    // The field is the segment at fault, as axum reports it (a segment that is not UTF-8 once
    // decoded: the only way two string segments fail).
    let Path((name, key)) = path.map_err(|e| {
        let field = match &e {
            PathRejection::FailedToDeserializePathParams(p) => match p.kind() {
                ErrorKind::InvalidUtf8InPathParam { key } if key == "name" => "name",
                _ => "key",
            },
            _ => "key",
        };
        ApiError::bad_field(field, e.body_text())
    })?;
    let name = LimiterName::new(&name).map_err(|e| ApiError::bad_field("name", e))?;
    floodgate::core::keyed::check_key(&key).map_err(|e| ApiError::bad_field(e.field, e.message))?;
    Ok((name, key))
}

pub(super) async fn put_key<S: Store>(
    State(state): AppStateRef<S>,
    path: Result<Path<(String, String)>, PathRejection>,
    JsonBody(body): JsonBody<PutKey>,
) -> Result<Json<KeyOverrideBody>, ApiError> {
    super::api::require_writes(&state)?;
    let (name, key) = path_pair(path)?;
    let over = KeyOverride {
        concurrency: body.concurrency,
        weight: body.weight.unwrap_or(1),
    };
    let limiter = state.gate.store().limiter(&name).await?;
    limiter.put_key(&key, Some(over)).await?;
    tracing::info!(limiter = %name, key = %crate::shown::shown(&key), concurrency = ?over.concurrency, weight = over.weight, "key override set");
    Ok(Json(KeyOverrideBody {
        key,
        concurrency: over.concurrency,
        weight: over.weight,
    }))
}

#[derive(Debug, Serialize)]
pub(crate) struct KeyDeleted {
    deleted: bool,
}

pub(super) async fn delete_key<S: Store>(
    State(state): AppStateRef<S>,
    path: Result<Path<(String, String)>, PathRejection>,
) -> Result<Json<KeyDeleted>, ApiError> {
    super::api::require_writes(&state)?;
    let (name, key) = path_pair(path)?;
    let limiter = state.gate.store().limiter(&name).await?;
    limiter.put_key(&key, None).await?;
    Ok(Json(KeyDeleted { deleted: true }))
}

/// Checks a `key` given with an operation: a valid key, of a keyed limiter.
pub(crate) fn check(key: &str) -> Result<(), ApiError> {
    floodgate::core::keyed::check_key(key).map_err(|e| ApiError::bad_field(e.field, e.message))
}

/// Sets the key-count gauge of every keyed limiter among `statuses` (a store without keyed
/// limiters answers at once, with no round trip).
pub(crate) async fn record_key_counts<S: Store>(
    state: &AppState<S>,
    statuses: &[floodgate::LimiterStatus],
) {
    for status in statuses {
        let Ok(limiter) = state.gate.store().limiter(&status.name).await else {
            continue;
        };
        if let Ok(Some(view)) = limiter.keys(0).await {
            state.metrics.set_keys(status.name.as_str(), view.count);
        }
    }
}
