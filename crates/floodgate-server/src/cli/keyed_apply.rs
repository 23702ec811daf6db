//! Keyed limiters in the config file (`per_key`, `max_keys`, `keys`): created by `serve
//! --config`, re-applied on SIGHUP, and applied over the API by `floodgate limiter apply`. The
//! plain fields go through `apply.rs`'s [`Plan`](super::apply::Plan); this module adds the
//! keyed spec to its comparison and puts, and sets the file's overrides.
//!
//! Overrides are not compared (the API shows only their count): every apply sets the file's
//! overrides again, which is idempotent, and leaves alone the overrides of keys the file does
//! not name.

use std::collections::BTreeMap;

use floodgate::{
    Floodgate, KeyOverride, KeyedSpec, LimiterBackend, LimiterName, LimiterSpec, Store,
};
use serde::Deserialize;
use serde_json::{json, Value};

use crate::client::{Client, ClientError};
use crate::config::{FileConfig, LimiterConfig};
use crate::wire::RateBody;

/// The file's keyed limiters' per-key specs, by name.
pub(crate) fn desired_keyed(file: &FileConfig) -> BTreeMap<String, KeyedSpec> {
    file.limiters
        .iter()
        .filter_map(|(name, l)| l.keyed().map(|k| (name.clone(), k)))
        .collect()
}

/// The file's overrides: (limiter, key, override).
pub(crate) fn desired_overrides(file: &FileConfig) -> Vec<(String, String, KeyOverride)> {
    file.limiters
        .iter()
        .filter(|(_, l)| l.keyed().is_some())
        .flat_map(|(name, l)| {
            l.overrides()
                .into_iter()
                .map(move |(key, over)| (name.clone(), key, over))
        })
        .collect()
}

/// The keyed fields, in a fixed order, for the plan's lines; all `none` for a plain limiter.
pub(crate) fn keyed_fields(keyed: Option<&KeyedSpec>) -> Vec<(&'static str, String)> {
    let none = || "none".to_owned();
    let Some(k) = keyed else {
        return vec![("per_key", none())];
    };
    let rate = k.rate.map_or_else(none, |r| {
        let r = RateBody::from(r);
        format!(
            "{}/{}ms,burst:{}",
            r.limit,
            r.period_ms,
            r.burst.unwrap_or(0)
        )
    });
    let concurrency = k.concurrency.map_or_else(none, |c| c.to_string());
    vec![(
        "per_key",
        format!(
            "concurrency:{concurrency},rate:{rate},max_keys:{}",
            k.max_keys
        ),
    )]
}

/// Adds the keyed fields to a full `PUT` body.
pub(crate) fn add_to_body(body: &mut Value, keyed: &KeyedSpec) {
    // The API refuses `null` inside `per_key`: a field left out is "none".
    let mut per_key = json!({});
    if let Some(c) = keyed.concurrency {
        per_key["concurrency"] = json!(c);
    }
    if let Some(r) = keyed.rate {
        per_key["rate"] = json!(RateBody::from(r));
    }
    body["per_key"] = per_key;
    body["max_keys"] = json!(keyed.max_keys);
}

/// The keyed section of `GET /v1/limiters/{name}`; only the spec's fields are read.
#[derive(Debug, Deserialize)]
struct ShownKeyed {
    per_key: ShownPerKey,
    max_keys: u32,
}

#[derive(Debug, Deserialize)]
struct ShownPerKey {
    concurrency: Option<u32>,
    rate: Option<RateBody>,
}

/// The server's keyed specs of the limiters named (the list leaves them out, so one `GET`
/// each; a config names few limiters).
pub(crate) async fn current_keyed_http(
    client: &Client,
    names: impl Iterator<Item = &String>,
) -> Result<BTreeMap<String, KeyedSpec>, ClientError> {
    let mut out = BTreeMap::new();
    for name in names {
        let status = client.limiter(name).await?;
        let Some(shown) = status
            .get("keyed")
            .and_then(|k| serde_json::from_value::<ShownKeyed>(k.clone()).ok())
        else {
            continue;
        };
        out.insert(
            name.clone(),
            KeyedSpec {
                concurrency: shown.per_key.concurrency,
                rate: shown.per_key.rate.map(Into::into),
                max_keys: shown.max_keys,
            },
        );
    }
    Ok(out)
}

