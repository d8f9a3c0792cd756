//! Request decoding and response encoding of `ringbroker::protocol`, checked against
//! kafka-protocol's client side: requests are encoded as a client would, responses decoded as
//! a client would, and random or damaged frames must fail with a typed error, never a panic.

use bytes::{Buf, BufMut, Bytes, BytesMut};
use kafka_protocol::messages::api_versions_request::ApiVersionsRequest;
use kafka_protocol::messages::create_topics_request::{CreatableTopic, CreatableTopicConfig};
use kafka_protocol::messages::delete_records_request::{
    DeleteRecordsPartition, DeleteRecordsTopic,
};
use kafka_protocol::messages::delete_topics_request::DeleteTopicState;
use kafka_protocol::messages::describe_configs_request::DescribeConfigsResource;
use kafka_protocol::messages::fetch_request::{FetchPartition, FetchTopic};
use kafka_protocol::messages::join_group_request::JoinGroupRequestProtocol;
use kafka_protocol::messages::leave_group_request::MemberIdentity;
use kafka_protocol::messages::list_offsets_request::{ListOffsetsPartition, ListOffsetsTopic};
use kafka_protocol::messages::metadata_request::MetadataRequestTopic;
use kafka_protocol::messages::offset_commit_request::{
    OffsetCommitRequestPartition, OffsetCommitRequestTopic,
};
use kafka_protocol::messages::offset_delete_request::{
    OffsetDeleteRequestPartition, OffsetDeleteRequestTopic,
};
use kafka_protocol::messages::offset_fetch_request::{
    OffsetFetchRequestGroup, OffsetFetchRequestTopic, OffsetFetchRequestTopics,
};
use kafka_protocol::messages::produce_request::{PartitionProduceData, TopicProduceData};
use kafka_protocol::messages::sync_group_request::SyncGroupRequestAssignment;
use kafka_protocol::messages::*;
use kafka_protocol::protocol::{Decodable, Encodable, StrBytes};
use proptest::prelude::*;
use ringbroker::protocol::{
    DecodeError, EncodeError, SUPPORTED_APIS, decode_request, encode_response, error_response,
    supported_versions, version_accepted,
};

fn topic(name: &'static str) -> TopicName {
    TopicName(StrBytes::from_static_str(name))
}

fn group(name: &'static str) -> GroupId {
    GroupId(StrBytes::from_static_str(name))
}

/// Every (API, version) the broker decodes.
fn accepted_versions() -> Vec<(ApiKey, i16)> {
    let mut out = Vec::new();
    for &(api_key, min, max) in SUPPORTED_APIS {
        for version in min..=max {
            if version_accepted(api_key, version) {
                out.push((api_key, version));
            }
        }
    }
    out
}

