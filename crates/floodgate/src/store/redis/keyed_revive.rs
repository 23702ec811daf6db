//! A keyed limiter re-created after Redis lost its state, as a plain one is (`revive.rs`, the
//! rules in `core/learning.rs`): a store that knows its definition (it created or changed it,
//! or read it: the first operation on a keyed limiter it did not create reads it in the
//! background) and is told it is unknown re-creates it from that definition (total spec,
//! per-key spec, `max_keys`, overrides) in a learning window, then runs the operation again.
//!
//! The safety rule is the plain one, per key and in total: nothing is granted during the
//! window (waiters queue in their keys' queues and are served fairly when it ends), so permits
//! handed out before the loss are not handed out again while their leases may still run. A
//! permit the loss forgot is re-adopted by an extend that carries its key and permits (the
//! Rust `Permit` and the clients send them), under that key and the total, as the keyed core
//! does (`core/keyed/adopt.rs`, `lua/keyed/revive.lua`); without its key it is lost.

use std::collections::HashMap;
use std::time::Duration;

use super::limiter::{field, invalid, micros, RedisLimiter};
use super::unavailable;
use crate::core::keyed::{check_key, total_spec_for, KeyOverride, KeyedSpec};
use crate::error::{ExtendError, StoreError};
use crate::spec::{LimiterSpec, RateSpec};
use crate::store::LimiterBackend;
use crate::types::{FencingToken, Timestamp};

/// What a store keeps of a keyed limiter to re-create it after a loss.
#[derive(Debug, Clone)]
pub(crate) struct KeyedDef {
    /// The total's spec as configured (no concurrency when only the keys have one).
    pub(super) spec: LimiterSpec,
    /// The per-key spec and `max_keys`.
    pub(super) keyed: KeyedSpec,
    /// Every key's override, as last set through this store or read from Redis.
    pub(super) overrides: HashMap<String, KeyOverride>,
    /// When the overrides read last had last changed (the `keys` reply's last field; `None`:
    /// not read with one). A keys view naming another time reads them again: one set through
    /// another server was otherwise never learned, and a revival by this one dropped it (the
    /// key then served at the per-key default, above its override).
    pub(super) overrides_at: Option<String>,
}

/// The arguments of `kput`: the plain put's (with the total's derived spec), the per-key
/// fields, then `overrides`, put back in the same call if it re-creates the limiter in a
/// learning window, and their number (see `lua/keyed/put.lua`).
pub(super) fn kput_args(
    spec: &LimiterSpec,
    keyed: &KeyedSpec,
    learn: Option<Duration>,
    revive: bool,
    overrides: &HashMap<String, KeyOverride>,
) -> Vec<String> {
    let mut args = RedisLimiter::put_args(&total_spec_for(spec, keyed), learn, revive);
    let rate = keyed.rate;
    args.extend([
        keyed.concurrency.map(|c| c.to_string()).unwrap_or_default(),
        keyed.max_keys.to_string(),
        spec.concurrency.map(|c| c.to_string()).unwrap_or_default(),
        String::new(),
        rate.map(|r| r.limit.to_string()).unwrap_or_default(),
        rate.map(|r| r.period.as_micros().to_string())
            .unwrap_or_default(),
        rate.map(|r| r.burst.to_string()).unwrap_or_default(),
    ]);
    for (key, over) in overrides {
        args.extend(override_args(key, Some(over)));
    }
    args.push(overrides.len().to_string());
    args
}

/// An override as `put_key` and `kput` take it: the key, its concurrency ('' the default), its
/// weight ('' none: `put_key` removes the override).
pub(super) fn override_args(key: &str, over: Option<&KeyOverride>) -> [String; 3] {
    [
        key.to_owned(),
        over.and_then(|o| o.concurrency)
            .map(|c| c.to_string())
            .unwrap_or_default(),
        over.map(|o| o.weight.to_string()).unwrap_or_default(),
    ]
}

