//! The log cleaner at the storage level: the latest record per key survives with its offset,
//! timestamp, headers and codec; tombstones go after `delete.retention.ms`; an idempotent producer's
//! state survives a rebuild from the cleaned log; a full offset map cleans a prefix; a crash at every
//! file operation of the swap leaves a valid log; appends and reads go on during cleaning; and a
//! compacted log refuses records without a key.

mod storage_support;

use std::collections::BTreeMap;

use bytes::{Bytes, BytesMut};
use kafka_protocol::indexmap::IndexMap;
use kafka_protocol::protocol::StrBytes;
use kafka_protocol::records::{
    Compression, Record, RecordBatchDecoder, RecordBatchEncoder, RecordEncodeOptions, TimestampType,
};
use ringbroker::storage::cleaner::{CleanerLimits, CompactionConfig};
use ringbroker::storage::{
    AppendError, Disk, Fault, FaultInjector, IoKind, LogConfig, PartitionLog,
};
use storage_support::{run, split_batches};

const NOW_MS: i64 = 1_000_000;

fn compact_config() -> LogConfig {
    LogConfig {
        segment_bytes: 4 * 1024,
        index_interval_bytes: 256,
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

/// One record as the tests write and read it.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Rec {
    offset: i64,
    key: Option<Vec<u8>>,
    value: Option<Vec<u8>>,
    timestamp: i64,
    headers: Vec<(String, Vec<u8>)>,
}

/// A client batch of keyed records (`None` value = tombstone), with a header on each record.
fn keyed_batch(
    records: &[(&str, Option<String>)],
    timestamp: i64,
    compression: Compression,
    producer: Option<(i64, i16, i32)>,
) -> Bytes {
    let (producer_id, producer_epoch, base_sequence) = producer.unwrap_or((-1, -1, -1));
    let records: Vec<Record> = records
        .iter()
        .enumerate()
        .map(|(index, (key, value))| {
            let mut headers = IndexMap::new();
            headers.insert(
                StrBytes::from_static_str("h"),
                Some(Bytes::from(format!("hdr-{key}"))),
            );
            Record {
                transactional: false,
                control: false,
                delete_horizon: false,
                partition_leader_epoch: 0,
                producer_id,
                producer_epoch,
                timestamp_type: TimestampType::Creation,
                offset: index as i64,
                // The encoder keeps records in one batch while offset - sequence stays constant;
                // the header carries the first record's (-1 without a producer).
                sequence: base_sequence + index as i32,
                timestamp: timestamp + index as i64,
                key: Some(Bytes::from(key.to_string())),
                value: value.clone().map(Bytes::from),
                headers,
            }
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
    .unwrap();
    buf.freeze()
}

/// Every record below the high watermark, walking batches; also checks that batch offsets are
/// contiguous from the first segment to the log end.
async fn read_all(log: &PartitionLog) -> (Vec<Rec>, Vec<u16>) {
    let mut out = Vec::new();
    let mut codecs = Vec::new();
    let mut next = log.log_start_offset();
    while next < log.high_watermark() {
        let bytes = log.read_copy(next, 1 << 20, true).await.unwrap();
        let (batches, _) = split_batches(&bytes);
        assert!(!batches.is_empty(), "nothing at offset {next}");
        for batch in batches {
            assert!(
                batch.base_offset <= next && next <= batch.last_offset || batch.base_offset == next,
                "gap at {next}: batch {}..{}",
                batch.base_offset,
                batch.last_offset
            );
            codecs.push(u16::from_be_bytes([batch.bytes[21], batch.bytes[22]]) & 7);
            let mut raw = Bytes::from(batch.bytes.clone());
            let set = RecordBatchDecoder::decode(&mut raw).unwrap();
            for record in set.records {
                out.push(Rec {
                    offset: record.offset,
                    key: record.key.map(|k| k.to_vec()),
                    value: record.value.map(|v| v.to_vec()),
                    timestamp: record.timestamp,
                    headers: record
                        .headers
                        .iter()
                        .map(|(k, v)| (k.to_string(), v.clone().unwrap_or_default().to_vec()))
                        .collect(),
                });
            }
            next = batch.last_offset + 1;
        }
    }
    assert_eq!(next, log.log_end_offset());
    (out, codecs)
}

/// Appends `rounds` batches of 5 records over `keys` keys; returns every record written.
async fn write_updates(
    log: &PartitionLog,
    rounds: usize,
    keys: usize,
    compression: Compression,
) -> Vec<Rec> {
    let mut written = Vec::new();
    for round in 0..rounds {
        let records: Vec<(String, Option<String>)> = (0..5)
            .map(|i| {
                let key = format!("k{}", (round * 5 + i) % keys);
                (key, Some(format!("value-{round}-{i}-{}", "x".repeat(40))))
            })
            .collect();
        let refs: Vec<(&str, Option<String>)> = records
            .iter()
            .map(|(k, v)| (k.as_str(), v.clone()))
            .collect();
        let timestamp = NOW_MS - 100_000 + round as i64 * 10;
        let info = log
            .append(keyed_batch(&refs, timestamp, compression, None), NOW_MS)
            .await
            .unwrap();
        for (i, (key, value)) in records.into_iter().enumerate() {
            written.push(Rec {
                offset: info.base_offset + i as i64,
                key: Some(key.clone().into_bytes()),
                value: value.map(String::into_bytes),
                timestamp: timestamp + i as i64,
                headers: vec![("h".into(), format!("hdr-{key}").into_bytes())],
            });
        }
    }
    log.roll(NOW_MS).await.unwrap();
    log.wait_durable(log.log_end_offset()).await.unwrap();
    // A tick moves the recovery checkpoint past the rolled segment.
    log.tick(NOW_MS).await.unwrap();
    written
}

/// The records that must survive cleaning everything below `end`: the latest per key below `end`,
/// and everything at or above it.
fn expected_after_clean(written: &[Rec], end: i64) -> Vec<Rec> {
    let mut latest: BTreeMap<Vec<u8>, i64> = BTreeMap::new();
    for record in written.iter().filter(|r| r.offset < end) {
        latest.insert(record.key.clone().unwrap(), record.offset);
    }
    written
        .iter()
        .filter(|r| r.offset >= end || latest[r.key.as_ref().unwrap()] == r.offset)
        .cloned()
        .collect()
}

#[test]
fn cleaning_keeps_the_latest_record_per_key_with_its_offset_for_every_codec() {
    for compression in [
        Compression::None,
        Compression::Gzip,
        Compression::Snappy,
        Compression::Lz4,
        Compression::Zstd,
    ] {
        let dir = tempfile::tempdir().unwrap();
        run(async {
            let log = PartitionLog::open(dir.path(), compact_config())
                .await
                .unwrap();
            let written = write_updates(&log, 60, 7, compression).await;
            let end = log.log_end_offset();
            let size_before = log.size_bytes();
            let outcome = log
                .clean(NOW_MS, 0, CleanerLimits::default())
                .await
                .unwrap()
                .expect("a pass ran");
            assert!(outcome.cleaned_segments > 0, "{compression:?}");
            assert_eq!(outcome.first_dirty_offset, end);
            assert!(log.size_bytes() < size_before / 2, "{compression:?}");
            let (records, codecs) = read_all(&log).await;
            assert_eq!(
                records,
                expected_after_clean(&written, end),
                "{compression:?}"
            );
            // Rebuilt batches keep their codec (empty fillers are uncompressed).
            let codec = compression as u16;
            assert!(codecs.iter().all(|c| *c == codec || *c == 0));
            assert!(codecs.contains(&codec));

            // Cleaned again: nothing dirty, nothing to do.
            assert!(
                log.clean(NOW_MS, outcome.first_dirty_offset, CleanerLimits::default())
                    .await
                    .unwrap()
                    .is_none()
            );
            // The cleaned log reopens the same, after a clean close and after an unclean stop.
            log.close().await.unwrap();
            let log = PartitionLog::open(dir.path(), compact_config())
                .await
                .unwrap();
            assert_eq!(read_all(&log).await.0, expected_after_clean(&written, end));
            drop(log);
            let log = PartitionLog::open(dir.path(), compact_config())
                .await
                .unwrap();
            assert_eq!(read_all(&log).await.0, expected_after_clean(&written, end));
            // Appends continue after the cleaned data.
            log.append(
                keyed_batch(&[("k0", Some("new".into()))], NOW_MS, compression, None),
                NOW_MS,
            )
            .await
            .unwrap();
            log.close().await.unwrap();
        });
    }
}

#[test]
fn tombstones_stay_for_delete_retention_then_go() {
    let dir = tempfile::tempdir().unwrap();
    run(async {
        let config = LogConfig {
            compaction: CompactionConfig {
                delete_retention_ms: 5_000,
                ..compact_config().compaction
            },
            ..compact_config()
        };
        let log = PartitionLog::open(dir.path(), config).await.unwrap();
        // The tombstone's age is judged by its segment's last write (wall clock).
        let wall = storage_now_ms();
        for round in 0..20 {
            let value = Some(format!("v{round}-{}", "y".repeat(100)));
            log.append(
                keyed_batch(
                    &[("a", value.clone()), ("b", value)],
                    wall,
                    Compression::None,
                    None,
                ),
                wall,
            )
            .await
            .unwrap();
        }
        // "a" is deleted.
        log.append(
            keyed_batch(&[("a", None)], wall, Compression::None, None),
            wall,
        )
        .await
        .unwrap();
        log.roll(wall).await.unwrap();
        log.wait_durable(log.log_end_offset()).await.unwrap();

        // Right after writing: the tombstone stays, every older "a" is gone, and the pass says when
        // it may go (so the broker runs a pass then even without new data).
        let outcome = log
            .clean(wall + 1_000, 0, CleanerLimits::default())
            .await
            .unwrap()
            .unwrap();
        let due = outcome.tombstones_due_ms.expect("a tombstone was kept");
        assert!(due > wall + 1_000 && due <= wall + 5_001 + 1_000, "{due}");
        let (records, _) = read_all(&log).await;
        let a: Vec<&Rec> = records
            .iter()
            .filter(|r| r.key.as_deref() == Some(b"a"))
            .collect();
        assert_eq!(a.len(), 1);
        assert_eq!(a[0].value, None);
        assert_eq!(
            records
                .iter()
                .filter(|r| r.key.as_deref() == Some(b"b"))
                .count(),
            1
        );

        // After delete.retention.ms the tombstone goes too; "b" stays.
        log.clean(wall + 10_000, 0, CleanerLimits::default())
            .await
            .unwrap();
        let (records, _) = read_all(&log).await;
        assert!(
            records.iter().all(|r| r.key.as_deref() == Some(b"b")),
            "{records:?}"
        );
        assert_eq!(records.len(), 1);
        log.close().await.unwrap();
    });
}

fn storage_now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64
}

#[test]
fn producer_state_survives_a_rebuild_from_the_cleaned_log() {
    let dir = tempfile::tempdir().unwrap();
    run(async {
        let log = PartitionLog::open(dir.path(), compact_config())
            .await
            .unwrap();
        // Wall-clock timestamps: the reopen below expires producers by them.
        let wall = storage_now_ms();
        let producer = (4242i64, 3i16);
        let mut sequence = 0;
        let mut last_batch = Bytes::new();
        let mut last_info = None;
        for round in 0..40 {
            let value = Some(format!("v{round}-{}", "z".repeat(60)));
            let batch = keyed_batch(
                &[("same", value.clone()), ("same", value)],
                wall,
                Compression::None,
                Some((producer.0, producer.1, sequence)),
            );
            last_info = Some(log.append(batch.clone(), wall).await.unwrap());
            last_batch = batch;
            sequence += 2;
        }
        log.roll(wall).await.unwrap();
        log.wait_durable(log.log_end_offset()).await.unwrap();
        let before = log.producer_entry(producer.0).unwrap();
        log.clean(wall + 1_000, 0, CleanerLimits::default())
            .await
            .unwrap()
            .unwrap();
        log.close().await.unwrap();
        // Force a rebuild from the log: no snapshot, no clean marker.
        for entry in std::fs::read_dir(dir.path()).unwrap() {
            let path = entry.unwrap().path();
            let name = path.file_name().unwrap().to_string_lossy().into_owned();
            if name.ends_with(".snapshot") || name == ".kafka_cleanshutdown" {
                std::fs::remove_file(path).unwrap();
            }
        }
        let log = PartitionLog::open(dir.path(), compact_config())
            .await
            .unwrap();
        let after = log.producer_entry(producer.0).unwrap();
        assert_eq!(after.epoch, before.epoch);
        assert_eq!(after.batches, before.batches);
        // A retry of the last batch is still recognised as a duplicate.
        let retry = log.append(last_batch, wall).await.unwrap();
        assert!(retry.duplicate);
        assert_eq!(retry.base_offset, last_info.unwrap().base_offset);
        // Only the latest "same" survives.
        let (records, _) = read_all(&log).await;
        assert_eq!(records.len(), 1);
        log.close().await.unwrap();
    });
}

#[test]
fn a_small_offset_map_cleans_a_prefix_and_the_next_pass_the_rest() {
    let dir = tempfile::tempdir().unwrap();
    run(async {
        let log = PartitionLog::open(dir.path(), compact_config())
            .await
            .unwrap();
        // Many distinct keys so the map fills.
        let written = write_updates(&log, 80, 400, Compression::None).await;
        let end = log.log_end_offset();
        let limits = CleanerLimits {
            dedupe_buffer_bytes: 60 * 52,
            io_bytes_per_second: None,
        };
        let mut first_dirty = 0;
        let mut passes = 0;
        while first_dirty < end {
            let outcome = log
                .clean(NOW_MS, first_dirty, limits)
                .await
                .unwrap()
                .unwrap();
            assert!(outcome.first_dirty_offset > first_dirty);
            first_dirty = outcome.first_dirty_offset;
            passes += 1;
            assert!(passes < 100);
        }
        assert!(passes > 1, "the map never filled");
        let (records, _) = read_all(&log).await;
        assert_eq!(records, expected_after_clean(&written, end));
        log.close().await.unwrap();
    });
}

#[test]
fn a_crash_at_any_step_of_cleaning_leaves_a_valid_log() {
    let mut crashes = 0;
    for kind in [
        IoKind::Write,
        IoKind::Sync,
        IoKind::Rename,
        IoKind::Open,
        IoKind::Remove,
    ] {
        for skip in 0..12u64 {
            let dir = tempfile::tempdir().unwrap();
            let fired = run(async {
                let log = PartitionLog::open(dir.path(), compact_config())
                    .await
                    .unwrap();
                let written = write_updates(&log, 30, 5, Compression::Lz4).await;
                let end = log.log_end_offset();
                log.close().await.unwrap();
                let faults = FaultInjector::new();
                let log = PartitionLog::open_with_disk(
                    dir.path(),
                    compact_config(),
                    Disk::with_faults(faults.clone()),
                )
                .await
                .unwrap();
                faults.inject(kind, skip, Fault::Crash { keep_bytes: 100 }, 1);
                let result = log.clean(NOW_MS, 0, CleanerLimits::default()).await;
                let fired = faults.crashed();
                if !fired {
                    result.unwrap();
                }
                drop(log);
                let log = PartitionLog::open(dir.path(), compact_config())
                    .await
                    .unwrap();
                assert_eq!(log.log_end_offset(), end, "{kind:?} {skip}");
                let (records, _) = read_all(&log).await;
                // Every record read is one that was written, unchanged; every latest value is there.
                for record in &records {
                    assert!(written.contains(record), "{kind:?} {skip}: {record:?}");
                }
                for latest in expected_after_clean(&written, end) {
                    assert!(
                        records.contains(&latest),
                        "{kind:?} {skip}: lost {latest:?}"
                    );
                }
                // No cleaner leftovers.
                for entry in std::fs::read_dir(dir.path()).unwrap() {
                    let name = entry.unwrap().file_name().to_string_lossy().into_owned();
                    assert!(
                        !name.ends_with(".cleaned") && !name.ends_with(".swap"),
                        "{kind:?} {skip}: {name} left behind"
                    );
                }
                log.close().await.unwrap();
                fired
            });
            if !fired {
                break;
            }
            crashes += 1;
        }
    }
    assert!(crashes >= 10, "only {crashes} crash points were reached");
}

#[test]
fn appends_and_reads_continue_while_the_cleaner_runs() {
    let dir = tempfile::tempdir().unwrap();
    run(async {
        let log = std::rc::Rc::new(
            PartitionLog::open(dir.path(), compact_config())
                .await
                .unwrap(),
        );
        let written = write_updates(&log, 200, 9, Compression::Gzip).await;
        let end = log.log_end_offset();
        let cleaner_log = log.clone();
        let cleaner = compio::runtime::spawn(async move {
            cleaner_log
                .clean(
                    NOW_MS,
                    0,
                    CleanerLimits {
                        dedupe_buffer_bytes: 1 << 20,
                        // Slow enough that the appends below interleave with it.
                        io_bytes_per_second: Some(2 << 20),
                    },
                )
                .await
        });
        let mut appended = 0;
        for round in 0..50 {
            let info = log
                .append(
                    keyed_batch(
                        &[("live", Some(format!("l{round}")))],
                        NOW_MS,
                        Compression::None,
                        None,
                    ),
                    NOW_MS,
                )
                .await
                .unwrap();
            assert_eq!(info.base_offset, end + round);
            appended += 1;
            // A read of the oldest data works at any time.
            let bytes = log.read_copy(0, 64 * 1024, true).await.unwrap();
            assert!(!split_batches(&bytes).0.is_empty());
        }
        let outcome = cleaner.await.unwrap().unwrap().unwrap();
        assert!(outcome.cleaned_segments > 0);
        let (records, _) = read_all(&log).await;
        let below: Vec<Rec> = records.iter().filter(|r| r.offset < end).cloned().collect();
        assert_eq!(below, expected_after_clean(&written, end));
        assert_eq!(records.len() - below.len(), appended);
        log.close().await.unwrap();
    });
}

#[test]
fn a_compacted_log_refuses_records_without_a_key() {
    let dir = tempfile::tempdir().unwrap();
    run(async {
        let log = PartitionLog::open(dir.path(), compact_config())
            .await
            .unwrap();
        let keyless = Bytes::from(ringbroker::storage::testing::build_batch(3, 10, NOW_MS, 1));
        match log.append(keyless.clone(), NOW_MS).await {
            Err(AppendError::InvalidRecord(message)) => {
                assert!(message.contains("Compacted topic cannot accept message without key"))
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(log.log_end_offset(), 0);
        // The same batch is fine once the topic deletes instead.
        log.set_config(LogConfig {
            compaction: CompactionConfig::default(),
            ..compact_config()
        });
        log.append(keyless, NOW_MS).await.unwrap();
        log.close().await.unwrap();
    });
}

/// The cleaner under a descriptor cache far smaller than the log's segment count: a read before the
/// pass fills the cache with the old files' descriptors (and evicts most of them), the swaps replace
/// the segments, and reads and a scrub pass afterwards must see only the cleaned files; a stale
/// descriptor, or a position from the old file's index applied to the new one, would show as wrong
/// records or as damage.
#[test]
fn cleaning_under_a_small_descriptor_cache_serves_only_the_cleaned_files() {
    use ringbroker::storage::descriptors::{self, MIN_CAPACITY};
    let dir = tempfile::tempdir().unwrap();
    run(async {
        // This test thread's cache only (the cache is per shard thread).
        descriptors::set_capacity(MIN_CAPACITY);
        let log = PartitionLog::open(dir.path(), compact_config())
            .await
            .unwrap();
        let written = write_updates(&log, 300, 7, Compression::None).await;
        assert!(
            log.segment_count() > MIN_CAPACITY,
            "{} segments",
            log.segment_count()
        );
        let end = log.log_end_offset();
        assert_eq!(read_all(&log).await.0, written);
        assert!(descriptors::cached_count() <= MIN_CAPACITY);
        let outcome = log
            .clean(NOW_MS, 0, CleanerLimits::default())
            .await
            .unwrap()
            .expect("a pass ran");
        assert!(outcome.cleaned_segments > 0);
        assert_eq!(read_all(&log).await.0, expected_after_clean(&written, end));
        assert!(descriptors::cached_count() <= MIN_CAPACITY);
        let mut cursor = ringbroker::storage::scrub::ScrubCursor::default();
        // Bounded: a 1 MiB budget per step over about 150 KiB of segments.
        for steps in 0.. {
            assert!(steps < 1000, "the scrub pass must end");
            if log
                .scrub_step(&mut cursor, 1 << 20)
                .await
                .unwrap()
                .pass_finished
            {
                break;
            }
        }
        assert_eq!(log.damaged_batches_found(), 0);
        log.close().await.unwrap();
        let log = PartitionLog::open(dir.path(), compact_config())
            .await
            .unwrap();
        assert_eq!(read_all(&log).await.0, expected_after_clean(&written, end));
        log.close().await.unwrap();
        descriptors::set_capacity(descriptors::DEFAULT_CAPACITY);
    });
}
