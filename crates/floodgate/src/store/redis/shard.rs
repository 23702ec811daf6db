//! Noticing that a Redis Cluster shard's master changed under the store: a failover to a
//! replica (automatic, or `CLUSTER FAILOVER`), a master restarted, or a slot moved to another
//! master. The standalone check (`generation.rs`) per hash slot: each shard has a master of
//! its own, and a shard's failover may lose the writes its replica had not received (grants
//! whose holders keep working) while the other shards lose nothing.
//!
//! Per slot this store used, it records the `run_id` of the master it last checked serving it
//! (an `INFO` sent to the node of that slot). A slot is checked before its first script call,
//! after a request on it failed, and when a script call on it is answered `NOSCRIPT` (a
//! promoted replica has none of the scripts: Redis 7 replicates scripts' effects, not the
//! scripts, and not `SCRIPT LOAD`). On a change, the limiters this store knows whose keys are
//! in that slot are marked to learn (`generation.rs` puts each in its learning window before
//! anything else runs on it). The scripts sent on a slot name the master recorded for it, and
//! are loaded on a node only once it answered with that master's `run_id` (`eval.rs`): so the
//! other slots of a master that failed over are caught at their own next call (still naming
//! the old master, it is answered `NOSCRIPT` on the new one), and so is a second server that
//! has not noticed yet, as on standalone Redis.
//!
//! Not covered (said in `docs/learning.md`): limiters this store does not know; a server idle
//! through a failover and a failover back to the master it checked (whose scripts are still
//! loaded): nothing tells it. A slot moved by resharding loses nothing, but looks the same (a
//! new master): its limiters learn for one window.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, PoisonError};

use redis::cluster_routing::{Route, RoutingInfo, SingleNodeRoutingInfo, Slot, SlotAddr};

use super::conn::Conn;
use super::eval::Scripts;
use super::limiter::RedisLimiter;
use super::{unavailable, Inner};
use crate::error::StoreError;
use crate::types::LimiterName;

/// What the store knows of the masters of a Redis Cluster's slots (empty elsewhere).
#[derive(Default)]
pub(super) struct Shards {
    /// Per slot this store used, the `run_id` of the master last checked to serve it.
    masters: HashMap<Slot, String>,
    /// Slots a request failed on since their last check, with how many failed: checked before
    /// the next call. Counted, as `generation::Suspicions`: a check clears a slot only if no
    /// request on it failed while its `INFO` was in flight.
    suspect: HashMap<Slot, u64>,
    /// The scripts naming each master some slot is recorded with, shared by its slots.
    scripts: HashMap<String, Arc<Scripts>>,
    /// Changes of master noticed per slot: an acquire in flight across one on its own slot
    /// gives its grant back (`generation.rs`, `changed_since`); one on another slot keeps it.
    changes: HashMap<Slot, u64>,
    /// Per slot, the gate its checks and its limiters' learning windows are settled under
    /// (`generation.rs`). One gate per slot, not one for the store: a check of a dead shard's
    /// slot waits out the response timeout, and limiters on live shards that need a check of
    /// their own (a first call, a request that failed) must not wait behind it. A slot's
    /// check marks only that slot's limiters to learn, so nothing else needs the same gate.
    gates: HashMap<Slot, Arc<tokio::sync::Mutex<()>>>,
}

impl Shards {
    /// A check of `slot` that started when its failures stood at `seen` has completed: the
    /// slot is clear unless more failed since.
    fn covered(&mut self, slot: Slot, seen: Option<u64>) {
        if self.suspect.get(&slot).copied() == seen {
            self.suspect.remove(&slot);
        }
    }
}

impl Inner {
    fn lock_shards(&self) -> std::sync::MutexGuard<'_, Shards> {
        self.shards.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Whether the store runs on a Redis Cluster (its checks are per slot).
    pub(super) fn is_cluster(&self) -> bool {
        matches!(self.conn, Conn::Cluster(_))
    }
}

/// The hash slot of limiter `name`'s keys (those of `script::limiter_keys`, all under one hash
/// tag), without making them all.
fn slot_of(prefix: &str, name: &LimiterName) -> Slot {
    Slot::for_key(super::script::meta_key(prefix, name.as_str()))
}

/// Where a command for `slot` goes: the slot's master.
fn to_master(slot: Slot) -> SingleNodeRoutingInfo {
    SingleNodeRoutingInfo::SpecificNode(Route::with_slot(slot, SlotAddr::Master))
}

