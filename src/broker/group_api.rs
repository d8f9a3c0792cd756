//! The consumer-group APIs on the wire: FindCoordinator, JoinGroup, SyncGroup, Heartbeat, LeaveGroup,
//! OffsetCommit, OffsetFetch, DescribeGroups, ListGroups, DeleteGroups, OffsetDelete. This file turns
//! requests into calls on the shard's `GroupCoordinator` and its answers into responses; the group
//! state machine itself lives in `groups`.

use kafka_protocol::messages::delete_groups_request::DeleteGroupsRequest;
use kafka_protocol::messages::delete_groups_response::{
    DeletableGroupResult, DeleteGroupsResponse,
};
use kafka_protocol::messages::describe_groups_request::DescribeGroupsRequest;
use kafka_protocol::messages::describe_groups_response::{
    DescribeGroupsResponse, DescribedGroup, DescribedGroupMember,
};
use kafka_protocol::messages::find_coordinator_request::FindCoordinatorRequest;
use kafka_protocol::messages::find_coordinator_response::{Coordinator, FindCoordinatorResponse};
use kafka_protocol::messages::heartbeat_request::HeartbeatRequest;
use kafka_protocol::messages::heartbeat_response::HeartbeatResponse;
use kafka_protocol::messages::join_group_request::JoinGroupRequest;
use kafka_protocol::messages::join_group_response::{JoinGroupResponse, JoinGroupResponseMember};
use kafka_protocol::messages::leave_group_request::LeaveGroupRequest;
use kafka_protocol::messages::leave_group_response::{LeaveGroupResponse, MemberResponse};
use kafka_protocol::messages::list_groups_request::ListGroupsRequest;
use kafka_protocol::messages::list_groups_response::{ListGroupsResponse, ListedGroup};
use kafka_protocol::messages::offset_commit_request::OffsetCommitRequest;
use kafka_protocol::messages::offset_commit_response::{
    OffsetCommitResponse, OffsetCommitResponsePartition, OffsetCommitResponseTopic,
};
use kafka_protocol::messages::offset_delete_request::OffsetDeleteRequest;
use kafka_protocol::messages::offset_delete_response::{
    OffsetDeleteResponse, OffsetDeleteResponsePartition, OffsetDeleteResponseTopic,
};
use kafka_protocol::messages::offset_fetch_request::OffsetFetchRequest;
use kafka_protocol::messages::offset_fetch_response::{
    OffsetFetchResponse, OffsetFetchResponseGroup, OffsetFetchResponsePartition,
    OffsetFetchResponsePartitions, OffsetFetchResponseTopic, OffsetFetchResponseTopics,
};
use kafka_protocol::messages::sync_group_request::SyncGroupRequest;
use kafka_protocol::messages::sync_group_response::SyncGroupResponse;
use kafka_protocol::messages::{BrokerId, GroupId, TopicName};
use kafka_protocol::protocol::StrBytes;

use super::ShardBroker;
use super::groups::{GroupCoordinator, JoinRequest, code};
use super::topics::fnv1a;
use crate::server::ConnectionInfo;

/// FindCoordinator key types.
const KEY_TYPE_GROUP: i8 = 0;

fn s(value: impl Into<String>) -> StrBytes {
    StrBytes::from_string(value.into())
}

/// The shard that coordinates a group: FNV-1a of the id, so every shard computes the same answer.
pub fn coordinator_shard(group_id: &str, shard_count: usize) -> usize {
    (fnv1a(group_id.as_bytes()) % shard_count.max(1) as u64) as usize
}

impl ShardBroker {
    /// The coordinator of `group_id` if it is this shard, or the error code to answer with.
    fn coordinator_for(&self, group_id: &str) -> Result<&GroupCoordinator, i16> {
        if coordinator_shard(group_id, self.shard_count) != self.shard {
            return Err(code::NOT_COORDINATOR);
        }
        if !self.groups.is_loaded() {
            return Err(code::COORDINATOR_LOAD_IN_PROGRESS);
        }
        Ok(&self.groups)
    }

