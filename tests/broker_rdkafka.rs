//! End-to-end tests of the broker with librdkafka (the `rdkafka` crate), a client we did not write:
//! produce with every acks setting, keyed ordering, offsets by earliest/latest/timestamp, long-poll,
//! compression codecs, restarts (clean and SIGKILL), retention, topic administration, several shards.

mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use rdkafka::consumer::Consumer;
use rdkafka::{Offset, TopicPartitionList};

use support::Broker;
use support::kafka::{
    consume, consumer, create_topic, poll_records, produce_all, producer, records,
};

const TIMEOUT: Duration = Duration::from_secs(30);

fn values(received: &[support::kafka::Received]) -> BTreeSet<Vec<u8>> {
    received.iter().map(|r| r.value.clone()).collect()
}

/// Every acks setting delivers every record, on 1, 2 and 4 shards with partitions spread over them.
#[test]
fn produce_and_consume_with_every_acks_setting_on_1_2_and_4_shards() {
    for shards in [1usize, 2, 4] {
        let broker = Broker::start(shards, &[]);
        let bootstrap = broker.bootstrap();
        for acks in ["0", "1", "all"] {
            let topic = format!("acks-{acks}-{shards}");
            create_topic(&bootstrap, &topic, 4, &[]);
            let producer = producer(&bootstrap, &[("acks", acks)]);
            let sent = records(300, &topic);
            let reports = produce_all(&producer, &topic, None, &sent);
            let partitions: BTreeSet<i32> = reports.iter().map(|(p, _)| *p).collect();
            assert_eq!(
                partitions.len(),
                4,
                "keys spread over all partitions: {partitions:?}"
            );
            let consumer = consumer(&bootstrap, &[]);
            let got = consume(&consumer, &topic, 4, Offset::Beginning, sent.len(), TIMEOUT);
            assert_eq!(got.len(), sent.len(), "shards={shards} acks={acks}");
            assert_eq!(values(&got), sent.iter().map(|(_, v)| v.clone()).collect());
            // Offsets in each partition are contiguous from 0.
            let mut per_partition: BTreeMap<i32, Vec<i64>> = BTreeMap::new();
            for record in &got {
                per_partition
                    .entry(record.partition)
                    .or_default()
                    .push(record.offset);
            }
            for (partition, mut offsets) in per_partition {
                offsets.sort();
                let expected: Vec<i64> = (0..offsets.len() as i64).collect();
                assert_eq!(offsets, expected, "partition {partition} offsets");
            }
        }
    }
}

/// Records with one key land in one partition, in the order they were sent.
#[test]
fn keyed_records_land_in_one_partition_in_order() {
    let broker = Broker::start(2, &[]);
    let bootstrap = broker.bootstrap();
    create_topic(&bootstrap, "keyed", 6, &[]);
    let producer = producer(&bootstrap, &[("acks", "all")]);
    let sent: Vec<_> = (0..200)
        .map(|i| {
            (
                Some(b"the-one-key".to_vec()),
                format!("value-{i:04}").into_bytes(),
            )
        })
        .collect();
    let reports = produce_all(&producer, "keyed", None, &sent);
    let partitions: BTreeSet<i32> = reports.iter().map(|(p, _)| *p).collect();
    assert_eq!(partitions.len(), 1);
    let consumer = consumer(&bootstrap, &[]);
    let got = consume(
        &consumer,
        "keyed",
        6,
        Offset::Beginning,
        sent.len(),
        TIMEOUT,
    );
    let got_values: Vec<Vec<u8>> = got.iter().map(|r| r.value.clone()).collect();
    let sent_values: Vec<Vec<u8>> = sent.iter().map(|(_, v)| v.clone()).collect();
    assert_eq!(got_values, sent_values, "same partition, same order");
}

