//! config: the command line and Kafka's `server.properties` format turned into one validated
//! [`Config`]; every limit the broker enforces is read here.
//!
//! Sources are merged the way Kafka merges them: the embedded defaults, then the properties file,
//! then each `--override key=value` in order, and `--shards` last. Only after merging are derived
//! settings resolved (retention: `.ms` wins over `.minutes` over `.hours`, as in Kafka's
//! `KafkaConfig`), so an override of `log.retention.hours` does not beat a `log.retention.ms` from the
//! file. Keys that mean nothing to a single-node broker (ZooKeeper, KRaft controller, thread pools,
//! replication of internal topics, ...) are accepted with one warning each, as Kafka warns on keys it
//! does not know, so that a stock Kafka `server.properties` starts ringbroker unchanged.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};

use clap::Parser;

use crate::storage::WriteMode;
pub use crate::storage::write_mode::KEY_LOG_WRITE_MODE;

/// The properties every key is read from after merging; ordered so warnings come out sorted.
type Properties = BTreeMap<String, String>;

/// Kafka's `Long.MAX_VALUE`, which its defaults use to mean "never" for flush intervals.
const KAFKA_LONG_MAX: i64 = i64::MAX;

/// Why a configuration could not be built. Every variant names what to fix.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}:{line}: {reason}")]
    Syntax {
        path: String,
        line: usize,
        reason: String,
    },
    #[error("invalid value for `{key}`: `{value}` ({reason})")]
    InvalidValue {
        key: String,
        value: String,
        reason: String,
    },
    #[error(
        "unknown ringbroker setting `{key}` (ringbroker's own keys are listed in config/server.properties)"
    )]
    UnknownRingbrokerKey { key: String },
    #[error("invalid --override `{0}`: expected key=value")]
    BadOverride(String),
}

impl ConfigError {
    fn invalid(key: &str, value: &str, reason: impl Into<String>) -> Self {
        ConfigError::InvalidValue {
            key: key.to_string(),
            value: value.to_string(),
            reason: reason.into(),
        }
    }
}

/// The command line: `ringbroker [server.properties] [--config FILE] [--override k=v]... [--shards N]`.
#[derive(Debug, Clone, Default, Parser)]
#[command(
    name = "ringbroker",
    version,
    about = "A single-node, Kafka-wire-compatible message broker, thread-per-core on io_uring"
)]
pub struct Cli {
    /// A Kafka server.properties file (positional, as kafka-server-start.sh takes it).
    #[arg(value_name = "PROPERTIES")]
    pub properties: Option<PathBuf>,
    /// A Kafka server.properties file (same as the positional argument).
    #[arg(long = "config", value_name = "FILE", conflicts_with = "properties")]
    pub config: Option<PathBuf>,
    /// Override one property, as Kafka's `--override key=value`; repeatable, applied in order.
    #[arg(long = "override", value_name = "KEY=VALUE")]
    pub overrides: Vec<String>,
    /// Number of shards (pinned threads); default: the cores available to the process.
    #[arg(long = "shards", value_name = "N")]
    pub shards: Option<usize>,
}

/// A `host:port` the broker binds or advertises. An empty host binds every interface, as in Kafka.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    pub host: String,
    pub port: u16,
}

impl fmt::Display for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.host.contains(':') {
            write!(f, "[{}]:{}", self.host, self.port)
        } else {
            write!(f, "{}:{}", self.host, self.port)
        }
    }
}

/// The validated broker configuration. Durations and sizes carry their unit last in the name;
/// `None` means "never" / "unlimited" where Kafka uses -1 or `Long.MAX_VALUE`.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    // Kafka settings.
    pub broker_id: i32,
    /// Where shard 0 listens; shard `i` listens on `port + i`. Port 0 gives every shard an
    /// ephemeral port (tests), which `ShardContext::listen_addrs` then reports.
    pub listener: Endpoint,
    /// What clients are told to connect to for shard 0 (shard `i`: `port + i`).
    pub advertised_listener: Endpoint,
    pub log_dir: PathBuf,
    pub num_partitions: i32,
    pub default_replication_factor: i16,
    pub log_retention_ms: Option<u64>,
    pub log_retention_bytes: Option<u64>,
    pub log_segment_bytes: u64,
    pub log_roll_ms: u64,
    pub log_retention_check_interval_ms: u64,
    pub log_flush_interval_messages: Option<u64>,
    pub log_flush_interval_ms: Option<u64>,
    pub log_index_interval_bytes: u32,
    pub log_index_size_max_bytes: u32,
    pub delete_topic_enable: bool,
    pub auto_create_topics_enable: bool,
    pub socket_request_max_bytes: u32,
    pub message_max_bytes: u32,
    pub group_initial_rebalance_delay_ms: u64,
    pub group_min_session_timeout_ms: u64,
    pub group_max_session_timeout_ms: u64,
    pub offsets_retention_minutes: u64,
    /// `producer.id.expiration.ms`: a partition forgets an idempotent producer idle this long.
    pub producer_id_expiration_ms: u64,
    /// `producer.id.expiration.check.interval.ms`: how often each shard looks for such producers.
    pub producer_id_expiration_check_interval_ms: u64,
    // ringbroker's own settings.
    pub shard_count: usize,
    pub high_watermark_durable: bool,
    pub fetch_splice_min_bytes: u32,
    pub pipe_pool_size: usize,
    pub pipe_size_bytes: u32,
    pub max_connections_per_shard: usize,
    pub mailbox_capacity: usize,
    pub connection_max_inflight_bytes: u64,
    pub shutdown_timeout_ms: u64,
    /// Segment descriptors each shard keeps open at most; 0 derives it from `RLIMIT_NOFILE`.
    pub descriptor_cache_size: usize,
    /// Partitions a shard may own; CreateTopics and auto-creation beyond it are refused.
    pub max_partitions_per_shard: usize,
    /// How long startup retries binding a listening port that is in use.
    pub listener_bind_retry_ms: u64,
    /// Requests of one connection admitted to the handler but not yet answered
    /// (`ringbroker.connection.max.inflight.requests`).
    pub connection_max_inflight_requests: usize,
    /// `log.cleanup.policy` and the `log.cleaner.*` settings (log compaction).
    pub log_cleaner: LogCleanerConfig,
    /// `ringbroker.log.scrub.bytes.per.second`: how fast each shard re-reads closed segments to verify
    /// them (0 disables the scrubber).
    pub log_scrub_bytes_per_second: u64,
    /// `ringbroker.log.write.mode` (default buffered); `Node::start` replaces `Auto` by what the
    /// probe found.
    pub log_write_mode: WriteMode,
    /// A connection with no request for this long, and none in flight, is closed
    /// (`connections.max.idle.ms`).
    pub connections_max_idle_ms: u64,
    /// A request frame whose first bytes arrived must be complete within this, or the connection
    /// is closed (`ringbroker.connection.frame.timeout.ms`).
    pub connection_frame_timeout_ms: u64,
    /// Lines about single connections' problems each shard logs per second at most
    /// (`ringbroker.connection.log.lines.per.second`); the rest are counted in a summary line.
    pub connection_log_lines_per_second: u32,
    /// Open connections over the whole node (`max.connections`).
    pub max_connections: usize,
    /// Open connections from one client address (`max.connections.per.ip`).
    pub max_connections_per_ip: usize,
    /// Bytes of requests each shard holds in memory, read and not yet answered
    /// (`queued.max.request.bytes`; `None` for Kafka's -1, no limit).
    pub queued_max_request_bytes: Option<u64>,
}

