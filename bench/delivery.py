"""Delivery benchmark: outbox items delivered per second to the SQL resource store and to a FHIR server, against
the FHIR server's own rate with a plain HTTP client, same run, same bundles.

Fills a fresh journal (SQLite by default, as shipped; ``--db mariadb`` for the local MariaDB) with N mapped
ADT^A01 messages (real bundles from the HL7 normaliser, one patient each), then drains each destination with
the gateway's DeliveryWorker (inline, in this process) and times it:

- ``sql_store``: the resource store on its own SQLite file (or a MariaDB database), batches of ``--batch``;
- ``sql_store_updates`` (printed last): N more messages for the same patients with a changed name, into that
  store: what a stream of A08s costs, where most resources are updated rather than created;
- ``fhir_rest``: a local FHIR receiver (aiohttp, in its own process) that answers every transaction at once,
  ``--concurrency`` requests in flight, FIFO per patient on (the default);
- ``floor``: the same receiver driven by a plain aiohttp client POSTing the same bundles with the same
  concurrency, no journal: what the receiver and the loopback can do at all.

The ratio fhir_rest/floor shows what claiming, decoding, bookkeeping and retries-ready delivery cost on top of
the HTTP exchange; compare the deliveries/s with the MLLP ingest rate in docs/benchmarks.md (the outbox must
keep up with ingest).

    .venv/bin/python bench/delivery.py [--messages 3000] [--db sqlite|mariadb] [--concurrency 8]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import secrets
import socket
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

ADT = (
    "MSH|^~\\&|BENCH|HOSP|GW|HOSP|20261124120000||ADT^A01^ADT_A01|{cid}|P|2.5.1\r"
    "EVN|A01|20261124120000\r"
    "PID|1||{mrn}^^^HOSP^MR||{family}^Adam^A^III^Dr^^L||19800101|M|||"
    "2222 Home Street^^Ann Arbor^MI^99999^USA^H||^PRN^PH^^1^555^5552004|||M\r"
    "NK1|1|Jones^Barbara^K|SPO^Spouse^HL70063||||NK^NEXT OF KIN\r"
    "PV1|1|I|2000^2012^01|E|||004777^Attend^Aaron^A^^^Dr|||SUR||||7|A0||IP|V{n}^^^HOSP^VN\r"
    "AL1|1||^ASPIRIN\r"
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# -- the receiver (own process) -------------------------------------------------------------------------------


def serve(port: int) -> None:
    from aiohttp import web

    reply = b'{"resourceType":"Bundle","type":"transaction-response","entry":[]}'

    async def transaction(request: web.Request) -> web.Response:
        await request.read()
        return web.Response(body=reply, content_type="application/fhir+json")

    app = web.Application()
    app.router.add_post("/fhir", transaction)
    web.run_app(app, host="127.0.0.1", port=port, print=None, access_log=None)


def start_receiver() -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    proc = subprocess.Popen([sys.executable, __file__, "--serve", str(port)])
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return proc, f"http://127.0.0.1:{port}/fhir"
        except OSError:
            time.sleep(0.05)
    proc.kill()
    raise SystemExit("the FHIR receiver did not start")


# -- the gateway side ------------------------------------------------------------------------------------------


def records(n: int, destination: str, family: str = "Everyman") -> list[object]:
    import orjson

    from gateway.contracts import Envelope, InputKind
    from gateway.ids import uuid7
    from gateway.journal import JournalRecord
    from gateway.normalise.hl7v2.normaliser import Hl7v2Normaliser

    normaliser = Hl7v2Normaliser()
    out = []
    for i in range(n):
        raw = ADT.format(cid=f"B{i}", mrn=f"MRN{i:07d}", n=i, family=family).encode()
        env = Envelope(uuid7(), "bench", InputKind.HL7V2, datetime.now(UTC), raw, "127.0.0.1:1")
        p = normaliser.prepare(env)
        assert p.bundle is not None
        out.append(
            JournalRecord(
                env,
                "accepted",
                message_type=p.message_type,
                control_id=p.control_id,
                fhir=orjson.dumps(p.bundle),
                destinations=(destination,),
                ordering_key=f"Patient/{i}",
            )
        )
    return out


async def fill(journal_url: str, n: int, destination: str, family: str = "Everyman") -> tuple[object, float]:
    from gateway.journal import Journal

    j = Journal(journal_url)
    await j.open()
    recs = records(n, destination, family)
    await asyncio.gather(*(j.commit(r) for r in recs))  # type: ignore[arg-type]
    return j, len(recs[0].fhir or b"")  # type: ignore[attr-defined]


async def drain(journal: object, sink: object, batch: int) -> float:
    from gateway.delivery import DeliveryWorker, RetryPolicy

    await sink.start()  # type: ignore[attr-defined]
    w = DeliveryWorker(journal, sink, RetryPolicy(), batch_size=batch, linger=0)  # type: ignore[arg-type]
    try:
        t = time.perf_counter()
        while await w.run_once():
            pass
        elapsed = time.perf_counter() - t
    finally:
        await sink.close()  # type: ignore[attr-defined]
    counts = await journal.counts()  # type: ignore[attr-defined]
    assert not counts.get("outbox.pending") and not counts.get("outbox.dead"), counts
    return elapsed


async def plain_client(url: str, bodies: list[bytes], concurrency: int) -> float:
    import aiohttp

    window = asyncio.Semaphore(concurrency)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=concurrency + 1)) as session:

        async def post(body: bytes) -> None:
            async with window, session.post(url, data=body, headers={"Content-Type": "application/fhir+json"}) as resp:
                await resp.read()
                assert resp.status == 200

        t = time.perf_counter()
        await asyncio.gather(*(post(b) for b in bodies))
        return time.perf_counter() - t


def mariadb_url() -> tuple[str, str]:
    import pymysql

    name = f"gwbench_{secrets.token_hex(4)}"
    conn = pymysql.connect(host="127.0.0.1", user="root", password="")
    with conn.cursor() as cur:
        cur.execute(f"CREATE DATABASE {name} CHARACTER SET utf8mb4")
    conn.close()
    return f"mysql+aiomysql://root:@127.0.0.1:3306/{name}", name


def drop_mariadb(name: str) -> None:
    import pymysql

    conn = pymysql.connect(host="127.0.0.1", user="root", password="")
    with conn.cursor() as cur:
        cur.execute(f"DROP DATABASE IF EXISTS {name}")
    conn.close()


async def main(args: argparse.Namespace) -> None:
    import orjson

    from adapters.fhir_rest.config import FhirRestConfig
    from adapters.fhir_rest.sink import transaction_bundle
    from adapters.sqlstore.config import SqlStoreConfig

    n = args.messages
    proc, url = start_receiver()
    tmp = Path(tempfile.mkdtemp(prefix="gwbench-"))
    dbs: list[str] = []
    results: list[tuple[str, float]] = []
    try:

        def urls(tag: str) -> str:
            if args.db == "mariadb":
                u, name = mariadb_url()
                dbs.append(name)
                return u
            return f"sqlite:///{tmp}/{tag}.db"

        # sql_store
        journal, size = await fill(urls("journal-store"), n, "store")
        store_url = urls("store")
        store = SqlStoreConfig(type="sql_store", url=store_url).build("store")
        t = await drain(journal, store, args.batch)
        await journal.close()  # type: ignore[attr-defined]
        results.append(("sql_store", n / t))
        journal, _ = await fill(urls("journal-store-updates"), n, "store", family="Everywoman")
        store = SqlStoreConfig(type="sql_store", url=store_url).build("store")
        t = await drain(journal, store, args.batch)
        await journal.close()  # type: ignore[attr-defined]
        updates = ("sql_store_updates (same patients)", n / t)
        # fhir_rest
        journal, _ = await fill(urls("journal-fhir"), n, "fhir")
        fhir = FhirRestConfig(type="fhir_rest", base_url=url, concurrency=args.concurrency).build("fhir")
        t = await drain(journal, fhir, args.batch)
        await journal.close()  # type: ignore[attr-defined]
        results.append(("fhir_rest", n / t))
        # floor: same bundles (as the sink builds them), plain client
        bodies = [
            orjson.dumps(transaction_bundle([e["resource"] for e in orjson.loads(r.fhir)["entry"]]))  # type: ignore[attr-defined]
            for r in records(n, "fhir")
        ]
        t = await plain_client(url, bodies, args.concurrency)
        results.append(("floor (plain aiohttp client)", n / t))
        results.append(updates)  # last: the lines and ratios above keep their places
    finally:
        proc.terminate()
        proc.wait(10)
        for name in dbs:
            drop_mariadb(name)
    print(
        f"delivery benchmark: {n} ADT^A01 bundles (~{size} bytes each), journal on {args.db}, "
        f"batch {args.batch}, FHIR concurrency {args.concurrency}; {platform.python_version()} on "
        f"{os.cpu_count()} CPU(s)"
    )
    for name, rate in results:
        print(f"  {name:<30} {rate:8.0f} deliveries/s")
    fhir_rate, floor_rate = results[1][1], results[2][1]
    print(f"  fhir_rest / floor              {fhir_rate / floor_rate:8.2f}")
    if args.json:
        out = {"messages": n, "db": args.db, "bundle_bytes": size, **{name.split()[0]: r for name, r in results}}
        args.json.write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--messages", type=int, default=3000)
    ap.add_argument("--db", choices=["sqlite", "mariadb"], default="sqlite")
    ap.add_argument("--batch", type=int, default=200)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--json", type=Path, help="also write the results to this file as JSON (for bench/run_all.py)")
    ap.add_argument("--serve", type=int, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.serve:
        serve(a.serve)
    else:
        asyncio.run(main(a))
