//! The Redis store: limits shared by many servers and worker processes.
//!
//! Each operation of the state machine is one atomic Lua script (the parts of `lua/`, joined by `script.rs`), run with
//! EVALSHA (reloaded on NOSCRIPT) on one multiplexed connection (releases on a second one, on
//! standalone Redis), on Redis's own clock. All keys
//! of a limiter share the hash tag `{name}`, so it runs unchanged on Redis Cluster. Queued
//! waiters are woken by a message on their server's channel, published by the script that
//! granted them after recording the outcome; no waiter polls. A timer per limiter, armed at the
//! nearest deadline the scripts report, reclaims expired leases when there is no traffic.
//! See `docs/redis.md` for the key layout, each script step by step, and the guarantees.

mod conn;
mod eval;
mod evict;
mod generation;
mod keyed;
mod keyed_revive;
mod limiter;
mod pubsub_nodes;
mod revive;
mod script;
mod sentinel;
mod shard;
mod wake;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use redis::aio::ConnectionManagerConfig;

pub use self::conn::{redact_url, RedisSecurity};
use self::conn::{Conn, PubSubSource};
pub use self::evict::{EvictingRedis, RedisOutOfMemory};
pub use self::limiter::RedisLimiter;
#[doc(hidden)]
pub use self::script::{keyed_script_source, limiter_keys, script_source, status_schema};
pub use self::sentinel::check_sentinel_url;
use crate::core::LimiterStatus;
use crate::error::StoreError;
use crate::spec::{LimiterSpec, MAX_LEASE, MAX_WAIT};
use crate::store::{LimiterBackend, Store};
use crate::types::LimiterName;

