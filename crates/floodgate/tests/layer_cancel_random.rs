//! Random schedules of calls through [`FloodgateLayer`], some dropped at random moments (while
//! queued for the permit or while the inner call runs), checked against witnesses outside the
//! limiter:
//!
//! - the inner calls in flight never exceed the limit (an atomic counter inside the service);
//! - grants follow arrival (FIFO): on the embedded store under paused time, calls enter the
//!   inner service in the order they arrived; on Redis, in real time, in the order the store
//!   received them (see `check_store_fifo`);
//! - on the embedded store (plain and keyed layer), at every moment between task steps (a
//!   monitor task polls each millisecond of paused time), every permit held or waiter queued
//!   belongs to a live call (`in_use + waiting == live calls`: a dropped waiter left no ghost
//!   in the queue and a dropped call no permit behind), and (plain layer) nobody waits while a
//!   permit is free;
//! - on Redis (plain and keyed; in real time: its cancel and release run in the background),
//!   everything ends with nothing held or queued and every call not dropped completed.
//!
//! (On Redis the calls' arrival order is not the store's: a stall of the test process fires
//! several arrival timers together, and their acquires reach Redis in any order. With two
//! permits, two grants a moment apart also reach their callers by different paths, the
//! release's reply and pub/sub, so even the order calls enter is not the grant order.)
//!
//! Seeds are fixed (`support::rng::Rng`): a failure names its seed for replay.

#![cfg(not(feature = "shuttle"))]
#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "support/mod.rs"]
mod support;

use std::convert::Infallible;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering::SeqCst};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use floodgate::layer::KeyedFloodgateLayer;
use floodgate::{
    AcquireError, AcquireOptions, ExtendError, Feedback, FencingToken, Floodgate, FloodgateLayer,
    Grant, KeyOverride, KeyedSpec, KeysView, Limiter, LimiterBackend, LimiterName, LimiterSpec,
    LimiterStatus, RedisConfig, RedisStore, ReservationId, Schedule, Store, StoreError, Timestamp,
};
use support::rng::Rng;
use tokio::time::Instant;
use tower::{service_fn, ServiceBuilder, ServiceExt};

/// One call of a schedule.
#[derive(Clone, Copy, Debug)]
struct Call {
    /// When it arrives, after the start.
    arrive: Duration,
    /// How long the inner call runs.
    hold: Duration,
    /// When the caller drops the response future, after its arrival (`None`: never).
    drop_after: Option<Duration>,
}

fn schedule(rng: &mut Rng, n: usize, unit: u64) -> Vec<Call> {
    let mut at = Duration::ZERO;
    (0..n)
        .map(|_| {
            at += Duration::from_millis(rng.range(1, 3 * unit));
            Call {
                arrive: at,
                hold: Duration::from_millis(rng.range(unit, 6 * unit)),
                drop_after: (rng.below(3) == 0)
                    .then(|| Duration::from_millis(rng.range(0, 12 * unit))),
            }
        })
        .collect()
}

/// What the inner service and the callers saw.
#[derive(Default)]
struct Seen {
    /// Inner calls in progress now, and the most at once.
    current: AtomicU32,
    max: AtomicU32,
    /// Calls arrived and neither finished nor dropped.
    live: AtomicU32,
    /// The calls' indices in the order they entered the inner service.
    entered: Mutex<Vec<usize>>,
    /// Set by the driver once every call has ended, to stop the monitor.
    done: AtomicBool,
    /// The grants the store made, with the index of the call each went to (`Recording`).
    grants: Grants,
}

type Grants = Arc<Mutex<Vec<(usize, Grant)>>>;

tokio::task_local! {
    /// The index of the call whose task acquires (`Recording` files its grant under it).
    static CALL: usize;
}

/// The limiter's own backend, recording every grant it answers with under the index of the
/// call that acquired it: the grant says, on the store's clock, when the store received the
/// acquire (`granted_at - waited`) and, by its fencing token, its place in the grant order.
#[derive(Clone, Debug)]
struct Recording<B> {
    inner: B,
    grants: Grants,
}

