//! storage_props: property tests of the partition log. Random sequences of append / roll / read /
//! retention / close / reopen (clean and unclean) run against the real log and a simple in-memory
//! model; after every step offsets, read ranges and retention must agree with the model. The seed is
//! printed on failure; set STORAGE_PROPTEST_SEED=<hex> to replay it.

mod storage_support;

use std::time::{SystemTime, UNIX_EPOCH};

use proptest::prelude::*;
use proptest::test_runner::{Config, RngAlgorithm, TestCaseError, TestRng, TestRunner};
use ringbroker::storage::{AppendError, LogConfig, PartitionLog, ReadError};
use storage_support::{as_stored, batch, run};

#[derive(Debug, Clone)]
enum Op {
    /// Appends batches of (record count, value bytes); all in one call.
    Append(Vec<(i32, usize)>),
    Roll,
    /// Reads at the offset `pick` (mod the readable range) with a byte limit.
    Read {
        pick: u32,
        max_bytes: u32,
        min_one_batch: bool,
    },
    Retention {
        bytes: Option<u64>,
        age_ms: Option<u64>,
    },
    TimestampLookup {
        pick: u32,
    },
    /// `tick`: with a zero checkpoint interval, every tick moves the recovery checkpoint.
    Tick,
    CloseReopen,
    DropReopen,
}

fn op_strategy() -> impl Strategy<Value = Op> {
    prop_oneof![
        6 => prop::collection::vec((1..6i32, 0..400usize), 1..4).prop_map(Op::Append),
        1 => Just(Op::Roll),
        4 => (any::<u32>(), 1..6000u32, any::<bool>())
            .prop_map(|(pick, max_bytes, min_one_batch)| Op::Read { pick, max_bytes, min_one_batch }),
        1 => (prop::option::of(2_000..30_000u64), prop::option::of(0..400u64))
            .prop_map(|(bytes, age_ms)| Op::Retention { bytes, age_ms }),
        1 => any::<u32>().prop_map(|pick| Op::TimestampLookup { pick }),
        1 => Just(Op::Tick),
        1 => Just(Op::CloseReopen),
        1 => Just(Op::DropReopen),
    ]
}

/// One stored batch in the model.
#[derive(Debug, Clone)]
struct ModelBatch {
    base: i64,
    last: i64,
    bytes: Vec<u8>,
    max_timestamp: i64,
    first_timestamp: i64,
}

#[derive(Debug, Default)]
struct Model {
    batches: Vec<ModelBatch>,
    log_start: i64,
    log_end: i64,
}

fn config() -> LogConfig {
    LogConfig {
        segment_bytes: 4 * 1024,
        index_interval_bytes: 300,
        retention_ms: None,
        recovery_checkpoint_interval_ms: 0,
        ..LogConfig::default()
    }
}

