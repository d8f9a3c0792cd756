//! Data-integrity faults on real files between log opens: a flipped byte in each part of a batch,
//! above and below the recovery point, in the active and in a closed segment; truncated segments;
//! deleted, truncated and scrambled index files; damage met by a read. Each test checks that every
//! acknowledged (fdatasync'ed) batch outside the damaged one reads back byte-identical, that nothing
//! was unlinked (the damaged data sits in `quarantine/`), and that a read at the damaged offsets gets
//! an error instead of nothing.

mod storage_support;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use ringbroker::storage::{LogConfig, PartitionLog, ReadError};
use storage_support::{StoredBatch, as_stored, batch, run, small_config, split_batches};

/// One acknowledged batch: where it ended up and its stored bytes.
#[derive(Debug, Clone)]
struct Acked {
    base_offset: i64,
    last_offset: i64,
    bytes: Vec<u8>,
}

/// Writes `count` batches of 2 records with distinct timestamps, waits until all are fdatasync'ed
/// (acks=all), and drops the log without closing it (an unclean stop).
fn write_durable(dir: &Path, config: LogConfig, count: u64) -> Vec<Acked> {
    run(async {
        let log = PartitionLog::open(dir, config).await.unwrap();
        let mut acked = Vec::new();
        for seed in 0..count {
            let client = batch(2, 300, 1_000 + seed as i64 * 10, seed);
            let info = log.append(client.clone(), 0).await.unwrap();
            acked.push(Acked {
                base_offset: info.base_offset,
                last_offset: info.last_offset,
                bytes: as_stored(&client, info.base_offset),
            });
        }
        log.wait_durable(i64::MAX).await.unwrap();
        acked
    })
}

fn segment_paths(dir: &Path) -> Vec<PathBuf> {
    let mut paths: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .filter_map(|entry| entry.ok().map(|entry| entry.path()))
        .filter(|path| path.extension().is_some_and(|ext| ext == "log"))
        .collect();
    paths.sort();
    paths
}

/// The batches of a segment file with their byte positions.
fn batches_in(path: &Path) -> Vec<(u64, StoredBatch)> {
    let bytes = std::fs::read(path).unwrap();
    let (batches, _) = split_batches(&bytes);
    let mut position = 0u64;
    batches
        .into_iter()
        .map(|stored| {
            let at = position;
            position += stored.bytes.len() as u64;
            (at, stored)
        })
        .collect()
}

fn xor_byte(path: &Path, position: u64, mask: u8) {
    let mut bytes = std::fs::read(path).unwrap();
    bytes[position as usize] ^= mask;
    std::fs::write(path, &bytes).unwrap();
}

/// Which part of a batch a test damages, as an offset into the batch and a bit mask.
#[derive(Debug, Clone, Copy)]
enum Part {
    /// A byte of the records, covered by the CRC.
    CrcCovered,
    /// The second byte of batchLength: the length grows by 64 KiB, past the segment's end.
    BatchLength,
    Magic,
    /// A bit of baseOffset (not covered by the CRC).
    BaseOffset,
}

impl Part {
    fn at(self) -> (u64, u8) {
        match self {
            Part::CrcCovered => (80, 0x10),
            Part::BatchLength => (9, 0x01),
            Part::Magic => (16, 0x01),
            Part::BaseOffset => (7, 0x04),
        }
    }
}

const PARTS: [Part; 4] = [
    Part::CrcCovered,
    Part::BatchLength,
    Part::Magic,
    Part::BaseOffset,
];

fn quarantine_files(dir: &Path) -> Vec<String> {
    match std::fs::read_dir(dir.join("quarantine")) {
        Ok(entries) => entries
            .filter_map(|entry| entry.ok())
            .map(|entry| entry.file_name().to_string_lossy().into_owned())
            .collect(),
        Err(_) => Vec::new(),
    }
}

