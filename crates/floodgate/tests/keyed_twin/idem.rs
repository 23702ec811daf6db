//! The keyed twin's idempotent mode (h-kidem17): what it tracks, callers going away from
//! idempotent waits (the core's `orphan` against the Redis store's `abandon`), and its test.
//! A child of `keyed_twin.rs`, whose `Twin` it drives.

use std::collections::HashMap;
use std::time::Duration;

use floodgate::core::{Admission, Effects, WaiterId};
use floodgate::FencingToken;

use super::{run_case, support, sync_waiters, Rng, Twin};

/// What the idempotent mode tracks across steps.
#[derive(Default)]
pub(super) struct Idem {
    /// Core token -> script token of every grant so far: a repeat must give the same pair.
    pub(super) tokens: HashMap<u64, String>,
    /// Script token -> core token, to catch a repeat on the script side only.
    pub(super) back: HashMap<String, u64>,
    /// Per request id, the key and permits of its latest acquire (a retry asks the same).
    pub(super) last: HashMap<&'static str, (&'static str, u32)>,
    /// How often each case was reached, for the coverage assertion.
    pub(super) seen: Coverage,
    /// Core ids of waits a repeat joined (a cancel of one counts as a joiner's cancel).
    pub(super) joined: std::collections::HashSet<u64>,
    /// Orphaned waits the Redis store gives up at their grace's end (`cancel` `abandon`):
    /// when, the waiter key, the attempt that owned it when its caller went away, and
    /// whether a retry claimed it since (joined the wait or got its grant).
    pub(super) abandons: Vec<(u64, String, String, bool)>,
    /// Waiter keys the script's abandon decided: dropped (`None`; the core's grace ends them,
    /// a timeout, by the moment given), or handed back an outcome nobody else reads (`Some`).
    pub(super) dropped: Vec<(String, Option<String>, u64)>,
}

impl Idem {
    /// A retry joined the wait of `waiter` or got its grant: an abandon pending for it must
    /// keep them.
    pub(super) fn claim(&mut self, waiter: &str) {
        for a in self.abandons.iter_mut().filter(|a| a.1 == waiter) {
            a.3 = true;
        }
    }
}

/// Counts of the idempotent cases the sequences reached (asserted non-zero).
#[derive(Default, Debug, Clone, Copy)]
pub(super) struct Coverage {
    /// Repeats that joined a queued wait.
    pub(super) joins: u64,
    /// Repeats answered with the grant their first attempt holds (or a remembered paced one).
    pub(super) held: u64,
    /// Acquires under an id whose earlier grant or wait had ended: a new acquire.
    pub(super) renewed: u64,
    /// Repeats refused for asking other permits or naming another key.
    pub(super) mismatched: u64,
    /// Cancels of a wait some repeat had joined.
    pub(super) joined_cancels: u64,
    /// Orphaned waits (caller gone) a retry claimed within the grace (`kept`).
    pub(super) claimed: u64,
    /// Orphaned waits nobody claimed, ended at the grace's end.
    pub(super) abandoned: u64,
    /// Orphaned waits granted meanwhile, given back at the grace's end.
    pub(super) given_back: u64,
}

impl Coverage {
    pub(super) fn add(&mut self, o: Coverage) {
        self.joins += o.joins;
        self.held += o.held;
        self.renewed += o.renewed;
        self.mismatched += o.mismatched;
        self.joined_cancels += o.joined_cancels;
        self.claimed += o.claimed;
        self.abandoned += o.abandoned;
        self.given_back += o.given_back;
    }
}

/// The request ids the idempotent mode draws from: small, so repeats are common.
pub(super) const IDS: [&str; 3] = ["j1", "j2", "j3"];

/// The waiter key the Redis store derives from a request id (`r` + hex).
pub(super) fn hex_key(id: &str) -> String {
    let hex: String = id.bytes().map(|b| format!("{b:02x}")).collect();
    format!("r{hex}")
}

impl Twin {
    /// Idempotent mode: the caller of queued idempotent waiter `id` went away. The core keeps
    /// the wait `grace` (at most its own deadline) for a retry, then times it out
    /// (`KeyLayer::orphan`); the Redis store leaves it queued and asks the script to give it
    /// up at the grace's end unless a retry claimed it since (`cancel` `abandon` with the
    /// attempt that owned it), which [`abandon_until`](Self::abandon_until) does.
    pub(super) fn orphan(&mut self, id: u64, grace: u64) {
        let waiter = self.queued[&id].clone();
        self.log
            .push(format!("{} orphan {waiter} grace {grace}", self.now));
        let now = self.t();
        if !self
            .layer
            .orphan(now, WaiterId(id), Duration::from_micros(grace))
        {
            self.fail(format!("orphan: the core does not keep {waiter}"));
        }
        let attempt: Option<String> = redis::cmd("HGET")
            .arg(&self.keys[1])
            .arg(format!("a:{waiter}"))
            .query(&mut self.conn)
            .unwrap();
        let Some(attempt) = attempt else {
            self.fail(format!("orphan: the script names no attempt of {waiter}"))
        };
        let at = self.now + grace;
        if let Some(idem) = &mut self.idem {
            idem.abandons.push((at, waiter, attempt, false));
        }
        self.compare_state();
    }

