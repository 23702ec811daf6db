//! Stress test of the embedded store: well over a thousand tasks on a multi-threaded runtime do
//! random things to one limiter (acquire with random permits, leases and waits; hold; release,
//! drop, extend or abandon; get cancelled while waiting), while an independent witness checks
//! that the permits actually held never exceed the limit. At the end nothing is held, nothing
//! waits, and every grant is accounted for as released or expired.

// With the `shuttle` feature the store's mutex is shuttle's, which panics outside a shuttle
// test: these stress test only run without it.
#![cfg(not(feature = "shuttle"))]
#![allow(clippy::unwrap_used)]

#[path = "support/mod.rs"]
mod support;

use std::collections::HashSet;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering::SeqCst};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use floodgate::{
    AcquireOptions, ExtendError, Floodgate, Limiter, LimiterSpec, MemoryLimiter, Permit, TokioClock,
};
use support::rng::Rng;

/// The limit under test.
const LIMIT: u32 = 7;
/// How many tasks.
const TASKS: u64 = 1_200;
/// Fixed so a failure can be re-run with the same plans (the schedule itself still varies).
const SEED: u64 = 0x5EED_F100_D6A7_E001;
/// Lease of holders the witness counts: far longer than anything in this test, so it never
/// ends while they hold.
const LONG_LEASE: Duration = Duration::from_secs(60);
/// Longest lease of an abandoned (detached) permit; the end of the test waits past it.
const MAX_ABANDONED_LEASE_MS: u64 = 30;

type Backend = MemoryLimiter<TokioClock>;

/// What a task does once it holds its permits.
#[derive(Debug, Clone, Copy)]
enum Ending {
    /// Hold, then `Permit::release` (which must say the permit was still held).
    Release,
    /// Hold, then drop the guard.
    Drop,
    /// Hold, extend, hold some more, then release.
    Extend,
    /// Hold briefly on a short lease, then detach: the lease must reclaim it.
    Detach,
    /// Hold well past a very short lease: the permit must be lost (extend says `Lost`).
    ExpireWhileHeld,
}

/// How a task is cancelled, if at all.
#[derive(Debug, Clone, Copy)]
enum Cancel {
    None,
    /// The acquire is wrapped in `tokio::time::timeout` with this (short) timeout.
    Timeout(Duration),
    /// The whole task is aborted through its `JoinHandle` after this delay.
    Abort(Duration),
}

#[derive(Debug, Clone, Copy)]
struct Plan {
    start_delay: Duration,
    permits: u32,
    wait: Duration,
    hold: Duration,
    /// Lease of a detached or expiring permit (the others use `LONG_LEASE`).
    short_lease: Duration,
    ending: Ending,
    cancel: Cancel,
}

impl Plan {
    fn random(rng: &mut Rng) -> Plan {
        let ending = match rng.range(0, 99) {
            0..=29 => Ending::Release,
            30..=54 => Ending::Drop,
            55..=69 => Ending::Extend,
            70..=84 => Ending::Detach,
            _ => Ending::ExpireWhileHeld,
        };
        let (short_lease, hold) = match ending {
            Ending::Detach => (rng.millis(5, MAX_ABANDONED_LEASE_MS), rng.millis(0, 2)),
            // Held for at least 10 ms past a lease of at most 3 ms.
            Ending::ExpireWhileHeld => (rng.millis(1, 3), rng.millis(13, 20)),
            _ => (LONG_LEASE, rng.millis(0, 4)),
        };
        let wait = match rng.range(0, 9) {
            0..=1 => Duration::ZERO,
            2 => rng.millis(1, 5),
            3..=4 => rng.millis(10, 100),
            _ => Duration::from_secs(3),
        };
        let cancel = match rng.range(0, 99) {
            0..=9 => Cancel::Timeout(rng.millis(1, 8)),
            10..=17 => Cancel::Abort(rng.millis(0, 40)),
            _ => Cancel::None,
        };
        Plan {
            start_delay: rng.millis(0, 250),
            permits: u32::try_from(rng.range(1, 3)).unwrap(),
            wait,
            hold,
            short_lease,
            ending,
            cancel,
        }
    }
}

/// The independent witness: permits that tasks know they hold, counted outside the limiter.
#[derive(Default)]
struct Witness {
    current: AtomicI64,
    max: AtomicI64,
    /// Times the count went over the limit (asserted zero at the end, so the run completes and
    /// the statistics are printed even when it fails).
    violations: AtomicU64,
}

/// One holder's share of the witness count; dropping it un-counts the holder.
struct Counted {
    witness: Arc<Witness>,
    permits: i64,
}

