//! Cost of a keyed limiter's operations on the Redis store as the number of active keys grows,
//! beside a plain limiter with as many holders and waiters, in the same run on one Redis
//! (issue 14, must-show 4; `benches/keyed.rs` is the embedded store's state machine).
//!
//! At 1, 100, 10,000 and 100,000 active keys (`FG_KEYS` to choose):
//! - `pair`: one key takes a permit at once and gives it back (acquire + release, two script
//!   calls), while every other key holds one (plain: as many other holders);
//! - `hand`: the total is full and every key has a waiter; a release hands the slot to the next
//!   key in the round robin (plain: the FIFO head), its wake-up message is read, and the
//!   granted key queues its next waiter (release + acquire, two script calls).
//!
//! The scripts are called directly (EVALSHA with the store's keys and arguments, as
//! `tests/twin.rs` does), on one connection, so the figures are the scripts' cost, not the
//! client's. Per operation: the wall time (round trips included), Redis's own time in the
//! scripts (`INFO commandstats`, EVALSHA usec) and the commands the scripts ran. Ratios are
//! keyed / plain at the same size.
//!
//! Run: `cargo bench -p floodgate --bench keyed_redis`. Knobs (env): `REDIS_URL`, `FG_OPS`
//! (operations per measurement, default 5000), `FG_KEYS` (comma-separated sizes).

#![allow(
    clippy::print_stdout,
    clippy::unwrap_used,
    reason = "a benchmark binary: it reports on stdout, and any failure should abort the run"
)]

mod harness;

use std::collections::{BTreeMap, VecDeque};
use std::time::Instant;

use harness::{env_usize, load_average, BenchRedis};

const LONG: &str = "86400000000";
const WAIT: &str = "3600000000";
const CHANNEL: &str = "bench-wake";
/// Setup calls per pipeline.
const BATCH: usize = 2_000;

/// One limiter driven through its script.
struct Lim {
    script: redis::Script,
    keys: Vec<String>,
    name: String,
    keyed: bool,
    next: u64,
}

impl Lim {
    fn new(
        conn: &mut redis::Connection,
        name: &str,
        keyed: bool,
        total: usize,
        per_key: u32,
    ) -> Lim {
        let source = if keyed {
            floodgate::store::redis::keyed_script_source()
        } else {
            floodgate::store::redis::script_source()
        };
        let script = redis::Script::new(&source);
        script.load(conn).unwrap();
        let mut parts = vec![
            "meta", "holders", "leases", "queue", "heavy", "waits", "outcomes", "otimes", "hot",
            "tokens", "dead",
        ];
        if keyed {
            parts.extend([
                "kstate",
                "koverrides",
                "kqueue",
                "kring",
                "kholders",
                "kbusy",
                "ksleep",
                "kidle",
                "kheads",
            ]);
        }
        let lim = Lim {
            script,
            keys: parts.iter().map(|k| format!("fg:{{{name}}}:{k}")).collect(),
            name: name.to_owned(),
            keyed,
            next: 0,
        };
        let total = total.to_string();
        let mut args: Vec<String> = [
            total.as_str(),
            LONG,
            WAIT,
            "1000000",
            "1",
            "",
            "",
            "",
            "",
            "",
            "",
            "",
            "",
            "",
            "",
            "",
        ]
        .map(String::from)
        .to_vec();
        if keyed {
            args.extend([
                per_key.to_string(),
                "1000000".into(),
                total.clone(),
                String::new(),
                String::new(),
                String::new(),
                String::new(),
                // No overrides to put back (`keyed_revive.rs` `kput_args`: their count last).
                "0".into(),
            ]);
        }
        let op = if keyed { "kput" } else { "put" };
        let reply: Vec<String> = lim.cmd(op, &args).query(conn).unwrap();
        assert_eq!(reply[0], "status", "{reply:?}");
        lim
    }

    fn cmd(&self, op: &str, args: &[String]) -> redis::Cmd {
        let mut cmd = redis::cmd("EVALSHA");
        cmd.arg(self.script.get_hash()).arg(self.keys.len());
        for k in &self.keys {
            cmd.arg(k);
        }
        // The production form: the script reads Redis's clock.
        cmd.arg(op).arg(&self.name).arg(3_600_000_u64);
        for a in args {
            cmd.arg(a);
        }
        cmd
    }

