//! Metadata: the brokers (one per shard, each on its own port) and, per topic, which shard leads each
//! partition; plus topic auto-creation, which Metadata and Produce trigger.

use kafka_protocol::messages::metadata_request::MetadataRequest;
use kafka_protocol::messages::metadata_response::{
    MetadataResponse, MetadataResponseBroker, MetadataResponsePartition, MetadataResponseTopic,
};
use kafka_protocol::messages::{BrokerId, TopicName};
use kafka_protocol::protocol::StrBytes;
use tracing::debug;
use uuid::Uuid;

use super::errors::code;
use super::topics::{TopicConfig, TopicInfo, validate_topic_name};
use super::{ShardBroker, TopicError};

impl ShardBroker {
    pub(super) async fn metadata(
        &self,
        request: MetadataRequest,
        version: i16,
    ) -> MetadataResponse {
        // v0 has no flag and always auto-creates (as Kafka); later versions ask for it explicitly.
        let allow_auto_create = self.config.auto_create_topics_enable
            && (version < 4 || request.allow_auto_topic_creation);
        let mut topics_out = Vec::new();
        match request.topics {
            // A null list (v1+) or, in v0, an empty list means "all topics".
            None => topics_out.extend(
                self.topics()
                    .by_name
                    .values()
                    .map(|t| self.topic_metadata(t)),
            ),
            Some(requested) if requested.is_empty() && version == 0 => topics_out.extend(
                self.topics()
                    .by_name
                    .values()
                    .map(|t| self.topic_metadata(t)),
            ),
            Some(requested) => {
                for requested_topic in requested {
                    let by_name = requested_topic.name.as_ref().map(|n| n.0.to_string());
                    let topic = match &by_name {
                        Some(name) => self.topics().get(name).cloned(),
                        None => self.topics().by_id(requested_topic.topic_id).cloned(),
                    };
                    let topic = match (topic, by_name) {
                        (Some(topic), _) => Ok(topic),
                        (None, Some(name)) if allow_auto_create => {
                            match self.auto_create(&name).await {
                                Ok(()) => self
                                    .topics()
                                    .get(&name)
                                    .cloned()
                                    .ok_or(code::LEADER_NOT_AVAILABLE),
                                Err(error) => Err(error.code),
                            }
                        }
                        (None, Some(name)) => Err(if validate_topic_name(&name).is_err() {
                            code::INVALID_TOPIC_EXCEPTION
                        } else {
                            code::UNKNOWN_TOPIC_OR_PARTITION
                        }),
                        (None, None) => Err(code::UNKNOWN_TOPIC_ID),
                    };
                    topics_out.push(match topic {
                        Ok(topic) => self.topic_metadata(&topic),
                        Err(error) => MetadataResponseTopic::default()
                            .with_error_code(error)
                            .with_name(requested_topic.name)
                            .with_topic_id(requested_topic.topic_id),
                    });
                }
            }
        }
        MetadataResponse::default()
            .with_brokers(self.broker_list())
            .with_cluster_id(Some(StrBytes::from_string(self.cluster_id.clone())))
            .with_controller_id(BrokerId(0))
            .with_topics(topics_out)
    }

    /// Every shard is advertised as its own broker: node id = shard, port = base port + shard, so a
    /// client sends each partition's requests straight to the core that owns it.
    pub(super) fn broker_list(&self) -> Vec<MetadataResponseBroker> {
        (0..self.shard_count)
            .map(|shard| {
                let (host, port) = self.ctx.advertised_endpoint(shard);
                MetadataResponseBroker::default()
                    .with_node_id(BrokerId(shard as i32))
                    .with_host(StrBytes::from_string(host))
                    .with_port(i32::from(port))
            })
            .collect()
    }

    fn topic_metadata(&self, topic: &TopicInfo) -> MetadataResponseTopic {
        let partitions = (0..topic.partitions)
            .map(|partition| {
                let leader = BrokerId(self.owner_of(&topic.name, partition) as i32);
                MetadataResponsePartition::default()
                    .with_partition_index(partition)
                    .with_leader_id(leader)
                    .with_leader_epoch(0)
                    .with_replica_nodes(vec![leader])
                    .with_isr_nodes(vec![leader])
            })
            .collect();
        MetadataResponseTopic::default()
            .with_name(Some(TopicName(StrBytes::from_string(topic.name.clone()))))
            .with_topic_id(topic.id)
            .with_partitions(partitions)
    }

    /// Creates `name` with the broker's default partition count, as Kafka's auto-creation does.
    /// Losing a race with another creator of the same topic is success.
    pub(super) async fn auto_create(&self, name: &str) -> Result<(), TopicError> {
        if let Err(message) = validate_topic_name(name) {
            return Err(TopicError::new(code::INVALID_TOPIC_EXCEPTION, message));
        }
        let topic = TopicInfo {
            name: name.to_string(),
            id: Uuid::new_v4(),
            partitions: self.config.num_partitions,
            config: TopicConfig::default(),
        };
        match self.create_topic(topic, false).await {
            Ok(_) => Ok(()),
            Err(error) if error.code == code::TOPIC_ALREADY_EXISTS => Ok(()),
            Err(error) => {
                debug!(topic = name, code = error.code, message = %error.message, "auto-create failed");
                Err(error)
            }
        }
    }
}
