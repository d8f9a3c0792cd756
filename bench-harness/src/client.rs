//! A minimal Kafka client connection on compio: framing, correlation ids, typed request/response
//! calls through `kafka-protocol`, version negotiation (ApiVersions), Metadata, topic creation
//! and ListOffsets. The native driver's hot paths (produce, fetch decode) build on it.

use std::collections::BTreeMap;
use std::net::{SocketAddr, ToSocketAddrs};
use std::time::{Duration, Instant};

use anyhow::{Context, anyhow, bail};
use bytes::{Bytes, BytesMut};
use compio::buf::{BufResult, IntoInner, IoBuf};
use compio::io::{AsyncReadExt, AsyncWriteExt};
use compio::net::TcpStream;
use kafka_protocol::messages::{
    ApiKey, ApiVersionsRequest, BrokerId, CreateTopicsRequest, ListOffsetsRequest, MetadataRequest,
    RequestHeader, TopicName,
    create_topics_request::CreatableTopic,
    list_offsets_request::{ListOffsetsPartition, ListOffsetsTopic},
    metadata_request::MetadataRequestTopic,
};
use kafka_protocol::protocol::{Decodable, Encodable, HeaderVersion, Request, StrBytes};

use crate::wire;

/// Largest response frame accepted. A fetch response is bounded by the request's max_bytes (at
/// most 256 MiB by workload validation) plus framing; anything larger is a broken stream.
pub const MAX_RESPONSE_FRAME_BYTES: usize = 300 * 1024 * 1024;

/// Kafka error code meaning "no error".
pub const ERROR_NONE: i16 = 0;
const ERROR_TOPIC_ALREADY_EXISTS: i16 = 36;

/// One TCP connection to one broker node.
pub struct Connection {
    stream: TcpStream,
    next_correlation_id: i32,
    client_id: StrBytes,
    pub peer: SocketAddr,
}

/// Resolves `host:port` to its first address.
pub fn resolve(address: &str) -> anyhow::Result<SocketAddr> {
    address
        .to_socket_addrs()
        .with_context(|| format!("resolving {address}"))?
        .next()
        .ok_or_else(|| anyhow!("{address} resolved to no address"))
}

/// Reads one size-prefixed frame.
pub async fn read_frame(stream: &mut TcpStream, max_bytes: usize) -> anyhow::Result<Bytes> {
    let BufResult(res, size) = stream.read_exact([0u8; 4]).await;
    res.context("reading frame size")?;
    let size = i32::from_be_bytes(size);
    if size < 0 || size as usize > max_bytes {
        bail!("response frame of {size} bytes is outside 0..={max_bytes}");
    }
    let size = size as usize;
    let buf = Vec::with_capacity(size);
    let BufResult(res, slice) = stream.read_exact(buf.slice(..size)).await;
    res.context("reading frame body")?;
    let body = slice.into_inner();
    debug_assert_eq!(body.len(), size);
    Ok(Bytes::from(body))
}

impl Connection {
    pub async fn connect(address: SocketAddr, client_id: &str) -> anyhow::Result<Connection> {
        let stream = TcpStream::connect(address)
            .await
            .with_context(|| format!("connecting to {address}"))?;
        // Latency is the point of the harness: never let Nagle hold a small request back.
        stream.set_nodelay(true)?;
        Ok(Connection {
            stream,
            next_correlation_id: 1,
            client_id: StrBytes::from_string(client_id.to_string()),
            peer: address,
        })
    }

    /// The next correlation id (the hot path encodes its own headers but shares the counter).
    pub fn correlation_id(&mut self) -> i32 {
        let id = self.next_correlation_id;
        self.next_correlation_id = self.next_correlation_id.wrapping_add(1);
        id
    }

    pub fn client_id(&self) -> &str {
        self.client_id.as_str()
    }

    /// Splits into independent read and write handles over the same socket, so a reader task can
    /// collect responses while the owner keeps writing requests.
    pub fn into_split(self) -> (TcpStream, TcpStream, i32) {
        let (r, w) = self.stream.into_split();
        (r, w, self.next_correlation_id)
    }

    /// Sends one request and waits for its response (the control path: one in flight).
    pub async fn call<R: Request>(
        &mut self,
        request: &R,
        version: i16,
    ) -> anyhow::Result<R::Response> {
        let correlation_id = self.correlation_id();
        let header = RequestHeader::default()
            .with_request_api_key(R::KEY)
            .with_request_api_version(version)
            .with_correlation_id(correlation_id)
            .with_client_id(Some(self.client_id.clone()));
        let mut buf = BytesMut::new();
        buf.extend_from_slice(&[0; 4]);
        header.encode(&mut buf, R::header_version(version))?;
        request.encode(&mut buf, version)?;
        let size = (buf.len() - 4) as i32;
        buf[0..4].copy_from_slice(&size.to_be_bytes());
        let BufResult(res, _) = self.stream.write_all(buf.to_vec()).await;
        res.with_context(|| format!("sending api {} to {}", R::KEY, self.peer))?;
        let frame = read_frame(&mut self.stream, MAX_RESPONSE_FRAME_BYTES).await?;
        let (got, mut body) =
            wire::split_response_header(frame, R::Response::header_version(version))?;
        if got != correlation_id {
            bail!(
                "correlation id {got} from {}, expected {correlation_id}",
                self.peer
            );
        }
        R::Response::decode(&mut body, version)
            .with_context(|| format!("decoding api {} v{version}", R::KEY))
    }

