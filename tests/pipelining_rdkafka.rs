//! Pipelined requests on one connection (issue 12), against an in-process broker whose partition
//! logs go through a fault-injecting `storage::Disk`: replies leave in request order under mixed
//! Produce/Fetch/Metadata traffic (raw frames for the exact order, librdkafka for real clients),
//! produce requests of one connection are appended in request order (an idempotent producer with
//! five requests in flight stores everything once and in order), one fdatasync covers the appends
//! of several in-flight requests, and acks=all still answers only after its fdatasync: a failing
//! one fails every request it covered.

mod support;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::rc::Rc;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use kafka_protocol::messages::fetch_request::{FetchPartition, FetchTopic};
use kafka_protocol::messages::produce_request::{PartitionProduceData, TopicProduceData};
use kafka_protocol::messages::{
    ApiKey, ApiVersionsRequest, FetchRequest, InitProducerIdRequest, InitProducerIdResponse,
    MetadataRequest, ProduceRequest, ProduceResponse, RequestHeader, ResponseHeader, TopicName,
};
use kafka_protocol::protocol::{Decodable, Encodable, StrBytes};
use rdkafka::consumer::Consumer;
use rdkafka::producer::{BaseRecord, Producer};
use ringbroker::broker::BrokerFactory;
use ringbroker::config::{Config, Endpoint};
use ringbroker::node::Node;
use ringbroker::storage::testing::{build_batch, build_idempotent_batch};
use ringbroker::storage::{Disk, Fault, FaultInjector, IoKind};

use support::kafka::{consumer, create_topic, poll_records, producer, records};

const IO_TIMEOUT: Duration = Duration::from_secs(20);

/// The test's handle on the shard's fault injector, which lives on the shard thread: a small task
/// there publishes the fdatasync count and arms the fault when asked.
#[derive(Default)]
struct DiskControl {
    syncs: AtomicU64,
    fail_syncs: AtomicBool,
    stop: AtomicBool,
}

struct TestBroker {
    node: Option<Node>,
    control: Arc<DiskControl>,
    _dir: tempfile::TempDir,
}

impl TestBroker {
    /// One shard, so every partition and every request lives on the same shard and connection.
    fn start() -> TestBroker {
        let dir = tempfile::tempdir().unwrap();
        let mut config = Config::defaults();
        config.listener = Endpoint {
            host: "127.0.0.1".into(),
            port: 0,
        };
        config.advertised_listener = config.listener.clone();
        config.log_dir = dir.path().join("data");
        config.shard_count = 1;
        config.shutdown_timeout_ms = 5_000;
        let control = Arc::new(DiskControl::default());
        let shard_control = control.clone();
        let factory = BrokerFactory::with_disk(Arc::new(move |_shard| {
            let injector = FaultInjector::new();
            watch_disk(injector.clone(), shard_control.clone());
            Disk::with_faults(injector)
        }));
        let node = Node::start(config, factory).expect("broker starts");
        TestBroker {
            node: Some(node),
            control,
            _dir: dir,
        }
    }

    fn addr(&self) -> SocketAddr {
        self.node.as_ref().unwrap().listen_addrs()[0]
    }

    fn bootstrap(&self) -> String {
        self.addr().to_string()
    }

    fn syncs(&self) -> u64 {
        // The watcher publishes every few milliseconds; wait for a fresh figure.
        std::thread::sleep(Duration::from_millis(30));
        self.control.syncs.load(Ordering::SeqCst)
    }
}

impl Drop for TestBroker {
    fn drop(&mut self) {
        self.control.stop.store(true, Ordering::SeqCst);
        if let Some(node) = self.node.take() {
            if std::thread::panicking() {
                // A failed assertion is the report; stopping shards mid-test could abort it.
                std::mem::forget(node);
            } else {
                let _ = node.shutdown();
            }
        }
    }
}

