//! The Rust API: [`Floodgate`], [`Limiter`] handles and [`Permit`] guards.

use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use crate::core::{AcquireRequest, Grant, LimiterStatus};
use crate::error::{AcquireError, ExtendError, StoreError};
use crate::spec::LimiterSpec;
use crate::store::{LimiterBackend, MemoryStore, Store};
use crate::types::{FencingToken, LimiterName, PermitId, Timestamp};

/// Entry point: a set of named limiters in a store.
#[derive(Debug, Clone)]
pub struct Floodgate<S: Store = MemoryStore> {
    store: S,
}

impl Floodgate<MemoryStore> {
    /// Limiters in this process's memory (the embedded store). Call inside a tokio runtime.
    pub fn in_memory() -> Self {
        Floodgate::with_store(MemoryStore::new())
    }
}

impl<S: Store> Floodgate<S> {
    /// Limiters in the given store.
    pub fn with_store(store: S) -> Self {
        Floodgate { store }
    }

    /// The underlying store.
    pub fn store(&self) -> &S {
        &self.store
    }

    /// Creates the limiter or changes its spec (a raised limit wakes waiters at once).
    ///
    /// # Errors
    ///
    /// [`StoreError::BadName`] for a name that is not a limiter name, [`StoreError::Invalid`]
    /// naming the first field out of range, [`StoreError::TooManyLimiters`] when the store is
    /// full, [`StoreError::Unavailable`] when the store cannot be reached.
    ///
    /// # Cancel safety
    ///
    /// Dropping the future may leave the change made or not made. It is idempotent: define
    /// again.
    ///
    /// ```
    /// use floodgate::{Floodgate, LimiterSpec, StoreError};
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// let gate = Floodgate::in_memory();
    /// let status = gate.define("snuba", LimiterSpec::concurrency(50)).await?;
    /// assert_eq!(status.limit, Some(50));
    /// let bad = gate.define("snuba", LimiterSpec::concurrency(0)).await;
    /// assert!(matches!(bad, Err(StoreError::Invalid(f)) if f.field == "concurrency"));
    /// # Ok(())
    /// # }
    /// ```
    pub async fn define(&self, name: &str, spec: LimiterSpec) -> Result<LimiterStatus, StoreError> {
        let name = LimiterName::new(name)?;
        self.store.put_limiter(&name, spec).await
    }

    /// Creates a keyed limiter (a limit per key under the total of `spec`, keys served
    /// fairly) or changes its spec. Acquire from it with [`AcquireOptions::key`].
    ///
    /// # Errors
    ///
    /// As [`define`](Self::define), and [`StoreError::Invalid`] naming `per_key` when a plain
    /// limiter of that name exists (delete it first to re-create it keyed), or
    /// `per_key.concurrency` when no limit is given anywhere (no concurrency and no rate, in
    /// total or per key).
    ///
    /// # Cancel safety
    ///
    /// As [`define`](Self::define): the change may or may not be made; define again.
    ///
    /// ```
    /// use floodgate::{AcquireOptions, Floodgate, KeyedSpec, LimiterSpec, StoreError};
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// let gate = Floodgate::in_memory();
    /// gate.define_keyed("orgs", LimiterSpec::concurrency(50), KeyedSpec::per_key(5))
    ///     .await?;
    /// let orgs = gate.limiter("orgs").await?;
    /// let permit = orgs.acquire(AcquireOptions::new().key("org-42")).await?;
    /// assert_eq!(permit.key(), Some("org-42"));
    ///
    /// gate.define("plain", LimiterSpec::concurrency(5)).await?;
    /// let turned = gate
    ///     .define_keyed("plain", LimiterSpec::concurrency(5), KeyedSpec::per_key(1))
    ///     .await;
    /// assert!(matches!(turned, Err(StoreError::Invalid(f)) if f.field == "per_key"));
    /// # Ok(())
    /// # }
    /// ```
    pub async fn define_keyed(
        &self,
        name: &str,
        spec: LimiterSpec,
        keyed: crate::core::keyed::KeyedSpec,
    ) -> Result<LimiterStatus, StoreError> {
        let name = LimiterName::new(name)?;
        self.store.put_keyed_limiter(&name, spec, keyed).await
    }

