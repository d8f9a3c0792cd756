//! storage_integrity_props: property test of the log under crashes and disk damage. Random appends
//! (acknowledged with an fdatasync or not), rolls, unclean and clean reopens, and single flipped bytes
//! in a random batch (its CRC-covered bytes, batchLength or magic) while the log is down, against a
//! model of acknowledged batches: after every reopen, every acknowledged batch outside a damaged one
//! must read back byte-identical, no acknowledged offset is handed out again, and a read at a damaged
//! batch gets either its bytes or `ReadError::Corrupt`, never another batch. The seed is printed on
//! failure; STORAGE_PROPTEST_SEED=<hex> replays it, STORAGE_PROPTEST_CASES scales it.

mod storage_support;

use std::collections::BTreeSet;
use std::path::Path;
use std::time::{SystemTime, UNIX_EPOCH};

use proptest::prelude::*;
use proptest::test_runner::{Config, RngAlgorithm, TestCaseError, TestRng, TestRunner};
use ringbroker::storage::{LogConfig, PartitionLog, ReadError};
use storage_support::{as_stored, batch, run, split_batches};

#[derive(Debug, Clone)]
enum Op {
    /// Appends batches of (record count, value bytes) in one call; `durable` waits for the fdatasync.
    Append {
        shape: Vec<(i32, usize)>,
        durable: bool,
    },
    Roll,
    DropReopen,
    CloseReopen,
    /// With the log down (after an unclean stop), flips one byte of a batch picked by `segment` and
    /// `batch` (mod the counts); `part` 0 = CRC-covered byte, 1 = batchLength, 2 = magic.
    Corrupt {
        segment: u32,
        batch: u32,
        part: u8,
    },
}

fn op_strategy() -> impl Strategy<Value = Op> {
    prop_oneof![
        6 => (prop::collection::vec((1..6i32, 0..250usize), 1..3), any::<bool>())
            .prop_map(|(shape, durable)| Op::Append { shape, durable }),
        1 => Just(Op::Roll),
        1 => Just(Op::DropReopen),
        1 => Just(Op::CloseReopen),
        2 => (any::<u32>(), any::<u32>(), 0..3u8)
            .prop_map(|(segment, batch, part)| Op::Corrupt { segment, batch, part }),
    ]
}

fn config() -> LogConfig {
    LogConfig {
        segment_bytes: 4 * 1024,
        index_interval_bytes: 300,
        max_message_bytes: 4096,
        retention_ms: None,
        ..LogConfig::default()
    }
}

#[derive(Debug, Clone)]
struct Acked {
    base: i64,
    bytes: Vec<u8>,
}

/// Flips one byte of a batch in the partition directory; returns the damaged batch's base offset.
fn corrupt(dir: &Path, segment: u32, batch: u32, part: u8) -> Option<i64> {
    let mut logs: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|entry| entry.unwrap().path())
        .filter(|path| path.extension().is_some_and(|ext| ext == "log"))
        .collect();
    logs.sort();
    let path = logs.get(segment as usize % logs.len().max(1))?;
    let mut bytes = std::fs::read(path).unwrap();
    let (batches, _) = split_batches(&bytes);
    if batches.is_empty() {
        return None;
    }
    let index = batch as usize % batches.len();
    let position: usize = batches[..index].iter().map(|b| b.bytes.len()).sum();
    let size = batches[index].bytes.len();
    let (at, mask) = match part {
        0 => (80.min(size - 1), 0x10),
        1 => (9, 0x01),
        _ => (16, 0x01),
    };
    bytes[position + at] ^= mask;
    std::fs::write(path, bytes).unwrap();
    Some(batches[index].base_offset)
}

