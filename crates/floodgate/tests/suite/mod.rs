//! The behavioural test suite every store must pass.
//!
//! Written once against `Floodgate<S>` for any `S: Store`; `store_suite!` instantiates it for
//! one store. Durations are short real durations (hundreds of milliseconds) so the suite also
//! runs against stores whose clock cannot be paused (Redis `TIME`); the embedded store runs it
//! under tokio's paused time, where they cost nothing.

#![allow(dead_code, clippy::unwrap_used)]

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use floodgate::{
    AcquireError, AcquireOptions, ExtendError, Floodgate, LimiterBackend, LimiterSpec,
    LimiterStatus, Refusal, Store, StoreError,
};
use tokio::time::sleep;

const LEASE: Duration = Duration::from_millis(400);
const WAIT: Duration = Duration::from_millis(2_000);

/// A limiter name unique within the test process, so suites can share one store server.
pub(crate) fn unique(prefix: &str) -> String {
    static N: AtomicU64 = AtomicU64::new(0);
    format!(
        "{prefix}-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    )
}

fn spec(limit: u32) -> LimiterSpec {
    LimiterSpec::concurrency(limit)
        .with_default_lease(LEASE)
        .with_max_wait(WAIT)
}

fn wait(ms: u64) -> AcquireOptions {
    AcquireOptions::new().wait(Duration::from_millis(ms))
}

async fn waiting<S: Store>(gate: &Floodgate<S>, name: &str) -> u32 {
    gate.limiter(name)
        .await
        .unwrap()
        .status()
        .await
        .unwrap()
        .waiting
}

/// Polls the limiter's status until `cond` holds (bounded: panics after 10 s). Spawned tasks
/// and background releases reach a remote store after a round trip, so tests wait for the
/// state they need instead of sleeping a guessed time.
async fn until<B: LimiterBackend>(
    lim: &floodgate::Limiter<B>,
    what: &str,
    cond: impl Fn(&LimiterStatus) -> bool,
) -> LimiterStatus {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let st = lim.status().await.unwrap();
        if cond(&st) {
            return st;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "never reached: {what}; last {st:?}"
        );
        sleep(Duration::from_millis(5)).await;
    }
}

/// Asserts the limiter is gone: either the handle is refused, or (for stores whose handles are
/// lazy) its first operation is.
async fn assert_unknown<S: Store>(gate: &Floodgate<S>, name: &str) {
    match gate.limiter(name).await {
        Err(StoreError::UnknownLimiter(_)) => {}
        Ok(lim) => assert!(
            matches!(lim.status().await, Err(StoreError::UnknownLimiter(_))),
            "{name} still answers"
        ),
        Err(e) => panic!("{e:?}"),
    }
}

pub(crate) async fn grants_up_to_the_limit_and_releases<S: Store>(gate: Floodgate<S>) {
    let name = unique("basic");
    gate.define(&name, spec(2)).await.unwrap();
    let lim = gate.limiter(&name).await.unwrap();
    let a = lim.acquire(wait(0)).await.unwrap();
    let b = lim.acquire(wait(0)).await.unwrap();
    assert!(b.fencing_token() > a.fencing_token());
    let third = lim.acquire(wait(0)).await.unwrap_err();
    assert!(third.is_wait_timeout(), "{third:?}");
    assert!(third.retry_after().is_some());
    let st = lim.status().await.unwrap();
    assert_eq!((st.in_use, st.holders, st.waiting), (2, 2, 0));
    assert!(a.release().await.unwrap());
    drop(b);
    let st = until(&lim, "the dropped permit is released", |s| s.in_use == 0).await;
    assert_eq!(st.counters.granted, 2);
    assert_eq!(st.counters.released, 2);
    assert_eq!(st.counters.timed_out, 1);
}

