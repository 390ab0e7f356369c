"""The supervisor against real child processes standing in for workers (a few lines of Python that speak the
notify protocol on the socket the supervisor gives them and then exit), so restarts, crash loops and failed starts
are tested in seconds; the real workers are in tests/e2e/test_workers.py."""

from __future__ import annotations

import asyncio
import os
import sys
import time
from pathlib import Path

import pytest

from gateway import supervisor
from gateway.config import parse_config
from gateway.supervisor import RESTARTS, Supervisor

# A stand-in worker: READY=1 unless FAKE_READY=0, then live FAKE_LIFE seconds, then exit with FAKE_STATUS.
FAKE_WORKER = """
import os, socket, sys, time
if os.environ.get("FAKE_READY", "1") == "1":
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        s.connect(os.environ["NOTIFY_SOCKET"])
        s.send(b"READY=1\\nSTATUS=fake")
time.sleep(float(os.environ["FAKE_LIFE"]))
sys.exit(int(os.environ["FAKE_STATUS"]))
"""


def fake_supervisor(tmp_path: Path, life: float, status: int, ready: bool = True) -> Supervisor:
    cfg = parse_config(
        {
            "rules": "rules.yaml",
            "workers": 2,
            "audit_log": "",
            "telemetry": {"listen": ""},
            "sources": [{"type": "mllp"}],
        }
    )
    env = {"PATH": "/usr/bin:/bin", "FAKE_LIFE": str(life), "FAKE_STATUS": str(status), "FAKE_READY": "01"[ready]}
    sup = Supervisor(cfg, tmp_path / "gateway.toml", environ=env)
    sup.command = [sys.executable, "-c", FAKE_WORKER]
    return sup


def restarts(worker: str) -> float:
    return RESTARTS.labels(worker)._value.get()


async def test_a_worker_that_keeps_crashing_is_restarted_then_the_supervisor_gives_up(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(supervisor, "BACKOFF_INITIAL", 0.01)
    before = restarts("0") + restarts("1")
    sup = fake_supervisor(tmp_path, life=1.0, status=3)
    t0 = time.monotonic()
    assert await sup.run() == 1
    assert time.monotonic() - t0 < 60
    # Both workers exited 3 again and again: each restart counted and logged, then the crash loop stops it all.
    assert restarts("0") + restarts("1") - before >= supervisor.CRASH_LIMIT
    assert "exited unexpectedly (exit status 3); restarting it in" in caplog.text
    assert "crash-loops; stopping the gateway" in caplog.text
    assert not await asyncio.to_thread(os.path.exists, sup._dir)  # its notify sockets are gone


async def test_a_worker_that_cannot_start_stops_the_supervisor_with_its_status(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    sup = fake_supervisor(tmp_path, life=0.0, status=2, ready=False)
    assert await sup.run() == 2
    assert "Worker 0 could not start (exit status 2)" in caplog.text
    assert "Worker 1 started" not in caplog.text  # worker 0 starts alone: it migrates the journal
