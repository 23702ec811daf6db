//! Adversarial review of the tower middleware ([`FloodgateLayer`], [`KeyedFloodgateLayer`]):
//! what `tests/layer.rs` and `tests/keyed_layer.rs` do not cover. Each test counts the inner
//! calls in flight from outside the limiter (a witness) and checks the limiter's own counts
//! after drops and panics, on both stores where their paths differ (Redis: a real
//! `redis-server`, in real time; the embedded store under paused time).
//!
//! - one `request_id` in the layer's options, shared by every call, must not let calls share
//!   one grant (the witness saw 3 calls in flight under a limit of 1 before the fix);
//! - a panicking inner service (in `call` or in its future) releases the permit exactly once
//!   and the panic reaches the caller;
//! - a keyed layer's key that is not a valid key fails the call with a downcastable
//!   `Refusal::Invalid` naming `key`, never a panic, and the inner service is not called.

#![cfg(not(feature = "shuttle"))]
#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "support/mod.rs"]
mod support;

use std::convert::Infallible;
use std::sync::atomic::{AtomicU32, AtomicUsize, Ordering::SeqCst};
use std::sync::Arc;
use std::time::Duration;

use floodgate::layer::KeyedFloodgateLayer;
use floodgate::{
    AcquireError, AcquireOptions, Floodgate, FloodgateLayer, KeyedSpec, Limiter, LimiterBackend,
    LimiterSpec, RedisConfig, RedisStore, Refusal, Store,
};
use tower::{service_fn, Service, ServiceBuilder, ServiceExt};

/// Inner calls in progress, counted outside the limiter, and the most seen at once.
#[derive(Default)]
struct Witness {
    current: AtomicU32,
    max: AtomicU32,
    calls: AtomicUsize,
}

/// Leaves the witness count when dropped: a call dropped or unwound mid-way is un-counted.
struct InCall(Arc<Witness>);

impl Witness {
    fn enter(self: &Arc<Self>) -> InCall {
        let now = self.current.fetch_add(1, SeqCst) + 1;
        self.max.fetch_max(now, SeqCst);
        self.calls.fetch_add(1, SeqCst);
        InCall(Arc::clone(self))
    }
}

impl Drop for InCall {
    fn drop(&mut self) {
        self.0.current.fetch_sub(1, SeqCst);
    }
}

async fn redis_gate() -> (support::RedisServer, Floodgate<RedisStore>) {
    let server = support::RedisServer::start();
    let store = RedisStore::connect(RedisConfig::new(server.url()))
        .await
        .unwrap();
    (server, Floodgate::with_store(store))
}

async fn plain<S: Store>(gate: &Floodgate<S>, limit: u32) -> Limiter<S::Limiter> {
    let spec = LimiterSpec::concurrency(limit).with_max_wait(Duration::from_secs(600));
    gate.define("layer", spec).await.unwrap();
    gate.limiter("layer").await.unwrap()
}

// ---------------------------------------------------------------------------------------------
// One request id shared by every call of the layer.

/// Three calls through a layer whose options carry a `request_id`, under a limit of 1: each
/// call is its own acquire, so they run one at a time and the limiter grants three times.
async fn a_shared_request_id_does_not_merge_calls<S: Store>(gate: Floodgate<S>, hold: Duration) {
    let limiter = plain(&gate, 1).await;
    let witness = Arc::new(Witness::default());
    let inner = {
        let witness = Arc::clone(&witness);
        service_fn(move |i: u32| {
            let witness = Arc::clone(&witness);
            async move {
                let _in = witness.enter();
                tokio::time::sleep(hold).await;
                Ok::<_, Infallible>(i)
            }
        })
    };
    let options = AcquireOptions::new()
        .wait(Duration::from_secs(60))
        .request_id("job-1");
    let svc = ServiceBuilder::new()
        .layer(FloodgateLayer::new(limiter.clone(), options))
        .service(inner);
    let mut tasks = Vec::new();
    for i in 0..3u32 {
        let svc = svc.clone();
        tasks.push(tokio::spawn(async move { svc.oneshot(i).await }));
    }
    for (i, t) in tasks.into_iter().enumerate() {
        assert_eq!(t.await.unwrap().unwrap(), i as u32);
    }
    assert_eq!(witness.calls.load(SeqCst), 3);
    assert_eq!(
        witness.max.load(SeqCst),
        1,
        "calls sharing the layer's request id ran together under a limit of 1"
    );
    let s = support::until_status(&limiter, "all released", |s| s.in_use == 0).await;
    assert_eq!(s.counters.granted, 3, "one grant per call: {s:?}");
}

