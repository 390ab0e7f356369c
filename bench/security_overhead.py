"""What security costs: encryption at rest in the journal, and TLS on the MLLP listener, each against the same
thing without it, in the same run.

1. Seal and open (AES-256-GCM) per value: microseconds for a 1 KB message, a 10 KB bundle and a 1 MB message.
2. Journal group commit on SQLite (WAL, synchronous=FULL), N concurrent committers: messages/s without and with
   a keyring, and the ratio.
3. The MLLP listener in this process with an instant submitter (no journal): N senders, each waiting for its
   ACK, over plain TCP and over mutual TLS (connections opened once); messages/s and the ratio. Then new TLS
   connections per second (a full mutual-TLS handshake each).

    .venv/bin/python bench/security_overhead.py [--duration 5] [--senders 8] [--rounds 3]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import ssl
import statistics
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from adapters.mllp.config import MllpSourceConfig
from gateway.contracts import Envelope, InputKind, Outcome, SubmitResult
from gateway.crypto import Keyring, row_aad
from gateway.ids import uuid7
from gateway.journal import Journal, JournalRecord
from gateway.tls import ClientTLS, ServerTLS, client_context

MESSAGE = (
    b"MSH|^~\\&|LOADGEN|HOSP|GW|HOSP|20261124120000||ADT^A01^ADT_A01|{cid}|P|2.5.1\r"
    b"EVN|A01|20261124120000\rPID|1||MRN0000001^^^HOSP^MR||Testpatient^Alex^J||19800101|F|||1 Main St^^Springfield\r"
    b"PV1|1|I|WARD1^101^A||||1234^Attending^Ann^^^Dr|||MED\r"
)


def bench_seal() -> dict[str, float]:
    ring = Keyring(os.urandom(32))
    aad = row_aad("messages", "raw", "0190a40c-0000-7000-8000-000000000000")
    out = {}
    for label, size in (("1 KB message", 1024), ("10 KB bundle", 10 * 1024), ("1 MB message", 1 << 20)):
        data = os.urandom(size)
        n = max(20, 20_000_000 // size)
        t0 = time.perf_counter()
        for _ in range(n):
            sealed = ring.seal(data, aad)
        t1 = time.perf_counter()
        for _ in range(n):
            ring.open(sealed, aad)
        t2 = time.perf_counter()
        print(f"  {label:>13}: seal {(t1 - t0) / n * 1e6:8.1f} us, open {(t2 - t1) / n * 1e6:8.1f} us")
        out[f"seal_{size}_us"] = (t1 - t0) / n * 1e6
    return out


async def journal_rate(keyring: Keyring | None, senders: int, duration: float) -> float:
    with tempfile.TemporaryDirectory(prefix="gw-bench-sec-") as d:
        j = Journal(f"sqlite:///{d}/journal.db", keyring=keyring)
        await j.open()
        count = 0
        deadline = time.monotonic() + duration
        bundle = b'{"resourceType":"Bundle","type":"transaction","entry":[' + b"{}," * 800 + b"{}]}"

        async def sender(k: int) -> None:
            nonlocal count
            i = 0
            while time.monotonic() < deadline:
                payload = MESSAGE.replace(b"{cid}", f"S{k}-{i}".encode())
                env = Envelope(uuid7(), "bench", InputKind.HL7V2, datetime.now(UTC), payload, "127.0.0.1:1")
                await j.commit(JournalRecord(env, "accepted", "ADT^A01", f"S{k}-{i}", fhir=bundle, destinations=["d"]))
                count += 1
                i += 1

        await asyncio.gather(*(sender(k) for k in range(senders)))
        await j.close()
        return count / duration


class Instant:
    async def submit(self, envelope: Envelope) -> SubmitResult:
        return SubmitResult(Outcome.DELIVERED)


async def mllp_rate(tls: ServerTLS | None, ctx: ssl.SSLContext | None, senders: int, duration: float) -> float:
    src = MllpSourceConfig(type="mllp", name=f"bench-{'tls' if tls else 'plain'}", port=0, tls=tls).build(Instant())
    await src.start()
    count = 0
    deadline = time.monotonic() + duration

    async def sender(k: int) -> None:
        nonlocal count
        reader, writer = await asyncio.open_connection(
            "127.0.0.1", src.port, ssl=ctx, server_hostname="localhost" if ctx else None
        )
        i = 0
        while time.monotonic() < deadline:
            writer.write(b"\x0b" + MESSAGE.replace(b"{cid}", f"S{k}-{i}".encode()) + b"\x1c\r")
            await reader.readuntil(b"\x1c\r")
            count += 1
            i += 1
        writer.close()

    try:
        await asyncio.gather(*(sender(k) for k in range(senders)))
    finally:
        await src.stop(1.0)
    return count / duration


async def handshake_rate(tls: ServerTLS, ctx: ssl.SSLContext, duration: float) -> float:
    src = MllpSourceConfig(type="mllp", name="bench-hs", port=0, tls=tls).build(Instant())
    await src.start()
    n = 0
    deadline = time.monotonic() + duration
    try:
        while time.monotonic() < deadline:
            reader, writer = await asyncio.open_connection("127.0.0.1", src.port, ssl=ctx, server_hostname="localhost")
            writer.write(b"\x0b" + MESSAGE.replace(b"{cid}", str(n).encode()) + b"\x1c\r")
            await reader.readuntil(b"\x1c\r")
            writer.close()
            n += 1
    finally:
        await src.stop(1.0)
    return n / duration


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--duration", type=float, default=5.0, help="seconds per measurement")
    ap.add_argument("--senders", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=3, help="alternating rounds per comparison (medians reported)")
    ap.add_argument("--json", type=Path, help="also write the results to this file as JSON (for bench/run_all.py)")
    args = ap.parse_args()
    print(
        f"machine: {platform.node()} {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}"
    )
    print(f"OpenSSL: {ssl.OPENSSL_VERSION}")
    print("AES-256-GCM per value:")
    result: dict[str, float] = bench_seal()

    # Alternating rounds, medians: the two sides see the same machine noise.
    ring = Keyring(os.urandom(32))
    rounds = [
        (
            asyncio.run(journal_rate(None, args.senders, args.duration)),
            asyncio.run(journal_rate(ring, args.senders, args.duration)),
        )
        for _ in range(args.rounds)
    ]
    plain = statistics.median(r[0] for r in rounds)
    sealed = statistics.median(r[1] for r in rounds)
    print(
        f"journal commits, {args.senders} committers, 2.4 KB bundle each: clear {plain:8.0f}/s, encrypted "
        f"{sealed:8.0f}/s, ratio {sealed / plain:.2f}"
    )

    from tests.pki import make_pki

    with tempfile.TemporaryDirectory(prefix="gw-bench-pki-") as d:
        pki = make_pki(Path(d))
        tls = ServerTLS(
            cert=pki.p("server.pem"), key=pki.p("server.key"), client_ca=pki.p("ca.pem"), require_client_cert=True
        )
        ctx = client_context(ClientTLS(ca=pki.p("ca.pem"), cert=pki.p("client.pem"), key=pki.p("client.key")))
        pairs = [
            (
                asyncio.run(mllp_rate(None, None, args.senders, args.duration)),
                asyncio.run(mllp_rate(tls, ctx, args.senders, args.duration)),
            )
            for _ in range(args.rounds)
        ]
        p = statistics.median(x[0] for x in pairs)
        t = statistics.median(x[1] for x in pairs)
        print(
            f"MLLP round trips, {args.senders} senders, instant submitter: plain {p:8.0f}/s, mutual TLS "
            f"{t:8.0f}/s, ratio {t / p:.2f}"
        )
        h = asyncio.run(handshake_rate(tls, ctx, args.duration))
        print(f"new mutual-TLS connections (handshake + one message), one client: {h:6.0f}/s")
    result |= {"journal_clear": plain, "journal_encrypted": sealed, "mllp_plain": p, "mllp_tls": t, "handshakes": h}
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
