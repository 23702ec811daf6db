//! Logs that machines read: a real `floodgate serve --log-format json --access-log` process;
//! every line it writes parses as JSON, and the request ids in its lines are the ones its
//! responses carried in `X-Request-Id` (the client's when valid, else generated).

#![allow(clippy::unwrap_used)]

mod proc;

use proc::ServeProcess;
use serde_json::Value;

/// A call: method, path, body, the incoming request id, the expected status.
type Call<'a> = (&'a str, &'a str, Option<&'a str>, Option<&'a str>, u16);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_logs_carry_the_request_ids_of_the_responses() {
    let serve = ServeProcess::start(&["--access-log", "--log-format", "json"]);
    let http = reqwest::Client::new();
    let calls: [Call<'_>; 5] = [
        (
            "PUT",
            "/v1/limiters/logged",
            Some(r#"{"concurrency": 2}"#),
            Some("client-id-1"),
            200,
        ),
        (
            "POST",
            "/v1/limiters/logged/acquire",
            Some(r#"{"wait_ms": 0}"#),
            None,
            200,
        ),
        ("GET", "/v1/limiters/nope", None, Some("has a space"), 404),
        (
            "PUT",
            "/v1/limiters/logged",
            Some(r#"{"concurrency": 0}"#),
            Some(&"x".repeat(129)),
            400,
        ),
        ("GET", "/healthz", None, Some("probe-7"), 200),
    ];
    let mut seen = Vec::new();
    for (method, path, body, id, status) in calls {
        let mut req = http.request(method.parse().unwrap(), format!("{}{path}", serve.url));
        if let Some(id) = id {
            req = req.header("x-request-id", id);
        }
        if let Some(body) = body {
            req = req
                .header("content-type", "application/json")
                .body(body.to_owned());
        }
        let resp = req.send().await.unwrap();
        assert_eq!(resp.status().as_u16(), status, "{method} {path}");
        let echoed = resp.headers()["x-request-id"].to_str().unwrap().to_owned();
        match id {
            Some(id) if !id.contains(' ') && id.len() <= 128 => assert_eq!(echoed, id),
            // Invalid or missing: a generated one, never the client's.
            _ => {
                assert_eq!(echoed.len(), 16, "{echoed}");
                assert!(echoed.bytes().all(|b| b.is_ascii_hexdigit()), "{echoed}");
            }
        }
        seen.push((method, path, status, echoed));
    }
    let ids: Vec<&String> = seen.iter().map(|s| &s.3).collect();
    let unique: std::collections::BTreeSet<_> = ids.iter().collect();
    assert_eq!(unique.len(), ids.len(), "ids are unique: {ids:?}");

    // SIGHUP without a config file is handled (nothing to reload), never fatal.
    serve.signal(nix::sys::signal::Signal::SIGHUP);
    serve
        .wait_for_log(|l| l["message"] == "SIGHUP: no --config file, no limiters to reload")
        .await;
    assert!(reqwest::get(format!("{}/healthz", serve.url))
        .await
        .unwrap()
        .status()
        .is_success());

    // stop() parses every line as JSON and fails on any that is not.
    let logs = serve.stop();
    for line in &logs {
        for field in ["timestamp", "level", "target", "message"] {
            assert!(line.get(field).is_some(), "{field} missing: {line}");
        }
    }
    for (method, path, status, id) in &seen {
        let access: Vec<&Value> = logs
            .iter()
            .filter(|l| l["target"] == "floodgate::access" && l["request_id"] == id.as_str())
            .collect();
        assert_eq!(access.len(), 1, "one access line for {id}: {logs:?}");
        let a = access[0];
        assert_eq!(a["method"], *method);
        assert_eq!(a["path"], *path);
        assert_eq!(a["status"], *status);
        assert_eq!(a["span"]["request_id"], id.as_str());
        assert!(a["duration_ms"].as_f64().unwrap() >= 0.0);
    }
    // A line the handler logs (not the access log) carries the request id of its request.
    let set = logs
        .iter()
        .find(|l| l["message"] == "limiter set")
        .expect("the PUT logged the change");
    assert_eq!(set["span"]["request_id"], "client-id-1");
    // Lines outside any request carry no request span.
    let listening = logs
        .iter()
        .find(|l| l["message"] == "floodgate listening")
        .unwrap();
    assert!(listening.get("span").is_none(), "{listening}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_the_access_log_only_events_are_logged_and_rust_log_sets_levels() {
    // FLOODGATE_LOG is unset by the helper: RUST_LOG's directives apply (info only for the
    // serve command's own lines, which the helper waits for, and for the access log, which is
    // off; warn elsewhere).
    let serve = ServeProcess::start_with_env(
        &[],
        &[(
            "RUST_LOG",
            "warn,floodgate_server::cli::serve=info,floodgate::access=info",
        )],
    );
    let resp = reqwest::get(format!("{}/healthz", serve.url))
        .await
        .unwrap();
    assert!(resp.headers().contains_key("x-request-id"));
    let logs = serve.stop();
    assert!(
        logs.iter()
            .all(|l| l["level"] != "INFO" || l["target"] == "floodgate_server::cli::serve"),
        "RUST_LOG=warn hides info elsewhere: {logs:?}"
    );
    assert!(logs.iter().any(|l| l["message"] == "stopped"), "{logs:?}");
    assert!(
        logs.iter().all(|l| l["target"] != "floodgate::access"),
        "no access log unless asked: {logs:?}"
    );
}