impl<B> Recording<B> {
    fn record(&self, grant: &Grant) {
        let call = CALL
            .try_with(|i| *i)
            .expect("an acquire outside a call's task");
        self.grants.lock().unwrap().push((call, grant.clone()));
    }
}

/// `limiter`, its grants recorded into `grants`.
fn recording<B: LimiterBackend>(limiter: &Limiter<B>, grants: &Grants) -> Limiter<Recording<B>> {
    Limiter::from_backend(Recording {
        inner: limiter.backend().clone(),
        grants: Arc::clone(grants),
    })
}

impl<B: LimiterBackend> LimiterBackend for Recording<B> {
    const CLOCK_IS_LOCAL: bool = B::CLOCK_IS_LOCAL;

    fn local_instant(&self, at: Timestamp) -> Option<tokio::time::Instant> {
        self.inner.local_instant(at)
    }

    fn name(&self) -> &LimiterName {
        self.inner.name()
    }

    fn acquire_at_once(&self, options: &AcquireOptions) -> Option<Result<Grant, AcquireError>> {
        let decided = self.inner.acquire_at_once(options);
        if let Some(Ok(grant)) = &decided {
            self.record(grant);
        }
        decided
    }

    async fn acquire(&self, options: AcquireOptions) -> Result<Grant, AcquireError> {
        let grant = self.inner.acquire(options).await?;
        self.record(&grant);
        Ok(grant)
    }

    async fn acquire_keyed(
        &self,
        key: &str,
        options: AcquireOptions,
    ) -> Result<Grant, AcquireError> {
        let grant = self.inner.acquire_keyed(key, options).await?;
        self.record(&grant);
        Ok(grant)
    }

    async fn extend(
        &self,
        token: FencingToken,
        lease: Duration,
        permits: Option<u32>,
    ) -> Result<Timestamp, ExtendError> {
        self.inner.extend(token, lease, permits).await
    }

    async fn extend_keyed(
        &self,
        key: &str,
        token: FencingToken,
        lease: Duration,
        permits: Option<u32>,
    ) -> Result<Timestamp, ExtendError> {
        self.inner.extend_keyed(key, token, lease, permits).await
    }

    async fn release(&self, token: FencingToken) -> Result<bool, StoreError> {
        self.inner.release(token).await
    }

    fn release_in_background(&self, token: FencingToken) {
        self.inner.release_in_background(token);
    }

    async fn status(&self) -> Result<LimiterStatus, StoreError> {
        self.inner.status().await
    }

    async fn schedule(&self, count: u32) -> Result<Schedule, StoreError> {
        self.inner.schedule(count).await
    }

    async fn unschedule(&self, reservation: ReservationId, unused: u32) -> Result<u32, StoreError> {
        self.inner.unschedule(reservation, unused).await
    }

    async fn feedback(&self, outcome: Feedback) -> Result<Option<u32>, StoreError> {
        self.inner.feedback(outcome).await
    }

    async fn schedule_keyed(&self, key: &str, count: u32) -> Result<Schedule, StoreError> {
        self.inner.schedule_keyed(key, count).await
    }

    async fn put_key(&self, key: &str, over: Option<KeyOverride>) -> Result<(), StoreError> {
        self.inner.put_key(key, over).await
    }

    async fn keys(&self, limit: usize) -> Result<Option<KeysView>, StoreError> {
        self.inner.keys(limit).await
    }
}

