//! [`FloodgateLayer`] stacked with tower's own middleware, and a call that outlives its lease.
//!
//! - `Buffer` in front (its worker calls `poll_ready` then `call`; the response future runs in
//!   the caller) and `Timeout` around that, firing while calls wait or run: the inner calls in
//!   flight (an atomic witness) stay within the limit and nothing is left held or queued.
//! - `ConcurrencyLimit` inside: `poll_ready` reserves the inner service's slot before the
//!   floodgate wait, and the readied service travels in the response future; dropping that
//!   future while it waits gives the slot back (a leak would leave the next caller's
//!   `ready()` pending for ever).
//! - A call that outlives its lease loses the permit while still running (documented in
//!   `layer/mod.rs`); the late release when it completes is by its own fencing token, so it
//!   must not free the permit the limiter re-granted to someone else (a third call would then
//!   run beside the second); the overrun is logged as a warning when the call ends.

#![cfg(not(feature = "shuttle"))]
#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "support/mod.rs"]
mod support;

use std::convert::Infallible;
use std::sync::atomic::{AtomicU32, Ordering::SeqCst};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use floodgate::{
    AcquireOptions, Floodgate, FloodgateLayer, LimiterSpec, RedisConfig, RedisStore, Store,
};
use tokio::sync::Notify;
use tower::limit::ConcurrencyLimitLayer;
use tower::timeout::Timeout;
use tower::{service_fn, Service, ServiceBuilder, ServiceExt};

/// Inner calls in progress, and the most at once.
#[derive(Default)]
struct Witness {
    current: AtomicU32,
    max: AtomicU32,
}

struct InCall(Arc<Witness>);

impl Witness {
    fn enter(self: &Arc<Self>) -> InCall {
        let now = self.current.fetch_add(1, SeqCst) + 1;
        self.max.fetch_max(now, SeqCst);
        InCall(Arc::clone(self))
    }
}

impl Drop for InCall {
    fn drop(&mut self) {
        self.0.current.fetch_sub(1, SeqCst);
    }
}

