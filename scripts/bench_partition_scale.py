#!/usr/bin/env python3
"""Partition scale on one shard: for each partition count, the time to create the topics (CreateTopics
of at most 10,000 partitions each, Kafka's per-topic cap), the broker's idle RSS per partition, the
SIGTERM exit time and status, and the restart-to-serving time (spawn until a Metadata answer listing
every partition and an acks=all produce to the last partition succeed), then a second SIGTERM.

The broker is pinned to core 0 with taskset, the client to core 1.

Usage: .venv/bin/python scripts/bench_partition_scale.py target/release/ringbroker [count ...]
"""
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

from confluent_kafka import Producer
from confluent_kafka.admin import AdminClient, NewTopic

BIN = sys.argv[1]
COUNTS = [int(arg) for arg in sys.argv[2:]] or [1_000, 10_000, 50_000]
PER_TOPIC = 10_000


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_kib(pid):
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def start(data_dir, port, budget, log):
    return subprocess.Popen(
        [
            "taskset", "-c", "0", BIN, "--shards", "1",
            "--override", f"listeners=PLAINTEXT://127.0.0.1:{port}",
            "--override", f"log.dirs={data_dir}",
            "--override", f"ringbroker.max.partitions.per.shard={budget}",
            "--override", "ringbroker.shutdown.timeout.ms=60000",
        ],
        stdout=subprocess.DEVNULL,
        stderr=log,
    )


def partitions_listed(admin):
    try:
        metadata = admin.list_topics(timeout=2)
    except Exception:
        return -1
    return sum(len(t.partitions) for name, t in metadata.topics.items() if name.startswith("scale"))


def wait_serving(broker, bootstrap, expected, last_topic):
    admin = AdminClient({"bootstrap.servers": bootstrap})
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        if broker.poll() is not None:
            raise SystemExit(f"broker exited with {broker.returncode}")
        if partitions_listed(admin) == expected:
            break
        time.sleep(0.02)
    if expected:
        producer = Producer({"bootstrap.servers": bootstrap, "acks": "all", "linger.ms": 0})
        done = []
        producer.produce(last_topic[0], b"probe", partition=last_topic[1],
                         on_delivery=lambda err, msg: done.append(err))
        producer.flush(60)
        assert done == [None], done


def stop(broker):
    started = time.monotonic()
    broker.send_signal(signal.SIGTERM)
    code = broker.wait(timeout=600)
    return time.monotonic() - started, code


def run(count):
    data_dir = tempfile.mkdtemp(prefix="ringbroker-scale-")
    log_path = os.path.join(data_dir, "..", os.path.basename(data_dir) + ".log")
    port = free_port()
    bootstrap = f"127.0.0.1:{port}"
    topics = []
    left = count
    while left > 0:
        topics.append((f"scale{len(topics)}", min(PER_TOPIC, left)))
        left -= topics[-1][1]
    last = (topics[-1][0], topics[-1][1] - 1)
    with open(log_path, "w") as log:
        broker = start(data_dir, port, count, log)
        wait_serving(broker, bootstrap, 0, None)
        time.sleep(1)
        rss_before = rss_kib(broker.pid)
        admin = AdminClient({"bootstrap.servers": bootstrap, "socket.timeout.ms": 300_000})
        started = time.monotonic()
        for name, partitions in topics:
            futures = admin.create_topics(
                [NewTopic(name, partitions, 1)], operation_timeout=600, request_timeout=600)
            for future in futures.values():
                future.result()
        create_s = time.monotonic() - started
        time.sleep(2)
        rss_after = rss_kib(broker.pid)
        stop_s, stop_code = stop(broker)
        started = time.monotonic()
        broker = start(data_dir, port, count, log)
        wait_serving(broker, bootstrap, count, last)
        restart_s = time.monotonic() - started
        time.sleep(1)
        rss_restarted = rss_kib(broker.pid)
        stop2_s, stop2_code = stop(broker)
    shutil.rmtree(data_dir, ignore_errors=True)
    per_partition = (rss_after - rss_before) * 1024 / count
    per_partition_restarted = (rss_restarted - rss_before) * 1024 / count
    print(
        f"| {count:,} | {create_s:.2f} | {stop_s:.2f} (exit {stop_code}) | {restart_s:.2f} | "
        f"{stop2_s:.2f} (exit {stop2_code}) | {per_partition / 1024:.1f} | "
        f"{per_partition_restarted / 1024:.1f} |",
        flush=True,
    )


if __name__ == "__main__":
    print("| partitions | create s | SIGTERM s (status) | restart to serving s | second SIGTERM s (status) "
          "| idle RSS KiB/partition after create | after restart |")
    print("|---|---|---|---|---|---|---|")
    for count in COUNTS:
        run(count)
