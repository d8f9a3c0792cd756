//! shard: one pinned thread per core, each running its own compio io_uring runtime, and the only
//! way shards talk to each other: bounded mailboxes (`ShardContext::run_on`).
//!
//! Every io_uring-specific piece of ringbroker lives under this module so the runtime can be
//! swapped: the startup probe (`probe`), the splice path with its pipe pool (`pipe`), and the
//! thread/runtime setup here. Nothing here knows Kafka; shards run whatever future they are given.
//!
//! Architecture invariants:
//! - a shard's thread-local state is touched only by futures running on that shard's thread;
//!   another shard reaches it only by sending a closure through the target's mailbox;
//! - mailboxes are bounded (`ringbroker.mailbox.capacity`): a sender awaits while the target's
//!   mailbox is full, and the target's dispatcher never awaits a job (it spawns each one as a task),
//!   so two shards calling each other cannot deadlock on full mailboxes.

pub mod pipe;
pub mod probe;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;

use crate::config::Config;

/// A unit of work sent to another shard: runs on the target thread and spawns the real task.
type Job = Box<dyn FnOnce() + Send + 'static>;

/// Why a cross-shard call failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ShardError {
    #[error("shard {shard} does not exist (there are {shard_count})")]
    NoSuchShard { shard: usize, shard_count: usize },
    /// The target shard has stopped (shutdown or a crash); the call did not run, or its result
    /// was lost with the shard.
    #[error("shard {shard} is gone")]
    ShardGone { shard: usize },
}

/// What a shard knows about itself and the node: its id, the other shards' mailboxes, the
/// configuration and the addresses every shard listens on. Cheap to clone; `Send + Sync`.
#[derive(Clone)]
pub struct ShardContext {
    shard_id: usize,
    config: Arc<Config>,
    mailboxes: Arc<[flume::Sender<Job>]>,
    listen_addrs: Arc<[SocketAddr]>,
}

impl std::fmt::Debug for ShardContext {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ShardContext")
            .field("shard_id", &self.shard_id)
            .field("shard_count", &self.mailboxes.len())
            .finish()
    }
}

impl ShardContext {
    /// This shard's number, `0..shard_count()`.
    pub fn shard_id(&self) -> usize {
        self.shard_id
    }

    pub fn shard_count(&self) -> usize {
        self.mailboxes.len()
    }

    pub fn config(&self) -> &Arc<Config> {
        &self.config
    }

    /// The address each shard's listener is bound to, indexed by shard. With a configured port of
    /// 0 these are the ephemeral ports the kernel chose.
    pub fn listen_addrs(&self) -> &[SocketAddr] {
        &self.listen_addrs
    }

    /// The host and port clients should use to reach `shard`: the advertised listener with the
    /// shard's offset added to the port, or the shard's bound port when the advertised port is 0.
    pub fn advertised_endpoint(&self, shard: usize) -> (String, u16) {
        let advertised = &self.config.advertised_listener;
        let port = if advertised.port == 0 || self.config.listener.port == 0 {
            self.listen_addrs
                .get(shard)
                .map_or(advertised.port, SocketAddr::port)
        } else {
            advertised.port.saturating_add(shard as u16)
        };
        (advertised.host.clone(), port)
    }

    /// Runs `f` on `shard`'s thread as a task and returns its result. For our own shard it runs
    /// `f` right here. Waits while the target's mailbox is full (backpressure); fails if the
    /// target shard is gone.
    pub async fn run_on<F, Fut, R>(&self, shard: usize, f: F) -> Result<R, ShardError>
    where
        F: FnOnce() -> Fut + Send + 'static,
        Fut: Future<Output = R> + 'static,
        R: Send + 'static,
    {
        let mailbox = self.mailboxes.get(shard).ok_or(ShardError::NoSuchShard {
            shard,
            shard_count: self.mailboxes.len(),
        })?;
        if shard == self.shard_id {
            return Ok(f().await);
        }
        let (reply_tx, reply_rx) = flume::bounded::<R>(1);
        let job: Job = Box::new(move || {
            compio::runtime::spawn(async move {
                // The caller may have given up waiting; then nobody wants the result.
                let _ = reply_tx.send(f().await);
            })
            .detach();
        });
        mailbox
            .send_async(job)
            .await
            .map_err(|_| ShardError::ShardGone { shard })?;
        reply_rx
            .recv_async()
            .await
            .map_err(|_| ShardError::ShardGone { shard })
    }
}

/// A running shard thread.
pub struct ShardThread {
    pub shard_id: usize,
    pub handle: std::thread::JoinHandle<()>,
}

/// Why shards could not be started.
#[derive(Debug, thiserror::Error)]
pub enum SpawnError {
    #[error("cannot start thread for shard {shard}: {source}")]
    Thread {
        shard: usize,
        source: std::io::Error,
    },
}

