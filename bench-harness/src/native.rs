//! The native driver: ringbench's own Kafka producer and consumer on compio (io_uring), one
//! runtime per worker thread. Producers are open-loop: records are created on a schedule of
//! intended send times, and every latency counts from the intended time.

use std::cell::{Cell, RefCell};
use std::collections::{BTreeMap, VecDeque};
use std::future::Future;
use std::pin::Pin;
use std::rc::Rc;
use std::sync::Arc;
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use anyhow::{Context as _, anyhow, bail};
use bytes::Bytes;
use compio::buf::BufResult;
use compio::io::AsyncWriteExt;
use compio::net::TcpStream;
use kafka_protocol::messages::{
    ApiKey, BrokerId, FetchRequest, FetchResponse, ProduceResponse, TopicName,
    fetch_request::{FetchPartition, FetchTopic},
};
use kafka_protocol::protocol::{Decodable, Encodable, HeaderVersion, StrBytes};

use crate::client::{self, Connection, ERROR_NONE};
use crate::driver::{ConsumerSpec, Control, ProducerSpec, RecordSource, RunClock};
use crate::metrics::{Meter, record_clamped};
use crate::wire::{self, BatchBuilder, PartitionBatch, RequestHeaderFields, TopicBatches};
use crate::workload::{Acks, partition_for_key};

/// How long a stopping producer waits for acknowledgements of requests already sent.
const DRAIN_ACKS_TIMEOUT: Duration = Duration::from_secs(10);
/// Records created per scheduling pass before the loop looks at the sockets again, so a large
/// catch-up after a stall cannot starve sending.
const MAX_RECORDS_PER_PASS: u32 = 4096;
/// Longest sleep of an idle loop, so stop and rate changes are seen promptly.
pub(crate) const IDLE_TICK: Duration = Duration::from_millis(20);

/// A single-threaded wake-up: a response arriving wakes the producer loop early.
#[derive(Default)]
struct Notify {
    notified: Cell<bool>,
    waker: RefCell<Option<Waker>>,
}

impl Notify {
    fn notify(&self) {
        self.notified.set(true);
        if let Some(w) = self.waker.borrow_mut().take() {
            w.wake();
        }
    }

    fn wait(&self) -> NotifyWait<'_> {
        NotifyWait { notify: self }
    }
}

struct NotifyWait<'a> {
    notify: &'a Notify,
}

impl Future for NotifyWait<'_> {
    type Output = ();
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        if self.notify.notified.replace(false) {
            Poll::Ready(())
        } else {
            *self.notify.waker.borrow_mut() = Some(cx.waker().clone());
            Poll::Pending
        }
    }
}

/// A sealed batch waiting to be sent or acknowledged.
struct SealedBatch {
    partition: i32,
    bytes: Vec<u8>,
    intended_us: Vec<u64>,
    value_bytes: u64,
}

/// A Produce request awaiting its response.
struct InFlight {
    correlation_id: i32,
    batches: Vec<SealedBatch>,
}

/// State shared between a producer loop and one connection's response reader.
struct LeaderState {
    in_flight: RefCell<VecDeque<InFlight>>,
    in_flight_bytes: Cell<u64>,
    failure: RefCell<Option<String>>,
}

struct Leader {
    writer: TcpStream,
    next_correlation_id: i32,
    state: Rc<LeaderState>,
    partitions: Vec<i32>,
}

/// Per-partition accumulation: the open batch and sealed batches waiting for a send slot.
struct PartitionQueue {
    open: BatchBuilder,
    ready: VecDeque<SealedBatch>,
    queued_bytes: u64,
}

