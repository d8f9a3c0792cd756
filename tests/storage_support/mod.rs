//! storage_support: helpers shared by the storage integration tests: a runtime, configs, batches and
//! a parser that checks what a read returned.

#![allow(dead_code)]

use std::future::Future;

use bytes::Bytes;
use ringbroker::storage::LogConfig;
use ringbroker::storage::testing::build_batch;

/// Runs a future on a fresh compio runtime, as a shard thread would.
pub fn run<F: Future>(future: F) -> F::Output {
    compio::runtime::Runtime::new()
        .expect("compio runtime")
        .block_on(future)
}

/// A small-segment config so tests roll, index and retain without writing much.
pub fn small_config() -> LogConfig {
    LogConfig {
        segment_bytes: 16 * 1024,
        index_interval_bytes: 512,
        retention_ms: None,
        ..LogConfig::default()
    }
}

/// A client batch of `count` records with values of `value_bytes`, distinct per `seed`.
pub fn batch(count: i32, value_bytes: usize, timestamp: i64, seed: u64) -> Bytes {
    Bytes::from(build_batch(count, value_bytes, timestamp, seed))
}

/// One batch as stored: base offset, last offset, and its bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredBatch {
    pub base_offset: i64,
    pub last_offset: i64,
    pub bytes: Vec<u8>,
}

/// Splits read bytes into whole batches; a trailing partial batch is returned separately.
pub fn split_batches(bytes: &[u8]) -> (Vec<StoredBatch>, usize) {
    let mut batches = Vec::new();
    let mut position = 0;
    while bytes.len() - position >= 61 {
        let length = i32::from_be_bytes(bytes[position + 8..position + 12].try_into().unwrap())
            as usize
            + 12;
        if position + length > bytes.len() {
            break;
        }
        let base_offset = i64::from_be_bytes(bytes[position..position + 8].try_into().unwrap());
        let delta = i32::from_be_bytes(bytes[position + 23..position + 27].try_into().unwrap());
        batches.push(StoredBatch {
            base_offset,
            last_offset: base_offset + i64::from(delta),
            bytes: bytes[position..position + length].to_vec(),
        });
        position += length;
    }
    (batches, bytes.len() - position)
}

/// The bytes a client batch becomes once stored at `base_offset` (baseOffset and leader epoch set).
pub fn as_stored(client_batch: &[u8], base_offset: i64) -> Vec<u8> {
    let mut stored = client_batch.to_vec();
    stored[0..8].copy_from_slice(&base_offset.to_be_bytes());
    stored[12..16].copy_from_slice(&ringbroker::storage::LEADER_EPOCH.to_be_bytes());
    stored
}

/// Reads the whole log below the high watermark and checks that batches follow each other without a
/// gap or overlap from the log start to the log end.
pub async fn check_contiguous(log: &ringbroker::storage::PartitionLog) {
    let mut next = log.log_start_offset();
    // Bounded by the log end: each round moves `next` past at least one whole batch.
    while next < log.high_watermark() {
        let bytes = log.read_copy(next, 1 << 20, true).await.expect("read");
        let (batches, _) = split_batches(&bytes);
        assert!(!batches.is_empty(), "no whole batch at offset {next}");
        for (index, stored) in batches.iter().enumerate() {
            if index == 0 {
                assert!(
                    stored.base_offset <= next && next <= stored.last_offset,
                    "offset {next} not in its batch"
                );
            } else {
                assert_eq!(stored.base_offset, next, "gap or overlap at offset {next}");
            }
            next = stored.last_offset + 1;
        }
    }
    assert_eq!(next, log.log_end_offset());
}