    pub(super) fn find_coordinator(
        &self,
        request: FindCoordinatorRequest,
        version: i16,
    ) -> FindCoordinatorResponse {
        let locate = |key: &str, key_type: i8| -> Coordinator {
            let mut coordinator = Coordinator::default().with_key(s(key));
            if key_type != KEY_TYPE_GROUP {
                // Transactions are not implemented, so there is no transaction coordinator.
                coordinator.error_code = code::COORDINATOR_NOT_AVAILABLE;
                coordinator.error_message = Some(s("transactions are not supported"));
                coordinator.node_id = BrokerId(-1);
                coordinator.port = -1;
                return coordinator;
            }
            let shard = coordinator_shard(key, self.shard_count);
            let (host, port) = self.ctx.advertised_endpoint(shard);
            coordinator
                .with_node_id(BrokerId(shard as i32))
                .with_host(s(host))
                .with_port(i32::from(port))
        };
        if version >= 4 {
            let coordinators = request
                .coordinator_keys
                .iter()
                .map(|key| locate(key.as_str(), request.key_type))
                .collect();
            FindCoordinatorResponse::default().with_coordinators(coordinators)
        } else {
            let found = locate(request.key.as_str(), request.key_type);
            FindCoordinatorResponse::default()
                .with_error_code(found.error_code)
                .with_error_message(found.error_message)
                .with_node_id(found.node_id)
                .with_host(found.host)
                .with_port(found.port)
        }
    }

    pub(super) async fn join_group(
        &self,
        conn: &ConnectionInfo,
        client_id: &str,
        request: JoinGroupRequest,
        version: i16,
    ) -> JoinGroupResponse {
        let group_id = request.group_id.0.to_string();
        let coordinator = match self.coordinator_for(&group_id) {
            Ok(c) => c,
            Err(error) => {
                return JoinGroupResponse::default()
                    .with_error_code(error)
                    .with_generation_id(-1)
                    .with_member_id(request.member_id);
            }
        };
        // v0 has no rebalance timeout: it equals the session timeout.
        let rebalance_timeout_ms = if version == 0 {
            request.session_timeout_ms
        } else {
            request.rebalance_timeout_ms
        };
        let outcome = coordinator
            .join(JoinRequest {
                group_id,
                member_id: request.member_id.to_string(),
                instance_id: request.group_instance_id.map(|i| i.to_string()),
                client_id: client_id.to_string(),
                client_host: format!("/{}", conn.peer.ip()),
                session_timeout_ms: request.session_timeout_ms,
                rebalance_timeout_ms,
                protocol_type: request.protocol_type.to_string(),
                protocols: request
                    .protocols
                    .into_iter()
                    .map(|p| (p.name.to_string(), p.metadata))
                    .collect(),
                require_known_member_id: version >= 4,
                supports_skip_assignment: version >= 9,
            })
            .await;
        JoinGroupResponse::default()
            .with_error_code(outcome.error)
            .with_generation_id(outcome.generation)
            .with_protocol_type(outcome.protocol_type.map(s))
            .with_protocol_name(outcome.protocol_name.map(s))
            .with_leader(s(outcome.leader))
            .with_member_id(s(outcome.member_id))
            .with_skip_assignment(outcome.skip_assignment)
            .with_members(
                outcome
                    .members
                    .into_iter()
                    .map(|(id, instance, metadata)| {
                        JoinGroupResponseMember::default()
                            .with_member_id(s(id))
                            .with_group_instance_id(instance.map(s))
                            .with_metadata(metadata)
                    })
                    .collect(),
            )
    }

    pub(super) async fn sync_group(&self, request: SyncGroupRequest) -> SyncGroupResponse {
        let group_id = request.group_id.0.to_string();
        let coordinator = match self.coordinator_for(&group_id) {
            Ok(c) => c,
            Err(error) => return SyncGroupResponse::default().with_error_code(error),
        };
        let outcome = coordinator
            .sync(
                &group_id,
                request.generation_id,
                request.member_id.as_str(),
                request.group_instance_id.as_deref(),
                request.protocol_type.as_deref(),
                request.protocol_name.as_deref(),
                request
                    .assignments
                    .into_iter()
                    .map(|a| (a.member_id.to_string(), a.assignment))
                    .collect(),
            )
            .await;
        SyncGroupResponse::default()
            .with_error_code(outcome.error)
            .with_protocol_type(outcome.protocol_type.map(s))
            .with_protocol_name(outcome.protocol_name.map(s))
            .with_assignment(outcome.assignment)
    }

