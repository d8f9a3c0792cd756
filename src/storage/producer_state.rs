//! storage::producer_state: the idempotent-producer state of one partition (Kafka's
//! `ProducerStateManager`): per producer id its epoch and the sequence ranges and offsets of its last
//! five batches, the sequence check that classifies an incoming batch, and the `.snapshot` file format.
//!
//! The log consults this state under its append turn, so the check, the offset assignment and the
//! state update happen as one step on the owning shard. Only plain data lives here; the file IO (writing
//! and loading snapshots, rebuilding from the log) is in `log.rs` and `recovery.rs`.

use std::collections::{HashMap, VecDeque};

/// How many batches per producer are remembered for duplicate detection. Kafka keeps five because a
/// producer has at most five requests in flight per partition (`max.in.flight.requests.per.connection`
/// is capped at 5 with idempotence), so a retry can only repeat one of its last five batches.
pub const BATCHES_PER_PRODUCER: usize = 5;

/// What the log remembers of one appended batch of a producer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BatchMetadata {
    pub first_sequence: i32,
    pub last_sequence: i32,
    pub first_offset: i64,
    pub last_offset: i64,
    pub max_timestamp: i64,
}

/// One producer's state in one partition.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProducerEntry {
    pub epoch: i16,
    /// Oldest first; at most `BATCHES_PER_PRODUCER`, never empty for an entry in the map.
    pub batches: VecDeque<BatchMetadata>,
    /// The largest batch timestamp seen from this producer; expiration is judged by it, as Kafka's
    /// `lastTimestamp` (a batch without timestamps counts at the time it was appended).
    pub last_timestamp: i64,
}

impl ProducerEntry {
    fn last_sequence(&self) -> Option<i32> {
        self.batches.back().map(|batch| batch.last_sequence)
    }

    fn find_duplicate(&self, first_sequence: i32, last_sequence: i32) -> Option<BatchMetadata> {
        self.batches
            .iter()
            .find(|batch| {
                batch.first_sequence == first_sequence && batch.last_sequence == last_sequence
            })
            .copied()
    }

    fn push(&mut self, batch: BatchMetadata) {
        self.batches.push_back(batch);
        while self.batches.len() > BATCHES_PER_PRODUCER {
            self.batches.pop_front();
        }
    }
}

/// The producer fields of one incoming batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProducerBatch {
    pub producer_id: i64,
    pub epoch: i16,
    pub first_sequence: i32,
    /// Records in the batch (`lastOffsetDelta + 1`).
    pub record_count: i32,
    pub max_timestamp: i64,
}

impl ProducerBatch {
    /// The batch's last sequence number; sequences wrap from `i32::MAX` to 0 (Kafka's
    /// `DefaultRecordBatch.incrementSequence`).
    pub fn last_sequence(&self) -> i32 {
        increment_sequence(self.first_sequence, self.record_count - 1)
    }
}

/// `sequence + increment` with Kafka's wrap at `i32::MAX`.
pub fn increment_sequence(sequence: i32, increment: i32) -> i32 {
    if sequence > i32::MAX - increment {
        increment - (i32::MAX - sequence) - 1
    } else {
        sequence + increment
    }
}

/// Whether `next` directly follows `last` (with the wrap from `i32::MAX` to 0).
fn in_sequence(last: i32, next: i32) -> bool {
    i64::from(next) == i64::from(last) + 1 || (next == 0 && last == i32::MAX)
}

/// How the log must treat an incoming idempotent batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SequenceCheck {
    /// New data in order (or from a producer this partition does not know): write it.
    Append,
    /// A retry of a batch already in the log: answer with its offsets and write nothing.
    Duplicate(BatchMetadata),
    /// A gap, or a sequence that is neither next nor one of the remembered batches.
    OutOfOrder { expected_after: Option<i32> },
    /// The batch's epoch is older than the producer's current one (a zombie instance).
    InvalidEpoch { current: i16 },
}

