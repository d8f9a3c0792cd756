//! Criterion benches of `ringbroker::protocol`: decoding a Produce request carrying one 16 KiB
//! batch, and encoding Fetch response frames with the hand-rolled writer (file ranges, no
//! copy) against kafka-protocol's encoder (records in memory, copied into the frame).

use bytes::{Bytes, BytesMut};
use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};
use kafka_protocol::messages::fetch_response::{FetchableTopicResponse, PartitionData};
use kafka_protocol::messages::produce_request::{PartitionProduceData, TopicProduceData};
use kafka_protocol::messages::{
    ApiKey, FetchResponse, ProduceRequest, RequestHeader, RequestKind, ResponseHeader, TopicName,
};
use kafka_protocol::protocol::{Encodable, StrBytes};
use kafka_protocol::records::{
    Compression, Record, RecordBatchEncoder, RecordEncodeOptions, TimestampType,
};
use ringbroker::protocol::{
    FetchCurrentLeader, FetchPartitionData, FetchResponseData, FetchTopicData, RecordsBody,
    decode_request, encode_fetch_response,
};
use std::hint::black_box;

const BATCH_BYTES: usize = 16 * 1024;

/// A real RecordBatch v2 of about 16 KiB: 16 uncompressed records of 1 KiB values.
fn record_batch() -> Bytes {
    let records: Vec<Record> = (0..16)
        .map(|i| Record {
            transactional: false,
            control: false,
            delete_horizon: false,
            partition_leader_epoch: 0,
            producer_id: -1,
            producer_epoch: -1,
            timestamp_type: TimestampType::Creation,
            offset: i,
            sequence: -1,
            timestamp: 1_700_000_000_000 + i,
            key: Some(Bytes::from(format!("key-{i}"))),
            value: Some(Bytes::from(vec![b'v'; BATCH_BYTES / 16 - 32])),
            headers: Default::default(),
        })
        .collect();
    let mut buf = BytesMut::new();
    RecordBatchEncoder::encode(
        &mut buf,
        &records,
        &RecordEncodeOptions {
            version: 2,
            compression: Compression::None,
        },
    )
    .expect("batch encodes");
    buf.freeze()
}

/// A Produce v9 request frame (no size prefix) with one topic, one partition, one batch.
fn produce_v9_frame() -> Bytes {
    let body = RequestKind::Produce(
        ProduceRequest::default()
            .with_acks(-1)
            .with_timeout_ms(30_000)
            .with_topic_data(vec![
                TopicProduceData::default()
                    .with_name(TopicName(StrBytes::from_static_str("bench-topic")))
                    .with_partition_data(vec![
                        PartitionProduceData::default()
                            .with_index(0)
                            .with_records(Some(record_batch())),
                    ]),
            ]),
    );
    let mut buf = BytesMut::new();
    RequestHeader::default()
        .with_request_api_key(ApiKey::Produce as i16)
        .with_request_api_version(9)
        .with_correlation_id(1)
        .with_client_id(Some(StrBytes::from_static_str("bench")))
        .encode(&mut buf, ApiKey::Produce.request_header_version(9))
        .expect("header encodes");
    body.encode(&mut buf, 9).expect("body encodes");
    buf.freeze()
}

fn bench_decode_produce(c: &mut Criterion) {
    let frame = produce_v9_frame();
    c.bench_function("decode_request/produce_v9_16KiB", |b| {
        b.iter(|| decode_request(black_box(frame.clone())).expect("decodes"))
    });
}

/// A Fetch response with `partitions` partitions of one topic, each carrying a 16 KiB file
/// range (the hand-rolled writer's input).
fn fetch_data(partitions: i32) -> FetchResponseData {
    FetchResponseData {
        topics: vec![FetchTopicData {
            name: TopicName(StrBytes::from_static_str("bench-topic")),
            topic_id: uuid::Uuid::from_u128(1),
            partitions: (0..partitions)
                .map(|index| FetchPartitionData {
                    partition_index: index,
                    error_code: 0,
                    high_watermark: 1_000_000,
                    last_stable_offset: 1_000_000,
                    log_start_offset: 0,
                    aborted_transactions: None,
                    preferred_read_replica: -1,
                    current_leader: FetchCurrentLeader::default(),
                    records: RecordsBody::File {
                        len: BATCH_BYTES as u32,
                        token: index as usize,
                    },
                })
                .collect(),
        }],
        ..FetchResponseData::default()
    }
}

/// The same response as kafka-protocol's type, records in memory.
fn fetch_crate_response(partitions: i32, batch: &Bytes) -> FetchResponse {
    FetchResponse::default().with_responses(vec![
        FetchableTopicResponse::default()
            .with_topic(TopicName(StrBytes::from_static_str("bench-topic")))
            .with_partitions(
                (0..partitions)
                    .map(|index| {
                        PartitionData::default()
                            .with_partition_index(index)
                            .with_high_watermark(1_000_000)
                            .with_last_stable_offset(1_000_000)
                            .with_log_start_offset(0)
                            .with_records(Some(batch.clone()))
                    })
                    .collect(),
            ),
    ])
}

/// What a broker using the crate would do: size the frame, then write header and body.
fn crate_encode(version: i16, response: &FetchResponse) -> Bytes {
    let header_version = ApiKey::Fetch.response_header_version(version);
    let header = ResponseHeader::default().with_correlation_id(1);
    let size = header.compute_size(header_version).expect("sized")
        + response.compute_size(version).expect("sized");
    let mut buf = BytesMut::with_capacity(4 + size);
    bytes::BufMut::put_i32(&mut buf, size as i32);
    header.encode(&mut buf, header_version).expect("encodes");
    response.encode(&mut buf, version).expect("encodes");
    buf.freeze()
}

fn bench_fetch_encode(c: &mut Criterion) {
    const VERSION: i16 = 12;
    let batch = Bytes::from(vec![0u8; BATCH_BYTES]);
    let mut group = c.benchmark_group("fetch_response_v12");
    for partitions in [1, 100] {
        let data = fetch_data(partitions);
        group.bench_with_input(
            BenchmarkId::new("hand_rolled_file_ranges", partitions),
            &data,
            |b, data| b.iter(|| encode_fetch_response(1, VERSION, black_box(data)).expect("ok")),
        );
        let response = fetch_crate_response(partitions, &batch);
        group.bench_with_input(
            BenchmarkId::new("crate_encode_copying", partitions),
            &response,
            |b, response| b.iter(|| crate_encode(VERSION, black_box(response))),
        );
    }
    group.finish();
}

criterion_group!(benches, bench_decode_produce, bench_fetch_encode);
criterion_main!(benches);
