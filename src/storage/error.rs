//! storage::error: the typed errors of the partition log, one enum per kind of caller decision.

use std::io;
use std::path::PathBuf;

/// A failure of the storage itself (disk, files, state). The broker maps it to KAFKA_STORAGE_ERROR.
#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    /// A file-system call failed. `op` names the call, `path` the file it was made on.
    #[error("{op} failed on {}: {source}", path.display())]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// The log was closed (or deleted); reopen it to use it again.
    #[error("partition log at {} is closed", path.display())]
    Closed { path: PathBuf },
    /// An earlier write or fdatasync failed in a way that leaves the on-disk tail uncertain (for
    /// example EIO from fdatasync, or a failed rollback of a partial write). The log refuses further
    /// writes; closing and reopening it runs recovery, which restores a consistent log.
    #[error("partition log at {} failed earlier and must be reopened: {reason}", path.display())]
    Failed { path: PathBuf, reason: String },
    /// A file the log needs could not be understood (checkpoint, partition.metadata, ...).
    #[error("malformed {what} at {}: {detail}", path.display())]
    Malformed {
        what: &'static str,
        path: PathBuf,
        detail: String,
    },
    /// The configuration cannot be used.
    #[error("invalid log config: {0}")]
    InvalidConfig(String),
}

impl StorageError {
    pub(crate) fn io(op: &'static str, path: impl Into<PathBuf>, source: io::Error) -> Self {
        StorageError::Io {
            op,
            path: path.into(),
            source,
        }
    }

    /// The raw OS error behind this failure, if there is one (tests use it to check ENOSPC/EIO paths).
    pub fn raw_os_error(&self) -> Option<i32> {
        match self {
            StorageError::Io { source, .. } => source.raw_os_error(),
            _ => None,
        }
    }
}

/// Why an append was refused. Every variant except `Storage` means the input was bad and nothing was
/// written; `Storage` means the disk failed and the caller's batches were not appended.
#[derive(Debug, thiserror::Error)]
pub enum AppendError {
    /// Framing or CRC failure: Kafka's CORRUPT_MESSAGE (2).
    #[error("corrupt record batch: {0}")]
    CorruptMessage(String),
    /// One batch is larger than `max_message_bytes`: Kafka's MESSAGE_TOO_LARGE (10).
    #[error("record batch of {size} bytes exceeds the maximum of {max}")]
    MessageTooLarge { size: usize, max: u32 },
    /// A well-framed batch that breaks a rule (counts, base offset, magic): Kafka's INVALID_RECORD (87).
    #[error("invalid record batch: {0}")]
    InvalidRecord(String),
    /// The whole record set is larger than a segment: Kafka's RECORD_BATCH_TOO_LARGE (18).
    #[error("record set of {size} bytes exceeds the segment size {max}")]
    RecordBatchTooLarge { size: usize, max: u64 },
    /// An idempotent batch whose sequence is neither the next one of its producer nor one of its last
    /// five batches (a gap): Kafka's OUT_OF_ORDER_SEQUENCE_NUMBER (45). Nothing was written.
    #[error("out of order sequence: {0}")]
    OutOfOrderSequence(String),
    /// An idempotent batch carrying an epoch older than its producer's current one (a fenced,
    /// zombie producer): Kafka's INVALID_PRODUCER_EPOCH (47). Nothing was written.
    #[error("invalid producer epoch: {0}")]
    InvalidProducerEpoch(String),
    /// The log could not store the batches: Kafka's KAFKA_STORAGE_ERROR (56).
    #[error(transparent)]
    Storage(#[from] StorageError),
}

/// Why a read was refused.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    /// The offset is below the log start or above the log end: Kafka's OFFSET_OUT_OF_RANGE (1).
    #[error("offset {offset} out of range [{log_start_offset}, {log_end_offset}]")]
    OffsetOutOfRange {
        offset: i64,
        log_start_offset: i64,
        log_end_offset: i64,
    },
    /// The bytes at the offset are damaged (not a valid batch), or the offset's records were lost to
    /// damage and quarantined: Kafka's CORRUPT_MESSAGE (2), which clients surface to the application
    /// (librdkafka as a consumer error, kafka-python as `CorruptRecordError`) instead of retrying
    /// silently as they do on KAFKA_STORAGE_ERROR.
    #[error("offset {offset} is damaged: {detail}")]
    Corrupt { offset: i64, detail: String },
    /// The log could not be read: Kafka's KAFKA_STORAGE_ERROR (56).
    #[error(transparent)]
    Storage(#[from] StorageError),
}
