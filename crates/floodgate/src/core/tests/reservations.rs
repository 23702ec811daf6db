//! Reservations of a paced limiter: unused time given back, and kept across a rate change.

use super::*;

fn paced(per_second: u32) -> LimiterCore {
    use crate::spec::RateSpec;
    let spec = LimiterSpec::rate(RateSpec::per(per_second, Duration::from_secs(1)))
        .with_max_wait(Duration::from_secs(60));
    LimiterCore::new(spec, 1).expect("valid")
}

#[test]
fn unused_reservations_go_back_and_a_waiter_gets_their_time() {
    let mut c = paced(10); // one token per 100 ms, burst 1
    let mut fx = Effects::default();
    let offsets = c.schedule(t(0), 10, 7, &mut fx).expect("fits");
    assert_eq!(offsets.last(), Some(&Duration::from_millis(900)));
    // An acquire now waits behind all ten.
    let w = queued(c.acquire(t(0), &req(1), &mut fx));
    assert_eq!(c.next_deadline(), Some(t(1_000)));
    // The producer enqueued only 4: the last 6 go back, and the waiter's token is at 400 ms.
    assert_eq!(c.unschedule(t(0), 7, 6, &mut fx), Ok(6));
    assert_eq!(c.next_deadline(), Some(t(400)));
    c.advance(t(400), &mut fx);
    assert_eq!(granted_ids(&fx), vec![w]);
}

#[test]
fn only_the_latest_unstarted_tail_of_a_reservation_goes_back() {
    let mut fx = Effects::default();
    let mut c = paced(10);
    c.schedule(t(0), 10, 7, &mut fx).expect("fits");
    // Another id gives back nothing; neither do tokens whose start has come (0..=500 ms).
    assert_eq!(c.unschedule(t(0), 8, 5, &mut fx), Ok(0));
    assert_eq!(c.unschedule(t(550), 7, 10, &mut fx), Ok(4));
    // What went back cannot go back twice.
    assert_eq!(c.unschedule(t(550), 7, 10, &mut fx), Ok(0));
    // A later reservation supersedes the earlier one.
    let mut c = paced(10);
    c.schedule(t(0), 10, 7, &mut fx).expect("fits");
    c.schedule(t(0), 1, 9, &mut fx).expect("fits");
    assert_eq!(c.unschedule(t(0), 7, 5, &mut fx), Ok(0));
    assert_eq!(c.unschedule(t(0), 9, 5, &mut fx), Ok(1));
}

#[test]
fn a_rate_change_after_a_reservation_keeps_its_tokens() {
    use crate::spec::RateSpec;
    let mut fx = Effects::default();
    let mut c = paced(10);
    c.schedule(t(0), 10, 7, &mut fx).expect("fits");
    // The debt is rescaled to the new rate, so the reservation's token times moved: giving
    // tokens back by the old times could hand one out twice.
    let faster = LimiterSpec::rate(RateSpec::per(20, Duration::from_secs(1)))
        .with_max_wait(Duration::from_secs(60));
    c.reconfigure(t(0), faster, &mut fx).expect("valid");
    assert_eq!(c.unschedule(t(0), 7, 5, &mut fx), Ok(0));
}

#[test]
fn giving_back_needs_a_rate_and_a_count() {
    let mut fx = Effects::default();
    assert_eq!(
        core(2).unschedule(t(0), 1, 1, &mut fx).map_err(|e| e.field),
        Err("reservation")
    );
    assert_eq!(
        paced(10)
            .unschedule(t(0), 1, 0, &mut fx)
            .map_err(|e| e.field),
        Err("count")
    );
}

#[test]
fn a_burst_change_after_a_reservation_keeps_its_tokens() {
    use crate::spec::RateSpec;
    let mut fx = Effects::default();
    // 1/s with a burst of 10: ten children scheduled now all start now (offsets 0), so all
    // ten tokens are spent the moment the schedule answers.
    let bursty = |burst| {
        LimiterSpec::rate(RateSpec::per(1, Duration::from_secs(1)).with_burst(burst))
            .with_max_wait(Duration::from_secs(60))
    };
    let mut c = LimiterCore::new(bursty(10), 1).expect("valid");
    let offsets = c.schedule(t(0), 10, 7, &mut fx).expect("fits");
    assert!(offsets.iter().all(|d| d.is_zero()), "{offsets:?}");
    // Same interval, smaller burst: `tat` is not rescaled (the debt is the same), but the
    // token times computed with the new burst are not the reservation's. Giving back "future"
    // tokens by the new burst returned 9 spent ones: the rate then granted 19 in 10 s.
    c.reconfigure(t(0), bursty(1), &mut fx).expect("valid");
    assert_eq!(c.unschedule(t(0), 7, 10, &mut fx), Ok(0));
    // The ten spent tokens still hold the rate: the next one is 10 s away.
    match c.acquire(t(0), &req(1), &mut fx) {
        Admission::Queued(_) | Admission::Refused(_) => {}
        other => panic!("granted past ten spent tokens: {other:?}"),
    }
    assert_eq!(c.next_deadline(), Some(t(10_000)));
}