/// Reopens the log and checks the outcome every damage test expects: every acknowledged batch except
/// `damaged` reads back byte-identical, a read inside `damaged` gets `ReadError::Corrupt`, and new
/// appends get offsets after everything acknowledged.
fn check_reopened(dir: &Path, config: LogConfig, acked: &[Acked], damaged: &Acked, append: bool) {
    run(async {
        let log = PartitionLog::open(dir, config).await.unwrap();
        for batch in acked {
            let got = log.read_copy(batch.base_offset, 1 << 20, true).await;
            if batch.base_offset == damaged.base_offset {
                match got {
                    Err(ReadError::Corrupt { offset, .. }) => assert_eq!(offset, batch.base_offset),
                    other => panic!("read at the damaged batch gave {other:?}"),
                }
                continue;
            }
            let got = got.unwrap_or_else(|error| {
                panic!("acked batch at {} unreadable: {error}", batch.base_offset)
            });
            let (batches, _) = split_batches(&got);
            assert_eq!(
                batches.first().map(|first| first.bytes.as_slice()),
                Some(batch.bytes.as_slice()),
                "acked batch at {} changed",
                batch.base_offset
            );
        }
        let end = acked.last().unwrap().last_offset + 1;
        if append {
            assert_eq!(
                log.log_end_offset(),
                end,
                "no acknowledged offset is reused"
            );
            let info = log
                .append(storage_support::batch(1, 10, 0, 99), 0)
                .await
                .unwrap();
            assert_eq!(info.base_offset, end);
        } else {
            assert_eq!(log.log_end_offset(), end + 1);
        }
        log.close().await.unwrap();
    });
}

/// Every original segment file still exists, in the partition directory or in quarantine.
fn assert_nothing_unlinked(dir: &Path, originals: &BTreeSet<String>) {
    let quarantined = quarantine_files(dir);
    for name in originals {
        let kept = dir.join(name).exists() || quarantined.iter().any(|file| file.starts_with(name));
        assert!(
            kept,
            "{name} was unlinked; quarantine holds {quarantined:?}"
        );
    }
}

fn names(paths: &[PathBuf]) -> BTreeSet<String> {
    paths
        .iter()
        .map(|path| path.file_name().unwrap().to_string_lossy().into_owned())
        .collect()
}

/// Damage in the middle of durable data that recovery verifies: the segment is split around the
/// damaged batch and the original moved into quarantine. `forget_recovery_point` removes both
/// checkpoint files, so recovery must verify every segment (and cannot tell synced from unsynced).
fn damage_in_the_middle(part: Part, segment_index: usize, forget_recovery_point: bool) {
    let dir = tempfile::tempdir().unwrap();
    let config = small_config();
    let acked = write_durable(dir.path(), config.clone(), 60);
    let segments = segment_paths(dir.path());
    assert!(segments.len() >= 3, "test needs closed segments");
    let originals = names(&segments);
    let target = &segments[segment_index.min(segments.len() - 1)];
    let batches = batches_in(target);
    let (position, stored) = &batches[batches.len() / 2];
    let (at, mask) = part.at();
    xor_byte(target, position + at, mask);
    if forget_recovery_point {
        std::fs::remove_file(dir.path().join("recovery-checkpoint")).ok();
        std::fs::remove_file(dir.path().join("recovery-point")).unwrap();
    }
    let damaged = acked
        .iter()
        .find(|batch| batch.base_offset == stored.base_offset)
        .unwrap()
        .clone();
    check_reopened(dir.path(), config.clone(), &acked, &damaged, true);
    assert_nothing_unlinked(dir.path(), &originals);
    assert!(
        !quarantine_files(dir.path()).is_empty(),
        "{part:?}: the damaged segment is in quarantine"
    );
    let listed = std::fs::read_to_string(dir.path().join("quarantine/damaged-offsets")).unwrap();
    assert!(
        listed.starts_with(&format!("{} ", damaged.base_offset)),
        "{part:?}: damaged offsets recorded: {listed}"
    );
    // A second open finds a consistent log and changes nothing more.
    let before = quarantine_files(dir.path()).len();
    check_reopened(dir.path(), config, &acked, &damaged, false);
    assert_eq!(quarantine_files(dir.path()).len(), before);
}

#[test]
fn header_damage_below_the_recovery_point_in_the_active_segment_is_quarantined_not_truncated() {
    // Below the recovery point batch headers are walked (not CRC-checked, as in Kafka): a broken
    // length, magic or base offset is found and quarantined, and the batches after it are kept.
    for part in [Part::BatchLength, Part::Magic, Part::BaseOffset] {
        let dir = tempfile::tempdir().unwrap();
        let config = LogConfig {
            segment_bytes: 1 << 20,
            ..small_config()
        };
        let acked = write_durable(dir.path(), config.clone(), 40);
        let segments = segment_paths(dir.path());
        assert_eq!(segments.len(), 1);
        let originals = names(&segments);
        let batches = batches_in(&segments[0]);
        let (position, stored) = &batches[20];
        let (at, mask) = part.at();
        xor_byte(&segments[0], position + at, mask);
        let damaged = acked[20].clone();
        assert_eq!(damaged.base_offset, stored.base_offset);
        check_reopened(dir.path(), config, &acked, &damaged, true);
        assert_nothing_unlinked(dir.path(), &originals);
    }
}

