//! Tests of the tower middleware [`FloodgateLayer`]: it bounds the concurrency of the inner
//! service, releases the permit when the response future completes or is dropped, fails a call
//! whose wait ends with a downcastable [`AcquireError`], and leaves the queue when a waiting
//! response future is dropped.
//!
//! Time is paused in every test (the store is created inside the test, so its clock follows
//! the paused time), which makes sleeps and waits exact and instant.

// With the `shuttle` feature the store's mutex is shuttle's, which panics outside a shuttle
// test: these tests only run without it.
#![cfg(not(feature = "shuttle"))]
#![allow(clippy::unwrap_used)]

use std::convert::Infallible;
use std::sync::atomic::{AtomicU32, AtomicUsize, Ordering::SeqCst};
use std::sync::Arc;
use std::time::Duration;

use floodgate::{
    AcquireError, AcquireOptions, Floodgate, FloodgateLayer, Limiter, LimiterSpec, LimiterStatus,
    MemoryLimiter, TokioClock,
};
use tower::{service_fn, Service, ServiceBuilder, ServiceExt};

type Backend = MemoryLimiter<TokioClock>;

async fn limiter(limit: u32) -> Limiter<Backend> {
    let gate = Floodgate::in_memory();
    let spec = LimiterSpec::concurrency(limit).with_max_wait(Duration::from_secs(600));
    gate.define("layer", spec).await.unwrap();
    gate.limiter("layer").await.unwrap()
}

async fn status(limiter: &Limiter<Backend>) -> LimiterStatus {
    limiter.status().await.unwrap()
}

/// Counts inner calls in progress, from outside the limiter, and remembers the maximum.
#[derive(Default)]
struct Witness {
    current: AtomicU32,
    max: AtomicU32,
    calls: AtomicUsize,
}

impl Witness {
    fn enter(&self) {
        let now = self.current.fetch_add(1, SeqCst) + 1;
        self.max.fetch_max(now, SeqCst);
        self.calls.fetch_add(1, SeqCst);
    }

    fn leave(&self) {
        self.current.fetch_sub(1, SeqCst);
    }
}

/// Leaves the witness count when dropped, so a call cancelled mid-way is un-counted too.
struct InCall(Arc<Witness>);

impl Drop for InCall {
    fn drop(&mut self) {
        self.0.leave();
    }
}

/// A service that sleeps for `hold` while counted by the witness, then echoes the request.
fn sleeping_service(
    witness: Arc<Witness>,
    hold: Duration,
) -> impl Service<u32, Response = u32, Error = Infallible, Future = impl Send> + Clone + Send + 'static
{
    service_fn(move |req: u32| {
        let witness = Arc::clone(&witness);
        async move {
            witness.enter();
            let _in_call = InCall(witness);
            tokio::time::sleep(hold).await;
            Ok::<u32, Infallible>(req)
        }
    })
}

#[tokio::test(start_paused = true)]
async fn bounds_inner_concurrency_to_the_limit() {
    let limiter = limiter(2).await;
    let witness = Arc::new(Witness::default());
    let service = ServiceBuilder::new()
        .layer(FloodgateLayer::new(
            limiter.clone(),
            AcquireOptions::new().wait(Duration::from_secs(600)),
        ))
        .service(sleeping_service(
            Arc::clone(&witness),
            Duration::from_millis(10),
        ));

    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..20u32 {
        let service = service.clone();
        tasks.spawn(async move { (i, service.oneshot(i).await) });
    }
    let mut answered = Vec::new();
    while let Some(joined) = tasks.join_next().await {
        let (i, response) = joined.unwrap();
        assert_eq!(
            response.unwrap(),
            i,
            "every call succeeds with its own response"
        );
        answered.push(i);
    }
    answered.sort_unstable();
    assert_eq!(answered, (0..20).collect::<Vec<_>>());

    assert_eq!(witness.calls.load(SeqCst), 20);
    assert_eq!(
        witness.max.load(SeqCst),
        2,
        "at most (and, with 20 calls, exactly) 2 at once"
    );
    assert_eq!(witness.current.load(SeqCst), 0);
    let s = status(&limiter).await;
    assert_eq!((s.in_use, s.holders, s.waiting), (0, 0, 0), "{s:?}");
    assert_eq!(s.counters.granted, 20, "{s:?}");
    assert_eq!(s.counters.released, 20, "{s:?}");
}

