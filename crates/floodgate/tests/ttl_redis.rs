//! Keys that expire on their own: every key of a limiter in use, plain or keyed, has its TTL
//! renewed (none is left to run out while the others are kept), and so has the listing set.
//! Elapsed time is simulated by lowering TTLs by hand (`age`) and clearing the hourly refresh
//! mark in `hot`, never by sleeping: what is checked is which keys an operation renews.

#![cfg(feature = "redis")]
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::time::{Duration, Instant};

use floodgate::{
    AcquireOptions, Floodgate, KeyOverride, KeyedSpec, Limiter, LimiterBackend, LimiterSpec,
    RateSpec, RedisConfig, RedisLimiter, RedisStore,
};

/// The TTL `age` leaves every key with: far below any a store sets (a day at least).
const AGED_MS: i64 = 100_000;
const REGISTRY: &str = "fg:limiters";

async fn gate(server: &support::RedisServer) -> Floodgate<RedisStore> {
    Floodgate::with_store(
        RedisStore::connect(RedisConfig::new(server.url()))
            .await
            .expect("connect"),
    )
}

fn conn(server: &support::RedisServer) -> redis::Connection {
    redis::Client::open(server.url())
        .unwrap()
        .get_connection()
        .unwrap()
}

fn keys_of(conn: &mut redis::Connection, name: &str) -> Vec<String> {
    let mut keys: Vec<String> = redis::cmd("KEYS")
        .arg(format!("fg:{{{name}}}:*"))
        .query(conn)
        .unwrap();
    keys.sort();
    keys
}

fn pttl(conn: &mut redis::Connection, key: &str) -> i64 {
    redis::cmd("PTTL").arg(key).query(conn).unwrap()
}

fn pexpire(conn: &mut redis::Connection, key: &str, ms: i64) {
    let _: () = redis::cmd("PEXPIRE").arg(key).arg(ms).query(conn).unwrap();
}

/// As if the limiter's keys had last been renewed long ago and the hourly refresh were due:
/// every key left with `AGED_MS`, and `ttl_at` (the 7th number of the packed `hot` value,
/// `lua/common.lua`) set to 0.
fn age(conn: &mut redis::Connection, name: &str) {
    for key in keys_of(conn, name) {
        pexpire(conn, &key, AGED_MS);
    }
    let holders = format!("fg:{{{name}}}:holders");
    let mut hot: Vec<u8> = redis::cmd("HGET")
        .arg(&holders)
        .arg("hot")
        .query(conn)
        .unwrap();
    hot[50..58].copy_from_slice(&0f64.to_le_bytes());
    let _: () = redis::cmd("HSET")
        .arg(&holders)
        .arg("hot")
        .arg(hot)
        .query(conn)
        .unwrap();
}

/// Every key of the limiter has its TTL renewed (none left at `AGED_MS`).
fn all_renewed(conn: &mut redis::Connection, name: &str, after: &str, expected: &[&str]) {
    let keys = keys_of(conn, name);
    for kind in expected {
        assert!(
            keys.contains(&format!("fg:{{{name}}}:{kind}")),
            "{name}: no {kind} key to check: {keys:?}"
        );
    }
    for key in keys {
        let ttl = pttl(conn, &key);
        assert!(ttl > AGED_MS, "{key} not renewed by {after}: {ttl} ms left");
    }
}

