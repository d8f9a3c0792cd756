//! The topic table: which topics exist, their ids, partition counts and config overrides, where each
//! partition lives (which shard), and how that table is stored on disk.
//!
//! Shard 0 is the only writer (the "controller"); every shard reads an immutable snapshot that shard 0
//! publishes to it through the mailboxes, so readers never lock. Each snapshot carries an epoch, and a
//! shard keeps only the newest one it has seen, so a late publication can never roll a shard back.

use std::collections::BTreeMap;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use uuid::Uuid;

use crate::config::Config;
use crate::storage::LogConfig;

/// Kafka's own limit on topic names (`Topic.MAX_NAME_LENGTH`).
const MAX_TOPIC_NAME_LENGTH: usize = 249;

/// Suffix of the marker of a topic creation in progress, beside the definitions.
const CREATING_SUFFIX: &str = ".creating";

/// The directory, inside the log dir, that holds one properties file per topic.
pub const TOPICS_DIR_NAME: &str = ".ringbroker-topics";

/// Per-topic settings a client may set with CreateTopics; `None` means "use the broker default".
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TopicConfig {
    pub retention_ms: Option<i64>,
    pub retention_bytes: Option<i64>,
    pub segment_bytes: Option<u64>,
    pub segment_ms: Option<u64>,
    pub max_message_bytes: Option<u32>,
    pub flush_messages: Option<u64>,
    pub flush_ms: Option<u64>,
    /// `cleanup.policy` and the compaction keys (`compaction.rs`).
    pub compaction: super::compaction::CompactionOverrides,
}

/// The topic-level config keys this broker understands, in the order DescribeConfigs lists them.
pub const TOPIC_CONFIG_KEYS: &[&str] = &[
    "cleanup.policy",
    "retention.ms",
    "retention.bytes",
    "segment.bytes",
    "segment.ms",
    "max.message.bytes",
    "flush.messages",
    "flush.ms",
    "min.cleanable.dirty.ratio",
    "min.compaction.lag.ms",
    "max.compaction.lag.ms",
    "delete.retention.ms",
];

/// Why a topic config could not be applied; the message names the key and the value.
#[derive(Debug, thiserror::Error)]
#[error("invalid value {value:?} for topic config {key:?}: {reason}")]
pub struct TopicConfigError {
    pub key: String,
    pub value: String,
    pub reason: &'static str,
}

impl TopicConfig {
    /// Applies one `key=value` override, as CreateTopics carries them.
    pub fn set(&mut self, key: &str, value: &str) -> Result<(), TopicConfigError> {
        let error = |reason| TopicConfigError {
            key: key.to_string(),
            value: value.to_string(),
            reason,
        };
        let number = || {
            value
                .trim()
                .parse::<i64>()
                .map_err(|_| error("not an integer"))
        };
        if let Some(result) = self.compaction.set(key, value) {
            return result.map_err(error);
        }
        match key {
            "retention.ms" => {
                self.retention_ms =
                    Some(at_least(number()?, -1).ok_or_else(|| error("must be >= -1"))?)
            }
            "retention.bytes" => {
                self.retention_bytes =
                    Some(at_least(number()?, -1).ok_or_else(|| error("must be >= -1"))?)
            }
            "segment.bytes" => {
                let bytes = number()?;
                if !(14..=i32::MAX as i64).contains(&bytes) {
                    return Err(error("must be between 14 and 2147483647"));
                }
                self.segment_bytes = Some(bytes as u64);
            }
            "segment.ms" => {
                self.segment_ms = Some(positive(number()?).ok_or_else(|| error("must be >= 1"))?)
            }
            "max.message.bytes" => {
                let bytes = number()?;
                if !(0..=i32::MAX as i64).contains(&bytes) {
                    return Err(error("must be between 0 and 2147483647"));
                }
                self.max_message_bytes = Some(bytes as u32);
            }
            "flush.messages" => {
                self.flush_messages =
                    Some(positive(number()?).ok_or_else(|| error("must be >= 1"))?)
            }
            "flush.ms" => {
                self.flush_ms =
                    Some(at_least(number()?, 0).ok_or_else(|| error("must be >= 0"))? as u64)
            }
            _ => return Err(error("unknown or unsupported topic config")),
        }
        Ok(())
    }

