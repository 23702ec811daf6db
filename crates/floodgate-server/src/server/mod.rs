//! The HTTP server: a router over a [`Floodgate`] and a [`run`] function taking a listener and a
//! shutdown signal, so tests start the real server on `127.0.0.1:0`.

mod api;
mod auth;
mod conn_io;
pub mod error;
mod extract;
mod guard;
mod head_cap;
mod host_check;
pub(crate) mod keyed;
mod listen;
mod request_id;
pub mod tls;

pub(crate) use host_check::allowed_host_name;
pub use listen::raise_fd_limit;
pub use request_id::REQUEST_ID_HEADER;

pub(crate) use self::auth::bearer_token;
pub(crate) use self::extract::JsonBody;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::DefaultBodyLimit;
use axum::routing::{get, post};
use axum::Router;
use floodgate::{Floodgate, Store};
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::dashboard::Dashboard;
use crate::metrics::Metrics;

/// Default cap on a request body.
pub const DEFAULT_MAX_BODY_BYTES: usize = 64 * 1024;
/// Default time a client has to send a complete request head.
pub const DEFAULT_HEADER_TIMEOUT: Duration = Duration::from_secs(10);
/// Default time a client has to send a request body, from when the handler starts reading it.
pub const DEFAULT_BODY_TIMEOUT: Duration = Duration::from_secs(30);
/// Default time a kept-alive connection may sit idle between requests.
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(60);
/// Default cap on open connections (each costs a descriptor and a few kilobytes).
pub const DEFAULT_MAX_CONNECTIONS: usize = 10_000;
/// Default time shutdown waits for in-flight requests before closing their connections.
pub const DEFAULT_SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

/// The 403 `read_only` message (also what `limiter apply --dry-run` predicts).
pub(crate) const READ_ONLY_MESSAGE: &str =
    "this server does not allow changing limiters over the API (api_writes = false)";

/// How the server behaves (the store and its limiters are configured separately).
#[derive(Debug, Clone)]
pub struct ServerOptions {
    /// Bearer token every `/v1` request must carry; `None` disables authentication.
    pub token: Option<String>,
    /// Whether `/metrics` also needs the token.
    pub metrics_require_token: bool,
    /// Whether limiters may be created, changed and deleted over the API (otherwise only the
    /// config file defines them).
    pub api_writes: bool,
    /// Largest request body accepted; larger gets 413.
    pub max_body_bytes: usize,
    /// When the store cannot be reached (or Redis refuses the acquire for lack of memory: it
    /// cannot record it either), grant acquires without accounting (token 0) instead of
    /// answering 503 `store_unavailable`. Counted as outcome `fail_open` and logged. Not while
    /// Redis answers but may evict keys (docs/redis.md): that stays 503.
    pub fail_open: bool,
    /// A request head (request line and headers) must arrive within this, counted from the
    /// accept or from a later request's first byte; else the connection is closed.
    pub header_timeout: Duration,
    /// A request body must arrive within this once the handler reads it; else 408.
    pub body_timeout: Duration,
    /// A kept-alive connection with no request in flight is closed after this.
    pub idle_timeout: Duration,
    /// Most connections open at once; more are answered 503 `too_many_connections` and closed.
    pub max_connections: usize,
    /// After the shutdown signal, how long in-flight requests get before their connections
    /// are closed regardless (held acquires are answered 503 at once).
    pub shutdown_grace: Duration,
    /// Log one line per request (target `floodgate::access`: method, path, status, duration,
    /// request id), for deployments without a proxy that logs them.
    pub access_log: bool,
    /// Serve HTTPS with these certificates (reloaded when their files change); `None`: HTTP.
    pub tls: Option<tls::TlsAcceptors>,
    /// Serve only requests whose `Host` names an IP address, `localhost` (or a name under it)
    /// or one of these names (lower case, no port), answering others 403 `host_not_allowed`:
    /// the guard against DNS rebinding for a server only local clients reach and no token
    /// protects (`floodgate serve` sets it so). `None`: any host.
    pub allowed_hosts: Option<Vec<String>>,
}

impl Default for ServerOptions {
    fn default() -> Self {
        ServerOptions {
            token: None,
            metrics_require_token: false,
            api_writes: true,
            max_body_bytes: DEFAULT_MAX_BODY_BYTES,
            fail_open: false,
            header_timeout: DEFAULT_HEADER_TIMEOUT,
            body_timeout: DEFAULT_BODY_TIMEOUT,
            idle_timeout: DEFAULT_IDLE_TIMEOUT,
            max_connections: DEFAULT_MAX_CONNECTIONS,
            shutdown_grace: DEFAULT_SHUTDOWN_GRACE,
            access_log: false,
            tls: None,
            allowed_hosts: None,
        }
    }
}

/// What every handler shares.
pub(crate) struct AppState<S: Store> {
    pub(crate) gate: Floodgate<S>,
    pub(crate) options: ServerOptions,
    pub(crate) metrics: Metrics,
    /// Flips to true when shutdown starts; held long polls answer 503 `shutting_down`.
    pub(crate) shutting_down: watch::Receiver<bool>,
    /// The dashboard's history, overview and sessions (`crate::dashboard`).
    pub(crate) dashboard: Arc<Dashboard>,
}