pub(crate) async fn waiters_are_granted_in_fifo_order<S: Store>(gate: Floodgate<S>) {
    let name = unique("fifo");
    gate.define(&name, spec(2)).await.unwrap();
    let lim = gate.limiter(&name).await.unwrap();
    let holder = lim.acquire(wait(0).permits(2)).await.unwrap();
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let mut tasks = Vec::new();
    for (i, permits) in [2u32, 1, 1].into_iter().enumerate() {
        let task_lim = lim.clone();
        let tx = tx.clone();
        tasks.push(tokio::spawn(async move {
            let p = task_lim
                .acquire(wait(1_500).permits(permits))
                .await
                .unwrap();
            tx.send((i, p.fencing_token())).unwrap();
            sleep(Duration::from_millis(50)).await;
            drop(p);
        }));
        until(&lim, "queued in turn", |s| s.waiting as usize == i + 1).await;
    }
    assert_eq!(waiting(&gate, &name).await, 3);
    drop(holder);
    for t in tasks {
        t.await.unwrap();
    }
    let mut order = Vec::new();
    let mut tokens = Vec::new();
    while let Ok((i, tok)) = rx.try_recv() {
        order.push(i);
        tokens.push(tok);
    }
    assert_eq!(order, vec![0, 1, 2], "granted in queue order");
    assert!(tokens.windows(2).all(|w| w[0] < w[1]));
}

pub(crate) async fn a_large_request_is_not_starved_by_small_ones<S: Store>(gate: Floodgate<S>) {
    let name = unique("starve");
    gate.define(&name, spec(3)).await.unwrap();
    let lim = gate.limiter(&name).await.unwrap();
    let one = lim.acquire(wait(0)).await.unwrap();
    let big = {
        let lim = lim.clone();
        tokio::spawn(async move { lim.acquire(wait(1_500).permits(3)).await })
    };
    until(&lim, "the big request queued", |s| s.waiting == 1).await;
    // Two permits are free, but a 1-permit arrival must queue behind the 3-permit head.
    let small = lim.acquire(wait(0)).await.unwrap_err();
    assert!(small.is_wait_timeout());
    drop(one);
    let big = big.await.unwrap().unwrap();
    assert_eq!(big.permits(), 3);
}

pub(crate) async fn an_expired_lease_is_reclaimed_without_other_traffic<S: Store>(
    gate: Floodgate<S>,
) {
    let name = unique("expiry");
    gate.define(&name, spec(1)).await.unwrap();
    let lim = gate.limiter(&name).await.unwrap();
    // A holder that dies: never releases.
    let dead = lim.acquire(wait(0)).await.unwrap().detach();
    // A waiter is woken by the lease ending, with no release and no new arrival.
    let p = lim.acquire(wait(1_500)).await.unwrap();
    assert!(p.fencing_token() > dead.token);
    let st = lim.status().await.unwrap();
    assert_eq!(st.counters.expired, 1);
    // The dead holder's late release and extend change nothing.
    assert!(!lim.backend().release(dead.token).await.unwrap());
    assert_eq!(
        lim.backend().extend(dead.token, LEASE).await,
        Err(ExtendError::Lost)
    );
    assert_eq!(lim.status().await.unwrap().in_use, 1);
    assert!(p.release().await.unwrap());
    // And with nobody waiting, the timer still reclaims an abandoned lease.
    let _ = lim.acquire(wait(0)).await.unwrap().detach();
    sleep(LEASE + Duration::from_millis(200)).await;
    let st = lim.status().await.unwrap();
    assert_eq!(st.in_use, 0);
    assert_eq!(st.counters.expired, 2);
}

pub(crate) async fn extend_keeps_a_permit_and_never_revives_one<S: Store>(gate: Floodgate<S>) {
    let name = unique("extend");
    gate.define(&name, spec(1)).await.unwrap();
    let lim = gate.limiter(&name).await.unwrap();
    let mut p = lim.acquire(wait(0)).await.unwrap();
    // Hold for three leases, extending at each half-lease: never lost.
    for _ in 0..6 {
        sleep(LEASE / 2).await;
        p.extend(LEASE).await.unwrap();
    }
    assert_eq!(lim.status().await.unwrap().counters.expired, 0);
    // Stop extending: it is lost, and an extend does not bring it back.
    sleep(LEASE + Duration::from_millis(100)).await;
    assert_eq!(p.extend(LEASE).await, Err(ExtendError::Lost));
    let st = lim.status().await.unwrap();
    assert_eq!(st.in_use, 0);
    assert_eq!(st.counters.extend_lost, 1);
    // Another holder got in; the lost guard's drop does not release it.
    let q = lim.acquire(wait(0)).await.unwrap();
    drop(p);
    assert_eq!(lim.status().await.unwrap().in_use, 1);
    assert!(q.release().await.unwrap());
    // Bad lease values are refused by field name.
    let mut r = lim.acquire(wait(0)).await.unwrap();
    match r.extend(Duration::ZERO).await {
        Err(ExtendError::Invalid(f)) => assert_eq!(f.field, "lease_ms"),
        other => panic!("{other:?}"),
    }
}