    fn acquire_cmd(&mut self, key: &str) -> redis::Cmd {
        self.next += 1;
        let mut args: Vec<String> = ["1", "", "", &format!("w{}", self.next), CHANNEL, "", "a"]
            .map(String::from)
            .to_vec();
        if self.keyed {
            args.push(key.to_owned());
        }
        self.cmd(if self.keyed { "kacquire" } else { "acquire" }, &args)
    }

    /// Acquires for these keys, pipelined; the tokens of those granted at once.
    fn acquire_all(&mut self, conn: &mut redis::Connection, keys: &[String]) -> Vec<String> {
        let mut tokens = Vec::new();
        for chunk in keys.chunks(BATCH) {
            let mut pipe = redis::pipe();
            for key in chunk {
                pipe.add_command(self.acquire_cmd(key));
            }
            let replies: Vec<Vec<String>> = pipe.query(conn).unwrap();
            for r in replies {
                match r[0].as_str() {
                    "granted" => tokens.push(r[1].clone()),
                    "queued" => {}
                    other => panic!("setup refused: {other} {r:?}"),
                }
            }
        }
        tokens
    }
}

/// `INFO commandstats` as (calls, usec) per command.
fn commandstats(conn: &mut redis::Connection) -> BTreeMap<String, (u64, u64)> {
    let info: String = redis::cmd("INFO").arg("commandstats").query(conn).unwrap();
    let mut out = BTreeMap::new();
    for line in info.lines() {
        let Some((name, rest)) = line
            .strip_prefix("cmdstat_")
            .and_then(|l| l.split_once(':'))
        else {
            continue;
        };
        let field = |f: &str| -> u64 {
            rest.split(',')
                .find_map(|kv| kv.strip_prefix(f)?.strip_prefix('='))
                .and_then(|v| v.parse().ok())
                .unwrap_or(0)
        };
        out.insert(name.to_owned(), (field("calls"), field("usec")));
    }
    out
}

/// One measurement: wall ns per op, Redis's script us per op, commands the scripts ran per op.
struct Cost {
    wall_ns: f64,
    script_us: f64,
    commands: f64,
}

fn measure(
    conn: &mut redis::Connection,
    ops: usize,
    mut op: impl FnMut(&mut redis::Connection),
) -> Cost {
    let _: () = redis::cmd("CONFIG").arg("RESETSTAT").query(conn).unwrap();
    let start = Instant::now();
    for _ in 0..ops {
        op(conn);
    }
    let wall = start.elapsed();
    let stats = commandstats(conn);
    let (evals, usec) = stats.get("evalsha").copied().unwrap_or((0, 0));
    let inner: u64 = stats
        .iter()
        .filter(|(name, _)| !matches!(name.as_str(), "evalsha" | "info" | "config"))
        .map(|(_, (calls, _))| calls)
        .sum();
    let _ = evals;
    Cost {
        wall_ns: wall.as_nanos() as f64 / ops as f64,
        script_us: usec as f64 / ops as f64,
        commands: inner as f64 / ops as f64,
    }
}

/// Acquire + release of one key at a time, while every one of `n` keys holds a permit.
fn pair(conn: &mut redis::Connection, keyed: bool, n: usize, ops: usize) -> Cost {
    let names: Vec<String> = (0..n).map(|i| format!("tenant-{i}")).collect();
    let name = if keyed { "kpair" } else { "ppair" };
    let mut lim = Lim::new(conn, name, keyed, n + 10, 2);
    let held = lim.acquire_all(conn, &names);
    assert_eq!(held.len(), n);
    let mut i = 0;
    measure(conn, ops, |conn| {
        let key = &names[i % n];
        i += 1;
        let reply: Vec<String> = lim.acquire_cmd(key).query(conn).unwrap();
        assert_eq!(reply[0], "granted", "{reply:?}");
        let released: Vec<String> = lim.cmd("release", &[reply[1].clone()]).query(conn).unwrap();
        assert_eq!(released[1], "1");
    })
}

