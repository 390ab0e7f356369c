"""Delivery in a child process, so it does not compete with acknowledging for the listener's core.

One Python process runs Python code on one core at a time. Delivery (decoding bundles, building and writing
resources) costs about as much CPU as ingest, and in one process it took a quarter to a half of the MLLP
throughput we measured (docs/benchmarks.md). ``[delivery] isolation = "process"`` (the default) runs the
delivery workers in a child process.

The child does not open the journal itself. It asks the parent to claim outbox items and to record results,
over one socketpair: with SQLite, a second process writing the journal makes commits wait for its lock in
SQLite's busy handler, which sleeps 1, 2, 5 ... ms and showed up as 25 ms p99 ACK latency. Through the parent,
every journal write goes through its one writer thread.

The child runs what the parent verified, never what is on disk when it starts: the parent's first frame hands it
the config file's text (as the parent read it at start) and the rule set's verified plaintext (the one in use,
after any reload). A child restarted after a crash therefore starts even while the files on disk are being
edited (an unsigned rule set staged for the next reload, a config half written), and runs the same rules as
the routing.

Frames on the socketpair: a 4-byte big-endian length, then an orjson object.
- parent to child, first: ``{"t": "setup", "config", "base_dir", "rules", "rules_path"}``;
- child to parent: ``{"t": "req", "id", "op": claim|done|retry|dead, ...}`` (claim carries ``ordered`` for
  FIFO per key; retry carries ``give_up_before`` for the age limit and is answered with ``dead``) and delivery events
  ``{"t": "ev", "e": delivered|retry|dead, "d": destination, "v": n}`` (counted in the parent's /metrics);
- parent to child: ``{"t": "res", "id", "ok", ...}`` and ``{"t": "wake"}`` after commits that queued items.
End of file tells the child its parent is gone, even after kill -9, so the child never outlives it. The parent
restarts a child that dies, with backoff.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import struct
import sys
import tomllib
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import orjson

from gateway import telemetry
from gateway.config import GatewayConfig, parse_config, read_text
from gateway.contracts import OutboxItem
from gateway.errors import ConfigError, GatewayError, UnavailableError
from gateway.journal import Claimed, Journal
from gateway.rules import LoadedRules, RuleSet, parse_rules
from gateway.sdnotify import child_environment

log = logging.getLogger(__name__)

FD_ENV = "GATEWAY_DELIVERY_FD"
_LEN = struct.Struct(">I")
MAX_FRAME = 256 * 1024 * 1024
CLAIM_BUDGET = 32 * 1024 * 1024  # bytes of messages handed to the child per claim (Latin-1 JSON may double them)


def _send(writer: asyncio.StreamWriter, obj: dict[str, Any]) -> None:
    data = orjson.dumps(obj)
    writer.write(_LEN.pack(len(data)) + data)


async def _recv(reader: asyncio.StreamReader) -> dict[str, Any] | None:
    try:
        head = await reader.readexactly(_LEN.size)
        (n,) = _LEN.unpack(head)
        if n > MAX_FRAME:
            log.error(
                "A frame of %d bytes on the delivery channel exceeds %d bytes; closing the channel.", n, MAX_FRAME
            )
            return None
        obj = orjson.loads(await reader.readexactly(n))
    except (asyncio.IncompleteReadError, ConnectionError):
        return None  # the other side is gone
    return obj if isinstance(obj, dict) else None


# -- the parent ------------------------------------------------------------------------------------------------


class DeliveryProcess:
    """The parent's handle on the delivery child: start, serve its journal requests, wake, supervise, stop."""

    def __init__(self, config_path: Path, journal: Journal, rules: LoadedRules, config_text: str | None = None) -> None:
        self.config_path = config_path
        # Read once, right after the daemon validated it: every child runs this text, whatever the file holds by
        # the time it starts.
        self.config_text = read_text(config_path, "config file") if config_text is None else config_text
        self.journal = journal
        self.rules = rules  # the rule set in use (replaced by ``restart`` after a reload)
        self._proc: asyncio.subprocess.Process | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._stopping = False
        self._restarting = False
        self._interrupt = asyncio.Event()  # ends the wait before a restart: stop, or a reload

    @property
    def down(self) -> bool:
        """True from a child's exit until its successor starts (False before the first one starts)."""
        return self._proc is not None and self._proc.returncode is not None

    async def run(self) -> None:
        """Keep one child running until ``stop``; restarts after 1, 2, 4 ... 30 s (at once after a reload)."""
        backoff = 1.0
        while not self._stopping:
            self._interrupt.clear()
            parent_sock, child_sock = socket.socketpair()
            env = {**child_environment(), FD_ENV: str(child_sock.fileno())}
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
            reader, self._writer = await asyncio.open_connection(sock=parent_sock, limit=MAX_FRAME)
            _send(
                self._writer,
                {
                    "t": "setup",
                    "config": self.config_text,
                    "base_dir": str(self.config_path.resolve().parent),
                    "rules": self.rules.text,
                    "rules_path": str(self.rules.path),
                },
            )
            telemetry.DELIVERY_PROCESS_UP.labels("process").set(1)
            log.info("Delivery runs in process %d.", self._proc.pid)
            serving = asyncio.create_task(self._serve(reader, self._writer), name="delivery-requests")
            started = asyncio.get_running_loop().time()
            code = await self._proc.wait()
            telemetry.DELIVERY_PROCESS_UP.labels("process").set(0)
            serving.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await serving
            self._writer.close()
            self._writer = None
            if self._stopping:
                break
            if self._restarting:  # a rule set reload changed the destinations: start the new child at once
                self._restarting = False
                backoff = 1.0
                continue
            if asyncio.get_running_loop().time() - started > 300:
                backoff = 1.0  # it ran fine for a while: this is a new failure, not a crash loop
            log.error("The delivery process exited with %s; restarting it in %.0f s.", code, backoff)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._interrupt.wait(), backoff)  # stop() or a reload ends it early
            backoff = 1.0 if self._restarting else min(30.0, backoff * 2)
            self._restarting = False

    def restart(self, rules: LoadedRules) -> None:
        """After a reload: SIGTERM the child (it finishes its current round), then start one with these rules;
        a child waiting to be restarted after a failure starts at once."""
        self.rules = rules
        self._restarting = True
        proc = self._proc
        if proc is None or proc.returncode is not None:
            self._interrupt.set()
            return
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGTERM)

    def wake(self) -> None:
        if self._writer is not None and not self._writer.is_closing():
            _send(self._writer, {"t": "wake"})

    async def stop(self, drain_timeout: float) -> None:
        """SIGTERM the child: it finishes its current round, closes its sinks and exits."""
        self._stopping = True
        self._interrupt.set()
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

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while (msg := await _recv(reader)) is not None:
            if msg.get("t") == "ev":
                telemetry.apply_forwarded(str(msg.get("e")), str(msg.get("d")), float(msg.get("v", 0)))
            elif msg.get("t") == "req":
                _send(writer, await self._answer(msg))

    async def _answer(self, req: dict[str, Any]) -> dict[str, Any]:
        rid = req.get("id")
        try:
            op = req["op"]
            if op == "claim":
                rows = await self.journal.claim_rows(
                    req["dest"], int(req["limit"]), timedelta(seconds=req["lease"]), ordered=bool(req.get("ordered"))
                )
                keep, size = 0, 0
                for row in rows:  # a batch of large messages travels in parts; the rest is released at once
                    size += len(row.raw) + len(row.fhir or b"")
                    if keep and size > CLAIM_BUDGET:
                        break
                    keep += 1
                if keep < len(rows):
                    await self.journal.release([r.id for r in rows[keep:]])
                return {"t": "res", "id": rid, "ok": True, "items": [_encode(r) for r in rows[:keep]]}
            if op == "done":
                await self.journal.mark_done([int(i) for i in req["ids"]])
            elif op == "retry":
                give_up = req.get("give_up_before")
                dead = await self.journal.mark_retry(
                    int(req["item"]),
                    str(req["error"]),
                    datetime.fromisoformat(req["at"]),
                    give_up_before=datetime.fromisoformat(give_up) if give_up else None,
                )
                return {"t": "res", "id": rid, "ok": True, "dead": dead}
            elif op == "dead":
                await self.journal.mark_dead(int(req["item"]), str(req["error"]))
            else:
                return {"t": "res", "id": rid, "ok": False, "error": f"unknown operation {op!r}"}
            return {"t": "res", "id": rid, "ok": True}
        except GatewayError as exc:
            return {"t": "res", "id": rid, "ok": False, "error": str(exc)}
        except Exception as exc:  # the per-request boundary: the child gets an answer and retries later
            telemetry.internal_error("A request from the delivery process failed unexpectedly", exc)
            return {"t": "res", "id": rid, "ok": False, "error": type(exc).__name__}


