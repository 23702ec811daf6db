//! Randomized-schedule tests (shuttle) of the embedded store's wake-up and cancel path.
//!
//! Built only with the crate feature `shuttle`, which swaps the store's mutex for shuttle's so
//! the scheduler can interleave threads at every lock. Each scenario runs a standalone limiter
//! (no timer task, no tokio runtime) on a fake clock, with acquire futures driven on shuttle
//! threads, and checks that no permit leaks, that queued waiters still get their permit when
//! the waiter ahead of them gives up, and that an independent witness never sees more holders
//! than the limit.
//!
//! Run with `cargo test -p floodgate --features shuttle --test shuttle_schedules`.

#![allow(clippy::unwrap_used)]

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

const ITERATIONS: usize = 3_000;
const PCT_ITERATIONS: usize = 1_000;
const PCT_DEPTH: usize = 3;

/// How the raced waiter of one scenario run ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Path {
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

const PATHS: [Path; 5] = [
    Path::SawGrant,
    Path::GrantedUnawares,
    Path::Cancelled,
    Path::TimedOut,
    Path::NeverQueued,
];

/// How often each path was taken across the iterations of one test (plain std atomics:
/// bookkeeping outside the schedules under test).
#[derive(Default)]
struct Tally([AtomicU64; 5]);

impl Tally {
    fn record(&self, path: Path) {
        let i = PATHS.iter().position(|p| *p == path).unwrap();
        self.0[i].fetch_add(1, Ordering::Relaxed);
    }

    fn count(&self, path: Path) -> u64 {
        let i = PATHS.iter().position(|p| *p == path).unwrap();
        self.0[i].load(Ordering::Relaxed)
    }
}

