//! storage_producer_state: the idempotent-producer state of a partition log through its public API:
//! duplicates answered with their first offsets and never written again, sequence gaps and fenced
//! epochs refused, several batches in one append, and the state surviving a clean close, an unclean
//! stop without any snapshot, a damaged snapshot, a snapshot above a truncated log end, expiration
//! and retention.

mod storage_support;

use bytes::Bytes;
use ringbroker::storage::testing::build_idempotent_batch;
use ringbroker::storage::{AppendError, LogConfig, PartitionLog};
use storage_support::{check_contiguous, run, small_config, split_batches};

const PRODUCER: i64 = 4_000;

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64
}

/// A batch of `count` records from `PRODUCER` at `epoch`, starting at `sequence`, stamped now (the
/// state is restored at open with the wall clock, and producers idle past the expiration go).
fn idem(epoch: i16, sequence: i32, count: i32) -> Bytes {
    idem_at(epoch, sequence, count, now_ms())
}

fn idem_at(epoch: i16, sequence: i32, count: i32, timestamp_ms: i64) -> Bytes {
    Bytes::from(build_idempotent_batch(
        count,
        400,
        timestamp_ms,
        PRODUCER,
        epoch,
        sequence,
    ))
}

fn snapshot_files(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut files: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .filter_map(|entry| entry.ok().map(|entry| entry.path()))
        .filter(|path| path.extension().is_some_and(|ext| ext == "snapshot"))
        .collect();
    files.sort();
    files
}

/// Every stored batch's (base offset, base sequence), read back from the log.
async fn stored_sequences(log: &PartitionLog) -> Vec<(i64, i32)> {
    let mut out = Vec::new();
    let mut next = log.log_start_offset();
    while next < log.high_watermark() {
        let bytes = log.read_copy(next, 1 << 20, true).await.unwrap();
        let (batches, _) = split_batches(&bytes);
        assert!(!batches.is_empty());
        for stored in batches {
            let sequence = i32::from_be_bytes(stored.bytes[53..57].try_into().unwrap());
            out.push((stored.base_offset, sequence));
            next = stored.last_offset + 1;
        }
    }
    out
}

/// Appends batches of 3 records with sequences 0, 3, 6, ... and returns their base offsets.
async fn append_in_sequence(log: &PartitionLog, batches: i32) -> Vec<i64> {
    let mut offsets = Vec::new();
    for number in 0..batches {
        let info = log.append(idem(0, number * 3, 3), 0).await.unwrap();
        assert!(!info.duplicate);
        offsets.push(info.base_offset);
    }
    offsets
}

/// The last five batches are recognised as duplicates with their first offsets.
async fn assert_last_five_are_duplicates(log: &PartitionLog, offsets: &[i64]) {
    let end = log.log_end_offset();
    let count = offsets.len() as i32;
    for number in (count - 5).max(0)..count {
        let info = log.append(idem(0, number * 3, 3), 0).await.unwrap();
        assert!(info.duplicate, "batch {number} not recognised");
        assert_eq!(info.base_offset, offsets[number as usize]);
        assert_eq!(info.last_offset, offsets[number as usize] + 2);
    }
    assert_eq!(log.log_end_offset(), end, "a duplicate was written");
}

