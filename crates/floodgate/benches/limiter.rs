//! Floodgate's embedded store against `tokio::sync::Semaphore`, baseline in the same group.
//!
//! - `pair`: one uncontended acquire + release (limit 100), on a current-thread runtime.
//! - `handoff`: limit 1; a holder task holds the permit, a waiter task is queued in acquire.
//!   Measured from just before the holder's release to the moment the waiter's acquire returns,
//!   on a multi-thread runtime with 2 workers.
//!
//! Run: `cargo bench -p floodgate --bench limiter`, or `crates/floodgate/benches/limiter.sh`,
//! which also prints the floodgate/tokio ratios (targets: pair within 4x, handoff within 2x).

#![allow(clippy::unwrap_used)]

use std::future::Future;
use std::pin::{pin, Pin};
use std::sync::Arc;
use std::task::Poll;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, Criterion};
use floodgate::{
    AcquireOptions, FastClock, Floodgate, Limiter, LimiterSpec, MemoryLimiter, MemoryStore,
};
use tokio::runtime::Runtime;
use tokio::sync::{oneshot, Semaphore};

type Embedded = Limiter<MemoryLimiter<FastClock>>;

/// A limiter named `name` with the given concurrency, in a fresh embedded store on the clock
/// the server uses (`FastClock`). Must run on `rt` (the store spawns its timer task there).
fn floodgate_limiter(rt: &Runtime, name: &str, concurrency: u32) -> Embedded {
    rt.block_on(async {
        let gate = Floodgate::with_store(MemoryStore::with_clock(FastClock::new()));
        gate.define(name, LimiterSpec::concurrency(concurrency))
            .await
            .unwrap();
        gate.limiter(name).await.unwrap()
    })
}

fn pair(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let limiter = floodgate_limiter(&rt, "pair", 100);
    let semaphore = Semaphore::new(100);

    let mut group = c.benchmark_group("pair");
    group.measurement_time(Duration::from_secs(5));
    group.warm_up_time(Duration::from_secs(2));

    group.bench_function("floodgate", |b| {
        b.to_async(&rt).iter(|| async {
            let permit = limiter.acquire(AcquireOptions::new()).await.unwrap();
            drop(permit);
        });
    });
    group.bench_function("floodgate_release", |b| {
        b.to_async(&rt).iter(|| async {
            let permit = limiter.acquire(AcquireOptions::new()).await.unwrap();
            permit.release().await.unwrap()
        });
    });
    group.bench_function("tokio", |b| {
        b.to_async(&rt).iter(|| async {
            let permit = semaphore.acquire().await.unwrap();
            drop(permit);
        });
    });
    group.finish();
}

/// Polls `fut` exactly once.
async fn poll_once<F: Future>(mut fut: Pin<&mut F>) -> Poll<F::Output> {
    std::future::poll_fn(|cx| Poll::Ready(fut.as_mut().poll(cx))).await
}

/// One handoff, in nanoseconds of wall time: from just before the holder drops its permit to
/// the moment the waiter's acquire returns. `acquire` is the only thing that differs between
/// the two contenders; it must queue when the single permit is held.
async fn handoff_once<P, F, A>(acquire: A) -> Duration
where
    P: Send + 'static,
    F: Future<Output = P> + Send + 'static,
    A: Fn() -> F + Clone + Send + 'static,
{
    let (held_tx, held_rx) = oneshot::channel::<()>();
    let (queued_tx, queued_rx) = oneshot::channel::<()>();

    let holder_acquire = acquire.clone();
    let holder = tokio::spawn(async move {
        let permit = holder_acquire().await;
        held_tx.send(()).unwrap();
        // The waiter is in the queue once this arrives.
        queued_rx.await.unwrap();
        let released_at = Instant::now();
        drop(permit);
        released_at
    });
    let waiter = tokio::spawn(async move {
        held_rx.await.unwrap();
        let mut fut = pin!(acquire());
        // The first poll enqueues it behind the holder.
        assert!(poll_once(fut.as_mut()).await.is_pending(), "must queue");
        queued_tx.send(()).unwrap();
        let permit = fut.await;
        let acquired_at = Instant::now();
        drop(permit);
        acquired_at
    });
    // Wait on the waiter first: nobody is registered on the holder's handle when it finishes,
    // so its completion wakes no thread inside the measured window.
    let acquired_at = waiter.await.unwrap();
    let released_at = holder.await.unwrap();
    acquired_at.duration_since(released_at)
}

fn handoff(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let limiter = floodgate_limiter(&rt, "handoff", 1);
    let semaphore = Arc::new(Semaphore::new(1));

    let mut group = c.benchmark_group("handoff");
    group.measurement_time(Duration::from_secs(5));
    group.warm_up_time(Duration::from_secs(2));

    group.bench_function("floodgate", |b| {
        b.to_async(&rt).iter_custom(|iters| {
            let limiter = limiter.clone();
            async move {
                let mut total = Duration::ZERO;
                for _ in 0..iters {
                    let limiter = limiter.clone();
                    total += handoff_once(move || {
                        let limiter = limiter.clone();
                        async move { limiter.acquire(AcquireOptions::new()).await.unwrap() }
                    })
                    .await;
                }
                total
            }
        });
    });
    group.bench_function("tokio", |b| {
        b.to_async(&rt).iter_custom(|iters| {
            let semaphore = Arc::clone(&semaphore);
            async move {
                let mut total = Duration::ZERO;
                for _ in 0..iters {
                    let semaphore = Arc::clone(&semaphore);
                    total += handoff_once(move || {
                        let semaphore = Arc::clone(&semaphore);
                        async move { semaphore.acquire_owned().await.unwrap() }
                    })
                    .await;
                }
                total
            }
        });
    });
    group.finish();
}

criterion_group!(benches, pair, handoff);
criterion_main!(benches);
