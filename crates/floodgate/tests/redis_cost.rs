//! What each Redis operation costs, counted in Redis commands (`INFO commandstats`, which counts
//! the commands a script runs inside it as well as the script call), not timed: the counts
//! are exact, so a cost that grows with the queue, the holders or the waits fails here on any
//! machine (issue 13).
//!
//! The script is driven directly, on a test clock (`op@now`, as `tests/twin.rs` does), so no
//! timer or wake-up of a store adds calls between the counts.

#![cfg(feature = "redis")]
#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "support/script.rs"]
mod script;
mod support;

use std::collections::BTreeMap;

/// Far enough in the future that no lease or wait ends during a test.
const HOUR_US: u64 = 3_600_000_000;
/// The test clock's start.
const T0: u64 = 1_000_000_000;

struct Script {
    conn: redis::Connection,
    sha: String,
    keys: Vec<String>,
    name: String,
    now: u64,
    /// The commands, by name, that the last `count` counted.
    last_commands: BTreeMap<String, u64>,
}

impl Script {
    fn new(server: &support::RedisServer, name: &str) -> Self {
        let (conn, script) = script::connect_with_script(server);
        let keys = floodgate::store::redis::limiter_keys("fg", name).to_vec();
        Script {
            conn,
            sha: script.get_hash().to_owned(),
            keys,
            name: name.to_owned(),
            now: T0,
            last_commands: BTreeMap::new(),
        }
    }

    fn cmd(&self, op: &str, args: &[String]) -> redis::Cmd {
        let mut cmd = redis::cmd("EVALSHA");
        cmd.arg(&self.sha).arg(self.keys.len());
        for k in &self.keys {
            cmd.arg(k);
        }
        // `op@general` runs the general path (`op@now@general`), skipping the fast one.
        let clocked = match op.strip_suffix("@general") {
            Some(base) => format!("{base}@{}@general", self.now),
            None => format!("{op}@{}", self.now),
        };
        cmd.arg(clocked).arg(&self.name).arg(7 * 24 * 3_600_000_u64);
        for a in args {
            cmd.arg(a);
        }
        cmd
    }

    fn call(&mut self, op: &str, args: &[String]) -> Vec<String> {
        let cmd = self.cmd(op, args);
        cmd.query(&mut self.conn).expect("the script runs")
    }