#[test]
fn any_damage_in_a_closed_segment_without_a_recovery_point_is_quarantined() {
    for part in PARTS {
        damage_in_the_middle(part, 0, true);
    }
}

#[test]
fn any_damage_in_the_active_segment_without_a_recovery_point_is_quarantined() {
    for part in PARTS {
        damage_in_the_middle(part, usize::MAX, true);
    }
}

#[test]
fn damage_in_the_last_durable_batch_keeps_its_offsets_reserved() {
    // The damaged batch is the last one: nothing intact follows it. Its bytes are copied into
    // quarantine and cut, and the log resumes after the recovery point, so its offsets are never
    // handed out again.
    for part in PARTS {
        let dir = tempfile::tempdir().unwrap();
        let config = small_config();
        let acked = write_durable(dir.path(), config.clone(), 30);
        let segments = segment_paths(dir.path());
        let originals = names(&segments);
        let active = segments.last().unwrap();
        let (position, stored) = batches_in(active).last().unwrap().clone();
        let (at, mask) = part.at();
        xor_byte(active, position + at, mask);
        let damaged = acked.last().unwrap().clone();
        assert_eq!(damaged.base_offset, stored.base_offset);
        check_reopened(dir.path(), config, &acked, &damaged, true);
        assert_nothing_unlinked(dir.path(), &originals);
        assert!(
            quarantine_files(dir.path())
                .iter()
                .any(|name| name.contains(&format!(".log.{position}-"))),
            "{part:?}: the cut tail was copied aside: {:?}",
            quarantine_files(dir.path())
        );
    }
}

#[test]
fn an_unsynced_torn_tail_is_truncated_and_a_damaged_unsynced_middle_is_kept_aside() {
    let dir = tempfile::tempdir().unwrap();
    let config = LogConfig {
        segment_bytes: 1 << 20,
        ..small_config()
    };
    let acked = write_durable(dir.path(), config.clone(), 10);
    // Ten more batches that are never synced.
    run(async {
        let log = PartitionLog::open(dir.path(), config.clone())
            .await
            .unwrap();
        for seed in 10..20 {
            log.append(batch(2, 300, 0, seed), 0).await.unwrap();
        }
    });
    let segment = &segment_paths(dir.path())[0];
    let batches = batches_in(segment);
    assert_eq!(batches.len(), 20);
    // Flip a byte in the 15th batch (unsynced, with valid batches after it).
    xor_byte(segment, batches[15].0 + 80, 0x10);
    run(async {
        let log = PartitionLog::open(dir.path(), config.clone())
            .await
            .unwrap();
        assert_eq!(
            log.log_end_offset(),
            30,
            "cut at the damaged unsynced batch"
        );
        for batch in &acked {
            let got = log
                .read_copy(batch.base_offset, 1 << 20, true)
                .await
                .unwrap();
            assert_eq!(split_batches(&got).0[0].bytes, batch.bytes);
        }
    });
    let aside = quarantine_files(dir.path());
    assert!(
        aside
            .iter()
            .any(|name| name.contains(&format!(".log.{}-", batches[15].0))),
        "the cut unsynced bytes hold valid batches, so they were copied aside: {aside:?}"
    );
}

#[test]
fn the_recovery_point_follows_every_fdatasync() {
    let dir = tempfile::tempdir().unwrap();
    run(async {
        let log = PartitionLog::open(dir.path(), small_config())
            .await
            .unwrap();
        for seed in 0..5 {
            log.append(batch(2, 100, 0, seed), 0).await.unwrap();
            log.wait_durable(i64::MAX).await.unwrap();
            let bytes = std::fs::read(dir.path().join("recovery-point")).unwrap();
            let offset = ringbroker::storage::recovery_point::decoded_offset(&bytes);
            assert_eq!(offset, Some((seed as i64 + 1) * 2), "no tick needed");
        }
    });
}

