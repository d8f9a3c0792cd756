//! Offset-commit load generator: many consumer groups committing offsets at a fixed rate each, over
//! the Kafka protocol (OffsetCommit v8 with generation -1, as simple consumers and admin tools
//! commit), against any Kafka-compatible broker. Used for the consumer-group load figures in
//! docs/benchmarks.md:
//!
//! ```sh
//! cargo run --release --example offset_commit_load -- --bootstrap 127.0.0.1:9092 \
//!     --groups 100 --rate-per-group 1000 --duration-secs 60
//! ```

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::{BufMut, Bytes, BytesMut};
use kafka_protocol::messages::create_topics_request::{CreatableTopic, CreateTopicsRequest};
use kafka_protocol::messages::find_coordinator_request::FindCoordinatorRequest;
use kafka_protocol::messages::find_coordinator_response::FindCoordinatorResponse;
use kafka_protocol::messages::metadata_request::MetadataRequest;
use kafka_protocol::messages::metadata_response::MetadataResponse;
use kafka_protocol::messages::offset_commit_request::{
    OffsetCommitRequest, OffsetCommitRequestPartition, OffsetCommitRequestTopic,
};
use kafka_protocol::messages::offset_commit_response::OffsetCommitResponse;
use kafka_protocol::messages::{ApiKey, GroupId, RequestHeader, ResponseHeader, TopicName};
use kafka_protocol::protocol::{Decodable, Encodable, HeaderVersion, StrBytes};

struct Args {
    bootstrap: String,
    groups: usize,
    rate_per_group: u64,
    duration: Duration,
    connections_per_broker: usize,
    partitions: i32,
}

fn parse_args() -> Result<Args, String> {
    let mut args = Args {
        bootstrap: "127.0.0.1:9092".into(),
        groups: 100,
        rate_per_group: 1000,
        duration: Duration::from_secs(60),
        connections_per_broker: 4,
        partitions: 8,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().ok_or(format!("{flag} needs a value"));
        let number = |v: String| {
            v.parse::<u64>()
                .map_err(|_| format!("{flag}: {v:?} is not a number"))
        };
        match flag.as_str() {
            "--bootstrap" => args.bootstrap = value()?,
            "--groups" => args.groups = number(value()?)? as usize,
            "--rate-per-group" => args.rate_per_group = number(value()?)?,
            "--duration-secs" => args.duration = Duration::from_secs(number(value()?)?),
            "--connections-per-broker" => {
                args.connections_per_broker = number(value()?)?.max(1) as usize
            }
            "--partitions" => args.partitions = number(value()?)? as i32,
            other => return Err(format!("unknown flag {other}")),
        }
    }
    Ok(args)
}

fn request<R: Encodable + HeaderVersion>(
    api_key: ApiKey,
    version: i16,
    correlation_id: i32,
    body: &R,
) -> Bytes {
    let mut buf = BytesMut::new();
    buf.put_i32(0);
    RequestHeader::default()
        .with_request_api_key(api_key as i16)
        .with_request_api_version(version)
        .with_correlation_id(correlation_id)
        .with_client_id(Some(StrBytes::from_static_str("offset-commit-load")))
        .encode(&mut buf, R::header_version(version))
        .expect("encode header");
    body.encode(&mut buf, version).expect("encode body");
    let size = (buf.len() - 4) as i32;
    buf[..4].copy_from_slice(&size.to_be_bytes());
    buf.freeze()
}

fn read_frame(stream: &mut TcpStream) -> std::io::Result<Bytes> {
    let mut size = [0u8; 4];
    stream.read_exact(&mut size)?;
    let mut body = vec![0u8; i32::from_be_bytes(size).max(0) as usize];
    stream.read_exact(&mut body)?;
    Ok(Bytes::from(body))
}

fn call<Req: Encodable + HeaderVersion, Resp: Decodable>(
    stream: &mut TcpStream,
    api_key: ApiKey,
    version: i16,
    body: &Req,
) -> Result<Resp, String> {
    stream
        .write_all(&request(api_key, version, 1, body))
        .map_err(|e| e.to_string())?;
    let mut frame = read_frame(stream).map_err(|e| e.to_string())?;
    ResponseHeader::decode(&mut frame, api_key.response_header_version(version))
        .map_err(|e| e.to_string())?;
    Resp::decode(&mut frame, version).map_err(|e| e.to_string())
}

