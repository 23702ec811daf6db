//! Random schedules against the durable embedded store, crashed at a random moment and
//! reopened, checked against a witness the store cannot see: every grant the test was answered
//! (its token, key, permits, lease end) and every release it was answered.
//!
//! A crash is a copy of the data directory's files taken between two operations (what a
//! SIGKILL then leaves: the page cache, not the log's unwritten buffer); half the crashes
//! also cut the last log segment at a random byte (a machine crash that lost the end of the
//! log, or a write torn mid-record). After the reopen:
//!
//! - nothing is invented: every restored holder is a grant the test saw made (or one made to
//!   a waiter the crash left unanswered), with its token and key, and not one it saw released;
//! - nothing answered is lost (uncut log): every answered grant not released whose lease runs
//!   past the reopened clock is restored;
//! - in use is what the holders add up to, never above the highest limit configured, per key
//!   and in total;
//! - no token is handed out twice: new grants after the reopen are above every token the
//!   witness saw (uncut log) or every restored one (cut log, whose lost tail may be re-granted
//!   as `docs/durability.md` says for a machine crash under `everysec`).
//!
//! `RESTART_RANDOM_SEEDS=N` runs N seeds (default 12, a few seconds; the ignored soak 1,000);
//! the failing seed is printed and `RESTART_RANDOM_SEED=S` replays it alone (in the soak,
//! seed S runs as S + 2^32).

#[path = "support/mod.rs"]
mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::path::Path;
use std::pin::Pin;
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use floodgate::{
    AcquireError, AcquireOptions, Durability, ExtendError, FencingToken, Grant, KeyedSpec,
    LimiterBackend, LimiterName, LimiterSpec, MemoryLimiter, MemoryStore, Store, WallClock,
};
use support::rng::XorShift as Rng;

const HOUR: Duration = Duration::from_secs(3600);
const KEYS: [&str; 3] = ["a", "b", "c"];

/// The data directory's file names (LOCK excluded: a lock is not inherited by a copy).
fn listing(dir: &Path) -> BTreeSet<std::ffi::OsString> {
    std::fs::read_dir(dir)
        .expect("read dir")
        .map(|e| e.expect("entry"))
        .filter(|e| e.file_name() != "LOCK" && e.file_type().is_ok_and(|t| t.is_file()))
        .map(|e| e.file_name())
        .collect()
}

