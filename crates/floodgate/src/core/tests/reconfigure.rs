//! Reconfiguring a live limiter: the limit raised and lowered, the adaptive range, the rate's
//! debt, and validation that changes nothing on error.

use super::*;

#[test]
fn raising_the_limit_grants_waiters_at_once() {
    let mut c = core(1);
    let mut fx = Effects::default();
    granted(c.acquire(t(0), &req(1), &mut fx));
    let a = queued(c.acquire(t(0), &req(1), &mut fx));
    let b = queued(c.acquire(t(0), &req(1), &mut fx));
    let spec = LimiterSpec {
        concurrency: Some(3),
        ..c.spec().clone()
    };
    c.reconfigure(t(1), spec, &mut fx).expect("valid");
    assert_eq!(granted_ids(&fx), vec![a, b]);
    assert_eq!(c.in_use(), 3);
}

#[test]
fn lowering_the_limit_lets_holders_finish_and_grants_nothing_until_below() {
    let mut c = core(3);
    let mut fx = Effects::default();
    let g: Vec<Grant> = (0..3)
        .map(|_| granted(c.acquire(t(0), &req(1), &mut fx)))
        .collect();
    let w = queued(c.acquire(t(0), &req(1), &mut fx));
    let spec = LimiterSpec {
        concurrency: Some(1),
        ..c.spec().clone()
    };
    c.reconfigure(t(1), spec, &mut fx).expect("valid");
    assert_eq!(c.in_use(), 3, "holders keep their permits");
    c.release(t(2), g[0].token, &mut fx);
    c.release(t(2), g[1].token, &mut fx);
    assert!(fx.is_empty(), "in use 1 is not below the limit of 1");
    c.release(t(2), g[2].token, &mut fx);
    assert_eq!(granted_ids(&fx), vec![w]);
    assert_eq!(c.in_use(), 1);
}

#[test]
fn lowering_the_limit_below_a_waiters_request_refuses_it() {
    let mut c = core(3);
    let mut fx = Effects::default();
    granted(c.acquire(t(0), &req(3), &mut fx));
    let big = queued(c.acquire(t(0), &req(3), &mut fx));
    let spec = LimiterSpec {
        concurrency: Some(2),
        ..c.spec().clone()
    };
    c.reconfigure(t(1), spec, &mut fx).expect("valid");
    assert_eq!(
        fx.wakes,
        vec![(
            big,
            Err(Refusal::PermitsExceedLimit {
                requested: 3,
                limit: 2
            })
        )]
    );
    assert_eq!(c.waiting(), 0);
}

#[test]
fn reconfigure_validates_and_changes_nothing_on_error() {
    let mut c = core(3);
    let mut fx = Effects::default();
    let bad = LimiterSpec {
        concurrency: Some(0),
        ..c.spec().clone()
    };
    assert_eq!(
        c.reconfigure(t(0), bad, &mut fx).map_err(|e| e.field),
        Err("concurrency")
    );
    assert_eq!(c.spec().concurrency, Some(3));
}

#[test]
fn reapplying_a_spec_keeps_the_learned_adaptive_limit() {
    use crate::spec::AdaptiveSpec;
    let spec = LimiterSpec::concurrency(10).with_adaptive(AdaptiveSpec::between(1, 10));
    let mut c = LimiterCore::new(spec.clone(), 1).expect("valid");
    let mut fx = Effects::default();
    c.feedback(t(0), Feedback::Throttled, &mut fx);
    assert_eq!(
        c.status(&LimiterName::new("a").expect("name")).limit,
        Some(7)
    );
    // The same spec again, or another lease: the learned limit stays.
    c.reconfigure(
        t(1),
        spec.clone().with_default_lease(Duration::from_secs(9)),
        &mut fx,
    )
    .expect("valid");
    assert_eq!(
        c.status(&LimiterName::new("a").expect("name")).limit,
        Some(7)
    );
    // A new concurrency resets it.
    c.reconfigure(
        t(2),
        LimiterSpec::concurrency(8).with_adaptive(AdaptiveSpec::between(1, 10)),
        &mut fx,
    )
    .expect("valid");
    assert_eq!(
        c.status(&LimiterName::new("a").expect("name")).limit,
        Some(8)
    );
}

#[test]
fn a_request_above_a_lowered_adaptive_limit_is_refused_not_left_blocking() {
    use crate::spec::AdaptiveSpec;
    let spec = LimiterSpec::concurrency(4).with_adaptive(AdaptiveSpec::between(1, 4));
    let mut c = LimiterCore::new(spec, 1).expect("valid");
    let mut fx = Effects::default();
    granted(c.acquire(t(0), &req(2), &mut fx));
    granted(c.acquire(t(0), &req(2), &mut fx));
    let big = queued(c.acquire(t(0), &req(3), &mut fx));
    c.feedback(t(1), Feedback::Throttled, &mut fx); // limit 4 -> 2
    assert_eq!(
        fx.wakes,
        vec![(
            big,
            Err(Refusal::PermitsExceedLimit {
                requested: 3,
                limit: 2
            })
        )]
    );
    assert!(matches!(
        c.acquire(t(1), &req(3), &mut fx),
        Admission::Refused(Refusal::PermitsExceedLimit {
            requested: 3,
            limit: 2
        })
    ));
}

#[test]
fn raising_the_rate_rescales_the_debt_of_the_old_one() {
    use crate::spec::RateSpec;
    let hourly = LimiterSpec::rate(RateSpec::per(1, Duration::from_secs(3600)));
    let mut c = LimiterCore::new(hourly, 1).expect("valid");
    let mut fx = Effects::default();
    granted(c.acquire(t(0), &req(1), &mut fx));
    let fast = LimiterSpec::rate(RateSpec::per(1000, Duration::from_secs(1)));
    c.reconfigure(t(1_000), fast, &mut fx).expect("valid");
    // An hour of debt under the old rate is about a millisecond under the new one.
    let once = AcquireRequest {
        wait: Some(Duration::from_millis(5)),
        ..req(1)
    };
    assert!(!matches!(
        c.acquire(t(1_000), &once, &mut fx),
        Admission::Refused(_)
    ));
}

#[test]
fn a_schedule_more_than_a_year_ahead_is_refused_and_changes_nothing() {
    use crate::spec::RateSpec;
    let daily = LimiterSpec::rate(RateSpec::per(1, Duration::from_secs(24 * 3600)));
    let mut c = LimiterCore::new(daily, 1).expect("valid");
    let mut fx = Effects::default();
    assert_eq!(
        c.schedule(t(0), 400, 1, &mut fx).map_err(|e| e.field),
        Err("count")
    );
    // Nothing was reserved: the next token is still free now.
    assert!(matches!(
        c.acquire(t(0), &req(1), &mut fx),
        Admission::Granted(_)
    ));
}