    /// Many calls in one pipeline (building a long queue quickly).
    fn pipeline(&mut self, calls: impl IntoIterator<Item = (&'static str, Vec<String>)>) {
        let mut pipe = redis::pipe();
        for (op, args) in calls {
            pipe.add_command(self.cmd(op, &args)).ignore();
        }
        pipe.query::<()>(&mut self.conn).expect("the scripts run");
    }

    /// Creates the limiter: a concurrency limit, a 1 h lease and a 1 h maximum wait.
    fn put(&mut self, concurrency: u32, max_queue: u32) -> Vec<String> {
        let args: Vec<String> = [
            concurrency.to_string(),
            HOUR_US.to_string(),
            HOUR_US.to_string(),
            max_queue.to_string(),
            "1".into(),
        ]
        .into_iter()
        .chain(std::iter::repeat_n(String::new(), 10))
        .collect();
        self.call("put", &args)
    }

    fn acquire_args(key: &str, permits: u32, wait_us: Option<u64>) -> Vec<String> {
        vec![
            permits.to_string(),
            String::new(),
            wait_us.map(|w| w.to_string()).unwrap_or_default(),
            key.to_owned(),
            "cost-channel".into(),
        ]
    }

    /// Redis commands `f` runs (scripts' inner commands included), from `INFO commandstats`.
    fn count<T>(&mut self, f: impl FnOnce(&mut Self) -> T) -> (u64, T) {
        redis::cmd("CONFIG")
            .arg("RESETSTAT")
            .query::<()>(&mut self.conn)
            .unwrap();
        let out = f(self);
        let info: String = redis::cmd("INFO")
            .arg("commandstats")
            .query(&mut self.conn)
            .unwrap();
        self.last_commands = commands(&info)
            .into_iter()
            .filter(|(c, _)| c != "info" && !c.starts_with("config"))
            .collect();
        (self.last_commands.values().sum(), out)
    }

    fn hlen(&mut self, i: usize) -> u64 {
        redis::cmd("HLEN")
            .arg(&self.keys[i])
            .query(&mut self.conn)
            .unwrap()
    }
}

/// `INFO commandstats` as command → calls.
fn commands(info: &str) -> BTreeMap<String, u64> {
    info.lines()
        .filter_map(|l| l.strip_prefix("cmdstat_"))
        .filter_map(|l| {
            let (name, rest) = l.split_once(':')?;
            let calls = rest.split(',').find_map(|kv| kv.strip_prefix("calls="))?;
            Some((name.to_owned(), calls.trim().parse().ok()?))
        })
        .collect()
}

/// The cost of each departure and of `put` with a queue of `n` waiters behind one holder.
fn departure_costs(server: &support::RedisServer, n: u64) -> BTreeMap<&'static str, u64> {
    let mut s = Script::new(server, &format!("dep{n}"));
    s.put(1, 1_000_000);
    assert_eq!(
        s.call("acquire", &Script::acquire_args("holder", 1, None))[0],
        "granted"
    );
    // The tail waits less than everyone, so its deadline is the first to come.
    s.pipeline((0..n).map(|i| {
        let wait = if i == n - 1 { HOUR_US / 2 } else { HOUR_US };
        (
            "acquire",
            Script::acquire_args(&format!("w{i}"), 1, Some(wait)),
        )
    }));
    let mut costs = BTreeMap::new();
    let cancel = |key: String, reason: &str| vec![key, reason.to_owned()];
    let (c, r) = s.count(|s| s.call("cancel", &cancel(format!("w{}", n / 2), "drop")));
    assert_eq!(r[0], "cancelled", "{r:?}");
    costs.insert("cancel (drop) of the middle waiter", c);
    let (c, r) = s.count(|s| s.call("cancel", &cancel(format!("w{}", n - 2), "timeout")));
    assert_eq!(r[0], "timed_out", "{r:?}");
    costs.insert("cancel (timeout, with its hint) of a tail waiter", c);
    let (c, r) = s.count(|s| s.call("cancel", &cancel("w1".into(), "drop")));
    assert_eq!(r[0], "cancelled", "{r:?}");
    costs.insert("cancel (drop) near the head", c);
    let (c, r) = s.count(|s| s.put(1, 1_000_000));
    assert_eq!(r[0], "status", "{r:?}");
    costs.insert("put with an unchanged spec", c);
    // The tail's own deadline passes: `advance` times it out with a hint.
    s.now += HOUR_US / 2;
    let (c, r) = s.count(|s| s.call("advance", &[]));
    assert_eq!(r[0], "ok", "{r:?}");
    costs.insert("advance timing out the tail waiter", c);
    costs
}

/// No departure, nor `put` with an unchanged spec, costs more commands with a longer queue.
#[test]
fn departures_cost_the_same_whatever_the_queue() {
    let server = support::RedisServer::start();
    let small = departure_costs(&server, 100);
    let large = departure_costs(&server, 10_000);
    eprintln!("commands at 100 waiters:    {small:?}\ncommands at 10,000 waiters: {large:?}");
    assert_eq!(small, large);
    for (what, n) in &small {
        assert!(*n <= 30, "{what}: {n} commands");
    }
}

/// Mass departures in random order: every cancel costs the same few commands.
#[test]
fn waiters_leaving_in_random_order_cost_a_constant_each() {
    let server = support::RedisServer::start();
    let mut s = Script::new(&server, "mass");
    s.put(1, 1_000_000);
    s.call("acquire", &Script::acquire_args("holder", 1, None));
    let n = 3_000_u64;
    s.pipeline((0..n).map(|i| ("acquire", Script::acquire_args(&format!("w{i}"), 1, None))));
    // A fixed permutation (multiplication by a unit mod n).
    let order: Vec<u64> = (0..n).map(|i| (i * 1_237 + 11) % n).collect();
    let (total, ()) = s.count(|s| {
        for i in &order {
            let r = s.call("cancel", &[format!("w{i}"), "drop".into()]);
            assert_eq!(r[0], "cancelled", "{r:?}");
        }
    });
    eprintln!(
        "{n} waiters left in random order: {total} commands, {} per cancel",
        total / n
    );
    assert!(total <= 20 * n, "{total} commands for {n} cancels");
    assert_eq!(
        s.hlen(1),
        3,
        "only the holder's record, its entry and the hot value are left"
    );
}