/// A realistic request of `api_key` that encodes at `version`: two topics or resources,
/// several partitions, so damaged copies exercise every nesting level.
fn sample_request(api_key: ApiKey, version: i16) -> RequestKind {
    match api_key {
        ApiKey::Produce => {
            let partition = |index: i32, len: usize| {
                PartitionProduceData::default()
                    .with_index(index)
                    .with_records(Some(Bytes::from(vec![index as u8; len])))
            };
            let mut topics = vec![
                TopicProduceData::default()
                    .with_partition_data(vec![partition(0, 100), partition(1, 61)]),
                TopicProduceData::default().with_partition_data(vec![partition(7, 300)]),
            ];
            for (i, topic_data) in topics.iter_mut().enumerate() {
                if version >= 13 {
                    topic_data.topic_id = uuid::Uuid::from_u128(i as u128 + 1);
                } else {
                    topic_data.name = topic(if i == 0 { "orders" } else { "audit" });
                }
            }
            RequestKind::Produce(
                ProduceRequest::default()
                    .with_acks(-1)
                    .with_timeout_ms(30_000)
                    .with_topic_data(topics),
            )
        }
        ApiKey::Fetch => {
            let partition = |index: i32| {
                FetchPartition::default()
                    .with_partition(index)
                    .with_fetch_offset(1000 + index as i64)
                    .with_partition_max_bytes(1 << 20)
            };
            let mut topics = vec![
                FetchTopic::default().with_partitions(vec![partition(0), partition(1)]),
                FetchTopic::default().with_partitions(vec![partition(5)]),
            ];
            for (i, fetch_topic) in topics.iter_mut().enumerate() {
                if version >= 13 {
                    fetch_topic.topic_id = uuid::Uuid::from_u128(i as u128 + 1);
                } else {
                    fetch_topic.topic = topic(if i == 0 { "orders" } else { "audit" });
                }
            }
            RequestKind::Fetch(
                FetchRequest::default()
                    .with_max_wait_ms(500)
                    .with_min_bytes(1)
                    .with_max_bytes(50 << 20)
                    .with_topics(topics),
            )
        }
        ApiKey::ListOffsets => RequestKind::ListOffsets(
            ListOffsetsRequest::default()
                .with_replica_id(BrokerId(-1))
                .with_topics(vec![
                    ListOffsetsTopic::default()
                        .with_name(topic("orders"))
                        .with_partitions(vec![
                            ListOffsetsPartition::default()
                                .with_partition_index(0)
                                .with_timestamp(-1),
                            ListOffsetsPartition::default()
                                .with_partition_index(1)
                                .with_timestamp(-2),
                        ]),
                ]),
        ),
        ApiKey::Metadata => {
            RequestKind::Metadata(MetadataRequest::default().with_topics(Some(vec![
                MetadataRequestTopic::default().with_name(Some(topic("orders"))),
                MetadataRequestTopic::default().with_name(Some(topic("audit"))),
            ])))
        }
        ApiKey::ApiVersions => {
            let mut request = ApiVersionsRequest::default();
            if version >= 3 {
                request = request
                    .with_client_software_name(StrBytes::from_static_str("ringbroker-test"))
                    .with_client_software_version(StrBytes::from_static_str("1.0"));
            }
            RequestKind::ApiVersions(request)
        }
        ApiKey::CreateTopics => RequestKind::CreateTopics(
            CreateTopicsRequest::default()
                .with_timeout_ms(5000)
                .with_topics(vec![
                    CreatableTopic::default()
                        .with_name(topic("orders"))
                        .with_num_partitions(3)
                        .with_replication_factor(1)
                        .with_configs(vec![
                            CreatableTopicConfig::default()
                                .with_name(StrBytes::from_static_str("retention.ms"))
                                .with_value(Some(StrBytes::from_static_str("60000"))),
                        ]),
                    CreatableTopic::default()
                        .with_name(topic("audit"))
                        .with_num_partitions(1)
                        .with_replication_factor(1),
                ]),
        ),
        ApiKey::DeleteTopics => {
            let request = DeleteTopicsRequest::default().with_timeout_ms(5000);
            RequestKind::DeleteTopics(if version >= 6 {
                request.with_topics(vec![
                    DeleteTopicState::default().with_name(Some(topic("orders"))),
                    DeleteTopicState::default().with_name(Some(topic("audit"))),
                ])
            } else {
                request.with_topic_names(vec![topic("orders"), topic("audit")])
            })
        }
        ApiKey::DeleteRecords => RequestKind::DeleteRecords(
            DeleteRecordsRequest::default()
                .with_timeout_ms(5000)
                .with_topics(vec![
                    DeleteRecordsTopic::default()
                        .with_name(topic("orders"))
                        .with_partitions(vec![
                            DeleteRecordsPartition::default()
                                .with_partition_index(0)
                                .with_offset(10),
                            DeleteRecordsPartition::default()
                                .with_partition_index(1)
                                .with_offset(-1),
                        ]),
                ]),
        ),
        ApiKey::DescribeConfigs => {
            RequestKind::DescribeConfigs(DescribeConfigsRequest::default().with_resources(vec![
                DescribeConfigsResource::default()
                    .with_resource_type(2)
                    .with_resource_name(StrBytes::from_static_str("orders"))
                    .with_configuration_keys(None),
                DescribeConfigsResource::default()
                    .with_resource_type(4)
                    .with_resource_name(StrBytes::from_static_str("0"))
                    .with_configuration_keys(Some(vec![StrBytes::from_static_str(
                        "log.retention.hours",
                    )])),
            ]))
        }
        // The group APIs: one group (two for the batched forms), two members or topics where
        // the request has a list, and each version-gated field set only where it exists, since
        // the encoder refuses a non-default field the version cannot carry.
        ApiKey::FindCoordinator => {
            // key_type stays 0 (group), its default; v4 (KIP-699) replaced the single key
            // with a batch of keys.
            let request = FindCoordinatorRequest::default();
            RequestKind::FindCoordinator(if version >= 4 {
                request.with_coordinator_keys(vec![
                    StrBytes::from_static_str("orders-group"),
                    StrBytes::from_static_str("audit-group"),
                ])
            } else {
                request.with_key(StrBytes::from_static_str("orders-group"))
            })
        }
        ApiKey::JoinGroup => {
            let protocol = |name: &'static str, byte: u8| {
                JoinGroupRequestProtocol::default()
                    .with_name(StrBytes::from_static_str(name))
                    .with_metadata(Bytes::from(vec![byte; 24]))
            };
            let mut request = JoinGroupRequest::default()
                .with_group_id(group("orders-group"))
                .with_session_timeout_ms(45_000)
                .with_member_id(StrBytes::from_static_str("member-1"))
                .with_protocol_type(StrBytes::from_static_str("consumer"))
                .with_protocols(vec![protocol("range", 1), protocol("roundrobin", 2)]);
            if version >= 1 {
                request = request.with_rebalance_timeout_ms(300_000);
            }
            if version >= 5 {
                request = request.with_group_instance_id(Some(StrBytes::from_static_str("i-1")));
            }
            if version >= 8 {
                request = request.with_reason(Some(StrBytes::from_static_str("rebalance")));
            }
            RequestKind::JoinGroup(request)
        }
        ApiKey::SyncGroup => {
            let assignment = |member: &'static str, byte: u8| {
                SyncGroupRequestAssignment::default()
                    .with_member_id(StrBytes::from_static_str(member))
                    .with_assignment(Bytes::from(vec![byte; 16]))
            };
            let mut request = SyncGroupRequest::default()
                .with_group_id(group("orders-group"))
                .with_generation_id(3)
                .with_member_id(StrBytes::from_static_str("member-1"))
                .with_assignments(vec![assignment("member-1", 1), assignment("member-2", 2)]);
            if version >= 3 {
                request = request.with_group_instance_id(Some(StrBytes::from_static_str("i-1")));
            }
            if version >= 5 {
                request = request
                    .with_protocol_type(Some(StrBytes::from_static_str("consumer")))
                    .with_protocol_name(Some(StrBytes::from_static_str("range")));
            }
            RequestKind::SyncGroup(request)
        }
        ApiKey::Heartbeat => {
            let mut request = HeartbeatRequest::default()
                .with_group_id(group("orders-group"))
                .with_generation_id(3)
                .with_member_id(StrBytes::from_static_str("member-1"));
            if version >= 3 {
                request = request.with_group_instance_id(Some(StrBytes::from_static_str("i-1")));
            }
            RequestKind::Heartbeat(request)
        }
        ApiKey::LeaveGroup => {
            let request = LeaveGroupRequest::default().with_group_id(group("orders-group"));
            // v3 (KIP-345) replaced the single member id with a batch of members.
            RequestKind::LeaveGroup(if version >= 3 {
                let reason = (version >= 5).then(|| StrBytes::from_static_str("shutdown"));
                request.with_members(vec![
                    MemberIdentity::default()
                        .with_member_id(StrBytes::from_static_str("member-1"))
                        .with_group_instance_id(None)
                        .with_reason(reason.clone()),
                    MemberIdentity::default()
                        .with_member_id(StrBytes::from_static_str("member-2"))
                        .with_group_instance_id(Some(StrBytes::from_static_str("i-2")))
                        .with_reason(reason),
                ])
            } else {
                request.with_member_id(StrBytes::from_static_str("member-1"))
            })
        }
        ApiKey::OffsetCommit => {
            let partition = |index: i32, offset: i64| {
                let partition = OffsetCommitRequestPartition::default()
                    .with_partition_index(index)
                    .with_committed_offset(offset)
                    .with_committed_metadata(Some(StrBytes::from_static_str("m")));
                if version >= 6 {
                    partition.with_committed_leader_epoch(4)
                } else {
                    partition
                }
            };
            let mut request = OffsetCommitRequest::default()
                .with_group_id(group("orders-group"))
                .with_generation_id_or_member_epoch(3)
                .with_member_id(StrBytes::from_static_str("member-1"))
                .with_topics(vec![
                    OffsetCommitRequestTopic::default()
                        .with_name(topic("orders"))
                        .with_partitions(vec![partition(0, 100), partition(1, 250)]),
                    OffsetCommitRequestTopic::default()
                        .with_name(topic("audit"))
                        .with_partitions(vec![partition(0, 7)]),
                ]);
            if (2..=4).contains(&version) {
                request = request.with_retention_time_ms(86_400_000);
            }
            if version >= 7 {
                request = request.with_group_instance_id(Some(StrBytes::from_static_str("i-1")));
            }
            RequestKind::OffsetCommit(request)
        }
        ApiKey::OffsetFetch => {
            // v8 (KIP-709) batched groups; v9 (KIP-848) added the member id and epoch.
            RequestKind::OffsetFetch(if version >= 8 {
                let mut orders = OffsetFetchRequestGroup::default()
                    .with_group_id(group("orders-group"))
                    .with_topics(Some(vec![
                        OffsetFetchRequestTopics::default()
                            .with_name(topic("orders"))
                            .with_partition_indexes(vec![0, 1]),
                        OffsetFetchRequestTopics::default()
                            .with_name(topic("audit"))
                            .with_partition_indexes(vec![0]),
                    ]));
                if version >= 9 {
                    orders = orders
                        .with_member_id(Some(StrBytes::from_static_str("member-1")))
                        .with_member_epoch(5);
                }
                // A null topic list asks for every committed offset of the group.
                let audit = OffsetFetchRequestGroup::default()
                    .with_group_id(group("audit-group"))
                    .with_topics(None);
                OffsetFetchRequest::default()
                    .with_groups(vec![orders, audit])
                    .with_require_stable(true)
            } else {
                let request = OffsetFetchRequest::default()
                    .with_group_id(group("orders-group"))
                    .with_topics(Some(vec![
                        OffsetFetchRequestTopic::default()
                            .with_name(topic("orders"))
                            .with_partition_indexes(vec![0, 1]),
                        OffsetFetchRequestTopic::default()
                            .with_name(topic("audit"))
                            .with_partition_indexes(vec![0]),
                    ]));
                request.with_require_stable(version >= 7)
            })
        }
        ApiKey::DescribeGroups => RequestKind::DescribeGroups(
            DescribeGroupsRequest::default()
                .with_groups(vec![group("orders-group"), group("audit-group")])
                .with_include_authorized_operations(version >= 3),
        ),
        ApiKey::ListGroups => {
            let mut request = ListGroupsRequest::default();
            if version >= 4 {
                request = request.with_states_filter(vec![StrBytes::from_static_str("Stable")]);
            }
            if version >= 5 {
                request = request.with_types_filter(vec![StrBytes::from_static_str("classic")]);
            }
            RequestKind::ListGroups(request)
        }
        ApiKey::DeleteGroups => RequestKind::DeleteGroups(
            DeleteGroupsRequest::default()
                .with_groups_names(vec![group("orders-group"), group("audit-group")]),
        ),
        ApiKey::OffsetDelete => RequestKind::OffsetDelete(
            OffsetDeleteRequest::default()
                .with_group_id(group("orders-group"))
                .with_topics(vec![
                    OffsetDeleteRequestTopic::default()
                        .with_name(topic("orders"))
                        .with_partitions(vec![
                            OffsetDeleteRequestPartition::default().with_partition_index(0),
                            OffsetDeleteRequestPartition::default().with_partition_index(1),
                        ]),
                    OffsetDeleteRequestTopic::default()
                        .with_name(topic("audit"))
                        .with_partitions(vec![
                            OffsetDeleteRequestPartition::default().with_partition_index(0),
                        ]),
                ]),
        ),
        ApiKey::InitProducerId => {
            // An idempotent (not transactional) producer; v3+ re-initialising a known id.
            let request = InitProducerIdRequest::default()
                .with_transactional_id(None)
                .with_transaction_timeout_ms(-1);
            RequestKind::InitProducerId(if version >= 3 {
                request
                    .with_producer_id(ProducerId(1000))
                    .with_producer_epoch(2)
            } else {
                request
            })
        }
        other => panic!("no sample for {other:?}: add one when adding it to SUPPORTED_APIS"),
    }
}

