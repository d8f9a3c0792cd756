//! ringbench: a Kafka-protocol load generator and latency harness. It measures any
//! Kafka-compatible broker (ringbroker, Kafka, Redpanda) the same way, open-loop, with
//! coordinated-omission-corrected latency, and writes self-describing reports.

pub mod broker;
pub mod ceiling;
pub mod client;
pub mod compare;
pub mod driver;
pub mod hosts;
pub mod matrix;
pub mod metrics;
pub mod native;
pub mod native_group;
pub mod pagecache;
pub mod proxy;
pub mod rdkafka_driver;
pub mod report;
pub mod run;
pub mod wire;
pub mod workload;
