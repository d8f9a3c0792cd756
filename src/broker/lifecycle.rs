//! broker::lifecycle: a shard's partitions in bulk: opening a topic's owned partitions (at startup
//! and at creation) and closing them all at shutdown, each with bounded concurrency, so thousands of
//! partitions cost the time of their IO overlapped rather than one after another.

use std::rc::Rc;

use futures_util::stream::{self, StreamExt};
use tracing::error;

use crate::storage::{PartitionLog, descriptors};

use super::ShardBroker;
use super::topics::TopicInfo;

/// How many partitions a shard opens or closes at once. Each one in progress holds a few
/// descriptors (its segment, a temporary file) beside the descriptor cache, so it is a fraction of
/// the cache; 64 already keeps the disk's queue full (the fsyncs of concurrent closes share
/// journal commits).
pub(super) fn partition_io_concurrency() -> usize {
    (descriptors::capacity() / 4).clamp(1, 64)
}

impl ShardBroker {
    /// Opens (creating if needed) the logs of `topic`'s partitions that this shard owns and that are
    /// not open yet, concurrently. Every partition that opened is installed even if another failed
    /// (the caller decides whether to roll back); the first failure is returned.
    pub(super) async fn open_owned_partitions(&self, topic: &TopicInfo) -> anyhow::Result<()> {
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
                        let log = PartitionLog::open(&dir, log_config)
                            .await
                            .map_err(|e| anyhow::anyhow!("opening {}: {e}", dir.display()))?;
                        // Written once: rewriting an unchanged file at every start cost two fsyncs
                        // per partition.
                        let recorded = crate::storage::read_partition_metadata(&dir)
                            .await
                            .ok()
                            .flatten();
                        if recorded != Some(topic.id) {
                            crate::storage::write_partition_metadata(&dir, topic.id)
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

    /// Closes every log of this shard (flush, indexes, checkpoint, clean marker), concurrently.
    /// Returns the partitions that could not be marked clean, each with its reason.
    pub(super) async fn close_all_partitions(&self) -> Vec<String> {
        let logs = self.owned_logs();
        let mut closing = stream::iter(logs)
            .map(|((topic, partition), log)| async move {
                let result = log.close_deferring_marker_sync().await;
                (topic, partition, result)
            })
            .buffer_unordered(partition_io_concurrency());
        let mut unclean = Vec::new();
        // Bounded by the number of logs.
        while let Some((topic, partition, result)) = closing.next().await {
            if let Err(e) = result {
                error!(%topic, partition, error = %e, "closing log failed; it will be recovered at the next start");
                unclean.push(format!("{topic}-{partition}: {e}"));
            }
        }
        // One syncfs makes every marker written above durable.
        if let Err(e) = crate::storage::sync_filesystem(&self.log_dir) {
            error!(error = %e, "syncing the log dir at shutdown failed; partitions will be recovered at the next start");
            unclean.push(format!("every partition of this shard: {e}"));
        }
        unclean
    }
}