/// The producer state of one partition: every producer that appended and has not expired.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ProducerStateMap {
    producers: HashMap<i64, ProducerEntry>,
}

impl ProducerStateMap {
    pub fn len(&self) -> usize {
        self.producers.len()
    }

    pub fn is_empty(&self) -> bool {
        self.producers.is_empty()
    }

    /// The last offsets of every batch the map remembers (up to five per producer). The cleaner
    /// keeps these batches, emptied if need be, so the state can be rebuilt from the log.
    pub fn remembered_batch_last_offsets(&self) -> Vec<i64> {
        self.producers
            .values()
            .flat_map(|entry| entry.batches.iter().map(|batch| batch.last_offset))
            .collect()
    }

    pub fn get(&self, producer_id: i64) -> Option<&ProducerEntry> {
        self.producers.get(&producer_id)
    }

    /// A map holding copies of just the entries of `producer_ids`: the staging area of one append,
    /// merged back with `merge` only once the batches are written.
    pub fn subset(&self, producer_ids: impl IntoIterator<Item = i64>) -> ProducerStateMap {
        let mut producers = HashMap::new();
        for id in producer_ids {
            if let Some(entry) = self.producers.get(&id) {
                producers.insert(id, entry.clone());
            }
        }
        ProducerStateMap { producers }
    }

    /// Replaces this map's entries with those of `staged`.
    pub fn merge(&mut self, staged: ProducerStateMap) {
        self.producers.extend(staged.producers);
    }

    /// Classifies a batch against the current state (Kafka's `findDuplicateBatch`, then
    /// `checkProducerEpoch` and `checkSequence`). A producer this partition does not know (new, or
    /// expired) may start at any sequence, as Kafka accepts since KIP-360.
    pub fn check(&self, batch: &ProducerBatch) -> SequenceCheck {
        let Some(entry) = self.producers.get(&batch.producer_id) else {
            return SequenceCheck::Append;
        };
        if batch.epoch < entry.epoch {
            return SequenceCheck::InvalidEpoch {
                current: entry.epoch,
            };
        }
        if batch.epoch != entry.epoch {
            // A bumped epoch restarts the sequence at 0.
            return if batch.first_sequence == 0 {
                SequenceCheck::Append
            } else {
                SequenceCheck::OutOfOrder {
                    expected_after: None,
                }
            };
        }
        if let Some(duplicate) = entry.find_duplicate(batch.first_sequence, batch.last_sequence()) {
            return SequenceCheck::Duplicate(duplicate);
        }
        match entry.last_sequence() {
            Some(last) if in_sequence(last, batch.first_sequence) => SequenceCheck::Append,
            None => SequenceCheck::Append,
            last => SequenceCheck::OutOfOrder {
                expected_after: last,
            },
        }
    }

    /// Records an appended batch at `first_offset`. Used both after a checked append and while
    /// rebuilding from the log (where nothing is checked: the log is the truth). `now_ms` stands in
    /// for the timestamp of a batch that carries none.
    pub fn apply(&mut self, batch: &ProducerBatch, first_offset: i64, now_ms: i64) {
        let metadata = BatchMetadata {
            first_sequence: batch.first_sequence,
            last_sequence: batch.last_sequence(),
            first_offset,
            last_offset: first_offset + i64::from(batch.record_count) - 1,
            max_timestamp: batch.max_timestamp,
        };
        let timestamp = if batch.max_timestamp >= 0 {
            batch.max_timestamp
        } else {
            now_ms
        };
        let entry = self
            .producers
            .entry(batch.producer_id)
            .or_insert_with(|| ProducerEntry {
                epoch: batch.epoch,
                batches: VecDeque::new(),
                last_timestamp: timestamp,
            });
        if entry.epoch != batch.epoch {
            entry.epoch = batch.epoch;
            entry.batches.clear();
        }
        entry.push(metadata);
        entry.last_timestamp = entry.last_timestamp.max(timestamp);
    }