/// Runs one producer until `control` says stop. Errors are returned, never swallowed: a run
/// whose producer failed must not produce a report that looks healthy.
pub async fn run_producer(
    spec: ProducerSpec,
    control: Arc<Control>,
    meter: Meter,
    clock: RunClock,
) -> anyhow::Result<()> {
    let w = &spec.workload;
    let client_id = format!("ringbench-producer-{}", spec.id);
    let (mut conn, versions) = client::bootstrap(&spec.bootstrap, &client_id).await?;
    let produce_version = versions.pick(
        ApiKey::Produce,
        wire::PRODUCE_MIN_VERSION,
        wire::PRODUCE_MAX_VERSION,
    )?;
    let layout =
        client::topic_layout(&mut conn, &versions, &spec.topic, Duration::from_secs(30)).await?;
    drop(conn);
    let all_partitions: Vec<i32> = (0..spec.partitions as i32).collect();
    if layout.leaders.len() != spec.partitions as usize {
        bail!(
            "topic {} has {} partitions, workload expects {}",
            spec.topic,
            layout.leaders.len(),
            spec.partitions
        );
    }

    let notify = Rc::new(Notify::default());
    let acks = w.acks;
    let mut leaders: BTreeMap<i32, Leader> = BTreeMap::new();
    let mut readers = Vec::new();
    for (node, parts) in layout.by_leader(&all_partitions) {
        let address = layout.nodes[&node];
        let leader_conn = Connection::connect(address, &client_id).await?;
        let (reader, writer, next_correlation_id) = leader_conn.into_split();
        let state = Rc::new(LeaderState {
            in_flight: RefCell::new(VecDeque::new()),
            in_flight_bytes: Cell::new(0),
            failure: RefCell::new(None),
        });
        if acks != Acks::None {
            readers.push(compio::runtime::spawn(read_produce_responses(
                reader,
                state.clone(),
                notify.clone(),
                meter.clone(),
                clock,
                produce_version,
            )));
        }
        leaders.insert(
            node,
            Leader {
                writer,
                next_correlation_id,
                state,
                partitions: parts,
            },
        );
    }

    control.mark_ready();
    let mut source = RecordSource::new(w, spec.id);
    let filler = source.filler.clone();
    let mut queues: Vec<PartitionQueue> = (0..spec.partitions)
        .map(|_| PartitionQueue {
            open: BatchBuilder::new(),
            ready: VecDeque::new(),
            queued_bytes: 0,
        })
        .collect();
    let mut sticky_partition = spec.id % spec.partitions;
    let batch_limit = w.batch_size_bytes as usize;
    let linger_ns = (w.linger_ms * 1e6) as u64;
    let buffer_limit = w.producer_buffer_bytes;
    let max_in_flight = w.max_in_flight_per_connection as usize;
    let mut generation = control.generation();
    let mut next_intended_ns = clock.now_ns();
    let mut queued_total: u64 = 0;
    let mut request_buf: Vec<u8> = Vec::with_capacity(batch_limit * 2);
    let mut granted: u64 = 0;

    while !control.stopped() {
        for leader in leaders.values() {
            if let Some(f) = leader.state.failure.borrow().as_ref() {
                bail!("producer {}: connection failed: {f}", spec.id);
            }
        }
        let period = control.period_ns();
        let now = clock.now_ns();
        if control.generation() != generation {
            generation = control.generation();
            next_intended_ns = next_intended_ns.max(now);
        }

        // 1. Create every record whose intended time has come, while buffer memory allows.
        let in_flight_bytes: u64 = leaders
            .values()
            .map(|l| l.state.in_flight_bytes.get())
            .sum();
        let mut created = 0;
        while period > 0 && next_intended_ns <= now && created < MAX_RECORDS_PER_PASS {
            if queued_total + in_flight_bytes >= buffer_limit {
                break;
            }
            if granted == 0 {
                granted = control.take_budget(1024);
                if granted == 0 {
                    break;
                }
            }
            granted -= 1;
            let intended_us = clock.epoch_us(next_intended_ns);
            let size = source.next_size();
            let key = source.next_key();
            let partition = match key {
                Some(ref k) => partition_for_key(k, spec.partitions),
                None => sticky_partition,
            };
            let q = &mut queues[partition as usize];
            // As Kafka's producer does, a batch is closed when the next record would push it past
            // batch.size (a record larger than that still gets a batch of its own), so batches
            // stay within a broker's message.max.bytes set to the same figure.
            if !q.open.is_empty()
                && q.open.encoded_len()
                    + BatchBuilder::record_size_bound(
                        key.as_ref().map_or(0, |k| k.len()),
                        size,
                        &source.headers,
                    )
                    > batch_limit
            {
                let (open, sealed) = seal(q, partition as i32, w.compression)?;
                queued_total = queued_total - open + sealed;
            }
            let before = open_bytes(&q.open);
            q.open.append(
                now,
                intended_us,
                key.as_ref().map(|k| &k[..]),
                size,
                &filler,
                &source.headers,
            );
            queued_total += open_bytes(&q.open) - before;
            if q.open.encoded_len() >= batch_limit {
                let (open, sealed) = seal(q, partition as i32, w.compression)?;
                queued_total = queued_total - open + sealed;
                if key.is_none() {
                    sticky_partition = (sticky_partition + 1) % spec.partitions;
                }
            }
            next_intended_ns += period;
            created += 1;
        }

        // 2. Seal batches whose linger expired, then send what each leader has room for.
        let now = clock.now_ns();
        let mut earliest_linger: Option<u64> = None;
        for (p, q) in queues.iter_mut().enumerate() {
            if !q.open.is_empty() {
                let due = q.open.opened_at_ns + linger_ns;
                if due <= now && q.ready.is_empty() {
                    let (open, sealed) = seal(q, p as i32, w.compression)?;
                    queued_total = queued_total - open + sealed;
                    if w.keys == crate::workload::Keys::None && p as u32 == sticky_partition {
                        sticky_partition = (sticky_partition + 1) % spec.partitions;
                    }
                } else if due > now {
                    // Only a future deadline is a reason to wake. A batch whose linger expired
                    // behind a full ready queue waits for a response to free a slot: a past
                    // deadline here made the loop spin without yielding, starving the response
                    // reader (a livelock at overload).
                    earliest_linger = Some(earliest_linger.map_or(due, |e: u64| e.min(due)));
                }
            }
        }
        for leader in leaders.values_mut() {
            if acks != Acks::None && leader.state.in_flight.borrow().len() >= max_in_flight {
                continue;
            }
            let mut batches = Vec::new();
            for &p in &leader.partitions {
                let q = &mut queues[p as usize];
                if let Some(b) = q.ready.pop_front() {
                    q.queued_bytes -= b.bytes.len() as u64;
                    queued_total -= b.bytes.len() as u64;
                    batches.push(b);
                }
            }
            if batches.is_empty() {
                continue;
            }
            send_produce(
                leader,
                &spec.topic,
                produce_version,
                acks,
                w.request_timeout_ms as i32,
                batches,
                &mut request_buf,
                &meter,
                &clock,
            )
            .await?;
        }

        // 3. Sleep until the next record is due, a linger expires, or a response frees a slot.
        let now = clock.now_ns();
        let mut wake = now + IDLE_TICK.as_nanos() as u64;
        let in_flight_bytes: u64 = leaders
            .values()
            .map(|l| l.state.in_flight_bytes.get())
            .sum();
        // A spent `--records` budget leaves the schedule in the past: waking for it would spin
        // without yielding and starve the response reader, so acknowledgements never arrived.
        let can_create = granted > 0 || !control.budget_exhausted();
        if period > 0 && can_create && queued_total + in_flight_bytes < buffer_limit {
            wake = wake.min(next_intended_ns);
        }
        if let Some(l) = earliest_linger {
            wake = wake.min(l);
        }
        if wake > now {
            let _ = compio::time::timeout_at(clock.instant(wake), notify.wait()).await;
        }
    }

    // Wait (bounded) for responses to requests already sent, so their latencies are recorded.
    let deadline = clock.now_ns() + DRAIN_ACKS_TIMEOUT.as_nanos() as u64;
    while acks != Acks::None && clock.now_ns() < deadline {
        let pending: usize = leaders
            .values()
            .map(|l| l.state.in_flight.borrow().len())
            .sum();
        let failed = leaders.values().any(|l| l.state.failure.borrow().is_some());
        if pending == 0 || failed {
            break;
        }
        let _ = compio::time::timeout(Duration::from_millis(50), notify.wait()).await;
    }
    drop(leaders);
    drop(readers);
    Ok(())
}

