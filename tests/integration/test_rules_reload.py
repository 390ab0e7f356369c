"""Gateway.reload_rules in process: the swap is one step, a refused set changes nothing, in-flight messages keep
the decision they were routed with."""

from __future__ import annotations

import asyncio
import contextlib
from datetime import UTC, datetime
from pathlib import Path

from prometheus_client import REGISTRY

from gateway.app import Gateway
from gateway.config import parse_config
from gateway.contracts import Envelope, InputKind
from gateway.ids import uuid7
from tests.e2e.conftest import REPO, free_port
from tests.signed_rules import signed_rules

ADT = (REPO / "tests/data/adt_a01.hl7").read_bytes().replace(b"\r\n", b"\r").replace(b"\n", b"\r")


def rules(serial: int, tmp: Path, to: str) -> str:
    return (
        f"serial: {serial}\ndestinations:\n"
        f"  a: {{type: sql_store, url: 'sqlite:///{tmp}/a.db'}}\n"
        f"  b: {{type: sql_store, url: 'sqlite:///{tmp}/b.db'}}\n"
        f"routes:\n  - {{name: r, match: {{mapped: true}}, to: [{to}]}}\n"
    )


async def delivered(db: Path) -> bool:
    import sqlite3

    def count() -> int:
        with contextlib.closing(sqlite3.connect(db)) as conn:
            try:
                return int(conn.execute("SELECT count(*) FROM fhir_resources").fetchone()[0])
            except sqlite3.OperationalError:  # the sink has not created its tables yet
                return 0

    return await asyncio.to_thread(count) > 0


def reloads(result: str) -> float:
    return REGISTRY.get_sample_value("gateway_rules_reloads_total", {"result": result}) or 0.0


async def test_reload_swaps_the_router_refuses_tampering_and_keeps_in_flight_decisions(tmp_path: Path) -> None:
    trust = signed_rules(tmp_path, rules(1, tmp_path, "a"))
    cfg = parse_config(
        {
            "rules": "rules.yaml",
            "rules_trust": trust,
            "audit_log": str(tmp_path / "audit.log"),
            "encryption": {"enabled": False},
            "journal": {"url": f"sqlite:///{tmp_path}/journal.db"},
            "telemetry": {"listen": f"127.0.0.1:{free_port()}"},
            "sources": [{"type": "mllp", "name": "reload", "port": 0}],
        }
    )
    gw = Gateway(cfg, tmp_path)  # no config file: delivery inline
    stop = asyncio.Event()
    running = asyncio.create_task(gw.run(stop))
    try:
        await asyncio.wait_for(gw.ready.wait(), 10)
        env = Envelope(uuid7(), "reload", InputKind.HL7V2, datetime.now(UTC), ADT, "127.0.0.1:1")
        in_flight = gw.pipeline.prepare(env)  # routed under serial 1, not yet committed
        assert list(in_flight.destinations) == ["a"]

        ok_before, failed_before = reloads("ok"), reloads("failed")
        signed_rules(tmp_path, rules(2, tmp_path, "b"))
        assert await gw.reload_rules()
        assert gw.pipeline.router.serial == 2 and gw.loaded.serial == 2 and reloads("ok") == ok_before + 1
        assert REGISTRY.get_sample_value("gateway_rules_serial") == 2

        await gw.journal.commit(in_flight)  # finishes under the rules it started with
        assert (await gw.journal.outbox_state()).keys() == {"a"}
        env2 = Envelope(uuid7(), "reload", InputKind.HL7V2, datetime.now(UTC), ADT.replace(b"MSG-QS-0001", b"R2"), "p")
        assert list(gw.pipeline.prepare(env2).destinations) == ["b"]

        # Inline delivery swapped its sinks and workers: the new destination receives what is routed to it.
        await gw.journal.commit(gw.pipeline.prepare(env2))
        gw.journal.committed.set()
        deadline = asyncio.get_running_loop().time() + 15
        while (tmp_path / "b.db").exists() is False or not await delivered(tmp_path / "b.db"):
            assert asyncio.get_running_loop().time() < deadline, "nothing reached destination b"
            await asyncio.sleep(0.1)
        assert [w.sink.name for w in gw.workers] == ["a", "b"]

        router = gw.pipeline.router
        (tmp_path / "rules.yaml").write_text(rules(3, tmp_path, "a"))  # changed after signing
        assert not await gw.reload_rules()
        assert gw.pipeline.router is router and gw.loaded.serial == 2 and reloads("failed") == failed_before + 1
    finally:
        stop.set()
        await asyncio.wait_for(running, 20)
    audit = (tmp_path / "audit.log").read_text()
    assert '"action":"rules.reload"' in audit and '"result":"failed"' in audit and "signature check failed" in audit
