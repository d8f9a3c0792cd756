//! `ringbench ceiling`: this machine's physical limits, measured in the same session as the
//! benchmark, so every result can be stated as a fraction of them: one-flow loopback TCP
//! throughput, loopback request-response latency, and disk append + fdatasync throughput and
//! latency on the filesystem the broker logs to, plus the sequential write bandwidth the device
//! takes with O_DIRECT and with uncached (`RWF_DONTCACHE`) buffered writes: the ceiling for
//! sustained produce once the page cache stops absorbing it.

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
    /// 1 MiB O_DIRECT appends (aligned), then one fdatasync: the device's sequential write bandwidth.
    /// `None` where the file system refuses O_DIRECT (tmpfs).
    #[serde(default)]
    pub disk_direct_append_mb_per_s: Option<f64>,
    /// 1 MiB buffered appends with `RWF_DONTCACHE` (Linux 6.14+), then one fdatasync: what
    /// `ringbroker.log.write.mode=uncached` can sustain. `None` where the flag is refused.
    #[serde(default)]
    pub disk_uncached_append_mb_per_s: Option<f64>,
    /// CPU seconds (this thread, user + system) per GB for the buffered, O_DIRECT and uncached
    /// append tests, in that order.
    #[serde(default)]
    pub disk_append_cpu_s_per_gb: [Option<f64>; 3],
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
    let (direct, direct_cpu) = append_bandwidth(&opts.dir, opts.bytes, AppendKind::Direct)?;
    let (uncached, uncached_cpu) = append_bandwidth(&opts.dir, opts.bytes, AppendKind::Uncached)?;
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
        disk_direct_append_mb_per_s: direct,
        disk_uncached_append_mb_per_s: uncached,
        disk_append_cpu_s_per_gb: [Some(disk.4), direct_cpu, uncached_cpu],
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

