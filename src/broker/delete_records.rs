//! DeleteRecords (API 21): moves partitions' log start offsets forward, as Kafka's
//! `ReplicaManager.deleteRecords` does on the leader. Storage persists the new start and deletes the
//! segments wholly below it; Fetch and ListOffsets then honour it.

use kafka_protocol::messages::delete_records_request::DeleteRecordsRequest;
use kafka_protocol::messages::delete_records_response::{
    DeleteRecordsPartitionResult, DeleteRecordsResponse, DeleteRecordsTopicResult,
};

use super::ShardBroker;
use super::errors::{code, delete_records_error_code};

impl ShardBroker {
    /// Answers every partition: UNKNOWN_TOPIC_OR_PARTITION for a topic or partition that does not exist,
    /// NOT_LEADER_OR_FOLLOWER for one another shard owns (the client sends each partition to its
    /// leader), OFFSET_OUT_OF_RANGE beyond the high watermark; otherwise the new low watermark.
    /// Kafka's request timeout waits for followers; a single node has none, so it is not used.
    pub(super) async fn delete_records(
        &self,
        request: DeleteRecordsRequest,
    ) -> DeleteRecordsResponse {
        let topics = self.topics();
        let mut topics_out = Vec::with_capacity(request.topics.len());
        for topic in request.topics {
            let name = topic.name.0.to_string();
            let known = topics.get(&name).cloned();
            let mut partitions = Vec::with_capacity(topic.partitions.len());
            for partition in topic.partitions {
                let index = partition.partition_index;
                let mut out = DeleteRecordsPartitionResult::default()
                    .with_partition_index(index)
                    .with_low_watermark(-1);
                let log = match &known {
                    Some(t) if index >= 0 && index < t.partitions => {
                        self.log(&name, index).ok_or(code::NOT_LEADER_OR_FOLLOWER)
                    }
                    _ => Err(code::UNKNOWN_TOPIC_OR_PARTITION),
                };
                match log {
                    Err(error) => out.error_code = error,
                    Ok(log) => match log.delete_records_before(partition.offset).await {
                        Ok(low_watermark) => out.low_watermark = low_watermark,
                        Err(error) => out.error_code = delete_records_error_code(&error),
                    },
                }
                partitions.push(out);
            }
            topics_out.push(
                DeleteRecordsTopicResult::default()
                    .with_name(topic.name)
                    .with_partitions(partitions),
            );
        }
        DeleteRecordsResponse::default().with_topics(topics_out)
    }
}
