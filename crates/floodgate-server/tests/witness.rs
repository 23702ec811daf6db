//! Witness test of the HTTP server: 200 concurrent HTTP clients against one limiter on the real
//! server (`127.0.0.1:0`). Each client acquires, bumps an independent witness counter, holds for
//! a random short time (extending when its hold is long), drops the witness and releases. About
//! 10% "crash" once granted: they drop the witness and never release, so only their leases
//! ending frees their permits. The witness's maximum never exceeds the limit, and at the end
//! nothing is held and the counters add up (`expired` = abandoned, `granted` = `released` +
//! `expired`).
//!
//! The random plan comes from a seeded splitmix64, so a failure is replayed by running again.

#![allow(clippy::unwrap_used)]

mod common;

use std::collections::HashSet;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::{num, SplitMix64};
use floodgate::Floodgate;
use floodgate_server::client::{AcquireArgs, Client};
use floodgate_server::server::{self, ServerOptions};
use serde_json::json;
use tokio::net::TcpListener;
use tokio::sync::oneshot;

const CLIENTS: usize = 200;
const LIMIT: i64 = 10;
/// The limiter's lease: short, so the abandoned permits come back quickly, yet long enough that
/// a client's hold plus two HTTP round trips on a loaded machine never outlast it (with 300 ms,
/// a 50 ms hold left 250 ms for answers to 200 clients on two threads).
const LEASE_MS: u64 = 1_000;
/// The lease of a client that does not crash (asked with its acquire and each extend): no
/// stall of the test process, server and clients alike, outlasts it (with the limiter's 1 s, a
/// process stopped for 1.2 s lost live holders' permits: failed extends and releases, and the
/// next grant ran beside the stalled holder). The crashing clients keep the limiter's lease.
const HELD_LEASE_MS: u64 = 60_000;
/// Far longer than the whole run: no acquire times out.
const MAX_WAIT_MS: u64 = 600_000;
const SEED: u64 = 0x5eed_f100_d6a7_e001;
/// Bound on the polling loops.
const PATIENCE: Duration = Duration::from_secs(30);

/// What one client does.
#[derive(Debug, Clone, Copy)]
struct Plan {
    /// Delay before its acquire, so arrivals interleave with grants and releases.
    start_ms: u64,
    /// How long it holds the permit.
    hold_ms: u64,
    /// Whether it "crashes" while holding: drops the witness and never releases.
    abandon: bool,
}

fn plans(seed: u64) -> Vec<Plan> {
    let mut rng = SplitMix64(seed);
    (0..CLIENTS)
        .map(|_| {
            let start_ms = rng.between(0, 30);
            // Mostly short holds; one in twenty holds past half the lease and must extend.
            let hold_ms = if rng.between(0, 19) == 0 {
                rng.between(LEASE_MS / 2 + 1, LEASE_MS * 2)
            } else {
                rng.between(2, 50)
            };
            let abandon = rng.between(0, 9) == 0;
            Plan {
                start_ms,
                hold_ms,
                abandon,
            }
        })
        .collect()
}

#[derive(Debug)]
struct Outcome {
    fencing_token: u64,
    abandoned: bool,
    extends: u32,
}

/// Holds for `hold_ms`. A hold longer than half the lease is cut into slices of a quarter lease,
/// with an extend after each, so the lease never comes near its end.
async fn hold(client: &Client, permit_id: &str, hold_ms: u64) -> u32 {
    if hold_ms <= LEASE_MS / 2 {
        tokio::time::sleep(Duration::from_millis(hold_ms)).await;
        return 0;
    }
    let slice = LEASE_MS / 4;
    let mut left = hold_ms;
    let mut extends = 0;
    while left > 0 {
        let step = left.min(slice);
        tokio::time::sleep(Duration::from_millis(step)).await;
        left -= step;
        if left > 0 {
            let reply = client.extend(permit_id, Some(HELD_LEASE_MS)).await;
            assert!(
                reply.is_ok(),
                "extend of {permit_id} failed (seed {SEED:#x}): {reply:?}"
            );
            extends += 1;
        }
    }
    extends
}

