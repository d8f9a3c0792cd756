//! The Kafka request handlers: one `ShardBroker` per shard owns that shard's partition logs and its copy
//! of the topic table, and answers every request that reaches the shard's listener.
//!
//! Ownership rules (the invariants the rest of the code relies on):
//! - a partition's log is opened, written, read and closed only by its owning shard
//!   (`topics::partition_owner`); a request for a partition owned elsewhere gets NOT_LEADER_OR_FOLLOWER;
//! - shard 0 is the controller: it alone creates and deletes topics, and publishes each new topic
//!   table to every shard through the mailboxes (`ShardContext::run_on`);
//! - Kafka error codes are produced here (see `errors`), never inside storage.

mod admin;
mod compaction;
mod delete_records;
mod disk_errors;
mod errors;
mod fetch;
mod group_api;
pub mod groups;
mod lifecycle;
mod metadata;
mod produce;
pub mod producer_ids;
pub mod topics;

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::path::PathBuf;
use std::rc::Rc;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use bytes::Bytes;
use kafka_protocol::messages::{ApiKey, RequestKind, ResponseKind};
use tracing::{error, info, warn};

use crate::config::Config;
use crate::protocol::{self, DecodeError};
use crate::server::{Admission, ConnectionInfo, Handler, HandlerFactory, OutPart, Reply};
use crate::shard::ShardContext;
use crate::storage::{Disk, PartitionLog};

use errors::code;
use groups::{GroupCoordinator, GroupSettings};
use topics::{TopicInfo, TopicStore, TopicsSnapshot, partition_owner};

thread_local! {
    /// This thread's broker, so that work sent from another shard (`run_on`) can reach it.
    static CURRENT: RefCell<Option<Rc<ShardBroker>>> = const { RefCell::new(None) };
}

/// The broker of the calling shard thread. Work reaches a shard only after its broker is installed
/// (the factory installs it before the listener starts), so a miss is a bug.
fn current() -> Rc<ShardBroker> {
    CURRENT
        .with(|cell| cell.borrow().clone())
        .expect("no broker installed on this shard thread")
}

/// Builds each shard's broker on that shard's thread. State shared by all shards at startup (the
/// cluster id and the topic table read from disk) is loaded once, by whichever shard comes first.
pub struct BrokerFactory {
    startup: OnceLock<Result<Startup, String>>,
    disk: Option<DiskForShard>,
}

/// Builds the storage seam a shard's partition logs use, on that shard's thread (tests pass a disk
/// with a fault injector).
pub type DiskForShard = Arc<dyn Fn(usize) -> Disk + Send + Sync>;

#[derive(Clone)]
struct Startup {
    cluster_id: String,
    topics: Arc<TopicsSnapshot>,
}

impl BrokerFactory {
    pub fn new() -> BrokerFactory {
        BrokerFactory {
            startup: OnceLock::new(),
            disk: None,
        }
    }

    /// A factory whose partition logs do their file IO through `disk(shard)` (fault injection).
    pub fn with_disk(disk: DiskForShard) -> BrokerFactory {
        BrokerFactory {
            startup: OnceLock::new(),
            disk: Some(disk),
        }
    }
}

impl Default for BrokerFactory {
    fn default() -> Self {
        Self::new()
    }
}

impl HandlerFactory for BrokerFactory {
    type Handler = BrokerHandler;

