//! storage::log: the partition log: append with validation and offset assignment, reads that return a
//! file range to splice, timestamp lookup, group-committed fdatasync, the high watermark, segment roll,
//! retention, clean close and deletion. Recovery (opening) is in `recovery.rs`.
//!
//! A `PartitionLog` lives on one shard thread and is shared by that thread's tasks through `Rc`. Its
//! state sits in a `RefCell` that is never borrowed across an `.await`; appends, rolls, checkpoints and
//! retention take turns through one `Turnstile`, so bytes reach the file in offset order, while reads
//! and fdatasync run beside them.

use std::cell::{Cell, RefCell};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::rc::Rc;
use std::task::{Context, Poll};

use bytes::Bytes;

use super::batch::{self, BATCH_HEADER_BYTES, BatchHeader, HEADER_PREFIX_BYTES, ValidatedBatch};
use super::config::LogConfig;
use super::descriptors::SegmentHandle;
use super::dirs::{
    self, CLEAN_SHUTDOWN_FILE, Checkpoint, DELETE_DIR_SUFFIX, RECOVERY_CHECKPOINT_FILE,
};
use super::disk::Disk;
use super::error::{AppendError, ReadError, StorageError};
use super::index::{OFFSET_ENTRY_BYTES, TIME_ENTRY_BYTES};
use super::producer_state::{ProducerStateMap, SequenceCheck, snapshot_file_name};
use super::quarantine::DamagedRange;
use super::recovery_point::RecoveryPoint;
use super::segment::{Segment, SegmentFile, segment_stem};
use super::waiters::{Turnstile, TurnstileGuard, Waiters};

/// The partition leader epoch stamped into every batch. A single node has one leader forever.
pub const LEADER_EPOCH: i32 = 0;

/// How far a read scans batch headers per disk read while looking for the batch holding an offset.
const READ_SCAN_CHUNK_BYTES: usize = 16 * 1024;

/// What an append will do, decided under the turn before anything is written.
struct ProducerPlan {
    /// Indexes (into the validated batches) of the batches to write; duplicates are left out.
    write: Vec<usize>,
    /// The log end when the plan was made: the first offset the written batches get.
    first_new_offset: i64,
    /// The offset to answer with: the first batch's, whether new or a duplicate.
    base_offset: i64,
    last_offset: i64,
    /// The producer entries as they will be once the write succeeds.
    staged: ProducerStateMap,
}

/// Offsets of one append.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AppendInfo {
    pub base_offset: i64,
    pub last_offset: i64,
    pub log_start_offset: i64,
    /// Every batch was a retry of one already in the log (idempotent producer): nothing was written
    /// and the offsets are those the batches were first written at.
    pub duplicate: bool,
}

/// A byte range of one segment file for fetch to splice (or copy). `len` may be 0 (nothing to send).
/// The range starts at a batch boundary; it may end inside a batch, as Kafka's does, and clients skip
/// the incomplete tail.
#[derive(Debug, Clone)]
pub struct ReadSlice {
    pub file: SegmentFile,
    pub position: u64,
    pub len: u32,
}

/// Where intact batches resume after damaged bytes: (byte position, base offset).
pub(crate) type IntactAfter = (u64, i64);

/// What `find_batch` found.
enum Found {
    /// The batch's position, header and full 61-byte header bytes.
    Batch(u64, BatchHeader, Vec<u8>),
    /// No batch before the limit satisfies the condition.
    Nothing,
    /// The bytes at `position` are not a valid batch.
    Damaged { position: u64, detail: String },
}

/// What one retention pass removed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct RetentionOutcome {
    pub deleted_segments: usize,
    pub deleted_bytes: u64,
    pub log_start_offset: i64,
}

/// An offset with the byte position where it starts: `position` in the segment based at `segment_base`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct LogPosition {
    pub offset: i64,
    pub segment_base: i64,
    pub position: u64,
}

#[derive(Debug)]
pub(crate) struct LogState {
    pub config: LogConfig,
    /// By base offset; never empty; the last one is the active segment.
    pub segments: BTreeMap<i64, Segment>,
    pub log_start_offset: i64,
    pub log_end_offset: i64,
    pub high_watermark: LogPosition,
    /// Everything before `durable.offset` has been fdatasync'ed.
    pub durable: LogPosition,
    pub unflushed_records: u64,
    pub first_unflushed_ms: Option<i64>,
    pub flush_in_flight: bool,
    /// Closed segments whose data may not be fdatasync'ed yet; the next flush syncs them before the
    /// active one (Kafka also flushes a rolled segment asynchronously, not in the rolling append).
    pub unsynced_closed: Vec<SegmentHandle>,
    pub checkpoint: Option<Checkpoint>,
    pub last_checkpoint_ms: i64,
    /// An append was cancelled or failed mid-write: bytes past the active segment's size may be garbage.
    pub tail_dirty: bool,
    pub failed: Option<String>,
    pub closed: bool,
    /// Idempotent producers of this partition, as of the log end.
    pub producers: ProducerStateMap,
    /// Offsets of the producer-state snapshot files in the directory, oldest first.
    pub snapshot_offsets: Vec<i64>,
    pub last_snapshot_ms: i64,
}

/// How many producer-state snapshots a partition keeps. More than one, because a snapshot taken at
/// a log end whose data was not yet fdatasync'ed is useless after a power failure truncates the log
/// below it, and the next older one then saves a rebuild from the log start.
const SNAPSHOTS_KEPT: usize = 3;

impl LogState {
    pub(crate) fn active(&self) -> &Segment {
        self.segments
            .values()
            .next_back()
            .expect("a log always has an active segment")
    }

    pub(crate) fn active_mut(&mut self) -> &mut Segment {
        self.segments
            .values_mut()
            .next_back()
            .expect("a log always has an active segment")
    }

    pub(crate) fn end_position(&self) -> LogPosition {
        let active = self.active();
        LogPosition {
            offset: self.log_end_offset,
            segment_base: active.base_offset,
            position: active.size_bytes,
        }
    }

    fn index_limits(&self) -> (usize, usize) {
        (
            self.config.max_index_entries(),
            self.config.max_time_index_entries(),
        )
    }

    fn check_invariants(&self) {
        debug_assert!(self.log_start_offset <= self.high_watermark.offset);
        debug_assert!(self.high_watermark.offset <= self.log_end_offset);
        debug_assert!(self.durable.offset <= self.log_end_offset);
        debug_assert_eq!(self.active().next_offset, self.log_end_offset);
    }
}

/// One partition's log. See the module comment for the threading model.
pub struct PartitionLog {
    pub(crate) dir: PathBuf,
    pub(crate) disk: Disk,
    pub(crate) state: RefCell<LogState>,
    /// Appends, rolls, checkpoints, retention and close take turns here.
    pub(crate) turn: Turnstile,
    /// Woken when an fdatasync finishes (group commit followers wait here).
    pub(crate) flush_done: Waiters,
    /// Woken when the high watermark advances or the log closes.
    pub(crate) high_watermark_moved: Waiters,
    /// The last file operation started by a holder of the turn; see `detached`.
    pub(crate) in_flight: RefCell<Option<Rc<dyn Settle>>>,
    /// The recovery point written after every fdatasync (`recovery_point.rs`).
    pub(crate) recovery_point: RefCell<RecoveryPoint>,
    /// Offsets lost to damage (quarantined at open): reads there answer `ReadError::Corrupt`.
    pub(crate) damaged: RefCell<Vec<DamagedRange>>,
    /// Damaged bytes met by reads, by `(segment base, byte position)`, with where the intact batches
    /// resume (position, base offset). Each is logged at ERROR once, when found; reads skip over them
    /// and fetches at their offsets get `ReadError::Corrupt`.
    pub(crate) damaged_spans: RefCell<BTreeMap<(i64, u64), Option<IntactAfter>>>,
    /// Damaged batches found since open (by reads and the scrubber).
    pub(crate) damaged_found: Cell<u64>,
}

/// A detached file operation whose end can be awaited.
pub(crate) trait Settle {
    fn finished(&self) -> bool;
    fn waiters(&self) -> &Waiters;
}

#[derive(Default)]
struct OrphanSlot {
    finished: Cell<bool>,
    done: Waiters,
}

impl Settle for OrphanSlot {
    fn finished(&self) -> bool {
        self.finished.get()
    }

    fn waiters(&self) -> &Waiters {
        &self.done
    }
}

/// File work that outlives a cancelled caller; see `PartitionLog::detached`.
pub(crate) struct Uncancellable<'a, T: 'static> {
    log: &'a PartitionLog,
    work: Option<Pin<Box<dyn Future<Output = T>>>>,
}