/// Bytes an open batch holds in the buffer accounting (its header counts once it has a record).
fn open_bytes(b: &BatchBuilder) -> u64 {
    if b.is_empty() {
        0
    } else {
        b.encoded_len() as u64
    }
}

/// Seals a partition's open batch into its ready queue; returns (open bytes before, sealed
/// bytes after), so the caller can replace one by the other in its buffer accounting.
fn seal(
    q: &mut PartitionQueue,
    partition: i32,
    compression: crate::workload::Compression,
) -> anyhow::Result<(u64, u64)> {
    let before = open_bytes(&q.open);
    let mut bytes = Vec::with_capacity(q.open.encoded_len());
    q.open.seal_into(compression, &mut bytes)?;
    let (intended_us, value_bytes) = q.open.take_intended();
    let sealed_len = bytes.len() as u64;
    q.queued_bytes += sealed_len;
    q.ready.push_back(SealedBatch {
        partition,
        bytes,
        intended_us,
        value_bytes,
    });
    Ok((before, sealed_len))
}

#[allow(clippy::too_many_arguments)]
async fn send_produce(
    leader: &mut Leader,
    topic: &str,
    version: i16,
    acks: Acks,
    timeout_ms: i32,
    batches: Vec<SealedBatch>,
    buf: &mut Vec<u8>,
    meter: &Meter,
    clock: &RunClock,
) -> anyhow::Result<()> {
    let correlation_id = leader.next_correlation_id;
    leader.next_correlation_id = leader.next_correlation_id.wrapping_add(1);
    buf.clear();
    {
        let parts: Vec<PartitionBatch<'_>> = batches
            .iter()
            .map(|b| PartitionBatch {
                partition: b.partition,
                records: &b.bytes,
            })
            .collect();
        let topics = [TopicBatches {
            topic,
            partitions: &parts,
        }];
        let header = RequestHeaderFields {
            api_version: version,
            correlation_id,
            client_id: "ringbench",
        };
        wire::encode_produce_request(buf, &header, acks.wire_value(), timeout_ms, &topics)?;
    }
    let bytes: u64 = batches.iter().map(|b| b.bytes.len() as u64).sum();
    let send_us = clock.now_epoch_us();
    meter.with(|m| {
        for b in &batches {
            for &intended in &b.intended_us {
                record_clamped(&mut m.publish_delay_us, send_us.saturating_sub(intended));
            }
        }
    });
    // With acks the request is registered before the write starts: the response can arrive
    // before the write's completion is seen, and must find its batches.
    let unacknowledged = if acks != Acks::None {
        leader
            .state
            .in_flight_bytes
            .set(leader.state.in_flight_bytes.get() + bytes);
        leader.state.in_flight.borrow_mut().push_back(InFlight {
            correlation_id,
            batches,
        });
        None
    } else {
        Some(batches)
    };
    let owned = std::mem::take(buf);
    let BufResult(res, owned) = leader.writer.write_all(owned).await;
    *buf = owned;
    res.with_context(|| format!("writing produce request to {topic}"))?;
    if let Some(batches) = unacknowledged {
        // acks=0 has no acknowledgement; the latency ends when the bytes left.
        let done_us = clock.now_epoch_us();
        meter.with(|m| {
            for b in &batches {
                for &intended in &b.intended_us {
                    record_clamped(&mut m.publish_latency_us, done_us.saturating_sub(intended));
                }
                m.published_records += b.intended_us.len() as u64;
                m.stale_published_records += meter.count_stale(&b.intended_us);
                m.published_bytes += b.value_bytes;
            }
        });
    }
    Ok(())
}