/// How to reach Redis.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct RedisConfig {
    /// `redis://host:port` (`rediss://` for TLS) of a standalone server, the seed nodes of a
    /// cluster, or `redis+sentinel://HOST:PORT,HOST:PORT/MASTER` (see `sentinel.rs`).
    pub urls: Vec<String>,
    /// Treat `urls` as a Redis Cluster (implied by more than one URL).
    pub cluster: bool,
    /// Bound on every round trip: an operation fails with `Unavailable` after this long
    /// instead of hanging while Redis is down.
    pub response_timeout: Duration,
    /// Keys of a limiter not used for this long expire (every operation refreshes them); a
    /// limiter with a rate keeps them at least as long as its debt can run (interval × burst,
    /// plus the longest wait and an hour), so a re-created one cannot grant a burst again on
    /// top of a debt still running. Never below a day plus the longest wait, so live state
    /// cannot vanish; at most 100 years (a longer one, `Duration::MAX` included, is taken as
    /// that: Redis refuses a TTL past its range). Give every store sharing a Redis the same
    /// one: a key a store creates gets that store's TTL, so one created through a store with a
    /// shorter one (a keyed limiter's override, say) may expire before the rest of its limiter
    /// when it goes unused for a while (the key then runs at the per-key default).
    pub idle_ttl: Duration,
    /// Prefix of every key and channel, to share one Redis between deployments.
    pub prefix: String,
    /// Learning window after a limiter's state was lost (see `docs/learning.md`): how long a
    /// re-created limiter grants nothing while heartbeating holders re-claim their permits.
    /// `None`: each limiter's default lease. Zero: no learning (a re-created limiter grants at
    /// once, and may over-admit while holders of lost permits still work).
    pub learning_window: Option<Duration>,
    /// Most limiters the registry may hold; creating one more answers `TooManyLimiters`.
    /// `None`: no cap.
    pub max_limiters: Option<usize>,
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
            learning_window: None,
            max_limiters: None,
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
        // Redis answers a TTL past its range (and the script's, written from a Lua number,
        // from about 1e17 ms) "value is not an integer or out of range".
        let ceiling = Duration::from_secs(100 * 365 * 24 * 3600);
        u64::try_from(self.idle_ttl.clamp(floor, ceiling).as_millis()).unwrap_or(u64::MAX)
    }

    /// The listing set's least TTL: a limiter's plus [`revive::RELIST_EVERY`], so the set
    /// outlives every limiter still in use (see `RedisLimiter::after_use`); more for a limiter
    /// kept longer for its rate's debt (`revive::register`).
    fn listing_ttl_ms(&self) -> u64 {
        let every = u64::try_from(revive::RELIST_EVERY.as_millis()).unwrap_or(u64::MAX);
        self.ttl_ms().saturating_add(every)
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
    /// The multiplexed connection every script but a release runs on.
    conn: Conn,
    /// The connection releases run on: a release frees a permit a queued waiter may be waiting
    /// for, and on the shared connection it queued behind the other requests in flight (3 on
    /// average at saturation, `docs/redis.md`). A second `ConnectionManager` for standalone
    /// Redis; under Cluster and Sentinel it is `conn` itself.
    release_conn: Conn,
    /// The limiter scripts, sent by EVALSHA; on NOSCRIPT, loaded once the master is checked.
    /// They name the master last checked, so each master has SHA1s of its own (`eval.rs`).
    scripts: Mutex<Arc<eval::Scripts>>,
    /// Limiters this store has seen keyed: their operations go to the keyed script.
    keyed: Mutex<std::collections::HashSet<LimiterName>>,
    config: RedisConfig,
    /// Unique per store instance: names this process's wake channel and its waiter keys.
    server_id: String,
    /// The channel scripts publish this store's waiters' outcomes on.
    channel: String,
    /// Numbers waiter keys.
    next_waiter: AtomicU64,
    /// Orders this store's script calls and queued replies, so a revival can tell which of
    /// this process's waiters queued on the lost incarnation (`revive.rs`).
    order: AtomicU64,
    /// Queued acquires of this process, by waiter key, and where their outcome goes.
    waiters: Mutex<HashMap<String, wake::Pending>>,
    /// Queued acquires that went away while Redis could not be told: cancelled (and a raced
    /// grant released) as soon as Redis answers again, so they do not hold a place or a permit.
    orphans: Mutex<Vec<(LimiterName, String)>>,
    /// When each limiter's timer is set to fire; a new deadline only spawns a timer if earlier.
    timers: Mutex<HashMap<LimiterName, tokio::time::Instant>>,
    /// Ends the subscription task when the store is dropped.
    closing: Arc<tokio::sync::Notify>,
    /// Specs of the limiters this store knows, to re-create one that vanished (`revive.rs`).
    known: Mutex<revive::Known>,
    /// The master's identity and the limiters to put in a learning window after it changed
    /// (`generation.rs`).
    generation: Mutex<generation::Generation>,
    /// Requests failed since the master was last checked: check before the next one.
    suspect: generation::Suspicions,
    /// On a Redis Cluster, the master last checked per slot, and its scripts (`shard.rs`).
    shards: Mutex<shard::Shards>,
    /// The masters whose memory policy may evict keys: the store refuses to serve while there
    /// is one (`evict.rs`).
    eviction: evict::EvictionGuard,
    /// Some limiter is to learn (so the hot path skips the lock when none is).
    relearn_pending: AtomicBool,
    /// When this store last dropped gone names at the `max_limiters` cap
    /// (`RedisStore::unlist_gone_names`), which it does at most every [`PRUNE_EVERY`].
    pruned_at: Mutex<Option<std::time::Instant>>,
    /// Changes of the master this store noticed (`generation.rs`; a Cluster counts them per
    /// slot, `shard.rs`): a grant whose request was
    /// in flight across one may come from the older state, before its learning window.
    changes: AtomicU64,
    /// Idempotent acquires of this process whose caller went away while they waited, by waiter
    /// key: the attempt that owned each. A grant that reaches this process for one of them is
    /// given up at once (nobody here waits for it); otherwise the grace for a retry ends it.
    abandoned: Mutex<HashMap<String, String>>,
    /// The runtime the store was connected on: where a permit or a queued acquire dropped on a
    /// thread with no tokio context (a `std::thread` worker) sends its release or cancel.
    /// Without it they were skipped, the permit held for its whole lease and the waiter left
    /// queued until its wait ended (`tests/sync_drop.rs`).
    runtime: Option<tokio::runtime::Handle>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        self.closing.notify_waiters();
        self.closing.notify_one();
    }
}

