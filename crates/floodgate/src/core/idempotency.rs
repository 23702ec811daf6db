//! Idempotent acquires: a repeat with the same `request_id` gets the grant or joins the wait.

use super::*;

impl LimiterCore {
    /// The answer to a repeated idempotent acquire: the grant it got, or its wait to join.
    /// `None` for a first acquire, or when what the key referred to has ended.
    pub(super) fn repeat_of(&mut self, now: Timestamp, req: &AcquireRequest) -> Option<Admission> {
        let key = req.request_id.as_ref()?;
        let Some(found) = self.requests.get(key) else {
            return self.repeat_of_paced(now, key, req.permits);
        };
        match *found {
            RequestRef::Held(token) => {
                let h = self.holders.get(&token)?;
                if h.permits != req.permits {
                    return Some(self.mismatch(h.permits));
                }
                Some(Admission::Granted(Grant {
                    token: FencingToken(token),
                    permits: h.permits,
                    lease: h.lease,
                    lease_deadline: h.deadline,
                    granted_at: h.granted_at,
                    waited: Duration::ZERO,
                }))
            }
            RequestRef::Queued(id) => {
                let first = self.queue.get(&id)?.permits;
                if first != req.permits {
                    return Some(self.mismatch(first));
                }
                // Joined: the wait now lasts as long as this caller asks.
                let wait = req
                    .wait
                    .unwrap_or(self.spec.max_wait)
                    .min(self.spec.max_wait);
                let deadline = now.after(wait);
                let waiter = self.queue.get_mut(&id)?;
                waiter.deadline = deadline;
                self.waits.push(deadline, id);
                self.next_due = self.next_due.min(deadline);
                Some(Admission::Queued(WaiterId(id)))
            }
        }
    }

    /// A repeat of a rate-only grant still remembered (see `paced.rs`): the same grant again,
    /// not counted again, no new tokens taken. Forgotten once the limiter has a concurrency
    /// limit (a `PUT` gave it one): that grant holds no permit, so answering it again would
    /// let its caller work beside the holders of every permit; the repeat asks for one.
    fn repeat_of_paced(&mut self, now: Timestamp, key: &str, permits: u32) -> Option<Admission> {
        if self.spec.concurrency.is_some() {
            return None;
        }
        let g = self.paced.get(now, key)?;
        if g.permits != permits {
            return Some(self.mismatch(g.permits));
        }
        Some(Admission::Granted(Grant {
            token: FencingToken(g.token),
            permits: g.permits,
            lease: Duration::ZERO,
            lease_deadline: g.granted_at,
            granted_at: g.granted_at,
            waited: Duration::ZERO,
        }))
    }

    /// The key of a keyed limiter that the paced grant remembered under `request` went to.
    /// `None` once the limiter has a concurrency limit, as for the grant itself.
    pub(crate) fn paced_key(&self, now: Timestamp, request: &str) -> Option<Arc<str>> {
        if self.spec.concurrency.is_some() {
            return None;
        }
        self.paced.get(now, request)?.key
    }

    /// Records the key of a keyed limiter that a paced grant under `request` went to.
    pub(crate) fn set_paced_key(&mut self, request: &str, key: &Arc<str>) {
        self.paced.set_key(request, key);
    }

    /// The refusal of a repeat that asks for other permits than its first attempt (`first`):
    /// it neither gets that grant (its caller would use more than it holds) nor joins that
    /// wait, which goes on as it was.
    pub(crate) fn mismatch(&mut self, first: u32) -> Admission {
        self.counters.rejected += 1;
        Admission::Refused(Refusal::Invalid(InvalidField::new(
            "request_id",
            format!(
                "already names an acquire of {first} permit(s); a retry must ask for the same \
                 permits (a new acquire needs a new request_id)"
            ),
        )))
    }

    /// The refusal of a keyed repeat naming another key than its first attempt.
    pub(crate) fn key_mismatch(&mut self) -> Admission {
        self.counters.rejected += 1;
        Admission::Refused(Refusal::Invalid(InvalidField::new(
            "request_id",
            "already names an acquire of another key; a retry must name the same key (a new \
             acquire needs a new request_id)",
        )))
    }

    /// The caller of a queued idempotent acquire went away: its wait is kept for `grace` (at
    /// most its own deadline) so that a retry with the same key can join it, then ends. A
    /// grant made meanwhile goes to nobody, and the store gives it back. `false` if the waiter
    /// is not queued or has no key (cancel it instead).
    pub fn orphan(&mut self, now: Timestamp, waiter: WaiterId, grace: Duration) -> bool {
        let Some(w) = self.queue.get_mut(&waiter.0) else {
            return false;
        };
        let Some(moved) = w.orphan(now, grace) else {
            return false;
        };
        if moved {
            self.waits.push(w.deadline, waiter.0);
            self.next_due = self.next_due.min(w.deadline);
        }
        true
    }

    /// Forgets an idempotency key whose grant or wait has ended.
    pub(super) fn forget_request(&mut self, key: Option<&Arc<str>>) {
        if let Some(key) = key {
            self.requests.remove(key);
        }
    }
}