/// Encodes a request as a client would: header (at the API's header version) then body,
/// without the size prefix.
fn client_frame(api_key: ApiKey, version: i16, correlation_id: i32, body: &RequestKind) -> Bytes {
    let mut buf = BytesMut::new();
    encode_header(&mut buf, api_key, version, correlation_id);
    body.encode(&mut buf, version)
        .unwrap_or_else(|error| panic!("{api_key:?} v{version} sample: {error:#}"));
    buf.freeze()
}

fn encode_header(buf: &mut BytesMut, api_key: ApiKey, version: i16, correlation_id: i32) {
    RequestHeader::default()
        .with_request_api_key(api_key as i16)
        .with_request_api_version(version)
        .with_correlation_id(correlation_id)
        .with_client_id(Some(StrBytes::from_static_str("test-client")))
        .encode(buf, api_key.request_header_version(version))
        .unwrap();
}

/// Splits a response frame into (correlation id, body), checking the size prefix.
fn split_response(frame: &Bytes, api_key: ApiKey, version: i16) -> (i32, Bytes) {
    let size = i32::from_be_bytes(frame[..4].try_into().unwrap());
    assert_eq!(size as usize, frame.len() - 4, "size prefix");
    let mut rest = frame.slice(4..);
    let header = ResponseHeader::decode(&mut rest, api_key.response_header_version(version))
        .expect("response header");
    (header.correlation_id, rest)
}

