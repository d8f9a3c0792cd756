//! storage_faults: fault injection through the storage IO seam. ENOSPC, EIO on write or fdatasync,
//! short writes and a crash at a write boundary must give the caller a clean error, corrupt nothing,
//! and leave a log that reopens with every offset that was durable before the fault.

mod storage_support;

use std::time::{Duration, Instant};

use ringbroker::storage::{
    AppendError, Disk, Fault, FaultInjector, IoKind, LogConfig, PartitionLog, StorageError,
};
use storage_support::{as_stored, batch, check_contiguous, run, small_config};

/// Appends `count` batches, returning (base offset, stored bytes) of each.
async fn fill(log: &PartitionLog, count: u64, seed_base: u64) -> Vec<(i64, Vec<u8>)> {
    let mut stored = Vec::new();
    for seed in seed_base..seed_base + count {
        let client = batch(3, 120, 1_000, seed);
        let info = log.append(client.clone(), 0).await.expect("append");
        stored.push((info.base_offset, as_stored(&client, info.base_offset)));
    }
    stored
}

/// Reopens the log on the real disk and checks that `expected` reads back byte-identical and that
/// offsets are contiguous from the log start to the log end.
async fn reopen_and_check(
    dir: &std::path::Path,
    config: LogConfig,
    expected: &[(i64, Vec<u8>)],
) -> PartitionLog {
    let log = PartitionLog::open(dir, config).await.expect("reopen");
    for (offset, bytes) in expected {
        let read = log
            .read_copy(*offset, bytes.len() as u32, true)
            .await
            .expect("read");
        assert_eq!(read.as_ref(), bytes.as_slice(), "offset {offset} changed");
    }
    check_contiguous(&log).await;
    log
}

#[test]
fn enospc_on_write_is_a_clean_error_and_the_log_goes_on() {
    let dir = tempfile::tempdir().unwrap();
    run(async {
        let faults = FaultInjector::new();
        let log = PartitionLog::open_with_disk(
            dir.path(),
            small_config(),
            Disk::with_faults(faults.clone()),
        )
        .await
        .unwrap();
        let mut expected = fill(&log, 5, 0).await;
        faults.inject(IoKind::Write, 0, Fault::Errno(libc::ENOSPC), 1);
        match log.append(batch(3, 120, 1_000, 99), 0).await {
            Err(AppendError::Storage(error)) => {
                assert_eq!(error.raw_os_error(), Some(libc::ENOSPC))
            }
            other => panic!("expected ENOSPC, got {other:?}"),
        }
        assert_eq!(log.log_end_offset(), 15, "nothing was appended");
        expected.extend(fill(&log, 5, 10).await);
        assert_eq!(
            expected.last().unwrap().0,
            27,
            "offsets continue without a gap"
        );
        log.close().await.unwrap();
        drop(log);
        reopen_and_check(dir.path(), small_config(), &expected).await;
    });
}

#[test]
fn a_partial_write_then_enospc_is_cut_back_before_the_next_append() {
    let dir = tempfile::tempdir().unwrap();
    run(async {
        let faults = FaultInjector::new();
        let log = PartitionLog::open_with_disk(
            dir.path(),
            small_config(),
            Disk::with_faults(faults.clone()),
        )
        .await
        .unwrap();
        let mut expected = fill(&log, 3, 0).await;
        // The first write stores 100 bytes, the retry of the rest fails: 100 stray bytes in the file.
        faults.inject(IoKind::Write, 0, Fault::ShortWrite(100), 1);
        faults.inject(IoKind::Write, 1, Fault::Errno(libc::ENOSPC), 1);
        assert!(log.append(batch(3, 120, 1_000, 50), 0).await.is_err());
        expected.extend(fill(&log, 3, 60).await);
        drop(log);
        // An unclean stop: recovery must find only whole, valid batches.
        reopen_and_check(dir.path(), small_config(), &expected).await;
    });
}

#[test]
fn short_writes_are_completed() {
    let dir = tempfile::tempdir().unwrap();
    run(async {
        let faults = FaultInjector::new();
        let log = PartitionLog::open_with_disk(
            dir.path(),
            small_config(),
            Disk::with_faults(faults.clone()),
        )
        .await
        .unwrap();
        faults.inject(IoKind::Write, 0, Fault::ShortWrite(7), 20);
        let expected = fill(&log, 10, 0).await;
        drop(log);
        reopen_and_check(dir.path(), small_config(), &expected).await;
    });
}

#[test]
fn eio_on_fdatasync_fails_the_log_and_reopen_keeps_durable_data() {
    let dir = tempfile::tempdir().unwrap();
    run(async {
        let faults = FaultInjector::new();
        let log = PartitionLog::open_with_disk(
            dir.path(),
            small_config(),
            Disk::with_faults(faults.clone()),
        )
        .await
        .unwrap();
        let expected = fill(&log, 4, 0).await;
        log.wait_durable(i64::MAX).await.unwrap();
        fill(&log, 2, 10).await;
        faults.inject(IoKind::Sync, 0, Fault::Errno(libc::EIO), 1);
        let error = log.wait_durable(i64::MAX).await.unwrap_err();
        assert!(matches!(error, StorageError::Failed { .. }), "{error:?}");
        assert_eq!(
            log.durable_offset(),
            12,
            "the failed sync made nothing durable"
        );
        assert!(matches!(
            log.append(batch(1, 1, 0, 0), 0).await,
            Err(AppendError::Storage(StorageError::Failed { .. }))
        ));
        // Close refuses to write the clean marker for a failed log.
        assert!(log.close().await.is_err());
        drop(log);
        assert!(!dir.path().join(".kafka_cleanshutdown").exists());
        reopen_and_check(dir.path(), small_config(), &expected).await;
    });
}

