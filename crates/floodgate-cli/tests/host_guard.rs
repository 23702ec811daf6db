//! The guard against DNS rebinding, end to end: `floodgate serve` on loopback without a token
//! serves only requests whose `Host` names localhost or an IP address (or a name it was given),
//! as a browser on the same machine would send them; a DNS-rebound page's requests name its
//! own host and are refused, on the API and the dashboard alike.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod proc;

use proc::ServeProcess;
use reqwest::header::{AUTHORIZATION, HOST};
use serde_json::Value;

/// `(status, body)` of `GET path` naming `host` in `Host`.
async fn get(serve: &ServeProcess, path: &str, host: &str, token: Option<&str>) -> (u16, Value) {
    let mut request = reqwest::Client::new()
        .get(format!("{}{path}", serve.url))
        .header(HOST, host);
    if let Some(token) = token {
        request = request.header(AUTHORIZATION, format!("Bearer {token}"));
    }
    let response = request.send().await.expect("request");
    let status = response.status().as_u16();
    let body = response.json().await.unwrap_or(Value::Null);
    (status, body)
}

/// Names a rebinding page would send, and names a local client sends.
const FOREIGN: [&str; 3] = [
    "evil.example:8750",
    "localhost.evil.example",
    "127.0.0.1.nip.io:8750",
];
const LOCAL: [&str; 5] = [
    "127.0.0.1:8750",
    "localhost:8750",
    "[::1]:8750",
    "app.localhost",
    "192.168.1.20:8750",
];

#[tokio::test]
async fn on_loopback_without_a_token_only_local_names_are_served() {
    let serve = ServeProcess::start(&[]);
    for host in FOREIGN {
        for path in ["/v1/limiters", "/dashboard", "/metrics"] {
            let (status, body) = get(&serve, path, host, None).await;
            assert_eq!(status, 403, "{host} {path}: {body}");
            assert_eq!(body["error"], "host_not_allowed", "{host} {path}");
            let message = body["message"].as_str().unwrap();
            let name = host.split(':').next().unwrap();
            assert!(message.contains(&format!("Host {name:?}")), "{message}");
            assert!(message.contains("--allowed-host"), "{message}");
        }
    }
    for host in LOCAL {
        let (status, body) = get(&serve, "/v1/limiters", host, None).await;
        assert_eq!(status, 200, "{host}: {body}");
    }
    // The guard says so at start.
    assert!(serve
        .lines()
        .iter()
        .any(|l| l.contains("the guard against DNS rebinding")));
}

#[tokio::test]
async fn a_given_name_is_served_beside_local_ones() {
    let serve = ServeProcess::start(&["--allowed-host", "Floodgate.Internal"]);
    let (status, body) = get(&serve, "/v1/limiters", "floodgate.internal:8750", None).await;
    assert_eq!(status, 200, "{body}");
    let (status, _) = get(&serve, "/v1/limiters", "localhost", None).await;
    assert_eq!(status, 200);
    let (status, body) = get(&serve, "/v1/limiters", "evil.example", None).await;
    assert_eq!(
        (status, body["error"].as_str()),
        (403, Some("host_not_allowed"))
    );
    // From the environment, comma-separated, and applied off loopback too.
    let serve = ServeProcess::start_with_env(
        &["--listen", "0.0.0.0:0"],
        &[("FLOODGATE_ALLOWED_HOSTS", "a.internal,b.internal")],
    );
    for host in ["a.internal", "b.internal:1"] {
        let (status, body) = get(&serve, "/v1/limiters", host, None).await;
        assert_eq!(status, 200, "{host}: {body}");
    }
    let (status, _) = get(&serve, "/v1/limiters", "c.internal", None).await;
    assert_eq!(status, 403);
}

#[tokio::test]
async fn a_token_or_an_address_off_loopback_needs_no_host_check() {
    // The token guards: a rebound page does not have it.
    let serve = ServeProcess::start(&["--token", "s3cret"]);
    let (status, body) = get(&serve, "/v1/limiters", "evil.example", None).await;
    assert_eq!(
        (status, body["error"].as_str()),
        (401, Some("unauthorized"))
    );
    let (status, body) = get(&serve, "/v1/limiters", "evil.example", Some("s3cret")).await;
    assert_eq!(status, 200, "{body}");
    // Listening on every address, the server is reached by names the operator chose
    // (a Kubernetes service, a container name): none is refused.
    let serve = ServeProcess::start(&["--listen", "0.0.0.0:0"]);
    let (status, body) = get(&serve, "/v1/limiters", "floodgate.default.svc:8750", None).await;
    assert_eq!(status, 200, "{body}");
}
