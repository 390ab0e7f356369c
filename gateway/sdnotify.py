"""The systemd notify protocol: READY=1, STOPPING=1, STATUS=..., WATCHDOG=1 on $NOTIFY_SOCKET.

Written by hand because it is one datagram per call on a Unix socket; the libraries for it (sdnotify,
systemd-python) add nothing for that and the latter needs libsystemd headers to build. The watchdog is fed from
the event loop itself, so a loop that is stuck (a blocking call, a runaway CPU-bound message) stops the pings
and systemd restarts the service.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
from collections.abc import Mapping

log = logging.getLogger(__name__)

# Variables that belong to this process only: children (the delivery process) must not notify for the unit.
NOTIFY_VARIABLES = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")


class Notifier:
    """Sends notifications when the service runs under systemd (NOTIFY_SOCKET set); does nothing otherwise."""

    def __init__(self, environ: Mapping[str, str] | None = None) -> None:
        env = os.environ if environ is None else environ
        path = env.get("NOTIFY_SOCKET", "")
        # An abstract socket name is given with a leading "@".
        self.address = "\0" + path[1:] if path.startswith("@") else path
        self.watchdog_interval: float | None = None
        usec = env.get("WATCHDOG_USEC", "")
        pid = env.get("WATCHDOG_PID", "")
        if usec.isdigit() and int(usec) > 0 and (not pid or pid == str(os.getpid())):
            self.watchdog_interval = int(usec) / 1_000_000 / 2  # ping twice per period, as systemd advises

    @property
    def enabled(self) -> bool:
        return bool(self.address)

    def notify(self, *assignments: str) -> bool:
        """Send one datagram of newline-separated assignments; False when not under systemd or it failed."""
        if not self.address:
            return False
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
                sock.connect(self.address)
                sock.sendall("\n".join(assignments).encode())
            return True
        except OSError as exc:
            log.warning("Could not notify systemd: %s.", exc.strerror or exc)
            return False

    def ready(self, status: str, *extra: str) -> None:
        """READY=1; ``extra`` assignments (X_... names, which systemd ignores) inform a supervisor."""
        self.notify("READY=1", f"STATUS={status}", f"MAINPID={os.getpid()}", *extra)

    def stopping(self, status: str) -> None:
        self.notify("STOPPING=1", f"STATUS={status}")

    async def watchdog(self) -> None:
        """Ping the watchdog from the event loop until cancelled (returns at once without a watchdog)."""
        if self.watchdog_interval is None or not self.address:
            return
        while True:
            self.notify("WATCHDOG=1")
            await asyncio.sleep(self.watchdog_interval)


def child_environment(environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment for a child process, without systemd's notify variables."""
    env = dict(os.environ if environ is None else environ)
    for name in NOTIFY_VARIABLES:
        env.pop(name, None)
    return env