/// FIFO as the store saw it: of two grants of one queue (`queue_of` a call's index), the one
/// whose acquire the store received first (`granted_at - waited`, on its clock) has the lower
/// fencing token (tokens are handed out in grant order). Acquires received in the same
/// microsecond are not ordered. (Redis reads `TIME`, a wall clock: one stepped back between
/// two acquires would misorder them; NTP slews small offsets rather than stepping.) Returns how many pairs it ordered where the later acquire
/// arrived while the earlier one still waited (so that a grant out of order could have
/// happened), for the callers to show the check was not vacuous.
fn check_store_fifo(
    grants: &[(usize, Grant)],
    queue_of: impl Fn(usize) -> usize,
    what: &str,
) -> usize {
    let arrived = |g: &Grant| g.granted_at.0.saturating_sub(g.waited.as_micros() as u64);
    let mut contended = 0;
    for (i, a) in grants {
        for (j, b) in grants {
            if queue_of(*i) != queue_of(*j) || arrived(a) >= arrived(b) {
                continue;
            }
            assert!(
                a.token < b.token,
                "{what}: the store received call {j}'s acquire after call {i}'s ({} us after) \
                 but granted it first (tokens {} < {}): {grants:?}",
                arrived(b) - arrived(a),
                b.token.0,
                a.token.0
            );
            if arrived(b) < a.granted_at.0 {
                contended += 1;
            }
        }
    }
    contended
}

/// Leaves the in-progress count when dropped (a call dropped mid-way is un-counted).
struct InCall(Arc<Seen>);

impl Drop for InCall {
    fn drop(&mut self) {
        self.0.current.fetch_sub(1, SeqCst);
    }
}

/// Runs one schedule through a layer over `limiter`; returns the indices of the calls that
/// completed (were not dropped first).
async fn run<B: floodgate::LimiterBackend>(
    limiter: &Limiter<B>,
    calls: &[Call],
    seen: &Arc<Seen>,
    what: &str,
) -> Vec<usize> {
    let holds: Arc<Vec<Duration>> = Arc::new(calls.iter().map(|c| c.hold).collect());
    let inner = {
        let seen = Arc::clone(seen);
        service_fn(move |i: usize| {
            let (seen, hold) = (Arc::clone(&seen), holds[i]);
            async move {
                let now = seen.current.fetch_add(1, SeqCst) + 1;
                seen.max.fetch_max(now, SeqCst);
                seen.entered.lock().unwrap().push(i);
                let _in = InCall(Arc::clone(&seen));
                tokio::time::sleep(hold).await;
                Ok::<_, Infallible>(i)
            }
        })
    };
    let svc = ServiceBuilder::new()
        .layer(FloodgateLayer::new(
            recording(limiter, &seen.grants),
            AcquireOptions::new()
                .wait(Duration::from_secs(120))
                .lease(Duration::from_secs(3600)),
        ))
        .service(inner);
    let start = Instant::now();
    let mut tasks = Vec::new();
    for (i, call) in calls.iter().copied().enumerate() {
        let (svc, seen) = (svc.clone(), Arc::clone(seen));
        tasks.push(tokio::spawn(CALL.scope(i, async move {
            tokio::time::sleep_until(start + call.arrive).await;
            seen.live.fetch_add(1, SeqCst);
            let never = Duration::from_secs(86_400);
            let out = tokio::select! {
                r = svc.oneshot(i) => Some(r.unwrap()),
                () = tokio::time::sleep(call.drop_after.unwrap_or(never)) => None,
            };
            seen.live.fetch_sub(1, SeqCst);
            out
        })));
    }
    let mut completed = Vec::new();
    for (i, t) in tasks.into_iter().enumerate() {
        let out = t.await.unwrap();
        if let Some(got) = out {
            assert_eq!(got, i, "{what}");
            completed.push(i);
        } else {
            assert!(calls[i].drop_after.is_some(), "{what}: call {i}");
        }
    }
    seen.done.store(true, SeqCst);
    completed
}

fn check_common(seen: &Seen, calls: &[Call], completed: &[usize], limit: u32, what: &str) {
    assert!(
        seen.max.load(SeqCst) <= limit,
        "{what}: {} inner calls at once under a limit of {limit}",
        seen.max.load(SeqCst)
    );
    assert_eq!(seen.current.load(SeqCst), 0, "{what}");
    for (i, call) in calls.iter().enumerate() {
        if call.drop_after.is_none() {
            assert!(
                completed.contains(&i),
                "{what}: call {i} never dropped, never completed"
            );
        }
    }
}