    /// Asks the broker which versions it speaks (ApiVersions v0, understood by every broker).
    pub async fn api_versions(&mut self) -> anyhow::Result<ApiVersionTable> {
        let response = self.call(&ApiVersionsRequest::default(), 0).await?;
        if response.error_code != ERROR_NONE {
            bail!(
                "ApiVersions error {} from {}",
                response.error_code,
                self.peer
            );
        }
        let mut table = ApiVersionTable::default();
        for k in response.api_keys {
            table
                .ranges
                .insert(k.api_key, (k.min_version, k.max_version));
        }
        Ok(table)
    }
}

/// The versions a broker advertised, and the choice of the highest one both sides speak.
#[derive(Debug, Clone, Default)]
pub struct ApiVersionTable {
    pub ranges: BTreeMap<i16, (i16, i16)>,
}

impl ApiVersionTable {
    /// Highest version in both the broker's range and ours.
    pub fn pick(&self, key: ApiKey, our_min: i16, our_max: i16) -> anyhow::Result<i16> {
        let (min, max) = self
            .ranges
            .get(&(key as i16))
            .copied()
            .ok_or_else(|| anyhow!("broker does not support {key:?}"))?;
        let version = max.min(our_max);
        if version < min.max(our_min) {
            bail!(
                "no common {key:?} version: broker {min}..={max}, ringbench {our_min}..={our_max}"
            );
        }
        Ok(version)
    }

    pub fn supports(&self, key: ApiKey) -> bool {
        self.ranges.contains_key(&(key as i16))
    }
}

/// Where each partition of a topic is led, and how to reach each node.
#[derive(Debug, Clone)]
pub struct TopicLayout {
    pub topic: String,
    /// Leader node id per partition index.
    pub leaders: Vec<i32>,
    pub nodes: BTreeMap<i32, SocketAddr>,
}

impl TopicLayout {
    /// Partitions grouped by leader node.
    pub fn by_leader(&self, partitions: &[i32]) -> BTreeMap<i32, Vec<i32>> {
        let mut map: BTreeMap<i32, Vec<i32>> = BTreeMap::new();
        for &p in partitions {
            map.entry(self.leaders[p as usize]).or_default().push(p);
        }
        map
    }
}