impl<T: 'static> Future for Uncancellable<'_, T> {
    type Output = T;

    fn poll(self: Pin<&mut Self>, context: &mut Context<'_>) -> Poll<T> {
        let this = self.get_mut();
        let Some(work) = this.work.as_mut() else {
            return Poll::Pending;
        };
        match work.as_mut().poll(context) {
            Poll::Ready(value) => {
                this.work = None;
                Poll::Ready(value)
            }
            Poll::Pending => Poll::Pending,
        }
    }
}

impl<T: 'static> Drop for Uncancellable<'_, T> {
    fn drop(&mut self) {
        let Some(work) = self.work.take() else {
            return;
        };
        let slot = Rc::new(OrphanSlot::default());
        let task_slot = slot.clone();
        // Outside a runtime (the runtime itself is shutting down) nothing can run the work anymore;
        // the files are then recovered at the next open like after any stop.
        let spawned = compio::runtime::Runtime::try_with_current(move |runtime| {
            runtime
                .spawn(async move {
                    let _ = work.await;
                    task_slot.finished.set(true);
                    task_slot.done.wake_all();
                })
                .detach();
        });
        if spawned.is_ok() {
            *self.log.in_flight.borrow_mut() = Some(slot);
        }
    }
}

/// Clears `flush_in_flight` when the leading flush ends, even if its future is dropped mid-fdatasync,
/// so followers never wait on a flush that will not finish.
struct FlushLeader<'a> {
    log: &'a PartitionLog,
}

impl Drop for FlushLeader<'_> {
    fn drop(&mut self) {
        self.log.state.borrow_mut().flush_in_flight = false;
        self.log.flush_done.wake_all();
    }
}

/// Marks the tail dirty unless the append it guards completes, so a cancelled write's stray bytes are
/// cut off before the next write.
struct TailGuard<'a> {
    log: &'a PartitionLog,
    done: bool,
}

impl Drop for TailGuard<'_> {
    fn drop(&mut self) {
        if !self.done {
            self.log.state.borrow_mut().tail_dirty = true;
        }
    }
}

