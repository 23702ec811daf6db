//! Bad bodies for the schedule, unschedule and idempotent acquire endpoints, on the embedded
//! store and on a real `redis-server`: each gets a 4xx JSON `{error, message}` naming the
//! field, never a 500, and leaves the limiter as it was (the test's own witness: the status
//! counters and in-use, and a reservation made before still gives back what it did).
//!
//! A `request_id` reused with other permits than its first acquire is refused (400 naming
//! `request_id`) and the first acquire's grant or wait goes on; before, the retry got the
//! first grant back (one permit, to a caller that asked for three) or took over its wait.

#![allow(clippy::unwrap_used)]

mod common;
#[path = "../../floodgate/tests/support/mod.rs"]
mod support;

use std::time::Duration;

use common::{Srv, PATIENCE, POLL};
use floodgate::{Floodgate, RedisConfig, RedisStore, Store};
use floodgate_server::server::ServerOptions;
use serde_json::{json, Value};

async fn serve<S: Store>(gate: Floodgate<S>) -> Srv {
    let srv = Srv::serve(gate, ServerOptions::default()).await;
    for (name, body) in [
        (
            "paced",
            json!({"rate": {"limit": 10, "period_ms": 1000, "burst": 1}, "max_wait_ms": 60000}),
        ),
        ("two", json!({"concurrency": 2, "max_wait_ms": 60000})),
    ] {
        let (code, b) = srv.put(&format!("/v1/limiters/{name}"), body).await;
        assert_eq!(code, 200, "{b}");
    }
    srv
}

fn assert_names(code: u16, body: &Value, field: &str, what: &str) {
    assert!((400..500).contains(&code), "{what}: {code} {body}");
    assert!(body["error"].is_string(), "{what}: {body}");
    let message = body["message"].as_str().unwrap_or_default();
    assert!(
        message.contains(field),
        "{what}: {body} does not name {field}"
    );
}

async fn counters(srv: &Srv, name: &str) -> Value {
    let (code, st) = srv.get(&format!("/v1/limiters/{name}")).await;
    assert_eq!(code, 200, "{st}");
    st
}

async fn bad_bodies_name_their_field(srv: &Srv) {
    // A reservation made first: every bad call below must leave it as the latest.
    let (code, s) = srv
        .post("/v1/limiters/paced/schedule", json!({"count": 20}))
        .await;
    assert_eq!(code, 200, "{s}");
    let reservation = s["reservation"].as_u64().unwrap();
    let before = counters(srv, "paced").await;
    let schedule = [
        (json!({"count": 0}), "count"),
        (json!({"count": 100_001}), "count"),
        (json!({"count": 4_294_967_296_u64}), "count"),
        (json!({"count": -1}), "count"),
        (json!({"count": "5"}), "count"),
        (json!({"count": 1.5}), "count"),
        (json!({"count": null}), "count"),
        (json!({}), "count"),
        // 10/s for 60 s of max_wait: 600 fit, so 2,000 are refused whole.
        (json!({"count": 2_000}), "count"),
        (json!({"count": 1, "key": "a"}), "key"),
        (json!({"count": 1, "extra": 1}), "extra"),
    ];
    for (body, field) in schedule {
        let (code, b) = srv.post("/v1/limiters/paced/schedule", body.clone()).await;
        assert_names(code, &b, field, &format!("schedule {body}"));
    }
    let unschedule = [
        (json!({"reservation": reservation, "count": 0}), "count"),
        (json!({"reservation": reservation, "count": -3}), "count"),
        (
            json!({"reservation": reservation, "count": 4_294_967_296_u64}),
            "count",
        ),
        (json!({"reservation": reservation, "count": "2"}), "count"),
        (json!({"reservation": reservation}), "count"),
        (json!({"reservation": -1, "count": 1}), "reservation"),
        (json!({"reservation": "x", "count": 1}), "reservation"),
        (json!({"reservation": 1.5, "count": 1}), "reservation"),
        (json!({"count": 1}), "reservation"),
    ];
    for (body, field) in unschedule {
        let (code, b) = srv
            .post("/v1/limiters/paced/unschedule", body.clone())
            .await;
        assert_names(code, &b, field, &format!("unschedule {body}"));
    }
    // A limiter without a rate has nothing to schedule against.
    let (code, b) = srv
        .post("/v1/limiters/two/schedule", json!({"count": 1}))
        .await;
    assert_names(code, &b, "count", "schedule on a concurrency limiter");
    let after = counters(srv, "paced").await;
    assert_eq!(
        before["counters"], after["counters"],
        "bad calls changed counters"
    );
    // The reservation is still the latest: its unstarted tail goes back.
    let (code, r) = srv
        .post(
            "/v1/limiters/paced/unschedule",
            json!({"reservation": reservation, "count": 5}),
        )
        .await;
    assert_eq!((code, r["returned"].as_u64()), (200, Some(5)), "{r}");
}

