//! Criterion benches for the native driver's hot paths: building a RecordBatch, encoding a
//! Produce request, and decoding a Fetch response down to each record's timestamp. They show
//! the load generator's per-record cost, which must stay far below the broker's.

use std::hint::black_box;

use bytes::{Bytes, BytesMut};
use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use kafka_protocol::messages::fetch_response::{FetchableTopicResponse, PartitionData};
use kafka_protocol::messages::{FetchResponse, TopicName};
use kafka_protocol::protocol::{Encodable, StrBytes};
use ringbench::driver::filler_bytes;
use ringbench::native::decode_fetch_response;
use ringbench::wire::{
    BatchBuilder, PartitionBatch, RequestHeaderFields, TopicBatches, encode_produce_request,
};
use ringbench::workload::Compression;

const RECORD_BYTES: usize = 1024;
const RECORDS_PER_BATCH: usize = 16;
const PARTITIONS: usize = 4;

fn sealed_batch(filler: &[u8], base_offset: i64) -> Vec<u8> {
    let mut b = BatchBuilder::new();
    for i in 0..RECORDS_PER_BATCH {
        b.append(
            0,
            1_700_000_000_000_000 + i as u64,
            None,
            RECORD_BYTES,
            filler,
            &[],
        );
    }
    let mut out = Vec::new();
    b.seal_into(Compression::None, &mut out)
        .expect("uncompressed seal cannot fail");
    out[0..8].copy_from_slice(&base_offset.to_be_bytes());
    out
}

fn bench_produce(c: &mut Criterion) {
    let filler = filler_bytes(1, RECORD_BYTES);
    let mut group = c.benchmark_group("produce");
    group.throughput(Throughput::Bytes((RECORD_BYTES * RECORDS_PER_BATCH) as u64));
    group.bench_function("build and seal a 16 x 1 KiB batch", |bench| {
        let mut builder = BatchBuilder::new();
        let mut out = Vec::with_capacity(32 * 1024);
        bench.iter(|| {
            for i in 0..RECORDS_PER_BATCH {
                builder.append(
                    0,
                    1_700_000_000_000_000 + i as u64,
                    None,
                    RECORD_BYTES,
                    &filler,
                    &[],
                );
            }
            out.clear();
            builder
                .seal_into(Compression::None, &mut out)
                .expect("seal");
            black_box(builder.take_intended());
            black_box(&out);
        })
    });
    group.finish();

    let batches: Vec<Vec<u8>> = (0..PARTITIONS).map(|_| sealed_batch(&filler, 0)).collect();
    let mut group = c.benchmark_group("produce");
    group.throughput(Throughput::Bytes(
        batches.iter().map(|b| b.len() as u64).sum(),
    ));
    group.bench_function(
        "encode a produce request (4 partitions x 16 KiB)",
        |bench| {
            let mut out = Vec::with_capacity(128 * 1024);
            bench.iter(|| {
                out.clear();
                let parts: Vec<PartitionBatch<'_>> = batches
                    .iter()
                    .enumerate()
                    .map(|(p, b)| PartitionBatch {
                        partition: p as i32,
                        records: b,
                    })
                    .collect();
                let topics = [TopicBatches {
                    topic: "ringbench-topic-0",
                    partitions: &parts,
                }];
                let header = RequestHeaderFields {
                    api_version: 9,
                    correlation_id: 7,
                    client_id: "ringbench",
                };
                encode_produce_request(&mut out, &header, -1, 30_000, &topics).expect("encode");
                black_box(&out);
            })
        },
    );
    group.finish();
}

fn bench_fetch(c: &mut Criterion) {
    let filler = filler_bytes(2, RECORD_BYTES);
    let version = 12;
    let partitions = (0..PARTITIONS as i32)
        .map(|p| {
            let mut records = sealed_batch(&filler, 0);
            records.extend_from_slice(&sealed_batch(&filler, RECORDS_PER_BATCH as i64));
            PartitionData::default()
                .with_partition_index(p)
                .with_high_watermark(2 * RECORDS_PER_BATCH as i64)
                .with_records(Some(Bytes::from(records)))
        })
        .collect();
    let response = FetchResponse::default().with_responses(vec![
        FetchableTopicResponse::default()
            .with_topic(TopicName(StrBytes::from_static_str("ringbench-topic-0")))
            .with_partitions(partitions),
    ]);
    let mut body = BytesMut::new();
    response
        .encode(&mut body, version)
        .expect("encode fetch response");
    let body = body.freeze();
    let mut group = c.benchmark_group("fetch");
    group.throughput(Throughput::Bytes(body.len() as u64));
    group.bench_function(
        "decode a fetch response (4 partitions x 32 x 1 KiB)",
        |bench| {
            bench.iter(|| {
                let mut sum = 0u64;
                let (records, _) = decode_fetch_response(body.clone(), version, &mut |ts| {
                    sum = sum.wrapping_add(ts)
                })
                .expect("decode");
                assert_eq!(records, (PARTITIONS * 2 * RECORDS_PER_BATCH) as u64);
                black_box(sum);
            })
        },
    );
    group.finish();
}

criterion_group!(benches, bench_produce, bench_fetch);
criterion_main!(benches);