impl Witness {
    fn enter(self: &Arc<Self>, permits: u32) -> Counted {
        let permits = i64::from(permits);
        let now = self.current.fetch_add(permits, SeqCst) + permits;
        self.max.fetch_max(now, SeqCst);
        if now > i64::from(LIMIT) {
            self.violations.fetch_add(1, SeqCst);
        }
        Counted {
            witness: Arc::clone(self),
            permits,
        }
    }
}

impl Drop for Counted {
    fn drop(&mut self) {
        self.witness.current.fetch_sub(self.permits, SeqCst);
    }
}

/// A counted holder. Fields drop in declaration order, so if the task is aborted while holding,
/// the witness stops counting it before the permit is released.
struct Held {
    counted: Counted,
    permit: Permit<Backend>,
}

impl Held {
    /// Un-counts, then releases explicitly; the lease is long, so the permit must still be held.
    async fn release(self) {
        let Held { counted, permit } = self;
        drop(counted);
        assert!(
            permit.release().await.unwrap(),
            "a long-leased permit was lost"
        );
    }

    /// Un-counts, then drops the guard (release in the background).
    fn drop_guard(self) {
        let Held { counted, permit } = self;
        drop(counted);
        drop(permit);
    }
}

/// What the tasks saw, for cross-checks and the summary.
#[derive(Default)]
struct Stats {
    granted: AtomicU64,
    refused: AtomicU64,
    timeout_cancelled: AtomicU64,
    released: AtomicU64,
    dropped: AtomicU64,
    extended: AtomicU64,
    detached: AtomicU64,
    lost_checked: AtomicU64,
    tokens: Mutex<HashSet<u64>>,
}

