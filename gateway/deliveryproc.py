"""Delivery in a child process, so it does not compete with acknowledging for the listener's core.

One Python process runs Python code on one core at a time. Delivery (claiming outbox items, building and
writing resources) costs about as much CPU as ingest, and in one process it halved the MLLP throughput we
measured (docs/benchmarks.md). ``[delivery] isolation = "process"`` (the default) runs the delivery workers in
a child process that shares only the journal (SQLite in WAL mode or MySQL, both safe for several processes).

The parent and the child talk over one socketpair:
- parent to child: a byte whenever committed messages queued outbox items (the child's workers wake at once);
  end of file when the parent dies, even by kill -9, so the child never outlives it;
- child to parent: delivery events as lines (``delivered store 12``), so the parent's /metrics counts them.
The parent restarts a child that dies, with backoff.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import sys
from datetime import timedelta
from pathlib import Path

from gateway import telemetry

log = logging.getLogger(__name__)

FD_ENV = "GATEWAY_DELIVERY_FD"


class DeliveryProcess:
    """The parent's handle on the delivery child: start, wake, supervise, stop."""

    def __init__(self, config_path: Path) -> None:
        self.config_path = config_path
        self._proc: asyncio.subprocess.Process | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._stopping = False
        self._started = asyncio.Event()

    async def run(self) -> None:
        """Start the child and keep one running until ``stop``; restarts after 1, 2, 4 ... 30 s."""
        backoff = 1.0
        while not self._stopping:
            parent_sock, child_sock = socket.socketpair()
            env = {**os.environ, FD_ENV: str(child_sock.fileno())}
            try:
                self._proc = await asyncio.create_subprocess_exec(
                    sys.executable,
                    "-m",
                    "gateway",
                    "deliver",
                    "--config",
                    str(self.config_path),
                    pass_fds=[child_sock.fileno()],
                    env=env,
                    stdin=asyncio.subprocess.DEVNULL,
                )
            finally:
                child_sock.close()
            reader, self._writer = await asyncio.open_connection(sock=parent_sock)
            self._started.set()
            log.info("Delivery runs in process %d.", self._proc.pid)
            events = asyncio.create_task(self._read_events(reader), name="delivery-events")
            code = await self._proc.wait()
            events.cancel()
            self._writer.close()
            self._writer = None
            if self._stopping:
                break
            log.error("The delivery process exited with %s; restarting it in %.0f s.", code, backoff)
            await asyncio.sleep(backoff)
            backoff = min(30.0, backoff * 2)

    def wake(self) -> None:
        if self._writer is not None and not self._writer.is_closing():
            with contextlib.suppress(ConnectionError, RuntimeError):
                self._writer.write(b"w")

    async def stop(self, drain_timeout: float) -> None:
        """SIGTERM the child: it finishes its current round, closes its sinks and exits."""
        self._stopping = True
        proc = self._proc
        if proc is None or proc.returncode is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(proc.wait(), drain_timeout)
        except TimeoutError:
            log.warning("The delivery process did not stop within %.0f s; killing it.", drain_timeout)
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()

    async def _read_events(self, reader: asyncio.StreamReader) -> None:
        while line := await reader.readline():
            parts = line.decode("ascii", "replace").split()
            if len(parts) == 3:
                with contextlib.suppress(ValueError):
                    telemetry.apply_forwarded(parts[0], parts[1], float(parts[2]))


async def serve_child(config_path: Path, base_dir: Path) -> None:
    """The child's main: run every destination's worker until SIGTERM or until the parent is gone.
    ``base_dir`` is the config file's directory (relative rule set paths start there)."""
    from gateway.config import load_config
    from gateway.delivery import DeliveryWorker, RetryPolicy
    from gateway.journal import Journal
    from gateway.rules import load_rules

    cfg = load_config(config_path)
    rules = load_rules(cfg.rules_path(base_dir))
    fd = int(os.environ[FD_ENV])
    sock = socket.socket(fileno=fd)
    reader, writer = await asyncio.open_connection(sock=sock)

    def forward(event: str, destination: str, value: float) -> None:
        if not writer.is_closing():
            writer.write(f"{event} {destination} {value:g}\n".encode())

    telemetry.forward = forward
    journal = Journal(cfg.journal.url, pool_size=cfg.journal.pool_size)
    await journal.open(migrate_schema=False)
    sinks = [d.build(name) for name, d in rules.destinations.items()]
    d = cfg.delivery
    policy = RetryPolicy(d.max_attempts, d.backoff_initial_seconds, d.backoff_max_seconds)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    started = []
    try:
        for sink in sinks:
            await sink.start()
            started.append(sink)
        workers = [
            DeliveryWorker(
                journal,
                sink,
                policy,
                batch_size=d.batch_size,
                poll_interval=d.poll_interval_seconds,
                linger=d.linger_seconds,
                lease=timedelta(seconds=d.lease_seconds),
            )
            for sink in sinks
        ]

        async def wake_on_signal() -> None:
            while await reader.read(4096):
                for w in workers:
                    w.wake()
            stop.set()  # end of file: the parent is gone

        async with asyncio.TaskGroup() as tg:
            for w in workers:
                tg.create_task(w.run(), name=f"delivery[{w.sink.name}]")
            waker = tg.create_task(wake_on_signal(), name="delivery-wake")
            await stop.wait()
            for w in workers:
                w.stop()
            waker.cancel()
    finally:
        for sink in started:
            with contextlib.suppress(Exception):
                await sink.close()
        await journal.close()
        writer.close()