pub(crate) fn unavailable(e: impl Cause) -> StoreError {
    StoreError::Unavailable(e.unavailable())
}

/// What [`unavailable`] takes: a Redis error (kept as the error's source) or a message.
pub(crate) trait Cause {
    /// The `redis: ...` failure this stands for.
    fn unavailable(self) -> crate::error::Unavailable;
}

impl Cause for redis::RedisError {
    fn unavailable(self) -> crate::error::Unavailable {
        crate::error::Unavailable::caused_by("redis", self)
    }
}

impl Cause for String {
    fn unavailable(self) -> crate::error::Unavailable {
        format!("redis: {self}").into()
    }
}

impl Cause for &str {
    fn unavailable(self) -> crate::error::Unavailable {
        format!("redis: {self}").into()
    }
}

/// Runs `op`, and once more if it failed because the connection was dead (Redis restarted, or
/// the connection was cut): the connection reconnects by itself, but the request that found it
/// dead fails, and without a retry the first request after every Redis restart would answer
/// 503. Timeouts are not retried (a stalled Redis must fail fast). A request whose connection
/// dropped after Redis ran it runs twice: every operation is idempotent but acquire and
/// schedule, whose duplicate is a grant nobody holds (reclaimed at its lease) or tokens
/// reserved twice; neither can put more permits out than the limit.
pub(crate) async fn retry_dropped<T, F, Fut>(mut op: F) -> redis::RedisResult<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = redis::RedisResult<T>>,
{
    match op().await {
        Err(e) if e.is_connection_dropped() => {
            tracing::debug!(error = %e, "redis connection was dead; retrying once");
            op().await
        }
        other => other,
    }
}

/// Limiter statuses fetched at once by `list_limiters`: the multiplexed connection pipelines
/// them, so a listing costs about (limiters / this) round trips instead of one per limiter.
const LIST_CONCURRENCY: usize = 128;

/// How often a store refused a create at the `max_limiters` cap looks for names of limiters
/// that are gone (`RedisStore::register`).
const PRUNE_EVERY: Duration = Duration::from_secs(10);

/// How long a create's mark (`RedisStore::creating_key`, set before its name is registered)
/// keeps the name from being dropped as gone before its limiter exists, at least: past it the
/// put has failed or been given up (each call has the response timeout; the mark is longer).
const CREATING_AT_LEAST: Duration = Duration::from_secs(60);

/// Adds a name to the registry unless that would put more than `ARGV[2]` names in it (a name
/// already there is always fine). One script, so servers creating limiters at once cannot
/// overshoot the cap together (and a create in flight is not dropped as gone meanwhile:
/// `RedisStore::unlist`).
/// The set's TTL is raised to `ARGV[3]`, never lowered (a limiter kept for its rate's debt
/// raised it: `revive::register`).
const REGISTER: &str = r"
if redis.call('SISMEMBER', KEYS[1], ARGV[1]) == 0 then
  if tonumber(ARGV[2]) >= 0 and redis.call('SCARD', KEYS[1]) >= tonumber(ARGV[2]) then return 0 end
  redis.call('SADD', KEYS[1], ARGV[1])
end
if redis.call('PTTL', KEYS[1]) < tonumber(ARGV[3]) then redis.call('PEXPIRE', KEYS[1], ARGV[3]) end
return 1
";

