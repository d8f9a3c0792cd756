//! Response encoding: a typed response body into a whole frame (size prefix, response header,
//! body), and error responses built from a decoded request the way Kafka builds them.

use bytes::{BufMut, Bytes, BytesMut};
use kafka_protocol::messages::create_topics_response::CreatableTopicResult;
use kafka_protocol::messages::delete_groups_response::DeletableGroupResult;
use kafka_protocol::messages::delete_records_response::{
    DeleteRecordsPartitionResult, DeleteRecordsResponse, DeleteRecordsTopicResult,
};
use kafka_protocol::messages::delete_topics_response::DeletableTopicResult;
use kafka_protocol::messages::describe_configs_response::DescribeConfigsResult;
use kafka_protocol::messages::describe_groups_response::DescribedGroup;
use kafka_protocol::messages::fetch_response::{FetchableTopicResponse, PartitionData};
use kafka_protocol::messages::find_coordinator_response::Coordinator;
use kafka_protocol::messages::leave_group_response::MemberResponse;
use kafka_protocol::messages::list_offsets_response::{
    ListOffsetsPartitionResponse, ListOffsetsTopicResponse,
};
use kafka_protocol::messages::metadata_response::MetadataResponseTopic;
use kafka_protocol::messages::offset_commit_response::{
    OffsetCommitResponsePartition, OffsetCommitResponseTopic,
};
use kafka_protocol::messages::offset_fetch_response::{
    OffsetFetchResponseGroup, OffsetFetchResponsePartition, OffsetFetchResponsePartitions,
    OffsetFetchResponseTopic, OffsetFetchResponseTopics,
};
use kafka_protocol::messages::produce_response::{PartitionProduceResponse, TopicProduceResponse};
use kafka_protocol::messages::{
    ApiKey, CreateTopicsResponse, DeleteGroupsResponse, DeleteTopicsResponse,
    DescribeConfigsResponse, DescribeGroupsResponse, FetchResponse, FindCoordinatorResponse,
    HeartbeatResponse, InitProducerIdResponse, JoinGroupResponse, LeaveGroupResponse,
    ListGroupsResponse, ListOffsetsResponse, MetadataResponse, OffsetCommitResponse,
    OffsetDeleteResponse, OffsetFetchResponse, ProduceResponse, RequestKind, ResponseKind,
    SyncGroupResponse,
};
use kafka_protocol::messages::{BrokerId, ProducerId};
use kafka_protocol::protocol::StrBytes;
use thiserror::Error;

use super::request::Request;
use super::versions::{UNSUPPORTED_VERSION, api_versions_fallback_response, api_versions_response};

/// Why a response could not be encoded. Every variant is a bug in the caller (a body that
/// does not fit the version it is sent at), not something a client can cause; the broker
/// logs it and closes the connection, since the client would otherwise wait forever.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum EncodeError {
    /// The body's type is not the response type of `api_key`.
    #[error("a {body:?} response body cannot answer a {api_key:?} request")]
    ApiKeyMismatch {
        /// The API being answered.
        api_key: ApiKey,
        /// The API the body belongs to.
        body: ApiKey,
    },
    /// The version is outside what this response type can be encoded at.
    #[error("{api_key:?} v{version} cannot be encoded")]
    UnsupportedVersion {
        /// The API.
        api_key: ApiKey,
        /// The version asked for.
        version: i16,
    },
    /// kafka-protocol refused the body: a field set that the version cannot carry, or a
    /// string or array too long for its length prefix.
    #[error("{api_key:?} v{version} body: {reason}")]
    Body {
        /// The API.
        api_key: ApiKey,
        /// The version.
        version: i16,
        /// The crate's message.
        reason: String,
    },
    /// A field the hand-rolled Fetch writer cannot carry at this version (the crate's own
    /// rule: a non-default field with no place in the version is refused, not dropped).
    #[error("Fetch v{version} cannot carry {field}")]
    FieldNotInVersion {
        /// The field.
        field: &'static str,
        /// The version.
        version: i16,
    },
    /// A string, array or byte field longer than its length prefix can express.
    #[error("{field} of {len} is too long for its length prefix")]
    TooLong {
        /// The field.
        field: &'static str,
        /// Its length.
        len: usize,
    },
    /// The whole frame is larger than the i32 size prefix allows.
    #[error("a response of {size_bytes} bytes does not fit the i32 size prefix")]
    FrameTooLarge {
        /// The size after the prefix.
        size_bytes: usize,
    },
}

