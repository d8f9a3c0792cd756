//! node: wiring from a validated `Config` to running shards and back to a clean exit: probe
//! io_uring, lock the log directory, bind every shard's listener, start the shards with their
//! handlers, wait for SIGTERM/SIGINT, then shut down in phases.
//!
//! Shutdown phases, each bounded by `ringbroker.shutdown.timeout.ms`:
//! 1. every shard stops accepting and lets its connections answer what they have read;
//! 2. once every shard has drained, each calls its `Handler::shutdown` (flush, clean markers);
//!    shards keep serving their mailboxes meanwhile, so cross-shard calls made by a draining or
//!    shutting-down handler still reach their target;
//! 3. the shard threads end and are joined.

use std::collections::BTreeSet;
use std::fs::{File, OpenOptions};
use std::net::{SocketAddr, TcpListener, ToSocketAddrs};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::sync::{Arc, Mutex, mpsc};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

use crate::config::Config;
use crate::server::{self, Handler, HandlerFactory};
use crate::shard::{self, ShardContext, ShardThread, StopSignal, StopTrigger, stop_pair};
use crate::storage::{Disk, WriteMode, write_mode};

/// What a shard reports to the node thread.
#[derive(Debug)]
enum ShardEvent {
    Ready { shard: usize },
    Failed { shard: usize, error: String },
    Drained { shard: usize },
    ShutDown { shard: usize },
}

/// Probes io_uring, starts the node and serves until SIGTERM or SIGINT, then shuts down cleanly.
pub fn run<F: HandlerFactory>(config: Config, factory: F) -> anyhow::Result<()> {
    // Block the signals before any shard thread exists, so threads inherit the mask and the
    // signals wait in the kernel until this thread collects them with sigtimedwait.
    block_termination_signals().context("cannot block SIGTERM/SIGINT")?;
    let node = Node::start(config, factory)?;
    loop {
        if let Some(signal) = wait_for_termination_signal(Duration::from_millis(500)) {
            tracing::info!(signal, "termination signal received; shutting down");
            break;
        }
        if let Some(shard) = node.exited_shard() {
            tracing::error!(shard, "a shard thread ended unexpectedly; shutting down");
            let _ = node.shutdown();
            bail!("shard {shard} stopped unexpectedly");
        }
    }
    node.shutdown()
}

/// A running node. Dropping it without `shutdown` stops the shards without waiting for them.
pub struct Node {
    listen_addrs: Vec<SocketAddr>,
    threads: Vec<ShardThread>,
    events: mpsc::Receiver<ShardEvent>,
    ready_shards: BTreeSet<usize>,
    stop_serving: Option<StopTrigger>,
    stop_handlers: Option<StopTrigger>,
    stop_threads: Option<StopTrigger>,
    shutdown_timeout: Duration,
    _log_dir_lock: LogDirLock,
}

