"""kafka-python and confluent-kafka producers and consumers against ringbroker (no groups needed)."""
import time

import pytest
from confluent_kafka import Consumer, Producer, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic
from kafka import KafkaConsumer, KafkaProducer
from kafka.admin import KafkaAdminClient, NewTopic as KpNewTopic
from kafka.structs import TopicPartition as KpTopicPartition


def _create_topic_confluent(bootstrap, name, partitions):
    admin = AdminClient({"bootstrap.servers": bootstrap})
    futures = admin.create_topics([NewTopic(name, num_partitions=partitions, replication_factor=1)])
    for f in futures.values():
        f.result(timeout=20)


def test_confluent_kafka_round_trip(broker):
    _create_topic_confluent(broker.bootstrap, "ck-topic", 4)
    producer = Producer({"bootstrap.servers": broker.bootstrap, "acks": "all", "compression.type": "zstd"})
    errors = []
    for i in range(500):
        producer.produce("ck-topic", key=f"k{i}", value=f"v{i}",
                         headers=[("h", b"x")], on_delivery=lambda err, msg: errors.append(err) if err else None)
    assert producer.flush(30) == 0
    assert errors == []
    consumer = Consumer({"bootstrap.servers": broker.bootstrap, "group.id": "unused", "enable.auto.commit": False})
    consumer.assign([TopicPartition("ck-topic", p, 0) for p in range(4)])
    got = []
    deadline = time.time() + 30
    while len(got) < 500 and time.time() < deadline:
        msg = consumer.poll(0.2)
        if msg is not None and msg.error() is None:
            got.append((msg.key().decode(), msg.value().decode(), msg.headers()))
    consumer.close()
    assert sorted(v for _, v, _ in got) == sorted(f"v{i}" for i in range(500))
    assert all(h == [("h", b"x")] for _, _, h in got)


def test_kafka_python_round_trip(broker):
    admin = KafkaAdminClient(bootstrap_servers=broker.bootstrap)
    admin.create_topics([KpNewTopic("kp-topic", num_partitions=3, replication_factor=1)])
    admin.close()
    producer = KafkaProducer(bootstrap_servers=broker.bootstrap, acks=1, enable_idempotence=False,
                             compression_type="gzip")
    futures = [producer.send("kp-topic", key=f"k{i}".encode(), value=f"v{i}".encode()) for i in range(300)]
    producer.flush(30)
    metas = [f.get(timeout=30) for f in futures]
    assert {m.partition for m in metas} <= {0, 1, 2}
    consumer = KafkaConsumer(bootstrap_servers=broker.bootstrap, enable_auto_commit=False,
                             consumer_timeout_ms=2000)
    consumer.assign([KpTopicPartition("kp-topic", p) for p in range(3)])
    consumer.seek_to_beginning()
    got = []
    deadline = time.time() + 30
    while len(got) < 300 and time.time() < deadline:
        for records in consumer.poll(timeout_ms=500).values():
            got.extend(r.value.decode() for r in records)
    consumer.close()
    assert sorted(got) == sorted(f"v{i}" for i in range(300))


def test_kafka_python_offsets_for_times_and_end_offsets(broker):
    producer = KafkaProducer(bootstrap_servers=broker.bootstrap, acks=1, enable_idempotence=False)
    for i in range(10):
        producer.send("kp-times", partition=0, value=b"x", timestamp_ms=1_000_000 + i * 1000)
    producer.flush(30)
    consumer = KafkaConsumer(bootstrap_servers=broker.bootstrap, enable_auto_commit=False)
    tp = KpTopicPartition("kp-times", 0)
    assert consumer.end_offsets([tp])[tp] == 10
    assert consumer.beginning_offsets([tp])[tp] == 0
    found = consumer.offsets_for_times({tp: 1_004_500})[tp]
    assert found.offset == 5 and found.timestamp == 1_005_000
    consumer.close()
