//! Connection deadlines (issue 10), against the real broker binary: connections idle for
//! `connections.max.idle.ms` are closed, so idle clients cannot hold every connection slot, and a
//! frame whose first bytes arrived must complete within `ringbroker.connection.frame.timeout.ms`,
//! while a librdkafka client keeps producing and consuming. Problems of single connections (bad
//! frames, stalls, idle closes) are logged at most once per connection and within a per-shard
//! budget of lines per second, so a flood of bad frames cannot flood the log. At
//! `max.connections` and `max.connections.per.ip` the connection idle longest makes room for a new
//! one, so idle connections never lock a librdkafka client out. `queued.max.request.bytes` bounds
//! the memory a shard spends on partly sent requests.

mod support;

use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::fd::FromRawFd;
use std::time::{Duration, Instant};

use bytes::{BufMut, BytesMut};
use kafka_protocol::messages::{ApiKey, RequestHeader};
use kafka_protocol::protocol::{Encodable, StrBytes};

use rdkafka::Offset;

use support::Broker;
use support::kafka::{consume, consumer, create_topic, produce_all, producer, records};

const TIMEOUT: Duration = Duration::from_secs(30);

/// Waits (bounded by `limit`) until the server closes `stream`; returns how long that took, or
/// `None` if it stayed open.
fn closed_within(stream: &mut TcpStream, limit: Duration) -> Option<Duration> {
    let started = Instant::now();
    stream
        .set_read_timeout(Some(Duration::from_millis(100)))
        .unwrap();
    let mut byte = [0u8; 1];
    while started.elapsed() < limit {
        match stream.read(&mut byte) {
            Ok(0) => return Some(started.elapsed()),
            Ok(_) => panic!("the server sent bytes unasked"),
            Err(error) if matches!(error.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
            Err(error) if error.kind() == ErrorKind::Interrupted => {}
            Err(_) => return Some(started.elapsed()),
        }
    }
    None
}

/// Produces and reads back a few records through librdkafka.
fn client_round_trip(bootstrap: &str, topic: &str, prefix: &str, from: i64) {
    let producer = producer(bootstrap, &[("acks", "all")]);
    let sent = records(20, prefix);
    produce_all(&producer, topic, Some(0), &sent);
    let consumer = consumer(bootstrap, &[]);
    let received = consume(
        &consumer,
        topic,
        1,
        Offset::Offset(from),
        sent.len(),
        TIMEOUT,
    );
    assert_eq!(received.len(), sent.len());
    for (record, (_, value)) in received.iter().zip(&sent) {
        assert_eq!(&record.value, value);
    }
}

#[test]
fn idle_connections_are_closed_so_clients_are_not_locked_out() {
    let broker = Broker::start(
        1,
        &[
            "connections.max.idle.ms=1000",
            "ringbroker.max.connections.per.shard=12",
        ],
    );
    let bootstrap = broker.bootstrap();
    create_topic(&bootstrap, "idle", 1, &[]);
    // Idle clients take every slot.
    let mut idle: Vec<TcpStream> = (0..12)
        .map(|_| TcpStream::connect(&bootstrap).unwrap())
        .collect();
    // Each is closed after about a second without a request...
    for stream in &mut idle {
        let closed = closed_within(stream, Duration::from_secs(10))
            .expect("an idle connection was never closed");
        assert!(
            closed < Duration::from_secs(5),
            "closed only after {closed:?}"
        );
    }
    // ...so a real client gets in and works.
    client_round_trip(&bootstrap, "idle", "after-idle", 0);
}

#[test]
fn a_frame_that_stalls_is_cut_off_by_the_frame_deadline() {
    let broker = Broker::start(1, &["ringbroker.connection.frame.timeout.ms=500"]);
    let bootstrap = broker.bootstrap();
    create_topic(&bootstrap, "slow", 1, &[]);
    // The first bytes of a 100 MiB frame, then a byte every 100 ms: busy, but never complete.
    let mut slow = TcpStream::connect(&bootstrap).unwrap();
    slow.write_all(&(100i32 << 20).to_be_bytes()).unwrap();
    slow.write_all(&[0u8; 16]).unwrap();
    let started = Instant::now();
    let mut closed = false;
    for _ in 0..100 {
        std::thread::sleep(Duration::from_millis(100));
        if slow.write_all(&[0u8]).is_err() {
            closed = true;
            break;
        }
    }
    let elapsed = started.elapsed();
    // A write may still succeed once after the close; a read then sees it for sure.
    assert!(
        closed || closed_within(&mut slow, Duration::from_secs(2)).is_some(),
        "a stalled frame kept its connection open"
    );
    assert!(
        elapsed >= Duration::from_millis(400),
        "closed after {elapsed:?}"
    );
    assert!(elapsed < Duration::from_secs(5), "closed after {elapsed:?}");
    // A client's requests that arrive whole are untouched by the deadline.
    client_round_trip(&bootstrap, "slow", "after-slow", 0);
}

/// A request frame for ApiVersions at a version no broker knows: the broker answers it (KIP-511)
/// and keeps the connection open, so one connection can send thousands of bad requests.
fn unsupported_api_versions_frame(correlation_id: i32) -> Vec<u8> {
    let mut body = BytesMut::new();
    RequestHeader::default()
        .with_request_api_key(ApiKey::ApiVersions as i16)
        .with_request_api_version(99)
        .with_correlation_id(correlation_id)
        .with_client_id(Some(StrBytes::from_static_str("flood")))
        .encode(&mut body, 2)
        .unwrap();
    let mut frame = Vec::with_capacity(body.len() + 4);
    frame.put_i32(body.len() as i32);
    frame.extend_from_slice(&body);
    frame
}

/// Reads one response frame; `false` if the broker closed the connection.
fn read_response(stream: &mut TcpStream) -> bool {
    let mut size = [0u8; 4];
    if stream.read_exact(&mut size).is_err() {
        return false;
    }
    let mut body = vec![0u8; i32::from_be_bytes(size).max(0) as usize];
    stream.read_exact(&mut body).is_ok()
}

#[test]
fn ten_thousand_bad_frames_produce_a_bounded_log() {
    let log_dir = tempfile::tempdir().unwrap();
    let log = log_dir.path().join("broker.log");
    let broker = Broker::start_logging_to(&log, 1, &["socket.request.max.bytes=1048576"]);
    let bootstrap = broker.bootstrap();
    create_topic(&bootstrap, "flooded", 1, &[]);
    let log_bytes_at_start = std::fs::metadata(&log).unwrap().len();
    let mut bad_frames = 0;
    // 1,000 connections each closed for a frame larger than socket.request.max.bytes, and 1,000
    // each closed for a frame of garbage.
    for round in 0..2_000 {
        let mut stream = TcpStream::connect(&bootstrap).unwrap();
        if round % 2 == 0 {
            stream.write_all(&0x7fff_fff0i32.to_be_bytes()).unwrap();
        } else {
            let mut frame = 64i32.to_be_bytes().to_vec();
            frame.extend_from_slice(&[0xff; 64]);
            stream.write_all(&frame).unwrap();
        }
        bad_frames += 1;
        // Waiting for the close makes sure the broker saw the frame before the next one.
        assert!(
            closed_within(&mut stream, Duration::from_secs(10)).is_some(),
            "a bad frame did not close its connection"
        );
    }
    // 8,000 unsupported requests over four connections, each answered, the connections kept.
    for connection in 0..4 {
        let mut stream = TcpStream::connect(&bootstrap).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        for batch in 0..100 {
            let mut frames = Vec::new();
            for request in 0..20 {
                frames.extend(unsupported_api_versions_frame(
                    connection * 10_000 + batch * 20 + request,
                ));
            }
            stream.write_all(&frames).unwrap();
            for _ in 0..20 {
                assert!(read_response(&mut stream), "connection {connection} closed");
            }
            bad_frames += 20;
        }
    }
    assert_eq!(bad_frames, 10_000);
    // The suppressed lines are summed up within a second or so.
    std::thread::sleep(Duration::from_millis(1_500));
    client_round_trip(&bootstrap, "flooded", "after-flood", 0);
    let text = std::fs::read_to_string(&log).unwrap();
    let flood_log_bytes = text.len() as u64 - log_bytes_at_start;
    eprintln!("10,000 bad frames wrote {flood_log_bytes} bytes of broker log");
    // Unlimited, each bad frame wrote a line of about 150 bytes (1.5 MB in all).
    assert!(
        flood_log_bytes < 64 * 1024,
        "10,000 bad frames wrote {flood_log_bytes} bytes of log"
    );
    assert!(
        text.contains("similar connection problems suppressed"),
        "no summary line for the suppressed problems:\n{text}"
    );
}

/// Connects to `to` from the loopback address `from` (127.0.0.2 is as much loopback as
/// 127.0.0.1 on Linux), so a test can be two client addresses.
fn connect_from(from: [u8; 4], to: SocketAddr) -> TcpStream {
    let SocketAddr::V4(to) = to else {
        panic!("IPv4 only")
    };
    let sockaddr = |ip: [u8; 4], port: u16| libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: port.to_be(),
        sin_addr: libc::in_addr {
            s_addr: u32::from_ne_bytes(ip),
        },
        sin_zero: [0; 8],
    };
    let length = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
    unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0);
        assert!(fd >= 0, "socket: {}", std::io::Error::last_os_error());
        let stream = TcpStream::from_raw_fd(fd);
        let local = sockaddr(from, 0);
        let bound = libc::bind(fd, (&raw const local).cast(), length);
        assert_eq!(bound, 0, "bind: {}", std::io::Error::last_os_error());
        let remote = sockaddr(to.ip().octets(), to.port());
        let connected = libc::connect(fd, (&raw const remote).cast(), length);
        assert_eq!(connected, 0, "connect: {}", std::io::Error::last_os_error());
        stream
    }
}

