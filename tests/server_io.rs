//! Integration tests of the shard runtime, the server and the node over real loopback TCP, with a
//! test handler that speaks a tiny command protocol (first byte of each frame):
//! `E` echo, `S` sleep then echo, `L` admit at once then sleep and echo beside later requests,
//! `W` sleep during admission then record the payload in the admission log and echo later,
//! `G` return the admission log, `F` send a file range, `P` report splice/copy counters,
//! `R` run a closure on another shard, `C` close, `Q` reply then close, `N` no reply.

use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::rc::Rc;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use bytes::{BufMut, Bytes, BytesMut};
use ringbroker::config::{Config, Endpoint};
use ringbroker::node::Node;
use ringbroker::server::{
    Admission, ConnectionInfo, FileSlice, Handler, HandlerFactory, OutPart, Reply, shard_send_stats,
};
use ringbroker::shard::{ShardContext, ShardError};

const IO_TIMEOUT: Duration = Duration::from_secs(20);

struct TestFactory {
    file: PathBuf,
    shutdowns: Arc<AtomicUsize>,
    /// A shard whose handler cannot be built (to test startup failure).
    fail_shard: Option<usize>,
    /// A shard whose handler takes this long to build, and the flag it sets once built (to test
    /// that no shard serves before every shard is ready).
    slow_shard: Option<(usize, Duration, Arc<std::sync::atomic::AtomicBool>)>,
}

struct TestHandler {
    ctx: ShardContext,
    file: Rc<std::fs::File>,
    shutdowns: Arc<AtomicUsize>,
    /// Payloads of `W` requests in the order their admissions finished.
    admitted: std::cell::RefCell<Vec<u8>>,
}

thread_local! {
    /// Set on each shard thread when its handler is built, read back through run_on.
    static THIS_SHARD: std::cell::Cell<Option<usize>> = const { std::cell::Cell::new(None) };
}

impl HandlerFactory for TestFactory {
    type Handler = TestHandler;

    async fn create(&self, ctx: ShardContext) -> anyhow::Result<TestHandler> {
        THIS_SHARD.with(|cell| cell.set(Some(ctx.shard_id())));
        if self.fail_shard == Some(ctx.shard_id()) {
            anyhow::bail!("storage recovery failed (test)");
        }
        if let Some((shard, delay, built)) = &self.slow_shard
            && *shard == ctx.shard_id()
        {
            compio::time::sleep(*delay).await;
            built.store(true, Ordering::SeqCst);
        }
        Ok(TestHandler {
            ctx,
            file: Rc::new(std::fs::File::open(&self.file)?),
            shutdowns: self.shutdowns.clone(),
            admitted: std::cell::RefCell::new(Vec::new()),
        })
    }
}

fn framed(body: &[u8]) -> Bytes {
    let mut out = BytesMut::with_capacity(4 + body.len());
    out.put_u32(body.len() as u32);
    out.put_slice(body);
    out.freeze()
}

impl Handler for TestHandler {
    async fn admit(&self, _conn: &ConnectionInfo, request: Bytes) -> Admission {
        match request.first() {
            Some(b'L') => {
                let millis = u32::from_be_bytes(request[1..5].try_into().unwrap());
                Admission::Later(Box::pin(async move {
                    compio::time::sleep(Duration::from_millis(u64::from(millis))).await;
                    Reply::Send(vec![OutPart::Bytes(framed(&request[5..]))])
                }))
            }
            Some(b'W') => {
                let millis = u32::from_be_bytes(request[1..5].try_into().unwrap());
                compio::time::sleep(Duration::from_millis(u64::from(millis))).await;
                self.admitted.borrow_mut().extend_from_slice(&request[5..]);
                Admission::Later(Box::pin(async move {
                    compio::time::sleep(Duration::from_millis(u64::from(50 - millis))).await;
                    Reply::Send(vec![OutPart::Bytes(framed(&request[5..]))])
                }))
            }
            Some(b'G') => Admission::Done(Reply::Send(vec![OutPart::Bytes(framed(
                &self.admitted.borrow(),
            ))])),
            _ => Admission::Done(self.handle(request).await),
        }
    }

