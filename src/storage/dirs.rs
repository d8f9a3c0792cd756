//! storage::dirs: the files around the segments: a log dir's `<topic>-<partition>` directories, Kafka's
//! `partition.metadata` (topic id), and this log's per-partition recovery checkpoint and clean-shutdown
//! marker.

use std::path::{Path, PathBuf};

use uuid::Uuid;

use super::disk::Disk;
use super::error::StorageError;

/// Kafka's file holding the topic id of a partition directory.
pub const PARTITION_METADATA_FILE: &str = "partition.metadata";
/// Per-partition clean-shutdown marker. Kafka keeps one per log dir; a shard owns its partitions, so a
/// per-partition marker needs no coordination between shards.
pub const CLEAN_SHUTDOWN_FILE: &str = ".kafka_cleanshutdown";
/// Per-partition recovery checkpoint (Kafka: `recovery-point-offset-checkpoint`, one per log dir).
pub const RECOVERY_CHECKPOINT_FILE: &str = "recovery-checkpoint";
/// Suffix of a partition directory that is being deleted (Kafka's convention).
pub const DELETE_DIR_SUFFIX: &str = "-delete";

/// Small files are read with this bound, so a damaged file cannot make us allocate much.
const SMALL_FILE_LIMIT_BYTES: usize = 4096;

/// One partition directory found in a log dir.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PartitionDir {
    pub topic: String,
    pub partition: i32,
    pub path: PathBuf,
}

/// The directory of a partition: `<log_dir>/<topic>-<partition>`.
pub fn partition_dir(log_dir: &Path, topic: &str, partition: i32) -> PathBuf {
    log_dir.join(format!("{topic}-{partition}"))
}

/// Splits `<topic>-<partition>` at its last '-', so topic names that contain '-' parse correctly.
pub fn parse_partition_dir_name(name: &str) -> Option<(String, i32)> {
    let (topic, partition) = name.rsplit_once('-')?;
    if topic.is_empty()
        || partition.is_empty()
        || !partition.bytes().all(|byte| byte.is_ascii_digit())
    {
        return None;
    }
    Some((topic.to_owned(), partition.parse().ok()?))
}

/// Lists the partition directories of a log dir, sorted by topic then partition. Directories being
/// deleted (`…-delete`) and anything else that is not `<topic>-<partition>` are skipped.
pub fn list_partition_dirs(log_dir: &Path) -> Result<Vec<PartitionDir>, StorageError> {
    let entries = Disk::real()
        .list_dir(log_dir)
        .map_err(|source| StorageError::io("read_dir", log_dir, source))?;
    let mut found: Vec<PartitionDir> = entries
        .into_iter()
        .filter(|(name, is_dir)| *is_dir && !name.ends_with(DELETE_DIR_SUFFIX))
        .filter_map(|(name, _)| {
            let (topic, partition) = parse_partition_dir_name(&name)?;
            Some(PartitionDir {
                topic,
                partition,
                path: log_dir.join(&name),
            })
        })
        .collect();
    found
        .sort_by(|left, right| (&left.topic, left.partition).cmp(&(&right.topic, right.partition)));
    Ok(found)
}

/// Finishes deletions that a crash interrupted: removes every `…-delete` directory in a log dir.
pub async fn remove_deleted_partition_dirs(log_dir: &Path) -> Result<usize, StorageError> {
    let disk = Disk::real();
    let entries = disk
        .list_dir(log_dir)
        .map_err(|source| StorageError::io("read_dir", log_dir, source))?;
    let mut removed = 0;
    for (name, is_dir) in entries {
        if is_dir && name.ends_with(DELETE_DIR_SUFFIX) {
            remove_dir_contents(&disk, &log_dir.join(&name)).await?;
            removed += 1;
        }
    }
    Ok(removed)
}

/// Removes a partition directory that holds no data anyone has seen (a topic creation that failed):
/// renamed to `…-delete` first, like a deleted partition, so a crash midway is finished at the next
/// start. A directory that does not exist is fine; a file in its place is not ours and stays.
pub async fn discard_partition_dir(dir: &Path) -> Result<(), StorageError> {
    let disk = Disk::real();
    // Only a directory is ours to remove; anything else in its place is left alone.
    match std::fs::symlink_metadata(dir) {
        Ok(metadata) if metadata.is_dir() => {}
        Ok(_) => return Ok(()),
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(source) => return Err(StorageError::io("stat", dir, source)),
    }
    let name = dir
        .file_name()
        .map(|name| name.to_string_lossy().into_owned())
        .unwrap_or_default();
    let doomed = dir.with_file_name(format!(
        "{name}.{}{DELETE_DIR_SUFFIX}",
        Uuid::new_v4().simple()
    ));
    disk.rename(dir, &doomed)
        .await
        .map_err(|source| StorageError::io("rename", dir, source))?;
    remove_dir_contents(&disk, &doomed).await
}

