//! The librdkafka driver: the same open-loop schedule and the same metrics as the native
//! driver, through `rdkafka`'s BaseProducer/BaseConsumer on plain threads, so results show what
//! users of librdkafka-based clients would see.

use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context as _, anyhow, bail};
use rdkafka::ClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::KafkaError;
use rdkafka::message::{Header, Message, OwnedHeaders};
use rdkafka::producer::{BaseProducer, BaseRecord, DeliveryResult, Producer, ProducerContext};
use rdkafka::types::RDKafkaErrorCode;
use rdkafka::{Offset, TopicPartitionList};

use crate::driver::{ConsumerSpec, Control, ProducerSpec, RecordSource, RunClock};
use crate::metrics::{IntervalMetrics, Meter, record_clamped};
use crate::wire::value_timestamp_us;
use crate::workload::{TIMESTAMP_BYTES, partition_for_key};

/// librdkafka's version string, for the report.
pub fn librdkafka_version() -> String {
    rdkafka::util::get_rdkafka_version().1
}

/// Longest a producer thread sleeps between schedule checks, so delivery callbacks are served
/// promptly (they run inside `poll`).
const MAX_SLEEP: Duration = Duration::from_micros(500);

struct DeliveryContext {
    meter: Meter,
    clock: RunClock,
}

impl ClientContext for DeliveryContext {}

impl ProducerContext for DeliveryContext {
    /// The intended send time in µs since the epoch travels as the opaque.
    type DeliveryOpaque = usize;

    fn delivery(&self, result: &DeliveryResult<'_>, intended_us: usize) {
        let now_us = self.clock.now_epoch_us();
        let stale = self.meter.is_stale(intended_us as u64);
        self.meter.with(|m| match result {
            Ok(message) => {
                m.published_records += 1;
                if stale {
                    m.stale_published_records += 1;
                }
                m.published_bytes += message.payload_len() as u64;
                // With acks=0 librdkafka reports delivery once the request is written, which is
                // where the native driver ends acks=0 latency too.
                record_clamped(
                    &mut m.publish_latency_us,
                    now_us.saturating_sub(intended_us as u64),
                );
            }
            Err(_) => m.publish_errors += 1,
        });
    }
}

fn producer_config(spec: &ProducerSpec) -> ClientConfig {
    let w = &spec.workload;
    let mut config = ClientConfig::new();
    config
        .set("bootstrap.servers", &spec.bootstrap)
        .set(
            "client.id",
            format!("ringbench-rdkafka-producer-{}", spec.id),
        )
        .set("acks", w.acks.to_string())
        .set("linger.ms", format!("{}", w.linger_ms))
        .set("batch.size", w.batch_size_bytes.to_string())
        .set("compression.codec", w.compression.name())
        .set(
            "queue.buffering.max.kbytes",
            (w.producer_buffer_bytes / 1024).max(1).to_string(),
        )
        .set("queue.buffering.max.messages", "2147483647")
        .set(
            "max.in.flight.requests.per.connection",
            w.max_in_flight_per_connection.to_string(),
        )
        .set("enable.idempotence", "false")
        .set("request.timeout.ms", w.request_timeout_ms.to_string())
        // Kafka's Java default partitioner, so keyed records land where the native driver puts them.
        .set("partitioner", "murmur2_random");
    config
}

/// Runs one librdkafka producer on the calling thread until `control` says stop.
pub fn run_producer(
    spec: ProducerSpec,
    control: Arc<Control>,
    meter: Meter,
    clock: RunClock,
) -> anyhow::Result<()> {
    let w = spec.workload.clone();
    let context = DeliveryContext {
        meter: meter.clone(),
        clock,
    };
    let producer: BaseProducer<DeliveryContext> = producer_config(&spec)
        .create_with_context(context)
        .context("creating librdkafka producer")?;
    // Fetch metadata once so the first records are not delayed by the initial lookup.
    producer
        .client()
        .fetch_metadata(Some(&spec.topic), Duration::from_secs(30))
        .with_context(|| format!("metadata for {}", spec.topic))?;
    control.mark_ready();

    let mut source = RecordSource::new(&w, spec.id);
    let filler = source.filler.clone();
    let mut value = vec![0u8; w.record_size.max_bytes() as usize];
    let headers_template = source.headers.clone();
    let mut generation = control.generation();
    let mut next_intended_ns = clock.now_ns();
    let mut granted = 0u64;
    let mut pending_record: Option<(u64, usize, Option<[u8; 8]>)> = None;

    while !control.stopped() {
        producer.poll(Duration::ZERO);
        let period = control.period_ns();
        let now = clock.now_ns();
        if control.generation() != generation {
            generation = control.generation();
            next_intended_ns = next_intended_ns.max(now);
            pending_record = None;
        }
        let mut queue_full = false;
        let mut delays: Vec<u64> = Vec::new();
        while period > 0 && next_intended_ns <= now && delays.len() < 4096 {
            let (intended_us, size, key) = match pending_record.take() {
                Some(r) => r,
                None => {
                    if granted == 0 {
                        granted = control.take_budget(1024);
                        if granted == 0 {
                            break;
                        }
                    }
                    granted -= 1;
                    (
                        clock.epoch_us(next_intended_ns),
                        source.next_size(),
                        source.next_key(),
                    )
                }
            };
            value[..TIMESTAMP_BYTES].copy_from_slice(&intended_us.to_be_bytes());
            value[TIMESTAMP_BYTES..size].copy_from_slice(&filler[..size - TIMESTAMP_BYTES]);
            let mut record: BaseRecord<'_, [u8], [u8], usize> =
                BaseRecord::with_opaque_to(&spec.topic, intended_us as usize)
                    .payload(&value[..size]);
            if let Some(k) = key.as_ref() {
                record = record
                    .key(&k[..])
                    .partition(partition_for_key(k, spec.partitions) as i32);
            }
            if !headers_template.is_empty() {
                let mut headers = OwnedHeaders::new_with_capacity(headers_template.len());
                for h in &headers_template {
                    let key = std::str::from_utf8(&h.key).unwrap_or("hdr");
                    headers = headers.insert(Header {
                        key,
                        value: Some(&h.value[..]),
                    });
                }
                record = record.headers(headers);
            }
            match producer.send(record) {
                Ok(()) => {
                    delays.push(clock.now_epoch_us().saturating_sub(intended_us));
                    next_intended_ns += period;
                }
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), _)) => {
                    // The client's buffer is full: keep this record (with its intended time)
                    // and retry after serving callbacks. Its latency grows by the wait.
                    pending_record = Some((intended_us, size, key));
                    queue_full = true;
                    break;
                }
                Err((e, _)) => bail!("producer {}: send failed: {e}", spec.id),
            }
        }
        if !delays.is_empty() {
            meter.with(|m| {
                for d in &delays {
                    record_clamped(&mut m.publish_delay_us, *d);
                }
            });
        }
        if queue_full {
            producer.poll(Duration::from_millis(1));
            continue;
        }
        let now = clock.now_ns();
        let wait = if period > 0 && next_intended_ns > now {
            Duration::from_nanos(next_intended_ns - now).min(MAX_SLEEP)
        } else if period == 0 || (granted == 0 && control.budget_exhausted()) {
            // Nothing to create (rate 0, or the `--records` budget is spent): serve callbacks.
            MAX_SLEEP
        } else {
            Duration::ZERO
        };
        if !wait.is_zero() {
            producer.poll(wait);
        }
    }
    // Give records already handed to librdkafka a bounded time to be acknowledged.
    producer
        .flush(Duration::from_secs(10))
        .map_err(|e| anyhow!("producer {}: flush failed: {e}", spec.id))?;
    Ok(())
}

