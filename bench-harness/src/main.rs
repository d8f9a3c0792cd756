//! ringbench: the Kafka-protocol load generator and latency harness (command-line entry point).

use std::path::PathBuf;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};

use ringbench::report::{BrokerInfo, summary_table};
use ringbench::run::{PlacementOptions, RunOptions, run};
use ringbench::workload::{Acks, Compression, DriverKind, Keys, Rate, RecordSize, Workload};
use ringbench::{broker, ceiling, compare, hosts, matrix, proxy};

#[derive(Parser)]
#[command(
    name = "ringbench",
    version,
    about = "Open-loop Kafka-protocol load generator and latency harness"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run a workload against a running broker and write a report.
    Run(RunArgs),
    /// Start a ringbroker, run a 10-second produce + consume workload, print the table.
    Quick(QuickArgs),
    /// For each broker configuration of a suite, start ringbroker, run the workloads, compare.
    Matrix(MatrixArgs),
    /// Compare reports: a self-contained HTML page plus SVG plots.
    Compare(CompareArgs),
    /// Measure this machine's limits: loopback TCP, request-response latency, disk + fdatasync.
    Ceiling(CeilingArgs),
    /// Front a broker with a proxy that delays every response (emulates a network hop).
    Proxy(ProxyArgs),
    /// Internal: a worker process of a separate-process run (reads its assignment on stdin).
    #[command(hide = true)]
    Worker,
}

/// Workload fields that override the TOML file (or the defaults).
#[derive(Args, Debug, Default, Clone)]
struct WorkloadFlags {
    /// Workload TOML file; flags override its fields.
    #[arg(long)]
    workload: Option<PathBuf>,
    #[arg(long)]
    name: Option<String>,
    #[arg(long)]
    topics: Option<u32>,
    #[arg(long)]
    partitions: Option<u32>,
    #[arg(long)]
    producers: Option<u32>,
    /// Subscriptions per topic (0 = produce only).
    #[arg(long)]
    subscriptions: Option<u32>,
    #[arg(long)]
    consumers: Option<u32>,
    /// Consume through a consumer group instead of a manual assignment.
    #[arg(long)]
    consumer_group: Option<bool>,
    /// Record value size: 1024, 1KiB, uniform:100-1000.
    #[arg(long)]
    record_size: Option<RecordSize>,
    /// none, random or distinct:N.
    #[arg(long)]
    keys: Option<Keys>,
    #[arg(long)]
    headers: Option<u32>,
    /// Records/s (50000), MB/s (100MB/s), or 0/max to search the maximum sustainable rate.
    #[arg(long)]
    rate: Option<Rate>,
    #[arg(long)]
    batch_size: Option<u32>,
    #[arg(long)]
    linger_ms: Option<f64>,
    /// 0, 1 or all.
    #[arg(long)]
    acks: Option<Acks>,
    /// none, gzip, snappy, lz4, zstd.
    #[arg(long)]
    compression: Option<Compression>,
    #[arg(long)]
    warmup_s: Option<f64>,
    #[arg(long)]
    duration_s: Option<f64>,
    /// Backlog mode: bytes to produce with consumers paused before draining.
    #[arg(long)]
    backlog_bytes: Option<u64>,
    #[arg(long)]
    stats_interval_s: Option<f64>,
}

impl WorkloadFlags {
    fn build(&self, base: Workload) -> anyhow::Result<Workload> {
        let mut w = match &self.workload {
            Some(path) => Workload::from_toml(
                &std::fs::read_to_string(path)
                    .with_context(|| format!("reading {}", path.display()))?,
            )?,
            None => base,
        };
        macro_rules! set {
            ($flag:ident => $field:ident) => {
                if let Some(v) = self.$flag.clone() {
                    w.$field = v;
                }
            };
        }
        set!(name => name);
        set!(topics => topics);
        set!(partitions => partitions_per_topic);
        set!(producers => producers_per_topic);
        set!(subscriptions => subscriptions_per_topic);
        set!(consumers => consumers_per_subscription);
        set!(consumer_group => consumer_group);
        set!(record_size => record_size);
        set!(keys => keys);
        set!(headers => headers_per_record);
        set!(rate => rate);
        set!(batch_size => batch_size_bytes);
        set!(linger_ms => linger_ms);
        set!(acks => acks);
        set!(compression => compression);
        set!(warmup_s => warmup_s);
        set!(duration_s => duration_s);
        set!(backlog_bytes => backlog_bytes);
        set!(stats_interval_s => stats_interval_s);
        w.validate()?;
        Ok(w)
    }
}

