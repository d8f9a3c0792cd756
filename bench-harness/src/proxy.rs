//! A Kafka-aware TCP proxy that delays every response by a fixed time: the instrument that
//! proves the harness's latency accounting (and a way to emulate a network hop). It fronts every
//! broker node with its own local port and rewrites the addresses in Metadata and
//! FindCoordinator responses, so clients that follow the advertised leaders stay behind it.

use std::collections::{BTreeMap, VecDeque};
use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::sync_channel;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{Context, anyhow, bail};
use bytes::{Bytes, BytesMut};
use kafka_protocol::messages::{
    ApiKey, FindCoordinatorResponse, MetadataRequest, MetadataResponse, ProduceRequest,
    RequestHeader,
};
use kafka_protocol::protocol::{Decodable, Encodable, HeaderVersion, StrBytes};

use crate::wire;

/// Largest frame the proxy forwards (Kafka's default socket.request.max.bytes).
const MAX_FRAME_BYTES: usize = 100 * 1024 * 1024;
/// Responses read from the broker but not yet released to the client, per connection.
const RESPONSE_QUEUE_DEPTH: usize = 4096;

/// The running proxy. Dropping it closes every listener and connection.
pub struct DelayProxy {
    /// Upstream node address → local address.
    pub routes: BTreeMap<SocketAddr, SocketAddr>,
    bootstrap: SocketAddr,
    stop: Arc<AtomicBool>,
    connections: Arc<Mutex<Vec<TcpStream>>>,
    acceptors: Vec<JoinHandle<()>>,
}

type PendingRequests = Arc<Mutex<VecDeque<(i32, i16, i16)>>>;

fn read_frame(stream: &mut TcpStream) -> std::io::Result<Option<Vec<u8>>> {
    let mut size = [0u8; 4];
    match stream.read_exact(&mut size) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e),
    }
    let n = i32::from_be_bytes(size);
    if n < 0 || n as usize > MAX_FRAME_BYTES {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("frame size {n}"),
        ));
    }
    let mut frame = vec![0u8; 4 + n as usize];
    frame[..4].copy_from_slice(&size);
    stream.read_exact(&mut frame[4..])?;
    Ok(Some(frame))
}

/// One synchronous Metadata call, to learn the broker nodes before listening for them.
fn fetch_brokers(bootstrap: SocketAddr) -> anyhow::Result<Vec<SocketAddr>> {
    let mut stream = TcpStream::connect_timeout(&bootstrap, Duration::from_secs(10))?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    let version = 4;
    let header = RequestHeader::default()
        .with_request_api_key(ApiKey::Metadata as i16)
        .with_request_api_version(version)
        .with_correlation_id(1)
        .with_client_id(Some(StrBytes::from_static_str("ringbench-proxy")));
    let mut buf = BytesMut::new();
    buf.extend_from_slice(&[0; 4]);
    header.encode(&mut buf, MetadataRequest::header_version(version))?;
    MetadataRequest::default()
        .with_topics(Some(Vec::new()))
        .encode(&mut buf, version)?;
    let size = (buf.len() - 4) as i32;
    buf[..4].copy_from_slice(&size.to_be_bytes());
    stream.write_all(&buf)?;
    let frame = read_frame(&mut stream)?.ok_or_else(|| anyhow!("broker closed during Metadata"))?;
    let (_, mut body) = wire::split_response_header(
        Bytes::from(frame).slice(4..),
        MetadataResponse::header_version(version),
    )?;
    let response = MetadataResponse::decode(&mut body, version)?;
    let mut nodes = Vec::new();
    for b in response.brokers {
        nodes.push(crate::client::resolve(&format!(
            "{}:{}",
            b.host.as_str(),
            b.port
        ))?);
    }
    if nodes.is_empty() {
        bail!("broker at {bootstrap} advertised no nodes");
    }
    Ok(nodes)
}