/// The `role` in an `INFO replication` reply.
fn role_of(info: &str) -> Option<&str> {
    info.lines()
        .find_map(|l| l.strip_prefix("role:"))
        .map(str::trim)
}

/// Loads `source` on the master of `slot` if its `run_id` is `master`: the `INFO` and the load
/// go out as one pipeline to one node. `false` (and the load taken back) if that node is
/// another one. See `Scripts::load_on_master`.
pub(super) async fn load_on_slot(
    conn: &Conn,
    slot: Slot,
    master: &str,
    source: &str,
) -> redis::RedisResult<bool> {
    let Conn::Cluster(cluster) = conn else {
        return Err(redis::RedisError::from((
            redis::ErrorKind::Client,
            "a slot's master outside a Redis Cluster",
        )));
    };
    let mut cluster = cluster.clone();
    let mut pipe = redis::pipe();
    pipe.cmd("INFO").arg("server");
    pipe.cmd("SCRIPT").arg("LOAD").arg(source);
    let mut replies = cluster
        .route_pipeline(pipe, 0, 2, to_master(slot))
        .await?
        .into_iter();
    let info = replies
        .next()
        .unwrap_or(redis::Value::Nil)
        .extract_error()?;
    let info: String = redis::FromRedisValue::from_redis_value(info)?;
    replies
        .next()
        .unwrap_or(redis::Value::Nil)
        .extract_error()?;
    if super::generation::run_id_of(&info) == Some(master) {
        return Ok(true);
    }
    let mut flush = redis::cmd("SCRIPT");
    flush.arg("FLUSH");
    cluster
        .route_command(flush, RoutingInfo::SingleNode(to_master(slot)))
        .await?;
    Ok(false)
}

impl RedisLimiter {
    /// On a Cluster, the scripts naming the master recorded for this limiter's slot; `None`
    /// if the slot was not checked yet.
    pub(super) fn shard_scripts(&self) -> Option<Arc<Scripts>> {
        let shards = self.store.lock_shards();
        let master = shards.masters.get(&self.slot())?;
        shards.scripts.get(master).cloned()
    }

    /// The gate of this limiter's slot (see `Shards::gates`).
    pub(super) fn slot_gate(&self) -> Arc<tokio::sync::Mutex<()>> {
        let slot = self.slot();
        Arc::clone(self.store.lock_shards().gates.entry(slot).or_default())
    }

    /// The changes of master noticed on this limiter's slot so far.
    pub(super) fn shard_changes(&self) -> u64 {
        let slot = self.slot();
        self.store
            .lock_shards()
            .changes
            .get(&slot)
            .copied()
            .unwrap_or(0)
    }

    /// Whether this limiter's slot is to be checked before the next call: never checked, or a
    /// request on it failed since.
    pub(super) fn shard_due(&self) -> bool {
        let slot = self.slot();
        let shards = self.store.lock_shards();
        !shards.masters.contains_key(&slot) || shards.suspect.contains_key(&slot)
    }

    /// A request on this limiter's slot failed, or was answered `NOSCRIPT`: check its master
    /// before the next call.
    pub(super) fn suspect_shard(&self) {
        let slot = self.slot();
        *self.store.lock_shards().suspect.entry(slot).or_default() += 1;
    }

    /// The `run_id` of the master serving this limiter's slot. A node that answers as a
    /// replica is one the connection's slot map still names after a failover: a keyed command
    /// (answered `MOVED` there) makes the connection learn the new map, then it is asked again.
    async fn slot_master(&self) -> Result<String, StoreError> {
        let Conn::Cluster(cluster) = &self.store.conn else {
            return Err(unavailable("a slot's master outside a Redis Cluster"));
        };
        let mut cluster = cluster.clone();
        for tries in 1..=3_u64 {
            // The default sections hold both `server` (`run_id`) and `replication` (`role`);
            // Redis 6 takes one section argument at most.
            let info = redis::cmd("INFO");
            let reply = cluster
                .route_command(info, RoutingInfo::SingleNode(to_master(self.slot())))
                .await
                .map_err(unavailable)?;
            let info: String = redis::FromRedisValue::from_redis_value(reply)
                .map_err(|e| unavailable(redis::RedisError::from(e)))?;
            let run_id = super::generation::run_id_of(&info);
            match (role_of(&info), run_id) {
                (Some("master"), Some(run_id)) => {
                    // The default sections hold the memory policy too (`evict.rs`).
                    self.store.eviction.record(run_id, &info);
                    return Ok(run_id.to_owned());
                }
                _ => {
                    let mut exists = redis::cmd("EXISTS");
                    exists.arg(self.first_key());
                    let mut conn = self.store.conn.clone();
                    exists
                        .query_async::<i64>(&mut conn)
                        .await
                        .map_err(unavailable)?;
                    // The connection refreshes its map in the background after a `MOVED`.
                    tokio::time::sleep(std::time::Duration::from_millis(50 * tries)).await;
                }
            }
        }
        Err(unavailable(
            "the node of the limiter's slot kept answering as a replica",
        ))
    }

