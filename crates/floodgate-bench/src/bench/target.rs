//! What `floodgate bench` runs against: a server over HTTP (given by `--url`, or started in
//! this process), or the library's Redis store in this process (`--store`).

use std::time::Duration;

use floodgate::{Floodgate, LimiterSpec, RedisConfig, RedisStore};
use redis::aio::MultiplexedConnection;
use serde_json::{json, Value};
use tokio::sync::oneshot;

use super::{fail, BenchArgs, Names, LEASE_MS, WAIT_MS};
use floodgate_server::cli::Failure;
use floodgate_server::client::Client;
use floodgate_server::server::{self, ServerOptions};

/// How long `--url`'s server has to answer `GET /healthz` before the run starts.
const PROBE_TIMEOUT: Duration = Duration::from_secs(10);

/// What the workloads run against.
pub(super) enum Target {
    /// A server over HTTP.
    Http {
        base: String,
        token: Option<String>,
        control: Client,
        /// The in-process server, when no --url was given.
        local: Option<LocalServer>,
    },
    /// The library's Redis store, in this process.
    Store(StoreTarget),
}

pub(super) struct StoreTarget {
    pub(super) url: String,
    /// Two store instances on the same Redis, each with its own connection and wake-up
    /// subscription: the handoff's two sides use one each. Every other client uses the first.
    pub(super) gates: [Floodgate<RedisStore>; 2],
    /// A plain connection to the same Redis: the baseline PINGs and INFO.
    pub(super) redis: MultiplexedConnection,
}