impl Node {
    /// Starts every shard and returns once each has built its handler and is accepting.
    pub fn start<F: HandlerFactory>(mut config: Config, factory: F) -> anyhow::Result<Node> {
        shard::probe::probe_io_uring().context("io_uring is not usable")?;
        raise_nofile_limit();
        for line in config.summary_lines() {
            tracing::info!("config: {line}");
        }
        let log_dir_lock = LogDirLock::acquire(&config.log_dir)?;
        config.log_write_mode = resolve_write_mode(&config)?;
        let listeners = bind_listeners(&config)?;
        let listen_addrs: Vec<SocketAddr> = listeners
            .iter()
            .map(TcpListener::local_addr)
            .collect::<Result<_, _>>()
            .context("cannot read a listener's address")?;

        let config = Arc::new(config);
        let shutdown_timeout = Duration::from_millis(config.shutdown_timeout_ms);
        let shard_count = config.shard_count;
        let (events_tx, events) = mpsc::channel();
        let (stop_serving, serving_signal) = stop_pair();
        let (stop_handlers, handlers_signal) = stop_pair();
        let (stop_threads, threads_signal) = stop_pair();
        // Fired once every shard has built its handler. A shard serves only after it: shards call
        // each other from their first request on (topic creation opens partitions on every
        // owner), and a shard whose broker is not yet installed cannot take that work.
        let (all_ready, all_ready_signal) = stop_pair();
        let listeners = Mutex::new(listeners.into_iter().map(Some).collect::<Vec<_>>());
        let factory = Arc::new(factory);
        let threads = shard::spawn_shards(config.clone(), listen_addrs.clone(), move |ctx| {
            let listener = listeners
                .lock()
                .map(|mut all| all[ctx.shard_id()].take())
                .unwrap_or(None);
            shard_main(
                ctx,
                factory.clone(),
                listener,
                events_tx.clone(),
                [
                    all_ready_signal.clone(),
                    serving_signal.clone(),
                    handlers_signal.clone(),
                    threads_signal.clone(),
                ],
            )
        })?;
        let mut node = Node {
            listen_addrs,
            threads,
            events,
            ready_shards: BTreeSet::new(),
            stop_serving: Some(stop_serving),
            stop_handlers: Some(stop_handlers),
            stop_threads: Some(stop_threads),
            shutdown_timeout,
            _log_dir_lock: log_dir_lock,
        };

        // Wait for every shard to come up (or fail); handler creation may recover storage, so
        // there is no deadline, but a shard thread that dies without a word is noticed.
        let mut failures = Vec::new();
        let mut reported = BTreeSet::new();
        while reported.len() < shard_count {
            match node.events.recv_timeout(Duration::from_millis(200)) {
                Ok(ShardEvent::Ready { shard }) => {
                    reported.insert(shard);
                    node.ready_shards.insert(shard);
                }
                Ok(ShardEvent::Failed { shard, error }) => {
                    reported.insert(shard);
                    failures.push(format!("shard {shard}: {error}"));
                }
                Ok(other) => tracing::debug!(?other, "early shard event"),
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    for thread in &node.threads {
                        if thread.handle.is_finished() && !reported.contains(&thread.shard_id) {
                            reported.insert(thread.shard_id);
                            failures.push(format!("shard {}: thread ended", thread.shard_id));
                        }
                    }
                }
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    failures.push("every shard thread ended".to_string());
                    break;
                }
            }
        }
        // Every shard has reported (or failed): let them serve, or, on failure, let the shards
        // that did start go on to their shutdown.
        all_ready.trigger();
        if !failures.is_empty() {
            let _ = node.shutdown_phases();
            bail!("cannot start: {}", failures.join("; "));
        }
        tracing::info!(
            shards = shard_count,
            listen = ?node.listen_addrs,
            "ringbroker started"
        );
        Ok(node)
    }

    /// The address each shard listens on, indexed by shard.
    pub fn listen_addrs(&self) -> &[SocketAddr] {
        &self.listen_addrs
    }

    /// A shard whose thread has ended while the node is running (a crash), if any.
    pub fn exited_shard(&self) -> Option<usize> {
        self.threads
            .iter()
            .find(|thread| thread.handle.is_finished())
            .map(|thread| thread.shard_id)
    }

    /// Stops accepting, drains connections, calls every handler's `shutdown`, joins the threads.
    pub fn shutdown(mut self) -> anyhow::Result<()> {
        let result = self.shutdown_phases();
        tracing::info!("ringbroker stopped");
        result
    }

    fn shutdown_phases(&mut self) -> anyhow::Result<()> {
        // Phase limits: the shards bound their own drain by the same timeout; the grace covers
        // the time from the shard's deadline to its report reaching us.
        let grace = Duration::from_secs(2);
        let mut problems = Vec::new();
        drop(self.stop_serving.take());
        let late = self.wait_for_all(self.shutdown_timeout + grace, |event| match event {
            ShardEvent::Drained { shard } => Some(*shard),
            _ => None,
        });
        if !late.is_empty() {
            problems.push(format!("shards {late:?} did not finish draining"));
        }
        drop(self.stop_handlers.take());
        let late = self.wait_for_all(self.shutdown_timeout + grace, |event| match event {
            ShardEvent::ShutDown { shard } => Some(*shard),
            _ => None,
        });
        if !late.is_empty() {
            problems.push(format!(
                "shards {late:?} did not finish their handler shutdown"
            ));
        }
        problems.extend(shard::take_unclean_shutdown());
        drop(self.stop_threads.take());
        let deadline = Instant::now() + grace;
        for thread in std::mem::take(&mut self.threads) {
            while !thread.handle.is_finished() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(10));
            }
            if thread.handle.is_finished() {
                if thread.handle.join().is_err() {
                    problems.push(format!("shard {} panicked", thread.shard_id));
                }
            } else {
                problems.push(format!("shard {} thread did not end", thread.shard_id));
            }
        }
        if problems.is_empty() {
            Ok(())
        } else {
            for problem in &problems {
                tracing::error!("shutdown: {problem}");
            }
            bail!("unclean shutdown: {}", problems.join("; "))
        }
    }

    /// Waits until every ready shard has sent the event `select` recognises; returns the
    /// shards that had not when the timeout expired.
    fn wait_for_all(
        &self,
        timeout: Duration,
        select: impl Fn(&ShardEvent) -> Option<usize>,
    ) -> Vec<usize> {
        let deadline = Instant::now() + timeout;
        let mut waiting = self.ready_shards.clone();
        while !waiting.is_empty() {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            match self
                .events
                .recv_timeout(left.min(Duration::from_millis(100)))
            {
                Ok(event) => {
                    if let Some(shard) = select(&event) {
                        waiting.remove(&shard);
                    }
                }
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    // A shard whose thread has ended will never report.
                    for thread in &self.threads {
                        if thread.handle.is_finished() {
                            waiting.remove(&thread.shard_id);
                        }
                    }
                }
                Err(mpsc::RecvTimeoutError::Disconnected) => break,
            }
        }
        waiting.into_iter().collect()
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        // Firing every phase at once lets the shards wind down on their own; nobody waits.
        let triggers = [
            self.stop_serving.take(),
            self.stop_handlers.take(),
            self.stop_threads.take(),
        ];
        if std::thread::panicking() {
            // Firing a trigger wakes tasks on the shard runtimes, and compio's cross-thread
            // wake aborts the process when it runs on a thread that is unwinding: fire them
            // from a thread that is not.
            let firing = std::thread::spawn(move || drop(triggers));
            let _ = firing.join();
        } else {
            drop(triggers);
        }
    }
}

