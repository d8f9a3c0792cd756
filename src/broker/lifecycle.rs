//! broker::lifecycle: a shard's partitions in bulk: the partition budget, all-or-nothing topic
//! creation, opening a topic's owned partitions (at startup and at creation) and closing them all at
//! shutdown, each with bounded concurrency, so thousands of partitions cost the time of their IO
//! overlapped rather than one after another.

use std::cell::RefCell;
use std::collections::BTreeSet;
use std::pin::pin;
use std::rc::Rc;
use std::sync::Arc;
use std::time::Duration;

use futures_util::future::{Either, select};

use futures_util::stream::{self, StreamExt};
use tracing::{error, info, warn};

use crate::config::{KEY_MAX_PARTITIONS_PER_SHARD, KEY_SHUTDOWN_TIMEOUT};
use crate::storage::{PartitionLog, descriptors};

use super::errors::code;
use super::topics::{TopicInfo, TopicStore, fnv1a};
use super::{ShardBroker, TopicError, current};

/// How many partitions a shard opens or closes at once. Each one in progress holds a few
/// descriptors (its segment, a temporary file) beside the descriptor cache, so it is a fraction of
/// the cache; 64 already keeps the disk's queue full (the fsyncs of concurrent closes share
/// journal commits).
pub(super) fn partition_io_concurrency() -> usize {
    (descriptors::capacity() / 4).clamp(1, 64)
}

/// How many of a topic's `partitions` shard `shard` owns under `topics::partition_owner`'s
/// round-robin placement, without walking every partition.
fn owned_count(topic: &str, partitions: i32, shard: usize, shard_count: usize) -> usize {
    let shard_count = shard_count.max(1);
    let partitions = partitions.max(0) as usize;
    let start = (fnv1a(topic.as_bytes()) as usize) % shard_count;
    // Partition p lands on (start + p) % shard_count: shard `shard` gets p = (shard - start) mod n,
    // then every n-th.
    let first = (shard + shard_count - start) % shard_count;
    if first >= partitions {
        0
    } else {
        (partitions - first).div_ceil(shard_count)
    }
}

impl ShardBroker {
    /// Refuses a topic that would give any shard more than `ringbroker.max.partitions.per.shard`
    /// partitions, counting existing topics and creations in progress. Checked by the controller
    /// before anything is written, for CreateTopics (validate-only too) and auto-creation alike.
    pub(super) fn check_partition_budget(&self, topic: &TopicInfo) -> Result<(), TopicError> {
        let budget = self.config.max_partitions_per_shard;
        let topics = self.topics();
        let creating = self.creating.borrow();
        let existing = topics
            .by_name
            .values()
            .map(|existing| (existing.name.as_str(), existing.partitions))
            .chain(
                creating
                    .iter()
                    .map(|(name, partitions)| (name.as_str(), *partitions)),
            );
        let mut per_shard = vec![0usize; self.shard_count];
        for (name, partitions) in existing {
            for (shard, count) in per_shard.iter_mut().enumerate() {
                *count += owned_count(name, partitions, shard, self.shard_count);
            }
        }
        for (shard, count) in per_shard.iter().enumerate() {
            let adding = owned_count(&topic.name, topic.partitions, shard, self.shard_count);
            if count + adding > budget {
                return Err(TopicError::new(
                    code::INVALID_PARTITIONS,
                    format!(
                        "Topic '{}' with {} partitions would give shard {shard} {} partitions \
                         ({count} already), above its budget of {budget} \
                         ({KEY_MAX_PARTITIONS_PER_SHARD}).",
                        topic.name,
                        topic.partitions,
                        count + adding
                    ),
                ));
            }
        }
        Ok(())
    }