/// This thread's CPU time (user + system) in seconds.
fn thread_cpu_s() -> f64 {
    // SAFETY: getrusage fills the struct it is given.
    let usage = unsafe {
        let mut usage: libc::rusage = std::mem::zeroed();
        libc::getrusage(libc::RUSAGE_THREAD, &mut usage);
        usage
    };
    let tv = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    tv(usage.ru_utime) + tv(usage.ru_stime)
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum AppendKind {
    Direct,
    Uncached,
}

/// A 1 MiB buffer aligned to 4 KiB, as O_DIRECT needs.
struct AlignedChunk {
    ptr: *mut u8,
    layout: std::alloc::Layout,
}

impl AlignedChunk {
    fn new() -> AlignedChunk {
        let layout = std::alloc::Layout::from_size_align(CHUNK, 4096).expect("valid layout");
        // SAFETY: a non-zero size; freed in Drop with the same layout.
        let ptr = unsafe { std::alloc::alloc(layout) };
        assert!(!ptr.is_null(), "out of memory");
        // SAFETY: ptr points at CHUNK writable bytes.
        unsafe { std::ptr::write_bytes(ptr, 0x5a, CHUNK) };
        AlignedChunk { ptr, layout }
    }
}

impl Drop for AlignedChunk {
    fn drop(&mut self) {
        // SAFETY: allocated in `new` with this layout.
        unsafe { std::alloc::dealloc(self.ptr, self.layout) };
    }
}

/// Sequential 1 MiB appends of `bytes` with O_DIRECT or `RWF_DONTCACHE`, then one fdatasync:
/// (MB/s, CPU-s/GB), both `None` where the file system refuses the mode.
fn append_bandwidth(
    dir: &Path,
    bytes: u64,
    kind: AppendKind,
) -> anyhow::Result<(Option<f64>, Option<f64>)> {
    use std::os::fd::AsRawFd;
    use std::os::unix::fs::OpenOptionsExt;
    let path = dir.join(format!("ringbench-ceiling-{}.tmp", std::process::id()));
    let result = (|| -> anyhow::Result<(Option<f64>, Option<f64>)> {
        let mut options = OpenOptions::new();
        options.create(true).truncate(true).write(true);
        if kind == AppendKind::Direct {
            options.custom_flags(libc::O_DIRECT);
        }
        let file = match options.open(&path) {
            Ok(file) => file,
            Err(error) if error.raw_os_error() == Some(libc::EINVAL) => return Ok((None, None)),
            Err(error) => return Err(error.into()),
        };
        let chunk = AlignedChunk::new();
        let flags = match kind {
            AppendKind::Direct => 0,
            AppendKind::Uncached => libc::RWF_DONTCACHE,
        };
        let cpu_start = thread_cpu_s();
        let start = Instant::now();
        let mut written = 0u64;
        while written < bytes {
            let iov = libc::iovec {
                iov_base: chunk.ptr as *mut libc::c_void,
                iov_len: CHUNK,
            };
            // SAFETY: one iovec over the live, aligned chunk; the file is open for writing.
            let n =
                unsafe { libc::pwritev2(file.as_raw_fd(), &iov, 1, written as libc::off_t, flags) };
            if n < 0 {
                let error = std::io::Error::last_os_error();
                if written == 0
                    && matches!(error.raw_os_error(), Some(libc::EINVAL | libc::EOPNOTSUPP))
                {
                    return Ok((None, None));
                }
                return Err(error.into());
            }
            if n as usize != CHUNK {
                bail!("short write of {n} bytes at {written}");
            }
            written += CHUNK as u64;
        }
        file.sync_data()?;
        let seconds = start.elapsed().as_secs_f64();
        let cpu_s_per_gb = (thread_cpu_s() - cpu_start) / (written as f64 / 1e9);
        Ok((Some(written as f64 / seconds / 1e6), Some(cpu_s_per_gb)))
    })();
    let _ = std::fs::remove_file(&path);
    result.with_context(|| format!("disk test in {}", dir.display()))
}

fn disk_tests(dir: &Path, bytes: u64) -> anyhow::Result<(f64, f64, LatencySummary, f64, f64)> {
    let path = dir.join(format!("ringbench-ceiling-{}.tmp", std::process::id()));
    let result = (|| -> anyhow::Result<(f64, f64, LatencySummary, f64, f64)> {
        let buf = vec![0xa5u8; CHUNK];
        // 1. Buffered appends, then one fdatasync: what the page cache absorbs.
        let mut file = OpenOptions::new()
            .create(true)
            .truncate(true)
            .write(true)
            .open(&path)?;
        let cpu_start = thread_cpu_s();
        let start = Instant::now();
        let mut written = 0u64;
        while written < bytes {
            file.write_all(&buf)?;
            written += CHUNK as u64;
        }
        file.sync_data()?;
        let buffered = written as f64 / start.elapsed().as_secs_f64() / 1e6;
        let buffered_cpu = (thread_cpu_s() - cpu_start) / (written as f64 / 1e9);
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
        Ok((buffered, synced, summary, ops_per_s, buffered_cpu))
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
        let mode = |mb: Option<f64>, cpu: Option<f64>, refused: &str| match (mb, cpu) {
            (Some(mb), Some(cpu)) => {
                format!("{mb:>10.1} MB/s ({cpu:.2} CPU-s/GB, with final fdatasync)")
            }
            _ => format!("{:>10} ({refused})", "n/a"),
        };
        let _ = writeln!(
            out,
            "disk O_DIRECT append            {}",
            mode(
                self.disk_direct_append_mb_per_s,
                self.disk_append_cpu_s_per_gb[1],
                "O_DIRECT refused here"
            )
        );
        let _ = writeln!(
            out,
            "disk uncached append            {}",
            mode(
                self.disk_uncached_append_mb_per_s,
                self.disk_append_cpu_s_per_gb[2],
                "RWF_DONTCACHE refused here"
            )
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
