//! benches/storage: criterion benches of the partition log beside the raw file-system figures of the
//! same disk: sequential buffered writes and fdatasync latency (the ceiling), append throughput (1 KiB
//! records in 16 KiB batches), append + group commit, appends with buffered vs uncached
//! (`RWF_DONTCACHE`) writes, group commit with 1, 8 and 64 appends per fdatasync, offset lookup in a
//! 1 GiB log, and recovery of a 1 GiB log with the clean marker and with a 64 MiB unflushed tail.
//!
//! The write-mode pair measures the cost per append while the page cache absorbs it (a bench of a
//! few seconds never reaches the dirty threshold); what uncached writes change under sustained load
//! is measured by ringbench over 8 GB (docs/benchmarks.md).
//!
//! Sizes are full only under `cargo bench` (`--bench` in the arguments); under `cargo test
//! --all-targets` criterion runs each bench once and the logs here are a few MiB. Override with
//! STORAGE_BENCH_LOG_MIB and STORAGE_BENCH_TAIL_MIB; STORAGE_BENCH_DIR picks the disk (default: the
//! system temp dir).

use std::hint::black_box;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use bytes::Bytes;
use compio::BufResult;
use compio::fs::OpenOptions;
use compio::io::AsyncWriteAt;
use compio::runtime::Runtime;
use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use ringbroker::storage::testing::build_batch_of_size;
use ringbroker::storage::{LogConfig, PartitionLog};

const BATCH_BYTES: usize = 16 * 1024;
const RECORD_BYTES: usize = 1024;

struct Sizes {
    log_bytes: u64,
    tail_bytes: u64,
    /// The append benches start a fresh log after this many bytes, so a long run does not fill the disk.
    append_cap_bytes: u64,
}

fn sizes() -> Sizes {
    let full = std::env::args().any(|argument| argument == "--bench");
    let mib = |name: &str, full_mib: u64, test_mib: u64| {
        std::env::var(name)
            .ok()
            .and_then(|value| value.parse().ok())
            .unwrap_or(if full { full_mib } else { test_mib })
            << 20
    };
    Sizes {
        log_bytes: mib("STORAGE_BENCH_LOG_MIB", 1024, 8),
        tail_bytes: mib("STORAGE_BENCH_TAIL_MIB", 64, 1),
        append_cap_bytes: if full { 512 << 20 } else { 16 << 20 },
    }
}

fn bench_dir() -> tempfile::TempDir {
    match std::env::var("STORAGE_BENCH_DIR") {
        Ok(dir) => tempfile::tempdir_in(dir).expect("bench dir"),
        Err(_) => tempfile::tempdir().expect("temp dir"),
    }
}

/// 300 MiB segments: a 1 GiB log spans four, and the 64 MiB tail of the recovery bench lies inside the
/// active one (a roll would move the recovery checkpoint past it).
fn bench_config() -> LogConfig {
    LogConfig {
        segment_bytes: 300 << 20,
        retention_ms: None,
        recovery_checkpoint_interval_ms: u64::MAX / 4,
        ..LogConfig::default()
    }
}

fn client_batch(seed: u64) -> Bytes {
    Bytes::from(build_batch_of_size(
        BATCH_BYTES,
        RECORD_BYTES,
        1_700_000_000_000,
        seed,
    ))
}

/// Appends 16 KiB batches until the log holds `bytes`.
async fn fill(log: &PartitionLog, bytes: u64) {
    let batch = client_batch(1);
    let rounds = bytes.div_ceil(batch.len() as u64);
    for _ in 0..rounds {
        log.append(batch.clone(), 0).await.expect("append");
    }
}

/// Sequential buffered writes of `chunk` through io_uring, restarting the file at the append cap (the
/// truncation is not timed), as the append bench restarts its log.
fn sequential_writes(
    runtime: &Runtime,
    path: &Path,
    chunk: &[u8],
    cap: u64,
    iters: u64,
) -> Duration {
    runtime.block_on(async {
        let file = OpenOptions::new()
            .create(true)
            .write(true)
            .open(path)
            .await
            .unwrap();
        file.set_len(0).await.unwrap();
        let mut position = 0u64;
        let mut elapsed = Duration::ZERO;
        let mut started = Instant::now();
        for _ in 0..iters {
            if position >= cap {
                elapsed += started.elapsed();
                file.set_len(0).await.unwrap();
                position = 0;
                started = Instant::now();
            }
            let BufResult(result, _) = (&mut &file).write_at(chunk.to_vec(), position).await;
            position += result.unwrap() as u64;
        }
        elapsed + started.elapsed()
    })
}