async fn reused_request_ids_with_other_permits_are_refused(srv: &Srv) {
    let acquire = "/v1/limiters/two/acquire";
    let (code, first) = srv
        .post(acquire, json!({"request_id": "job-1", "wait_ms": 0}))
        .await;
    assert_eq!(code, 200, "{first}");
    for body in [
        json!({"request_id": "job-1", "permits": 2, "wait_ms": 0}),
        json!({"permits": 2, "wait_ms": 0}),
    ] {
        let mut req = srv.http.post(format!("{}{acquire}", srv.base)).json(&body);
        if body.get("request_id").is_none() {
            req = req.header("Idempotency-Key", "job-1");
        }
        let r = req.send().await.unwrap();
        let code = r.status().as_u16();
        let b: Value = r.json().await.unwrap();
        assert_eq!(code, 400, "{body}: {b}");
        assert_names(code, &b, "request_id", &format!("reuse {body}"));
    }
    let st = counters(srv, "two").await;
    assert_eq!(st["in_use"], 1, "{st}");
    // The same request again still gets its grant.
    let (code, again) = srv
        .post(acquire, json!({"request_id": "job-1", "wait_ms": 0}))
        .await;
    assert_eq!(
        (code, &again["fencing_token"]),
        (200, &first["fencing_token"])
    );

    // A queued first attempt (two permits, one is held): a reuse for one permit is refused and
    // the first attempt, still waiting, is granted once the held permit goes back.
    let waiting = srv.spawn_post(
        acquire,
        json!({"request_id": "job-2", "permits": 2, "wait_ms": 60000}),
    );
    let deadline = tokio::time::Instant::now() + PATIENCE;
    while counters(srv, "two").await["waiting"] != 1 {
        assert!(tokio::time::Instant::now() < deadline, "never queued");
        tokio::time::sleep(POLL).await;
    }
    let (code, b) = srv
        .post(
            acquire,
            json!({"request_id": "job-2", "permits": 1, "wait_ms": 1000}),
        )
        .await;
    assert_names(code, &b, "request_id", "reuse of a queued request_id");
    assert_eq!(counters(srv, "two").await["waiting"], 1);
    let id = first["permit_id"].as_str().unwrap();
    let (code, r) = srv
        .post(&format!("/v1/permits/{id}/release"), json!({}))
        .await;
    assert_eq!(code, 200, "{r}");
    let (code, granted) = tokio::time::timeout(Duration::from_secs(60), waiting)
        .await
        .expect("the first attempt is answered")
        .unwrap();
    assert_eq!(
        (code, granted["permits"].as_u64()),
        (200, Some(2)),
        "{granted}"
    );
    assert_eq!(counters(srv, "two").await["in_use"], 2);
}

#[tokio::test]
async fn embedded() {
    let srv = serve(Floodgate::in_memory()).await;
    bad_bodies_name_their_field(&srv).await;
    reused_request_ids_with_other_permits_are_refused(&srv).await;
    srv.served.stop().await;
}

#[tokio::test]
async fn redis() {
    let redis = support::RedisServer::start();
    let store = RedisStore::connect(RedisConfig::new(redis.url()))
        .await
        .unwrap();
    let srv = serve(Floodgate::with_store(store)).await;
    bad_bodies_name_their_field(&srv).await;
    reused_request_ids_with_other_permits_are_refused(&srv).await;
    srv.served.stop().await;
}
