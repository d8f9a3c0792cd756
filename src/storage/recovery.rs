//! storage::recovery: opening a partition log. After a clean shutdown the indexes are trusted and only
//! the last index interval of the active segment is re-verified; after an unclean stop every batch from
//! the recovery checkpoint on is re-read and CRC-checked, a torn or corrupt tail is truncated (logged
//! with its offset and byte position), later segments are deleted, and damaged indexes are rebuilt.
//! Recovery time therefore follows the data written since the last checkpoint, not the log's size.

use std::cell::RefCell;
use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::time::{SystemTime, UNIX_EPOCH};

use super::batch::{self, BATCH_HEADER_BYTES};
use super::config::LogConfig;
use super::dirs::{CLEAN_SHUTDOWN_FILE, Checkpoint, RECOVERY_CHECKPOINT_FILE};
use super::disk::Disk;
use super::error::StorageError;
use super::index::{self, OFFSET_ENTRY_BYTES, SegmentIndex, TIME_ENTRY_BYTES};
use super::log::{LogPosition, LogState, PartitionLog};
use super::producer_state::{ProducerStateMap, snapshot_file_name};
use super::segment::{ScanEnd, Segment, SegmentFile, parse_segment_name, scan_segment};
use super::waiters::{Turnstile, Waiters};

pub(super) fn wall_clock_ms(time: SystemTime) -> i64 {
    time.duration_since(UNIX_EPOCH)
        .map(|elapsed| elapsed.as_millis() as i64)
        .unwrap_or(0)
}

/// How much of a segment's on-disk state recovery may believe without re-reading it.
enum Trust {
    /// Indexes and size as they are (a segment below the checkpoint, or any closed segment after a
    /// clean shutdown).
    Whole,
    /// Index entries below this byte position; everything after is re-verified.
    UpTo(u64),
    /// Nothing: rebuild the indexes from a full scan.
    Nothing,
}

