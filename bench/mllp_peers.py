"""MLLP peers of the gateway, same load generator as bench/mllp_throughput.py: the bare echo server (the floor)
and hl7apy's MLLPServer, the MLLP server of the HL7 library most Python integration code reaches for.

The hl7apy server runs in its own process with a handler that parses each message with hl7apy (tolerant, no
group finding) and answers an ACK carrying the message's control id; no journal, nothing durable. hl7apy's
server reads the frame byte by byte and closes the connection after one reply, so its senders open one
connection per message: the row says so, and its ratio is against the same echo floor the gateway rows use.

    .venv/bin/python bench/mllp_peers.py [--duration 10] [--senders 1,8] [--json out.json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.mllp_throughput import ADT, measure, spawn_server, start_floor, stop  # noqa: E402


def hl7apy_server(port: int) -> None:
    from hl7apy.consts import VALIDATION_LEVEL
    from hl7apy.mllp import AbstractHandler, MLLPServer
    from hl7apy.parser import parse_message

    class AckHandler(AbstractHandler):  # type: ignore[misc]
        def reply(self) -> str:
            msg = parse_message(self.incoming_message, find_groups=False, validation_level=VALIDATION_LEVEL.TOLERANT)
            cid = msg.msh.msh_10.value
            ack = f"MSH|^~\\&|GW|HOSP|BENCH|HOSP|20261124120000||ACK^A01^ACK|{cid}|P|2.5.1\rMSA|AA|{cid}\r"
            return f"\x0b{ack}\x1c\r"

    server = MLLPServer("127.0.0.1", port, {"ADT^A01^ADT_A01": (AckHandler,)})
    server.serve_forever()


async def drive_reconnecting(port: int, senders: int, duration: float) -> tuple[int, list[float]]:
    """Like mllp_throughput.drive, but one connection per message (hl7apy closes after each reply)."""
    latencies: list[float] = []
    count = 0
    stop_at = time.perf_counter() + duration

    async def sender(k: int) -> None:
        nonlocal count
        n = 0
        while time.perf_counter() < stop_at:
            msg = ADT.format(cid=f"p-{k}-{n}", mrn=f"{k:03d}{n:07d}").encode()
            t0 = time.perf_counter()
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            writer.write(b"\x0b" + msg + b"\x1c\r")
            ack = await reader.read()  # the server closes after its reply
            writer.close()
            await writer.wait_closed()
            latencies.append(time.perf_counter() - t0)
            if b"MSA|AA" not in ack:
                raise RuntimeError(f"not accepted: {ack[:200]!r}")
            n += 1
            count += 1

    await asyncio.gather(*(sender(k) for k in range(senders)))
    return count, latencies


def measure_reconnecting(port: int, senders: int, duration: float) -> dict[str, float]:
    asyncio.run(drive_reconnecting(port, senders, min(1.0, duration / 5)))  # warm-up
    t0 = time.perf_counter()
    count, lat = asyncio.run(drive_reconnecting(port, senders, duration))
    elapsed = time.perf_counter() - t0
    lat.sort()
    return {
        "rate": count / elapsed,
        "p50": statistics.median(lat) * 1000,
        "p99": lat[max(0, int(len(lat) * 0.99) - 1)] * 1000,
        "count": count,
    }


def start_hl7apy() -> tuple[subprocess.Popen[bytes], int]:
    return spawn_server(__file__, "--hl7apy-server", "hl7apy server", 20)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--duration", type=float, default=10.0, help="seconds per measurement")
    ap.add_argument("--senders", default="1,8", help="comma-separated sender counts")
    ap.add_argument("--json", type=Path, help="also write the results to this file as JSON")
    ap.add_argument("--hl7apy-server", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.hl7apy_server:
        hl7apy_server(args.hl7apy_server)
        return
    senders = [int(s) for s in args.senders.split(",")]
    rows = []
    floor, fport = start_floor()
    try:
        for n in senders:
            rows.append({"target": "floor", "senders": n, **measure(fport, n, args.duration, "floor")})
    finally:
        stop(floor)
    peer, pport = start_hl7apy()
    try:
        for n in senders:
            rows.append({"target": "hl7apy", "senders": n, **measure_reconnecting(pport, n, args.duration)})
    finally:
        stop(peer)
    print(f"{'target':<10} {'senders':>7} {'msg/s':>9} {'p50 ms':>8} {'p99 ms':>8}")
    for r in rows:
        print(f"{r['target']:<10} {r['senders']:>7} {r['rate']:>9.0f} {r['p50']:>8.2f} {r['p99']:>8.2f}")
    if args.json:
        args.json.write_text(json.dumps({"duration": args.duration, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
