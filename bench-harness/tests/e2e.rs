//! End-to-end tests of ringbench against a real `ringbroker` process: latency accounting through
//! a delaying proxy, report/`.hgrm` consistency, comparison rendering, driver agreement on
//! record counts, worker processes with pinning, consumer groups, backlog mode and `quick`.
//!
//! They need the `ringbroker` binary (built by `cargo build --bin ringbroker`, or by
//! `cargo test --workspace`). Without it every test fails with a message saying so: a missing
//! broker is never a pass.

use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Duration;

use ringbench::broker::{BrokerConfig, BrokerProcess, locate_broker_binary};
use ringbench::compare::compare_files;
use ringbench::metrics::{LatencySummary, decode_histogram};
use ringbench::proxy::DelayProxy;
use ringbench::report::{BrokerInfo, Report, hgrm_value_at_quantile};
use ringbench::run::{PlacementOptions, RunOptions, run};
use ringbench::workload::{Acks, DriverKind, Rate, RecordSize, Workload};

/// The machine has two cores: run the broker-backed tests one at a time so they do not distort
/// each other's timing.
static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|p| p.into_inner())
}

fn broker_binary() -> PathBuf {
    match locate_broker_binary(std::env::var_os("RINGBROKER_BIN").as_deref().map(Path::new)) {
        Ok(p) => p,
        Err(e) => panic!(
            "CANNOT RUN: the ringbroker binary is needed for ringbench's end-to-end tests and was not found \
             ({e:#}). Build it with `cargo build --bin ringbroker` or set RINGBROKER_BIN."
        ),
    }
}

fn start_broker(shards: u32) -> BrokerProcess {
    let config = BrokerConfig {
        name: format!("test-{shards}shard"),
        shards,
        ..Default::default()
    };
    match BrokerProcess::start(&broker_binary(), &config) {
        Ok(b) => b,
        Err(e) => panic!("CANNOT RUN: ringbroker did not start: {e:#}"),
    }
}

fn small_workload(name: &str) -> Workload {
    Workload {
        name: name.to_string(),
        partitions_per_topic: 2,
        record_size: RecordSize::Fixed(256),
        rate: Rate::RecordsPerSecond(2000.0),
        acks: Acks::Leader,
        warmup_s: 0.5,
        duration_s: 2.0,
        stats_interval_s: 1.0,
        fetch_max_wait_ms: 50,
        ..Workload::default()
    }
}

fn options(bootstrap: &str, driver: DriverKind, workload: Workload, out: &Path) -> RunOptions {
    RunOptions {
        bootstrap: bootstrap.to_string(),
        driver,
        workload,
        placement: PlacementOptions::default(),
        output_dir: out.to_path_buf(),
        name: None,
        label: None,
        broker: BrokerInfo {
            bootstrap: bootstrap.to_string(),
            ..Default::default()
        },
        progress: false,
        record_limit: None,
        worker_binary: None,
        repo_dir: PathBuf::from(env!("CARGO_MANIFEST_DIR")),
    }
}

fn summary(s: &Option<LatencySummary>, what: &str) -> LatencySummary {
    s.unwrap_or_else(|| panic!("{what} was not measured"))
}

