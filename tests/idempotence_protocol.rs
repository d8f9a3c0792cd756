//! The idempotent producer at the protocol level, against the real broker binary with raw frames:
//! InitProducerId as aiokafka (v0), kafkajs (v1), librdkafka and the Java client (v2-v5) send it,
//! epoch bumps and fencing, ids that stay unique across shards and across a SIGKILL, the
//! transactional refusal, and Produce with idempotent batches: a retry answered with its first
//! offset and not stored twice, a sequence gap refused, an old epoch refused, and a retry after a
//! broker restart still recognised.

mod support;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use kafka_protocol::messages::produce_request::{PartitionProduceData, TopicProduceData};
use kafka_protocol::messages::{
    ApiKey, ApiVersionsRequest, ApiVersionsResponse, InitProducerIdRequest, InitProducerIdResponse,
    ProduceRequest, ProduceResponse, ProducerId, RequestHeader, ResponseHeader, TopicName,
    TransactionalId,
};
use kafka_protocol::protocol::{Decodable, Encodable, StrBytes};
use ringbroker::broker::topics::partition_owner;
use ringbroker::storage::testing::build_idempotent_batch;

use support::Broker;
use support::kafka::create_topic;

const NONE: i16 = 0;
const UNSUPPORTED_VERSION: i16 = 35;
const INVALID_REQUEST: i16 = 42;
const OUT_OF_ORDER_SEQUENCE_NUMBER: i16 = 45;
const INVALID_PRODUCER_EPOCH: i16 = 47;
const PRODUCER_FENCED: i16 = 90;

struct Client {
    stream: TcpStream,
    correlation_id: i32,
}

impl Client {
    fn connect(port: u16) -> Client {
        let stream = TcpStream::connect(("127.0.0.1", port)).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(15)))
            .unwrap();
        Client {
            stream,
            correlation_id: 0,
        }
    }

    /// Sends one request as a client of `version` would and returns the response body.
    fn call<Req: Encodable, Resp: Decodable>(
        &mut self,
        api_key: ApiKey,
        version: i16,
        body: &Req,
    ) -> Resp {
        self.correlation_id += 1;
        let mut buf = BytesMut::new();
        RequestHeader::default()
            .with_request_api_key(api_key as i16)
            .with_request_api_version(version)
            .with_correlation_id(self.correlation_id)
            .with_client_id(Some(StrBytes::from_static_str("idempotence-test")))
            .encode(&mut buf, api_key.request_header_version(version))
            .unwrap();
        body.encode(&mut buf, version).unwrap();
        let mut frame = (buf.len() as i32).to_be_bytes().to_vec();
        frame.extend_from_slice(&buf);
        self.stream.write_all(&frame).unwrap();

        let mut size = [0u8; 4];
        self.stream.read_exact(&mut size).expect("a response");
        let mut response = vec![0u8; i32::from_be_bytes(size) as usize];
        self.stream.read_exact(&mut response).unwrap();
        let mut response = Bytes::from(response);
        let header =
            ResponseHeader::decode(&mut response, api_key.response_header_version(version))
                .unwrap();
        assert_eq!(header.correlation_id, self.correlation_id);
        let decoded = Resp::decode(&mut response, version).unwrap();
        assert!(
            !response.has_remaining(),
            "{api_key:?} v{version}: trailing bytes"
        );
        decoded
    }

    fn init_producer_id(&mut self, version: i16, existing: Option<(i64, i16)>) -> (i16, i64, i16) {
        let mut request = InitProducerIdRequest::default()
            .with_transactional_id(None)
            .with_transaction_timeout_ms(-1);
        if let Some((id, epoch)) = existing {
            request = request
                .with_producer_id(ProducerId(id))
                .with_producer_epoch(epoch);
        }
        let response: InitProducerIdResponse = self.call(ApiKey::InitProducerId, version, &request);
        (
            response.error_code,
            response.producer_id.0,
            response.producer_epoch,
        )
    }

    /// Produces one idempotent batch (acks=all) and returns (error code, base offset).
    fn produce(
        &mut self,
        topic: &str,
        producer: (i64, i16),
        sequence: i32,
        count: i32,
    ) -> (i16, i64) {
        let batch = build_idempotent_batch(count, 50, now_ms(), producer.0, producer.1, sequence);
        let request = ProduceRequest::default()
            .with_acks(-1)
            .with_timeout_ms(10_000)
            .with_topic_data(vec![
                TopicProduceData::default()
                    .with_name(TopicName(StrBytes::from_string(topic.to_string())))
                    .with_partition_data(vec![
                        PartitionProduceData::default()
                            .with_index(0)
                            .with_records(Some(Bytes::from(batch))),
                    ]),
            ]);
        let response: ProduceResponse = self.call(ApiKey::Produce, 9, &request);
        let partition = &response.responses[0].partition_responses[0];
        (partition.error_code, partition.base_offset)
    }
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64
}

