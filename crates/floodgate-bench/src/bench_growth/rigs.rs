//! The two stores under `floodgate bench-growth`, behind one interface: each operation done
//! once and its cost measured the store's way (wall time in process; Redis's own time there).

use std::collections::VecDeque;
use std::future::Future;
use std::pin::{pin, Pin};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use floodgate::{
    AcquireError, FencingToken, Grant, LimiterBackend, LimiterName, LimiterSpec, MemoryLimiter,
    MemoryStore, RedisLimiter, RedisStore, Refusal, Store,
};
use redis::aio::MultiplexedConnection;

use super::{request, timed, ManualClock, LONG};
use floodgate_server::cli::Failure;

/// What one operation cost.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Cost {
    /// Nanoseconds: of wall time (embedded) or of Redis's time in scripts (Redis).
    pub(crate) ns: f64,
    /// Commands Redis ran for it, the scripts' own included (0 on the embedded store).
    pub(crate) cmds: u64,
}

fn fail(message: impl std::fmt::Display) -> Failure {
    Failure {
        code: 1,
        message: message.to_string(),
    }
}

/// One store, one limiter at a time. Every call does one operation on the current limiter.
pub(crate) trait Rig {
    /// A queued acquire, kept alive while it waits.
    type Waiter;
    async fn create(&mut self, name: &LimiterName, spec: LimiterSpec) -> Result<(), Failure>;
    /// Deletes the limiter, after its remaining waiters are done with.
    async fn delete(
        &mut self,
        name: &LimiterName,
        waiters: VecDeque<Self::Waiter>,
    ) -> Result<(), Failure>;
    /// An acquire that must be granted at once.
    async fn acquire(&mut self) -> Result<(Cost, FencingToken), Failure>;
    async fn release(&mut self, token: FencingToken) -> Result<Cost, Failure>;
    /// An acquire that must queue (at the tail), waiting at most `wait`.
    async fn enqueue(&mut self, wait: Duration) -> Result<(Cost, Self::Waiter), Failure>;
    /// The waiter goes away while queued.
    async fn cancel(&mut self, waiter: Self::Waiter) -> Result<Cost, Failure>;
    /// `holder` releases and `head` (the head of the queue) is granted; returns its token.
    async fn handoff(
        &mut self,
        holder: FencingToken,
        head: Self::Waiter,
    ) -> Result<(Cost, FencingToken), Failure>;
    /// The short wait of `waiter` (at the tail) ends.
    async fn timeout(&mut self, waiter: Self::Waiter) -> Result<Cost, Failure>;
    async fn put(&mut self, name: &LimiterName, spec: LimiterSpec) -> Result<Cost, Failure>;
    async fn status(&mut self) -> Result<Cost, Failure>;
    /// Acquires queued now, as the store reports it (a check that the bench measures the
    /// queue length it says).
    async fn waiting(&mut self) -> Result<usize, Failure>;
    /// `waiter` was granted but goes away before taking its grant, which then goes back.
    /// `None` where this cannot be brought about on purpose through the public API.
    async fn cancel_raced(&mut self, waiter: Self::Waiter) -> Result<Option<Cost>, Failure>;
}

/// Polls `fut` once, with a waker that does nothing: the embedded store decides every
/// operation in its first poll, so whether it is done is known at once.
fn poll_now<F: Future + ?Sized>(fut: Pin<&mut F>) -> Poll<F::Output> {
    fut.poll(&mut Context::from_waker(Waker::noop()))
}

/// Runs `fut` to completion in one poll, or fails saying which operation did not.
fn now_or_fail<F: Future>(what: &str, fut: F) -> Result<F::Output, Failure> {
    match poll_now(pin!(fut)) {
        Poll::Ready(out) => Ok(out),
        Poll::Pending => Err(fail(format!("embedded {what} did not complete at once"))),
    }
}

type Acquiring = Pin<Box<dyn Future<Output = Result<Grant, AcquireError>> + Send>>;

/// The embedded store on a clock moved by hand.
pub(crate) struct EmbeddedRig {
    store: MemoryStore<ManualClock>,
    clock: ManualClock,
    limiter: Option<MemoryLimiter<ManualClock>>,
}

impl EmbeddedRig {
    pub(crate) fn new(store: MemoryStore<ManualClock>, clock: ManualClock) -> Self {
        EmbeddedRig {
            store,
            clock,
            limiter: None,
        }
    }

