//! Bad input on the wire: oversized, truncated and garbage frames, huge array counts, unknown API keys
//! and versions. The broker answers with an error or closes that one connection; it keeps serving
//! every other client, and stored data stays intact (checked with librdkafka afterwards).

mod support;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use bytes::{Buf, BufMut, Bytes, BytesMut};
use kafka_protocol::messages::{ApiKey, ApiVersionsResponse, RequestHeader, ResponseHeader};
use kafka_protocol::protocol::{Decodable, Encodable, StrBytes};
use rdkafka::Offset;

use support::Broker;
use support::kafka::{consume, consumer, create_topic, produce_all, producer, records};

fn connect(broker: &Broker) -> TcpStream {
    let stream = TcpStream::connect(broker.bootstrap()).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    stream
}

/// Reads one response frame, or `None` if the broker closed the connection.
fn read_frame(stream: &mut TcpStream) -> Option<Bytes> {
    let mut size = [0u8; 4];
    stream.read_exact(&mut size).ok()?;
    let mut body = vec![0u8; i32::from_be_bytes(size) as usize];
    stream.read_exact(&mut body).ok()?;
    Some(Bytes::from(body))
}

fn header(api_key: i16, version: i16, correlation_id: i32) -> BytesMut {
    let mut buf = BytesMut::new();
    buf.put_i16(api_key);
    buf.put_i16(version);
    buf.put_i32(correlation_id);
    buf.put_i16(4);
    buf.put_slice(b"evil");
    buf
}

fn send_frame(stream: &mut TcpStream, body: &[u8]) {
    let mut frame = Vec::with_capacity(body.len() + 4);
    frame.extend_from_slice(&(body.len() as i32).to_be_bytes());
    frame.extend_from_slice(body);
    stream.write_all(&frame).unwrap();
}

#[test]
fn bad_frames_hurt_only_their_own_connection() {
    let broker = Broker::start(2, &["socket.request.max.bytes=1048576"]);
    let bootstrap = broker.bootstrap();
    create_topic(&bootstrap, "intact", 2, &[]);
    let sent = records(200, "intact");
    produce_all(
        &producer(&bootstrap, &[("acks", "all")]),
        "intact",
        None,
        &sent,
    );

    // A frame larger than socket.request.max.bytes: the connection is closed, nothing allocated.
    let mut stream = connect(&broker);
    stream.write_all(&0x7fff_fff0i32.to_be_bytes()).unwrap();
    assert!(
        read_frame(&mut stream).is_none(),
        "oversized frame closes the connection"
    );

    // A negative frame size.
    let mut stream = connect(&broker);
    stream.write_all(&(-5i32).to_be_bytes()).unwrap();
    assert!(read_frame(&mut stream).is_none());

    // A truncated frame followed by a hang-up.
    let mut stream = connect(&broker);
    stream.write_all(&100i32.to_be_bytes()).unwrap();
    stream.write_all(&[1, 2, 3]).unwrap();
    drop(stream);

    // Pure garbage inside a well-sized frame.
    let mut stream = connect(&broker);
    send_frame(&mut stream, &[0xff; 64]);
    let _ = read_frame(&mut stream);

    // An unknown API key.
    let mut stream = connect(&broker);
    send_frame(&mut stream, &header(999, 0, 7));
    let _ = read_frame(&mut stream);

    // Metadata v1 claiming 2^31-1 topics in a frame of a few bytes.
    let mut stream = connect(&broker);
    let mut body = header(ApiKey::Metadata as i16, 1, 8);
    body.put_i32(i32::MAX);
    body.put_i16(3);
    body.put_slice(b"abc");
    send_frame(&mut stream, &body);
    if let Some(mut response) = read_frame(&mut stream) {
        // If the broker answers instead of closing, the answer is for this request.
        assert_eq!(response.get_i32(), 8);
    }

    // Produce v9 (flexible) with a huge compact-array count.
    let mut stream = connect(&broker);
    let mut body = header(ApiKey::Produce as i16, 9, 9);
    body.put_u8(0); // header tagged fields
    body.put_u8(0); // null transactional id
    body.put_i16(1);
    body.put_i32(1000);
    body.put_slice(&[0xff, 0xff, 0xff, 0xff, 0x07]); // uvarint ~2^31
    send_frame(&mut stream, &body);
    let _ = read_frame(&mut stream);

    // ApiVersions at a version the broker does not know: a v0 body with UNSUPPORTED_VERSION (35)
    // and ApiVersions' own range, as KIP-511 specifies.
    let mut stream = connect(&broker);
    let mut request = BytesMut::new();
    RequestHeader::default()
        .with_request_api_key(ApiKey::ApiVersions as i16)
        .with_request_api_version(99)
        .with_correlation_id(11)
        .with_client_id(Some(StrBytes::from_static_str("future-client")))
        // A future client speaks ApiVersions v3+, whose request header is v2 (flexible).
        .encode(&mut request, 2)
        .unwrap();
    send_frame(&mut stream, &request);
    let mut response = read_frame(&mut stream).expect("fallback response");
    let header = ResponseHeader::decode(&mut response, 0).unwrap();
    assert_eq!(header.correlation_id, 11);
    let body = ApiVersionsResponse::decode(&mut response, 0).unwrap();
    assert_eq!(body.error_code, 35);
    let own = body
        .api_keys
        .iter()
        .find(|k| k.api_key == ApiKey::ApiVersions as i16)
        .unwrap();
    assert_eq!(own.min_version, 0);

    // Produce v2 (advertised for librdkafka's feature probes, refused): every partition is answered
    // with UNSUPPORTED_VERSION (35), as Kafka 4 does.
    let mut stream = connect(&broker);
    let mut body = crate::header(ApiKey::Produce as i16, 2, 12);
    body.put_i16(1); // acks
    body.put_i32(1000);
    body.put_i32(1);
    body.put_i16(6);
    body.put_slice(b"intact");
    body.put_i32(1);
    body.put_i32(0);
    body.put_i32(-1);
    send_frame(&mut stream, &body);
    let mut response = read_frame(&mut stream).expect("an UNSUPPORTED_VERSION answer");
    assert_eq!(response.get_i32(), 12);
    assert_eq!(response.get_i32(), 1);
    let name_len = response.get_i16() as usize;
    response.advance(name_len);
    assert_eq!(response.get_i32(), 1);
    assert_eq!(response.get_i32(), 0);
    assert_eq!(response.get_i16(), 35);

    // After all that, a real client still works and the stored data is intact.
    let got = consume(
        &consumer(&bootstrap, &[]),
        "intact",
        2,
        Offset::Beginning,
        200,
        Duration::from_secs(30),
    );
    let mut got_values: Vec<_> = got.iter().map(|r| r.value.clone()).collect();
    let mut sent_values: Vec<_> = sent.iter().map(|(_, v)| v.clone()).collect();
    got_values.sort();
    sent_values.sort();
    assert_eq!(got_values, sent_values);
    produce_all(
        &producer(&bootstrap, &[]),
        "intact",
        None,
        &records(10, "after"),
    );
}

