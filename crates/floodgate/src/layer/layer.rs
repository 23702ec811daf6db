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
    /// Each request acquires with `options` from `limiter`, each call its own acquire: a
    /// [`request_id`](AcquireOptions::request_id) in `options` is ignored (one id shared by
    /// every call would make them share one grant).
    pub fn new(limiter: Limiter<B>, options: AcquireOptions) -> Self {
        FloodgateLayer {
            limiter,
            options: options.without_request_id(),
        }
    }
}

impl<S, B: LimiterBackend> Layer<S> for FloodgateLayer<B> {
    type Service = FloodgateService<S, B>;

    fn layer(&self, inner: S) -> Self::Service {
        FloodgateService::new(inner, self.limiter.clone(), self.options.clone())
    }
}
