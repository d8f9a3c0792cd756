//! connection: one client connection, as three cooperating parts in one task. The reader cuts
//! frames off the socket and queues them; the admitter hands them to the handler one at a time, in
//! request order, and queues each admitted request (its reply, or the task still producing it) in a
//! second, ordered queue; the writer takes that queue in order, waits for each reply and writes it.
//! So a request is admitted while earlier ones still wait (on a flush, a long poll), their effects
//! happen in request order (the next admission starts only after the previous one returned), and
//! replies leave in request order, as Kafka clients require.
//!
//! Bounds: bytes read but not yet answered (`ringbroker.connection.max.inflight.bytes`; the reader
//! waits) and requests admitted but not yet answered (`ringbroker.connection.max.inflight.requests`;
//! the admitter waits).

use std::pin::pin;
use std::rc::Rc;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use compio::BufResult;
use compio::buf::IntoInner;
use compio::io::{AsyncRead, AsyncWriteExt};
use compio::net::TcpStream;
use compio::runtime::JoinHandle;
use futures_util::future::{Either, select};

use super::problems;
use super::queued::{Grant, Held};
use super::quotas::Activity;
use super::{Admission, ConnectionInfo, Handler, OutPart, Reply, ShardServer, unless_stopped};

/// Bytes asked of each read. Large enough that a stream of small produce requests costs few
/// syscalls, small enough that an idle connection's buffer stays cheap.
const READ_CHUNK_BYTES: usize = 64 * 1024;

/// The most the read buffer grows by ahead of the bytes that fill it.
const MAX_RESERVE_STEP_BYTES: usize = 1 << 20;

/// Gathered bytes (including small file ranges read into memory) are flushed past this much,
/// which bounds the memory one reply holds.
const MAX_GATHER_BYTES: usize = 1 << 20;

/// writev takes at most IOV_MAX (1024) buffers; stay well below it.
const MAX_IOVECS_PER_WRITE: usize = 512;

/// Why the reader stopped.
enum ReaderEnd {
    /// The peer closed its side, or the node is stopping: answer what was read, then close.
    Finish,
    /// A protocol violation or read error: close at once.
    Abort,
}

/// An admitted request waiting for its turn to be answered.
struct Admitted {
    /// Size of the request frame, prefix included, returned to the byte budget once answered.
    frame_bytes: u64,
    reply: Pending,
}

enum Pending {
    Ready(Reply),
    /// The request's remaining work, spawned on the shard's runtime so that it progresses while
    /// the writer waits on earlier replies or on the socket. Dropping the handle (the connection
    /// is torn down) cancels the work.
    Running(JoinHandle<Reply>),
}

/// The connection's shared counters and the tokens that wake a waiting reader or admitter.
struct Budget<'a> {
    /// The bytes this connection holds from the shard's `queued.max.request.bytes` budget: those
    /// read and not yet answered.
    held: Held<'a>,
    /// The in-flight bytes and last activity, which the shard's registry reads to find the
    /// connection idle longest.
    activity: Rc<Activity>,
    inflight_requests: std::cell::Cell<usize>,
    /// A token tells a reader waiting on the byte budget to look again; one pending is enough.
    bytes_released: (flume::Sender<()>, flume::Receiver<()>),
    /// The same for an admitter waiting on the request budget.
    request_released: (flume::Sender<()>, flume::Receiver<()>),
}

/// Serves one connection until it closes.
pub(super) async fn run<H: Handler>(
    server: &ShardServer<H>,
    stream: TcpStream,
    info: ConnectionInfo,
    activity: Rc<Activity>,
) {
    tracing::debug!(shard = info.shard, peer = %info.peer, id = info.id, "connection opened");
    // Both queues are bounded although their channel type is not: the frame queue by the byte
    // budget (every frame costs at least its 4-byte prefix), the reply queue by the request budget.
    let (queue_tx, queue_rx) = flume::unbounded::<Bytes>();
    let (order_tx, order_rx) = flume::unbounded::<Admitted>();
    let budget = Budget {
        held: Held {
            queued: &server.queued,
            bytes: std::cell::Cell::new(0),
        },
        activity,
        inflight_requests: std::cell::Cell::new(0),
        bytes_released: flume::bounded(1),
        request_released: flume::bounded(1),
    };
    let reader = read_frames(server, &stream, &info, queue_tx, &budget);
    let answering = async {
        let admitter = admit_frames(server, &info, queue_rx, order_tx, &budget);
        let writer = write_replies(server, &stream, &info, order_rx, &budget);
        match select(pin!(admitter), pin!(writer)).await {
            // Every frame is admitted (the admitter dropped the reply queue's sender): answer them.
            Either::Left(((), writer)) => writer.await,
            // The writer closed the connection (a Close reply or a write error).
            Either::Right(((), _)) => {}
        }
    };
    match select(pin!(reader), pin!(answering)).await {
        // The reader is done: finish answering what it queued (it dropped the queue's sender).
        Either::Left((ReaderEnd::Finish, answering)) => answering.await,
        // Dropping the rest abandons queued requests: the connection is being torn down.
        Either::Left((ReaderEnd::Abort, _)) => {}
        Either::Right(((), _)) => {}
    }
    problems::connection_closed(info.id);
    tracing::debug!(shard = info.shard, peer = %info.peer, id = info.id, "connection closed");
}