#[test]
fn report_json_and_hgrm_agree_and_counts_balance() {
    let _guard = serial();
    let mut broker = start_broker(1);
    let out = tempfile::tempdir().unwrap();
    let outcome = run(&options(
        &broker.bootstrap(),
        DriverKind::Native,
        small_workload("native-basic"),
        out.path(),
    ))
    .unwrap();
    broker.stop().unwrap();

    let report = Report::read(&outcome.json_path).unwrap();
    assert_eq!(report.driver.kind, DriverKind::Native);
    assert!(report.driver.detail.contains("compio"));
    assert!(report.environment.kernel.is_some() && report.environment.cpu_count >= 1);
    assert!(!report.intervals.is_empty());
    assert_eq!(report.totals.publish_errors, 0);
    assert!(
        report.totals.published_records > 1000,
        "{:?}",
        report.totals
    );
    assert_eq!(
        report.totals.published_records, report.totals.consumed_records,
        "every acknowledged record is consumed once"
    );
    let achieved = report.aggregate.publish_rate_records_per_s;
    assert!(
        (1500.0..=2500.0).contains(&achieved),
        "publish rate {achieved} for a 2000/s target"
    );

    for (metric, summary) in [
        ("publish_latency", report.aggregate.publish_latency),
        ("publish_delay", report.aggregate.publish_delay),
        ("end_to_end_latency", report.aggregate.end_to_end_latency),
    ] {
        let summary = summary.unwrap_or_else(|| panic!("{metric} not measured"));
        let file = report
            .hgrm_files
            .get(metric)
            .unwrap_or_else(|| panic!("no .hgrm for {metric}"));
        let text = std::fs::read_to_string(outcome.json_path.parent().unwrap().join(file)).unwrap();
        for (name, q) in ringbench::metrics::REPORTED_QUANTILES {
            let from_file = hgrm_value_at_quantile(&text, q).unwrap();
            let in_json = summary.at(name).unwrap();
            assert!(
                (from_file - in_json).abs() < 0.0005,
                "{metric} {name}: json {in_json} vs hgrm {from_file}"
            );
        }
    }
}

#[test]
fn delayed_responses_floor_publish_latency_for_both_drivers() {
    let _guard = serial();
    let mut broker = start_broker(1);
    let upstream = ringbench::client::resolve(&broker.bootstrap()).unwrap();
    let proxy = DelayProxy::start(upstream, Duration::from_millis(5)).unwrap();
    let out = tempfile::tempdir().unwrap();
    for driver in [DriverKind::Native, DriverKind::Rdkafka] {
        let mut w = small_workload(&format!("proxy-{driver}"));
        w.rate = Rate::RecordsPerSecond(500.0);
        let outcome = run(&options(&proxy.bootstrap(), driver, w, out.path())).unwrap();
        let a = &outcome.report.aggregate;
        let publish = summary(&a.publish_latency, "publish latency");
        for (name, _) in ringbench::metrics::REPORTED_QUANTILES {
            let v = publish.at(name).unwrap();
            assert!(
                v >= 5.0,
                "{driver}: publish latency {name} = {v} ms is below the 5 ms the proxy adds"
            );
        }
        let h = decode_histogram(&outcome.report.histograms.publish_latency_us).unwrap();
        assert!(
            h.min() >= 5000,
            "{driver}: fastest acknowledgement {} µs beat the 5 ms delay",
            h.min()
        );
        assert_eq!(
            outcome.report.totals.published_records, outcome.report.totals.consumed_records,
            "{driver}"
        );
    }
    drop(proxy);
    broker.stop().unwrap();
}

#[test]
fn stalled_sends_are_charged_from_intended_send_time() {
    let _guard = serial();
    let mut broker = start_broker(1);
    let upstream = ringbench::client::resolve(&broker.bootstrap()).unwrap();
    let proxy = DelayProxy::start(upstream, Duration::from_millis(5)).unwrap();
    let out = tempfile::tempdir().unwrap();
    // One partition, one request in flight, one 100-byte record per batch: every record costs
    // at least one 5 ms round trip, so at most ~200 records/s can be acknowledged while 1000/s
    // are scheduled. Records wait ever longer for their turn; measured from their intended send
    // time, that wait is latency.
    let w = Workload {
        name: "stall".to_string(),
        partitions_per_topic: 1,
        subscriptions_per_topic: 0,
        record_size: RecordSize::Fixed(100),
        batch_size_bytes: 64,
        linger_ms: 0.0,
        max_in_flight_per_connection: 1,
        rate: Rate::RecordsPerSecond(1000.0),
        acks: Acks::Leader,
        warmup_s: 0.0,
        duration_s: 2.0,
        stats_interval_s: 0.5,
        ..Workload::default()
    };
    let outcome = run(&options(
        &proxy.bootstrap(),
        DriverKind::Native,
        w,
        out.path(),
    ))
    .unwrap();
    drop(proxy);
    broker.stop().unwrap();
    let r = &outcome.report;
    let rate = r.aggregate.publish_rate_records_per_s;
    assert!(
        rate <= 250.0,
        "{rate} records/s acknowledged through a 5 ms, one-in-flight link"
    );
    let publish = summary(&r.aggregate.publish_latency, "publish latency");
    let delay = summary(&r.aggregate.publish_delay, "publish delay");
    // A record scheduled at t waits about t * (1 - 200/1000) by the end: ~1.6 s at t = 2 s.
    assert!(
        publish.max_ms >= 800.0,
        "max publish latency {} ms: the stall was hidden",
        publish.max_ms
    );
    assert!(
        publish.p50_ms >= 100.0,
        "median publish latency {} ms: the stall was hidden",
        publish.p50_ms
    );
    assert!(
        delay.p50_ms >= 50.0,
        "median publish delay {} ms does not show the stall",
        delay.p50_ms
    );
    let medians: Vec<f64> = r
        .intervals
        .iter()
        .filter_map(|i| i.publish_latency.map(|s| s.p50_ms))
        .collect();
    assert!(medians.len() >= 3, "{medians:?}");
    assert!(
        medians.last().unwrap() > medians.first().unwrap(),
        "latency must grow while the stall lasts: {medians:?}"
    );
}

