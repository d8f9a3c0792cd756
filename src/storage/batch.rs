//! storage::batch: the RecordBatch v2 header as stored on disk: parsing, append-time validation and the
//! two in-place stores (baseOffset, partitionLeaderEpoch) that assign offsets without touching the CRC.

use super::error::AppendError;
use super::producer_state::ProducerBatch;

/// Size of the fixed RecordBatch v2 header; the records follow it.
pub const BATCH_HEADER_BYTES: usize = 61;
/// Bytes before the batch payload that `batchLength` does not count (baseOffset + batchLength).
pub const LOG_OVERHEAD_BYTES: usize = 12;
/// Bytes needed to know a batch's offsets and size: up to and including `lastOffsetDelta`.
pub const HEADER_PREFIX_BYTES: usize = 27;

const BASE_OFFSET_AT: usize = 0;
const BATCH_LENGTH_AT: usize = 8;
const LEADER_EPOCH_AT: usize = 12;
const MAGIC_AT: usize = 16;
const CRC_AT: usize = 17;
/// The CRC covers everything from the attributes field to the end of the batch.
pub const CRC_COVERED_FROM: usize = 21;
const ATTRIBUTES_AT: usize = 21;
const LAST_OFFSET_DELTA_AT: usize = 23;
const MAX_TIMESTAMP_AT: usize = 35;
const PRODUCER_ID_AT: usize = 43;
const PRODUCER_EPOCH_AT: usize = 51;
const BASE_SEQUENCE_AT: usize = 53;
const RECORDS_COUNT_AT: usize = 57;

const CONTROL_ATTRIBUTE_BIT: u16 = 1 << 5;
const TRANSACTIONAL_ATTRIBUTE_BIT: u16 = 1 << 4;

fn i64_at(bytes: &[u8], at: usize) -> i64 {
    let mut raw = [0u8; 8];
    raw.copy_from_slice(&bytes[at..at + 8]);
    i64::from_be_bytes(raw)
}

fn i32_at(bytes: &[u8], at: usize) -> i32 {
    let mut raw = [0u8; 4];
    raw.copy_from_slice(&bytes[at..at + 4]);
    i32::from_be_bytes(raw)
}

fn u16_at(bytes: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([bytes[at], bytes[at + 1]])
}

/// What the log needs to know about one stored batch, read from its first 27 bytes (offsets, size) or
/// from the full 61-byte header (timestamps, counts).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BatchHeader {
    pub base_offset: i64,
    /// Total bytes of the batch on disk, `12 + batchLength`.
    pub size_bytes: u64,
    pub last_offset_delta: i32,
}

impl BatchHeader {
    /// Parses the first `HEADER_PREFIX_BYTES` bytes. Returns `None` if the prefix cannot be a v2 batch
    /// (length below the fixed header, or a negative delta); the caller treats that as corruption.
    pub fn parse_prefix(prefix: &[u8]) -> Option<BatchHeader> {
        if prefix.len() < HEADER_PREFIX_BYTES {
            return None;
        }
        let batch_length = i32_at(prefix, BATCH_LENGTH_AT);
        if batch_length < (BATCH_HEADER_BYTES - LOG_OVERHEAD_BYTES) as i32 || prefix[MAGIC_AT] != 2
        {
            return None;
        }
        let last_offset_delta = i32_at(prefix, LAST_OFFSET_DELTA_AT);
        if last_offset_delta < 0 {
            return None;
        }
        Some(BatchHeader {
            base_offset: i64_at(prefix, BASE_OFFSET_AT),
            size_bytes: LOG_OVERHEAD_BYTES as u64 + batch_length as u64,
            last_offset_delta,
        })
    }

    pub fn last_offset(&self) -> i64 {
        self.base_offset + i64::from(self.last_offset_delta)
    }
}

/// The maximum timestamp of a batch whose full header is in `header` (at least 61 bytes).
pub fn max_timestamp(header: &[u8]) -> i64 {
    i64_at(header, MAX_TIMESTAMP_AT)
}

