//! server: each shard's listener and connections. It cuts the byte stream into size-prefixed
//! frames, hands each frame to the shard's [`Handler`], and writes the replies back in request
//! order, sending file ranges by splice (or copy) through `shard::pipe`.
//!
//! Pipelining: a connection admits its requests one at a time, in request order (each
//! [`Handler::admit`] returns before the next one starts), but an admitted request may finish later
//! ([`Admission::Later`]) while the connection admits the requests behind it. Up to
//! `ringbroker.connection.max.inflight.requests` requests per connection are admitted and not yet
//! answered; replies leave in request order however their work finishes.
//!
//! The server knows no Kafka: a request is an opaque frame, a reply is a list of byte and file
//! parts that already carry their own size prefix. Limits, all from the configuration: frame size
//! (`socket.request.max.bytes`, a larger frame closes that connection), connections per shard, per
//! node and per client address (`ringbroker.max.connections.per.shard`, `max.connections`,
//! `max.connections.per.ip`: at a limit the connection idle longest makes room (`quotas`); a
//! new connection is refused only when none is idle), bytes of requests held per shard
//! (`queued.max.request.bytes`: past it the shard reads no more until replies free some), bytes read
//! ahead but not yet answered per connection (`ringbroker.connection.max.inflight.bytes`), and two
//! deadlines: no request for `connections.max.idle.ms` closes an idle connection, and a frame not
//! complete within `ringbroker.connection.frame.timeout.ms` of its first bytes closes it too.
//! Lines about a single connection's problems go through [`problems::permit`]: at most one per
//! connection and `ringbroker.connection.log.lines.per.second` per shard, the rest summed up.

mod connection;
pub mod problems;
mod queued;
mod quotas;

use std::cell::{Cell, RefCell};
use std::future::Future;
use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::pin::pin;
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::future::{Either, LocalBoxFuture, select};

use crate::shard::pipe::{FileSender, SendStats};
use crate::shard::{ShardContext, StopSignal};
use quotas::{ConnectionPermit, NodeConnections, Refusal};

/// One part of a reply: bytes from memory, or a range of an open file sent without copying.
pub enum OutPart {
    Bytes(Bytes),
    File(FileSlice),
}

/// A range of an open file. The `Rc` keeps the descriptor open until the bytes are sent, even if
/// the file is deleted meanwhile (log retention).
#[derive(Clone)]
pub struct FileSlice {
    pub fd: Rc<dyn AsRawFd>,
    pub offset: u64,
    pub len: u32,
}

impl std::fmt::Debug for FileSlice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FileSlice")
            .field("fd", &self.fd.as_raw_fd())
            .field("offset", &self.offset)
            .field("len", &self.len)
            .finish()
    }
}

/// What to do after a request.
pub enum Reply {
    /// Nothing is sent (e.g. a produce with acks=0).
    None,
    /// Send these parts, in order; together they form one response frame.
    Send(Vec<OutPart>),
    /// Send these parts, then close the connection.
    SendThenClose(Vec<OutPart>),
    /// Close the connection without replying.
    Close,
}

/// Who sent a request: the shard serving the connection, the peer, and a node-wide unique id.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ConnectionInfo {
    pub shard: usize,
    pub peer: SocketAddr,
    pub id: u64,
}

/// What a handler made of a request once it has admitted it.
pub enum Admission {
    /// The reply is ready (the request was handled entirely during admission).
    Done(Reply),
    /// Everything about the request that must happen in request order has happened; the reply
    /// comes from this future, which the connection runs beside the requests admitted after it.
    Later(LocalBoxFuture<'static, Reply>),
}

/// The request handler of one shard. It lives on the shard's thread (it may be `!Send`) and is
/// shared by all of that shard's connections.
#[allow(async_fn_in_trait)]
pub trait Handler: 'static {
    /// One request frame without its 4-byte size prefix; the reply's parts already include the
    /// size prefix. A connection awaits one `admit` at a time, in request order: whatever a
    /// request must do before the next request of its connection starts (a produce taking its
    /// place in a partition's log) belongs here, and only work whose order does not matter (waiting
    /// for a flush, a fetch's long poll) goes in [`Admission::Later`].
    async fn admit(&self, conn: &ConnectionInfo, request: Bytes) -> Admission;
    /// Flush, write clean-shutdown markers; called once per shard on SIGTERM/SIGINT, after the
    /// shard's connections have drained (or the drain timed out).
    async fn shutdown(&self);
}

/// Builds each shard's handler on that shard's thread.
#[allow(async_fn_in_trait)]
pub trait HandlerFactory: Send + Sync + 'static {
    type Handler: Handler;
    async fn create(&self, ctx: ShardContext) -> anyhow::Result<Self::Handler>;
}

/// How a shard's server ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ServeSummary {
    pub connections_accepted: u64,
    pub connections_refused: u64,
    /// Connections still open when the drain timeout expired (they are dropped with the shard).
    pub connections_abandoned: usize,
}