/// The cancel of a dropped acquire that was granted at once (its caller never saw the reply)
/// finds the grant by the waiter's key, whatever the number of holders.
#[test]
fn a_dropped_immediate_grant_is_found_at_any_number_of_holders() {
    let server = support::RedisServer::start();
    let mut costs = Vec::new();
    for holders in [10_u64, 10_000] {
        let mut s = Script::new(&server, &format!("imm{holders}"));
        s.put(u32::try_from(holders).unwrap(), 1_000);
        s.pipeline(
            (0..holders).map(|i| ("acquire", Script::acquire_args(&format!("h{i}"), 1, None))),
        );
        let (c, r) = s.count(|s| s.call("cancel", &[format!("h{}", holders / 2), "drop".into()]));
        assert_eq!(r[0], "decided", "{r:?}");
        assert!(r[1].starts_with("G|"), "{r:?}");
        costs.push(c);
    }
    assert_eq!(costs[0], costs[1], "{costs:?}");
}

/// At saturation (a standing queue), a grant (an acquire that queues and a release that hands
/// its permit to the head) costs at most 12 commands in all, `TIME` included: 4 for the queued
/// acquire, 6 for the release (with the test's clock the script reads no `TIME`, so 2 fewer
/// are counted here), each script call counted too; no outcome is kept once its grant is
/// released, whatever the wait (bounded memory).
#[test]
fn a_contended_grant_costs_at_most_twelve_commands_and_keeps_nothing() {
    let server = support::RedisServer::start();
    let mut s = Script::new(&server, "sat");
    let limit = 8_u64;
    s.put(u32::try_from(limit).unwrap(), 10_000);
    let mut held: Vec<String> = Vec::new();
    for i in 0..limit {
        let r = s.call("acquire", &Script::acquire_args(&format!("h{i}"), 1, None));
        assert_eq!(r[0], "granted");
        held.push(r[1].clone());
    }
    let mut next = 0_u64;
    for i in 0..56 {
        let r = s.call("acquire", &Script::acquire_args(&format!("q{i}"), 1, None));
        assert_eq!(r[0], "queued");
    }
    let (mut acquire_most, mut release_most) = (0, 0);
    let mut per_command: BTreeMap<String, u64> = BTreeMap::new();
    for round in 0..500_u64 {
        s.now += 10;
        let token = held.remove(0);
        // Its caller's channel named, as the saturated bench's releases do: the head (a waiter
        // of the same store) is answered in the reply, nothing is published.
        let (c, r) = s.count(|s| s.call("release", &[token, "cost-channel".into()]));
        assert_eq!(r[..2], ["released", "1"]);
        release_most = release_most.max(c);
        if round == 0 {
            per_command.extend(s.last_commands.clone());
        }
        // The head's grant is recorded with its holder: take its token from there.
        let key = format!("q{next}");
        next += 1;
        let entry: String = redis::cmd("HGET")
            .arg(&s.keys[1])
            .arg(format!("k:{key}"))
            .query(&mut s.conn)
            .unwrap();
        assert!(entry.starts_with("G|"), "{entry}");
        held.push(entry.split('|').nth(1).unwrap().to_owned());
        let (c, r) = s.count(|s| {
            s.call(
                "acquire",
                &Script::acquire_args(&format!("q{}", 56 + round), 1, None),
            )
        });
        assert_eq!(r[0], "queued");
        acquire_most = acquire_most.max(c);
        if round == 0 {
            for (cmd, n) in s.last_commands.clone() {
                *per_command.entry(cmd).or_default() += n;
            }
        }
    }
    eprintln!("one grant at saturation, by command: {per_command:?}");
    eprintln!("at saturation: acquire (queued) {acquire_most} commands, release (granting the head) {release_most}");
    // Informational (not asserted: time varies): Redis's own time per script call.
    let (_, ()) = s.count(|s| {
        for round in 0..500_u64 {
            s.now += 10;
            let token = held.remove(0);
            s.call("release", &[token]);
            let entry: String = redis::cmd("HGET")
                .arg(&s.keys[1])
                .arg(format!("k:q{}", next + round))
                .query(&mut s.conn)
                .unwrap();
            held.push(entry.split('|').nth(1).unwrap().to_owned());
            s.call(
                "acquire",
                &Script::acquire_args(&format!("q{}", 556 + round), 1, None),
            );
        }
        let info: String = redis::cmd("INFO")
            .arg("commandstats")
            .query(&mut s.conn)
            .unwrap();
        for l in info.lines().filter(|l| l.starts_with("cmdstat_evalsha")) {
            eprintln!("Redis time per script call at saturation: {l}");
        }
    });
    // Without the test's clock, each script call also runs `TIME`: 2 per grant.
    let per_grant = acquire_most + release_most + 2;
    assert!(
        per_grant <= 12,
        "a grant: {per_grant} commands (acquire {acquire_most}, release {release_most}, 2 TIME)"
    );
    // The release's holder read and hot read are one HMGET; its writes of the hot value, the
    // new holder's record and the head's outcome one HSET (as the queued acquire's entry and
    // hot); the release's two lease writes one ZADD (the new holder inherits the lease slot).
    for (cmd, n) in [
        ("hget", 1),
        ("hmget", 1),
        ("hset", 2),
        ("zadd", 2),
        ("zpopmin", 1),
    ] {
        assert_eq!(per_command.get(cmd), Some(&n), "{cmd}: {per_command:?}");
    }
    for cmd in ["get", "set", "zrem"] {
        assert_eq!(per_command.get(cmd), None, "{cmd}: {per_command:?}");
    }
    assert_eq!(s.hlen(6), 0, "no outcome kept apart from the holders");
    // The holders hash: each holder's record, its outcome and its lease slot's two fields (each
    // holder here was handed its slot), each queued waiter's entry, and the hot value.
    assert_eq!(s.hlen(1), 4 * limit + 56 + 1);
}

