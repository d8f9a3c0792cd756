//! The hand-rolled Fetch response writer against its oracle, kafka-protocol's
//! `FetchResponse::encode`: for random responses at every version, the flattened parts must
//! be byte-identical to the crate's frame and decode with the crate's client-side decoder.

use bytes::{BufMut, Bytes, BytesMut};
use kafka_protocol::messages::fetch_response::{
    AbortedTransaction, FetchableTopicResponse, LeaderIdAndEpoch, NodeEndpoint, PartitionData,
};
use kafka_protocol::messages::{
    ApiKey, BrokerId, FetchResponse, ProducerId, ResponseHeader, TopicName,
};
use kafka_protocol::protocol::{Decodable, Encodable, StrBytes};
use proptest::prelude::*;
use ringbroker::protocol::{
    FETCH_WRITER_VERSIONS, FetchAbortedTransaction, FetchCurrentLeader, FetchFrame,
    FetchNodeEndpoint, FetchPartitionData, FetchResponseData, FetchTopicData, FramePart,
    INLINE_RECORDS_MAX_BYTES, RecordsBody, encode_fetch_response,
};

/// Records as generated: where they live decides how the writer must treat them.
#[derive(Debug, Clone)]
enum RecordsSpec {
    Null,
    Memory(Vec<u8>),
    File(Vec<u8>),
}

#[derive(Debug, Clone)]
struct Case {
    version: i16,
    correlation_id: i32,
    response: FetchResponseData,
    /// The bytes behind each `RecordsBody::File` token.
    files: Vec<Vec<u8>>,
}

fn str_bytes(s: String) -> StrBytes {
    StrBytes::from_string(s)
}

fn records_strategy() -> impl Strategy<Value = RecordsSpec> {
    prop_oneof![
        1 => Just(RecordsSpec::Null),
        3 => prop::collection::vec(any::<u8>(), 0..(2 * INLINE_RECORDS_MAX_BYTES))
            .prop_map(RecordsSpec::Memory),
        3 => prop::collection::vec(any::<u8>(), 0..3000).prop_map(RecordsSpec::File),
    ]
}

fn partition_strategy(version: i16) -> impl Strategy<Value = (FetchPartitionData, RecordsSpec)> {
    (
        any::<(i32, i16, i64, i64, i64)>(),
        prop::option::of(prop::collection::vec(any::<(i64, i64)>(), 0..3)),
        if version >= 11 {
            any::<i32>().boxed()
        } else {
            Just(-1).boxed()
        },
        prop_oneof![Just((-1, -1)), any::<(i32, i32)>()],
        records_strategy(),
    )
        .prop_map(
            |(
                (partition_index, error_code, high_watermark, last_stable_offset, log_start_offset),
                aborted,
                preferred_read_replica,
                (leader_id, leader_epoch),
                records,
            )| {
                let partition = FetchPartitionData {
                    partition_index,
                    error_code,
                    high_watermark,
                    last_stable_offset,
                    log_start_offset,
                    aborted_transactions: aborted.map(|list| {
                        list.into_iter()
                            .map(|(producer_id, first_offset)| FetchAbortedTransaction {
                                producer_id,
                                first_offset,
                            })
                            .collect()
                    }),
                    preferred_read_replica,
                    current_leader: FetchCurrentLeader {
                        leader_id,
                        leader_epoch,
                    },
                    // Filled in with the file token once all files are numbered.
                    records: RecordsBody::Null,
                };
                (partition, records)
            },
        )
}

fn case_strategy() -> impl Strategy<Value = Case> {
    (FETCH_WRITER_VERSIONS, any::<i32>())
        .prop_flat_map(|(version, correlation_id)| {
            let topic = (
                // Names longer than 127 bytes take a two-byte compact length.
                "[a-zA-Z0-9._-]{0,200}",
                any::<u128>(),
                prop::collection::vec(partition_strategy(version), 0..4),
            );
            let endpoint = (
                any::<i32>(),
                "[a-z.]{0,30}",
                any::<i32>(),
                prop::option::of("[a-z]{0,8}"),
            );
            (
                Just(version),
                Just(correlation_id),
                any::<(i32, i16)>(),
                if version >= 7 {
                    any::<i32>().boxed()
                } else {
                    Just(0).boxed()
                },
                prop::collection::vec(topic, 0..4),
                prop::collection::vec(endpoint, 0..3),
            )
        })
        .prop_map(
            |(
                version,
                correlation_id,
                (throttle_time_ms, error_code),
                session_id,
                topics,
                endpoints,
            )| {
                let mut files = Vec::new();
                let topics = topics
                    .into_iter()
                    .map(|(name, topic_id, partitions)| FetchTopicData {
                        name: TopicName(str_bytes(name)),
                        topic_id: uuid::Uuid::from_u128(topic_id),
                        partitions: partitions
                            .into_iter()
                            .map(|(mut partition, records)| {
                                partition.records = match records {
                                    RecordsSpec::Null => RecordsBody::Null,
                                    RecordsSpec::Memory(bytes) => {
                                        RecordsBody::Bytes(Bytes::from(bytes))
                                    }
                                    RecordsSpec::File(bytes) => {
                                        files.push(bytes);
                                        RecordsBody::File {
                                            len: files.last().unwrap().len() as u32,
                                            token: files.len() - 1,
                                        }
                                    }
                                };
                                partition
                            })
                            .collect(),
                    })
                    .collect();
                let node_endpoints = endpoints
                    .into_iter()
                    .map(|(node_id, host, port, rack)| FetchNodeEndpoint {
                        node_id,
                        host: str_bytes(host),
                        port,
                        rack: rack.map(str_bytes),
                    })
                    .collect();
                Case {
                    version,
                    correlation_id,
                    response: FetchResponseData {
                        throttle_time_ms,
                        error_code,
                        session_id,
                        topics,
                        node_endpoints,
                    },
                    files,
                }
            },
        )
}

