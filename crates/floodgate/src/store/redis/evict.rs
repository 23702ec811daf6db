//! The guard against a Redis that evicts keys: one whose `maxmemory` is set with a
//! `maxmemory-policy` other than `noeviction`.
//!
//! Every key of a limiter has a TTL, so every eviction policy, `volatile-*` ones included,
//! may pick one of them, and the key it picks need not be the whole limiter. Evicting its
//! `holders` hash alone (which carries the in-use count) makes it grant its whole limit again
//! while the holders keep working: 10 permits out at a limit of 5, silently (`docs/redis.md`,
//! "Failure behaviour"). So the store refuses to serve on such a Redis rather than risk it:
//! every operation is answered `Unavailable` naming the policy and the fix until it is fixed.
//!
//! The policy is read from `INFO memory` (managed Redis often disables `CONFIG`): at connect
//! ([`EvictionGuard::at_connect`], where a refusal fails `connect` itself), at each check of a master (`generation.rs`,
//! `shard.rs`: their `INFO` carries the memory section too), at each [`ping`] (readiness
//! probes; every master of a Cluster), and every [`RECHECK_EVERY`] by a
//! task of the store's own (every master of a Cluster), so a policy changed at run time is
//! caught within that period even where nothing probes. None of these is on an operation's
//! path: an operation reads one atomic flag.
//!
//! The same `INFO` tells whether a master under `noeviction` is out of memory (its used memory
//! over `maxmemory`, [`RedisOutOfMemory`]): it then refuses every write that may grow memory
//! (`OOM command not allowed when used memory > 'maxmemory'`), acquires included, so [`ping`]
//! fails while it is so and readiness says the store cannot serve. Operations are not refused
//! on it: those Redis still runs (releases, deletes) free memory.
//!
//! [`ping`]: crate::store::Store::ping

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, PoisonError, Weak};
use std::time::Duration;

use super::conn::Conn;
use super::{unavailable, Inner};
use crate::error::StoreError;

/// How often the store's own task reads the masters' memory policy.
pub(super) const RECHECK_EVERY: Duration = Duration::from_secs(5);

/// A Redis master whose memory policy may evict a limiter's keys: the source of the
/// [`StoreError::Unavailable`] the store answers with while it is so (at connect too), so a
/// caller can tell this misconfiguration from an outage (`floodgate serve` exits 2 on it).
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct EvictingRedis {
    /// `maxmemory`, in bytes (non-zero).
    pub maxmemory: u64,
    /// `maxmemory_policy` (not `noeviction`).
    pub policy: String,
}

impl std::fmt::Display for EvictingRedis {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "Redis runs with maxmemory-policy {} (maxmemory {} bytes): it may evict a key of a \
             limiter and then put more permits out than the limit, so Floodgate refuses to use \
             it; set `maxmemory-policy noeviction` (or `maxmemory 0`)",
            self.policy, self.maxmemory
        )
    }
}

impl std::error::Error for EvictingRedis {}

/// What an `INFO` reply holding the memory section says: `Some` if this master may evict
/// keys. A reply without the fields (a Redis-compatible server that does not report them) is
/// taken as not evicting: nothing tells otherwise.
pub(super) fn evicting_of(info: &str) -> Option<EvictingRedis> {
    let field = |name: &str| {
        info.lines()
            .find_map(|l| l.strip_prefix(name))
            .map(str::trim)
    };
    let maxmemory: u64 = field("maxmemory:")?.parse().ok()?;
    let policy = field("maxmemory_policy:")?;
    (maxmemory != 0 && policy != "noeviction").then(|| EvictingRedis {
        maxmemory,
        policy: policy.to_owned(),
    })
}

/// A Redis master under `maxmemory-policy noeviction` whose used memory is over its `maxmemory`:
/// it refuses every write that may grow memory, so acquires fail (503 `store_unavailable`,
/// `OOM command not allowed...`) until memory is freed. The source of the error
/// [`ping`](crate::store::Store::ping) answers with meanwhile; read afresh at each `ping`, so
/// it clears as soon as memory is freed.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct RedisOutOfMemory {
    /// Used memory as Redis counts it against `maxmemory` (`used_memory` less
    /// `mem_not_counted_for_evict`), in bytes.
    pub used: u64,
    /// `maxmemory`, in bytes (non-zero).
    pub maxmemory: u64,
}

impl std::fmt::Display for RedisOutOfMemory {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "Redis is out of memory: it uses {} bytes, over its maxmemory of {} bytes, under \
             maxmemory-policy noeviction, so it refuses writes and acquires fail; free memory \
             in Redis or raise its maxmemory",
            self.used, self.maxmemory
        )
    }
}

impl std::error::Error for RedisOutOfMemory {}