impl PartitionLog {
    /// Opens the log in `dir` with all file IO through `disk` (tests pass one with injected faults).
    pub async fn open_with_disk(
        dir: &Path,
        config: LogConfig,
        disk: Disk,
    ) -> Result<PartitionLog, StorageError> {
        config.validate().map_err(StorageError::InvalidConfig)?;
        disk.create_dir_all(dir)
            .await
            .map_err(|source| StorageError::io("create_dir_all", dir, source))?;
        super::cleaner::complete_interrupted_swaps(&disk, dir).await?;
        let now_ms = wall_clock_ms(SystemTime::now());
        let entries = disk
            .list_dir(dir)
            .map_err(|source| StorageError::io("read_dir", dir, source))?;
        let mut bases = BTreeSet::new();
        let mut index_files = Vec::new();
        let mut clean = false;
        let mut snapshot_offsets = Vec::new();
        for (name, is_dir) in &entries {
            if *is_dir {
                continue;
            }
            if let Some(base) = parse_segment_name(name, "log") {
                bases.insert(base);
            } else if let Some(base) =
                parse_segment_name(name, "index").or_else(|| parse_segment_name(name, "timeindex"))
            {
                index_files.push((base, name.clone()));
            } else if let Some(offset) = parse_segment_name(name, "snapshot") {
                snapshot_offsets.push(offset);
            } else if name == CLEAN_SHUTDOWN_FILE {
                clean = true;
            } else if name.ends_with(".tmp")
                || name.ends_with(".deleted")
                || name.ends_with(".swap")
            {
                // Half-written checkpoint or marker files, or Kafka's work-in-progress suffixes.
                let path = dir.join(name);
                disk.remove_file(&path)
                    .await
                    .map_err(|source| StorageError::io("remove_file", &path, source))?;
            }
        }
        for (base, name) in index_files {
            if !bases.contains(&base) {
                let path = dir.join(&name);
                disk.remove_file(&path)
                    .await
                    .map_err(|source| StorageError::io("remove_file", &path, source))?;
            }
        }
        let checkpoint_path = dir.join(RECOVERY_CHECKPOINT_FILE);
        let checkpoint = match disk.read_small_file(&checkpoint_path, 256).await {
            Ok(Some(bytes)) => {
                let decoded = Checkpoint::decode(&bytes);
                if decoded.is_none() {
                    tracing::warn!(path = %checkpoint_path.display(), "ignoring malformed recovery checkpoint");
                }
                decoded
            }
            Ok(None) => None,
            Err(source) => return Err(StorageError::io("read", &checkpoint_path, source)),
        };

        let start = LogPosition {
            offset: 0,
            segment_base: 0,
            position: 0,
        };
        let log = PartitionLog {
            dir: dir.to_path_buf(),
            disk: disk.clone(),
            state: RefCell::new(LogState {
                config: config.clone(),
                segments: BTreeMap::new(),
                log_start_offset: 0,
                log_end_offset: 0,
                high_watermark: start,
                durable: start,
                unflushed_records: 0,
                first_unflushed_ms: None,
                flush_in_flight: false,
                unsynced_closed: Vec::new(),
                checkpoint,
                last_checkpoint_ms: now_ms,
                tail_dirty: false,
                failed: None,
                closed: false,
                producers: ProducerStateMap::default(),
                snapshot_offsets: Vec::new(),
                last_snapshot_ms: now_ms,
            }),
            turn: Turnstile::default(),
            flush_done: Waiters::default(),
            high_watermark_moved: Waiters::default(),
            in_flight: RefCell::new(None),
        };

        let bases: Vec<i64> = bases.into_iter().collect();
        let mut segments = BTreeMap::new();
        let mut truncated = false;
        let mut scanned_any = false;
        for (position_in_list, &base) in bases.iter().enumerate() {
            let is_last = position_in_list + 1 == bases.len();
            let log_path = dir.join(format!("{}.log", super::segment::segment_stem(base)));
            if truncated {
                // Kafka's rule: once a tail was cut, nothing after it can be trusted.
                tracing::warn!(path = %log_path.display(), "deleting segment after a truncated tail");
                remove_segment_files(&disk, dir, base).await?;
                continue;
            }
            let file = disk
                .open_rw(&log_path, false)
                .await
                .map_err(|source| StorageError::io("open", &log_path, source))?;
            let metadata = file
                .metadata()
                .await
                .map_err(|source| StorageError::io("stat", &log_path, source))?;
            let file_len = metadata.len();
            let modified_ms = metadata.modified().map(wall_clock_ms).unwrap_or(now_ms);
            let mut segment = Segment::new(
                dir,
                base,
                SegmentFile::new(file, log_path.clone(), base),
                modified_ms,
            );
            let previous_end = segments
                .values()
                .next_back()
                .map(|previous: &Segment| previous.next_offset);

            let trust = if clean {
                if is_last {
                    Trust::UpTo(file_len)
                } else {
                    Trust::Whole
                }
            } else {
                match checkpoint {
                    Some(checkpoint) if base < checkpoint.segment_base && !is_last => Trust::Whole,
                    Some(checkpoint) if base == checkpoint.segment_base => {
                        Trust::UpTo(checkpoint.position.min(file_len))
                    }
                    _ => Trust::Nothing,
                }
            };
            let next_base = bases.get(position_in_list + 1).copied();
            if let (Trust::Whole, Some(next_base)) = (&trust, next_base)
                && load_indexes(
                    &disk,
                    &mut segment,
                    file_len,
                    u64::MAX,
                    u64::from(config.segment_index_bytes),
                )
                .await?
            {
                segment.size_bytes = file_len;
                segment.next_offset = next_base;
                if let Some(last) = segment.index.times.last() {
                    segment.max_timestamp = last.timestamp;
                    segment.offset_of_max_timestamp = base + i64::from(last.relative_offset);
                }
                segments.insert(base, segment);
                continue;
            }
            if previous_end.is_some_and(|end| end != base) {
                tracing::warn!(
                    path = %log_path.display(),
                    expected_base = previous_end.unwrap_or(-1),
                    "segment does not start where the previous one ends; deleting it and later segments"
                );
                drop(segment);
                remove_segment_files(&disk, dir, base).await?;
                truncated = true;
                continue;
            }
            scanned_any |= !(clean && matches!(trust, Trust::UpTo(_)));
            let ended = recover_segment(&log, &mut segment, &trust, file_len).await?;
            if let ScanEnd::Invalid { position, reason } = ended {
                tracing::warn!(
                    path = %log_path.display(),
                    offset = segment.next_offset,
                    position,
                    %reason,
                    "truncating torn or corrupt log tail"
                );
                disk.set_len(segment.log.file(), position)
                    .await
                    .map_err(|source| StorageError::io("truncate", &log_path, source))?;
                truncated = true;
                scanned_any = true;
            }
            if is_last || truncated {
                read_roll_base(&disk, &mut segment, modified_ms).await?;
            }
            segments.insert(base, segment);
        }

        if segments.is_empty() {
            let base = checkpoint.map_or(0, |checkpoint| checkpoint.offset);
            let segment = log.create_segment(base, now_ms).await?;
            segments.insert(base, segment);
        }
        {
            let mut state = log.state.borrow_mut();
            state.segments = segments;
            state.log_start_offset = *state.segments.keys().next().unwrap_or(&0);
            state.log_end_offset = state.active().next_offset;
            let end = state.end_position();
            state.durable = end;
            state.high_watermark = end;
        }

        if !clean || scanned_any {
            // Whatever survived in the page cache is made durable now, so the durable offset (and with it
            // the high watermark) can start at the log end; then indexes and checkpoint are brought up to
            // date so the next unclean start has little to scan.
            // Closed segments from the checkpoint on may hold data a crashed process never synced.
            let (unsynced, bases_now) = {
                let state = log.state.borrow();
                let from = checkpoint.map_or(i64::MIN, |checkpoint| checkpoint.segment_base);
                (
                    state
                        .segments
                        .values()
                        .filter(|segment| segment.base_offset >= from || clean)
                        .map(|segment| segment.log.clone())
                        .collect::<Vec<_>>(),
                    state.segments.keys().copied().collect::<Vec<_>>(),
                )
            };
            for file in unsynced {
                disk.sync_data(file.file())
                    .await
                    .map_err(|source| StorageError::io("fdatasync", file.path(), source))?;
            }
            for base in bases_now {
                log.persist_indexes(base).await?;
            }
            let end = log.state.borrow().end_position();
            log.write_checkpoint(Checkpoint {
                offset: end.offset,
                segment_base: end.segment_base,
                position: end.position,
            })
            .await?;
        }
        log.restore_log_start_offset().await?;
        log.load_producer_state(snapshot_offsets, now_ms).await?;
        if clean {
            // The marker must be gone for good before the first append: if it came back after a crash,
            // the next open would trust a torn tail.
            let marker = dir.join(CLEAN_SHUTDOWN_FILE);
            disk.remove_file(&marker)
                .await
                .map_err(|source| StorageError::io("remove_file", &marker, source))?;
            disk.sync_dir(dir)
                .await
                .map_err(|source| StorageError::io("fsync", dir, source))?;
        }
        {
            let state = log.state.borrow();
            tracing::info!(
                dir = %dir.display(),
                clean,
                segments = state.segments.len(),
                log_start_offset = state.log_start_offset,
                log_end_offset = state.log_end_offset,
                "opened partition log"
            );
        }
        Ok(log)
    }
}

