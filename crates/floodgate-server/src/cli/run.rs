//! `floodgate run NAME [--wait 60s] [--lease 5m] [--permits N] [--holder LABEL] [--key KEY] -- COMMAND...`:
//! runs a command while holding a permit, like `flock` but shared by every machine that talks
//! to the same server.
//!
//! The permit is acquired first (waiting at most `--wait`); a wait that ends without one exits
//! 75 (EX_TEMPFAIL) without running anything, as does a grant whose lease has already ended
//! when it arrives (a lease shorter than the answer took): the permit is released and the
//! command does not run. The command then runs with inherited stdio and
//! `FLOODGATE_PERMIT_ID` / `FLOODGATE_FENCING_TOKEN` in its environment, while the lease is
//! extended every third of its length. SIGINT, SIGTERM and SIGHUP sent to `floodgate run` are
//! forwarded to the command's process group (one that arrives while waiting for the permit ends
//! the wait: exit 128 + N). The command runs in its own process group under a small watchdog
//! (`floodgate __watch`) that stops the group if `floodgate run` dies, even by SIGKILL. While the
//! server cannot be reached (or answers 503) the extend is retried and the command keeps
//! running. If the permit is lost (the server answers `permit_lost`, or the lease runs out
//! without a confirmed extend) the group gets SIGTERM, then SIGKILL after `--kill-after`, and
//! `floodgate run` exits 75 once it has stopped. Otherwise the permit is released once the command
//! has exited and so has everything it left running in its process group (`cmd &` in a script:
//! like flock's lock, held while children that inherited it live: the watchdog stays until
//! the group is empty, checking every 100 ms, so the lease is extended meanwhile, a loss stops
//! the group as above, and so does the death of `floodgate run`), and
//! `floodgate run` exits with the command's status (128 + N if signal N killed it; 127 if the
//! command is not found, 126 if it cannot be executed). A server that cannot be reached, or
//! answers 503, exits 69 before the command runs (connection errors are retried a few times
//! first, with the same `request_id`, so a retry never takes a second permit).
//!
//! Warnings go to stderr, and a closed stderr never changes what happens to the command.
//!
//! Like coreutils `timeout`, the command's own process group is not the terminal's foreground
//! group: Ctrl-C reaches it (forwarded), but a command that reads the terminal is stopped by
//! SIGTTIN. `floodgate run` is for batch work; run interactive programs some other way.

use std::ffi::OsString;
use std::os::unix::process::ExitStatusExt;
use std::process::{ExitStatus, Stdio};
use std::time::Duration;

use nix::sys::signal::Signal;
use tokio::process::{Child, Command};
use tokio::signal::unix::{signal, SignalKind};
use tokio::time::Instant;

use super::duration::parse_duration;
use super::watch::{self, exit_code, exit_code_for_signal, signal_group};
use super::{warn, Failure, ServerArgs, EXIT_TEMPFAIL, EXIT_UNAVAILABLE};
use crate::client::{new_request_id, AcquireArgs, Client, ClientError, ExtendArgs, PermitReply};
use crate::wire::millis;

/// Attempts at releasing the permit before giving up (its lease then bounds it).
const RELEASE_ATTEMPTS: u32 = 3;
/// First pause between retries of a failed extend or release; doubles each time.
const FIRST_BACKOFF: Duration = Duration::from_millis(100);
/// How long releasing may take, retries included, before it counts as failed.
const RELEASE_TIMEOUT: Duration = Duration::from_secs(5);
/// How much longer than the wait an acquire may take before the server counts as unreachable.
const ACQUIRE_GRACE: Duration = Duration::from_secs(10);
/// Attempts at an acquire that meets a connection error (same `request_id` each time) before
/// the server counts as unreachable.
const ACQUIRE_ATTEMPTS: u32 = 3;
/// What [`plus`] means by forever (about 30 years), for a duration too long to add.
const FAR_FUTURE: Duration = Duration::from_secs(86_400 * 365 * 30);

