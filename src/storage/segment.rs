//! storage::segment: one segment of a partition log (`.log` + `.index` + `.timeindex`), the shared
//! file handle that keeps a segment readable while a fetch splices from it, and the batch scanner that
//! recovery uses to verify a segment's bytes.

use std::fmt;
use std::os::fd::{AsRawFd, RawFd};
use std::path::{Path, PathBuf};
use std::rc::Rc;

use compio::fs::File;

use super::batch::{self, BATCH_HEADER_BYTES, BatchHeader, CRC_COVERED_FROM, HEADER_PREFIX_BYTES};
use super::descriptors::SegmentHandle;
use super::disk::Disk;
use super::error::StorageError;
use super::index::{OffsetEntry, SegmentIndex, TimeEntry};

/// Largest read the scanner issues at once while verifying a segment.
const SCAN_CHUNK_BYTES: usize = 1 << 20;

/// The file name stem of a segment: its base offset, zero-padded to 20 digits (Kafka's
/// `LogFileUtils.filenamePrefixFromOffset`).
pub fn segment_stem(base_offset: i64) -> String {
    format!("{base_offset:020}")
}

/// Parses `<20 digits>.<suffix>` into the base offset, for the given suffix.
pub fn parse_segment_name(name: &str, suffix: &str) -> Option<i64> {
    let stem = name.strip_suffix(suffix)?.strip_suffix('.')?;
    if stem.len() != 20 || !stem.bytes().all(|byte| byte.is_ascii_digit()) {
        return None;
    }
    stem.parse().ok()
}

struct SegmentFileInner {
    file: File,
    path: PathBuf,
    base_offset: i64,
}

/// An open `.log` file. Clones share one descriptor, which stays open until the last clone is dropped:
/// retention may unlink the file while a fetch still splices from it, and the splice keeps working.
#[derive(Clone)]
pub struct SegmentFile {
    inner: Rc<SegmentFileInner>,
}

impl SegmentFile {
    pub(crate) fn new(file: File, path: PathBuf, base_offset: i64) -> SegmentFile {
        SegmentFile {
            inner: Rc::new(SegmentFileInner {
                file,
                path,
                base_offset,
            }),
        }
    }

    /// The compio file, for positional reads or splice.
    pub fn file(&self) -> &File {
        &self.inner.file
    }

    /// Where the file was when it was opened (it may have been deleted by retention since).
    pub fn path(&self) -> &Path {
        &self.inner.path
    }

    /// The base offset of the segment this file belongs to.
    pub fn base_offset(&self) -> i64 {
        self.inner.base_offset
    }
}

impl AsRawFd for SegmentFile {
    fn as_raw_fd(&self) -> RawFd {
        self.inner.file.as_raw_fd()
    }
}

impl fmt::Debug for SegmentFile {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter
            .debug_struct("SegmentFile")
            .field("path", &self.inner.path)
            .field("fd", &self.as_raw_fd())
            .finish()
    }
}

/// One segment as the log keeps it in memory.
#[derive(Debug)]
pub(crate) struct Segment {
    pub base_offset: i64,
    /// The `.log` by name; its descriptor comes from the shard's descriptor cache when needed.
    pub log: SegmentHandle,
    pub index_path: PathBuf,
    pub time_index_path: PathBuf,
    /// Bytes of whole, accepted batches. The file may be longer only after an interrupted write, which
    /// the next append or close truncates away.
    pub size_bytes: u64,
    /// One past the last offset stored (the segment's own log end).
    pub next_offset: i64,
    pub index: SegmentIndex,
    pub bytes_since_index_entry: u64,
    /// Largest batch max-timestamp seen, -1 when no batch carried one.
    pub max_timestamp: i64,
    pub offset_of_max_timestamp: i64,
    /// The first batch's max timestamp: the roll-by-age rule compares incoming record timestamps with
    /// it, as Kafka's `rollingBasedTimestamp` does.
    pub first_batch_timestamp: Option<i64>,
    /// Wall clock of the first append (after a restart: the file's modification time); the roll-by-age
    /// rule falls back to it when batches carry no timestamps, and `tick` uses it.
    pub first_append_ms: Option<i64>,
    /// When data was last written, for retention of segments whose batches carry no timestamps.
    pub last_write_ms: i64,
}