    /// The Redis store's abandons due by `to`, each at its moment, before the time step
    /// (the core's advance ends the same waits at the same moments).
    pub(super) fn abandon_until(&mut self, to: u64) {
        let Some(idem) = &mut self.idem else {
            return;
        };
        idem.abandons.sort();
        let due = idem.abandons.partition_point(|a| a.0 <= to);
        let due: Vec<_> = idem.abandons.drain(..due).collect();
        // Abandons due at one moment go together: the core's advance to it ends every wait
        // kept until then at once.
        let mut rest = due.as_slice();
        while let Some(&(at, ..)) = rest.first() {
            let n = rest.iter().take_while(|a| a.0 == at).count();
            let (group, after) = rest.split_at(n);
            rest = after;
            // Both sides as of the grace's end: the core's advance, the script's own in
            // `cancel`. (Graces end off the round numbers every other moment falls on: at a
            // tie, the core orders the wait's end among that moment's other events, a key's
            // token time first, a departed head's grant after, while the store's timer comes
            // after all of the script's; a tie of timers to the microsecond, not a rule.)
            // Up to then, the moments either side has something to do at, as a store's timer
            // wakes it: a grant due before the grace's end is made then, not left for the
            // abandon (one long step would judge it only at the grace's end, after the wait
            // ended on the core, and before it on the script, whose wait lasts on).
            while let Some(d) = self.layer.next_deadline(&mut self.total) {
                if d.0 >= at || d.0 <= self.now {
                    break;
                }
                sync_waiters(self);
                self.now = d.0;
                self.log.push(format!("{} timer", self.now));
                let mut fx = Effects::default();
                let now = self.t();
                self.layer.advance(&mut self.total, now, &mut fx);
                self.call("advance", &[]);
                self.compare_decisions(fx);
            }
            sync_waiters(self);
            self.now = at.max(self.now);
            let mut fx = Effects::default();
            let now = self.t();
            self.layer.advance(&mut self.total, now, &mut fx);
            let mut given_back: Vec<(Vec<String>, String, bool)> = Vec::new();
            for (_, waiter, attempt, claimed) in group.iter().cloned() {
                self.log
                    .push(format!("{} abandon {waiter} {attempt}", self.now));
                let reply = self.call("cancel", &[waiter.clone(), "abandon".into(), attempt]);
                self.log.push(format!("   -> {reply:?}"));
                // A retry claimed it: its wait may not be given up (nor its grant: below).
                if claimed && reply[0] == "cancelled" {
                    self.fail(format!(
                        "abandon: {waiter}, claimed by a retry, given up: {reply:?}"
                    ));
                }
                let Some(idem) = &mut self.idem else {
                    return;
                };
                match reply[0].as_str() {
                    "cancelled" => {
                        idem.dropped.push((waiter, None, at));
                        idem.seen.abandoned += 1;
                    }
                    "kept" => idem.seen.claimed += 1,
                    "decided" if reply[1].starts_with("G|") => {
                        idem.dropped
                            .push((waiter.clone(), Some(reply[1].clone()), at));
                        given_back.push((reply, waiter, claimed));
                    }
                    "decided" => idem.dropped.push((waiter, Some(reply[1].clone()), at)),
                    _ => {}
                }
            }
            self.compare_decisions(fx);
            for (reply, waiter, claimed) in given_back {
                self.give_back(&reply, &waiter, claimed);
            }
        }
    }

    /// A grant made while nobody waited for it, handed to the store's abandon: given back
    /// (released) on both sides.
    fn give_back(&mut self, reply: &[String], waiter: &str, claimed: bool) {
        let st = reply[1].split('|').nth(1).unwrap_or_default().to_owned();
        let known = self.idem.as_mut().and_then(|idem| {
            idem.seen.given_back += 1;
            idem.back.get(&st).copied()
        });
        let Some(ct) = known else {
            self.fail(format!("abandon: a grant the core never made ({reply:?})"));
        };
        self.held.retain(|(t, _)| t.0 != ct);
        let mut fx = Effects::default();
        let now = self.t();
        let c = self
            .layer
            .release(&mut self.total, now, FencingToken(ct), &mut fx);
        let reply = self.call("release", &[st]);
        if c != (reply[1] == "1") {
            self.fail(format!("abandon's release: core {c}, script {reply:?}"));
        }
        // (A grant already ended, or a paced one, has nothing to give back: the outcome of a
        // lapsed lease, or a later attempt's paced grant made in this very call, may be
        // handed to an abandon; releasing it does nothing.)
        if claimed && c {
            self.fail(format!(
                "abandon: {waiter}, claimed by a retry, its grant given back"
            ));
        }
        self.compare_decisions(fx);
    }