/// Admits queued frames in request order. Each admission is awaited before the next one starts:
/// this, not the order in which the runtime polls tasks, is what makes two requests of one
/// connection take effect in request order (two produce requests to one partition are appended in
/// request order, which idempotent producers with several requests in flight depend on).
async fn admit_frames<H: Handler>(
    server: &ShardServer<H>,
    info: &ConnectionInfo,
    queue: flume::Receiver<Bytes>,
    order: flume::Sender<Admitted>,
    budget: &Budget<'_>,
) {
    let max_requests = server.ctx.config().connection_max_inflight_requests;
    while let Ok(frame) = queue.recv_async().await {
        while budget.inflight_requests.get() >= max_requests {
            // The writer frees a slot after each reply; it is gone only when the connection is.
            if budget.request_released.1.recv_async().await.is_err() {
                return;
            }
        }
        let frame_bytes = 4 + frame.len() as u64;
        let (reply, last) = match server.handler.admit(info, frame).await {
            Admission::Done(reply) => {
                // Nothing after a request that closes the connection is admitted.
                let last = matches!(reply, Reply::Close | Reply::SendThenClose(_));
                (Pending::Ready(reply), last)
            }
            Admission::Later(work) => (Pending::Running(compio::runtime::spawn(work)), false),
        };
        budget
            .inflight_requests
            .set(budget.inflight_requests.get() + 1);
        if order.send(Admitted { frame_bytes, reply }).is_err() || last {
            return;
        }
    }
}

/// Answers admitted requests in request order, each once its reply is ready.
async fn write_replies<H: Handler>(
    server: &ShardServer<H>,
    stream: &TcpStream,
    info: &ConnectionInfo,
    order: flume::Receiver<Admitted>,
    budget: &Budget<'_>,
) {
    while let Ok(admitted) = order.recv_async().await {
        let reply = match admitted.reply {
            Pending::Ready(reply) => reply,
            Pending::Running(work) => match work.await {
                Ok(reply) => reply,
                Err(error) => {
                    tracing::error!(shard = info.shard, peer = %info.peer, %error,
                        "request handler failed; closing the connection");
                    return;
                }
            },
        };
        let (parts, close_after) = match reply {
            Reply::None => (Vec::new(), false),
            Reply::Send(parts) => (parts, false),
            Reply::SendThenClose(parts) => (parts, true),
            Reply::Close => return,
        };
        if let Err(error) = write_parts(server, stream, parts).await {
            tracing::debug!(shard = info.shard, peer = %info.peer, %error, "write failed; closing");
            return;
        }
        if close_after {
            return;
        }
        let activity = &budget.activity;
        activity.last_active_at.set(Instant::now());
        activity
            .inflight_bytes
            .set(activity.inflight_bytes.get() - admitted.frame_bytes);
        budget.held.release(admitted.frame_bytes);
        budget
            .inflight_requests
            .set(budget.inflight_requests.get() - 1);
        let _ = budget.bytes_released.0.try_send(());
        let _ = budget.request_released.0.try_send(());
    }
}

