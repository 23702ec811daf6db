//! The Redis store: limits shared by many servers and worker processes.
//!
//! Each operation of the state machine is one atomic Lua script (`limiter.lua`), run with
//! EVALSHA (reloaded on NOSCRIPT) on one multiplexed connection, on Redis's own clock. All keys
//! of a limiter share the hash tag `{name}`, so it runs unchanged on Redis Cluster. Queued
//! waiters are woken by a message on their server's channel, published by the script that
//! granted them after recording the outcome; no waiter polls. A timer per limiter, armed at the
//! nearest deadline the scripts report, reclaims expired leases when there is no traffic.
//! See `docs/redis.md` for the key layout, each script step by step, and the guarantees.

mod conn;
mod limiter;
mod sentinel;
mod wake;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use redis::aio::ConnectionManagerConfig;

pub use self::conn::RedisSecurity;
use self::conn::{Conn, PubSubSource};
pub use self::limiter::RedisLimiter;
use crate::core::LimiterStatus;
use crate::error::StoreError;
use crate::spec::{LimiterSpec, MAX_LEASE, MAX_WAIT};
use crate::store::{LimiterBackend, Store};
use crate::types::LimiterName;

/// How to reach Redis.
#[derive(Debug, Clone)]
pub struct RedisConfig {
    /// `redis://host:port` (`rediss://` for TLS) of a standalone server, the seed nodes of a
    /// cluster, or `redis+sentinel://HOST:PORT,HOST:PORT/MASTER` (see `sentinel.rs`).
    pub urls: Vec<String>,
    /// Treat `urls` as a Redis Cluster (implied by more than one URL).
    pub cluster: bool,
    /// Bound on every round trip: an operation fails with `Unavailable` after this long
    /// instead of hanging while Redis is down.
    pub response_timeout: Duration,
    /// Keys of a limiter not used for this long expire (every operation refreshes them).
    /// Never below a day plus the longest wait, so live state cannot vanish.
    pub idle_ttl: Duration,
    /// Prefix of every key and channel, to share one Redis between deployments.
    pub prefix: String,
    /// TLS files and ACL credentials (see `conn.rs`).
    pub security: RedisSecurity,
}

impl RedisConfig {
    /// A standalone Redis at `url`, with defaults for the rest.
    pub fn new(url: impl Into<String>) -> Self {
        RedisConfig {
            urls: vec![url.into()],
            cluster: false,
            response_timeout: Duration::from_secs(2),
            idle_ttl: Duration::from_secs(7 * 24 * 3600),
            prefix: "fg".into(),
            security: RedisSecurity::default(),
        }
    }

    /// A Redis Cluster reached through these seed nodes.
    pub fn cluster(urls: Vec<String>) -> Self {
        RedisConfig {
            urls,
            cluster: true,
            ..RedisConfig::new("")
        }
    }

    fn ttl_ms(&self) -> u64 {
        let floor = MAX_LEASE + MAX_WAIT;
        u64::try_from(self.idle_ttl.max(floor).as_millis()).unwrap_or(u64::MAX)
    }
}

/// Limiters in Redis (standalone or Cluster). Cheap to clone; clones share one connection.
#[derive(Clone)]
pub struct RedisStore {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for RedisStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisStore")
            .field("urls", &self.inner.config.urls)
            .field("server_id", &self.inner.server_id)
            .finish_non_exhaustive()
    }
}

pub(crate) struct Inner {
    /// The multiplexed connection every script runs on.
    conn: Conn,
    /// The limiter script; redis-rs sends EVALSHA and loads it on NOSCRIPT.
    script: redis::Script,
    config: RedisConfig,
    /// Unique per store instance: names this process's wake channel and its waiter keys.
    server_id: String,
    /// The channel scripts publish this store's waiters' outcomes on.
    channel: String,
    /// Numbers waiter keys.
    next_waiter: AtomicU64,
    /// Queued acquires of this process, by waiter key, and where their outcome goes.
    waiters: Mutex<HashMap<String, wake::Pending>>,
    /// Queued acquires that went away while Redis could not be told: cancelled (and a raced
    /// grant released) as soon as Redis answers again, so they do not hold a place or a permit.
    orphans: Mutex<Vec<(LimiterName, String)>>,
    /// When each limiter's timer is set to fire; a new deadline only spawns a timer if earlier.
    timers: Mutex<HashMap<LimiterName, tokio::time::Instant>>,
    /// Ends the subscription task when the store is dropped.
    closing: Arc<tokio::sync::Notify>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        self.closing.notify_waiters();
        self.closing.notify_one();
    }
}

pub(crate) fn unavailable(e: impl std::fmt::Display) -> StoreError {
    StoreError::Unavailable(format!("redis: {e}"))
}

fn unique_id() -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    static N: AtomicU64 = AtomicU64::new(0);
    let n = N.fetch_add(1, Ordering::Relaxed);
    format!(
        "{:x}{:x}{n:x}",
        nanos & 0xffff_ffff_ffff,
        std::process::id()
    )
}

