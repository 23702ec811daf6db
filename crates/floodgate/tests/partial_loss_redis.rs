//! One of a limiter's Redis keys lost while the others remain (an operator's `DEL`, an eviction
//! the guard did not see, a key that expired before the others): the script must take it for a
//! lost limiter (re-created in a learning window, where holders re-adopt their permits), never
//! for an empty one. The witness: the permits this test holds, counted by the test itself; at
//! no point may they and the new grants together exceed the limit.

#![cfg(feature = "redis")]
// (`support/script.rs`, shared with the other script-level tests, unwraps.)
#![allow(clippy::unwrap_used)]

#[path = "support/script.rs"]
mod script;
mod support;

use std::time::Duration;

use floodgate::{
    AcquireOptions, Floodgate, KeyedSpec, Limiter, LimiterSpec, Permit, RedisConfig, RedisStore,
};

type RedisLimiter = floodgate::store::redis::RedisLimiter;

const LIMIT: u32 = 4;

/// Two stores (two servers' worth of clients) on one Redis, both knowing the limiter.
struct Setup {
    server: support::RedisServer,
    holder: Limiter<RedisLimiter>,
    other: Limiter<RedisLimiter>,
    _gates: [Floodgate<RedisStore>; 2],
}

async fn gate(server: &support::RedisServer) -> Floodgate<RedisStore> {
    let mut config = RedisConfig::new(server.url());
    // Longer than the dead holder's lease: a holder that heartbeats less often than the window
    // is taken for gone when it ends (docs/learning.md), which is not what is tested here. And
    // longer than a stall of this test: its holders re-adopt only after the first grab, so a
    // window ended within that grab (2 s did, stopped 1-3 s) rightly grants their permits.
    config.learning_window = Some(Duration::from_millis(6000));
    Floodgate::with_store(RedisStore::connect(config).await.expect("connect"))
}

/// How a keyed limiter is defined (every grant of the test is for one key): `Total`: the total
/// is the limit (the key's share is twice that); `Key`: the key's share is (the total twice it).
#[derive(Clone, Copy, PartialEq)]
enum Kind {
    Plain,
    Total,
    Key,
}

async fn setup(name: &str, kind: Kind) -> Setup {
    let server = support::RedisServer::start();
    let a = gate(&server).await;
    let b = gate(&server).await;
    let lease = Duration::from_secs(60);
    let spec = LimiterSpec::concurrency(LIMIT).with_default_lease(lease);
    let double = LimiterSpec::concurrency(2 * LIMIT).with_default_lease(lease);
    if kind == Kind::Total {
        a.define_keyed(name, spec, KeyedSpec::per_key(2 * LIMIT))
            .await
            .expect("define keyed");
    } else if kind == Kind::Key {
        a.define_keyed(name, double, KeyedSpec::per_key(LIMIT))
            .await
            .expect("define keyed");
    } else {
        a.define(name, spec).await.expect("define");
    }
    let holder = a.limiter(name).await.expect("limiter");
    let other = b.limiter(name).await.expect("limiter");
    // The other store reads the spec, so it too can re-create the limiter.
    other.status().await.expect("status");
    Setup {
        server,
        holder,
        other,
        _gates: [a, b],
    }
}

fn on(keyed: bool) -> AcquireOptions {
    if keyed {
        AcquireOptions::new().key("k")
    } else {
        AcquireOptions::new()
    }
}

/// Takes every permit `limiter` grants at once (up to twice the limit), and returns them.
async fn grab(limiter: &Limiter<RedisLimiter>, keyed: bool) -> Vec<Permit<RedisLimiter>> {
    let mut got = Vec::new();
    for _ in 0..2 * LIMIT {
        if let Ok(p) = limiter.acquire(on(keyed).wait(Duration::ZERO)).await {
            got.push(p);
        }
    }
    got
}

/// What runs first after the key is lost.
#[derive(Clone, Copy, PartialEq)]
enum First {
    /// The other store asks for permits (the general path: the limit is taken, no wait).
    Acquire,
    /// A holder releases its permit (the fast path, on a plain limiter).
    Release,
}