/// A loaded configuration with the warnings to log (one per ignored key).
#[derive(Debug, Clone)]
pub struct Loaded {
    pub config: Config,
    pub warnings: Vec<String>,
}

/// Every key this module reads. Anything else is a warning (or an error under `ringbroker.`).
const KNOWN_KEYS: &[&str] = &[
    "broker.id",
    "listeners",
    "advertised.listeners",
    "listener.security.protocol.map",
    "controller.listener.names",
    "log.dirs",
    "log.dir",
    "num.partitions",
    "default.replication.factor",
    "log.retention.hours",
    "log.retention.minutes",
    "log.retention.ms",
    "log.retention.bytes",
    "log.segment.bytes",
    "log.roll.hours",
    "log.roll.ms",
    "log.retention.check.interval.ms",
    "log.flush.interval.messages",
    "log.flush.interval.ms",
    "log.index.interval.bytes",
    "log.index.size.max.bytes",
    "delete.topic.enable",
    "auto.create.topics.enable",
    "socket.request.max.bytes",
    "message.max.bytes",
    "group.initial.rebalance.delay.ms",
    "group.min.session.timeout.ms",
    "group.max.session.timeout.ms",
    "offsets.retention.minutes",
    "producer.id.expiration.ms",
    "producer.id.expiration.check.interval.ms",
    "log.cleanup.policy",
    "log.cleaner.enable",
    "log.cleaner.backoff.ms",
    "log.cleaner.dedupe.buffer.size",
    "log.cleaner.io.max.bytes.per.second",
    "log.cleaner.min.cleanable.ratio",
    "log.cleaner.min.compaction.lag.ms",
    "log.cleaner.max.compaction.lag.ms",
    "log.cleaner.delete.retention.ms",
    KEY_SHARDS,
    KEY_HW_DURABLE,
    KEY_SPLICE_MIN,
    KEY_PIPE_POOL,
    KEY_PIPE_SIZE,
    KEY_MAX_CONNECTIONS,
    KEY_MAILBOX,
    KEY_INFLIGHT,
    KEY_SHUTDOWN_TIMEOUT,
    KEY_DESCRIPTOR_CACHE,
    KEY_MAX_PARTITIONS_PER_SHARD,
    KEY_BIND_RETRY,
    KEY_INFLIGHT_REQUESTS,
    KEY_SCRUB_RATE,
    KEY_LOG_WRITE_MODE,
    "connections.max.idle.ms",
    KEY_FRAME_TIMEOUT,
    KEY_CONNECTION_LOG_LINES,
    "max.connections",
    "max.connections.per.ip",
    "queued.max.request.bytes",
];

pub const KEY_SHARDS: &str = "ringbroker.shards";
pub const KEY_HW_DURABLE: &str = "ringbroker.high.watermark.durable";
pub const KEY_SPLICE_MIN: &str = "ringbroker.fetch.splice.min.bytes";
pub const KEY_PIPE_POOL: &str = "ringbroker.pipe.pool.size";
pub const KEY_PIPE_SIZE: &str = "ringbroker.pipe.size.bytes";
pub const KEY_MAX_CONNECTIONS: &str = "ringbroker.max.connections.per.shard";
pub const KEY_MAILBOX: &str = "ringbroker.mailbox.capacity";
pub const KEY_INFLIGHT: &str = "ringbroker.connection.max.inflight.bytes";
pub const KEY_SHUTDOWN_TIMEOUT: &str = "ringbroker.shutdown.timeout.ms";
pub const KEY_DESCRIPTOR_CACHE: &str = "ringbroker.descriptor.cache.size";
pub const KEY_MAX_PARTITIONS_PER_SHARD: &str = "ringbroker.max.partitions.per.shard";
pub const KEY_BIND_RETRY: &str = "ringbroker.listener.bind.retry.ms";
/// Default partition budget per shard; docs/benchmarks.md ("Partition scale") has the measurement.
pub const DEFAULT_MAX_PARTITIONS_PER_SHARD: usize = 10_000;
pub const KEY_INFLIGHT_REQUESTS: &str = "ringbroker.connection.max.inflight.requests";
pub const KEY_SCRUB_RATE: &str = "ringbroker.log.scrub.bytes.per.second";
pub const KEY_FRAME_TIMEOUT: &str = "ringbroker.connection.frame.timeout.ms";
pub const KEY_CONNECTION_LOG_LINES: &str = "ringbroker.connection.log.lines.per.second";

/// The embedded defaults: `ringbroker` with no arguments serves 127.0.0.1:9092 from
/// `./ringbroker-data`. Loopback rather than Kafka's all-interfaces default, so that a broker
/// started without thought is not exposed to the network.
pub const DEFAULT_LISTENERS: &str = "PLAINTEXT://127.0.0.1:9092";
pub const DEFAULT_LOG_DIR: &str = "./ringbroker-data";

/// Below this many bytes a file range is sent by pread + send instead of splice. Chosen from
/// `cargo bench --bench server` (cached file to a loopback socket, 2 vCPU VM): at 64 KiB copy still
/// moved 2.5 GiB/s against splice's 1.4 (each splice is two io-wq handoffs); at 256 KiB splice won
/// on every measure: 4.6 vs 2.8 GiB/s, 0.38 vs 0.53 process CPU-s/GiB, 0.05 vs 0.34 CPU-s/GiB on
/// the shard thread.
pub const DEFAULT_FETCH_SPLICE_MIN_BYTES: u32 = 256 * 1024;

impl Config {
    /// The embedded defaults with `shard_count` cores.
    pub fn defaults() -> Config {
        Self::from_properties(&Properties::new(), None)
            .expect("the embedded defaults are valid")
            .config
    }