/// Runs on the shard thread until the broker stops: publishes the fdatasync count and, once the
/// test asks, makes every later fdatasync fail with EIO.
fn watch_disk(injector: Rc<FaultInjector>, control: Arc<DiskControl>) {
    compio::runtime::spawn(async move {
        let mut armed = false;
        while !control.stop.load(Ordering::SeqCst) {
            control
                .syncs
                .store(injector.count(IoKind::Sync), Ordering::SeqCst);
            if !armed && control.fail_syncs.load(Ordering::SeqCst) {
                injector.inject(IoKind::Sync, 0, Fault::Errno(libc::EIO), u64::MAX);
                armed = true;
            }
            compio::time::sleep(Duration::from_millis(2)).await;
        }
    })
    .detach();
}

/// A raw Kafka connection that writes many requests before reading any answer.
struct RawClient {
    stream: TcpStream,
    next_correlation_id: i32,
    /// (correlation id, api key, version) of each request sent, in order.
    sent: Vec<(i32, ApiKey, i16)>,
}

impl RawClient {
    fn connect(addr: SocketAddr) -> RawClient {
        let stream = TcpStream::connect(addr).unwrap();
        stream.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
        stream.set_write_timeout(Some(IO_TIMEOUT)).unwrap();
        RawClient {
            stream,
            next_correlation_id: 1,
            sent: Vec::new(),
        }
    }

    /// Encodes one request frame (not sent yet).
    fn frame<Req: Encodable>(&mut self, api_key: ApiKey, version: i16, body: &Req) -> Vec<u8> {
        let correlation_id = self.next_correlation_id;
        self.next_correlation_id += 1;
        let mut buf = BytesMut::new();
        RequestHeader::default()
            .with_request_api_key(api_key as i16)
            .with_request_api_version(version)
            .with_correlation_id(correlation_id)
            .with_client_id(Some(StrBytes::from_static_str("pipelining-test")))
            .encode(&mut buf, api_key.request_header_version(version))
            .unwrap();
        body.encode(&mut buf, version).unwrap();
        let mut frame = (buf.len() as i32).to_be_bytes().to_vec();
        frame.extend_from_slice(&buf);
        self.sent.push((correlation_id, api_key, version));
        frame
    }

    /// Reads one response and returns its correlation id and body (header removed).
    fn receive(&mut self, api_key: ApiKey, version: i16) -> (i32, Bytes) {
        let mut size = [0u8; 4];
        self.stream.read_exact(&mut size).expect("a response");
        let mut response = vec![0u8; i32::from_be_bytes(size) as usize];
        self.stream.read_exact(&mut response).unwrap();
        let mut response = Bytes::from(response);
        let header =
            ResponseHeader::decode(&mut response, api_key.response_header_version(version))
                .unwrap();
        (header.correlation_id, response)
    }
}

fn produce_request(topic: &str, acks: i16, batch: Vec<u8>) -> ProduceRequest {
    ProduceRequest::default()
        .with_acks(acks)
        .with_timeout_ms(10_000)
        .with_topic_data(vec![
            TopicProduceData::default()
                .with_name(TopicName(StrBytes::from_string(topic.to_string())))
                .with_partition_data(vec![
                    PartitionProduceData::default()
                        .with_index(0)
                        .with_records(Some(Bytes::from(batch))),
                ]),
        ])
}

/// (error code, base offset) of the one partition of a produce response.
fn produce_result(mut body: Bytes, version: i16) -> (i16, i64) {
    let response = ProduceResponse::decode(&mut body, version).unwrap();
    let partition = &response.responses[0].partition_responses[0];
    (partition.error_code, partition.base_offset)
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64
}

