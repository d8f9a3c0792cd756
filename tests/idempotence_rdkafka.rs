//! librdkafka's idempotent producer (`enable.idempotence=true`) against the broker through a proxy
//! that loses or delays a fraction of Produce responses, so the client retries batches the broker
//! already stored: every record must be stored exactly once and in order per partition, also while
//! the broker is SIGKILLed and restarted mid-run. A control run without idempotence shows that the
//! same proxy does make a plain producer write duplicates, so the checks can fail.

mod support;

use std::collections::BTreeMap;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use rdkafka::Offset;
use rdkafka::consumer::Consumer;
use rdkafka::producer::{BaseProducer, BaseRecord, Producer};

use support::Broker;
use support::kafka::{DeliveryLog, consume, consumer, create_topic, producer};
use support::proxy::{FaultPlan, FaultProxy};

const PARTITIONS: i32 = 4;

fn seed() -> u64 {
    let seed = std::env::var("IDEMPOTENCE_SEED")
        .ok()
        .and_then(|text| text.parse().ok())
        .unwrap_or(0x5eed_1de4);
    eprintln!("IDEMPOTENCE_SEED={seed}");
    seed
}

/// The producer settings of the runs: many small batches, short request timeouts (the proxy's
/// delays exceed them), patient message timeouts (no record may be given up).
fn lossy_producer(bootstrap: &str, idempotent: bool) -> BaseProducer<DeliveryLog> {
    let idempotence = if idempotent { "true" } else { "false" };
    producer(
        bootstrap,
        &[
            ("enable.idempotence", idempotence),
            ("acks", "all"),
            ("max.in.flight.requests.per.connection", "5"),
            ("linger.ms", "2"),
            ("batch.num.messages", "25"),
            ("request.timeout.ms", "1500"),
            ("message.timeout.ms", "180000"),
            ("retry.backoff.ms", "20"),
            ("retry.backoff.max.ms", "200"),
            ("reconnect.backoff.ms", "10"),
            ("reconnect.backoff.max.ms", "200"),
        ],
    )
}

/// The payload of the `sequence`-th record sent to `partition`.
fn payload(partition: i32, sequence: usize) -> Vec<u8> {
    format!("{partition}:{sequence:07}").into_bytes()
}

fn parse_payload(value: &[u8]) -> (i32, usize) {
    let text = std::str::from_utf8(value).expect("utf-8 payload");
    let (partition, sequence) = text.split_once(':').expect("partition:sequence");
    (partition.parse().unwrap(), sequence.parse().unwrap())
}

/// Sends record `index` (round robin over the partitions) without waiting for it.
fn send(producer: &BaseProducer<DeliveryLog>, topic: &str, index: usize) {
    let partition = (index % PARTITIONS as usize) as i32;
    let value = payload(partition, index / PARTITIONS as usize);
    let mut record = BaseRecord::<(), Vec<u8>>::to(topic)
        .payload(&value)
        .partition(partition);
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        match producer.send(record) {
            Ok(()) => break,
            Err((error, returned)) => {
                assert!(Instant::now() < deadline, "send kept failing: {error}");
                producer.poll(Duration::from_millis(10));
                record = returned;
            }
        }
    }
    producer.poll(Duration::ZERO);
}

/// Flushes and checks that every record sent was acknowledged without error.
fn flush_all_acknowledged(producer: &BaseProducer<DeliveryLog>, sent: usize) {
    let deadline = Instant::now() + Duration::from_secs(180);
    while producer.in_flight_count() > 0 && Instant::now() < deadline {
        producer.poll(Duration::from_millis(100));
    }
    producer.flush(Duration::from_secs(10)).expect("flush");
    let reports = producer.context().reports.lock().unwrap().clone();
    assert_eq!(reports.len(), sent, "one delivery report per record");
    let failures: Vec<&String> = reports.iter().filter_map(|r| r.as_ref().err()).collect();
    assert!(
        failures.is_empty(),
        "undelivered: {:?}",
        &failures[..failures.len().min(5)]
    );
}