    /// Deletes the limiter; `false` if it did not exist. Its waiters are refused, its permits
    /// are no longer held.
    ///
    /// # Errors
    ///
    /// [`StoreError::BadName`], or [`StoreError::Unavailable`] when the store cannot be
    /// reached.
    ///
    /// # Cancel safety
    ///
    /// Dropping the future may leave the limiter deleted or not. Delete again to be sure.
    ///
    /// ```
    /// use floodgate::{Floodgate, LimiterSpec};
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// let gate = Floodgate::in_memory();
    /// gate.define("batch", LimiterSpec::concurrency(4)).await?;
    /// assert!(gate.delete("batch").await?);
    /// assert!(!gate.delete("batch").await?);
    /// # Ok(())
    /// # }
    /// ```
    pub async fn delete(&self, name: &str) -> Result<bool, StoreError> {
        let name = LimiterName::new(name)?;
        self.store.delete_limiter(&name).await
    }

    /// Every limiter's status, ordered by name.
    ///
    /// # Errors
    ///
    /// [`StoreError::Unavailable`] when the store cannot be reached.
    ///
    /// # Cancel safety
    ///
    /// Cancel-safe: it only reads.
    ///
    /// ```
    /// use floodgate::{Floodgate, LimiterSpec};
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// let gate = Floodgate::in_memory();
    /// gate.define("b", LimiterSpec::concurrency(1)).await?;
    /// gate.define("a", LimiterSpec::concurrency(2)).await?;
    /// let names: Vec<_> = gate.limiters().await?.into_iter().map(|s| s.name).collect();
    /// assert_eq!(names.iter().map(|n| n.as_str()).collect::<Vec<_>>(), ["a", "b"]);
    /// # Ok(())
    /// # }
    /// ```
    pub async fn limiters(&self) -> Result<Vec<LimiterStatus>, StoreError> {
        self.store.list_limiters().await
    }

    /// A handle to an existing limiter. Keep it: acquiring through it skips the name lookup.
    /// After the limiter is deleted the handle answers `UnknownLimiter`. On the embedded store
    /// it keeps answering that even once the name is re-created (take a new handle then); a
    /// Redis handle names the limiter, so after a re-create (by any server) it acts on the new
    /// one and its grants count against the new limit.
    ///
    /// # Errors
    ///
    /// [`StoreError::BadName`], [`StoreError::UnknownLimiter`] when no limiter has the name,
    /// [`StoreError::Unavailable`] when the store cannot be reached.
    ///
    /// # Cancel safety
    ///
    /// Cancel-safe: it only reads.
    ///
    /// ```
    /// use floodgate::{Floodgate, LimiterSpec, StoreError};
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// let gate = Floodgate::in_memory();
    /// gate.define("snuba", LimiterSpec::concurrency(50)).await?;
    /// let snuba = gate.limiter("snuba").await?;
    /// assert_eq!(snuba.name().as_str(), "snuba");
    /// assert!(matches!(gate.limiter("nope").await, Err(StoreError::UnknownLimiter(_))));
    /// # Ok(())
    /// # }
    /// ```
    pub async fn limiter(&self, name: &str) -> Result<Limiter<S::Limiter>, StoreError> {
        let name = LimiterName::new(name)?;
        Ok(Limiter {
            backend: self.store.limiter(&name).await?,
        })
    }
}

/// Options of one acquire, the only way to describe one: a builder, so options added later
/// break no caller. Unset fields take the limiter's defaults.
///
/// ```
/// use std::time::Duration;
/// use floodgate::AcquireOptions;
///
/// let options = AcquireOptions::new()
///     .permits(2)
///     .wait(Duration::from_secs(5))
///     .lease(Duration::from_secs(60))
///     .holder("worker-7/task-123")
///     .request_id("9f1c2e4a-task-123");
/// # let _ = options;
/// ```
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AcquireOptions {
    /// The state machine's request these options build (kept internal: its fields may change).
    request: AcquireRequest,
    /// The key, for a keyed limiter (see [`crate::core::keyed`]); `None` for a plain one.
    key: Option<Arc<str>>,
}

