//! `floodgate serve`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use floodgate::{
    Durability, Floodgate, FsyncPolicy, LimiterName, MemoryStore, RedisConfig, RedisSecurity,
    RedisStore, Store, WallClock,
};

use super::duration::parse_duration;
use super::logging::{self, LogFormat};
use super::Failure;
use crate::config::FileConfig;
use crate::server::tls::{TlsAcceptors, TlsFiles};
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
    /// A host name requests may name in `Host` beside IP addresses and localhost (repeat the
    /// flag; comma-separated in the variable). Without a token, a server listening on loopback
    /// serves only those, answering others 403 (the guard against DNS rebinding); given, the
    /// check applies whatever the address and token.
    #[arg(
        long = "allowed-host",
        value_name = "NAME",
        env = "FLOODGATE_ALLOWED_HOSTS",
        value_delimiter = ','
    )]
    allowed_hosts: Vec<String>,
    /// Require the token on /metrics too [default: false].
    #[arg(long, env = "FLOODGATE_METRICS_REQUIRE_TOKEN")]
    metrics_require_token: Option<bool>,
    /// Allow creating, changing and deleting limiters over the API (and the dashboard's actions)
    /// [default: true].
    #[arg(long, env = "FLOODGATE_API_WRITES")]
    api_writes: Option<bool>,
    /// Most limiters the server holds, at least 1 [default: 10000].
    #[arg(long, env = "FLOODGATE_MAX_LIMITERS")]
    max_limiters: Option<usize>,
    /// Largest request body in bytes, at least 1 [default: 65536].
    #[arg(long, env = "FLOODGATE_MAX_BODY_BYTES")]
    max_body_bytes: Option<usize>,
    /// Keep limiters in Redis, shared by every server using it: `redis://HOST:PORT`
    /// (`rediss://` for TLS), several comma-separated node URLs for a Redis Cluster
    /// (`--redis-cluster` with one seed URL), or
    /// `redis+sentinel://HOST:PORT,HOST:PORT,HOST:PORT/MASTER` to follow Sentinel failovers.
    #[arg(long, env = "FLOODGATE_REDIS")]
    redis: Option<String>,
    /// Treat the --redis URL(s) as a Redis Cluster. Like every --redis-* setting, refused
    /// without --redis.
    #[arg(long, env = "FLOODGATE_REDIS_CLUSTER")]
    redis_cluster: Option<bool>,
    /// When the shared store cannot be reached: `fail_closed` answers acquires 503
    /// store_unavailable; `fail_open` grants without accounting (counted and logged) [default:
    /// fail_closed].
    #[arg(long, env = "FLOODGATE_ON_STORE_FAILURE", value_parser = ["fail_closed", "fail_open"])]
    on_store_failure: Option<String>,
    /// Keep the embedded store's state in this directory (write-ahead log + snapshots), so a
    /// restart or crash restores every limiter, holder, lease and token. Without it, a restart
    /// forgets everything. Not used with --redis (a warning says so; Redis keeps the state).
    #[arg(long, env = "FLOODGATE_DATA_DIR")]
    data_dir: Option<PathBuf>,
    /// When the log reaches the disk: `always` (before each answer, group commit),
    /// `everysec` (default) or `no`; as Redis's appendfsync. Only with --data-dir (refused
    /// without it; with --redis, not used, and a warning says so).
    #[arg(long, env = "FLOODGATE_FSYNC", value_parser = ["always", "everysec", "no"])]
    fsync: Option<String>,
    /// Log growth in bytes after which a snapshot is taken and the log before it deleted
    /// [default: 67108864]. Only with --data-dir (refused without it; with --redis, not used,
    /// and a warning says so).
    #[arg(long, env = "FLOODGATE_SNAPSHOT_AFTER_BYTES")]
    snapshot_after_bytes: Option<u64>,
    /// Learning window after state loss, in milliseconds (docs/learning.md): a limiter whose
    /// state was lost grants nothing this long while holders re-claim their permits by
    /// extending. With Redis: for limiters re-created after Redis lost them [default: each
    /// limiter's lease]; only when it is given do config limiters Redis has no state for at
    /// start learn too.
    /// Embedded: config limiters learn at start [default: 0, they do not]. At most 86400000
    /// (24 h, the longest lease).
    #[arg(long, env = "FLOODGATE_LEARNING_WINDOW", value_name = "MS")]
    learning_window: Option<u64>,
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
    /// Log lines as `text` (for people) or `json` (one object per line, for machines) [default:
    /// text]. Levels come from FLOODGATE_LOG or RUST_LOG (e.g. `info,floodgate=debug`).
    #[arg(long, env = "FLOODGATE_LOG_FORMAT", value_enum)]
    log_format: Option<LogFormat>,
    /// Log one line per HTTP request (method, path, status, duration, request id) [default:
    /// false].
    #[arg(long, env = "FLOODGATE_ACCESS_LOG", num_args = 0..=1, default_missing_value = "true")]
    access_log: Option<bool>,
    /// Serve HTTPS with this PEM certificate chain (with --tls-key); the pair is reloaded
    /// when the files change on disk or on SIGHUP, so certificates rotate without a restart.
    #[arg(long, env = "FLOODGATE_TLS_CERT", requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// The PEM private key of --tls-cert.
    #[arg(long, env = "FLOODGATE_TLS_KEY", requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// CA certificates (PEM) to verify a rediss:// server with, instead of the system's.
    #[arg(long, env = "FLOODGATE_REDIS_CA")]
    redis_ca: Option<PathBuf>,
    /// Client certificate (PEM) for a Redis that requires one (with --redis-key).
    #[arg(long, env = "FLOODGATE_REDIS_CERT", requires = "redis_key")]
    redis_cert: Option<PathBuf>,
    /// The PEM private key of --redis-cert.
    #[arg(long, env = "FLOODGATE_REDIS_KEY", requires = "redis_cert")]
    redis_key: Option<PathBuf>,
    /// Redis ACL user, when the URL names none.
    #[arg(long, env = "FLOODGATE_REDIS_USERNAME")]
    redis_username: Option<String>,
    /// Redis password, when the URL gives none. Prefer the environment variable: a flag shows
    /// in process lists.
    #[arg(long, env = "FLOODGATE_REDIS_PASSWORD", hide_env_values = true)]
    redis_password: Option<String>,
    /// The sentinels' own ACL user, for a redis+sentinel:// URL whose sentinels require one.
    #[arg(long, env = "FLOODGATE_REDIS_SENTINEL_USERNAME")]
    redis_sentinel_username: Option<String>,
    /// The sentinels' own password (their requirepass). Prefer the environment variable.
    #[arg(
        long,
        env = "FLOODGATE_REDIS_SENTINEL_PASSWORD",
        hide_env_values = true
    )]
    redis_sentinel_password: Option<String>,
}

