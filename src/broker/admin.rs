//! Topic administration: CreateTopics, DeleteTopics and DescribeConfigs (topics and the broker).

use kafka_protocol::messages::TopicName;
use kafka_protocol::messages::create_topics_request::CreateTopicsRequest;
use kafka_protocol::messages::create_topics_response::{
    CreatableTopicResult, CreateTopicsResponse,
};
use kafka_protocol::messages::delete_topics_request::DeleteTopicsRequest;
use kafka_protocol::messages::delete_topics_response::{
    DeletableTopicResult, DeleteTopicsResponse,
};
use kafka_protocol::messages::describe_configs_request::DescribeConfigsRequest;
use kafka_protocol::messages::describe_configs_response::{
    DescribeConfigsResourceResult, DescribeConfigsResponse, DescribeConfigsResult,
};
use kafka_protocol::protocol::StrBytes;
use uuid::Uuid;

use super::errors::code;
use super::topics::{TOPIC_CONFIG_KEYS, TopicConfig, TopicInfo, validate_topic_name};
use super::{ShardBroker, TopicError};

/// DescribeConfigs resource types and config sources, as Kafka numbers them.
const RESOURCE_TOPIC: i8 = 2;
const RESOURCE_BROKER: i8 = 4;
const SOURCE_DYNAMIC_TOPIC: i8 = 1;
const SOURCE_STATIC_BROKER: i8 = 4;
const SOURCE_DEFAULT: i8 = 5;

/// Kafka caps a topic's partition count far above anything sensible for one node; refusing absurd
/// counts up front keeps one request from creating a million directories.
const MAX_PARTITIONS_PER_TOPIC: i32 = 10_000;

impl ShardBroker {
    pub(super) async fn create_topics(
        &self,
        request: CreateTopicsRequest,
        _version: i16,
    ) -> CreateTopicsResponse {
        let mut results = Vec::with_capacity(request.topics.len());
        for creatable in request.topics {
            let name = creatable.name.0.to_string();
            let outcome = self
                .create_one_topic(
                    &name,
                    creatable.num_partitions,
                    creatable.replication_factor,
                    &creatable.configs,
                    !creatable.assignments.is_empty(),
                    request.validate_only,
                )
                .await;
            let mut result = CreatableTopicResult::default().with_name(creatable.name);
            match outcome {
                Ok(topic) => {
                    result.topic_id = topic.id;
                    result.num_partitions = topic.partitions;
                    result.replication_factor = 1;
                }
                Err(error) => {
                    result.error_code = error.code;
                    result.error_message = Some(StrBytes::from_string(error.message));
                    result.num_partitions = -1;
                    result.replication_factor = -1;
                }
            }
            results.push(result);
        }
        CreateTopicsResponse::default().with_topics(results)
    }

    async fn create_one_topic(
        &self,
        name: &str,
        num_partitions: i32,
        replication_factor: i16,
        configs: &[kafka_protocol::messages::create_topics_request::CreatableTopicConfig],
        has_assignments: bool,
        validate_only: bool,
    ) -> Result<TopicInfo, TopicError> {
        validate_topic_name(name).map_err(|m| TopicError::new(code::INVALID_TOPIC_EXCEPTION, m))?;
        if has_assignments {
            return Err(TopicError::new(
                code::INVALID_REQUEST,
                "manual replica assignment is not supported on a single node",
            ));
        }
        let partitions = if num_partitions == -1 {
            self.config.num_partitions
        } else {
            num_partitions
        };
        if !(1..=MAX_PARTITIONS_PER_TOPIC).contains(&partitions) {
            return Err(TopicError::new(
                code::INVALID_PARTITIONS,
                format!(
                    "Number of partitions {partitions} must be between 1 and {MAX_PARTITIONS_PER_TOPIC}."
                ),
            ));
        }
        if replication_factor != -1 && replication_factor != 1 {
            return Err(TopicError::new(
                code::INVALID_REPLICATION_FACTOR,
                format!(
                    "Replication factor {replication_factor} is larger than the 1 available broker."
                ),
            ));
        }
        let mut config = TopicConfig::default();
        for entry in configs {
            let value = entry.value.as_deref().unwrap_or("");
            config
                .set(&entry.name, value)
                .map_err(|e| TopicError::new(code::INVALID_CONFIG, e.to_string()))?;
        }
        let topic = TopicInfo {
            name: name.to_string(),
            id: Uuid::new_v4(),
            partitions,
            config,
        };
        self.create_topic(topic, validate_only).await
    }