/// Parses the `kdef` reply (see `lua/keyed/revive.lua`) beside the total's spec read from the
/// status.
fn parse_def(reply: &[String], mut spec: LimiterSpec) -> Result<KeyedDef, StoreError> {
    let bad = || unavailable(format!("bad kdef reply {reply:?}"));
    let num = |s: &str| s.parse::<u64>().map_err(|_| bad());
    let small = |s: &str| s.parse::<u32>().map_err(|_| bad());
    let opt_small = |s: &str| {
        if s.is_empty() {
            Ok(None)
        } else {
            small(s).map(Some)
        }
    };
    let field = |i: usize| reply.get(i).map(String::as_str).ok_or_else(bad);
    let rate = match field(4)? {
        "" => None,
        raw => {
            let f: Vec<&str> = raw.split('|').collect();
            let [limit, period, burst] = f.as_slice() else {
                return Err(bad());
            };
            Some(RateSpec {
                limit: small(limit)?,
                period: Duration::from_micros(num(period)?),
                burst: small(burst)?,
            })
        }
    };
    // The total's concurrency as configured (the status shows it too; this is exact).
    spec.concurrency = opt_small(field(3)?)?;
    let keyed = KeyedSpec {
        concurrency: opt_small(field(1)?)?,
        rate,
        max_keys: small(field(2)?)?,
    };
    let mut overrides = HashMap::new();
    // Fields 5.. are overrides, two each; the reply ends with the timer field.
    let mut i = 5;
    while i + 2 < reply.len() {
        let (c, w) = reply[i + 1].split_once('|').ok_or_else(bad)?;
        let over = KeyOverride {
            concurrency: opt_small(c)?,
            weight: small(w)?,
        };
        overrides.insert(reply[i].clone(), over);
        i += 2;
    }
    Ok(KeyedDef {
        spec,
        keyed,
        overrides,
        overrides_at: None,
    })
}

impl RedisLimiter {
    /// An extend; `key`, a keyed permit's key, lets the keyed script re-adopt an unknown
    /// permit under it during a learning window (a plain limiter's script ignores it).
    pub(super) async fn extend_in(
        &self,
        key: Option<&str>,
        token: FencingToken,
        lease: Duration,
        permits: Option<u32>,
    ) -> Result<Timestamp, ExtendError> {
        let permits = permits.map(|p| p.to_string()).unwrap_or_default();
        // A key the core would refuse is not sent: the permit is then extended, never adopted.
        let key = key.filter(|k| check_key(k).is_ok()).unwrap_or_default();
        let args = [token.0.to_string(), micros(lease), permits, key.to_owned()];
        let reply = self.call("extend", &args).await?;
        match reply.first().map(String::as_str) {
            Some("extended") => Ok(Timestamp(field(&reply, 1)?)),
            Some("invalid") => Err(ExtendError::Invalid(invalid(&reply))),
            // Lost, or the limiter is gone (so nothing is held).
            _ => Err(ExtendError::Lost),
        }
    }

    /// Records a keyed limiter's definition (put through this store, sent when the count was
    /// `writes_before`), overrides kept; not if this store deleted it meanwhile (as
    /// `remember_written`).
    pub(super) fn remember_keyed(&self, spec: &LimiterSpec, keyed: &KeyedSpec, writes_before: u64) {
        let mut known = self.store.lock_known();
        if known.deleted_since(&self.name, writes_before) {
            known.asked.remove(&self.name);
            return;
        }
        known.specs.remove(&self.name);
        known.asked.insert(self.name.clone());
        let def = known
            .keyed
            .entry(self.name.clone())
            .or_insert_with(|| KeyedDef {
                spec: spec.clone(),
                keyed: keyed.clone(),
                overrides: HashMap::new(),
                overrides_at: None,
            });
        def.spec = spec.clone();
        def.keyed = keyed.clone();
    }

    /// Records a key's override (`None`: removed) set through this store.
    pub(super) fn remember_override(&self, key: &str, over: Option<KeyOverride>) {
        let mut known = self.store.lock_known();
        // A write of the definition: a read of it in flight may predate it (`learn_keyed_def`).
        known.wrote(&self.name);
        if let Some(def) = known.keyed.get_mut(&self.name) {
            match over {
                Some(over) => def.overrides.insert(key.to_owned(), over),
                None => def.overrides.remove(key),
            };
        }
    }

