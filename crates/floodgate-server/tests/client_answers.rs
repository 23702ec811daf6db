//! The Rust client (`floodgate_server::client`, under the CLI) against answers the API never
//! gives: a proxy's error page, an endless body; what its messages leave out (a password in
//! the URL, the token); and a request of its own against the real server. The misbehaving
//! server is a real socket on `127.0.0.1:0` that answers every request with the same bytes.

#![allow(clippy::unwrap_used)]

mod common;

use floodgate::{Floodgate, LimiterSpec};
use floodgate_server::client::{AcquireArgs, Client, ClientError};
use floodgate_server::server::ServerOptions;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

/// A server on `127.0.0.1:0` that reads each request's head, writes `head`, then a body of
/// `body_len` bytes: `start`, then spaces. Its base URL.
async fn answering(head: String, start: &'static [u8], body_len: usize) -> String {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut sock, _)) = listener.accept().await {
            let head = head.clone();
            tokio::spawn(async move {
                let mut got = Vec::new();
                let mut buf = [0u8; 4096];
                while !got.windows(4).any(|w| w == b"\r\n\r\n") {
                    match sock.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => got.extend_from_slice(&buf[..n]),
                    }
                }
                if sock.write_all(head.as_bytes()).await.is_err()
                    || sock.write_all(start).await.is_err()
                {
                    return;
                }
                let spaces = vec![b' '; 64 << 10];
                let mut left = body_len - start.len();
                while left > 0 {
                    let n = left.min(spaces.len());
                    // The client hung up: it read what it wanted.
                    if sock.write_all(&spaces[..n]).await.is_err() {
                        return;
                    }
                    left -= n;
                }
                let _ = sock.shutdown().await;
            });
        }
    });
    format!("http://{addr}")
}

/// A proxy's 502 page (200 KB of HTML and padding, with a terminal escape in it) becomes a
/// short one-line message: it was printed whole, escape and all, on the CLI's stderr.
#[tokio::test]
async fn an_error_page_is_cut_to_one_printable_line() {
    let page: &'static [u8] = b"<html>\x1b[2J<body>\n  <h1>502 Bad Gateway</h1>\n  <p>nginx</p>";
    let len = 200_000;
    let head = format!(
        "HTTP/1.1 502 Bad Gateway\r\ncontent-type: text/html\r\ncontent-length: {len}\r\n\r\n"
    );
    let client = Client::new(&answering(head, page, len).await, None).unwrap();
    let err = client.limiters().await.unwrap_err();
    let ClientError::Api {
        status,
        code,
        message,
        ..
    } = &err
    else {
        panic!("not an API error: {err}");
    };
    assert_eq!((*status, code.as_str()), (502, "http_502"));
    assert!(
        message.starts_with("<html>[2J<body> <h1>502 Bad Gateway</h1>"),
        "{message}"
    );
    assert!(message.chars().count() < 400, "{} chars", message.len());
    assert!(!message.chars().any(char::is_control), "{message:?}");
}

/// A 200 whose body does not end within a bound is refused, not read into memory to the end
/// (something else answering at the URL, streaming). The body here is valid JSON (the listing,
/// then spaces), so only the bound can refuse it.
#[tokio::test]
async fn an_answer_past_the_bound_is_refused() {
    let len = (256 << 20) + (1 << 20);
    let head = format!(
        "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {len}\r\n\r\n"
    );
    let url = answering(head, b"{\"limiters\":[]}", len).await;
    let client = Client::new(&url, None).unwrap();
    let err = client.limiters().await.unwrap_err();
    assert!(
        matches!(&err, ClientError::Connection { message, .. } if message.contains("longer than")),
        "{err}"
    );
}

