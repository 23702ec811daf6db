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
    // Calls held long enough that the small org's two calls overlap, and start before big's
    // first ones end, even when the test process is stalled for a while between them (10 ms,
    // as under paused time, assumed a test never stalled).
    each_key_keeps_its_limit(Floodgate::with_store(store), Duration::from_millis(250)).await;
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
    let inner = {
        let (running, order) = (Arc::clone(&running), Arc::clone(&order));
        service_fn(move |job: Job| {
            let (running, order) = (Arc::clone(&running), Arc::clone(&order));
            async move {
                {
                    let mut r = running.lock().unwrap();
                    let e = r.entry(job.org).or_default();
                    e.0 += 1;
                    e.1 = e.1.max(e.0);
                }
                order.lock().unwrap().push(job.org);
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
