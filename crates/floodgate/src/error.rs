//! Errors of the Rust API. Each says what the caller can do about it.

use std::sync::Arc;
use std::time::Duration;

use crate::core::Refusal;
use crate::spec::InvalidField;
use crate::types::{LimiterName, NameError};

/// A store-level failure: the operation could not be carried out.
///
/// `#[non_exhaustive]`: a future store may fail in a new way; match the variants you act on
/// and treat the rest as [`Unavailable`](StoreError::Unavailable) would be treated.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// No limiter has this name (or it was deleted).
    #[error("limiter {0:?} does not exist")]
    UnknownLimiter(LimiterName),
    /// A name is not valid.
    #[error(transparent)]
    BadName(#[from] NameError),
    /// A spec field is out of range.
    #[error(transparent)]
    Invalid(#[from] InvalidField),
    /// The store already holds its maximum number of limiters.
    #[error("the store already holds its maximum of {0} limiters")]
    TooManyLimiters(usize),
    /// A keyed limiter already tracks its `max_keys` keys and this operation names a new one
    /// (a `schedule`; an acquire is refused with
    /// [`Refusal::TooManyKeys`](crate::Refusal::TooManyKeys) instead). The cap frees itself as
    /// idle keys drop out: retry after the hint.
    #[error("this limiter already tracks its max_keys ({max_keys}) keys; retry after {} ms", retry_after.as_millis())]
    TooManyKeys {
        /// The limiter's key cap.
        max_keys: u32,
        /// An estimate of when a key is likely to be free.
        retry_after: std::time::Duration,
    },
    /// The shared store could not be reached (Redis down, say); the cause, when there is
    /// one, is this error's [`source`](std::error::Error::source).
    #[error("store unavailable: {0}")]
    Unavailable(#[source] Unavailable),
}

/// Why a store could not be reached: what was being done, and the underlying error (a
/// `redis::RedisError`, an `std::io::Error`) as the [`source`](std::error::Error::source) when
/// there is one, so callers can inspect it (`downcast_ref`).
///
/// Its text already ends with the cause's text, so logging only the top error says everything;
/// two of these are equal when their texts are.
#[derive(Debug, Clone)]
pub struct Unavailable {
    /// What failed, for people (also the HTTP API's `message`).
    message: String,
    /// The underlying error; shared so the error stays `Clone`.
    cause: Option<Arc<dyn std::error::Error + Send + Sync + 'static>>,
}

impl Unavailable {
    /// A failure with no underlying error (a misconfiguration found by the store itself).
    pub fn new(message: impl Into<String>) -> Self {
        Unavailable {
            message: message.into(),
            cause: None,
        }
    }

    /// A failure caused by `cause`; the text is `"{context}: {cause}"`.
    pub fn caused_by(
        context: impl std::fmt::Display,
        cause: impl std::error::Error + Send + Sync + 'static,
    ) -> Self {
        Unavailable {
            message: format!("{context}: {cause}"),
            cause: Some(Arc::new(cause)),
        }
    }

    /// What failed, as text.
    pub fn message(&self) -> &str {
        &self.message
    }
}

impl From<String> for Unavailable {
    fn from(message: String) -> Self {
        Unavailable::new(message)
    }
}

impl From<&str> for Unavailable {
    fn from(message: &str) -> Self {
        Unavailable::new(message)
    }
}

impl std::fmt::Display for Unavailable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for Unavailable {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.cause
            .as_deref()
            .map(|e| e as &(dyn std::error::Error + 'static))
    }
}

impl PartialEq for Unavailable {
    fn eq(&self, other: &Self) -> bool {
        self.message == other.message
    }
}

impl Eq for Unavailable {}

/// Why an acquire returned no permit.
///
/// `#[non_exhaustive]`, like [`StoreError`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum AcquireError {
    /// The limiter refused: the wait ended, the queue was full, or the request is impossible.
    #[error(transparent)]
    Refused(#[from] Refusal),
    /// The operation could not be carried out.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// While this acquire waited, a repeat with the same `request_id` took its wait over: the
    /// wait goes on, and its outcome (the grant, or the refusal) goes to that repeat, not
    /// here. Not a failure of the store: the caller overlapped its own attempts (a client
    /// retries with the same id once it has given the first attempt up).
    #[error(
        "a repeat with the same request_id took this wait over; its outcome goes to that repeat"
    )]
    Superseded,
}

impl AcquireError {
    /// When to try again, for refusals that have an answer to that (wait timeout, full queue,
    /// too many keys).
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            AcquireError::Refused(Refusal::WaitTimeout { retry_after })
            | AcquireError::Refused(Refusal::QueueFull { retry_after })
            | AcquireError::Refused(Refusal::TooManyKeys { retry_after, .. }) => Some(*retry_after),
            _ => None,
        }
    }

    /// True if the wait ended without a grant (the caller should re-enqueue, not drop, the work).
    pub fn is_wait_timeout(&self) -> bool {
        matches!(self, AcquireError::Refused(Refusal::WaitTimeout { .. }))
    }
}

/// Why an extend did not extend.
///
/// `#[non_exhaustive]`, like [`StoreError`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ExtendError {
    /// The permit is no longer held: it expired or was released. It is never revived; stop
    /// the work, or re-acquire and redo it under the new fencing token.
    #[error("the permit was lost: it expired or was released")]
    Lost,
    /// The requested lease is out of range.
    #[error(transparent)]
    Invalid(#[from] InvalidField),
    /// The operation could not be carried out.
    #[error(transparent)]
    Store(#[from] StoreError),
}