/// Runs `scenario` under shuttle's random scheduler, or under PCT when `pct` is set, and
/// checks that the schedules explored reached every path in `expected` (so the races under
/// test really happened, not just the easy orders).
fn explore(scenario: fn() -> Path, pct: bool, expected: &[Path]) {
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
struct FakeClock(Arc<AtomicU64>);

impl FakeClock {
    fn advance(&self, by: Duration) {
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

type Backend = MemoryLimiter<FakeClock>;
type AcquireFuture = Pin<Box<dyn Future<Output = Result<Grant, AcquireError>> + Send>>;

fn limiter(limit: u32, clock: &FakeClock) -> Backend {
    let spec = LimiterSpec::concurrency(limit)
        .with_default_lease(Duration::from_secs(300))
        .with_max_wait(Duration::from_secs(60));
    MemoryLimiter::standalone(LimiterName::new("shuttle").unwrap(), spec, clock.clone(), 1).unwrap()
}

fn request(permits: u32, wait: Duration) -> AcquireOptions {
    AcquireOptions::new().permits(permits).wait(wait)
}

/// An acquire as an owned future, so it can be polled by hand, moved to a thread and dropped.
fn acquire(limiter: &Backend, req: AcquireOptions) -> AcquireFuture {
    let limiter = limiter.clone();
    Box::pin(async move { limiter.acquire(req).await })
}

struct NoopWake;

impl Wake for NoopWake {
    fn wake(self: Arc<Self>) {}
}

/// Polls once with a waker that does nothing (the caller polls again or drops the future).
fn poll_once(fut: &mut AcquireFuture) -> Poll<Result<Grant, AcquireError>> {
    let waker = Waker::from(Arc::new(NoopWake));
    let mut cx = Context::from_waker(&waker);
    fut.as_mut().poll(&mut cx)
}

fn status(limiter: &Backend) -> LimiterStatus {
    block_on(limiter.status()).unwrap()
}

/// A random number below `n` from shuttle's scheduler-controlled generator, so a failing
/// schedule replays with the same choices.
fn random_below(n: u64) -> u64 {
    shuttle::rand::thread_rng().next_u64() % n
}

fn yield_randomly(max: u64) {
    for _ in 0..random_below(max + 1) {
        thread::yield_now();
    }
}

/// Counts holders from outside the limiter; every update is a shuttle scheduling point.
struct Witness {
    limit: i64,
    held: shuttle::sync::atomic::AtomicI64,
}

impl Witness {
    fn new(limit: u32) -> Arc<Witness> {
        Arc::new(Witness {
            limit: i64::from(limit),
            held: shuttle::sync::atomic::AtomicI64::new(0),
        })
    }

    fn enter(&self, permits: u32) {
        let permits = i64::from(permits);
        let now = self.held.fetch_add(permits, Ordering::SeqCst) + permits;
        assert!(
            now <= self.limit,
            "{now} permits held at once; the limit is {}",
            self.limit
        );
    }

    fn leave(&self, permits: u32) {
        self.held.fetch_sub(i64::from(permits), Ordering::SeqCst);
    }

    /// Counts a fresh grant, lets others run, then un-counts and releases it.
    fn hold_then_release(&self, limiter: &Backend, grant: &Grant) {
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
enum Seen {
    /// A poll returned the grant (held and released).
    Grant,
    /// A poll returned a wait timeout.
    Timeout,
    /// Dropped the future after polling it this many times without an outcome.
    Dropped { polls: u64 },
}

/// Polls an acquire by hand 0, 1 or 2 times at random points (so it may be granted without
/// knowing it), then drops it. A grant seen while polling is held and released.
fn poll_randomly_then_drop(
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

fn assert_settled(limiter: &Backend) -> Counters {
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
fn classify(c: &Counters, seen: Seen, others: u64, queued: bool) -> Path {
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

/// (a) Limit 1: one holder releases while two other threads wait; one of them gives up at a
/// random point (before its first poll, while queued, or after it was granted unawares).
fn holder_releases_while_one_waiter_cancels() -> Path {
    let clock = FakeClock::default();
    let limiter = limiter(1, &clock);
    let witness = Witness::new(1);

    let held = block_on(limiter.acquire(request(1, Duration::ZERO))).unwrap();
    witness.enter(1);

    let holder = {
        let (limiter, witness) = (limiter.clone(), Arc::clone(&witness));
        thread::spawn(move || {
            yield_randomly(3);
            witness.leave(1);
            assert!(block_on(limiter.release(held.token)).unwrap());
        })
    };
    let waiter = {
        let (limiter, witness) = (limiter.clone(), Arc::clone(&witness));
        thread::spawn(move || {
            let grant = block_on(limiter.acquire(request(1, Duration::from_secs(60))))
                .expect("the waiter that stayed must get the permit");
            witness.hold_then_release(&limiter, &grant);
        })
    };
    let canceller = {
        let (limiter, witness) = (limiter.clone(), Arc::clone(&witness));
        thread::spawn(move || {
            let fut = acquire(&limiter, request(1, Duration::from_secs(60)));
            poll_randomly_then_drop(fut, &limiter, &witness, false)
        })
    };

    holder.join().unwrap();
    waiter.join().unwrap();
    let seen = canceller.join().unwrap();

    let c = assert_settled(&limiter);
    assert_eq!(c.expired, 0, "no lease ends in this scenario: {c:?}");
    assert_eq!(c.timed_out, 0, "{c:?}");
    // The first holder and the waiter that stayed.
    classify(&c, seen, 2, false)
}

/// (b) A grant racing a cancel: the head waiter's future is dropped while a release hands it the
/// permit. Whatever the order, the permit must go on to the next waiter.
fn grant_races_cancel_of_head_waiter() -> Path {
    let clock = FakeClock::default();
    let limiter = limiter(1, &clock);
    let witness = Witness::new(1);

    let held = block_on(limiter.acquire(request(1, Duration::ZERO))).unwrap();
    witness.enter(1);
    // Queue order fixed up front: `head` first, then `next`.
    let mut head = acquire(&limiter, request(1, Duration::from_secs(60)));
    assert!(poll_once(&mut head).is_pending());
    let mut next = acquire(&limiter, request(1, Duration::from_secs(60)));
    assert!(poll_once(&mut next).is_pending());
    assert_eq!(status(&limiter).waiting, 2);

    let releaser = {
        let (limiter, witness) = (limiter.clone(), Arc::clone(&witness));
        thread::spawn(move || {
            yield_randomly(2);
            witness.leave(1);
            assert!(block_on(limiter.release(held.token)).unwrap());
        })
    };
    let canceller = {
        let (limiter, witness) = (limiter.clone(), Arc::clone(&witness));
        thread::spawn(move || poll_randomly_then_drop(head, &limiter, &witness, false))
    };
    let next_waiter = {
        let (limiter, witness) = (limiter.clone(), Arc::clone(&witness));
        thread::spawn(move || {
            let grant = block_on(next).expect("the next waiter must get the permit");
            witness.hold_then_release(&limiter, &grant);
            grant
        })
    };

    releaser.join().unwrap();
    let seen = canceller.join().unwrap();
    let next_grant = next_waiter.join().unwrap();

    let c = assert_settled(&limiter);
    assert_eq!(c.expired, 0, "no lease ends in this scenario: {c:?}");
    assert_eq!(c.timed_out, 0, "{c:?}");
    assert!(next_grant.token > held.token);
    classify(&c, seen, 2, true)
}

/// (c) Head-of-line: limit 2, one permit held, a waiter for 2 ahead of a waiter for 1. The big
/// waiter gives up at a random point while the holder releases: the small one must get its
/// permit either way, and the witness never sees more than 2.
fn cancelled_head_unblocks_smaller_request_behind_it() -> Path {
    let clock = FakeClock::default();
    let limiter = limiter(2, &clock);
    let witness = Witness::new(2);

    let held = block_on(limiter.acquire(request(1, Duration::ZERO))).unwrap();
    witness.enter(1);
    let mut big = acquire(&limiter, request(2, Duration::from_secs(60)));
    assert!(poll_once(&mut big).is_pending());
    let mut small = acquire(&limiter, request(1, Duration::from_secs(60)));
    assert!(
        poll_once(&mut small).is_pending(),
        "FIFO: nobody passes the head"
    );

    let releaser = {
        let (limiter, witness) = (limiter.clone(), Arc::clone(&witness));
        thread::spawn(move || {
            yield_randomly(3);
            witness.leave(1);
            assert!(block_on(limiter.release(held.token)).unwrap());
        })
    };
    let canceller = {
        let (limiter, witness) = (limiter.clone(), Arc::clone(&witness));
        thread::spawn(move || {
            let seen = poll_randomly_then_drop(big, &limiter, &witness, false);
            // However it ended, the big waiter is gone and at least one permit is free, so the
            // small one behind it has been granted (cancelling the head must move the queue).
            let s = status(&limiter);
            assert_eq!(
                s.waiting, 0,
                "the small waiter is stuck behind a gone head: {s:?}"
            );
            seen
        })
    };
    let small_waiter = {
        let (limiter, witness) = (limiter.clone(), Arc::clone(&witness));
        thread::spawn(move || {
            let grant = block_on(small).expect("the small waiter must get its permit");
            assert_eq!(grant.permits, 1);
            witness.hold_then_release(&limiter, &grant);
        })
    };

    releaser.join().unwrap();
    let seen = canceller.join().unwrap();
    small_waiter.join().unwrap();

    let c = assert_settled(&limiter);
    assert_eq!(c.expired, 0, "no lease ends in this scenario: {c:?}");
    assert_eq!(c.timed_out, 0, "{c:?}");
    classify(&c, seen, 2, true)
}

/// (d) Three-way race on the head waiter: its wait ends (the clock moves past its deadline),
/// the holder releases, and the waiter drops its future, in any order. Whichever wins, the
/// waiter behind it gets the permit and nothing leaks.
fn timeout_grant_and_cancel_race() -> Path {
    let clock = FakeClock::default();
    let limiter = limiter(1, &clock);
    let witness = Witness::new(1);

    let held = block_on(limiter.acquire(request(1, Duration::ZERO))).unwrap();
    witness.enter(1);
    let mut head = acquire(&limiter, request(1, Duration::from_millis(10)));
    assert!(poll_once(&mut head).is_pending());
    let mut next = acquire(&limiter, request(1, Duration::from_secs(60)));
    assert!(poll_once(&mut next).is_pending());

    let ticker = {
        let clock = clock.clone();
        thread::spawn(move || {
            yield_randomly(3);
            clock.advance(Duration::from_millis(20));
        })
    };
    let releaser = {
        let (limiter, witness) = (limiter.clone(), Arc::clone(&witness));
        thread::spawn(move || {
            yield_randomly(3);
            witness.leave(1);
            assert!(block_on(limiter.release(held.token)).unwrap());
        })
    };
    let canceller = {
        let (limiter, witness) = (limiter.clone(), Arc::clone(&witness));
        thread::spawn(move || poll_randomly_then_drop(head, &limiter, &witness, true))
    };
    let next_waiter = {
        let (limiter, witness) = (limiter.clone(), Arc::clone(&witness));
        thread::spawn(move || {
            let grant = block_on(next).expect("the next waiter must get the permit");
            witness.hold_then_release(&limiter, &grant);
        })
    };

    ticker.join().unwrap();
    releaser.join().unwrap();
    let seen = canceller.join().unwrap();
    next_waiter.join().unwrap();

    let c = assert_settled(&limiter);
    assert_eq!(c.expired, 0, "no lease ends in this scenario: {c:?}");
    classify(&c, seen, 2, true)
}

/// (e) The grant comes from the passage of time: the holder's lease ends (the clock moves past
/// it) while the head waiter drops its future. The drop's own time advance may be what grants
/// it, in which case the drop must hand the permit on; either way the next waiter gets it.
fn lease_expiry_grant_races_cancel() -> Path {
    let clock = FakeClock::default();
    let limiter = limiter(1, &clock);
    let witness = Witness::new(1);

    let lease = request(1, Duration::ZERO).lease(Duration::from_millis(10));
    let held = block_on(limiter.acquire(lease)).unwrap();
    witness.enter(1);
    let mut head = acquire(&limiter, request(1, Duration::from_secs(60)));
    assert!(poll_once(&mut head).is_pending());
    let mut next = acquire(&limiter, request(1, Duration::from_secs(60)));
    assert!(poll_once(&mut next).is_pending());

    let ticker = {
        let (limiter, witness, clock) = (limiter.clone(), Arc::clone(&witness), clock.clone());
        thread::spawn(move || {
            yield_randomly(3);
            // The holder stops counting itself before its lease ends.
            witness.leave(1);
            clock.advance(Duration::from_millis(20));
            yield_randomly(2);
            // Expired (whoever noticed first): nothing to release, and it is never revived.
            assert!(!block_on(limiter.release(held.token)).unwrap());
        })
    };
    let canceller = {
        let (limiter, witness) = (limiter.clone(), Arc::clone(&witness));
        thread::spawn(move || poll_randomly_then_drop(head, &limiter, &witness, false))
    };
    let next_waiter = {
        let (limiter, witness) = (limiter.clone(), Arc::clone(&witness));
        thread::spawn(move || {
            let grant = block_on(next).expect("the next waiter must get the permit");
            witness.hold_then_release(&limiter, &grant);
        })
    };

    ticker.join().unwrap();
    let seen = canceller.join().unwrap();
    next_waiter.join().unwrap();

    let c = assert_settled(&limiter);
    assert_eq!(c.expired, 1, "{c:?}");
    assert_eq!(c.timed_out, 0, "{c:?}");
    classify(&c, seen, 2, true)
}

use Path::{Cancelled, GrantedUnawares, NeverQueued, SawGrant, TimedOut};

#[test]
fn random_holder_releases_while_one_waiter_cancels() {
    let all = [SawGrant, GrantedUnawares, Cancelled, NeverQueued];
    explore(holder_releases_while_one_waiter_cancels, false, &all);
}

#[test]
fn pct_holder_releases_while_one_waiter_cancels() {
    explore(
        holder_releases_while_one_waiter_cancels,
        true,
        &[SawGrant, GrantedUnawares, Cancelled, NeverQueued],
    );
}

#[test]
fn random_grant_races_cancel_of_head_waiter() {
    let all = [SawGrant, GrantedUnawares, Cancelled];
    explore(grant_races_cancel_of_head_waiter, false, &all);
}

#[test]
fn pct_grant_races_cancel_of_head_waiter() {
    explore(
        grant_races_cancel_of_head_waiter,
        true,
        &[SawGrant, GrantedUnawares, Cancelled],
    );
}

#[test]
fn random_cancelled_head_unblocks_smaller_request_behind_it() {
    let all = [SawGrant, GrantedUnawares, Cancelled];
    explore(
        cancelled_head_unblocks_smaller_request_behind_it,
        false,
        &all,
    );
}

#[test]
fn pct_cancelled_head_unblocks_smaller_request_behind_it() {
    explore(
        cancelled_head_unblocks_smaller_request_behind_it,
        true,
        &[SawGrant, GrantedUnawares, Cancelled],
    );
}

#[test]
fn random_timeout_grant_and_cancel_race() {
    let all = [SawGrant, GrantedUnawares, Cancelled, TimedOut];
    explore(timeout_grant_and_cancel_race, false, &all);
}

#[test]
fn pct_timeout_grant_and_cancel_race() {
    explore(
        timeout_grant_and_cancel_race,
        true,
        &[SawGrant, GrantedUnawares, Cancelled, TimedOut],
    );
}

#[test]
fn random_lease_expiry_grant_races_cancel() {
    let all = [SawGrant, GrantedUnawares, Cancelled];
    explore(lease_expiry_grant_races_cancel, false, &all);
}

#[test]
fn pct_lease_expiry_grant_races_cancel() {
    explore(
        lease_expiry_grant_races_cancel,
        true,
        &[SawGrant, GrantedUnawares, Cancelled],
    );
}
