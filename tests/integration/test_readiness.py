"""/readyz follows the journal: 503 while it cannot be reached, and /healthz stays 200 (the process lives)."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from gateway.app import Gateway
from gateway.config import GatewayConfig, parse_config
from tests.e2e.conftest import free_port
from tests.signed_rules import signed_rules


async def http_get(port: int, path: str) -> int:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    status = int((await reader.readline()).split()[1])
    writer.close()
    return status


def inline_config(tmp_path: Path, source: str) -> tuple[GatewayConfig, int]:
    """A SQLite journal, one MLLP source on a free port and /readyz on another (returned), no config file."""
    trust = signed_rules(
        tmp_path,
        f"serial: 1\ndestinations:\n  store: {{type: sql_store, url: 'sqlite:///{tmp_path}/store.db'}}\nroutes: []\n",
    )
    port = free_port()
    cfg = parse_config(
        {
            "rules": "rules.yaml",
            "rules_trust": trust,
            "audit_log": "",
            "encryption": {"enabled": False},
            "journal": {"url": f"sqlite:///{tmp_path}/journal.db"},
            "telemetry": {"listen": f"127.0.0.1:{port}"},
            "sources": [{"type": "mllp", "name": source, "port": 0}],
        }
    )
    return cfg, port


async def test_readyz_fails_while_the_journal_is_unreachable(tmp_path: Path) -> None:
    cfg, port = inline_config(tmp_path, "ready")
    gw = Gateway(cfg, tmp_path)  # no config file: delivery inline
    stop = asyncio.Event()
    running = asyncio.create_task(gw.run(stop))
    try:
        await asyncio.wait_for(gw.ready.wait(), 10)
        assert await http_get(port, "/readyz") == 200
        await gw.journal.close()  # the journal goes away under the running daemon
        assert await http_get(port, "/readyz") == 503
        assert await http_get(port, "/healthz") == 200
    finally:
        stop.set()
        await asyncio.wait_for(running, 20)


async def http_get_body(port: int, path: str) -> tuple[int, str]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
    data = await reader.read()
    writer.close()
    head, _, body = data.decode().partition("\r\n\r\n")
    return int(head.split()[1]), body


async def mllp_ack_code(port: int, control_id: str) -> str:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    msg = (
        f"MSH|^~\\&|APP|FAC|GW|FAC|20260101120000||ADT^A01^ADT_A01|{control_id}|P|2.5\r"
        "EVN|A01|20260101120000\rPID|1||123^^^FAC^MR||Doe^John||19800101|M\r"
    )
    writer.write(b"\x0b" + msg.encode() + b"\x1c\r")
    ack = await reader.readuntil(b"\x1c\r")
    writer.close()
    return ack.split(b"MSA|", 1)[1][:2].decode()


async def test_readyz_fails_while_commits_fail_although_the_database_answers(tmp_path: Path) -> None:
    # A full disk: SELECT 1 still answers, every commit fails and every sender gets AE. /readyz said "ok", so a
    # load balancer kept sending this instance traffic. (SQLite's max_page_count gives the disk-full error.)
    cfg, port = inline_config(tmp_path, "full")
    gw = Gateway(cfg, tmp_path)
    stop = asyncio.Event()
    running = asyncio.create_task(gw.run(stop))
    try:
        await asyncio.wait_for(gw.ready.wait(), 10)
        mllp = gw.sources[0].port  # type: ignore[attr-defined]
        assert await mllp_ack_code(mllp, "C1") == "AA"
        assert gw.journal.db is not None

        def full(conn: Any) -> None:
            (pages,) = conn.exec_driver_sql("PRAGMA page_count").fetchone()
            conn.exec_driver_sql(f"PRAGMA max_page_count = {pages}")

        await gw.journal.db.transaction(full)
        for n in range(2, 6):  # until a commit needs a new page
            if await mllp_ack_code(mllp, f"C{n}") == "AE":
                break
        else:
            raise AssertionError("no commit failed on the full database")
        status, body = await http_get_body(port, "/readyz")
        assert status == 503 and "disk is full" in body, body
        assert (await http_get_body(port, "/healthz"))[0] == 200

        await gw.journal.db.transaction(lambda conn: conn.exec_driver_sql("PRAGMA max_page_count = 1073741823"))
        assert await mllp_ack_code(mllp, "C9") == "AA"
        assert (await http_get_body(port, "/readyz"))[0] == 200  # a commit succeeded: ready again
    finally:
        stop.set()
        await asyncio.wait_for(running, 20)