    /// Builds the configuration from the command line: the file (if any), then overrides, then
    /// `--shards`.
    pub fn from_cli(cli: &Cli) -> Result<Loaded, ConfigError> {
        let mut props = Properties::new();
        if let Some(path) = cli.config.as_ref().or(cli.properties.as_ref()) {
            props = read_properties_file(path)?;
        }
        for item in &cli.overrides {
            let (key, value) = item
                .split_once('=')
                .ok_or_else(|| ConfigError::BadOverride(item.clone()))?;
            let key = key.trim();
            if key.is_empty() {
                return Err(ConfigError::BadOverride(item.clone()));
            }
            props.insert(key.to_string(), value.trim().to_string());
        }
        Self::from_properties(&props, cli.shards)
    }

    /// Validates merged properties. `shards` (from `--shards`) beats `ringbroker.shards`.
    pub fn from_properties(
        props: &Properties,
        shards: Option<usize>,
    ) -> Result<Loaded, ConfigError> {
        let mut warnings = Vec::new();
        for key in props.keys() {
            if KNOWN_KEYS.contains(&key.as_str()) {
                continue;
            }
            if key.starts_with("ringbroker.") {
                return Err(ConfigError::UnknownRingbrokerKey { key: key.clone() });
            }
            warnings.push(format!(
                "ignoring `{key}`: it has no meaning for single-node ringbroker"
            ));
        }
        let reader = Reader { props };

        let (listener, listener_warnings) = parse_listeners(
            "listeners",
            reader.raw("listeners").unwrap_or(DEFAULT_LISTENERS),
            props,
        )?;
        warnings.extend(listener_warnings);
        let advertised_listener = match reader.raw("advertised.listeners") {
            Some(value) => {
                let (endpoint, advertised_warnings) =
                    parse_listeners("advertised.listeners", value, props)?;
                warnings.extend(advertised_warnings);
                if endpoint.host.is_empty() {
                    return Err(ConfigError::invalid(
                        "advertised.listeners",
                        value,
                        "an advertised listener needs a host clients can reach",
                    ));
                }
                endpoint
            }
            None => Endpoint {
                host: if listener.host.is_empty() || listener.host == "0.0.0.0" {
                    local_hostname()
                } else {
                    listener.host.clone()
                },
                port: listener.port,
            },
        };

        let log_dir = match (reader.raw("log.dirs"), reader.raw("log.dir")) {
            (Some(dirs), _) => parse_log_dirs("log.dirs", dirs)?,
            (None, Some(dir)) => parse_log_dirs("log.dir", dir)?,
            (None, None) => PathBuf::from(DEFAULT_LOG_DIR),
        };

        let default_replication_factor = reader.int("default.replication.factor", 1, 1, 1)? as i16;

        // Kafka: log.retention.ms wins, then .minutes, then .hours (default 168 hours).
        // Any negative value means "keep forever".
        let log_retention_ms = if props.contains_key("log.retention.ms") {
            reader.duration_or_forever("log.retention.ms", 1)?
        } else if props.contains_key("log.retention.minutes") {
            reader.duration_or_forever("log.retention.minutes", 60_000)?
        } else {
            reader
                .duration_or_forever("log.retention.hours", 3_600_000)?
                .or(if props.contains_key("log.retention.hours") {
                    None
                } else {
                    Some(168 * 3_600_000)
                })
        };
        let log_retention_bytes = {
            let bytes = reader.int("log.retention.bytes", -1, i64::MIN, i64::MAX)?;
            (bytes >= 0).then_some(bytes as u64)
        };
        let log_roll_ms = if props.contains_key("log.roll.ms") {
            reader.int("log.roll.ms", 0, 1, i64::MAX)? as u64
        } else {
            reader.int("log.roll.hours", 168, 1, i64::MAX / 3_600_000)? as u64 * 3_600_000
        };
        let log_flush_interval_messages = {
            let value = reader.int("log.flush.interval.messages", KAFKA_LONG_MAX, 1, i64::MAX)?;
            (value != KAFKA_LONG_MAX).then_some(value as u64)
        };
        let log_flush_interval_ms = match reader.raw("log.flush.interval.ms") {
            None => None,
            Some(_) => {
                let value = reader.int("log.flush.interval.ms", 0, 0, i64::MAX)?;
                (value != KAFKA_LONG_MAX).then_some(value as u64)
            }
        };

        let group_min_session_timeout_ms =
            reader.int("group.min.session.timeout.ms", 6_000, 0, i32::MAX as i64)? as u64;
        let group_max_session_timeout_ms = reader.int(
            "group.max.session.timeout.ms",
            1_800_000,
            0,
            i32::MAX as i64,
        )? as u64;
        if group_max_session_timeout_ms < group_min_session_timeout_ms {
            return Err(ConfigError::invalid(
                "group.max.session.timeout.ms",
                &group_max_session_timeout_ms.to_string(),
                "must not be below group.min.session.timeout.ms",
            ));
        }

        let shard_count = match shards {
            Some(0) => {
                return Err(ConfigError::invalid(
                    "--shards",
                    "0",
                    "at least one shard is needed",
                ));
            }
            Some(count) => count,
            None => match reader.raw(KEY_SHARDS) {
                Some(_) => reader.int(KEY_SHARDS, 1, 1, 1024)? as usize,
                None => available_cores(),
            },
        };
        if listener.port != 0 && listener.port as usize + shard_count - 1 > u16::MAX as usize {
            return Err(ConfigError::invalid(
                "listeners",
                &listener.to_string(),
                format!(
                    "{shard_count} shards need ports up to {}",
                    listener.port as usize + shard_count - 1
                ),
            ));
        }

        let socket_request_max_bytes =
            reader.int("socket.request.max.bytes", 104_857_600, 1, i32::MAX as i64)? as u32;
        let config = Config {
            broker_id: reader.int("broker.id", 0, 0, i32::MAX as i64)? as i32,
            listener,
            advertised_listener,
            log_dir,
            num_partitions: reader.int("num.partitions", 1, 1, i32::MAX as i64)? as i32,
            default_replication_factor,
            log_retention_ms,
            log_retention_bytes,
            log_segment_bytes: reader.int("log.segment.bytes", 1 << 30, 14, i32::MAX as i64)?
                as u64,
            log_roll_ms,
            log_retention_check_interval_ms: reader.int(
                "log.retention.check.interval.ms",
                300_000,
                1,
                i64::MAX,
            )? as u64,
            log_flush_interval_messages,
            log_flush_interval_ms,
            log_index_interval_bytes: reader.int(
                "log.index.interval.bytes",
                4096,
                0,
                i32::MAX as i64,
            )? as u32,
            log_index_size_max_bytes: reader.int(
                "log.index.size.max.bytes",
                10 * 1024 * 1024,
                4,
                i32::MAX as i64,
            )? as u32,
            delete_topic_enable: reader.bool("delete.topic.enable", true)?,
            auto_create_topics_enable: reader.bool("auto.create.topics.enable", true)?,
            socket_request_max_bytes,
            message_max_bytes: reader.int("message.max.bytes", 1_048_588, 0, i32::MAX as i64)?
                as u32,
            group_initial_rebalance_delay_ms: reader.int(
                "group.initial.rebalance.delay.ms",
                3_000,
                0,
                i32::MAX as i64,
            )? as u64,
            group_min_session_timeout_ms,
            group_max_session_timeout_ms,
            offsets_retention_minutes: reader.int(
                "offsets.retention.minutes",
                10_080,
                1,
                i32::MAX as i64,
            )? as u64,
            // Kafka's bounds: at least 1 ms, at most Int.MaxValue for both.
            producer_id_expiration_ms: reader.int(
                "producer.id.expiration.ms",
                86_400_000,
                1,
                i32::MAX as i64,
            )? as u64,
            producer_id_expiration_check_interval_ms: reader.int(
                "producer.id.expiration.check.interval.ms",
                600_000,
                1,
                i32::MAX as i64,
            )? as u64,
            shard_count,
            high_watermark_durable: reader.bool(KEY_HW_DURABLE, false)?,
            fetch_splice_min_bytes: reader.int(
                KEY_SPLICE_MIN,
                DEFAULT_FETCH_SPLICE_MIN_BYTES as i64,
                0,
                u32::MAX as i64,
            )? as u32,
            pipe_pool_size: reader.int(KEY_PIPE_POOL, 8, 0, 1024)? as usize,
            // The kernel caps pipes at /proc/sys/fs/pipe-max-size (1 MiB by default) for
            // unprivileged users; a page is the smallest pipe there is.
            pipe_size_bytes: reader.int(KEY_PIPE_SIZE, 1 << 20, 4096, 1 << 30)? as u32,
            max_connections_per_shard: reader.int(KEY_MAX_CONNECTIONS, 4096, 1, 1 << 20)? as usize,
            mailbox_capacity: reader.int(KEY_MAILBOX, 1024, 1, 1 << 20)? as usize,
            connection_max_inflight_bytes: reader.int(KEY_INFLIGHT, 64 << 20, 1, i64::MAX)? as u64,
            shutdown_timeout_ms: reader.int(KEY_SHUTDOWN_TIMEOUT, 10_000, 0, i64::MAX)? as u64,
            descriptor_cache_size: reader.int(KEY_DESCRIPTOR_CACHE, 0, 0, 1 << 24)? as usize,
            max_partitions_per_shard: reader.int(
                KEY_MAX_PARTITIONS_PER_SHARD,
                DEFAULT_MAX_PARTITIONS_PER_SHARD as i64,
                1,
                1 << 24,
            )? as usize,
            listener_bind_retry_ms: reader.int(KEY_BIND_RETRY, 10_000, 0, 3_600_000)? as u64,
            connection_max_inflight_requests: reader.int(KEY_INFLIGHT_REQUESTS, 32, 1, 1 << 16)?
                as usize,
            log_cleaner: read_log_cleaner(&reader)?,
            // 8 MiB/s per shard: a 1 GiB segment is verified in about two minutes, at a read rate far
            // below what the append path needs (see docs/storage.md, "Scrubbing").
            log_scrub_bytes_per_second: reader.int(KEY_SCRUB_RATE, 8 << 20, 0, i64::MAX)? as u64,
            // Buffered by default until uncached appends are measured faster: on 2026-12-03 each
            // uncached 16 KiB append waited for the writeback of the page it shares with the
            // previous append (238 µs vs 29 µs, benches/storage.rs), and sustained produce was
            // 0.56x buffered (docs/benchmarks.md).
            log_write_mode: match reader.raw(KEY_LOG_WRITE_MODE) {
                None => WriteMode::Buffered,
                Some(value) => WriteMode::parse(value).ok_or_else(|| {
                    ConfigError::invalid(
                        KEY_LOG_WRITE_MODE,
                        value,
                        "expected buffered, uncached or auto",
                    )
                })?,
            },
            connections_max_idle_ms: reader.int("connections.max.idle.ms", 600_000, 1, i64::MAX)?
                as u64,
            connection_frame_timeout_ms: reader.int(KEY_FRAME_TIMEOUT, 30_000, 1, i64::MAX)? as u64,
            connection_log_lines_per_second: reader.int(KEY_CONNECTION_LOG_LINES, 10, 1, 1 << 20)?
                as u32,
            // Kafka's defaults (no limit); `ringbroker.max.connections.per.shard` bounds each
            // shard regardless.
            max_connections: reader.int("max.connections", i32::MAX as i64, 1, i32::MAX as i64)?
                as usize,
            max_connections_per_ip: reader.int(
                "max.connections.per.ip",
                i32::MAX as i64,
                1,
                i32::MAX as i64,
            )? as usize,
            queued_max_request_bytes: queued_max_request_bytes(&reader, socket_request_max_bytes)?,
        };
        Ok(Loaded { config, warnings })
    }