#[test]
fn a_deleted_truncated_or_scrambled_index_is_detected_and_rebuilt() {
    type Damage = fn(&Path);
    let damages: [(&str, &str, Damage); 6] = [
        ("index", "deleted", |path| {
            std::fs::remove_file(path).unwrap()
        }),
        ("timeindex", "deleted", |path| {
            std::fs::remove_file(path).unwrap()
        }),
        ("index", "truncated", |path| {
            let length = std::fs::metadata(path).unwrap().len();
            std::fs::OpenOptions::new()
                .write(true)
                .open(path)
                .unwrap()
                .set_len(length / 16 * 8)
                .unwrap();
        }),
        ("timeindex", "truncated", |path| {
            std::fs::OpenOptions::new()
                .write(true)
                .open(path)
                .unwrap()
                .set_len(0)
                .unwrap();
        }),
        ("index", "scrambled", |path| {
            let mut bytes = std::fs::read(path).unwrap();
            bytes.reverse();
            std::fs::write(path, bytes).unwrap();
        }),
        ("timeindex", "scrambled", |path| {
            let mut bytes = std::fs::read(path).unwrap();
            let last = bytes.len() - 1;
            bytes[last] ^= 0x7f;
            std::fs::write(path, bytes).unwrap();
        }),
    ];
    // Small batches so the tail check's bound (one interval plus two batches) is below a segment.
    let config = LogConfig {
        max_message_bytes: 2048,
        ..small_config()
    };
    for (suffix, how, damage) in damages {
        let dir = tempfile::tempdir().unwrap();
        let acked = run(async {
            let log = PartitionLog::open(dir.path(), config.clone())
                .await
                .unwrap();
            let mut acked = Vec::new();
            for seed in 0..60u64 {
                let client = batch(2, 300, 1_000 + seed as i64 * 10, seed);
                let info = log.append(client.clone(), 0).await.unwrap();
                acked.push((info.base_offset, 1_000 + seed as i64 * 10));
            }
            log.close().await.unwrap();
            acked
        });
        let path = dir.path().join(format!("{:020}.{suffix}", 0));
        let before = std::fs::read(&path).unwrap();
        damage(&path);
        run(async {
            let log = PartitionLog::open(dir.path(), config.clone())
                .await
                .unwrap();
            for (offset, timestamp) in &acked {
                assert_eq!(
                    log.offset_for_timestamp(*timestamp).await.unwrap(),
                    Some((*offset, *timestamp)),
                    "{suffix} {how}: ListOffsets by timestamp {timestamp}"
                );
            }
            storage_support::check_contiguous(&log).await;
            log.close().await.unwrap();
        });
        assert_eq!(
            std::fs::read(&path).unwrap(),
            before,
            "{suffix} {how}: rebuilt to the same entries"
        );
    }
}

#[test]
fn a_read_at_a_damaged_header_in_a_closed_segment_answers_corrupt_not_nothing() {
    // After a clean close closed segments are trusted without a scan; the damage is met by a read.
    for part in [Part::BatchLength, Part::Magic] {
        let dir = tempfile::tempdir().unwrap();
        let config = small_config();
        let acked = run(async {
            let log = PartitionLog::open(dir.path(), config.clone())
                .await
                .unwrap();
            let mut acked = Vec::new();
            for seed in 0..60u64 {
                let info = log.append(batch(2, 300, 0, seed), 0).await.unwrap();
                acked.push(info.base_offset);
            }
            log.close().await.unwrap();
            acked
        });
        let first = &segment_paths(dir.path())[0];
        let batches = batches_in(first);
        let (position, stored) = &batches[3];
        let (at, mask) = part.at();
        xor_byte(first, position + at, mask);
        run(async {
            let log = PartitionLog::open(dir.path(), config.clone())
                .await
                .unwrap();
            for _ in 0..3 {
                match log.read_copy(stored.base_offset, 1 << 20, true).await {
                    Err(ReadError::Corrupt { offset, .. }) => {
                        assert_eq!(offset, stored.base_offset)
                    }
                    other => panic!("{part:?}: read at the damaged batch gave {other:?}"),
                }
            }
            // Every other batch still reads, including those right after it in its segment; a
            // range that starts before the damage ends at it.
            for &base in &acked {
                if base == stored.base_offset {
                    continue;
                }
                let got = log.read_copy(base, 1 << 20, true).await.unwrap();
                let (batches, _) = split_batches(&got);
                assert_eq!(batches[0].base_offset, base, "{part:?}");
                assert!(
                    batches
                        .iter()
                        .all(|batch| batch.base_offset != stored.base_offset),
                    "{part:?}: a read from {base} ran into the damaged batch"
                );
            }
        });
    }
}

