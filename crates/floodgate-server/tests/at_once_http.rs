//! The acquire handler takes the store's synchronous at-once path where it applies (the
//! embedded store, not durable: nobody queued and the permits free, or a try-once) and the
//! general path elsewhere (the durable embedded store, Redis, keyed limiters, idempotent
//! acquires, waits that queue). The HTTP answers must not tell them apart: the same requests
//! are sent to a server on each store and their answers, with what differs by nature (fencing
//! token values, which follow each store's clock) replaced by their order, must be equal (a
//! request id's repeat on Redis reports what is left of the lease, as documented). The
//! requests cover grants, a taken limit, FIFO behind a queued waiter whose permits do not fit
//! (an arrival whose permits do fit must not overtake it), bad input, a request id's repeat
//! and a keyed limiter. Real servers on `127.0.0.1:0` and a real `redis-server`; no assertion
//! depends on timing.

#![allow(clippy::unwrap_used)]

mod common;
#[path = "../../floodgate/tests/support/mod.rs"]
mod support;

use common::{Srv, PATIENCE, POLL};
use floodgate::{Durability, Floodgate, MemoryStore, RedisConfig, RedisStore};
use floodgate_server::server::ServerOptions;
use serde_json::{json, Value};
use support::RedisServer;

/// An answer with what differs by nature between stores taken out: a grant's token becomes
/// its rank among the tokens seen so far (tokens only ever grow), an error keeps its code, the
/// field its message names first, and whether it carries a retry hint.
fn normal(answer: (u16, Value), tokens: &mut Vec<u64>) -> Value {
    let (status, body) = answer;
    if let Some(token) = body["fencing_token"].as_u64() {
        let rank = match tokens.iter().position(|t| *t == token) {
            // A request id's repeat: the same grant (on Redis with what is left of its lease
            // as `lease_ms`, docs/api.md).
            Some(i) => {
                assert!(body["lease_ms"].as_u64().is_some(), "{body}");
                return json!({"status": status, "token": i, "repeat": true});
            }
            None => {
                assert!(
                    tokens.last().is_none_or(|last| *last < token),
                    "tokens grow: {tokens:?} then {token}"
                );
                tokens.push(token);
                tokens.len() - 1
            }
        };
        let id = body["permit_id"].as_str().unwrap_or_default();
        assert!(id.ends_with(&format!(".{token}")), "{body}");
        return json!({
            "status": status,
            "token": rank,
            "permits": body["permits"],
            "lease_ms": body["lease_ms"],
        });
    }
    let message = body["message"].as_str().unwrap_or_default();
    assert!(!message.is_empty(), "{status} {body}");
    json!({
        "status": status,
        "error": body["error"],
        "names": message.split(':').next(),
        "retry": body["retry_after_ms"].is_u64(),
    })
}