/// A `user:password@` in the URL (basic auth to a proxy in front) is sent, but never shown:
/// not in a connection error, not in `Debug`; nor is the token.
#[tokio::test]
async fn a_password_in_the_url_and_the_token_are_not_shown() {
    // A port nobody listens on: bound, then closed.
    let port = {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        l.local_addr().unwrap().port()
    };
    let client = Client::new(
        &format!("http://admin:hunter2@127.0.0.1:{port}/"),
        Some("tok-s3cret".to_owned()),
    )
    .unwrap();
    let err = client.limiters().await.unwrap_err().to_string();
    assert!(err.contains(&format!("127.0.0.1:{port}")), "{err}");
    assert!(!err.contains("hunter2") && !err.contains("admin"), "{err}");
    assert!(!client.base().contains("hunter2"), "{}", client.base());
    let debug = format!("{client:?}");
    assert!(
        !debug.contains("hunter2") && !debug.contains("tok-s3cret"),
        "{debug}"
    );
}

/// A token that cannot be a header value (a newline read from a file) is said to be one, at
/// once: every request failed as "cannot reach the server" (exit 69) instead.
#[tokio::test]
async fn a_token_that_is_not_a_header_value_is_refused_up_front() {
    let err = Client::new("http://127.0.0.1:8750", Some("tok-s3cret\n".to_owned())).unwrap_err();
    let text = err.to_string();
    assert!(
        matches!(&err, ClientError::Settings { message } if message.starts_with("token:")),
        "{text}"
    );
    assert!(!text.contains("tok-s3cret"), "{text}");
}

/// `extend(id, None)` extends by the limiter's lease, as documented: it sent
/// `"lease_ms": null`, which the API refuses (400 `invalid_request`).
#[tokio::test]
async fn extend_without_a_lease_takes_the_limiters() {
    let gate = Floodgate::in_memory();
    gate.define("ext", LimiterSpec::concurrency(1))
        .await
        .unwrap();
    let served = common::Served::start(gate, ServerOptions::default()).await;
    let client = Client::new(&format!("http://{}", served.addr), None).unwrap();
    let permit = client
        .acquire("ext", &AcquireArgs::default())
        .await
        .unwrap();
    let reply = client.extend(&permit.permit_id, None).await.unwrap();
    assert_eq!(reply["lease_ms"], permit.lease_ms, "{reply}");
    assert!(client.release(&permit.permit_id).await.unwrap());
    served.stop().await;
}

/// A redirect is reported, naming where it points, not followed: a followed 302 made the
/// acquire a bodiless GET of the real server, answered 405 `method_not_allowed`, a server the
/// user never named.
#[tokio::test]
async fn a_redirect_is_reported_not_followed() {
    let gate = Floodgate::in_memory();
    gate.define("lim", LimiterSpec::concurrency(1))
        .await
        .unwrap();
    let served = common::Served::start(gate, ServerOptions::default()).await;
    let to = format!("http://{}/v1/limiters/lim/acquire", served.addr);
    let head = format!("HTTP/1.1 302 Found\r\nlocation: {to}\r\ncontent-length: 0\r\n\r\n");
    let client = Client::new(&answering(head, b"", 0).await, None).unwrap();
    let err = client
        .acquire("lim", &AcquireArgs::default())
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some("redirect"), "{err}");
    assert!(err.to_string().contains(&to), "{err}");
    served.stop().await;
}

/// A 200 that is JSON but not the API's (another service at the URL) is an unexpected answer:
/// the listing was read as no limiters (an empty `status` table) and the release as "was not
/// held".
#[tokio::test]
async fn a_200_without_the_apis_fields_is_unexpected() {
    let head = "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 2\r\n\r\n";
    let client = Client::new(&answering(head.to_owned(), b"{}", 2).await, None).unwrap();
    for err in [
        client.limiters().await.map(drop).unwrap_err(),
        client.release("lim.1").await.map(drop).unwrap_err(),
    ] {
        assert!(
            matches!(&err, ClientError::Connection { message, .. }
                if message.starts_with("unexpected answer")),
            "{err}"
        );
    }
}