    async fn create(&self, ctx: ShardContext) -> anyhow::Result<BrokerHandler> {
        let config = ctx.config().clone();
        // Segment descriptors are opened on demand through this shard's bounded cache.
        let descriptor_cache_size = match config.descriptor_cache_size {
            0 => crate::storage::descriptors::default_capacity(
                crate::storage::descriptors::nofile_limit(),
                config.shard_count,
            ),
            size => size,
        };
        crate::storage::descriptors::set_capacity(descriptor_cache_size);
        let startup = self
            .startup
            .get_or_init(|| load_startup(&config).map_err(|e| format!("{e:#}")))
            .clone()
            .map_err(anyhow::Error::msg)?;
        let offsets_dir = config
            .log_dir
            .join(format!("__consumer_offsets-{}", ctx.shard_id()));
        let groups = GroupCoordinator::open(&offsets_dir, group_settings(&config))
            .await
            .map_err(|e| anyhow::anyhow!("loading offsets log {}: {e}", offsets_dir.display()))?;
        // The producer-id allocator lives on the controller only; other shards forward to it.
        let producer_ids = if ctx.shard_id() == 0 {
            Some(producer_ids::ProducerIdManager::open(&config.log_dir)?)
        } else {
            None
        };
        let ctx_shard = ctx.shard_id();
        let broker = Rc::new(ShardBroker {
            shard: ctx.shard_id(),
            shard_count: ctx.shard_count(),
            ctx,
            log_dir: config.log_dir.clone(),
            config,
            cluster_id: startup.cluster_id,
            topics: RefCell::new(startup.topics.clone()),
            logs: RefCell::new(HashMap::new()),
            creating: RefCell::new(HashMap::new()),
            stopping: Cell::new(false),
            groups,
            producer_ids,
            disk: self
                .disk
                .as_ref()
                .map_or_else(Disk::real, |disk| disk(ctx_shard)),
        });
        for topic in startup.topics.by_name.values() {
            broker.open_owned_partitions(topic).await?;
        }
        CURRENT.with(|cell| *cell.borrow_mut() = Some(broker.clone()));
        broker.clone().start_housekeeping();
        broker.clone().start_cleaner();
        Ok(BrokerHandler { broker })
    }
}

/// Reads (or on first start writes) `meta.properties` with the cluster id, and the topic table.
fn load_startup(config: &Config) -> anyhow::Result<Startup> {
    use anyhow::Context;
    std::fs::create_dir_all(&config.log_dir)
        .with_context(|| format!("creating log dir {}", config.log_dir.display()))?;
    let meta_path = config.log_dir.join("meta.properties");
    let cluster_id = match std::fs::read_to_string(&meta_path) {
        Ok(text) => text
            .lines()
            .find_map(|line| line.strip_prefix("cluster.id="))
            .map(|id| id.trim().to_string())
            .with_context(|| format!("{} has no cluster.id", meta_path.display()))?,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let id = uuid::Uuid::new_v4().simple().to_string();
            let text = format!("version=1\ncluster.id={id}\nnode.id={}\n", config.broker_id);
            let temp = config.log_dir.join("meta.properties.tmp");
            std::fs::write(&temp, text)?;
            std::fs::File::open(&temp)?.sync_all()?;
            std::fs::rename(&temp, &meta_path)?;
            id
        }
        Err(e) => return Err(e).with_context(|| format!("reading {}", meta_path.display())),
    };
    let store = TopicStore::new(&config.log_dir);
    // A creation a crash interrupted is finished or undone before anything is opened, so a
    // half-created topic is never served and never blocks startup.
    for name in store
        .finish_interrupted_creations(&config.log_dir)
        .context("finishing interrupted topic creations")?
    {
        warn!(topic = %name, "removed a topic whose creation a crash interrupted");
    }
    let topics = store.load().context("loading topic definitions")?;
    info!(topics = topics.by_name.len(), %cluster_id, "loaded topic table");
    Ok(Startup {
        cluster_id,
        topics: Arc::new(topics),
    })
}

/// The `Handler` the server calls; a thin shell around the shard's broker.
pub struct BrokerHandler {
    broker: Rc<ShardBroker>,
}

impl Handler for BrokerHandler {
    async fn admit(&self, conn: &ConnectionInfo, request: Bytes) -> Admission {
        self.broker.admit(conn, request).await
    }

    async fn shutdown(&self) {
        self.broker.shutdown().await
    }
}

/// Why a topic operation failed: a Kafka error code and a message for the client.
#[derive(Debug, Clone)]
pub struct TopicError {
    pub code: i16,
    pub message: String,
}

impl TopicError {
    fn new(code: i16, message: impl Into<String>) -> TopicError {
        TopicError {
            code,
            message: message.into(),
        }
    }
}

