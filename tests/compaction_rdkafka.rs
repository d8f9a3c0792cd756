//! Log compaction end to end through librdkafka: a keyed `cleanup.policy=compact` topic is cleaned
//! down to its latest value per key while a consumer reads it, tombstones disappear after
//! `delete.retention.ms`, a record without a key is refused with INVALID_RECORD, and
//! `log.cleanup.policy=compact` makes compaction the broker default. Short intervals come from config.

mod support;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::producer::{BaseProducer, BaseRecord, Producer};
use rdkafka::{Offset, TopicPartitionList};

use support::Broker;
use support::kafka::{DeliveryLog, Received, consumer, create_topic, poll_records, producer};

const TIMEOUT: Duration = Duration::from_secs(20);

/// Sends (key, value) records, a `None` value being a tombstone, and returns the delivery errors.
fn send(
    producer: &BaseProducer<DeliveryLog>,
    topic: &str,
    records: &[(Option<&str>, Option<String>)],
) -> Vec<String> {
    let before = producer.context().reports.lock().unwrap().len();
    for (key, value) in records {
        let mut record = BaseRecord::<str, String>::to(topic).partition(0);
        if let Some(key) = key {
            record = record.key(*key);
        }
        if let Some(value) = value {
            record = record.payload(value);
        }
        let mut pending = record;
        let deadline = Instant::now() + TIMEOUT;
        loop {
            match producer.send(pending) {
                Ok(()) => break,
                Err((error, returned)) => {
                    assert!(Instant::now() < deadline, "send kept failing: {error}");
                    producer.poll(Duration::from_millis(10));
                    pending = returned;
                }
            }
        }
    }
    producer.flush(TIMEOUT).expect("flush");
    let reports = producer.context().reports.lock().unwrap()[before..].to_vec();
    assert_eq!(reports.len(), records.len());
    reports.into_iter().filter_map(Result::err).collect()
}

/// Everything from the beginning up to the current high watermark, with a fresh consumer.
fn read_from_start(bootstrap: &str, topic: &str) -> Vec<Received> {
    let consumer: BaseConsumer = consumer(bootstrap, &[]);
    let (low, high) = consumer.fetch_watermarks(topic, 0, TIMEOUT).unwrap();
    let mut assignment = TopicPartitionList::new();
    assignment
        .add_partition_offset(topic, 0, Offset::Beginning)
        .unwrap();
    consumer.assign(&assignment).unwrap();
    let mut out = Vec::new();
    let deadline = Instant::now() + TIMEOUT;
    // Bounded by the deadline: stop once the consumer's position reaches the high watermark, or
    // (trailing empty batches leave the position below it) after two idle rounds.
    let mut idle_rounds = 0;
    while Instant::now() < deadline && idle_rounds < 2 {
        let got = poll_records(&consumer, usize::MAX, Duration::from_millis(200));
        idle_rounds = if got.is_empty() { idle_rounds + 1 } else { 0 };
        out.extend(got);
        let position = consumer
            .position()
            .unwrap()
            .find_partition(topic, 0)
            .and_then(|p| p.offset().to_raw())
            .unwrap_or(low);
        if position >= high || out.last().is_some_and(|r| r.offset + 1 >= high) {
            break;
        }
    }
    out
}

fn latest_per_key(records: &[Received]) -> BTreeMap<Vec<u8>, Vec<u8>> {
    let mut latest = BTreeMap::new();
    for record in records {
        latest.insert(record.key.clone().unwrap(), record.value.clone());
    }
    latest
}

