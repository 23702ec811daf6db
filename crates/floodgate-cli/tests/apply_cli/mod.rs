//! What the `floodgate limiter apply` tests (`apply.rs`, `apply_keyed.rs`) share: a scratch
//! directory, the real binary run to completion, and its standard output.

#![allow(dead_code, reason = "each test file uses its own part of this module")]

use std::path::{Path, PathBuf};
use std::process::Output;

/// A fresh scratch directory for one test (`name`: the file's and the test's), under cargo's
/// temporary directory for integration tests.
pub(crate) fn scratch(name: &str) -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// `floodgate limiter apply -f FILE EXTRA...` against `url`, to completion.
pub(crate) async fn apply(url: &str, file: &Path, extra: &[&str]) -> Output {
    let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_floodgate"));
    cmd.args(["limiter", "apply", "-f"])
        .arg(file)
        .args(extra)
        .env("FLOODGATE_URL", url)
        .env_remove("FLOODGATE_TOKEN")
        .kill_on_drop(true);
    cmd.output().await.unwrap()
}

/// The standard output, as text.
pub(crate) fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The real apply of `file` after a dry run that reported a refusal (its standard error
/// `dry_err`): it is refused too, exit 2, with the same first line.
pub(crate) async fn refused_as_the_dry_run_was(url: &str, file: &Path, dry_err: &str, what: &str) {
    let real = apply(url, file, &[]).await;
    let real_err = String::from_utf8_lossy(&real.stderr).into_owned();
    assert_eq!(real.status.code(), Some(2), "{what}: {real:?}");
    assert_eq!(
        dry_err.lines().next(),
        real_err.lines().next(),
        "{what}: the same refusal"
    );
}
