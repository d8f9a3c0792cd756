//! storage::quarantine: where recovery puts log data it cannot explain instead of deleting it, and the
//! per-partition list of offset ranges lost to damage, so fetches there get an error instead of
//! silently skipping ahead.
//!
//! The folder is `<partition dir>/quarantine/`. Whole segment files are renamed into it (keeping their
//! names, with a `.<unix ms>` suffix so repeated incidents never overwrite each other); byte ranges cut
//! from a segment are copied into it first (`<stem>.log.<start>-<end>.<unix ms>`). Nothing in it is ever
//! read back or deleted by the broker: it is for the operator.
//!
//! `quarantine/damaged-offsets` holds one line per lost range, `<first offset> <end offset> <reason>`
//! (end exclusive), rewritten atomically whenever recovery adds one.

use std::path::{Path, PathBuf};

use super::disk::Disk;
use super::error::StorageError;
use super::segment::SegmentFile;

/// The quarantine folder inside a partition directory.
pub const QUARANTINE_DIR: &str = "quarantine";
/// The list of offset ranges lost to damage, inside the quarantine folder.
pub const DAMAGED_OFFSETS_FILE: &str = "damaged-offsets";

/// Copies are made in chunks of this size, so a quarantined range never needs a buffer of its size.
const COPY_CHUNK_BYTES: usize = 1 << 20;
/// The largest damaged-offsets file read at open; a partition with more incidents than fit is already
/// beyond what a list helps with.
const DAMAGED_OFFSETS_MAX_BYTES: usize = 1 << 20;

/// Offsets `[first_offset, end_offset)` whose records were lost to damage.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DamagedRange {
    pub first_offset: i64,
    pub end_offset: i64,
    pub reason: String,
}

impl DamagedRange {
    pub fn contains(&self, offset: i64) -> bool {
        self.first_offset <= offset && offset < self.end_offset
    }
}

pub(crate) fn quarantine_dir(partition_dir: &Path) -> PathBuf {
    partition_dir.join(QUARANTINE_DIR)
}

/// Reads the damaged-offsets list; an absent file is an empty list, an unreadable line is skipped with
/// a warning (the list only adds precision to errors, the data itself is intact or quarantined).
pub(crate) async fn load_damaged_ranges(
    disk: &Disk,
    partition_dir: &Path,
) -> Result<Vec<DamagedRange>, StorageError> {
    let path = quarantine_dir(partition_dir).join(DAMAGED_OFFSETS_FILE);
    let bytes = match disk.read_small_file(&path, DAMAGED_OFFSETS_MAX_BYTES).await {
        Ok(Some(bytes)) => bytes,
        Ok(None) => return Ok(Vec::new()),
        Err(source) => return Err(StorageError::io("read", &path, source)),
    };
    Ok(decode_damaged_ranges(
        &String::from_utf8_lossy(&bytes),
        &path,
    ))
}

fn decode_damaged_ranges(text: &str, path: &Path) -> Vec<DamagedRange> {
    let mut ranges = Vec::new();
    for line in text.lines().filter(|line| !line.trim().is_empty()) {
        let mut fields = line.splitn(3, ' ');
        let parsed = (|| {
            let first_offset: i64 = fields.next()?.parse().ok()?;
            let end_offset: i64 = fields.next()?.parse().ok()?;
            let reason = fields.next().unwrap_or("").to_string();
            (first_offset < end_offset).then_some(DamagedRange {
                first_offset,
                end_offset,
                reason,
            })
        })();
        match parsed {
            Some(range) => ranges.push(range),
            None => {
                tracing::warn!(path = %path.display(), line, "ignoring unreadable damaged-offsets line")
            }
        }
    }
    ranges
}

fn encode_damaged_ranges(ranges: &[DamagedRange]) -> Vec<u8> {
    let mut text = String::new();
    for range in ranges {
        let reason = range.reason.replace('\n', " ");
        text.push_str(&format!(
            "{} {} {reason}\n",
            range.first_offset, range.end_offset
        ));
    }
    text.into_bytes()
}

/// Rewrites the damaged-offsets list durably.
pub(crate) async fn save_damaged_ranges(
    disk: &Disk,
    partition_dir: &Path,
    ranges: &[DamagedRange],
) -> Result<(), StorageError> {
    let folder = ensure_dir(disk, partition_dir).await?;
    let path = folder.join(DAMAGED_OFFSETS_FILE);
    disk.write_file_atomically(&path, encode_damaged_ranges(ranges))
        .await
        .map_err(|source| StorageError::io("write", &path, source))
}

