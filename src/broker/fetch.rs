//! Fetch (with long-poll) and ListOffsets: read ranges of the partition logs this shard owns.
//!
//! Fetch never copies record bytes through user space on its own: it asks storage for one file range
//! per partition and hands the server a frame made of small header buffers and those file ranges,
//! which the server splices to the socket (or copies, below the configured splice threshold).

use std::rc::Rc;
use std::time::{Duration, Instant};

use futures_util::future::{FutureExt, LocalBoxFuture, select_all};
use kafka_protocol::messages::fetch_request::FetchRequest;
use kafka_protocol::messages::list_offsets_request::ListOffsetsRequest;
use kafka_protocol::messages::list_offsets_response::{
    ListOffsetsPartitionResponse, ListOffsetsResponse, ListOffsetsTopicResponse,
};
use tracing::error;

use super::ShardBroker;
use super::errors::{code, read_error_code, storage_error_code};
use crate::protocol::{
    FetchCurrentLeader, FetchPartitionData, FetchResponseData, FetchTopicData, FramePart,
    RecordsBody, encode_fetch_response,
};
use crate::server::{FileSlice, OutPart, Reply};
use crate::storage::{PartitionLog, ReadSlice};

/// Kafka's special ListOffsets timestamps.
const LATEST_TIMESTAMP: i64 = -1;
const EARLIEST_TIMESTAMP: i64 = -2;
/// v7+: the offset of the record with the largest timestamp (KIP-734).
const MAX_TIMESTAMP: i64 = -3;
/// v8+: the earliest offset in local storage (KIP-405); with no tiered storage it is the earliest.
const EARLIEST_LOCAL_TIMESTAMP: i64 = -4;

/// The outcome of reading one requested partition.
struct PartitionRead {
    partition: i32,
    error: i16,
    high_watermark: i64,
    log_start_offset: i64,
    slice: Option<ReadSlice>,
    /// What a long-poll waits on: the log, and the offset whose passing means new data.
    wait: Option<(Rc<PartitionLog>, i64)>,
}

struct TopicRead {
    name: kafka_protocol::messages::TopicName,
    topic_id: uuid::Uuid,
    partitions: Vec<PartitionRead>,
}

impl ShardBroker {
    pub(super) async fn fetch(
        &self,
        request: FetchRequest,
        version: i16,
        correlation_id: i32,
    ) -> Reply {
        let started = Instant::now();
        let max_wait = Duration::from_millis(request.max_wait_ms.max(0) as u64);
        let (reads, total_bytes, any_error) = loop {
            let (reads, total_bytes, any_error) = self.read_partitions(&request, version).await;
            let partition_count: usize = reads.iter().map(|t| t.partitions.len()).sum();
            let satisfied = request.max_wait_ms <= 0
                || partition_count == 0
                || any_error
                || total_bytes >= request.min_bytes.max(0) as u64;
            let remaining = max_wait.saturating_sub(started.elapsed());
            if satisfied || remaining.is_zero() {
                break (reads, total_bytes, any_error);
            }
            // Park until any requested partition gets new data, or the wait runs out; then read again.
            let waits: Vec<LocalBoxFuture<'static, ()>> = reads
                .iter()
                .flat_map(|t| t.partitions.iter())
                .filter_map(|p| p.wait.clone())
                .map(|(log, offset)| {
                    async move { log.wait_high_watermark_above(offset).await }.boxed_local()
                })
                .collect();
            if waits.is_empty() {
                compio::time::sleep(remaining).await;
            } else {
                let _ = compio::time::timeout(remaining, select_all(waits)).await;
            }
            if self.stopping.get() {
                break (reads, total_bytes, any_error);
            }
        };
        let _ = (total_bytes, any_error);
        self.fetch_reply(reads, version, correlation_id)
    }