#[tokio::test(start_paused = true)]
async fn under_buffer_and_timeout_the_limit_holds_and_nothing_leaks() {
    let gate = Floodgate::in_memory();
    let spec = LimiterSpec::concurrency(2).with_max_wait(Duration::from_secs(600));
    gate.define("stack", spec).await.unwrap();
    let limiter = gate.limiter("stack").await.unwrap();
    let witness = Arc::new(Witness::default());
    let inner = {
        let witness = Arc::clone(&witness);
        service_fn(move |i: u32| {
            let in_call = witness.enter();
            async move {
                let _in = in_call;
                tokio::time::sleep(Duration::from_millis(10)).await;
                Ok::<_, Infallible>(i)
            }
        })
    };
    let buffered = ServiceBuilder::new()
        .buffer(4)
        .layer(FloodgateLayer::new(
            limiter.clone(),
            AcquireOptions::new().wait(Duration::from_secs(60)),
        ))
        .service(inner);
    // Every third call gives up after 15 ms: some while queued, some while running.
    let mut tasks = Vec::new();
    for i in 0..30u32 {
        let buffered = buffered.clone();
        tasks.push(tokio::spawn(async move {
            if i % 3 == 0 {
                let timed = Timeout::new(buffered, Duration::from_millis(15 + u64::from(i)));
                timed.oneshot(i).await.map_err(|e| e.to_string())
            } else {
                buffered.oneshot(i).await.map_err(|e| e.to_string())
            }
        }));
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let (mut ok, mut timed_out) = (0, 0);
    for (i, t) in tasks.into_iter().enumerate() {
        match t.await.unwrap() {
            Ok(got) => {
                assert_eq!(got as usize, i);
                ok += 1;
            }
            Err(e) => {
                assert_eq!(i % 3, 0, "only the timed calls fail: {i}: {e}");
                timed_out += 1;
            }
        }
    }
    assert!(ok >= 20 && timed_out > 0, "{ok} {timed_out}");
    assert_eq!(witness.max.load(SeqCst), 2, "within (and at) the limit");
    assert_eq!(witness.current.load(SeqCst), 0);
    let s = limiter.status().await.unwrap();
    assert_eq!((s.in_use, s.holders, s.waiting), (0, 0, 0), "{s:?}");
    assert_eq!(s.counters.expired, 0, "{s:?}");
}

#[tokio::test(start_paused = true)]
async fn a_readied_inner_slot_comes_back_when_a_waiting_call_is_dropped() {
    let gate = Floodgate::in_memory();
    let spec = LimiterSpec::concurrency(1).with_max_wait(Duration::from_secs(600));
    gate.define("stack", spec).await.unwrap();
    let limiter = gate.limiter("stack").await.unwrap();
    let witness = Arc::new(Witness::default());
    let inner = {
        let witness = Arc::clone(&witness);
        service_fn(move |i: u32| {
            let in_call = witness.enter();
            async move {
                drop(in_call);
                Ok::<_, Infallible>(i)
            }
        })
    };
    let mut first = ServiceBuilder::new()
        .layer(FloodgateLayer::new(
            limiter.clone(),
            AcquireOptions::new().wait(Duration::from_secs(60)),
        ))
        .layer(ConcurrencyLimitLayer::new(1))
        .service(inner);
    let mut second = first.clone();

    let held = limiter.try_acquire().await.unwrap();
    // The first call takes the inner slot in `ready()`, then waits for the floodgate permit.
    let mut waiting = Box::pin(first.ready().await.unwrap().call(1));
    tokio::select! {
        _ = &mut waiting => panic!("the floodgate permit is held"),
        () = tokio::time::sleep(Duration::from_millis(10)) => {}
    }
    assert_eq!(limiter.status().await.unwrap().waiting, 1);
    // The second caller's `ready()` waits for the inner slot the first one holds.
    let ready = tokio::time::timeout(Duration::from_millis(10), second.ready()).await;
    assert!(ready.is_err(), "the inner slot is the first call's");

    drop(waiting);
    let s = limiter.status().await.unwrap();
    assert_eq!((s.in_use, s.waiting), (1, 0), "left the queue: {s:?}");
    // Its inner slot came back with it: the second caller gets ready, then the permit.
    let response = second.ready().await.unwrap().call(2);
    assert!(held.release().await.unwrap());
    assert_eq!(response.await.unwrap(), 2);
    assert_eq!(witness.max.load(SeqCst), 1);
    let s = limiter.status().await.unwrap();
    assert_eq!((s.in_use, s.holders, s.waiting), (0, 0, 0), "{s:?}");
}

/// A (lease `lease`) runs past its lease: it ends a lease after B entered, and B can only
/// enter once A's lease ended (A and B overlap: the documented price of a too-short lease). A's late
/// release must not free B's permit, so C (queued behind B) enters only after B left. The
/// calls end on each other's events, not after fixed holds: in real time (Redis) a stalled
/// test process would otherwise reorder them (B and C had to queue within A's 400 ms lease).
async fn a_late_release_frees_nobody_elses_permit<S: Store>(gate: Floodgate<S>, lease: Duration) {
    let spec = LimiterSpec::concurrency(1).with_max_wait(Duration::from_secs(600));
    gate.define("lease", spec).await.unwrap();
    let limiter = gate.limiter("lease").await.unwrap();
    let events: Arc<Mutex<Vec<String>>> = Arc::default();
    let b_in = Arc::new(Notify::new());
    let a_out = Arc::new(Notify::new());
    let inner = {
        let (events, b_in, a_out) = (Arc::clone(&events), Arc::clone(&b_in), Arc::clone(&a_out));
        service_fn(move |name: &'static str| {
            let (events, b_in, a_out) =
                (Arc::clone(&events), Arc::clone(&b_in), Arc::clone(&a_out));
            async move {
                events.lock().unwrap().push(format!("{name} in"));
                match name {
                    "A" => {
                        b_in.notified().await;
                        // Clearly past its lease (B got in when it ended), as a call that
                        // overruns is.
                        tokio::time::sleep(lease).await;
                        events.lock().unwrap().push("A out".to_owned());
                        a_out.notify_one();
                        return Ok::<_, Infallible>(());
                    }
                    "B" => {
                        b_in.notify_one();
                        a_out.notified().await;
                        // Time for A's late release (a background round trip on Redis) to
                        // free B's permit, were it to: C would then enter beside B.
                        tokio::time::sleep(lease * 2).await;
                    }
                    _ => {}
                }
                events.lock().unwrap().push(format!("{name} out"));
                Ok(())
            }
        })
    };
    let layer = |lease: Duration| {
        FloodgateLayer::new(
            limiter.clone(),
            AcquireOptions::new()
                .wait(Duration::from_secs(60))
                .lease(lease),
        )
    };
    let short = ServiceBuilder::new()
        .layer(layer(lease))
        .service(inner.clone());
    let long = ServiceBuilder::new()
        .layer(layer(Duration::from_secs(600)))
        .service(inner);
    // Each call reaches the store (granted or queued) before the next is made, so they are
    // granted in the order A, B, C; counted so that a grant or a lease ending in between does
    // not hide it.
    let a = tokio::spawn(short.oneshot("A"));
    support::until_status(&limiter, "A granted", |s| s.counters.granted >= 1).await;
    let b = tokio::spawn(long.clone().oneshot("B"));
    support::until_status(&limiter, "B queued or granted", |s| {
        s.counters.granted + u64::from(s.waiting) >= 2
    })
    .await;
    let c = tokio::spawn(long.oneshot("C"));
    support::until_status(&limiter, "C queued or granted", |s| {
        s.counters.granted + u64::from(s.waiting) >= 3
    })
    .await;
    for t in [a, b, c] {
        t.await.unwrap().unwrap();
    }
    let events = events.lock().unwrap().clone();
    assert_eq!(
        events,
        ["A in", "B in", "A out", "B out", "C in", "C out"],
        "A's late release freed B's permit"
    );
    let s = support::until_status(&limiter, "all released", |s| s.in_use == 0).await;
    assert_eq!((s.counters.expired, s.counters.granted), (1, 3), "{s:?}");
}

