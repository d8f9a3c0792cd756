//! A loopback TCP proxy in front of a broker that forwards Kafka frames unchanged but loses or delays
//! a fraction of Produce responses, so that a producer retries requests the broker already wrote.
//! One listener per shard (`base_port + shard` → `upstream + shard`); the broker advertises the
//! proxy's ports, so every client connection goes through it. The upstream port can change while
//! it runs, which lets a test restart the broker (on new ports) behind stable client-facing ports.
#![allow(dead_code)]

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU16, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

/// Kafka's Produce API key.
const PRODUCE: i16 = 0;
/// The largest frame the proxy forwards; anything larger closes the connection.
const FRAME_MAX_BYTES: usize = 64 << 20;

/// What the proxy does to Produce responses.
#[derive(Debug, Clone, Copy)]
pub struct FaultPlan {
    /// Fraction of Produce responses dropped; the client connection is then closed, as a network
    /// failure after the broker wrote the batch would look.
    pub drop_fraction: f64,
    /// Fraction of Produce responses held back for `delay` (beyond the client's request timeout).
    pub delay_fraction: f64,
    pub delay: Duration,
    /// Seed of the fault choices, printed so a failure can be replayed.
    pub seed: u64,
}

impl FaultPlan {
    /// Every response passes untouched.
    pub fn none(seed: u64) -> FaultPlan {
        FaultPlan {
            drop_fraction: 0.0,
            delay_fraction: 0.0,
            delay: Duration::ZERO,
            seed,
        }
    }
}

/// Counters of what the proxy did.
#[derive(Debug, Default)]
pub struct ProxyStats {
    pub produce_responses: AtomicU64,
    pub dropped: AtomicU64,
    pub delayed: AtomicU64,
    pub connections: AtomicU64,
}

struct Shared {
    plan: Mutex<FaultPlan>,
    upstream_base: AtomicU16,
    stop: AtomicBool,
    stats: ProxyStats,
    rng: Mutex<u64>,
    /// Every socket the proxy holds, so stopping can unblock every thread.
    sockets: Mutex<Vec<TcpStream>>,
}

impl Shared {
    /// A uniform number in [0, 1) from a xorshift generator.
    fn roll(&self) -> f64 {
        let mut state = self.rng.lock().unwrap();
        *state ^= *state << 13;
        *state ^= *state >> 7;
        *state ^= *state << 17;
        (*state >> 11) as f64 / (1u64 << 53) as f64
    }

    fn keep(&self, stream: &TcpStream) {
        if let Ok(clone) = stream.try_clone() {
            self.sockets.lock().unwrap().push(clone);
        }
    }
}

pub struct FaultProxy {
    pub base_port: u16,
    shards: usize,
    shared: Arc<Shared>,
    threads: Mutex<Vec<JoinHandle<()>>>,
}

impl FaultProxy {
    /// Listens on `shards` consecutive free loopback ports. No upstream yet: connections are
    /// refused (closed) until `set_upstream`.
    pub fn start(shards: usize, plan: FaultPlan) -> FaultProxy {
        eprintln!("fault proxy plan: {plan:?}");
        let (base_port, listeners) = super::bind_port_range(shards);
        let shared = Arc::new(Shared {
            plan: Mutex::new(plan),
            upstream_base: AtomicU16::new(0),
            stop: AtomicBool::new(false),
            stats: ProxyStats::default(),
            rng: Mutex::new(plan.seed | 1),
            sockets: Mutex::new(Vec::new()),
        });
        let mut threads = Vec::new();
        for (shard, listener) in listeners.into_iter().enumerate() {
            let shared = shared.clone();
            threads.push(std::thread::spawn(move || {
                accept_loop(listener, shard as u16, shared)
            }));
        }
        FaultProxy {
            base_port,
            shards,
            shared,
            threads: Mutex::new(threads),
        }
    }

    pub fn bootstrap(&self) -> String {
        format!("127.0.0.1:{}", self.base_port)
    }

    /// The `advertised.listeners` override that makes the broker send clients here.
    pub fn advertised_listeners(&self) -> String {
        format!(
            "advertised.listeners=PLAINTEXT://127.0.0.1:{}",
            self.base_port
        )
    }

    pub fn set_upstream(&self, broker_base_port: u16) {
        self.shared
            .upstream_base
            .store(broker_base_port, Ordering::SeqCst);
    }

    pub fn set_plan(&self, plan: FaultPlan) {
        *self.shared.plan.lock().unwrap() = plan;
    }

    pub fn stats(&self) -> &ProxyStats {
        &self.shared.stats
    }

    /// Closes every connection the proxy holds (clients reconnect through it).
    pub fn cut_all_connections(&self) {
        for socket in self.shared.sockets.lock().unwrap().drain(..) {
            let _ = socket.shutdown(Shutdown::Both);
        }
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        self.cut_all_connections();
        for shard in 0..self.shards {
            // Wake the accept loops.
            let _ = TcpStream::connect(("127.0.0.1", self.base_port + shard as u16));
        }
        for thread in self.threads.lock().unwrap().drain(..) {
            let _ = thread.join();
        }
    }
}

