//! storage::index: a segment's sparse offset index (`.index`) and time index (`.timeindex`), kept in
//! memory and appended to their files in Kafka's byte format when the segment is checkpointed.
//!
//! `.index` entries are 8 bytes, `[relativeOffset u32][position u32]` big-endian; an entry maps the last
//! offset of a batch to that batch's start position. `.timeindex` entries are 12 bytes,
//! `[timestamp i64][relativeOffset u32]`, with timestamps strictly increasing. Neither file has a
//! checksum: recovery rebuilds whatever it cannot trust.

/// One `.index` entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OffsetEntry {
    pub relative_offset: u32,
    pub position: u32,
}

/// One `.timeindex` entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TimeEntry {
    pub timestamp: i64,
    pub relative_offset: u32,
}

pub const OFFSET_ENTRY_BYTES: usize = 8;
pub const TIME_ENTRY_BYTES: usize = 12;

/// The in-memory form of both indexes of one segment. `persisted_*` count the entries already written
/// to the files, so a checkpoint only appends the new ones.
#[derive(Debug, Default, Clone)]
pub struct SegmentIndex {
    pub offsets: Vec<OffsetEntry>,
    pub times: Vec<TimeEntry>,
    pub persisted_offsets: usize,
    pub persisted_times: usize,
    /// The files may hold entries that are not in memory (recovery dropped or rebuilt them): the next
    /// persist must cut the files back to `persisted_*` even if there is nothing new to append.
    pub files_stale: bool,
}

impl SegmentIndex {
    /// The position to start scanning from for `relative_offset`: the greatest entry at or below it,
    /// or the segment start.
    pub fn lookup(&self, relative_offset: u32) -> u32 {
        let after = self
            .offsets
            .partition_point(|entry| entry.relative_offset <= relative_offset);
        if after == 0 {
            0
        } else {
            self.offsets[after - 1].position
        }
    }

    /// The greatest entry at or below `relative_offset`, if any (`lookup` without the fallback).
    pub fn lookup_entry(&self, relative_offset: u32) -> Option<OffsetEntry> {
        let after = self
            .offsets
            .partition_point(|entry| entry.relative_offset <= relative_offset);
        after.checked_sub(1).map(|at| self.offsets[at])
    }

    /// The relative offset to start a timestamp search from: the entry with the greatest timestamp
    /// strictly below `timestamp`. Every record before that entry's offset is older than `timestamp`.
    pub fn lookup_time(&self, timestamp: i64) -> u32 {
        let after = self
            .times
            .partition_point(|entry| entry.timestamp < timestamp);
        if after == 0 {
            0
        } else {
            self.times[after - 1].relative_offset
        }
    }

    /// Adds an offset entry if it keeps the index strictly increasing.
    pub fn push_offset(&mut self, entry: OffsetEntry) {
        if self.offsets.last().is_none_or(|last| {
            last.relative_offset < entry.relative_offset && last.position < entry.position
        }) {
            self.offsets.push(entry);
        }
    }

    /// Adds a time entry if its timestamp is newer than the last one.
    pub fn push_time(&mut self, entry: TimeEntry) {
        if self
            .times
            .last()
            .is_none_or(|last| last.timestamp < entry.timestamp)
        {
            self.times.push(entry);
        }
    }

    /// Bytes of offset entries not yet in the `.index` file.
    pub fn unpersisted_offset_bytes(&self) -> Vec<u8> {
        let mut out =
            Vec::with_capacity((self.offsets.len() - self.persisted_offsets) * OFFSET_ENTRY_BYTES);
        for entry in &self.offsets[self.persisted_offsets..] {
            out.extend_from_slice(&entry.relative_offset.to_be_bytes());
            out.extend_from_slice(&entry.position.to_be_bytes());
        }
        out
    }