async fn run_client(
    client: Client,
    plan: Plan,
    index: usize,
    witness: Arc<AtomicI64>,
    max_seen: Arc<AtomicI64>,
) -> Outcome {
    tokio::time::sleep(Duration::from_millis(plan.start_ms)).await;
    let args = AcquireArgs {
        wait_ms: Some(MAX_WAIT_MS),
        holder: Some(format!("client-{index}")),
        lease_ms: (!plan.abandon).then_some(HELD_LEASE_MS),
        ..AcquireArgs::default()
    };
    let permit = match client.acquire("witness", &args).await {
        Ok(permit) => permit,
        Err(e) => panic!("client {index}: acquire failed (seed {SEED:#x}): {e}"),
    };
    let now = witness.fetch_add(1, Ordering::SeqCst) + 1;
    max_seen.fetch_max(now, Ordering::SeqCst);
    // A crashing client stops working at once (it leaves the witness with no await in
    // between, so no stall keeps it counted past its 1 s lease), and never releases.
    let extends = if plan.abandon {
        0
    } else {
        hold(&client, &permit.permit_id, plan.hold_ms).await
    };
    witness.fetch_sub(1, Ordering::SeqCst);
    if !plan.abandon {
        let released = client.release(&permit.permit_id).await;
        assert!(
            matches!(released, Ok(true)),
            "client {index}: release of {} answered {released:?}; its lease ended while it held \
             the permit (seed {SEED:#x})",
            permit.permit_id
        );
    }
    Outcome {
        fencing_token: permit.fencing_token,
        abandoned: plan.abandon,
        extends,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hundred_http_clients_never_exceed_the_limit() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let (stop, stopped) = oneshot::channel::<()>();
    let server = tokio::spawn(server::run(
        listener,
        Floodgate::in_memory(),
        ServerOptions::default(),
        async move {
            let _ = stopped.await;
        },
    ));
    let client = Client::new(&base, None).unwrap();
    client
        .put_limiter(
            "witness",
            &json!({
                "concurrency": LIMIT,
                "lease_ms": LEASE_MS,
                "max_wait_ms": MAX_WAIT_MS,
                "max_queue": 10_000,
            }),
        )
        .await
        .unwrap();

    let plans = plans(SEED);
    let abandoned = plans.iter().filter(|p| p.abandon).count() as u64;
    assert!(abandoned > 0, "the seed abandons nobody");

    let witness = Arc::new(AtomicI64::new(0));
    let max_seen = Arc::new(AtomicI64::new(0));
    let tasks: Vec<_> = plans
        .iter()
        .enumerate()
        .map(|(index, plan)| {
            tokio::spawn(run_client(
                client.clone(),
                *plan,
                index,
                Arc::clone(&witness),
                Arc::clone(&max_seen),
            ))
        })
        .collect();
    let mut outcomes = Vec::with_capacity(CLIENTS);
    for task in tasks {
        outcomes.push(task.await.unwrap());
    }

    let max_seen = max_seen.load(Ordering::SeqCst);
    assert!(
        max_seen <= LIMIT,
        "{max_seen} clients held a permit at once; the limit is {LIMIT} (seed {SEED:#x})"
    );
    assert!(max_seen >= 2, "the clients never overlapped: {max_seen}");
    assert_eq!(witness.load(Ordering::SeqCst), 0);
    let tokens: HashSet<u64> = outcomes.iter().map(|o| o.fencing_token).collect();
    assert_eq!(
        tokens.len(),
        CLIENTS,
        "a fencing token was handed out twice"
    );
    assert_eq!(
        outcomes.iter().filter(|o| o.abandoned).count() as u64,
        abandoned
    );
    let extends: u32 = outcomes.iter().map(|o| o.extends).sum();
    assert!(extends > 0, "no client held long enough to extend");

    // The abandoned permits come back when their leases end; nothing else is held.
    let deadline = tokio::time::Instant::now() + PATIENCE;
    let status = loop {
        let status = client.limiter("witness").await.unwrap();
        if num(&status, "/in_use") == 0 {
            break status;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "permits still held long after every lease ended: {status}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(num(&status, "/holders"), 0, "{status}");
    assert_eq!(num(&status, "/waiting"), 0, "{status}");
    let granted = num(&status, "/counters/granted");
    let released = num(&status, "/counters/released");
    let expired = num(&status, "/counters/expired");
    assert_eq!(granted, CLIENTS as u64, "{status}");
    assert_eq!(
        expired, abandoned,
        "expired leases are not exactly the abandoned ones: {status}"
    );
    assert_eq!(granted, released + expired, "{status}");
    assert_eq!(released, CLIENTS as u64 - abandoned, "{status}");
    assert_eq!(num(&status, "/counters/timed_out"), 0, "{status}");
    assert_eq!(num(&status, "/counters/cancelled"), 0, "{status}");
    assert_eq!(num(&status, "/counters/extend_lost"), 0, "{status}");

    let metrics = reqwest::get(format!("{base}/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let expired_line =
        format!("floodgate_permits_expired_total{{limiter=\"witness\"}} {abandoned}");
    assert!(
        metrics.contains(&expired_line),
        "no {expired_line:?} in\n{metrics}"
    );
    let granted_line =
        format!("floodgate_acquire_total{{limiter=\"witness\",outcome=\"granted\"}} {CLIENTS}");
    assert!(
        metrics.contains(&granted_line),
        "no {granted_line:?} in\n{metrics}"
    );

    let _ = stop.send(());
    tokio::time::timeout(PATIENCE, server)
        .await
        .expect("run did not return after shutdown")
        .unwrap()
        .unwrap();
}
