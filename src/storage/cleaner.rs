//! storage::cleaner: log compaction (Kafka's `cleanup.policy=compact`): the per-partition compaction
//! settings, the key check a compacted topic applies to produced records, one cleaning pass over a
//! partition log (offset map, rewrite of closed segments keeping the latest record per key, tombstone
//! removal after `delete.retention.ms`), and the crash-safe segment swap with its completion at open.
//!
//! What a cleaned segment looks like. Each batch keeps its base offset, last offset delta, timestamps,
//! producer id, epoch and base sequence, and its compression codec; only the records that survive are
//! kept (their bytes copied verbatim, so offsets, timestamps and headers are those the producer sent),
//! the count and CRC are rewritten, and a compressed batch is compressed again with its own codec. A
//! batch left with no records is kept empty if it is the last batch of an idempotent producer (so
//! the producer state stays rebuildable, Kafka's `RETAIN_EMPTY`); a run of other emptied batches
//! becomes one empty, uncompressed filler batch spanning their offsets. Fillers keep the log's batch
//! offsets contiguous, which recovery verifies and reads rely on to step over removed records; clients
//! skip empty batches as they do Kafka's.
//!
//! The swap (per segment `B`): write `B.log.cleaned`, `B.index.cleaned`, `B.timeindex.cleaned` and
//! fdatasync them; rename the index files to `.swap`, then the log to `B.log.swap` (the commit point)
//! and fsync the directory; rename the index swaps over `B.index`/`B.timeindex`, then `B.log.swap`
//! over `B.log`, and fsync the directory. At open, `complete_interrupted_swaps` finishes every swap
//! whose `B.log.swap` exists and deletes `.cleaned` leftovers, so a crash at any step leaves either
//! the old segment or the cleaned one, never a mix.

use std::collections::{HashMap, HashSet};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use kafka_protocol::compression::{Compressor, Decompressor, Gzip, Lz4, Snappy, Zstd};

use super::batch::{BATCH_HEADER_BYTES, BatchHeader};
use super::descriptors::SegmentHandle;
use super::disk::Disk;
use super::error::{AppendError, StorageError};
use super::log::PartitionLog;
use super::segment::{Segment, SegmentFile, segment_stem};

/// Kafka's defaults for the compaction settings.
pub const DEFAULT_MIN_CLEANABLE_DIRTY_RATIO: f64 = 0.5;
pub const DEFAULT_DELETE_RETENTION_MS: u64 = 86_400_000;

/// Per-topic compaction settings (`cleanup.policy`, `min.cleanable.dirty.ratio`,
/// `min.compaction.lag.ms`, `max.compaction.lag.ms`, `delete.retention.ms`).
#[derive(Debug, Clone, PartialEq)]
pub struct CompactionConfig {
    /// `cleanup.policy` contains `compact`: the cleaner keeps the latest record per key.
    pub compact: bool,
    /// `cleanup.policy` contains `delete`: retention by time and size applies.
    pub delete: bool,
    /// `min.cleanable.dirty.ratio`: clean once dirty bytes / cleanable bytes reach this.
    pub min_cleanable_dirty_ratio: f64,
    /// `min.compaction.lag.ms`: a segment whose newest record is younger than this is not cleaned.
    pub min_compaction_lag_ms: u64,
    /// `max.compaction.lag.ms`: a dirty segment older than this is cleaned whatever the ratio
    /// (`None` = Kafka's Long.MAX_VALUE).
    pub max_compaction_lag_ms: Option<u64>,
    /// `delete.retention.ms`: how long a tombstone is kept after its segment was last written.
    pub delete_retention_ms: u64,
}

// The ratio is validated finite (0..=1), so equality is reflexive.
impl Eq for CompactionConfig {}

impl Default for CompactionConfig {
    fn default() -> Self {
        CompactionConfig {
            compact: false,
            delete: true,
            min_cleanable_dirty_ratio: DEFAULT_MIN_CLEANABLE_DIRTY_RATIO,
            min_compaction_lag_ms: 0,
            max_compaction_lag_ms: None,
            delete_retention_ms: DEFAULT_DELETE_RETENTION_MS,
        }
    }
}

/// The `cleanup.policy` text for a pair of flags, as Kafka lists it.
pub fn cleanup_policy_text(compact: bool, delete: bool) -> &'static str {
    match (compact, delete) {
        (true, true) => "compact,delete",
        (true, false) => "compact",
        _ => "delete",
    }
}

impl CompactionConfig {
    pub fn validate(&self) -> Result<(), String> {
        if !(0.0..=1.0).contains(&self.min_cleanable_dirty_ratio) {
            return Err(format!(
                "min.cleanable.dirty.ratio {} not in [0, 1]",
                self.min_cleanable_dirty_ratio
            ));
        }
        if let Some(max) = self.max_compaction_lag_ms
            && max < self.min_compaction_lag_ms
        {
            return Err(format!(
                "max.compaction.lag.ms {max} is below min.compaction.lag.ms {}",
                self.min_compaction_lag_ms
            ));
        }
        if !self.compact && !self.delete {
            return Err("cleanup.policy names neither delete nor compact".into());
        }
        Ok(())
    }
}

/// The shard-wide limits of one cleaning pass.
#[derive(Debug, Clone, Copy)]
pub struct CleanerLimits {
    /// `log.cleaner.dedupe.buffer.size` (this shard's share): the offset map's memory, counted as
    /// key bytes plus `MAP_ENTRY_OVERHEAD_BYTES` per key. When it fills, a prefix of the dirty range
    /// is cleaned and the rest waits for the next pass.
    pub dedupe_buffer_bytes: usize,
    /// `log.cleaner.io.max.bytes.per.second` (this shard's share): read plus write rate; `None` = unlimited.
    pub io_bytes_per_second: Option<u64>,
}

