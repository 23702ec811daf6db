//! What the scenarios share: the exploration driver and its path tally, a fake clock, futures
//! polled by hand, the witness, and the classification of how the raced waiter ended.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll, Wake, Waker};
use std::time::Duration;

use floodgate::{
    AcquireError, AcquireOptions, Clock, Counters, Grant, LimiterBackend, LimiterName, LimiterSpec,
    LimiterStatus, MemoryLimiter, Timestamp,
};
use shuttle::future::block_on;
use shuttle::rand::RngCore;
use shuttle::thread;

pub(crate) const ITERATIONS: usize = 3_000;
pub(crate) const PCT_ITERATIONS: usize = 1_000;
pub(crate) const PCT_DEPTH: usize = 3;

/// How the raced waiter of one scenario run ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Path {
    /// Its own poll saw the grant; it held and released the permit.
    SawGrant,
    /// It was granted but dropped the future before seeing it: the drop released the grant.
    GrantedUnawares,
    /// It was cancelled while still queued.
    Cancelled,
    /// Its wait ended first.
    TimedOut,
    /// It was dropped before its first poll, so it never queued.
    NeverQueued,
}

pub(crate) const PATHS: [Path; 5] = [
    Path::SawGrant,
    Path::GrantedUnawares,
    Path::Cancelled,
    Path::TimedOut,
    Path::NeverQueued,
];

/// How often each path was taken across the iterations of one test (plain std atomics:
/// bookkeeping outside the schedules under test).
#[derive(Default)]
pub(crate) struct Tally([AtomicU64; 5]);

impl Tally {
    pub(crate) fn record(&self, path: Path) {
        let i = PATHS.iter().position(|p| *p == path).unwrap();
        self.0[i].fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn count(&self, path: Path) -> u64 {
        let i = PATHS.iter().position(|p| *p == path).unwrap();
        self.0[i].load(Ordering::Relaxed)
    }
}

/// Runs `scenario` under shuttle's random scheduler, or under PCT when `pct` is set, and
/// checks that the schedules explored reached every path in `expected` (so the races under
/// test really happened, not just the easy orders).
pub(crate) fn explore(scenario: fn() -> Path, pct: bool, expected: &[Path]) {
    let tally = Arc::new(Tally::default());
    let t = Arc::clone(&tally);
    let run = move || t.record(scenario());
    if pct {
        shuttle::check_pct(run, PCT_ITERATIONS, PCT_DEPTH);
    } else {
        shuttle::check_random(run, ITERATIONS);
    }
    let seen: Vec<(Path, u64)> = PATHS.iter().map(|p| (*p, tally.count(*p))).collect();
    eprintln!("paths taken: {seen:?}");
    for path in expected {
        assert!(
            tally.count(*path) > 0,
            "no schedule took {path:?}: {seen:?}"
        );
    }
}

/// A clock that only moves when told to, in microseconds.
#[derive(Clone, Default)]
pub(crate) struct FakeClock(Arc<AtomicU64>);

impl FakeClock {
    pub(crate) fn advance(&self, by: Duration) {
        let micros = u64::try_from(by.as_micros()).unwrap();
        self.0.fetch_add(micros, Ordering::SeqCst);
    }
}

impl Clock for FakeClock {
    fn now(&self) -> Timestamp {
        Timestamp(self.0.load(Ordering::SeqCst))
    }

    fn instant_at(&self, _at: Timestamp) -> tokio::time::Instant {
        // No timer task runs for a standalone limiter.
        tokio::time::Instant::now()
    }
}

pub(crate) type Backend = MemoryLimiter<FakeClock>;
pub(crate) type AcquireFuture = Pin<Box<dyn Future<Output = Result<Grant, AcquireError>> + Send>>;

pub(crate) fn limiter(limit: u32, clock: &FakeClock) -> Backend {
    let spec = LimiterSpec::concurrency(limit)
        .with_default_lease(Duration::from_secs(300))
        .with_max_wait(Duration::from_secs(60));
    MemoryLimiter::standalone(LimiterName::new("shuttle").unwrap(), spec, clock.clone(), 1).unwrap()
}

pub(crate) fn request(permits: u32, wait: Duration) -> AcquireOptions {
    AcquireOptions::new().permits(permits).wait(wait)
}

/// An acquire as an owned future, so it can be polled by hand, moved to a thread and dropped.
pub(crate) fn acquire(limiter: &Backend, req: AcquireOptions) -> AcquireFuture {
    let limiter = limiter.clone();
    Box::pin(async move { limiter.acquire(req).await })
}

pub(crate) struct NoopWake;

impl Wake for NoopWake {
    fn wake(self: Arc<Self>) {}
}

/// Polls once with a waker that does nothing (the caller polls again or drops the future).
pub(crate) fn poll_once(fut: &mut AcquireFuture) -> Poll<Result<Grant, AcquireError>> {
    let waker = Waker::from(Arc::new(NoopWake));
    let mut cx = Context::from_waker(&waker);
    fut.as_mut().poll(&mut cx)
}

pub(crate) fn status(limiter: &Backend) -> LimiterStatus {
    block_on(limiter.status()).unwrap()
}

/// A random number below `n` from shuttle's scheduler-controlled generator, so a failing
/// schedule replays with the same choices.
pub(crate) fn random_below(n: u64) -> u64 {
    shuttle::rand::thread_rng().next_u64() % n
}

pub(crate) fn yield_randomly(max: u64) {
    for _ in 0..random_below(max + 1) {
        thread::yield_now();
    }
}

/// Counts holders from outside the limiter; every update is a shuttle scheduling point.
pub(crate) struct Witness {
    limit: i64,
    held: shuttle::sync::atomic::AtomicI64,
}

impl Witness {
    pub(crate) fn new(limit: u32) -> Arc<Witness> {
        Arc::new(Witness {
            limit: i64::from(limit),
            held: shuttle::sync::atomic::AtomicI64::new(0),
        })
    }

