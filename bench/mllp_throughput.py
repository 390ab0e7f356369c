"""MLLP ingest benchmark: the gateway against a bare MLLP echo server (the floor), same senders, same run.

Starts the daemon as a process on a temporary SQLite journal (WAL, synchronous=FULL, as shipped) and drives N
concurrent MLLP senders, each waiting for its ACK before sending the next ADT^A01. Prints messages/s and ACK
latency p50/p99 per configuration, the same for the floor, and the ratio. The floor is an asyncio server in its
own process that deframes with the same framing code and answers every frame with a fixed ACK, so the ratio
shows what journaling, mapping and acknowledging honestly cost on top of the network round trip.

    .venv/bin/python bench/mllp_throughput.py [--duration 10] [--senders 1,8] [--validate both] [--workers 1,2]
        [--journal-url mysql+aiomysql://root:@127.0.0.1:3306/scratch]

--workers runs the gateway with `workers = N` (a supervisor and N processes sharing the port); --journal-url
puts the journal in that database instead of a temporary SQLite file (use a scratch database: rows are kept).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import secrets
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

ADT = (
    "MSH|^~\\&|BENCH|HOSP|GW|HOSP|20261124120000||ADT^A01^ADT_A01|{cid}|P|2.5.1\r"
    "EVN|A01|20261124120000\r"
    "PID|1||{mrn}^^^HOSP^MR~{mrn}9^^^SSA^SS||Everyman^Adam^A^III^Dr^^L||19800101|M|||"
    "2222 Home Street^^Ann Arbor^MI^99999^USA^H||^PRN^PH^^1^555^5552004|^WPN^PH^^1^955^5551009|eng|M|||"
    "444-33-3333|||N||||||N\r"
    "NK1|1|Jones^Barbara^K|SPO^Spouse^HL70063||||NK^NEXT OF KIN\r"
    "PV1|1|I|2000^2012^01^^^^^^^^^|E|||004777^Attend^Aaron^A^^^Dr^^^^^^NPI|||SUR||||7|A0|"
    "004777^Attend^Aaron^A^^^Dr^^^^^^NPI|IP||||||||||||||||||||||||20261124120000\r"
    "AL1|1||^ASPIRIN\r"
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# -- the floor: a bare MLLP echo server ----------------------------------------------------------------------

FLOOR_ACK = b"\x0bMSH|^~\\&|GW|HOSP|BENCH|HOSP|20261124120000||ACK^A01^ACK|1|P|2.5.1\rMSA|AA|1\r\x1c\r"


async def floor_server(port: int) -> None:
    from adapters.mllp.framing import Deframer

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        sock = writer.get_extra_info("socket")
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        d = Deframer(1 << 24)
        while data := await reader.read(65536):
            for _ in d.feed(data):
                writer.write(FLOOR_ACK)
            await writer.drain()
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", port)
    async with server:
        await server.serve_forever()


# -- the load ------------------------------------------------------------------------------------------------


async def drive(port: int, senders: int, duration: float, tag: str) -> tuple[int, list[float]]:
    latencies: list[float] = []
    count = 0
    stop_at = time.perf_counter() + duration

    async def sender(k: int) -> None:
        nonlocal count
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        n = 0
        buf = b""
        while time.perf_counter() < stop_at:
            msg = ADT.format(cid=f"{tag}-{k}-{n}", mrn=f"{k:03d}{n:07d}").encode()
            t0 = time.perf_counter()
            writer.write(b"\x0b" + msg + b"\x1c\r")
            while b"\x1c\r" not in buf:
                chunk = await reader.read(65536)
                if not chunk:
                    raise ConnectionError("closed")
                buf += chunk
            ack, _, buf = buf.partition(b"\x1c\r")
            latencies.append(time.perf_counter() - t0)
            if b"MSA|AA" not in ack:
                raise RuntimeError(f"not accepted: {ack[:200]!r}")
            n += 1
            count += 1
        writer.close()

    await asyncio.gather(*(sender(k) for k in range(senders)))
    return count, latencies


def measure(port: int, senders: int, duration: float, tag: str) -> dict[str, float]:
    asyncio.run(drive(port, senders, min(1.0, duration / 5), tag + "w"))  # warm-up
    t0 = time.perf_counter()
    count, lat = asyncio.run(drive(port, senders, duration, tag))
    elapsed = time.perf_counter() - t0
    lat.sort()
    return {
        "rate": count / elapsed,
        "p50": statistics.median(lat) * 1000,
        "p99": lat[int(len(lat) * 0.99) - 1] * 1000,
        "count": count,
    }


# -- processes -----------------------------------------------------------------------------------------------


def start_gateway(
    workdir: Path, validate: bool, workers: int = 1, journal_url: str | None = None
) -> tuple[subprocess.Popen[bytes], int]:
    port, http = free_port(), free_port()
    from tests.signed_rules import signed_rules  # the daemon runs only signed rule sets (docs/rules.md)

    trust = signed_rules(
        workdir,
        "serial: 1\ndestinations:\n"
        f"  store: {{type: sql_store, url: 'sqlite:///{workdir}/store.db'}}\n"
        "routes:\n  - {name: mapped, match: {mapped: true}, to: [store]}\n",
    )
    keys = ", ".join(f'{{file = "{k["file"]}"}}' for k in trust["keys"])
    (workdir / "journal.key").write_text(secrets.token_hex(32))  # encryption at rest on, as in production
    (workdir / "gateway.toml").write_text(
        f'workers = {workers}\nrules = "rules.yaml"\naudit_log = "{workdir}/audit.log"\n'
        f'[journal]\nurl = "{journal_url or f"sqlite:///{workdir}/journal.db"}"\n'
        '[encryption]\nkey = "journal.key"\n'
        f'[rules_trust]\nkeys = [{keys}]\nstate_file = "{trust["state_file"]}"\n'
        f'[telemetry]\nlisten = "127.0.0.1:{http}"\nlog_level = "WARNING"\n'
        f"[normalise]\nvalidate_fhir = {'true' if validate else 'false'}\n"
        f'[[sources]]\ntype = "mllp"\nname = "bench"\nport = {port}\n'
    )
    log = (workdir / "daemon.log").open("ab")
    proc = subprocess.Popen(
        [sys.executable, "-m", "gateway", "run", "--config", str(workdir / "gateway.toml")],
        stdout=log,
        stderr=subprocess.STDOUT,
        cwd=REPO,
    )
    log.close()
    deadline = time.monotonic() + 120  # N workers start one after the other on a loaded machine
    while time.monotonic() < deadline:
        try:
            # /readyz: with workers, the supervisor is alive (/healthz) before its workers listen.
            with urllib.request.urlopen(f"http://127.0.0.1:{http}/readyz", timeout=1):
                return proc, port
        except OSError:
            time.sleep(0.1)
    proc.kill()
    raise SystemExit("the gateway did not start:\n" + (workdir / "daemon.log").read_text())


def spawn_server(script: str, option: str, what: str, timeout: float) -> tuple[subprocess.Popen[bytes], int]:
    """Run ``script option PORT`` on a free port; return once the port accepts connections."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, script, option, str(port)])
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return proc, port
        except OSError:
            time.sleep(0.05)
    proc.kill()
    raise SystemExit(f"the {what} did not start")