pub(crate) async fn serve(args: ServeArgs) -> Result<u8, Failure> {
    let file = match &args.config {
        Some(path) => FileConfig::load(path).map_err(|e| Failure::usage(e.to_string()))?,
        None => FileConfig::default(),
    };
    let log_format = match (args.log_format, &file.log_format) {
        (Some(f), _) => f,
        (None, Some(text)) => LogFormat::parse(text).map_err(Failure::usage)?,
        (None, None) => LogFormat::Text,
    };
    logging::init(log_format);
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
    let mut options = ServerOptions {
        // Loaded in serve_on, once the address is bound.
        tls: None,
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
        token: args
            .token
            .clone()
            .or(file.token.clone())
            .filter(|t| !t.is_empty()),
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
        access_log: args.access_log.or(file.access_log).unwrap_or(false),
        // Set below, from the token and the address.
        allowed_hosts: None,
    };
    options.allowed_hosts = allowed_hosts(&args, &file, listen, options.token.is_some())?;
    if let Some(names) = &options.allowed_hosts {
        tracing::info!(
            ?names,
            "serving only requests whose Host is localhost, an IP address or one of these names \
             (the guard against DNS rebinding)"
        );
    }
    // Out of range, not a choice: a header timeout of 0 closes every connection before its
    // first request, a body timeout of 0 answers 408 to any body not already buffered, and no
    // connection at all serves nothing. Refused rather than started as a server that cannot
    // serve.
    for (field, timeout) in [
        ("header_timeout", options.header_timeout),
        ("body_timeout", options.body_timeout),
    ] {
        if timeout.is_zero() {
            return Err(Failure::usage(format!("{field}: must be at least 1 ms")));
        }
    }
    if options.max_connections == 0 {
        return Err(Failure::usage("max_connections: must be at least 1"));
    }
    // Likewise: a body cap of 0 refuses every acquire, extend and definition that carries a
    // body (413), and a cap of 0 limiters holds none.
    if options.max_body_bytes == 0 {
        return Err(Failure::usage("max_body_bytes: must be at least 1"));
    }
    let tls = match (
        args.tls_cert.clone().or(file.tls_cert.clone()),
        args.tls_key.clone().or(file.tls_key.clone()),
    ) {
        (Some(cert), Some(key)) => Some(TlsFiles { cert, key }),
        (None, None) => None,
        _ => {
            return Err(Failure::usage(
                "tls_cert and tls_key go together: give both or neither",
            ))
        }
    };
    let listen = Listen { addr: listen, tls };
    let redis = args.redis.clone().or(file.redis.clone());
    let cluster = args.redis_cluster.or(file.redis_cluster).unwrap_or(false);
    let max_limiters = args.max_limiters.or(file.max_limiters);
    if max_limiters == Some(0) {
        return Err(Failure::usage("max_limiters: must be at least 1"));
    }
    let data_dir = args.data_dir.clone().or(file.data_dir.clone());
    // A path that exists and is not a directory is a wrong argument, said as one (exit 2);
    // one that cannot be created or opened (permissions, a full disk) stays a runtime failure.
    if let Some(dir) = data_dir.as_ref().filter(|d| d.exists() && !d.is_dir()) {
        return Err(Failure::usage(format!(
            "data_dir: {} exists and is not a directory",
            dir.display()
        )));
    }
    let fsync: FsyncPolicy = args
        .fsync
        .as_deref()
        .or(file.fsync.as_deref())
        .unwrap_or("everysec")
        .parse()
        .map_err(Failure::usage)?;
    let learning = args
        .learning_window
        .or(file.learning_window_ms)
        .map(std::time::Duration::from_millis);
    // A window longer than the longest lease covers no more permits; a huge one (u64::MAX ms)
    // only stops a limiter from ever granting.
    if learning.is_some_and(|w| w > floodgate::spec::MAX_LEASE) {
        return Err(Failure::usage(format!(
            "learning_window (--learning-window, learning_window_ms): must be at most {} ms \
             (24 h, the longest lease)",
            floodgate::spec::MAX_LEASE.as_millis()
        )));
    }
    check_companions(&args, &file, redis.is_some(), data_dir.is_some())?;
    if let (Some(_), Some(dir)) = (&redis, &data_dir) {
        // Not refused: the shipped recipes (the container image, the systemd unit) set
        // FLOODGATE_DATA_DIR for every server, Redis or not.
        tracing::warn!(
            dir = %dir.display(),
            "data_dir is not used with redis: Redis keeps the state, nothing is written there"
        );
    }
    match redis {
        None => {
            let mut store = match &data_dir {
                Some(dir) => {
                    let mut durability = Durability::new(dir).fsync(fsync);
                    if let Some(bytes) = args.snapshot_after_bytes.or(file.snapshot_after_bytes) {
                        durability = durability.snapshot_after_bytes(bytes);
                    }
                    let (store, report) = MemoryStore::open(durability).map_err(|e| Failure {
                        code: 1,
                        message: format!("cannot open the data directory: {e}"),
                    })?;
                    tracing::info!(
                        dir = %dir.display(),
                        %fsync,
                        limiters = report.limiters,
                        holders = report.holders,
                        records = report.records,
                        waiters_dropped = report.waiters_dropped,
                        snapshot = ?report.snapshot,
                        "state restored from the data directory"
                    );
                    store
                }
                None => {
                    tracing::warn!(
                        "no --data-dir: limiters created over the API, held permits and fencing \
                         tokens are lost on restart (holders still working would be over-admitted)"
                    );
                    MemoryStore::with_clock(WallClock::new())
                }
            };
            if let Some(max) = max_limiters {
                store = store.with_max_limiters(max);
            }
            let result = serve_on(
                Floodgate::with_store(store.clone()),
                "memory",
                listen,
                options,
                &file,
                learning,
                args.config.clone(),
            )
            .await;
            // Everything answered is already written; this syncs it and unlocks the dir.
            store.close();
            result
        }
        Some(urls) => {
            let urls = redis_urls(&urls);
            check_redis_urls(&urls).map_err(Failure::usage)?;
            let mut config = if cluster || urls.len() > 1 {
                RedisConfig::cluster(urls)
            } else {
                RedisConfig::new(urls.first().cloned().unwrap_or_default())
            };
            config.learning_window = learning;
            // The registry is shared: the cap counts every server's limiters.
            config.max_limiters =
                Some(max_limiters.unwrap_or(floodgate::store::memory::DEFAULT_MAX_LIMITERS));
            config.security = RedisSecurity {
                ca_file: args.redis_ca.clone().or(file.redis_ca.clone()),
                cert_file: args.redis_cert.clone().or(file.redis_cert.clone()),
                key_file: args.redis_key.clone().or(file.redis_key.clone()),
                username: args.redis_username.clone().or(file.redis_username.clone()),
                password: args.redis_password.clone().or(file.redis_password.clone()),
                sentinel_username: args
                    .redis_sentinel_username
                    .clone()
                    .or(file.redis_sentinel_username.clone()),
                sentinel_password: args
                    .redis_sentinel_password
                    .clone()
                    .or(file.redis_sentinel_password.clone()),
            };
            check_redis_tls(&config.urls, &config.security).map_err(Failure::usage)?;
            let store = RedisStore::connect(config).await.map_err(|e| Failure {
                // A Redis that may evict keys is a misconfiguration to fix, not an outage to
                // wait out.
                code: if crate::server::evicting_redis(&e) {
                    super::EXIT_USAGE
                } else {
                    super::EXIT_UNAVAILABLE
                },
                message: e.to_string(),
            })?;
            serve_on(
                Floodgate::with_store(store),
                "redis",
                listen,
                options,
                &file,
                learning,
                args.config.clone(),
            )
            .await
        }
    }
}

