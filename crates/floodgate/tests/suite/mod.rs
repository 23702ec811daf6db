//! The behavioural test suite every store must pass.
//!
//! Written once against `Floodgate<S>` for any `S: Store`; `store_suite!` instantiates it for
//! one store. Durations are short real durations (hundreds of milliseconds) so the suite also
//! runs against stores whose clock cannot be paused (Redis `TIME`); the embedded store runs it
//! under tokio's paused time, where they cost nothing. In real time the test process may be
//! stalled for a while on a loaded machine: a permit a test keeps has a lease no stall outlasts
//! (`HOLD`), an acquire that must be granted waits long (`WAIT`), and only what a test lets lapse
//! or time out on purpose is short.

#![allow(dead_code, clippy::unwrap_used)]

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use floodgate::{
    AcquireError, AcquireOptions, ExtendError, Floodgate, LimiterBackend, LimiterSpec,
    LimiterStatus, RateSpec, Refusal, ReservationId, Store, StoreError,
};
use tokio::time::{sleep, Instant};

/// The lease of a permit a test lets lapse (or keeps by extending it).
const LEASE: Duration = Duration::from_millis(400);
/// The default lease: a permit a test keeps never lapses while the test is stalled (a 400 ms
/// default lapsed under load, and the limiter rightly granted past the holder the test kept).
const HOLD: Duration = Duration::from_secs(60);
/// `max_wait`, and the wait of acquires that must be granted (in real time, well after the
/// moment they are due when the test process is stalled).
const WAIT: Duration = Duration::from_secs(10);
const WAIT_MS: u64 = 10_000;

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
        .with_default_lease(HOLD)
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
                .acquire(wait(WAIT_MS).permits(permits))
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
        tokio::spawn(async move { lim.acquire(wait(WAIT_MS).permits(3)).await })
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
    let dead = lim.acquire(wait(0).lease(LEASE)).await.unwrap().detach();
    // A waiter is woken by the lease ending, with no release and no new arrival.
    let p = lim.acquire(wait(WAIT_MS)).await.unwrap();
    assert!(p.fencing_token() > dead.token);
    let st = lim.status().await.unwrap();
    assert_eq!(st.counters.expired, 1);
    // The dead holder's late release and extend change nothing.
    assert!(!lim.backend().release(dead.token).await.unwrap());
    assert_eq!(
        lim.backend().extend(dead.token, LEASE, Some(1)).await,
        Err(ExtendError::Lost)
    );
    assert_eq!(lim.status().await.unwrap().in_use, 1);
    assert!(p.release().await.unwrap());
    // And with nobody waiting, the timer still reclaims an abandoned lease.
    let _ = lim.acquire(wait(0).lease(LEASE)).await.unwrap().detach();
    sleep(LEASE + Duration::from_millis(200)).await;
    let st = lim.status().await.unwrap();
    assert_eq!(st.in_use, 0);
    assert_eq!(st.counters.expired, 2);
}