    /// One line per setting, for the startup log.
    pub fn summary_lines(&self) -> Vec<String> {
        fn never(value: Option<u64>) -> String {
            value.map_or_else(|| "never".to_string(), |v| v.to_string())
        }
        vec![
            format!("broker.id = {}", self.broker_id),
            format!(
                "listeners = PLAINTEXT://{} (shard i on port + i)",
                self.listener
            ),
            format!(
                "advertised.listeners = PLAINTEXT://{}",
                self.advertised_listener
            ),
            format!("log.dir = {}", self.log_dir.display()),
            format!("num.partitions = {}", self.num_partitions),
            format!(
                "default.replication.factor = {}",
                self.default_replication_factor
            ),
            format!("log.retention.ms = {}", never(self.log_retention_ms)),
            format!(
                "log.retention.bytes = {}",
                self.log_retention_bytes
                    .map_or_else(|| "unlimited".to_string(), |v| v.to_string())
            ),
            format!("log.segment.bytes = {}", self.log_segment_bytes),
            format!("log.roll.ms = {}", self.log_roll_ms),
            format!(
                "log.retention.check.interval.ms = {}",
                self.log_retention_check_interval_ms
            ),
            format!(
                "log.flush.interval.messages = {}",
                never(self.log_flush_interval_messages)
            ),
            format!(
                "log.flush.interval.ms = {}",
                never(self.log_flush_interval_ms)
            ),
            format!(
                "log.index.interval.bytes = {}",
                self.log_index_interval_bytes
            ),
            format!(
                "log.index.size.max.bytes = {}",
                self.log_index_size_max_bytes
            ),
            format!("delete.topic.enable = {}", self.delete_topic_enable),
            format!(
                "auto.create.topics.enable = {}",
                self.auto_create_topics_enable
            ),
            format!(
                "socket.request.max.bytes = {}",
                self.socket_request_max_bytes
            ),
            format!("message.max.bytes = {}", self.message_max_bytes),
            format!(
                "group.initial.rebalance.delay.ms = {}",
                self.group_initial_rebalance_delay_ms
            ),
            format!(
                "group.min.session.timeout.ms = {}",
                self.group_min_session_timeout_ms
            ),
            format!(
                "group.max.session.timeout.ms = {}",
                self.group_max_session_timeout_ms
            ),
            format!(
                "offsets.retention.minutes = {}",
                self.offsets_retention_minutes
            ),
            format!(
                "producer.id.expiration.ms = {}",
                self.producer_id_expiration_ms
            ),
            format!(
                "producer.id.expiration.check.interval.ms = {}",
                self.producer_id_expiration_check_interval_ms
            ),
            format!("{KEY_SHARDS} = {}", self.shard_count),
            format!("{KEY_HW_DURABLE} = {}", self.high_watermark_durable),
            format!("{KEY_SPLICE_MIN} = {}", self.fetch_splice_min_bytes),
            format!("{KEY_PIPE_POOL} = {}", self.pipe_pool_size),
            format!("{KEY_PIPE_SIZE} = {}", self.pipe_size_bytes),
            format!("{KEY_MAX_CONNECTIONS} = {}", self.max_connections_per_shard),
            format!("{KEY_MAILBOX} = {}", self.mailbox_capacity),
            format!("{KEY_INFLIGHT} = {}", self.connection_max_inflight_bytes),
            format!("{KEY_LOG_WRITE_MODE} = {}", self.log_write_mode.name()),
            format!("{KEY_SHUTDOWN_TIMEOUT} = {}", self.shutdown_timeout_ms),
            format!("{KEY_DESCRIPTOR_CACHE} = {}", self.descriptor_cache_size),
            format!(
                "{KEY_MAX_PARTITIONS_PER_SHARD} = {}",
                self.max_partitions_per_shard
            ),
            format!("{KEY_BIND_RETRY} = {}", self.listener_bind_retry_ms),
            format!(
                "{KEY_INFLIGHT_REQUESTS} = {}",
                self.connection_max_inflight_requests
            ),
            format!("log.cleaner = {:?}", self.log_cleaner),
            format!("{KEY_SCRUB_RATE} = {}", self.log_scrub_bytes_per_second),
            format!("connections.max.idle.ms = {}", self.connections_max_idle_ms),
            format!("{KEY_FRAME_TIMEOUT} = {}", self.connection_frame_timeout_ms),
            format!(
                "{KEY_CONNECTION_LOG_LINES} = {}",
                self.connection_log_lines_per_second
            ),
            format!("max.connections = {}", self.max_connections),
            format!("max.connections.per.ip = {}", self.max_connections_per_ip),
            format!(
                "queued.max.request.bytes = {}",
                self.queued_max_request_bytes
                    .map_or(-1, |bytes| bytes as i64)
            ),
        ]
    }
}

