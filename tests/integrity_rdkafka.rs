//! Disk damage between broker runs, seen through librdkafka: records acknowledged with acks=all,
//! the broker stopped (SIGKILL or SIGTERM), one byte of a stored batch flipped, the broker restarted.
//! Every acknowledged record outside the damaged batch must still be consumed with its value, the
//! damaged segment must be in `quarantine/` (nothing unlinked), the broker log must carry an ERROR
//! naming the file, and a consumer positioned at the damaged offset must get an error within
//! seconds instead of polling empty fetches forever.

mod support;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Message;
use rdkafka::types::RDKafkaErrorCode;
use rdkafka::{Offset, TopicPartitionList};
use support::Broker;
use support::kafka::{create_topic, produce_all, producer, records};

const TOPIC: &str = "damaged";

/// Produces `count` records with acks=all into one partition with small segments and returns
/// offset -> value as acknowledged.
fn produce_acked(broker: &Broker, count: usize) -> BTreeMap<i64, Vec<u8>> {
    create_topic(&broker.bootstrap(), TOPIC, 1, &[("segment.bytes", "65536")]);
    let producer = producer(
        &broker.bootstrap(),
        &[("acks", "all"), ("batch.num.messages", "20")],
    );
    let sent = records(count, "value");
    let reports = produce_all(&producer, TOPIC, Some(0), &sent);
    reports
        .into_iter()
        .zip(sent)
        .map(|((_, offset), (_, value))| (offset, value))
        .collect()
}

fn partition_dir(broker: &Broker) -> PathBuf {
    broker.data_dir.join(format!("{TOPIC}-0"))
}

fn segments(dir: &Path) -> Vec<PathBuf> {
    let mut paths: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|entry| entry.unwrap().path())
        .filter(|path| path.extension().is_some_and(|ext| ext == "log"))
        .collect();
    paths.sort();
    paths
}

/// Batch start positions and (base offset, last offset) of a segment file.
fn batches(path: &Path) -> Vec<(usize, i64, i64)> {
    let bytes = std::fs::read(path).unwrap();
    let mut found = Vec::new();
    let mut position = 0;
    while position + 61 <= bytes.len() {
        let base = i64::from_be_bytes(bytes[position..position + 8].try_into().unwrap());
        let length =
            i32::from_be_bytes(bytes[position + 8..position + 12].try_into().unwrap()) as usize;
        let delta = i32::from_be_bytes(bytes[position + 23..position + 27].try_into().unwrap());
        found.push((position, base, base + i64::from(delta)));
        position += length + 12;
    }
    found
}

fn flip(path: &Path, position: usize, mask: u8) {
    let mut bytes = std::fs::read(path).unwrap();
    bytes[position] ^= mask;
    std::fs::write(path, bytes).unwrap();
}

fn consumer_at(broker: &Broker, offset: i64) -> BaseConsumer {
    let consumer =
        support::kafka::consumer(&broker.bootstrap(), &[("fetch.error.backoff.ms", "100")]);
    let mut assignment = TopicPartitionList::new();
    assignment
        .add_partition_offset(TOPIC, 0, Offset::Offset(offset))
        .unwrap();
    consumer.assign(&assignment).unwrap();
    consumer
}

/// Polls from `from` until `until` (exclusive), seeking past any offset the broker reports as corrupt.
/// Returns what was read and the offsets at which an error was reported.
fn read_all(
    broker: &Broker,
    from: i64,
    until: i64,
    skip_on_error: &dyn Fn(i64) -> i64,
) -> (BTreeMap<i64, Vec<u8>>, Vec<i64>) {
    let consumer = consumer_at(broker, from);
    let mut read = BTreeMap::new();
    let mut errors = Vec::new();
    let mut next = from;
    let deadline = Instant::now() + Duration::from_secs(30);
    while next < until && Instant::now() < deadline {
        match consumer.poll(Duration::from_millis(100)) {
            Some(Ok(message)) => {
                read.insert(
                    message.offset(),
                    message.payload().unwrap_or_default().to_vec(),
                );
                next = message.offset() + 1;
            }
            Some(Err(error)) => {
                if error.rdkafka_error_code() == Some(RDKafkaErrorCode::PartitionEOF) {
                    continue;
                }
                assert_eq!(
                    error.rdkafka_error_code(),
                    Some(RDKafkaErrorCode::InvalidMessage),
                    "unexpected consumer error {error}"
                );
                errors.push(next);
                next = skip_on_error(next);
                consumer
                    .seek(TOPIC, 0, Offset::Offset(next), Duration::from_secs(5))
                    .unwrap();
            }
            None => {}
        }
    }
    (read, errors)
}

/// How long a consumer at `offset` takes to get a CORRUPT_MESSAGE error (librdkafka names code 2
/// `InvalidMessage`); panics after 10 s.
fn seconds_to_error(broker: &Broker, offset: i64) -> f64 {
    let consumer = consumer_at(broker, offset);
    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(10) {
        match consumer.poll(Duration::from_millis(100)) {
            Some(Err(error))
                if error.rdkafka_error_code() == Some(RDKafkaErrorCode::InvalidMessage) =>
            {
                return started.elapsed().as_secs_f64();
            }
            Some(Ok(message)) => panic!(
                "consumer at damaged offset {offset} got offset {}",
                message.offset()
            ),
            _ => {}
        }
    }
    panic!("a consumer at the damaged offset {offset} got no error within 10 s");
}

