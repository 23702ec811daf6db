//! Issue 12 items 5, 6 and 15: the front end below the handlers, over raw TCP against the real
//! server on `127.0.0.1:0`. Errors hyper answers itself have the API's JSON body; slow heads,
//! slow bodies and idle connections are closed after their timeouts; the connection cap
//! answers 503; a declared oversize body is refused before it is sent; shutdown ends within its
//! grace period even with half-sent requests open.
//!
//! No assertion is about elapsed time: timeouts are short and the checks wait (bounded by
//! `PATIENCE`) for the state they cause.

#![allow(clippy::unwrap_used)]

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use common::{Served, PATIENCE};
use floodgate::{Floodgate, LimiterSpec};
use floodgate_server::server::ServerOptions;
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// A timeout far longer than any test.
const NEVER: Duration = Duration::from_secs(3600);

async fn start(options: ServerOptions) -> Served {
    let gate = Floodgate::in_memory();
    gate.define("x", LimiterSpec::concurrency(1)).await.unwrap();
    Served::start(gate, options).await
}

/// Everything the server sends until it closes the connection (bounded by `PATIENCE`).
async fn read_to_close(stream: &mut TcpStream) -> String {
    let mut out = Vec::new();
    tokio::time::timeout(PATIENCE, stream.read_to_end(&mut out))
        .await
        .expect("the server did not close the connection")
        .unwrap_or_default();
    String::from_utf8_lossy(&out).into_owned()
}

/// Writes `request`, then reads until the server closes.
async fn exchange(addr: SocketAddr, request: &[u8]) -> String {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    // The server may answer and close before all of an oversized request is written.
    let _ = stream.write_all(request).await;
    read_to_close(&mut stream).await
}

