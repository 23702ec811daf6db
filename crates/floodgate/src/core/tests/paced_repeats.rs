//! A repeated idempotent acquire of a rate-only limiter: its grant holds nothing, so its
//! request id is remembered for the default lease (see `core/paced.rs`).

use std::time::Duration;

use super::*;
use crate::spec::RateSpec;

fn paced(burst: u32) -> LimiterCore {
    // One token per 10 s; default lease (the retention) 30 s.
    let spec = LimiterSpec::rate(RateSpec::per(1, Duration::from_secs(10)).with_burst(burst))
        .with_default_lease(Duration::from_secs(30));
    LimiterCore::new(spec, 1).expect("valid spec")
}

fn with_id(permits: u32, id: &str) -> AcquireRequest {
    AcquireRequest {
        permits,
        request_id: Some(Arc::from(id)),
        wait: Some(Duration::ZERO),
        ..AcquireRequest::default()
    }
}

#[test]
fn a_retry_within_retention_gets_the_same_grant_and_takes_nothing() {
    let mut c = paced(1);
    let mut fx = Effects::default();
    let first = granted(c.acquire(t(0), &with_id(1, "job"), &mut fx));
    // Burst 1 and no token back yet: a second grant would be refused; the retry is not.
    let again = granted(c.acquire(t(1_000), &with_id(1, "job"), &mut fx));
    assert_eq!(again.token, first.token);
    assert_eq!(again.granted_at, first.granted_at);
    assert_eq!(again.permits, 1);
    assert_eq!(c.counters().granted, 1);
    assert_eq!(c.counters().paced, 1);
    // Another id is a new acquire, refused by the rate.
    assert!(matches!(
        c.acquire(t(1_000), &with_id(1, "other"), &mut fx),
        Admission::Refused(Refusal::WaitTimeout { .. })
    ));
    // Other permits under the same id: refused by name, the grant left alone.
    assert!(matches!(
        c.acquire(t(2_000), &with_id(2, "job"), &mut fx),
        Admission::Refused(Refusal::Invalid(_))
    ));
    let last = granted(c.acquire(t(29_999), &with_id(1, "job"), &mut fx));
    assert_eq!(last.token, first.token);
}

#[test]
fn after_retention_the_id_names_a_new_acquire() {
    let mut c = paced(1);
    let mut fx = Effects::default();
    let first = granted(c.acquire(t(0), &with_id(1, "job"), &mut fx));
    let later = granted(c.acquire(t(30_000), &with_id(1, "job"), &mut fx));
    assert!(later.token > first.token);
    assert_eq!(c.counters().granted, 2);
}

#[test]
fn memory_is_bounded_by_the_grants_of_one_retention_window() {
    let mut c = paced(1);
    let mut fx = Effects::default();
    for i in 0..100u64 {
        let _ = granted(c.acquire(t(i * 10_000), &with_id(1, &format!("j{i}")), &mut fx));
    }
    // 30 s retention, one grant per 10 s: the three latest (and at most one on the edge).
    assert!(c.paced.len() <= 4, "{}", c.paced.len());
}

#[test]
fn a_snapshot_keeps_the_remembered_ids_and_an_older_one_loads_without_them() {
    let mut c = paced(1);
    let mut fx = Effects::default();
    let first = granted(c.acquire(t(0), &with_id(1, "job"), &mut fx));
    let state = c.to_state();
    assert_eq!(state.paced.len(), 1);
    let mut back = LimiterCore::from_state(&state).expect("loads");
    let again = granted(back.acquire(t(1_000), &with_id(1, "job"), &mut fx));
    assert_eq!(again.token, first.token);
    // A snapshot written before the field existed: no `paced` key at all.
    let mut json = serde_json::to_value(&state).expect("serializes");
    json.as_object_mut().expect("an object").remove("paced");
    let old: CoreState = serde_json::from_value(json).expect("an older snapshot loads");
    assert!(old.paced.is_empty());
    assert!(LimiterCore::from_state(&old).is_ok());
}
