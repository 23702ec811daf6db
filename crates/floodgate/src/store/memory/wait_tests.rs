//! The wait future's wake-up slot (`State::waiters` + `State::decided`) against a plain model:
//! whatever the waiters do (polled or not, dropped while queued, after their grant was decided,
//! after it was taken), no permit leaks, each grant is seen by at most one caller, a decided
//! grant wakes its future, and nothing is left in the slots once every future is gone.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, PoisonError};
use std::task::{Context, Poll, Wake, Waker};
use std::time::Duration;

use proptest::prelude::*;

use super::*;
use crate::types::LimiterName;

/// A clock moved by the test only.
#[derive(Debug, Clone, Default)]
struct TestClock(Arc<AtomicU64>);

impl Clock for TestClock {
    fn now(&self) -> Timestamp {
        Timestamp(self.0.load(Ordering::Relaxed))
    }
    fn instant_at(&self, _at: Timestamp) -> tokio::time::Instant {
        tokio::time::Instant::now()
    }
}

/// Counts its wake-ups.
#[derive(Default)]
struct Counter(AtomicUsize);

impl Wake for Counter {
    fn wake(self: Arc<Self>) {
        self.0.fetch_add(1, Ordering::Relaxed);
    }
}

type Acquiring = Pin<Box<dyn Future<Output = Result<Grant, AcquireError>> + Send>>;

fn limiter(limit: u32) -> (MemoryLimiter<TestClock>, TestClock) {
    let clock = TestClock::default();
    let spec = LimiterSpec::concurrency(limit)
        .with_default_lease(Duration::from_secs(3600))
        .with_max_wait(Duration::from_secs(3600));
    let name = LimiterName::new("wait-slots").expect("a valid name");
    let lim = MemoryLimiter::standalone(name, spec, clock.clone(), 1).expect("a valid spec");
    (lim, clock)
}

fn acquire(lim: &MemoryLimiter<TestClock>, wait_ms: u64) -> Acquiring {
    let lim = lim.clone();
    let opts = AcquireOptions::new()
        .lease(Duration::from_secs(3600))
        .wait(Duration::from_millis(wait_ms));
    Box::pin(async move { lim.acquire(opts).await })
}

fn poll(fut: &mut Acquiring, waker: &Waker) -> Poll<Result<Grant, AcquireError>> {
    fut.as_mut().poll(&mut Context::from_waker(waker))
}

fn status(lim: &MemoryLimiter<TestClock>) -> LimiterStatus {
    let mut fut = std::pin::pin!(lim.status());
    match fut.as_mut().poll(&mut Context::from_waker(Waker::noop())) {
        Poll::Ready(s) => s.expect("the limiter answers"),
        Poll::Pending => panic!("status did not complete at once"),
    }
}

/// Listeners and undelivered outcomes still held.
fn slots(lim: &MemoryLimiter<TestClock>) -> (usize, usize) {
    let state = lim
        .shared
        .state
        .lock()
        .unwrap_or_else(PoisonError::into_inner);
    (state.waiters.len(), state.decided.len())
}

#[test]
fn a_decided_grant_wakes_its_future_and_a_dropped_one_goes_back() {
    let (lim, _clock) = limiter(1);
    let counter = Arc::new(Counter::default());
    let waker = Waker::from(Arc::clone(&counter));
    let mut holder = acquire(&lim, 0);
    let Poll::Ready(Ok(held)) = poll(&mut holder, &waker) else {
        panic!("the first acquire is granted at once")
    };
    let mut first = acquire(&lim, 10_000);
    let mut second = acquire(&lim, 10_000);
    assert!(poll(&mut first, &waker).is_pending());
    assert!(poll(&mut second, &waker).is_pending());
    assert_eq!(counter.0.load(Ordering::Relaxed), 0);
    // The release decides `first`'s grant and wakes it; `first` goes away without taking it.
    let mut rel = std::pin::pin!(lim.release(held.token));
    assert!(matches!(
        rel.as_mut().poll(&mut Context::from_waker(Waker::noop())),
        Poll::Ready(Ok(true))
    ));
    assert_eq!(
        counter.0.load(Ordering::Relaxed),
        1,
        "the grant woke its waiter"
    );
    assert_eq!(slots(&lim).1, 1, "the grant waits to be taken");
    drop(first);
    assert_eq!(
        slots(&lim).1,
        1,
        "given back, and decided for the next waiter"
    );
    assert_eq!(counter.0.load(Ordering::Relaxed), 2, "which was woken too");
    let Poll::Ready(Ok(grant)) = poll(&mut second, &waker) else {
        panic!("the permit went on to the next waiter")
    };
    assert_eq!(slots(&lim), (0, 0));
    let s = status(&lim);
    assert_eq!((s.in_use, s.holders, s.waiting), (1, 1, 0));
    assert_eq!(s.counters.cancelled, 0, "the first left after its grant");
    release(&lim, grant);
}

