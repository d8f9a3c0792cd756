//! storage::recovery_point: the recovery point written after every group-commit fdatasync, so an
//! unclean open re-verifies only data that was never synced.
//!
//! The atomic `recovery-checkpoint` (temp file, fdatasync, rename, directory fsync: three syncs) is far
//! too costly to write per fdatasync. This file is written in place instead, with one small `pwrite`
//! into the page cache after the fdatasync that made the data durable, and no sync of its own: it is
//! synced by the periodic checkpoint (`tick`) and at close. A process crash (SIGKILL, panic) keeps the
//! page cache, so the next open sees the latest recovery point; a power failure may lose the newest
//! writes, and the open then starts from an older one, which only widens the scan.
//!
//! Two 64-byte slots alternate, each `[sequence u64][offset i64][segment_base i64][position u64][crc32c
//! u32]` (CRC over the first 32 bytes), so a torn write damages at most the slot being written and the
//! other still holds the previous point. The valid slot with the higher sequence wins.

use std::path::{Path, PathBuf};

use super::descriptors::SegmentHandle;
use super::dirs::Checkpoint;
use super::disk::Disk;
use super::error::StorageError;

/// The recovery-point file inside a partition directory.
pub const RECOVERY_POINT_FILE: &str = "recovery-point";

const SLOT_BYTES: u64 = 64;
const RECORD_BYTES: usize = 36;

fn encode(sequence: u64, checkpoint: Checkpoint) -> Vec<u8> {
    let mut out = Vec::with_capacity(RECORD_BYTES);
    out.extend_from_slice(&sequence.to_be_bytes());
    out.extend_from_slice(&checkpoint.offset.to_be_bytes());
    out.extend_from_slice(&checkpoint.segment_base.to_be_bytes());
    out.extend_from_slice(&checkpoint.position.to_be_bytes());
    let crc = crc32c::crc32c(&out);
    out.extend_from_slice(&crc.to_be_bytes());
    out
}

fn decode_slot(bytes: &[u8]) -> Option<(u64, Checkpoint)> {
    if bytes.len() < RECORD_BYTES {
        return None;
    }
    let word = |at: usize| {
        let mut raw = [0u8; 8];
        raw.copy_from_slice(&bytes[at..at + 8]);
        raw
    };
    let stored_crc = u32::from_be_bytes([bytes[32], bytes[33], bytes[34], bytes[35]]);
    if crc32c::crc32c(&bytes[..32]) != stored_crc {
        return None;
    }
    let checkpoint = Checkpoint {
        offset: i64::from_be_bytes(word(8)),
        segment_base: i64::from_be_bytes(word(16)),
        position: u64::from_be_bytes(word(24)),
    };
    (checkpoint.offset >= checkpoint.segment_base && checkpoint.segment_base >= 0)
        .then_some((u64::from_be_bytes(word(0)), checkpoint))
}

/// The newest valid recovery point in the file's bytes, with its sequence number.
pub(crate) fn decode(bytes: &[u8]) -> Option<(u64, Checkpoint)> {
    let first = decode_slot(bytes);
    let second = bytes.get(SLOT_BYTES as usize..).and_then(decode_slot);
    match (first, second) {
        (Some(a), Some(b)) => Some(if a.0 >= b.0 { a } else { b }),
        (one, other) => one.or(other),
    }
}

/// The offset of the newest valid recovery point in the file's bytes (for tests and tools).
pub fn decoded_offset(bytes: &[u8]) -> Option<i64> {
    decode(bytes).map(|(_, checkpoint)| checkpoint.offset)
}

/// The recovery-point file of one partition and the sequence of its last write. Its descriptor
/// comes from the shard's descriptor cache like a segment's, so thousands of partitions do not each
/// hold one open.
pub(crate) struct RecoveryPoint {
    path: PathBuf,
    handle: SegmentHandle,
    sequence: u64,
    /// The sequence the last fdatasync covered: a sync with nothing written since costs nothing.
    synced_sequence: u64,
    /// The last point written, so an fdatasync that moved nothing writes nothing.
    last: Option<Checkpoint>,
}

impl RecoveryPoint {
    /// `sequence` and `last` as read from the file at open, so an unchanged point is not rewritten.
    pub(crate) fn new(
        partition_dir: &Path,
        sequence: u64,
        last: Option<Checkpoint>,
    ) -> RecoveryPoint {
        let path = partition_dir.join(RECOVERY_POINT_FILE);
        RecoveryPoint {
            handle: SegmentHandle::new(path.clone(), 0),
            path,
            sequence,
            synced_sequence: sequence,
            last,
        }
    }

    pub(crate) fn path(&self) -> &Path {
        &self.path
    }

    /// Reads the file; `None` if it is absent or neither slot is valid.
    pub(crate) async fn read(
        disk: &Disk,
        partition_dir: &Path,
    ) -> Result<Option<(u64, Checkpoint)>, StorageError> {
        let path = partition_dir.join(RECOVERY_POINT_FILE);
        match disk.read_small_file(&path, 2 * SLOT_BYTES as usize).await {
            Ok(Some(bytes)) => Ok(decode(&bytes)),
            Ok(None) => Ok(None),
            Err(source) => Err(StorageError::io("read", &path, source)),
        }
    }

    /// What to write next, if the point moved: the slot's position and bytes. The caller performs the
    /// write (outside any borrow) and reports it with `written`.
    pub(crate) fn prepare(&mut self, checkpoint: Checkpoint) -> Option<(u64, Vec<u8>)> {
        if self.last == Some(checkpoint) {
            return None;
        }
        let sequence = self.sequence + 1;
        Some(((sequence % 2) * SLOT_BYTES, encode(sequence, checkpoint)))
    }

    pub(crate) fn written(&mut self, checkpoint: Checkpoint) {
        self.sequence += 1;
        self.last = Some(checkpoint);
    }

    /// The file by name, for `SegmentHandle::open_creating` (writes) and `open` (syncs).
    pub(crate) fn handle(&self) -> SegmentHandle {
        self.handle.clone()
    }

    /// The sequence to sync up to, if anything was written since the last sync.
    pub(crate) fn unsynced(&self) -> Option<u64> {
        (self.sequence != self.synced_sequence).then_some(self.sequence)
    }

    /// An fdatasync covered every write up to `sequence`.
    pub(crate) fn synced(&mut self, sequence: u64) {
        self.synced_sequence = self.synced_sequence.max(sequence);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn point(offset: i64) -> Checkpoint {
        Checkpoint {
            offset,
            segment_base: 0,
            position: offset as u64 * 100,
        }
    }

    #[test]
    fn the_newer_valid_slot_wins_and_a_torn_slot_is_ignored() {
        let mut bytes = vec![0u8; 2 * SLOT_BYTES as usize];
        let mut point_file = RecoveryPoint::new(Path::new("/x"), 0, None);
        for offset in [10, 20, 30] {
            let (at, record) = point_file.prepare(point(offset)).unwrap();
            bytes[at as usize..at as usize + record.len()].copy_from_slice(&record);
            point_file.written(point(offset));
        }
        assert_eq!(decode(&bytes).map(|found| found.1), Some(point(30)));
        assert!(
            point_file.prepare(point(30)).is_none(),
            "unchanged point is not rewritten"
        );
        // Tear the newest slot (sequence 3 lives in slot 1): the previous point survives.
        bytes[SLOT_BYTES as usize + 12] ^= 0x40;
        assert_eq!(decode(&bytes).map(|found| found.1), Some(point(20)));
        bytes[5] ^= 1;
        assert_eq!(decode(&bytes), None);
        assert_eq!(decode(&[]), None);
    }
}