/// The largest snapshot file read at open; a larger one is treated as damaged. At about 180 bytes
/// per producer this is room for over 300,000 producers in one partition.
const SNAPSHOT_MAX_BYTES: usize = 64 << 20;

/// How much log the producer-state rebuild reads at a time while walking batch headers.
const REBUILD_WINDOW_BYTES: usize = 64 * 1024;

impl PartitionLog {
    /// Restores the idempotent-producer state: the newest snapshot that is valid and not above the
    /// (recovered) log end, then every batch header from its offset to the log end. Snapshots above
    /// the log end describe data a crash took away and are deleted; a damaged one is deleted with a
    /// warning and the next older one tried; without any, the rebuild starts at the log start.
    /// Runs after every open, clean or not, so the state is exact (after a clean close the newest
    /// snapshot sits at the log end and nothing is scanned).
    pub(crate) async fn load_producer_state(
        &self,
        mut snapshot_offsets: Vec<i64>,
        now_ms: i64,
    ) -> Result<(), StorageError> {
        snapshot_offsets.sort_unstable();
        let (log_start, log_end) = {
            let state = self.state.borrow();
            (state.log_start_offset, state.log_end_offset)
        };
        let mut doomed = Vec::new();
        while snapshot_offsets
            .last()
            .is_some_and(|&offset| offset > log_end)
        {
            doomed.extend(snapshot_offsets.pop());
        }
        let mut loaded = None;
        // Bounded by the number of snapshot files; each round drops one candidate or stops.
        while let Some(&offset) = snapshot_offsets.last() {
            let path = self.dir.join(snapshot_file_name(offset));
            let decoded = match self
                .disk
                .read_small_file(&path, SNAPSHOT_MAX_BYTES + 1)
                .await
            {
                Ok(Some(bytes)) if bytes.len() <= SNAPSHOT_MAX_BYTES => {
                    ProducerStateMap::decode_snapshot(&bytes).and_then(|(at, producers)| {
                        if at == offset {
                            Ok(producers)
                        } else {
                            Err(format!("holds offset {at}, not the {offset} of its name"))
                        }
                    })
                }
                Ok(Some(_)) => Err(format!("larger than {SNAPSHOT_MAX_BYTES} bytes")),
                Ok(None) => Err("vanished".to_string()),
                Err(error) => Err(format!("unreadable: {error}")),
            };
            let producers = match decoded {
                Ok(producers) => producers,
                Err(reason) => {
                    tracing::warn!(path = %path.display(), %reason, "ignoring damaged producer-state snapshot");
                    doomed.extend(snapshot_offsets.pop());
                    continue;
                }
            };
            let mut producers = producers;
            if self
                .replay_producer_batches(offset.max(log_start), &mut producers, now_ms)
                .await?
            {
                loaded = Some((offset, producers));
                break;
            }
            tracing::warn!(path = %path.display(), "producer-state snapshot does not fall on a batch boundary; ignoring it");
            doomed.extend(snapshot_offsets.pop());
        }
        let (scanned_from, mut producers) = match loaded {
            Some(found) => found,
            None => {
                let mut producers = ProducerStateMap::default();
                // From the log start every batch starts at or after the offset scanned from.
                self.replay_producer_batches(log_start, &mut producers, now_ms)
                    .await?;
                (log_start, producers)
            }
        };
        let expiration_ms = self.state.borrow().config.producer_id_expiration_ms;
        producers.expire(now_ms, expiration_ms);
        tracing::debug!(dir = %self.dir.display(), producers = producers.len(), scanned_from,
            log_end, "restored producer state");
        {
            let mut state = self.state.borrow_mut();
            state.producers = producers;
            state.snapshot_offsets = snapshot_offsets;
        }
        self.remove_snapshots(doomed).await;
        if scanned_from != log_end {
            // Make the next open cheap: the state as of the log end, now.
            self.write_snapshot_locked(now_ms).await;
        }
        Ok(())
    }

