//! storage::scrub: re-reading closed segments in the background to find damage at rest. Reads check
//! only batch headers (splice stays zero-copy) and recovery trusts data below the recovery point, so
//! a flipped byte inside a closed segment would otherwise be served as stored, forever. The scrubber
//! verifies every batch's CRC-32C and framing, and that the in-memory index entries sit on batch
//! boundaries with the right offsets; a damaged batch is logged at ERROR, counted, and recorded in the
//! log's damaged spans, so fetches touching it get CORRUPT_MESSAGE instead of the bytes.
//!
//! The caller sets the pace: `scrub_step` verifies at most a byte budget and returns, and a per-shard
//! task calls it at `ringbroker.log.scrub.bytes.per.second`. The active segment is never scrubbed (its
//! tail is still being written and recovery verifies it after a crash).

use std::time::Instant;

use super::batch::{self, BATCH_HEADER_BYTES, BatchHeader, CRC_COVERED_FROM};
use super::descriptors::SegmentHandle;
use super::error::StorageError;
use super::log::PartitionLog;
use super::segment::SegmentFile;

/// How much one read of the scrubber asks for.
const SCRUB_READ_BYTES: usize = 256 * 1024;

/// Where a partition's scrub pass is, kept by the caller between steps.
#[derive(Debug)]
pub struct ScrubCursor {
    /// The segment being verified and the byte position of its next batch.
    segment_base: Option<i64>,
    /// That segment's instance: a cleaned segment swapped in under the same base has other batch
    /// boundaries, so the cursor starts it over.
    segment: Option<SegmentHandle>,
    position: u64,
    /// The last offset of the previous batch in this segment, for the order check.
    previous_last: Option<i64>,
    pass_started: Instant,
    pass_bytes: u64,
    pass_damaged: u64,
}

impl Default for ScrubCursor {
    fn default() -> Self {
        ScrubCursor {
            segment_base: None,
            segment: None,
            position: 0,
            previous_last: None,
            pass_started: Instant::now(),
            pass_bytes: 0,
            pass_damaged: 0,
        }
    }
}

/// What one step did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ScrubStep {
    pub bytes_verified: u64,
    /// Damaged batches found in this step.
    pub damaged_found: u64,
    /// The step finished a pass over every closed segment (logged with its duration).
    pub pass_finished: bool,
}

impl PartitionLog {
    /// Verifies up to `budget_bytes` of closed segments from `cursor` on. Damage is logged, counted
    /// and recorded; a read error is returned (the caller logs it and tries again later).
    pub async fn scrub_step(
        &self,
        cursor: &mut ScrubCursor,
        budget_bytes: u64,
    ) -> Result<ScrubStep, StorageError> {
        let mut step = ScrubStep::default();
        // Bounded: every round verifies at least one batch (61 bytes) or moves to the next segment
        // or ends the pass; the budget caps the bytes.
        while step.bytes_verified < budget_bytes {
            let target = {
                let state = self.state.borrow();
                if state.closed {
                    return Ok(step);
                }
                let closed = state.segments.len().saturating_sub(1);
                let from = cursor.segment_base.unwrap_or(i64::MIN);
                state
                    .segments
                    .values()
                    .take(closed)
                    .find(|segment| segment.base_offset >= from)
                    .map(|segment| {
                        (
                            segment.base_offset,
                            segment.log.clone(),
                            segment.size_bytes,
                            segment.index.offsets.clone(),
                        )
                    })
            };
            let Some((base, handle, size, index_entries)) = target else {
                self.finish_pass(cursor, &mut step);
                return Ok(step);
            };
            if cursor.segment_base != Some(base)
                || !cursor
                    .segment
                    .as_ref()
                    .is_some_and(|segment| segment.same(&handle))
            {
                cursor.segment_base = Some(base);
                cursor.segment = Some(handle.clone());
                cursor.position = 0;
                cursor.previous_last = None;
            }
            if cursor.position >= size {
                cursor.segment_base = Some(base + 1);
                continue;
            }
            // Through the shard's descriptor cache. Retention or the cleaner may replace the segment
            // while it opens: then the segment is chosen again rather than misjudged.
            let opened = handle.open(&self.disk).await;
            let still_there = self
                .state
                .borrow()
                .segments
                .get(&base)
                .is_some_and(|segment| segment.log.same(&handle));
            if !still_there {
                continue;
            }
            let file = opened?;
            let verified = self
                .scrub_batch(cursor, &file, size, &index_entries)
                .await?;
            step.bytes_verified += verified.0;
            cursor.pass_bytes += verified.0;
            if verified.1 {
                step.damaged_found += 1;
                cursor.pass_damaged += 1;
            }
        }
        Ok(step)
    }

