//! What the tests of this binary share: the real server with one limiter, a scratch directory
//! per test, and bounded waits.

use std::path::{Path, PathBuf};
use std::process::{Output, Stdio};
use std::time::Duration;

use floodgate::{Floodgate, LimiterSpec, LimiterStatus};
use floodgate_server::server::{self, ServerOptions};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use tokio::net::TcpListener;
use tokio::process::Command;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

pub(crate) const LIMITER: &str = "lim";

/// The real server on a free port, with one concurrency limiter named `lim`.
pub(crate) struct TestServer {
    pub(crate) url: String,
    pub(crate) gate: Floodgate,
    pub(crate) stop: Option<oneshot::Sender<()>>,
    pub(crate) task: Option<JoinHandle<std::io::Result<()>>>,
}

impl TestServer {
    pub(crate) async fn start(limit: u32) -> Self {
        let gate = Floodgate::in_memory();
        gate.define(LIMITER, LimiterSpec::concurrency(limit))
            .await
            .unwrap();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(server::run(
            listener,
            gate.clone(),
            ServerOptions::default(),
            async move {
                let _ = stopped.await;
            },
        ));
        TestServer {
            url,
            gate,
            stop: Some(stop),
            task: Some(task),
        }
    }

    /// `floodgate ARGS...` pointed at this server, in `dir`, its output captured.
    pub(crate) fn floodgate(&self, dir: &Path, args: &[&str]) -> Command {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_floodgate"));
        cmd.args(args)
            .current_dir(dir)
            .env("FLOODGATE_URL", &self.url)
            .env_remove("FLOODGATE_TOKEN")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        cmd
    }

    /// Runs `floodgate ARGS...` to completion, capturing its output.
    pub(crate) async fn output(&self, dir: &Path, args: &[&str]) -> Output {
        self.floodgate(dir, args).output().await.unwrap()
    }

    pub(crate) async fn status(&self) -> LimiterStatus {
        self.gate
            .limiter(LIMITER)
            .await
            .unwrap()
            .status()
            .await
            .unwrap()
    }

    pub(crate) async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            task.await.unwrap().unwrap();
        }
    }
}

/// A fresh scratch directory for one test, removed when dropped.
pub(crate) struct Scratch(PathBuf);

impl Scratch {
    pub(crate) fn new(test: &str) -> Self {
        let dir = Path::new(env!("CARGO_TARGET_TMPDIR"))
            .join(format!("run_cli-{test}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        Scratch(dir)
    }

    pub(crate) fn path(&self) -> &Path {
        &self.0
    }

    pub(crate) fn file(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }

    pub(crate) fn read(&self, name: &str) -> String {
        std::fs::read_to_string(self.file(name)).unwrap_or_default()
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

pub(crate) fn code(output: &Output) -> i32 {
    output.status.code().unwrap_or(-1)
}

pub(crate) fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

/// Waits until `path` exists. Bounded only so a broken build fails instead of hanging.
pub(crate) async fn wait_for_file(path: &Path) {
    for _ in 0..3000 {
        if path.exists() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("{} never appeared", path.display());
}

/// Waits until `done` holds. Bounded only so a broken build fails instead of hanging.
pub(crate) async fn wait_until<F, Fut>(mut done: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    for _ in 0..3000 {
        if done().await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("the condition never held");
}

pub(crate) fn send(pid: Option<u32>, sig: Signal) {
    let pid = i32::try_from(pid.unwrap()).unwrap();
    kill(Pid::from_raw(pid), sig).unwrap();
}
