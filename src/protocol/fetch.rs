//! The hand-rolled Fetch response writer: the zero-copy path. It lays a Fetch response out as
//! a list of parts — bytes this module wrote, record bytes the caller already holds, and file
//! ranges the connection will splice — with the frame size known before anything is sent.
//!
//! kafka-protocol's `FetchResponse::encode` is the oracle: flattened, the parts are
//! byte-identical to it for every version (tests/protocol_fetch.rs proves it by property test).
//! The writer exists because the crate can only encode records it holds in memory, while the
//! broker wants to move log bytes file -> pipe -> socket without reading them.

use bytes::{BufMut, Bytes, BytesMut};
use kafka_protocol::messages::{ApiKey, TopicName};
use kafka_protocol::protocol::StrBytes;
use std::ops::Range;
use uuid::Uuid;

use super::response::EncodeError;

/// The Fetch versions the writer encodes: every version kafka-protocol 0.18 knows. The
/// broker advertises fewer (see [`SUPPORTED_APIS`](super::SUPPORTED_APIS)); the higher ones
/// cost only a few branches (topic ids from 13, node endpoints from 16).
pub const FETCH_WRITER_VERSIONS: Range<i16> = 4..19;

/// Record bytes held in memory up to this size are copied into the surrounding header bytes
/// rather than sent as a part of their own: copying 1 KiB costs less than one more iovec
/// entry and the reference count it keeps alive, and the send stays one contiguous write.
pub const INLINE_RECORDS_MAX_BYTES: usize = 1024;

/// The records of one partition, as the broker found them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RecordsBody {
    /// No records field at all (length -1). Kafka sends empty records, not null, for a
    /// partition without data; null is here for completeness and for the oracle test.
    Null,
    /// Record bytes in memory (a small tail already read, or an empty slice).
    Bytes(Bytes),
    /// `len` bytes of a segment file, to be spliced by the connection; `token` is the
    /// caller's handle for the file range (this module never looks at it).
    File {
        /// Bytes in the range.
        len: u32,
        /// The caller's handle for the range.
        token: usize,
    },
}

/// One entry of a partition's aborted-transaction list (read_committed fetches).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FetchAbortedTransaction {
    /// The producer whose transaction aborted.
    pub producer_id: i64,
    /// The first offset of the aborted transaction.
    pub first_offset: i64,
}

/// The partition's current leader (tagged field 1, v12+, KIP-951), sent with
/// NOT_LEADER_OR_FOLLOWER so clients can re-route without a Metadata round trip. Written only
/// when it differs from the default (-1, -1), as Kafka writes every tagged field.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FetchCurrentLeader {
    /// The leader's node id, or -1.
    pub leader_id: i32,
    /// The leader's epoch, or -1.
    pub leader_epoch: i32,
}

impl Default for FetchCurrentLeader {
    fn default() -> Self {
        FetchCurrentLeader {
            leader_id: -1,
            leader_epoch: -1,
        }
    }
}

/// A node the client may need to reach (top-level tagged field 0, v16+, KIP-951), listed
/// with leader hints. Written only from v16, where the field exists.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FetchNodeEndpoint {
    /// The node id.
    pub node_id: i32,
    /// Its host.
    pub host: StrBytes,
    /// Its port.
    pub port: i32,
    /// Its rack, if any.
    pub rack: Option<StrBytes>,
}

/// One partition of a Fetch response.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FetchPartitionData {
    /// The partition index.
    pub partition_index: i32,
    /// The partition's error code, 0 for none.
    pub error_code: i16,
    /// The high watermark.
    pub high_watermark: i64,
    /// The last stable offset (= high watermark without open transactions).
    pub last_stable_offset: i64,
    /// The log start offset (v5+; dropped below).
    pub log_start_offset: i64,
    /// Aborted transactions in range, for read_committed; `None` otherwise.
    pub aborted_transactions: Option<Vec<FetchAbortedTransaction>>,
    /// The preferred read replica; must be -1 below v11, where the field does not exist.
    pub preferred_read_replica: i32,
    /// The current leader hint (v12+; dropped below).
    pub current_leader: FetchCurrentLeader,
    /// The records.
    pub records: RecordsBody,
}

