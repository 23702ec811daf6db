//! An idempotent keyed wait whose caller went away (docs/api.md, docs/keyed.md): both stores
//! keep it queued, in its place in its key's queue, for the grace (5 s, at most until its own
//! wait ends), so a retry with the same request id joins it instead of queueing anew behind
//! later waiters; a grant made while nobody waits for it goes back at once. The embedded store
//! used to cancel it at once (Redis kept it). Each test runs on the embedded store and on a
//! real `redis-server`, the first also on the durable embedded store, reopened after it (the
//! kept wait is in its log); no assertion depends on timing (the grace is never waited out).

#![cfg(not(feature = "shuttle"))]
#![allow(clippy::unwrap_used)]

#[path = "support/mod.rs"]
mod support;

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Waker};
use std::time::Duration;

use floodgate::{
    AcquireError, AcquireOptions, Durability, Floodgate, KeyedSpec, Limiter, LimiterBackend,
    LimiterSpec, MemoryStore, Permit, RedisConfig, RedisStore, Store,
};
use support::until_status;

type Acquiring<B> = Pin<Box<dyn Future<Output = Result<Permit<B>, AcquireError>> + Send>>;

/// Starts an acquire: polled once, so the store has it (the embedded store decides in that
/// poll; the Redis store has sent its script, ahead of anything this store sends after).
fn start<B: LimiterBackend + 'static>(
    limiter: &Limiter<B>,
    options: AcquireOptions,
) -> Acquiring<B> {
    let limiter = limiter.clone();
    let mut fut: Acquiring<B> = Box::pin(async move { limiter.acquire(options).await });
    let first = fut.as_mut().poll(&mut Context::from_waker(Waker::noop()));
    assert!(first.is_pending(), "queued, not decided");
    fut
}

/// Awaits an acquire with a liveness bound.
async fn finish<B: LimiterBackend>(what: &str, fut: Acquiring<B>) -> Permit<B> {
    tokio::time::timeout(Duration::from_secs(30), fut)
        .await
        .unwrap_or_else(|_| panic!("{what} was never granted"))
        .unwrap_or_else(|e| panic!("{what}: {e:?}"))
}

fn wait(options: AcquireOptions) -> AcquireOptions {
    options.key("org-b").wait(Duration::from_secs(60))
}

async fn keyed<S: Store>(gate: &Floodgate<S>) -> Limiter<S::Limiter>
where
    S::Limiter: 'static,
{
    let spec = LimiterSpec::concurrency(1).with_max_wait(Duration::from_secs(60));
    gate.define_keyed("orgs", spec, KeyedSpec::per_key(1))
        .await
        .unwrap();
    gate.limiter("orgs").await.unwrap()
}

/// The total's one permit held (key `org-a`); the first attempt of `request_id` queued for
/// `org-b`, then its caller gone; a later waiter of `org-b` queued behind it.
async fn abandoned<S: Store>(
    gate: &Floodgate<S>,
    request_id: &'static str,
) -> (
    Limiter<S::Limiter>,
    Permit<S::Limiter>,
    Acquiring<S::Limiter>,
)
where
    S::Limiter: 'static,
{
    let orgs = keyed(gate).await;
    let holder = orgs
        .acquire(AcquireOptions::new().key("org-a"))
        .await
        .unwrap();
    let first = start(&orgs, wait(AcquireOptions::new().request_id(request_id)));
    until_status(&orgs, "the first attempt queues", |s| s.waiting == 1).await;
    drop(first); // its caller went away
    let later = start(&orgs, wait(AcquireOptions::new()));
    // Still two waiting: the abandoned wait kept its place (it used to be cancelled at once
    // on the embedded store).
    let st = until_status(&orgs, "the later waiter queues", |s| s.waiting >= 2).await;
    assert_eq!((st.waiting, st.counters.cancelled), (2, 0), "{st:?}");
    (orgs, holder, later)
}