fn records_bytes(records: &RecordsBody, files: &[Vec<u8>]) -> Option<Bytes> {
    match records {
        RecordsBody::Null => None,
        RecordsBody::Bytes(bytes) => Some(bytes.clone()),
        RecordsBody::File { token, .. } => Some(Bytes::copy_from_slice(&files[*token])),
    }
}

/// The same response as kafka-protocol's type, with file ranges read into memory.
fn oracle_response(case: &Case) -> FetchResponse {
    let response = &case.response;
    FetchResponse::default()
        .with_throttle_time_ms(response.throttle_time_ms)
        .with_error_code(response.error_code)
        .with_session_id(response.session_id)
        .with_responses(
            response
                .topics
                .iter()
                .map(|topic| {
                    FetchableTopicResponse::default()
                        .with_topic(topic.name.clone())
                        .with_topic_id(topic.topic_id)
                        .with_partitions(
                            topic
                                .partitions
                                .iter()
                                .map(|p| {
                                    PartitionData::default()
                                        .with_partition_index(p.partition_index)
                                        .with_error_code(p.error_code)
                                        .with_high_watermark(p.high_watermark)
                                        .with_last_stable_offset(p.last_stable_offset)
                                        .with_log_start_offset(p.log_start_offset)
                                        .with_aborted_transactions(
                                            p.aborted_transactions.as_ref().map(|list| {
                                                list.iter()
                                                    .map(|a| {
                                                        AbortedTransaction::default()
                                                            .with_producer_id(ProducerId(
                                                                a.producer_id,
                                                            ))
                                                            .with_first_offset(a.first_offset)
                                                    })
                                                    .collect()
                                            }),
                                        )
                                        .with_preferred_read_replica(BrokerId(
                                            p.preferred_read_replica,
                                        ))
                                        .with_current_leader(
                                            LeaderIdAndEpoch::default()
                                                .with_leader_id(BrokerId(
                                                    p.current_leader.leader_id,
                                                ))
                                                .with_leader_epoch(p.current_leader.leader_epoch),
                                        )
                                        .with_records(records_bytes(&p.records, &case.files))
                                })
                                .collect(),
                        )
                })
                .collect(),
        )
        .with_node_endpoints(
            response
                .node_endpoints
                .iter()
                .map(|e| {
                    NodeEndpoint::default()
                        .with_node_id(BrokerId(e.node_id))
                        .with_host(e.host.clone())
                        .with_port(e.port)
                        .with_rack(e.rack.clone())
                })
                .collect(),
        )
}

/// The oracle's whole frame: size, response header, body.
fn oracle_frame(case: &Case) -> Vec<u8> {
    let mut body = BytesMut::new();
    ResponseHeader::default()
        .with_correlation_id(case.correlation_id)
        .encode(
            &mut body,
            ApiKey::Fetch.response_header_version(case.version),
        )
        .unwrap();
    oracle_response(case)
        .encode(&mut body, case.version)
        .unwrap();
    let mut frame = Vec::with_capacity(body.len() + 4);
    frame.put_i32(body.len() as i32);
    frame.extend_from_slice(&body);
    frame
}

fn flatten(frame: &FetchFrame, files: &[Vec<u8>]) -> Vec<u8> {
    let mut out = Vec::with_capacity(frame.len_bytes());
    for part in &frame.parts {
        match part {
            FramePart::Bytes(bytes) => out.extend_from_slice(bytes),
            FramePart::File { token, len } => {
                assert_eq!(files[*token].len(), *len as usize, "file part length");
                out.extend_from_slice(&files[*token]);
            }
        }
    }
    out
}

