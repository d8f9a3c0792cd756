//! The compaction side of topic configuration and the per-shard log cleaner: the topic keys
//! `cleanup.policy`, `min.cleanable.dirty.ratio`, `min.compaction.lag.ms`, `max.compaction.lag.ms`
//! and `delete.retention.ms` (validated with errors naming key and value, as Kafka's), their broker
//! defaults (`log.cleanup.policy`, `log.cleaner.*`), and the background task that runs
//! `PartitionLog::clean` over this shard's compacted partitions every `log.cleaner.backoff.ms`.

use std::collections::HashMap;
use std::rc::{Rc, Weak};
use std::time::Duration;

use tracing::{error, warn};

use super::ShardBroker;
use crate::config::{Config, parse_cleanup_policy};
use crate::storage::cleaner::{CleanError, CleanerLimits, CompactionConfig, cleanup_policy_text};
use crate::storage::{PartitionLog, StorageError};

/// A topic's compaction overrides; `None` = the broker default.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct CompactionOverrides {
    /// (compact, delete)
    pub cleanup_policy: Option<(bool, bool)>,
    pub min_cleanable_dirty_ratio: Option<f64>,
    pub min_compaction_lag_ms: Option<u64>,
    pub max_compaction_lag_ms: Option<u64>,
    pub delete_retention_ms: Option<u64>,
}

// The ratio is validated to lie in [0, 1], never NaN, so equality is reflexive.
impl Eq for CompactionOverrides {}

impl CompactionOverrides {
    /// Applies `key=value` if `key` is a compaction key: `None` if it is not one of ours,
    /// `Some(Err(reason))` for a bad value.
    pub fn set(&mut self, key: &str, value: &str) -> Option<Result<(), &'static str>> {
        let number = || value.trim().parse::<i64>().map_err(|_| "not an integer");
        let result = match key {
            "cleanup.policy" => parse_cleanup_policy(value)
                .map(|policy| self.cleanup_policy = Some(policy))
                .ok_or("must be delete, compact or compact,delete"),
            "min.cleanable.dirty.ratio" => match value.trim().parse::<f64>() {
                Ok(ratio) if (0.0..=1.0).contains(&ratio) => {
                    self.min_cleanable_dirty_ratio = Some(ratio);
                    Ok(())
                }
                Ok(_) => Err("must be between 0 and 1"),
                Err(_) => Err("not a number"),
            },
            "min.compaction.lag.ms" => number().and_then(|ms| {
                if ms < 0 {
                    return Err("must be >= 0");
                }
                if self
                    .max_compaction_lag_ms
                    .is_some_and(|max| (ms as u64) > max)
                {
                    return Err("must not exceed max.compaction.lag.ms");
                }
                self.min_compaction_lag_ms = Some(ms as u64);
                Ok(())
            }),
            "max.compaction.lag.ms" => number().and_then(|ms| {
                if ms < 1 {
                    return Err("must be >= 1");
                }
                if self
                    .min_compaction_lag_ms
                    .is_some_and(|min| min > ms as u64)
                {
                    return Err("must not be below min.compaction.lag.ms");
                }
                self.max_compaction_lag_ms = Some(ms as u64);
                Ok(())
            }),
            "delete.retention.ms" => number().and_then(|ms| {
                if ms < 0 {
                    return Err("must be >= 0");
                }
                self.delete_retention_ms = Some(ms as u64);
                Ok(())
            }),
            _ => return None,
        };
        Some(result)
    }

    /// The overrides as `key=value` pairs, for persistence and DescribeConfigs.
    pub fn entries(&self) -> Vec<(&'static str, String)> {
        let mut entries = Vec::new();
        if let Some((compact, delete)) = self.cleanup_policy {
            entries.push((
                "cleanup.policy",
                cleanup_policy_text(compact, delete).to_string(),
            ));
        }
        if let Some(ratio) = self.min_cleanable_dirty_ratio {
            entries.push(("min.cleanable.dirty.ratio", ratio.to_string()));
        }
        if let Some(ms) = self.min_compaction_lag_ms {
            entries.push(("min.compaction.lag.ms", ms.to_string()));
        }
        if let Some(ms) = self.max_compaction_lag_ms {
            entries.push(("max.compaction.lag.ms", ms.to_string()));
        }
        if let Some(ms) = self.delete_retention_ms {
            entries.push(("delete.retention.ms", ms.to_string()));
        }
        entries
    }

    /// The effective settings: the broker's, overridden by these.
    pub fn apply(&self, defaults: &CompactionConfig) -> CompactionConfig {
        let (compact, delete) = self
            .cleanup_policy
            .unwrap_or((defaults.compact, defaults.delete));
        let mut effective = CompactionConfig {
            compact,
            delete,
            min_cleanable_dirty_ratio: self
                .min_cleanable_dirty_ratio
                .unwrap_or(defaults.min_cleanable_dirty_ratio),
            min_compaction_lag_ms: self
                .min_compaction_lag_ms
                .unwrap_or(defaults.min_compaction_lag_ms),
            max_compaction_lag_ms: self
                .max_compaction_lag_ms
                .or(defaults.max_compaction_lag_ms),
            delete_retention_ms: self
                .delete_retention_ms
                .unwrap_or(defaults.delete_retention_ms),
        };
        // A topic's min lag above the broker's max lag (or the reverse) cannot both hold: the
        // topic's own setting wins, as the more specific one.
        if let Some(max) = effective.max_compaction_lag_ms
            && max < effective.min_compaction_lag_ms
        {
            if self.min_compaction_lag_ms.is_some() {
                effective.max_compaction_lag_ms = Some(effective.min_compaction_lag_ms);
            } else {
                effective.min_compaction_lag_ms = max;
            }
        }
        effective
    }
}

