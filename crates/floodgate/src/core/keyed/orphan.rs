//! An idempotent keyed wait whose caller went away: kept for a retry to join, as a plain one
//! is (`core/idempotency.rs`).

use std::cmp::Reverse;
use std::time::Duration;

use super::KeyLayer;
use crate::core::WaiterId;
use crate::types::Timestamp;

impl KeyLayer {
    /// As [`LimiterCore::orphan`](crate::core::LimiterCore::orphan), for a waiter in its key's
    /// queue: the caller of a queued idempotent acquire went away, so its wait is kept for
    /// `grace` (at most its own deadline), in its place, for a retry with the same request id
    /// to join ([`acquire`](Self::acquire) finds it by the id), then times out. A grant made
    /// meanwhile goes to nobody, and the store gives it back. `false` if the waiter is not
    /// queued or has no request id (cancel it instead).
    pub fn orphan(&mut self, now: Timestamp, waiter: WaiterId, grace: Duration) -> bool {
        let Some(w) = self
            .waiter_key
            .get(&waiter.0)
            .and_then(|name| self.keys.get_mut(name))
            .and_then(|k| k.queue.get_mut(&waiter.0))
        else {
            return false;
        };
        let Some(moved) = w.orphan(now, grace) else {
            return false;
        };
        if moved {
            // The entry at the old deadline is stale from now on (`peek_wait` skips it).
            self.waits.push(Reverse((w.deadline, waiter.0)));
        }
        true
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use std::sync::Arc;
    use std::time::Duration;

    use crate::core::keyed::{KeyLayer, KeyedSpec};
    use crate::core::{AcquireRequest, Admission, Effects, LimiterCore, Refusal, WaiterId};
    use crate::spec::LimiterSpec;
    use crate::types::Timestamp;

    fn req(id: Option<&str>) -> AcquireRequest {
        AcquireRequest {
            permits: 1,
            wait: Some(Duration::from_secs(60)),
            request_id: id.map(Arc::from),
            ..AcquireRequest::default()
        }
    }

    fn queued(a: Admission) -> WaiterId {
        match a {
            Admission::Queued(id) => id,
            other => panic!("not queued: {other:?}"),
        }
    }

    const GRACE: Duration = Duration::from_secs(5);

    /// A limit of one, taken: the acquires below queue for key `k`.
    fn full() -> (LimiterCore, KeyLayer, Timestamp) {
        let spec = LimiterSpec::concurrency(1);
        let keyed = KeyedSpec::per_key(1);
        let (mut total, mut layer) = KeyLayer::new(spec, keyed, 1).unwrap();
        let t0 = Timestamp(1_000_000);
        let mut fx = Effects::default();
        let held = layer.acquire(&mut total, t0, "k", &req(None), &mut fx);
        assert!(matches!(held, Admission::Granted(_)), "{held:?}");
        (total, layer, t0)
    }

    #[test]
    fn a_retry_within_the_grace_joins_the_orphaned_wait_in_its_place() {
        let (mut total, mut layer, t0) = full();
        let mut fx = Effects::default();
        let first = queued(layer.acquire(&mut total, t0, "k", &req(Some("job-1")), &mut fx));
        let behind = queued(layer.acquire(&mut total, t0, "k", &req(None), &mut fx));
        assert!(layer.orphan(t0, first, GRACE));
        // Within the grace the retry finds the same wait, still ahead of `behind`.
        let t1 = Timestamp(t0.0 + 4_000_000);
        let again = layer.acquire(&mut total, t1, "k", &req(Some("job-1")), &mut fx);
        assert_eq!(queued(again), first);
        assert!(layer.is_queued(first) && layer.is_queued(behind));
        // The joined wait lasts as long as the retry asks: not ended by the grace.
        layer.advance(&mut total, Timestamp(t0.0 + 6_000_000), &mut fx);
        assert!(fx.wakes.is_empty(), "{:?}", fx.wakes);
        assert!(layer.is_queued(first));
    }

    #[test]
    fn an_orphaned_wait_nobody_joins_ends_at_the_grace() {
        let (mut total, mut layer, t0) = full();
        let mut fx = Effects::default();
        let first = queued(layer.acquire(&mut total, t0, "k", &req(Some("job-2")), &mut fx));
        assert!(layer.orphan(t0, first, GRACE));
        assert_eq!(layer.next_deadline(&mut total), Some(t0.after(GRACE)));
        layer.advance(&mut total, t0.after(GRACE), &mut fx);
        assert!(matches!(
            fx.wakes.as_slice(),
            [(id, Err(Refusal::WaitTimeout { .. }))] if *id == first
        ));
        assert!(!layer.is_queued(first));
        // Its request id is free again: a later acquire with it is a new one.
        let mut fx = Effects::default();
        let later = layer.acquire(
            &mut total,
            t0.after(GRACE),
            "k",
            &req(Some("job-2")),
            &mut fx,
        );
        assert_ne!(queued(later), first);
    }

    #[test]
    fn only_a_queued_idempotent_wait_is_orphaned() {
        let (mut total, mut layer, t0) = full();
        let mut fx = Effects::default();
        let plain = queued(layer.acquire(&mut total, t0, "k", &req(None), &mut fx));
        assert!(
            !layer.orphan(t0, plain, GRACE),
            "no request id: cancelled instead"
        );
        assert!(!layer.orphan(t0, WaiterId(9_999), GRACE), "not queued");
        // A wait shorter than the grace keeps its own deadline.
        let short = AcquireRequest {
            wait: Some(Duration::from_secs(1)),
            ..req(Some("job-3"))
        };
        let id = queued(layer.acquire(&mut total, t0, "k", &short, &mut fx));
        assert!(layer.orphan(t0, id, GRACE));
        layer.advance(&mut total, t0.after(Duration::from_secs(1)), &mut fx);
        assert!(!layer.is_queued(id));
    }
}
