//! The native driver's hot-path codec, hand-rolled so that the load generator is never the
//! bottleneck: RecordBatch v2 building (with CRC-32C), Produce request framing, and a
//! zero-copy walk over the record batches of a Fetch response. Control-path messages
//! (Metadata, ListOffsets, Fetch requests, groups) use the `kafka-protocol` crate instead.

use std::fmt;

use bytes::{Buf, Bytes, BytesMut};
use kafka_protocol::compression::{Compressor, Decompressor, Gzip, Lz4, Snappy, Zstd};

use crate::workload::{Compression, TIMESTAMP_BYTES};

/// Size of the fixed RecordBatch v2 header (baseOffset .. recordsCount).
pub const BATCH_HEADER_BYTES: usize = 61;
/// The CRC covers everything from the attributes field (offset 21) to the end of the batch.
const CRC_START: usize = 21;
const ATTRIBUTE_COMPRESSION_MASK: i16 = 0x07;
const ATTRIBUTE_CONTROL: i16 = 0x20;

/// Errors from decoding broker bytes. They carry enough to tell a broker bug from a harness bug.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WireError {
    /// The bytes ended inside a field that must be complete.
    Truncated { what: &'static str },
    /// A field has a value the protocol does not allow.
    Malformed { what: &'static str, detail: String },
    /// The batch uses a format or codec this harness does not read.
    Unsupported { what: &'static str, detail: String },
}

impl fmt::Display for WireError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            WireError::Truncated { what } => write!(f, "truncated {what}"),
            WireError::Malformed { what, detail } => write!(f, "malformed {what}: {detail}"),
            WireError::Unsupported { what, detail } => write!(f, "unsupported {what}: {detail}"),
        }
    }
}

impl std::error::Error for WireError {}

// ---------------------------------------------------------------------------------------------
// Varints (Kafka uses zig-zag varints inside records and unsigned varints in flexible versions).

pub fn put_uvarint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

pub fn put_varint(out: &mut Vec<u8>, v: i64) {
    put_uvarint(out, ((v << 1) ^ (v >> 63)) as u64);
}

pub fn uvarint_len(mut v: u64) -> usize {
    let mut n = 1;
    while v >= 0x80 {
        v >>= 7;
        n += 1;
    }
    n
}

pub fn varint_len(v: i64) -> usize {
    uvarint_len(((v << 1) ^ (v >> 63)) as u64)
}

/// Reads an unsigned varint at `*pos`, advancing it.
pub fn get_uvarint(data: &[u8], pos: &mut usize, what: &'static str) -> Result<u64, WireError> {
    let mut result: u64 = 0;
    for shift in (0..70).step_by(7) {
        let byte = *data.get(*pos).ok_or(WireError::Truncated { what })?;
        *pos += 1;
        if shift == 63 && byte > 1 {
            return Err(WireError::Malformed {
                what,
                detail: "varint longer than 64 bits".into(),
            });
        }
        result |= ((byte & 0x7f) as u64) << shift;
        if byte & 0x80 == 0 {
            return Ok(result);
        }
    }
    Err(WireError::Malformed {
        what,
        detail: "varint longer than 10 bytes".into(),
    })
}

pub fn get_varint(data: &[u8], pos: &mut usize, what: &'static str) -> Result<i64, WireError> {
    let u = get_uvarint(data, pos, what)?;
    Ok(((u >> 1) as i64) ^ -((u & 1) as i64))
}

// ---------------------------------------------------------------------------------------------
// Record batches.

/// One header of a record: an owned key and value (headers are identical for every record of a
/// run, so they are built once).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecordHeader {
    pub key: Vec<u8>,
    pub value: Vec<u8>,
}

/// Accumulates records for one partition into the wire layout of a RecordBatch v2, remembering
/// each record's intended send time so latency can be computed when the batch is acknowledged.
#[derive(Debug)]
pub struct BatchBuilder {
    /// The encoded records section (everything after the 61-byte header).
    records: Vec<u8>,
    record_count: u32,
    base_timestamp_ms: i64,
    max_timestamp_ms: i64,
    /// Intended send time (µs since the Unix epoch) of each record, in offset order.
    pub intended_us: Vec<u64>,
    /// Sum of value sizes, the "bytes" of the throughput figures.
    pub value_bytes: u64,
    /// Harness-monotonic time (ns) the first record was appended; linger counts from here.
    pub opened_at_ns: u64,
}