/// Adds a name to the listing set, uncapped (`revive::register`), and raises the set's TTL to
/// `ARGV[2]`, never lowering it. (`PEXPIRE ... GT` would need Redis 7.)
const LIST: &str = r"
redis.call('SADD', KEYS[1], ARGV[1])
if redis.call('PTTL', KEYS[1]) < tonumber(ARGV[2]) then redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
return 1
";

/// Marks a create in flight (`RedisStore::register`): adds its own member `ARGV[1]` to the
/// limiter's create marks, which live `ARGV[2]` ms from the last. One member per create, so
/// that one create's end (a refusal at the cap, above all) does not unmark another's of the
/// same name still in flight.
const MARK_CREATING: &str = r"
redis.call('SADD', KEYS[1], ARGV[1])
redis.call('PEXPIRE', KEYS[1], ARGV[2])
return 1
";

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
    ///
    /// # Errors
    ///
    /// [`StoreError::Unavailable`] when no URL is given, a URL or a TLS file is bad, or Redis
    /// does not answer; its source is the underlying error. Also when Redis may evict keys
    /// (`maxmemory` set with a `maxmemory-policy` other than `noeviction`, read from
    /// `INFO memory`; on a Cluster, of any master): the source is then an [`EvictingRedis`].
    /// The store keeps checking while it runs, and answers every operation so while it is so.
    ///
    /// # Cancel safety
    ///
    /// Cancel-safe: dropping the future closes whatever connections it opened.
    ///
    /// ```no_run
    /// use floodgate::{Floodgate, LimiterSpec, RedisConfig, RedisStore};
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// let store = RedisStore::connect(RedisConfig::new("redis://127.0.0.1:6379")).await?;
    /// let gate = Floodgate::with_store(store);
    /// gate.define("snuba", LimiterSpec::concurrency(50)).await?;
    /// # Ok(())
    /// # }
    /// ```
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
        let (conn, release_conn, pubsub_client) = if let Some(target) = sentinel::parse(&first) {
            let s = sentinel::Sentinel::connect(
                target?,
                config.security.clone(),
                manager_config,
                config.response_timeout,
            )
            .await?;
            let conn = Conn::Sentinel(Arc::clone(&s));
            (conn.clone(), conn, PubSubSource::Sentinel(s))
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
            // subscription to any node suffices; when that node is lost, another takes over.
            // Checked here (a CA file with a plain URL is refused), not at each reconnect.
            config.security.client(&first)?;
            let nodes = pubsub_nodes::ClusterNodes::new(
                &config.urls,
                conn.clone(),
                config.security.clone(),
                config.response_timeout,
            );
            // The other nodes known now, so that losing a lone seed loses no wake-up. Not
            // fatal: they are asked again when no known node answers.
            if let Err(e) = nodes.discover().await {
                tracing::debug!(error = %e, "cluster nodes for the wake-up subscription unknown");
            }
            (conn.clone(), conn, PubSubSource::Cluster(Arc::new(nodes)))
        } else {
            let client = config.security.client(&first)?;
            let conn = Conn::Single(
                client
                    .get_connection_manager_with_config(manager_config.clone())
                    .await
                    .map_err(unavailable)?,
            );
            let release_conn = Conn::Single(
                client
                    .get_connection_manager_with_config(manager_config)
                    .await
                    .map_err(unavailable)?,
            );
            (conn, release_conn, PubSubSource::Fixed(Box::new(client)))
        };
        // A Redis that may evict a limiter's keys is refused before anything is done on it.
        let eviction = evict::EvictionGuard::at_connect(&conn).await?;
        // Whom the store starts on, to notice a failover or a restart later.
        let run_id = generation::master_run_id(&conn).await?;
        let server_id = unique_id();
        let channel = format!("{}:wake:{}", config.prefix, server_id);
        let inner = Arc::new(Inner {
            conn,
            release_conn,
            scripts: Mutex::new(Arc::new(eval::Scripts::new(run_id.as_deref()))),
            keyed: Mutex::new(std::collections::HashSet::new()),
            config,
            server_id,
            channel,
            next_waiter: AtomicU64::new(0),
            order: AtomicU64::new(0),
            waiters: Mutex::new(HashMap::new()),
            orphans: Mutex::new(Vec::new()),
            timers: Mutex::new(HashMap::new()),
            closing: Arc::new(tokio::sync::Notify::new()),
            known: Mutex::new(revive::Known::default()),
            generation: Mutex::new(generation::Generation::new(run_id)),
            suspect: generation::Suspicions::default(),
            shards: Mutex::new(shard::Shards::default()),
            eviction,
            relearn_pending: AtomicBool::new(false),
            pruned_at: Mutex::new(None),
            changes: AtomicU64::new(0),
            abandoned: Mutex::new(HashMap::new()),
            runtime: tokio::runtime::Handle::try_current().ok(),
        });
        wake::subscribe(&inner, pubsub_client).await?;
        evict::spawn_recheck(Arc::downgrade(&inner));
        Ok(RedisStore { inner })
    }

    fn registry_key(&self) -> String {
        format!("{}:limiters", self.inner.config.prefix)
    }

    /// The marks of the creates in flight (`register`), a set with one member each, in the
    /// limiter's slot; each removed once its limiter exists, and the set expires.
    fn creating_key(&self, name: &LimiterName) -> String {
        format!(
            "{}:{{{}}}:creating",
            self.inner.config.prefix,
            name.as_str()
        )
    }

    fn handle(&self, name: &LimiterName) -> RedisLimiter {
        RedisLimiter::new(Arc::clone(&self.inner), name.clone())
    }
}

