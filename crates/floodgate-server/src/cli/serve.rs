//! `floodgate serve`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use floodgate::{FastClock, Floodgate, LimiterName, MemoryStore, RedisConfig, RedisStore, Store};
use tracing_subscriber::EnvFilter;

use super::duration::parse_duration;
use super::Failure;
use crate::config::FileConfig;
use crate::server::{self, ServerOptions, DEFAULT_MAX_BODY_BYTES};

/// Flags of `floodgate serve`. Each overrides the config file; each has an environment variable.
#[derive(Debug, clap::Args)]
pub(crate) struct ServeArgs {
    /// Address to listen on [default: 127.0.0.1:8750].
    #[arg(long, env = "FLOODGATE_LISTEN")]
    listen: Option<SocketAddr>,
    /// TOML config file (limiters and settings); see floodgate.example.toml.
    #[arg(long, env = "FLOODGATE_CONFIG")]
    config: Option<PathBuf>,
    /// Bearer token required on /v1.
    #[arg(long, env = "FLOODGATE_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// Require the token on /metrics too.
    #[arg(long, env = "FLOODGATE_METRICS_REQUIRE_TOKEN")]
    metrics_require_token: Option<bool>,
    /// Allow creating, changing and deleting limiters over the API.
    #[arg(long, env = "FLOODGATE_API_WRITES")]
    api_writes: Option<bool>,
    /// Most limiters the server holds [default: 10000].
    #[arg(long, env = "FLOODGATE_MAX_LIMITERS")]
    max_limiters: Option<usize>,
    /// Largest request body in bytes [default: 65536].
    #[arg(long, env = "FLOODGATE_MAX_BODY_BYTES")]
    max_body_bytes: Option<usize>,
    /// Keep limiters in Redis, shared by every server using it: `redis://HOST:PORT`, or several
    /// comma-separated node URLs for a Redis Cluster (`--redis-cluster` with one seed URL).
    #[arg(long, env = "FLOODGATE_REDIS")]
    redis: Option<String>,
    /// Treat the --redis URL(s) as a Redis Cluster.
    #[arg(long, env = "FLOODGATE_REDIS_CLUSTER")]
    redis_cluster: Option<bool>,
    /// When the shared store cannot be reached: `fail_closed` answers acquires 503
    /// store_unavailable; `fail_open` grants without accounting (counted and logged).
    #[arg(long, env = "FLOODGATE_ON_STORE_FAILURE", value_parser = ["fail_closed", "fail_open"])]
    on_store_failure: Option<String>,
    /// Time a client has to send a request's head (line and headers), e.g. 10s [default: 10s].
    #[arg(long, env = "FLOODGATE_HEADER_TIMEOUT", value_parser = parse_duration)]
    header_timeout: Option<Duration>,
    /// Time a client has to send a request's body [default: 30s].
    #[arg(long, env = "FLOODGATE_BODY_TIMEOUT", value_parser = parse_duration)]
    body_timeout: Option<Duration>,
    /// Time a kept-alive connection may sit idle between requests [default: 60s].
    #[arg(long, env = "FLOODGATE_IDLE_TIMEOUT", value_parser = parse_duration)]
    idle_timeout: Option<Duration>,
    /// Most connections open at once; more are answered 503 and closed [default: 10000, or the
    /// descriptor limit less 64 if that is lower].
    #[arg(long, env = "FLOODGATE_MAX_CONNECTIONS")]
    max_connections: Option<usize>,
    /// On SIGTERM/SIGINT, how long in-flight requests get before connections are closed
    /// regardless [default: 10s].
    #[arg(long, env = "FLOODGATE_SHUTDOWN_GRACE", value_parser = parse_duration)]
    shutdown_grace: Option<Duration>,
}

