//! Issue 14 over HTTP, embedded store: a keyed limiter's permit is re-adopted under its key
//! when the server restarted without its state (docs/learning.md). Server A grants a permit of
//! key `org-a`; A stops; server B starts on a fresh embedded store with the limiter restored
//! learning (what `serve --learning-window` does for the config's keyed limiters). The holder
//! keeps extending: without its key the extend is lost (nothing revived), with its key and
//! permits it is held again, counted under its key and the total (`counters.adopted`), and once
//! the window ends a new acquire beyond either limit is refused while it holds. Bad keys are
//! 400s naming `key`. Real servers on `127.0.0.1:0`; no assertion depends on timing (the
//! window's end is polled for with a generous bound).

#![allow(clippy::unwrap_used)]

mod common;

use std::time::{Duration, Instant};

use common::{call, Served};
use floodgate::{Floodgate, KeyedSpec, LimiterName, LimiterSpec, Store};
use floodgate_server::server::ServerOptions;
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_keyed_holder_that_keeps_extending_is_readopted_after_a_restart() {
    use reqwest::Method;
    let spec = || LimiterSpec::concurrency(2).with_max_wait(Duration::from_secs(30));
    let name = LimiterName::new("orgs").unwrap();

    let a = Served::start(Floodgate::in_memory(), ServerOptions::default()).await;
    let base_a = format!("http://{}/v1", a.addr);
    let def = json!({"concurrency": 2, "per_key": {"concurrency": 1}, "max_wait_ms": 30000});
    let (s, body) = call(Method::PUT, format!("{base_a}/limiters/orgs"), Some(def)).await;
    assert_eq!(s, 200, "{body}");
    let once = json!({"key": "org-a", "wait_ms": 0, "lease_ms": 600000});
    let (s, held) = call(
        Method::POST,
        format!("{base_a}/limiters/orgs/acquire"),
        Some(once),
    )
    .await;
    assert_eq!(s, 200, "{held}");
    let permit = held["permit_id"].as_str().unwrap().to_owned();
    let token = held["fencing_token"].as_u64().unwrap();
    a.stop().await;

    // B: a fresh embedded store, the limiter restored learning for a short window.
    let gate = Floodgate::in_memory();
    let st = gate
        .store()
        .restore_keyed_limiter(&name, spec(), KeyedSpec::per_key(1), Duration::from_secs(2))
        .await
        .unwrap();
    assert!(st.learning, "{st:?}");
    let b = Served::start(gate, ServerOptions::default()).await;
    let base = format!("http://{}/v1", b.addr);
    let extend = format!("{base}/permits/{permit}/extend");

    // Bad keys name the field.
    for bad in [json!(""), json!(null), json!(7), json!("a\u{7}b")] {
        let body = json!({"lease_ms": 60000, "permits": 1, "key": bad});
        let (s, err) = call(Method::POST, extend.clone(), Some(body)).await;
        assert_eq!(s, 400, "{err}");
        assert!(err["message"].as_str().unwrap().contains("key"), "{err}");
    }
    // Without its key: lost, as before (its key's share could not be counted).
    let body = json!({"lease_ms": 60000, "permits": 1});
    let (s, err) = call(Method::POST, extend.clone(), Some(body)).await;
    assert_eq!(
        (s, err["error"].as_str()),
        (410, Some("permit_lost")),
        "{err}"
    );
    // With its key: re-adopted under it and the total.
    let body = json!({"lease_ms": 60000, "permits": 1, "key": "org-a"});
    let (s, ok) = call(Method::POST, extend.clone(), Some(body.clone())).await;
    assert_eq!(s, 200, "{ok}");
    assert_eq!(ok["fencing_token"], token, "{ok}");
    let (_, st) = call(Method::GET, format!("{base}/limiters/orgs"), None).await;
    assert_eq!(
        (st["in_use"].as_u64(), st["learning"].as_bool()),
        (Some(1), Some(true)),
        "{st}"
    );
    assert_eq!(st["counters"]["adopted"], 1, "{st}");
    // Its key shows the holder.
    assert!(st["keyed"].to_string().contains("org-a"), "{st}");

    // The window ends (polled: liveness only); the holder keeps extending.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (_, st) = call(Method::GET, format!("{base}/limiters/orgs"), None).await;
        if st["learning"] == false {
            break;
        }
        assert!(Instant::now() < deadline, "the window never ended: {st}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (s, ok) = call(Method::POST, extend.clone(), Some(body)).await;
    assert_eq!(s, 200, "{ok}");

    // While it holds, org-a's own limit (1) is taken: refused.
    let try_a = json!({"key": "org-a", "wait_ms": 0});
    let (s, r) = call(
        Method::POST,
        format!("{base}/limiters/orgs/acquire"),
        Some(try_a),
    )
    .await;
    assert_eq!((s, r["error"].as_str()), (429, Some("wait_timeout")), "{r}");
    // Another key gets the total's last permit, with a token above the re-adopted one.
    let try_b = json!({"key": "org-b", "wait_ms": 0});
    let (s, g) = call(
        Method::POST,
        format!("{base}/limiters/orgs/acquire"),
        Some(try_b),
    )
    .await;
    assert_eq!(s, 200, "{g}");
    assert!(g["fencing_token"].as_u64().unwrap() > token, "{g}");
    // The total (2) is taken: a third key is refused.
    let try_c = json!({"key": "org-c", "wait_ms": 0});
    let (s, r) = call(
        Method::POST,
        format!("{base}/limiters/orgs/acquire"),
        Some(try_c),
    )
    .await;
    assert_eq!((s, r["error"].as_str()), (429, Some("wait_timeout")), "{r}");
    // Released: org-a may acquire again.
    let (s, r) = call(
        Method::POST,
        format!("{base}/permits/{permit}/release"),
        None,
    )
    .await;
    assert_eq!(s, 200, "{r}");
    let try_a = json!({"key": "org-a", "wait_ms": 0});
    let (s, r) = call(
        Method::POST,
        format!("{base}/limiters/orgs/acquire"),
        Some(try_a),
    )
    .await;
    assert_eq!(s, 200, "{r}");
    b.stop().await;
}
