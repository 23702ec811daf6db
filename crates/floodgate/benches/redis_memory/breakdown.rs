//! Where Redis's `used_memory` goes, sample by sample, so a drift can be traced to its part:
//! Redis's fixed startup memory, the clients' buffers, the script cache, the keyspace's hash
//! tables, the keys themselves (`MEMORY USAGE` of every key), the slow log and the per-command
//! latency histograms (Redis 7's `latency-tracking`, one histogram allocated on a command's first
//! call), and what none of these account for. The Lua VM's heap (`used_memory_vm_eval`) is shown
//! beside them: Redis's Lua allocates outside the allocator counter `used_memory` reads.

use std::collections::{BTreeMap, BTreeSet};

use redis::aio::MultiplexedConnection;
use redis::Value;

/// One reading of Redis's memory (bytes unless said).
#[derive(Clone, Default)]
pub(crate) struct Sample {
    /// Seconds since the load started.
    pub(crate) t: u64,
    /// Grants so far.
    pub(crate) grants: u64,
    /// `used_memory`: what the issue asks to stay flat.
    pub(crate) used: u64,
    /// `used_memory_startup`: Redis's own memory before any client, fixed.
    pub(crate) startup: u64,
    /// Clients' query and reply buffers, replication backlog, AOF buffer, cluster links.
    pub(crate) clients: u64,
    /// `used_memory_scripts`: the script cache (the scripts' bodies) and functions.
    pub(crate) scripts: u64,
    /// The keyspace's hash tables (`MEMORY STATS` `overhead.hashtable.*` of db 0).
    pub(crate) hashtables: u64,
    /// `MEMORY USAGE` summed over every key (the limiter's, plus any other).
    pub(crate) keys: u64,
    /// How many keys.
    pub(crate) key_count: u64,
    /// `SLOWLOG LEN`: each entry keeps a copy of its command's arguments (at most
    /// `slowlog-max-len`, 128 by default).
    pub(crate) slowlog: u64,
    /// Commands holding a latency histogram (`INFO latencystats` lines).
    pub(crate) histograms: u64,
    /// Their names, to tell which command's first call allocated one late in a run.
    pub(crate) commands: BTreeSet<String>,
    /// `used_memory_vm_eval`: the Lua heap, outside `used_memory`.
    pub(crate) lua_vm: u64,
    /// `allocator_allocated`: everything the allocator handed out (Lua's heap included).
    pub(crate) allocated: u64,
    /// `pubsub_channels`: one per store connected (its wake channel).
    pub(crate) channels: u64,
    /// `connected_clients`.
    pub(crate) connections: u64,
}

/// Unit costs measured on the run's own server: bytes of one latency histogram and of one
/// slow-log entry (0 when not measured).
#[derive(Clone, Copy, Default)]
pub(crate) struct Units {
    /// One command's latency histogram, bytes.
    pub(crate) histogram: u64,
    /// One slow-log entry, bytes (the mean over the entries reset at the end).
    pub(crate) slowlog_entry: u64,
    /// `slowlog-max-len`: the most entries the slow log keeps, so its bound.
    pub(crate) slowlog_cap: u64,
}

/// `CONFIG GET NAME` as a number (0 if absent).
pub(crate) async fn config_number(conn: &mut MultiplexedConnection, name: &str) -> u64 {
    let v: Vec<String> = redis::cmd("CONFIG")
        .arg("GET")
        .arg(name)
        .query_async(conn)
        .await
        .unwrap();
    v.get(1).and_then(|n| n.parse().ok()).unwrap_or(0)
}

impl Sample {
    /// `used_memory` not accounted for by the parts above, with the unit costs.
    pub(crate) fn rest(&self, units: Units) -> i64 {
        self.used as i64
            - (self.startup
                + self.clients
                + self.scripts
                + self.hashtables
                + self.keys
                + self.slowlog * units.slowlog_entry
                + self.histograms * units.histogram) as i64
    }
}