def start_floor() -> tuple[subprocess.Popen[bytes], int]:
    return spawn_server(__file__, "--floor-server", "floor server", 10)


def stop(proc: subprocess.Popen[bytes]) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()


def fsync_floor(directory: Path, n: int = 200) -> float:
    """Milliseconds per fsync of a small append on the journal's disk: the hard floor of one commit."""
    path = directory / "fsync.probe"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    try:
        t0 = time.perf_counter()
        for _ in range(n):
            os.write(fd, b"x" * 512)
            os.fsync(fd)
        return (time.perf_counter() - t0) / n * 1000
    finally:
        os.close(fd)
        path.unlink()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--duration", type=float, default=10.0, help="seconds per measurement")
    ap.add_argument("--senders", default="1,8", help="comma-separated sender counts")
    ap.add_argument(
        "--validate",
        choices=["off", "on", "both"],
        default="both",
        help="runtime FHIR validation in the gateway",
    )
    ap.add_argument("--workers", default="1", help="comma-separated `workers` settings of the gateway, e.g. 1,2")
    ap.add_argument("--journal-url", help="journal database URL (default: a temporary SQLite file)")
    ap.add_argument("--floor-server", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--json", type=Path, help="also write the results to this file as JSON (for bench/run_all.py)")
    args = ap.parse_args()
    if args.floor_server:
        asyncio.run(floor_server(args.floor_server))
        return

    senders = [int(s) for s in args.senders.split(",")]
    modes = {"off": [False], "on": [True], "both": [False, True]}[args.validate]
    print(
        f"machine: {platform.node()} {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}"
    )
    print(f"message: ADT^A01, {len(ADT.format(cid='x', mrn='0000000000'))} bytes; {args.duration:g} s per run")
    worker_counts = [int(w) for w in args.workers.split(",")]
    journal = "mariadb" if args.journal_url and args.journal_url.startswith("mysql") else "sqlite"
    print(f"journal: {journal}; workers: {args.workers}")
    run = secrets.token_hex(3)  # control ids unique per run: a kept database must not see resends (dedup)
    results: dict[tuple[str, int], dict[str, float]] = {}
    fsync_ms = 0.0
    floor, fport = start_floor()
    try:
        for n in senders:
            results[("floor", n)] = measure(fport, n, args.duration, "floor")
    finally:
        stop(floor)
    for workers in worker_counts:
        for validate in modes:
            with tempfile.TemporaryDirectory(
                prefix="gw-bench-", dir=REPO / "var" if (REPO / "var").exists() else None
            ) as d:
                if validate is modes[0] and workers == worker_counts[0]:
                    fsync_ms = fsync_floor(Path(d))
                    print(f"fsync of a 512-byte append on the journal's disk: {fsync_ms:.2f} ms")
                gw, gport = start_gateway(Path(d), validate, workers, args.journal_url)
                name = f"gateway{'+validate' if validate else ''}" + (f"/{workers}w" if workers > 1 else "")
                try:
                    for n in senders:
                        results[(name, n)] = measure(gport, n, args.duration, f"{run}v{validate:d}w{workers}")
                finally:
                    stop(gw)
    print()
    print(f"{'target':<20} {'senders':>7} {'msg/s':>9} {'p50 ms':>8} {'p99 ms':>8} {'vs floor':>9}")
    for (name, n), r in results.items():
        base = results[("floor", n)]["rate"]
        print(f"{name:<20} {n:>7} {r['rate']:>9.0f} {r['p50']:>8.2f} {r['p99']:>8.2f} {r['rate'] / base:>9.2f}")
    if args.json:
        rows = [
            {
                "target": name,
                "senders": n,
                "workers": int(name.rpartition("/")[2][:-1]) if "/" in name else 1,
                "journal": "-" if name == "floor" else journal,
                **r,
            }
            for (name, n), r in results.items()
        ]
        args.json.write_text(json.dumps({"fsync_ms": fsync_ms, "duration": args.duration, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