/// Whatever the path that renews them (the general path's finish, a fast path's save_hot, the
/// keyed finish), all of a limiter's keys are renewed together: a key written once and never
/// again (an override, a waiter's queue entry, a holder's key share) is kept as long as the
/// limiter is used. (A guard: this held before this test was written.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_key_of_a_limiter_in_use_has_its_ttl_renewed() {
    let server = support::RedisServer::start();
    let gate = gate(&server).await;
    let mut conn = conn(&server);
    let long = Duration::from_secs(600);

    // Plain: two holders, a queued waiter for two permits (`heavy`), on the general path.
    gate.define("p", LimiterSpec::concurrency(2).with_max_wait(long))
        .await
        .unwrap();
    let p = gate.limiter("p").await.unwrap();
    let held = [
        p.acquire(AcquireOptions::new()).await.unwrap(),
        p.acquire(AcquireOptions::new()).await.unwrap(),
    ];
    let queued = p.clone();
    let waiter = tokio::spawn(async move {
        queued
            .acquire(AcquireOptions::new().permits(2).wait(long))
            .await
    });
    support::until_status(&p, "queued", |s| s.waiting == 1).await;
    age(&mut conn, "p");
    p.status().await.unwrap();
    all_renewed(
        &mut conn,
        "p",
        "a status",
        &["meta", "holders", "leases", "queue", "heavy"],
    );

    // Plain, on the fast path (an acquire granted at once reads and writes only `hot`).
    gate.define("f", LimiterSpec::concurrency(5)).await.unwrap();
    let f = gate.limiter("f").await.unwrap();
    let first = f.acquire(AcquireOptions::new()).await.unwrap();
    age(&mut conn, "f");
    let second = f.acquire(AcquireOptions::new()).await.unwrap();
    all_renewed(
        &mut conn,
        "f",
        "a fast-path acquire",
        &["meta", "holders", "leases"],
    );

    // Keyed: an override of a key never used, a holder and a waiter of another key, whose own
    // rate holds its waiter back (`ksleep`).
    let (k, key_holder, key_waiter) = keyed_in_use(&gate, long, 1).await;
    age(&mut conn, "k");
    k.status().await.unwrap();
    all_renewed(
        &mut conn,
        "k",
        "a keyed status",
        &[
            "meta",
            "holders",
            "leases",
            "waits",
            "kstate",
            "koverrides",
            "kqueue",
            "kholders",
            "kbusy",
            "ksleep",
            "kheads",
        ],
    );
    drop((held, waiter, first, second, key_holder, key_waiter));
}

/// A keyed limiter `k` in use: an override (`weight`) of a key never used (`z`), a holder of
/// key `a`, and a waiter of `a` that its rate holds back (`ksleep`).
async fn keyed_in_use(
    gate: &Floodgate<RedisStore>,
    wait: Duration,
    weight: u32,
) -> (
    floodgate::Limiter<floodgate::RedisLimiter>,
    floodgate::Permit<floodgate::RedisLimiter>,
    tokio::task::JoinHandle<
        Result<floodgate::Permit<floodgate::RedisLimiter>, floodgate::AcquireError>,
    >,
) {
    gate.define_keyed(
        "k",
        LimiterSpec::concurrency(10).with_max_wait(wait),
        KeyedSpec::per_key(2).with_rate(RateSpec::per(1, Duration::from_secs(60))),
    )
    .await
    .unwrap();
    let k = gate.limiter("k").await.unwrap();
    let over = KeyOverride {
        concurrency: Some(1),
        weight,
    };
    k.backend().put_key("z", Some(over)).await.unwrap();
    let holder = k.acquire(AcquireOptions::new().key("a")).await.unwrap();
    let queued = k.clone();
    let waiter = tokio::spawn(async move {
        queued
            .acquire(AcquireOptions::new().key("a").wait(wait))
            .await
    });
    support::until_status(&k, "queued", |s| s.waiting == 1).await;
    (k, holder, waiter)
}

/// The names in the listing set.
fn listed(conn: &mut redis::Connection) -> Vec<String> {
    redis::cmd("SMEMBERS").arg(REGISTRY).query(conn).unwrap()
}