impl Default for BatchBuilder {
    fn default() -> Self {
        BatchBuilder::new()
    }
}

impl BatchBuilder {
    pub fn new() -> BatchBuilder {
        BatchBuilder {
            records: Vec::new(),
            record_count: 0,
            base_timestamp_ms: 0,
            max_timestamp_ms: 0,
            intended_us: Vec::new(),
            value_bytes: 0,
            opened_at_ns: 0,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.record_count == 0
    }

    pub fn record_count(&self) -> u32 {
        self.record_count
    }

    /// Bytes the sealed batch will occupy before compression.
    pub fn encoded_len(&self) -> usize {
        BATCH_HEADER_BYTES + self.records.len()
    }

    /// At least the bytes [`BatchBuilder::append`] adds for such a record (varints at their
    /// widest), so a producer can close a batch before a record would push it past its limit.
    pub fn record_size_bound(key_len: usize, value_len: usize, headers: &[RecordHeader]) -> usize {
        // Length, attributes, timestamp delta, offset delta, key length, value length, header
        // count: at most 10 bytes per varint.
        let fixed = 1 + 6 * 10;
        let header_bytes: usize = headers
            .iter()
            .map(|h| 20 + h.key.len() + h.value.len())
            .sum();
        fixed + key_len + value_len + header_bytes
    }

    /// Appends one record whose value is the 8-byte big-endian intended time followed by
    /// `value_len - 8` bytes of `filler`. `filler` must hold at least that many bytes.
    pub fn append(
        &mut self,
        now_ns: u64,
        intended_us: u64,
        key: Option<&[u8]>,
        value_len: usize,
        filler: &[u8],
        headers: &[RecordHeader],
    ) {
        debug_assert!(value_len >= TIMESTAMP_BYTES && filler.len() >= value_len - TIMESTAMP_BYTES);
        let timestamp_ms = (intended_us / 1000) as i64;
        if self.record_count == 0 {
            self.base_timestamp_ms = timestamp_ms;
            self.max_timestamp_ms = timestamp_ms;
            self.opened_at_ns = now_ns;
        }
        self.max_timestamp_ms = self.max_timestamp_ms.max(timestamp_ms);
        let timestamp_delta = timestamp_ms - self.base_timestamp_ms;
        let offset_delta = self.record_count as i64;
        let key_len = key.map_or(-1, |k| k.len() as i64);

        let mut body_len =
            1 + varint_len(timestamp_delta) + varint_len(offset_delta) + varint_len(key_len);
        body_len += key.map_or(0, |k| k.len());
        body_len += varint_len(value_len as i64) + value_len;
        body_len += varint_len(headers.len() as i64);
        for h in headers {
            body_len += varint_len(h.key.len() as i64)
                + h.key.len()
                + varint_len(h.value.len() as i64)
                + h.value.len();
        }

        let out = &mut self.records;
        out.reserve(body_len + 5);
        put_varint(out, body_len as i64);
        out.push(0); // record attributes: unused in v2
        put_varint(out, timestamp_delta);
        put_varint(out, offset_delta);
        put_varint(out, key_len);
        if let Some(k) = key {
            out.extend_from_slice(k);
        }
        put_varint(out, value_len as i64);
        out.extend_from_slice(&intended_us.to_be_bytes());
        out.extend_from_slice(&filler[..value_len - TIMESTAMP_BYTES]);
        put_varint(out, headers.len() as i64);
        for h in headers {
            put_varint(out, h.key.len() as i64);
            out.extend_from_slice(&h.key);
            put_varint(out, h.value.len() as i64);
            out.extend_from_slice(&h.value);
        }
        self.record_count += 1;
        self.intended_us.push(intended_us);
        self.value_bytes += value_len as u64;
    }

    /// Writes the finished batch (header, optionally compressed records, CRC) to `out` and resets
    /// the builder's record area. The intended times stay until [`BatchBuilder::take_intended`].
    pub fn seal_into(
        &mut self,
        compression: Compression,
        out: &mut Vec<u8>,
    ) -> Result<(), WireError> {
        let start = out.len();
        out.resize(start + BATCH_HEADER_BYTES, 0);
        match compression {
            Compression::None => out.extend_from_slice(&self.records),
            codec => compress_into(codec, &self.records, out)?,
        }
        let batch_len = out.len() - start;
        let header = &mut out[start..start + BATCH_HEADER_BYTES];
        header[0..8].copy_from_slice(&0i64.to_be_bytes()); // baseOffset: assigned by the broker
        header[8..12].copy_from_slice(&((batch_len - 12) as i32).to_be_bytes());
        header[12..16].copy_from_slice(&(-1i32).to_be_bytes()); // partitionLeaderEpoch
        header[16] = 2; // magic
        header[21..23].copy_from_slice(&compression.attribute_bits().to_be_bytes());
        header[23..27].copy_from_slice(&(self.record_count as i32 - 1).to_be_bytes());
        header[27..35].copy_from_slice(&self.base_timestamp_ms.to_be_bytes());
        header[35..43].copy_from_slice(&self.max_timestamp_ms.to_be_bytes());
        header[43..51].copy_from_slice(&(-1i64).to_be_bytes()); // producerId: not idempotent
        header[51..53].copy_from_slice(&(-1i16).to_be_bytes()); // producerEpoch
        header[53..57].copy_from_slice(&(-1i32).to_be_bytes()); // baseSequence
        header[57..61].copy_from_slice(&(self.record_count as i32).to_be_bytes());
        let crc = crc32c::crc32c(&out[start + CRC_START..]);
        out[start + 17..start + 21].copy_from_slice(&crc.to_be_bytes());
        self.records.clear();
        self.record_count = 0;
        Ok(())
    }

    /// Hands over the intended send times of the sealed batch, leaving an empty list behind.
    pub fn take_intended(&mut self) -> (Vec<u64>, u64) {
        let bytes = std::mem::take(&mut self.value_bytes);
        (std::mem::take(&mut self.intended_us), bytes)
    }
}

fn compress_into(codec: Compression, records: &[u8], out: &mut Vec<u8>) -> Result<(), WireError> {
    let fill = |tmp: &mut BytesMut| -> anyhow::Result<()> {
        tmp.extend_from_slice(records);
        Ok(())
    };
    let result = match codec {
        Compression::None => {
            out.extend_from_slice(records);
            Ok(())
        }
        Compression::Gzip => Gzip::compress(out, fill),
        Compression::Snappy => Snappy::compress(out, fill),
        Compression::Lz4 => Lz4::compress(out, fill),
        Compression::Zstd => Zstd::compress(out, fill),
    };
    result.map_err(|e| WireError::Malformed {
        what: "compression",
        detail: e.to_string(),
    })
}

fn decompress(codec: i16, data: Bytes) -> Result<Bytes, WireError> {
    let mut data = data;
    let take = |b: &mut Bytes| -> anyhow::Result<Bytes> { Ok(std::mem::take(b)) };
    let result = match codec {
        1 => Gzip::decompress(&mut data, take),
        2 => Snappy::decompress(&mut data, take),
        3 => Lz4::decompress(&mut data, take),
        4 => Zstd::decompress(&mut data, take),
        other => {
            return Err(WireError::Unsupported {
                what: "compression codec",
                detail: format!("attribute bits {other}"),
            });
        }
    };
    result.map_err(|e| WireError::Malformed {
        what: "compressed records",
        detail: e.to_string(),
    })
}

// ---------------------------------------------------------------------------------------------
// Produce requests.

/// The Produce versions the native driver writes: v3 is the first with RecordBatch v2; v13
/// addresses topics by id, which the harness does not need.
pub const PRODUCE_MIN_VERSION: i16 = 3;
pub const PRODUCE_MAX_VERSION: i16 = 12;
const FIRST_FLEXIBLE_PRODUCE_VERSION: i16 = 9;

/// One partition's sealed batch bytes inside a Produce request.
pub struct PartitionBatch<'a> {
    pub partition: i32,
    pub records: &'a [u8],
}

