//! storage::recovery: opening a partition log. After a clean shutdown the indexes are trusted and only
//! the last index interval of the active segment is re-verified; after an unclean stop every batch
//! after the recovery point (the last fdatasync) is re-read and CRC-checked, and a torn tail there is
//! truncated. Damage below the recovery point, or anything else recovery cannot explain, is never
//! deleted: the damaged segment is moved into `quarantine/`, the intact batches around it are kept,
//! and the lost offsets are recorded so fetches there get an error. Damaged indexes are rebuilt.
//! Recovery time therefore follows the data written since the last fdatasync, not the log's size.

use std::cell::RefCell;
use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::time::{SystemTime, UNIX_EPOCH};

use super::batch::{self, BATCH_HEADER_BYTES};
use super::config::LogConfig;
use super::descriptors::SegmentHandle;
use super::dirs::{CLEAN_SHUTDOWN_FILE, Checkpoint, RECOVERY_CHECKPOINT_FILE};
use super::disk::Disk;
use super::error::StorageError;
use super::index::{self, OFFSET_ENTRY_BYTES, SegmentIndex, TIME_ENTRY_BYTES};
use super::log::{LogPosition, LogState, PartitionLog};
use super::producer_state::{ProducerStateMap, snapshot_file_name};
use super::quarantine::{self, DamagedRange};
use super::recovery_point::RecoveryPoint;
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
        let mut bases: BTreeSet<i64> = BTreeSet::new();
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
        let atomic_checkpoint = match disk.read_small_file(&checkpoint_path, 256).await {
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
        // The recovery point written after every fdatasync is normally the newer one; after a power
        // failure it may be older than the last synced atomic checkpoint, so the larger wins.
        let recovery_point = RecoveryPoint::read(&disk, dir).await?;
        let point_sequence = recovery_point.map_or(0, |(sequence, _)| sequence);
        let checkpoint = match (atomic_checkpoint, recovery_point.map(|(_, point)| point)) {
            (Some(atomic), Some(point)) => Some(if point.offset >= atomic.offset {
                point
            } else {
                atomic
            }),
            (atomic, point) => atomic.or(point),
        };
        let mut damaged = quarantine::load_damaged_ranges(&disk, dir).await?;
        let damaged_before = damaged.len();

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
            recovery_point: RefCell::new(RecoveryPoint::new(
                dir,
                point_sequence,
                recovery_point.map(|(_, point)| point),
            )),
            damaged: RefCell::new(Vec::new()),
            damaged_spans: RefCell::new(BTreeMap::new()),
            damaged_found: std::cell::Cell::new(0),
        };

        // A work list rather than a plain loop: splitting a damaged segment adds the new segments
        // back to it, to be verified like the others.
        let mut pending: BTreeSet<i64> = bases;
        let mut rebuilt: BTreeSet<i64> = BTreeSet::new();
        let mut segments: BTreeMap<i64, Segment> = BTreeMap::new();
        // Set once a tail was cut: every later segment is moved into quarantine (never deleted).
        let mut quarantine_rest: Option<String> = None;
        // The log end may not fall below this: offsets of durable data that was quarantined are not
        // handed out again, so a consumer never sees two different records at one offset.
        let mut resume_at: Option<i64> = None;
        let mut scanned_any = false;
        // Bounded: every round removes one base; a split adds at most two that hold strictly fewer
        // bytes than the segment it came from.
        while let Some(base) = pending.pop_first() {
            let is_last = pending.is_empty();
            let next_base = pending.first().copied();
            let log_path = dir.join(format!("{}.log", super::segment::segment_stem(base)));
            if let Some(reason) = &quarantine_rest {
                let moved = quarantine::move_segment_aside(&disk, dir, base, now_ms).await?;
                tracing::error!(
                    path = %log_path.display(),
                    quarantined_to = %moved.display(),
                    %reason,
                    "moved a segment that follows a cut log tail into quarantine"
                );
                continue;
            }
            let previous_end = segments
                .values()
                .next_back()
                .map(|previous: &Segment| previous.next_offset);
            if let Some(end) = previous_end
                && base < end
            {
                // Two segments claim the same offsets: keep the earlier one, set the other aside.
                let moved = quarantine::move_segment_aside(&disk, dir, base, now_ms).await?;
                tracing::error!(
                    path = %log_path.display(),
                    quarantined_to = %moved.display(),
                    previous_segment_end = end,
                    "segment overlaps the offsets of the previous one; moved it into quarantine"
                );
                continue;
            }
            if let Some(end) = previous_end
                && base > end
                && !damaged
                    .iter()
                    .any(|range| range.first_offset <= end && base <= range.end_offset)
            {
                tracing::error!(
                    path = %log_path.display(),
                    missing_from = end,
                    missing_to = base,
                    "offsets between two segments are missing (a segment file was removed?)"
                );
                damaged.push(DamagedRange {
                    first_offset: end,
                    end_offset: base,
                    reason: format!(
                        "no segment holds them (found at open before {})",
                        log_path.display()
                    ),
                });
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
                SegmentHandle::adopt(file, log_path.clone(), base).0,
                modified_ms,
            );

            let trust = if rebuilt.contains(&base) {
                Trust::Nothing
            } else if clean {
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
            if let (Trust::Whole, Some(next_base)) = (&trust, next_base)
                && load_indexes(
                    &disk,
                    &mut segment,
                    file_len,
                    u64::MAX,
                    IndexCheck::new(&config),
                    Some(next_base),
                    &damaged,
                )
                .await?
            {
                // `load_indexes` set the next offset from the walk of the segment's last batches.
                segment.size_bytes = file_len;
                if let Some(last) = segment.index.times.last() {
                    segment.max_timestamp = last.timestamp;
                    segment.offset_of_max_timestamp = base + i64::from(last.relative_offset);
                }
                segments.insert(base, segment);
                continue;
            }
            scanned_any |= !(clean && matches!(trust, Trust::UpTo(_)));
            let trusted_below = match (&trust, checkpoint) {
                (Trust::UpTo(_), Some(checkpoint)) if !clean => checkpoint.position.min(file_len),
                _ => 0,
            };
            let ended =
                recover_segment(&log, &mut segment, &trust, trusted_below, file_len).await?;
            let mut cut = false;
            if let ScanEnd::Invalid { position, reason } = ended {
                // The segment's descriptor through the shard's cache, for the scan and repair below.
                let log_file = segment.log.open(&disk).await?;
                // Below the recovery point every byte was fdatasync'ed and acknowledged: damage there is
                // not a torn write. Without any recovery point nothing can be told apart, so all of it
                // is treated as possibly acknowledged.
                // Judged by offset, not position: segments split by an earlier repair in this open
                // start after the recovery point's segment but hold durable offsets.
                let below_recovery_point =
                    checkpoint.is_none_or(|checkpoint| segment.next_offset < checkpoint.offset);
                let resync =
                    find_next_batch(&disk, &log_file, position, file_len, segment.next_offset)
                        .await?;
                let lost_from = segment.next_offset;
                if !below_recovery_point && resync.is_none() && is_last {
                    tracing::warn!(
                        path = %log_path.display(),
                        offset = lost_from,
                        position,
                        %reason,
                        "truncating a torn tail that was never fdatasync'ed"
                    );
                    disk.set_len(log_file.file(), position)
                        .await
                        .map_err(|source| StorageError::io("truncate", &log_path, source))?;
                    cut = true;
                } else if let (true, Some((next_position, next_header))) =
                    (below_recovery_point, resync)
                {
                    // Damage inside durable data with intact batches after it: keep both sides as two
                    // segments (offsets unchanged, the damaged batch's offsets become a recorded gap),
                    // and move the original file aside.
                    let original = log_file;
                    drop(segment);
                    let moved = quarantine::move_segment_aside(&disk, dir, base, now_ms).await?;
                    let source_file = disk
                        .open_read(&moved)
                        .await
                        .map_err(|source| StorageError::io("open", &moved, source))?;
                    let source = SegmentFile::new(source_file, moved.clone(), base);
                    drop(original);
                    let after_base = next_header.base_offset;
                    // Even an empty first part is kept: the segment then still starts the log at
                    // `base`, so a read at the damaged offsets gets the damage error rather than
                    // OFFSET_OUT_OF_RANGE.
                    quarantine::copy_range(&disk, &source, 0, position, &log_path).await?;
                    pending.insert(base);
                    rebuilt.insert(base);
                    let after_path =
                        dir.join(format!("{}.log", super::segment::segment_stem(after_base)));
                    quarantine::copy_range(&disk, &source, next_position, file_len, &after_path)
                        .await?;
                    disk.sync_dir(dir)
                        .await
                        .map_err(|source| StorageError::io("fsync", dir, source))?;
                    pending.insert(after_base);
                    rebuilt.insert(after_base);
                    tracing::error!(
                        path = %log_path.display(),
                        position,
                        damaged_bytes = next_position - position,
                        lost_offsets_from = lost_from,
                        lost_offsets_to = after_base,
                        quarantined_to = %moved.display(),
                        %reason,
                        "damaged record batch below the recovery point; moved the segment into \
                         quarantine and kept the intact batches before and after it"
                    );
                    damaged.push(DamagedRange {
                        first_offset: lost_from,
                        end_offset: after_base,
                        reason: format!(
                            "{reason} at byte {position} of {} (original in {})",
                            log_path.display(),
                            moved.display()
                        ),
                    });
                    continue;
                } else {
                    // Either durable data that is damaged up to the segment's end, or an unsynced
                    // tail that holds more than a torn write: copy the bytes aside, then cut them.
                    let copied = quarantine::copy_range_aside(
                        &disk, dir, &log_file, position, file_len, now_ms,
                    )
                    .await?;
                    disk.set_len(log_file.file(), position)
                        .await
                        .map_err(|source| StorageError::io("truncate", &log_path, source))?;
                    cut = true;
                    let lost_to = if below_recovery_point {
                        // Durable offsets up to the next segment, or up to the recovery point.
                        match (next_base, checkpoint) {
                            (Some(next_base), _) => next_base,
                            (None, Some(checkpoint)) => checkpoint.offset.max(lost_from),
                            (None, None) => lost_from,
                        }
                    } else {
                        lost_from
                    };
                    tracing::error!(
                        path = %log_path.display(),
                        position,
                        lost_offsets_from = lost_from,
                        lost_offsets_to = lost_to,
                        below_recovery_point,
                        quarantined_to = %copied.display(),
                        %reason,
                        "damaged log tail; copied it into quarantine and cut it from the segment"
                    );
                    if below_recovery_point {
                        if lost_to > lost_from {
                            damaged.push(DamagedRange {
                                first_offset: lost_from,
                                end_offset: lost_to,
                                reason: format!(
                                    "{reason} at byte {position} of {} (copied to {})",
                                    log_path.display(),
                                    copied.display()
                                ),
                            });
                        }
                        if next_base.is_none() {
                            resume_at = Some(lost_to);
                        }
                    } else if !is_last {
                        quarantine_rest = Some(format!(
                            "the unsynced tail of {} was cut at byte {position}",
                            log_path.display()
                        ));
                    }
                }
                scanned_any = true;
            }
            if is_last || cut {
                read_roll_base(&disk, &mut segment, modified_ms).await?;
            }
            segments.insert(base, segment);
        }

        if let Some(resume_at) = resume_at
            && segments
                .values()
                .next_back()
                .is_none_or(|active| active.next_offset < resume_at)
        {
            // The quarantined tail held offsets up to `resume_at`; new appends start after them.
            let segment = log.create_segment(resume_at, now_ms).await?;
            segments.insert(resume_at, segment);
        }
        // A closed segment verified by a scan gets the final time-index entry a roll gives it, so
        // its largest timestamp is in its `.timeindex` for the next open.
        let closed = segments.len().saturating_sub(1);
        for segment in segments.values_mut().take(closed) {
            segment.seal_time_index();
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
                let file = file.open(&disk).await?;
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
        if damaged.len() != damaged_before {
            quarantine::save_damaged_ranges(&disk, dir, &damaged).await?;
        }
        *log.damaged.borrow_mut() = damaged;
        // The recovery point must not claim more than this open verified (a cut tail moved the end
        // back); it is synced here because the first appends follow immediately.
        let end = log.state.borrow().end_position();
        log.write_recovery_point(end).await;
        log.sync_recovery_point().await?;
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
            // A clean open (or a new, empty partition) is routine and a node may hold tens of
            // thousands of partitions, so it is logged at debug; an open that had to recover data is
            // worth an operator's eye.
            let state = log.state.borrow();
            let recovered_data = !clean && state.log_end_offset > state.log_start_offset;
            if !recovered_data {
                tracing::debug!(
                    dir = %dir.display(),
                    segments = state.segments.len(),
                    log_start_offset = state.log_start_offset,
                    log_end_offset = state.log_end_offset,
                    "opened partition log"
                );
            } else {
                tracing::info!(
                    dir = %dir.display(),
                    segments = state.segments.len(),
                    log_start_offset = state.log_start_offset,
                    log_end_offset = state.log_end_offset,
                    "opened partition log after an unclean stop (recovered by scan)"
                );
            }
        }
        Ok(log)
    }
}

