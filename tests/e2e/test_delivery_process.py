"""Delivery in its own process: restarted when it dies, gone when the daemon dies, counted in /metrics."""

from __future__ import annotations

import os
import re
import signal
import time
import urllib.request
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


def test_a_restarted_delivery_process_runs_what_the_daemon_verified_not_the_files_on_disk(daemon: Daemon) -> None:
    # An operator stages the next rule set (unsigned yet) and is half-way through editing the config when the
    # delivery process crashes: its successor must not read either file. It used to re-read both, refuse the
    # unsigned rule set (exit 2) and be restarted every 30 s, while senders kept getting AA.
    daemon.start()
    assert daemon.proc is not None
    wait_for("one delivery child", lambda: len(children(daemon.proc.pid)) == 1)  # type: ignore[union-attr]
    (child,) = children(daemon.proc.pid)
    with daemon.rules_path.open("a") as f:
        f.write("# staged for the next reload, not signed yet\n")
    daemon.config.write_text(daemon.config.read_text() + "\n[[broken")

    os.kill(child, signal.SIGKILL)
    wait_for("the child gone", lambda: not alive(child))
    acked = send(daemon, 200, 10)
    wait_for("a new child", lambda: children(daemon.proc.pid) not in ([], [child]), timeout=30)  # type: ignore[union-attr]
    daemon.wait_delivered()
    mrns = store_patient_mrns(daemon)
    assert all(mrn in mrns for mrn in acked.values())
    assert "signature check failed" not in daemon.log()
    assert "exited with 2" not in daemon.log()
    assert daemon.stop() == 0


def into_a_restart_wait(daemon: Daemon) -> None:
    """Kill the delivery child three times: the daemon then waits 4 s before the next restart."""
    assert daemon.proc is not None
    for n, wait in enumerate(("1 s", "2 s", "4 s")):
        wait_for("a delivery child", lambda: len(children(daemon.proc.pid)) == 1, timeout=30)  # type: ignore[union-attr]
        (child,) = children(daemon.proc.pid)  # type: ignore[union-attr]
        os.kill(child, signal.SIGKILL)
        wait_for(
            f"restart wait {n + 1}",
            lambda n=n: daemon.log().count("The delivery process exited with -9; restarting it in") == n + 1,  # type: ignore[misc]
        )
        assert f"restarting it in {wait}" in daemon.log().rsplit("The delivery process exited", 1)[1]


def readyz_body(daemon: Daemon) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{daemon.http_port}/readyz", timeout=5) as r:
        assert r.status == 200  # ingest goes on: the instance stays in rotation
        return str(r.read().decode())


def test_sigterm_while_waiting_to_restart_the_delivery_process_stops_at_once(daemon: Daemon) -> None:
    daemon.start()
    into_a_restart_wait(daemon)
    # The wait shows: /readyz says so and the gauge is 0.
    assert "the delivery process is not running" in readyz_body(daemon)
    assert re.search(r'^gateway_delivery_process_up\{isolation="process"\} 0\.0$', daemon.metrics(), re.M)
    started = time.monotonic()
    assert daemon.stop() == 0
    # It used to sleep out the wait first (up to 30 s against a drain timeout of 10 s).
    assert time.monotonic() - started < 3.0


def test_a_reload_ends_the_wait_before_a_restart(daemon: Daemon) -> None:
    daemon.start()
    assert daemon.proc is not None
    into_a_restart_wait(daemon)
    daemon.write_rules(
        destinations=f"  store2: {{type: sql_store, url: 'sqlite+aiosqlite:///{daemon.workdir}/s2.db'}}\n"
    )
    started = time.monotonic()
    daemon.reload()
    wait_for("a new child", lambda: len(children(daemon.proc.pid)) == 1, timeout=10)  # type: ignore[union-attr]
    assert time.monotonic() - started < 3.0
    assert re.search(r'^gateway_delivery_process_up\{isolation="process"\} 1\.0$', daemon.metrics(), re.M)
    assert readyz_body(daemon).strip() == "ok"
    assert daemon.stop() == 0


def test_a_sighup_to_the_delivery_process_itself_is_ignored(daemon: Daemon) -> None:
    # The daemon handles SIGHUP (reload); a hangup sent to the whole process group must not end delivery.
    daemon.start()
    assert daemon.proc is not None
    wait_for("one delivery child", lambda: len(children(daemon.proc.pid)) == 1)  # type: ignore[union-attr]
    (child,) = children(daemon.proc.pid)
    send(daemon, 300, 1)
    daemon.wait_delivered()  # the child is past its start-up (a hangup during Python's start would end it)
    os.kill(child, signal.SIGHUP)
    acked = send(daemon, 301, 3)
    daemon.wait_delivered()
    assert alive(child)
    assert all(mrn in store_patient_mrns(daemon) for mrn in acked.values())
    assert "The delivery process exited" not in daemon.log()
    assert daemon.stop() == 0