/// One topic's batches inside a Produce request.
pub struct TopicBatches<'a> {
    pub topic: &'a str,
    pub partitions: &'a [PartitionBatch<'a>],
}

/// Common request-header fields.
pub struct RequestHeaderFields<'a> {
    pub api_version: i16,
    pub correlation_id: i32,
    pub client_id: &'a str,
}

/// Appends a complete Produce request frame (4-byte size prefix included) to `out`.
pub fn encode_produce_request(
    out: &mut Vec<u8>,
    header: &RequestHeaderFields<'_>,
    acks: i16,
    timeout_ms: i32,
    topics: &[TopicBatches<'_>],
) -> Result<(), WireError> {
    let version = header.api_version;
    if !(PRODUCE_MIN_VERSION..=PRODUCE_MAX_VERSION).contains(&version) {
        return Err(WireError::Unsupported {
            what: "produce version",
            detail: version.to_string(),
        });
    }
    let flexible = version >= FIRST_FLEXIBLE_PRODUCE_VERSION;
    let start = out.len();
    out.extend_from_slice(&[0; 4]);
    // Request header v1 (v2 when flexible): the client id stays a classic nullable string.
    out.extend_from_slice(&0i16.to_be_bytes());
    out.extend_from_slice(&version.to_be_bytes());
    out.extend_from_slice(&header.correlation_id.to_be_bytes());
    out.extend_from_slice(&(header.client_id.len() as i16).to_be_bytes());
    out.extend_from_slice(header.client_id.as_bytes());
    if flexible {
        out.push(0); // header tagged fields
        out.push(0); // transactional_id: compact nullable string, null
    } else {
        out.extend_from_slice(&(-1i16).to_be_bytes());
    }
    out.extend_from_slice(&acks.to_be_bytes());
    out.extend_from_slice(&timeout_ms.to_be_bytes());
    put_array_len(out, topics.len(), flexible);
    for topic in topics {
        if flexible {
            put_uvarint(out, topic.topic.len() as u64 + 1);
        } else {
            out.extend_from_slice(&(topic.topic.len() as i16).to_be_bytes());
        }
        out.extend_from_slice(topic.topic.as_bytes());
        put_array_len(out, topic.partitions.len(), flexible);
        for p in topic.partitions {
            out.extend_from_slice(&p.partition.to_be_bytes());
            if flexible {
                put_uvarint(out, p.records.len() as u64 + 1);
            } else {
                out.extend_from_slice(&(p.records.len() as i32).to_be_bytes());
            }
            out.extend_from_slice(p.records);
            if flexible {
                out.push(0); // partition tagged fields
            }
        }
        if flexible {
            out.push(0); // topic tagged fields
        }
    }
    if flexible {
        out.push(0); // request tagged fields
    }
    let size = (out.len() - start - 4) as i32;
    out[start..start + 4].copy_from_slice(&size.to_be_bytes());
    Ok(())
}

fn put_array_len(out: &mut Vec<u8>, len: usize, flexible: bool) {
    if flexible {
        put_uvarint(out, len as u64 + 1);
    } else {
        out.extend_from_slice(&(len as i32).to_be_bytes());
    }
}

// ---------------------------------------------------------------------------------------------
// Fetched records.

/// What one pass over a partition's fetched bytes found.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ScanSummary {
    /// Data records visited (control records excluded).
    pub records: u64,
    pub value_bytes: u64,
    /// The offset to fetch next, if at least one complete batch was present.
    pub next_offset: Option<i64>,
}

