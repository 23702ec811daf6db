//! A queued acquire's life on this side: the guard that cancels it if its caller goes away,
//! idempotent acquires' keys and their abandonment, and cancels.

use super::*;

/// What becomes of a queued acquire if its future is dropped: the script is asked to cancel
/// it, and a grant that raced the drop is released.
pub(super) struct QueuedGuard {
    pub(super) limiter: RedisLimiter,
    pub(super) key: String,
    /// This call's number (see `Pending::attempt`).
    pub(super) attempt: u64,
    /// An idempotent acquire: if its caller goes away, its wait or grant is kept for a retry
    /// for `ORPHANED_WAIT_GRACE`, then given up unless a retry claimed it (`abandon`).
    pub(super) idempotent: bool,
    pub(super) armed: bool,
}

impl QueuedGuard {
    /// No cancel needed any more (the outcome is in hand, or the caller cancels itself).
    pub(super) fn disarm(&mut self) {
        self.armed = false;
        self.limiter.forget_pending(&self.key, self.attempt);
    }
}

impl Drop for QueuedGuard {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        self.limiter.forget_pending(&self.key, self.attempt);
        // A wait dropped off the runtime (a plain thread) still cancels, on the store's.
        let Some(handle) = self.limiter.store.runtime() else {
            return; // No runtime to cancel on: the wait deadline and lease bound the cost.
        };
        let limiter = self.limiter.clone();
        let key = std::mem::take(&mut self.key);
        if self.idempotent {
            let attempt = format!("{}.{}", limiter.store.server_id, self.attempt);
            limiter
                .store
                .lock_abandoned()
                .insert(key.clone(), attempt.clone());
            handle.spawn(async move {
                tokio::time::sleep(crate::core::ORPHANED_WAIT_GRACE).await;
                // Unless a grant already ended it (`wake.rs`), the grace does.
                let still = {
                    let mut abandoned = limiter.store.lock_abandoned();
                    let mine = abandoned.get(&key) == Some(&attempt);
                    if mine {
                        abandoned.remove(&key);
                    }
                    mine
                };
                if still {
                    limiter.abandon(&key, &attempt).await;
                }
            });
        } else {
            handle.spawn(async move { limiter.cancel_orphan(key).await });
        }
    }
}

/// The waiter key of an idempotent acquire: the same for every retry, on every server.
pub(super) fn idempotent_key(request_id: &str) -> String {
    use std::fmt::Write as _;
    let mut key = String::with_capacity(1 + 2 * request_id.len());
    key.push('r');
    for b in request_id.bytes() {
        let _ = write!(key, "{b:02x}");
    }
    key
}

impl RedisLimiter {
    /// Cancels a waiter that went away and releases a grant that raced it. If Redis cannot be
    /// reached, the waiter is kept as an orphan and cancelled when Redis answers again.
    /// Takes this call's entry out of the waiters, unless another call (a retry of the same
    /// idempotent acquire) has registered under the key since.
    pub(super) fn forget_pending(&self, key: &str, attempt: u64) {
        let mut waiters = self.store.lock_waiters();
        if waiters.get(key).is_some_and(|p| p.attempt == attempt) {
            waiters.remove(key);
        }
    }

    /// An idempotent acquire's caller went away and no retry came within the grace: its wait
    /// is cancelled and a grant it got is released, unless a retry claimed them since (the
    /// script checks the attempt that owns them last).
    pub(in crate::store::redis) async fn abandon(&self, key: &str, attempt: &str) {
        let reply = self
            .call(
                "cancel",
                &[key.to_owned(), "abandon".to_owned(), attempt.to_owned()],
            )
            .await;
        let outcome = match reply {
            Ok(reply) if reply.first().map(String::as_str) == Some("decided") => {
                reply.get(1).and_then(|o| decode_outcome(o))
            }
            Ok(_) => None,
            Err(e) => {
                tracing::warn!(limiter = %self.name, error = %e, "could not give up an abandoned idempotent acquire; its wait deadline and lease bound it");
                None
            }
        };
        if let Some(Ok(grant)) = outcome {
            if self.release(grant.token).await.is_err() {
                tracing::warn!(limiter = %self.name, "could not release an abandoned grant; its lease bounds it");
            }
        }
    }

    pub(in crate::store::redis) async fn cancel_orphan(&self, key: String) {
        match self.cancel(&key, "drop").await {
            Ok(Some(Ok(grant))) => {
                if self.release(grant.token).await.is_err() {
                    // The lease bounds it.
                    tracing::warn!(limiter = %self.name, "could not release a grant that raced a cancel");
                }
            }
            Ok(_) => {}
            Err(_) => self.store.lock_orphans().push((self.name.clone(), key)),
        }
    }

    /// Takes a waiter out of the queue. `Ok(None)` if it was still queued (and is now gone);
    /// `Ok(Some(outcome))` if it had already been decided, or timed out by this call.
    pub(super) async fn cancel(
        &self,
        key: &str,
        reason: &str,
    ) -> Result<Option<WaitOutcome>, StoreError> {
        let reply = self
            .call("cancel", &[key.to_owned(), reason.to_owned()])
            .await?;
        Ok(match reply.first().map(String::as_str) {
            Some("cancelled") => None,
            Some("timed_out") => Some(Err(Refusal::WaitTimeout {
                retry_after: Duration::from_micros(field(&reply, 1)?),
            })),
            Some("decided") => reply.get(1).and_then(|o| decode_outcome(o)),
            // Not queued and no outcome recorded: the limiter was deleted.
            _ => Some(Err(Refusal::LimiterDeleted)),
        })
    }
}
