//! A small HTTP client for the `/v1` API, used by the CLI and `floodgate bench`. Every request
//! is bounded, so a server that accepts connections but never answers cannot hang a command.

use std::time::Duration;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::Value;

/// Bound on every request but a long-poll acquire.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// A long-poll acquire may take its whole wait; the server caps waits at an hour.
const ACQUIRE_SLACK: Duration = Duration::from_secs(15);
/// Most of a successful answer that is read: far above the largest listing (thousands of
/// limiters), so that something else answering at the URL with an endless body cannot take all
/// the memory before the timeout.
const MAX_ANSWER: usize = 256 << 20;
/// Most of an error answer that is read (the API's are one short line; a proxy's HTML page is
/// cut here).
const MAX_ERROR_ANSWER: usize = 64 << 10;
/// Most of an error answer that is not the API's JSON shown in its message.
const SHOWN_ERROR_CHARS: usize = 300;

/// An error from the server (a 4xx/5xx with the API's JSON body) or from the connection.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The server answered with an error.
    #[error("{code}: {message}")]
    Api {
        /// HTTP status.
        status: u16,
        /// The API's error code (`wait_timeout`, `unknown_limiter`, ...).
        code: String,
        /// The server's message.
        message: String,
        /// The retry hint, for 429s.
        retry_after: Option<Duration>,
    },
    /// The server could not be reached or answered something that is not the API.
    #[error("cannot reach the server at {url}: {message}")]
    Connection {
        /// The server's address.
        url: String,
        /// What went wrong.
        message: String,
    },
    /// The client's own settings cannot be used (a URL that is not http(s), a token that
    /// cannot be a header, an unreadable CA file): bad input, no request was sent.
    #[error("{message}")]
    Settings {
        /// What is wrong, naming the setting (`URL ...`, `token: ...`, `CA file ...`).
        message: String,
    },
}

impl ClientError {
    /// The API error code, if the server answered.
    pub fn code(&self) -> Option<&str> {
        match self {
            ClientError::Api { code, .. } => Some(code),
            ClientError::Connection { .. } | ClientError::Settings { .. } => None,
        }
    }
}

/// `text` as one URL path segment: every byte but the unreserved ones percent-encoded, so a
/// name like `x/../w` reaches the server as one (invalid) segment rather than being resolved by
/// the URL parser into another limiter's path (`/v1/limiters/w`). `.` and `..` (in any
/// encoding) are resolved by every URL parser, so they cannot be sent at all: refused here with
/// the answer the server gives a bad field (400 `invalid_request`, exit code 2).
pub(crate) fn segment(what: &str, text: &str) -> Result<String, ClientError> {
    if text.is_empty() || text == "." || text == ".." {
        return Err(ClientError::Api {
            status: 400,
            code: "invalid_request".to_owned(),
            message: format!("{what}: {text:?} cannot be sent as a URL path segment"),
            retry_after: None,
        });
    }
    let mut out = String::with_capacity(text.len());
    for b in text.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    Ok(out)
}

/// `base` with any `user:password@` removed: reqwest sends it as basic auth and leaves it out
/// of its own errors, and so do our messages. Unchanged when it does not parse.
fn without_password(base: &str) -> String {
    match reqwest::Url::parse(base) {
        Ok(mut url) if !url.username().is_empty() || url.password().is_some() => {
            let _ = url.set_username("");
            let _ = url.set_password(None);
            url.as_str().trim_end_matches('/').to_owned()
        }
        _ => base.to_owned(),
    }
}

/// The body, read up to `cap` bytes, and whether that was all of it.
async fn read_at_most(
    mut resp: reqwest::Response,
    cap: usize,
) -> Result<(Vec<u8>, bool), reqwest::Error> {
    let mut out = Vec::new();
    while let Some(chunk) = resp.chunk().await? {
        let room = cap - out.len();
        if chunk.len() > room {
            out.extend_from_slice(&chunk[..room]);
            return Ok((out, false));
        }
        out.extend_from_slice(&chunk);
    }
    Ok((out, true))
}

/// `text` without control characters, which a terminal would act on (escape sequences).
fn printable(text: &str) -> String {
    text.chars().filter(|c| !c.is_control()).collect()
}