impl Default for CleanerLimits {
    fn default() -> Self {
        CleanerLimits {
            dedupe_buffer_bytes: 128 << 20,
            io_bytes_per_second: None,
        }
    }
}

/// What the map charges per key besides the key bytes (hash table slot, offset, allocation).
pub const MAP_ENTRY_OVERHEAD_BYTES: usize = 48;

/// What one cleaning pass did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct CleanOutcome {
    /// Segments rewritten and swapped in.
    pub cleaned_segments: usize,
    pub bytes_before: u64,
    pub bytes_after: u64,
    /// Records dropped (superseded values and expired tombstones).
    pub records_removed: u64,
    /// The next pass's first dirty offset: everything below was covered by this pass's map.
    pub first_dirty_offset: i64,
    /// When the oldest tombstone this pass kept may go (its segment's last write plus
    /// `delete.retention.ms`); the caller then runs a full pass (first dirty offset 0) even if
    /// nothing new was written, as Kafka's cleaner does for expired tombstones.
    pub tombstones_due_ms: Option<i64>,
}

/// Why a cleaning pass stopped.
#[derive(Debug, thiserror::Error)]
pub enum CleanError {
    #[error(transparent)]
    Storage(#[from] StorageError),
    /// A batch could not be understood (bad records, unknown codec, failed decompression). The
    /// segment is left as it is.
    #[error("cannot clean {}: batch at offset {offset}: {reason}", path.display())]
    BadBatch {
        path: PathBuf,
        offset: i64,
        reason: String,
    },
    /// The log was closed, deleted or changed under the pass; nothing was swapped.
    #[error("log changed during cleaning")]
    Interrupted,
}

// Batch header fields (RecordBatch v2).
const LENGTH_AT: usize = 8;
const MAGIC_AT: usize = 16;
const CRC_AT: usize = 17;
const ATTRIBUTES_AT: usize = 21;
const LAST_OFFSET_DELTA_AT: usize = 23;
const BASE_TIMESTAMP_AT: usize = 27;
const MAX_TIMESTAMP_AT: usize = 35;
const PRODUCER_ID_AT: usize = 43;
const PRODUCER_EPOCH_AT: usize = 51;
const BASE_SEQUENCE_AT: usize = 53;
const COUNT_AT: usize = 57;
const CODEC_MASK: u16 = 0x07;
const CONTROL_FLAG: u16 = 0x20;
const TIMESTAMP_TYPE_FLAG: u16 = 0x08;

fn i64_at(bytes: &[u8], at: usize) -> i64 {
    i64::from_be_bytes(bytes[at..at + 8].try_into().expect("8 bytes"))
}

fn i32_at(bytes: &[u8], at: usize) -> i32 {
    i32::from_be_bytes(bytes[at..at + 4].try_into().expect("4 bytes"))
}

fn u16_at(bytes: &[u8], at: usize) -> u16 {
    u16::from_be_bytes(bytes[at..at + 2].try_into().expect("2 bytes"))
}

/// One record of a batch, as a view into the (decompressed) records bytes.
struct RecordView<'a> {
    offset: i64,
    key: Option<&'a [u8]>,
    tombstone: bool,
    /// The whole record, length prefix included, to copy into a rebuilt batch.
    raw: &'a [u8],
}

fn read_varint(bytes: &[u8]) -> Option<(i64, usize)> {
    let mut raw: u64 = 0;
    for (index, byte) in bytes.iter().enumerate().take(10) {
        raw |= u64::from(byte & 0x7f) << (7 * index);
        if byte & 0x80 == 0 {
            let value = ((raw >> 1) as i64) ^ -((raw & 1) as i64);
            return Some((value, index + 1));
        }
    }
    None
}

/// Splits a batch's records bytes into records. `count` is the header's record count.
fn parse_records(
    records: &[u8],
    base_offset: i64,
    count: i32,
) -> Result<Vec<RecordView<'_>>, String> {
    let mut out = Vec::with_capacity(count.clamp(0, 4096) as usize);
    let mut at = 0usize;
    for index in 0..count.max(0) {
        let bad = |what: &str| format!("record {index}: {what}");
        let (length, used) = read_varint(&records[at..]).ok_or_else(|| bad("bad length"))?;
        let length = usize::try_from(length).map_err(|_| bad("negative length"))?;
        let start = at;
        let body_from = at + used;
        let body = records
            .get(body_from..body_from + length)
            .ok_or_else(|| bad("runs past the batch"))?;
        let mut cursor = 1usize; // attributes
        let (_, used) = read_varint(body.get(cursor..).ok_or_else(|| bad("short"))?)
            .ok_or_else(|| bad("bad timestamp delta"))?;
        cursor += used;
        let (offset_delta, used) = read_varint(body.get(cursor..).ok_or_else(|| bad("short"))?)
            .ok_or_else(|| bad("bad offset delta"))?;
        cursor += used;
        let (key_length, used) = read_varint(body.get(cursor..).ok_or_else(|| bad("short"))?)
            .ok_or_else(|| bad("bad key length"))?;
        cursor += used;
        let key = if key_length < 0 {
            None
        } else {
            let key_length = key_length as usize;
            let key = body
                .get(cursor..cursor + key_length)
                .ok_or_else(|| bad("key runs past the record"))?;
            cursor += key_length;
            Some(key)
        };
        let (value_length, _) = read_varint(body.get(cursor..).ok_or_else(|| bad("short"))?)
            .ok_or_else(|| bad("bad value length"))?;
        at = body_from + length;
        out.push(RecordView {
            offset: base_offset + offset_delta,
            key,
            tombstone: value_length < 0,
            raw: &records[start..at],
        });
    }
    Ok(out)
}