#[test]
fn every_accepted_version_round_trips_through_a_client_encoder() {
    for (api_key, version) in accepted_versions() {
        let body = sample_request(api_key, version);
        let frame = client_frame(api_key, version, 77, &body);
        let request =
            decode_request(frame).unwrap_or_else(|error| panic!("{api_key:?} v{version}: {error}"));
        assert_eq!(request.header.api_key, api_key);
        assert_eq!(request.header.api_version, version);
        assert_eq!(request.header.correlation_id, 77);
        assert_eq!(request.header.client_id.as_deref(), Some("test-client"));
        // Fields a version does not carry come back as defaults, so compare the wire form.
        let mut again = BytesMut::new();
        request.body.encode(&mut again, version).unwrap();
        let mut original = BytesMut::new();
        body.encode(&mut original, version).unwrap();
        assert_eq!(again, original, "{api_key:?} v{version}");
    }
}

#[test]
fn produce_records_are_slices_of_the_frame() {
    let body = RequestKind::Produce(ProduceRequest::default().with_acks(1).with_topic_data(vec![
            TopicProduceData::default()
                .with_name(topic("orders"))
                .with_partition_data(vec![
                    PartitionProduceData::default()
                        .with_records(Some(Bytes::from(vec![7u8; 16384]))),
                ]),
        ]));
    let frame = client_frame(ApiKey::Produce, 9, 1, &body);
    let frame_range = frame.as_ptr_range();
    let request = decode_request(frame.clone()).unwrap();
    let RequestKind::Produce(produce) = request.body else {
        panic!("not a produce request")
    };
    let records = produce.topic_data[0].partition_data[0]
        .records
        .as_ref()
        .unwrap();
    assert_eq!(records.len(), 16384);
    let records_range = records.as_ptr_range();
    assert!(
        frame_range.start <= records_range.start && records_range.end <= frame_range.end,
        "records were copied out of the frame"
    );
}

