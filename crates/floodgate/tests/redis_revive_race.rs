//! Two stores revive the same limiter after Redis lost it (`store/redis/revive.rs`): the later
//! reviver must not take the waiters already queued on the new incarnation for the lost one's
//! (it used to answer every waiter of its process "store unavailable" and cancel their queue
//! entries), while the waiters it had queued on the lost incarnation are answered at once.
//!
//! The interleaving is forced, not hoped for: store B talks to the real `redis-server` through
//! a relay that holds B's revival `put` (and everything B sends after it) until the test lets
//! it go. Meanwhile store A revives the limiter first and queues a waiter on it, and B queues
//! one behind its own held revival. An independent witness counts the permits out (the two
//! held from before the loss, re-adopted by their extends, then every grant) against the
//! limit. Plain and keyed limiters share the mechanism and run the same test. No assertion
//! depends on timing: waits are liveness bounds only. Last, the spec a store revives with: one
//! of its status reads, keys views or keyed definition reads answered after its own put (or
//! override) must not replace what it wrote, nor a status read or a put answered after its own
//! delete make the deleted limiter known again, nor a revival answered after its own later put
//! replace the put's spec, nor two of its puts answered crossed leave it the older spec. And
//! the
//! listing set (`fg:limiters`): a relisting held until after a delete must not list the deleted
//! limiter again, and a listing's removal of a gone name held until the limiter exists again
//! must not leave it unlisted (the relay holds the relisting's or the removal's command).

#![cfg(not(feature = "shuttle"))]
#![allow(clippy::unwrap_used)]

#[path = "support/mod.rs"]
mod support;

use support::until_status;

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use floodgate::{
    AcquireError, AcquireOptions, Floodgate, KeyedSpec, Limiter, LimiterBackend, LimiterSpec,
    Permit, RedisConfig, RedisLimiter, RedisStore, StoreError,
};
use support::relay::HoldingRelay;

/// The `revive` argument of a revival's `put`/`kput`, as RESP sends it.
const REVIVE_ARG: &[u8] = b"$6\r\nrevive\r\n";

/// Permits out, counted by the test itself, and the most ever out at once.
#[derive(Default)]
struct Witness {
    out: AtomicU32,
    most: AtomicU32,
}

impl Witness {
    fn took(&self, permits: u32) {
        let now = self.out.fetch_add(permits, Ordering::SeqCst) + permits;
        self.most.fetch_max(now, Ordering::SeqCst);
    }

    /// Counted back before the release is sent, so a grant it enables is never counted first.
    async fn give_back(&self, permit: Permit<RedisLimiter>) {
        self.out.fetch_sub(permit.permits(), Ordering::SeqCst);
        let _ = permit.release().await;
    }
}

async fn gate(url: String, window: Duration) -> Floodgate<RedisStore> {
    let mut config = RedisConfig::new(url);
    config.learning_window = Some(window);
    // The relay holds B's revival for as long as the test needs: no reply timeout meanwhile.
    config.response_timeout = Duration::from_secs(60);
    Floodgate::with_store(RedisStore::connect(config).await.unwrap())
}

