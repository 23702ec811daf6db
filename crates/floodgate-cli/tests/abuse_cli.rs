//! Bad config files and bad arguments, as a user gives them to the real `floodgate` binary:
//! each is refused with exit code 2 and a message naming the problem, never a panic (exit 101,
//! "panicked at") and never the exit code of an unreachable server (69) for what is plain bad
//! input. A property test throws generated argument vectors at a few subcommands.
//!
//! A limiter name that is a path (`x/../w`) once reached the server as `/v1/limiters/w` and
//! changed or deleted the limiter `w`; the last test proves it no longer does.

use std::io::Write;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use proptest::prelude::*;

/// Bound on one run of the binary (a bad input is refused at once; this only stops a hang).
const PATIENCE: Duration = Duration::from_secs(20);

/// A port nothing listens on (connections are refused at once).
const NOBODY: &str = "http://127.0.0.1:9";

/// Runs the binary with `args`; kills it and panics if it has not exited within `PATIENCE`.
fn floodgate(args: &[&str]) -> Output {
    floodgate_into(args, Stdio::piped())
}

/// [`floodgate`], its standard output going to `stdout`.
fn floodgate_into(args: &[&str], stdout: impl Into<Stdio>) -> Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_floodgate"))
        .args(args)
        .env_remove("FLOODGATE_URL")
        .env_remove("FLOODGATE_TOKEN")
        .env_remove("FLOODGATE_CONFIG")
        .stdin(Stdio::null())
        .stdout(stdout)
        .stderr(Stdio::piped())
        .spawn()
        .expect("the binary runs");
    let started = Instant::now();
    while child.try_wait().expect("wait").is_none() {
        if started.elapsed() > PATIENCE {
            let _ = child.kill();
            let out = child.wait_with_output().expect("output");
            panic!("floodgate {args:?} did not exit: {out:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    child.wait_with_output().expect("output")
}

/// Asserts exit code 2, no panic, and a stderr that names `problem`.
#[track_caller]
fn refused(out: &Output, problem: &str, what: &str) {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!stderr.contains("panicked at"), "{what}: a panic: {stderr}");
    assert_eq!(out.status.code(), Some(2), "{what}: {stderr}");
    assert!(
        stderr.contains(problem),
        "{what}: the message does not name {problem:?}: {stderr}"
    );
}

/// `floodgate serve --config FILE` with each bad file: exit 2 naming the problem, before
/// listening.
#[test]
fn bad_config_files_exit_2_naming_the_problem() {
    let dir = tempfile::tempdir().expect("tempdir");
    let long_name = "n".repeat(200);
    let cases: Vec<(String, &str)> = vec![
        ("listen = \"x".into(), "line 1"),
        ("lisen = \"x\"".into(), "lisen"),
        ("max_body_bytes = \"big\"".into(), "max_body_bytes"),
        ("max_body_bytes = -1".into(), "-1"),
        ("max_body_bytes = 18446744073709551616".into(), "18446744073709551616"),
        ("header_timeout_ms = 1.5".into(), "header_timeout_ms"),
        ("header_timeout_ms = 0".into(), "header_timeout"),
        ("body_timeout_ms = 0".into(), "body_timeout"),
        ("max_connections = 0".into(), "max_connections"),
        ("max_body_bytes = 0".into(), "max_body_bytes"),
        ("max_limiters = 0".into(), "max_limiters"),
        ("listen = \"nope\"".into(), "listen"),
        ("listen = \"127.0.0.1:99999\"".into(), "listen"),
        ("fsync = \"sometimes\"".into(), "sometimes"),
        ("on_store_failure = \"maybe\"".into(), "on_store_failure"),
        ("log_format = \"xml\"".into(), "log_format"),
        ("tls_cert = \"/etc/hostname\"".into(), "tls_key"),
        ("redis = \"http://x\"".into(), "redis"),
        ("redis = \"redis://[::1\"".into(), "redis"),
        ("redis = \"\"".into(), "redis"),
        ("[limiters.a]\nconcurrency = 1\n[limiters.a]\nconcurrency = 2".into(), "duplicate"),
        ("[limiters.a]\nconcurrency = 1\nconcurrency = 2".into(), "duplicate"),
        ("[limiters.\"a/b\"]\nconcurrency = 1".into(), "a/b"),
        ("[limiters.\"..\"]\nconcurrency = 1".into(), "\"..\""),
        ("[limiters.\"\"]\nconcurrency = 1".into(), "empty"),
        (format!("[limiters.{long_name}]\nconcurrency = 1"), "200 characters"),
        ("limiters = 5".into(), "limiters"),
        ("[limiters.a]\nconcurrency = -1".into(), "concurrency"),
        ("[limiters.a]\nconcurrency = 4294967296".into(), "concurrency"),
        ("[limiters.a]\nconcurrency = 0".into(), "concurrency"),
        ("[limiters.a]\nrate = { limit = 1, period_ms = 0 }".into(), "rate.period_ms"),
        ("[limiters.a]\nconcurrency = 1\nlease_ms = 18446744073709551615".into(), "lease_ms"),
        ("[limiters.a]\nconcurrency = 1\nmax_wait_ms = 18446744073709551615".into(), "max_wait_ms"),
        (
            "[limiters.a]\nconcurrency = 5\nadaptive = { min = 1, max = 10, decrease = nan }".into(),
            "adaptive.decrease",
        ),
        (
            "[limiters.a]\nconcurrency = 5\nadaptive = { algorithm = \"gradient\", min = 1, max = 10, tolerance = inf }".into(),
            "adaptive.tolerance",
        ),
        (
            "[limiters.a]\nconcurrency = 5\nadaptive = { algorithm = \"pid\", min = 1, max = 10 }".into(),
            "pid",
        ),
        ("[limiters.a]\nconcurrency = 1\nmax_keys = 5".into(), "max_keys"),
        ("[limiters.a]\nconcurrency = 1\nwat = 5".into(), "wat"),
        // Indices above are used below (c27): new cases go here.
        ("redis = \"redis+sentinel://h:1\"".into(), "master"),
        ("redis = \"redis+sentinel://h:x/m\"".into(), "\"h:x\""),
        ("learning_window_ms = 18446744073709551615".into(), "learning_window_ms"),
        ("learning_window_ms = 86400001".into(), "learning_window_ms"),
        // Settings that only mean something with another: refused, not ignored.
        ("fsync = \"always\"".into(), "fsync (config file): only with --data-dir"),
        ("snapshot_after_bytes = 1".into(), "snapshot_after_bytes (config file)"),
        ("redis_cluster = true".into(), "redis_cluster (config file): only with --redis"),
        ("redis_ca = \"/x.pem\"".into(), "redis_ca (config file): only with --redis"),
        ("allowed_hosts = [\"host:8750\"]".into(), "allowed_hosts: \"host:8750\""),
        ("allowed_hosts = \"a.internal\"".into(), "allowed_hosts"),
    ];
    for (i, (text, problem)) in cases.iter().enumerate() {
        let path = dir.path().join(format!("c{i}.toml"));
        std::fs::write(&path, text).expect("write");
        let path = path.to_str().expect("utf-8 path");
        // No --listen unless the file is about something else, so `listen` itself is tested.
        let out = if text.starts_with("listen") {
            floodgate(&["serve", "--config", path])
        } else {
            floodgate(&["serve", "--config", path, "--listen", "127.0.0.1:0"])
        };
        refused(&out, problem, text);
    }
    // Not a file, not UTF-8, missing.
    let binary = dir.path().join("binary.toml");
    std::fs::File::create(&binary)
        .and_then(|mut f| f.write_all(b"\xff\xfe\x00"))
        .expect("write");
    for (path, problem) in [
        (binary.to_str().expect("utf-8"), "UTF-8"),
        ("/nonexistent/floodgate.toml", "/nonexistent/floodgate.toml"),
        (dir.path().to_str().expect("utf-8"), "directory"),
    ] {
        let out = floodgate(&["serve", "--config", path, "--listen", "127.0.0.1:0"]);
        refused(&out, problem, path);
    }
    // A data directory that exists and is a file: a wrong argument (2), not a runtime failure.
    let not_a_dir = dir.path().join("not-a-dir");
    std::fs::write(&not_a_dir, b"x").expect("write");
    let out = floodgate(&[
        "serve",
        "--listen",
        "127.0.0.1:0",
        "--data-dir",
        not_a_dir.to_str().expect("utf-8"),
    ]);
    refused(&out, "is not a directory", "a data_dir that is a file");
    // The same checks apply to `limiter apply -f`.
    let bad = dir.path().join("c27.toml");
    let out = floodgate(&[
        "limiter",
        "apply",
        "-f",
        bad.to_str().expect("utf-8"),
        "--url",
        NOBODY,
    ]);
    refused(&out, "concurrency", "limiter apply of a bad file");
}

/// Bad flags and values of the client subcommands, `simulate` and the benches.
#[test]
fn bad_arguments_exit_2_naming_the_problem() {
    let cases: &[(&[&str], &str)] = &[
        // Found before the simulation runs, not after it.
        (&["simulate", "--svg", "/nonexistent/dir/x.svg"], "--svg"),
        // A directory that exists, given as the file: refused before the run, not after it.
        (&["simulate", "--svg", "."], "is a directory"),
        // A negative number is a value out of range, not a flag "-0".
        (&["simulate", "--crash-fraction", "-0.1"], "crash-fraction"),
        (&["simulate", "--orgs", "-1"], "'-1' for '--orgs"),
        // Each range error names the flag given, not another one checked with it (an
        // --adaptive-max of 0 was reported against `limit`).
        (
            &["simulate", "--adaptive-max", "0"],
            "adaptive-max: must be from 1",
        ),
        (
            &["simulate", "--adaptive-max", "1000001"],
            "adaptive-max: must be from 1",
        ),
        (&["simulate", "--limit", "0"], "limit: must be from 1"),
        (&["simulate", "--limit", "1000001"], "limit: must be from 1"),
        // A negative duration names its flag (it was "unexpected argument '-1'").
        (&["simulate", "--max-wait", "-1s"], "for '--max-wait"),
        (&["simulate", "--lease", "-5s"], "for '--lease"),
        (
            &["simulate", "--query-median", "-2s"],
            "for '--query-median",
        ),
        (
            &["simulate", "--capacity-change", "-1s:5"],
            "for '--capacity-change",
        ),
        // Either may be the one to change: both named.
        (
            &["simulate", "--adaptive-max", "10"],
            "limit/adaptive-max: the limit (50)",
        ),
        // Too large to hold: refused before anything is drawn.
        (
            &["simulate", "--orgs", "1000000", "--queries-per-org", "100"],
            "orgs",
        ),
        (
            &[
                "limiter",
                "set",
                "a",
                "--concurrency",
                "-1",
                "--url",
                NOBODY,
            ],
            "-1",
        ),
        (
            &[
                "limiter",
                "set",
                "a",
                "--concurrency",
                "4294967296",
                "--url",
                NOBODY,
            ],
            "4294967296",
        ),
        (
            &["limiter", "set", "a", "--rate", "abc", "--url", NOBODY],
            "abc",
        ),
        (
            &["limiter", "set", "a", "--rate", "1e400/1s", "--url", NOBODY],
            "1e400",
        ),
        (
            &["limiter", "set", "a", "--rate", "5/1x", "--url", NOBODY],
            "unknown unit",
        ),
        (
            &["limiter", "set", "a", "--burst", "5", "--url", NOBODY],
            "--rate",
        ),
        (
            &["limiter", "set", "a", "--adaptive", "x", "--url", NOBODY],
            "MIN:MAX",
        ),
        (
            &["limiter", "set", "a", "--lease", "5d", "--url", NOBODY],
            "unknown unit",
        ),
        (
            &[
                "limiter",
                "set",
                "a",
                "--concurrency",
                "1",
                "--url",
                "notaurl",
            ],
            "notaurl",
        ),
        (
            &[
                "limiter",
                "set",
                "a",
                "--concurrency",
                "1",
                "--url",
                "ftp://x",
            ],
            "ftp",
        ),
        (
            &[
                "limiter",
                "set",
                "a",
                "--concurrency",
                "1",
                "--url",
                "http://[::1",
            ],
            "http://[::1",
        ),
        (
            &[
                "limiter",
                "set",
                "..",
                "--concurrency",
                "1",
                "--url",
                NOBODY,
            ],
            "\"..\"",
        ),
        (
            &["limiter", "set", "", "--concurrency", "1", "--url", NOBODY],
            "name",
        ),
        (&["limiter", "delete", ".", "--url", NOBODY], "\".\""),
        (
            &[
                "limiter",
                "apply",
                "-f",
                "/nonexistent.toml",
                "--url",
                NOBODY,
            ],
            "/nonexistent.toml",
        ),
        (&["run", "a", "--url", NOBODY], "COMMAND"),
        (
            &["run", "a", "--wait", "-5s", "--url", NOBODY, "--", "true"],
            "-5",
        ),
        (
            &[
                "run", "a", "--wait", "1e400s", "--url", NOBODY, "--", "true",
            ],
            "1e400s",
        ),
        (
            &["run", "a", "--permits", "0", "--url", NOBODY, "--", "true"],
            "permits",
        ),
        (
            &[
                "run",
                "a",
                "--kill-after",
                "xyz",
                "--url",
                NOBODY,
                "--",
                "true",
            ],
            "xyz",
        ),
        (&["run", "..", "--url", NOBODY, "--", "true"], "\"..\""),
        (&["run", "a", "--url", "notaurl", "--", "true"], "notaurl"),
        (&["status", "--url", "notaurl"], "notaurl"),
        (&["status", "--format", "xml", "--url", NOBODY], "--format"),
        (&["simulate", "--seed", "-1"], "-1"),
        (&["simulate", "--workers", "0"], "workers"),
        (&["simulate", "--workers", "99999999999"], "99999999999"),
        (&["simulate", "--capacity-change", "90s:0"], "capacity"),
        (
            &["simulate", "--capacity-change", "nonsense"],
            "AT:CAPACITY",
        ),
        (&["simulate", "--scenario", "nope"], "nope"),
        (&["simulate", "--strategy", "nope"], "nope"),
        (&["bench", "--nonsense"], "--nonsense"),
        (&["bench-growth", "--nonsense"], "--nonsense"),
        (&["bench-durability", "--nonsense"], "--nonsense"),
        (&["dashboard-bench", "--nonsense"], "--nonsense"),
        (&["top", "--url", "notaurl", "--once"], "notaurl"),
        (
            &["serve", "--header-timeout", "0s", "--listen", "127.0.0.1:0"],
            "header_timeout",
        ),
        (
            &["serve", "--body-timeout", "0ms", "--listen", "127.0.0.1:0"],
            "body_timeout",
        ),
        (
            &["serve", "--max-connections", "0", "--listen", "127.0.0.1:0"],
            "max_connections",
        ),
        (
            &[
                "serve",
                "--allowed-host",
                "http://a",
                "--listen",
                "127.0.0.1:0",
            ],
            "allowed_hosts: \"http://a\"",
        ),
        (
            &["serve", "--redis", "http://x", "--listen", "127.0.0.1:0"],
            "redis",
        ),
        (
            &["serve", "--fsync", "sometimes", "--listen", "127.0.0.1:0"],
            "sometimes",
        ),
        (&["nonsense"], "nonsense"),
        (&["bench", "--url", "notaurl", "--seconds", "1"], "notaurl"),
        (
            &["bench", "--store", "http://x", "--seconds", "1"],
            "--store",
        ),
        (&["bench", "--clients", "0"], "--clients"),
        (&["bench", "--workloads", "nope"], "nope"),
        (&["bench", "--hold", "xyz"], "xyz"),
        (&["bench-growth", "--redis", "http://x"], "--redis"),
        (
            &["bench-growth", "--samples", "0", "--no-redis"],
            "--samples",
        ),
        (&["bench-durability", "--seconds", "0"], "--seconds"),
        (&["bench-durability", "--clients", "0"], "--clients"),
        (&["bench-durability", "--limiters", "0"], "--limiters"),
        (&["bench-durability", "--ops", "0"], "--ops"),
        (&["bench-durability", "--ops", "3"], "--ops"),
        (
            &["bench-durability", "--snapshot-after-bytes", "0"],
            "--snapshot-after-bytes",
        ),
        (
            &[
                "serve",
                "--redis",
                "redis+sentinel://h:1",
                "--listen",
                "127.0.0.1:0",
            ],
            "master",
        ),
        (
            &[
                "serve",
                "--redis",
                "redis+sentinel://u:pw@h/m",
                "--listen",
                "127.0.0.1:0",
            ],
            "HOST:PORT",
        ),
        (
            &[
                "serve",
                "--learning-window",
                "86400001",
                "--listen",
                "127.0.0.1:0",
            ],
            "--learning-window",
        ),
        (
            &["serve", "--fsync", "always", "--listen", "127.0.0.1:0"],
            "--fsync: only with --data-dir",
        ),
        (
            &[
                "serve",
                "--snapshot-after-bytes",
                "1",
                "--listen",
                "127.0.0.1:0",
            ],
            "--snapshot-after-bytes: only with --data-dir",
        ),
        (
            &["serve", "--redis-ca", "/x.pem", "--listen", "127.0.0.1:0"],
            "--redis-ca: only with --redis",
        ),
        (
            &[
                "serve",
                "--redis-cluster",
                "true",
                "--listen",
                "127.0.0.1:0",
            ],
            "--redis-cluster: only with --redis",
        ),
        (
            &["serve", "--redis-username", "u", "--listen", "127.0.0.1:0"],
            "--redis-username: only with --redis",
        ),
        (&["dashboard-bench", "--seconds", "0"], "--seconds"),
        (&["dashboard-bench", "--viewers", "0"], "--viewers"),
    ];
    for (args, problem) in cases {
        let out = floodgate(args);
        refused(&out, problem, &format!("{args:?}"));
    }
}

/// A duration too large for any clock (a bare number of seconds was once taken uncapped) is
/// refused naming its flag, never a panic when the program later adds it to the time: `run
/// --wait` panicked at once, `run --kill-after` once the permit was lost, `serve
/// --idle-timeout` in every kept-alive connection.
#[test]
fn huge_durations_exit_2_naming_the_flag() {
    const HUGE: &str = "18446744073709551615";
    let cases: &[(&[&str], &str)] = &[
        (
            &["run", "a", "--url", NOBODY, "--wait", HUGE, "--", "true"],
            "--wait",
        ),
        (
            &["run", "a", "--url", NOBODY, "--lease", HUGE, "--", "true"],
            "--lease",
        ),
        (
            &[
                "run",
                "a",
                "--url",
                NOBODY,
                "--kill-after",
                HUGE,
                "--",
                "true",
            ],
            "--kill-after",
        ),
        (
            &[
                "run",
                "a",
                "--url",
                NOBODY,
                "--wait",
                "1000000001",
                "--",
                "true",
            ],
            "--wait",
        ),
        (
            &["limiter", "set", "a", "--lease", HUGE, "--url", NOBODY],
            "--lease",
        ),
        (
            &["top", "--once", "--interval", HUGE, "--url", NOBODY],
            "--interval",
        ),
    ];
    let serve_flags = [
        "--idle-timeout",
        "--header-timeout",
        "--body-timeout",
        "--shutdown-grace",
    ];
    for (args, flag) in cases.iter().map(|(a, f)| (a.to_vec(), *f)).chain(
        serve_flags
            .iter()
            .map(|f| (vec!["serve", "--listen", "127.0.0.1:0", *f, HUGE], *f)),
    ) {
        let out = floodgate(&args);
        refused(&out, flag, &format!("{args:?}"));
        refused(&out, "too large", &format!("{args:?}"));
    }
}

/// A bad `--redis` URL is refused (exit 2) naming it, with its password hidden: the message
/// goes to terminals and logs.
#[test]
fn bad_redis_urls_are_named_without_their_password() {
    let urls = [
        "http://app:s3cret@h:6379",
        "redis://app:s3cret@[::1:6379",
        "redis://:s3cret@h:99999",
        "redis+sentinel://app:s3cret@h:x/m",
    ];
    for url in urls {
        let out = floodgate(&["serve", "--redis", url, "--listen", "127.0.0.1:0"]);
        refused(&out, "***", url);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            !stderr.contains("s3cret"),
            "{url}: the password shown: {stderr}"
        );
    }
}