/// `queued.max.request.bytes`: -1 (Kafka's default) for no limit, otherwise at least
/// `socket.request.max.bytes`, so that a frame of the largest allowed size can always be read
/// whole once the rest of the shard's requests are answered.
fn queued_max_request_bytes(
    reader: &Reader<'_>,
    socket_request_max_bytes: u32,
) -> Result<Option<u64>, ConfigError> {
    const KEY: &str = "queued.max.request.bytes";
    let bytes = reader.int(KEY, -1, -1, i64::MAX)?;
    if bytes == -1 {
        return Ok(None);
    }
    if bytes < i64::from(socket_request_max_bytes) {
        return Err(ConfigError::invalid(
            KEY,
            &bytes.to_string(),
            format!(
                "must be -1 (no limit) or at least socket.request.max.bytes ({socket_request_max_bytes})"
            ),
        ));
    }
    Ok(Some(bytes as u64))
}

/// Typed access to the merged properties; every error names the key and the value.
struct Reader<'a> {
    props: &'a Properties,
}

impl Reader<'_> {
    fn raw(&self, key: &str) -> Option<&str> {
        self.props.get(key).map(String::as_str)
    }

    fn int(&self, key: &str, default: i64, min: i64, max: i64) -> Result<i64, ConfigError> {
        let Some(value) = self.raw(key) else {
            return Ok(default);
        };
        let parsed: i64 = value
            .trim()
            .parse()
            .map_err(|_| ConfigError::invalid(key, value, "not an integer"))?;
        if parsed < min || parsed > max {
            return Err(ConfigError::invalid(
                key,
                value,
                format!("must be between {min} and {max}"),
            ));
        }
        Ok(parsed)
    }

    /// A duration in `unit_ms` units where any negative value means forever (Kafka's -1).
    fn duration_or_forever(&self, key: &str, unit_ms: i64) -> Result<Option<u64>, ConfigError> {
        let Some(value) = self.raw(key) else {
            return Ok(None);
        };
        let parsed: i64 = value
            .trim()
            .parse()
            .map_err(|_| ConfigError::invalid(key, value, "not an integer"))?;
        if parsed < 0 {
            return Ok(None);
        }
        parsed
            .checked_mul(unit_ms)
            .map(|ms| Some(ms as u64))
            .ok_or_else(|| ConfigError::invalid(key, value, "too large"))
    }

    fn bool(&self, key: &str, default: bool) -> Result<bool, ConfigError> {
        match self.raw(key).map(|v| v.trim().to_ascii_lowercase()) {
            None => Ok(default),
            Some(v) if v == "true" => Ok(true),
            Some(v) if v == "false" => Ok(false),
            Some(_) => Err(ConfigError::invalid(
                key,
                self.raw(key).unwrap_or_default(),
                "expected true or false",
            )),
        }
    }
}

/// The log cleaner's broker settings: Kafka's `log.cleanup.policy` (the default of every topic's
/// `cleanup.policy`) and `log.cleaner.*`. Each shard runs one cleaner over its own partitions, so
/// the buffer and IO budgets are divided among the shards (Kafka divides them among cleaner threads).
#[derive(Debug, Clone, PartialEq)]
pub struct LogCleanerConfig {
    /// `log.cleaner.enable` (true).
    pub enable: bool,
    /// `log.cleanup.policy` names `compact` (default: only `delete`).
    pub cleanup_compact: bool,
    /// `log.cleanup.policy` names `delete`.
    pub cleanup_delete: bool,
    /// `log.cleaner.backoff.ms`: the pause between two rounds over a shard's partitions (15 s).
    pub backoff_ms: u64,
    /// `log.cleaner.dedupe.buffer.size`: offset-map memory for the whole broker (128 MiB).
    pub dedupe_buffer_size_bytes: u64,
    /// `log.cleaner.io.max.bytes.per.second` for the whole broker; `None` = unlimited (Kafka's default).
    pub io_max_bytes_per_second: Option<u64>,
    /// `log.cleaner.min.cleanable.ratio` (0.5).
    pub min_cleanable_ratio: f64,
    /// `log.cleaner.min.compaction.lag.ms` (0).
    pub min_compaction_lag_ms: u64,
    /// `log.cleaner.max.compaction.lag.ms`; `None` = Kafka's Long.MAX_VALUE (the default).
    pub max_compaction_lag_ms: Option<u64>,
    /// `log.cleaner.delete.retention.ms` (1 day).
    pub delete_retention_ms: u64,
}

