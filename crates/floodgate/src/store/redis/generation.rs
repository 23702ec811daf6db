//! Noticing that Redis changed under the store (issue 10): a Sentinel failover to a replica, or
//! a restart that reloaded its data from disk. Either may have lost the last writes (a replica
//! that had not received them; an append-only file fsynced once a second), and lost writes are
//! lost *grants*: their holders keep working while the limiter no longer counts them. A
//! limiter that vanished whole is caught by `revive.rs`; this catches the case where it is
//! still there, older than it was.
//!
//! Redis cannot say which writes a promoted replica missed, so any change of the master's
//! `run_id` is treated as a possible loss: every limiter this store knows enters a learning
//! window (`core/learning.rs`) before this store runs anything else on it, so holders of lost
//! grants are re-adopted by their next extend instead of being granted over.
//!
//! The check costs nothing on the hot path: it runs only after a request failed (a restart or a
//! failover breaks the connection first), before the request is retried, and when a script
//! call is answered `NOSCRIPT` (a restarted or promoted Redis has no scripts), before the
//! script is loaded again (`eval.rs`): a connection may reach the new Redis without any
//! request failing (a `PING` or a listing that reconnected it, or one racing another).
//!
//! On a Redis Cluster each shard has its own master, so the same check runs per hash slot
//! (`shard.rs`): the master of a limiter's slot, and on a change the limiters this store knows
//! in that slot. The marks and the windows below are shared by both; the gate is one per slot
//! there (`Shards::gates`), one for the store here.
//!
//! Not covered: a server that had not used a limiter before the change.

use std::collections::HashSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use redis::cluster_routing::Slot;

use super::limiter::RedisLimiter;
use super::{conn::Conn, unavailable, Inner};
use crate::error::StoreError;
use crate::types::LimiterName;

/// The master's `run_id`, from `INFO` (`None` on a Cluster, whose masters are checked per
/// slot: `shard.rs`), and the reply. Its default sections hold the memory policy too, read by
/// the eviction guard (`evict.rs`) at no extra round trip; Redis 6 takes one section
/// argument at most.
pub(super) async fn master_info(conn: &Conn) -> Result<Option<(String, String)>, StoreError> {
    if matches!(conn, Conn::Cluster(_)) {
        return Ok(None);
    }
    let mut conn = conn.clone();
    let info: String = redis::cmd("INFO")
        .query_async(&mut conn)
        .await
        .map_err(unavailable)?;
    Ok(run_id_of(&info).map(|id| (id.to_owned(), info.clone())))
}

/// The master's `run_id` (`None` on a Cluster): see [`master_info`].
pub(super) async fn master_run_id(conn: &Conn) -> Result<Option<String>, StoreError> {
    Ok(master_info(conn).await?.map(|(run_id, _)| run_id))
}

/// The `run_id` in an `INFO server` reply.
pub(super) fn run_id_of(info: &str) -> Option<&str> {
    info.lines()
        .find_map(|l| l.strip_prefix("run_id:"))
        .map(str::trim)
}

/// What the store knows of the Redis it runs on.
#[derive(Debug, Default)]
pub(super) struct Generation {
    /// The master's `run_id` when last checked.
    run_id: Option<String>,
    /// Limiters to put in a learning window before this store runs anything else on them.
    /// A limiter leaves it only once its window is entered.
    relearn: HashSet<LimiterName>,
    /// Held while the master is checked and a limiter enters its window: an operation that
    /// finds a check or a window due waits here, so none runs on the changed Redis before the
    /// check and the window are done. On a Cluster each slot has a gate of its own instead
    /// (`shard.rs`): a slot's check marks only that slot's limiters. (Taking a limiter off `relearn` before its window was
    /// entered let a concurrent acquire be granted on the older state in between: seen with
    /// a timer's advance and an acquire racing after a restart on an older snapshot.)
    gate: Arc<tokio::sync::Mutex<()>>,
}