/// TLS files for Redis that cannot be used are bad input (exit 2, naming the problem, before
/// any connection), not an unavailable store (69, as they were): with a plain `redis://` URL
/// (here one whose port is closed, so nothing is there to blame), a cluster node that is not
/// `rediss://`, a CA file that does not exist, a certificate without its key (from the file).
#[test]
fn unusable_redis_tls_files_exit_2_naming_the_problem() {
    let dir = tempfile::tempdir().expect("tempdir");
    let pem = dir.path().join("ca.pem");
    std::fs::write(&pem, "not checked before connecting\n").expect("write");
    let pem = pem.to_str().expect("utf-8 path");
    let missing = dir.path().join("missing.pem");
    let missing = missing.to_str().expect("utf-8 path");
    let cert_only = dir.path().join("cert-only.toml");
    std::fs::write(
        &cert_only,
        format!("redis = \"rediss://127.0.0.1:9\"\nredis_cert = {pem:?}\n"),
    )
    .expect("write");
    let cert_only = cert_only.to_str().expect("utf-8 path");
    let dir_path = dir.path().to_str().expect("utf-8 path");
    let cases: &[(&[&str], &str)] = &[
        (
            &["--redis", "redis://u:s3cret@127.0.0.1:9", "--redis-ca", pem],
            "needs a rediss:// URL, not redis://u:***@127.0.0.1:9",
        ),
        (
            &[
                "--redis",
                "rediss://127.0.0.1:9,redis://127.0.0.1:10",
                "--redis-ca",
                pem,
            ],
            "needs a rediss:// URL, not redis://127.0.0.1:10",
        ),
        (
            &["--redis", "rediss://127.0.0.1:9", "--redis-ca", missing],
            "CA file",
        ),
        (&["--config", cert_only], "go together"),
        // A directory opens, but cannot be read as the file the store reads at connect.
        (
            &["--redis", "rediss://127.0.0.1:9", "--redis-ca", dir_path],
            "CA file",
        ),
    ];
    for (args, problem) in cases {
        let mut all = vec!["serve", "--listen", "127.0.0.1:0"];
        all.extend_from_slice(args);
        let out = floodgate(&all);
        refused(&out, problem, &format!("{args:?}"));
    }
}

