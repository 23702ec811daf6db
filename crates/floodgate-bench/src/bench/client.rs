//! The benchmark's clients: one trait, [`BenchClient`], that every workload drives, with an
//! HTTP implementation ([`HttpClient`], against a server) and a store one ([`StoreClient`], the
//! library's Redis store in this process). A workload is written once, generic over it.

use std::future::Future;
use std::time::{Duration, Instant};

use axum::body::Bytes;
use floodgate::{AcquireOptions, Limiter, Permit, RedisLimiter};
use redis::aio::MultiplexedConnection;
use reqwest::header::{HeaderValue, AUTHORIZATION, CONTENT_TYPE};
use serde::Deserialize;

use super::target::Target;
use super::workloads::{Outcome, Phase};
use super::{fail, ACQUIRE_BODY, LEASE_MS, WAIT_MS};
use floodgate_server::cli::Failure;

/// One benchmark client of one limiter.
pub(super) trait BenchClient: Send + Sync + Sized + 'static {
    /// A permit this client holds.
    type Held: Send + 'static;

    /// A client of `limiter` on `target`. `second`: in store mode, on the second store
    /// instance (the handoff's other side, as another process would be).
    fn connect(
        target: &Target,
        limiter: &str,
        second: bool,
    ) -> impl Future<Output = Result<Self, Failure>> + Send;

    /// Acquires (waiting up to `WAIT_MS`); returns the permit and the moment it arrived.
    fn acquire(&self) -> impl Future<Output = Outcome<(Self::Held, Instant)>> + Send;

    /// Releases; an error if the permit was no longer held.
    fn release(&self, held: Self::Held) -> impl Future<Output = Outcome<()>> + Send;

    /// One trivial round trip, the baselines' unit: `GET /healthz`, or a Redis `PING`.
    fn trivial(&self) -> impl Future<Output = Outcome<()>> + Send;

    /// One pair of the throughput workload.
    fn pair(&self, phase: Phase) -> impl Future<Output = Outcome<()>> + Send {
        async move {
            match phase {
                Phase::Trivial => {
                    self.trivial().await?;
                    self.trivial().await
                }
                Phase::Floodgate => {
                    let (held, _) = self.acquire().await?;
                    self.release(held).await
                }
            }
        }
    }
}

/// Beyond the longest wait, how long a request may take before the run fails.
const REQUEST_SLACK: Duration = Duration::from_secs(30);

/// Most of an answer's body a failure message shows: enough for the JSON error's code and
/// message, not a whole page from whatever answered instead.
const SHOWN_BODY: usize = 300;

/// An answer's body as a failure message shows it: lossy UTF-8, cut at `SHOWN_BODY` chars.
fn shown_body(body: &[u8]) -> String {
    let text = String::from_utf8_lossy(body);
    match text.char_indices().nth(SHOWN_BODY) {
        Some((cut, _)) => format!("{}... ({} bytes)", &text[..cut], body.len()),
        None => text.into_owned(),
    }
}

/// One benchmark client over HTTP: its own connection pool (in practice one keep-alive
/// connection).
pub(super) struct HttpClient {
    pub(super) http: reqwest::Client,
    pub(super) auth: Option<HeaderValue>,
    pub(super) healthz: String,
    pub(super) acquire: String,
    pub(super) permits: String,
}

#[derive(Deserialize)]
pub(super) struct Acquired {
    pub(super) permit_id: String,
}

impl HttpClient {
    pub(super) fn new(base: &str, token: Option<&str>, limiter: &str) -> Result<Self, Failure> {
        let http = reqwest::Client::builder()
            .no_proxy()
            .tcp_nodelay(true)
            .connect_timeout(Duration::from_secs(5))
            // A stalled server fails the run instead of hanging it: the longest request is an
            // acquire's long poll of WAIT_MS, answered by then.
            .timeout(Duration::from_millis(WAIT_MS) + REQUEST_SLACK)
            .build()
            .map_err(|e| Failure {
                code: 1,
                message: format!("cannot build the HTTP client: {e}"),
            })?;
        let auth = match token {
            Some(t) => Some(
                HeaderValue::from_str(&format!("Bearer {t}"))
                    .map_err(|_| Failure::usage("--token: not a valid header value"))?,
            ),
            None => None,
        };
        Ok(HttpClient {
            http,
            auth,
            healthz: format!("{base}/healthz"),
            acquire: format!("{base}/v1/limiters/{limiter}/acquire"),
            permits: format!("{base}/v1/permits/"),
        })
    }