fn main() {
    let args = match parse_args() {
        Ok(args) => args,
        Err(message) => {
            eprintln!("offset_commit_load: {message}");
            std::process::exit(2);
        }
    };
    if let Err(message) = run(args) {
        eprintln!("offset_commit_load: {message}");
        std::process::exit(1);
    }
}

fn run(args: Args) -> Result<(), String> {
    let topic = "offset-commit-load";
    let mut bootstrap = TcpStream::connect(&args.bootstrap)
        .map_err(|e| format!("connect {}: {e}", args.bootstrap))?;
    bootstrap.set_nodelay(true).ok();
    let create = CreateTopicsRequest::default()
        .with_timeout_ms(10_000)
        .with_topics(vec![
            CreatableTopic::default()
                .with_name(TopicName(StrBytes::from_static_str(topic)))
                .with_num_partitions(args.partitions)
                .with_replication_factor(1),
        ]);
    let _: kafka_protocol::messages::CreateTopicsResponse =
        call(&mut bootstrap, ApiKey::CreateTopics, 7, &create)?;
    let metadata: MetadataResponse = call(
        &mut bootstrap,
        ApiKey::Metadata,
        12,
        &MetadataRequest::default(),
    )?;
    let brokers: HashMap<i32, String> = metadata
        .brokers
        .iter()
        .map(|b| (b.node_id.0, format!("{}:{}", b.host.as_str(), b.port)))
        .collect();
    let group_ids: Vec<String> = (0..args.groups)
        .map(|i| format!("load-group-{i}"))
        .collect();
    let find = FindCoordinatorRequest::default()
        .with_key_type(0)
        .with_coordinator_keys(
            group_ids
                .iter()
                .map(|g| StrBytes::from_string(g.clone()))
                .collect(),
        );
    let found: FindCoordinatorResponse = call(&mut bootstrap, ApiKey::FindCoordinator, 4, &find)?;
    let mut by_broker: HashMap<i32, Vec<String>> = HashMap::new();
    for coordinator in found.coordinators {
        if coordinator.error_code != 0 {
            return Err(format!(
                "FindCoordinator {}: error {}",
                coordinator.key.as_str(),
                coordinator.error_code
            ));
        }
        by_broker
            .entry(coordinator.node_id.0)
            .or_default()
            .push(coordinator.key.to_string());
    }

    let acknowledged = Arc::new(AtomicU64::new(0));
    let errors = Arc::new(AtomicU64::new(0));
    let latencies_us = Arc::new(Mutex::new(Vec::<u32>::new()));
    let started = Instant::now();
    let mut threads = Vec::new();
    for (node, groups) in by_broker {
        let address = brokers
            .get(&node)
            .ok_or(format!("coordinator node {node} not in metadata"))?
            .clone();
        let per_connection = groups.len().div_ceil(args.connections_per_broker);
        for chunk in groups.chunks(per_connection.max(1)) {
            let chunk = chunk.to_vec();
            let address = address.clone();
            let (acknowledged, errors, latencies_us) =
                (acknowledged.clone(), errors.clone(), latencies_us.clone());
            let (rate, duration, partitions) =
                (args.rate_per_group, args.duration, args.partitions);
            threads.push(std::thread::spawn(move || {
                commit_loop(
                    &address,
                    &chunk,
                    rate,
                    duration,
                    partitions,
                    topic,
                    &acknowledged,
                    &errors,
                    &latencies_us,
                )
            }));
        }
    }
    for thread in threads {
        thread
            .join()
            .map_err(|_| "a load thread panicked".to_string())??;
    }
    let elapsed = started.elapsed().as_secs_f64();
    let acked = acknowledged.load(Ordering::SeqCst);
    let mut latencies = latencies_us.lock().unwrap().clone();
    latencies.sort_unstable();
    let percentile = |p: f64| {
        latencies
            .get(((latencies.len() as f64 * p) as usize).min(latencies.len().saturating_sub(1)))
            .copied()
            .unwrap_or(0)
    };
    println!(
        "groups={} target={} commits/s acknowledged={} errors={} elapsed={:.1}s rate={:.0} commits/s latency_us p50={} p99={} p99.9={} max={}",
        args.groups,
        args.groups as u64 * args.rate_per_group,
        acked,
        errors.load(Ordering::SeqCst),
        elapsed,
        acked as f64 / elapsed,
        percentile(0.50),
        percentile(0.99),
        percentile(0.999),
        latencies.last().copied().unwrap_or(0)
    );
    Ok(())
}

