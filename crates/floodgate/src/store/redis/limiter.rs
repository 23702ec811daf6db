//! One limiter in Redis: each operation is one run of the limiter script.

use std::collections::HashMap;
use std::sync::{Arc, LazyLock, PoisonError};
use std::time::Duration;

use tokio::sync::oneshot;

use super::wake::{decode_grant, decode_outcome, Delivery, Pending};
use super::{keyed, unavailable, Inner};
use crate::core::{
    AcquireRequest, Counters, Feedback, Grant, HolderInfo, HoldersView, LimiterStatus, Refusal,
    WaitOutcome, MAX_HOLDERS_LISTED,
};
use crate::error::{AcquireError, ExtendError, StoreError};
use crate::limiter::AcquireOptions;
use crate::spec::{AdaptiveSpec, Algorithm, InvalidField, LimiterSpec, RateSpec};
use crate::store::LimiterBackend;
use crate::types::{FencingToken, LimiterName, ReservationId, Schedule, Timestamp};

/// The read-only holders listing (`holders.lua`); kept apart from the limiter script so the
/// operations' script is unchanged by it. redis-rs sends EVALSHA and loads it on NOSCRIPT.
static HOLDERS_SCRIPT: LazyLock<redis::Script> =
    LazyLock::new(|| redis::Script::new(include_str!("holders.lua")));

mod put;
mod replies;
mod waiting;

use self::waiting::{idempotent_key, QueuedGuard};

/// A handle to one limiter in a [`RedisStore`](super::RedisStore). Cheap to clone.
#[derive(Clone)]
pub struct RedisLimiter {
    pub(super) store: Arc<Inner>,
    pub(super) name: LimiterName,
    /// The limiter's eleven keys, all under the hash tag `{name}` (see `lua/common.lua`).
    keys: Arc<[String; 11]>,
    /// The hash slot of those keys: on a Cluster, the slot whose master is checked before its
    /// calls (`shard.rs`). Computed once, not on every call.
    slot: redis::cluster_routing::Slot,
}

impl std::fmt::Debug for RedisLimiter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisLimiter")
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

pub(super) fn micros(d: Duration) -> String {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX).to_string()
}

pub(super) fn field(reply: &[String], i: usize) -> Result<u64, StoreError> {
    reply
        .get(i)
        .and_then(|s| s.parse::<u64>().ok())
        .ok_or_else(|| unavailable(format!("unexpected script reply {reply:?}")))
}

/// The offsets of a `schedule`/`kschedule` reply (`offsets, o1, o2, ..., next_due`), in µs.
pub(super) fn offsets(reply: &[String]) -> Result<Vec<Duration>, StoreError> {
    reply[1..reply.len().saturating_sub(1)]
        .iter()
        .map(|s| {
            s.parse::<u64>()
                .map(Duration::from_micros)
                .map_err(|_| unavailable("bad offset"))
        })
        .collect()
}

pub(super) fn invalid(reply: &[String]) -> InvalidField {
    let named = reply.get(1).map(String::as_str).unwrap_or("");
    let message = reply.get(2).cloned().unwrap_or_default();
    // The script names only fields of `spec::FIELDS` (a test reads the script to check it); a
    // name outside it is reported as what it is, never pinned on a field it is not.
    match crate::spec::FIELDS.iter().find(|f| **f == named) {
        Some(field) => InvalidField::new(field, message),
        None => InvalidField::new(
            "store",
            format!("the Redis script refused field {named:?}: {message}"),
        ),
    }
}

impl RedisLimiter {
    pub(super) fn new(store: Arc<Inner>, name: LimiterName) -> Self {
        let keys = super::script::limiter_keys(&store.config.prefix, name.as_str());
        let slot = redis::cluster_routing::Slot::for_key(&keys[0]);
        RedisLimiter {
            store,
            name,
            keys: Arc::new(keys),
            slot,
        }
    }

    /// The first of its keys (on a Cluster, it names the limiter's slot: `shard.rs`).
    pub(super) fn first_key(&self) -> &str {
        &self.keys[0]
    }

    /// The hash slot of its keys (`shard.rs`).
    pub(super) fn slot(&self) -> redis::cluster_routing::Slot {
        self.slot
    }