/// Consumers can start at the earliest offset, the latest, or the first offset at a timestamp.
#[test]
fn consume_from_earliest_latest_and_a_timestamp() {
    let broker = Broker::start(1, &[]);
    let bootstrap = broker.bootstrap();
    create_topic(&bootstrap, "times", 1, &[]);
    let producer = producer(&bootstrap, &[("acks", "1"), ("linger.ms", "0")]);
    produce_all(&producer, "times", Some(0), &records(50, "early"));
    std::thread::sleep(Duration::from_millis(50));
    let boundary_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64;
    std::thread::sleep(Duration::from_millis(50));
    produce_all(&producer, "times", Some(0), &records(50, "late"));

    let earliest = consume(
        &consumer(&bootstrap, &[]),
        "times",
        1,
        Offset::Beginning,
        100,
        TIMEOUT,
    );
    assert_eq!(earliest.len(), 100);
    assert_eq!(earliest[0].offset, 0);

    // Offsets by timestamp through the time index (ListOffsets).
    let consumer = consumer(&bootstrap, &[]);
    let mut query = TopicPartitionList::new();
    query
        .add_partition_offset("times", 0, Offset::Offset(boundary_ms))
        .unwrap();
    let found = consumer
        .offsets_for_times(query, TIMEOUT)
        .expect("offsets_for_times");
    let offset = found.find_partition("times", 0).unwrap().offset();
    assert_eq!(
        offset,
        Offset::Offset(50),
        "the first record at or after the timestamp"
    );
    let late = consume(&consumer, "times", 1, offset, 50, TIMEOUT);
    assert_eq!(late.len(), 50);
    assert!(late.iter().all(|r| r.value.starts_with(b"late-")));

    // Latest: only records produced after the consumer started.
    let (low, high) = consumer.fetch_watermarks("times", 0, TIMEOUT).unwrap();
    assert_eq!((low, high), (0, 100));
    let tail_consumer = support::kafka::consumer(&bootstrap, &[]);
    let mut assignment = TopicPartitionList::new();
    assignment
        .add_partition_offset("times", 0, Offset::End)
        .unwrap();
    tail_consumer.assign(&assignment).unwrap();
    // The consumer resolves "end" asynchronously, so records produced before it has done so may be
    // skipped too; keep producing (bounded) until it sees some. Whatever it sees must be new.
    let mut tail = Vec::new();
    for round in 0..40 {
        produce_all(
            &producer,
            "times",
            Some(0),
            &records(1, &format!("tail{round}")),
        );
        tail.extend(poll_records(&tail_consumer, 1, Duration::from_millis(500)));
        if !tail.is_empty() {
            break;
        }
    }
    assert!(!tail.is_empty(), "the tail consumer received new records");
    assert!(
        tail.iter()
            .all(|r| r.value.starts_with(b"tail") && r.offset >= 100),
        "{tail:?}"
    );
}

/// A fetch parked on an empty partition returns as soon as data arrives, long before max wait.
#[test]
fn long_poll_returns_promptly_when_data_arrives() {
    let broker = Broker::start(1, &[]);
    let bootstrap = broker.bootstrap();
    create_topic(&bootstrap, "poll", 1, &[]);
    // Ten-second max wait and a large min.bytes: without a wake-up on append the record would
    // arrive only after the whole wait.
    let consumer = consumer(
        &bootstrap,
        &[("fetch.wait.max.ms", "10000"), ("fetch.min.bytes", "1")],
    );
    let mut assignment = TopicPartitionList::new();
    assignment
        .add_partition_offset("poll", 0, Offset::Beginning)
        .unwrap();
    consumer.assign(&assignment).unwrap();
    let _ = poll_records(&consumer, 1, Duration::from_millis(1500));
    let producer = producer(&bootstrap, &[("linger.ms", "0")]);
    let sent_at = Instant::now();
    produce_all(&producer, "poll", Some(0), &records(1, "wake"));
    let got = poll_records(&consumer, 1, Duration::from_secs(9));
    let waited = sent_at.elapsed();
    assert_eq!(got.len(), 1, "the record arrived");
    assert!(
        waited < Duration::from_secs(5),
        "woken on append, not after max wait ({waited:?})"
    );
}