/// A release that names its caller's channel answers the grant of a waiter of that channel
/// (the same store) in its own reply, before the last field, and publishes nothing; a waiter
/// of another channel is still woken over pub/sub. On the fast path and the general one.
#[test]
fn a_release_answers_its_own_stores_waiter_in_its_reply() {
    let server = support::RedisServer::start();
    for (name, op) in [
        ("local-fast", "release"),
        ("local-general", "release@general"),
    ] {
        let mut s = Script::new(&server, name);
        s.put(1, 100);
        let held = s.call("acquire", &Script::acquire_args("h", 1, None))[1].clone();
        // q0 waits on this store's channel (`cost-channel`), q1 on another store's.
        let r = s.call("acquire", &Script::acquire_args("q0", 1, None));
        assert_eq!(r[0], "queued");
        let mut other = Script::acquire_args("q1", 1, None);
        other[4] = "other-channel".into();
        assert_eq!(s.call("acquire", &other)[0], "queued");
        s.now += 10;
        let local = vec![held, "cost-channel".to_owned()];
        let (_, r) = s.count(|s| s.call(op, &local));
        let published = |s: &mut Script| {
            let info: String = redis::cmd("INFO")
                .arg("commandstats")
                .query(&mut s.conn)
                .unwrap();
            commands(&info).get("publish").copied().unwrap_or(0)
        };
        assert_eq!(published(&mut s), 0, "{op}: q0's grant was published");
        // released, 1, q0, its outcome, the next deadline.
        assert_eq!(r.len(), 5, "{op}: {r:?}");
        assert_eq!(r[..3], ["released", "1", "q0"], "{op}");
        assert!(r[3].starts_with("G|"), "{op}: {r:?}");
        // The outcome is recorded all the same (a waiter that missed the reply finds it).
        let entry: String = redis::cmd("HGET")
            .arg(&s.keys[1])
            .arg("k:q0")
            .query(&mut s.conn)
            .unwrap();
        assert_eq!(entry, r[3], "{op}");
        let token = r[3].split('|').nth(1).unwrap().to_owned();
        // q0's release hands the permit to q1, of another store: published, not in the reply.
        s.now += 10;
        let (_, r) = s.count(|s| s.call(op, &[token, "cost-channel".to_owned()]));
        assert_eq!(published(&mut s), 1, "{op}: q1's grant was not published");
        assert_eq!(r.len(), 3, "{op}: {r:?}");
        assert_eq!(r[..2], ["released", "1"], "{op}");
    }
}

