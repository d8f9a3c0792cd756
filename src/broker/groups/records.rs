//! Kafka's `__consumer_offsets` record keys and values, byte for byte (the schemas in Kafka's
//! group-coordinator module: OffsetCommitKey/Value and GroupMetadataKey/Value). kafka-protocol does
//! not carry these schemas, so they are written here; only the versions this broker writes, and the
//! ones Kafka itself writes today, are read.

use bytes::{Buf, BufMut, Bytes, BytesMut};

/// A record of the offsets log, decoded.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum GroupRecord {
    /// A committed offset, or its deletion (`value == None`, a tombstone).
    Offset {
        group: String,
        topic: String,
        partition: i32,
        value: Option<OffsetValue>,
    },
    /// A group's membership and assignment, or the group's deletion (a tombstone).
    Group {
        group: String,
        value: Option<GroupValue>,
    },
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OffsetValue {
    pub offset: i64,
    pub leader_epoch: i32,
    pub metadata: String,
    pub commit_timestamp_ms: i64,
}

#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct GroupValue {
    pub protocol_type: String,
    pub generation: i32,
    pub protocol: Option<String>,
    pub leader: Option<String>,
    pub current_state_timestamp_ms: i64,
    pub members: Vec<MemberValue>,
}

#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct MemberValue {
    pub member_id: String,
    pub group_instance_id: Option<String>,
    pub client_id: String,
    pub client_host: String,
    pub rebalance_timeout_ms: i32,
    pub session_timeout_ms: i32,
    pub subscription: Bytes,
    pub assignment: Bytes,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RecordFormatError {
    #[error("record is truncated")]
    Truncated,
    #[error("unknown key version {0}")]
    UnknownKeyVersion(i16),
    #[error("unknown value version {0}")]
    UnknownValueVersion(i16),
    #[error("string is not UTF-8")]
    NotUtf8,
}

/// Key versions 0 and 1 are offset commits, 2 is group metadata (Kafka's CoordinatorRecordType).
const OFFSET_KEY_VERSION: i16 = 1;
const GROUP_KEY_VERSION: i16 = 2;
/// OffsetCommitValue v3: offset, leader epoch, metadata, commit timestamp (no expire timestamp).
const OFFSET_VALUE_VERSION: i16 = 3;
/// GroupMetadataValue v3: adds group instance ids (static membership).
const GROUP_VALUE_VERSION: i16 = 3;

impl GroupRecord {
    pub fn group_id(&self) -> &str {
        match self {
            GroupRecord::Offset { group, .. } | GroupRecord::Group { group, .. } => group,
        }
    }

    /// Encodes the record's key and value (None for a tombstone).
    pub fn encode(&self) -> (Bytes, Option<Bytes>) {
        let mut key = BytesMut::new();
        match self {
            GroupRecord::Offset {
                group,
                topic,
                partition,
                value,
            } => {
                key.put_i16(OFFSET_KEY_VERSION);
                put_string(&mut key, group);
                put_string(&mut key, topic);
                key.put_i32(*partition);
                let value = value.as_ref().map(|v| {
                    let mut buf = BytesMut::new();
                    buf.put_i16(OFFSET_VALUE_VERSION);
                    buf.put_i64(v.offset);
                    buf.put_i32(v.leader_epoch);
                    put_string(&mut buf, &v.metadata);
                    buf.put_i64(v.commit_timestamp_ms);
                    buf.freeze()
                });
                (key.freeze(), value)
            }
            GroupRecord::Group { group, value } => {
                key.put_i16(GROUP_KEY_VERSION);
                put_string(&mut key, group);
                let value = value.as_ref().map(|v| {
                    let mut buf = BytesMut::new();
                    buf.put_i16(GROUP_VALUE_VERSION);
                    put_string(&mut buf, &v.protocol_type);
                    buf.put_i32(v.generation);
                    put_nullable_string(&mut buf, v.protocol.as_deref());
                    put_nullable_string(&mut buf, v.leader.as_deref());
                    buf.put_i64(v.current_state_timestamp_ms);
                    buf.put_i32(v.members.len() as i32);
                    for m in &v.members {
                        put_string(&mut buf, &m.member_id);
                        put_nullable_string(&mut buf, m.group_instance_id.as_deref());
                        put_string(&mut buf, &m.client_id);
                        put_string(&mut buf, &m.client_host);
                        buf.put_i32(m.rebalance_timeout_ms);
                        buf.put_i32(m.session_timeout_ms);
                        put_bytes(&mut buf, &m.subscription);
                        put_bytes(&mut buf, &m.assignment);
                    }
                    buf.freeze()
                });
                (key.freeze(), value)
            }
        }
    }

