//! The latency-aware adaptive limit (`"algorithm": "gradient"`) through a real server on
//! 127.0.0.1: its fields validated with 400s naming them, and the controller finding an unknown
//! backend capacity in real time from feedback that carries latencies. Assertions are on
//! counts and on the limit's band, never on elapsed time.

#![allow(clippy::unwrap_used, clippy::print_stdout)]

mod common;

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{request, send_json, Served, SplitMix64, Srv};
use floodgate::{Floodgate, MemoryStore};
use floodgate_server::server::ServerOptions;
use serde_json::{json, Value};

/// The real server on the embedded store: it, its base URL and a client.
async fn serve() -> (Served, String, reqwest::Client) {
    let srv = Srv::serve(
        Floodgate::with_store(MemoryStore::new()),
        ServerOptions::default(),
    )
    .await;
    (srv.served, srv.base, srv.http)
}

#[tokio::test]
async fn gradient_fields_and_latencies_are_validated_with_400s_naming_them() {
    let (served, base, client) = serve().await;
    let put = |adaptive: Value| {
        let client = client.clone();
        let url = format!("{base}/v1/limiters/g");
        async move {
            send_json(
                &client,
                reqwest::Method::PUT,
                &url,
                json!({"concurrency": 5, "adaptive": adaptive}),
            )
            .await
        }
    };
    for (adaptive, field) in [
        (
            json!({"min": 1, "max": 9, "algorithm": "cubic"}),
            "algorithm",
        ),
        (
            json!({"min": 1, "max": 9, "algorithm": "gradient", "tolerance": 1.0}),
            "adaptive.tolerance",
        ),
        (
            json!({"min": 1, "max": 9, "algorithm": "gradient", "probe_rounds": 0}),
            "adaptive.probe_rounds",
        ),
        (json!({"min": 1, "max": 9, "algorithm": null}), "algorithm"),
    ] {
        let (status, body) = put(adaptive.clone()).await;
        assert_eq!(status, 400, "{adaptive}: {body}");
        assert!(body["error"].is_string(), "{body}");
        let message = body["message"].as_str().unwrap();
        assert!(message.contains(field), "{adaptive}: {message}");
    }
    let (status, body) = put(json!({"min": 1, "max": 9, "algorithm": "gradient"})).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["adaptive"]["algorithm"], "gradient");
    assert_eq!(
        body["adaptive"]["decrease"], 0.9,
        "gradient's default step down"
    );
    assert_eq!(body["adaptive"]["tolerance"], 1.5);
    assert_eq!(body["adaptive"]["probe_rounds"], 30);
    let feedback = format!("{base}/v1/limiters/g/feedback");
    for latency in [json!(-1), json!(1e12), json!("5")] {
        let (status, body) = send_json(
            &client,
            reqwest::Method::POST,
            &feedback,
            json!({"outcome": "ok", "latency_ms": latency}),
        )
        .await;
        assert_eq!(status, 400, "{latency}: {body}");
        assert!(
            body["message"].as_str().unwrap().contains("latency_ms"),
            "{body}"
        );
    }
    // Slow start: with no ceiling known, every success (here with a fractional latency) adds
    // one, once the permits are in use (with half of them idle nothing grows).
    for _ in 0..5 {
        let (status, grant) = send_json(
            &client,
            reqwest::Method::POST,
            &format!("{base}/v1/limiters/g/acquire"),
            json!({"wait_ms": 0}),
        )
        .await;
        assert_eq!(status, 200, "{grant}");
    }
    for want in 6..=8 {
        let (status, body) = send_json(
            &client,
            reqwest::Method::POST,
            &feedback,
            json!({"outcome": "ok", "latency_ms": 12.5}),
        )
        .await;
        assert_eq!((status, body["limit"].as_u64()), (200, Some(want)));
    }
    served.stop().await;
}

/// A backend that admits at most `capacity` calls at once and answers 429 to the rest.
#[derive(Default)]
struct Backend {
    capacity: u32,
    in_flight: AtomicU32,
    ok: AtomicU64,
    throttled: AtomicU64,
}

