//! Rate-only keyed limiters on the Redis store (issue 14): a total rate and a per-key rate, no
//! concurrency anywhere. Grants are paced (nothing held), waiters held back by a rate are
//! woken, nothing is left in the holders hash, every Redis key has a TTL, idle keys go, and a
//! plain put (another server's config, with no per-key part) keeps the limiter rate-only.
//! The step-by-step agreement with the embedded keyed core is `keyed_twin.rs`.

#![cfg(not(feature = "shuttle"))]
#![allow(clippy::unwrap_used)]

#[path = "support/mod.rs"]
mod support;

use std::collections::HashMap;
use std::time::{Duration, Instant};

use floodgate::{
    AcquireOptions, Floodgate, KeyedSpec, LimiterBackend, LimiterSpec, RateSpec, RedisConfig,
    RedisStore,
};

/// The fields of the limiter's `holders` hash (grants held, waiters' entries), but for the
/// packed `hot` value kept there.
fn holders_hash(conn: &mut redis::Connection) -> HashMap<String, Vec<u8>> {
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg("*{pace}:holders")
        .query(conn)
        .unwrap();
    let mut fields: HashMap<String, Vec<u8>> = match keys.first() {
        Some(k) => redis::cmd("HGETALL").arg(k).query(conn).unwrap(),
        None => HashMap::new(),
    };
    fields.remove("hot");
    fields
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rate_only_keyed_limiter_on_redis_paces_and_leaves_nothing_behind() {
    let server = support::RedisServer::start();
    let store = RedisStore::connect(RedisConfig::new(server.url()))
        .await
        .unwrap();
    let gate = Floodgate::with_store(store);
    let mut conn = redis::Client::open(server.url())
        .unwrap()
        .get_connection()
        .unwrap();
    let per_key = RateSpec::per(50, Duration::from_secs(1)).with_burst(2);
    let spec = LimiterSpec::rate(RateSpec::per(1_000, Duration::from_secs(1)).with_burst(10))
        .with_max_wait(Duration::from_secs(20));
    let status = gate
        .define_keyed("pace", spec, KeyedSpec::default().with_rate(per_key))
        .await
        .unwrap();
    assert_eq!(status.spec.concurrency, None);
    let limiter = gate.limiter("pace").await.unwrap();

    // Key a's burst of 2 at once, then its third and fourth wait for its rate (20 ms each):
    // all paced, idempotent ones too, none held.
    let mut tasks = Vec::new();
    for i in 0..4 {
        let limiter = limiter.clone();
        tasks.push(tokio::spawn(async move {
            let options = AcquireOptions::new()
                .key("a")
                .request_id(format!("job-{i}"))
                .wait(Duration::from_secs(20));
            limiter.acquire(options).await.map(|p| p.detach())
        }));
    }
    for task in tasks {
        let grant = task.await.unwrap().unwrap();
        assert_eq!(grant.lease, Duration::ZERO, "paced: {grant:?}");
    }
    let status = limiter.status().await.unwrap();
    assert_eq!((status.in_use, status.holders, status.waiting), (0, 0, 0));
    assert_eq!(status.counters.paced, 4);
    let left = holders_hash(&mut conn);
    assert!(
        left.is_empty(),
        "paced grants leave nothing in holders: {left:?}"
    );

    // A plain put (no per-key part) keeps the per-key rate, so the limiter stays rate-only.
    let status = gate
        .define(
            "pace",
            LimiterSpec::rate(RateSpec::per(2_000, Duration::from_secs(1)).with_burst(10)),
        )
        .await
        .unwrap();
    assert_eq!(status.spec.concurrency, None, "{status:?}");
    let view = limiter.backend().keys(5).await.unwrap().unwrap();
    assert_eq!(view.spec.rate, Some(per_key));
    let grant = limiter
        .acquire(AcquireOptions::new().key("b"))
        .await
        .unwrap()
        .detach();
    assert_eq!(grant.lease, Duration::ZERO, "still paced: {grant:?}");

    // Every Redis key has a TTL; once their rate debt ends (40 ms) the keys are gone.
    let keys: Vec<String> = redis::cmd("KEYS").arg("*").query(&mut conn).unwrap();
    for key in &keys {
        let ttl: i64 = redis::cmd("PTTL").arg(key).query(&mut conn).unwrap();
        // -1 is a key without a TTL; -2 one that expired since KEYS listed it (its 40 ms can
        // pass in between when the test process is stalled), which is what a TTL is for.
        assert!(ttl > 0 || ttl == -2, "{key} has no TTL ({ttl})");
    }
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let view = limiter.backend().keys(5).await.unwrap().unwrap();
        if view.count == 0 {
            break;
        }
        assert!(Instant::now() < deadline, "keys left: {view:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let kstate: i64 = redis::cmd("EXISTS")
        .arg(
            keys.iter()
                .filter(|k| k.ends_with(":kstate"))
                .cloned()
                .collect::<Vec<_>>(),
        )
        .query(&mut conn)
        .unwrap_or(0);
    assert_eq!(kstate, 0, "no key state is left");
}
