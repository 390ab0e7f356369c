"""The systemd notify protocol against a real NOTIFY_SOCKET datagram socket, with the daemon as a process."""

from __future__ import annotations

import signal
import socket
import time
from pathlib import Path

import pytest

from tests.e2e.conftest import Daemon

pytestmark = pytest.mark.slow


class NotifySocket:
    """What systemd listens on: a Unix datagram socket; each datagram is newline-separated assignments."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.received: list[tuple[float, dict[str, str]]] = []

    def wait_for(self, key: str, timeout: float = 30.0) -> dict[str, str]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.sock.settimeout(max(0.01, deadline - time.monotonic()))
            try:
                data = self.sock.recv(4096)
            except TimeoutError:
                break
            fields = dict(line.split("=", 1) for line in data.decode().splitlines() if "=" in line)
            self.received.append((time.monotonic(), fields))
            if key in fields:
                return fields
        raise AssertionError(f"no {key} within {timeout} s; got {[f for _, f in self.received]}")

    def close(self) -> None:
        self.sock.close()


def accepts(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
        return True
    except OSError:
        return False


def test_ready_after_listeners_bind_watchdog_pings_and_stopping_on_sigterm(tmp_path: Path) -> None:
    notify = NotifySocket(tmp_path / "notify.sock")
    d = Daemon(tmp_path)
    try:
        d_env = {"NOTIFY_SOCKET": str(notify.path), "WATCHDOG_USEC": "400000"}  # pings every 0.2 s
        # start() waits for /healthz; READY must have been sent by then, and not before the port accepted.
        d.start(env=d_env)
        ready = notify.wait_for("READY")
        assert ready["READY"] == "1" and "STATUS" in ready
        assert accepts(d.mllp_port)
        assert d.proc is not None and ready.get("MAINPID") == str(d.proc.pid)

        t0 = time.monotonic()
        pings = 0
        while time.monotonic() - t0 < 1.5:
            notify.wait_for("WATCHDOG", timeout=1.0)
            pings += 1
        assert 4 <= pings <= 12, f"{pings} watchdog pings in 1.5 s at a 0.2 s interval"

        d.proc.send_signal(signal.SIGTERM)
        stopping = notify.wait_for("STOPPING", timeout=10)
        assert stopping["STOPPING"] == "1"
        assert d.proc.wait(30) == 0
    finally:
        notify.close()
        if d.proc is not None and d.proc.poll() is None:
            d.proc.kill()


def test_ready_is_not_sent_when_a_listener_cannot_bind(tmp_path: Path) -> None:
    notify = NotifySocket(tmp_path / "notify.sock")
    blocker = socket.socket()
    blocker.bind(("127.0.0.1", 0))
    blocker.listen()
    d = Daemon(tmp_path)
    taken = blocker.getsockname()[1]
    d.config.write_text(d.config.read_text().replace(f"port = {d.mllp_port}\n", f"port = {taken}\n"))
    assert f"port = {taken}" in d.config.read_text()
    try:
        with pytest.raises(AssertionError, match="exited with 2"):
            d.start(env={"NOTIFY_SOCKET": str(notify.path)})
        with pytest.raises(AssertionError, match="no READY"):
            notify.wait_for("READY", timeout=0.5)
        assert "cannot listen on 127.0.0.1" in d.log()
    finally:
        notify.close()
        blocker.close()


def test_sighup_does_not_stop_the_daemon(daemon: Daemon) -> None:
    daemon.start()
    assert daemon.proc is not None
    daemon.proc.send_signal(signal.SIGHUP)
    time.sleep(0.5)
    assert daemon.proc.poll() is None and daemon.healthy()
    assert "SIGHUP received" in daemon.log()
    assert daemon.stop() == 0