/// `INFO` sections as name -> value (numeric fields only), plus the commands named by
/// `latency_percentiles` lines.
async fn info(
    conn: &mut MultiplexedConnection,
    sections: &[&str],
) -> (BTreeMap<String, u64>, BTreeSet<String>) {
    let mut cmd = redis::cmd("INFO");
    for s in sections {
        cmd.arg(*s);
    }
    let text: String = cmd.query_async(conn).await.unwrap();
    let mut fields = BTreeMap::new();
    let mut histograms = BTreeSet::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("latency_percentiles_usec_") {
            histograms.insert(rest.split(':').next().unwrap_or(rest).to_string());
        } else if let Some((k, v)) = line.split_once(':') {
            if let Ok(v) = v.trim().parse::<u64>() {
                fields.insert(k.to_string(), v);
            }
        }
    }
    (fields, histograms)
}

/// `MEMORY STATS` flattened: `db.0` entries become `db.0.NAME`.
async fn memory_stats(conn: &mut MultiplexedConnection) -> BTreeMap<String, f64> {
    fn text(v: &Value) -> Option<String> {
        match v {
            Value::BulkString(b) => Some(String::from_utf8_lossy(b).into_owned()),
            Value::SimpleString(s) => Some(s.clone()),
            Value::Int(i) => Some(i.to_string()),
            Value::Double(d) => Some(d.to_string()),
            _ => None,
        }
    }
    fn pairs(prefix: &str, items: &[Value], out: &mut BTreeMap<String, f64>) {
        for pair in items.chunks(2) {
            let [k, v] = pair else { continue };
            let Some(k) = text(k) else { continue };
            match v {
                Value::Array(inner) => pairs(&format!("{prefix}{k}."), inner, out),
                Value::Map(inner) => {
                    let flat: Vec<Value> = inner
                        .iter()
                        .flat_map(|(a, b)| [a.clone(), b.clone()])
                        .collect();
                    pairs(&format!("{prefix}{k}."), &flat, out);
                }
                v => {
                    if let Some(x) = text(v).and_then(|s| s.parse().ok()) {
                        out.insert(format!("{prefix}{k}"), x);
                    }
                }
            }
        }
    }
    let v: Value = redis::cmd("MEMORY")
        .arg("STATS")
        .query_async(conn)
        .await
        .unwrap();
    let mut out = BTreeMap::new();
    match v {
        Value::Array(items) => pairs("", &items, &mut out),
        Value::Map(items) => {
            let flat: Vec<Value> = items.into_iter().flat_map(|(a, b)| [a, b]).collect();
            pairs("", &flat, &mut out);
        }
        _ => {}
    }
    out
}

/// `MEMORY USAGE` (exact: every element sampled) summed over every key, and the key count.
async fn keys(conn: &mut MultiplexedConnection) -> (u64, u64) {
    let names: Vec<String> = redis::cmd("KEYS").arg("*").query_async(conn).await.unwrap();
    let mut total = 0;
    for k in &names {
        let n: Option<u64> = redis::cmd("MEMORY")
            .arg("USAGE")
            .arg(k)
            .arg("SAMPLES")
            .arg(0)
            .query_async(conn)
            .await
            .unwrap();
        total += n.unwrap_or(0);
    }
    (total, names.len() as u64)
}

/// One reading.
pub(crate) async fn sample(conn: &mut MultiplexedConnection, t: u64, grants: u64) -> Sample {
    let (f, histograms) = info(conn, &["memory", "clients", "stats", "latencystats"]).await;
    let ms = memory_stats(conn).await;
    let (keys, key_count) = keys(conn).await;
    let slowlog: u64 = redis::cmd("SLOWLOG")
        .arg("LEN")
        .query_async(conn)
        .await
        .unwrap();
    let get = |k: &str| f.get(k).copied().unwrap_or(0);
    let ht = |k: &str| ms.get(k).copied().unwrap_or(0.0) as u64;
    Sample {
        t,
        grants,
        used: get("used_memory"),
        startup: get("used_memory_startup"),
        clients: get("mem_clients_normal")
            + get("mem_clients_slaves")
            + get("mem_replication_backlog")
            + get("mem_aof_buffer")
            + get("mem_cluster_links"),
        scripts: get("used_memory_scripts"),
        hashtables: ht("db.0.overhead.hashtable.main") + ht("db.0.overhead.hashtable.expires"),
        keys,
        key_count,
        slowlog,
        histograms: histograms.len() as u64,
        commands: histograms,
        lua_vm: get("used_memory_vm_eval"),
        allocated: get("allocator_allocated"),
        channels: get("pubsub_channels"),
        connections: get("connected_clients"),
    }
}