/// The status and JSON body of a raw answer; panics unless the body is `{error, message}` with
/// a JSON content type and a matching length.
#[track_caller]
fn json_error(answer: &str) -> (u16, String) {
    let (head, body) = answer
        .split_once("\r\n\r\n")
        .unwrap_or_else(|| panic!("no complete answer: {answer:?}"));
    let status: u16 = head.split(' ').nth(1).and_then(|s| s.parse().ok()).unwrap();
    let lower = head.to_ascii_lowercase();
    assert!(
        lower.contains("content-type: application/json"),
        "not JSON: {answer:?}"
    );
    assert!(
        lower.contains(&format!("content-length: {}", body.len())),
        "length: {answer:?}"
    );
    let v: Value = serde_json::from_str(body).unwrap_or_else(|e| panic!("{e}: {answer:?}"));
    assert!(v["message"].as_str().is_some_and(|m| !m.is_empty()));
    (status, v["error"].as_str().unwrap().to_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn errors_below_the_handlers_are_json() {
    let srv = start(ServerOptions::default()).await;
    let long_uri = format!("GET /{} HTTP/1.1\r\nhost: x\r\n\r\n", "a".repeat(70_000));
    let big_header = format!(
        "GET / HTTP/1.1\r\nhost: x\r\nx-a: {}\r\n\r\n",
        "b".repeat(300_000)
    );
    let cases: [(&[u8], u16, &str); 6] = [
        (b"GARBAGE\r\n\r\n", 400, "bad_request"),
        (b"GET /healthz HTTP/9.1\r\nhost: x\r\n\r\n", 400, "bad_request"),
        (long_uri.as_bytes(), 414, "uri_too_long"),
        (big_header.as_bytes(), 431, "headers_too_large"),
        (
            b"POST /v1/limiters/x/acquire HTTP/1.1\r\nhost: x\r\ncontent-length: abc\r\n\r\n",
            400,
            "bad_request",
        ),
        (
            b"POST /v1/limiters/x/acquire HTTP/1.1\r\nhost: x\r\ncontent-length: 5\r\ncontent-length: 6\r\n\r\n",
            400,
            "bad_request",
        ),
    ];
    for (request, status, code) in cases {
        let answer = exchange(srv.addr, request).await;
        assert_eq!(json_error(&answer), (status, code.to_owned()), "{answer:?}");
    }
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn declared_oversize_body_is_413_before_it_is_sent() {
    let srv = start(ServerOptions::default()).await;
    // Only the head: the answer must come without the body ever being sent.
    let answer = exchange(
        srv.addr,
        b"POST /v1/limiters/x/acquire HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n\
          content-length: 100000000\r\n\r\n",
    )
    .await;
    assert_eq!(
        json_error(&answer),
        (413, "payload_too_large".to_owned()),
        "{answer:?}"
    );
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_head_is_closed_after_the_header_timeout() {
    let srv = start(ServerOptions {
        header_timeout: Duration::from_millis(300),
        ..ServerOptions::default()
    })
    .await;
    let mut stream = TcpStream::connect(srv.addr).await.unwrap();
    stream
        .write_all(b"GET /healthz HTTP/1.1\r\nhost: x\r\n")
        .await
        .unwrap();
    // No answer, just a close (the request never became one).
    assert_eq!(read_to_close(&mut stream).await, "");
    // A silent connection too.
    let mut silent = TcpStream::connect(srv.addr).await.unwrap();
    assert_eq!(read_to_close(&mut silent).await, "");
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_kept_alive_connection_is_closed() {
    let srv = start(ServerOptions {
        idle_timeout: Duration::from_millis(300),
        header_timeout: NEVER,
        ..ServerOptions::default()
    })
    .await;
    let mut stream = TcpStream::connect(srv.addr).await.unwrap();
    stream
        .write_all(b"GET /healthz HTTP/1.1\r\nhost: x\r\n\r\n")
        .await
        .unwrap();
    // The answer, then (kept alive, no further request) the close.
    let answer = read_to_close(&mut stream).await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer:?}");
    assert!(answer.ends_with("ok"), "{answer:?}");
    srv.stop().await;
}

/// Timeouts too long to add to the clock (the library takes any `Duration`; `serve` once took
/// `--idle-timeout 18446744073709551615`) mean never: they once panicked the connection's task
/// when the first answer armed the idle timeout, closing a kept-alive connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn timeouts_too_long_for_the_clock_mean_never() {
    let srv = start(ServerOptions {
        idle_timeout: Duration::MAX,
        header_timeout: Duration::MAX,
        ..ServerOptions::default()
    })
    .await;
    let mut stream = TcpStream::connect(srv.addr).await.unwrap();
    stream
        .write_all(b"GET /healthz HTTP/1.1\r\nhost: x\r\n\r\n")
        .await
        .unwrap();
    // The first answer (the connection stays open), read up to its body.
    let mut first = Vec::new();
    let mut chunk = [0u8; 1024];
    while !first.ends_with(b"ok") {
        let n = tokio::time::timeout(PATIENCE, stream.read(&mut chunk))
            .await
            .expect("no first answer")
            .unwrap();
        assert_ne!(n, 0, "closed: {:?}", String::from_utf8_lossy(&first));
        first.extend_from_slice(&chunk[..n]);
    }
    assert!(first.starts_with(b"HTTP/1.1 200"));
    // A second request on the same connection is answered too.
    stream
        .write_all(b"GET /healthz HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
        .await
        .unwrap();
    let second = read_to_close(&mut stream).await;
    assert!(second.starts_with("HTTP/1.1 200"), "{second:?}");
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_body_is_408() {
    let srv = start(ServerOptions {
        body_timeout: Duration::from_millis(300),
        header_timeout: NEVER,
        idle_timeout: NEVER,
        ..ServerOptions::default()
    })
    .await;
    let mut stream = TcpStream::connect(srv.addr).await.unwrap();
    stream
        .write_all(
            b"POST /v1/limiters/x/acquire HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n\
              content-length: 100\r\n\r\n{\"wait_ms\"",
        )
        .await
        .unwrap();
    let answer = read_to_close(&mut stream).await;
    assert_eq!(
        json_error(&answer),
        (408, "body_timeout".to_owned()),
        "{answer:?}"
    );
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_over_the_cap_are_503_and_the_cap_frees() {
    let cap = 20;
    let srv = start(ServerOptions {
        max_connections: cap,
        header_timeout: NEVER,
        ..ServerOptions::default()
    })
    .await;
    let mut held = Vec::new();
    for _ in 0..cap {
        let mut s = TcpStream::connect(srv.addr).await.unwrap();
        s.write_all(b"GET /healthz HTTP/1.1\r\n").await.unwrap();
        held.push(s);
    }
    // The server accepts in order; the next connection finds the cap full.
    let answer = exchange(srv.addr, b"GET /healthz HTTP/1.1\r\nhost: x\r\n\r\n").await;
    assert_eq!(
        json_error(&answer),
        (503, "too_many_connections".to_owned()),
        "{answer:?}"
    );
    // Closing the held ones frees their slots (bounded wait for the server to notice).
    drop(held);
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        let answer = exchange(
            srv.addr,
            b"GET /healthz HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n",
        )
        .await;
        if answer.starts_with("HTTP/1.1 200") {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the cap never freed: {answer:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_ends_within_the_grace_period_whatever_clients_do() {
    let srv = start(ServerOptions {
        header_timeout: NEVER,
        body_timeout: NEVER,
        idle_timeout: NEVER,
        shutdown_grace: Duration::from_millis(300),
        ..ServerOptions::default()
    })
    .await;
    // A half-sent head and a half-sent body.
    let mut head = TcpStream::connect(srv.addr).await.unwrap();
    head.write_all(b"GET /healthz HTTP/1.1\r\nhost: x\r\n")
        .await
        .unwrap();
    let mut body = TcpStream::connect(srv.addr).await.unwrap();
    body.write_all(
        b"POST /v1/limiters/x/acquire HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n\
          content-length: 100\r\n\r\n{",
    )
    .await
    .unwrap();
    // Make sure both were accepted and are being read before the shutdown starts.
    let answer = exchange(
        srv.addr,
        b"GET /healthz HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n",
    )
    .await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer:?}");
    // `stop` fails the test unless `run` returns within PATIENCE; the grace is 300 ms.
    srv.stop().await;
    assert_eq!(read_to_close(&mut head).await, "");
    let _ = read_to_close(&mut body).await;
}

/// One answer on a kept-alive connection: its head and its `content-length` body, or what
/// came before the server closed the connection.
async fn read_answer(stream: &mut TcpStream) -> String {
    let mut got = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        let text = String::from_utf8_lossy(&got).into_owned();
        if let Some((head, body)) = text.split_once("\r\n\r\n") {
            let length = head
                .lines()
                .find_map(|l| {
                    let (name, value) = l.split_once(':')?;
                    name.eq_ignore_ascii_case("content-length")
                        .then(|| value.trim().parse::<usize>().ok())?
                })
                .unwrap_or(0);
            if body.len() >= length {
                return text;
            }
        }
        let n = tokio::time::timeout(PATIENCE, stream.read(&mut chunk))
            .await
            .expect("no answer and no close")
            .unwrap_or(0);
        if n == 0 {
            return text;
        }
        got.extend_from_slice(&chunk[..n]);
    }
}

/// Takes the limiter's one permit on a connection of its own; its permit id.
async fn take_the_permit(addr: SocketAddr) -> String {
    let answer = exchange(
        addr,
        b"POST /v1/limiters/x/acquire HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n\
          content-length: 13\r\nconnection: close\r\n\r\n{\"wait_ms\":0}",
    )
    .await;
    let (_, body) = answer.split_once("\r\n\r\n").expect("an answer");
    let v: Value = serde_json::from_str(body).unwrap_or_else(|e| panic!("{e}: {answer:?}"));
    v["permit_id"].as_str().expect("a permit").to_owned()
}

/// Releases `permit` on a connection of its own.
async fn release(addr: SocketAddr, permit: &str) {
    let request = format!(
        "POST /v1/permits/{permit}/release HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n"
    );
    let answer = exchange(addr, request.as_bytes()).await;
    assert!(answer.contains(r#"{"released":true}"#), "{answer:?}");
}

/// Timeouts far shorter than the waits below, which are held past them on purpose.
fn short_timeouts() -> ServerOptions {
    ServerOptions {
        header_timeout: Duration::from_millis(200),
        idle_timeout: Duration::from_millis(200),
        ..ServerOptions::default()
    }
}

/// A long poll is not idle and its head has arrived: neither timeout may close it. A client
/// that sends `Expect: 100-continue` (curl for large bodies, .NET by default) once had its
/// wait cut at the header timeout: the interim `100 Continue` counted as the answer, so the
/// body that followed counted as the next request's head.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_poll_sent_with_expect_continue_outlives_the_timeouts() {
    let srv = start(short_timeouts()).await;
    let held = take_the_permit(srv.addr).await;
    let mut waiter = TcpStream::connect(srv.addr).await.unwrap();
    let body = br#"{"wait_ms":600000}"#;
    let head = format!(
        "POST /v1/limiters/x/acquire HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n\
         expect: 100-continue\r\ncontent-length: {}\r\n\r\n",
        body.len()
    );
    waiter.write_all(head.as_bytes()).await.unwrap();
    let interim = read_answer(&mut waiter).await;
    assert!(interim.starts_with("HTTP/1.1 100 "), "{interim:?}");
    waiter.write_all(body).await.unwrap();
    // Held well past both timeouts, then granted.
    tokio::time::sleep(Duration::from_secs(1)).await;
    release(srv.addr, &held).await;
    let answer = read_answer(&mut waiter).await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer:?}");
    assert!(answer.contains("permit_id"), "{answer:?}");
    srv.stop().await;
}

/// A long poll pipelined behind another request (or sent while one is held) is held as one
/// sent alone is: it once ran under the idle timeout armed by the answer before it, and its
/// connection was closed without an answer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pipelined_long_poll_outlives_the_timeouts() {
    let srv = start(short_timeouts()).await;
    let held = take_the_permit(srv.addr).await;
    let mut waiter = TcpStream::connect(srv.addr).await.unwrap();
    let body = r#"{"wait_ms":600000}"#;
    let pipelined = format!(
        "GET /healthz HTTP/1.1\r\nhost: x\r\n\r\n\
         POST /v1/limiters/x/acquire HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n\
         content-length: {}\r\n\r\n{body}",
        body.len()
    );
    waiter.write_all(pipelined.as_bytes()).await.unwrap();
    let first = read_answer(&mut waiter).await;
    assert!(first.starts_with("HTTP/1.1 200"), "{first:?}");
    tokio::time::sleep(Duration::from_secs(1)).await;
    release(srv.addr, &held).await;
    let answer = read_answer(&mut waiter).await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer:?}");
    assert!(answer.contains("permit_id"), "{answer:?}");
    srv.stop().await;
}