    pub(super) async fn delete_topics(
        &self,
        request: DeleteTopicsRequest,
        version: i16,
    ) -> DeleteTopicsResponse {
        // v6+ names topics in `topics` (by name or id); earlier versions in `topic_names`.
        let targets: Vec<(Option<TopicName>, Uuid)> = if version >= 6 {
            request
                .topics
                .into_iter()
                .map(|t| (t.name, t.topic_id))
                .collect()
        } else {
            request
                .topic_names
                .into_iter()
                .map(|n| (Some(n), Uuid::nil()))
                .collect()
        };
        let mut results = Vec::with_capacity(targets.len());
        for (name, topic_id) in targets {
            let resolved = match &name {
                Some(name) => Some(name.0.to_string()),
                None => self.topics().by_id(topic_id).map(|t| t.name.clone()),
            };
            let outcome = if !self.config.delete_topic_enable {
                Err(TopicError::new(
                    code::TOPIC_DELETION_DISABLED,
                    "Topic deletion is disabled.",
                ))
            } else {
                match resolved.clone() {
                    Some(resolved) => self.delete_topic(resolved).await,
                    None => Err(TopicError::new(
                        code::UNKNOWN_TOPIC_ID,
                        format!("Topic id {topic_id} does not exist."),
                    )),
                }
            };
            let mut result = DeletableTopicResult::default()
                .with_name(name.or_else(|| resolved.map(|n| TopicName(StrBytes::from_string(n)))))
                .with_topic_id(topic_id);
            match outcome {
                Ok(topic) => result.topic_id = topic.id,
                Err(error) => {
                    result.error_code = error.code;
                    result.error_message = Some(StrBytes::from_string(error.message));
                }
            }
            results.push(result);
        }
        DeleteTopicsResponse::default().with_responses(results)
    }

    pub(super) fn describe_configs(
        &self,
        request: DescribeConfigsRequest,
        _version: i16,
    ) -> DescribeConfigsResponse {
        let results = request
            .resources
            .into_iter()
            .map(|resource| {
                let wanted = |key: &str| {
                    resource
                        .configuration_keys
                        .as_ref()
                        .is_none_or(|keys| keys.iter().any(|k| k.as_str() == key))
                };
                let mut result = DescribeConfigsResult::default()
                    .with_resource_type(resource.resource_type)
                    .with_resource_name(resource.resource_name.clone());
                match resource.resource_type {
                    RESOURCE_TOPIC => match self.topics().get(resource.resource_name.as_str()) {
                        Some(topic) => {
                            result.configs = self
                                .topic_config_entries(topic)
                                .into_iter()
                                .filter(|(key, _, _)| wanted(key))
                                .map(|(key, value, source)| config_entry(key, value, source, false))
                                .collect();
                        }
                        None => {
                            result.error_code = code::UNKNOWN_TOPIC_OR_PARTITION;
                            result.error_message = Some(StrBytes::from_string(format!(
                                "Topic '{}' does not exist.",
                                resource.resource_name.as_str()
                            )));
                        }
                    },
                    RESOURCE_BROKER => {
                        let name = resource.resource_name.as_str();
                        if !name.is_empty()
                            && name.parse::<usize>().is_ok_and(|id| id < self.shard_count)
                        {
                            result.configs = broker_config_entries(&self.config)
                                .into_iter()
                                .filter(|(key, _)| wanted(key))
                                .map(|(key, value)| {
                                    config_entry(key, value, SOURCE_STATIC_BROKER, true)
                                })
                                .collect();
                        } else if name.is_empty() {
                            // The cluster-wide default resource: nothing is set dynamically here.
                        } else {
                            result.error_code = code::INVALID_REQUEST;
                            result.error_message = Some(StrBytes::from_string(format!(
                                "Broker {name:?} does not exist."
                            )));
                        }
                    }
                    other => {
                        result.error_code = code::INVALID_REQUEST;
                        result.error_message = Some(StrBytes::from_string(format!(
                            "Resource type {other} is not supported."
                        )));
                    }
                }
                result
            })
            .collect();
        DescribeConfigsResponse::default().with_results(results)
    }

