"""kafka-python's default producer (idempotent since KIP-679 in kafka-python 3.x) through a proxy that
drops a fraction of Produce responses and closes the connection, so the client retries batches the
broker already stored; then the same while the broker is SIGKILLed and restarted. Every record must
be stored exactly once and in order per partition."""
import random
import socket
import struct
import threading
import time

from kafka import KafkaConsumer, KafkaProducer, TopicPartition
from kafka.admin import KafkaAdminClient, NewTopic

from conftest import Broker, _free_port_range

PARTITIONS = 4
PRODUCE = 0


def _read_frame(sock):
    header = b""
    while len(header) < 4:
        chunk = sock.recv(4 - len(header))
        if not chunk:
            return None
        header += chunk
    (size,) = struct.unpack(">i", header)
    if size < 0 or size > (64 << 20):
        return None
    body = bytearray()
    while len(body) < size:
        chunk = sock.recv(min(65536, size - len(body)))
        if not chunk:
            return None
        body += chunk
    return header + bytes(body)


class DropProxy:
    """Forwards Kafka frames between clients and the broker (one port per shard); drops a fraction
    of Produce responses by closing the client's connection instead of answering. The choice is
    random (seeded) but every `drop_every`-th Produce response is dropped for sure, so a run with
    few requests still retries."""

    def __init__(self, shards, seed):
        self.shards = shards
        self.base = _free_port_range(shards)
        self.upstream = None
        self.drop_fraction = 0.0
        self.drop_every = 0
        self.random = random.Random(seed)
        self.lock = threading.Lock()
        self.stopping = False
        self.dropped = 0
        self.produce_responses = 0
        self.sockets = []
        self.listeners = []
        self.threads = []
        for shard in range(shards):
            listener = socket.socket()
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            listener.bind(("127.0.0.1", self.base + shard))
            listener.listen(64)
            listener.settimeout(0.2)
            self.listeners.append(listener)
            thread = threading.Thread(target=self._accept, args=(listener, shard), daemon=True)
            thread.start()
            self.threads.append(thread)

    @property
    def bootstrap(self):
        return f"127.0.0.1:{self.base}"

    def _keep(self, sock):
        with self.lock:
            self.sockets.append(sock)

    def _accept(self, listener, shard):
        while not self.stopping:
            try:
                client, _ = listener.accept()
            except socket.timeout:
                continue
            except OSError:
                return
            upstream_port = self.upstream
            try:
                if upstream_port is None:
                    raise OSError("no upstream")
                upstream = socket.create_connection(("127.0.0.1", upstream_port + shard), timeout=2)
                upstream.settimeout(None)
            except OSError:
                client.close()
                continue
            self._keep(client)
            self._keep(upstream)
            in_flight = {}
            threading.Thread(target=self._requests, args=(client, upstream, in_flight), daemon=True).start()
            threading.Thread(target=self._responses, args=(upstream, client, in_flight), daemon=True).start()

    def _requests(self, client, upstream, in_flight):
        try:
            while True:
                frame = _read_frame(client)
                if frame is None:
                    break
                if len(frame) >= 12:
                    api_key, _, correlation_id = struct.unpack(">hhi", frame[4:12])
                    in_flight[correlation_id] = api_key
                upstream.sendall(frame)
        except OSError:
            pass
        self._close(client, upstream)

    def _responses(self, upstream, client, in_flight):
        try:
            while True:
                frame = _read_frame(upstream)
                if frame is None:
                    break
                (correlation_id,) = struct.unpack(">i", frame[4:8])
                if in_flight.pop(correlation_id, None) == PRODUCE:
                    with self.lock:
                        self.produce_responses += 1
                        drop = self.random.random() < self.drop_fraction or (
                            self.drop_every > 0 and self.produce_responses % self.drop_every == 0)
                        if drop:
                            self.dropped += 1
                    if drop:
                        break
                client.sendall(frame)
        except OSError:
            pass
        self._close(client, upstream)

    @staticmethod
    def _close(*sockets):
        for sock in sockets:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            sock.close()

    def cut_all(self):
        with self.lock:
            sockets, self.sockets = self.sockets, []
        self._close(*sockets)

    def stop(self):
        self.stopping = True
        self.cut_all()
        for listener in self.listeners:
            listener.close()
        for thread in self.threads:
            thread.join(timeout=5)


def _start_behind(proxy, data_dir=None):
    broker = Broker(shards=proxy.shards, data_dir=data_dir,
                    overrides=[f"advertised.listeners=PLAINTEXT://127.0.0.1:{proxy.base}"]).start()
    proxy.upstream = broker.port
    return broker


def _payload(partition, sequence):
    return f"{partition}:{sequence:07d}".encode()