/// The client commands' server: a `--token` that cannot be a header value is bad input (exit
/// 2, naming the token, not showing it), not an unreachable server (69, as it was); a password
/// in `--url` is never shown, whatever the failure.
#[test]
fn a_bad_token_exits_2_and_a_password_in_the_url_is_not_shown() {
    let out = floodgate(&["status", "--url", NOBODY, "--token", "s3cret\n"]);
    refused(&out, "token", "a token with a newline");
    // So are a URL that is not http(s) and a CA file that cannot be read.
    let out = floodgate(&["status", "--url", "ftp://127.0.0.1:9"]);
    refused(&out, "URL", "an ftp:// URL");
    let out = floodgate(&[
        "status",
        "--url",
        NOBODY,
        "--ca-file",
        "/nonexistent/ca.pem",
    ]);
    refused(&out, "CA file", "a CA file that is not there");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!stderr.contains("s3cret"), "the token shown: {stderr}");
    let out = floodgate(&["status", "--url", "http://app:s3cret@127.0.0.1:9"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(69), "{stderr}");
    assert!(stderr.contains("127.0.0.1:9"), "{stderr}");
    assert!(!stderr.contains("s3cret"), "the password shown: {stderr}");
}

/// The measuring commands take only a direct Redis URL: a Sentinel URL (which `serve` takes)
/// is refused (exit 2) saying what they need, before any connection (nothing listens on these
/// hosts), with its password hidden.
#[test]
fn bench_commands_refuse_a_sentinel_url_saying_they_need_a_direct_one() {
    let sentinel = "redis+sentinel://app:s3cret@127.0.0.1:1/mymaster";
    let cases: [&[&str]; 4] = [
        &["bench", "--store", sentinel, "--seconds", "1"],
        &["bench-growth", "--redis", sentinel],
        &["bench", "--store", "http://127.0.0.1:1", "--seconds", "1"],
        &["bench-growth", "--redis", "redis://:s3cret@h:99999"],
    ];
    for args in cases {
        let out = floodgate(args);
        refused(
            &out,
            "needs a direct redis:// or rediss:// connection",
            &format!("{args:?}"),
        );
        refused(&out, args[1], &format!("{args:?}"));
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            !stderr.contains("s3cret"),
            "{args:?}: the password shown: {stderr}"
        );
    }
}

