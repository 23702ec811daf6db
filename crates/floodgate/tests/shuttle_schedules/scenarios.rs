//! The five raced scenarios; each returns the path its giving-up waiter took.

use std::sync::Arc;
use std::time::Duration;

use shuttle::future::block_on;
use shuttle::thread;

use floodgate::LimiterBackend;

use crate::harness::{
    acquire, assert_settled, classify, limiter, poll_once, poll_randomly_then_drop, request,
    status, yield_randomly, FakeClock, Path, Witness,
};

/// (a) Limit 1: one holder releases while two other threads wait; one of them gives up at a
/// random point (before its first poll, while queued, or after it was granted unawares).
pub(crate) fn holder_releases_while_one_waiter_cancels() -> Path {
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
pub(crate) fn grant_races_cancel_of_head_waiter() -> Path {
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
pub(crate) fn cancelled_head_unblocks_smaller_request_behind_it() -> Path {
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
pub(crate) fn timeout_grant_and_cancel_race() -> Path {
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
pub(crate) fn lease_expiry_grant_races_cancel() -> Path {
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