/// The idempotent-producer fields of a batch whose full header is in `header` (at least 61 bytes), or
/// `None` for a batch without a producer id (-1).
pub fn producer_fields(header: &[u8]) -> Option<ProducerBatch> {
    let producer_id = i64_at(header, PRODUCER_ID_AT);
    if producer_id < 0 {
        return None;
    }
    Some(ProducerBatch {
        producer_id,
        epoch: u16_at(header, PRODUCER_EPOCH_AT) as i16,
        first_sequence: i32_at(header, BASE_SEQUENCE_AT),
        record_count: i32_at(header, LAST_OFFSET_DELTA_AT).saturating_add(1),
        max_timestamp: max_timestamp(header),
    })
}

/// The CRC stored in a batch (full header required).
pub fn stored_crc(header: &[u8]) -> u32 {
    u32::from_be_bytes([
        header[CRC_AT],
        header[CRC_AT + 1],
        header[CRC_AT + 2],
        header[CRC_AT + 3],
    ])
}

/// One batch of an append, after validation: where it sits in the caller's bytes and what it holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ValidatedBatch {
    /// Start of the batch within the appended bytes.
    pub position: usize,
    pub size_bytes: usize,
    pub record_count: i32,
    pub max_timestamp: i64,
    /// The idempotent producer that wrote it, if any (producerId >= 0).
    pub producer: Option<ProducerBatch>,
}

/// Validates a Produce partition's `records` field: one or more complete v2 batches, each checked as
/// Kafka's leader checks client appends (`UnifiedLog.analyzeAndValidateRecords`, `LogValidator`).
/// Nothing is copied or changed; the result says where each batch lies.
pub fn validate_records(
    records: &[u8],
    max_message_bytes: u32,
) -> Result<Vec<ValidatedBatch>, AppendError> {
    if records.is_empty() {
        return Err(AppendError::InvalidRecord(
            "the record set holds no batch".into(),
        ));
    }
    let mut batches = Vec::new();
    let mut position = 0usize;
    while position < records.len() {
        let rest = &records[position..];
        if rest.len() < LOG_OVERHEAD_BYTES {
            return Err(AppendError::CorruptMessage(format!(
                "{} trailing bytes at position {position} are not a batch",
                rest.len()
            )));
        }
        let batch_length = i32_at(rest, BATCH_LENGTH_AT);
        if batch_length < (BATCH_HEADER_BYTES - LOG_OVERHEAD_BYTES) as i32 {
            return Err(AppendError::CorruptMessage(format!(
                "batchLength {batch_length} at position {position} is smaller than a batch header"
            )));
        }
        let size_bytes = LOG_OVERHEAD_BYTES + batch_length as usize;
        // The size limit comes before the framing check so that a client sending one oversized batch
        // hears MESSAGE_TOO_LARGE even if the request was cut short.
        if size_bytes > max_message_bytes as usize {
            return Err(AppendError::MessageTooLarge {
                size: size_bytes,
                max: max_message_bytes,
            });
        }
        if size_bytes > rest.len() {
            return Err(AppendError::CorruptMessage(format!(
                "batchLength {batch_length} at position {position} runs past the {} bytes given",
                rest.len()
            )));
        }
        let batch = &rest[..size_bytes];
        let magic = batch[MAGIC_AT] as i8;
        if magic != 2 {
            // Magic 0 and 1 are real but retired formats; anything else is garbage.
            return Err(if magic == 0 || magic == 1 {
                AppendError::InvalidRecord(format!(
                    "record batch magic {magic} is not supported, only 2"
                ))
            } else {
                AppendError::CorruptMessage(format!("unknown record batch magic {magic}"))
            });
        }
        let computed = crc32c::crc32c(&batch[CRC_COVERED_FROM..]);
        let stored = stored_crc(batch);
        if computed != stored {
            return Err(AppendError::CorruptMessage(format!(
                "CRC mismatch at position {position}: stored {stored:#010x}, computed {computed:#010x}"
            )));
        }
        let base_offset = i64_at(batch, BASE_OFFSET_AT);
        if base_offset != 0 {
            return Err(AppendError::InvalidRecord(format!(
                "baseOffset of a client batch must be 0, got {base_offset}"
            )));
        }
        let last_offset_delta = i32_at(batch, LAST_OFFSET_DELTA_AT);
        let record_count = i32_at(batch, RECORDS_COUNT_AT);
        if record_count <= 0
            || last_offset_delta < 0
            || i64::from(last_offset_delta) + 1 != i64::from(record_count)
        {
            return Err(AppendError::InvalidRecord(format!(
                "inconsistent batch: lastOffsetDelta {last_offset_delta}, recordsCount {record_count}"
            )));
        }
        if u16_at(batch, ATTRIBUTES_AT) & CONTROL_ATTRIBUTE_BIT != 0 {
            return Err(AppendError::InvalidRecord(
                "clients may not send control batches".into(),
            ));
        }
        if u16_at(batch, ATTRIBUTES_AT) & TRANSACTIONAL_ATTRIBUTE_BIT != 0 {
            // Transactions are not implemented (and their APIs are not advertised): a transactional
            // batch could never be committed or aborted, so it must not enter the log.
            return Err(AppendError::InvalidRecord(
                "transactional batches are not supported".into(),
            ));
        }
        let producer = producer_fields(batch);
        if let Some(producer) = &producer
            && (producer.first_sequence < 0 || producer.epoch < 0)
        {
            return Err(AppendError::InvalidRecord(
                "an idempotent batch (producerId >= 0) needs baseSequence >= 0 and producerEpoch >= 0"
                    .into(),
            ));
        }
        batches.push(ValidatedBatch {
            position,
            size_bytes,
            record_count,
            max_timestamp: max_timestamp(batch),
            producer,
        });
        position += size_bytes;
    }
    Ok(batches)
}

