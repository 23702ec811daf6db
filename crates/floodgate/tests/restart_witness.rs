//! Restarts of the durable embedded store against an independent witness: the tokens the
//! test itself saw granted (and not released), which the store cannot see. After a crash and
//! a reopen, every witnessed holder must still be counted, and no token may be handed out
//! twice.
//!
//! A process crash is taken as a copy of the data directory's files while the store runs:
//! what `write(2)` put in the page cache is exactly what a SIGKILL at that instant leaves
//! behind (the in-memory buffer of records not yet written is lost, as in a kill). The copy is
//! taken where the test wants it, with no timing involved; `floodgate-cli/tests/crash.rs`
//! kills real server processes.

use std::path::Path;
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use floodgate::{
    AcquireError, AcquireOptions, Durability, Floodgate, Grant, KeyOverride, KeyedSpec,
    LimiterBackend, LimiterName, LimiterSpec, MemoryStore, Store,
};

const HOUR: Duration = Duration::from_secs(3600);

/// What a SIGKILL now would leave: the data directory's files as they are (LOCK excluded; a
/// lock is not inherited by a copy).
fn crash_copy(from: &Path, to: &Path) {
    for entry in std::fs::read_dir(from).expect("read dir") {
        let entry = entry.expect("entry");
        let name = entry.file_name();
        if name == "LOCK" || !entry.file_type().expect("type").is_file() {
            continue;
        }
        std::fs::copy(entry.path(), to.join(&name)).expect("copy");
    }
}

fn poll_once<F: std::future::Future + ?Sized>(f: std::pin::Pin<&mut F>) -> Poll<F::Output> {
    f.poll(&mut Context::from_waker(Waker::noop()))
}

/// What applies the passage of time while the limiter's timer task cannot run.
#[derive(Debug, Clone, Copy)]
enum Trigger {
    /// A read of the holders list.
    Holders,
    /// A read of a keyed limiter's keys.
    Keys,
    /// A key override refused as bad input (weight 0) after the time was applied.
    BadOverride,
}