async fn read_frames<H: Handler>(
    server: &ShardServer<H>,
    stream: &TcpStream,
    info: &ConnectionInfo,
    queue: flume::Sender<Bytes>,
    budget: &Budget<'_>,
) -> ReaderEnd {
    let config = server.ctx.config();
    let max_frame_bytes = u64::from(config.socket_request_max_bytes);
    let max_inflight_bytes = config.connection_max_inflight_bytes;
    let activity = &budget.activity;
    let inflight_bytes = &activity.inflight_bytes;
    let evict = &activity.evict.1;
    let released = &budget.bytes_released.1;
    let idle_timeout = Duration::from_millis(config.connections_max_idle_ms);
    let frame_timeout = Duration::from_millis(config.connection_frame_timeout_ms);
    // When the last complete request was cut off the stream, and when the first bytes of the
    // frame being read now arrived (`None` between frames).
    let mut last_request_at = Instant::now();
    let mut frame_started_at: Option<Instant> = None;
    let mut buffer = BytesMut::with_capacity(READ_CHUNK_BYTES);
    let mut reader = stream;
    loop {
        // Cut every complete frame out of what has been read.
        while buffer.len() >= 4 {
            let size = i32::from_be_bytes([buffer[0], buffer[1], buffer[2], buffer[3]]);
            if size < 0 || size as u64 > max_frame_bytes {
                if problems::permit(Some(info.id)) {
                    tracing::warn!(
                    shard = info.shard,
                    peer = %info.peer,
                    size,
                    limit = max_frame_bytes,
                    "closing connection: request frame larger than socket.request.max.bytes"
                    );
                }
                return ReaderEnd::Abort;
            }
            let frame_bytes = 4 + size as usize;
            if buffer.len() < frame_bytes {
                // Make room for the rest of the frame, but commit memory only as bytes arrive:
                // a peer announcing a 100 MiB frame and sending nothing costs one step.
                buffer.reserve((frame_bytes - buffer.len()).min(MAX_RESERVE_STEP_BYTES));
                break;
            }
            // Wait for answers before queueing more; a single frame larger than the budget is
            // still let through when nothing else is in flight, or it could never be served.
            while inflight_bytes.get() > 0
                && inflight_bytes.get() + frame_bytes as u64 > max_inflight_bytes
            {
                match unless_stopped(&server.stop, released.recv_async()).await {
                    Some(Ok(())) => {}
                    // The budget owns both ends of its channel, so this cannot happen.
                    Some(Err(_)) => return ReaderEnd::Abort,
                    None => return ReaderEnd::Finish,
                }
            }
            let frame = buffer.split_to(frame_bytes).freeze().slice(4..);
            inflight_bytes.set(inflight_bytes.get() + frame_bytes as u64);
            last_request_at = Instant::now();
            frame_started_at = None;
            if queue.send(frame).is_err() {
                // The admitter stopped after a request that closes the connection: let the
                // writer answer up to that request, then close.
                return ReaderEnd::Finish;
            }
        }
        if buffer.capacity() - buffer.len() < READ_CHUNK_BYTES / 4 {
            buffer.reserve(READ_CHUNK_BYTES);
        }
        if !buffer.is_empty() && frame_started_at.is_none() {
            frame_started_at = Some(Instant::now());
        }
        activity.reading_frame.set(!buffer.is_empty());
        // Read only what the shard's `queued.max.request.bytes` budget grants; while it is spent,
        // wait (still under the deadlines below) for replies or closes to give bytes back.
        let queued = budget.held.queued;
        let start = buffer.len();
        let spare = (buffer.capacity() - start) as u64;
        let mut read = pin!(async move {
            let mut grant = Grant {
                queued,
                bytes: queued.take(spare),
            };
            while grant.bytes == 0 {
                let given_back = queued.on_give_back();
                grant.bytes = queued.take(spare);
                if grant.bytes == 0 {
                    let _ = given_back.recv_async().await;
                }
            }
            let end = start + grant.bytes as usize;
            let BufResult(result, slice) = reader
                .read(compio::buf::IoBuf::slice(buffer, start..end))
                .await;
            (BufResult(result, slice.into_inner()), grant)
        });
        // Two deadlines, both from the configuration: a frame whose first bytes arrived must
        // complete within `ringbroker.connection.frame.timeout.ms` (a peer trickling a huge frame
        // holds its buffer no longer), and a connection with no request for
        // `connections.max.idle.ms` and nothing in flight is closed (Kafka's idle rule), so
        // forgotten connections do not hold their slot forever.
        let (BufResult(result, returned), mut grant) = loop {
            let deadline = match frame_started_at {
                Some(started) => started + frame_timeout,
                None => last_request_at + idle_timeout,
            };
            let wait = deadline.saturating_duration_since(Instant::now());
            let sleep = pin!(compio::time::sleep(wait));
            let evicted = pin!(evict.recv_async());
            match unless_stopped(&server.stop, select(read.as_mut(), select(sleep, evicted))).await
            {
                None => return ReaderEnd::Finish,
                Some(Either::Left((read, _))) => break read,
                Some(Either::Right((Either::Left(((), _)), _))) => {}
                Some(Either::Right((Either::Right(_), _))) => {
                    // The shard needs this idle connection's place for a new one.
                    if problems::permit(Some(info.id)) {
                        tracing::info!(
                            shard = info.shard,
                            peer = %info.peer,
                            "closing the connection idle longest to make room for a new one"
                        );
                    }
                    return ReaderEnd::Finish;
                }
            }
            if let Some(started) = frame_started_at {
                if problems::permit(Some(info.id)) {
                    tracing::warn!(
                    shard = info.shard,
                    peer = %info.peer,
                    waited_ms = started.elapsed().as_millis() as u64,
                    limit_ms = frame_timeout.as_millis() as u64,
                    "closing connection: request frame not complete within ringbroker.connection.frame.timeout.ms"
                    );
                }
                return ReaderEnd::Abort;
            }
            if inflight_bytes.get() > 0 {
                // Requests are still being answered: the connection is busy, not idle.
                last_request_at = Instant::now();
                continue;
            }
            if problems::permit(Some(info.id)) {
                tracing::debug!(
                    shard = info.shard,
                    peer = %info.peer,
                    limit_ms = idle_timeout.as_millis() as u64,
                    "closing connection idle for connections.max.idle.ms"
                );
            }
            return ReaderEnd::Finish;
        };
        buffer = returned;
        if let Ok(read_bytes) = &result {
            grant.keep(*read_bytes as u64, &budget.held);
        }
        drop(grant);
        match result {
            Ok(0) => {
                if !buffer.is_empty() {
                    tracing::debug!(
                        shard = info.shard,
                        peer = %info.peer,
                        bytes = buffer.len(),
                        "peer closed in the middle of a frame"
                    );
                }
                return ReaderEnd::Finish;
            }
            Ok(_) => activity.last_active_at.set(Instant::now()),
            Err(error) => {
                tracing::debug!(shard = info.shard, peer = %info.peer, %error, "read failed");
                return ReaderEnd::Abort;
            }
        }
    }
}