/// A release freeing room for several waiters answers every one of its own store's in its
/// reply, in queue order (the fast path builds a one-grant reply in one constructor and keeps
/// any further grants apart: this checks they are all there, in order), and publishes the
/// others'. Fast and general path alike.
#[test]
fn a_release_answers_several_of_its_own_stores_waiters_in_order() {
    let server = support::RedisServer::start();
    for (name, op) in [
        ("many-fast", "release"),
        ("many-general", "release@general"),
    ] {
        let mut s = Script::new(&server, name);
        s.put(3, 100);
        let held = s.call("acquire", &Script::acquire_args("h", 3, None))[1].clone();
        for (key, channel) in [
            ("q0", "cost-channel"),
            ("q1", "other-channel"),
            ("q2", "cost-channel"),
            ("q3", "cost-channel"),
        ] {
            let mut args = Script::acquire_args(key, 1, None);
            args[4] = channel.into();
            assert_eq!(s.call("acquire", &args)[0], "queued", "{op}");
        }
        s.now += 10;
        let (counted, r) = s.count(|s| s.call(op, &[held, "cost-channel".to_owned()]));
        assert!(counted > 0);
        let published = s.last_commands.get("publish").copied().unwrap_or(0);
        assert_eq!(published, 1, "{op}: only q1's grant is published");
        // released, 1, q0, its outcome, q2, its outcome, the next deadline (q3 still waits).
        assert_eq!(r.len(), 7, "{op}: {r:?}");
        assert_eq!(r[..3], ["released", "1", "q0"], "{op}");
        assert_eq!(r[4], "q2", "{op}: {r:?}");
        for (i, key) in [(3, "q0"), (5, "q2")] {
            assert!(r[i].starts_with("G|"), "{op}: {r:?}");
            let entry: String = redis::cmd("HGET")
                .arg(&s.keys[1])
                .arg(format!("k:{key}"))
                .query(&mut s.conn)
                .unwrap();
            assert_eq!(entry, r[i], "{op}: {key}'s recorded outcome");
        }
        let tokens: Vec<u64> = [3, 5]
            .map(|i| r[i].split('|').nth(1).unwrap().parse().unwrap())
            .to_vec();
        assert!(
            tokens[0] < tokens[1],
            "{op}: tokens in grant order {tokens:?}"
        );
    }
}

/// Deleting a limiter with a long queue answers its waiters in batches, each a bounded call.
#[test]
fn delete_answers_a_long_queue_in_batches() {
    let server = support::RedisServer::start();
    let mut s = Script::new(&server, "del");
    s.put(1, 1_000_000);
    s.call("acquire", &Script::acquire_args("holder", 1, None));
    s.pipeline((0..1_200).map(|i| ("acquire", Script::acquire_args(&format!("w{i}"), 1, None))));
    let (c, r) = s.count(|s| s.call("delete", &[]));
    assert_eq!(r[..2], ["deleted", "700"], "{r:?}");
    assert!(c < 520, "{c} commands");
    let mut published = 500;
    loop {
        redis::cmd("CONFIG")
            .arg("RESETSTAT")
            .query::<()>(&mut s.conn)
            .unwrap();
        let r = s.call("drain", &[]);
        let info: String = redis::cmd("INFO")
            .arg("commandstats")
            .query(&mut s.conn)
            .unwrap();
        published += commands(&info).get("publish").copied().unwrap_or(0);
        if r[1] == "0" {
            break;
        }
    }
    assert_eq!(published, 1_200, "every waiter is told once");
    assert_eq!(s.call("status", &[])[0], "unknown");
}