    /// Sends the request and reads the whole response; a non-2xx status is an error.
    pub(super) async fn send(&self, req: reqwest::RequestBuilder) -> Outcome<Bytes> {
        let req = match &self.auth {
            Some(auth) => req.header(AUTHORIZATION, auth.clone()),
            None => req,
        };
        let resp = req.send().await.map_err(|e| e.to_string())?;
        let status = resp.status();
        let body = resp.bytes().await.map_err(|e| e.to_string())?;
        if status.is_success() {
            Ok(body)
        } else {
            Err(format!("HTTP {}: {}", status.as_u16(), shown_body(&body)))
        }
    }

    pub(super) async fn healthz(&self) -> Outcome<()> {
        self.send(self.http.get(&self.healthz)).await.map(drop)
    }

    /// Acquires; returns the permit id and the moment the response had fully arrived.
    pub(super) async fn acquire(&self) -> Outcome<(String, Instant)> {
        let body = self
            .send(
                self.http
                    .post(&self.acquire)
                    .header(CONTENT_TYPE, "application/json")
                    .body(ACQUIRE_BODY),
            )
            .await?;
        let arrived = Instant::now();
        let acquired: Acquired =
            serde_json::from_slice(&body).map_err(|e| format!("acquire answer: {e}"))?;
        Ok((acquired.permit_id, arrived))
    }

    pub(super) async fn release(&self, permit_id: &str) -> Outcome<()> {
        let url = format!("{}{permit_id}/release", self.permits);
        let body = self.send(self.http.post(url)).await?;
        if body.windows(15).any(|w| w == b"\"released\":true") {
            Ok(())
        } else {
            Err(format!("release of {permit_id}: {}", shown_body(&body)))
        }
    }
}

impl BenchClient for HttpClient {
    type Held = String;

    async fn connect(target: &Target, limiter: &str, _second: bool) -> Result<Self, Failure> {
        match target {
            Target::Http { base, token, .. } => HttpClient::new(base, token.as_deref(), limiter),
            Target::Store(_) => Err(fail("an HTTP client of a store target".into())),
        }
    }

    async fn acquire(&self) -> Outcome<(String, Instant)> {
        HttpClient::acquire(self).await
    }

    async fn release(&self, permit_id: String) -> Outcome<()> {
        HttpClient::release(self, &permit_id).await
    }

    async fn trivial(&self) -> Outcome<()> {
        self.healthz().await
    }
}

/// One benchmark client on the library's Redis store, in this process.
pub(super) struct StoreClient {
    /// The limiter's handle (on one of the target's two store instances).
    limiter: Limiter<RedisLimiter>,
    /// A plain connection to the same Redis, for the baseline PINGs.
    redis: MultiplexedConnection,
}

impl BenchClient for StoreClient {
    type Held = Permit<RedisLimiter>;

    async fn connect(target: &Target, limiter: &str, second: bool) -> Result<Self, Failure> {
        let Target::Store(store) = target else {
            return Err(fail("a store client of an HTTP target".into()));
        };
        let gate = &store.gates[usize::from(second)];
        let handle = gate
            .limiter(limiter)
            .await
            .map_err(|e| fail(format!("limiter {limiter}: {e}")))?;
        Ok(StoreClient {
            limiter: handle,
            redis: store.redis.clone(),
        })
    }

    async fn acquire(&self) -> Outcome<(Permit<RedisLimiter>, Instant)> {
        let options = AcquireOptions::new()
            .lease(Duration::from_millis(LEASE_MS))
            .wait(Duration::from_millis(WAIT_MS));
        let permit = self
            .limiter
            .acquire(options)
            .await
            .map_err(|e| format!("acquire: {e}"))?;
        Ok((permit, Instant::now()))
    }

    async fn release(&self, permit: Permit<RedisLimiter>) -> Outcome<()> {
        let id = permit.id();
        match permit.release().await {
            Ok(true) => Ok(()),
            Ok(false) => Err(format!("release of {id}: no longer held")),
            Err(e) => Err(format!("release of {id}: {e}")),
        }
    }

    async fn trivial(&self) -> Outcome<()> {
        let mut conn = self.redis.clone();
        redis::cmd("PING")
            .query_async::<String>(&mut conn)
            .await
            .map(drop)
            .map_err(|e| format!("PING: {e}"))
    }
}
