use tower_layer::Layer;

use super::service::FloodgateService;
use crate::limiter::{AcquireOptions, Limiter};
use crate::store::LimiterBackend;

/// Wraps services in [`FloodgateService`]. Holds configuration only: which limiter, and the
/// options of each acquire.
#[derive(Debug, Clone)]
pub struct FloodgateLayer<B> {
    limiter: Limiter<B>,
    options: AcquireOptions,
}

impl<B: LimiterBackend> FloodgateLayer<B> {
    /// Each request acquires with `options` from `limiter`.
    pub fn new(limiter: Limiter<B>, options: AcquireOptions) -> Self {
        FloodgateLayer { limiter, options }
    }
}

impl<S, B: LimiterBackend> Layer<S> for FloodgateLayer<B> {
    type Service = FloodgateService<S, B>;

    fn layer(&self, inner: S) -> Self::Service {
        FloodgateService::new(inner, self.limiter.clone(), self.options.clone())
    }
}
