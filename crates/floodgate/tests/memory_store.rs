//! The behavioural suite against the embedded store, under tokio's paused time.

mod suite;

use floodgate::{Floodgate, MemoryStore};

store_suite!(true, async {
    (Floodgate::with_store(MemoryStore::new()), ())
});

#[tokio::test(start_paused = true)]
async fn the_store_caps_its_number_of_limiters() {
    let gate = Floodgate::with_store(MemoryStore::new().with_max_limiters(2));
    let spec = floodgate::LimiterSpec::concurrency(1);
    gate.define("a", spec.clone()).await.expect("first");
    gate.define("b", spec.clone()).await.expect("second");
    assert!(matches!(
        gate.define("c", spec.clone()).await,
        Err(floodgate::StoreError::TooManyLimiters(2))
    ));
    // Changing an existing one is not creating one.
    gate.define("a", floodgate::LimiterSpec::concurrency(5))
        .await
        .expect("resize");
}

/// The embedded store's permit takes its local deadline from the store's clock (no clock read
/// of its own): the grant's lease end, on tokio's clock, moved by a confirmed extend.
#[tokio::test(start_paused = true)]
async fn a_permit_knows_its_local_deadline_from_the_stores_clock() {
    use std::time::Duration;
    use tokio::time::Instant;
    let gate = Floodgate::with_store(MemoryStore::new());
    gate.define("local", floodgate::LimiterSpec::concurrency(1))
        .await
        .expect("define");
    let lim = gate.limiter("local").await.expect("limiter");
    tokio::time::advance(Duration::from_secs(3)).await;
    let start = Instant::now();
    let lease = Duration::from_secs(30);
    let mut permit = lim
        .acquire(floodgate::AcquireOptions::new().lease(lease))
        .await
        .expect("granted");
    assert_eq!(permit.local_deadline(), start + lease);
    tokio::time::advance(Duration::from_secs(10)).await;
    permit
        .extend(Duration::from_secs(60))
        .await
        .expect("extended");
    assert_eq!(
        permit.local_deadline(),
        start + Duration::from_secs(70),
        "moved by the extend"
    );
}

/// A label the library refuses before the store sees it (the HTTP API refused it, a library
/// caller could store one of any size: kept with the grant, in the durable log, where a record
/// over the log's frame bound would stop the store from starting again).
#[tokio::test]
async fn an_acquire_with_an_unfit_label_is_refused_naming_holder() {
    use floodgate::{AcquireError, AcquireOptions, Floodgate, LimiterSpec, Refusal};
    let gate = Floodgate::in_memory();
    gate.define("labels", LimiterSpec::concurrency(4))
        .await
        .expect("define");
    let limiter = gate.limiter("labels").await.expect("limiter");
    let longest = "é".repeat(floodgate::spec::MAX_HOLDER_CHARS);
    for bad in [format!("{longest}x"), "worker\u{1b}[2J".to_owned()] {
        let refused = limiter
            .acquire(AcquireOptions::new().holder(bad.as_str()))
            .await
            .expect_err("refused");
        let AcquireError::Refused(Refusal::Invalid(field)) = &refused else {
            panic!("{refused:?}");
        };
        assert_eq!(field.field, "holder", "{refused:?}");
    }
    let held = limiter
        .acquire(AcquireOptions::new().holder(longest.as_str()))
        .await
        .expect("the longest label fits");
    assert_eq!(limiter.status().await.expect("status").in_use, 1);
    drop(held);
}

/// `Floodgate::limiter`'s promise for the embedded store: a handle taken before a delete
/// answers `UnknownLimiter`, also once the name is a limiter again; it never grants from the
/// new one.
#[tokio::test(start_paused = true)]
async fn a_handle_taken_before_a_delete_stays_unknown_after_a_re_create() {
    use floodgate::{AcquireError, AcquireOptions, LimiterSpec, StoreError};
    let gate = Floodgate::with_store(MemoryStore::new());
    gate.define("batch", LimiterSpec::concurrency(1))
        .await
        .expect("define");
    let old = gate.limiter("batch").await.expect("handle");
    assert!(gate.delete("batch").await.expect("delete"));
    gate.define("batch", LimiterSpec::concurrency(1))
        .await
        .expect("re-create");
    let try_once = || AcquireOptions::new().wait(std::time::Duration::ZERO);
    match old.acquire(try_once()).await {
        Err(AcquireError::Store(StoreError::UnknownLimiter(_))) => {}
        other => panic!("the old handle after a re-create: {other:?}"),
    }
    let new = gate.limiter("batch").await.expect("new handle");
    assert!(
        new.acquire(try_once()).await.is_ok(),
        "the new limiter is free"
    );
}
