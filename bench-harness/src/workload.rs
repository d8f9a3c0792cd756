//! The workload description: what a run produces and consumes, read from a TOML file and/or flags,
//! validated once so that drivers never meet an impossible combination.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// Every record value starts with the intended send time in microseconds since the Unix epoch
/// (big-endian u64), so a consumer anywhere can compute end-to-end latency without a side channel.
pub const TIMESTAMP_BYTES: usize = 8;

/// Upper bound on a single record value. Kafka's default `max.message.bytes` is about 1 MiB;
/// larger values would be rejected by a default broker and only measure the error path.
pub const MAX_RECORD_BYTES: u32 = 1 << 20;

/// Errors a workload can have. They name the field so the user can fix the file or flag.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WorkloadError {
    /// A field is outside the range the harness can measure honestly.
    Invalid { field: &'static str, reason: String },
    /// A string form (record size, keys, rate, acks, compression) did not parse.
    Parse {
        field: &'static str,
        input: String,
        expected: &'static str,
    },
}

impl fmt::Display for WorkloadError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            WorkloadError::Invalid { field, reason } => {
                write!(f, "workload field `{field}`: {reason}")
            }
            WorkloadError::Parse {
                field,
                input,
                expected,
            } => {
                write!(
                    f,
                    "workload field `{field}`: cannot parse {input:?}, expected {expected}"
                )
            }
        }
    }
}

impl std::error::Error for WorkloadError {}

/// Size of each record's value.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub enum RecordSize {
    /// Every value has exactly this many bytes.
    Fixed(u32),
    /// Values are uniformly distributed between `min` and `max` bytes, inclusive.
    Uniform { min: u32, max: u32 },
}

impl RecordSize {
    /// The mean value size, used to turn a MB/s target into records/s.
    pub fn mean_bytes(&self) -> f64 {
        match *self {
            RecordSize::Fixed(n) => n as f64,
            RecordSize::Uniform { min, max } => (min as f64 + max as f64) / 2.0,
        }
    }

    /// The largest value this distribution can produce.
    pub fn max_bytes(&self) -> u32 {
        match *self {
            RecordSize::Fixed(n) => n,
            RecordSize::Uniform { max, .. } => max,
        }
    }

    /// Picks a size using the caller's random source (so runs are reproducible from a seed).
    pub fn sample(&self, rng: &mut SplitMix64) -> u32 {
        match *self {
            RecordSize::Fixed(n) => n,
            RecordSize::Uniform { min, max } => {
                min + (rng.next_u64() % (max as u64 - min as u64 + 1)) as u32
            }
        }
    }
}

impl FromStr for RecordSize {
    type Err = WorkloadError;
    /// Accepts `1024`, `1KiB`, `16KiB`, `uniform:100-1000`.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = || WorkloadError::Parse {
            field: "record_size",
            input: s.to_string(),
            expected: "a size like 1024, 1KiB, 16KiB or uniform:MIN-MAX",
        };
        if let Some(range) = s.strip_prefix("uniform:") {
            let (a, b) = range.split_once('-').ok_or_else(err)?;
            let min = parse_size(a).ok_or_else(err)?;
            let max = parse_size(b).ok_or_else(err)?;
            return Ok(RecordSize::Uniform { min, max });
        }
        parse_size(s).map(RecordSize::Fixed).ok_or_else(err)
    }
}

fn parse_size(s: &str) -> Option<u32> {
    let s = s.trim();
    let (digits, multiplier) = if let Some(d) = s.strip_suffix("KiB") {
        (d, 1024)
    } else if let Some(d) = s.strip_suffix("MiB") {
        (d, 1024 * 1024)
    } else if let Some(d) = s.strip_suffix('B') {
        (d, 1)
    } else {
        (s, 1)
    };
    digits.trim().parse::<u32>().ok()?.checked_mul(multiplier)
}

impl TryFrom<String> for RecordSize {
    type Error = WorkloadError;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        s.parse()
    }
}

impl From<RecordSize> for String {
    fn from(r: RecordSize) -> String {
        r.to_string()
    }
}

impl fmt::Display for RecordSize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RecordSize::Fixed(n) => write!(f, "{n}"),
            RecordSize::Uniform { min, max } => write!(f, "uniform:{min}-{max}"),
        }
    }
}

