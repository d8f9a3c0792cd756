//! benches/cleaner: throughput of one log-cleaner pass (`PartitionLog::clean`) over a compacted
//! log of keyed 1 KiB records in batches of 16, uncompressed and lz4, with 1,000 distinct keys (so
//! almost every record is superseded). The figure is input bytes cleaned per second: read, map,
//! rewrite, fdatasync and swap. Each timed pass starts from a freshly written, fully dirty log
//! (written outside the timing).
//!
//! Sizes are full only under `cargo bench` (`--bench` in the arguments): 64 MiB; under `cargo test
//! --all-targets` criterion runs each bench once on 2 MiB. Override with CLEANER_BENCH_LOG_MIB.

use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use compio::runtime::Runtime;
use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use kafka_protocol::indexmap::IndexMap;
use kafka_protocol::records::{
    Compression, Record, RecordBatchEncoder, RecordEncodeOptions, TimestampType,
};
use ringbroker::storage::cleaner::{CleanerLimits, CompactionConfig};
use ringbroker::storage::{LogConfig, PartitionLog};

const RECORDS_PER_BATCH: usize = 16;
const VALUE_BYTES: usize = 1024;
const KEYS: usize = 1000;

fn log_bytes() -> u64 {
    let full = std::env::args().any(|argument| argument == "--bench");
    std::env::var("CLEANER_BENCH_LOG_MIB")
        .ok()
        .and_then(|value| value.parse().ok())
        .unwrap_or(if full { 64 } else { 2 })
        << 20
}

fn config() -> LogConfig {
    LogConfig {
        segment_bytes: 8 << 20,
        retention_ms: None,
        compaction: CompactionConfig {
            compact: true,
            delete: false,
            min_cleanable_dirty_ratio: 0.0,
            ..CompactionConfig::default()
        },
        ..LogConfig::default()
    }
}

fn batch(first_key: usize, timestamp: i64, compression: Compression) -> Bytes {
    let value = Bytes::from(vec![b'v'; VALUE_BYTES]);
    let records: Vec<Record> = (0..RECORDS_PER_BATCH)
        .map(|index| Record {
            transactional: false,
            control: false,
            delete_horizon: false,
            partition_leader_epoch: 0,
            producer_id: -1,
            producer_epoch: -1,
            timestamp_type: TimestampType::Creation,
            offset: index as i64,
            sequence: index as i32 - 1,
            timestamp,
            key: Some(Bytes::from(format!("key-{}", (first_key + index) % KEYS))),
            value: Some(value.clone()),
            headers: IndexMap::new(),
        })
        .collect();
    let mut buf = BytesMut::new();
    RecordBatchEncoder::encode(
        &mut buf,
        &records,
        &RecordEncodeOptions {
            version: 2,
            compression,
        },
    )
    .expect("encode");
    buf.freeze()
}

/// Writes a fully dirty compacted log of about `bytes` (all segments closed and durable).
async fn fill(dir: &std::path::Path, bytes: u64, compression: Compression) -> (PartitionLog, u64) {
    let log = PartitionLog::open(dir, config()).await.expect("open");
    let now = 1_000_000;
    let mut first_key = 0;
    // Bounded by `bytes`: every append adds at least one batch.
    while log.size_bytes() < bytes {
        log.append(batch(first_key, now, compression), now)
            .await
            .expect("append");
        first_key += RECORDS_PER_BATCH;
    }
    log.roll(now).await.expect("roll");
    log.wait_durable(log.log_end_offset()).await.expect("sync");
    let size = log.size_bytes();
    (log, size)
}

fn clean_pass(c: &mut Criterion) {
    let runtime = Runtime::new().expect("runtime");
    let bytes = log_bytes();
    let mut group = c.benchmark_group("cleaner");
    group.sample_size(10);
    group.measurement_time(Duration::from_secs(10));
    for (name, compression) in [("none", Compression::None), ("lz4", Compression::Lz4)] {
        // Throughput is counted in the bytes of the log before cleaning.
        let probe = tempfile::tempdir().expect("temp dir");
        let input = runtime.block_on(async {
            let (log, size) = fill(probe.path(), bytes, compression).await;
            log.close().await.expect("close");
            size
        });
        group.throughput(Throughput::Bytes(input));
        group.bench_function(format!("pass_1KiB_records_{name}"), |b| {
            b.iter_custom(|iters| {
                let mut total = Duration::ZERO;
                for _ in 0..iters {
                    let dir = tempfile::tempdir().expect("temp dir");
                    total += runtime.block_on(async {
                        let (log, _) = fill(dir.path(), bytes, compression).await;
                        let started = Instant::now();
                        let outcome = log
                            .clean(2_000_000, 0, CleanerLimits::default())
                            .await
                            .expect("clean")
                            .expect("a pass ran");
                        let elapsed = started.elapsed();
                        assert!(outcome.records_removed > 0);
                        log.close().await.expect("close");
                        elapsed
                    });
                }
                total
            })
        });
    }
    group.finish();
}

criterion_group!(benches, clean_pass);
criterion_main!(benches);