/// Redis's CPU (`used_cpu_user + used_cpu_sys` around batches of calls) per path of a contended
/// grant, beside a `PING` and a trivial script with the same keys in the same run: where the
/// Redis time of a grant goes (docs/redis.md). Informational, not asserted (time varies):
/// `cargo test -p floodgate --test redis_cost -- --ignored --nocapture redis_cpu_per_path`.
/// Production's way of calling: the bare op (the script reads `TIME`), one call at a time.
#[test]
#[ignore = "a measurement: prints Redis CPU per path"]
fn redis_cpu_per_path() {
    const BATCH: usize = 500;
    let server = support::RedisServer::start();
    let mut s = Script::new(&server, "cpu");
    s.put(8, 1_000_000);
    let mut sub = redis::Client::open(server.url())
        .unwrap()
        .get_connection()
        .unwrap();
    let mut pubsub = sub.as_pubsub();
    pubsub.subscribe("cost-channel").unwrap();
    let mut info = redis::Client::open(server.url())
        .unwrap()
        .get_connection()
        .unwrap();
    let mut cpu = move || -> f64 {
        let text: String = redis::cmd("INFO").arg("cpu").query(&mut info).unwrap();
        text.lines()
            .filter_map(|l| {
                l.strip_prefix("used_cpu_user:")
                    .or_else(|| l.strip_prefix("used_cpu_sys:"))
            })
            .map(|v| v.trim().parse::<f64>().unwrap())
            .sum::<f64>()
            * 1e6
    };
    // The bare op, as production sends it (the script reads TIME).
    let bare = |s: &Script, op: &str, args: &[String]| {
        let mut cmd = redis::cmd("EVALSHA");
        cmd.arg(&s.sha).arg(s.keys.len());
        for k in &s.keys {
            cmd.arg(k);
        }
        cmd.arg(op).arg(&s.name).arg(7 * 24 * 3_600_000_u64);
        for a in args {
            cmd.arg(a);
        }
        cmd
    };
    let mut tokens: std::collections::VecDeque<String> = (0..8)
        .map(|i| {
            let r: Vec<String> = bare(
                &s,
                "acquire",
                &Script::acquire_args(&format!("h{i}"), 1, None),
            )
            .query(&mut s.conn)
            .unwrap();
            r[1].clone()
        })
        .collect();
    let trivial = redis::Script::new("return 1");
    let mut rows: BTreeMap<&str, Vec<f64>> = BTreeMap::new();
    let mut n = 0;
    for round in 0..6 {
        let mut time = |rows: &mut BTreeMap<&str, Vec<f64>>, what, f: &mut dyn FnMut()| {
            let c0 = cpu();
            f();
            rows.entry(what)
                .or_default()
                .push((cpu() - c0) / BATCH as f64);
        };
        time(&mut rows, "PING", &mut || {
            for _ in 0..BATCH {
                redis::cmd("PING").query::<String>(&mut s.conn).unwrap();
            }
        });
        time(&mut rows, "trivial script, the same 11 keys", &mut || {
            for _ in 0..BATCH {
                let mut inv = trivial.prepare_invoke();
                for k in &s.keys {
                    inv.key(k);
                }
                inv.arg("release").arg(&s.name).arg(1).arg("1");
                inv.invoke::<i64>(&mut s.conn).unwrap();
            }
        });
        time(&mut rows, "release of a token nobody holds", &mut || {
            for _ in 0..BATCH {
                bare(&s, "release", &["1".to_owned()])
                    .query::<Vec<String>>(&mut s.conn)
                    .unwrap();
            }
        });
        time(&mut rows, "acquire, queued", &mut || {
            for _ in 0..BATCH {
                n += 1;
                let r: Vec<String> = bare(
                    &s,
                    "acquire",
                    &Script::acquire_args(&format!("q{n}"), 1, None),
                )
                .query(&mut s.conn)
                .unwrap();
                assert_eq!(r[0], "queued");
            }
        });
        // Alternately: the head's grant published to a subscriber, or (naming the waiter's
        // channel, as a release of the same store does) answered in the reply.
        let local = round % 2 == 1;
        let what = if local {
            "release granting the head, in its reply"
        } else {
            "release granting the head, published"
        };
        time(&mut rows, what, &mut || {
            for _ in 0..BATCH {
                let token = tokens.pop_front().unwrap();
                let mut args = vec![token];
                if local {
                    args.push("cost-channel".into());
                }
                let r: Vec<String> = bare(&s, "release", &args).query(&mut s.conn).unwrap();
                assert_eq!(r[..2], ["released", "1"]);
                let outcome = if local {
                    r[3].clone()
                } else {
                    let msg: String = pubsub.get_message().unwrap().get_payload().unwrap();
                    msg.rsplit('\n').next().unwrap().to_owned()
                };
                tokens.push_back(outcome.split('|').nth(1).unwrap().to_owned());
            }
        });
    }
    eprintln!("Redis CPU per call, median of the batches of {BATCH}:");
    for (what, mut v) in rows {
        v.sort_by(f64::total_cmp);
        eprintln!("  {what:<45} {:>6.1} us", v[v.len() / 2]);
    }
}