pub(crate) async fn serve(args: ServeArgs) -> Result<u8, Failure> {
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_env("FLOODGATE_LOG").unwrap_or_else(|_| EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let file = match &args.config {
        Some(path) => FileConfig::load(path).map_err(|e| Failure::usage(e.to_string()))?,
        None => FileConfig::default(),
    };
    let listen = match (args.listen, &file.listen) {
        (Some(addr), _) => addr,
        (None, Some(text)) => text
            .parse()
            .map_err(|e| Failure::usage(format!("listen: {text:?}: {e}")))?,
        (None, None) => SocketAddr::from(([127, 0, 0, 1], 8750)),
    };
    // Connections, not the descriptor table, should be what runs out first.
    let fd_limit = server::raise_fd_limit();
    if let Some((old, new)) = fd_limit {
        tracing::info!(old, new, "open file limit (soft)");
    }
    let ms = |v: Option<u64>| v.map(Duration::from_millis);
    let default_max_connections = fd_limit.map_or(server::DEFAULT_MAX_CONNECTIONS, |(_, soft)| {
        usize::try_from(soft.saturating_sub(64))
            .unwrap_or(usize::MAX)
            .clamp(1, server::DEFAULT_MAX_CONNECTIONS)
    });
    let options = ServerOptions {
        header_timeout: args
            .header_timeout
            .or(ms(file.header_timeout_ms))
            .unwrap_or(server::DEFAULT_HEADER_TIMEOUT),
        body_timeout: args
            .body_timeout
            .or(ms(file.body_timeout_ms))
            .unwrap_or(server::DEFAULT_BODY_TIMEOUT),
        idle_timeout: args
            .idle_timeout
            .or(ms(file.idle_timeout_ms))
            .unwrap_or(server::DEFAULT_IDLE_TIMEOUT),
        max_connections: args
            .max_connections
            .or(file.max_connections)
            .unwrap_or(default_max_connections),
        shutdown_grace: args
            .shutdown_grace
            .or(ms(file.shutdown_grace_ms))
            .unwrap_or(server::DEFAULT_SHUTDOWN_GRACE),
        token: args.token.or(file.token.clone()).filter(|t| !t.is_empty()),
        metrics_require_token: args
            .metrics_require_token
            .or(file.metrics_require_token)
            .unwrap_or(false),
        api_writes: args.api_writes.or(file.api_writes).unwrap_or(true),
        max_body_bytes: args
            .max_body_bytes
            .or(file.max_body_bytes)
            .unwrap_or(DEFAULT_MAX_BODY_BYTES),
        fail_open: match args
            .on_store_failure
            .as_deref()
            .or(file.on_store_failure.as_deref())
        {
            None | Some("fail_closed") => false,
            Some("fail_open") => true,
            Some(other) => {
                return Err(Failure::usage(format!(
                    "on_store_failure: {other:?}; use fail_closed or fail_open"
                )))
            }
        },
    };
    let redis = args.redis.clone().or(file.redis.clone());
    let cluster = args.redis_cluster.or(file.redis_cluster).unwrap_or(false);
    let max_limiters = args.max_limiters.or(file.max_limiters);
    match redis {
        None => {
            // The cheaper clock: paused time is for tests, not for the server.
            let mut store = MemoryStore::with_clock(FastClock::new());
            if let Some(max) = max_limiters {
                store = store.with_max_limiters(max);
            }
            serve_on(
                Floodgate::with_store(store),
                "memory",
                listen,
                options,
                &file,
            )
            .await
        }
        Some(urls) => {
            let urls: Vec<String> = urls
                .split(',')
                .map(|u| u.trim().to_owned())
                .filter(|u| !u.is_empty())
                .collect();
            let mut config = if cluster || urls.len() > 1 {
                RedisConfig::cluster(urls)
            } else {
                RedisConfig::new(urls.first().cloned().unwrap_or_default())
            };
            // The registry is shared: the cap counts every server's limiters.
            config.max_limiters =
                Some(max_limiters.unwrap_or(floodgate::store::memory::DEFAULT_MAX_LIMITERS));
            let store = RedisStore::connect(config).await.map_err(|e| Failure {
                code: super::EXIT_UNAVAILABLE,
                message: e.to_string(),
            })?;
            serve_on(
                Floodgate::with_store(store),
                "redis",
                listen,
                options,
                &file,
            )
            .await
        }
    }
}

async fn serve_on<S: Store>(
    gate: Floodgate<S>,
    store: &'static str,
    listen: SocketAddr,
    options: ServerOptions,
    file: &FileConfig,
) -> Result<u8, Failure> {
    define_limiters(&gate, file).await?;
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .map_err(|e| Failure {
            code: 1,
            message: format!("cannot listen on {listen}: {e}"),
        })?;
    let local = listener.local_addr().map_err(|e| Failure {
        code: 1,
        message: e.to_string(),
    })?;
    tracing::info!(
        %local,
        store,
        limiters = file.limiters.len(),
        auth = options.token.is_some(),
        fail_open = options.fail_open,
        max_connections = options.max_connections,
        "floodgate listening"
    );
    server::run(listener, gate, options, shutdown_signal())
        .await
        .map_err(|e| Failure {
            code: 1,
            message: format!("server error: {e}"),
        })?;
    tracing::info!("stopped");
    Ok(0)
}

/// Creates (or updates) the limiters of the config file.
pub(crate) async fn define_limiters<S: Store>(
    gate: &Floodgate<S>,
    file: &FileConfig,
) -> Result<(), Failure> {
    for (name, limiter) in &file.limiters {
        let name = LimiterName::new(name).map_err(|e| Failure::usage(e.to_string()))?;
        gate.store()
            .put_limiter(&name, limiter.spec())
            .await
            .map_err(|e| Failure::usage(format!("limiter {name}: {e}")))?;
    }
    Ok(())
}

/// Completes on SIGINT or SIGTERM.
async fn shutdown_signal() {
    let ctrl_c = async {
        if tokio::signal::ctrl_c().await.is_err() {
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
    }
}