/// A release handing the slot over, with `n` keys each holding one and each with a waiter.
fn handoff(
    conn: &mut redis::Connection,
    wakes: &mut redis::PubSub<'_>,
    keyed: bool,
    n: usize,
    ops: usize,
) -> Cost {
    let names: Vec<String> = (0..n).map(|i| format!("tenant-{i}")).collect();
    let name = if keyed { "khand" } else { "phand" };
    WAITER_KEYS.with(|m| m.borrow_mut().clear());
    let mut lim = Lim::new(conn, name, keyed, n, 1);
    let held = lim.acquire_all(conn, &names);
    assert_eq!(held.len(), n);
    assert!(lim.acquire_all(conn, &names).is_empty(), "all queued");
    // Oldest first, with the key each belongs to (its waiter is the next of that key).
    let mut held: VecDeque<(String, usize)> = held.into_iter().zip(0..n).collect();
    measure(conn, ops, |conn| {
        let (token, _) = held.pop_front().unwrap();
        let released: Vec<String> = lim.cmd("release", &[token]).query(conn).unwrap();
        assert_eq!(released[1], "1", "{released:?}");
        // The wake-up names the waiter and carries the grant: `name\nwaiter\nG|token|...`.
        let msg: String = wakes.get_message().unwrap().get_payload().unwrap();
        let outcome = msg.rsplit('\n').next().unwrap();
        let token = outcome.split('|').nth(1).unwrap().to_owned();
        let waiter: u64 = msg.split('\n').nth(1).unwrap()[1..].parse().unwrap();
        // Waiters were numbered after the n holders, one per key, then one per handoff: the
        // key of waiter `w` is the one the handoff granted.
        let key = handed_key(&lim, waiter, n);
        held.push_back((token, key));
        let reply: Vec<String> = lim
            .acquire_cmd(&format!("tenant-{key}"))
            .query(conn)
            .unwrap();
        assert_eq!(reply[0], "queued", "{reply:?}");
        WAITER_KEYS.with(|m| m.borrow_mut().insert(lim.next, key));
    })
}

thread_local! {
    /// Which key each waiter queued during a handoff run belongs to.
    static WAITER_KEYS: std::cell::RefCell<std::collections::HashMap<u64, usize>> =
        std::cell::RefCell::default();
}

fn handed_key(_lim: &Lim, waiter: u64, n: usize) -> usize {
    // Waiters n+1..=2n are the setup's, one per key in order; later ones were recorded.
    let w = waiter as usize;
    if w > n && w <= 2 * n {
        return w - n - 1;
    }
    WAITER_KEYS.with(|m| m.borrow_mut().remove(&waiter).unwrap_or(0))
}

fn main() {
    let redis = BenchRedis::start();
    let client = redis::Client::open(redis.url.as_str()).unwrap();
    let mut conn = client.get_connection().unwrap();
    let mut sub_conn = client.get_connection().unwrap();
    let mut wakes = sub_conn.as_pubsub();
    wakes.subscribe(CHANNEL).unwrap();
    let bench = std::env::args().any(|a| a == "--bench");
    let ops = env_usize("FG_OPS", if bench { 5_000 } else { 50 });
    let sizes: Vec<usize> = std::env::var("FG_KEYS")
        .ok()
        .map(|s| s.split(',').filter_map(|n| n.trim().parse().ok()).collect())
        .unwrap_or_else(|| {
            if bench {
                vec![1, 100, 10_000, 100_000]
            } else {
                vec![1, 100]
            }
        });
    println!(
        "keyed vs plain limiter on Redis ({}), {ops} ops per figure; wall us per op | Redis us \
         in the scripts per op | commands the scripts ran per op",
        redis.origin()
    );
    println!(
        "{:>8} {:>5} {:>22} {:>22} {:>7} {:>7}",
        "keys", "op", "keyed wall/redis/cmds", "plain wall/redis/cmds", "wall x", "redis x"
    );
    for n in sizes {
        for (label, keyed_cost, plain_cost) in [
            (
                "pair",
                pair(&mut conn, true, n, ops),
                pair(&mut conn, false, n, ops),
            ),
            (
                "hand",
                handoff(&mut conn, &mut wakes, true, n, ops),
                handoff(&mut conn, &mut wakes, false, n, ops),
            ),
        ] {
            let fmt = |c: &Cost| {
                format!(
                    "{:.0}/{:.1}/{:.1}",
                    c.wall_ns / 1_000.0,
                    c.script_us,
                    c.commands
                )
            };
            println!(
                "{n:>8} {label:>5} {:>22} {:>22} {:>7.2} {:>7.2}",
                fmt(&keyed_cost),
                fmt(&plain_cost),
                keyed_cost.wall_ns / plain_cost.wall_ns,
                keyed_cost.script_us / plain_cost.script_us
            );
            let _: () = redis::cmd("FLUSHALL").query(&mut conn).unwrap();
        }
    }
    println!();
    println!("load average after: {}", load_average());
}
