//! Errors keep their causes: a store that cannot be reached answers `StoreError::Unavailable`
//! whose `source()` is the underlying error itself, not only its text.

#![cfg(feature = "redis")]
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::error::Error as _;

use floodgate::{RedisConfig, RedisStore, StoreError};

/// A loopback port nothing listens on: a socket bound to it that never listens, so connections
/// are refused, kept by the caller so no other process can bind the port meanwhile (a port
/// bound and released could be taken by another test's server before the connect).
fn closed_port() -> (tokio::net::TcpSocket, u16) {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let port = socket.local_addr().unwrap().port();
    (socket, port)
}

#[tokio::test]
async fn an_unreachable_redis_is_unavailable_with_the_redis_error_as_source() {
    let (_closed, port) = closed_port();
    let url = format!("redis://127.0.0.1:{port}");
    let err = RedisStore::connect(RedisConfig::new(url))
        .await
        .expect_err("nothing listens there");
    let StoreError::Unavailable(unavailable) = &err else {
        panic!("expected Unavailable, got {err:?}");
    };
    assert!(
        unavailable.message().starts_with("redis: "),
        "{unavailable}"
    );
    // The chain: StoreError -> Unavailable -> redis::RedisError.
    let cause = err
        .source()
        .and_then(|u| u.source())
        .expect("the Redis error is kept as the source");
    let redis_error = cause
        .downcast_ref::<redis::RedisError>()
        .expect("the source is the redis crate's error");
    assert!(
        redis_error.is_io_error() || redis_error.is_connection_refusal(),
        "{redis_error}"
    );
}

#[test]
fn a_message_only_failure_has_no_source() {
    let err = StoreError::Unavailable("no URL given".into());
    assert_eq!(err.to_string(), "store unavailable: no URL given");
    assert!(err.source().and_then(|u| u.source()).is_none());
}