/// Runs one librdkafka consumer on the calling thread until `control` says stop.
pub fn run_consumer(
    spec: ConsumerSpec,
    control: Arc<Control>,
    meter: Meter,
    clock: RunClock,
) -> anyhow::Result<()> {
    let w = &spec.workload;
    let mut config = ClientConfig::new();
    config
        .set("bootstrap.servers", &spec.bootstrap)
        .set(
            "client.id",
            format!("ringbench-rdkafka-consumer-{}", spec.id),
        )
        .set("fetch.wait.max.ms", w.fetch_max_wait_ms.to_string())
        .set("fetch.max.bytes", w.fetch_max_bytes.to_string())
        .set(
            "max.partition.fetch.bytes",
            w.fetch_partition_max_bytes.to_string(),
        )
        .set("fetch.min.bytes", "1")
        // Topics are fresh per run, so the beginning is exactly this run's data; reading from
        // the end could skip records produced before the offset was resolved.
        .set("auto.offset.reset", "earliest")
        .set("enable.partition.eof", "false");
    let group = spec
        .group
        .clone()
        .unwrap_or_else(|| format!("ringbench-manual-{}", spec.id));
    config.set("group.id", &group);
    let consumer: BaseConsumer = config.create().context("creating librdkafka consumer")?;
    if spec.group.is_some() {
        consumer
            .subscribe(&[&spec.topic])
            .with_context(|| format!("subscribing to {}", spec.topic))?;
        // Join before declaring ready, so the group's first rebalance is not inside the run.
        let deadline = clock.now_ns() + 30_000_000_000;
        while clock.now_ns() < deadline && !control.stopped() {
            if let Some(Err(e)) = consumer.poll(Duration::from_millis(100)) {
                bail!("consumer {}: {e}", spec.id);
            }
            if consumer
                .assignment()
                .map(|a| a.count() > 0)
                .unwrap_or(false)
            {
                break;
            }
        }
    } else {
        let mut list = TopicPartitionList::new();
        for &p in &spec.assigned {
            list.add_partition_offset(&spec.topic, p, Offset::Beginning)?;
        }
        consumer.assign(&list).context("assigning partitions")?;
    }
    control.mark_ready();
    while !control.consumers_enabled() && !control.stopped() {
        // Keep the group session alive while paused (backlog mode) without reading records.
        std::thread::sleep(Duration::from_millis(20));
    }
    let mut local = IntervalMetrics::default();
    let mut last_flush = clock.now_ns();
    while !control.stopped() {
        match consumer.poll(Duration::from_millis(50)) {
            Some(Ok(message)) => {
                let now_us = clock.now_epoch_us();
                if let Some(payload) = message.payload() {
                    local.consumed_records += 1;
                    local.consumed_bytes += payload.len() as u64;
                    if let Some(sent) = value_timestamp_us(payload) {
                        record_clamped(
                            &mut local.end_to_end_latency_us,
                            now_us.saturating_sub(sent),
                        );
                    }
                }
            }
            Some(Err(e)) => bail!("consumer {}: {e}", spec.id),
            None => {}
        }
        let now = clock.now_ns();
        if now - last_flush > 10_000_000 && local.consumed_records > 0 {
            meter.with(|m| m.merge(&local));
            local.reset();
            last_flush = now;
        }
    }
    meter.with(|m| m.merge(&local));
    Ok(())
}
