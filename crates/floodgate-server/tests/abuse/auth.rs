//! Credentials that are wrong in shape rather than value, on a server with a token: bearer
//! values that are empty, huge, not UTF-8, another scheme or repeated; cookies the same; sign-in
//! bodies that are not a token. Each is a JSON 401 (or 400), never a 5xx, and the witness holds.

use crate::{bare, json_request, one, with_token, Abused};

const TOKEN: &str = "s3cret";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_credentials_are_json_401() {
    let srv = Abused::start_with_token(Some(TOKEN)).await;
    let get = |extra: &[u8]| {
        [
            &b"GET /v1/limiters/w HTTP/1.1\r\nhost: x\r\nconnection: close\r\n"[..],
            extra,
            b"\r\n",
        ]
        .concat()
    };
    let ten_kb = format!("authorization: Bearer {}\r\n", "t".repeat(10_000));
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("no Authorization", get(b"")),
        ("an empty bearer", get(b"authorization: Bearer\r\n")),
        ("a bearer of spaces", get(b"authorization: Bearer    \r\n")),
        ("a 10 KB bearer", get(ten_kb.as_bytes())),
        (
            "a non-UTF-8 bearer",
            get(b"authorization: Bearer s3cret\xff\r\n"),
        ),
        (
            "Basic with the token",
            get(b"authorization: Basic s3cret\r\n"),
        ),
        (
            "a prefix of the token",
            get(b"authorization: Bearer s3cre\r\n"),
        ),
        (
            "the token and more",
            get(b"authorization: Bearer s3cretX\r\n"),
        ),
        (
            "the token in quotes",
            get(b"authorization: Bearer \"s3cret\"\r\n"),
        ),
        (
            "a wrong bearer before the right one",
            get(b"authorization: Bearer nope\r\nauthorization: Bearer s3cret\r\n"),
        ),
        (
            "the token as a cookie",
            get(b"cookie: floodgate_session=s3cret\r\n"),
        ),
    ];
    for (what, request) in cases {
        one(srv.addr(), &request)
            .await
            .refused(401, "unauthorized", None, what);
        srv.intact(what).await;
    }
    // The dashboard's data: cookies that are not a session, in every odd shape.
    let overview = |extra: &[u8]| {
        [
            &b"GET /dashboard/api/overview HTTP/1.1\r\nhost: x\r\nconnection: close\r\n"[..],
            extra,
            b"\r\n",
        ]
        .concat()
    };
    let many = format!(
        "cookie: {}\r\n",
        (0..2_000)
            .map(|i| format!("c{i}=v"))
            .collect::<Vec<_>>()
            .join("; ")
    );
    for (what, request) in [
        (
            "a non-UTF-8 cookie",
            overview(b"cookie: floodgate_session=\xff\xfe\r\n"),
        ),
        ("2,000 cookies", overview(many.as_bytes())),
        (
            "a cookie without =",
            overview(b"cookie: floodgate_session\r\n"),
        ),
        (
            "an empty session",
            overview(b"cookie: floodgate_session=\r\n"),
        ),
    ] {
        one(srv.addr(), &request)
            .await
            .refused(401, "unauthorized", None, what);
    }
    // Sign-in bodies that are not `{"token": "..."}`.
    let big = format!("{{\"token\": \"{}\"}}", "t".repeat(60_000));
    for (what, body, status) in [
        ("a number", r#"{"token": 5}"#, 400),
        ("null", r#"{"token": null}"#, 400),
        ("no token", "{}", 400),
        (
            "an unknown field",
            r#"{"token": "s3cret", "admin": true}"#,
            400,
        ),
        ("a 60 KB token", big.as_str(), 401),
        (
            "the token with a NUL",
            "{\"token\": \"s3cret\\u0000\"}",
            401,
        ),
    ] {
        one(srv.addr(), &json_request("POST", "/dashboard/login", body))
            .await
            .api_error(what);
        let answer = one(srv.addr(), &json_request("POST", "/dashboard/login", body)).await;
        assert_eq!(answer.status, status, "{what}: {}", answer.text);
    }
    // The bearer scheme is case-insensitive on the dashboard as on the API (RFC 7235).
    for scheme in ["Bearer", "bearer", "BEARER"] {
        let header = format!("authorization: {scheme} {TOKEN}\r\n");
        let answer = one(srv.addr(), &overview(header.as_bytes())).await;
        assert_eq!(answer.status, 200, "{scheme}: {}", answer.text);
        let answer = one(srv.addr(), &get(header.as_bytes())).await;
        assert_eq!(answer.status, 200, "{scheme}: {}", answer.text);
    }
    // Health checks need no token, whatever credentials come with them.
    let health = one(
        srv.addr(),
        &with_token(bare("GET", "/healthz"), Some("wrong")),
    )
    .await;
    assert_eq!(health.status, 200, "{}", health.text);
    srv.intact("credentials").await;
    srv.stop().await;
}