/// Holds the limit (one permit on a short lease, detached: a holder that died; and a waiter of
/// the other store queued when `key` is the queue), deletes `key` of the limiter, and checks that the other store's
/// grants and the permits still held never exceed the limit: at once, after the holders
/// heartbeat (they re-adopt, or are told lost), and after the learning window. Then the dead
/// holder's permit comes back (nothing stays counted that nobody holds).
async fn lose_one_key(name: &str, key: &str, kind: Kind, first: First) {
    let keyed = kind != Kind::Plain;
    let s = setup(name, kind).await;
    let mut held = grab(&s.holder, keyed).await;
    assert_eq!(held.len(), LIMIT as usize, "the limit is held");
    // One holder dies: its lease (short) is never extended.
    drop(held.pop());
    let dead = s
        .holder
        .acquire(on(keyed).lease(Duration::from_millis(1000)))
        .await
        .expect("the dead holder's permit");
    let dead_until = dead.local_deadline();
    // Its lease's end on the store's clock, which stamps every grant too: the dead holder
    // counts at a grant made before it (its holder stops at `dead_until`, no later).
    let dead_lease_end = dead.detach().lease_deadline;
    // A waiter of the other store, when the queue is what is lost.
    let waiter = (key == "queue").then(|| {
        let other = s.other.clone();
        tokio::spawn(async move {
            other
                .acquire(on(keyed).wait(Duration::from_secs(3)))
                .await
                .ok()
        })
    });
    if waiter.is_some() {
        support::until_status(&s.holder, "the waiter queued", |st| st.waiting == 1).await;
    }
    let full = format!("fg:{{{name}}}:{key}");
    assert_eq!(
        support::cli(s.server.port, &["DEL", &full]),
        "1",
        "{full} existed"
    );
    let mut granted = Vec::new();
    if first == First::Release {
        let p = held.pop().expect("a holder");
        p.release().await.expect("release");
    }
    // The most permits out at once, `base` (the permits this test holds from before the loss)
    // and the dead holder's included: at each grant, the grants made up to it, and the dead
    // holder if its lease had not ended. (Not the dead holder's lease against this process's
    // clock read around a grab: a test stalled past the learning window, which outlasts that
    // lease, is rightly granted the dead holder's permit, after the clock was read.)
    let most_out = |base: usize, granted: &[Permit<RedisLimiter>]| {
        let mut at: Vec<_> = granted.iter().map(|p| p.grant().granted_at).collect();
        at.sort();
        at.iter()
            .enumerate()
            .map(|(i, &g)| base + i + 1 + usize::from(g < dead_lease_end))
            .fold(base, usize::max)
    };
    granted.extend(grab(&s.other, keyed).await);
    let out = most_out(held.len(), &granted);
    assert!(
        out <= LIMIT as usize,
        "{out} out at once ({} held, the dead holder, {} granted) after {key} was lost: over \
         the limit of {LIMIT}",
        held.len(),
        granted.len()
    );
    // Heartbeats: each holder (those granted since too) re-adopts its permit or is told it is
    // lost.
    let mut kept = Vec::new();
    for mut p in held.drain(..).chain(granted.drain(..)) {
        if p.extend(Duration::from_secs(60)).await.is_ok() {
            kept.push(p);
        }
    }
    granted.extend(grab(&s.other, keyed).await);
    let out = most_out(kept.len(), &granted);
    assert!(
        out <= LIMIT as usize,
        "{out} out at once ({} re-adopted, the dead holder, {} granted): over the limit of \
         {LIMIT}",
        kept.len(),
        granted.len()
    );
    if let Some(waiter) = waiter {
        granted.extend(waiter.await.expect("the waiter's task"));
    }
    // Until the dead holder's lease has ended: never over the limit, and every permit nobody
    // holds comes back (a liveness bound only).
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let now = std::time::Instant::now();
        // (Read before the grab: a liveness condition only.)
        let dead_may_run = tokio::time::Instant::now() < dead_until;
        granted.extend(grab(&s.other, keyed).await);
        let out = most_out(kept.len(), &granted);
        assert!(
            out <= LIMIT as usize,
            "{out} out at once ({} re-adopted, the dead holder, {} granted): over the limit of \
             {LIMIT}",
            kept.len(),
            granted.len()
        );
        if !dead_may_run && kept.len() + granted.len() == LIMIT as usize {
            break;
        }
        assert!(
            now < deadline,
            "permits nobody holds never came back: {} re-adopted, {} granted",
            kept.len(),
            granted.len()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // The limiter works again: a release frees its permit, and only it.
    let p = kept.pop().or_else(|| granted.pop()).expect("a permit");
    p.release().await.expect("release");
    let after = grab(&s.other, keyed).await;
    assert_eq!(
        after.len(),
        1,
        "the released permit, and only it, is granted"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn losing_holders_grants_nothing_over_the_held_permits() {
    lose_one_key("lh", "holders", Kind::Plain, First::Acquire).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn losing_meta_grants_nothing_over_the_held_permits() {
    lose_one_key("lm", "meta", Kind::Plain, First::Acquire).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn losing_meta_then_a_release_grants_nothing_over_the_held_permits() {
    lose_one_key("lmr", "meta", Kind::Plain, First::Release).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn losing_a_keyed_limiters_meta_grants_nothing_over_the_total() {
    lose_one_key("klm", "meta", Kind::Total, First::Acquire).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn losing_a_keyed_limiters_meta_grants_nothing_over_a_keys_share() {
    lose_one_key("kkm", "meta", Kind::Key, First::Acquire).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn losing_leases_grants_nothing_over_the_held_permits() {
    lose_one_key("ll", "leases", Kind::Plain, First::Acquire).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn losing_a_keyed_limiters_holders_grants_nothing_over_the_held_permits() {
    lose_one_key("klh", "holders", Kind::Total, First::Acquire).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn losing_a_keyed_limiters_key_states_grants_nothing_over_the_held_permits() {
    lose_one_key("kks", "kstate", Kind::Key, First::Acquire).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn losing_a_keyed_limiters_leases_grants_nothing_over_the_held_permits() {
    lose_one_key("kll", "leases", Kind::Total, First::Acquire).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn losing_holders_then_a_release_grants_nothing_over_the_held_permits() {
    lose_one_key("lhr", "holders", Kind::Plain, First::Release).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn losing_leases_then_a_release_on_the_fast_path_loses_no_permit() {
    lose_one_key("llr", "leases", Kind::Plain, First::Release).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn losing_the_queue_grants_nothing_over_the_held_permits() {
    lose_one_key("lq", "queue", Kind::Plain, First::Acquire).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn losing_the_queue_then_a_release_on_the_fast_path_grants_nothing_over() {
    lose_one_key("lqr", "queue", Kind::Plain, First::Release).await;
}

/// The script called directly, with an idle TTL short enough to see keys expire (a store never
/// sends one under a day: `RedisConfig::idle_ttl`), on the real clock.
fn call(
    conn: &mut redis::Connection,
    sc: &redis::Script,
    keys: &[String],
    op: &str,
    ttl_ms: u64,
    args: &[&str],
) -> Vec<String> {
    let mut inv = sc.prepare_invoke();
    for k in keys {
        inv.key(k);
    }
    inv.arg(op).arg("ttl").arg(ttl_ms);
    for a in args {
        inv.arg(*a);
    }
    inv.invoke(conn).expect("the script runs")
}

fn pttl(conn: &mut redis::Connection, key: &str) -> i64 {
    redis::cmd("PTTL").arg(key).query(conn).expect("pttl")
}

/// In normal operation, with no key touched by hand: a grant on the general path (a limiter
/// with a rate and a concurrency limit takes it for every acquire) into an empty limiter gave
/// `holders` a fresh TTL, so it outlived `meta` (whose TTL only the hourly refresh renews).
/// Once `meta` expired, `hot` in `holders` made the limiter look alive with no spec at all:
/// no concurrency limit, so every acquire was granted. `holders` must keep `meta`'s TTL, and
/// state without `meta` must be nobody's.
#[test]
fn holders_never_outlive_meta_and_state_without_meta_grants_nothing() {
    let (_server, mut conn, sc) = script::script_on_redis();
    let keys = floodgate::store::redis::limiter_keys("fg", "ttl");
    // Far longer than any stall between the put and the acquire (with 1.5 s, a stalled test
    // found `meta` expired and the acquire answered `unknown`); the 300 ms sleep is what lets
    // a fresh TTL on `holders` show above `meta`'s.
    let ttl_ms = 60_000;
    // concurrency 1, lease 60 s, wait 0, queue 10, rate 1000 per s, burst 1000.
    let put = [
        "1", "60000000", "0", "10", "1", "1000", "1000000", "1000", "", "", "", "", "", "", "", "",
    ];
    assert_eq!(
        call(&mut conn, &sc, &keys, "put", ttl_ms, &put)[0],
        "status"
    );
    std::thread::sleep(Duration::from_millis(300));
    let grant = ["1", "", "", "", "", "", ""];
    let first = call(&mut conn, &sc, &keys, "acquire", ttl_ms, &grant);
    assert_eq!(first[0], "granted", "{first:?}");
    let (meta, holders) = (pttl(&mut conn, &keys[0]), pttl(&mut conn, &keys[1]));
    assert!(
        meta > 0 && holders <= meta,
        "holders expire after meta: {holders} ms > {meta} ms"
    );
    // `meta` gone alone (expired, or deleted: the same to the script), the rest still there.
    redis::cmd("DEL")
        .arg(&keys[0])
        .query::<()>(&mut conn)
        .expect("del");
    for _ in 0..3 {
        let r = call(&mut conn, &sc, &keys, "acquire", ttl_ms, &grant);
        assert_eq!(r[0], "unknown", "state without meta answered {r:?}");
    }
}

/// Each key's TTL is renewed by its own `PEXPIRE`, and Redis (7.0) reads the clock afresh for
/// each one, even inside a script: renewed before the others, `meta` got the earliest deadline,
/// so the other keys (`holders` with `hot`) outlived it by the time the script took between
/// them (a millisecond now and then; more on a loaded machine, where the TTL test above then
/// read `holders` above `meta`). Every put renews every key; across many, no key's deadline
/// may pass `meta`'s. (`PEXPIRETIME`: the deadlines themselves, not TTLs read at two moments.)
#[test]
fn no_key_of_a_limiter_outlives_its_meta() {
    let (_server, mut conn, sc) = script::script_on_redis();
    let keys = floodgate::store::redis::limiter_keys("fg", "renewed");
    // `PEXPIRETIME` came with Redis 7.0; an older Redis (which the store supports) cannot show
    // the deadlines, so the test says so instead of failing on the missing command.
    let info: String = redis::cmd("INFO")
        .arg("server")
        .query(&mut conn)
        .expect("info");
    let major = info
        .lines()
        .find_map(|l| l.strip_prefix("redis_version:"))
        .and_then(|v| v.split('.').next()?.trim().parse::<u32>().ok())
        .expect("redis_version in INFO");
    if major < 7 {
        eprintln!("skipped: Redis {major}.x has no PEXPIRETIME");
        return;
    }
    let ttl_ms = 60_000;
    // concurrency 1, lease 60 s, wait up to 10 s, queue 10, rate 1000 per s, burst 1000.
    let put = [
        "1", "60000000", "10000000", "10", "1", "1000", "1000000", "1000", "", "", "", "", "", "",
        "", "",
    ];
    assert_eq!(
        call(&mut conn, &sc, &keys, "put", ttl_ms, &put)[0],
        "status"
    );
    // A holder and a waiter, so `leases`, `queue` and `waits` exist too.
    let held = call(
        &mut conn,
        &sc,
        &keys,
        "acquire",
        ttl_ms,
        &["1", "", "", "g", "ch", "", ""],
    );
    assert_eq!(held[0], "granted", "{held:?}");
    let waiter = call(
        &mut conn,
        &sc,
        &keys,
        "acquire",
        ttl_ms,
        &["1", "", "", "w", "ch", "", ""],
    );
    assert_eq!(waiter[0], "queued", "{waiter:?}");
    let deadline = |conn: &mut redis::Connection, key: &str| -> i64 {
        redis::cmd("PEXPIRETIME")
            .arg(key)
            .query(conn)
            .expect("pexpiretime")
    };
    let mut renewed = 0;
    for _ in 0..3000 {
        assert_eq!(
            call(&mut conn, &sc, &keys, "put", ttl_ms, &put)[0],
            "status"
        );
        let meta = deadline(&mut conn, &keys[0]);
        assert!(meta > 0, "meta has a deadline: {meta}");
        for key in &keys[1..9] {
            let at = deadline(&mut conn, key);
            // (-2: a key that does not exist.)
            assert!(at <= meta, "{key} expires at {at}, after meta at {meta}");
            renewed += usize::from(at > 0);
        }
    }
    assert!(
        renewed >= 3 * 3000,
        "holders, leases and queue were renewed each time"
    );
}

/// The fast path's own checks (it loads no state): a release that finds `queue` empty while
/// `hot` counts a waiter, or its holder's lease slot missing from `leases`, makes it a whole
/// loss (`unknown`, `meta` deleted) instead of going on without the lost waiters or leases.
#[test]
fn a_fast_path_release_that_finds_a_key_lost_answers_unknown() {
    let (_server, mut conn, sc) = script::script_on_redis();
    for (i, lost) in ["queue", "leases"].into_iter().enumerate() {
        let keys = floodgate::store::redis::limiter_keys("fg", &format!("fast{i}"));
        let ttl_ms = 3_600_000;
        // concurrency 1, lease 60 s, wait up to 10 s, queue 10, no rate.
        let put = [
            "1", "60000000", "10000000", "10", "1", "", "", "", "", "", "", "", "", "", "", "",
        ];
        assert_eq!(
            call(&mut conn, &sc, &keys, "put", ttl_ms, &put)[0],
            "status"
        );
        let held = call(
            &mut conn,
            &sc,
            &keys,
            "acquire",
            ttl_ms,
            &["1", "", "", "g1", "ch", "", ""],
        );
        assert_eq!(held[0], "granted", "{held:?}");
        let waiter = call(
            &mut conn,
            &sc,
            &keys,
            "acquire",
            ttl_ms,
            &["1", "", "", "w1", "ch", "", ""],
        );
        assert_eq!(waiter[0], "queued", "{waiter:?}");
        let key = &keys[if lost == "queue" { 3 } else { 2 }];
        redis::cmd("DEL")
            .arg(key)
            .query::<()>(&mut conn)
            .expect("del");
        let r = call(&mut conn, &sc, &keys, "release", ttl_ms, &[&held[1], ""]);
        assert_eq!(r[0], "unknown", "{lost} lost: the release answered {r:?}");
        let r = call(&mut conn, &sc, &keys, "status", ttl_ms, &[]);
        assert_eq!(r[0], "unknown", "{lost} lost: then {r:?}");
    }
}
