//! The live dashboard served by `floodgate serve` at `/` (see `docs/dashboard.md`): an
//! overview of every limiter, a page per limiter with 15 minutes of history, its holders and
//! waiters, live updates by server-sent events and admin actions, all from assets embedded in
//! the binary. Also `GET /v1/limiters/{name}/holders`.
//!
//! One sampler task per server reads every limiter's status once a second (on the Redis store
//! that is the fleet-wide state), keeps each limiter's [`history::Ring`] and renders the
//! overview once, which every open dashboard then shares.

mod assets;
mod auth;
pub mod history;
pub(crate) mod holders;
mod routes;
mod sampler;

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Instant;

use tokio::sync::watch;

pub(crate) use self::auth::require_session;
pub(crate) use self::routes::{public_routes, routes};
pub(crate) use self::sampler::spawn_sampler;

/// What the dashboard keeps between requests; one per server.
#[derive(Debug)]
pub(crate) struct Dashboard {
    /// Each limiter's history, by name (a `BTreeMap` so the overview comes out ordered).
    pub(crate) history: Mutex<BTreeMap<String, history::Ring>>,
    /// The latest overview JSON, re-rendered by the sampler each second and shared by every
    /// open page (`Arc<str>`: one copy however many are open).
    pub(crate) overview: watch::Sender<Arc<str>>,
    /// Signed-in browser sessions: id -> when it ends. Bounded by `auth::MAX_SESSIONS`.
    pub(crate) sessions: Mutex<HashMap<String, Instant>>,
}

impl Dashboard {
    pub(crate) fn new() -> Self {
        Dashboard {
            history: Mutex::new(BTreeMap::new()),
            overview: watch::channel(Arc::from(r#"{"t":0,"store":"starting","limiters":[]}"#)).0,
            sessions: Mutex::new(HashMap::new()),
        }
    }

    pub(crate) fn lock_history(
        &self,
    ) -> std::sync::MutexGuard<'_, BTreeMap<String, history::Ring>> {
        self.history.lock().unwrap_or_else(PoisonError::into_inner)
    }
}