impl RedisStore {
    /// Connects, and subscribes to this store's wake channel before returning, so no wake-up
    /// can be missed.
    pub async fn connect(config: RedisConfig) -> Result<Self, StoreError> {
        let first = config
            .urls
            .first()
            .cloned()
            .ok_or_else(|| StoreError::Unavailable("redis: no URL given".into()))?;
        let cluster = config.cluster || config.urls.len() > 1;
        let manager_config = ConnectionManagerConfig::new()
            .set_response_timeout(Some(config.response_timeout))
            .set_connection_timeout(Some(config.response_timeout))
            .set_number_of_retries(1)
            .set_max_delay(Duration::from_millis(500));
        let (conn, pubsub_client) = if let Some(target) = sentinel::parse(&first) {
            let s = sentinel::Sentinel::connect(
                target?,
                config.security.clone(),
                manager_config,
                config.response_timeout,
            )
            .await?;
            (Conn::Sentinel(Arc::clone(&s)), PubSubSource::Sentinel(s))
        } else if cluster {
            let builder = redis::cluster::ClusterClientBuilder::new(config.urls.clone())
                .response_timeout(config.response_timeout)
                .connection_timeout(config.response_timeout);
            let client = config
                .security
                .cluster(builder)?
                .build()
                .map_err(unavailable)?;
            let conn = Conn::Cluster(client.get_async_connection().await.map_err(unavailable)?);
            // Classic PUBLISH reaches subscribers on every node of a cluster, so one
            // subscription to any node suffices.
            (
                conn,
                PubSubSource::Fixed(Box::new(config.security.client(&first)?)),
            )
        } else {
            let client = config.security.client(&first)?;
            let conn = Conn::Single(
                client
                    .get_connection_manager_with_config(manager_config)
                    .await
                    .map_err(unavailable)?,
            );
            (conn, PubSubSource::Fixed(Box::new(client)))
        };
        let server_id = unique_id();
        let channel = format!("{}:wake:{}", config.prefix, server_id);
        let inner = Arc::new(Inner {
            conn,
            script: redis::Script::new(include_str!("limiter.lua")),
            config,
            server_id,
            channel,
            next_waiter: AtomicU64::new(0),
            waiters: Mutex::new(HashMap::new()),
            orphans: Mutex::new(Vec::new()),
            timers: Mutex::new(HashMap::new()),
            closing: Arc::new(tokio::sync::Notify::new()),
        });
        wake::subscribe(&inner, pubsub_client).await?;
        Ok(RedisStore { inner })
    }

    fn registry_key(&self) -> String {
        format!("{}:limiters", self.inner.config.prefix)
    }

    fn handle(&self, name: &LimiterName) -> RedisLimiter {
        RedisLimiter::new(Arc::clone(&self.inner), name.clone())
    }
}

impl Inner {
    fn lock_waiters(&self) -> std::sync::MutexGuard<'_, HashMap<String, wake::Pending>> {
        self.waiters.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn lock_orphans(&self) -> std::sync::MutexGuard<'_, Vec<(LimiterName, String)>> {
        self.orphans.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// Cancels the orphaned waiters (see `Inner::orphans`) now that Redis answers; those it still
/// cannot reach go back on the list.
/// Boxed with an explicit `Send`: it calls scripts, whose calls may start it again.
pub(crate) fn retry_orphans(
    inner: Arc<Inner>,
) -> std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>> {
    Box::pin(async move {
        let orphans = std::mem::take(&mut *inner.lock_orphans());
        for (name, key) in orphans {
            RedisLimiter::new(Arc::clone(&inner), name)
                .cancel_orphan(key)
                .await;
        }
    })
}

impl Store for RedisStore {
    type Limiter = RedisLimiter;

    async fn put_limiter(
        &self,
        name: &LimiterName,
        spec: LimiterSpec,
    ) -> Result<LimiterStatus, StoreError> {
        spec.validate()?;
        let status = self.handle(name).put(&spec).await?;
        let mut conn = self.inner.conn.clone();
        let ttl = self.inner.config.ttl_ms();
        redis::pipe()
            .sadd(self.registry_key(), name.as_str())
            .ignore()
            .pexpire(self.registry_key(), i64::try_from(ttl).unwrap_or(i64::MAX))
            .ignore()
            .query_async::<()>(&mut conn)
            .await
            .map_err(unavailable)?;
        Ok(status)
    }

    async fn delete_limiter(&self, name: &LimiterName) -> Result<bool, StoreError> {
        let deleted = self.handle(name).delete().await?;
        let mut conn = self.inner.conn.clone();
        redis::cmd("SREM")
            .arg(self.registry_key())
            .arg(name.as_str())
            .query_async::<()>(&mut conn)
            .await
            .map_err(unavailable)?;
        Ok(deleted)
    }

    async fn list_limiters(&self) -> Result<Vec<LimiterStatus>, StoreError> {
        let mut conn = self.inner.conn.clone();
        let mut names: Vec<String> = redis::cmd("SMEMBERS")
            .arg(self.registry_key())
            .query_async(&mut conn)
            .await
            .map_err(unavailable)?;
        names.sort_unstable();
        let mut out = Vec::with_capacity(names.len());
        for raw in names {
            let Ok(name) = LimiterName::new(&raw) else {
                continue;
            };
            match self.handle(&name).status().await {
                Ok(status) => out.push(status),
                // Expired for idleness, or deleted by another server: forget the name.
                Err(StoreError::UnknownLimiter(_)) => {
                    redis::cmd("SREM")
                        .arg(self.registry_key())
                        .arg(&raw)
                        .query_async::<()>(&mut conn)
                        .await
                        .map_err(unavailable)?;
                }
                Err(e) => return Err(e),
            }
        }
        Ok(out)
    }

    /// Lazy: no round trip. An operation on a limiter that does not exist answers
    /// `UnknownLimiter` (or "not held" for release and extend).
    async fn limiter(&self, name: &LimiterName) -> Result<RedisLimiter, StoreError> {
        Ok(self.handle(name))
    }
}