/// Commits for each of `groups` at `rate` per second, on one connection, pipelining requests and
/// reading responses on a second thread; latency counts from the intended send time.
#[allow(clippy::too_many_arguments)]
fn commit_loop(
    address: &str,
    groups: &[String],
    rate: u64,
    duration: Duration,
    partitions: i32,
    topic: &str,
    acknowledged: &AtomicU64,
    errors: &AtomicU64,
    latencies_us: &Mutex<Vec<u32>>,
) -> Result<(), String> {
    let mut stream = TcpStream::connect(address).map_err(|e| format!("connect {address}: {e}"))?;
    stream.set_nodelay(true).ok();
    let mut reader = stream.try_clone().map_err(|e| e.to_string())?;
    reader.set_read_timeout(Some(Duration::from_secs(30))).ok();
    let intended: Arc<Mutex<HashMap<i32, Instant>>> = Arc::new(Mutex::new(HashMap::new()));
    let total_requests = (rate as f64 * duration.as_secs_f64()) as u64 * groups.len() as u64;
    let read_intended = intended.clone();
    let reader_thread = std::thread::scope(|scope| {
        let reading = scope.spawn(move || -> Result<(u64, u64, Vec<u32>), String> {
            let (mut ok, mut failed, mut samples) = (0u64, 0u64, Vec::new());
            for _ in 0..total_requests {
                let mut frame =
                    read_frame(&mut reader).map_err(|e| format!("reading a response: {e}"))?;
                let header = ResponseHeader::decode(
                    &mut frame,
                    ApiKey::OffsetCommit.response_header_version(8),
                )
                .map_err(|e| e.to_string())?;
                let response =
                    OffsetCommitResponse::decode(&mut frame, 8).map_err(|e| e.to_string())?;
                let failed_partitions = response
                    .topics
                    .iter()
                    .flat_map(|t| t.partitions.iter())
                    .filter(|p| p.error_code != 0)
                    .count();
                if failed_partitions == 0 {
                    ok += 1
                } else {
                    failed += 1
                }
                if let Some(at) = read_intended.lock().unwrap().remove(&header.correlation_id)
                    && samples.len() < 2_000_000
                {
                    samples.push(at.elapsed().as_micros().min(u32::MAX as u128) as u32);
                }
            }
            Ok((ok, failed, samples))
        });
        let interval = Duration::from_secs_f64(1.0 / rate.max(1) as f64);
        let start = Instant::now();
        let mut correlation_id = 0i32;
        let rounds = total_requests / groups.len().max(1) as u64;
        for round in 0..rounds {
            let due = start + interval * round as u32;
            if let Some(wait) = due.checked_duration_since(Instant::now()) {
                std::thread::sleep(wait);
            }
            let mut batch = BytesMut::new();
            for (i, group) in groups.iter().enumerate() {
                correlation_id = correlation_id.wrapping_add(1);
                let commit = OffsetCommitRequest::default()
                    .with_group_id(GroupId(StrBytes::from_string(group.clone())))
                    .with_generation_id_or_member_epoch(-1)
                    .with_topics(vec![
                        OffsetCommitRequestTopic::default()
                            .with_name(TopicName(StrBytes::from_string(topic.to_string())))
                            .with_partitions(vec![
                                OffsetCommitRequestPartition::default()
                                    .with_partition_index((i as i32) % partitions.max(1))
                                    .with_committed_offset(round as i64),
                            ]),
                    ]);
                intended.lock().unwrap().insert(correlation_id, due);
                batch.extend_from_slice(&request(ApiKey::OffsetCommit, 8, correlation_id, &commit));
            }
            stream
                .write_all(&batch)
                .map_err(|e| format!("sending: {e}"))?;
        }
        reading.join().map_err(|_| "reader panicked".to_string())?
    })?;
    let (ok, failed, samples) = reader_thread;
    acknowledged.fetch_add(ok, Ordering::SeqCst);
    errors.fetch_add(failed, Ordering::SeqCst);
    latencies_us.lock().unwrap().extend(samples);
    Ok(())
}
