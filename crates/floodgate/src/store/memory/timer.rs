//! The timer task of one embedded limiter.
//!
//! Sleeps until the state machine's nearest deadline, applies the passage of time (reclaiming
//! expired leases, answering timed-out waiters, granting what that frees) and sleeps again. It
//! is poked only when a new deadline is earlier than the one it sleeps for, and holds the
//! limiter weakly, so it ends when the limiter is deleted or dropped.

use std::sync::{Arc, PoisonError, Weak};

use super::limiter::{MemoryLimiter, Shared};
use crate::clock::Clock;
use crate::core::Effects;

pub(super) fn spawn<C: Clock>(limiter: &MemoryLimiter<C>) {
    let weak = Arc::downgrade(limiter.shared());
    let notify = Arc::clone(&limiter.shared().timer);
    tokio::spawn(async move {
        loop {
            let notified = notify.notified();
            tokio::pin!(notified);
            // Registers interest before looking at the state, so a poke that lands between the
            // look and the sleep is not lost.
            notified.as_mut().enable();
            let Some((at, clock)) = pass(&weak) else {
                return;
            };
            match at {
                Some(at) => {
                    tokio::select! {
                        _ = tokio::time::sleep_until(clock.instant_at(at)) => {}
                        _ = &mut notified => {}
                    }
                }
                None => notified.await,
            }
        }
    });
}

/// One pass: advance time, deliver wake-ups, and say when to look again. `None` once the
/// limiter is gone or closed.
fn pass<C: Clock>(weak: &Weak<Shared<C>>) -> Option<(Option<crate::types::Timestamp>, C)> {
    let shared = weak.upgrade()?;
    let mut state = shared.state.lock().unwrap_or_else(PoisonError::into_inner);
    if state.closed {
        return None;
    }
    let now = shared.clock.now();
    let mut fx = Effects::default();
    state.advance_logged(now, &mut fx);
    state.settle(now, fx);
    let next = state.next_deadline_any();
    state.set_timer(next);
    Some((next, shared.clock.clone()))
}