    /// Runs one operation; if the limiter vanished from Redis while this store knew it (state
    /// loss), re-creates it in a learning window and runs the operation again (`revive.rs`).
    pub(super) async fn call(&self, op: &str, args: &[String]) -> Result<Vec<String>, StoreError> {
        self.settle_generation().await?;
        // Before the call: a waiter that queued before this was sent is lost if it finds the
        // limiter gone (`revive.rs`).
        let sent = self.store.tick();
        let reply = self.call_once(op, args).await?;
        if reply.first().map(String::as_str) != Some("unknown") || !super::revive::revives(op) {
            self.after_use(op, &reply);
            return Ok(reply);
        }
        if self.revive(sent).await? {
            return self.call_once(op, args).await;
        }
        Ok(reply)
    }

    /// Runs one operation; arms the limiter's timer at the next deadline the script reports.
    pub(super) async fn call_once(
        &self,
        op: &str,
        args: &[String],
    ) -> Result<Vec<String>, StoreError> {
        // A keyed limiter's operations run in the keyed script (`keyed.rs`).
        let keyed = self.runs_keyed(op);
        let reply = self.run_script(keyed, op, args).await?;
        self.reroute(keyed, op, args, reply).await
    }

    /// Runs one operation in the plain script or (`keyed`) the keyed one.
    pub(super) async fn run_script(
        &self,
        keyed: bool,
        op: &str,
        args: &[String],
    ) -> Result<Vec<String>, StoreError> {
        let keyed_keys = keyed.then(|| self.keyed_keys());
        let keys: Vec<&str> = self
            .keys
            .iter()
            .chain(keyed_keys.iter().flatten())
            .map(String::as_str)
            .collect();
        let ttl = self.store.config.ttl_ms().to_string();
        let argv: Vec<&str> = [op, self.name.as_str(), ttl.as_str()]
            .into_iter()
            .chain(args.iter().map(String::as_str))
            .collect();
        // A release has a connection of its own (see `Inner::release_conn`).
        let conn = if op == "release" {
            &self.store.release_conn
        } else {
            &self.store.conn
        };
        // A dead connection or a Redis new to the script has the master checked first.
        let reply = self.run_evalsha(keyed, &keys, &argv, conn).await?;
        // Redis answers again: clean up after waiters that left while it did not.
        if !self.store.lock_orphans().is_empty() {
            tokio::spawn(super::retry_orphans(Arc::clone(&self.store)));
        }
        if let Some(delay) = reply.last().and_then(|s| s.parse::<i64>().ok()) {
            if let Ok(delay) = u64::try_from(delay) {
                self.arm_timer(Duration::from_micros(delay));
            }
        }
        Ok(reply)
    }

    /// Makes sure an `advance` runs at the next deadline even if no traffic arrives. Only an
    /// earlier deadline than the one already armed spawns a timer, so steady traffic spawns
    /// none.
    fn arm_timer(&self, delay: Duration) {
        // 1 ms after the deadline on Redis's clock, so the advance finds it passed.
        let at = tokio::time::Instant::now() + delay + Duration::from_millis(1);
        {
            let mut timers = self
                .store
                .timers
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            if let Some(armed) = timers.get(&self.name) {
                if *armed <= at {
                    return;
                }
            }
            timers.insert(self.name.clone(), at);
        }
        let Ok(handle) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let weak = Arc::downgrade(&self.store);
        let name = self.name.clone();
        handle.spawn(async move {
            tokio::time::sleep_until(at).await;
            let Some(store) = weak.upgrade() else { return };
            {
                let mut timers = store.timers.lock().unwrap_or_else(PoisonError::into_inner);
                if timers.get(&name) == Some(&at) {
                    timers.remove(&name);
                }
            }
            let limiter = RedisLimiter::new(store, name);
            if let Err(e) = limiter.call("advance", &[]).await {
                tracing::warn!(limiter = %limiter.name, error = %e, "timer pass failed");
                // Try again shortly, so an expiry is not forgotten while Redis is down.
                limiter.arm_timer(Duration::from_secs(1));
            }
        });
    }

