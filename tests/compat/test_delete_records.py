"""DeleteRecords through confluent-kafka's and kafka-python's admin clients: the low watermark moves,
a consumer from the beginning starts there, and an offset beyond the high watermark is refused."""
import time

from confluent_kafka import Consumer, KafkaError, Producer, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic
from kafka.admin import KafkaAdminClient
from kafka.structs import TopicPartition as KpTopicPartition


def _produce(bootstrap, topic, partition, count):
    producer = Producer({"bootstrap.servers": bootstrap, "acks": "all"})
    for i in range(count):
        producer.produce(topic, value=f"v{i}", partition=partition)
    assert producer.flush(30) == 0


def test_confluent_kafka_delete_records(broker):
    admin = AdminClient({"bootstrap.servers": broker.bootstrap})
    for f in admin.create_topics([NewTopic("ck-trim", num_partitions=2, replication_factor=1)]).values():
        f.result(timeout=20)
    for partition in range(2):
        _produce(broker.bootstrap, "ck-trim", partition, 50)

    futures = admin.delete_records([TopicPartition("ck-trim", 0, 30), TopicPartition("ck-trim", 1, -1)])
    results = {tp.partition: f.result(timeout=20) for tp, f in futures.items()}
    assert results[0].low_watermark == 30
    assert results[1].low_watermark == 50

    consumer = Consumer({"bootstrap.servers": broker.bootstrap, "group.id": "unused", "enable.auto.commit": False})
    assert consumer.get_watermark_offsets(TopicPartition("ck-trim", 0), timeout=10) == (30, 50)
    consumer.assign([TopicPartition("ck-trim", 0, -2)])  # OFFSET_BEGINNING
    first = None
    deadline = time.time() + 20
    while first is None and time.time() < deadline:
        msg = consumer.poll(0.2)
        if msg is not None and msg.error() is None:
            first = msg
    consumer.close()
    assert first is not None and first.offset() == 30 and first.value() == b"v30"

    (future,) = admin.delete_records([TopicPartition("ck-trim", 0, 500)]).values()
    try:
        future.result(timeout=20)
        raise AssertionError("an offset beyond the high watermark was accepted")
    except Exception as error:  # confluent-kafka raises KafkaException wrapping the KafkaError
        assert error.args[0].code() == KafkaError.OFFSET_OUT_OF_RANGE, error


def test_kafka_python_delete_records(broker):
    admin = AdminClient({"bootstrap.servers": broker.bootstrap})
    for f in admin.create_topics([NewTopic("kp-trim", num_partitions=1, replication_factor=1)]).values():
        f.result(timeout=20)
    _produce(broker.bootstrap, "kp-trim", 0, 40)

    kp_admin = KafkaAdminClient(bootstrap_servers=broker.bootstrap)
    try:
        result = kp_admin.delete_records({KpTopicPartition("kp-trim", 0): 25})
    finally:
        kp_admin.close()
    (value,) = result.values()
    assert value["low_watermark"] == 25, result
    consumer = Consumer({"bootstrap.servers": broker.bootstrap, "group.id": "unused"})
    assert consumer.get_watermark_offsets(TopicPartition("kp-trim", 0), timeout=10) == (25, 40)
    consumer.close()