    /// The overrides this store knows of the limiter (none if it knows no keyed definition).
    pub(super) fn known_overrides(&self) -> HashMap<String, KeyOverride> {
        self.store
            .lock_known()
            .keyed
            .get(&self.name)
            .map(|d| d.overrides.clone())
            .unwrap_or_default()
    }

    /// Records the per-key spec read in a keys view, unless this store wrote the limiter's
    /// spec since the view was sent (`writes_before`, as a status read's: `remember_read`):
    /// Redis may have run the view before that write, and its per-key spec be the one the
    /// write replaced.
    pub(super) fn remember_keyed_spec(&self, keyed: &KeyedSpec, writes_before: u64) {
        let mut known = self.store.lock_known();
        if known.read_is_stale(&self.name, writes_before) {
            return;
        }
        if let Some(def) = known.keyed.get_mut(&self.name) {
            def.keyed = keyed.clone();
        }
    }

    /// Forgets the keyed definition: the limiter turned out plain.
    pub(super) fn forget_keyed(&self) {
        let mut known = self.store.lock_known();
        if known.keyed.remove(&self.name).is_some() {
            known.asked.remove(&self.name);
        }
    }

    /// Reads the definition of a keyed limiter this store did not create (its first use here),
    /// so it can re-create it after a loss too. Nothing for a plain limiter or a known one,
    /// unless `overrides_at` (a keys view's) says its overrides changed since they were read.
    pub(super) async fn learn_keyed_def(
        &self,
        overrides_at: Option<&str>,
    ) -> Result<(), StoreError> {
        self.read_keyed_def(overrides_at, false).await
    }

    /// Reads the definition again whatever this store knows of it (two of its puts of it
    /// crossed: `Known::crossed`).
    pub(super) async fn reread_keyed_def(&self) -> Result<(), StoreError> {
        let at = self
            .store
            .lock_known()
            .keyed
            .get(&self.name)
            .and_then(|def| def.overrides_at.clone());
        self.read_keyed_def(at.as_deref(), true).await
    }

    async fn read_keyed_def(
        &self,
        overrides_at: Option<&str>,
        again: bool,
    ) -> Result<(), StoreError> {
        if !self.store.is_keyed(&self.name) {
            return Ok(());
        }
        let current = self
            .store
            .lock_known()
            .keyed
            .get(&self.name)
            .map(|def| overrides_at.is_none() || def.overrides_at.as_deref() == overrides_at);
        if current == Some(true) && !again {
            return Ok(());
        }
        let writes = self.spec_writes();
        let status = LimiterBackend::status(self).await?;
        let reply = self.call_once("kdef", &[]).await?;
        if reply.first().map(String::as_str) != Some("kdef") {
            return Ok(());
        }
        let mut def = parse_def(&reply, status.spec)?;
        // The time read before the overrides: a change in between is read at the next view.
        def.overrides_at = overrides_at.map(str::to_owned);
        let mut known = self.store.lock_known();
        // Asked with no view time (the background read after a first use), a definition this
        // store wrote meanwhile (its define, then a key's override) is newer than this read
        // and stays: overwritten, the override was lost, and a put after a loss re-created the
        // limiter without it (a CI run of keyed_revive_redis).
        if overrides_at.is_none() && !again && known.keyed.contains_key(&self.name) {
            return Ok(());
        }
        // This limiter's spec or an override this store wrote (or a limiter it deleted)
        // since the reads were sent: Redis may have run them first, and the definition they
        // carry be the one the write replaced (as a status read's, `remember_read`). Read
        // again at the next view or use.
        if known.read_is_stale(&self.name, writes) {
            if !known.keyed.contains_key(&self.name) {
                known.asked.remove(&self.name);
            }
            return Ok(());
        }
        known.specs.remove(&self.name);
        known.keyed.insert(self.name.clone(), def);
        Ok(())
    }

    /// [`learn_keyed_def`](Self::learn_keyed_def) in a task of its own (from a status reply,
    /// which cannot wait for it); asked again later if it fails.
    pub(super) fn learn_keyed_def_in_background(&self) {
        let Ok(handle) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let limiter = self.clone();
        handle.spawn(async move {
            if limiter.learn_keyed_def(None).await.is_err() {
                limiter.store.lock_known().asked.remove(&limiter.name);
            }
        });
    }
}
