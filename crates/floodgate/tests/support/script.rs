//! The limiter script on a real `redis-server`, as the script-level tests drive it (the twins,
//! the cost counts, the adaptive extremes). Redis-only, so not in `support/mod.rs`, which the
//! server and CLI crates include too; a test includes it by `#[path]` beside `mod support;`.

#![allow(dead_code)] // Each test uses its own part.

use super::support::RedisServer;

/// A connection to `server` with the limiter script loaded there (pipelines and `EVALSHA`
/// need it loaded).
pub(crate) fn connect_with_script(server: &RedisServer) -> (redis::Connection, redis::Script) {
    let mut conn = redis::Client::open(server.url())
        .unwrap()
        .get_connection()
        .unwrap();
    let script = redis::Script::new(&floodgate::store::redis::script_source());
    script.load(&mut conn).unwrap();
    (conn, script)
}

/// A fresh `redis-server` (stopped when the first value drops), a connection to it, and the
/// limiter script loaded there.
pub(crate) fn script_on_redis() -> (RedisServer, redis::Connection, redis::Script) {
    let server = RedisServer::start();
    let (conn, script) = connect_with_script(&server);
    (server, conn, script)
}
