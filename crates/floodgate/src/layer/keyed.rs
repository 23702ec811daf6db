//! The tower middleware for a keyed limiter: a key extracted from each request.

use std::sync::Arc;
use std::task::{Context, Poll};

use tower_layer::Layer;
use tower_service::Service;

use super::future::ResponseFuture;
use super::BoxError;
use crate::limiter::{AcquireOptions, Limiter};
use crate::store::LimiterBackend;

/// Like [`FloodgateLayer`](super::FloodgateLayer), for a keyed limiter (see
/// [`crate::core::keyed`]): each request's key (its tenant, say) comes from `key`, a function
/// of the request, so one tenant's burst waits in its own queue and tenants share the total
/// fairly.
///
/// ```
/// use std::convert::Infallible;
/// use floodgate::layer::KeyedFloodgateLayer;
/// use floodgate::{AcquireOptions, Floodgate, KeyedSpec, LimiterSpec};
/// use tower::{service_fn, ServiceBuilder, ServiceExt};
///
/// struct Job {
///     org_id: u64,
/// }
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
/// let gate = Floodgate::in_memory();
/// gate.define_keyed("orgs", LimiterSpec::concurrency(50), KeyedSpec::per_key(5))
///     .await?;
/// let orgs = gate.limiter("orgs").await?;
/// let run = service_fn(|job: Job| async move { Ok::<_, Infallible>(job.org_id) });
/// let service = ServiceBuilder::new()
///     .layer(KeyedFloodgateLayer::new(orgs, AcquireOptions::new(), |job: &Job| {
///         job.org_id.to_string()
///     }))
///     .service(run);
/// // Runs while holding one of org 42's 5 permits (and one of the total's 50).
/// assert_eq!(service.oneshot(Job { org_id: 42 }).await?, 42);
/// # Ok(())
/// # }
/// ```
// Clone and Debug by hand: derived ones would ask `F: Clone` / `F: Debug`, which a key closure
// capturing a non-`Clone` value (or any closure, for Debug) is not, though `F` sits in an `Arc`.
pub struct KeyedFloodgateLayer<B, F> {
    /// The keyed limiter.
    limiter: Limiter<B>,
    /// The options of every acquire (their key is replaced by the request's).
    options: AcquireOptions,
    /// Extracts the key from a request; shared by the services it makes.
    key: Arc<F>,
}

impl<B: LimiterBackend, F> KeyedFloodgateLayer<B, F> {
    /// Acquires a permit of `limiter` for `key(&request)` around each call, each call its own
    /// acquire: a [`request_id`](AcquireOptions::request_id) in `options` is ignored (one id
    /// shared by every call would make them share one grant).
    pub fn new(limiter: Limiter<B>, options: AcquireOptions, key: F) -> Self {
        KeyedFloodgateLayer {
            limiter,
            // As FloodgateLayer's: with the id kept, a key's concurrent calls joined one grant.
            options: options.without_request_id(),
            key: Arc::new(key),
        }
    }
}

impl<S, B: LimiterBackend, F> Layer<S> for KeyedFloodgateLayer<B, F> {
    type Service = KeyedFloodgateService<S, B, F>;

    fn layer(&self, inner: S) -> Self::Service {
        KeyedFloodgateService {
            inner,
            limiter: self.limiter.clone(),
            options: self.options.clone(),
            key: Arc::clone(&self.key),
        }
    }
}

/// Acquires a permit for the request's key before calling the inner service, and holds it
/// until the response future completes (or is dropped).
pub struct KeyedFloodgateService<S, B, F> {
    /// The wrapped service.
    inner: S,
    /// The keyed limiter.
    limiter: Limiter<B>,
    /// The options of every acquire.
    options: AcquireOptions,
    /// Extracts the key from a request.
    key: Arc<F>,
}

impl<B: Clone, F> Clone for KeyedFloodgateLayer<B, F> {
    fn clone(&self) -> Self {
        KeyedFloodgateLayer {
            limiter: self.limiter.clone(),
            options: self.options.clone(),
            key: Arc::clone(&self.key),
        }
    }
}

impl<B: std::fmt::Debug, F> std::fmt::Debug for KeyedFloodgateLayer<B, F> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeyedFloodgateLayer")
            .field("limiter", &self.limiter)
            .field("options", &self.options)
            .finish_non_exhaustive()
    }
}

impl<S: Clone, B: Clone, F> Clone for KeyedFloodgateService<S, B, F> {
    fn clone(&self) -> Self {
        KeyedFloodgateService {
            inner: self.inner.clone(),
            limiter: self.limiter.clone(),
            options: self.options.clone(),
            key: Arc::clone(&self.key),
        }
    }
}

impl<S: std::fmt::Debug, B: std::fmt::Debug, F> std::fmt::Debug for KeyedFloodgateService<S, B, F> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeyedFloodgateService")
            .field("inner", &self.inner)
            .field("limiter", &self.limiter)
            .field("options", &self.options)
            .finish_non_exhaustive()
    }
}

impl<S, B, F, K, Req> Service<Req> for KeyedFloodgateService<S, B, F>
where
    S: Service<Req> + Clone + Send + 'static,
    S::Error: Into<BoxError>,
    B: LimiterBackend,
    F: Fn(&Req) -> K,
    K: Into<Arc<str>>,
{
    type Response = S::Response;
    type Error = BoxError;
    type Future = ResponseFuture<S, Req, B>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, req: Req) -> Self::Future {
        let clone = self.inner.clone();
        let ready = std::mem::replace(&mut self.inner, clone);
        let limiter = self.limiter.clone();
        let options = self.options.clone().key((self.key)(&req));
        let acquire = Box::pin(async move { limiter.acquire(options).await });
        ResponseFuture::new(acquire, ready, req)
    }
}
