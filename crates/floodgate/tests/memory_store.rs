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
