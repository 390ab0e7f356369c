"""`make soak`: a bounded soak of the daemon under steady mixed load; is memory flat?

Starts the daemon as a process (SQLite journal, WAL, synchronous=FULL, encryption at rest, delivery to the SQL
resource store in its child process, as shipped) with an MLLP, a DICOM and an MQTT source, and a private
Mosquitto. For ``--minutes`` it drives, at a steady paced rate:

- MLLP: ``--senders`` connections, each sending ADT^A01 messages and waiting for the ACK, together
  ``--mllp-rate`` messages/s;
- MQTT: mosquitto_pub at QoS 1, ``--mqtt-rate`` readings/s;
- DICOM: every ``--dicom-every`` seconds, dcmtk's storescu sends ``--dicom-batch`` CT_small instances.

Every ``--interval`` seconds it samples, per gateway process (the daemon, its delivery child, its workers), the
resident set size (VmRSS) and the open file descriptors (/proc/<pid>/fd), and from the daemon's /metrics the
journal's group commits, the messages committed and the outbox depth; and from the MLLP senders the messages/s
and the ACK p99. It prints the table, writes a CSV, a PNG plot (matplotlib, Agg) and a markdown page.

Verdict "flat": over the second half of the run (after warm-up), the least-squares slope of every gateway
process's RSS is below ``--max-slope`` MB/min, and the open descriptors of every process stay within
``--fd-slack`` of what they were in the first half.

    .venv/bin/python bench/soak.py [--minutes 10] [--interval 10]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import csv
import os
import platform
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.dicom_store import ENV as DCMTK_ENV  # noqa: E402  (TCP_NODELAY=1 for dcmtk)
from bench.dicom_store import make_instances  # noqa: E402
from bench.mllp_throughput import ADT  # noqa: E402
from bench.mqtt_ingest import payload  # noqa: E402
from tests.e2e.conftest import Daemon, free_port  # noqa: E402  (the launcher the e2e tests use)

# -- load ---------------------------------------------------------------------------------------------------------


@dataclass
class MllpLoad:
    """Paced MLLP senders in their own thread and event loop; ACK latencies kept per sample interval."""

    port: int
    senders: int
    rate: float
    lock: threading.Lock = field(default_factory=threading.Lock)
    latencies: list[float] = field(default_factory=list)
    sent: int = 0
    not_accepted: int = 0
    errors: list[str] = field(default_factory=list)

    def take(self) -> list[float]:
        with self.lock:
            out, self.latencies = self.latencies, []
        return out

    async def _sender(self, k: int, stop: threading.Event) -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", self.port)
        writer.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        period = self.senders / self.rate
        start = time.perf_counter() + k * period / self.senders  # spread the senders over one period
        n, buf = 0, b""
        try:
            while not stop.is_set():
                ahead = start + n * period - time.perf_counter()
                if ahead > 0:
                    await asyncio.sleep(ahead)
                msg = ADT.format(cid=f"soak-{k}-{n}", mrn=f"{k:03d}{n % 5000:07d}").encode()
                t0 = time.perf_counter()
                writer.write(b"\x0b" + msg + b"\x1c\r")
                while b"\x1c\r" not in buf:
                    chunk = await reader.read(65536)
                    if not chunk:
                        raise ConnectionError("the gateway closed the connection")
                    buf += chunk
                ack, _, buf = buf.partition(b"\x1c\r")
                with self.lock:
                    self.latencies.append(time.perf_counter() - t0)
                    self.sent += 1
                    self.not_accepted += b"MSA|AA" not in ack
                n += 1
        finally:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()

    def run(self, stop: threading.Event) -> None:
        async def main() -> None:
            results = await asyncio.gather(
                *(self._sender(k, stop) for k in range(self.senders)), return_exceptions=True
            )
            self.errors += [repr(r) for r in results if isinstance(r, BaseException)]

        asyncio.run(main())


def mqtt_load(port: int, topic: str, rate: float, stop: threading.Event, counter: list[int]) -> None:
    pub = subprocess.Popen(
        ["mosquitto_pub", "-p", str(port), "-q", "1", "-V", "mqttv5", "-t", f"{topic}/soak", "-l"],
        stdin=subprocess.PIPE,
    )
    assert pub.stdin is not None
    started, i = time.perf_counter(), 0
    try:
        while not stop.is_set():
            ahead = started + i / rate - time.perf_counter()
            if ahead > 0:
                time.sleep(ahead)
            pub.stdin.write(payload(i, "soak") + b"\n")
            pub.stdin.flush()
            i += 1
            counter[0] = i
    finally:
        pub.stdin.close()
        try:
            pub.wait(30)
        except subprocess.TimeoutExpired:
            pub.kill()
            pub.wait()


def dicom_load(port: int, work: Path, every: float, batch: int, stop: threading.Event, counter: list[int]) -> None:
    n = 0
    while not stop.wait(every):
        n += 1
        files = make_instances(work / f"batch-{n}", batch, n)
        done = subprocess.run(
            ["storescu", "-aec", "GATEWAY", "127.0.0.1", str(port), *map(str, files)],
            env=DCMTK_ENV,
            capture_output=True,
            timeout=120,
        )
        if done.returncode == 0:
            counter[0] += batch
        else:
            counter[1] += batch
        shutil.rmtree(work / f"batch-{n}", ignore_errors=True)


# -- sampling -------------------------------------------------------------------------------------------------------


def gateway_processes(root: int) -> list[tuple[str, int]]:
    """(role, pid) of the daemon and its descendants, roles from the command line (run, deliver, worker)."""
    out: list[tuple[str, int]] = []
    stack = [(root, True)]
    while stack:
        pid, top = stack.pop()
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            kids = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
        except OSError:
            continue
        role = "run" if top else "child"
        if b"gateway" in cmd:
            i = cmd.index(b"gateway")
            role = cmd[i + 1].decode() if i + 1 < len(cmd) else role
            if not top and role == "run":
                role = "worker"
        out.append((role, pid))
        stack.extend((int(c), False) for c in kids)
    return out


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def metric_sum(text: str, name: str) -> float:
    """The sum of every sample of ``name`` (all label sets) in Prometheus text."""
    return sum(float(v) for v in re.findall(rf"^{name}(?:{{[^}}]*}})? (\S+)$", text, re.M))


def p99(values: list[float]) -> float:
    if not values:
        return 0.0
    values = sorted(values)
    return values[max(0, int(len(values) * 0.99) - 1)] * 1000


def slope_per_min(ts: list[float], ys: list[float]) -> float:
    """Least-squares slope of ys over ts (seconds), per minute."""
    n = len(ts)
    if n < 2:
        return 0.0
    mt, my = sum(ts) / n, sum(ys) / n
    var = sum((t - mt) ** 2 for t in ts)
    return 60 * sum((t - mt) * (y - my) for t, y in zip(ts, ys, strict=True)) / var if var else 0.0


# -- output ---------------------------------------------------------------------------------------------------------


def plot(rows: list[dict[str, float]], procs: list[str], png: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")  # no display; the PNG is the output
    import matplotlib.pyplot as plt

    t = [r["t_s"] / 60 for r in rows]
    fig, axes = plt.subplots(2, 2, figsize=(12, 8), sharex=True)
    ax = axes[0][0]
    for p in procs:
        ax.plot(t, [r[f"rss_mb_{p}"] for r in rows], marker=".", label=p)
    ax.set_ylabel("RSS (MB)")
    ax.set_title("resident memory per gateway process")
    ax.set_ylim(bottom=0)
    ax.legend()
    ax = axes[0][1]
    for p in procs:
        ax.plot(t, [r[f"fds_{p}"] for r in rows], marker=".", label=p)
    ax.set_ylabel("open file descriptors")
    ax.set_title("open file descriptors per process")
    ax.set_ylim(bottom=0)
    ax.legend()
    ax = axes[1][0]
    ax.plot(t, [r["committed_per_s"] for r in rows], marker=".", label="committed msg/s (journal)")
    ax.plot(t, [r["mllp_per_s"] for r in rows], marker=".", label="MLLP ACKs/s")
    ax.set_ylabel("messages/s")
    ax.set_xlabel("minutes")
    ax.set_ylim(bottom=0)
    twin = ax.twinx()
    twin.plot(t, [r["ack_p99_ms"] for r in rows], color="tab:red", linestyle="--", label="MLLP ACK p99 (ms)")
    twin.set_ylabel("ACK p99 (ms)")
    twin.set_ylim(bottom=0)
    ax.legend(loc="lower left")
    twin.legend(loc="lower right")
    ax.set_title("throughput and ACK p99")
    ax = axes[1][1]
    ax.plot(t, [r["outbox_pending"] for r in rows], marker=".", label="outbox pending")
    ax.plot(t, [r["commits_per_s"] for r in rows], marker=".", label="group commits/s")
    ax.set_xlabel("minutes")
    ax.set_ylim(bottom=0)
    ax.legend()
    ax.set_title("journal: commits and outbox depth")
    fig.suptitle(title)
    fig.tight_layout()
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=90)
    plt.close(fig)


def table(rows: list[dict[str, float]], procs: list[str]) -> str:
    cols = ["t_s", *(f"rss_mb_{p}" for p in procs), *(f"fds_{p}" for p in procs)]
    cols += ["committed_per_s", "mllp_per_s", "ack_p99_ms", "outbox_pending", "commits_per_s"]
    heads = ["t (s)", *(f"RSS {p} MB" for p in procs), *(f"FDs {p}" for p in procs)]
    heads += ["committed msg/s", "MLLP msg/s", "ACK p99 ms", "outbox pending", "group commits/s"]
    lines = ["| " + " | ".join(heads) + " |", "|" + "---:|" * len(heads)]
    for r in rows:
        cells = [f"{r[c]:.1f}" if c.startswith(("rss", "ack")) else f"{r[c]:.0f}" for c in cols]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


# -- the run --------------------------------------------------------------------------------------------------------


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--minutes", type=float, default=10.0)
    ap.add_argument("--interval", type=float, default=10.0, help="seconds between samples")
    ap.add_argument("--senders", type=int, default=4, help="MLLP connections")
    ap.add_argument("--mllp-rate", type=float, default=200.0, help="MLLP messages/s, all senders together")
    ap.add_argument("--mqtt-rate", type=float, default=100.0, help="MQTT readings/s")
    ap.add_argument("--dicom-every", type=float, default=10.0, help="seconds between DICOM batches")
    ap.add_argument("--dicom-batch", type=int, default=5, help="CT_small instances per batch")
    ap.add_argument("--workers", type=int, default=1, help="gateway worker processes (config key workers)")
    ap.add_argument("--max-slope", type=float, default=1.0, help="flat: RSS slope per process below this, MB/min")
    ap.add_argument("--fd-slack", type=int, default=8, help="flat: FDs within this many of the first half's max")
    ap.add_argument("--csv", type=Path, default=REPO / "var" / "soak" / "soak.csv")
    ap.add_argument("--png", type=Path, default=REPO / "docs" / "soak.png")
    ap.add_argument("--md", type=Path, default=REPO / "docs" / "soak.md")
    args = ap.parse_args()
    for tool in ("mosquitto", "mosquitto_pub", "storescu"):
        if shutil.which(tool) is None:
            raise SystemExit(f"{tool} is required (mosquitto, mosquitto-clients, dcmtk)")
    load_before = Path("/proc/loadavg").read_text().split()[:3]
    with tempfile.TemporaryDirectory(prefix="gw-soak-") as tmp:
        work = Path(tmp)
        broker_port = free_port()
        (work / "mosquitto.conf").write_text(
            f"listener {broker_port} 127.0.0.1\nallow_anonymous true\nuser root\npersistence false\n"
            "max_queued_messages 1000000\n"
        )
        broker = subprocess.Popen(["mosquitto", "-c", str(work / "mosquitto.conf")], stderr=subprocess.DEVNULL)
        (work / "gw").mkdir()
        topic = f"soak/{time.time_ns()}"
        dicom_port = free_port()
        daemon = Daemon(
            work / "gw",
            encrypt=True,
            source_extra=(
                f'[[sources]]\ntype = "dicom"\nname = "soak-dicom"\nhost = "127.0.0.1"\nport = {dicom_port}\n'
                'storage_dir = "dicom"\nstudy_quiet_seconds = 5\n'
                f'[[sources]]\ntype = "mqtt"\nname = "soak-mqtt"\nport = {broker_port}\n'
                f'client_id = "soak-{time.time_ns()}"\ntopics = ["{topic}/#"]\n'
                + ('shared_group = "soak"\n' if args.workers > 1 else "")
            ),
        )
        config = daemon.config.read_text().replace('log_level = "INFO"', 'log_level = "WARNING"')
        daemon.config.write_text((f"workers = {args.workers}\n" if args.workers > 1 else "") + config)
        stop = threading.Event()
        threads: list[threading.Thread] = []
        rows: list[dict[str, float]] = []
        procs_seen: list[str] = []
        try:
            time.sleep(0.3)
            daemon.start()
            assert daemon.proc is not None
            mllp = MllpLoad(daemon.mllp_port, args.senders, args.mllp_rate)
            mqtt_count = [0]
            dicom_count = [0, 0]
            threads = [
                threading.Thread(target=mllp.run, args=(stop,), name="mllp"),
                threading.Thread(target=mqtt_load, args=(broker_port, topic, args.mqtt_rate, stop, mqtt_count)),
                threading.Thread(
                    target=dicom_load,
                    args=(dicom_port, work / "dicom-files", args.dicom_every, args.dicom_batch, stop, dicom_count),
                ),
            ]
            for t in threads:
                t.start()
            started = time.monotonic()
            end = started + args.minutes * 60
            prev: tuple[float, float, float, int] | None = None
            next_sample = started + args.interval
            print(f"soak: {args.minutes:g} min, sample every {args.interval:g} s", file=sys.stderr)
            while True:
                time.sleep(max(0.0, next_sample - time.monotonic()))
                now = time.monotonic()
                metrics = daemon.metrics()
                committed = metric_sum(metrics, "gateway_journal_group_size_sum")
                commits = metric_sum(metrics, "gateway_journal_group_size_count")
                with mllp.lock:
                    sent = mllp.sent
                lat = mllp.take()
                row: dict[str, float] = {"t_s": now - started}
                # roles are unique per daemon except workers: number them
                seen: dict[str, int] = {}
                for role, pid in gateway_processes(daemon.proc.pid):
                    seen[role] = seen.get(role, 0) + 1
                    name = role if role != "worker" else f"worker{seen[role]}"
                    with contextlib.suppress(OSError):
                        row[f"rss_mb_{name}"] = rss_mb(pid)
                        row[f"fds_{name}"] = len(os.listdir(f"/proc/{pid}/fd"))
                        if name not in procs_seen:
                            procs_seen.append(name)
                if prev is None:
                    dt = now - started
                    d_comm, d_commits, d_sent = committed, commits, sent
                else:
                    dt = now - prev[0]
                    d_comm, d_commits, d_sent = committed - prev[1], commits - prev[2], sent - prev[3]
                row |= {
                    "committed_per_s": d_comm / dt,
                    "commits_per_s": d_commits / dt,
                    "mllp_per_s": d_sent / dt,
                    "ack_p99_ms": p99(lat),
                    "outbox_pending": metric_sum(metrics, "gateway_outbox_pending"),
                }
                prev = (now, committed, commits, sent)
                rows.append(row)
                print(
                    f"  t={row['t_s']:5.0f}s  "
                    + "  ".join(
                        f"{p} {row.get(f'rss_mb_{p}', 0):.0f}MB/{row.get(f'fds_{p}', 0):.0f}fd" for p in procs_seen
                    )
                    + f"  {row['committed_per_s']:.0f} msg/s  p99 {row['ack_p99_ms']:.1f} ms"
                    f"  outbox {row['outbox_pending']:.0f}",
                    file=sys.stderr,
                )
                if daemon.proc.poll() is not None:
                    raise SystemExit(f"the daemon exited with {daemon.proc.returncode}:\n{daemon.log()[-2000:]}")
                next_sample += args.interval
                if next_sample > end + 0.5:
                    break
        finally:
            stop.set()
            for t in threads:
                t.join(180)
            if daemon.proc is not None and daemon.proc.poll() is None:
                daemon.stop()
            broker.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                broker.wait(5)
    load_after = Path("/proc/loadavg").read_text().split()[:3]

    for r in rows:  # a process that was not there in a sample (a restarted worker) counts as 0 there
        for p in procs_seen:
            r.setdefault(f"rss_mb_{p}", 0.0)
            r.setdefault(f"fds_{p}", 0.0)
    half = [r for r in rows if r["t_s"] >= rows[-1]["t_s"] / 2] if rows else []
    first = [r for r in rows if r not in half]
    verdicts = []
    flat = bool(half) and len(half) >= 2
    for p in procs_seen:
        s = slope_per_min([r["t_s"] for r in half], [r[f"rss_mb_{p}"] for r in half])
        fd_first = max((r[f"fds_{p}"] for r in first), default=0)
        fd_second = max((r[f"fds_{p}"] for r in half), default=0)
        ok = abs(s) < args.max_slope and fd_second <= fd_first + args.fd_slack
        flat = flat and ok
        verdicts.append(
            f"- {p}: RSS {min(r[f'rss_mb_{p}'] for r in rows):.0f}-{max(r[f'rss_mb_{p}'] for r in rows):.0f} MB, "
            f"slope over the second half {s:+.2f} MB/min (limit {args.max_slope:g}); open FDs max "
            f"{fd_first:.0f} in the first half, {fd_second:.0f} in the second (slack {args.fd_slack}): "
            f"{'flat' if ok else 'NOT flat'}"
        )
    accepted = mllp.sent - mllp.not_accepted
    summary = (
        f"MLLP: {mllp.sent:,} sent by {args.senders} senders at {args.mllp_rate:g}/s, {accepted:,} answered AA"
        f"{'; errors: ' + '; '.join(mllp.errors) if mllp.errors else ''}. MQTT: {mqtt_count[0]:,} readings "
        f"published at {args.mqtt_rate:g}/s. DICOM: {dicom_count[0]:,} instances stored "
        f"({dicom_count[1]} failed), {args.dicom_batch} every {args.dicom_every:g} s. Delivery to the SQL store."
    )
    verdict = f"**{'FLAT' if flat else 'NOT FLAT'}**"
    conditions = (
        f"{platform.node()}, {os.cpu_count()} cores, Python {platform.python_version()}; "
        f"{datetime.now(UTC):%Y-%m-%d %H:%M} UTC; {args.minutes:g} min, a sample every {args.interval:g} s; "
        f"load average {' '.join(load_before)} before, {' '.join(load_after)} after"
    )
    print("\n" + table(rows, procs_seen))
    print("\n" + summary)
    print("\n".join(verdicts))
    print(f"verdict: {verdict}")

    args.csv.parent.mkdir(parents=True, exist_ok=True)
    with args.csv.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]) if rows else ["t_s"])
        w.writeheader()
        w.writerows(rows)
    plot(rows, procs_seen, args.png, f"gateway soak: {args.minutes:g} min mixed load ({verdict.strip('*').lower()})")
    args.md.parent.mkdir(parents=True, exist_ok=True)
    args.md.write_text(
        "# Soak: memory and descriptors under steady mixed load\n\n"
        "Generated by `make soak` (`bench/soak.py`); do not edit by hand. The plot is "
        f"[{args.png.name}]({args.png.name}).\n\n"
        f"Conditions: {conditions}. The load generators run on the same cores as the gateway.\n\n"
        f"{summary}\n\n"
        f"Flat means: over the second half of the run, every gateway process's RSS slope is below "
        f"{args.max_slope:g} MB/min and its open descriptors stay within {args.fd_slack} of the first half's "
        "maximum.\n\n"
        f"Verdict: {verdict}\n\n" + "\n".join(verdicts) + "\n\n" + table(rows, procs_seen) + "\n\n"
        f"![soak plot]({args.png.name})\n"
    )
    print(f"wrote {args.csv}, {args.png}, {args.md}", file=sys.stderr)


if __name__ == "__main__":
    main()