impl Inner {
    /// Where to spawn the work of a drop: the current runtime, or else the store's own.
    pub(crate) fn runtime(&self) -> Option<tokio::runtime::Handle> {
        tokio::runtime::Handle::try_current()
            .ok()
            .or_else(|| self.runtime.clone())
    }

    fn lock_waiters(&self) -> std::sync::MutexGuard<'_, HashMap<String, wake::Pending>> {
        self.waiters.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn lock_abandoned(&self) -> std::sync::MutexGuard<'_, HashMap<String, String>> {
        self.abandoned
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
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

impl RedisStore {
    async fn put_learning(
        &self,
        name: &LimiterName,
        spec: LimiterSpec,
        learn: Option<Duration>,
    ) -> Result<LimiterStatus, StoreError> {
        spec.validate()?;
        let mark = self.register(name).await?;
        let handle = self.handle(name);
        // A limiter this store knew that vanished is re-created learning, whoever puts it.
        let learn = learn.or_else(|| handle.known_window());
        let status = handle.put(&spec, learn).await?;
        if handle.take_crossed() {
            // Two puts of this limiter through this store crossed, and the one Redis ran
            // first may have been answered last: the spec Redis has is read (a read sent now
            // comes after both). Kept as answered, the earlier spec was the one a revival
            // re-created the limiter with.
            if let Err(e) = LimiterBackend::status(&handle).await {
                tracing::debug!(limiter = %name, error = %e, "spec not read again");
            }
        }
        revive::register(&self.inner, name).await?;
        self.unmark_creating(name, mark.as_deref()).await;
        Ok(status)
    }

    /// Removes the mark `mark` that `register` set, once the limiter exists and is listed
    /// (another create's of the same name stays); nothing if it set none.
    async fn unmark_creating(&self, name: &LimiterName, mark: Option<&str>) {
        let Some(mark) = mark else { return };
        let mut conn = self.inner.conn.clone();
        let removed = redis::cmd("SREM")
            .arg(self.creating_key(name))
            .arg(mark)
            .query_async::<()>(&mut conn)
            .await;
        if let Err(e) = removed {
            // Harmless: it expires, and meanwhile only keeps a listed name from being dropped.
            tracing::debug!(limiter = %name, error = %e, "create mark not removed");
        }
    }

