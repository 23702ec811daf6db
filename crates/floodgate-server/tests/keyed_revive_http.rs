//! Issue 14 over HTTP: a keyed limiter whose state Redis lost is re-created learning by a
//! server that knew it, with its per-key spec and overrides (docs/learning.md, docs/keyed.md).
//! Two real servers on `127.0.0.1:0` share one real `redis-server`: A creates the limiter and
//! an override, B only reads it; after `FLUSHALL`, B's next acquire re-creates it learning
//! (nothing granted for any key: a try-once is refused with a retry hint), and both see its
//! definition back; a holder from before the loss that extends with its key is re-adopted
//! under it (without it, lost). No assertion depends on timing (the window is 60 s).

#![allow(clippy::unwrap_used)]

mod common;
#[path = "../../floodgate/tests/support/mod.rs"]
mod support;

use std::time::Duration;

use common::{call, Served};
use floodgate::{Floodgate, RedisConfig, RedisStore};
use floodgate_server::server::ServerOptions;
use serde_json::json;
use support::RedisServer;

async fn serve(redis: &RedisServer) -> (Served, String) {
    let mut config = RedisConfig::new(redis.url());
    config.learning_window = Some(Duration::from_secs(60));
    let store = RedisStore::connect(config).await.unwrap();
    let served = Served::start(Floodgate::with_store(store), ServerOptions::default()).await;
    let base = format!("http://{}/v1/limiters", served.addr);
    (served, base)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_keyed_limiter_lost_by_redis_comes_back_learning_with_its_overrides() {
    use reqwest::Method;
    let redis = RedisServer::start();
    let (a, base_a) = serve(&redis).await;
    let (b, base_b) = serve(&redis).await;
    let spec = json!({"concurrency": 10, "per_key": {"concurrency": 2}, "max_keys": 50,
                      "max_wait_ms": 30000});
    let (s, body) = call(Method::PUT, format!("{base_a}/orgs"), Some(spec)).await;
    assert_eq!(s, 200, "{body}");
    let over = json!({"concurrency": 1, "weight": 4});
    let (s, body) = call(Method::PUT, format!("{base_a}/orgs/keys/org-a"), Some(over)).await;
    assert_eq!(s, 200, "{body}");
    // B reads it (the status lists its keys: B knows its definition from then on).
    let (s, seen) = call(Method::GET, format!("{base_b}/orgs"), None).await;
    assert_eq!((s, &seen["keyed"]["overrides"]), (200, &json!(1)), "{seen}");
    // A holder of key org-c, from before the loss; it keeps extending (through A).
    let once = json!({"key": "org-c", "wait_ms": 0, "lease_ms": 600000});
    let (s, held) = call(Method::POST, format!("{base_a}/orgs/acquire"), Some(once)).await;
    assert_eq!(s, 200, "{held}");
    let extend = format!(
        "http://{}/v1/permits/{}/extend",
        a.addr,
        held["permit_id"].as_str().unwrap()
    );

    let flush = std::process::Command::new("redis-cli")
        .args(["-p", &redis.port.to_string(), "flushall"])
        .output()
        .unwrap();
    assert!(flush.status.success());

    // B's next acquire re-creates it, learning: nothing is granted, for any key.
    let once = json!({"key": "org-b", "wait_ms": 0});
    let (s, refused) = call(Method::POST, format!("{base_b}/orgs/acquire"), Some(once)).await;
    assert_eq!(s, 429, "{refused}");
    assert_eq!(refused["error"], "wait_timeout", "{refused}");
    assert!(
        refused["retry_after_ms"].as_u64().unwrap() > 1_000,
        "at least the window's rest: {refused}"
    );
    for base in [&base_a, &base_b] {
        let (s, st) = call(Method::GET, format!("{base}/orgs"), None).await;
        assert_eq!(s, 200, "{st}");
        assert_eq!(st["learning"], true, "{st}");
        assert_eq!(st["in_use"], 0, "{st}");
        assert_eq!(st["concurrency"], 10, "{st}");
        assert_eq!(st["keyed"]["per_key"]["concurrency"], 2, "{st}");
        assert_eq!(st["keyed"]["max_keys"], 50, "{st}");
        assert_eq!(st["keyed"]["overrides"], 1, "{st}");
    }
    // The holder's next extend carries its key: re-adopted under org-c and the total, seen by
    // both servers. Without the key it would be lost.
    let bare = json!({"lease_ms": 600000, "permits": 1});
    let (s, lost) = call(Method::POST, extend.clone(), Some(bare)).await;
    assert_eq!(
        (s, lost["error"].as_str()),
        (410, Some("permit_lost")),
        "{lost}"
    );
    let keyed = json!({"lease_ms": 600000, "permits": 1, "key": "org-c"});
    let (s, ok) = call(Method::POST, extend, Some(keyed)).await;
    assert_eq!(s, 200, "{ok}");
    for base in [&base_a, &base_b] {
        let (_, st) = call(Method::GET, format!("{base}/orgs"), None).await;
        assert_eq!(
            (st["in_use"].as_u64(), st["learning"].as_bool()),
            (Some(1), Some(true)),
            "{st}"
        );
        assert_eq!(st["counters"]["adopted"], 1, "{st}");
        assert!(st["keyed"].to_string().contains("org-c"), "{st}");
    }
    a.stop().await;
    b.stop().await;
}