impl PartitionLog {
    /// Runs file work that changes the log's files, in a way its caller cannot cancel. The work is
    /// polled inline (no task per append); if the caller is dropped first (a cancelled produce), the
    /// unfinished work moves into a detached task and runs to its end, because an io_uring write the
    /// kernel already has could otherwise land after the next writer's, on top of it. The next holder
    /// of the turn waits for such orphaned work before it touches the files.
    pub(crate) fn detached<T: 'static>(
        &self,
        work: impl Future<Output = T> + 'static,
    ) -> Uncancellable<'_, T> {
        Uncancellable {
            log: self,
            work: Some(Box::pin(work)),
        }
    }

    /// Takes the turn, then waits for file work a cancelled previous holder left running.
    pub(crate) async fn enter_turn(&self) -> TurnstileGuard<'_> {
        let guard = self.turn.enter().await;
        let orphan = self.in_flight.borrow().clone();
        if let Some(orphan) = orphan {
            orphan.waiters().wait_until(|| orphan.finished()).await;
            self.in_flight.borrow_mut().take();
        }
        guard
    }

    /// Opens (creating or recovering) the log in `dir` on the real disk.
    pub async fn open(dir: &Path, config: LogConfig) -> Result<PartitionLog, StorageError> {
        let disk = Disk::real().with_uncached_appends(config.uncached_appends);
        Self::open_with_disk(dir, config, disk).await
    }

    /// The partition directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn log_start_offset(&self) -> i64 {
        self.state.borrow().log_start_offset
    }

    pub fn high_watermark(&self) -> i64 {
        self.state.borrow().high_watermark.offset
    }

    pub fn log_end_offset(&self) -> i64 {
        self.state.borrow().log_end_offset
    }

    /// One past the last offset known to be fdatasync'ed.
    pub fn durable_offset(&self) -> i64 {
        self.state.borrow().durable.offset
    }

    /// Total bytes of all segments.
    pub fn size_bytes(&self) -> u64 {
        self.state
            .borrow()
            .segments
            .values()
            .map(|segment| segment.size_bytes)
            .sum()
    }

    /// Number of segments, the active one included.
    pub fn segment_count(&self) -> usize {
        self.state.borrow().segments.len()
    }

    /// The base offsets of all segments, oldest first.
    pub fn segment_base_offsets(&self) -> Vec<i64> {
        self.state.borrow().segments.keys().copied().collect()
    }

    /// The largest batch timestamp in the log (-1 if none), for ListOffsets' MAX_TIMESTAMP (-3).
    pub fn max_timestamp(&self) -> (i64, i64) {
        let state = self.state.borrow();
        state
            .segments
            .values()
            .filter(|segment| segment.max_timestamp >= 0)
            .max_by_key(|segment| segment.max_timestamp)
            .map_or((-1, -1), |segment| {
                (segment.offset_of_max_timestamp, segment.max_timestamp)
            })
    }

    pub fn config(&self) -> LogConfig {
        self.state.borrow().config.clone()
    }

    /// Replaces the configuration (per-topic overrides). An invalid config is ignored and logged, since
    /// the broker validates overrides before it gets here.
    pub fn set_config(&self, config: LogConfig) {
        match config.validate() {
            Ok(()) => self.state.borrow_mut().config = config,
            Err(reason) => {
                tracing::warn!(dir = %self.dir.display(), %reason, "ignoring invalid log config")
            }
        }
    }

    pub(crate) fn usable(&self, state: &LogState) -> Result<(), StorageError> {
        if state.closed {
            return Err(StorageError::Closed {
                path: self.dir.clone(),
            });
        }
        if let Some(reason) = &state.failed {
            return Err(StorageError::Failed {
                path: self.dir.clone(),
                reason: reason.clone(),
            });
        }
        Ok(())
    }

    fn fail(&self, reason: String) -> StorageError {
        tracing::error!(dir = %self.dir.display(), %reason, "partition log failed; it must be reopened");
        self.state.borrow_mut().failed.get_or_insert(reason.clone());
        self.flush_done.wake_all();
        StorageError::Failed {
            path: self.dir.clone(),
            reason,
        }
    }

    /// Appends a Produce partition's `records` (one or more v2 batches, baseOffset 0 as clients send
    /// them). Every batch is validated first; then offsets are assigned, and all batches go to the file
    /// in one write. With `durable_high_watermark`, or when `flush_interval_messages` is reached, the
    /// call also waits for the group commit that makes the batches durable.
    pub async fn append(&self, records: Bytes, now_ms: i64) -> Result<AppendInfo, AppendError> {
        let (max_message_bytes, segment_bytes) = {
            let state = self.state.borrow();
            (state.config.max_message_bytes, state.config.segment_bytes)
        };
        let validated = batch::validate_records(&records, max_message_bytes)?;
        if self.state.borrow().config.compaction.compact {
            let partition = self.dir.file_name().unwrap_or_default().to_string_lossy();
            super::cleaner::require_keys(&records, &partition)?;
        }
        if records.len() as u64 > segment_bytes {
            return Err(AppendError::RecordBatchTooLarge {
                size: records.len(),
                max: segment_bytes,
            });
        }

        let turn = self.enter_turn().await;
        self.usable(&self.state.borrow())?;
        self.cut_dirty_tail().await?;
        // The sequence check runs under the turn, against the state as of the log end, and its
        // updates are staged and merged only after the write: check, offset assignment and state
        // change are one step, and a failed or cancelled write changes no producer state.
        let plan = self.plan_producer_batches(&validated, now_ms)?;
        if plan.write.is_empty() {
            drop(turn);
            let info = AppendInfo {
                base_offset: plan.base_offset,
                last_offset: plan.last_offset,
                log_start_offset: self.log_start_offset(),
                duplicate: true,
            };
            // The first attempt may still be waiting for its fdatasync; the retry is answered only
            // once the data is as durable as the first answer would have made it.
            if self.state.borrow().config.durable_high_watermark {
                self.flush_through(info.last_offset).await?;
            }
            return Ok(info);
        }
        let batches: Vec<ValidatedBatch> = plan.write.iter().map(|&at| validated[at]).collect();
        let incoming_bytes: u64 = batches.iter().map(|found| found.size_bytes as u64).sum();
        let record_count: i64 = batches
            .iter()
            .map(|batch| i64::from(batch.record_count))
            .sum();
        let incoming_max_timestamp = batches
            .iter()
            .map(|found| found.max_timestamp)
            .max()
            .unwrap_or(-1);
        if self.should_roll(incoming_bytes, record_count, incoming_max_timestamp, now_ms) {
            self.roll_locked(now_ms).await?;
        }

        let (file, position, base_offset) = {
            let state = self.state.borrow();
            let active = state.active();
            (active.log.clone(), active.size_bytes, state.log_end_offset)
        };
        let file = file.open(&self.disk).await?;
        debug_assert_eq!(
            base_offset, plan.first_new_offset,
            "the log end moved under the turn"
        );
        // The batches are not copied: each one's first 16 bytes (the only ones offset assignment
        // changes) are patched in one small buffer, and the file gets [patched prefix, untouched rest]
        // per batch in one `writev`. A 16 KiB copy per append cost little CPU but sat on the
        // single producer's critical path between two writes.
        let prefix = batch::PATCHED_PREFIX_BYTES;
        let mut headers = Vec::with_capacity(batches.len() * prefix);
        let mut next_offset = base_offset;
        for found in &batches {
            let at = headers.len();
            headers.extend_from_slice(&records[found.position..found.position + prefix]);
            batch::assign_offset(&mut headers[at..], next_offset, LEADER_EPOCH);
            next_offset += i64::from(found.record_count);
        }
        let last_offset = next_offset - 1;
        let headers = Bytes::from(headers);
        let mut parts = Vec::with_capacity(batches.len() * 2);
        for (number, found) in batches.iter().enumerate() {
            parts.push(headers.slice(number * prefix..(number + 1) * prefix));
            parts.push(records.slice(found.position + prefix..found.position + found.size_bytes));
        }

        let mut tail_guard = TailGuard {
            log: self,
            done: false,
        };
        let disk = self.disk.clone();
        let target = file.clone();
        let written = self
            .detached(async move {
                disk.write_all_parts_at(target.file(), parts, position)
                    .await
            })
            .await;
        if let Err(source) = written {
            drop(tail_guard);
            let error = StorageError::io("write", file.path(), source);
            // Cut off whatever part of the batches reached the file, so the log stays a clean sequence of
            // whole batches; if even that fails the tail is unknown and the log must be recovered.
            self.cut_dirty_tail().await?;
            return Err(error.into());
        }
        tail_guard.done = true;

        let log_start_offset = {
            let mut state = self.state.borrow_mut();
            let interval = state.config.index_interval_bytes;
            let limits = state.index_limits();
            let durable_high_watermark = state.config.durable_high_watermark;
            let active = state.active_mut();
            let mut batch_offset = base_offset;
            // Positions in the file, not in the request: duplicates left out of the write would
            // otherwise shift them.
            let mut batch_position = position;
            for found in &batches {
                let batch_last = batch_offset + i64::from(found.record_count) - 1;
                active.note_batch(
                    batch_position,
                    found.size_bytes as u64,
                    batch_last,
                    found.max_timestamp,
                    interval,
                    limits,
                );
                batch_position += found.size_bytes as u64;
                batch_offset = batch_last + 1;
            }
            active.first_append_ms.get_or_insert(now_ms);
            active.last_write_ms = now_ms;
            state.log_end_offset = next_offset;
            state.producers.merge(plan.staged);
            state.unflushed_records += record_count as u64;
            state.first_unflushed_ms.get_or_insert(now_ms);
            if !durable_high_watermark {
                state.high_watermark = state.end_position();
            }
            state.check_invariants();
            state.log_start_offset
        };
        drop(turn);
        self.high_watermark_moved.wake_all();

        let must_flush = {
            let state = self.state.borrow();
            state.config.durable_high_watermark
                || state
                    .config
                    .flush_interval_messages
                    .is_some_and(|limit| state.unflushed_records >= limit)
        };
        if must_flush {
            self.flush_through(last_offset).await?;
        }
        Ok(AppendInfo {
            base_offset: plan.base_offset,
            last_offset: last_offset.max(plan.last_offset),
            log_start_offset,
            duplicate: false,
        })
    }

    /// Checks each idempotent batch of an append against the producer state (and against the
    /// batches before it in the same append), in order. Any out-of-order or fenced batch refuses the
    /// whole append; duplicates are left out of the write and answered with their first offsets.
    /// Caller holds the turn.
    fn plan_producer_batches(
        &self,
        batches: &[ValidatedBatch],
        now_ms: i64,
    ) -> Result<ProducerPlan, AppendError> {
        let state = self.state.borrow();
        let first_new_offset = state.log_end_offset;
        let mut staged = state.producers.subset(
            batches
                .iter()
                .filter_map(|found| found.producer.map(|producer| producer.producer_id)),
        );
        let mut plan = ProducerPlan {
            write: Vec::with_capacity(batches.len()),
            first_new_offset,
            base_offset: -1,
            last_offset: -1,
            staged: ProducerStateMap::default(),
        };
        let mut next_offset = first_new_offset;
        for (at, found) in batches.iter().enumerate() {
            let (first, last) = match &found.producer {
                None => (next_offset, next_offset + i64::from(found.record_count) - 1),
                Some(producer) => match staged.check(producer) {
                    SequenceCheck::Append => {
                        staged.apply(producer, next_offset, now_ms);
                        (next_offset, next_offset + i64::from(found.record_count) - 1)
                    }
                    SequenceCheck::Duplicate(original) => {
                        tracing::debug!(dir = %self.dir.display(), producer_id = producer.producer_id,
                            sequence = producer.first_sequence, offset = original.first_offset,
                            "duplicate batch from an idempotent producer; not written again");
                        if plan.base_offset < 0 {
                            plan.base_offset = original.first_offset;
                        }
                        plan.last_offset = plan.last_offset.max(original.last_offset);
                        continue;
                    }
                    SequenceCheck::OutOfOrder { expected_after } => {
                        return Err(AppendError::OutOfOrderSequence(format!(
                            "producer {} epoch {} sent sequence {} but the last one stored is {} in {}",
                            producer.producer_id,
                            producer.epoch,
                            producer.first_sequence,
                            expected_after.map_or_else(
                                || "none of this epoch".to_string(),
                                |last| last.to_string()
                            ),
                            self.dir.display()
                        )));
                    }
                    SequenceCheck::InvalidEpoch { current } => {
                        return Err(AppendError::InvalidProducerEpoch(format!(
                            "producer {} sent epoch {} but its current epoch is {current}",
                            producer.producer_id, producer.epoch
                        )));
                    }
                },
            };
            plan.write.push(at);
            if plan.base_offset < 0 {
                plan.base_offset = first;
            }
            plan.last_offset = plan.last_offset.max(last);
            next_offset = last + 1;
        }
        plan.staged = staged;
        Ok(plan)
    }

    /// The idempotent producers this partition currently knows.
    pub fn producer_count(&self) -> usize {
        self.state.borrow().producers.len()
    }

    /// A copy of one producer's state, for tests and diagnostics.
    pub fn producer_entry(&self, producer_id: i64) -> Option<super::producer_state::ProducerEntry> {
        self.state.borrow().producers.get(producer_id).cloned()
    }

    /// Offsets of the producer-state snapshot files on disk, oldest first.
    pub fn snapshot_offsets(&self) -> Vec<i64> {
        self.state.borrow().snapshot_offsets.clone()
    }

    /// Forgets producers idle for `producer_id_expiration_ms` (Kafka's producer-id expiration,
    /// run by the broker every `producer.id.expiration.check.interval.ms`). Returns how many went.
    pub fn expire_producers(&self, now_ms: i64) -> usize {
        let mut state = self.state.borrow_mut();
        let expiration_ms = state.config.producer_id_expiration_ms;
        state.producers.expire(now_ms, expiration_ms)
    }

    /// Writes a producer-state snapshot at the log end, unless one exists there already, and keeps
    /// only the newest `SNAPSHOTS_KEPT`. Caller holds the turn. A failure is logged and otherwise
    /// ignored: snapshots only shorten the rebuild at open, which is correct without them.
    pub(crate) async fn write_snapshot_locked(&self, now_ms: i64) {
        let (offset, bytes) = {
            let mut state = self.state.borrow_mut();
            let offset = state.log_end_offset;
            state.last_snapshot_ms = now_ms;
            if state.snapshot_offsets.last() == Some(&offset) {
                return;
            }
            (offset, state.producers.encode_snapshot(offset))
        };
        let path = self.dir.join(snapshot_file_name(offset));
        let disk = self.disk.clone();
        let target = path.clone();
        let written = self
            .detached(async move { disk.write_file_atomically(&target, bytes).await })
            .await;
        if let Err(error) = written {
            tracing::warn!(path = %path.display(), %error, "could not write producer-state snapshot");
            return;
        }
        let doomed = {
            let mut state = self.state.borrow_mut();
            state
                .snapshot_offsets
                .retain(|&existing| existing != offset);
            state.snapshot_offsets.push(offset);
            state.snapshot_offsets.sort_unstable();
            let excess = state.snapshot_offsets.len().saturating_sub(SNAPSHOTS_KEPT);
            state.snapshot_offsets.drain(..excess).collect::<Vec<_>>()
        };
        self.remove_snapshots(doomed).await;
    }

    pub(crate) async fn remove_snapshots(&self, offsets: Vec<i64>) {
        for offset in offsets {
            let path = self.dir.join(snapshot_file_name(offset));
            match self.disk.remove_file(&path).await {
                Ok(()) => {}
                Err(error) if error.kind() == std::io::ErrorKind::NotFound => {}
                Err(error) => {
                    tracing::warn!(path = %path.display(), %error, "could not remove old snapshot")
                }
            }
        }
    }

    /// Whether the next append of `incoming_bytes` must start a new segment (Kafka's `shouldRoll`).
    /// The age rule compares record timestamps with record timestamps when both carry one, so a
    /// producer whose clock differs from ours cannot make every append roll.
    fn should_roll(
        &self,
        incoming_bytes: u64,
        record_count: i64,
        incoming_max_timestamp: i64,
        now_ms: i64,
    ) -> bool {
        let state = self.state.borrow();
        let active = state.active();
        if active.size_bytes == 0 {
            return false;
        }
        let config = &state.config;
        let waited_ms = match active.first_batch_timestamp {
            Some(first) if incoming_max_timestamp >= 0 => {
                incoming_max_timestamp.saturating_sub(first)
            }
            _ => active
                .first_append_ms
                .map_or(0, |first| now_ms.saturating_sub(first)),
        };
        active.size_bytes + incoming_bytes > config.segment_bytes
            || waited_ms >= config.segment_ms as i64
            || active.index_full(state.index_limits())
            || state.log_end_offset + record_count - active.base_offset > i64::from(i32::MAX)
    }

    /// Truncates bytes a failed or cancelled write left past the active segment's end. Caller holds the turn.
    async fn cut_dirty_tail(&self) -> Result<(), StorageError> {
        let (file, size) = {
            let state = self.state.borrow();
            if !state.tail_dirty {
                return Ok(());
            }
            (state.active().log.clone(), state.active().size_bytes)
        };
        let disk = self.disk.clone();
        let target = file.clone();
        let result = self
            .detached(async move {
                let target = target.open_io(&disk).await?;
                disk.set_len(target.file(), size).await
            })
            .await;
        match result {
            Ok(()) => {
                self.state.borrow_mut().tail_dirty = false;
                Ok(())
            }
            Err(source) => Err(self.fail(format!(
                "could not truncate {} back to {size} bytes after a failed write: {source}",
                file.path().display()
            ))),
        }
    }

    /// Starts a new segment at the log end offset, if the active one holds data. Takes the turn.
    pub async fn roll(&self, now_ms: i64) -> Result<(), StorageError> {
        let _turn = self.enter_turn().await;
        self.usable(&self.state.borrow())?;
        self.roll_locked(now_ms).await
    }

    /// Makes the active segment complete on disk (data and indexes fdatasync'ed), creates the next
    /// segment, and moves the recovery checkpoint to its start. Caller holds the turn.
    async fn roll_locked(&self, now_ms: i64) -> Result<(), StorageError> {
        let (old_base, old_file, new_base) = {
            let mut state = self.state.borrow_mut();
            let log_end_offset = state.log_end_offset;
            let active = state.active_mut();
            if active.size_bytes == 0 {
                return Ok(());
            }
            active.seal_time_index();
            (active.base_offset, active.log.clone(), log_end_offset)
        };
        // The closed segment's indexes are final: write and sync them now, so a later checkpoint past
        // this segment never depends on them. Its data is synced by the next group commit.
        self.persist_indexes(old_base).await?;
        // As Kafka does at every roll: the producer state as of the new segment's base, so a rebuild
        // at open never has to scan more than the segments after the newest snapshot.
        self.write_snapshot_locked(now_ms).await;
        let segment = self.create_segment(new_base, now_ms).await?;
        let start = LogPosition {
            offset: new_base,
            segment_base: new_base,
            position: 0,
        };
        {
            let mut state = self.state.borrow_mut();
            state.segments.insert(new_base, segment);
            if state.durable.offset == new_base {
                state.durable = start;
            } else {
                state.unsynced_closed.push(old_file);
            }
            if state.high_watermark.offset == new_base {
                state.high_watermark = start;
            }
            state.check_invariants();
        }
        self.high_watermark_moved.wake_all();
        tracing::debug!(dir = %self.dir.display(), base_offset = new_base, "rolled segment");
        Ok(())
    }

    /// Creates the files of a new, empty segment and makes their names durable.
    pub(crate) async fn create_segment(
        &self,
        base_offset: i64,
        now_ms: i64,
    ) -> Result<Segment, StorageError> {
        let disk = self.disk.clone();
        let dir = self.dir.clone();
        self.detached(async move {
            let stem = segment_stem(base_offset);
            let log_path = dir.join(format!("{stem}.log"));
            let file = disk
                .open_rw(&log_path, true)
                .await
                .map_err(|source| StorageError::io("create", &log_path, source))?;
            // A file of this name can only be a leftover of a roll that crashed before its first
            // append.
            disk.set_len(&file, 0)
                .await
                .map_err(|source| StorageError::io("truncate", &log_path, source))?;
            let (handle, _) = SegmentHandle::adopt(file, log_path, base_offset);
            let segment = Segment::new(&dir, base_offset, handle, now_ms);
            for path in [&segment.index_path, &segment.time_index_path] {
                let index = disk
                    .open_rw(path, true)
                    .await
                    .map_err(|source| StorageError::io("create", path, source))?;
                disk.set_len(&index, 0)
                    .await
                    .map_err(|source| StorageError::io("truncate", path, source))?;
            }
            disk.sync_dir(&dir)
                .await
                .map_err(|source| StorageError::io("fsync", &dir, source))?;
            Ok(segment)
        })
        .await
    }

    /// Appends a segment's new index entries to its `.index` and `.timeindex` files and fdatasyncs them.
    pub(crate) async fn persist_indexes(&self, base_offset: i64) -> Result<(), StorageError> {
        let snapshot = {
            let state = self.state.borrow();
            state.segments.get(&base_offset).and_then(|segment| {
                let index = &segment.index;
                let nothing_new = index.persisted_offsets == index.offsets.len()
                    && index.persisted_times == index.times.len()
                    && !index.files_stale;
                (!nothing_new).then(|| {
                    [
                        (
                            index.unpersisted_offset_bytes(),
                            (index.persisted_offsets * OFFSET_ENTRY_BYTES) as u64,
                            segment.index_path.clone(),
                        ),
                        (
                            index.unpersisted_time_bytes(),
                            (index.persisted_times * TIME_ENTRY_BYTES) as u64,
                            segment.time_index_path.clone(),
                        ),
                    ]
                })
            })
        };
        let Some(files) = snapshot else {
            return Ok(());
        };
        let counts = {
            let state = self.state.borrow();
            let index = &state.segments[&base_offset].index;
            (index.offsets.len(), index.times.len())
        };
        let disk = self.disk.clone();
        self.detached(async move {
            for (bytes, at, path) in files {
                let file = disk
                    .open_rw(&path, true)
                    .await
                    .map_err(|source| StorageError::io("open", &path, source))?;
                // Cut anything past the persisted entries (a torn earlier write, or entries recovery
                // dropped) before appending.
                disk.set_len(&file, at)
                    .await
                    .map_err(|source| StorageError::io("truncate", &path, source))?;
                if !bytes.is_empty() {
                    disk.write_all_at(&file, bytes, at)
                        .await
                        .map_err(|source| StorageError::io("write", &path, source))?;
                }
                disk.sync_data(&file)
                    .await
                    .map_err(|source| StorageError::io("fdatasync", &path, source))?;
            }
            Ok::<(), StorageError>(())
        })
        .await?;
        if let Some(segment) = self.state.borrow_mut().segments.get_mut(&base_offset) {
            segment.index.persisted_offsets = segment.index.persisted_offsets.max(counts.0);
            segment.index.persisted_times = segment.index.persisted_times.max(counts.1);
            segment.index.files_stale = false;
        }
        Ok(())
    }

    pub(crate) async fn write_checkpoint(
        &self,
        checkpoint: Checkpoint,
    ) -> Result<(), StorageError> {
        let path = self.dir.join(RECOVERY_CHECKPOINT_FILE);
        let disk = self.disk.clone();
        self.detached(async move {
            disk.write_file_atomically(&path, checkpoint.encode())
                .await
                .map_err(|source| StorageError::io("write checkpoint", &path, source))
        })
        .await?;
        self.state.borrow_mut().checkpoint = Some(checkpoint);
        Ok(())
    }

    /// Group commit: resolves once every offset up to `offset` (or up to the log end, if `offset` is past
    /// it) is fdatasync'ed. One fdatasync covers everything appended before it started; callers that
    /// arrive while it runs wait for it and, if it did not cover them, one of them leads the next.
    pub async fn wait_durable(&self, offset: i64) -> Result<(), StorageError> {
        self.flush_through(offset).await
    }

    pub(crate) async fn flush_through(&self, offset: i64) -> Result<(), StorageError> {
        let target = offset.min(self.state.borrow().log_end_offset - 1);
        // Bounded: each round returns, waits for a running flush to end, or leads a flush that covers
        // the log end as it was when this call started, so at most two flushes pass before `target`
        // is covered.
        loop {
            {
                let state = self.state.borrow();
                if target < state.durable.offset {
                    return Ok(());
                }
                self.usable(&state)?;
            }
            if self.state.borrow().flush_in_flight {
                self.flush_done
                    .wait_until(|| {
                        let state = self.state.borrow();
                        !state.flush_in_flight || state.failed.is_some() || state.closed
                    })
                    .await;
                continue;
            }
            self.lead_flush().await?;
        }
    }

    /// Runs one fdatasync of the active segment and publishes what it made durable.
    async fn lead_flush(&self) -> Result<(), StorageError> {
        let (mut files, target, records) = {
            let mut state = self.state.borrow_mut();
            state.flush_in_flight = true;
            (
                state.unsynced_closed.clone(),
                state.end_position(),
                state.unflushed_records,
            )
        };
        let closed_count = files.len();
        files.push(self.state.borrow().active().log.clone());
        let leader = FlushLeader { log: self };
        let mut result = Ok(());
        let mut file = files[0].clone();
        // Oldest first: the durable offset may only move once every byte before it is synced.
        // fdatasync acts on the inode, so a descriptor reopened after eviction syncs what an
        // evicted one wrote.
        for candidate in files {
            file = candidate;
            result = match file.open_io(&self.disk).await {
                Ok(open) => self.disk.sync_data(open.file()).await,
                Err(error) => Err(error),
            };
            if result.is_err() {
                break;
            }
        }
        match result {
            Ok(()) => {
                let mut state = self.state.borrow_mut();
                // Rolls during the flush only append to the list, so its first entries are the synced ones.
                state.unsynced_closed.drain(..closed_count);
                if target.offset > state.durable.offset {
                    state.durable = target;
                    state.unflushed_records = state.unflushed_records.saturating_sub(records);
                    if state.durable.offset == state.log_end_offset {
                        state.unflushed_records = 0;
                        state.first_unflushed_ms = None;
                    }
                    if state.config.durable_high_watermark
                        && target.offset > state.high_watermark.offset
                    {
                        state.high_watermark = target;
                    }
                }
                state.check_invariants();
            }
            Err(source) => {
                drop(leader);
                // After a failed fdatasync the page cache may have dropped the dirty pages (Linux marks
                // them clean), so later syncs could falsely succeed: stop here and let recovery decide.
                return Err(self.fail(format!(
                    "fdatasync of {} failed: {source}",
                    file.path().display()
                )));
            }
        }
        // Still the leader, so recovery-point writes happen one at a time and in order.
        self.write_recovery_point(target).await;
        drop(leader);
        self.high_watermark_moved.wake_all();
        Ok(())
    }

    /// Records `durable` as the recovery point: one small in-place write after the fdatasync that made
    /// it durable, synced later by the periodic checkpoint (see `recovery_point.rs`). A failure only
    /// leaves an older point, which widens the next recovery scan, so it is logged and not returned.
    pub(crate) async fn write_recovery_point(&self, durable: LogPosition) {
        let checkpoint = Checkpoint {
            offset: durable.offset,
            segment_base: durable.segment_base,
            position: durable.position,
        };
        let Some((at, bytes)) = self.recovery_point.borrow_mut().prepare(checkpoint) else {
            return;
        };
        let (handle, path) = {
            let point = self.recovery_point.borrow();
            (point.handle(), point.path().to_path_buf())
        };
        // Through the shard's descriptor cache: thousands of partitions do not each keep it open.
        let file = match handle.open_creating(&self.disk).await {
            Ok(file) => file,
            Err(error) => {
                tracing::warn!(%error, "could not open the recovery point file");
                return;
            }
        };
        match self.disk.write_all_at(file.file(), bytes, at).await {
            Ok(()) => self.recovery_point.borrow_mut().written(checkpoint),
            Err(error) => {
                tracing::warn!(path = %path.display(), %error, "could not write the recovery point")
            }
        }
    }

    /// fdatasyncs the recovery-point file, so the point survives a power failure too; nothing to do
    /// when nothing was written since the last sync.
    pub(crate) async fn sync_recovery_point(&self) -> Result<(), StorageError> {
        let (unsynced, handle) = {
            let point = self.recovery_point.borrow();
            (point.unsynced(), point.handle())
        };
        let Some(sequence) = unsynced else {
            return Ok(());
        };
        // A descriptor reopened after eviction syncs what an evicted one wrote (same inode).
        let file = handle.open(&self.disk).await?;
        self.disk
            .sync_data(file.file())
            .await
            .map_err(|source| StorageError::io("fdatasync", handle.path(), source))?;
        self.recovery_point.borrow_mut().synced(sequence);
        Ok(())
    }

    /// Resolves when `high_watermark() > offset`, or when the log closes. Dropping it is safe at any time.
    pub async fn wait_high_watermark_above(&self, offset: i64) {
        self.high_watermark_moved
            .wait_until(|| {
                let state = self.state.borrow();
                state.high_watermark.offset > offset || state.closed
            })
            .await;
    }

    /// Returns the file range holding `offset`: from the start of the batch that contains it, up to
    /// `max_bytes`, never past the high watermark or the end of that segment. With `min_one_batch`, the
    /// first batch is returned whole even if it is larger than `max_bytes`; without it, a first batch
    /// that does not fit gives an empty range (Kafka's KIP-74 rules). `offset == high_watermark()` (and
    /// anything up to the log end) gives an empty range.
    pub async fn read(
        &self,
        offset: i64,
        max_bytes: u32,
        min_one_batch: bool,
    ) -> Result<ReadSlice, ReadError> {
        // Bounded: a retry follows only a cleaner swap of the chosen segment during its open.
        let mut attempts = 0;
        let (file, scan_from, limit, anchor) = loop {
            attempts += 1;
            let (handle, scan_from, limit, anchor) = 'chosen: {
                let state = self.state.borrow();
                self.usable_for_read(&state)?;
                if offset < state.log_start_offset || offset > state.log_end_offset {
                    return Err(ReadError::OffsetOutOfRange {
                        offset,
                        log_start_offset: state.log_start_offset,
                        log_end_offset: state.log_end_offset,
                    });
                }
                let high_watermark = state.high_watermark;
                if offset >= high_watermark.offset {
                    let segment = state
                        .segments
                        .get(&high_watermark.segment_base)
                        .unwrap_or_else(|| state.active());
                    // Nothing to send: an empty scan range gives the empty slice below.
                    let position = high_watermark.position.min(segment.size_bytes);
                    break 'chosen (segment.log.clone(), position, position, None);
                }
                if let Some(range) = self
                    .damaged
                    .borrow()
                    .iter()
                    .find(|range| range.contains(offset))
                {
                    return Err(ReadError::Corrupt {
                        offset,
                        detail: format!(
                            "offsets {}..{} were lost to damage and quarantined in {}: {}",
                            range.first_offset,
                            range.end_offset,
                            super::quarantine::quarantine_dir(&self.dir).display(),
                            range.reason
                        ),
                    });
                }
                let (_, segment) = state
                    .segments
                    .range(..=offset)
                    .next_back()
                    .expect("offset >= log start, the first segment's base");
                Self::read_target(segment, offset, high_watermark)
            };
            if let Some(file) = self.open_for_read(&handle, offset, attempts >= 4).await? {
                break (file, scan_from, limit, anchor);
            }
        };
        // Bounded: each round moves to a later segment, or past a damaged span, or stops.
        let mut found = self
            .find_batch(&file, scan_from, limit, anchor, |header| {
                header.last_offset() >= offset
            })
            .await?;
        let mut file = file;
        let mut limit = limit;
        let (position, header) = loop {
            match found {
                Found::Batch(position, header, _) => {
                    // A batch the scrubber found damaged (a bad CRC) has a valid header: the read
                    // must not serve it.
                    let known = self
                        .damaged_spans
                        .borrow()
                        .get(&(file.base_offset(), position))
                        .copied();
                    let Some(after) = known else {
                        break (position, header);
                    };
                    match after {
                        Some((next_position, next_base)) if offset >= next_base => {
                            found = self
                                .find_batch(&file, next_position, limit, None, |header| {
                                    header.last_offset() >= offset
                                })
                                .await?;
                        }
                        _ => {
                            return Err(ReadError::Corrupt {
                                offset,
                                detail: format!(
                                    "the batch at byte {position} of {} failed verification",
                                    file.path().display()
                                ),
                            });
                        }
                    }
                }
                Found::Nothing => {
                    // No batch in this segment reaches the offset. Below the high watermark that means
                    // the segment ends early (offsets between it and the next segment were lost and
                    // not recorded): as Kafka does, the read moves on to the next segment.
                    let next = {
                        let state = self.state.borrow();
                        let high_watermark = state.high_watermark;
                        state
                            .segments
                            .range(file.base_offset() + 1..)
                            .next()
                            .filter(|(base, _)| **base < high_watermark.offset)
                            .map(|(_, segment)| Self::read_target(segment, offset, high_watermark))
                    };
                    let Some((next_handle, next_from, next_limit, next_anchor)) = next else {
                        // The batch lies past the high watermark position (it moved back under us
                        // only if the segment was recovered); nothing to send.
                        return Ok(ReadSlice {
                            file,
                            position: limit,
                            len: 0,
                        });
                    };
                    let Some(next_file) = self.open_for_read(&next_handle, offset, false).await?
                    else {
                        // The cleaner swapped the next segment in meanwhile: nothing to send now,
                        // the consumer's next fetch reads it.
                        return Ok(ReadSlice {
                            file,
                            position: limit,
                            len: 0,
                        });
                    };
                    (file, limit) = (next_file, next_limit);
                    found = self
                        .find_batch(&file, next_from, limit, next_anchor, |header| {
                            header.last_offset() >= offset
                        })
                        .await?;
                }
                Found::Damaged { position, detail } => {
                    let after = self
                        .note_damage(&file, position, limit, offset, &detail)
                        .await?;
                    match after {
                        Some((next_position, next_base)) if offset >= next_base => {
                            found = self
                                .find_batch(&file, next_position, limit, None, |header| {
                                    header.last_offset() >= offset
                                })
                                .await?;
                        }
                        _ => return Err(ReadError::Corrupt { offset, detail }),
                    }
                }
            }
        };
        // A range that starts before a known damaged span ends at it, so a consumer reads up to the
        // damage and its next fetch, at the damaged offset, gets the error.
        let limit = self
            .damaged_spans
            .borrow()
            .range((file.base_offset(), position + 1)..(file.base_offset() + 1, 0))
            .next()
            .map_or(limit, |((_, damaged_at), _)| (*damaged_at).min(limit));
        let available = limit - position;
        let first_batch = header.size_bytes.min(available);
        let len = if u64::from(max_bytes) >= first_batch {
            available.min(u64::from(max_bytes))
        } else if min_one_batch {
            first_batch
        } else {
            0
        };
        Ok(ReadSlice {
            file,
            position,
            len: len.min(u64::from(u32::MAX)) as u32,
        })
    }

    /// Opens a segment for a read through the descriptor cache. Retention may have deleted the
    /// segment since the read chose it (before, the read held its descriptor); the read then gets
    /// the answer it would get had it come a moment later: the offset is out of range. `None` if the
    /// cleaner swapped another file in under the segment's name meanwhile (the positions the read
    /// chose belong to the old file): the caller chooses again, unless `accept_swapped`.
    async fn open_for_read(
        &self,
        handle: &SegmentHandle,
        offset: i64,
        accept_swapped: bool,
    ) -> Result<Option<SegmentFile>, ReadError> {
        match handle.open(&self.disk).await {
            Ok(file) => {
                let state = self.state.borrow();
                let swapped = state
                    .segments
                    .get(&handle.base_offset())
                    .is_some_and(|current| !current.log.same(handle));
                if swapped && !accept_swapped {
                    return Ok(None);
                }
                Ok(Some(file))
            }
            Err(error) => {
                let state = self.state.borrow();
                let gone = !state.segments.contains_key(&handle.base_offset());
                if gone && offset < state.log_start_offset {
                    return Err(ReadError::OffsetOutOfRange {
                        offset,
                        log_start_offset: state.log_start_offset,
                        log_end_offset: state.log_end_offset,
                    });
                }
                Err(error.into())
            }
        }
    }

    /// Where the intact batches resume after damaged bytes at `position` of `file`: the next position
    /// holding a whole, CRC-valid batch, and its base offset; `None` if nothing intact follows before
    /// `limit`. Found once per damaged position (a search of up to the rest of the segment), logged at
    /// ERROR then, and remembered, so a consumer retrying at a damaged offset costs a map lookup.
    pub(crate) async fn note_damage(
        &self,
        file: &SegmentFile,
        position: u64,
        limit: u64,
        offset: i64,
        detail: &str,
    ) -> Result<Option<IntactAfter>, StorageError> {
        let key = (file.base_offset(), position);
        if let Some(known) = self.damaged_spans.borrow().get(&key) {
            return Ok(*known);
        }
        let after =
            super::recovery::find_next_batch(&self.disk, file, position, limit, file.base_offset())
                .await?
                .map(|(next_position, header)| (next_position, header.base_offset));
        self.damaged_found.set(self.damaged_found.get() + 1);
        tracing::error!(
            path = %file.path().display(),
            position,
            offset,
            intact_from_position = after.map(|(next_position, _)| next_position),
            intact_from_offset = after.map(|(_, next_base)| next_base),
            %detail,
            "damaged record batch in the log; fetches at its offsets get CORRUPT_MESSAGE"
        );
        self.damaged_spans.borrow_mut().insert(key, after);
        Ok(after)
    }

    /// Damaged batches found since the log was opened, by reads and by the scrubber.
    pub fn damaged_batches_found(&self) -> u64 {
        self.damaged_found.get()
    }

    /// The file, scan start, readable end of `segment` for a read at `offset`, and the last offset of
    /// the batch at the scan start when an index entry says so.
    fn read_target(
        segment: &Segment,
        offset: i64,
        high_watermark: LogPosition,
    ) -> (SegmentHandle, u64, u64, Option<i64>) {
        let limit = if segment.base_offset < high_watermark.segment_base {
            segment.size_bytes
        } else if segment.base_offset == high_watermark.segment_base {
            high_watermark.position
        } else {
            0
        };
        let entry = segment.index.lookup_entry(segment.relative(offset));
        let scan_from = entry.map_or(0, |entry| u64::from(entry.position));
        let anchor = entry.map(|entry| segment.base_offset + i64::from(entry.relative_offset));
        (segment.log.clone(), scan_from, limit, anchor)
    }

    fn usable_for_read(&self, state: &LogState) -> Result<(), StorageError> {
        if state.closed {
            return Err(StorageError::Closed {
                path: self.dir.clone(),
            });
        }
        Ok(())
    }

    /// Walks batch headers from `position` (a batch start) up to `limit` and returns the first batch
    /// for which `wanted` holds: its position, header and full 61-byte header bytes. `limit` is always
    /// a batch boundary (a segment's end or the high-watermark position), so a header that does not
    /// parse or a batch that runs past `limit` is damage, reported as `Found::Damaged`: answering
    /// "nothing" there would leave a consumer at that offset polling forever.
    ///
    /// Offsets must rise from batch to batch, and the batch at `position` must end at `anchor` when the
    /// caller knows it from an index entry: a damaged baseOffset (which the CRC does not cover) would
    /// otherwise make the walk answer with the wrong batch.
    async fn find_batch(
        &self,
        file: &SegmentFile,
        mut position: u64,
        limit: u64,
        anchor: Option<i64>,
        mut wanted: impl FnMut(&BatchHeader) -> bool,
    ) -> Result<Found, StorageError> {
        let mut chunk: Vec<u8> = Vec::new();
        let mut chunk_start = 0u64;
        let mut previous_last: Option<i64> = None;
        // Bounded: each round advances by one whole batch (at least 61 bytes) or returns.
        while position < limit {
            if position + HEADER_PREFIX_BYTES as u64 > limit {
                return Ok(Found::Damaged {
                    position,
                    detail: format!(
                        "{} bytes before the end of the readable range, less than a batch header",
                        limit - position
                    ),
                });
            }
            let have = position >= chunk_start
                && position + BATCH_HEADER_BYTES as u64 <= chunk_start + chunk.len() as u64;
            if !have {
                let want = (limit - position).min(READ_SCAN_CHUNK_BYTES as u64) as usize;
                chunk = self
                    .disk
                    .read_at(file.file(), want.max(BATCH_HEADER_BYTES), position)
                    .await
                    .map_err(|source| StorageError::io("read", file.path(), source))?;
                chunk_start = position;
            }
            let from = (position - chunk_start) as usize;
            let header_bytes =
                &chunk[from.min(chunk.len())..(from + BATCH_HEADER_BYTES).min(chunk.len())];
            let Some(header) = BatchHeader::parse_prefix(header_bytes) else {
                return Ok(Found::Damaged {
                    position,
                    detail: format!(
                        "no valid batch header at byte {position} (bad batchLength, magic or lastOffsetDelta, or the file ends early)"
                    ),
                });
            };
            if position + header.size_bytes > limit {
                return Ok(Found::Damaged {
                    position,
                    detail: format!(
                        "batch at byte {position} claims {} bytes, past the end of the readable range at {limit}",
                        header.size_bytes
                    ),
                });
            }
            let out_of_order = match previous_last {
                Some(last) => header.base_offset <= last,
                None => anchor.is_some_and(|anchor| header.last_offset() != anchor),
            };
            if out_of_order || header.base_offset < file.base_offset() {
                return Ok(Found::Damaged {
                    position,
                    detail: format!(
                        "batch at byte {position} claims offsets {}..={}, out of order with the batches before it",
                        header.base_offset,
                        header.last_offset()
                    ),
                });
            }
            if wanted(&header) {
                return Ok(Found::Batch(position, header, header_bytes.to_vec()));
            }
            previous_last = Some(header.last_offset());
            position += header.size_bytes;
        }
        Ok(Found::Nothing)
    }

    /// Like `read`, but returns the bytes themselves.
    pub async fn read_copy(
        &self,
        offset: i64,
        max_bytes: u32,
        min_one_batch: bool,
    ) -> Result<Bytes, ReadError> {
        let slice = self.read(offset, max_bytes, min_one_batch).await?;
        if slice.len == 0 {
            return Ok(Bytes::new());
        }
        let bytes = self
            .disk
            .read_at(slice.file.file(), slice.len as usize, slice.position)
            .await
            .map_err(|source| StorageError::io("read", slice.file.path(), source))?;
        Ok(Bytes::from(bytes))
    }

    /// ListOffsets by timestamp: the first offset whose record timestamp is at least `timestamp_ms`,
    /// with that timestamp, among data below the high watermark. For compressed batches the answer is
    /// the batch's first offset and its max timestamp (the records are not decompressed).
    pub async fn offset_for_timestamp(
        &self,
        timestamp_ms: i64,
    ) -> Result<Option<(i64, i64)>, StorageError> {
        let (file, scan_from, limit, not_before) = {
            let state = self.state.borrow();
            self.usable_for_read(&state)?;
            let high_watermark = state.high_watermark;
            let Some(segment) = state.segments.values().find(|segment| {
                segment.max_timestamp >= timestamp_ms && segment.base_offset < high_watermark.offset
            }) else {
                return Ok(None);
            };
            let limit = if segment.base_offset < high_watermark.segment_base {
                segment.size_bytes
            } else {
                high_watermark.position
            };
            let start_offset =
                segment.base_offset + i64::from(segment.index.lookup_time(timestamp_ms));
            let scan_from = u64::from(segment.index.lookup(segment.relative(start_offset)));
            (
                segment.log.clone(),
                scan_from,
                limit,
                state.log_start_offset,
            )
        };
        let file = file.open(&self.disk).await?;
        // Walk batches whose max timestamp reaches the target; read the whole batch to find the record.
        let mut position = scan_from;
        while position < limit {
            let (at, header, header_bytes) = match self
                .find_batch(&file, position, limit, None, |_| true)
                .await?
            {
                Found::Batch(at, header, header_bytes) => (at, header, header_bytes),
                Found::Nothing => break,
                Found::Damaged { position, detail } => {
                    return Err(StorageError::Malformed {
                        what: "record batch",
                        path: file.path().to_path_buf(),
                        detail: format!("at byte {position}: {detail}"),
                    });
                }
            };
            if batch::max_timestamp(&header_bytes) >= timestamp_ms
                && header.last_offset() >= not_before
            {
                let whole = self
                    .disk
                    .read_at(file.file(), header.size_bytes as usize, at)
                    .await
                    .map_err(|source| StorageError::io("read", file.path(), source))?;
                let answer = batch::first_record_at_or_after(&whole, timestamp_ms)
                    .unwrap_or((header.base_offset, batch::max_timestamp(&header_bytes)));
                return Ok(Some((answer.0.max(not_before), answer.1)));
            }
            position = at + header.size_bytes;
        }
        Ok(None)
    }

    /// Time-driven work: fdatasync when unflushed data is older than `flush_interval_ms`, roll a segment
    /// older than `segment_ms`, and rewrite the recovery checkpoint every `recovery_checkpoint_interval_ms`.
    pub async fn tick(&self, now_ms: i64) -> Result<(), StorageError> {
        let (flush_due, roll_due, checkpoint_due, snapshot_due) = {
            let state = self.state.borrow();
            self.usable(&state)?;
            let flush_due = state.config.flush_interval_ms.is_some_and(|interval| {
                state
                    .first_unflushed_ms
                    .is_some_and(|first| now_ms.saturating_sub(first) >= interval as i64)
            });
            let active = state.active();
            let roll_due = active.size_bytes > 0
                && active.first_append_ms.is_some_and(|first| {
                    now_ms.saturating_sub(first) >= state.config.segment_ms as i64
                });
            // A roll leaves its segment unsynced; the next tick syncs it and moves the checkpoint
            // past it, which is when Kafka's asynchronous flush-on-roll happens too.
            let rolled = !state.unsynced_closed.is_empty();
            let flush_due = flush_due || rolled;
            let interval_passed = now_ms.saturating_sub(state.last_checkpoint_ms)
                >= state.config.recovery_checkpoint_interval_ms as i64;
            let checkpoint_behind = state
                .checkpoint
                .is_none_or(|checkpoint| checkpoint.offset < state.durable.offset);
            let checkpoint_due = rolled || (interval_passed && checkpoint_behind);
            let snapshot_due = now_ms.saturating_sub(state.last_snapshot_ms)
                >= state.config.recovery_checkpoint_interval_ms as i64
                && state.snapshot_offsets.last() != Some(&state.log_end_offset);
            (flush_due, roll_due, checkpoint_due, snapshot_due)
        };
        if flush_due {
            self.flush_through(i64::MAX).await?;
        }
        if roll_due || checkpoint_due {
            let _turn = self.enter_turn().await;
            self.usable(&self.state.borrow())?;
            if roll_due {
                self.roll_locked(now_ms).await?;
            } else {
                self.checkpoint_locked(now_ms).await?;
            }
        }
        if snapshot_due && !roll_due {
            // A periodic snapshot bounds the producer-state rebuild after a crash the way the
            // checkpoint bounds the CRC scan.
            let _turn = self.enter_turn().await;
            self.usable(&self.state.borrow())?;
            self.write_snapshot_locked(now_ms).await;
        }
        Ok(())
    }

    /// Persists the active segment's indexes and records the durable position as the recovery
    /// checkpoint. Caller holds the turn.
    async fn checkpoint_locked(&self, now_ms: i64) -> Result<(), StorageError> {
        let (active_base, durable) = {
            let state = self.state.borrow();
            (state.active().base_offset, state.durable)
        };
        self.persist_indexes(active_base).await?;
        // Closed segments' indexes were synced when they rolled, so the durable position may lie in
        // any segment.
        self.write_checkpoint(Checkpoint {
            offset: durable.offset,
            segment_base: durable.segment_base,
            position: durable.position,
        })
        .await?;
        // The per-fdatasync recovery point is only in the page cache until here.
        self.sync_recovery_point().await?;
        self.state.borrow_mut().last_checkpoint_ms = now_ms;
        Ok(())
    }

    /// Deletes the oldest segment `base` (whose successor starts at `next_base`) for retention or
    /// DeleteRecords. The `.log` goes first: once it is gone the segment is gone, and orphaned index
    /// files are cleaned up at the next open. The log start moves to at least `next_base`.
    pub(crate) async fn unlink_oldest_segment(
        &self,
        base: i64,
        next_base: i64,
        log_path: &Path,
    ) -> Result<(), StorageError> {
        let disk = self.disk.clone();
        let doomed = log_path.to_path_buf();
        match self
            .detached(async move { disk.remove_file(&doomed).await })
            .await
        {
            Ok(()) => {}
            // A cancelled earlier pass may already have removed it.
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => {}
            Err(source) => return Err(StorageError::io("remove_file", log_path, source)),
        }
        let removed = {
            let mut state = self.state.borrow_mut();
            let removed = state.segments.remove(&base);
            // DeleteRecords may have moved the start past this segment already.
            state.log_start_offset = state.log_start_offset.max(next_base);
            state.check_invariants();
            removed
        };
        if let Some(segment) = removed {
            for path in [&segment.index_path, &segment.time_index_path] {
                if let Err(error) = self.disk.remove_file(path).await {
                    tracing::warn!(path = %path.display(), %error, "could not remove index file");
                }
            }
        }
        Ok(())
    }

    /// Deletes the oldest whole segments that are past `retention_ms` (judged by their largest
    /// timestamp) or beyond `retention_bytes`. Never the active segment, never data at or above the
    /// high watermark. Readers holding a segment's file keep reading it until they drop it.
    pub async fn enforce_retention(&self, now_ms: i64) -> Result<RetentionOutcome, StorageError> {
        let _turn = self.enter_turn().await;
        self.usable(&self.state.borrow())?;
        let mut outcome = RetentionOutcome {
            log_start_offset: self.log_start_offset(),
            ..RetentionOutcome::default()
        };
        // `cleanup.policy=compact` alone keeps data until the cleaner supersedes it.
        if !self.state.borrow().config.compaction.delete {
            return Ok(outcome);
        }
        // Bounded by the number of segments: each round deletes the oldest one or stops.
        loop {
            let victim = {
                let state = self.state.borrow();
                let mut bases = state.segments.keys();
                let (Some(&oldest), Some(&next_base)) = (bases.next(), bases.next()) else {
                    break;
                };
                if next_base > state.high_watermark.offset {
                    break;
                }
                let segment = &state.segments[&oldest];
                let total: u64 = state
                    .segments
                    .values()
                    .map(|segment| segment.size_bytes)
                    .sum();
                let newest_ms = if segment.max_timestamp >= 0 {
                    segment.max_timestamp
                } else {
                    segment.last_write_ms
                };
                let too_old = state
                    .config
                    .retention_ms
                    .is_some_and(|retention| now_ms.saturating_sub(newest_ms) > retention as i64);
                let too_big = state
                    .config
                    .retention_bytes
                    .is_some_and(|retention| total - segment.size_bytes >= retention);
                if !(too_old || too_big) {
                    break;
                }
                (
                    oldest,
                    next_base,
                    segment.log.path().to_path_buf(),
                    segment.size_bytes,
                )
            };
            let (base, next_base, log_path, size_bytes) = victim;
            self.unlink_oldest_segment(base, next_base, &log_path)
                .await?;
            tracing::info!(dir = %self.dir.display(), base_offset = base, size_bytes, "retention deleted segment");
            outcome.deleted_segments += 1;
            outcome.deleted_bytes += size_bytes;
            outcome.log_start_offset = self.log_start_offset();
        }
        if outcome.deleted_segments > 0 {
            // Snapshots below the new log start describe deleted data; the newest is kept whatever
            // its offset, since it still holds producers that may retry.
            let doomed = {
                let mut state = self.state.borrow_mut();
                let log_start = state.log_start_offset;
                let newest = state.snapshot_offsets.last().copied();
                let (doomed, kept): (Vec<i64>, Vec<i64>) = state
                    .snapshot_offsets
                    .iter()
                    .partition(|&&offset| offset < log_start && Some(offset) != newest);
                state.snapshot_offsets = kept;
                doomed
            };
            self.remove_snapshots(doomed).await;
        }
        Ok(outcome)
    }

    /// Flushes everything, persists the indexes and the checkpoint, and writes the clean-shutdown marker
    /// so the next open skips the recovery scan. A log that failed earlier is closed without the
    /// marker (the next open recovers it) and the failure is returned.
    pub async fn close(&self) -> Result<(), StorageError> {
        self.close_with_marker(true).await
    }

    /// `close`, except that the clean-shutdown marker is written without its own fsync: the caller
    /// closes many logs and then makes every marker durable with one `dirs::sync_filesystem`.
    /// Everything the marker vouches for (data, indexes, checkpoint, snapshot) is durable before the
    /// marker is created, so a crash before that sync leaves either no marker (a recovery scan) or a
    /// marker that is true.
    pub async fn close_deferring_marker_sync(&self) -> Result<(), StorageError> {
        self.close_with_marker(false).await
    }

    async fn close_with_marker(&self, sync_marker: bool) -> Result<(), StorageError> {
        let _turn = self.enter_turn().await;
        if self.state.borrow().closed {
            return Ok(());
        }
        let result = self.close_locked(sync_marker).await;
        self.state.borrow_mut().closed = true;
        self.high_watermark_moved.wake_all();
        self.flush_done.wake_all();
        result
    }

    async fn close_locked(&self, sync_marker: bool) -> Result<(), StorageError> {
        self.usable(&self.state.borrow())?;
        self.cut_dirty_tail().await?;
        self.flush_through(i64::MAX).await?;
        let active_base = {
            let mut state = self.state.borrow_mut();
            state.active_mut().seal_time_index();
            state.active().base_offset
        };
        let bases: Vec<i64> = self.state.borrow().segments.keys().copied().collect();
        for base in bases {
            self.persist_indexes(base).await?;
        }
        let end = self.state.borrow().end_position();
        debug_assert_eq!(end.segment_base, active_base);
        let checkpoint = Checkpoint {
            offset: end.offset,
            segment_base: end.segment_base,
            position: end.position,
        };
        // An idle partition's checkpoint is already at its end: rewriting it would cost two fsyncs
        // per partition at every shutdown.
        if self.state.borrow().checkpoint != Some(checkpoint) {
            self.write_checkpoint(checkpoint).await?;
        }
        // The recovery point too, so it never lags the checkpoint; unchanged, it costs nothing.
        self.write_recovery_point(end).await;
        self.sync_recovery_point().await?;
        // The producer state as of the log end, so the next open needs no rebuild scan. An empty
        // log has nothing to rebuild from, so it gets none (two fsyncs per idle partition saved).
        let empty = {
            let state = self.state.borrow();
            state.log_end_offset == state.log_start_offset
        };
        if !empty {
            self.write_snapshot_locked(
                super::recovery::wall_clock_ms(std::time::SystemTime::now()),
            )
            .await;
        }
        let marker = self.dir.join(CLEAN_SHUTDOWN_FILE);
        if sync_marker {
            self.disk
                .write_file_atomically(&marker, b"clean\n".to_vec())
                .await
                .map_err(|source| StorageError::io("write clean marker", &marker, source))?;
        } else {
            // Only the marker's name matters to the next open, so it needs no rename either.
            let file = self
                .disk
                .open_rw(&marker, true)
                .await
                .map_err(|source| StorageError::io("write clean marker", &marker, source))?;
            self.disk
                .write_all_at(&file, b"clean\n".to_vec(), 0)
                .await
                .map_err(|source| StorageError::io("write clean marker", &marker, source))?;
        }
        Ok(())
    }

    /// Removes the partition's directory: it is first renamed to `<name>.<id>-delete` (so a crash
    /// midway leaves a directory that `remove_deleted_partition_dirs` finishes), then emptied and removed.
    /// Readers still holding a segment file keep their descriptor until they drop it.
    pub async fn delete(&self) -> Result<(), StorageError> {
        let _turn = self.enter_turn().await;
        self.state.borrow_mut().closed = true;
        self.high_watermark_moved.wake_all();
        self.flush_done.wake_all();
        let name = self
            .dir
            .file_name()
            .map(|name| name.to_string_lossy().into_owned())
            .unwrap_or_default();
        let parent = self.dir.parent().map(Path::to_path_buf).unwrap_or_default();
        let doomed = parent.join(format!(
            "{name}.{}{DELETE_DIR_SUFFIX}",
            uuid::Uuid::new_v4().simple()
        ));
        self.disk
            .rename(&self.dir, &doomed)
            .await
            .map_err(|source| StorageError::io("rename", &self.dir, source))?;
        self.disk
            .sync_dir(&parent)
            .await
            .map_err(|source| StorageError::io("fsync", &parent, source))?;
        dirs::remove_dir_contents(&self.disk, &doomed).await
    }
}