    /// Deletes the limiter, then answers its queued waiters (`D`) a batch per script call, so
    /// a long queue never blocks Redis for long.
    pub(super) async fn delete(&self) -> Result<bool, StoreError> {
        let reply = self.call("delete", &[]).await?;
        if reply.first().map(String::as_str) != Some("deleted") {
            return Ok(false);
        }
        let mut left = field(&reply, 1)?;
        while left > 0 {
            left = field(&self.call_once("drain", &[]).await?, 1)?;
        }
        Ok(true)
    }

    /// The recorded outcome of a queued waiter, if decided.
    pub(super) async fn peek(&self, key: &str) -> Result<Option<WaitOutcome>, StoreError> {
        // Before the call, as in `call`: the waiters queued before it are the lost ones.
        let sent = self.store.tick();
        let reply = self.call("peek", &[key.to_owned()]).await?;
        Ok(match reply.first().map(String::as_str) {
            Some("decided") => reply.get(1).and_then(|o| decode_outcome(o)),
            // Gone while this store knows it: its state was lost, not deleted (as a waiter's
            // own timeout concludes). Its waiters here are answered "store unavailable", as a
            // revival answers them; a 404 told their clients the limiter no longer exists.
            Some("unknown") if self.known_window().is_some() => {
                self.answer_lost_waiters(sent);
                None
            }
            Some("unknown") => Some(Err(Refusal::LimiterDeleted)),
            _ => None,
        })
    }

    fn unknown(&self) -> StoreError {
        StoreError::UnknownLimiter(self.name.clone())
    }
}

fn refusal(reply: &[String]) -> Result<Refusal, StoreError> {
    let retry = |i| field(reply, i).map(Duration::from_micros);
    Ok(match reply.first().map(String::as_str) {
        Some("timeout") => Refusal::WaitTimeout {
            retry_after: retry(1)?,
        },
        Some("queue_full") => Refusal::QueueFull {
            retry_after: retry(1)?,
        },
        Some("exceeds") => Refusal::PermitsExceedLimit {
            requested: u32::try_from(field(reply, 1)?).unwrap_or(u32::MAX),
            limit: u32::try_from(field(reply, 2)?).unwrap_or(u32::MAX),
        },
        Some("invalid") => Refusal::Invalid(invalid(reply)),
        _ => return Err(unavailable(format!("unexpected script reply {reply:?}"))),
    })
}