#[test]
fn replies_keep_request_order_across_produce_fetch_and_metadata() {
    let broker = TestBroker::start();
    create_topic(&broker.bootstrap(), "ordered", 1, &[]);
    create_topic(&broker.bootstrap(), "idle", 1, &[]);
    let mut client = RawClient::connect(broker.addr());
    let init = client.frame(
        ApiKey::InitProducerId,
        1,
        &InitProducerIdRequest::default()
            .with_transactional_id(None)
            .with_transaction_timeout_ms(-1),
    );
    client.stream.write_all(&init).unwrap();
    let (_, mut body) = client.receive(ApiKey::InitProducerId, 1);
    let init = InitProducerIdResponse::decode(&mut body, 1).unwrap();
    assert_eq!(init.error_code, 0);
    let producer = (init.producer_id.0, init.producer_epoch);
    client.sent.clear();

    // A fetch that long-polls 300 ms on an empty partition comes first; behind it, idempotent
    // acks=all produce requests (each must be appended after the one before, or its sequence is
    // out of order), metadata and ApiVersions requests, all written before any answer is read.
    let fetch = FetchRequest::default()
        .with_replica_id(kafka_protocol::messages::BrokerId(-1))
        .with_max_wait_ms(300)
        .with_min_bytes(1)
        .with_max_bytes(1 << 20)
        .with_topics(vec![
            FetchTopic::default()
                .with_topic(TopicName(StrBytes::from_static_str("idle")))
                .with_partitions(vec![
                    FetchPartition::default()
                        .with_partition(0)
                        .with_fetch_offset(0)
                        .with_partition_max_bytes(1 << 20),
                ]),
        ]);
    let mut frames = client.frame(ApiKey::Fetch, 11, &fetch);
    let started = Instant::now();
    for sequence in 0..12 {
        let batch = build_idempotent_batch(5, 100, now_ms(), producer.0, producer.1, sequence * 5);
        let request = produce_request("ordered", -1, batch);
        frames.extend(client.frame(ApiKey::Produce, 8, &request));
        if sequence % 3 == 0 {
            let metadata = MetadataRequest::default().with_topics(None);
            frames.extend(client.frame(ApiKey::Metadata, 1, &metadata));
        }
        if sequence % 4 == 1 {
            frames.extend(client.frame(ApiKey::ApiVersions, 0, &ApiVersionsRequest::default()));
        }
    }
    client.stream.write_all(&frames).unwrap();

    let sent = client.sent.clone();
    let mut last_offset = -1;
    for (correlation_id, api_key, version) in sent {
        let (answered, body) = client.receive(api_key, version);
        assert_eq!(answered, correlation_id, "replies out of request order");
        if api_key == ApiKey::Produce {
            let (error, base_offset) = produce_result(body, version);
            assert_eq!(error, 0, "produce {correlation_id} failed");
            assert_eq!(
                base_offset,
                last_offset + 1,
                "appended out of request order"
            );
            last_offset = base_offset + 4;
        }
    }
    // The fetch really waited, and everything behind it was answered after it.
    assert!(started.elapsed() >= Duration::from_millis(250));
    assert_eq!(last_offset, 59);
}

#[test]
fn one_fdatasync_covers_several_requests_of_one_connection() {
    let broker = TestBroker::start();
    create_topic(&broker.bootstrap(), "grouped", 1, &[]);
    let mut client = RawClient::connect(broker.addr());
    let requests = 40;
    let mut frames = Vec::new();
    for seed in 0..requests {
        let request = produce_request("grouped", -1, build_batch(4, 1_000, now_ms(), seed));
        frames.extend(client.frame(ApiKey::Produce, 8, &request));
    }
    let syncs_before = broker.syncs();
    client.stream.write_all(&frames).unwrap();
    for (correlation_id, api_key, version) in client.sent.clone() {
        let (answered, body) = client.receive(api_key, version);
        assert_eq!(answered, correlation_id);
        assert_eq!(produce_result(body, version).0, 0);
    }
    let syncs = broker.syncs() - syncs_before;
    // Answered one at a time, each request would wait for an fdatasync of its own.
    assert!(
        syncs < requests / 2,
        "{syncs} fdatasyncs for {requests} pipelined acks=all requests"
    );
}

