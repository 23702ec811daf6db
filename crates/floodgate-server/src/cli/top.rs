//! `floodgate top`: the dashboard's overview in the terminal, refreshed live, in the style of
//! `htop`, for people on a server over SSH.
//!
//! Reads `GET /dashboard/api/overview` (the same numbers as the web overview) every
//! `--interval`. Keys: `q` (or Esc, Ctrl-C) quits, `s` cycles the sort column, `r` reverses
//! it. SIGINT and SIGTERM quit too; the terminal is restored either way. Drawing is plain ANSI
//! (one frame a second needs no widget library); crossterm provides raw mode, the terminal's
//! size and key events.

use std::io::Write;
use std::time::Duration;

use crossterm::event::{Event, KeyCode, KeyEvent, KeyModifiers};
use serde_json::Value;

use super::duration::parse_duration;
use super::{Failure, ServerArgs};

/// Flags of `floodgate top`.
#[derive(Debug, clap::Args)]
pub(crate) struct TopArgs {
    #[command(flatten)]
    server: ServerArgs,
    /// How often to refresh (no more often than every 100 ms: a shorter interval is raised to
    /// it, so a dashboard left open cannot load the server with a request per millisecond).
    #[arg(long, default_value = "1s", value_parser = parse_duration)]
    interval: Duration,
    /// Show only limiters whose name contains this.
    #[arg(long)]
    filter: Option<String>,
    /// Print one frame and exit (no raw mode; for scripts and pipes).
    #[arg(long)]
    once: bool,
}

/// The columns, in order: (title, JSON key, width).
const COLUMNS: [(&str, &str, usize); 9] = [
    ("IN_USE/LIMIT", "in_use", 13),
    ("WAIT", "waiting", 6),
    ("OLDEST", "oldest_wait_ms", 8),
    ("GRANT/S", "grants_s", 8),
    ("TMOUT/S", "timeouts_s", 8),
    ("P50", "wait_p50_ms", 8),
    ("P99", "wait_p99_ms", 8),
    ("THROTTLED", "throttled", 10),
    ("EXPIRED", "expired", 8),
];

/// What the view shows: the sort column (`None`: by name) and its direction.
#[derive(Debug, Clone, Default)]
struct View {
    sort: Option<usize>,
    reverse: bool,
    filter: Option<String>,
}

fn f(v: &Value, k: &str) -> f64 {
    v.get(k).and_then(Value::as_f64).unwrap_or(0.0)
}

fn ms(v: f64) -> String {
    if v < 0.0 {
        "-".to_owned()
    } else if v < 1000.0 {
        format!("{v:.0}ms")
    } else if v < 60_000.0 {
        format!("{:.1}s", v / 1000.0)
    } else {
        format!("{:.0}m", v / 60_000.0)
    }
}

fn rate(v: f64) -> String {
    if v >= 100.0 {
        format!("{v:.0}")
    } else {
        format!("{v:.1}")
    }
}

