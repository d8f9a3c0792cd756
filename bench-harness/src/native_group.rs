//! The native driver's consumer-group member: Kafka's classic group protocol (FindCoordinator,
//! JoinGroup with the "range" assignor computed by the leader, SyncGroup, Heartbeat,
//! OffsetFetch/OffsetCommit, LeaveGroup), driving the same fetch loops as a manual consumer.

use std::cell::{Cell, RefCell};
use std::collections::BTreeMap;
use std::rc::Rc;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, anyhow, bail};
use bytes::{Buf, Bytes, BytesMut};
use kafka_protocol::messages::{
    ApiKey, ConsumerProtocolAssignment, ConsumerProtocolSubscription, FindCoordinatorRequest,
    GroupId, HeartbeatRequest, JoinGroupRequest, LeaveGroupRequest, OffsetCommitRequest,
    OffsetFetchRequest, SyncGroupRequest, TopicName,
    consumer_protocol_assignment::TopicPartition as AssignedTopic,
    join_group_request::JoinGroupRequestProtocol,
    leave_group_request::MemberIdentity,
    offset_commit_request::{OffsetCommitRequestPartition, OffsetCommitRequestTopic},
    offset_fetch_request::OffsetFetchRequestTopic,
    sync_group_request::SyncGroupRequestAssignment,
};
use kafka_protocol::protocol::{Decodable, Encodable, StrBytes};

use crate::client::{self, ApiVersionTable, Connection, ERROR_NONE};
use crate::driver::{ConsumerSpec, Control, RunClock};
use crate::metrics::Meter;
use crate::native::{
    FETCH_MAX_VERSION, FETCH_MIN_VERSION, FetchJob, IDLE_TICK, Positions, run_fetch_jobs,
};

const SESSION_TIMEOUT_MS: i32 = 10_000;
const REBALANCE_TIMEOUT_MS: i32 = 30_000;
const HEARTBEAT_INTERVAL: Duration = Duration::from_secs(1);
/// Offsets are committed this often, like the Java client's auto-commit default (5 s).
const COMMIT_INTERVAL: Duration = Duration::from_secs(5);
/// A group that keeps rebalancing this many times in one run is broken, not busy.
const MAX_GENERATIONS: u32 = 50;

const REBALANCE_IN_PROGRESS: i16 = 27;
const MEMBER_ID_REQUIRED: i16 = 79;
const UNKNOWN_MEMBER_ID: i16 = 25;
const ILLEGAL_GENERATION: i16 = 22;
const COORDINATOR_LOAD_IN_PROGRESS: i16 = 14;
const COORDINATOR_NOT_AVAILABLE: i16 = 15;
const PROTOCOL_TYPE: &str = "consumer";
const ASSIGNOR: &str = "range";

/// Versions used with the coordinator, negotiated once.
#[derive(Clone, Copy)]
struct GroupVersions {
    join: i16,
    sync: i16,
    heartbeat: i16,
    offset_fetch: i16,
    offset_commit: i16,
    leave: i16,
}

impl GroupVersions {
    fn pick(v: &ApiVersionTable) -> anyhow::Result<GroupVersions> {
        Ok(GroupVersions {
            join: v.pick(ApiKey::JoinGroup, 0, 7)?,
            sync: v.pick(ApiKey::SyncGroup, 0, 5)?,
            heartbeat: v.pick(ApiKey::Heartbeat, 0, 4)?,
            offset_fetch: v.pick(ApiKey::OffsetFetch, 1, 7)?,
            offset_commit: v.pick(ApiKey::OffsetCommit, 2, 8)?,
            leave: v.pick(ApiKey::LeaveGroup, 0, 5)?,
        })
    }
}

/// Encodes a ConsumerProtocolSubscription v0 (version prefix included) for one topic.
pub fn encode_subscription(topic: &str) -> anyhow::Result<Bytes> {
    let mut out = BytesMut::new();
    out.extend_from_slice(&0i16.to_be_bytes());
    ConsumerProtocolSubscription::default()
        .with_topics(vec![StrBytes::from_string(topic.to_string())])
        .encode(&mut out, 0)?;
    Ok(out.freeze())
}