/// A lease ends while a waiter is queued behind it; `trigger` applies the passage of time,
/// which reclaims the lease and grants the freed permit to the waiter. That grant must reach
/// the log before the waiter is answered, or a crash right after forgets a holder that is
/// working (the waiter was answered; recovery drops it as a queued waiter) and hands its
/// token out again.
///
/// Single-threaded runtime, blocked past the lease's end: the limiter's timer task cannot run,
/// so `trigger` is what applies the passage of time.
async fn grant_by(trigger: Trigger) {
    let dir = tempfile::tempdir().expect("tempdir");
    let copy = tempfile::tempdir().expect("tempdir");
    let (store, _) = MemoryStore::open(Durability::new(dir.path())).expect("open");
    let gate = Floodgate::with_store(store.clone());
    let spec = LimiterSpec::concurrency(1)
        .with_default_lease(HOUR)
        .with_max_wait(HOUR);
    let keyed = !matches!(trigger, Trigger::Holders);
    if keyed {
        gate.define_keyed("one", spec, KeyedSpec::per_key(1))
            .await
            .expect("define");
    } else {
        gate.define("one", spec).await.expect("define");
    }
    let one = gate.limiter("one").await.expect("limiter");
    let backend = one.backend().clone();
    type Acquire<'a> =
        std::pin::Pin<Box<dyn std::future::Future<Output = Result<Grant, AcquireError>> + 'a>>;
    let acquire = |options: AcquireOptions| -> Acquire<'_> {
        if keyed {
            Box::pin(backend.acquire_keyed("k", options))
        } else {
            Box::pin(backend.acquire(options))
        }
    };
    let first = acquire(AcquireOptions::new().lease(Duration::from_millis(50)))
        .await
        .expect("first");
    let mut waiter = acquire(AcquireOptions::new());
    assert!(
        poll_once(waiter.as_mut()).is_pending(),
        "queued behind first"
    );
    // Blocks the runtime past the first lease's end: no timer pass in between.
    std::thread::sleep(Duration::from_millis(200));
    match trigger {
        Trigger::Holders => {
            let holders = backend.holders(10).await.expect("holders");
            assert_eq!(holders.holders.len(), 1, "the waiter holds now");
        }
        Trigger::Keys => {
            backend.keys(10).await.expect("keys").expect("keyed");
        }
        Trigger::BadOverride => {
            let bad = KeyOverride {
                concurrency: None,
                weight: 0,
            };
            backend
                .put_key("k", Some(bad))
                .await
                .expect_err("weight 0 is refused");
        }
    }
    let Poll::Ready(granted) = poll_once(waiter.as_mut()) else {
        panic!("the waiter was granted by the {trigger:?}")
    };
    let granted = granted.expect("granted");
    assert!(granted.token > first.token);
    // The witness: the waiter was answered and holds `granted.token` for an hour.
    crash_copy(dir.path(), copy.path());

    let (after, _) = MemoryStore::open(Durability::new(copy.path())).expect("reopen");
    let name = LimiterName::new("one").expect("name");
    let one = after.limiter(&name).await.expect("limiter");
    let status = one.status().await.expect("status");
    assert_eq!(
        status.in_use, 1,
        "{trigger:?}: the answered waiter's permit is counted after the crash: {status:?}"
    );
    let view = one.holders(10).await.expect("holders");
    assert!(
        view.holders.iter().any(|h| h.token == granted.token),
        "{trigger:?}: the answered holder {:?} is restored: {view:?}",
        granted.token
    );
    // A new acquire must not get the slot (limit 1, held), let alone the witnessed token.
    if let Ok(g) = try_again(&one, keyed).await {
        panic!(
            "{trigger:?}: over-admitted after the crash: token {:?} (witness holds {:?})",
            g.token, granted.token
        );
    }
    after.close();
    store.close();
}

#[tokio::test(flavor = "current_thread")]
async fn a_grant_made_by_a_holders_read_survives_a_crash() {
    grant_by(Trigger::Holders).await;
}

#[tokio::test(flavor = "current_thread")]
async fn a_grant_made_by_a_keys_read_survives_a_crash() {
    grant_by(Trigger::Keys).await;
}

#[tokio::test(flavor = "current_thread")]
async fn a_grant_made_by_a_refused_key_override_survives_a_crash() {
    grant_by(Trigger::BadOverride).await;
}

/// An acquire that does not wait, on the reopened limiter.
async fn try_again<B: LimiterBackend>(one: &B, keyed: bool) -> Result<Grant, AcquireError> {
    let options = AcquireOptions::new().wait(Duration::ZERO);
    if keyed {
        one.acquire_keyed("k", options).await
    } else {
        one.acquire(options).await
    }
}

