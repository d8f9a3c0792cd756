//! Configuration from real files: Kafka's stock server.properties (KRaft and ZooKeeper flavours),
//! ringbroker's example file, and the command line's precedence over them.

use std::path::{Path, PathBuf};

use clap::Parser;
use ringbroker::config::{Cli, Config, ConfigError, Endpoint, read_properties_file};

fn data(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(name)
}

fn load(args: &[&str]) -> Result<ringbroker::config::Loaded, ConfigError> {
    let mut argv = vec!["ringbroker"];
    argv.extend_from_slice(args);
    Config::from_cli(&Cli::try_parse_from(argv).expect("arguments parse"))
}

/// How many warnings mention `key` in backquotes.
fn warnings_for(warnings: &[String], key: &str) -> usize {
    let quoted = format!("`{key}`");
    warnings.iter().filter(|w| w.contains(&quoted)).count()
}

#[test]
fn stock_kafka_kraft_file_is_accepted() {
    let path = data("tests/data/kafka-server.properties");
    let loaded = load(&["--config", path.to_str().unwrap(), "--shards", "2"]).unwrap();
    let config = &loaded.config;
    assert_eq!(
        config.listener,
        Endpoint {
            host: String::new(),
            port: 9092
        }
    );
    assert_eq!(
        config.advertised_listener,
        Endpoint {
            host: "localhost".into(),
            port: 9092
        }
    );
    assert_eq!(config.log_dir, PathBuf::from("/tmp/kraft-combined-logs"));
    assert_eq!(config.num_partitions, 1);
    assert_eq!(config.log_retention_ms, Some(168 * 3_600_000));
    assert_eq!(config.log_segment_bytes, 1 << 30);
    assert_eq!(config.log_retention_check_interval_ms, 300_000);
    assert_eq!(config.socket_request_max_bytes, 104_857_600);
    assert_eq!(config.shard_count, 2);
    for key in [
        "process.roles",
        "node.id",
        "controller.quorum.voters",
        "inter.broker.listener.name",
        "num.network.threads",
        "num.io.threads",
        "socket.send.buffer.bytes",
        "socket.receive.buffer.bytes",
        "num.recovery.threads.per.data.dir",
        "offsets.topic.replication.factor",
        "transaction.state.log.replication.factor",
        "transaction.state.log.min.isr",
    ] {
        assert_eq!(
            warnings_for(&loaded.warnings, key),
            1,
            "{key}: {:?}",
            loaded.warnings
        );
    }
    // The controller listener is skipped, with one warning of its own.
    assert_eq!(
        loaded
            .warnings
            .iter()
            .filter(|w| w.contains("CONTROLLER://:9093"))
            .count(),
        1
    );
    // Keys ringbroker reads are not warned about.
    assert_eq!(warnings_for(&loaded.warnings, "log.dirs"), 0);
}

/// Kafka 3.x's ZooKeeper-mode config/server.properties, abridged to its settings.
const KAFKA_ZOOKEEPER_PROPERTIES: &str = "\
broker.id=0
#listeners=PLAINTEXT://:9092
#advertised.listeners=PLAINTEXT://your.host.name:9092
#listener.security.protocol.map=PLAINTEXT:PLAINTEXT,SSL:SSL,SASL_PLAINTEXT:SASL_PLAINTEXT,SASL_SSL:SASL_SSL
num.network.threads=3
num.io.threads=8
socket.send.buffer.bytes=102400
socket.receive.buffer.bytes=102400
socket.request.max.bytes=104857600
log.dirs=/tmp/kafka-logs
num.partitions=1
num.recovery.threads.per.data.dir=1
offsets.topic.replication.factor=1
transaction.state.log.replication.factor=1
transaction.state.log.min.isr=1
#log.flush.interval.messages=10000
#log.flush.interval.ms=1000
log.retention.hours=168
#log.retention.bytes=1073741824
log.segment.bytes=1073741824
log.retention.check.interval.ms=300000
zookeeper.connect=localhost:2181
zookeeper.connection.timeout.ms=18000
group.initial.rebalance.delay.ms=0
";

