#!/usr/bin/env python3
"""Runs the first-results benchmark set for docs/benchmarks.md and prints its tables.

Usage (after `cargo build --release --workspace`):

    python3 scripts/bench_first_results.py OUT_DIR [--quick]

What it runs, in one session so every figure can be stated as a fraction of the same ceiling:
  1. `ringbench ceiling` on the broker's log-dir file system.
  2. For each record size (100 B, 1 KiB, 16 KiB) and acks (1, all): a fresh one-shard broker pinned
     to core 0, then ringbench pinned to core 1 searching the maximum sustainable produce+consume
     rate (rate 0), then a fixed-rate run at 50 % of that rate for the latency percentiles.
  3. Produce-only maximum rate with the native driver and with librdkafka, one producer on core 1.
Every command is printed before it runs; reports (JSON + .hgrm) stay in OUT_DIR.
"""

import json
import os
import shutil
import socket
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BROKER = os.path.join(ROOT, "target/release/ringbroker")
RINGBENCH = os.path.join(ROOT, "target/release/ringbench")
BROKER_CORE = "0"
LOAD_CORE = "1"


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(cmd):
    print("$ " + " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)


class Broker:
    """A one-shard ringbroker pinned to BROKER_CORE on a fresh data dir."""

    def __init__(self, out_dir, name):
        self.port = free_port()
        self.dir = os.path.join(out_dir, "data-" + name)
        shutil.rmtree(self.dir, ignore_errors=True)
        cmd = [
            "taskset", "-c", BROKER_CORE, BROKER, "--shards", "1",
            "--override", f"listeners=PLAINTEXT://127.0.0.1:{self.port}",
            "--override", f"log.dir={self.dir}",
        ]
        print("$ " + " ".join(cmd), flush=True)
        self.log = open(os.path.join(out_dir, f"broker-{name}.log"), "w")
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.time() + 30
        while time.time() < deadline:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return
            except OSError:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"broker exited with {self.proc.returncode}")
                time.sleep(0.1)
        raise RuntimeError("broker did not start listening within 30 s")

    @property
    def bootstrap(self):
        return f"127.0.0.1:{self.port}"

    def stop(self):
        self.proc.terminate()
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()
        shutil.rmtree(self.dir, ignore_errors=True)