/// What a SIGKILL now would leave. Background work may be writing (a snapshot taken on the
/// blocking pool, the clock mark): a copy is kept only if no file came or went while it was
/// taken, so it is one moment's directory (appends to the last segment during the copy are
/// what a kill mid-write leaves, and recovery handles them as a torn tail).
fn crash_copy(from: &Path, to: &Path) {
    for _ in 0..1000 {
        for old in listing(to) {
            std::fs::remove_file(to.join(old)).expect("clear");
        }
        let before = listing(from);
        let copied =
            before
                .iter()
                .all(|name| match std::fs::copy(from.join(name), to.join(name)) {
                    Ok(_) => true,
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => false,
                    Err(e) => panic!("copy: {e}"),
                });
        if copied && listing(from) == before {
            return;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    panic!("the data directory never held still for a copy");
}

/// Cuts the last log segment at a random byte; whether it cut anything. Only the last: a
/// segment is synced before the next one is started, so no crash leaves an earlier one short.
fn cut_log(dir: &Path, rng: &mut Rng) -> bool {
    let mut logs: Vec<_> = std::fs::read_dir(dir)
        .expect("dir")
        .map(|e| e.expect("entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "log"))
        .collect();
    logs.sort();
    let Some(last) = logs.last() else {
        return false;
    };
    let len = std::fs::metadata(last).expect("meta").len();
    if len == 0 {
        return false;
    }
    let file = std::fs::OpenOptions::new()
        .write(true)
        .open(last)
        .expect("open");
    file.set_len(rng.below(len)).expect("cut");
    true
}

type Pending = Pin<Box<dyn Future<Output = Result<Grant, AcquireError>>>>;

/// One grant the test was answered.
#[derive(Debug, Clone)]
struct Held {
    /// 0: the plain limiter, 1: the keyed one.
    limiter: usize,
    key: Option<&'static str>,
    token: FencingToken,
    permits: u32,
    /// The lease end the last answer named.
    deadline: u64,
    /// An answered release, or an extend answered `Lost`: gone.
    gone: bool,
}

/// The test's own record: the store never sees it.
#[derive(Default, Clone)]
struct Witness {
    /// Answered grants by label (each acquire has its own label).
    held: BTreeMap<String, Held>,
    /// Labels of acquires still waiting (their outcome not taken yet).
    pending: BTreeMap<String, (usize, Option<&'static str>)>,
    /// Labels of waits the test gave up (a grant made to them goes back; if the crash came
    /// between, it may be restored).
    dropped: BTreeSet<String>,
    /// The largest token answered, per limiter.
    max_token: [u64; 2],
    /// The highest limit configured, per limiter (total), and per key.
    max_limit: [u32; 2],
    max_per_key: u32,
}

struct Run {
    limiters: [MemoryLimiter<WallClock>; 2],
    waits: Vec<(String, Pending)>,
    witness: Witness,
    next_label: u64,
}

fn names() -> [LimiterName; 2] {
    [
        LimiterName::new("plain").expect("name"),
        LimiterName::new("keyed").expect("name"),
    ]
}

fn plain_spec(limit: u32) -> LimiterSpec {
    LimiterSpec::concurrency(limit)
        .with_default_lease(HOUR)
        .with_max_wait(HOUR)
}

impl Run {
    /// Takes every outcome already decided (no await: no timer pass in between).
    fn poll_waits(&mut self) {
        let mut cx = Context::from_waker(Waker::noop());
        let mut still = Vec::new();
        for (label, mut fut) in self.waits.drain(..) {
            match fut.as_mut().poll(&mut cx) {
                Poll::Pending => still.push((label, fut)),
                Poll::Ready(out) => {
                    let (limiter, key) = self.witness.pending.remove(&label).expect("pending");
                    if let Ok(g) = out {
                        self.witness.answered(label, limiter, key, &g);
                    }
                }
            }
        }
        self.waits = still;
    }

    async fn acquire(&mut self, rng: &mut Rng) {
        let limiter = rng.below(2) as usize;
        let key = (limiter == 1).then(|| KEYS[rng.below(3) as usize]);
        let label = format!("g{}", self.next_label);
        self.next_label += 1;
        let lease = if rng.below(3) == 0 {
            Duration::from_millis(5 + rng.below(40))
        } else {
            HOUR
        };
        let permits = 1 + rng.below(2) as u32;
        let mut options = AcquireOptions::new()
            .holder(label.clone())
            .lease(lease)
            .permits(permits);
        let queue = rng.below(2) == 0;
        if !queue {
            options = options.wait(Duration::ZERO);
        }
        let l = self.limiters[limiter].clone();
        let mut fut: Pending = Box::pin(async move {
            match key {
                Some(key) => l.acquire_keyed(key, options).await,
                None => l.acquire(options).await,
            }
        });
        self.witness.pending.insert(label.clone(), (limiter, key));
        match fut.as_mut().poll(&mut Context::from_waker(Waker::noop())) {
            Poll::Ready(out) => {
                self.witness.pending.remove(&label);
                if let Ok(g) = out {
                    self.witness.answered(label, limiter, key, &g);
                }
            }
            Poll::Pending => self.waits.push((label, fut)),
        }
    }

    async fn release_or_extend(&mut self, rng: &mut Rng) {
        let live: Vec<String> = self
            .witness
            .held
            .iter()
            .filter(|(_, h)| !h.gone)
            .map(|(l, _)| l.clone())
            .collect();
        if live.is_empty() {
            return;
        }
        let label = live[rng.below(live.len() as u64) as usize].clone();
        let h = self.witness.held[&label].clone();
        let backend = &self.limiters[h.limiter];
        if rng.below(3) == 0 {
            let lease = if rng.below(2) == 0 {
                HOUR
            } else {
                Duration::from_millis(10 + rng.below(40))
            };
            let out = match h.key {
                Some(key) => backend.extend_keyed(key, h.token, lease, None).await,
                None => backend.extend(h.token, lease, None).await,
            };
            let entry = self.witness.held.get_mut(&label).expect("held");
            match out {
                Ok(deadline) => entry.deadline = deadline.0,
                Err(ExtendError::Lost) => entry.gone = true,
                Err(e) => panic!("extend: {e}"),
            }
        } else {
            backend.release(h.token).await.expect("release");
            // Released now, or already gone (its lease ended): either way not held.
            self.witness.held.get_mut(&label).expect("held").gone = true;
        }
    }

    fn drop_a_wait(&mut self, rng: &mut Rng) {
        if self.waits.is_empty() {
            return;
        }
        let i = rng.below(self.waits.len() as u64) as usize;
        let (label, fut) = self.waits.swap_remove(i);
        drop(fut);
        self.witness.pending.remove(&label);
        self.witness.dropped.insert(label);
    }

    async fn reconfigure(&mut self, store: &MemoryStore<WallClock>, rng: &mut Rng) {
        let [plain, keyed] = names();
        if rng.below(2) == 0 {
            let limit = 2 + rng.below(5) as u32;
            self.witness.max_limit[0] = self.witness.max_limit[0].max(limit);
            store
                .put_limiter(&plain, plain_spec(limit))
                .await
                .expect("reconfigure");
        } else {
            let total = 3 + rng.below(5) as u32;
            let per_key = 1 + rng.below(3) as u32;
            self.witness.max_limit[1] = self.witness.max_limit[1].max(total);
            self.witness.max_per_key = self.witness.max_per_key.max(per_key);
            store
                .put_keyed_limiter(&keyed, plain_spec(total), KeyedSpec::per_key(per_key))
                .await
                .expect("reconfigure keyed");
        }
    }
}

impl Witness {
    fn answered(&mut self, label: String, limiter: usize, key: Option<&'static str>, g: &Grant) {
        self.max_token[limiter] = self.max_token[limiter].max(g.token.0);
        self.held.insert(
            label,
            Held {
                limiter,
                key,
                token: g.token,
                permits: g.permits,
                deadline: g.lease_deadline.0,
                gone: false,
            },
        );
    }
}

/// One seed: a random schedule, a crash at a random step, the checks on the reopened copy.
async fn run_seed(seed: u64) {
    let mut rng = Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1);
    let dir = tempfile::tempdir().expect("tempdir");
    let durability = Durability::new(dir.path()).snapshot_after_bytes(1 + rng.below(4096));
    let (store, _) = MemoryStore::open(durability).expect("open");
    let [plain, keyed] = names();
    store
        .put_limiter(&plain, plain_spec(3))
        .await
        .expect("plain");
    store
        .put_keyed_limiter(&keyed, plain_spec(4), KeyedSpec::per_key(2))
        .await
        .expect("keyed");
    let limiters = [
        store.limiter(&plain).await.expect("plain"),
        store.limiter(&keyed).await.expect("keyed"),
    ];
    let mut run = Run {
        limiters,
        waits: Vec::new(),
        witness: Witness {
            max_limit: [3, 4],
            max_per_key: 2,
            ..Witness::default()
        },
        next_label: 0,
    };
    let steps = 20 + rng.below(60);
    // Crashes taken along the way (a copy and the witness then), checked after the run.
    let mut crashes = Vec::new();
    for _ in 0..steps {
        match rng.below(20) {
            0..=7 => run.acquire(&mut rng).await,
            8..=10 => run.release_or_extend(&mut rng).await,
            11 => run.drop_a_wait(&mut rng),
            12 | 13 => run.reconfigure(&store, &mut rng).await,
            14 => store.snapshot_now().expect("snapshot"),
            15 => {
                // Time passes with the runtime blocked: the next operation applies it.
                std::thread::sleep(Duration::from_millis(rng.below(20)));
            }
            16 | 17 => {
                // Time passes with the runtime blocked, and a read applies it.
                std::thread::sleep(Duration::from_millis(rng.below(20)));
                let l = &run.limiters[rng.below(2) as usize];
                l.holders(100).await.expect("holders");
                let _ = l.keys(10).await.expect("keys");
            }
            _ => {
                // Time passes with the runtime free: timer passes apply it.
                tokio::time::sleep(Duration::from_millis(rng.below(20))).await;
            }
        }
        run.poll_waits();
        if rng.below(8) == 0 {
            crashes.push(crash(dir.path(), &run.witness, &mut rng));
        }
    }
    crashes.push(crash(dir.path(), &run.witness, &mut rng));
    for (copy, witness, cut) in crashes {
        check(&witness, copy.path(), cut).await;
    }
    drop(run);
    store.close();
}

/// A crash now: the directory's copy (its log cut at a random byte, half the time) and the
/// witness as it stands.
fn crash(dir: &Path, witness: &Witness, rng: &mut Rng) -> (tempfile::TempDir, Witness, bool) {
    let copy = tempfile::tempdir().expect("tempdir");
    crash_copy(dir, copy.path());
    let cut = rng.below(2) == 0 && cut_log(copy.path(), rng);
    (copy, witness.clone(), cut)
}

async fn check(w: &Witness, dir: &Path, cut: bool) {
    let (after, report) = MemoryStore::open(Durability::new(dir)).expect("reopen");
    let by_label: BTreeMap<&str, &Held> = w.held.iter().map(|(l, h)| (l.as_str(), h)).collect();
    for (i, name) in names().iter().enumerate() {
        let l = match after.limiter(name).await {
            Ok(l) => l,
            // The cut took the limiter's creation: nothing of it is restored.
            Err(_) if cut => continue,
            Err(e) => panic!("{name}: {e}"),
        };
        // Status, holders, status: leases may end in between (never a grant: the reopened
        // limiter has no waiters), so the holders add up to between the two.
        let status = l.status().await.expect("status");
        let view = l.holders(10_000).await.expect("holders");
        let status_after = l.status().await.expect("status");
        let mut sum = 0u32;
        let mut per_key: BTreeMap<&str, u32> = BTreeMap::new();
        for h in &view.holders {
            let label = h.label.as_deref().expect("every acquire is labelled");
            sum += h.permits;
            let key = match by_label.get(label) {
                Some(seen) => {
                    assert_eq!(seen.limiter, i, "{label}: restored in its own limiter");
                    assert_eq!(seen.token, h.token, "{label}: restored with its token");
                    assert_eq!(seen.permits, h.permits, "{label}: with its permits");
                    assert!(
                        !seen.gone || cut,
                        "{label}: released (or lost) before the crash, restored: {report:?}"
                    );
                    seen.key
                }
                None => {
                    // Granted, but the answer was never taken: a waiter the crash left
                    // waiting, or one the test gave up on.
                    assert!(
                        w.pending.contains_key(label) || w.dropped.contains(label),
                        "{label}: restored but never granted"
                    );
                    w.pending.get(label).and_then(|(_, k)| *k)
                }
            };
            if let Some(key) = key {
                *per_key.entry(key).or_default() += h.permits;
            }
        }
        assert_eq!(view.holders.len() as u32, view.total_holders, "all listed");
        assert!(
            status_after.in_use <= sum && sum <= status.in_use,
            "{name}: in use is what the holders add up to (cut: {cut}): {status:?} {view:?} \
             {status_after:?} {report:?}"
        );
        assert!(
            status.in_use <= w.max_limit[i],
            "{name}: {} in use, the limit was never above {}",
            status.in_use,
            w.max_limit[i]
        );
        for (key, n) in &per_key {
            assert!(
                *n <= w.max_per_key,
                "key {key}: {n} in use, per-key limit never above {}",
                w.max_per_key
            );
        }
        if !cut {
            // Nothing answered is lost.
            for (label, h) in &w.held {
                if h.limiter == i && !h.gone && h.deadline > view.now.0 {
                    assert!(
                        view.holders.iter().any(|r| r.token == h.token),
                        "{label}: answered, not released, lease running, not restored"
                    );
                }
            }
        }
        // No token handed out twice: above every token the witness saw (uncut), or every
        // restored one (cut: the lost tail's grants may be made again).
        let floor = if cut {
            view.holders.iter().map(|h| h.token.0).max().unwrap_or(0)
        } else {
            w.max_token[i].max(view.holders.iter().map(|h| h.token.0).max().unwrap_or(0))
        };
        for key in KEYS {
            let options = AcquireOptions::new().wait(Duration::ZERO);
            let got = if i == 1 {
                l.acquire_keyed(key, options).await
            } else {
                l.acquire(options).await
            };
            if let Ok(g) = got {
                assert!(
                    g.token.0 > floor,
                    "{name}: token {} after the reopen, not above {floor}",
                    g.token.0
                );
            }
        }
    }
    after.close();
}

/// The seeds to run: `RESTART_RANDOM_SEED` alone, or the first `RESTART_RANDOM_SEEDS` (else
/// `default`).
fn seeds(default: u64) -> Vec<u64> {
    match std::env::var("RESTART_RANDOM_SEED") {
        Ok(s) => vec![s.parse().expect("RESTART_RANDOM_SEED is a number")],
        Err(_) => {
            let n = std::env::var("RESTART_RANDOM_SEEDS")
                .ok()
                .and_then(|s| s.parse().ok())
                .unwrap_or(default);
            (1..=n).collect()
        }
    }
}

#[tokio::test(flavor = "current_thread")]
async fn random_schedules_crashed_and_reopened_keep_the_witness() {
    for seed in seeds(12) {
        eprintln!("seed {seed}");
        run_seed(seed).await;
    }
}

/// The soak: 1,000 seeds (about five minutes). Run with
/// `cargo test -p floodgate --test restart_random -- --ignored`.
#[tokio::test(flavor = "current_thread")]
#[ignore = "a soak of several minutes"]
async fn soak_random_schedules_crashed_and_reopened() {
    for seed in seeds(1000) {
        eprintln!("seed {seed}");
        run_seed(seed.wrapping_add(1 << 32)).await;
    }
}