async fn run_task(limiter: Limiter<Backend>, plan: Plan, witness: Arc<Witness>, stats: Arc<Stats>) {
    tokio::time::sleep(plan.start_delay).await;
    let lease = match plan.ending {
        Ending::Detach | Ending::ExpireWhileHeld => plan.short_lease,
        _ => LONG_LEASE,
    };
    let options = AcquireOptions::new()
        .permits(plan.permits)
        .lease(lease)
        .wait(plan.wait);
    let acquired = match plan.cancel {
        Cancel::Timeout(limit) => {
            match tokio::time::timeout(limit, limiter.acquire(options)).await {
                Ok(acquired) => acquired,
                Err(_elapsed) => {
                    stats.timeout_cancelled.fetch_add(1, SeqCst);
                    return;
                }
            }
        }
        Cancel::None | Cancel::Abort(_) => limiter.acquire(options).await,
    };
    let mut permit = match acquired {
        Ok(permit) => permit,
        Err(e) => {
            assert!(e.is_wait_timeout(), "unexpected refusal: {e}");
            assert!(e.retry_after().is_some());
            stats.refused.fetch_add(1, SeqCst);
            return;
        }
    };
    stats.granted.fetch_add(1, SeqCst);
    assert_eq!(permit.permits(), plan.permits);
    let fresh = stats
        .tokens
        .lock()
        .unwrap()
        .insert(permit.fencing_token().0);
    assert!(
        fresh,
        "fencing token {} granted twice",
        permit.fencing_token()
    );

    match plan.ending {
        Ending::Release => {
            let held = Held {
                counted: witness.enter(plan.permits),
                permit,
            };
            tokio::time::sleep(plan.hold).await;
            held.release().await;
            stats.released.fetch_add(1, SeqCst);
        }
        Ending::Drop => {
            let held = Held {
                counted: witness.enter(plan.permits),
                permit,
            };
            tokio::time::sleep(plan.hold).await;
            held.drop_guard();
            stats.dropped.fetch_add(1, SeqCst);
        }
        Ending::Extend => {
            let mut held = Held {
                counted: witness.enter(plan.permits),
                permit,
            };
            tokio::time::sleep(plan.hold / 2).await;
            let before = held.permit.lease_deadline();
            let deadline = held.permit.extend(LONG_LEASE).await.unwrap();
            assert!(deadline >= before, "extend moved the deadline earlier");
            assert_eq!(held.permit.lease_deadline(), deadline);
            tokio::time::sleep(plan.hold / 2).await;
            held.release().await;
            stats.extended.fetch_add(1, SeqCst);
        }
        Ending::Detach => {
            // Not counted by the witness: a detached permit is held until its (short) lease ends,
            // which this task does not track.
            tokio::time::sleep(plan.hold).await;
            let grant = permit.detach();
            assert_eq!(grant.permits, plan.permits);
            stats.detached.fetch_add(1, SeqCst);
        }
        Ending::ExpireWhileHeld => {
            // Not counted: the lease ends while this task sleeps, and the slot goes to others.
            tokio::time::sleep(plan.hold).await;
            assert_eq!(permit.extend(LONG_LEASE).await, Err(ExtendError::Lost));
            // A lost permit is never revived, and the guard has nothing left to release.
            assert_eq!(permit.extend(LONG_LEASE).await, Err(ExtendError::Lost));
            assert!(!permit.release().await.unwrap());
            stats.lost_checked.fetch_add(1, SeqCst);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn random_tasks_never_exceed_the_limit_and_leak_nothing() {
    let gate = Floodgate::in_memory();
    let spec = LimiterSpec::concurrency(LIMIT)
        .with_default_lease(LONG_LEASE)
        .with_max_wait(Duration::from_secs(5))
        .with_max_queue(10_000);
    gate.define("stress", spec).await.unwrap();
    let limiter = gate.limiter("stress").await.unwrap();

    let witness = Arc::new(Witness::default());
    let stats = Arc::new(Stats::default());
    let mut rng = Rng(SEED);
    let mut handles = Vec::new();
    let mut killers = Vec::new();
    let mut planned_aborts = 0u64;
    for _ in 0..TASKS {
        let plan = Plan::random(&mut rng);
        let handle = tokio::spawn(run_task(
            limiter.clone(),
            plan,
            Arc::clone(&witness),
            Arc::clone(&stats),
        ));
        if let Cancel::Abort(after) = plan.cancel {
            planned_aborts += 1;
            // Aborts land while the task sleeps before starting, waits in the queue or holds.
            let abort = handle.abort_handle();
            let at = plan.start_delay + after;
            killers.push(tokio::spawn(async move {
                tokio::time::sleep(at).await;
                abort.abort();
            }));
        }
        handles.push(handle);
    }

    let mut aborted = 0u64;
    for handle in handles {
        match handle.await {
            Ok(()) => {}
            Err(e) if e.is_cancelled() => aborted += 1,
            Err(e) => std::panic::resume_unwind(e.into_panic()),
        }
    }
    for killer in killers {
        killer.await.unwrap();
    }

    let status = limiter.status().await.unwrap();
    assert_eq!(status.waiting, 0, "every acquire has finished: {status:?}");
    assert_eq!(status.waiting_permits, 0, "{status:?}");
    assert_eq!(witness.current.load(SeqCst), 0);

    // Abandoned permits stay held until their leases end; the timer task reclaims them.
    tokio::time::sleep(Duration::from_millis(MAX_ABANDONED_LEASE_MS + 20)).await;
    let mut status = limiter.status().await.unwrap();
    // A generous bound for the timer task to run after its deadline (a liveness bound, not a
    // timing assertion: it normally passes on the first look; 30 s, as a loaded machine needs).
    for _ in 0..3_000 {
        if status.in_use == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
        status = limiter.status().await.unwrap();
    }

    let c = status.counters;
    eprintln!(
        "witness max {} of {LIMIT}; tasks: granted {}, refused {}, timeout-cancelled {}, \
         aborted {aborted}/{planned_aborts}, released {}, dropped {}, extended {}, detached {}, \
         lost {}; limiter: {c:?}",
        witness.max.load(SeqCst),
        stats.granted.load(SeqCst),
        stats.refused.load(SeqCst),
        stats.timeout_cancelled.load(SeqCst),
        stats.released.load(SeqCst),
        stats.dropped.load(SeqCst),
        stats.extended.load(SeqCst),
        stats.detached.load(SeqCst),
        stats.lost_checked.load(SeqCst),
    );

    assert_eq!(
        witness.violations.load(SeqCst),
        0,
        "the witness saw more than {LIMIT} permits held at once (max {})",
        witness.max.load(SeqCst)
    );
    assert!(witness.max.load(SeqCst) <= i64::from(LIMIT));
    assert_eq!(status.in_use, 0, "permits leaked: {status:?}");
    assert_eq!(status.holders, 0, "grants leaked: {status:?}");
    assert_eq!(status.waiting, 0, "{status:?}");
    assert_eq!(c.granted, c.released + c.expired, "{c:?}");
    // Cross-checks with what the tasks saw (grants that raced a cancellation are invisible to
    // the tasks, hence the inequalities).
    assert!(c.granted >= stats.granted.load(SeqCst), "{c:?}");
    assert!(
        c.released >= stats.released.load(SeqCst) + stats.extended.load(SeqCst),
        "{c:?}"
    );
    assert!(
        c.expired >= stats.detached.load(SeqCst) + stats.lost_checked.load(SeqCst),
        "{c:?}"
    );
    assert_eq!(c.extend_lost, 2 * stats.lost_checked.load(SeqCst), "{c:?}");
    assert!(stats.granted.load(SeqCst) > 0);
}