#[tokio::test(start_paused = true)]
async fn releases_the_permit_when_the_response_completes() {
    let limiter = limiter(1).await;
    let witness = Arc::new(Witness::default());
    let mut service = ServiceBuilder::new()
        .layer(FloodgateLayer::new(limiter.clone(), AcquireOptions::new()))
        .service(sleeping_service(
            Arc::clone(&witness),
            Duration::from_millis(10),
        ));

    for i in 0..3 {
        let mut response = Box::pin(service.ready().await.unwrap().call(i));
        // Awaited through a reference: the response future is still alive afterwards.
        assert_eq!((&mut response).await.unwrap(), i);
        // Released as the call completed, not when the future is dropped.
        let s = status(&limiter).await;
        assert_eq!((s.in_use, s.holders), (0, 0), "{s:?}");
        assert_eq!(s.counters.released, u64::from(i) + 1, "{s:?}");
        drop(response);
        let s = status(&limiter).await;
        assert_eq!(
            s.counters.released,
            u64::from(i) + 1,
            "released once: {s:?}"
        );
    }
    assert_eq!(witness.calls.load(SeqCst), 3);
}

#[tokio::test(start_paused = true)]
async fn releases_the_permit_when_the_response_future_is_dropped_mid_call() {
    let limiter = limiter(1).await;
    let witness = Arc::new(Witness::default());
    let mut service = ServiceBuilder::new()
        .layer(FloodgateLayer::new(limiter.clone(), AcquireOptions::new()))
        .service(sleeping_service(
            Arc::clone(&witness),
            Duration::from_secs(3600),
        ));

    // Boxed (not stack-pinned) so that `drop` really drops it.
    let mut response = Box::pin(service.ready().await.unwrap().call(7));
    tokio::select! {
        _ = &mut response => panic!("the inner call sleeps for an hour"),
        () = tokio::time::sleep(Duration::from_millis(10)) => {}
    }
    // The inner call is running and holds the permit.
    assert_eq!(witness.current.load(SeqCst), 1);
    let s = status(&limiter).await;
    assert_eq!((s.in_use, s.holders), (1, 1), "{s:?}");

    drop(response);
    assert_eq!(
        witness.current.load(SeqCst),
        0,
        "the inner call was dropped"
    );
    let s = status(&limiter).await;
    assert_eq!((s.in_use, s.holders, s.waiting), (0, 0, 0), "{s:?}");
    assert_eq!(s.counters.released, 1, "{s:?}");
    assert_eq!(s.counters.expired, 0, "{s:?}");

    // The next call gets the permit at once.
    let permit = limiter.try_acquire().await.unwrap();
    drop(permit);
}

#[tokio::test(start_paused = true)]
async fn a_call_whose_wait_ends_fails_with_a_wait_timeout() {
    let limiter = limiter(1).await;
    let witness = Arc::new(Witness::default());
    let mut service = ServiceBuilder::new()
        .layer(FloodgateLayer::new(
            limiter.clone(),
            AcquireOptions::new().wait(Duration::from_millis(100)),
        ))
        .service(sleeping_service(
            Arc::clone(&witness),
            Duration::from_millis(1),
        ));

    // Someone else holds the only permit for longer than the call may wait.
    let held = limiter
        .acquire(AcquireOptions::new().lease(Duration::from_secs(30)))
        .await
        .unwrap();

    let err = service.ready().await.unwrap().call(1).await.unwrap_err();
    let acquire_error = err
        .downcast_ref::<AcquireError>()
        .unwrap_or_else(|| panic!("not an AcquireError: {err:?}"));
    assert!(acquire_error.is_wait_timeout(), "{acquire_error:?}");
    let retry_after = acquire_error.retry_after().unwrap();
    assert!(retry_after > Duration::ZERO);
    assert_eq!(
        witness.calls.load(SeqCst),
        0,
        "the inner service was never called"
    );

    let s = status(&limiter).await;
    assert_eq!((s.in_use, s.waiting), (1, 0), "{s:?}");
    assert_eq!(s.counters.timed_out, 1, "{s:?}");

    // Once the permit is back, the same service works again.
    assert!(held.release().await.unwrap());
    assert_eq!(service.ready().await.unwrap().call(2).await.unwrap(), 2);
    let s = status(&limiter).await;
    assert_eq!((s.in_use, s.holders, s.waiting), (0, 0, 0), "{s:?}");
}

