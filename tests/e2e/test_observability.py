"""Metrics move as messages flow; liveness and readiness answer; logs carry no patient data."""

from __future__ import annotations

import re
import time
import urllib.error
import urllib.request

import pytest

from tests.e2e.conftest import Daemon, MllpConnection, msa
from tests.e2e.test_mllp_daemon import adt

pytestmark = pytest.mark.slow


def sample(text: str, name: str, labels: str = "") -> float:
    m = re.search(rf"^{re.escape(name)}{re.escape(labels)} (\S+)$", text, re.M)
    return float(m.group(1)) if m else 0.0


def get(d: Daemon, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{d.http_port}{path}", timeout=5) as r:
            return int(r.status), r.read().decode()
    except urllib.error.HTTPError as err:
        return int(err.code), err.read().decode()


def test_metrics_move_as_messages_flow_and_probes_answer(daemon: Daemon) -> None:
    daemon.start()
    assert get(daemon, "/healthz") == (200, "alive\n")
    assert get(daemon, "/readyz") == (200, "ok\n")
    before = daemon.metrics()
    c = MllpConnection(daemon.mllp_port)
    try:
        for n in range(10):
            msg, _, _ = adt(n, 42)
            assert msa(c.send(msg))[0] == "AA"
        assert msa(c.send(b"not hl7"))[0] == "AR"
    finally:
        c.close()
    daemon.wait_delivered()
    time.sleep(0.3)
    after = daemon.metrics()
    src = '{source="mllp-e2e"}'
    assert sample(after, "gateway_received_total", src) - sample(before, "gateway_received_total", src) == 11
    aa = '{code="AA",source="mllp-e2e"}'
    ar = '{code="AR",source="mllp-e2e"}'
    assert sample(after, "gateway_acks_total", aa) - sample(before, "gateway_acks_total", aa) == 10
    assert sample(after, "gateway_acks_total", ar) - sample(before, "gateway_acks_total", ar) == 1
    assert (
        sample(after, "gateway_journal_commit_seconds_count")
        >= sample(before, "gateway_journal_commit_seconds_count") + 1
    )
    assert sample(after, "gateway_ack_seconds_count", src) - sample(before, "gateway_ack_seconds_count", src) == 11
    # delivery counters come from the delivery process
    deadline = time.monotonic() + 10
    while sample(daemon.metrics(), "gateway_delivered_total", '{destination="store"}') < 10:
        assert time.monotonic() < deadline, "delivered counter did not reach 10"
        time.sleep(0.1)
    assert 'gateway_build_info{instance="gateway",version=' in after
    assert "gateway_outbox_pending" in after and "gateway_outbox_oldest_seconds" in after
    log = daemon.log()
    assert "Testpatient" not in log and "MRN42" not in log
    assert daemon.stop() == 0


def test_the_daemon_keeps_an_intact_audit_trail_and_the_cli_verifies_it(daemon: Daemon) -> None:
    import subprocess
    import sys

    daemon.start()
    c = MllpConnection(daemon.mllp_port)
    try:
        msg, _, _ = adt(1, 43)
        assert msa(c.send(msg))[0] == "AA"
    finally:
        c.close()
    assert daemon.stop() == 0
    audit = daemon.workdir / "audit.log"
    text = audit.read_text()
    for action in ("gateway.start", "connection.open", "connection.close", "gateway.stop"):
        assert f'"action":"{action}"' in text, action
    assert "Testpatient" not in text and "MRN43" not in text
    ok = subprocess.run(
        [sys.executable, "-m", "gateway", "audit", "verify", str(audit)], capture_output=True, text=True
    )
    assert ok.returncode == 0 and ok.stdout.startswith("OK:")
    audit.write_text(text.replace("connection.open", "connection.opeN", 1))
    bad = subprocess.run(
        [sys.executable, "-m", "gateway", "audit", "verify", str(audit)], capture_output=True, text=True
    )
    assert bad.returncode == 1 and "BROKEN at line" in bad.stdout