/// An idempotent acquire of `request_id`: its first attempt or a repeat (a client's retry).
fn acquire_as(lim: &MemoryLimiter<TestClock>, request_id: &str) -> Acquiring {
    let lim = lim.clone();
    let opts = AcquireOptions::new()
        .lease(Duration::from_secs(3600))
        .wait(Duration::from_secs(60))
        .request_id(request_id);
    Box::pin(async move { lim.acquire(opts).await })
}

#[test]
fn a_repeat_handed_a_grant_decided_for_its_first_attempt_keeps_it() {
    // The server's order after a stall: the first attempt's connection broke unnoticed, the
    // release decides the grant for it, its retry is handed that grant, and only then is the
    // first attempt's handler dropped (or polled).
    for first_polled in [false, true] {
        let (lim, _clock) = limiter(1);
        let waker = Waker::noop();
        let mut holder = acquire(&lim, 0);
        let Poll::Ready(Ok(held)) = poll(&mut holder, waker) else {
            panic!("the first acquire is granted at once")
        };
        let mut first = acquire_as(&lim, "job-1");
        assert!(poll(&mut first, waker).is_pending());
        release(&lim, held);
        let mut retry = acquire_as(&lim, "job-1");
        let Poll::Ready(Ok(grant)) = poll(&mut retry, waker) else {
            panic!("the retry is handed the grant decided for its first attempt")
        };
        if first_polled {
            // One caller per grant: the first attempt hears that its retry took it over.
            let out = poll(&mut first, waker);
            assert!(
                matches!(out, Poll::Ready(Err(AcquireError::Superseded))),
                "{out:?}"
            );
        }
        drop(first);
        let s = status(&lim);
        assert_eq!(
            (s.in_use, s.holders, s.counters.granted, s.counters.released),
            (1, 1, 2, 1),
            "the retry's grant is still held (first attempt polled: {first_polled})"
        );
        assert_eq!(slots(&lim), (0, 0));
        release(&lim, grant);
    }
}

#[test]
fn a_repeat_whose_own_call_grants_its_first_attempt_keeps_the_grant() {
    // The grant to the first attempt is made by the repeat's own call: the holder's lease
    // ended and no timer ran since (this limiter has none), so the repeat's advance of time
    // grants the queued first attempt, then answers the repeat with that grant. The first
    // attempt still listens (a broken connection not noticed yet), or was dropped and its
    // wait kept for a retry to join: either way the grant stays the repeat's.
    for first_dropped in [false, true] {
        let (lim, clock) = limiter(1);
        let waker = Waker::noop();
        let mut holder: Acquiring = {
            let lim = lim.clone();
            let opts = AcquireOptions::new()
                .lease(Duration::from_secs(1))
                .wait(Duration::ZERO);
            Box::pin(async move { lim.acquire(opts).await })
        };
        let Poll::Ready(Ok(_)) = poll(&mut holder, waker) else {
            panic!("the holder is granted at once")
        };
        let mut first = acquire_as(&lim, "job-2");
        assert!(poll(&mut first, waker).is_pending());
        if first_dropped {
            drop(first);
            first = Box::pin(std::future::pending());
        }
        clock.0.store(2_000_000, Ordering::Relaxed); // the holder's 1 s lease has ended
        let mut retry = acquire_as(&lim, "job-2");
        let Poll::Ready(Ok(grant)) = poll(&mut retry, waker) else {
            panic!("the retry is answered the grant its own call made")
        };
        if !first_dropped {
            let out = poll(&mut first, waker);
            assert!(
                matches!(out, Poll::Ready(Err(AcquireError::Superseded))),
                "{out:?}"
            );
        }
        drop(first);
        let s = status(&lim);
        assert_eq!(
            (s.in_use, s.holders),
            (1, 1),
            "the retry's grant is held (first attempt dropped: {first_dropped})"
        );
        // The witness: with the retry holding, nobody else is granted.
        let mut third = acquire(&lim, 0);
        assert!(
            matches!(poll(&mut third, waker), Poll::Ready(Err(_))),
            "a limit of 1 is taken by the retry"
        );
        assert_eq!(slots(&lim), (0, 0));
        release(&lim, grant);
        assert_eq!(status(&lim).in_use, 0);
    }
}

fn release(lim: &MemoryLimiter<TestClock>, grant: Grant) {
    let mut rel = std::pin::pin!(lim.release(grant.token));
    let out = rel.as_mut().poll(&mut Context::from_waker(Waker::noop()));
    assert!(matches!(out, Poll::Ready(Ok(true))), "{out:?}");
}