    fn finish_pass(&self, cursor: &mut ScrubCursor, step: &mut ScrubStep) {
        tracing::info!(
            dir = %self.dir.display(),
            bytes = cursor.pass_bytes,
            damaged_batches = cursor.pass_damaged,
            duration_ms = cursor.pass_started.elapsed().as_millis() as u64,
            "scrub pass over the closed segments finished"
        );
        step.pass_finished = true;
        *cursor = ScrubCursor::default();
    }

    /// Verifies the batch at the cursor and advances past it (or past the damage). Returns the bytes
    /// read and whether the batch was damaged.
    async fn scrub_batch(
        &self,
        cursor: &mut ScrubCursor,
        file: &SegmentFile,
        size: u64,
        index_entries: &[super::index::OffsetEntry],
    ) -> Result<(u64, bool), StorageError> {
        let position = cursor.position;
        let header_bytes = self
            .disk
            .read_at(
                file.file(),
                BATCH_HEADER_BYTES.min((size - position) as usize),
                position,
            )
            .await
            .map_err(|source| StorageError::io("read", file.path(), source))?;
        let header = BatchHeader::parse_prefix(&header_bytes)
            .filter(|_| header_bytes.len() == BATCH_HEADER_BYTES)
            .filter(|header| position + header.size_bytes <= size);
        let problem = match header {
            None => {
                Some("no valid batch header (bad batchLength, magic or lastOffsetDelta)".into())
            }
            Some(header) => {
                let out_of_order = cursor
                    .previous_last
                    .is_some_and(|last| header.base_offset <= last)
                    || header.base_offset < file.base_offset();
                let indexed = index_entries
                    .binary_search_by_key(&(position as u32), |entry| entry.position)
                    .ok()
                    .map(|at| file.base_offset() + i64::from(index_entries[at].relative_offset));
                if out_of_order {
                    Some(format!(
                        "offsets {}..={} out of order with the batch before",
                        header.base_offset,
                        header.last_offset()
                    ))
                } else if indexed.is_some_and(|last| last != header.last_offset()) {
                    Some(format!(
                        "the index says the batch here ends at offset {}, it ends at {}",
                        indexed.unwrap_or(-1),
                        header.last_offset()
                    ))
                } else {
                    let computed = self.batch_crc(file, position, header.size_bytes).await?;
                    let stored = batch::stored_crc(&header_bytes);
                    (computed != stored).then(|| {
                        format!("CRC mismatch: stored {stored:#010x}, computed {computed:#010x}")
                    })
                }
            }
        };
        match problem {
            None => {
                let header = header.expect("a batch without a problem has a header");
                cursor.previous_last = Some(header.last_offset());
                cursor.position = position + header.size_bytes;
                Ok((header.size_bytes, false))
            }
            Some(detail) => {
                let offset = cursor
                    .previous_last
                    .map_or(file.base_offset(), |last| last + 1);
                let after = self
                    .note_damage(file, position, size, offset, &detail)
                    .await?;
                match after {
                    Some((next_position, _)) => {
                        cursor.previous_last = None;
                        cursor.position = next_position;
                        Ok((next_position - position, true))
                    }
                    None => {
                        cursor.position = size;
                        Ok((size - position, true))
                    }
                }
            }
        }
    }

    /// CRC-32C over a batch's covered bytes, read in chunks.
    async fn batch_crc(
        &self,
        file: &SegmentFile,
        position: u64,
        size_bytes: u64,
    ) -> Result<u32, StorageError> {
        let end = position + size_bytes;
        let mut at = position + CRC_COVERED_FROM as u64;
        let mut crc = 0u32;
        // Bounded: each round reads at least one byte or stops.
        while at < end {
            let want = ((end - at) as usize).min(SCRUB_READ_BYTES);
            let bytes = self
                .disk
                .read_at(file.file(), want, at)
                .await
                .map_err(|source| StorageError::io("read", file.path(), source))?;
            if bytes.is_empty() {
                break;
            }
            crc = crc32c::crc32c_append(crc, &bytes);
            at += bytes.len() as u64;
        }
        Ok(crc)
    }
}