pub struct ShardBroker {
    shard: usize,
    shard_count: usize,
    ctx: ShardContext,
    config: Arc<Config>,
    log_dir: PathBuf,
    cluster_id: String,
    topics: RefCell<Arc<TopicsSnapshot>>,
    /// The partitions this shard owns, by (topic, partition).
    logs: RefCell<HashMap<(String, i32), Rc<PartitionLog>>>,
    /// Topics the controller is creating right now, with their partition counts (they count against
    /// the partition budget); used only on shard 0.
    creating: RefCell<HashMap<String, i32>>,
    stopping: Cell<bool>,
    /// The consumer groups this shard coordinates.
    groups: GroupCoordinator,
    /// The producer-id allocator; `Some` on shard 0 only.
    producer_ids: Option<producer_ids::ProducerIdManager>,
    /// The file-IO seam of this shard's partition logs.
    disk: Disk,
}

impl ShardBroker {
    pub fn topics(&self) -> Arc<TopicsSnapshot> {
        self.topics.borrow().clone()
    }

    fn owner_of(&self, topic: &str, partition: i32) -> usize {
        partition_owner(topic, partition, self.shard_count)
    }

    /// A snapshot of this shard's logs, so that a loop over them can await without holding the
    /// map's borrow (a topic may be created or deleted meanwhile).
    fn owned_logs(&self) -> Vec<((String, i32), Rc<PartitionLog>)> {
        self.logs
            .borrow()
            .iter()
            .map(|(key, log)| (key.clone(), log.clone()))
            .collect()
    }

    fn log(&self, topic: &str, partition: i32) -> Option<Rc<PartitionLog>> {
        self.logs
            .borrow()
            .get(&(topic.to_string(), partition))
            .cloned()
    }

    /// Installs a topic table if it is newer than the one this shard has.
    fn install_topics(&self, snapshot: Arc<TopicsSnapshot>) {
        let mut current = self.topics.borrow_mut();
        if snapshot.epoch > current.epoch {
            *current = snapshot;
        }
    }

    /// Admits one request of a connection (the server awaits this before admitting the next
    /// one). Produce does its appends here, so that two produce requests of one connection reach a
    /// partition's log in request order, and leaves only the wait for their fdatasync (acks=all) to
    /// run beside later requests, which lets one group commit cover several requests of the
    /// connection. A fetch is admitted at once and long-polls beside later requests. Every other
    /// request is handled entirely here, one after another, as Kafka handles a connection's
    /// requests (their effects, such as offset commits or group membership, then never overlap).
    async fn admit(self: &Rc<Self>, conn: &ConnectionInfo, frame: Bytes) -> Admission {
        let request = match protocol::decode_request(frame) {
            Ok(request) => request,
            Err(error) => return Admission::Done(self.reject(conn, error)),
        };
        let protocol::Request { header, body } = request;
        let (version, correlation_id) = (header.api_version, header.correlation_id);
        match body {
            RequestKind::Produce(req) => match self.produce(req, version).await {
                produce::ProduceAdmitted::Done(outcome) => {
                    Admission::Done(self.produce_reply(conn, outcome, correlation_id, version))
                }
                produce::ProduceAdmitted::Durable(pending) => {
                    let broker = self.clone();
                    let conn = *conn;
                    Admission::Later(Box::pin(async move {
                        let outcome = pending.finish().await;
                        broker.produce_reply(&conn, outcome, correlation_id, version)
                    }))
                }
            },
            RequestKind::Fetch(req) => {
                let broker = self.clone();
                Admission::Later(Box::pin(async move {
                    broker.fetch(req, version, correlation_id).await
                }))
            }
            body => Admission::Done(self.handle(conn, &header, body).await),
        }
    }

    fn produce_reply(
        &self,
        conn: &ConnectionInfo,
        outcome: produce::ProduceOutcome,
        correlation_id: i32,
        version: i16,
    ) -> Reply {
        match outcome {
            produce::ProduceOutcome::Respond(response) => self.encode(
                conn,
                correlation_id,
                ApiKey::Produce,
                version,
                &ResponseKind::Produce(response),
            ),
            produce::ProduceOutcome::Silent => Reply::None,
            produce::ProduceOutcome::Close => Reply::Close,
        }
    }

