//! Compile-time checks that the public types can cross threads and tasks, as tokio checks its
//! own (`assert_send`, `assert_sync`): a change that makes a handle, a guard, an error or a
//! returned future lose `Send` or `Sync` fails to build here, not in a user's `tokio::spawn`.
//! Nothing here runs.

#![allow(
    dead_code,
    reason = "the functions exist to be type-checked, never called"
)]

use std::time::Duration;

use crate::{
    AcquireError, AcquireOptions, ExtendError, Floodgate, FloodgateLayer, Grant, InvalidField,
    Limiter, LimiterSpec, LimiterStatus, MemoryLimiter, MemoryStore, Permit, StoreError,
    TokioClock, Unavailable,
};

/// The embedded store's limiter handle, on its default clock.
type Mem = MemoryLimiter<TokioClock>;

fn send<T: Send>() {}
fn sync<T: Sync>() {}
fn send_sync_static<T: Send + Sync + 'static>() {}
fn send_value<T: Send>(_: &T) {}

fn handles_and_values() {
    send_sync_static::<Floodgate<MemoryStore>>();
    send_sync_static::<Limiter<Mem>>();
    send_sync_static::<Permit<Mem>>();
    send_sync_static::<FloodgateLayer<Mem>>();
    send_sync_static::<AcquireOptions>();
    send_sync_static::<LimiterSpec>();
    send_sync_static::<LimiterStatus>();
    send_sync_static::<Grant>();
    // Errors go into `Box<dyn Error + Send + Sync>` and `anyhow::Error`.
    send_sync_static::<AcquireError>();
    send_sync_static::<ExtendError>();
    send_sync_static::<StoreError>();
    send_sync_static::<Unavailable>();
    send_sync_static::<InvalidField>();
    send::<MemoryStore>();
    sync::<MemoryStore>();
}

#[cfg(feature = "redis")]
fn redis_handles() {
    use crate::{RedisLimiter, RedisStore};
    send_sync_static::<Floodgate<RedisStore>>();
    send_sync_static::<Limiter<RedisLimiter>>();
    send_sync_static::<Permit<RedisLimiter>>();
}

/// Every async method's future is `Send`, so it can be spawned on a multi-thread runtime.
async fn futures_are_send(
    gate: Floodgate<MemoryStore>,
    limiter: Limiter<Mem>,
    mut permit: Permit<Mem>,
) {
    send_value(&gate.define("x", LimiterSpec::concurrency(1)));
    send_value(&gate.delete("x"));
    send_value(&gate.limiters());
    send_value(&gate.limiter("x"));
    send_value(&limiter.acquire(AcquireOptions::new()));
    send_value(&limiter.try_acquire());
    send_value(&limiter.status());
    send_value(&permit.extend(Duration::from_secs(1)));
    send_value(&permit.release());
}
