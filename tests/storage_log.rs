//! storage_log: behaviour tests of the partition log through its public API: append, read ranges,
//! the high watermark, group commit, roll, retention, timestamp lookup, close/reopen, recovery of torn
//! tails and damaged indexes, and partition directories.

mod storage_support;

use std::rc::Rc;

use ringbroker::storage::{
    AppendError, LogConfig, PartitionLog, ReadError, list_partition_dirs, read_partition_metadata,
    write_partition_metadata,
};
use storage_support::{as_stored, batch, run, small_config, split_batches};

#[test]
fn append_assigns_offsets_and_reads_back_byte_identical() {
    let dir = tempfile::tempdir().unwrap();
    run(async {
        let log = PartitionLog::open(dir.path(), small_config())
            .await
            .unwrap();
        assert_eq!(
            (
                log.log_start_offset(),
                log.high_watermark(),
                log.log_end_offset()
            ),
            (0, 0, 0)
        );
        let first = batch(3, 20, 1_000, 1);
        let second = batch(5, 20, 2_000, 2);
        let info = log.append(first.clone(), 10).await.unwrap();
        assert_eq!(
            (info.base_offset, info.last_offset, info.log_start_offset),
            (0, 2, 0)
        );
        let info = log.append(second.clone(), 11).await.unwrap();
        assert_eq!((info.base_offset, info.last_offset), (3, 7));
        assert_eq!(log.high_watermark(), 8);
        assert_eq!(log.log_end_offset(), 8);

        let bytes = log.read_copy(0, 1 << 20, true).await.unwrap();
        let mut expected = as_stored(&first, 0);
        expected.extend(as_stored(&second, 3));
        assert_eq!(bytes.as_ref(), expected.as_slice());

        // An offset inside the second batch starts the range at that batch.
        let bytes = log.read_copy(5, 1 << 20, true).await.unwrap();
        assert_eq!(bytes.as_ref(), as_stored(&second, 3).as_slice());

        // At the high watermark: empty, no error. Past the log end: out of range.
        let slice = log.read(8, 1 << 20, true).await.unwrap();
        assert_eq!(slice.len, 0);
        assert!(matches!(
            log.read(9, 100, true).await,
            Err(ReadError::OffsetOutOfRange {
                offset: 9,
                log_start_offset: 0,
                log_end_offset: 8
            })
        ));
        assert!(matches!(
            log.read(-1, 100, true).await,
            Err(ReadError::OffsetOutOfRange { .. })
        ));
        log.close().await.unwrap();
    });
}

#[test]
fn several_batches_in_one_append_get_consecutive_offsets() {
    let dir = tempfile::tempdir().unwrap();
    run(async {
        let log = PartitionLog::open(dir.path(), small_config())
            .await
            .unwrap();
        let mut records = batch(2, 10, 0, 1).to_vec();
        records.extend_from_slice(&batch(4, 10, 0, 2));
        let info = log.append(records.into(), 0).await.unwrap();
        assert_eq!((info.base_offset, info.last_offset), (0, 5));
        let (batches, partial) = split_batches(&log.read_copy(0, 1 << 20, true).await.unwrap());
        assert_eq!(partial, 0);
        assert_eq!(
            batches
                .iter()
                .map(|b| (b.base_offset, b.last_offset))
                .collect::<Vec<_>>(),
            vec![(0, 1), (2, 5)]
        );
    });
}

#[test]
fn bad_batches_are_refused_with_typed_errors_and_nothing_is_written() {
    let dir = tempfile::tempdir().unwrap();
    run(async {
        let config = LogConfig {
            max_message_bytes: 500,
            ..small_config()
        };
        let log = PartitionLog::open(dir.path(), config).await.unwrap();
        let mut corrupt = batch(2, 10, 0, 1).to_vec();
        let last = corrupt.len() - 1;
        corrupt[last] ^= 0xff;
        assert!(matches!(
            log.append(corrupt.into(), 0).await,
            Err(AppendError::CorruptMessage(_))
        ));
        assert!(matches!(
            log.append(batch(10, 100, 0, 1), 0).await,
            Err(AppendError::MessageTooLarge { max: 500, .. })
        ));
        assert!(matches!(
            log.append(bytes::Bytes::new(), 0).await,
            Err(AppendError::InvalidRecord(_))
        ));
        assert_eq!(log.log_end_offset(), 0);
        assert_eq!(log.size_bytes(), 0);
    });
}