fn decode_subscription(mut bytes: Bytes) -> anyhow::Result<ConsumerProtocolSubscription> {
    if bytes.len() < 2 {
        bail!("subscription metadata of {} bytes", bytes.len());
    }
    let version = bytes.get_i16().clamp(0, 3);
    ConsumerProtocolSubscription::decode(&mut bytes, version)
}

fn encode_assignment(topic: &str, partitions: Vec<i32>) -> anyhow::Result<Bytes> {
    let mut out = BytesMut::new();
    out.extend_from_slice(&0i16.to_be_bytes());
    ConsumerProtocolAssignment::default()
        .with_assigned_partitions(vec![
            AssignedTopic::default()
                .with_topic(TopicName(StrBytes::from_string(topic.to_string())))
                .with_partitions(partitions),
        ])
        .encode(&mut out, 0)?;
    Ok(out.freeze())
}

/// The partitions of `topic` in an assignment (an empty assignment means none).
pub fn decode_assignment(mut bytes: Bytes, topic: &str) -> anyhow::Result<Vec<i32>> {
    if bytes.is_empty() {
        return Ok(Vec::new());
    }
    if bytes.len() < 2 {
        bail!("assignment of {} bytes", bytes.len());
    }
    let version = bytes.get_i16().clamp(0, 3);
    let assignment = ConsumerProtocolAssignment::decode(&mut bytes, version)?;
    Ok(assignment
        .assigned_partitions
        .into_iter()
        .filter(|t| t.topic.0.as_str() == topic)
        .flat_map(|t| t.partitions)
        .collect())
}

/// Kafka's range assignor for one topic: members sorted by id; each gets `n / m` consecutive
/// partitions and the first `n % m` one more.
pub fn range_assign(members: &[String], partitions: u32) -> BTreeMap<String, Vec<i32>> {
    let mut sorted: Vec<&String> = members.iter().collect();
    sorted.sort();
    let m = sorted.len().max(1) as u32;
    let (base, extra) = (partitions / m, partitions % m);
    let mut next = 0i32;
    let mut out = BTreeMap::new();
    for (i, member) in sorted.into_iter().enumerate() {
        let count = base + u32::from((i as u32) < extra);
        out.insert(member.clone(), (next..next + count as i32).collect());
        next += count as i32;
    }
    out
}

async fn find_coordinator(
    conn: &mut Connection,
    versions: &ApiVersionTable,
    group: &str,
) -> anyhow::Result<std::net::SocketAddr> {
    let version = versions.pick(ApiKey::FindCoordinator, 0, 3)?;
    for _ in 0..100 {
        let request = FindCoordinatorRequest::default()
            .with_key(StrBytes::from_string(group.to_string()))
            .with_key_type(0);
        let response = conn.call(&request, version).await?;
        match response.error_code {
            ERROR_NONE => {
                return client::resolve(&format!("{}:{}", response.host.as_str(), response.port));
            }
            COORDINATOR_NOT_AVAILABLE | COORDINATOR_LOAD_IN_PROGRESS => {
                compio::time::sleep(Duration::from_millis(100)).await
            }
            e => bail!("FindCoordinator for {group}: error {e}"),
        }
    }
    bail!("no coordinator for group {group} after 10 s")
}

/// One generation's membership.
struct Membership {
    generation: i32,
    member_id: String,
    partitions: Vec<i32>,
}

