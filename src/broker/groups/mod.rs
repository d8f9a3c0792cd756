//! The group coordinator: Kafka's classic consumer-group protocol (join, sync, heartbeat, leave),
//! committed offsets, and the group admin APIs, for the groups whose coordinator is this shard.
//!
//! A group's coordinator is the shard `fnv1a(group) % shards`; all of the group's state lives on that
//! shard, and a group request that reaches another shard gets NOT_COORDINATOR. Members compute
//! assignments themselves (the leader does); the coordinator stores and hands out opaque bytes.
//!
//! State machine (as Kafka's ClassicGroupState): Empty -> PreparingRebalance -> CompletingRebalance
//! -> Stable, and back to PreparingRebalance on any membership change. Deadlines (session timeouts,
//! the join phase, the sync phase) are checked by a tick on the shard every 50 ms; requests that wait
//! (JoinGroup until the join phase completes, SyncGroup until the leader's assignment arrives) park
//! on a oneshot channel that the state machine completes.

pub mod records;
pub mod store;

use std::cell::{Cell, RefCell};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::ops::Not;
use std::time::{Duration, Instant};

use bytes::{Buf, Bytes};
use futures_channel::oneshot;
use kafka_protocol::ResponseError as E;
use tracing::{debug, info, warn};

use records::{GroupRecord, GroupValue, MemberValue, OffsetValue};
use store::OffsetStore;

/// Error codes the coordinator answers with.
pub mod code {
    use super::E;
    pub const NONE: i16 = 0;
    pub const UNKNOWN_TOPIC_OR_PARTITION: i16 = E::UnknownTopicOrPartition.code();
    pub const COORDINATOR_LOAD_IN_PROGRESS: i16 = E::CoordinatorLoadInProgress.code();
    pub const COORDINATOR_NOT_AVAILABLE: i16 = E::CoordinatorNotAvailable.code();
    pub const NOT_COORDINATOR: i16 = E::NotCoordinator.code();
    pub const ILLEGAL_GENERATION: i16 = E::IllegalGeneration.code();
    pub const INCONSISTENT_GROUP_PROTOCOL: i16 = E::InconsistentGroupProtocol.code();
    pub const INVALID_GROUP_ID: i16 = E::InvalidGroupId.code();
    pub const UNKNOWN_MEMBER_ID: i16 = E::UnknownMemberId.code();
    pub const INVALID_SESSION_TIMEOUT: i16 = E::InvalidSessionTimeout.code();
    pub const REBALANCE_IN_PROGRESS: i16 = E::RebalanceInProgress.code();
    pub const OFFSET_METADATA_TOO_LARGE: i16 = E::OffsetMetadataTooLarge.code();
    pub const KAFKA_STORAGE_ERROR: i16 = E::KafkaStorageError.code();
    pub const GROUP_ID_NOT_FOUND: i16 = E::GroupIdNotFound.code();
    pub const NON_EMPTY_GROUP: i16 = E::NonEmptyGroup.code();
    pub const MEMBER_ID_REQUIRED: i16 = E::MemberIdRequired.code();
    pub const FENCED_INSTANCE_ID: i16 = E::FencedInstanceId.code();
    pub const GROUP_SUBSCRIBED_TO_TOPIC: i16 = E::GroupSubscribedToTopic.code();
    pub const GROUP_MAX_SIZE_REACHED: i16 = E::GroupMaxSizeReached.code();
}

/// The coordinator's settings, from the broker config.
#[derive(Clone, Debug)]
pub struct GroupSettings {
    pub initial_rebalance_delay_ms: u64,
    pub min_session_timeout_ms: i32,
    pub max_session_timeout_ms: i32,
    /// How long an empty group's offsets are kept (`offsets.retention.minutes`).
    pub offsets_retention_ms: u64,
    /// `offset.metadata.max.bytes` (Kafka's default 4096).
    pub offset_metadata_max_bytes: usize,
    /// `group.max.size` (Kafka's default is unlimited; a limit keeps one group from exhausting memory).
    pub max_group_size: usize,
    /// Compact the offsets log once it is this big and four times the live state.
    pub compaction_min_bytes: u64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GroupState {
    Empty,
    PreparingRebalance,
    CompletingRebalance,
    Stable,
}

impl GroupState {
    pub fn name(self) -> &'static str {
        match self {
            GroupState::Empty => "Empty",
            GroupState::PreparingRebalance => "PreparingRebalance",
            GroupState::CompletingRebalance => "CompletingRebalance",
            GroupState::Stable => "Stable",
        }
    }
}

/// What a JoinGroup caller gets back when the join phase completes.
#[derive(Clone, Debug, Default)]
pub struct JoinOutcome {
    pub error: i16,
    pub generation: i32,
    pub protocol_type: Option<String>,
    pub protocol_name: Option<String>,
    pub leader: String,
    pub member_id: String,
    /// Only the leader gets the members and their metadata for the chosen protocol.
    pub members: Vec<(String, Option<String>, Bytes)>,
    /// KIP-814 (JoinGroup v9+): a static leader that rejoined a Stable group gets the members so
    /// it can track metadata, but must not compute a new assignment.
    pub skip_assignment: bool,
}

#[derive(Clone, Debug, Default)]
pub struct SyncOutcome {
    pub error: i16,
    pub protocol_type: Option<String>,
    pub protocol_name: Option<String>,
    pub assignment: Bytes,
}

struct Member {
    id: String,
    instance_id: Option<String>,
    client_id: String,
    client_host: String,
    session_timeout: Duration,
    rebalance_timeout: Duration,
    protocol_type: String,
    protocols: Vec<(String, Bytes)>,
    assignment: Bytes,
    last_heartbeat: Instant,
    join_waiter: Option<oneshot::Sender<JoinOutcome>>,
    sync_waiter: Option<oneshot::Sender<SyncOutcome>>,
}

impl Member {
    fn metadata_for(&self, protocol: &str) -> Bytes {
        self.protocols
            .iter()
            .find(|(name, _)| name == protocol)
            .map(|(_, metadata)| metadata.clone())
            .unwrap_or_default()
    }

