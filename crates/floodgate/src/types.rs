//! Small value types shared by every layer: names, tokens, timestamps.

use std::fmt;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

/// A point on a store's clock, in microseconds since that clock's origin.
///
/// Only the store's clock produces these (the embedded store's [`Clock`](crate::Clock), or Redis
/// `TIME` in the Redis store), so two machines' clocks are never compared.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Timestamp(pub u64);

impl Timestamp {
    /// The far future: used as "no deadline".
    pub const MAX: Timestamp = Timestamp(u64::MAX);

    /// This timestamp moved `d` later, saturating instead of overflowing.
    pub fn after(self, d: Duration) -> Timestamp {
        let micros = u64::try_from(d.as_micros()).unwrap_or(u64::MAX);
        Timestamp(self.0.saturating_add(micros))
    }

    /// How long from `earlier` to `self` (zero if `earlier` is later).
    pub fn since(self, earlier: Timestamp) -> Duration {
        Duration::from_micros(self.0.saturating_sub(earlier.0))
    }
}

/// A number that strictly increases across all grants of one limiter.
///
/// Pass it to the protected backend with every write; a backend that remembers the highest token
/// it has seen can reject a holder whose permit was reclaimed and given to someone else.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct FencingToken(pub u64);

impl fmt::Display for FencingToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// Longest limiter name accepted.
pub const MAX_NAME_LEN: usize = 128;

/// A validated limiter name: 1 to 128 characters of `A-Z a-z 0-9 _ - . :`, other than `.`
/// and `..`.
///
/// The character set keeps names safe in URLs, Redis keys and Prometheus labels alike.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct LimiterName(Arc<str>);

/// Why a string is not a valid [`LimiterName`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum NameError {
    /// The name is empty.
    #[error("limiter name is empty")]
    Empty,
    /// The name is longer than [`MAX_NAME_LEN`].
    #[error("limiter name is {0} characters long; the maximum is {MAX_NAME_LEN}")]
    TooLong(usize),
    /// The name has a character outside the allowed set.
    #[error("limiter name has the character {0:?}; allowed are A-Z a-z 0-9 _ - . :")]
    BadChar(char),
    /// The name is `.` or `..`, which URLs treat as path steps (`/v1/limiters/..` is not a
    /// limiter's address).
    #[error("limiter name {0:?} is reserved: `.` and `..` are path steps in URLs")]
    Dots(String),
}

impl LimiterName {
    /// Validates `name`.
    pub fn new(name: &str) -> Result<Self, NameError> {
        if name.is_empty() {
            return Err(NameError::Empty);
        }
        let len = name.chars().count();
        if len > MAX_NAME_LEN {
            return Err(NameError::TooLong(len));
        }
        if let Some(c) = name
            .chars()
            .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.' | ':')))
        {
            return Err(NameError::BadChar(c));
        }
        if name == "." || name == ".." {
            return Err(NameError::Dots(name.to_owned()));
        }
        Ok(LimiterName(Arc::from(name)))
    }

    /// The name as a string.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for LimiterName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl FromStr for LimiterName {
    type Err = NameError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        LimiterName::new(s)
    }
}

/// The identity of one grant: which limiter, and its fencing token (unique within the limiter).
///
/// Its string form, `NAME.TOKEN`, is what the HTTP API hands out as `permit_id`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct PermitId {
    /// The limiter that granted it.
    pub limiter: LimiterName,
    /// The grant's fencing token.
    pub token: FencingToken,
}

impl fmt::Display for PermitId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}", self.limiter, self.token)
    }
}

/// Why a string is not a valid [`PermitId`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("permit id {0:?} is not of the form NAME.TOKEN")]
pub struct PermitIdError(pub String);

impl FromStr for PermitId {
    type Err = PermitIdError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || PermitIdError(s.chars().take(200).collect());
        let (name, token) = s.rsplit_once('.').ok_or_else(bad)?;
        let limiter = LimiterName::new(name).map_err(|_| bad())?;
        // Only plain decimal digits: `u64::from_str` would also take a leading '+'.
        if token.is_empty() || !token.bytes().all(|b| b.is_ascii_digit()) {
            return Err(bad());
        }
        let token = token.parse::<u64>().map_err(|_| bad())?;
        Ok(PermitId {
            limiter,
            token: FencingToken(token),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_validated() {
        assert!(LimiterName::new("snuba-spike_projections.v1:eu").is_ok());
        assert_eq!(LimiterName::new(""), Err(NameError::Empty));
        assert_eq!(LimiterName::new("a b"), Err(NameError::BadChar(' ')));
        assert_eq!(LimiterName::new("é"), Err(NameError::BadChar('é')));
        assert_eq!(
            LimiterName::new(&"x".repeat(129)),
            Err(NameError::TooLong(129))
        );
        assert!(LimiterName::new(&"x".repeat(128)).is_ok());
        assert_eq!(LimiterName::new("."), Err(NameError::Dots(".".into())));
        assert_eq!(LimiterName::new(".."), Err(NameError::Dots("..".into())));
        assert!(LimiterName::new("...").is_ok());
    }

    #[test]
    fn permit_ids_round_trip_and_reject_garbage() {
        let id = PermitId {
            limiter: LimiterName::new("a.b").expect("valid"),
            token: FencingToken(42),
        };
        assert_eq!(id.to_string(), "a.b.42");
        assert_eq!("a.b.42".parse::<PermitId>(), Ok(id));
        for bad in [
            "",
            "nodot",
            "a.",
            ".5",
            "a.+5",
            "a.-5",
            "a.99999999999999999999",
            "a b.1",
        ] {
            assert!(bad.parse::<PermitId>().is_err(), "{bad:?} parsed");
        }
    }

    #[test]
    fn timestamps_saturate() {
        assert_eq!(Timestamp(5).after(Duration::MAX), Timestamp::MAX);
        assert_eq!(Timestamp(5).since(Timestamp(9)), Duration::ZERO);
    }
}

/// Names one `schedule` reservation, so that its producer can give back the tokens it did not
/// use. Drawn at random (53 bits: exact in a JSON number and in Lua), so that a producer cannot
/// return another's tokens by guessing its id.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ReservationId(pub u64);

impl ReservationId {
    /// Largest id drawn: 2^53 - 1, the largest integer a JSON number (a double) holds exactly.
    pub const MAX: u64 = (1 << 53) - 1;

    /// A fresh random id, never 0 (which old logs use for "none").
    pub fn random() -> Self {
        use std::hash::{BuildHasher, RandomState};
        use std::sync::atomic::{AtomicU64, Ordering};
        // SipHash under the process's random keys, over a counter: unpredictable from outside
        // without a dependency on a random number crate.
        static N: AtomicU64 = AtomicU64::new(0);
        let n = N.fetch_add(1, Ordering::Relaxed);
        let id = RandomState::new().hash_one(n) & Self::MAX;
        ReservationId(id.max(1))
    }
}

impl fmt::Display for ReservationId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// What a `schedule` reserved: when each child may start, and the id to give back with.
///
/// `#[non_exhaustive]`: built by the library (read its fields), so one can be added without
/// breaking callers.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Schedule {
    /// For each child, how long from now until it may start (in token order).
    pub offsets: Vec<std::time::Duration>,
    /// The reservation, for [`LimiterBackend::unschedule`](crate::LimiterBackend::unschedule).
    pub reservation: ReservationId,
}