    fn encode(
        &self,
        conn: &ConnectionInfo,
        correlation_id: i32,
        api_key: ApiKey,
        version: i16,
        body: &ResponseKind,
    ) -> Reply {
        match protocol::encode_response(correlation_id, api_key, version, body) {
            Ok(frame) => Reply::Send(vec![OutPart::Bytes(frame)]),
            Err(error) => {
                error!(conn = conn.id, ?api_key, version, %error, "could not encode response");
                Reply::Close
            }
        }
    }

    /// Every request but Produce and Fetch, handled to the end during admission.
    async fn handle(
        &self,
        conn: &ConnectionInfo,
        header: &protocol::RequestHeader,
        body: RequestKind,
    ) -> Reply {
        let (api_key, version, correlation_id) =
            (header.api_key, header.api_version, header.correlation_id);
        let body = match body {
            RequestKind::ApiVersions(_) => {
                ResponseKind::ApiVersions(protocol::api_versions_response(version, 0))
            }
            RequestKind::Metadata(req) => ResponseKind::Metadata(self.metadata(req, version).await),
            RequestKind::ListOffsets(req) => {
                ResponseKind::ListOffsets(self.list_offsets(req, version).await)
            }
            RequestKind::CreateTopics(req) => {
                ResponseKind::CreateTopics(self.create_topics(req, version).await)
            }
            RequestKind::DeleteTopics(req) => {
                ResponseKind::DeleteTopics(self.delete_topics(req, version).await)
            }
            RequestKind::DeleteRecords(req) => {
                ResponseKind::DeleteRecords(self.delete_records(req).await)
            }
            RequestKind::DescribeConfigs(req) => {
                ResponseKind::DescribeConfigs(self.describe_configs(req, version))
            }
            RequestKind::FindCoordinator(req) => {
                ResponseKind::FindCoordinator(self.find_coordinator(req, version))
            }
            RequestKind::JoinGroup(req) => {
                let client_id = header.client_id.as_deref().unwrap_or("").to_string();
                ResponseKind::JoinGroup(self.join_group(conn, &client_id, req, version).await)
            }
            RequestKind::SyncGroup(req) => ResponseKind::SyncGroup(self.sync_group(req).await),
            RequestKind::Heartbeat(req) => ResponseKind::Heartbeat(self.heartbeat(req)),
            RequestKind::LeaveGroup(req) => {
                ResponseKind::LeaveGroup(self.leave_group(req, version).await)
            }
            RequestKind::OffsetCommit(req) => {
                ResponseKind::OffsetCommit(self.offset_commit(req).await)
            }
            RequestKind::OffsetFetch(req) => {
                ResponseKind::OffsetFetch(self.offset_fetch(req, version))
            }
            RequestKind::DescribeGroups(req) => {
                ResponseKind::DescribeGroups(self.describe_groups(req))
            }
            RequestKind::ListGroups(req) => ResponseKind::ListGroups(self.list_groups(req)),
            RequestKind::DeleteGroups(req) => {
                ResponseKind::DeleteGroups(self.delete_groups(req).await)
            }
            RequestKind::OffsetDelete(req) => {
                ResponseKind::OffsetDelete(self.offset_delete(req).await)
            }
            RequestKind::InitProducerId(req) => {
                ResponseKind::InitProducerId(self.init_producer_id(req, version).await)
            }
            other => {
                // decode_request admits only the APIs in the advertised table, so reaching this arm
                // means the table and this match disagree: answer rather than crash the shard.
                error!(
                    ?api_key,
                    "request kind {:?} has no handler",
                    std::mem::discriminant(&other)
                );
                return Reply::Close;
            }
        };
        self.encode(conn, correlation_id, api_key, version, &body)
    }