    /// The overrides as `key=value` pairs, for persistence and DescribeConfigs.
    pub fn entries(&self) -> Vec<(&'static str, String)> {
        let mut entries = Vec::new();
        let mut push = |key: &'static str, value: Option<String>| {
            if let Some(value) = value {
                entries.push((key, value));
            }
        };
        push("retention.ms", self.retention_ms.map(|v| v.to_string()));
        push(
            "retention.bytes",
            self.retention_bytes.map(|v| v.to_string()),
        );
        push("segment.bytes", self.segment_bytes.map(|v| v.to_string()));
        push("segment.ms", self.segment_ms.map(|v| v.to_string()));
        push(
            "max.message.bytes",
            self.max_message_bytes.map(|v| v.to_string()),
        );
        push("flush.messages", self.flush_messages.map(|v| v.to_string()));
        push("flush.ms", self.flush_ms.map(|v| v.to_string()));
        entries.extend(self.compaction.entries());
        entries
    }

    /// The effective storage settings for a partition of this topic: the broker's defaults from
    /// `config`, overridden by this topic's settings.
    pub fn log_config(&self, config: &Config) -> LogConfig {
        let defaults = broker_log_config(config);
        let non_negative = |v: i64| if v < 0 { None } else { Some(v as u64) };
        LogConfig {
            segment_bytes: self.segment_bytes.unwrap_or(defaults.segment_bytes),
            segment_ms: self.segment_ms.unwrap_or(defaults.segment_ms),
            retention_ms: self
                .retention_ms
                .map_or(defaults.retention_ms, non_negative),
            retention_bytes: self
                .retention_bytes
                .map_or(defaults.retention_bytes, non_negative),
            max_message_bytes: self.max_message_bytes.unwrap_or(defaults.max_message_bytes),
            flush_interval_messages: self.flush_messages.or(defaults.flush_interval_messages),
            flush_interval_ms: self.flush_ms.or(defaults.flush_interval_ms),
            compaction: self.compaction.apply(&defaults.compaction),
            ..defaults
        }
    }
}

fn at_least(value: i64, min: i64) -> Option<i64> {
    (value >= min).then_some(value)
}

fn positive(value: i64) -> Option<u64> {
    (value >= 1).then_some(value as u64)
}

/// The storage settings every partition gets unless its topic overrides them.
pub fn broker_log_config(config: &Config) -> LogConfig {
    LogConfig {
        segment_bytes: config.log_segment_bytes,
        segment_ms: config.log_roll_ms,
        retention_ms: config.log_retention_ms,
        retention_bytes: config.log_retention_bytes,
        index_interval_bytes: config.log_index_interval_bytes,
        segment_index_bytes: config.log_index_size_max_bytes,
        max_message_bytes: config.message_max_bytes,
        flush_interval_messages: config.log_flush_interval_messages,
        flush_interval_ms: config.log_flush_interval_ms,
        durable_high_watermark: config.high_watermark_durable,
        producer_id_expiration_ms: config.producer_id_expiration_ms,
        compaction: super::compaction::broker_compaction(config),
        uncached_appends: config.log_write_mode == crate::storage::WriteMode::Uncached,
        ..LogConfig::default()
    }
}

/// One topic as every shard sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TopicInfo {
    pub name: String,
    pub id: Uuid,
    pub partitions: i32,
    pub config: TopicConfig,
}

/// An immutable view of all topics; shards swap whole snapshots, never edit one in place.
#[derive(Clone, Debug, Default)]
pub struct TopicsSnapshot {
    pub epoch: u64,
    pub by_name: BTreeMap<String, Arc<TopicInfo>>,
}

impl TopicsSnapshot {
    pub fn get(&self, name: &str) -> Option<&Arc<TopicInfo>> {
        self.by_name.get(name)
    }

    pub fn by_id(&self, id: Uuid) -> Option<&Arc<TopicInfo>> {
        self.by_name.values().find(|topic| topic.id == id)
    }

    /// A new snapshot with `topic` added or replaced, one epoch later.
    pub fn with_topic(&self, topic: TopicInfo) -> TopicsSnapshot {
        let mut next = self.clone();
        next.epoch += 1;
        next.by_name.insert(topic.name.clone(), Arc::new(topic));
        next
    }

    /// A new snapshot without `name`, one epoch later.
    pub fn without_topic(&self, name: &str) -> TopicsSnapshot {
        let mut next = self.clone();
        next.epoch += 1;
        next.by_name.remove(name);
        next
    }
}

/// The shard that owns a partition. Partitions of one topic go round-robin over the shards, starting
/// at a shard chosen by the topic name, so that many single-partition topics still spread out. The
/// function depends only on its arguments, so a restart with the same shard count finds every
/// partition where it was; with another count partitions simply move, because all shards share the
/// log dir.
pub fn partition_owner(topic: &str, partition: i32, shard_count: usize) -> usize {
    let start = fnv1a(topic.as_bytes()) as usize;
    (start.wrapping_add(partition.max(0) as usize)) % shard_count.max(1)
}

/// FNV-1a: stable across releases and platforms, unlike `std`'s randomly keyed hasher.
pub fn fnv1a(bytes: &[u8]) -> u64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in bytes {
        hash ^= u64::from(*byte);
        hash = hash.wrapping_mul(0x0100_0000_01b3);
    }
    hash
}

