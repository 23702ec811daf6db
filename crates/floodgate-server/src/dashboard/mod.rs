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

/// One render of the overview: all of it, and what changed since the render before, which is
/// what an open page is sent (at 10,000 idle limiters the whole is 3 MB a second per page, the
/// change a few rows).
#[derive(Debug, Clone)]
pub(crate) struct Overview {
    /// Counts renders: a page's stream sends `delta` only right after render `seq - 1`.
    pub(crate) seq: u64,
    /// `{"t","store","seq","limiters":[row...]}`, every limiter ordered by name.
    pub(crate) full: Arc<str>,
    /// `{"t","store","seq","changed":[row...],"removed":[name...]}`: the rows that differ from
    /// render `seq - 1`'s, and the limiters gone since.
    pub(crate) delta: Arc<str>,
}

impl Overview {
    fn starting() -> Self {
        Overview {
            seq: 0,
            full: Arc::from(r#"{"t":0,"store":"starting","seq":0,"limiters":[]}"#),
            delta: Arc::from(r#"{"t":0,"store":"starting","seq":0,"changed":[],"removed":[]}"#),
        }
    }
}

/// What the dashboard keeps between requests; one per server.
#[derive(Debug)]
pub(crate) struct Dashboard {
    /// Each limiter's history, by name (a `BTreeMap` so the overview comes out ordered).
    pub(crate) history: Mutex<BTreeMap<String, history::Ring>>,
    /// The latest overview, re-rendered by the sampler each second and shared by every open
    /// page (`Arc<str>`s: one copy however many are open).
    pub(crate) overview: watch::Sender<Overview>,
    /// Signed-in browser sessions: id -> when it ends. Bounded by `auth::MAX_SESSIONS`.
    pub(crate) sessions: Mutex<HashMap<String, Instant>>,
}

impl Dashboard {
    pub(crate) fn new() -> Self {
        Dashboard {
            history: Mutex::new(BTreeMap::new()),
            overview: watch::channel(Overview::starting()).0,
            sessions: Mutex::new(HashMap::new()),
        }
    }

    pub(crate) fn lock_history(
        &self,
    ) -> std::sync::MutexGuard<'_, BTreeMap<String, history::Ring>> {
        self.history.lock().unwrap_or_else(PoisonError::into_inner)
    }
}