#[test]
fn a_compacted_topic_is_cleaned_to_its_latest_values_while_a_consumer_reads() {
    let broker = Broker::start(1, &["log.cleaner.backoff.ms=100"]);
    let bootstrap = broker.bootstrap();
    create_topic(
        &bootstrap,
        "changelog",
        1,
        &[
            ("cleanup.policy", "compact"),
            ("segment.ms", "200"),
            ("segment.bytes", "8192"),
            ("min.cleanable.dirty.ratio", "0.01"),
            ("delete.retention.ms", "3000"),
        ],
    );
    let producer = producer(&bootstrap, &[("acks", "all"), ("linger.ms", "5")]);

    // A consumer that reads the topic from the start the whole time.
    let stop = Arc::new(AtomicBool::new(false));
    let reader_stop = stop.clone();
    let reader_bootstrap = bootstrap.clone();
    let reader = std::thread::spawn(move || {
        let consumer: BaseConsumer = consumer(&reader_bootstrap, &[]);
        let mut assignment = TopicPartitionList::new();
        assignment
            .add_partition_offset("changelog", 0, Offset::Beginning)
            .unwrap();
        consumer.assign(&assignment).unwrap();
        let mut seen = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(60);
        while !reader_stop.load(Ordering::Relaxed) && Instant::now() < deadline {
            seen.extend(poll_records(
                &consumer,
                usize::MAX,
                Duration::from_millis(100),
            ));
        }
        seen
    });

    let mut written = 0;
    for round in 0..20 {
        let records: Vec<(Option<&str>, Option<String>)> =
            ["k0", "k1", "k2", "k3", "k4", "k5", "k6", "k7", "k8", "k9"]
                .iter()
                .map(|key| {
                    (
                        Some(*key),
                        Some(format!("{key}-r{round}-{}", "v".repeat(200))),
                    )
                })
                .collect();
        assert!(send(&producer, "changelog", &records).is_empty());
        written += records.len();
    }
    // k0 and k1 are deleted.
    assert!(
        send(
            &producer,
            "changelog",
            &[(Some("k0"), None), (Some("k1"), None)]
        )
        .is_empty()
    );
    written += 2;

    // Cleaned down to one record per key: 8 latest values and 2 tombstones.
    let deadline = Instant::now() + TIMEOUT;
    let mut cleaned = Vec::new();
    while Instant::now() < deadline {
        cleaned = read_from_start(&bootstrap, "changelog");
        if cleaned.len() <= 10 {
            break;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(
        cleaned.len() < written,
        "never cleaned: {} records",
        cleaned.len()
    );
    let latest = latest_per_key(&cleaned);
    assert_eq!(latest.len(), 10, "{cleaned:?}");
    for (key, value) in &latest {
        let key = String::from_utf8(key.clone()).unwrap();
        if key == "k0" || key == "k1" {
            assert!(value.is_empty(), "{key} should be a tombstone");
        } else {
            assert!(value.starts_with(format!("{key}-r19-").as_bytes()), "{key}");
        }
    }
    // Offsets were preserved: the surviving values sit where they were written.
    let offsets: Vec<i64> = cleaned.iter().map(|r| r.offset).collect();
    assert!(offsets.windows(2).all(|w| w[0] < w[1]));
    assert!(offsets.iter().all(|o| *o >= 190), "{offsets:?}");

    // After delete.retention.ms the tombstones are gone as well.
    let deadline = Instant::now() + TIMEOUT;
    let mut final_view = Vec::new();
    while Instant::now() < deadline {
        final_view = read_from_start(&bootstrap, "changelog");
        if final_view.len() == 8 {
            break;
        }
        std::thread::sleep(Duration::from_millis(300));
    }
    let latest = latest_per_key(&final_view);
    assert_eq!(final_view.len(), 8, "{final_view:?}");
    assert!(!latest.contains_key(b"k0".as_slice()) && !latest.contains_key(b"k1".as_slice()));

    // The consumer that read throughout saw offsets only grow and ended at every key's latest value.
    stop.store(true, Ordering::Relaxed);
    let seen = reader.join().unwrap();
    assert!(seen.windows(2).all(|w| w[0].offset < w[1].offset));
    let seen_latest = latest_per_key(&seen);
    for key in ["k2", "k3", "k4", "k5", "k6", "k7", "k8", "k9"] {
        assert!(
            seen_latest[key.as_bytes()].starts_with(format!("{key}-r19-").as_bytes()),
            "{key}"
        );
    }

    // A record without a key is refused (INVALID_RECORD), as Kafka refuses it.
    let errors = send(&producer, "changelog", &[(None, Some("no key".into()))]);
    assert_eq!(errors.len(), 1);
    assert!(
        errors[0].contains("Invalid record") || errors[0].contains("InvalidRecord"),
        "{errors:?}"
    );
}

#[test]
fn log_cleanup_policy_compact_is_the_broker_default() {
    let broker = Broker::start(1, &["log.cleanup.policy=compact"]);
    let bootstrap = broker.bootstrap();
    create_topic(&bootstrap, "defaulted", 1, &[]);
    let producer = producer(&bootstrap, &[("acks", "all")]);
    assert!(send(&producer, "defaulted", &[(Some("k"), Some("v".into()))]).is_empty());
    let errors = send(&producer, "defaulted", &[(None, Some("no key".into()))]);
    assert_eq!(errors.len(), 1, "a keyless record was accepted");
    // A topic may still opt out.
    create_topic(&bootstrap, "deleting", 1, &[("cleanup.policy", "delete")]);
    assert!(send(&producer, "deleting", &[(None, Some("no key".into()))]).is_empty());
}