/// One topic of a Fetch response. Versions up to 12 name the topic; 13+ send only its id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FetchTopicData {
    /// The topic name (v4-12).
    pub name: TopicName,
    /// The topic id (v13+).
    pub topic_id: Uuid,
    /// Its partitions, in request order.
    pub partitions: Vec<FetchPartitionData>,
}

/// A Fetch response, described plainly for [`encode_fetch_response`].
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct FetchResponseData {
    /// Quota throttle time.
    pub throttle_time_ms: i32,
    /// The top-level error code (v7+; dropped below, where errors are per partition).
    pub error_code: i16,
    /// The fetch session id; 0 means "no session" and is the only value below v7.
    pub session_id: i32,
    /// The topics, in request order.
    pub topics: Vec<FetchTopicData>,
    /// Node endpoints (v16+; dropped below).
    pub node_endpoints: Vec<FetchNodeEndpoint>,
}

/// One piece of a response frame, sent in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FramePart {
    /// Bytes to write as they are.
    Bytes(Bytes),
    /// A file range to splice: the caller's `token` from [`RecordsBody::File`] and its length.
    File {
        /// The caller's handle for the range.
        token: usize,
        /// Bytes in the range.
        len: u32,
    },
}

impl FramePart {
    /// The number of bytes this part puts on the wire.
    pub fn len_bytes(&self) -> usize {
        match self {
            FramePart::Bytes(bytes) => bytes.len(),
            FramePart::File { len, .. } => *len as usize,
        }
    }
}

/// A whole Fetch response frame as parts: the first part starts with the 4-byte frame size,
/// adjacent in-memory bytes are merged, and no part is empty.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FetchFrame {
    /// The parts, in wire order.
    pub parts: Vec<FramePart>,
}

impl FetchFrame {
    /// The total bytes on the wire, size prefix included.
    pub fn len_bytes(&self) -> usize {
        self.parts.iter().map(FramePart::len_bytes).sum()
    }
}

/// Encodes a Fetch response of `version` answering `correlation_id` as a [`FetchFrame`].
///
/// Mirrors kafka-protocol's rules for fields a version cannot carry: fields the crate drops
/// silently are dropped (top-level error below v7, log start offset below v5, tagged fields
/// below their version), and a non-zero session id below v7 or a preferred read replica
/// other than -1 below v11 are refused, as the crate refuses them.
pub fn encode_fetch_response(
    correlation_id: i32,
    version: i16,
    response: &FetchResponseData,
) -> Result<FetchFrame, EncodeError> {
    if !FETCH_WRITER_VERSIONS.contains(&version) {
        return Err(EncodeError::UnsupportedVersion {
            api_key: ApiKey::Fetch,
            version,
        });
    }
    let flexible = version >= 12;
    let (inline_bytes, parts) = estimate_capacity(response);
    let mut writer = PartsWriter::with_capacity(inline_bytes, parts);

    writer.buf.put_i32(0); // The frame size, patched in `finish`.
    writer.buf.put_i32(correlation_id);
    if ApiKey::Fetch.response_header_version(version) >= 1 {
        writer.buf.put_u8(0); // No tagged fields in the response header.
    }

    writer.buf.put_i32(response.throttle_time_ms);
    if version >= 7 {
        writer.buf.put_i16(response.error_code);
        writer.buf.put_i32(response.session_id);
    } else if response.session_id != 0 {
        return Err(EncodeError::FieldNotInVersion {
            field: "a fetch session id",
            version,
        });
    }
    writer.put_array_len(flexible, response.topics.len(), "topics")?;
    for topic in &response.topics {
        if version <= 12 {
            writer.put_string(flexible, topic.name.as_bytes(), "a topic name")?;
        }
        if version >= 13 {
            writer.buf.put_slice(topic.topic_id.as_bytes());
        }
        writer.put_array_len(flexible, topic.partitions.len(), "partitions")?;
        for partition in &topic.partitions {
            writer.put_partition(version, partition)?;
        }
        if flexible {
            writer.buf.put_u8(0); // No topic tagged fields.
        }
    }
    if flexible {
        if version >= 16 && !response.node_endpoints.is_empty() {
            writer.buf.put_u8(1); // One tagged field: NodeEndpoints, tag 0.
            let endpoints = encode_node_endpoints(&response.node_endpoints)?;
            put_uvarint(&mut writer.buf, 0);
            put_uvarint(&mut writer.buf, len_u32(endpoints.len(), "node endpoints")?);
            writer.buf.put_slice(&endpoints);
        } else {
            writer.buf.put_u8(0);
        }
    }
    writer.finish()
}