/// The batch bytes `assign_offset` rewrites (baseOffset, batchLength, partitionLeaderEpoch): the
/// append path writes a patched copy of just these and the client's bytes after them untouched.
pub const PATCHED_PREFIX_BYTES: usize = LEADER_EPOCH_AT + 4;

/// Assigns a batch its offset and leader epoch in place. Both fields lie before byte 21, outside the
/// CRC, so the stored CRC stays valid (Kafka's `setLastOffset` / `setPartitionLeaderEpoch`).
pub fn assign_offset(batch: &mut [u8], base_offset: i64, leader_epoch: i32) {
    batch[BASE_OFFSET_AT..BASE_OFFSET_AT + 8].copy_from_slice(&base_offset.to_be_bytes());
    batch[LEADER_EPOCH_AT..LEADER_EPOCH_AT + 4].copy_from_slice(&leader_epoch.to_be_bytes());
}

/// Walks the records of an uncompressed batch to find the first record whose timestamp is at least
/// `target_ms`; returns its (offset, timestamp). Compressed batches (or records that do not parse)
/// yield `None` and the caller falls back to the batch's own base offset and max timestamp.
pub fn first_record_at_or_after(batch: &[u8], target_ms: i64) -> Option<(i64, i64)> {
    if batch.len() < BATCH_HEADER_BYTES || u16_at(batch, ATTRIBUTES_AT) & 0x7 != 0 {
        return None;
    }
    let base_offset = i64_at(batch, BASE_OFFSET_AT);
    let base_timestamp = i64_at(batch, 27);
    let count = i32_at(batch, RECORDS_COUNT_AT);
    let mut cursor = &batch[BATCH_HEADER_BYTES..];
    for _ in 0..count.max(0) {
        let (length, rest) = read_varint(cursor)?;
        let length = usize::try_from(length).ok()?;
        if rest.len() < length {
            return None;
        }
        let record = &rest[..length];
        cursor = &rest[length..];
        // attributes (1 byte), then timestampDelta varlong, then offsetDelta varint.
        let (timestamp_delta, after) = read_varint(record.get(1..)?)?;
        let (offset_delta, _) = read_varint(after)?;
        let timestamp = base_timestamp.checked_add(timestamp_delta)?;
        if timestamp >= target_ms {
            return Some((base_offset + offset_delta, timestamp));
        }
    }
    None
}