def _send_range(producer, topic, start, end):
    futures = []
    for index in range(start, end):
        partition = index % PARTITIONS
        futures.append(producer.send(topic, value=_payload(partition, index // PARTITIONS), partition=partition))
    return futures


def _check_exactly_once(bootstrap, topic, total):
    consumer = KafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False,
                             consumer_timeout_ms=2000)
    partitions = [TopicPartition(topic, p) for p in range(PARTITIONS)]
    consumer.assign(partitions)
    consumer.seek_to_beginning()
    end_offsets = consumer.end_offsets(partitions)
    stored = sum(end_offsets.values())
    got = {p: [] for p in range(PARTITIONS)}
    deadline = time.time() + 60
    count = 0
    while count < stored and time.time() < deadline:
        for records in consumer.poll(timeout_ms=500).values():
            for record in records:
                partition, sequence = record.value.decode().split(":")
                assert int(partition) == record.partition
                got[record.partition].append((record.offset, int(sequence)))
                count += 1
    consumer.close()
    assert stored == total, f"{stored} records stored, {total} sent"
    for partition in range(PARTITIONS):
        expected = [i // PARTITIONS for i in range(total) if i % PARTITIONS == partition]
        sequences = [s for _, s in sorted(got[partition])]
        assert sequences == expected, (
            f"partition {partition}: {len(sequences)} stored vs {len(expected)} expected, "
            f"duplicates={len(sequences) - len(set(sequences))}")


def _idempotent_producer(bootstrap):
    # Default settings: kafka-python 3.x enables idempotence (acks=all, retries=inf) by itself.
    producer = KafkaProducer(bootstrap_servers=bootstrap)
    manager = producer._transaction_manager
    assert manager is not None, "kafka-python did not enable idempotence by default"
    return producer


def _create_topic(bootstrap, topic):
    admin = KafkaAdminClient(bootstrap_servers=bootstrap)
    admin.create_topics([NewTopic(topic, PARTITIONS, 1)])
    admin.close()


def test_default_producer_through_a_lossy_proxy_stores_each_record_once_in_order():
    seed = int(time.time())
    print(f"proxy seed {seed}")
    proxy = DropProxy(2, seed)
    broker = _start_behind(proxy)
    try:
        _create_topic(proxy.bootstrap, "py-exactly-once")
        producer = _idempotent_producer(proxy.bootstrap)
        producer.send("py-exactly-once", value=_payload(0, 0), partition=0).get(timeout=30)
        assert producer._transaction_manager.producer_id_and_epoch.producer_id >= 0
        proxy.drop_fraction = 0.1
        proxy.drop_every = 7
        total = 2000
        futures = []
        for start in range(1, total, 100):
            futures += _send_range(producer, "py-exactly-once", start, min(start + 100, total))
            time.sleep(0.01)
        producer.flush(timeout=120)
        for future in futures:
            future.get(timeout=60)
        producer.close(timeout=10)
        print(f"proxy: {proxy.produce_responses} produce responses, {proxy.dropped} dropped")
        assert proxy.dropped >= 2, "too few responses were dropped to force retries"
        proxy.drop_fraction = 0.0
        proxy.drop_every = 0
        _check_exactly_once(proxy.bootstrap, "py-exactly-once", total)
    finally:
        proxy.stop()
        broker.cleanup()


def test_default_producer_across_a_sigkill_restart_stores_each_record_once_in_order():
    seed = int(time.time()) + 1
    print(f"proxy seed {seed}")
    proxy = DropProxy(2, seed)
    first = _start_behind(proxy)
    brokers = [first]
    try:
        _create_topic(proxy.bootstrap, "py-survives")
        producer = _idempotent_producer(proxy.bootstrap)
        producer.send("py-survives", value=_payload(0, 0), partition=0).get(timeout=30)
        proxy.drop_fraction = 0.05
        total = 2400
        futures = []
        for start in range(1, total, 100):
            futures += _send_range(producer, "py-survives", start, min(start + 100, total))
            if start in (801, 1601):
                # Lose every response of the batches in flight, then kill the broker: their
                # retries reach the restarted broker, which must recognise them.
                proxy.drop_fraction = 1.0
                time.sleep(0.3)
                brokers[-1].kill()
                proxy.cut_all()
                proxy.drop_fraction = 0.05
                brokers.append(_start_behind(proxy, data_dir=first.data_dir))
            time.sleep(0.01)
        producer.flush(timeout=120)
        for future in futures:
            future.get(timeout=60)
        producer.close(timeout=10)
        print(f"proxy: {proxy.produce_responses} produce responses, {proxy.dropped} dropped")
        assert proxy.dropped >= 2
        proxy.drop_fraction = 0.0
        _check_exactly_once(proxy.bootstrap, "py-survives", total)
    finally:
        proxy.stop()
        for broker in brokers:
            broker.cleanup()