/// Values a user might type anywhere: numbers past every bound, units, paths, encodings.
fn token() -> impl Strategy<Value = String> {
    prop_oneof![
        Just("0".to_owned()),
        Just("-1".to_owned()),
        Just("4294967296".to_owned()),
        Just("18446744073709551616".to_owned()),
        Just("1e400".to_owned()),
        Just("1.5".to_owned()),
        Just("5/0s".to_owned()),
        Just("0/1s".to_owned()),
        Just("1:0".to_owned()),
        Just("99999999999h".to_owned()),
        Just("..".to_owned()),
        Just("x/../w".to_owned()),
        Just("%2e%2e".to_owned()),
        Just("".to_owned()),
        Just("é".to_owned()),
        Just("a\u{0}b".replace('\u{0}', "")),
        Just("--".to_owned()),
        "[a-z0-9:/._-]{0,12}",
    ]
}

fn flag() -> impl Strategy<Value = &'static str> {
    prop_oneof![
        Just("--concurrency"),
        Just("--rate"),
        Just("--burst"),
        Just("--adaptive"),
        Just("--lease"),
        Just("--max-wait"),
        Just("--max-queue"),
        Just("--wait"),
        Just("--permits"),
        Just("--key"),
        Just("--kill-after"),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    /// Generated `limiter set` and `status` argument vectors, against a port nobody listens
    /// on: never a panic; bad input exits 2 and anything that got as far as the network 69.
    #[test]
    fn generated_arguments_never_panic(
        sub in prop_oneof![Just("set"), Just("delete"), Just("status")],
        name in token(),
        pairs in proptest::collection::vec((flag(), token()), 0..4),
    ) {
        let mut args: Vec<String> = match sub {
            "status" => vec!["status".into(), name],
            other => vec!["limiter".into(), other.into(), name],
        };
        for (flag, value) in pairs {
            args.push(flag.to_owned());
            args.push(value);
        }
        args.extend(["--url".to_owned(), NOBODY.to_owned()]);
        let argv: Vec<&str> = args.iter().map(String::as_str).collect();
        let out = floodgate(&argv);
        let stderr = String::from_utf8_lossy(&out.stderr);
        prop_assert!(!stderr.contains("panicked at"), "{argv:?}: {stderr}");
        let code = out.status.code();
        prop_assert!(matches!(code, Some(0 | 2 | 69)), "{argv:?}: {code:?} {stderr}");
        if code == Some(2) {
            prop_assert!(!stderr.trim().is_empty(), "{argv:?}: exit 2 without a message");
        }
    }
}