#[test]
fn init_producer_id_answers_every_version_and_bumps_fences_and_refuses_transactions() {
    let broker = Broker::start(2, &[]);
    let mut shard0 = Client::connect(broker.port);
    let mut shard1 = Client::connect(broker.port + 1);

    // ApiVersions advertises InitProducerId 0-5 (librdkafka enables idempotence only then) and no
    // transactional API.
    let versions: ApiVersionsResponse = shard0.call(
        ApiKey::ApiVersions,
        3,
        &ApiVersionsRequest::default()
            .with_client_software_name(StrBytes::from_static_str("test"))
            .with_client_software_version(StrBytes::from_static_str("1")),
    );
    let listed = |key: ApiKey| {
        versions
            .api_keys
            .iter()
            .find(|entry| entry.api_key == key as i16)
            .map(|entry| (entry.min_version, entry.max_version))
    };
    assert_eq!(listed(ApiKey::InitProducerId), Some((0, 5)));
    assert_eq!(listed(ApiKey::EndTxn), None);
    assert_eq!(listed(ApiKey::AddPartitionsToTxn), None);

    // aiokafka sends v0, kafkajs v1: no producer id in the request, a fresh id and epoch 0 back.
    let mut ids = Vec::new();
    for version in 0..=5 {
        for client in [&mut shard0, &mut shard1] {
            let (error, id, epoch) = client.init_producer_id(version, None);
            assert_eq!((error, epoch), (NONE, 0), "v{version}");
            assert!(id >= 0);
            ids.push(id);
        }
    }
    let mut unique = ids.clone();
    unique.sort();
    unique.dedup();
    assert_eq!(unique.len(), ids.len(), "ids handed out twice: {ids:?}");

    // v3+: a known producer re-initialising gets its epoch bumped (KIP-360); an older epoch is
    // fenced (PRODUCER_FENCED from v4, INVALID_PRODUCER_EPOCH before); the id from shard 1 is known
    // on shard 0 because one allocator serves both.
    let id = ids[1];
    assert_eq!(shard0.init_producer_id(3, Some((id, 0))), (NONE, id, 1));
    assert_eq!(shard1.init_producer_id(5, Some((id, 1))), (NONE, id, 2));
    assert_eq!(
        shard0.init_producer_id(4, Some((id, 1))),
        (PRODUCER_FENCED, -1, -1)
    );
    assert_eq!(
        shard0.init_producer_id(3, Some((id, 0))),
        (INVALID_PRODUCER_EPOCH, -1, -1)
    );
    // Id without epoch: Kafka's INVALID_REQUEST.
    assert_eq!(
        shard0.init_producer_id(4, Some((id, -1))),
        (INVALID_REQUEST, -1, -1)
    );

    // A transactional id: transactions are not implemented; the answer says so.
    let response: InitProducerIdResponse = shard0.call(
        ApiKey::InitProducerId,
        0,
        &InitProducerIdRequest::default()
            .with_transactional_id(Some(TransactionalId(StrBytes::from_static_str("tx-1"))))
            .with_transaction_timeout_ms(60_000),
    );
    assert_eq!(response.error_code, UNSUPPORTED_VERSION);
    assert_eq!(response.producer_id.0, -1);
}

#[test]
fn producer_ids_are_never_reused_after_sigkill() {
    let mut broker = Broker::start(1, &[]);
    let data_dir = broker.data_dir.clone();
    let before: Vec<i64> = (0..20)
        .map(|_| Client::connect(broker.port).init_producer_id(0, None).1)
        .collect();
    broker.kill();
    let restarted = Broker::start_on(&data_dir, 1, &[]);
    let after = Client::connect(restarted.port).init_producer_id(1, None).1;
    assert!(
        before.iter().all(|&id| id < after),
        "{after} reused or below {before:?}"
    );
}