/// How record keys are chosen; keyed records go to `murmur2(key) % partitions` like Kafka's
/// default partitioner, keyless ones fill one partition's batch at a time (sticky partitioning).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub enum Keys {
    None,
    /// A fresh random 8-byte key per record.
    Random,
    /// Keys drawn uniformly from this many distinct 8-byte keys.
    Distinct(u64),
}

impl FromStr for Keys {
    type Err = WorkloadError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "none" => Ok(Keys::None),
            "random" => Ok(Keys::Random),
            other => other
                .strip_prefix("distinct:")
                .and_then(|n| n.parse::<u64>().ok())
                .filter(|n| *n > 0)
                .map(Keys::Distinct)
                .ok_or_else(|| WorkloadError::Parse {
                    field: "keys",
                    input: s.to_string(),
                    expected: "none, random or distinct:N (N > 0)",
                }),
        }
    }
}

impl TryFrom<String> for Keys {
    type Error = WorkloadError;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        s.parse()
    }
}

impl From<Keys> for String {
    fn from(k: Keys) -> String {
        k.to_string()
    }
}

impl fmt::Display for Keys {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Keys::None => write!(f, "none"),
            Keys::Random => write!(f, "random"),
            Keys::Distinct(n) => write!(f, "distinct:{n}"),
        }
    }
}

/// Target publish rate for the whole run (all producers together).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub enum Rate {
    RecordsPerSecond(f64),
    MegabytesPerSecond(f64),
    /// Search for the maximum sustainable rate first, then measure at it (OpenMessaging
    /// Benchmark's max-rate mode). Written `0` or `max`.
    Max,
}

impl Rate {
    /// The records/s this rate means for the given mean record size; `None` for `Max`.
    pub fn records_per_second(&self, mean_record_bytes: f64) -> Option<f64> {
        match *self {
            Rate::RecordsPerSecond(r) => Some(r),
            Rate::MegabytesPerSecond(mb) => Some(mb * 1_000_000.0 / mean_record_bytes.max(1.0)),
            Rate::Max => None,
        }
    }
}

impl FromStr for Rate {
    type Err = WorkloadError;
    /// Accepts `50000` (records/s), `50000/s`, `100MB/s`, `0` or `max`.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = || WorkloadError::Parse {
            field: "rate",
            input: s.to_string(),
            expected: "records/s like 50000, a bandwidth like 100MB/s, or 0/max",
        };
        let t = s.trim();
        if t == "max" {
            return Ok(Rate::Max);
        }
        if let Some(mb) = t.strip_suffix("MB/s") {
            let v: f64 = mb.trim().parse().map_err(|_| err())?;
            return if v == 0.0 {
                Ok(Rate::Max)
            } else if v.is_finite() && v > 0.0 {
                Ok(Rate::MegabytesPerSecond(v))
            } else {
                Err(err())
            };
        }
        let v: f64 = t
            .strip_suffix("/s")
            .unwrap_or(t)
            .trim()
            .parse()
            .map_err(|_| err())?;
        if v == 0.0 {
            Ok(Rate::Max)
        } else if v.is_finite() && v > 0.0 {
            Ok(Rate::RecordsPerSecond(v))
        } else {
            Err(err())
        }
    }
}

impl TryFrom<String> for Rate {
    type Error = WorkloadError;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        s.parse()
    }
}

impl From<Rate> for String {
    fn from(r: Rate) -> String {
        r.to_string()
    }
}

impl fmt::Display for Rate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Rate::RecordsPerSecond(r) => write!(f, "{r}/s"),
            Rate::MegabytesPerSecond(mb) => write!(f, "{mb}MB/s"),
            Rate::Max => write!(f, "max"),
        }
    }
}

/// Producer acknowledgement mode, as Kafka's `acks`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub enum Acks {
    None,
    Leader,
    All,
}

impl Acks {
    /// The wire value of the Produce request's `acks` field.
    pub fn wire_value(self) -> i16 {
        match self {
            Acks::None => 0,
            Acks::Leader => 1,
            Acks::All => -1,
        }
    }
}