#[test]
fn a_retried_batch_is_answered_with_its_first_offset_and_not_written_again() {
    let dir = tempfile::tempdir().unwrap();
    run(async {
        let log = PartitionLog::open(dir.path(), small_config())
            .await
            .unwrap();
        // Another (non-idempotent) producer interleaves, so offsets and sequences differ.
        log.append(storage_support::batch(2, 10, 0, 1), 0)
            .await
            .unwrap();
        let offsets = append_in_sequence(&log, 7).await;
        assert_eq!(offsets[0], 2);
        assert_last_five_are_duplicates(&log, &offsets).await;
        // Older than the window of five: Kafka answers OUT_OF_ORDER_SEQUENCE_NUMBER.
        assert!(matches!(
            log.append(idem(0, 3, 3), 0).await,
            Err(AppendError::OutOfOrderSequence(_))
        ));
        // A gap.
        assert!(matches!(
            log.append(idem(0, 22, 1), 0).await,
            Err(AppendError::OutOfOrderSequence(_))
        ));
        // The next sequence is accepted.
        let info = log.append(idem(0, 21, 1), 0).await.unwrap();
        assert_eq!(info.base_offset, 23);
        // A new epoch must start at 0; then the old epoch is fenced.
        assert!(matches!(
            log.append(idem(1, 5, 1), 0).await,
            Err(AppendError::OutOfOrderSequence(_))
        ));
        log.append(idem(1, 0, 1), 0).await.unwrap();
        assert!(matches!(
            log.append(idem(0, 22, 1), 0).await,
            Err(AppendError::InvalidProducerEpoch(_))
        ));
        let sequences: Vec<i32> = stored_sequences(&log)
            .await
            .into_iter()
            .map(|(_, sequence)| sequence)
            .collect();
        assert_eq!(sequences, vec![-1, 0, 3, 6, 9, 12, 15, 18, 21, 0]);
        check_contiguous(&log).await;
    });
}

#[test]
fn several_batches_in_one_append_are_checked_in_order() {
    let dir = tempfile::tempdir().unwrap();
    run(async {
        let log = PartitionLog::open(dir.path(), small_config())
            .await
            .unwrap();
        // Two batches in sequence within one append: the second follows the first.
        let mut both = idem(0, 0, 2).to_vec();
        both.extend_from_slice(&idem(0, 2, 2));
        let info = log.append(Bytes::from(both), 0).await.unwrap();
        assert_eq!((info.base_offset, info.last_offset), (0, 3));
        // A retried batch followed by a new one: only the new one is written; the answer starts at
        // the retried batch's first offset.
        let mut mixed = idem(0, 2, 2).to_vec();
        mixed.extend_from_slice(&idem(0, 4, 3));
        let info = log.append(Bytes::from(mixed), 0).await.unwrap();
        assert!(!info.duplicate);
        assert_eq!((info.base_offset, info.last_offset), (2, 6));
        assert_eq!(log.log_end_offset(), 7);
        // One bad batch refuses the whole append: nothing of it is written.
        let mut gap = idem(0, 7, 1).to_vec();
        gap.extend_from_slice(&idem(0, 9, 1));
        assert!(matches!(
            log.append(Bytes::from(gap), 0).await,
            Err(AppendError::OutOfOrderSequence(_))
        ));
        assert_eq!(log.log_end_offset(), 7);
        // The refused append left no trace: sequence 7 is still the next one.
        assert_eq!(log.append(idem(0, 7, 1), 0).await.unwrap().base_offset, 7);
        let sequences: Vec<(i64, i32)> = stored_sequences(&log).await;
        assert_eq!(sequences, vec![(0, 0), (2, 2), (4, 4), (7, 7)]);
    });
}

#[test]
fn the_state_survives_a_clean_close_through_a_snapshot_at_the_log_end() {
    let dir = tempfile::tempdir().unwrap();
    let offsets = run(async {
        let log = PartitionLog::open(dir.path(), small_config())
            .await
            .unwrap();
        let offsets = append_in_sequence(&log, 30).await;
        assert!(log.segment_count() > 2, "small segments rolled");
        log.close().await.unwrap();
        offsets
    });
    let files = snapshot_files(dir.path());
    assert!(!files.is_empty() && files.len() <= 3, "{files:?}");
    assert_eq!(
        files.last().unwrap().file_name().unwrap().to_str().unwrap(),
        format!("{:020}.snapshot", offsets.last().unwrap() + 3)
    );
    run(async {
        let log = PartitionLog::open(dir.path(), small_config())
            .await
            .unwrap();
        assert_eq!(log.producer_count(), 1);
        assert_last_five_are_duplicates(&log, &offsets).await;
        assert_eq!(log.append(idem(0, 90, 1), 0).await.unwrap().base_offset, 90);
    });
}

