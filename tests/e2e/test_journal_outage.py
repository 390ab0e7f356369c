"""The daemon on a MariaDB journal that goes away or hangs: it answers AE, keeps serving, recovers, and stops
within its drain timeout. The outage is a TCP relay between the daemon and the real MariaDB that the test
closes (the database is unreachable) or stops relaying (the database hangs); the shared server itself is never
touched."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from tests.e2e.conftest import Daemon, MllpConnection, free_port, msa, wait_for
from tests.e2e.test_mllp_daemon import adt

pytestmark = pytest.mark.slow


class Relay:
    """A TCP relay to ``target`` on a fixed local port, for failure injection: ``close`` drops every connection
    and stops listening (connections are refused), ``hang`` keeps them open but relays nothing."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.port = free_port()
        self.hung = threading.Event()
        self._sockets: list[socket.socket] = []
        self._lock = threading.Lock()
        self._listener: socket.socket | None = None

    def open(self) -> None:
        self.hung.clear()
        listener = socket.create_server(("127.0.0.1", self.port), reuse_port=False)
        self._listener = listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(self.target, timeout=5)
            except OSError:
                client.close()
                continue
            upstream.settimeout(None)
            with self._lock:
                self._sockets += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while data := src.recv(65536):
                while self.hung.is_set():
                    time.sleep(0.05)
                dst.sendall(data)
        with contextlib.suppress(OSError):
            dst.shutdown(socket.SHUT_WR)

    def hang(self) -> None:
        self.hung.set()

    def close(self) -> None:
        if self._listener is not None:
            with contextlib.suppress(OSError):  # wakes the accepting thread (close alone would not stop it)
                self._listener.shutdown(socket.SHUT_RDWR)
            self._listener.close()
            self._listener = None
        with self._lock:
            sockets, self._sockets = self._sockets, []
        for s in sockets:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
            s.close()


@pytest.fixture
def relay(mariadb_url: str) -> Relay:
    u = urlsplit(mariadb_url)
    r = Relay((u.hostname or "127.0.0.1", u.port or 3306))
    r.open()
    yield r  # type: ignore[misc]
    r.hung.clear()
    r.close()


def relayed(mariadb_url: str, relay: Relay) -> str:
    u = urlsplit(mariadb_url)
    return mariadb_url.replace(f"@{u.hostname}:{u.port}", f"@127.0.0.1:{relay.port}")


def readyz(d: Daemon) -> int:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{d.http_port}/readyz", timeout=10) as r:
            return int(r.status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)


def answer(d: Daemon, n: int) -> str:
    c = MllpConnection(d.mllp_port)
    try:
        code, _ = msa(c.send(adt(n, 41)[0]))
        return code
    finally:
        c.close()


def test_the_daemon_keeps_serving_while_the_mariadb_journal_is_unreachable(
    tmp_path: Path, mariadb_url: str, relay: Relay
) -> None:
    # The outbox metrics task read the journal every 5 s and let the driver's error through: the daemon ended
    # within seconds of MariaDB going away, even without traffic, and its listener with it.
    d = Daemon(tmp_path, journal_url=relayed(mariadb_url, relay))
    d.start()
    try:
        assert answer(d, 1) == "AA"
        relay.close()
        wait_for("/readyz 503", lambda: readyz(d) == 503, timeout=15)
        assert answer(d, 2) == "AE"
        time.sleep(6)  # past a round of the outbox metrics (every 5 s) and of journal maintenance
        assert d.proc is not None and d.proc.poll() is None, d.log()
        assert answer(d, 3) == "AE"
        relay.open()
        wait_for("AA again", lambda: answer(d, 4) == "AA", timeout=30)
        assert readyz(d) == 200  # a commit succeeded: ready again at once
        assert d.stop() == 0
        assert "Traceback" not in d.log()
    finally:
        if d.proc is not None and d.proc.poll() is None:
            d.proc.kill()


def test_sigterm_with_a_hung_mariadb_journal_stops_within_the_drain_timeout(
    tmp_path: Path, mariadb_url: str, relay: Relay
) -> None:
    # The last commit waited for the database without a limit: the daemon stayed up, /readyz and /healthz
    # unanswered, until the database answered again (128 s in the trial that found it).
    d = Daemon(tmp_path, journal_url=relayed(mariadb_url, relay), drain_timeout=2.0)
    d.start()
    try:
        assert answer(d, 1) == "AA"
        relay.hang()

        def send_one() -> None:
            with contextlib.suppress(Exception):  # no answer, or AE: either is right while the database hangs
                answer(d, 2)

        sender = threading.Thread(target=send_one, daemon=True)
        sender.start()
        time.sleep(1.0)  # the message's commit is under way and waits for the database
        assert d.proc is not None
        started = time.monotonic()
        d.proc.send_signal(15)
        code = d.proc.wait(30)
        took = time.monotonic() - started
        # Sources drain (2 s), the delivery process stops (2 s), the journal's last commit (2 s).
        assert took < 10, f"stopping took {took:.1f} s"
        assert code == 1  # not a clean stop: a commit was left unfinished
        assert "did not finish its last commit" in d.log()
    finally:
        relay.hung.clear()
        if d.proc is not None and d.proc.poll() is None:
            d.proc.kill()