/// What shard handlers could not finish at shutdown (partitions not marked clean), for the node to
/// name in its exit status. Process-wide because a process runs one node.
static UNCLEAN_SHUTDOWN: std::sync::Mutex<Vec<String>> = std::sync::Mutex::new(Vec::new());

/// Records something a handler's shutdown left undone; the node then exits non-zero naming it.
pub fn report_unclean_shutdown(what: String) {
    if let Ok(mut all) = UNCLEAN_SHUTDOWN.lock() {
        all.push(what);
    }
}

/// Takes what `report_unclean_shutdown` recorded.
pub fn take_unclean_shutdown() -> Vec<String> {
    UNCLEAN_SHUTDOWN
        .lock()
        .map(|mut all| std::mem::take(&mut *all))
        .unwrap_or_default()
}

/// Starts `config.shard_count` threads, each pinned to a core (round robin over the cores this
/// process may use) and running a compio runtime. On each, the mailbox dispatcher is started and
/// then `main(ctx)` runs to completion; the thread ends when `main`'s future does.
///
/// `listen_addrs` has one address per shard (what `ShardContext::listen_addrs` reports).
pub fn spawn_shards<M, Fut>(
    config: Arc<Config>,
    listen_addrs: Vec<SocketAddr>,
    main: M,
) -> Result<Vec<ShardThread>, SpawnError>
where
    M: Fn(ShardContext) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = ()> + 'static,
{
    let shard_count = config.shard_count;
    assert_eq!(
        listen_addrs.len(),
        shard_count,
        "one listen address per shard"
    );
    let mut senders = Vec::with_capacity(shard_count);
    let mut receivers = Vec::with_capacity(shard_count);
    for _ in 0..shard_count {
        let (tx, rx) = flume::bounded::<Job>(config.mailbox_capacity);
        senders.push(tx);
        receivers.push(rx);
    }
    let mailboxes: Arc<[flume::Sender<Job>]> = senders.into();
    let listen_addrs: Arc<[SocketAddr]> = listen_addrs.into();
    let cores = core_affinity::get_core_ids().unwrap_or_default();
    let main = Arc::new(main);
    let mut threads = Vec::with_capacity(shard_count);
    for (shard_id, mailbox) in receivers.into_iter().enumerate() {
        let ctx = ShardContext {
            shard_id,
            config: config.clone(),
            mailboxes: mailboxes.clone(),
            listen_addrs: listen_addrs.clone(),
        };
        let core = (!cores.is_empty()).then(|| cores[shard_id % cores.len()]);
        let main = main.clone();
        let handle = std::thread::Builder::new()
            .name(format!("shard-{shard_id}"))
            .spawn(move || shard_thread(ctx, core, mailbox, main))
            .map_err(|source| SpawnError::Thread {
                shard: shard_id,
                source,
            })?;
        threads.push(ShardThread { shard_id, handle });
    }
    Ok(threads)
}

fn shard_thread<M, Fut>(
    ctx: ShardContext,
    core: Option<core_affinity::CoreId>,
    mailbox: flume::Receiver<Job>,
    main: Arc<M>,
) where
    M: Fn(ShardContext) -> Fut,
    Fut: Future<Output = ()> + 'static,
{
    let shard_id = ctx.shard_id;
    if let Some(core) = core
        && !core_affinity::set_for_current(core)
    {
        tracing::warn!(
            shard = shard_id,
            core = core.id,
            "could not pin shard thread to its core"
        );
    }
    // The probe at startup has already shown that rings can be created; failing here means a
    // resource limit (memlock, file descriptors) was hit, which the shard cannot work around.
    let runtime = match compio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(error) => {
            tracing::error!(shard = shard_id, %error, "cannot create the io_uring runtime");
            return;
        }
    };
    runtime.block_on(async move {
        // The dispatcher spawns each job instead of awaiting it, so a job that itself calls
        // run_on cannot stall this shard's mailbox.
        compio::runtime::spawn(async move {
            while let Ok(job) = mailbox.recv_async().await {
                job();
            }
        })
        .detach();
        main(ctx).await;
    });
    tracing::debug!(shard = shard_id, "shard thread finished");
}

/// Creates a one-shot broadcast: dropping the [`StopTrigger`] wakes every clone of the
/// [`StopSignal`], on any thread. Used for the node's shutdown phases.
pub fn stop_pair() -> (StopTrigger, StopSignal) {
    // Nothing is ever sent: the channel only carries "the sender is gone".
    let (tx, rx) = flume::bounded::<()>(1);
    (StopTrigger { _sender: tx }, StopSignal(rx))
}

/// Dropping it (or calling [`StopTrigger::trigger`]) fires the paired [`StopSignal`]s.
#[derive(Debug)]
pub struct StopTrigger {
    /// Never used to send: its drop is the signal.
    _sender: flume::Sender<()>,
}

impl StopTrigger {
    pub fn trigger(self) {}
}

/// Fires once its [`StopTrigger`] is dropped. Cheap to clone; awaitable on any thread.
#[derive(Debug, Clone)]
pub struct StopSignal(flume::Receiver<()>);