/// Reads one zigzag varint (Kafka's varint/varlong), returning the value and the bytes after it.
fn read_varint(bytes: &[u8]) -> Option<(i64, &[u8])> {
    let mut raw: u64 = 0;
    for (index, byte) in bytes.iter().enumerate().take(10) {
        raw |= u64::from(byte & 0x7f) << (7 * index);
        if byte & 0x80 == 0 {
            let value = ((raw >> 1) as i64) ^ -((raw & 1) as i64);
            return Some((value, &bytes[index + 1..]));
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Builds an uncompressed batch with `count` records of `value_bytes` each, the way a client does.
    pub(crate) fn batch(count: i32, value_bytes: usize, base_timestamp: i64) -> Vec<u8> {
        crate::storage::testing::build_batch(count, value_bytes, base_timestamp, 0)
    }

    #[test]
    fn validates_a_good_batch_and_assigns_offsets_without_breaking_crc() {
        let mut bytes = batch(3, 10, 1000);
        let found = validate_records(&bytes, 1 << 20).expect("valid");
        assert_eq!(found.len(), 1);
        assert_eq!(found[0].record_count, 3);
        assert_eq!(found[0].size_bytes, bytes.len());
        assign_offset(&mut bytes, 42, 7);
        assert_eq!(
            crc32c::crc32c(&bytes[CRC_COVERED_FROM..]),
            stored_crc(&bytes)
        );
        let header = BatchHeader::parse_prefix(&bytes).expect("header");
        assert_eq!((header.base_offset, header.last_offset()), (42, 44));
    }

    #[test]
    fn rejects_each_kind_of_bad_batch_with_its_own_error() {
        let good = batch(2, 5, 0);
        let check = |bytes: Vec<u8>, max: u32| validate_records(&bytes, max);

        let mut crc = good.clone();
        let last = crc.len() - 1;
        crc[last] ^= 1;
        assert!(matches!(
            check(crc, 1 << 20),
            Err(AppendError::CorruptMessage(_))
        ));

        assert!(matches!(
            check(good.clone(), 70),
            Err(AppendError::MessageTooLarge { max: 70, .. })
        ));

        let mut short = good.clone();
        short.pop();
        assert!(matches!(
            check(short, 1 << 20),
            Err(AppendError::CorruptMessage(_))
        ));

        let mut magic = good.clone();
        magic[MAGIC_AT] = 1;
        assert!(matches!(
            check(magic, 1 << 20),
            Err(AppendError::InvalidRecord(_))
        ));

        let mut offset = good.clone();
        offset[7] = 5;
        assert!(matches!(
            check(offset, 1 << 20),
            Err(AppendError::InvalidRecord(_))
        ));

        // A wrong count is inside the CRC, so fix the CRC to reach the count check.
        let mut count = good.clone();
        count[RECORDS_COUNT_AT + 3] = 9;
        let crc = crc32c::crc32c(&count[CRC_COVERED_FROM..]);
        count[CRC_AT..CRC_AT + 4].copy_from_slice(&crc.to_be_bytes());
        assert!(matches!(
            check(count, 1 << 20),
            Err(AppendError::InvalidRecord(_))
        ));

        assert!(matches!(
            check(Vec::new(), 1 << 20),
            Err(AppendError::InvalidRecord(_))
        ));
        assert!(matches!(
            check(vec![0; 5], 1 << 20),
            Err(AppendError::CorruptMessage(_))
        ));
    }

    #[test]
    fn several_batches_in_one_record_set() {
        let mut bytes = batch(1, 3, 0);
        bytes.extend(batch(4, 3, 0));
        let found = validate_records(&bytes, 1 << 20).expect("valid");
        assert_eq!(found.len(), 2);
        assert_eq!(found[1].position, found[0].size_bytes);
    }

    #[test]
    fn finds_the_first_record_at_a_timestamp() {
        let bytes = batch(5, 4, 1000);
        // build_batch spaces record timestamps 1 ms apart.
        assert_eq!(first_record_at_or_after(&bytes, 1002), Some((2, 1002)));
        assert_eq!(first_record_at_or_after(&bytes, 999), Some((0, 1000)));
        assert_eq!(first_record_at_or_after(&bytes, 2000), None);
    }
}
