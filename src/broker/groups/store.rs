//! The offsets log of one coordinator shard: committed offsets and group metadata as Kafka
//! `__consumer_offsets` records, in RecordBatch v2 batches (so the file is a valid Kafka log segment),
//! at `<log.dir>/__consumer_offsets-<shard>/00000000000000000000.log`.
//!
//! Writes are group-written: while one write is in flight, every record appended meanwhile is
//! gathered into the next single write, so a thousand commits a second cost tens of writes, not a
//! thousand. A request is answered only after its records are written (in the page cache), so a
//! crash of the broker process never loses an acknowledged commit; the file is fdatasync'ed on a
//! timer and at shutdown (as Kafka, which relies on replication rather than fsync, for this log).
//!
//! The log is compacted by snapshot: when it grows well past the size of the live state, the live
//! records are written to a new file which atomically replaces the old one. Records still waiting
//! to be written are written after the snapshot; they are older than or equal to the snapshot's
//! state for their keys, so replaying them leaves the same final state.

use std::cell::{Cell, RefCell};
use std::io;
use std::path::{Path, PathBuf};
use std::rc::Rc;

use bytes::{Buf, Bytes, BytesMut};
use compio::io::AsyncWriteAtExt;
use futures_channel::oneshot;
use kafka_protocol::indexmap::IndexMap;
use kafka_protocol::records::{
    Compression, Record, RecordBatchDecoder, RecordBatchEncoder, RecordEncodeOptions, TimestampType,
};
use tracing::{info, warn};

use super::records::GroupRecord;

const LOG_FILE_NAME: &str = "00000000000000000000.log";
const COMPACT_FILE_NAME: &str = "00000000000000000000.log.compacting";
/// The fixed part of a v2 batch header before the records: enough to read the batch length.
const BATCH_LENGTH_END: usize = 12;
const BATCH_HEADER_BYTES: usize = 61;

/// A task waiting for the write round that holds its records, and where to tell it the outcome.
type WriteWaiter = (u64, oneshot::Sender<Result<(), String>>);

pub struct OffsetStore {
    dir: PathBuf,
    file: RefCell<Rc<compio::fs::File>>,
    /// Bytes of whole batches in the file; the next write goes here.
    len: Cell<u64>,
    /// Offset of the next record, so the log's offsets stay increasing as in any Kafka log.
    next_offset: Cell<i64>,
    /// Encoded batches waiting for the next write, and the round that write will be.
    pending: RefCell<BytesMut>,
    next_round: Cell<u64>,
    writer_active: Cell<bool>,
    waiters: RefCell<Vec<WriteWaiter>>,
    /// Size of the file right after the last compaction (or open): the live state's size.
    live_bytes: Cell<u64>,
}

impl OffsetStore {
    /// Opens (creating if needed) the offsets log in `dir`, returns it with every valid record in
    /// order. A torn or corrupt tail (a crash during a write) is cut off and logged.
    pub async fn open(dir: &Path) -> io::Result<(OffsetStore, Vec<GroupRecord>)> {
        compio::fs::create_dir_all(dir).await?;
        let path = dir.join(LOG_FILE_NAME);
        let compacting = dir.join(COMPACT_FILE_NAME);
        // A compaction that did not reach its rename left a partial file: the old log is intact.
        if std::fs::metadata(&compacting).is_ok() {
            compio::fs::remove_file(&compacting).await?;
        }
        let data = match compio::fs::read(&path).await {
            Ok(data) => Bytes::from(data),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Bytes::new(),
            Err(e) => return Err(e),
        };
        let (records, valid_len, next_offset) = decode_log(data.clone());
        let file = compio::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .await?;
        if (valid_len as usize) < data.len() {
            warn!(path = %path.display(), valid_bytes = valid_len, file_bytes = data.len(),
                  "offsets log: truncating a torn or corrupt tail");
            file.set_len(valid_len).await?;
            file.sync_data().await?;
        }
        let store = OffsetStore {
            dir: dir.to_path_buf(),
            file: RefCell::new(Rc::new(file)),
            len: Cell::new(valid_len),
            next_offset: Cell::new(next_offset),
            pending: RefCell::new(BytesMut::new()),
            next_round: Cell::new(1),
            writer_active: Cell::new(false),
            waiters: RefCell::new(Vec::new()),
            live_bytes: Cell::new(valid_len),
        };
        Ok((store, records))
    }

    pub fn size_bytes(&self) -> u64 {
        self.len.get() + self.pending.borrow().len() as u64
    }

    /// True when the log is big enough, and mostly dead records, that a compaction pays off.
    pub fn wants_compaction(&self, min_bytes: u64) -> bool {
        let size = self.size_bytes();
        size >= min_bytes
            && size >= self.live_bytes.get().saturating_mul(4)
            && !self.writer_active.get()
    }

