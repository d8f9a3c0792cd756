//! storage::config: the per-partition log settings, named after Kafka's and defaulting to Kafka's values.

/// How one partition log behaves. Every field mirrors a Kafka topic or broker setting; `Default` gives
/// Kafka's defaults, so a broker can start from `LogConfig::default()` and apply per-topic overrides.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogConfig {
    /// `log.segment.bytes`: a segment rolls before an append would make it larger than this (1 GiB).
    pub segment_bytes: u64,
    /// `log.roll.ms` / `log.roll.hours`: a non-empty segment older than this rolls (7 days).
    pub segment_ms: u64,
    /// `log.retention.ms` / `.minutes` / `.hours`; `None` keeps data forever (Kafka's -1). Default 7 days.
    pub retention_ms: Option<u64>,
    /// `log.retention.bytes`; `None` sets no size limit (Kafka's -1, the default).
    pub retention_bytes: Option<u64>,
    /// `log.index.interval.bytes`: bytes of log between two sparse index entries (4096).
    pub index_interval_bytes: u32,
    /// `log.index.size.max.bytes`: the largest `.index` file; a segment rolls when its index is full (10 MiB).
    /// This is also the bound on the in-memory index each segment keeps.
    pub segment_index_bytes: u32,
    /// `message.max.bytes`: the largest record batch accepted (1,048,588).
    pub max_message_bytes: u32,
    /// `log.flush.interval.messages`: fdatasync after this many unflushed records; `None` = never by count.
    pub flush_interval_messages: Option<u64>,
    /// `log.flush.interval.ms`: fdatasync (from `tick`) when unflushed data is this old; `None` = never by time.
    pub flush_interval_ms: Option<u64>,
    /// When true the high watermark only advances to fdatasync'ed data, and every append joins a group
    /// commit before it returns, so no consumer can read an offset that a crash could reassign.
    pub durable_high_watermark: bool,
    /// `log.flush.offset.checkpoint.interval.ms`: how often `tick` rewrites the recovery checkpoint (60 s).
    /// The checkpoint bounds how much log an unclean restart must rescan.
    pub recovery_checkpoint_interval_ms: u64,
    /// `producer.id.expiration.ms`: an idempotent producer idle this long (judged by its batches'
    /// timestamps, as in Kafka) is forgotten by the partition (1 day). Also how often `tick` writes a
    /// producer-state snapshot is bounded by `recovery_checkpoint_interval_ms`.
    pub producer_id_expiration_ms: u64,
    /// `cleanup.policy` and the compaction settings (see `cleaner.rs`).
    pub compaction: super::cleaner::CompactionConfig,
    /// `ringbroker.log.write.mode` as resolved at startup: true when appends carry `RWF_DONTCACHE`
    /// (see `write_mode`). False by default; the broker sets it only after the probe said yes.
    pub uncached_appends: bool,
}

/// Seven days in milliseconds, Kafka's default for both `log.roll.hours` and `log.retention.hours`.
const SEVEN_DAYS_MS: u64 = 7 * 24 * 60 * 60 * 1000;

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig {
            segment_bytes: 1 << 30,
            segment_ms: SEVEN_DAYS_MS,
            retention_ms: Some(SEVEN_DAYS_MS),
            retention_bytes: None,
            index_interval_bytes: 4096,
            segment_index_bytes: 10 * 1024 * 1024,
            max_message_bytes: 1_048_588,
            flush_interval_messages: None,
            flush_interval_ms: None,
            durable_high_watermark: false,
            recovery_checkpoint_interval_ms: 60_000,
            producer_id_expiration_ms: 24 * 60 * 60 * 1000,
            compaction: super::cleaner::CompactionConfig::default(),
            uncached_appends: false,
        }
    }
}

impl LogConfig {
    /// Checks the limits that the log relies on; a bad value is a typed error, never a panic later.
    pub fn validate(&self) -> Result<(), String> {
        // A segment must at least hold one batch header, and positions inside a segment are stored as
        // u32 in the `.index` file (as in Kafka), so a segment may not exceed 4 GiB.
        if self.segment_bytes < 61 || self.segment_bytes > u64::from(u32::MAX) {
            return Err(format!(
                "segment_bytes {} out of range 61..=2^32-1",
                self.segment_bytes
            ));
        }
        if self.segment_ms == 0 {
            return Err("segment_ms must be > 0".into());
        }
        if self.index_interval_bytes == 0 {
            return Err("index_interval_bytes must be > 0".into());
        }
        // Room for at least two entries in each index, so a fresh segment can always take an append.
        if self.segment_index_bytes < 24 {
            return Err(format!(
                "segment_index_bytes {} < 24",
                self.segment_index_bytes
            ));
        }
        if self.max_message_bytes < 61 {
            return Err(format!("max_message_bytes {} < 61", self.max_message_bytes));
        }
        if self.flush_interval_messages == Some(0) {
            return Err("flush_interval_messages must be > 0 or None".into());
        }
        self.compaction.validate()
    }

    /// How many entries the offset index of one segment may hold (8 bytes each).
    pub(crate) fn max_index_entries(&self) -> usize {
        (self.segment_index_bytes / 8) as usize
    }

    /// How many entries the time index of one segment may hold (12 bytes each).
    pub(crate) fn max_time_index_entries(&self) -> usize {
        (self.segment_index_bytes / 12) as usize
    }
}
