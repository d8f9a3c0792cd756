//! Request decoding: one frame (without its size prefix) into a typed request header and
//! body, zero-copy, with a typed error that tells the connection how to react.

use bytes::{Buf, Bytes};
use kafka_protocol::messages::{ApiKey, ApiVersionsRequest, RequestKind};
use kafka_protocol::protocol::{Decodable, StrBytes};
use thiserror::Error;

use super::response::unsupported_api_versions_frame;
use super::versions::{PRODUCE_MIN_ACCEPTED_VERSION, supported_versions, version_accepted};

/// The fixed start of every request header: api_key i16, api_version i16, correlation_id i32.
const HEADER_PREFIX_BYTES: usize = 8;

/// The request header, with the API key already resolved.
#[derive(Debug, Clone, PartialEq)]
pub struct RequestHeader {
    /// Which API this request calls.
    pub api_key: ApiKey,
    /// The request's version of that API.
    pub api_version: i16,
    /// Echoed in the response so the client can match it to the request.
    pub correlation_id: i32,
    /// The client's self-chosen id (nullable on the wire); a slice of the frame.
    pub client_id: Option<StrBytes>,
}

/// A decoded request. Byte fields of the body (Produce records above all) are slices of the
/// frame the request was decoded from, so holding a `Request` keeps that frame alive.
#[derive(Debug, Clone, PartialEq)]
pub struct Request {
    /// The header.
    pub header: RequestHeader,
    /// The body, typed by API.
    pub body: RequestKind,
}

impl Request {
    /// Whether the client waits for a response. Only Produce with acks=0 does not: Kafka
    /// sends nothing back (and closes the connection on an error, so the client notices).
    pub fn expects_response(&self) -> bool {
        !matches!(&self.body, RequestKind::Produce(produce) if produce.acks == 0)
    }
}

/// Whether an ApiVersions request is well formed by Kafka's rule (`ApiVersionsRequest.isValid`):
/// from v3 the client software name and version must match
/// `[a-zA-Z0-9](?:[a-zA-Z0-9\-.]*[a-zA-Z0-9])?`. Kafka answers an invalid one with
/// INVALID_REQUEST (42) rather than closing, so the broker does the same through
/// [`error_response`](super::error_response).
pub fn api_versions_request_is_valid(version: i16, request: &ApiVersionsRequest) -> bool {
    fn software_field_is_valid(field: &str) -> bool {
        let bytes = field.as_bytes();
        let inner_ok = |b: &u8| b.is_ascii_alphanumeric() || *b == b'-' || *b == b'.';
        match (bytes.first(), bytes.last()) {
            (Some(first), Some(last)) => {
                first.is_ascii_alphanumeric()
                    && last.is_ascii_alphanumeric()
                    && bytes.iter().all(inner_ok)
            }
            _ => false,
        }
    }
    version < 3
        || (software_field_is_valid(&request.client_software_name)
            && software_field_is_valid(&request.client_software_version))
}

/// Why a frame could not be decoded, and so what the connection should do. Kafka's own
/// broker closes the connection for every one of these except an unsupported ApiVersions
/// version, which it answers (KIP-511); [`DecodeError::reply`] encodes exactly that rule.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum DecodeError {
    /// The header itself is unreadable (shorter than 8 bytes, a bad client_id, truncated
    /// tagged fields). No trustworthy correlation id: close the connection.
    #[error("malformed request header: {reason}")]
    MalformedHeader {
        /// What was wrong, for the log.
        reason: String,
    },
    /// The API key is not a Kafka API, or one this broker does not implement (not in
    /// [`SUPPORTED_APIS`](super::SUPPORTED_APIS)). A client only sends it if it ignored our
    /// ApiVersions answer; Kafka closes the connection.
    #[error("api key {api_key} (v{api_version}) is not implemented")]
    UnknownApiKey {
        /// The key as sent.
        api_key: i16,
        /// The version as sent.
        api_version: i16,
        /// The request's correlation id.
        correlation_id: i32,
    },
    /// A known API at a version outside what we accept. For ApiVersions the broker answers
    /// with the v0 fallback ([`DecodeError::reply`]); for everything else Kafka closes the
    /// connection (and Produce 0-2, though advertised, land here too).
    #[error("{api_key:?} v{api_version} is not supported")]
    UnsupportedVersion {
        /// The API.
        api_key: ApiKey,
        /// The version as sent.
        api_version: i16,
        /// The request's correlation id.
        correlation_id: i32,
    },
    /// Produce v0-v2: advertised for librdkafka's feature probes but refused. `reply` answers every
    /// partition with UNSUPPORTED_VERSION, or is `None` for acks=0 (nothing is sent, and the connection
    /// is closed so the producer notices, as for any failed acks=0 append).
    #[error("Produce v{api_version} is advertised but not accepted (message formats before v2)")]
    LegacyProduce {
        /// The version as sent (0, 1 or 2).
        api_version: i16,
        /// The request's correlation id.
        correlation_id: i32,
        /// The response frame, or `None` for acks=0.
        reply: Option<Bytes>,
    },
    /// The header was fine but the body did not decode as that API and version (truncated,
    /// bad lengths, invalid UTF-8, array counts larger than the frame, trailing bytes).
    /// Kafka closes the connection; the correlation id is kept for the log.
    #[error(
        "malformed {api_key:?} v{api_version} body (correlation id {correlation_id}): {reason}"
    )]
    MalformedBody {
        /// The API.
        api_key: ApiKey,
        /// The version.
        api_version: i16,
        /// The request's correlation id.
        correlation_id: i32,
        /// What was wrong, for the log.
        reason: String,
    },
}