impl Target {
    pub(super) async fn open(args: &BenchArgs) -> Result<Self, Failure> {
        if let Some(url) = &args.store {
            let connect = |what: &str, e: &dyn std::fmt::Display| Failure {
                code: floodgate_server::cli::EXIT_UNAVAILABLE,
                message: format!("{what} {}: {e}", floodgate::store::redis::redact_url(url)),
            };
            // A URL that is not a direct Redis URL is bad input (exit 2), told before any
            // connection is tried (the store would report it as unavailable, exit 69).
            crate::redis_url::check_direct("--store", url)?;
            let mut gates = Vec::with_capacity(2);
            for _ in 0..2 {
                let store = RedisStore::connect(RedisConfig::new(url.as_str()))
                    .await
                    .map_err(|e| connect("cannot open the Redis store at", &e))?;
                gates.push(Floodgate::with_store(store));
            }
            let client =
                redis::Client::open(url.as_str()).map_err(|e| connect("not a Redis URL:", &e))?;
            let redis = client
                .get_multiplexed_async_connection()
                .await
                .map_err(|e| connect("cannot connect to", &e))?;
            let [a, b]: [Floodgate<RedisStore>; 2] = gates.try_into().map_err(|_| Failure {
                code: 1,
                message: "two stores expected".into(),
            })?;
            return Ok(Target::Store(StoreTarget {
                url: url.clone(),
                gates: [a, b],
                redis,
            }));
        }
        let mut local = None;
        let base = match &args.url {
            Some(url) => url.trim_end_matches('/').to_owned(),
            None => {
                let server = LocalServer::start(args.token.clone()).await?;
                let base = server.base.clone();
                local = Some(server);
                base
            }
        };
        // A --url that is not an http(s) URL is bad input (exit 2), not an unreachable server.
        let control = Client::new(&base, args.token.clone()).map_err(|e| match e {
            floodgate_server::client::ClientError::Settings { message } => {
                Failure::usage(format!("--url: {message}"))
            }
            other => Failure::from(other),
        })?;
        if local.is_none() {
            // Fails fast on a wrong address or a stalled server, where the first limiter's
            // definition would wait out its whole request timeout (and the clean-up's after it).
            let probe = super::client::HttpClient::new(&base, args.token.as_deref(), "probe")?;
            match tokio::time::timeout(PROBE_TIMEOUT, probe.healthz()).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => return Err(fail(format!("{base}/healthz: {e}"))),
                Err(_) => {
                    return Err(fail(format!(
                        "{base}/healthz: no answer within {} s",
                        PROBE_TIMEOUT.as_secs()
                    )))
                }
            }
        }
        Ok(Target::Http {
            base,
            token: args.token.clone(),
            control,
            local,
        })
    }

    pub(super) fn address(&self) -> &str {
        match self {
            Target::Http { base, .. } => base,
            Target::Store(store) => &store.url,
        }
    }

    pub(super) fn in_process(&self) -> bool {
        matches!(self, Target::Http { local: Some(_), .. })
    }

    pub(super) fn is_store(&self) -> bool {
        matches!(self, Target::Store(_))
    }

    /// The trivial request of the baselines.
    pub(super) fn trivial_label(&self) -> &'static str {
        match self {
            Target::Http { .. } => "GET /healthz",
            Target::Store(_) => "PING",
        }
    }

    /// Creates the limiter with this limit (or changes it).
    pub(super) async fn define(&self, name: &str, limit: u32) -> Result<(), Failure> {
        match self {
            Target::Http { control, .. } => {
                control
                    .put_limiter(
                        name,
                        &json!({ "concurrency": limit, "lease_ms": LEASE_MS, "max_wait_ms": WAIT_MS }),
                    )
                    .await?;
            }
            Target::Store(store) => {
                let spec = LimiterSpec::concurrency(limit)
                    .with_default_lease(Duration::from_millis(LEASE_MS))
                    .with_max_wait(Duration::from_millis(WAIT_MS));
                store.gates[0]
                    .define(name, spec)
                    .await
                    .map_err(|e| fail(format!("define {name}: {e}")))?;
            }
        }
        Ok(())
    }

    /// Deletes every limiter of the bench that exists.
    pub(super) async fn delete_all(&self, names: &Names) -> Result<(), Failure> {
        let mut outcome = Ok(());
        for name in names.all() {
            match self {
                Target::Http { control, .. } => match control.delete_limiter(name).await {
                    Ok(_) => {}
                    Err(e) if e.code() == Some("unknown_limiter") => {}
                    Err(e) => outcome = Err(Failure::from(e)),
                },
                Target::Store(store) => {
                    if let Err(e) = store.gates[0].delete(name).await {
                        outcome = Err(fail(format!("delete {name}: {e}")));
                    }
                }
            }
        }
        outcome
    }

    /// Acquires queued on the limiter now.
    pub(super) async fn waiting(&self, name: &str) -> Result<u64, Failure> {
        match self {
            Target::Http { control, .. } => {
                let status = control.limiter(name).await?;
                Ok(status.get("waiting").and_then(Value::as_u64).unwrap_or(0))
            }
            Target::Store(store) => {
                let status = async { store.gates[0].limiter(name).await?.status().await }
                    .await
                    .map_err(|e| fail(format!("status of {name}: {e}")))?;
                Ok(u64::from(status.waiting))
            }
        }
    }

    /// A connection for reading Redis's counters, in store mode.
    pub(super) fn redis(&self) -> Option<MultiplexedConnection> {
        match self {
            Target::Http { .. } => None,
            Target::Store(store) => Some(store.redis.clone()),
        }
    }

    pub(super) async fn close(self) {
        match self {
            Target::Http { control, local, .. } => {
                drop(control);
                if let Some(server) = local {
                    server.stop().await;
                }
            }
            Target::Store(store) => drop(store),
        }
    }
}

/// The in-process server.
pub(super) struct LocalServer {
    pub(super) base: String,
    pub(super) stop: oneshot::Sender<()>,
    pub(super) task: tokio::task::JoinHandle<std::io::Result<()>>,
}

impl LocalServer {
    pub(super) async fn start(token: Option<String>) -> Result<Self, Failure> {
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", 0))
            .await
            .map_err(|e| Failure {
                code: 1,
                message: format!("cannot listen on 127.0.0.1: {e}"),
            })?;
        let addr = listener.local_addr().map_err(|e| Failure {
            code: 1,
            message: e.to_string(),
        })?;
        let options = ServerOptions {
            token,
            ..ServerOptions::default()
        };
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(server::run(
            listener,
            Floodgate::in_memory(),
            options,
            async move {
                let _ = stopped.await;
            },
        ));
        Ok(LocalServer {
            base: format!("http://{addr}"),
            stop,
            task,
        })
    }

    pub(super) async fn stop(self) {
        let _ = self.stop.send(());
        // Every client is dropped by now; the wait is only a guard against a stuck connection.
        let _ = tokio::time::timeout(Duration::from_secs(5), self.task).await;
    }
}