fn decompress(codec: u16, data: &[u8]) -> Result<Vec<u8>, String> {
    let mut input = Bytes::copy_from_slice(data);
    let take = |buf: &mut Bytes| Ok(buf.to_vec());
    let result = match codec {
        0 => return Ok(data.to_vec()),
        1 => <Gzip as Decompressor<Bytes>>::decompress(&mut input, take),
        2 => <Snappy as Decompressor<Bytes>>::decompress(&mut input, take),
        3 => <Lz4 as Decompressor<Bytes>>::decompress(&mut input, take),
        4 => <Zstd as Decompressor<Bytes>>::decompress(&mut input, take),
        other => return Err(format!("unknown compression codec {other}")),
    };
    result.map_err(|error| format!("decompression failed: {error:#}"))
}

fn compress(codec: u16, data: &[u8]) -> Result<Vec<u8>, String> {
    let mut out = BytesMut::new();
    let fill = |buf: &mut BytesMut| {
        buf.extend_from_slice(data);
        Ok(())
    };
    let result = match codec {
        0 => return Ok(data.to_vec()),
        1 => <Gzip as Compressor<BytesMut>>::compress(&mut out, fill),
        2 => <Snappy as Compressor<BytesMut>>::compress(&mut out, fill),
        3 => <Lz4 as Compressor<BytesMut>>::compress(&mut out, fill),
        4 => <Zstd as Compressor<BytesMut>>::compress(&mut out, fill),
        other => return Err(format!("unknown compression codec {other}")),
    };
    result.map_err(|error| format!("compression failed: {error:#}"))?;
    Ok(out.to_vec())
}

/// The records bytes of a whole batch, decompressed.
fn batch_records(batch: &[u8]) -> Result<Vec<u8>, String> {
    let codec = u16_at(batch, ATTRIBUTES_AT) & CODEC_MASK;
    decompress(codec, &batch[BATCH_HEADER_BYTES..])
}

/// A compacted topic refuses records without a key, as Kafka does: INVALID_RECORD with Kafka's
/// message. `records` is a produce request's record set, already validated batch by batch.
pub fn require_keys(records: &[u8], partition: &str) -> Result<(), AppendError> {
    let mut at = 0usize;
    while at + BATCH_HEADER_BYTES <= records.len() {
        let size = i32_at(records, at + LENGTH_AT) as usize + 12;
        let batch = &records[at..(at + size).min(records.len())];
        if u16_at(batch, ATTRIBUTES_AT) & CONTROL_FLAG == 0 {
            let bytes = batch_records(batch).map_err(AppendError::CorruptMessage)?;
            let parsed = parse_records(&bytes, 0, i32_at(batch, COUNT_AT))
                .map_err(AppendError::CorruptMessage)?;
            if parsed.iter().any(|record| record.key.is_none()) {
                return Err(AppendError::InvalidRecord(format!(
                    "Compacted topic cannot accept message without key in topic partition {partition}."
                )));
            }
        }
        at += size;
    }
    Ok(())
}

/// Builds a batch from `header` (an original 61-byte header) with `records_bytes` (uncompressed
/// records) compressed with `codec`, `count` records, and the CRC recomputed.
fn rebuild_batch(
    header: &[u8],
    codec: u16,
    count: i32,
    records_bytes: &[u8],
) -> Result<Vec<u8>, String> {
    let payload = compress(codec, records_bytes)?;
    let mut out = Vec::with_capacity(BATCH_HEADER_BYTES + payload.len());
    out.extend_from_slice(&header[..BATCH_HEADER_BYTES]);
    out.extend_from_slice(&payload);
    let attributes = (u16_at(header, ATTRIBUTES_AT) & !CODEC_MASK) | codec;
    out[ATTRIBUTES_AT..ATTRIBUTES_AT + 2].copy_from_slice(&attributes.to_be_bytes());
    out[COUNT_AT..COUNT_AT + 4].copy_from_slice(&count.to_be_bytes());
    finish_batch(&mut out);
    Ok(out)
}

/// Sets the length and CRC of a complete batch.
fn finish_batch(batch: &mut [u8]) {
    let length = (batch.len() - 12) as i32;
    batch[LENGTH_AT..LENGTH_AT + 4].copy_from_slice(&length.to_be_bytes());
    let crc = crc32c::crc32c(&batch[ATTRIBUTES_AT..]);
    batch[CRC_AT..CRC_AT + 4].copy_from_slice(&crc.to_be_bytes());
}

/// An empty, uncompressed batch covering `first..=last` with no producer, carrying the timestamps of
/// the batches it replaces.
fn filler_batch(
    first: i64,
    last: i64,
    base_timestamp: i64,
    max_timestamp: i64,
    attributes: u16,
) -> Vec<u8> {
    let mut out = vec![0u8; BATCH_HEADER_BYTES];
    out[0..8].copy_from_slice(&first.to_be_bytes());
    out[12..16].copy_from_slice(&super::log::LEADER_EPOCH.to_be_bytes());
    out[MAGIC_AT] = 2;
    let attributes = attributes & TIMESTAMP_TYPE_FLAG;
    out[ATTRIBUTES_AT..ATTRIBUTES_AT + 2].copy_from_slice(&attributes.to_be_bytes());
    let delta = (last - first) as i32;
    out[LAST_OFFSET_DELTA_AT..LAST_OFFSET_DELTA_AT + 4].copy_from_slice(&delta.to_be_bytes());
    out[BASE_TIMESTAMP_AT..BASE_TIMESTAMP_AT + 8].copy_from_slice(&base_timestamp.to_be_bytes());
    out[MAX_TIMESTAMP_AT..MAX_TIMESTAMP_AT + 8].copy_from_slice(&max_timestamp.to_be_bytes());
    out[PRODUCER_ID_AT..PRODUCER_ID_AT + 8].copy_from_slice(&(-1i64).to_be_bytes());
    out[PRODUCER_EPOCH_AT..PRODUCER_EPOCH_AT + 2].copy_from_slice(&(-1i16).to_be_bytes());
    out[BASE_SEQUENCE_AT..BASE_SEQUENCE_AT + 4].copy_from_slice(&(-1i32).to_be_bytes());
    finish_batch(&mut out);
    out
}