/// Refuses settings that only mean something with another one, rather than ignoring them: the
/// durable store's tuning without `--data-dir`, Redis's connection settings without `--redis`.
/// Each is named as given: the flag (or its environment variable), else the config file's
/// field. The durable store's settings with `--redis` only warn, as `--data-dir` does: the
/// shipped recipes (the container image, the systemd unit with `floodgate.example.toml`) set
/// them for every server, Redis or not.
fn check_companions(
    args: &ServeArgs,
    file: &FileConfig,
    redis: bool,
    data_dir: bool,
) -> Result<(), Failure> {
    let named = |by_flag: bool, flag: &str, field: &str| {
        if by_flag {
            flag.to_owned()
        } else {
            format!("{field} (config file)")
        }
    };
    let durable = [
        (
            args.fsync.is_some(),
            file.fsync.is_some(),
            "--fsync",
            "fsync",
        ),
        (
            args.snapshot_after_bytes.is_some(),
            file.snapshot_after_bytes.is_some(),
            "--snapshot-after-bytes",
            "snapshot_after_bytes",
        ),
    ];
    for (by_flag, by_file, flag, field) in durable {
        if !(by_flag || by_file) {
            continue;
        }
        let setting = named(by_flag, flag, field);
        if redis {
            tracing::warn!("{setting} is not used with redis: Redis keeps the state");
            continue;
        }
        if !data_dir {
            return Err(Failure::usage(format!(
                "{setting}: only with --data-dir (the durable embedded store)"
            )));
        }
    }
    if redis {
        return Ok(());
    }
    let redis_only = [
        (
            args.redis_cluster.is_some(),
            file.redis_cluster.is_some(),
            "--redis-cluster",
            "redis_cluster",
        ),
        (
            args.redis_ca.is_some(),
            file.redis_ca.is_some(),
            "--redis-ca",
            "redis_ca",
        ),
        (
            args.redis_cert.is_some(),
            file.redis_cert.is_some(),
            "--redis-cert",
            "redis_cert",
        ),
        (
            args.redis_key.is_some(),
            file.redis_key.is_some(),
            "--redis-key",
            "redis_key",
        ),
        (
            args.redis_username.is_some(),
            file.redis_username.is_some(),
            "--redis-username",
            "redis_username",
        ),
        (
            args.redis_password.is_some(),
            file.redis_password.is_some(),
            "--redis-password",
            "redis_password",
        ),
        (
            args.redis_sentinel_username.is_some(),
            file.redis_sentinel_username.is_some(),
            "--redis-sentinel-username",
            "redis_sentinel_username",
        ),
        (
            args.redis_sentinel_password.is_some(),
            file.redis_sentinel_password.is_some(),
            "--redis-sentinel-password",
            "redis_sentinel_password",
        ),
    ];
    if let Some((by_flag, _, flag, field)) = redis_only.iter().find(|(f, c, _, _)| *f || *c) {
        return Err(Failure::usage(format!(
            "{}: only with --redis (the shared store)",
            named(*by_flag, flag, field)
        )));
    }
    Ok(())
}