/// `used_memory` and this connection's share of the clients' buffers.
async fn used(conn: &mut MultiplexedConnection) -> (u64, u64, u64) {
    let (f, h) = info(conn, &["memory", "latencystats"]).await;
    let get = |k: &str| f.get(k).copied().unwrap_or(0);
    (
        get("used_memory"),
        get("mem_clients_normal"),
        h.len() as u64,
    )
}

/// Before the load, on a fresh server: the bytes of one latency histogram, from `used_memory`
/// before and after the first call of a command not called yet (`ECHO`; `INFO` has been called
/// before the first reading, so the reading itself adds none). 0 if `ECHO` had a histogram already.
pub(crate) async fn histogram_bytes(conn: &mut MultiplexedConnection) -> u64 {
    let _ = used(conn).await;
    let (u0, c0, h0) = used(conn).await;
    let _: String = redis::cmd("ECHO").arg("x").query_async(conn).await.unwrap();
    let (u1, c1, h1) = used(conn).await;
    if h1 != h0 + 1 {
        return 0;
    }
    (u1 - c1).saturating_sub(u0 - c0)
}

/// After the load, on the run's own server: the slow log's bytes, from `used_memory` before and
/// after `SLOWLOG RESET` (less the reset's own histogram if it allocated one), divided by its
/// entries. `None` with an empty slow log.
pub(crate) async fn slowlog_entry_bytes(
    conn: &mut MultiplexedConnection,
    histogram: u64,
) -> Option<u64> {
    let len: u64 = redis::cmd("SLOWLOG")
        .arg("LEN")
        .query_async(conn)
        .await
        .unwrap();
    if len == 0 {
        return None;
    }
    let (u0, c0, h0) = used(conn).await;
    let () = redis::cmd("SLOWLOG")
        .arg("RESET")
        .query_async(conn)
        .await
        .unwrap();
    let (u1, c1, h1) = used(conn).await;
    let freed = (u0 - c0) as i64 - (u1 - c1) as i64 + ((h1 - h0) * histogram) as i64;
    Some(u64::try_from(freed).unwrap_or(0) / len)
}