/// Parses a `cleanup.policy` list (`delete`, `compact` or both, comma-separated) into
/// (compact, delete).
pub fn parse_cleanup_policy(value: &str) -> Option<(bool, bool)> {
    let mut compact = false;
    let mut delete = false;
    for part in value.split(',').map(str::trim) {
        match part {
            "compact" => compact = true,
            "delete" => delete = true,
            _ => return None,
        }
    }
    (compact || delete).then_some((compact, delete))
}

fn read_log_cleaner(reader: &Reader<'_>) -> Result<LogCleanerConfig, ConfigError> {
    let (cleanup_compact, cleanup_delete) = match reader.raw("log.cleanup.policy") {
        None => (false, true),
        Some(value) => parse_cleanup_policy(value).ok_or_else(|| {
            ConfigError::invalid(
                "log.cleanup.policy",
                value,
                "must be delete, compact or compact,delete",
            )
        })?,
    };
    let float = |key: &str, default: f64, min: f64, max: f64| -> Result<f64, ConfigError> {
        let Some(value) = reader.raw(key) else {
            return Ok(default);
        };
        let parsed: f64 = value
            .trim()
            .parse()
            .map_err(|_| ConfigError::invalid(key, value, "not a number"))?;
        if !(min..=max).contains(&parsed) {
            return Err(ConfigError::invalid(
                key,
                value,
                format!("must be between {min} and {max}"),
            ));
        }
        Ok(parsed)
    };
    let io_rate = float(
        "log.cleaner.io.max.bytes.per.second",
        f64::MAX,
        1.0,
        f64::MAX,
    )?;
    let max_lag = reader.int("log.cleaner.max.compaction.lag.ms", i64::MAX, 1, i64::MAX)?;
    let min_lag = reader.int("log.cleaner.min.compaction.lag.ms", 0, 0, i64::MAX)?;
    if min_lag > max_lag {
        return Err(ConfigError::invalid(
            "log.cleaner.min.compaction.lag.ms",
            &min_lag.to_string(),
            "must not exceed log.cleaner.max.compaction.lag.ms",
        ));
    }
    Ok(LogCleanerConfig {
        enable: reader.bool("log.cleaner.enable", true)?,
        cleanup_compact,
        cleanup_delete,
        backoff_ms: reader.int("log.cleaner.backoff.ms", 15_000, 0, i64::MAX)? as u64,
        dedupe_buffer_size_bytes: reader.int(
            "log.cleaner.dedupe.buffer.size",
            128 << 20,
            1024,
            i64::MAX,
        )? as u64,
        io_max_bytes_per_second: (io_rate < u64::MAX as f64).then_some(io_rate as u64),
        min_cleanable_ratio: float("log.cleaner.min.cleanable.ratio", 0.5, 0.0, 1.0)?,
        min_compaction_lag_ms: min_lag as u64,
        max_compaction_lag_ms: (max_lag < i64::MAX).then_some(max_lag as u64),
        delete_retention_ms: reader.int(
            "log.cleaner.delete.retention.ms",
            86_400_000,
            0,
            i64::MAX,
        )? as u64,
    })
}

/// Picks the one PLAINTEXT listener out of Kafka's comma-separated `NAME://host:port` list.
/// Listeners named in `controller.listener.names` (KRaft) are skipped with a warning; a listener's
/// protocol comes from `listener.security.protocol.map` when it is given, else from its name.
fn parse_listeners(
    key: &str,
    value: &str,
    props: &Properties,
) -> Result<(Endpoint, Vec<String>), ConfigError> {
    let controllers: Vec<&str> = props
        .get("controller.listener.names")
        .map(|names| names.split(',').map(str::trim).collect())
        .unwrap_or_default();
    let protocol_map: Vec<(String, String)> = props
        .get("listener.security.protocol.map")
        .map(|map| {
            map.split(',')
                .filter_map(|pair| pair.split_once(':'))
                .map(|(name, proto)| {
                    (
                        name.trim().to_ascii_uppercase(),
                        proto.trim().to_ascii_uppercase(),
                    )
                })
                .collect()
        })
        .unwrap_or_default();
    let mut warnings = Vec::new();
    let mut chosen: Option<Endpoint> = None;
    for item in value.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        let (name, address) = item.split_once("://").ok_or_else(|| {
            ConfigError::invalid(key, value, format!("`{item}` is not NAME://host:port"))
        })?;
        let name_upper = name.to_ascii_uppercase();
        if controllers.iter().any(|c| c.eq_ignore_ascii_case(name)) {
            warnings.push(format!("{key}: ignoring controller listener `{item}`"));
            continue;
        }
        let protocol = protocol_map
            .iter()
            .find(|(n, _)| *n == name_upper)
            .map(|(_, p)| p.clone())
            .unwrap_or_else(|| name_upper.clone());
        if protocol != "PLAINTEXT" {
            warnings.push(format!(
                "{key}: ignoring `{item}`: only PLAINTEXT listeners are supported"
            ));
            continue;
        }
        let endpoint = parse_endpoint(key, value, address)?;
        if chosen.is_some() {
            warnings.push(format!(
                "{key}: ignoring `{item}`: only one PLAINTEXT listener is supported"
            ));
            continue;
        }
        chosen = Some(endpoint);
    }
    chosen
        .map(|endpoint| (endpoint, warnings))
        .ok_or_else(|| ConfigError::invalid(key, value, "no PLAINTEXT listener"))
}

fn parse_endpoint(key: &str, value: &str, address: &str) -> Result<Endpoint, ConfigError> {
    // IPv6 hosts come bracketed: PLAINTEXT://[::1]:9092.
    let (host, port) = if let Some(rest) = address.strip_prefix('[') {
        let (host, port) = rest
            .split_once("]:")
            .ok_or_else(|| ConfigError::invalid(key, value, "bad [ipv6]:port"))?;
        (host, port)
    } else {
        address
            .rsplit_once(':')
            .ok_or_else(|| ConfigError::invalid(key, value, "missing :port"))?
    };
    let port: u16 = port
        .parse()
        .map_err(|_| ConfigError::invalid(key, value, format!("`{port}` is not a port")))?;
    Ok(Endpoint {
        host: host.to_string(),
        port,
    })
}

