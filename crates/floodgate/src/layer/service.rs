use std::task::{Context, Poll};

use tower_service::Service;

use super::future::ResponseFuture;
use super::BoxError;
use crate::limiter::{AcquireOptions, Limiter};
use crate::store::LimiterBackend;

/// Acquires a permit before calling the inner service and holds it until the response future
/// completes (or is dropped).
#[derive(Debug, Clone)]
pub struct FloodgateService<S, B> {
    inner: S,
    limiter: Limiter<B>,
    options: AcquireOptions,
}

impl<S, B: LimiterBackend> FloodgateService<S, B> {
    /// Wraps `inner`. A [`request_id`](AcquireOptions::request_id) in `options` is ignored:
    /// the options serve every call, and one id would make the calls share one grant.
    pub fn new(inner: S, limiter: Limiter<B>, options: AcquireOptions) -> Self {
        FloodgateService {
            inner,
            limiter,
            // Every call is its own acquire: with the id kept, concurrent calls joined one
            // grant and ran together past the limit (tests/layer_review.rs).
            options: options.without_request_id(),
        }
    }

    /// The wrapped service.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }
}

impl<S, B, Req> Service<Req> for FloodgateService<S, B>
where
    S: Service<Req> + Clone + Send + 'static,
    S::Error: Into<BoxError>,
    B: LimiterBackend,
{
    type Response = S::Response;
    type Error = BoxError;
    type Future = ResponseFuture<S, Req, B>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, req: Req) -> Self::Future {
        // The readied service is the one to call: keep it, leave a clone in its place (the
        // usual tower idiom for services called from inside a future).
        let clone = self.inner.clone();
        let ready = std::mem::replace(&mut self.inner, clone);
        let limiter = self.limiter.clone();
        let options = self.options.clone();
        let acquire = Box::pin(async move { limiter.acquire(options).await });
        ResponseFuture::new(acquire, ready, req)
    }
}
