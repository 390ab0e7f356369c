"""MQTT ingest benchmark: readings committed per second by the gateway (PUBACK after commit) against
mosquitto_sub writing to a file (the floor), same publisher, same broker, same run.

A private Mosquitto (persistence off, queues large enough not to drop) runs on a free port. The publisher is
mosquitto_pub publishing N reading-v1 payloads at QoS 1 over one connection; each payload carries the time it was
handed to the publisher in ``effective``. Floor: mosquitto_sub (QoS 1, MQTT 5) prints each payload
with its receive time to a file. Gateway: the daemon as a process (SQLite journal, WAL, synchronous=FULL, as
shipped), subscribed with a persistent session; a reading counts when its row is committed. Latency is send
time -> receive time (floor) or -> committed_at in the journal (gateway).

    .venv/bin/python bench/mqtt_ingest.py [--readings 20000] [--receive-maximum 1000]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import re
import shutil
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import orjson

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from tests.e2e.conftest import Daemon, free_port  # noqa: E402  (the same launcher the e2e tests use)


def payload(i: int, run: str) -> bytes:
    return orjson.dumps(
        {
            "messageId": f"{run}-{i}",
            "deviceId": f"bench-{i % 50}",
            "patientId": f"P{i % 500}",
            "effective": datetime.now(UTC).isoformat(timespec="microseconds").replace("+00:00", "Z"),
            "readings": [
                {"code": {"system": "urn:iso:std:iso:11073:10101", "code": "150456"}, "value": 90 + i % 10, "unit": "%"}
            ],
        }
    )


def publish(port: int, topic: str, n: int, run: str, rate: float = 0.0) -> float:
    """Publish n readings at QoS 1 with mosquitto_pub (one connection, one reading per line, in C so the
    publisher takes little of the CPU the gateway needs). Each line is stamped as it is written to the pipe.
    With ``rate``, paced to that many readings per second (for latency below saturation). Returns the seconds
    until mosquitto_pub has all of them acknowledged by the broker."""
    pub = subprocess.Popen(
        ["mosquitto_pub", "-p", str(port), "-q", "1", "-V", "mqttv5", "-t", f"{topic}/bench", "-l"],
        stdin=subprocess.PIPE,
    )
    assert pub.stdin is not None
    started = time.perf_counter()
    for i in range(n):
        if rate and i % 10 == 0:
            ahead = started + i / rate - time.perf_counter()
            if ahead > 0:
                time.sleep(ahead)
            pub.stdin.flush()
        pub.stdin.write(payload(i, run) + b"\n")
    pub.stdin.close()
    pub.wait(300)
    return time.perf_counter() - started


def stats(latencies: list[float]) -> str:
    if not latencies:
        return "n/a"
    q = statistics.quantiles(latencies, n=100) if len(latencies) > 1 else latencies * 99
    return f"p50 {q[49] * 1000:.1f} ms, p99 {q[98] * 1000:.1f} ms"


def sent_at(raw: bytes) -> float:
    return datetime.fromisoformat(orjson.loads(raw)["effective"].replace("Z", "+00:00")).timestamp()


def run_floor(port: int, n: int, receive_maximum: int, rate: float = 0.0) -> tuple[float, list[float]]:
    topic = f"floor/{time.time_ns()}"
    out = Path(tempfile.mkstemp(suffix=".txt")[1])
    with out.open("wb") as f:
        sub = subprocess.Popen(
            ["mosquitto_sub", "-p", str(port), "-q", "1", "-V", "mqttv5", "-t", f"{topic}/#", "-F", "%U %p",
             "-D", "connect", "receive-maximum", str(receive_maximum)],
            stdout=f,
        )  # fmt: skip
        time.sleep(0.5)
        started = time.perf_counter()
        publish(port, topic, n, "floor", rate)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and out.read_bytes().count(b"\n") < n:
            time.sleep(0.01)
        elapsed = time.perf_counter() - started
        sub.terminate()
        sub.wait(5)
    lat = []
    for line in out.read_bytes().splitlines():
        ts, _, body = line.partition(b" ")
        lat.append(float(ts) - sent_at(body))
    out.unlink()
    return elapsed, lat


def cpu_seconds(pid: int, only: str = "") -> float:
    """User + system CPU of a process and its children (the delivery process), from /proc (Linux). With
    ``only``: of the processes whose command line has that word (e.g. the delivery processes)."""
    total = 0.0
    try:
        if not only or only.encode() in Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0"):
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        for child in Path(f"/proc/{pid}/task/{pid}/children").read_text().split():
            total += cpu_seconds(int(child), only)
    except (OSError, ValueError, IndexError):
        pass
    return total


def run_gateway(
    port: int, n: int, receive_maximum: int, work: Path, rate: float = 0.0, workers: int = 1
) -> tuple[float, list[float]]:
    topic = f"gw/{time.time_ns()}"
    extra = (
        f'[[sources]]\ntype = "mqtt"\nname = "mqtt-bench"\nport = {port}\nclient_id = "bench-{time.time_ns()}"\n'
        f'topics = ["{topic}/#"]\nreceive_maximum = {receive_maximum}\n'
        + ('shared_group = "bench"\n' if workers > 1 else "")  # the broker hands each reading to one worker
    )
    d = Daemon(work, source_extra=extra)
    if workers > 1:
        d.config.write_text(f"workers = {workers}\n" + d.config.read_text())
    d.start()
    try:
        time.sleep(1.0)  # subscribed
        assert d.proc is not None
        cpu0, delivery0 = cpu_seconds(d.proc.pid), cpu_seconds(d.proc.pid, "deliver")
        started = time.perf_counter()
        publish(port, topic, n, "gw", rate)
        db = sqlite3.connect(d.journal_path, timeout=30)
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            (count,) = db.execute("SELECT count(*) FROM messages WHERE source = 'mqtt-bench'").fetchone()
            if count >= n:
                break
            time.sleep(0.02)
        elapsed = time.perf_counter() - started
        if not rate:
            cpu = (cpu_seconds(d.proc.pid) - cpu0) / n * 1e6
            delivery = (cpu_seconds(d.proc.pid, "deliver") - delivery0) / n * 1e6
            m = dict(
                re.findall(r"^(gateway_journal_(?:commit_seconds|group_size)_(?:sum|count)) (\S+)$", d.metrics(), re.M)
            )
            groups = float(m.get("gateway_journal_group_size_count", 0)) or 1.0
            print(
                f"  gateway: {cpu:.0f} us CPU per reading (daemon and its delivery process: {delivery:.0f}); "
                f"{float(m.get('gateway_journal_group_size_sum', 0)) / groups:.0f} readings per group commit, "
                f"{float(m.get('gateway_journal_commit_seconds_sum', 0)) / groups * 1000:.1f} ms per commit"
            )
        rows = db.execute("SELECT raw, committed_at FROM messages WHERE source = 'mqtt-bench'").fetchall()
        db.close()
        lat = [datetime.fromisoformat(str(c)).replace(tzinfo=UTC).timestamp() - sent_at(raw) for raw, c in rows]
        if len(rows) < n:
            print(f"  gateway: only {len(rows)} of {n} committed")
        return elapsed, lat
    finally:
        d.stop()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--readings", type=int, default=20000)
    ap.add_argument("--latency-rate", type=float, default=1000.0, help="readings/s of the paced latency run")
    ap.add_argument("--latency-seconds", type=float, default=5.0, help="length of the paced latency run")
    ap.add_argument("--receive-maximum", type=int, default=1000, help="subscriber in-flight window")
    ap.add_argument("--workers", type=int, default=1, help="gateway worker processes (config key workers)")
    ap.add_argument("--json", type=Path, help="also write the results to this file as JSON (for bench/run_all.py)")
    args = ap.parse_args()
    if shutil.which("mosquitto") is None or shutil.which("mosquitto_sub") is None:
        sys.exit("needs Debian's mosquitto and mosquitto-clients")
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        port = free_port()
        conf = work / "mosquitto.conf"
        conf.write_text(
            f"listener {port} 127.0.0.1\nallow_anonymous true\nuser root\npersistence false\n"
            "max_queued_messages 1000000\nmax_inflight_messages 0\n"
        )
        broker = subprocess.Popen(["mosquitto", "-c", str(conf)], stderr=subprocess.DEVNULL)
        try:
            time.sleep(0.5)
            print(
                f"{platform.node()} {platform.machine()} python {platform.python_version()}, "
                f"subscriber receive maximum {args.receive_maximum}"
            )
            f_secs, _ = run_floor(port, args.readings, args.receive_maximum)
            (work / "gw").mkdir()
            g_secs, _ = run_gateway(port, args.readings, args.receive_maximum, work / "gw", workers=args.workers)
            print(f"throughput, {args.readings} readings as fast as mosquitto_pub sends them:")
            print(f"  floor (mosquitto_sub -> file):  {args.readings / f_secs:8.0f} readings/s")
            print(f"  gateway (PUBACK after commit):  {args.readings / g_secs:8.0f} readings/s")
            print(f"  ratio gateway/floor: {f_secs / g_secs:.2f}")
            result: dict[str, object] = {
                "readings": args.readings,
                "workers": args.workers,
                "floor_rate": args.readings / f_secs,
                "gateway_rate": args.readings / g_secs,
            }
            n = int(args.latency_rate * args.latency_seconds)
            if n == 0:
                if args.json:
                    args.json.write_text(json.dumps(result, indent=1))
                return
            _, f_lat = run_floor(port, n, args.receive_maximum, args.latency_rate)
            (work / "gw2").mkdir()
            _, g_lat = run_gateway(port, n, args.receive_maximum, work / "gw2", args.latency_rate, args.workers)
            print(f"latency at {args.latency_rate:.0f} readings/s ({n} readings), publish -> written / committed:")
            print(f"  floor (mosquitto_sub -> file):  {stats(f_lat)}")
            print(f"  gateway (PUBACK after commit):  {stats(g_lat)}")
            if args.json:
                for name, lat in (("floor", f_lat), ("gateway", g_lat)):
                    if len(lat) > 1:
                        q = statistics.quantiles(lat, n=100)
                        result[f"{name}_p50_ms"], result[f"{name}_p99_ms"] = q[49] * 1000, q[98] * 1000
                result["latency_rate"] = args.latency_rate
                args.json.write_text(json.dumps(result, indent=1))
        finally:
            broker.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                broker.wait(5)


if __name__ == "__main__":
    main()