#[test]
fn stock_kafka_zookeeper_file_is_accepted() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("server.properties");
    std::fs::write(&path, KAFKA_ZOOKEEPER_PROPERTIES).unwrap();
    let loaded = load(&[path.to_str().unwrap(), "--shards", "1"]).unwrap();
    assert_eq!(loaded.config.log_dir, PathBuf::from("/tmp/kafka-logs"));
    assert_eq!(loaded.config.group_initial_rebalance_delay_ms, 0);
    // No listener in the file: ringbroker's loopback default.
    assert_eq!(loaded.config.listener.host, "127.0.0.1");
    assert_eq!(warnings_for(&loaded.warnings, "zookeeper.connect"), 1);
    assert_eq!(
        warnings_for(&loaded.warnings, "zookeeper.connection.timeout.ms"),
        1
    );
    assert_eq!(loaded.warnings.len(), 10, "{:?}", loaded.warnings);
}

#[test]
fn example_file_is_valid_and_warning_free() {
    let path = data("config/server.properties");
    let loaded = load(&["--config", path.to_str().unwrap()]).unwrap();
    assert!(loaded.warnings.is_empty(), "{:?}", loaded.warnings);
    assert_eq!(loaded.config, {
        // The example spells out the defaults, so it must equal them.
        let mut defaults = Config::defaults();
        defaults.shard_count = loaded.config.shard_count;
        defaults
    });
}

#[test]
fn command_line_beats_the_file_and_retention_units_keep_kafkas_order() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("server.properties");
    std::fs::write(
        &path,
        "log.retention.ms=5000\nnum.partitions=3\nringbroker.shards=4\n",
    )
    .unwrap();
    let path = path.to_str().unwrap();
    let loaded = load(&[
        "--config",
        path,
        "--override",
        "log.retention.hours=1",
        "--override",
        "num.partitions=6",
        "--override",
        "num.partitions=7",
    ])
    .unwrap();
    // .ms from the file still wins over .hours from the command line, as in Kafka.
    assert_eq!(loaded.config.log_retention_ms, Some(5000));
    // The last override wins.
    assert_eq!(loaded.config.num_partitions, 7);
    assert_eq!(loaded.config.shard_count, 4);
    let loaded = load(&["--config", path, "--shards", "1"]).unwrap();
    assert_eq!(loaded.config.shard_count, 1);
}

#[test]
fn errors_name_the_key_and_the_value() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("server.properties");
    std::fs::write(&path, "log.segment.bytes=huge\n").unwrap();
    let error = load(&["--config", path.to_str().unwrap()]).unwrap_err();
    let message = error.to_string();
    assert!(
        message.contains("log.segment.bytes") && message.contains("huge"),
        "{message}"
    );
    let error = load(&["--config", "/no/such/file.properties"]).unwrap_err();
    assert!(matches!(error, ConfigError::Read { .. }), "{error}");
    let error = load(&["--override", "log.dirs=/a, /b"]).unwrap_err();
    assert!(
        error.to_string().contains("exactly one log directory"),
        "{error}"
    );
    let error = load(&["--shards", "0"]).unwrap_err();
    assert!(error.to_string().contains("--shards"), "{error}");
}

#[test]
fn properties_reader_handles_continuations_and_escapes_in_files() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("odd.properties");
    std::fs::write(
        &path,
        "! bang comment\n   # indented comment\nlog.dirs = /data/one\\\n    two\nbroker.id:7\nnum.partitions 4\n\
         listeners=PLAINTEXT\\://127.0.0.1\\:9000\n",
    )
    .unwrap();
    let props = read_properties_file(&path).unwrap();
    assert_eq!(props["log.dirs"], "/data/onetwo");
    assert_eq!(props["broker.id"], "7");
    assert_eq!(props["num.partitions"], "4");
    assert_eq!(props["listeners"], "PLAINTEXT://127.0.0.1:9000");
}
