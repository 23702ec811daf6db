//! Issue 14, must-show 1 on the Redis store: fairness in virtual time, deterministic. The keyed
//! script runs on a real `redis-server` with the clock in its op argument (`acquire@<now>`, the
//! form only tests send, as `twin.rs` does), and the same scenarios as the embedded store's
//! `core/keyed/tests.rs`: every grant is held until `step` releases the oldest one a
//! millisecond later, so capacity frees one permit at a time.

#![cfg(not(feature = "shuttle"))]
#![allow(clippy::unwrap_used)]

#[path = "support/mod.rs"]
mod support;

use std::collections::{HashMap, VecDeque};

const MS: u64 = 1_000;
/// A day, in microseconds: leases and waits that never end during a test.
const LONG: &str = "86400000000";
const WAIT: &str = "3600000000";

/// A limiter driven by hand through one of the two scripts.
struct Sim {
    conn: redis::Connection,
    script: redis::Script,
    keys: Vec<String>,
    name: String,
    keyed: bool,
    now: u64,
    /// Grants held, oldest first.
    held: VecDeque<String>,
    /// Queued waiters by key, FIFO: the next grant is one of their heads.
    queued: HashMap<String, VecDeque<String>>,
    /// Every grant's key, in grant order.
    grants: Vec<String>,
    /// Numbers waiter keys.
    next: u64,
}