impl DecodeError {
    /// The correlation id of the refused request, when the header got that far.
    pub fn correlation_id(&self) -> Option<i32> {
        match self {
            DecodeError::MalformedHeader { .. } => None,
            DecodeError::UnknownApiKey { correlation_id, .. }
            | DecodeError::UnsupportedVersion { correlation_id, .. }
            | DecodeError::LegacyProduce { correlation_id, .. }
            | DecodeError::MalformedBody { correlation_id, .. } => Some(*correlation_id),
        }
    }

    /// The frame to send back, or `None` when the connection should be closed (after
    /// flushing the responses already queued before this request). Only an ApiVersions
    /// request of a version we do not know gets an answer: the KIP-511 v0 fallback.
    pub fn reply(&self) -> Option<Bytes> {
        match self {
            DecodeError::UnsupportedVersion {
                api_key: ApiKey::ApiVersions,
                correlation_id,
                ..
            } => Some(unsupported_api_versions_frame(*correlation_id)),
            DecodeError::LegacyProduce { reply, .. } => reply.clone(),
            _ => None,
        }
    }
}

/// Decodes one request. `frame` is everything after the 4-byte size prefix, already checked
/// with [`frame_length`](super::frame_length).
///
/// Decoding is zero-copy: strings and byte fields (Produce records) are slices of `frame`.
/// Never panics; every malformed input is a [`DecodeError`]. Array counts larger than the
/// bytes left are refused before anything is allocated (the vendored kafka-protocol patch),
/// so the memory a frame can make us allocate is bounded by a small multiple of its size.
pub fn decode_request(frame: Bytes) -> Result<Request, DecodeError> {
    if frame.len() < HEADER_PREFIX_BYTES {
        return Err(DecodeError::MalformedHeader {
            reason: format!(
                "a {}-byte frame cannot hold the {HEADER_PREFIX_BYTES}-byte header prefix",
                frame.len()
            ),
        });
    }
    let raw_api_key = i16::from_be_bytes([frame[0], frame[1]]);
    let api_version = i16::from_be_bytes([frame[2], frame[3]]);
    let correlation_id = i32::from_be_bytes([frame[4], frame[5], frame[6], frame[7]]);
    let api_key = match ApiKey::try_from(raw_api_key) {
        Ok(api_key) if supported_versions(api_key).is_some() => api_key,
        _ => {
            return Err(DecodeError::UnknownApiKey {
                api_key: raw_api_key,
                api_version,
                correlation_id,
            });
        }
    };

    // The header's own version (1 or 2: whether it ends in tagged fields) follows from the
    // API and version. For an unsupported ApiVersions version Kafka still parses the header
    // this way before answering, so the header is decoded before the version is checked.
    let header_version = api_key.request_header_version(api_version);
    let mut buf = frame;
    let header = kafka_protocol::messages::RequestHeader::decode(&mut buf, header_version)
        .map_err(|error| DecodeError::MalformedHeader {
            reason: format!("{error:#}"),
        })?;

    if api_key == ApiKey::Produce && (0..PRODUCE_MIN_ACCEPTED_VERSION).contains(&api_version) {
        // Advertised but refused: answer each partition with UNSUPPORTED_VERSION when the body
        // parses (Kafka 4 does the same), close otherwise.
        if let Ok(reply) = super::legacy_produce::unsupported_produce_frame(
            api_version,
            correlation_id,
            buf.clone(),
        ) {
            return Err(DecodeError::LegacyProduce {
                api_version,
                correlation_id,
                reply,
            });
        }
    }
    if !version_accepted(api_key, api_version) {
        return Err(DecodeError::UnsupportedVersion {
            api_key,
            api_version,
            correlation_id,
        });
    }

    let malformed = |reason: String| DecodeError::MalformedBody {
        api_key,
        api_version,
        correlation_id,
        reason,
    };
    let body = RequestKind::decode(api_key, &mut buf, api_version)
        .map_err(|error| malformed(format!("{error:#}")))?;
    // Bytes after the body are ignored, as Kafka's own parser does: librdkafka 2.12 sends
    // Metadata v12 with three such bytes, and refusing them would cut every librdkafka client off.
    if buf.has_remaining() {
        tracing::debug!(
            ?api_key,
            api_version,
            left_over = buf.remaining(),
            "bytes after the request body ignored"
        );
    }
    Ok(Request {
        header: RequestHeader {
            api_key,
            api_version,
            correlation_id,
            client_id: header.client_id,
        },
        body,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(version: i16, name: &'static str, software_version: &'static str, expect: bool) {
        let request = ApiVersionsRequest::default()
            .with_client_software_name(StrBytes::from_static_str(name))
            .with_client_software_version(StrBytes::from_static_str(software_version));
        assert_eq!(
            api_versions_request_is_valid(version, &request),
            expect,
            "v{version} {name:?} {software_version:?}"
        );
    }

    #[test]
    fn api_versions_software_names_follow_kafkas_pattern() {
        check(3, "librdkafka", "2.3.0", true);
        check(3, "apache-kafka-java", "4.1.0", true);
        check(3, "a", "1", true);
        check(3, "", "1.0", false);
        check(3, "name", "", false);
        check(3, "-leading", "1.0", false);
        check(3, "trailing.", "1.0", false);
        check(3, "has space", "1.0", false);
        check(3, "ünïcode", "1.0", false);
        // Before v3 the fields do not exist, so there is nothing to check.
        check(2, "", "", true);
    }
}
