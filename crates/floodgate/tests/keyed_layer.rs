//! The tower middleware of a keyed limiter: the key comes from the request, each key's calls
//! stay within its limit, and one key's backlog does not hold back another key.

#![cfg(not(feature = "shuttle"))]
#![allow(clippy::unwrap_used)]

#[path = "support/mod.rs"]
mod support;

use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use floodgate::layer::KeyedFloodgateLayer;
use floodgate::{
    AcquireOptions, Floodgate, KeyedSpec, LimiterSpec, RedisConfig, RedisStore, Store,
};
use tower::{service_fn, Service, ServiceBuilder, ServiceExt};

#[derive(Clone, Debug)]
struct Job {
    org: &'static str,
}

#[tokio::test(start_paused = true)]
async fn the_key_comes_from_the_request_and_each_key_keeps_its_limit() {
    each_key_keeps_its_limit(Floodgate::in_memory(), Duration::from_millis(10)).await;
}

/// The same on a real `redis-server` (in real time: Redis keeps its own clock).
#[tokio::test]
async fn the_key_comes_from_the_request_and_each_key_keeps_its_limit_on_redis() {
    let server = support::RedisServer::start();
    let store = RedisStore::connect(RedisConfig::new(server.url()))
        .await
        .unwrap();
    each_key_keeps_its_limit(Floodgate::with_store(store), Duration::from_millis(50)).await;
}

async fn each_key_keeps_its_limit<S: Store>(gate: Floodgate<S>, hold: Duration) {
    let spec = LimiterSpec::concurrency(4).with_max_wait(Duration::from_secs(600));
    gate.define_keyed("orgs", spec, KeyedSpec::per_key(2))
        .await
        .unwrap();
    let limiter = gate.limiter("orgs").await.unwrap();
    // Calls in progress per org, and the most seen, counted outside the limiter.
    let running: Arc<Mutex<HashMap<&'static str, (u32, u32)>>> = Arc::default();
    let order: Arc<Mutex<Vec<&'static str>>> = Arc::default();
    // Every call stays in until both of small's calls have entered (or a deadline far past any
    // wait has passed): so small's two overlap and big's first two are still in when small's
    // arrive, however the test process is stalled (fixed holds of 250 ms assumed it never was
    // for that long). If small's calls were held behind big's batch, the deadline lets big's
    // run on and the order below says so.
    let (small_in, small_entered) = tokio::sync::watch::channel(0u32);
    let small_deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    let inner = {
        let (running, order) = (Arc::clone(&running), Arc::clone(&order));
        let small_in = Arc::new(small_in);
        service_fn(move |job: Job| {
            let (running, order) = (Arc::clone(&running), Arc::clone(&order));
            let (small_in, mut small_entered) = (Arc::clone(&small_in), small_entered.clone());
            async move {
                {
                    let mut r = running.lock().unwrap();
                    let e = r.entry(job.org).or_default();
                    e.0 += 1;
                    e.1 = e.1.max(e.0);
                }
                order.lock().unwrap().push(job.org);
                if job.org == "small" {
                    small_in.send_modify(|n| *n += 1);
                }
                let _ =
                    tokio::time::timeout_at(small_deadline, small_entered.wait_for(|n| *n >= 2))
                        .await;
                tokio::time::sleep(hold).await;
                running.lock().unwrap().get_mut(job.org).unwrap().0 -= 1;
                Ok::<_, Infallible>(())
            }
        })
    };
    let svc = ServiceBuilder::new()
        .layer(KeyedFloodgateLayer::new(
            limiter.clone(),
            AcquireOptions::new(),
            |job: &Job| job.org,
        ))
        .service(inner);
    // A large org's batch of 20, then a small org's 2.
    let mut calls = Vec::new();
    for org in std::iter::repeat_n("big", 20).chain(std::iter::repeat_n("small", 2)) {
        let mut svc = svc.clone();
        calls.push(tokio::spawn(async move {
            svc.ready().await.unwrap().call(Job { org }).await.unwrap();
        }));
        tokio::task::yield_now().await;
    }
    for c in calls {
        c.await.unwrap();
    }
    let r = running.lock().unwrap().clone();
    assert_eq!(
        r["big"].1, 2,
        "big never above its limit of 2, and reached it"
    );
    assert_eq!(r["small"].1, 2);
    let order = order.lock().unwrap().clone();
    let last_small = order.iter().rposition(|o| *o == "small").unwrap();
    assert!(
        last_small < 6,
        "small ran beside big's batch, not after it: {order:?}"
    );
    // The layer releases a permit in the background when its call ends (on Redis that is a
    // round trip after the call's future completed), so wait for the store to say so.
    support::until_status(&limiter, "all released", |s| s.in_use == 0).await;
}
