//! What every driver shares: the run clock, the control block the coordinator steers workers
//! with (rate, pause, stop), worker specifications, and the deterministic record content.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use crate::wire::RecordHeader;
use crate::workload::{Keys, SplitMix64, Workload};

/// Maps a monotonic clock onto microseconds since the Unix epoch. Intended send times are
/// computed and carried in this form, so that a consumer in another process on the same host
/// can subtract them from its own clock.
#[derive(Debug, Clone, Copy)]
pub struct RunClock {
    base: Instant,
    base_epoch_us: u64,
}

impl Default for RunClock {
    fn default() -> Self {
        RunClock::new()
    }
}

impl RunClock {
    pub fn new() -> RunClock {
        let base = Instant::now();
        let base_epoch_us = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_micros() as u64)
            .unwrap_or(0);
        RunClock {
            base,
            base_epoch_us,
        }
    }

    /// Nanoseconds since this clock was created (monotonic).
    pub fn now_ns(&self) -> u64 {
        self.base.elapsed().as_nanos() as u64
    }

    /// A monotonic time expressed in epoch microseconds.
    pub fn epoch_us(&self, ns: u64) -> u64 {
        self.base_epoch_us + ns / 1000
    }

    pub fn now_epoch_us(&self) -> u64 {
        self.epoch_us(self.now_ns())
    }

    /// The `Instant` for a clock reading, for timers.
    pub fn instant(&self, ns: u64) -> Instant {
        self.base + std::time::Duration::from_nanos(ns)
    }
}

/// The block the coordinator steers workers with. Workers poll it; nothing here blocks.
#[derive(Debug, Default)]
pub struct Control {
    stop: AtomicBool,
    consumers_enabled: AtomicBool,
    /// Nanoseconds between intended sends, per producer; 0 = not producing.
    period_ns: AtomicU64,
    /// Bumped when the schedule restarts (rate changed in max-rate search, measurement start):
    /// producers then drop the debt of records they were behind on, which the search must not
    /// carry into the next step.
    generation: AtomicU64,
    /// Remaining records the producers may create in total; u64::MAX = unlimited.
    record_budget: AtomicU64,
    /// Epoch microseconds at which the current non-zero rate was set (0 while the rate is 0).
    /// Acknowledgements of records intended before it belong to an earlier step: the max-rate
    /// search must not count a failed step's queued records as the next step's throughput.
    /// Shared with the worker's [`crate::metrics::Meter`]s, which do the counting.
    rate_start_us: Arc<AtomicU64>,
    /// Workers that finished connecting (consumers: positioned at their start offsets). The
    /// coordinator starts the schedule only when all are ready, so setup is never measured.
    ready: AtomicU64,
}

impl Control {
    pub fn new() -> Arc<Control> {
        let c = Control::default();
        c.record_budget.store(u64::MAX, Ordering::Relaxed);
        Arc::new(c)
    }

    pub fn stop(&self) {
        self.stop.store(true, Ordering::Release);
    }

    pub fn stopped(&self) -> bool {
        self.stop.load(Ordering::Acquire)
    }

    pub fn enable_consumers(&self) {
        self.consumers_enabled.store(true, Ordering::Release);
    }

    pub fn consumers_enabled(&self) -> bool {
        self.consumers_enabled.load(Ordering::Acquire)
    }

    /// Sets the per-producer rate; the schedule restarts from `now_epoch_us`, read from the
    /// workers' [`RunClock`] so that it compares with the intended times they stamp.
    pub fn set_rate(&self, records_per_second_per_producer: f64, now_epoch_us: u64) {
        let period = if records_per_second_per_producer > 0.0 {
            (1e9 / records_per_second_per_producer).max(1.0) as u64
        } else {
            0
        };
        // Draining (rate 0): every acknowledgement counts, whenever it was intended.
        let start_us = if period > 0 { now_epoch_us } else { 0 };
        self.rate_start_us.store(start_us, Ordering::Release);
        self.period_ns.store(period, Ordering::Release);
        self.generation.fetch_add(1, Ordering::AcqRel);
    }

    /// The step-start threshold, for the worker's meters.
    pub fn rate_start(&self) -> Arc<AtomicU64> {
        self.rate_start_us.clone()
    }

    pub fn period_ns(&self) -> u64 {
        self.period_ns.load(Ordering::Acquire)
    }

    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    pub fn mark_ready(&self) {
        self.ready.fetch_add(1, Ordering::AcqRel);
    }

    pub fn ready_count(&self) -> u64 {
        self.ready.load(Ordering::Acquire)
    }

    pub fn set_record_budget(&self, records: u64) {
        self.record_budget.store(records, Ordering::Release);
    }

    /// Whether a record budget was set and is spent: producers then have nothing to create and
    /// must not wake for their (stale) schedule.
    pub fn budget_exhausted(&self) -> bool {
        self.record_budget.load(Ordering::Acquire) == 0
    }