    /// A topic's effective settings with where each comes from: its own override or the broker.
    fn topic_config_entries(&self, topic: &TopicInfo) -> Vec<(String, String, i8)> {
        let effective = topic.config.log_config(&self.config);
        let overridden: Vec<&str> = topic.config.entries().iter().map(|(k, _)| *k).collect();
        let source = |key: &str| {
            if overridden.contains(&key) {
                SOURCE_DYNAMIC_TOPIC
            } else {
                SOURCE_DEFAULT
            }
        };
        let or_minus_one = |v: Option<u64>| v.map_or("-1".to_string(), |v| v.to_string());
        TOPIC_CONFIG_KEYS
            .iter()
            .map(|key| {
                let value = match *key {
                    "cleanup.policy" => crate::storage::cleaner::cleanup_policy_text(
                        effective.compaction.compact,
                        effective.compaction.delete,
                    )
                    .to_string(),
                    "min.cleanable.dirty.ratio" => {
                        effective.compaction.min_cleanable_dirty_ratio.to_string()
                    }
                    "min.compaction.lag.ms" => {
                        effective.compaction.min_compaction_lag_ms.to_string()
                    }
                    "max.compaction.lag.ms" => effective
                        .compaction
                        .max_compaction_lag_ms
                        .unwrap_or(i64::MAX as u64)
                        .to_string(),
                    "delete.retention.ms" => effective.compaction.delete_retention_ms.to_string(),
                    "retention.ms" => or_minus_one(effective.retention_ms),
                    "retention.bytes" => or_minus_one(effective.retention_bytes),
                    "segment.bytes" => effective.segment_bytes.to_string(),
                    "segment.ms" => effective.segment_ms.to_string(),
                    "max.message.bytes" => effective.max_message_bytes.to_string(),
                    "flush.messages" => effective
                        .flush_interval_messages
                        .unwrap_or(i64::MAX as u64)
                        .to_string(),
                    "flush.ms" => effective
                        .flush_interval_ms
                        .unwrap_or(i64::MAX as u64)
                        .to_string(),
                    _ => String::new(),
                };
                (key.to_string(), value, source(key))
            })
            .collect()
    }
}

fn config_entry(
    key: impl Into<String>,
    value: String,
    source: i8,
    read_only: bool,
) -> DescribeConfigsResourceResult {
    DescribeConfigsResourceResult::default()
        .with_name(StrBytes::from_string(key.into()))
        .with_value(Some(StrBytes::from_string(value)))
        .with_read_only(read_only)
        .with_config_source(source)
}

/// The broker settings DescribeConfigs reports, under Kafka's key names.
fn broker_config_entries(config: &crate::config::Config) -> Vec<(&'static str, String)> {
    let or_minus_one = |v: Option<u64>| v.map_or("-1".to_string(), |v| v.to_string());
    let or_max = |v: Option<u64>| v.unwrap_or(i64::MAX as u64).to_string();
    vec![
        ("broker.id", config.broker_id.to_string()),
        ("log.dirs", config.log_dir.display().to_string()),
        ("num.partitions", config.num_partitions.to_string()),
        (
            "default.replication.factor",
            config.default_replication_factor.to_string(),
        ),
        ("log.retention.ms", or_minus_one(config.log_retention_ms)),
        (
            "log.retention.bytes",
            or_minus_one(config.log_retention_bytes),
        ),
        ("log.segment.bytes", config.log_segment_bytes.to_string()),
        ("log.roll.ms", config.log_roll_ms.to_string()),
        (
            "log.retention.check.interval.ms",
            config.log_retention_check_interval_ms.to_string(),
        ),
        (
            "log.flush.interval.messages",
            or_max(config.log_flush_interval_messages),
        ),
        (
            "log.flush.interval.ms",
            or_max(config.log_flush_interval_ms),
        ),
        (
            "log.index.interval.bytes",
            config.log_index_interval_bytes.to_string(),
        ),
        (
            "log.index.size.max.bytes",
            config.log_index_size_max_bytes.to_string(),
        ),
        (
            "delete.topic.enable",
            config.delete_topic_enable.to_string(),
        ),
        (
            "auto.create.topics.enable",
            config.auto_create_topics_enable.to_string(),
        ),
        (
            "socket.request.max.bytes",
            config.socket_request_max_bytes.to_string(),
        ),
        ("message.max.bytes", config.message_max_bytes.to_string()),
        (
            "group.initial.rebalance.delay.ms",
            config.group_initial_rebalance_delay_ms.to_string(),
        ),
        (
            "group.min.session.timeout.ms",
            config.group_min_session_timeout_ms.to_string(),
        ),
        (
            "group.max.session.timeout.ms",
            config.group_max_session_timeout_ms.to_string(),
        ),
        (
            "offsets.retention.minutes",
            config.offsets_retention_minutes.to_string(),
        ),
    ]
}