fn raw_file_system(c: &mut Criterion, runtime: &Runtime, sizes: &Sizes) {
    let dir = bench_dir();
    let path = dir.path().join("raw");
    let chunk = vec![0x5au8; BATCH_BYTES];
    let mut group = c.benchmark_group("raw_fs");
    group.throughput(Throughput::Bytes(BATCH_BYTES as u64));
    group.bench_function("buffered_write_16KiB", |b| {
        b.iter_custom(|iters| {
            sequential_writes(runtime, &path, &chunk, sizes.append_cap_bytes, iters)
        })
    });
    // The same writes at the size of the append bench's batch (15 records of 1 KiB, not a multiple of
    // the page size, as client batches are not): the raw figure that append is compared with like for
    // like, since a write that ends mid-page costs the kernel more than one that ends on a page.
    let batch_sized = vec![0x5au8; client_batch(7).len()];
    group.throughput(Throughput::Bytes(batch_sized.len() as u64));
    group.bench_function("buffered_write_batch_sized", |b| {
        b.iter_custom(|iters| {
            sequential_writes(runtime, &path, &batch_sized, sizes.append_cap_bytes, iters)
        })
    });
    group.throughput(Throughput::Bytes(BATCH_BYTES as u64));
    group.bench_function("write_16KiB_then_fdatasync", |b| {
        b.iter_custom(|iters| {
            runtime.block_on(async {
                let file = OpenOptions::new()
                    .create(true)
                    .write(true)
                    .open(&path)
                    .await
                    .unwrap();
                file.set_len(0).await.unwrap();
                let started = Instant::now();
                for round in 0..iters {
                    let position = (round % 4096) * BATCH_BYTES as u64;
                    let BufResult(result, _) = (&mut &file).write_at(chunk.clone(), position).await;
                    result.unwrap();
                    file.sync_data().await.unwrap();
                }
                started.elapsed()
            })
        })
    });
    group.finish();
}

fn append(c: &mut Criterion, runtime: &Runtime, sizes: &Sizes) {
    let dir = bench_dir();
    let log_dir = dir.path().join("append-0");
    let batch = client_batch(7);
    let mut group = c.benchmark_group("append");
    group.throughput(Throughput::Bytes(batch.len() as u64));
    group.bench_function("16KiB_batches_1KiB_records", |b| {
        b.iter_custom(|iters| {
            runtime.block_on(async {
                let mut log = PartitionLog::open(&log_dir, bench_config()).await.unwrap();
                let mut elapsed = Duration::ZERO;
                let mut started = Instant::now();
                for _ in 0..iters {
                    if log.size_bytes() >= sizes.append_cap_bytes {
                        elapsed += started.elapsed();
                        log.delete().await.unwrap();
                        log = PartitionLog::open(&log_dir, bench_config()).await.unwrap();
                        started = Instant::now();
                    }
                    black_box(log.append(batch.clone(), 0).await.unwrap());
                }
                elapsed += started.elapsed();
                log.delete().await.unwrap();
                elapsed
            })
        })
    });
    group.bench_function("16KiB_batch_then_wait_durable", |b| {
        b.iter_custom(|iters| {
            runtime.block_on(async {
                let log = PartitionLog::open(&log_dir, bench_config()).await.unwrap();
                let started = Instant::now();
                for _ in 0..iters {
                    let info = log.append(batch.clone(), 0).await.unwrap();
                    log.wait_durable(info.last_offset).await.unwrap();
                }
                let elapsed = started.elapsed();
                log.delete().await.unwrap();
                elapsed
            })
        })
    });
    group.finish();
}

/// Appends of 16 KiB batches with buffered and with uncached (`RWF_DONTCACHE`) writes, on the same
/// disk: the per-append cost of the flag.
fn append_write_modes(c: &mut Criterion, runtime: &Runtime, sizes: &Sizes) {
    let dir = bench_dir();
    let log_dir = dir.path().join("modes-0");
    let batch = client_batch(11);
    let mut group = c.benchmark_group("append_write_mode");
    group.throughput(Throughput::Bytes(batch.len() as u64));
    for (name, uncached_appends) in [("buffered", false), ("uncached", true)] {
        let config = LogConfig {
            uncached_appends,
            ..bench_config()
        };
        group.bench_function(format!("16KiB_batches_{name}"), |b| {
            b.iter_custom(|iters| {
                runtime.block_on(async {
                    let mut log = PartitionLog::open(&log_dir, config.clone()).await.unwrap();
                    let mut elapsed = Duration::ZERO;
                    let mut started = Instant::now();
                    for _ in 0..iters {
                        if log.size_bytes() >= sizes.append_cap_bytes {
                            elapsed += started.elapsed();
                            log.delete().await.unwrap();
                            log = PartitionLog::open(&log_dir, config.clone()).await.unwrap();
                            started = Instant::now();
                        }
                        black_box(log.append(batch.clone(), 0).await.unwrap());
                    }
                    elapsed += started.elapsed();
                    log.delete().await.unwrap();
                    elapsed
                })
            })
        });
    }
    group.finish();
}

