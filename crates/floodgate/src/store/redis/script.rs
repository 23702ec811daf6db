//! The limiter script as Redis runs it: a prelude of constants and field lists generated from
//! the Rust ones, then the parts of `lua/`. One definition of each: the script never restates a
//! number the core uses, and the status reply's fields are named once, here, for both sides.

use std::fmt::Write as _;
use std::time::Duration;

use crate::core::adaptive;
use crate::core::{HOLD_EWMA_WEIGHT, MAX_SCHEDULE_AHEAD, NO_HISTORY_ROUND};
use crate::spec::{MAX_CONCURRENCY, MAX_LEASE, MAX_QUEUE, MAX_WAIT, MIN_LEASE};

/// How long after its decision an outcome not tied to a held grant (a timeout, a refusal, a
/// rate-only grant, an expired grant) is kept, for a waiter whose wake-up message was lost: it
/// asks when its subscription is back (or fails at once when it drops) and when its own timer
/// ends, at the deadline that timed it out. A grant's outcome is kept while the grant is held.
pub(crate) const OUTCOME_RETENTION: Duration = Duration::from_secs(120);

/// The counters, as the script names them (`c_<name>` in `meta`), in status order.
pub(crate) const COUNTER_FIELDS: &[&str] = &[
    "granted",
    "released",
    "expired",
    "timed_out",
    "cancelled",
    "queue_full",
    "rejected",
    "extend_lost",
    "paced",
    "scheduled",
    "feedback_ok",
    "feedback_throttled",
    "feedback_error",
    "limit_decreases",
    "limit_increases",
    "adopted",
];

/// The status reply's spec and state fields, before the counters.
const STATUS_HEAD: &[&str] = &[
    "concurrency",
    "lease_us",
    "max_wait_us",
    "max_queue",
    "in_use",
    "holders",
    "waiting",
    "waiting_permits",
    "limit",
    "rate_limit",
    "rate_period_us",
    "rate_burst",
    "a_min",
    "a_max",
    "a_inc",
    "a_dec",
    "a_cool_us",
];

/// The status reply's fields after the counters.
const STATUS_TAIL: &[&str] = &["learning", "a_ext"];

/// Every field of the status reply (after its tag), in order: what `status_fields()` in the
/// script emits and `RedisLimiter::parse_status` reads, by name.
#[doc(hidden)]
pub fn status_schema() -> Vec<&'static str> {
    [STATUS_HEAD, COUNTER_FIELDS, STATUS_TAIL].concat()
}

fn micros(d: Duration) -> u128 {
    d.as_micros()
}

fn lua_list(names: &[&str]) -> String {
    let quoted: Vec<String> = names.iter().map(|n| format!("'{n}'")).collect();
    format!("{{{}}}", quoted.join(", "))
}

/// The prelude both scripts open with: the constants and field lists, from the Rust ones.
fn prelude() -> String {
    let mut s = String::from("-- Generated from the Rust constants by store/redis/script.rs.\n");
    let consts = [
        ("MIN_LEASE", micros(MIN_LEASE)),
        ("MAX_LEASE", micros(MAX_LEASE)),
        ("MAX_WAIT", micros(MAX_WAIT)),
        ("MAX_CONCURRENCY", u128::from(MAX_CONCURRENCY)),
        ("MAX_QUEUE", u128::from(MAX_QUEUE)),
        ("MAX_SCHEDULE_AHEAD", micros(MAX_SCHEDULE_AHEAD)),
        ("HOLD_EWMA_WEIGHT", u128::from(HOLD_EWMA_WEIGHT)),
        ("NO_HISTORY_ROUND", micros(NO_HISTORY_ROUND)),
        ("OUTCOME_RETENTION", micros(OUTCOME_RETENTION)),
        (
            "MAX_ADOPTED_TOKEN",
            u128::from(crate::core::MAX_ADOPTED_TOKEN),
        ),
        ("GRADIENT_SHORT_WEIGHT", u128::from(adaptive::SHORT_WEIGHT)),
        ("GRADIENT_LONG_WEIGHT", u128::from(adaptive::LONG_WEIGHT)),
        ("GRADIENT_WARM_UP", u128::from(adaptive::WARM_UP)),
        ("GRADIENT_MAX_BACKOFF", u128::from(adaptive::MAX_BACKOFF)),
        ("GRADIENT_MAX_LATENCY", micros(adaptive::MAX_LATENCY)),
    ];
    for (name, value) in consts {
        let _ = writeln!(s, "local {name} = {value}");
    }
    // A function, not tables: only the general path needs them, and building a table costs
    // every script call that runs past it (the fast paths do not).
    let _ = writeln!(
        s,
        "local function field_lists()\n  local COUNTERS = {}\n  local STATUS = {}\n  return COUNTERS, STATUS\nend",
        lua_list(COUNTER_FIELDS),
        lua_list(&status_schema())
    );
    s
}

/// A limiter's `meta` key (`limiter_keys`' first): whether it exists says whether the limiter
/// does, and its hash tag gives the slot of all the limiter's keys.
pub(crate) fn meta_key(prefix: &str, name: &str) -> String {
    format!("{prefix}:{{{name}}}:meta")
}

