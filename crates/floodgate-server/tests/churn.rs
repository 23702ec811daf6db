//! Issue 12 item 7: `/metrics` follows the limiters that exist. 10,000 limiters are created,
//! used (acquire, release, a wait that times out) and deleted over HTTP, and acquires are sent
//! to 3,000 names that were never limiters; afterwards the scrape has exactly the series it had
//! before and about its size. Also: series of a limiter deleted behind the server's back (in the
//! store directly) are gone at the next scrape.

#![allow(clippy::unwrap_used)]

mod common;

use common::Served;
use floodgate::{Floodgate, LimiterName, LimiterSpec, Store};
use floodgate_server::server::ServerOptions;
use serde_json::{json, Value};

const LIMITERS: usize = 10_000;
const BOGUS: usize = 3_000;
const TASKS: usize = 8;

/// The series of a scrape (sample lines) and its size in bytes.
fn measure(text: &str) -> (usize, usize) {
    let series = text
        .lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .count();
    (series, text.len())
}

async fn scrape(http: &reqwest::Client, base: &str) -> String {
    let resp = http.get(format!("{base}/metrics")).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    resp.text().await.unwrap()
}

/// [`common::send_json`], answered 200, 404 or 429 (the churn's expected answers).
async fn call(http: &reqwest::Client, method: reqwest::Method, url: String, body: Value) -> Value {
    let (status, v) = common::send_json(http, method, url, body).await;
    assert!(
        status == 200 || status == 404 || status == 429,
        "{status} {v}"
    );
    v
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn series_return_to_their_starting_level_after_churn() {
    let gate = Floodgate::in_memory();
    gate.define("live", LimiterSpec::concurrency(5))
        .await
        .unwrap();
    let srv = Served::start(gate, ServerOptions::default()).await;
    let base = format!("http://{}", srv.addr);
    let http = reqwest::Client::builder().no_proxy().build().unwrap();
    // The starting level: one live limiter that has been used.
    let granted = call(
        &http,
        reqwest::Method::POST,
        format!("{base}/v1/limiters/live/acquire"),
        json!({}),
    )
    .await;
    let id = granted["permit_id"].as_str().unwrap().to_owned();
    call(
        &http,
        reqwest::Method::POST,
        format!("{base}/v1/permits/{id}/release"),
        json!({}),
    )
    .await;
    let before = measure(&scrape(&http, &base).await);
    assert!(before.0 > 0);

    let mut tasks = Vec::new();
    for t in 0..TASKS {
        let (http, base) = (http.clone(), base.clone());
        tasks.push(tokio::spawn(async move {
            for i in (t..LIMITERS).step_by(TASKS) {
                let url = format!("{base}/v1/limiters/churn-{i}");
                call(
                    &http,
                    reqwest::Method::PUT,
                    url.clone(),
                    json!({"concurrency": 1}),
                )
                .await;
                let p = call(
                    &http,
                    reqwest::Method::POST,
                    format!("{url}/acquire"),
                    json!({"holder": "churn"}),
                )
                .await;
                // The limit is 1 and it is held: this one times out (another outcome series).
                call(
                    &http,
                    reqwest::Method::POST,
                    format!("{url}/acquire"),
                    json!({"wait_ms": 0}),
                )
                .await;
                let id = p["permit_id"].as_str().unwrap().to_owned();
                call(
                    &http,
                    reqwest::Method::POST,
                    format!("{base}/v1/permits/{id}/release"),
                    json!({}),
                )
                .await;
                if i % 1_000 == 0 {
                    // Scrapes in the middle of the churn see the limiters of the moment.
                    let _ = scrape(&http, &base).await;
                }
                call(&http, reqwest::Method::DELETE, url, json!({})).await;
            }
            for i in (t..BOGUS).step_by(TASKS) {
                let v = call(
                    &http,
                    reqwest::Method::POST,
                    format!("{base}/v1/limiters/never-{i}/acquire"),
                    json!({"wait_ms": 0}),
                )
                .await;
                assert_eq!(v["error"], "unknown_limiter");
            }
        }));
    }
    for task in tasks {
        task.await.unwrap();
    }
    let after_text = scrape(&http, &base).await;
    let after = measure(&after_text);
    eprintln!(
        "churn: {LIMITERS} limiters created/used/deleted, {BOGUS} unknown names: \
         series {} -> {}, scrape {} -> {} bytes",
        before.0, after.0, before.1, after.1
    );
    assert_eq!(after.0, before.0, "series count changed:\n{after_text}");
    assert!(!after_text.contains("churn-"), "{after_text}");
    assert!(!after_text.contains("never-"), "{after_text}");
    // Only the live limiter's counter values may have grown by a digit or so.
    assert!(
        after.1 <= before.1 + 256,
        "scrape grew from {} to {} bytes",
        before.1,
        after.1
    );
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn series_of_a_limiter_deleted_elsewhere_go_at_the_next_scrape() {
    let gate = Floodgate::in_memory();
    gate.define("elsewhere", LimiterSpec::concurrency(1))
        .await
        .unwrap();
    let srv = Served::start(gate.clone(), ServerOptions::default()).await;
    let base = format!("http://{}", srv.addr);
    let http = reqwest::Client::builder().no_proxy().build().unwrap();
    call(
        &http,
        reqwest::Method::POST,
        format!("{base}/v1/limiters/elsewhere/acquire"),
        json!({}),
    )
    .await;
    assert!(scrape(&http, &base)
        .await
        .contains(r#"limiter="elsewhere""#));
    // Another server sharing the store (here: the library itself) deletes it.
    gate.store()
        .delete_limiter(&LimiterName::new("elsewhere").unwrap())
        .await
        .unwrap();
    let text = scrape(&http, &base).await;
    assert!(!text.contains(r#"limiter="elsewhere""#), "{text}");
    srv.stop().await;
}
