//! The `orgs` scenario (organizations of heavy-tailed sizes): the keyed fair strategy against
//! plain FIFO Floodgate on the same seeded workloads. Virtual time only: no assertion is about
//! elapsed wall time.

use std::time::Duration;

use floodgate_sim::{run, Config, OrgStats, Scenario, Strategy, StrategyReport};

fn orgs(seed: u64, strategies: &[Strategy]) -> Config {
    Config {
        seed,
        strategies: strategies.to_vec(),
        ..Config::scenario(Scenario::Orgs)
    }
}

fn reports(cfg: &Config) -> Vec<StrategyReport> {
    run(cfg).expect("a valid configuration").report.strategies
}

fn org_stats(r: &StrategyReport) -> &OrgStats {
    r.orgs
        .as_ref()
        .expect("the orgs scenario reports per organization")
}

fn secs(v: Option<f64>) -> f64 {
    v.expect("some organizations completed")
}

#[test]
fn keyed_fair_sharing_serves_small_organizations_sooner_and_shares_equally() {
    for seed in 1..=3 {
        let r = reports(&orgs(
            seed,
            &[Strategy::Floodgate, Strategy::FloodgateKeyed],
        ));
        let (fifo, keyed) = (&r[0], &r[1]);
        for s in [fifo, keyed] {
            // Both hold the limit, reject nothing and lose nothing.
            assert!(s.peak_concurrency <= 50, "seed {seed}: {s:?}");
            assert_eq!((s.rejected, s.lost), (0, 0), "seed {seed}: {s:?}");
        }
        let (f, k) = (org_stats(fifo), org_stats(keyed));
        assert!(
            f.small_orgs > 800 && f.large_orgs >= 3,
            "seed {seed}: {f:?}"
        );
        // Small organizations: their waits and their completion far sooner under keyed
        // fair sharing than behind the large organizations' queries in FIFO order.
        let ratio = |a: Option<f64>, b: Option<f64>| secs(a) / secs(b);
        let wait50 = ratio(k.small_wait_p50_s, f.small_wait_p50_s);
        let wait99 = ratio(k.small_wait_p99_s, f.small_wait_p99_s);
        let done50 = ratio(k.small_done_p50_s, f.small_done_p50_s);
        assert!(wait50 <= 0.7, "seed {seed}: small p50 wait ratio {wait50}");
        assert!(wait99 <= 0.85, "seed {seed}: small p99 wait ratio {wait99}");
        assert!(
            done50 <= 0.6,
            "seed {seed}: small p50 completion ratio {done50}"
        );
        // Backlogged organizations get equal shares.
        assert!(k.jain_windows >= 5, "seed {seed}: {k:?}");
        assert!(k.jain_mean.is_some_and(|j| j >= 0.99), "seed {seed}: {k:?}");
        // Fairness costs no throughput: both keep every permit busy while work waits.
        assert!(
            keyed.makespan_s <= fifo.makespan_s * 1.03,
            "seed {seed}: {} vs {}",
            keyed.makespan_s,
            fifo.makespan_s
        );
    }
}

#[test]
fn with_long_waits_fifo_shares_unequally_and_keyed_equally() {
    // Waits of 45 s (the incident's): backlogged organizations stay in the limiter's queue,
    // where FIFO serves whoever came first and deficit round robin serves them in turn.
    let cfg = Config {
        max_wait: Duration::from_secs(45),
        ..orgs(1, &[Strategy::Floodgate, Strategy::FloodgateKeyed])
    };
    let r = reports(&cfg);
    let (f, k) = (org_stats(&r[0]), org_stats(&r[1]));
    let fifo = f.jain_mean.expect("windows with backlogged organizations");
    let keyed = k.jain_mean.expect("windows with backlogged organizations");
    assert!(fifo < 0.9, "FIFO {fifo}");
    assert!(keyed >= 0.99, "keyed {keyed}");
    assert!(k.jain_min.is_some_and(|j| j >= 0.95), "{k:?}");
}

#[test]
fn the_orgs_scenario_is_deterministic_and_reports_every_strategy() {
    let cfg = orgs(7, &Strategy::ALL);
    let a = run(&cfg).expect("valid");
    let b = run(&cfg).expect("valid");
    assert_eq!(a, b);
    assert_eq!(a.report.strategies.len(), Strategy::ALL.len());
    assert!(a.report.strategies.iter().all(|s| s.orgs.is_some()));
    let table = a.report.table();
    assert!(table.contains("floodgate-keyed"));
    assert!(table.contains("JAIN"));
    // The incident's scenario has no per-organization figures, and its default strategies
    // are the seven it always had.
    let incident = Config::default();
    assert_eq!(incident.strategies, Strategy::INCIDENT.to_vec());
    assert_eq!(Config::scenario(Scenario::Incident), incident);
}