impl RedisLimiter {
    /// An acquire, for `tkey` of a keyed limiter or (`None`) of a plain one.
    pub(super) async fn acquire_in(
        &self,
        options: AcquireOptions,
        tkey: Option<&str>,
    ) -> Result<Grant, AcquireError> {
        let req: AcquireRequest = options.into_request();
        let n = self
            .store
            .next_waiter
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let attempt = format!("{}.{n}", self.store.server_id);
        // An idempotent acquire's key is its request id's, so a retry finds its wait or grant.
        let key = match &req.request_id {
            Some(id) => idempotent_key(id),
            None => attempt.clone(),
        };
        // Registered before the script runs: a wake-up can arrive before its reply does.
        let (tx, rx) = oneshot::channel();
        // A repeat in this process displaces its first attempt's entry: put back below if the
        // repeat is refused (it asked for other permits), so that attempt goes on waiting.
        let displaced = self.store.lock_waiters().insert(
            key.clone(),
            Pending {
                limiter: self.name.clone(),
                tx,
                attempt: n,
                queued: None,
            },
        );
        // Armed from here on: if this future is dropped, or the call fails without our knowing
        // whether the script ran, the guard cancels (and undoes a raced grant).
        let mut guard = QueuedGuard {
            limiter: self.clone(),
            key: key.clone(),
            attempt: n,
            idempotent: req.request_id.is_some(),
            armed: true,
        };
        let mut args = vec![
            req.permits.to_string(),
            req.lease.map(micros).unwrap_or_default(),
            req.wait.map(micros).unwrap_or_default(),
            key.clone(),
            self.store.channel.clone(),
            req.holder.as_deref().unwrap_or_default().to_owned(),
            attempt,
        ];
        args.extend(tkey.map(str::to_owned));
        let op = if tkey.is_some() {
            "kacquire"
        } else {
            "acquire"
        };
        let changes = self.changes_seen();
        let reply = self.call(op, &args).await?;
        let decided = matches!(
            reply.first().map(String::as_str),
            Some("granted" | "queued")
        );
        if let Some(first) = displaced {
            if decided {
                // The wait is the repeat's now: the first attempt is told so, not left to read
                // its dropped sender as a lost subscription.
                let _ = first.tx.send(Delivery::Superseded);
            } else {
                let mut waiters = self.store.lock_waiters();
                if waiters.get(&key).is_some_and(|p| p.attempt == n) {
                    waiters.insert(key.clone(), first);
                }
            }
        }
        match reply.first().map(String::as_str) {
            Some("granted") if self.changed_since(changes).await? => {
                // The armed guard gives the grant back.
                Err(unavailable(
                    "redis changed (a restart or a failover) while this acquire ran; retry",
                )
                .into())
            }
            Some("granted") => {
                guard.disarm();
                decode_grant(&reply[1..]).ok_or_else(|| unavailable("bad grant").into())
            }
            Some("queued") => {
                self.mark_queued(&key, n);
                let wait = Duration::from_micros(field(&reply, 1)?);
                let outcome = tokio::select! {
                    outcome = rx => match outcome {
                        Ok(Delivery::Outcome(outcome)) => {
                            guard.disarm();
                            outcome
                        }
                        // The repeat owns the wait and its guard: nothing to undo here.
                        Ok(Delivery::Superseded) => {
                            guard.disarm();
                            return Err(AcquireError::Superseded);
                        }
                        // Its queue went with the limiter's state. The guard stays armed, as
                        // below: its cancel finds nothing, or anything a revival made of it.
                        Ok(Delivery::StateLost) => {
                            return Err(unavailable(
                                "redis lost the limiter's state (a restart or a failover) while \
                                 this acquire waited; retry",
                            )
                            .into());
                        }
                        // The subscription was lost (Redis down?): fail fast rather than wait
                        // blind. The armed guard cancels the queued entry, now or once Redis
                        // answers again.
                        Err(_) => {
                            return Err(unavailable("the wake-up subscription was lost").into())
                        }
                    },
                    _ = tokio::time::sleep(wait) => {
                        // Our own timer ran out (the wake-up may be lost or late): the script
                        // decides, and returns a grant that got there first.
                        // If the cancel fails, the still-armed guard retries it (as a drop,
                        // returning any grant) once Redis answers.
                        let decided = self.cancel(&key, "timeout").await?;
                        guard.disarm();
                        match decided {
                            // Neither queued nor decided, and never seen deleted: the state was
                            // lost with the queue (docs/learning.md). Retryable, not a deletion.
                            Some(Err(Refusal::LimiterDeleted)) if self.known_window().is_some() => {
                                return Err(unavailable(
                                    "the limiter's state was lost while the acquire waited; retry",
                                )
                                .into());
                            }
                            Some(outcome) => outcome,
                            None => Err(Refusal::WaitTimeout { retry_after: wait }),
                        }
                    }
                };
                // A deletion during the wait is `Refused(LimiterDeleted)`, as on every store.
                outcome.map_err(AcquireError::Refused)
            }
            Some("unknown") => {
                guard.disarm();
                Err(self.unknown().into())
            }
            _ => {
                guard.disarm();
                Err(keyed::refusal(&reply)
                    .map_or_else(|| refusal(&reply), Ok)?
                    .into())
            }
        }
    }
}

/// Re-checks this process's waiters of a limiter if a release's reply goes unread (see
/// `RedisLimiter::release`).
struct RecheckIfUnread<'a> {
    limiter: &'a RedisLimiter,
    armed: bool,
}

impl RecheckIfUnread<'_> {
    fn disarm(mut self) {
        self.armed = false;
    }
}

impl Drop for RecheckIfUnread<'_> {
    fn drop(&mut self) {
        if self.armed {
            super::wake::recheck(&self.limiter.store, &self.limiter.name);
        }
    }
}

impl LimiterBackend for RedisLimiter {
    fn name(&self) -> &LimiterName {
        &self.name
    }

    async fn acquire(&self, options: AcquireOptions) -> Result<Grant, AcquireError> {
        self.acquire_in(options, None).await
    }

    async fn acquire_keyed(
        &self,
        key: &str,
        options: AcquireOptions,
    ) -> Result<Grant, AcquireError> {
        crate::core::keyed::check_key(key)
            .map_err(|e| AcquireError::Refused(Refusal::Invalid(e)))?;
        self.acquire_in(options, Some(key)).await
    }

