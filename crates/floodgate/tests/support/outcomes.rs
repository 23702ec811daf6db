//! The Redis script's recorded outcomes as the twins read them: once, as a waiting client's
//! cancel does (`lua/ops/cancel.lua`), so a request id's next wait does not show its last
//! one's outcome.

#![allow(dead_code)] // Each twin uses its own part.

use std::collections::BTreeMap;
use std::time::Duration;

use floodgate::core::{Refusal, WaitOutcome};

fn us(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap()
}

/// The script's encoding of a waiter's outcome (see the header of lua/common.lua), made from
/// the core's, for comparing the two.
pub(crate) fn encode(outcome: &WaitOutcome) -> String {
    match outcome {
        Ok(g) => format!(
            "G|{}|{}|{}|{}|{}|{}",
            g.token.0,
            g.permits,
            us(g.lease),
            g.lease_deadline.0,
            g.granted_at.0,
            us(g.waited)
        ),
        Err(Refusal::WaitTimeout { retry_after }) => format!("T|{}", us(*retry_after)),
        Err(Refusal::PermitsExceedLimit { requested, limit }) => format!("X|{requested}|{limit}"),
        Err(Refusal::LimiterDeleted) => "D".into(),
        Err(other) => format!("unexpected {other:?}"),
    }
}

/// The outcomes recorded in hash `outcomes` (decision times in `times`), deleted once read;
/// remembered paced grants (`p:ID`) share the hash, are no wake-up, and stay.
pub(crate) fn take(
    conn: &mut redis::Connection,
    outcomes: &str,
    times: &str,
) -> BTreeMap<String, String> {
    let all: BTreeMap<String, String> = redis::cmd("HGETALL").arg(outcomes).query(conn).unwrap();
    let read: BTreeMap<String, String> = all
        .into_iter()
        .filter(|(f, _)| !f.starts_with("p:"))
        .collect();
    if !read.is_empty() {
        let fields: Vec<&String> = read.keys().collect();
        let _: () = redis::pipe()
            .cmd("HDEL")
            .arg(outcomes)
            .arg(&fields)
            .cmd("ZREM")
            .arg(times)
            .arg(&fields)
            .query(conn)
            .unwrap();
    }
    read
}