/// Reads a closed segment's batches in large windows.
struct BatchReader<'a> {
    disk: &'a Disk,
    file: &'a SegmentFile,
    limit: u64,
    position: u64,
    window_start: u64,
    window: Vec<u8>,
}

const READ_WINDOW_BYTES: usize = 1 << 20;

impl<'a> BatchReader<'a> {
    fn new(disk: &'a Disk, file: &'a SegmentFile, limit: u64) -> BatchReader<'a> {
        BatchReader {
            disk,
            file,
            limit,
            position: 0,
            window_start: 0,
            window: Vec::new(),
        }
    }

    async fn ensure(&mut self, length: usize) -> Result<bool, StorageError> {
        let end = self.position + length as u64;
        if end > self.limit {
            return Ok(false);
        }
        if self.position >= self.window_start && end <= self.window_start + self.window.len() as u64
        {
            return Ok(true);
        }
        let want = (length.max(READ_WINDOW_BYTES) as u64).min(self.limit - self.position) as usize;
        self.window = self
            .disk
            .read_at(self.file.file(), want, self.position)
            .await
            .map_err(|source| StorageError::io("read", self.file.path(), source))?;
        self.window_start = self.position;
        Ok(self.window.len() >= length)
    }

    /// The next whole batch (position, bytes), or `None` at the end.
    async fn next(&mut self) -> Result<Option<(u64, Vec<u8>)>, CleanError> {
        if !self.ensure(BATCH_HEADER_BYTES).await? {
            return Ok(None);
        }
        let from = (self.position - self.window_start) as usize;
        let header = BatchHeader::parse_prefix(&self.window[from..from + BATCH_HEADER_BYTES])
            .ok_or_else(|| CleanError::BadBatch {
                path: self.file.path().to_path_buf(),
                offset: -1,
                reason: format!("no batch header at position {}", self.position),
            })?;
        let size = header.size_bytes as usize;
        if !self.ensure(size).await? {
            return Err(CleanError::BadBatch {
                path: self.file.path().to_path_buf(),
                offset: header.base_offset,
                reason: "batch runs past the segment".into(),
            });
        }
        let from = (self.position - self.window_start) as usize;
        let bytes = self.window[from..from + size].to_vec();
        let position = self.position;
        self.position += size as u64;
        Ok(Some((position, bytes)))
    }
}

/// Paces the cleaner's IO to a byte rate and yields to the shard's other tasks between batches.
struct Pacer {
    rate: Option<u64>,
    started: Instant,
    bytes: u64,
}

impl Pacer {
    fn new(rate: Option<u64>) -> Pacer {
        Pacer {
            rate,
            started: Instant::now(),
            bytes: 0,
        }
    }

    async fn account(&mut self, bytes: usize) {
        self.bytes += bytes as u64;
        if let Some(rate) = self.rate.filter(|rate| *rate > 0) {
            let due = Duration::from_secs_f64(self.bytes as f64 / rate as f64);
            let elapsed = self.started.elapsed();
            if due > elapsed {
                compio::time::sleep(due - elapsed).await;
                return;
            }
        }
        yield_now().await;
    }
}

/// Lets the other tasks of the shard run (produce, fetch) before the cleaner continues.
async fn yield_now() {
    let mut yielded = false;
    std::future::poll_fn(|context| {
        if yielded {
            std::task::Poll::Ready(())
        } else {
            yielded = true;
            context.waker().wake_by_ref();
            std::task::Poll::Pending
        }
    })
    .await
}

/// A closed segment picked for this pass, as it was when the pass started.
#[derive(Clone)]
struct Candidate {
    base: i64,
    /// The segment as it was picked: opened through the shard's descriptor cache while it is read,
    /// and compared by identity at the swap.
    file: SegmentHandle,
    size_bytes: u64,
    next_offset: i64,
    last_write_ms: i64,
    first_append_ms: Option<i64>,
}

/// What decides whether a record survives a pass.
#[derive(Clone, Copy)]
struct RetainRules<'a> {
    /// Key -> offset of its latest record in the mapped range.
    map: &'a HashMap<Vec<u8>, i64>,
    /// One past the last mapped offset; records from here on are kept.
    map_end: i64,
    /// Last offsets of the batches the producer state remembers.
    producer_last: &'a HashSet<i64>,
}

/// Streams a cleaned segment to `<base>.log.cleaned`, accounting batches and building the indexes
/// by the append rules as it goes.
struct CleanedWriter {
    /// Known by its final name, so its handle opens the swapped-in file; until the swap that name
    /// is still the old segment, so the cleaned file is written only through `file`.
    segment: Segment,
    /// The open `.log.cleaned`, held (not cached) until the swap.
    file: SegmentFile,
    buffer: Vec<u8>,
    written: u64,
    index_interval_bytes: u32,
    index_limits: (usize, usize),
}