/// Whether `stream` is served: an ApiVersions request gets its answer.
fn is_served(stream: &mut TcpStream) -> bool {
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut body = BytesMut::new();
    RequestHeader::default()
        .with_request_api_key(ApiKey::ApiVersions as i16)
        .with_request_api_version(0)
        .with_correlation_id(1)
        .encode(&mut body, 1)
        .unwrap();
    let mut frame = (body.len() as i32).to_be_bytes().to_vec();
    frame.extend_from_slice(&body);
    stream.write_all(&frame).is_ok() && read_response(stream)
}

#[test]
fn idle_connections_make_room_at_max_connections() {
    // Idle connections would be kept for ten minutes: only the limit's own rule frees them.
    let broker = Broker::start(2, &["max.connections=12"]);
    let bootstrap = broker.bootstrap();
    create_topic(&bootstrap, "crowded", 1, &[]);
    // Idle clients take every place in the node, all on shard 0.
    let mut idle: Vec<TcpStream> = (0..12)
        .map(|_| TcpStream::connect(&bootstrap).unwrap())
        .collect();
    std::thread::sleep(Duration::from_millis(200));
    // A connection to shard 1 gets in: shard 0 closed its connection idle longest for it.
    let shard_1: SocketAddr = format!("127.0.0.1:{}", broker.port + 1).parse().unwrap();
    let mut newcomer = TcpStream::connect(shard_1).unwrap();
    assert!(is_served(&mut newcomer), "the 13th connection was refused");
    assert!(
        idle.iter_mut()
            .any(|stream| closed_within(stream, Duration::from_millis(200)).is_some()),
        "no idle connection was closed to make room"
    );
    // librdkafka's producer and consumer get in the same way, and work.
    client_round_trip(&bootstrap, "crowded", "crowded", 0);
    drop(idle);
}

