//! Redis restarted on older data (a snapshot taken before the last grants), with a lost grant
//! whose holder never heartbeats: its lease lapses during the learning window, so it is
//! neither re-adopted nor counted, but its holder may still be running (a stalled worker: the
//! case fencing tokens exist for). A grant made after the window must carry a larger token
//! than the lost one, or a fenced resource could not tell the two holders apart. The witness:
//! the tokens this test was answered, which the reloaded Redis no longer has. Keyed limiters
//! (the keyed script: its own grant path, per-key shares) run the same rounds.

#![cfg(feature = "redis")]

mod support;

use std::time::Duration;

use floodgate::{AcquireOptions, Floodgate, KeyedSpec, LimiterSpec, RedisConfig, RedisStore};

/// Defines `name` with a limit of 2, keyed (2 per key: the total binds) or plain.
async fn define(gate: &Floodgate<RedisStore>, name: &str, spec: LimiterSpec, keyed: bool) {
    if keyed {
        gate.define_keyed(name, spec, KeyedSpec::per_key(2))
            .await
            .expect("define keyed");
    } else {
        gate.define(name, spec).await.expect("define");
    }
}

/// An acquire's options, naming `key` on a keyed limiter.
fn on(keyed: bool, key: &str) -> AcquireOptions {
    if keyed {
        AcquireOptions::new().key(key)
    } else {
        AcquireOptions::new()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_grant_after_a_stale_reload_is_fenced_above_the_lost_grants() {
    fenced_above_the_lost_grants(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_keyed_grant_after_a_stale_reload_is_fenced_above_the_lost_grants() {
    fenced_above_the_lost_grants(true).await;
}

async fn fenced_above_the_lost_grants(keyed: bool) {
    let mut server = support::RedisServer::start();
    let mut config = RedisConfig::new(server.url());
    config.learning_window = Some(Duration::from_millis(1500));
    let gate = Floodgate::with_store(RedisStore::connect(config).await.expect("connect"));
    let spec = LimiterSpec::concurrency(2).with_default_lease(Duration::from_secs(30));
    define(&gate, "stale", spec, keyed).await;
    let limiter = gate.limiter("stale").await.expect("limiter");
    let kept = limiter.acquire(on(keyed, "a")).await.expect("kept");
    let saved = std::process::Command::new("redis-cli")
        .args(["-p", &server.port.to_string(), "SAVE"])
        .output()
        .expect("redis-cli");
    assert_eq!(String::from_utf8_lossy(&saved.stdout).trim(), "OK");
    // Granted after the snapshot, lost by the reload: short leases, never extended, one
    // released (the release is lost too).
    let mut lost = Vec::new();
    for i in 0..3 {
        // (Keyed: each on a key of its own, which the reload forgets too.)
        let p = limiter
            .acquire(on(keyed, &format!("lost{i}")).lease(Duration::from_millis(500)))
            .await
            .expect("lost");
        lost.push(p.fencing_token());
        if i == 0 {
            p.release().await.expect("release");
        } else {
            p.detach();
        }
    }
    tokio::task::block_in_place(|| server.restart());
    // After the window (the lost lease lapsed in it): one slot free beside the kept holder.
    let next = limiter
        .acquire(on(keyed, "lost1").wait(Duration::from_secs(30)))
        .await
        .expect("granted after the window");
    let status = limiter.status().await.expect("status");
    assert!(!status.learning, "{status:?}");
    assert!(
        next.fencing_token() > kept.fencing_token(),
        "{:?} not above the kept {:?}",
        next.fencing_token(),
        kept.fencing_token()
    );
    for t in &lost {
        assert!(
            next.fencing_token() > *t,
            "token {:?} handed out again after the reload (lost grant {t:?})",
            next.fencing_token()
        );
    }
    drop(kept);
}

/// Many operations race the store's discovery that Redis restarted on older data: the first
/// to fail has the master checked and the limiter put in its learning window, and none of the
/// others may run on the older state before that is done. The witness: two permits held (one
/// Redis lost) of a limit of two, so any grant is one too many. Six rounds, a new limiter and
/// restart each (the race is lost about one round in six without the gate in `generation.rs`).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn operations_racing_the_discovery_of_a_stale_reload_grant_nothing_over_the_lost_grant() {
    racing_the_discovery(false).await;
}

/// The same on a keyed limiter: the racers ask for the lost grant's key and for another, and
/// the total (2) is taken, so any grant is one too many.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn keyed_operations_racing_the_discovery_of_a_stale_reload_grant_nothing_over_it() {
    racing_the_discovery(true).await;
}

async fn racing_the_discovery(keyed: bool) {
    let mut server = support::RedisServer::start();
    let mut config = RedisConfig::new(server.url());
    config.learning_window = Some(Duration::from_secs(20));
    let gate = Floodgate::with_store(RedisStore::connect(config).await.expect("connect"));
    let spec = LimiterSpec::concurrency(2).with_default_lease(Duration::from_secs(60));
    for round in 0..6 {
        let name = format!("race{round}");
        define(&gate, &name, spec.clone(), keyed).await;
        let limiter = gate.limiter(&name).await.expect("limiter");
        let kept = limiter.acquire(on(keyed, "org")).await.expect("kept");
        let saved = std::process::Command::new("redis-cli")
            .args(["-p", &server.port.to_string(), "SAVE"])
            .output()
            .expect("redis-cli");
        assert_eq!(String::from_utf8_lossy(&saved.stdout).trim(), "OK");
        let lost = limiter.acquire(on(keyed, "org")).await.expect("lost");
        tokio::task::block_in_place(|| server.restart());
        let start = std::sync::Arc::new(tokio::sync::Barrier::new(16));
        let racers: Vec<_> = (0..16)
            .map(|i| {
                let limiter = limiter.clone();
                let start = std::sync::Arc::clone(&start);
                let key = if i % 2 == 0 { "org" } else { "other" };
                tokio::spawn(async move {
                    start.wait().await;
                    limiter
                        .acquire(on(keyed, key).wait(Duration::ZERO))
                        .await
                        .map(|p| p.fencing_token())
                })
            })
            .collect();
        let mut granted = Vec::new();
        for racer in racers {
            if let Ok(token) = racer.await.expect("racer") {
                granted.push(token);
            }
        }
        assert!(
            granted.is_empty(),
            "round {round}: granted {granted:?} over two held permits (limit 2) after the reload \
             (keyed: {keyed})"
        );
        kept.detach();
        lost.detach();
    }
}