    async fn put_key(
        &self,
        key: &str,
        over: Option<crate::core::keyed::KeyOverride>,
    ) -> Result<(), StoreError> {
        self.put_key_override(key, over).await
    }

    async fn schedule_keyed(&self, key: &str, count: u32) -> Result<Schedule, StoreError> {
        self.schedule_key(key, count).await
    }

    async fn keys(&self, limit: usize) -> Result<Option<crate::core::keyed::KeysView>, StoreError> {
        self.keys_view(limit).await
    }

    async fn extend(
        &self,
        token: FencingToken,
        lease: Duration,
        permits: Option<u32>,
    ) -> Result<Timestamp, ExtendError> {
        self.extend_in(None, token, lease, permits).await
    }

    async fn extend_keyed(
        &self,
        key: &str,
        token: FencingToken,
        lease: Duration,
        permits: Option<u32>,
    ) -> Result<Timestamp, ExtendError> {
        self.extend_in(Some(key), token, lease, permits).await
    }

    async fn release(&self, token: FencingToken) -> Result<bool, StoreError> {
        // This store's channel: a waiter of this process granted by the release is answered
        // in the reply (`key, outcome` pairs before the last field), not over pub/sub.
        let args = [token.0.to_string(), self.store.channel.clone()];
        // Dropped before the reply is read (its caller went away: an HTTP client that reset
        // its connection), the release may still run and grant waiters of this process that
        // only its reply would have told: they are re-checked, not left to their deadlines
        // (by which their leases may have ended).
        let unread = RecheckIfUnread {
            limiter: self,
            armed: true,
        };
        let called = self.call("release", &args).await;
        unread.disarm();
        let reply = match called {
            Ok(reply) => reply,
            Err(e) => {
                // The script may have run and granted waiters of this process whose outcomes
                // were in the lost reply: ask for them rather than leave them to their timers.
                super::wake::recheck(&self.store, &self.name);
                return Err(e);
            }
        };
        if reply.len() > 3 {
            for pair in reply[2..reply.len() - 1].chunks_exact(2) {
                super::wake::deliver_outcome(&self.store, self.name.as_str(), &pair[0], &pair[1]);
            }
            // The granted waiter's task is now in this worker's next-to-run slot. Yield once so
            // it runs before this caller goes on: otherwise the caller's next request wakes the
            // connection's task, which takes that slot and sends the waiter to the back of the
            // run queue (about 35 µs per handoff at saturation on a loaded machine, 2 µs with the yield:
            // docs/redis.md).
            tokio::task::yield_now().await;
        }
        Ok(reply.first().map(String::as_str) == Some("released")
            && reply.get(1).map(String::as_str) == Some("1"))
    }

    fn release_in_background(&self, token: FencingToken) {
        // A guard dropped off the runtime (a plain thread) still releases, on the store's.
        let Some(handle) = self.store.runtime() else {
            return; // The lease bounds it.
        };
        let limiter = self.clone();
        handle.spawn(async move {
            if let Err(e) = limiter.release(token).await {
                tracing::warn!(limiter = %limiter.name, error = %e, "background release failed; the lease will reclaim it");
            }
        });
    }

    async fn schedule(&self, count: u32) -> Result<Schedule, StoreError> {
        if count == 0 || count > crate::core::MAX_SCHEDULE {
            return Err(StoreError::Invalid(InvalidField {
                field: "count",
                message: format!("must be from 1 to {}", crate::core::MAX_SCHEDULE),
            }));
        }
        let reservation = ReservationId::random();
        let reply = self
            .call("schedule", &[count.to_string(), reservation.to_string()])
            .await?;
        match reply.first().map(String::as_str) {
            Some("offsets") => Ok(Schedule {
                offsets: offsets(&reply)?,
                reservation,
            }),
            Some("invalid") => Err(StoreError::Invalid(invalid(&reply))),
            Some("unknown") => Err(self.unknown()),
            _ => Err(unavailable(format!("unexpected script reply {reply:?}"))),
        }
    }