    fn limiter(&self) -> Result<MemoryLimiter<ManualClock>, Failure> {
        self.limiter.clone().ok_or_else(|| fail("no limiter"))
    }
}

impl Rig for EmbeddedRig {
    type Waiter = Acquiring;

    async fn create(&mut self, name: &LimiterName, spec: LimiterSpec) -> Result<(), Failure> {
        self.store.put_limiter(name, spec).await.map_err(fail)?;
        self.limiter = Some(self.store.limiter(name).await.map_err(fail)?);
        Ok(())
    }

    async fn delete(
        &mut self,
        name: &LimiterName,
        waiters: VecDeque<Acquiring>,
    ) -> Result<(), Failure> {
        drop(waiters);
        self.store.delete_limiter(name).await.map_err(fail)?;
        self.limiter = None;
        Ok(())
    }

    async fn acquire(&mut self) -> Result<(Cost, FencingToken), Failure> {
        let lim = self.limiter()?;
        // The synchronous path an acquire the store can decide at once takes (as through
        // `Limiter::acquire` and the server's handler); the store's general acquire otherwise.
        let (cost, out) = timed(|| {
            let options = request(LONG);
            match lim.acquire_at_once(&options) {
                Some(decided) => Ok(decided),
                None => now_or_fail("acquire", lim.acquire(options)),
            }
        });
        let grant = out?.map_err(|e| fail(format!("acquire not granted: {e}")))?;
        Ok((cost, grant.token))
    }

    async fn release(&mut self, token: FencingToken) -> Result<Cost, Failure> {
        let lim = self.limiter()?;
        let (cost, out) = timed(|| now_or_fail("release", lim.release(token)));
        match out?.map_err(fail)? {
            true => Ok(cost),
            false => Err(fail("release of a permit not held")),
        }
    }

    async fn enqueue(&mut self, wait: Duration) -> Result<(Cost, Acquiring), Failure> {
        let lim = self.limiter()?;
        let (cost, (fut, first)) = timed(|| {
            let mut fut: Acquiring = Box::pin(async move { lim.acquire(request(wait)).await });
            let first = poll_now(fut.as_mut());
            (fut, first)
        });
        match first {
            Poll::Pending => Ok((cost, fut)),
            Poll::Ready(_) => Err(fail("an acquire that should queue did not")),
        }
    }

    async fn cancel(&mut self, waiter: Acquiring) -> Result<Cost, Failure> {
        Ok(timed(|| drop(waiter)).0)
    }

    async fn handoff(
        &mut self,
        holder: FencingToken,
        mut head: Acquiring,
    ) -> Result<(Cost, FencingToken), Failure> {
        let lim = self.limiter()?;
        let (cost, out) = timed(|| {
            let released = now_or_fail("release", lim.release(holder));
            (released, poll_now(head.as_mut()))
        });
        match out {
            (Ok(Ok(true)), Poll::Ready(Ok(grant))) => Ok((cost, grant.token)),
            _ => Err(fail("the head waiter was not granted by the release")),
        }
    }

    async fn timeout(&mut self, mut waiter: Acquiring) -> Result<Cost, Failure> {
        let lim = self.limiter()?;
        // The wait (20 ms) is over; the next operation, a status read, applies it.
        self.clock.advance(Duration::from_millis(40));
        let (cost, out) = timed(|| now_or_fail("status", lim.status()));
        out?.map_err(fail)?;
        match poll_now(waiter.as_mut()) {
            Poll::Ready(Err(AcquireError::Refused(Refusal::WaitTimeout { .. }))) => Ok(cost),
            _ => Err(fail("the waiter did not time out")),
        }
    }

    async fn put(&mut self, name: &LimiterName, spec: LimiterSpec) -> Result<Cost, Failure> {
        let store = self.store.clone();
        let (cost, out) = timed(|| now_or_fail("put", store.put_limiter(name, spec)));
        out?.map_err(fail)?;
        Ok(cost)
    }

    async fn status(&mut self) -> Result<Cost, Failure> {
        let lim = self.limiter()?;
        let (cost, out) = timed(|| now_or_fail("status", lim.status()));
        out?.map_err(fail)?;
        Ok(cost)
    }

    async fn waiting(&mut self) -> Result<usize, Failure> {
        let lim = self.limiter()?;
        let status = now_or_fail("status", lim.status())?.map_err(fail)?;
        Ok(status.waiting as usize)
    }