/// Reads every partition back (through the proxy) and returns, per partition, the sequence numbers
/// in offset order. Also checks the partitions hold exactly what was read: a duplicate past the
/// read would otherwise hide.
fn read_back(bootstrap: &str, topic: &str, expected: usize) -> BTreeMap<i32, Vec<usize>> {
    let consumer = consumer(bootstrap, &[]);
    let received = consume(
        &consumer,
        topic,
        PARTITIONS,
        Offset::Beginning,
        expected,
        Duration::from_secs(60),
    );
    let mut stored = 0i64;
    for partition in 0..PARTITIONS {
        let (low, high) = consumer
            .fetch_watermarks(topic, partition, Duration::from_secs(10))
            .expect("watermarks");
        stored += high - low;
    }
    let mut per_partition: BTreeMap<i32, Vec<(i64, usize)>> = BTreeMap::new();
    for record in &received {
        let (partition, sequence) = parse_payload(&record.value);
        assert_eq!(partition, record.partition, "record in the wrong partition");
        per_partition
            .entry(partition)
            .or_default()
            .push((record.offset, sequence));
    }
    assert_eq!(
        stored as usize,
        received.len(),
        "the partitions hold {stored} records but {} were read",
        received.len()
    );
    per_partition
        .into_iter()
        .map(|(partition, mut records)| {
            records.sort();
            (partition, records.into_iter().map(|(_, s)| s).collect())
        })
        .collect()
}

/// Every partition holds exactly its records 0..n, each once, in the order sent.
fn assert_exactly_once_in_order(per_partition: &BTreeMap<i32, Vec<usize>>, sent: usize) {
    let mut total = 0;
    for partition in 0..PARTITIONS {
        let expected: Vec<usize> = (0..sent)
            .filter(|index| (index % PARTITIONS as usize) as i32 == partition)
            .map(|index| index / PARTITIONS as usize)
            .collect();
        let got = per_partition.get(&partition).cloned().unwrap_or_default();
        if got != expected {
            let mut seen = std::collections::BTreeSet::new();
            let duplicates: Vec<usize> =
                got.iter().filter(|s| !seen.insert(**s)).copied().collect();
            let missing: Vec<usize> = expected
                .iter()
                .filter(|s| !seen.contains(s))
                .copied()
                .collect();
            panic!(
                "partition {partition}: {} stored, {} expected; duplicates {:?}, missing {:?}, in order: {}",
                got.len(),
                expected.len(),
                &duplicates[..duplicates.len().min(10)],
                &missing[..missing.len().min(10)],
                got.windows(2).all(|pair| pair[0] < pair[1])
            );
        }
        total += got.len();
    }
    assert_eq!(total, sent);
}

fn print_stats(proxy: &FaultProxy) {
    let stats = proxy.stats();
    eprintln!(
        "proxy: {} produce responses, {} dropped, {} delayed, {} connections",
        stats.produce_responses.load(Ordering::Relaxed),
        stats.dropped.load(Ordering::Relaxed),
        stats.delayed.load(Ordering::Relaxed),
        stats.connections.load(Ordering::Relaxed)
    );
}

/// Starts a 2-shard broker behind a proxy; the broker advertises the proxy's ports.
fn broker_behind(proxy: &FaultProxy, extra: &[&str]) -> Broker {
    let advertised = proxy.advertised_listeners();
    let mut overrides = vec![advertised.as_str()];
    overrides.extend_from_slice(extra);
    let broker = Broker::start(2, &overrides);
    proxy.set_upstream(broker.port);
    broker
}

#[test]
fn lost_and_late_produce_responses_leave_every_record_stored_exactly_once_in_order() {
    let proxy = FaultProxy::start(2, FaultPlan::none(seed()));
    let broker = broker_behind(&proxy, &[]);
    let bootstrap = proxy.bootstrap();
    create_topic(&bootstrap, "exactly-once", PARTITIONS, &[]);
    let producer = lossy_producer(&bootstrap, true);
    // The producer id is fetched before the faults start, so the run measures retries only.
    send(&producer, "exactly-once", 0);
    producer
        .flush(Duration::from_secs(30))
        .expect("first record");
    proxy.set_plan(FaultPlan {
        drop_fraction: 0.08,
        delay_fraction: 0.03,
        delay: Duration::from_millis(2_500),
        seed: seed(),
    });
    let total = 3_000;
    for index in 1..total {
        send(&producer, "exactly-once", index);
        if index % 200 == 0 {
            // Let requests go out in many small rounds, so there are many responses to lose.
            producer.poll(Duration::from_millis(30));
        }
    }
    flush_all_acknowledged(&producer, total);
    print_stats(&proxy);
    assert!(
        proxy.stats().dropped.load(Ordering::Relaxed) >= 1,
        "the proxy lost no response, so nothing was retried"
    );
    proxy.set_plan(FaultPlan::none(0));
    let stored = read_back(&bootstrap, "exactly-once", total);
    assert_exactly_once_in_order(&stored, total);
    drop(broker);
}