/// The listing set (`fg:limiters`) had its TTL renewed only by a `put` or a revival: with the
/// limiters defined once and then only used, it expired `idle_ttl` (7 days by default) after
/// the last definition, while every operation kept the limiters' own keys, and the listing (the
/// dashboard, `GET /limiters`, `limiter apply`) showed none of them; `max_limiters` counted from
/// zero again. Nothing but a `put` renewed it, so its expiry is made here by hand (`DEL`). A
/// server that uses a limiter lists it again, and the set outlives the limiter's keys.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_limiter_in_use_is_listed_again_after_the_listing_set_expired() {
    let server = support::RedisServer::start();
    let mut conn = conn(&server);
    let definer = gate(&server).await;
    definer
        .define("l", LimiterSpec::concurrency(2))
        .await
        .unwrap();
    let _: () = redis::cmd("DEL").arg(REGISTRY).query(&mut conn).unwrap();
    assert!(definer.limiters().await.unwrap().is_empty());
    // Another server (or this one restarted) uses the limiter.
    let user = gate(&server).await;
    let permit = user
        .limiter("l")
        .await
        .unwrap()
        .acquire(AcquireOptions::new())
        .await
        .unwrap();
    // Added again in the background: a liveness bound only.
    let deadline = Instant::now() + Duration::from_secs(30);
    while !listed(&mut conn).contains(&"l".to_owned()) {
        assert!(
            Instant::now() < deadline,
            "a limiter in use is not listed again"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let names: Vec<String> = definer
        .limiters()
        .await
        .unwrap()
        .iter()
        .map(|s| s.name.to_string())
        .collect();
    assert_eq!(names, ["l"]);
    let (set, meta) = (pttl(&mut conn, REGISTRY), pttl(&mut conn, "fg:{l}:meta"));
    assert!(
        set > meta,
        "the listing set ({set} ms) expires before the limiter ({meta} ms)"
    );
    drop(permit);
}

/// `idle_ttl` has a floor but had no ceiling. One past Redis's range (`Duration::MAX`, a way
/// to say "never") failed every define with "value is not an integer or out of range", naming
/// nothing; one within it as text but not as the Lua number the script sends (from about 1e17
/// ms, some three million years) failed the define's script at its TTL refresh, after its
/// writes (Redis does not undo a failed script's writes). It is capped, and the
/// limiter works.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_ttl_too_long_for_redis_is_capped() {
    let server = support::RedisServer::start();
    let mut conn = conn(&server);
    for (name, idle_ttl) in [
        ("never", Duration::MAX),
        ("eons", Duration::from_millis(1_000_000_000_000_000_000)),
    ] {
        let mut config = RedisConfig::new(server.url());
        config.idle_ttl = idle_ttl;
        let gate = Floodgate::with_store(RedisStore::connect(config).await.expect("connect"));
        gate.define(name, LimiterSpec::concurrency(1))
            .await
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        let limiter = gate.limiter(name).await.unwrap();
        let permit = limiter.acquire(AcquireOptions::new()).await.unwrap();
        assert!(limiter.try_acquire().await.is_err(), "the limit holds");
        permit.release().await.unwrap();
        let again = limiter.acquire(AcquireOptions::new()).await.unwrap();
        for key in keys_of(&mut conn, name) {
            assert!(pttl(&mut conn, &key) > 0, "{key} has no TTL");
        }
        drop(again);
    }
}