def broker_cpu_seconds(pid):
    """utime + stime of the broker process (all its threads, io-wq workers included)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def ringbench_run(broker, out_dir, name, args):
    cmd = [
        "taskset", "-c", LOAD_CORE, RINGBENCH, "run", "--bootstrap", broker.bootstrap,
        "--cpus", LOAD_CORE, "--output-dir", out_dir, "--report-name", name, "--quiet",
    ] + args
    cpu_before, wall_before = broker_cpu_seconds(broker.proc.pid), time.time()
    run(cmd)
    cpu = broker_cpu_seconds(broker.proc.pid) - cpu_before
    with open(os.path.join(out_dir, name + ".json")) as f:
        report = json.load(f)
    # Whole-run broker CPU share (search, warm-up and measurement): who was the bottleneck.
    report["broker_cpu_share"] = cpu / (time.time() - wall_before)
    return report


def size_acks_runs(out_dir, search_time, latency_time, wanted=None):
    rows = []
    # 16 KiB batches stay at 256 KiB, under the broker's default message.max.bytes (1 MiB): a 1 MiB
    # batch.size lets the native producer seal batches just over it, which the broker refuses.
    sizes = [("100B", "100", "16384"), ("1KiB", "1KiB", "131072"), ("16KiB", "16KiB", "262144")]
    for label, size, batch in sizes:
        for acks in ["1", "all"]:
            name = f"{label}-acks{acks}"
            if wanted and wanted not in name:
                continue
            broker = Broker(out_dir, name)
            try:
                common = ["--partitions", "4", "--producers", "1", "--subscriptions", "1",
                          "--record-size", size, "--batch-size", batch, "--acks", acks]
                found = ringbench_run(broker, out_dir, name + "-max",
                                      common + ["--rate", "0"] + search_time)
                # The search's steps are short; the rate actually held over the measured phase is
                # the maximum quoted, and the latency run uses half of it.
                max_rate = found["aggregate"]["publish_rate_records_per_s"]
                half = ringbench_run(broker, out_dir, name + "-half",
                                     common + ["--rate", str(int(max_rate / 2))] + latency_time)
            finally:
                broker.stop()
            rows.append((name, found, half))
    return rows


def run_only(out_dir, wanted, search_time, latency_time):
    for name, found, half in size_acks_runs(out_dir, search_time, latency_time, wanted):
        agg, lat = found["aggregate"], half["aggregate"]["publish_latency"] or {}
        print(f"| {name} | {found['rate']['target_records_per_s']:.0f} | "
              f"{agg['publish_rate_records_per_s']:.0f} | {agg['publish_rate_mb_per_s']:.1f} | "
              f"{agg['consume_rate_mb_per_s']:.1f} | {found['broker_cpu_share']:.2f} | "
              + " | ".join(f"{lat.get(k, float('nan')):.2f}"
                           for k in ["p50_ms", "p99_ms", "p99_9_ms", "p99_99_ms"]) + " |")


def main():
    if len(sys.argv) < 2:
        print(__doc__)
        sys.exit(2)
    out_dir = os.path.abspath(sys.argv[1])
    quick = "--quick" in sys.argv
    # --only NAME runs just the size/acks runs whose name contains NAME (no ceiling, no drivers).
    only = sys.argv[sys.argv.index("--only") + 1] if "--only" in sys.argv else None
    os.makedirs(out_dir, exist_ok=True)
    search_time = ["--warmup-s", "1", "--duration-s", "3" if quick else "10"]
    latency_time = ["--warmup-s", "2", "--duration-s", "5" if quick else "20"]

    ceiling_json = os.path.join(out_dir, "ceiling.json")
    if only:
        return run_only(out_dir, only, search_time, latency_time)
    ceiling_dir = os.path.join(out_dir, "ceiling-dir")
    os.makedirs(ceiling_dir, exist_ok=True)
    run(["taskset", "-c", BROKER_CORE, RINGBENCH, "ceiling", "--dir", ceiling_dir,
         "--json", ceiling_json] + (["--bytes", "268435456"] if quick else []))
    shutil.rmtree(ceiling_dir, ignore_errors=True)
    with open(ceiling_json) as f:
        ceiling = json.load(f)

    rows = size_acks_runs(out_dir, search_time, latency_time)

    drivers = []
    for size in ["100", "1KiB"]:
        for driver in ["native", "rdkafka"]:
            name = f"driver-{driver}-{size}"
            broker = Broker(out_dir, name)
            try:
                report = ringbench_run(broker, out_dir, name, [
                    "--driver", driver, "--partitions", "4", "--producers", "1",
                    "--subscriptions", "0", "--record-size", size, "--acks", "1",
                    "--rate", "0"] + search_time)
            finally:
                broker.stop()
            drivers.append((name, report))

    summary = {"ceiling": ceiling, "runs": [], "drivers": []}
    print()
    print(f"ceiling: loopback TCP {ceiling['loopback_tcp_gb_per_s']:.2f} GB/s, "
          f"disk buffered append {ceiling['disk_buffered_append_mb_per_s']:.0f} MB/s, "
          f"fdatasync/1MiB {ceiling['disk_fdatasync_1mib_mb_per_s']:.0f} MB/s, "
          f"round trip p50 {ceiling['loopback_round_trip']['p50_ms'] * 1000:.1f} us")
    print("| run | search rec/s | sustained rec/s | MB/s publish | MB/s consume | vs ceiling | "
          "broker CPU | p50 | p99 | p99.9 | p99.99 ms (publish latency at 50 %) | e2e p99 ms |")
    for name, found, half in rows:
        agg = found["aggregate"]
        mb = agg["publish_rate_mb_per_s"]
        limit = (ceiling["disk_fdatasync_1mib_mb_per_s"] if name.endswith("all")
                 else ceiling["disk_buffered_append_mb_per_s"])
        lat = half["aggregate"]["publish_latency"] or {}
        e2e = half["aggregate"]["end_to_end_latency"] or {}
        print(f"| {name} | {found['rate']['target_records_per_s']:.0f} | "
              f"{agg['publish_rate_records_per_s']:.0f} | {mb:.1f} | "
              f"{agg['consume_rate_mb_per_s']:.1f} | {mb / limit:.2f} | "
              f"{found['broker_cpu_share']:.2f} | "
              f"{lat.get('p50_ms', float('nan')):.2f} | {lat.get('p99_ms', float('nan')):.2f} | "
              f"{lat.get('p99_9_ms', float('nan')):.2f} | {lat.get('p99_99_ms', float('nan')):.2f} | "
              f"{e2e.get('p99_ms', float('nan')):.2f} |")
        summary["runs"].append({"name": name, "max": found["rate"], "max_aggregate": agg,
                                "half_aggregate": half["aggregate"],
                                "broker_cpu_share": found["broker_cpu_share"],
                                "half_broker_cpu_share": half["broker_cpu_share"],
                                "notes": found["notes"]})
    for name, report in drivers:
        agg = report["aggregate"]
        print(f"| {name} | search {report['rate']['target_records_per_s']:.0f} rec/s | "
              f"sustained {agg['publish_rate_records_per_s']:.0f} rec/s | "
              f"{agg['publish_rate_mb_per_s']:.1f} MB/s | broker CPU {report['broker_cpu_share']:.2f} |")
        summary["drivers"].append({"name": name, "max": report["rate"], "aggregate": agg,
                                   "broker_cpu_share": report["broker_cpu_share"]})
    with open(os.path.join(out_dir, "summary.json"), "w") as f:
        json.dump(summary, f, indent=1)


if __name__ == "__main__":
    main()
