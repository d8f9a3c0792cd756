//! connection: one client connection. A reader cuts frames off the socket and queues them; a
//! processor takes them one at a time, awaits the handler and writes the reply, so replies leave
//! in request order while the reader keeps reading ahead (pipelined produce requests are not held
//! up by the read syscall). Read-ahead is bounded by `ringbroker.connection.max.inflight.bytes`:
//! bytes read but not yet answered.

use std::cell::Cell;
use std::pin::pin;

use bytes::{Bytes, BytesMut};
use compio::BufResult;
use compio::io::{AsyncReadExt, AsyncWriteExt};
use compio::net::TcpStream;
use futures_util::future::{Either, select};

use super::{ConnectionInfo, Handler, OutPart, Reply, ShardServer, unless_stopped};

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

/// Serves one connection until it closes.
pub(super) async fn run<H: Handler>(
    server: &ShardServer<H>,
    stream: TcpStream,
    info: ConnectionInfo,
) {
    tracing::debug!(shard = info.shard, peer = %info.peer, id = info.id, "connection opened");
    // The frame queue's length is bounded by the in-flight byte budget (every frame costs at
    // least its 4-byte prefix), so an unbounded channel type is still a bounded queue.
    let (queue_tx, queue_rx) = flume::unbounded::<Bytes>();
    let (released_tx, released_rx) = flume::bounded::<()>(1);
    let inflight_bytes = Cell::new(0u64);
    let reader = read_frames(
        server,
        &stream,
        &info,
        queue_tx,
        &inflight_bytes,
        released_rx,
    );
    let processor = process_frames(
        server,
        &stream,
        &info,
        queue_rx,
        &inflight_bytes,
        released_tx,
    );
    match select(pin!(reader), pin!(processor)).await {
        // The reader is done: finish answering what it queued (it dropped the queue's sender).
        Either::Left((ReaderEnd::Finish, processor)) => processor.await,
        // Dropping the processor abandons queued requests: the connection is being torn down.
        Either::Left((ReaderEnd::Abort, _)) => {}
        // The processor closed the connection (a Close reply or a write error).
        Either::Right(((), _)) => {}
    }
    tracing::debug!(shard = info.shard, peer = %info.peer, id = info.id, "connection closed");
}

async fn read_frames<H: Handler>(
    server: &ShardServer<H>,
    stream: &TcpStream,
    info: &ConnectionInfo,
    queue: flume::Sender<Bytes>,
    inflight_bytes: &Cell<u64>,
    released: flume::Receiver<()>,
) -> ReaderEnd {
    let config = server.ctx.config();
    let max_frame_bytes = u64::from(config.socket_request_max_bytes);
    let max_inflight_bytes = config.connection_max_inflight_bytes;
    let mut buffer = BytesMut::with_capacity(READ_CHUNK_BYTES);
    let mut reader = stream;
    loop {
        // Cut every complete frame out of what has been read.
        while buffer.len() >= 4 {
            let size = i32::from_be_bytes([buffer[0], buffer[1], buffer[2], buffer[3]]);
            if size < 0 || size as u64 > max_frame_bytes {
                tracing::warn!(
                    shard = info.shard,
                    peer = %info.peer,
                    size,
                    limit = max_frame_bytes,
                    "closing connection: request frame larger than socket.request.max.bytes"
                );
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
                    // The processor is gone (it closed the connection).
                    Some(Err(_)) => return ReaderEnd::Abort,
                    None => return ReaderEnd::Finish,
                }
            }
            let frame = buffer.split_to(frame_bytes).freeze().slice(4..);
            inflight_bytes.set(inflight_bytes.get() + frame_bytes as u64);
            if queue.send(frame).is_err() {
                return ReaderEnd::Abort;
            }
        }
        if buffer.capacity() - buffer.len() < READ_CHUNK_BYTES / 4 {
            buffer.reserve(READ_CHUNK_BYTES);
        }
        let BufResult(result, returned) =
            match unless_stopped(&server.stop, reader.append(buffer)).await {
                Some(read) => read,
                None => return ReaderEnd::Finish,
            };
        buffer = returned;
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
            Ok(_) => {}
            Err(error) => {
                tracing::debug!(shard = info.shard, peer = %info.peer, %error, "read failed");
                return ReaderEnd::Abort;
            }
        }
    }
}

async fn process_frames<H: Handler>(
    server: &ShardServer<H>,
    stream: &TcpStream,
    info: &ConnectionInfo,
    queue: flume::Receiver<Bytes>,
    inflight_bytes: &Cell<u64>,
    released: flume::Sender<()>,
) {
    while let Ok(frame) = queue.recv_async().await {
        let frame_bytes = 4 + frame.len() as u64;
        let reply = server.handler.handle(info, frame).await;
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
        inflight_bytes.set(inflight_bytes.get() - frame_bytes);
        // A token tells a reader waiting on the budget to look again; one pending is enough.
        let _ = released.try_send(());
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