fn parse_log_dirs(key: &str, value: &str) -> Result<PathBuf, ConfigError> {
    let dirs: Vec<&str> = value
        .split(',')
        .map(str::trim)
        .filter(|d| !d.is_empty())
        .collect();
    match dirs.as_slice() {
        [one] => Ok(PathBuf::from(one)),
        [] => Err(ConfigError::invalid(key, value, "no directory given")),
        _ => Err(ConfigError::invalid(
            key,
            value,
            "ringbroker supports exactly one log directory",
        )),
    }
}

/// What Kafka advertises when no advertised listener is set and the listener binds everything:
/// this machine's host name.
fn local_hostname() -> String {
    let mut buf = [0u8; 256];
    // SAFETY: the buffer is valid for its length; gethostname NUL-terminates on success.
    let rc = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) };
    if rc == 0 {
        let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
        if let Ok(name) = std::str::from_utf8(&buf[..end])
            && !name.is_empty()
        {
            return name.to_string();
        }
    }
    "localhost".to_string()
}

/// The cores this process may run on: the affinity mask, else `available_parallelism`.
pub fn available_cores() -> usize {
    core_affinity::get_core_ids()
        .map(|ids| ids.len())
        .filter(|&n| n > 0)
        .or_else(|| std::thread::available_parallelism().ok().map(|n| n.get()))
        .unwrap_or(1)
}

/// Reads a Java properties file.
pub fn read_properties_file(path: &Path) -> Result<Properties, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    parse_properties(&path.display().to_string(), &text)
}

/// Parses Java's `Properties.load` format: `#`/`!` comment lines, `=`/`:`/whitespace separators,
/// backslash line continuations (leading whitespace of the next line dropped) and escapes
/// (`\t \n \r \f \uXXXX`, any other escaped character stands for itself). A later key wins.
pub fn parse_properties(source: &str, text: &str) -> Result<Properties, ConfigError> {
    let mut props = Properties::new();
    let lines: Vec<&str> = text.lines().collect();
    let mut index = 0;
    while index < lines.len() {
        let first_line = index + 1;
        let natural = lines[index].trim_start_matches([' ', '\t', '\u{c}']);
        index += 1;
        if natural.is_empty() || natural.starts_with('#') || natural.starts_with('!') {
            continue;
        }
        // Join continuation lines: an odd number of trailing backslashes continues the line.
        let mut logical = String::from(natural);
        while ends_with_odd_backslashes(&logical) {
            logical.pop();
            if index >= lines.len() {
                break;
            }
            logical.push_str(lines[index].trim_start_matches([' ', '\t', '\u{c}']));
            index += 1;
        }
        let (raw_key, raw_value) = split_key_value(&logical);
        let syntax = |reason: String| ConfigError::Syntax {
            path: source.to_string(),
            line: first_line,
            reason,
        };
        let key = unescape(raw_key).map_err(syntax)?;
        let value = unescape(raw_value).map_err(|reason| ConfigError::Syntax {
            path: source.to_string(),
            line: first_line,
            reason,
        })?;
        props.insert(key, value);
    }
    Ok(props)
}

fn ends_with_odd_backslashes(line: &str) -> bool {
    line.bytes().rev().take_while(|&b| b == b'\\').count() % 2 == 1
}

/// Splits a logical line at the first unescaped `=`, `:` or whitespace, as Java does.
fn split_key_value(line: &str) -> (&str, &str) {
    let bytes = line.as_bytes();
    let mut i = 0;
    let mut key_end = bytes.len();
    while i < bytes.len() {
        match bytes[i] {
            b'\\' => i += 2,
            b'=' | b':' | b' ' | b'\t' | b'\x0c' => {
                key_end = i;
                break;
            }
            _ => i += 1,
        }
    }
    let key_end = key_end.min(bytes.len());
    let mut rest = &line[key_end..];
    rest = rest.trim_start_matches([' ', '\t', '\u{c}']);
    if let Some(stripped) = rest.strip_prefix(['=', ':']) {
        rest = stripped.trim_start_matches([' ', '\t', '\u{c}']);
    }
    (&line[..key_end], rest)
}

