//! A cache probe of the embedded cancel at a long queue, for cachegrind: `cancel_probe Q N
//! [bench|public]` queues Q boxed acquires, then N times cancels one at random and queues a new
//! one at the tail (as `floodgate bench-growth`'s random-order row does). Run it at N = 0 and
//! N = 2000 under `valgrind --tool=cachegrind` and divide the difference in misses by N: the
//! misses of one cancel (and the acquire that replaces it, which reuses its warm box).
//! `bench` boxes the store's acquire in an `async move` block, as bench-growth does; `public`
//! boxes `Limiter::acquire`, what an application holds. With `PROBE_TIME` set it prints the
//! median wall time of the N cancels (the drop alone, as bench-growth times it). It runs on
//! jemalloc, as the `floodgate` binary does: on glibc's malloc the free read a chunk header
//! (one cold line in four cancels, by cachegrind) and the 112-byte boxes sat at other offsets.

use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll, Waker};
use std::time::Duration;

/// The `floodgate` binary's allocator (see the module doc).
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

use floodgate::{
    AcquireOptions, Floodgate, LimiterBackend, LimiterName, LimiterSpec, MemoryStore, Store,
};

/// A boxed queued acquire, whatever it yields.
type Waiting = Pin<Box<dyn Future<Output = ()> + Send>>;

fn request() -> AcquireOptions {
    AcquireOptions::new()
        .lease(Duration::from_secs(3600))
        .wait(Duration::from_secs(3600))
}

fn poll_now<F: Future + ?Sized>(fut: Pin<&mut F>) -> Poll<F::Output> {
    fut.poll(&mut Context::from_waker(Waker::noop()))
}

#[tokio::main(flavor = "current_thread")]
#[allow(clippy::print_stderr)] // the probe's one output (the box's size), on request
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    let q: usize = args.get(1).map_or(Ok(10_000), |a| a.parse())?;
    let n: usize = args.get(2).map_or(Ok(2_000), |a| a.parse())?;
    let public = args.get(3).is_some_and(|a| a == "public");
    let store = MemoryStore::new();
    store
        .put_limiter(&LimiterName::new("probe")?, LimiterSpec::concurrency(1))
        .await?;
    let gate = Floodgate::with_store(store.clone());
    let limiter = gate.limiter("probe").await?;
    let backend = store.limiter(&LimiterName::new("probe")?).await?;
    let _held = limiter.acquire(request()).await?;
    let enqueue = || -> Waiting {
        let mut fut: Waiting = if public {
            let limiter = limiter.clone();
            Box::pin(async move {
                let _ = limiter.acquire(request()).await;
            })
        } else {
            let lim = backend.clone();
            Box::pin(async move {
                let _ = lim.acquire(request()).await;
            })
        };
        assert!(
            poll_now(fut.as_mut()).is_pending(),
            "the acquire should queue"
        );
        if std::env::var_os("PROBE_SIZE").is_some() {
            eprintln!("boxed future: {} bytes", std::mem::size_of_val(&*fut));
        }
        fut
    };
    let mut waiters: VecDeque<Waiting> = (0..q).map(|_| enqueue()).collect();
    // The bench's generator (splitmix64), seeded the same way.
    let mut x = q as u64 + 1;
    let mut times = Vec::new();
    for _ in 0..n {
        x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = x;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^= z >> 31;
        let at = (z % waiters.len() as u64) as usize;
        if let Some(w) = waiters.swap_remove_back(at) {
            let start = std::time::Instant::now();
            drop(w);
            times.push(start.elapsed().as_nanos());
        }
        waiters.push_back(enqueue());
    }
    let waiting = limiter.status().await?.waiting;
    assert_eq!(waiting as usize, q, "the queue stays {q} long");
    // Not dropped: the teardown's 10k cancels differ with N (the boxes' order does) and
    // would blur the difference that is the N cancels' own misses.
    std::mem::forget(waiters);
    times.sort();
    if std::env::var_os("PROBE_TIME").is_some() && !times.is_empty() {
        eprintln!("median {} ns", times[times.len() / 2]);
    }
    Ok(())
}