/// Flags of `floodgate run`.
#[derive(Debug, clap::Args)]
pub(crate) struct RunArgs {
    #[command(flatten)]
    server: ServerArgs,
    /// The limiter to take a permit from.
    name: String,
    /// Longest wait for a permit, e.g. 30s or 5m [default: the limiter's maximum wait].
    #[arg(long, value_parser = parse_duration, value_name = "DURATION")]
    wait: Option<Duration>,
    /// Lease of the permit, extended every third of it while the command runs
    /// [default: the limiter's lease].
    #[arg(long, value_parser = parse_duration, value_name = "DURATION")]
    lease: Option<Duration>,
    /// Permits to hold while the command runs.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..))]
    permits: u32,
    /// A label for the permit, shown by the server [default: HOST:PID].
    #[arg(long, value_name = "LABEL")]
    holder: Option<String>,
    /// The key to count against, for a keyed limiter (a tenant, an organization; see
    /// docs/keyed.md). Required by a keyed limiter, refused by a plain one.
    #[arg(long, value_name = "KEY")]
    key: Option<String>,
    /// Once the permit is lost the command's process group gets SIGTERM, then SIGKILL this
    /// much later if it has not exited (also when `floodgate run` itself dies).
    #[arg(long, value_parser = parse_duration, value_name = "DURATION", default_value = "10s")]
    kill_after: Duration,
    /// The command and its arguments, after `--`.
    #[arg(last = true, required = true, num_args = 1.., value_name = "COMMAND")]
    command: Vec<OsString>,
}

pub(crate) async fn run(args: RunArgs) -> Result<u8, Failure> {
    let client = args.server.client()?;
    let mut signals = Signals::new()?;

    let request = AcquireArgs {
        permits: Some(args.permits),
        lease_ms: args.lease.map(millis),
        wait_ms: args.wait.map(millis),
        holder: Some(args.holder.clone().unwrap_or_else(default_holder)),
        request_id: Some(new_request_id()),
        key: args.key.clone(),
    };
    // The first attempt's: a retried acquire may be answered with the grant an earlier attempt
    // got (its answer lost), whose lease started after this and not after the last attempt.
    let sent = Instant::now();
    let permit = tokio::select! {
        result = acquire(&client, &args, &request) => {
            result.map_err(|e| acquire_failure(&args, e))?
        }
        sig = signals.next() => {
            // Dropping the request closes the connection: the server takes it out of the queue.
            warn(&format!(
                "{} while waiting for a permit for {}; the command did not run",
                sig.as_str(),
                args.name
            ));
            return Ok(exit_code_for_signal(sig as i32));
        }
    };
    let received = Instant::now();
    let lease = Duration::from_millis(permit.lease_ms);
    // The server started the lease somewhere between our first request and its answer, and
    // not before it had waited `waited_ms`; take the earliest it can end. (A repeat's answer
    // says 0 waited and a lease no longer than the one granted: still the earliest.)
    let deadline = plus(
        plus(sent, Duration::from_millis(permit.waited_ms)).min(received),
        lease,
    );

    // A lease that has already ended (a lease shorter than the answer took to arrive) covers
    // nothing: the command would start without a permit.
    if !lease.is_zero() && Instant::now() >= deadline {
        // The server may still count it (this deadline is the earliest the lease can end).
        release(&client, &permit.permit_id, Gone::Expected).await;
        return Err(Failure {
            code: EXIT_TEMPFAIL,
            message: format!(
                "permit {}: its {} lease ended before the command could start (the answer took \
                 longer); the command did not run: use a longer --lease",
                permit.permit_id,
                human(lease)
            ),
        });
    }

    let mut child = match spawn(&args, &permit) {
        Ok(child) => child,
        Err(failure) => {
            if !lease.is_zero() {
                release(&client, &permit.permit_id, Gone::Unexpected).await;
            }
            return Err(failure);
        }
    };
    // The watchdog leads the command's process group: its pid is the group's id.
    let group = child.id().and_then(|id| i32::try_from(id).ok());

    let keep_alive = keep_alive(&client, &permit, args.key.as_deref(), lease, deadline);
    tokio::pin!(keep_alive);
    let mut lost = false;
    // When the grace after SIGTERM ends; `None` until the permit is lost or once SIGKILL went.
    let mut kill_at: Option<Instant> = None;
    let waited = loop {
        tokio::select! {
            status = child.wait() => break status,
            sig = signals.next() => send_signal(&child, sig),
            why = &mut keep_alive, if !lost => {
                lost = true;
                // The signal goes first: nothing about stderr may delay or prevent it.
                send_signal(&child, Signal::SIGTERM);
                kill_at = Some(plus(Instant::now(), args.kill_after));
                warn(&format!(
                    "permit {} lost ({why}); it no longer covers the command: sent it SIGTERM, \
                     SIGKILL in {} if it has not stopped",
                    permit.permit_id,
                    human(args.kill_after)
                ));
            }
            () = sleep_until_some(kill_at) => {
                kill_at = None;
                send_signal(&child, Signal::SIGKILL);
                warn(&format!(
                    "the command outlived the {} grace after SIGTERM: sent it SIGKILL",
                    human(args.kill_after)
                ));
            }
        }
    };
    if lost {
        // Anything left in the group (a background process that ignored SIGTERM) goes too:
        // the permit that covered it is gone.
        if let Some(group) = group {
            signal_group(group, Signal::SIGKILL);
        }
    }

    if lost {
        let how = match &waited {
            Ok(status) => describe(*status),
            Err(e) => format!("could not be waited for: {e}"),
        };
        return Err(Failure {
            code: EXIT_TEMPFAIL,
            message: format!(
                "permit {} was lost while the command ran; the command {how}",
                permit.permit_id
            ),
        });
    }
    if !lease.is_zero() {
        release(&client, &permit.permit_id, Gone::Unexpected).await;
    }
    match waited {
        Ok(status) => Ok(exit_code(status)),
        Err(e) => Err(Failure {
            code: 1,
            message: format!("cannot wait for the command: {e}"),
        }),
    }
}