impl AcquireOptions {
    /// One permit, the default lease and the default (maximum) wait.
    pub fn new() -> Self {
        AcquireOptions::default()
    }

    /// How many permits (default 1).
    pub fn permits(mut self, permits: u32) -> Self {
        self.request.permits = permits;
        self
    }

    /// Lease length (default: the limiter's default lease).
    pub fn lease(mut self, lease: Duration) -> Self {
        self.request.lease = Some(lease);
        self
    }

    /// How long to wait at most (default and cap: the limiter's `max_wait`). Zero: try once.
    pub fn wait(mut self, wait: Duration) -> Self {
        self.request.wait = Some(wait);
        self
    }

    /// A label for introspection (a worker or task id): at most
    /// [`MAX_HOLDER_CHARS`](crate::spec::MAX_HOLDER_CHARS) characters and no control
    /// characters, else the acquire is refused naming `holder`.
    pub fn holder(mut self, holder: impl Into<Arc<str>>) -> Self {
        self.request.holder = Some(holder.into());
        self
    }

    /// Makes the acquire idempotent: a repeat with the same id while the first is queued or
    /// its grant held gets that grant (or joins that wait) instead of a second permit. A
    /// rate-only limiter's grant holds nothing: its id is remembered for the limiter's default
    /// lease from the grant, and a repeat within it gets the same grant (same fencing token,
    /// not counted again, no new tokens); after it, or once a `PUT` gave the limiter a
    /// concurrency limit, the id names a new acquire. A repeat
    /// asking for other permits is refused ([`Refusal::Invalid`](crate::Refusal::Invalid) naming
    /// `request_id`). A future dropped while queued with an id leaves its wait queued for 5 s
    /// (at most until the wait ends) for a retry to join; a grant made while nobody waits for it
    /// is released at once, unless it goes to the retry (in memory, a retry whose own call made
    /// the grant, as when a lease had just ended; on Redis, where a retry may come through
    /// another server, one that claimed it first). A repeat handed the grant made for a first attempt that has not taken it yet
    /// holds it: dropping the first attempt does not give it back (in memory, the first
    /// attempt ends with [`AcquireError::Superseded`] if still polled).
    pub fn request_id(mut self, id: impl Into<Arc<str>>) -> Self {
        self.request.request_id = Some(id.into());
        self
    }

    /// For a keyed limiter: the key (a tenant, an organization) this acquire counts against.
    /// Its waiters queue FIFO per key and keys share the total fairly. Required by a keyed
    /// limiter, refused by a plain one.
    pub fn key(mut self, key: impl Into<Arc<str>>) -> Self {
        self.key = Some(key.into());
        self
    }

    /// The key, if one is set.
    pub fn key_of(&self) -> Option<&str> {
        self.key.as_deref()
    }

    /// These options with no request id: for the tower layers, whose options are shared by
    /// every call (one id would make all the calls share one grant).
    pub(crate) fn without_request_id(mut self) -> Self {
        self.request.request_id = None;
        self
    }

    /// The request the store sees, borrowed (for a store's synchronous fast path).
    pub(crate) fn request(&self) -> &AcquireRequest {
        &self.request
    }

    /// The request the store sees.
    pub(crate) fn into_request(self) -> AcquireRequest {
        self.request
    }
}

/// The state machine's request as options (for users of the `unstable-core` feature).
impl From<AcquireRequest> for AcquireOptions {
    fn from(request: AcquireRequest) -> Self {
        AcquireOptions { request, key: None }
    }
}

/// A handle to one limiter. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Limiter<B> {
    backend: B,
}

impl<B: LimiterBackend> Limiter<B> {
    /// Wraps a store's limiter handle.
    pub fn from_backend(backend: B) -> Self {
        Limiter { backend }
    }