/// The largest snapshot file read at open; a larger one is treated as damaged. At about 180 bytes
/// per producer this is room for over 300,000 producers in one partition.
const SNAPSHOT_MAX_BYTES: usize = 64 << 20;

/// How much log the producer-state rebuild reads at a time while walking batch headers.
const REBUILD_WINDOW_BYTES: usize = 64 * 1024;

/// How much a search for the next intact batch after damage reads at a time.
const RESYNC_WINDOW_BYTES: usize = 1 << 20;

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
        let segments: Vec<(SegmentHandle, u64, u64)> = {
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
            let file = file.open(&self.disk).await?;
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
/// (and time entries up to the last kept offset entry). Returns false if a file is damaged (logged at
/// WARN with its name); the segment's index is then left empty, to be rebuilt from the log.
///
/// A closed segment (`next_base` known) is checked further, because its indexes are trusted without
/// a scan: both files must exist, entries must lie inside the segment, and a walk of the batch headers
/// from the last offset entry must end exactly at the file's end and the next segment's base, within
/// one index interval plus two batches, with no larger timestamp than the last time entry. That
/// catches a deleted, truncated or scrambled file for the price of reading a few headers.
async fn load_indexes(
    disk: &Disk,
    segment: &mut Segment,
    file_len: u64,
    trusted_below: u64,
    limits: IndexCheck,
    next_base: Option<i64>,
    damaged: &[DamagedRange],
) -> Result<bool, StorageError> {
    let offset_bytes = read_index_file(disk, &segment.index_path, limits.index_bytes).await?;
    let time_bytes = read_index_file(disk, &segment.time_index_path, limits.index_bytes).await?;
    let damage = match (&offset_bytes, &time_bytes) {
        (IndexFile::Missing, _) if file_len > 0 => {
            Err((&segment.index_path, "missing".to_string()))
        }
        (_, IndexFile::Missing) if file_len > 0 => {
            Err((&segment.time_index_path, "missing".to_string()))
        }
        (IndexFile::TooLarge, _) => Err((&segment.index_path, "larger than the index size".into())),
        (_, IndexFile::TooLarge) => Err((
            &segment.time_index_path,
            "larger than the index size".into(),
        )),
        _ => Ok(()),
    };
    let offset_bytes = offset_bytes.bytes();
    let time_bytes = time_bytes.bytes();
    let decoded = damage.and_then(|()| {
        let offsets = index::decode_offsets(offset_bytes, file_len).ok_or((
            &segment.index_path,
            "not whole, increasing entries inside the segment".to_string(),
        ))?;
        let times = index::decode_times(time_bytes).ok_or((
            &segment.time_index_path,
            "not whole entries with increasing timestamps".to_string(),
        ))?;
        if let Some(next_base) = next_base {
            let span = next_base - segment.base_offset;
            if offsets
                .last()
                .is_some_and(|last| i64::from(last.relative_offset) >= span)
            {
                return Err((&segment.index_path, "offsets beyond the segment".into()));
            }
            if times
                .iter()
                .any(|entry| i64::from(entry.relative_offset) >= span)
                || times
                    .windows(2)
                    .any(|pair| pair[0].relative_offset > pair[1].relative_offset)
            {
                return Err((
                    &segment.time_index_path,
                    "offsets beyond the segment or out of order".into(),
                ));
            }
        }
        Ok((offsets, times))
    });
    let (mut offsets, mut times) = match decoded {
        Ok(found) => found,
        Err((path, reason)) => {
            tracing::warn!(path = %path.display(), %reason, "index file damaged; rebuilding it from the log");
            segment.index = SegmentIndex {
                files_stale: true,
                ..SegmentIndex::default()
            };
            return Ok(false);
        }
    };
    if let Some(next_base) = next_base {
        match check_index_tail(
            disk, segment, &offsets, &times, file_len, next_base, limits, damaged,
        )
        .await?
        {
            Ok(end_offset) => segment.next_offset = end_offset,
            Err((path, reason)) => {
                tracing::warn!(path = %path.display(), %reason, "index file damaged; rebuilding it from the log");
                segment.index = SegmentIndex {
                    files_stale: true,
                    ..SegmentIndex::default()
                };
                return Ok(false);
            }
        }
    }
    let offset_len = offset_bytes.len();
    let time_len = time_bytes.len();
    offsets.retain(|entry| u64::from(entry.position) < trusted_below);
    if trusted_below != u64::MAX {
        let last_relative = offsets.last().map(|entry| entry.relative_offset);
        times.retain(|entry| last_relative.is_some_and(|last| entry.relative_offset <= last));
    }
    let files_stale = offsets.len() * OFFSET_ENTRY_BYTES != offset_len
        || times.len() * TIME_ENTRY_BYTES != time_len;
    segment.index = SegmentIndex {
        persisted_offsets: offsets.len(),
        persisted_times: times.len(),
        offsets,
        times,
        files_stale,
    };
    Ok(true)
}

/// Limits for checking a closed segment's indexes.
#[derive(Clone, Copy)]
struct IndexCheck {
    /// The configured index size: a larger file is damaged.
    index_bytes: u64,
    /// How far the last offset entry may lie from the segment's end: one index interval plus two
    /// of the largest batches.
    tail_bytes: u64,
}

impl IndexCheck {
    fn new(config: &LogConfig) -> IndexCheck {
        IndexCheck {
            index_bytes: u64::from(config.segment_index_bytes),
            tail_bytes: u64::from(config.index_interval_bytes)
                + 2 * (u64::from(config.max_message_bytes) + BATCH_HEADER_BYTES as u64),
        }
    }
}

/// Walks the batch headers after a closed segment's last offset entry (see `load_indexes`); returns
/// the segment's end offset if the indexes agree with the log, else the damaged file and why.
#[allow(clippy::too_many_arguments)]
async fn check_index_tail<'a>(
    disk: &Disk,
    segment: &'a Segment,
    offsets: &[index::OffsetEntry],
    times: &[index::TimeEntry],
    file_len: u64,
    next_base: i64,
    limits: IndexCheck,
    damaged: &[DamagedRange],
) -> Result<Result<i64, (&'a Path, String)>, StorageError> {
    let (mut position, expected_last) = match offsets.last() {
        Some(last) => (
            u64::from(last.position),
            Some(segment.base_offset + i64::from(last.relative_offset)),
        ),
        None => (0, None),
    };
    if file_len - position > limits.tail_bytes {
        return Ok(Err((
            &segment.index_path,
            format!(
                "its last entry lies {} bytes before the segment's end (truncated?)",
                file_len - position
            ),
        )));
    }
    let mut headers = HeaderReader::new(segment.log.open(disk).await?, file_len);
    let mut next_offset = segment.base_offset;
    let mut first = true;
    let mut tail_max_timestamp = -1i64;
    // Bounded: each round advances by a whole batch (at least 61 bytes) over at most `tail_bytes`.
    while position < file_len {
        let Some((header, max_timestamp)) = headers.header(disk, position).await? else {
            return Ok(Err((
                &segment.index_path,
                format!("no valid batch header at byte {position}"),
            )));
        };
        let consistent = if first {
            match expected_last {
                Some(expected) => header.last_offset() == expected,
                None => header.base_offset == segment.base_offset,
            }
        } else {
            header.base_offset == next_offset
        };
        first = false;
        if !consistent || position + header.size_bytes > file_len {
            return Ok(Err((
                &segment.index_path,
                format!("does not point at the batch boundaries of the log (byte {position})"),
            )));
        }
        tail_max_timestamp = tail_max_timestamp.max(max_timestamp);
        next_offset = header.last_offset() + 1;
        position += header.size_bytes;
    }
    // A segment may end before the next one starts only where recovery cut damaged data and
    // recorded the lost offsets.
    let recorded_gap = damaged
        .iter()
        .any(|range| range.first_offset <= next_offset && next_base <= range.end_offset);
    if file_len > 0 && next_offset != next_base && !(next_offset < next_base && recorded_gap) {
        return Ok(Err((
            &segment.index_path,
            format!(
                "the log ends at offset {next_offset}, not at the next segment's base {next_base}"
            ),
        )));
    }
    let indexed_max = times.last().map_or(-1, |entry| entry.timestamp);
    if tail_max_timestamp > indexed_max {
        return Ok(Err((
            &segment.time_index_path,
            format!(
                "its largest timestamp {indexed_max} is below the {tail_max_timestamp} of the segment's last batches"
            ),
        )));
    }
    Ok(Ok(if file_len > 0 { next_offset } else { next_base }))
}