/// SIGINT, SIGTERM and SIGHUP as a stream. Once listened for, they no longer end this process:
/// it forwards them and ends with the command (so the permit is released).
struct Signals {
    interrupt: tokio::signal::unix::Signal,
    terminate: tokio::signal::unix::Signal,
    hangup: tokio::signal::unix::Signal,
}

impl Signals {
    fn new() -> Result<Self, Failure> {
        let listen = |kind| {
            signal(kind).map_err(|e| Failure {
                code: 1,
                message: format!("cannot listen for signals: {e}"),
            })
        };
        Ok(Signals {
            interrupt: listen(SignalKind::interrupt())?,
            terminate: listen(SignalKind::terminate())?,
            hangup: listen(SignalKind::hangup())?,
        })
    }

    /// The next signal received.
    async fn next(&mut self) -> Signal {
        tokio::select! {
            Some(()) = self.interrupt.recv() => Signal::SIGINT,
            Some(()) = self.terminate.recv() => Signal::SIGTERM,
            Some(()) = self.hangup.recv() => Signal::SIGHUP,
            // Every stream closed: the runtime is going away, so no more signals come.
            else => std::future::pending().await,
        }
    }
}

/// Sends `sig` to the command's process group (the watchdog, which ignores it, the command and
/// whatever it started). A child whose status has been collected has no id any more, so this
/// never signals a recycled pid.
fn send_signal(child: &Child, sig: Signal) {
    if let Some(group) = child.id().and_then(|id| i32::try_from(id).ok()) {
        signal_group(group, sig);
    }
}

/// `after` past `at`; a duration too long to add to the clock (a flag's, or a lease the server
/// gave) is as good as forever.
fn plus(at: Instant, after: Duration) -> Instant {
    at.checked_add(after)
        .or_else(|| at.checked_add(FAR_FUTURE))
        .unwrap_or(at)
}