#[test]
fn read_limits_follow_kafka_rules() {
    let dir = tempfile::tempdir().unwrap();
    run(async {
        let log = PartitionLog::open(dir.path(), small_config())
            .await
            .unwrap();
        let first = batch(4, 50, 0, 1);
        log.append(first.clone(), 0).await.unwrap();
        log.append(batch(4, 50, 0, 2), 0).await.unwrap();
        let first_len = first.len() as u32;

        // A limit below the first batch: whole first batch with min_one_batch, nothing without.
        let slice = log.read(0, 10, true).await.unwrap();
        assert_eq!((slice.position, slice.len), (0, first_len));
        let slice = log.read(0, 10, false).await.unwrap();
        assert_eq!(slice.len, 0);
        // A limit inside the second batch: the range ends mid-batch, as Kafka's does.
        let slice = log.read(0, first_len + 7, false).await.unwrap();
        assert_eq!(slice.len, first_len + 7);
        let (batches, partial) =
            split_batches(&log.read_copy(0, first_len + 7, false).await.unwrap());
        assert_eq!((batches.len(), partial), (1, 7));
    });
}

#[test]
fn segments_roll_by_size_and_reads_never_cross_a_segment() {
    let dir = tempfile::tempdir().unwrap();
    run(async {
        let log = PartitionLog::open(dir.path(), small_config())
            .await
            .unwrap();
        let mut expected = Vec::new();
        for seed in 0..40 {
            let client = batch(4, 400, seed as i64, seed);
            let info = log.append(client.clone(), 0).await.unwrap();
            expected.push((info.base_offset, as_stored(&client, info.base_offset)));
        }
        assert!(log.segment_count() > 3, "16 KiB segments must have rolled");
        let bases = log.segment_base_offsets();
        for (offset, stored) in &expected {
            let slice = log.read(*offset, 1 << 20, true).await.unwrap();
            assert_eq!(
                slice.file.base_offset(),
                *bases.iter().rev().find(|b| *b <= offset).unwrap()
            );
            let bytes = log
                .read_copy(*offset, stored.len() as u32, true)
                .await
                .unwrap();
            assert_eq!(bytes.as_ref(), stored.as_slice());
            let (batches, _) = split_batches(&log.read_copy(*offset, 1 << 20, true).await.unwrap());
            let next_base = bases
                .iter()
                .find(|b| *b > offset)
                .copied()
                .unwrap_or(i64::MAX);
            assert!(
                batches.iter().all(|b| b.last_offset < next_base),
                "read crossed a segment"
            );
        }
        // Files carry Kafka's names.
        let name = format!("{:020}.log", bases[1]);
        assert!(dir.path().join(&name).exists());
        assert!(dir.path().join(format!("{:020}.index", bases[1])).exists());
        assert!(
            dir.path()
                .join(format!("{:020}.timeindex", bases[1]))
                .exists()
        );
    });
}

#[test]
fn close_and_reopen_keeps_everything_and_skips_the_scan() {
    let dir = tempfile::tempdir().unwrap();
    let mut expected = Vec::new();
    run(async {
        let log = PartitionLog::open(dir.path(), small_config())
            .await
            .unwrap();
        for seed in 0..30 {
            let client = batch(3, 150, 1_000 + seed as i64, seed);
            let info = log.append(client.clone(), 0).await.unwrap();
            expected.push((info.base_offset, as_stored(&client, info.base_offset)));
        }
        log.close().await.unwrap();
        assert!(matches!(
            log.append(batch(1, 1, 0, 0), 0).await,
            Err(AppendError::Storage(_))
        ));
    });
    assert!(dir.path().join(".kafka_cleanshutdown").exists());
    run(async {
        let log = PartitionLog::open(dir.path(), small_config())
            .await
            .unwrap();
        assert!(
            !dir.path().join(".kafka_cleanshutdown").exists(),
            "marker removed on open"
        );
        assert_eq!(log.log_end_offset(), 90);
        assert_eq!(log.high_watermark(), 90);
        for (offset, stored) in &expected {
            let bytes = log
                .read_copy(*offset, stored.len() as u32, true)
                .await
                .unwrap();
            assert_eq!(bytes.as_ref(), stored.as_slice());
        }
        let info = log.append(batch(2, 10, 5_000, 99), 0).await.unwrap();
        assert_eq!(info.base_offset, 90);
    });
}