/// A keyed limiter's per-key limit is raised while several keys have a waiter blocked by it:
/// the change grants them all at once, one token each, in an order the log does not record.
/// Replay must hand each token to the same key's waiter as the original run did (it replays
/// through maps built afresh), or after the restart a key's holders are counted under another
/// key (that key's limit then over-admits) and releases free the wrong key.
#[tokio::test(flavor = "current_thread")]
async fn a_reconfigure_grants_the_same_tokens_to_the_same_keys_after_a_reopen() {
    const KEYS: usize = 12;
    let dir = tempfile::tempdir().expect("tempdir");
    let copy = tempfile::tempdir().expect("tempdir");
    let (store, _) = MemoryStore::open(Durability::new(dir.path())).expect("open");
    let gate = Floodgate::with_store(store.clone());
    let spec = LimiterSpec::concurrency(100)
        .with_default_lease(HOUR)
        .with_max_wait(HOUR);
    gate.define_keyed("k", spec.clone(), KeyedSpec::per_key(1))
        .await
        .expect("define");
    let k = gate.limiter("k").await.expect("limiter");
    let backend = k.backend().clone();
    // The witness: which key each granted token was answered to.
    let mut owner = std::collections::BTreeMap::new();
    let keys: Vec<String> = (0..KEYS).map(|i| format!("key{i}")).collect();
    let mut waiters = Vec::new();
    for key in &keys {
        let g = backend
            .acquire_keyed(key, AcquireOptions::new().holder(key.clone()))
            .await
            .expect("first of its key");
        owner.insert(g.token, key.clone());
        let mut w = Box::pin(backend.acquire_keyed(key, AcquireOptions::new().holder(key.clone())));
        assert!(
            poll_once(w.as_mut()).is_pending(),
            "{key} waits for its key"
        );
        waiters.push((key, w));
    }
    gate.define_keyed("k", spec, KeyedSpec::per_key(2))
        .await
        .expect("raise the per-key limit");
    for (key, w) in &mut waiters {
        let Poll::Ready(granted) = poll_once(w.as_mut()) else {
            panic!("{key} was granted by the raise")
        };
        owner.insert(granted.expect("granted").token, key.clone());
    }
    crash_copy(dir.path(), copy.path());

    let (after, _) = MemoryStore::open(Durability::new(copy.path())).expect("reopen");
    let k = after
        .limiter(&LimiterName::new("k").expect("name"))
        .await
        .expect("limiter");
    let view = k.holders(100).await.expect("holders");
    assert_eq!(view.holders.len(), 2 * KEYS);
    for h in &view.holders {
        assert_eq!(
            h.label.as_deref(),
            owner.get(&h.token).map(String::as_str),
            "token {:?} belongs to the key it was answered to",
            h.token
        );
    }
    after.close();
    store.close();
}

/// The configuration lowers a limit at the restart (a server started with a smaller
/// `concurrency` than the holders it restores): the restored holders keep their permits, and
/// nothing is granted until in use is below the new limit. The witness: the tokens held.
#[tokio::test(flavor = "current_thread")]
async fn a_limit_lowered_at_the_restart_grants_nothing_until_the_restored_holders_leave() {
    let dir = tempfile::tempdir().expect("tempdir");
    let name = LimiterName::new("jobs").expect("name");
    let spec = |n| {
        LimiterSpec::concurrency(n)
            .with_default_lease(HOUR)
            .with_max_wait(HOUR)
    };
    let mut held = Vec::new();
    {
        let (store, _) = MemoryStore::open(Durability::new(dir.path())).expect("open");
        store.put_limiter(&name, spec(4)).await.expect("define");
        let jobs = store.limiter(&name).await.expect("limiter");
        for _ in 0..4 {
            held.push(
                jobs.acquire(AcquireOptions::new())
                    .await
                    .expect("grant")
                    .token,
            );
        }
        store.close();
    }
    let (store, report) = MemoryStore::open(Durability::new(dir.path())).expect("reopen");
    assert_eq!(report.holders, 4);
    store.put_limiter(&name, spec(2)).await.expect("lowered");
    let jobs = store.limiter(&name).await.expect("limiter");
    let try_once = || jobs.acquire(AcquireOptions::new().wait(Duration::ZERO));
    for (i, token) in held.iter().enumerate() {
        let status = jobs.status().await.expect("status");
        assert_eq!(status.in_use as usize, held.len() - i, "{status:?}");
        if let Ok(g) = try_once().await {
            panic!("granted {:?} with {} of 2 held", g.token, held.len() - i);
        }
        assert!(jobs.release(*token).await.expect("release"));
        if held.len() - i - 1 < 2 {
            break;
        }
    }
    // Three released: one held of two, so one more fits, with a token above every held one.
    let g = try_once().await.expect("below the lowered limit");
    assert!(held.iter().all(|t| g.token > *t));
    assert!(try_once().await.is_err(), "two held of two");
    store.close();
}
