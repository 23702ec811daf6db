//! `floodgate bench`: what a permit costs over HTTP, each number beside a baseline of trivial
//! requests measured against the same server in the same run.
//!
//! 1. Throughput: C clients loop acquire + release on a limiter with limit C (no contention);
//!    the baseline is the same C clients looping `GET /healthz` twice. The phases alternate
//!    (baseline, floodgate, baseline, floodgate, ...) and the median of each is reported, with
//!    the ratio floodgate / baseline.
//! 2. Handoff latency: on a limiter of limit 1, one client holds the permit and another is
//!    parked in a long-poll acquire; a handoff is timed from just before the holder's release is
//!    sent to the arrival of the waiter's acquire response. The baseline is a single
//!    `GET /healthz` round trip, timed on the holder's connection just before each release.
//!
//! Each client task has its own `reqwest::Client`, so its own keep-alive connection, and uses
//! it in both phases: the two sides of every comparison run over the same connections.

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use axum::body::Bytes;
use floodgate::Floodgate;
use reqwest::header::{HeaderValue, AUTHORIZATION, CONTENT_TYPE};
use serde::Deserialize;
use serde_json::{json, Value};
use tokio::sync::oneshot;

use super::status::print;
use super::Failure;
use crate::client::Client;
use crate::server::{self, ServerOptions};

/// The ratio of acquire+release pairs to trivial pairs this server aims for.
const TARGET_RATIO: f64 = 0.45;
/// Lease of the bench's permits: long enough never to expire during a run.
const LEASE_MS: u64 = 60_000;
/// Longest the parked waiter waits.
const WAIT_MS: u64 = 30_000;
/// Handoffs run (and not counted) before the timed ones.
const WARMUP_HANDOFFS: u32 = 20;
/// Body of every acquire.
const ACQUIRE_BODY: &str = r#"{"lease_ms":60000,"wait_ms":30000}"#;

/// Flags of `floodgate bench`.
#[derive(Debug, clap::Args)]
pub(crate) struct BenchArgs {
    /// The server's base URL. Without it, the bench starts an in-process server (embedded
    /// store) on 127.0.0.1:0 and stops it at the end.
    #[arg(long)]
    url: Option<String>,
    /// Bearer token, if the server requires one (an in-process server then requires it too).
    #[arg(long, env = "FLOODGATE_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// Concurrent HTTP clients in the throughput phases.
    #[arg(long, default_value_t = 32, value_parser = clap::value_parser!(u32).range(1..=10_000))]
    clients: u32,
    /// Seconds per throughput phase.
    #[arg(long, default_value_t = 3.0)]
    seconds: f64,
    /// Handoffs to time.
    #[arg(long, default_value_t = 500, value_parser = clap::value_parser!(u32).range(1..))]
    handoffs: u32,
    /// Rounds of (baseline, floodgate) throughput phases; the median of each is reported.
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u32).range(1..=100))]
    rounds: u32,
    /// Print the results as JSON.
    #[arg(long)]
    json: bool,
}

pub(crate) async fn bench(args: BenchArgs) -> Result<u8, Failure> {
    if !(args.seconds.is_finite() && args.seconds > 0.0 && args.seconds <= 3600.0) {
        return Err(Failure::usage(
            "--seconds: must be more than 0 and at most 3600",
        ));
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
    let control = Client::new(&base, args.token.clone())?;
    let stamp = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_micros());
    let prefix = format!("bench-{}-{stamp}", std::process::id());
    let names = Names {
        pairs: format!("{prefix}-pairs"),
        handoff: format!("{prefix}-handoff"),
    };
    let result = measure(&args, &base, &control, &names).await;
    // Clean up whatever happened; a failed delete only matters if the run succeeded.
    let mut cleanup = Ok(());
    for name in [&names.pairs, &names.handoff] {
        match control.delete_limiter(name).await {
            Ok(_) => {}
            Err(e) if e.code() == Some("unknown_limiter") => {}
            Err(e) => cleanup = Err(Failure::from(e)),
        }
    }
    drop(control);
    if let Some(server) = local {
        server.stop().await;
    }
    let report = result?;
    cleanup?;
    print(&if args.json {
        let mut text = serde_json::to_string_pretty(&report.to_json()).unwrap_or_default();
        text.push('\n');
        text
    } else {
        report.to_text()
    });
    Ok(0)
}