/// The same requests on any store; the normalised answers in order.
async fn transcript(srv: &Srv) -> Vec<Value> {
    let mut out = Vec::new();
    let mut tokens = Vec::new();
    let l = "/v1/limiters/l";
    let acquire = "/v1/limiters/l/acquire";
    let (s, v) = srv
        .put(l, json!({"concurrency": 3, "lease_ms": 60000}))
        .await;
    assert_eq!(s, 200, "{v}");

    // Granted at once, with and without a lease and permits of their own.
    let first = srv.post(acquire, json!({"wait_ms": 0})).await;
    let first_id = first.1["permit_id"].as_str().unwrap().to_owned();
    out.push(normal(first, &mut tokens));
    let second = srv
        .post(acquire, json!({"lease_ms": 50000, "wait_ms": 1000}))
        .await;
    out.push(normal(second, &mut tokens));
    // Two permits do not fit (one is free): a try-once is refused with a hint.
    out.push(normal(
        srv.post(acquire, json!({"permits": 2, "wait_ms": 0})).await,
        &mut tokens,
    ));
    // More than the limit could ever grant; bad input names its field.
    out.push(normal(
        srv.post(acquire, json!({"permits": 4})).await,
        &mut tokens,
    ));
    out.push(normal(
        srv.post(acquire, json!({"permits": 0})).await,
        &mut tokens,
    ));
    out.push(normal(
        srv.post(acquire, json!({"lease_ms": 0})).await,
        &mut tokens,
    ));

    // A waiter for two permits queues; an arrival for the one free permit must not overtake
    // it, whether it tries once or would wait.
    let waiter = srv.spawn_post(acquire, json!({"permits": 2, "wait_ms": 60000}));
    until_waiting(srv, 1).await;
    out.push(normal(
        srv.post(acquire, json!({"wait_ms": 0})).await,
        &mut tokens,
    ));
    let behind = srv.spawn_post(acquire, json!({"wait_ms": 60000}));
    until_waiting(srv, 2).await;
    // The first holder leaves: two permits free, the head (two permits) is granted, and the
    // one behind it waits on (the limit is taken again).
    let (s, v) = srv
        .send(
            reqwest::Method::POST,
            &format!("/v1/permits/{first_id}/release"),
            None,
        )
        .await;
    assert_eq!((s, &v["released"]), (200, &json!(true)), "{v}");
    let head = waiter.await.unwrap();
    let head_id = head.1["permit_id"].as_str().unwrap().to_owned();
    out.push(normal(head, &mut tokens));
    let (s, st) = srv.get(l).await;
    assert_eq!(s, 200, "{st}");
    out.push(json!({"in_use": st["in_use"], "waiting": st["waiting"]}));
    let (s, v) = srv
        .send(
            reqwest::Method::POST,
            &format!("/v1/permits/{head_id}/release"),
            None,
        )
        .await;
    assert_eq!(s, 200, "{v}");
    out.push(normal(behind.await.unwrap(), &mut tokens));

    // Nobody queued, a permit free: granted at once again.
    let (s, st) = srv.get(l).await;
    assert_eq!(s, 200, "{st}");
    out.push(json!({"in_use": st["in_use"], "waiting": st["waiting"]}));
    out.push(normal(
        srv.post(acquire, json!({"wait_ms": 0})).await,
        &mut tokens,
    ));
    // An idempotent acquire (the general path on every store) and its repeat: one permit.
    let (s, v) = srv
        .put(l, json!({"concurrency": 5, "lease_ms": 60000}))
        .await;
    assert_eq!(s, 200, "{v}");
    for _ in 0..2 {
        out.push(normal(
            srv.post(acquire, json!({"wait_ms": 0, "request_id": "job-7"}))
                .await,
            &mut tokens,
        ));
    }
    // A keyed limiter: the handler never asks for the at-once path with a key.
    let (s, v) = srv
        .put(
            "/v1/limiters/k",
            json!({"concurrency": 2, "per_key": {"concurrency": 1}}),
        )
        .await;
    assert_eq!(s, 200, "{v}");
    for body in [
        json!({"key": "org-a", "wait_ms": 0}),
        json!({"key": "org-a", "wait_ms": 0}),
        json!({"key": "org-b", "wait_ms": 0}),
        json!({"wait_ms": 0}),
    ] {
        out.push(normal(
            srv.post("/v1/limiters/k/acquire", body).await,
            &mut tokens,
        ));
    }
    let (s, st) = srv.get(l).await;
    assert_eq!(s, 200, "{st}");
    out.push(json!({"in_use": st["in_use"], "waiting": st["waiting"],
                    "granted": st["counters"]["granted"]}));
    out
}

async fn until_waiting(srv: &Srv, n: u64) {
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        let (_, st) = srv.get("/v1/limiters/l").await;
        if st["waiting"].as_u64() == Some(n) {
            return;
        }
        assert!(tokio::time::Instant::now() < deadline, "{n} waiting: {st}");
        tokio::time::sleep(POLL).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_at_once_path_answers_as_the_general_path_over_http() {
    // The embedded store, not durable: the at-once path where it applies.
    let memory = Srv::serve(Floodgate::in_memory(), ServerOptions::default()).await;
    let at_once = transcript(&memory).await;
    memory.served.stop().await;

    // The durable embedded store: the general path for every acquire.
    let dir = std::env::temp_dir().join(format!("floodgate-at-once-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let (store, _) = MemoryStore::open(Durability::new(&dir)).unwrap();
    let durable = Srv::serve(Floodgate::with_store(store), ServerOptions::default()).await;
    let general = transcript(&durable).await;
    durable.served.stop().await;
    let _ = std::fs::remove_dir_all(&dir);
    assert_eq!(at_once, general, "embedded at once vs durable");

    // Redis: the general path too.
    let redis = RedisServer::start();
    let store = RedisStore::connect(RedisConfig::new(redis.url()))
        .await
        .unwrap();
    let on_redis = Srv::serve(Floodgate::with_store(store), ServerOptions::default()).await;
    let general = transcript(&on_redis).await;
    on_redis.served.stop().await;
    assert_eq!(at_once, general, "embedded at once vs Redis");

    // What they all answered (so that three stores wrong alike would fail too).
    let statuses: Vec<u64> = at_once
        .iter()
        .filter_map(|a| a["status"].as_u64())
        .collect();
    assert_eq!(
        statuses,
        [200, 200, 429, 400, 400, 400, 429, 200, 200, 200, 200, 200, 200, 429, 200, 400],
        "{at_once:#?}"
    );
}
