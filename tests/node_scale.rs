//! Partition scale and the node's lifecycle, through librdkafka against a real `ringbroker` process:
//! thousands of partitions under a small open-files limit, the partition budget, all-or-nothing topic
//! creation, and restarts after SIGTERM and SIGKILL.

mod support;

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use rdkafka::Offset;
use rdkafka::admin::{AdminOptions, NewTopic, TopicReplication};
use rdkafka::types::RDKafkaErrorCode;
use support::kafka;

/// A broker process started by these tests, optionally under an open-files limit (soft and hard,
/// so the broker's own raise to the hard limit cannot lift it).
struct ScaleBroker {
    child: Option<Child>,
    port: u16,
    data_dir: PathBuf,
}

impl ScaleBroker {
    fn start(data_dir: &Path, nofile_limit: Option<u64>, overrides: &[&str]) -> ScaleBroker {
        Self::start_logging(data_dir, nofile_limit, overrides, None)
    }

    /// `start`, with the broker's log written to `log_path` when given.
    fn start_logging(
        data_dir: &Path,
        nofile_limit: Option<u64>,
        overrides: &[&str],
        log_path: Option<&Path>,
    ) -> ScaleBroker {
        let (port, listeners) = support::bind_port_range(1);
        drop(listeners);
        Self::launch(data_dir, port, nofile_limit, overrides, log_path)
    }

