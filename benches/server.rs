//! Bench: sending a page-cached file range to a loopback socket by splice (file -> pipe -> socket
//! through io_uring) versus copy (pread into a buffer, then send), at 4 KiB..1 MiB, measured in
//! wall time (bytes/s) and in process CPU time (CPU per byte; includes the kernel io-wq workers
//! that execute splices, and the receiving thread, which costs the same for both paths).
//! The numbers choose `ringbroker.fetch.splice.min.bytes`.
//!
//! Run: `cargo bench --bench server`; `cargo test --benches` runs each case once.

use std::io::Read;
use std::net::TcpListener;
use std::os::fd::AsRawFd;
use std::rc::Rc;
use std::time::{Duration, Instant};

use criterion::measurement::{Measurement, ValueFormatter};
use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use ringbroker::shard::pipe::FileSender;

const FILE_BYTES: u64 = 64 << 20;
const SIZES: &[u64] = &[4 << 10, 16 << 10, 64 << 10, 256 << 10, 1 << 20];
const PIPE_BYTES: usize = 1 << 20;

/// A cached 64 MiB file of pseudo-random bytes.
fn cached_file() -> (tempfile::NamedTempFile, Rc<dyn AsRawFd>) {
    let mut file = tempfile::NamedTempFile::new().expect("temp file");
    let mut state = 0x9e37_79b9_7f4a_7c15u64;
    let bytes: Vec<u8> = (0..FILE_BYTES)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state as u8
        })
        .collect();
    std::io::Write::write_all(&mut file, &bytes).expect("write");
    // Read it back once so every range is in the page cache.
    let mut sink = Vec::with_capacity(FILE_BYTES as usize);
    std::fs::File::open(file.path())
        .and_then(|mut f| f.read_to_end(&mut sink))
        .expect("warm the cache");
    let fd: Rc<dyn AsRawFd> = Rc::new(std::fs::File::open(file.path()).expect("open"));
    (file, fd)
}

#[derive(Clone, Copy)]
enum Path {
    Copy,
    Splice,
}

/// Sends `iters` ranges of `size` bytes over one loopback connection drained by another thread;
/// returns what `clock` measured across the sends.
fn run(
    path: Path,
    size: u64,
    iters: u64,
    fd: &Rc<dyn AsRawFd>,
    clock: fn() -> Duration,
) -> Duration {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = listener.local_addr().expect("addr");
    let receiver = std::thread::spawn(move || {
        let (mut socket, _) = listener.accept().expect("accept");
        let mut buffer = vec![0u8; 1 << 20];
        let mut total = 0u64;
        loop {
            match socket.read(&mut buffer) {
                Ok(0) | Err(_) => return total,
                Ok(n) => total += n as u64,
            }
        }
    });
    let runtime = compio::runtime::Runtime::new().expect("runtime");
    let elapsed = runtime.block_on(async {
        let stream = compio::net::TcpStream::connect(addr)
            .await
            .expect("connect");
        let sender = FileSender::new(1, PIPE_BYTES, 0);
        let slots = FILE_BYTES / size;
        let start = clock();
        for i in 0..iters {
            let offset = (i % slots) * size;
            let result = match path {
                Path::Copy => sender.copy(&stream, fd.clone(), offset, size).await,
                Path::Splice => sender.splice(&stream, fd.clone(), offset, size).await,
            };
            result.expect("send");
        }
        clock().saturating_sub(start)
    });
    drop(runtime);
    let received = receiver.join().expect("receiver");
    assert_eq!(received, iters * size, "every byte arrived");
    elapsed
}

fn wall_clock() -> Duration {
    static START: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
    START.get_or_init(Instant::now).elapsed()
}

/// User + system CPU of the whole process (all threads, including io-wq workers).
fn process_cpu() -> Duration {
    rusage_cpu(libc::RUSAGE_SELF)
}

/// User + system CPU of the calling thread: the shard thread's share of the work, which is
/// what thread-per-core runs out of first.
fn thread_cpu() -> Duration {
    rusage_cpu(libc::RUSAGE_THREAD)
}