    async fn cancel_raced(&mut self, waiter: Acquiring) -> Result<Option<Cost>, Failure> {
        // Granted under the lock but never polled: dropping it gives the grant back.
        Ok(Some(timed(|| drop(waiter)).0))
    }
}

/// Redis's counters of its own work, from `INFO commandstats`.
#[derive(Debug, Clone, Copy, Default)]
struct Stats {
    /// Microseconds spent in script calls (their commands included).
    script_us: u64,
    /// Script calls.
    scripts: u64,
    /// Every command but `INFO`, those run inside scripts included.
    cmds: u64,
}

/// The Redis store, its cost read from Redis's own counters.
pub(crate) struct RedisRig {
    store: RedisStore,
    limiter: Option<RedisLimiter>,
    /// A plain connection for `INFO`, apart from the store's.
    conn: MultiplexedConnection,
}

type Spawned = tokio::task::JoinHandle<Result<Grant, AcquireError>>;

/// How long any one operation may take to show up in Redis's counters before the bench fails.
const SETTLE: Duration = Duration::from_secs(30);

impl RedisRig {
    pub(crate) async fn new(store: RedisStore, url: &str) -> Result<Self, Failure> {
        let client = redis::Client::open(url).map_err(|e| fail(format!("{url}: {e}")))?;
        let conn = client
            .get_multiplexed_async_connection()
            .await
            .map_err(|e| fail(format!("{url}: {e}")))?;
        Ok(RedisRig {
            store,
            limiter: None,
            conn,
        })
    }

    fn limiter(&self) -> Result<RedisLimiter, Failure> {
        self.limiter.clone().ok_or_else(|| fail("no limiter"))
    }

    async fn stats(&mut self) -> Result<Stats, Failure> {
        let info: String = redis::cmd("INFO")
            .arg("commandstats")
            .query_async(&mut self.conn)
            .await
            .map_err(|e| fail(format!("INFO commandstats: {e}")))?;
        let mut stats = Stats::default();
        for line in info.lines() {
            let Some((cmd, fields)) = line
                .strip_prefix("cmdstat_")
                .and_then(|l| l.split_once(':'))
            else {
                continue;
            };
            let field = |name: &str| -> u64 {
                fields
                    .split(',')
                    .find_map(|f| f.strip_prefix(name)?.strip_prefix('='))
                    .and_then(|v| v.parse().ok())
                    .unwrap_or(0)
            };
            if cmd == "info" {
                continue;
            }
            stats.cmds += field("calls");
            if matches!(
                cmd,
                "evalsha" | "eval" | "evalsha_ro" | "eval_ro" | "fcall" | "fcall_ro"
            ) {
                stats.scripts += field("calls");
                stats.script_us += field("usec");
            }
        }
        Ok(stats)
    }

    /// Waits until Redis has run at least `scripts` more script calls than `before`, and
    /// returns the cost since `before`.
    async fn settled(&mut self, before: Stats, scripts: u64) -> Result<Cost, Failure> {
        let start = Instant::now();
        loop {
            let now = self.stats().await?;
            if now.scripts >= before.scripts + scripts {
                return Ok(Cost {
                    ns: (now.script_us.saturating_sub(before.script_us) * 1000) as f64,
                    cmds: now.cmds.saturating_sub(before.cmds),
                });
            }
            if start.elapsed() > SETTLE {
                return Err(fail("Redis did not run the expected script in time"));
            }
            tokio::task::yield_now().await;
        }
    }

    /// Waits until no script has run for a while: what the last operation set off is done.
    async fn quiesce(&mut self) -> Result<(), Failure> {
        let mut last = self.stats().await?.scripts;
        let start = Instant::now();
        loop {
            tokio::time::sleep(Duration::from_millis(100)).await;
            let now = self.stats().await?.scripts;
            if now == last || start.elapsed() > SETTLE {
                return Ok(());
            }
            last = now;
        }
    }
}

impl Rig for RedisRig {
    type Waiter = Spawned;

    async fn create(&mut self, name: &LimiterName, spec: LimiterSpec) -> Result<(), Failure> {
        self.store.put_limiter(name, spec).await.map_err(fail)?;
        self.limiter = Some(self.store.limiter(name).await.map_err(fail)?);
        Ok(())
    }