    /// Reads every requested partition once, in request order, honouring the response budget
    /// (`max_bytes`) and partition budgets (`partition_max_bytes`) as KIP-74 does: until the first
    /// non-empty partition, the first batch is returned whole even if it exceeds both, so a large
    /// batch can never stall a consumer.
    async fn read_partitions(
        &self,
        request: &FetchRequest,
        version: i16,
    ) -> (Vec<TopicRead>, u64, bool) {
        let topics = self.topics();
        let mut remaining_bytes = if request.max_bytes <= 0 {
            i32::MAX as u64
        } else {
            request.max_bytes as u64
        };
        let mut min_one_batch = true;
        let mut total_bytes = 0u64;
        let mut any_error = false;
        let mut reads = Vec::with_capacity(request.topics.len());
        for fetch_topic in &request.topics {
            let topic = if version >= 13 {
                topics.by_id(fetch_topic.topic_id).cloned()
            } else {
                topics.get(&fetch_topic.topic.0).cloned()
            };
            let mut partitions = Vec::with_capacity(fetch_topic.partitions.len());
            for fetch_partition in &fetch_topic.partitions {
                let partition = fetch_partition.partition;
                let mut read = PartitionRead {
                    partition,
                    error: code::NONE,
                    high_watermark: -1,
                    log_start_offset: -1,
                    slice: None,
                    wait: None,
                };
                let log = match &topic {
                    None if version >= 13 => Err(code::UNKNOWN_TOPIC_ID),
                    None => Err(code::UNKNOWN_TOPIC_OR_PARTITION),
                    Some(t) if partition < 0 || partition >= t.partitions => {
                        Err(code::UNKNOWN_TOPIC_OR_PARTITION)
                    }
                    Some(t) => self
                        .log(&t.name, partition)
                        .ok_or(code::NOT_LEADER_OR_FOLLOWER),
                };
                let log = match log {
                    // Our leader epoch is always 0; -1 means the client does not check.
                    Ok(_) if fetch_partition.current_leader_epoch > 0 => {
                        Err(code::UNKNOWN_LEADER_EPOCH)
                    }
                    other => other,
                };
                match log {
                    Err(error) => {
                        read.error = error;
                        any_error = true;
                    }
                    Ok(log) => {
                        let high_watermark = log.high_watermark();
                        read.high_watermark = high_watermark;
                        read.log_start_offset = log.log_start_offset();
                        let partition_budget = fetch_partition.partition_max_bytes.max(0) as u64;
                        let budget = partition_budget.min(remaining_bytes) as u32;
                        if budget > 0 || min_one_batch {
                            match log
                                .read(fetch_partition.fetch_offset, budget, min_one_batch)
                                .await
                            {
                                Ok(slice) => {
                                    if slice.len > 0 {
                                        min_one_batch = false;
                                        remaining_bytes =
                                            remaining_bytes.saturating_sub(u64::from(slice.len));
                                        total_bytes += u64::from(slice.len);
                                        read.slice = Some(slice);
                                    }
                                    read.wait = Some((
                                        log.clone(),
                                        fetch_partition.fetch_offset.max(high_watermark),
                                    ));
                                }
                                Err(error) => {
                                    let name = topic.as_ref().map_or("", |t| t.name.as_str());
                                    super::disk_errors::note_read_failure(name, partition, &error);
                                    read.error = read_error_code(&error);
                                    any_error = true;
                                }
                            }
                        } else {
                            read.wait = Some((
                                log.clone(),
                                fetch_partition.fetch_offset.max(high_watermark),
                            ));
                        }
                        // Fresh values: the read may have raced with an append.
                        read.high_watermark = log.high_watermark();
                        read.log_start_offset = log.log_start_offset();
                    }
                }
                partitions.push(read);
            }
            reads.push(TopicRead {
                name: fetch_topic.topic.clone(),
                topic_id: fetch_topic.topic_id,
                partitions,
            });
        }
        (reads, total_bytes, any_error)
    }