    /// Adds the name to the registry, refused past `max_limiters`. Registered before the
    /// limiter is put, so that the cap is checked before it exists; a put that fails after
    /// this leaves a name the first listing after its mark expired drops. The create's mark
    /// (`unmark_creating` removes it), if the store has a cap.
    async fn register(&self, name: &LimiterName) -> Result<Option<String>, StoreError> {
        self.inner.eviction.check()?;
        let mark = match self.inner.config.max_limiters {
            Some(_) => Some(self.mark_creating(name).await?),
            // No cap to pass: a name dropped while its create is in flight is listed again by
            // its put (`revive::register`), and a put costs no mark and unmark.
            None => None,
        };
        let ttl = self.inner.config.listing_ttl_ms();
        let max = self
            .inner
            .config
            .max_limiters
            .map_or(-1, |m| i64::try_from(m).unwrap_or(i64::MAX));
        let script = redis::Script::new(REGISTER);
        let mut invocation = script.prepare_invoke();
        invocation
            .key(self.registry_key())
            .arg(name.as_str())
            .arg(max)
            .arg(ttl);
        let invoke = || {
            retry_dropped(|| {
                let mut conn = self.inner.conn.clone();
                let invocation = &invocation;
                async move { invocation.invoke_async::<i64>(&mut conn).await }
            })
        };
        let mut registered = invoke().await.map_err(unavailable)?;
        // At the cap, the set may hold names of limiters that are gone (expired for idleness:
        // the set outlives them), which only a listing dropped: until one ran, every create
        // was refused though fewer limiters existed. They are dropped here, and the add tried
        // again.
        if registered == 0 && self.prune_due() && self.unlist_gone_names().await? > 0 {
            registered = invoke().await.map_err(unavailable)?;
        }
        if registered == 0 {
            // Not created: no mark left behind (one per refused create, for a minute).
            self.unmark_creating(name, mark.as_deref()).await;
            return Err(StoreError::TooManyLimiters(
                self.inner.config.max_limiters.unwrap_or(0),
            ));
        }
        Ok(mark)
    }

    /// Marks a create of `name` in flight (`register`), before its name is added: a server
    /// dropping the names of limiters that are gone (`unlist`) sees the mark of every create
    /// whose name it read, and leaves the name. Dropped, its place went to another create and
    /// this one's put listed the name again past the cap. Its own mark.
    async fn mark_creating(&self, name: &LimiterName) -> Result<String, StoreError> {
        let creating_ms = self
            .inner
            .config
            .response_timeout
            .saturating_mul(4)
            .max(CREATING_AT_LEAST);
        let mark = unique_id();
        let mut conn = self.inner.conn.clone();
        redis::Script::new(MARK_CREATING)
            .key(self.creating_key(name))
            .arg(&mark)
            .arg(u64::try_from(creating_ms.as_millis()).unwrap_or(u64::MAX))
            .invoke_async::<()>(&mut conn)
            .await
            .map_err(unavailable)?;
        Ok(mark)
    }

    /// Whether a create refused at the cap may look for gone names now: at most every
    /// [`PRUNE_EVERY`], so a client creating limiters over and over at the cap costs Redis
    /// one script each, not a read of every listed limiter each.
    fn prune_due(&self) -> bool {
        let now = std::time::Instant::now();
        let mut at = self
            .inner
            .pruned_at
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let due = at.is_none_or(|last| now.duration_since(last) >= PRUNE_EVERY);
        if due {
            *at = Some(now);
        }
        due
    }