/// Removes a partition directory: its files and its one level of subdirectories (`quarantine/`).
pub(crate) async fn remove_dir_contents(disk: &Disk, dir: &Path) -> Result<(), StorageError> {
    let entries = disk
        .list_dir(dir)
        .map_err(|source| StorageError::io("read_dir", dir, source))?;
    for (name, is_dir) in entries {
        let path = dir.join(name);
        if is_dir {
            Box::pin(remove_dir_contents(disk, &path)).await?;
            continue;
        }
        disk.remove_file(&path)
            .await
            .map_err(|source| StorageError::io("remove_file", &path, source))?;
    }
    disk.remove_dir(dir)
        .await
        .map_err(|source| StorageError::io("remove_dir", dir, source))
}

/// Makes everything written to the filesystem holding `log_dir` durable with one `syncfs`, instead
/// of one fsync per file: how a shutdown makes thousands of partitions' clean markers durable.
pub fn sync_filesystem(log_dir: &Path) -> Result<(), StorageError> {
    let dir =
        std::fs::File::open(log_dir).map_err(|source| StorageError::io("open", log_dir, source))?;
    // SAFETY: syncfs on a descriptor we own.
    if unsafe { libc::syncfs(std::os::fd::AsRawFd::as_raw_fd(&dir)) } != 0 {
        return Err(StorageError::io(
            "syncfs",
            log_dir,
            std::io::Error::last_os_error(),
        ));
    }
    Ok(())
}

/// Writes `partition.metadata` in Kafka's format (`version: 0`, `topic_id: <base64 uuid>`), atomically.
pub async fn write_partition_metadata(
    partition_dir: &Path,
    topic_id: Uuid,
) -> Result<(), StorageError> {
    write_partition_metadata_with(&Disk::real(), partition_dir, topic_id).await
}

/// `write_partition_metadata` through `disk` (one that defers its syncs, during bulk creation).
pub async fn write_partition_metadata_with(
    disk: &Disk,
    partition_dir: &Path,
    topic_id: Uuid,
) -> Result<(), StorageError> {
    let path = partition_dir.join(PARTITION_METADATA_FILE);
    let text = format!("version: 0\ntopic_id: {}\n", encode_topic_id(topic_id));
    disk.write_file_atomically(&path, text.into_bytes())
        .await
        .map_err(|source| StorageError::io("write", &path, source))
}

/// Reads `partition.metadata`; `None` if the file does not exist.
pub async fn read_partition_metadata(partition_dir: &Path) -> Result<Option<Uuid>, StorageError> {
    let path = partition_dir.join(PARTITION_METADATA_FILE);
    let Some(bytes) = Disk::real()
        .read_small_file(&path, SMALL_FILE_LIMIT_BYTES)
        .await
        .map_err(|source| StorageError::io("read", &path, source))?
    else {
        return Ok(None);
    };
    let malformed = |detail: &str| StorageError::Malformed {
        what: "partition.metadata",
        path: path.clone(),
        detail: detail.to_owned(),
    };
    let text = std::str::from_utf8(&bytes).map_err(|_| malformed("not UTF-8"))?;
    let mut version = None;
    let mut topic_id = None;
    for line in text.lines() {
        if let Some((key, value)) = line.split_once(':') {
            match key.trim() {
                "version" => version = Some(value.trim().to_owned()),
                "topic_id" => topic_id = Some(value.trim().to_owned()),
                _ => {}
            }
        }
    }
    if version.as_deref() != Some("0") {
        return Err(malformed("missing or unknown version"));
    }
    let topic_id = topic_id.ok_or_else(|| malformed("no topic_id"))?;
    decode_topic_id(&topic_id)
        .map(Some)
        .ok_or_else(|| malformed("topic_id is not a base64 or hyphenated UUID"))
}

const BASE64_URL: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";

