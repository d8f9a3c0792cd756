//! Measurement: HdrHistograms of publish latency, publish delay and end-to-end latency plus
//! record/byte counters, collected per interval by workers and merged by the coordinator.
//!
//! All latencies are integer microseconds. Histograms track 1 µs .. 1 h with 3 significant
//! digits (0.1% relative error), HdrHistogram's usual setting.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use base64::Engine;
use hdrhistogram::Histogram;
use hdrhistogram::serialization::{Deserializer, Serializer, V2DeflateSerializer};
use serde::{Deserialize, Serialize};

/// Highest trackable latency: one hour. A value above it is clamped (and counted as such)
/// rather than dropped, so a stall can never disappear from the tail.
pub const HIGHEST_TRACKABLE_US: u64 = 3_600_000_000;
pub const SIGNIFICANT_DIGITS: u8 = 3;

/// A latency histogram in microseconds with the harness's fixed bounds.
pub fn new_histogram() -> Histogram<u64> {
    // The bounds are constants that HdrHistogram accepts, so this cannot fail.
    Histogram::new_with_bounds(1, HIGHEST_TRACKABLE_US, SIGNIFICANT_DIGITS)
        .expect("constant histogram bounds are valid")
}

/// Records a value, clamping into the trackable range: 0 µs becomes 1 µs (sub-microsecond),
/// anything above an hour becomes an hour.
pub fn record_clamped(histogram: &mut Histogram<u64>, value_us: u64) {
    let v = value_us.clamp(1, HIGHEST_TRACKABLE_US);
    // In range by construction.
    let _ = histogram.record(v);
}

/// Everything workers measure during one interval.
#[derive(Clone)]
pub struct IntervalMetrics {
    pub published_records: u64,
    /// Of `published_records`, those intended before the current rate was set: a previous
    /// step's queue draining. Counted for the backlog, excluded from a step's achieved rate.
    pub stale_published_records: u64,
    pub published_bytes: u64,
    pub publish_errors: u64,
    pub consumed_records: u64,
    pub consumed_bytes: u64,
    /// Ack time minus *intended* send time: includes any time the record waited because the
    /// producer or the broker was slow.
    pub publish_latency_us: Histogram<u64>,
    /// Actual send time (request written to the socket) minus intended send time.
    pub publish_delay_us: Histogram<u64>,
    /// Consume time minus the intended send time carried in the record.
    pub end_to_end_latency_us: Histogram<u64>,
}

impl Default for IntervalMetrics {
    fn default() -> Self {
        IntervalMetrics {
            published_records: 0,
            stale_published_records: 0,
            published_bytes: 0,
            publish_errors: 0,
            consumed_records: 0,
            consumed_bytes: 0,
            publish_latency_us: new_histogram(),
            publish_delay_us: new_histogram(),
            end_to_end_latency_us: new_histogram(),
        }
    }
}

impl IntervalMetrics {
    /// Adds another interval's counts and histograms into this one.
    pub fn merge(&mut self, other: &IntervalMetrics) {
        self.published_records += other.published_records;
        self.stale_published_records += other.stale_published_records;
        self.published_bytes += other.published_bytes;
        self.publish_errors += other.publish_errors;
        self.consumed_records += other.consumed_records;
        self.consumed_bytes += other.consumed_bytes;
        // Same bounds everywhere, so adding cannot fail.
        let _ = self.publish_latency_us.add(&other.publish_latency_us);
        let _ = self.publish_delay_us.add(&other.publish_delay_us);
        let _ = self.end_to_end_latency_us.add(&other.end_to_end_latency_us);
    }

    pub fn reset(&mut self) {
        *self = IntervalMetrics::default();
    }

    /// Encodes for the worker-process pipe (and the JSON report): counters plus each histogram
    /// in HdrHistogram's compressed V2 format, base64, the form HdrHistogram log tools read.
    pub fn to_wire(&self) -> WireMetrics {
        WireMetrics {
            published_records: self.published_records,
            stale_published_records: self.stale_published_records,
            published_bytes: self.published_bytes,
            publish_errors: self.publish_errors,
            consumed_records: self.consumed_records,
            consumed_bytes: self.consumed_bytes,
            publish_latency_us: encode_histogram(&self.publish_latency_us),
            publish_delay_us: encode_histogram(&self.publish_delay_us),
            end_to_end_latency_us: encode_histogram(&self.end_to_end_latency_us),
        }
    }