/// Group commit: `per_sync` appends, then one wait for durability (one fdatasync covers them all).
/// Throughput is per byte appended, so the three figures show what batching syncs buys.
fn group_commit(c: &mut Criterion, runtime: &Runtime) {
    let dir = bench_dir();
    let log_dir = dir.path().join("group-0");
    let batch = client_batch(13);
    let mut group = c.benchmark_group("group_commit");
    for per_sync in [1u64, 8, 64] {
        group.throughput(Throughput::Bytes(batch.len() as u64 * per_sync));
        group.bench_function(format!("{per_sync}_appends_per_fdatasync"), |b| {
            b.iter_custom(|iters| {
                runtime.block_on(async {
                    let log = PartitionLog::open(&log_dir, bench_config()).await.unwrap();
                    let started = Instant::now();
                    for _ in 0..iters {
                        let mut last = 0;
                        for _ in 0..per_sync {
                            last = log.append(batch.clone(), 0).await.unwrap().last_offset;
                        }
                        log.wait_durable(last).await.unwrap();
                    }
                    let elapsed = started.elapsed();
                    log.delete().await.unwrap();
                    elapsed
                })
            })
        });
    }
    group.finish();
}

/// Builds a closed log of `bytes` in `dir`.
fn build_log(runtime: &Runtime, dir: &Path, bytes: u64) {
    runtime.block_on(async {
        let log = PartitionLog::open(dir, bench_config()).await.unwrap();
        fill(&log, bytes).await;
        log.close().await.unwrap();
    });
}

fn lookup_and_recovery(c: &mut Criterion, runtime: &Runtime, sizes: &Sizes) {
    let dir = bench_dir();
    let clean_dir = dir.path().join("clean-0");
    build_log(runtime, &clean_dir, sizes.log_bytes);
    let label = format!("{}MiB", sizes.log_bytes >> 20);

    let mut group = c.benchmark_group("read");
    group.bench_function(format!("offset_lookup_in_{label}_log"), |b| {
        b.iter_custom(|iters| {
            runtime.block_on(async {
                let log = PartitionLog::open(&clean_dir, bench_config())
                    .await
                    .unwrap();
                let end = log.log_end_offset() as u64;
                let mut state = 0x9E37_79B9_7F4A_7C15u64;
                let started = Instant::now();
                for _ in 0..iters {
                    state ^= state << 13;
                    state ^= state >> 7;
                    state ^= state << 17;
                    black_box(log.read((state % end) as i64, 1 << 20, true).await.unwrap());
                }
                let elapsed = started.elapsed();
                log.close().await.unwrap();
                elapsed
            })
        })
    });
    group.finish();

    let mut group = c.benchmark_group("recovery");
    group.sample_size(10);
    group.bench_function(format!("open_{label}_log_with_clean_marker"), |b| {
        b.iter_custom(|iters| {
            let mut elapsed = Duration::ZERO;
            for _ in 0..iters {
                runtime.block_on(async {
                    let started = Instant::now();
                    let log = PartitionLog::open(&clean_dir, bench_config())
                        .await
                        .unwrap();
                    elapsed += started.elapsed();
                    log.close().await.unwrap();
                });
            }
            elapsed
        })
    });

    // A log whose last `tail_bytes` were appended (and fdatasync'ed) after the last checkpoint, then
    // stopped without close: recovery re-verifies exactly that tail.
    let tail_dir: PathBuf = dir.path().join("tail-0");
    build_log(runtime, &tail_dir, sizes.log_bytes - sizes.tail_bytes);
    runtime.block_on(async {
        let log = PartitionLog::open(&tail_dir, bench_config()).await.unwrap();
        fill(&log, sizes.tail_bytes).await;
        log.wait_durable(i64::MAX).await.unwrap();
    });
    let checkpoint_path = tail_dir.join("recovery-checkpoint");
    let checkpoint = std::fs::read(&checkpoint_path).unwrap();
    let tail_label = format!("{}MiB", sizes.tail_bytes >> 20);
    group.bench_function(
        format!("open_{label}_log_with_{tail_label}_unflushed_tail"),
        |b| {
            b.iter_custom(|iters| {
                let mut elapsed = Duration::ZERO;
                for _ in 0..iters {
                    std::fs::write(&checkpoint_path, &checkpoint).unwrap();
                    runtime.block_on(async {
                        let started = Instant::now();
                        let log = PartitionLog::open(&tail_dir, bench_config()).await.unwrap();
                        elapsed += started.elapsed();
                        black_box(log.log_end_offset());
                    });
                }
                elapsed
            })
        },
    );
    group.finish();
}

fn storage_benches(c: &mut Criterion) {
    let runtime = Runtime::new().expect("compio runtime");
    let sizes = sizes();
    raw_file_system(c, &runtime, &sizes);
    append(c, &runtime, &sizes);
    append_write_modes(c, &runtime, &sizes);
    group_commit(c, &runtime);
    lookup_and_recovery(c, &runtime, &sizes);
}

criterion_group! {
    name = benches;
    config = Criterion::default().warm_up_time(Duration::from_secs(1)).measurement_time(Duration::from_secs(4));
    targets = storage_benches
}
criterion_main!(benches);