    fn value(&self, protocol: Option<&str>) -> MemberValue {
        MemberValue {
            member_id: self.id.clone(),
            group_instance_id: self.instance_id.clone(),
            client_id: self.client_id.clone(),
            client_host: self.client_host.clone(),
            rebalance_timeout_ms: self.rebalance_timeout.as_millis() as i32,
            session_timeout_ms: self.session_timeout.as_millis() as i32,
            subscription: protocol.map(|p| self.metadata_for(p)).unwrap_or_default(),
            assignment: self.assignment.clone(),
        }
    }
}

#[derive(Clone, Debug)]
struct CommittedOffset {
    offset: i64,
    leader_epoch: i32,
    metadata: String,
    commit_timestamp_ms: i64,
}

struct Group {
    id: String,
    state: GroupState,
    protocol_type: Option<String>,
    protocol_name: Option<String>,
    generation: i32,
    leader: Option<String>,
    members: BTreeMap<String, Member>,
    /// Member ids handed out with MEMBER_ID_REQUIRED, not yet joined.
    pending_members: HashMap<String, Instant>,
    static_members: HashMap<String, String>,
    offsets: BTreeMap<(String, i32), CommittedOffset>,
    /// When the join phase ends at the latest (rebalance timeout), and the initial-delay deadline.
    join_deadline: Option<Instant>,
    initial_delay_deadline: Option<Instant>,
    initial_delay_started: Option<Instant>,
    sync_deadline: Option<Instant>,
    state_timestamp_ms: i64,
    /// When the group last became empty; its offsets expire `offsets.retention.minutes` later.
    empty_since_ms: Option<i64>,
}

impl Group {
    /// Every member with its metadata for the chosen protocol, as the leader is sent them.
    fn member_list(&self) -> Vec<(String, Option<String>, Bytes)> {
        let protocol = self.protocol_name.clone().unwrap_or_default();
        self.members
            .values()
            .map(|m| {
                (
                    m.id.clone(),
                    m.instance_id.clone(),
                    m.metadata_for(&protocol),
                )
            })
            .collect()
    }

    fn new(id: &str) -> Group {
        Group {
            id: id.to_string(),
            state: GroupState::Empty,
            protocol_type: None,
            protocol_name: None,
            generation: 0,
            leader: None,
            members: BTreeMap::new(),
            pending_members: HashMap::new(),
            static_members: HashMap::new(),
            offsets: BTreeMap::new(),
            join_deadline: None,
            initial_delay_deadline: None,
            initial_delay_started: None,
            sync_deadline: None,
            state_timestamp_ms: super::now_ms(),
            empty_since_ms: Some(super::now_ms()),
        }
    }

    fn set_state(&mut self, state: GroupState) {
        self.state = state;
        self.state_timestamp_ms = super::now_ms();
        if state == GroupState::Empty {
            self.empty_since_ms.get_or_insert(self.state_timestamp_ms);
        } else {
            self.empty_since_ms = None;
        }
    }

    fn is_empty(&self) -> bool {
        self.members.is_empty() && self.pending_members.is_empty()
    }

    fn metadata_record(&self) -> GroupRecord {
        GroupRecord::Group {
            group: self.id.clone(),
            value: Some(GroupValue {
                protocol_type: self.protocol_type.clone().unwrap_or_default(),
                generation: self.generation,
                protocol: self.protocol_name.clone(),
                leader: self.leader.clone(),
                current_state_timestamp_ms: self.state_timestamp_ms,
                members: self
                    .members
                    .values()
                    .map(|m| m.value(self.protocol_name.as_deref()))
                    .collect(),
            }),
        }
    }

    /// The protocol every member supports that gets the most votes (each member votes for its first
    /// choice among the candidates), as `ClassicGroup.selectProtocol`.
    fn select_protocol(&self) -> Option<String> {
        let mut candidates: Option<HashSet<&str>> = None;
        for member in self.members.values() {
            let names: HashSet<&str> = member.protocols.iter().map(|(n, _)| n.as_str()).collect();
            candidates = Some(match candidates {
                None => names,
                Some(c) => c.intersection(&names).copied().collect(),
            });
        }
        let candidates = candidates?;
        let mut votes: BTreeMap<&str, usize> = BTreeMap::new();
        for member in self.members.values() {
            if let Some((name, _)) = member
                .protocols
                .iter()
                .find(|(n, _)| candidates.contains(n.as_str()))
            {
                *votes.entry(name.as_str()).or_default() += 1;
            }
        }
        votes
            .into_iter()
            .max_by_key(|(name, count)| (*count, std::cmp::Reverse(*name)))
            .map(|(name, _)| name.to_string())
    }

    /// Whether a joining member's protocols are compatible with the group's members.
    fn supports(&self, protocol_type: &str, protocols: &[(String, Bytes)]) -> bool {
        if self.members.is_empty() {
            return !protocol_type.is_empty() && !protocols.is_empty();
        }
        if self.protocol_type.as_deref() != Some(protocol_type) {
            return false;
        }
        let names: HashSet<&str> = protocols.iter().map(|(n, _)| n.as_str()).collect();
        self.members
            .values()
            .map(|m| {
                m.protocols
                    .iter()
                    .map(|(n, _)| n.as_str())
                    .collect::<HashSet<_>>()
            })
            .fold(names, |acc, theirs| {
                acc.intersection(&theirs).copied().collect()
            })
            .is_empty()
            .not()
    }

    /// The topics the group's members subscribe to, read from the consumer-protocol subscriptions.
    fn subscribed_topics(&self) -> HashSet<String> {
        let mut topics = HashSet::new();
        if self.protocol_type.as_deref() != Some("consumer") || self.state == GroupState::Empty {
            return topics;
        }
        if let Some(protocol) = &self.protocol_name {
            for member in self.members.values() {
                topics.extend(subscription_topics(member.metadata_for(protocol)));
            }
        }
        topics
    }
}

/// Parses the topic list of a ConsumerProtocolSubscription (v0-3 share the prefix `version, topics`).
fn subscription_topics(mut bytes: Bytes) -> Vec<String> {
    let mut topics = Vec::new();
    if bytes.remaining() < 6 {
        return topics;
    }
    let _version = bytes.get_i16();
    let count = bytes.get_i32();
    for _ in 0..count.max(0) {
        if bytes.remaining() < 2 {
            break;
        }
        let len = bytes.get_i16();
        if len < 0 || bytes.remaining() < len as usize {
            break;
        }
        let name = bytes.split_to(len as usize);
        if let Ok(name) = std::str::from_utf8(&name) {
            topics.push(name.to_string());
        }
    }
    topics
}