/// What the layer's docs say to do instead of tower's `LoadShed`: with a zero wait, a call that
/// finds the limit full fails at once (nothing queued, the inner service never called) with a
/// wait timeout and its retry hint.
#[tokio::test(start_paused = true)]
async fn a_zero_wait_sheds_a_call_that_finds_the_limit_full() {
    let limiter = limiter(1).await;
    let witness = Arc::new(Witness::default());
    let mut service = ServiceBuilder::new()
        .layer(FloodgateLayer::new(
            limiter.clone(),
            AcquireOptions::new().wait(Duration::ZERO),
        ))
        .service(sleeping_service(
            Arc::clone(&witness),
            Duration::from_millis(1),
        ));
    let held = limiter
        .acquire(AcquireOptions::new().lease(Duration::from_secs(30)))
        .await
        .unwrap();
    let started = tokio::time::Instant::now();
    let err = service.ready().await.unwrap().call(1).await.unwrap_err();
    // Paused time: any wait would have moved the clock.
    assert_eq!(started.elapsed(), Duration::ZERO, "the call waited");
    let acquire_error = err
        .downcast_ref::<AcquireError>()
        .unwrap_or_else(|| panic!("not an AcquireError: {err:?}"));
    assert!(acquire_error.is_wait_timeout(), "{acquire_error:?}");
    assert!(acquire_error
        .retry_after()
        .is_some_and(|d| d > Duration::ZERO));
    assert_eq!(
        witness.calls.load(SeqCst),
        0,
        "the inner service was called"
    );
    let s = status(&limiter).await;
    assert_eq!((s.in_use, s.waiting), (1, 0), "{s:?}");
    assert!(held.release().await.unwrap());
    assert_eq!(service.ready().await.unwrap().call(2).await.unwrap(), 2);
}

#[tokio::test(start_paused = true)]
async fn dropping_a_waiting_response_future_leaves_the_queue() {
    let limiter = limiter(1).await;
    let witness = Arc::new(Witness::default());
    let mut service = ServiceBuilder::new()
        .layer(FloodgateLayer::new(limiter.clone(), AcquireOptions::new()))
        .service(sleeping_service(
            Arc::clone(&witness),
            Duration::from_millis(1),
        ));

    let held = limiter.try_acquire().await.unwrap();

    // Boxed (not stack-pinned) so that `drop` really drops it.
    let mut response = Box::pin(service.ready().await.unwrap().call(1));
    tokio::select! {
        _ = &mut response => panic!("the only permit is held"),
        () = tokio::time::sleep(Duration::from_millis(10)) => {}
    }
    let s = status(&limiter).await;
    assert_eq!((s.in_use, s.waiting), (1, 1), "{s:?}");

    drop(response);
    let s = status(&limiter).await;
    assert_eq!((s.in_use, s.waiting, s.waiting_permits), (1, 0, 0), "{s:?}");
    assert_eq!(s.counters.cancelled, 1, "{s:?}");

    // The release that follows has nobody to hand the permit to.
    assert!(held.release().await.unwrap());
    let s = status(&limiter).await;
    assert_eq!((s.in_use, s.holders, s.waiting), (0, 0, 0), "{s:?}");
    assert_eq!(s.counters.granted, 1, "{s:?}");
    assert_eq!(witness.calls.load(SeqCst), 0);
}