/// Checks a topic name as Kafka does (`Topic.validate`): 1..=249 characters from `[a-zA-Z0-9._-]`,
/// and not `.` or `..`.
pub fn validate_topic_name(name: &str) -> Result<(), String> {
    if name.is_empty() {
        return Err("topic name is empty".into());
    }
    if name == "." || name == ".." {
        return Err(format!("topic name {name:?} is not allowed"));
    }
    if name.len() > MAX_TOPIC_NAME_LENGTH {
        return Err(format!(
            "topic name is longer than {MAX_TOPIC_NAME_LENGTH} characters"
        ));
    }
    if let Some(bad) = name
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || *c == '.' || *c == '_' || *c == '-'))
    {
        return Err(format!(
            "topic name {name:?} contains {bad:?}; only ASCII letters, digits, '.', '_' and '-' are allowed"
        ));
    }
    Ok(())
}

/// Where topic definitions live: `<log.dir>/.ringbroker-topics/<topic>.properties`, one small file per
/// topic, written to a temporary name, fsynced and renamed so a crash leaves either the old or the new
/// file. (Kafka keeps this in ZooKeeper or KRaft; a single node needs only a file.)
pub struct TopicStore {
    dir: PathBuf,
}

impl TopicStore {
    pub fn new(log_dir: &Path) -> TopicStore {
        TopicStore {
            dir: log_dir.join(TOPICS_DIR_NAME),
        }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.join(format!("{name}.properties"))
    }

    /// Reads every topic definition. A file that cannot be parsed is reported by name rather than
    /// skipped, so a damaged definition never silently drops a topic's data from view.
    pub fn load(&self) -> io::Result<TopicsSnapshot> {
        let mut snapshot = TopicsSnapshot::default();
        let entries = match fs::read_dir(&self.dir) {
            Ok(entries) => entries,
            Err(error) if error.kind() == io::ErrorKind::NotFound => return Ok(snapshot),
            Err(error) => return Err(error),
        };
        for entry in entries {
            let path = entry?.path();
            let Some(name) = path
                .file_name()
                .and_then(|n| n.to_str())
                .and_then(|n| n.strip_suffix(".properties"))
            else {
                continue;
            };
            let text = fs::read_to_string(&path)?;
            let topic = parse_topic_file(name, &text).map_err(|reason| {
                io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("topic definition {}: {reason}", path.display()),
                )
            })?;
            snapshot.by_name.insert(topic.name.clone(), Arc::new(topic));
        }
        Ok(snapshot)
    }

    pub fn save(&self, topic: &TopicInfo) -> io::Result<()> {
        fs::create_dir_all(&self.dir)?;
        let mut text = format!(
            "# ringbroker topic definition\ntopic.id={}\npartitions={}\n",
            topic.id, topic.partitions
        );
        for (key, value) in topic.config.entries() {
            text.push_str(&format!("{key}={value}\n"));
        }
        let final_path = self.path(&topic.name);
        let temp_path = self.dir.join(format!("{}.properties.tmp", topic.name));
        {
            let file = fs::File::create(&temp_path)?;
            io::Write::write_all(&mut &file, text.as_bytes())?;
            file.sync_all()?;
        }
        fs::rename(&temp_path, &final_path)?;
        fs::File::open(&self.dir)?.sync_all()
    }

    fn creating_path(&self, name: &str) -> PathBuf {
        self.dir.join(format!("{name}{CREATING_SUFFIX}"))
    }

    /// Records, durably, that `topic` is being created: until `clear_creating`, a start finds the
    /// marker and removes whatever the creation made unless the definition was written.
    pub fn mark_creating(&self, topic: &TopicInfo) -> io::Result<()> {
        fs::create_dir_all(&self.dir)?;
        let path = self.creating_path(&topic.name);
        {
            let file = fs::File::create(&path)?;
            io::Write::write_all(
                &mut &file,
                format!("topic.id={}\npartitions={}\n", topic.id, topic.partitions).as_bytes(),
            )?;
            file.sync_all()?;
        }
        fs::File::open(&self.dir)?.sync_all()
    }

    /// Drops the creation marker (the creation finished, or was fully undone).
    pub fn clear_creating(&self, name: &str) -> io::Result<()> {
        match fs::remove_file(self.creating_path(name)) {
            Ok(()) => fs::File::open(&self.dir)?.sync_all(),
            Err(error) if error.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(error) => Err(error),
        }
    }

    /// At startup, before any partition is opened: finishes creations a crash interrupted. A marked
    /// topic whose definition was written is complete (only the marker goes); one without a
    /// definition was never visible to a client, so its partition directories, which hold no
    /// records, are removed with the marker. Returns the names of the topics removed.
    pub fn finish_interrupted_creations(&self, log_dir: &Path) -> io::Result<Vec<String>> {
        let entries = match fs::read_dir(&self.dir) {
            Ok(entries) => entries,
            Err(error) if error.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(error) => return Err(error),
        };
        let mut marked = Vec::new();
        for entry in entries {
            let file_name = entry?.file_name();
            if let Some(name) = file_name
                .to_str()
                .and_then(|n| n.strip_suffix(CREATING_SUFFIX))
            {
                marked.push(name.to_string());
            }
        }
        let mut removed = Vec::new();
        for name in marked {
            if !self.path(&name).exists() {
                for entry in fs::read_dir(log_dir)? {
                    let entry = entry?;
                    let dir_name = entry.file_name().to_string_lossy().into_owned();
                    let ours = crate::storage::dirs::parse_partition_dir_name(&dir_name)
                        .is_some_and(|(topic, _)| topic == name);
                    if ours && entry.file_type()?.is_dir() {
                        let doomed = log_dir.join(format!(
                            "{dir_name}.{}{}",
                            Uuid::new_v4().simple(),
                            crate::storage::dirs::DELETE_DIR_SUFFIX
                        ));
                        fs::rename(entry.path(), &doomed)?;
                        fs::remove_dir_all(&doomed)?;
                    }
                }
                removed.push(name.clone());
            }
            self.clear_creating(&name)?;
        }
        if !removed.is_empty() {
            fs::File::open(log_dir)?.sync_all()?;
        }
        Ok(removed)
    }

    pub fn remove(&self, name: &str) -> io::Result<()> {
        match fs::remove_file(self.path(name)) {
            Ok(()) => fs::File::open(&self.dir)?.sync_all(),
            Err(error) if error.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(error) => Err(error),
        }
    }
}