/// The first attempt of `job-1` queues for `org-b` and its caller goes away; a later waiter
/// of the same key queues behind it; the retry joins the first attempt's wait, so the release
/// of the holder grants the retry, not the later waiter.
async fn a_retry_joins_the_abandoned_wait_in_its_place<S: Store>(gate: Floodgate<S>)
where
    S::Limiter: 'static,
{
    let (orgs, holder, later) = abandoned(&gate, "job-1").await;
    let retry = start(&orgs, wait(AcquireOptions::new().request_id("job-1")));
    // Joined, not queued anew: still two waiting (this status runs after the retry's acquire
    // on either store).
    let st = orgs.status().await.unwrap();
    assert_eq!(st.waiting, 2, "{st:?}");

    assert!(holder.release().await.unwrap());
    let granted = finish("the retry", retry).await;
    let st = orgs.status().await.unwrap();
    assert_eq!(
        (st.in_use, st.waiting),
        (1, 1),
        "the later waiter still waits: {st:?}"
    );
    assert_eq!(st.counters.granted, 2, "{st:?}");
    assert!(granted.release().await.unwrap());
    let next = finish("the later waiter", later).await;
    assert!(next.release().await.unwrap());
}

/// Nobody retries: the abandoned wait is granted when the holder leaves, nobody takes the
/// grant, and it goes straight back to the later waiter.
async fn a_grant_to_an_abandoned_wait_goes_back<S: Store>(gate: Floodgate<S>)
where
    S::Limiter: 'static,
{
    let (orgs, holder, later) = abandoned(&gate, "job-2").await;
    assert!(holder.release().await.unwrap());
    let next = finish("the later waiter", later).await;
    let st = orgs.status().await.unwrap();
    assert_eq!((st.in_use, st.waiting), (1, 0), "{st:?}");
    // Three grants: the holder, the abandoned wait's (given back), the later waiter's.
    assert_eq!(
        (st.counters.granted, st.counters.released),
        (3, 2),
        "{st:?}"
    );
    assert!(next.release().await.unwrap());
}

/// Two tests running `$body` (a function of the gate): on the embedded store and on a real
/// `redis-server`.
macro_rules! on_both_stores {
    ($embedded:ident, $on_redis:ident, $body:ident) => {
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn $embedded() {
            $body(Floodgate::in_memory()).await;
        }

        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn $on_redis() {
            let server = support::RedisServer::start();
            let store = RedisStore::connect(RedisConfig::new(server.url()))
                .await
                .unwrap();
            $body(Floodgate::with_store(store)).await;
        }
    };
}

on_both_stores!(
    embedded_a_retry_joins_the_abandoned_keyed_wait_in_its_place,
    redis_a_retry_joins_the_abandoned_keyed_wait_in_its_place,
    a_retry_joins_the_abandoned_wait_in_its_place
);

on_both_stores!(
    embedded_a_grant_to_an_abandoned_keyed_wait_goes_back,
    redis_a_grant_to_an_abandoned_keyed_wait_goes_back,
    a_grant_to_an_abandoned_wait_goes_back
);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn durable_a_retry_joins_the_abandoned_keyed_wait_and_the_log_replays_it() {
    let dir = tempfile::tempdir().unwrap();
    let open = || MemoryStore::open(Durability::new(dir.path())).unwrap().0;
    let before = {
        let store = open();
        let gate = Floodgate::with_store(store.clone());
        a_retry_joins_the_abandoned_wait_in_its_place(gate.clone()).await;
        let status = gate.limiter("orgs").await.unwrap().status().await.unwrap();
        // As a server does on shutdown (dropping the last handle, at the end of this block,
        // does the same): the directory is unlocked when it returns.
        store.close();
        status
    };
    // Reopened from its log: the same counts, nothing held or queued.
    let gate = Floodgate::with_store(open());
    let orgs = gate.limiter("orgs").await.unwrap();
    let after = orgs.status().await.unwrap();
    assert_eq!((after.in_use, after.waiting), (0, 0), "{after:?}");
    assert_eq!(
        (after.counters.granted, after.counters.released),
        (before.counters.granted, before.counters.released),
        "{before:?} {after:?}"
    );
}
