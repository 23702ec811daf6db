//! A tower middleware that holds a Floodgate permit around each request.
//!
//! Put [`FloodgateLayer`] in front of any tower service (a job handler of a tower-based worker
//! such as apalis, an HTTP client calling a rate-limited backend) and every call, in every
//! process using the same store, shares one global concurrency limit. The permit is acquired
//! inside the response future and released when that future completes or is dropped (on
//! Redis the release is sent in the background then, so a status read just after the call
//! may still count the permit for a round trip): a streaming response body, read after the
//! future completed, is read without the permit (as with tower's own `ConcurrencyLimit`). An acquire that ends without a permit fails the call
//! with the boxed [`AcquireError`]
//! (`is_wait_timeout()`, `retry_after()`), so the caller can re-enqueue the work.
//!
//! Readiness is the inner service's: the layer's `poll_ready` never says the limit is full
//! (the permit is acquired inside the response future, where a global limit can be waited
//! on fairly), so tower's `LoadShed` in front of it sheds nothing. To shed instead of queue,
//! give the layer `AcquireOptions::new().wait(Duration::ZERO)`: a call that finds the limit
//! full then fails at once with a wait timeout and its retry hint.
//!
//! The layer does not extend leases: give it a lease longer than the longest call (a call that
//! outlives its lease loses the permit while still running; it is logged as a `tracing`
//! warning when the call ends, and counted in the limiter's `expired`).
//!
//! [`AcquireError`]: crate::AcquireError

mod future;
mod keyed;
#[allow(clippy::module_inception)]
mod layer;
mod service;

pub use self::future::ResponseFuture;
pub use self::keyed::{KeyedFloodgateLayer, KeyedFloodgateService};
pub use self::layer::FloodgateLayer;
pub use self::service::FloodgateService;

/// The error type of the wrapped service: the inner service's error or an
/// [`AcquireError`](crate::AcquireError), boxed, as is usual for tower middleware.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
