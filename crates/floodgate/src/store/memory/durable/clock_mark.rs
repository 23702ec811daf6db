//! Where the store's clock resumes after a restart, robust to wall-clock steps.
//!
//! Lease deadlines are on the store's clock, which reads wall-clock time. Across a restart the
//! downtime must count as what really passed: counted short, holders that died during it keep
//! their slots a little longer (safe); counted long (the wall clock stepped forward while the
//! server was down), leases of holders still working would end early and their slots be given
//! out twice. So once a second the store writes a *clock mark*: its clock beside the kernel's
//! boot clock (`/proc/uptime`, which no wall-clock change moves) and the boot id. On a restart
//! in the same boot, the downtime is the smaller of the wall-clock and boot-clock gaps; after a
//! reboot, only the wall clock is left. Either way the clock never goes below the last time
//! recorded, so a wall clock set back never moves deadlines further away.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// The store's clock beside the boot clock at one moment.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(crate) struct ClockMark {
    /// The kernel's boot id: boot-clock readings compare only within one boot.
    boot_id: String,
    /// Seconds since boot (`CLOCK_BOOTTIME`, counting suspend).
    uptime_s: f64,
    /// The store's clock then, µs.
    store_us: u64,
}

fn path(dir: &Path) -> PathBuf {
    dir.join("clock.json")
}

/// The boot id and seconds since boot, where the kernel says (Linux).
fn boot_clock() -> Option<(String, f64)> {
    let id = std::fs::read_to_string("/proc/sys/kernel/random/boot_id").ok()?;
    let uptime = std::fs::read_to_string("/proc/uptime").ok()?;
    let secs = uptime.split_whitespace().next()?.parse::<f64>().ok()?;
    Some((id.trim().to_owned(), secs))
}

/// Records the store's clock beside the boot clock (atomically replaced).
pub(crate) fn write(dir: &Path, store_us: u64) -> std::io::Result<()> {
    let Some((boot_id, uptime_s)) = boot_clock() else {
        return Ok(());
    };
    let mark = ClockMark {
        boot_id,
        uptime_s,
        store_us,
    };
    let body = serde_json::to_vec(&mark).map_err(std::io::Error::other)?;
    let tmp = dir.join("clock.json.tmp");
    std::fs::write(&tmp, body)?;
    std::fs::rename(&tmp, path(dir))
}

/// Where the store's clock resumes: never below `last_us + 1` (the last time recorded), and
/// at most the last time plus the real downtime as the boot clock measured it (same boot).
pub(crate) fn resume_at(dir: &Path, last_us: u64, wall_us: u64) -> u64 {
    let floor = last_us.saturating_add(1);
    let by_boot = std::fs::read(path(dir))
        .ok()
        .and_then(|data| serde_json::from_slice::<ClockMark>(&data).ok())
        .and_then(|mark| {
            let (boot_id, uptime_s) = boot_clock()?;
            (boot_id == mark.boot_id).then(|| {
                let elapsed_us = ((uptime_s - mark.uptime_s).max(0.0) * 1e6) as u64;
                mark.store_us.saturating_add(elapsed_us)
            })
        });
    match by_boot {
        Some(boot) => wall_us.min(boot).max(floor),
        None => wall_us.max(floor),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_wall_clock_step_forward_counts_only_the_real_downtime() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = 1_000_000_000_000u64;
        write(dir.path(), store).expect("mark");
        // The wall clock says an hour passed; the boot clock says (almost) none.
        let resumed = resume_at(dir.path(), store, store + 3_600_000_000);
        assert!(resumed < store + 60_000_000, "{resumed}");
        // Set back: never below the last recorded time.
        assert_eq!(resume_at(dir.path(), store, store - 600_000_000), store + 1);
        // No mark (another boot, say): the wall clock, above the floor.
        let empty = tempfile::tempdir().expect("tempdir");
        assert_eq!(resume_at(empty.path(), store, store + 5), store + 5);
    }
}