    /// Applies the producer fields of every batch from `from` to the log end to `producers`, without
    /// checking sequences (the log is the truth). Returns false if a batch starts before `from` but
    /// ends at or after it: a snapshot at `from` would then not match this log.
    async fn replay_producer_batches(
        &self,
        from: i64,
        producers: &mut ProducerStateMap,
        now_ms: i64,
    ) -> Result<bool, StorageError> {
        let segments: Vec<(SegmentFile, u64, u64)> = {
            let state = self.state.borrow();
            state
                .segments
                .values()
                .filter(|segment| segment.next_offset > from && segment.size_bytes > 0)
                .map(|segment| {
                    let start = if from > segment.base_offset {
                        u64::from(segment.index.lookup(segment.relative(from)))
                    } else {
                        0
                    };
                    (segment.log.clone(), start, segment.size_bytes)
                })
                .collect()
        };
        for (file, start, size) in segments {
            let mut window: Vec<u8> = Vec::new();
            let mut window_start = 0u64;
            let mut position = start;
            // Bounded: each round advances by one whole batch (at least 61 bytes) or returns.
            while position < size {
                let inside = position >= window_start
                    && position + BATCH_HEADER_BYTES as u64 <= window_start + window.len() as u64;
                if !inside {
                    let want = (size - position).min(REBUILD_WINDOW_BYTES as u64) as usize;
                    window = self
                        .disk
                        .read_at(file.file(), want.max(BATCH_HEADER_BYTES), position)
                        .await
                        .map_err(|source| StorageError::io("read", file.path(), source))?;
                    window_start = position;
                }
                let at = (position - window_start) as usize;
                let header = &window[at..(at + BATCH_HEADER_BYTES).min(window.len())];
                let parsed = batch::BatchHeader::parse_prefix(header)
                    .filter(|_| header.len() == BATCH_HEADER_BYTES)
                    .ok_or_else(|| StorageError::Malformed {
                        what: "record batch",
                        path: file.path().to_path_buf(),
                        detail: format!("no valid batch header at position {position} while rebuilding producer state"),
                    })?;
                if parsed.last_offset() >= from {
                    if parsed.base_offset < from {
                        return Ok(false);
                    }
                    if let Some(producer) = batch::producer_fields(header) {
                        producers.apply(&producer, parsed.base_offset, now_ms);
                    }
                }
                position += parsed.size_bytes;
            }
        }
        Ok(true)
    }
}

