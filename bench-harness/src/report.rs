//! The self-describing run report: workload, driver, broker, environment, time series and
//! histograms as JSON, HdrHistogram `.hgrm` percentile files beside it, and the summary table.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::Context;
use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};

use crate::metrics::{IntervalMetrics, LatencySummary, encode_histogram};
use crate::pagecache::WriteVolume;
use crate::workload::{DriverKind, Workload};

/// Bumped whenever a field changes meaning, so `compare` can refuse reports it would misread.
pub const REPORT_SCHEMA_VERSION: u32 = 1;

/// Everything one run measured and the context needed to trust it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Report {
    pub schema_version: u32,
    /// A label for comparisons (defaults to the workload name plus the broker config name).
    pub label: String,
    pub ringbench_version: String,
    pub started_at_unix_s: u64,
    pub workload: Workload,
    pub driver: DriverInfo,
    pub broker: BrokerInfo,
    pub environment: Environment,
    pub placement: Placement,
    /// The publish rate the measured phase ran at (records/s), and how it was chosen.
    pub rate: RateInfo,
    /// Time series, one entry per `stats_interval_s`, measured phase only.
    pub intervals: Vec<IntervalReport>,
    /// The whole measured phase.
    pub aggregate: IntervalReport,
    pub backlog: Option<BacklogReport>,
    /// Counts over the entire run (warm-up, measurement and the final drain): the basis of the
    /// produced == consumed check.
    pub totals: Totals,
    /// Aggregate histograms (measured phase), HdrHistogram V2 compressed, base64, microseconds.
    pub histograms: HistogramSet,
    /// `.hgrm` files written beside this report (file names, relative to it).
    pub hgrm_files: BTreeMap<String, String>,
    /// Caveats about what a number means in this run (e.g. acks=0 latency).
    pub notes: Vec<String>,
    /// With `--records N`: seconds from the start of the measured phase until the N records were
    /// acknowledged. The aggregate publish rate is averaged over this span, not over the whole
    /// measured phase (which may go on while consumers drain).
    #[serde(default)]
    pub produce_s: Option<f64>,
    /// Bytes written against this machine's dirty-page thresholds; `None` where /proc cannot be read.
    #[serde(default)]
    pub write_volume: Option<WriteVolume>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DriverInfo {
    pub kind: DriverKind,
    /// Library and version, e.g. "ringbench native (compio 0.19.2, io_uring)" or "librdkafka 2.12.1".
    pub detail: String,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct BrokerInfo {
    pub bootstrap: String,
    /// True when ringbench started the broker (quick, matrix); then the fields below are set.
    pub started_by_ringbench: bool,
    pub config_name: Option<String>,
    pub binary: Option<String>,
    pub args: Vec<String>,
    /// Key=value overrides the broker was started with.
    pub config: BTreeMap<String, String>,
    pub shards: Option<u32>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Environment {
    pub git_commit: Option<String>,
    pub git_dirty: Option<bool>,
    pub cpu_model: Option<String>,
    pub cpu_count: usize,
    pub kernel: Option<String>,
    pub hostname: Option<String>,
    pub memory_total_kib: Option<u64>,
}

/// Where the load ran.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Placement {
    /// "in-process" or "separate-processes".
    pub mode: String,
    pub producer_cpus: Vec<usize>,
    pub consumer_cpus: Vec<usize>,
    pub broker_cpus: Vec<usize>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct RateInfo {
    /// Records/s the measured phase targeted (all producers).
    pub target_records_per_s: f64,
    /// Present in max-rate mode: each search step and its outcome.
    pub max_rate_search: Option<Vec<RateStep>>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RateStep {
    pub target_records_per_s: f64,
    pub achieved_records_per_s: f64,
    pub backlog_growth_records: i64,
    /// Acknowledgements during this step of records an earlier step had queued; not counted
    /// in `achieved_records_per_s`.
    #[serde(default)]
    pub stale_records: u64,
    pub sustained: bool,
}

/// One interval of the time series (or the aggregate), named as OpenMessaging Benchmark does.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct IntervalReport {
    /// Seconds since the start of the measured phase.
    pub start_s: f64,
    pub duration_s: f64,
    pub publish_rate_records_per_s: f64,
    pub publish_rate_mb_per_s: f64,
    pub consume_rate_records_per_s: f64,
    pub consume_rate_mb_per_s: f64,
    /// Records produced but not yet consumed (per subscription, summed) at the interval's end.
    pub backlog_records: i64,
    pub publish_errors: u64,
    pub published_records: u64,
    pub consumed_records: u64,
    /// `None` when nothing was measured in the interval: no invented zeros.
    pub publish_latency: Option<LatencySummary>,
    pub publish_delay: Option<LatencySummary>,
    pub end_to_end_latency: Option<LatencySummary>,
}

impl IntervalReport {
    pub fn from_metrics(
        m: &IntervalMetrics,
        start_s: f64,
        duration_s: f64,
        backlog_records: i64,
    ) -> IntervalReport {
        let per_s = |v: u64| {
            if duration_s > 0.0 {
                v as f64 / duration_s
            } else {
                0.0
            }
        };
        IntervalReport {
            start_s,
            duration_s,
            publish_rate_records_per_s: per_s(m.published_records),
            publish_rate_mb_per_s: per_s(m.published_bytes) / 1e6,
            consume_rate_records_per_s: per_s(m.consumed_records),
            consume_rate_mb_per_s: per_s(m.consumed_bytes) / 1e6,
            backlog_records,
            publish_errors: m.publish_errors,
            published_records: m.published_records,
            consumed_records: m.consumed_records,
            publish_latency: LatencySummary::from_histogram(&m.publish_latency_us),
            publish_delay: LatencySummary::from_histogram(&m.publish_delay_us),
            end_to_end_latency: LatencySummary::from_histogram(&m.end_to_end_latency_us),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct BacklogReport {
    pub target_bytes: u64,
    /// Bytes produced while consumers were paused.
    pub built_bytes: u64,
    pub build_s: f64,
    /// Time from resuming consumers until the backlog was gone; `None` if it never drained.
    pub drain_s: Option<f64>,
    pub drain_rate_records_per_s: Option<f64>,
    pub drain_rate_mb_per_s: Option<f64>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct Totals {
    pub published_records: u64,
    pub published_bytes: u64,
    pub publish_errors: u64,
    pub consumed_records: u64,
    pub consumed_bytes: u64,
    pub subscriptions: u32,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct HistogramSet {
    pub publish_latency_us: String,
    pub publish_delay_us: String,
    pub end_to_end_latency_us: String,
}

impl HistogramSet {
    pub fn from_metrics(m: &IntervalMetrics) -> HistogramSet {
        HistogramSet {
            publish_latency_us: encode_histogram(&m.publish_latency_us),
            publish_delay_us: encode_histogram(&m.publish_delay_us),
            end_to_end_latency_us: encode_histogram(&m.end_to_end_latency_us),
        }
    }
}

impl Environment {
    /// Reads what the kernel and git say about this machine and checkout.
    pub fn capture(repo_dir: &Path) -> Environment {
        let read = |p: &str| std::fs::read_to_string(p).ok();
        let cpu_model = read("/proc/cpuinfo").and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, v)| v.trim().to_string())
        });
        let memory_total_kib = read("/proc/meminfo").and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("MemTotal:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        });
        let git = |args: &[&str]| {
            Command::new("git")
                .args(args)
                .current_dir(repo_dir)
                .output()
                .ok()
                .filter(|o| o.status.success())
                .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        };
        let git_commit = git(&["rev-parse", "HEAD"]);
        let git_dirty = git_commit
            .as_ref()
            .and_then(|_| git(&["status", "--porcelain", "--untracked-files=no"]))
            .map(|s| !s.is_empty());
        Environment {
            git_commit,
            git_dirty,
            cpu_model,
            cpu_count: std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(1),
            kernel: read("/proc/sys/kernel/osrelease").map(|s| s.trim().to_string()),
            hostname: read("/proc/sys/kernel/hostname").map(|s| s.trim().to_string()),
            memory_total_kib,
        }
    }
}

/// Writes a histogram (microseconds) as an HdrHistogram percentile distribution in
/// milliseconds, the `.hgrm` text the standard HdrHistogram plotter reads. One line per
/// recorded bucket, so that the exact value at any quantile can be recomputed from the file:
/// it is the value of the first line whose TotalCount reaches `ceil(q * total)`.
pub fn hgrm_text(histogram: &Histogram<u64>) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{:>12} {:>14} {:>10} {:>14}\n",
        "Value", "Percentile", "TotalCount", "1/(1-Percentile)"
    );
    let total = histogram.len();
    let mut cumulative = 0u64;
    for v in histogram.iter_recorded() {
        cumulative += v.count_at_value();
        let value_ms = histogram.highest_equivalent(v.value_iterated_to()) as f64 / 1000.0;
        let percentile = cumulative as f64 / total as f64;
        if cumulative < total {
            let _ = writeln!(
                out,
                "{value_ms:12.3} {percentile:2.12} {cumulative:10} {:14.2}",
                1.0 / (1.0 - percentile)
            );
        } else {
            let _ = writeln!(out, "{value_ms:12.3} {percentile:2.12} {cumulative:10}");
        }
    }
    let (mean, stdev, max) = if total > 0 {
        (
            histogram.mean() / 1000.0,
            histogram.stdev() / 1000.0,
            histogram.max() as f64 / 1000.0,
        )
    } else {
        (0.0, 0.0, 0.0)
    };
    let _ = writeln!(
        out,
        "#[Mean    = {mean:12.3}, StdDeviation   = {stdev:12.3}]"
    );
    let _ = writeln!(out, "#[Max     = {max:12.3}, Total count    = {total:12}]");
    let buckets = histogram.buckets();
    let sub_buckets = histogram.distinct_values();
    let _ = writeln!(
        out,
        "#[Buckets = {buckets:12}, SubBuckets     = {sub_buckets:12}]"
    );
    out
}

/// Recomputes the value (ms) at quantile `q` from `.hgrm` text; independent of the writer's
/// code path, it is what the report/file consistency check uses.
pub fn hgrm_value_at_quantile(text: &str, q: f64) -> Option<f64> {
    let rows: Vec<(f64, u64)> = text
        .lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let mut cols = l.split_whitespace();
            let value: f64 = cols.next()?.parse().ok()?;
            let _percentile: f64 = cols.next()?.parse().ok()?;
            let count: u64 = cols.next()?.parse().ok()?;
            Some((value, count))
        })
        .collect();
    let total = rows.last()?.1;
    let target = ((q * total as f64).ceil() as u64).max(1);
    rows.iter().find(|(_, c)| *c >= target).map(|(v, _)| *v)
}

