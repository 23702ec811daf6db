//! Keyed `schedule` reservations given back: the total's and the key's tokens together, only
//! the unstarted tail, unknown and repeated ids answered with 0, the key kept while its
//! reservation can still be given back, and kept across a snapshot.

use std::time::Duration;

use super::super::*;
use crate::core::{AcquireRequest, Admission, Effects};

fn ms(n: u64) -> Timestamp {
    Timestamp(n * 1_000)
}

/// A total of 10/s and 5/s per key (burst 1 each), per-key concurrency 10.
fn limiter() -> (LimiterCore, KeyLayer) {
    let total = RateSpec::per(10, Duration::from_secs(1)).with_burst(1);
    let each = RateSpec::per(5, Duration::from_secs(1)).with_burst(1);
    let spec = LimiterSpec::rate(total).with_max_wait(Duration::from_secs(60));
    KeyLayer::new(spec, KeyedSpec::per_key(10).with_rate(each), 1).expect("valid")
}

fn try_acquire(total: &mut LimiterCore, layer: &mut KeyLayer, now: Timestamp, key: &str) -> bool {
    let req = AcquireRequest {
        wait: Some(Duration::ZERO),
        ..AcquireRequest::default()
    };
    let mut fx = Effects::default();
    matches!(
        layer.acquire(total, now, key, &req, &mut fx),
        Admission::Granted(_)
    )
}

#[test]
fn the_unstarted_tail_goes_back_to_the_total_and_the_key() {
    let (mut total, mut layer) = limiter();
    let mut fx = Effects::default();
    let offsets = layer
        .schedule(&mut total, ms(0), "a", 5, 7, &mut fx)
        .expect("fits");
    // The key's 5/s paces them 200 ms apart.
    let want: Vec<Duration> = (0..5).map(|i| Duration::from_millis(200 * i)).collect();
    assert_eq!(offsets, want);
    // Held back by the reservation: another key by the total's rate, this key by its own.
    assert!(!try_acquire(&mut total, &mut layer, ms(100), "b"));
    assert_eq!(layer.reservation_count(), 1);
    // At 300 ms two tokens (0, 200) have started; the other three go back.
    assert_eq!(layer.unschedule(&mut total, ms(300), 7, 10, &mut fx), Ok(3));
    assert_eq!(
        layer.unschedule(&mut total, ms(300), 7, 10, &mut fx),
        Ok(0),
        "idempotent"
    );
    assert_eq!(
        layer.reservation_count(),
        1,
        "kept (its started tokens) until the key idles"
    );
    // The total's debt ends at 300 ms again, the key's at 400 ms.
    assert!(try_acquire(&mut total, &mut layer, ms(300), "b"));
    assert!(!try_acquire(&mut total, &mut layer, ms(399), "a"));
    assert!(try_acquire(&mut total, &mut layer, ms(400), "a"));
}

#[test]
fn only_a_tail_nothing_was_taken_after_goes_back() {
    let (mut total, mut layer) = limiter();
    let mut fx = Effects::default();
    layer
        .schedule(&mut total, ms(0), "a", 3, 7, &mut fx)
        .expect("fits");
    // Another key's schedule takes the total's next tokens: a's is no longer the tail.
    layer
        .schedule(&mut total, ms(0), "b", 1, 8, &mut fx)
        .expect("fits");
    assert_eq!(layer.unschedule(&mut total, ms(0), 7, 3, &mut fx), Ok(0));
    // b's is: it goes back, and then a's is the tail again.
    assert_eq!(layer.unschedule(&mut total, ms(0), 8, 1, &mut fx), Ok(1));
    assert_eq!(layer.unschedule(&mut total, ms(0), 7, 1, &mut fx), Ok(1));
    // A later reservation of the same key supersedes its earlier one.
    layer
        .schedule(&mut total, ms(0), "a", 1, 9, &mut fx)
        .expect("fits");
    assert_eq!(layer.unschedule(&mut total, ms(0), 7, 1, &mut fx), Ok(0));
    assert_eq!(
        layer.unschedule(&mut total, ms(0), 12345, 1, &mut fx),
        Ok(0)
    );
    assert_eq!(
        layer
            .unschedule(&mut total, ms(0), 9, 0, &mut fx)
            .map_err(|e| e.field),
        Err("count")
    );
}

#[test]
fn no_rate_anywhere_has_no_reservations() {
    let spec = LimiterSpec::default().with_max_wait(Duration::from_secs(1));
    let (mut total, mut layer) = KeyLayer::new(spec, KeyedSpec::per_key(2), 1).expect("valid");
    let mut fx = Effects::default();
    assert_eq!(
        layer
            .unschedule(&mut total, ms(0), 1, 1, &mut fx)
            .map_err(|e| e.field),
        Err("reservation")
    );
}

#[test]
fn a_key_with_a_reservation_is_kept_until_its_last_token_starts() {
    // The total's rate only: the key itself owes nothing, only the reservation keeps it.
    let rate = RateSpec::per(10, Duration::from_secs(1)).with_burst(1);
    let spec = LimiterSpec::rate(rate).with_max_wait(Duration::from_secs(60));
    let (mut total, mut layer) = KeyLayer::new(spec, KeyedSpec::per_key(10), 1).expect("valid");
    let mut fx = Effects::default();
    layer
        .schedule(&mut total, ms(0), "a", 4, 7, &mut fx)
        .expect("fits");
    assert_eq!(layer.key_count(), 1, "kept for its reservation");
    layer.advance(&mut total, ms(299), &mut fx);
    assert_eq!(layer.key_count(), 1);
    assert_eq!(layer.unschedule(&mut total, ms(250), 7, 4, &mut fx), Ok(1));
    layer.advance(&mut total, ms(300), &mut fx);
    assert_eq!(layer.key_count(), 0, "idle once its last token started");
    assert_eq!(layer.reservation_count(), 0);
    assert_eq!(layer.unschedule(&mut total, ms(300), 7, 4, &mut fx), Ok(0));
}

#[test]
fn a_snapshot_keeps_reservations() {
    let (mut total, mut layer) = limiter();
    let mut fx = Effects::default();
    layer
        .schedule(&mut total, ms(0), "a", 5, 7, &mut fx)
        .expect("fits");
    let mut copy = KeyLayer::from_state(&layer.to_state()).expect("restores");
    let mut copy_total = total.clone();
    assert_eq!(copy.to_state(), layer.to_state());
    assert_eq!(copy.reservation_count(), 1);
    assert_eq!(
        copy.unschedule(&mut copy_total, ms(300), 7, 10, &mut fx),
        Ok(3)
    );
    assert_eq!(layer.unschedule(&mut total, ms(300), 7, 10, &mut fx), Ok(3));
}