fn parse_topic_file(name: &str, text: &str) -> Result<TopicInfo, String> {
    validate_topic_name(name)?;
    let mut id = None;
    let mut partitions = None;
    let mut config = TopicConfig::default();
    for line in text.lines() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let (key, value) = line
            .split_once('=')
            .ok_or_else(|| format!("line {line:?} is not key=value"))?;
        match key {
            "topic.id" => {
                id = Some(Uuid::parse_str(value).map_err(|e| format!("topic.id {value:?}: {e}"))?)
            }
            "partitions" => {
                partitions = Some(
                    value
                        .parse::<i32>()
                        .ok()
                        .filter(|p| *p > 0)
                        .ok_or_else(|| format!("partitions {value:?} is not a positive integer"))?,
                )
            }
            _ => config.set(key, value).map_err(|e| e.to_string())?,
        }
    }
    Ok(TopicInfo {
        name: name.to_string(),
        id: id.ok_or("topic.id is missing")?,
        partitions: partitions.ok_or("partitions is missing")?,
        config,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn topic_names_follow_kafka_rules() {
        assert!(validate_topic_name("orders.v1_x-2").is_ok());
        for bad in ["", ".", "..", "a b", "topic/evil", "ü"] {
            assert!(
                validate_topic_name(bad).is_err(),
                "{bad:?} must be rejected"
            );
        }
        assert!(validate_topic_name(&"x".repeat(249)).is_ok());
        assert!(validate_topic_name(&"x".repeat(250)).is_err());
    }

    #[test]
    fn partitions_of_a_topic_spread_over_all_shards() {
        let owners: Vec<usize> = (0..4).map(|p| partition_owner("t", p, 4)).collect();
        let mut sorted = owners.clone();
        sorted.sort();
        assert_eq!(sorted, vec![0, 1, 2, 3], "owners {owners:?}");
        assert_eq!(partition_owner("t", 3, 1), 0);
    }

    #[test]
    fn topic_files_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let store = TopicStore::new(dir.path());
        let mut config = TopicConfig::default();
        config.set("retention.ms", "60000").unwrap();
        config.set("segment.bytes", "1048576").unwrap();
        let topic = TopicInfo {
            name: "orders".into(),
            id: Uuid::new_v4(),
            partitions: 6,
            config,
        };
        store.save(&topic).unwrap();
        let loaded = store.load().unwrap();
        assert_eq!(**loaded.get("orders").unwrap(), topic);
        store.remove("orders").unwrap();
        assert!(store.load().unwrap().get("orders").is_none());
    }

    #[test]
    fn bad_topic_configs_name_key_and_value() {
        let mut config = TopicConfig::default();
        let error = config.set("retention.ms", "soon").unwrap_err().to_string();
        assert!(
            error.contains("retention.ms") && error.contains("soon"),
            "{error}"
        );
        assert!(config.set("cleanup.policy", "compacted").is_err());
        assert!(config.set("cleanup.policy", "compact").is_ok());
        assert!(config.set("cleanup.policy", "delete").is_ok());
        assert!(config.set("no.such.key", "1").is_err());
    }
}