/// Batch headers of one segment file, read through a window so consecutive small batches cost one
/// read.
struct HeaderReader {
    file: SegmentFile,
    file_len: u64,
    window: Vec<u8>,
    window_start: u64,
}

impl HeaderReader {
    fn new(file: SegmentFile, file_len: u64) -> HeaderReader {
        HeaderReader {
            file,
            file_len,
            window: Vec::new(),
            window_start: 0,
        }
    }

    /// The parsed header at `position` and its max timestamp; `None` if the bytes there are not a
    /// v2 batch header that fits in the file.
    async fn header(
        &mut self,
        disk: &Disk,
        position: u64,
    ) -> Result<Option<(batch::BatchHeader, i64)>, StorageError> {
        if position + BATCH_HEADER_BYTES as u64 > self.file_len {
            return Ok(None);
        }
        let inside = position >= self.window_start
            && position + BATCH_HEADER_BYTES as u64 <= self.window_start + self.window.len() as u64;
        if !inside {
            let want = (self.file_len - position).min(REBUILD_WINDOW_BYTES as u64) as usize;
            self.window = disk
                .read_at(self.file.file(), want, position)
                .await
                .map_err(|source| StorageError::io("read", self.file.path(), source))?;
            self.window_start = position;
            if self.window.len() < BATCH_HEADER_BYTES {
                return Ok(None);
            }
        }
        let at = (position - self.window_start) as usize;
        let bytes = &self.window[at..at + BATCH_HEADER_BYTES];
        Ok(batch::BatchHeader::parse_prefix(bytes)
            .filter(|header| position + header.size_bytes <= self.file_len)
            .map(|header| (header, batch::max_timestamp(bytes))))
    }
}