/// How much cleaned output is gathered before one write.
const WRITE_CHUNK_BYTES: usize = 1 << 20;

impl CleanedWriter {
    async fn create(
        log: &PartitionLog,
        candidate: &Candidate,
        config: &super::config::LogConfig,
    ) -> Result<CleanedWriter, CleanError> {
        let path = cleaned_path(&log.dir, candidate.base, "log.cleaned");
        let file = log
            .disk
            .open_rw(&path, true)
            .await
            .map_err(|source| StorageError::io("open", &path, source))?;
        log.disk
            .set_len(&file, 0)
            .await
            .map_err(|source| StorageError::io("truncate", &path, source))?;
        // The file is named by its final path: that is where it lives once swapped in.
        let final_path = cleaned_path(&log.dir, candidate.base, "log");
        Ok(CleanedWriter {
            segment: Segment::new(
                &log.dir,
                candidate.base,
                SegmentHandle::new(final_path, candidate.base),
                candidate.last_write_ms,
            ),
            file: SegmentFile::new(file, path, candidate.base),
            buffer: Vec::new(),
            written: 0,
            index_interval_bytes: config.index_interval_bytes,
            index_limits: (config.max_index_entries(), config.max_time_index_entries()),
        })
    }

    /// Adds one whole batch.
    fn push(&mut self, batch: &[u8]) {
        let position = self.written + self.buffer.len() as u64;
        let last = i64_at(batch, 0) + i64::from(i32_at(batch, LAST_OFFSET_DELTA_AT));
        self.segment.note_batch(
            position,
            batch.len() as u64,
            last,
            i64_at(batch, MAX_TIMESTAMP_AT),
            self.index_interval_bytes,
            self.index_limits,
        );
        self.buffer.extend_from_slice(batch);
    }

    async fn write_if_full(&mut self, disk: &Disk, pacer: &mut Pacer) -> Result<(), CleanError> {
        if self.buffer.len() >= WRITE_CHUNK_BYTES {
            self.write(disk, pacer).await?;
        }
        Ok(())
    }

    async fn write(&mut self, disk: &Disk, pacer: &mut Pacer) -> Result<(), CleanError> {
        if self.buffer.is_empty() {
            return Ok(());
        }
        let chunk = std::mem::take(&mut self.buffer);
        let len = chunk.len();
        disk.write_all_at(self.file.file(), chunk, self.written)
            .await
            .map_err(|source| {
                let path = self.segment.log.path().with_extension("log.cleaned");
                StorageError::io("write", path, source)
            })?;
        self.written += len as u64;
        pacer.account(len).await;
        Ok(())
    }
}

fn cleaned_path(dir: &Path, base: i64, suffix: &str) -> PathBuf {
    dir.join(format!("{}.{suffix}", segment_stem(base)))
}

impl PartitionLog {
    /// One cleaning pass (a no-op unless the log is compacted and dirty enough). `first_dirty` is
    /// where the previous pass stopped (the caller keeps it; after a restart the whole log is dirty
    /// and gets cleaned once more). Runs beside produce and fetch: it reads closed segments without
    /// the append turn, and takes the turn only to swap a cleaned segment in.
    pub async fn clean(
        &self,
        now_ms: i64,
        first_dirty: i64,
        limits: CleanerLimits,
    ) -> Result<Option<CleanOutcome>, CleanError> {
        let (candidates, config, producer_last) = {
            let state = self.state.borrow();
            self.usable(&state)?;
            let config = state.config.clone();
            if !config.compaction.compact {
                return Ok(None);
            }
            let horizon = now_ms.saturating_sub(config.compaction.min_compaction_lag_ms as i64);
            let mut candidates = Vec::new();
            let closed = state.segments.len().saturating_sub(1);
            for segment in state.segments.values().take(closed) {
                let newest = if segment.max_timestamp >= 0 {
                    segment.max_timestamp
                } else {
                    segment.last_write_ms
                };
                // Only whole, durable, old-enough segments; the first that is not ends the range.
                if segment.next_offset > state.durable.offset
                    || segment.next_offset > state.high_watermark.offset
                    || newest > horizon
                {
                    break;
                }
                candidates.push(Candidate {
                    base: segment.base_offset,
                    file: segment.log.clone(),
                    size_bytes: segment.size_bytes,
                    next_offset: segment.next_offset,
                    last_write_ms: segment.last_write_ms,
                    first_append_ms: segment.first_append_ms,
                });
            }
            let producer_last: HashSet<i64> = state
                .producers
                .remembered_batch_last_offsets()
                .into_iter()
                .collect();
            (candidates, config, producer_last)
        };
        let Some(first) = candidates.first() else {
            return Ok(None);
        };
        let first_dirty = first_dirty.max(first.base);
        let dirty: Vec<&Candidate> = candidates
            .iter()
            .filter(|candidate| candidate.next_offset > first_dirty)
            .collect();
        if dirty.is_empty() {
            return Ok(None);
        }
        let total: u64 = candidates.iter().map(|c| c.size_bytes).sum();
        let dirty_bytes: u64 = dirty.iter().map(|c| c.size_bytes).sum();
        let ratio = if total == 0 {
            0.0
        } else {
            dirty_bytes as f64 / total as f64
        };
        let overdue = config.compaction.max_compaction_lag_ms.is_some_and(|max| {
            dirty
                .iter()
                .any(|c| now_ms.saturating_sub(c.last_write_ms) > max as i64)
        });
        if ratio < config.compaction.min_cleanable_dirty_ratio && !overdue {
            return Ok(None);
        }

        let mut pacer = Pacer::new(limits.io_bytes_per_second);
        // 1. The offset map over the dirty range: key -> offset of its latest record.
        let mut map: HashMap<Vec<u8>, i64> = HashMap::new();
        let mut map_bytes = 0usize;
        let mut map_end = first_dirty;
        'segments: for candidate in &dirty {
            let file = candidate.file.open(&self.disk).await?;
            let mut reader = BatchReader::new(&self.disk, &file, candidate.size_bytes);
            while let Some((_, batch)) = reader.next().await? {
                pacer.account(batch.len()).await;
                let base = i64_at(&batch, 0);
                let last = base + i64::from(i32_at(&batch, LAST_OFFSET_DELTA_AT));
                if last < map_end {
                    continue;
                }
                let bad = |reason: String| CleanError::BadBatch {
                    path: candidate.file.path().to_path_buf(),
                    offset: base,
                    reason,
                };
                if u16_at(&batch, ATTRIBUTES_AT) & CONTROL_FLAG == 0 {
                    let bytes = batch_records(&batch).map_err(bad)?;
                    let records =
                        parse_records(&bytes, base, i32_at(&batch, COUNT_AT)).map_err(bad)?;
                    let added: usize = records
                        .iter()
                        .filter_map(|record| record.key)
                        .filter(|key| !map.contains_key(*key))
                        .map(|key| key.len() + MAP_ENTRY_OVERHEAD_BYTES)
                        .sum();
                    if map_bytes + added > limits.dedupe_buffer_bytes {
                        if map.is_empty() {
                            return Err(bad(format!(
                                "one batch needs {added} bytes of offset map, more than the {} of log.cleaner.dedupe.buffer.size",
                                limits.dedupe_buffer_bytes
                            )));
                        }
                        // The map is full: clean the prefix it covers (Kafka does the same).
                        break 'segments;
                    }
                    map_bytes += added;
                    for record in records {
                        if let Some(key) = record.key {
                            map.insert(key.to_vec(), record.offset);
                        }
                    }
                }
                map_end = last + 1;
            }
            map_end = map_end.max(candidate.next_offset);
        }