    /// Under the gate (`generation.rs`): if this limiter's slot is due, checks its master; on
    /// a change, marks the limiters this store knows in that slot to learn, then records the
    /// new master (and its scripts). An error leaves the slot due.
    pub(super) async fn check_shard(&self) -> Result<(), StoreError> {
        if !self.shard_due() {
            return Ok(());
        }
        let slot = self.slot();
        let seen = self.store.lock_shards().suspect.get(&slot).copied();
        let now = self.slot_master().await?;
        let before = self.store.lock_shards().masters.get(&slot).cloned();
        if let Some(before) = before.filter(|b| *b != now) {
            let on_slot: Vec<_> = self
                .store
                .known_names()
                .into_iter()
                .filter(|name| slot_of(&self.store.config.prefix, name) == slot)
                .collect();
            tracing::warn!(
                before = before.as_str(),
                now = now.as_str(),
                slot = ?slot,
                limiters = on_slot.len(),
                "a redis cluster shard changed master under this store (a failover or a \
                 restart, which may have lost the last writes): the limiters it knows in that \
                 slot learn who still holds permits before granting"
            );
            self.store.mark_to_learn(on_slot);
            *self.store.lock_shards().changes.entry(slot).or_default() += 1;
        }
        // After the limiters are marked: a call that takes the scripts naming the new master
        // sees them marked (`eval.rs`).
        let mut shards = self.store.lock_shards();
        if !shards.scripts.contains_key(&now) {
            let scripts = Arc::new(Scripts::new(Some(&now)));
            shards.scripts.insert(now.clone(), scripts);
        }
        shards.masters.insert(slot, now);
        shards.covered(slot, seen);
        // Scripts of masters no slot is recorded with any more are dropped.
        let Shards {
            masters, scripts, ..
        } = &mut *shards;
        let live: HashSet<&String> = masters.values().collect();
        scripts.retain(|master, _| live.contains(master));
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A request that failed while the slot's check was asking its master keeps the slot due:
    /// the answer may have come from the master before the failover that failed the request.
    #[test]
    fn a_failure_during_a_check_keeps_the_slot_due() {
        let (slot, other) = (Slot::for_key("a"), Slot::for_key("b"));
        assert_ne!(slot, other);
        let mut shards = Shards::default();
        let fail = |shards: &mut Shards, slot| *shards.suspect.entry(slot).or_default() += 1;
        // A first check (nothing failed) and a failure while it asks.
        let seen = shards.suspect.get(&slot).copied();
        fail(&mut shards, slot);
        shards.covered(slot, seen);
        assert!(shards.suspect.contains_key(&slot), "the failure was lost");
        // A check that covers every failure clears the slot, and only it.
        fail(&mut shards, other);
        let seen = shards.suspect.get(&slot).copied();
        shards.covered(slot, seen);
        assert!(!shards.suspect.contains_key(&slot));
        assert!(shards.suspect.contains_key(&other));
    }

    #[test]
    fn a_limiters_slot_is_the_slot_of_each_of_its_keys() {
        // A prefix may hold a brace (names cannot): the hash tag then starts in the prefix.
        for (prefix, name) in [("fg", "snuba"), ("a{b", "x"), ("fg", "org.a:b-1")] {
            let name = LimiterName::new(name).expect("a valid name");
            let slot = slot_of(prefix, &name);
            for key in super::super::script::limiter_keys(prefix, name.as_str()) {
                assert_eq!(Slot::for_key(&key), slot, "{key}");
            }
        }
    }
}