/// Batches compressed by the client with each codec are stored and served unchanged.
#[test]
fn every_compression_codec_round_trips() {
    let broker = Broker::start(2, &[]);
    let bootstrap = broker.bootstrap();
    for codec in ["gzip", "snappy", "lz4", "zstd"] {
        let topic = format!("codec-{codec}");
        create_topic(&bootstrap, &topic, 2, &[]);
        let producer = producer(
            &bootstrap,
            &[("compression.codec", codec), ("linger.ms", "20")],
        );
        // Compressible values, so the codec really shrinks the batches.
        let sent: Vec<_> = (0..500)
            .map(|i| {
                (
                    Some(format!("k{i}").into_bytes()),
                    format!("{codec}-{i:05}-{}", "x".repeat(200)).into_bytes(),
                )
            })
            .collect();
        produce_all(&producer, &topic, None, &sent);
        let got = consume(
            &consumer(&bootstrap, &[]),
            &topic,
            2,
            Offset::Beginning,
            sent.len(),
            TIMEOUT,
        );
        assert_eq!(
            values(&got),
            sent.iter().map(|(_, v)| v.clone()).collect(),
            "codec {codec}"
        );
        // The stored log is smaller than the raw values: the batches stayed compressed.
        let raw: usize = sent.iter().map(|(_, v)| v.len()).sum();
        let stored: u64 = (0..2)
            .map(|p| dir_size(&broker.data_dir.join(format!("{topic}-{p}"))))
            .sum();
        assert!(
            stored < raw as u64 / 2,
            "codec {codec}: stored {stored} bytes for {raw} raw bytes"
        );
    }
}

fn dir_size(dir: &std::path::Path) -> u64 {
    std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .filter_map(|e| e.ok())
                .filter(|e| e.path().extension().is_some_and(|x| x == "log"))
                .map(|e| e.metadata().map(|m| m.len()).unwrap_or(0))
                .sum()
        })
        .unwrap_or(0)
}

/// Data survives a clean restart and a SIGKILL; no acks=all record is lost.
#[test]
fn data_survives_clean_restart_and_sigkill() {
    let temp = tempfile::tempdir().unwrap();
    let data_dir = temp.path().join("data");
    let mut broker = Broker::start_on(&data_dir, 2, &[]);
    create_topic(&broker.bootstrap(), "durable", 3, &[]);
    let first = records(300, "before-clean-stop");
    produce_all(
        &producer(&broker.bootstrap(), &[("acks", "all")]),
        "durable",
        None,
        &first,
    );
    assert_eq!(broker.stop(), Some(0), "clean stop exits 0");

    let mut broker = Broker::start_on(&data_dir, 2, &[]);
    let got = consume(
        &consumer(&broker.bootstrap(), &[]),
        "durable",
        3,
        Offset::Beginning,
        300,
        TIMEOUT,
    );
    assert_eq!(values(&got), first.iter().map(|(_, v)| v.clone()).collect());
    let second = records(300, "before-kill");
    produce_all(
        &producer(&broker.bootstrap(), &[("acks", "all")]),
        "durable",
        None,
        &second,
    );
    broker.kill();

    let broker = Broker::start_on(&data_dir, 2, &[]);
    let got = consume(
        &consumer(&broker.bootstrap(), &[]),
        "durable",
        3,
        Offset::Beginning,
        600,
        TIMEOUT,
    );
    let mut expected: BTreeSet<Vec<u8>> = first.iter().map(|(_, v)| v.clone()).collect();
    expected.extend(second.iter().map(|(_, v)| v.clone()));
    assert_eq!(
        got.len(),
        600,
        "every acknowledged acks=all record survives SIGKILL"
    );
    assert_eq!(values(&got), expected);
}