async fn join_and_sync(
    coord: &mut Connection,
    v: &GroupVersions,
    group: &str,
    topic: &str,
    partitions: u32,
    member_id: &mut String,
) -> anyhow::Result<Membership> {
    let subscription = encode_subscription(topic)?;
    for _ in 0..20 {
        let join = JoinGroupRequest::default()
            .with_group_id(GroupId(StrBytes::from_string(group.to_string())))
            .with_session_timeout_ms(SESSION_TIMEOUT_MS)
            .with_rebalance_timeout_ms(REBALANCE_TIMEOUT_MS)
            .with_member_id(StrBytes::from_string(member_id.clone()))
            .with_protocol_type(StrBytes::from_static_str(PROTOCOL_TYPE))
            .with_protocols(vec![
                JoinGroupRequestProtocol::default()
                    .with_name(StrBytes::from_static_str(ASSIGNOR))
                    .with_metadata(subscription.clone()),
            ]);
        let joined = coord.call(&join, v.join).await?;
        match joined.error_code {
            ERROR_NONE => {}
            MEMBER_ID_REQUIRED => {
                // KIP-394: the coordinator names us, and we join again with that id.
                *member_id = joined.member_id.as_str().to_string();
                continue;
            }
            UNKNOWN_MEMBER_ID => {
                member_id.clear();
                continue;
            }
            REBALANCE_IN_PROGRESS | COORDINATOR_LOAD_IN_PROGRESS => continue,
            e => bail!("JoinGroup {group}: error {e}"),
        }
        *member_id = joined.member_id.as_str().to_string();
        let leader = joined.leader.as_str() == member_id.as_str();
        let mut assignments = Vec::new();
        if leader {
            let mut subscribed = Vec::new();
            for m in &joined.members {
                let sub = decode_subscription(m.metadata.clone())
                    .with_context(|| format!("member {}", m.member_id.as_str()))?;
                if sub.topics.iter().any(|t| t.as_str() == topic) {
                    subscribed.push(m.member_id.as_str().to_string());
                }
            }
            for (member, parts) in range_assign(&subscribed, partitions) {
                assignments.push(
                    SyncGroupRequestAssignment::default()
                        .with_member_id(StrBytes::from_string(member))
                        .with_assignment(encode_assignment(topic, parts)?),
                );
            }
        }
        let sync = SyncGroupRequest::default()
            .with_group_id(GroupId(StrBytes::from_string(group.to_string())))
            .with_generation_id(joined.generation_id)
            .with_member_id(StrBytes::from_string(member_id.clone()))
            .with_protocol_type(Some(StrBytes::from_static_str(PROTOCOL_TYPE)))
            .with_protocol_name(Some(StrBytes::from_static_str(ASSIGNOR)))
            .with_assignments(assignments);
        let synced = coord.call(&sync, v.sync).await?;
        match synced.error_code {
            ERROR_NONE => {
                let partitions = decode_assignment(synced.assignment, topic)?;
                return Ok(Membership {
                    generation: joined.generation_id,
                    member_id: member_id.clone(),
                    partitions,
                });
            }
            REBALANCE_IN_PROGRESS | ILLEGAL_GENERATION => continue,
            UNKNOWN_MEMBER_ID => {
                member_id.clear();
                continue;
            }
            e => bail!("SyncGroup {group}: error {e}"),
        }
    }
    bail!("group {group} did not settle after 20 join attempts")
}

async fn committed_offsets(
    coord: &mut Connection,
    v: &GroupVersions,
    group: &str,
    topic: &str,
    partitions: &[i32],
) -> anyhow::Result<BTreeMap<i32, i64>> {
    let request = OffsetFetchRequest::default()
        .with_group_id(GroupId(StrBytes::from_string(group.to_string())))
        .with_topics(Some(vec![
            OffsetFetchRequestTopic::default()
                .with_name(TopicName(StrBytes::from_string(topic.to_string())))
                .with_partition_indexes(partitions.to_vec()),
        ]));
    let response = coord.call(&request, v.offset_fetch).await?;
    if response.error_code != ERROR_NONE {
        bail!("OffsetFetch {group}: error {}", response.error_code);
    }
    let mut out = BTreeMap::new();
    for t in response.topics {
        for p in t.partitions {
            if p.error_code != ERROR_NONE {
                bail!(
                    "OffsetFetch {group} {topic}/{}: error {}",
                    p.partition_index,
                    p.error_code
                );
            }
            if p.committed_offset >= 0 {
                out.insert(p.partition_index, p.committed_offset);
            }
        }
    }
    Ok(out)
}

