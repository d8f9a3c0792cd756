"""Stream-processing frameworks against ringbroker: a quixstreams stateful application whose state
store is backed by a compacted changelog topic on the broker, restarted midway with its local state
deleted, so it must recover its counts from the broker."""
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

from confluent_kafka import Consumer, Producer, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic

APP = os.path.join(os.path.dirname(__file__), "streams_count_app.py")
KEYS = [f"k{i}" for i in range(5)]
APP_TIMEOUT_S = 120


def _create_topic(bootstrap, name, partitions, config=None):
    admin = AdminClient({"bootstrap.servers": bootstrap})
    futures = admin.create_topics([NewTopic(name, num_partitions=partitions, replication_factor=1,
                                            config=config or {})])
    for f in futures.values():
        f.result(timeout=20)


def _produce(bootstrap, topic, start, count):
    producer = Producer({"bootstrap.servers": bootstrap, "acks": "all"})
    for i in range(start, start + count):
        key = KEYS[i % len(KEYS)]
        producer.produce(topic, key=key, value=json.dumps({"key": key, "n": i}))
    assert producer.flush(30) == 0


def _produce_to(bootstrap, topic, start, count):
    """Keyed plain-string records, as the faust worker reads them."""
    producer = Producer({"bootstrap.servers": bootstrap, "acks": "all"})
    for i in range(start, start + count):
        producer.produce(topic, key=KEYS[i % len(KEYS)], value=str(i))
    assert producer.flush(30) == 0


def _run_app(bootstrap, group, state_dir, count, guarantee="at-least-once"):
    result = subprocess.run(
        [sys.executable, APP, bootstrap, "streams-in", "streams-out", group, state_dir, str(count), guarantee],
        capture_output=True, timeout=APP_TIMEOUT_S)
    assert result.returncode == 0, result.stderr.decode(errors="replace")[-4000:]


def _read_all(bootstrap, topic, partitions, want):
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": "streams-reader",
                         "enable.auto.commit": False})
    consumer.assign([TopicPartition(topic, p, 0) for p in range(partitions)])
    got = []
    deadline = time.time() + 30
    while len(got) < want and time.time() < deadline:
        msg = consumer.poll(0.2)
        if msg is not None and msg.error() is None:
            got.append(json.loads(msg.value()))
    consumer.close()
    return got


def test_quixstreams_counts_survive_a_restart_without_local_state(broker):
    _create_topic(broker.bootstrap, "streams-in", 2)
    _create_topic(broker.bootstrap, "streams-out", 2)
    _produce(broker.bootstrap, "streams-in", 0, 100)
    state_dir = tempfile.mkdtemp(prefix="quix-state-")
    try:
        _run_app(broker.bootstrap, "counter", state_dir, 100)
        # Losing the local state store forces the restarted application to restore it from the
        # compacted changelog topic the broker keeps.
        shutil.rmtree(state_dir)
        _produce(broker.bootstrap, "streams-in", 100, 100)
        _run_app(broker.bootstrap, "counter", state_dir, 100)
    finally:
        shutil.rmtree(state_dir, ignore_errors=True)
    outputs = _read_all(broker.bootstrap, "streams-out", 2, 200)
    per_key = {}
    for out in outputs:
        per_key.setdefault(out["key"], []).append(out["count"])
    # Each key saw 40 records; its counts are 1..40 exactly once each, in order per key.
    assert {k: sorted(v) for k, v in per_key.items()} == {k: list(range(1, 41)) for k in KEYS}


FAUST_APP = os.path.join(os.path.dirname(__file__), "faust_count_app.py")


def _faust_worker(bootstrap, data_dir, log_path):
    env = dict(os.environ, FAUST_BOOTSTRAP=bootstrap, FAUST_INPUT="faust-in", FAUST_OUTPUT="faust-out",
               FAUST_DATA=data_dir)
    log = open(log_path, "ab")
    return subprocess.Popen([sys.executable, FAUST_APP, "worker", "-l", "info"], env=env,
                            stdin=subprocess.DEVNULL, stdout=log, stderr=log)


def _stop(proc):
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _wait_for_outputs(bootstrap, topic, partitions, want, timeout_s, worker, log_path):
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": "faust-reader",
                         "enable.auto.commit": False})
    consumer.assign([TopicPartition(topic, p, 0) for p in range(partitions)])
    got = []
    deadline = time.time() + timeout_s
    try:
        while len(got) < want and time.time() < deadline:
            assert worker.poll() is None, open(log_path, errors="replace").read()[-4000:]
            msg = consumer.poll(0.2)
            if msg is not None and msg.error() is None:
                got.append(json.loads(msg.value()))
    finally:
        consumer.close()
    if len(got) < want:
        per_key = {}
        for out in got:
            per_key.setdefault(out["key"], []).append(out["count"])
        raise AssertionError(f"{len(got)} of {want} outputs: {per_key}\n"
                             + open(log_path, errors="replace").read()[-3000:])
    return got


def test_faust_table_counts_survive_a_worker_restart(broker):
    _create_topic(broker.bootstrap, "faust-in", 2)
    _create_topic(broker.bootstrap, "faust-out", 2)
    tmp = tempfile.mkdtemp(prefix="faust-")
    log_path = os.path.join(tmp, "worker.log")
    try:
        worker = _faust_worker(broker.bootstrap, os.path.join(tmp, "data1"), log_path)
        try:
            _produce_to(broker.bootstrap, "faust-in", 0, 100)
            _wait_for_outputs(broker.bootstrap, "faust-out", 2, 100, 90, worker, log_path)
        finally:
            _stop(worker)
        # A fresh data dir and an in-memory store: the restarted worker rebuilds its table from the
        # compacted changelog topic on the broker.
        worker = _faust_worker(broker.bootstrap, os.path.join(tmp, "data2"), log_path)
        try:
            _produce_to(broker.bootstrap, "faust-in", 100, 100)
            outputs = _wait_for_outputs(broker.bootstrap, "faust-out", 2, 200, 90, worker, log_path)
        finally:
            _stop(worker)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    per_key = {}
    for out in outputs:
        per_key.setdefault(out["key"], []).append(out["count"])
    assert {k: sorted(v) for k, v in per_key.items()} == {k: list(range(1, 41)) for k in KEYS}