/// Accumulates the frame: bytes written here go to one buffer, and each external part (big
/// in-memory records, file ranges) closes the current stretch of that buffer.
struct PartsWriter {
    buf: BytesMut,
    /// Where the buffer's not-yet-closed stretch starts.
    stretch_start: usize,
    parts: Vec<PendingPart>,
}

enum PendingPart {
    Inline(Range<usize>),
    External(FramePart),
}

impl PartsWriter {
    fn with_capacity(inline_bytes: usize, parts: usize) -> Self {
        PartsWriter {
            buf: BytesMut::with_capacity(inline_bytes),
            stretch_start: 0,
            parts: Vec::with_capacity(parts),
        }
    }

    fn close_stretch(&mut self) {
        if self.buf.len() > self.stretch_start {
            self.parts
                .push(PendingPart::Inline(self.stretch_start..self.buf.len()));
            self.stretch_start = self.buf.len();
        }
    }

    fn push_external(&mut self, part: FramePart) {
        if part.len_bytes() > 0 {
            self.close_stretch();
            self.parts.push(PendingPart::External(part));
        }
    }

    fn put_array_len(
        &mut self,
        flexible: bool,
        len: usize,
        field: &'static str,
    ) -> Result<(), EncodeError> {
        if flexible {
            let len_plus_one = len
                .checked_add(1)
                .and_then(|n| u32::try_from(n).ok())
                .ok_or(EncodeError::TooLong { field, len })?;
            put_uvarint(&mut self.buf, len_plus_one);
        } else {
            let len = i32::try_from(len).map_err(|_| EncodeError::TooLong { field, len })?;
            self.buf.put_i32(len);
        }
        Ok(())
    }

    fn put_string(
        &mut self,
        flexible: bool,
        bytes: &[u8],
        field: &'static str,
    ) -> Result<(), EncodeError> {
        let too_long = EncodeError::TooLong {
            field,
            len: bytes.len(),
        };
        if flexible {
            // Kafka's compact strings are limited to i16::MAX bytes too.
            if bytes.len() > i16::MAX as usize {
                return Err(too_long);
            }
            put_uvarint(&mut self.buf, bytes.len() as u32 + 1);
        } else {
            let len = i16::try_from(bytes.len()).map_err(|_| too_long)?;
            self.buf.put_i16(len);
        }
        self.buf.put_slice(bytes);
        Ok(())
    }

    fn put_partition(
        &mut self,
        version: i16,
        partition: &FetchPartitionData,
    ) -> Result<(), EncodeError> {
        let flexible = version >= 12;
        self.buf.put_i32(partition.partition_index);
        self.buf.put_i16(partition.error_code);
        self.buf.put_i64(partition.high_watermark);
        self.buf.put_i64(partition.last_stable_offset);
        if version >= 5 {
            self.buf.put_i64(partition.log_start_offset);
        }
        match &partition.aborted_transactions {
            None if flexible => put_uvarint(&mut self.buf, 0),
            None => self.buf.put_i32(-1),
            Some(aborted) => {
                self.put_array_len(flexible, aborted.len(), "aborted transactions")?;
                for transaction in aborted {
                    self.buf.put_i64(transaction.producer_id);
                    self.buf.put_i64(transaction.first_offset);
                    if flexible {
                        self.buf.put_u8(0);
                    }
                }
            }
        }
        if version >= 11 {
            self.buf.put_i32(partition.preferred_read_replica);
        } else if partition.preferred_read_replica != -1 {
            return Err(EncodeError::FieldNotInVersion {
                field: "a preferred read replica",
                version,
            });
        }
        self.put_records(flexible, &partition.records)?;
        if flexible {
            if partition.current_leader != FetchCurrentLeader::default() {
                self.buf.put_u8(1); // One tagged field: CurrentLeader, tag 1.
                put_uvarint(&mut self.buf, 1);
                put_uvarint(&mut self.buf, 9); // i32 + i32 + its own empty tag section.
                self.buf.put_i32(partition.current_leader.leader_id);
                self.buf.put_i32(partition.current_leader.leader_epoch);
                self.buf.put_u8(0);
            } else {
                self.buf.put_u8(0);
            }
        }
        Ok(())
    }