#[test]
fn without_idempotence_the_same_faults_do_write_duplicates() {
    let proxy = FaultProxy::start(2, FaultPlan::none(seed()));
    let _broker = broker_behind(&proxy, &[]);
    let bootstrap = proxy.bootstrap();
    create_topic(&bootstrap, "at-least-once", PARTITIONS, &[]);
    let producer = lossy_producer(&bootstrap, false);
    send(&producer, "at-least-once", 0);
    producer
        .flush(Duration::from_secs(30))
        .expect("first record");
    proxy.set_plan(FaultPlan {
        drop_fraction: 0.15,
        delay_fraction: 0.0,
        delay: Duration::ZERO,
        seed: seed(),
    });
    let total = 1_000;
    for index in 1..total {
        send(&producer, "at-least-once", index);
        if index % 100 == 0 {
            producer.poll(Duration::from_millis(30));
        }
    }
    flush_all_acknowledged(&producer, total);
    print_stats(&proxy);
    proxy.set_plan(FaultPlan::none(0));
    let consumer = consumer(&bootstrap, &[]);
    let mut stored = 0;
    for partition in 0..PARTITIONS {
        let (low, high) = consumer
            .fetch_watermarks("at-least-once", partition, Duration::from_secs(10))
            .unwrap();
        stored += (high - low) as usize;
    }
    assert!(
        proxy.stats().dropped.load(Ordering::Relaxed) >= 1,
        "the proxy lost no response"
    );
    assert!(
        stored > total,
        "a plain producer retrying lost responses should store duplicates: {stored} stored, {total} sent"
    );
}

#[test]
fn sigkill_and_restart_mid_run_lose_no_acknowledged_record_and_duplicate_none() {
    let proxy = FaultProxy::start(2, FaultPlan::none(seed()));
    let advertised = proxy.advertised_listeners();
    // Small segments, so the log rolls (and snapshots) during the run.
    let overrides = [advertised.as_str(), "log.segment.bytes=65536"];
    let mut broker = Broker::start(2, &overrides);
    proxy.set_upstream(broker.port);
    let data_dir = broker.data_dir.clone();
    let bootstrap = proxy.bootstrap();
    create_topic(&bootstrap, "survives", PARTITIONS, &[]);
    let producer = lossy_producer(&bootstrap, true);
    send(&producer, "survives", 0);
    producer
        .flush(Duration::from_secs(30))
        .expect("first record");
    proxy.set_plan(FaultPlan {
        drop_fraction: 0.05,
        delay_fraction: 0.0,
        delay: Duration::ZERO,
        seed: seed(),
    });

    let total = 4_000;
    let kills_at = [1_200, 2_600];
    let mut restarted = Vec::new();
    let mut held = 0;
    let mut index = 0;
    // Bounded: `index` grows by at least one per round up to `total`.
    while index + 1 < total {
        index += 1;
        send(&producer, "survives", index);
        if index % 100 == 0 {
            producer.poll(Duration::from_millis(20));
        }
        if kills_at.contains(&index) {
            // Hold back every Produce response for a while: the broker stores the next batches
            // but the producer hears nothing, so they are in flight when the broker dies and
            // their retries reach the restarted broker, which must recognise them from the
            // producer state it restored (snapshot plus log tail).
            proxy.set_plan(FaultPlan {
                drop_fraction: 0.0,
                delay_fraction: 1.0,
                delay: Duration::from_secs(5),
                seed: seed(),
            });
            let held_from = proxy.stats().delayed.load(Ordering::Relaxed);
            for extra in 0..100 {
                send(&producer, "survives", index + 1 + extra);
            }
            let deadline = Instant::now() + Duration::from_secs(5);
            while proxy.stats().delayed.load(Ordering::Relaxed) == held_from
                && Instant::now() < deadline
            {
                producer.poll(Duration::from_millis(20));
            }
            producer.poll(Duration::from_millis(200));
            held += proxy.stats().delayed.load(Ordering::Relaxed) - held_from;
            broker.kill();
            proxy.cut_all_connections();
            let replacement = Broker::start_on(&data_dir, 2, &overrides);
            proxy.set_upstream(replacement.port);
            proxy.set_plan(FaultPlan {
                drop_fraction: 0.05,
                delay_fraction: 0.0,
                delay: Duration::ZERO,
                seed: seed(),
            });
            // The first broker owns the data dir's temp directory; keep it alive.
            restarted.push(std::mem::replace(&mut broker, replacement));
            index += 100;
        }
    }
    flush_all_acknowledged(&producer, total);
    print_stats(&proxy);
    assert!(
        held >= 2,
        "only {held} Produce responses were held across the kills"
    );
    proxy.set_plan(FaultPlan::none(0));
    let stored = read_back(&bootstrap, "survives", total);
    assert_exactly_once_in_order(&stored, total);
    drop(broker);
    drop(restarted);
}