def _encode(row: Claimed) -> list[Any]:
    # Bytes travel as Latin-1 text (lossless for any byte); the bundle stays undecoded for the child to parse.
    return [
        row.id,
        row.message_id,
        row.attempts,
        row.ordering_key,
        row.kind,
        row.source,
        row.raw.decode("latin-1"),
        row.fhir.decode("latin-1") if row.fhir is not None else None,
    ]


def _decode(v: list[Any]) -> Claimed:
    return Claimed(
        int(v[0]),
        str(v[1]),
        int(v[2]),
        str(v[3]),
        str(v[4]),
        str(v[5]),
        str(v[6]).encode("latin-1"),
        None if v[7] is None else str(v[7]).encode("latin-1"),
    )


# -- the child -------------------------------------------------------------------------------------------------


class RemoteOutbox:
    """gateway.delivery.Outbox over the socketpair: the parent does the journal work."""

    def __init__(self, writer: asyncio.StreamWriter) -> None:
        self.writer = writer
        self._next = 0
        self._waiting: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self.closed = False

    async def _call(self, **req: Any) -> dict[str, Any]:
        if self.closed:
            raise UnavailableError("the gateway process is gone")
        self._next += 1
        fut: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._waiting[self._next] = fut
        _send(self.writer, {"t": "req", "id": self._next, **req})
        res = await fut
        if not res.get("ok"):
            raise UnavailableError(f"the journal refused the request: {res.get('error')}")
        return res

    def resolve(self, res: dict[str, Any]) -> None:
        fut = self._waiting.pop(res.get("id", -1), None)
        if fut is not None and not fut.done():
            fut.set_result(res)

    def close(self) -> None:
        self.closed = True
        for fut in self._waiting.values():
            if not fut.done():
                fut.set_exception(UnavailableError("the gateway process is gone"))
        self._waiting.clear()

    async def claim(self, destination: str, limit: int, lease: timedelta, *, ordered: bool = False) -> list[OutboxItem]:
        res = await self._call(op="claim", dest=destination, limit=limit, lease=lease.total_seconds(), ordered=ordered)
        return [_decode(v).item(destination) for v in res["items"]]

    async def mark_done(self, ids: Sequence[int]) -> None:
        if ids:
            await self._call(op="done", ids=list(ids))

    async def mark_retry(
        self, item_id: int, error: str, next_attempt_at: datetime, *, give_up_before: datetime | None = None
    ) -> bool:
        res = await self._call(
            op="retry",
            item=item_id,
            error=error,
            at=next_attempt_at.isoformat(),
            give_up_before=give_up_before.isoformat() if give_up_before is not None else None,
        )
        return bool(res.get("dead"))

    async def mark_dead(self, item_id: int, error: str) -> None:
        await self._call(op="dead", item=item_id, error=error)


