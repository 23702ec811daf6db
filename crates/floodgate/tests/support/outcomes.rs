//! The Redis script's recorded outcomes as the twins read them: once, as a waiting client's
//! cancel does (`lua/ops/cancel.lua`), so a request id's next wait does not show its last
//! one's outcome.

use std::collections::BTreeMap;

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
