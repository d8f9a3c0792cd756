//! DeleteRecords end to end: librdkafka's admin client (`AdminClient::delete_records`) moves the
//! low watermark of partitions led by different shards; consumers starting from the beginning and
//! ListOffsets (earliest) see the new start; the start survives a restart and a SIGKILL; and the
//! Kafka error codes (OFFSET_OUT_OF_RANGE beyond the high watermark, UNKNOWN_TOPIC_OR_PARTITION,
//! NOT_LEADER_OR_FOLLOWER on a shard that does not lead the partition) come back per partition.

mod support;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use kafka_protocol::messages::delete_records_request::{
    DeleteRecordsPartition, DeleteRecordsRequest, DeleteRecordsTopic,
};
use kafka_protocol::messages::{
    ApiKey, DeleteRecordsResponse, RequestHeader, ResponseHeader, TopicName,
};
use kafka_protocol::protocol::{Decodable, Encodable, StrBytes};
use rdkafka::admin::AdminOptions;
use rdkafka::consumer::Consumer;
use rdkafka::error::RDKafkaErrorCode;
use rdkafka::{Offset, TopicPartitionList};
use ringbroker::broker::topics::partition_owner;

use support::Broker;
use support::kafka::{admin, consume, consumer, create_topic, produce_all, producer, records};

const TIMEOUT: Duration = Duration::from_secs(20);

/// Runs DeleteRecords through librdkafka and returns per partition the low watermark or the error.
fn delete_records(
    bootstrap: &str,
    targets: &[(&str, i32, Offset)],
) -> Vec<(i32, Result<i64, RDKafkaErrorCode>)> {
    let mut list = TopicPartitionList::new();
    for (topic, partition, offset) in targets {
        list.add_partition_offset(topic, *partition, *offset)
            .unwrap();
    }
    let options = AdminOptions::new().operation_timeout(Some(Duration::from_secs(10)));
    let result = futures_executor::block_on(admin(bootstrap).delete_records(&list, &options))
        .expect("delete_records");
    result
        .elements()
        .iter()
        .map(|element| {
            let outcome = match element.error() {
                Ok(()) => match element.offset() {
                    Offset::Offset(offset) => Ok(offset),
                    other => panic!("no low watermark: {other:?}"),
                },
                Err(rdkafka::error::KafkaError::OffsetFetch(code)) => Err(code),
                Err(other) => panic!("unexpected error {other:?}"),
            };
            (element.partition(), outcome)
        })
        .collect()
}

fn low_watermark(bootstrap: &str, topic: &str, partition: i32) -> (i64, i64) {
    consumer(bootstrap, &[])
        .fetch_watermarks(topic, partition, TIMEOUT)
        .expect("watermarks")
}

#[test]
fn delete_records_moves_earliest_on_every_shard_and_survives_restarts() {
    let temp = tempfile::tempdir().unwrap();
    let data_dir = temp.path().join("data");
    let mut broker = Broker::start_on(&data_dir, 2, &[]);
    let bootstrap = broker.bootstrap();
    // Small segments so that the delete removes whole segment files too.
    create_topic(&bootstrap, "trim", 2, &[("segment.bytes", "4096")]);
    let producer = producer(&bootstrap, &[("acks", "all"), ("linger.ms", "0")]);
    for partition in 0..2 {
        // 200 records of ~300 bytes in batches of 10: many batches, several 4 KiB segments.
        for chunk in 0..20 {
            let batch: Vec<_> = (chunk * 10..chunk * 10 + 10)
                .map(|i| {
                    let mut value = format!("p{partition}-{i}-").into_bytes();
                    value.resize(300, b'x');
                    (None, value)
                })
                .collect();
            produce_all(&producer, "trim", Some(partition), &batch);
        }
    }
    let segments_before = std::fs::read_dir(broker.data_dir.join("trim-0"))
        .unwrap()
        .filter(|entry| entry.as_ref().unwrap().path().extension() == Some("log".as_ref()))
        .count();
    assert!(segments_before > 3, "{segments_before} segments");

    // One partition per shard: librdkafka sends each to its leader.
    let result = delete_records(
        &bootstrap,
        &[("trim", 0, Offset::Offset(150)), ("trim", 1, Offset::End)],
    );
    assert_eq!(result.len(), 2);
    for (partition, outcome) in result {
        let expected = if partition == 0 { 150 } else { 200 };
        assert_eq!(outcome, Ok(expected), "partition {partition}");
    }
    let segments_after = std::fs::read_dir(broker.data_dir.join("trim-0"))
        .unwrap()
        .filter(|entry| entry.as_ref().unwrap().path().extension() == Some("log".as_ref()))
        .count();
    assert!(segments_after < segments_before);
    assert_eq!(low_watermark(&bootstrap, "trim", 0), (150, 200));
    assert_eq!(low_watermark(&bootstrap, "trim", 1), (200, 200));

    // A consumer from the beginning starts at the new start.
    let read = consume(
        &consumer(&bootstrap, &[]),
        "trim",
        1,
        Offset::Beginning,
        50,
        TIMEOUT,
    );
    assert_eq!(read.len(), 50);
    assert_eq!(read[0].offset, 150);
    assert!(read[0].value.starts_with(b"p0-150-"));

    // Beyond the high watermark: OFFSET_OUT_OF_RANGE.
    let result = delete_records(&bootstrap, &[("trim", 0, Offset::Offset(500))]);
    assert_eq!(result[0].1, Err(RDKafkaErrorCode::OffsetOutOfRange));
    // (librdkafka answers an unknown partition itself, from metadata; the raw test below sends one.)

    // Persisted: a clean restart and a SIGKILL both keep the low watermark.
    assert_eq!(broker.stop(), Some(0));
    let mut broker = Broker::start_on(&data_dir, 2, &[]);
    assert_eq!(low_watermark(&broker.bootstrap(), "trim", 0), (150, 200));
    let result = delete_records(&broker.bootstrap(), &[("trim", 0, Offset::Offset(160))]);
    assert_eq!(result[0].1, Ok(160));
    broker.kill();
    let broker = Broker::start_on(&data_dir, 2, &[]);
    assert_eq!(low_watermark(&broker.bootstrap(), "trim", 0), (160, 200));
    assert_eq!(low_watermark(&broker.bootstrap(), "trim", 1), (200, 200));
}