fn unescape(raw: &str) -> Result<String, String> {
    let mut out = String::with_capacity(raw.len());
    let mut chars = raw.chars();
    while let Some(c) = chars.next() {
        if c != '\\' {
            out.push(c);
            continue;
        }
        match chars.next() {
            None => {}
            Some('t') => out.push('\t'),
            Some('n') => out.push('\n'),
            Some('r') => out.push('\r'),
            Some('f') => out.push('\u{c}'),
            Some('u') => {
                let hex: String = chars.by_ref().take(4).collect();
                let code = (hex.len() == 4)
                    .then(|| u32::from_str_radix(&hex, 16).ok())
                    .flatten()
                    .ok_or_else(|| format!("malformed \\uxxxx encoding `\\u{hex}`"))?;
                // Java strings are UTF-16; a lone surrogate cannot become a Rust char.
                out.push(
                    char::from_u32(code)
                        .ok_or_else(|| format!("\\u{hex} is not a character on its own"))?,
                );
            }
            Some(other) => out.push(other),
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn props(text: &str) -> Properties {
        parse_properties("test", text).expect("parses")
    }

    fn load(text: &str) -> Result<Loaded, ConfigError> {
        Config::from_properties(&props(text), Some(2))
    }

    #[test]
    fn properties_syntax_follows_java() {
        let cases: &[(&str, &[(&str, &str)])] = &[
            ("a=b", &[("a", "b")]),
            ("a = b", &[("a", "b")]),
            ("a:b", &[("a", "b")]),
            ("a b", &[("a", "b")]),
            ("  a   =   b c  ", &[("a", "b c  ")]),
            ("# comment\n! also\n\na=1", &[("a", "1")]),
            ("a=one \\\n    two", &[("a", "one two")]),
            ("a=x\\\\\nb=y", &[("a", "x\\"), ("b", "y")]),
            ("a\\=b=c", &[("a=b", "c")]),
            ("a=\\t\\u0041\\z", &[("a", "\tAz")]),
            ("key", &[("key", "")]),
            ("a=1\na=2", &[("a", "2")]),
            ("a=1\r\nb=2\r\n", &[("a", "1"), ("b", "2")]),
        ];
        for (text, expected) in cases {
            let got = props(text);
            let expected: Properties = expected
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect();
            assert_eq!(got, expected, "input {text:?}");
        }
        assert!(matches!(
            parse_properties("f", "a=\\u12"),
            Err(ConfigError::Syntax { line: 1, .. })
        ));
    }

    #[test]
    fn defaults_serve_loopback_9092() {
        let config = load("").unwrap().config;
        assert_eq!(
            config.listener,
            Endpoint {
                host: "127.0.0.1".into(),
                port: 9092
            }
        );
        assert_eq!(config.advertised_listener.port, 9092);
        assert_eq!(config.log_dir, PathBuf::from(DEFAULT_LOG_DIR));
        assert_eq!(config.log_retention_ms, Some(168 * 3_600_000));
        assert_eq!(config.log_retention_bytes, None);
        assert_eq!(config.log_flush_interval_messages, None);
        assert_eq!(config.pipe_size_bytes, 1 << 20);
        assert!(!config.high_watermark_durable);
        assert_eq!(config.shard_count, 2);
        assert_eq!(config.log_write_mode, WriteMode::Buffered);
    }

    #[test]
    fn retention_precedence_is_kafkas() {
        let ms = |text: &str| load(text).unwrap().config.log_retention_ms;
        assert_eq!(ms("log.retention.hours=1"), Some(3_600_000));
        assert_eq!(
            ms("log.retention.hours=1\nlog.retention.minutes=2"),
            Some(120_000)
        );
        assert_eq!(
            ms("log.retention.hours=1\nlog.retention.minutes=2\nlog.retention.ms=5"),
            Some(5)
        );
        assert_eq!(ms("log.retention.ms=-1\nlog.retention.hours=1"), None);
        assert_eq!(ms("log.retention.hours=-1"), None);
    }

    #[test]
    fn invalid_values_name_key_and_value() {
        for (text, key, value) in [
            ("num.partitions=abc", "num.partitions", "abc"),
            ("num.partitions=0", "num.partitions", "0"),
            (
                "default.replication.factor=3",
                "default.replication.factor",
                "3",
            ),
            ("log.dirs=/a,/b", "log.dirs", "/a,/b"),
            ("delete.topic.enable=yes", "delete.topic.enable", "yes"),
            ("listeners=SSL://:9093", "listeners", "SSL://:9093"),
            (
                "listeners=PLAINTEXT://host",
                "listeners",
                "PLAINTEXT://host",
            ),
            (
                "producer.id.expiration.ms=0",
                "producer.id.expiration.ms",
                "0",
            ),
            (
                "producer.id.expiration.check.interval.ms=3000000000",
                "producer.id.expiration.check.interval.ms",
                "3000000000",
            ),
            (
                "ringbroker.log.write.mode=direct",
                "ringbroker.log.write.mode",
                "direct",
            ),
        ] {
            let err = load(text).unwrap_err();
            let message = err.to_string();
            assert!(
                message.contains(key) && message.contains(value),
                "{text}: {message}"
            );
        }
        assert!(matches!(
            load("ringbroker.no.such.key=1"),
            Err(ConfigError::UnknownRingbrokerKey { .. })
        ));
    }

    #[test]
    fn producer_id_expiration_keys_default_as_kafka_and_are_read() {
        let defaults = load("").unwrap().config;
        assert_eq!(defaults.producer_id_expiration_ms, 86_400_000);
        assert_eq!(defaults.producer_id_expiration_check_interval_ms, 600_000);
        let set =
            load("producer.id.expiration.ms=5000\nproducer.id.expiration.check.interval.ms=100")
                .unwrap();
        assert!(set.warnings.is_empty(), "{:?}", set.warnings);
        assert_eq!(set.config.producer_id_expiration_ms, 5_000);
        assert_eq!(set.config.producer_id_expiration_check_interval_ms, 100);
    }

    #[test]
    fn unknown_kafka_keys_warn_once_each() {
        let loaded = load("zookeeper.connect=x:2181\nnum.io.threads=8\nnum.partitions=3").unwrap();
        assert_eq!(loaded.warnings.len(), 2);
        assert!(
            loaded
                .warnings
                .iter()
                .any(|w| w.contains("zookeeper.connect"))
        );
        assert_eq!(loaded.config.num_partitions, 3);
    }

    #[test]
    fn kraft_listeners_pick_plaintext() {
        let loaded = load(
            "listeners=PLAINTEXT://:9092,CONTROLLER://:9093\ncontroller.listener.names=CONTROLLER\n\
             advertised.listeners=PLAINTEXT://localhost:9092",
        )
        .unwrap();
        assert_eq!(
            loaded.config.listener,
            Endpoint {
                host: "".into(),
                port: 9092
            }
        );
        assert_eq!(loaded.config.advertised_listener.host, "localhost");
        assert!(loaded.warnings.iter().any(|w| w.contains("CONTROLLER")));
    }

    #[test]
    fn overrides_and_shards_win() {
        let cli = Cli {
            overrides: vec!["num.partitions=7".into(), "ringbroker.shards=3".into()],
            ..Cli::default()
        };
        let config = Config::from_cli(&cli).unwrap().config;
        assert_eq!(config.num_partitions, 7);
        assert_eq!(config.shard_count, 3);
        let cli = Cli {
            overrides: vec!["ringbroker.shards=3".into()],
            shards: Some(1),
            ..Cli::default()
        };
        assert_eq!(Config::from_cli(&cli).unwrap().config.shard_count, 1);
        let cli = Cli {
            overrides: vec!["novalue".into()],
            ..Cli::default()
        };
        assert!(matches!(
            Config::from_cli(&cli),
            Err(ConfigError::BadOverride(_))
        ));
    }

    #[test]
    fn scrub_rate_defaults_to_8_mib_and_zero_disables() {
        assert_eq!(load("").unwrap().config.log_scrub_bytes_per_second, 8 << 20);
        let set = load("ringbroker.log.scrub.bytes.per.second=0").unwrap();
        assert_eq!(set.config.log_scrub_bytes_per_second, 0);
        let error = load("ringbroker.log.scrub.bytes.per.second=-1").unwrap_err();
        assert!(error.to_string().contains(KEY_SCRUB_RATE), "{error}");
    }

    #[test]
    fn queued_max_request_bytes_is_minus_one_or_at_least_one_frame() {
        assert_eq!(load("").unwrap().config.queued_max_request_bytes, None);
        let config = load("queued.max.request.bytes=104857600").unwrap().config;
        assert_eq!(config.queued_max_request_bytes, Some(104_857_600));
        match load("socket.request.max.bytes=2000\nqueued.max.request.bytes=1000") {
            Err(ConfigError::InvalidValue { key, value, .. }) => {
                assert_eq!(
                    (key.as_str(), value.as_str()),
                    ("queued.max.request.bytes", "1000")
                );
            }
            other => panic!("expected an invalid value, got {other:?}"),
        }
    }

    #[test]
    fn summary_has_one_line_per_setting() {
        let config = load("").unwrap().config;
        let lines = config.summary_lines();
        assert!(lines.iter().all(|l| !l.contains('\n')));
        assert!(lines.iter().any(|l| l.starts_with("log.retention.ms = ")));
        assert_eq!(lines.len(), 47);
    }
}