async fn commit(
    coord: &mut Connection,
    v: &GroupVersions,
    group: &str,
    membership: &Membership,
    topic: &str,
    positions: &BTreeMap<i32, i64>,
) -> anyhow::Result<i16> {
    if positions.is_empty() {
        return Ok(ERROR_NONE);
    }
    let request = OffsetCommitRequest::default()
        .with_group_id(GroupId(StrBytes::from_string(group.to_string())))
        .with_generation_id_or_member_epoch(membership.generation)
        .with_member_id(StrBytes::from_string(membership.member_id.clone()))
        .with_retention_time_ms(-1)
        .with_topics(vec![
            OffsetCommitRequestTopic::default()
                .with_name(TopicName(StrBytes::from_string(topic.to_string())))
                .with_partitions(
                    positions
                        .iter()
                        .map(|(&p, &o)| {
                            OffsetCommitRequestPartition::default()
                                .with_partition_index(p)
                                .with_committed_offset(o)
                                .with_committed_leader_epoch(-1)
                        })
                        .collect(),
                ),
        ]);
    let response = coord.call(&request, v.offset_commit).await?;
    for t in response.topics {
        for p in t.partitions {
            if p.error_code != ERROR_NONE {
                return Ok(p.error_code);
            }
        }
    }
    Ok(ERROR_NONE)
}

