"""Delivery as an operator sees it, with the daemon as a process (delivery in its child process): a FHIR server
that refuses a message, `gateway dlq` to inspect and retry it after the fix, `gateway status --json`, and
`gateway replay` after a rule change."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.conftest import REPO, Daemon, MllpConnection, msa, wait_for
from tests.e2e.test_mllp_daemon import adt
from tests.integration.delivery_helpers import FhirReceiver


def gateway(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "gateway", *args], capture_output=True, text=True, timeout=60, cwd=REPO
    )


class ThreadedReceiver:
    """The test FHIR server on its own event loop in a thread (the e2e tests are synchronous)."""

    def __init__(self) -> None:
        self.receiver = FhirReceiver()
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        asyncio.run_coroutine_threadsafe(self.receiver.start(), self.loop).result(10)

    def call(self, fn: Callable[[], Any]) -> Any:
        async def run() -> Any:
            return fn()

        return asyncio.run_coroutine_threadsafe(run(), self.loop).result(10)

    def stop(self) -> None:
        asyncio.run_coroutine_threadsafe(self.receiver.stop(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


@pytest.fixture
def fhir() -> Iterator[ThreadedReceiver]:
    r = ThreadedReceiver()
    yield r
    r.stop()


def status(d: Daemon) -> dict[str, Any]:
    out = gateway("status", "--json", "--config", str(d.config))
    assert out.returncode == 0, out.stderr
    return dict(json.loads(out.stdout))


def send(d: Daemon, n: int) -> list[str]:
    conn = MllpConnection(d.mllp_port)
    cids = []
    try:
        for i in range(n):
            msg, cid, _ = adt(i, 1)
            assert msa(conn.send(msg)) == ("AA", cid)
            cids.append(cid)
    finally:
        conn.close()
    return cids


def test_a_refused_message_is_a_dead_letter_shown_and_retried_once_after_the_fix(
    tmp_path: Path, fhir: ThreadedReceiver
) -> None:
    url = f"http://127.0.0.1:{fhir.receiver.port}/fhir"
    d = Daemon(
        tmp_path,
        destinations=f"  ehr: {{type: fhir_rest, base_url: '{url}'}}\n",
        routes="  - {name: to-ehr, match: {mapped: true}, to: [ehr]}\n",
    )
    fhir.call(lambda: fhir.receiver.script.extend(["400"]))
    d.start()
    try:
        send(d, 3)
        wait_for("one dead letter", lambda: status(d)["destinations"]["ehr"]["dead"] == 1)
        wait_for("the others delivered", lambda: status(d)["destinations"]["ehr"]["pending"] == 0)
        st = status(d)
        assert st["destinations"]["store"]["pending"] == 0
        assert st["outbox"]["dead"] == 1

        listed = gateway("dlq", "list", "--json", "--config", str(d.config))
        assert listed.returncode == 0, listed.stderr
        (dead,) = json.loads(listed.stdout)
        assert dead["destination"] == "ehr" and "HTTP 400" in dead["last_error"]
        shown = gateway("dlq", "show", str(dead["id"]), "--config", str(d.config))
        assert shown.returncode == 0
        assert "OperationOutcome" in shown.stdout and "Observation.status is required" in shown.stdout
        # the message id (which `dlq list` also prints) is not an item id: a clear error, not a traceback
        by_message = gateway("dlq", "show", str(dead["message_id"]), "--config", str(d.config))
        assert by_message.returncode == 2 and "ids are numbers" in by_message.stderr
        assert "Traceback" not in by_message.stderr
        # The OperationOutcome is kept with the dead letter, but never logged (it may quote patient data).
        assert "Observation.status is required" not in d.log()

        refused = gateway("dlq", "retry", "--config", str(d.config))
        assert refused.returncode == 2 and "--all" in refused.stderr
        before = fhir.call(lambda: len(fhir.receiver.bodies))
        retried = gateway("dlq", "retry", str(dead["id"]), "--config", str(d.config))
        assert retried.returncode == 0 and retried.stdout.strip() == "1 dead letter(s) queued again"
        wait_for("the retried delivery", lambda: fhir.call(lambda: len(fhir.receiver.bodies)) == before + 1)
        time.sleep(1.0)
        assert fhir.call(lambda: len(fhir.receiver.bodies)) == before + 1  # delivered once
        final = status(d)["destinations"]["ehr"]
        assert final["dead"] == 0 and final["pending"] == 0
        # the same id again (delivered now) and one that does not exist: each said, and exit 1
        again = gateway("dlq", "retry", str(dead["id"]), "999999", "--config", str(d.config))
        assert again.returncode == 1 and again.stdout.strip() == "0 dead letter(s) queued again"
        assert f"outbox item {dead['id']}: not a dead letter (it is done)" in again.stderr
        assert "outbox item 999999: no such outbox item" in again.stderr
        audit = (tmp_path / "audit.log").read_text()
        assert '"action":"dead_letters.retry"' in audit
        assert gateway("dlq", "list", "--config", str(d.config)).stdout.strip() == ""
    finally:
        assert d.stop() == 0


def test_replay_routes_stored_messages_with_the_current_rules(tmp_path: Path, fhir: ThreadedReceiver) -> None:
    url = f"http://127.0.0.1:{fhir.receiver.port}/fhir"
    ehr = f"  ehr: {{type: fhir_rest, base_url: '{url}'}}\n"
    d = Daemon(tmp_path, destinations=ehr)  # at first the mapped route goes to the store only
    d.start()
    try:
        send(d, 4)
        d.wait_delivered()
        assert fhir.call(lambda: len(fhir.receiver.bodies)) == 0
        # The fix: a new, signed rule set also routes mapped messages to the EHR. Replay the range.
        d.write_rules(destinations=ehr, routes="  - {name: to-ehr, match: {mapped: true}, to: [ehr]}\n")
        dry = gateway(
            "replay", "--source", "mllp-e2e", "--since", "2000-01-01", "--dry-run", "--json", "--config", str(d.config)
        )
        assert dry.returncode == 0, dry.stderr
        assert json.loads(dry.stdout) == {
            "replayed": 4,
            "dry_run": True,
            "statuses": {"accepted": 4},
            "routed": {"store": 4, "ehr": 4},
            "queued": 8,  # what the real replay below queues
            "rules_serial": 2,
        }
        out = gateway(
            "replay", "--source", "mllp-e2e", "--since", "2000-01-01", "--json", "--progress", "--config", str(d.config)
        )
        assert out.returncode == 0, out.stderr
        summary = json.loads(out.stdout)
        assert summary["replayed"] == 4 and summary["queued"] == 8
        wait_for("the replayed deliveries", lambda: fhir.call(lambda: len(fhir.receiver.bodies)) == 4)
        d.wait_delivered()
        assert '"action":"messages.replay"' in (tmp_path / "audit.log").read_text()
        # one message by id; nothing in the future range
        one = gateway("messages", "--config", str(d.config), "--limit", "1")
        mid = one.stdout.split()[0]
        single = gateway("replay", mid, "--json", "--config", str(d.config))
        assert json.loads(single.stdout)["replayed"] == 1
        none = gateway("replay", "--source", "mllp-e2e", "--since", "2999-01-01", "--config", str(d.config))
        assert none.returncode == 0 and "replayed 0 message(s)" in none.stdout
        missing = gateway("replay", "0190aaaa-0000-7000-8000-000000000000", "--config", str(d.config))
        assert missing.returncode == 1
    finally:
        assert d.stop() == 0


@pytest.mark.mariadb
def test_two_daemons_on_one_mariadb_deliver_every_item_exactly_once(tmp_path: Path, mariadb_url: str) -> None:
    import pymysql

    from tests.conftest import MARIADB

    n = 120
    daemons = []
    for i in range(2):
        work = tmp_path / f"d{i}"
        work.mkdir()
        # each daemon delivers to its own store file: a message stored by both would show up twice below
        daemons.append(Daemon(work, journal_url=mariadb_url))
    db = mariadb_url.rsplit("/", 1)[1]

    def outbox() -> list[tuple[str, int]]:
        conn = pymysql.connect(**MARIADB, database=db)
        try:
            with conn.cursor() as cur:
                cur.execute("SELECT status, attempts FROM outbox")
                return list(cur.fetchall())
        finally:
            conn.close()

    try:
        for d in daemons:
            d.start()
        conns = [MllpConnection(d.mllp_port) for d in daemons]
        try:
            for k in range(n):
                msg, cid, _ = adt(k, 7)
                assert msa(conns[k % 2].send(msg)) == ("AA", cid)
        finally:
            for c in conns:
                c.close()
        wait_for("every item delivered", lambda: len(outbox()) == n and all(s == "done" for s, _ in outbox()))
        assert all(a == 1 for _, a in outbox())
        mrns: list[str] = []
        for d in daemons:
            with d.store() as store:
                # A daemon whose delivery side never claimed an item (the other took them all) may not have
                # created its store's tables: that store holds nothing.
                if not store.execute("SELECT 1 FROM sqlite_master WHERE name = 'fhir_resource_history'").fetchone():
                    continue
                mrns += [
                    r[0]
                    for r in store.execute(
                        "SELECT json_extract(json, '$.identifier[0].value') FROM fhir_resource_history "
                        "WHERE resource_type = 'Patient'"
                    )
                ]
        assert sorted(mrns) == sorted(f"MRN07{k:06d}" for k in range(n))
        for d in daemons:
            assert d.stop() == 0
    finally:
        for d in daemons:
            if d.proc is not None and d.proc.poll() is None:
                d.proc.kill()
                d.proc.wait(10)