/// One frame for a terminal of `width` x `height`: header, column titles, as many limiters as
/// fit. Pure, so it is tested without a terminal.
fn render(
    overview: &Value,
    error: Option<&str>,
    view: &View,
    width: usize,
    height: usize,
) -> Vec<String> {
    let empty = Vec::new();
    let mut limiters: Vec<&Value> = overview
        .get("limiters")
        .and_then(Value::as_array)
        .unwrap_or(&empty)
        .iter()
        .filter(|l| {
            view.filter.as_deref().is_none_or(|f| {
                l.get("name")
                    .and_then(Value::as_str)
                    .is_some_and(|n| n.contains(f))
            })
        })
        .collect();
    let name = |l: &Value| {
        l.get("name")
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_owned()
    };
    match view.sort {
        None => limiters.sort_by_key(|l| name(l)),
        Some(i) => {
            let key = COLUMNS[i].1;
            let value = |l: &Value| {
                if key == "in_use" {
                    // Saturation, not the raw count.
                    f(l, "in_use") / f(l, "limit").max(1.0)
                } else {
                    f(l, key)
                }
            };
            limiters.sort_by(|a, b| value(b).total_cmp(&value(a)).then(name(a).cmp(&name(b))));
        }
    }
    if view.reverse {
        limiters.reverse();
    }
    let store = overview.get("store").and_then(Value::as_str).unwrap_or("?");
    let t = overview.get("t").and_then(Value::as_u64).unwrap_or(0);
    let clock = format!("{:02}:{:02}:{:02}", t / 3600 % 24, t / 60 % 60, t % 60);
    let sorted = view.sort.map_or("LIMITER", |i| COLUMNS[i].0);
    let mut lines = vec![
        format!(
            "floodgate top  {clock} UTC  store: {}  {} limiters  sort: {sorted}{}  (q quit, s sort, r reverse)",
            error.unwrap_or(store),
            limiters.len(),
            if view.reverse { " reversed" } else { "" },
        ),
        String::new(),
    ];
    let name_w = width
        .saturating_sub(COLUMNS.iter().map(|c| c.2 + 1).sum::<usize>())
        .clamp(12, 48);
    let mut title = format!("{:<name_w$}", "LIMITER");
    for (t, _, w) in COLUMNS {
        title.push_str(&format!(" {t:>w$}"));
    }
    lines.push(title);
    for l in limiters.iter().take(height.saturating_sub(lines.len())) {
        let mut n = name(l);
        if n.chars().count() > name_w {
            n = n.chars().take(name_w - 1).collect::<String>() + "~";
        }
        let limit = l
            .get("limit")
            .and_then(Value::as_u64)
            .map_or("-".to_owned(), |v| v.to_string());
        let cells = [
            format!("{}/{limit}", f(l, "in_use")),
            format!("{}", f(l, "waiting")),
            if f(l, "waiting") > 0.0 {
                ms(f(l, "oldest_wait_ms"))
            } else {
                "-".to_owned()
            },
            rate(f(l, "grants_s")),
            rate(f(l, "timeouts_s")),
            ms(f(l, "wait_p50_ms")),
            ms(f(l, "wait_p99_ms")),
            format!("{}", f(l, "throttled")),
            format!("{}", f(l, "expired")),
        ];
        let mut line = format!("{n:<name_w$}");
        for ((_, _, w), cell) in COLUMNS.iter().zip(cells) {
            line.push_str(&format!(" {cell:>w$}"));
        }
        lines.push(line);
    }
    for line in &mut lines {
        if line.chars().count() > width {
            *line = line.chars().take(width).collect();
        }
    }
    lines
}

/// Raw mode and the alternate screen, undone on drop (also on an error or a signal).
struct Screen;

impl Screen {
    fn enter() -> Result<Screen, Failure> {
        crossterm::terminal::enable_raw_mode()
            .map_err(|e| Failure::usage(format!("top needs a terminal ({e}); use --once")))?;
        let mut out = std::io::stdout();
        let _ = out.write_all(b"\x1b[?1049h\x1b[?25l");
        let _ = out.flush();
        Ok(Screen)
    }
}

impl Drop for Screen {
    fn drop(&mut self) {
        let mut out = std::io::stdout();
        let _ = out.write_all(b"\x1b[?25h\x1b[?1049l");
        let _ = out.flush();
        let _ = crossterm::terminal::disable_raw_mode();
    }
}

fn draw(lines: &[String]) {
    let mut frame = String::from("\x1b[H");
    for line in lines {
        frame.push_str(line);
        frame.push_str("\x1b[K\r\n");
    }
    frame.push_str("\x1b[J");
    let mut out = std::io::stdout();
    let _ = out.write_all(frame.as_bytes());
    let _ = out.flush();
}

enum Key {
    Quit,
    Sort,
    Reverse,
    Redraw,
}

fn key(event: Event) -> Option<Key> {
    match event {
        Event::Key(KeyEvent {
            code, modifiers, ..
        }) => match code {
            KeyCode::Char('c') if modifiers.contains(KeyModifiers::CONTROL) => Some(Key::Quit),
            KeyCode::Char('q') | KeyCode::Char('Q') | KeyCode::Esc => Some(Key::Quit),
            KeyCode::Char('s') => Some(Key::Sort),
            KeyCode::Char('r') => Some(Key::Reverse),
            _ => None,
        },
        Event::Resize(..) => Some(Key::Redraw),
        _ => None,
    }
}