fn check_sequence(ops: Vec<Op>) -> Result<(), TestCaseError> {
    let dir = tempfile::tempdir().map_err(|e| TestCaseError::fail(e.to_string()))?;
    run(async move {
        let mut log = PartitionLog::open(dir.path(), config()).await.unwrap();
        let mut model = Model::default();
        // The model clock: every append advances it, and record timestamps follow it.
        let mut clock_ms: i64 = 1_000_000;
        for (step, op) in ops.into_iter().enumerate() {
            match op {
                Op::Append(shape) => {
                    let mut records = Vec::new();
                    let mut pieces = Vec::new();
                    for (index, (count, value_bytes)) in shape.into_iter().enumerate() {
                        clock_ms += 3;
                        let client = batch(count, value_bytes, clock_ms, (step * 8 + index) as u64);
                        pieces.push((count, client.clone(), clock_ms));
                        records.extend_from_slice(&client);
                    }
                    let total = records.len();
                    let result = log.append(records.into(), clock_ms).await;
                    if total as u64 > config().segment_bytes {
                        let refused =
                            matches!(result, Err(AppendError::RecordBatchTooLarge { .. }));
                        prop_assert!(
                            refused,
                            "a record set larger than a segment must be refused"
                        );
                        continue;
                    }
                    let info = result.unwrap();
                    prop_assert_eq!(info.base_offset, model.log_end);
                    let mut next = model.log_end;
                    for (count, client, timestamp) in pieces {
                        model.batches.push(ModelBatch {
                            base: next,
                            last: next + i64::from(count) - 1,
                            bytes: as_stored(&client, next),
                            max_timestamp: timestamp + i64::from(count) - 1,
                            first_timestamp: timestamp,
                        });
                        next += i64::from(count);
                    }
                    prop_assert_eq!(info.last_offset, next - 1);
                    model.log_end = next;
                }
                Op::Roll => log.roll(clock_ms).await.unwrap(),
                Op::Read {
                    pick,
                    max_bytes,
                    min_one_batch,
                } => {
                    let span = (model.log_end - model.log_start + 1) as u64;
                    let offset = model.log_start + (u64::from(pick) % span) as i64;
                    let got = log
                        .read_copy(offset, max_bytes, min_one_batch)
                        .await
                        .unwrap();
                    let expected = expected_read(
                        &model,
                        &log.segment_base_offsets(),
                        offset,
                        max_bytes,
                        min_one_batch,
                    );
                    prop_assert_eq!(
                        got.as_ref(),
                        expected.as_slice(),
                        "read at {} max {}",
                        offset,
                        max_bytes
                    );
                    // Below the log start and past the log end are out of range.
                    let below = log.read(model.log_start - 1, max_bytes, true).await;
                    let below_is_out_of_range =
                        matches!(below, Err(ReadError::OffsetOutOfRange { .. }));
                    prop_assert!(below_is_out_of_range, "read below the log start");
                    let past = log.read(model.log_end + 1, max_bytes, true).await;
                    let past_is_out_of_range =
                        matches!(past, Err(ReadError::OffsetOutOfRange { .. }));
                    prop_assert!(past_is_out_of_range, "read past the log end");
                }
                Op::Retention { bytes, age_ms } => {
                    let bases = log.segment_base_offsets();
                    let retention_ms = age_ms.map(|age| age * 3);
                    log.set_config(LogConfig {
                        retention_bytes: bytes,
                        retention_ms,
                        ..config()
                    });
                    let expected_start =
                        expected_retention(&model, &bases, bytes, retention_ms, clock_ms);
                    let outcome = log.enforce_retention(clock_ms).await.unwrap();
                    prop_assert_eq!(outcome.log_start_offset, expected_start);
                    model.batches.retain(|stored| stored.base >= expected_start);
                    model.log_start = expected_start;
                    log.set_config(config());
                }
                Op::TimestampLookup { pick } => {
                    let target = match model.batches.first() {
                        Some(first) => first.first_timestamp + i64::from(pick % 2000) - 5,
                        None => 0,
                    };
                    let got = log.offset_for_timestamp(target).await.unwrap();
                    let expected = model
                        .batches
                        .iter()
                        .find(|b| b.max_timestamp >= target)
                        .map(|b| {
                            let offset = (b.base + (target - b.first_timestamp).max(0)).min(b.last);
                            (offset, b.first_timestamp + (offset - b.base))
                        });
                    prop_assert_eq!(got, expected, "timestamp {}", target);
                }
                Op::Tick => log.tick(clock_ms).await.unwrap(),
                Op::CloseReopen => {
                    log.close().await.unwrap();
                    drop(log);
                    log = PartitionLog::open(dir.path(), config()).await.unwrap();
                }
                Op::DropReopen => {
                    drop(log);
                    log = PartitionLog::open(dir.path(), config()).await.unwrap();
                }
            }
            prop_assert_eq!(
                log.log_start_offset(),
                model.log_start,
                "log start after step {}",
                step
            );
            prop_assert_eq!(
                log.log_end_offset(),
                model.log_end,
                "log end after step {}",
                step
            );
            prop_assert_eq!(log.high_watermark(), model.log_end);
            let bases = log.segment_base_offsets();
            prop_assert_eq!(bases[0], model.log_start);
            for base in &bases[1..] {
                prop_assert!(
                    model.batches.iter().any(|b| b.base == *base) || *base == model.log_end,
                    "segment base {} is not a batch boundary",
                    base
                );
            }
        }
        Ok(())
    })
}

/// What a read must return: from the batch holding `offset` to the end of its segment, cut by the
/// byte limit per Kafka's rules.
fn expected_read(
    model: &Model,
    bases: &[i64],
    offset: i64,
    max_bytes: u32,
    min_one_batch: bool,
) -> Vec<u8> {
    if offset >= model.log_end {
        return Vec::new();
    }
    let segment_end = bases
        .iter()
        .copied()
        .find(|base| *base > offset)
        .unwrap_or(i64::MAX);
    let mut bytes = Vec::new();
    let mut first_len = None;
    for stored in model
        .batches
        .iter()
        .filter(|b| b.last >= offset && b.base < segment_end)
    {
        first_len.get_or_insert(stored.bytes.len());
        bytes.extend_from_slice(&stored.bytes);
    }
    let first_len = first_len.unwrap_or(0);
    let len = if max_bytes as usize >= first_len {
        bytes.len().min(max_bytes as usize)
    } else if min_one_batch {
        first_len
    } else {
        0
    };
    bytes.truncate(len);
    bytes
}

/// Kafka's retention rule over the log's segments: delete the oldest closed segments while the size
/// beyond the oldest one is still at least `retention_bytes`, or its newest record is older than
/// `retention_ms`.
fn expected_retention(
    model: &Model,
    bases: &[i64],
    bytes: Option<u64>,
    age_ms: Option<u64>,
    now_ms: i64,
) -> i64 {
    let segment_of = |index: usize| {
        let end = bases.get(index + 1).copied().unwrap_or(i64::MAX);
        model
            .batches
            .iter()
            .filter(move |b| b.base >= bases[index] && b.base < end)
    };
    let mut total: u64 = model.batches.iter().map(|b| b.bytes.len() as u64).sum();
    let mut start = model.log_start;
    for index in 0..bases.len() - 1 {
        let size: u64 = segment_of(index).map(|b| b.bytes.len() as u64).sum();
        let newest = segment_of(index)
            .map(|b| b.max_timestamp)
            .max()
            .unwrap_or(-1);
        let too_big = bytes.is_some_and(|limit| total - size >= limit);
        let too_old = age_ms.is_some_and(|limit| newest >= 0 && now_ms - newest > limit as i64);
        if !(too_big || too_old) {
            break;
        }
        total -= size;
        start = bases[index + 1];
    }
    start
}

#[test]
fn random_operation_sequences_match_the_model() {
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
        .unwrap_or(48);
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