/// The per-shard state shared by the listener and every connection.
pub(crate) struct ShardServer<H> {
    pub(crate) ctx: ShardContext,
    pub(crate) handler: Rc<H>,
    pub(crate) files: Rc<FileSender>,
    pub(crate) stop: StopSignal,
    /// Bytes of requests the shard holds (`queued.max.request.bytes`).
    pub(crate) queued: queued::QueuedBytes,
    live_connections: Cell<usize>,
    /// Woken (a token is left) whenever a connection closes, for the shutdown drain.
    closed_tx: flume::Sender<()>,
    closed_rx: flume::Receiver<()>,
}

thread_local! {
    /// This shard's file sender, so handlers and tests can read its counters.
    static FILE_SENDER: RefCell<Option<Rc<FileSender>>> = const { RefCell::new(None) };
}

/// The splice/copy counters and open pipes of the shard this is called on (`None` outside a
/// serving shard).
pub fn shard_send_stats() -> Option<(SendStats, usize)> {
    FILE_SENDER.with(|cell| {
        cell.borrow()
            .as_ref()
            .map(|files| (files.stats(), files.live_pipes()))
    })
}

/// Serves one shard: accepts on `listener` until `stop` fires, then stops accepting, lets each
/// connection answer the requests it has already read, and waits for them to close for at most
/// `ringbroker.shutdown.timeout.ms`. Does not call `Handler::shutdown` (the node does, once every
/// shard has drained, so that cross-shard calls still work while others drain).
pub async fn serve<H: Handler>(
    ctx: ShardContext,
    listener: std::net::TcpListener,
    handler: Rc<H>,
    stop: StopSignal,
) -> std::io::Result<ServeSummary> {
    let config = ctx.config().clone();
    let files = Rc::new(FileSender::new(
        config.pipe_pool_size,
        config.pipe_size_bytes as usize,
        u64::from(config.fetch_splice_min_bytes),
    ));
    FILE_SENDER.with(|cell| *cell.borrow_mut() = Some(files.clone()));
    let listener = compio::net::TcpListener::from_std(listener)?;
    let (closed_tx, closed_rx) = flume::bounded(1);
    let server = Rc::new(ShardServer {
        ctx,
        handler,
        files,
        stop: stop.clone(),
        queued: queued::QueuedBytes::new(config.queued_max_request_bytes),
        live_connections: Cell::new(0),
        closed_tx,
        closed_rx,
    });
    let shard = server.ctx.shard_id();
    problems::install(shard, config.connection_log_lines_per_second);
    // Reports suppressed problem lines even when no further problem arrives to report them.
    let ticker_stop = stop.clone();
    compio::runtime::spawn(async move {
        while unless_stopped(&ticker_stop, compio::time::sleep(Duration::from_secs(1)))
            .await
            .is_some()
        {
            problems::tick();
        }
        problems::tick();
    })
    .detach();
    let mut summary = ServeSummary {
        connections_accepted: 0,
        connections_refused: 0,
        connections_abandoned: 0,
    };
    let mut next_sequence: u64 = 0;
    let node = NodeConnections::of(server.ctx.config());
    loop {
        let accepted = match select(pin!(listener.accept()), pin!(stop.wait())).await {
            Either::Left((accepted, _)) => accepted,
            Either::Right(_) => break,
        };
        let (stream, peer) = match accepted {
            Ok(pair) => pair,
            Err(error) => {
                // EMFILE/ENFILE/ENOBUFS: back off instead of spinning on the same error, and log
                // it within the shard's problem-line budget.
                if problems::permit(None) {
                    tracing::warn!(shard, %error, "accept failed");
                }
                compio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let permit = match admit_connection(&server, &node, peer).await {
            Ok(permit) => permit,
            Err(key) => {
                summary.connections_refused += 1;
                if problems::permit(None) {
                    tracing::warn!(
                        shard,
                        %peer,
                        refused = summary.connections_refused,
                        "refusing connection: {key} reached and no idle connection to close"
                    );
                }
                drop(stream);
                continue;
            }
        };
        summary.connections_accepted += 1;
        // Shard number in the top 16 bits keeps ids unique across the node.
        let id = ((shard as u64) << 48) | (next_sequence & ((1 << 48) - 1));
        next_sequence += 1;
        let info = ConnectionInfo { shard, peer, id };
        if let Err(error) = stream.set_nodelay(true) {
            tracing::debug!(shard, %peer, %error, "cannot set TCP_NODELAY");
        }
        server
            .live_connections
            .set(server.live_connections.get() + 1);
        let task_server = server.clone();
        let activity = quotas::register(id, peer.ip());
        compio::runtime::spawn(async move {
            let _guard = LiveGuard(&task_server);
            let _permit = permit;
            connection::run(&task_server, stream, info, activity).await;
            quotas::unregister(id);
        })
        .detach();
    }
    drop(listener);
    let open = server.live_connections.get();
    tracing::info!(
        shard,
        open_connections = open,
        "stopped accepting; draining connections"
    );
    let deadline = Instant::now() + Duration::from_millis(config.shutdown_timeout_ms);
    while server.live_connections.get() > 0 {
        let wait = deadline.saturating_duration_since(Instant::now());
        if wait.is_zero()
            || compio::time::timeout(wait, server.closed_rx.recv_async())
                .await
                .is_err()
        {
            break;
        }
    }
    summary.connections_abandoned = server.live_connections.get();
    if summary.connections_abandoned > 0 {
        tracing::warn!(
            shard,
            connections = summary.connections_abandoned,
            "shutdown timeout: closing connections with requests still in progress"
        );
    }
    Ok(summary)
}

/// How long a new connection waits for the idle connection closed to make room for it.
const ROOM_WAIT: Duration = Duration::from_millis(500);

/// How long the accept loop waits for another shard to close an idle connection for it.
const REMOTE_EVICT_TIMEOUT: Duration = Duration::from_millis(200);

/// Which limit a new connection would exceed.
#[derive(Clone, Copy)]
enum Full {
    Shard,
    Node(Refusal),
}

/// Takes a place for a connection from `peer` under `ringbroker.max.connections.per.shard`,
/// `max.connections` and `max.connections.per.ip`. When one is reached, the connection idle
/// longest that counts against it (this shard's for the shard limit; the node's, from `peer`'s
/// address for the per-address limit) is closed and its place taken; only when none is idle is
/// the new connection refused, with the key of the limit.
async fn admit_connection<H>(
    server: &ShardServer<H>,
    node: &Arc<NodeConnections>,
    peer: SocketAddr,
) -> Result<ConnectionPermit, &'static str> {
    let config = server.ctx.config();
    let mut room_made_at: Option<Instant> = None;
    loop {
        let full = if server.live_connections.get() >= config.max_connections_per_shard {
            Full::Shard
        } else {
            match node.try_acquire(
                peer.ip(),
                config.max_connections,
                config.max_connections_per_ip,
            ) {
                Ok(permit) => return Ok(permit),
                Err(refusal) => Full::Node(refusal),
            }
        };
        let key = match full {
            Full::Shard => crate::config::KEY_MAX_CONNECTIONS,
            Full::Node(refusal) => refusal.key(),
        };
        match room_made_at {
            None => {
                let evicted = match full {
                    Full::Shard => quotas::evict_idle_longest(None),
                    Full::Node(Refusal::Node) => evict_on_any_shard(server, None).await,
                    Full::Node(Refusal::Ip) => evict_on_any_shard(server, Some(peer.ip())).await,
                };
                if !evicted {
                    return Err(key);
                }
                room_made_at = Some(Instant::now());
            }
            Some(at) if at.elapsed() >= ROOM_WAIT => return Err(key),
            Some(_) => {}
        }
        // The closed connection gives its place back when its task ends.
        compio::time::sleep(Duration::from_millis(2)).await;
    }
}

/// Closes the node's connection idle longest (from `ip`, if given), on whichever shard holds
/// it: each shard is asked through its mailbox when its oldest idle connection was last active.
/// A shard that does not answer within `REMOTE_EVICT_TIMEOUT` is passed over.
async fn evict_on_any_shard<H>(server: &ShardServer<H>, ip: Option<std::net::IpAddr>) -> bool {
    let ctx = &server.ctx;
    let mut oldest: Option<(Instant, usize)> = None;
    for shard in 0..ctx.shard_count() {
        let ask = ctx.run_on(shard, move || async move { quotas::idle_since(ip) });
        if let Ok(Ok(Some(since))) = compio::time::timeout(REMOTE_EVICT_TIMEOUT, ask).await
            && oldest.is_none_or(|(oldest_since, _)| since < oldest_since)
        {
            oldest = Some((since, shard));
        }
    }
    let Some((_, shard)) = oldest else {
        return false;
    };
    let evict = ctx.run_on(shard, move || async move { quotas::evict_idle_longest(ip) });
    matches!(
        compio::time::timeout(REMOTE_EVICT_TIMEOUT, evict).await,
        Ok(Ok(true))
    )
}

/// Counts a connection as live until its task ends, however it ends.
struct LiveGuard<'a, H>(&'a ShardServer<H>);

impl<H> Drop for LiveGuard<'_, H> {
    fn drop(&mut self) {
        let server = self.0;
        server
            .live_connections
            .set(server.live_connections.get() - 1);
        let _ = server.closed_tx.try_send(());
    }
}

/// Runs `future` unless `stop` fires first.
pub(crate) async fn unless_stopped<F: Future>(stop: &StopSignal, future: F) -> Option<F::Output> {
    match select(pin!(future), pin!(stop.wait())).await {
        Either::Left((output, _)) => Some(output),
        Either::Right(_) => None,
    }
}