/// The embedded store, paused time: exact invariants at every millisecond.
#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn random_drops_leave_no_ghost_waiter_and_no_held_permit() {
    let mut entered_total = 0;
    let mut dropped_total = 0;
    for seed in 0..80u64 {
        let mut rng = Rng(seed);
        let limit = rng.range(1, 3) as u32;
        let n = rng.range(4, 24) as usize;
        let calls = schedule(&mut rng, n, 5);
        let what = format!("seed {seed}, limit {limit}, {calls:?}");
        let gate = Floodgate::in_memory();
        let spec = LimiterSpec::concurrency(limit).with_max_wait(Duration::from_secs(600));
        gate.define("layer", spec).await.unwrap();
        let limiter = gate.limiter("layer").await.unwrap();
        let seen = Arc::new(Seen::default());

        // The monitor: another task, so it runs only between the callers' steps.
        let monitor = {
            let (limiter, seen, what) = (limiter.clone(), Arc::clone(&seen), what.clone());
            tokio::spawn(async move {
                let mut checks = 0u32;
                while !seen.done.load(SeqCst) {
                    let s = limiter.status().await.unwrap();
                    let live = seen.live.load(SeqCst);
                    assert_eq!(
                        s.in_use + s.waiting,
                        live,
                        "{what}: held or queued for a call that is gone (ghost): {s:?}"
                    );
                    assert!(
                        s.waiting == 0 || s.in_use == limit,
                        "{what}: a waiter waits while a permit is free: {s:?}"
                    );
                    checks += 1;
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
                checks
            })
        };
        let completed = run(&limiter, &calls, &seen, &what).await;
        let checks = monitor.await.unwrap();
        assert!(checks > 10, "{what}: the monitor ran {checks} times");
        check_common(&seen, &calls, &completed, limit, &what);
        // Paused time: each call reaches the store the moment it arrives, in index order.
        let entered = seen.entered.lock().unwrap().clone();
        assert!(
            entered.windows(2).all(|w| w[0] < w[1]),
            "{what}: calls entered out of arrival order: {entered:?}"
        );
        check_store_fifo(&seen.grants.lock().unwrap(), |_| 0, &what);
        let s = limiter.status().await.unwrap();
        assert_eq!(
            (s.in_use, s.holders, s.waiting, s.waiting_permits),
            (0, 0, 0, 0),
            "{what}: {s:?}"
        );
        assert_eq!(s.counters.expired, 0, "{what}: {s:?}");
        entered_total += seen.entered.lock().unwrap().len();
        dropped_total += n - completed.len();
    }
    // The schedules did exercise both paths: calls that ran, calls that were dropped.
    assert!(
        entered_total > 300 && dropped_total > 100,
        "{entered_total} {dropped_total}"
    );
}

/// Redis, real time: the cancel of a dropped waiter and the release of a dropped call run in
/// the background, so the checks are the witness's bound, FIFO in the order the store
/// received the acquires, liveness and the end state.
async fn on_store<S: Store>(gate: Floodgate<S>, seeds: std::ops::Range<u64>) -> usize {
    let mut contended = 0;
    for seed in seeds {
        let mut rng = Rng(seed);
        let limit = rng.range(1, 2) as u32;
        let n = rng.range(4, 12) as usize;
        let calls = schedule(&mut rng, n, 20);
        let what = format!("seed {seed}, limit {limit}, {calls:?}");
        let name = format!("layer-{seed}");
        let spec = LimiterSpec::concurrency(limit).with_max_wait(Duration::from_secs(600));
        gate.define(&name, spec).await.unwrap();
        let limiter = gate.limiter(&name).await.unwrap();
        let seen = Arc::new(Seen::default());
        let completed = run(&limiter, &calls, &seen, &what).await;
        check_common(&seen, &calls, &completed, limit, &what);
        contended += check_store_fifo(&seen.grants.lock().unwrap(), |_| 0, &what);
        let s = support::until_status(&limiter, &what, |s| {
            (s.in_use, s.holders, s.waiting) == (0, 0, 0)
        })
        .await;
        assert_eq!(s.counters.expired, 0, "{what}: {s:?}");
    }
    contended
}

