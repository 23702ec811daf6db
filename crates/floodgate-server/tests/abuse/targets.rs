//! Request targets: percent-encoded and overlong path segments (limiter names, permit ids,
//! keys), query strings, and methods on routes that do not take them.

use crate::{bare, json_request, one, Abused};

/// Path segments no limiter name may be: each refused 400 naming `name`, on every route that
/// takes a name, including the witness's own limiter behind an encoding trick.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn abusive_limiter_names_are_400_naming_the_name() {
    let srv = Abused::start().await;
    let ten_kb = "n".repeat(10_000);
    let names = [
        "%00",
        "w%00",
        "%FF",                    // not UTF-8 once decoded
        "%C3%28",                 // an invalid UTF-8 sequence
        "%ED%A0%80",              // a UTF-16 surrogate in UTF-8
        "w%2F..",                 // an encoded slash
        "%2E%2E",                 // `..`, encoded
        "%2E",                    // `.`, encoded
        "w%20",                   // the witness's name with a trailing space
        "%E2%80%8Bw",             // a zero-width space before `w`
        "%EF%BC%B7",              // a fullwidth `W`
        "w%0D%0Ax-injected:%201", // a header injection attempt
        &ten_kb,
    ];
    let routes: [(&str, &str, Option<&str>); 7] = [
        ("GET", "/v1/limiters/{}", None),
        ("PUT", "/v1/limiters/{}", Some(r#"{"concurrency": 1}"#)),
        ("DELETE", "/v1/limiters/{}", None),
        ("POST", "/v1/limiters/{}/acquire", Some("{}")),
        ("GET", "/v1/limiters/{}/holders", None),
        (
            "POST",
            "/v1/limiters/{}/feedback",
            Some(r#"{"outcome": "ok"}"#),
        ),
        ("PUT", "/v1/limiters/{}/keys/a", Some("{}")),
    ];
    for name in names {
        for (method, template, body) in routes {
            let path = template.replace("{}", name);
            let request = match body {
                Some(body) => json_request(method, &path, body),
                None => bare(method, &path),
            };
            let what = format!("{method} {}", &path[..path.len().min(80)]);
            one(srv.addr(), &request)
                .await
                .refused(400, "invalid_request", Some("name"), &what);
        }
    }
    srv.intact("bad names").await;
    srv.stop().await;
}

/// Permit ids that are not `limiter.token`: 400 naming `permit_id`; ids aimed at the witness's
/// token through another limiter or an encoding trick release nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn abusive_permit_ids_release_nothing() {
    let srv = Abused::start().await;
    let token = srv
        .permit
        .rsplit_once('.')
        .map(|(_, t)| t.to_owned())
        .unwrap();
    let ten_kb = format!("{}.{token}", "w".repeat(10_000));
    let refused = [
        format!("w.{token}%00"),
        format!("w%00.{token}"),
        format!("w.{token}%FF"),
        "w.%EF%BC%91".to_owned(), // a fullwidth digit
        format!("w.0x{token}"),
        format!("w.{token}e0"),
        "w.18446744073709551616".to_owned(),
        format!("w.-{token}"),
        format!("w.%20{token}"),
        format!("w%2E{token}%2E"),
        ten_kb,
    ];
    for id in &refused {
        for action in ["extend", "release"] {
            let path = format!("/v1/permits/{id}/{action}");
            let what = format!("POST {}", &path[..path.len().min(80)]);
            one(srv.addr(), &json_request("POST", &path, "{}"))
                .await
                .refused(400, "invalid_request", Some("permit_id"), &what);
        }
    }
    // Well-formed, but not the witness: another limiter's, or the witness's limiter with an
    // encoded dot (decoded, it *is* the witness's id: that one is legitimately the permit).
    for id in [
        format!("p.{token}"),
        format!("k.{token}"),
        format!("W.{token}"),
    ] {
        let path = format!("/v1/permits/{id}/release");
        let answer = one(srv.addr(), &json_request("POST", &path, "{}")).await;
        assert!(
            answer.status == 200 && answer.json["released"] == false || answer.status == 404,
            "{id}: {}",
            answer.text
        );
    }
    srv.intact("bad permit ids").await;
    srv.stop().await;
}

/// Keys of a keyed limiter given in the path: NUL, not UTF-8, 10 KB.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn abusive_keys_in_the_path_are_400() {
    let srv = Abused::start().await;
    let ten_kb = "k".repeat(10_000);
    for key in ["%00", "%FF", "a%0Ab", ten_kb.as_str()] {
        for method in ["PUT", "DELETE"] {
            let path = format!("/v1/limiters/k/keys/{key}");
            let what = format!("{method} {}", &path[..path.len().min(80)]);
            let request = if method == "PUT" {
                json_request(method, &path, "{}")
            } else {
                bare(method, &path)
            };
            one(srv.addr(), &request)
                .await
                .refused(400, "invalid_request", Some("key"), &what);
        }
    }
    // A bad limiter name next to a good key names the name, not the key.
    let answer = one(
        srv.addr(),
        &json_request("PUT", "/v1/limiters/%FF/keys/a", "{}"),
    )
    .await;
    let message = answer.api_error("bad name, good key");
    assert!(message.starts_with("name:"), "{}", answer.text);
    srv.intact("bad keys").await;
    srv.stop().await;
}

