//! The ApiVersions table: the single source of truth for which Kafka APIs and versions the
//! broker implements, and the ApiVersions responses built from it (including KIP-511's
//! fallback for an ApiVersions request whose version we do not know).

use kafka_protocol::messages::ApiKey;
use kafka_protocol::messages::api_versions_response::{ApiVersion, ApiVersionsResponse};

/// Every API the broker implements, with the version range it advertises.
///
/// Why each bound (docs/protocol.md has the full matrix):
/// - every max is clipped to what kafka-protocol 0.18 can decode (request) *and* encode
///   (response); a unit test checks this against `<X as Message>::VERSIONS`, because the
///   crate's `ApiKey::valid_versions()` lists versions it cannot decode;
/// - Produce is advertised from 0 although only 3.. is accepted ([`produce_version_accepted`]):
///   librdkafka turns off compression and MsgVer2 unless the broker's Produce range overlaps
///   its probes at 2..2 and 3..3 (KAFKA-18659, librdkafka #4956), and Kafka 4.0 does the same;
/// - Fetch reaches 12 and Produce 11: librdkafka enables zstd only with Fetch >= 10 and
///   Produce >= 7. Fetch stops at 12 because 13+ addresses topics by id only;
/// - ListOffsets stops at 8: v9 adds the latest-tiered timestamp (-5, KIP-1005) and v10 the
///   asynchronous remote lookup (KIP-1075), both about tiered storage, which this broker has
///   not; v8's earliest-local (-4) equals earliest (-2) here;
/// - InitProducerId (idempotent producers only) covers everything the crate decodes: 0-1 carry no
///   producer id (aiokafka, kafkajs), 3+ let a known producer bump its epoch (KIP-360), 4+ may
///   answer PRODUCER_FENCED. 6 (KIP-939 two-phase commit) is not decodable. Transactional APIs
///   (AddPartitionsToTxn, EndTxn, ...) stay unadvertised.
/// - DeleteRecords covers everything the crate has (0-2; librdkafka and the Java admin client use
///   them all, 2 being the flexible one).
///
/// Adding an API is one line here plus a handler in the broker; decoding, the ApiVersions
/// response and the clip test all follow from this table.
pub const SUPPORTED_APIS: &[(ApiKey, i16, i16)] = &[
    (ApiKey::Produce, 0, 11),
    (ApiKey::Fetch, 4, 12),
    (ApiKey::ListOffsets, 1, 8),
    (ApiKey::Metadata, 0, 12),
    (ApiKey::ApiVersions, 0, 4),
    (ApiKey::CreateTopics, 2, 7),
    (ApiKey::DeleteTopics, 1, 6),
    (ApiKey::DescribeConfigs, 1, 4),
    (ApiKey::DeleteRecords, 0, 2),
    (ApiKey::FindCoordinator, 0, 6),
    (ApiKey::JoinGroup, 0, 9),
    (ApiKey::SyncGroup, 0, 5),
    (ApiKey::Heartbeat, 0, 4),
    (ApiKey::LeaveGroup, 0, 5),
    (ApiKey::OffsetCommit, 2, 9),
    (ApiKey::OffsetFetch, 1, 9),
    (ApiKey::DescribeGroups, 0, 6),
    (ApiKey::ListGroups, 0, 5),
    (ApiKey::DeleteGroups, 0, 2),
    (ApiKey::OffsetDelete, 0, 0),
    (ApiKey::InitProducerId, 0, 5),
];

/// The lowest Produce version the broker accepts. Versions 0-2 carry message sets v0/v1,
/// which kafka-protocol 0.18 cannot decode and Kafka 4.0 no longer accepts either.
pub const PRODUCE_MIN_ACCEPTED_VERSION: i16 = 3;

/// Error code 35, UNSUPPORTED_VERSION.
pub const UNSUPPORTED_VERSION: i16 = 35;

/// The advertised `(min, max)` versions of `api_key`, or `None` when the broker does not
/// implement it.
pub fn supported_versions(api_key: ApiKey) -> Option<(i16, i16)> {
    SUPPORTED_APIS
        .iter()
        .find(|(key, _, _)| *key == api_key)
        .map(|&(_, min, max)| (min, max))
}

/// Whether a request of `api_key` at `version` is decoded and handled. This is the
/// advertised range, except that Produce 0-2 are advertised but refused.
pub fn version_accepted(api_key: ApiKey, version: i16) -> bool {
    match supported_versions(api_key) {
        Some((min, max)) if (min..=max).contains(&version) => {
            api_key != ApiKey::Produce || produce_version_accepted(version)
        }
        _ => false,
    }
}

/// Whether a Produce request of `version` is accepted: 3 up to the advertised maximum.
/// Versions 0-2 are advertised (see [`SUPPORTED_APIS`]) but refused.
pub fn produce_version_accepted(version: i16) -> bool {
    let max = supported_versions(ApiKey::Produce).map_or(-1, |(_, max)| max);
    (PRODUCE_MIN_ACCEPTED_VERSION..=max).contains(&version)
}

