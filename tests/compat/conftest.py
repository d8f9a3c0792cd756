"""Fixtures for the compatibility tests: a real ringbroker process on free loopback ports."""
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time

import pytest

BROKER_BIN = os.environ.get("RINGBROKER_BIN", os.path.join(os.path.dirname(__file__), "..", "..", "target", "debug", "ringbroker"))


def _free_port_range(count):
    for _ in range(200):
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            base = probe.getsockname()[1]
        if base + count >= 65000:
            continue
        sockets = []
        try:
            for i in range(count):
                s = socket.socket()
                s.bind(("127.0.0.1", base + i))
                sockets.append(s)
            return base
        except OSError:
            continue
        finally:
            for s in sockets:
                s.close()
    raise RuntimeError("no free port range")


class Broker:
    def __init__(self, shards=2, overrides=(), config_file=None, data_dir=None):
        self.shards = shards
        self.tmp = tempfile.mkdtemp(prefix="ringbroker-compat-")
        self.data_dir = data_dir or os.path.join(self.tmp, "data")
        self.overrides = list(overrides)
        self.config_file = config_file
        self.proc = None
        self.port = None
        self.log_path = os.path.join(self.tmp, "broker.log")

    def start(self):
        for _ in range(5):
            port = _free_port_range(self.shards)
            cmd = [BROKER_BIN, "--shards", str(self.shards)]
            if self.config_file:
                cmd += ["--config", self.config_file]
            cmd += ["--override", f"listeners=PLAINTEXT://127.0.0.1:{port}",
                    "--override", f"log.dirs={self.data_dir}"]
            for o in self.overrides:
                cmd += ["--override", o]
            self.log = open(self.log_path, "ab")
            self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=self.log, stderr=self.log)
            deadline = time.time() + 20
            while time.time() < deadline and self.proc.poll() is None:
                try:
                    for i in range(self.shards):
                        socket.create_connection(("127.0.0.1", port + i), timeout=1).close()
                    self.port = port
                    return self
                except OSError:
                    time.sleep(0.05)
            self.kill()
        raise RuntimeError("ringbroker did not start: " + open(self.log_path, errors="replace").read()[-2000:])

    @property
    def bootstrap(self):
        return f"127.0.0.1:{self.port}"

    def stop(self):
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                return self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
                raise
        return self.proc.returncode if self.proc else None

    def kill(self):
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def logs(self):
        with open(self.log_path, errors="replace") as f:
            return f.read()

    def cleanup(self):
        self.kill()
        shutil.rmtree(self.tmp, ignore_errors=True)


@pytest.fixture
def broker():
    b = Broker().start()
    yield b
    b.cleanup()


@pytest.fixture
def make_broker():
    made = []

    def make(**kwargs):
        b = Broker(**kwargs)
        made.append(b)
        return b

    yield make
    for b in made:
        b.cleanup()
