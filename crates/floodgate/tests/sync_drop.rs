//! Non-async callers: permits, waiting acquires and the tower layer's response futures are
//! `Send`, so they end up dropped on threads that are not the runtime's (a `std::thread`
//! worker, a synchronous callback). Floodgate has no blocking API of its own; what it promises
//! there is its drop behaviour: "dropping the guard releases" and "dropping the future leaves
//! the queue". These tests drop each on a plain `std::thread` (no tokio context), with leases
//! and waits far longer than the test, so only a real release or cancel can pass them.
//!
//! The embedded store (durable or not) releases and cancels synchronously. Redis does both in a task; before
//! the fix, with no runtime on the dropping thread, it skipped them ("the lease bounds it"):
//! the permit stayed held for its whole lease and the dropped waiter stayed queued (a ghost
//! ahead of later waiters) until its wait ended.

#![cfg(not(feature = "shuttle"))]
#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "support/mod.rs"]
mod support;

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

use floodgate::{
    AcquireOptions, Floodgate, FloodgateLayer, LimiterSpec, RedisConfig, RedisStore, Store,
};
use tower::{service_fn, Service, ServiceBuilder, ServiceExt};

const LONG: Duration = Duration::from_secs(600);

/// Drops `value` on a new plain thread (no tokio context there) and waits for that thread.
fn drop_on_plain_thread<T: Send + 'static>(value: T) {
    std::thread::spawn(move || {
        assert!(tokio::runtime::Handle::try_current().is_err());
        drop(value);
    })
    .join()
    .unwrap();
}

/// Polls `fut` for a little while (it must still be pending after it).
async fn poll_a_while<F: Future + Unpin>(fut: &mut F) {
    tokio::select! {
        _ = fut => panic!("expected it to be still pending"),
        () = tokio::time::sleep(Duration::from_millis(50)) => {}
    }
}

async fn run<S: Store>(gate: Floodgate<S>) {
    let spec = LimiterSpec::concurrency(1).with_max_wait(LONG);
    gate.define("sync", spec).await.unwrap();
    let limiter = gate.limiter("sync").await.unwrap();
    let options = AcquireOptions::new().wait(LONG).lease(LONG);

    // A permit dropped on a plain thread is released, not left to its 10-minute lease.
    let permit = limiter.acquire(options.clone()).await.unwrap();
    drop_on_plain_thread(permit);
    let s = support::until_status(&limiter, "permit released", |s| s.in_use == 0).await;
    assert_eq!((s.counters.released, s.counters.expired), (1, 0), "{s:?}");

    // A waiting acquire dropped on a plain thread leaves the queue: the next waiter is first.
    let held = limiter.acquire(options.clone()).await.unwrap();
    let mut waiting: Pin<Box<dyn Future<Output = _> + Send>> =
        Box::pin(limiter.clone().acquire_owned(options.clone()));
    poll_a_while(&mut waiting).await;
    assert_eq!(limiter.status().await.unwrap().waiting, 1);
    drop_on_plain_thread(waiting);
    let s = support::until_status(&limiter, "waiter left", |s| s.waiting == 0).await;
    assert_eq!(s.in_use, 1, "{s:?}");
    drop(held);
    let s = support::until_status(&limiter, "nothing held", |s| s.in_use == 0).await;
    assert_eq!(s.waiting, 0, "{s:?}");

    // The layer's response future, dropped on a plain thread mid-call and while waiting.
    let mut svc = ServiceBuilder::new()
        .layer(FloodgateLayer::new(limiter.clone(), options.clone()))
        .service(service_fn(|()| async {
            tokio::time::sleep(LONG).await;
            Ok::<_, Infallible>(())
        }));
    let mut running = Box::pin(svc.ready().await.unwrap().call(()));
    poll_a_while(&mut running).await;
    let mut queued = Box::pin(svc.ready().await.unwrap().call(()));
    poll_a_while(&mut queued).await;
    let s = limiter.status().await.unwrap();
    assert_eq!((s.in_use, s.waiting), (1, 1), "{s:?}");
    drop_on_plain_thread(queued);
    drop_on_plain_thread(running);
    let s = support::until_status(&limiter, "layer's permit and waiter gone", |s| {
        (s.in_use, s.waiting) == (0, 0)
    })
    .await;
    assert_eq!(s.counters.expired, 0, "{s:?}");
    // And a fresh acquire is granted at once.
    drop(limiter.try_acquire().await.unwrap());
}

/// `Limiter::acquire` borrows the limiter; an owned future to send across threads.
trait AcquireOwned<B: floodgate::LimiterBackend> {
    fn acquire_owned(
        self,
        options: AcquireOptions,
    ) -> impl Future<Output = Result<floodgate::Permit<B>, floodgate::AcquireError>> + Send;
}

impl<B: floodgate::LimiterBackend> AcquireOwned<B> for floodgate::Limiter<B> {
    async fn acquire_owned(
        self,
        options: AcquireOptions,
    ) -> Result<floodgate::Permit<B>, floodgate::AcquireError> {
        self.acquire(options).await
    }
}

#[tokio::test]
async fn drops_on_a_plain_thread_release_and_cancel_on_the_embedded_store() {
    run(Floodgate::in_memory()).await;
}

#[tokio::test]
async fn drops_on_a_plain_thread_release_and_cancel_on_redis() {
    let server = support::RedisServer::start();
    let store = RedisStore::connect(RedisConfig::new(server.url()))
        .await
        .unwrap();
    run(Floodgate::with_store(store)).await;
}

/// The durable embedded store: its release and cancel are logged, still without a runtime on
/// the dropping thread.
#[tokio::test]
async fn drops_on_a_plain_thread_release_and_cancel_on_the_durable_store() {
    let dir = tempfile::tempdir().unwrap();
    let (store, _) = floodgate::MemoryStore::open(floodgate::Durability::new(dir.path())).unwrap();
    run(Floodgate::with_store(store)).await;
}
