//! Errors of the Rust API. Each says what the caller can do about it.

use std::time::Duration;

use crate::core::Refusal;
use crate::spec::InvalidField;
use crate::types::{LimiterName, NameError};

/// A store-level failure: the operation could not be carried out.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
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
    /// The shared store could not be reached (Redis down, say).
    #[error("store unavailable: {0}")]
    Unavailable(String),
}

/// Why an acquire returned no permit.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AcquireError {
    /// The limiter refused: the wait ended, the queue was full, or the request is impossible.
    #[error(transparent)]
    Refused(#[from] Refusal),
    /// The operation could not be carried out.
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl AcquireError {
    /// When to try again, for refusals that have an answer to that (wait timeout, full queue).
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
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
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