/// Walks the record batches in `data` (a Fetch response partition's `records`), calling
/// `on_record(offset, value)` for each data record at or after `from_offset`. A partial batch at
/// the end is normal (the broker cuts at a byte limit) and ends the walk.
pub fn scan_batches(
    data: &Bytes,
    from_offset: i64,
    mut on_record: impl FnMut(i64, &[u8]),
) -> Result<ScanSummary, WireError> {
    let mut summary = ScanSummary::default();
    let mut pos = 0usize;
    let bytes = &data[..];
    while bytes.len() - pos >= 12 {
        let base_offset = i64::from_be_bytes(bytes[pos..pos + 8].try_into().unwrap_or([0; 8]));
        let batch_len = i32::from_be_bytes(bytes[pos + 8..pos + 12].try_into().unwrap_or([0; 4]));
        if batch_len < (BATCH_HEADER_BYTES - 12) as i32 {
            return Err(WireError::Malformed {
                what: "batch length",
                detail: batch_len.to_string(),
            });
        }
        let total = 12 + batch_len as usize;
        if bytes.len() - pos < total {
            break; // partial trailing batch
        }
        let batch = &bytes[pos..pos + total];
        let magic = batch[16] as i8;
        if magic != 2 {
            return Err(WireError::Unsupported {
                what: "record batch magic",
                detail: magic.to_string(),
            });
        }
        let attributes = i16::from_be_bytes([batch[21], batch[22]]);
        let last_offset_delta = i32::from_be_bytes(batch[23..27].try_into().unwrap_or([0; 4]));
        let count = i32::from_be_bytes(batch[57..61].try_into().unwrap_or([0; 4]));
        if count < 0 || count as usize > batch.len() {
            return Err(WireError::Malformed {
                what: "record count",
                detail: count.to_string(),
            });
        }
        summary.next_offset = Some(base_offset + last_offset_delta as i64 + 1);
        if attributes & ATTRIBUTE_CONTROL == 0 {
            let codec = attributes & ATTRIBUTE_COMPRESSION_MASK;
            let decompressed;
            let records: &[u8] = if codec == 0 {
                &batch[BATCH_HEADER_BYTES..]
            } else {
                decompressed =
                    decompress(codec, data.slice(pos + BATCH_HEADER_BYTES..pos + total))?;
                &decompressed[..]
            };
            walk_records(
                records,
                base_offset,
                count as u32,
                from_offset,
                &mut summary,
                &mut on_record,
            )?;
        }
        pos += total;
    }
    Ok(summary)
}