fn check_sequence(ops: Vec<Op>) -> Result<(), TestCaseError> {
    let dir = tempfile::tempdir().map_err(|e| TestCaseError::fail(e.to_string()))?;
    run(async move {
        let mut log = PartitionLog::open(dir.path(), config()).await.unwrap();
        let mut acked: Vec<Acked> = Vec::new();
        let mut unacked: Vec<Acked> = Vec::new();
        let mut damaged: BTreeSet<i64> = BTreeSet::new();
        let mut clock_ms: i64 = 1_000_000;
        for (step, op) in ops.into_iter().enumerate() {
            match op {
                Op::Append { shape, durable } => {
                    let mut records = Vec::new();
                    let mut pieces = Vec::new();
                    for (index, (count, value_bytes)) in shape.into_iter().enumerate() {
                        clock_ms += 3;
                        let client = batch(count, value_bytes, clock_ms, (step * 8 + index) as u64);
                        pieces.push((count, client.clone()));
                        records.extend_from_slice(&client);
                    }
                    let info = log.append(records.into(), clock_ms).await.unwrap();
                    let mut next = info.base_offset;
                    for (count, client) in pieces {
                        unacked.push(Acked {
                            base: next,
                            bytes: as_stored(&client, next),
                        });
                        next += i64::from(count);
                    }
                    if durable {
                        log.wait_durable(i64::MAX).await.unwrap();
                        acked.append(&mut unacked);
                    }
                }
                Op::Roll => log.roll(clock_ms).await.unwrap(),
                Op::DropReopen | Op::CloseReopen | Op::Corrupt { .. } => {
                    if matches!(op, Op::CloseReopen) {
                        log.close().await.unwrap();
                        acked.append(&mut unacked);
                    } else {
                        // What an unclean stop may lose is not acknowledged; the model forgets it.
                        unacked.clear();
                    }
                    drop(log);
                    if let Op::Corrupt {
                        segment,
                        batch,
                        part,
                    } = op
                        && let Some(base) = corrupt(dir.path(), segment, batch, part)
                    {
                        damaged.insert(base);
                    }
                    log = PartitionLog::open(dir.path(), config()).await.unwrap();
                    check_acked(&log, &acked, &damaged, step).await?;
                }
            }
        }
        Ok(())
    })
}

async fn check_acked(
    log: &PartitionLog,
    acked: &[Acked],
    damaged: &BTreeSet<i64>,
    step: usize,
) -> Result<(), TestCaseError> {
    if let Some(last) = acked.last() {
        prop_assert!(
            log.log_end_offset() > last.base,
            "step {step}: log end {} at or below acknowledged offset {}",
            log.log_end_offset(),
            last.base
        );
    }
    for batch in acked {
        let read = log.read_copy(batch.base, 1 << 20, true).await;
        if damaged.contains(&batch.base) {
            match read {
                Ok(bytes) => {
                    let (batches, _) = split_batches(&bytes);
                    prop_assert!(
                        batches
                            .first()
                            .is_none_or(|first| first.base_offset == batch.base),
                        "step {step}: a read at damaged batch {} returned another batch",
                        batch.base
                    );
                }
                Err(ReadError::Corrupt { .. }) => {}
                Err(error) => {
                    return Err(TestCaseError::fail(format!(
                        "step {step}: read at damaged batch {}: {error}",
                        batch.base
                    )));
                }
            }
            continue;
        }
        let bytes = read.map_err(|error| {
            TestCaseError::fail(format!(
                "step {step}: acknowledged batch {} unreadable: {error}",
                batch.base
            ))
        })?;
        let (batches, _) = split_batches(&bytes);
        prop_assert_eq!(
            batches.first().map(|first| first.bytes.clone()),
            Some(batch.bytes.clone()),
            "step {}: acknowledged batch {} changed",
            step,
            batch.base
        );
    }
    Ok(())
}

#[test]
fn acknowledged_batches_survive_crashes_and_damage_elsewhere() {
    let seed: [u8; 32] = match std::env::var("STORAGE_PROPTEST_SEED") {
        Ok(hex) => {
            let mut seed = [0u8; 32];
            for (index, byte) in seed.iter_mut().enumerate() {
                *byte = u8::from_str_radix(hex.get(index * 2..index * 2 + 2).unwrap_or("00"), 16)
                    .unwrap_or(0);
            }
            seed
        }
        Err(_) => {
            let nanos = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .unwrap()
                .as_nanos();
            let mut seed = [0u8; 32];
            seed[..16].copy_from_slice(&nanos.to_le_bytes());
            seed
        }
    };
    let hex: String = seed.iter().map(|byte| format!("{byte:02x}")).collect();
    let cases = std::env::var("STORAGE_PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(24);
    let mut runner = TestRunner::new_with_rng(
        Config {
            cases,
            failure_persistence: None,
            ..Config::default()
        },
        TestRng::from_seed(RngAlgorithm::ChaCha, &seed),
    );
    let result = runner.run(&prop::collection::vec(op_strategy(), 1..40), check_sequence);
    if let Err(error) = result {
        panic!("{error}\nreplay with STORAGE_PROPTEST_SEED={hex}");
    }
}