/// Sleeps until `at`, or forever when there is nothing to wait for.
async fn sleep_until_some(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// Starts the command under the watchdog, in a new process group (see [`watch`]).
fn spawn(args: &RunArgs, permit: &PermitReply) -> Result<Child, Failure> {
    if args.command.is_empty() {
        return Err(Failure::usage("no command given after --"));
    }
    let exe = std::env::current_exe().map_err(|e| Failure {
        code: 1,
        message: format!("cannot find the floodgate binary to start the watchdog: {e}"),
    })?;
    Command::new(exe)
        .arg(watch::SUBCOMMAND)
        .arg("--parent")
        .arg(std::process::id().to_string())
        .arg("--kill-after-ms")
        .arg(millis(args.kill_after).to_string())
        .arg("--")
        .args(&args.command)
        .env("FLOODGATE_PERMIT_ID", &permit.permit_id)
        .env("FLOODGATE_FENCING_TOKEN", permit.fencing_token.to_string())
        .stdin(Stdio::inherit())
        .stdout(Stdio::inherit())
        .stderr(Stdio::inherit())
        .process_group(0)
        .spawn()
        .map_err(|e| Failure {
            code: 1,
            message: format!("cannot start the watchdog: {e}"),
        })
}

/// Acquires, resending the same request (same `request_id`) after a connection error, a few
/// times with doubling pauses.
async fn acquire(
    client: &Client,
    args: &RunArgs,
    request: &AcquireArgs,
) -> Result<PermitReply, ClientError> {
    // The server answers within the wait (capped by the limiter); one that does not answer at
    // all must not hold us forever.
    let limit = args
        .wait
        .unwrap_or(floodgate::spec::MAX_WAIT)
        .saturating_add(ACQUIRE_GRACE);
    let mut backoff = FIRST_BACKOFF;
    let mut attempt = 1;
    loop {
        let sent = Instant::now();
        match answer_within(client, limit, client.acquire(&args.name, request)).await {
            // A server that took the whole limit to not answer is not asked again.
            Err(e @ ClientError::Connection { .. })
                if attempt < ACQUIRE_ATTEMPTS && sent.elapsed() < limit =>
            {
                warn(&format!(
                    "cannot acquire a permit for {} ({e}); retrying in {}",
                    args.name,
                    human(backoff)
                ));
                tokio::time::sleep(backoff).await;
                backoff *= 2;
                attempt += 1;
            }
            result => return result,
        }
    }
}

/// Extends the lease every `lease / 3` until the permit is lost; returns why it was.
///
/// A failed extend (the server unreachable, or answering an error other than `permit_lost`) is
/// retried with doubling pauses for as long as the lease lasts; once it has run out without a
/// successful extend the server has reclaimed the permit, and it counts as lost.
async fn keep_alive(
    client: &Client,
    permit: &PermitReply,
    key: Option<&str>,
    lease: Duration,
    deadline: Instant,
) -> String {
    if lease.is_zero() {
        // A grant without a lease (a rate-only limiter): nothing to keep alive.
        return std::future::pending().await;
    }
    let permit_id = permit.permit_id.as_str();
    let extend = ExtendArgs {
        lease_ms: Some(millis(lease)),
        permits: Some(permit.permits),
        key: key.map(str::to_owned),
    };
    let period = (lease / 3).max(Duration::from_millis(1));
    let mut deadline = deadline;
    // A third of the lease after it started, at the latest: a grant that reached us late (its
    // answer lost and asked for again) is extended at once.
    let started = deadline.checked_sub(lease).unwrap_or_else(Instant::now);
    let mut next = plus(Instant::now(), period).min(plus(started, period));
    loop {
        tokio::time::sleep_until(next).await;
        let mut backoff = FIRST_BACKOFF.min(period);
        // The last extend's failure, if it failed: why the lease ran out, once it has.
        let mut failed: Option<ClientError> = None;
        loop {
            let sent = Instant::now();
            // A server that accepts the connection but never answers must not outlast the
            // lease unnoticed.
            let limit = period
                .max(Duration::from_secs(1))
                .min(deadline.saturating_duration_since(sent));
            if limit.is_zero() {
                // No time left to ask in: the lease has ended, whatever the server's state.
                return match failed {
                    Some(e) => format!("the lease ran out while extending failed: {e}"),
                    None => format!(
                        "its {} lease ended before it could be extended",
                        human(lease)
                    ),
                };
            }
            match answer_within(client, limit, client.extend_with(permit_id, &extend)).await {
                Ok(_) => {
                    deadline = plus(sent, lease);
                    next = plus(sent, period);
                    break;
                }
                Err(e) if e.code() == Some("permit_lost") => return e.to_string(),
                Err(e) => {
                    let now = Instant::now();
                    if now >= deadline {
                        return format!("the lease ran out while extending failed: {e}");
                    }
                    let pause = backoff.min(deadline - now);
                    warn(&format!(
                        "cannot extend permit {permit_id} ({e}); retrying in {}",
                        human(pause)
                    ));
                    tokio::time::sleep(pause).await;
                    backoff = (backoff * 2).min(period);
                    failed = Some(e);
                }
            }
        }
    }
}

/// Whether a permit found gone on release is worth a warning.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Gone {
    /// Its lease may well have ended: say nothing.
    Expected,
    /// It should still be held: say that it was not.
    Unexpected,
}