/// A limiter name that is a path once resolved, in the URL, to another limiter: `limiter set
/// x/../w` changed `w` and `limiter delete zz/../w` deleted it. Now each name is one path
/// segment, refused by the server as a name (exit 2), and `w` is untouched.
/// The real server in process on `127.0.0.1:0` with limiter `w` (concurrency 3): its runtime
/// (dropping it stops the server), its URL and its shutdown trigger.
fn server() -> (
    tokio::runtime::Runtime,
    String,
    tokio::sync::oneshot::Sender<()>,
) {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let (addr, stop) = runtime.block_on(async {
        let gate = floodgate::Floodgate::in_memory();
        gate.define("w", floodgate::LimiterSpec::concurrency(3))
            .await
            .expect("define");
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        tokio::spawn(floodgate_server::server::run(
            listener,
            gate,
            floodgate_server::server::ServerOptions::default(),
            async move {
                let _ = rx.await;
            },
        ));
        (addr, tx)
    });
    (runtime, format!("http://{addr}"), stop)
}

#[test]
fn a_name_that_is_a_path_does_not_reach_another_limiter() {
    let (_runtime, url, stop) = server();
    for args in [
        vec!["limiter", "set", "x/../w", "--concurrency", "7"],
        vec!["limiter", "delete", "zz/../w"],
        vec!["limiter", "set", "x/%2e%2e/w", "--concurrency", "7"],
        vec!["limiter", "set", "x%2F..%2Fw", "--concurrency", "7"],
    ] {
        let mut argv = args.clone();
        argv.extend(["--url", &url]);
        let out = floodgate(&argv);
        refused(&out, "name", &format!("{argv:?}"));
    }
    let out = floodgate(&["status", "w", "--url", &url]);
    assert!(out.status.success(), "{out:?}");
    let text = String::from_utf8_lossy(&out.stdout);
    let limit = text
        .lines()
        .find_map(|l| l.strip_prefix("w "))
        .and_then(|l| l.split_whitespace().next());
    assert_eq!(limit, Some("3"), "w changed or vanished: {text}");
    let _ = stop.send(());
}