impl Report {
    /// Writes `<dir>/<name>.json` and one `.hgrm` per non-empty histogram; returns the JSON path.
    pub fn write(
        &mut self,
        dir: &Path,
        name: &str,
        aggregate: &IntervalMetrics,
    ) -> anyhow::Result<PathBuf> {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let pairs = [
            ("publish_latency", &aggregate.publish_latency_us),
            ("publish_delay", &aggregate.publish_delay_us),
            ("end_to_end_latency", &aggregate.end_to_end_latency_us),
        ];
        for (metric, histogram) in pairs {
            if histogram.is_empty() {
                continue;
            }
            let file = format!("{name}.{metric}.hgrm");
            std::fs::write(dir.join(&file), hgrm_text(histogram))
                .with_context(|| format!("writing {file}"))?;
            self.hgrm_files.insert(metric.to_string(), file);
        }
        let path = dir.join(format!("{name}.json"));
        std::fs::write(&path, serde_json::to_vec_pretty(self)?)
            .with_context(|| format!("writing {}", path.display()))?;
        Ok(path)
    }

    pub fn read(path: &Path) -> anyhow::Result<Report> {
        let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
        let report: Report = serde_json::from_slice(&bytes)
            .with_context(|| format!("parsing {}", path.display()))?;
        if report.schema_version != REPORT_SCHEMA_VERSION {
            anyhow::bail!(
                "{} has report schema {}, this ringbench reads {}",
                path.display(),
                report.schema_version,
                REPORT_SCHEMA_VERSION
            );
        }
        Ok(report)
    }
}

