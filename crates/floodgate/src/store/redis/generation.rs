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
//! failover always breaks the connection first), before the request is retried.
//!
//! Not covered: Redis Cluster (each shard has its own master; a shard's failover is not
//! noticed here), and a server that had not used a limiter before the change.

use std::collections::HashSet;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use super::limiter::RedisLimiter;
use super::{conn::Conn, unavailable, Inner};
use crate::error::StoreError;
use crate::types::LimiterName;

/// The master's `run_id`, from `INFO server` (`None` on a Cluster: see the module docs).
pub(super) async fn master_run_id(conn: &Conn) -> Result<Option<String>, StoreError> {
    if matches!(conn, Conn::Cluster(_)) {
        return Ok(None);
    }
    let mut conn = conn.clone();
    let info: String = redis::cmd("INFO")
        .arg("server")
        .query_async(&mut conn)
        .await
        .map_err(unavailable)?;
    Ok(info
        .lines()
        .find_map(|l| l.strip_prefix("run_id:"))
        .map(|id| id.trim().to_owned()))
}

/// What the store knows of the Redis it runs on.
#[derive(Debug, Default)]
pub(super) struct Generation {
    /// The master's `run_id` when last checked.
    run_id: Option<String>,
    /// Limiters to put in a learning window before this store runs anything else on them.
    relearn: HashSet<LimiterName>,
}

impl Generation {
    pub(super) fn new(run_id: Option<String>) -> Self {
        Generation {
            run_id,
            relearn: HashSet::new(),
        }
    }
}

impl Inner {
    fn lock_generation(&self) -> std::sync::MutexGuard<'_, Generation> {
        self.generation
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// A request failed: check the master before the next one.
    pub(super) fn suspect_change(&self) {
        self.suspect.store(true, Ordering::Release);
    }
}

/// If a request failed since the last check, compares the master's `run_id` with the one
/// known; on a change, marks every known limiter to learn.
async fn check(inner: &Arc<Inner>) -> Result<(), StoreError> {
    if !inner.suspect.swap(false, Ordering::AcqRel) {
        return Ok(());
    }
    let now = match master_run_id(&inner.conn).await {
        Ok(id) => id,
        Err(e) => {
            inner.suspect_change();
            return Err(e);
        }
    };
    let known = inner.known_names();
    let mut g = inner.lock_generation();
    if now.is_none() || g.run_id == now {
        return Ok(());
    }
    tracing::warn!(
        before = g.run_id.as_deref().unwrap_or("?"),
        now = now.as_deref().unwrap_or("?"),
        limiters = known.len(),
        "redis changed under this store (a failover or a restart, which may have lost the last \
         writes): the limiters it knows learn who still holds permits before granting"
    );
    g.run_id = now;
    g.relearn.extend(known);
    if !g.relearn.is_empty() {
        inner.relearn_pending.store(true, Ordering::Release);
    }
    Ok(())
}

impl RedisLimiter {
    /// Before an operation: after a failed request, checks whether Redis changed; if this
    /// limiter is to learn, enters its learning window first.
    pub(super) async fn settle_generation(&self) -> Result<(), StoreError> {
        check(&self.store).await?;
        if !self.store.relearn_pending.load(Ordering::Acquire) {
            return Ok(());
        }
        let due = {
            let mut g = self.store.lock_generation();
            let due = g.relearn.remove(&self.name);
            if g.relearn.is_empty() {
                self.store.relearn_pending.store(false, Ordering::Release);
            }
            due
        };
        if due {
            if let Err(e) = self.learn().await {
                // Not learned yet: try again before the next operation.
                self.store
                    .lock_generation()
                    .relearn
                    .insert(self.name.clone());
                self.store.relearn_pending.store(true, Ordering::Release);
                return Err(e);
            }
        }
        Ok(())
    }
}
