//! Produce v0–v2: advertised (librdkafka only enables compression when the Produce range overlaps
//! 2..2) but not accepted, since they carry message formats before v2. kafka-protocol 0.18 cannot decode
//! or encode these versions, so this file parses just enough of the request (topic names and partition
//! indexes) to answer every partition with UNSUPPORTED_VERSION, as Kafka 4 does (KAFKA-18659).

use bytes::{Buf, BufMut, Bytes, BytesMut};

use super::versions::UNSUPPORTED_VERSION;

/// The parsed request: acks, and (topic name bytes, partition indexes) in request order.
struct LegacyProduce {
    acks: i16,
    topics: Vec<(Bytes, Vec<i32>)>,
}

fn parse(mut body: Bytes) -> Option<LegacyProduce> {
    let need = |body: &Bytes, n: usize| body.remaining() >= n;
    if !need(&body, 10) {
        return None;
    }
    let acks = body.get_i16();
    let _timeout_ms = body.get_i32();
    let topic_count = body.get_i32();
    // Every topic takes at least six bytes: a count beyond that is malformed, not a reason to allocate.
    if topic_count < 0 || topic_count as usize > body.remaining() / 6 {
        return None;
    }
    let mut topics = Vec::with_capacity(topic_count as usize);
    for _ in 0..topic_count {
        if !need(&body, 2) {
            return None;
        }
        let name_len = body.get_i16();
        if name_len < 0 || !need(&body, name_len as usize + 4) {
            return None;
        }
        let name = body.split_to(name_len as usize);
        let partition_count = body.get_i32();
        if partition_count < 0 || partition_count as usize > body.remaining() / 8 {
            return None;
        }
        let mut partitions = Vec::with_capacity(partition_count as usize);
        for _ in 0..partition_count {
            if !need(&body, 8) {
                return None;
            }
            partitions.push(body.get_i32());
            let records_len = body.get_i32();
            if records_len > 0 {
                if !need(&body, records_len as usize) {
                    return None;
                }
                body.advance(records_len as usize);
            }
        }
        topics.push((name, partitions));
    }
    Some(LegacyProduce { acks, topics })
}

/// The whole response frame for a Produce v0–v2 request `body` (after its header): every partition
/// gets UNSUPPORTED_VERSION. `Ok(None)` means acks=0 (no response); `Err(())` means the body does not
/// parse, and the connection should be closed.
pub fn unsupported_produce_frame(
    version: i16,
    correlation_id: i32,
    body: Bytes,
) -> Result<Option<Bytes>, ()> {
    let request = parse(body).ok_or(())?;
    if request.acks == 0 {
        return Ok(None);
    }
    let mut frame = BytesMut::new();
    frame.put_i32(0); // The size, patched below.
    frame.put_i32(correlation_id); // Response header v0.
    frame.put_i32(request.topics.len() as i32);
    for (name, partitions) in &request.topics {
        frame.put_i16(name.len() as i16);
        frame.put_slice(name);
        frame.put_i32(partitions.len() as i32);
        for partition in partitions {
            frame.put_i32(*partition);
            frame.put_i16(UNSUPPORTED_VERSION);
            frame.put_i64(-1); // base offset
            if version >= 2 {
                frame.put_i64(-1); // log append time
            }
        }
    }
    if version >= 1 {
        frame.put_i32(0); // throttle time
    }
    let size = (frame.len() - 4) as i32;
    frame[..4].copy_from_slice(&size.to_be_bytes());
    Ok(Some(frame.freeze()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(acks: i16) -> Bytes {
        let mut body = BytesMut::new();
        body.put_i16(acks);
        body.put_i32(1000);
        body.put_i32(1);
        body.put_i16(1);
        body.put_slice(b"t");
        body.put_i32(2);
        for partition in [0, 3] {
            body.put_i32(partition);
            body.put_i32(4);
            body.put_slice(b"junk");
        }
        body.freeze()
    }

    #[test]
    fn every_partition_gets_unsupported_version() {
        let frame = unsupported_produce_frame(2, 9, request(1))
            .unwrap()
            .unwrap();
        let mut f = frame.clone();
        assert_eq!(f.get_i32() as usize, frame.len() - 4);
        assert_eq!(f.get_i32(), 9);
        assert_eq!(f.get_i32(), 1);
        assert_eq!(f.get_i16(), 1);
        assert_eq!(f.split_to(1), Bytes::from_static(b"t"));
        assert_eq!(f.get_i32(), 2);
        for partition in [0, 3] {
            assert_eq!(f.get_i32(), partition);
            assert_eq!(f.get_i16(), UNSUPPORTED_VERSION);
            assert_eq!(f.get_i64(), -1);
            assert_eq!(f.get_i64(), -1);
        }
        assert_eq!(f.get_i32(), 0);
        assert!(f.is_empty());
    }

    #[test]
    fn acks_zero_gets_nothing_and_garbage_is_refused() {
        assert_eq!(unsupported_produce_frame(0, 1, request(0)), Ok(None));
        assert_eq!(
            unsupported_produce_frame(0, 1, Bytes::from_static(&[0, 1, 0])),
            Err(())
        );
        let mut huge = BytesMut::new();
        huge.put_i16(1);
        huge.put_i32(0);
        huge.put_i32(i32::MAX);
        assert_eq!(unsupported_produce_frame(0, 1, huge.freeze()), Err(()));
    }
}