/// Query strings: the holders listing refuses a bad `limit` or an unknown parameter, the message
/// starting with the parameter at fault;
/// routes that take no query ignore one (as HTTP servers do), and a query never changes what
/// an acquire asks for.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn query_strings() {
    let srv = Abused::start().await;
    for (query, names) in [
        ("limit=-1", "limit:"),
        ("limit=1.5", "limit:"),
        ("limit=1e3", "limit:"),
        ("limit=18446744073709551616", "limit:"),
        ("limit=%FF", "limit:"),
        ("limit=", "limit:"),
        ("limit=10001", "limit:"),
        ("limit=1&limit=2", "limit:"),
        ("other=1", "other:"),
        ("limit=5&other=1", "other:"),
    ] {
        let path = format!("/v1/limiters/w/holders?{query}");
        let answer = one(srv.addr(), &bare("GET", &path)).await;
        answer.refused(400, "invalid_request", None, &path);
        let message = answer.json["message"].as_str().unwrap_or_default();
        assert!(message.starts_with(names), "{path}: {message}");
    }
    let ten_kb = format!("x={}", "q".repeat(10_000));
    for query in ["permits=1000", "%FF%00=%%%", ten_kb.as_str(), "&&&==="] {
        let path = format!("/v1/limiters/p/acquire?{query}");
        let answer = one(srv.addr(), &json_request("POST", &path, "{}")).await;
        assert_eq!(answer.status, 200, "{}", answer.text);
        assert_eq!(answer.json["permits"], 1, "{}", answer.text);
        let id = answer.json["permit_id"].as_str().unwrap();
        let released = one(
            srv.addr(),
            &bare("POST", &format!("/v1/permits/{id}/release?{query}")),
        )
        .await;
        assert_eq!(released.json["released"], true, "{}", released.text);
        let health = one(srv.addr(), &bare("GET", &format!("/healthz?{query}"))).await;
        assert_eq!(health.status, 200, "{}", health.text);
    }
    srv.intact("query strings").await;
    srv.stop().await;
}

/// Methods on routes that do not take them: 405 JSON; unknown methods too; never a 5xx.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_and_unknown_methods_are_json_4xx() {
    let srv = Abused::start().await;
    let routes = [
        "/v1/limiters",
        "/v1/limiters/w",
        "/v1/limiters/w/acquire",
        "/v1/limiters/w/holders",
        "/v1/limiters/k/keys/a",
        "/v1/permits/w.1/extend",
        "/v1/permits/w.1/release",
        "/metrics",
        "/healthz",
        "/readyz",
        "/dashboard/login",
    ];
    let methods = ["PATCH", "OPTIONS", "TRACE", "FOO", "get", "CONNECT"];
    for route in routes {
        for method in methods {
            let what = format!("{method} {route}");
            let answer = one(srv.addr(), &bare(method, route)).await;
            answer.api_error(&what);
            assert!(
                [400, 404, 405].contains(&answer.status),
                "{what}: {}",
                answer.text
            );
        }
    }
    // The routes' own wrong methods (those that exist on other routes).
    for (method, route) in [
        ("DELETE", "/v1/limiters/w/acquire"),
        ("GET", "/v1/limiters/w/acquire"),
        ("PUT", "/v1/permits/w.1/release"),
        ("POST", "/v1/limiters"),
        ("POST", "/v1/limiters/w"),
        ("POST", "/healthz"),
        ("DELETE", "/metrics"),
    ] {
        let what = format!("{method} {route}");
        one(srv.addr(), &json_request(method, route, "{}"))
            .await
            .refused(405, "method_not_allowed", None, &what);
    }
    srv.intact("methods").await;
    srv.stop().await;
}