#[test]
fn only_acks_zero_produce_goes_unanswered() {
    for (acks, expects) in [(0, false), (1, true), (-1, true)] {
        let body = RequestKind::Produce(ProduceRequest::default().with_acks(acks));
        let request = decode_request(client_frame(ApiKey::Produce, 9, 1, &body)).unwrap();
        assert_eq!(request.expects_response(), expects, "acks={acks}");
    }
    let body = sample_request(ApiKey::Metadata, 12);
    assert!(
        decode_request(client_frame(ApiKey::Metadata, 12, 1, &body))
            .unwrap()
            .expects_response()
    );
}

#[test]
fn unknown_and_unimplemented_api_keys_are_refused() {
    for raw_key in [
        -1i16,
        9999,
        // Transactions are not implemented: their APIs are as unknown as SASL.
        ApiKey::EndTxn as i16,
        ApiKey::SaslHandshake as i16,
    ] {
        let mut buf = BytesMut::new();
        buf.put_i16(raw_key);
        buf.put_i16(0);
        buf.put_i32(5);
        buf.put_i16(-1);
        let error = decode_request(buf.freeze()).unwrap_err();
        assert_eq!(
            error,
            DecodeError::UnknownApiKey {
                api_key: raw_key,
                api_version: 0,
                correlation_id: 5
            }
        );
        assert_eq!(error.reply(), None);
    }
}

#[test]
fn versions_outside_the_table_are_refused_with_the_correlation_id() {
    // Produce 0-2 are advertised (for librdkafka's feature probes) but refused: see
    // `legacy_produce_gets_unsupported_version_per_partition`.
    for (api_key, version) in [
        (ApiKey::Produce, 12),
        (ApiKey::Fetch, 3),
        (ApiKey::Fetch, 13),
        (ApiKey::Metadata, 13),
        (ApiKey::ListOffsets, 9),
        (ApiKey::ListOffsets, 0),
        (ApiKey::OffsetCommit, 1),
        (ApiKey::OffsetCommit, 10),
        (ApiKey::OffsetFetch, 0),
    ] {
        let mut buf = BytesMut::new();
        encode_header(&mut buf, api_key, version, 31);
        buf.put_slice(&[0; 16]);
        let error = decode_request(buf.freeze()).unwrap_err();
        assert_eq!(
            error,
            DecodeError::UnsupportedVersion {
                api_key,
                api_version: version,
                correlation_id: 31
            },
            "{api_key:?} v{version}"
        );
        assert_eq!(error.correlation_id(), Some(31));
        assert_eq!(error.reply(), None, "Kafka closes the connection");
    }
}

#[test]
fn unsupported_api_versions_gets_a_v0_body_with_error_35_and_its_own_range() {
    let (min, max) = supported_versions(ApiKey::ApiVersions).unwrap();
    for version in [max + 1, 127, i16::MAX, -1] {
        let mut buf = BytesMut::new();
        encode_header(&mut buf, ApiKey::ApiVersions, version, 4242);
        // A newer client's body, which we cannot and need not read.
        buf.put_slice(b"\x0cfuture-client\x041.0\x00\x00\x01\x02");
        let error = decode_request(buf.freeze()).unwrap_err();
        assert!(
            matches!(
                error,
                DecodeError::UnsupportedVersion {
                    api_key: ApiKey::ApiVersions,
                    ..
                }
            ),
            "{error:?}"
        );
        let frame = error.reply().expect("ApiVersions gets an answer");
        // Header v0 and body v0, whatever version was asked for.
        let (correlation_id, mut body) = split_response(&frame, ApiKey::ApiVersions, 0);
        assert_eq!(correlation_id, 4242);
        let response = ApiVersionsResponse::decode(&mut body, 0).unwrap();
        assert!(body.is_empty(), "a v0 body has nothing after the api keys");
        assert_eq!(response.error_code, 35);
        assert_eq!(response.api_keys.len(), 1);
        let entry = &response.api_keys[0];
        assert_eq!(
            (entry.api_key, entry.min_version, entry.max_version),
            (ApiKey::ApiVersions as i16, min, max)
        );
    }
}