    async fn shutdown(&self) {
        self.shutdowns.fetch_add(1, Ordering::SeqCst);
    }
}

impl TestHandler {
    async fn handle(&self, request: Bytes) -> Reply {
        let Some((&command, rest)) = request.split_first() else {
            return Reply::Close;
        };
        match command {
            b'E' => Reply::Send(vec![OutPart::Bytes(framed(rest))]),
            b'S' => {
                let millis = u32::from_be_bytes(rest[..4].try_into().unwrap());
                compio::time::sleep(Duration::from_millis(u64::from(millis))).await;
                Reply::Send(vec![OutPart::Bytes(framed(&rest[4..]))])
            }
            b'F' => {
                let offset = u64::from_be_bytes(rest[..8].try_into().unwrap());
                let len = u32::from_be_bytes(rest[8..12].try_into().unwrap());
                // Size prefix, a header part, the file bytes, a trailer part.
                let mut head = BytesMut::new();
                head.put_u32(len + 8);
                head.put_slice(b"HEAD");
                let fd: Rc<dyn AsRawFd> = self.file.clone();
                Reply::Send(vec![
                    OutPart::Bytes(head.freeze()),
                    OutPart::File(FileSlice { fd, offset, len }),
                    OutPart::Bytes(Bytes::from_static(b"TAIL")),
                ])
            }
            b'P' => {
                let (stats, live_pipes) = shard_send_stats().expect("called on a serving shard");
                let mut body = BytesMut::new();
                for value in [
                    stats.splice_sends,
                    stats.copy_sends,
                    stats.pool_exhausted,
                    stats.pipes_discarded,
                    live_pipes as u64,
                ] {
                    body.put_u64(value);
                }
                Reply::Send(vec![OutPart::Bytes(framed(&body))])
            }
            b'R' => {
                let target = usize::from(rest[0]);
                let result = self
                    .ctx
                    .run_on(target, || async {
                        let thread = std::thread::current().name().unwrap_or("").to_string();
                        (THIS_SHARD.with(|cell| cell.get()), thread)
                    })
                    .await;
                let text = match result {
                    Ok((shard, thread)) => {
                        format!("ok {} {thread}", shard.map_or(-1, |s| s as i64))
                    }
                    Err(ShardError::NoSuchShard { .. }) => "no such shard".to_string(),
                    Err(ShardError::ShardGone { .. }) => "gone".to_string(),
                };
                Reply::Send(vec![OutPart::Bytes(framed(text.as_bytes()))])
            }
            b'C' => Reply::Close,
            b'Q' => Reply::SendThenClose(vec![OutPart::Bytes(framed(b"bye"))]),
            b'N' => Reply::None,
            _ => Reply::Close,
        }
    }
}

struct TestNode {
    node: Option<Node>,
    shutdowns: Arc<AtomicUsize>,
    file_bytes: Vec<u8>,
    _dir: tempfile::TempDir,
}

impl TestNode {
    fn addr(&self, shard: usize) -> SocketAddr {
        self.node.as_ref().unwrap().listen_addrs()[shard]
    }

    fn connect(&self, shard: usize) -> TcpStream {
        let stream = TcpStream::connect(self.addr(shard)).expect("connect");
        stream.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
        stream.set_write_timeout(Some(IO_TIMEOUT)).unwrap();
        stream
    }

    fn shutdown(mut self) -> anyhow::Result<()> {
        self.node.take().unwrap().shutdown()
    }
}

fn test_config(dir: &std::path::Path, tune: impl FnOnce(&mut Config)) -> Config {
    let mut config = Config::defaults();
    config.listener = Endpoint {
        host: "127.0.0.1".into(),
        port: 0,
    };
    config.advertised_listener = config.listener.clone();
    config.log_dir = dir.join("data");
    config.shard_count = 2;
    config.shutdown_timeout_ms = 5_000;
    tune(&mut config);
    config
}