    /// Answers a request that could not be decoded the way Kafka does: an unsupported ApiVersions
    /// version gets the v0 fallback, other unsupported versions or malformed bodies get an error
    /// response when one can be built, and anything else closes the connection.
    fn reject(&self, conn: &ConnectionInfo, error: DecodeError) -> Reply {
        // Within the shard's budget for lines about single connections: a client repeating a bad
        // request must not flood the log.
        if crate::server::problems::permit(Some(conn.id)) {
            warn!(conn = conn.id, peer = %conn.peer, %error, "bad request");
        }
        match error.reply() {
            Some(frame) => Reply::Send(vec![OutPart::Bytes(frame)]),
            None => Reply::Close,
        }
    }

    /// Creates a topic, wherever the request arrived: the work runs on the controller (shard 0).
    pub async fn create_topic(
        &self,
        topic: TopicInfo,
        validate_only: bool,
    ) -> Result<TopicInfo, TopicError> {
        if self.shard == 0 {
            return self.controller_create_topic(topic, validate_only).await;
        }
        self.ctx
            .run_on(0, move || async move {
                current()
                    .controller_create_topic(topic, validate_only)
                    .await
            })
            .await
            .unwrap_or_else(|e| {
                Err(TopicError::new(
                    code::UNKNOWN_SERVER_ERROR,
                    format!("controller unreachable: {e}"),
                ))
            })
    }

    async fn controller_create_topic(
        &self,
        topic: TopicInfo,
        validate_only: bool,
    ) -> Result<TopicInfo, TopicError> {
        debug_assert_eq!(self.shard, 0, "only the controller creates topics");
        if self.topics().get(&topic.name).is_some()
            || self.creating.borrow().contains_key(&topic.name)
        {
            return Err(TopicError::new(
                code::TOPIC_ALREADY_EXISTS,
                format!("Topic '{}' already exists.", topic.name),
            ));
        }
        self.check_partition_budget(&topic)?;
        if validate_only {
            return Ok(topic);
        }
        self.creating
            .borrow_mut()
            .insert(topic.name.clone(), topic.partitions);
        let result = self.controller_create_topic_inner(&topic).await;
        self.creating.borrow_mut().remove(&topic.name);
        result.map(|()| topic)
    }

    /// Deletes a topic, wherever the request arrived: the work runs on the controller (shard 0).
    pub async fn delete_topic(&self, name: String) -> Result<TopicInfo, TopicError> {
        if self.shard == 0 {
            return self.controller_delete_topic(name).await;
        }
        self.ctx
            .run_on(0, move || async move {
                current().controller_delete_topic(name).await
            })
            .await
            .unwrap_or_else(|e| {
                Err(TopicError::new(
                    code::UNKNOWN_SERVER_ERROR,
                    format!("controller unreachable: {e}"),
                ))
            })
    }

    async fn controller_delete_topic(&self, name: String) -> Result<TopicInfo, TopicError> {
        let Some(topic) = self.topics().get(&name).cloned() else {
            return Err(TopicError::new(
                code::UNKNOWN_TOPIC_OR_PARTITION,
                format!("Topic '{name}' does not exist."),
            ));
        };
        // Hide the topic first, so no new request starts on it, then drop its definition and data.
        let snapshot = Arc::new(self.topics().without_topic(&name));
        self.publish_topics(snapshot).await;
        TopicStore::new(&self.log_dir).remove(&name).map_err(|e| {
            TopicError::new(
                code::KAFKA_STORAGE_ERROR,
                format!("removing topic definition: {e}"),
            )
        })?;
        for shard in 0..self.shard_count {
            let topic_name = name.clone();
            let partitions = topic.partitions;
            let _ = self
                .ctx
                .run_on(shard, move || async move {
                    current().drop_partitions(&topic_name, partitions).await
                })
                .await;
        }
        info!(topic = %name, "topic deleted");
        Ok((*topic).clone())
    }

