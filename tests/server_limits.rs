//! Connection deadlines (issue 10), against the real broker binary: connections idle for
//! `connections.max.idle.ms` are closed, so idle clients cannot hold every connection slot, and a
//! frame whose first bytes arrived must complete within `ringbroker.connection.frame.timeout.ms`,
//! while a librdkafka client keeps producing and consuming. Problems of single connections (bad
//! frames, stalls, idle closes) are logged at most once per connection and within a per-shard
//! budget of lines per second, so a flood of bad frames cannot flood the log.

mod support;

use std::io::{ErrorKind, Read, Write};
use std::net::TcpStream;
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
