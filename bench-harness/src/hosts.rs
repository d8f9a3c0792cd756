//! Where workers run: threads in this process (each pinned to a given core) or a child
//! `ringbench worker` process that runs the same threads and streams its metrics back as JSON
//! lines. The coordinator steers both through one trait.

use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use anyhow::{Context, anyhow};
use serde::{Deserialize, Serialize};

use crate::driver::{ConsumerSpec, Control, ProducerSpec, RunClock, pin_current_thread};
use crate::metrics::{IntervalMetrics, Meter, WireMetrics};
use crate::workload::DriverKind;
use crate::{native, rdkafka_driver};

/// What the coordinator can tell workers.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "snake_case")]
pub enum WorkerCommand {
    /// Records/s for each producer; 0 stops producing (queued batches are still sent).
    Rate(f64),
    EnableConsumers,
    /// Total records the producers of this host may still create.
    Budget(u64),
    Stop,
}

/// What a worker process reports, one JSON object per line on its stdout.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum WorkerEvent {
    Ready(u64),
    Metrics(WireMetrics),
    Failed(String),
    Done,
}

/// The first line a worker process reads: everything it must run.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct WorkerAssignment {
    pub driver: DriverKind,
    pub producers: Vec<ProducerSpec>,
    pub consumers: Vec<ConsumerSpec>,
    pub producer_cpus: Vec<usize>,
    pub consumer_cpus: Vec<usize>,
}

pub trait WorkerHost: Send {
    fn command(&self, command: &WorkerCommand);
    /// Everything measured since the last call.
    fn take(&self) -> IntervalMetrics;
    fn ready(&self) -> u64;
    fn expected_workers(&self) -> u64;
    /// The first worker failure, if any; a run with a failed worker must not report success.
    fn failure(&self) -> Option<String>;
    /// Stops (if not yet) and waits for every worker.
    fn join(self: Box<Self>) -> anyhow::Result<IntervalMetrics>;
}

/// Workers as threads of this process.
pub struct InProcessHost {
    control: Arc<Control>,
    /// The workers' clock: rate changes are stamped with it.
    clock: RunClock,
    meters: Vec<Meter>,
    threads: Vec<JoinHandle<()>>,
    failure: Arc<Mutex<Option<String>>>,
    expected: u64,
}

impl InProcessHost {
    pub fn start(assignment: WorkerAssignment) -> anyhow::Result<InProcessHost> {
        let control = Control::new();
        let clock = RunClock::new();
        let failure: Arc<Mutex<Option<String>>> = Arc::new(Mutex::new(None));
        let mut meters = Vec::new();
        let mut threads = Vec::new();
        let driver = assignment.driver;
        let expected = (assignment.producers.len() + assignment.consumers.len()) as u64;
        // Consumers first, so that they are positioned before any record exists.
        for (i, spec) in assignment.consumers.into_iter().enumerate() {
            let core = pick_core(&assignment.consumer_cpus, i);
            let (meter, control, failure) = (
                Meter::for_control(&control),
                control.clone(),
                failure.clone(),
            );
            meters.push(meter.clone());
            let name = format!("rb-consumer-{}", spec.id);
            threads.push(
                std::thread::Builder::new()
                    .name(name.clone())
                    .spawn(move || {
                        pin_current_thread(core);
                        let result = match driver {
                            DriverKind::Native => {
                                block_on(native::run_consumer(spec, control.clone(), meter, clock))
                            }
                            DriverKind::Rdkafka => {
                                rdkafka_driver::run_consumer(spec, control.clone(), meter, clock)
                            }
                        };
                        record_failure(&failure, &name, result);
                    })?,
            );
        }
        for (i, spec) in assignment.producers.into_iter().enumerate() {
            let core = pick_core(&assignment.producer_cpus, i);
            let (meter, control, failure) = (
                Meter::for_control(&control),
                control.clone(),
                failure.clone(),
            );
            meters.push(meter.clone());
            let name = format!("rb-producer-{}", spec.id);
            threads.push(
                std::thread::Builder::new()
                    .name(name.clone())
                    .spawn(move || {
                        pin_current_thread(core);
                        let result = match driver {
                            DriverKind::Native => {
                                block_on(native::run_producer(spec, control.clone(), meter, clock))
                            }
                            DriverKind::Rdkafka => {
                                rdkafka_driver::run_producer(spec, control.clone(), meter, clock)
                            }
                        };
                        record_failure(&failure, &name, result);
                    })?,
            );
        }
        Ok(InProcessHost {
            control,
            clock,
            meters,
            threads,
            failure,
            expected,
        })
    }
}

fn pick_core(cpus: &[usize], i: usize) -> Option<usize> {
    if cpus.is_empty() {
        None
    } else {
        Some(cpus[i % cpus.len()])
    }
}