impl Segment {
    pub(crate) fn new(dir: &Path, base_offset: i64, log: SegmentHandle, now_ms: i64) -> Segment {
        let stem = segment_stem(base_offset);
        Segment {
            base_offset,
            log,
            index_path: dir.join(format!("{stem}.index")),
            time_index_path: dir.join(format!("{stem}.timeindex")),
            size_bytes: 0,
            next_offset: base_offset,
            index: SegmentIndex::default(),
            bytes_since_index_entry: 0,
            max_timestamp: -1,
            offset_of_max_timestamp: base_offset,
            first_batch_timestamp: None,
            first_append_ms: None,
            last_write_ms: now_ms,
        }
    }

    pub(crate) fn relative(&self, offset: i64) -> u32 {
        (offset - self.base_offset).clamp(0, i64::from(u32::MAX)) as u32
    }

    /// Accounts one stored batch: size, offsets, timestamps and, every `index_interval_bytes`, an index
    /// entry mapping the batch's last offset to its start (Kafka's `LogSegment.append` rule).
    pub(crate) fn note_batch(
        &mut self,
        position: u64,
        size_bytes: u64,
        last_offset: i64,
        max_timestamp: i64,
        index_interval_bytes: u32,
        index_limits: (usize, usize),
    ) {
        if max_timestamp > self.max_timestamp {
            self.max_timestamp = max_timestamp;
            self.offset_of_max_timestamp = last_offset;
        }
        if self.size_bytes == 0 && position == 0 && max_timestamp >= 0 {
            self.first_batch_timestamp = Some(max_timestamp);
        }
        if self.bytes_since_index_entry > u64::from(index_interval_bytes)
            && position <= u64::from(u32::MAX)
        {
            if self.index.offsets.len() < index_limits.0 {
                self.index.push_offset(OffsetEntry {
                    relative_offset: self.relative(last_offset),
                    position: position as u32,
                });
            }
            if self.max_timestamp >= 0 && self.index.times.len() < index_limits.1 {
                self.index.push_time(TimeEntry {
                    timestamp: self.max_timestamp,
                    relative_offset: self.relative(self.offset_of_max_timestamp),
                });
            }
            self.bytes_since_index_entry = 0;
        }
        self.bytes_since_index_entry += size_bytes;
        self.size_bytes = position + size_bytes;
        self.next_offset = last_offset + 1;
    }

    /// Adds the final time-index entry a segment gets when it stops being active, so the last entry
    /// always carries the segment's largest timestamp (retention and timestamp lookup rely on it).
    pub(crate) fn seal_time_index(&mut self) {
        if self.max_timestamp >= 0 {
            let relative_offset = self.relative(self.offset_of_max_timestamp);
            self.index.push_time(TimeEntry {
                timestamp: self.max_timestamp,
                relative_offset,
            });
        }
    }

    /// Whether the next append must go to a new segment because an index has no room left.
    pub(crate) fn index_full(&self, limits: (usize, usize)) -> bool {
        self.index.offsets.len() >= limits.0 || self.index.times.len() >= limits.1
    }
}

/// Why a scan of a segment stopped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum ScanEnd {
    /// Every byte up to the end of the file is a valid batch.
    Clean,
    /// The bytes from `position` on are not a valid batch: a torn write or corruption.
    Invalid { position: u64, reason: String },
}