#[test]
fn an_unclean_stop_without_any_snapshot_rebuilds_the_state_from_the_log() {
    let dir = tempfile::tempdir().unwrap();
    let offsets = run(async {
        let log = PartitionLog::open(dir.path(), small_config())
            .await
            .unwrap();
        append_in_sequence(&log, 30).await
        // Dropped without close.
    });
    for file in snapshot_files(dir.path()) {
        std::fs::remove_file(file).unwrap();
    }
    run(async {
        let log = PartitionLog::open(dir.path(), small_config())
            .await
            .unwrap();
        let entry = log.producer_entry(PRODUCER).expect("rebuilt from the log");
        assert_eq!(entry.batches.len(), 5);
        assert_eq!(entry.batches.back().unwrap().first_sequence, 87);
        assert_last_five_are_duplicates(&log, &offsets).await;
        assert!(matches!(
            log.append(idem(0, 91, 1), 0).await,
            Err(AppendError::OutOfOrderSequence(_))
        ));
    });
    // The rebuild wrote a snapshot at the log end, so the next open does not scan.
    assert_eq!(
        snapshot_files(dir.path())
            .last()
            .unwrap()
            .file_name()
            .unwrap()
            .to_str()
            .unwrap(),
        format!("{:020}.snapshot", 90)
    );
}

#[test]
fn an_unclean_stop_after_a_roll_snapshot_replays_only_the_tail() {
    let dir = tempfile::tempdir().unwrap();
    let offsets = run(async {
        let log = PartitionLog::open(dir.path(), small_config())
            .await
            .unwrap();
        let offsets = append_in_sequence(&log, 30).await;
        // Rolls wrote snapshots at segment bases; the last batches are only in the log.
        let snapshots = log.snapshot_offsets();
        assert!(!snapshots.is_empty());
        assert!(*snapshots.last().unwrap() < log.log_end_offset());
        offsets
    });
    run(async {
        let log = PartitionLog::open(dir.path(), small_config())
            .await
            .unwrap();
        assert_last_five_are_duplicates(&log, &offsets).await;
    });
}

#[test]
fn a_damaged_snapshot_is_ignored_and_the_rebuild_goes_further_back() {
    let dir = tempfile::tempdir().unwrap();
    let offsets = run(async {
        let log = PartitionLog::open(dir.path(), small_config())
            .await
            .unwrap();
        let offsets = append_in_sequence(&log, 30).await;
        log.close().await.unwrap();
        offsets
    });
    // Damage every snapshot: flip a byte in the newest, truncate the others.
    let files = snapshot_files(dir.path());
    assert!(files.len() >= 2, "{files:?}");
    let newest = files.last().unwrap();
    let mut bytes = std::fs::read(newest).unwrap();
    bytes[20] ^= 0xff;
    std::fs::write(newest, bytes).unwrap();
    for file in &files[..files.len() - 1] {
        let length = std::fs::metadata(file).unwrap().len();
        std::fs::OpenOptions::new()
            .write(true)
            .open(file)
            .unwrap()
            .set_len(length / 2)
            .unwrap();
    }
    run(async {
        let log = PartitionLog::open(dir.path(), small_config())
            .await
            .unwrap();
        assert_last_five_are_duplicates(&log, &offsets).await;
        assert_eq!(log.append(idem(0, 90, 2), 0).await.unwrap().base_offset, 90);
    });
    // The damaged files were replaced by a good one at the log end.
    let files = snapshot_files(dir.path());
    assert_eq!(files.len(), 1, "{files:?}");
}