    /// Bytes of time entries not yet in the `.timeindex` file.
    pub fn unpersisted_time_bytes(&self) -> Vec<u8> {
        let mut out =
            Vec::with_capacity((self.times.len() - self.persisted_times) * TIME_ENTRY_BYTES);
        for entry in &self.times[self.persisted_times..] {
            out.extend_from_slice(&entry.timestamp.to_be_bytes());
            out.extend_from_slice(&entry.relative_offset.to_be_bytes());
        }
        out
    }
}

/// Decodes a `.index` file. Returns `None` if it is not a whole number of strictly increasing entries
/// with positions below `log_size_bytes`; the caller then rebuilds the index from the log.
pub fn decode_offsets(bytes: &[u8], log_size_bytes: u64) -> Option<Vec<OffsetEntry>> {
    if !bytes.len().is_multiple_of(OFFSET_ENTRY_BYTES) {
        return None;
    }
    let mut entries: Vec<OffsetEntry> = Vec::with_capacity(bytes.len() / OFFSET_ENTRY_BYTES);
    for chunk in bytes.chunks_exact(OFFSET_ENTRY_BYTES) {
        let entry = OffsetEntry {
            relative_offset: u32::from_be_bytes([chunk[0], chunk[1], chunk[2], chunk[3]]),
            position: u32::from_be_bytes([chunk[4], chunk[5], chunk[6], chunk[7]]),
        };
        let increasing = entries.last().is_none_or(|last| {
            last.relative_offset < entry.relative_offset && last.position < entry.position
        });
        if !increasing || u64::from(entry.position) >= log_size_bytes {
            return None;
        }
        entries.push(entry);
    }
    Some(entries)
}

/// Decodes a `.timeindex` file; `None` if malformed (not whole entries, or not strictly increasing).
pub fn decode_times(bytes: &[u8]) -> Option<Vec<TimeEntry>> {
    if !bytes.len().is_multiple_of(TIME_ENTRY_BYTES) {
        return None;
    }
    let mut entries: Vec<TimeEntry> = Vec::with_capacity(bytes.len() / TIME_ENTRY_BYTES);
    for chunk in bytes.chunks_exact(TIME_ENTRY_BYTES) {
        let mut timestamp = [0u8; 8];
        timestamp.copy_from_slice(&chunk[..8]);
        let entry = TimeEntry {
            timestamp: i64::from_be_bytes(timestamp),
            relative_offset: u32::from_be_bytes([chunk[8], chunk[9], chunk[10], chunk[11]]),
        };
        if entries
            .last()
            .is_some_and(|last| last.timestamp >= entry.timestamp)
        {
            return None;
        }
        entries.push(entry);
    }
    Some(entries)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lookup_finds_the_greatest_entry_at_or_below() {
        let mut index = SegmentIndex::default();
        for (relative_offset, position) in [(10, 4100), (20, 8300), (30, 12500)] {
            index.push_offset(OffsetEntry {
                relative_offset,
                position,
            });
        }
        assert_eq!(index.lookup(5), 0);
        assert_eq!(index.lookup(10), 4100);
        assert_eq!(index.lookup(29), 8300);
        assert_eq!(index.lookup(1000), 12500);
    }

    #[test]
    fn round_trips_through_the_file_format_and_rejects_damage() {
        let mut index = SegmentIndex::default();
        index.push_offset(OffsetEntry {
            relative_offset: 3,
            position: 100,
        });
        index.push_offset(OffsetEntry {
            relative_offset: 9,
            position: 300,
        });
        index.push_time(TimeEntry {
            timestamp: 50,
            relative_offset: 3,
        });
        let offsets = index.unpersisted_offset_bytes();
        assert_eq!(decode_offsets(&offsets, 1000), Some(index.offsets.clone()));
        assert_eq!(
            decode_offsets(&offsets, 200),
            None,
            "position beyond the log"
        );
        assert_eq!(decode_offsets(&offsets[..7], 1000), None, "torn entry");
        let times = index.unpersisted_time_bytes();
        assert_eq!(decode_times(&times), Some(index.times.clone()));
        assert_eq!(index.lookup_time(50), 0);
        assert_eq!(index.lookup_time(51), 3);
    }
}