#[test]
fn idempotent_produce_dedups_retries_and_refuses_gaps_and_old_epochs_across_a_restart() {
    let mut broker = Broker::start(2, &[]);
    let data_dir = broker.data_dir.clone();
    create_topic(&broker.bootstrap(), "idem", 1, &[]);
    let owner = partition_owner("idem", 0, 2) as u16;
    let mut init = Client::connect(broker.port);
    let (_, id, epoch) = init.init_producer_id(4, None);
    let mut client = Client::connect(broker.port + owner);

    assert_eq!(client.produce("idem", (id, epoch), 0, 3), (NONE, 0));
    assert_eq!(client.produce("idem", (id, epoch), 3, 2), (NONE, 3));
    // The retry of either batch: success with the offset it was first written at.
    assert_eq!(client.produce("idem", (id, epoch), 0, 3), (NONE, 0));
    assert_eq!(client.produce("idem", (id, epoch), 3, 2), (NONE, 3));
    // A gap.
    assert_eq!(
        client.produce("idem", (id, epoch), 9, 1).0,
        OUT_OF_ORDER_SEQUENCE_NUMBER
    );
    assert_eq!(client.produce("idem", (id, epoch), 5, 1), (NONE, 5));

    // SIGKILL: the retry of the last batch is still recognised after recovery.
    broker.kill();
    let broker = Broker::start_on(&data_dir, 2, &[]);
    let mut client = Client::connect(broker.port + owner);
    assert_eq!(client.produce("idem", (id, epoch), 5, 1), (NONE, 5));
    assert_eq!(client.produce("idem", (id, epoch), 3, 2), (NONE, 3));
    assert_eq!(client.produce("idem", (id, epoch), 6, 1), (NONE, 6));

    // A bumped epoch starts at 0; then the old epoch is refused.
    let mut init = Client::connect(broker.port);
    let (error, new_id, new_epoch) = init.init_producer_id(4, Some((id, epoch)));
    // The allocator forgot ids across the restart: Kafka's answer then is a fresh id.
    assert_eq!(error, NONE);
    assert_eq!(client.produce("idem", (new_id, new_epoch), 0, 1), (NONE, 7));
    assert_eq!(client.produce("idem", (id, epoch + 1), 0, 1), (NONE, 8));
    assert_eq!(
        client.produce("idem", (id, epoch), 7, 1).0,
        INVALID_PRODUCER_EPOCH
    );
    assert_eq!(client.produce("idem", (id, epoch + 1), 1, 1), (NONE, 9));
    // The log holds each batch once: the log end is where the accepted batches put it.
    assert_eq!(client.produce("idem", (id, epoch + 1), 2, 1), (NONE, 10));
}

#[test]
fn an_idle_producer_expires_and_may_then_start_at_any_sequence() {
    // Kafka's behaviour for a producer the partition no longer knows: its batches are accepted
    // whatever their sequence (KIP-360). Before the expiry the same batch is a gap.
    let broker = Broker::start(
        1,
        &[
            "producer.id.expiration.ms=1000",
            "producer.id.expiration.check.interval.ms=100",
        ],
    );
    create_topic(&broker.bootstrap(), "expiring", 1, &[]);
    let mut client = Client::connect(broker.port);
    let (_, id, epoch) = client.init_producer_id(4, None);
    assert_eq!(client.produce("expiring", (id, epoch), 0, 1), (NONE, 0));
    assert_eq!(
        client.produce("expiring", (id, epoch), 50, 1).0,
        OUT_OF_ORDER_SEQUENCE_NUMBER
    );
    // Bounded wait: the batch's timestamp is now, the expiration 1 s, the check every 100 ms.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let mut result = (OUT_OF_ORDER_SEQUENCE_NUMBER, -1);
    while std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(200));
        result = client.produce("expiring", (id, epoch), 50, 1);
        if result.0 == NONE {
            break;
        }
    }
    assert_eq!(result, (NONE, 1), "the producer never expired");
}