/// Whether a zstd-compressed batch may be produced with this Produce version. Kafka refuses
/// zstd below v7 with UNSUPPORTED_COMPRESSION_TYPE (76), since older clients cannot read it.
pub fn produce_allows_zstd(version: i16) -> bool {
    version >= 7
}

/// Whether zstd-compressed batches may be returned to a Fetch of this version. Kafka answers
/// older fetches of zstd data with UNSUPPORTED_COMPRESSION_TYPE (76).
pub fn fetch_allows_zstd(version: i16) -> bool {
    version >= 10
}

/// The ApiVersions response for a supported request `version`, listing [`SUPPORTED_APIS`].
/// `throttle_time_ms` is carried from v1 on (v0 has no such field).
///
/// No feature flags are listed (supported_features, finalized_features): they describe
/// KRaft cluster features that a single node does not negotiate, and clients treat their
/// absence as "none".
pub fn api_versions_response(version: i16, throttle_time_ms: i32) -> ApiVersionsResponse {
    let api_keys = SUPPORTED_APIS
        .iter()
        .map(|&(api_key, min_version, max_version)| {
            ApiVersion::default()
                .with_api_key(api_key as i16)
                .with_min_version(min_version)
                .with_max_version(max_version)
        })
        .collect();
    ApiVersionsResponse::default()
        .with_error_code(0)
        .with_api_keys(api_keys)
        .with_throttle_time_ms(if version >= 1 { throttle_time_ms } else { 0 })
}

/// The answer to an ApiVersions request whose version we do not support (KIP-511): error 35
/// UNSUPPORTED_VERSION and ApiVersions' own range only, so the client can retry with a
/// version both sides know. It must be encoded as **v0** (Kafka parses such a request as
/// v0, and every client can read a v0 body); [`unsupported_api_versions_frame`](super::unsupported_api_versions_frame) does that.
pub fn api_versions_fallback_response() -> ApiVersionsResponse {
    let (min_version, max_version) =
        supported_versions(ApiKey::ApiVersions).expect("ApiVersions is always in SUPPORTED_APIS");
    ApiVersionsResponse::default()
        .with_error_code(UNSUPPORTED_VERSION)
        .with_api_keys(vec![
            ApiVersion::default()
                .with_api_key(ApiKey::ApiVersions as i16)
                .with_min_version(min_version)
                .with_max_version(max_version),
        ])
}

#[cfg(test)]
mod tests {
    use super::*;
    use kafka_protocol::messages::*;
    use kafka_protocol::protocol::{Message, VersionRange};

    /// What kafka-protocol can decode (request) and encode (response) for each API in the
    /// table. A new table entry without a line here fails the test below, on purpose.
    fn codec_versions(api_key: ApiKey) -> (VersionRange, VersionRange) {
        match api_key {
            ApiKey::Produce => (ProduceRequest::VERSIONS, ProduceResponse::VERSIONS),
            ApiKey::Fetch => (FetchRequest::VERSIONS, FetchResponse::VERSIONS),
            ApiKey::ListOffsets => (ListOffsetsRequest::VERSIONS, ListOffsetsResponse::VERSIONS),
            ApiKey::Metadata => (MetadataRequest::VERSIONS, MetadataResponse::VERSIONS),
            ApiKey::ApiVersions => (ApiVersionsRequest::VERSIONS, ApiVersionsResponse::VERSIONS),
            ApiKey::CreateTopics => (
                CreateTopicsRequest::VERSIONS,
                CreateTopicsResponse::VERSIONS,
            ),
            ApiKey::DeleteTopics => (
                DeleteTopicsRequest::VERSIONS,
                DeleteTopicsResponse::VERSIONS,
            ),
            ApiKey::DeleteRecords => (
                DeleteRecordsRequest::VERSIONS,
                DeleteRecordsResponse::VERSIONS,
            ),
            ApiKey::DescribeConfigs => (
                DescribeConfigsRequest::VERSIONS,
                DescribeConfigsResponse::VERSIONS,
            ),
            ApiKey::FindCoordinator => (
                FindCoordinatorRequest::VERSIONS,
                FindCoordinatorResponse::VERSIONS,
            ),
            ApiKey::JoinGroup => (JoinGroupRequest::VERSIONS, JoinGroupResponse::VERSIONS),
            ApiKey::SyncGroup => (SyncGroupRequest::VERSIONS, SyncGroupResponse::VERSIONS),
            ApiKey::Heartbeat => (HeartbeatRequest::VERSIONS, HeartbeatResponse::VERSIONS),
            ApiKey::LeaveGroup => (LeaveGroupRequest::VERSIONS, LeaveGroupResponse::VERSIONS),
            ApiKey::OffsetCommit => (
                OffsetCommitRequest::VERSIONS,
                OffsetCommitResponse::VERSIONS,
            ),
            ApiKey::OffsetFetch => (OffsetFetchRequest::VERSIONS, OffsetFetchResponse::VERSIONS),
            ApiKey::DescribeGroups => (
                DescribeGroupsRequest::VERSIONS,
                DescribeGroupsResponse::VERSIONS,
            ),
            ApiKey::ListGroups => (ListGroupsRequest::VERSIONS, ListGroupsResponse::VERSIONS),
            ApiKey::DeleteGroups => (
                DeleteGroupsRequest::VERSIONS,
                DeleteGroupsResponse::VERSIONS,
            ),
            ApiKey::OffsetDelete => (
                OffsetDeleteRequest::VERSIONS,
                OffsetDeleteResponse::VERSIONS,
            ),
            ApiKey::InitProducerId => (
                InitProducerIdRequest::VERSIONS,
                InitProducerIdResponse::VERSIONS,
            ),
            other => panic!("{other:?} is in SUPPORTED_APIS but not in codec_versions"),
        }
    }

