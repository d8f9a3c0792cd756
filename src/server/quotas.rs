//! quotas: how many connections the node, each shard and each client address may hold
//! (`max.connections`, `ringbroker.max.connections.per.shard`, `max.connections.per.ip`), and which
//! connection makes room when a limit is reached: the one idle longest (no request in flight or
//! being read, oldest last activity), so idle clients never lock a working client out.
//!
//! The node-wide counts are the one piece of state the shards share: an atomic and a map behind a
//! mutex, touched only when a connection opens or closes, never per request. Each shard keeps its
//! own connections' activity in a thread-local registry, which another shard reaches through the
//! shard mailbox (`ShardContext::run_on`) when it needs a connection closed to make room.

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::net::IpAddr;
use std::rc::Rc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Instant;

use crate::config::Config;

/// The connection counts of one node, shared by its shards.
#[derive(Default)]
pub(crate) struct NodeConnections {
    open: AtomicUsize,
    per_ip: Mutex<HashMap<IpAddr, usize>>,
}

/// Which limit refused a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Refusal {
    /// `max.connections`, counted over the whole node.
    Node,
    /// `max.connections.per.ip`, for the connection's client address.
    Ip,
}

impl Refusal {
    pub(crate) fn key(self) -> &'static str {
        match self {
            Refusal::Node => "max.connections",
            Refusal::Ip => "max.connections.per.ip",
        }
    }
}

/// One connection's place in the node's counts, given back when dropped.
pub(crate) struct ConnectionPermit {
    node: Arc<NodeConnections>,
    ip: IpAddr,
}

impl Drop for ConnectionPermit {
    fn drop(&mut self) {
        self.node.open.fetch_sub(1, Ordering::AcqRel);
        let mut per_ip = self.node.per_ip.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(count) = per_ip.get_mut(&self.ip) {
            *count -= 1;
            if *count == 0 {
                per_ip.remove(&self.ip);
            }
        }
    }
}

impl NodeConnections {
    /// The counts of the node whose shards share `config` (one `Arc<Config>` per node; a process
    /// running several nodes, as tests do, keeps their counts apart).
    pub(crate) fn of(config: &Arc<Config>) -> Arc<NodeConnections> {
        static NODES: Mutex<Vec<(Weak<Config>, Arc<NodeConnections>)>> = Mutex::new(Vec::new());
        let mut nodes = NODES.lock().unwrap_or_else(|e| e.into_inner());
        nodes.retain(|(node_config, _)| node_config.strong_count() > 0);
        if let Some((_, counts)) = nodes
            .iter()
            .find(|(node_config, _)| std::ptr::eq(node_config.as_ptr(), Arc::as_ptr(config)))
        {
            return counts.clone();
        }
        let counts = Arc::new(NodeConnections::default());
        nodes.push((Arc::downgrade(config), counts.clone()));
        counts
    }

    /// Takes a place for a connection from `ip`, or says which limit is reached.
    pub(crate) fn try_acquire(
        self: &Arc<Self>,
        ip: IpAddr,
        max_connections: usize,
        max_connections_per_ip: usize,
    ) -> Result<ConnectionPermit, Refusal> {
        let mut per_ip = self.per_ip.lock().unwrap_or_else(|e| e.into_inner());
        // Under the map's lock, so two shards cannot both take the last place.
        if self.open.load(Ordering::Acquire) >= max_connections {
            return Err(Refusal::Node);
        }
        let count = per_ip.entry(ip).or_insert(0);
        if *count >= max_connections_per_ip {
            return Err(Refusal::Ip);
        }
        *count += 1;
        self.open.fetch_add(1, Ordering::AcqRel);
        Ok(ConnectionPermit {
            node: self.clone(),
            ip,
        })
    }
}