/// The start of an error answer that is not the API's (a proxy's HTML page), on one line.
fn excerpt(bytes: &[u8]) -> String {
    let text = String::from_utf8_lossy(bytes);
    let line = printable(&text.split_whitespace().collect::<Vec<_>>().join(" "));
    if line.chars().count() > SHOWN_ERROR_CHARS {
        line.chars().take(SHOWN_ERROR_CHARS).collect::<String>() + "..."
    } else {
        line
    }
}

/// A granted permit, as the API returns it.
#[derive(Debug, Clone, Deserialize)]
pub struct PermitReply {
    /// Id for extend and release.
    pub permit_id: String,
    /// The fencing token.
    pub fencing_token: u64,
    /// Permits held.
    pub permits: u32,
    /// Lease granted, in milliseconds.
    pub lease_ms: u64,
    /// Time spent queued, in milliseconds.
    pub waited_ms: u64,
}

/// The body of an acquire.
#[derive(Debug, Clone, Default, Serialize)]
pub struct AcquireArgs {
    /// Permits to take (default 1).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub permits: Option<u32>,
    /// Lease in milliseconds.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub lease_ms: Option<u64>,
    /// Longest wait in milliseconds.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub wait_ms: Option<u64>,
    /// A label for introspection.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub holder: Option<String>,
    /// One id per logical acquire, reused when a connection error makes us send it again, so
    /// the server answers the retry with the same grant instead of a second permit.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub request_id: Option<String>,
    /// A keyed limiter's key (docs/keyed.md).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub key: Option<String>,
}

/// The body of an extend.
#[derive(Debug, Clone, Default, Serialize)]
pub struct ExtendArgs {
    /// The new lease in milliseconds (default: the limiter's lease).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub lease_ms: Option<u64>,
    /// The permit's size: lets a server that lost its state re-adopt the permit.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub permits: Option<u32>,
    /// A keyed limiter's permit's key: the re-adoption is then counted under it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub key: Option<String>,
}

/// A fresh random id for [`AcquireArgs::request_id`]: 32 hex digits.
///
/// Drawn from the standard library's randomly keyed SipHash (the keys come from the OS), over
/// the time, the process id and a counter, so ids differ across processes and machines
/// without a new dependency.
pub fn new_request_id() -> String {
    use std::hash::{BuildHasher, Hasher};
    use std::sync::atomic::{AtomicU64, Ordering};
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    let half = |salt: u64| {
        let mut h = std::collections::hash_map::RandomState::new().build_hasher();
        h.write_u64(salt);
        h.write_u64(n);
        h.write_u128(nanos);
        h.write_u32(std::process::id());
        h.finish()
    };
    format!("{:016x}{:016x}", half(1), half(2))
}

/// Talks to one Floodgate server.
#[derive(Clone)]
pub struct Client {
    /// The URL as given, for the requests.
    endpoint: String,
    /// `endpoint` without a `user:password@` part, for messages (stderr ends up in CI logs).
    shown: String,
    token: Option<String>,
    http: reqwest::Client,
}

// By hand: the derived one would print the token and any password in the URL.
impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("base", &self.shown)
            .field("token", &self.token.as_ref().map(|_| "<redacted>"))
            .finish_non_exhaustive()
    }
}

/// The answer of `GET /v1/limiters`.
#[derive(Debug, Deserialize)]
pub struct Listing {
    /// Every limiter, as `GET /v1/limiters/{name}` shows it.
    pub limiters: Vec<Value>,
    /// Whether the server allows changing limiters over the API (`None`: a server that does
    /// not say).
    #[serde(default)]
    pub api_writes: Option<bool>,
    /// The server's cap on limiters (`None`: none, or a server that does not say).
    #[serde(default)]
    pub max_limiters: Option<usize>,
}

impl Client {
    /// A client for the server at `base` (e.g. `http://127.0.0.1:8750`).
    pub fn new(base: &str, token: Option<String>) -> Result<Self, ClientError> {
        Client::with_ca_file(base, token, None)
    }