#[test]
fn api_versions_responses_decode_on_the_client_side_at_every_version() {
    let (min, max) = supported_versions(ApiKey::ApiVersions).unwrap();
    for version in min..=max {
        let body =
            ResponseKind::ApiVersions(ringbroker::protocol::api_versions_response(version, 5));
        let frame = encode_response(9, ApiKey::ApiVersions, version, &body).unwrap();
        // The response header is v0 even for flexible versions (KIP-511).
        let (correlation_id, mut rest) = split_response(&frame, ApiKey::ApiVersions, version);
        assert_eq!(correlation_id, 9);
        let response = ApiVersionsResponse::decode(&mut rest, version).unwrap();
        assert!(rest.is_empty());
        assert_eq!(response.error_code, 0);
        assert_eq!(response.throttle_time_ms, if version >= 1 { 5 } else { 0 });
        let listed: Vec<_> = response
            .api_keys
            .iter()
            .map(|k| (k.api_key, k.min_version, k.max_version))
            .collect();
        let expected: Vec<_> = SUPPORTED_APIS
            .iter()
            .map(|&(k, min, max)| (k as i16, min, max))
            .collect();
        assert_eq!(listed, expected);
    }
}

#[test]
fn flexible_responses_carry_header_v1() {
    let body = ResponseKind::Metadata(MetadataResponse::default());
    let v8 = encode_response(3, ApiKey::Metadata, 8, &body).unwrap();
    let v9 = encode_response(3, ApiKey::Metadata, 9, &body).unwrap();
    // v9 is flexible: header v1 adds one empty tagged-field byte after the correlation id.
    assert_eq!(&v9[4..9], &[0, 0, 0, 3, 0]);
    assert_eq!(&v8[4..8], &[0, 0, 0, 3]);
}

#[test]
fn a_body_of_another_api_is_refused() {
    let body = ResponseKind::Metadata(MetadataResponse::default());
    assert_eq!(
        encode_response(1, ApiKey::Produce, 9, &body),
        Err(EncodeError::ApiKeyMismatch {
            api_key: ApiKey::Produce,
            body: ApiKey::Metadata
        })
    );
    assert!(matches!(
        encode_response(1, ApiKey::Metadata, 99, &body),
        Err(EncodeError::UnsupportedVersion { .. })
    ));
}

/// Every error code the error-response builder wrote into the body, at any level the
/// version carries.
fn error_codes(response: &ResponseKind, version: i16) -> Vec<i16> {
    match response {
        ResponseKind::Produce(r) => r
            .responses
            .iter()
            .flat_map(|t| t.partition_responses.iter().map(|p| p.error_code))
            .collect(),
        ResponseKind::Fetch(r) => (version >= 7)
            .then_some(r.error_code)
            .into_iter()
            .chain(
                r.responses
                    .iter()
                    .flat_map(|t| t.partitions.iter().map(|p| p.error_code)),
            )
            .collect(),
        ResponseKind::Metadata(r) => r.topics.iter().map(|t| t.error_code).collect(),
        ResponseKind::ListOffsets(r) => r
            .topics
            .iter()
            .flat_map(|t| t.partitions.iter().map(|p| p.error_code))
            .collect(),
        ResponseKind::CreateTopics(r) => r.topics.iter().map(|t| t.error_code).collect(),
        ResponseKind::DeleteTopics(r) => r.responses.iter().map(|t| t.error_code).collect(),
        ResponseKind::DescribeConfigs(r) => r.results.iter().map(|t| t.error_code).collect(),
        ResponseKind::DeleteRecords(r) => r
            .topics
            .iter()
            .flat_map(|t| {
                t.partitions.iter().map(|p| {
                    assert_eq!(p.low_watermark, -1);
                    p.error_code
                })
            })
            .collect(),
        ResponseKind::ApiVersions(r) => vec![r.error_code],
        ResponseKind::FindCoordinator(r) if version >= 4 => {
            r.coordinators.iter().map(|c| c.error_code).collect()
        }
        ResponseKind::FindCoordinator(r) => vec![r.error_code],
        ResponseKind::JoinGroup(r) => vec![r.error_code],
        ResponseKind::SyncGroup(r) => vec![r.error_code],
        ResponseKind::Heartbeat(r) => vec![r.error_code],
        ResponseKind::LeaveGroup(r) => std::iter::once(r.error_code)
            .chain(r.members.iter().map(|m| m.error_code))
            .collect(),
        ResponseKind::OffsetCommit(r) => r
            .topics
            .iter()
            .flat_map(|t| t.partitions.iter().map(|p| p.error_code))
            .collect(),
        ResponseKind::OffsetFetch(r) if version >= 8 => r
            .groups
            .iter()
            .flat_map(|g| {
                std::iter::once(g.error_code).chain(
                    g.topics
                        .iter()
                        .flat_map(|t| t.partitions.iter().map(|p| p.error_code)),
                )
            })
            .collect(),
        ResponseKind::OffsetFetch(r) => (version >= 2)
            .then_some(r.error_code)
            .into_iter()
            .chain(
                r.topics
                    .iter()
                    .flat_map(|t| t.partitions.iter().map(|p| p.error_code)),
            )
            .collect(),
        ResponseKind::DescribeGroups(r) => r.groups.iter().map(|g| g.error_code).collect(),
        ResponseKind::ListGroups(r) => vec![r.error_code],
        ResponseKind::DeleteGroups(r) => r.results.iter().map(|g| g.error_code).collect(),
        ResponseKind::OffsetDelete(r) => vec![r.error_code],
        ResponseKind::InitProducerId(r) => {
            assert_eq!((r.producer_id, r.producer_epoch), (ProducerId(-1), -1));
            vec![r.error_code]
        }
        other => panic!("unexpected response {other:?}"),
    }
}