fn rusage_cpu(who: libc::c_int) -> Duration {
    // SAFETY: getrusage fills the struct it is given.
    let usage = unsafe {
        let mut usage: libc::rusage = std::mem::zeroed();
        libc::getrusage(who, &mut usage);
        usage
    };
    let micros = |t: libc::timeval| t.tv_sec as u64 * 1_000_000 + t.tv_usec as u64;
    Duration::from_micros(micros(usage.ru_utime) + micros(usage.ru_stime))
}

fn bench_paths<M: Measurement<Value = Duration>>(
    c: &mut Criterion<M>,
    group_name: &str,
    clock: fn() -> Duration,
) {
    let (_file, fd) = cached_file();
    let mut group = c.benchmark_group(group_name);
    group.measurement_time(Duration::from_secs(3));
    group.warm_up_time(Duration::from_millis(500));
    group.sample_size(20);
    for &size in SIZES {
        group.throughput(Throughput::Bytes(size));
        for (name, path) in [("copy", Path::Copy), ("splice", Path::Splice)] {
            group.bench_with_input(BenchmarkId::new(name, size), &size, |b, &size| {
                b.iter_custom(|iters| run(path, size, iters, &fd, clock));
            });
        }
    }
    group.finish();
}

fn wall(c: &mut Criterion) {
    bench_paths(c, "file_to_socket_wall", wall_clock);
}

fn cpu(c: &mut Criterion<ProcessCpu>) {
    bench_paths(c, "file_to_socket_cpu", process_cpu);
}

fn shard_cpu(c: &mut Criterion<ProcessCpu>) {
    bench_paths(c, "file_to_socket_shard_thread_cpu", thread_cpu);
}

/// Criterion measurement in CPU time; throughput is shown as CPU-seconds per GiB moved. The
/// benches time themselves (`iter_custom`) with the clock they measure; this clock only serves
/// criterion's own calls.
struct ProcessCpu;

impl Measurement for ProcessCpu {
    type Intermediate = Duration;
    type Value = Duration;

    fn start(&self) -> Duration {
        process_cpu()
    }

    fn end(&self, start: Duration) -> Duration {
        process_cpu().saturating_sub(start)
    }

    fn add(&self, a: &Duration, b: &Duration) -> Duration {
        *a + *b
    }

    fn zero(&self) -> Duration {
        Duration::ZERO
    }

    fn to_f64(&self, value: &Duration) -> f64 {
        value.as_nanos() as f64
    }

    fn formatter(&self) -> &dyn ValueFormatter {
        &CpuFormatter
    }
}

struct CpuFormatter;

impl ValueFormatter for CpuFormatter {
    fn scale_values(&self, typical_ns: f64, values: &mut [f64]) -> &'static str {
        let (factor, unit) = if typical_ns < 1e3 {
            (1.0, "ns cpu")
        } else if typical_ns < 1e6 {
            (1e-3, "µs cpu")
        } else if typical_ns < 1e9 {
            (1e-6, "ms cpu")
        } else {
            (1e-9, "s cpu")
        };
        values.iter_mut().for_each(|v| *v *= factor);
        unit
    }

    fn scale_throughputs(
        &self,
        _typical_ns: f64,
        throughput: &Throughput,
        values: &mut [f64],
    ) -> &'static str {
        let per_iteration = match throughput {
            Throughput::Bytes(bytes) | Throughput::BytesDecimal(bytes) => *bytes as f64,
            Throughput::Elements(elements) => *elements as f64,
            _ => 1.0,
        };
        // CPU nanoseconds per GiB moved: lower is better.
        values
            .iter_mut()
            .for_each(|v| *v = *v / per_iteration * (1u64 << 30) as f64 / 1e9);
        "cpu-s/GiB"
    }

    fn scale_for_machines(&self, _values: &mut [f64]) -> &'static str {
        "ns"
    }
}

criterion_group!(wall_benches, wall);
criterion_group! {
    name = cpu_benches;
    config = Criterion::default().with_measurement(ProcessCpu);
    targets = cpu, shard_cpu
}
criterion_main!(wall_benches, cpu_benches);