/// The store's keyed specs of the limiters named.
pub(crate) async fn current_keyed_store<S: Store>(
    gate: &Floodgate<S>,
    names: impl Iterator<Item = &String>,
) -> Result<BTreeMap<String, KeyedSpec>, String> {
    let mut out = BTreeMap::new();
    for name in names {
        let limiter = LimiterName::new(name).map_err(|e| format!("limiter {name}: {e}"))?;
        let handle = gate
            .store()
            .limiter(&limiter)
            .await
            .map_err(|e| format!("limiter {name}: {e}"))?;
        if let Some(view) = handle
            .keys(0)
            .await
            .map_err(|e| format!("limiter {name}: {e}"))?
        {
            out.insert(name.clone(), view.spec);
        }
    }
    Ok(out)
}

/// Sets the file's overrides over the API; returns how many.
pub(crate) async fn set_overrides_http(
    client: &Client,
    overrides: &[(String, String, KeyOverride)],
) -> Result<usize, (String, ClientError)> {
    for (name, key, over) in overrides {
        let mut body = json!({"weight": over.weight});
        if let Some(c) = over.concurrency {
            body["concurrency"] = json!(c);
        }
        client
            .put_key(name, key, &body)
            .await
            .map_err(|e| (name.clone(), e))?;
    }
    Ok(overrides.len())
}

/// Creates or changes one of the file's limiters in the store, keyed or not, with its
/// overrides.
pub(crate) async fn put_in_store<S: Store>(
    gate: &Floodgate<S>,
    name: &LimiterName,
    spec: LimiterSpec,
    keyed: Option<KeyedSpec>,
    overrides: &[(String, KeyOverride)],
) -> Result<(), String> {
    let store = gate.store();
    match keyed {
        Some(keyed) => store.put_keyed_limiter(name, spec, keyed).await,
        None => store.put_limiter(name, spec).await,
    }
    .map_err(|e| format!("limiter {name}: {e}"))?;
    if overrides.is_empty() {
        return Ok(());
    }
    let handle = store
        .limiter(name)
        .await
        .map_err(|e| format!("limiter {name}: {e}"))?;
    for (key, over) in overrides {
        handle
            .put_key(key, Some(*over))
            .await
            .map_err(|e| format!("limiter {name}: key {key:?}: {e}"))?;
    }
    Ok(())
}

/// [`put_in_store`] for a limiter of the file as written.
pub(crate) async fn put_file_limiter<S: Store>(
    gate: &Floodgate<S>,
    name: &LimiterName,
    limiter: &LimiterConfig,
) -> Result<(), String> {
    put_in_store(
        gate,
        name,
        limiter.spec(),
        limiter.keyed(),
        &limiter.overrides(),
    )
    .await
}

/// [`put_file_limiter`] for a server starting with a learning window: a keyed limiter the
/// store has no state for is created learning (`Store::restore_keyed_limiter`), then given
/// the file's overrides; a plain one as `Store::restore_limiter`. Whether it is learning.
pub(crate) async fn restore_file_limiter<S: Store>(
    gate: &Floodgate<S>,
    name: &LimiterName,
    limiter: &LimiterConfig,
    window: std::time::Duration,
) -> Result<bool, String> {
    let store = gate.store();
    let status = match limiter.keyed() {
        Some(keyed) => store.restore_keyed_limiter(name, limiter.spec(), keyed, window),
        None => return restore_plain(gate, name, limiter, window).await,
    }
    .await
    .map_err(|e| format!("limiter {name}: {e}"))?;
    let overrides = limiter.overrides();
    if !overrides.is_empty() {
        let handle = store
            .limiter(name)
            .await
            .map_err(|e| format!("limiter {name}: {e}"))?;
        for (key, over) in &overrides {
            handle
                .put_key(key, Some(*over))
                .await
                .map_err(|e| format!("limiter {name}: key {key:?}: {e}"))?;
        }
    }
    Ok(status.learning)
}

async fn restore_plain<S: Store>(
    gate: &Floodgate<S>,
    name: &LimiterName,
    limiter: &LimiterConfig,
    window: std::time::Duration,
) -> Result<bool, String> {
    let status = gate
        .store()
        .restore_limiter(name, limiter.spec(), window)
        .await
        .map_err(|e| format!("limiter {name}: {e}"))?;
    Ok(status.learning)
}

/// Sets the file's overrides in the store; returns how many.
pub(crate) async fn set_overrides_store<S: Store>(
    gate: &Floodgate<S>,
    overrides: &[(String, String, KeyOverride)],
) -> Result<usize, String> {
    for (name, key, over) in overrides {
        let limiter = LimiterName::new(name).map_err(|e| format!("limiter {name}: {e}"))?;
        gate.store()
            .limiter(&limiter)
            .await
            .map_err(|e| format!("limiter {name}: {e}"))?
            .put_key(key, Some(*over))
            .await
            .map_err(|e| format!("limiter {name}: key {key:?}: {e}"))?;
    }
    Ok(overrides.len())
}