    pub(super) fn heartbeat(&self, request: HeartbeatRequest) -> HeartbeatResponse {
        let group_id = request.group_id.0.to_string();
        let error = match self.coordinator_for(&group_id) {
            Ok(c) => c.heartbeat(
                &group_id,
                request.generation_id,
                request.member_id.as_str(),
                request.group_instance_id.as_deref(),
            ),
            Err(error) => error,
        };
        HeartbeatResponse::default().with_error_code(error)
    }

    pub(super) async fn leave_group(
        &self,
        request: LeaveGroupRequest,
        version: i16,
    ) -> LeaveGroupResponse {
        let group_id = request.group_id.0.to_string();
        let coordinator = match self.coordinator_for(&group_id) {
            Ok(c) => c,
            Err(error) => return LeaveGroupResponse::default().with_error_code(error),
        };
        let members: Vec<(String, Option<String>)> = if version >= 3 {
            request
                .members
                .iter()
                .map(|m| {
                    (
                        m.member_id.to_string(),
                        m.group_instance_id.as_ref().map(|i| i.to_string()),
                    )
                })
                .collect()
        } else {
            vec![(request.member_id.to_string(), None)]
        };
        match coordinator.leave(&group_id, members.clone()).await {
            Err(error) => LeaveGroupResponse::default().with_error_code(error),
            Ok(results) if version >= 3 => LeaveGroupResponse::default().with_members(
                members
                    .into_iter()
                    .zip(results)
                    .map(|((id, instance), error)| {
                        MemberResponse::default()
                            .with_member_id(s(id))
                            .with_group_instance_id(instance.map(s))
                            .with_error_code(error)
                    })
                    .collect(),
            ),
            Ok(results) => LeaveGroupResponse::default()
                .with_error_code(results.first().copied().unwrap_or(code::NONE)),
        }
    }

    pub(super) async fn offset_commit(&self, request: OffsetCommitRequest) -> OffsetCommitResponse {
        let group_id = request.group_id.0.to_string();
        let topics = self.topics();
        // Offsets for topics that do not exist are refused per partition, as Kafka does.
        let mut wanted = Vec::new();
        let mut unknown = Vec::new();
        for topic in &request.topics {
            let name = topic.name.0.to_string();
            for p in &topic.partitions {
                let exists = topics
                    .get(&name)
                    .is_some_and(|t| p.partition_index >= 0 && p.partition_index < t.partitions);
                if exists {
                    wanted.push((
                        name.clone(),
                        p.partition_index,
                        p.committed_offset,
                        p.committed_leader_epoch,
                        p.committed_metadata.as_ref().map(|m| m.to_string()),
                    ));
                } else {
                    unknown.push((name.clone(), p.partition_index));
                }
            }
        }
        let results: Result<Vec<i16>, i16> = match self.coordinator_for(&group_id) {
            Err(error) => Err(error),
            Ok(c) => {
                c.commit(
                    &group_id,
                    request.generation_id_or_member_epoch,
                    request.member_id.as_str(),
                    request.group_instance_id.as_deref(),
                    wanted.clone(),
                )
                .await
            }
        };
        let mut codes = std::collections::HashMap::new();
        match results {
            Ok(results) => {
                for ((topic, partition, ..), error) in wanted.into_iter().zip(results) {
                    codes.insert((topic, partition), error);
                }
            }
            Err(error) => {
                for (topic, partition, ..) in wanted {
                    codes.insert((topic, partition), error);
                }
            }
        }
        for key in unknown {
            codes.insert(key, code::UNKNOWN_TOPIC_OR_PARTITION);
        }
        let topics_out = request
            .topics
            .into_iter()
            .map(|topic| {
                let name = topic.name.0.to_string();
                let partitions = topic
                    .partitions
                    .iter()
                    .map(|p| {
                        OffsetCommitResponsePartition::default()
                            .with_partition_index(p.partition_index)
                            .with_error_code(
                                codes
                                    .get(&(name.clone(), p.partition_index))
                                    .copied()
                                    .unwrap_or(code::NONE),
                            )
                    })
                    .collect();
                OffsetCommitResponseTopic::default()
                    .with_name(topic.name)
                    .with_topic_id(topic.topic_id)
                    .with_partitions(partitions)
            })
            .collect();
        OffsetCommitResponse::default().with_topics(topics_out)
    }

