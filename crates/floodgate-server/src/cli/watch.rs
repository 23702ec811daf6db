//! `floodgate __watch` (hidden): the watchdog between `floodgate run` and its command.
//!
//! `floodgate run` starts this process as the leader of a new process group, and it starts the
//! command in that group. Its only job is to make sure the command does not outlive
//! `floodgate run`: if `floodgate run` dies (even by SIGKILL, when it can do nothing itself),
//! the watchdog sends the group SIGTERM, then SIGKILL after the grace `--kill-after` gave.
//! Learning of the death needs no unsafe code: the kernel sends the watchdog SIGUSR1 when its
//! parent dies (`PR_SET_PDEATHSIG`, set on itself, so no `pre_exec` in the parent is needed), and
//! it also checks its parent pid every [`POLL`] in case that signal was missed.
//!
//! Signals that `floodgate run` forwards go to the whole group; the watchdog ignores them (the
//! command gets them directly) and exits with the command's status: its code, or 128 + N when
//! signal N killed it. It exits 127 when the command is not found and 126 when it cannot be run.
//!
//! It exits only once the group is empty but for itself: what the command left running there
//! (`work &` in a script) is covered by the permit as the command was, as flock's lock is held
//! by children that inherit it. So `floodgate run`, which waits for the watchdog, keeps the
//! permit (extending it) until then, and if `floodgate run` dies meanwhile the watchdog stops
//! those leftovers as it would the command.

use std::ffi::OsString;
use std::os::unix::process::ExitStatusExt;
use std::time::Duration;

use nix::sys::signal::{killpg, Signal};
use nix::unistd::{getpgrp, getppid, Pid};
use tokio::process::Command;
use tokio::signal::unix::{signal, SignalKind};

use super::{warn, Failure};

/// The hidden subcommand's name.
pub(crate) const SUBCOMMAND: &str = "__watch";
/// How often the parent pid is checked, in case the death signal was missed, and, once the
/// command has exited, whether it left anything running in the group.
const POLL: Duration = Duration::from_millis(100);
/// Exit code when the command cannot be executed (as shells do).
const EXIT_CANNOT_EXECUTE: u8 = 126;
/// Exit code when the command is not found (as shells do).
const EXIT_NOT_FOUND: u8 = 127;

/// Flags of `floodgate __watch`, given by `floodgate run`.
#[derive(Debug, clap::Args)]
pub(crate) struct WatchArgs {
    /// The pid of `floodgate run`: when our parent is no longer this process, it has died.
    #[arg(long)]
    parent: i32,
    /// The grace between SIGTERM and SIGKILL when the parent has died.
    #[arg(long)]
    kill_after_ms: u64,
    /// The command and its arguments.
    #[arg(last = true, required = true, num_args = 1..)]
    command: Vec<OsString>,
}

/// Sends `sig` to process group `group`; a group that is already gone is not an error.
pub(crate) fn signal_group(group: i32, sig: Signal) {
    match killpg(Pid::from_raw(group), sig) {
        Ok(()) | Err(nix::errno::Errno::ESRCH) => {}
        Err(e) => warn(&format!("cannot send {} to the command: {e}", sig.as_str())),
    }
}