/// The keys a plain limiter's script call declares, in the order the script reads them
/// (`KEYS[1..11]`): one list, so tests that call the script directly cannot drift from it.
#[doc(hidden)]
pub fn limiter_keys(prefix: &str, name: &str) -> [String; 11] {
    [
        "meta", "holders", "leases", "queue", "heavy", "waits", "outcomes", "otimes", "hot",
        "tokens", "dead",
    ]
    .map(|k| format!("{prefix}:{{{name}}}:{k}"))
}

/// The script's source: the generated prelude, then the parts of `lua/`. Loaded once per store.
#[doc(hidden)]
pub fn script_source() -> String {
    let mut s = prelude();
    for part in SCRIPT_PARTS {
        s.push_str(part);
    }
    s
}

/// The keyed limiters' script (`lua/keyed/`): the same prelude and shared parts, the keyed
/// layer replacing the helpers that touch waiters, and the operations. Loaded once per store.
#[doc(hidden)]
pub fn keyed_script_source() -> String {
    let mut s = prelude();
    for part in KEYED_PARTS {
        s.push_str(part);
    }
    s
}

/// The keyed script, in the order its parts run: the plain shared parts and the plain
/// operations that need no change (they call the keyed layer's replacements of the helpers).
const KEYED_PARTS: [&str; 23] = [
    include_str!("lua/common.lua"),
    include_str!("lua/helpers.lua"),
    include_str!("lua/keyed/drain.lua"),
    include_str!("lua/state.lua"),
    include_str!("lua/keyed/layer.lua"),
    include_str!("lua/keyed/put.lua"),
    include_str!("lua/ops/put.lua"),
    include_str!("lua/guard.lua"),
    include_str!("lua/keyed/guard.lua"),
    include_str!("lua/ops/peek.lua"),
    include_str!("lua/keyed/acquire.lua"),
    include_str!("lua/keyed/schedule.lua"),
    include_str!("lua/keyed/unschedule.lua"),
    include_str!("lua/keyed/revive.lua"),
    include_str!("lua/ops/release.lua"),
    include_str!("lua/ops/extend.lua"),
    include_str!("lua/ops/cancel.lua"),
    include_str!("lua/ops/status.lua"),
    include_str!("lua/gradient.lua"),
    include_str!("lua/ops/feedback.lua"),
    include_str!("lua/ops/learn.lua"),
    include_str!("lua/ops/advance.lua"),
    include_str!("lua/unknown_op.lua"),
];

/// The limiter script, in the order its parts run: the shared parts (the KEYS and the clock,
/// the rate-only fast path before the helpers it does not need, the helpers, the other fast
/// paths, the state the general path loads and writes back), then one file per
/// operation (`lua/ops/`), each opening with its ARGV and replies. Kept in one Lua chunk, so
/// the parts share their locals; split into files only to be read one at a time.
const SCRIPT_PARTS: [&str; 22] = [
    include_str!("lua/common.lua"),
    include_str!("lua/paced.lua"),
    include_str!("lua/helpers.lua"),
    include_str!("lua/fast.lua"),
    include_str!("lua/state.lua"),
    include_str!("lua/keyed/bounce.lua"),
    include_str!("lua/ops/put.lua"),
    include_str!("lua/guard.lua"),
    include_str!("lua/ops/peek.lua"),
    include_str!("lua/ops/delete.lua"),
    include_str!("lua/ops/acquire.lua"),
    include_str!("lua/ops/release.lua"),
    include_str!("lua/ops/extend.lua"),
    include_str!("lua/ops/cancel.lua"),
    include_str!("lua/ops/schedule.lua"),
    include_str!("lua/ops/unschedule.lua"),
    include_str!("lua/gradient.lua"),
    include_str!("lua/ops/feedback.lua"),
    include_str!("lua/ops/learn.lua"),
    include_str!("lua/ops/advance.lua"),
    include_str!("lua/ops/status.lua"),
    include_str!("lua/unknown_op.lua"),
];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_prelude_defines_every_constant_the_script_uses() {
        let src = script_source();
        for name in [
            "MIN_LEASE",
            "MAX_LEASE",
            "MAX_WAIT",
            "MAX_CONCURRENCY",
            "MAX_QUEUE",
            "MAX_SCHEDULE_AHEAD",
            "HOLD_EWMA_WEIGHT",
            "NO_HISTORY_ROUND",
            "OUTCOME_RETENTION",
            "MAX_ADOPTED_TOKEN",
        ] {
            assert!(src.contains(&format!("local {name} = ")), "{name}");
        }
        for name in ["COUNTERS", "STATUS"] {
            assert!(src.contains(&format!("\n  local {name} = {{'")), "{name}");
        }
        assert!(src.contains("local function field_lists()"));
        assert!(src.contains("local MAX_LEASE = 86400000000\n"));
        // The script itself states none of these numbers again.
        let body: String = SCRIPT_PARTS.concat();
        for literal in ["86400", "/ 8)", "120 *", "366"] {
            assert!(!body.contains(literal), "the script restates {literal:?}");
        }
    }
}