    /// Drops from the listing set the names whose limiter is gone (no `meta`, no create in
    /// flight: `unlist`); how many.
    async fn unlist_gone_names(&self) -> Result<usize, StoreError> {
        let names: Vec<String> = retry_dropped(|| {
            let mut conn = self.inner.conn.clone();
            let key = self.registry_key();
            async move { redis::cmd("SMEMBERS").arg(key).query_async(&mut conn).await }
        })
        .await
        .map_err(unavailable)?;
        let prefix = &self.inner.config.prefix;
        let names: Vec<LimiterName> = names
            .into_iter()
            .filter_map(|raw| LimiterName::new(&raw).ok())
            .collect();
        let ttls: Vec<(LimiterName, Result<i64, StoreError>)> = self
            .per_name(names, "PTTL", |name| {
                script::meta_key(prefix, name.as_str())
            })
            .await;
        let mut gone = Vec::new();
        for (name, ttl) in ttls {
            if ttl? == -2 {
                gone.push(name);
            }
        }
        self.unlist(gone).await
    }

    /// `CMD KEY` for each name's key (`key_of`), `LIST_CONCURRENCY` in flight at once (on a
    /// Cluster each key is in its own name's slot): each name with its reply, in order.
    async fn per_name<T: redis::FromRedisValue>(
        &self,
        names: impl IntoIterator<Item = LimiterName>,
        cmd: &'static str,
        key_of: impl Fn(&LimiterName) -> String,
    ) -> Vec<(LimiterName, Result<T, StoreError>)> {
        use futures_util::stream::{self, StreamExt};
        stream::iter(names)
            .map(|name| {
                let mut conn = self.inner.conn.clone();
                let key = key_of(&name);
                async move {
                    let reply = redis::cmd(cmd)
                        .arg(key)
                        .query_async(&mut conn)
                        .await
                        .map_err(unavailable);
                    (name, reply)
                }
            })
            .buffered(LIST_CONCURRENCY)
            .collect()
            .await
    }

    /// Removes names found gone from the listing set, but for those of a create in flight
    /// (marked by `register` before it added the name: its limiter is not yet put), then adds
    /// back those whose limiter exists again by now, or that are marked by now: one created
    /// under such a name since it was found gone had its name added before this removal, and
    /// nothing would add it again before a store's next relisting (an hour later); one marked
    /// since would list its name again past the cap. How many it removed.
    async fn unlist(&self, gone: Vec<LimiterName>) -> Result<usize, StoreError> {
        use futures_util::stream::{self, StreamExt};
        let marked: Vec<(LimiterName, Result<bool, StoreError>)> = self
            .per_name(gone, "EXISTS", |name| self.creating_key(name))
            .await;
        let mut gone = Vec::new();
        for (name, marked) in marked {
            if !marked? {
                gone.push(name);
            }
        }
        if gone.is_empty() {
            return Ok(0);
        }
        let count = gone.len();
        let mut conn = self.inner.conn.clone();
        redis::cmd("SREM")
            .arg(self.registry_key())
            .arg(gone.iter().map(LimiterName::as_str).collect::<Vec<_>>())
            .query_async::<()>(&mut conn)
            .await
            .map_err(unavailable)?;
        let relisted: Vec<Result<(), StoreError>> = stream::iter(gone)
            .map(|name| {
                let inner = Arc::clone(&self.inner);
                let mut conn = self.inner.conn.clone();
                let (mark, registry) = (self.creating_key(&name), self.registry_key());
                async move {
                    // A create that marked itself and registered the name after the check
                    // above, before the removal: its name is added back (its place was
                    // counted). Left out, the place went to another create, and this one's put
                    // listed the name past the cap.
                    let marked: bool = redis::cmd("EXISTS")
                        .arg(mark)
                        .query_async(&mut conn)
                        .await
                        .map_err(unavailable)?;
                    if !marked {
                        return revive::register(&inner, &name).await;
                    }
                    redis::Script::new(LIST)
                        .key(registry)
                        .arg(name.as_str())
                        .arg(inner.config.listing_ttl_ms())
                        .invoke_async::<()>(&mut conn)
                        .await
                        .map_err(unavailable)
                }
            })
            .buffer_unordered(LIST_CONCURRENCY)
            .collect()
            .await;
        relisted.into_iter().collect::<Result<(), _>>()?;
        Ok(count)
    }
}

impl Store for RedisStore {
    type Limiter = RedisLimiter;

