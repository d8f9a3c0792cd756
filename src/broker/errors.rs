//! The one place where storage errors become Kafka error codes.
//!
//! Storage reports what went wrong in its own terms (a typed enum per failure); the wire wants Kafka's
//! numbered codes. Keeping the mapping here means no other module carries wire codes around.

use kafka_protocol::ResponseError;

use crate::storage::{AppendError, DeleteRecordsError, ReadError, StorageError};

/// Kafka error codes used by the handlers, by name.
pub mod code {
    use super::ResponseError as E;
    pub const NONE: i16 = 0;
    pub const OFFSET_OUT_OF_RANGE: i16 = E::OffsetOutOfRange.code();
    pub const CORRUPT_MESSAGE: i16 = E::CorruptMessage.code();
    pub const UNKNOWN_TOPIC_OR_PARTITION: i16 = E::UnknownTopicOrPartition.code();
    pub const NOT_LEADER_OR_FOLLOWER: i16 = E::NotLeaderOrFollower.code();
    pub const LEADER_NOT_AVAILABLE: i16 = E::LeaderNotAvailable.code();
    pub const UNKNOWN_LEADER_EPOCH: i16 = E::UnknownLeaderEpoch.code();
    pub const MESSAGE_TOO_LARGE: i16 = E::MessageTooLarge.code();
    pub const INVALID_TOPIC_EXCEPTION: i16 = E::InvalidTopicException.code();
    pub const RECORD_LIST_TOO_LARGE: i16 = E::RecordListTooLarge.code();
    pub const INVALID_REQUIRED_ACKS: i16 = E::InvalidRequiredAcks.code();
    pub const UNSUPPORTED_VERSION: i16 = E::UnsupportedVersion.code();
    pub const TOPIC_ALREADY_EXISTS: i16 = E::TopicAlreadyExists.code();
    pub const INVALID_PARTITIONS: i16 = E::InvalidPartitions.code();
    pub const INVALID_REPLICATION_FACTOR: i16 = E::InvalidReplicationFactor.code();
    pub const INVALID_REQUEST: i16 = E::InvalidRequest.code();
    pub const INVALID_CONFIG: i16 = E::InvalidConfig.code();
    pub const KAFKA_STORAGE_ERROR: i16 = E::KafkaStorageError.code();
    pub const TOPIC_DELETION_DISABLED: i16 = E::TopicDeletionDisabled.code();
    pub const INVALID_RECORD: i16 = E::InvalidRecord.code();
    pub const UNKNOWN_TOPIC_ID: i16 = E::UnknownTopicId.code();
    pub const UNKNOWN_SERVER_ERROR: i16 = E::UnknownServerError.code();
    pub const OUT_OF_ORDER_SEQUENCE_NUMBER: i16 = E::OutOfOrderSequenceNumber.code();
    pub const INVALID_PRODUCER_EPOCH: i16 = E::InvalidProducerEpoch.code();
    pub const PRODUCER_FENCED: i16 = E::ProducerFenced.code();
    pub const COORDINATOR_NOT_AVAILABLE: i16 = E::CoordinatorNotAvailable.code();
}

pub fn append_error_code(error: &AppendError) -> i16 {
    match error {
        AppendError::CorruptMessage(_) => code::CORRUPT_MESSAGE,
        AppendError::MessageTooLarge { .. } => code::MESSAGE_TOO_LARGE,
        AppendError::InvalidRecord(_) => code::INVALID_RECORD,
        AppendError::RecordBatchTooLarge { .. } => code::RECORD_LIST_TOO_LARGE,
        AppendError::OutOfOrderSequence(_) => code::OUT_OF_ORDER_SEQUENCE_NUMBER,
        // Kafka answers a produce from an old epoch with INVALID_PRODUCER_EPOCH (since 2.7, rather
        // than the fatal PRODUCER_FENCED), so the client can re-initialise.
        AppendError::InvalidProducerEpoch(_) => code::INVALID_PRODUCER_EPOCH,
        AppendError::Storage(error) => storage_error_code(error),
    }
}

pub fn read_error_code(error: &ReadError) -> i16 {
    match error {
        ReadError::OffsetOutOfRange { .. } => code::OFFSET_OUT_OF_RANGE,
        ReadError::Corrupt { .. } => code::CORRUPT_MESSAGE,
        ReadError::Storage(error) => storage_error_code(error),
    }
}

pub fn delete_records_error_code(error: &DeleteRecordsError) -> i16 {
    match error {
        DeleteRecordsError::OffsetOutOfRange { .. } => code::OFFSET_OUT_OF_RANGE,
        DeleteRecordsError::Storage(error) => storage_error_code(error),
    }
}

/// Every storage failure that is not about the request itself means the disk misbehaved; Kafka
/// answers KAFKA_STORAGE_ERROR so the client retries elsewhere or reports it.
pub fn storage_error_code(_error: &StorageError) -> i16 {
    code::KAFKA_STORAGE_ERROR
}