/// Sends one DeleteRecords request to `port` and returns the response.
fn raw_delete_records(
    port: u16,
    version: i16,
    topic: &str,
    partition: i32,
    offset: i64,
) -> DeleteRecordsResponse {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(15)))
        .unwrap();
    let request = DeleteRecordsRequest::default()
        .with_timeout_ms(5_000)
        .with_topics(vec![
            DeleteRecordsTopic::default()
                .with_name(TopicName(StrBytes::from_string(topic.to_string())))
                .with_partitions(vec![
                    DeleteRecordsPartition::default()
                        .with_partition_index(partition)
                        .with_offset(offset),
                ]),
        ]);
    let api_key = ApiKey::DeleteRecords;
    let mut buf = BytesMut::new();
    RequestHeader::default()
        .with_request_api_key(api_key as i16)
        .with_request_api_version(version)
        .with_correlation_id(7)
        .with_client_id(Some(StrBytes::from_static_str("delete-records-test")))
        .encode(&mut buf, api_key.request_header_version(version))
        .unwrap();
    request.encode(&mut buf, version).unwrap();
    let mut frame = (buf.len() as i32).to_be_bytes().to_vec();
    frame.extend_from_slice(&buf);
    stream.write_all(&frame).unwrap();
    let mut size = [0u8; 4];
    stream.read_exact(&mut size).expect("a response");
    let mut response = vec![0u8; i32::from_be_bytes(size) as usize];
    stream.read_exact(&mut response).unwrap();
    let mut response = Bytes::from(response);
    let header =
        ResponseHeader::decode(&mut response, api_key.response_header_version(version)).unwrap();
    assert_eq!(header.correlation_id, 7);
    let decoded = DeleteRecordsResponse::decode(&mut response, version).unwrap();
    assert!(!response.has_remaining());
    decoded
}

#[test]
fn every_version_answers_and_the_wrong_shard_says_not_leader() {
    let broker = Broker::start(2, &[]);
    let bootstrap = broker.bootstrap();
    create_topic(&bootstrap, "raw", 1, &[]);
    produce_all(
        &producer(&bootstrap, &[("acks", "all")]),
        "raw",
        Some(0),
        &records(10, "raw"),
    );
    let owner = partition_owner("raw", 0, 2) as u16;
    let other = 1 - owner;
    for version in 0..=2 {
        let response = raw_delete_records(
            broker.port + owner,
            version,
            "raw",
            0,
            2 + i64::from(version),
        );
        let partition = &response.topics[0].partitions[0];
        assert_eq!(
            (partition.error_code, partition.low_watermark),
            (0, 2 + i64::from(version)),
            "v{version}"
        );
    }
    // NOT_LEADER_OR_FOLLOWER (6) from the shard that does not own the partition.
    let response = raw_delete_records(broker.port + other, 2, "raw", 0, 5);
    assert_eq!(response.topics[0].partitions[0].error_code, 6);
    // UNKNOWN_TOPIC_OR_PARTITION (3) and OFFSET_OUT_OF_RANGE (1).
    let response = raw_delete_records(broker.port + owner, 2, "nope", 0, 5);
    assert_eq!(response.topics[0].partitions[0].error_code, 3);
    let response = raw_delete_records(broker.port + owner, 2, "raw", 0, 11);
    assert_eq!(response.topics[0].partitions[0].error_code, 1);
    // -1 means the high watermark.
    let response = raw_delete_records(broker.port + owner, 2, "raw", 0, -1);
    assert_eq!(
        (
            response.topics[0].partitions[0].error_code,
            response.topics[0].partitions[0].low_watermark
        ),
        (0, 10)
    );
}