struct Names {
    pairs: String,
    handoff: String,
}

/// The in-process server.
struct LocalServer {
    base: String,
    stop: oneshot::Sender<()>,
    task: tokio::task::JoinHandle<std::io::Result<()>>,
}

impl LocalServer {
    async fn start(token: Option<String>) -> Result<Self, Failure> {
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

    async fn stop(self) {
        let _ = self.stop.send(());
        // Every client is dropped by now; the wait is only a guard against a stuck connection.
        let _ = tokio::time::timeout(Duration::from_secs(5), self.task).await;
    }
}

/// One benchmark client: its own connection pool (in practice one keep-alive connection).
struct Worker {
    http: reqwest::Client,
    auth: Option<HeaderValue>,
    healthz: String,
    acquire: String,
    permits: String,
}

#[derive(Deserialize)]
struct Acquired {
    permit_id: String,
}

type Outcome<T> = Result<T, String>;

impl Worker {
    fn new(base: &str, token: Option<&str>, limiter: &str) -> Result<Self, Failure> {
        let http = reqwest::Client::builder()
            .no_proxy()
            .tcp_nodelay(true)
            .connect_timeout(Duration::from_secs(5))
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
        Ok(Worker {
            http,
            auth,
            healthz: format!("{base}/healthz"),
            acquire: format!("{base}/v1/limiters/{limiter}/acquire"),
            permits: format!("{base}/v1/permits/"),
        })
    }

    /// Sends the request and reads the whole response; a non-2xx status is an error.
    async fn send(&self, req: reqwest::RequestBuilder) -> Outcome<Bytes> {
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
            Err(format!(
                "HTTP {}: {}",
                status.as_u16(),
                String::from_utf8_lossy(&body)
            ))
        }
    }

    async fn healthz(&self) -> Outcome<()> {
        self.send(self.http.get(&self.healthz)).await.map(drop)
    }

