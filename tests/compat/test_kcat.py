"""kcat (Debian's build of librdkafka's CLI) against ringbroker: metadata, produce, consume."""
import json
import os
import shutil
import subprocess

import pytest

KCAT = shutil.which("kcat") or shutil.which("kafkacat")
# Outside CI a developer without kcat may skip these; in CI (CI=true) a missing tool is a failure,
# never a skip, because a skipped compatibility test proves nothing.
if KCAT is None and os.environ.get("CI") == "true":
    raise RuntimeError("kcat is missing: scripts/install-test-deps installs it (Debian package kcat)")
pytestmark = pytest.mark.skipif(KCAT is None, reason="kcat is installed by scripts/install-test-deps")


def kcat(*args, input=None, timeout=30):
    return subprocess.run([KCAT, *args], input=input, capture_output=True, timeout=timeout, check=True)


def test_kcat_lists_metadata_with_one_broker_per_shard(broker):
    out = kcat("-b", broker.bootstrap, "-L", "-J").stdout
    meta = json.loads(out)
    assert sorted(b["id"] for b in meta["brokers"]) == list(range(broker.shards))


def test_kcat_produces_and_consumes(broker):
    lines = [f"key{i}:value number {i}" for i in range(100)]
    kcat("-b", broker.bootstrap, "-P", "-t", "kcat-topic", "-K:", "-z", "snappy", input="\n".join(lines).encode())
    out = kcat("-b", broker.bootstrap, "-C", "-t", "kcat-topic", "-o", "beginning", "-e", "-f", "%k:%s\n").stdout
    got = sorted(out.decode().splitlines())
    assert got == sorted(lines)


def test_broker_starts_from_a_stock_kafka_server_properties(make_broker):
    import os
    stock = os.path.join(os.path.dirname(__file__), "..", "data", "kafka-server.properties")
    b = make_broker(config_file=stock).start()
    meta = json.loads(kcat("-b", b.bootstrap, "-L", "-J").stdout)
    assert len(meta["brokers"]) == b.shards
    logs = b.logs()
    # Keys that mean nothing to a single node are accepted with a warning naming them.
    assert "zookeeper.connect" in logs or "num.network.threads" in logs, logs[-3000:]