/// Every key a store writes has a TTL, whatever wrote it: a key without one would outlive the
/// limiter for good (and a key created without one after the hourly refresh would not be
/// renewed with the others). A workload that makes every kind of key: holders, waiters (one
/// granted, one timed out, one gone away), rate schedules, an idempotent paced grant, a keyed
/// limiter's overrides, key states, a key held back by its own rate and a key's reservation,
/// and a deleted limiter's queue and tombstone. (A guard: this held before this test.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_key_is_left_without_a_ttl() {
    let server = support::RedisServer::start();
    let gate = gate(&server).await;
    let mut conn = conn(&server);
    let wait = Duration::from_secs(5);
    let rate = RateSpec::per(1000, Duration::from_secs(1));

    gate.define(
        "a",
        LimiterSpec::concurrency(1)
            .with_max_wait(wait)
            .with_rate(rate),
    )
    .await
    .unwrap();
    let a = gate.limiter("a").await.unwrap();
    let held = a.acquire(AcquireOptions::new()).await.unwrap();
    let queued = a.clone();
    let granted_later =
        tokio::spawn(async move { queued.acquire(AcquireOptions::new().wait(wait)).await });
    let queued = a.clone();
    let gone = tokio::spawn(async move { queued.acquire(AcquireOptions::new().wait(wait)).await });
    support::until_status(&a, "queued", |s| s.waiting == 2).await;
    gone.abort();
    let timed_out = a
        .acquire(AcquireOptions::new().wait(Duration::from_millis(1)))
        .await;
    assert!(timed_out.is_err());
    held.release().await.unwrap();
    let second = granted_later.await.unwrap().unwrap();
    let schedule = a.backend().schedule(3).await.unwrap();
    a.backend()
        .unschedule(schedule.reservation, 1)
        .await
        .unwrap();

    // Rate only: its idempotent grant is remembered in `outcomes` (`p:KEY`).
    let mut paced = LimiterSpec::default().with_rate(rate);
    paced.concurrency = None;
    gate.define("r", paced).await.unwrap();
    let r = gate.limiter("r").await.unwrap();
    drop(
        r.acquire(AcquireOptions::new().request_id("paced-1"))
            .await
            .unwrap(),
    );

    let (k, key_held, key_waiter) = keyed_in_use(&gate, wait, 2).await;
    k.backend().schedule_keyed("b", 1).await.unwrap();
    key_held.release().await.unwrap();

    gate.define("d", LimiterSpec::concurrency(1).with_max_wait(wait))
        .await
        .unwrap();
    let d = gate.limiter("d").await.unwrap();
    let d_held = d.acquire(AcquireOptions::new()).await.unwrap();
    let queued = d.clone();
    let d_waiter =
        tokio::spawn(async move { queued.acquire(AcquireOptions::new().wait(wait)).await });
    support::until_status(&d, "queued", |s| s.waiting == 1).await;
    gate.delete("d").await.unwrap();
    assert!(d_waiter.await.unwrap().is_err());

    let all: Vec<String> = redis::cmd("KEYS").arg("*").query(&mut conn).unwrap();
    let mut kinds: Vec<&str> = all.iter().filter_map(|k| k.rsplit(':').next()).collect();
    kinds.sort_unstable();
    kinds.dedup();
    for kind in [
        "outcomes",
        "otimes",
        "kstate",
        "koverrides",
        "kholders",
        "ksleep",
        "kidle",
        "tokens",
    ] {
        assert!(kinds.contains(&kind), "no {kind} key made: {all:?}");
    }
    assert!(all.contains(&"fg:{r}:outcomes".to_owned()), "{all:?}");
    for key in &all {
        // (-1: no TTL; -2: gone since it was listed.)
        let ttl = pttl(&mut conn, key);
        assert!(ttl != -1, "{key} has no TTL");
    }
    drop((second, key_waiter, d_held));
}

/// A rate-only limiter `name` at one a day with a burst of 100, its burst taken (on the paced
/// fast path): a debt of 100 days, far past the idle TTL.
async fn rate_debt_of_100_days(gate: &Floodgate<RedisStore>, name: &str) -> Limiter<RedisLimiter> {
    let day = Duration::from_secs(24 * 3600);
    let mut spec = LimiterSpec::default().with_rate(RateSpec::per(1, day).with_burst(100));
    spec.concurrency = None;
    gate.define(name, spec).await.unwrap();
    let limiter = gate.limiter(name).await.unwrap();
    for _ in 0..100 {
        drop(
            limiter
                .acquire(AcquireOptions::new().wait(Duration::ZERO))
                .await
                .unwrap(),
        );
    }
    limiter
}

/// The least TTL (ms) a limiter's keys must have to keep a rate debt of `debt`: the debt itself
/// (a limiter unused from now on must not forget it before it ends).
fn at_least(debt: Duration) -> i64 {
    i64::try_from(debt.as_millis()).unwrap()
}

