//! storage: the partition log. Kafka RecordBatch v2 bytes stored exactly as received, in Kafka's
//! on-disk layout (`<log.dir>/<topic>-<partition>/<20-digit base offset>.{log,index,timeindex}`), with
//! fast offset lookup, group-committed fdatasync, crash recovery and retention.
//!
//! This module knows nothing about sockets, shards or Kafka requests: the broker validates requests,
//! calls `PartitionLog`, and maps the typed errors here to Kafka error codes. All file IO goes through
//! `disk::Disk`, the one seam where tests inject faults. docs/storage.md describes the format, the
//! invariants and the recovery procedure.

pub mod batch;
pub mod cleaner;
pub mod config;
pub mod descriptors;
pub mod dirs;
pub mod disk;
pub mod error;
pub mod index;
mod log;
pub mod log_start;
pub mod producer_state;
pub mod quarantine;
mod recovery;
pub mod recovery_point;
pub mod scrub;
pub mod segment;
pub mod testing;
mod waiters;
pub mod write_mode;

pub use config::LogConfig;
pub use descriptors::SegmentHandle;
pub use dirs::{
    PartitionDir, discard_partition_dir, list_partition_dirs, partition_dir,
    read_partition_metadata, remove_deleted_partition_dirs, sync_filesystem,
    write_partition_metadata, write_partition_metadata_with,
};
pub use disk::{Disk, Fault, FaultInjector, IoKind, SyncDeferral};
pub use error::{AppendError, ReadError, StorageError};
pub use log::{AppendInfo, LEADER_EPOCH, PartitionLog, ReadSlice, RetentionOutcome};
pub use log_start::DeleteRecordsError;
pub use segment::SegmentFile;
pub use write_mode::{WriteMode, WriteModeError};