#[test]
fn compare_renders_two_reports() {
    let _guard = serial();
    let mut broker = start_broker(1);
    let out = tempfile::tempdir().unwrap();
    let mut paths = Vec::new();
    for acks in [Acks::Leader, Acks::All] {
        let w = Workload {
            acks,
            ..small_workload(&format!("acks-{acks}"))
        };
        paths.push(
            run(&options(
                &broker.bootstrap(),
                DriverKind::Native,
                w,
                out.path(),
            ))
            .unwrap()
            .json_path,
        );
    }
    broker.stop().unwrap();
    let page = compare_files(&paths, &out.path().join("cmp")).unwrap();
    let html = std::fs::read_to_string(&page).unwrap();
    assert!(
        html.contains("acks-1") && html.contains("acks-all"),
        "both runs are labelled"
    );
    assert!(html.contains("<svg") && html.contains("Differences"));
    assert!(
        !html.contains("<script") && !html.contains("https://"),
        "the page must be self-contained"
    );
    for svg in [
        "publish-latency.svg",
        "end-to-end-latency.svg",
        "publish-delay.svg",
        "throughput.svg",
    ] {
        let text = std::fs::read_to_string(out.path().join("cmp").join(svg)).unwrap();
        assert!(text.contains("<polyline"), "{svg} has no curve");
    }
}

#[test]
fn native_and_rdkafka_drivers_agree_on_record_counts() {
    let _guard = serial();
    let mut broker = start_broker(2);
    let out = tempfile::tempdir().unwrap();
    let mut counts = Vec::new();
    for driver in [DriverKind::Native, DriverKind::Rdkafka] {
        let mut opts = options(
            &broker.bootstrap(),
            driver,
            small_workload(&format!("count-{driver}")),
            out.path(),
        );
        opts.workload.duration_s = 10.0;
        opts.record_limit = Some(3000);
        let r = run(&opts).unwrap().report;
        assert_eq!(r.totals.publish_errors, 0, "{driver}");
        counts.push((
            driver,
            r.totals.published_records,
            r.totals.consumed_records,
        ));
    }
    broker.stop().unwrap();
    for (driver, published, consumed) in &counts {
        assert_eq!((*published, *consumed), (3000, 3000), "{driver}");
    }
}

#[test]
fn separate_processes_with_pinning_and_a_consumer_group() {
    let _guard = serial();
    let mut broker = start_broker(1);
    let out = tempfile::tempdir().unwrap();
    let mut opts = options(
        &broker.bootstrap(),
        DriverKind::Native,
        small_workload("separate"),
        out.path(),
    );
    opts.placement = PlacementOptions {
        separate_processes: true,
        producer_cpus: vec![0],
        consumer_cpus: vec![0],
        broker_cpus: Vec::new(),
    };
    opts.worker_binary = Some(PathBuf::from(env!("CARGO_BIN_EXE_ringbench")));
    let r = run(&opts).unwrap().report;
    assert_eq!(r.placement.mode, "separate-processes");
    assert_eq!(r.placement.producer_cpus, vec![0]);
    assert!(r.totals.published_records > 1000);
    assert_eq!(r.totals.published_records, r.totals.consumed_records);
    assert!(r.aggregate.end_to_end_latency.is_some());

    let mut w = small_workload("group");
    w.consumer_group = true;
    w.consumers_per_subscription = 2;
    w.warmup_s = 1.0;
    let r = run(&options(
        &broker.bootstrap(),
        DriverKind::Rdkafka,
        w,
        out.path(),
    ))
    .unwrap()
    .report;
    broker.stop().unwrap();
    assert!(r.totals.published_records > 1000);
    assert_eq!(
        r.totals.published_records, r.totals.consumed_records,
        "the group reads every record once"
    );
}