/// The `--redis` value as URLs: comma-separated cluster nodes, except a Sentinel URL, which
/// lists its sentinels with commas itself.
fn redis_urls(text: &str) -> Vec<String> {
    let text = text.trim();
    if text.starts_with("redis+sentinel://") {
        return vec![text.to_owned()];
    }
    text.split(',')
        .map(|u| u.trim().to_owned())
        .filter(|u| !u.is_empty())
        .collect()
}

/// A Redis URL that cannot be one is bad input (exit code 2), not an unavailable store: each
/// must have a Redis scheme and parse as a URL (a Sentinel URL, which lists several hosts, as
/// the store reads it).
fn check_redis_urls(urls: &[String]) -> Result<(), String> {
    const SCHEMES: [&str; 4] = ["redis://", "rediss://", "redis+unix://", "unix://"];
    if urls.is_empty() {
        return Err("redis: no URL given".to_owned());
    }
    for url in urls {
        if url.starts_with("redis+sentinel://") {
            floodgate::store::redis::check_sentinel_url(url)?;
            continue;
        }
        // Named with its password hidden: this message goes to the terminal and to logs.
        let shown = floodgate::store::redis::redact_url(url);
        if !SCHEMES.iter().any(|s| url.starts_with(s)) {
            return Err(format!(
                "redis: URL {shown:?}: expected redis://, rediss://, redis+unix:// or \
                 redis+sentinel://"
            ));
        }
        reqwest::Url::parse(url).map_err(|e| format!("redis: URL {shown:?}: {e}"))?;
    }
    Ok(())
}