/// acks=0 gets no response; when the append fails the broker closes the connection, which is the
/// only way such a producer can notice (as Kafka does). A good acks=0 request leaves the connection
/// open: the next request on it is answered.
#[test]
fn acks_zero_is_silent_and_a_failed_append_closes_the_connection() {
    use kafka_protocol::messages::produce_request::{
        PartitionProduceData, ProduceRequest, TopicProduceData,
    };
    use kafka_protocol::messages::{ApiVersionsRequest, TopicName};

    let broker = Broker::start(1, &[]);
    create_topic(&broker.bootstrap(), "silent", 1, &[]);
    let produce = |records: Bytes, correlation_id: i32| {
        let body = ProduceRequest::default()
            .with_acks(0)
            .with_timeout_ms(1000)
            .with_topic_data(vec![
                TopicProduceData::default()
                    .with_name(TopicName(StrBytes::from_static_str("silent")))
                    .with_partition_data(vec![
                        PartitionProduceData::default()
                            .with_index(0)
                            .with_records(Some(records)),
                    ]),
            ]);
        let mut frame = BytesMut::new();
        RequestHeader::default()
            .with_request_api_key(ApiKey::Produce as i16)
            .with_request_api_version(9)
            .with_correlation_id(correlation_id)
            .encode(&mut frame, 2)
            .unwrap();
        body.encode(&mut frame, 9).unwrap();
        frame.freeze()
    };
    let api_versions = |correlation_id: i32| {
        let mut frame = BytesMut::new();
        RequestHeader::default()
            .with_request_api_key(ApiKey::ApiVersions as i16)
            .with_request_api_version(0)
            .with_correlation_id(correlation_id)
            .encode(&mut frame, 1)
            .unwrap();
        ApiVersionsRequest::default().encode(&mut frame, 0).unwrap();
        frame.freeze()
    };

    // A valid batch, built by librdkafka's wire format rules (kafka-protocol's encoder).
    let mut batch = BytesMut::new();
    let record = kafka_protocol::records::Record {
        transactional: false,
        control: false,
        delete_horizon: false,
        partition_leader_epoch: 0,
        producer_id: -1,
        producer_epoch: -1,
        timestamp_type: kafka_protocol::records::TimestampType::Creation,
        offset: 0,
        sequence: -1,
        timestamp: 1,
        key: None,
        value: Some(Bytes::from_static(b"quiet")),
        headers: Default::default(),
    };
    kafka_protocol::records::RecordBatchEncoder::encode(
        &mut batch,
        [&record],
        &kafka_protocol::records::RecordEncodeOptions {
            version: 2,
            compression: kafka_protocol::records::Compression::None,
        },
    )
    .unwrap();
    let good = batch.freeze();

    let mut stream = connect(&broker);
    send_frame(&mut stream, &produce(good.clone(), 1));
    send_frame(&mut stream, &api_versions(2));
    let mut response = read_frame(&mut stream).expect("the connection stays open after acks=0");
    assert_eq!(
        response.get_i32(),
        2,
        "the first answer is the ApiVersions one: acks=0 got none"
    );

    // The same batch with a flipped byte fails its CRC: the broker hangs up.
    let mut bad = BytesMut::from(&good[..]);
    let last = bad.len() - 1;
    bad[last] ^= 0xff;
    send_frame(&mut stream, &produce(bad.freeze(), 3));
    assert!(
        read_frame(&mut stream).is_none(),
        "a failed acks=0 append closes the connection"
    );
}