/// A join request, as the coordinator needs it.
pub struct JoinRequest {
    pub group_id: String,
    pub member_id: String,
    pub instance_id: Option<String>,
    pub client_id: String,
    pub client_host: String,
    pub session_timeout_ms: i32,
    pub rebalance_timeout_ms: i32,
    pub protocol_type: String,
    pub protocols: Vec<(String, Bytes)>,
    /// v4+: a new member must first get an id (MEMBER_ID_REQUIRED) and join again with it.
    pub require_known_member_id: bool,
    /// v9+: the response can carry `skip_assignment` (KIP-814).
    pub supports_skip_assignment: bool,
}

/// One committed offset as OffsetFetch reports it: (partition, offset, leader epoch, metadata).
pub type CommittedEntry = (i32, i64, i32, String);

/// The coordinator of one shard.
pub struct GroupCoordinator {
    pub settings: GroupSettings,
    groups: RefCell<HashMap<String, Group>>,
    store: OffsetStore,
    loaded: Cell<bool>,
}

impl GroupCoordinator {
    /// Opens the offsets log and rebuilds every group's state from it.
    pub async fn open(
        dir: &std::path::Path,
        settings: GroupSettings,
    ) -> std::io::Result<GroupCoordinator> {
        let started = Instant::now();
        let (store, records) = OffsetStore::open(dir).await?;
        let record_count = records.len();
        let coordinator = GroupCoordinator {
            settings,
            groups: RefCell::new(HashMap::new()),
            store,
            loaded: Cell::new(false),
        };
        {
            let mut groups = coordinator.groups.borrow_mut();
            for record in records {
                apply_record(&mut groups, record);
            }
        }
        coordinator.loaded.set(true);
        let groups = coordinator.groups.borrow().len();
        info!(dir = %dir.display(), records = record_count, groups, bytes = coordinator.store.size_bytes(),
              elapsed_ms = started.elapsed().as_millis() as u64, "offsets log loaded");
        Ok(coordinator)
    }

    pub fn is_loaded(&self) -> bool {
        self.loaded.get()
    }

    pub fn offsets_log_bytes(&self) -> u64 {
        self.store.size_bytes()
    }

    fn validate_session_timeout(&self, ms: i32) -> bool {
        ms >= self.settings.min_session_timeout_ms && ms <= self.settings.max_session_timeout_ms
    }

    pub async fn join(&self, request: JoinRequest) -> JoinOutcome {
        let fail = |error: i16, member_id: &str| JoinOutcome {
            error,
            member_id: member_id.to_string(),
            generation: -1,
            ..JoinOutcome::default()
        };
        if request.group_id.is_empty() {
            return fail(code::INVALID_GROUP_ID, &request.member_id);
        }
        if !self.validate_session_timeout(request.session_timeout_ms) {
            return fail(code::INVALID_SESSION_TIMEOUT, &request.member_id);
        }
        let receiver = {
            let mut groups = self.groups.borrow_mut();
            let group = groups
                .entry(request.group_id.clone())
                .or_insert_with(|| Group::new(&request.group_id));
            if !group.supports(&request.protocol_type, &request.protocols) {
                return fail(code::INCONSISTENT_GROUP_PROTOCOL, &request.member_id);
            }
            let now = Instant::now();
            let mut member_id = request.member_id.clone();
            if member_id.is_empty() {
                if let Some(instance_id) = &request.instance_id
                    && let Some(old_id) = group.static_members.get(instance_id).cloned()
                {
                    // A static member coming back: it takes a new id, keeps its assignment, and the
                    // old id is fenced. If nothing about it changed, the group stays Stable: no
                    // rebalance, even when it was the leader (KIP-345/KIP-814, as Kafka does).
                    let new_id = format!("{}-{}", instance_id, uuid::Uuid::new_v4());
                    if let Some(mut member) = group.members.remove(&old_id) {
                        let unchanged = member.protocols == request.protocols;
                        member.id = new_id.clone();
                        member.protocols = request.protocols.clone();
                        member.session_timeout =
                            Duration::from_millis(request.session_timeout_ms as u64);
                        member.rebalance_timeout =
                            Duration::from_millis(request.rebalance_timeout_ms as u64);
                        member.last_heartbeat = now;
                        group.members.insert(new_id.clone(), member);
                        group
                            .static_members
                            .insert(instance_id.clone(), new_id.clone());
                        let was_leader = group.leader.as_deref() == Some(old_id.as_str());
                        if was_leader {
                            group.leader = Some(new_id.clone());
                        }
                        if group.state == GroupState::Stable && unchanged {
                            info!(group = %group.id, instance = %instance_id, member = %new_id,
                                  was_leader, "static member rejoined without a rebalance");
                            // A leader that can be told to skip the assignment gets the members
                            // (KIP-814). An older client is given the old leader id instead, so it
                            // acts as a follower and fetches its unchanged assignment with
                            // SyncGroup; the next rebalance makes it the leader again.
                            let skip_assignment = was_leader && request.supports_skip_assignment;
                            let members = if skip_assignment {
                                group.member_list()
                            } else {
                                Vec::new()
                            };
                            let leader = if was_leader && !skip_assignment {
                                old_id
                            } else {
                                group.leader.clone().unwrap_or_default()
                            };
                            return JoinOutcome {
                                error: code::NONE,
                                generation: group.generation,
                                protocol_type: group.protocol_type.clone(),
                                protocol_name: group.protocol_name.clone(),
                                leader,
                                member_id: new_id,
                                members,
                                skip_assignment,
                            };
                        }
                        member_id = new_id;
                    }
                } else if request.require_known_member_id && request.instance_id.is_none() {
                    // KIP-394: hand out an id first, so a client that retries after a timeout does
                    // not leave ghost members behind.
                    let new_id = format!("{}-{}", request.client_id, uuid::Uuid::new_v4());
                    group.pending_members.insert(new_id.clone(), now);
                    return fail(code::MEMBER_ID_REQUIRED, &new_id);
                } else {
                    member_id = match &request.instance_id {
                        Some(instance_id) => format!("{}-{}", instance_id, uuid::Uuid::new_v4()),
                        None => format!("{}-{}", request.client_id, uuid::Uuid::new_v4()),
                    };
                }
            } else if !group.members.contains_key(&member_id)
                && !group.pending_members.contains_key(&member_id)
            {
                return fail(code::UNKNOWN_MEMBER_ID, &member_id);
            }
            if let Some(instance_id) = &request.instance_id
                && let Some(known) = group.static_members.get(instance_id)
                && *known != member_id
            {
                return fail(code::FENCED_INSTANCE_ID, &member_id);
            }
            if !group.members.contains_key(&member_id)
                && group.members.len() >= self.settings.max_group_size
            {
                group.pending_members.remove(&member_id);
                return fail(code::GROUP_MAX_SIZE_REACHED, &member_id);
            }
            group.pending_members.remove(&member_id);

            // A known member rejoining a Stable group with unchanged protocols, if it is not the
            // leader, just gets the current generation back (Kafka does the same).
            if let Some(member) = group.members.get_mut(&member_id)
                && group.state == GroupState::Stable
                && member.protocols == request.protocols
                && group.leader.as_deref() != Some(member_id.as_str())
            {
                member.last_heartbeat = now;
                return JoinOutcome {
                    error: code::NONE,
                    generation: group.generation,
                    protocol_type: group.protocol_type.clone(),
                    protocol_name: group.protocol_name.clone(),
                    leader: group.leader.clone().unwrap_or_default(),
                    member_id,
                    members: Vec::new(),
                    skip_assignment: false,
                };
            }

            let (sender, receiver) = oneshot::channel();
            let is_new = !group.members.contains_key(&member_id);
            let member = group
                .members
                .entry(member_id.clone())
                .or_insert_with(|| Member {
                    id: member_id.clone(),
                    instance_id: request.instance_id.clone(),
                    client_id: request.client_id.clone(),
                    client_host: request.client_host.clone(),
                    session_timeout: Duration::ZERO,
                    rebalance_timeout: Duration::ZERO,
                    protocol_type: request.protocol_type.clone(),
                    protocols: Vec::new(),
                    assignment: Bytes::new(),
                    last_heartbeat: now,
                    join_waiter: None,
                    sync_waiter: None,
                });
            member.protocols = request.protocols.clone();
            member.protocol_type = request.protocol_type.clone();
            member.session_timeout =
                Duration::from_millis(request.session_timeout_ms.max(0) as u64);
            member.rebalance_timeout =
                Duration::from_millis(request.rebalance_timeout_ms.max(0) as u64);
            member.last_heartbeat = now;
            // A member that joins again while its earlier join is parked replaces that request.
            if let Some(old) = member.join_waiter.replace(sender) {
                let _ = old.send(JoinOutcome {
                    error: code::UNKNOWN_MEMBER_ID,
                    generation: -1,
                    member_id: member_id.clone(),
                    ..JoinOutcome::default()
                });
            }
            if let Some(instance_id) = &request.instance_id {
                group
                    .static_members
                    .insert(instance_id.clone(), member_id.clone());
            }
            if group.protocol_type.is_none() || group.members.len() == 1 {
                group.protocol_type = Some(request.protocol_type.clone());
            }
            if is_new {
                debug!(group = %group.id, member = %member_id, "member joined");
            }
            self.prepare_rebalance(group, now, is_new);
            self.maybe_complete_join(group, now);
            receiver
        };
        receiver
            .await
            .unwrap_or_else(|_| fail(code::COORDINATOR_NOT_AVAILABLE, &request.member_id))
    }

