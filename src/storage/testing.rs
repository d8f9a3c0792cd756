//! storage::testing: builds real, uncompressed RecordBatch v2 bytes as a client would send them, for
//! the storage tests, benches and any other module's tests. It is an encoder, not a stand-in.

/// Appends a zigzag varint (Kafka's record-level varint/varlong encoding).
fn put_varint(out: &mut Vec<u8>, value: i64) {
    let mut raw = ((value << 1) ^ (value >> 63)) as u64;
    loop {
        if raw < 0x80 {
            out.push(raw as u8);
            return;
        }
        out.push((raw as u8 & 0x7f) | 0x80);
        raw >>= 7;
    }
}

/// One uncompressed batch of `count` records, each with a `value_bytes` value whose bytes derive from
/// `seed` and the record index (so two batches with different seeds differ). Record timestamps start at
/// `base_timestamp` and grow by 1 ms per record. baseOffset is 0, as clients send it.
pub fn build_batch(count: i32, value_bytes: usize, base_timestamp: i64, seed: u64) -> Vec<u8> {
    let count = count.max(1);
    let mut records = Vec::with_capacity(count as usize * (value_bytes + 16));
    for index in 0..count {
        let mut body = Vec::with_capacity(value_bytes + 12);
        body.push(0); // record attributes, unused
        put_varint(&mut body, i64::from(index)); // timestampDelta
        put_varint(&mut body, i64::from(index)); // offsetDelta
        put_varint(&mut body, -1); // null key
        put_varint(&mut body, value_bytes as i64);
        let mut state = seed
            .wrapping_mul(0x9E37_79B9_7F4A_7C15)
            .wrapping_add(index as u64 + 1);
        for _ in 0..value_bytes {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            body.push(state as u8);
        }
        put_varint(&mut body, 0); // no headers
        put_varint(&mut records, body.len() as i64);
        records.extend_from_slice(&body);
    }
    let mut batch = Vec::with_capacity(61 + records.len());
    batch.extend_from_slice(&0i64.to_be_bytes()); // baseOffset
    batch.extend_from_slice(&((49 + records.len()) as i32).to_be_bytes()); // batchLength
    batch.extend_from_slice(&(-1i32).to_be_bytes()); // partitionLeaderEpoch
    batch.push(2); // magic
    batch.extend_from_slice(&[0; 4]); // crc, filled below
    batch.extend_from_slice(&0i16.to_be_bytes()); // attributes: no compression, CreateTime
    batch.extend_from_slice(&(count - 1).to_be_bytes()); // lastOffsetDelta
    batch.extend_from_slice(&base_timestamp.to_be_bytes());
    batch.extend_from_slice(&(base_timestamp + i64::from(count - 1)).to_be_bytes()); // maxTimestamp
    batch.extend_from_slice(&(-1i64).to_be_bytes()); // producerId
    batch.extend_from_slice(&(-1i16).to_be_bytes()); // producerEpoch
    batch.extend_from_slice(&(-1i32).to_be_bytes()); // baseSequence
    batch.extend_from_slice(&count.to_be_bytes()); // recordsCount
    batch.extend_from_slice(&records);
    let crc = crc32c::crc32c(&batch[21..]);
    batch[17..21].copy_from_slice(&crc.to_be_bytes());
    batch
}

/// Like `build_batch`, from an idempotent producer: `producer_id`, `epoch` and `base_sequence` are
/// set in the header and the CRC recomputed, as a client with `enable.idempotence` sends it.
pub fn build_idempotent_batch(
    count: i32,
    value_bytes: usize,
    base_timestamp: i64,
    producer_id: i64,
    epoch: i16,
    base_sequence: i32,
) -> Vec<u8> {
    let mut batch = build_batch(count, value_bytes, base_timestamp, base_sequence as u64);
    batch[43..51].copy_from_slice(&producer_id.to_be_bytes());
    batch[51..53].copy_from_slice(&epoch.to_be_bytes());
    batch[53..57].copy_from_slice(&base_sequence.to_be_bytes());
    let crc = crc32c::crc32c(&batch[21..]);
    batch[17..21].copy_from_slice(&crc.to_be_bytes());
    batch
}

/// A batch whose total size is close to `target_bytes`: records of about `record_bytes` each.
pub fn build_batch_of_size(
    target_bytes: usize,
    record_bytes: usize,
    base_timestamp: i64,
    seed: u64,
) -> Vec<u8> {
    let per_record = record_bytes.max(1) + 8;
    let count = ((target_bytes.saturating_sub(61)) / per_record).max(1);
    build_batch(count as i32, record_bytes, base_timestamp, seed)
}
