"""The daemon as a real process: configuration in a temporary directory, free ports, start/stop/kill."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Daemon:
    def __init__(
        self,
        workdir: Path,
        *,
        journal_url: str | None = None,
        source_extra: str = "",
        drain_timeout: float = 10.0,
    ) -> None:
        self.workdir = workdir
        self.mllp_port = free_port()
        self.http_port = free_port()
        self.journal_path = workdir / "journal.db"
        self.store_path = workdir / "store.db"
        self.journal_url = journal_url or f"sqlite:///{self.journal_path}"
        self.log_path = workdir / "daemon.log"
        self.proc: subprocess.Popen[bytes] | None = None
        (workdir / "rules.yaml").write_text(
            "destinations:\n"
            f"  store: {{type: sql_store, url: 'sqlite+aiosqlite:///{self.store_path}'}}\n"
            "routes:\n"
            "  - {name: mapped, match: {mapped: true}, to: [store]}\n"
        )
        (workdir / "gateway.toml").write_text(
            f'rules = "rules.yaml"\ndrain_timeout_seconds = {drain_timeout}\naudit_log = "{workdir}/audit.log"\n'
            f'[journal]\nurl = "{self.journal_url}"\n'
            f"[delivery]\npoll_interval_seconds = 0.2\nbackoff_initial_seconds = 0.2\n"
            f'[telemetry]\nlisten = "127.0.0.1:{self.http_port}"\nlog_level = "INFO"\n'
            f'[[sources]]\ntype = "mllp"\nname = "mllp-e2e"\nhost = "127.0.0.1"\nport = {self.mllp_port}\n'
            + source_extra
        )

    @property
    def config(self) -> Path:
        return self.workdir / "gateway.toml"

    def start(self, timeout: float = 30.0, env: dict[str, str] | None = None) -> None:
        env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        with self.log_path.open("ab") as log:  # the child keeps its own copy of the descriptor
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "gateway", "run", "--config", str(self.config)],
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.workdir,
                env=env,
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"the daemon exited with {self.proc.returncode}:\n{self.log()}")
            if self.healthy():
                return
            time.sleep(0.05)
        raise AssertionError(f"the daemon did not become healthy in {timeout} s:\n{self.log()}")

    def healthy(self) -> bool:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.http_port}/readyz", timeout=1) as r:
                return bool(r.status == 200)
        except OSError:
            return False

    def metrics(self) -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.http_port}/metrics", timeout=5) as r:
            return str(r.read().decode())

    def stop(self, timeout: float = 30.0) -> int:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            raise AssertionError(f"the daemon did not stop on SIGTERM within {timeout} s:\n{self.log()}") from None

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def journal(self) -> sqlite3.Connection:
        return sqlite3.connect(self.journal_path)

    def store(self) -> sqlite3.Connection:
        return sqlite3.connect(self.store_path)

    def wait_delivered(self, timeout: float = 30.0) -> None:
        """Until no outbox item is pending."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with contextlib.closing(self.journal()) as db:
                (pending,) = db.execute("SELECT count(*) FROM outbox WHERE status = 'pending'").fetchone()
            if pending == 0:
                return
            time.sleep(0.1)
        raise AssertionError(f"{pending} outbox items still pending after {timeout} s")


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[Daemon]:
    d = Daemon(tmp_path)
    yield d
    if d.proc is not None and d.proc.poll() is None:
        d.proc.kill()
        d.proc.wait(10)


class MllpConnection:
    """A raw-socket MLLP client written in the test, independent of the project's framing code."""

    def __init__(self, port: int, timeout: float = 30.0) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        self.buf = b""

    def send(self, message: bytes) -> bytes:
        self.sock.sendall(b"\x0b" + message + b"\x1c\r")
        return self.read_ack()

    def read_ack(self) -> bytes:
        while True:
            start = self.buf.find(b"\x0b")
            end = self.buf.find(b"\x1c\r", start + 1) if start >= 0 else -1
            if end >= 0:
                ack, self.buf = self.buf[start + 1 : end], self.buf[end + 2 :]
                return ack
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError("closed before an ACK")
            self.buf += chunk

    def close(self) -> None:
        self.sock.close()


def msa(ack: bytes) -> tuple[str, str]:
    """(MSA-1, MSA-2) of an ACK, read without the project's parser."""
    for seg in ack.split(b"\r"):
        if seg.startswith(b"MSA"):
            f = seg.decode("latin-1").split(seg.decode("latin-1")[3])
            return f[1], f[2] if len(f) > 2 else ""
    raise AssertionError(f"no MSA segment in {ack[:200]!r}")
