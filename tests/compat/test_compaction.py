"""Log compaction with confluent-kafka and kafka-python: a compacted topic created with configs is
cleaned down to the latest value per key (confluent-kafka and kafka-python consumers both read the
cleaned batches, gzip-compressed and with emptied batches), a tombstone goes after
delete.retention.ms, a keyless record is refused, and DescribeConfigs reports the policy."""
import time

import pytest
from confluent_kafka import Consumer, KafkaError, Producer, TopicPartition
from confluent_kafka.admin import AdminClient, ConfigResource, NewTopic
from kafka import KafkaConsumer
from kafka.structs import TopicPartition as KpTopicPartition

KEYS = [f"key{i}" for i in range(8)]


def _read_confluent(bootstrap, topic):
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": "unused", "enable.auto.commit": False,
                         "enable.partition.eof": True})
    consumer.assign([TopicPartition(topic, 0, -2)])
    got = []
    deadline = time.time() + 20
    while time.time() < deadline:
        msg = consumer.poll(0.2)
        if msg is None:
            continue
        if msg.error():
            if msg.error().code() == KafkaError._PARTITION_EOF:
                break
            raise AssertionError(msg.error())
        got.append((msg.offset(), msg.key().decode(), msg.value()))
    consumer.close()
    return got


def _read_kafka_python(bootstrap, topic):
    consumer = KafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False, consumer_timeout_ms=1500)
    tp = KpTopicPartition(topic, 0)
    consumer.assign([tp])
    consumer.seek_to_beginning(tp)
    end = consumer.end_offsets([tp])[tp]
    got = []
    deadline = time.time() + 20
    while consumer.position(tp) < end and time.time() < deadline:
        for records in consumer.poll(timeout_ms=300).values():
            got.extend((r.offset, r.key.decode(), r.value) for r in records)
    consumer.close()
    return got


def _wait_for(predicate, timeout=20):
    deadline = time.time() + timeout
    while time.time() < deadline:
        result = predicate()
        if result:
            return result
        time.sleep(0.3)
    return predicate()


def test_compacted_topic_with_python_clients(make_broker):
    broker = make_broker(shards=2, overrides=["log.cleaner.backoff.ms=100"]).start()
    admin = AdminClient({"bootstrap.servers": broker.bootstrap})
    topic = NewTopic("py-compacted", num_partitions=1, replication_factor=1, config={
        "cleanup.policy": "compact", "segment.ms": "200", "min.cleanable.dirty.ratio": "0.01",
        "delete.retention.ms": "2000"})
    for f in admin.create_topics([topic]).values():
        f.result(timeout=20)

    producer = Producer({"bootstrap.servers": broker.bootstrap, "acks": "all", "compression.type": "gzip",
                         "linger.ms": 5})
    errors = []
    for round_ in range(15):
        for key in KEYS:
            producer.produce("py-compacted", key=key, value=f"{key}-{round_}", partition=0,
                             on_delivery=lambda err, msg: errors.append(err) if err else None)
        producer.flush(20)
    producer.produce("py-compacted", key="key0", value=None, partition=0)
    assert producer.flush(20) == 0
    assert errors == []

    def cleaned():
        got = _read_confluent(broker.bootstrap, "py-compacted")
        return got if len(got) == len(KEYS) else None

    got = _wait_for(cleaned)
    assert got, "the topic was never cleaned down to one record per key"
    latest = {key: value for _, key, value in got}
    assert latest["key0"] is None
    assert all(latest[key] == f"{key}-14".encode() for key in KEYS[1:])

    # kafka-python reads the same cleaned log (rebuilt gzip batches, empty batches, offset gaps).
    kp = _read_kafka_python(broker.bootstrap, "py-compacted")
    assert [(o, k) for o, k, _ in kp] == [(o, k) for o, k, _ in got]

    # The tombstone goes after delete.retention.ms.
    gone = _wait_for(lambda: (lambda g: g if len(g) == len(KEYS) - 1 else None)(
        _read_confluent(broker.bootstrap, "py-compacted")))
    assert gone and all(key != "key0" for _, key, _ in gone)

    # A record without a key is refused.
    failures = []
    producer.produce("py-compacted", value="keyless", partition=0,
                     on_delivery=lambda err, msg: failures.append(err))
    producer.flush(20)
    assert len(failures) == 1 and failures[0] is not None
    assert failures[0].code() == KafkaError.INVALID_RECORD, failures[0]

    # DescribeConfigs reports the topic's policy.
    resource = ConfigResource("topic", "py-compacted")
    configs = admin.describe_configs([resource])[resource].result(timeout=20)
    assert configs["cleanup.policy"].value == "compact"
    assert configs["delete.retention.ms"].value == "2000"


def test_bad_compaction_config_is_refused(broker):
    admin = AdminClient({"bootstrap.servers": broker.bootstrap})
    topic = NewTopic("py-bad", num_partitions=1, replication_factor=1,
                     config={"min.cleanable.dirty.ratio": "2"})
    (future,) = admin.create_topics([topic]).values()
    with pytest.raises(Exception) as raised:
        future.result(timeout=20)
    assert raised.value.args[0].code() == KafkaError.INVALID_CONFIG