    /// Moves the group into PreparingRebalance (or extends the initial delay when a new member
    /// arrives during it).
    fn prepare_rebalance(&self, group: &mut Group, now: Instant, new_member: bool) {
        let rebalance_timeout = group
            .members
            .values()
            .map(|m| m.rebalance_timeout)
            .max()
            .unwrap_or(Duration::ZERO);
        match group.state {
            GroupState::PreparingRebalance => {
                if new_member
                    && let (Some(started), Some(_)) =
                        (group.initial_delay_started, group.initial_delay_deadline)
                {
                    let delay = Duration::from_millis(self.settings.initial_rebalance_delay_ms);
                    let cap = started + rebalance_timeout;
                    group.initial_delay_deadline = Some((now + delay).min(cap));
                }
                group.join_deadline = Some(now.max(group.join_deadline.unwrap_or(now)));
            }
            state => {
                let was_empty = state == GroupState::Empty;
                // Everyone must join again: members in the middle of a sync are told to rejoin.
                for member in group.members.values_mut() {
                    if let Some(waiter) = member.sync_waiter.take() {
                        let _ = waiter.send(SyncOutcome {
                            error: code::REBALANCE_IN_PROGRESS,
                            ..SyncOutcome::default()
                        });
                    }
                }
                group.set_state(GroupState::PreparingRebalance);
                group.sync_deadline = None;
                group.join_deadline = Some(now + rebalance_timeout);
                if was_empty && self.settings.initial_rebalance_delay_ms > 0 {
                    group.initial_delay_started = Some(now);
                    group.initial_delay_deadline = Some(
                        now + Duration::from_millis(self.settings.initial_rebalance_delay_ms)
                            .min(rebalance_timeout),
                    );
                } else {
                    group.initial_delay_started = None;
                    group.initial_delay_deadline = None;
                }
                info!(group = %group.id, generation = group.generation, members = group.members.len(),
                      "preparing rebalance");
            }
        }
    }