    /// Creates a topic's partitions on every owning shard, then its definition, all or nothing. A
    /// `<topic>.creating` marker is written first, so a crash midway is undone at the next start;
    /// a failure midway removes every partition made so far. Controller only.
    pub(super) async fn controller_create_topic_inner(
        &self,
        topic: &TopicInfo,
    ) -> Result<(), TopicError> {
        let storage_error = |e: String| TopicError::new(code::KAFKA_STORAGE_ERROR, e);
        let store = TopicStore::new(&self.log_dir);
        store
            .mark_creating(topic)
            .map_err(|e| storage_error(format!("marking the creation of {}: {e}", topic.name)))?;
        // Open every owner's logs before the topic becomes visible, so that no client learns of a
        // leader that does not yet have the partition.
        let mut failure = None;
        for shard in 0..self.shard_count {
            let info = topic.clone();
            let opened = self
                .ctx
                .run_on(shard, move || async move {
                    current()
                        .open_owned_partitions(&info)
                        .await
                        .map_err(|e| format!("{e:#}"))
                })
                .await
                .unwrap_or_else(|e| Err(format!("shard {shard} unreachable: {e}")));
            if let Err(e) = opened {
                failure = Some(e);
                break;
            }
        }
        // The definition is written last: until it exists, the topic does not survive a restart.
        if failure.is_none()
            && let Err(e) = store.save(topic)
        {
            failure = Some(format!("saving topic definition: {e}"));
        }
        if let Some(reason) = failure {
            error!(topic = %topic.name, %reason, "topic creation failed; removing what it made");
            self.abandon_topic_creation(topic).await;
            return Err(storage_error(reason));
        }
        if let Err(e) = store.clear_creating(&topic.name) {
            // Harmless: the next start finds the definition and only removes the marker.
            warn!(topic = %topic.name, error = %e, "could not remove the creation marker");
        }
        let snapshot = Arc::new(self.topics().with_topic(topic.clone()));
        self.publish_topics(snapshot).await;
        info!(topic = %topic.name, partitions = topic.partitions, id = %topic.id, "topic created");
        Ok(())
    }

    /// Undoes a failed creation on every shard, then drops its marker. What cannot be removed now
    /// stays marked, and the next start removes it.
    async fn abandon_topic_creation(&self, topic: &TopicInfo) {
        let mut complete = true;
        for shard in 0..self.shard_count {
            let info = topic.clone();
            let removed = self
                .ctx
                .run_on(shard, move || async move {
                    current().discard_owned_partitions(&info).await
                })
                .await
                .unwrap_or(false);
            complete &= removed;
        }
        let store = TopicStore::new(&self.log_dir);
        let _ = store.remove(&topic.name);
        if complete && let Err(e) = store.clear_creating(&topic.name) {
            warn!(topic = %topic.name, error = %e, "could not remove the creation marker");
        }
    }

    /// Closes and deletes this shard's partitions of a topic whose creation failed, and any
    /// directory of them that a failed open left behind. Returns whether everything went.
    async fn discard_owned_partitions(&self, topic: &TopicInfo) -> bool {
        let mut complete = true;
        for partition in 0..topic.partitions {
            if self.owner_of(&topic.name, partition) != self.shard {
                continue;
            }
            let opened = self
                .logs
                .borrow_mut()
                .remove(&(topic.name.clone(), partition));
            let result = match opened {
                Some(log) => log.delete().await,
                None => {
                    let dir = crate::storage::partition_dir(&self.log_dir, &topic.name, partition);
                    crate::storage::discard_partition_dir(&dir).await
                }
            };
            if let Err(e) = result {
                error!(topic = %topic.name, partition, error = %e, "removing a partition of a failed creation failed");
                complete = false;
            }
        }
        complete
    }

    /// Opens (creating if needed) the logs of `topic`'s partitions that this shard owns and that are
    /// not open yet, concurrently. Every partition that opened is installed even if another failed
    /// (the caller decides whether to roll back); the first failure is returned.
    ///
    /// The opens defer their fsyncs, and one `syncfs` of the log dir makes everything they wrote
    /// durable before this returns: creating or reopening 10,000 partitions then costs one sync
    /// instead of about eight per partition. Nothing is served from them before this returns (a
    /// new topic is published afterwards; at startup the shard is not ready yet), and a crash before
    /// the sync is no different from a crash during the opens.
    pub(super) async fn open_owned_partitions(&self, topic: &TopicInfo) -> anyhow::Result<()> {
        let (disk, deferral) = self.disk.deferring_syncs();
        let opened = self.open_owned_partitions_with(topic, &disk).await;
        let synced = crate::storage::sync_filesystem(&self.log_dir)
            .map_err(|e| anyhow::anyhow!("syncing the partitions of {}: {e}", topic.name));
        deferral.end();
        opened.and(synced)
    }