impl StopSignal {
    pub fn is_stopped(&self) -> bool {
        self.0.is_disconnected()
    }

    /// Completes once the trigger is dropped.
    pub async fn wait(&self) {
        while self.0.recv_async().await.is_ok() {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc;
    use std::time::Duration;

    fn config(shards: usize, mailbox_capacity: usize) -> Arc<Config> {
        let mut config = Config::defaults();
        config.shard_count = shards;
        config.mailbox_capacity = mailbox_capacity;
        Arc::new(config)
    }

    fn addrs(shards: usize) -> Vec<SocketAddr> {
        (0..shards)
            .map(|i| SocketAddr::from(([127, 0, 0, 1], 9000 + i as u16)))
            .collect()
    }

    fn join_all(threads: Vec<ShardThread>) {
        for thread in threads {
            thread.handle.join().expect("shard thread");
        }
    }

    #[test]
    fn crossing_calls_through_tiny_mailboxes_all_complete() {
        // Both shards fire many calls at each other at once, each call calling back, through
        // mailboxes of capacity 1: a dispatcher that awaited its jobs would deadlock here.
        let (results_tx, results_rx) = mpsc::channel();
        let threads = spawn_shards(config(2, 1), addrs(2), move |ctx| {
            let results = results_tx.clone();
            async move {
                let other = 1 - ctx.shard_id();
                let calls = (0..64u64).map(|i| {
                    let ctx = ctx.clone();
                    async move {
                        let back = ctx.shard_id();
                        let inner = ctx.clone();
                        ctx.run_on(other, move || async move {
                            inner.run_on(back, move || async move { i * 2 }).await
                        })
                        .await
                    }
                });
                let outputs = futures_util::future::join_all(calls).await;
                let sum: u64 = outputs
                    .into_iter()
                    .map(|r| r.expect("shard alive").expect("shard alive"))
                    .sum();
                results.send(sum).unwrap();
                // Stay alive until the other shard is done calling us.
                compio::time::sleep(Duration::from_millis(300)).await;
            }
        })
        .unwrap();
        for _ in 0..2 {
            let sum = results_rx
                .recv_timeout(Duration::from_secs(20))
                .expect("no deadlock");
            assert_eq!(sum, (0..64u64).map(|i| i * 2).sum::<u64>());
        }
        join_all(threads);
    }

    #[test]
    fn run_on_a_stopped_shard_fails_with_shard_gone() {
        let (go_tx, go_rx) = flume::bounded::<()>(1);
        let (result_tx, result_rx) = mpsc::channel();
        let threads = spawn_shards(config(2, 4), addrs(2), move |ctx| {
            let go = go_rx.clone();
            let result = result_tx.clone();
            async move {
                if ctx.shard_id() == 1 {
                    return;
                }
                go.recv_async().await.unwrap();
                let outcome = ctx.run_on(1, || async { 1 }).await;
                let missing = ctx.run_on(5, || async { 1 }).await;
                result.send((outcome, missing)).unwrap();
            }
        })
        .unwrap();
        let mut threads = threads.into_iter();
        let shard0 = threads.next().unwrap();
        threads.next().unwrap().handle.join().unwrap();
        go_tx.send(()).unwrap();
        let (outcome, missing) = result_rx.recv_timeout(Duration::from_secs(20)).unwrap();
        assert_eq!(outcome, Err(ShardError::ShardGone { shard: 1 }));
        assert_eq!(
            missing,
            Err(ShardError::NoSuchShard {
                shard: 5,
                shard_count: 2
            })
        );
        shard0.handle.join().unwrap();
    }

    #[test]
    fn stop_signal_wakes_every_waiter() {
        let (trigger, signal) = stop_pair();
        assert!(!signal.is_stopped());
        let waiters: Vec<_> = (0..3)
            .map(|_| {
                let signal = signal.clone();
                std::thread::spawn(move || {
                    compio::runtime::Runtime::new()
                        .unwrap()
                        .block_on(async move { signal.wait().await })
                })
            })
            .collect();
        trigger.trigger();
        for waiter in waiters {
            waiter.join().unwrap();
        }
        assert!(signal.is_stopped());
    }

    #[test]
    fn advertised_endpoint_adds_the_shard_to_the_port() {
        let mut config = Config::defaults();
        config.advertised_listener.host = "broker.example".into();
        config.advertised_listener.port = 9092;
        let ctx = ShardContext {
            shard_id: 0,
            config: Arc::new(config.clone()),
            mailboxes: Vec::new().into(),
            listen_addrs: addrs(2).into(),
        };
        assert_eq!(
            ctx.advertised_endpoint(1),
            ("broker.example".to_string(), 9093)
        );
        config.listener.port = 0;
        let ctx = ShardContext {
            config: Arc::new(config),
            ..ctx
        };
        assert_eq!(
            ctx.advertised_endpoint(1),
            ("broker.example".to_string(), 9001)
        );
    }
}