    /// Closes and removes this shard's logs of a deleted topic. A fetch still sending from one of its
    /// segments keeps that file open until the send ends; the directory is gone already.
    async fn drop_partitions(&self, topic: &str, partitions: i32) {
        // Committed offsets of a deleted topic go with it, on every coordinator.
        self.groups.forget_topic(topic).await;
        for partition in 0..partitions {
            let Some(log) = self
                .logs
                .borrow_mut()
                .remove(&(topic.to_string(), partition))
            else {
                continue;
            };
            if let Err(e) = log.delete().await {
                error!(topic, partition, error = %e, "deleting partition data failed");
            }
        }
    }

    async fn publish_topics(&self, snapshot: Arc<TopicsSnapshot>) {
        for shard in 0..self.shard_count {
            let snapshot = snapshot.clone();
            if let Err(e) = self
                .ctx
                .run_on(
                    shard,
                    move || async move { current().install_topics(snapshot) },
                )
                .await
            {
                error!(shard, error = %e, "could not publish the topic table");
            }
        }
    }

    /// Periodic work on this shard's logs: time-based flush and roll, and retention.
    fn start_housekeeping(self: Rc<Self>) {
        let tick_broker = self.clone();
        compio::runtime::spawn(async move {
            loop {
                compio::time::sleep(Duration::from_millis(100)).await;
                if tick_broker.stopping.get() {
                    break;
                }
                let now = now_ms();
                for ((topic, partition), log) in tick_broker.owned_logs() {
                    if let Err(e) = log.tick(now).await {
                        error!(%topic, partition, error = %e, "flush/roll failed");
                    }
                }
            }
        })
        .detach();
        let group_broker = self.clone();
        compio::runtime::spawn(async move {
            let mut last_flush = std::time::Instant::now();
            loop {
                compio::time::sleep(Duration::from_millis(50)).await;
                if group_broker.stopping.get() {
                    break;
                }
                group_broker.groups.tick().await;
                // The offsets log is written before each answer; this makes it durable against a
                // machine crash too, once a second.
                if last_flush.elapsed() >= Duration::from_secs(1) {
                    last_flush = std::time::Instant::now();
                    if let Err(e) = group_broker.groups.flush().await {
                        error!(error = %e, "flushing the offsets log failed");
                    }
                }
            }
        })
        .detach();
        let expiry_broker = self.clone();
        compio::runtime::spawn(async move {
            let expiration_ms = expiry_broker.config.producer_id_expiration_ms;
            let interval = Duration::from_millis(
                expiry_broker
                    .config
                    .producer_id_expiration_check_interval_ms
                    .max(1),
            );
            loop {
                compio::time::sleep(interval).await;
                if expiry_broker.stopping.get() {
                    break;
                }
                let now = now_ms();
                for ((topic, partition), log) in expiry_broker.owned_logs() {
                    let expired = log.expire_producers(now);
                    if expired > 0 {
                        info!(%topic, partition, expired, "expired idle idempotent producers");
                    }
                }
                if let Some(manager) = &expiry_broker.producer_ids {
                    manager.expire(now, expiration_ms);
                }
            }
        })
        .detach();
        if self.config.log_scrub_bytes_per_second > 0 {
            let scrub_broker = self.clone();
            compio::runtime::spawn(async move { scrub_broker.scrub_forever().await }).detach();
        }
        let retention_broker = self;
        compio::runtime::spawn(async move {
            let interval = Duration::from_millis(
                retention_broker
                    .config
                    .log_retention_check_interval_ms
                    .max(1),
            );
            loop {
                compio::time::sleep(interval).await;
                if retention_broker.stopping.get() {
                    break;
                }
                retention_broker.enforce_retention().await;
            }
        })
        .detach();
    }