/// TLS files that cannot be used are bad input (exit code 2), refused before any connection is
/// tried rather than reported as an unavailable store (exit 69, "try again later"): with a URL
/// other than `rediss://` (a Sentinel URL reaches its nodes over TLS when files are given), a
/// client certificate without its key, or a file that cannot be read.
fn check_redis_tls(urls: &[String], security: &RedisSecurity) -> Result<(), String> {
    let files = [
        ("CA file", &security.ca_file),
        ("client certificate", &security.cert_file),
        ("client key", &security.key_file),
    ];
    if files.iter().all(|(_, file)| file.is_none()) {
        return Ok(());
    }
    if security.cert_file.is_some() != security.key_file.is_some() {
        return Err(
            "redis: a client certificate (--redis-cert, redis_cert) and its key \
                    (--redis-key, redis_key) go together"
                .to_owned(),
        );
    }
    for url in urls {
        if !url.starts_with("rediss://") && !url.starts_with("redis+sentinel://") {
            return Err(format!(
                "redis: a CA file or client certificate needs a rediss:// URL, not {}",
                floodgate::store::redis::redact_url(url)
            ));
        }
    }
    for (what, file) in files {
        if let Some(path) = file {
            // Read, as the store does at connect: a directory opens but cannot be read.
            std::fs::read(path).map_err(|e| format!("redis: {what} {}: {e}", path.display()))?;
        }
    }
    Ok(())
}

/// The names `Host` may carry beside addresses and localhost, or `None` for any: the names
/// given, or none when the server listens on loopback with no token (only local clients reach
/// it, so a request naming another host came through a DNS-rebound web page).
fn allowed_hosts(
    args: &ServeArgs,
    file: &FileConfig,
    listen: SocketAddr,
    token: bool,
) -> Result<Option<Vec<String>>, Failure> {
    let given = if args.allowed_hosts.is_empty() {
        file.allowed_hosts.clone().unwrap_or_default()
    } else {
        args.allowed_hosts.clone()
    };
    let names = given
        .iter()
        .map(|name| server::allowed_host_name(name))
        .collect::<Result<Vec<_>, _>>()
        .map_err(Failure::usage)?;
    Ok((!names.is_empty() || (listen.ip().is_loopback() && !token)).then_some(names))
}

/// Where and how to listen.
struct Listen {
    /// The address.
    addr: SocketAddr,
    /// The certificate and key, for HTTPS.
    tls: Option<TlsFiles>,
}

