//! Signals: forwarded to the command, or ending a wait before the command starts.

use floodgate::AcquireOptions;
use nix::sys::signal::Signal;

use crate::harness::{code, send, stderr, wait_for_file, wait_until, Scratch, TestServer, LIMITER};

/// A command that records which signal it got, then exits with `3` (TERM) or `4` (INT).
const TRAPPER: &str = r#"
trap 'echo TERM > trapped; exit 3' TERM
trap 'echo INT > trapped; exit 4' INT
touch started
while :; do sleep 0.05; done
"#;

async fn signal_is_forwarded(sig: Signal, name: &str, exit: i32) {
    let server = TestServer::start(1).await;
    let scratch = Scratch::new(&format!("signal-{name}"));
    let child = server
        .floodgate(scratch.path(), &["run", LIMITER, "--", "sh", "-c", TRAPPER])
        .spawn()
        .unwrap();
    wait_for_file(&scratch.file("started")).await;
    send(child.id(), sig);
    let output = child.wait_with_output().await.unwrap();
    assert_eq!(code(&output), exit, "{}", stderr(&output));
    assert_eq!(scratch.read("trapped").trim(), name);
    let status = server.status().await;
    assert_eq!(status.in_use, 0);
    assert_eq!(status.counters.released, 1);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_is_forwarded_to_the_command() {
    signal_is_forwarded(Signal::SIGTERM, "TERM", 3).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigint_is_forwarded_to_the_command() {
    signal_is_forwarded(Signal::SIGINT, "INT", 4).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_signal_while_waiting_ends_the_wait_without_running_the_command() {
    let server = TestServer::start(1).await;
    let scratch = Scratch::new("signal-waiting");
    let limiter = server.gate.limiter(LIMITER).await.unwrap();
    let held = limiter.acquire(AcquireOptions::new()).await.unwrap();
    let child = server
        .floodgate(
            scratch.path(),
            &[
                "run",
                LIMITER,
                "--wait",
                "60s",
                "--",
                "sh",
                "-c",
                "touch ran",
            ],
        )
        .spawn()
        .unwrap();
    wait_until(|| async { server.status().await.waiting == 1 }).await;
    send(child.id(), Signal::SIGTERM);
    let output = child.wait_with_output().await.unwrap();
    assert_eq!(code(&output), 128 + 15, "{}", stderr(&output));
    assert!(!scratch.file("ran").exists(), "the command ran anyway");
    // The server sees the connection close and takes the acquire out of the queue.
    wait_until(|| async { server.status().await.waiting == 0 }).await;
    assert_eq!(server.status().await.counters.granted, 1);
    assert!(held.release().await.unwrap());
    server.stop().await;
}
