//! Produce: append each partition's record batches to its log on the owning shard, and answer after
//! the write (acks=1), after the data is durable (acks=all, group-committed fdatasync), or not at all
//! (acks=0).
//!
//! A produce request is handled in two steps. The appends happen while the connection admits the
//! request ([`ShardBroker::produce`]), and the server admits a connection's requests one at a time,
//! so two produce requests of one connection reach a partition's log in request order (what an
//! idempotent producer with several requests in flight relies on). With acks=all, the wait for the
//! group commit ([`PendingDurable::finish`]) runs after admission, beside the connection's later
//! requests, so one fdatasync covers the appends of several in-flight requests.

use kafka_protocol::messages::produce_request::ProduceRequest;
use kafka_protocol::messages::produce_response::{
    PartitionProduceResponse, ProduceResponse, TopicProduceResponse,
};
use std::rc::Rc;

use kafka_protocol::protocol::StrBytes;
use tracing::debug;

use super::errors::{append_error_code, code, storage_error_code};
use super::{ShardBroker, disk_errors, now_ms};
use crate::protocol;
use crate::storage::PartitionLog;

/// What a Produce request turns into on the wire.
pub(super) enum ProduceOutcome {
    Respond(ProduceResponse),
    /// acks=0 and every append succeeded: nothing is sent.
    Silent,
    /// acks=0 and an append failed: the connection is closed so the producer notices.
    Close,
}

/// A produce request whose appends are done.
pub(super) enum ProduceAdmitted {
    /// Nothing is left to wait for (acks=0, acks=1, or nothing was appended).
    Done(ProduceOutcome),
    /// acks=all: the response is ready once the appends are durable.
    Durable(PendingDurable),
}

/// An acks=all response waiting for its appends to be fdatasync'ed.
pub(super) struct PendingDurable {
    responses: Vec<TopicProduceResponse>,
    /// (topic index, partition index, last offset, log) of every append to wait for.
    waits: Vec<(usize, usize, i64, Rc<PartitionLog>)>,
}

impl PendingDurable {
    /// Waits for the group commit of each log (one fdatasync per log covers every append made
    /// before it started, from this request and others); a failed flush fails the partitions it
    /// should have covered.
    pub(super) async fn finish(mut self) -> ProduceOutcome {
        for (topic_index, partition_index, last_offset, log) in self.waits {
            if let Err(error) = log.wait_durable(last_offset).await {
                let topic = &mut self.responses[topic_index];
                let response = &mut topic.partition_responses[partition_index];
                disk_errors::note_storage_failure(topic.name.as_str(), response.index, &error);
                response.error_code = storage_error_code(&error);
                response.error_message = Some(StrBytes::from_string(error.to_string()));
            }
        }
        ProduceOutcome::Respond(ProduceResponse::default().with_responses(self.responses))
    }
}

impl ShardBroker {
    /// Appends the request's batches. acks=0 gets no response at all, unless an append failed (then
    /// the connection is closed); acks=all leaves the wait for durability to the caller.
    pub(super) async fn produce(&self, request: ProduceRequest, version: i16) -> ProduceAdmitted {
        let acks = request.acks;
        // Produce is advertised from v0 because librdkafka only enables compression when the ranges
        // overlap v2, but message formats before v2 (requests before v3) are not stored: refuse them.
        let request_error = if !protocol::produce_version_accepted(version) {
            Some(code::UNSUPPORTED_VERSION)
        } else if !matches!(acks, -1..=1) {
            Some(code::INVALID_REQUIRED_ACKS)
        } else if request.transactional_id.is_some() {
            // Transactions are not implemented, and their APIs are not advertised.
            Some(code::UNSUPPORTED_VERSION)
        } else {
            None
        };

        let topics = self.topics();
        let mut responses = Vec::with_capacity(request.topic_data.len());
        // (topic index, partition index, last offset) of every append that acks=all must wait for.
        let mut durable_waits = Vec::new();
        for (topic_index, topic_data) in request.topic_data.into_iter().enumerate() {
            let name = topic_data.name.0.to_string();
            let known = topics.get(&name).cloned();
            if known.is_none() && request_error.is_none() && self.config.auto_create_topics_enable {
                // The issue asks for auto-creation on Produce as well as Metadata; the producer is
                // told to retry (UNKNOWN_TOPIC_OR_PARTITION is retriable) and finds the topic then.
                let _ = self.auto_create(&name).await;
            }
            let mut partition_responses = Vec::with_capacity(topic_data.partition_data.len());
            for (partition_index, partition_data) in
                topic_data.partition_data.into_iter().enumerate()
            {
                let index = partition_data.index;
                let mut response = PartitionProduceResponse::default().with_index(index);
                let error = if let Some(error) = request_error {
                    Some(error)
                } else if known
                    .as_ref()
                    .is_none_or(|t| index < 0 || index >= t.partitions)
                {
                    Some(code::UNKNOWN_TOPIC_OR_PARTITION)
                } else if let Some(log) = self.log(&name, index) {
                    match partition_data.records {
                        None => Some(code::CORRUPT_MESSAGE),
                        Some(records) => match log.append(records, now_ms()).await {
                            Ok(info) => {
                                disk_errors::note_append_success(&name, index);
                                response.base_offset = info.base_offset;
                                response.log_start_offset = info.log_start_offset;
                                if acks == -1 {
                                    durable_waits.push((
                                        topic_index,
                                        partition_index,
                                        info.last_offset,
                                        log.clone(),
                                    ));
                                }
                                None
                            }
                            Err(error) => {
                                debug!(topic = %name, partition = index, %error, "append refused");
                                disk_errors::note_append_failure(&name, index, &error);
                                response.error_message =
                                    Some(StrBytes::from_string(error.to_string()));
                                Some(append_error_code(&error))
                            }
                        },
                    }
                } else {
                    Some(code::NOT_LEADER_OR_FOLLOWER)
                };
                if let Some(error) = error {
                    response.error_code = error;
                    response.base_offset = -1;
                }
                partition_responses.push(response);
            }
            responses.push(
                TopicProduceResponse::default()
                    .with_name(topic_data.name)
                    .with_partition_responses(partition_responses),
            );
        }

        if !durable_waits.is_empty() {
            return ProduceAdmitted::Durable(PendingDurable {
                responses,
                waits: durable_waits,
            });
        }

        if acks == 0 {
            // acks=0 gets no answer, so a failed append could only be noticed if the connection
            // goes away: Kafka closes it, and so do we.
            let failed = responses
                .iter()
                .flat_map(|t| t.partition_responses.iter())
                .any(|p| p.error_code != code::NONE);
            return ProduceAdmitted::Done(if failed {
                ProduceOutcome::Close
            } else {
                ProduceOutcome::Silent
            });
        }
        ProduceAdmitted::Done(ProduceOutcome::Respond(
            ProduceResponse::default().with_responses(responses),
        ))
    }
}