#[tokio::test(start_paused = true)]
async fn a_request_id_in_the_layers_options_does_not_merge_calls() {
    a_shared_request_id_does_not_merge_calls(Floodgate::in_memory(), Duration::from_millis(50))
        .await;
}

#[tokio::test]
async fn a_request_id_in_the_layers_options_does_not_merge_calls_on_redis() {
    let (_server, gate) = redis_gate().await;
    a_shared_request_id_does_not_merge_calls(gate, Duration::from_millis(200)).await;
}

/// The same through the keyed layer: calls of one key sharing the options' request id.
async fn a_shared_request_id_does_not_merge_keyed_calls<S: Store>(
    gate: Floodgate<S>,
    hold: Duration,
) {
    let spec = LimiterSpec::concurrency(10).with_max_wait(Duration::from_secs(600));
    gate.define_keyed("orgs", spec, KeyedSpec::per_key(1))
        .await
        .unwrap();
    let limiter = gate.limiter("orgs").await.unwrap();
    let witness = Arc::new(Witness::default());
    let inner = {
        let witness = Arc::clone(&witness);
        service_fn(move |i: u32| {
            let witness = Arc::clone(&witness);
            async move {
                let _in = witness.enter();
                tokio::time::sleep(hold).await;
                Ok::<_, Infallible>(i)
            }
        })
    };
    let options = AcquireOptions::new()
        .wait(Duration::from_secs(60))
        .request_id("job-1");
    let svc = ServiceBuilder::new()
        .layer(KeyedFloodgateLayer::new(
            limiter.clone(),
            options,
            |_: &u32| "org-1",
        ))
        .service(inner);
    let mut tasks = Vec::new();
    for i in 0..3u32 {
        let svc = svc.clone();
        tasks.push(tokio::spawn(async move { svc.oneshot(i).await }));
    }
    for (i, t) in tasks.into_iter().enumerate() {
        assert_eq!(t.await.unwrap().unwrap(), i as u32);
    }
    assert_eq!(
        witness.max.load(SeqCst),
        1,
        "one key's calls sharing the layer's request id ran together under its limit of 1"
    );
    let s = support::until_status(&limiter, "all released", |s| s.in_use == 0).await;
    assert_eq!(s.counters.granted, 3, "one grant per call: {s:?}");
}

#[tokio::test(start_paused = true)]
async fn a_request_id_in_the_keyed_layers_options_does_not_merge_calls() {
    a_shared_request_id_does_not_merge_keyed_calls(
        Floodgate::in_memory(),
        Duration::from_millis(50),
    )
    .await;
}

#[tokio::test]
async fn a_request_id_in_the_keyed_layers_options_does_not_merge_calls_on_redis() {
    let (_server, gate) = redis_gate().await;
    a_shared_request_id_does_not_merge_keyed_calls(gate, Duration::from_millis(200)).await;
}

// ---------------------------------------------------------------------------------------------
// Panics.

/// Where the inner service panics: in `call` itself, or in the future it returned.
#[derive(Clone, Copy, Debug)]
enum PanicAt {
    Call,
    Future,
}

/// A call whose inner service panics: the panic reaches the task's `JoinHandle`, the permit
/// is released exactly once (`released` counts 1, nothing expires, the next call runs).
async fn a_panicking_inner_service_releases_once<S: Store>(gate: Floodgate<S>, at: PanicAt) {
    let limiter = plain(&gate, 1).await;
    let witness = Arc::new(Witness::default());
    let inner = {
        let witness = Arc::clone(&witness);
        tower::service_fn(move |boom: bool| {
            let in_call = witness.enter();
            if boom && matches!(at, PanicAt::Call) {
                panic!("inner call panics");
            }
            async move {
                let _in = in_call;
                tokio::task::yield_now().await;
                assert!(!boom, "inner future panics");
                Ok::<_, Infallible>(())
            }
        })
    };
    let svc = ServiceBuilder::new()
        .layer(FloodgateLayer::new(
            limiter.clone(),
            AcquireOptions::new()
                .wait(Duration::from_secs(60))
                .lease(Duration::from_secs(600)),
        ))
        .service(inner);
    let joined = tokio::spawn(svc.clone().oneshot(true)).await;
    let err = joined.expect_err("the panic reaches the caller");
    assert!(err.is_panic(), "{err:?}");
    assert_eq!(witness.current.load(SeqCst), 0);
    let s = support::until_status(&limiter, "released after the panic", |s| s.in_use == 0).await;
    assert_eq!(
        (s.holders, s.counters.released, s.counters.expired),
        (0, 1, 0),
        "{at:?}: {s:?}"
    );
    // The next call gets the only permit, and then exactly one more release is counted.
    svc.oneshot(false).await.unwrap();
    let s = support::until_status(&limiter, "second release", |s| s.in_use == 0).await;
    assert_eq!(
        (s.counters.granted, s.counters.released),
        (2, 2),
        "{at:?}: {s:?}"
    );
}

