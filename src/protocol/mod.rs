//! protocol: the Kafka wire format, with no IO — request framing and decoding, the
//! ApiVersions table, response encoding, and the hand-rolled zero-copy Fetch response writer.
//!
//! Architecture invariants:
//! - nothing here touches a socket, a file or a runtime; callers hand in bytes and get bytes
//!   (or, for Fetch, a list of byte and file-range parts) back;
//! - [`SUPPORTED_APIS`] is the only place that says which APIs and versions the broker
//!   implements; decoding refuses everything else;
//! - bad input never panics and never allocates more than a small multiple of the frame:
//!   frames are capped by [`frame_length`], array counts by the vendored kafka-protocol patch;
//! - request bodies are decoded from `Bytes`, so record batches are slices of the frame.
//!
//! The zero-copy RecordBatch header view lives in `storage`, which validates batches.

mod fetch;
mod frame;
mod legacy_produce;
mod request;
mod response;
mod versions;

pub use fetch::{
    FETCH_WRITER_VERSIONS, FetchAbortedTransaction, FetchCurrentLeader, FetchFrame,
    FetchNodeEndpoint, FetchPartitionData, FetchResponseData, FetchTopicData, FramePart,
    INLINE_RECORDS_MAX_BYTES, RecordsBody, encode_fetch_response,
};
pub use frame::{FrameError, frame_length};
pub use request::{
    DecodeError, Request, RequestHeader, api_versions_request_is_valid, decode_request,
};
pub use response::{
    EncodeError, encode_response, error_response, response_api_key, unsupported_api_versions_frame,
};
pub use versions::{
    PRODUCE_MIN_ACCEPTED_VERSION, SUPPORTED_APIS, UNSUPPORTED_VERSION,
    api_versions_fallback_response, api_versions_response, fetch_allows_zstd, produce_allows_zstd,
    produce_version_accepted, supported_versions, version_accepted,
};