/// A rate's debt (GCRA's `tat` ahead of the clock) runs up to interval × burst ahead: 100 days
/// after a burst of 100 at one a day. The keys lived only the idle TTL (7 days) from their last
/// use, so a limiter unused after its burst forgot a debt still running, and once re-created
/// (its definer's `PUT` after the 404) granted a fresh burst of 100 on top, where the rate
/// allowed 7 more in those 7 days (seen, with the keys expired by hand as 7 idle days would).
/// Its keys are now kept until the debt is over, plain and keyed (a per-key rate's debt is in
/// `kstate`), renewed by the paced fast path too, and a `put` that raises the burst renews them
/// at once, as does one that lowers the burst (the debt stays as it was). Checked by TTL, not
/// by waiting.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rate_debt_outlasting_the_idle_ttl_keeps_the_keys() {
    let server = support::RedisServer::start();
    let gate = gate(&server).await;
    let mut conn = conn(&server);
    let day = Duration::from_secs(24 * 3600);
    let debt = day * 100;
    // (-2: gone since it was listed, as `kbusy` when a dropped permit's release lands.)
    let ttls = |conn: &mut redis::Connection, name: &str| -> Vec<(String, i64)> {
        keys_of(conn, name)
            .into_iter()
            .map(|k| {
                let ttl = pttl(conn, &k);
                (k, ttl)
            })
            .filter(|(_, ttl)| *ttl != -2)
            .collect()
    };

    // Plain, rate only: the burst taken on the paced fast path.
    let q = rate_debt_of_100_days(&gate, "q").await;
    age(&mut conn, "q");
    drop(
        q.acquire(AcquireOptions::new().wait(Duration::ZERO))
            .await
            .err(),
    );
    for (key, ttl) in ttls(&mut conn, "q") {
        assert!(
            ttl >= at_least(debt - day),
            "{key}: {ttl} ms, a debt of 100 days"
        );
    }

    // A burst raised by a put: renewed at once.
    gate.define(
        "u",
        LimiterSpec::concurrency(5).with_rate(RateSpec::per(1, day).with_burst(1)),
    )
    .await
    .unwrap();
    gate.define(
        "u",
        LimiterSpec::concurrency(5).with_rate(RateSpec::per(1, day).with_burst(100)),
    )
    .await
    .unwrap();
    for (key, ttl) in ttls(&mut conn, "u") {
        assert!(ttl >= at_least(debt), "{key}: {ttl} ms after the put");
    }
    // A burst lowered after it was taken leaves the debt as it was: still kept.
    let mut spec = LimiterSpec::default().with_rate(RateSpec::per(1, day).with_burst(1));
    spec.concurrency = None;
    gate.define("q", spec).await.unwrap();
    for (key, ttl) in ttls(&mut conn, "q") {
        assert!(
            ttl >= at_least(debt - day),
            "{key}: {ttl} ms, a debt of 99 days"
        );
    }

    // Keyed, a per-key rate: its debt is in the key's state.
    gate.define_keyed(
        "kr",
        LimiterSpec::concurrency(1000),
        KeyedSpec::per_key(1000).with_rate(RateSpec::per(1, day).with_burst(100)),
    )
    .await
    .unwrap();
    let kr = gate.limiter("kr").await.unwrap();
    for _ in 0..100 {
        drop(
            kr.acquire(AcquireOptions::new().key("a").wait(Duration::ZERO))
                .await
                .unwrap(),
        );
    }
    let renewed = ttls(&mut conn, "kr");
    assert!(
        renewed.iter().any(|(k, _)| k.ends_with(":kstate")),
        "{renewed:?}"
    );
    for (key, ttl) in renewed {
        assert!(
            ttl >= at_least(debt),
            "{key}: {ttl} ms, a key's debt of 100 days"
        );
    }
    // The per-key burst lowered after it was taken: the key's debt is kept as it was.
    gate.define_keyed(
        "kr",
        LimiterSpec::concurrency(1000),
        KeyedSpec::per_key(1000).with_rate(RateSpec::per(1, day).with_burst(1)),
    )
    .await
    .unwrap();
    for (key, ttl) in ttls(&mut conn, "kr") {
        assert!(
            ttl >= at_least(debt - day),
            "{key}: {ttl} ms, a key's debt of 99 days"
        );
    }
}