impl Sim {
    fn new(server: &support::RedisServer, name: &str, keyed: bool, total: u32) -> Sim {
        let mut conn = redis::Client::open(server.url())
            .unwrap()
            .get_connection()
            .unwrap();
        let source = if keyed {
            floodgate::store::redis::keyed_script_source()
        } else {
            floodgate::store::redis::script_source()
        };
        let script = redis::Script::new(&source);
        script.load(&mut conn).unwrap();
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
        let keys = parts.iter().map(|k| format!("fg:{{{name}}}:{k}")).collect();
        let mut sim = Sim {
            conn,
            script,
            keys,
            name: name.to_owned(),
            keyed,
            now: 1_000_000 * MS,
            held: VecDeque::new(),
            queued: HashMap::new(),
            grants: Vec::new(),
            next: 0,
        };
        let mut args: Vec<String> = [
            &total.to_string(),
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
        .iter()
        .map(|s| s.to_string())
        .collect();
        if keyed {
            // Per-key concurrency, max_keys, the total as configured, keep, per-key rate, no
            // overrides to put back.
            args.extend(["", "100000", &total.to_string(), "", "", "", "", "0"].map(String::from));
        }
        let reply = sim.call(if keyed { "kput" } else { "put" }, &args);
        assert_eq!(reply[0], "status", "{reply:?}");
        sim
    }

    fn call(&mut self, op: &str, args: &[String]) -> Vec<String> {
        let mut cmd = redis::cmd("EVALSHA");
        cmd.arg(self.script.get_hash()).arg(self.keys.len());
        for k in &self.keys {
            cmd.arg(k);
        }
        cmd.arg(format!("{op}@{}@general", self.now))
            .arg(&self.name)
            .arg(3_600_000_u64);
        for a in args {
            cmd.arg(a);
        }
        cmd.query(&mut self.conn).unwrap()
    }

    /// `n` acquires of one permit for `key` (the key is ignored by a plain limiter's FIFO).
    fn acquire(&mut self, key: &str, n: usize) {
        for _ in 0..n {
            self.next += 1;
            let waiter = format!("w{}", self.next);
            let mut args: Vec<String> = ["1", "", "", &waiter, "ch", "", "a"]
                .iter()
                .map(|s| s.to_string())
                .collect();
            if self.keyed {
                args.push(key.to_owned());
            }
            let op = if self.keyed { "kacquire" } else { "acquire" };
            let reply = self.call(op, &args);
            match reply[0].as_str() {
                "granted" => {
                    self.grants.push(key.to_owned());
                    self.held.push_back(reply[1].clone());
                }
                "queued" => {
                    // A plain limiter has one FIFO, whatever the key.
                    let queue = if self.keyed { key } else { "" };
                    self.queued
                        .entry(queue.to_owned())
                        .or_default()
                        .push_back(format!("{waiter}\n{key}"));
                }
                other => panic!("refused: {other} {reply:?}"),
            }
        }
    }

    fn put_weight(&mut self, key: &str, weight: u32) {
        let reply = self.call(
            "put_key",
            &[key.to_owned(), String::new(), weight.to_string()],
        );
        assert_eq!(reply[0], "ok", "{reply:?}");
    }

    /// Releases the oldest grant a millisecond later, and records whom it went to.
    fn step(&mut self) {
        self.now += MS;
        let token = self.held.pop_front().expect("something held");
        let reply = self.call("release", &[token]);
        assert_eq!(reply[..2], ["released", "1"], "{reply:?}");
        // The grant's outcome is recorded with its holder: `k:WAITER` = `G|token|...`.
        let heads: Vec<(String, String)> = self
            .queued
            .iter()
            .filter_map(|(q, fifo)| Some((q.clone(), fifo.front()?.clone())))
            .collect();
        for (queue, head) in heads {
            let (waiter, key) = head.split_once('\n').unwrap();
            let entry: Option<String> = redis::cmd("HGET")
                .arg(&self.keys[1])
                .arg(format!("k:{waiter}"))
                .query(&mut self.conn)
                .unwrap();
            if let Some(granted) = entry.as_deref().and_then(|e| e.strip_prefix("G|")) {
                let token = granted.split('|').next().unwrap().to_owned();
                self.grants.push(key.to_owned());
                self.held.push_back(token);
                self.queued.get_mut(&queue).unwrap().pop_front();
            }
        }
    }
}

#[test]
fn small_keys_are_served_within_their_fair_share_of_a_large_backlog_on_redis() {
    let server = support::RedisServer::start();
    for keyed in [true, false] {
        let name = if keyed { "fair" } else { "fifo" };
        let mut sim = Sim::new(&server, name, keyed, 10);
        sim.acquire("A", 1_000);
        assert_eq!(sim.grants.len(), 10);
        let small: Vec<String> = (1..=9).map(|i| format!("org-{i}")).collect();
        let mut arrived_at = HashMap::new();
        for key in &small {
            // Each small key arrives after a few of A's grants have gone by.
            for _ in 0..3 {
                sim.step();
            }
            arrived_at.insert(key.clone(), sim.grants.len());
            sim.acquire(key, 10);
        }
        while sim.grants.len() < 1_090 {
            sim.step();
        }
        if keyed {
            for key in &small {
                let from = arrived_at[key];
                let last = sim.grants.iter().rposition(|k| k == key).unwrap();
                let count = sim.grants.iter().filter(|k| *k == key).count();
                assert_eq!(count, 10, "{key}");
                assert!(
                    last - from < 200,
                    "{key}: its last grant came {} grants after it arrived",
                    last - from
                );
            }
        } else {
            let first_small = sim.grants.iter().position(|k| k != "A").unwrap();
            assert_eq!(first_small, 1_000, "FIFO serves all of A's first");
        }
    }
}

#[test]
fn weights_share_a_contended_total_in_their_ratio_on_redis() {
    let server = support::RedisServer::start();
    let mut sim = Sim::new(&server, "weights", true, 10);
    sim.put_weight("heavy", 3);
    sim.acquire("heavy", 3_000);
    sim.acquire("light", 3_000);
    let start = sim.grants.len();
    for _ in 0..2_000 {
        sim.step();
    }
    let window = &sim.grants[start..];
    let heavy = window.iter().filter(|k| *k == "heavy").count() as f64;
    let light = window.iter().filter(|k| *k == "light").count() as f64;
    let ratio = heavy / light;
    assert!(
        (ratio - 3.0).abs() <= 0.15,
        "shares {heavy}:{light} = {ratio:.3}, want 3 within 5%"
    );
}

/// Jain's fairness index of the shares: 1 when equal, 1/n when one takes everything.
fn jain(shares: &[f64]) -> f64 {
    let sum: f64 = shares.iter().sum();
    let squares: f64 = shares.iter().map(|x| x * x).sum();
    sum * sum / (shares.len() as f64 * squares)
}

#[test]
fn equal_weight_backlogged_keys_share_equally_on_redis() {
    let server = support::RedisServer::start();
    let mut sim = Sim::new(&server, "jain", true, 10);
    // Backlogs of very different sizes, all larger than the window.
    for (i, backlog) in [2_000, 1_000, 600, 500, 450].into_iter().enumerate() {
        sim.acquire(&format!("k{i}"), backlog);
    }
    let start = sim.grants.len();
    for _ in 0..2_000 {
        sim.step();
    }
    let window = &sim.grants[start..];
    let shares: Vec<f64> = (0..5)
        .map(|i| window.iter().filter(|k| **k == format!("k{i}")).count() as f64)
        .collect();
    let index = jain(&shares);
    assert!(index >= 0.99, "Jain's index {index:.4} of {shares:?}");
    assert!(jain(&[1.0, 0.0]) < 0.6, "the index can fail");
}