/// What the shard's registry knows of one of its connections, shared with the connection's task.
pub(crate) struct Activity {
    pub(crate) ip: IpAddr,
    /// When bytes last arrived or a reply last left.
    pub(crate) last_active_at: Cell<Instant>,
    /// Bytes of requests read and not yet answered (the connection's in-flight byte budget).
    pub(crate) inflight_bytes: Cell<u64>,
    /// The first bytes of a frame have arrived, not yet all of it.
    pub(crate) reading_frame: Cell<bool>,
    /// Set once the connection was told to close to make room.
    evicted: Cell<bool>,
    /// A token here tells the connection's reader to close.
    pub(crate) evict: (flume::Sender<()>, flume::Receiver<()>),
}

thread_local! {
    /// This shard's open connections by id.
    static CONNECTIONS: RefCell<HashMap<u64, Rc<Activity>>> = RefCell::new(HashMap::new());
}

/// Registers a new connection of this shard; the returned handle is updated by its task.
pub(crate) fn register(id: u64, ip: IpAddr) -> Rc<Activity> {
    let activity = Rc::new(Activity {
        ip,
        last_active_at: Cell::new(Instant::now()),
        inflight_bytes: Cell::new(0),
        reading_frame: Cell::new(false),
        evicted: Cell::new(false),
        evict: flume::bounded(1),
    });
    CONNECTIONS.with(|map| map.borrow_mut().insert(id, activity.clone()));
    activity
}

pub(crate) fn unregister(id: u64) {
    CONNECTIONS.with(|map| map.borrow_mut().remove(&id));
}

/// When this shard's connection idle longest (from `ip`, if given) was last active; `None` if no
/// connection of this shard is idle.
pub(crate) fn idle_since(ip: Option<IpAddr>) -> Option<Instant> {
    CONNECTIONS.with(|map| {
        map.borrow()
            .values()
            .filter(|a| is_idle(a, ip))
            .map(|a| a.last_active_at.get())
            .min()
    })
}

fn is_idle(activity: &Activity, ip: Option<IpAddr>) -> bool {
    activity.inflight_bytes.get() == 0
        && !activity.reading_frame.get()
        && !activity.evicted.get()
        && ip.is_none_or(|ip| activity.ip == ip)
}

/// Tells this shard's connection idle longest (from `ip`, if given) to close; `false` if no
/// connection of this shard is idle.
pub(crate) fn evict_idle_longest(ip: Option<IpAddr>) -> bool {
    CONNECTIONS.with(|map| {
        let map = map.borrow();
        let oldest = map
            .values()
            .filter(|a| is_idle(a, ip))
            .min_by_key(|a| a.last_active_at.get());
        match oldest {
            Some(activity) => {
                activity.evicted.set(true);
                let _ = activity.evict.0.try_send(());
                true
            }
            None => false,
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn permits_count_per_node_and_per_address() {
        let node = Arc::new(NodeConnections::default());
        let a: IpAddr = "127.0.0.1".parse().unwrap();
        let b: IpAddr = "127.0.0.2".parse().unwrap();
        let first = node.try_acquire(a, 3, 2).unwrap();
        let _second = node.try_acquire(a, 3, 2).unwrap();
        assert_eq!(node.try_acquire(a, 3, 2).err(), Some(Refusal::Ip));
        let _third = node.try_acquire(b, 3, 2).unwrap();
        assert_eq!(node.try_acquire(b, 3, 2).err(), Some(Refusal::Node));
        drop(first);
        assert!(node.try_acquire(a, 3, 2).is_ok());
    }

    #[test]
    fn the_connection_idle_longest_is_evicted_and_busy_ones_never() {
        let ip: IpAddr = "127.0.0.1".parse().unwrap();
        let older = register(1, ip);
        let busy = register(2, ip);
        busy.reading_frame.set(true);
        busy.last_active_at
            .set(Instant::now() - std::time::Duration::from_secs(60));
        let _newer = register(3, ip);
        older
            .last_active_at
            .set(Instant::now() - std::time::Duration::from_secs(10));
        assert!(evict_idle_longest(Some(ip)));
        assert!(older.evict.1.try_recv().is_ok());
        assert!(busy.evict.1.try_recv().is_err());
        assert!(!evict_idle_longest(Some("127.0.0.2".parse().unwrap())));
        for id in 1..=3 {
            unregister(id);
        }
    }
}