/// Fetches metadata for `topic` until every partition has a leader, or `timeout` passes.
pub async fn topic_layout(
    conn: &mut Connection,
    versions: &ApiVersionTable,
    topic: &str,
    timeout: Duration,
) -> anyhow::Result<TopicLayout> {
    let version = versions.pick(ApiKey::Metadata, 1, 12)?;
    let deadline = Instant::now() + timeout;
    loop {
        let request = MetadataRequest::default()
            .with_topics(Some(vec![MetadataRequestTopic::default().with_name(Some(
                TopicName(StrBytes::from_string(topic.to_string())),
            ))]))
            .with_allow_auto_topic_creation(false);
        let response = conn.call(&request, version).await?;
        let mut nodes = BTreeMap::new();
        for b in &response.brokers {
            let address = resolve(&format!("{}:{}", b.host.as_str(), b.port))?;
            nodes.insert(b.node_id.0, address);
        }
        let found = response
            .topics
            .iter()
            .find(|t| t.name.as_ref().map(|n| n.0.as_str()) == Some(topic));
        let mut last_problem = format!("topic {topic} not in metadata");
        if let Some(t) = found {
            if t.error_code != ERROR_NONE {
                last_problem = format!("topic {topic} metadata error {}", t.error_code);
            } else if !t.partitions.is_empty() {
                let mut leaders = vec![-1; t.partitions.len()];
                let mut complete = true;
                for p in &t.partitions {
                    let index = p.partition_index;
                    if index < 0 || index as usize >= leaders.len() {
                        bail!(
                            "partition index {index} outside 0..{} in metadata",
                            leaders.len()
                        );
                    }
                    if p.error_code != ERROR_NONE
                        || p.leader_id.0 < 0
                        || !nodes.contains_key(&p.leader_id.0)
                    {
                        complete = false;
                    }
                    leaders[index as usize] = p.leader_id.0;
                }
                if complete {
                    return Ok(TopicLayout {
                        topic: topic.to_string(),
                        leaders,
                        nodes,
                    });
                }
                last_problem = format!("topic {topic} has partitions without a reachable leader");
            }
        }
        if Instant::now() >= deadline {
            bail!("{last_problem} after {timeout:?}");
        }
        compio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Creates topics with CreateTopics (replication factor 1: a single node); an existing topic
/// is accepted. Falls back to Metadata auto-creation for brokers without CreateTopics.
pub async fn create_topics(
    conn: &mut Connection,
    versions: &ApiVersionTable,
    topics: &[String],
    partitions: u32,
) -> anyhow::Result<()> {
    if !versions.supports(ApiKey::CreateTopics) {
        let version = versions.pick(ApiKey::Metadata, 4, 12)?;
        let request = MetadataRequest::default()
            .with_topics(Some(
                topics
                    .iter()
                    .map(|t| {
                        MetadataRequestTopic::default()
                            .with_name(Some(TopicName(StrBytes::from_string(t.clone()))))
                    })
                    .collect(),
            ))
            .with_allow_auto_topic_creation(true);
        conn.call(&request, version).await?;
        return Ok(());
    }
    let version = versions.pick(ApiKey::CreateTopics, 2, 7)?;
    let request = CreateTopicsRequest::default()
        .with_timeout_ms(30_000)
        .with_topics(
            topics
                .iter()
                .map(|t| {
                    CreatableTopic::default()
                        .with_name(TopicName(StrBytes::from_string(t.clone())))
                        .with_num_partitions(partitions as i32)
                        .with_replication_factor(1)
                })
                .collect(),
        );
    let response = conn.call(&request, version).await?;
    for t in response.topics {
        if t.error_code != ERROR_NONE && t.error_code != ERROR_TOPIC_ALREADY_EXISTS {
            bail!(
                "creating topic {}: error {} {}",
                t.name.0.as_str(),
                t.error_code,
                t.error_message.as_ref().map(|m| m.as_str()).unwrap_or("")
            );
        }
    }
    Ok(())
}

/// ListOffsets for partitions led by the node behind `conn`; `timestamp` -1 = latest, -2 = earliest.
pub async fn list_offsets(
    conn: &mut Connection,
    versions: &ApiVersionTable,
    topic: &str,
    partitions: &[i32],
    timestamp: i64,
) -> anyhow::Result<BTreeMap<i32, i64>> {
    let version = versions.pick(ApiKey::ListOffsets, 1, 7)?;
    let request = ListOffsetsRequest::default()
        .with_replica_id(BrokerId(-1))
        .with_topics(vec![
            ListOffsetsTopic::default()
                .with_name(TopicName(StrBytes::from_string(topic.to_string())))
                .with_partitions(
                    partitions
                        .iter()
                        .map(|&p| {
                            ListOffsetsPartition::default()
                                .with_partition_index(p)
                                .with_current_leader_epoch(-1)
                                .with_timestamp(timestamp)
                        })
                        .collect(),
                ),
        ]);
    let response = conn.call(&request, version).await?;
    let mut offsets = BTreeMap::new();
    for t in response.topics {
        for p in t.partitions {
            if p.error_code != ERROR_NONE {
                bail!(
                    "ListOffsets {topic}/{}: error {}",
                    p.partition_index,
                    p.error_code
                );
            }
            offsets.insert(p.partition_index, p.offset);
        }
    }
    for p in partitions {
        if !offsets.contains_key(p) {
            bail!("ListOffsets response lacks {topic}/{p}");
        }
    }
    Ok(offsets)
}

/// Connects to the bootstrap address and negotiates versions: the start of every session.
pub async fn bootstrap(
    address: &str,
    client_id: &str,
) -> anyhow::Result<(Connection, ApiVersionTable)> {
    let addr = resolve(address)?;
    let mut conn = Connection::connect(addr, client_id).await?;
    let versions = conn.api_versions().await?;
    Ok((conn, versions))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn frames_are_read_exactly_and_oversized_ones_refused() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let server = std::thread::spawn(move || {
            let (mut s, _) = listener.accept().unwrap();
            let mut out = Vec::new();
            for body in [&b"hello"[..], &b""[..], &[7u8; 70_000][..]] {
                out.extend_from_slice(&(body.len() as i32).to_be_bytes());
                out.extend_from_slice(body);
            }
            out.extend_from_slice(&(1_000_000i32).to_be_bytes());
            // Written in small pieces so the reader must reassemble frames.
            for chunk in out.chunks(1000) {
                s.write_all(chunk).unwrap();
            }
        });
        let runtime = compio::runtime::Runtime::new().unwrap();
        runtime.block_on(async {
            let mut stream = TcpStream::connect(addr).await.unwrap();
            assert_eq!(
                &read_frame(&mut stream, 100_000).await.unwrap()[..],
                b"hello"
            );
            assert!(read_frame(&mut stream, 100_000).await.unwrap().is_empty());
            assert_eq!(
                read_frame(&mut stream, 100_000).await.unwrap().len(),
                70_000
            );
            assert!(read_frame(&mut stream, 100_000).await.is_err());
        });
        server.join().unwrap();
    }
}
