//! DeleteRecords at the storage level: `PartitionLog::delete_records_before` moves the log start,
//! persists it (clean close, unclean stop, a crash at every file operation of the move), deletes only
//! whole segments below it, and retention never moves it back.

mod storage_support;

use ringbroker::storage::log_start::LOG_START_OFFSET_FILE;
use ringbroker::storage::{
    DeleteRecordsError, Disk, Fault, FaultInjector, IoKind, PartitionLog, ReadError,
};
use storage_support::{batch, run, small_config, split_batches};

/// Appends `batches` batches of 2 records (600-byte values) so the small config rolls every ~12.
async fn fill(log: &PartitionLog, batches: u64) {
    for seed in 0..batches {
        log.append(batch(2, 600, 1_000 + seed as i64, seed), 0)
            .await
            .unwrap();
    }
}

/// The first offset a read at the log start returns a batch covering, and that the read succeeds.
async fn assert_readable_from_start(log: &PartitionLog) {
    let start = log.log_start_offset();
    let bytes = log.read_copy(start, 1 << 20, true).await.unwrap();
    let (batches, _) = split_batches(&bytes);
    assert!(
        !batches.is_empty(),
        "nothing readable at the log start {start}"
    );
    assert!(batches[0].base_offset <= start && start <= batches[0].last_offset);
    if start > 0 {
        assert!(matches!(
            log.read(start - 1, 100, true).await,
            Err(ReadError::OffsetOutOfRange { .. })
        ));
    }
}

#[test]
fn delete_records_moves_the_start_and_deletes_whole_segments_below_it() {
    let dir = tempfile::tempdir().unwrap();
    run(async {
        let log = PartitionLog::open(dir.path(), small_config())
            .await
            .unwrap();
        fill(&log, 60).await;
        let bases = log.segment_base_offsets();
        assert!(bases.len() >= 4, "{bases:?}");
        let high_watermark = log.high_watermark();

        // Beyond the high watermark, or negative other than -1: refused, nothing changes.
        for offset in [high_watermark + 1, -2] {
            assert!(matches!(
                log.delete_records_before(offset).await,
                Err(DeleteRecordsError::OffsetOutOfRange { .. })
            ));
        }
        assert_eq!(log.log_start_offset(), 0);

        // Into the middle of the third segment: the two before it go, the third stays.
        let target = bases[2] + 3;
        assert_eq!(log.delete_records_before(target).await.unwrap(), target);
        assert_eq!(log.log_start_offset(), target);
        assert_eq!(log.segment_base_offsets()[0], bases[2]);
        assert!(!dir.path().join(format!("{:020}.log", bases[0])).exists());
        assert!(!dir.path().join(format!("{:020}.index", bases[1])).exists());
        assert_readable_from_start(&log).await;
        assert_eq!(
            log.offset_for_timestamp(0).await.unwrap().map(|(o, _)| o),
            Some(target)
        );

        // A lower offset is a no-op answered with the current start.
        assert_eq!(log.delete_records_before(5).await.unwrap(), target);

        // Retention deleting the segment the start lies in must not move the start back.
        let bases = log.segment_base_offsets();
        let past = bases[1] + 1;
        assert_eq!(log.delete_records_before(past).await.unwrap(), past);
        log.set_config(ringbroker::storage::LogConfig {
            retention_bytes: Some(1),
            ..small_config()
        });
        let outcome = log.enforce_retention(2_000).await.unwrap();
        assert!(outcome.log_start_offset >= past);
        log.set_config(small_config());

        // -1 means the high watermark: everything readable is gone, the active segment stays.
        assert_eq!(log.delete_records_before(-1).await.unwrap(), high_watermark);
        assert_eq!(log.segment_count(), 1);
        assert_eq!(log.read(high_watermark, 100, true).await.unwrap().len, 0);
        // Appends continue after the start.
        let info = log.append(batch(1, 10, 5_000, 99), 0).await.unwrap();
        assert_eq!(info.base_offset, high_watermark);
        assert_eq!(info.log_start_offset, high_watermark);
        log.close().await.unwrap();
    });
}

