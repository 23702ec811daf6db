//! Unit tests of `floodgate bench`, and one short run against an in-process server.

use super::report::SaturationResult;
use super::target::LocalServer;
use super::workloads::RedisCounters;
use super::*;

#[test]
fn percentiles_are_nearest_rank() {
    let samples: Vec<Duration> = (1..=100).map(Duration::from_micros).collect();
    let l = Latency::new(samples.into_iter().rev().collect());
    assert!((l.p50_us - 50.0).abs() < 1e-6);
    assert!((l.p99_us - 99.0).abs() < 1e-6);
    let one = Latency::new(vec![Duration::from_micros(7)]);
    assert!((one.p50_us - 7.0).abs() < 1e-6 && (one.p99_us - 7.0).abs() < 1e-6);
    assert!((l.max_us - 100.0).abs() < 1e-6);
    let none = Latency::new(Vec::new());
    assert!(none.p50_us == 0.0 && none.p99_us == 0.0 && none.max_us == 0.0);
}

#[test]
fn median_of_rounds() {
    assert!((Rates::new(vec![3.0, 1.0, 2.0]).median - 2.0).abs() < 1e-9);
    assert!((Rates::new(vec![4.0, 1.0]).median - 2.5).abs() < 1e-9);
}

#[test]
fn redis_counters_from_info() {
    let info = "# Stats\r\ntotal_commands_processed:1234\r\n# CPU\r\nused_cpu_sys:1.5\r\n\
                used_cpu_user:2.25\r\nused_cpu_sys_children:9.0\r\n# Commandstats\r\n\
                cmdstat_evalsha:calls=10,usec=50,usec_per_call=5.00\r\n\
                cmdstat_eval:calls=2,usec=10,usec_per_call=5.00\r\n\
                cmdstat_zrem:calls=7,usec=7,usec_per_call=1.00\r\n";
    let c = RedisCounters::parse(info);
    assert_eq!(c.commands, 1234);
    assert_eq!(c.scripts, 12);
    assert!((c.cpu - 3.75).abs() < 1e-9, "{c:?}");
}

#[test]
fn utilization_is_time_held_over_limit_times_window() {
    let s = SaturationResult {
        holders: 16,
        limit: 4,
        hold: Duration::from_millis(5),
        warmup: Duration::ZERO,
        window: Duration::from_secs(2),
        busy: Duration::from_secs(6),
        grants: 1000,
        held: Duration::from_secs(5),
        wait: Latency::new(Vec::new()),
        redis: None,
    };
    assert!((s.utilization() - 0.75).abs() < 1e-9);
    assert!((s.pairs_per_sec() - 500.0).abs() < 1e-9);
    assert_eq!(s.mean_hold(), Duration::from_millis(5));
    assert!((s.ideal_pairs_per_sec() - 800.0).abs() < 1e-6);
    // 8 s of capacity, 6 s busy: 2 s idle over 1000 grants.
    assert_eq!(s.idle_per_grant(), Duration::from_millis(2));
}

fn args(url: &str) -> BenchArgs {
    BenchArgs {
        url: Some(url.to_owned()),
        store: None,
        token: Some("secret".into()),
        workloads: vec![
            Workload::Throughput,
            Workload::Handoff,
            Workload::Saturation,
        ],
        clients: 3,
        seconds: 0.05,
        handoffs: 5,
        rounds: 2,
        holders: 6,
        limit: 2,
        hold: Duration::from_millis(2),
        tokio_hold: false,
        saturation_seconds: 0.2,
        json: true,
    }
}

#[test]
fn a_backlog_is_required() {
    let mut a = args("http://127.0.0.1:1");
    a.holders = 2;
    assert!(a.validate().is_err());
    a.workloads = vec![Workload::Throughput];
    assert!(a.validate().is_ok());
}

/// A tiny run against the in-process server: every workload completes and the bench's
/// limiters are gone afterwards. No assertion on any timing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_short_run_completes_and_cleans_up() -> Result<(), String> {
    let server = LocalServer::start(Some("secret".into()))
        .await
        .map_err(|f| f.message)?;
    let args = args(&server.base);
    let target = Target::open(&args).await.map_err(|f| f.message)?;
    let names = Names::new("bench-test");
    let report = measure::<HttpClient>(&args, &target, &names)
        .await
        .map_err(|f| f.message)?;
    let throughput = report.throughput.as_ref().ok_or("no throughput")?;
    assert_eq!(throughput.trivial_pairs.rounds.len(), 2);
    assert_eq!(throughput.floodgate_pairs.rounds.len(), 2);
    assert!(throughput.trivial_pairs.median > 0.0 && throughput.floodgate_pairs.median > 0.0);
    let handoff = report.handoff.as_ref().ok_or("no handoff")?;
    assert!(handoff.handoff.p50_us > 0.0 && handoff.trivial_rtt.p50_us > 0.0);
    let saturation = report.saturation.as_ref().ok_or("no saturation")?;
    assert!(saturation.grants > 0);
    assert!(saturation.utilization() > 0.0 && saturation.utilization() <= 1.0);
    let json = report.to_json();
    assert!(json["throughput"]["ratio"].is_number());
    assert!(json["saturation"]["utilization"].is_number());
    let text = report.to_text();
    assert!(text.contains("ratio") && text.contains("utilization"));
    let Target::Http { control, .. } = &target else {
        return Err("not HTTP".into());
    };
    // Every permit was released: the limiters are idle.
    for name in names.all() {
        let status = control.limiter(name).await.map_err(|e| e.to_string())?;
        assert_eq!(status["in_use"], 0, "{status}");
        assert_eq!(status["waiting"], 0, "{status}");
    }
    target.delete_all(&names).await.map_err(|f| f.message)?;
    for name in names.all() {
        assert!(control.limiter(name).await.is_err(), "{name} still exists");
    }
    target.close().await;
    server.stop().await;
    Ok(())
}

/// A hold never ends before its time, whether it is shorter than the coarse sleep's margin
/// (thread sleep only), longer (tokio sleep, then the rest), or zero; and it works on a
/// current-thread runtime too (the rest runs on the blocking pool, not on the worker).
#[tokio::test]
async fn a_hold_lasts_at_least_its_length() {
    for hold in [
        Duration::ZERO,
        Duration::from_micros(700),
        Duration::from_millis(3),
        Duration::from_millis(5),
    ] {
        let start = std::time::Instant::now();
        super::workloads::hold_for(hold).await;
        assert!(start.elapsed() >= hold, "{hold:?} ended early");
    }
}
