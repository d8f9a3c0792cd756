//! pagecache: the machine's dirty-page thresholds and how much a run wrote relative to them, so a
//! produce result that only measured the page cache absorbing writes (never the device or the
//! writeback that follows) is flagged instead of quoted as sustained throughput.
//!
//! The kernel throttles writers once dirty pages pass `vm.dirty_bytes` (or `vm.dirty_ratio` % of
//! the "dirtyable" memory, which is close to MemAvailable) and starts background writeback at
//! `vm.dirty_background_*`. A run that wrote less than the dirty threshold never met either limit:
//! its rate is a memory copy rate. Issue 12: the first 1-2 GB went at 650-990 MB/s, the rest at
//! 210-250 MB/s. The figures are read on the machine running ringbench, which is the broker's
//! machine for every loopback run.

use serde::{Deserialize, Serialize};

/// The thresholds as read from /proc at the start of a run.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct DirtyLimits {
    pub mem_available_bytes: u64,
    /// The throttling threshold: `vm.dirty_bytes` if set, else `vm.dirty_ratio` % of MemAvailable.
    pub dirty_threshold_bytes: u64,
    /// Where background writeback starts (`vm.dirty_background_bytes` or `_ratio`).
    pub dirty_background_threshold_bytes: u64,
}

impl DirtyLimits {
    /// Reads /proc/meminfo and /proc/sys/vm; `None` where they cannot be read (not Linux).
    pub fn read() -> Option<DirtyLimits> {
        let meminfo = std::fs::read_to_string("/proc/meminfo").ok()?;
        let vm = |name: &str| -> Option<u64> {
            std::fs::read_to_string(format!("/proc/sys/vm/{name}"))
                .ok()?
                .trim()
                .parse()
                .ok()
        };
        DirtyLimits::from_values(
            &meminfo,
            vm("dirty_ratio")?,
            vm("dirty_bytes")?,
            vm("dirty_background_ratio")?,
            vm("dirty_background_bytes")?,
        )
    }

    /// The thresholds from /proc/meminfo text and the four vm sysctls (a `_bytes` value of 0 means
    /// the `_ratio` applies, as in the kernel).
    pub fn from_values(
        meminfo: &str,
        dirty_ratio_pct: u64,
        dirty_bytes: u64,
        dirty_background_ratio_pct: u64,
        dirty_background_bytes: u64,
    ) -> Option<DirtyLimits> {
        let mem_available_bytes = meminfo.lines().find_map(|line| {
            let rest = line.strip_prefix("MemAvailable:")?;
            let kib: u64 = rest.trim().trim_end_matches("kB").trim().parse().ok()?;
            Some(kib * 1024)
        })?;
        let threshold = |bytes: u64, ratio: u64| {
            if bytes > 0 {
                bytes
            } else {
                mem_available_bytes / 100 * ratio
            }
        };
        Some(DirtyLimits {
            mem_available_bytes,
            dirty_threshold_bytes: threshold(dirty_bytes, dirty_ratio_pct),
            dirty_background_threshold_bytes: threshold(
                dirty_background_bytes,
                dirty_background_ratio_pct,
            ),
        })
    }

    /// How `written_bytes` (everything the run produced up to the end of the measured phase)
    /// compares with the thresholds.
    pub fn assess(&self, written_bytes: u64) -> WriteVolume {
        let ratio = |limit: u64| written_bytes as f64 / limit.max(1) as f64;
        WriteVolume {
            limits: *self,
            written_bytes,
            written_to_dirty_threshold: ratio(self.dirty_threshold_bytes),
            written_to_mem_available: ratio(self.mem_available_bytes),
            page_cache_absorption_only: written_bytes < self.dirty_threshold_bytes,
        }
    }
}

/// A run's write volume against the machine's dirty-page thresholds.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct WriteVolume {
    pub limits: DirtyLimits,
    /// Value bytes acknowledged from the start of the run to the end of the measured phase.
    pub written_bytes: u64,
    pub written_to_dirty_threshold: f64,
    pub written_to_mem_available: f64,
    /// True when the run wrote less than the dirty threshold: the writer was never throttled, so
    /// the produce rate measured the page cache, not sustained writeback.
    pub page_cache_absorption_only: bool,
}

impl WriteVolume {
    /// The note a report carries when the result only measured page-cache absorption.
    pub fn note(&self) -> Option<String> {
        self.page_cache_absorption_only.then(|| {
            format!(
                "produce measured page-cache absorption only: {:.2} GB written is {:.0}% of this \
                 machine's dirty threshold ({:.2} GB; MemAvailable {:.2} GB), so writeback never \
                 throttled the broker; for sustained throughput write well past it (e.g. --records \
                 for {:.0} GB or more)",
                self.written_bytes as f64 / 1e9,
                self.written_to_dirty_threshold * 100.0,
                self.limits.dirty_threshold_bytes as f64 / 1e9,
                self.limits.mem_available_bytes as f64 / 1e9,
                (self.limits.mem_available_bytes as f64 / 1e9 / 2.0)
                    .max(1.0)
                    .ceil(),
            )
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MEMINFO: &str =
        "MemTotal:       24000000 kB\nMemFree:         1000000 kB\nMemAvailable:   20000000 kB\n";

    #[test]
    fn ratio_applies_unless_bytes_are_set() {
        let by_ratio = DirtyLimits::from_values(MEMINFO, 20, 0, 10, 0).unwrap();
        assert_eq!(by_ratio.mem_available_bytes, 20_000_000 * 1024);
        assert_eq!(by_ratio.dirty_threshold_bytes, 20_000_000 * 1024 / 100 * 20);
        assert_eq!(
            by_ratio.dirty_background_threshold_bytes,
            20_000_000 * 1024 / 100 * 10
        );
        let by_bytes = DirtyLimits::from_values(MEMINFO, 20, 1 << 30, 10, 1 << 28).unwrap();
        assert_eq!(by_bytes.dirty_threshold_bytes, 1 << 30);
        assert_eq!(by_bytes.dirty_background_threshold_bytes, 1 << 28);
        assert!(DirtyLimits::from_values("MemTotal: 1 kB\n", 20, 0, 10, 0).is_none());
    }

    #[test]
    fn a_run_below_the_dirty_threshold_is_flagged() {
        let limits = DirtyLimits::from_values(MEMINFO, 20, 0, 10, 0).unwrap();
        let small = limits.assess(1_000_000_000);
        assert!(small.page_cache_absorption_only);
        assert!(small.note().unwrap().contains("page-cache absorption"));
        let large = limits.assess(8 * limits.dirty_threshold_bytes);
        assert!(!large.page_cache_absorption_only);
        assert!(large.note().is_none());
        assert!((large.written_to_dirty_threshold - 8.0).abs() < 1e-9);
    }
}