#[tokio::test(start_paused = true)]
async fn a_panic_in_the_inner_call_releases_the_permit_once() {
    a_panicking_inner_service_releases_once(Floodgate::in_memory(), PanicAt::Call).await;
}

#[tokio::test(start_paused = true)]
async fn a_panic_in_the_inner_future_releases_the_permit_once() {
    a_panicking_inner_service_releases_once(Floodgate::in_memory(), PanicAt::Future).await;
}

#[tokio::test]
async fn a_panicking_inner_service_releases_the_permit_once_on_redis() {
    let (_server, gate) = redis_gate().await;
    a_panicking_inner_service_releases_once(gate.clone(), PanicAt::Call).await;
    gate.delete("layer").await.unwrap();
    a_panicking_inner_service_releases_once(gate, PanicAt::Future).await;
}

// ---------------------------------------------------------------------------------------------
// Keys that are not keys.

/// Each bad key fails its call with `Refusal::Invalid` naming `key` (downcast from the boxed
/// error), the inner service is never called, nothing is held or queued, and a good key works
/// after them.
async fn bad_keys_fail_the_call<S: Store>(gate: Floodgate<S>) {
    let spec = LimiterSpec::concurrency(4).with_max_wait(Duration::from_secs(600));
    gate.define_keyed("orgs", spec, KeyedSpec::per_key(2))
        .await
        .unwrap();
    let limiter = gate.limiter("orgs").await.unwrap();
    let witness = Arc::new(Witness::default());
    let inner = {
        let witness = Arc::clone(&witness);
        service_fn(move |_: String| {
            let in_call = witness.enter();
            async move {
                drop(in_call);
                Ok::<_, Infallible>(())
            }
        })
    };
    let mut svc = ServiceBuilder::new()
        .layer(KeyedFloodgateLayer::new(
            limiter.clone(),
            AcquireOptions::new().wait(Duration::from_secs(5)),
            |key: &String| key.clone(),
        ))
        .service(inner);
    let bad = [
        String::new(),
        "x".repeat(100_000),
        "a\u{0}b".to_owned(),
        "line\nbreak".to_owned(),
    ];
    for key in bad {
        let err = svc
            .ready()
            .await
            .unwrap()
            .call(key.clone())
            .await
            .expect_err("a bad key fails the call");
        let shown: String = key.chars().take(20).collect();
        match err.downcast_ref::<AcquireError>() {
            Some(AcquireError::Refused(Refusal::Invalid(f))) => {
                assert_eq!(f.field, "key", "{shown:?}: {f:?}");
            }
            other => panic!("{shown:?}: not an invalid key: {other:?} ({err})"),
        }
    }
    assert_eq!(witness.calls.load(SeqCst), 0, "the inner service never ran");
    let s = limiter.status().await.unwrap();
    assert_eq!((s.in_use, s.waiting), (0, 0), "{s:?}");
    svc.ready()
        .await
        .unwrap()
        .call("org-1".to_owned())
        .await
        .unwrap();
    assert_eq!(witness.calls.load(SeqCst), 1);
}

#[tokio::test(start_paused = true)]
async fn a_keyed_layers_bad_key_fails_the_call_with_invalid_key() {
    bad_keys_fail_the_call(Floodgate::in_memory()).await;
}

#[tokio::test]
async fn a_keyed_layers_bad_key_fails_the_call_with_invalid_key_on_redis() {
    let (_server, gate) = redis_gate().await;
    bad_keys_fail_the_call(gate).await;
}

// ---------------------------------------------------------------------------------------------
// Errors the caller can act on, through the keyed layer.