impl FromStr for Acks {
    type Err = WorkloadError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "0" => Ok(Acks::None),
            "1" => Ok(Acks::Leader),
            "all" | "-1" => Ok(Acks::All),
            _ => Err(WorkloadError::Parse {
                field: "acks",
                input: s.to_string(),
                expected: "0, 1 or all",
            }),
        }
    }
}

impl TryFrom<String> for Acks {
    type Error = WorkloadError;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        s.parse()
    }
}

impl From<Acks> for String {
    fn from(a: Acks) -> String {
        a.to_string()
    }
}

impl fmt::Display for Acks {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Acks::None => "0",
            Acks::Leader => "1",
            Acks::All => "all",
        })
    }
}

/// Batch compression codec; the low three bits of a RecordBatch's attributes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Compression {
    None,
    Gzip,
    Snappy,
    Lz4,
    Zstd,
}

impl Compression {
    /// The attribute bits Kafka uses for this codec.
    pub fn attribute_bits(self) -> i16 {
        match self {
            Compression::None => 0,
            Compression::Gzip => 1,
            Compression::Snappy => 2,
            Compression::Lz4 => 3,
            Compression::Zstd => 4,
        }
    }

    /// The name librdkafka's `compression.codec` expects.
    pub fn name(self) -> &'static str {
        match self {
            Compression::None => "none",
            Compression::Gzip => "gzip",
            Compression::Snappy => "snappy",
            Compression::Lz4 => "lz4",
            Compression::Zstd => "zstd",
        }
    }
}

impl FromStr for Compression {
    type Err = WorkloadError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "none" => Ok(Compression::None),
            "gzip" => Ok(Compression::Gzip),
            "snappy" => Ok(Compression::Snappy),
            "lz4" => Ok(Compression::Lz4),
            "zstd" => Ok(Compression::Zstd),
            _ => Err(WorkloadError::Parse {
                field: "compression",
                input: s.to_string(),
                expected: "none, gzip, snappy, lz4 or zstd",
            }),
        }
    }
}

/// Which client library drives the load.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum DriverKind {
    /// ringbench's own Kafka client on compio/io_uring: lean, microsecond timestamps.
    Native,
    /// librdkafka through the `rdkafka` crate: what most users actually run.
    Rdkafka,
}

impl fmt::Display for DriverKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            DriverKind::Native => "native",
            DriverKind::Rdkafka => "rdkafka",
        })
    }
}

/// A complete workload. Field names are the TOML keys; units are in the names.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Workload {
    pub name: String,
    pub topics: u32,
    pub partitions_per_topic: u32,
    /// Topic names are `<prefix>-<run id>-<n>`, fresh per run so no earlier data is read.
    pub topic_prefix: String,
    pub producers_per_topic: u32,
    /// Each subscription reads every record of the topic once (a consumer group, or a manual
    /// assignment when `consumer_group` is false).
    pub subscriptions_per_topic: u32,
    pub consumers_per_subscription: u32,
    pub consumer_group: bool,
    pub record_size: RecordSize,
    pub keys: Keys,
    /// Headers added to every record, each with an 8-byte key and `header_value_bytes` value.
    pub headers_per_record: u32,
    pub header_value_bytes: u32,
    pub rate: Rate,
    pub batch_size_bytes: u32,
    pub linger_ms: f64,
    pub acks: Acks,
    pub compression: Compression,
    pub warmup_s: f64,
    pub duration_s: f64,
    /// Backlog mode: with consumers paused, produce this many bytes, then let consumers drain
    /// the backlog while producers continue, and report the drain rate. 0 disables it.
    pub backlog_bytes: u64,
    /// Produce requests in flight per broker connection (Kafka's max.in.flight.requests.per.connection).
    pub max_in_flight_per_connection: u32,
    /// Bytes a producer may hold in unsent batches (Kafka's buffer.memory). When full the
    /// producer stops creating records, but their intended send times keep advancing, so the
    /// stall shows up in latency instead of vanishing (coordinated omission).
    pub producer_buffer_bytes: u64,
    pub fetch_max_bytes: u32,
    pub fetch_partition_max_bytes: u32,
    pub fetch_max_wait_ms: u32,
    /// Period of the reported time series (OpenMessaging Benchmark uses 10 s).
    pub stats_interval_s: f64,
    /// Produce request timeout the broker is given.
    pub request_timeout_ms: u32,
    /// Seed for record sizes and keys, so two runs of one workload send the same bytes.
    pub seed: u64,
}