    /// Acquires; returns the permit id and the moment the response had fully arrived.
    async fn acquire(&self) -> Outcome<(String, Instant)> {
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

    async fn release(&self, permit_id: &str) -> Outcome<()> {
        let url = format!("{}{permit_id}/release", self.permits);
        let body = self.send(self.http.post(url)).await?;
        if body.windows(15).any(|w| w == b"\"released\":true") {
            Ok(())
        } else {
            Err(format!(
                "release of {permit_id}: {}",
                String::from_utf8_lossy(&body)
            ))
        }
    }

    async fn pair(&self, phase: Phase) -> Outcome<()> {
        match phase {
            Phase::Trivial => {
                self.healthz().await?;
                self.healthz().await
            }
            Phase::Floodgate => {
                let (permit, _) = self.acquire().await?;
                self.release(&permit).await
            }
        }
    }
}

#[derive(Debug, Clone, Copy)]
enum Phase {
    /// Two `GET /healthz`.
    Trivial,
    /// Acquire then release.
    Floodgate,
}

/// Runs `phase` on every worker until `length` has passed; pairs per second.
async fn throughput(workers: &[Arc<Worker>], phase: Phase, length: Duration) -> Outcome<f64> {
    let start = Instant::now();
    let deadline = start + length;
    let tasks: Vec<_> = workers
        .iter()
        .map(|w| {
            let w = Arc::clone(w);
            tokio::spawn(async move {
                let mut pairs = 0u64;
                // At least one pair each, so a zero-length run warms every connection up.
                loop {
                    w.pair(phase).await?;
                    pairs += 1;
                    if Instant::now() >= deadline {
                        break;
                    }
                }
                Outcome::Ok(pairs)
            })
        })
        .collect();
    let mut total = 0u64;
    let mut failure = None;
    for task in tasks {
        match task.await {
            Ok(Ok(n)) => total += n,
            Ok(Err(e)) => failure = Some(e),
            Err(e) => failure = Some(e.to_string()),
        }
    }
    if let Some(e) = failure {
        return Err(e);
    }
    // Each task finishes the pair it started before the deadline: count that tail in the time.
    Ok(total as f64 / start.elapsed().as_secs_f64())
}

/// Latency samples of the handoff phase.
struct HandoffSamples {
    handoff: Vec<Duration>,
    trivial: Vec<Duration>,
    release: Vec<Duration>,
}

async fn handoffs(
    a: Arc<Worker>,
    b: Arc<Worker>,
    control: &Client,
    limiter: &str,
    count: u32,
) -> Result<HandoffSamples, Failure> {
    let fail = |message: String| Failure { code: 1, message };
    let mut samples = HandoffSamples {
        handoff: Vec::with_capacity(count as usize),
        trivial: Vec::with_capacity(count as usize),
        release: Vec::with_capacity(count as usize),
    };
    let (mut holder, mut waiter) = (a, b);
    let (mut permit, _) = holder.acquire().await.map_err(fail)?;
    for i in 0..WARMUP_HANDOFFS + count {
        let parked = Arc::clone(&waiter);
        let waiting = tokio::spawn(async move { parked.acquire().await });
        // Wait until the server has queued the waiter.
        loop {
            let status = control.limiter(limiter).await?;
            if status.get("waiting").and_then(Value::as_u64).unwrap_or(0) >= 1 {
                break;
            }
            if waiting.is_finished() {
                return Err(fail(
                    "the waiter was answered while the permit was held".into(),
                ));
            }
            tokio::time::sleep(Duration::from_micros(200)).await;
        }
        // Baseline: one trivial round trip on the connection the release is about to use.
        let t = Instant::now();
        holder.healthz().await.map_err(fail)?;
        let trivial = t.elapsed();
        let sent = Instant::now();
        holder.release(&permit).await.map_err(fail)?;
        let released = sent.elapsed();
        let (next, arrived) = waiting
            .await
            .map_err(|e| fail(e.to_string()))?
            .map_err(fail)?;
        if i >= WARMUP_HANDOFFS {
            samples
                .handoff
                .push(arrived.saturating_duration_since(sent));
            samples.trivial.push(trivial);
            samples.release.push(released);
        }
        permit = next;
        std::mem::swap(&mut holder, &mut waiter);
    }
    holder.release(&permit).await.map_err(fail)?;
    Ok(samples)
}

async fn measure(
    args: &BenchArgs,
    base: &str,
    control: &Client,
    names: &Names,
) -> Result<Report, Failure> {
    let fail = |message: String| Failure { code: 1, message };
    control
        .put_limiter(
            &names.pairs,
            &json!({ "concurrency": args.clients, "lease_ms": LEASE_MS, "max_wait_ms": WAIT_MS }),
        )
        .await?;
    control
        .put_limiter(
            &names.handoff,
            &json!({ "concurrency": 1, "lease_ms": LEASE_MS, "max_wait_ms": WAIT_MS }),
        )
        .await?;
    let workers = (0..args.clients)
        .map(|_| Worker::new(base, args.token.as_deref(), &names.pairs).map(Arc::new))
        .collect::<Result<Vec<_>, _>>()?;
    // Warm up: open every connection and run each kind of pair once on it.
    for phase in [Phase::Trivial, Phase::Floodgate] {
        throughput(&workers, phase, Duration::ZERO)
            .await
            .map_err(fail)?;
    }
    let length = Duration::from_secs_f64(args.seconds);
    let mut trivial = Vec::new();
    let mut floodgate = Vec::new();
    for _ in 0..args.rounds {
        trivial.push(
            throughput(&workers, Phase::Trivial, length)
                .await
                .map_err(fail)?,
        );
        floodgate.push(
            throughput(&workers, Phase::Floodgate, length)
                .await
                .map_err(fail)?,
        );
    }
    drop(workers);
    let a = Worker::new(base, args.token.as_deref(), &names.handoff)?;
    let b = Worker::new(base, args.token.as_deref(), &names.handoff)?;
    let samples = handoffs(
        Arc::new(a),
        Arc::new(b),
        control,
        &names.handoff,
        args.handoffs,
    )
    .await?;
    Ok(Report {
        base: base.to_owned(),
        in_process: args.url.is_none(),
        clients: args.clients,
        seconds: args.seconds,
        handoffs: args.handoffs,
        trivial_pairs: Rates::new(trivial),
        floodgate_pairs: Rates::new(floodgate),
        handoff: Latency::new(samples.handoff),
        trivial_rtt: Latency::new(samples.trivial),
        release_rtt: Latency::new(samples.release),
    })
}

/// The rates of one kind of phase, one per round.
struct Rates {
    rounds: Vec<f64>,
    median: f64,
}

impl Rates {
    fn new(rounds: Vec<f64>) -> Self {
        let mut sorted = rounds.clone();
        sorted.sort_by(f64::total_cmp);
        let n = sorted.len();
        let median = match n {
            0 => 0.0,
            _ if n % 2 == 1 => sorted[n / 2],
            _ => (sorted[n / 2 - 1] + sorted[n / 2]) / 2.0,
        };
        Rates { rounds, median }
    }
}

/// p50 and p99 of some latencies, in microseconds.
struct Latency {
    p50_us: f64,
    p99_us: f64,
}

impl Latency {
    fn new(mut samples: Vec<Duration>) -> Self {
        samples.sort_unstable();
        // Nearest rank: the smallest sample with at least p of all samples at or below it.
        let rank = |p: f64| -> f64 {
            if samples.is_empty() {
                return 0.0;
            }
            let index = ((p * samples.len() as f64).ceil() as usize).clamp(1, samples.len()) - 1;
            samples[index].as_secs_f64() * 1e6
        };
        Latency {
            p50_us: rank(0.50),
            p99_us: rank(0.99),
        }
    }