/// Kafka prints a topic id as URL-safe base64 without padding (`Uuid.toString`), 22 characters.
pub fn encode_topic_id(topic_id: Uuid) -> String {
    let bytes = topic_id.as_bytes();
    let mut out = String::with_capacity(22);
    let mut bits: u32 = 0;
    let mut bit_count = 0;
    for &byte in bytes {
        bits = (bits << 8) | u32::from(byte);
        bit_count += 8;
        while bit_count >= 6 {
            bit_count -= 6;
            out.push(BASE64_URL[((bits >> bit_count) & 0x3f) as usize] as char);
        }
    }
    if bit_count > 0 {
        out.push(BASE64_URL[((bits << (6 - bit_count)) & 0x3f) as usize] as char);
    }
    out
}

/// Parses a topic id written by Kafka (base64) or by hand (hyphenated UUID).
pub fn decode_topic_id(text: &str) -> Option<Uuid> {
    if let Ok(uuid) = Uuid::parse_str(text) {
        return Some(uuid);
    }
    if text.len() != 22 {
        return None;
    }
    let mut bytes = Vec::with_capacity(16);
    let mut bits: u32 = 0;
    let mut bit_count = 0;
    for character in text.bytes() {
        let value = BASE64_URL
            .iter()
            .position(|&candidate| candidate == character)? as u32;
        bits = (bits << 6) | value;
        bit_count += 6;
        if bit_count >= 8 {
            bit_count -= 8;
            bytes.push((bits >> bit_count) as u8);
        }
    }
    Uuid::from_slice(&bytes[..16]).ok()
}

/// Where recovery may start: every batch before `offset` (which sits at `position` in the segment
/// based at `segment_base`) was fdatasync'ed, together with the indexes up to it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Checkpoint {
    pub offset: i64,
    pub segment_base: i64,
    pub position: u64,
}

impl Checkpoint {
    pub(crate) fn encode(&self) -> Vec<u8> {
        format!(
            "1\n{} {} {}\n",
            self.offset, self.segment_base, self.position
        )
        .into_bytes()
    }

    pub(crate) fn decode(bytes: &[u8]) -> Option<Checkpoint> {
        let text = std::str::from_utf8(bytes).ok()?;
        let mut lines = text.lines();
        if lines.next()? != "1" {
            return None;
        }
        let mut fields = lines.next()?.split(' ');
        let checkpoint = Checkpoint {
            offset: fields.next()?.parse().ok()?,
            segment_base: fields.next()?.parse().ok()?,
            position: fields.next()?.parse().ok()?,
        };
        (checkpoint.offset >= checkpoint.segment_base && checkpoint.segment_base >= 0)
            .then_some(checkpoint)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn partition_dir_names_split_at_the_last_dash() {
        assert_eq!(
            parse_partition_dir_name("orders-eu-12"),
            Some(("orders-eu".into(), 12))
        );
        assert_eq!(parse_partition_dir_name("t-0"), Some(("t".into(), 0)));
        assert_eq!(parse_partition_dir_name("t-0.abc-delete"), None);
        assert_eq!(parse_partition_dir_name("-3"), None);
        assert_eq!(parse_partition_dir_name("topic"), None);
    }

    #[test]
    fn topic_ids_round_trip_in_kafka_base64() {
        let id = Uuid::from_u128(0x0123_4567_89ab_cdef_0011_2233_4455_6677);
        let text = encode_topic_id(id);
        assert_eq!(text.len(), 22);
        assert_eq!(decode_topic_id(&text), Some(id));
        assert_eq!(decode_topic_id(&id.to_string()), Some(id));
        assert_eq!(decode_topic_id("short"), None);
        // Kafka's own rendering of this UUID (org.apache.kafka.common.Uuid.toString).
        assert_eq!(
            encode_topic_id(Uuid::from_u128(0)),
            "AAAAAAAAAAAAAAAAAAAAAA"
        );
    }

    #[test]
    fn checkpoints_round_trip() {
        let checkpoint = Checkpoint {
            offset: 77,
            segment_base: 50,
            position: 4096,
        };
        assert_eq!(Checkpoint::decode(&checkpoint.encode()), Some(checkpoint));
        assert_eq!(
            Checkpoint::decode(b"1\n5 9 0\n"),
            None,
            "offset below its segment"
        );
        assert_eq!(Checkpoint::decode(b"garbage"), None);
    }
}