    /// Forgets producers idle for at least `expiration_ms` (Kafka's `producer.id.expiration.ms`).
    /// Returns how many were removed.
    pub fn expire(&mut self, now_ms: i64, expiration_ms: u64) -> usize {
        let before = self.producers.len();
        let expiration_ms = i64::try_from(expiration_ms).unwrap_or(i64::MAX);
        self.producers
            .retain(|_, entry| now_ms.saturating_sub(entry.last_timestamp) < expiration_ms);
        before - self.producers.len()
    }

    /// Encodes the state as of `offset` (every batch below it applied) as a `.snapshot` file:
    ///
    /// ```text
    /// magic "RBPS" | version u16 = 1 | offset i64 | producer count u32 |
    ///   per producer: id i64 | epoch i16 | last timestamp i64 | batch count u8 |
    ///     per batch: first seq i32 | last seq i32 | first offset i64 | last offset i64 | max timestamp i64
    /// | crc32c u32 of everything before it
    /// ```
    ///
    /// All integers big-endian. Producers are written in id order, so equal states give equal files.
    pub fn encode_snapshot(&self, offset: i64) -> Vec<u8> {
        let mut ids: Vec<&i64> = self.producers.keys().collect();
        ids.sort();
        let mut out = Vec::with_capacity(18 + ids.len() * (19 + 32 * BATCHES_PER_PRODUCER) + 4);
        out.extend_from_slice(SNAPSHOT_MAGIC);
        out.extend_from_slice(&SNAPSHOT_VERSION.to_be_bytes());
        out.extend_from_slice(&offset.to_be_bytes());
        out.extend_from_slice(&(ids.len() as u32).to_be_bytes());
        for id in ids {
            let entry = &self.producers[id];
            out.extend_from_slice(&id.to_be_bytes());
            out.extend_from_slice(&entry.epoch.to_be_bytes());
            out.extend_from_slice(&entry.last_timestamp.to_be_bytes());
            out.push(entry.batches.len() as u8);
            for batch in &entry.batches {
                out.extend_from_slice(&batch.first_sequence.to_be_bytes());
                out.extend_from_slice(&batch.last_sequence.to_be_bytes());
                out.extend_from_slice(&batch.first_offset.to_be_bytes());
                out.extend_from_slice(&batch.last_offset.to_be_bytes());
                out.extend_from_slice(&batch.max_timestamp.to_be_bytes());
            }
        }
        let crc = crc32c::crc32c(&out);
        out.extend_from_slice(&crc.to_be_bytes());
        out
    }

    /// Decodes a `.snapshot` file; returns the offset it was taken at and the state, or why it is
    /// unusable (bad CRC, truncated, unknown version, inconsistent counts).
    pub fn decode_snapshot(bytes: &[u8]) -> Result<(i64, ProducerStateMap), String> {
        if bytes.len() < SNAPSHOT_FIXED_BYTES + 4 {
            return Err(format!("{} bytes is too short for a snapshot", bytes.len()));
        }
        let (body, crc_bytes) = bytes.split_at(bytes.len() - 4);
        let stored = u32::from_be_bytes([crc_bytes[0], crc_bytes[1], crc_bytes[2], crc_bytes[3]]);
        let computed = crc32c::crc32c(body);
        if stored != computed {
            return Err(format!(
                "CRC mismatch: stored {stored:#010x}, computed {computed:#010x}"
            ));
        }
        let mut reader = Reader { bytes: body, at: 0 };
        if reader.take(4)? != SNAPSHOT_MAGIC {
            return Err("bad magic".into());
        }
        let version = reader.u16()?;
        if version != SNAPSHOT_VERSION {
            return Err(format!("unknown snapshot version {version}"));
        }
        let offset = reader.i64()?;
        let count = reader.u32()? as usize;
        // Each producer takes at least 19 bytes: a count larger than the rest is corruption, and
        // checking it first keeps a damaged count from reserving memory.
        if count > body.len() / 19 {
            return Err(format!("producer count {count} exceeds the file"));
        }
        let mut producers = HashMap::with_capacity(count);
        for _ in 0..count {
            let id = reader.i64()?;
            let epoch = reader.i16()?;
            let last_timestamp = reader.i64()?;
            let batch_count = reader.u8()? as usize;
            if batch_count == 0 || batch_count > BATCHES_PER_PRODUCER || id < 0 {
                return Err(format!(
                    "producer {id} has {batch_count} batches (1..={BATCHES_PER_PRODUCER} allowed)"
                ));
            }
            let mut batches = VecDeque::with_capacity(batch_count);
            for _ in 0..batch_count {
                batches.push_back(BatchMetadata {
                    first_sequence: reader.i32()?,
                    last_sequence: reader.i32()?,
                    first_offset: reader.i64()?,
                    last_offset: reader.i64()?,
                    max_timestamp: reader.i64()?,
                });
            }
            producers.insert(
                id,
                ProducerEntry {
                    epoch,
                    batches,
                    last_timestamp,
                },
            );
        }
        if reader.at != body.len() {
            return Err(format!(
                "{} bytes after the last producer",
                body.len() - reader.at
            ));
        }
        Ok((offset, ProducerStateMap { producers }))
    }
}