    /// Takes up to `want` records from the shared budget; returns how many were granted.
    pub fn take_budget(&self, want: u64) -> u64 {
        let mut current = self.record_budget.load(Ordering::Acquire);
        loop {
            if current == u64::MAX {
                return want;
            }
            let grant = current.min(want);
            if grant == 0 {
                return 0;
            }
            match self.record_budget.compare_exchange_weak(
                current,
                current - grant,
                Ordering::AcqRel,
                Ordering::Acquire,
            ) {
                Ok(_) => return grant,
                Err(now) => current = now,
            }
        }
    }
}

/// One producer's assignment.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ProducerSpec {
    pub id: u32,
    pub bootstrap: String,
    pub topic: String,
    pub partitions: u32,
    pub workload: Workload,
}

/// One consumer's assignment: a manual partition list, or a group to join.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ConsumerSpec {
    pub id: u32,
    pub bootstrap: String,
    pub topic: String,
    pub partitions: u32,
    /// Partitions read when not in a group.
    pub assigned: Vec<i32>,
    /// Group id when `workload.consumer_group` is set.
    pub group: Option<String>,
    pub workload: Workload,
}

/// The deterministic content generator for one producer: sizes, keys, headers and the
/// payload bytes that follow each value's timestamp.
pub struct RecordSource {
    rng: SplitMix64,
    keys: Keys,
    size: crate::workload::RecordSize,
    pub filler: Arc<Vec<u8>>,
    pub headers: Vec<RecordHeader>,
    key_buf: [u8; 8],
}

impl RecordSource {
    pub fn new(workload: &Workload, producer_id: u32) -> RecordSource {
        let headers = (0..workload.headers_per_record)
            .map(|i| RecordHeader {
                key: format!("hdr{i:05}").into_bytes(),
                value: vec![b'h'; workload.header_value_bytes as usize],
            })
            .collect();
        RecordSource {
            rng: SplitMix64::new(workload.seed ^ ((producer_id as u64 + 1) << 32)),
            keys: workload.keys,
            size: workload.record_size,
            filler: Arc::new(filler_bytes(
                workload.seed,
                workload.record_size.max_bytes() as usize,
            )),
            headers,
            key_buf: [0; 8],
        }
    }

    pub fn next_size(&mut self) -> usize {
        self.size.sample(&mut self.rng) as usize
    }

    /// The next key, or `None` for keyless workloads.
    pub fn next_key(&mut self) -> Option<[u8; 8]> {
        match self.keys {
            Keys::None => None,
            Keys::Random => {
                self.key_buf = self.rng.next_u64().to_be_bytes();
                Some(self.key_buf)
            }
            Keys::Distinct(n) => {
                self.key_buf = (self.rng.next_u64() % n).to_be_bytes();
                Some(self.key_buf)
            }
        }
    }
}

/// Pseudo-random payload bytes. Random content keeps compression ratios honest: a run with
/// compression measures the codec's cost, not a free ratio on zeros.
pub fn filler_bytes(seed: u64, len: usize) -> Vec<u8> {
    let mut rng = SplitMix64::new(seed ^ 0xf111_e400);
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        out.extend_from_slice(&rng.next_u64().to_le_bytes());
    }
    out.truncate(len);
    out
}

/// Pins the calling thread to a core if one is given; returns whether it was pinned.
pub fn pin_current_thread(core: Option<usize>) -> bool {
    match core {
        Some(id) => core_affinity::set_for_current(core_affinity::CoreId { id }),
        None => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn budget_is_shared_exactly() {
        let c = Control::new();
        assert_eq!(c.take_budget(10), 10);
        c.set_record_budget(15);
        assert_eq!(c.take_budget(10), 10);
        assert_eq!(c.take_budget(10), 5);
        assert_eq!(c.take_budget(10), 0);
        assert!(c.budget_exhausted());
    }

    #[test]
    fn records_intended_before_a_new_rate_are_stale() {
        let c = Control::new();
        let meter = crate::metrics::Meter::for_control(&c);
        c.set_rate(1000.0, 1_000_000);
        let start = c.rate_start().load(Ordering::Acquire);
        assert_eq!(start, 1_000_000);
        assert!(meter.is_stale(start - 1));
        assert!(!meter.is_stale(start));
        // While draining at rate 0 nothing is stale.
        c.set_rate(0.0, 2_000_000);
        assert!(!meter.is_stale(1));
    }

    #[test]
    fn rate_sets_period_and_generation() {
        let c = Control::new();
        let g = c.generation();
        c.set_rate(1000.0, 1_000_000);
        assert_eq!(c.period_ns(), 1_000_000);
        assert!(c.generation() > g);
        c.set_rate(0.0, 2_000_000);
        assert_eq!(c.period_ns(), 0);
    }

    #[test]
    fn record_source_is_reproducible() {
        let w = Workload {
            keys: Keys::Distinct(3),
            ..Workload::default()
        };
        let mut a = RecordSource::new(&w, 1);
        let mut b = RecordSource::new(&w, 1);
        for _ in 0..100 {
            assert_eq!(a.next_key(), b.next_key());
            assert_eq!(a.next_size(), b.next_size());
        }
        assert_eq!(a.filler.len(), 1024);
    }
}