    /// A client that also trusts the CA certificates (PEM) in `ca_file`, for an `https://`
    /// server whose certificate is not signed by a CA the system trusts.
    pub fn with_ca_file(
        base: &str,
        token: Option<String>,
        ca_file: Option<&std::path::Path>,
    ) -> Result<Self, ClientError> {
        let base = base.trim_end_matches('/');
        let shown = without_password(base);
        let failed = |message: String| ClientError::Settings { message };
        // A base that is not an http(s) URL is bad input, not an unreachable server: said here
        // once (the CLI exits 2 on `Settings`) rather than as reqwest's "builder error" on
        // every request.
        match reqwest::Url::parse(base) {
            Ok(url) if matches!(url.scheme(), "http" | "https") && url.host().is_some() => {}
            Ok(url) => {
                return Err(failed(format!(
                    "URL {shown:?}: must be http:// or https:// with a host (got scheme {:?})",
                    url.scheme()
                )))
            }
            Err(e) => return Err(failed(format!("URL {shown:?}: {e}"))),
        }
        // Same for a token that cannot be a header value (a stray newline from a file): every
        // request would fail as "cannot reach the server". The token itself is not shown.
        if let Some(token) = &token {
            if reqwest::header::HeaderValue::from_str(&format!("Bearer {token}")).is_err() {
                return Err(failed(
                    "token: not a valid HTTP header value (a newline or other control \
                     character in it?)"
                        .to_owned(),
                ));
            }
        }
        // Redirects are not followed: the API never gives one, and a followed 301/302 turns a
        // POST (an acquire) into a bodiless GET, answered 405 by a server the user never named.
        let mut builder = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(5))
            .redirect(reqwest::redirect::Policy::none());
        if let Some(path) = ca_file {
            let pem = std::fs::read(path)
                .map_err(|e| failed(format!("CA file {}: {e}", path.display())))?;
            let certs = reqwest::Certificate::from_pem_bundle(&pem)
                .map_err(|e| failed(format!("CA file {}: {e}", path.display())))?;
            if certs.is_empty() {
                return Err(failed(format!(
                    "CA file {}: no CERTIFICATE in it",
                    path.display()
                )));
            }
            for cert in certs {
                builder = builder.add_root_certificate(cert);
            }
        }
        let http = builder.build().map_err(|e| ClientError::Connection {
            url: shown.clone(),
            message: e.to_string(),
        })?;
        Ok(Client {
            endpoint: base.to_owned(),
            shown,
            token,
            http,
        })
    }

    /// The server's address, as shown in messages (without a password it may carry).
    pub fn base(&self) -> &str {
        &self.shown
    }

    async fn call<T: DeserializeOwned>(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<&impl Serialize>,
    ) -> Result<T, ClientError> {
        self.call_within(method, path, body, REQUEST_TIMEOUT).await
    }

    /// Like `call`, with its own bound on the whole request (a long poll needs its wait).
    async fn call_within<T: DeserializeOwned>(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<&impl Serialize>,
        timeout: Duration,
    ) -> Result<T, ClientError> {
        let url = format!("{}{}", self.endpoint, path);
        let mut req = self.http.request(method, &url).timeout(timeout);
        if let Some(token) = &self.token {
            req = req.bearer_auth(token);
        }
        if let Some(body) = body {
            req = req.json(body);
        }
        let conn = |e: reqwest::Error| ClientError::Connection {
            url: self.shown.clone(),
            message: e.to_string(),
        };
        let resp = req.send().await.map_err(conn)?;
        let status = resp.status();
        if status.is_redirection() {
            let to = resp
                .headers()
                .get(reqwest::header::LOCATION)
                .and_then(|v| v.to_str().ok())
                .map_or_else(|| "elsewhere".to_owned(), printable);
            return Err(ClientError::Api {
                status: status.as_u16(),
                code: "redirect".to_owned(),
                message: format!(
                    "the server at {} redirects to {to}: the URL should name the Floodgate \
                     server itself",
                    self.shown
                ),
                retry_after: None,
            });
        }
        let cap = if status.is_success() {
            MAX_ANSWER
        } else {
            MAX_ERROR_ANSWER
        };
        let (bytes, whole) = read_at_most(resp, cap).await.map_err(conn)?;
        if status.is_success() {
            if !whole {
                return Err(ClientError::Connection {
                    url: self.shown.clone(),
                    message: format!("unexpected answer: longer than {cap} bytes"),
                });
            }
            return serde_json::from_slice(&bytes).map_err(|e| ClientError::Connection {
                url: self.shown.clone(),
                message: format!("unexpected answer: {e}"),
            });
        }
        let value: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
        let text = |k: &str| value.get(k).and_then(Value::as_str).map(printable);
        Err(ClientError::Api {
            status: status.as_u16(),
            code: text("error").unwrap_or_else(|| format!("http_{}", status.as_u16())),
            message: text("message").unwrap_or_else(|| excerpt(&bytes)),
            retry_after: value
                .get("retry_after_ms")
                .and_then(Value::as_u64)
                .map(Duration::from_millis),
        })
    }

    /// `GET /dashboard/api/overview`: every limiter with its rates of the last second (what
    /// the dashboard and `floodgate top` show).
    pub async fn overview(&self) -> Result<Value, ClientError> {
        self.call(reqwest::Method::GET, "/dashboard/api/overview", None::<&()>)
            .await
    }

    /// `POST /v1/limiters/{name}/acquire`.
    pub async fn acquire(
        &self,
        name: &str,
        args: &AcquireArgs,
    ) -> Result<PermitReply, ClientError> {
        // Without a wait the server uses the limiter's max_wait, at most an hour.
        let wait = args
            .wait_ms
            .map_or(Duration::from_secs(3600), Duration::from_millis);
        self.call_within(
            reqwest::Method::POST,
            &format!("/v1/limiters/{}/acquire", segment("name", name)?),
            Some(args),
            wait + ACQUIRE_SLACK,
        )
        .await
    }

    /// `POST /v1/permits/{id}/extend` (`None`: the limiter's lease); `Err(code
    /// "permit_lost")` when lost.
    pub async fn extend(
        &self,
        permit_id: &str,
        lease_ms: Option<u64>,
    ) -> Result<Value, ClientError> {
        // Through `ExtendArgs`, which leaves a `None` out: the API refuses `"lease_ms": null`.
        let args = ExtendArgs {
            lease_ms,
            ..ExtendArgs::default()
        };
        self.extend_with(permit_id, &args).await
    }

    /// `POST /v1/permits/{id}/extend` with every field of `args`.
    pub async fn extend_with(
        &self,
        permit_id: &str,
        args: &ExtendArgs,
    ) -> Result<Value, ClientError> {
        self.call(
            reqwest::Method::POST,
            &format!("/v1/permits/{}/extend", segment("permit_id", permit_id)?),
            Some(args),
        )
        .await
    }

    /// `POST /v1/permits/{id}/release`: whether it was still held.
    pub async fn release(&self, permit_id: &str) -> Result<bool, ClientError> {
        // As for the listing: an answer without `released` is not the API's.
        #[derive(Deserialize)]
        struct Released {
            released: bool,
        }
        let v: Released = self
            .call(
                reqwest::Method::POST,
                &format!("/v1/permits/{}/release", segment("permit_id", permit_id)?),
                None::<&()>,
            )
            .await?;
        Ok(v.released)
    }

    /// `GET /v1/limiters/{name}`.
    pub async fn limiter(&self, name: &str) -> Result<Value, ClientError> {
        self.call(
            reqwest::Method::GET,
            &format!("/v1/limiters/{}", segment("name", name)?),
            None::<&()>,
        )
        .await
    }

    /// `PUT /v1/limiters/{name}/keys/{key}`: one key's override of a keyed limiter.
    pub async fn put_key(&self, name: &str, key: &str, body: &Value) -> Result<Value, ClientError> {
        let (name, key) = (segment("name", name)?, segment("key", key)?);
        self.call(
            reqwest::Method::PUT,
            &format!("/v1/limiters/{name}/keys/{key}"),
            Some(body),
        )
        .await
    }

    /// `GET /v1/limiters`.
    pub async fn limiters(&self) -> Result<Vec<Value>, ClientError> {
        Ok(self.listing().await?.limiters)
    }

    /// `GET /v1/limiters` whole: the limiters and what the server says about changing them.
    pub async fn listing(&self) -> Result<Listing, ClientError> {
        // Read as a struct: a 200 without the list is not the API (another service at the
        // URL), not a server without limiters (it was shown as an empty table).
        self.call(reqwest::Method::GET, "/v1/limiters", None::<&()>)
            .await
    }

    /// `PUT /v1/limiters/{name}` with the given fields.
    pub async fn put_limiter(&self, name: &str, body: &Value) -> Result<Value, ClientError> {
        self.call(
            reqwest::Method::PUT,
            &format!("/v1/limiters/{}", segment("name", name)?),
            Some(body),
        )
        .await
    }

    /// `DELETE /v1/limiters/{name}`.
    pub async fn delete_limiter(&self, name: &str) -> Result<Value, ClientError> {
        self.call(
            reqwest::Method::DELETE,
            &format!("/v1/limiters/{}", segment("name", name)?),
            None::<&()>,
        )
        .await
    }
}