/// How many entries (partitions, topics or resources) the sample request names, which the
/// error response must echo one for one.
fn expected_entries(api_key: ApiKey, version: i16) -> usize {
    match api_key {
        ApiKey::Produce => 3,
        // From v13 Kafka sends only the top-level error, before v7 only partition errors.
        ApiKey::Fetch if version >= 13 => 1,
        ApiKey::Fetch if version >= 7 => 4,
        ApiKey::Fetch => 3,
        ApiKey::ListOffsets | ApiKey::Metadata => 2,
        ApiKey::CreateTopics | ApiKey::DeleteTopics | ApiKey::DescribeConfigs => 2,
        ApiKey::DeleteRecords => 2,
        ApiKey::ApiVersions => 1,
        // From v4 one coordinator per requested key, before a single top-level answer.
        ApiKey::FindCoordinator if version >= 4 => 2,
        ApiKey::FindCoordinator => 1,
        ApiKey::JoinGroup | ApiKey::SyncGroup | ApiKey::Heartbeat => 1,
        // The top-level code, plus (v3+) each of the two leaving members.
        ApiKey::LeaveGroup if version >= 3 => 3,
        ApiKey::LeaveGroup => 1,
        ApiKey::OffsetCommit => 3,
        // v8+: two groups, the first with three partitions, the second asking for all
        // topics and so echoing none; v2-7: top-level code plus three partitions; v1: the
        // partitions alone.
        ApiKey::OffsetFetch if version >= 8 => 5,
        ApiKey::OffsetFetch if version >= 2 => 4,
        ApiKey::OffsetFetch => 3,
        ApiKey::DescribeGroups | ApiKey::DeleteGroups => 2,
        ApiKey::ListGroups | ApiKey::OffsetDelete | ApiKey::InitProducerId => 1,
        other => panic!("{other:?}"),
    }
}

#[test]
fn error_responses_echo_every_entry_and_decode_on_the_client_side() {
    const REQUEST_TIMED_OUT: i16 = 7;
    for (api_key, version) in accepted_versions() {
        let frame = client_frame(api_key, version, 1234, &sample_request(api_key, version));
        let request = decode_request(frame).unwrap();
        let response = error_response(&request, REQUEST_TIMED_OUT)
            .unwrap_or_else(|| panic!("no error response for {api_key:?}"));
        let frame = encode_response(1234, api_key, version, &response)
            .unwrap_or_else(|error| panic!("{api_key:?} v{version}: {error}"));
        let (correlation_id, mut body) = split_response(&frame, api_key, version);
        assert_eq!(correlation_id, 1234);
        let decoded = ResponseKind::decode(api_key, &mut body, version).unwrap();
        assert!(body.is_empty(), "{api_key:?} v{version}: trailing bytes");
        let codes = error_codes(&decoded, version);
        assert_eq!(
            codes.len(),
            expected_entries(api_key, version),
            "{api_key:?} v{version}"
        );
        assert!(
            codes.iter().all(|&code| code == REQUEST_TIMED_OUT),
            "{api_key:?} v{version}: {codes:?}"
        );
    }
}

#[test]
fn short_and_garbage_frames_are_malformed() {
    for frame in [&b""[..], b"\x00", b"\x00\x03\x00\x01\x00\x00"] {
        assert!(matches!(
            decode_request(Bytes::copy_from_slice(frame)),
            Err(DecodeError::MalformedHeader { .. })
        ));
    }
    // A client id longer than the frame.
    let mut buf = BytesMut::new();
    buf.put_i16(ApiKey::Metadata as i16);
    buf.put_i16(1);
    buf.put_i32(8);
    buf.put_i16(100);
    buf.put_slice(b"short");
    assert!(matches!(
        decode_request(buf.freeze()),
        Err(DecodeError::MalformedHeader { .. })
    ));
}