const SNAPSHOT_MAGIC: &[u8; 4] = b"RBPS";
const SNAPSHOT_VERSION: u16 = 1;
/// magic + version + offset + count.
const SNAPSHOT_FIXED_BYTES: usize = 4 + 2 + 8 + 4;

/// The file name of a snapshot taken at `offset`: `<20-digit offset>.snapshot`, as Kafka names them.
pub fn snapshot_file_name(offset: i64) -> String {
    format!("{offset:020}.snapshot")
}

struct Reader<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, count: usize) -> Result<&'a [u8], String> {
        let end = self
            .at
            .checked_add(count)
            .filter(|end| *end <= self.bytes.len())
            .ok_or_else(|| format!("truncated at byte {}", self.at))?;
        let slice = &self.bytes[self.at..end];
        self.at = end;
        Ok(slice)
    }

    fn u8(&mut self) -> Result<u8, String> {
        Ok(self.take(1)?[0])
    }

    fn u16(&mut self) -> Result<u16, String> {
        let raw = self.take(2)?;
        Ok(u16::from_be_bytes([raw[0], raw[1]]))
    }

    fn i16(&mut self) -> Result<i16, String> {
        Ok(self.u16()? as i16)
    }

    fn u32(&mut self) -> Result<u32, String> {
        let raw = self.take(4)?;
        Ok(u32::from_be_bytes([raw[0], raw[1], raw[2], raw[3]]))
    }

    fn i32(&mut self) -> Result<i32, String> {
        Ok(self.u32()? as i32)
    }

    fn i64(&mut self) -> Result<i64, String> {
        let raw = self.take(8)?;
        let mut array = [0u8; 8];
        array.copy_from_slice(raw);
        Ok(i64::from_be_bytes(array))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn batch(
        producer_id: i64,
        epoch: i16,
        first_sequence: i32,
        record_count: i32,
    ) -> ProducerBatch {
        ProducerBatch {
            producer_id,
            epoch,
            first_sequence,
            record_count,
            max_timestamp: 1_000,
        }
    }

    /// Applies `batch` if the check says append, returning the check.
    fn offer(
        state: &mut ProducerStateMap,
        next_offset: &mut i64,
        batch: ProducerBatch,
    ) -> SequenceCheck {
        let check = state.check(&batch);
        if check == SequenceCheck::Append {
            state.apply(&batch, *next_offset, 0);
            *next_offset += i64::from(batch.record_count);
        }
        check
    }

    #[test]
    fn classifies_each_kind_of_batch() {
        let mut state = ProducerStateMap::default();
        let mut next = 0;
        // Unknown producers may start anywhere (KIP-360).
        assert_eq!(
            offer(&mut state, &mut next, batch(7, 0, 5, 3)),
            SequenceCheck::Append
        );
        assert_eq!(
            offer(&mut state, &mut next, batch(7, 0, 8, 2)),
            SequenceCheck::Append
        );
        // Retry of either batch: duplicate, with the offsets it was first written at.
        match state.check(&batch(7, 0, 5, 3)) {
            SequenceCheck::Duplicate(found) => {
                assert_eq!((found.first_offset, found.last_offset), (0, 2))
            }
            other => panic!("{other:?}"),
        }
        match state.check(&batch(7, 0, 8, 2)) {
            SequenceCheck::Duplicate(found) => assert_eq!(found.first_offset, 3),
            other => panic!("{other:?}"),
        }
        // A gap, and an overlap that is no remembered batch.
        assert_eq!(
            state.check(&batch(7, 0, 11, 1)),
            SequenceCheck::OutOfOrder {
                expected_after: Some(9)
            }
        );
        assert!(matches!(
            state.check(&batch(7, 0, 6, 1)),
            SequenceCheck::OutOfOrder { .. }
        ));
        // An older epoch is fenced; a newer one must restart at 0.
        assert_eq!(
            offer(&mut state, &mut next, batch(7, 1, 0, 1)),
            SequenceCheck::Append
        );
        assert_eq!(
            state.check(&batch(7, 0, 10, 1)),
            SequenceCheck::InvalidEpoch { current: 1 }
        );
        assert!(matches!(
            state.check(&batch(7, 2, 4, 1)),
            SequenceCheck::OutOfOrder { .. }
        ));
        // The epoch bump forgot the old batches.
        assert_eq!(state.get(7).unwrap().batches.len(), 1);
        // Other producers are independent.
        assert_eq!(
            offer(&mut state, &mut next, batch(8, 0, 0, 1)),
            SequenceCheck::Append
        );
    }

    #[test]
    fn only_the_last_five_batches_are_recognised() {
        let mut state = ProducerStateMap::default();
        let mut next = 0;
        for sequence in 0..7 {
            assert_eq!(
                offer(&mut state, &mut next, batch(1, 0, sequence, 1)),
                SequenceCheck::Append
            );
        }
        for sequence in 2..7 {
            assert!(matches!(
                state.check(&batch(1, 0, sequence, 1)),
                SequenceCheck::Duplicate(found) if found.first_offset == i64::from(sequence)
            ));
        }
        // Older than the window: Kafka answers OUT_OF_ORDER_SEQUENCE_NUMBER.
        assert!(matches!(
            state.check(&batch(1, 0, 1, 1)),
            SequenceCheck::OutOfOrder { .. }
        ));
    }

    #[test]
    fn sequences_wrap_at_i32_max() {
        assert_eq!(increment_sequence(i32::MAX, 1), 0);
        assert_eq!(increment_sequence(i32::MAX - 1, 3), 1);
        assert_eq!(batch(1, 0, i32::MAX - 1, 2).last_sequence(), i32::MAX);
        let mut state = ProducerStateMap::default();
        let mut next = 0;
        offer(&mut state, &mut next, batch(1, 0, i32::MAX - 2, 2));
        // Next batch crosses the wrap: i32::MAX, 0, 1.
        assert_eq!(
            offer(&mut state, &mut next, batch(1, 0, i32::MAX, 3)),
            SequenceCheck::Append
        );
        assert_eq!(
            state.get(1).unwrap().batches.back().unwrap().last_sequence,
            1
        );
        assert_eq!(
            offer(&mut state, &mut next, batch(1, 0, 2, 1)),
            SequenceCheck::Append
        );
        assert!(matches!(
            state.check(&batch(1, 0, i32::MAX, 3)),
            SequenceCheck::Duplicate(_)
        ));
    }

    #[test]
    fn producers_expire_after_the_idle_time() {
        let mut state = ProducerStateMap::default();
        state.apply(&batch(1, 0, 0, 1), 0, 0);
        let mut late = batch(2, 0, 0, 1);
        late.max_timestamp = 5_000;
        state.apply(&late, 1, 0);
        // batch() stamps 1_000; producer 1 idles 4_000 ms at now = 5_000.
        assert_eq!(state.expire(5_000, 4_001), 0);
        assert_eq!(state.expire(5_000, 4_000), 1);
        assert!(state.get(1).is_none() && state.get(2).is_some());
        // Expired means unknown: any sequence is accepted again.
        assert_eq!(state.check(&batch(1, 0, 99, 1)), SequenceCheck::Append);
    }

    #[test]
    fn snapshot_round_trips_and_rejects_damage() {
        let mut state = ProducerStateMap::default();
        let mut next = 0;
        for id in 0..3 {
            for sequence in 0..(id as i32 + 4) {
                offer(&mut state, &mut next, batch(id, id as i16, sequence, 2));
            }
        }
        let bytes = state.encode_snapshot(next);
        let (offset, decoded) = ProducerStateMap::decode_snapshot(&bytes).expect("decodes");
        assert_eq!(offset, next);
        assert_eq!(decoded, state);
        for position in 0..bytes.len() {
            let mut damaged = bytes.clone();
            damaged[position] ^= 0x40;
            assert!(
                ProducerStateMap::decode_snapshot(&damaged).is_err(),
                "flip at {position}"
            );
        }
        for length in 0..bytes.len() {
            assert!(ProducerStateMap::decode_snapshot(&bytes[..length]).is_err());
        }
        let empty = ProducerStateMap::default().encode_snapshot(42);
        assert_eq!(
            ProducerStateMap::decode_snapshot(&empty).unwrap(),
            (42, ProducerStateMap::default())
        );
    }

    /// A model of one idempotent producer with retries: the producer sends batches in order, each
    /// possibly retried later (while at most five are unacknowledged, as a real client); the log must
    /// hold every batch exactly once, in sequence order.
    #[derive(Debug, Clone)]
    enum Step {
        Send { records: i32 },
        Retry { back: usize },
    }

    fn step() -> impl Strategy<Value = Step> {
        prop_oneof![
            (1..4i32).prop_map(|records| Step::Send { records }),
            (0..8usize).prop_map(|back| Step::Retry { back }),
        ]
    }

    proptest! {
        #[test]
        fn retries_within_the_window_are_never_written_twice(
            start in prop_oneof![Just(0i32), Just(i32::MAX - 5), 0..1000i32],
            steps in proptest::collection::vec(step(), 1..60),
        ) {
            let mut state = ProducerStateMap::default();
            let mut next_offset = 0i64;
            let mut next_sequence = start;
            // (first sequence, records, offset it was written at) of every batch sent.
            let mut sent: Vec<(i32, i32, i64)> = Vec::new();
            let mut written = 0usize;
            for step in steps {
                match step {
                    Step::Send { records } => {
                        let incoming = batch(3, 0, next_sequence, records);
                        let check = state.check(&incoming);
                        prop_assert_eq!(check, SequenceCheck::Append);
                        state.apply(&incoming, next_offset, 0);
                        sent.push((next_sequence, records, next_offset));
                        next_offset += i64::from(records);
                        next_sequence = increment_sequence(next_sequence, records);
                        written += 1;
                    }
                    Step::Retry { back } if back < sent.len() => {
                        let (sequence, records, offset) = sent[sent.len() - 1 - back];
                        let check = state.check(&batch(3, 0, sequence, records));
                        if back < BATCHES_PER_PRODUCER {
                            prop_assert!(
                                matches!(check, SequenceCheck::Duplicate(found) if found.first_offset == offset),
                                "retry {back} back: {check:?}"
                            );
                        } else {
                            prop_assert!(matches!(check, SequenceCheck::OutOfOrder { .. }), "{check:?}");
                        }
                    }
                    Step::Retry { .. } => {}
                }
            }
            prop_assert_eq!(written, sent.len());
        }
    }
}