/// Encodes a whole response frame: the 4-byte size, the response header (v0: correlation id;
/// v1: correlation id and an empty tagged-field section; ApiVersions always v0, so that a
/// client that does not yet know our versions can read it), then `body` at `version`.
pub fn encode_response(
    correlation_id: i32,
    api_key: ApiKey,
    version: i16,
    body: &ResponseKind,
) -> Result<Bytes, EncodeError> {
    let body_api_key = response_api_key(body);
    if body_api_key != Some(api_key) {
        // `response_api_key` knows every variant of kafka-protocol 0.18; `None` would mean a
        // newer crate added one, which is a mismatch we cannot rule out either.
        return Err(EncodeError::ApiKeyMismatch {
            api_key,
            body: body_api_key.unwrap_or(api_key),
        });
    }
    let valid = api_key.valid_versions();
    if !(valid.min..=valid.max).contains(&version) {
        return Err(EncodeError::UnsupportedVersion { api_key, version });
    }
    let header_version = api_key.response_header_version(version);
    // Most responses are small; the buffer grows for the rest.
    let mut buf = BytesMut::with_capacity(256);
    buf.put_i32(0); // The size, patched below once known.
    buf.put_i32(correlation_id);
    if header_version >= 1 {
        buf.put_u8(0); // No tagged fields in the response header.
    }
    body.encode(&mut buf, version)
        .map_err(|error| EncodeError::Body {
            api_key,
            version,
            reason: format!("{error:#}"),
        })?;
    let size_bytes = buf.len() - 4;
    let size = i32::try_from(size_bytes).map_err(|_| EncodeError::FrameTooLarge { size_bytes })?;
    buf[..4].copy_from_slice(&size.to_be_bytes());
    Ok(buf.freeze())
}

/// The KIP-511 answer to an ApiVersions request of a version we do not support: a v0 body
/// with error 35 and ApiVersions' own range, behind a v0 response header.
pub fn unsupported_api_versions_frame(correlation_id: i32) -> Bytes {
    let body = ResponseKind::ApiVersions(api_versions_fallback_response());
    // A v0 ApiVersions body with one entry always encodes; a failure is a bug in this file.
    encode_response(correlation_id, ApiKey::ApiVersions, 0, &body)
        .expect("the ApiVersions v0 fallback always encodes")
}

