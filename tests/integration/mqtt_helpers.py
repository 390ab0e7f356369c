"""Helpers for the MQTT tests: the local Mosquitto (skip when it is not running), a private Mosquitto on a free
port with a config the test writes, and publishing with the independent mosquitto_pub client."""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path

from tests.conftest import need_service
from tests.ports import free_port

BROKER = ("127.0.0.1", 1883)


def broker_up(host: str = BROKER[0], port: int = BROKER[1]) -> bool:
    try:
        with socket.create_connection((host, port), timeout=1):
            return True
    except OSError:
        return False


def need_mosquitto() -> None:
    if not broker_up():
        need_service("Mosquitto", f"nothing listens on {BROKER[0]}:{BROKER[1]}")
    if shutil.which("mosquitto_pub") is None:
        need_service("mosquitto_pub", "Debian's mosquitto-clients is not installed")


def unique_topic(prefix: str = "gw-test") -> str:
    """Each test on its own topic, so tests sharing the broker never see each other's readings."""
    return f"{prefix}/{secrets.token_hex(5)}"


def mosquitto_pub(topic: str, payload: bytes, *, port: int = BROKER[1], qos: int = 1, v5: bool = True) -> None:
    """One message with the independent C client (stdin, so any bytes go through unchanged)."""
    cmd = ["mosquitto_pub", "-h", "127.0.0.1", "-p", str(port), "-q", str(qos), "-t", topic, "-s"]
    if v5:
        cmd += ["-V", "mqttv5"]
    subprocess.run(cmd, input=payload, check=True, timeout=10)


def mosquitto_pub_lines(topic: str, lines: list[bytes], *, port: int = BROKER[1], qos: int = 1) -> None:
    """Many messages over one connection: one per line."""
    cmd = ["mosquitto_pub", "-h", "127.0.0.1", "-p", str(port), "-q", str(qos), "-t", topic, "-l"]
    subprocess.run(cmd, input=b"\n".join(lines) + b"\n", check=True, timeout=60)


class PrivateBroker:
    """A Mosquitto of the test's own: persistence on (so sessions survive a restart), queues large enough for
    the tests, on a free port. Started and stopped by pid."""

    def __init__(self, workdir: Path, extra: str = "") -> None:
        if shutil.which("mosquitto") is None:
            need_service("mosquitto", "the broker binary is not installed")
        self.workdir = workdir
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self.conf = workdir / "mosquitto.conf"
        (workdir / "mosq-data").mkdir(exist_ok=True)
        self.conf.write_text(
            f"listener {self.port} 127.0.0.1\n"
            "user root\n"  # started as root, Mosquitto would switch to its own user and not write to this directory
            "allow_anonymous true\n"
            "persistence true\n"
            f"persistence_location {workdir / 'mosq-data'}/\n"
            "autosave_interval 0\n"  # with autosave_on_changes: save after every change
            "autosave_on_changes true\n"
            "max_queued_messages 100000\n"
            "max_inflight_messages 0\n"
            f"log_dest file {workdir / 'mosquitto.log'}\n" + extra
        )

    def start(self) -> None:
        self.proc = subprocess.Popen(
            ["mosquitto", "-c", str(self.conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if broker_up(port=self.port):
                return
            if self.proc.poll() is not None:
                raise AssertionError(f"mosquitto exited with {self.proc.returncode}: {self.log()}")
            time.sleep(0.05)
        raise AssertionError("mosquitto did not start listening")

    def stop(self) -> None:
        """SIGTERM: Mosquitto writes its persistence file and exits."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            self.proc.wait(10)

    def log(self) -> str:
        p = self.workdir / "mosquitto.log"
        return p.read_text(errors="replace")[-3000:] if p.exists() else ""


@contextlib.contextmanager
def private_broker(workdir: Path, extra: str = "") -> Iterator[PrivateBroker]:
    """``extra``: more config lines (they apply to the listener: TLS, passwords)."""
    b = PrivateBroker(workdir, extra)
    b.start()
    try:
        yield b
    finally:
        if b.proc is not None and b.proc.poll() is None:
            b.proc.kill()
            b.proc.wait(10)


async def eventually(check: Callable[[], Awaitable[bool]], seconds: float = 10.0) -> None:
    """Poll ``check`` until it holds; TimeoutError after ``seconds``."""
    async with asyncio.timeout(seconds):
        while True:
            if await check():
                return
            await asyncio.sleep(0.05)