fn walk_records(
    records: &[u8],
    base_offset: i64,
    count: u32,
    from_offset: i64,
    summary: &mut ScanSummary,
    on_record: &mut impl FnMut(i64, &[u8]),
) -> Result<(), WireError> {
    let mut pos = 0usize;
    for _ in 0..count {
        let len = get_varint(records, &mut pos, "record length")?;
        if len < 0 || len as usize > records.len() - pos {
            return Err(WireError::Truncated { what: "record" });
        }
        let end = pos + len as usize;
        let mut p = pos + 1; // attributes
        let _timestamp_delta = get_varint(records, &mut p, "timestamp delta")?;
        let offset_delta = get_varint(records, &mut p, "offset delta")?;
        let key_len = get_varint(records, &mut p, "key length")?;
        if key_len > 0 {
            p += key_len as usize;
        }
        let value_len = get_varint(records, &mut p, "value length")?;
        let offset = base_offset + offset_delta;
        if value_len >= 0 {
            let v_end = p + value_len as usize;
            if v_end > end {
                return Err(WireError::Truncated {
                    what: "record value",
                });
            }
            if offset >= from_offset {
                on_record(offset, &records[p..v_end]);
                summary.records += 1;
                summary.value_bytes += value_len as u64;
            }
        }
        pos = end;
    }
    Ok(())
}

/// The intended send time carried in the first 8 bytes of a value written by ringbench.
pub fn value_timestamp_us(value: &[u8]) -> Option<u64> {
    value
        .get(..TIMESTAMP_BYTES)
        .map(|b| u64::from_be_bytes(b.try_into().unwrap_or([0; 8])))
}