/// An index file as read at open.
enum IndexFile {
    Present(Vec<u8>),
    Missing,
    TooLarge,
}

impl IndexFile {
    fn bytes(&self) -> &[u8] {
        match self {
            IndexFile::Present(bytes) => bytes,
            IndexFile::Missing | IndexFile::TooLarge => &[],
        }
    }
}

/// Reads an index file; a file larger than `limit_bytes` (the configured index size) is not read
/// into memory.
async fn read_index_file(
    disk: &Disk,
    path: &Path,
    limit_bytes: u64,
) -> Result<IndexFile, StorageError> {
    let file = match disk.open_read(path).await {
        Ok(file) => file,
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => {
            return Ok(IndexFile::Missing);
        }
        Err(source) => return Err(StorageError::io("open", path, source)),
    };
    let length = disk
        .file_len(&file)
        .await
        .map_err(|source| StorageError::io("stat", path, source))?;
    if length > limit_bytes {
        return Ok(IndexFile::TooLarge);
    }
    disk.read_at(&file, length as usize, 0)
        .await
        .map(IndexFile::Present)
        .map_err(|source| StorageError::io("read", path, source))
}

/// Re-verifies the part of a segment that `trust` does not cover and rebuilds its in-memory state.
/// Batches that end below `trusted_below` (the recovery point, when it lies in this segment) were
/// fdatasync'ed before: as Kafka does below its recovery point, only their headers are walked (to
/// rebuild the index and find the batch boundaries), not their CRCs; from there on every batch is
/// verified.
async fn recover_segment(
    log: &PartitionLog,
    segment: &mut Segment,
    trust: &Trust,
    trusted_below: u64,
    file_len: u64,
) -> Result<ScanEnd, StorageError> {
    let (interval, limits, check) = {
        let state = log.state.borrow();
        (
            state.config.index_interval_bytes,
            (
                state.config.max_index_entries(),
                state.config.max_time_index_entries(),
            ),
            IndexCheck::new(&state.config),
        )
    };
    let mut from = 0u64;
    let mut anchor = None;
    if let Trust::UpTo(trusted_below) = trust
        && load_indexes(
            &log.disk,
            segment,
            file_len,
            *trusted_below,
            check,
            None,
            &[],
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
    let index_from = from;
    let walked = if trusted_below > from {
        walk_trusted(
            log,
            segment,
            from,
            anchor,
            trusted_below,
            file_len,
            interval,
            limits,
        )
        .await?
    } else {
        Ok((from, anchor))
    };
    let ended = match walked {
        Ok((scan_from, scan_anchor)) => {
            scan_segment(
                &log.disk,
                segment,
                scan_from,
                scan_anchor,
                file_len,
                interval,
                limits,
            )
            .await?
        }
        Err(invalid) => invalid,
    };
    if let ScanEnd::Invalid { position, .. } = &ended
        && index_from > 0
        && *position == index_from
    {
        // The batch the index points at is itself bad: the index cannot be trusted either, so
        // verify the whole segment from its start.
        segment.index = SegmentIndex {
            files_stale: true,
            ..SegmentIndex::default()
        };
        segment.size_bytes = 0;
        segment.next_offset = segment.base_offset;
        segment.bytes_since_index_entry = 0;
        segment.max_timestamp = -1;
        return scan_segment(&log.disk, segment, 0, None, file_len, interval, limits).await;
    }
    Ok(ended)
}

/// Walks batch headers from `from` (a batch start whose last offset is `anchor`, or the segment start)
/// while batches end below `trusted_below`, accounting each one. Returns where the CRC-verifying scan
/// takes over (the last batch reaching `trusted_below`, with its last offset as the anchor), or the
/// invalid position if a header does not parse or does not continue the offsets.
#[allow(clippy::too_many_arguments)]
async fn walk_trusted(
    log: &PartitionLog,
    segment: &mut Segment,
    from: u64,
    anchor: Option<i64>,
    trusted_below: u64,
    file_len: u64,
    interval: u32,
    limits: (usize, usize),
) -> Result<Result<(u64, Option<i64>), ScanEnd>, StorageError> {
    let mut headers = HeaderReader::new(segment.log.open(&log.disk).await?, file_len);
    let mut position = from;
    let mut first = true;
    // Bounded: each round advances by a whole batch (at least 61 bytes) or returns.
    loop {
        let invalid = |reason: String| Ok(Err(ScanEnd::Invalid { position, reason }));
        let Some((header, max_timestamp)) = headers.header(&log.disk, position).await? else {
            return invalid("not a v2 batch header that fits in the file".into());
        };
        let continues = if first && position > 0 {
            anchor.is_some_and(|anchor| header.last_offset() == anchor)
        } else {
            header.base_offset == segment.next_offset
        };
        if !continues {
            return invalid(format!(
                "batch base offset {} does not continue the log at {}",
                header.base_offset, segment.next_offset
            ));
        }
        first = false;
        if position + header.size_bytes >= trusted_below {
            let scan_anchor = (position > 0).then(|| header.last_offset());
            return Ok(Ok((position, scan_anchor)));
        }
        segment.note_batch(
            position,
            header.size_bytes,
            header.last_offset(),
            max_timestamp,
            interval,
            limits,
        );
        position += header.size_bytes;
    }
}

/// After invalid bytes at `damaged_at`, finds the next position where a whole, CRC-valid batch starts
/// whose base offset is at least `expected_offset` (a batch after the damaged one). Returns it with its
/// header, or `None` if the rest of the file holds none. A false match needs a magic byte, a plausible
/// length and offset, and a matching CRC-32C at once.
pub(crate) async fn find_next_batch(
    disk: &Disk,
    file: &SegmentFile,
    damaged_at: u64,
    file_len: u64,
    expected_offset: i64,
) -> Result<Option<(u64, batch::BatchHeader)>, StorageError> {
    let mut window: Vec<u8> = Vec::new();
    let mut window_start = damaged_at + 1;
    let mut candidate = damaged_at + 1;
    // Bounded: `candidate` moves forward by one byte per round, up to the file's end.
    while candidate + BATCH_HEADER_BYTES as u64 <= file_len {
        let inside = candidate >= window_start
            && candidate + BATCH_HEADER_BYTES as u64 <= window_start + window.len() as u64;
        if !inside {
            let want = (file_len - candidate).min(RESYNC_WINDOW_BYTES as u64) as usize;
            window = disk
                .read_at(file.file(), want, candidate)
                .await
                .map_err(|source| StorageError::io("read", file.path(), source))?;
            window_start = candidate;
            if window.len() < BATCH_HEADER_BYTES {
                return Ok(None);
            }
        }
        let at = (candidate - window_start) as usize;
        let bytes = &window[at..at + BATCH_HEADER_BYTES];
        if let Some(header) = batch::BatchHeader::parse_prefix(bytes)
            && header.base_offset >= expected_offset
            && header.base_offset - expected_offset < i64::from(i32::MAX)
            && candidate + header.size_bytes <= file_len
            && batch_crc_matches(disk, file, candidate, &header, batch::stored_crc(bytes)).await?
        {
            return Ok(Some((candidate, header)));
        }
        candidate += 1;
    }
    Ok(None)
}

async fn batch_crc_matches(
    disk: &Disk,
    file: &SegmentFile,
    position: u64,
    header: &batch::BatchHeader,
    stored_crc: u32,
) -> Result<bool, StorageError> {
    let end = position + header.size_bytes;
    let mut at = position + batch::CRC_COVERED_FROM as u64;
    let mut crc = 0u32;
    // Bounded: each round reads at least one byte or stops.
    while at < end {
        let want = ((end - at) as usize).min(RESYNC_WINDOW_BYTES);
        let bytes = disk
            .read_at(file.file(), want, at)
            .await
            .map_err(|source| StorageError::io("read", file.path(), source))?;
        if bytes.is_empty() {
            return Ok(false);
        }
        crc = crc32c::crc32c_append(crc, &bytes);
        at += bytes.len() as u64;
    }
    Ok(crc == stored_crc)
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
    let file = segment.log.open(disk).await?;
    let header = disk
        .read_at(file.file(), BATCH_HEADER_BYTES, 0)
        .await
        .map_err(|source| StorageError::io("read", segment.log.path(), source))?;
    if header.len() == BATCH_HEADER_BYTES && batch::max_timestamp(&header) >= 0 {
        segment.first_batch_timestamp = Some(batch::max_timestamp(&header));
    }
    Ok(())
}