    /// The limiter's name.
    pub fn name(&self) -> &LimiterName {
        self.backend.name()
    }

    /// Waits in FIFO order for permits: never overtakes an earlier acquire, and is woken (not
    /// polled) when its turn comes. On a keyed limiter ([`AcquireOptions::key`]) the order is
    /// FIFO within the key, and keys waiting for the total share it in weighted round robin,
    /// so an acquire may pass an earlier one of another key.
    ///
    /// # Errors
    ///
    /// [`AcquireError::Refused`] with [`Refusal::WaitTimeout`](crate::Refusal::WaitTimeout)
    /// when the wait ended (re-enqueue the work after
    /// [`retry_after`](AcquireError::retry_after), never drop it),
    /// [`Refusal::QueueFull`](crate::Refusal::QueueFull) when the queue is at `max_queue`,
    /// [`Refusal::PermitsExceedLimit`](crate::Refusal::PermitsExceedLimit) for more permits
    /// than could ever be granted, [`Refusal::Invalid`](crate::Refusal::Invalid) for a lease
    /// out of range, a [`holder`](AcquireOptions::holder) label that
    /// [`check_holder`](crate::spec::check_holder) refuses (or naming `key`: a keyed
    /// limiter's acquire without one, a plain limiter's with one), [`Refusal::TooManyKeys`](crate::Refusal::TooManyKeys) when a keyed
    /// limiter already tracks `max_keys` keys and this one is new (with a retry-after),
    /// [`Refusal::LimiterDeleted`](crate::Refusal::LimiterDeleted) when the limiter was
    /// deleted during the wait; [`AcquireError::Store`] when the store failed.
    ///
    /// # Cancel safety
    ///
    /// Cancel-safe: dropping the future leaves the queue, and a grant that raced the drop is
    /// released, so no permit leaks. With a [`request_id`](AcquireOptions::request_id), the
    /// wait stays queued for 5 s for a retry with the same id to join.
    ///
    /// ```
    /// use std::time::Duration;
    /// use floodgate::{AcquireOptions, Floodgate, LimiterSpec};
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// let gate = Floodgate::in_memory();
    /// gate.define("one", LimiterSpec::concurrency(1)).await?;
    /// let one = gate.limiter("one").await?;
    /// let permit = one.acquire(AcquireOptions::new().wait(Duration::from_secs(5))).await?;
    /// // The limit is taken: a second acquire's wait ends without a permit.
    /// let second = one.acquire(AcquireOptions::new().wait(Duration::from_millis(10))).await;
    /// assert!(second.unwrap_err().is_wait_timeout());
    /// drop(permit); // released
    /// # Ok(())
    /// # }
    /// ```
    pub async fn acquire(&self, options: AcquireOptions) -> Result<Permit<B>, AcquireError> {
        if let Some(holder) = &options.request.holder {
            crate::spec::check_holder(holder).map_err(crate::Refusal::Invalid)?;
        }
        // A store on this process's clock gives the lease deadline on it: no clock read here.
        let sent = (!B::CLOCK_IS_LOCAL).then(Instant::now);
        // An acquire the store decides at once (nobody waits, the permits fit) skips the
        // store's wait machinery: no nested futures, no listener. The key moves into the
        // permit, not cloned: cloning it ahead of this test and holding the clone across the
        // await below cost the uncontended pair about 25 ns (a larger future, more to drop).
        if let Some(decided) = self.backend.acquire_at_once(&options) {
            let grant = decided?;
            return Ok(self.permit(grant, sent, options.key));
        }
        // One `async fn`, not this one awaiting a second: each level kept its own copy of the
        // options (dead once moved on, but still in its layout) and its own tag at its far
        // end, 672 bytes in all, where a dropped wait read a line per tag and a new one wrote
        // every line. A keyed permit keeps its key: its extends carry it, so a store that lost
        // its state re-adopts it under that key (docs/learning.md).
        let key = options.key.clone();
        let grant = match &key {
            Some(key) => self.backend.acquire_keyed(key, options).await?,
            None => self.backend.acquire(options).await?,
        };
        Ok(self.permit(grant, sent, key))
    }

