//! Grants of other shapes: a lost permit, a rate-only grant, an unreachable server, a keyed
//! limiter.

use std::time::Duration;

use floodgate::{LimiterSpec, RateSpec};
use floodgate_server::client::Client;
use tokio::process::Command;

use crate::harness::{code, stderr, wait_for_file, Scratch, TestServer, LIMITER};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_permit_stops_the_command_and_exits_75() {
    let server = TestServer::start(1).await;
    let scratch = Scratch::new("lost");
    let script = r#"
echo "$FLOODGATE_PERMIT_ID" > permit.tmp && mv permit.tmp permit
trap 'echo TERM > trapped; exit 0' TERM
while :; do sleep 0.05; done
"#;
    let child = server
        .floodgate(
            scratch.path(),
            // A lease no stall of a loaded machine outlasts before the release below (600 ms,
            // extended every 200 ms, could lapse first); the extend after it comes within 1 s.
            &["run", LIMITER, "--lease", "3s", "--", "sh", "-c", script],
        )
        .spawn()
        .unwrap();
    wait_for_file(&scratch.file("permit")).await;
    // Someone else releases the permit: the next extend finds it lost.
    let client = Client::new(&server.url, None).unwrap();
    assert!(client.release(scratch.read("permit").trim()).await.unwrap());

    let output = child.wait_with_output().await.unwrap();
    assert_eq!(code(&output), 75, "{}", stderr(&output));
    assert_eq!(scratch.read("trapped").trim(), "TERM");
    assert!(stderr(&output).contains("lost"), "{}", stderr(&output));
    let status = server.status().await;
    assert_eq!(status.in_use, 0);
    assert_eq!(status.counters.extend_lost, 1);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rate_only_grant_runs_without_extending_or_releasing() {
    let server = TestServer::start(1).await;
    let scratch = Scratch::new("rate-only");
    server
        .gate
        .define(
            "paced",
            LimiterSpec::rate(RateSpec::per(1000, Duration::from_secs(1)).with_burst(10)),
        )
        .await
        .unwrap();
    // Such a grant has no lease (`lease_ms` 0): nothing to keep alive, nothing to release, and
    // so nothing to warn about.
    let output = server
        .output(
            scratch.path(),
            &["run", "paced", "--", "sh", "-c", "sleep 0.3; exit 5"],
        )
        .await;
    assert_eq!(code(&output), 5, "{}", stderr(&output));
    assert_eq!(stderr(&output), "");
    let status = server
        .gate
        .limiter("paced")
        .await
        .unwrap()
        .status()
        .await
        .unwrap();
    assert_eq!(status.counters.granted, 1);
    assert_eq!(status.counters.extend_lost, 0);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_server_exits_69_without_running_the_command() {
    let scratch = Scratch::new("unreachable");
    // A socket bound and never listening, kept to the end: nothing listens on its port, and
    // no other process can start to meanwhile.
    let closed = tokio::net::TcpSocket::new_v4().unwrap();
    closed.bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let addr = closed.local_addr().unwrap();
    let output = Command::new(env!("CARGO_BIN_EXE_floodgate"))
        .args(["run", LIMITER, "--", "sh", "-c", "touch ran"])
        .current_dir(scratch.path())
        .env("FLOODGATE_URL", format!("http://{addr}"))
        .output()
        .await
        .unwrap();
    assert_eq!(code(&output), 69, "{}", stderr(&output));
    assert!(!scratch.file("ran").exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_takes_a_permit_for_its_key_of_a_keyed_limiter() {
    let server = TestServer::start(1).await;
    server
        .gate
        .define_keyed(
            "orgs",
            LimiterSpec::concurrency(4),
            floodgate::KeyedSpec::per_key(1).with_max_keys(1),
        )
        .await
        .unwrap();
    let scratch = Scratch::new("key");
    let output = server
        .output(
            scratch.path(),
            &["run", "orgs", "--key", "org-1", "--", "true"],
        )
        .await;
    assert_eq!(code(&output), 0, "{}", stderr(&output));
    let orgs = server.gate.limiter("orgs").await.unwrap();
    let status = orgs.status().await.unwrap();
    assert_eq!(status.counters.granted, 1, "granted for the key");
    assert_eq!(status.in_use, 0, "released after the command");
    // Bad input: no key for a keyed limiter, a key for a plain one: exit 2 naming the field.
    for args in [
        vec!["run", "orgs", "--", "true"],
        vec!["run", LIMITER, "--key", "org-1", "--", "true"],
    ] {
        let output = server.output(scratch.path(), &args).await;
        assert_eq!(code(&output), 2, "{args:?}: {}", stderr(&output));
        assert!(stderr(&output).contains("key"), "{}", stderr(&output));
    }
    // A second key beyond max_keys (1) while org-1 holds: EX_TEMPFAIL, not a failure.
    let held = orgs
        .acquire(floodgate::AcquireOptions::new().key("org-1"))
        .await
        .unwrap();
    let output = server
        .output(
            scratch.path(),
            &[
                "run", "orgs", "--key", "org-2", "--wait", "0s", "--", "true",
            ],
        )
        .await;
    assert_eq!(code(&output), 75, "{}", stderr(&output));
    assert!(stderr(&output).contains("keys"), "{}", stderr(&output));
    drop(held);
    server.stop().await;
}