#[test]
fn unclean_stop_with_a_torn_tail_is_truncated_to_the_last_whole_batch() {
    let dir = tempfile::tempdir().unwrap();
    let mut expected = Vec::new();
    run(async {
        let log = PartitionLog::open(dir.path(), small_config())
            .await
            .unwrap();
        for seed in 0..10 {
            let client = batch(2, 100, 0, seed);
            let info = log.append(client.clone(), 0).await.unwrap();
            expected.push((info.base_offset, as_stored(&client, info.base_offset)));
        }
        // Dropped without close: an unclean stop.
    });
    // Tear the last batch: cut 5 bytes off the active segment.
    let active = std::fs::read_dir(dir.path())
        .unwrap()
        .filter_map(|entry| entry.ok().map(|entry| entry.path()))
        .filter(|path| path.extension().is_some_and(|ext| ext == "log"))
        .max()
        .unwrap();
    let length = std::fs::metadata(&active).unwrap().len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&active)
        .unwrap()
        .set_len(length - 5)
        .unwrap();
    run(async {
        let log = PartitionLog::open(dir.path(), small_config())
            .await
            .unwrap();
        assert_eq!(
            log.log_end_offset(),
            18,
            "the torn batch (offsets 18..19) is gone"
        );
        for (offset, stored) in &expected[..9] {
            let bytes = log
                .read_copy(*offset, stored.len() as u32, true)
                .await
                .unwrap();
            assert_eq!(bytes.as_ref(), stored.as_slice());
        }
        let info = log.append(batch(1, 1, 0, 0), 0).await.unwrap();
        assert_eq!(info.base_offset, 18, "offsets continue without a gap");
    });
}