    /// The guard of a grant; `sent`: when the acquire was sent, if the store's clock is not
    /// this process's; `key`: the key a keyed limiter's permit was acquired under.
    #[inline]
    fn permit(&self, grant: Grant, sent: Option<Instant>, key: Option<Arc<str>>) -> Permit<B> {
        // A rate-only grant has no lease and holds nothing: nothing to release on drop.
        let held = !grant.lease.is_zero();
        // The store started the lease between the request and its answer, and not before it
        // had waited `waited`: the earliest it can end. Without a wait that is `sent` itself,
        // so the uncontended path reads the clock once, not twice.
        let local_deadline = sent.map(|sent| {
            let started = if grant.waited.is_zero() {
                sent
            } else {
                (sent + grant.waited).min(Instant::now())
            };
            started + grant.lease
        });
        Permit {
            backend: self.backend.clone(),
            grant,
            held,
            local_deadline,
            key,
        }
    }

    /// One permit if one is free right now, without waiting.
    ///
    /// # Errors
    ///
    /// As [`acquire`](Self::acquire); a taken limit is a
    /// [`Refusal::WaitTimeout`](crate::Refusal::WaitTimeout).
    ///
    /// # Cancel safety
    ///
    /// Cancel-safe, as [`acquire`](Self::acquire).
    ///
    /// ```
    /// use floodgate::{Floodgate, LimiterSpec};
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// let gate = Floodgate::in_memory();
    /// gate.define("one", LimiterSpec::concurrency(1)).await?;
    /// let one = gate.limiter("one").await?;
    /// let held = one.try_acquire().await?;
    /// assert!(one.try_acquire().await.unwrap_err().is_wait_timeout());
    /// assert!(held.release().await?);
    /// # Ok(())
    /// # }
    /// ```
    pub async fn try_acquire(&self) -> Result<Permit<B>, AcquireError> {
        self.acquire(AcquireOptions::new().wait(Duration::ZERO))
            .await
    }

    /// [`try_acquire`](Self::try_acquire) without awaiting, where the store answers at once:
    /// the embedded store when it is not durable (a durable grant is answered only once it is
    /// on disk). `None` where the store cannot (Redis, the durable embedded store): use
    /// [`try_acquire`](Self::try_acquire) there. The cheapest acquire there is, for hot
    /// in-process paths.
    ///
    /// # Errors
    ///
    /// As [`try_acquire`](Self::try_acquire).
    ///
    /// ```
    /// use floodgate::{Floodgate, LimiterSpec};
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// let gate = Floodgate::in_memory();
    /// gate.define("one", LimiterSpec::concurrency(1)).await?;
    /// let one = gate.limiter("one").await?;
    /// let held = one.try_acquire_now().expect("the embedded store answers at once")?;
    /// let second = one.try_acquire_now().expect("answered at once");
    /// assert!(second.unwrap_err().is_wait_timeout());
    /// drop(held); // released
    /// assert!(one.try_acquire_now().expect("answered at once").is_ok());
    /// # Ok(())
    /// # }
    /// ```
    #[inline]
    pub fn try_acquire_now(&self) -> Option<Result<Permit<B>, AcquireError>> {
        let sent = (!B::CLOCK_IS_LOCAL).then(Instant::now);
        let options = AcquireOptions::new().wait(Duration::ZERO);
        let decided = self.backend.acquire_at_once(&options)?;
        Some(decided.map(|grant| self.permit(grant, sent, None)))
    }

    /// The limiter's status.
    ///
    /// # Errors
    ///
    /// [`StoreError::UnknownLimiter`] once the limiter was deleted, [`StoreError::Unavailable`]
    /// when the store cannot be reached.
    ///
    /// # Cancel safety
    ///
    /// Cancel-safe: it only reads.
    ///
    /// ```
    /// use floodgate::{Floodgate, LimiterSpec};
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// let gate = Floodgate::in_memory();
    /// gate.define("snuba", LimiterSpec::concurrency(50)).await?;
    /// let snuba = gate.limiter("snuba").await?;
    /// let _permit = snuba.try_acquire().await?;
    /// assert_eq!(snuba.status().await?.in_use, 1);
    /// # Ok(())
    /// # }
    /// ```
    pub async fn status(&self) -> Result<LimiterStatus, StoreError> {
        self.backend.status().await
    }