        // 2. Rewrite every candidate segment below the map's end.
        let rules = RetainRules {
            map: &map,
            map_end,
            producer_last: &producer_last,
        };
        let tombstone_horizon = now_ms.saturating_sub(config.compaction.delete_retention_ms as i64);
        let mut outcome = CleanOutcome {
            first_dirty_offset: map_end,
            ..CleanOutcome::default()
        };
        for candidate in candidates.iter().filter(|c| c.base < map_end) {
            let drop_tombstones = candidate.last_write_ms < tombstone_horizon;
            let rewritten = self
                .rewrite_segment(candidate, &rules, drop_tombstones, &mut pacer, &config)
                .await?;
            let (rewritten, kept_tombstones) = rewritten;
            if kept_tombstones {
                let due = candidate
                    .last_write_ms
                    .saturating_add(config.compaction.delete_retention_ms as i64)
                    .saturating_add(1);
                outcome.tombstones_due_ms =
                    Some(outcome.tombstones_due_ms.map_or(due, |d| d.min(due)));
            }
            let Some((segment, file, removed)) = rewritten else {
                continue;
            };
            let (before, after) = self.swap_in(candidate, segment, file).await?;
            outcome.cleaned_segments += 1;
            outcome.bytes_before += before;
            outcome.bytes_after += after;
            outcome.records_removed += removed;
        }
        tracing::info!(
            dir = %self.dir.display(),
            segments = outcome.cleaned_segments,
            bytes_before = outcome.bytes_before,
            bytes_after = outcome.bytes_after,
            records_removed = outcome.records_removed,
            first_dirty_offset = outcome.first_dirty_offset,
            "cleaned log"
        );
        Ok(Some(outcome))
    }

    /// Writes the cleaned form of one segment to `<base>.log.cleaned` (in 1 MiB writes, so memory
    /// stays bounded by the largest batch) and returns it with the number of records removed
    /// (`None`, and no file, if nothing in it would change), and whether it keeps a tombstone.
    async fn rewrite_segment(
        &self,
        candidate: &Candidate,
        rules: &RetainRules<'_>,
        drop_tombstones: bool,
        pacer: &mut Pacer,
        config: &super::config::LogConfig,
    ) -> Result<(Option<(Segment, SegmentFile, u64)>, bool), CleanError> {
        let RetainRules {
            map,
            map_end,
            producer_last,
        } = *rules;
        let mut out = CleanedWriter::create(self, candidate, config).await?;
        let mut removed = 0u64;
        let mut kept_tombstones = false;
        // The pending run of emptied batches: (first offset, last offset, base ts, max ts, attributes).
        let mut run: Option<(i64, i64, i64, i64, u16)> = None;
        let file = candidate.file.open(&self.disk).await?;
        let mut reader = BatchReader::new(&self.disk, &file, candidate.size_bytes);
        while let Some((_, batch)) = reader.next().await? {
            pacer.account(batch.len()).await;
            let base = i64_at(&batch, 0);
            let last = base + i64::from(i32_at(&batch, LAST_OFFSET_DELTA_AT));
            let attributes = u16_at(&batch, ATTRIBUTES_AT);
            let bad = |reason: String| CleanError::BadBatch {
                path: candidate.file.path().to_path_buf(),
                offset: base,
                reason,
            };
            let keep_whole = |out: &mut CleanedWriter,
                              run: &mut Option<(i64, i64, i64, i64, u16)>,
                              bytes: &[u8]| {
                if let Some((first, last, base_ts, max_ts, attributes)) = run.take() {
                    out.push(&filler_batch(first, last, base_ts, max_ts, attributes));
                }
                out.push(bytes);
            };
            out.write_if_full(&self.disk, pacer).await?;
            if attributes & CONTROL_FLAG != 0 || base >= map_end {
                keep_whole(&mut out, &mut run, &batch);
                continue;
            }
            let bytes = batch_records(&batch).map_err(bad)?;
            let records = parse_records(&bytes, base, i32_at(&batch, COUNT_AT)).map_err(bad)?;
            let total = records.len();
            let kept: Vec<&RecordView<'_>> = records
                .iter()
                .filter(|record| {
                    let Some(key) = record.key else {
                        return true; // never lose a record the map cannot judge
                    };
                    if record.offset >= map_end {
                        return true;
                    }
                    if map.get(key).is_some_and(|latest| *latest > record.offset) {
                        return false;
                    }
                    !(record.tombstone && drop_tombstones)
                })
                .collect();
            removed += (total - kept.len()) as u64;
            kept_tombstones |= kept.iter().any(|record| record.tombstone);
            if kept.len() == total {
                keep_whole(&mut out, &mut run, &batch);
            } else if !kept.is_empty() {
                let mut records_bytes = Vec::with_capacity(bytes.len());
                for record in &kept {
                    records_bytes.extend_from_slice(record.raw);
                }
                let codec = attributes & CODEC_MASK;
                let rebuilt =
                    rebuild_batch(&batch, codec, kept.len() as i32, &records_bytes).map_err(bad)?;
                keep_whole(&mut out, &mut run, &rebuilt);
            } else if i64_at(&batch, PRODUCER_ID_AT) >= 0 && producer_last.contains(&last) {
                // A batch the producer state remembers: kept empty so the state survives a rebuild.
                let empty = rebuild_batch(&batch, 0, 0, &[]).map_err(bad)?;
                keep_whole(&mut out, &mut run, &empty);
            } else {
                let base_ts = i64_at(&batch, BASE_TIMESTAMP_AT);
                let max_ts = i64_at(&batch, MAX_TIMESTAMP_AT);
                run = Some(match run {
                    Some((first, _, first_ts, run_max, run_attributes)) => {
                        (first, last, first_ts, run_max.max(max_ts), run_attributes)
                    }
                    None => (base, last, base_ts, max_ts, attributes),
                });
            }
        }
        if let Some((first, last, base_ts, max_ts, attributes)) = run.take() {
            out.push(&filler_batch(first, last, base_ts, max_ts, attributes));
        }
        if removed == 0 {
            drop(out);
            let path = cleaned_path(&self.dir, candidate.base, "log.cleaned");
            self.disk
                .remove_file(&path)
                .await
                .map_err(|source| StorageError::io("remove_file", &path, source))?;
            return Ok((None, kept_tombstones));
        }
        out.write(&self.disk, pacer).await?;
        Ok((Some((out.segment, out.file, removed)), kept_tombstones))
    }

    /// Writes the cleaned segment next to the old one and swaps it in (see the module comment).
    /// Returns the old and new sizes.
    async fn swap_in(
        &self,
        candidate: &Candidate,
        mut segment: Segment,
        file: SegmentFile,
    ) -> Result<(u64, u64), CleanError> {
        let dir = self.dir.clone();
        let base = candidate.base;
        let log_cleaned = cleaned_path(&dir, base, "log.cleaned");
        let index_cleaned = cleaned_path(&dir, base, "index.cleaned");
        let time_cleaned = cleaned_path(&dir, base, "timeindex.cleaned");
        let io = |op: &'static str, path: &Path| {
            let path = path.to_path_buf();
            move |source| CleanError::Storage(StorageError::io(op, path, source))
        };
        segment.seal_time_index();
        segment.next_offset = candidate.next_offset;
        segment.first_append_ms = candidate.first_append_ms;
        segment.last_write_ms = candidate.last_write_ms;
        let after = segment.size_bytes;
        self.disk
            .sync_data(file.file())
            .await
            .map_err(io("fdatasync", &log_cleaned))?;
        // Keep the old segment's modification time: recovery takes a closed segment's last write
        // time from it (retention of timestamp-less data, the tombstone horizon).
        set_mtime_ms(file.file().as_raw_fd(), candidate.last_write_ms);
        let index_bytes = segment.index.unpersisted_offset_bytes();
        let time_bytes = segment.index.unpersisted_time_bytes();
        for (path, contents) in [(&index_cleaned, index_bytes), (&time_cleaned, time_bytes)] {
            let file = self
                .disk
                .open_rw(path, true)
                .await
                .map_err(io("open", path))?;
            self.disk
                .set_len(&file, 0)
                .await
                .map_err(io("truncate", path))?;
            if !contents.is_empty() {
                self.disk
                    .write_all_at(&file, contents, 0)
                    .await
                    .map_err(io("write", path))?;
            }
            self.disk
                .sync_data(&file)
                .await
                .map_err(io("fdatasync", path))?;
        }
        segment.index.persisted_offsets = segment.index.offsets.len();
        segment.index.persisted_times = segment.index.times.len();
        segment.index.files_stale = false;

        // The swap itself, under the turn, only if the segment is still the one that was cleaned.
        let _turn = self.enter_turn().await;
        let still_there = {
            let state = self.state.borrow();
            self.usable(&state).is_ok()
                && state.segments.get(&base).is_some_and(|current| {
                    current.size_bytes == candidate.size_bytes
                        && current.log.same(&candidate.file)
                        && current.next_offset == candidate.next_offset
                })
        };
        if !still_there {
            for path in [&log_cleaned, &index_cleaned, &time_cleaned] {
                let _ = self.disk.remove_file(path).await;
            }
            return Err(CleanError::Interrupted);
        }
        let disk = self.disk.clone();
        let swap_dir = dir.clone();
        self.detached(async move { swap_files(&disk, &swap_dir, base).await })
            .await?;
        let before = {
            let mut state = self.state.borrow_mut();
            let old = state.segments.insert(base, segment);
            old.map_or(0, |old| old.size_bytes)
        };
        Ok((before, after))
    }
}

