//! `floodgate simulate` as a user runs it: the real binary, its table and its usage errors.
//! (The simulator's figures are tested in `floodgate-server/tests/simulate.rs` and
//! `floodgate-sim/tests`.)

#[test]
fn the_orgs_scenario_runs_from_the_command_line_and_a_bad_scenario_is_a_usage_error() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_floodgate"))
        .args([
            "simulate",
            "--scenario",
            "orgs",
            "--orgs",
            "200",
            "--strategy",
            "floodgate,floodgate-keyed",
        ])
        .output()
        .expect("runs");
    assert!(out.status.success(), "{out:?}");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("seed 1: 200 organizations"), "{text}");
    assert!(
        text.contains("small organizations (<= 10 queries)"),
        "{text}"
    );
    assert!(text.contains("JAIN"), "{text}");
    assert_eq!(text.matches("floodgate-keyed").count(), 3, "{text}");
    let bad = std::process::Command::new(env!("CARGO_BIN_EXE_floodgate"))
        .args(["simulate", "--scenario", "tenants"])
        .output()
        .expect("runs");
    assert_eq!(bad.status.code(), Some(2), "{bad:?}");
    assert!(String::from_utf8_lossy(&bad.stderr).contains("one of incident, orgs"));
}

/// The tables README.md and docs/simulate.md show are the command's own output, line for line:
/// every line of each of their ```` ``` ```` blocks that holds a table (the default run's,
/// `--scenario orgs`'s, the README's excerpt of it) is a line the command prints. The run is
/// deterministic per seed, so a change to the model or the strategies that moves a figure
/// fails here until the documents show the new one.
#[test]
fn the_documented_tables_are_what_the_command_prints() {
    let run = |args: &[&str]| {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_floodgate"))
            .arg("simulate")
            .args(args)
            .output()
            .expect("runs");
        assert!(out.status.success(), "{out:?}");
        String::from_utf8(out.stdout).expect("utf-8")
    };
    let incident = run(&[]);
    let orgs = run(&["--scenario", "orgs"]);
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let mut compared = 0;
    for doc in ["README.md", "docs/simulate.md"] {
        let text = std::fs::read_to_string(root.join(doc)).expect("doc");
        // The untagged blocks (a fence of a bare ```), each as its lines.
        let mut blocks: Vec<Vec<&str>> = Vec::new();
        let mut open: Option<(bool, Vec<&str>)> = None;
        for line in text.lines() {
            let fence = line.trim_start().strip_prefix("```");
            match (&mut open, fence) {
                (None, Some(tag)) => open = Some((tag.trim().is_empty(), Vec::new())),
                (Some(_), Some(_)) => {
                    if let Some((true, lines)) = open.take() {
                        blocks.push(lines);
                    }
                }
                (Some((_, lines)), None) => lines.push(line),
                (None, None) => {}
            }
        }
        for block in blocks {
            let block = block.join("\n");
            let printed = if block.contains("STRATEGY             PEAK") {
                &incident
            } else if block.contains("SMALL P50") {
                &orgs
            } else {
                continue;
            };
            for line in block.lines().filter(|l| !l.trim().is_empty()) {
                assert!(
                    printed.lines().any(|p| p == line),
                    "{doc}: the line\n{line}\nis not in the command's output:\n{printed}"
                );
                compared += 1;
            }
        }
    }
    // Both docs' default tables (8 lines each, and simulate.md's seed line) and both orgs
    // tables (the README's 5 lines, simulate.md's 10).
    assert!(compared >= 30, "only {compared} documented lines compared");
}