    /// The store's handle, for operations by token (an HTTP server releasing by permit id).
    pub fn backend(&self) -> &B {
        &self.backend
    }
}

/// First pause before retrying an extend the store could not carry out; doubles each time.
const EXTEND_BACKOFF: Duration = Duration::from_millis(50);
/// Longest pause between retries of an extend.
const EXTEND_BACKOFF_MAX: Duration = Duration::from_secs(1);

/// Held permits. Dropping the guard releases them; [`release`](Permit::release) does so
/// explicitly and says whether they were still held; [`detach`](Permit::detach) keeps them
/// until the lease ends (for handing the permit id to another process).
#[derive(Debug)]
#[must_use = "dropping a Permit releases it at once"]
pub struct Permit<B: LimiterBackend> {
    /// Where to extend and release.
    backend: B,
    /// What was granted; the lease fields are updated by `extend`.
    grant: Grant,
    /// False once released, detached or found lost, so `Drop` does nothing.
    held: bool,
    /// When the lease ends at the earliest, on this process's clock: how long an extend that
    /// meets an unreachable store keeps trying. `None` when the store's clock is this
    /// process's: the grant's lease deadline is then mapped to it when asked.
    local_deadline: Option<Instant>,
    /// The key of a keyed limiter's permit, sent with each extend so a store that lost its
    /// state re-adopts the permit under its key; `None` for a plain limiter's.
    key: Option<Arc<str>>,
}

impl<B: LimiterBackend> Permit<B> {
    /// The key a keyed limiter's permit was acquired with; `None` for a plain limiter's.
    pub fn key(&self) -> Option<&str> {
        self.key.as_deref()
    }

    /// The permit's id (`NAME.TOKEN`).
    pub fn id(&self) -> PermitId {
        PermitId {
            limiter: self.backend.name().clone(),
            token: self.grant.token,
        }
    }

    /// The fencing token: pass it to the backend so it can reject a holder whose permit was
    /// reclaimed.
    pub fn fencing_token(&self) -> FencingToken {
        self.grant.token
    }

    /// How many permits this guard holds.
    pub fn permits(&self) -> u32 {
        self.grant.permits
    }

    /// The lease deadline on the store's clock.
    pub fn lease_deadline(&self) -> Timestamp {
        self.grant.lease_deadline
    }

    /// The grant as data.
    pub fn grant(&self) -> &Grant {
        &self.grant
    }