#[test]
fn backlog_mode_builds_then_drains() {
    let _guard = serial();
    let mut broker = start_broker(1);
    let out = tempfile::tempdir().unwrap();
    let mut w = small_workload("backlog");
    w.backlog_bytes = 256 * 1024;
    w.warmup_s = 0.0;
    w.duration_s = 20.0;
    let r = run(&options(
        &broker.bootstrap(),
        DriverKind::Native,
        w,
        out.path(),
    ))
    .unwrap()
    .report;
    broker.stop().unwrap();
    let b = r.backlog.expect("backlog section");
    assert!(b.built_bytes >= 256 * 1024);
    let drain_s = b.drain_s.expect("the backlog drained");
    assert!(drain_s < 15.0);
    assert!(b.drain_rate_records_per_s.unwrap() > 0.0);
    assert_eq!(r.totals.published_records, r.totals.consumed_records);
}

#[test]
fn quick_command_prints_the_table() {
    let _guard = serial();
    let binary = broker_binary();
    let out = tempfile::tempdir().unwrap();
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_ringbench"))
        .args([
            "quick",
            "--quiet",
            "--duration-s",
            "2",
            "--warmup-s",
            "0.5",
            "--broker-bin",
        ])
        .arg(&binary)
        .arg("--output-dir")
        .arg(out.path())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "quick failed: {stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    for needle in [
        "publish latency",
        "end-to-end latency",
        "publish rate",
        "report:",
    ] {
        assert!(stdout.contains(needle), "missing {needle:?} in:\n{stdout}");
    }
}

/// `ringbench run` takes core lists from the command line (`--cpus 0`, `--producer-cpus 0-0`)
/// and records the placement in its report: the flags people pin load with on a small machine.
#[test]
fn run_command_pins_load_from_cpu_list_flags() {
    let _guard = serial();
    let broker = start_broker(1);
    let out = tempfile::tempdir().unwrap();
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_ringbench"))
        .args(["run", "--quiet", "--bootstrap", &broker.bootstrap()])
        .args([
            "--cpus",
            "0",
            "--producer-cpus",
            "0-0",
            "--consumer-cpus",
            "0,0",
        ])
        .args(["--records", "200", "--rate", "1000", "--partitions", "1"])
        .args([
            "--warmup-s",
            "0",
            "--duration-s",
            "2",
            "--report-name",
            "pinned",
        ])
        .arg("--output-dir")
        .arg(out.path())
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "run failed: {}\n{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    let report: Report =
        serde_json::from_str(&std::fs::read_to_string(out.path().join("pinned.json")).unwrap())
            .unwrap();
    assert_eq!(report.placement.producer_cpus, vec![0]);
    assert_eq!(report.placement.consumer_cpus, vec![0, 0]);
    assert_eq!(report.totals.published_records, 200);

    // A malformed list is a clear error and a non-zero exit, not a panic.
    let bad = std::process::Command::new(env!("CARGO_BIN_EXE_ringbench"))
        .args(["run", "--cpus", "3-1"])
        .output()
        .unwrap();
    assert_eq!(bad.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&bad.stderr).contains("bad cpu range"));
}