    fn max_limiters(&self) -> Option<usize> {
        self.inner.config.max_limiters
    }

    async fn put_limiter(
        &self,
        name: &LimiterName,
        spec: LimiterSpec,
    ) -> Result<LimiterStatus, StoreError> {
        self.put_learning(name, spec, None).await
    }

    /// Creates it in a learning window of `window` if Redis has no state for it (and it was
    /// not deleted on purpose): a server applying its config at start, when told to.
    async fn restore_limiter(
        &self,
        name: &LimiterName,
        spec: LimiterSpec,
        window: Duration,
    ) -> Result<LimiterStatus, StoreError> {
        self.put_learning(name, spec, Some(window)).await
    }

    async fn put_keyed_limiter(
        &self,
        name: &LimiterName,
        spec: LimiterSpec,
        keyed: crate::core::keyed::KeyedSpec,
    ) -> Result<LimiterStatus, StoreError> {
        self.put_keyed(name, spec, keyed, None).await
    }

    /// Creates it in a learning window of `window` if Redis has no state for it (and it was
    /// not deleted on purpose), as [`restore_limiter`](Store::restore_limiter).
    async fn restore_keyed_limiter(
        &self,
        name: &LimiterName,
        spec: LimiterSpec,
        keyed: crate::core::keyed::KeyedSpec,
        window: Duration,
    ) -> Result<LimiterStatus, StoreError> {
        self.put_keyed(name, spec, keyed, Some(window)).await
    }

    async fn delete_limiter(&self, name: &LimiterName) -> Result<bool, StoreError> {
        let handle = self.handle(name);
        let deleted = handle.delete().await?;
        handle.forget();
        self.inner.mark_keyed(name, false);
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
        use futures_util::stream::{self, StreamExt};
        let mut names: Vec<String> = retry_dropped(|| {
            let mut conn = self.inner.conn.clone();
            let key = self.registry_key();
            async move { redis::cmd("SMEMBERS").arg(key).query_async(&mut conn).await }
        })
        .await
        .map_err(unavailable)?;
        names.sort_unstable();
        let names: Vec<LimiterName> = names
            .iter()
            .filter_map(|raw| LimiterName::new(raw).ok())
            .collect();
        // Many status scripts in flight at once on the multiplexed connection (pipelined), in
        // name order.
        let statuses: Vec<(LimiterName, Result<LimiterStatus, StoreError>)> = stream::iter(names)
            .map(|name| async move {
                let status = self.handle(&name).status().await;
                (name, status)
            })
            .buffered(LIST_CONCURRENCY)
            .collect()
            .await;
        let mut out = Vec::with_capacity(statuses.len());
        let mut gone = Vec::new();
        for (name, status) in statuses {
            match status {
                Ok(status) => out.push(status),
                // Expired for idleness, or deleted by another server: forget the name.
                Err(StoreError::UnknownLimiter(_)) => gone.push(name),
                Err(e) => return Err(e),
            }
        }
        self.unlist(gone).await?;
        Ok(out)
    }

    /// Lazy: no round trip. An operation on a limiter that does not exist answers
    /// `UnknownLimiter` (or "not held" for release and extend).
    async fn limiter(&self, name: &LimiterName) -> Result<RedisLimiter, StoreError> {
        Ok(self.handle(name))
    }

    /// One `INFO memory` on the shared connection (retried once if the connection was dead),
    /// in place of a `PING`: it also reads the memory policy, and fails while Redis may evict
    /// keys, or while it is out of memory under `noeviction` and so refuses writes (the source
    /// is then a [`RedisOutOfMemory`]; `evict.rs`). On a Cluster, `INFO` (default sections) to
    /// every master: a `PING` there went to every master too (redis-rs routes both to all of
    /// them), so one master that does not answer failed it before as well.
    async fn ping(&self) -> Result<(), StoreError> {
        self.inner.check_ready().await
    }
}
