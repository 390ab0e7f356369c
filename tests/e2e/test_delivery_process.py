"""Delivery in its own process: restarted when it dies, gone when the daemon dies, counted in /metrics."""

from __future__ import annotations

import os
import re
import signal
from pathlib import Path

import pytest

from tests.e2e.conftest import Daemon, MllpConnection, msa, wait_for
from tests.e2e.test_mllp_daemon import adt, store_patient_mrns

pytestmark = pytest.mark.slow


def children(pid: int) -> list[int]:
    text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    return [int(p) for p in text.split()]


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    stat = Path(f"/proc/{pid}/stat").read_text()
    return stat.split(") ", 1)[1][0] != "Z"  # a zombie is dead


def send(d: Daemon, first: int, count: int) -> dict[str, str]:
    acked: dict[str, str] = {}
    c = MllpConnection(d.mllp_port)
    try:
        for n in range(first, first + count):
            msg, cid, mrn = adt(n, 7)
            code, _ = msa(c.send(msg))
            assert code == "AA"
            acked[cid] = mrn
    finally:
        c.close()
    return acked


def delivered_metric(d: Daemon) -> float:
    m = re.search(r'^gateway_delivered_total\{destination="store"\} (\S+)$', d.metrics(), re.M)
    return float(m.group(1)) if m else 0.0


def test_a_killed_delivery_process_is_restarted_and_delivery_resumes(daemon: Daemon) -> None:
    daemon.start()
    assert daemon.proc is not None
    wait_for("one delivery child", lambda: len(children(daemon.proc.pid)) == 1)  # type: ignore[union-attr]
    (child,) = children(daemon.proc.pid)
    first = send(daemon, 0, 20)
    daemon.wait_delivered()
    wait_for("20 deliveries", lambda: delivered_metric(daemon) >= 20)  # counted in the parent's /metrics

    os.kill(child, signal.SIGKILL)
    wait_for("the child gone", lambda: not alive(child))
    second = send(daemon, 20, 20)  # ingest does not depend on the delivery process
    wait_for("a new child", lambda: children(daemon.proc.pid) not in ([], [child]), timeout=30)  # type: ignore[union-attr]
    daemon.wait_delivered()
    mrns = store_patient_mrns(daemon)
    assert all(mrn in mrns for mrn in {**first, **second}.values())
    assert "The delivery process exited" in daemon.log()
    restarted = children(daemon.proc.pid)
    assert daemon.stop() == 0
    assert not any(alive(p) for p in restarted)


def test_the_delivery_process_does_not_outlive_a_killed_daemon(daemon: Daemon) -> None:
    daemon.start()
    assert daemon.proc is not None
    wait_for("one delivery child", lambda: len(children(daemon.proc.pid)) == 1)  # type: ignore[union-attr]
    (child,) = children(daemon.proc.pid)
    daemon.kill()
    wait_for("the child gone", lambda: not alive(child), timeout=10)


def test_sigterm_stops_the_delivery_process_too(daemon: Daemon) -> None:
    daemon.start()
    assert daemon.proc is not None
    wait_for("one delivery child", lambda: len(children(daemon.proc.pid)) == 1)  # type: ignore[union-attr]
    (child,) = children(daemon.proc.pid)
    send(daemon, 100, 5)
    assert daemon.stop() == 0
    assert not alive(child)
