//! Waiters that disconnect leave the queue; grants racing a disconnect leak nothing.

use common::num;
use reqwest::Method;
use serde_json::json;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

use super::common;
use super::harness::*;

// ---------------------------------------------------------------------------------------------
// Disconnects while waiting
// ---------------------------------------------------------------------------------------------

/// After a waiter's connection went away: the queue is empty again, the cancel was counted and
/// exposed as a metric, and once the holder releases nothing is held (the permit did not go to
/// the departed client).
async fn assert_departed_waiter_left_no_trace(srv: &TestServer, name: &str, holder_permit: &str) {
    let status = srv
        .wait_until(name, "the departed waiter to leave the queue", |s| {
            s["waiting"] == 0
        })
        .await;
    assert_eq!(status["waiting_permits"], 0);
    assert_eq!(num(&status, "/counters/cancelled"), 1);
    assert_eq!(status["in_use"], 1);

    srv.release_held(holder_permit).await;
    let status = srv
        .wait_until(name, "in_use back to 0", |s| s["in_use"] == 0)
        .await;
    assert_eq!(status["holders"], 0);
    assert_eq!(num(&status, "/counters/granted"), 1);
    assert_eq!(num(&status, "/counters/released"), 1);

    // The permit is free: a try-once acquire gets it.
    let again = srv.acquire(name, json!({"wait_ms": 0})).await;
    again.assert_ok();
    srv.release_held(again.str("permit_id")).await;

    let metrics = srv.metrics().await;
    let cancelled = acquire_total(&metrics, name, "cancelled");
    assert_eq!(
        cancelled,
        Some(1.0),
        "no floodgate_acquire_total{{outcome=\"cancelled\"}} for {name}:\n{metrics}"
    );
    assert!(
        metrics.contains(&format!("floodgate_waiters{{limiter=\"{name}\"}} 0")),
        "{metrics}"
    );
    assert!(
        metrics.contains(&format!("floodgate_permits_in_use{{limiter=\"{name}\"}} 0")),
        "{metrics}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn aborted_reqwest_waiter_leaves_the_queue() {
    let srv = TestServer::start(options()).await;
    srv.put_limiter(
        "busy",
        json!({"concurrency": 1, "lease_ms": 600_000, "max_wait_ms": LONG_WAIT_MS}),
    )
    .await;
    let held = srv.acquire("busy", json!({})).await;
    held.assert_ok();

    let req = srv
        .request(Method::POST, "/v1/limiters/busy/acquire")
        .json(&json!({"wait_ms": LONG_WAIT_MS, "holder": "impatient"}));
    let waiter = tokio::spawn(async move { req.send().await });
    srv.wait_until("busy", "the long poll to queue", |s| s["waiting"] == 1)
        .await;
    waiter.abort();
    assert!(waiter.await.unwrap_err().is_cancelled());

    assert_departed_waiter_left_no_trace(&srv, "busy", held.str("permit_id")).await;
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn closed_tcp_waiter_leaves_the_queue() {
    let srv = TestServer::start(options()).await;
    srv.put_limiter(
        "busy",
        json!({"concurrency": 1, "lease_ms": 600_000, "max_wait_ms": LONG_WAIT_MS}),
    )
    .await;
    let held = srv.acquire("busy", json!({})).await;
    held.assert_ok();

    let mut stream = TcpStream::connect(srv.addr).await.unwrap();
    let body = json!({"wait_ms": LONG_WAIT_MS}).to_string();
    let request = format!(
        "POST /v1/limiters/busy/acquire HTTP/1.1\r\nHost: {}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        srv.addr,
        body.len()
    );
    stream.write_all(request.as_bytes()).await.unwrap();
    stream.flush().await.unwrap();
    srv.wait_until("busy", "the long poll to queue", |s| s["waiting"] == 1)
        .await;
    drop(stream);

    assert_departed_waiter_left_no_trace(&srv, "busy", held.str("permit_id")).await;
    srv.stop().await;
}

/// Waiters disconnect at the moment permits are released, so some grants race the disconnects.
/// A grant the server made just before it noticed the disconnect has no client to release it;
/// the lease bounds it. Nothing may be held once the (short) leases have ended.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disconnects_racing_grants_leak_nothing_beyond_the_lease() {
    const ROUNDS: usize = 10;
    const WAITERS: usize = 4;
    let srv = TestServer::start(options()).await;
    srv.put_limiter(
        "race",
        json!({"concurrency": 2, "lease_ms": 500, "max_wait_ms": LONG_WAIT_MS}),
    )
    .await;
    for _ in 0..ROUNDS {
        let a = srv.acquire("race", json!({"lease_ms": 60_000})).await;
        a.assert_ok();
        let b = srv.acquire("race", json!({"lease_ms": 60_000})).await;
        b.assert_ok();
        let mut streams = Vec::new();
        for _ in 0..WAITERS {
            let mut stream = TcpStream::connect(srv.addr).await.unwrap();
            let body = json!({"wait_ms": LONG_WAIT_MS}).to_string();
            let request = format!(
                "POST /v1/limiters/race/acquire HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
                body.len()
            );
            stream.write_all(request.as_bytes()).await.unwrap();
            streams.push(stream);
        }
        srv.wait_until("race", "the waiters to queue", |s| {
            s["waiting"] == WAITERS as u64
        })
        .await;
        // Release and disconnect at the same time.
        let (ra, rb) = (a.str("permit_id").to_owned(), b.str("permit_id").to_owned());
        let release = async {
            srv.release_held(&ra).await;
            srv.release_held(&rb).await;
        };
        let disconnect = async move {
            tokio::task::yield_now().await;
            drop(streams);
        };
        tokio::join!(release, disconnect);
        srv.wait_until("race", "the queue to empty", |s| s["waiting"] == 0)
            .await;
    }
    let status = srv
        .wait_until("race", "every lease to end", |s| {
            s["in_use"] == 0 && s["holders"] == 0
        })
        .await;
    let granted = num(&status, "/counters/granted");
    let released = num(&status, "/counters/released");
    let expired = num(&status, "/counters/expired");
    let cancelled = num(&status, "/counters/cancelled");
    assert_eq!(granted, released + expired, "{status}");
    // Every acquire was either granted or cancelled.
    assert_eq!(
        granted + cancelled,
        (ROUNDS * (2 + WAITERS)) as u64,
        "{status}"
    );
    srv.stop().await;
}