fn check_case(case: &Case) -> Result<(), TestCaseError> {
    let frame = encode_fetch_response(case.correlation_id, case.version, &case.response)
        .map_err(|error| TestCaseError::fail(format!("v{}: {error}", case.version)))?;
    let flat = flatten(&frame, &case.files);

    // Byte-identical to the crate's encoder.
    let expected = oracle_frame(case);
    prop_assert_eq!(flat.len(), expected.len(), "v{} frame length", case.version);
    prop_assert!(
        flat == expected,
        "v{}: bytes differ from the oracle",
        case.version
    );

    // The size prefix is exact and comes first, in a bytes part.
    prop_assert!(matches!(frame.parts.first(), Some(FramePart::Bytes(b)) if b.len() >= 8));
    let size = i32::from_be_bytes(flat[..4].try_into().unwrap());
    prop_assert_eq!(size as usize, frame.len_bytes() - 4);

    // No empty parts; in-memory records at or below the threshold were merged, so parts are
    // only the header stretches around each file range or large in-memory records.
    prop_assert!(frame.parts.iter().all(|part| part.len_bytes() > 0));
    let external = case
        .response
        .topics
        .iter()
        .flat_map(|t| &t.partitions)
        .filter(|p| match &p.records {
            RecordsBody::Null => false,
            RecordsBody::Bytes(bytes) => bytes.len() > INLINE_RECORDS_MAX_BYTES,
            RecordsBody::File { len, .. } => *len > 0,
        })
        .count();
    prop_assert!(
        frame.parts.len() <= 1 + 2 * external,
        "{} parts",
        frame.parts.len()
    );
    let file_parts = frame
        .parts
        .iter()
        .filter(|p| matches!(p, FramePart::File { .. }))
        .count();
    prop_assert_eq!(
        file_parts,
        case.files.iter().filter(|f| !f.is_empty()).count()
    );

    // And a client reads back the records it was sent.
    let mut wire = Bytes::from(flat).slice(4..);
    let header = ResponseHeader::decode(
        &mut wire,
        ApiKey::Fetch.response_header_version(case.version),
    )
    .unwrap();
    prop_assert_eq!(header.correlation_id, case.correlation_id);
    let decoded = FetchResponse::decode(&mut wire, case.version).unwrap();
    prop_assert!(wire.is_empty());
    prop_assert_eq!(decoded.responses.len(), case.response.topics.len());
    for (decoded_topic, topic) in decoded.responses.iter().zip(&case.response.topics) {
        prop_assert_eq!(decoded_topic.partitions.len(), topic.partitions.len());
        for (decoded_partition, partition) in decoded_topic.partitions.iter().zip(&topic.partitions)
        {
            prop_assert_eq!(decoded_partition.partition_index, partition.partition_index);
            prop_assert_eq!(
                &decoded_partition.records,
                &records_bytes(&partition.records, &case.files)
            );
        }
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 1000, ..ProptestConfig::default() })]

    #[test]
    fn writer_matches_the_crate_encoder_at_every_version(case in case_strategy()) {
        check_case(&case)?;
    }
}

/// A response shaped like a broker's: every version, a file range per partition, empty
/// partitions, a small tail in memory.
#[test]
fn typical_responses_match_at_every_version() {
    for version in FETCH_WRITER_VERSIONS {
        let partitions = (0..5)
            .map(|index| FetchPartitionData {
                partition_index: index,
                error_code: 0,
                high_watermark: 1000,
                last_stable_offset: 1000,
                log_start_offset: 0,
                aborted_transactions: None,
                preferred_read_replica: -1,
                current_leader: FetchCurrentLeader::default(),
                records: match index {
                    0 | 3 => RecordsBody::File {
                        len: 700 + index as u32,
                        token: index as usize / 3,
                    },
                    1 => RecordsBody::Bytes(Bytes::new()),
                    _ => RecordsBody::Bytes(Bytes::from_static(b"tail-bytes")),
                },
            })
            .collect();
        let case = Case {
            version,
            correlation_id: 17,
            response: FetchResponseData {
                topics: vec![FetchTopicData {
                    name: TopicName(StrBytes::from_static_str("orders")),
                    topic_id: uuid::Uuid::from_u128(0xfeed),
                    partitions,
                }],
                ..FetchResponseData::default()
            },
            files: vec![vec![1; 700], vec![2; 703]],
        };
        check_case(&case).unwrap_or_else(|error| panic!("v{version}: {error}"));
        let frame = encode_fetch_response(17, version, &case.response).unwrap();
        // header | file 0 | middle | file 1 | tail
        assert_eq!(frame.parts.len(), 5, "v{version}");
    }
}