/// Loads a segment's index files into memory, keeping offset entries that point below `trusted_below`
/// (and time entries up to the last kept offset entry). Returns false if a file is damaged; the
/// segment's index is then left empty.
async fn load_indexes(
    disk: &Disk,
    segment: &mut Segment,
    file_len: u64,
    trusted_below: u64,
    limit_bytes: u64,
) -> Result<bool, StorageError> {
    let offset_bytes = read_index_file(disk, &segment.index_path, limit_bytes)
        .await?
        .unwrap_or_else(|| vec![0xff; 1]);
    let time_bytes = read_index_file(disk, &segment.time_index_path, limit_bytes)
        .await?
        .unwrap_or_else(|| vec![0xff; 1]);
    // A one-byte stand-in for an oversized file fails to decode, which sends it down the rebuild path.
    let (Some(mut offsets), Some(mut times)) = (
        index::decode_offsets(&offset_bytes, file_len),
        index::decode_times(&time_bytes),
    ) else {
        tracing::warn!(path = %segment.index_path.display(), "index damaged; rebuilding it from the log");
        segment.index = SegmentIndex {
            files_stale: true,
            ..SegmentIndex::default()
        };
        return Ok(false);
    };
    offsets.retain(|entry| u64::from(entry.position) < trusted_below);
    if trusted_below != u64::MAX {
        let last_relative = offsets.last().map(|entry| entry.relative_offset);
        times.retain(|entry| last_relative.is_some_and(|last| entry.relative_offset <= last));
    }
    let files_stale = offsets.len() * OFFSET_ENTRY_BYTES != offset_bytes.len()
        || times.len() * TIME_ENTRY_BYTES != time_bytes.len();
    segment.index = SegmentIndex {
        persisted_offsets: offsets.len(),
        persisted_times: times.len(),
        offsets,
        times,
        files_stale,
    };
    Ok(true)
}