/// Releases the permit, retrying a few times within [`RELEASE_TIMEOUT`]; a failure is reported,
/// not fatal: the lease bounds how long the permit stays out.
async fn release(client: &Client, permit_id: &str, gone: Gone) {
    let deadline = Instant::now() + RELEASE_TIMEOUT;
    let mut backoff = FIRST_BACKOFF;
    for attempt in 1..=RELEASE_ATTEMPTS {
        let limit = deadline.saturating_duration_since(Instant::now());
        match answer_within(client, limit, client.release(permit_id)).await {
            Ok(true) => return,
            Ok(false) if gone == Gone::Expected => return,
            Ok(false) => {
                warn(&format!(
                    "permit {permit_id} was no longer held when released (its lease had ended)"
                ));
                return;
            }
            Err(e)
                if attempt < RELEASE_ATTEMPTS
                    && retryable(&e)
                    && Instant::now() + backoff < deadline =>
            {
                tokio::time::sleep(backoff).await;
                backoff *= 2;
            }
            Err(e) => {
                warn(&format!(
                    "cannot release permit {permit_id} ({e}); it ends with its lease"
                ));
                return;
            }
        }
    }
}

/// The answer to `request`, or a connection error if none came within `limit`.
async fn answer_within<T>(
    client: &Client,
    limit: Duration,
    request: impl std::future::Future<Output = Result<T, ClientError>>,
) -> Result<T, ClientError> {
    tokio::time::timeout(limit, request)
        .await
        .unwrap_or_else(|_| {
            Err(ClientError::Connection {
                url: client.base().to_owned(),
                message: format!("no answer within {}", human(limit)),
            })
        })
}

/// Connection errors and 5xx answers may go away on their own.
fn retryable(e: &ClientError) -> bool {
    match e {
        ClientError::Connection { .. } => true,
        ClientError::Api { status, .. } => *status >= 500,
        ClientError::Settings { .. } => false,
    }
}