    fn to_json(&self) -> Value {
        json!({ "p50_us": round1(self.p50_us), "p99_us": round1(self.p99_us) })
    }
}

fn round1(x: f64) -> f64 {
    (x * 10.0).round() / 10.0
}

struct Report {
    base: String,
    in_process: bool,
    clients: u32,
    seconds: f64,
    handoffs: u32,
    trivial_pairs: Rates,
    floodgate_pairs: Rates,
    handoff: Latency,
    trivial_rtt: Latency,
    release_rtt: Latency,
}

impl Report {
    fn ratio(&self) -> f64 {
        if self.trivial_pairs.median > 0.0 {
            self.floodgate_pairs.median / self.trivial_pairs.median
        } else {
            0.0
        }
    }

    fn to_json(&self) -> Value {
        let rates = |r: &Rates| {
            json!({
                "median": round1(r.median),
                "rounds": r.rounds.iter().copied().map(round1).collect::<Vec<_>>(),
            })
        };
        json!({
            "server": self.base,
            "in_process": self.in_process,
            "clients": self.clients,
            "seconds_per_phase": self.seconds,
            "throughput": {
                "trivial_pairs_per_sec": rates(&self.trivial_pairs),
                "acquire_release_pairs_per_sec": rates(&self.floodgate_pairs),
                "ratio": (self.ratio() * 1000.0).round() / 1000.0,
                "target_ratio": TARGET_RATIO,
            },
            "latency": {
                "handoffs": self.handoffs,
                "handoff": self.handoff.to_json(),
                "trivial_round_trip": self.trivial_rtt.to_json(),
                "release_round_trip": self.release_rtt.to_json(),
            },
        })
    }