#[tokio::test]
async fn random_drops_leave_nothing_held_or_queued_on_redis() {
    let server = support::RedisServer::start();
    let store = RedisStore::connect(RedisConfig::new(server.url()))
        .await
        .unwrap();
    let contended = on_store(Floodgate::with_store(store), 0..12).await;
    // The FIFO check ordered acquires that queued behind one another (60 to 90 pairs seen,
    // the test process stalled or not).
    assert!(contended > 10, "{contended}");
}

/// Per key index: calls in flight now, the most at once, the calls in the order they entered.
type PerKey = Arc<Mutex<std::collections::HashMap<usize, (u32, u32, Vec<usize>)>>>;

/// The keyed layer on the embedded store, paused time: calls of 3 keys, a per-key limit under
/// a total, random drops. Each key's calls in flight stay within its limit and the total's
/// within the total, each key's calls enter in their arrival order, and (as above) every
/// permit held or waiter queued belongs to a live call at every millisecond.
#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn random_drops_through_the_keyed_layer_leave_no_ghost() {
    let mut dropped_total = 0;
    for seed in 0..60u64 {
        dropped_total += keyed_seed(&Floodgate::in_memory(), 1000 + seed, 5, true)
            .await
            .0;
    }
    assert!(dropped_total > 100, "{dropped_total}");
}

/// The same on Redis, in real time: one limit per key, no monitor (its cancels and releases
/// run in the background), each key's grants in the order the store received its acquires
/// (`check_store_fifo`), the end state checked.
#[tokio::test]
async fn random_drops_through_the_keyed_layer_leave_nothing_on_redis() {
    let server = support::RedisServer::start();
    let store = RedisStore::connect(RedisConfig::new(server.url()))
        .await
        .unwrap();
    let gate = Floodgate::with_store(store);
    let (mut dropped_total, mut contended) = (0, 0);
    for seed in 0..10u64 {
        let (dropped, ordered) = keyed_seed(&gate, 2000 + seed, 20, false).await;
        dropped_total += dropped;
        contended += ordered;
    }
    assert!(dropped_total > 5, "{dropped_total}");
    // The FIFO check ordered acquires of a key that queued behind one another (7 to 26 pairs
    // seen, the test process stalled or not).
    assert!(contended > 0, "{contended}");
}

