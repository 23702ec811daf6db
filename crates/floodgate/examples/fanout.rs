//! The seed's fan-out, through a Floodgate limiter: one batch starts a task per organization,
//! each starts a query per project, and every query takes a permit from one limiter of 50.
//! Prints the peak number of queries in flight (seen by a witness the limiter cannot see),
//! against the backend's 100.
//!
//! `cargo run --release --example fanout [ORGS] [LIMIT]`

#![allow(clippy::print_stdout)]

use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use floodgate::{AcquireOptions, Floodgate, LimiterSpec};

/// The stand-in backend's limit: above it, queries fail with RateLimitExceeded.
const BACKEND_LIMIT: i64 = 100;

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let orgs: u64 = args.next().map(|a| a.parse()).transpose()?.unwrap_or(500);
    let limit: u32 = args.next().map(|a| a.parse()).transpose()?.unwrap_or(50);

    let gate = Floodgate::in_memory();
    gate.define(
        "snuba-spike-projections",
        LimiterSpec::concurrency(limit).with_max_wait(Duration::from_secs(600)),
    )
    .await?;
    let snuba = gate.limiter("snuba-spike-projections").await?;

    let in_flight = Arc::new(AtomicI64::new(0));
    let peak = Arc::new(AtomicI64::new(0));
    let rejected = Arc::new(AtomicI64::new(0));
    let started = Instant::now();
    let mut total_query_time = Duration::ZERO;
    let mut orgs_tasks = tokio::task::JoinSet::new();
    for org in 0..orgs {
        // 1 to 8 projects per organization, query time 5 to 45 ms: deterministic per org.
        let projects = 1 + (org * 7919) % 8;
        let queries: Vec<Duration> = (0..projects)
            .map(|p| Duration::from_millis(5 + (org * 31 + p * 17) % 41))
            .collect();
        total_query_time += queries.iter().sum::<Duration>();
        let (snuba, in_flight, peak, rejected) = (
            snuba.clone(),
            Arc::clone(&in_flight),
            Arc::clone(&peak),
            Arc::clone(&rejected),
        );
        orgs_tasks.spawn(async move {
            let mut queries_tasks = tokio::task::JoinSet::new();
            for q in queries {
                let (snuba, in_flight, peak, rejected) = (
                    snuba.clone(),
                    Arc::clone(&in_flight),
                    Arc::clone(&peak),
                    Arc::clone(&rejected),
                );
                queries_tasks.spawn(async move {
                    let permit = snuba.acquire(AcquireOptions::new()).await?;
                    let now = in_flight.fetch_add(1, Ordering::SeqCst) + 1;
                    peak.fetch_max(now, Ordering::SeqCst);
                    if now > BACKEND_LIMIT {
                        rejected.fetch_add(1, Ordering::SeqCst);
                    }
                    tokio::time::sleep(q).await; // the query
                    in_flight.fetch_sub(1, Ordering::SeqCst);
                    drop(permit);
                    Ok::<_, floodgate::AcquireError>(())
                });
            }
            while let Some(r) = queries_tasks.join_next().await {
                r.map_err(|e| e.to_string())?.map_err(|e| e.to_string())?;
            }
            Ok::<_, String>(())
        });
    }
    while let Some(r) = orgs_tasks.join_next().await {
        r??;
    }
    let elapsed = started.elapsed();
    let status = snuba.status().await?;
    let ideal = total_query_time / limit;
    println!("organizations        {orgs}");
    println!("queries              {}", status.counters.granted);
    println!("limit                {limit} (backend allows {BACKEND_LIMIT})");
    println!("peak concurrency     {}", peak.load(Ordering::SeqCst));
    println!("rejected by backend  {}", rejected.load(Ordering::SeqCst));
    println!("work lost            {}", status.counters.timed_out);
    println!(
        "makespan             {:.2} s (ideal {:.2} s, ratio {:.3})",
        elapsed.as_secs_f64(),
        ideal.as_secs_f64(),
        elapsed.as_secs_f64() / ideal.as_secs_f64()
    );
    Ok(())
}