#[test]
fn a_truncated_closed_segment_keeps_the_rest_and_records_the_loss() {
    // A closed segment loses its last 100 bytes after a clean stop (a lost write-back, a bad copy):
    // the partial batch is copied aside, the lost offsets are recorded up to the next segment, and
    // every other batch, in this segment and later ones, still reads.
    let dir = tempfile::tempdir().unwrap();
    let config = small_config();
    let acked = run(async {
        let log = PartitionLog::open(dir.path(), config.clone())
            .await
            .unwrap();
        let mut acked = Vec::new();
        for seed in 0..60u64 {
            let client = batch(2, 300, 0, seed);
            let info = log.append(client.clone(), 0).await.unwrap();
            acked.push(Acked {
                base_offset: info.base_offset,
                last_offset: info.last_offset,
                bytes: as_stored(&client, info.base_offset),
            });
        }
        log.close().await.unwrap();
        acked
    });
    let segments = segment_paths(dir.path());
    let originals = names(&segments);
    let first = &segments[0];
    let cut_batch = batches_in(first).last().unwrap().1.base_offset;
    let length = std::fs::metadata(first).unwrap().len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(first)
        .unwrap()
        .set_len(length - 100)
        .unwrap();
    let damaged = acked
        .iter()
        .find(|batch| batch.base_offset == cut_batch)
        .unwrap()
        .clone();
    check_reopened(dir.path(), config, &acked, &damaged, true);
    assert_nothing_unlinked(dir.path(), &originals);
    let listed = std::fs::read_to_string(dir.path().join("quarantine/damaged-offsets")).unwrap();
    assert!(
        listed.starts_with(&format!(
            "{} {} ",
            damaged.base_offset,
            damaged.last_offset + 1
        )),
        "{listed}"
    );
}

#[test]
fn the_scrubber_finds_a_flipped_byte_at_rest_and_reads_stop_serving_it() {
    let dir = tempfile::tempdir().unwrap();
    let config = small_config();
    let acked = run(async {
        let log = PartitionLog::open(dir.path(), config.clone())
            .await
            .unwrap();
        let mut acked = Vec::new();
        for seed in 0..60u64 {
            let client = batch(2, 300, 0, seed);
            let info = log.append(client.clone(), 0).await.unwrap();
            acked.push(Acked {
                base_offset: info.base_offset,
                last_offset: info.last_offset,
                bytes: as_stored(&client, info.base_offset),
            });
        }
        log.close().await.unwrap();
        acked
    });
    let first = &segment_paths(dir.path())[0];
    let (position, stored) = batches_in(first)[5].clone();
    xor_byte(first, position + 80, 0x10);
    run(async {
        let log = PartitionLog::open(dir.path(), config.clone())
            .await
            .unwrap();
        // Trusted at open and not checked by reads: served as stored until the scrubber runs.
        let before = log
            .read_copy(stored.base_offset, 1 << 20, true)
            .await
            .unwrap();
        assert_eq!(split_batches(&before).0[0].base_offset, stored.base_offset);
        let mut cursor = ringbroker::storage::scrub::ScrubCursor::default();
        let mut steps = 0;
        // Bounded: a 4 KiB budget per step over a few 16 KiB segments.
        loop {
            let step = log.scrub_step(&mut cursor, 4096).await.unwrap();
            steps += 1;
            assert!(steps < 1000, "the pass must end");
            if step.pass_finished {
                break;
            }
        }
        assert_eq!(log.damaged_batches_found(), 1);
        match log.read_copy(stored.base_offset, 1 << 20, true).await {
            Err(ReadError::Corrupt { offset, .. }) => assert_eq!(offset, stored.base_offset),
            other => panic!("read at the scrubbed damage gave {other:?}"),
        }
        for batch in &acked {
            if batch.base_offset == stored.base_offset {
                continue;
            }
            let got = log
                .read_copy(batch.base_offset, 1 << 20, true)
                .await
                .unwrap();
            let (batches, _) = split_batches(&got);
            assert_eq!(batches[0].bytes, batch.bytes, "batch {}", batch.base_offset);
            assert!(
                batches.iter().all(|b| b.base_offset != stored.base_offset),
                "a range from {} includes the damaged batch",
                batch.base_offset
            );
        }
        // A second pass finds nothing new.
        loop {
            if log
                .scrub_step(&mut cursor, 1 << 20)
                .await
                .unwrap()
                .pass_finished
            {
                break;
            }
        }
        assert_eq!(log.damaged_batches_found(), 1);
    });
}