/// A `tracing` writer into a shared buffer.
#[derive(Clone, Default)]
struct Logs(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for Logs {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[tokio::test(start_paused = true)]
async fn a_call_past_its_lease_releases_late_without_freeing_the_next_holders_permit() {
    // The test's runtime is single-threaded: a thread-local subscriber sees every task.
    let logs = Logs::default();
    let writer = logs.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_writer(move || writer.clone())
        .with_ansi(false)
        .finish();
    let _guard = tracing::subscriber::set_default(subscriber);
    a_late_release_frees_nobody_elses_permit(Floodgate::in_memory(), Duration::from_millis(100))
        .await;
    // The call that outlived its lease (A) was reported, once; B and C, within theirs, not.
    let logs = String::from_utf8(logs.0.lock().unwrap().clone()).unwrap();
    let warned: Vec<&str> = logs.lines().filter(|l| l.contains("ran past")).collect();
    assert_eq!(warned.len(), 1, "{logs}");
    assert!(
        warned[0].contains("WARN") && warned[0].contains("limiter=lease"),
        "{logs}"
    );
}

#[tokio::test]
async fn a_call_past_its_lease_releases_late_without_freeing_the_next_holders_permit_on_redis() {
    let server = support::RedisServer::start();
    let store = RedisStore::connect(RedisConfig::new(server.url()))
        .await
        .unwrap();
    a_late_release_frees_nobody_elses_permit(
        Floodgate::with_store(store),
        Duration::from_millis(400),
    )
    .await;
}
