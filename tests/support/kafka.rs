//! Test support: producing and consuming through librdkafka (the `rdkafka` crate), synchronously.
#![allow(dead_code)]

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rdkafka::ClientContext;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{DeliveryResult, Headers, Message};
use rdkafka::producer::{BaseProducer, BaseRecord, Producer, ProducerContext};
use rdkafka::{Offset, TopicPartitionList};

/// One record as a consumer saw it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Received {
    pub partition: i32,
    pub offset: i64,
    pub key: Option<Vec<u8>>,
    pub value: Vec<u8>,
    pub timestamp_ms: Option<i64>,
    pub headers: Vec<(String, Vec<u8>)>,
}

/// Where a record landed (partition, offset), or why it was not delivered.
pub type DeliveryReport = Result<(i32, i64), String>;

/// Collects every delivery report: (partition, offset) or the error text.
#[derive(Clone, Default)]
pub struct DeliveryLog {
    pub reports: Arc<Mutex<Vec<DeliveryReport>>>,
}

impl ClientContext for DeliveryLog {}

impl ProducerContext for DeliveryLog {
    type DeliveryOpaque = ();
    fn delivery(&self, result: &DeliveryResult<'_>, _: ()) {
        let report = match result {
            Ok(message) => Ok((message.partition(), message.offset())),
            Err((error, _)) => Err(error.to_string()),
        };
        self.reports.lock().unwrap().push(report);
    }
}

pub fn producer(bootstrap: &str, extra: &[(&str, &str)]) -> BaseProducer<DeliveryLog> {
    let mut config = ClientConfig::new();
    config
        .set("bootstrap.servers", bootstrap)
        .set("message.timeout.ms", "20000")
        .set("linger.ms", "5");
    for (key, value) in extra {
        config.set(*key, *value);
    }
    config
        .create_with_context(DeliveryLog::default())
        .expect("create producer")
}

/// Sends every (key, value) to `topic` (partition chosen by librdkafka unless `partition` is set),
/// flushes, and returns the delivery reports in completion order. Panics on any delivery error.
pub fn produce_all(
    producer: &BaseProducer<DeliveryLog>,
    topic: &str,
    partition: Option<i32>,
    records: &[(Option<Vec<u8>>, Vec<u8>)],
) -> Vec<(i32, i64)> {
    let before = producer.context().reports.lock().unwrap().len();
    for (key, value) in records {
        let mut record = BaseRecord::<Vec<u8>, Vec<u8>>::to(topic).payload(value);
        if let Some(key) = key {
            record = record.key(key);
        }
        if let Some(partition) = partition {
            record = record.partition(partition);
        }
        let mut pending = record;
        let deadline = Instant::now() + Duration::from_secs(20);
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
        producer.poll(Duration::ZERO);
    }
    producer.flush(Duration::from_secs(30)).expect("flush");
    let reports = producer.context().reports.lock().unwrap()[before..].to_vec();
    assert_eq!(
        reports.len(),
        records.len(),
        "one delivery report per record"
    );
    reports
        .into_iter()
        .map(|r| r.unwrap_or_else(|e| panic!("delivery failed: {e}")))
        .collect()
}

pub fn consumer(bootstrap: &str, extra: &[(&str, &str)]) -> BaseConsumer {
    let mut config = ClientConfig::new();
    config
        .set("bootstrap.servers", bootstrap)
        .set("group.id", "ringbroker-tests-unused")
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .set("fetch.wait.max.ms", "100");
    for (key, value) in extra {
        config.set(*key, *value);
    }
    config.create().expect("create consumer")
}

/// Reads from `topic`'s partitions `0..partitions` starting at `offset` until `expected` records have
/// arrived or `timeout` passes.
pub fn consume(
    consumer: &BaseConsumer,
    topic: &str,
    partitions: i32,
    offset: Offset,
    expected: usize,
    timeout: Duration,
) -> Vec<Received> {
    let mut assignment = TopicPartitionList::new();
    for partition in 0..partitions {
        assignment
            .add_partition_offset(topic, partition, offset)
            .unwrap();
    }
    consumer.assign(&assignment).expect("assign");
    poll_records(consumer, expected, timeout)
}

pub fn poll_records(consumer: &BaseConsumer, expected: usize, timeout: Duration) -> Vec<Received> {
    let deadline = Instant::now() + timeout;
    let mut received = Vec::new();
    while received.len() < expected && Instant::now() < deadline {
        match consumer.poll(Duration::from_millis(100)) {
            Some(Ok(message)) => received.push(Received {
                partition: message.partition(),
                offset: message.offset(),
                key: message.key().map(|k| k.to_vec()),
                value: message.payload().unwrap_or_default().to_vec(),
                timestamp_ms: message.timestamp().to_millis(),
                headers: message
                    .headers()
                    .map(|h| {
                        h.iter()
                            .map(|header| {
                                (
                                    header.key.to_string(),
                                    header.value.unwrap_or_default().to_vec(),
                                )
                            })
                            .collect()
                    })
                    .unwrap_or_default(),
            }),
            // End-of-partition events are informational; real errors fail the test.
            Some(Err(rdkafka::error::KafkaError::PartitionEOF(_))) => {}
            Some(Err(error)) => panic!("consumer error: {error}"),
            None => {}
        }
    }
    received
}

pub fn admin(bootstrap: &str) -> AdminClient<DefaultClientContext> {
    ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .create()
        .expect("create admin client")
}

/// Creates a topic through the Admin API and panics unless the broker reports success.
pub fn create_topic(bootstrap: &str, name: &str, partitions: i32, configs: &[(&str, &str)]) {
    let admin = admin(bootstrap);
    let mut topic = NewTopic::new(name, partitions, TopicReplication::Fixed(1));
    for (key, value) in configs {
        topic = topic.set(key, value);
    }
    let options = AdminOptions::new().operation_timeout(Some(Duration::from_secs(10)));
    let results =
        futures_executor::block_on(admin.create_topics([&topic], &options)).expect("create_topics");
    for result in results {
        result.unwrap_or_else(|(topic, code)| panic!("creating {topic} failed: {code:?}"));
    }
}

pub fn records(count: usize, prefix: &str) -> Vec<(Option<Vec<u8>>, Vec<u8>)> {
    (0..count)
        .map(|i| {
            (
                Some(format!("key-{i}").into_bytes()),
                format!("{prefix}-{i}").into_bytes(),
            )
        })
        .collect()
}
