//! Connection deadlines (issue 10), against the real broker binary: connections idle for
//! `connections.max.idle.ms` are closed, so idle clients cannot hold every connection slot, and a
//! frame whose first bytes arrived must complete within `ringbroker.connection.frame.timeout.ms`,
//! while a librdkafka client keeps producing and consuming.

mod support;

use std::io::{ErrorKind, Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

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