/// The listing set outlives a limiter kept for its rate's debt. Its keys live as long as the
/// debt can run (100 days after a burst of 100 at one a day), but the set had the idle TTL plus
/// an hour (7 days and an hour): once that ran out the limiter, unused meanwhile, still existed
/// with its debt, and the listing (the dashboard, `GET /limiters`) and `max_limiters` no longer
/// counted it. Whoever adds a name now gives the set at least the limiter's own TTL (plus the
/// two hours its keys can be renewed in around a relisting), and nothing shortens it: not a
/// define of a limiter without a rate, nor a relisting by another store.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_listing_set_outlives_a_limiter_kept_for_its_debt() {
    let server = support::RedisServer::start();
    let gate = gate(&server).await;
    let mut conn = conn(&server);
    let outlives = |conn: &mut redis::Connection, after: &str| {
        let (set, meta) = (pttl(conn, REGISTRY), pttl(conn, "fg:{q}:meta"));
        assert!(
            set > meta,
            "after {after}: the listing set ({set} ms) expires before the limiter ({meta} ms)"
        );
    };
    rate_debt_of_100_days(&gate, "q").await;
    outlives(&mut conn, "its define");
    gate.define("plain", LimiterSpec::concurrency(1))
        .await
        .unwrap();
    outlives(&mut conn, "another limiter's define");

    // Relisted by a store that uses it, the set gone (as when it ran out).
    let _: () = redis::cmd("DEL").arg(REGISTRY).query(&mut conn).unwrap();
    let user = crate::gate(&server).await;
    drop(
        user.limiter("q")
            .await
            .unwrap()
            .acquire(AcquireOptions::new().wait(Duration::ZERO))
            .await
            .err(),
    );
    // Added again in the background: a liveness bound only.
    let deadline = Instant::now() + Duration::from_secs(30);
    while !listed(&mut conn).contains(&"q".to_owned()) {
        assert!(
            Instant::now() < deadline,
            "a limiter in use is not listed again"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    outlives(&mut conn, "a relisting");
}

/// `max_limiters` counts the limiters that exist. A limiter that expired for idleness leaves
/// its name in the listing set (kept alive by the other limiters' use) until a listing drops
/// it; a create at the cap was refused `TooManyLimiters` meanwhile, though the limiters that
/// existed were under it. The expiry is made by hand (`DEL` of the limiter's keys).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_names_of_expired_limiters_do_not_count_against_max_limiters() {
    let server = support::RedisServer::start();
    let mut conn = conn(&server);
    let mut config = RedisConfig::new(server.url());
    config.max_limiters = Some(2);
    let gate = Floodgate::with_store(RedisStore::connect(config).await.unwrap());
    for name in ["kept", "expired"] {
        gate.define(name, LimiterSpec::concurrency(1))
            .await
            .unwrap();
    }
    for key in keys_of(&mut conn, "expired") {
        let _: () = redis::cmd("DEL").arg(&key).query(&mut conn).unwrap();
    }
    assert_eq!(listed(&mut conn).len(), 2, "the name stays until a listing");

    gate.define("new", LimiterSpec::concurrency(1))
        .await
        .unwrap();
    let mut names = listed(&mut conn);
    names.sort();
    assert_eq!(names, ["kept", "new"]);
    // The cap still holds against limiters that exist.
    let refused = gate.define("third", LimiterSpec::concurrency(1)).await;
    assert!(
        matches!(refused, Err(floodgate::StoreError::TooManyLimiters(2))),
        "{refused:?}"
    );
}

/// The same on a Cluster, where the listing set and each limiter's `meta` are in different
/// slots (so on different masters here): a gone name is found and dropped at the cap, and the
/// cap still holds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_a_cluster_a_gone_name_does_not_count_against_max_limiters() {
    let cluster = support::RedisCluster::start();
    let mut config = RedisConfig::cluster(cluster.urls());
    config.max_limiters = Some(2);
    let gate = Floodgate::with_store(RedisStore::connect(config).await.unwrap());
    gate.define("a", LimiterSpec::concurrency(1)).await.unwrap();
    // A name with no limiter (one that expired for idleness, or whose put failed).
    let port = cluster.nodes[0].port.to_string();
    let added = std::process::Command::new("redis-cli")
        .args(["-c", "-p", &port, "SADD", REGISTRY, "ghost"])
        .output()
        .unwrap();
    assert!(added.status.success(), "{added:?}");
    gate.define("b", LimiterSpec::concurrency(1)).await.unwrap();
    let names = |statuses: Vec<floodgate::LimiterStatus>| -> Vec<String> {
        statuses.iter().map(|s| s.name.to_string()).collect()
    };
    assert_eq!(names(gate.limiters().await.unwrap()), ["a", "b"]);
    let refused = gate.define("c", LimiterSpec::concurrency(1)).await;
    assert!(
        matches!(refused, Err(floodgate::StoreError::TooManyLimiters(2))),
        "{refused:?}"
    );
    assert!(gate.delete("a").await.unwrap());
    gate.define("c", LimiterSpec::concurrency(1)).await.unwrap();
    assert_eq!(names(gate.limiters().await.unwrap()), ["b", "c"]);
}