/// One shard's life: build the handler, serve until stopped, drain, shut the handler down, and
/// keep the runtime (and so the mailbox) alive until every shard is done.
async fn shard_main<F: HandlerFactory>(
    ctx: ShardContext,
    factory: Arc<F>,
    listener: Option<TcpListener>,
    events: mpsc::Sender<ShardEvent>,
    [all_ready, serving, handlers, threads]: [StopSignal; 4],
) {
    let shard = ctx.shard_id();
    let Some(listener) = listener else {
        let _ = events.send(ShardEvent::Failed {
            shard,
            error: "no listener was bound for this shard".to_string(),
        });
        return;
    };
    let handler: Rc<F::Handler> = match factory.create(ctx.clone()).await {
        Ok(handler) => Rc::new(handler),
        Err(error) => {
            let _ = events.send(ShardEvent::Failed {
                shard,
                error: format!("{error:#}"),
            });
            return;
        }
    };
    let _ = events.send(ShardEvent::Ready { shard });
    // Connections that arrive meanwhile wait in the listener's backlog.
    all_ready.wait().await;
    match server::serve(ctx, listener, handler.clone(), serving).await {
        Ok(summary) => tracing::info!(
            shard,
            accepted = summary.connections_accepted,
            refused = summary.connections_refused,
            "shard stopped serving"
        ),
        Err(error) => tracing::error!(shard, %error, "shard server failed"),
    }
    let _ = events.send(ShardEvent::Drained { shard });
    handlers.wait().await;
    handler.shutdown().await;
    let _ = events.send(ShardEvent::ShutDown { shard });
    threads.wait().await;
}

/// Binds shard `i`'s listener on the configured port + `i` (or an ephemeral port for each shard
/// when the configured port is 0), before any shard starts, so a busy port fails startup with a
/// message naming it.
fn bind_listeners(config: &Config) -> anyhow::Result<Vec<TcpListener>> {
    let host = if config.listener.host.is_empty() {
        "0.0.0.0"
    } else {
        config.listener.host.as_str()
    };
    let mut listeners = Vec::with_capacity(config.shard_count);
    for shard in 0..config.shard_count {
        let port = if config.listener.port == 0 {
            0
        } else {
            config.listener.port + shard as u16
        };
        let address = (host, port)
            .to_socket_addrs()
            .with_context(|| format!("cannot resolve listener host `{host}`"))?
            .next()
            .with_context(|| format!("listener host `{host}` has no address"))?;
        let listener = bind_with_retry(shard, address, config.listener_bind_retry_ms)?;
        listeners.push(listener);
    }
    Ok(listeners)
}

/// Binds `address`, retrying EADDRINUSE for up to `retry_ms`: after a SIGKILL the kernel releases
/// the dead process's listening sockets only when it has torn down its io_uring instances, which
/// can take a moment, so a supervisor's immediate restart would otherwise fail. Each wait is
/// logged; any other error, or the port still busy at the deadline, fails startup naming it.
fn bind_with_retry(
    shard: usize,
    address: SocketAddr,
    retry_ms: u64,
) -> anyhow::Result<TcpListener> {
    let started = Instant::now();
    let deadline = started + Duration::from_millis(retry_ms);
    let mut attempts = 0u32;
    // Bounded by the deadline: every round sleeps 100 ms or returns.
    loop {
        attempts += 1;
        match TcpListener::bind(address) {
            Ok(listener) => {
                if attempts > 1 {
                    tracing::info!(shard, %address, attempts, waited_ms = started.elapsed().as_millis() as u64,
                        "listening port became free");
                }
                return Ok(listener);
            }
            Err(error)
                if error.kind() == std::io::ErrorKind::AddrInUse && Instant::now() < deadline =>
            {
                if attempts == 1 {
                    tracing::warn!(shard, %address, retry_ms,
                        "listening port in use (a previous broker may still be ending); retrying");
                }
                std::thread::sleep(Duration::from_millis(100));
            }
            Err(error) => {
                return Err(error).with_context(|| {
                    format!(
                        "shard {shard} cannot listen on {address} (tried for {} ms)",
                        started.elapsed().as_millis()
                    )
                });
            }
        }
    }
}

