//! A repeated idempotent acquire must ask for what its first attempt asked for.

use super::*;

fn with_id(permits: u32, id: &str) -> AcquireRequest {
    AcquireRequest {
        permits,
        request_id: Some(Arc::from(id)),
        ..AcquireRequest::default()
    }
}

fn invalid_field(a: &Admission) -> Option<&'static str> {
    match a {
        Admission::Refused(Refusal::Invalid(f)) => Some(f.field),
        _ => None,
    }
}

#[test]
fn a_repeat_asking_for_other_permits_is_refused_and_leaves_the_grant_alone() {
    let mut c = core(4);
    let mut fx = Effects::default();
    let first = granted(c.acquire(t(0), &with_id(1, "job"), &mut fx));
    // Same key, three permits: before, it got the one-permit grant back, and a caller that
    // trusted its own request ran three-wide on a permit of one.
    let again = c.acquire(t(1), &with_id(3, "job"), &mut fx);
    assert_eq!(invalid_field(&again), Some("request_id"), "{again:?}");
    assert_eq!(c.in_use(), 1);
    assert_eq!(c.counters().rejected, 1);
    // The matching retry still gets the grant.
    let same = granted(c.acquire(t(2), &with_id(1, "job"), &mut fx));
    assert_eq!(same.token, first.token);
    assert_eq!(c.in_use(), 1);
}

#[test]
fn a_repeat_asking_for_other_permits_does_not_join_the_wait() {
    let mut c = core(2);
    let mut fx = Effects::default();
    let _held = granted(c.acquire(t(0), &req(2), &mut fx));
    let w = queued(c.acquire(t(0), &with_id(2, "job"), &mut fx));
    let again = c.acquire(t(1), &with_id(1, "job"), &mut fx);
    assert_eq!(invalid_field(&again), Some("request_id"), "{again:?}");
    // The first attempt still waits, with its own deadline (5 s), for its two permits.
    assert!(c.is_queued(w));
    assert_eq!(c.next_deadline(), Some(t(5_000)));
    assert_eq!(c.waiting(), 1);
}
