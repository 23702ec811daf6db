//! Redis restarted on older data (a snapshot taken before the last grants), with a lost grant
//! whose holder never heartbeats: its lease lapses during the learning window, so it is
//! neither re-adopted nor counted, but its holder may still be running (a stalled worker: the
//! case fencing tokens exist for). A grant made after the window must carry a larger token
//! than the lost one, or a fenced resource could not tell the two holders apart. The witness:
//! the tokens this test was answered, which the reloaded Redis no longer has.

#![cfg(feature = "redis")]

mod support;

use std::time::Duration;

use floodgate::{AcquireOptions, Floodgate, LimiterSpec, RedisConfig, RedisStore};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_grant_after_a_stale_reload_is_fenced_above_the_lost_grants() {
    let mut server = support::RedisServer::start();
    let mut config = RedisConfig::new(server.url());
    config.learning_window = Some(Duration::from_millis(1500));
    let gate = Floodgate::with_store(RedisStore::connect(config).await.expect("connect"));
    let spec = LimiterSpec::concurrency(2).with_default_lease(Duration::from_secs(30));
    gate.define("stale", spec).await.expect("define");
    let limiter = gate.limiter("stale").await.expect("limiter");
    let kept = limiter.acquire(AcquireOptions::new()).await.expect("kept");
    let saved = std::process::Command::new("redis-cli")
        .args(["-p", &server.port.to_string(), "SAVE"])
        .output()
        .expect("redis-cli");
    assert_eq!(String::from_utf8_lossy(&saved.stdout).trim(), "OK");
    // Granted after the snapshot, lost by the reload: short leases, never extended, one
    // released (the release is lost too).
    let mut lost = Vec::new();
    for i in 0..3 {
        let p = limiter
            .acquire(AcquireOptions::new().lease(Duration::from_millis(500)))
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
        .acquire(AcquireOptions::new().wait(Duration::from_secs(30)))
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