/// Failed requests against checks of the master, on standalone Redis (a Cluster counts them
/// per slot: `Shards::suspect`). Counts, not a flag: a check covers only the failures raised
/// before it asked, so one raised while its `INFO` was in flight (the failover's own break,
/// after the old master had answered) leaves a check due, where clearing a flag lost it.
#[derive(Debug, Default)]
pub(super) struct Suspicions {
    /// Failures raised so far.
    raised: AtomicU64,
    /// Failures the last completed check covered (`raised` when it started).
    covered: AtomicU64,
}

impl Suspicions {
    /// A request failed: check the master before the next one.
    pub(super) fn raise(&self) {
        self.raised.fetch_add(1, Ordering::AcqRel);
    }

    /// Whether a check is due, and if so what it will cover: the failures raised until now.
    pub(super) fn due(&self) -> Option<u64> {
        let raised = self.raised.load(Ordering::Acquire);
        (raised != self.covered.load(Ordering::Acquire)).then_some(raised)
    }

    /// A check that started when `seen` failures were raised has completed.
    pub(super) fn cover(&self, seen: u64) {
        self.covered.fetch_max(seen, Ordering::AcqRel);
    }
}

impl Generation {
    pub(super) fn new(run_id: Option<String>) -> Self {
        Generation {
            run_id,
            relearn: HashSet::new(),
            gate: Arc::default(),
        }
    }
}

tokio::task_local! {
    /// Set in the task that holds a gate, to that gate's slot (`None`: the store's gate, on
    /// standalone Redis): its own requests (the `learn` call, retried when its connection had
    /// dropped) come back through `settle_generation`, and must not wait for the gate they are
    /// under. A call it made on another slot would settle at that slot's gate as any other.
    static SETTLING: Option<Slot>;
}

impl Inner {
    fn lock_generation(&self) -> std::sync::MutexGuard<'_, Generation> {
        self.generation
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// A request failed: check the master before the next one.
    pub(super) fn suspect_change(&self) {
        self.suspect.raise();
    }

    /// Marks these limiters to learn before this store runs anything else on them.
    pub(super) fn mark_to_learn(&self, names: impl IntoIterator<Item = LimiterName>) {
        let mut g = self.lock_generation();
        g.relearn.extend(names);
        if !g.relearn.is_empty() {
            self.relearn_pending.store(true, Ordering::Release);
        }
    }
}

/// If a request failed since the last check, compares the master's `run_id` with the one
/// known; on a change, marks every known limiter to learn.
///
/// Called under the gate. The failures are covered only once the limiters to learn are
/// marked, so an operation arriving meanwhile still finds a check due and waits at the gate;
/// and only those raised before the `INFO` was sent.
async fn check(inner: &Arc<Inner>) -> Result<(), StoreError> {
    let Some(seen) = inner.suspect.due() else {
        return Ok(());
    };
    // On an error nothing is covered: the next operation checks again.
    let info = master_info(&inner.conn).await?;
    if let Some((_, info)) = &info {
        // Standalone: one master, recorded as the store's only one (`evict.rs`).
        inner.eviction.record("", info);
    }
    let now = info.map(|(run_id, _)| run_id);
    let known = inner.known_names();
    let mut g = inner.lock_generation();
    if now.is_some() && g.run_id != now {
        tracing::warn!(
            before = g.run_id.as_deref().unwrap_or("?"),
            now = now.as_deref().unwrap_or("?"),
            limiters = known.len(),
            "redis changed under this store (a failover or a restart, which may have lost the \
             last writes): the limiters it knows learn who still holds permits before granting"
        );
        g.run_id.clone_from(&now);
        inner.changes.fetch_add(1, Ordering::AcqRel);
        g.relearn.extend(known);
        if !g.relearn.is_empty() {
            inner.relearn_pending.store(true, Ordering::Release);
        }
        drop(g);
        // After the limiters are marked: a call that sends the new scripts sees them marked
        // (`eval.rs`).
        inner.renew_scripts(now.as_deref());
    }
    // Last: whoever finds no check due also sees the limiters marked.
    inner.suspect.cover(seen);
    Ok(())
}