/// Runs one group member until `control` says stop, rejoining on every rebalance.
pub async fn run_group_consumer(
    spec: ConsumerSpec,
    control: Arc<Control>,
    meter: Meter,
    clock: RunClock,
) -> anyhow::Result<()> {
    let group = spec
        .group
        .clone()
        .ok_or_else(|| anyhow!("group consumer without a group id"))?;
    let client_id = format!("ringbench-consumer-{}", spec.id);
    let (mut boot, versions) = client::bootstrap(&spec.bootstrap, &client_id).await?;
    let fetch_version = versions.pick(ApiKey::Fetch, FETCH_MIN_VERSION, FETCH_MAX_VERSION)?;
    let gv = GroupVersions::pick(&versions)?;
    let layout =
        client::topic_layout(&mut boot, &versions, &spec.topic, Duration::from_secs(30)).await?;
    let coordinator = find_coordinator(&mut boot, &versions, &group).await?;
    drop(boot);
    let mut coord = Connection::connect(coordinator, &client_id).await?;
    let mut member_id = String::new();
    let mut marked_ready = false;
    for _ in 0..MAX_GENERATIONS {
        let membership = join_and_sync(
            &mut coord,
            &gv,
            &group,
            &spec.topic,
            spec.partitions,
            &mut member_id,
        )
        .await?;
        // Start where the group left off; a partition never committed starts at its beginning
        // (topics are fresh per run, like auto.offset.reset=earliest).
        let mut start =
            committed_offsets(&mut coord, &gv, &group, &spec.topic, &membership.partitions).await?;
        let positions: Positions = Rc::new(RefCell::new(BTreeMap::new()));
        let cancel = Rc::new(Cell::new(false));
        let mut jobs = Vec::new();
        for (node, parts) in layout.by_leader(&membership.partitions) {
            let mut conn = Connection::connect(layout.nodes[&node], &client_id).await?;
            let missing: Vec<i32> = parts
                .iter()
                .copied()
                .filter(|p| !start.contains_key(p))
                .collect();
            if !missing.is_empty() {
                start.extend(
                    client::list_offsets(&mut conn, &versions, &spec.topic, &missing, -2).await?,
                );
            }
            positions
                .borrow_mut()
                .extend(parts.iter().map(|p| (*p, start[p])));
            jobs.push(FetchJob {
                conn,
                version: fetch_version,
                topic: spec.topic.clone(),
                partitions: parts,
                positions: positions.clone(),
                workload: spec.workload.clone(),
                control: control.clone(),
                meter: meter.clone(),
                clock,
                cancel: cancel.clone(),
            });
        }
        if !marked_ready {
            control.mark_ready();
            marked_ready = true;
        }
        // Heartbeats (and periodic commits) run beside the fetch loops and cancel them when the
        // coordinator announces a rebalance.
        let heartbeat = {
            let (cancel, control, positions, group, topic) = (
                cancel.clone(),
                control.clone(),
                positions.clone(),
                group.clone(),
                spec.topic.clone(),
            );
            let (generation, member) = (membership.generation, membership.member_id.clone());
            let mut coord = coord;
            compio::runtime::spawn(async move {
                let mut since_commit = Duration::ZERO;
                let mut since_heartbeat = Duration::ZERO;
                let mut result = Ok(());
                while !cancel.get() && !control.stopped() {
                    // Short sleeps so that a stop or cancel is seen within one tick.
                    compio::time::sleep(IDLE_TICK).await;
                    since_commit += IDLE_TICK;
                    since_heartbeat += IDLE_TICK;
                    if since_heartbeat < HEARTBEAT_INTERVAL {
                        continue;
                    }
                    since_heartbeat = Duration::ZERO;
                    let request = HeartbeatRequest::default()
                        .with_group_id(GroupId(StrBytes::from_string(group.clone())))
                        .with_generation_id(generation)
                        .with_member_id(StrBytes::from_string(member.clone()));
                    match coord.call(&request, gv.heartbeat).await {
                        Ok(r) if r.error_code == ERROR_NONE => {}
                        Ok(r)
                            if matches!(
                                r.error_code,
                                REBALANCE_IN_PROGRESS | ILLEGAL_GENERATION | UNKNOWN_MEMBER_ID
                            ) =>
                        {
                            cancel.set(true);
                        }
                        Ok(r) => {
                            result = Err(anyhow!("Heartbeat {group}: error {}", r.error_code));
                            cancel.set(true);
                        }
                        Err(e) => {
                            result = Err(e);
                            cancel.set(true);
                        }
                    }
                    if since_commit >= COMMIT_INTERVAL && !cancel.get() {
                        since_commit = Duration::ZERO;
                        let snapshot = positions.borrow().clone();
                        let m = Membership {
                            generation,
                            member_id: member.clone(),
                            partitions: Vec::new(),
                        };
                        if let Err(e) = commit(&mut coord, &gv, &group, &m, &topic, &snapshot).await
                        {
                            result = Err(e);
                            cancel.set(true);
                        }
                    }
                }
                (coord, result)
            })
        };
        let fetched = run_fetch_jobs(jobs).await;
        cancel.set(true);
        let (returned, beat) = heartbeat
            .await
            .map_err(|e| anyhow!("heartbeat task panicked: {e:?}"))?;
        coord = returned;
        fetched?;
        beat?;
        let snapshot = positions.borrow().clone();
        // A commit refused because the group moved on is expected during a rebalance; the next
        // generation's owner starts from the last accepted commit.
        let _ = commit(&mut coord, &gv, &group, &membership, &spec.topic, &snapshot).await?;
        if control.stopped() {
            let leave = LeaveGroupRequest::default()
                .with_group_id(GroupId(StrBytes::from_string(group.clone())))
                .with_member_id(StrBytes::from_string(member_id.clone()))
                .with_members(vec![
                    MemberIdentity::default()
                        .with_member_id(StrBytes::from_string(member_id.clone())),
                ]);
            coord.call(&leave, gv.leave).await?;
            return Ok(());
        }
    }
    bail!("group {group} rebalanced {MAX_GENERATIONS} times in one run")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn range_assignor_matches_kafka() {
        let members = vec!["c".to_string(), "a".to_string(), "b".to_string()];
        let a = range_assign(&members, 7);
        assert_eq!(a["a"], vec![0, 1, 2]);
        assert_eq!(a["b"], vec![3, 4]);
        assert_eq!(a["c"], vec![5, 6]);
        let a = range_assign(&members, 2);
        assert_eq!(a["c"], Vec::<i32>::new());
    }

    #[test]
    fn subscription_and_assignment_round_trip() {
        let sub = decode_subscription(encode_subscription("t").unwrap()).unwrap();
        assert_eq!(sub.topics.len(), 1);
        assert_eq!(sub.topics[0].as_str(), "t");
        let bytes = encode_assignment("t", vec![1, 3]).unwrap();
        assert_eq!(decode_assignment(bytes.clone(), "t").unwrap(), vec![1, 3]);
        assert!(decode_assignment(bytes, "other").unwrap().is_empty());
        assert!(decode_assignment(Bytes::new(), "t").unwrap().is_empty());
        assert!(decode_assignment(Bytes::from_static(&[0]), "t").is_err());
    }
}