    /// Ends the join phase if every member has rejoined (and any initial delay is over), or the
    /// rebalance timeout has passed; members that did not rejoin are removed.
    fn maybe_complete_join(&self, group: &mut Group, now: Instant) {
        if group.state != GroupState::PreparingRebalance {
            return;
        }
        let all_joined = group.members.values().all(|m| m.join_waiter.is_some())
            && group.pending_members.is_empty();
        let timed_out = group.join_deadline.is_some_and(|d| now >= d);
        let delay_over = group.initial_delay_deadline.is_none_or(|d| now >= d);
        if !(timed_out || (all_joined && delay_over)) {
            return;
        }
        let stragglers: Vec<String> = group
            .members
            .values()
            .filter(|m| m.join_waiter.is_none())
            .map(|m| m.id.clone())
            .collect();
        for id in stragglers {
            self.remove_member(group, &id, "did not rejoin in time");
        }
        group.pending_members.clear();
        group.generation += 1;
        group.join_deadline = None;
        group.initial_delay_deadline = None;
        group.initial_delay_started = None;
        if group.members.is_empty() {
            group.protocol_name = None;
            group.leader = None;
            group.set_state(GroupState::Empty);
            info!(group = %group.id, generation = group.generation, "group is empty");
            return;
        }
        group.protocol_name = group.select_protocol();
        if group
            .leader
            .as_ref()
            .is_none_or(|l| !group.members.contains_key(l))
        {
            group.leader = group.members.keys().next().cloned();
        }
        group.set_state(GroupState::CompletingRebalance);
        let rebalance_timeout = group
            .members
            .values()
            .map(|m| m.rebalance_timeout)
            .max()
            .unwrap_or_default();
        group.sync_deadline = Some(now + rebalance_timeout);
        let protocol = group.protocol_name.clone().unwrap_or_default();
        let leader = group.leader.clone().unwrap_or_default();
        let member_list = group.member_list();
        info!(group = %group.id, generation = group.generation, members = member_list.len(), %protocol,
              "join phase complete");
        for member in group.members.values_mut() {
            member.last_heartbeat = now;
            if let Some(waiter) = member.join_waiter.take() {
                let _ = waiter.send(JoinOutcome {
                    error: code::NONE,
                    generation: group.generation,
                    protocol_type: group.protocol_type.clone(),
                    protocol_name: group.protocol_name.clone(),
                    leader: leader.clone(),
                    member_id: member.id.clone(),
                    members: if member.id == leader {
                        member_list.clone()
                    } else {
                        Vec::new()
                    },
                    skip_assignment: false,
                });
            }
        }
    }

    fn remove_member(&self, group: &mut Group, member_id: &str, why: &str) {
        if let Some(member) = group.members.remove(member_id) {
            info!(group = %group.id, member = %member_id, reason = why, "member removed");
            if let Some(instance_id) = &member.instance_id
                && group.static_members.get(instance_id).map(String::as_str) == Some(member_id)
            {
                group.static_members.remove(instance_id);
            }
            if let Some(waiter) = member.join_waiter {
                let _ = waiter.send(JoinOutcome {
                    error: code::UNKNOWN_MEMBER_ID,
                    generation: -1,
                    member_id: member_id.to_string(),
                    ..JoinOutcome::default()
                });
            }
            if let Some(waiter) = member.sync_waiter {
                let _ = waiter.send(SyncOutcome {
                    error: code::UNKNOWN_MEMBER_ID,
                    ..SyncOutcome::default()
                });
            }
        }
    }

    /// Checks a member's identity against the group (shared by sync, heartbeat and commit).
    fn check_member(
        group: &Group,
        member_id: &str,
        instance_id: Option<&str>,
        generation: i32,
    ) -> Result<(), i16> {
        if let Some(instance_id) = instance_id
            && let Some(known) = group.static_members.get(instance_id)
            && known != member_id
        {
            return Err(code::FENCED_INSTANCE_ID);
        }
        if !group.members.contains_key(member_id) {
            return Err(code::UNKNOWN_MEMBER_ID);
        }
        if generation != group.generation {
            return Err(code::ILLEGAL_GENERATION);
        }
        Ok(())
    }

    #[allow(clippy::too_many_arguments)]
    pub async fn sync(
        &self,
        group_id: &str,
        generation: i32,
        member_id: &str,
        instance_id: Option<&str>,
        protocol_type: Option<&str>,
        protocol_name: Option<&str>,
        assignments: Vec<(String, Bytes)>,
    ) -> SyncOutcome {
        let fail = |error| SyncOutcome {
            error,
            ..SyncOutcome::default()
        };
        let (receiver, record) = {
            let mut groups = self.groups.borrow_mut();
            let Some(group) = groups.get_mut(group_id) else {
                return fail(code::UNKNOWN_MEMBER_ID);
            };
            if let Err(error) = Self::check_member(group, member_id, instance_id, generation) {
                return fail(error);
            }
            if protocol_type.is_some_and(|p| Some(p) != group.protocol_type.as_deref())
                || protocol_name.is_some_and(|p| Some(p) != group.protocol_name.as_deref())
            {
                return fail(code::INCONSISTENT_GROUP_PROTOCOL);
            }
            match group.state {
                GroupState::Empty => return fail(code::UNKNOWN_MEMBER_ID),
                GroupState::PreparingRebalance => return fail(code::REBALANCE_IN_PROGRESS),
                GroupState::Stable => {
                    let member = &group.members[member_id];
                    return SyncOutcome {
                        error: code::NONE,
                        protocol_type: group.protocol_type.clone(),
                        protocol_name: group.protocol_name.clone(),
                        assignment: member.assignment.clone(),
                    };
                }
                GroupState::CompletingRebalance => {}
            }
            let (sender, receiver) = oneshot::channel();
            if let Some(member) = group.members.get_mut(member_id) {
                member.last_heartbeat = Instant::now();
                member.sync_waiter = Some(sender);
            }
            if group.leader.as_deref() != Some(member_id) {
                (receiver, None)
            } else {
                // The leader's assignment: store it, persist the group, then release every member.
                let assigned: HashMap<String, Bytes> = assignments.into_iter().collect();
                for member in group.members.values_mut() {
                    member.assignment = assigned.get(&member.id).cloned().unwrap_or_default();
                }
                (receiver, Some(group.metadata_record()))
            }
        };
        if let Some(record) = record {
            let persisted = self.store.append(std::slice::from_ref(&record)).await;
            let mut groups = self.groups.borrow_mut();
            if let Some(group) = groups.get_mut(group_id)
                && group.state == GroupState::CompletingRebalance
                && group.generation == generation
            {
                let error = if persisted.is_ok() {
                    code::NONE
                } else {
                    code::KAFKA_STORAGE_ERROR
                };
                if let Err(e) = &persisted {
                    warn!(group = %group_id, error = %e, "persisting group metadata failed");
                } else {
                    group.set_state(GroupState::Stable);
                    group.sync_deadline = None;
                    info!(group = %group_id, generation, "group is stable");
                }
                for member in group.members.values_mut() {
                    if let Some(waiter) = member.sync_waiter.take() {
                        let _ = waiter.send(SyncOutcome {
                            error,
                            protocol_type: group.protocol_type.clone(),
                            protocol_name: group.protocol_name.clone(),
                            assignment: if error == code::NONE {
                                member.assignment.clone()
                            } else {
                                Bytes::new()
                            },
                        });
                    }
                }
            }
        }
        receiver
            .await
            .unwrap_or_else(|_| fail(code::REBALANCE_IN_PROGRESS))
    }