/// Splits one response frame body into (correlation id, body) using the response header
/// version: v1 carries tagged fields after the correlation id.
pub fn split_response_header(
    mut frame: Bytes,
    header_version: i16,
) -> Result<(i32, Bytes), WireError> {
    if frame.len() < 4 {
        return Err(WireError::Truncated {
            what: "response header",
        });
    }
    let correlation_id = frame.get_i32();
    if header_version >= 1 {
        let mut pos = 0;
        let tags = get_uvarint(&frame, &mut pos, "response tagged fields")?;
        for _ in 0..tags {
            let _tag = get_uvarint(&frame, &mut pos, "tag")?;
            let size = get_uvarint(&frame, &mut pos, "tag size")? as usize;
            if size > frame.len() - pos {
                return Err(WireError::Truncated {
                    what: "tagged field",
                });
            }
            pos += size;
        }
        frame.advance(pos);
    }
    Ok((correlation_id, frame))
}

#[cfg(test)]
mod tests {
    use super::*;
    use kafka_protocol::messages::ProduceRequest;
    use kafka_protocol::protocol::Decodable;
    use kafka_protocol::records::RecordBatchDecoder;

    fn filler() -> Vec<u8> {
        (0..4096u32).map(|i| (i * 31 % 251) as u8).collect()
    }

    #[test]
    fn record_size_bound_covers_what_append_adds() {
        let filler = filler();
        let headers = [RecordHeader {
            key: b"h".to_vec(),
            value: vec![7; 300],
        }];
        for (key, value_len, headers) in [
            (None, 8usize, &[][..]),
            (Some(&b"k"[..]), 100, &[][..]),
            (Some(&[3u8; 200][..]), 4000, &headers[..]),
        ] {
            let mut b = BatchBuilder::new();
            for n in 0..50u64 {
                let before = b.encoded_len();
                b.append(
                    n * 1_000_000,
                    1_700_000_000_000_000 + n * 999_999,
                    key,
                    value_len,
                    &filler,
                    headers,
                );
                let added = b.encoded_len() - before;
                let bound =
                    BatchBuilder::record_size_bound(key.map_or(0, |k| k.len()), value_len, headers);
                assert!(added <= bound, "added {added} > bound {bound}");
            }
        }
    }

    fn build_batch(compression: Compression, n: u64) -> (Vec<u8>, Vec<u64>) {
        let mut b = BatchBuilder::new();
        let headers = vec![RecordHeader {
            key: b"h1".to_vec(),
            value: b"v".to_vec(),
        }];
        let fill = filler();
        for i in 0..n {
            let key = i.to_be_bytes();
            b.append(
                0,
                1_700_000_000_000_000 + i * 1500,
                Some(&key),
                100 + i as usize,
                &fill,
                &headers,
            );
        }
        let mut out = Vec::new();
        b.seal_into(compression, &mut out).unwrap();
        (out, b.take_intended().0)
    }

    #[test]
    fn batches_decode_with_kafka_protocol_for_every_codec() {
        for codec in [
            Compression::None,
            Compression::Gzip,
            Compression::Snappy,
            Compression::Lz4,
            Compression::Zstd,
        ] {
            let (bytes, intended) = build_batch(codec, 20);
            let mut buf = Bytes::from(bytes);
            let set = RecordBatchDecoder::decode(&mut buf).unwrap();
            assert_eq!(set.records.len(), 20, "{codec:?}");
            for (i, r) in set.records.iter().enumerate() {
                assert_eq!(r.offset, i as i64);
                let value = r.value.as_ref().unwrap();
                assert_eq!(value.len(), 100 + i);
                assert_eq!(value_timestamp_us(value), Some(intended[i]));
                assert_eq!(r.timestamp, (intended[i] / 1000) as i64);
                assert_eq!(r.key.as_ref().unwrap().as_ref(), &(i as u64).to_be_bytes());
                assert_eq!(r.headers.len(), 1);
            }
        }
    }