/// Starts a node with a file of `file_len` pseudo-random bytes for the `F` command.
fn start(file_len: usize, tune: impl FnOnce(&mut Config)) -> TestNode {
    let dir = tempfile::tempdir().unwrap();
    let file_bytes = pseudo_random(file_len, 0x5eed);
    let file = dir.path().join("segment.log");
    std::fs::write(&file, &file_bytes).unwrap();
    let shutdowns = Arc::new(AtomicUsize::new(0));
    let config = test_config(dir.path(), tune);
    let node = Node::start(
        config,
        TestFactory {
            file,
            shutdowns: shutdowns.clone(),
            fail_shard: None,
            slow_shard: None,
        },
    )
    .expect("node starts");
    TestNode {
        node: Some(node),
        shutdowns,
        file_bytes,
        _dir: dir,
    }
}

fn pseudo_random(len: usize, seed: u64) -> Vec<u8> {
    let mut state = seed;
    (0..len)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state as u8
        })
        .collect()
}

fn send(stream: &mut TcpStream, body: &[u8]) {
    stream.write_all(&framed(body)).unwrap();
}

fn receive(stream: &mut TcpStream) -> Vec<u8> {
    let mut size = [0u8; 4];
    stream.read_exact(&mut size).expect("reply size");
    let mut body = vec![0u8; u32::from_be_bytes(size) as usize];
    stream.read_exact(&mut body).expect("reply body");
    body
}

/// True once the server has closed the connection (EOF or reset), within the IO timeout.
fn closed_by_server(stream: &mut TcpStream) -> bool {
    let mut byte = [0u8; 1];
    // A signal may interrupt the blocking read; retry a bounded number of times, as clients do.
    for _ in 0..100 {
        match stream.read(&mut byte) {
            Ok(0) => return true,
            Ok(_) => return false,
            Err(error) if error.kind() == ErrorKind::Interrupted => continue,
            Err(error) => {
                return matches!(
                    error.kind(),
                    ErrorKind::ConnectionReset
                        | ErrorKind::ConnectionAborted
                        | ErrorKind::BrokenPipe
                );
            }
        }
    }
    false
}

fn slow(millis: u32, payload: &[u8]) -> Vec<u8> {
    let mut body = vec![b'S'];
    body.extend_from_slice(&millis.to_be_bytes());
    body.extend_from_slice(payload);
    body
}

/// A request admitted at once whose reply comes `millis` later, beside later requests.
fn later(command: u8, millis: u32, payload: &[u8]) -> Vec<u8> {
    let mut body = vec![command];
    body.extend_from_slice(&millis.to_be_bytes());
    body.extend_from_slice(payload);
    body
}

fn file_request(offset: u64, len: u32) -> Vec<u8> {
    let mut body = vec![b'F'];
    body.extend_from_slice(&offset.to_be_bytes());
    body.extend_from_slice(&len.to_be_bytes());
    body
}

fn check_file_reply(file_bytes: &[u8], stream: &mut TcpStream, offset: u64, len: u32) {
    let body = receive(stream);
    assert_eq!(body.len(), len as usize + 8, "range {offset}+{len}");
    assert_eq!(&body[..4], b"HEAD");
    assert_eq!(&body[body.len() - 4..], b"TAIL");
    let expected = &file_bytes[offset as usize..offset as usize + len as usize];
    assert!(
        body[4..body.len() - 4] == *expected,
        "file bytes differ for range {offset}+{len}"
    );
}

/// Splice sends, copy sends, pool exhausted, pipes discarded, live pipes, on `shard`.
fn stats(node: &TestNode, shard: usize) -> [u64; 5] {
    let mut stream = node.connect(shard);
    send(&mut stream, b"P");
    let body = receive(&mut stream);
    let mut out = [0u64; 5];
    for (i, value) in out.iter_mut().enumerate() {
        *value = u64::from_be_bytes(body[i * 8..i * 8 + 8].try_into().unwrap());
    }
    out
}

#[test]
fn echo_on_every_shard() {
    let node = start(0, |_| {});
    for shard in 0..2 {
        let mut stream = node.connect(shard);
        send(&mut stream, b"Ehello");
        assert_eq!(receive(&mut stream), b"hello");
        // An empty frame reaches the handler too (which closes on it).
        send(&mut stream, b"");
        assert!(closed_by_server(&mut stream));
    }
    node.shutdown().unwrap();
}