/// Renames a written `.cleaned` set into place: indexes to `.swap`, the log to `.log.swap` (commit),
/// directory fsync, then every `.swap` over its final name, directory fsync.
async fn swap_files(disk: &Disk, dir: &Path, base: i64) -> Result<(), StorageError> {
    let rename = |from: PathBuf, to: PathBuf| async move {
        disk.rename(&from, &to)
            .await
            .map_err(|source| StorageError::io("rename", &from, source))
    };
    let sync = || async {
        disk.sync_dir(dir)
            .await
            .map_err(|source| StorageError::io("fsync", dir, source))
    };
    for kind in ["index", "timeindex", "log"] {
        rename(
            cleaned_path(dir, base, &format!("{kind}.cleaned")),
            cleaned_path(dir, base, &format!("{kind}.swap")),
        )
        .await?;
    }
    sync().await?;
    finish_swap(disk, dir, base).await
}

/// Moves a committed swap (`B.log.swap` exists) into place: index swaps first, the log last.
async fn finish_swap(disk: &Disk, dir: &Path, base: i64) -> Result<(), StorageError> {
    for kind in ["index", "timeindex", "log"] {
        let from = cleaned_path(dir, base, &format!("{kind}.swap"));
        let to = cleaned_path(dir, base, kind);
        match disk.rename(&from, &to).await {
            Ok(()) => {}
            // An index swap already moved by an earlier, interrupted completion.
            Err(error) if error.kind() == std::io::ErrorKind::NotFound && kind != "log" => {}
            Err(source) => return Err(StorageError::io("rename", &from, source)),
        }
    }
    disk.sync_dir(dir)
        .await
        .map_err(|source| StorageError::io("fsync", dir, source))
}