/// Reads Produce responses from one leader in order and turns them into latencies.
async fn read_produce_responses(
    mut reader: TcpStream,
    state: Rc<LeaderState>,
    notify: Rc<Notify>,
    meter: Meter,
    clock: RunClock,
    version: i16,
) {
    let result: anyhow::Result<()> = async {
        loop {
            let frame = client::read_frame(&mut reader, client::MAX_RESPONSE_FRAME_BYTES).await?;
            let ack_us = clock.now_epoch_us();
            let (correlation_id, mut body) =
                wire::split_response_header(frame, ProduceResponse::header_version(version))?;
            let entry = state
                .in_flight
                .borrow_mut()
                .pop_front()
                .ok_or_else(|| anyhow!("response {correlation_id} with nothing in flight"))?;
            if entry.correlation_id != correlation_id {
                bail!(
                    "produce response {correlation_id} out of order, expected {}",
                    entry.correlation_id
                );
            }
            let response = ProduceResponse::decode(&mut body, version)?;
            let mut errors: BTreeMap<i32, i16> = BTreeMap::new();
            for t in &response.responses {
                for p in &t.partition_responses {
                    if p.error_code != ERROR_NONE {
                        errors.insert(p.index, p.error_code);
                    }
                }
            }
            let bytes: u64 = entry.batches.iter().map(|b| b.bytes.len() as u64).sum();
            state
                .in_flight_bytes
                .set(state.in_flight_bytes.get().saturating_sub(bytes));
            meter.with(|m| {
                for b in &entry.batches {
                    if errors.contains_key(&b.partition) {
                        m.publish_errors += b.intended_us.len() as u64;
                        continue;
                    }
                    m.published_records += b.intended_us.len() as u64;
                    m.stale_published_records += meter.count_stale(&b.intended_us);
                    m.published_bytes += b.value_bytes;
                    for &intended in &b.intended_us {
                        record_clamped(&mut m.publish_latency_us, ack_us.saturating_sub(intended));
                    }
                }
            });
            notify.notify();
        }
    }
    .await;
    if let Err(e) = result {
        *state.failure.borrow_mut() = Some(format!("{e:#}"));
        notify.notify();
    }
}