    /// Moves the lease deadline to now + `lease`. [`ExtendError::Lost`] if the permit expired
    /// or was released; it is never revived, and the guard then has nothing to release.
    ///
    /// A store that cannot be reached (a Redis restart or failover) does not end the work: the
    /// extend is retried with short doubling pauses for as long as the lease lasts, and only
    /// once it has certainly ended (on this process's clock) without a confirmed extend is
    /// the [`StoreError::Unavailable`] returned. Either error means: stop the work.
    ///
    /// # Errors
    ///
    /// [`ExtendError::Lost`] when the permit is no longer held, [`ExtendError::Invalid`] for a
    /// lease out of range (1 ms to 24 h), [`ExtendError::Store`] when the store failed (for
    /// [`StoreError::Unavailable`], only once the lease has certainly ended).
    ///
    /// # Cancel safety
    ///
    /// Dropping the future leaves the guard as it was and still holding: the lease may or may
    /// not have moved ([`local_deadline`](Self::local_deadline) assumes it did not). Extend
    /// again.
    ///
    /// ```
    /// use std::time::Duration;
    /// use floodgate::{AcquireOptions, ExtendError, Floodgate, LimiterSpec};
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// let gate = Floodgate::in_memory();
    /// gate.define("snuba", LimiterSpec::concurrency(50)).await?;
    /// let snuba = gate.limiter("snuba").await?;
    /// let mut permit = snuba.acquire(AcquireOptions::new().lease(Duration::from_secs(30))).await?;
    /// let deadline = permit.extend(Duration::from_secs(60)).await?;
    /// assert_eq!(permit.lease_deadline(), deadline);
    /// let bad = permit.extend(Duration::ZERO).await;
    /// assert!(matches!(bad, Err(ExtendError::Invalid(_))));
    /// # Ok(())
    /// # }
    /// ```
    pub async fn extend(&mut self, lease: Duration) -> Result<Timestamp, ExtendError> {
        let mut backoff = EXTEND_BACKOFF;
        loop {
            let sent = Instant::now();
            // The permit's size rides along, so a store that lost its state re-adopts it.
            let (token, permits) = (self.grant.token, Some(self.grant.permits));
            let extended = match &self.key {
                Some(key) => self.backend.extend_keyed(key, token, lease, permits).await,
                None => self.backend.extend(token, lease, permits).await,
            };
            match extended {
                Ok(deadline) => {
                    self.grant.lease_deadline = deadline;
                    self.grant.lease = lease;
                    self.local_deadline = self.local_deadline.map(|d| d.max(sent + lease));
                    return Ok(deadline);
                }
                Err(ExtendError::Lost) => {
                    self.held = false;
                    return Err(ExtendError::Lost);
                }
                Err(e @ ExtendError::Store(StoreError::Unavailable(_))) => {
                    let now = Instant::now();
                    let deadline = self.local_deadline();
                    if now >= deadline {
                        return Err(e);
                    }
                    tokio::time::sleep(backoff.min(deadline - now)).await;
                    backoff = (backoff * 2).min(EXTEND_BACKOFF_MAX);
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// When the lease ends at the earliest, on this process's clock (never later than the
    /// store's deadline); moved by each confirmed extend.
    pub fn local_deadline(&self) -> Instant {
        match self.local_deadline {
            Some(deadline) => deadline,
            None => self
                .backend
                .local_instant(self.grant.lease_deadline)
                .unwrap_or_else(Instant::now),
        }
    }

    /// Releases now. `Ok(false)` if the permit was no longer held (its lease ended, or the
    /// limiter was deleted).
    ///
    /// # Errors
    ///
    /// [`StoreError::Unavailable`] when the store cannot be reached (the lease then frees the
    /// permit when it ends).
    ///
    /// # Cancel safety
    ///
    /// Cancel-safe: dropping the future drops the guard, which releases the permit in the
    /// background if this release had not completed (a second release of a permit is a
    /// harmless `false`).
    ///
    /// ```
    /// use floodgate::{Floodgate, LimiterSpec};
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// let gate = Floodgate::in_memory();
    /// gate.define("snuba", LimiterSpec::concurrency(50)).await?;
    /// let snuba = gate.limiter("snuba").await?;
    /// let permit = snuba.try_acquire().await?;
    /// assert!(permit.release().await?);
    /// assert_eq!(snuba.status().await?.in_use, 0);
    /// # Ok(())
    /// # }
    /// ```
    pub async fn release(mut self) -> Result<bool, StoreError> {
        if !self.held && self.grant.lease.is_zero() {
            return Ok(false); // A rate-only grant: nothing was held.
        }
        // `held` stays true until the store has answered: a future dropped while waiting for
        // it drops `self`, and `Drop` then releases in the background.
        let released = self.backend.release(self.grant.token).await;
        self.held = false;
        released
    }

    /// Gives up the guard without releasing: the permit stays held until released by id or
    /// until its lease ends.
    pub fn detach(mut self) -> Grant {
        self.held = false;
        self.grant.clone()
    }
}

impl<B: LimiterBackend> Drop for Permit<B> {
    fn drop(&mut self) {
        if self.held {
            self.backend.release_in_background(self.grant.token);
        }
    }
}