/// The response Kafka sends when a whole request fails with `error_code` (its
/// `getErrorResponse`): the API's own response type, echoing every topic and partition of the
/// request with `error_code` and "unknown" offsets (-1). Returns `None` for an API with no such
/// builder here; the broker then closes the connection, as Kafka does for a request it
/// cannot answer.
///
/// Per API, following Kafka:
/// - Produce: every partition gets the error, base_offset -1;
/// - Fetch: the top-level error (v7+); before v13 also every partition with high watermark,
///   last stable offset and log start offset -1 and empty records; from v13 no partitions;
/// - Metadata: every requested topic with the error and no partitions (none for "all topics");
/// - ListOffsets: every partition with the error, timestamp and offset -1;
/// - CreateTopics, DeleteTopics, DescribeConfigs: every topic or resource with the error;
/// - DeleteRecords: every partition with the error and low watermark -1;
/// - ApiVersions: the error and no API list, except for UNSUPPORTED_VERSION (35), which
///   gets ApiVersions' own range (KIP-511);
/// - FindCoordinator: v0-3 the top-level error with node -1, host "" and port -1; v4+ one
///   coordinator per requested key with the error (v4 moved the answer into that array);
/// - JoinGroup: the error, generation -1, no leader and no members, the member id echoed;
///   the protocol name is "" before v7 (not nullable there) and null from v7;
/// - SyncGroup, Heartbeat, ListGroups, OffsetDelete: the top-level error only;
/// - LeaveGroup: the top-level error; v3+ (batched leaves, KIP-345) also every member with it;
/// - OffsetCommit: every partition with the error;
/// - OffsetFetch: v1 every partition with the error and offset -1 (v1 has no top-level code);
///   v2-7 the top-level error plus those partitions; v8+ every group with the error (v8
///   batched groups and moved the code into each), its partitions likewise;
/// - DescribeGroups, DeleteGroups: every group with the error (DescribeGroups with an empty
///   state, protocol and member list, as Kafka's `groupError`).
pub fn error_response(request: &Request, error_code: i16) -> Option<ResponseKind> {
    let version = request.header.api_version;
    let response = match &request.body {
        RequestKind::Produce(produce) => ResponseKind::Produce(
            ProduceResponse::default().with_responses(
                produce
                    .topic_data
                    .iter()
                    .map(|topic| {
                        TopicProduceResponse::default()
                            .with_name(topic.name.clone())
                            .with_topic_id(topic.topic_id)
                            .with_partition_responses(
                                topic
                                    .partition_data
                                    .iter()
                                    .map(|partition| {
                                        PartitionProduceResponse::default()
                                            .with_index(partition.index)
                                            .with_error_code(error_code)
                                            .with_base_offset(-1)
                                    })
                                    .collect(),
                            )
                    })
                    .collect(),
            ),
        ),
        RequestKind::Fetch(fetch) => {
            let responses = if version < 13 {
                fetch
                    .topics
                    .iter()
                    .map(|topic| {
                        FetchableTopicResponse::default()
                            .with_topic(topic.topic.clone())
                            .with_topic_id(topic.topic_id)
                            .with_partitions(
                                topic
                                    .partitions
                                    .iter()
                                    .map(|partition| {
                                        PartitionData::default()
                                            .with_partition_index(partition.partition)
                                            .with_error_code(error_code)
                                            .with_high_watermark(-1)
                                            .with_last_stable_offset(-1)
                                            .with_log_start_offset(-1)
                                            .with_records(Some(Bytes::new()))
                                    })
                                    .collect(),
                            )
                    })
                    .collect()
            } else {
                Vec::new()
            };
            ResponseKind::Fetch(
                FetchResponse::default()
                    .with_error_code(error_code)
                    .with_session_id(if version >= 7 { fetch.session_id } else { 0 })
                    .with_responses(responses),
            )
        }
        RequestKind::Metadata(metadata) => ResponseKind::Metadata(
            MetadataResponse::default().with_topics(
                metadata
                    .topics
                    .iter()
                    .flatten()
                    .map(|topic| {
                        // The response's name is not nullable before v12: Kafka sends "".
                        MetadataResponseTopic::default()
                            .with_name(Some(topic.name.clone().unwrap_or_default()))
                            .with_topic_id(topic.topic_id)
                            .with_error_code(error_code)
                    })
                    .collect(),
            ),
        ),
        RequestKind::ListOffsets(list) => ResponseKind::ListOffsets(
            ListOffsetsResponse::default().with_topics(
                list.topics
                    .iter()
                    .map(|topic| {
                        ListOffsetsTopicResponse::default()
                            .with_name(topic.name.clone())
                            .with_partitions(
                                topic
                                    .partitions
                                    .iter()
                                    .map(|partition| {
                                        ListOffsetsPartitionResponse::default()
                                            .with_partition_index(partition.partition_index)
                                            .with_error_code(error_code)
                                            .with_timestamp(-1)
                                            .with_offset(-1)
                                    })
                                    .collect(),
                            )
                    })
                    .collect(),
            ),
        ),
        RequestKind::DeleteRecords(delete) => ResponseKind::DeleteRecords(
            DeleteRecordsResponse::default().with_topics(
                delete
                    .topics
                    .iter()
                    .map(|topic| {
                        DeleteRecordsTopicResult::default()
                            .with_name(topic.name.clone())
                            .with_partitions(
                                topic
                                    .partitions
                                    .iter()
                                    .map(|partition| {
                                        DeleteRecordsPartitionResult::default()
                                            .with_partition_index(partition.partition_index)
                                            .with_error_code(error_code)
                                            .with_low_watermark(-1)
                                    })
                                    .collect(),
                            )
                    })
                    .collect(),
            ),
        ),
        RequestKind::CreateTopics(create) => ResponseKind::CreateTopics(
            CreateTopicsResponse::default().with_topics(
                create
                    .topics
                    .iter()
                    .map(|topic| {
                        CreatableTopicResult::default()
                            .with_name(topic.name.clone())
                            .with_error_code(error_code)
                            .with_error_message(None)
                    })
                    .collect(),
            ),
        ),
        RequestKind::DeleteTopics(delete) => {
            // v6 names topics in `topics` (by name or id); earlier versions in `topic_names`.
            let results = if version >= 6 {
                delete
                    .topics
                    .iter()
                    .map(|topic| {
                        DeletableTopicResult::default()
                            .with_name(topic.name.clone())
                            .with_topic_id(topic.topic_id)
                            .with_error_code(error_code)
                    })
                    .collect()
            } else {
                delete
                    .topic_names
                    .iter()
                    .map(|name| {
                        DeletableTopicResult::default()
                            .with_name(Some(name.clone()))
                            .with_error_code(error_code)
                    })
                    .collect()
            };
            ResponseKind::DeleteTopics(DeleteTopicsResponse::default().with_responses(results))
        }
        RequestKind::DescribeConfigs(describe) => ResponseKind::DescribeConfigs(
            DescribeConfigsResponse::default().with_results(
                describe
                    .resources
                    .iter()
                    .map(|resource| {
                        DescribeConfigsResult::default()
                            .with_error_code(error_code)
                            .with_error_message(None)
                            .with_resource_type(resource.resource_type)
                            .with_resource_name(resource.resource_name.clone())
                    })
                    .collect(),
            ),
        ),
        RequestKind::ApiVersions(_) if error_code == UNSUPPORTED_VERSION => {
            ResponseKind::ApiVersions(api_versions_fallback_response())
        }
        RequestKind::ApiVersions(_) => ResponseKind::ApiVersions(
            api_versions_response(version, 0)
                .with_error_code(error_code)
                .with_api_keys(Vec::new()),
        ),
        RequestKind::FindCoordinator(find) => ResponseKind::FindCoordinator(if version >= 4 {
            FindCoordinatorResponse::default().with_coordinators(
                find.coordinator_keys
                    .iter()
                    .map(|key| {
                        Coordinator::default()
                            .with_key(key.clone())
                            .with_node_id(BrokerId(-1))
                            .with_host(StrBytes::default())
                            .with_port(-1)
                            .with_error_code(error_code)
                            .with_error_message(None)
                    })
                    .collect(),
            )
        } else {
            FindCoordinatorResponse::default()
                .with_error_code(error_code)
                .with_error_message(None)
                .with_node_id(BrokerId(-1))
                .with_host(StrBytes::default())
                .with_port(-1)
        }),
        RequestKind::JoinGroup(join) => ResponseKind::JoinGroup(
            JoinGroupResponse::default()
                .with_error_code(error_code)
                .with_generation_id(-1)
                // Before v7 the name is a plain string, which a Java client cannot read as null.
                .with_protocol_name(if version >= 7 {
                    None
                } else {
                    Some(StrBytes::default())
                })
                .with_leader(StrBytes::default())
                .with_member_id(join.member_id.clone()),
        ),
        RequestKind::SyncGroup(_) => ResponseKind::SyncGroup(
            SyncGroupResponse::default()
                .with_error_code(error_code)
                .with_assignment(Bytes::new()),
        ),
        RequestKind::Heartbeat(_) => {
            ResponseKind::Heartbeat(HeartbeatResponse::default().with_error_code(error_code))
        }
        RequestKind::LeaveGroup(leave) => {
            // Before v3 a request names one member (`member_id`) and the response has no
            // member list; `leave.members` is empty there, so this echoes nothing.
            ResponseKind::LeaveGroup(
                LeaveGroupResponse::default()
                    .with_error_code(error_code)
                    .with_members(
                        leave
                            .members
                            .iter()
                            .map(|member| {
                                MemberResponse::default()
                                    .with_member_id(member.member_id.clone())
                                    .with_group_instance_id(member.group_instance_id.clone())
                                    .with_error_code(error_code)
                            })
                            .collect(),
                    ),
            )
        }
        RequestKind::OffsetCommit(commit) => ResponseKind::OffsetCommit(
            OffsetCommitResponse::default().with_topics(
                commit
                    .topics
                    .iter()
                    .map(|topic| {
                        OffsetCommitResponseTopic::default()
                            .with_name(topic.name.clone())
                            .with_partitions(
                                topic
                                    .partitions
                                    .iter()
                                    .map(|partition| {
                                        OffsetCommitResponsePartition::default()
                                            .with_partition_index(partition.partition_index)
                                            .with_error_code(error_code)
                                    })
                                    .collect(),
                            )
                    })
                    .collect(),
            ),
        ),
        RequestKind::OffsetFetch(fetch) => ResponseKind::OffsetFetch(if version >= 8 {
            OffsetFetchResponse::default().with_groups(
                fetch
                    .groups
                    .iter()
                    .map(|group| {
                        // A group asking for all its topics (null) gets none back.
                        let topics = group
                            .topics
                            .iter()
                            .flatten()
                            .map(|topic| {
                                OffsetFetchResponseTopics::default()
                                    .with_name(topic.name.clone())
                                    .with_partitions(
                                        topic
                                            .partition_indexes
                                            .iter()
                                            .map(|&index| {
                                                OffsetFetchResponsePartitions::default()
                                                    .with_partition_index(index)
                                                    .with_committed_offset(-1)
                                                    .with_committed_leader_epoch(-1)
                                                    .with_error_code(error_code)
                                            })
                                            .collect(),
                                    )
                            })
                            .collect();
                        OffsetFetchResponseGroup::default()
                            .with_group_id(group.group_id.clone())
                            .with_error_code(error_code)
                            .with_topics(topics)
                    })
                    .collect(),
            )
        } else {
            let topics = fetch
                .topics
                .iter()
                .flatten()
                .map(|topic| {
                    OffsetFetchResponseTopic::default()
                        .with_name(topic.name.clone())
                        .with_partitions(
                            topic
                                .partition_indexes
                                .iter()
                                .map(|&index| {
                                    OffsetFetchResponsePartition::default()
                                        .with_partition_index(index)
                                        .with_committed_offset(-1)
                                        .with_committed_leader_epoch(-1)
                                        .with_error_code(error_code)
                                })
                                .collect(),
                        )
                })
                .collect();
            // v1 has no top-level code: the partitions carry it alone.
            OffsetFetchResponse::default()
                .with_error_code(if version >= 2 { error_code } else { 0 })
                .with_topics(topics)
        }),
        RequestKind::DescribeGroups(describe) => ResponseKind::DescribeGroups(
            DescribeGroupsResponse::default().with_groups(
                describe
                    .groups
                    .iter()
                    .map(|group_id| {
                        DescribedGroup::default()
                            .with_group_id(group_id.clone())
                            .with_error_code(error_code)
                    })
                    .collect(),
            ),
        ),
        RequestKind::ListGroups(_) => {
            ResponseKind::ListGroups(ListGroupsResponse::default().with_error_code(error_code))
        }
        RequestKind::DeleteGroups(delete) => ResponseKind::DeleteGroups(
            DeleteGroupsResponse::default().with_results(
                delete
                    .groups_names
                    .iter()
                    .map(|group_id| {
                        DeletableGroupResult::default()
                            .with_group_id(group_id.clone())
                            .with_error_code(error_code)
                    })
                    .collect(),
            ),
        ),
        RequestKind::OffsetDelete(_) => {
            ResponseKind::OffsetDelete(OffsetDeleteResponse::default().with_error_code(error_code))
        }
        // No producer id was issued: Kafka answers -1 / -1 with the error.
        RequestKind::InitProducerId(_) => ResponseKind::InitProducerId(
            InitProducerIdResponse::default()
                .with_error_code(error_code)
                .with_producer_id(ProducerId(-1))
                .with_producer_epoch(-1),
        ),
        _ => return None,
    };
    Some(response)
}