    pub(super) fn offset_fetch(
        &self,
        request: OffsetFetchRequest,
        version: i16,
    ) -> OffsetFetchResponse {
        if version >= 8 {
            let groups = request
                .groups
                .into_iter()
                .map(|group| {
                    let group_id = group.group_id.0.to_string();
                    match self.coordinator_for(&group_id) {
                        Err(error) => OffsetFetchResponseGroup::default()
                            .with_group_id(group.group_id)
                            .with_error_code(error),
                        Ok(c) => {
                            let wanted = group.topics.map(|topics| {
                                topics
                                    .into_iter()
                                    .map(|t| (t.name.0.to_string(), t.partition_indexes))
                                    .collect()
                            });
                            let topics = c
                                .fetch_offsets(&group_id, wanted)
                                .into_iter()
                                .map(|(topic, partitions)| {
                                    OffsetFetchResponseTopics::default()
                                        .with_name(TopicName(s(topic)))
                                        .with_partitions(
                                            partitions
                                                .into_iter()
                                                .map(|(p, offset, epoch, metadata)| {
                                                    OffsetFetchResponsePartitions::default()
                                                        .with_partition_index(p)
                                                        .with_committed_offset(offset)
                                                        .with_committed_leader_epoch(epoch)
                                                        .with_metadata(Some(s(metadata)))
                                                })
                                                .collect(),
                                        )
                                })
                                .collect();
                            OffsetFetchResponseGroup::default()
                                .with_group_id(group.group_id)
                                .with_topics(topics)
                        }
                    }
                })
                .collect();
            return OffsetFetchResponse::default().with_groups(groups);
        }
        let group_id = request.group_id.0.to_string();
        match self.coordinator_for(&group_id) {
            Err(error) => {
                // Before v2 there is no top-level error: put it on every requested partition.
                let topics = request
                    .topics
                    .unwrap_or_default()
                    .into_iter()
                    .map(|t| {
                        OffsetFetchResponseTopic::default()
                            .with_name(t.name)
                            .with_partitions(
                                t.partition_indexes
                                    .into_iter()
                                    .map(|p| {
                                        OffsetFetchResponsePartition::default()
                                            .with_partition_index(p)
                                            .with_committed_offset(-1)
                                            .with_error_code(error)
                                    })
                                    .collect(),
                            )
                    })
                    .collect();
                OffsetFetchResponse::default()
                    .with_error_code(error)
                    .with_topics(topics)
            }
            Ok(c) => {
                let wanted = request.topics.map(|topics| {
                    topics
                        .into_iter()
                        .map(|t| (t.name.0.to_string(), t.partition_indexes))
                        .collect()
                });
                let topics = c
                    .fetch_offsets(&group_id, wanted)
                    .into_iter()
                    .map(|(topic, partitions)| {
                        OffsetFetchResponseTopic::default()
                            .with_name(TopicName(s(topic)))
                            .with_partitions(
                                partitions
                                    .into_iter()
                                    .map(|(p, offset, epoch, metadata)| {
                                        OffsetFetchResponsePartition::default()
                                            .with_partition_index(p)
                                            .with_committed_offset(offset)
                                            .with_committed_leader_epoch(epoch)
                                            .with_metadata(Some(s(metadata)))
                                    })
                                    .collect(),
                            )
                    })
                    .collect();
                OffsetFetchResponse::default().with_topics(topics)
            }
        }
    }