/// The human summary printed at the end of a run.
pub fn summary_table(report: &Report) -> String {
    let a = &report.aggregate;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "ringbench {} | driver {} | broker {} | {:.1} s measured after {:.1} s warm-up",
        report.label,
        report.driver.detail,
        report.broker.bootstrap,
        a.duration_s,
        report.workload.warmup_s
    );
    let _ = writeln!(
        out,
        "publish rate  {:>12.1} rec/s {:>9.2} MB/s   (target {:.1} rec/s, errors {})",
        a.publish_rate_records_per_s,
        a.publish_rate_mb_per_s,
        report.rate.target_records_per_s,
        a.publish_errors
    );
    let _ = writeln!(
        out,
        "consume rate  {:>12.1} rec/s {:>9.2} MB/s   backlog {} records",
        a.consume_rate_records_per_s, a.consume_rate_mb_per_s, a.backlog_records
    );
    let _ = writeln!(
        out,
        "{:<22} {:>9} {:>9} {:>9} {:>9} {:>9} {:>9} {:>9} {:>9}",
        "latency (ms)", "avg", "p50", "p75", "p95", "p99", "p99.9", "p99.99", "max"
    );
    let rows = [
        ("publish latency", &a.publish_latency),
        ("publish delay", &a.publish_delay),
        ("end-to-end latency", &a.end_to_end_latency),
    ];
    for (name, summary) in rows {
        match summary {
            Some(s) => {
                let _ = writeln!(
                    out,
                    "{:<22} {:>9.3} {:>9.3} {:>9.3} {:>9.3} {:>9.3} {:>9.3} {:>9.3} {:>9.3}",
                    name,
                    s.avg_ms,
                    s.p50_ms,
                    s.p75_ms,
                    s.p95_ms,
                    s.p99_ms,
                    s.p99_9_ms,
                    s.p99_99_ms,
                    s.max_ms
                );
            }
            None => {
                let _ = writeln!(out, "{name:<22} not measured");
            }
        }
    }
    if let Some(b) = &report.backlog {
        match (b.drain_s, b.drain_rate_records_per_s, b.drain_rate_mb_per_s) {
            (Some(s), Some(r), Some(mb)) => {
                let _ = writeln!(
                    out,
                    "backlog drain {:.2} s at {:.1} rec/s {:.2} MB/s",
                    s, r, mb
                );
            }
            _ => {
                let _ = writeln!(out, "backlog did not drain within the run");
            }
        }
    }
    if let Some(v) = &report.write_volume {
        let _ = writeln!(
            out,
            "written {:.2} GB = {:.1}× the dirty threshold ({:.2} GB), {:.2}× MemAvailable{}",
            v.written_bytes as f64 / 1e9,
            v.written_to_dirty_threshold,
            v.limits.dirty_threshold_bytes as f64 / 1e9,
            v.written_to_mem_available,
            if v.page_cache_absorption_only {
                " (page-cache absorption only)"
            } else {
                ""
            }
        );
    }
    for note in &report.notes {
        let _ = writeln!(out, "note: {note}");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::{new_histogram, record_clamped};

    #[test]
    fn hgrm_recomputes_exact_percentiles() {
        let mut h = new_histogram();
        let mut x: u64 = 12345;
        for _ in 0..50_000 {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            record_clamped(&mut h, 50 + (x >> 40) % 200_000);
        }
        let text = hgrm_text(&h);
        for q in [0.5, 0.75, 0.95, 0.99, 0.999, 0.9999, 1.0] {
            let from_file = hgrm_value_at_quantile(&text, q).unwrap();
            let direct = h.value_at_quantile(q) as f64 / 1000.0;
            assert!(
                (from_file - direct).abs() < 0.0005,
                "q={q}: file {from_file} vs histogram {direct}"
            );
        }
        assert!(text.contains("#[Max     ="));
    }

    #[test]
    fn environment_reads_this_machine() {
        let e = Environment::capture(Path::new("."));
        assert!(e.cpu_count >= 1);
        assert!(e.kernel.is_some());
    }
}