async fn serve_on<S: Store>(
    gate: Floodgate<S>,
    store: &'static str,
    listen: Listen,
    options: ServerOptions,
    file: &FileConfig,
    learning: Option<std::time::Duration>,
    config: Option<PathBuf>,
) -> Result<u8, Failure> {
    match learning.filter(|w| !w.is_zero()) {
        Some(window) => restore_limiters(&gate, file, window).await?,
        None => define_limiters(&gate, file).await?,
    }
    reload_on_hangup(gate.clone(), config)?;
    let listener = tokio::net::TcpListener::bind(listen.addr)
        .await
        .map_err(|e| Failure {
            code: 1,
            message: format!("cannot listen on {}: {e}", listen.addr),
        })?;
    let local = listener.local_addr().map_err(|e| Failure {
        code: 1,
        message: e.to_string(),
    })?;
    // Certificates are loaded before the server says it listens: a bad pair stops the start.
    let tls = listen.tls.is_some();
    let mut options = options;
    if let Some(files) = listen.tls {
        options.tls = Some(TlsAcceptors::start(files).map_err(|e| Failure::usage(e.to_string()))?);
    }
    tracing::info!(
        %local,
        store,
        limiters = file.limiters.len(),
        auth = options.token.is_some(),
        fail_open = options.fail_open,
        max_connections = options.max_connections,
        tls,
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
        // Keyed or not, with the file's key overrides.
        super::keyed_apply::put_file_limiter(gate, &name, limiter)
            .await
            .map_err(Failure::usage)?;
    }
    Ok(())
}

/// Creates (or updates) the limiters of the config file; one the store has no state for starts
/// in a learning window (its state may have been lost; docs/learning.md).
pub(crate) async fn restore_limiters<S: Store>(
    gate: &Floodgate<S>,
    file: &FileConfig,
    window: std::time::Duration,
) -> Result<(), Failure> {
    for (name, limiter) in &file.limiters {
        let name = LimiterName::new(name).map_err(|e| Failure::usage(e.to_string()))?;
        // Keyed or not (a keyed one with the file's overrides).
        let learning = super::keyed_apply::restore_file_limiter(gate, &name, limiter, window)
            .await
            .map_err(Failure::usage)?;
        if learning {
            tracing::warn!(limiter = %name, window_ms = window.as_millis(), "this limiter is in a learning window (no state was found for it): learning who holds permits before granting");
        }
    }
    Ok(())
}

/// On SIGHUP, re-reads the config file's limiters and applies them like `floodgate limiter
/// apply` (deleting those it no longer names only with `reload_prune = true`). Holders and
/// waiters stay; a file that does not load is logged and changes nothing. The handler is
/// installed before the server listens, so a SIGHUP never kills a running server.
/// Without a config file, SIGHUP is still handled (only certificates reload), so
/// `systemctl reload` never stops a server.
#[cfg(unix)]
fn reload_on_hangup<S: Store>(gate: Floodgate<S>, path: Option<PathBuf>) -> Result<(), Failure> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut hangups = signal(SignalKind::hangup()).map_err(|e| Failure {
        code: 1,
        message: format!("cannot handle SIGHUP: {e}"),
    })?;
    tokio::spawn(async move {
        while hangups.recv().await.is_some() {
            let Some(path) = &path else {
                tracing::info!("SIGHUP: no --config file, no limiters to reload");
                continue;
            };
            let file = match FileConfig::load(path) {
                Ok(file) => file,
                Err(e) => {
                    tracing::error!(error = %e, "reload: config not applied");
                    continue;
                }
            };
            let prune = file.reload_prune.unwrap_or(false);
            match super::apply::apply_to_store(&gate, &file, prune).await {
                Ok(plan) => {
                    for line in plan.render(false).lines() {
                        tracing::info!(change = line, "reload");
                    }
                }
                Err(e) => tracing::error!(error = %e, "reload: stopped part way"),
            }
        }
    });
    Ok(())
}

#[cfg(not(unix))]
fn reload_on_hangup<S: Store>(_gate: Floodgate<S>, _path: Option<PathBuf>) -> Result<(), Failure> {
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

#[cfg(test)]
mod tests {
    use super::redis_urls;

    #[test]
    fn a_sentinel_url_keeps_its_commas_and_cluster_nodes_split() {
        assert_eq!(
            redis_urls(" redis+sentinel://a:1,b:2,c:3/m "),
            ["redis+sentinel://a:1,b:2,c:3/m"]
        );
        assert_eq!(
            redis_urls("redis://a:1, redis://b:2,"),
            ["redis://a:1", "redis://b:2"]
        );
    }
}