    fn fetch_reply(&self, reads: Vec<TopicRead>, version: i16, correlation_id: i32) -> Reply {
        let mut slices: Vec<ReadSlice> = Vec::new();
        let topics = reads
            .into_iter()
            .map(|topic| FetchTopicData {
                name: topic.name,
                topic_id: topic.topic_id,
                partitions: topic
                    .partitions
                    .into_iter()
                    .map(|p| {
                        let records = match p.slice {
                            Some(slice) => {
                                let len = slice.len;
                                slices.push(slice);
                                RecordsBody::File {
                                    len,
                                    token: slices.len() - 1,
                                }
                            }
                            // Kafka sends empty (not null) records for a partition with nothing new.
                            None => RecordsBody::Bytes(bytes::Bytes::new()),
                        };
                        FetchPartitionData {
                            partition_index: p.partition,
                            error_code: p.error,
                            high_watermark: p.high_watermark,
                            // No transactions: the last stable offset is the high watermark.
                            last_stable_offset: p.high_watermark,
                            log_start_offset: p.log_start_offset,
                            aborted_transactions: None,
                            preferred_read_replica: -1,
                            current_leader: FetchCurrentLeader::default(),
                            records,
                        }
                    })
                    .collect(),
            })
            .collect();
        let body = FetchResponseData {
            throttle_time_ms: 0,
            error_code: code::NONE,
            // Fetch sessions (KIP-227) are not kept: session 0 tells clients to send full requests.
            session_id: 0,
            topics,
            node_endpoints: Vec::new(),
        };
        let frame = match encode_fetch_response(correlation_id, version, &body) {
            Ok(frame) => frame,
            Err(e) => {
                error!(version, error = %e, "could not write fetch response");
                return Reply::Close;
            }
        };
        let parts = frame
            .parts
            .into_iter()
            .map(|part| match part {
                FramePart::Bytes(bytes) => OutPart::Bytes(bytes),
                FramePart::File { token, len } => {
                    let slice = &slices[token];
                    OutPart::File(FileSlice {
                        fd: Rc::new(slice.file.clone()),
                        offset: slice.position,
                        len,
                    })
                }
            })
            .collect();
        Reply::Send(parts)
    }

    pub(super) async fn list_offsets(
        &self,
        request: ListOffsetsRequest,
        version: i16,
    ) -> ListOffsetsResponse {
        let topics = self.topics();
        let mut topics_out = Vec::with_capacity(request.topics.len());
        for topic in request.topics {
            let name = topic.name.0.to_string();
            let known = topics.get(&name).cloned();
            let mut partitions = Vec::with_capacity(topic.partitions.len());
            for partition in topic.partitions {
                let index = partition.partition_index;
                let mut out = ListOffsetsPartitionResponse::default()
                    .with_partition_index(index)
                    .with_timestamp(-1)
                    .with_offset(-1);
                let log = match &known {
                    Some(t) if index >= 0 && index < t.partitions => {
                        self.log(&name, index).ok_or(code::NOT_LEADER_OR_FOLLOWER)
                    }
                    _ => Err(code::UNKNOWN_TOPIC_OR_PARTITION),
                };
                match log {
                    Err(error) => out.error_code = error,
                    Ok(log) => {
                        // The leader epoch field exists from v4 on; earlier versions must leave it unset.
                        if version >= 4 {
                            out.leader_epoch = 0;
                        }
                        match partition.timestamp {
                            // With no transactions the last stable offset equals the high watermark, so
                            // both isolation levels see the same "latest".
                            LATEST_TIMESTAMP => out.offset = log.high_watermark(),
                            EARLIEST_TIMESTAMP | EARLIEST_LOCAL_TIMESTAMP => {
                                out.offset = log.log_start_offset()
                            }
                            MAX_TIMESTAMP => {
                                let (offset, timestamp) = log.max_timestamp();
                                if offset >= 0 && offset < log.high_watermark() {
                                    out.offset = offset;
                                    out.timestamp = timestamp;
                                }
                            }
                            timestamp if timestamp < 0 => {
                                out.error_code = code::UNSUPPORTED_VERSION
                            }
                            timestamp => match log.offset_for_timestamp(timestamp).await {
                                Ok(Some((offset, found_timestamp)))
                                    if offset < log.high_watermark() =>
                                {
                                    out.offset = offset;
                                    out.timestamp = found_timestamp;
                                }
                                Ok(_) => {}
                                Err(error) => out.error_code = storage_error_code(&error),
                            },
                        }
                    }
                }
                partitions.push(out);
            }
            topics_out.push(
                ListOffsetsTopicResponse::default()
                    .with_name(topic.name)
                    .with_partitions(partitions),
            );
        }
        ListOffsetsResponse::default().with_topics(topics_out)
    }
}