#[test]
fn pipelined_replies_keep_request_order() {
    let node = start(0, |_| {});
    let mut stream = node.connect(0);
    // A slow request first, then fast ones and no-reply ones, all written before reading.
    let mut batch = Vec::new();
    batch.extend_from_slice(&framed(&slow(300, b"slow")));
    for i in 0..50u32 {
        if i % 5 == 0 {
            batch.extend_from_slice(&framed(b"N"));
        }
        batch.extend_from_slice(&framed(format!("Efast{i}").as_bytes()));
    }
    stream.write_all(&batch).unwrap();
    assert_eq!(receive(&mut stream), b"slow");
    for i in 0..50u32 {
        assert_eq!(receive(&mut stream), format!("fast{i}").as_bytes());
    }
    node.shutdown().unwrap();
}

#[test]
fn admitted_requests_run_beside_each_other_and_answer_in_order() {
    let node = start(0, |_| {});
    let mut stream = node.connect(0);
    // Eight requests that each take 300 ms after admission, the longest first, then an echo:
    // run one at a time they would take 2.4 s; pipelined, about 300 ms.
    let started = std::time::Instant::now();
    let mut batch = Vec::new();
    for i in 0..8u32 {
        batch.extend_from_slice(&framed(&later(
            b'L',
            300 - i * 10,
            format!("p{i}").as_bytes(),
        )));
    }
    batch.extend_from_slice(&framed(b"Eafter"));
    stream.write_all(&batch).unwrap();
    for i in 0..8u32 {
        assert_eq!(receive(&mut stream), format!("p{i}").as_bytes());
    }
    assert_eq!(receive(&mut stream), b"after");
    let elapsed = started.elapsed();
    assert!(
        elapsed < Duration::from_millis(1_500),
        "pipelined requests took {elapsed:?}, as if served one at a time"
    );
    node.shutdown().unwrap();
}

#[test]
fn admissions_happen_in_request_order() {
    let node = start(0, |_| {});
    let mut stream = node.connect(0);
    // Admission times that decrease along the requests: admissions run concurrently would record
    // the later (faster) ones first.
    let mut batch = Vec::new();
    for i in 0..10u8 {
        batch.extend_from_slice(&framed(&later(b'W', u32::from(40 - i * 4), &[b'a' + i])));
    }
    batch.extend_from_slice(&framed(b"G"));
    stream.write_all(&batch).unwrap();
    for i in 0..10u8 {
        assert_eq!(receive(&mut stream), [b'a' + i]);
    }
    assert_eq!(receive(&mut stream), b"abcdefghij");
    node.shutdown().unwrap();
}

#[test]
fn inflight_request_limit_holds_admission_back() {
    // With two requests in flight at most, six 200 ms requests need three rounds.
    let node = start(0, |config| config.connection_max_inflight_requests = 2);
    let mut stream = node.connect(0);
    let started = std::time::Instant::now();
    let mut batch = Vec::new();
    for i in 0..6u8 {
        batch.extend_from_slice(&framed(&later(b'L', 200, &[i])));
    }
    stream.write_all(&batch).unwrap();
    for i in 0..6u8 {
        assert_eq!(receive(&mut stream), [i]);
    }
    assert!(started.elapsed() >= Duration::from_millis(600));
    node.shutdown().unwrap();
}

#[test]
fn small_inflight_budget_still_serves_everything_in_order() {
    // A budget below two frames forces the reader to wait for each answer; a frame larger than
    // the whole budget must still be served when nothing else is in flight.
    let node = start(0, |config| config.connection_max_inflight_bytes = 1_000);
    let mut stream = node.connect(1);
    let big = vec![b'x'; 5_000];
    let mut batch = Vec::new();
    for i in 0..20u32 {
        let mut payload = format!("{i:04}").into_bytes();
        payload.extend_from_slice(&[b'p'; 600]);
        batch.extend_from_slice(&framed(&slow(5, &payload)));
    }
    let mut big_request = vec![b'E'];
    big_request.extend_from_slice(&big);
    batch.extend_from_slice(&framed(&big_request));
    stream.write_all(&batch).unwrap();
    for i in 0..20u32 {
        let body = receive(&mut stream);
        assert_eq!(&body[..4], format!("{i:04}").as_bytes());
        assert_eq!(body.len(), 604);
    }
    assert_eq!(receive(&mut stream), big);
    node.shutdown().unwrap();
}

