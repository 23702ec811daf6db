//! Settings the simulation refuses, and the accounting of a run that does not finish. Virtual
//! time only: no assertion is about elapsed wall time.

use std::time::Duration;

use floodgate_sim::{run, Config, Model, Scenario, Strategy, MAX_QUERIES};

#[test]
fn a_workload_too_large_to_hold_is_refused_before_it_is_drawn() {
    // 10 million organizations of 100 queries: a billion tasks, far past any memory.
    let cfg = Config {
        orgs: 10_000_000,
        queries_per_org: 100.0,
        ..Config::default()
    };
    assert!(cfg.validate().is_err_and(|e| e.starts_with("orgs")));
    // Just past the cap on average is refused too; just under it is not.
    let over = Config {
        orgs: MAX_QUERIES / 2 + 1,
        ..Config::default()
    };
    assert!(over.validate().is_err_and(|e| e.starts_with("orgs")));
    let under = Config {
        orgs: MAX_QUERIES / 2,
        ..Config::default()
    };
    assert_eq!(under.validate(), Ok(()));
    // The `orgs` scenario's sizes are known only once drawn: refused while drawing.
    let orgs = Config {
        orgs: MAX_QUERIES,
        strategies: vec![Strategy::Floodgate],
        ..Config::scenario(Scenario::Orgs)
    };
    assert!(run(&orgs).is_err_and(|e| e.starts_with("orgs")));
}

#[test]
fn a_lease_too_short_to_heartbeat_is_refused() {
    let cfg = Config {
        lease: Duration::from_millis(1),
        ..Config::default()
    };
    assert!(cfg.validate().is_err_and(|e| e.starts_with("lease")));
}

#[test]
fn work_still_pending_when_simulated_time_runs_out_is_counted_as_unfinished() {
    // A horizon shorter than the work: every query task still queued or waiting then is
    // neither done nor failed.
    let cfg = Config {
        orgs: 300,
        strategies: vec![Strategy::Floodgate, Strategy::SeedBackoff],
        model: Model {
            horizon: Duration::from_secs(20),
            ..Model::default()
        },
        ..Config::default()
    };
    let sim = run(&cfg).expect("a valid configuration");
    for r in &sim.report.strategies {
        assert!(r.lost_unfinished > 0, "{}: {r:?}", r.strategy);
        assert_eq!(
            r.lost_failed + r.lost_killed + r.lost_skipped,
            0,
            "{}: nothing gave up in 20 s: {r:?}",
            r.strategy
        );
        assert_eq!(
            r.lost,
            r.lost_skipped
                + r.lost_failed
                + r.lost_killed
                + r.lost_never_spawned
                + r.lost_unfinished
        );
        assert_eq!(r.completed + r.lost, sim.report.queries);
    }
}
