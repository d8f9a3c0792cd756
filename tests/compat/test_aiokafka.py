"""aiokafka (asyncio Kafka client) against ringbroker: produce, fetch, consumer groups, commits."""
import asyncio

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

# Every await below is bounded, so a broker that stops answering fails the test instead of hanging it.
STEP_TIMEOUT_S = 30


async def _create_topic(bootstrap, name, partitions):
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await asyncio.wait_for(admin.start(), STEP_TIMEOUT_S)
    try:
        await asyncio.wait_for(
            admin.create_topics([NewTopic(name, num_partitions=partitions, replication_factor=1)]),
            STEP_TIMEOUT_S)
    finally:
        await admin.close()


async def _produce(bootstrap, topic, count, prefix="v", **settings):
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, **settings)
    await asyncio.wait_for(producer.start(), STEP_TIMEOUT_S)
    try:
        futures = [await producer.send(topic, key=f"k{i}".encode(), value=f"{prefix}{i}".encode(),
                                       headers=[("h", b"x")])
                   for i in range(count)]
        return [await asyncio.wait_for(f, STEP_TIMEOUT_S) for f in futures]
    finally:
        await producer.stop()


async def _consume_group(bootstrap, topic, group, want, commit):
    """Reads `want` records as a member of `group`; commits what it read when asked to."""
    consumer = AIOKafkaConsumer(topic, bootstrap_servers=bootstrap, group_id=group,
                                auto_offset_reset="earliest", enable_auto_commit=False)
    await asyncio.wait_for(consumer.start(), STEP_TIMEOUT_S)
    got = []
    try:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + STEP_TIMEOUT_S
        while len(got) < want and loop.time() < deadline:
            batches = await consumer.getmany(timeout_ms=500, max_records=want - len(got))
            for records in batches.values():
                got.extend(records)
        if commit:
            await asyncio.wait_for(consumer.commit(), STEP_TIMEOUT_S)
    finally:
        await consumer.stop()
    return got


def test_aiokafka_round_trip_with_compression_and_headers(broker):
    async def scenario():
        await _create_topic(broker.bootstrap, "aio-topic", 3)
        metas = await _produce(broker.bootstrap, "aio-topic", 400, acks="all", compression_type="gzip",
                               linger_ms=5)
        assert {m.partition for m in metas} <= {0, 1, 2}
        consumer = AIOKafkaConsumer(bootstrap_servers=broker.bootstrap, enable_auto_commit=False)
        await asyncio.wait_for(consumer.start(), STEP_TIMEOUT_S)
        try:
            partitions = [TopicPartition("aio-topic", p) for p in range(3)]
            consumer.assign(partitions)
            await consumer.seek_to_beginning(*partitions)
            got = []
            loop = asyncio.get_running_loop()
            deadline = loop.time() + STEP_TIMEOUT_S
            while len(got) < 400 and loop.time() < deadline:
                for records in (await consumer.getmany(timeout_ms=500)).values():
                    got.extend(records)
            end_offsets = await consumer.end_offsets(partitions)
        finally:
            await consumer.stop()
        assert sorted(r.value.decode() for r in got) == sorted(f"v{i}" for i in range(400))
        assert all(list(r.headers) == [("h", b"x")] for r in got)
        assert sum(end_offsets.values()) == 400

    asyncio.run(scenario())


def test_aiokafka_group_commits_and_resumes(broker):
    async def scenario():
        await _create_topic(broker.bootstrap, "aio-group-topic", 4)
        await _produce(broker.bootstrap, "aio-group-topic", 200, acks=1)
        first = await _consume_group(broker.bootstrap, "aio-group-topic", "aio-group", 200, commit=True)
        assert sorted(r.value.decode() for r in first) == sorted(f"v{i}" for i in range(200))
        # Records produced after the commit are all a restarted member of the same group sees:
        # the committed offsets were stored by the broker and handed back on rejoin.
        await _produce(broker.bootstrap, "aio-group-topic", 50, prefix="late", acks=1)
        second = await _consume_group(broker.bootstrap, "aio-group-topic", "aio-group", 50, commit=False)
        assert sorted(r.value.decode() for r in second) == sorted(f"late{i}" for i in range(50))
        # A different group sees everything (publish-subscribe across groups).
        other = await _consume_group(broker.bootstrap, "aio-group-topic", "aio-other", 250, commit=False)
        assert len(other) == 250

    asyncio.run(scenario())
