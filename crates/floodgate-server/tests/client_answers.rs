//! The Rust client (`floodgate_server::client`, under the CLI): what its messages leave out (a
//! password in the URL, the token).

#![allow(clippy::unwrap_used)]

use floodgate_server::client::{Client, ClientError};
use tokio::net::TcpListener;

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
        matches!(&err, ClientError::Connection { message, .. } if message.starts_with("token:")),
        "{text}"
    );
    assert!(!text.contains("tok-s3cret"), "{text}");
}