pub(crate) async fn watch(args: WatchArgs) -> Result<u8, Failure> {
    let listen = |kind| {
        signal(kind).map_err(|e| Failure {
            code: 1,
            message: format!("cannot listen for signals: {e}"),
        })
    };
    // Listened for (so they do not end this process) before anything else: the command gets
    // the forwarded ones itself, and SIGUSR1 says the parent died.
    let mut interrupt = listen(SignalKind::interrupt())?;
    let mut terminate = listen(SignalKind::terminate())?;
    let mut hangup = listen(SignalKind::hangup())?;
    let mut death = listen(SignalKind::user_defined1())?;
    #[cfg(target_os = "linux")]
    if let Err(e) = nix::sys::prctl::set_pdeathsig(Signal::SIGUSR1) {
        warn(&format!(
            "cannot ask to be told of floodgate run's death ({e}); polling"
        ));
    }
    let parent = Pid::from_raw(args.parent);
    let group = getpgrp();
    // The parent may have died before the death signal was asked for.
    if getppid() != parent {
        warn("floodgate run died before the command started; it was not run");
        return Ok(EXIT_CANNOT_EXECUTE);
    }

    let Some((program, rest)) = args.command.split_first() else {
        return Err(Failure::usage("no command given after --"));
    };
    let mut child = match Command::new(program).args(rest).spawn() {
        Ok(child) => child,
        Err(e) => {
            return Err(Failure {
                code: match e.kind() {
                    std::io::ErrorKind::NotFound => EXIT_NOT_FOUND,
                    _ => EXIT_CANNOT_EXECUTE,
                },
                message: format!("cannot run {}: {e}", program.to_string_lossy()),
            });
        }
    };

    let me = std::process::id();
    let mut poll = tokio::time::interval(POLL);
    // The command's exit code once it has exited, while what it left in the group still runs;
    // and how many checks found them there.
    let mut exited: Option<u8> = None;
    let mut checks = 0u32;
    loop {
        tokio::select! {
            status = child.wait(), if exited.is_none() => {
                let code = match status {
                    Ok(status) => exit_code(status),
                    Err(e) => {
                        return Err(Failure {
                            code: 1,
                            message: format!("cannot wait for the command: {e}"),
                        });
                    }
                };
                if !others_in_group(group.as_raw(), me) {
                    return Ok(code);
                }
                exited = Some(code);
            }
            // The group got these; so did the command.
            Some(()) = interrupt.recv() => {}
            Some(()) = terminate.recv() => {}
            Some(()) = hangup.recv() => {}
            Some(()) = death.recv() => {
                if getppid() != parent {
                    break;
                }
            }
            _ = poll.tick() => {
                if getppid() != parent {
                    break;
                }
                if let Some(code) = exited {
                    if !others_in_group(group.as_raw(), me) {
                        return Ok(code);
                    }
                    checks = checks.saturating_add(1);
                    // Said once they are still there at the second check, not for a group
                    // still exiting along with the command.
                    if checks == 2 {
                        warn(
                            "the command has exited; processes it left in its process group \
                             still run: the permit is kept until they have exited",
                        );
                    }
                }
            }
        }
    }

    // floodgate run is gone: nobody keeps the permit alive or releases it, so the command
    // must stop. It gets the grace to clean up; SIGKILL (which ends this process too) follows.
    warn("floodgate run died: stopping the command (SIGTERM, then SIGKILL)");
    let group = group.as_raw();
    signal_group(group, Signal::SIGTERM);
    let grace = Duration::from_millis(args.kill_after_ms);
    let _ = tokio::time::timeout(grace, child.wait()).await;
    signal_group(group, Signal::SIGKILL);
    Ok(1)
}

/// Whether process group `group` has a running process other than `me` (the watchdog): what
/// the command left behind. Read from `/proc`, where zombies do not count (a leftover whose
/// parent died waits there for init to reap it, which a container's PID 1 may never do).
/// Without `/proc` none are seen, and the watchdog ends with the command.
fn others_in_group(group: i32, me: u32) -> bool {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return false;
    };
    entries.flatten().any(|entry| {
        let name = entry.file_name();
        let Some(pid) = name.to_str().and_then(|n| n.parse::<u32>().ok()) else {
            return false;
        };
        if pid == me {
            return false;
        }
        // `PID (COMM) STATE PPID PGRP ...`; COMM may hold spaces and parentheses.
        let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else {
            return false;
        };
        let Some((_, rest)) = stat.rsplit_once(')') else {
            return false;
        };
        let mut fields = rest.split_whitespace();
        let state = fields.next();
        let pgrp = fields.nth(1).and_then(|p| p.parse::<i32>().ok());
        pgrp == Some(group) && !matches!(state, Some("Z" | "X"))
    })
}

/// The command's exit status as ours: its code, or 128 + the signal that killed it.
pub(crate) fn exit_code(status: std::process::ExitStatus) -> u8 {
    match (status.code(), status.signal()) {
        (Some(code), _) => u8::try_from(code & 0xff).unwrap_or(1),
        (None, Some(sig)) => exit_code_for_signal(sig),
        (None, None) => 1,
    }
}

/// 128 + N, as shells report a death by signal N.
pub(crate) fn exit_code_for_signal(sig: i32) -> u8 {
    u8::try_from(128 + (sig & 0x7f)).unwrap_or(1)
}
