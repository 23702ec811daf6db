//! The behavioural suite, unchanged, against the Redis store on a real `redis-server`.

#![cfg(feature = "redis")]

mod suite;
mod support;

use std::sync::OnceLock;

use floodgate::{Floodgate, RedisConfig, RedisStore};

/// One server for the whole file; every test uses its own limiter names.
fn server() -> &'static support::RedisServer {
    static SERVER: OnceLock<support::RedisServer> = OnceLock::new();
    SERVER.get_or_init(support::RedisServer::start)
}

store_suite!(false, async {
    let store = RedisStore::connect(RedisConfig::new(server().url()))
        .await
        .expect("connect to redis");
    Floodgate::with_store(store)
});