    pub(crate) fn enter(&self, permits: u32) {
        let permits = i64::from(permits);
        let now = self.held.fetch_add(permits, Ordering::SeqCst) + permits;
        assert!(
            now <= self.limit,
            "{now} permits held at once; the limit is {}",
            self.limit
        );
    }

    pub(crate) fn leave(&self, permits: u32) {
        self.held.fetch_sub(i64::from(permits), Ordering::SeqCst);
    }

    /// Counts a fresh grant, lets others run, then un-counts and releases it.
    pub(crate) fn hold_then_release(&self, limiter: &Backend, grant: &Grant) {
        self.enter(grant.permits);
        thread::yield_now();
        self.leave(grant.permits);
        assert!(
            block_on(limiter.release(grant.token)).unwrap(),
            "a granted permit was no longer held at release"
        );
    }
}

/// What the giving-up waiter saw itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Seen {
    /// A poll returned the grant (held and released).
    Grant,
    /// A poll returned a wait timeout.
    Timeout,
    /// Dropped the future after polling it this many times without an outcome.
    Dropped { polls: u64 },
}

/// Polls an acquire by hand 0, 1 or 2 times at random points (so it may be granted without
/// knowing it), then drops it. A grant seen while polling is held and released.
pub(crate) fn poll_randomly_then_drop(
    mut fut: AcquireFuture,
    limiter: &Backend,
    witness: &Witness,
    allow_timeout: bool,
) -> Seen {
    let polls = random_below(3);
    for _ in 0..polls {
        yield_randomly(2);
        match poll_once(&mut fut) {
            Poll::Pending => {}
            Poll::Ready(Ok(grant)) => {
                witness.hold_then_release(limiter, &grant);
                return Seen::Grant;
            }
            Poll::Ready(Err(e)) => {
                assert!(allow_timeout && e.is_wait_timeout(), "unexpected: {e}");
                return Seen::Timeout;
            }
        }
    }
    yield_randomly(2);
    drop(fut);
    Seen::Dropped { polls }
}

pub(crate) fn assert_settled(limiter: &Backend) -> Counters {
    let s = status(limiter);
    assert_eq!(s.in_use, 0, "permits leaked: {s:?}");
    assert_eq!(s.holders, 0, "grants leaked: {s:?}");
    assert_eq!(s.waiting, 0, "waiters left behind: {s:?}");
    assert_eq!(s.waiting_permits, 0, "{s:?}");
    let c = s.counters;
    assert_eq!(c.granted, c.released + c.expired, "{c:?}");
    c
}

/// Checks that the giving-up waiter ended exactly one way, agreeing with what it saw, given
/// that `others` grants went to everybody else. `queued` says it was queued before its thread
/// started (so it cannot have been dropped unqueued).
pub(crate) fn classify(c: &Counters, seen: Seen, others: u64, queued: bool) -> Path {
    let granted = c.granted - others;
    assert_eq!(
        granted + c.cancelled + c.timed_out,
        u64::from(queued || !matches!(seen, Seen::Dropped { polls: 0 })),
        "the waiter that gave up ended more than one way ({seen:?}): {c:?}"
    );
    match seen {
        Seen::Grant => {
            assert_eq!(granted, 1, "{c:?}");
            Path::SawGrant
        }
        Seen::Timeout => {
            assert_eq!(c.timed_out, 1, "{c:?}");
            Path::TimedOut
        }
        Seen::Dropped { .. } if granted == 1 => Path::GrantedUnawares,
        Seen::Dropped { .. } if c.cancelled == 1 => Path::Cancelled,
        // Its wait ended, but it dropped the future without looking.
        Seen::Dropped { .. } if c.timed_out == 1 => Path::TimedOut,
        Seen::Dropped { .. } => Path::NeverQueued,
    }
}
