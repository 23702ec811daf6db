//! A run's life: the limit across concurrent runs, exit codes, the wait timeout, bad flags,
//! the release after the command and the lease extended while it runs.

use std::time::Duration;

use floodgate::AcquireOptions;
use floodgate_server::client::Client;

use nix::errno::Errno;
use nix::sys::signal::kill;
use nix::unistd::Pid;

use crate::harness::{code, stderr, wait_for_file, wait_until, Scratch, TestServer, LIMITER};

/// Each run registers itself in `running/` with `mkdir` (atomic), logs how many runs it saw
/// there, holds on for a moment and leaves. If the limiter ever let more than its limit run
/// at once, some run would log a count above the limit.
const WITNESS: &str = r#"
set -e
mkdir "running/$FLOODGATE_FENCING_TOKEN"
n=$(ls running | wc -l)
echo $n >> counts
echo "$FLOODGATE_PERMIT_ID $FLOODGATE_FENCING_TOKEN" >> ran
sleep 0.2
rmdir "running/$FLOODGATE_FENCING_TOKEN"
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_runs_never_exceed_the_limit_and_all_run() {
    const LIMIT: u32 = 3;
    const RUNS: usize = 12;
    let server = TestServer::start(LIMIT).await;
    let scratch = Scratch::new("concurrent");
    std::fs::create_dir(scratch.file("running")).unwrap();

    let children: Vec<_> = (0..RUNS)
        .map(|_| {
            server
                .floodgate(
                    scratch.path(),
                    &["run", LIMITER, "--wait", "30s", "--", "sh", "-c", WITNESS],
                )
                .spawn()
                .unwrap()
        })
        .collect();
    for child in children {
        let output = child.wait_with_output().await.unwrap();
        assert_eq!(code(&output), 0, "a run failed: {}", stderr(&output));
    }

    let counts: Vec<u32> = scratch
        .read("counts")
        .lines()
        .map(|l| l.trim().parse().unwrap())
        .collect();
    assert_eq!(counts.len(), RUNS, "every command ran once: {counts:?}");
    let max = counts.iter().copied().max().unwrap();
    assert!(
        (1..=LIMIT).contains(&max),
        "{max} commands ran at once under a limit of {LIMIT}: {counts:?}"
    );

    // Each run saw its own permit: `lim.TOKEN` and TOKEN, distinct across runs.
    let ran = scratch.read("ran");
    let mut tokens: Vec<&str> = ran
        .lines()
        .map(|line| {
            let (id, token) = line.split_once(' ').unwrap();
            assert_eq!(id, format!("{LIMITER}.{token}"));
            token
        })
        .collect();
    tokens.sort_unstable();
    tokens.dedup();
    assert_eq!(tokens.len(), RUNS);
    assert!(std::fs::read_dir(scratch.file("running"))
        .unwrap()
        .next()
        .is_none());

    let status = server.status().await;
    assert_eq!(status.in_use, 0);
    assert_eq!(status.counters.granted, RUNS as u64);
    assert_eq!(status.counters.released, RUNS as u64);
    assert_eq!(status.counters.expired, 0);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_exit_status_passes_through() {
    let server = TestServer::start(1).await;
    let scratch = Scratch::new("status");
    let output = server
        .output(
            scratch.path(),
            &["run", LIMITER, "--", "sh", "-c", "exit 7"],
        )
        .await;
    assert_eq!(code(&output), 7, "{}", stderr(&output));
    let output = server
        .output(scratch.path(), &["run", LIMITER, "--", "true"])
        .await;
    assert_eq!(code(&output), 0, "{}", stderr(&output));
    assert_eq!(server.status().await.in_use, 0);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_command_killed_by_a_signal_exits_128_plus_the_signal() {
    let server = TestServer::start(1).await;
    let scratch = Scratch::new("killed");
    let output = server
        .output(
            scratch.path(),
            &["run", LIMITER, "--", "sh", "-c", "kill -KILL $$"],
        )
        .await;
    assert_eq!(code(&output), 128 + 9, "{}", stderr(&output));
    assert_eq!(server.status().await.in_use, 0);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wait_timeout_exits_75_without_running_the_command() {
    let server = TestServer::start(1).await;
    let scratch = Scratch::new("timeout");
    let limiter = server.gate.limiter(LIMITER).await.unwrap();
    let held = limiter.acquire(AcquireOptions::new()).await.unwrap();

    let output = server
        .output(
            scratch.path(),
            &[
                "run",
                LIMITER,
                "--wait",
                "200ms",
                "--",
                "sh",
                "-c",
                "touch ran",
            ],
        )
        .await;
    assert_eq!(code(&output), 75, "{}", stderr(&output));
    assert!(!scratch.file("ran").exists(), "the command ran anyway");
    let message = stderr(&output);
    assert!(
        message.contains("floodgate: no permit for lim within 200ms; retry after"),
        "{message}"
    );

    let status = server.status().await;
    assert_eq!(status.in_use, 1, "only the permit held here is out");
    assert_eq!(status.counters.timed_out, 1);
    assert!(held.release().await.unwrap());
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_flags_exit_2_without_acquiring() {
    let server = TestServer::start(1).await;
    let scratch = Scratch::new("flags");
    let cases: &[&[&str]] = &[
        &["run", LIMITER],
        &["run", LIMITER, "--"],
        &["run", LIMITER, "true"],
        &["run", LIMITER, "--wait", "nonsense", "--", "true"],
        &["run", LIMITER, "--lease", "5x", "--", "true"],
        &["run", LIMITER, "--permits", "0", "--", "true"],
        &["run", "--", "true"],
    ];
    for args in cases {
        let output = server.output(scratch.path(), args).await;
        assert_eq!(code(&output), 2, "{args:?}: {}", stderr(&output));
        assert!(!stderr(&output).is_empty(), "{args:?}: no message");
    }
    assert_eq!(server.status().await.counters.granted, 0);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_permit_is_released_after_the_command_exits() {
    let server = TestServer::start(1).await;
    let scratch = Scratch::new("release");
    let output = server
        .output(
            scratch.path(),
            &[
                "run",
                LIMITER,
                "--holder",
                "test-holder",
                "--",
                "sh",
                "-c",
                r#"echo "$FLOODGATE_PERMIT_ID" > permit; exit 3"#,
            ],
        )
        .await;
    assert_eq!(code(&output), 3, "{}", stderr(&output));
    assert!(scratch.read("permit").starts_with("lim."));

    let status = server.status().await;
    assert_eq!(status.in_use, 0);
    assert_eq!(status.counters.granted, 1);
    assert_eq!(status.counters.released, 1);
    assert_eq!(status.counters.expired, 0);
    // Releasing it again finds it gone: floodgate run released it, not the lease.
    let client = Client::new(&server.url, None).unwrap();
    assert!(!client.release(scratch.read("permit").trim()).await.unwrap());
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_command_exits_127_and_releases() {
    let server = TestServer::start(1).await;
    let scratch = Scratch::new("missing");
    let output = server
        .output(
            scratch.path(),
            &["run", LIMITER, "--", "/nonexistent/floodgate-test-command"],
        )
        .await;
    assert_eq!(code(&output), 127, "{}", stderr(&output));
    let status = server.status().await;
    assert_eq!(status.in_use, 0);
    assert_eq!(status.counters.released, 1);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_lease_is_extended_while_the_command_runs() {
    let server = TestServer::start(1).await;
    let scratch = Scratch::new("extend");
    // The command outlives its 3 s lease; extends every second keep the permit (a stall of
    // up to 2 s on a loaded machine is ridden out; 1.5 s extended every 0.5 s left 1 s).
    let output = server
        .output(
            scratch.path(),
            &["run", LIMITER, "--lease", "3s", "--", "sleep", "4.5"],
        )
        .await;
    assert_eq!(code(&output), 0, "{}", stderr(&output));
    let status = server.status().await;
    assert_eq!(status.in_use, 0);
    assert_eq!(status.counters.expired, 0, "the lease ran out");
    assert_eq!(status.counters.released, 1);
    server.stop().await;
}

/// Like flock's lock, which stays held while children that inherited it live, the permit
/// covers what the command left running in its process group (`cmd &`): it is kept until that
/// has exited. It was released as soon as the command itself exited, and a second run got the
/// permit while the first one's background work still ran.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_permit_is_kept_while_work_the_command_left_in_its_group_runs() {
    let server = TestServer::start(1).await;
    let scratch = Scratch::new("leftover");
    // The shell records its pid, and the background part its process group (the watchdog's
    // pid), then runs until the test creates `go`; the shell exits at once.
    let script = r#"echo $$ > sh.tmp && mv sh.tmp sh
(cut -d' ' -f5 /proc/self/stat > pgid.tmp && mv pgid.tmp pgid
while [ ! -e go ]; do sleep 0.05; done; touch bg-done) &
exit 0"#;
    let first = server
        .floodgate(scratch.path(), &["run", LIMITER, "--", "sh", "-c", script])
        .spawn()
        .unwrap();
    wait_for_file(&scratch.file("pgid")).await;
    let shell = Pid::from_raw(scratch.read("sh").trim().parse().unwrap());
    let watchdog = Pid::from_raw(scratch.read("pgid").trim().parse().unwrap());
    // The command has exited (and been collected), while the background part still runs; the
    // watchdog stays while it does, so floodgate run keeps the permit.
    wait_until(|| async { kill(shell, None) == Err(Errno::ESRCH) }).await;
    assert_eq!(
        kill(watchdog, None),
        Ok(()),
        "the watchdog left with the command"
    );
    let second = server
        .output(
            scratch.path(),
            &["run", LIMITER, "--wait", "0s", "--", "touch", "second"],
        )
        .await;
    assert_eq!(code(&second), 75, "{}", stderr(&second));
    assert!(!scratch.file("second").exists());
    assert_eq!(server.status().await.in_use, 1);

    std::fs::write(scratch.file("go"), "").unwrap();
    let output = first.wait_with_output().await.unwrap();
    assert_eq!(code(&output), 0, "{}", stderr(&output));
    assert!(scratch.file("bg-done").exists());
    let status = server.status().await;
    assert_eq!(status.in_use, 0);
    assert_eq!(status.counters.released, 1);
    server.stop().await;
}

/// A relay to `server` that passes every connection through, except that it holds the first
/// one's answer for `hold` and then drops the connection without passing it on: the server has
/// granted, and the client sees a broken connection and asks again.
async fn losing_the_first_answer(server: &str, hold: Duration) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let upstream = server.trim_start_matches("http://").to_owned();
    tokio::spawn(async move {
        let mut first = true;
        while let Ok((mut client, _)) = listener.accept().await {
            let mut backend = tokio::net::TcpStream::connect(&upstream).await.unwrap();
            let lose = std::mem::take(&mut first);
            tokio::spawn(async move {
                if !lose {
                    let _ = tokio::io::copy_bidirectional(&mut client, &mut backend).await;
                    return;
                }
                let (mut from_client, _to_client) = client.split();
                let (mut from_backend, mut to_backend) = backend.split();
                let mut sink = tokio::io::sink();
                let _ = tokio::time::timeout(hold, async {
                    tokio::join!(
                        tokio::io::copy(&mut from_client, &mut to_backend),
                        tokio::io::copy(&mut from_backend, &mut sink),
                    )
                })
                .await;
            });
        }
    });
    url
}

/// The lease of a grant whose answer was lost started at the first attempt, not at the retry
/// that was answered with it (the server answers a repeated `request_id` with the same grant):
/// `run` took the retry's send as the earliest start, so it extended a lease that the server
/// had already ended (the command was stopped, the permit reported lost, while another worker
/// could have been granted it). Here the first answer is held 4 s of a 6 s lease: counted from
/// the retry, the first extend (a third of the lease later) came after the server's deadline.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retried_acquire_counts_the_lease_from_the_first_attempt() {
    let server = TestServer::start(1).await;
    let scratch = Scratch::new("retried");
    let relay = losing_the_first_answer(&server.url, Duration::from_secs(4)).await;
    let output = server
        .floodgate(
            scratch.path(),
            &["run", LIMITER, "--lease", "6s", "--", "sleep", "3"],
        )
        .env("FLOODGATE_URL", &relay)
        .output()
        .await
        .unwrap();
    let err = stderr(&output);
    assert_eq!(code(&output), 0, "{err}");
    assert!(
        err.contains("retrying"),
        "the first answer was not lost: {err}"
    );
    let status = server.status().await;
    assert_eq!(status.counters.granted, 1, "the retry was granted anew");
    assert_eq!(status.counters.expired, 0, "the lease ran out: {err}");
    assert_eq!(status.counters.released, 1);
    server.stop().await;
}