    #[test]
    fn scan_reads_back_what_was_built_and_stops_at_a_partial_batch() {
        for codec in [Compression::None, Compression::Zstd, Compression::Lz4] {
            let (mut a, ia) = build_batch(codec, 5);
            // Pretend the broker assigned offsets 100.. and 105..
            a[0..8].copy_from_slice(&100i64.to_be_bytes());
            let (mut b, _) = build_batch(codec, 3);
            b[0..8].copy_from_slice(&105i64.to_be_bytes());
            let mut all = a.clone();
            all.extend_from_slice(&b);
            all.extend_from_slice(&b[..30]); // partial trailing batch
            let mut seen = Vec::new();
            let s = scan_batches(&Bytes::from(all), 102, |off, v| {
                seen.push((off, value_timestamp_us(v).unwrap()))
            })
            .unwrap();
            assert_eq!(s.records, 6);
            assert_eq!(s.next_offset, Some(108));
            assert_eq!(seen[0], (102, ia[2]));
            assert_eq!(seen.last().unwrap().0, 107);
        }
    }

    #[test]
    fn scan_rejects_garbage_without_panicking() {
        let mut junk = vec![0u8; 80];
        junk[8..12].copy_from_slice(&68i32.to_be_bytes());
        junk[16] = 2;
        junk[57..61].copy_from_slice(&1i32.to_be_bytes());
        junk[61] = 0xff; // endless varint
        assert!(scan_batches(&Bytes::from(junk.clone()), 0, |_, _| {}).is_err());
        junk[16] = 1;
        assert!(matches!(
            scan_batches(&Bytes::from(junk), 0, |_, _| {}),
            Err(WireError::Unsupported { .. })
        ));
        let mut tiny = vec![0u8; 12];
        tiny[8..12].copy_from_slice(&3i32.to_be_bytes());
        assert!(scan_batches(&Bytes::from(tiny), 0, |_, _| {}).is_err());
    }

    #[test]
    fn produce_request_matches_kafka_protocol_decoder_for_all_versions() {
        let (batch, _) = build_batch(Compression::None, 3);
        for version in PRODUCE_MIN_VERSION..=PRODUCE_MAX_VERSION {
            let parts = [
                PartitionBatch {
                    partition: 2,
                    records: &batch,
                },
                PartitionBatch {
                    partition: 5,
                    records: &batch,
                },
            ];
            let topics = [TopicBatches {
                topic: "bench-t",
                partitions: &parts,
            }];
            let mut out = Vec::new();
            let header = RequestHeaderFields {
                api_version: version,
                correlation_id: 77,
                client_id: "ringbench",
            };
            encode_produce_request(&mut out, &header, -1, 30_000, &topics).unwrap();
            let mut frame = Bytes::from(out);
            let size = frame.get_i32() as usize;
            assert_eq!(size, frame.len());
            let header =
                kafka_protocol::protocol::decode_request_header_from_buffer(&mut frame).unwrap();
            assert_eq!(header.correlation_id, 77);
            assert_eq!(header.request_api_version, version);
            let req = ProduceRequest::decode(&mut frame, version).unwrap();
            assert_eq!(frame.len(), 0, "v{version} left bytes");
            assert_eq!(req.acks, -1);
            assert_eq!(req.timeout_ms, 30_000);
            assert_eq!(req.topic_data.len(), 1);
            assert_eq!(req.topic_data[0].name.0.as_str(), "bench-t");
            let p = &req.topic_data[0].partition_data;
            assert_eq!(p.len(), 2);
            assert_eq!(p[1].index, 5);
            assert_eq!(p[1].records.as_ref().unwrap().as_ref(), &batch[..]);
        }
        let mut out = Vec::new();
        let header = RequestHeaderFields {
            api_version: 2,
            correlation_id: 1,
            client_id: "x",
        };
        assert!(encode_produce_request(&mut out, &header, 1, 1, &[]).is_err());
    }

    #[test]
    fn varints_round_trip() {
        for v in [
            0i64,
            1,
            -1,
            63,
            -64,
            64,
            300,
            -300,
            i32::MAX as i64,
            i64::MIN,
            i64::MAX,
        ] {
            let mut out = Vec::new();
            put_varint(&mut out, v);
            assert_eq!(out.len(), varint_len(v));
            let mut pos = 0;
            assert_eq!(get_varint(&out, &mut pos, "t").unwrap(), v);
            assert_eq!(pos, out.len());
        }
    }
}