#[test]
fn corrupt_unsynced_bytes_in_the_middle_are_cut_and_later_segments_quarantined() {
    let dir = tempfile::tempdir().unwrap();
    run(async {
        let log = PartitionLog::open(dir.path(), small_config())
            .await
            .unwrap();
        for seed in 0..40 {
            log.append(batch(2, 600, 0, seed), 0).await.unwrap();
        }
        assert!(log.segment_count() >= 3);
        // Dropped without any fdatasync: nothing here was acknowledged with acks=all.
    });
    let later_segments = std::fs::read_dir(dir.path())
        .unwrap()
        .filter(|entry| {
            let name = entry.as_ref().unwrap().file_name();
            let name = name.to_string_lossy();
            name.ends_with(".log") && name != format!("{:020}.log", 0)
        })
        .count();
    let first = dir.path().join(format!("{:020}.log", 0));
    let mut bytes = std::fs::read(&first).unwrap();
    bytes[3000] ^= 0x55;
    std::fs::write(&first, &bytes).unwrap();
    run(async {
        let log = PartitionLog::open(dir.path(), small_config())
            .await
            .unwrap();
        assert_eq!(
            log.segment_count(),
            1,
            "segments after the cut are set aside"
        );
        let end = log.log_end_offset();
        assert!(
            end > 0 && end < 10,
            "truncated at the damaged batch, got {end}"
        );
        let (batches, _) = split_batches(&log.read_copy(0, 1 << 20, true).await.unwrap());
        assert_eq!(batches.last().unwrap().last_offset, end - 1);
    });
    // Nothing was unlinked: the cut bytes and the later segments are in quarantine.
    let quarantined: Vec<String> = std::fs::read_dir(dir.path().join("quarantine"))
        .unwrap()
        .map(|entry| entry.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    let moved_logs = quarantined
        .iter()
        .filter(|name| name.contains(".log.") && !name.starts_with(&format!("{:020}", 0)))
        .count();
    assert_eq!(moved_logs, later_segments, "{quarantined:?}");
    assert!(
        quarantined
            .iter()
            .any(|name| name.starts_with(&format!("{:020}.log.", 0))),
        "{quarantined:?}"
    );
}

#[test]
fn damaged_index_files_are_rebuilt() {
    let dir = tempfile::tempdir().unwrap();
    let mut expected = Vec::new();
    run(async {
        let log = PartitionLog::open(dir.path(), small_config())
            .await
            .unwrap();
        for seed in 0..40 {
            let client = batch(2, 300, 0, seed);
            let info = log.append(client.clone(), 0).await.unwrap();
            expected.push((info.base_offset, as_stored(&client, info.base_offset)));
        }
        log.close().await.unwrap();
    });
    let index = dir.path().join(format!("{:020}.index", 0));
    assert!(
        std::fs::metadata(&index).unwrap().len() > 0,
        "a closed segment has index entries"
    );
    std::fs::write(&index, [1, 2, 3]).unwrap();
    run(async {
        let log = PartitionLog::open(dir.path(), small_config())
            .await
            .unwrap();
        for (offset, stored) in &expected {
            let bytes = log
                .read_copy(*offset, stored.len() as u32, true)
                .await
                .unwrap();
            assert_eq!(bytes.as_ref(), stored.as_slice());
        }
    });
    assert_eq!(
        std::fs::metadata(&index).unwrap().len() % 8,
        0,
        "rebuilt index rewritten"
    );
}

#[test]
fn retention_by_bytes_and_by_time_deletes_old_segments_only() {
    let dir = tempfile::tempdir().unwrap();
    run(async {
        let log = PartitionLog::open(dir.path(), small_config())
            .await
            .unwrap();
        for seed in 0..60 {
            log.append(batch(2, 600, 1_000 + seed as i64, seed), 0)
                .await
                .unwrap();
        }
        let before = log.segment_count();
        assert!(before >= 4);
        // Nothing qualifies yet.
        assert_eq!(
            log.enforce_retention(2_000).await.unwrap().deleted_segments,
            0
        );

        log.set_config(LogConfig {
            retention_bytes: Some(40 * 1024),
            ..small_config()
        });
        let outcome = log.enforce_retention(2_000).await.unwrap();
        assert!(outcome.deleted_segments > 0);
        assert!(log.size_bytes() >= 40 * 1024 - 16 * 1024);
        assert_eq!(outcome.log_start_offset, log.log_start_offset());
        assert_eq!(log.log_start_offset(), log.segment_base_offsets()[0]);
        assert!(matches!(
            log.read(0, 100, true).await,
            Err(ReadError::OffsetOutOfRange { .. })
        ));

        log.set_config(LogConfig {
            retention_ms: Some(1_000),
            ..small_config()
        });
        // Every record timestamp is <= 1_059; at now = 10_000 all closed segments are expired.
        let outcome = log.enforce_retention(10_000).await.unwrap();
        assert!(outcome.deleted_segments > 0);
        assert_eq!(
            log.segment_count(),
            1,
            "the active segment is never deleted"
        );
        assert_eq!(log.log_start_offset(), log.segment_base_offsets()[0]);
    });
}

#[test]
fn a_reader_keeps_a_deleted_segment_readable() {
    let dir = tempfile::tempdir().unwrap();
    run(async {
        let log = PartitionLog::open(dir.path(), small_config())
            .await
            .unwrap();
        let first = batch(2, 300, 0, 1);
        log.append(first.clone(), 0).await.unwrap();
        for seed in 2..60 {
            log.append(batch(2, 300, 0, seed), 0).await.unwrap();
        }
        let slice = log.read(0, first.len() as u32, true).await.unwrap();
        log.set_config(LogConfig {
            retention_bytes: Some(1),
            ..small_config()
        });
        log.enforce_retention(0).await.unwrap();
        assert!(!slice.file.path().exists(), "retention unlinked the file");
        let mut buffer = vec![0u8; slice.len as usize];
        let read = nix_pread(&slice.file, &mut buffer, slice.position);
        assert_eq!(read, slice.len as usize);
        assert_eq!(buffer, as_stored(&first, 0));
    });
}

fn nix_pread(file: &ringbroker::storage::SegmentFile, buffer: &mut [u8], position: u64) -> usize {
    use std::os::fd::AsRawFd;
    // SAFETY: the descriptor is open for the lifetime of `file`, and `buffer` is valid for its length.
    let read = unsafe {
        libc::pread(
            file.as_raw_fd(),
            buffer.as_mut_ptr().cast(),
            buffer.len(),
            position as libc::off_t,
        )
    };
    usize::try_from(read).expect("pread failed")
}

#[test]
fn timestamp_lookup_finds_the_first_record_at_or_after() {
    let dir = tempfile::tempdir().unwrap();
    run(async {
        let log = PartitionLog::open(dir.path(), small_config())
            .await
            .unwrap();
        // Batch i has 3 records with timestamps 10_000 + 10 i + {0,1,2}.
        for seed in 0..50u64 {
            log.append(batch(3, 200, 10_000 + 10 * seed as i64, seed), 0)
                .await
                .unwrap();
        }
        assert_eq!(
            log.offset_for_timestamp(0).await.unwrap(),
            Some((0, 10_000))
        );
        assert_eq!(
            log.offset_for_timestamp(10_001).await.unwrap(),
            Some((1, 10_001))
        );
        assert_eq!(
            log.offset_for_timestamp(10_205).await.unwrap(),
            Some((63, 10_210))
        );
        assert_eq!(
            log.offset_for_timestamp(10_492).await.unwrap(),
            Some((149, 10_492))
        );
        assert_eq!(log.offset_for_timestamp(10_493).await.unwrap(), None);
        assert_eq!(log.max_timestamp(), (149, 10_492));
    });
}

#[test]
fn durable_high_watermark_only_covers_fsynced_data_and_group_commit_releases_everyone() {
    let dir = tempfile::tempdir().unwrap();
    run(async {
        let config = LogConfig {
            durable_high_watermark: true,
            ..small_config()
        };
        let log = Rc::new(PartitionLog::open(dir.path(), config).await.unwrap());
        let mut tasks = Vec::new();
        for seed in 0..16u64 {
            let log = log.clone();
            tasks.push(compio::runtime::spawn(async move {
                log.append(batch(2, 100, 0, seed), 0).await.unwrap()
            }));
        }
        for task in tasks {
            let info = task.await.unwrap();
            assert!(
                log.durable_offset() > info.last_offset,
                "append returned before its data was durable"
            );
            assert!(log.high_watermark() > info.last_offset);
        }
        assert_eq!(log.high_watermark(), 32);
        assert_eq!(log.durable_offset(), 32);
    });
}

#[test]
fn wait_durable_and_high_watermark_waiters_resolve() {
    let dir = tempfile::tempdir().unwrap();
    run(async {
        let log = Rc::new(
            PartitionLog::open(dir.path(), small_config())
                .await
                .unwrap(),
        );
        let waiter = {
            let log = log.clone();
            compio::runtime::spawn(async move { log.wait_high_watermark_above(4).await })
        };
        log.append(batch(3, 10, 0, 1), 0).await.unwrap();
        assert_eq!(
            log.durable_offset(),
            0,
            "no flush policy: nothing synced yet"
        );
        log.append(batch(3, 10, 0, 2), 0).await.unwrap();
        waiter.await.unwrap();
        log.wait_durable(5).await.unwrap();
        assert_eq!(log.durable_offset(), 6);
        // A wait for an offset beyond the log end covers what is there.
        log.wait_durable(1_000).await.unwrap();
        // A dropped waiter leaves nothing behind.
        let dropped = log.wait_high_watermark_above(100);
        drop(dropped);
    });
}

#[test]
fn flush_interval_messages_syncs_by_count_and_tick_by_time() {
    let dir = tempfile::tempdir().unwrap();
    run(async {
        let config = LogConfig {
            flush_interval_messages: Some(5),
            flush_interval_ms: Some(100),
            ..small_config()
        };
        let log = PartitionLog::open(dir.path(), config).await.unwrap();
        log.append(batch(3, 10, 0, 1), 1_000).await.unwrap();
        assert_eq!(log.durable_offset(), 0);
        log.append(batch(3, 10, 0, 2), 1_000).await.unwrap();
        assert_eq!(
            log.durable_offset(),
            6,
            "6 >= 5 unflushed records forces a flush"
        );
        log.append(batch(1, 10, 0, 3), 1_000).await.unwrap();
        log.tick(1_050).await.unwrap();
        assert_eq!(log.durable_offset(), 6);
        log.tick(1_100).await.unwrap();
        assert_eq!(log.durable_offset(), 7, "flush_interval_ms elapsed");
    });
}

#[test]
fn roll_by_time_happens_on_append_and_on_tick() {
    let dir = tempfile::tempdir().unwrap();
    run(async {
        let config = LogConfig {
            segment_ms: 1_000,
            ..small_config()
        };
        let log = PartitionLog::open(dir.path(), config).await.unwrap();
        log.append(batch(1, 10, 5_000, 1), 5_000).await.unwrap();
        log.append(batch(1, 10, 5_500, 2), 5_500).await.unwrap();
        assert_eq!(log.segment_count(), 1);
        log.append(batch(1, 10, 6_000, 3), 6_000).await.unwrap();
        assert_eq!(log.segment_base_offsets(), vec![0, 2]);
        log.tick(7_000).await.unwrap();
        assert_eq!(log.segment_base_offsets(), vec![0, 2, 3]);
    });
}

#[test]
fn delete_removes_the_partition_directory() {
    let parent = tempfile::tempdir().unwrap();
    let dir = parent.path().join("orders-eu-3");
    run(async {
        let log = PartitionLog::open(&dir, small_config()).await.unwrap();
        log.append(batch(2, 10, 0, 1), 0).await.unwrap();
        let slice = log.read(0, 1000, true).await.unwrap();
        log.delete().await.unwrap();
        assert!(slice.len > 0);
    });
    assert!(!dir.exists());
    assert_eq!(std::fs::read_dir(parent.path()).unwrap().count(), 0);
}

#[test]
fn partition_dirs_and_metadata() {
    let parent = tempfile::tempdir().unwrap();
    run(async {
        for (topic, partition) in [("orders-eu", 3), ("orders-eu", 10), ("a", 0)] {
            let dir = ringbroker::storage::partition_dir(parent.path(), topic, partition);
            PartitionLog::open(&dir, small_config())
                .await
                .unwrap()
                .close()
                .await
                .unwrap();
        }
        std::fs::create_dir(parent.path().join("old-1.abcdef-delete")).unwrap();
        std::fs::create_dir(parent.path().join("not_a_partition")).unwrap();
        let found = list_partition_dirs(parent.path()).unwrap();
        let names: Vec<(String, i32)> = found
            .iter()
            .map(|d| (d.topic.clone(), d.partition))
            .collect();
        assert_eq!(
            names,
            vec![
                ("a".into(), 0),
                ("orders-eu".into(), 3),
                ("orders-eu".into(), 10)
            ]
        );

        let id = uuid::Uuid::new_v4();
        assert_eq!(read_partition_metadata(&found[1].path).await.unwrap(), None);
        write_partition_metadata(&found[1].path, id).await.unwrap();
        assert_eq!(
            read_partition_metadata(&found[1].path).await.unwrap(),
            Some(id)
        );
        let text = std::fs::read_to_string(found[1].path.join("partition.metadata")).unwrap();
        assert!(text.starts_with("version: 0\ntopic_id: "));
        assert_eq!(
            ringbroker::storage::remove_deleted_partition_dirs(parent.path())
                .await
                .unwrap(),
            1
        );
    });
}

/// Polls a future once, then drops it: a produce whose connection went away mid-append.
async fn poll_once_then_drop<F: std::future::Future>(future: F) -> bool {
    let mut future = std::pin::pin!(future);
    std::future::poll_fn(|context| std::task::Poll::Ready(future.as_mut().poll(context).is_ready()))
        .await
}

#[test]
fn cancelled_appends_and_flushes_leave_a_consistent_log() {
    let dir = tempfile::tempdir().unwrap();
    let mut expected = Vec::new();
    run(async {
        let log = PartitionLog::open(dir.path(), small_config())
            .await
            .unwrap();
        for round in 0..20u64 {
            let client = batch(3, 200, 0, round);
            let info = log.append(client.clone(), 0).await.unwrap();
            expected.push((info.base_offset, as_stored(&client, info.base_offset)));
            // This append is abandoned after its write was handed to the kernel.
            let finished = poll_once_then_drop(log.append(batch(5, 300, 0, 1000 + round), 0)).await;
            assert!(
                !finished,
                "an append cannot finish without waiting for its write"
            );
            // So is a group commit leader.
            poll_once_then_drop(log.wait_durable(i64::MAX)).await;
        }
        log.wait_durable(i64::MAX).await.unwrap();
        assert_eq!(
            log.log_end_offset(),
            60,
            "abandoned appends took no offsets"
        );
        for (offset, stored) in &expected {
            let bytes = log
                .read_copy(*offset, stored.len() as u32, true)
                .await
                .unwrap();
            assert_eq!(bytes.as_ref(), stored.as_slice());
        }
        storage_support::check_contiguous(&log).await;
        log.close().await.unwrap();
    });
    run(async {
        let log = PartitionLog::open(dir.path(), small_config())
            .await
            .unwrap();
        assert_eq!(log.log_end_offset(), 60);
        storage_support::check_contiguous(&log).await;
    });
}

#[test]
fn old_record_timestamps_do_not_make_every_append_roll() {
    let dir = tempfile::tempdir().unwrap();
    run(async {
        let config = LogConfig {
            segment_ms: 1_000,
            ..small_config()
        };
        let log = PartitionLog::open(dir.path(), config).await.unwrap();
        // Records stamped an hour before the broker's clock, as a replaying producer sends them.
        for seed in 0..5 {
            log.append(batch(1, 10, 1_000 + seed as i64, seed), 3_600_000)
                .await
                .unwrap();
        }
        assert_eq!(
            log.segment_count(),
            1,
            "timestamps 4 ms apart stay in one segment"
        );
        log.append(batch(1, 10, 2_500, 9), 3_600_000).await.unwrap();
        assert_eq!(
            log.segment_count(),
            2,
            "a record 1.5 s newer than the first rolls"
        );
    });
}

#[test]
fn a_full_index_rolls_the_segment() {
    let dir = tempfile::tempdir().unwrap();
    run(async {
        let config = LogConfig {
            segment_index_bytes: 24, // three offset entries, two time entries
            index_interval_bytes: 100,
            ..small_config()
        };
        let log = PartitionLog::open(dir.path(), config).await.unwrap();
        for seed in 0..12 {
            log.append(batch(1, 150, seed as i64, seed), 0)
                .await
                .unwrap();
        }
        assert!(
            log.segment_count() >= 3,
            "index limits must roll, got {} segments",
            log.segment_count()
        );
        storage_support::check_contiguous(&log).await;
    });
}

#[test]
fn tick_moves_the_recovery_checkpoint_to_durable_data() {
    let dir = tempfile::tempdir().unwrap();
    let checkpoint = dir.path().join("recovery-checkpoint");
    run(async {
        let config = LogConfig {
            recovery_checkpoint_interval_ms: 1_000,
            ..small_config()
        };
        let log = PartitionLog::open(dir.path(), config).await.unwrap();
        let opened = std::fs::read_to_string(&checkpoint).unwrap_or_default();
        let now_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis() as i64;
        for seed in 0..5 {
            log.append(batch(2, 100, now_ms, seed), now_ms)
                .await
                .unwrap();
        }
        log.wait_durable(i64::MAX).await.unwrap();
        log.tick(now_ms + 2_000).await.unwrap();
        let ticked = std::fs::read_to_string(&checkpoint).unwrap();
        assert_ne!(opened, ticked);
        assert!(
            ticked.starts_with("1\n10 0 "),
            "checkpoint at offset 10 in segment 0: {ticked:?}"
        );
    });
}