/// Values only the server can judge (ranges against the limiter's spec): refused with exit 2
/// naming the field, at once (no retry loop), and the limiter is unchanged.
#[test]
fn values_the_server_refuses_exit_2_at_once() {
    let (_runtime, url, stop) = server();
    let cases: &[(&[&str], &str)] = &[
        (&["run", "w", "--lease", "0s", "--", "true"], "lease_ms"),
        (&["run", "w", "--lease", "25h", "--", "true"], "lease_ms"),
        (
            &["run", "w", "--permits", "4294967295", "--", "true"],
            "permits",
        ),
        (&["run", "w", "--key", "org", "--", "true"], "key"),
        (&["run", "nope", "--", "true"], "nope"),
        (
            &["limiter", "set", "w", "--concurrency", "0"],
            "concurrency",
        ),
        (&["limiter", "set", "w", "--rate", "5/0s"], "rate.period_ms"),
        (&["limiter", "set", "w", "--adaptive", "5:1"], "adaptive"),
        (&["limiter", "set", "w", "--lease", "0s"], "lease_ms"),
        (
            &["limiter", "set", "w", "--max-queue", "4294967295"],
            "max_queue",
        ),
        (&["limiter", "set", "w", "--max-wait", "5h"], "max_wait_ms"),
        (&["status", "nope"], "nope"),
    ];
    for (args, problem) in cases {
        let mut argv = args.to_vec();
        // `--url` before `--` (after it, it would be the command's).
        let at = argv.iter().position(|a| *a == "--").unwrap_or(argv.len());
        argv.splice(at..at, ["--url", url.as_str()]);
        let out = floodgate(&argv);
        refused(&out, problem, &format!("{argv:?}"));
    }
    let out = floodgate(&["status", "w", "--url", &url]);
    let text = String::from_utf8_lossy(&out.stdout);
    let limit = text
        .lines()
        .find_map(|l| l.strip_prefix("w "))
        .and_then(|l| l.split_whitespace().next());
    assert_eq!(limit, Some("3"), "w changed: {text}");
    let _ = stop.send(());
}