/// Reads an index file; a file larger than `limit_bytes` (the configured index size) is treated as
/// damaged (`None`) instead of being read into memory.
async fn read_index_file(
    disk: &Disk,
    path: &Path,
    limit_bytes: u64,
) -> Result<Option<Vec<u8>>, StorageError> {
    let file = match disk.open_read(path).await {
        Ok(file) => file,
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => return Ok(Some(Vec::new())),
        Err(source) => return Err(StorageError::io("open", path, source)),
    };
    let length = disk
        .file_len(&file)
        .await
        .map_err(|source| StorageError::io("stat", path, source))?;
    if length > limit_bytes {
        return Ok(None);
    }
    disk.read_at(&file, length as usize, 0)
        .await
        .map(Some)
        .map_err(|source| StorageError::io("read", path, source))
}

/// Re-verifies the part of a segment that `trust` does not cover and rebuilds its in-memory state.
async fn recover_segment(
    log: &PartitionLog,
    segment: &mut Segment,
    trust: &Trust,
    file_len: u64,
) -> Result<ScanEnd, StorageError> {
    let (interval, limits) = {
        let state = log.state.borrow();
        (
            state.config.index_interval_bytes,
            (
                state.config.max_index_entries(),
                state.config.max_time_index_entries(),
            ),
        )
    };
    let index_limit_bytes = u64::from(log.state.borrow().config.segment_index_bytes);
    let mut from = 0u64;
    let mut anchor = None;
    if let Trust::UpTo(trusted_below) = trust
        && load_indexes(
            &log.disk,
            segment,
            file_len,
            *trusted_below,
            index_limit_bytes,
        )
        .await?
    {
        if let Some(last) = segment.index.offsets.last().copied() {
            from = u64::from(last.position);
            anchor = Some(segment.base_offset + i64::from(last.relative_offset));
        }
        if let Some(last) = segment.index.times.last().copied() {
            segment.max_timestamp = last.timestamp;
            segment.offset_of_max_timestamp = segment.base_offset + i64::from(last.relative_offset);
        }
    }
    // Whatever the files hold past the kept entries is stale; the next persist cuts it off.
    segment.index.files_stale = true;
    segment.size_bytes = from;
    let ended = scan_segment(&log.disk, segment, from, anchor, file_len, interval, limits).await?;
    if let ScanEnd::Invalid { position, .. } = &ended
        && from > 0
        && *position == from
    {
        // The batch the index points at is itself bad: the index cannot be trusted either, so
        // verify the whole segment from its start.
        segment.index = SegmentIndex::default();
        segment.size_bytes = 0;
        segment.next_offset = segment.base_offset;
        segment.bytes_since_index_entry = 0;
        segment.max_timestamp = -1;
        return scan_segment(&log.disk, segment, 0, None, file_len, interval, limits).await;
    }
    Ok(ended)
}

/// Sets the roll-by-age inputs of a segment: its first batch's timestamp, and (standing in for the
/// first append's wall clock, which is not stored) the file's modification time.
async fn read_roll_base(
    disk: &Disk,
    segment: &mut Segment,
    modified_ms: i64,
) -> Result<(), StorageError> {
    if segment.size_bytes < BATCH_HEADER_BYTES as u64 {
        return Ok(());
    }
    segment.first_append_ms = Some(modified_ms);
    let header = disk
        .read_at(segment.log.file(), BATCH_HEADER_BYTES, 0)
        .await
        .map_err(|source| StorageError::io("read", segment.log.path(), source))?;
    if header.len() == BATCH_HEADER_BYTES && batch::max_timestamp(&header) >= 0 {
        segment.first_batch_timestamp = Some(batch::max_timestamp(&header));
    }
    Ok(())
}

async fn remove_segment_files(disk: &Disk, dir: &Path, base: i64) -> Result<(), StorageError> {
    let stem = super::segment::segment_stem(base);
    for suffix in ["log", "index", "timeindex"] {
        let path = dir.join(format!("{stem}.{suffix}"));
        match disk.remove_file(&path).await {
            Ok(()) => {}
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => {}
            Err(source) => return Err(StorageError::io("remove_file", &path, source)),
        }
    }
    Ok(())
}