/// One keyed schedule; `exact`: the embedded store under paused time (the monitor runs, any
/// per-key limit); returns how many calls were dropped, and the contended pairs the FIFO
/// check ordered (`check_store_fifo`).
async fn keyed_seed<S: Store>(
    gate: &Floodgate<S>,
    seed: u64,
    unit: u64,
    exact: bool,
) -> (usize, usize) {
    const KEYS: [&str; 3] = ["a", "b", "c"];
    let mut dropped_total = 0;
    let mut contended = 0;
    {
        let mut rng = Rng(seed);
        let per_key = if exact { rng.range(1, 2) as u32 } else { 1 };
        let total = rng.range(2, 4) as u32;
        let n = rng.range(6, if exact { 24 } else { 12 }) as usize;
        let calls = schedule(&mut rng, n, unit);
        // Each call's key, as an index into KEYS.
        let keys: Arc<Vec<usize>> = Arc::new((0..n).map(|_| rng.below(3) as usize).collect());
        let what = format!("seed {seed}, per key {per_key}, total {total}, {keys:?} {calls:?}");
        let name = format!("orgs-{seed}");
        let spec = LimiterSpec::concurrency(total).with_max_wait(Duration::from_secs(600));
        gate.define_keyed(&name, spec, KeyedSpec::per_key(per_key))
            .await
            .unwrap();
        let limiter = gate.limiter(&name).await.unwrap();
        let seen = Arc::new(Seen::default());
        // Per key: in flight now, the most at once, and the order calls entered.
        let per: PerKey = Arc::default();
        let monitor = {
            let (limiter, seen, what) = (limiter.clone(), Arc::clone(&seen), what.clone());
            tokio::spawn(async move {
                while exact && !seen.done.load(SeqCst) {
                    let s = limiter.status().await.unwrap();
                    assert_eq!(
                        s.in_use + s.waiting,
                        seen.live.load(SeqCst),
                        "{what}: held or queued for a call that is gone (ghost): {s:?}"
                    );
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
            })
        };
        let holds: Arc<Vec<Duration>> = Arc::new(calls.iter().map(|c| c.hold).collect());
        let inner = {
            let (seen, per, keys) = (Arc::clone(&seen), Arc::clone(&per), Arc::clone(&keys));
            service_fn(move |i: usize| {
                let (seen, per, hold, key) =
                    (Arc::clone(&seen), Arc::clone(&per), holds[i], keys[i]);
                async move {
                    let now = seen.current.fetch_add(1, SeqCst) + 1;
                    seen.max.fetch_max(now, SeqCst);
                    {
                        let mut per = per.lock().unwrap();
                        let e = per.entry(key).or_default();
                        e.0 += 1;
                        e.1 = e.1.max(e.0);
                        e.2.push(i);
                    }
                    /// Leaves the key's count too when the call ends or is dropped.
                    struct Leave(PerKey, usize);
                    impl Drop for Leave {
                        fn drop(&mut self) {
                            self.0.lock().unwrap().get_mut(&self.1).unwrap().0 -= 1;
                        }
                    }
                    let _in = (InCall(Arc::clone(&seen)), Leave(per, key));
                    tokio::time::sleep(hold).await;
                    Ok::<_, Infallible>(i)
                }
            })
        };
        let keys_of = Arc::clone(&keys);
        let svc = ServiceBuilder::new()
            .layer(KeyedFloodgateLayer::new(
                recording(&limiter, &seen.grants),
                AcquireOptions::new()
                    .wait(Duration::from_secs(120))
                    .lease(Duration::from_secs(3600)),
                move |i: &usize| KEYS[keys_of[*i]],
            ))
            .service(inner);
        let start = Instant::now();
        let mut tasks = Vec::new();
        for (i, call) in calls.iter().copied().enumerate() {
            let (svc, seen) = (svc.clone(), Arc::clone(&seen));
            tasks.push(tokio::spawn(CALL.scope(i, async move {
                tokio::time::sleep_until(start + call.arrive).await;
                seen.live.fetch_add(1, SeqCst);
                let never = Duration::from_secs(86_400);
                let out = tokio::select! {
                    r = svc.oneshot(i) => Some(r.unwrap()),
                    () = tokio::time::sleep(call.drop_after.unwrap_or(never)) => None,
                };
                seen.live.fetch_sub(1, SeqCst);
                out
            })));
        }
        for (i, t) in tasks.into_iter().enumerate() {
            match t.await.unwrap() {
                Some(got) => assert_eq!(got, i, "{what}"),
                None => dropped_total += 1,
            }
        }
        seen.done.store(true, SeqCst);
        monitor.await.unwrap();
        assert!(seen.max.load(SeqCst) <= total, "{what}: total exceeded");
        for (key, (now, max, entered)) in per.lock().unwrap().iter() {
            assert_eq!(*now, 0, "{what}: {key}");
            assert!(*max <= per_key, "{what}: key {key} had {max} at once");
            // Paused time: the order they arrived in. (In real time they may reach the store
            // in another: the check below.)
            assert!(
                !exact || entered.windows(2).all(|w| w[0] < w[1]),
                "{what}: key {key}'s calls entered out of order: {entered:?}"
            );
        }
        contended += check_store_fifo(&seen.grants.lock().unwrap(), |i| keys[i], &what);
        let s = support::until_status(&limiter, &what, |s| {
            (s.in_use, s.holders, s.waiting) == (0, 0, 0)
        })
        .await;
        assert_eq!(s.counters.expired, 0, "{what}: {s:?}");
    }
    (dropped_total, contended)
}