    pub(super) fn describe_groups(&self, request: DescribeGroupsRequest) -> DescribeGroupsResponse {
        let groups = request
            .groups
            .into_iter()
            .map(|group_id| {
                let id = group_id.0.to_string();
                match self.coordinator_for(&id) {
                    Err(error) => DescribedGroup::default()
                        .with_group_id(group_id)
                        .with_error_code(error),
                    Ok(c) => {
                        let (state, protocol_type, protocol, members) = c.describe(&id);
                        DescribedGroup::default()
                            .with_group_id(group_id)
                            .with_group_state(s(state))
                            .with_protocol_type(s(protocol_type))
                            .with_protocol_data(s(protocol))
                            .with_members(
                                members
                                    .into_iter()
                                    .map(
                                        |(
                                            member_id,
                                            instance,
                                            client_id,
                                            host,
                                            metadata,
                                            assignment,
                                        )| {
                                            DescribedGroupMember::default()
                                                .with_member_id(s(member_id))
                                                .with_group_instance_id(instance.map(s))
                                                .with_client_id(s(client_id))
                                                .with_client_host(s(host))
                                                .with_member_metadata(metadata)
                                                .with_member_assignment(assignment)
                                        },
                                    )
                                    .collect(),
                            )
                    }
                }
            })
            .collect();
        DescribeGroupsResponse::default().with_groups(groups)
    }

    /// ListGroups lists the groups this shard coordinates; admin clients ask every broker (shard).
    pub(super) fn list_groups(&self, request: ListGroupsRequest) -> ListGroupsResponse {
        let groups = self
            .groups
            .list()
            .into_iter()
            .filter(|(_, _, state)| {
                (request.states_filter.is_empty()
                    || request
                        .states_filter
                        .iter()
                        .any(|f| f.eq_ignore_ascii_case(state)))
                    && (request.types_filter.is_empty()
                        || request
                            .types_filter
                            .iter()
                            .any(|f| f.eq_ignore_ascii_case("classic")))
            })
            .map(|(id, protocol_type, state)| {
                ListedGroup::default()
                    .with_group_id(GroupId(s(id)))
                    .with_protocol_type(s(protocol_type))
                    .with_group_state(s(state))
                    .with_group_type(s("classic"))
            })
            .collect();
        ListGroupsResponse::default().with_groups(groups)
    }

    pub(super) async fn delete_groups(&self, request: DeleteGroupsRequest) -> DeleteGroupsResponse {
        let mut results = Vec::with_capacity(request.groups_names.len());
        for group_id in request.groups_names {
            let id = group_id.0.to_string();
            let error = match self.coordinator_for(&id) {
                Err(error) => error,
                Ok(c) => c.delete(&id).await,
            };
            results.push(
                DeletableGroupResult::default()
                    .with_group_id(group_id)
                    .with_error_code(error),
            );
        }
        DeleteGroupsResponse::default().with_results(results)
    }

    pub(super) async fn offset_delete(&self, request: OffsetDeleteRequest) -> OffsetDeleteResponse {
        let group_id = request.group_id.0.to_string();
        let coordinator = match self.coordinator_for(&group_id) {
            Ok(c) => c,
            Err(error) => return OffsetDeleteResponse::default().with_error_code(error),
        };
        let partitions: Vec<(String, i32)> = request
            .topics
            .iter()
            .flat_map(|t| {
                t.partitions
                    .iter()
                    .map(move |p| (t.name.0.to_string(), p.partition_index))
            })
            .collect();
        match coordinator.delete_offsets(&group_id, partitions).await {
            Err(error) => OffsetDeleteResponse::default().with_error_code(error),
            Ok(results) => {
                let mut results = results.into_iter();
                let topics = request
                    .topics
                    .into_iter()
                    .map(|t| {
                        let partitions = t
                            .partitions
                            .iter()
                            .map(|p| {
                                OffsetDeleteResponsePartition::default()
                                    .with_partition_index(p.partition_index)
                                    .with_error_code(results.next().unwrap_or(code::NONE))
                            })
                            .collect();
                        OffsetDeleteResponseTopic::default()
                            .with_name(t.name)
                            .with_partitions(partitions)
                    })
                    .collect();
                OffsetDeleteResponse::default().with_topics(topics)
            }
        }
    }
}