/// Through the keyed layer: a wait that ends and a full queue each fail the call with a boxed
/// `AcquireError` carrying its retry hint; the inner service is not called for them, and
/// nothing is left queued.
async fn refusals_carry_their_retry_hint<S: Store>(gate: Floodgate<S>) {
    let spec = LimiterSpec::concurrency(10)
        .with_max_wait(Duration::from_secs(600))
        .with_max_queue(1);
    gate.define_keyed("orgs", spec, KeyedSpec::per_key(1))
        .await
        .unwrap();
    let limiter = gate.limiter("orgs").await.unwrap();
    let witness = Arc::new(Witness::default());
    let inner = {
        let witness = Arc::clone(&witness);
        service_fn(move |_: &'static str| {
            let in_call = witness.enter();
            async move {
                drop(in_call);
                Ok::<_, Infallible>(())
            }
        })
    };
    let layer = |wait: Duration| {
        KeyedFloodgateLayer::new(
            limiter.clone(),
            AcquireOptions::new().wait(wait),
            |org: &&'static str| *org,
        )
    };
    let held = limiter
        .acquire(AcquireOptions::new().key("org-1"))
        .await
        .unwrap();
    // A wait that ends: WaitTimeout, with its hint.
    let short = ServiceBuilder::new()
        .layer(layer(Duration::from_millis(300)))
        .service(inner.clone());
    let err = short.oneshot("org-1").await.expect_err("org-1 is full");
    let e = err.downcast_ref::<AcquireError>().expect("an AcquireError");
    assert!(e.is_wait_timeout(), "{e:?}");
    assert!(e.retry_after().is_some_and(|d| d > Duration::ZERO), "{e:?}");
    // A full queue: one waiter queued (max_queue 1), the next refused at once with its hint.
    let long = ServiceBuilder::new()
        .layer(layer(Duration::from_secs(60)))
        .service(inner);
    let queued = tokio::spawn(long.clone().oneshot("org-1"));
    support::until_status(&limiter, "one queued", |s| s.waiting == 1).await;
    let err = long.oneshot("org-1").await.expect_err("the queue is full");
    match err.downcast_ref::<AcquireError>() {
        Some(e @ AcquireError::Refused(Refusal::QueueFull { .. })) => {
            assert!(e.retry_after().is_some(), "{e:?}");
        }
        other => panic!("not QueueFull: {other:?} ({err})"),
    }
    assert_eq!(witness.calls.load(SeqCst), 0);
    drop(held);
    queued.await.unwrap().unwrap();
    assert_eq!(witness.calls.load(SeqCst), 1);
    let s = support::until_status(&limiter, "idle", |s| s.in_use == 0).await;
    assert_eq!(s.waiting, 0, "{s:?}");
}

#[tokio::test(start_paused = true)]
async fn the_keyed_layers_refusals_carry_their_retry_hint() {
    refusals_carry_their_retry_hint(Floodgate::in_memory()).await;
}

#[tokio::test]
async fn the_keyed_layers_refusals_carry_their_retry_hint_on_redis() {
    let (_server, gate) = redis_gate().await;
    refusals_carry_their_retry_hint(gate).await;
}

// ---------------------------------------------------------------------------------------------
// Auto traits, checked at compile time (as `src/assertions.rs` does for the handles): the
// middleware's services and response futures can be spawned on a multi-thread runtime and
// shared, for any store.

fn send_sync<T: Send + Sync + 'static>() {}
fn send_value<T: Send>(_: &T) {}

#[allow(dead_code, reason = "type-checked, never called")]
fn the_middleware_is_send_and_sync<B: LimiterBackend>(limiter: Limiter<B>) {
    let inner = service_fn(|i: u32| async move { Ok::<_, Infallible>(i) });
    let mut plain = FloodgateLayer::new(limiter.clone(), AcquireOptions::new()).layer(inner);
    send_value(&plain);
    send_value(&plain.call(1));
    let mut keyed =
        KeyedFloodgateLayer::new(limiter, AcquireOptions::new(), |i: &u32| i.to_string())
            .layer(inner);
    send_value(&keyed);
    send_value(&keyed.call(1));
    send_sync::<FloodgateLayer<floodgate::RedisLimiter>>();
}

/// A key closure capturing a value that is neither `Clone` nor `Debug` still gives a layer and
/// a service that are both (the closure sits in an `Arc`; derived impls asked `F: Clone` and
/// did not build here: "the trait bound ... Clone is not satisfied").
#[allow(dead_code, reason = "type-checked, never called")]
fn a_non_clone_key_closure_still_clones<B: LimiterBackend>(limiter: Limiter<B>) {
    struct Prefix(String); // neither Clone nor Debug
    impl Prefix {
        // Called as a method, so the closure captures the whole `Prefix`, not just its
        // (cloneable) `String` field.
        fn get(&self) -> &str {
            &self.0
        }
    }
    let prefix = Prefix("org-".to_owned());
    let layer = KeyedFloodgateLayer::new(limiter, AcquireOptions::new(), move |i: &u32| {
        format!("{}{i}", prefix.get())
    });
    let service = layer.layer(service_fn(|i: u32| async move { Ok::<_, Infallible>(i) }));
    // By value, not through `&T: Clone` (a reference is a `Layer` too, so `.clone()` alone
    // would build either way).
    clone_debug(&layer);
    clone_debug(&service);
}

fn clone_debug<T: Clone + std::fmt::Debug>(_: &T) {}

use tower::Layer;
