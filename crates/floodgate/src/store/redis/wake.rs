//! Wake-ups: the subscription to this store's channel and delivery to queued acquires.
//!
//! A script that decides a queued waiter's outcome records it (a grant with its holder, while
//! held; anything else in the limiter's `outcomes` hash, for two minutes) and then publishes
//! `name\nwaiter\noutcome` on the waiter's server channel. Delivery here is
//! the fast path; the record is the safety net: a waiter whose message was lost (the
//! subscription dropped) finds its outcome when it is re-checked after reconnecting, or when
//! its own wait timer runs out and it cancels.
//!
//! Where the subscription reconnects depends on the deployment (`conn.rs`, `PubSubSource`):
//! the one standalone server, the master the sentinels name, or on a Cluster any live node
//! (`pubsub_nodes.rs`: `PUBLISH` reaches every node's subscribers). When its connection ends,
//! a Cluster's subscription first tries the other nodes at once; if one takes over, queued
//! waiters stay queued and are re-checked. Otherwise (or on standalone and Sentinel) queued
//! waiters are answered `store_unavailable` at once and the subscription reconnects with
//! backoff.

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use tokio::sync::oneshot;

use super::conn::PubSubSource;
use super::{unavailable, Inner, RedisLimiter};
use crate::core::{Grant, Refusal, WaitOutcome};
use crate::error::StoreError;
use crate::types::{FencingToken, LimiterName, Timestamp};

/// A queued acquire of this process.
pub(crate) struct Pending {
    /// Its limiter, to re-check it after a reconnect.
    pub(crate) limiter: LimiterName,
    /// Where its outcome goes.
    pub(crate) tx: oneshot::Sender<Delivery>,
    /// The call that waits (several calls may wait under one idempotent key, one after the
    /// other): only that call's guard takes this entry out.
    pub(crate) attempt: u64,
    /// When its `queued` reply arrived (on the store's `order`), `None` before: a revival
    /// answers only the waiters that queued before the limiter was found gone (`revive.rs`).
    pub(crate) queued: Option<u64>,
}

/// What a queued acquire of this process is handed. (Its sender dropped: the subscription
/// was lost, and no wake-up can come.)
#[derive(Debug)]
pub(crate) enum Delivery {
    /// Its wait's outcome.
    Outcome(WaitOutcome),
    /// A repeat with the same request id, in this process, took the wait over (it was granted
    /// or joined the wait): the outcome goes to that repeat.
    Superseded,
    /// Redis lost the limiter's state, queue included, while it waited (a restart or a
    /// failover: `revive.rs`): no wake-up will come.
    StateLost,
}

/// Decodes an outcome recorded by the script: `G|token|permits|lease|deadline|granted_at|waited`,
/// `T|retry_after`, `X|requested|limit` or `D`. All times in microseconds.
pub(crate) fn decode_outcome(text: &str) -> Option<WaitOutcome> {
    let f: Vec<&str> = text.split('|').collect();
    let n = |i: usize| f.get(i).and_then(|s| s.parse::<u64>().ok());
    match *f.first()? {
        "G" => Some(Ok(decode_grant(&f[1..])?)),
        "T" => Some(Err(Refusal::WaitTimeout {
            retry_after: Duration::from_micros(n(1)?),
        })),
        "X" => Some(Err(Refusal::PermitsExceedLimit {
            requested: u32::try_from(n(1)?).ok()?,
            limit: u32::try_from(n(2)?).ok()?,
        })),
        "D" => Some(Err(Refusal::LimiterDeleted)),
        _ => None,
    }
}

/// `token, permits, lease, deadline, granted_at, waited`.
pub(crate) fn decode_grant<S: AsRef<str>>(f: &[S]) -> Option<Grant> {
    let n = |i: usize| f.get(i).and_then(|s| s.as_ref().parse::<u64>().ok());
    Some(Grant {
        token: FencingToken(n(0)?),
        permits: u32::try_from(n(1)?).ok()?,
        lease: Duration::from_micros(n(2)?),
        lease_deadline: Timestamp(n(3)?),
        granted_at: Timestamp(n(4)?),
        waited: Duration::from_micros(n(5)?),
    })
}

fn deliver(inner: &Arc<Inner>, payload: &str) {
    let mut parts = payload.splitn(3, '\n');
    let (Some(limiter), Some(key), Some(outcome)) = (parts.next(), parts.next(), parts.next())
    else {
        tracing::warn!(payload, "malformed wake-up message");
        return;
    };
    deliver_outcome(inner, limiter, key, outcome);
}

