use std::future::Future;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use pin_project_lite::pin_project;
use tower_service::Service;

use super::BoxError;
use crate::error::AcquireError;
use crate::limiter::Permit;
use crate::store::LimiterBackend;

type AcquireFuture<B> = Pin<Box<dyn Future<Output = Result<Permit<B>, AcquireError>> + Send>>;

pin_project! {
    /// Acquires the permit, then runs the inner call while holding it. Dropping the future at
    /// any point cancels the wait or releases the permit.
    pub struct ResponseFuture<S: Service<Req>, Req, B: LimiterBackend> {
        #[pin]
        state: State<S, Req, B>,
    }
}

pin_project! {
    #[project = StateProj]
    enum State<S: Service<Req>, Req, B: LimiterBackend> {
        Acquiring {
            acquire: AcquireFuture<B>,
            service: Option<S>,
            request: Option<Req>,
        },
        Calling {
            #[pin]
            call: S::Future,
            // Held for the duration of the call; released on completion or drop.
            permit: Option<Permit<B>>,
        },
    }
}

impl<S: Service<Req>, Req, B: LimiterBackend> ResponseFuture<S, Req, B> {
    pub(super) fn new(acquire: AcquireFuture<B>, service: S, request: Req) -> Self {
        ResponseFuture {
            state: State::Acquiring {
                acquire,
                service: Some(service),
                request: Some(request),
            },
        }
    }
}

impl<S, Req, B> Future for ResponseFuture<S, Req, B>
where
    S: Service<Req>,
    S::Error: Into<BoxError>,
    B: LimiterBackend,
{
    type Output = Result<S::Response, BoxError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut this = self.project();
        loop {
            match this.state.as_mut().project() {
                StateProj::Acquiring {
                    acquire,
                    service,
                    request,
                } => {
                    let permit = ready!(acquire.as_mut().poll(cx))?;
                    let (Some(mut service), Some(request)) = (service.take(), request.take())
                    else {
                        return Poll::Ready(Err("ResponseFuture polled after completion".into()));
                    };
                    let call = service.call(request);
                    this.state.set(State::Calling {
                        call,
                        permit: Some(permit),
                    });
                }
                StateProj::Calling { call, permit } => {
                    let out = ready!(call.poll(cx));
                    // Release as soon as the call is done, not when the future is dropped.
                    if let Some(permit) = permit.take() {
                        warn_if_past_lease(&permit);
                    }
                    return Poll::Ready(out.map_err(Into::into));
                }
            }
        }
    }
}

/// Says so when a call ended after its permit's lease could have ended: the limiter may have
/// reclaimed the permit and granted it again while the call still ran (the layer does not
/// extend), so the limit did not cover the call's end. Otherwise nobody learned of it but the
/// limiter's `expired` counter.
fn warn_if_past_lease<B: LimiterBackend>(permit: &Permit<B>) {
    // A rate-only grant has no lease to outlive.
    if permit.grant().lease.is_zero() {
        return;
    }
    if tokio::time::Instant::now() > permit.local_deadline() {
        tracing::warn!(
            limiter = %permit.id().limiter,
            fencing_token = %permit.fencing_token(),
            lease_ms = permit.grant().lease.as_millis() as u64,
            "a call through the Floodgate layer ran past its permit's lease: the permit may \
             have been reclaimed and granted again while it ran; give the layer a longer lease"
        );
    }
}