    fn launch(
        data_dir: &Path,
        port: u16,
        nofile_limit: Option<u64>,
        overrides: &[&str],
        log_path: Option<&Path>,
    ) -> ScaleBroker {
        let mut command = Command::new(env!("CARGO_BIN_EXE_ringbroker"));
        command
            .args(["--shards", "1", "--override"])
            .arg(format!("listeners=PLAINTEXT://127.0.0.1:{port}"))
            .arg("--override")
            .arg(format!("log.dirs={}", data_dir.display()))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(match log_path {
                Some(path) => Stdio::from(std::fs::File::create(path).expect("broker log file")),
                None if std::env::var_os("RINGBROKER_TEST_LOG").is_some() => Stdio::inherit(),
                None => Stdio::null(),
            })
            .env("NO_COLOR", "1");
        for extra in overrides {
            command.arg("--override").arg(extra);
        }
        if let Some(limit) = nofile_limit {
            // SAFETY: setrlimit is async-signal-safe; the closure touches nothing else.
            unsafe {
                command.pre_exec(move || {
                    let rlimit = libc::rlimit {
                        rlim_cur: limit,
                        rlim_max: limit,
                    };
                    if libc::setrlimit(libc::RLIMIT_NOFILE, &rlimit) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
        }
        let child = command.spawn().expect("start ringbroker");
        ScaleBroker {
            child: Some(child),
            port,
            data_dir: data_dir.to_path_buf(),
        }
    }

    fn bootstrap(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// Waits until the broker answers Metadata through librdkafka (or panics after `timeout`).
    fn wait_serving(&mut self, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        let consumer = kafka::consumer(&self.bootstrap(), &[]);
        loop {
            if let Some(Ok(Some(status))) = self.child.as_mut().map(Child::try_wait) {
                panic!("broker exited during startup: {status}");
            }
            use rdkafka::consumer::Consumer;
            if consumer
                .fetch_metadata(None, Duration::from_millis(500))
                .is_ok()
            {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "broker did not serve within {timeout:?}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// SIGTERM; returns the exit code and how long the exit took.
    fn stop(&mut self) -> (Option<i32>, Duration) {
        let mut child = self.child.take().expect("running");
        let started = Instant::now();
        // SAFETY: signalling our own child.
        unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        let deadline = started + Duration::from_secs(60);
        while Instant::now() < deadline {
            if let Ok(Some(status)) = child.try_wait() {
                return (status.code(), started.elapsed());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = child.kill();
        let _ = child.wait();
        panic!("broker did not stop within 60 s of SIGTERM");
    }

    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for ScaleBroker {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Creates `name` with `partitions` partitions; returns librdkafka's error code on refusal.
fn create(
    bootstrap: &str,
    name: &str,
    partitions: i32,
    timeout: Duration,
) -> Result<(), RDKafkaErrorCode> {
    // librdkafka caps every request at socket.timeout.ms (60 s by default); thousands of partitions
    // on a loaded debug build may take longer.
    let admin: rdkafka::admin::AdminClient<rdkafka::client::DefaultClientContext> =
        rdkafka::config::ClientConfig::new()
            .set("bootstrap.servers", bootstrap)
            .set("socket.timeout.ms", "300000")
            .create()
            .expect("create admin client");
    let topic = NewTopic::new(name, partitions, TopicReplication::Fixed(1));
    let options = AdminOptions::new()
        .operation_timeout(Some(timeout))
        .request_timeout(Some(timeout));
    let results = futures_executor::block_on(admin.create_topics([&topic], &options))
        .expect("create_topics request");
    results
        .into_iter()
        .next()
        .expect("one result")
        .map(|_| ())
        .map_err(|(_, code)| code)
}

/// Produces `count` records to each listed partition and returns the values sent.
fn produce_to(bootstrap: &str, topic: &str, partitions: &[i32], tag: &str) {
    let producer = kafka::producer(bootstrap, &[]);
    for &partition in partitions {
        let records = kafka::records(3, &format!("{tag}-p{partition}"));
        let reports = kafka::produce_all(&producer, topic, Some(partition), &records);
        assert!(reports.iter().all(|(at, _)| *at == partition));
    }
}

/// Reads every record of `partition` from the beginning and returns the values.
fn read_partition(bootstrap: &str, topic: &str, partition: i32, expected: usize) -> Vec<Vec<u8>> {
    use rdkafka::TopicPartitionList;
    use rdkafka::consumer::Consumer;
    let consumer = kafka::consumer(bootstrap, &[]);
    let mut assignment = TopicPartitionList::new();
    assignment
        .add_partition_offset(topic, partition, Offset::Beginning)
        .unwrap();
    consumer.assign(&assignment).unwrap();
    kafka::poll_records(&consumer, expected, Duration::from_secs(20))
        .into_iter()
        .map(|record| record.value)
        .collect()
}

/// Issue 10: with the open-files limit at 1024 (soft and hard), a broker holding 5,000 partitions
/// starts, creates them, serves produce and fetch on partitions spread over the range, shuts down
/// cleanly, restarts and still serves all of them, because segment descriptors come from the bounded
/// per-shard cache instead of being held per segment.
#[test]
fn five_thousand_partitions_are_served_under_a_1024_descriptor_limit() {
    const PARTITIONS: i32 = 5_000;
    let temp = tempfile::tempdir().unwrap();
    let data_dir = temp.path().join("data");
    // The shutdown budget is proven elsewhere; a loaded debug build needs more than the default to
    // close 5,000 partitions.
    let overrides = ["ringbroker.shutdown.timeout.ms=60000"];
    let mut broker = ScaleBroker::start(&data_dir, Some(1024), &overrides);
    broker.wait_serving(Duration::from_secs(30));
    create(
        &broker.bootstrap(),
        "wide",
        PARTITIONS,
        Duration::from_secs(280),
    )
    .expect("create 5,000 partitions");
    let probes = [0, 1_234, 2_500, PARTITIONS - 1];
    produce_to(&broker.bootstrap(), "wide", &probes, "first");
    for &partition in &probes {
        let values = read_partition(&broker.bootstrap(), "wide", partition, 3);
        assert_eq!(values.len(), 3, "partition {partition} before restart");
    }
    let (code, _) = broker.stop();
    assert_eq!(code, Some(0), "clean shutdown");

    let mut broker = ScaleBroker::start(&broker.data_dir.clone(), Some(1024), &overrides);
    broker.wait_serving(Duration::from_secs(60));
    produce_to(&broker.bootstrap(), "wide", &probes, "second");
    for &partition in &probes {
        let values = read_partition(&broker.bootstrap(), "wide", partition, 6);
        assert_eq!(values.len(), 6, "partition {partition} after restart");
        assert!(values[0].starts_with(format!("first-p{partition}").as_bytes()));
    }
    let (code, _) = broker.stop();
    assert_eq!(code, Some(0), "clean shutdown after restart");
}

/// The partition directories of `topic` in a data dir.
fn partition_dirs(data_dir: &Path, topic: &str) -> Vec<String> {
    let mut found: Vec<String> = std::fs::read_dir(data_dir)
        .map(|entries| {
            entries
                .filter_map(Result::ok)
                .map(|entry| entry.file_name().to_string_lossy().into_owned())
                .filter(|name| {
                    name.rsplit_once('-').is_some_and(|(prefix, index)| {
                        prefix == topic && index.parse::<i32>().is_ok()
                    })
                })
                .collect()
        })
        .unwrap_or_default();
    found.sort();
    found
}

fn topic_names(bootstrap: &str) -> Vec<String> {
    use rdkafka::consumer::Consumer;
    let consumer = kafka::consumer(bootstrap, &[]);
    let metadata = consumer
        .fetch_metadata(None, Duration::from_secs(10))
        .expect("metadata");
    metadata
        .topics()
        .iter()
        .map(|topic| topic.name().to_string())
        .collect()
}

/// Issue 10: a CreateTopics beyond `ringbroker.max.partitions.per.shard` is refused up front with
/// INVALID_PARTITIONS and creates nothing; topics that fit the budget exactly are created; a
/// CreateTopics validate-only run is refused the same way.
#[test]
fn creation_beyond_the_partition_budget_is_refused_and_creates_nothing() {
    let temp = tempfile::tempdir().unwrap();
    let data_dir = temp.path().join("data");
    let mut broker =
        ScaleBroker::start(&data_dir, None, &["ringbroker.max.partitions.per.shard=50"]);
    broker.wait_serving(Duration::from_secs(20));
    let bootstrap = broker.bootstrap();
    create(&bootstrap, "first", 30, Duration::from_secs(20)).expect("30 of 50 fits");
    assert_eq!(
        create(&bootstrap, "second", 30, Duration::from_secs(20)),
        Err(RDKafkaErrorCode::InvalidPartitions)
    );
    assert!(
        partition_dirs(&data_dir, "second").is_empty(),
        "nothing created"
    );
    assert!(!topic_names(&bootstrap).contains(&"second".to_string()));
    let admin = kafka::admin(&bootstrap);
    let validate = AdminOptions::new().validate_only(true);
    let results = futures_executor::block_on(admin.create_topics(
        [&NewTopic::new("second", 21, TopicReplication::Fixed(1))],
        &validate,
    ))
    .unwrap();
    assert!(matches!(
        results[0],
        Err((_, RDKafkaErrorCode::InvalidPartitions))
    ));
    create(&bootstrap, "third", 20, Duration::from_secs(20)).expect("exactly the budget fits");
    assert_eq!(partition_dirs(&data_dir, "third").len(), 20);
    let (code, _) = broker.stop();
    assert_eq!(code, Some(0));
}

/// Issue 10: a creation that fails midway (one partition directory cannot be made) removes every
/// partition it made and answers KAFKA_STORAGE_ERROR; once the cause is gone the same topic can be
/// created.
#[test]
fn a_creation_failing_midway_removes_what_it_made() {
    let temp = tempfile::tempdir().unwrap();
    let data_dir = temp.path().join("data");
    std::fs::create_dir_all(&data_dir).unwrap();
    // A plain file where partition 7's directory must go makes that partition's open fail.
    std::fs::write(data_dir.join("half-7"), b"in the way").unwrap();
    let mut broker = ScaleBroker::start(&data_dir, None, &[]);
    broker.wait_serving(Duration::from_secs(20));
    let bootstrap = broker.bootstrap();
    assert_eq!(
        create(&bootstrap, "half", 16, Duration::from_secs(20)),
        Err(RDKafkaErrorCode::KafkaStorageError)
    );
    let left: Vec<String> = std::fs::read_dir(&data_dir)
        .unwrap()
        .filter_map(Result::ok)
        .map(|entry| entry.file_name().to_string_lossy().into_owned())
        .filter(|name| name.starts_with("half"))
        .collect();
    assert_eq!(
        left,
        vec!["half-7".to_string()],
        "only the obstacle is left"
    );
    assert!(!topic_names(&bootstrap).contains(&"half".to_string()));
    std::fs::remove_file(data_dir.join("half-7")).unwrap();
    create(&bootstrap, "half", 16, Duration::from_secs(20)).expect("created once possible");
    produce_to(&bootstrap, "half", &[7], "after");
    let (code, _) = broker.stop();
    assert_eq!(code, Some(0));
}

/// Issue 10: a crash in the middle of a creation (simulated by the state it leaves on disk: the
/// creation marker and some partition directories, no definition) is undone at the next start: the
/// broker starts, never serves the half-created topic, and the name can be created again.
#[test]
fn a_creation_interrupted_by_a_crash_is_undone_at_the_next_start() {
    let temp = tempfile::tempdir().unwrap();
    let data_dir = temp.path().join("data");
    let mut broker = ScaleBroker::start(&data_dir, None, &[]);
    broker.wait_serving(Duration::from_secs(20));
    create(&broker.bootstrap(), "whole", 4, Duration::from_secs(20)).unwrap();
    produce_to(&broker.bootstrap(), "whole", &[1], "kept");
    broker.kill();
    // What a crash after the first partitions were made leaves behind.
    let topics_dir = data_dir.join(".ringbroker-topics");
    std::fs::write(
        topics_dir.join("torn.creating"),
        "topic.id=6f1c2a6e-3b55-4a36-9d5e-111111111111\npartitions=8\n",
    )
    .unwrap();
    for partition in 0..3 {
        let dir = data_dir.join(format!("torn-{partition}"));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("00000000000000000000.log"), b"").unwrap();
    }
    let mut broker = ScaleBroker::start(&data_dir, None, &[]);
    broker.wait_serving(Duration::from_secs(20));
    let bootstrap = broker.bootstrap();
    assert!(partition_dirs(&data_dir, "torn").is_empty());
    assert!(!topics_dir.join("torn.creating").exists());
    let names = topic_names(&bootstrap);
    assert!(!names.contains(&"torn".to_string()));
    assert!(
        names.contains(&"whole".to_string()),
        "other topics are untouched"
    );
    assert_eq!(read_partition(&bootstrap, "whole", 1, 3).len(), 3);
    create(&bootstrap, "torn", 8, Duration::from_secs(20)).expect("the name is free again");
    let (code, _) = broker.stop();
    assert_eq!(code, Some(0));
}

/// A size-limited tmpfs mounted for one test and detached when dropped.
struct SmallFilesystem {
    path: PathBuf,
}

impl SmallFilesystem {
    /// Mounts a tmpfs of `size_bytes` at `path`; `None` when the test may not mount (not root).
    fn mount(path: &Path, size_bytes: u64) -> Option<SmallFilesystem> {
        use std::ffi::CString;
        std::fs::create_dir_all(path).unwrap();
        let target = CString::new(path.as_os_str().as_encoded_bytes()).unwrap();
        let options = CString::new(format!("size={size_bytes}")).unwrap();
        // SAFETY: mount with valid NUL-terminated strings.
        let mounted = unsafe {
            libc::mount(
                c"tmpfs".as_ptr(),
                target.as_ptr(),
                c"tmpfs".as_ptr(),
                0,
                options.as_ptr().cast(),
            )
        };
        (mounted == 0).then(|| SmallFilesystem {
            path: path.to_path_buf(),
        })
    }
}

impl Drop for SmallFilesystem {
    fn drop(&mut self) {
        use std::ffi::CString;
        let target = CString::new(self.path.as_os_str().as_encoded_bytes()).unwrap();
        // SAFETY: unmounting what `mount` mounted.
        unsafe { libc::umount2(target.as_ptr(), libc::MNT_DETACH) };
    }
}

/// Issue 10: a full log dir answers KAFKA_STORAGE_ERROR (librdkafka's delivery fails) and is logged
/// once at ERROR naming the path, errno and partition, however many appends it refuses; once space
/// is freed the next append succeeds and "log dir writable again" is logged once. Needs to mount a
/// small tmpfs, so it runs as root (the test environment) and says so when it cannot.
#[test]
fn a_full_disk_is_logged_once_when_it_starts_and_once_when_it_clears() {
    let temp = tempfile::tempdir().unwrap();
    let Some(filesystem) = SmallFilesystem::mount(&temp.path().join("small"), 4 << 20) else {
        eprintln!("SKIPPED: mounting a tmpfs needs root");
        return;
    };
    let data_dir = filesystem.path.join("data");
    let log_path = temp.path().join("broker.log");
    let mut broker = ScaleBroker::start_logging(&data_dir, None, &[], Some(&log_path));
    broker.wait_serving(Duration::from_secs(20));
    let bootstrap = broker.bootstrap();
    create(&bootstrap, "full", 2, Duration::from_secs(20)).unwrap();
    produce_to(&bootstrap, "full", &[0], "before");
    // Fill the file system to the last block.
    let filler = filesystem.path.join("filler");
    {
        use std::io::Write;
        let mut file = std::fs::File::create(&filler).unwrap();
        let block = vec![0u8; 64 * 1024];
        while file.write_all(&block).is_ok() {}
        let small = [0u8; 512];
        while file.write_all(&small).is_ok() {}
    }
    let producer = kafka::producer(
        &bootstrap,
        &[("message.timeout.ms", "3000"), ("linger.ms", "0")],
    );
    use rdkafka::producer::{BaseRecord, Producer};
    for partition in [0, 1, 0] {
        let value = vec![7u8; 64 * 1024];
        producer
            .send(
                BaseRecord::<(), Vec<u8>>::to("full")
                    .payload(&value)
                    .partition(partition),
            )
            .map_err(|(error, _)| error)
            .unwrap();
        producer.flush(Duration::from_secs(10)).ok();
    }
    let reports = producer.context().reports.lock().unwrap().clone();
    assert_eq!(reports.len(), 3);
    assert!(
        reports.iter().all(Result::is_err),
        "every append on the full disk fails: {reports:?}"
    );
    std::fs::remove_file(&filler).unwrap();
    produce_to(&bootstrap, "full", &[1], "after");
    let (code, _) = broker.stop();
    assert_eq!(code, Some(0));
    let log = std::fs::read_to_string(&log_path).unwrap();
    let started: Vec<&str> = log
        .lines()
        .filter(|line| line.contains("log dir not writable"))
        .collect();
    assert_eq!(
        started.len(),
        1,
        "one line when the state starts: {started:?}"
    );
    assert!(started[0].contains("ERROR"));
    assert!(started[0].contains("errno=28") && started[0].contains("ENOSPC"));
    assert!(started[0].contains("topic=\"full\"") || started[0].contains("topic=full"));
    assert!(started[0].contains("partition="));
    assert!(
        started[0].contains(&data_dir.display().to_string()),
        "names the path"
    );
    let cleared = log
        .lines()
        .filter(|line| line.contains("log dir writable again"))
        .count();
    assert_eq!(cleared, 1, "one line when it clears");
}

/// Issue 10: SIGKILL while librdkafka clients are connected and producing, then an immediate
/// restart on the same port (as a supervisor does), a few times in a row. The restart waits out
/// EADDRINUSE while the kernel tears down the dead broker's io_uring instances; the same clients
/// reconnect, every acknowledged record is still there, and producing goes on.
#[test]
fn sigkill_with_connected_clients_then_an_immediate_restart_on_the_same_port() {
    const ROUNDS: usize = 3;
    let temp = tempfile::tempdir().unwrap();
    let data_dir = temp.path().join("data");
    let (port, listeners) = support::bind_port_range(1);
    drop(listeners);
    let mut broker = ScaleBroker::launch(&data_dir, port, None, &[], None);
    broker.wait_serving(Duration::from_secs(20));
    let bootstrap = broker.bootstrap();
    create(&bootstrap, "kill", 4, Duration::from_secs(20)).unwrap();
    let producer = kafka::producer(&bootstrap, &[("message.timeout.ms", "30000")]);
    let consumer = kafka::consumer(&bootstrap, &[]);
    {
        use rdkafka::TopicPartitionList;
        use rdkafka::consumer::Consumer;
        let mut assignment = TopicPartitionList::new();
        assignment
            .add_partition_offset("kill", 0, Offset::Beginning)
            .unwrap();
        consumer.assign(&assignment).unwrap();
    }
    let mut acknowledged = 0;
    for round in 0..ROUNDS {
        let records = kafka::records(5, &format!("round{round}"));
        kafka::produce_all(&producer, "kill", Some(0), &records);
        acknowledged += records.len();
        // The consumer is connected and fetching when the broker dies.
        kafka::poll_records(&consumer, 1, Duration::from_millis(500));
        broker.kill();
        let started = Instant::now();
        broker = ScaleBroker::launch(&data_dir, port, None, &[], None);
        broker.wait_serving(Duration::from_secs(30));
        eprintln!(
            "round {round}: serving again {:?} after SIGKILL",
            started.elapsed()
        );
    }
    let records = kafka::records(5, "last");
    kafka::produce_all(&producer, "kill", Some(0), &records);
    acknowledged += records.len();
    let values = read_partition(&broker.bootstrap(), "kill", 0, acknowledged);
    assert_eq!(
        values.len(),
        acknowledged,
        "every acknowledged record survives"
    );
    let (code, _) = broker.stop();
    assert_eq!(code, Some(0));
}

/// Issue 10: a SIGTERM whose shutdown cannot mark every partition clean within
/// `ringbroker.shutdown.timeout.ms` (here 0 ms) exits non-zero with a log line naming the
/// partitions; the next start recovers them and serves every acknowledged record.
#[test]
fn a_shutdown_that_cannot_mark_every_partition_clean_exits_non_zero_naming_them() {
    let temp = tempfile::tempdir().unwrap();
    let data_dir = temp.path().join("data");
    let log_path = temp.path().join("broker.log");
    let mut broker = ScaleBroker::start_logging(
        &data_dir,
        None,
        &["ringbroker.shutdown.timeout.ms=0"],
        Some(&log_path),
    );
    broker.wait_serving(Duration::from_secs(20));
    create(&broker.bootstrap(), "late", 200, Duration::from_secs(30)).unwrap();
    produce_to(&broker.bootstrap(), "late", &[0, 199], "kept");
    let (code, _) = broker.stop();
    assert_ne!(code, Some(0), "not every partition was marked clean");
    let log = std::fs::read_to_string(&log_path).unwrap();
    assert!(
        log.lines().any(|line| line.contains("ERROR")
            && line.contains("not marked clean")
            && line.contains("late-")),
        "a line names the partitions not marked clean"
    );
    let mut broker = ScaleBroker::start(&data_dir, None, &[]);
    broker.wait_serving(Duration::from_secs(30));
    for partition in [0, 199] {
        assert_eq!(
            read_partition(&broker.bootstrap(), "late", partition, 3).len(),
            3
        );
    }
    let (code, _) = broker.stop();
    assert_eq!(
        code,
        Some(0),
        "with the default timeout every partition is marked clean"
    );
}