pub(crate) async fn release_is_idempotent<S: Store>(gate: Floodgate<S>) {
    let name = unique("release");
    gate.define(&name, spec(2)).await.unwrap();
    let lim = gate.limiter(&name).await.unwrap();
    let p = lim.acquire(wait(0)).await.unwrap();
    let _other = lim.acquire(wait(0)).await.unwrap();
    let token = p.fencing_token();
    assert!(p.release().await.unwrap());
    assert!(!lim.backend().release(token).await.unwrap());
    assert!(!lim
        .backend()
        .release(floodgate::FencingToken(u64::MAX - 7))
        .await
        .unwrap());
    let st = lim.status().await.unwrap();
    assert_eq!((st.in_use, st.counters.released), (1, 1));
}

pub(crate) async fn a_dropped_waiter_leaves_the_queue<S: Store>(gate: Floodgate<S>) {
    let name = unique("cancel");
    gate.define(&name, spec(1)).await.unwrap();
    let lim = gate.limiter(&name).await.unwrap();
    let holder = lim.acquire(wait(0)).await.unwrap();
    let gives_up = {
        let lim = lim.clone();
        tokio::spawn(async move { lim.acquire(wait(1_500)).await })
    };
    until(&lim, "first waiter queued", |s| s.waiting == 1).await;
    let next = {
        let lim = lim.clone();
        tokio::spawn(async move { lim.acquire(wait(1_500)).await })
    };
    until(&lim, "second waiter queued", |s| s.waiting == 2).await;
    gives_up.abort();
    until(&lim, "the aborted waiter left", |s| s.waiting == 1).await;
    drop(holder);
    let p = next.await.unwrap().unwrap();
    let st = until(&lim, "granted to the next", |s| s.in_use == 1).await;
    assert_eq!((st.in_use, st.waiting, st.counters.cancelled), (1, 0, 1));
    drop(p);
}

pub(crate) async fn a_timed_out_waiter_gets_an_answer<S: Store>(gate: Floodgate<S>) {
    let name = unique("timeout");
    gate.define(&name, spec(1)).await.unwrap();
    let lim = gate.limiter(&name).await.unwrap();
    let _holder = lim.acquire(wait(0)).await.unwrap();
    let err = lim.acquire(wait(200)).await.unwrap_err();
    assert!(matches!(
        err,
        AcquireError::Refused(Refusal::WaitTimeout { .. })
    ));
    let hint = err.retry_after().unwrap();
    assert!(hint > Duration::ZERO && hint <= LEASE, "{hint:?}");
    let st = lim.status().await.unwrap();
    assert_eq!((st.waiting, st.counters.timed_out), (0, 1));
    // A wait longer than max_wait is capped, never unbounded.
    let err = lim
        .acquire(
            AcquireOptions::new()
                .wait(Duration::from_secs(3600))
                .lease(LEASE),
        )
        .await;
    // The holder's lease ends within max_wait, so this one is granted instead.
    assert!(err.is_ok());
}

pub(crate) async fn raising_the_limit_wakes_waiters_and_lowering_it_drains<S: Store>(
    gate: Floodgate<S>,
) {
    let name = unique("resize");
    gate.define(&name, spec(1)).await.unwrap();
    let lim = gate.limiter(&name).await.unwrap();
    let first = lim.acquire(wait(0)).await.unwrap();
    let waiters: Vec<_> = (0..2)
        .map(|_| {
            let lim = lim.clone();
            tokio::spawn(async move { lim.acquire(wait(1_500)).await })
        })
        .collect();
    until(&lim, "both queued", |s| s.waiting == 2).await;
    gate.define(&name, spec(3)).await.unwrap();
    let mut held = vec![first];
    for w in waiters {
        held.push(w.await.unwrap().unwrap());
    }
    assert_eq!(lim.status().await.unwrap().in_use, 3);
    // Lower to 1: holders keep their permits; nothing is granted until in-use is below 1.
    let st = gate.define(&name, spec(1)).await.unwrap();
    assert_eq!(
        (st.in_use, st.spec.concurrency, st.limit),
        (3, Some(1), Some(1))
    );
    let late = {
        let lim = lim.clone();
        tokio::spawn(async move { lim.acquire(wait(1_500)).await })
    };
    until(&lim, "late waiter queued", |s| s.waiting == 1).await;
    held.pop();
    held.pop();
    let st = until(&lim, "two released", |s| s.in_use == 1).await;
    assert_eq!(st.waiting, 1, "in use 1 is not below 1");
    held.pop();
    let p = late.await.unwrap().unwrap();
    assert_eq!(lim.status().await.unwrap().in_use, 1);
    drop(p);
}