#[test]
fn a_snapshot_above_a_truncated_log_end_is_discarded() {
    let dir = tempfile::tempdir().unwrap();
    run(async {
        let log = PartitionLog::open(dir.path(), LogConfig::default())
            .await
            .unwrap();
        append_in_sequence(&log, 4).await;
        log.close().await.unwrap();
    });
    // A crash that lost the last batch after the snapshot was written: tear the tail and remove
    // the clean marker (as if the close never finished).
    let segment = dir.path().join(format!("{:020}.log", 0));
    let length = std::fs::metadata(&segment).unwrap().len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&segment)
        .unwrap()
        .set_len(length - 10)
        .unwrap();
    std::fs::remove_file(dir.path().join(".kafka_cleanshutdown")).unwrap();
    // The lost batch was never fdatasync'ed, so no recovery point can cover it: one that did would
    // make recovery quarantine the cut bytes and keep their offsets reserved.
    std::fs::remove_file(dir.path().join("recovery-checkpoint")).unwrap();
    std::fs::remove_file(dir.path().join("recovery-point")).unwrap();
    run(async {
        let log = PartitionLog::open(dir.path(), LogConfig::default())
            .await
            .unwrap();
        assert_eq!(log.log_end_offset(), 9);
        // The lost batch (sequence 9) is new again, not a duplicate: it is written.
        let info = log.append(idem(0, 9, 3), 0).await.unwrap();
        assert!(!info.duplicate);
        assert_eq!(info.base_offset, 9);
        let info = log.append(idem(0, 6, 3), 0).await.unwrap();
        assert!(info.duplicate);
        assert_eq!(info.base_offset, 6);
    });
    // The stale snapshot at 12 was deleted at open and the rebuilt state saved at 9.
    let names: Vec<String> = snapshot_files(dir.path())
        .iter()
        .map(|path| path.file_name().unwrap().to_string_lossy().into_owned())
        .collect();
    assert_eq!(names, vec![format!("{:020}.snapshot", 9)]);
}

#[test]
fn idle_producers_expire_and_may_then_start_at_any_sequence() {
    let dir = tempfile::tempdir().unwrap();
    run(async {
        let config = LogConfig {
            producer_id_expiration_ms: 60_000,
            ..small_config()
        };
        let log = PartitionLog::open(dir.path(), config).await.unwrap();
        log.append(idem_at(0, 0, 3, 1_000), 0).await.unwrap();
        log.append(idem_at(0, 3, 3, 1_000), 0).await.unwrap();
        // The batches' max timestamp is 1_002 ms: idle 60 s at 61_002.
        assert_eq!(log.expire_producers(30_000), 0);
        assert_eq!(log.expire_producers(61_001), 0);
        assert_eq!(log.expire_producers(61_002), 1);
        assert_eq!(log.producer_count(), 0);
        // Unknown now: a sequence far ahead is accepted, as Kafka does for an unknown producer.
        assert!(!log.append(idem(0, 500, 1), 0).await.unwrap().duplicate);
    });
}

#[test]
fn retention_removes_snapshots_below_the_log_start_but_keeps_the_newest() {
    let dir = tempfile::tempdir().unwrap();
    run(async {
        let config = LogConfig {
            retention_bytes: Some(1),
            ..small_config()
        };
        let log = PartitionLog::open(dir.path(), config).await.unwrap();
        let offsets = append_in_sequence(&log, 40).await;
        log.roll(0).await.unwrap();
        let outcome = log.enforce_retention(0).await.unwrap();
        assert!(outcome.deleted_segments > 0);
        let start = log.log_start_offset();
        let snapshots = log.snapshot_offsets();
        assert!(!snapshots.is_empty());
        let newest = *snapshots.last().unwrap();
        assert!(
            snapshots
                .iter()
                .all(|&offset| offset >= start || offset == newest),
            "{snapshots:?} below {start}"
        );
        assert_eq!(snapshot_files(dir.path()).len(), snapshots.len());
        // The producer is still known: its retries are still duplicates.
        assert_last_five_are_duplicates(&log, &offsets).await;
    });
}
