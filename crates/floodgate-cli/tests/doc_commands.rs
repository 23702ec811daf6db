//! The command lines of README.md, docs/keyed.md and docs/deploy.md run as written, not just
//! read: every `floodgate run`, `floodgate status` and `floodgate limiter ...` line of their
//! ```` ```sh ```` blocks, in document order, against one real `floodgate serve --config
//! floodgate.example.toml` (the README's set-up command, with a scratch data directory) on
//! `127.0.0.1:0`, each through `sh` in a scratch directory holding the files the lines name
//! (`./run_query.sh`, deploy.md's `limits.toml`), with `floodgate` on `PATH` and
//! `FLOODGATE_URL` naming the server. Each must exit 0. `curl` lines run too, with the
//! server's address for `localhost:8750`, and must answer JSON without an `error`: every one of
//! keyed.md's, and the README's `curl -X PUT` lines (its others quote a made-up permit id).
//!
//! Not run here: `floodgate serve` lines (other listeners, TLS files, Redis), `floodgate top`
//! (interactive: `tests/top.rs`), lines with their own `--url` (a made-up HTTPS host) and
//! shell lines that are not `floodgate` (`kill -HUP`, `export`). docs/api.md's examples are
//! run by `floodgate-server/tests/api_doc.rs`.

#![allow(clippy::unwrap_used)]

mod proc;

use std::path::{Path, PathBuf};
use std::process::Command;

use proc::ServeProcess;
use serde_json::Value;

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn read(doc: &str) -> String {
    std::fs::read_to_string(root().join(doc)).unwrap()
}

/// The command lines of every ```` ```sh ```` block of `text`: continuation lines joined,
/// comments and blank lines dropped.
fn sh_lines(text: &str) -> Vec<String> {
    let mut lines = Vec::new();
    let mut in_block = false;
    let mut pending = String::new();
    for line in text.lines() {
        let trimmed = line.trim();
        if !in_block {
            in_block = trimmed == "```sh";
            continue;
        }
        if trimmed == "```" {
            in_block = false;
            continue;
        }
        // A comment starts at a `#` that begins the line or follows a space.
        let code = match trimmed.find(" #") {
            Some(at) => &trimmed[..at],
            None if trimmed.starts_with('#') => "",
            None => trimmed,
        };
        let code = code.trim_end();
        match code.strip_suffix('\\') {
            Some(head) => {
                pending.push_str(head);
                pending.push(' ');
            }
            None => {
                pending.push_str(code);
                let full = std::mem::take(&mut pending);
                if !full.trim().is_empty() {
                    lines.push(full.trim().to_owned());
                }
            }
        }
    }
    lines
}

/// The ```` ```toml ```` block of `text` whose first line is `# NAME`.
fn toml_block(text: &str, name: &str) -> String {
    let marker = format!("```toml\n# {name}\n");
    let start = text
        .find(&marker)
        .unwrap_or_else(|| panic!("no {name} block"))
        + 8;
    let end = start + text[start..].find("```").unwrap();
    text[start..end].to_owned()
}

/// Whether a line of `doc` is one this test runs, and what it is.
fn runnable(doc: &str, line: &str) -> Option<&'static str> {
    let words: Vec<&str> = line.split_whitespace().collect();
    match words.as_slice() {
        ["curl", ..] if doc == "docs/keyed.md" => Some("curl"),
        ["curl", rest @ ..] if rest.contains(&"PUT") => Some("curl"),
        ["floodgate", ..] if words.contains(&"--url") => None,
        ["floodgate", "run", ..] => Some("run"),
        ["floodgate", "status", ..] => Some("status"),
        ["floodgate", "limiter", "set", ..] => Some("limiter set"),
        ["floodgate", "limiter", "apply", ..] => Some("limiter apply"),
        _ => None,
    }
}

/// Runs `line` through `sh` in `dir`, with the built `floodgate` first on `PATH`.
fn sh(dir: &Path, url: &str, line: &str) -> std::process::Output {
    let bin_dir = Path::new(env!("CARGO_BIN_EXE_floodgate")).parent().unwrap();
    let path = format!(
        "{}:{}",
        bin_dir.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let host = url.trim_start_matches("http://");
    Command::new("sh")
        .arg("-c")
        .arg(line.replace("localhost:8750", host))
        .current_dir(dir)
        .env("PATH", path)
        .env("FLOODGATE_URL", url)
        .env_remove("FLOODGATE_TOKEN")
        .output()
        .unwrap()
}

#[test]
fn the_readme_and_deploy_command_lines_run_as_written() {
    let dir =
        Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("doc-commands-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    // The README's `./run_query.sh 42`: a query that succeeds.
    let script = dir.join("run_query.sh");
    std::fs::write(&script, "#!/bin/sh\necho \"query $1\"\n").unwrap();
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    let deploy = read("docs/deploy.md");
    std::fs::write(dir.join("limits.toml"), toml_block(&deploy, "limits.toml")).unwrap();

    let example = root().join("floodgate.example.toml");
    let data = dir.join("data");
    let server = ServeProcess::start(&[
        "--config",
        example.to_str().unwrap(),
        "--data-dir",
        data.to_str().unwrap(),
    ]);

    let mut ran: Vec<&str> = Vec::new();
    for doc in ["README.md", "docs/keyed.md", "docs/deploy.md"] {
        for line in sh_lines(&read(doc)) {
            let Some(kind) = runnable(doc, &line) else {
                continue;
            };
            let out = sh(&dir, &server.url, &line);
            let (stdout, stderr) = (
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr),
            );
            assert!(
                out.status.success(),
                "{doc}: `{line}` exited {:?}\nstdout: {stdout}\nstderr: {stderr}",
                out.status.code()
            );
            if kind == "curl" {
                let answer: Value = serde_json::from_str(&stdout)
                    .unwrap_or_else(|e| panic!("{doc}: `{line}`: {e}: {stdout}"));
                assert!(
                    answer.is_object() && answer.get("error").is_none(),
                    "{doc}: `{line}` answered {answer}"
                );
            }
            if kind == "run" {
                assert!(stdout.contains("query 42"), "{doc}: `{line}`: {stdout}");
            }
            ran.push(kind);
        }
    }
    eprintln!("ran {} documented lines: {ran:?}", ran.len());
    for kind in ["curl", "run", "status", "limiter set", "limiter apply"] {
        assert!(ran.contains(&kind), "no `{kind}` line was run: {ran:?}");
    }

    // `limiter set --rate` without `--burst` (the help's default burst), which once sent
    // `"burst": null` and was refused.
    let out = sh(
        &dir,
        &server.url,
        "floodgate limiter set paced --rate 10/1s",
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = sh(&dir, &server.url, "floodgate status --json");
    let status: Value = serde_json::from_slice(&out.stdout).unwrap();
    let paced = status
        .as_array()
        .unwrap()
        .iter()
        .find(|l| l["name"] == "paced")
        .cloned()
        .unwrap();
    assert_eq!(paced["rate"]["limit"], 10, "{paced}");
    assert_eq!(paced["concurrency"], Value::Null, "{paced}");
    drop(server);
    let _ = std::fs::remove_dir_all(&dir);
}
