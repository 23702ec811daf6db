//! The event queue's entries: what happens, and when.

use std::cmp::Ordering;

use super::Micros;

/// What an event does.
#[derive(Debug, Clone, Copy)]
pub(super) enum Ev {
    /// A re-enqueued task (countdown over) enters the broker queue.
    Ready(usize),
    /// The task's program continues.
    Step(usize, u32),
    /// The backend answers a query: done, or rejected.
    Answer {
        task: usize,
        exec: u32,
        admitted: bool,
    },
    /// The execution's processing deadline.
    Deadline(usize, u32),
    /// A Floodgate holder's heartbeat: extend the lease while the query runs.
    Extend(usize, u32),
    /// The limiter's nearest lease or wait deadline.
    Timer,
    /// The backend's capacity changes.
    Capacity(u32),
}

/// An event at its time.
pub(super) struct Scheduled {
    /// When it happens.
    pub(super) at: Micros,
    /// Scheduling order, which breaks ties between events at the same moment.
    pub(super) seq: u64,
    /// What happens.
    pub(super) ev: Ev,
}

impl PartialEq for Scheduled {
    fn eq(&self, other: &Self) -> bool {
        (self.at, self.seq) == (other.at, other.seq)
    }
}

impl Eq for Scheduled {}

impl PartialOrd for Scheduled {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Scheduled {
    // Reversed: BinaryHeap is a max-heap and the earliest event must come out first; the
    // sequence number breaks ties in scheduling order, so the run is deterministic.
    fn cmp(&self, other: &Self) -> Ordering {
        (other.at, other.seq).cmp(&(self.at, self.seq))
    }
}