    /// Idempotent mode: records a grant's token pair; `Ok(false)` for a repeat (the same pair
    /// as before), an error when only one side repeated a grant. Always new otherwise.
    pub(super) fn map_token(&mut self, core: u64, script: &str) -> Result<bool, String> {
        let Some(idem) = &mut self.idem else {
            return Ok(true);
        };
        match (idem.tokens.get(&core), idem.back.get(script)) {
            (None, None) => {
                idem.tokens.insert(core, script.to_owned());
                idem.back.insert(script.to_owned(), core);
                Ok(true)
            }
            (Some(s), Some(c)) if s == script && *c == core => Ok(false),
            (s, c) => Err(format!(
                "grant core {core} (before: script {s:?}), script {script} (before: core {c:?}): \
                 one side repeated a grant the other made anew"
            )),
        }
    }

    /// Counts a retry of an id whose grant or wait had ended: a new acquire on both sides.
    pub(super) fn renewed(&mut self, answer: &Admission) {
        if let (Some(idem), Admission::Granted(_) | Admission::Queued(_)) = (&mut self.idem, answer)
        {
            idem.seen.renewed += 1;
        }
    }
}

/// Seeds of the idempotent mode that found a disagreement once (kept as regression cases).
const IDEM_REGRESSIONS: [u64; 8] = [
    // A retry joining with a wait of 0: its wait due at once, ended by the script's status
    // (which applies the time) but not by the core's (the twin now advances it first).
    234_582_428,
    // A paced grant made from a queue to a wait whose caller went away: its token was never
    // mapped (only held grants' were), so its abandon's give-back named no core grant.
    30_643_463,
    // An abandon pending while the core's next moment is another kept wait's grace end.
    542_360_860,
    // Graces ending on a round moment, tied with a key's token time or a grant: the core
    // orders the end among that moment's events, the store's timer after all of them (the
    // twin's graces now end off the round numbers).
    283_041_761,
    2_327_003,
    // A claimed grant's lease lapsed before the abandon, which got its old outcome: releasing
    // it frees nothing, no give-up.
    344_129_430,
    // Two kept waits' graces ending at one moment: the core's advance to it ends both, the
    // script's abandons come one by one (the twin now compares after both).
    693_544_491,
    // A grant due inside one long step that ended at a grace's end: the core ended the wait
    // first, the script (whose wait lasts on) granted it; the twin now steps through the
    // moments either side has something to do at, as a store's timer does.
    214_174_843,
];

/// Fixed seeds run every time, before the random ones: the coverage assertion counts these
/// only, so it cannot fail by chance (34 and 40 give back grants made to waits whose caller
/// went away).
fn idem_fixed() -> Vec<u64> {
    (1..25).chain([34, 40]).collect()
}

/// The same sequences with request ids (h-kidem17): acquires carry ids from a small pool, so
/// retries join queued waits, get held (or remembered paced) grants, start anew once what
/// their id named ended, or are refused naming `request_id` (other permits, another key);
/// cancels end joined waits, and callers go away from idempotent waits (kept for a retry to
/// claim within a grace, then given up: `KeyLayer::orphan` against the Redis store's
/// `cancel` `abandon`). Every grant's token pair is recorded: a retry must get the same pair
/// on both sides. A case's seed is its number (the spec's kind, learning windows and changes
/// follow it) and its draws. The regression seeds and [`idem_fixed`] run every time, then
/// `FLOODGATE_KEYED_IDEM_CASES` (default 8) from a printed random base;
/// `FLOODGATE_KEYED_IDEM_SEED` replays one seed alone.
#[test]
fn idempotent_keyed_acquires_agree() {
    let server = support::RedisServer::start();
    let env = |name: &str| std::env::var(name).ok().and_then(|s| s.parse::<u64>().ok());
    let (seeds, random): (Vec<u64>, Vec<u64>) = match env("FLOODGATE_KEYED_IDEM_SEED") {
        Some(seed) => (Vec::new(), vec![seed]),
        None => {
            let base = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos() as u64
                % 1_000_000_000
                + 1_000;
            let cases = env("FLOODGATE_KEYED_IDEM_CASES").unwrap_or(8);
            eprintln!(
                "keyed idempotent twin: random seeds {base}..{} (FLOODGATE_KEYED_IDEM_SEED \
                 replays one)",
                base + cases
            );
            (
                IDEM_REGRESSIONS.into_iter().chain(idem_fixed()).collect(),
                (base..base + cases).collect(),
            )
        }
    };
    let mut seen = Coverage::default();
    for &seed in seeds.iter().chain(&random) {
        let mut rng = Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15));
        let twin = run_case(&server, seed, &mut rng, true);
        if let Some(idem) = twin.idem.as_ref().filter(|_| idem_fixed().contains(&seed)) {
            seen.add(idem.seen);
        }
    }
    eprintln!(
        "{} cases; the fixed ones reached: {seen:?}",
        seeds.len() + random.len()
    );
    if !seeds.is_empty() {
        assert!(
            seen.joins > 0
                && seen.held > 0
                && seen.renewed > 0
                && seen.mismatched > 0
                && seen.joined_cancels > 0
                && seen.claimed > 0
                && seen.abandoned > 0
                && seen.given_back > 0,
            "the sequences miss a case: {seen:?}"
        );
    }
}