/// Where load threads run.
#[derive(Args, Debug, Default, Clone)]
struct PlacementFlags {
    /// Cores for all load threads, e.g. 0,1 or 2-3 (pinned round-robin).
    #[arg(long, value_parser = parse_cpus)]
    cpus: Option<CpuList>,
    /// Cores for producer threads (overrides --cpus for producers).
    #[arg(long, value_parser = parse_cpus)]
    producer_cpus: Option<CpuList>,
    /// Cores for consumer threads (overrides --cpus for consumers).
    #[arg(long, value_parser = parse_cpus)]
    consumer_cpus: Option<CpuList>,
    /// Run producers and consumers in two child processes.
    #[arg(long)]
    separate_processes: bool,
}

impl PlacementFlags {
    fn options(&self, broker_cpus: Vec<usize>) -> PlacementOptions {
        let all = self.cpus.clone().map(|c| c.0).unwrap_or_default();
        PlacementOptions {
            separate_processes: self.separate_processes,
            producer_cpus: self
                .producer_cpus
                .clone()
                .map(|c| c.0)
                .unwrap_or_else(|| all.clone()),
            consumer_cpus: self.consumer_cpus.clone().map(|c| c.0).unwrap_or(all),
            broker_cpus,
        }
    }
}

/// A core list such as `0,2-3`. A newtype, because clap reads `Option<Vec<T>>` as a repeated
/// option of single values and would not accept the parser's whole list.
#[derive(Clone, Debug, PartialEq)]
struct CpuList(Vec<usize>);

fn parse_cpus(s: &str) -> Result<CpuList, String> {
    let mut out = Vec::new();
    for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        match part.split_once('-') {
            Some((a, b)) => {
                let a: usize = a.parse().map_err(|_| format!("bad cpu {a:?}"))?;
                let b: usize = b.parse().map_err(|_| format!("bad cpu {b:?}"))?;
                if a > b || b > 4095 {
                    return Err(format!("bad cpu range {part:?}"));
                }
                out.extend(a..=b);
            }
            None => out.push(part.parse().map_err(|_| format!("bad cpu {part:?}"))?),
        }
    }
    if out.is_empty() {
        return Err("empty cpu list".to_string());
    }
    Ok(CpuList(out))
}

#[derive(Args, Debug, Clone)]
struct CommonArgs {
    #[arg(long, value_enum, default_value_t = DriverKind::Native)]
    driver: DriverKind,
    #[command(flatten)]
    placement: PlacementFlags,
    /// Directory for reports.
    #[arg(long, default_value = "ringbench-results")]
    output_dir: PathBuf,
    /// No live progress line.
    #[arg(long)]
    quiet: bool,
}

#[derive(Args)]
struct RunArgs {
    #[arg(long, default_value = "127.0.0.1:9092")]
    bootstrap: String,
    #[command(flatten)]
    workload: WorkloadFlags,
    #[command(flatten)]
    common: CommonArgs,
    /// Report file stem (default: label plus run id).
    #[arg(long)]
    report_name: Option<String>,
    /// Label shown by `compare` (default: workload name).
    #[arg(long)]
    label: Option<String>,
    /// Produce exactly this many records, then finish.
    #[arg(long)]
    records: Option<u64>,
}

#[derive(Args)]
struct QuickArgs {
    /// The ringbroker binary (default: target/release or target/debug beside the workspace).
    #[arg(long)]
    broker_bin: Option<PathBuf>,
    #[arg(long, default_value_t = 1)]
    shards: u32,
    /// Cores to pin the broker process to.
    #[arg(long, value_parser = parse_cpus)]
    broker_cpus: Option<CpuList>,
    #[command(flatten)]
    workload: WorkloadFlags,
    #[command(flatten)]
    common: CommonArgs,
}

#[derive(Args)]
struct MatrixArgs {
    /// The suite TOML (broker configurations x workloads).
    suite: PathBuf,
    #[arg(long)]
    broker_bin: Option<PathBuf>,
    /// Shorten every workload to this many seconds (warm-up scaled to a fifth), for smoke runs.
    #[arg(long)]
    duration_s: Option<f64>,
    #[command(flatten)]
    common: CommonArgs,
}

#[derive(Args)]
struct CompareArgs {
    /// Report JSON files.
    #[arg(required = true, num_args = 1..)]
    reports: Vec<PathBuf>,
    /// Output directory for index.html and the SVG files.
    #[arg(long, short, default_value = "ringbench-compare")]
    output: PathBuf,
}

#[derive(Args)]
struct CeilingArgs {
    /// Directory for the disk test file (use the broker's log dir filesystem).
    #[arg(long, default_value = ".")]
    dir: PathBuf,
    /// Bytes moved per throughput test.
    #[arg(long, default_value_t = 1 << 30)]
    bytes: u64,
    /// Write the result as JSON here too.
    #[arg(long)]
    json: Option<PathBuf>,
}

