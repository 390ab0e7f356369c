"""``workers = N > 1``: `gateway run` supervises N worker processes, each a full gateway on the same config.

Workers share the MLLP and DICOM ports (SO_REUSEPORT: the kernel spreads connections), one MQTT shared
subscription and the journal. This process only supervises: it receives no messages and opens no database.

- Start: worker 0 first, alone, so it applies the journal's (and the DICOM index's) migrations; the others once it
  is ready. READY=1 goes to systemd when every worker has said READY=1 to us.
- Notify: each worker's NOTIFY_SOCKET is a datagram socket of ours (one per worker, so a datagram names its
  sender); only this process talks to systemd, so the unit keeps NotifyAccess=main. WATCHDOG=1 goes to systemd
  only while every running worker pings; a worker whose pings stop is killed and restarted.
- Signals: SIGTERM/SIGINT drain every worker, then exit 0; SIGHUP reloads the rules in every worker.
- Crashes: a worker that exits unexpectedly is restarted with capped backoff (a log line with its index and exit
  status, ``gateway_worker_restarts_total``, an audit record); a worker that crash-loops stops the service with
  exit status 1 (systemd's Restart= takes over), and one that cannot start at all stops it with its own status.
- Telemetry: we own ``[telemetry] listen``. /metrics merges the workers' own /metrics (each on a loopback port it
  names in its READY=1) with a ``worker`` label; /readyz is ready when every worker is.

Hand-written with the stdlib: systemd supervises this process already, and the notify aggregation above is what no
process manager offers (supervisord, circus and the like would replace systemd's supervision, not feed it).
prometheus-client's multiprocess mode was not used: it supports neither Info metrics (gateway_build) nor custom
collectors, and it keeps a dead worker's files to clean up; scraping each worker keeps every metric type working.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import os
import shutil
import signal
import socket
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families

from gateway.audit import AuditLog
from gateway.config import GatewayConfig
from gateway.http import TelemetryServer
from gateway.sdnotify import Notifier, child_environment
from gateway.worker import worker_environment

log = logging.getLogger(__name__)

START_TIMEOUT = 120.0  # a worker not READY after this long is killed (and counted as a crash)
BACKOFF_INITIAL, BACKOFF_MAX = 0.5, 30.0
CRASH_WINDOW, CRASH_LIMIT = 300.0, 5  # more crashes of one worker than this within the window: give up
RELOAD_WAIT = 30.0
EXIT_GRACE = 15.0  # after drain_timeout_seconds, before SIGKILL

REGISTRY = CollectorRegistry(auto_describe=True)
RESTARTS = Counter(
    "gateway_worker_restarts_total",
    "Workers restarted after an unexpected exit or a lapsed watchdog.",
    ["worker"],
    registry=REGISTRY,
)
READY = Gauge("gateway_workers_ready", "Workers that are ready (of the configured workers).", registry=REGISTRY)


def worker_exited(index: int, status: str, restart_in: float | None) -> None:
    """A worker exited unexpectedly: the log line and the counter together."""
    if restart_in is None:
        log.error("Worker %d exited (%s) and crash-loops; stopping the gateway.", index, status)
        return
    RESTARTS.labels(str(index)).inc()
    log.error("Worker %d exited unexpectedly (%s); restarting it in %.1f s.", index, status, restart_in)


def describe_status(returncode: int) -> str:
    return f"killed by {signal.Signals(-returncode).name}" if returncode < 0 else f"exit status {returncode}"


def merge_metrics(texts: dict[int, str]) -> list[Metric]:
    """Workers' Prometheus text expositions as one set of families, each sample labelled ``worker``."""
    families: dict[str, Metric] = {}
    for index, text in sorted(texts.items()):
        for fam in text_string_to_metric_families(text):
            merged = families.get(fam.name)
            if merged is None:
                merged = families[fam.name] = Metric(fam.name, fam.documentation, fam.type, fam.unit)
            merged.samples.extend(s._replace(labels={**s.labels, "worker": str(index)}) for s in fam.samples)
    return list(families.values())


class _Families:
    """A collector over already merged families, so generate_latest writes the text format for us."""

    def __init__(self, families: list[Metric]) -> None:
        self.families = families

    def collect(self) -> list[Metric]:
        return self.families


def render(texts: dict[int, str]) -> bytes:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Families(merge_metrics(texts)))
    return generate_latest(registry) + generate_latest(REGISTRY)