#[test]
fn idempotent_producer_with_five_in_flight_stores_everything_once_and_in_order() {
    let broker = TestBroker::start();
    let bootstrap = broker.bootstrap();
    create_topic(&bootstrap, "idem", 1, &[]);
    // Small batches and no linger: many produce requests, up to five in flight on the connection,
    // with metadata refreshes mixed in.
    let producer = producer(
        &bootstrap,
        &[
            ("enable.idempotence", "true"),
            ("acks", "all"),
            ("max.in.flight.requests.per.connection", "5"),
            ("linger.ms", "0"),
            ("batch.num.messages", "20"),
            ("topic.metadata.refresh.interval.ms", "100"),
        ],
    );
    let records = records(4_000, "idem");
    for (key, value) in &records {
        let mut pending = BaseRecord::to("idem")
            .key(key.as_ref().unwrap())
            .payload(value)
            .partition(0);
        let deadline = Instant::now() + IO_TIMEOUT;
        loop {
            match producer.send(pending) {
                Ok(()) => break,
                Err((error, returned)) => {
                    assert!(Instant::now() < deadline, "send kept failing: {error}");
                    producer.poll(Duration::from_millis(5));
                    pending = returned;
                }
            }
        }
        producer.poll(Duration::ZERO);
    }
    producer.flush(Duration::from_secs(30)).expect("flush");
    let reports = producer.context().reports.lock().unwrap().clone();
    assert_eq!(reports.len(), records.len());
    assert!(reports.iter().all(Result::is_ok), "a delivery failed");

    // A group consumer (fetch, heartbeat, offset commit and metadata on its connections) reads
    // everything back: once each, in the order produced.
    let consumer = consumer(
        &bootstrap,
        &[
            ("group.id", "pipelining"),
            ("auto.offset.reset", "earliest"),
            ("enable.auto.commit", "true"),
            ("auto.commit.interval.ms", "50"),
            ("topic.metadata.refresh.interval.ms", "100"),
        ],
    );
    consumer.subscribe(&["idem"]).unwrap();
    let received = poll_records(&consumer, records.len(), IO_TIMEOUT);
    assert_eq!(received.len(), records.len(), "records missing");
    for (position, record) in received.iter().enumerate() {
        assert_eq!(record.offset, position as i64);
        assert_eq!(record.value, records[position].1, "offset {position}");
    }
}

#[test]
fn a_failed_fdatasync_fails_every_pipelined_request_it_covered() {
    let broker = TestBroker::start();
    let bootstrap = broker.bootstrap();
    create_topic(&broker.bootstrap(), "synced", 1, &[]);
    let producer = producer(
        &bootstrap,
        &[
            ("acks", "all"),
            ("max.in.flight.requests.per.connection", "5"),
            ("linger.ms", "0"),
            ("batch.num.messages", "1"),
            ("message.timeout.ms", "3000"),
        ],
    );
    let before = records(10, "before");
    support::kafka::produce_all(&producer, "synced", Some(0), &before);

    // From now on every fdatasync fails: no acks=all produce may be acknowledged.
    broker.control.fail_syncs.store(true, Ordering::SeqCst);
    let syncs_before = broker.syncs();
    let after = records(30, "after");
    let first_report = producer.context().reports.lock().unwrap().len();
    for (key, value) in &after {
        producer
            .send(
                BaseRecord::to("synced")
                    .key(key.as_ref().unwrap())
                    .payload(value)
                    .partition(0),
            )
            .unwrap();
    }
    let _ = producer.flush(Duration::from_secs(10));
    let reports = producer.context().reports.lock().unwrap()[first_report..].to_vec();
    assert_eq!(reports.len(), after.len());
    for report in &reports {
        assert!(
            report.is_err(),
            "acknowledged although its fdatasync failed: {report:?}"
        );
    }
    assert!(broker.syncs() > syncs_before, "no fdatasync was attempted");
}
