//! Backend concurrency over time, one panel per strategy, as a hand-written SVG.
//!
//! Every panel shares the vertical scale; each spans its own run in time (the runs last from
//! seconds to most of an hour, and one shared axis would squash the short ones). Each pixel
//! column shows the most queries the backend held during its slice of time (so a 10 ms
//! burst of rejected queries still shows); the backend's limit is a dashed red line and the
//! limiter's limit, where there is one, an orange line.

use std::fmt::Write as _;

use super::report::{fmt_secs, StrategyReport};
use super::{Simulation, Strategy, Trace};

const WIDTH: f64 = 960.0;
const LEFT: f64 = 56.0;
const RIGHT: f64 = 24.0;
const TOP: f64 = 44.0;
const HEADER: f64 = 22.0;
const PLOT_H: f64 = 110.0;
const GAP: f64 = 40.0;
const BOTTOM: f64 = 34.0;

const AREA: &str = "#4e79a7";
const BACKEND: &str = "#e15759";
const LIMIT: &str = "#f28e2b";
const GRID: &str = "#dddddd";

/// Draws `sim` as an SVG document.
pub fn render_svg(sim: &Simulation) -> String {
    let report = &sim.report;
    let plot_w = WIDTH - LEFT - RIGHT;
    let peak = report
        .strategies
        .iter()
        .map(|s| s.peak_concurrency)
        .chain(sim.traces.iter().flat_map(|t| t.limit.iter().map(|l| l.1)))
        .max()
        .unwrap_or(0)
        .max(report.backend_limit);
    let y_step = nice_step(f64::from(peak) * 1.1, 4);
    let y_max = (f64::from(peak) * 1.1 / y_step).ceil() * y_step;
    let panels = sim.traces.len().max(1) as f64;
    let height = TOP + panels * (HEADER + PLOT_H + GAP) - GAP + BOTTOM;

    let mut out = String::new();
    let _ = writeln!(
        out,
        r##"<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{height:.0}" viewBox="0 0 {WIDTH} {height:.0}" font-family="Helvetica, Arial, sans-serif" font-size="12">"##
    );
    let _ = writeln!(out, r##"<rect width="100%" height="100%" fill="white"/>"##);
    let _ = writeln!(
        out,
        r##"<text x="{LEFT}" y="20" font-size="15" font-weight="bold">Backend concurrency over time (floodgate simulate)</text>"##
    );
    let _ = writeln!(
        out,
        r##"<text x="{LEFT}" y="36" fill="#555">seed {}, {} organizations, {} queries, {} workers; backend admits {}; each panel spans its own run; most queries held per pixel</text>"##,
        report.seed, report.orgs, report.queries, report.workers, report.backend_limit
    );

    for (i, trace) in sim.traces.iter().enumerate() {
        let top = TOP + i as f64 * (HEADER + PLOT_H + GAP);
        let plot_top = top + HEADER;
        let base = plot_top + PLOT_H;
        let t_end = trace_end_us(trace).max(1_000_000) as f64 / 1e6;
        let x_step = nice_time_step(t_end);
        let x = |t_s: f64| LEFT + plot_w * (t_s / t_end).clamp(0.0, 1.0);
        let y = |v: f64| base - PLOT_H * (v / y_max).clamp(0.0, 1.0);
        let stats = report.strategies.get(i);
        let _ = writeln!(
            out,
            r##"<text x="{LEFT}" y="{:.1}" font-weight="bold">{}</text>"##,
            plot_top - 7.0,
            trace.strategy.name(),
        );
        let _ = writeln!(
            out,
            r##"<text x="{:.1}" y="{:.1}" fill="#333">{}</text>"##,
            LEFT + 140.0,
            plot_top - 7.0,
            stats.map_or_else(String::new, |s| summary(s, report.queries))
        );
        // Grid, axes and y labels.
        let _ = writeln!(
            out,
            r##"<rect x="{LEFT}" y="{plot_top:.1}" width="{plot_w}" height="{PLOT_H}" fill="none" stroke="#999"/>"##
        );
        let mut v = 0.0;
        while v <= y_max + 1e-9 {
            let yy = y(v);
            if v > 0.0 && v < y_max {
                let _ = writeln!(
                    out,
                    r##"<line x1="{LEFT}" y1="{yy:.1}" x2="{:.1}" y2="{yy:.1}" stroke="{GRID}"/>"##,
                    LEFT + plot_w
                );
            }
            let _ = writeln!(
                out,
                r##"<text x="{:.1}" y="{:.1}" text-anchor="end" fill="#555">{v:.0}</text>"##,
                LEFT - 6.0,
                yy + 4.0
            );
            v += y_step;
        }
        let mut t = x_step;
        while t < t_end {
            let xx = x(t);
            let _ = writeln!(
                out,
                r##"<line x1="{xx:.1}" y1="{plot_top:.1}" x2="{xx:.1}" y2="{base:.1}" stroke="{GRID}"/>"##
            );
            t += x_step;
        }
        let mut t = 0.0;
        while t <= t_end + 1e-9 {
            let _ = writeln!(
                out,
                r##"<text x="{:.1}" y="{:.1}" text-anchor="middle" fill="#555">{}</text>"##,
                x(t),
                base + 14.0,
                time_label(t)
            );
            t += x_step;
        }
        // The concurrency area.
        let cols = plot_w.round() as usize;
        let maxima = bucket_max(trace, t_end, cols);
        let mut path = format!("M{:.1},{base:.1}", x(0.0));
        // One horizontal segment per run of equal columns keeps the file small.
        let mut c = 0;
        while c < maxima.len() {
            let m = maxima[c];
            let mut end = c + 1;
            while end < maxima.len() && maxima[end] == m {
                end += 1;
            }
            let yy = y(f64::from(m));
            let _ = write!(
                path,
                " L{:.1},{yy:.1} L{:.1},{yy:.1}",
                LEFT + c as f64,
                LEFT + end as f64
            );
            c = end;
        }
        let _ = write!(path, " L{:.1},{base:.1} Z", LEFT + maxima.len() as f64);
        let _ = writeln!(
            out,
            r##"<path d="{path}" fill="{AREA}" fill-opacity="0.35" stroke="{AREA}" stroke-width="1"/>"##
        );
        // The backend's limit.
        let yb = y(f64::from(report.backend_limit));
        let _ = writeln!(
            out,
            r##"<line x1="{LEFT}" y1="{yb:.1}" x2="{:.1}" y2="{yb:.1}" stroke="{BACKEND}" stroke-width="1.5" stroke-dasharray="6,4"/>"##,
            LEFT + plot_w
        );
        let _ = writeln!(
            out,
            r##"<text x="{:.1}" y="{:.1}" text-anchor="end" fill="{BACKEND}">backend limit {}</text>"##,
            LEFT + plot_w - 4.0,
            yb - 4.0,
            report.backend_limit
        );
        // The limiter's limit (or the seed counter's MAX).
        let limit_line: Vec<(u64, u32)> = if trace.strategy == Strategy::SeedCounter {
            vec![(0, report.limit)]
        } else {
            trace.limit.clone()
        };
        if !limit_line.is_empty() {
            let end_s = trace.makespan_us as f64 / 1e6;
            let mut d = String::new();
            for (k, (at, l)) in limit_line.iter().enumerate() {
                let (xx, yy) = (x(*at as f64 / 1e6), y(f64::from(*l)));
                if k == 0 {
                    let _ = write!(d, "M{xx:.1},{yy:.1}");
                } else {
                    let _ = write!(d, " H{xx:.1} V{yy:.1}");
                }
            }
            let _ = write!(d, " H{:.1}", x(end_s));
            let label = if trace.strategy == Strategy::SeedCounter {
                format!("MAX_CONCURRENT {}", report.limit)
            } else if trace.strategy.adapts() {
                "adaptive limit".to_string()
            } else {
                format!("limit {}", report.limit)
            };
            let first_y = y(f64::from(limit_line[0].1));
            let _ = writeln!(
                out,
                r##"<path d="{d}" fill="none" stroke="{LIMIT}" stroke-width="1.5" stroke-dasharray="{}"/>"##,
                if trace.strategy == Strategy::SeedCounter {
                    "2,3"
                } else {
                    "none"
                }
            );
            let _ = writeln!(
                out,
                r##"<text x="{:.1}" y="{:.1}" fill="{LIMIT}">{label}</text>"##,
                LEFT + 4.0,
                first_y - 4.0
            );
        }
    }
    let base = TOP + panels * (HEADER + PLOT_H + GAP) - GAP;
    let _ = writeln!(
        out,
        r##"<text x="{:.1}" y="{:.1}" text-anchor="end" fill="#555">simulated time</text>"##,
        LEFT + plot_w,
        base + 28.0
    );
    let _ = writeln!(
        out,
        r##"<text x="14" y="{:.1}" fill="#555" transform="rotate(-90 14 {:.1})" text-anchor="middle">queries at the backend</text>"##,
        TOP + (base - TOP) / 2.0,
        TOP + (base - TOP) / 2.0
    );
    out.push_str("</svg>\n");
    out
}

fn summary(s: &StrategyReport, queries: u64) -> String {
    let pct = if queries == 0 {
        0.0
    } else {
        100.0 * s.lost as f64 / queries as f64
    };
    format!(
        "   peak {} · rejected {} · lost {} ({:.1}%) · makespan {} ({:.2}x ideal at {})",
        s.peak_concurrency,
        s.rejected,
        s.lost,
        pct,
        fmt_secs(s.makespan_s),
        s.makespan_ratio,
        s.ideal_limit
    )
}

/// When a trace ends: its last task, or the last query a killed task left running.
fn trace_end_us(trace: &Trace) -> u64 {
    trace
        .makespan_us
        .max(trace.concurrency.last().map_or(0, |p| p.0))
}

/// The most queries held during each of `cols` equal slices of `[0, t_end]`.
fn bucket_max(trace: &Trace, t_end_s: f64, cols: usize) -> Vec<u32> {
    let t_end = t_end_s * 1e6;
    let last = trace_end_us(trace) as f64;
    let mut out = Vec::with_capacity(cols);
    let mut i = 0;
    let mut current = 0;
    for c in 0..cols {
        let start = t_end * c as f64 / cols as f64;
        if start > last {
            break;
        }
        let end = t_end * (c + 1) as f64 / cols as f64;
        let mut m = current;
        while i < trace.concurrency.len() && (trace.concurrency[i].0 as f64) < end {
            current = trace.concurrency[i].1;
            m = m.max(current);
            i += 1;
        }
        out.push(m);
    }
    out
}

/// A round step that cuts `range` into at most about `n` parts.
fn nice_step(range: f64, n: u32) -> f64 {
    let raw = (range / f64::from(n)).max(1.0);
    let mag = 10f64.powf(raw.log10().floor());
    for f in [1.0, 2.0, 2.5, 5.0, 10.0] {
        if f * mag >= raw {
            return f * mag;
        }
    }
    10.0 * mag
}

/// A round time step (in seconds) giving at most about ten ticks.
fn nice_time_step(t_end: f64) -> f64 {
    const STEPS: [f64; 16] = [
        1.0, 2.0, 5.0, 10.0, 15.0, 30.0, 60.0, 120.0, 300.0, 600.0, 900.0, 1200.0, 1800.0, 3600.0,
        7200.0, 14400.0,
    ];
    STEPS
        .into_iter()
        .find(|s| t_end / s <= 10.0)
        .unwrap_or(86400.0)
}

fn time_label(t: f64) -> String {
    let t = t.round() as u64;
    match t {
        0 => "0".into(),
        _ if t % 3600 == 0 => format!("{}h", t / 3600),
        _ if t % 60 == 0 => format!("{}m", t / 60),
        _ if t > 60 => format!("{}m{:02}s", t / 60, t % 60),
        _ => format!("{t}s"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn steps_and_labels_are_round() {
        assert_eq!(nice_step(110.0, 4), 50.0);
        assert_eq!(nice_step(220.0, 4), 100.0);
        assert_eq!(nice_time_step(700.0), 120.0);
        assert_eq!(time_label(120.0), "2m");
        assert_eq!(time_label(30.0), "30s");
        assert_eq!(time_label(90.0), "1m30s");
        assert_eq!(time_label(7200.0), "2h");
    }

    #[test]
    fn buckets_keep_short_peaks() {
        let trace = Trace {
            strategy: Strategy::Unbounded,
            concurrency: vec![(0, 0), (100, 5), (110, 1), (5_000_000, 0)],
            limit: Vec::new(),
            makespan_us: 5_000_000,
        };
        let m = bucket_max(&trace, 10.0, 10);
        assert_eq!(m, vec![5, 1, 1, 1, 1, 1]);
    }
}
