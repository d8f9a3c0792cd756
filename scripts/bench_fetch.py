#!/usr/bin/env python3
"""Fetch through splice vs the copy path, end to end: one broker shard pinned to one core, a
librdkafka consumer (confluent-kafka) pinned to the other, 1 GiB in 16 KiB records. Reports consume
throughput and the broker's CPU seconds per GiB read (utime+stime from /proc), for each mode.

Usage: .venv/bin/python scripts/bench_fetch.py target/release/ringbroker [GiB]
"""
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

from confluent_kafka import Consumer, Producer, TopicPartition

BIN = sys.argv[1]
GIB = float(sys.argv[2]) if len(sys.argv) > 2 else 1.0
RECORD = 16 * 1024
COUNT = int(GIB * (1 << 30) / RECORD)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cpu_seconds(pid):
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def run(mode, splice_min):
    data = tempfile.mkdtemp(prefix="bench-fetch-")
    port = free_port()
    broker = subprocess.Popen(
        ["taskset", "-c", "0", BIN, "--shards", "1",
         "--override", f"listeners=PLAINTEXT://127.0.0.1:{port}",
         "--override", f"log.dirs={data}",
         "--override", f"ringbroker.fetch.splice.min.bytes={splice_min}"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for _ in range(200):
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                time.sleep(0.05)
        os.sched_setaffinity(0, {1})
        producer = Producer({"bootstrap.servers": f"127.0.0.1:{port}", "linger.ms": 20,
                             "batch.size": 1 << 20, "acks": 1})
        payload = b"x" * RECORD
        for _ in range(COUNT):
            while True:
                try:
                    producer.produce("fetch-bench", payload, partition=0)
                    break
                except BufferError:
                    producer.poll(0.01)
        producer.flush(120)
        consumer = Consumer({"bootstrap.servers": f"127.0.0.1:{port}", "group.id": "unused",
                             "enable.auto.commit": False, "fetch.max.bytes": 64 << 20,
                             "max.partition.fetch.bytes": 16 << 20, "fetch.wait.max.ms": 50})
        consumer.assign([TopicPartition("fetch-bench", 0, 0)])
        cpu_before = cpu_seconds(broker.pid)
        start = time.time()
        got = 0
        deadline = start + 300
        while got < COUNT and time.time() < deadline:
            for msg in consumer.consume(num_messages=10000, timeout=0.5):
                if msg.error() is None:
                    got += 1
        elapsed = time.time() - start
        cpu = cpu_seconds(broker.pid) - cpu_before
        consumer.close()
        gib = got * RECORD / (1 << 30)
        print(f"{mode:6s} records={got}/{COUNT} GiB={gib:.2f} elapsed={elapsed:.2f}s "
              f"rate={gib / elapsed * 1024:.0f} MiB/s broker_cpu={cpu:.2f}s cpu_per_gib={cpu / gib:.3f}s",
              flush=True)
    finally:
        broker.send_signal(signal.SIGTERM)
        broker.wait(30)
        shutil.rmtree(data, ignore_errors=True)


run("splice", 0)
run("copy", 2147483647)
run("splice", 0)
run("copy", 2147483647)