#[test]
fn a_flipped_length_below_the_recovery_point_is_quarantined_and_reported() {
    let mut broker = Broker::start(1, &[]);
    let acked = produce_acked(&broker, 3000);
    let dir = partition_dir(&broker);
    broker.kill();
    let active = segments(&dir).pop().unwrap();
    let in_active = batches(&active);
    assert!(
        in_active.len() > 4,
        "the active segment holds several batches"
    );
    let (position, lost_from, lost_to) = in_active[in_active.len() / 2];
    flip(&active, position + 9, 0x01);
    let originals = segments(&dir);

    let log = broker.data_dir.parent().unwrap().join("broker.log");
    let data_dir = broker.data_dir.clone();
    let restarted = Broker::start_on_logged(&data_dir, 1, &[], &log);
    let end = *acked.keys().last().unwrap() + 1;
    let (read, errors) = read_all(&restarted, 0, end, &|_| lost_to + 1);
    assert_eq!(errors, vec![lost_from], "one error, at the damaged batch");
    for (offset, value) in &acked {
        if (lost_from..=lost_to).contains(offset) {
            continue;
        }
        assert_eq!(
            read.get(offset),
            Some(value),
            "acked offset {offset} lost or changed"
        );
    }
    assert!(seconds_to_error(&restarted, lost_from) < 5.0);
    let text = std::fs::read_to_string(&log).unwrap();
    let line = text
        .lines()
        .find(|line| line.contains("ERROR") && line.contains("quarantine"))
        .unwrap_or_else(|| panic!("no ERROR line about quarantine in:\n{text}"));
    assert!(line.contains(&active.display().to_string()), "{line}");
    assert!(
        line.contains(&format!("lost_offsets_from={lost_from}")),
        "{line}"
    );
    let quarantined: Vec<_> = std::fs::read_dir(dir.join("quarantine"))
        .unwrap()
        .map(|entry| entry.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    for original in originals {
        let name = original.file_name().unwrap().to_string_lossy().into_owned();
        assert!(
            original.exists() || quarantined.iter().any(|file| file.starts_with(&name)),
            "{name} unlinked"
        );
    }
}

#[test]
fn a_damaged_header_in_a_closed_segment_gives_the_consumer_an_error_not_a_stall() {
    let mut broker = Broker::start(1, &[]);
    let acked = produce_acked(&broker, 3000);
    let dir = partition_dir(&broker);
    assert_eq!(broker.stop(), Some(0), "clean stop");
    let first = segments(&dir).remove(0);
    let in_first = batches(&first);
    let (position, lost_from, lost_to) = in_first[in_first.len() / 2];
    flip(&first, position + 9, 0x01);

    let log = broker.data_dir.parent().unwrap().join("broker.log");
    let data_dir = broker.data_dir.clone();
    let restarted = Broker::start_on_logged(&data_dir, 1, &[], &log);
    assert!(seconds_to_error(&restarted, lost_from) < 5.0);
    // Everything outside the damaged batch is still served, including the batches right after it
    // in the same segment: a consumer from offset 0 stops at the damage with one error, then seeks
    // past it.
    let end = *acked.keys().last().unwrap() + 1;
    let (read, errors) = read_all(&restarted, 0, end, &|_| lost_to + 1);
    assert_eq!(errors, vec![lost_from]);
    for (offset, value) in &acked {
        if !(lost_from..=lost_to).contains(offset) {
            assert_eq!(read.get(offset), Some(value), "acked offset {offset}");
        }
    }
    let text = std::fs::read_to_string(&log).unwrap();
    let errors: Vec<&str> = text
        .lines()
        .filter(|line| line.contains("ERROR") && line.contains("damaged record batch"))
        .collect();
    assert_eq!(
        errors.len(),
        1,
        "logged once per position, not per fetch:\n{text}"
    );
    assert!(
        errors[0].contains(&first.display().to_string()),
        "{}",
        errors[0]
    );
}

#[test]
fn the_scrubber_finds_a_flipped_crc_byte_at_rest_and_the_consumer_gets_an_error() {
    let mut broker = Broker::start(1, &[]);
    let acked = produce_acked(&broker, 3000);
    let dir = partition_dir(&broker);
    assert_eq!(broker.stop(), Some(0), "clean stop");
    let first = segments(&dir).remove(0);
    let in_first = batches(&first);
    let (position, lost_from, lost_to) = in_first[in_first.len() / 2];
    // A byte inside the records: only the CRC tells.
    flip(&first, position + 70, 0x10);

    let log = broker.data_dir.parent().unwrap().join("broker.log");
    let data_dir = broker.data_dir.clone();
    let restarted = Broker::start_on_logged(
        &data_dir,
        1,
        &["ringbroker.log.scrub.bytes.per.second=104857600"],
        &log,
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    let text = loop {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        if text.contains("scrub pass") {
            break text;
        }
        assert!(Instant::now() < deadline, "no scrub pass logged:\n{text}");
        std::thread::sleep(Duration::from_millis(50));
    };
    let line = text
        .lines()
        .find(|line| line.contains("ERROR") && line.contains("CRC mismatch"))
        .unwrap_or_else(|| panic!("no ERROR line about the CRC in:\n{text}"));
    assert!(line.contains(&first.display().to_string()), "{line}");
    assert!(
        text.lines().any(|line| line.contains("scrub pass")
            && line.contains("damaged_batches=1")
            && line.contains("duration_ms=")),
        "{text}"
    );
    assert!(seconds_to_error(&restarted, lost_from) < 5.0);
    let end = *acked.keys().last().unwrap() + 1;
    let (read, errors) = read_all(&restarted, 0, end, &|_| lost_to + 1);
    assert_eq!(errors, vec![lost_from]);
    for (offset, value) in &acked {
        if !(lost_from..=lost_to).contains(offset) {
            assert_eq!(read.get(offset), Some(value), "acked offset {offset}");
        }
    }
}