/// Output into a pipe whose reader has gone (`floodgate status | true`): the command ends
/// quietly with exit code 0, as `print!` did not (it panicked, exit 101, "failed printing to
/// stdout"), and the change a `limiter set` made stays made.
#[test]
fn output_into_a_closed_pipe_ends_quietly() {
    let (_runtime, url, stop) = server();
    let dir = tempfile::tempdir().expect("tempdir");
    let config = dir.path().join("apply.toml");
    std::fs::write(&config, "[limiters.w]\nconcurrency = 3\n").expect("write");
    let config = config.to_str().expect("utf-8 path");
    let cases: &[&[&str]] = &[
        &["status", "--url", &url],
        &["status", "w", "--url", &url],
        &["top", "--once", "--url", &url],
        &["limiter", "set", "w", "--concurrency", "4", "--url", &url],
        &["limiter", "apply", "-f", config, "--dry-run", "--url", &url],
        &["simulate", "--orgs", "5", "--strategy", "floodgate"],
        &[
            "simulate",
            "--orgs",
            "5",
            "--strategy",
            "floodgate",
            "--json",
        ],
    ];
    for args in cases {
        // The pipe's reader is closed before the command starts: its first write fails.
        let (reader, writer) = std::io::pipe().expect("pipe");
        drop(reader);
        let out = floodgate_into(args, writer);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!stderr.contains("panicked"), "{args:?}: {stderr}");
        assert!(!stderr.contains("Broken pipe"), "{args:?}: {stderr}");
        assert_eq!(out.status.code(), Some(0), "{args:?}: {stderr}");
    }
    let out = floodgate(&["status", "w", "--url", &url]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.lines()
            .any(|l| l.starts_with("w ") && l.contains(" 4 ")),
        "the limit set into a closed pipe did not stay: {text}"
    );
    let _ = stop.send(());
}