impl Default for Workload {
    fn default() -> Self {
        Workload {
            name: "default".to_string(),
            topics: 1,
            partitions_per_topic: 4,
            topic_prefix: "ringbench".to_string(),
            producers_per_topic: 1,
            subscriptions_per_topic: 1,
            consumers_per_subscription: 1,
            consumer_group: false,
            record_size: RecordSize::Fixed(1024),
            keys: Keys::None,
            headers_per_record: 0,
            header_value_bytes: 16,
            rate: Rate::RecordsPerSecond(10_000.0),
            batch_size_bytes: 16 * 1024,
            linger_ms: 1.0,
            acks: Acks::All,
            compression: Compression::None,
            warmup_s: 5.0,
            duration_s: 30.0,
            backlog_bytes: 0,
            max_in_flight_per_connection: 5,
            producer_buffer_bytes: 32 * 1024 * 1024,
            fetch_max_bytes: 50 * 1024 * 1024,
            fetch_partition_max_bytes: 1024 * 1024,
            fetch_max_wait_ms: 100,
            stats_interval_s: 10.0,
            request_timeout_ms: 30_000,
            seed: 0x5eed,
        }
    }
}

impl Workload {
    /// Parses a TOML workload; missing keys take the defaults above, unknown keys are errors.
    pub fn from_toml(text: &str) -> Result<Workload, anyhow::Error> {
        let workload: Workload = toml::from_str(text)?;
        workload.validate()?;
        Ok(workload)
    }

    /// Checks every field against what can be measured honestly.
    pub fn validate(&self) -> Result<(), WorkloadError> {
        fn invalid(field: &'static str, reason: impl Into<String>) -> Result<(), WorkloadError> {
            Err(WorkloadError::Invalid {
                field,
                reason: reason.into(),
            })
        }
        if self.topics == 0 || self.topics > 10_000 {
            return invalid("topics", "must be between 1 and 10000");
        }
        if self.partitions_per_topic == 0 || self.partitions_per_topic > 100_000 {
            return invalid("partitions_per_topic", "must be between 1 and 100000");
        }
        if self.producers_per_topic == 0 || self.producers_per_topic > 1024 {
            return invalid("producers_per_topic", "must be between 1 and 1024");
        }
        if self.subscriptions_per_topic > 64 || self.consumers_per_subscription > 1024 {
            return invalid(
                "consumers_per_subscription",
                "at most 64 subscriptions of 1024 consumers",
            );
        }
        if self.subscriptions_per_topic > 0 && self.consumers_per_subscription == 0 {
            return invalid(
                "consumers_per_subscription",
                "must be at least 1 when subscriptions_per_topic > 0",
            );
        }
        let min_value = TIMESTAMP_BYTES as u32;
        let (lo, hi) = match self.record_size {
            RecordSize::Fixed(n) => (n, n),
            RecordSize::Uniform { min, max } => (min, max),
        };
        if lo > hi {
            return invalid("record_size", "uniform minimum exceeds maximum");
        }
        if lo < min_value || hi > MAX_RECORD_BYTES {
            return invalid(
                "record_size",
                format!(
                    "must be between {min_value} bytes (the timestamp) and {MAX_RECORD_BYTES} bytes"
                ),
            );
        }
        if self.headers_per_record > 64 || self.header_value_bytes > 4096 {
            return invalid("headers_per_record", "at most 64 headers of 4096 bytes");
        }
        if self.batch_size_bytes < 64 || self.batch_size_bytes > 16 * 1024 * 1024 {
            return invalid("batch_size_bytes", "must be between 64 B and 16 MiB");
        }
        if !(0.0..=10_000.0).contains(&self.linger_ms) {
            return invalid("linger_ms", "must be between 0 and 10000");
        }
        if !(0.0..=86_400.0).contains(&self.warmup_s) {
            return invalid("warmup_s", "must be between 0 and 86400");
        }
        if !(self.duration_s > 0.0 && self.duration_s <= 86_400.0) {
            return invalid("duration_s", "must be above 0 and at most 86400");
        }
        if self.max_in_flight_per_connection == 0 || self.max_in_flight_per_connection > 1024 {
            return invalid("max_in_flight_per_connection", "must be between 1 and 1024");
        }
        let batch_floor = self.batch_size_bytes as u64 + self.record_size.max_bytes() as u64;
        if self.producer_buffer_bytes < batch_floor || self.producer_buffer_bytes > 1 << 36 {
            return invalid(
                "producer_buffer_bytes",
                "must hold at least one batch and at most 64 GiB",
            );
        }
        if self.fetch_max_bytes < 1024 || self.fetch_partition_max_bytes < 1024 {
            return invalid("fetch_max_bytes", "fetch limits must be at least 1 KiB");
        }
        if self.fetch_max_bytes > 256 * 1024 * 1024 {
            return invalid("fetch_max_bytes", "at most 256 MiB");
        }
        if self.fetch_max_wait_ms > 60_000 {
            return invalid("fetch_max_wait_ms", "at most 60000");
        }
        if !(self.stats_interval_s >= 0.1 && self.stats_interval_s <= 3600.0) {
            return invalid("stats_interval_s", "must be between 0.1 and 3600");
        }
        if self.request_timeout_ms == 0 || self.request_timeout_ms > i32::MAX as u32 {
            return invalid("request_timeout_ms", "must be positive");
        }
        if self.backlog_bytes > 0 && self.subscriptions_per_topic == 0 {
            return invalid("backlog_bytes", "backlog mode needs consumers to drain it");
        }
        if self.topic_prefix.is_empty()
            || self.topic_prefix.len() > 100
            || !self
                .topic_prefix
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.')
        {
            return invalid("topic_prefix", "1-100 characters of [A-Za-z0-9._-]");
        }
        Ok(())
    }