#[test]
fn oversized_frame_closes_only_that_connection() {
    let node = start(0, |config| config.socket_request_max_bytes = 1024);
    let mut good = node.connect(0);
    let mut bad = node.connect(0);
    send(&mut good, b"Ebefore");
    assert_eq!(receive(&mut good), b"before");
    bad.write_all(&2048u32.to_be_bytes()).unwrap();
    assert!(closed_by_server(&mut bad));
    let mut negative = node.connect(0);
    negative.write_all(&(-5i32).to_be_bytes()).unwrap();
    assert!(closed_by_server(&mut negative));
    // A frame of exactly the limit is fine.
    let mut body = vec![b'E'];
    body.resize(1024, b'z');
    send(&mut good, &body);
    assert_eq!(receive(&mut good), &body[1..]);
    node.shutdown().unwrap();
}

#[test]
fn close_replies() {
    let node = start(0, |_| {});
    let mut stream = node.connect(0);
    send(&mut stream, b"Q");
    assert_eq!(receive(&mut stream), b"bye");
    assert!(closed_by_server(&mut stream));
    let mut stream = node.connect(1);
    send(&mut stream, b"C");
    assert!(closed_by_server(&mut stream));
    node.shutdown().unwrap();
}

const FILE_LEN: usize = 6 * 1024 * 1024 + 12_345;

fn ranges() -> Vec<(u64, u32)> {
    vec![
        (0, 1),
        (0, 4096),
        (1, 65_536),
        (4095, 100_000),
        (12_345, 1 << 20),
        ((1 << 20) - 1, (1 << 20) + 2),
        (7, 3 * (1 << 20) + 17),
        (0, FILE_LEN as u32),
        (FILE_LEN as u64 - 10, 10),
        (100, 0),
    ]
}

#[test]
fn splice_path_sends_exact_file_bytes() {
    let node = start(FILE_LEN, |config| {
        config.fetch_splice_min_bytes = 0;
        config.pipe_size_bytes = 1 << 20;
    });
    let mut stream = node.connect(0);
    for (offset, len) in ranges() {
        send(&mut stream, &file_request(offset, len));
        check_file_reply(&node.file_bytes, &mut stream, offset, len);
    }
    let [splices, copies, _, discarded, live_pipes] = stats(&node, 0);
    assert_eq!(
        splices,
        ranges().iter().filter(|(_, len)| *len > 0).count() as u64
    );
    assert_eq!(copies, 0);
    assert_eq!(discarded, 0);
    assert_eq!(live_pipes, 1, "one connection reuses one pipe");
    node.shutdown().unwrap();
}

#[test]
fn copy_path_sends_exact_file_bytes() {
    let node = start(FILE_LEN, |config| config.fetch_splice_min_bytes = u32::MAX);
    let mut stream = node.connect(1);
    for (offset, len) in ranges() {
        send(&mut stream, &file_request(offset, len));
        check_file_reply(&node.file_bytes, &mut stream, offset, len);
    }
    let [splices, copies, _, _, live_pipes] = stats(&node, 1);
    assert_eq!(splices, 0);
    assert_eq!(
        copies,
        ranges().iter().filter(|(_, len)| *len > 0).count() as u64
    );
    assert_eq!(live_pipes, 0);
    node.shutdown().unwrap();
}

