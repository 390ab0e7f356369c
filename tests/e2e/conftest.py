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
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from gateway import signing
from tests.ports import free_port

REPO = Path(__file__).resolve().parents[2]


def wait_for(
    what: str, check: Callable[[], bool], timeout: float = 60.0, *, ignore: tuple[type[Exception], ...] = ()
) -> None:
    """Poll ``check`` until it is true; AssertionError naming ``what`` after ``timeout`` s. Exceptions of the
    types in ``ignore`` (a daemon still starting: OSError) count as not yet."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if check():
                return
        except ignore:
            pass
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what} ({timeout:g} s)")


class Daemon:
    def __init__(
        self,
        workdir: Path,
        *,
        journal_url: str | None = None,
        source_extra: str = "",
        drain_timeout: float = 10.0,
        encrypt: bool = False,
        destinations: str = "",
        routes: str = "",
        dedup: str = "",
    ) -> None:
        """``destinations``, ``routes`` and ``dedup``: extra YAML for the rule set, as lines indented like
        their section's entries ("  name: {type: ...}" under destinations, "  - {name: ...}" under routes
        and dedup); the rule set always has the ``store`` destination and the ``mapped`` route to it."""
        self.workdir = workdir
        # Encryption at rest: off unless asked, so tests can read raw and fhir from the journal with sqlite3;
        # with ``encrypt`` a fresh key is written to journal.key (gateway.crypto can open the rows with it).
        self.key_path = workdir / "journal.key"
        if encrypt:
            from gateway.crypto import generate_key_file

            generate_key_file(self.key_path)
        encryption = f'[encryption]\nkey = "{self.key_path.name}"\n' if encrypt else "[encryption]\nenabled = false\n"
        self.mllp_port = free_port()
        self.http_port = free_port()
        self.journal_path = workdir / "journal.db"
        self.store_path = workdir / "store.db"
        self.journal_url = journal_url or f"sqlite:///{self.journal_path}"
        self.log_path = workdir / "daemon.log"
        self.proc: subprocess.Popen[bytes] | None = None
        # Signed rules (issue #6): a fresh Ed25519 key per daemon, trusted by its config; start() signs
        # rules.yaml, so a test may rewrite it (write_rules) and only has to raise the serial.
        self.rules_path = workdir / "rules.yaml"
        self.signing_key = workdir / "rules-signing.key"
        self.serial_state = workdir / "rules.serial"
        self.auto_sign = True
        signing.keygen("e2e", self.signing_key, workdir / "rules-signing.pub")
        self.serial = 0
        self.write_rules(destinations=destinations, routes=routes, dedup=dedup)
        (workdir / "gateway.toml").write_text(
            f'rules = "rules.yaml"\ndrain_timeout_seconds = {drain_timeout}\naudit_log = "{workdir}/audit.log"\n'
            '[rules_trust]\nkeys = [{file = "rules-signing.pub"}]\nstate_file = "rules.serial"\n'
            f'[journal]\nurl = "{self.journal_url}"\n'
            f"[delivery]\npoll_interval_seconds = 0.2\nbackoff_initial_seconds = 0.2\n"
            + encryption
            + f'[telemetry]\nlisten = "127.0.0.1:{self.http_port}"\nlog_level = "INFO"\n'
            f'[[sources]]\ntype = "mllp"\nname = "mllp-e2e"\nhost = "127.0.0.1"\nport = {self.mllp_port}\n'
            + source_extra
        )

    @property
    def config(self) -> Path:
        return self.workdir / "gateway.toml"

    def write_rules(
        self,
        *,
        destinations: str = "",
        routes: str = "",
        dedup: str = "",
        default_route: bool = True,
        serial: int | None = None,
    ) -> None:
        """Write rules.yaml with the next serial (or ``serial``) and sign it; ``default_route``: keep the
        ``mapped`` route to ``store`` before the given routes."""
        self.serial = self.serial + 1 if serial is None else serial
        self.rules_path.write_text(
            f"serial: {self.serial}\n"
            "destinations:\n"
            f"  store: {{type: sql_store, url: 'sqlite+aiosqlite:///{self.store_path}'}}\n"
            + destinations
            + "routes:\n"
            + ("  - {name: mapped, match: {mapped: true}, to: [store]}\n" if default_route else "")
            + routes
            + ("dedup:\n" + dedup if dedup else "")
        )
        self.sign_rules()

    def sign_rules(self) -> None:
        """Sign rules.yaml as it is now with this daemon's trusted key (rules.yaml.sig)."""
        key_id, key = signing.load_secret_key(self.signing_key)
        sig = signing.sign(self.rules_path.read_bytes(), key_id, key)
        (self.workdir / "rules.yaml.sig").write_text(sig)

    def reload(self) -> None:
        """SIGHUP: the daemon reloads and verifies rules.yaml."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGHUP)

    def start(self, timeout: float = 30.0, env: dict[str, str] | None = None) -> None:
        if self.auto_sign:
            self.sign_rules()
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

    def start_refused(self, timeout: float = 30.0) -> tuple[int, str]:
        """Start the daemon expecting it to refuse (a bad rule set, a bad config): (exit code, its output)."""
        if self.auto_sign:
            self.sign_rules()
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        done = subprocess.run(
            [sys.executable, "-m", "gateway", "run", "--config", str(self.config)],
            capture_output=True,
            text=True,
            timeout=timeout,
            cwd=self.workdir,
            env=env,
        )
        return done.returncode, done.stdout + done.stderr

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