#[derive(Debug, Clone)]
enum Op {
    /// A new acquire waiting this many ms (0: try once), polled once at once or not.
    Acquire(u64, bool),
    /// Poll the waiter at this index (mod the count).
    Poll(usize),
    /// Drop the waiter at this index, whatever its state.
    Drop(usize),
    /// Release the held grant at this index.
    Release(usize),
    /// Move the clock by this many ms, then read the status (which applies time).
    Advance(u64),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (prop_oneof![Just(0u64), 5u64..50], any::<bool>()).prop_map(|(w, p)| Op::Acquire(w, p)),
        4 => (0usize..64).prop_map(Op::Poll),
        3 => (0usize..64).prop_map(Op::Drop),
        3 => (0usize..64).prop_map(Op::Release),
        1 => (1u64..30).prop_map(Op::Advance),
    ]
}

proptest! {
    /// Against a model that only counts: permits out never pass the limit, each grant reaches
    /// at most one caller, and once every future is dropped and every grant released nothing
    /// is in use, queued, listened for or left undelivered.
    #[test]
    fn dropping_waits_anywhere_never_leaks(ops in proptest::collection::vec(op(), 1..200)) {
        let limit = 2u32;
        let (lim, clock) = limiter(limit);
        let waker = Waker::noop();
        let mut futures: Vec<Acquiring> = Vec::new();
        let mut held: Vec<Grant> = Vec::new();
        let mut tokens = std::collections::HashSet::new();
        for op in ops {
            match op {
                Op::Acquire(wait, polled) => {
                    let mut fut = acquire(&lim, wait);
                    if polled {
                        match poll(&mut fut, waker) {
                            Poll::Pending => futures.push(fut),
                            Poll::Ready(Ok(g)) => {
                                prop_assert!(tokens.insert(g.token.0), "a grant seen twice");
                                held.push(g);
                            }
                            Poll::Ready(Err(_)) => {}
                        }
                    } else {
                        futures.push(fut);
                    }
                }
                Op::Poll(i) if !futures.is_empty() => {
                    let at = i % futures.len();
                    match poll(&mut futures[at], waker) {
                        Poll::Pending => {}
                        Poll::Ready(out) => {
                            drop(futures.swap_remove(at));
                            if let Ok(g) = out {
                                prop_assert!(tokens.insert(g.token.0), "a grant seen twice");
                                held.push(g);
                            }
                        }
                    }
                }
                Op::Drop(i) if !futures.is_empty() => {
                    drop(futures.swap_remove(i % futures.len()));
                }
                Op::Release(i) if !held.is_empty() => {
                    release(&lim, held.swap_remove(i % held.len()));
                }
                Op::Advance(ms) => {
                    clock.0.fetch_add(ms * 1000, Ordering::Relaxed);
                    status(&lim);
                }
                _ => {}
            }
            let s = status(&lim);
            prop_assert!(s.in_use <= limit, "over the limit: {:?}", s);
            prop_assert!(held.len() as u32 <= s.in_use, "grants held but not counted: {:?}", s);
        }
        drop(futures);
        for g in held {
            release(&lim, g);
        }
        let s = status(&lim);
        prop_assert_eq!((s.in_use, s.holders, s.waiting), (0, 0, 0), "{:?}", s);
        prop_assert_eq!(slots(&lim), (0, 0));
    }
}

/// A queued acquire is what a dropped wait reads of its own: kept within two cache lines (the
/// `async fn` it replaced was 688 bytes, its discriminant at the far end).
#[test]
fn an_acquire_future_stays_small() {
    let (lim, _clock) = limiter(1);
    let fut = lim.acquire(AcquireOptions::new());
    assert!(
        std::mem::size_of_val(&fut) <= 128,
        "{}",
        std::mem::size_of_val(&fut)
    );
    assert!(std::mem::size_of::<QueuedAcquire<TestClock>>() <= 40);
}

/// What an application holds while it waits, `Limiter::acquire`'s future: one `async fn`
/// around the store's `Acquire` (328 bytes in a test build, about 336 in a release one), where it
/// awaited a second `async fn` around a third (each level kept its own copy of the options
/// and its own tag at its far end; about 660 in a release build).
#[tokio::test]
async fn the_public_acquire_future_stays_small() {
    let gate = crate::Floodgate::in_memory();
    gate.define("small", LimiterSpec::concurrency(1))
        .await
        .expect("a valid spec");
    let lim = gate.limiter("small").await.expect("defined above");
    let fut = lim.acquire(AcquireOptions::new());
    let size = std::mem::size_of_val(&fut);
    assert!(size <= 336, "{size}");
}
