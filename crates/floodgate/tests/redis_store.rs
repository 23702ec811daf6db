//! The behavioural suite, unchanged, against the Redis store on a real `redis-server`.

#![cfg(feature = "redis")]

mod suite;
mod support;

use floodgate::{Floodgate, RedisConfig, RedisStore};

// Each test gets its own server, stopped when the test ends.
store_suite!(false, async {
    let server = support::RedisServer::start();
    let store = RedisStore::connect(RedisConfig::new(server.url()))
        .await
        .expect("connect to redis");
    (Floodgate::with_store(store), server)
});
