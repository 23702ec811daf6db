//! The dashboard's server side over real HTTP: `GET /v1/limiters/{name}/holders`, the sign-in
//! (cookie, never the token in a URL), refusals without it, the event streams, admin actions
//! and `api_writes`, and that an open event stream does not hold up a shutdown.
//! No assertion is about elapsed time; waits are bounded polling loops.

#![allow(clippy::unwrap_used)]

mod common;

use common::{Served, PATIENCE, POLL};
use floodgate::{Floodgate, LimiterSpec};
use floodgate_server::server::ServerOptions;
use reqwest::StatusCode;
use serde_json::{json, Value};

const TOKEN: &str = "dash-s3cret";

async fn start(options: ServerOptions) -> (Served, String, reqwest::Client) {
    let gate = Floodgate::in_memory();
    gate.define("db", LimiterSpec::concurrency(3))
        .await
        .unwrap();
    let served = Served::start(gate, options).await;
    let base = format!("http://{}", served.addr);
    let http = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();
    (served, base, http)
}

fn with_token() -> ServerOptions {
    ServerOptions {
        token: Some(TOKEN.to_owned()),
        ..ServerOptions::default()
    }
}

async fn json_of(resp: reqwest::Response) -> (StatusCode, Value) {
    let status = resp.status();
    let text = resp.text().await.unwrap();
    (status, serde_json::from_str(&text).unwrap_or(Value::Null))
}