#[test]
fn many_connections_share_a_bounded_pipe_pool() {
    let node = start(FILE_LEN, |config| {
        config.fetch_splice_min_bytes = 0;
        config.pipe_pool_size = 2;
        config.shard_count = 1;
    });
    let file_bytes = Arc::new(node.file_bytes.clone());
    let addr = node.addr(0);
    let threads: Vec<_> = (0..12u64)
        .map(|client| {
            let file_bytes = file_bytes.clone();
            std::thread::spawn(move || {
                let mut stream = TcpStream::connect(addr).unwrap();
                stream.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
                // Pipeline several ranges per connection, then check them in order.
                let requests: Vec<(u64, u32)> = (0..4u64)
                    .map(|i| {
                        (
                            (client * 131_071 + i * 524_287) % (FILE_LEN as u64 / 2),
                            1_500_000,
                        )
                    })
                    .collect();
                for (offset, len) in &requests {
                    send(&mut stream, &file_request(*offset, *len));
                }
                for (offset, len) in requests {
                    check_file_reply(&file_bytes, &mut stream, offset, len);
                }
            })
        })
        .collect();
    for thread in threads {
        thread.join().expect("client thread");
    }
    let [splices, copies, exhausted, discarded, live_pipes] = stats(&node, 0);
    assert!(live_pipes <= 2, "pool bounded: {live_pipes} pipes");
    assert_eq!(splices + copies, 48);
    assert_eq!(
        copies, exhausted,
        "copies happen only when the pool is busy"
    );
    assert_eq!(discarded, 0);
    node.shutdown().unwrap();
}

#[test]
fn range_past_end_of_file_closes_the_connection() {
    for splice_min in [0, u32::MAX] {
        let node = start(10_000, |config| config.fetch_splice_min_bytes = splice_min);
        let mut stream = node.connect(0);
        send(&mut stream, &file_request(5_000, 10_000));
        // The header went out before the file ran short; the connection must then close.
        let mut received = Vec::new();
        let _ = stream.read_to_end(&mut received);
        assert!(received.len() < 4 + 8 + 10_000);
        // The shard keeps serving others.
        let mut other = node.connect(0);
        send(&mut other, &file_request(0, 10_000));
        check_file_reply(&node.file_bytes, &mut other, 0, 10_000);
        node.shutdown().unwrap();
    }
}

#[test]
fn at_the_connection_limit_an_idle_connection_makes_room_or_the_new_one_is_refused() {
    let node = start(0, |config| config.max_connections_per_shard = 2);
    let mut first = node.connect(0);
    let mut second = node.connect(0);
    send(&mut first, b"E1");
    send(&mut second, b"E2");
    assert_eq!(receive(&mut first), b"1");
    assert_eq!(receive(&mut second), b"2");
    // Both are idle: a third connection takes the place of the one idle longest.
    let mut third = node.connect(0);
    send(&mut third, b"E3");
    assert_eq!(receive(&mut third), b"3");
    assert!(closed_by_server(&mut first));
    // A connection in the middle of a request is never closed to make room: a fourth is refused.
    second.write_all(&100i32.to_be_bytes()).unwrap();
    third.write_all(&100i32.to_be_bytes()).unwrap();
    std::thread::sleep(Duration::from_millis(100));
    let mut fourth = node.connect(0);
    assert!(closed_by_server(&mut fourth));
    // Another shard has its own limit.
    let mut elsewhere = node.connect(1);
    send(&mut elsewhere, b"E3");
    assert_eq!(receive(&mut elsewhere), b"3");
    node.shutdown().unwrap();
}

#[test]
fn run_on_reaches_the_other_shards_thread() {
    let node = start(0, |_| {});
    let mut stream = node.connect(0);
    send(&mut stream, b"R\x01");
    assert_eq!(receive(&mut stream), b"ok 1 shard-1");
    send(&mut stream, b"R\x00");
    assert_eq!(receive(&mut stream), b"ok 0 shard-0");
    send(&mut stream, b"R\x07");
    assert_eq!(receive(&mut stream), b"no such shard");
    let mut stream = node.connect(1);
    send(&mut stream, b"R\x00");
    assert_eq!(receive(&mut stream), b"ok 0 shard-0");
    node.shutdown().unwrap();
}

#[test]
fn shutdown_answers_requests_in_flight_and_calls_every_handler_once() {
    let node = start(0, |_| {});
    let mut stream = node.connect(1);
    send(&mut stream, &slow(400, b"finishing"));
    // Let the request reach the handler before stopping.
    std::thread::sleep(Duration::from_millis(100));
    let shutdowns = node.shutdowns.clone();
    let stopper = std::thread::spawn(move || node.shutdown());
    assert_eq!(receive(&mut stream), b"finishing");
    assert!(closed_by_server(&mut stream));
    stopper.join().unwrap().expect("clean shutdown");
    assert_eq!(shutdowns.load(Ordering::SeqCst), 2);
}