#[test]
fn max_connections_per_ip_refuses_only_the_crowded_address() {
    let broker = Broker::start(1, &["max.connections.per.ip=4"]);
    let bootstrap = broker.bootstrap();
    let address: SocketAddr = bootstrap.parse().unwrap();
    create_topic(&bootstrap, "per-ip", 1, &[]);
    // 127.0.0.2 holds four connections, each in the middle of a request: busy, never closed to
    // make room.
    let mut busy: Vec<TcpStream> = (0..4)
        .map(|_| {
            let mut stream = connect_from([127, 0, 0, 2], address);
            stream.write_all(&100i32.to_be_bytes()).unwrap();
            stream.write_all(&[0u8; 10]).unwrap();
            stream
        })
        .collect();
    std::thread::sleep(Duration::from_millis(200));
    // A fifth connection from 127.0.0.2 is refused...
    let mut fifth = connect_from([127, 0, 0, 2], address);
    assert!(
        closed_within(&mut fifth, Duration::from_secs(5)).is_some(),
        "a fifth connection from 127.0.0.2 was kept"
    );
    for stream in &mut busy {
        assert!(
            closed_within(stream, Duration::from_millis(50)).is_none(),
            "a busy connection was closed to make room"
        );
    }
    // ...while 127.0.0.1 is not limited by 127.0.0.2's connections.
    client_round_trip(&bootstrap, "per-ip", "per-ip", 0);
    // A connection from 127.0.0.2 that is idle (its request answered) makes room for the next.
    drop(busy.pop());
    std::thread::sleep(Duration::from_millis(200));
    let mut idle = connect_from([127, 0, 0, 2], address);
    assert!(is_served(&mut idle), "no place after a connection closed");
    // The client reads the answer a moment before the broker counts the request as done.
    std::thread::sleep(Duration::from_millis(200));
    let mut newcomer = connect_from([127, 0, 0, 2], address);
    assert!(
        closed_within(&mut idle, Duration::from_secs(5)).is_some(),
        "the idle connection did not make room"
    );
    assert!(is_served(&mut newcomer), "the newcomer was refused");
}

