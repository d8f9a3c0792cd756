//! Side-by-side comparison of run reports: latency percentile curves on the log "nines" axis,
//! throughput over time, and a table of differences, written as standalone SVG files and one
//! self-contained HTML page (the same SVG inlined; no scripts, no CDN).

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use anyhow::Context;
use hdrhistogram::Histogram;

use crate::metrics::{LatencySummary, decode_histogram};
use crate::report::Report;

/// Colours that stay distinguishable in print and for common colour-blindness (Okabe-Ito).
const PALETTE: [&str; 8] = [
    "#0072B2", "#D55E00", "#009E73", "#CC79A7", "#E69F00", "#56B4E9", "#F0E442", "#000000",
];

/// One line of a chart.
pub struct Series {
    pub name: String,
    pub points: Vec<(f64, f64)>,
    pub dashed: bool,
    pub colour: &'static str,
}

#[derive(Clone, Copy, PartialEq)]
pub enum Axis {
    Linear,
    /// Base-10 logarithmic (values must be positive).
    Log,
    /// The percentile "nines" axis: the value plotted is `-log10(1 - q)`, labelled as percentiles.
    Nines,
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

fn nice_step(range: f64, target_ticks: f64) -> f64 {
    let raw = range / target_ticks;
    let magnitude = 10f64.powf(raw.log10().floor());
    let residual = raw / magnitude;
    let nice = if residual > 5.0 {
        10.0
    } else if residual > 2.0 {
        5.0
    } else if residual > 1.0 {
        2.0
    } else {
        1.0
    };
    nice * magnitude
}

fn format_tick(v: f64) -> String {
    if v == 0.0 {
        "0".to_string()
    } else if v.abs() >= 100.0 {
        format!("{v:.0}")
    } else if v.abs() >= 1.0 {
        format!("{}", (v * 100.0).round() / 100.0)
    } else {
        format!("{}", (v * 10000.0).round() / 10000.0)
    }
}

fn nines_label(x: f64) -> String {
    // x = -log10(1 - q): 0 → 0%, 1 → 90%, 2 → 99%, 3 → 99.9% ...
    let q = 1.0 - 10f64.powf(-x);
    let pct = q * 100.0;
    if x < 1.0 - 1e-9 {
        format!("{pct:.0}%")
    } else {
        let decimals = (x.round() as usize).saturating_sub(2);
        format!("{pct:.decimals$}%")
    }
}

/// Renders a line chart as a standalone SVG document.
pub fn line_chart(
    title: &str,
    x_label: &str,
    y_label: &str,
    x_axis: Axis,
    y_axis: Axis,
    series: &[Series],
) -> String {
    let (width, height) = (860.0, 440.0);
    let (left, right, top, bottom) = (80.0, 220.0, 40.0, 60.0);
    let plot_w = width - left - right;
    let plot_h = height - top - bottom;
    let transform = |axis: Axis, v: f64| {
        if axis == Axis::Log {
            v.max(1e-9).log10()
        } else {
            v
        }
    };
    let all: Vec<(f64, f64)> = series
        .iter()
        .flat_map(|s| {
            s.points
                .iter()
                .map(|&(x, y)| (transform(x_axis, x), transform(y_axis, y)))
        })
        .filter(|(x, y)| x.is_finite() && y.is_finite())
        .collect();
    let mut svg = String::new();
    let _ = writeln!(
        svg,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" viewBox="0 0 {width} {height}" font-family="sans-serif" font-size="12">"#
    );
    let _ = writeln!(
        svg,
        r##"<rect width="100%" height="100%" fill="#ffffff"/>"##
    );
    let _ = writeln!(
        svg,
        r#"<text x="{}" y="22" font-size="15" font-weight="bold">{}</text>"#,
        left,
        escape(title)
    );
    if all.is_empty() {
        let _ = writeln!(
            svg,
            r#"<text x="{}" y="{}">no data measured</text></svg>"#,
            left + 10.0,
            top + 30.0
        );
        return svg;
    }
    let (mut x_min, mut x_max) = all
        .iter()
        .fold((f64::MAX, f64::MIN), |(a, b), p| (a.min(p.0), b.max(p.0)));
    let (mut y_min, mut y_max) = all
        .iter()
        .fold((f64::MAX, f64::MIN), |(a, b), p| (a.min(p.1), b.max(p.1)));
    if y_axis == Axis::Linear {
        y_min = y_min.min(0.0);
    } else {
        y_min = y_min.floor();
        y_max = y_max.ceil();
    }
    if x_axis == Axis::Nines {
        x_min = 0.0;
        x_max = x_max.ceil().max(1.0);
    }
    if (x_max - x_min).abs() < 1e-12 {
        x_max = x_min + 1.0;
    }
    if (y_max - y_min).abs() < 1e-12 {
        y_max = y_min + 1.0;
    }
    if y_axis == Axis::Linear {
        y_max *= 1.05;
    }
    let px = |x: f64| left + (x - x_min) / (x_max - x_min) * plot_w;
    let py = |y: f64| top + plot_h - (y - y_min) / (y_max - y_min) * plot_h;

    // Grid and ticks.
    let _ = writeln!(svg, r##"<g stroke="#dddddd" stroke-width="1">"##);
    let mut x_ticks = Vec::new();
    match x_axis {
        Axis::Nines => {
            let mut t = 0.0;
            while t <= x_max + 1e-9 {
                x_ticks.push((t, nines_label(t)));
                t += 1.0;
            }
        }
        Axis::Log => {
            let mut t = x_min.floor();
            while t <= x_max + 1e-9 {
                x_ticks.push((t, format_tick(10f64.powf(t))));
                t += 1.0;
            }
        }
        Axis::Linear => {
            let step = nice_step(x_max - x_min, 8.0);
            let mut t = (x_min / step).ceil() * step;
            while t <= x_max + 1e-9 {
                x_ticks.push((t, format_tick(t)));
                t += step;
            }
        }
    }
    let mut y_ticks = Vec::new();
    if y_axis == Axis::Log {
        let mut t = y_min;
        while t <= y_max + 1e-9 {
            y_ticks.push((t, format_tick(10f64.powf(t))));
            t += 1.0;
        }
    } else {
        let step = nice_step(y_max - y_min, 6.0);
        let mut t = (y_min / step).ceil() * step;
        while t <= y_max + 1e-9 {
            y_ticks.push((t, format_tick(t)));
            t += step;
        }
    }
    for (t, _) in &x_ticks {
        let _ = writeln!(
            svg,
            r#"<line x1="{:.1}" y1="{top}" x2="{:.1}" y2="{:.1}"/>"#,
            px(*t),
            px(*t),
            top + plot_h
        );
    }
    for (t, _) in &y_ticks {
        let _ = writeln!(
            svg,
            r#"<line x1="{left}" y1="{:.1}" x2="{:.1}" y2="{:.1}"/>"#,
            py(*t),
            left + plot_w,
            py(*t)
        );
    }
    let _ = writeln!(svg, "</g>");
    for (t, label) in &x_ticks {
        let _ = writeln!(
            svg,
            r#"<text x="{:.1}" y="{:.1}" text-anchor="middle">{}</text>"#,
            px(*t),
            top + plot_h + 18.0,
            escape(label)
        );
    }
    for (t, label) in &y_ticks {
        let _ = writeln!(
            svg,
            r#"<text x="{:.1}" y="{:.1}" text-anchor="end">{}</text>"#,
            left - 6.0,
            py(*t) + 4.0,
            escape(label)
        );
    }
    let _ = writeln!(
        svg,
        r##"<rect x="{left}" y="{top}" width="{plot_w}" height="{plot_h}" fill="none" stroke="#333333"/>"##
    );
    let _ = writeln!(
        svg,
        r#"<text x="{:.1}" y="{:.1}" text-anchor="middle">{}</text>"#,
        left + plot_w / 2.0,
        height - 18.0,
        escape(x_label)
    );
    let _ = writeln!(
        svg,
        r#"<text transform="translate(18,{:.1}) rotate(-90)" text-anchor="middle">{}</text>"#,
        top + plot_h / 2.0,
        escape(y_label)
    );

    // Series and legend.
    for (i, s) in series.iter().enumerate() {
        let points: Vec<String> = s
            .points
            .iter()
            .map(|&(x, y)| (transform(x_axis, x), transform(y_axis, y)))
            .filter(|(x, y)| x.is_finite() && y.is_finite())
            .map(|(x, y)| format!("{:.1},{:.1}", px(x), py(y)))
            .collect();
        let dash = if s.dashed {
            r#" stroke-dasharray="6,4""#
        } else {
            ""
        };
        if !points.is_empty() {
            let _ = writeln!(
                svg,
                r#"<polyline fill="none" stroke="{}" stroke-width="2"{dash} points="{}"/>"#,
                s.colour,
                points.join(" ")
            );
        }
        let ly = top + 10.0 + i as f64 * 18.0;
        let lx = left + plot_w + 14.0;
        let _ = writeln!(
            svg,
            r#"<line x1="{lx}" y1="{ly}" x2="{}" y2="{ly}" stroke="{}" stroke-width="3"{dash}/><text x="{}" y="{}">{}</text>"#,
            lx + 22.0,
            s.colour,
            lx + 28.0,
            ly + 4.0,
            escape(&s.name)
        );
    }
    let _ = writeln!(svg, "</svg>");
    svg
}

/// Points of a percentile curve: x on the nines axis, y in ms, up to the resolution the
/// histogram's count supports (no extrapolated tail).
pub fn percentile_curve(h: &Histogram<u64>) -> Vec<(f64, f64)> {
    if h.is_empty() {
        return Vec::new();
    }
    let max_nines = (h.len() as f64).log10().max(1.0);
    let mut points = Vec::new();
    let mut x = 0.0;
    while x <= max_nines + 1e-9 {
        let q = 1.0 - 10f64.powf(-x);
        points.push((x, h.value_at_quantile(q) as f64 / 1000.0));
        x += 0.05;
    }
    points.push((max_nines, h.max() as f64 / 1000.0));
    points
}

struct Loaded {
    report: Report,
    publish_latency: Histogram<u64>,
    publish_delay: Histogram<u64>,
    end_to_end: Histogram<u64>,
}

/// Reads the reports and writes `index.html` plus the SVGs into `out_dir`; returns the page.
pub fn compare_files(paths: &[PathBuf], out_dir: &Path) -> anyhow::Result<PathBuf> {
    let mut reports = Vec::new();
    for p in paths {
        reports.push(Report::read(p)?);
    }
    compare_reports(&reports, out_dir)
}

pub fn compare_reports(reports: &[Report], out_dir: &Path) -> anyhow::Result<PathBuf> {
    if reports.is_empty() {
        anyhow::bail!("compare needs at least one report");
    }
    let mut loaded = Vec::new();
    for r in reports {
        loaded.push(Loaded {
            publish_latency: decode_histogram(&r.histograms.publish_latency_us)
                .context("publish latency histogram")?,
            publish_delay: decode_histogram(&r.histograms.publish_delay_us)
                .context("publish delay histogram")?,
            end_to_end: decode_histogram(&r.histograms.end_to_end_latency_us)
                .context("end-to-end histogram")?,
            report: r.clone(),
        });
    }
    // Labels must be unique for a legend to mean anything.
    let mut labels: Vec<String> = Vec::new();
    for l in &loaded {
        let mut label = l.report.label.clone();
        let mut n = 2;
        while labels.contains(&label) {
            label = format!("{} #{n}", l.report.label);
            n += 1;
        }
        labels.push(label);
    }
    std::fs::create_dir_all(out_dir).with_context(|| format!("creating {}", out_dir.display()))?;
    let latency_chart = |title: &str, pick: &dyn Fn(&Loaded) -> &Histogram<u64>| {
        let series: Vec<Series> = loaded
            .iter()
            .enumerate()
            .map(|(i, l)| Series {
                name: labels[i].clone(),
                points: percentile_curve(pick(l)),
                dashed: false,
                colour: PALETTE[i % PALETTE.len()],
            })
            .collect();
        line_chart(
            title,
            "percentile",
            "latency (ms, log scale)",
            Axis::Nines,
            Axis::Log,
            &series,
        )
    };
    let charts = vec![
        (
            "publish-latency.svg",
            "Publish latency (from intended send time)",
            latency_chart("Publish latency (from intended send time)", &|l| {
                &l.publish_latency
            }),
        ),
        (
            "end-to-end-latency.svg",
            "End-to-end latency",
            latency_chart("End-to-end latency", &|l| &l.end_to_end),
        ),
        (
            "publish-delay.svg",
            "Publish delay (intended vs actual send)",
            latency_chart("Publish delay (intended vs actual send)", &|l| {
                &l.publish_delay
            }),
        ),
        ("throughput.svg", "Throughput over time", {
            let mut series = Vec::new();
            for (i, l) in loaded.iter().enumerate() {
                let mid = |iv: &crate::report::IntervalReport| iv.start_s + iv.duration_s / 2.0;
                series.push(Series {
                    name: format!("{} publish", labels[i]),
                    points: l
                        .report
                        .intervals
                        .iter()
                        .map(|iv| (mid(iv), iv.publish_rate_mb_per_s))
                        .collect(),
                    dashed: false,
                    colour: PALETTE[i % PALETTE.len()],
                });
                series.push(Series {
                    name: format!("{} consume", labels[i]),
                    points: l
                        .report
                        .intervals
                        .iter()
                        .map(|iv| (mid(iv), iv.consume_rate_mb_per_s))
                        .collect(),
                    dashed: true,
                    colour: PALETTE[i % PALETTE.len()],
                });
            }
            line_chart(
                "Throughput over time",
                "seconds into the measured phase",
                "MB/s",
                Axis::Linear,
                Axis::Linear,
                &series,
            )
        }),
    ];
    for (file, _, svg) in &charts {
        std::fs::write(out_dir.join(file), svg).with_context(|| format!("writing {file}"))?;
    }

    let mut html = String::new();
    let _ = writeln!(
        html,
        "<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>ringbench comparison</title>"
    );
    let _ = writeln!(
        html,
        "<style>body{{font-family:sans-serif;margin:24px;max-width:1200px}}table{{border-collapse:collapse;margin:12px 0}}\
         td,th{{border:1px solid #ccc;padding:4px 8px;text-align:right}}th:first-child,td:first-child{{text-align:left}}\
         .better{{color:#006400}}.worse{{color:#b00000}}.na{{color:#888}}</style></head><body>"
    );
    let _ = writeln!(html, "<h1>ringbench comparison</h1>");
    let _ = writeln!(
        html,
        "<h2>Runs</h2><table><tr><th>label</th><th>driver</th><th>broker</th><th>workload</th><th>rate target (rec/s)</th><th>measured (s)</th><th>git</th><th>CPU</th><th>kernel</th></tr>"
    );
    for (i, l) in loaded.iter().enumerate() {
        let r = &l.report;
        let broker = match &r.broker.config_name {
            Some(c) => format!("{} ({})", c, r.broker.bootstrap),
            None => r.broker.bootstrap.clone(),
        };
        let _ = writeln!(
            html,
            "<tr><td style=\"color:{}\">{}</td><td>{}</td><td>{}</td><td>{} · {} · acks={} · {}</td><td>{:.0}</td><td>{:.1}</td><td>{}</td><td>{} × {}</td><td>{}</td></tr>",
            PALETTE[i % PALETTE.len()],
            escape(&labels[i]),
            escape(&r.driver.detail),
            escape(&broker),
            escape(&r.workload.name),
            escape(&r.workload.record_size.to_string()),
            r.workload.acks,
            r.workload.compression.name(),
            r.rate.target_records_per_s,
            r.aggregate.duration_s,
            escape(
                r.environment
                    .git_commit
                    .as_deref()
                    .map(|c| &c[..c.len().min(10)])
                    .unwrap_or("unknown")
            ),
            r.environment.cpu_count,
            escape(r.environment.cpu_model.as_deref().unwrap_or("unknown CPU")),
            escape(r.environment.kernel.as_deref().unwrap_or("unknown")),
        );
    }
    let _ = writeln!(html, "</table>");
    let _ = writeln!(
        html,
        "{}",
        differences_table(
            &loaded.iter().map(|l| &l.report).collect::<Vec<_>>(),
            &labels
        )
    );
    for (file, title, svg) in &charts {
        let _ = writeln!(
            html,
            "<h2>{}</h2><p><a href=\"{file}\">{file}</a></p>\n{svg}",
            escape(title)
        );
    }
    let _ = writeln!(html, "</body></html>");
    let index = out_dir.join("index.html");
    std::fs::write(&index, html).with_context(|| format!("writing {}", index.display()))?;
    Ok(index)
}

/// The differences table: every run against the first (the baseline). Lower is better for
/// latencies, higher for rates; a missing measurement shows as "not measured".
fn differences_table(reports: &[&Report], labels: &[String]) -> String {
    type Pick = fn(&Report) -> Option<f64>;
    fn lat(s: &Option<LatencySummary>, q: &str) -> Option<f64> {
        s.as_ref().and_then(|s| s.at(q))
    }
    let rows: Vec<(&str, bool, Pick)> = vec![
        ("publish rate (rec/s)", true, |r| {
            Some(r.aggregate.publish_rate_records_per_s)
        }),
        ("publish rate (MB/s)", true, |r| {
            Some(r.aggregate.publish_rate_mb_per_s)
        }),
        ("consume rate (MB/s)", true, |r| {
            (r.totals.subscriptions > 0).then_some(r.aggregate.consume_rate_mb_per_s)
        }),
        ("publish latency p50 (ms)", false, |r| {
            lat(&r.aggregate.publish_latency, "p50")
        }),
        ("publish latency p99 (ms)", false, |r| {
            lat(&r.aggregate.publish_latency, "p99")
        }),
        ("publish latency p99.9 (ms)", false, |r| {
            lat(&r.aggregate.publish_latency, "p99.9")
        }),
        ("publish latency max (ms)", false, |r| {
            lat(&r.aggregate.publish_latency, "max")
        }),
        ("publish delay p99 (ms)", false, |r| {
            lat(&r.aggregate.publish_delay, "p99")
        }),
        ("end-to-end p50 (ms)", false, |r| {
            lat(&r.aggregate.end_to_end_latency, "p50")
        }),
        ("end-to-end p99 (ms)", false, |r| {
            lat(&r.aggregate.end_to_end_latency, "p99")
        }),
        ("end-to-end p99.9 (ms)", false, |r| {
            lat(&r.aggregate.end_to_end_latency, "p99.9")
        }),
        ("end-to-end max (ms)", false, |r| {
            lat(&r.aggregate.end_to_end_latency, "max")
        }),
    ];
    let mut out = String::new();
    let _ = write!(
        out,
        "<h2>Differences (vs {})</h2><table><tr><th>metric</th>",
        escape(&labels[0])
    );
    for l in labels {
        let _ = write!(out, "<th>{}</th>", escape(l));
    }
    let _ = writeln!(out, "</tr>");
    for (name, higher_is_better, pick) in rows {
        let _ = write!(out, "<tr><td>{name}</td>");
        let base = pick(reports[0]);
        for (i, r) in reports.iter().enumerate() {
            match (pick(r), base) {
                (None, _) => {
                    let _ = write!(out, "<td class=\"na\">not measured</td>");
                }
                (Some(v), Some(b)) if i > 0 && b != 0.0 => {
                    let delta = (v - b) / b * 100.0;
                    let better = if higher_is_better {
                        delta > 0.0
                    } else {
                        delta < 0.0
                    };
                    let class = if delta.abs() < 0.05 {
                        ""
                    } else if better {
                        "better"
                    } else {
                        "worse"
                    };
                    let _ = write!(
                        out,
                        "<td class=\"{class}\">{} ({delta:+.1}%)</td>",
                        format_value(v)
                    );
                }
                (Some(v), _) => {
                    let _ = write!(out, "<td>{}</td>", format_value(v));
                }
            }
        }
        let _ = writeln!(out, "</tr>");
    }
    let _ = writeln!(out, "</table>");
    out
}

fn format_value(v: f64) -> String {
    if v.abs() >= 1000.0 {
        format!("{v:.0}")
    } else {
        format!("{v:.3}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nines_labels_read_as_percentiles() {
        assert_eq!(nines_label(0.0), "0%");
        assert_eq!(nines_label(1.0), "90%");
        assert_eq!(nines_label(2.0), "99%");
        assert_eq!(nines_label(3.0), "99.9%");
        assert_eq!(nines_label(4.0), "99.99%");
    }

    #[test]
    fn chart_escapes_labels_and_handles_no_data() {
        let svg = line_chart("a<b", "x", "y", Axis::Linear, Axis::Linear, &[]);
        assert!(svg.contains("a&lt;b"));
        assert!(svg.contains("no data measured"));
        let s = Series {
            name: "r&d".into(),
            points: vec![(0.0, 1.0), (1.0, 10.0)],
            dashed: true,
            colour: PALETTE[0],
        };
        let svg = line_chart("t", "x", "y", Axis::Nines, Axis::Log, &[s]);
        assert!(svg.contains("r&amp;d") && svg.contains("<polyline") && svg.ends_with("</svg>\n"));
    }
}