/// Kafka's parser ignores bytes after a body (and librdkafka 2.12 sends some with Metadata v12),
/// so a request followed by garbage decodes to the same request.
#[test]
fn trailing_garbage_is_ignored_as_kafka_does() {
    for (api_key, version) in accepted_versions() {
        let frame = client_frame(api_key, version, 55, &sample_request(api_key, version));
        let plain = decode_request(frame.clone()).expect("the sample decodes");
        let mut padded = BytesMut::from(&frame[..]);
        padded.put_slice(b"\xde\xad");
        match decode_request(padded.freeze()) {
            Ok(request) => assert_eq!(request, plain, "{api_key:?} v{version}"),
            other => panic!("{api_key:?} v{version}: {other:?}"),
        }
    }
}

#[test]
fn every_strict_prefix_of_a_valid_request_is_refused() {
    for (api_key, version) in accepted_versions() {
        let frame = client_frame(api_key, version, 55, &sample_request(api_key, version));
        for len in 0..frame.len() {
            assert!(
                decode_request(frame.slice(..len)).is_err(),
                "{api_key:?} v{version}: a {len}-byte prefix decoded"
            );
        }
    }
}

/// A strategy for one accepted (API, version) pair.
fn accepted_version() -> impl Strategy<Value = (ApiKey, i16)> {
    prop::sample::select(accepted_versions())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]

    /// Random bytes behind a valid header, for every accepted API and version.
    #[test]
    fn random_bodies_never_panic(
        (api_key, version) in accepted_version(),
        body in prop::collection::vec(any::<u8>(), 0..300),
    ) {
        let mut buf = BytesMut::new();
        encode_header(&mut buf, api_key, version, 9);
        buf.put_slice(&body);
        if let Err(error) = decode_request(buf.freeze()) {
            prop_assert!(!matches!(error, DecodeError::MalformedHeader { .. }), "{error:?}");
            prop_assert_eq!(error.correlation_id(), Some(9));
        }
    }

    /// A valid request with a few bytes overwritten and possibly truncated.
    #[test]
    fn damaged_requests_never_panic(
        (api_key, version) in accepted_version(),
        edits in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..6),
        cut in any::<prop::sample::Index>(),
        truncate in any::<bool>(),
    ) {
        let frame = client_frame(api_key, version, 9, &sample_request(api_key, version));
        let mut bytes = frame.to_vec();
        for (index, value) in edits {
            let at = index.index(bytes.len());
            bytes[at] = value;
        }
        if truncate {
            bytes.truncate(cut.index(bytes.len()));
        }
        let _ = decode_request(Bytes::from(bytes));
    }

    /// Entirely random frames, header included.
    #[test]
    fn random_frames_never_panic(frame in prop::collection::vec(any::<u8>(), 0..200)) {
        let _ = decode_request(Bytes::from(frame));
    }
}

/// Produce v0-v2 are advertised but refused: every partition is answered with UNSUPPORTED_VERSION
/// (acks=1), nothing is answered for acks=0, and a body that does not parse closes the connection.
#[test]
fn legacy_produce_gets_unsupported_version_per_partition() {
    for version in 0..=2i16 {
        let mut buf = BytesMut::new();
        encode_header(&mut buf, ApiKey::Produce, version, 41);
        buf.put_i16(1); // acks
        buf.put_i32(1000);
        buf.put_i32(1);
        buf.put_i16(3);
        buf.put_slice(b"old");
        buf.put_i32(1);
        buf.put_i32(0);
        buf.put_i32(-1);
        let error = decode_request(buf.freeze()).unwrap_err();
        assert_eq!(error.correlation_id(), Some(41));
        let mut reply = error.reply().expect("an answer for acks=1");
        let _size = reply.get_i32();
        assert_eq!(reply.get_i32(), 41);
        assert_eq!(reply.get_i32(), 1);
        let name_len = reply.get_i16() as usize;
        assert_eq!(&reply.split_to(name_len)[..], b"old");
        assert_eq!(reply.get_i32(), 1);
        assert_eq!(reply.get_i32(), 0);
        assert_eq!(reply.get_i16(), 35, "v{version}: UNSUPPORTED_VERSION");

        let mut silent = BytesMut::new();
        encode_header(&mut silent, ApiKey::Produce, version, 42);
        silent.put_slice(&[0; 10]); // acks=0, no topics
        assert_eq!(decode_request(silent.freeze()).unwrap_err().reply(), None);

        let mut garbage = BytesMut::new();
        encode_header(&mut garbage, ApiKey::Produce, version, 43);
        garbage.put_slice(&[0, 1, 0]);
        assert!(matches!(
            decode_request(garbage.freeze()).unwrap_err(),
            DecodeError::UnsupportedVersion {
                correlation_id: 43,
                ..
            }
        ));
    }
}