#[derive(Args)]
struct ProxyArgs {
    /// The broker to front.
    #[arg(long, default_value = "127.0.0.1:9092")]
    upstream: String,
    /// Delay added to every response, in milliseconds.
    #[arg(long, default_value_t = 5.0)]
    delay_ms: f64,
}

/// The checkout whose commit a report records: the current directory if it is inside a git
/// work tree, else the workspace ringbench was built from.
fn repo_dir() -> PathBuf {
    let cwd = std::env::current_dir().unwrap_or_else(|_| PathBuf::from("."));
    let in_git = std::process::Command::new("git")
        .args(["rev-parse", "--is-inside-work-tree"])
        .current_dir(&cwd)
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    if in_git {
        cwd
    } else {
        PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/.."))
    }
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Worker => hosts::run_worker_process(),
        Command::Proxy(args) => {
            if !(0.0..=60_000.0).contains(&args.delay_ms) {
                anyhow::bail!("--delay-ms must be between 0 and 60000");
            }
            let upstream = ringbench::client::resolve(&args.upstream)?;
            let proxy = proxy::DelayProxy::start(
                upstream,
                std::time::Duration::from_secs_f64(args.delay_ms / 1000.0),
            )?;
            println!(
                "proxy: bootstrap {} (delay {} ms)",
                proxy.bootstrap(),
                args.delay_ms
            );
            for (up, local) in &proxy.routes {
                println!("  {local} -> {up}");
            }
            // Serve until killed.
            loop {
                std::thread::park();
            }
        }
        Command::Run(args) => {
            let workload = args.workload.build(Workload::default())?;
            let opts = RunOptions {
                bootstrap: args.bootstrap.clone(),
                driver: args.common.driver,
                workload,
                placement: args.common.placement.options(Vec::new()),
                output_dir: args.common.output_dir.clone(),
                name: args.report_name.clone(),
                label: args.label.clone(),
                broker: BrokerInfo {
                    bootstrap: args.bootstrap.clone(),
                    ..Default::default()
                },
                progress: !args.common.quiet,
                record_limit: args.records,
                worker_binary: None,
                repo_dir: repo_dir(),
            };
            let outcome = run(&opts)?;
            print!("{}", summary_table(&outcome.report));
            println!("report: {}", outcome.json_path.display());
            Ok(())
        }
        Command::Quick(args) => {
            let base = Workload {
                name: "quick".to_string(),
                warmup_s: 2.0,
                duration_s: 10.0,
                rate: Rate::RecordsPerSecond(20_000.0),
                ..Workload::default()
            };
            let workload = args.workload.build(base)?;
            let binary = broker::locate_broker_binary(args.broker_bin.as_deref())?;
            let broker_cpus = args.broker_cpus.clone().map(|c| c.0).unwrap_or_default();
            let config = broker::BrokerConfig {
                name: format!("{}-shard", args.shards),
                shards: args.shards,
                overrides: Default::default(),
                cpus: broker_cpus.clone(),
            };
            let mut running = broker::BrokerProcess::start(&binary, &config)?;
            let opts = RunOptions {
                bootstrap: running.bootstrap(),
                driver: args.common.driver,
                workload,
                placement: args.common.placement.options(broker_cpus),
                output_dir: args.common.output_dir.clone(),
                name: None,
                label: None,
                broker: running.info(),
                progress: !args.common.quiet,
                record_limit: None,
                worker_binary: None,
                repo_dir: repo_dir(),
            };
            let outcome = run(&opts);
            running.stop()?;
            let outcome = outcome?;
            print!("{}", summary_table(&outcome.report));
            println!("report: {}", outcome.json_path.display());
            Ok(())
        }
        Command::Matrix(args) => {
            let suite = matrix::Suite::load(&args.suite)?;
            let binary = broker::locate_broker_binary(args.broker_bin.as_deref())?;
            let settings = matrix::MatrixSettings {
                broker_binary: binary,
                driver: args.common.driver,
                placement: args.common.placement.options(Vec::new()),
                output_dir: args.common.output_dir.clone(),
                progress: !args.common.quiet,
                duration_override_s: args.duration_s,
                repo_dir: repo_dir(),
            };
            let index = matrix::run_suite(&suite, &settings)?;
            println!("comparison: {}", index.display());
            Ok(())
        }
        Command::Compare(args) => {
            let index = compare::compare_files(&args.reports, &args.output)?;
            println!("comparison: {}", index.display());
            Ok(())
        }
        Command::Ceiling(args) => {
            let result = ceiling::measure(&ceiling::CeilingOptions {
                dir: args.dir.clone(),
                bytes: args.bytes,
            })?;
            print!("{}", result.table());
            if let Some(path) = &args.json {
                std::fs::write(path, serde_json::to_vec_pretty(&result)?)?;
            }
            Ok(())
        }
    }
}