fn acquire_failure(args: &RunArgs, e: ClientError) -> Failure {
    let retry = |retry_after: &Option<Duration>| match retry_after {
        Some(d) => format!("retry after {} s", millis(*d).div_ceil(1000).max(1)),
        None => "retry later".to_owned(),
    };
    match &e {
        ClientError::Api {
            code, retry_after, ..
        } if code == "wait_timeout" => {
            let within = match args.wait {
                Some(wait) => human(wait),
                None => "the limiter's maximum wait".to_owned(),
            };
            Failure {
                code: EXIT_TEMPFAIL,
                message: format!(
                    "no permit for {} within {within}; {}",
                    args.name,
                    retry(retry_after)
                ),
            }
        }
        ClientError::Api {
            code, retry_after, ..
        } if code == "queue_full" => Failure {
            code: EXIT_TEMPFAIL,
            message: format!(
                "no permit for {}: its wait queue is full; {}",
                args.name,
                retry(retry_after)
            ),
        },
        ClientError::Api {
            code, retry_after, ..
        } if code == "too_many_keys" => Failure {
            code: EXIT_TEMPFAIL,
            message: format!(
                "no permit for {}: it already tracks its maximum of keys; {}",
                args.name,
                retry(retry_after)
            ),
        },
        _ => {
            // A 503 (`shutting_down`, `store_unavailable`) is the service being unavailable,
            // like a refused connection, not a failure of ours.
            let unavailable = matches!(&e, ClientError::Api { status: 503, .. });
            let mut failure = Failure::from(e);
            if unavailable {
                failure.code = EXIT_UNAVAILABLE;
            }
            failure.message = format!(
                "cannot acquire a permit for {}: {}",
                args.name, failure.message
            );
            failure
        }
    }
}

fn describe(status: ExitStatus) -> String {
    match (status.code(), status.signal()) {
        (Some(code), _) => format!("exited with status {code}"),
        (None, Some(sig)) => match Signal::try_from(sig) {
            Ok(s) => format!("was killed by {}", s.as_str()),
            Err(_) => format!("was killed by signal {sig}"),
        },
        (None, None) => format!("ended ({status})"),
    }
}

fn default_holder() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|h| h.trim().to_owned())
        .filter(|h| !h.is_empty())
        .or_else(|| std::env::var("HOSTNAME").ok())
        .unwrap_or_else(|| "localhost".to_owned());
    format!("{host}:{}", std::process::id())
}

/// `90s`, `5m`, `250ms`: a duration the way the flags take it.
fn human(d: Duration) -> String {
    let ms = millis(d);
    match ms {
        0 => "0s".to_owned(),
        _ if ms % 3_600_000 == 0 => format!("{}h", ms / 3_600_000),
        _ if ms % 60_000 == 0 => format!("{}m", ms / 60_000),
        _ if ms % 1000 == 0 => format!("{}s", ms / 1000),
        _ => format!("{ms}ms"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_print_as_the_flags_take_them() {
        assert_eq!(human(Duration::from_millis(200)), "200ms");
        assert_eq!(human(Duration::from_secs(90)), "90s");
        assert_eq!(human(Duration::from_secs(300)), "5m");
        assert_eq!(human(Duration::from_secs(7200)), "2h");
        assert_eq!(human(Duration::from_millis(1500)), "1500ms");
        assert_eq!(human(Duration::ZERO), "0s");
    }

    /// A lease that has ended by the time of the first extend is said to have ended: there is
    /// no time left to ask the server in, and nothing is sent (the address here is never
    /// reached). It once sent the extend with a 0 s timeout and blamed the connection ("cannot
    /// reach the server ... no answer within 0s").
    #[tokio::test]
    async fn an_ended_lease_is_not_blamed_on_the_connection() {
        let client = Client::new("http://127.0.0.1:9", None).expect("client");
        let permit = PermitReply {
            permit_id: "lim.1".to_owned(),
            fencing_token: 1,
            permits: 1,
            lease_ms: 30,
            waited_ms: 0,
        };
        let lease = Duration::from_millis(30);
        let why = keep_alive(&client, &permit, None, lease, Instant::now()).await;
        assert_eq!(why, "its 30ms lease ended before it could be extended");
    }

    #[test]
    fn statuses_map_to_exit_codes() {
        assert_eq!(exit_code(ExitStatus::from_raw(7 << 8)), 7);
        assert_eq!(exit_code(ExitStatus::from_raw(0)), 0);
        assert_eq!(exit_code(ExitStatus::from_raw(15)), 143);
        assert_eq!(exit_code(ExitStatus::from_raw(9)), 137);
    }
}