    /// Appends records and returns once they are written to the file.
    pub async fn append(&self, records: &[GroupRecord]) -> io::Result<()> {
        if records.is_empty() {
            return Ok(());
        }
        let batch = self.encode_batch(records);
        self.pending.borrow_mut().extend_from_slice(&batch);
        let round = self.next_round.get();
        if self.writer_active.get() {
            let (sender, receiver) = oneshot::channel();
            self.waiters.borrow_mut().push((round, sender));
            return match receiver.await {
                Ok(Ok(())) => Ok(()),
                Ok(Err(message)) => Err(io::Error::other(message)),
                Err(_) => Err(io::Error::other("offsets log writer stopped")),
            };
        }
        self.writer_active.set(true);
        let result = self.write_rounds(round).await;
        self.writer_active.set(false);
        result
    }

    /// Writes pending bytes, round after round, until none are left; returns the result of the
    /// round that held `my_round`'s bytes.
    async fn write_rounds(&self, my_round: u64) -> io::Result<()> {
        let mut mine = Ok(());
        loop {
            let buffer = std::mem::take(&mut *self.pending.borrow_mut());
            if buffer.is_empty() {
                return mine;
            }
            let round = self.next_round.get();
            self.next_round.set(round + 1);
            let file = self.file.borrow().clone();
            let position = self.len.get();
            let length = buffer.len() as u64;
            let result = (&*file).write_all_at(buffer, position).await.0;
            if result.is_ok() {
                self.len.set(position + length);
            }
            let message = result.as_ref().err().map(|e| e.to_string());
            let waiters: Vec<_> = {
                let mut all = self.waiters.borrow_mut();
                let (done, later): (Vec<_>, Vec<_>) = all.drain(..).partition(|(r, _)| *r <= round);
                *all = later;
                done
            };
            for (_, sender) in waiters {
                let _ = sender.send(message.clone().map_or(Ok(()), Err));
            }
            if round == my_round {
                mine = result;
            }
        }
    }

    /// Replaces the log with `live`, the records that reproduce the current state.
    pub async fn compact(&self, live: &[GroupRecord]) -> io::Result<()> {
        if self.writer_active.get() {
            return Ok(());
        }
        self.writer_active.set(true);
        let result = self.compact_inner(live).await;
        // Whatever was appended during the compaction goes to the (new) file now.
        let round = self.next_round.get();
        let drained = self.write_rounds(round).await;
        self.writer_active.set(false);
        result.and(drained)
    }

    async fn compact_inner(&self, live: &[GroupRecord]) -> io::Result<()> {
        let before = self.len.get();
        let temp_path = self.dir.join(COMPACT_FILE_NAME);
        let mut data = BytesMut::new();
        // Bounded batches keep each one well under any record-size limit a reader might apply.
        for chunk in live.chunks(500) {
            data.extend_from_slice(&self.encode_batch(chunk));
        }
        let size = data.len() as u64;
        let temp = compio::fs::File::create(&temp_path).await?;
        (&temp).write_all_at(data, 0).await.0?;
        temp.sync_data().await?;
        compio::fs::rename(&temp_path, self.dir.join(LOG_FILE_NAME)).await?;
        compio::fs::File::open(&self.dir).await?.sync_all().await?;
        *self.file.borrow_mut() = Rc::new(temp);
        self.len.set(size);
        self.live_bytes.set(size.max(1));
        info!(dir = %self.dir.display(), before_bytes = before, after_bytes = size, "offsets log compacted");
        Ok(())
    }

    /// fdatasync: everything written so far survives a machine crash.
    pub async fn flush(&self) -> io::Result<()> {
        let file = self.file.borrow().clone();
        file.sync_data().await
    }

    fn encode_batch(&self, records: &[GroupRecord]) -> Bytes {
        let base = self.next_offset.get();
        let now = super::super::now_ms();
        let records: Vec<Record> = records
            .iter()
            .enumerate()
            .map(|(i, record)| {
                let (key, value) = record.encode();
                Record {
                    transactional: false,
                    control: false,
                    delete_horizon: false,
                    partition_leader_epoch: 0,
                    producer_id: -1,
                    producer_epoch: -1,
                    timestamp_type: TimestampType::Creation,
                    offset: base + i as i64,
                    sequence: -1,
                    timestamp: now,
                    key: Some(key),
                    value,
                    headers: IndexMap::new(),
                }
            })
            .collect();
        self.next_offset.set(base + records.len() as i64);
        let mut buf = BytesMut::new();
        let options = RecordEncodeOptions {
            version: 2,
            compression: Compression::None,
        };
        // Encoding uncompressed records into memory cannot fail.
        RecordBatchEncoder::encode(&mut buf, &records, &options)
            .expect("encoding an uncompressed batch");
        buf.freeze()
    }
}