/// Hands a decided outcome to this process's waiter `key` of `limiter`: from a pub/sub message,
/// or from the reply of a release this store made (`RedisLimiter::release`). A key nobody here
/// waits for (already answered, or gone) is ignored, so a second delivery does nothing.
pub(crate) fn deliver_outcome(inner: &Arc<Inner>, limiter: &str, key: &str, outcome: &str) {
    let Some(outcome) = decode_outcome(outcome) else {
        tracing::warn!(limiter, key, outcome, "malformed wake-up outcome");
        return;
    };
    let pending = inner.lock_waiters().remove(key);
    if let Some(pending) = pending {
        // A waiter that has just gone away hands its cancel to the script, which finds the
        // recorded outcome and undoes a grant; nothing to do here if the send fails.
        let _ = pending.tx.send(Delivery::Outcome(outcome));
        return;
    }
    // An idempotent acquire whose caller went away was granted here: nobody in this process
    // waits for it, so it is given up now rather than at the end of the grace (the script keeps
    // it if a retry claimed it meanwhile).
    let abandoned = inner.lock_abandoned().remove(key);
    if let (Some(attempt), Ok(name)) = (abandoned, LimiterName::new(limiter)) {
        let limiter = RedisLimiter::new(Arc::clone(inner), name);
        let key = key.to_owned();
        tokio::spawn(async move { limiter.abandon(&key, &attempt).await });
    }
}

/// The subscription is gone, so no wake-up can arrive: answer every queued acquire of this
/// process at once (dropping its sender reads as "store unavailable") instead of letting it
/// wait blind until its deadline. Their queue entries are cancelled by their guards.
fn fail_pending(inner: &Inner) {
    let pending = std::mem::take(&mut *inner.lock_waiters());
    if !pending.is_empty() {
        tracing::warn!(
            waiters = pending.len(),
            "wake-up subscription lost: answering queued acquires with store_unavailable"
        );
    }
}

/// After a reconnect: outcomes published while the subscription was down were missed, so ask
/// for each queued waiter's recorded outcome, and cancel waiters that left meanwhile.
/// `answer_unchecked`: a waiter whose re-check fails (its shard is failing over) is answered
/// `store_unavailable` at once, as the loss would have answered it, rather than left to its
/// deadline with a wake-up it may have missed (used when another Cluster node took over
/// without the waiters being answered first).
///
/// Runs in a task of its own (`spawn_resync`) with its re-checks concurrent: a shard that
/// cannot answer (each re-check there waits out the response timeout) must not hold up the
/// wake-ups of the others, which the subscription delivers meanwhile (seen: 24 waiters on a
/// dead shard kept a live shard's waiter unwoken for over 30 s, `tests/rev17_cluster_wake.rs`).
/// A waiter answered both ways gets one answer: each takes it out of `waiters` first.
async fn resync(inner: Arc<Inner>, answer_unchecked: bool) {
    use futures_util::stream::{self, StreamExt as _};
    super::retry_orphans(Arc::clone(&inner)).await;
    let pending: Vec<(String, LimiterName)> = inner
        .lock_waiters()
        .iter()
        .map(|(k, p)| (k.clone(), p.limiter.clone()))
        .collect();
    let inner = &inner;
    stream::iter(pending)
        .for_each_concurrent(RESYNC_CONCURRENCY, |(key, name)| async move {
            let limiter = RedisLimiter::new(Arc::clone(inner), name);
            match limiter.peek(&key).await {
                Ok(Some(outcome)) => {
                    if let Some(p) = inner.lock_waiters().remove(&key) {
                        let _ = p.tx.send(Delivery::Outcome(outcome));
                    }
                }
                Ok(None) => {}
                Err(e) if answer_unchecked => {
                    tracing::warn!(key, error = %e, "queued acquire not re-checked: store_unavailable");
                    // Dropping its sender reads as "store unavailable"; its guard cancels it.
                    inner.lock_waiters().remove(&key);
                }
                Err(_) => {}
            }
        })
        .await;
}

/// Re-checks in flight at once after a reconnect (as a listing's status calls, pipelined on
/// the shared connection).
const RESYNC_CONCURRENCY: usize = 32;

/// Starts [`resync`] beside the subscription's message loop.
fn spawn_resync(inner: &Arc<Inner>, answer_unchecked: bool) {
    tokio::spawn(resync(Arc::clone(inner), answer_unchecked));
}