    pub fn heartbeat(
        &self,
        group_id: &str,
        generation: i32,
        member_id: &str,
        instance_id: Option<&str>,
    ) -> i16 {
        let mut groups = self.groups.borrow_mut();
        let Some(group) = groups.get_mut(group_id) else {
            return code::UNKNOWN_MEMBER_ID;
        };
        if let Some(instance_id) = instance_id
            && let Some(known) = group.static_members.get(instance_id)
            && known != member_id
        {
            return code::FENCED_INSTANCE_ID;
        }
        let Some(member) = group.members.get_mut(member_id) else {
            return code::UNKNOWN_MEMBER_ID;
        };
        member.last_heartbeat = Instant::now();
        if generation != group.generation {
            return code::ILLEGAL_GENERATION;
        }
        match group.state {
            GroupState::Empty => code::UNKNOWN_MEMBER_ID,
            GroupState::PreparingRebalance => code::REBALANCE_IN_PROGRESS,
            GroupState::CompletingRebalance | GroupState::Stable => code::NONE,
        }
    }

    /// Removes members (LeaveGroup); returns one error code per member.
    pub async fn leave(
        &self,
        group_id: &str,
        members: Vec<(String, Option<String>)>,
    ) -> Result<Vec<i16>, i16> {
        let record = {
            let mut groups = self.groups.borrow_mut();
            let Some(group) = groups.get_mut(group_id) else {
                return Err(code::UNKNOWN_MEMBER_ID);
            };
            let now = Instant::now();
            let mut results = Vec::with_capacity(members.len());
            let mut removed_any = false;
            for (member_id, instance_id) in members {
                // A static member may leave by instance id alone.
                let resolved = match (&instance_id, member_id.is_empty()) {
                    (Some(instance_id), true) => group.static_members.get(instance_id).cloned(),
                    _ => Some(member_id.clone()),
                };
                let error = match resolved {
                    Some(id) if group.members.contains_key(&id) => {
                        if let Some(instance_id) = &instance_id
                            && group
                                .static_members
                                .get(instance_id)
                                .is_some_and(|known| *known != id)
                        {
                            code::FENCED_INSTANCE_ID
                        } else {
                            self.remove_member(group, &id, "left the group");
                            removed_any = true;
                            code::NONE
                        }
                    }
                    Some(id) if group.pending_members.remove(&id).is_some() => code::NONE,
                    _ => code::UNKNOWN_MEMBER_ID,
                };
                results.push(error);
            }
            let mut record = None;
            if removed_any {
                if group.members.is_empty() && group.state != GroupState::PreparingRebalance {
                    group.generation += 1;
                    group.leader = None;
                    group.protocol_name = None;
                    group.set_state(GroupState::Empty);
                    record = Some(group.metadata_record());
                } else if group.state != GroupState::Empty {
                    self.prepare_rebalance(group, now, false);
                    self.maybe_complete_join(group, now);
                }
            }
            (results, record)
        };
        if let Some(record) = record.1
            && let Err(e) = self.store.append(&[record]).await
        {
            warn!(group = %group_id, error = %e, "persisting group metadata failed");
        }
        Ok(record.0)
    }

    /// Commits offsets; returns one error code per (topic, partition), in order.
    pub async fn commit(
        &self,
        group_id: &str,
        generation: i32,
        member_id: &str,
        instance_id: Option<&str>,
        offsets: Vec<(String, i32, i64, i32, Option<String>)>,
    ) -> Result<Vec<i16>, i16> {
        if group_id.is_empty() {
            return Err(code::INVALID_GROUP_ID);
        }
        let now_ms = super::now_ms();
        let (records, results) = {
            let mut groups = self.groups.borrow_mut();
            let group = groups
                .entry(group_id.to_string())
                .or_insert_with(|| Group::new(group_id));
            if generation < 0 {
                // Commits from outside any generation (manual assignment, admin tools) are allowed
                // only while the group has no members, as in Kafka.
                if !group.members.is_empty() {
                    return Err(code::ILLEGAL_GENERATION);
                }
            } else {
                Self::check_member(group, member_id, instance_id, generation)?;
                if group.state == GroupState::CompletingRebalance {
                    return Err(code::REBALANCE_IN_PROGRESS);
                }
                if let Some(member) = group.members.get_mut(member_id) {
                    member.last_heartbeat = Instant::now();
                }
            }
            let mut records = Vec::new();
            let mut results = Vec::with_capacity(offsets.len());
            for (topic, partition, offset, leader_epoch, metadata) in offsets {
                let metadata = metadata.unwrap_or_default();
                if metadata.len() > self.settings.offset_metadata_max_bytes {
                    results.push(code::OFFSET_METADATA_TOO_LARGE);
                    continue;
                }
                let committed = CommittedOffset {
                    offset,
                    leader_epoch,
                    metadata: metadata.clone(),
                    commit_timestamp_ms: now_ms,
                };
                group.offsets.insert((topic.clone(), partition), committed);
                records.push(GroupRecord::Offset {
                    group: group_id.to_string(),
                    topic,
                    partition,
                    value: Some(OffsetValue {
                        offset,
                        leader_epoch,
                        metadata,
                        commit_timestamp_ms: now_ms,
                    }),
                });
                results.push(code::NONE);
            }
            (records, results)
        };
        match self.store.append(&records).await {
            Ok(()) => Ok(results),
            Err(e) => {
                warn!(group = %group_id, error = %e, "persisting offsets failed");
                Ok(results
                    .into_iter()
                    .map(|_| code::KAFKA_STORAGE_ERROR)
                    .collect())
            }
        }
    }

