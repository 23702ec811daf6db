//! One test per rule of the state machine, on plain values and a hand-driven clock.

use super::*;

mod paced_repeats;
mod reconfigure;
mod repeats;
mod reservations;

const MS: u64 = 1_000;

fn t(ms: u64) -> Timestamp {
    Timestamp(ms * MS)
}

fn core(limit: u32) -> LimiterCore {
    let spec = LimiterSpec::concurrency(limit)
        .with_default_lease(Duration::from_secs(10))
        .with_max_wait(Duration::from_secs(5))
        .with_max_queue(3);
    LimiterCore::new(spec, 100).expect("valid spec")
}

fn req(permits: u32) -> AcquireRequest {
    AcquireRequest {
        permits,
        ..AcquireRequest::default()
    }
}

fn granted(a: Admission) -> Grant {
    match a {
        Admission::Granted(g) => g,
        other => panic!("expected a grant, got {other:?}"),
    }
}

fn queued(a: Admission) -> WaiterId {
    match a {
        Admission::Queued(id) => id,
        other => panic!("expected to queue, got {other:?}"),
    }
}

fn granted_ids(fx: &Effects) -> Vec<WaiterId> {
    fx.wakes
        .iter()
        .filter(|(_, o)| o.is_ok())
        .map(|(id, _)| *id)
        .collect()
}

#[test]
fn grants_up_to_the_limit_then_queues() {
    let mut c = core(2);
    let mut fx = Effects::default();
    let a = granted(c.acquire(t(0), &req(1), &mut fx));
    let b = granted(c.acquire(t(0), &req(1), &mut fx));
    assert!(b.token > a.token);
    queued(c.acquire(t(0), &req(1), &mut fx));
    assert_eq!(c.in_use(), 2);
    assert_eq!(c.waiting(), 1);
    assert!(fx.is_empty());
}

#[test]
fn an_arrival_never_overtakes_a_queued_waiter() {
    let mut c = core(3);
    let mut fx = Effects::default();
    let a = granted(c.acquire(t(0), &req(2), &mut fx));
    let head = queued(c.acquire(t(0), &req(2), &mut fx)); // needs 2, only 1 free
                                                          // One permit is free, but the head is queued: a 1-permit arrival must queue behind it.
    let small = queued(c.acquire(t(0), &req(1), &mut fx));
    assert_eq!(c.in_use(), 2);
    assert!(c.release(t(1), a.token, &mut fx));
    assert_eq!(granted_ids(&fx), vec![head, small]);
    assert_eq!(c.in_use(), 3);
}

#[test]
fn a_large_head_request_holds_back_smaller_ones_until_it_fits() {
    let mut c = core(3);
    let mut fx = Effects::default();
    let g: Vec<Grant> = (0..3)
        .map(|_| granted(c.acquire(t(0), &req(1), &mut fx)))
        .collect();
    let big = queued(c.acquire(t(0), &req(3), &mut fx));
    let small = queued(c.acquire(t(0), &req(1), &mut fx));
    assert!(c.release(t(1), g[0].token, &mut fx));
    assert!(c.release(t(1), g[1].token, &mut fx));
    assert!(fx.is_empty(), "nobody may pass the 3-permit head");
    assert!(c.release(t(1), g[2].token, &mut fx));
    assert_eq!(granted_ids(&fx), vec![big]);
    assert_eq!(c.waiting(), 1, "{small:?} still waits");
}

#[test]
fn a_release_wakes_only_the_granted_waiters() {
    let mut c = core(1);
    let mut fx = Effects::default();
    let a = granted(c.acquire(t(0), &req(1), &mut fx));
    let first = queued(c.acquire(t(0), &req(1), &mut fx));
    queued(c.acquire(t(0), &req(1), &mut fx));
    c.release(t(1), a.token, &mut fx);
    assert_eq!(fx.wakes.len(), 1);
    assert_eq!(granted_ids(&fx), vec![first]);
}

#[test]
fn fencing_tokens_strictly_increase_across_direct_and_queued_grants() {
    let mut c = core(1);
    let mut fx = Effects::default();
    let mut last = 0;
    for i in 0..10 {
        let g = match c.acquire(t(i), &req(1), &mut fx) {
            Admission::Granted(g) => g,
            Admission::Queued(_) => continue,
            other => panic!("{other:?}"),
        };
        assert!(g.token.0 > last);
        last = g.token.0;
        queued(c.acquire(t(i), &req(1), &mut fx));
        c.release(t(i), g.token, &mut fx);
        let wakes = std::mem::take(&mut fx.wakes);
        for (_, o) in wakes {
            let g = o.expect("granted");
            assert!(g.token.0 > last);
            last = g.token.0;
            c.release(t(i), g.token, &mut fx);
        }
    }
}