/// Signs in and returns the `Cookie` header value.
async fn sign_in(http: &reqwest::Client, base: &str) -> String {
    let resp = http
        .post(format!("{base}/dashboard/login"))
        .json(&json!({"token": TOKEN}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::NO_CONTENT);
    let cookie = resp
        .headers()
        .get("set-cookie")
        .unwrap()
        .to_str()
        .unwrap()
        .to_owned();
    assert!(cookie.contains("HttpOnly"), "{cookie}");
    assert!(cookie.contains("SameSite=Strict"), "{cookie}");
    assert!(
        !cookie.contains(TOKEN),
        "the cookie must not carry the token: {cookie}"
    );
    cookie.split(';').next().unwrap().to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn holders_are_listed_with_their_labels_bounded_and_behind_the_token() {
    let (served, base, http) = start(with_token()).await;
    let acquire = |label: &'static str, lease_ms: u64| {
        let http = http.clone();
        let base = base.clone();
        async move {
            let resp = http
                .post(format!("{base}/v1/limiters/db/acquire"))
                .bearer_auth(TOKEN)
                .json(&json!({"holder": label, "lease_ms": lease_ms, "wait_ms": 30_000}))
                .send()
                .await
                .unwrap();
            json_of(resp).await
        }
    };
    let (_, a) = acquire("worker-a", 60_000).await;
    let (_, b) = acquire("worker-b", 30_000).await;
    acquire("worker-c", 90_000).await;
    let queued = tokio::spawn(acquire("waiter-d", 60_000));
    let get = |q: &'static str| {
        let http = http.clone();
        let base = base.clone();
        async move {
            let resp = http
                .get(format!("{base}/v1/limiters/db/holders{q}"))
                .bearer_auth(TOKEN)
                .send()
                .await
                .unwrap();
            json_of(resp).await
        }
    };
    let deadline = tokio::time::Instant::now() + PATIENCE;
    let body = loop {
        let (status, body) = get("").await;
        assert_eq!(status, StatusCode::OK, "{body}");
        if body["waiting"] == 1 {
            break body;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "never queued: {body}"
        );
        tokio::time::sleep(POLL).await;
    };
    let labels: Vec<&str> = body["holders"]
        .as_array()
        .unwrap()
        .iter()
        .map(|h| h["label"].as_str().unwrap())
        .collect();
    assert_eq!(labels, ["worker-b", "worker-a", "worker-c"]);
    assert_eq!(body["total_holders"], 3);
    assert_eq!(body["truncated"], false);
    assert_eq!(body["holders"][0]["permit_id"], b["permit_id"]);
    assert_eq!(body["holders"][1]["fencing_token"], a["fencing_token"]);
    assert!(body["holders"][0]["lease_left_ms"].as_u64().unwrap() <= 30_000);
    assert!(body["oldest_wait_ms"].is_u64());

    let (status, one) = get("?limit=1").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(one["holders"].as_array().unwrap().len(), 1);
    assert_eq!(one["truncated"], true);

    for (bad, names) in [
        ("?limit=10001", "limit:"),
        ("?limit=-1", "limit:"),
        ("?limit=x", "limit:"),
        ("?what=1", "what:"),
    ] {
        let (status, err) = get(bad).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{bad}: {err}");
        assert_eq!(err["error"], "invalid_request");
        assert!(err["message"].as_str().unwrap().starts_with(names), "{err}");
    }
    let resp = http
        .get(format!("{base}/v1/limiters/nope/holders"))
        .bearer_auth(TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(json_of(resp).await.1["error"], "unknown_limiter");
    let resp = http
        .get(format!("{base}/v1/limiters/db/holders"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::UNAUTHORIZED);

    // Release b: the waiter takes its place, with its own label.
    let resp = http
        .post(format!(
            "{base}/v1/permits/{}/release",
            b["permit_id"].as_str().unwrap()
        ))
        .bearer_auth(TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let (status, _) = queued.await.unwrap();
    assert_eq!(status, StatusCode::OK);
    let (_, body) = get("").await;
    let labels: Vec<&str> = body["holders"]
        .as_array()
        .unwrap()
        .iter()
        .map(|h| h["label"].as_str().unwrap())
        .collect();
    assert_eq!(labels, ["worker-a", "waiter-d", "worker-c"]);
    served.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_the_token_the_page_and_its_data_are_refused_and_sign_in_uses_a_cookie() {
    let (served, base, http) = start(with_token()).await;
    let get = |path: &str, cookie: Option<&str>| {
        let mut req = http.get(format!("{base}{path}"));
        if let Some(c) = cookie {
            req = req.header("cookie", c);
        }
        req.send()
    };
    // The page sends strangers to the sign-in page; its data and streams answer 401.
    let resp = get("/", None).await.unwrap();
    assert_eq!(resp.status(), StatusCode::SEE_OTHER);
    assert_eq!(resp.headers()["location"], "/login");
    for path in [
        "/dashboard/api/overview",
        "/dashboard/api/limiters/db",
        "/dashboard/events",
        "/dashboard/events/db",
        "/dashboard/assets/app.js",
    ] {
        let (status, body) = json_of(get(path, None).await.unwrap()).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED, "{path}");
        assert_eq!(body["error"], "unauthorized", "{path}");
        let forged = get(path, Some("floodgate_session=0123456789abcdef"))
            .await
            .unwrap();
        assert_eq!(forged.status(), StatusCode::UNAUTHORIZED, "{path}");
    }
    // The sign-in page itself is public.
    let login = get("/login", None).await.unwrap();
    assert_eq!(login.status(), StatusCode::OK);
    assert!(login.text().await.unwrap().contains("type=\"password\""));
    let resp = http
        .post(format!("{base}/dashboard/login"))
        .json(&json!({"token": "wrong"}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::UNAUTHORIZED);
    assert!(resp.headers().get("set-cookie").is_none());

    let cookie = sign_in(&http, &base).await;
    let page = get("/", Some(&cookie)).await.unwrap();
    assert_eq!(page.status(), StatusCode::OK);
    let html = page.text().await.unwrap();
    assert!(html.contains("/dashboard/assets/app.js"));
    assert!(
        !html.contains("http://") && !html.contains("https://"),
        "nothing fetched from elsewhere"
    );
    let (status, overview) =
        json_of(get("/dashboard/api/overview", Some(&cookie)).await.unwrap()).await;
    assert_eq!(status, StatusCode::OK);
    assert!(overview["limiters"].is_array());
    // The bearer token works too (for tools).
    let resp = http
        .get(format!("{base}/dashboard/api/overview"))
        .bearer_auth(TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);

    // Signing out ends the session.
    let resp = http
        .post(format!("{base}/dashboard/logout"))
        .header("cookie", &cookie)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::NO_CONTENT);
    let resp = get("/dashboard/api/overview", Some(&cookie)).await.unwrap();
    assert_eq!(resp.status(), StatusCode::UNAUTHORIZED);
    served.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_actions_need_the_dashboard_header_and_api_writes() {
    let (served, base, http) = start(with_token()).await;
    let cookie = sign_in(&http, &base).await;
    let put = |headers: bool, value: u32| {
        let mut req = http
            .put(format!("{base}/dashboard/api/limiters/db/limit"))
            .header("cookie", &cookie)
            .json(&json!({"concurrency": value}));
        if headers {
            req = req.header("x-floodgate-dashboard", "1");
        }
        req.send()
    };
    let (status, body) = json_of(put(false, 9).await.unwrap()).await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    assert_eq!(body["error"], "csrf");
    let (status, body) = json_of(put(true, 9).await.unwrap()).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let (_, v1) = json_of(
        http.get(format!("{base}/v1/limiters/db"))
            .bearer_auth(TOKEN)
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(v1["limit"], 9);
    let (status, body) = json_of(put(true, 0).await.unwrap()).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    assert_eq!(body["error"], "invalid_request");
    // A tool with the bearer token instead of the cookie needs the header too (dashboard.md).
    let (status, body) = json_of(
        http.put(format!("{base}/dashboard/api/limiters/db/limit"))
            .bearer_auth(TOKEN)
            .json(&json!({"concurrency": 9}))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{body}");
    assert_eq!(body["error"], "csrf");

    // Release a stuck permit by its token, then delete the limiter.
    let (_, grant) = json_of(
        http.post(format!("{base}/v1/limiters/db/acquire"))
            .bearer_auth(TOKEN)
            .json(&json!({"holder": "stuck"}))
            .send()
            .await
            .unwrap(),
    )
    .await;
    let release = |token: &Value| {
        http.post(format!("{base}/dashboard/api/limiters/db/release"))
            .header("cookie", &cookie)
            .header("x-floodgate-dashboard", "1")
            .json(&json!({"fencing_token": token}))
            .send()
    };
    let (status, body) = json_of(release(&grant["fencing_token"]).await.unwrap()).await;
    assert_eq!(
        (status, body["released"].clone()),
        (StatusCode::OK, json!(true))
    );
    let (_, body) = json_of(release(&grant["fencing_token"]).await.unwrap()).await;
    assert_eq!(body["released"], false);
    let (status, _) = json_of(
        http.delete(format!("{base}/dashboard/api/limiters/db"))
            .header("cookie", &cookie)
            .header("x-floodgate-dashboard", "1")
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    let resp = http
        .get(format!("{base}/v1/limiters/db"))
        .bearer_auth(TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::NOT_FOUND);
    served.stop().await;

    // A read-only server shows the dashboard but refuses its actions.
    let (served, base, http) = start(ServerOptions {
        api_writes: false,
        ..ServerOptions::default()
    })
    .await;
    let (status, body) = json_of(
        http.put(format!("{base}/dashboard/api/limiters/db/limit"))
            .header("x-floodgate-dashboard", "1")
            .json(&json!({"concurrency": 5}))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    assert_eq!(body["error"], "read_only");
    let (_, page) = json_of(
        http.get(format!("{base}/dashboard/api/limiters/db"))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(page["status"]["api_writes"], false);
    served.stop().await;
}

/// Reads server-sent events until `n` events named `name` arrived (bounded).
async fn events(resp: &mut reqwest::Response, name: &str, n: usize) -> Vec<Value> {
    named_events(resp, &[name], n)
        .await
        .into_iter()
        .map(|(_, v)| v)
        .collect()
}

/// Reads server-sent events until `n` events named one of `names` arrived (bounded), with
/// their names.
async fn named_events(
    resp: &mut reqwest::Response,
    names: &[&str],
    n: usize,
) -> Vec<(String, Value)> {
    let mut buf = String::new();
    let mut out = Vec::new();
    let deadline = tokio::time::Instant::now() + PATIENCE;
    while out.len() < n {
        let chunk = tokio::time::timeout_at(deadline, resp.chunk())
            .await
            .expect("events never came")
            .unwrap()
            .expect("stream ended");
        buf.push_str(&String::from_utf8_lossy(&chunk));
        while let Some(end) = buf.find("\n\n") {
            let block: String = buf.drain(..end + 2).collect();
            let mut event = "";
            let mut data = String::new();
            for line in block.lines() {
                if let Some(e) = line.strip_prefix("event: ") {
                    event = e;
                } else if let Some(d) = line.strip_prefix("data: ") {
                    data.push_str(d);
                }
            }
            if names.contains(&event) {
                out.push((event.to_owned(), serde_json::from_str(&data).unwrap()));
            }
        }
    }
    out
}

/// The overview stream's events: the whole, and the changes after it.
const OVERVIEW_EVENTS: &[&str] = &["overview", "overview-delta"];

/// The server's whole overview now (`GET /dashboard/api/overview`).
async fn whole_overview(http: &reqwest::Client, base: &str) -> Value {
    json_of(
        http.get(format!("{base}/dashboard/api/overview"))
            .send()
            .await
            .unwrap(),
    )
    .await
    .1
}

/// The overview's rows after a stream's events: the first whole overview with every change
/// after it applied, by name.
fn replay(events: &[(String, Value)]) -> std::collections::BTreeMap<String, Value> {
    let mut rows = std::collections::BTreeMap::new();
    for (name, v) in events {
        if name == "overview" {
            rows.clear();
            for r in v["limiters"].as_array().unwrap() {
                rows.insert(r["name"].as_str().unwrap().to_owned(), r.clone());
            }
        } else {
            for r in v["changed"].as_array().unwrap() {
                rows.insert(r["name"].as_str().unwrap().to_owned(), r.clone());
            }
            for gone in v["removed"].as_array().unwrap() {
                rows.remove(gone.as_str().unwrap());
            }
        }
    }
    rows
}

/// An open overview is sent the whole once, then only the rows that changed and the limiters
/// gone (at 10,000 idle limiters the whole is megabytes a second). Replaying the stream gives
/// what the server's own whole overview says at the same render.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_overview_stream_sends_changes_that_replay_to_the_whole() {
    let (served, base, http) = start(ServerOptions::default()).await;
    for i in 0..40 {
        let resp = http
            .put(format!("{base}/v1/limiters/idle-{i:02}"))
            .json(&json!({"concurrency": 5}))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), StatusCode::OK);
    }
    // Until the sampler has seen all 40 (its whole overview lists them, beside `db`).
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        let v = whole_overview(&http, &base).await;
        if v["limiters"].as_array().map_or(0, Vec::len) >= 41 {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "never sampled: {v}");
        tokio::time::sleep(POLL).await;
    }
    let mut stream = http
        .get(format!("{base}/dashboard/events"))
        .send()
        .await
        .unwrap();
    let mut got = named_events(&mut stream, OVERVIEW_EVENTS, 2).await;
    assert_eq!(got[0].0, "overview");
    let idle = got[0].1["limiters"].as_array().unwrap().iter();
    assert_eq!(
        idle.filter(|r| r["name"].as_str().unwrap().starts_with("idle-"))
            .count(),
        40
    );
    // Nothing moves: the change is empty.
    assert_eq!(got[1].0, "overview-delta");
    assert_eq!(got[1].1["changed"], json!([]), "{}", got[1].1);
    assert_eq!(got[1].1["removed"], json!([]), "{}", got[1].1);

    // One limiter takes a permit, another is deleted: only those two are sent.
    let resp = http
        .post(format!("{base}/v1/limiters/idle-07/acquire"))
        .json(&json!({}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let resp = http
        .delete(format!("{base}/v1/limiters/idle-31"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        got.extend(named_events(&mut stream, OVERVIEW_EVENTS, 1).await);
        let rows = replay(&got);
        if rows["idle-07"]["in_use"] == 1 && !rows.contains_key("idle-31") {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "never sent: {got:?}"
        );
    }
    let changed: Vec<&str> = got[2..]
        .iter()
        .flat_map(|(_, v)| v["changed"].as_array().unwrap())
        .map(|r| r["name"].as_str().unwrap())
        .collect();
    assert!(
        changed.iter().all(|n| *n == "idle-07"),
        "only the limiter that moved is sent: {changed:?}"
    );
    // The replayed rows are the whole overview of the same render, row for row.
    loop {
        let whole = whole_overview(&http, &base).await;
        let seq = got.last().unwrap().1["seq"].as_u64().unwrap();
        if whole["seq"].as_u64() == Some(seq) {
            let rows: Vec<Value> = replay(&got).into_values().collect();
            assert_eq!(json!(rows), whole["limiters"]);
            break;
        }
        // The stream is behind or ahead of the read: take the next render and compare again.
        assert!(tokio::time::Instant::now() < deadline, "renders never met");
        got.extend(named_events(&mut stream, OVERVIEW_EVENTS, 1).await);
    }
    served.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn event_streams_push_samples_and_end_at_shutdown() {
    let (served, base, http) = start(ServerOptions::default()).await;
    let resp = http
        .post(format!("{base}/v1/limiters/db/acquire"))
        .json(&json!({"holder": "streamed"}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let mut overview = http
        .get(format!("{base}/dashboard/events"))
        .send()
        .await
        .unwrap();
    assert_eq!(overview.status(), StatusCode::OK);
    assert!(overview.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/event-stream"));
    // Several pushes, each a new sample (its time moves on): the whole overview first, then
    // what changed, render after render.
    let got = named_events(&mut overview, OVERVIEW_EVENTS, 3).await;
    let names: Vec<&str> = got.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(names, ["overview", "overview-delta", "overview-delta"]);
    let seqs: Vec<u64> = got
        .iter()
        .map(|(_, v)| v["seq"].as_u64().unwrap())
        .collect();
    assert!(seqs.windows(2).all(|w| w[1] == w[0] + 1), "{seqs:?}");
    let times: Vec<u64> = got
        .iter()
        .map(|(_, v)| v["t"].as_u64().unwrap_or(0))
        .collect();
    assert!(times.windows(2).all(|w| w[0] <= w[1]), "{times:?}");
    assert!(times[2] > times[0] || times[0] == 0, "{times:?}");
    let (_, last) = got.last().unwrap();
    assert_eq!(last["store"], "ok");
    let rows = replay(&got);
    assert_eq!(rows["db"]["in_use"], 1, "{rows:?}");

    let mut limiter = http
        .get(format!("{base}/dashboard/events/db"))
        .send()
        .await
        .unwrap();
    let got = events(&mut limiter, "limiter", 2).await;
    assert_eq!(got[1]["holders"]["holders"][0]["label"], "streamed");
    assert_eq!(got[1]["status"]["in_use"], 1);
    let resp = http
        .get(format!("{base}/dashboard/events/nope"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::NOT_FOUND);

    // The page's history: at least the samples seen so far, on a 1 s grid.
    let (_, page) = json_of(
        http.get(format!("{base}/dashboard/api/limiters/db"))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert!(
        page["history"]["samples"].as_array().unwrap().len() >= 2,
        "{page}"
    );
    assert!(page["history"]["start"].as_u64().unwrap() > 0);

    // Streams still open: the shutdown must not wait for them (stop() is bounded).
    served.stop().await;
    let rest = tokio::time::timeout(PATIENCE, async {
        while let Ok(Some(_)) = overview.chunk().await {}
    })
    .await;
    assert!(rest.is_ok(), "the event stream did not end at shutdown");
}