async def http_get(address: str, path: str) -> tuple[int, bytes]:
    """GET from a worker's telemetry endpoint (ours: HTTP/1.1, Connection: close): (status, body)."""
    host, _, port = address.rpartition(":")

    async def get() -> bytes:
        reader, writer = await asyncio.open_connection(host, int(port))
        try:
            writer.write(f"GET {path} HTTP/1.1\r\nHost: {address}\r\nConnection: close\r\n\r\n".encode())
            await writer.drain()
            return await reader.read()
        finally:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()

    raw = await asyncio.wait_for(get(), 5.0)
    head, _, body = raw.partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), body


@dataclass
class Slot:
    """One worker index; its process changes on every restart."""

    index: int
    socket_path: str
    proc: asyncio.subprocess.Process | None = None
    ready: bool = False
    telemetry: str = ""
    last_ping: float = 0.0
    started: float = 0.0
    reload_pending: bool = False
    saw_reloading: bool = False
    crashes: collections.deque[float] = field(default_factory=collections.deque)


class Supervisor:
    def __init__(self, config: GatewayConfig, config_path: Path, environ: dict[str, str] | None = None) -> None:
        self.config = config
        self.config_path = config_path
        self.environ = dict(os.environ if environ is None else environ)
        self.systemd = Notifier(self.environ)
        # The worker's own watchdog period: systemd's, so a worker's lapse is judged by the unit's WatchdogSec.
        self.watchdog_usec = int(self.environ.get("WATCHDOG_USEC", "0") or 0) if self.systemd.watchdog_interval else 0
        self.stopping = asyncio.Event()
        self.failed: int | None = None  # exit status when giving up
        self.slots: list[Slot] = []
        self._sockets: list[socket.socket] = []
        self._dir = ""
        self._changed = asyncio.Event()  # a worker became ready or exited
        self._up = False  # every worker was ready once: from now on an exit means a restart
        self._tasks: set[asyncio.Task[None]] = set()
        self.telemetry = (
            TelemetryServer(config.telemetry.listen, self.health, metrics=self.metrics)
            if config.telemetry.listen
            else None
        )
        self.audit_log = AuditLog(Path(config.audit_log)) if config.audit_log else None
        self.command = [sys.executable, "-m", "gateway", "run", "--config", str(config_path)]

    # -- lifecycle ---------------------------------------------------------------------------------------------

    async def run(self) -> int:
        """Run until SIGTERM/SIGINT (returns 0 after every worker drained) or until workers cannot run (their
        exit status, or 1 for a crash loop)."""
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.stopping.set)
        loop.add_signal_handler(signal.SIGHUP, self.reload)
        self._dir = tempfile.mkdtemp(prefix="gateway-notify-")  # mode 0700: only our user may notify us
        try:
            for i in range(self.config.workers):
                self.slots.append(self._bind(i))
            if self.telemetry is not None:
                await self.telemetry.start()
            self._audit("gateway.supervisor_start", workers=self.config.workers)
            # Worker 0 alone first: it migrates the journal; N processes migrating at once would race.
            if not await self._start_and_wait(self.slots[:1]) or not await self._start_and_wait(self.slots[1:]):
                # Stopped while starting: a normal stop, unless a worker failed first.
                return await self._shutdown(self.failed if self.failed is not None else 0)
            self._up = True
            self.systemd.ready(f"serving with {len(self.slots)} workers")
            log.info("The gateway %s is ready with %d workers.", self.config.instance, len(self.slots))
            if self.watchdog_usec:
                self._spawn(self._watchdog(), "supervisor-watchdog")
            await self._wait_stop_or_failure()
            return await self._shutdown(self.failed if self.failed is not None else 0)
        finally:
            for task in self._tasks:
                task.cancel()
            if self.telemetry is not None:
                await self.telemetry.stop()
            for sock in self._sockets:
                loop.remove_reader(sock.fileno())
                sock.close()
            shutil.rmtree(self._dir, ignore_errors=True)

    def _bind(self, index: int) -> Slot:
        path = os.path.join(self._dir, f"w{index}.sock")
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC | socket.SOCK_NONBLOCK)
        sock.bind(path)
        self._sockets.append(sock)
        slot = Slot(index, path)
        asyncio.get_running_loop().add_reader(sock.fileno(), self._on_datagram, sock, slot)
        return slot

    async def _start_and_wait(self, slots: list[Slot]) -> bool:
        for slot in slots:
            await self._start(slot)
        deadline = time.monotonic() + START_TIMEOUT
        while not all(s.ready for s in slots):
            if self.stopping.is_set() or self.failed is not None:
                return False
            for s in self.slots:  # worker 0 may fail while the others start
                if s.proc is not None and s.proc.returncode is not None:
                    log.error("Worker %d could not start (%s).", s.index, describe_status(s.proc.returncode))
                    self.failed = s.proc.returncode if s.proc.returncode > 0 else 1
                    return False
            if time.monotonic() > deadline:
                log.error("Workers did not become ready within %g s.", START_TIMEOUT)
                self.failed = 1
                return False
            self._changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), 0.5)
        return True

    async def _start(self, slot: Slot) -> None:
        env = child_environment(self.environ)
        env.update(worker_environment(slot.index, len(self.slots)))
        env["NOTIFY_SOCKET"] = slot.socket_path
        if self.watchdog_usec:
            env["WATCHDOG_USEC"] = str(self.watchdog_usec)
        slot.ready, slot.telemetry, slot.reload_pending = False, "", False
        slot.started = slot.last_ping = time.monotonic()
        slot.proc = await asyncio.create_subprocess_exec(*self.command, env=env, stdin=asyncio.subprocess.DEVNULL)
        log.info("Worker %d started (pid %d).", slot.index, slot.proc.pid)
        self._spawn(self._watch(slot, slot.proc), f"worker[{slot.index}]")

    def _spawn(self, coro: collections.abc.Coroutine[None, None, None], name: str) -> None:
        task = asyncio.get_running_loop().create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _watch(self, slot: Slot, proc: asyncio.subprocess.Process) -> None:
        """Wait for one worker process to exit; restart its slot unless we are stopping or it crash-loops."""
        returncode = await proc.wait()
        slot.ready = False
        self._update_ready()
        self._changed.set()
        if self.stopping.is_set() or slot.proc is not proc or not self._up:  # at the start, a failure is fatal
            return
        status = describe_status(returncode)
        now = time.monotonic()
        slot.crashes.append(now)
        while slot.crashes and slot.crashes[0] < now - CRASH_WINDOW:
            slot.crashes.popleft()
        self._audit("gateway.worker_exit", worker=slot.index, status=status)
        if len(slot.crashes) > CRASH_LIMIT:
            worker_exited(slot.index, status, None)
            self.failed = 1
            self._changed.set()
            return
        delay = min(BACKOFF_MAX, BACKOFF_INITIAL * 2 ** (len(slot.crashes) - 1))
        worker_exited(slot.index, status, delay)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.stopping.wait(), delay)
        if not self.stopping.is_set() and self.failed is None:
            await self._start(slot)

    async def _wait_stop_or_failure(self) -> None:
        while not self.stopping.is_set() and self.failed is None:
            self._changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), 1.0)
            for slot in self.slots:  # a restarted worker that never gets ready is killed (and restarted)
                proc = slot.proc
                if proc is not None and proc.returncode is None and not slot.ready and self._start_overdue(slot):
                    log.error("Worker %d did not become ready within %g s; killing it.", slot.index, START_TIMEOUT)
                    proc.kill()

    @staticmethod
    def _start_overdue(slot: Slot) -> bool:
        return time.monotonic() - slot.started > START_TIMEOUT

    async def _shutdown(self, status: int) -> int:
        """Drain every worker (SIGTERM), SIGKILL what is left after the drain timeout, return ``status``."""
        self.systemd.stopping("draining the workers")
        self.stopping.set()
        procs = [s.proc for s in self.slots if s.proc is not None and s.proc.returncode is None]
        if procs:
            log.info("Stopping: draining %d worker(s).", len(procs))
        for proc in procs:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
        if procs:
            _, pending = await asyncio.wait(
                [asyncio.ensure_future(p.wait()) for p in procs],
                timeout=self.config.drain_timeout_seconds + EXIT_GRACE,
            )
            for proc in procs:
                if proc.returncode is None:
                    log.error("Worker pid %d did not stop in time; killing it.", proc.pid)
                    proc.kill()
            if pending:
                await asyncio.wait(pending, timeout=5.0)
        self._audit("gateway.supervisor_stop", status=status)
        log.info("The gateway has stopped (%d workers).", len(self.slots))
        return status

    # -- signals, notify, watchdog -----------------------------------------------------------------------------

    def reload(self) -> None:
        """SIGHUP: every worker reloads its rule set (and TLS files); READY=1 to systemd when all have."""
        live = [s for s in self.slots if s.proc is not None and s.proc.returncode is None]
        log.warning("SIGHUP received: reloading the rule set in %d worker(s).", len(live))
        self.systemd.notify("RELOADING=1", "STATUS=reloading", f"MONOTONIC_USEC={time.monotonic_ns() // 1000}")
        for slot in live:
            slot.reload_pending, slot.saw_reloading = slot.ready, False
            assert slot.proc is not None
            with contextlib.suppress(ProcessLookupError):
                slot.proc.send_signal(signal.SIGHUP)
        self._spawn(self._reloaded(), "supervisor-reload")

    async def _reloaded(self) -> None:
        deadline = time.monotonic() + RELOAD_WAIT
        while any(s.reload_pending for s in self.slots) and time.monotonic() < deadline:
            self._changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), 0.5)
        self.systemd.notify("READY=1", f"STATUS=serving with {len(self.slots)} workers")

    def _on_datagram(self, sock: socket.socket, slot: Slot) -> None:
        while True:
            try:
                data = sock.recv(4096)
            except (BlockingIOError, InterruptedError):
                return
            fields = dict(line.partition("=")[::2] for line in data.decode("utf-8", "replace").splitlines())
            now = time.monotonic()
            if fields.get("WATCHDOG") == "1":
                slot.last_ping = now
            if fields.get("RELOADING") == "1":
                slot.saw_reloading = True
            if fields.get("STOPPING") == "1":
                slot.ready = False
            if fields.get("READY") == "1":
                if slot.saw_reloading:
                    slot.reload_pending = slot.saw_reloading = False
                if not slot.ready:  # not again after each rules reload
                    log.info("Worker %d is ready.", slot.index)
                slot.ready, slot.last_ping = True, now
                slot.telemetry = fields.get("X_GATEWAY_TELEMETRY", slot.telemetry)
            self._update_ready()
            self._changed.set()

    def _update_ready(self) -> None:
        READY.set(sum(s.ready for s in self.slots))

    async def _watchdog(self) -> None:
        """Ping systemd while every running worker pings us; kill a worker whose pings stopped."""
        period = self.watchdog_usec / 1_000_000
        assert self.systemd.watchdog_interval is not None
        while True:
            now = time.monotonic()
            healthy = True
            for slot in self.slots:
                if slot.proc is None or slot.proc.returncode is not None or not slot.ready:
                    continue  # starting or restarting: bounded by START_TIMEOUT, not the watchdog
                if now - slot.last_ping > period:
                    healthy = False
                    log.error("Worker %d stopped answering its watchdog for %g s; killing it.", slot.index, period)
                    slot.ready = False
                    slot.proc.kill()
            if healthy:
                self.systemd.notify("WATCHDOG=1")
            await asyncio.sleep(self.systemd.watchdog_interval)

    # -- telemetry ---------------------------------------------------------------------------------------------

    async def health(self) -> tuple[bool, str]:
        """Ready when every worker said READY=1 and its own /readyz answers 200."""
        results = await asyncio.gather(*(self._worker_ready(s) for s in self.slots))
        ok = all(r for r, _ in results)
        return ok, "; ".join(f"worker {s.index}: {text}" for s, (_, text) in zip(self.slots, results, strict=True))

    async def _worker_ready(self, slot: Slot) -> tuple[bool, str]:
        if not slot.ready or not slot.telemetry:
            return False, "starting"
        try:
            status, body = await http_get(slot.telemetry, "/readyz")
        except (OSError, TimeoutError, ValueError, IndexError):
            return False, "not answering"
        return status == 200, body.decode("utf-8", "replace").strip()

    async def metrics(self) -> bytes:
        async def one(slot: Slot) -> tuple[int, str] | None:
            if not slot.ready or not slot.telemetry:
                return None
            try:
                status, body = await http_get(slot.telemetry, "/metrics")
            except (OSError, TimeoutError, ValueError, IndexError):
                return None
            return (slot.index, body.decode()) if status == 200 else None

        got = await asyncio.gather(*(one(s) for s in self.slots))
        texts = dict(r for r in got if r is not None)
        return await asyncio.get_running_loop().run_in_executor(None, render, texts)

    def _audit(self, action: str, **fields: str | int) -> None:
        if self.audit_log is None:
            return
        try:
            self.audit_log.append(action, f"gateway:{self.config.instance}", **fields)
        except OSError as exc:
            log.error("Could not write the audit trail %s: %s.", self.audit_log.path, exc.strerror or exc)


def run_supervisor(config: GatewayConfig, config_path: Path) -> int:
    return asyncio.run(Supervisor(config, config_path).run())