    fn put_records(&mut self, flexible: bool, records: &RecordsBody) -> Result<(), EncodeError> {
        let len = match records {
            RecordsBody::Null => {
                if flexible {
                    put_uvarint(&mut self.buf, 0);
                } else {
                    self.buf.put_i32(-1);
                }
                return Ok(());
            }
            RecordsBody::Bytes(bytes) => bytes.len(),
            RecordsBody::File { len, .. } => *len as usize,
        };
        // Records are at most i32::MAX - 1 bytes so that the length (+1 when compact) fits
        // both encodings; the frame-size check in `finish` bounds them further.
        if len >= i32::MAX as usize {
            return Err(EncodeError::TooLong {
                field: "records",
                len,
            });
        }
        if flexible {
            put_uvarint(&mut self.buf, len as u32 + 1);
        } else {
            self.buf.put_i32(len as i32);
        }
        match records {
            RecordsBody::Null => {}
            RecordsBody::Bytes(bytes) if bytes.len() <= INLINE_RECORDS_MAX_BYTES => {
                self.buf.put_slice(bytes);
            }
            RecordsBody::Bytes(bytes) => self.push_external(FramePart::Bytes(bytes.clone())),
            RecordsBody::File { len, token } => self.push_external(FramePart::File {
                token: *token,
                len: *len,
            }),
        }
        Ok(())
    }

    fn finish(mut self) -> Result<FetchFrame, EncodeError> {
        self.close_stretch();
        let total: usize = self.buf.len()
            + self
                .parts
                .iter()
                .map(|part| match part {
                    PendingPart::Inline(_) => 0,
                    PendingPart::External(part) => part.len_bytes(),
                })
                .sum::<usize>();
        let size_bytes = total - 4;
        let size =
            i32::try_from(size_bytes).map_err(|_| EncodeError::FrameTooLarge { size_bytes })?;
        self.buf[..4].copy_from_slice(&size.to_be_bytes());
        let inline = self.buf.freeze();
        let parts = self
            .parts
            .into_iter()
            .map(|part| match part {
                PendingPart::Inline(range) => FramePart::Bytes(inline.slice(range)),
                PendingPart::External(part) => part,
            })
            .collect();
        Ok(FetchFrame { parts })
    }
}

/// A generous guess at the bytes written inline (fixed fields per partition, names per
/// topic, small records copied) and the exact bound on parts (one per external record part,
/// one per stretch around them), so both buffers are allocated once in the common case.
fn estimate_capacity(response: &FetchResponseData) -> (usize, usize) {
    let mut inline_bytes = 64;
    let mut parts = 1;
    for topic in &response.topics {
        inline_bytes += 32 + topic.name.len();
        for partition in &topic.partitions {
            inline_bytes += 64;
            if let Some(aborted) = &partition.aborted_transactions {
                inline_bytes += aborted.len() * 17;
            }
            match &partition.records {
                RecordsBody::Bytes(bytes) if bytes.len() <= INLINE_RECORDS_MAX_BYTES => {
                    inline_bytes += bytes.len();
                }
                RecordsBody::Bytes(_) | RecordsBody::File { .. } => parts += 2,
                RecordsBody::Null => {}
            }
        }
    }
    (inline_bytes, parts)
}

/// The NodeEndpoints tagged field's value: a compact array of {node_id, host, port, rack}.
fn encode_node_endpoints(endpoints: &[FetchNodeEndpoint]) -> Result<BytesMut, EncodeError> {
    let mut writer = PartsWriter::with_capacity(16 + endpoints.len() * 32, 0);
    writer.put_array_len(true, endpoints.len(), "node endpoints")?;
    for endpoint in endpoints {
        writer.buf.put_i32(endpoint.node_id);
        writer.put_string(true, endpoint.host.as_bytes(), "a node host")?;
        writer.buf.put_i32(endpoint.port);
        match &endpoint.rack {
            None => put_uvarint(&mut writer.buf, 0),
            Some(rack) => writer.put_string(true, rack.as_bytes(), "a node rack")?,
        }
        writer.buf.put_u8(0);
    }
    Ok(writer.buf)
}

