"""Consumer groups with kafka-python and confluent-kafka: shared partitions, committed offsets."""
import threading
import time

from confluent_kafka import Consumer, Producer
from kafka import KafkaConsumer, KafkaProducer
from kafka.admin import KafkaAdminClient, NewTopic

GROUP_OVERRIDES = ["group.initial.rebalance.delay.ms=0"]


def _produce(bootstrap, topic, count, prefix):
    producer = KafkaProducer(bootstrap_servers=bootstrap, acks="all", enable_idempotence=False)
    for i in range(count):
        producer.send(topic, key=f"k{i}".encode(), value=f"{prefix}-{i}".encode())
    producer.flush(30)
    producer.close()


def test_kafka_python_group_shares_partitions_and_resumes(make_broker):
    b = make_broker(overrides=GROUP_OVERRIDES).start()
    admin = KafkaAdminClient(bootstrap_servers=b.bootstrap)
    admin.create_topics([NewTopic("kpg", num_partitions=6, replication_factor=1)])
    admin.close()
    _produce(b.bootstrap, "kpg", 300, "first")

    seen = {0: [], 1: [], 2: []}
    stop = threading.Event()

    def run(i):
        consumer = KafkaConsumer("kpg", bootstrap_servers=b.bootstrap, group_id="kp-group",
                                 auto_offset_reset="earliest", enable_auto_commit=False)
        deadline = time.time() + 60
        while not stop.is_set() and time.time() < deadline:
            for records in consumer.poll(timeout_ms=200).values():
                for r in records:
                    seen[i].append((r.partition, r.value.decode()))
                consumer.commit()
        consumer.close()

    threads = [threading.Thread(target=run, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    deadline = time.time() + 45
    while time.time() < deadline and sum(len(v) for v in seen.values()) < 300:
        time.sleep(0.2)
    time.sleep(1)
    stop.set()
    for t in threads:
        t.join(30)
    all_values = [v for values in seen.values() for _, v in values]
    assert sorted(all_values) == sorted(f"first-{i}" for i in range(300))
    owners = {}
    for member, values in seen.items():
        for partition, _ in values:
            owners.setdefault(partition, set()).add(member)

    # A new consumer in the same group resumes after the committed offsets: only new records.
    _produce(b.bootstrap, "kpg", 50, "second")
    consumer = KafkaConsumer("kpg", bootstrap_servers=b.bootstrap, group_id="kp-group",
                             auto_offset_reset="earliest", enable_auto_commit=False)
    got = []
    deadline = time.time() + 30
    while time.time() < deadline and len(got) < 50:
        for records in consumer.poll(timeout_ms=200).values():
            got.extend(r.value.decode() for r in records)
    consumer.close()
    assert sorted(got) == sorted(f"second-{i}" for i in range(50))


def test_confluent_kafka_group_commits_survive_broker_restart(make_broker):
    b = make_broker(overrides=GROUP_OVERRIDES).start()
    p = Producer({"bootstrap.servers": b.bootstrap, "acks": "all"})
    for i in range(100):
        p.produce("ckg", value=f"a-{i}")
    p.flush(30)
    c = Consumer({"bootstrap.servers": b.bootstrap, "group.id": "ck-group", "auto.offset.reset": "earliest",
                  "enable.auto.commit": False})
    c.subscribe(["ckg"])
    got = 0
    deadline = time.time() + 30
    while got < 100 and time.time() < deadline:
        msg = c.poll(0.2)
        if msg is not None and msg.error() is None:
            got += 1
    c.commit(asynchronous=False)
    c.close()
    assert got == 100
    assert b.stop() == 0
    b.start()
    p = Producer({"bootstrap.servers": b.bootstrap, "acks": "all"})
    for i in range(10):
        p.produce("ckg", value=f"b-{i}")
    p.flush(30)
    c = Consumer({"bootstrap.servers": b.bootstrap, "group.id": "ck-group", "auto.offset.reset": "earliest",
                  "enable.auto.commit": False})
    c.subscribe(["ckg"])
    values = []
    deadline = time.time() + 30
    while len(values) < 10 and time.time() < deadline:
        msg = c.poll(0.2)
        if msg is not None and msg.error() is None:
            values.append(msg.value().decode())
    time.sleep(0.5)
    c.close()
    assert sorted(values) == sorted(f"b-{i}" for i in range(10))