impl DelayProxy {
    /// Fronts the cluster reachable at `upstream_bootstrap`, delaying every response by `delay`.
    pub fn start(upstream_bootstrap: SocketAddr, delay: Duration) -> anyhow::Result<DelayProxy> {
        let mut nodes = fetch_brokers(upstream_bootstrap)?;
        if !nodes.contains(&upstream_bootstrap) {
            nodes.push(upstream_bootstrap);
        }
        let stop = Arc::new(AtomicBool::new(false));
        let connections: Arc<Mutex<Vec<TcpStream>>> = Arc::new(Mutex::new(Vec::new()));
        let mut routes = BTreeMap::new();
        let mut listeners = Vec::new();
        for upstream in &nodes {
            let listener = TcpListener::bind("127.0.0.1:0")?;
            routes.insert(*upstream, listener.local_addr()?);
            listeners.push((listener, *upstream));
        }
        let routes_shared = Arc::new(routes.clone());
        let mut acceptors = Vec::new();
        for (listener, upstream) in listeners {
            listener.set_nonblocking(true)?;
            let (stop, connections, routes) =
                (stop.clone(), connections.clone(), routes_shared.clone());
            acceptors.push(std::thread::Builder::new().name("rb-proxy-accept".into()).spawn(move || {
                while !stop.load(Ordering::Acquire) {
                    match listener.accept() {
                        Ok((client, _)) => {
                            let _ = client.set_nonblocking(false);
                            if let Err(e) = serve(client, upstream, delay, routes.clone(), connections.clone()) {
                                eprintln!("ringbench proxy: connection to {upstream} failed: {e:#}");
                            }
                        }
                        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => std::thread::sleep(Duration::from_millis(5)),
                        Err(_) => std::thread::sleep(Duration::from_millis(5)),
                    }
                }
            })?);
        }
        Ok(DelayProxy {
            bootstrap: routes[&upstream_bootstrap],
            routes,
            stop,
            connections,
            acceptors,
        })
    }

    /// The address clients should bootstrap from.
    pub fn bootstrap(&self) -> String {
        self.bootstrap.to_string()
    }
}

impl Drop for DelayProxy {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        if let Ok(conns) = self.connections.lock() {
            for c in conns.iter() {
                let _ = c.shutdown(Shutdown::Both);
            }
        }
        for a in self.acceptors.drain(..) {
            let _ = a.join();
        }
    }
}

/// Starts the three threads of one proxied connection.
fn serve(
    client: TcpStream,
    upstream: SocketAddr,
    delay: Duration,
    routes: Arc<BTreeMap<SocketAddr, SocketAddr>>,
    connections: Arc<Mutex<Vec<TcpStream>>>,
) -> anyhow::Result<()> {
    let server =
        TcpStream::connect(upstream).with_context(|| format!("connecting to {upstream}"))?;
    client.set_nodelay(true)?;
    server.set_nodelay(true)?;
    if let Ok(mut c) = connections.lock() {
        c.push(client.try_clone()?);
        c.push(server.try_clone()?);
    }
    let pending: PendingRequests = Arc::new(Mutex::new(VecDeque::new()));
    let (tx, rx) = sync_channel::<(Vec<u8>, Instant)>(RESPONSE_QUEUE_DEPTH);

    // Client → broker: note what each request expects, forward it unchanged.
    {
        let (mut from, mut to, pending) =
            (client.try_clone()?, server.try_clone()?, pending.clone());
        std::thread::Builder::new()
            .name("rb-proxy-up".into())
            .spawn(move || {
                while let Ok(Some(frame)) = read_frame(&mut from) {
                    if let Some(expect) = expected_response(&frame)
                        && let Ok(mut p) = pending.lock()
                    {
                        p.push_back(expect);
                    }
                    if to.write_all(&frame).is_err() {
                        break;
                    }
                }
                let _ = to.shutdown(Shutdown::Both);
                let _ = from.shutdown(Shutdown::Both);
            })?;
    }
    // Broker → queue: stamp each response's arrival.
    {
        let mut from = server.try_clone()?;
        std::thread::Builder::new()
            .name("rb-proxy-down".into())
            .spawn(move || {
                while let Ok(Some(frame)) = read_frame(&mut from) {
                    if tx.send((frame, Instant::now())).is_err() {
                        break;
                    }
                }
            })?;
    }
    // Queue → client: hold each response until arrival + delay, rewrite addresses, forward.
    {
        let mut to = client;
        std::thread::Builder::new()
            .name("rb-proxy-delay".into())
            .spawn(move || {
                for (frame, arrived) in rx {
                    let expect = pending.lock().ok().and_then(|mut p| p.pop_front());
                    let frame = match expect {
                        Some((_, key, version)) => rewrite(frame, key, version, &routes),
                        None => frame,
                    };
                    let due = arrived + delay;
                    let now = Instant::now();
                    if due > now {
                        std::thread::sleep(due - now);
                    }
                    if to.write_all(&frame).is_err() {
                        break;
                    }
                }
                let _ = to.shutdown(Shutdown::Both);
                let _ = server.shutdown(Shutdown::Both);
            })?;
    }
    Ok(())
}