/// Writes a reply's parts in order. Byte parts, and file ranges too short to be worth a splice
/// (read into memory), are gathered and sent with one writev per run; longer file ranges go by
/// splice (or the chunked copy path when every pipe is busy). On error an unknown prefix was
/// written, so the connection must be closed.
async fn write_parts<H: Handler>(
    server: &ShardServer<H>,
    stream: &TcpStream,
    parts: Vec<OutPart>,
) -> std::io::Result<()> {
    let mut writer = stream;
    let mut pending: Vec<Bytes> = Vec::new();
    let mut pending_bytes = 0usize;
    for part in parts {
        let bytes = match part {
            OutPart::Bytes(bytes) => bytes,
            OutPart::File(slice) if slice.len == 0 => continue,
            OutPart::File(slice) if server.files.prefers_copy(u64::from(slice.len)) => {
                server.files.read(slice.fd, slice.offset, slice.len).await?
            }
            OutPart::File(slice) => {
                if !pending.is_empty() {
                    write_all_vectored(&mut writer, std::mem::take(&mut pending)).await?;
                    pending_bytes = 0;
                }
                server
                    .files
                    .send(stream, slice.fd, slice.offset, u64::from(slice.len))
                    .await?;
                continue;
            }
        };
        if bytes.is_empty() {
            continue;
        }
        pending_bytes += bytes.len();
        pending.push(bytes);
        if pending.len() == MAX_IOVECS_PER_WRITE || pending_bytes >= MAX_GATHER_BYTES {
            write_all_vectored(&mut writer, std::mem::take(&mut pending)).await?;
            pending_bytes = 0;
        }
    }
    if !pending.is_empty() {
        write_all_vectored(&mut writer, pending).await?;
    }
    Ok(())
}

/// writev until every byte is out (short writes are continued, never reordered).
async fn write_all_vectored(writer: &mut &TcpStream, mut parts: Vec<Bytes>) -> std::io::Result<()> {
    if parts.len() == 1 {
        let BufResult(result, _) = writer.write_all(parts.pop().expect("one part")).await;
        return result;
    }
    let BufResult(result, _) = writer.write_vectored_all(parts).await;
    result
}
