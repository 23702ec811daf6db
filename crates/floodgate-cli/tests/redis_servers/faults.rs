//! Redis crashing under load (fail_closed and fail_open), and a holder process that crashes.

use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use floodgate::RedisConfig;
use reqwest::Method;
use serde_json::{json, Value};
use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::common::{num, PATIENCE, POLL};
use crate::harness::{
    answered, blocking, spawn_serve, ChildGuard, Http, InProcServer, Reply, PERSISTENT,
};
use crate::support::{free_port, RedisServer};

/// Fires acquires (`wait_ms` 50) in a loop, releasing what it gets, until `stop` is set and it
/// has had a 503 (set only while Redis is down, so that comes at once); returns every answer,
/// or the first request that was not answered.
fn stream_of_acquires(
    http: Http,
    name: &'static str,
    stop: Arc<AtomicBool>,
) -> JoinHandle<Result<Vec<Reply>, String>> {
    tokio::spawn(async move {
        let mut replies: Vec<Reply> = Vec::new();
        loop {
            if stop.load(Ordering::SeqCst) && replies.last().is_some_and(|r| r.status == 503) {
                return Ok(replies);
            }
            let reply = http.try_acquire(name, json!({"wait_ms": 50})).await?;
            if reply.status == 200 {
                // May be refused with 503 if Redis just died: the lease bounds it.
                let _ = http.try_release(reply.str("/permit_id")).await?;
            }
            replies.push(reply);
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
}

/// An answer of a fail_closed server to an acquire that raced a Redis crash: granted or refused
/// before it, or 503 `store_unavailable` after.
#[track_caller]
fn assert_fail_closed_answer(reply: &Reply, what: &str) {
    let ok = match reply.status {
        200 => reply.json.get("fencing_token").and_then(Value::as_u64) > Some(0),
        429 => reply.error_code() == Some("wait_timeout"),
        503 => reply.is_store_unavailable(),
        _ => false,
    };
    assert!(ok, "{what}: unexpected answer {reply:?}");
}

/// The shared body of the fail_closed crash tests. Holds the limit, queues `long_polls` acquires
/// waiting `long_poll_wait_ms`, streams short acquires across the crash, SIGKILLs Redis, sends
/// new acquires, then checks every request was answered, `/readyz` is 503, and after a restart
/// of Redis (with its AOF) the same server grants again.
async fn fail_closed_crash_and_recovery(long_poll_wait_ms: u64) {
    let port = free_port();
    let mut redis = blocking(|| RedisServer::start_with(port, &PERSISTENT));
    let srv = InProcServer::start(RedisConfig::new(redis.url()), false).await;
    let http = srv.http.clone();
    http.put_limiter(
        "outage",
        json!({"concurrency": 2, "lease_ms": 5_000, "max_wait_ms": 60_000}),
    )
    .await;
    let mut held = Vec::new();
    for _ in 0..2 {
        let reply = http.acquire("outage", json!({"wait_ms": 0})).await;
        reply.assert_ok();
        held.push(reply);
    }
    let last_token_before = held.iter().map(|r| r.u64("/fencing_token")).max().unwrap();

    // Long polls, queued behind the two holders.
    let long_polls: Vec<_> = (0..4)
        .map(|_| {
            let http = http.clone();
            tokio::spawn(async move {
                http.try_acquire("outage", json!({"wait_ms": long_poll_wait_ms}))
                    .await
            })
        })
        .collect();
    http.wait_until("outage", "four queued long polls", |s| {
        num(s, "/waiting") == 4
    })
    .await;

    // A stream of acquires in flight across the crash, on a limiter with room.
    http.put_limiter(
        "stream",
        json!({"concurrency": 3, "lease_ms": 5_000, "max_wait_ms": 60_000}),
    )
    .await;
    let stop = Arc::new(AtomicBool::new(false));
    let streams: Vec<_> = (0..4)
        .map(|_| stream_of_acquires(http.clone(), "stream", Arc::clone(&stop)))
        .collect();
    // Let the streams get going (not an assertion: any number of rounds is fine).
    tokio::time::sleep(Duration::from_millis(100)).await;

    blocking(|| redis.kill());

    // New acquires arriving while Redis is down.
    let arrivals: Vec<_> = (0..4)
        .map(|_| {
            let http = http.clone();
            tokio::spawn(
                async move { http.try_acquire("outage", json!({"wait_ms": 60_000})).await },
            )
        })
        .collect();
    for (i, task) in arrivals.into_iter().enumerate() {
        let reply = answered(task, &format!("acquire {i} sent after the crash")).await;
        assert!(
            reply.is_store_unavailable(),
            "acquire {i} sent after the crash: expected 503 store_unavailable, got {reply:?}"
        );
    }
    let ready = http.must(Method::GET, "/readyz", None).await;
    assert!(
        ready.is_store_unavailable(),
        "/readyz with Redis down: {ready:?}"
    );
    let status = http.must(Method::GET, "/v1/limiters/outage", None).await;
    assert!(
        status.is_store_unavailable(),
        "status with Redis down: {status:?}"
    );

    stop.store(true, Ordering::SeqCst);
    for (i, task) in streams.into_iter().enumerate() {
        let replies = task
            .await
            .expect("stream task panicked")
            .unwrap_or_else(|e| panic!("stream {i}: a request was not answered: {e}"));
        for reply in &replies {
            assert_fail_closed_answer(reply, &format!("stream {i}"));
        }
    }
    for (i, task) in long_polls.into_iter().enumerate() {
        let reply = answered(task, &format!("long poll {i} held across the crash")).await;
        assert_fail_closed_answer(&reply, &format!("long poll {i}"));
        assert_ne!(
            reply.status, 200,
            "long poll {i} granted with the limit held: {reply:?}"
        );
    }
    // The server itself is still up.
    let healthz = http.must(Method::GET, "/healthz", None).await;
    assert_eq!((healthz.status, healthz.text.as_str()), (200, "ok"));

    // Redis comes back on the same port with its AOF: the same server serves again.
    blocking(|| redis.restart());
    let deadline = Instant::now() + PATIENCE;
    let ready = loop {
        let reply = http.must(Method::GET, "/readyz", None).await;
        if reply.status == 200 || Instant::now() >= deadline {
            break reply;
        }
        tokio::time::sleep(POLL).await;
    };
    assert_eq!(ready.status, 200, "/readyz never recovered: {ready:?}");
    for permit in &held {
        // Still held (persisted), unless its lease ran out meanwhile.
        let reply = http.try_release(permit.str("/permit_id")).await.unwrap();
        reply.assert_ok();
    }
    let deadline = Instant::now() + PATIENCE;
    let granted = loop {
        let reply = http.acquire("outage", json!({"wait_ms": 1_000})).await;
        if reply.status == 200 {
            break reply;
        }
        assert!(
            reply.status == 429 || reply.is_store_unavailable(),
            "acquire after the restart: {reply:?}"
        );
        assert!(
            Instant::now() < deadline,
            "no acquire succeeded after Redis came back; last answer {reply:?}"
        );
        tokio::time::sleep(POLL).await;
    };
    assert!(
        granted.u64("/fencing_token") > last_token_before,
        "fencing tokens went backwards across the restart: {granted:?} after {last_token_before}"
    );
    http.release_held(granted.str("/permit_id")).await;
    let status = http
        .wait_until("outage", "nothing held after recovery", |s| {
            num(s, "/in_use") == 0
        })
        .await;
    assert_eq!(
        num(&status, "/concurrency"),
        2,
        "the limiter did not survive: {status}"
    );

    srv.stop().await;
}

/// Long polls with a wait shorter than the client timeout: the waiter's own timer ends them
/// while Redis is down, and they must be answered (503) rather than hang.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn redis_crash_fail_closed_answers_every_request_and_the_same_server_recovers() {
    fail_closed_crash_and_recovery(3_000).await;
}

/// The same crash with long polls that wait a minute (the limiter's maximum): they are held in
/// the server while Redis is dead, and should be answered 503 `store_unavailable` (or granted /
/// refused) without hanging past the client's 20 s timeout (`docs/redis.md`: "acquires are
/// answered 503 `store_unavailable` within the response timeout (2 s); nothing hangs").
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn redis_crash_answers_long_polls_held_across_it() {
    fail_closed_crash_and_recovery(60_000).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn redis_crash_fail_open_grants_with_token_zero() {
    let mut redis = blocking(RedisServer::start);
    let srv = InProcServer::start(RedisConfig::new(redis.url()), true).await;
    let http = srv.http.clone();
    http.put_limiter(
        "open",
        json!({"concurrency": 1, "lease_ms": 5_000, "max_wait_ms": 60_000}),
    )
    .await;
    let held = http.acquire("open", json!({"wait_ms": 0})).await;
    held.assert_ok();
    assert!(held.u64("/fencing_token") > 0, "{held:?}");
    // With Redis up the limit holds even when failing open.
    let refused = http.acquire("open", json!({"wait_ms": 0})).await;
    assert_eq!(refused.status, 429, "{refused:?}");

    blocking(|| redis.kill());

    let tasks: Vec<_> = (0..5)
        .map(|_| {
            let http = http.clone();
            tokio::spawn(async move { http.try_acquire("open", json!({"wait_ms": 1_000})).await })
        })
        .collect();
    for (i, task) in tasks.into_iter().enumerate() {
        let reply = answered(task, &format!("fail_open acquire {i}")).await;
        reply.assert_ok();
        assert_eq!(reply.u64("/fencing_token"), 0, "acquire {i}: {reply:?}");
        assert_eq!(reply.str("/permit_id"), "open.0", "acquire {i}: {reply:?}");
    }
    // A fail-open permit has nothing to extend.
    let extended = http
        .must(
            Method::POST,
            "/v1/permits/open.0/extend",
            Some(json!({"lease_ms": 1_000})),
        )
        .await;
    extended.assert_ok();
    assert_eq!(extended.u64("/fencing_token"), 0, "{extended:?}");
    // Readiness still tells the truth.
    let ready = http.must(Method::GET, "/readyz", None).await;
    assert!(
        ready.is_store_unavailable(),
        "/readyz with Redis down: {ready:?}"
    );

    srv.stop().await;
}

/// A permit granted while failing open (token 0) was never accounted, so its release needs no
/// store: like extend (which answers 200 for token 0 without the store), it should answer 200
/// `{"released": false}` ("not held") rather than 503 while Redis is down.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn fail_open_permits_release_while_redis_is_down() {
    let mut redis = blocking(RedisServer::start);
    let srv = InProcServer::start(RedisConfig::new(redis.url()), true).await;
    let http = srv.http.clone();
    http.put_limiter("open", json!({"concurrency": 1})).await;
    blocking(|| redis.kill());
    let granted = http.acquire("open", json!({"wait_ms": 0})).await;
    granted.assert_ok();
    assert_eq!(granted.u64("/fencing_token"), 0, "{granted:?}");
    let released = http.try_release(granted.str("/permit_id")).await.unwrap();
    released.assert_ok();
    assert_eq!(released.json, json!({"released": false}), "{released:?}");
    srv.stop().await;
}

/// A long poll whose client goes away while Redis is down must still leave the queue: the
/// docs promise "a client that disconnects while waiting leaves the queue; a grant that raced
/// the disconnect goes back". Otherwise, once Redis is back (with its AOF), the next release
/// grants the abandoned waiter, and that permit is held by nobody until its lease ends.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_long_poll_abandoned_during_an_outage_leaves_the_queue() {
    let port = free_port();
    let mut redis = blocking(|| RedisServer::start_with(port, &PERSISTENT));
    let srv = InProcServer::start(RedisConfig::new(redis.url()), false).await;
    let http = srv.http.clone();
    http.put_limiter(
        "ghost",
        json!({"concurrency": 1, "lease_ms": 30_000, "max_wait_ms": 60_000}),
    )
    .await;
    let held = http.acquire("ghost", json!({"wait_ms": 0})).await;
    held.assert_ok();

    // A waiter whose client gives up after 2 s (its wait is a minute).
    let impatient = reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(2))
        .build()
        .unwrap();
    let url = format!("{}/v1/limiters/ghost/acquire", http.base);
    let waiter = tokio::spawn(async move {
        impatient
            .post(url)
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .body(json!({"wait_ms": 60_000}).to_string())
            .send()
            .await
    });
    http.wait_until("ghost", "the waiter to queue", |s| num(s, "/waiting") == 1)
        .await;

    blocking(|| redis.kill());
    // Either the server answers it 503 at once (the wake-up subscription died with Redis), or
    // the client gives up first; both leave an entry in Redis's queue that must be cancelled.
    let gone = waiter.await.expect("waiter task panicked");
    match &gone {
        Ok(resp) => assert_eq!(resp.status().as_u16(), 503, "{gone:?}"),
        Err(e) => assert!(e.is_timeout(), "{gone:?}"),
    }
    // Give the server a moment to see the disconnect and drop the acquire (not an assertion).
    tokio::time::sleep(Duration::from_millis(200)).await;

    blocking(|| redis.restart());
    let deadline = Instant::now() + PATIENCE;
    let released = loop {
        let reply = http.try_release(held.str("/permit_id")).await.unwrap();
        if reply.status == 200 || Instant::now() >= deadline {
            break reply;
        }
        assert!(reply.is_store_unavailable(), "{reply:?}");
        tokio::time::sleep(POLL).await;
    };
    assert_eq!(released.json, json!({"released": true}), "{released:?}");
    let status = http
        .wait_until("ghost", "nothing held and nobody queued", |s| {
            num(s, "/in_use") == 0 && num(s, "/waiting") == 0
        })
        .await;
    assert_eq!(num(&status, "/holders"), 0, "{status}");
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_crashed_holder_process_has_its_lease_reclaimed() {
    let redis = blocking(RedisServer::start);
    let (mut serve, http) = spawn_serve(&redis.url()).await;
    // A second server on the same Redis, in this process, for the waiter.
    let other = InProcServer::start(RedisConfig::new(redis.url()), false).await;
    http.put_limiter(
        "lim",
        json!({"concurrency": 1, "lease_ms": 60_000, "max_wait_ms": 60_000}),
    )
    .await;

    // The holder: `floodgate run` holding a permit with a 3 s lease (extended every third of
    // it; 500 ms was short enough that a loaded machine could let it lapse before the try-once
    // acquire below) around `sleep 30`, in its own process group so the crash takes the
    // command with it.
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_floodgate"));
    cmd.args(["run", "lim", "--url", &http.base])
        .args(["--wait", "30s", "--lease", "3s", "--", "sleep", "30"]);
    let mut holder = ChildGuard::spawn(cmd, true, "floodgate run");
    let deadline = Instant::now() + PATIENCE;
    loop {
        holder.assert_running();
        let status = http.status("lim").await;
        if num(&status, "/holders") == 1 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "floodgate run never took the permit; last status {status}"
        );
        tokio::time::sleep(POLL).await;
    }
    // Its keep-alive is working: a try-once acquire is refused.
    let refused = other.http.acquire("lim", json!({"wait_ms": 0})).await;
    assert_eq!(refused.status, 429, "{refused:?}");

    let waiter = {
        let other = other.http.clone();
        tokio::spawn(async move { other.try_acquire("lim", json!({"wait_ms": 60_000})).await })
    };
    http.wait_until("lim", "the waiter to queue", |s| num(s, "/waiting") == 1)
        .await;

    holder.kill();

    let granted = answered(waiter, "the waiter behind the crashed holder").await;
    granted.assert_ok();
    let status = http.status("lim").await;
    assert!(
        num(&status, "/counters/expired") >= 1,
        "the crashed holder's permit was not counted as expired: {status}"
    );
    assert_eq!(num(&status, "/holders"), 1, "{status}");
    other.http.release_held(granted.str("/permit_id")).await;
    let status = http
        .wait_until("lim", "nothing held", |s| num(s, "/in_use") == 0)
        .await;
    assert_eq!(
        num(&status, "/counters/granted"),
        num(&status, "/counters/released") + num(&status, "/counters/expired"),
        "{status}"
    );
    serve.assert_running();
    other.stop().await;
}