    fn to_text(&self) -> String {
        let rounds = |r: &Rates| {
            r.rounds
                .iter()
                .map(|x| format!("{x:.0}"))
                .collect::<Vec<_>>()
                .join(", ")
        };
        let ratio = self.ratio();
        let verdict = if ratio >= TARGET_RATIO {
            "meets"
        } else {
            "below"
        };
        let mut out = String::new();
        out.push_str(&format!(
            "server {}{}; {} clients, {} s per phase, {} rounds\n\n",
            self.base,
            if self.in_process { " (in-process)" } else { "" },
            self.clients,
            self.seconds,
            self.trivial_pairs.rounds.len(),
        ));
        out.push_str("throughput (pairs/s, median of rounds)\n");
        out.push_str(&format!(
            "  trivial pairs (GET /healthz x2)  {:>10.0}   [{}]\n",
            self.trivial_pairs.median,
            rounds(&self.trivial_pairs)
        ));
        out.push_str(&format!(
            "  acquire + release pairs          {:>10.0}   [{}]\n",
            self.floodgate_pairs.median,
            rounds(&self.floodgate_pairs)
        ));
        out.push_str(&format!(
            "  ratio                            {ratio:>10.3}   ({verdict} the target {TARGET_RATIO})\n\n"
        ));
        out.push_str(&format!(
            "latency ({} handoffs, limit 1)             p50 us     p99 us\n",
            self.handoffs
        ));
        for (label, l) in [
            ("handoff (release sent -> waiter answered)", &self.handoff),
            ("trivial round trip (GET /healthz)", &self.trivial_rtt),
            ("release round trip", &self.release_rtt),
        ] {
            out.push_str(&format!(
                "  {label:<41} {:>8.1} {:>10.1}\n",
                l.p50_us, l.p99_us
            ));
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_are_nearest_rank() {
        let samples: Vec<Duration> = (1..=100).map(Duration::from_micros).collect();
        let l = Latency::new(samples.into_iter().rev().collect());
        assert!((l.p50_us - 50.0).abs() < 1e-6);
        assert!((l.p99_us - 99.0).abs() < 1e-6);
        let one = Latency::new(vec![Duration::from_micros(7)]);
        assert!((one.p50_us - 7.0).abs() < 1e-6 && (one.p99_us - 7.0).abs() < 1e-6);
        let none = Latency::new(Vec::new());
        assert!(none.p50_us == 0.0 && none.p99_us == 0.0);
    }

    #[test]
    fn median_of_rounds() {
        assert!((Rates::new(vec![3.0, 1.0, 2.0]).median - 2.0).abs() < 1e-9);
        assert!((Rates::new(vec![4.0, 1.0]).median - 2.5).abs() < 1e-9);
    }

    /// A tiny run against the in-process server: every phase completes and the bench's
    /// limiters are gone afterwards. No assertion on any timing.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_short_run_completes_and_cleans_up() -> Result<(), String> {
        let server = LocalServer::start(Some("secret".into()))
            .await
            .map_err(|f| f.message)?;
        let args = BenchArgs {
            url: Some(server.base.clone()),
            token: Some("secret".into()),
            clients: 3,
            seconds: 0.05,
            handoffs: 5,
            rounds: 2,
            json: true,
        };
        let control = Client::new(&server.base, args.token.clone()).map_err(|e| e.to_string())?;
        let names = Names {
            pairs: "bench-test-pairs".into(),
            handoff: "bench-test-handoff".into(),
        };
        let report = measure(&args, &server.base, &control, &names)
            .await
            .map_err(|f| f.message)?;
        assert_eq!(report.trivial_pairs.rounds.len(), 2);
        assert_eq!(report.floodgate_pairs.rounds.len(), 2);
        assert!(report.trivial_pairs.median > 0.0 && report.floodgate_pairs.median > 0.0);
        assert!(report.handoff.p50_us > 0.0 && report.trivial_rtt.p50_us > 0.0);
        assert!(report.to_json()["throughput"]["ratio"].is_number());
        assert!(report.to_text().contains("ratio"));
        // Every permit was released: both limiters are idle.
        for name in [&names.pairs, &names.handoff] {
            let status = control.limiter(name).await.map_err(|e| e.to_string())?;
            assert_eq!(status["in_use"], 0, "{status}");
            assert_eq!(status["waiting"], 0, "{status}");
        }
        drop(control);
        server.stop().await;
        Ok(())
    }
}