pub(crate) async fn deleting_a_limiter_answers_its_waiters<S: Store>(gate: Floodgate<S>) {
    let name = unique("delete");
    gate.define(&name, spec(1)).await.unwrap();
    let lim = gate.limiter(&name).await.unwrap();
    let p = lim.acquire(wait(0)).await.unwrap();
    let waiter = {
        let lim = lim.clone();
        tokio::spawn(async move { lim.acquire(wait(1_500)).await })
    };
    until(&lim, "waiter queued", |s| s.waiting == 1).await;
    assert!(gate.delete(&name).await.unwrap());
    let err = waiter.await.unwrap().unwrap_err();
    assert!(
        matches!(
            err,
            AcquireError::Refused(Refusal::LimiterDeleted)
                | AcquireError::Store(StoreError::UnknownLimiter(_))
        ),
        "{err:?}"
    );
    assert!(!p.release().await.unwrap());
    assert!(!gate.delete(&name).await.unwrap());
    assert_unknown(&gate, &name).await;
}

pub(crate) async fn bad_input_is_refused_by_name<S: Store>(gate: Floodgate<S>) {
    assert!(matches!(
        gate.define("has space", spec(1)).await,
        Err(StoreError::BadName(_))
    ));
    assert!(matches!(
        gate.define(&unique("zero"), spec(0)).await,
        Err(StoreError::Invalid(f)) if f.field == "concurrency"
    ));
    let name = unique("bad");
    gate.define(&name, spec(2)).await.unwrap();
    let lim = gate.limiter(&name).await.unwrap();
    match lim.acquire(wait(0).permits(3)).await {
        Err(AcquireError::Refused(Refusal::PermitsExceedLimit {
            requested: 3,
            limit: 2,
        })) => {}
        other => panic!("{other:?}"),
    }
    match lim.acquire(wait(0).permits(0)).await {
        Err(AcquireError::Refused(Refusal::Invalid(f))) => assert_eq!(f.field, "permits"),
        other => panic!("{other:?}"),
    }
    match lim
        .acquire(wait(0).lease(Duration::from_secs(7 * 24 * 3600)))
        .await
    {
        Err(AcquireError::Refused(Refusal::Invalid(f))) => assert_eq!(f.field, "lease_ms"),
        other => panic!("{other:?}"),
    }
    assert_eq!(lim.status().await.unwrap().in_use, 0);
    assert_unknown(&gate, &unique("missing")).await;
}

pub(crate) async fn limiters_are_listed<S: Store>(gate: Floodgate<S>) {
    let a = unique("list-a");
    let b = unique("list-b");
    gate.define(&a, spec(1)).await.unwrap();
    gate.define(&b, spec(2)).await.unwrap();
    let all = gate.limiters().await.unwrap();
    let names: Vec<&str> = all.iter().map(|s| s.name.as_str()).collect();
    assert!(names.contains(&a.as_str()) && names.contains(&b.as_str()));
    let mut sorted = names.clone();
    sorted.sort_unstable();
    assert_eq!(names, sorted);
}

/// Instantiates the suite: `store_suite!(paused, async { Floodgate::with_store(...) })`.
#[macro_export]
macro_rules! store_suite {
    ($paused:literal, $make:expr) => {
        $crate::store_suite!(@tests $paused, $make;
            grants_up_to_the_limit_and_releases,
            waiters_are_granted_in_fifo_order,
            a_large_request_is_not_starved_by_small_ones,
            an_expired_lease_is_reclaimed_without_other_traffic,
            extend_keeps_a_permit_and_never_revives_one,
            release_is_idempotent,
            a_dropped_waiter_leaves_the_queue,
            a_timed_out_waiter_gets_an_answer,
            raising_the_limit_wakes_waiters_and_lowering_it_drains,
            deleting_a_limiter_answers_its_waiters,
            bad_input_is_refused_by_name,
            limiters_are_listed,
        );
    };
    (@tests $paused:literal, $make:expr; $($name:ident),* $(,)?) => {
        $(
            #[tokio::test(start_paused = $paused)]
            async fn $name() {
                let gate = $make.await;
                suite::$name(gate).await;
            }
        )*
    };
}