/// Reads a segment's batches from `from_position` to `file_len`, verifying each one's framing, CRC and
/// offset continuity, and feeding valid ones into the segment's accounting and index. Stops at the
/// first invalid byte.
pub(crate) async fn scan_segment(
    disk: &Disk,
    segment: &mut Segment,
    from_position: u64,
    anchor_last_offset: Option<i64>,
    file_len: u64,
    index_interval_bytes: u32,
    index_limits: (usize, usize),
) -> Result<ScanEnd, StorageError> {
    let file = segment.log.open(disk).await?;
    let path = file.path().to_path_buf();
    let mut window = Window::default();
    let mut position = from_position;
    // Bounded: every round either advances `position` by a whole batch (at least 61 bytes) or returns.
    loop {
        if position == file_len {
            return Ok(ScanEnd::Clean);
        }
        let invalid = move |reason: String| -> Result<ScanEnd, StorageError> {
            Ok(ScanEnd::Invalid { position, reason })
        };
        if file_len - position < BATCH_HEADER_BYTES as u64 {
            return invalid(format!(
                "{} trailing bytes, less than a batch header",
                file_len - position
            ));
        }
        let header_bytes = window
            .slice(disk, &file, position, BATCH_HEADER_BYTES, file_len)
            .await
            .map_err(|source| StorageError::io("read", &path, source))?;
        let Some(header_bytes) = header_bytes else {
            return invalid("file shorter than its size".into());
        };
        let parsed = BatchHeader::parse_prefix(&header_bytes[..HEADER_PREFIX_BYTES]);
        let max_timestamp = batch::max_timestamp(header_bytes);
        let stored_crc = batch::stored_crc(header_bytes);
        let Some(header) = parsed else {
            return invalid("not a v2 batch header".into());
        };
        if position + header.size_bytes > file_len {
            return invalid(format!(
                "batch of {} bytes runs past the end of the file",
                header.size_bytes
            ));
        }
        // A scan that starts mid-segment (at an index entry) knows the first batch's last offset; from
        // then on every batch must start where the previous one ended.
        let anchored = position == from_position && from_position > 0;
        if anchored {
            let expected = anchor_last_offset.unwrap_or(-1);
            if header.last_offset() != expected || header.base_offset < segment.base_offset {
                return invalid(format!(
                    "batch ends at offset {} where the index says {expected}",
                    header.last_offset()
                ));
            }
        } else if header.base_offset != segment.next_offset {
            return invalid(format!(
                "batch base offset {} where {} was expected",
                header.base_offset, segment.next_offset
            ));
        }
        let mut crc = 0u32;
        let mut at = position + CRC_COVERED_FROM as u64;
        let end = position + header.size_bytes;
        while at < end {
            let length = ((end - at) as usize).min(SCAN_CHUNK_BYTES);
            let bytes = window
                .slice(disk, &file, at, length, file_len)
                .await
                .map_err(|source| StorageError::io("read", &path, source))?;
            let Some(bytes) = bytes else {
                return invalid("file shorter than its size".into());
            };
            crc = crc32c::crc32c_append(crc, bytes);
            at += length as u64;
        }
        if crc != stored_crc {
            return invalid(format!(
                "CRC mismatch: stored {stored_crc:#010x}, computed {crc:#010x}"
            ));
        }
        segment.note_batch(
            position,
            header.size_bytes,
            header.last_offset(),
            max_timestamp,
            index_interval_bytes,
            index_limits,
        );
        position = end;
    }
}

/// A read-ahead buffer over a file, so a scan issues large reads instead of one per header.
#[derive(Default)]
struct Window {
    start: u64,
    bytes: Vec<u8>,
}

impl Window {
    /// The `length` bytes at `position`, reading ahead up to `SCAN_CHUNK_BYTES`; `None` if the file
    /// ends first.
    async fn slice(
        &mut self,
        disk: &Disk,
        file: &SegmentFile,
        position: u64,
        length: usize,
        file_len: u64,
    ) -> std::io::Result<Option<&[u8]>> {
        let inside = position >= self.start
            && position + length as u64 <= self.start + self.bytes.len() as u64;
        if !inside {
            let want = (length.max(SCAN_CHUNK_BYTES) as u64).min(file_len.saturating_sub(position))
                as usize;
            self.bytes = disk.read_at(file.file(), want, position).await?;
            self.start = position;
            if self.bytes.len() < length {
                return Ok(None);
            }
        }
        let from = (position - self.start) as usize;
        Ok(Some(&self.bytes[from..from + length]))
    }
}