    async fn delete(
        &mut self,
        name: &LimiterName,
        waiters: VecDeque<Spawned>,
    ) -> Result<(), Failure> {
        // Deleting answers every waiter (LimiterDeleted); any not answered in time is dropped.
        self.store.delete_limiter(name).await.map_err(fail)?;
        for w in waiters {
            if tokio::time::timeout(Duration::from_secs(5), w)
                .await
                .is_err()
            {
                break;
            }
        }
        self.limiter = None;
        self.quiesce().await
    }

    async fn acquire(&mut self) -> Result<(Cost, FencingToken), Failure> {
        let lim = self.limiter()?;
        let before = self.stats().await?;
        let grant = lim
            .acquire(request(LONG))
            .await
            .map_err(|e| fail(format!("acquire not granted: {e}")))?;
        Ok((self.settled(before, 1).await?, grant.token))
    }

    async fn release(&mut self, token: FencingToken) -> Result<Cost, Failure> {
        let lim = self.limiter()?;
        let before = self.stats().await?;
        if !lim.release(token).await.map_err(fail)? {
            return Err(fail("release of a permit not held"));
        }
        self.settled(before, 1).await
    }

    async fn enqueue(&mut self, wait: Duration) -> Result<(Cost, Spawned), Failure> {
        let lim = self.limiter()?;
        let before = self.stats().await?;
        let waiter = tokio::spawn(async move { lim.acquire(request(wait)).await });
        let cost = self.settled(before, 1).await?;
        if waiter.is_finished() && wait > Duration::from_millis(100) {
            return Err(fail("an acquire that should queue did not"));
        }
        Ok((cost, waiter))
    }

    async fn cancel(&mut self, waiter: Spawned) -> Result<Cost, Failure> {
        let before = self.stats().await?;
        waiter.abort();
        // The dropped acquire cancels itself in the background: one script call.
        let _ = waiter.await;
        self.settled(before, 1).await
    }

    async fn handoff(
        &mut self,
        holder: FencingToken,
        head: Spawned,
    ) -> Result<(Cost, FencingToken), Failure> {
        let lim = self.limiter()?;
        let before = self.stats().await?;
        if !lim.release(holder).await.map_err(fail)? {
            return Err(fail("release of a permit not held"));
        }
        let grant = tokio::time::timeout(SETTLE, head)
            .await
            .map_err(|_| fail("the head waiter was not granted in time"))?
            .map_err(fail)?
            .map_err(|e| fail(format!("the head waiter was not granted: {e}")))?;
        Ok((self.settled(before, 1).await?, grant.token))
    }

    async fn timeout(&mut self, waiter: Spawned) -> Result<Cost, Failure> {
        let before = self.stats().await?;
        // The waiter's own timer ends its wait and asks the script to decide.
        let out = tokio::time::timeout(SETTLE, waiter)
            .await
            .map_err(|_| fail("the waiter did not time out in time"))?
            .map_err(fail)?;
        if !matches!(out, Err(AcquireError::Refused(Refusal::WaitTimeout { .. }))) {
            return Err(fail("the waiter did not time out"));
        }
        self.settled(before, 1).await
    }

    async fn put(&mut self, name: &LimiterName, spec: LimiterSpec) -> Result<Cost, Failure> {
        let before = self.stats().await?;
        self.store.put_limiter(name, spec).await.map_err(fail)?;
        self.settled(before, 1).await
    }

    async fn status(&mut self) -> Result<Cost, Failure> {
        let lim = self.limiter()?;
        let before = self.stats().await?;
        lim.status().await.map_err(fail)?;
        self.settled(before, 1).await
    }

    async fn waiting(&mut self) -> Result<usize, Failure> {
        let lim = self.limiter()?;
        Ok(lim.status().await.map_err(fail)?.waiting as usize)
    }

    async fn cancel_raced(&mut self, waiter: Spawned) -> Result<Option<Cost>, Failure> {
        // Over Redis the grant reaches the waiter by pub/sub at once; dropping it exactly
        // between the grant and its delivery cannot be arranged from here. Take it and give
        // it back, so the holders stay as they were.
        let grant = tokio::time::timeout(SETTLE, waiter)
            .await
            .map_err(|_| fail("the waiter was not granted in time"))?
            .map_err(fail)?
            .map_err(|e| fail(format!("the waiter was not granted: {e}")))?;
        self.limiter()?.release(grant.token).await.map_err(fail)?;
        Ok(None)
    }
}