/// Decodes whole, valid batches from the start of `data`; returns the records, the number of bytes
/// they span, and the offset after the last record.
fn decode_log(data: Bytes) -> (Vec<GroupRecord>, u64, i64) {
    let mut records = Vec::new();
    let mut position = 0usize;
    let mut next_offset = 0i64;
    while data.len() - position >= BATCH_HEADER_BYTES {
        let mut header = &data[position..position + BATCH_LENGTH_END];
        let _base_offset = header.get_i64();
        let batch_length = header.get_i32();
        let total = BATCH_LENGTH_END as i64 + i64::from(batch_length);
        if batch_length < 0
            || total < BATCH_HEADER_BYTES as i64
            || position as i64 + total > data.len() as i64
        {
            break;
        }
        let mut batch = data.slice(position..position + total as usize);
        // The decoder verifies the CRC; a batch that fails is where the valid log ends.
        let Ok(set) = RecordBatchDecoder::decode(&mut batch) else {
            break;
        };
        let mut batch_ok = true;
        let mut decoded = Vec::with_capacity(set.records.len());
        for record in set.records {
            next_offset = next_offset.max(record.offset + 1);
            match record.key.map(|key| GroupRecord::decode(key, record.value)) {
                Some(Ok(decoded_record)) => decoded.push(decoded_record),
                _ => {
                    batch_ok = false;
                    break;
                }
            }
        }
        if !batch_ok {
            break;
        }
        records.extend(decoded);
        position += total as usize;
    }
    (records, position as u64, next_offset)
}

#[cfg(test)]
mod tests {
    use super::super::records::OffsetValue;
    use super::*;

    fn commit(group: &str, partition: i32, offset: i64) -> GroupRecord {
        GroupRecord::Offset {
            group: group.into(),
            topic: "t".into(),
            partition,
            value: Some(OffsetValue {
                offset,
                leader_epoch: -1,
                metadata: String::new(),
                commit_timestamp_ms: 0,
            }),
        }
    }

    #[test]
    fn records_survive_reopen_and_a_torn_tail_is_cut() {
        compio::runtime::Runtime::new().unwrap().block_on(async {
            let dir = tempfile::tempdir().unwrap();
            let (store, loaded) = OffsetStore::open(dir.path()).await.unwrap();
            assert!(loaded.is_empty());
            store
                .append(&[commit("g", 0, 1), commit("g", 1, 2)])
                .await
                .unwrap();
            store.append(&[commit("g", 0, 3)]).await.unwrap();
            let written = store.size_bytes();
            drop(store);
            // A crash in the middle of a write: half a batch at the end.
            let path = dir.path().join(LOG_FILE_NAME);
            let mut bytes = std::fs::read(&path).unwrap();
            let half = bytes[..bytes.len() / 2].to_vec();
            bytes.extend_from_slice(&half[..40]);
            std::fs::write(&path, &bytes).unwrap();
            let (store, loaded) = OffsetStore::open(dir.path()).await.unwrap();
            assert_eq!(
                loaded,
                vec![commit("g", 0, 1), commit("g", 1, 2), commit("g", 0, 3)]
            );
            assert_eq!(store.size_bytes(), written, "the torn tail was cut");
            assert_eq!(std::fs::metadata(&path).unwrap().len(), written);
        });
    }

    #[test]
    fn compaction_keeps_only_live_records_and_later_appends() {
        compio::runtime::Runtime::new().unwrap().block_on(async {
            let dir = tempfile::tempdir().unwrap();
            let (store, _) = OffsetStore::open(dir.path()).await.unwrap();
            for offset in 0..1000 {
                store.append(&[commit("g", 0, offset)]).await.unwrap();
            }
            let big = store.size_bytes();
            assert!(store.wants_compaction(1024));
            store.compact(&[commit("g", 0, 999)]).await.unwrap();
            store.append(&[commit("g", 1, 5)]).await.unwrap();
            assert!(
                store.size_bytes() < big / 50,
                "{} vs {big}",
                store.size_bytes()
            );
            drop(store);
            let (_, loaded) = OffsetStore::open(dir.path()).await.unwrap();
            assert_eq!(loaded, vec![commit("g", 0, 999), commit("g", 1, 5)]);
        });
    }

    #[test]
    fn concurrent_appends_share_writes_and_all_complete() {
        compio::runtime::Runtime::new().unwrap().block_on(async {
            let dir = tempfile::tempdir().unwrap();
            let (store, _) = OffsetStore::open(dir.path()).await.unwrap();
            let store = Rc::new(store);
            let tasks: Vec<_> = (0..50)
                .map(|i| {
                    let store = store.clone();
                    compio::runtime::spawn(async move {
                        store.append(&[commit("g", i, i as i64)]).await
                    })
                })
                .collect();
            for task in tasks {
                task.await.unwrap().unwrap();
            }
            drop(store);
            let (_, loaded) = OffsetStore::open(dir.path()).await.unwrap();
            assert_eq!(loaded.len(), 50);
        });
    }
}