    /// Committed offsets of a group: for the given partitions, or all of them (`None`).
    /// A partition with no commit gets offset -1, as Kafka answers.
    pub fn fetch_offsets(
        &self,
        group_id: &str,
        partitions: Option<Vec<(String, Vec<i32>)>>,
    ) -> Vec<(String, Vec<CommittedEntry>)> {
        let groups = self.groups.borrow();
        let group = groups.get(group_id);
        match partitions {
            Some(requested) => requested
                .into_iter()
                .map(|(topic, partitions)| {
                    let entries = partitions
                        .into_iter()
                        .map(
                            |p| match group.and_then(|g| g.offsets.get(&(topic.clone(), p))) {
                                Some(c) => (p, c.offset, c.leader_epoch, c.metadata.clone()),
                                None => (p, -1, -1, String::new()),
                            },
                        )
                        .collect();
                    (topic, entries)
                })
                .collect(),
            None => {
                let mut by_topic: BTreeMap<String, Vec<(i32, i64, i32, String)>> = BTreeMap::new();
                if let Some(group) = group {
                    for ((topic, partition), c) in &group.offsets {
                        by_topic.entry(topic.clone()).or_default().push((
                            *partition,
                            c.offset,
                            c.leader_epoch,
                            c.metadata.clone(),
                        ));
                    }
                }
                by_topic.into_iter().collect()
            }
        }
    }

    /// (group id, protocol type, state) of every group on this shard.
    pub fn list(&self) -> Vec<(String, String, &'static str)> {
        self.groups
            .borrow()
            .values()
            .map(|g| {
                (
                    g.id.clone(),
                    g.protocol_type.clone().unwrap_or_default(),
                    g.state.name(),
                )
            })
            .collect()
    }

    /// DescribeGroups for one group: (state, protocol type, protocol, members). An unknown group is
    /// "Dead" with no error, as Kafka answers.
    #[allow(clippy::type_complexity)]
    pub fn describe(
        &self,
        group_id: &str,
    ) -> (
        String,
        String,
        String,
        Vec<(String, Option<String>, String, String, Bytes, Bytes)>,
    ) {
        let groups = self.groups.borrow();
        let Some(group) = groups.get(group_id) else {
            return ("Dead".into(), String::new(), String::new(), Vec::new());
        };
        let protocol = group.protocol_name.clone().unwrap_or_default();
        let show_details = group.state == GroupState::Stable;
        let members = group
            .members
            .values()
            .map(|m| {
                (
                    m.id.clone(),
                    m.instance_id.clone(),
                    m.client_id.clone(),
                    m.client_host.clone(),
                    if show_details {
                        m.metadata_for(&protocol)
                    } else {
                        Bytes::new()
                    },
                    if show_details {
                        m.assignment.clone()
                    } else {
                        Bytes::new()
                    },
                )
            })
            .collect();
        (
            group.state.name().to_string(),
            group.protocol_type.clone().unwrap_or_default(),
            protocol,
            members,
        )
    }

    /// DeleteGroups: only empty groups; their offsets and metadata are tombstoned.
    pub async fn delete(&self, group_id: &str) -> i16 {
        let records = {
            let mut groups = self.groups.borrow_mut();
            let Some(group) = groups.get(group_id) else {
                return code::GROUP_ID_NOT_FOUND;
            };
            if !group.is_empty() || group.state != GroupState::Empty {
                return code::NON_EMPTY_GROUP;
            }
            let group = groups.remove(group_id).expect("checked above");
            tombstones(&group)
        };
        match self.store.append(&records).await {
            Ok(()) => {
                info!(group = %group_id, "group deleted");
                code::NONE
            }
            Err(_) => code::KAFKA_STORAGE_ERROR,
        }
    }

    /// OffsetDelete: removes committed offsets of partitions the group is not subscribed to.
    pub async fn delete_offsets(
        &self,
        group_id: &str,
        partitions: Vec<(String, i32)>,
    ) -> Result<Vec<i16>, i16> {
        let (records, results) = {
            let mut groups = self.groups.borrow_mut();
            let Some(group) = groups.get_mut(group_id) else {
                return Err(code::GROUP_ID_NOT_FOUND);
            };
            let subscribed = group.subscribed_topics();
            let mut records = Vec::new();
            let mut results = Vec::with_capacity(partitions.len());
            for (topic, partition) in partitions {
                if subscribed.contains(&topic) {
                    results.push(code::GROUP_SUBSCRIBED_TO_TOPIC);
                    continue;
                }
                if group.offsets.remove(&(topic.clone(), partition)).is_some() {
                    records.push(GroupRecord::Offset {
                        group: group_id.to_string(),
                        topic,
                        partition,
                        value: None,
                    });
                }
                results.push(code::NONE);
            }
            (records, results)
        };
        match self.store.append(&records).await {
            Ok(()) => Ok(results),
            Err(_) => Err(code::KAFKA_STORAGE_ERROR),
        }
    }

    /// Drops every group's committed offsets for a deleted topic.
    pub async fn forget_topic(&self, topic: &str) {
        let records: Vec<GroupRecord> = {
            let mut groups = self.groups.borrow_mut();
            let mut records = Vec::new();
            for group in groups.values_mut() {
                let gone: Vec<(String, i32)> = group
                    .offsets
                    .keys()
                    .filter(|(t, _)| t == topic)
                    .cloned()
                    .collect();
                for key in gone {
                    group.offsets.remove(&key);
                    records.push(GroupRecord::Offset {
                        group: group.id.clone(),
                        topic: key.0,
                        partition: key.1,
                        value: None,
                    });
                }
            }
            records
        };
        if let Err(e) = self.store.append(&records).await {
            warn!(topic, error = %e, "persisting offset deletions failed");
        }
    }