fn block_on<F: std::future::Future<Output = anyhow::Result<()>>>(f: F) -> anyhow::Result<()> {
    let runtime = compio::runtime::Runtime::new().context("starting the compio runtime")?;
    runtime.block_on(f)
}

fn record_failure(slot: &Mutex<Option<String>>, name: &str, result: anyhow::Result<()>) {
    if let Err(e) = result {
        let mut guard = match slot.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        };
        guard.get_or_insert_with(|| format!("{name}: {e:#}"));
    }
}

impl WorkerHost for InProcessHost {
    fn command(&self, command: &WorkerCommand) {
        match *command {
            WorkerCommand::Rate(r) => self.control.set_rate(r, self.clock.now_epoch_us()),
            WorkerCommand::EnableConsumers => self.control.enable_consumers(),
            WorkerCommand::Budget(n) => self.control.set_record_budget(n),
            WorkerCommand::Stop => self.control.stop(),
        }
    }

    fn take(&self) -> IntervalMetrics {
        let mut out = IntervalMetrics::default();
        for m in &self.meters {
            out.merge(&m.take());
        }
        out
    }

    fn ready(&self) -> u64 {
        self.control.ready_count()
    }

    fn expected_workers(&self) -> u64 {
        self.expected
    }

    fn failure(&self) -> Option<String> {
        match self.failure.lock() {
            Ok(g) => g.clone(),
            Err(p) => p.into_inner().clone(),
        }
    }

    fn join(self: Box<Self>) -> anyhow::Result<IntervalMetrics> {
        self.control.stop();
        for t in self.threads {
            if t.join().is_err() {
                return Err(anyhow!("a worker thread panicked"));
            }
        }
        let mut last = IntervalMetrics::default();
        for m in &self.meters {
            last.merge(&m.take());
        }
        match self.failure.lock().map(|g| g.clone()).unwrap_or(None) {
            Some(f) => Err(anyhow!(f)),
            None => Ok(last),
        }
    }
}

/// Workers in a child `ringbench worker` process.
pub struct ProcessHost {
    child: Mutex<Child>,
    stdin: Mutex<Option<ChildStdin>>,
    meter: Meter,
    ready: Arc<AtomicU64>,
    failure: Arc<Mutex<Option<String>>>,
    done: Arc<AtomicBool>,
    reader: Option<JoinHandle<()>>,
    expected: u64,
}

impl ProcessHost {
    pub fn spawn(binary: &Path, assignment: &WorkerAssignment) -> anyhow::Result<ProcessHost> {
        let expected = (assignment.producers.len() + assignment.consumers.len()) as u64;
        let mut child = Command::new(binary)
            .arg("worker")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .with_context(|| format!("starting worker process {}", binary.display()))?;
        let mut stdin = child
            .stdin
            .take()
            .ok_or_else(|| anyhow!("worker stdin unavailable"))?;
        let stdout = child
            .stdout
            .take()
            .ok_or_else(|| anyhow!("worker stdout unavailable"))?;
        serde_json::to_writer(&mut stdin, assignment)?;
        stdin.write_all(b"\n")?;
        stdin.flush()?;
        let meter = Meter::new();
        let ready = Arc::new(AtomicU64::new(0));
        let failure: Arc<Mutex<Option<String>>> = Arc::new(Mutex::new(None));
        let done = Arc::new(AtomicBool::new(false));
        let (m, r, f, d) = (meter.clone(), ready.clone(), failure.clone(), done.clone());
        let reader = std::thread::Builder::new()
            .name("rb-worker-reader".into())
            .spawn(move || {
                let set_failure = |msg: String| {
                    if let Ok(mut g) = f.lock() {
                        g.get_or_insert(msg);
                    }
                };
                for line in BufReader::new(stdout).lines() {
                    let Ok(line) = line else { break };
                    match serde_json::from_str::<WorkerEvent>(&line) {
                        Ok(WorkerEvent::Ready(n)) => r.store(n, Ordering::Release),
                        Ok(WorkerEvent::Metrics(wire)) => match IntervalMetrics::from_wire(&wire) {
                            Ok(metrics) => m.with(|acc| acc.merge(&metrics)),
                            Err(e) => set_failure(format!("worker sent unreadable metrics: {e:#}")),
                        },
                        Ok(WorkerEvent::Failed(msg)) => set_failure(msg),
                        Ok(WorkerEvent::Done) => {
                            d.store(true, Ordering::Release);
                            break;
                        }
                        Err(e) => set_failure(format!("worker sent {line:?}: {e}")),
                    }
                }
                if !d.load(Ordering::Acquire) {
                    set_failure("worker process ended without finishing".to_string());
                }
            })?;
        Ok(ProcessHost {
            child: Mutex::new(child),
            stdin: Mutex::new(Some(stdin)),
            meter,
            ready,
            failure,
            done,
            reader: Some(reader),
            expected,
        })
    }
}