/// Prints the parts at each minute mark, then each part's change from the first minute to the
/// end: which part, if any, `used_memory` grew by.
pub(crate) fn report(samples: &[Sample], units: Units) {
    let Some(last) = samples.last() else {
        return;
    };
    println!(
        "\nunit costs on this server: a latency histogram {} B, a slow-log entry {} B (0: not measured or none)",
        units.histogram, units.slowlog_entry
    );
    println!(
        "used_memory by part, bytes (rest: used_memory less every part; the Lua heap is outside used_memory):"
    );
    println!(
        "{:>5} {:>9} {:>11} {:>8} {:>7} {:>8} {:>7} {:>9} {:>7} {:>7} {:>9} {:>8} {:>8} {:>9} {:>10}",
        "t s",
        "grants",
        "used_memory",
        "startup",
        "clients",
        "scripts",
        "tables",
        "keys (n)",
        "slowlog",
        "histos",
        "histo B",
        "rest",
        "lua heap",
        "allocator",
        "conns/subs"
    );
    let minutes = samples.iter().filter(|s| s.t % 60 == 0 || s.t == last.t);
    for s in minutes {
        println!(
            "{:>5} {:>9} {:>11} {:>8} {:>7} {:>8} {:>7} {:>5} ({}) {:>7} {:>7} {:>9} {:>8} {:>8} {:>9} {:>4}/{}",
            s.t,
            s.grants,
            s.used,
            s.startup,
            s.clients,
            s.scripts,
            s.hashtables,
            s.keys,
            s.key_count,
            s.slowlog,
            s.histograms,
            s.histograms * units.histogram,
            s.rest(units),
            s.lua_vm,
            s.allocated,
            s.connections,
            s.channels,
        );
    }
    let Some(first) = samples.iter().find(|s| s.t >= 60) else {
        println!("\n(run longer than a minute to compare used_memory after the first minute)");
        return;
    };
    if last.t <= first.t {
        println!("\n(run longer than a minute to compare used_memory after the first minute)");
        return;
    }
    let minutes = (last.t - first.t) as f64 / 60.0;
    let grants = (last.grants - first.grants).max(1) as f64;
    let delta = |a: u64, b: u64| b as i64 - a as i64;
    let used = delta(first.used, last.used);
    println!(
        "\nused_memory at {} s: {} B; at {} s: {} B ({used:+} B, {:+.0} B per minute) over {} more grants ({:+.3} B per grant)",
        first.t,
        first.used,
        last.t,
        last.used,
        used as f64 / minutes,
        last.grants - first.grants,
        used as f64 / grants
    );
    let after: Vec<&Sample> = samples.iter().filter(|s| s.t >= first.t).collect();
    let range = |f: &dyn Fn(&Sample) -> i64| {
        let v: Vec<i64> = after.iter().map(|s| f(s)).collect();
        (
            v.iter().copied().min().unwrap_or(0),
            v.iter().copied().max().unwrap_or(0),
        )
    };
    let (lo, hi) = range(&|s| s.used as i64);
    let (rlo, rhi) = range(&|s| s.rest(units));
    let (klo, khi) = range(&|s| s.keys as i64);
    let (clo, chi) = range(&|s| s.clients as i64);
    println!(
        "from {} s on, over {} readings: used_memory {lo}..{hi} B, clients' buffers {clo}..{chi} B, keys {klo}..{khi} B, rest {rlo}..{rhi} B",
        first.t,
        after.len()
    );
    println!("change of each part from {} s to {} s:", first.t, last.t);
    let parts: [(&str, i64); 9] = [
        ("startup", delta(first.startup, last.startup)),
        ("clients' buffers", delta(first.clients, last.clients)),
        ("script cache", delta(first.scripts, last.scripts)),
        ("keyspace tables", delta(first.hashtables, last.hashtables)),
        ("keys (MEMORY USAGE)", delta(first.keys, last.keys)),
        (
            "slow log",
            delta(first.slowlog, last.slowlog) * units.slowlog_entry as i64,
        ),
        (
            "latency histograms",
            delta(first.histograms, last.histograms) * units.histogram as i64,
        ),
        ("rest", last.rest(units) - first.rest(units)),
        ("(Lua heap, outside)", delta(first.lua_vm, last.lua_vm)),
    ];
    for (name, d) in parts {
        println!(
            "  {name:<22} {d:+9} B  ({:+.0} B per minute)",
            d as f64 / minutes
        );
    }
    for pair in samples.windows(2) {
        let [a, b] = pair else { continue };
        let new: Vec<&str> = b
            .commands
            .difference(&a.commands)
            .map(String::as_str)
            .collect();
        if !new.is_empty() {
            println!(
                "  first call between {} s and {} s, a latency histogram each: {}",
                a.t,
                b.t,
                new.join(", ")
            );
        }
    }
    println!(
        "  slow log {} -> {} entries (at most slowlog-max-len {}: {} B), histograms {} -> {} commands, keys {} -> {}",
        first.slowlog,
        last.slowlog,
        units.slowlog_cap,
        units.slowlog_cap * units.slowlog_entry,
        first.histograms,
        last.histograms,
        first.key_count,
        last.key_count
    );
}