/// Called at open, before recovery lists the directory: completes every committed swap (a
/// `<base>.log.swap` exists) and removes uncommitted `.cleaned` files and index swaps without a log
/// swap, so the log is either the old segment or the cleaned one.
pub(crate) async fn complete_interrupted_swaps(
    disk: &Disk,
    dir: &Path,
) -> Result<(), StorageError> {
    let entries = disk
        .list_dir(dir)
        .map_err(|source| StorageError::io("read_dir", dir, source))?;
    let committed: Vec<i64> = entries
        .iter()
        .filter_map(|(name, _)| name.strip_suffix(".swap"))
        .filter_map(|stem| super::segment::parse_segment_name(stem, "log"))
        .collect();
    for &base in &committed {
        tracing::warn!(dir = %dir.display(), base_offset = base, "completing an interrupted cleaner swap");
        finish_swap(disk, dir, base).await?;
    }
    let mut removed = false;
    for (name, is_dir) in &entries {
        if *is_dir {
            continue;
        }
        let stale_swap = name.ends_with(".swap")
            && ["index", "timeindex"].iter().any(|kind| {
                name.strip_suffix(".swap")
                    .and_then(|stem| super::segment::parse_segment_name(stem, kind))
                    .is_some_and(|base| !committed.contains(&base))
            });
        if name.ends_with(".cleaned") || stale_swap {
            let path = dir.join(name);
            disk.remove_file(&path)
                .await
                .map_err(|source| StorageError::io("remove_file", &path, source))?;
            removed = true;
        }
    }
    if removed {
        disk.sync_dir(dir)
            .await
            .map_err(|source| StorageError::io("fsync", dir, source))?;
    }
    Ok(())
}

/// Sets a file's modification time (best effort: a failure only makes the file look newer).
fn set_mtime_ms(fd: std::os::fd::RawFd, ms: i64) {
    let time = libc::timespec {
        tv_sec: ms.div_euclid(1000) as libc::time_t,
        tv_nsec: (ms.rem_euclid(1000) * 1_000_000) as libc::c_long,
    };
    let times = [
        libc::timespec {
            tv_sec: 0,
            tv_nsec: libc::UTIME_OMIT,
        },
        time,
    ];
    // SAFETY: `fd` is an open descriptor owned by the caller for the duration of the call, and
    // `times` points to two valid timespecs as futimens requires.
    unsafe {
        libc::futimens(fd, times.as_ptr());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn filler_batches_are_valid_empty_batches() {
        let filler = filler_batch(10, 19, 1_000, 2_000, 0);
        let header = BatchHeader::parse_prefix(&filler).unwrap();
        assert_eq!((header.base_offset, header.last_offset()), (10, 19));
        assert_eq!(header.size_bytes, BATCH_HEADER_BYTES as u64);
        assert_eq!(
            crc32c::crc32c(&filler[ATTRIBUTES_AT..]),
            u32::from_be_bytes(filler[CRC_AT..CRC_AT + 4].try_into().unwrap())
        );
    }

    #[test]
    fn every_codec_round_trips() {
        let data: Vec<u8> = (0..10_000u32)
            .flat_map(|i| (i % 251).to_be_bytes())
            .collect();
        for codec in 0..=4 {
            let packed = compress(codec, &data).unwrap();
            assert_eq!(decompress(codec, &packed).unwrap(), data, "codec {codec}");
        }
        assert!(decompress(5, &data).is_err());
    }
}