pub(crate) async fn extend_keeps_a_permit_and_never_revives_one<S: Store>(gate: Floodgate<S>) {
    let name = unique("extend");
    gate.define(&name, spec(1)).await.unwrap();
    let lim = gate.limiter(&name).await.unwrap();
    // Extended every quarter lease (400 ms extended every 200 ms lapsed under load; so did
    // 2 s every 500 ms when the test process was stopped for 1.7 s).
    let lease = LEASE * 5;
    // Hold for one and a half leases, extending at each quarter-lease: never lost while the
    // lease runs. In real time a stalled test process can outlast the lease between two
    // extends; that loss is due (checked on this process's clock, which never puts the
    // lease's end after the store's), and the hold starts over with a new permit.
    let mut stalled = 0;
    let mut p = 'hold: loop {
        let mut p = lim.acquire(wait(0).lease(lease)).await.unwrap();
        for _ in 0..6 {
            sleep(lease / 4).await;
            match p.extend(lease).await {
                Ok(_) => {}
                Err(ExtendError::Lost) => {
                    let (now, deadline) = (Instant::now(), p.local_deadline());
                    assert!(
                        now >= deadline,
                        "lost {:?} before its lease ended",
                        deadline - now
                    );
                    stalled += 1;
                    assert!(
                        stalled < 5,
                        "the test process outlasted the lease {stalled} times"
                    );
                    continue 'hold;
                }
                Err(e) => panic!("{e:?}"),
            }
        }
        break p;
    };
    assert_eq!(lim.status().await.unwrap().counters.expired, stalled);
    // Stop extending: it is lost, and an extend does not bring it back.
    sleep(lease + Duration::from_millis(100)).await;
    assert_eq!(p.extend(lease).await, Err(ExtendError::Lost));
    let st = lim.status().await.unwrap();
    assert_eq!(st.in_use, 0);
    assert_eq!(st.counters.extend_lost, 1 + stalled);
    // Another holder got in; the lost guard's drop does not release it. A guard's drop
    // releases in the background (on Redis, a task): a status read right after the drop may
    // come before any release it sent. The only release it can send is of its own token;
    // that release, awaited, is what the check observes.
    let q = lim.acquire(wait(0)).await.unwrap();
    let lost = p.fencing_token();
    drop(p);
    assert!(
        !lim.backend().release(lost).await.unwrap(),
        "the lost token released"
    );
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
        tokio::spawn(async move { lim.acquire(wait(WAIT_MS)).await })
    };
    until(&lim, "first waiter queued", |s| s.waiting == 1).await;
    let next = {
        let lim = lim.clone();
        tokio::spawn(async move { lim.acquire(wait(WAIT_MS)).await })
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

/// Idempotent acquires (issue 10): a repeat with the same `request_id` gets the grant the first
/// got; a retry after the first attempt went away joins its wait (one waiter, one grant); with
/// no retry, the wait ends after the grace for one.
pub(crate) async fn idempotent_acquires_are_granted_once<S: Store>(gate: Floodgate<S>) {
    let name = unique("idempotent");
    // Leases and waits that outlast the grace: only the grace may end a wait here.
    let long = LimiterSpec::concurrency(1)
        .with_default_lease(Duration::from_secs(60))
        .with_max_wait(Duration::from_secs(60));
    gate.define(&name, long).await.unwrap();
    let lim = gate.limiter(&name).await.unwrap();
    let id = |s: &str| format!("{name}-{s}");
    let first = lim.acquire(wait(0).request_id(id("held"))).await.unwrap();
    let again = lim.acquire(wait(0).request_id(id("held"))).await.unwrap();
    assert_eq!(again.fencing_token(), first.fencing_token());
    assert_eq!(again.lease_deadline(), first.lease_deadline());
    assert_eq!(lim.status().await.unwrap().holders, 1);
    let holder = again.detach();
    assert!(first.release().await.unwrap(), "the one grant");
    assert!(!lim.backend().release(holder.token).await.unwrap());

    // A waiter whose caller went away, and its retry.
    let holder = lim.acquire(wait(0)).await.unwrap();
    let gone = {
        let lim = lim.clone();
        let opts = wait(60_000).request_id(id("queued"));
        tokio::spawn(async move { lim.acquire(opts).await })
    };
    until(&lim, "queued", |s| s.waiting == 1).await;
    gone.abort();
    let _ = gone.await;
    let retry = {
        let lim = lim.clone();
        let opts = wait(60_000).request_id(id("queued"));
        tokio::spawn(async move { lim.acquire(opts).await })
    };
    // The retry joined: still one waiter, after the grace too.
    tokio::time::sleep(floodgate::core::ORPHANED_WAIT_GRACE + Duration::from_secs(1)).await;
    assert_eq!(lim.status().await.unwrap().waiting, 1);
    drop(holder);
    let p = retry.await.unwrap().unwrap();
    let st = lim.status().await.unwrap();
    assert_eq!((st.holders, st.waiting), (1, 0));
    assert!(p.release().await.unwrap());

    // No retry: the abandoned wait ends after the grace, and takes nothing.
    let holder = lim.acquire(wait(0)).await.unwrap();
    let gone = {
        let lim = lim.clone();
        let opts = wait(60_000).request_id(id("abandoned"));
        tokio::spawn(async move { lim.acquire(opts).await })
    };
    until(&lim, "queued", |s| s.waiting == 1).await;
    gone.abort();
    let _ = gone.await;
    until(&lim, "the abandoned wait ended", |s| s.waiting == 0).await;
    drop(holder);
    until(&lim, "nothing held", |s| s.in_use == 0).await;
}

pub(crate) async fn a_timed_out_waiter_gets_an_answer<S: Store>(gate: Floodgate<S>) {
    let name = unique("timeout");
    gate.define(&name, spec(1)).await.unwrap();
    let lim = gate.limiter(&name).await.unwrap();
    // Held longer than the 200 ms wait below lasts, even if the test is stalled in between.
    let held_for = LEASE * 5;
    let _holder = lim.acquire(wait(0).lease(held_for)).await.unwrap();
    let err = lim.acquire(wait(200)).await.unwrap_err();
    assert!(matches!(
        err,
        AcquireError::Refused(Refusal::WaitTimeout { .. })
    ));
    let hint = err.retry_after().unwrap();
    assert!(hint > Duration::ZERO && hint <= held_for, "{hint:?}");
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
            tokio::spawn(async move { lim.acquire(wait(WAIT_MS)).await })
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
        tokio::spawn(async move { lim.acquire(wait(WAIT_MS)).await })
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
        tokio::spawn(async move { lim.acquire(wait(WAIT_MS)).await })
    };
    until(&lim, "waiter queued", |s| s.waiting == 1).await;
    assert!(gate.delete(&name).await.unwrap());
    let err = waiter.await.unwrap().unwrap_err();
    assert!(
        matches!(err, AcquireError::Refused(Refusal::LimiterDeleted)),
        "{err:?}"
    );
    assert!(!p.release().await.unwrap());
    assert!(!gate.delete(&name).await.unwrap());
    assert_unknown(&gate, &name).await;
}