    async fn unschedule(&self, reservation: ReservationId, unused: u32) -> Result<u32, StoreError> {
        let reply = self
            .call("unschedule", &[reservation.to_string(), unused.to_string()])
            .await?;
        match reply.first().map(String::as_str) {
            Some("returned") => reply
                .get(1)
                .and_then(|n| n.parse().ok())
                .ok_or_else(|| unavailable(format!("unexpected script reply {reply:?}"))),
            Some("invalid") => Err(StoreError::Invalid(invalid(&reply))),
            Some("unknown") => Err(self.unknown()),
            _ => Err(unavailable(format!("unexpected script reply {reply:?}"))),
        }
    }

    async fn feedback(&self, outcome: Feedback) -> Result<Option<u32>, StoreError> {
        self.feedback_with_latency(outcome, None).await
    }

    async fn feedback_with_latency(
        &self,
        outcome: Feedback,
        latency: Option<Duration>,
    ) -> Result<Option<u32>, StoreError> {
        let word = match outcome {
            Feedback::Ok => "ok",
            Feedback::Throttled => "throttled",
            Feedback::Error => "error",
        };
        // In µs clamped to a day by the core's own conversion (core/adaptive's MAX_LATENCY):
        // the script's doubles are exact only below 2^53, and both stores must see the same
        // number.
        let latency = latency
            .map(|l| crate::core::adaptive::micros(l).to_string())
            .unwrap_or_default();
        let reply = self.call("feedback", &[word.to_owned(), latency]).await?;
        match reply.first().map(String::as_str) {
            Some("limit") => Ok(reply.get(1).and_then(|s| s.parse::<u32>().ok())),
            Some("unknown") => Err(self.unknown()),
            _ => Err(unavailable(format!("unexpected script reply {reply:?}"))),
        }
    }

    async fn holders(&self, limit: usize) -> Result<HoldersView, StoreError> {
        // Refused as every other operation on a Redis that may evict keys (`evict.rs`).
        self.store.eviction.check()?;
        let mut invocation = HOLDERS_SCRIPT.prepare_invoke();
        // meta, holders, leases, queue (the first four of the limiter's keys), hot, kqueue.
        for key in self
            .keys
            .iter()
            .take(4)
            .chain(std::iter::once(&self.keys[8]))
        {
            invocation.key(key);
        }
        // A keyed limiter's waiters queue per key, in `kqueue`; `kheads` has its oldest.
        let [_, _, kqueue, .., kheads] = self.keyed_keys();
        invocation.key(kqueue);
        invocation.key(kheads);
        invocation.arg(limit.min(MAX_HOLDERS_LISTED));
        let mut conn = self.store.conn.clone();
        let reply: Vec<String> = invocation
            .invoke_async(&mut conn)
            .await
            .map_err(unavailable)?;
        match reply.first().map(String::as_str) {
            Some("holders") => self.parse_holders(&reply),
            Some("unknown") => Err(self.unknown()),
            _ => Err(unavailable(format!("unexpected script reply {reply:?}"))),
        }
    }

    async fn status(&self) -> Result<LimiterStatus, StoreError> {
        let writes = self.spec_writes();
        let reply = self.call("status", &[]).await?;
        match reply.first().map(String::as_str) {
            Some("status") => self
                .parse_status(&reply)
                .inspect(|status| self.remember_read(&status.spec, writes)),
            Some("unknown") => Err(self.unknown()),
            _ => Err(unavailable(format!("unexpected script reply {reply:?}"))),
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::super::script::{status_schema, COUNTER_FIELDS};

    /// Every name in the schema is read by `parse_status` (a field the script emits that the
    /// parser ignores, or the reverse, fails here), and every counter is in the schema.
    #[test]
    fn the_parser_reads_every_field_of_the_schema() {
        let src = include_str!("limiter/replies.rs");
        let parser =
            &src[src.find("fn parse_status").unwrap()..src.find("fn parse_holders").unwrap()];
        for name in status_schema() {
            assert!(
                parser.contains(&format!("(\"{name}\")")),
                "parse_status ignores {name}"
            );
        }
        let schema = status_schema();
        for c in COUNTER_FIELDS {
            assert!(schema.contains(c), "{c}");
        }
        let mut sorted = schema.clone();
        sorted.sort_unstable();
        sorted.dedup();
        assert_eq!(sorted.len(), schema.len(), "a field is named twice");
    }
}