/// What an `INFO` reply holding the memory section says: `Some` if this master refuses writes
/// for lack of memory now. Redis's own test before each command (`getMaxmemoryState`): used
/// memory less what it does not count (replication and AOF buffers) over `maxmemory`. Only
/// under `noeviction`: another policy evicts instead (and is refused by itself, above). A
/// reply without the fields is taken as not out of memory: nothing tells otherwise.
pub(super) fn out_of_memory_of(info: &str) -> Option<RedisOutOfMemory> {
    let field = |name: &str| {
        info.lines()
            .find_map(|l| l.strip_prefix(name))
            .map(str::trim)
    };
    let number = |name: &str| field(name).and_then(|v| v.parse::<u64>().ok());
    let maxmemory = number("maxmemory:").filter(|m| *m != 0)?;
    if field("maxmemory_policy:")? != "noeviction" {
        return None;
    }
    let used =
        number("used_memory:")?.saturating_sub(number("mem_not_counted_for_evict:").unwrap_or(0));
    (used > maxmemory).then_some(RedisOutOfMemory { used, maxmemory })
}

/// The masters found evicting, by `run_id` (one entry, `""`, outside a Cluster).
#[derive(Debug, Default)]
pub(super) struct EvictionGuard {
    evicting: Mutex<HashMap<String, EvictingRedis>>,
    /// Whether `evicting` is non-empty: all an operation reads.
    any: AtomicBool,
}

impl EvictionGuard {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, EvictingRedis>> {
        self.evicting.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Records what a read of master `run_id`'s `INFO` found.
    pub(super) fn record(&self, run_id: &str, info: &str) {
        let mut evicting = self.lock();
        match evicting_of(info) {
            Some(found) => {
                if evicting.get(run_id) != Some(&found) {
                    tracing::error!(policy = found.policy.as_str(), "{found}");
                }
                evicting.insert(run_id.to_owned(), found);
            }
            None => {
                if evicting.remove(run_id).is_some() {
                    tracing::info!("the redis master no longer evicts keys");
                }
            }
        }
        self.any.store(!evicting.is_empty(), Ordering::Release);
    }

    /// Replaces the whole record with a read of every master (`run_id`, `INFO`).
    fn replace(&self, infos: &[(String, String)]) {
        {
            // Masters no longer there (failed over, removed) are forgotten.
            let mut evicting = self.lock();
            evicting.retain(|id, _| infos.iter().any(|(seen, _)| seen == id));
            self.any.store(!evicting.is_empty(), Ordering::Release);
        }
        for (run_id, info) in infos {
            self.record(run_id, info);
        }
    }

    /// `Err` naming the policy while some master may evict keys. One atomic load otherwise.
    pub(super) fn check(&self) -> Result<(), StoreError> {
        if !self.any.load(Ordering::Acquire) {
            return Ok(());
        }
        match self.lock().values().next() {
            Some(found) => Err(StoreError::Unavailable(
                crate::error::Unavailable::caused_by("redis", found.clone()),
            )),
            None => Ok(()),
        }
    }
}

/// Each master's `run_id` (`""` outside a Cluster) and `INFO` (with the memory section).
/// Retried once if the connection was dead (`retry_dropped`).
async fn read_masters(conn: &Conn) -> Result<Vec<(String, String)>, StoreError> {
    let cluster = matches!(conn, Conn::Cluster(_));
    let reply: redis::Value = super::retry_dropped(|| {
        let mut conn = conn.clone();
        let mut info = redis::cmd("INFO");
        // One master: its memory section is enough. On a Cluster `INFO` goes to every master
        // and comes back by node; the default sections hold both `run_id` and the memory
        // policy (Redis 6 takes one section argument at most).
        if !cluster {
            info.arg("memory");
        }
        async move { info.query_async(&mut conn).await }
    })
    .await
    .map_err(unavailable)?;
    if !cluster {
        let info: String = redis::FromRedisValue::from_redis_value(reply)
            .map_err(|e| unavailable(redis::RedisError::from(e)))?;
        return Ok(vec![(String::new(), info)]);
    }
    let mut infos = Vec::new();
    let redis::Value::Map(nodes) = reply else {
        let info: String = redis::FromRedisValue::from_redis_value(reply)
            .map_err(|e| unavailable(redis::RedisError::from(e)))?;
        let run_id = super::generation::run_id_of(&info).unwrap_or("").to_owned();
        return Ok(vec![(run_id, info)]);
    };
    for (_, value) in nodes {
        let value = value.extract_error().map_err(unavailable)?;
        let info: String = redis::FromRedisValue::from_redis_value(value)
            .map_err(|e| unavailable(redis::RedisError::from(e)))?;
        let run_id = super::generation::run_id_of(&info).unwrap_or("").to_owned();
        infos.push((run_id, info));
    }
    Ok(infos)
}

impl Inner {
    /// Reads every master's memory policy now, and answers whether the store may serve.
    pub(super) async fn check_eviction(&self) -> Result<(), StoreError> {
        self.read_memory().await.map(drop)
    }