/// (correlation id, api key, version) of a request that will get a response; `None` for a
/// Produce with acks=0, which gets none.
fn expected_response(frame: &[u8]) -> Option<(i32, i16, i16)> {
    let mut body = Bytes::copy_from_slice(frame.get(4..)?);
    if body.len() < 8 {
        return None;
    }
    let key = i16::from_be_bytes([body[0], body[1]]);
    let version = i16::from_be_bytes([body[2], body[3]]);
    let correlation = i32::from_be_bytes([body[4], body[5], body[6], body[7]]);
    if key == ApiKey::Produce as i16 {
        let header = kafka_protocol::protocol::decode_request_header_from_buffer(&mut body).ok()?;
        let request = ProduceRequest::decode(&mut body, header.request_api_version).ok()?;
        if request.acks == 0 {
            return None;
        }
    }
    Some((correlation, key, version))
}

/// Rewrites broker addresses in Metadata and FindCoordinator responses to the proxy's ports.
/// Any response it cannot decode is forwarded unchanged (the client will then see the error).
fn rewrite(
    frame: Vec<u8>,
    key: i16,
    version: i16,
    routes: &BTreeMap<SocketAddr, SocketAddr>,
) -> Vec<u8> {
    let map = |host: &StrBytes, port: i32| -> Option<(StrBytes, i32)> {
        let upstream = crate::client::resolve(&format!("{}:{}", host.as_str(), port)).ok()?;
        let local = routes.get(&upstream)?;
        Some((
            StrBytes::from_string(local.ip().to_string()),
            local.port() as i32,
        ))
    };
    let attempt = || -> anyhow::Result<Vec<u8>> {
        let whole = Bytes::from(frame.clone()).slice(4..);
        if key == ApiKey::Metadata as i16 {
            let (_, mut body) = wire::split_response_header(
                whole.clone(),
                MetadataResponse::header_version(version),
            )?;
            let header_len = whole.len() - body.len();
            let mut response = MetadataResponse::decode(&mut body, version)?;
            for b in &mut response.brokers {
                if let Some((h, p)) = map(&b.host, b.port) {
                    b.host = h;
                    b.port = p;
                }
            }
            reencode(&whole[..header_len], |out| response.encode(out, version))
        } else if key == ApiKey::FindCoordinator as i16 {
            let (_, mut body) = wire::split_response_header(
                whole.clone(),
                FindCoordinatorResponse::header_version(version),
            )?;
            let header_len = whole.len() - body.len();
            let mut response = FindCoordinatorResponse::decode(&mut body, version)?;
            if let Some((h, p)) = map(&response.host, response.port) {
                response.host = h;
                response.port = p;
            }
            for c in &mut response.coordinators {
                if let Some((h, p)) = map(&c.host, c.port) {
                    c.host = h;
                    c.port = p;
                }
            }
            reencode(&whole[..header_len], |out| response.encode(out, version))
        } else {
            Ok(frame.clone())
        }
    };
    attempt().unwrap_or(frame)
}

fn reencode(
    header: &[u8],
    encode: impl FnOnce(&mut BytesMut) -> anyhow::Result<()>,
) -> anyhow::Result<Vec<u8>> {
    let mut out = BytesMut::new();
    out.extend_from_slice(&[0; 4]);
    out.extend_from_slice(header);
    encode(&mut out)?;
    let size = (out.len() - 4) as i32;
    out[..4].copy_from_slice(&size.to_be_bytes());
    Ok(out.to_vec())
}