/// Raises the soft `RLIMIT_NOFILE` to the hard limit, as Kafka's and Redpanda's service files ask the
/// operator to, and logs both. Segment descriptors are bounded by the per-shard descriptor cache
/// whatever the limit; a higher limit lets that cache and the connection count be larger.
fn raise_nofile_limit() {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit and setrlimit read and write the struct we pass.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
        let error = std::io::Error::last_os_error();
        tracing::warn!(%error, "cannot read RLIMIT_NOFILE");
        return;
    }
    let before = limit.rlim_cur;
    if limit.rlim_cur < limit.rlim_max {
        limit.rlim_cur = limit.rlim_max;
        // SAFETY: as above.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &limit) } != 0 {
            let error = std::io::Error::last_os_error();
            tracing::warn!(soft = before, hard = limit.rlim_max, %error,
                "cannot raise the open-files soft limit to the hard limit");
            return;
        }
    }
    tracing::info!(
        soft_before = before,
        soft = limit.rlim_cur,
        hard = limit.rlim_max,
        "open-files limit (RLIMIT_NOFILE)"
    );
}

/// An exclusive `flock` on `<log.dir>/.lock`, held for the node's life so that two brokers never
/// share a log directory.
struct LogDirLock {
    _file: File,
}

impl LogDirLock {
    fn acquire(dir: &Path) -> anyhow::Result<LogDirLock> {
        std::fs::create_dir_all(dir)
            .with_context(|| format!("cannot create log directory {}", dir.display()))?;
        let path: PathBuf = dir.join(".lock");
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .with_context(|| format!("cannot open {}", path.display()))?;
        // SAFETY: flock on a descriptor we own; the lock lives as long as the file stays open.
        if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
            let error = std::io::Error::last_os_error();
            if error.raw_os_error() == Some(libc::EWOULDBLOCK) {
                bail!(
                    "log directory {} is in use by another ringbroker (it holds {})",
                    dir.display(),
                    path.display()
                );
            }
            return Err(error).with_context(|| format!("cannot lock {}", path.display()));
        }
        Ok(LogDirLock { _file: file })
    }
}

/// Probes the log dir's file system for `RWF_DONTCACHE` (on a short-lived io_uring runtime of its
/// own, before any shard exists) and returns the mode appends will use: never `Auto`.
fn resolve_write_mode(config: &Config) -> anyhow::Result<WriteMode> {
    let runtime = compio::runtime::Runtime::new()
        .context("cannot create the io_uring runtime for the write-mode probe")?;
    let mode = runtime.block_on(write_mode::resolve(
        &Disk::real(),
        &config.log_dir,
        config.log_write_mode,
    ))?;
    tracing::info!("appends use {} writes", mode.name());
    Ok(mode)
}

fn termination_signal_set() -> libc::sigset_t {
    // SAFETY: sigemptyset initialises the set before sigaddset uses it.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGINT);
        libc::sigaddset(&mut set, libc::SIGTERM);
        set
    }
}

/// Blocks SIGINT and SIGTERM in the calling thread (and the threads it starts afterwards).
pub fn block_termination_signals() -> std::io::Result<()> {
    let set = termination_signal_set();
    // SAFETY: a valid set; the old mask is not needed.
    let rc = unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::from_raw_os_error(rc))
    }
}

/// Waits up to `timeout` for a blocked SIGINT/SIGTERM; returns its number.
fn wait_for_termination_signal(timeout: Duration) -> Option<i32> {
    let set = termination_signal_set();
    let timeout = libc::timespec {
        tv_sec: timeout.as_secs() as libc::time_t,
        tv_nsec: timeout.subsec_nanos() as libc::c_long,
    };
    // SAFETY: valid set and timespec; no siginfo wanted.
    let signal = unsafe { libc::sigtimedwait(&set, std::ptr::null_mut(), &timeout) };
    (signal > 0).then_some(signal)
}