/// Waits (a liveness bound only) until `cond` holds.
async fn until(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !cond() {
        assert!(Instant::now() < deadline, "{what}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

fn spawn_acquire(
    limiter: &Limiter<RedisLimiter>,
    options: AcquireOptions,
) -> tokio::task::JoinHandle<Result<Permit<RedisLimiter>, AcquireError>> {
    let limiter = limiter.clone();
    tokio::spawn(async move { limiter.acquire(options).await })
}

/// Awaits a task with a liveness bound.
async fn outcome<T>(what: &str, task: tokio::task::JoinHandle<T>) -> T {
    tokio::time::timeout(Duration::from_secs(60), task)
        .await
        .unwrap_or_else(|_| panic!("{what} never answered"))
        .unwrap()
}

/// Defines `name` on store A (keyed with `per_key` permits a key, or plain) and has store B
/// read it, so that both know it and either revives it after a loss; their limiter handles.
async fn known_to_both(
    a: &Floodgate<RedisStore>,
    b: &Floodgate<RedisStore>,
    name: &str,
    spec: LimiterSpec,
    keyed: Option<u32>,
) -> (Limiter<RedisLimiter>, Limiter<RedisLimiter>) {
    match keyed {
        Some(per_key) => a
            .define_keyed(name, spec, KeyedSpec::per_key(per_key))
            .await
            .unwrap(),
        None => a.define(name, spec).await.unwrap(),
    };
    let (la, lb) = (
        a.limiter(name).await.unwrap(),
        b.limiter(name).await.unwrap(),
    );
    // B knows it from reading it (a keyed limiter's definition from its keys view).
    lb.status().await.unwrap();
    if keyed.is_some() {
        lb.backend().keys(5).await.unwrap().unwrap();
    }
    (la, lb)
}

/// B's status after the loss, in a task: it finds the limiter gone, and its revival is held
/// on the way to Redis (returns once it is) until `relay.release()`.
async fn bs_status_with_its_revival_held(
    relay: &HoldingRelay,
    lb: &Limiter<RedisLimiter>,
) -> tokio::task::JoinHandle<Result<floodgate::LimiterStatus, StoreError>> {
    relay.arm_on(&[REVIVE_ARG]);
    let lb = lb.clone();
    let status = tokio::spawn(async move { lb.status().await });
    until("B's revival is held", || relay.holds(REVIVE_ARG)).await;
    status
}

async fn the_later_reviver_keeps_the_new_incarnations_waiters(keyed: bool) {
    let server = support::RedisServer::start();
    let relay = HoldingRelay::start(server.port).await;
    // Long enough that the forced interleaving happens inside it (it takes milliseconds).
    let window = Duration::from_secs(8);
    let a = gate(server.url(), window).await;
    let b = gate(relay.url(), window).await;
    let spec = LimiterSpec::concurrency(2)
        .with_max_wait(Duration::from_secs(300))
        .with_default_lease(Duration::from_secs(120));
    let options = || {
        let options = AcquireOptions::new().wait(Duration::from_secs(300));
        if keyed {
            options.key("org")
        } else {
            options
        }
    };
    let (la, lb) = known_to_both(&a, &b, "race", spec, keyed.then_some(2)).await;

    // Before the loss: A holds both permits, B queues a waiter behind them.
    let witness = Arc::new(Witness::default());
    let mut old = Vec::new();
    for _ in 0..2 {
        let permit = la.acquire(options()).await.unwrap();
        witness.took(permit.permits());
        old.push(permit);
    }
    let lost_waiter = spawn_acquire(&lb, options());
    until_status(&la, "B's waiter queues", |s| s.waiting == 1).await;

    let flush = std::process::Command::new("redis-cli")
        .args(["-p", &server.port.to_string(), "flushall"])
        .output()
        .unwrap();
    assert!(flush.status.success());

    // B finds the limiter gone; its revival is held on the way to Redis.
    let b_status = bs_status_with_its_revival_held(&relay, &lb).await;
    // A revives it first and queues on the new incarnation (learning: nothing is granted).
    assert!(la.status().await.unwrap().learning);
    let a_waiter = spawn_acquire(&la, options());
    until_status(&la, "A's waiter queues", |s| s.waiting == 1).await;
    // B queues an acquire behind its held revival: it runs on the new incarnation too.
    let b_waiter = spawn_acquire(&lb, options());
    until("B's acquire is held behind its revival", || {
        relay.holds(b"$7\r\nacquire\r\n") || relay.holds(b"$8\r\nkacquire\r\n")
    })
    .await;
    relay.release();

    // B's revival found the limiter revived already: its status is the new incarnation's.
    let st = outcome("B's status", b_status).await.unwrap();
    assert!(st.learning, "{st:?}");
    // B's commands run in order on its connection: its acquire ran before this status, still
    // inside the window, so it queued there.
    let st = lb.status().await.unwrap();
    assert!(
        st.learning,
        "the window ended too early for the test: {st:?}"
    );
    // The waiter B queued on the lost incarnation is answered at once (nothing would ever wake
    // it), not left until its five-minute deadline.
    // It is told why: its limiter's state was lost (not, as a dropped wake-up channel said,
    // that the subscription was).
    let lost = outcome("B's waiter from before the loss", lost_waiter).await;
    assert!(
        matches!(&lost, Err(AcquireError::Store(StoreError::Unavailable(u)))
            if u.to_string().contains("lost the limiter's state")),
        "{lost:?}"
    );

    // The permits from before the loss are re-adopted by their extends, so the new incarnation
    // counts them; then they are given back.
    for permit in &mut old {
        permit.extend(Duration::from_secs(120)).await.unwrap();
    }
    let st = lb.status().await.unwrap();
    assert_eq!((st.in_use, st.waiting), (2, 2), "{st:?}");
    for permit in old {
        witness.give_back(permit).await;
    }

    // When the window ends both waiters of the new incarnation are granted: B's revival did
    // not take B's for a lost one.
    for (who, waiter) in [("A's waiter", a_waiter), ("B's waiter", b_waiter)] {
        let permit = outcome(who, waiter)
            .await
            .unwrap_or_else(|e| panic!("{who} was not granted: {e:?}"));
        witness.took(permit.permits());
        witness.give_back(permit).await;
    }

    // And the two stores keep sharing it within the limit.
    let mut workers = Vec::new();
    for limiter in [&la, &lb, &la, &lb] {
        let (limiter, witness) = (limiter.clone(), Arc::clone(&witness));
        let options = options();
        workers.push(tokio::spawn(async move {
            for _ in 0..10 {
                let permit = limiter.acquire(options.clone()).await.unwrap();
                witness.took(permit.permits());
                tokio::task::yield_now().await;
                witness.give_back(permit).await;
            }
        }));
    }
    for worker in workers {
        outcome("a worker", worker).await;
    }
    let most = witness.most.load(Ordering::SeqCst);
    assert!(most <= 2, "{most} permits out at once, limit 2");
    assert_eq!(
        most, 2,
        "the witness saw the limit reached (the test is not vacuous)"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_later_plain_revival_keeps_the_new_incarnations_waiters() {
    the_later_reviver_keeps_the_new_incarnations_waiters(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_later_keyed_revival_keeps_the_new_incarnations_waiters() {
    the_later_reviver_keeps_the_new_incarnations_waiters(true).await;
}

/// An acquire that finds the limiter gone revives it and waits on the new incarnation: its own
/// revival does not take it for a waiter of the lost one (it used to, and the acquire failed
/// "store unavailable" although it stood queued).
async fn an_acquire_that_revives_waits_on_the_new_incarnation(keyed: bool) {
    let server = support::RedisServer::start();
    let store = gate(server.url(), Duration::from_millis(500)).await;
    let spec = LimiterSpec::concurrency(1).with_max_wait(Duration::from_secs(60));
    let mut options = AcquireOptions::new().wait(Duration::from_secs(60));
    if keyed {
        store
            .define_keyed("gone", spec, KeyedSpec::per_key(1))
            .await
            .unwrap();
        options = options.key("org");
    } else {
        store.define("gone", spec).await.unwrap();
    }
    let limiter = store.limiter("gone").await.unwrap();
    let flush = std::process::Command::new("redis-cli")
        .args(["-p", &server.port.to_string(), "flushall"])
        .output()
        .unwrap();
    assert!(flush.status.success());
    // It waits out the learning window (nothing is granted during it), then is granted.
    let waiter = spawn_acquire(&limiter, options);
    let permit = outcome("the reviving acquire", waiter)
        .await
        .unwrap_or_else(|e| panic!("the reviving acquire failed: {e:?}"));
    let st = limiter.status().await.unwrap();
    assert_eq!((st.in_use, st.counters.granted), (1, 1), "{st:?}");
    assert!(!st.learning, "{st:?}");
    assert!(permit.release().await.unwrap());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plain_acquire_that_revives_waits_on_the_new_incarnation() {
    an_acquire_that_revives_waits_on_the_new_incarnation(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_keyed_acquire_that_revives_waits_on_the_new_incarnation() {
    an_acquire_that_revives_waits_on_the_new_incarnation(true).await;
}

/// The later of two revivers registers the limiter in the listing set too: the first may die
/// between its revival `put` and its `register` (simulated by taking the name out of the set
/// by hand at that point), and the later one's `put` answers `revived`. Before, only the first
/// registered, and `list_limiters` never showed the revived limiter again.
async fn a_limiter_revived_by_another_caller_is_listed(keyed: bool) {
    let server = support::RedisServer::start();
    let relay = HoldingRelay::start(server.port).await;
    let a = gate(server.url(), Duration::from_secs(60)).await;
    let b = gate(relay.url(), Duration::from_secs(60)).await;
    let spec = LimiterSpec::concurrency(2).with_max_wait(Duration::from_secs(60));
    let (la, lb) = known_to_both(&a, &b, "listed", spec, keyed.then_some(1)).await;
    let listed = |statuses: Vec<floodgate::LimiterStatus>| {
        statuses.iter().any(|s| s.name.as_str() == "listed")
    };
    assert!(listed(b.limiters().await.unwrap()));

    let redis_cli = |args: &[&str]| {
        let out = std::process::Command::new("redis-cli")
            .args(["-p", &server.port.to_string()])
            .args(args)
            .output()
            .unwrap();
        assert!(out.status.success(), "{out:?}");
    };
    redis_cli(&["flushall"]);
    // B finds the limiter gone; its revival is held on the way to Redis.
    let b_status = bs_status_with_its_revival_held(&relay, &lb).await;
    // A revives it first, then "dies" before its register: the name leaves the set.
    assert!(la.status().await.unwrap().learning);
    redis_cli(&["srem", "fg:limiters", "listed"]);
    assert!(
        !listed(a.limiters().await.unwrap()),
        "the winner's registration was undone (the test is not vacuous)"
    );

    // B's revival answers `revived`: B registers it all the same.
    relay.release();
    let st = outcome("B's status", b_status).await.unwrap();
    assert!(st.learning, "{st:?}");
    assert!(
        listed(a.limiters().await.unwrap()),
        "the limiter revived by another caller is not listed"
    );
    assert!(listed(b.limiters().await.unwrap()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plain_limiter_revived_by_another_caller_is_listed() {
    a_limiter_revived_by_another_caller_is_listed(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_keyed_limiter_revived_by_another_caller_is_listed() {
    a_limiter_revived_by_another_caller_is_listed(true).await;
}

/// A status read sent before this store's own put and answered after it (Redis ran the read
/// first, so it carries the spec the put replaced) does not replace the put's spec: after a
/// loss the store re-creates the limiter from the spec it put, not the older one. The order is
/// forced: the read is sent (polled once, on the store's one connection, which Redis serves in
/// order), the put is sent after it and awaited, then the read's reply is taken.
async fn a_status_read_answered_after_a_put_keeps_the_puts_spec(keyed: bool) {
    use std::future::Future;
    use std::task::Poll;

    let server = support::RedisServer::start();
    let gate = gate(server.url(), Duration::from_secs(60)).await;
    let define = |concurrency: u32| {
        let gate = &gate;
        async move {
            let spec = LimiterSpec::concurrency(concurrency);
            if keyed {
                gate.define_keyed("stale", spec, KeyedSpec::per_key(1))
                    .await
                    .unwrap()
            } else {
                gate.define("stale", spec).await.unwrap()
            }
        }
    };
    define(3).await;
    let limiter = gate.limiter("stale").await.unwrap();
    // A test process stopped (a busy machine) inside the read's first poll can find Redis's
    // reply already there when it resumes: that read was answered before the put, not the case
    // made here, so the case is set up again (each attempt a round trip; the bound is liveness).
    let mut attempts = 0;
    let read = loop {
        define(3).await;
        let mut read = std::pin::pin!(limiter.status());
        let first = std::future::poll_fn(|cx| Poll::Ready(read.as_mut().poll(cx))).await;
        if first.is_pending() {
            assert_eq!(define(1).await.spec.concurrency, Some(1));
            break read.await.unwrap();
        }
        attempts += 1;
        assert!(attempts < 100, "a status read needs a round trip");
    };
    assert_eq!(
        read.spec.concurrency,
        Some(3),
        "Redis ran the read before the put (the test is not vacuous)"
    );

    // The state is lost: the next call re-creates the limiter from what this store knows.
    let out = std::process::Command::new("redis-cli")
        .args(["-p", &server.port.to_string(), "flushall"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let revived = limiter.status().await.unwrap();
    assert!(revived.learning, "{revived:?}");
    assert_eq!(
        revived.spec.concurrency,
        Some(1),
        "re-created from the spec the read replaced, not the one put"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plain_status_read_answered_after_a_put_keeps_the_puts_spec() {
    a_status_read_answered_after_a_put_keeps_the_puts_spec(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_keyed_status_read_answered_after_a_put_keeps_the_puts_spec() {
    a_status_read_answered_after_a_put_keeps_the_puts_spec(true).await;
}

/// The listing set's key, as RESP sends it: the relisting's script names it.
const LISTING_KEY: &[u8] = b"$11\r\nfg:limiters\r\n";

/// A store's relisting of a limiter (`revive::register`, in the background after its first use
/// by that store) that reaches Redis after another server deleted the limiter must not leave
/// the deleted name in the listing set: it stayed there, counted against `max_limiters` (a new
/// limiter refused), until a listing dropped it. The relisting is held by the relay until the
/// delete (and its `SREM`) is done.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relisting_that_reaches_redis_after_a_delete_leaves_the_name_unlisted() {
    let server = support::RedisServer::start();
    let relay = HoldingRelay::start(server.port).await;
    let mut config = RedisConfig::new(server.url());
    config.max_limiters = Some(1);
    // B: the server that defines and deletes the limiter; A: one that uses it, through the relay.
    let b = Floodgate::with_store(RedisStore::connect(config).await.unwrap());
    let a = gate(relay.url(), Duration::from_secs(1)).await;
    b.define("gone", LimiterSpec::concurrency(1)).await.unwrap();
    let listed = || support::cli(server.port, &["SISMEMBER", "fg:limiters", "gone"]);
    assert_eq!(listed(), "1");

    // A's first use: it relists the limiter in the background, and the relay holds that.
    relay.arm_on(&[LISTING_KEY]);
    a.limiter("gone").await.unwrap().status().await.unwrap();
    until("A's relisting is held", || relay.holds(LISTING_KEY)).await;
    assert!(b.delete("gone").await.unwrap());
    assert_eq!(listed(), "0");

    let sadds = || support::commandstats(server.port).get("sadd").copied();
    let before = sadds();
    relay.release();
    until("A's relisting reaches Redis", || sadds() > before).await;
    until("the deleted name is not listed", || listed() == "0").await;
    // The cap counts the limiters that exist: a new one fits.
    b.define("new", LimiterSpec::concurrency(1)).await.unwrap();
    let names: Vec<String> = b
        .limiters()
        .await
        .unwrap()
        .into_iter()
        .map(|s| s.name.to_string())
        .collect();
    assert_eq!(names, ["new"]);
}

/// The listing's `SREM` (`REMOVE` of the names whose limiter it found gone) as RESP sends it.
const SREM: &[u8] = b"$4\r\nSREM\r\n";

/// A listing drops the names of limiters it finds gone (`list_limiters`); a limiter created
/// under such a name between the listing's read and its removal must stay listed: its put
/// added the name before the removal, and nothing would add it again before this store's next
/// relisting (an hour later), so it was missing from the listing and from `max_limiters`'
/// count. The listing's removal is held by the relay until the limiter exists.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_limiter_created_while_a_listing_drops_its_name_stays_listed() {
    let server = support::RedisServer::start();
    let relay = HoldingRelay::start(server.port).await;
    // A: creates the limiter, directly; B: lists, through the relay.
    let a = gate(server.url(), Duration::from_secs(1)).await;
    let b = gate(relay.url(), Duration::from_secs(1)).await;
    // A name whose limiter is gone (as one expired for idleness leaves it).
    let listed = || support::cli(server.port, &["SISMEMBER", "fg:limiters", "late"]);
    support::cli(server.port, &["SADD", "fg:limiters", "late"]);

    relay.arm_on(&[SREM]);
    let listing = tokio::spawn(async move { b.limiters().await.map(|l| l.len()) });
    until("B's removal is held", || relay.holds(SREM)).await;
    a.define("late", LimiterSpec::concurrency(1)).await.unwrap();
    assert_eq!(listed(), "1");
    relay.release();
    assert_eq!(outcome("the listing", listing).await.unwrap(), 0);
    assert_eq!(listed(), "1", "the limiter exists and is listed");
}

/// A status read sent before this store's own delete and answered after it (Redis ran the read
/// first, so it carries the deleted limiter's spec) must not make the deleted limiter known
/// again: after a loss that also took the delete's tombstone, the store re-created the limiter
/// it had deleted from that spec (a status, an acquire, a learning pass after a failover). The
/// order is forced as in the put's case above: the read is sent (polled once), the delete is
/// sent after it and awaited, then the read's reply is taken.
async fn a_status_read_answered_after_a_delete_does_not_revive_it(keyed: bool) {
    use std::future::Future;
    use std::task::Poll;

    let server = support::RedisServer::start();
    let gate = gate(server.url(), Duration::from_secs(60)).await;
    let define = || {
        let gate = &gate;
        async move {
            let spec = LimiterSpec::concurrency(3);
            if keyed {
                gate.define_keyed("deleted", spec, KeyedSpec::per_key(1))
                    .await
                    .unwrap()
            } else {
                gate.define("deleted", spec).await.unwrap()
            }
        }
    };
    let limiter = gate.limiter("deleted").await.unwrap();
    // As above: a read answered before the delete was even sent is not the case made here.
    let mut attempts = 0;
    let read = loop {
        define().await;
        let mut read = std::pin::pin!(limiter.status());
        let first = std::future::poll_fn(|cx| Poll::Ready(read.as_mut().poll(cx))).await;
        if first.is_pending() {
            assert!(gate.delete("deleted").await.unwrap());
            // Redis ran the read before the delete (else it found the limiter gone: the case
            // is set up again).
            if let Ok(read) = read.await {
                break read;
            }
        }
        attempts += 1;
        assert!(attempts < 100, "a status read needs a round trip");
    };
    assert_eq!(read.spec.concurrency, Some(3));

    // The state is lost, the delete's tombstone with it: a store that still knows the limiter
    // re-creates it.
    let out = std::process::Command::new("redis-cli")
        .args(["-p", &server.port.to_string(), "flushall"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let after = limiter.status().await;
    assert!(
        matches!(after, Err(StoreError::UnknownLimiter(_))),
        "the deleted limiter was re-created: {after:?}"
    );
    assert_eq!(
        support::cli(server.port, &["EXISTS", "fg:{deleted}:meta"]),
        "0"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plain_status_read_answered_after_a_delete_does_not_revive_it() {
    a_status_read_answered_after_a_delete_does_not_revive_it(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_keyed_status_read_answered_after_a_delete_does_not_revive_it() {
    a_status_read_answered_after_a_delete_does_not_revive_it(true).await;
}

/// A keyed limiter's keys view sent before this store's own put and answered after it (Redis
/// ran the view first, so it carries the per-key spec the put replaced) must not replace the
/// put's per-key spec: after a loss the store re-created the limiter with the older, higher
/// per-key limit, each key admitted past the one put. The order is forced as above: the view
/// is sent (polled once), the put is sent after it and awaited, then the view's reply is taken.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_keys_view_answered_after_a_put_keeps_the_puts_per_key_spec() {
    use std::future::Future;
    use std::task::Poll;

    let server = support::RedisServer::start();
    let gate = gate(server.url(), Duration::from_secs(60)).await;
    let define = |per_key: u32| {
        let gate = &gate;
        async move {
            gate.define_keyed(
                "perkey",
                LimiterSpec::concurrency(10),
                KeyedSpec::per_key(per_key),
            )
            .await
            .unwrap()
        }
    };
    define(5).await;
    let limiter = gate.limiter("perkey").await.unwrap();
    // The definition read once (as any view does first): the next views do not read it again
    // while its overrides are unchanged.
    limiter.backend().keys(5).await.unwrap().unwrap();
    let mut attempts = 0;
    let view = loop {
        define(5).await;
        let mut view = std::pin::pin!(limiter.backend().keys(5));
        let first = std::future::poll_fn(|cx| Poll::Ready(view.as_mut().poll(cx))).await;
        if first.is_pending() {
            define(1).await;
            break view.await.unwrap().unwrap();
        }
        attempts += 1;
        assert!(attempts < 100, "a keys view needs a round trip");
    };
    assert_eq!(
        view.spec.concurrency,
        Some(5),
        "Redis ran the view before the put (the test is not vacuous)"
    );

    let out = std::process::Command::new("redis-cli")
        .args(["-p", &server.port.to_string(), "flushall"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let revived = limiter.status().await.unwrap();
    assert!(revived.learning, "{revived:?}");
    let view = limiter.backend().keys(5).await.unwrap().unwrap();
    assert_eq!(
        view.spec.concurrency,
        Some(1),
        "re-created with the per-key spec the view replaced, not the one put"
    );
}

/// The keyed definition a keys view reads (`learn_keyed_def`: the first view, or one whose
/// overrides changed) must not replace what this store wrote after that read was sent (`put`:
/// a per-key limit; else a key's override): Redis ran the read first, so it carries what the
/// write replaced, and after a loss the store re-created the limiter with it, each key (or the
/// overridden key) admitted past the limit set. The order is forced by the relay: the
/// definition's read (`kdef`) is held on its way to Redis, the write is sent behind it on the
/// same connection, both are let go, and the write is answered before the view's reply is
/// taken.
async fn a_keyed_definition_read_answered_after_a_write_keeps_the_write(put: bool) {
    use std::future::Future;
    use std::task::{Context, Waker};

    const KDEF: &[u8] = b"$4\r\nkdef\r\n";
    let server = support::RedisServer::start();
    let relay = HoldingRelay::start(server.port).await;
    let gate = gate(relay.url(), Duration::from_secs(60)).await;
    let limiter = gate.limiter("defined").await.unwrap();
    let define = move |per_key: u32| {
        let gate = gate.clone();
        async move {
            gate.define_keyed(
                "defined",
                LimiterSpec::concurrency(10),
                KeyedSpec::per_key(per_key),
            )
            .await
            .unwrap()
        }
    };
    define(5).await;

    // The first view reads the definition; polled (not awaited) until that read is held.
    relay.arm_on(&[KDEF]);
    let mut view = std::pin::pin!(limiter.backend().keys(5));
    let mut cx = Context::from_waker(Waker::noop());
    let deadline = Instant::now() + Duration::from_secs(30);
    while !relay.holds(KDEF) {
        assert!(
            view.as_mut().poll(&mut cx).is_pending(),
            "the view read no definition"
        );
        assert!(Instant::now() < deadline, "the definition's read is held");
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let write = if put {
        tokio::spawn(async move {
            define(1).await;
        })
    } else {
        let limiter = limiter.clone();
        tokio::spawn(async move {
            let over = floodgate::KeyOverride {
                concurrency: Some(1),
                weight: 1,
            };
            limiter.backend().put_key("k", Some(over)).await.unwrap();
        })
    };
    relay.release();
    outcome("the write", write).await;
    let view = view.await.unwrap().unwrap();
    assert_eq!(
        (view.spec.concurrency, view.overrides),
        (Some(5), 0),
        "the view ran before the write"
    );

    let out = std::process::Command::new("redis-cli")
        .args(["-p", &server.port.to_string(), "flushall"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let revived = limiter.status().await.unwrap();
    assert!(revived.learning, "{revived:?}");
    let view = limiter.backend().keys(5).await.unwrap().unwrap();
    let wanted = if put { (Some(1), 0) } else { (Some(5), 1) };
    assert_eq!(
        (view.spec.concurrency, view.overrides),
        wanted,
        "re-created with what the definition's read replaced, not what was written"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_keyed_definition_read_answered_after_a_put_keeps_the_puts_definition() {
    a_keyed_definition_read_answered_after_a_write_keeps_the_write(true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_keyed_definition_read_answered_after_an_override_keeps_the_override() {
    a_keyed_definition_read_answered_after_a_write_keeps_the_write(false).await;
}

/// A status read answered after this store wrote another limiter's spec still teaches the
/// spec it read: the writes that make a read stale are those of its own limiter. Store A knows
/// the limiter at 10; store B lowers it to 2; A's next read of it (the one that would teach A
/// the 2) is in flight while A puts another limiter. Taken for stale, A kept the 10 and, after a
/// loss, re-created the limiter with it: five times the limit set. The order is forced as above
/// (the read polled once, the other put sent after it and awaited).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_status_read_answered_after_another_limiters_put_is_taken() {
    use std::future::Future;
    use std::task::Poll;

    let server = support::RedisServer::start();
    let a = gate(server.url(), Duration::from_secs(60)).await;
    let b = gate(server.url(), Duration::from_secs(60)).await;
    let limiter = a.limiter("lowered").await.unwrap();
    let mut attempts = 0;
    let read = loop {
        // Each attempt from A knowing the 10 (a read answered at once taught it the 2).
        a.define("lowered", LimiterSpec::concurrency(10))
            .await
            .unwrap();
        b.define("lowered", LimiterSpec::concurrency(2))
            .await
            .unwrap();
        let mut read = std::pin::pin!(limiter.status());
        let first = std::future::poll_fn(|cx| Poll::Ready(read.as_mut().poll(cx))).await;
        if first.is_pending() {
            a.define("other", LimiterSpec::concurrency(1))
                .await
                .unwrap();
            break read.await.unwrap();
        }
        attempts += 1;
        assert!(attempts < 100, "a status read needs a round trip");
    };
    assert_eq!(read.spec.concurrency, Some(2));

    let out = std::process::Command::new("redis-cli")
        .args(["-p", &server.port.to_string(), "flushall"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let revived = limiter.status().await.unwrap();
    assert!(revived.learning, "{revived:?}");
    assert_eq!(
        revived.spec.concurrency,
        Some(2),
        "re-created from the spec A had before its read, not the one it read"
    );
}

/// A put of this store whose reply is taken after this store's delete of the same limiter
/// (Redis ran the put first: the delete removed what it made) must not make the deleted
/// limiter known again: after a loss that took the tombstone too, the store re-created it. The
/// order is forced by the relay: the put (`put`, or `kput` for a keyed limiter) is held, the
/// delete is sent behind it on the same connection, both are let go, and the delete is
/// answered before the put's reply is taken.
async fn a_put_answered_after_a_delete_does_not_revive_it(keyed: bool) {
    use std::future::Future;
    use std::task::{Context, Waker};

    let needle: &'static [u8] = if keyed {
        b"$4\r\nkput\r\n"
    } else {
        b"$3\r\nput\r\n"
    };
    let server = support::RedisServer::start();
    let relay = HoldingRelay::start(server.port).await;
    let gate = gate(relay.url(), Duration::from_secs(60)).await;
    let limiter = gate.limiter("removed").await.unwrap();
    let spec = LimiterSpec::concurrency(3);
    // Redis has the scripts already: the held put is not answered `NOSCRIPT` and sent again
    // after the delete.
    gate.define("warm", spec.clone()).await.unwrap();
    gate.define_keyed("warm-keyed", spec.clone(), KeyedSpec::per_key(1))
        .await
        .unwrap();
    assert!(gate.delete("warm").await.unwrap());
    assert!(gate.delete("warm-keyed").await.unwrap());
    let define = |concurrency: u32| {
        let gate = gate.clone();
        async move {
            let spec = LimiterSpec::concurrency(concurrency);
            if keyed {
                gate.define_keyed("removed", spec, KeyedSpec::per_key(1))
                    .await
            } else {
                gate.define("removed", spec).await
            }
        }
    };
    // The store knows the limiter (it defined it), and the held put changes it: so the
    // delete's reply starts no background read of it, which would find it gone and forget it
    // again, by chance of timing, after the put's reply.
    define(3).await.unwrap();
    relay.arm_on(&[needle]);
    let mut put = std::pin::pin!(define(4));
    let mut cx = Context::from_waker(Waker::noop());
    let deadline = Instant::now() + Duration::from_secs(30);
    while !relay.holds(needle) {
        assert!(
            put.as_mut().poll(&mut cx).is_pending(),
            "the put was not held"
        );
        assert!(Instant::now() < deadline, "the put is held");
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let delete = {
        let gate = gate.clone();
        tokio::spawn(async move { gate.delete("removed").await })
    };
    relay.release();
    assert!(
        outcome("the delete", delete).await.unwrap(),
        "the delete found the limiter the put made (the test is not vacuous)"
    );
    put.await.unwrap();

    let out = std::process::Command::new("redis-cli")
        .args(["-p", &server.port.to_string(), "flushall"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let after = limiter.status().await;
    assert!(
        matches!(after, Err(StoreError::UnknownLimiter(_))),
        "the deleted limiter was re-created: {after:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plain_put_answered_after_a_delete_does_not_revive_it() {
    a_put_answered_after_a_delete_does_not_revive_it(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_keyed_put_answered_after_a_delete_does_not_revive_it() {
    a_put_answered_after_a_delete_does_not_revive_it(true).await;
}

/// `max_limiters` holds while a create is in flight when another server, refused at the cap,
/// drops the names of limiters that are gone: the in-flight create's name (registered, its
/// limiter not yet put) looked gone too and was dropped, the place went to another create, and
/// the in-flight put then listed its name past the cap. Store A's put is held by the relay
/// between its registration and the limiter's creation; store B, at the cap (one name of a
/// limiter gone, A's), creates two limiters.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_create_in_flight_keeps_its_place_under_max_limiters() {
    use std::future::Future;
    use std::task::{Context, Waker};

    const PUT: &[u8] = b"$3\r\nput\r\n";
    let server = support::RedisServer::start();
    let relay = HoldingRelay::start(server.port).await;
    let connect = |url: String| async move {
        let mut config = RedisConfig::new(url);
        config.max_limiters = Some(2);
        config.response_timeout = Duration::from_secs(60);
        Floodgate::with_store(RedisStore::connect(config).await.unwrap())
    };
    let a = connect(relay.url()).await;
    let b = connect(server.url()).await;
    // Redis has the script already: A's held put is not answered `NOSCRIPT` and sent again.
    a.define("warm", LimiterSpec::concurrency(1)).await.unwrap();
    assert!(a.delete("warm").await.unwrap());
    // A name whose limiter is gone (as one expired for idleness leaves it).
    support::cli(server.port, &["SADD", "fg:limiters", "ghost"]);

    relay.arm_on(&[PUT]);
    let mut create = std::pin::pin!(a.define("in-flight", LimiterSpec::concurrency(1)));
    let mut cx = Context::from_waker(Waker::noop());
    let deadline = Instant::now() + Duration::from_secs(30);
    while !relay.holds(PUT) {
        assert!(
            create.as_mut().poll(&mut cx).is_pending(),
            "the put was held"
        );
        assert!(Instant::now() < deadline, "A's put is held");
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    // The set is full: `ghost` and A's name.
    assert_eq!(support::cli(server.port, &["SCARD", "fg:limiters"]), "2");
    b.define("first", LimiterSpec::concurrency(1))
        .await
        .unwrap();
    let second = b.define("second", LimiterSpec::concurrency(1)).await;
    relay.release();
    create.await.unwrap();

    let names: Vec<String> = b
        .limiters()
        .await
        .unwrap()
        .into_iter()
        .map(|s| s.name.to_string())
        .collect();
    assert!(
        matches!(second, Err(StoreError::TooManyLimiters(2))),
        "a third limiter was created under a cap of 2: {second:?}, {names:?}"
    );
    assert_eq!(names, ["first", "in-flight"]);
    // No create mark is left behind, by the refused create or by those that succeeded.
    assert_eq!(
        support::cli(server.port, &["KEYS", "fg:*:creating"]),
        "",
        "create marks left"
    );
}

/// The put's spec is kept when the delete answered meanwhile was of another limiter: store A
/// knows `lowered` only from reading it (store B defined it at 10), puts it at 2, and deletes
/// another limiter while the put is in flight (the relay holds the put, the delete queues
/// behind it). Taken for a delete of `lowered`, the put's spec was dropped and A kept the 10:
/// after a loss it re-created the limiter at five times the limit put.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_put_answered_after_another_limiters_delete_is_kept() {
    use std::future::Future;
    use std::task::{Context, Waker};

    const PUT: &[u8] = b"$3\r\nput\r\n";
    let server = support::RedisServer::start();
    let relay = HoldingRelay::start(server.port).await;
    let a = gate(relay.url(), Duration::from_secs(60)).await;
    let b = gate(server.url(), Duration::from_secs(60)).await;
    b.define("lowered", LimiterSpec::concurrency(10))
        .await
        .unwrap();
    a.define("other", LimiterSpec::concurrency(1))
        .await
        .unwrap();
    let limiter = a.limiter("lowered").await.unwrap();
    assert_eq!(limiter.status().await.unwrap().spec.concurrency, Some(10));

    relay.arm_on(&[PUT]);
    let mut put = std::pin::pin!(a.define("lowered", LimiterSpec::concurrency(2)));
    let mut cx = Context::from_waker(Waker::noop());
    let deadline = Instant::now() + Duration::from_secs(30);
    while !relay.holds(PUT) {
        assert!(put.as_mut().poll(&mut cx).is_pending(), "the put was held");
        assert!(Instant::now() < deadline, "the put is held");
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let delete = {
        let a = a.clone();
        tokio::spawn(async move { a.delete("other").await })
    };
    relay.release();
    assert!(outcome("the delete", delete).await.unwrap());
    assert_eq!(put.await.unwrap().spec.concurrency, Some(2));

    let out = std::process::Command::new("redis-cli")
        .args(["-p", &server.port.to_string(), "flushall"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let revived = limiter.status().await.unwrap();
    assert!(revived.learning, "{revived:?}");
    assert_eq!(
        revived.spec.concurrency,
        Some(2),
        "re-created from the spec read before the put, not the one put"
    );
}

/// Two writes of one limiter by one store whose replies are taken in the other order than
/// Redis ran them: a revival (from the spec the store knew, 10) and a put lowering it to 2.
/// Redis ran the revival first, so the limiter is at 2; the store must know the 2, or the next
/// loss re-creates it at 10. The order is forced: the revival is held by the relay (the put's
/// commands queue behind it), both are let go, the put is answered and taken first, then the
/// revival's reply.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revival_answered_after_a_later_put_keeps_the_puts_spec() {
    use std::future::Future;
    use std::task::{Context, Waker};

    let server = support::RedisServer::start();
    let relay = HoldingRelay::start(server.port).await;
    let gate = gate(relay.url(), Duration::from_secs(60)).await;
    gate.define("crossed", LimiterSpec::concurrency(10))
        .await
        .unwrap();
    let limiter = gate.limiter("crossed").await.unwrap();
    let flushall = || {
        let out = std::process::Command::new("redis-cli")
            .args(["-p", &server.port.to_string(), "flushall"])
            .output()
            .unwrap();
        assert!(out.status.success(), "{out:?}");
    };
    flushall();

    relay.arm_on(&[REVIVE_ARG]);
    let mut status = std::pin::pin!(limiter.status());
    let mut cx = Context::from_waker(Waker::noop());
    let deadline = Instant::now() + Duration::from_secs(30);
    while !relay.holds(REVIVE_ARG) {
        assert!(status.as_mut().poll(&mut cx).is_pending(), "no revival");
        assert!(Instant::now() < deadline, "the revival is held");
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let put = {
        let gate = gate.clone();
        tokio::spawn(async move { gate.define("crossed", LimiterSpec::concurrency(2)).await })
    };
    relay.release();
    assert_eq!(
        outcome("the put", put).await.unwrap().spec.concurrency,
        Some(2)
    );
    assert_eq!(
        status.await.unwrap().spec.concurrency,
        Some(2),
        "Redis has the 2"
    );

    flushall();
    let revived = limiter.status().await.unwrap();
    assert!(revived.learning, "{revived:?}");
    assert_eq!(
        revived.spec.concurrency,
        Some(2),
        "re-created from the revival's spec, which the put had replaced"
    );
}

/// Two puts of one limiter through one store, answered in the other order than Redis ran them
/// (the relay holds the first, 10, the second, 2, queues behind it and is answered and taken
/// first): the store must end up knowing the spec Redis has, the 2, or the next loss
/// re-creates the limiter at five times the limit put last. Keyed too (the per-key limit).
async fn two_puts_answered_crossed_leave_the_spec_redis_has(keyed: bool) {
    use std::future::Future;
    use std::task::{Context, Waker};

    let needle: &'static [u8] = if keyed {
        b"$4\r\nkput\r\n"
    } else {
        b"$3\r\nput\r\n"
    };
    let server = support::RedisServer::start();
    let relay = HoldingRelay::start(server.port).await;
    let gate = gate(relay.url(), Duration::from_secs(60)).await;
    let limiter = gate.limiter("twice").await.unwrap();
    let define = |limit: u32| {
        let gate = gate.clone();
        async move {
            if keyed {
                gate.define_keyed(
                    "twice",
                    LimiterSpec::concurrency(20),
                    KeyedSpec::per_key(limit),
                )
                .await
            } else {
                gate.define("twice", LimiterSpec::concurrency(limit)).await
            }
        }
    };
    let in_force = |status: &floodgate::LimiterStatus, view: Option<floodgate::KeysView>| {
        if keyed {
            view.unwrap().spec.concurrency
        } else {
            status.spec.concurrency
        }
    };
    define(5).await.unwrap();
    relay.arm_on(&[needle]);
    let mut first = std::pin::pin!(define(10));
    let mut cx = Context::from_waker(Waker::noop());
    let deadline = Instant::now() + Duration::from_secs(30);
    while !relay.holds(needle) {
        assert!(
            first.as_mut().poll(&mut cx).is_pending(),
            "the put was held"
        );
        assert!(Instant::now() < deadline, "the first put is held");
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let second = tokio::spawn(define(2));
    relay.release();
    outcome("the second put", second).await.unwrap();
    first.await.unwrap();

    let out = std::process::Command::new("redis-cli")
        .args(["-p", &server.port.to_string(), "flushall"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let revived = limiter.status().await.unwrap();
    assert!(revived.learning, "{revived:?}");
    let view = limiter.backend().keys(5).await.unwrap();
    assert_eq!(
        in_force(&revived, view),
        Some(2),
        "re-created from the put Redis ran first, answered last"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_plain_puts_answered_crossed_leave_the_spec_redis_has() {
    two_puts_answered_crossed_leave_the_spec_redis_has(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_keyed_puts_answered_crossed_leave_the_spec_redis_has() {
    two_puts_answered_crossed_leave_the_spec_redis_has(true).await;
}