async fn ensure_dir(disk: &Disk, partition_dir: &Path) -> Result<PathBuf, StorageError> {
    let folder = quarantine_dir(partition_dir);
    disk.create_dir_all(&folder)
        .await
        .map_err(|source| StorageError::io("create_dir_all", &folder, source))?;
    Ok(folder)
}

/// Renames a segment's `.log`, `.index` and `.timeindex` into the quarantine folder and makes the
/// renames durable. Returns where the `.log` went.
pub(crate) async fn move_segment_aside(
    disk: &Disk,
    partition_dir: &Path,
    base_offset: i64,
    now_ms: i64,
) -> Result<PathBuf, StorageError> {
    let folder = ensure_dir(disk, partition_dir).await?;
    let stem = super::segment::segment_stem(base_offset);
    let mut moved_log = folder.join(format!("{stem}.log.{now_ms}"));
    for suffix in ["log", "index", "timeindex"] {
        let from = partition_dir.join(format!("{stem}.{suffix}"));
        let to = folder.join(format!("{stem}.{suffix}.{now_ms}"));
        match disk.rename(&from, &to).await {
            Ok(()) => {}
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => continue,
            Err(source) => return Err(StorageError::io("rename", &from, source)),
        }
        if suffix == "log" {
            moved_log = to;
        }
    }
    for dir in [&folder, &partition_dir.to_path_buf()] {
        disk.sync_dir(dir)
            .await
            .map_err(|source| StorageError::io("fsync", dir, source))?;
    }
    Ok(moved_log)
}

/// Copies bytes `[start, end)` of a segment file into a new file in the quarantine folder and makes
/// it durable, before the caller cuts them from the log. Returns the copy's path.
pub(crate) async fn copy_range_aside(
    disk: &Disk,
    partition_dir: &Path,
    source: &SegmentFile,
    start: u64,
    end: u64,
    now_ms: i64,
) -> Result<PathBuf, StorageError> {
    let folder = ensure_dir(disk, partition_dir).await?;
    let stem = super::segment::segment_stem(source.base_offset());
    let path = folder.join(format!("{stem}.log.{start}-{end}.{now_ms}"));
    copy_range(disk, source, start, end, &path).await?;
    disk.sync_dir(&folder)
        .await
        .map_err(|source| StorageError::io("fsync", &folder, source))?;
    Ok(path)
}

/// Writes bytes `[start, end)` of `source` into a new file at `target` (replacing any file there) and
/// fdatasyncs it. The caller makes the name durable.
pub(crate) async fn copy_range(
    disk: &Disk,
    source: &SegmentFile,
    start: u64,
    end: u64,
    target: &Path,
) -> Result<(), StorageError> {
    let file = disk
        .open_rw(target, true)
        .await
        .map_err(|error| StorageError::io("create", target, error))?;
    disk.set_len(&file, 0)
        .await
        .map_err(|error| StorageError::io("truncate", target, error))?;
    let mut at = start;
    // Bounded: each round copies at least one byte or stops at a short read.
    while at < end {
        let want = ((end - at) as usize).min(COPY_CHUNK_BYTES);
        let bytes = disk
            .read_at(source.file(), want, at)
            .await
            .map_err(|error| StorageError::io("read", source.path(), error))?;
        if bytes.is_empty() {
            break;
        }
        let length = bytes.len() as u64;
        disk.write_all_at(&file, bytes, at - start)
            .await
            .map_err(|error| StorageError::io("write", target, error))?;
        at += length;
    }
    disk.sync_data(&file)
        .await
        .map_err(|error| StorageError::io("fdatasync", target, error))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn damaged_ranges_round_trip_and_skip_bad_lines() {
        let ranges = vec![
            DamagedRange {
                first_offset: 5,
                end_offset: 9,
                reason: "CRC mismatch at 4096".into(),
            },
            DamagedRange {
                first_offset: 100,
                end_offset: 101,
                reason: String::new(),
            },
        ];
        let text = String::from_utf8(encode_damaged_ranges(&ranges)).unwrap();
        assert_eq!(decode_damaged_ranges(&text, Path::new("x")), ranges);
        let damaged = format!("{text}garbage line\n7 3 backwards\n");
        assert_eq!(decode_damaged_ranges(&damaged, Path::new("x")), ranges);
        assert!(ranges[0].contains(5) && ranges[0].contains(8) && !ranges[0].contains(9));
    }
}