    /// [`check_eviction`](Self::check_eviction), and `Err` too while a master is out of memory
    /// ([`RedisOutOfMemory`]): whether the store can serve writes now. Readiness probes; the
    /// same `INFO` (no extra round trip).
    pub(super) async fn check_ready(&self) -> Result<(), StoreError> {
        let infos = self.read_memory().await?;
        match infos.iter().find_map(|(_, info)| out_of_memory_of(info)) {
            Some(full) => Err(StoreError::Unavailable(
                crate::error::Unavailable::caused_by("redis", full),
            )),
            None => Ok(()),
        }
    }

    /// Reads every master's `INFO` (`read_masters`) and records their memory policies; `Err`
    /// if one may evict keys.
    async fn read_memory(&self) -> Result<Vec<(String, String)>, StoreError> {
        let infos = read_masters(&self.conn).await?;
        self.eviction.replace(&infos);
        self.eviction.check()?;
        Ok(infos)
    }
}

impl EvictionGuard {
    /// The guard of a store about to be made, from a read of every master now: `Err` (which
    /// fails `connect`) if one may evict keys.
    pub(super) async fn at_connect(conn: &Conn) -> Result<Self, StoreError> {
        let guard = EvictionGuard::default();
        guard.replace(&read_masters(conn).await?);
        guard.check()?;
        Ok(guard)
    }
}

/// Reads the policy every [`RECHECK_EVERY`] until the store is dropped. A failed read changes
/// nothing: the operations' own failures tell of an outage.
/// (Ends at the first tick after the store is gone: the task holds no reference meanwhile.)
pub(super) fn spawn_recheck(inner: Weak<Inner>) {
    tokio::spawn(async move {
        let mut every = tokio::time::interval(RECHECK_EVERY);
        every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        every.tick().await;
        loop {
            every.tick().await;
            let Some(inner) = inner.upgrade() else { return };
            if let Err(e) = inner.check_eviction().await {
                tracing::debug!(error = %e, "redis memory policy check");
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use super::{evicting_of, out_of_memory_of};

    #[test]
    fn only_a_set_maxmemory_with_an_evicting_policy_evicts() {
        let info = |max: &str, policy: &str| {
            format!("# Memory\r\nused_memory:1000\r\nmaxmemory:{max}\r\nmaxmemory_human:x\r\nmaxmemory_policy:{policy}\r\n")
        };
        let found = evicting_of(&info("1048576", "volatile-lru")).expect("evicts");
        assert_eq!(
            (found.maxmemory, found.policy.as_str()),
            (1_048_576, "volatile-lru")
        );
        assert!(evicting_of(&info("1048576", "allkeys-lfu")).is_some());
        assert_eq!(evicting_of(&info("1048576", "noeviction")), None);
        assert_eq!(evicting_of(&info("0", "allkeys-lru")), None);
        // A server that reports neither field: nothing tells it evicts.
        assert_eq!(evicting_of("# Memory\r\nused_memory:1000\r\n"), None);
    }

    #[test]
    fn out_of_memory_is_counted_used_memory_over_maxmemory_under_noeviction() {
        let info = |used: &str, not_counted: &str, max: &str, policy: &str| {
            format!(
                "# Memory\r\nused_memory:{used}\r\nused_memory_human:x\r\nmaxmemory:{max}\r\n\
                 maxmemory_human:x\r\nmaxmemory_policy:{policy}\r\n\
                 mem_not_counted_for_evict:{not_counted}\r\n"
            )
        };
        let full = out_of_memory_of(&info("2000", "0", "1500", "noeviction")).expect("full");
        assert_eq!((full.used, full.maxmemory), (2000, 1500));
        // At maxmemory exactly, Redis still takes writes.
        assert_eq!(
            out_of_memory_of(&info("1500", "0", "1500", "noeviction")),
            None
        );
        // Replication and AOF buffers are not counted against maxmemory.
        assert_eq!(
            out_of_memory_of(&info("2000", "600", "1500", "noeviction")),
            None
        );
        // No limit; or a policy that evicts (refused on its own).
        assert_eq!(
            out_of_memory_of(&info("2000", "0", "0", "noeviction")),
            None
        );
        assert_eq!(
            out_of_memory_of(&info("2000", "0", "1500", "allkeys-lru")),
            None
        );
        // Without the counted-out field (older or compatible servers): used memory alone.
        let old =
            "# Memory\r\nused_memory:2000\r\nmaxmemory:1500\r\nmaxmemory_policy:noeviction\r\n";
        assert!(out_of_memory_of(old).is_some());
        assert_eq!(out_of_memory_of("# Memory\r\nused_memory:1000\r\n"), None);
    }
}