impl WorkerHost for ProcessHost {
    fn command(&self, command: &WorkerCommand) {
        if let Ok(mut guard) = self.stdin.lock()
            && let Some(stdin) = guard.as_mut()
        {
            let ok = serde_json::to_writer(&mut *stdin, command).is_ok()
                && stdin.write_all(b"\n").is_ok()
                && stdin.flush().is_ok();
            if !ok && let Ok(mut f) = self.failure.lock() {
                f.get_or_insert("worker process stopped accepting commands".to_string());
            }
        }
    }

    fn take(&self) -> IntervalMetrics {
        self.meter.take()
    }

    fn ready(&self) -> u64 {
        self.ready.load(Ordering::Acquire)
    }

    fn expected_workers(&self) -> u64 {
        self.expected
    }

    fn failure(&self) -> Option<String> {
        self.failure.lock().ok().and_then(|g| g.clone())
    }

    fn join(mut self: Box<Self>) -> anyhow::Result<IntervalMetrics> {
        self.command(&WorkerCommand::Stop);
        if let Ok(mut g) = self.stdin.lock() {
            g.take(); // closing stdin is the second stop signal
        }
        if let Some(reader) = self.reader.take() {
            let _ = reader.join();
        }
        let status = {
            let mut child = self
                .child
                .lock()
                .map_err(|_| anyhow!("worker child lock poisoned"))?;
            // The worker stops within its drain timeouts; past that it is killed, not awaited forever.
            let mut waited = Duration::ZERO;
            loop {
                if let Some(status) = child.try_wait()? {
                    break Some(status);
                }
                if waited > Duration::from_secs(30) {
                    let _ = child.kill();
                    let _ = child.wait();
                    break None;
                }
                std::thread::sleep(Duration::from_millis(20));
                waited += Duration::from_millis(20);
            }
        };
        let last = self.meter.take();
        if let Some(f) = self.failure() {
            return Err(anyhow!(f));
        }
        match status {
            Some(s) if s.success() && self.done.load(Ordering::Acquire) => Ok(last),
            Some(s) => Err(anyhow!("worker process exited with {s}")),
            None => Err(anyhow!(
                "worker process did not stop within 30 s and was killed"
            )),
        }
    }
}

/// The body of `ringbench worker`: reads an assignment and commands from stdin, runs the
/// workers in this process, and writes events to stdout until told to stop.
pub fn run_worker_process() -> anyhow::Result<()> {
    let stdin = std::io::stdin();
    let mut first = String::new();
    stdin.lock().read_line(&mut first)?;
    let assignment: WorkerAssignment =
        serde_json::from_str(&first).context("reading the worker assignment")?;
    let host = Arc::new(InProcessHost::start(assignment)?);
    let stop_requested = Arc::new(AtomicBool::new(false));
    let commands = {
        let host = host.clone();
        let stop_requested = stop_requested.clone();
        std::thread::Builder::new()
            .name("rb-worker-commands".into())
            .spawn(move || {
                for line in std::io::stdin().lock().lines() {
                    let Ok(line) = line else { break };
                    if let Ok(command) = serde_json::from_str::<WorkerCommand>(&line) {
                        host.command(&command);
                        if command == WorkerCommand::Stop {
                            break;
                        }
                    }
                }
                // End of input also means stop: a coordinator that died must not leave load running.
                host.command(&WorkerCommand::Stop);
                stop_requested.store(true, Ordering::Release);
            })?
    };
    let emit = |event: &WorkerEvent| -> anyhow::Result<()> {
        let mut out = std::io::stdout().lock();
        serde_json::to_writer(&mut out, event)?;
        out.write_all(b"\n")?;
        out.flush()?;
        Ok(())
    };
    let mut last_ready = u64::MAX;
    let mut failure_sent = false;
    while !stop_requested.load(Ordering::Acquire) {
        std::thread::sleep(Duration::from_millis(200));
        let ready = host.ready();
        if ready != last_ready {
            emit(&WorkerEvent::Ready(ready))?;
            last_ready = ready;
        }
        emit(&WorkerEvent::Metrics(host.take().to_wire()))?;
        if !failure_sent && let Some(f) = host.failure() {
            emit(&WorkerEvent::Failed(f))?;
            failure_sent = true;
        }
    }
    let _ = commands.join();
    let host =
        Arc::try_unwrap(host).map_err(|_| anyhow!("worker host still shared at shutdown"))?;
    match Box::new(host).join() {
        Ok(last) => emit(&WorkerEvent::Metrics(last.to_wire()))?,
        Err(e) => {
            if !failure_sent {
                emit(&WorkerEvent::Failed(format!("{e:#}")))?;
            }
        }
    }
    emit(&WorkerEvent::Done)?;
    Ok(())
}