    async fn open_owned_partitions_with(
        &self,
        topic: &TopicInfo,
        disk: &crate::storage::Disk,
    ) -> anyhow::Result<()> {
        let log_config = topic.config.log_config(&self.config);
        let wanted: Vec<i32> = (0..topic.partitions)
            .filter(|&partition| {
                self.owner_of(&topic.name, partition) == self.shard
                    && self.log(&topic.name, partition).is_none()
            })
            .collect();
        let mut opened = stream::iter(wanted)
            .map(|partition| {
                let dir = self.log_dir.join(format!("{}-{}", topic.name, partition));
                let log_config = log_config.clone();
                async move {
                    let result = async {
                        // The shard's disk (a fault injector in tests, deferring its syncs here)
                        // with this log's write mode.
                        let log_disk = disk
                            .clone()
                            .with_uncached_appends(log_config.uncached_appends);
                        let log = PartitionLog::open_with_disk(&dir, log_config, log_disk)
                            .await
                            .map_err(|e| anyhow::anyhow!("opening {}: {e}", dir.display()))?;
                        // Written once: rewriting an unchanged file at every start cost two fsyncs
                        // per partition.
                        let recorded = crate::storage::read_partition_metadata(&dir)
                            .await
                            .ok()
                            .flatten();
                        if recorded != Some(topic.id) {
                            crate::storage::write_partition_metadata_with(disk, &dir, topic.id)
                                .await
                                .map_err(|e| {
                                    anyhow::anyhow!(
                                        "writing partition.metadata in {}: {e}",
                                        dir.display()
                                    )
                                })?;
                        }
                        Ok::<_, anyhow::Error>(log)
                    }
                    .await;
                    (partition, result)
                }
            })
            .buffer_unordered(partition_io_concurrency());
        let mut first_error = None;
        // Bounded by the number of partitions wanted.
        while let Some((partition, result)) = opened.next().await {
            match result {
                Ok(log) => {
                    self.logs
                        .borrow_mut()
                        .insert((topic.name.clone(), partition), Rc::new(log));
                }
                Err(error) => {
                    first_error.get_or_insert(error);
                }
            }
        }
        match first_error {
            Some(error) => Err(error),
            None => Ok(()),
        }
    }

    /// Closes every log of this shard (flush, indexes, checkpoint, clean marker), concurrently,
    /// within `timeout`. Returns the partitions that were not marked clean, each with its reason
    /// (those still closing at the deadline included).
    pub(super) async fn close_all_partitions(&self, timeout: Duration) -> Vec<String> {
        let logs = self.owned_logs();
        let pending: RefCell<BTreeSet<(String, i32)>> =
            RefCell::new(logs.iter().map(|(key, _)| key.clone()).collect());
        let unclean = RefCell::new(Vec::new());
        let work = async {
            let mut closing = stream::iter(logs)
                .map(|((topic, partition), log)| async move {
                    let result = log.close_deferring_marker_sync().await;
                    (topic, partition, result)
                })
                .buffer_unordered(partition_io_concurrency());
            // Bounded by the number of logs.
            while let Some((topic, partition, result)) = closing.next().await {
                pending.borrow_mut().remove(&(topic.clone(), partition));
                if let Err(e) = result {
                    error!(%topic, partition, error = %e, "closing log failed; it will be recovered at the next start");
                    unclean
                        .borrow_mut()
                        .push(format!("{topic}-{partition}: {e}"));
                }
            }
        };
        let deadline = compio::time::sleep(timeout);
        let finished = matches!(select(pin!(work), pin!(deadline)).await, Either::Left(_));
        let mut unclean = unclean.into_inner();
        if !finished {
            let late = pending.into_inner();
            error!(
                shard = self.shard,
                partitions = late.len(),
                timeout_ms = timeout.as_millis() as u64,
                "partitions not closed within {KEY_SHUTDOWN_TIMEOUT}; they will be recovered at the next start"
            );
            unclean.extend(late.into_iter().map(|(topic, partition)| {
                format!("{topic}-{partition}: still closing at the deadline")
            }));
        }
        // One syncfs makes every marker written above durable.
        if let Err(e) = crate::storage::sync_filesystem(&self.log_dir) {
            error!(error = %e, "syncing the log dir at shutdown failed; partitions will be recovered at the next start");
            unclean.push(format!("every partition of this shard: {e}"));
        }
        unclean
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::broker::topics::partition_owner;

    #[test]
    fn owned_counts_match_the_placement_partition_by_partition() {
        for shard_count in 1..=5 {
            for partitions in [0, 1, 2, 7, 64, 1001] {
                for topic in ["t", "orders", "a.b-c"] {
                    for shard in 0..shard_count {
                        let walked = (0..partitions)
                            .filter(|&p| partition_owner(topic, p, shard_count) == shard)
                            .count();
                        assert_eq!(
                            owned_count(topic, partitions, shard, shard_count),
                            walked,
                            "{topic} {partitions} partitions, shard {shard} of {shard_count}"
                        );
                    }
                }
            }
        }
    }
}
