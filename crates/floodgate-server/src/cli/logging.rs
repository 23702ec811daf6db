//! The server's logs: `--log-format text` (default, for people) or `json` (one object per line,
//! for machines), levels from `FLOODGATE_LOG` or else `RUST_LOG` (the usual
//! `info,floodgate=debug` syntax), `info` when neither is set.
//!
//! JSON lines have stable top-level fields: `timestamp` (RFC 3339), `level`, `target`,
//! `message` and the event's own fields; while a request is served, `span` holds
//! `{"name": "request", "request_id": ...}`.

use std::io::IsTerminal;

use tracing_subscriber::EnvFilter;

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub(crate) enum LogFormat {
    /// Human-readable text.
    Text,
    /// One JSON object per line.
    Json,
}

impl LogFormat {
    /// Parses the config file's `log_format`.
    pub(crate) fn parse(text: &str) -> Result<Self, String> {
        match text {
            "text" => Ok(LogFormat::Text),
            "json" => Ok(LogFormat::Json),
            other => Err(format!("log_format: {other:?}; use text or json")),
        }
    }
}

/// The level filter: `FLOODGATE_LOG`, else `RUST_LOG`, else `info`. A filter that does not
/// parse is reported on stderr and `info` is used, so a typo cannot silence the server.
fn filter() -> EnvFilter {
    for var in ["FLOODGATE_LOG", "RUST_LOG"] {
        match std::env::var(var) {
            Ok(text) if !text.trim().is_empty() => match EnvFilter::try_new(&text) {
                Ok(filter) => return filter,
                Err(e) => {
                    super::warn(&format!(
                        "{var}={text:?} is not a log filter ({e}); using info"
                    ));
                    return EnvFilter::new("info");
                }
            },
            _ => {}
        }
    }
    EnvFilter::new("info")
}

/// Installs the global subscriber, writing to stderr.
pub(crate) fn init(format: LogFormat) {
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter())
        .with_writer(std::io::stderr)
        // Colour codes only for a person at a terminal, not in journald or a log file.
        .with_ansi(std::io::stderr().is_terminal());
    // try_init: a second call (tests running serve twice in one process) keeps the first.
    let _ = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .with_span_list(false)
            .try_init(),
    };
}