/// Size-based retention deletes whole old segments and advances the log start offset while a
/// consumer keeps reading the newest data.
#[test]
fn retention_deletes_old_segments_while_a_consumer_reads() {
    let broker = Broker::start(1, &["log.retention.check.interval.ms=200"]);
    let bootstrap = broker.bootstrap();
    create_topic(
        &bootstrap,
        "retained",
        1,
        &[("segment.bytes", "65536"), ("retention.bytes", "131072")],
    );
    let producer = producer(
        &bootstrap,
        &[("acks", "1"), ("linger.ms", "2"), ("batch.size", "8192")],
    );
    let consumer = consumer(&bootstrap, &[]);
    let mut assignment = TopicPartitionList::new();
    assignment
        .add_partition_offset("retained", 0, Offset::Beginning)
        .unwrap();
    consumer.assign(&assignment).unwrap();
    let mut consumed = 0usize;
    let payload = "r".repeat(1000);
    for round in 0..10 {
        let batch: Vec<_> = (0..100)
            .map(|i| (None, format!("{round}-{i}-{payload}").into_bytes()))
            .collect();
        produce_all(&producer, "retained", Some(0), &batch);
        consumed += poll_records(&consumer, 100, TIMEOUT).len();
    }
    assert_eq!(consumed, 1000, "the consumer kept up while retention ran");
    // Wait (bounded) for retention passes to delete the old segments and advance the log start.
    let count_logs = || {
        std::fs::read_dir(broker.data_dir.join("retained-0"))
            .unwrap()
            .filter(|e| {
                e.as_ref()
                    .unwrap()
                    .path()
                    .extension()
                    .is_some_and(|x| x == "log")
            })
            .count()
    };
    let deadline = Instant::now() + Duration::from_secs(20);
    let (mut low, mut logs_on_disk) = (0, usize::MAX);
    while Instant::now() < deadline {
        low = consumer.fetch_watermarks("retained", 0, TIMEOUT).unwrap().0;
        logs_on_disk = count_logs();
        if low > 0 && logs_on_disk <= 4 {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(low > 0, "log start offset advanced");
    assert!(
        logs_on_disk <= 4,
        "old segments were deleted ({logs_on_disk} left)"
    );
    // Reading from the start now begins at the new log start.
    let from_start = consume(
        &support::kafka::consumer(&bootstrap, &[]),
        "retained",
        1,
        Offset::Beginning,
        1,
        TIMEOUT,
    );
    assert_eq!(from_start.len(), 1);
    assert!(from_start[0].offset >= low);
}

/// Topics are created and deleted through the Admin API, and auto-created on first use.
#[test]
fn topics_are_created_deleted_and_auto_created() {
    let broker = Broker::start(2, &["num.partitions=3"]);
    let bootstrap = broker.bootstrap();
    create_topic(&bootstrap, "admin-made", 5, &[("retention.ms", "3600000")]);
    let probe = consumer(&bootstrap, &[]);
    let metadata = probe.fetch_metadata(Some("admin-made"), TIMEOUT).unwrap();
    assert_eq!(metadata.topics()[0].partitions().len(), 5);
    assert_eq!(metadata.brokers().len(), 2, "every shard is a broker");

    // Creating it again is refused with TOPIC_ALREADY_EXISTS.
    let admin = support::kafka::admin(&bootstrap);
    let options = rdkafka::admin::AdminOptions::new();
    let again =
        rdkafka::admin::NewTopic::new("admin-made", 1, rdkafka::admin::TopicReplication::Fixed(1));
    let result = futures_executor::block_on(admin.create_topics([&again], &options)).unwrap();
    assert!(
        matches!(
            &result[0],
            Err((_, rdkafka::types::RDKafkaErrorCode::TopicAlreadyExists))
        ),
        "{result:?}"
    );

    // Auto-creation: producing to an unknown topic creates it with num.partitions.
    produce_all(
        &producer(&bootstrap, &[]),
        "auto-made",
        None,
        &records(10, "auto"),
    );
    let metadata = probe.fetch_metadata(Some("auto-made"), TIMEOUT).unwrap();
    assert_eq!(metadata.topics()[0].partitions().len(), 3);

    // Deletion removes the topic and its data.
    let deleted =
        futures_executor::block_on(admin.delete_topics(&["admin-made"], &options)).unwrap();
    assert!(deleted[0].is_ok(), "{deleted:?}");
    let metadata = probe.fetch_metadata(None, TIMEOUT).unwrap();
    let names: Vec<&str> = metadata.topics().iter().map(|t| t.name()).collect();
    assert!(!names.contains(&"admin-made"), "{names:?}");
    assert!(!broker.data_dir.join("admin-made-0").exists());
}
