//! storage_crash: kill -9 durability test. The child is this test binary re-executed with
//! STORAGE_CRASH_CHILD_DIR set: it appends from several tasks and prints every batch it has seen become
//! durable (after `wait_durable`). The parent kills it with SIGKILL at random moments, at least 100
//! times, and after every kill reopens the log and checks that every reported-durable batch reads back
//! byte-identical and that offsets are contiguous. The random seed is printed on failure; set
//! STORAGE_CRASH_SEED to replay a run.

mod storage_support;

use std::cell::Cell;
use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};
use std::rc::Rc;
use std::sync::mpsc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use ringbroker::storage::testing::build_batch;
use ringbroker::storage::{LogConfig, PartitionLog};
use storage_support::{as_stored, check_contiguous, run};

const CHILD_ENV: &str = "STORAGE_CRASH_CHILD_DIR";
const KILLS: usize = 100;
const APPENDER_TASKS: u64 = 4;

fn crash_config(durable_high_watermark: bool) -> LogConfig {
    LogConfig {
        segment_bytes: 16 * 1024,
        index_interval_bytes: 1024,
        retention_ms: None,
        durable_high_watermark,
        ..LogConfig::default()
    }
}

/// The batch a child writes for `seed`: its shape derives from the seed so the parent can rebuild it.
fn batch_for(seed: u64) -> (i32, Vec<u8>) {
    let count = 1 + (seed % 5) as i32;
    let value_bytes = 20 + (seed * 37 % 300) as usize;
    (
        count,
        build_batch(count, value_bytes, 1_000 + seed as i64, seed),
    )
}

/// The child's body; a no-op unless the parent started this binary as a child.
#[test]
fn crash_child_appends_until_killed() {
    let Ok(dir) = std::env::var(CHILD_ENV) else {
        return;
    };
    let first_seed: u64 = std::env::var("STORAGE_CRASH_FIRST_SEED")
        .unwrap()
        .parse()
        .unwrap();
    let durable_high_watermark =
        std::env::var("STORAGE_CRASH_DURABLE_HW").is_ok_and(|value| value == "1");
    run(async move {
        let config = crash_config(durable_high_watermark);
        let log = Rc::new(PartitionLog::open(dir.as_ref(), config).await.unwrap());
        println!("ready");
        let next_seed = Rc::new(Cell::new(first_seed));
        let started = Instant::now();
        let mut tasks = Vec::new();
        for _ in 0..APPENDER_TASKS {
            let log = log.clone();
            let next_seed = next_seed.clone();
            tasks.push(compio::runtime::spawn(async move {
                // Bounded in count and time; the parent kills the process long before either ends.
                for _ in 0..100_000 {
                    if started.elapsed() > Duration::from_secs(20) {
                        break;
                    }
                    let seed = next_seed.get();
                    next_seed.set(seed + 1);
                    let (_, bytes) = batch_for(seed);
                    let info = log.append(bytes.into(), 0).await.unwrap();
                    log.wait_durable(info.last_offset).await.unwrap();
                    let mut stdout = std::io::stdout().lock();
                    writeln!(stdout, "durable {} {}", info.base_offset, seed).unwrap();
                    stdout.flush().unwrap();
                }
            }));
        }
        for task in tasks {
            let _ = task.await;
        }
    });
}

struct XorShift(u64);

impl XorShift {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

#[test]
fn sigkill_at_random_moments_loses_no_durable_batch() {
    let seed = std::env::var("STORAGE_CRASH_SEED")
        .ok()
        .and_then(|value| value.parse().ok())
        .unwrap_or_else(|| {
            SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .unwrap()
                .as_nanos() as u64
                | 1
        });
    let outcome = std::panic::catch_unwind(|| kill_loop(seed));
    if let Err(panic) = outcome {
        eprintln!("crash test failed; replay with STORAGE_CRASH_SEED={seed}");
        std::panic::resume_unwind(panic);
    }
}

fn kill_loop(seed: u64) {
    let started = Instant::now();
    let dir = tempfile::tempdir().unwrap();
    let executable = std::env::current_exe().unwrap();
    let mut random = XorShift(seed);
    // (base offset, seed) of every batch any child reported durable.
    let mut durable: Vec<(i64, u64)> = Vec::new();
    let mut next_seed = 1u64;
    let mut kills_with_progress = 0;
    for kill in 0..KILLS {
        assert!(
            started.elapsed() < Duration::from_secs(50),
            "crash test too slow at kill {kill}"
        );
        let mut child = Command::new(&executable)
            .args([
                "--exact",
                "crash_child_appends_until_killed",
                "--nocapture",
                "--test-threads=1",
            ])
            .env(CHILD_ENV, dir.path())
            .env("STORAGE_CRASH_FIRST_SEED", next_seed.to_string())
            // Every other child runs in the acks=all mode (high watermark = durable data).
            .env(
                "STORAGE_CRASH_DURABLE_HW",
                if kill % 2 == 1 { "1" } else { "0" },
            )
            .env("RUST_BACKTRACE", "0")
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let (lines_tx, lines_rx) = mpsc::channel::<String>();
        let reader = std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if lines_tx.send(line).is_err() {
                    break;
                }
            }
        });
        // Wait for the child to have opened (and so recovered) the log, then let it run a while.
        let ready_deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let left = ready_deadline.saturating_duration_since(Instant::now());
            match lines_rx.recv_timeout(left) {
                Ok(line) if line.ends_with("ready") => break,
                Ok(_) => continue,
                Err(_) => {
                    let _ = child.kill();
                    let _ = child.wait();
                    panic!("child did not open the log within 10 s (kill {kill})");
                }
            }
        }
        std::thread::sleep(Duration::from_millis(1 + random.next() % 30));
        child.kill().unwrap(); // SIGKILL on Unix
        child.wait().unwrap();
        reader.join().unwrap();
        let before = durable.len();
        for line in lines_rx.try_iter() {
            let mut fields = line.split(' ');
            if fields.next() != Some("durable") {
                continue;
            }
            let base: i64 = fields.next().unwrap().parse().unwrap();
            let batch_seed: u64 = fields.next().unwrap().parse().unwrap();
            durable.push((base, batch_seed));
        }
        if durable.len() > before {
            kills_with_progress += 1;
        }
        // Seeds given to the next child must not repeat any the killed child may have used.
        next_seed += 100_000;
        let clean_close = kill % 2 == 0;
        run(async {
            let log = PartitionLog::open(dir.path(), crash_config(false))
                .await
                .unwrap();
            for &(base, batch_seed) in &durable {
                let (count, client) = batch_for(batch_seed);
                let expected = as_stored(&client, base);
                let got = log
                    .read_copy(base, expected.len() as u32, true)
                    .await
                    .unwrap();
                assert_eq!(
                    got.as_ref(),
                    expected.as_slice(),
                    "durable batch at {base} changed (kill {kill})"
                );
                assert!(log.log_end_offset() > base + i64::from(count) - 1);
            }
            check_contiguous(&log).await;
            // Alternate a clean close (marker written, next open skips the scan) with an unclean drop.
            if clean_close {
                log.close().await.unwrap();
            }
        });
    }
    eprintln!(
        "{KILLS} SIGKILLs, {} batches reported durable, children made progress in {kills_with_progress} runs, {:?}",
        durable.len(),
        started.elapsed()
    );
    assert!(
        kills_with_progress >= KILLS / 2,
        "children made progress in only {kills_with_progress} runs"
    );
    assert!(!durable.is_empty());
}
