//! The uncontended acquire, decided without a queue: what a store answers synchronously, before
//! building any wait (no listener, no future), when nobody waits and the permits fit.

use std::time::Duration;

use super::{AcquireRequest, Admission, Effects, Grant, LimiterCore};
use crate::spec::{MAX_LEASE, MIN_LEASE};
use crate::types::Timestamp;

impl LimiterCore {
    /// Decides an acquire that cannot queue: `Some` (granted or refused) exactly as
    /// [`acquire`](Self::acquire) would answer it, when it carries no idempotency key and
    /// either it only tries once (a wait under the clock's resolution: never queued) or nobody
    /// is queued, the permits fit now and no rate or learning window can hold it back. `None`,
    /// having changed nothing but the passage of time (which every operation applies first),
    /// when `acquire` might queue it: the caller then takes the general path.
    ///
    /// FIFO holds: the queue is looked at in the same step that grants, so an arrival never
    /// overtakes a queued waiter.
    #[inline]
    pub fn acquire_at_once(
        &mut self,
        now: Timestamp,
        req: &AcquireRequest,
        fx: &mut Effects,
    ) -> Option<Admission> {
        self.advance(now, fx);
        if let Some(grant) = self.plain_grant(now, req) {
            return Some(Admission::Granted(grant));
        }
        self.decide_at_once(now, req)
    }

    /// [`acquire_at_once`](Self::acquire_at_once) once time is applied and
    /// [`plain_grant`](Self::plain_grant) declined: the general rules, where they decide at once.
    pub(crate) fn decide_at_once(
        &mut self,
        now: Timestamp,
        req: &AcquireRequest,
    ) -> Option<Admission> {
        let try_once = req.wait.is_some_and(|w| w < Duration::from_micros(1));
        let at_once = req.request_id.is_none()
            && (try_once
                || (self.spec.rate.is_none()
                    && self.learning_until.is_none()
                    && self.queue.is_empty()
                    && self.fits(req.permits)));
        // Time is applied and without a request id it is no repeat: the rest of `acquire`
        // validates, counts and grants, the one place the rules live.
        if !at_once {
            return None;
        }
        Some(self.admit(now, req))
    }

    /// The uncontended grant of a plain concurrency limiter, once time is applied: what
    /// `admit` decides when nothing can refuse, queue or pace it (no request id, no rate, no
    /// learning window, nobody queued, valid permits that fit, a lease in range), without
    /// `admit`'s checks taken one by one. `None` (nothing changed) otherwise. Time must be
    /// applied first ([`advance`](Self::advance) to `now`). A store calls it directly so the
    /// grant reaches its caller as a plain struct, not inside an `Admission` copied around.
    #[inline]
    pub(crate) fn plain_grant(&mut self, now: Timestamp, req: &AcquireRequest) -> Option<Grant> {
        let lease = req.lease.unwrap_or(self.spec.default_lease);
        let plain = req.request_id.is_none()
            && req.permits > 0
            && self.spec.rate.is_none()
            && self.spec.concurrency.is_some()
            && self.learning_until.is_none()
            && self.queue.is_empty()
            // With a limit, fitting also keeps the permits under the cap `admit` checks.
            && self.limit.is_some()
            && self.fits(req.permits)
            && (MIN_LEASE..=MAX_LEASE).contains(&lease);
        if !plain {
            return None;
        }
        // Not through `bool::then`: its closure was not inlined, and the grant it returned
        // was copied out field by field into wider moves (a store-forwarding stall).
        Some(self.grant(now, req.permits, lease, now, req.holder.clone(), None))
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use proptest::prelude::*;

    use super::*;
    use crate::spec::{LimiterSpec, RateSpec};
    use crate::types::FencingToken;

    #[derive(Debug, Clone)]
    enum Op {
        /// An acquire of this many permits with this wait (ms); `true`: through `acquire_at_once`.
        Acquire(u32, u64, bool),
        /// Release the held grant at this index (mod the count).
        Release(usize),
        /// Let this much time pass (ms).
        Sleep(u64),
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            5 => (0u32..4, prop_oneof![Just(0u64), 1u64..30], any::<bool>())
                .prop_map(|(p, w, f)| Op::Acquire(p, w, f)),
            3 => (0usize..16).prop_map(Op::Release),
            1 => (0u64..40).prop_map(Op::Sleep),
        ]
    }

    fn req(permits: u32, wait_ms: u64) -> AcquireRequest {
        AcquireRequest {
            permits,
            lease: Some(Duration::from_millis(50)),
            wait: Some(Duration::from_millis(wait_ms)),
            holder: None,
            request_id: None,
        }
    }

    proptest! {
        /// The fast path answers as the general path does: two cores fed the same operations,
        /// one taking `acquire_at_once` where asked (falling back to `acquire` on `None`), end
        /// every step in the same state, and `None` only ever comes when `acquire` queues.
        #[test]
        fn answers_as_acquire_would(
            ops in proptest::collection::vec(op(), 1..120),
            rated in any::<bool>(),
        ) {
            // With a rate too, only a try-once is decided at once.
            let spec = if rated {
                LimiterSpec::concurrency(3).with_rate(RateSpec::per(100, Duration::from_secs(1)).with_burst(2))
            } else {
                LimiterSpec::concurrency(3)
            };
            let mut plain = LimiterCore::new(spec.clone(), 1).expect("valid spec");
            let mut fast = LimiterCore::new(spec, 1).expect("valid spec");
            let mut held: Vec<FencingToken> = Vec::new();
            let mut now = 0u64;
            for op in ops {
                let (mut fa, mut fb) = (Effects::default(), Effects::default());
                let t = Timestamp(now);
                match op {
                    Op::Acquire(permits, wait, through_fast) => {
                        let r = req(permits, wait);
                        let a = plain.acquire(t, &r, &mut fa);
                        let b = if through_fast {
                            match fast.acquire_at_once(t, &r, &mut fb) {
                                Some(b) => b,
                                None => {
                                    let b = fast.acquire(t, &r, &mut fb);
                                    // Declined only where it might queue: a try-once is
                                    // always decided; without a rate, no grant is declined.
                                    prop_assert!(
                                        r.wait != Some(Duration::ZERO)
                                            && (rated || !matches!(b, Admission::Granted(_))),
                                        "declined an acquire decided at once: {b:?}"
                                    );
                                    b
                                }
                            }
                        } else {
                            fast.acquire(t, &r, &mut fb)
                        };
                        prop_assert_eq!(format!("{a:?}"), format!("{b:?}"));
                        if let Admission::Granted(g) = a {
                            held.push(g.token);
                        }
                    }
                    Op::Release(i) if !held.is_empty() => {
                        let token = held.remove(i % held.len());
                        prop_assert_eq!(
                            plain.release(t, token, &mut fa),
                            fast.release(t, token, &mut fb)
                        );
                    }
                    Op::Release(_) => {}
                    Op::Sleep(ms) => now += ms * 1000,
                }
                for (id, outcome) in &fa.wakes {
                    if let Ok(g) = outcome {
                        held.push(g.token);
                    }
                    let _ = id;
                }
                prop_assert_eq!(format!("{:?}", fa.wakes), format!("{:?}", fb.wakes));
                prop_assert_eq!(plain.counters(), fast.counters());
                prop_assert_eq!(plain.in_use(), fast.in_use());
                prop_assert_eq!(plain.waiting(), fast.waiting());
                prop_assert_eq!(plain.next_token(), fast.next_token());
            }
        }
    }
}
