//! storage::log_start: moving the log start offset forward on request (Kafka's DeleteRecords), the
//! per-partition `log-start-offset` checkpoint file that makes it survive restarts and crashes, and the
//! removal of whole segments that then lie below it.
//!
//! Kafka keeps one `log-start-offset-checkpoint` per log dir; ringbroker keeps one file per partition,
//! for the same reason as the recovery checkpoint: a shard owns its partitions, and per-partition files
//! need no coordination between shards.

use std::path::PathBuf;

use super::error::StorageError;
use super::log::PartitionLog;

/// The file that holds the log start offset when it lies above the first segment's base.
pub const LOG_START_OFFSET_FILE: &str = "log-start-offset";

/// The largest checkpoint file read at open; anything longer is not ours.
const LOG_START_FILE_MAX_BYTES: usize = 64;

/// Why a DeleteRecords request for one partition was refused.
#[derive(Debug, thiserror::Error)]
pub enum DeleteRecordsError {
    /// The offset is negative (other than -1) or beyond the high watermark: Kafka's
    /// OFFSET_OUT_OF_RANGE (1).
    #[error("offset {offset} is outside [0, high watermark {high_watermark}]")]
    OffsetOutOfRange { offset: i64, high_watermark: i64 },
    /// The log could not persist the new start: Kafka's KAFKA_STORAGE_ERROR (56).
    #[error(transparent)]
    Storage(#[from] StorageError),
}

/// `"0\n<offset>\n"`: a version line, then the offset (the shape of Kafka's checkpoint files).
pub(crate) fn encode_log_start(offset: i64) -> Vec<u8> {
    format!("0\n{offset}\n").into_bytes()
}

pub(crate) fn decode_log_start(bytes: &[u8]) -> Option<i64> {
    let text = std::str::from_utf8(bytes).ok()?;
    let mut lines = text.lines();
    if lines.next()? != "0" {
        return None;
    }
    let offset: i64 = lines.next()?.trim().parse().ok()?;
    (offset >= 0 && lines.next().is_none()).then_some(offset)
}

impl PartitionLog {
    /// DeleteRecords: makes `offset` the new log start, so that records below it are no longer
    /// readable, and deletes the segments that lie wholly below it (never the active one). `-1` means
    /// the high watermark. An offset at or below the current start changes nothing. Returns the log
    /// start afterwards (Kafka's low watermark).
    ///
    /// The data below the new start is fdatasync'ed first and the new start is persisted before it is
    /// used, so after a crash the log start is never below what a client was told, nor above the log end.
    pub async fn delete_records_before(&self, offset: i64) -> Result<i64, DeleteRecordsError> {
        let _turn = self.enter_turn().await;
        let target = {
            let state = self.state.borrow();
            self.usable(&state)?;
            let high_watermark = state.high_watermark.offset;
            let target = if offset == -1 { high_watermark } else { offset };
            if !(0..=high_watermark).contains(&target) {
                return Err(DeleteRecordsError::OffsetOutOfRange {
                    offset,
                    high_watermark,
                });
            }
            if target <= state.log_start_offset {
                return Ok(state.log_start_offset);
            }
            target
        };
        self.flush_through(target - 1).await?;
        let path = self.dir.join(LOG_START_OFFSET_FILE);
        let disk = self.disk.clone();
        let written = path.clone();
        self.detached(async move {
            disk.write_file_atomically(&written, encode_log_start(target))
                .await
        })
        .await
        .map_err(|source| StorageError::io("write log start offset", &path, source))?;
        {
            let mut state = self.state.borrow_mut();
            state.log_start_offset = state.log_start_offset.max(target);
        }
        tracing::info!(dir = %self.dir.display(), log_start_offset = target, "log start offset moved by DeleteRecords");
        self.remove_segments_below_start().await?;
        Ok(self.log_start_offset())
    }

    /// Deletes the oldest closed segments whose every offset lies below the log start. Caller holds
    /// the turn.
    pub(crate) async fn remove_segments_below_start(&self) -> Result<(), StorageError> {
        // Bounded by the number of segments: each round removes the oldest one or stops.
        loop {
            let victim: Option<(i64, i64, PathBuf, u64)> = {
                let state = self.state.borrow();
                let mut bases = state.segments.keys();
                match (bases.next(), bases.next()) {
                    (Some(&oldest), Some(&next_base)) if next_base <= state.log_start_offset => {
                        let segment = &state.segments[&oldest];
                        Some((
                            oldest,
                            next_base,
                            segment.log.path().to_path_buf(),
                            segment.size_bytes,
                        ))
                    }
                    _ => None,
                }
            };
            let Some((base, next_base, log_path, size_bytes)) = victim else {
                break;
            };
            self.unlink_oldest_segment(base, next_base, &log_path)
                .await?;
            tracing::info!(dir = %self.dir.display(), base_offset = base, size_bytes, "deleted segment below the log start offset");
        }
        Ok(())
    }

    /// Called once at open, after recovery has settled the segments: raises the log start to the
    /// persisted one. A persisted start above the recovered log end (data lost with the disk's cache)
    /// is clamped to the log end and reported.
    pub(crate) async fn restore_log_start_offset(&self) -> Result<(), StorageError> {
        let path = self.dir.join(LOG_START_OFFSET_FILE);
        let bytes = self
            .disk
            .read_small_file(&path, LOG_START_FILE_MAX_BYTES)
            .await
            .map_err(|source| StorageError::io("read", &path, source))?;
        let Some(bytes) = bytes else {
            return Ok(());
        };
        let Some(persisted) = decode_log_start(&bytes) else {
            // The file is written atomically, so this is damage; the first segment's base is a safe
            // start (it may show records a DeleteRecords hid, never lose any).
            tracing::error!(path = %path.display(), "malformed log start offset checkpoint; using the first segment's base");
            return Ok(());
        };
        {
            let mut state = self.state.borrow_mut();
            if persisted > state.log_end_offset {
                tracing::error!(
                    path = %path.display(),
                    persisted,
                    log_end_offset = state.log_end_offset,
                    "log start offset checkpoint lies beyond the recovered log end; clamping it"
                );
            }
            let start = persisted
                .min(state.log_end_offset)
                .max(state.log_start_offset);
            state.log_start_offset = start;
        }
        // A crash between persisting a new start and unlinking the segments below it leaves them
        // behind; finish the job (nothing else uses the log while it opens).
        self.remove_segments_below_start().await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_start_file_round_trips_and_refuses_garbage() {
        assert_eq!(decode_log_start(&encode_log_start(0)), Some(0));
        assert_eq!(decode_log_start(&encode_log_start(4242)), Some(4242));
        assert_eq!(decode_log_start(b"1\n5\n"), None);
        assert_eq!(decode_log_start(b"0\n-5\n"), None);
        assert_eq!(decode_log_start(b"0\nfive\n"), None);
        assert_eq!(decode_log_start(b"0\n5\n6\n"), None);
        assert_eq!(decode_log_start(b""), None);
    }
}