    /// Total producers across topics.
    pub fn total_producers(&self) -> u32 {
        self.topics * self.producers_per_topic
    }

    /// Total consumers across topics and subscriptions.
    pub fn total_consumers(&self) -> u32 {
        self.topics * self.subscriptions_per_topic * self.consumers_per_subscription
    }

    /// The fixed target in records/s, or `None` in max-rate mode.
    pub fn target_records_per_second(&self) -> Option<f64> {
        self.rate.records_per_second(self.record_size.mean_bytes())
    }
}

/// A small, fast, seedable generator (SplitMix64). Record sizes and keys need reproducibility
/// and speed, not cryptographic quality.
#[derive(Debug, Clone)]
pub struct SplitMix64 {
    state: u64,
}

impl SplitMix64 {
    pub fn new(seed: u64) -> Self {
        SplitMix64 { state: seed }
    }

    pub fn next_u64(&mut self) -> u64 {
        self.state = self.state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
}

/// Kafka's murmur2 as used by the Java client's default partitioner, so keyed records land on
/// the same partitions a Java producer would choose.
pub fn murmur2(data: &[u8]) -> u32 {
    const SEED: u32 = 0x9747_b28c;
    const M: u32 = 0x5bd1_e995;
    const R: u32 = 24;
    let length = data.len();
    let mut h: u32 = SEED ^ length as u32;
    let chunks = data.chunks_exact(4);
    let tail = chunks.remainder();
    for chunk in chunks {
        let mut k = u32::from_le_bytes([chunk[0], chunk[1], chunk[2], chunk[3]]);
        k = k.wrapping_mul(M);
        k ^= k >> R;
        k = k.wrapping_mul(M);
        h = h.wrapping_mul(M);
        h ^= k;
    }
    match tail.len() {
        3 => {
            h ^= (tail[2] as u32) << 16;
            h ^= (tail[1] as u32) << 8;
            h ^= tail[0] as u32;
            h = h.wrapping_mul(M);
        }
        2 => {
            h ^= (tail[1] as u32) << 8;
            h ^= tail[0] as u32;
            h = h.wrapping_mul(M);
        }
        1 => {
            h ^= tail[0] as u32;
            h = h.wrapping_mul(M);
        }
        _ => {}
    }
    h ^= h >> 13;
    h = h.wrapping_mul(M);
    h ^= h >> 15;
    h
}

/// The partition Kafka's Java default partitioner picks for a key: `toPositive(murmur2) % n`.
pub fn partition_for_key(key: &[u8], partitions: u32) -> u32 {
    (murmur2(key) & 0x7fff_ffff) % partitions
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_string_forms() {
        assert_eq!(
            "1KiB".parse::<RecordSize>().unwrap(),
            RecordSize::Fixed(1024)
        );
        assert_eq!("100".parse::<RecordSize>().unwrap(), RecordSize::Fixed(100));
        assert_eq!(
            "uniform:100-1KiB".parse::<RecordSize>().unwrap(),
            RecordSize::Uniform {
                min: 100,
                max: 1024
            }
        );
        assert!("uniform:100".parse::<RecordSize>().is_err());
        assert!("lots".parse::<RecordSize>().is_err());
        assert_eq!("distinct:10".parse::<Keys>().unwrap(), Keys::Distinct(10));
        assert!("distinct:0".parse::<Keys>().is_err());
        assert_eq!("0".parse::<Rate>().unwrap(), Rate::Max);
        assert_eq!("max".parse::<Rate>().unwrap(), Rate::Max);
        assert_eq!(
            "50MB/s".parse::<Rate>().unwrap(),
            Rate::MegabytesPerSecond(50.0)
        );
        assert_eq!(
            "2000/s".parse::<Rate>().unwrap(),
            Rate::RecordsPerSecond(2000.0)
        );
        assert!("-5".parse::<Rate>().is_err());
        assert!("NaN".parse::<Rate>().is_err());
        assert_eq!("all".parse::<Acks>().unwrap().wire_value(), -1);
        assert!("2".parse::<Acks>().is_err());
    }

    #[test]
    fn toml_round_trips_and_rejects_unknown_keys() {
        let text = r#"
            name = "t"
            topics = 2
            partitions_per_topic = 8
            record_size = "uniform:100-200"
            keys = "distinct:1000"
            rate = "20MB/s"
            acks = "1"
            compression = "zstd"
        "#;
        let w = Workload::from_toml(text).unwrap();
        assert_eq!(w.partitions_per_topic, 8);
        assert_eq!(w.compression, Compression::Zstd);
        let again = Workload::from_toml(&toml::to_string(&w).unwrap()).unwrap();
        assert_eq!(w, again);
        assert!(Workload::from_toml("topics = 1\nbogus = 3\n").is_err());
    }

    #[test]
    fn validation_names_the_field() {
        let w = Workload {
            record_size: RecordSize::Fixed(4),
            ..Workload::default()
        };
        match w.validate() {
            Err(WorkloadError::Invalid { field, .. }) => assert_eq!(field, "record_size"),
            other => panic!("expected record_size error, got {other:?}"),
        }
        let w = Workload {
            backlog_bytes: 1,
            subscriptions_per_topic: 0,
            ..Workload::default()
        };
        assert!(w.validate().is_err());
        assert!(Workload::default().validate().is_ok());
    }

    #[test]
    fn murmur2_matches_kafka_reference_values() {
        // Values from Kafka's UtilsTest.testMurmur2.
        assert_eq!(murmur2(b"21") as i32, -973932308);
        assert_eq!(murmur2(b"foobar") as i32, -790332482);
        assert_eq!(murmur2(b"a-little-bit-long-string") as i32, -985981536);
        assert_eq!(murmur2(b"a-little-bit-longer-string") as i32, -1486304829);
        assert_eq!(
            murmur2(b"lkjh234lh9fiuh90y23oiuhsafujhadof229phr9h19h89h8") as i32,
            -58897971
        );
        assert_eq!(murmur2(b"abc") as i32, 479470107);
    }

    #[test]
    fn uniform_sizes_stay_in_range() {
        let mut rng = SplitMix64::new(7);
        let size = RecordSize::Uniform { min: 10, max: 12 };
        let mut seen = [false; 3];
        for _ in 0..1000 {
            let s = size.sample(&mut rng);
            assert!((10..=12).contains(&s));
            seen[(s - 10) as usize] = true;
        }
        assert!(seen.iter().all(|s| *s));
    }
}