/// Whether the store refused Redis for its memory policy (an `EvictingRedis` in the error's
/// chain): a misconfiguration, not an outage (`serve` exits 2 on it at start, and no acquire
/// fails open on it).
pub(crate) fn evicting_redis(e: &floodgate::StoreError) -> bool {
    let mut source = std::error::Error::source(e);
    while let Some(cause) = source {
        if cause
            .downcast_ref::<floodgate::store::redis::EvictingRedis>()
            .is_some()
        {
            return true;
        }
        source = cause.source();
    }
    false
}

/// The application, for tests that drive it without a socket (`tower::ServiceExt::oneshot`).
/// The returned sender starts the shutdown behaviour of held acquires when set to `true`.
pub fn router<S: Store>(
    gate: Floodgate<S>,
    options: ServerOptions,
) -> (Router, watch::Sender<bool>) {
    let (tx, rx) = watch::channel(false);
    let max_body = options.max_body_bytes;
    let body_timeout = extract::BodyTimeout(options.body_timeout);
    let allowed_hosts: Option<Arc<[String]>> = options.allowed_hosts.as_deref().map(Arc::from);
    let state = Arc::new(AppState {
        gate,
        options,
        metrics: Metrics::new(),
        shutting_down: rx,
        dashboard: Arc::new(Dashboard::new()),
    });
    crate::dashboard::spawn_sampler(Arc::downgrade(&state));
    let v1 = Router::new()
        .route("/limiters", get(api::list_limiters::<S>))
        .route(
            "/limiters/{name}",
            get(api::get_limiter::<S>)
                .put(api::put_limiter::<S>)
                .delete(api::delete_limiter::<S>),
        )
        .route(
            "/limiters/{name}/keys/{key}",
            axum::routing::put(keyed::put_key::<S>).delete(keyed::delete_key::<S>),
        )
        .route("/limiters/{name}/acquire", post(api::acquire::<S>))
        .route("/limiters/{name}/schedule", post(api::schedule::<S>))
        .route("/limiters/{name}/unschedule", post(api::unschedule::<S>))
        .route("/limiters/{name}/feedback", post(api::feedback::<S>))
        .route("/permits/{permit_id}/extend", post(api::extend::<S>))
        .route("/permits/{permit_id}/release", post(api::release::<S>))
        .route(
            "/limiters/{name}/holders",
            get(crate::dashboard::holders::list_holders::<S>),
        )
        .route_layer(axum::middleware::from_fn(guard::require_json))
        .route_layer(axum::middleware::from_fn_with_state(
            Arc::clone(&state),
            auth::require_token::<S>,
        ));
    let metrics = Router::new().route("/metrics", get(api::metrics::<S>));
    let metrics = if state.options.metrics_require_token {
        metrics.route_layer(axum::middleware::from_fn_with_state(
            Arc::clone(&state),
            auth::require_token::<S>,
        ))
    } else {
        metrics
    };
    let app = Router::new()
        .nest("/v1", v1)
        .merge(metrics)
        .merge(
            crate::dashboard::routes::<S>().route_layer(axum::middleware::from_fn_with_state(
                Arc::clone(&state),
                crate::dashboard::require_session::<S>,
            )),
        )
        .merge(crate::dashboard::public_routes::<S>())
        .route("/healthz", get(api::healthz))
        .route("/readyz", get(api::readyz::<S>))
        .fallback(api::not_found)
        .method_not_allowed_fallback(api::method_not_allowed)
        .layer(DefaultBodyLimit::max(max_body))
        .layer(axum::Extension(body_timeout))
        .layer(axum::middleware::from_fn(
            move |request: axum::extract::Request, next: axum::middleware::Next| {
                guard::refuse_declared_oversize(max_body, request, next)
            },
        ));
    // Only where there is a check to make: a server open to any host pays nothing per request.
    let app = match allowed_hosts {
        Some(names) => app.layer(axum::middleware::from_fn_with_state(
            names,
            host_check::require_allowed_host,
        )),
        None => app,
    };
    let app = app
        .layer(axum::middleware::from_fn_with_state(
            Arc::clone(&state),
            request_id::request_id::<S>,
        ))
        .with_state(state);
    (app, tx)
}

/// Serves until `shutdown` completes, then stops accepting, answers held acquires with 503
/// `shutting_down`, lets in-flight requests finish for up to `shutdown_grace`, closes what is
/// still open and returns.
pub async fn run<S: Store>(
    listener: TcpListener,
    gate: Floodgate<S>,
    options: ServerOptions,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let limits = listen::ListenLimits {
        timeouts: conn_io::Timeouts {
            header: options.header_timeout,
            idle: options.idle_timeout,
        },
        max_connections: options.max_connections,
        shutdown_grace: options.shutdown_grace,
        tls: options.tls.clone(),
    };
    let (app, shutting_down) = router(gate, options);
    listen::serve(listener, app, limits, shutdown, shutting_down).await
}