#[test]
fn the_start_survives_a_clean_close_and_an_unclean_stop() {
    let dir = tempfile::tempdir().unwrap();
    run(async {
        let log = PartitionLog::open(dir.path(), small_config())
            .await
            .unwrap();
        fill(&log, 30).await;
        let target = log.segment_base_offsets()[1] + 1;
        log.delete_records_before(target).await.unwrap();
        log.close().await.unwrap();

        let log = PartitionLog::open(dir.path(), small_config())
            .await
            .unwrap();
        assert_eq!(log.log_start_offset(), target);
        assert_readable_from_start(&log).await;
        let target = target + 2;
        log.delete_records_before(target).await.unwrap();
        drop(log); // unclean: no close, no marker

        let log = PartitionLog::open(dir.path(), small_config())
            .await
            .unwrap();
        assert_eq!(log.log_start_offset(), target);
        assert_readable_from_start(&log).await;
        log.close().await.unwrap();
    });
}

#[test]
fn open_finishes_an_interrupted_move_and_clamps_a_start_beyond_the_log_end() {
    let dir = tempfile::tempdir().unwrap();
    run(async {
        let log = PartitionLog::open(dir.path(), small_config())
            .await
            .unwrap();
        fill(&log, 30).await;
        let bases = log.segment_base_offsets();
        let end = log.log_end_offset();
        log.close().await.unwrap();

        // As if the process died after persisting the start but before unlinking segments.
        let target = bases[2] + 1;
        std::fs::write(
            dir.path().join(LOG_START_OFFSET_FILE),
            format!("0\n{target}\n"),
        )
        .unwrap();
        let log = PartitionLog::open(dir.path(), small_config())
            .await
            .unwrap();
        assert_eq!(log.log_start_offset(), target);
        assert_eq!(log.segment_base_offsets()[0], bases[2]);
        log.close().await.unwrap();

        // A start above the recovered log end (data lost) is clamped to the end, not trusted.
        std::fs::write(
            dir.path().join(LOG_START_OFFSET_FILE),
            format!("0\n{}\n", end + 100),
        )
        .unwrap();
        let log = PartitionLog::open(dir.path(), small_config())
            .await
            .unwrap();
        assert_eq!(log.log_start_offset(), end);
        assert_eq!(log.log_end_offset(), end);
        log.close().await.unwrap();

        // A damaged file leaves the first segment's base as the start.
        std::fs::write(dir.path().join(LOG_START_OFFSET_FILE), b"garbage").unwrap();
        let log = PartitionLog::open(dir.path(), small_config())
            .await
            .unwrap();
        assert_eq!(log.log_start_offset(), log.segment_base_offsets()[0]);
        log.close().await.unwrap();
    });
}

#[test]
fn a_crash_at_any_step_of_the_move_leaves_the_old_or_the_new_start() {
    // For each kind of file operation and each occurrence of it during one delete_records_before, the
    // process "dies" there; the reopened log must start at the old start or the new one, keep every
    // record from the new start on, and read back from its start.
    let mut cases = 0;
    for kind in [IoKind::Write, IoKind::Sync, IoKind::Rename, IoKind::Remove] {
        for skip in 0..8u64 {
            let dir = tempfile::tempdir().unwrap();
            let fired = run(async {
                let log = PartitionLog::open(dir.path(), small_config())
                    .await
                    .unwrap();
                fill(&log, 30).await;
                log.close().await.unwrap();
                let faults = FaultInjector::new();
                let log = PartitionLog::open_with_disk(
                    dir.path(),
                    small_config(),
                    Disk::with_faults(faults.clone()),
                )
                .await
                .unwrap();
                let end = log.log_end_offset();
                let target = log.segment_base_offsets()[2] + 1;
                faults.inject(kind, skip, Fault::Crash { keep_bytes: 2 }, 1);
                let result = log.delete_records_before(target).await;
                let fired = faults.crashed();
                if !fired {
                    result.unwrap();
                }
                drop(log);

                let log = PartitionLog::open(dir.path(), small_config())
                    .await
                    .unwrap();
                let start = log.log_start_offset();
                assert!(
                    start == 0 || start == target,
                    "{kind:?} skip {skip}: start {start}, target {target}"
                );
                assert_eq!(log.log_end_offset(), end, "{kind:?} skip {skip}");
                assert_readable_from_start(&log).await;
                log.close().await.unwrap();
                fired
            });
            if !fired {
                break;
            }
            cases += 1;
        }
    }
    assert!(cases >= 4, "only {cases} crash points were reached");
}