    #[test]
    fn every_advertised_range_is_within_what_the_crate_decodes_and_encodes() {
        for &(api_key, min, max) in SUPPORTED_APIS {
            let (request, response) = codec_versions(api_key);
            let codec = request.intersect(&response);
            assert!(min <= max, "{api_key:?}: empty range {min}..{max}");
            assert!(
                max <= codec.max,
                "{api_key:?}: advertises up to v{max} but the crate handles only {codec}"
            );
            // The accepted range (which, for Produce, starts above the advertised one) must
            // lie inside what the crate handles.
            let accepted_min = if api_key == ApiKey::Produce {
                PRODUCE_MIN_ACCEPTED_VERSION
            } else {
                min
            };
            assert!(
                accepted_min >= codec.min,
                "{api_key:?}: accepts from v{accepted_min} but the crate handles only {codec}"
            );
            // And the crate's own ApiKey table must agree that these versions exist.
            let listed = api_key.valid_versions();
            assert!(
                listed.min <= accepted_min && max <= listed.max,
                "{api_key:?}"
            );
        }
    }

    #[test]
    fn each_api_appears_once() {
        for (i, &(api_key, _, _)) in SUPPORTED_APIS.iter().enumerate() {
            assert!(
                SUPPORTED_APIS[i + 1..]
                    .iter()
                    .all(|(k, _, _)| *k != api_key),
                "{api_key:?} listed twice"
            );
        }
    }

    #[test]
    fn client_traps_are_honoured() {
        // librdkafka's feature probes: Produce must overlap 2..2 and 3..3 and 7..7, Fetch must
        // reach 10 (zstd), ListOffsets must overlap 1..1.
        let (produce_min, produce_max) = supported_versions(ApiKey::Produce).unwrap();
        assert_eq!(produce_min, 0);
        assert!(produce_max >= 7);
        let (fetch_min, fetch_max) = supported_versions(ApiKey::Fetch).unwrap();
        assert!(fetch_min <= 4 && fetch_max >= 10);
        let (list_min, _) = supported_versions(ApiKey::ListOffsets).unwrap();
        assert!(list_min <= 1);
        assert!(!produce_version_accepted(0));
        assert!(!produce_version_accepted(2));
        assert!(produce_version_accepted(3));
        assert!(produce_version_accepted(produce_max));
        assert!(!produce_version_accepted(produce_max + 1));
        assert!(!version_accepted(ApiKey::Produce, 2));
        assert!(version_accepted(ApiKey::Produce, 9));
        assert!(!version_accepted(ApiKey::Fetch, 3));
        // librdkafka enables idempotence only if InitProducerId overlaps its 0..0 probe.
        assert!(version_accepted(ApiKey::InitProducerId, 0));
        assert!(version_accepted(ApiKey::InitProducerId, 1));
        // Transactions are not implemented, so their APIs must not be advertised.
        for transactional in [
            ApiKey::AddPartitionsToTxn,
            ApiKey::AddOffsetsToTxn,
            ApiKey::EndTxn,
            ApiKey::TxnOffsetCommit,
            ApiKey::WriteTxnMarkers,
        ] {
            assert!(
                supported_versions(transactional).is_none(),
                "{transactional:?}"
            );
        }
    }

    #[test]
    fn api_versions_response_lists_the_table() {
        let response = api_versions_response(3, 7);
        assert_eq!(response.error_code, 0);
        assert_eq!(response.throttle_time_ms, 7);
        assert_eq!(response.api_keys.len(), SUPPORTED_APIS.len());
        for (entry, &(api_key, min, max)) in response.api_keys.iter().zip(SUPPORTED_APIS) {
            assert_eq!(
                (entry.api_key, entry.min_version, entry.max_version),
                (api_key as i16, min, max)
            );
        }
        assert_eq!(api_versions_response(0, 7).throttle_time_ms, 0);
    }
}