#[test]
fn eio_on_write_in_durable_mode_keeps_the_high_watermark() {
    let dir = tempfile::tempdir().unwrap();
    let config = LogConfig {
        durable_high_watermark: true,
        ..small_config()
    };
    run(async {
        let faults = FaultInjector::new();
        let log = PartitionLog::open_with_disk(
            dir.path(),
            config.clone(),
            Disk::with_faults(faults.clone()),
        )
        .await
        .unwrap();
        let expected = fill(&log, 4, 0).await;
        assert_eq!(log.high_watermark(), 12);
        faults.inject(IoKind::Write, 0, Fault::Errno(libc::EIO), 1);
        assert!(log.append(batch(3, 120, 1_000, 9), 0).await.is_err());
        assert_eq!(log.high_watermark(), 12);
        drop(log);
        reopen_and_check(dir.path(), config, &expected).await;
    });
}

#[test]
fn enospc_while_rolling_leaves_the_old_segment_active() {
    let dir = tempfile::tempdir().unwrap();
    run(async {
        let faults = FaultInjector::new();
        let log = PartitionLog::open_with_disk(
            dir.path(),
            small_config(),
            Disk::with_faults(faults.clone()),
        )
        .await
        .unwrap();
        let mut expected = Vec::new();
        // Fill close to a roll, then make every file creation fail.
        while log.size_bytes() + 500 < 16 * 1024 {
            expected.extend(fill(&log, 1, expected.len() as u64).await);
        }
        faults.inject(IoKind::Open, 0, Fault::Errno(libc::ENOSPC), u64::MAX);
        let mut refused = 0;
        for seed in 0..5 {
            match log.append(batch(3, 120, 0, 1000 + seed), 0).await {
                Ok(info) => expected.push((
                    info.base_offset,
                    as_stored(&batch(3, 120, 0, 1000 + seed), info.base_offset),
                )),
                Err(AppendError::Storage(_)) => refused += 1,
                Err(other) => panic!("unexpected {other:?}"),
            }
        }
        assert!(refused > 0, "the roll had to fail");
        assert_eq!(log.segment_count(), 1);
        faults.clear();
        expected.extend(fill(&log, 5, 2000).await);
        assert_eq!(
            log.segment_count(),
            2,
            "the roll succeeds once space is back"
        );
        log.close().await.unwrap();
        drop(log);
        reopen_and_check(dir.path(), small_config(), &expected).await;
    });
}

#[test]
fn a_crash_at_any_write_boundary_loses_no_durable_offset() {
    // Every write of a fixed workload is, in turn, the one during which the process "dies"; each
    // time a prefix of that write reaches the file. After the crash the log reopens on the real disk.
    let started = Instant::now();
    let workload_writes = {
        let dir = tempfile::tempdir().unwrap();
        run(async {
            let faults = FaultInjector::new();
            let log = PartitionLog::open_with_disk(
                dir.path(),
                crash_config(),
                Disk::with_faults(faults.clone()),
            )
            .await
            .unwrap();
            let before = faults.count(IoKind::Write);
            workload(&log).await.unwrap();
            faults.count(IoKind::Write) - before
        })
    };
    assert!(
        workload_writes > 20,
        "the workload must write a lot, wrote {workload_writes}"
    );
    for crash_at in 0..workload_writes.min(200) {
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "crash sweep took too long"
        );
        let dir = tempfile::tempdir().unwrap();
        run(async {
            let faults = FaultInjector::new();
            let log = PartitionLog::open_with_disk(
                dir.path(),
                crash_config(),
                Disk::with_faults(faults.clone()),
            )
            .await
            .unwrap();
            let keep_bytes = (crash_at as usize * 37) % 200;
            faults.inject(IoKind::Write, crash_at, Fault::Crash { keep_bytes }, 1);
            let durable = workload(&log).await.unwrap_or_else(|durable| durable);
            assert!(faults.crashed(), "write {crash_at} never happened");
            drop(log);
            let log = reopen_and_check(dir.path(), crash_config(), &durable).await;
            // The log takes appends again after recovery, at the offset where it ended.
            let end = log.log_end_offset();
            let info = log.append(batch(1, 10, 0, 7), 0).await.unwrap();
            assert_eq!(info.base_offset, end);
        });
    }
}

fn crash_config() -> LogConfig {
    LogConfig {
        segment_bytes: 4 * 1024,
        index_interval_bytes: 256,
        ..small_config()
    }
}

/// Appends and syncs in a loop, rolling segments; returns what was durable when it stopped (Err if a
/// fault stopped it).
async fn workload(log: &PartitionLog) -> Result<Vec<(i64, Vec<u8>)>, Vec<(i64, Vec<u8>)>> {
    let mut durable = Vec::new();
    let mut pending = Vec::new();
    for seed in 0..40u64 {
        let client = batch(2, 80, 1_000 + seed as i64, seed);
        match log.append(client.clone(), seed as i64).await {
            Ok(info) => pending.push((info.base_offset, as_stored(&client, info.base_offset))),
            Err(_) => return Err(durable),
        }
        if seed % 3 == 2 {
            if log.wait_durable(i64::MAX).await.is_err() {
                return Err(durable);
            }
            durable.append(&mut pending);
        }
    }
    if log.wait_durable(i64::MAX).await.is_err() {
        return Err(durable);
    }
    durable.append(&mut pending);
    Ok(durable)
}