    pub fn from_wire(wire: &WireMetrics) -> anyhow::Result<IntervalMetrics> {
        Ok(IntervalMetrics {
            published_records: wire.published_records,
            stale_published_records: wire.stale_published_records,
            published_bytes: wire.published_bytes,
            publish_errors: wire.publish_errors,
            consumed_records: wire.consumed_records,
            consumed_bytes: wire.consumed_bytes,
            publish_latency_us: decode_histogram(&wire.publish_latency_us)?,
            publish_delay_us: decode_histogram(&wire.publish_delay_us)?,
            end_to_end_latency_us: decode_histogram(&wire.end_to_end_latency_us)?,
        })
    }
}

/// The serialised form of [`IntervalMetrics`].
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct WireMetrics {
    pub published_records: u64,
    #[serde(default)]
    pub stale_published_records: u64,
    pub published_bytes: u64,
    pub publish_errors: u64,
    pub consumed_records: u64,
    pub consumed_bytes: u64,
    pub publish_latency_us: String,
    pub publish_delay_us: String,
    pub end_to_end_latency_us: String,
}

/// HdrHistogram V2 compressed encoding, base64 (as in `.hlog` files).
pub fn encode_histogram(histogram: &Histogram<u64>) -> String {
    let mut bytes = Vec::new();
    // Serialising into a Vec cannot fail for a valid histogram.
    let _ = V2DeflateSerializer::new().serialize(histogram, &mut bytes);
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

pub fn decode_histogram(text: &str) -> anyhow::Result<Histogram<u64>> {
    let bytes = base64::engine::general_purpose::STANDARD.decode(text)?;
    let decoded: Histogram<u64> = Deserializer::new()
        .deserialize(&mut bytes.as_slice())
        .map_err(|e| anyhow::anyhow!("histogram decode: {e:?}"))?;
    // Re-home into the standard bounds so every histogram can be added to every other.
    let mut histogram = new_histogram();
    histogram
        .add(&decoded)
        .map_err(|e| anyhow::anyhow!("histogram bounds: {e:?}"))?;
    Ok(histogram)
}

/// The sink workers record into. One per worker thread keeps the lock uncontended; the
/// coordinator takes the contents every progress tick.
#[derive(Clone, Default)]
pub struct Meter {
    inner: Arc<Mutex<IntervalMetrics>>,
    /// Epoch µs at which the current rate was set (0: nothing is stale); see
    /// [`crate::driver::Control`].
    rate_start_us: Arc<AtomicU64>,
}

impl Meter {
    pub fn new() -> Meter {
        Meter::default()
    }

    /// A meter that tells a step's records from an earlier step's, by `control`'s rate changes.
    pub fn for_control(control: &crate::driver::Control) -> Meter {
        Meter {
            inner: Default::default(),
            rate_start_us: control.rate_start(),
        }
    }

    /// Whether a record intended at `intended_us` belongs to an earlier rate step.
    pub fn is_stale(&self, intended_us: u64) -> bool {
        intended_us < self.rate_start_us.load(Ordering::Acquire)
    }

    /// How many of `intended` belong to an earlier rate step.
    pub fn count_stale(&self, intended: &[u64]) -> u64 {
        let start = self.rate_start_us.load(Ordering::Acquire);
        intended.iter().filter(|&&t| t < start).count() as u64
    }

    /// Runs `f` with the current interval locked. Workers batch their updates (one call per
    /// acknowledged request or fetched batch), so this is taken a few thousand times a second.
    pub fn with<R>(&self, f: impl FnOnce(&mut IntervalMetrics) -> R) -> R {
        let mut guard = match self.inner.lock() {
            Ok(g) => g,
            // A worker that panicked while holding the lock left counters that are still
            // meaningful; keep measuring rather than losing the run.
            Err(poisoned) => poisoned.into_inner(),
        };
        f(&mut guard)
    }

    /// Takes everything recorded since the last call, leaving an empty interval behind.
    pub fn take(&self) -> IntervalMetrics {
        self.with(std::mem::take)
    }
}

/// The latency summary OpenMessaging Benchmark reports, in milliseconds.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Default)]
pub struct LatencySummary {
    pub count: u64,
    pub avg_ms: f64,
    pub p50_ms: f64,
    pub p75_ms: f64,
    pub p95_ms: f64,
    pub p99_ms: f64,
    pub p99_9_ms: f64,
    pub p99_99_ms: f64,
    pub max_ms: f64,
}

/// The quantiles reported everywhere, in order, with their report names.
pub const REPORTED_QUANTILES: [(&str, f64); 7] = [
    ("p50", 0.50),
    ("p75", 0.75),
    ("p95", 0.95),
    ("p99", 0.99),
    ("p99.9", 0.999),
    ("p99.99", 0.9999),
    ("max", 1.0),
];

impl LatencySummary {
    /// Summarises a microsecond histogram; `None` when nothing was recorded, so a report never
    /// shows a zero latency it did not measure.
    pub fn from_histogram(h: &Histogram<u64>) -> Option<LatencySummary> {
        if h.is_empty() {
            return None;
        }
        let ms = |us: u64| us as f64 / 1000.0;
        Some(LatencySummary {
            count: h.len(),
            avg_ms: h.mean() / 1000.0,
            p50_ms: ms(h.value_at_quantile(0.50)),
            p75_ms: ms(h.value_at_quantile(0.75)),
            p95_ms: ms(h.value_at_quantile(0.95)),
            p99_ms: ms(h.value_at_quantile(0.99)),
            p99_9_ms: ms(h.value_at_quantile(0.999)),
            p99_99_ms: ms(h.value_at_quantile(0.9999)),
            max_ms: ms(h.max()),
        })
    }

    /// The value reported for one of [`REPORTED_QUANTILES`].
    pub fn at(&self, name: &str) -> Option<f64> {
        Some(match name {
            "p50" => self.p50_ms,
            "p75" => self.p75_ms,
            "p95" => self.p95_ms,
            "p99" => self.p99_ms,
            "p99.9" => self.p99_9_ms,
            "p99.99" => self.p99_99_ms,
            "max" => self.max_ms,
            "avg" => self.avg_ms,
            _ => return None,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wire_round_trip_keeps_counts_and_percentiles() {
        let mut m = IntervalMetrics {
            published_records: 10,
            consumed_bytes: 99,
            ..Default::default()
        };
        for v in 1..=10_000u64 {
            record_clamped(&mut m.publish_latency_us, v * 7);
        }
        record_clamped(&mut m.end_to_end_latency_us, u64::MAX);
        let back = IntervalMetrics::from_wire(&m.to_wire()).unwrap();
        assert_eq!(back.published_records, 10);
        assert_eq!(back.consumed_bytes, 99);
        assert_eq!(
            back.publish_latency_us.value_at_quantile(0.99),
            m.publish_latency_us.value_at_quantile(0.99)
        );
        assert_eq!(
            back.end_to_end_latency_us.max(),
            m.end_to_end_latency_us.max()
        );
    }

    #[test]
    fn empty_histogram_has_no_summary_and_clamping_keeps_extremes() {
        let mut h = new_histogram();
        assert!(LatencySummary::from_histogram(&h).is_none());
        record_clamped(&mut h, 0);
        record_clamped(&mut h, u64::MAX);
        let s = LatencySummary::from_histogram(&h).unwrap();
        assert_eq!(s.count, 2);
        assert!(s.max_ms >= HIGHEST_TRACKABLE_US as f64 / 1000.0 * 0.999);
    }

    #[test]
    fn meter_take_empties_the_interval() {
        let meter = Meter::new();
        meter.with(|m| m.published_records += 3);
        assert_eq!(meter.take().published_records, 3);
        assert_eq!(meter.take().published_records, 0);
    }
}
