//! A held permit's `extend` and `release` (`/v1/permits/{permit_id}`).

use super::*;

/// `POST /v1/permits/{permit_id}/extend`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct ExtendBody {
    #[serde(default, deserialize_with = "non_null")]
    lease_ms: Option<u64>,
    /// The permit's size (clients always send it): during a learning window after state loss,
    /// an extend of a permit the store forgot re-adopts it.
    #[serde(default, deserialize_with = "non_null")]
    permits: Option<u32>,
    /// A keyed limiter's permit's key (clients send the one they acquired with): during a
    /// learning window an unknown permit is re-adopted under it (docs/learning.md).
    #[serde(default, deserialize_with = "non_null")]
    key: Option<String>,
}

#[derive(Debug, Serialize)]
pub(crate) struct ExtendedBody {
    permit_id: String,
    fencing_token: u64,
    lease_ms: u64,
}

pub(crate) async fn extend<S: Store>(
    State(state): AppStateRef<S>,
    path: Result<Path<String>, PathRejection>,
    JsonBody(body): JsonBody<ExtendBody>,
) -> Result<Json<ExtendedBody>, ApiError> {
    let id = permit_id(path)?;
    if body.permits == Some(0) {
        return Err(ApiError::bad_field("permits", "must be at least 1"));
    }
    if let Some(ms) = body.lease_ms {
        check_lease_ms(ms)?;
    }
    if let Some(key) = &body.key {
        floodgate::core::keyed::check_key(key)
            .map_err(|e| ApiError::bad_field(e.field, e.message))?;
    }
    if id.token.0 == 0 {
        return extend_fail_open(&state, &id, body.lease_ms).await;
    }
    // A permit of a limiter that no longer exists is not held.
    let limiter = match state.gate.store().limiter(&id.limiter).await {
        Ok(limiter) => limiter,
        Err(StoreError::UnknownLimiter(_)) => return Err(floodgate::ExtendError::Lost.into()),
        Err(e) => return Err(e.into()),
    };
    let lease = match body.lease_ms {
        Some(ms) => Duration::from_millis(ms),
        None => match limiter.status().await {
            Ok(status) => status.spec.default_lease,
            Err(StoreError::UnknownLimiter(_)) => return Err(floodgate::ExtendError::Lost.into()),
            Err(e) => return Err(e.into()),
        },
    };
    let result = match &body.key {
        Some(key) => {
            limiter
                .extend_keyed(key, id.token, lease, body.permits)
                .await
        }
        None => limiter.extend(id.token, lease, body.permits).await,
    };
    if result == Err(floodgate::ExtendError::Lost) {
        tracing::warn!(permit = %id, "extend of a lost permit");
    }
    result?;
    Ok(Json(ExtendedBody {
        permit_id: id.to_string(),
        fencing_token: id.token.0,
        lease_ms: millis(lease),
    }))
}

/// The lease range every store enforces (1 ms to 24 h), checked before any store call so a
/// fail-open extend cannot echo a lease no store would grant.
fn check_lease_ms(ms: u64) -> Result<(), ApiError> {
    // floodgate's MAX_LEASE (24 h), which every store enforces on extend.
    let max: u64 = 24 * 3600 * 1000;
    // The same messages as the stores' own check.
    if ms < 1 {
        Err(ApiError::bad_field("lease_ms", "must be at least 1 ms"))
    } else if ms > max {
        Err(ApiError::bad_field(
            "lease_ms",
            format!("must be at most {max} ms (24 h)"),
        ))
    } else {
        Ok(())
    }
}

/// Extend of a fail-open grant (token 0), which no store recorded. Only a server that fails
/// open hands those out, so any other server answers `permit_lost`; a fail-open server answers
/// 200 while the store is down, and `permit_lost` once the store says the limiter does not exist.
async fn extend_fail_open<S: Store>(
    state: &AppState<S>,
    id: &PermitId,
    lease_ms: Option<u64>,
) -> Result<Json<ExtendedBody>, ApiError> {
    if !state.options.fail_open {
        return Err(floodgate::ExtendError::Lost.into());
    }
    let known = match state.gate.store().limiter(&id.limiter).await {
        Ok(limiter) => match limiter.status().await {
            Ok(status) => Some(millis(status.spec.default_lease)),
            Err(StoreError::UnknownLimiter(_)) => return Err(floodgate::ExtendError::Lost.into()),
            Err(_) => None,
        },
        Err(StoreError::UnknownLimiter(_)) => return Err(floodgate::ExtendError::Lost.into()),
        Err(_) => None,
    };
    Ok(Json(ExtendedBody {
        permit_id: id.to_string(),
        fencing_token: 0,
        lease_ms: lease_ms.or(known).unwrap_or(0),
    }))
}

#[derive(Debug, Serialize)]
pub(crate) struct Released {
    released: bool,
}

pub(crate) async fn release<S: Store>(
    State(state): AppStateRef<S>,
    path: Result<Path<String>, PathRejection>,
) -> Result<Json<Released>, ApiError> {
    let id = permit_id(path)?;
    if id.token.0 == 0 {
        // A fail-open grant was never recorded: there is nothing to release.
        return Ok(Json(Released { released: false }));
    }
    let released = match state.gate.store().limiter(&id.limiter).await {
        Ok(limiter) => limiter.release(id.token).await?,
        Err(StoreError::UnknownLimiter(_)) => false,
        Err(e) => return Err(e.into()),
    };
    Ok(Json(Released { released }))
}