impl RedisLimiter {
    /// Before an operation: after a failed request, checks whether Redis changed; if this
    /// limiter is to learn, enters its learning window first. Both under the gate, which
    /// every operation that finds either due waits for.
    pub(super) async fn settle_generation(&self) -> Result<(), StoreError> {
        if !self.needs_settling() {
            return Ok(());
        }
        let gate = if self.store.is_cluster() {
            self.slot_gate()
        } else {
            Arc::clone(&self.store.lock_generation().gate)
        };
        let _held = gate.lock().await;
        SETTLING
            .scope(self.gate_slot(), self.settle_under_gate())
            .await
    }

    /// The slot whose gate this limiter settles under (`None`: the store's).
    fn gate_slot(&self) -> Option<Slot> {
        self.store.is_cluster().then(|| self.slot())
    }

    /// The changes of the master noticed so far (on a Cluster, of this limiter's slot's),
    /// read before a grant is asked for.
    pub(super) fn changes_seen(&self) -> u64 {
        if self.store.is_cluster() {
            return self.shard_changes();
        }
        self.store.changes.load(Ordering::Acquire)
    }

    /// Whether the master changed since `before` (a failed request's check settled first): a
    /// grant asked for before then may come from the older state, granted before the
    /// limiter's learning window over permits Redis lost, so it must not be answered.
    /// (Racing acquires were granted so after a restart on an older snapshot: one request
    /// failed and reconnected the shared connection, the next went through on the new Redis
    /// before any check.)
    pub(super) async fn changed_since(&self, before: u64) -> Result<bool, StoreError> {
        self.settle_generation().await?;
        Ok(self.changes_seen() != before)
    }

    /// Whether this limiter must settle before a call is sent: something is due and this
    /// task is not the one settling it (under the gate, its own calls go through).
    pub(super) fn needs_settling(&self) -> bool {
        self.due_to_settle()
            && !SETTLING
                .try_with(|under| *under == self.gate_slot())
                .unwrap_or(false)
    }

    /// A request failed or was answered `NOSCRIPT`: check the master (on a Cluster, this
    /// limiter's slot's: `shard.rs`) before the next call.
    pub(super) fn suspect_change(&self) {
        if self.store.is_cluster() {
            self.suspect_shard();
        } else {
            self.store.suspect_change();
        }
    }

    /// Whether a check is due (a request failed; on a Cluster, this limiter's slot is not
    /// checked yet or a request on it failed) or this limiter is to learn.
    fn due_to_settle(&self) -> bool {
        let check_due = if self.store.is_cluster() {
            self.shard_due()
        } else {
            self.store.suspect.due().is_some()
        };
        check_due
            || (self.store.relearn_pending.load(Ordering::Acquire)
                && self.store.lock_generation().relearn.contains(&self.name))
    }

    async fn settle_under_gate(&self) -> Result<(), StoreError> {
        if self.store.is_cluster() {
            self.check_shard().await?;
        } else {
            check(&self.store).await?;
        }
        if !self.store.lock_generation().relearn.contains(&self.name) {
            return Ok(());
        }
        // Still on `relearn` until the window is entered; an error leaves it there, to try
        // again before the next operation.
        self.learn().await?;
        let mut g = self.store.lock_generation();
        g.relearn.remove(&self.name);
        if g.relearn.is_empty() {
            self.store.relearn_pending.store(false, Ordering::Release);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::Suspicions;

    /// A request that failed while a check was asking the master keeps a check due: the
    /// answer may have come from the master before the failover that failed the request.
    #[test]
    fn a_failure_during_a_check_keeps_a_check_due() {
        let s = Suspicions::default();
        assert_eq!(s.due(), None);
        s.raise();
        let seen = s.due().expect("due after a failure");
        s.raise(); // while the check's INFO is in flight
        s.cover(seen);
        let seen = s.due().expect("the second failure was lost");
        s.cover(seen);
        assert_eq!(s.due(), None);
        // An older check completing late covers nothing new.
        s.raise();
        s.cover(seen);
        assert!(s.due().is_some());
    }
}
