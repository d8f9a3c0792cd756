//! ringbroker: a single-node, Kafka-wire-compatible message broker, thread-per-core on io_uring.
//!
//! The modules depend on each other one way only: `protocol` and `storage` do no socket IO and
//! know nothing of each other's callers; `shard` knows no Kafka; `broker` joins them; `server`
//! owns sockets; `node` wires everything together. docs/ARCHITECTURE.md is the map.

pub mod broker;
pub mod config;
pub mod node;
pub mod protocol;
pub mod server;
pub mod shard;
pub mod storage;