fn accept_loop(listener: TcpListener, shard: u16, shared: Arc<Shared>) {
    let mut connections = Vec::new();
    for incoming in listener.incoming() {
        if shared.stop.load(Ordering::SeqCst) {
            break;
        }
        let Ok(client) = incoming else { continue };
        shared.stats.connections.fetch_add(1, Ordering::Relaxed);
        let upstream_base = shared.upstream_base.load(Ordering::SeqCst);
        let upstream = (upstream_base != 0)
            .then(|| {
                TcpStream::connect_timeout(
                    &std::net::SocketAddr::from(([127, 0, 0, 1], upstream_base + shard)),
                    Duration::from_secs(2),
                )
                .ok()
            })
            .flatten();
        let Some(upstream) = upstream else {
            // The broker is down (being restarted): the client sees a closed connection.
            let _ = client.shutdown(Shutdown::Both);
            continue;
        };
        let _ = client.set_nodelay(true);
        let _ = upstream.set_nodelay(true);
        shared.keep(&client);
        shared.keep(&upstream);
        let in_flight: Arc<Mutex<HashMap<i32, i16>>> = Arc::default();
        let (client_read, upstream_write) =
            (client.try_clone().unwrap(), upstream.try_clone().unwrap());
        let requests_shared = shared.clone();
        let requests_in_flight = in_flight.clone();
        connections.push(std::thread::spawn(move || {
            forward_requests(
                client_read,
                upstream_write,
                requests_in_flight,
                requests_shared,
            )
        }));
        let responses_shared = shared.clone();
        connections.push(std::thread::spawn(move || {
            forward_responses(upstream, client, in_flight, responses_shared)
        }));
        connections.retain(|thread: &JoinHandle<()>| !thread.is_finished());
    }
    for thread in connections {
        let _ = thread.join();
    }
}

fn read_frame(stream: &mut TcpStream) -> Option<Vec<u8>> {
    let mut size = [0u8; 4];
    stream.read_exact(&mut size).ok()?;
    let size = i32::from_be_bytes(size);
    if size < 0 || size as usize > FRAME_MAX_BYTES {
        return None;
    }
    let mut frame = vec![0u8; 4 + size as usize];
    frame[..4].copy_from_slice(&size.to_be_bytes());
    stream.read_exact(&mut frame[4..]).ok()?;
    Some(frame)
}

/// Client → broker: remembers each request's API key by correlation id, forwards it unchanged.
fn forward_requests(
    mut client: TcpStream,
    mut upstream: TcpStream,
    in_flight: Arc<Mutex<HashMap<i32, i16>>>,
    shared: Arc<Shared>,
) {
    while let Some(frame) = read_frame(&mut client) {
        if frame.len() >= 12 {
            let api_key = i16::from_be_bytes([frame[4], frame[5]]);
            let correlation_id = i32::from_be_bytes([frame[8], frame[9], frame[10], frame[11]]);
            in_flight.lock().unwrap().insert(correlation_id, api_key);
        }
        if upstream.write_all(&frame).is_err() || shared.stop.load(Ordering::SeqCst) {
            break;
        }
    }
    let _ = upstream.shutdown(Shutdown::Both);
    let _ = client.shutdown(Shutdown::Both);
}

/// Broker → client: forwards responses, except that a Produce response may be dropped (and the
/// connection closed) or held back.
fn forward_responses(
    mut upstream: TcpStream,
    mut client: TcpStream,
    in_flight: Arc<Mutex<HashMap<i32, i16>>>,
    shared: Arc<Shared>,
) {
    while let Some(frame) = read_frame(&mut upstream) {
        if frame.len() >= 8 {
            let correlation_id = i32::from_be_bytes([frame[4], frame[5], frame[6], frame[7]]);
            let api_key = in_flight.lock().unwrap().remove(&correlation_id);
            if api_key == Some(PRODUCE) {
                shared
                    .stats
                    .produce_responses
                    .fetch_add(1, Ordering::Relaxed);
                let plan = *shared.plan.lock().unwrap();
                let roll = shared.roll();
                if roll < plan.drop_fraction {
                    shared.stats.dropped.fetch_add(1, Ordering::Relaxed);
                    break;
                }
                if roll < plan.drop_fraction + plan.delay_fraction {
                    shared.stats.delayed.fetch_add(1, Ordering::Relaxed);
                    // Bounded by the plan's delay; stopping the proxy ends it early.
                    let mut waited = Duration::ZERO;
                    while waited < plan.delay && !shared.stop.load(Ordering::SeqCst) {
                        std::thread::sleep(Duration::from_millis(20));
                        waited += Duration::from_millis(20);
                    }
                }
            }
        }
        if client.write_all(&frame).is_err() || shared.stop.load(Ordering::SeqCst) {
            break;
        }
    }
    let _ = client.shutdown(Shutdown::Both);
    let _ = upstream.shutdown(Shutdown::Both);
}