/// Offered far more than it can send, the native producer keeps publishing in every interval
/// (it used to livelock once a batch's linger expired behind a full in-flight window: the loop
/// never yielded, so responses were never read and the publish rate fell to zero).
#[test]
fn native_producer_keeps_publishing_when_overloaded() {
    let _guard = serial();
    let mut broker = start_broker(1);
    let out = tempfile::tempdir().unwrap();
    let mut workload = small_workload("overload");
    workload.record_size = RecordSize::Fixed(100);
    workload.rate = Rate::RecordsPerSecond(5_000_000.0);
    workload.warmup_s = 0.0;
    workload.duration_s = 4.0;
    let r = run(&options(
        &broker.bootstrap(),
        DriverKind::Native,
        workload,
        out.path(),
    ))
    .unwrap()
    .report;
    broker.stop().unwrap();
    assert!(r.intervals.len() >= 3, "{} intervals", r.intervals.len());
    for interval in &r.intervals {
        assert!(
            interval.published_records > 0,
            "no record acknowledged in the interval starting at {} s",
            interval.start_s
        );
    }
    assert_eq!(r.totals.publish_errors, 0);
}

/// With batch.size equal to the broker's message.max.bytes (1 MiB) and 16 KiB records, the
/// native producer closes each batch before a record would push it past batch.size, as Kafka's
/// producer does, so the broker accepts every batch (it used to seal just over the limit and get
/// MESSAGE_TOO_LARGE for each one).
#[test]
fn native_batches_stay_within_batch_size() {
    let _guard = serial();
    let mut broker = start_broker(1);
    let out = tempfile::tempdir().unwrap();
    let mut workload = small_workload("big-batches");
    workload.record_size = RecordSize::Fixed(16 * 1024);
    workload.batch_size_bytes = 1024 * 1024;
    workload.linger_ms = 50.0;
    workload.rate = Rate::RecordsPerSecond(2000.0);
    workload.duration_s = 5.0;
    let mut opts = options(
        &broker.bootstrap(),
        DriverKind::Native,
        workload,
        out.path(),
    );
    opts.record_limit = Some(400);
    let r = run(&opts).unwrap().report;
    broker.stop().unwrap();
    assert_eq!(r.totals.publish_errors, 0);
    assert_eq!(r.totals.published_records, 400);
    assert_eq!(r.totals.consumed_records, 400);
}

/// `--records N` ends the measured phase once N records are acknowledged (and consumed), and the
/// publish rate is averaged over the time the N records took, not over the `duration_s` cap; a
/// run this small is flagged as having measured page-cache absorption only.
#[test]
fn records_limit_ends_the_measured_phase_and_rates_cover_the_produce_span() {
    let _guard = serial();
    let mut broker = start_broker(1);
    let out = tempfile::tempdir().unwrap();
    let workload = Workload {
        rate: Rate::RecordsPerSecond(20_000.0),
        warmup_s: 0.0,
        duration_s: 60.0,
        ..small_workload("records-limit")
    };
    let mut opts = options(
        &broker.bootstrap(),
        DriverKind::Native,
        workload,
        out.path(),
    );
    opts.record_limit = Some(10_000);
    let started = std::time::Instant::now();
    let outcome = run(&opts).unwrap();
    let wall_s = started.elapsed().as_secs_f64();
    broker.stop().unwrap();
    let r = Report::read(&outcome.json_path).unwrap();
    let produce_s = r
        .produce_s
        .expect("the records were produced within the cap");
    assert!(
        produce_s > 0.3 && produce_s < 5.0,
        "produce took {produce_s} s"
    );
    assert!(
        r.aggregate.duration_s < 15.0,
        "measured {} s",
        r.aggregate.duration_s
    );
    assert!(wall_s < 40.0, "the run took {wall_s} s of a 60 s cap");
    let measured = r.aggregate.published_records;
    assert!(
        (10_000..10_000 + 2048).contains(&measured),
        "{measured} records measured"
    );
    let rate = r.aggregate.publish_rate_records_per_s;
    assert!(
        // Averaged over the 60 s cap it would be about 170 records/s.
        (rate - measured as f64 / produce_s).abs() < 1.0 && rate > 2_000.0,
        "publish rate {rate} over {produce_s} s"
    );
    let volume = r.write_volume.expect("dirty thresholds read from /proc");
    assert!(volume.page_cache_absorption_only);
    assert!(volume.written_to_dirty_threshold < 0.1);
    assert!(
        r.notes.iter().any(|n| n.contains("page-cache absorption")),
        "{:?}",
        r.notes
    );
}