    /// Periodic work: expire silent members, end join and sync phases whose time is up, expire the
    /// offsets of groups that stayed empty past the retention, compact the offsets log.
    pub async fn tick(&self) {
        let now = Instant::now();
        let mut records = Vec::new();
        {
            let mut groups = self.groups.borrow_mut();
            let now_ms = super::now_ms();
            let retention_ms = self.settings.offsets_retention_ms as i64;
            let mut expired_groups = Vec::new();
            for group in groups.values_mut() {
                let silent: Vec<String> = group
                    .members
                    .values()
                    .filter(|m| {
                        m.join_waiter.is_none()
                            && m.sync_waiter.is_none()
                            && now.duration_since(m.last_heartbeat) > m.session_timeout
                    })
                    .map(|m| m.id.clone())
                    .collect();
                let before = group.members.len();
                for id in &silent {
                    self.remove_member(group, id, "session timed out");
                }
                // Pending member ids that never came back expire like sessions.
                let session_max =
                    Duration::from_millis(self.settings.max_session_timeout_ms as u64);
                group
                    .pending_members
                    .retain(|_, since| now.duration_since(*since) < session_max);
                if group.state == GroupState::CompletingRebalance
                    && group.sync_deadline.is_some_and(|d| now >= d)
                {
                    // The leader never sent its assignment: start over without the members that
                    // did not sync.
                    let unsynced: Vec<String> = group
                        .members
                        .values()
                        .filter(|m| m.sync_waiter.is_none())
                        .map(|m| m.id.clone())
                        .collect();
                    for id in &unsynced {
                        self.remove_member(group, id, "did not sync in time");
                    }
                    self.prepare_rebalance(group, now, false);
                } else if group.members.len() < before
                    && group.state != GroupState::PreparingRebalance
                {
                    if group.members.is_empty() && group.state != GroupState::Empty {
                        group.generation += 1;
                        group.leader = None;
                        group.protocol_name = None;
                        group.set_state(GroupState::Empty);
                        records.push(group.metadata_record());
                    } else if !group.members.is_empty() {
                        self.prepare_rebalance(group, now, false);
                    }
                }
                self.maybe_complete_join(group, now);
                if group.state == GroupState::Empty
                    && group.is_empty()
                    && group
                        .empty_since_ms
                        .is_some_and(|since| now_ms - since > retention_ms)
                {
                    expired_groups.push(group.id.clone());
                }
            }
            for id in expired_groups {
                if let Some(group) = groups.remove(&id) {
                    info!(group = %id, offsets = group.offsets.len(), "offsets expired (offsets.retention.minutes)");
                    records.extend(tombstones(&group));
                }
            }
        }
        if !records.is_empty()
            && let Err(e) = self.store.append(&records).await
        {
            warn!(error = %e, "persisting group changes failed");
        }
        if self
            .store
            .wants_compaction(self.settings.compaction_min_bytes)
        {
            let live = self.live_records();
            if let Err(e) = self.store.compact(&live).await {
                warn!(error = %e, "offsets log compaction failed");
            }
        }
    }

    /// The records that rebuild the current state: one per committed offset, one per group.
    fn live_records(&self) -> Vec<GroupRecord> {
        let groups = self.groups.borrow();
        let mut records = Vec::new();
        for group in groups.values() {
            records.push(group.metadata_record());
            for ((topic, partition), c) in &group.offsets {
                records.push(GroupRecord::Offset {
                    group: group.id.clone(),
                    topic: topic.clone(),
                    partition: *partition,
                    value: Some(OffsetValue {
                        offset: c.offset,
                        leader_epoch: c.leader_epoch,
                        metadata: c.metadata.clone(),
                        commit_timestamp_ms: c.commit_timestamp_ms,
                    }),
                });
            }
        }
        records
    }

    pub async fn flush(&self) -> std::io::Result<()> {
        self.store.flush().await
    }
}

fn tombstones(group: &Group) -> Vec<GroupRecord> {
    let mut records: Vec<GroupRecord> = group
        .offsets
        .keys()
        .map(|(topic, partition)| GroupRecord::Offset {
            group: group.id.clone(),
            topic: topic.clone(),
            partition: *partition,
            value: None,
        })
        .collect();
    records.push(GroupRecord::Group {
        group: group.id.clone(),
        value: None,
    });
    records
}

/// Replays one record of the offsets log into the in-memory state. Members are restored as they
/// were persisted (with fresh session timers), so a quick broker restart does not force every group
/// to rebalance: members that are really gone expire after their session timeout.
fn apply_record(groups: &mut HashMap<String, Group>, record: GroupRecord) {
    match record {
        GroupRecord::Offset {
            group,
            topic,
            partition,
            value,
        } => {
            let entry = groups
                .entry(group.clone())
                .or_insert_with(|| Group::new(&group));
            match value {
                Some(v) => {
                    entry.offsets.insert(
                        (topic, partition),
                        CommittedOffset {
                            offset: v.offset,
                            leader_epoch: v.leader_epoch,
                            metadata: v.metadata,
                            commit_timestamp_ms: v.commit_timestamp_ms,
                        },
                    );
                }
                None => {
                    entry.offsets.remove(&(topic, partition));
                }
            }
        }
        GroupRecord::Group { group, value: None } => {
            groups.remove(&group);
        }
        GroupRecord::Group {
            group,
            value: Some(value),
        } => {
            let entry = groups
                .entry(group.clone())
                .or_insert_with(|| Group::new(&group));
            entry.generation = value.generation;
            entry.protocol_type = (!value.protocol_type.is_empty()).then_some(value.protocol_type);
            entry.protocol_name = value.protocol;
            entry.leader = value.leader;
            entry.members.clear();
            entry.static_members.clear();
            let now = Instant::now();
            for m in value.members {
                let protocols = entry
                    .protocol_name
                    .clone()
                    .map(|p| vec![(p, m.subscription.clone())])
                    .unwrap_or_default();
                if let Some(instance_id) = &m.group_instance_id {
                    entry
                        .static_members
                        .insert(instance_id.clone(), m.member_id.clone());
                }
                entry.members.insert(
                    m.member_id.clone(),
                    Member {
                        id: m.member_id,
                        instance_id: m.group_instance_id,
                        client_id: m.client_id,
                        client_host: m.client_host,
                        session_timeout: Duration::from_millis(m.session_timeout_ms.max(0) as u64),
                        rebalance_timeout: Duration::from_millis(
                            m.rebalance_timeout_ms.max(0) as u64
                        ),
                        protocol_type: entry.protocol_type.clone().unwrap_or_default(),
                        protocols,
                        assignment: m.assignment,
                        last_heartbeat: now,
                        join_waiter: None,
                        sync_waiter: None,
                    },
                );
            }
            let state = if entry.members.is_empty() {
                GroupState::Empty
            } else {
                GroupState::Stable
            };
            entry.set_state(state);
            entry.state_timestamp_ms = value.current_state_timestamp_ms;
        }
    }
}