/// A release of `limiter` failed without its reply, or its caller went away before reading
/// it: it may still have granted waiters of this process, whose outcomes that reply carried.
/// Each of them is asked for its recorded outcome, in the background (the same safety net as
/// after a lost subscription).
pub(crate) fn recheck(inner: &Arc<Inner>, limiter: &LimiterName) {
    let Ok(handle) = tokio::runtime::Handle::try_current() else {
        return; // Their own timers find their outcomes.
    };
    let keys: Vec<String> = inner
        .lock_waiters()
        .iter()
        .filter(|(_, p)| &p.limiter == limiter)
        .map(|(k, _)| k.clone())
        .collect();
    if keys.is_empty() {
        return;
    }
    let inner = Arc::clone(inner);
    let name = limiter.clone();
    handle.spawn(async move {
        // The release went on a connection of its own (standalone Redis): a command sent there
        // now is answered only after Redis ran it, so the re-checks below see its grants. (On
        // a Cluster or Sentinel that connection is the one the re-checks use.) If it fails,
        // the re-checks still go: the release may have run long ago.
        let _ = redis::cmd("PING")
            .query_async::<()>(&mut inner.release_conn.clone())
            .await;
        let limiter = RedisLimiter::new(Arc::clone(&inner), name);
        for key in keys {
            if let Ok(Some(outcome)) = limiter.peek(&key).await {
                if let Some(p) = inner.lock_waiters().remove(&key) {
                    let _ = p.tx.send(Delivery::Outcome(outcome));
                }
            }
        }
    });
}

/// A Cluster's subscription moves to another node at once (before any waiter is answered) at
/// most once in this long; a loss sooner after such a move takes the usual backoff.
const MOVE_AT_ONCE_EVERY: Duration = Duration::from_secs(1);

/// Subscribes to the store's channel, waits until the subscription is confirmed, and keeps it
/// up in a task (reconnecting with backoff) until the store is dropped. On a Cluster, a lost
/// node's subscription moves to another node at once (`pubsub_nodes.rs`), and the waiters stay
/// queued: the re-check after it finds what was published meanwhile.
pub(super) async fn subscribe(inner: &Arc<Inner>, client: PubSubSource) -> Result<(), StoreError> {
    let channel = inner.channel.clone();
    let pubsub = client.subscribe(&channel).await.map_err(unavailable)?;
    let weak = Arc::downgrade(inner);
    let closing = Arc::clone(&inner.closing);
    tokio::spawn(async move {
        let mut current = Some(pubsub);
        let mut backoff = Duration::from_millis(50);
        // When the subscription last moved to another node at once.
        let mut last_move: Option<Instant> = None;
        loop {
            if let Some(pubsub) = current.take() {
                let mut messages = pubsub.into_on_message();
                loop {
                    tokio::select! {
                        msg = messages.next() => match msg {
                            Some(msg) => {
                                let Some(inner) = weak.upgrade() else { return };
                                match msg.get_payload::<String>() {
                                    Ok(payload) => deliver(&inner, &payload),
                                    Err(e) => tracing::warn!(error = %e, "unreadable wake-up"),
                                }
                            }
                            None => break,
                        },
                        _ = closing.notified() => return,
                    }
                }
                tracing::warn!(channel, "wake-up subscription lost; reconnecting");
                let Some(inner) = weak.upgrade() else { return };
                // Another node of a Cluster may take over before anyone is answered: subscribed
                // first, then the re-check, so nothing published in between is missed. Rate
                // bounded: nodes that accept and then drop it would make a loop without backoff.
                let may_move = last_move.is_none_or(|t| t.elapsed() >= MOVE_AT_ONCE_EVERY);
                if client.has_other_nodes() && may_move {
                    last_move = Some(Instant::now());
                    if let Ok(pubsub) = client.subscribe(&channel).await {
                        tracing::info!(channel, "wake-up subscription moved to another node");
                        current = Some(pubsub);
                        spawn_resync(&inner, true);
                        continue;
                    }
                }
                fail_pending(&inner);
            }
            tokio::select! {
                _ = tokio::time::sleep(backoff) => {}
                _ = closing.notified() => return,
            }
            backoff = (backoff * 2).min(Duration::from_secs(2));
            let Some(inner) = weak.upgrade() else { return };
            // Asked anew each time: under Sentinel, the master may have moved; on a Cluster,
            // the next node that answers.
            match client.subscribe(&channel).await {
                Ok(pubsub) => {
                    backoff = Duration::from_millis(50);
                    tracing::info!(channel, "wake-up subscription restored");
                    current = Some(pubsub);
                    spawn_resync(&inner, false);
                }
                Err(e) => {
                    tracing::debug!(error = %e, "wake-up subscription: still down");
                    client.failed(&e).await;
                }
            }
        }
    });
    Ok(())
}