/// Our Fetch version range: v4 is Kafka 4's floor; v13 switches to topic ids.
pub(crate) const FETCH_MIN_VERSION: i16 = 4;
pub(crate) const FETCH_MAX_VERSION: i16 = 12;

/// Runs one consumer until `control` says stop: waits for consumers to be enabled (backlog
/// mode), then long-polls each partition leader and records end-to-end latency per record.
pub async fn run_consumer(
    spec: ConsumerSpec,
    control: Arc<Control>,
    meter: Meter,
    clock: RunClock,
) -> anyhow::Result<()> {
    if spec.group.is_some() {
        return crate::native_group::run_group_consumer(spec, control, meter, clock).await;
    }
    let client_id = format!("ringbench-consumer-{}", spec.id);
    let (mut conn, versions) = client::bootstrap(&spec.bootstrap, &client_id).await?;
    let fetch_version = versions.pick(ApiKey::Fetch, FETCH_MIN_VERSION, FETCH_MAX_VERSION)?;
    let layout =
        client::topic_layout(&mut conn, &versions, &spec.topic, Duration::from_secs(30)).await?;
    drop(conn);
    let positions: Positions = Rc::new(RefCell::new(BTreeMap::new()));
    let mut jobs = Vec::new();
    for (node, parts) in layout.by_leader(&spec.assigned) {
        let address = layout.nodes[&node];
        let mut leader_conn = Connection::connect(address, &client_id).await?;
        // Start at the end: topics are fresh per run, and an older tail is not this run's data.
        let offsets =
            client::list_offsets(&mut leader_conn, &versions, &spec.topic, &parts, -1).await?;
        positions.borrow_mut().extend(offsets);
        jobs.push(FetchJob {
            conn: leader_conn,
            version: fetch_version,
            topic: spec.topic.clone(),
            partitions: parts,
            positions: positions.clone(),
            workload: spec.workload.clone(),
            control: control.clone(),
            meter: meter.clone(),
            clock,
            cancel: Rc::new(Cell::new(false)),
        });
    }
    control.mark_ready();
    run_fetch_jobs(jobs).await
}

/// Next fetch offset per partition, shared by a consumer's fetch tasks (and its group commits).
pub(crate) type Positions = Rc<RefCell<BTreeMap<i32, i64>>>;

/// One long-polling fetch loop against one partition leader.
pub(crate) struct FetchJob {
    pub conn: Connection,
    pub version: i16,
    pub topic: String,
    pub partitions: Vec<i32>,
    pub positions: Positions,
    pub workload: crate::workload::Workload,
    pub control: Arc<Control>,
    pub meter: Meter,
    pub clock: RunClock,
    /// Set to end the loop early (a group rebalance).
    pub cancel: Rc<Cell<bool>>,
}