/// The API a response body answers. kafka-protocol's enums are `#[non_exhaustive]`, so a
/// variant added by a newer crate maps to `None`.
pub fn response_api_key(body: &ResponseKind) -> Option<ApiKey> {
    macro_rules! map_variants {
        ($($variant:ident),* $(,)?) => {
            match body {
                $(ResponseKind::$variant(_) => Some(ApiKey::$variant),)*
                _ => None,
            }
        };
    }
    map_variants!(
        Produce,
        Fetch,
        ListOffsets,
        Metadata,
        OffsetCommit,
        OffsetFetch,
        FindCoordinator,
        JoinGroup,
        Heartbeat,
        LeaveGroup,
        SyncGroup,
        DescribeGroups,
        ListGroups,
        SaslHandshake,
        ApiVersions,
        CreateTopics,
        DeleteTopics,
        DeleteRecords,
        InitProducerId,
        OffsetForLeaderEpoch,
        AddPartitionsToTxn,
        AddOffsetsToTxn,
        EndTxn,
        WriteTxnMarkers,
        TxnOffsetCommit,
        DescribeAcls,
        CreateAcls,
        DeleteAcls,
        DescribeConfigs,
        AlterConfigs,
        AlterReplicaLogDirs,
        DescribeLogDirs,
        SaslAuthenticate,
        CreatePartitions,
        CreateDelegationToken,
        RenewDelegationToken,
        ExpireDelegationToken,
        DescribeDelegationToken,
        DeleteGroups,
        ElectLeaders,
        IncrementalAlterConfigs,
        AlterPartitionReassignments,
        ListPartitionReassignments,
        OffsetDelete,
        DescribeClientQuotas,
        AlterClientQuotas,
        DescribeUserScramCredentials,
        AlterUserScramCredentials,
        Vote,
        BeginQuorumEpoch,
        EndQuorumEpoch,
        DescribeQuorum,
        AlterPartition,
        UpdateFeatures,
        Envelope,
        FetchSnapshot,
        DescribeCluster,
        DescribeProducers,
        BrokerRegistration,
        BrokerHeartbeat,
        UnregisterBroker,
        DescribeTransactions,
        ListTransactions,
        AllocateProducerIds,
        ConsumerGroupHeartbeat,
        ConsumerGroupDescribe,
        ControllerRegistration,
        GetTelemetrySubscriptions,
        PushTelemetry,
        AssignReplicasToDirs,
        ListConfigResources,
        DescribeTopicPartitions,
        ShareGroupHeartbeat,
        ShareGroupDescribe,
        ShareFetch,
        ShareAcknowledge,
        AddRaftVoter,
        RemoveRaftVoter,
        UpdateRaftVoter,
        InitializeShareGroupState,
        ReadShareGroupState,
        WriteShareGroupState,
        DeleteShareGroupState,
        ReadShareGroupStateSummary,
        DescribeShareGroupOffsets,
        AlterShareGroupOffsets,
        DeleteShareGroupOffsets,
    )
}