fn len_u32(len: usize, field: &'static str) -> Result<u32, EncodeError> {
    u32::try_from(len).map_err(|_| EncodeError::TooLong { field, len })
}

/// Kafka's unsigned varint: 7 bits per byte, low bits first, high bit set on all but the last.
fn put_uvarint(buf: &mut BytesMut, mut value: u32) {
    while value >= 0x80 {
        buf.put_u8((value as u8 & 0x7f) | 0x80);
        value >>= 7;
    }
    buf.put_u8(value as u8);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn flatten(frame: &FetchFrame, file: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        for part in &frame.parts {
            match part {
                FramePart::Bytes(bytes) => out.extend_from_slice(bytes),
                FramePart::File { len, .. } => out.extend_from_slice(&file[..*len as usize]),
            }
        }
        out
    }

    fn partition(records: RecordsBody) -> FetchPartitionData {
        FetchPartitionData {
            partition_index: 3,
            error_code: 0,
            high_watermark: 10,
            last_stable_offset: 10,
            log_start_offset: 0,
            aborted_transactions: None,
            preferred_read_replica: -1,
            current_leader: FetchCurrentLeader::default(),
            records,
        }
    }

    #[test]
    fn uvarint_matches_kafka_examples() {
        for (value, expect) in [
            (0u32, &[0x00u8][..]),
            (1, &[0x01]),
            (127, &[0x7f]),
            (128, &[0x80, 0x01]),
            (300, &[0xac, 0x02]),
            (u32::MAX, &[0xff, 0xff, 0xff, 0xff, 0x0f]),
        ] {
            let mut buf = BytesMut::new();
            put_uvarint(&mut buf, value);
            assert_eq!(&buf[..], expect, "{value}");
        }
    }

    #[test]
    fn file_ranges_split_the_frame_and_the_size_is_exact() {
        let response = FetchResponseData {
            topics: vec![FetchTopicData {
                name: TopicName(StrBytes::from_static_str("t")),
                topic_id: Uuid::nil(),
                partitions: vec![
                    partition(RecordsBody::File { len: 100, token: 7 }),
                    partition(RecordsBody::Bytes(Bytes::from_static(b"small"))),
                    partition(RecordsBody::File { len: 0, token: 8 }),
                ],
            }],
            ..FetchResponseData::default()
        };
        for version in FETCH_WRITER_VERSIONS {
            let frame = encode_fetch_response(42, version, &response).unwrap();
            // Header bytes, the file range, then everything after it merged into one part
            // (the small records were copied, the empty file range produced no part).
            assert_eq!(frame.parts.len(), 3, "v{version}");
            assert_eq!(frame.parts[1], FramePart::File { token: 7, len: 100 });
            let flat = flatten(&frame, &[0xab; 100]);
            assert_eq!(flat.len(), frame.len_bytes());
            let size = i32::from_be_bytes(flat[..4].try_into().unwrap());
            assert_eq!(size as usize, flat.len() - 4, "v{version}");
            assert_eq!(&flat[4..8], &42i32.to_be_bytes());
        }
    }

    #[test]
    fn fields_a_version_cannot_carry_are_refused() {
        let mut response = FetchResponseData {
            session_id: 5,
            ..FetchResponseData::default()
        };
        assert!(matches!(
            encode_fetch_response(1, 6, &response),
            Err(EncodeError::FieldNotInVersion { version: 6, .. })
        ));
        assert!(encode_fetch_response(1, 7, &response).is_ok());
        response.session_id = 0;
        response.topics.push(FetchTopicData {
            name: TopicName(StrBytes::from_static_str("t")),
            topic_id: Uuid::nil(),
            partitions: vec![FetchPartitionData {
                preferred_read_replica: 1,
                ..partition(RecordsBody::Null)
            }],
        });
        assert!(encode_fetch_response(1, 10, &response).is_err());
        assert!(encode_fetch_response(1, 11, &response).is_ok());
        assert!(encode_fetch_response(1, 3, &response).is_err());
        assert!(encode_fetch_response(1, 19, &response).is_err());
    }
}