    pub fn decode(mut key: Bytes, value: Option<Bytes>) -> Result<GroupRecord, RecordFormatError> {
        let key_version = get_i16(&mut key)?;
        match key_version {
            0 | 1 => {
                let group = get_string(&mut key)?;
                let topic = get_string(&mut key)?;
                let partition = get_i32(&mut key)?;
                let value = value.map(decode_offset_value).transpose()?;
                Ok(GroupRecord::Offset {
                    group,
                    topic,
                    partition,
                    value,
                })
            }
            2 => {
                let group = get_string(&mut key)?;
                let value = value.map(decode_group_value).transpose()?;
                Ok(GroupRecord::Group { group, value })
            }
            other => Err(RecordFormatError::UnknownKeyVersion(other)),
        }
    }
}

fn decode_offset_value(mut buf: Bytes) -> Result<OffsetValue, RecordFormatError> {
    let version = get_i16(&mut buf)?;
    if !(0..=3).contains(&version) {
        return Err(RecordFormatError::UnknownValueVersion(version));
    }
    let offset = get_i64(&mut buf)?;
    let leader_epoch = if version >= 3 { get_i32(&mut buf)? } else { -1 };
    let metadata = get_string(&mut buf)?;
    let commit_timestamp_ms = get_i64(&mut buf)?;
    Ok(OffsetValue {
        offset,
        leader_epoch,
        metadata,
        commit_timestamp_ms,
    })
}

fn decode_group_value(mut buf: Bytes) -> Result<GroupValue, RecordFormatError> {
    let version = get_i16(&mut buf)?;
    if !(0..=3).contains(&version) {
        return Err(RecordFormatError::UnknownValueVersion(version));
    }
    let protocol_type = get_string(&mut buf)?;
    let generation = get_i32(&mut buf)?;
    let protocol = get_nullable_string(&mut buf)?;
    let leader = get_nullable_string(&mut buf)?;
    let current_state_timestamp_ms = if version >= 2 { get_i64(&mut buf)? } else { -1 };
    let count = get_i32(&mut buf)?.max(0) as usize;
    // Each member takes at least a few bytes, so the count cannot exceed what is left.
    let mut members = Vec::with_capacity(count.min(buf.remaining()));
    for _ in 0..count {
        let member_id = get_string(&mut buf)?;
        let group_instance_id = if version >= 3 {
            get_nullable_string(&mut buf)?
        } else {
            None
        };
        let client_id = get_string(&mut buf)?;
        let client_host = get_string(&mut buf)?;
        let rebalance_timeout_ms = if version >= 1 { get_i32(&mut buf)? } else { -1 };
        let session_timeout_ms = get_i32(&mut buf)?;
        let subscription = get_bytes(&mut buf)?;
        let assignment = get_bytes(&mut buf)?;
        members.push(MemberValue {
            member_id,
            group_instance_id,
            client_id,
            client_host,
            rebalance_timeout_ms,
            session_timeout_ms,
            subscription,
            assignment,
        });
    }
    Ok(GroupValue {
        protocol_type,
        generation,
        protocol,
        leader,
        current_state_timestamp_ms,
        members,
    })
}

fn put_string(buf: &mut BytesMut, s: &str) {
    buf.put_i16(s.len() as i16);
    buf.put_slice(s.as_bytes());
}

fn put_nullable_string(buf: &mut BytesMut, s: Option<&str>) {
    match s {
        Some(s) => put_string(buf, s),
        None => buf.put_i16(-1),
    }
}

