//! Keyed `schedule` reservations over HTTP (issue 14, docs/keyed.md): a keyed schedule answers
//! a reservation, and `unschedule` gives its unstarted tokens back to the key's rate and the
//! total's, on the real server on `127.0.0.1:0` with the embedded store and with a real
//! `redis-server`.

#![allow(clippy::unwrap_used)]

mod common;
#[path = "../../floodgate/tests/support/mod.rs"]
mod support;

use common::{call, num, Served};
use floodgate::{Floodgate, RedisConfig, RedisStore};
use floodgate_server::server::ServerOptions;
use serde_json::{json, Value};
use support::RedisServer;

async fn post(served: &Served, path: &str, body: Value) -> (u16, Value) {
    let url = format!("http://{}{path}", served.addr);
    call(reqwest::Method::POST, url, Some(body)).await
}

async fn put(served: &Served, path: &str, body: Value) -> (u16, Value) {
    let url = format!("http://{}{path}", served.addr);
    call(reqwest::Method::PUT, url, Some(body)).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_keyed_schedule_is_given_back_over_http() {
    let served = Served::start(Floodgate::in_memory(), ServerOptions::default()).await;
    keyed_reservation(&served).await;
    served.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_keyed_schedule_is_given_back_over_http_on_redis() {
    let redis = RedisServer::start();
    let store = RedisStore::connect(RedisConfig::new(redis.url()))
        .await
        .unwrap();
    let served = Served::start(Floodgate::with_store(store), ServerOptions::default()).await;
    keyed_reservation(&served).await;
    served.stop().await;
}

async fn keyed_reservation(served: &Served) {
    let (s, body) = put(
        served,
        "/v1/limiters/orgs",
        json!({"concurrency": 4, "rate": {"limit": 100, "period_ms": 1000},
               "per_key": {"concurrency": 2, "rate": {"limit": 1, "period_ms": 1000, "burst": 1}}}),
    )
    .await;
    assert_eq!(s, 200, "{body}");
    // One token a second for org-a: five children start 0 to 4 s from now.
    let (s, a) = post(
        served,
        "/v1/limiters/orgs/schedule",
        json!({"key": "org-a", "count": 5}),
    )
    .await;
    assert_eq!(s, 200, "{a}");
    assert_eq!(a["offsets_ms"], json!([0, 1000, 2000, 3000, 4000]), "{a}");
    let id = num(&a, "/reservation");
    assert!(id >= 1, "{a}");
    // The promised tokens hold org-a's acquires back.
    let (s, refused) = post(
        served,
        "/v1/limiters/orgs/acquire",
        json!({"key": "org-a", "wait_ms": 0}),
    )
    .await;
    assert_eq!(s, 429, "{refused}");
    // The producer enqueued only the first child: the rest go back (those not started yet:
    // the first started at once; the others unless the machine stalled for seconds).
    let (s, back) = post(
        served,
        "/v1/limiters/orgs/unschedule",
        json!({"reservation": id, "count": 4}),
    )
    .await;
    assert_eq!(s, 200, "{back}");
    let returned = num(&back, "/returned");
    assert!((1..=4).contains(&returned), "{back}");
    // Given back once: again, nothing.
    let again = post(
        served,
        "/v1/limiters/orgs/unschedule",
        json!({"reservation": id, "count": 4}),
    )
    .await;
    assert_eq!(
        (again.0, &again.1["returned"]),
        (200, &json!(0)),
        "{again:?}"
    );
    // An id never drawn: nothing, as for a plain limiter.
    let unknown = post(
        served,
        "/v1/limiters/orgs/unschedule",
        json!({"reservation": 12345, "count": 1}),
    )
    .await;
    assert_eq!(
        (unknown.0, &unknown.1["returned"]),
        (200, &json!(0)),
        "{unknown:?}"
    );
    // org-a's next token is right after the tokens it kept, not after all five.
    let (s, next) = post(
        served,
        "/v1/limiters/orgs/schedule",
        json!({"key": "org-a", "count": 1}),
    )
    .await;
    assert_eq!(s, 200, "{next}");
    let kept = 5 - returned;
    assert!(num(&next, "/offsets_ms/0") <= 1000 * kept, "{next}");
    assert_ne!(num(&next, "/reservation"), id, "{next}");
    // A count of 0 is bad input naming the field.
    let (s, bad) = post(
        served,
        "/v1/limiters/orgs/unschedule",
        json!({"reservation": id, "count": 0}),
    )
    .await;
    assert_eq!(
        (s, &bad["error"]),
        (400, &json!("invalid_request")),
        "{bad}"
    );
    assert!(bad["message"].as_str().unwrap().contains("count"), "{bad}");
}