#[test]
fn a_second_node_cannot_use_the_same_log_dir() {
    let node = start(0, |_| {});
    let data_dir = node
        .node
        .as_ref()
        .map(|_| node._dir.path().to_path_buf())
        .unwrap();
    let config = test_config(&data_dir, |_| {});
    let error = Node::start(
        config,
        TestFactory {
            file: data_dir.join("segment.log"),
            shutdowns: Arc::new(AtomicUsize::new(0)),
            fail_shard: None,
            slow_shard: None,
        },
    )
    .err()
    .expect("second node refused");
    assert!(
        format!("{error:#}").contains("in use by another ringbroker"),
        "{error:#}"
    );
    node.shutdown().unwrap();
}

#[test]
fn a_handler_that_cannot_be_built_fails_startup_cleanly() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("segment.log");
    std::fs::write(&file, b"x").unwrap();
    let shutdowns = Arc::new(AtomicUsize::new(0));
    let error = Node::start(
        test_config(dir.path(), |_| {}),
        TestFactory {
            file: file.clone(),
            shutdowns: shutdowns.clone(),
            fail_shard: Some(1),
            slow_shard: None,
        },
    )
    .err()
    .expect("startup fails");
    let message = format!("{error:#}");
    assert!(
        message.contains("shard 1") && message.contains("storage recovery failed"),
        "{message}"
    );
    // The shard that did start was shut down (its handler too), and the lock was released.
    assert_eq!(shutdowns.load(Ordering::SeqCst), 1);
    let node = Node::start(
        test_config(dir.path(), |_| {}),
        TestFactory {
            file,
            shutdowns,
            fail_shard: None,
            slow_shard: None,
        },
    )
    .expect("the log directory is free again");
    node.shutdown().unwrap();
}

/// Regression: a client that connected while another shard was still building its handler was
/// served at once, and shard 0 then sent topic-creation work to a shard whose broker was not yet
/// installed, which panicked that shard ("no broker installed on this shard thread"). Listeners are
/// bound before the shards start, so a connection can arrive that early; it must wait until every
/// shard is ready.
#[test]
fn no_shard_serves_before_every_shard_is_ready() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("segment.log");
    std::fs::write(&file, b"x").unwrap();
    // A free port pair chosen now, so the client knows shard 0's address before startup ends.
    let port = loop {
        let probe = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = probe.local_addr().unwrap().port();
        drop(probe);
        if port < 65000 && std::net::TcpListener::bind(("127.0.0.1", port + 1)).is_ok() {
            break port;
        }
    };
    let built = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let config = test_config(dir.path(), |config| config.listener.port = port);
    let factory = TestFactory {
        file,
        shutdowns: Arc::new(AtomicUsize::new(0)),
        fail_shard: None,
        slow_shard: Some((1, Duration::from_millis(1500), built.clone())),
    };
    let starter = std::thread::spawn(move || Node::start(config, factory));
    // Connect to shard 0 as soon as its port is bound (bounded: 10 s).
    let address = SocketAddr::from(([127, 0, 0, 1], port));
    let mut stream = None;
    for _ in 0..1000 {
        if let Ok(connected) = TcpStream::connect_timeout(&address, Duration::from_millis(100)) {
            stream = Some(connected);
            break;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let mut stream = stream.expect("shard 0's port is bound during startup");
    assert!(
        !built.load(Ordering::SeqCst),
        "the test must connect while shard 1 is still building its handler"
    );
    stream.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
    stream.write_all(&framed(b"Eping")).unwrap();
    let mut reply = [0u8; 8];
    stream.read_exact(&mut reply).unwrap();
    assert_eq!(&reply[4..], b"ping");
    // The answer came only once shard 1 had been built.
    assert!(
        built.load(Ordering::SeqCst),
        "shard 0 answered before shard 1's handler was built"
    );
    let node = starter.join().unwrap().expect("node starts");
    node.shutdown().unwrap();
}