fn put_bytes(buf: &mut BytesMut, b: &[u8]) {
    buf.put_i32(b.len() as i32);
    buf.put_slice(b);
}

fn need(buf: &Bytes, n: usize) -> Result<(), RecordFormatError> {
    if buf.remaining() < n {
        Err(RecordFormatError::Truncated)
    } else {
        Ok(())
    }
}

fn get_i16(buf: &mut Bytes) -> Result<i16, RecordFormatError> {
    need(buf, 2)?;
    Ok(buf.get_i16())
}

fn get_i32(buf: &mut Bytes) -> Result<i32, RecordFormatError> {
    need(buf, 4)?;
    Ok(buf.get_i32())
}

fn get_i64(buf: &mut Bytes) -> Result<i64, RecordFormatError> {
    need(buf, 8)?;
    Ok(buf.get_i64())
}

fn get_nullable_string(buf: &mut Bytes) -> Result<Option<String>, RecordFormatError> {
    let len = get_i16(buf)?;
    if len < 0 {
        return Ok(None);
    }
    need(buf, len as usize)?;
    let bytes = buf.split_to(len as usize);
    String::from_utf8(bytes.to_vec())
        .map(Some)
        .map_err(|_| RecordFormatError::NotUtf8)
}

fn get_string(buf: &mut Bytes) -> Result<String, RecordFormatError> {
    Ok(get_nullable_string(buf)?.unwrap_or_default())
}

fn get_bytes(buf: &mut Bytes) -> Result<Bytes, RecordFormatError> {
    let len = get_i32(buf)?;
    if len < 0 {
        return Ok(Bytes::new());
    }
    need(buf, len as usize)?;
    Ok(buf.split_to(len as usize))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn round_trip(record: GroupRecord) {
        let (key, value) = record.encode();
        assert_eq!(GroupRecord::decode(key, value).unwrap(), record);
    }

    #[test]
    fn offset_records_round_trip() {
        round_trip(GroupRecord::Offset {
            group: "g".into(),
            topic: "orders".into(),
            partition: 7,
            value: Some(OffsetValue {
                offset: 42,
                leader_epoch: 0,
                metadata: "m".into(),
                commit_timestamp_ms: 1_700_000_000_000,
            }),
        });
        round_trip(GroupRecord::Offset {
            group: "g".into(),
            topic: "orders".into(),
            partition: 7,
            value: None,
        });
    }

    #[test]
    fn group_records_round_trip() {
        round_trip(GroupRecord::Group {
            group: "g".into(),
            value: Some(GroupValue {
                protocol_type: "consumer".into(),
                generation: 3,
                protocol: Some("range".into()),
                leader: Some("m-1".into()),
                current_state_timestamp_ms: 5,
                members: vec![MemberValue {
                    member_id: "m-1".into(),
                    group_instance_id: Some("static-1".into()),
                    client_id: "c".into(),
                    client_host: "/127.0.0.1".into(),
                    rebalance_timeout_ms: 300_000,
                    session_timeout_ms: 45_000,
                    subscription: Bytes::from_static(b"sub"),
                    assignment: Bytes::from_static(b"asg"),
                }],
            }),
        });
        round_trip(GroupRecord::Group {
            group: "g".into(),
            value: None,
        });
    }

    /// The exact bytes Kafka writes for OffsetCommitKey v1 {group "g", topic "t", partition 1}.
    #[test]
    fn offset_key_matches_kafkas_layout() {
        let (key, _) = GroupRecord::Offset {
            group: "g".into(),
            topic: "t".into(),
            partition: 1,
            value: None,
        }
        .encode();
        assert_eq!(&key[..], &[0, 1, 0, 1, b'g', 0, 1, b't', 0, 0, 0, 1]);
    }

    #[test]
    fn truncated_and_unknown_records_are_errors() {
        assert_eq!(
            GroupRecord::decode(Bytes::from_static(&[0, 1, 0, 9, b'g']), None),
            Err(RecordFormatError::Truncated)
        );
        assert_eq!(
            GroupRecord::decode(Bytes::from_static(&[0, 9]), None),
            Err(RecordFormatError::UnknownKeyVersion(9))
        );
    }
}