    /// The scrubber of this shard: verifies the closed segments of its partitions, one partition at a
    /// time, at `ringbroker.log.scrub.bytes.per.second` (a budget every 100 ms, so the IO is spread
    /// out rather than bursty).
    async fn scrub_forever(&self) {
        const STEP: Duration = Duration::from_millis(100);
        let budget_bytes = (self.config.log_scrub_bytes_per_second / 10).max(1);
        let mut cursors: HashMap<(String, i32), crate::storage::scrub::ScrubCursor> =
            HashMap::new();
        let mut turn = 0usize;
        loop {
            compio::time::sleep(STEP).await;
            if self.stopping.get() {
                break;
            }
            let mut logs = self.owned_logs();
            if logs.is_empty() {
                continue;
            }
            logs.sort_by(|left, right| left.0.cmp(&right.0));
            cursors.retain(|key, _| logs.iter().any(|(owned, _)| owned == key));
            let ((topic, partition), log) = &logs[turn % logs.len()];
            let cursor = cursors.entry((topic.clone(), *partition)).or_default();
            match log.scrub_step(cursor, budget_bytes).await {
                Ok(step) if step.pass_finished => turn = turn.wrapping_add(1),
                Ok(_) => {}
                Err(e) => {
                    error!(%topic, partition, error = %e, "scrubbing failed; moving on");
                    cursors.remove(&(topic.clone(), *partition));
                    turn = turn.wrapping_add(1);
                }
            }
        }
    }

    async fn enforce_retention(&self) {
        let now = now_ms();
        for ((topic, partition), log) in self.owned_logs() {
            match log.enforce_retention(now).await {
                Ok(outcome) => {
                    if outcome.deleted_segments > 0 {
                        info!(%topic, partition, segments = outcome.deleted_segments,
                              log_start_offset = log.log_start_offset(), "retention deleted segments");
                    }
                }
                Err(e) => error!(%topic, partition, error = %e, "retention failed"),
            }
        }
    }

    async fn shutdown(&self) {
        self.stopping.set(true);
        if let Err(e) = self.groups.flush().await {
            error!(error = %e, "flushing the offsets log failed");
        }
        let started = std::time::Instant::now();
        let partitions = self.logs.borrow().len();
        let timeout = Duration::from_millis(self.config.shutdown_timeout_ms);
        let unclean = self.close_all_partitions(timeout).await;
        info!(
            shard = self.shard,
            partitions,
            unclean = unclean.len(),
            elapsed_ms = started.elapsed().as_millis() as u64,
            "shard stopped"
        );
        if !unclean.is_empty() {
            // Named up to a readable number; the ERROR lines above name each failed one.
            const NAMED: usize = 20;
            let more = unclean.len().saturating_sub(NAMED);
            crate::shard::report_unclean_shutdown(format!(
                "shard {}: {} partitions not marked clean: {}{}",
                self.shard,
                unclean.len(),
                unclean[..unclean.len().min(NAMED)].join(", "),
                if more > 0 {
                    format!(" and {more} more")
                } else {
                    String::new()
                }
            ));
        }
    }
}

fn group_settings(config: &Config) -> GroupSettings {
    GroupSettings {
        initial_rebalance_delay_ms: config.group_initial_rebalance_delay_ms,
        min_session_timeout_ms: config.group_min_session_timeout_ms.min(i32::MAX as u64) as i32,
        max_session_timeout_ms: config.group_max_session_timeout_ms.min(i32::MAX as u64) as i32,
        offsets_retention_ms: config.offsets_retention_minutes.saturating_mul(60_000),
        offset_metadata_max_bytes: 4096,
        max_group_size: 10_000,
        compaction_min_bytes: 16 * 1024 * 1024,
    }
}

pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// Every request kind the handler answers; `protocol`'s ApiVersions table must list exactly these.
pub const HANDLED_APIS: &[ApiKey] = &[
    ApiKey::ApiVersions,
    ApiKey::Metadata,
    ApiKey::Produce,
    ApiKey::Fetch,
    ApiKey::ListOffsets,
    ApiKey::CreateTopics,
    ApiKey::DeleteTopics,
    ApiKey::DescribeConfigs,
    ApiKey::DeleteRecords,
    ApiKey::FindCoordinator,
    ApiKey::JoinGroup,
    ApiKey::SyncGroup,
    ApiKey::Heartbeat,
    ApiKey::LeaveGroup,
    ApiKey::OffsetCommit,
    ApiKey::OffsetFetch,
    ApiKey::DescribeGroups,
    ApiKey::ListGroups,
    ApiKey::DeleteGroups,
    ApiKey::OffsetDelete,
    ApiKey::InitProducerId,
];
