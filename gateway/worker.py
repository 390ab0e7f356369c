"""Which process this is when ``workers = N > 1``: a worker of a supervisor (gateway/supervisor.py), or neither.

The supervisor starts each worker with its index and the worker count in the environment. Adapters read the role
at ``start()`` (never at config validation, which stays pure) to share their listening port (SO_REUSEPORT) and to
give their MQTT session a per-worker client id. A process without these variables is the single-process daemon,
which binds exclusively, so a stray second daemon on the same port is still refused.
"""

from __future__ import annotations

import ctypes
import os
import signal
from collections.abc import Mapping
from dataclasses import dataclass

INDEX_ENV = "GATEWAY_WORKER_INDEX"
COUNT_ENV = "GATEWAY_WORKERS"
SUPERVISOR_ENV = "GATEWAY_SUPERVISOR_PID"
_PR_SET_PDEATHSIG = 1


@dataclass(frozen=True)
class WorkerRole:
    index: int
    count: int

    @property
    def primary(self) -> bool:
        """Worker 0 runs what must run once per host: retention, outbox gauges, delivery on SQLite."""
        return self.index == 0

    def suffix(self) -> str:
        return f"-w{self.index}"


def current_role(environ: Mapping[str, str] | None = None) -> WorkerRole | None:
    """The role given by the supervisor, or None in the single-process daemon."""
    env = os.environ if environ is None else environ
    index, count = env.get(INDEX_ENV, ""), env.get(COUNT_ENV, "")
    if not (index.isdigit() and count.isdigit()) or int(count) < 2 or int(index) >= int(count):
        return None
    return WorkerRole(int(index), int(count))


def worker_environment(index: int, count: int) -> dict[str, str]:
    return {INDEX_ENV: str(index), COUNT_ENV: str(count), SUPERVISOR_ENV: str(os.getpid())}


def follow_supervisor() -> None:
    """In a worker: get SIGTERM (a drain) when the supervisor dies, even by SIGKILL, so no orphan keeps the
    shared port. Under systemd the unit's KillMode would end it anyway; this covers runs outside systemd."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):  # not Linux: no parent-death signal
        return
    supervisor = os.environ.get(SUPERVISOR_ENV, "")
    if supervisor.isdigit() and os.getppid() != int(supervisor):  # it died before prctl took effect
        os.kill(os.getpid(), signal.SIGTERM)