pub(crate) async fn tokens_keep_increasing_across_delete_and_recreate<S: Store>(
    gate: Floodgate<S>,
) {
    let name = unique("recreate");
    gate.define(&name, spec(1)).await.unwrap();
    let lim = gate.limiter(&name).await.unwrap();
    let mut last = floodgate::FencingToken(0);
    for _ in 0..50 {
        let p = lim.acquire(wait(0)).await.unwrap();
        last = p.fencing_token();
        assert!(p.release().await.unwrap());
    }
    assert!(gate.delete(&name).await.unwrap());
    gate.define(&name, spec(1)).await.unwrap();
    let again = gate.limiter(&name).await.unwrap();
    let p = again.acquire(wait(0)).await.unwrap();
    assert!(
        p.fencing_token() > last,
        "{:?} after {:?}",
        p.fencing_token(),
        last
    );
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

// ---------------------------------------------------------------------------------------------
// Rate limits (GCRA). These take `paused`: under paused time (the embedded store) they run
// long and check exactly; in real time (Redis) they run for a few seconds and allow the
// measured scheduling skew where a bound involves the caller's clock. Bounds on the store's
// own clock (`Grant::granted_at`, the clock GCRA runs on) are exact on every store.
// ---------------------------------------------------------------------------------------------

/// Microseconds in a duration.
fn us(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap()
}

/// One grant as both sides saw it.
#[derive(Debug, Clone, Copy)]
struct Seen {
    /// `Grant::granted_at`: when the store granted it, on the store's clock.
    store_us: u64,
    /// When `acquire` returned to the caller (tokio's clock).
    seen: Instant,
    /// Rate tokens it took (its permits).
    tokens: u64,
    /// Its fencing token: grant order.
    token: u64,
}

type Log = Arc<Mutex<Vec<Seen>>>;

fn record<B: LimiterBackend>(log: &Log, p: &floodgate::Permit<B>) -> Seen {
    let seen = Seen {
        store_us: p.grant().granted_at.0,
        seen: Instant::now(),
        tokens: u64::from(p.permits()),
        token: p.fencing_token().0,
    };
    log.lock().unwrap().push(seen);
    seen
}

/// Asserts the GCRA bound on every window: for any two grant times `a <= b`, the tokens granted
/// within `[a, b]` number at most `burst + floor((b - a) / interval) + slack`.
///
/// All O(n^2) windows are checked in one pass. With the grants in time order and `S(k)` the
/// tokens of the first `k`, the window from grant `i` to grant `j` holds `S(j+1) - S(i)`
/// tokens; tokens being whole, `n <= burst + slack + floor(span / T)` iff
/// `(n - burst - slack) * T <= span`, that is
/// `(S(j+1) * T - t_j) - (S(i) * T - t_i) <= (burst + slack) * T`: a running minimum of the
/// second term does it. (Windows starting or ending inside a group of equal times hold a
/// subset of the group's tokens, so they are implied by the full ones and harmless to check.)
fn assert_windows(what: &str, grants: &[(u64, u64)], burst: u64, interval: u64, slack: u64) {
    let mut g = grants.to_vec();
    g.sort_unstable();
    let t = i128::from(interval);
    let allowed = i128::from(burst + slack) * t;
    let mut sum: i128 = 0;
    let mut best: Option<(i128, usize)> = None;
    for (j, &(time, tokens)) in g.iter().enumerate() {
        let left = sum * t - i128::from(time);
        if best.is_none_or(|(b, _)| left < b) {
            best = Some((left, j));
        }
        sum += i128::from(tokens);
        let right = sum * t - i128::from(time);
        let (min_left, i) = best.unwrap();
        if right - min_left > allowed {
            let tokens: u64 = g[i..=j].iter().map(|x| x.1).sum();
            let span = g[j].0 - g[i].0;
            panic!(
                "{what}: {tokens} tokens within {span} us (grants {i}..={j} of {}), more than \
                 burst {burst} + floor(span / {interval} us) = {} (+ slack {slack})",
                g.len(),
                burst + span / interval,
            );
        }
    }
}

/// Checks a grant log against the rate on both clocks. On the store's clock the bound is exact.
/// On the caller's clock each grant is seen some delay `d` after the store made it; if `d`
/// varies by at most `D`, an observed window of length `w` contains only grants the store made
/// within a window of length `w + D`, so it may hold `ceil(D / T)` tokens more than the bound.
/// `D` is measured: `seen - granted_at` is `d` plus the constant offset between the two clocks,
/// so its spread is `D`. Under paused time `D` is zero (a woken task runs before time moves on)
/// and that is asserted. In real time the slack is one token, a skew of up to one emission
/// interval (typically measured at 0.5 to 20 ms, against intervals of 40 and 50 ms); should a
/// stalled test process stretch the skew past that (43 ms was seen once, on a loaded shared
/// machine), the slack is `ceil(D / T)`, which is what the argument above allows, and a note
/// is printed.
fn assert_rate_on_both_clocks(what: &str, log: &[Seen], rate: RateSpec, paused: bool) {
    let burst = u64::from(rate.burst);
    let t = rate.interval_us();
    let store: Vec<(u64, u64)> = log.iter().map(|s| (s.store_us, s.tokens)).collect();
    assert_windows(&format!("{what} (store clock)"), &store, burst, t, 0);
    let origin = log.iter().map(|s| s.seen).min().unwrap();
    let seen: Vec<(u64, u64)> = log
        .iter()
        .map(|s| (us(s.seen - origin), s.tokens))
        .collect();
    // Delay up to a constant (the two clocks' origins): its spread is the skew `D`.
    let delays = log
        .iter()
        .map(|s| i128::from(us(s.seen - origin)) - i128::from(s.store_us));
    let spread = delays.clone().max().unwrap() - delays.min().unwrap();
    if paused {
        assert_eq!(
            spread, 0,
            "{what}: under paused time a grant is seen when it is made"
        );
        assert_windows(&format!("{what} (caller clock)"), &seen, burst, t, 0);
    } else {
        let skew = u64::try_from(spread).unwrap();
        let slack = skew.div_ceil(t).max(1);
        eprintln!(
            "{what}: {} grants, skew between store and caller {skew} us; slack {slack} token(s) \
             of {t} us{}",
            log.len(),
            if slack > 1 {
                " (skew over one interval)"
            } else {
                ""
            }
        );
        assert_windows(&format!("{what} (caller clock)"), &seen, burst, t, slack);
    }
}

fn rate_spec(rate: RateSpec) -> LimiterSpec {
    LimiterSpec::rate(rate).with_max_wait(Duration::from_secs(60))
}

/// Many acquirers against a rate-only limiter: over every window between two grant times, no
/// more than `burst + rate * window` tokens.
pub(crate) async fn rate_windows_never_exceed_burst_plus_rate<S: Store>(
    gate: Floodgate<S>,
    paused: bool,
) {
    let name = unique("rate-window");
    // 25/s: a 40 ms interval, so one token of slack covers 40 ms of scheduling skew in real
    // time. 50 tasks x 2 rounds is ~120 tokens, ~4.7 s of real time; paused, 12 rounds.
    let rate = RateSpec::per(25, Duration::from_secs(1)).with_burst(4);
    gate.define(&name, rate_spec(rate)).await.unwrap();
    let lim = gate.limiter(&name).await.unwrap();
    let rounds: u32 = if paused { 12 } else { 2 };
    let log: Log = Arc::default();
    let tasks: Vec<_> = (0..50u32)
        .map(|i| {
            let lim = lim.clone();
            let log = Arc::clone(&log);
            // Every fifth task takes two tokens per acquire: a request costs its permits.
            let permits = if i % 5 == 0 { 2 } else { 1 };
            tokio::spawn(async move {
                for _ in 0..rounds {
                    let p = lim.acquire(wait(30_000).permits(permits)).await.unwrap();
                    record(&log, &p);
                    assert_eq!(p.grant().lease, Duration::ZERO);
                }
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
    let log = log.lock().unwrap().clone();
    let tokens: u64 = log.iter().map(|s| s.tokens).sum();
    assert_eq!(tokens, u64::from(rounds) * (50 + 10));
    assert_rate_on_both_clocks("rate-only", &log, rate, paused);
    let st = lim.status().await.unwrap();
    assert_eq!(st.counters.paced, u64::from(rounds) * 50);
    assert_eq!(
        (st.in_use, st.holders, st.waiting, st.limit),
        (0, 0, 0, None)
    );
}

/// A rate and a concurrency limit together: grants follow the queue order exactly, at most
/// `concurrency` are out at once (a witness counts them), and the rate bound holds.
pub(crate) async fn rate_and_concurrency_keep_fifo_and_both_limits<S: Store>(
    gate: Floodgate<S>,
    paused: bool,
) {
    let name = unique("rate-conc");
    let rate = RateSpec::per(20, Duration::from_secs(1)).with_burst(2);
    let spec = LimiterSpec::concurrency(2)
        .with_rate(rate)
        .with_default_lease(Duration::from_secs(10))
        .with_max_wait(Duration::from_secs(10));
    gate.define(&name, spec).await.unwrap();
    let lim = gate.limiter(&name).await.unwrap();
    let log: Log = Arc::default();
    let in_flight = Arc::new(AtomicU32::new(0));
    let most = Arc::new(AtomicU32::new(0));
    let enter = {
        let (in_flight, most) = (Arc::clone(&in_flight), Arc::clone(&most));
        move || {
            let n = in_flight.fetch_add(1, Ordering::SeqCst) + 1;
            most.fetch_max(n, Ordering::SeqCst);
        }
    };
    // Take both slots and both burst tokens, so every task below queues.
    let a = lim.acquire(wait(0)).await.unwrap();
    let b = lim.acquire(wait(0)).await.unwrap();
    record(&log, &a);
    record(&log, &b);
    enter();
    enter();
    let n = 12;
    let mut tasks = Vec::new();
    for seq in 0..n {
        let task_lim = lim.clone();
        let log = Arc::clone(&log);
        let (enter, in_flight) = (enter.clone(), Arc::clone(&in_flight));
        // Short and long holds alternate, so sometimes the rate holds the head back and
        // sometimes the concurrency does.
        let hold = Duration::from_millis(if seq % 2 == 0 { 30 } else { 180 });
        tasks.push(tokio::spawn(async move {
            let p = task_lim.acquire(wait(10_000)).await.unwrap();
            let seen = record(&log, &p);
            enter();
            sleep(hold).await;
            // Leave the witness before releasing: it never over-counts.
            in_flight.fetch_sub(1, Ordering::SeqCst);
            assert!(p.release().await.unwrap());
            (seq, seen.token)
        }));
        // Enqueued in `seq` order: the next one is spawned only once this one is queued.
        until(&lim, "queued in turn", |s| s.waiting == seq + 1).await;
    }
    sleep(Duration::from_millis(30)).await;
    in_flight.fetch_sub(2, Ordering::SeqCst);
    assert!(a.release().await.unwrap());
    assert!(b.release().await.unwrap());
    let mut order = Vec::new();
    for t in tasks {
        order.push(t.await.unwrap());
    }
    order.sort_by_key(|&(_, token)| token);
    let seqs: Vec<u32> = order.iter().map(|&(seq, _)| seq).collect();
    assert_eq!(seqs, (0..n).collect::<Vec<_>>(), "granted in queue order");
    assert!(most.load(Ordering::SeqCst) <= 2, "concurrency exceeded");
    let log = log.lock().unwrap().clone();
    assert_rate_on_both_clocks("rate + concurrency", &log, rate, paused);
    let st = until(&lim, "all released", |s| s.in_use == 0).await;
    assert_eq!(
        (st.counters.granted, st.counters.released, st.counters.paced),
        (u64::from(n) + 2, u64::from(n) + 2, 0)
    );
}

/// Over a long run the achieved rate is the configured one.
///
/// Under paused time: 100/s, burst 5, 50 acquirers for 600 s of virtual time (60 000 grants):
/// within 1%. In real time (Redis) a long run is too slow, so 200/s for 5 s (~1 000 grants),
/// counted on the store's clock. The rate can never be exceeded (the window bound), so only a
/// shortfall is possible: tokens lost when the queue head is granted later than its token
/// time, which in real time means the client's timer task ran late. With 50 acquirers the
/// queue is never empty, and a burst of `b` absorbs up to `(b - 1) * T` of lateness per
/// wake-up without losing a token. Gaps of up to 40 ms between grants were measured on a
/// loaded machine, so Redis runs with burst 20 (95 ms absorbed) and is held to 2% (20 tokens:
/// 100 ms of stalls beyond that). The exact 1% claim is checked on both stores on
/// `schedule`'s offsets, which the store computes in one atomic step: 30 000 reservations at
/// 300/s, whose emission interval rounds 3 333.3 us up to 3 334 us.
pub(crate) async fn the_achieved_rate_matches_the_configured_one<S: Store>(
    gate: Floodgate<S>,
    paused: bool,
) {
    let (limit, burst, run, tolerance) = if paused {
        (100, 5, Duration::from_secs(600), 0.01)
    } else {
        (200, 20, Duration::from_secs(5), 0.02)
    };
    let name = unique("rate-long");
    let rate = RateSpec::per(limit, Duration::from_secs(1)).with_burst(burst);
    gate.define(&name, rate_spec(rate)).await.unwrap();
    let lim = gate.limiter(&name).await.unwrap();
    let stop = Instant::now() + run;
    let log: Log = Arc::default();
    let tasks: Vec<_> = (0..50)
        .map(|_| {
            let lim = lim.clone();
            let log = Arc::clone(&log);
            tokio::spawn(async move {
                while Instant::now() < stop {
                    let p = lim.acquire(wait(30_000)).await.unwrap();
                    record(&log, &p);
                }
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
    let log = log.lock().unwrap().clone();
    let first = log.iter().map(|s| s.store_us).min().unwrap();
    let run_us = us(run);
    let in_run = log
        .iter()
        .filter(|s| s.store_us < first + run_us)
        .map(|s| s.tokens)
        .sum::<u64>();
    // The burst came at once at the start; the rest is the sustained rate.
    let sustained = (in_run - u64::from(rate.burst)) as f64 / run.as_secs_f64();
    eprintln!("achieved {sustained:.3}/s against {limit}/s over {run:?}");
    assert!(
        sustained <= f64::from(limit),
        "{sustained}/s exceeds {limit}/s"
    );
    // Not under-admitting is asserted where the test process cannot be stalled (paused time)
    // and, on every store, over `schedule`'s offsets below. In real time on Redis a queued
    // acquire is granted when a timer of the store's client (this process) fires and calls the
    // script, so a stalled test process lowers the achieved rate without the limiter
    // under-admitting (64/s of 200/s was seen on a loaded machine).
    if paused {
        assert!(
            sustained >= f64::from(limit) * (1.0 - tolerance),
            "{sustained}/s is more than {tolerance} below {limit}/s"
        );
    }
    let store: Vec<(u64, u64)> = log.iter().map(|s| (s.store_us, s.tokens)).collect();
    assert_windows("long run", &store, u64::from(burst), rate.interval_us(), 0);

    // The same over schedule's offsets, exact on every store.
    let name = unique("rate-sched-long");
    let rate = RateSpec::per(300, Duration::from_secs(1)).with_burst(5);
    gate.define(&name, rate_spec(rate)).await.unwrap();
    let lim = gate.limiter(&name).await.unwrap();
    // 50 s of tokens: within the limiter's max_wait (60 s), which bounds a schedule.
    let count = 15_000;
    let offsets = lim.backend().schedule(count).await.unwrap().offsets;
    assert_eq!(offsets.len(), count as usize);
    let last = offsets.last().unwrap().as_secs_f64();
    let achieved = f64::from(count - rate.burst) / last;
    eprintln!("scheduled {achieved:.3}/s against 300/s");
    assert!((300.0 * 0.99..=300.0).contains(&achieved), "{achieved}");
}

/// `schedule`: offsets are non-decreasing, the burst starts at once and the rest are spaced
/// by the emission interval, and they count against the rate: an acquire right after waits
/// behind them.
pub(crate) async fn schedule_reserves_tokens_ahead_of_acquires<S: Store>(
    gate: Floodgate<S>,
    paused: bool,
) {
    let name = unique("schedule");
    // 20/s: a 50 ms interval; burst 3.
    let rate = RateSpec::per(20, Duration::from_secs(1)).with_burst(3);
    gate.define(&name, rate_spec(rate)).await.unwrap();
    let lim = gate.limiter(&name).await.unwrap();
    let t = Duration::from_micros(rate.interval_us());
    let start = Instant::now();
    let offsets = lim.backend().schedule(10).await.unwrap().offsets;
    assert!(offsets.windows(2).all(|w| w[0] <= w[1]), "{offsets:?}");
    // Exact on every store: all ten are computed in one step from one reading of the clock.
    let expected: Vec<Duration> = (0..10u32).map(|i| t * i.saturating_sub(2)).collect();
    assert_eq!(offsets, expected);
    // The ten tokens are gone: the next one comes 8 intervals after the schedule.
    let next = 8 * t;
    let err = lim.acquire(wait(0)).await.unwrap_err();
    let hint = err.retry_after().unwrap();
    assert!(err.is_wait_timeout(), "{err:?}");
    if paused {
        assert_eq!(hint, next);
    } else {
        let elapsed = start.elapsed();
        // The store's clock moved on between the two calls, by less than we saw pass.
        assert!(
            hint <= next && hint + elapsed + Duration::from_millis(1) >= next,
            "{hint:?} after {elapsed:?}"
        );
    }
    let p = lim.acquire(wait(WAIT_MS)).await.unwrap();
    let waited = start.elapsed();
    // The store granted it at least 8 intervals after it computed the offsets, which was after
    // `start`; its clock and ours run at the same speed (less a millisecond of allowance for a
    // wall clock being slewed).
    if paused {
        assert_eq!(waited, next);
    } else {
        assert!(waited + Duration::from_millis(1) >= next, "{waited:?}");
    }
    assert_eq!(p.grant().lease, Duration::ZERO);
    let st = lim.status().await.unwrap();
    assert_eq!(
        (
            st.counters.scheduled,
            st.counters.granted,
            st.counters.paced,
            st.counters.timed_out
        ),
        (10, 1, 1, 1)
    );
    // Bad counts, and a limiter without a rate, are refused by field name.
    for count in [0, floodgate::core::MAX_SCHEDULE + 1] {
        match lim.backend().schedule(count).await {
            Err(StoreError::Invalid(f)) => assert_eq!(f.field, "count"),
            other => panic!("{other:?}"),
        }
    }
    let conc = unique("schedule-conc");
    gate.define(&conc, spec(1)).await.unwrap();
    match gate
        .limiter(&conc)
        .await
        .unwrap()
        .backend()
        .schedule(1)
        .await
    {
        Err(StoreError::Invalid(f)) => assert_eq!(f.field, "count"),
        other => panic!("{other:?}"),
    }
}

/// `schedule` reserves no further ahead than the limiter's `max_wait`: a call that would is
/// refused whole (naming how many fit) and reserves nothing, so one producer cannot push the
/// rate's debt hours ahead (issue 12: 11 calls of 100,000 at 10/s made acquires wait 30 h).
pub(crate) async fn schedule_is_bounded_by_max_wait<S: Store>(gate: Floodgate<S>, _paused: bool) {
    let name = unique("schedule-horizon");
    // 10/s (100 ms apart), burst 1, waits capped at 1 s: offsets 0, 100, ..., 1000 ms fit.
    let rate = RateSpec::per(10, Duration::from_secs(1)).with_burst(1);
    let spec = LimiterSpec::rate(rate).with_max_wait(Duration::from_secs(1));
    gate.define(&name, spec).await.unwrap();
    let lim = gate.limiter(&name).await.unwrap();
    for _ in 0..11 {
        match lim.backend().schedule(100_000).await {
            Err(StoreError::Invalid(f)) => {
                assert_eq!(f.field, "count");
                assert!(f.message.contains("max_wait_ms (1000 ms)"), "{}", f.message);
                assert!(f.message.ends_with("11 fit now"), "{}", f.message);
            }
            other => panic!("{other:?}"),
        }
    }
    // Nothing was reserved: the rate is as fresh as before, and 11 still fit.
    let st = lim.status().await.unwrap();
    assert_eq!(st.counters.scheduled, 0);
    let p = lim.acquire(wait(0)).await.unwrap();
    drop(p);
    let offsets = lim.backend().schedule(10).await.unwrap().offsets;
    assert_eq!(offsets.len(), 10);
    assert!(*offsets.last().unwrap() <= Duration::from_secs(1));
    // Those ten now stand between a new reservation and the horizon.
    match lim.backend().schedule(100).await {
        Err(StoreError::Invalid(f)) => assert_eq!(f.field, "count"),
        other => panic!("{other:?}"),
    }
}

/// A producer gives back the tokens of children it did not enqueue: the last, unstarted ones
/// of the limiter's latest reservation, never twice, never another reservation's.
pub(crate) async fn unused_reservations_go_back<S: Store>(gate: Floodgate<S>, _paused: bool) {
    let name = unique("unschedule");
    // One token a second, so that the clock moving between calls changes nothing below.
    let rate = RateSpec::per(1, Duration::from_secs(1)).with_burst(1);
    let spec = LimiterSpec::rate(rate).with_max_wait(Duration::from_secs(60));
    gate.define(&name, spec).await.unwrap();
    let lim = gate.limiter(&name).await.unwrap();
    let first = lim.backend().schedule(10).await.unwrap();
    assert_eq!(first.offsets.len(), 10);
    // Another id gives back nothing.
    let other = ReservationId(first.reservation.0 % ReservationId::MAX + 1);
    assert_eq!(lim.backend().unschedule(other, 6).await.unwrap(), 0);
    // Six children were not enqueued: their six seconds of the rate come back.
    assert_eq!(
        lim.backend()
            .unschedule(first.reservation, 6)
            .await
            .unwrap(),
        6
    );
    let next = lim.backend().schedule(1).await.unwrap();
    assert!(next.offsets[0] < Duration::from_secs(7), "{next:?}");
    // The first reservation is no longer the latest: nothing more of it goes back.
    assert_eq!(
        lim.backend()
            .unschedule(first.reservation, 4)
            .await
            .unwrap(),
        0
    );
    assert_eq!(
        lim.backend().unschedule(next.reservation, 5).await.unwrap(),
        1
    );
    match lim.backend().unschedule(next.reservation, 0).await {
        Err(StoreError::Invalid(f)) => assert_eq!(f.field, "count"),
        other => panic!("{other:?}"),
    }
    // Without a rate there is nothing to give back.
    let conc = unique("unschedule-conc");
    gate.define(&conc, LimiterSpec::concurrency(2))
        .await
        .unwrap();
    let lim = gate.limiter(&conc).await.unwrap();
    match lim.backend().unschedule(first.reservation, 1).await {
        Err(StoreError::Invalid(f)) => assert_eq!(f.field, "reservation"),
        other => panic!("{other:?}"),
    }
}

/// A rate-only grant holds nothing: lease 0, nothing to release or extend, counted as paced.
pub(crate) async fn a_rate_only_grant_holds_nothing<S: Store>(gate: Floodgate<S>, _paused: bool) {
    let name = unique("paced");
    // One token a minute: none comes back during the test, however stalled (at 10/s one did
    // when the test was stalled for 100 ms, and the third acquire below was granted).
    let rate = RateSpec::per(1, Duration::from_secs(60)).with_burst(2);
    gate.define(&name, rate_spec(rate)).await.unwrap();
    let lim = gate.limiter(&name).await.unwrap();
    let p = lim.acquire(wait(0)).await.unwrap();
    assert_eq!(p.grant().lease, Duration::ZERO);
    assert_eq!(p.lease_deadline(), p.grant().granted_at);
    let token = p.fencing_token();
    assert!(!p.release().await.unwrap(), "nothing to release");
    assert!(!lim.backend().release(token).await.unwrap());
    let mut q = lim.acquire(wait(0)).await.unwrap();
    assert!(q.fencing_token() > token);
    assert_eq!(q.extend(LEASE).await, Err(ExtendError::Lost));
    drop(q);
    // The burst of 2 is spent; the third is refused with the exact time of the next token.
    let err = lim.acquire(wait(0)).await.unwrap_err();
    assert!(err.is_wait_timeout(), "{err:?}");
    assert!(err.retry_after().unwrap() <= Duration::from_secs(60));
    let st = lim.status().await.unwrap();
    assert_eq!((st.in_use, st.holders, st.limit), (0, 0, None));
    let c = st.counters;
    assert_eq!(
        (c.granted, c.paced, c.released, c.expired, c.timed_out),
        (2, 2, 0, 0, 1)
    );
    assert_eq!(c.granted, c.released + c.expired + c.paced);
}

/// Issue 11: a PUT that changes the adaptive range resets a learned limit (to the starting
/// limit, within the new range); one that leaves the range as it is keeps the learned limit.
pub(crate) async fn a_new_adaptive_range_resets_the_learned_limit<S: Store>(gate: Floodgate<S>) {
    use floodgate::{AdaptiveSpec, Feedback};
    let name = unique("adaptive-range");
    let adaptive = |max| spec(5).with_adaptive(AdaptiveSpec::between(2, max));
    gate.define(&name, adaptive(80)).await.unwrap();
    let lim = gate.limiter(&name).await.unwrap();
    // Rounds of 5, 6 and 7 successes raise the limit to 8.
    for _ in 0..(5 + 6 + 7) {
        lim.backend().feedback(Feedback::Ok).await.unwrap();
    }
    assert_eq!(lim.status().await.unwrap().limit, Some(8));
    // The same spec again (a fleet re-applying its config): the learned limit survives.
    let st = gate.define(&name, adaptive(80)).await.unwrap();
    assert_eq!(st.limit, Some(8));
    // Only the range changes, to a max below the learned limit: the limit in force lies in it.
    let st = gate.define(&name, adaptive(6)).await.unwrap();
    assert_eq!(
        (st.limit, st.spec.concurrency),
        (Some(5), Some(5)),
        "{st:?}"
    );
    assert_eq!(lim.status().await.unwrap().limit, Some(5));
    // And no later success can carry it past the new max.
    for _ in 0..(5 + 6 + 6) {
        lim.backend().feedback(Feedback::Ok).await.unwrap();
    }
    assert_eq!(lim.status().await.unwrap().limit, Some(6));
}

/// Issue 11: raising the rate rescales the time owed under the old rate, so the raised rate
/// applies at once (the next token is not held back by debt run up at the old rate).
pub(crate) async fn a_raised_rate_rescales_the_time_owed<S: Store>(gate: Floodgate<S>) {
    let name = unique("rate-raise");
    // 1/s with burst 1: twenty tokens scheduled put the next one about 20 s ahead (seconds of
    // margin for a stalled test; at 10/s, 2 s ahead, half a second of stall failed it).
    let slow = RateSpec::per(1, Duration::from_secs(1)).with_burst(1);
    gate.define(&name, rate_spec(slow)).await.unwrap();
    let lim = gate.limiter(&name).await.unwrap();
    lim.backend().schedule(20).await.unwrap();
    let err = lim.acquire(wait(0)).await.unwrap_err();
    assert!(
        err.retry_after().unwrap() > Duration::from_secs(15),
        "{err:?}"
    );
    // 1000/s: the 20 s owed at 1 s a token become 20 ms at 1 ms a token.
    let fast = RateSpec::per(1_000, Duration::from_secs(1)).with_burst(1);
    gate.define(&name, rate_spec(fast)).await.unwrap();
    match lim.acquire(wait(0)).await {
        Ok(_) => {}
        Err(e) => {
            let hint = e.retry_after().unwrap();
            assert!(
                hint <= Duration::from_millis(21),
                "the old debt is still owed: {e:?}"
            );
        }
    }
    // Within a wait far shorter than the old debt, a token is granted.
    drop(lim.acquire(wait(WAIT_MS)).await.unwrap());
}

/// Issue 10: a limiter restored with no state (its state may have been lost) learns before it
/// grants: acquires wait, extends carrying their permits re-adopt the permits it forgot (even
/// above the limit), tokens restart above them, and grants resume when the window ends.
pub(crate) async fn a_restored_limiter_learns_before_granting<S: Store>(gate: Floodgate<S>) {
    use floodgate::{FencingToken, LimiterName};
    let name = unique("learning");
    let window = Duration::from_secs(3);
    let st = gate
        .store()
        .restore_limiter(
            &LimiterName::new(&name).unwrap(),
            spec(2).with_max_wait(Duration::from_secs(10)),
            window,
        )
        .await
        .unwrap();
    assert!(st.learning, "{st:?}");
    let lim = gate.limiter(&name).await.unwrap();
    // Not granted while learning: "try once" is refused with the window's end as the hint.
    let err = lim.acquire(wait(0)).await.unwrap_err();
    assert!(err.is_wait_timeout(), "{err:?}");
    let hint = err.retry_after().unwrap();
    assert!(hint > Duration::ZERO && hint <= window, "{hint:?}");
    // Holders of permits granted before the loss heartbeat and are re-adopted.
    let (a, b) = (FencingToken(1 << 51), FencingToken((1 << 51) + 7));
    let backend = lim.backend();
    backend.extend(a, LEASE * 20, Some(2)).await.unwrap();
    backend.extend(b, LEASE * 20, Some(1)).await.unwrap();
    // Without its size, an unknown permit is not re-adopted.
    assert_eq!(
        backend.extend(FencingToken(a.0 + 1), LEASE, None).await,
        Err(ExtendError::Lost)
    );
    let st = lim.status().await.unwrap();
    assert_eq!((st.in_use, st.holders, st.limit), (3, 2, Some(2)), "{st:?}");
    assert_eq!(st.counters.adopted, 2);
    assert_eq!(st.counters.granted, 2);
    // A waiter queues (it is not refused while its wait lasts).
    let waiter = {
        let lim = lim.clone();
        tokio::spawn(async move { lim.acquire(wait(10_000)).await })
    };
    until(&lim, "the waiter is queued", |s| s.waiting == 1).await;
    // Two permits come back: in use 1 is below the limit, but the window is still open.
    assert!(backend.release(a).await.unwrap());
    let st = lim.status().await.unwrap();
    assert!(
        st.learning,
        "the 3 s window ended during a few operations: {st:?}"
    );
    assert_eq!(
        (st.in_use, st.waiting),
        (1, 1),
        "granted while learning: {st:?}"
    );
    // When the window ends, the waiter is granted (by the timer: no other traffic), with a
    // token above every re-adopted one.
    let p = waiter.await.unwrap().unwrap();
    assert!(p.fencing_token() > b, "{:?}", p.fencing_token());
    let st = lim.status().await.unwrap();
    assert!(!st.learning);
    assert_eq!((st.in_use, st.holders), (2, 2));
    // Outside the window an unknown permit stays lost, whatever it carries.
    assert_eq!(
        backend.extend(FencingToken(a.0 + 2), LEASE, Some(1)).await,
        Err(ExtendError::Lost)
    );
    // A re-adopted permit is held like any other: extended, then released.
    backend.extend(b, LEASE * 20, Some(1)).await.unwrap();
    assert!(backend.release(b).await.unwrap());
    assert!(p.release().await.unwrap());
}

/// Instantiates the suite: `store_suite!(paused, async { (Floodgate::with_store(...), guard) })`;
/// the guard (a server process, say) lives as long as the test.
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
            tokens_keep_increasing_across_delete_and_recreate,
            limiters_are_listed,
            a_new_adaptive_range_resets_the_learned_limit,
            a_raised_rate_rescales_the_time_owed,
            a_restored_limiter_learns_before_granting,
            idempotent_acquires_are_granted_once,
        );
        $crate::store_suite!(@clocked $paused, $make;
            rate_windows_never_exceed_burst_plus_rate,
            rate_and_concurrency_keep_fifo_and_both_limits,
            the_achieved_rate_matches_the_configured_one,
            schedule_reserves_tokens_ahead_of_acquires,
            schedule_is_bounded_by_max_wait,
            unused_reservations_go_back,
            a_rate_only_grant_holds_nothing,
        );
    };
    (@tests $paused:literal, $make:expr; $($name:ident),* $(,)?) => {
        $(
            #[tokio::test(start_paused = $paused)]
            async fn $name() {
                let (gate, _guard) = $make.await;
                suite::$name(gate).await;
            }
        )*
    };
    // Tests that pick their durations and tolerances by whether time is paused.
    (@clocked $paused:literal, $make:expr; $($name:ident),* $(,)?) => {
        $(
            #[tokio::test(start_paused = $paused)]
            async fn $name() {
                let (gate, _guard) = $make.await;
                suite::$name(gate, $paused).await;
            }
        )*
    };
}