#[test]
fn try_once_refuses_with_a_retry_hint_instead_of_queueing() {
    let mut c = core(1);
    let mut fx = Effects::default();
    let a = granted(c.acquire(t(0), &req(1), &mut fx));
    let once = AcquireRequest {
        wait: Some(Duration::ZERO),
        ..req(1)
    };
    match c.acquire(t(0), &once, &mut fx) {
        Admission::Refused(Refusal::WaitTimeout { retry_after }) => {
            // No hold history yet: a guess of one round, not the whole 10 s lease.
            assert_eq!(retry_after, NO_HISTORY_ROUND);
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(c.waiting(), 0);
    c.release(t(2_000), a.token, &mut fx);
    granted(c.acquire(t(2_000), &req(1), &mut fx));
    match c.acquire(t(2_000), &once, &mut fx) {
        // Now the typical hold (2 s) is known.
        Admission::Refused(Refusal::WaitTimeout { retry_after }) => {
            assert_eq!(retry_after, Duration::from_secs(2));
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(c.counters().timed_out, 2);
}

/// Before any release, the hint guesses a round per `NO_HISTORY_ROUND`, times the rounds
/// queued ahead, but never past the nearest lease end (then certainly free).
#[test]
fn without_hold_history_the_hint_is_a_round_guess_capped_by_the_nearest_lease_end() {
    let mut c = core(1);
    let mut fx = Effects::default();
    granted(c.acquire(t(0), &req(1), &mut fx));
    queued(c.acquire(t(0), &req(1), &mut fx));
    queued(c.acquire(t(0), &req(1), &mut fx));
    let once = AcquireRequest {
        wait: Some(Duration::ZERO),
        ..req(1)
    };
    // Three permits ahead with a limit of 1: three rounds.
    match c.acquire(t(0), &once, &mut fx) {
        Admission::Refused(Refusal::WaitTimeout { retry_after }) => {
            assert_eq!(retry_after, NO_HISTORY_ROUND * 3);
        }
        other => panic!("{other:?}"),
    }
    // 9.5 s later the lease ends in 0.5 s: sooner than the guess.
    match c.acquire(t(9_500), &once, &mut fx) {
        Admission::Refused(Refusal::WaitTimeout { retry_after }) => {
            assert_eq!(retry_after, Duration::from_millis(500));
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn every_wait_is_bounded_by_max_wait_and_times_out_with_an_answer() {
    let mut c = core(1);
    let mut fx = Effects::default();
    granted(c.acquire(t(0), &req(1), &mut fx));
    let long = AcquireRequest {
        wait: Some(Duration::from_secs(3600)),
        ..req(1)
    };
    let id = queued(c.acquire(t(0), &long, &mut fx));
    assert_eq!(c.next_deadline(), Some(t(5_000)), "capped at max_wait");
    c.advance(t(4_999), &mut fx);
    assert!(fx.is_empty());
    c.advance(t(5_000), &mut fx);
    assert_eq!(fx.wakes.len(), 1);
    assert_eq!(fx.wakes[0].0, id);
    assert!(matches!(fx.wakes[0].1, Err(Refusal::WaitTimeout { .. })));
    assert_eq!(c.waiting(), 0);
}

#[test]
fn a_full_queue_refuses_at_once() {
    let mut c = core(1);
    let mut fx = Effects::default();
    granted(c.acquire(t(0), &req(1), &mut fx));
    for _ in 0..3 {
        queued(c.acquire(t(0), &req(1), &mut fx));
    }
    assert!(matches!(
        c.acquire(t(0), &req(1), &mut fx),
        Admission::Refused(Refusal::QueueFull { .. })
    ));
    assert_eq!(c.counters().queue_full, 1);
}

#[test]
fn impossible_and_invalid_requests_are_refused_by_name() {
    let mut c = core(2);
    let mut fx = Effects::default();
    assert_eq!(
        c.acquire(t(0), &req(3), &mut fx),
        Admission::Refused(Refusal::PermitsExceedLimit {
            requested: 3,
            limit: 2
        })
    );
    match c.acquire(t(0), &req(0), &mut fx) {
        Admission::Refused(Refusal::Invalid(f)) => assert_eq!(f.field, "permits"),
        other => panic!("{other:?}"),
    }
    let absurd = AcquireRequest {
        lease: Some(Duration::from_secs(10 * 24 * 3600)),
        ..req(1)
    };
    match c.acquire(t(0), &absurd, &mut fx) {
        Admission::Refused(Refusal::Invalid(f)) => assert_eq!(f.field, "lease_ms"),
        other => panic!("{other:?}"),
    }
    assert_eq!(c.in_use(), 0);
}

#[test]
fn extend_moves_the_deadline_and_never_revives() {
    let mut c = core(1);
    let mut fx = Effects::default();
    let g = granted(c.acquire(t(0), &req(1), &mut fx));
    assert_eq!(
        c.extend(t(9_000), g.token, Duration::from_secs(10), &mut fx),
        Ok(Ok(t(19_000)))
    );
    assert!(c.is_held(t(18_999), g.token));
    // Past the deadline: lost, even though no timer has reaped it yet.
    assert_eq!(
        c.extend(t(19_000), g.token, Duration::from_secs(10), &mut fx),
        Ok(Err(Lost))
    );
    assert!(!c.is_held(t(19_000), g.token));
    assert_eq!(c.in_use(), 0);
    assert_eq!(c.counters().extend_lost, 1);
    // A released permit is lost too.
    let h = granted(c.acquire(t(20_000), &req(1), &mut fx));
    assert!(c.release(t(20_000), h.token, &mut fx));
    assert_eq!(
        c.extend(t(20_000), h.token, Duration::from_secs(10), &mut fx),
        Ok(Err(Lost))
    );
    assert_eq!(c.in_use(), 0);
    // An absurd lease is refused by field name, and changes nothing.
    let k = granted(c.acquire(t(20_000), &req(1), &mut fx));
    let err = c.extend(t(20_000), k.token, Duration::ZERO, &mut fx);
    assert_eq!(err.map_err(|e| e.field), Err("lease_ms"));
    assert!(c.is_held(t(20_000), k.token));
}

#[test]
fn release_is_idempotent_and_by_id() {
    let mut c = core(2);
    let mut fx = Effects::default();
    let g = granted(c.acquire(t(0), &req(1), &mut fx));
    let other = granted(c.acquire(t(0), &req(1), &mut fx));
    assert!(c.release(t(1), g.token, &mut fx));
    assert!(!c.release(t(1), g.token, &mut fx), "second release");
    assert!(
        !c.release(t(1), FencingToken(999_999), &mut fx),
        "unknown id"
    );
    assert_eq!(c.in_use(), 1, "the other holder is untouched");
    // An expired permit is not held either, and its release changes nothing.
    assert!(!c.release(t(10_000), other.token, &mut fx));
    assert_eq!(c.in_use(), 0);
    assert_eq!(c.counters().released, 1);
    assert_eq!(c.counters().expired, 1);
}

#[test]
fn lease_expiry_reclaims_the_slot_and_grants_the_next_waiter() {
    let mut c = core(1);
    let mut fx = Effects::default();
    granted(c.acquire(t(0), &req(1), &mut fx));
    let long_wait = AcquireRequest {
        wait: Some(Duration::from_secs(5)),
        ..req(1)
    };
    // Queue at 6 s so that the lease (ending at 10 s) ends before the wait (ending at 11 s).
    let id = queued(c.acquire(t(6_000), &long_wait, &mut fx));
    assert_eq!(c.next_deadline(), Some(t(10_000)));
    c.advance(t(10_000), &mut fx);
    assert_eq!(granted_ids(&fx), vec![id]);
    let g = fx.wakes[0].1.clone().expect("granted");
    assert_eq!(g.waited, Duration::from_secs(4));
    assert_eq!(c.counters().expired, 1);
}

#[test]
fn a_late_timer_processes_deadlines_in_order() {
    // The lease ends at 10 s and the waiter gives up at 11 s. A timer that fires only at
    // 12 s must still grant the waiter, because the permit was free before it gave up.
    let mut c = core(1);
    let mut fx = Effects::default();
    granted(c.acquire(t(0), &req(1), &mut fx));
    let id = queued(c.acquire(t(6_000), &req(1), &mut fx));
    c.advance(t(12_000), &mut fx);
    assert_eq!(granted_ids(&fx), vec![id]);
}

#[test]
fn cancel_leaves_the_queue_and_lets_those_behind_move() {
    let mut c = core(2);
    let mut fx = Effects::default();
    granted(c.acquire(t(0), &req(1), &mut fx));
    let big = queued(c.acquire(t(0), &req(2), &mut fx));
    let small = queued(c.acquire(t(0), &req(1), &mut fx));
    assert!(c.cancel(t(1), big, &mut fx));
    assert_eq!(granted_ids(&fx), vec![small]);
    assert!(!c.cancel(t(1), big, &mut fx), "already gone");
    assert!(!c.cancel(t(1), small, &mut fx), "already granted");
    assert_eq!(c.counters().cancelled, 1);
}

#[test]
fn close_refuses_every_waiter() {
    let mut c = core(1);
    let mut fx = Effects::default();
    granted(c.acquire(t(0), &req(1), &mut fx));
    queued(c.acquire(t(0), &req(1), &mut fx));
    queued(c.acquire(t(0), &req(1), &mut fx));
    c.close(&mut fx);
    assert_eq!(fx.wakes.len(), 2);
    assert!(fx
        .wakes
        .iter()
        .all(|(_, o)| *o == Err(Refusal::LimiterDeleted)));
    assert_eq!(c.waiting(), 0);
}

#[test]
fn permits_are_conserved() {
    let mut c = core(2);
    let mut fx = Effects::default();
    let a = granted(c.acquire(t(0), &req(1), &mut fx));
    granted(c.acquire(t(0), &req(1), &mut fx));
    c.release(t(1), a.token, &mut fx);
    granted(c.acquire(t(1), &req(1), &mut fx));
    c.advance(t(10_000), &mut fx);
    let k = c.counters();
    assert_eq!(k.granted, k.released + k.expired + c.holders.len() as u64);
}

#[test]
fn the_deadline_heaps_stay_small_under_churn() {
    let mut c = core(1);
    let mut fx = Effects::default();
    for i in 0..10_000 {
        let g = granted(c.acquire(t(i), &req(1), &mut fx));
        c.release(t(i), g.token, &mut fx);
    }
    assert!(c.leases.len() <= 2 * c.holders.len() + 65);
}
