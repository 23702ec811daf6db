//! Changing a rate limit settles the time that passed before the change under the old rate.
//!
//! Every operation first applies the passage of time up to now, then does its own work
//! (crates/floodgate/src/core/mod.rs). For `reconfigure` that means: a queued head whose token
//! time under the old rate has already come is granted, even if no timer pass has run yet,
//! and only then does the new rate apply. Normally a timer pass runs at the token time, so the
//! order cannot be seen; it shows when the pass is late (a stalled client process, a store
//! timer that fires after the deadline) and the change arrives in between.
//!
//! The scenario, on every store: rate 1/s (T = 1 s), burst 3. Three tokens are taken at `t0`,
//! so a one-permit waiter's token time is `t0 + 1 s`. No timer pass runs until `t0 + 1.5 s`,
//! when the burst is lowered to 1. Under the old spec the waiter was due at `t0 + 1 s`, so the
//! change grants it at once (`t0 + 1.5 s`). Applying the new burst to the past would instead
//! push it to `t0 + 3 s` (the theoretical arrival time, with no burst allowance left). (Seconds,
//! not the 100 ms of an earlier version: on Redis, in real time, a test process stalled for
//! 100 ms between the steps blurred the two outcomes.)

#![allow(clippy::unwrap_used)]

mod support;

use std::future::Future;
use std::time::Duration;

use floodgate::core::{AcquireRequest, Admission, Effects, LimiterCore};
use floodgate::{
    AcquireOptions, Clock, Floodgate, LimiterSpec, MemoryStore, RateSpec, Store, Timestamp,
    TokioClock,
};

const MS: u64 = 1_000;

fn rate(burst: u32) -> LimiterSpec {
    LimiterSpec::rate(RateSpec::per(1, Duration::from_secs(1)).with_burst(burst))
        .with_max_wait(Duration::from_secs(5))
}

#[test]
fn the_core_settles_the_old_rate_before_changing_it() {
    let mut core = LimiterCore::new(rate(3), 1).unwrap();
    let mut fx = Effects::default();
    let one = AcquireRequest {
        wait: Some(Duration::ZERO),
        ..AcquireRequest::default()
    };
    for _ in 0..3 {
        assert!(matches!(
            core.acquire(Timestamp(0), &one, &mut fx),
            Admission::Granted(_)
        ));
    }
    let wait = AcquireRequest {
        wait: Some(Duration::from_secs(5)),
        ..AcquireRequest::default()
    };
    let Admission::Queued(id) = core.acquire(Timestamp(0), &wait, &mut fx) else {
        panic!("the fourth token is not due yet");
    };
    assert_eq!(core.next_deadline(), Some(Timestamp(1_000 * MS)));
    // The timer pass at 1 s is skipped; the change comes at 1.5 s.
    core.reconfigure(Timestamp(1_500 * MS), rate(1), &mut fx)
        .unwrap();
    assert_eq!(fx.wakes.len(), 1);
    let (woken, outcome) = &fx.wakes[0];
    assert_eq!(*woken, id);
    assert_eq!(outcome.as_ref().unwrap().granted_at, Timestamp(1_500 * MS));
}

/// The scenario on a store: `stall` keeps timer passes from running for 1.5 s.
///
/// In real time (Redis) the test process may be stalled longer than the scenario allows: past
/// the waiter's token time before it queued (it is then granted on arrival), or past 2.5 s
/// before the change (the two outcomes then look alike). Such a run shows nothing either way
/// and is run again (at most 5 times); the process's own clock says which runs they were.
async fn settles_the_old_rate_first<S: Store, F: Future<Output = ()>>(
    gate: Floodgate<S>,
    stall: impl Fn() -> F,
) {
    for attempt in 0..5 {
        if settled_once(&gate, &format!("r{attempt}"), &stall).await {
            return;
        }
        eprintln!("attempt {attempt}: the test process was stalled past the scenario's times");
    }
    panic!("stalled past the scenario's times in 5 attempts");
}

/// One run of the scenario on limiter `name`; `false` if the process was stalled too long for
/// it to show anything.
async fn settled_once<S: Store, F: Future<Output = ()>>(
    gate: &Floodgate<S>,
    name: &str,
    stall: &impl Fn() -> F,
) -> bool {
    gate.define(name, rate(3)).await.unwrap();
    let lim = gate.limiter(name).await.unwrap();
    // Before t0 on this process's clock: whatever passes after it bounds the store's time
    // since t0 from above.
    let before_t0 = tokio::time::Instant::now();
    let mut t0 = None;
    for _ in 0..3 {
        let p = lim
            .acquire(AcquireOptions::new().wait(Duration::ZERO))
            .await
            .unwrap();
        t0.get_or_insert(p.grant().granted_at.0);
    }
    let t0 = t0.unwrap();
    let waiter = {
        let lim = lim.clone();
        tokio::spawn(async move {
            lim.acquire(AcquireOptions::new().wait(Duration::from_secs(5)))
                .await
        })
    };
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while lim.status().await.unwrap().waiting == 0 {
        if waiter.is_finished() {
            // Granted on arrival: only right if it came at its token time or later.
            let p = waiter.await.unwrap().unwrap();
            let at = p.grant().granted_at.0 - t0;
            assert!(
                at >= 1_000 * MS,
                "the fourth token granted at {} ms",
                at / MS
            );
            return false;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the waiter never queued"
        );
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    stall().await;
    gate.define(name, rate(1)).await.unwrap();
    let changed_by = tokio::time::Instant::now() - before_t0;
    let p = waiter.await.unwrap().unwrap();
    let at = p.grant().granted_at.0 - t0;
    // Not before the change: no timer pass ran at the token time.
    assert!(
        at >= 1_500 * MS,
        "granted at {} ms, before the change",
        at / MS
    );
    if changed_by >= Duration::from_millis(2_500) {
        return false;
    }
    assert!(
        at < 2_500 * MS,
        "the waiter due at 1 s (old burst 3) was granted at {} ms: the new burst 1 was \
         applied to time that passed before the change",
        at / MS
    );
    true
}

/// Timers that fire a second late: the embedded store's timer task then runs no pass at the
/// token time, as a stalled process would not.
#[derive(Debug, Clone, Copy)]
struct LateTimers(TokioClock);

impl Clock for LateTimers {
    fn now(&self) -> Timestamp {
        self.0.now()
    }
    fn instant_at(&self, at: Timestamp) -> tokio::time::Instant {
        self.0.instant_at(at) + Duration::from_secs(1)
    }
}

#[tokio::test(start_paused = true)]
async fn the_embedded_store_settles_the_old_rate_first() {
    let gate = Floodgate::with_store(MemoryStore::with_clock(LateTimers(TokioClock::new())));
    settles_the_old_rate_first(gate, || tokio::time::sleep(Duration::from_millis(1_500))).await;
}

/// Blocking the test's (single) runtime thread keeps the store's timer task from running its
/// `advance` at the token time; the `put` is then sent before that pass, on the same
/// connection, so Redis runs it first.
#[cfg(feature = "redis")]
#[tokio::test]
async fn redis_settles_the_old_rate_first() {
    let server = support::RedisServer::start();
    let store = floodgate::RedisStore::connect(floodgate::RedisConfig::new(server.url()))
        .await
        .unwrap();
    settles_the_old_rate_first(Floodgate::with_store(store), || async {
        std::thread::sleep(Duration::from_millis(1_500));
    })
    .await;
}