/// Workers acquire over HTTP, call the backend (5 to 15 ms), report the outcome with its
/// latency, and release, until `CALLS` calls are done. The gradient limit starts at 4 and
/// must find the backend's 12 on its own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_gradient_limit_finds_an_unknown_capacity_through_a_real_server() {
    const CAPACITY: u32 = 12;
    const WORKERS: u64 = 30;
    const CALLS: u64 = 3_000;
    let (served, base, client) = serve().await;
    let (status, body) = send_json(
        &client,
        reqwest::Method::PUT,
        &format!("{base}/v1/limiters/backend"),
        json!({"concurrency": 4, "max_wait_ms": 30000,
               "adaptive": {"min": 1, "max": 100, "algorithm": "gradient", "probe_rounds": 10}}),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let backend = Arc::new(Backend {
        capacity: CAPACITY,
        ..Backend::default()
    });
    let done = Arc::new(AtomicU64::new(0));
    let limits = Arc::new(std::sync::Mutex::new(Vec::new()));
    let workers: Vec<_> = (0..WORKERS)
        .map(|i| {
            let (client, base) = (client.clone(), base.clone());
            let (backend, done, limits) =
                (Arc::clone(&backend), Arc::clone(&done), Arc::clone(&limits));
            tokio::spawn(async move {
                let mut rng = SplitMix64(i + 1);
                while done.fetch_add(1, Ordering::SeqCst) < CALLS {
                    let (status, grant) = send_json(
                        &client,
                        reqwest::Method::POST,
                        &format!("{base}/v1/limiters/backend/acquire"),
                        json!({"wait_ms": 30000}),
                    )
                    .await;
                    assert_eq!(status, 200, "{grant}");
                    let started = Instant::now();
                    let n = backend.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
                    let outcome = if n > backend.capacity {
                        backend.in_flight.fetch_sub(1, Ordering::SeqCst);
                        backend.throttled.fetch_add(1, Ordering::SeqCst);
                        "throttled"
                    } else {
                        tokio::time::sleep(Duration::from_micros(rng.between(5_000, 15_000))).await;
                        backend.in_flight.fetch_sub(1, Ordering::SeqCst);
                        backend.ok.fetch_add(1, Ordering::SeqCst);
                        "ok"
                    };
                    let latency_ms = started.elapsed().as_secs_f64() * 1000.0;
                    let (status, fb) = send_json(
                        &client,
                        reqwest::Method::POST,
                        &format!("{base}/v1/limiters/backend/feedback"),
                        json!({"outcome": outcome, "latency_ms": latency_ms}),
                    )
                    .await;
                    assert_eq!(status, 200, "{fb}");
                    limits.lock().unwrap().push(fb["limit"].as_u64().unwrap());
                    let id = grant["permit_id"].as_str().unwrap();
                    let url = format!("{base}/v1/permits/{id}/release");
                    let (status, _) = request(&client, reqwest::Method::POST, url, None).await;
                    assert_eq!(status, 200);
                    if outcome == "throttled" {
                        tokio::time::sleep(Duration::from_micros(rng.between(5_000, 15_000))).await;
                    }
                }
            })
        })
        .collect();
    for w in workers {
        w.await.unwrap();
    }
    let limits = limits.lock().unwrap().clone();
    let (ok, throttled) = (
        backend.ok.load(Ordering::SeqCst),
        backend.throttled.load(Ordering::SeqCst),
    );
    let mut second_half = limits[limits.len() / 2..].to_vec();
    second_half.sort_unstable();
    let median = second_half[second_half.len() / 2];
    let (p10, p90) = (
        second_half[second_half.len() / 10],
        second_half[second_half.len() * 9 / 10],
    );
    println!(
        "gradient through HTTP: limit over the second half p10 {p10} median {median} p90 {p90}; \
         {throttled} of {} calls throttled",
        ok + throttled
    );
    // A permit is held for the HTTP round trips around the backend call too, so the limit that
    // keeps the backend full is above its capacity; it must reach the capacity and must not
    // run away past what the workers can use (half the permits idle stops growth).
    assert!(
        median as u32 >= CAPACITY * 7 / 10,
        "median limit {median} is below the capacity {CAPACITY}"
    );
    assert!(
        p90 <= 2 * WORKERS,
        "the limit ran away from what is used: p90 {p90}"
    );
    assert!(
        throttled * 20 < ok + throttled,
        "too many throttled: {throttled} of {}",
        ok + throttled
    );
    let (_, status) = send_json(
        &client,
        reqwest::Method::GET,
        &format!("{base}/v1/limiters/backend"),
        Value::Null,
    )
    .await;
    assert!(
        status["counters"]["limit_decreases"].as_u64().unwrap() >= 1,
        "{status}"
    );
    served.stop().await;
}
