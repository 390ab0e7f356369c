"""/readyz follows the journal: 503 while it cannot be reached, and /healthz stays 200 (the process lives)."""

from __future__ import annotations

import asyncio
from pathlib import Path

from gateway.app import Gateway
from gateway.config import parse_config
from tests.e2e.conftest import free_port
from tests.signed_rules import signed_rules


async def http_get(port: int, path: str) -> int:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    status = int((await reader.readline()).split()[1])
    writer.close()
    return status


async def test_readyz_fails_while_the_journal_is_unreachable(tmp_path: Path) -> None:
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
            "sources": [{"type": "mllp", "name": "ready", "port": 0}],
        }
    )
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
