//! Numbers at and past every bound in every body that takes one, and JSON that is deep,
//! duplicated or not quite JSON.

use serde_json::Value;

use crate::{bare, json_request, one, Abused};

/// Each value is put where a number goes: integers at and past u32 and u64, negatives, floats,
/// exponents (`1e400` overflows f64), leading zeros, hex, strings, booleans, containers.
const VALUES: [&str; 27] = [
    "0",
    "1",
    "-1",
    "-0",
    "1.5",
    "1.0",
    "1e3",
    "1E2",
    "1e400",
    "-1e400",
    "1e308",
    "4294967295",
    "4294967296",
    "18446744073709551615",
    "18446744073709551616",
    "340282366920938463463374607431768211456",
    "01",
    "+1",
    ".5",
    "0x10",
    "NaN",
    "Infinity",
    "\"1\"",
    "true",
    "null",
    "[]",
    "{}",
];

/// The values that are not JSON numbers (nor any JSON): a syntax error, named as `body`.
const NOT_JSON: [&str; 6] = ["01", "+1", ".5", "0x10", "NaN", "Infinity"];

/// Where numbers go: method, path, body with `N` for the value, and the field the message must
/// name.
const FIELDS: [(&str, &str, &str, &str); 25] = [
    (
        "POST",
        "/v1/limiters/p/acquire",
        r#"{"permits": N}"#,
        "permits",
    ),
    (
        "POST",
        "/v1/limiters/p/acquire",
        r#"{"lease_ms": N}"#,
        "lease_ms",
    ),
    (
        "POST",
        "/v1/limiters/p/acquire",
        r#"{"wait_ms": N}"#,
        "wait_ms",
    ),
    (
        "POST",
        "/v1/permits/p.1/extend",
        r#"{"lease_ms": N}"#,
        "lease_ms",
    ),
    (
        "POST",
        "/v1/permits/p.1/extend",
        r#"{"permits": N}"#,
        "permits",
    ),
    (
        "PUT",
        "/v1/limiters/s",
        r#"{"concurrency": N}"#,
        "concurrency",
    ),
    (
        "PUT",
        "/v1/limiters/s",
        r#"{"concurrency": 1, "lease_ms": N}"#,
        "lease_ms",
    ),
    (
        "PUT",
        "/v1/limiters/s",
        r#"{"concurrency": 1, "max_wait_ms": N}"#,
        "max_wait_ms",
    ),
    (
        "PUT",
        "/v1/limiters/s",
        r#"{"concurrency": 1, "max_queue": N}"#,
        "max_queue",
    ),
    (
        "PUT",
        "/v1/limiters/s",
        r#"{"rate": {"limit": N, "period_ms": 1000}}"#,
        "rate.limit",
    ),
    (
        "PUT",
        "/v1/limiters/s",
        r#"{"rate": {"limit": 5, "period_ms": N}}"#,
        "rate.period_ms",
    ),
    (
        "PUT",
        "/v1/limiters/s",
        r#"{"rate": {"limit": 5, "period_ms": 1000, "burst": N}}"#,
        "rate.burst",
    ),
    (
        "PUT",
        "/v1/limiters/s",
        r#"{"concurrency": 5, "adaptive": {"min": N, "max": 10}}"#,
        "adaptive",
    ),
    (
        "PUT",
        "/v1/limiters/s",
        r#"{"concurrency": 5, "adaptive": {"min": 1, "max": N}}"#,
        "adaptive",
    ),
    (
        "PUT",
        "/v1/limiters/s",
        r#"{"concurrency": 5, "adaptive": {"min": 1, "max": 10, "increase": N}}"#,
        "adaptive.increase",
    ),
    (
        "PUT",
        "/v1/limiters/s",
        r#"{"concurrency": 5, "adaptive": {"min": 1, "max": 10, "decrease": N}}"#,
        "adaptive.decrease",
    ),
    (
        "PUT",
        "/v1/limiters/s",
        r#"{"concurrency": 5, "adaptive": {"min": 1, "max": 10, "cooldown_ms": N}}"#,
        "adaptive.cooldown_ms",
    ),
    (
        "PUT",
        "/v1/limiters/s",
        r#"{"concurrency": 5, "adaptive": {"algorithm": "gradient", "min": 1, "max": 10, "tolerance": N}}"#,
        "adaptive.tolerance",
    ),
    (
        "PUT",
        "/v1/limiters/s",
        r#"{"concurrency": 5, "adaptive": {"algorithm": "gradient", "min": 1, "max": 10, "probe_rounds": N}}"#,
        "adaptive.probe_rounds",
    ),
    (
        "PUT",
        "/v1/limiters/s",
        r#"{"per_key": {"concurrency": N}}"#,
        "per_key.concurrency",
    ),
    (
        "PUT",
        "/v1/limiters/s",
        r#"{"per_key": {"concurrency": 1}, "max_keys": N}"#,
        "max_keys",
    ),
    (
        "PUT",
        "/v1/limiters/k/keys/a",
        r#"{"concurrency": N}"#,
        "concurrency",
    ),
    ("PUT", "/v1/limiters/k/keys/a", r#"{"weight": N}"#, "weight"),
    (
        "POST",
        "/v1/limiters/r/schedule",
        r#"{"count": N}"#,
        "count",
    ),
    (
        "POST",
        "/v1/limiters/r/unschedule",
        r#"{"reservation": N, "count": 1}"#,
        "reservation",
    ),
];

/// More places: feedback's latency, unschedule's count and the dashboard's two numbers.
const MORE_FIELDS: [(&str, &str, &str, &str); 4] = [
    (
        "POST",
        "/v1/limiters/p/feedback",
        r#"{"outcome": "ok", "latency_ms": N}"#,
        "latency_ms",
    ),
    (
        "POST",
        "/v1/limiters/r/unschedule",
        r#"{"reservation": 1, "count": N}"#,
        "count",
    ),
    (
        "PUT",
        "/dashboard/api/limiters/s/limit",
        r#"{"concurrency": N}"#,
        "concurrency",
    ),
    (
        "POST",
        "/dashboard/api/limiters/p/release",
        r#"{"fencing_token": N}"#,
        "fencing_token",
    ),
];

/// Undoes what an accepted request did, so the next case starts from the same state.
async fn undo(srv: &Abused, path: &str, answer: &Value) {
    if let Some(id) = answer["permit_id"].as_str() {
        if path.ends_with("/acquire") {
            let released = one(
                srv.addr(),
                &bare("POST", &format!("/v1/permits/{id}/release")),
            )
            .await;
            // (A grant with a 1 ms lease may have ended already: `released` may be false.)
            assert_eq!(released.status, 200, "{}", released.text);
        }
    }
    if path == "/v1/limiters/s" || path.starts_with("/dashboard/api/limiters/s/") {
        let _ = one(srv.addr(), &bare("DELETE", "/v1/limiters/s")).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn numbers_at_and_past_every_bound() {
    let srv = Abused::start().await;
    // The dashboard's write routes also need a limiter `s` and its CSRF header.
    let mut accepted = Vec::new();
    for (method, path, template, field) in FIELDS.iter().chain(MORE_FIELDS.iter()) {
        for value in VALUES {
            if path.starts_with("/dashboard/api/limiters/s/") {
                let made = one(
                    srv.addr(),
                    &json_request("PUT", "/v1/limiters/s", r#"{"concurrency": 1}"#),
                )
                .await;
                assert_eq!(made.status, 200, "{}", made.text);
            }
            let body = template.replace('N', value);
            let mut request = json_request(method, path, &body);
            if path.starts_with("/dashboard/") {
                let at = request.windows(2).position(|w| w == b"\r\n").unwrap() + 2;
                request.splice(at..at, b"x-floodgate-dashboard: 1\r\n".iter().copied());
            }
            let what = format!("{method} {path} {body}");
            let answer = one(srv.addr(), &request).await;
            if (200..300).contains(&answer.status) {
                // Accepted: then the value was a number in range, taken as given.
                let n: Result<u64, _> = value.parse();
                assert!(
                    n.is_ok()
                        || value.parse::<f64>().is_ok_and(f64::is_finite)
                            && ["latency_ms", "adaptive.decrease", "adaptive.tolerance"]
                                .contains(field),
                    "{what}: accepted {}",
                    answer.text
                );
                if let (Ok(n), Some(top)) = (n, answer.json.get(*field)) {
                    if top.is_u64() {
                        assert_eq!(
                            top.as_u64(),
                            Some(n),
                            "{what}: not taken as given: {}",
                            answer.text
                        );
                    }
                }
                accepted.push(format!("{field}={value}"));
                undo(&srv, path, &answer.json).await;
            } else if answer.status != 404 && answer.status != 410 {
                // 404/410: the request was well-formed; the target (a permit, a reservation) is
                // simply not there.
                let last = field.rsplit('.').next().unwrap_or(field);
                let message = answer.api_error(&what);
                // Not JSON at all: there is no field to name, only where the body broke.
                let syntax = NOT_JSON.contains(&value) && message.starts_with("body: ");
                assert!(
                    syntax
                        || message.contains(last)
                        || message.contains(field.split('.').next().unwrap_or(field)),
                    "{what}: the message does not name {field}: {}",
                    answer.text
                );
            } else {
                answer.api_error(&what);
            }
            if path.starts_with("/dashboard/api/limiters/s/") {
                let _ = one(srv.addr(), &bare("DELETE", "/v1/limiters/s")).await;
            }
        }
        srv.intact(&format!("numbers in {path} {field}")).await;
    }
    // Sanity: the in-range values were accepted somewhere, so the loop above tested both sides.
    assert!(accepted.iter().any(|a| a == "permits=1"), "{accepted:?}");
    assert!(
        accepted.iter().any(|a| a == "concurrency=4294967295")
            || accepted.iter().any(|a| a == "concurrency=1"),
        "{accepted:?}"
    );
    srv.stop().await;
}

/// JSON that is deep, repeats a key, or is not quite JSON (a lone surrogate, bytes that are not
/// UTF-8, a byte-order mark, a trailing comma, comments): 400 `invalid_request`, nothing acted on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deep_duplicated_and_almost_json_is_400() {
    let srv = Abused::start().await;
    let deep_array = format!(
        "{{\"holder\": {}{}}}",
        "[".repeat(30_000),
        "]".repeat(30_000)
    );
    let deep_object = format!(
        "{{\"rate\": {}1{}}}",
        "{\"limit\": ".repeat(5_000),
        "}".repeat(5_000)
    );
    let top_deep = format!("{}{}", "[".repeat(30_000), "]".repeat(30_000));
    let bodies: Vec<(&str, Vec<u8>)> = vec![
        ("a 30,000-deep array", deep_array.into_bytes()),
        ("a 5,000-deep object", deep_object.into_bytes()),
        ("a 30,000-deep top-level array", top_deep.into_bytes()),
        (
            "a repeated key",
            br#"{"permits": 1, "permits": 500}"#.to_vec(),
        ),
        ("a lone surrogate", br#"{"holder": "\ud800"}"#.to_vec()),
        (
            "bytes that are not UTF-8",
            b"{\"holder\": \"\xff\xfe\"}".to_vec(),
        ),
        ("a byte-order mark", b"\xef\xbb\xbf{}".to_vec()),
        ("a trailing comma", br#"{"permits": 1,}"#.to_vec()),
        ("a comment", b"{/* c */}".to_vec()),
        ("single quotes", b"{'permits': 1}".to_vec()),
        ("a NUL byte", b"{\0}".to_vec()),
        ("only whitespace", b"   ".to_vec()),
        (
            "a holder label with a terminal escape",
            br#"{"holder": "\u001b[2J\u0007"}"#.to_vec(),
        ),
    ];
    for path in ["/v1/limiters/w/acquire", "/v1/limiters/w"] {
        for (what, body) in &bodies {
            let method = if path.ends_with("acquire") {
                "POST"
            } else {
                "PUT"
            };
            let mut request = format!(
                "{method} {path} HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\
                 content-type: application/json\r\ncontent-length: {}\r\n\r\n",
                body.len()
            )
            .into_bytes();
            request.extend_from_slice(body);
            let what = format!("{method} {path}: {what}");
            one(srv.addr(), &request)
                .await
                .refused(400, "invalid_request", None, &what);
        }
    }
    srv.intact("deep JSON").await;
    srv.stop().await;
}