/// The broker defaults of every topic's compaction settings.
pub fn broker_compaction(config: &Config) -> CompactionConfig {
    let cleaner = &config.log_cleaner;
    CompactionConfig {
        compact: cleaner.cleanup_compact,
        delete: cleaner.cleanup_delete,
        min_cleanable_dirty_ratio: cleaner.min_cleanable_ratio,
        min_compaction_lag_ms: cleaner.min_compaction_lag_ms,
        max_compaction_lag_ms: cleaner.max_compaction_lag_ms,
        delete_retention_ms: cleaner.delete_retention_ms,
    }
}

/// This shard's share of the broker-wide cleaner budgets.
fn shard_limits(config: &Config) -> CleanerLimits {
    let shards = config.shard_count.max(1) as u64;
    CleanerLimits {
        dedupe_buffer_bytes: (config.log_cleaner.dedupe_buffer_size_bytes / shards)
            .min(usize::MAX as u64) as usize,
        io_bytes_per_second: config
            .log_cleaner
            .io_max_bytes_per_second
            .map(|rate| (rate / shards).max(1)),
    }
}

/// Where a log's last cleaning pass stopped.
struct Progress {
    /// The log it was (a topic deleted and created again gets a new one, and starts over).
    log: Weak<PartitionLog>,
    first_dirty_offset: i64,
    tombstones_due_ms: Option<i64>,
}

impl ShardBroker {
    /// Starts this shard's cleaner: a task on the shard's runtime that, every
    /// `log.cleaner.backoff.ms`, runs one pass over each compacted partition the shard owns. The
    /// pass yields between batches, so produce and fetch on the shard keep running.
    pub(super) fn start_cleaner(self: Rc<Self>) {
        if !self.config.log_cleaner.enable {
            return;
        }
        let limits = shard_limits(&self.config);
        let backoff = Duration::from_millis(self.config.log_cleaner.backoff_ms.max(1));
        compio::runtime::spawn(async move {
            // Where each log's last pass stopped; a log that was replaced (topic deleted and created
            // again) starts over.
            let mut progress: HashMap<(String, i32), Progress> = HashMap::new();
            loop {
                compio::time::sleep(backoff).await;
                if self.stopping.get() {
                    break;
                }
                for (key, log) in self.owned_logs() {
                    if self.stopping.get() {
                        break;
                    }
                    let now = super::now_ms();
                    let first_dirty = progress
                        .get(&key)
                        .filter(|p| p.log.upgrade().is_some_and(|l| Rc::ptr_eq(&l, &log)))
                        .filter(|p| p.tombstones_due_ms.is_none_or(|due| due > now))
                        .map_or(0, |p| p.first_dirty_offset);
                    match log.clean(now, first_dirty, limits).await {
                        Ok(Some(outcome)) => {
                            progress.insert(
                                key,
                                Progress {
                                    log: Rc::downgrade(&log),
                                    first_dirty_offset: outcome.first_dirty_offset,
                                    tombstones_due_ms: outcome.tombstones_due_ms,
                                },
                            );
                        }
                        Ok(None) => {}
                        // The log closed under the pass (its topic was deleted, or shutdown).
                        Err(CleanError::Interrupted)
                        | Err(CleanError::Storage(StorageError::Closed { .. })) => {}
                        Err(CleanError::Storage(e)) => {
                            error!(topic = %key.0, partition = key.1, error = %e, "log cleaner failed")
                        }
                        Err(e @ CleanError::BadBatch { .. }) => {
                            warn!(topic = %key.0, partition = key.1, error = %e, "log cleaner skipped a partition")
                        }
                    }
                }
                progress.retain(|_, p| p.log.strong_count() > 0);
            }
        })
        .detach();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn overrides_validate_and_apply() {
        let mut overrides = CompactionOverrides::default();
        assert_eq!(
            overrides.set("cleanup.policy", "compact,delete"),
            Some(Ok(()))
        );
        assert_eq!(overrides.cleanup_policy, Some((true, true)));
        assert!(matches!(
            overrides.set("cleanup.policy", "shred"),
            Some(Err(_))
        ));
        assert!(matches!(
            overrides.set("min.cleanable.dirty.ratio", "1.5"),
            Some(Err(_))
        ));
        assert_eq!(
            overrides.set("min.cleanable.dirty.ratio", "0.1"),
            Some(Ok(()))
        );
        assert_eq!(overrides.set("max.compaction.lag.ms", "1000"), Some(Ok(())));
        assert!(matches!(
            overrides.set("min.compaction.lag.ms", "2000"),
            Some(Err(_))
        ));
        assert_eq!(overrides.set("delete.retention.ms", "50"), Some(Ok(())));
        assert_eq!(overrides.set("retention.ms", "1"), None);
        let effective = overrides.apply(&CompactionConfig::default());
        assert!(effective.compact && effective.delete);
        assert_eq!(effective.delete_retention_ms, 50);
        assert_eq!(effective.max_compaction_lag_ms, Some(1000));
        assert!(effective.validate().is_ok());
        assert_eq!(overrides.entries().len(), 4);
    }
}