/// The resident memory of process `pid` (VmRSS in /proc/<pid>/status).
fn rss_bytes(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status
        .lines()
        .find(|line| line.starts_with("VmRSS:"))
        .expect("VmRSS in /proc/<pid>/status");
    let kib: u64 = line
        .split_whitespace()
        .nth(1)
        .and_then(|field| field.parse().ok())
        .expect("VmRSS in kB");
    kib * 1024
}

#[test]
fn queued_request_bytes_bound_the_memory_of_partly_sent_frames() {
    const MIB: usize = 1 << 20;
    const BUDGET_BYTES: u64 = 100 * MIB as u64;
    let broker = Broker::start(1, &[&format!("queued.max.request.bytes={BUDGET_BYTES}")]);
    let bootstrap = broker.bootstrap();
    let pid = broker.pid().unwrap();
    create_topic(&bootstrap, "queued", 1, &[]);
    client_round_trip(&bootstrap, "queued", "before", 0);
    let base_bytes = rss_bytes(pid);
    // 20 peers each announce a 100 MiB frame and send its first 15 MiB: 300 MiB, three times the
    // budget. Once the budget is spent the broker reads no more and the writes stall.
    let chunk = vec![0x5a_u8; MIB];
    let mut senders = Vec::new();
    let mut sent_bytes = 0;
    for _ in 0..20 {
        let mut stream = TcpStream::connect(&bootstrap).unwrap();
        stream
            .set_write_timeout(Some(Duration::from_millis(100)))
            .unwrap();
        stream.write_all(&(100 * MIB as i32).to_be_bytes()).unwrap();
        for _ in 0..15 {
            match stream.write(&chunk) {
                Ok(written) => sent_bytes += written,
                Err(_) => break,
            }
        }
        senders.push(stream);
    }
    std::thread::sleep(Duration::from_millis(500));
    let held_bytes = rss_bytes(pid).saturating_sub(base_bytes);
    eprintln!(
        "sent {} MiB of partial frames; broker RSS grew by {} MiB (budget {} MiB)",
        sent_bytes / MIB,
        held_bytes / MIB as u64,
        BUDGET_BYTES / MIB as u64
    );
    assert!(
        held_bytes < BUDGET_BYTES + 32 * MIB as u64,
        "RSS grew by {held_bytes} bytes with a budget of {BUDGET_BYTES}"
    );
    // Closing the stalled connections gives their bytes back: clients are served again.
    drop(senders);
    client_round_trip(&bootstrap, "queued", "after", 20);
}