pub(crate) async fn top(args: TopArgs) -> Result<u8, Failure> {
    let client = args.server.client()?;
    let mut view = View {
        filter: args.filter.clone(),
        ..View::default()
    };
    if args.once {
        let overview = client.overview().await?;
        let lines = render(&overview, None, &view, 160, usize::MAX);
        super::print(&(lines.join("\n") + "\n"))?;
        return Ok(0);
    }
    let screen = Screen::enter()?;
    // Key events come from a blocking read on their own thread.
    let (tx, mut keys) = tokio::sync::mpsc::channel(16);
    std::thread::spawn(move || {
        while let Ok(event) = crossterm::event::read() {
            if let Some(k) = key(event) {
                if tx.blocking_send(k).is_err() {
                    return;
                }
            }
        }
    });
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .map_err(|e| Failure::usage(format!("cannot watch SIGTERM: {e}")))?;
    // The requests run in a task of their own: awaited in the loop below, a server that does
    // not answer held back `q` and the signals until the request's timeout (30 s).
    let interval = args.interval.max(Duration::from_millis(100));
    let (answers_tx, mut answers) = tokio::sync::mpsc::channel(1);
    let poller = tokio::spawn(async move {
        let mut ticks = tokio::time::interval(interval);
        // After a slow answer, the next request waits its interval (no burst to catch up).
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            ticks.tick().await;
            if answers_tx.send(client.overview().await).await.is_err() {
                return;
            }
        }
    });
    let mut overview = Value::Null;
    let mut error: Option<String> = None;
    loop {
        tokio::select! {
            Some(answer) = answers.recv() => {
                match answer {
                    Ok(v) => { overview = v; error = None; }
                    Err(e) => error = Some(format!("unreachable ({e})")),
                }
            }
            k = keys.recv() => match k {
                Some(Key::Quit) | None => break,
                Some(Key::Sort) => view.sort = match view.sort {
                    None => Some(0),
                    Some(i) if i + 1 < COLUMNS.len() => Some(i + 1),
                    Some(_) => None,
                },
                Some(Key::Reverse) => view.reverse = !view.reverse,
                Some(Key::Redraw) => {}
            },
            _ = tokio::signal::ctrl_c() => break,
            _ = term.recv() => break,
        }
        let (w, h) = crossterm::terminal::size().unwrap_or((120, 40));
        draw(&render(
            &overview,
            error.as_deref(),
            &view,
            usize::from(w),
            usize::from(h),
        ));
    }
    poller.abort();
    drop(screen);
    Ok(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_sorted_filtered_and_fitted_to_the_terminal() {
        let overview = serde_json::json!({"t": 3723, "store": "ok", "limiters": [
            {"name": "alpha", "in_use": 1, "limit": 10, "waiting": 0, "grants_s": 2.5,
             "wait_p50_ms": -1, "wait_p99_ms": -1, "throttled": 0, "expired": 0},
            {"name": "beta", "in_use": 10, "limit": 10, "waiting": 4, "oldest_wait_ms": 2500,
             "grants_s": 120.0, "wait_p50_ms": 12.0, "wait_p99_ms": 900.0, "throttled": 3, "expired": 1},
        ]});
        let lines = render(&overview, None, &View::default(), 120, 40);
        assert!(
            lines[0].contains("01:02:03") && lines[0].contains("store: ok"),
            "{}",
            lines[0]
        );
        assert!(lines[3].starts_with("alpha") && lines[4].starts_with("beta"));
        assert!(
            lines[4].contains("10/10") && lines[4].contains("2.5s") && lines[4].contains("900ms")
        );
        let by_use = View {
            sort: Some(0),
            ..View::default()
        };
        assert!(render(&overview, None, &by_use, 120, 40)[3].starts_with("beta"));
        let filtered = View {
            filter: Some("alp".into()),
            ..View::default()
        };
        assert_eq!(render(&overview, None, &filtered, 120, 40).len(), 4);
        // Only what fits: 3 header lines + 1 row; no line wider than the terminal.
        let small = render(&overview, Some("unreachable"), &View::default(), 60, 4);
        assert_eq!(small.len(), 4);
        assert!(small.iter().all(|l| l.chars().count() <= 60));
        assert!(small[0].contains("unreachable"));
    }
}
