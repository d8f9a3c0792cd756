//! `ringbench ceiling`: this machine's physical limits, measured in the same session as the
//! benchmark, so every result can be stated as a fraction of them: one-flow loopback TCP
//! throughput, loopback request-response latency, and disk append + fdatasync throughput and
//! latency on the filesystem the broker logs to.

use std::fmt::Write as _;
use std::fs::OpenOptions;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use serde::{Deserialize, Serialize};

use crate::metrics::{LatencySummary, new_histogram, record_clamped};
use crate::report::Environment;

pub struct CeilingOptions {
    /// Directory for the disk test file (put it on the broker's log filesystem).
    pub dir: PathBuf,
    /// Bytes moved by each throughput test.
    pub bytes: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CeilingResult {
    pub environment: Environment,
    pub bytes_per_test: u64,
    /// One TCP flow over loopback, 1 MiB writes, blocking sockets.
    pub loopback_tcp_gb_per_s: f64,
    /// 64-byte request, 64-byte response, one in flight.
    pub loopback_round_trip: LatencySummary,
    pub loopback_round_trips: u64,
    /// Buffered 1 MiB appends, including the final fdatasync.
    pub disk_buffered_append_mb_per_s: f64,
    /// 1 MiB append + fdatasync, repeated.
    pub disk_fdatasync_1mib_mb_per_s: f64,
    /// Latency of a 4 KiB append + fdatasync (the cost a single acks=all record pays).
    pub disk_fdatasync_4kib: LatencySummary,
    pub disk_fdatasync_4kib_ops_per_s: f64,
}

/// Bounds on each test so `ceiling` finishes in well under a minute on any disk.
const ROUND_TRIP_COUNT: u64 = 20_000;
const ROUND_TRIP_TIME: Duration = Duration::from_secs(3);
const FSYNC_OPS: u64 = 2_000;
const FSYNC_TIME: Duration = Duration::from_secs(3);
const CHUNK: usize = 1 << 20;

pub fn measure(opts: &CeilingOptions) -> anyhow::Result<CeilingResult> {
    if opts.bytes < CHUNK as u64 || opts.bytes > 64 << 30 {
        bail!("--bytes must be between 1 MiB and 64 GiB");
    }
    let loopback_tcp_gb_per_s = tcp_throughput(opts.bytes)?;
    let (loopback_round_trip, loopback_round_trips) = tcp_round_trip()?;
    let disk = disk_tests(&opts.dir, opts.bytes)?;
    Ok(CeilingResult {
        environment: Environment::capture(Path::new(".")),
        bytes_per_test: opts.bytes,
        loopback_tcp_gb_per_s,
        loopback_round_trip,
        loopback_round_trips,
        disk_buffered_append_mb_per_s: disk.0,
        disk_fdatasync_1mib_mb_per_s: disk.1,
        disk_fdatasync_4kib: disk.2,
        disk_fdatasync_4kib_ops_per_s: disk.3,
    })
}

fn tcp_throughput(bytes: u64) -> anyhow::Result<f64> {
    let listener = TcpListener::bind("127.0.0.1:0")?;
    let addr = listener.local_addr()?;
    let receiver = std::thread::spawn(move || -> std::io::Result<u64> {
        let (mut s, _) = listener.accept()?;
        let mut buf = vec![0u8; CHUNK];
        let mut total = 0u64;
        loop {
            let n = s.read(&mut buf)?;
            if n == 0 {
                return Ok(total);
            }
            total += n as u64;
        }
    });
    let mut sender = TcpStream::connect(addr)?;
    let buf = vec![0x5au8; CHUNK];
    let start = Instant::now();
    let mut sent = 0u64;
    while sent < bytes {
        let n = (bytes - sent).min(CHUNK as u64) as usize;
        sender.write_all(&buf[..n])?;
        sent += n as u64;
    }
    drop(sender);
    let received = receiver
        .join()
        .map_err(|_| anyhow::anyhow!("receiver thread panicked"))??;
    let seconds = start.elapsed().as_secs_f64();
    if received != bytes {
        bail!("loopback receiver got {received} of {bytes} bytes");
    }
    Ok(bytes as f64 / seconds / 1e9)
}

fn tcp_round_trip() -> anyhow::Result<(LatencySummary, u64)> {
    let listener = TcpListener::bind("127.0.0.1:0")?;
    let addr = listener.local_addr()?;
    let server = std::thread::spawn(move || -> std::io::Result<()> {
        let (mut s, _) = listener.accept()?;
        s.set_nodelay(true)?;
        let mut buf = [0u8; 64];
        loop {
            if let Err(e) = s.read_exact(&mut buf) {
                return if e.kind() == std::io::ErrorKind::UnexpectedEof {
                    Ok(())
                } else {
                    Err(e)
                };
            }
            s.write_all(&buf)?;
        }
    });
    let mut client = TcpStream::connect(addr)?;
    client.set_nodelay(true)?;
    let mut histogram = new_histogram();
    let request = [7u8; 64];
    let mut response = [0u8; 64];
    let start = Instant::now();
    let mut count = 0;
    while count < ROUND_TRIP_COUNT && start.elapsed() < ROUND_TRIP_TIME {
        let t = Instant::now();
        client.write_all(&request)?;
        client.read_exact(&mut response)?;
        record_clamped(&mut histogram, t.elapsed().as_micros() as u64);
        count += 1;
    }
    drop(client);
    server
        .join()
        .map_err(|_| anyhow::anyhow!("echo thread panicked"))??;
    let summary = LatencySummary::from_histogram(&histogram).context("no round trips measured")?;
    Ok((summary, count))
}

fn disk_tests(dir: &Path, bytes: u64) -> anyhow::Result<(f64, f64, LatencySummary, f64)> {
    let path = dir.join(format!("ringbench-ceiling-{}.tmp", std::process::id()));
    let result = (|| -> anyhow::Result<(f64, f64, LatencySummary, f64)> {
        let buf = vec![0xa5u8; CHUNK];
        // 1. Buffered appends, then one fdatasync: what the page cache absorbs.
        let mut file = OpenOptions::new()
            .create(true)
            .truncate(true)
            .write(true)
            .open(&path)?;
        let start = Instant::now();
        let mut written = 0u64;
        while written < bytes {
            file.write_all(&buf)?;
            written += CHUNK as u64;
        }
        file.sync_data()?;
        let buffered = written as f64 / start.elapsed().as_secs_f64() / 1e6;
        drop(file);
        // 2. 1 MiB append + fdatasync: a group commit of 1 MiB at a time (bounded by time).
        let mut file = OpenOptions::new()
            .create(true)
            .truncate(true)
            .write(true)
            .open(&path)?;
        let start = Instant::now();
        let mut written = 0u64;
        while written < bytes && start.elapsed() < FSYNC_TIME * 2 {
            file.write_all(&buf)?;
            file.sync_data()?;
            written += CHUNK as u64;
        }
        let synced = written as f64 / start.elapsed().as_secs_f64() / 1e6;
        drop(file);
        // 3. 4 KiB append + fdatasync latency: one small durable write.
        let mut file = OpenOptions::new()
            .create(true)
            .truncate(true)
            .write(true)
            .open(&path)?;
        let mut histogram = new_histogram();
        let start = Instant::now();
        let mut ops = 0;
        while ops < FSYNC_OPS && start.elapsed() < FSYNC_TIME {
            let t = Instant::now();
            file.write_all(&buf[..4096])?;
            file.sync_data()?;
            record_clamped(&mut histogram, t.elapsed().as_micros() as u64);
            ops += 1;
        }
        let ops_per_s = ops as f64 / start.elapsed().as_secs_f64();
        let summary =
            LatencySummary::from_histogram(&histogram).context("no fdatasync measured")?;
        Ok((buffered, synced, summary, ops_per_s))
    })();
    let _ = std::fs::remove_file(&path);
    result.with_context(|| format!("disk test in {}", dir.display()))
}

impl CeilingResult {
    pub fn table(&self) -> String {
        let mut out = String::new();
        let l = |s: &LatencySummary| {
            format!(
                "p50 {:.3} ms, p99 {:.3} ms, p99.9 {:.3} ms, max {:.3} ms",
                s.p50_ms, s.p99_ms, s.p99_9_ms, s.max_ms
            )
        };
        let _ = writeln!(
            out,
            "machine: {} × {} | kernel {}",
            self.environment.cpu_count,
            self.environment
                .cpu_model
                .as_deref()
                .unwrap_or("unknown CPU"),
            self.environment.kernel.as_deref().unwrap_or("unknown")
        );
        let _ = writeln!(
            out,
            "loopback TCP, one flow          {:>10.2} GB/s",
            self.loopback_tcp_gb_per_s
        );
        let _ = writeln!(
            out,
            "loopback round trip (64 B)      {} ({} trips)",
            l(&self.loopback_round_trip),
            self.loopback_round_trips
        );
        let _ = writeln!(
            out,
            "disk buffered append            {:>10.1} MB/s (with final fdatasync)",
            self.disk_buffered_append_mb_per_s
        );
        let _ = writeln!(
            out,
            "disk append + fdatasync / 1 MiB {:>10.1} MB/s",
            self.disk_fdatasync_1mib_mb_per_s
        );
        let _ = writeln!(
            out,
            "disk 4 KiB append + fdatasync   {} ({:.0} ops/s)",
            l(&self.disk_fdatasync_4kib),
            self.disk_fdatasync_4kib_ops_per_s
        );
        out
    }
}
