//! HTTPS end to end: a real `floodgate serve --tls-cert --tls-key` process with certificates
//! the test makes with openssl; curl with the CA, the `floodgate` CLI (`--ca-file`,
//! `FLOODGATE_CA_FILE`), the Python client (`ca_file=`), and a certificate replaced on disk
//! picked up by the running server; and `serve` talking to a real TLS `redis-server` as an ACL
//! user whose password comes from the environment.

#![allow(clippy::unwrap_used)]

mod proc;
#[path = "../../floodgate/tests/support/mod.rs"]
mod support;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use proc::ServeProcess;
use support::certs;

fn scratch(test: &str) -> PathBuf {
    let dir =
        Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("tls-{test}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// `curl -sS --cacert CA URL/healthz`.
fn curl(url: &str, ca: &Path) -> Output {
    Command::new("curl")
        .args(["-sS", "--max-time", "10", "--cacert"])
        .arg(ca)
        .arg(format!("{url}/healthz"))
        .output()
        .expect("curl")
}

fn floodgate(args: &[&str], env: &[(&str, &Path)]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_floodgate"));
    cmd.args(args)
        .env_remove("FLOODGATE_CA_FILE")
        .env_remove("FLOODGATE_TOKEN");
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.output().unwrap()
}

/// The Python client (from this checkout) against `url`: `Floodgate(url, ca_file=CA)` with
/// an acquire and a release, or `from_env()` when `ca` is `None` (FLOODGATE_CA_FILE set).
fn python(url: &str, ca: &Path, from_env: bool) -> Output {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../clients/python/src");
    let script = if from_env {
        "from floodgate import Floodgate\nfg = Floodgate.from_env()\n"
    } else {
        "import sys\nfrom floodgate import Floodgate\nfg = Floodgate(sys.argv[1], ca_file=sys.argv[2])\n"
    };
    let script = format!(
        "{script}with fg.permit('tls', wait=5) as p:\n    print('held', p.permit_id)\nprint('limit', fg.limiter('tls')['limit'])\n"
    );
    Command::new("python3")
        .args(["-c", &script, url])
        .arg(ca)
        .env("PYTHONPATH", src)
        .env("FLOODGATE_URL", url)
        .env("FLOODGATE_CA_FILE", ca)
        .output()
        .expect("python3")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_end_to_end_and_a_rotated_certificate_is_picked_up() {
    let dir = scratch("e2e");
    let ca1 = certs::ca(&dir, "ca-one");
    let first = certs::leaf(&dir, &ca1, "first");
    // The server reads these two paths; rotation replaces their contents.
    let (cert, key) = (dir.join("server.pem"), dir.join("server.key"));
    std::fs::copy(&first.cert, &cert).unwrap();
    std::fs::copy(&first.key, &key).unwrap();
    let config = dir.join("floodgate.toml");
    std::fs::write(&config, "[limiters.tls]\nconcurrency = 3\n").unwrap();
    let serve = ServeProcess::start(&[
        "--config",
        config.to_str().unwrap(),
        "--tls-cert",
        cert.to_str().unwrap(),
        "--tls-key",
        key.to_str().unwrap(),
    ]);
    let url = serve.url.clone();
    assert!(url.starts_with("https://127.0.0.1:"), "{url}");

    // curl: with the CA it works; without it (the system's CAs only) it is refused.
    let out = curl(&url, &ca1.cert);
    assert!(out.status.success(), "{out:?}");
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "ok");
    let other_ca = certs::ca(&dir, "ca-unrelated");
    assert!(!curl(&url, &other_ca.cert).status.success());
    // Plain HTTP on the TLS port gets no API answer.
    let plain = Command::new("curl")
        .args(["-sS", "--max-time", "10"])
        .arg(format!("{}/healthz", url.replace("https", "http")))
        .output()
        .unwrap();
    assert_ne!(String::from_utf8_lossy(&plain.stdout).trim(), "ok");

    // The CLI: --ca-file, FLOODGATE_CA_FILE, and a clear failure without a CA.
    let out = floodgate(
        &[
            "status",
            "--url",
            &url,
            "--ca-file",
            ca1.cert.to_str().unwrap(),
        ],
        &[],
    );
    assert!(out.status.success(), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("tls"),
        "{out:?}"
    );
    let out = floodgate(
        &["status", "--url", &url],
        &[("FLOODGATE_CA_FILE", &ca1.cert)],
    );
    assert!(out.status.success(), "{out:?}");
    let out = floodgate(&["status", "--url", &url], &[]);
    assert_eq!(out.status.code(), Some(69), "{out:?}");
    let out = floodgate(
        &[
            "status",
            "--url",
            &url,
            "--ca-file",
            dir.join("nope.pem").to_str().unwrap(),
        ],
        &[],
    );
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("nope.pem"),
        "{out:?}"
    );

    // The Python client: ca_file= and FLOODGATE_CA_FILE through from_env().
    for from_env in [false, true] {
        let out = python(&url, &ca1.cert, from_env);
        assert!(
            out.status.success(),
            "python (from_env {from_env}): {out:?}"
        );
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            text.contains("held tls.") && text.contains("limit 3"),
            "{text}"
        );
    }

    // Rotation: a certificate from another CA replaces the files (written aside, then renamed
    // over, as cert-manager and certbot do). The running server picks it up: curl trusting
    // only the new CA gets through, and the old CA no longer verifies it.
    let ca2 = certs::ca(&dir, "ca-two");
    let second = certs::leaf(&dir, &ca2, "second");
    std::fs::copy(&second.key, dir.join("key.new")).unwrap();
    std::fs::copy(&second.cert, dir.join("cert.new")).unwrap();
    std::fs::rename(dir.join("key.new"), &key).unwrap();
    std::fs::rename(dir.join("cert.new"), &cert).unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while !curl(&url, &ca2.cert).status.success() {
        assert!(
            Instant::now() < deadline,
            "the new certificate was never served"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(
        !curl(&url, &ca1.cert).status.success(),
        "the old one is gone"
    );
    let out = floodgate(
        &[
            "status",
            "--url",
            &url,
            "--ca-file",
            ca2.cert.to_str().unwrap(),
        ],
        &[],
    );
    assert!(out.status.success(), "{out:?}");

    // A broken file does not take the served certificate down.
    std::fs::write(&cert, "not a certificate").unwrap();
    serve.signal(nix::sys::signal::Signal::SIGHUP);
    serve
        .wait_for_log(|l| l["message"] == "TLS certificate not reloaded; the old one stays")
        .await;
    assert!(curl(&url, &ca2.cert).status.success());

    let logs = serve.stop();
    assert!(
        logs.iter()
            .any(|l| l["message"] == "TLS certificate reloaded"),
        "{logs:?}"
    );
}

#[test]
fn a_bad_certificate_or_a_lone_flag_stops_the_start_with_a_clear_error() {
    let dir = scratch("bad");
    let ca = certs::ca(&dir, "ca");
    let leaf = certs::leaf(&dir, &ca, "leaf");
    let other = certs::leaf(&dir, &ca, "other");
    let run = |args: &[&str]| {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_floodgate"));
        cmd.args(["serve", "--listen", "127.0.0.1:0"]).args(args);
        cmd.output().unwrap()
    };
    let out = run(&["--tls-cert", leaf.cert.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("--tls-key"),
        "{out:?}"
    );
    // A key that does not belong to the certificate.
    let out = run(&[
        "--tls-cert",
        leaf.cert.to_str().unwrap(),
        "--tls-key",
        other.key.to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("leaf.pem"),
        "{out:?}"
    );
    let out = run(&[
        "--tls-cert",
        dir.join("missing.pem").to_str().unwrap(),
        "--tls-key",
        leaf.key.to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("missing.pem"),
        "{out:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_uses_redis_over_tls_with_the_password_from_the_environment() {
    let dir = scratch("rediss");
    let ca = certs::ca(&dir, "redis-ca");
    let leaf = certs::leaf(&dir, &ca, "redis");
    // The TLS port is drawn afresh with the plain one on each start attempt: a port taken
    // meanwhile (the server exits at once) is not tried again.
    let tls_port = std::cell::Cell::new(0);
    let tls_args = |users: &[&str]| -> Vec<String> {
        tls_port.set(support::free_port());
        let mut args: Vec<String> = vec![
            "--tls-port".into(),
            tls_port.get().to_string(),
            "--tls-cert-file".into(),
            leaf.cert.to_str().unwrap().into(),
            "--tls-key-file".into(),
            leaf.key.to_str().unwrap().into(),
            "--tls-ca-cert-file".into(),
            ca.cert.to_str().unwrap().into(),
            "--tls-auth-clients".into(),
            "optional".into(),
        ];
        args.extend(users.iter().map(|s| s.to_string()));
        args
    };
    let fg_server = [
        "--user",
        "fg-server",
        "on",
        ">from-the-env",
        "~fg:*",
        "&fg:*",
        "+@all",
    ];
    let mut with_default = vec![
        "--user",
        "default",
        "on",
        "nopass",
        "resetkeys",
        "resetchannels",
        "-@all",
        "+ping",
    ];
    with_default.extend(fg_server);
    let redis = support::RedisServer::start_on_free_ports(|| tls_args(&with_default));
    let url = format!("rediss://127.0.0.1:{}", tls_port.get());
    let args = [
        "--redis",
        url.as_str(),
        "--redis-ca",
        ca.cert.to_str().unwrap(),
    ];
    let serve = ServeProcess::start_with_env(
        &args,
        &[
            ("FLOODGATE_REDIS_USERNAME", "fg-server"),
            ("FLOODGATE_REDIS_PASSWORD", "from-the-env"),
        ],
    );
    let http = reqwest::Client::new();
    let put = http
        .put(format!("{}/v1/limiters/shared", serve.url))
        .body(r#"{"concurrency": 1}"#)
        .header("content-type", "application/json")
        .send()
        .await
        .unwrap();
    assert_eq!(put.status(), 200);
    let acquired = http
        .post(format!("{}/v1/limiters/shared/acquire", serve.url))
        .body("{}")
        .header("content-type", "application/json")
        .send()
        .await
        .unwrap();
    assert_eq!(acquired.status(), 200);
    assert!(reqwest::get(format!("{}/readyz", serve.url))
        .await
        .unwrap()
        .status()
        .is_success());
    serve.stop();
    drop(redis);

    // A wrong password: the start fails at once, naming the problem, exit 69.
    let redis = support::RedisServer::start_on_free_ports(|| tls_args(&fg_server));
    let url = format!("rediss://127.0.0.1:{}", tls_port.get());
    let out = Command::new(env!("CARGO_BIN_EXE_floodgate"))
        .args(["serve", "--listen", "127.0.0.1:0"])
        .args([
            "--redis",
            url.as_str(),
            "--redis-ca",
            ca.cert.to_str().unwrap(),
        ])
        .env("FLOODGATE_REDIS_USERNAME", "fg-server")
        .env("FLOODGATE_REDIS_PASSWORD", "wrong")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(69), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("authentication failed"), "{err}");
    assert!(!err.contains("wrong"), "the password is not printed: {err}");
    drop(redis);
}
