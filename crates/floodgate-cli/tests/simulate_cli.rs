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