/// A release's handoff passes its lease slot to the head (one `ZADD`, no `ZREM`): the new
/// holder is listed under its own token, its extend moves the slot's deadline, a second
/// handoff passes the slot on, and when its lease lapses it ends as any other (counted
/// expired, its fields gone, its outcome kept for a waiter that never saw it).
#[test]
fn a_handed_off_lease_slot_is_listed_extended_passed_on_and_lapses() {
    let server = support::RedisServer::start();
    let mut s = Script::new(&server, "slots");
    // The holders listing reads Redis's clock: the test clock starts there.
    let t: (u64, u64) = redis::cmd("TIME").query(&mut s.conn).unwrap();
    s.now = t.0 * 1_000_000 + t.1;
    s.put(1, 100);
    let h = s.call("acquire", &Script::acquire_args("h", 1, None))[1].clone();
    for q in ["q0", "q1"] {
        assert_eq!(
            s.call("acquire", &Script::acquire_args(q, 1, None))[0],
            "queued"
        );
    }
    let hget = |s: &mut Script, field: &str| -> Option<String> {
        redis::cmd("HGET")
            .arg(&s.keys[1])
            .arg(field)
            .query(&mut s.conn)
            .unwrap()
    };
    let leases = |s: &mut Script| -> Vec<(String, u64)> {
        redis::cmd("ZRANGE")
            .arg(&s.keys[2])
            .arg(0)
            .arg(-1)
            .arg("WITHSCORES")
            .query(&mut s.conn)
            .unwrap()
    };
    let listed = |s: &mut Script| -> Vec<String> {
        let script = redis::Script::new(include_str!("../src/store/redis/holders.lua"));
        let mut inv = script.prepare_invoke();
        for i in [0, 1, 2, 3, 8] {
            inv.key(&s.keys[i]);
        }
        inv.key(format!("fg:{{{}}}:kqueue", s.name))
            .key(format!("fg:{{{}}}:kheads", s.name))
            .arg(10);
        inv.invoke(&mut s.conn).unwrap()
    };
    s.now += 10;
    let r = s.call("release", &[h.clone(), "cost-channel".into()]);
    let q0: Vec<&str> = r[3].split('|').collect();
    let (t0, d0) = (q0[1].to_owned(), q0[4].parse::<u64>().unwrap());
    assert_eq!(
        hget(&mut s, &format!("l:{t0}")).as_deref(),
        Some(h.as_str())
    );
    assert_eq!(hget(&mut s, &format!("s:{h}")), Some(t0.clone()));
    assert_eq!(leases(&mut s), [(h.clone(), d0)]);
    let l = listed(&mut s);
    assert_eq!(l[2], "1", "{l:?}");
    assert_eq!(l[7], t0, "{l:?}");
    // The extend moves the slot's deadline.
    s.now += 10;
    let r = s.call(
        "extend",
        &[t0.clone(), (2 * HOUR_US).to_string(), String::new()],
    );
    assert_eq!(r[0], "extended", "{r:?}");
    let d0: u64 = r[1].parse().unwrap();
    assert_eq!(leases(&mut s), [(h.clone(), d0)]);
    // The general path's release (q0 → q1) gives the slot back; q1 gets one of its own.
    s.now += 10;
    let r = s.call("release@general", &[t0.clone(), "cost-channel".into()]);
    let t1 = r[3].split('|').nth(1).unwrap().to_owned();
    for field in [format!("l:{t0}"), format!("s:{h}"), t0.clone()] {
        assert_eq!(hget(&mut s, &field), None, "{field}");
    }
    assert_eq!(leases(&mut s).len(), 1);
    assert_eq!(leases(&mut s)[0].0, t1);
    // A new waiter, handed q1's slot on the fast path; then its lease lapses.
    assert_eq!(
        s.call("acquire", &Script::acquire_args("q2", 1, None))[0],
        "queued"
    );
    s.now += 10;
    let r = s.call("release", &[t1.clone(), "cost-channel".into()]);
    let t2 = r[3].split('|').nth(1).unwrap().to_owned();
    assert_eq!(hget(&mut s, &format!("s:{t1}")), Some(t2.clone()));
    assert_eq!(listed(&mut s)[7], t2);
    s.now += HOUR_US + 1;
    s.call("advance", &[]);
    let status = s.call("status", &[]);
    let schema = floodgate::store::redis::status_schema();
    let field = |name: &str| &status[1 + schema.iter().position(|f| *f == name).unwrap()];
    assert_eq!(field("in_use"), "0");
    assert_eq!(field("expired"), "1");
    assert!(leases(&mut s).is_empty());
    assert_eq!(s.hlen(1), 1, "only the hot value is left in holders");
    let kept: Option<String> = redis::cmd("HGET")
        .arg(&s.keys[6])
        .arg("q2")
        .query(&mut s.conn)
        .unwrap();
    assert!(kept.is_some_and(|o| o.starts_with("G|")));
}