@dataclass(frozen=True, slots=True)
class ChildSetup:
    """What the parent hands the child first: its config and the verified rule set in use."""

    config: GatewayConfig
    rules: RuleSet
    sock: socket.socket


def receive_setup() -> ChildSetup:
    """In the child, before its event loop: read the parent's setup frame from the inherited socket (blocking)
    and parse what it carries; raises ConfigError (exit 2) or OSError when the parent is gone."""
    sock = socket.socket(fileno=int(os.environ[FD_ENV]))

    def exactly(n: int) -> bytes:
        data = sock.recv(n, socket.MSG_WAITALL)
        if len(data) != n:
            raise ConnectionError("the gateway process closed the delivery channel before the setup")
        return data

    (n,) = _LEN.unpack(exactly(_LEN.size))
    if n > MAX_FRAME:
        raise ConnectionError(f"a setup frame of {n} bytes exceeds {MAX_FRAME} bytes")
    setup = orjson.loads(exactly(n))
    if not isinstance(setup, dict) or setup.get("t") != "setup":
        raise ConnectionError("the first frame on the delivery channel is not the setup")
    try:
        data = tomllib.loads(setup["config"])
    except tomllib.TOMLDecodeError as exc:  # the parent validated this text; only a bug gets here
        raise ConfigError(f"not valid TOML: {exc}", "config handed to the delivery process") from None
    config = parse_config(data, Path(setup["base_dir"]))
    # Verified by the parent (signature, rollback); parsed again here to build the destinations.
    rules = parse_rules(setup["rules"], setup["rules_path"])
    return ChildSetup(config, rules, sock)


async def serve_child(setup: ChildSetup) -> None:
    """The child's main: run every destination's worker until SIGTERM or until the parent is gone."""
    from gateway.delivery import build_workers

    cfg, rules, sock = setup.config, setup.rules, setup.sock
    reader, writer = await asyncio.open_connection(sock=sock, limit=MAX_FRAME)
    outbox = RemoteOutbox(writer)

    def forward(event: str, destination: str, value: float) -> None:
        if not writer.is_closing():
            _send(writer, {"t": "ev", "e": event, "d": destination, "v": value})

    telemetry.forward = forward
    sinks = [d.build(name) for name, d in rules.destinations.items()]
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    started = []
    try:
        for sink in sinks:
            await sink.start()
            started.append(sink)
        workers = build_workers(outbox, sinks, cfg.delivery)

        async def from_parent() -> None:
            while (msg := await _recv(reader)) is not None:
                if msg.get("t") == "res":
                    outbox.resolve(msg)
                elif msg.get("t") == "wake":
                    for w in workers:
                        w.wake()
            outbox.close()
            stop.set()  # end of file: the parent is gone

        async with asyncio.TaskGroup() as tg:
            running = [tg.create_task(w.run(), name=f"delivery[{w.sink.name}]") for w in workers]
            listener = tg.create_task(from_parent(), name="delivery-channel")
            await stop.wait()
            for w in workers:
                w.stop()
            # The workers finish their round (its results go to the parent) while the channel still listens.
            await asyncio.wait(running)
            listener.cancel()
    finally:
        for sink in started:
            with contextlib.suppress(Exception):
                await sink.close()
        outbox.close()
        writer.close()