/// Runs the jobs concurrently on this runtime; returns the first error after all have ended.
pub(crate) async fn run_fetch_jobs(jobs: Vec<FetchJob>) -> anyhow::Result<()> {
    let tasks: Vec<_> = jobs
        .into_iter()
        .map(|j| compio::runtime::spawn(fetch_loop(j)))
        .collect();
    let mut first_error = None;
    for t in tasks {
        let outcome = t
            .await
            .map_err(|e| anyhow!("fetch task panicked: {e:?}"))
            .and_then(|r| r);
        if let Err(e) = outcome {
            first_error.get_or_insert(e);
        }
    }
    match first_error {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

async fn fetch_loop(job: FetchJob) -> anyhow::Result<()> {
    let FetchJob {
        mut conn,
        version,
        topic,
        partitions,
        positions,
        workload,
        control,
        meter,
        clock,
        cancel,
    } = job;
    let done = || control.stopped() || cancel.get();
    while !control.consumers_enabled() {
        if done() {
            return Ok(());
        }
        compio::time::sleep(IDLE_TICK).await;
    }
    let topic_name = TopicName(StrBytes::from_string(topic.clone()));
    while !done() {
        let fetch_partitions: Vec<FetchPartition> = {
            let positions = positions.borrow();
            partitions
                .iter()
                .filter_map(|p| positions.get(p).map(|&o| (*p, o)))
                .map(|(p, o)| {
                    FetchPartition::default()
                        .with_partition(p)
                        .with_current_leader_epoch(-1)
                        .with_fetch_offset(o)
                        .with_log_start_offset(-1)
                        .with_partition_max_bytes(workload.fetch_partition_max_bytes as i32)
                })
                .collect()
        };
        if fetch_partitions.is_empty() {
            return Ok(());
        }
        let request = FetchRequest::default()
            .with_replica_id(BrokerId(-1))
            .with_max_wait_ms(workload.fetch_max_wait_ms as i32)
            .with_min_bytes(1)
            .with_max_bytes(workload.fetch_max_bytes as i32)
            .with_isolation_level(0)
            .with_session_id(0)
            .with_session_epoch(-1)
            .with_topics(vec![
                FetchTopic::default()
                    .with_topic(topic_name.clone())
                    .with_partitions(fetch_partitions),
            ]);
        let response: FetchResponse = conn.call(&request, version).await?;
        let now_us = clock.now_epoch_us();
        if response.error_code != ERROR_NONE {
            bail!(
                "fetch from {} failed: error {}",
                conn.peer,
                response.error_code
            );
        }
        let mut latencies: Vec<u64> = Vec::new();
        let mut records = 0u64;
        let mut bytes = 0u64;
        for t in &response.responses {
            for p in &t.partitions {
                if p.error_code != ERROR_NONE {
                    bail!(
                        "fetch {topic}/{}: error {}",
                        p.partition_index,
                        p.error_code
                    );
                }
                let Some(data) = p.records.as_ref() else {
                    continue;
                };
                let mut positions = positions.borrow_mut();
                let Some(offset) = positions.get_mut(&p.partition_index) else {
                    bail!(
                        "fetch response names partition {} that was not requested",
                        p.partition_index
                    );
                };
                let summary = wire::scan_batches(data, *offset, |_, value| {
                    if let Some(sent) = wire::value_timestamp_us(value) {
                        latencies.push(now_us.saturating_sub(sent));
                    }
                })
                .with_context(|| format!("decoding {topic}/{}", p.partition_index))?;
                if let Some(next) = summary.next_offset {
                    *offset = (*offset).max(next);
                }
                records += summary.records;
                bytes += summary.value_bytes;
            }
        }
        if records > 0 {
            meter.with(|m| {
                m.consumed_records += records;
                m.consumed_bytes += bytes;
                for &l in &latencies {
                    record_clamped(&mut m.end_to_end_latency_us, l);
                }
            });
        }
    }
    Ok(())
}

/// Encodes a Fetch request the way the consumer does, for the codec benchmark.
pub fn encode_fetch_request_for_bench(
    topic: &str,
    partitions: &[(i32, i64)],
    version: i16,
) -> anyhow::Result<Vec<u8>> {
    let request = FetchRequest::default()
        .with_replica_id(BrokerId(-1))
        .with_max_wait_ms(100)
        .with_topics(vec![
            FetchTopic::default()
                .with_topic(TopicName(StrBytes::from_string(topic.to_string())))
                .with_partitions(
                    partitions
                        .iter()
                        .map(|&(p, o)| {
                            FetchPartition::default()
                                .with_partition(p)
                                .with_fetch_offset(o)
                                .with_partition_max_bytes(1 << 20)
                        })
                        .collect(),
                ),
        ]);
    let mut out = Vec::new();
    request.encode(&mut out, version)?;
    Ok(out)
}

/// Decodes a Fetch response body and scans its records, exactly as the consumer's hot path
/// does; returns (records, value bytes). Used by the criterion bench and tests.
pub fn decode_fetch_response(
    body: Bytes,
    version: i16,
    on_latency: &mut impl FnMut(u64),
) -> anyhow::Result<(u64, u64)> {
    let mut body = body;
    let response = FetchResponse::decode(&mut body, version)?;
    let mut records = 0;
    let mut bytes = 0;
    for t in &response.responses {
        for p in &t.partitions {
            if let Some(data) = p.records.as_ref() {
                let s = wire::scan_batches(data, 0, |_, v| {
                    if let Some(ts) = wire::value_timestamp_us(v) {
                        on_latency(ts);
                    }
                })?;
                records += s.records;
                bytes += s.value_bytes;
            }
        }
    }
    Ok((records, bytes))
}
