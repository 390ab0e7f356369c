"""The MQTT subscriber: sensor readings in, each PUBACK sent only after the reading is committed.

One connection at a time, MQTT 5, QoS 1, a persistent session (clean start off, a session expiry), so readings
published while the gateway is down or disconnected wait in the broker. Every received message becomes an
Envelope and is submitted at once (many in flight make large group commits); PUBACKs go out in the order the
messages arrived (MQTT 5 section 4.6), each after its own commit:

- DELIVERED (committed, or a duplicate of a committed reading): PUBACK.
- REJECTED (committed to quarantine with the reason): PUBACK, so the broker does not redeliver it forever.
- ERRORED (the journal could not commit): no PUBACK. A broker resends unacknowledged messages only when the
  session is resumed, so the source disconnects and reconnects with backoff; the redelivered readings that did
  commit meanwhile are recognised by their dedup key.

The broker being down never stops the daemon: the source keeps retrying with capped, jittered backoff.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections import deque
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any, cast

import aiomqtt
import paho.mqtt.client as paho
from paho.mqtt.subscribeoptions import SubscribeOptions

from adapters.mqtt.client import (
    connect_properties,
    enable_manual_ack,
    make_client,
    paho_client,
    puback_sender,
    read_in_chunks,
    read_password,
    tls_context,
)
from adapters.mqtt.config import MqttSourceConfig
from gateway import telemetry
from gateway.contracts import Envelope, InputKind, Outcome, SubmitResult, Submitter
from gateway.ids import uuid7
from gateway.tls import ReloadableContext
from gateway.worker import current_role

log = logging.getLogger(__name__)

_ACK_CODES = {Outcome.DELIVERED: "puback", Outcome.REJECTED: "puback-quarantined"}
# A connection that lasted this long ends a reconnect backoff: its loss is a new outage, retried after
# reconnect_initial_seconds. One that ends sooner (a broker that accepts and drops at once) keeps doubling.
RESET_BACKOFF_AFTER = 10.0


class _Pending:
    """One received QoS 1 message waiting for its commit, in arrival order."""

    __slots__ = ("done", "mid", "ok", "received")

    def __init__(self, mid: int, received: float) -> None:
        self.mid = mid
        self.received = received  # loop time
        self.done = False
        self.ok = False


class _Connection:
    """The state of one broker connection: its PUBACK queue. After a failed commit it acknowledges nothing
    more and asks to be closed (``failed``)."""

    def __init__(self, client: paho.Client) -> None:
        self.client = client
        self.send_pubacks = puback_sender(client)
        self.queue: deque[_Pending] = deque()
        self.flush_scheduled = False
        self.closed = False  # the session ended: a late commit must not write to a dead client
        self.failed = asyncio.Event()
        self.full_since: float | None = None
        self.behind_reported = False


class _SessionEnded(Exception):
    pass


def _inbox(deliver: Callable[[aiomqtt.Message], None]) -> type[asyncio.Queue[aiomqtt.Message]]:
    """A queue class for aiomqtt's ``queue_type`` that hands each message to ``deliver`` at once instead of
    queueing it. aiomqtt puts messages into its queue from paho's read callback, on the event loop; its message
    iterator then costs a task and an ``asyncio.wait`` per message, about a sixth of the loop's time per
    reading. With this queue nothing is ever queued, and the iterator only serves to report the disconnect."""

    class Inbox(asyncio.Queue[aiomqtt.Message]):
        def put_nowait(self, item: aiomqtt.Message) -> None:
            deliver(item)

    return Inbox


class MqttSource:
    def __init__(self, config: MqttSourceConfig, submitter: Submitter) -> None:
        self.config = config
        self.name = config.name
        self.submitter = submitter
        self.broker = config.address
        self.client_id = config.identifier(config.name)
        role = current_role()
        if role is not None:
            # One persistent session per worker: two clients with one id would take the session from each other.
            self.client_id = self.client_id[: 128 - len(role.suffix())] + role.suffix()
        self.connected = asyncio.Event()  # set while subscribed
        self._had_session = False  # this process has had a session with the broker: a new one means it was lost
        self._password: str | None = None
        self._tls: ReloadableContext | None = None
        self._task: asyncio.Task[None] | None = None
        self._stop = asyncio.Event()
        self._tasks: set[asyncio.Task[None]] = set()
        self._drain_seconds = 10.0
        # Labelled once: ``labels()`` takes a lock and builds a key on every call, three times per reading.
        self._received = telemetry.RECEIVED.labels(self.name)
        self._ack_seconds = telemetry.ACK_SECONDS.labels(self.name)
        self._acks = {outcome: telemetry.ACKS.labels(self.name, code) for outcome, code in _ACK_CODES.items()}

    async def start(self) -> None:
        """Read the password and TLS files and check manual acknowledgement is available (ConfigError
        otherwise), then connect in the background: a broker that is down is retried, not fatal."""
        self._password = read_password(self.config)
        self._tls = tls_context(self.config, self.name)
        paho_client(aiomqtt.Client(self.config.host, self.config.port))  # fails now if the guard cannot hold
        self._task = asyncio.create_task(self._run(), name=f"source[{self.name}]")
        log.info(
            "MQTT source %s subscribes to %s on %s as client %s.",
            self.name,
            ", ".join(self.config.subscriptions()),
            self.broker,
            self.client_id,
            extra={"source": self.name, "peer": self.broker},
        )

    async def stop(self, drain_timeout: float) -> None:
        """Stop reading; readings being committed finish and are acknowledged within ``drain_timeout``;
        then disconnect (the persistent session keeps whatever was not acknowledged)."""
        self._drain_seconds = drain_timeout
        self._stop.set()
        if self._task is None:
            return
        try:
            await asyncio.wait_for(asyncio.shield(self._task), drain_timeout + 1.0)
        except TimeoutError:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task

    def broker_connected(self) -> bool:
        """True while subscribed (gateway.contracts.BrokerSource: /readyz names the source when False)."""
        return self.connected.is_set()

    # -- connection loop -------------------------------------------------------------------------------------

    async def _run(self) -> None:
        cfg = self.config
        delay = cfg.reconnect_initial_seconds
        while not self._stop.is_set():
            started = time.monotonic()
            reason = ""
            try:
                await self._session()
            except aiomqtt.MqttError as exc:
                reason = str(exc) or type(exc).__name__
            except _SessionEnded as exc:
                reason = str(exc)
            except Exception as exc:  # the supervisor boundary: log once, retry
                telemetry.internal_error(f"The MQTT source {self.name} failed", exc, source=self.name)
                reason = f"internal error ({type(exc).__name__})"
            self.connected.clear()
            if self._stop.is_set():
                break
            if time.monotonic() - started > RESET_BACKOFF_AFTER:  # it was up for a while: a new outage
                delay = cfg.reconnect_initial_seconds
            wait = delay * random.uniform(0.8, 1.2)
            telemetry.mqtt_connection_lost(self.name, self.broker, reason or "disconnected", wait)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), wait)
            delay = min(delay * 2, cfg.reconnect_max_seconds)
        telemetry.MQTT_CONNECTED.labels(self.name).set(0)

    async def _session(self) -> None:
        cfg = self.config
        props = connect_properties(SessionExpiryInterval=cfg.session_expiry_seconds, ReceiveMaximum=cfg.receive_maximum)
        holder: list[_Connection] = []
        client = make_client(
            cfg,
            self.client_id,
            password=self._password,
            tls=self._tls.context if self._tls is not None else None,
            clean_start=False,
            properties=props,
            queue_type=_inbox(lambda message: self._receive(message, holder[0])),
        )
        conn = _Connection(enable_manual_ack(client))
        read_in_chunks(conn.client)
        holder.append(conn)
        session_present: list[bool] = []
        inner = conn.client
        on_connect = inner.on_connect

        def note_session(*args: Any) -> None:
            session_present.append(bool(getattr(args[2], "session_present", False)))
            if on_connect is not None:
                cast(Callable[..., None], on_connect)(*args)

        inner.on_connect = note_session
        try:
            await self._serve(client, conn, session_present)
        finally:
            conn.closed = True

    async def _serve(self, client: aiomqtt.Client, conn: _Connection, session_present: list[bool]) -> None:
        cfg = self.config
        async with client:
            await client.subscribe([(t, SubscribeOptions(qos=1)) for t in cfg.subscriptions()])
            resumed = bool(session_present and session_present[0])
            telemetry.mqtt_connected(self.name, self.broker, resumed)
            if not resumed and self._had_session and cfg.session_expiry_seconds > 0:
                telemetry.mqtt_session_lost(self.name, self.broker, cfg.session_expiry_seconds)
            self._had_session = True
            self.connected.set()
            reader = asyncio.create_task(self._read(client, conn), name=f"source[{self.name}].read")
            stop = asyncio.create_task(self._stop.wait())
            failed = asyncio.create_task(conn.failed.wait())
            watch = asyncio.create_task(self._watch(conn))
            try:
                await asyncio.wait({reader, stop, failed}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for t in (reader, stop, failed, watch):
                    t.cancel()
                await asyncio.gather(reader, stop, failed, watch, return_exceptions=True)
            if reader.done() and not reader.cancelled() and reader.exception() is not None:
                exc = reader.exception()
                assert exc is not None
                raise exc
            if conn.failed.is_set():
                self.connected.clear()
                await self._drain(1.0)
                raise _SessionEnded("a reading could not be committed")
            # Stopping: let the readings being committed finish and be acknowledged before disconnecting.
            await self._drain(self._drain_seconds)
            self.connected.clear()

    async def _drain(self, seconds: float) -> None:
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=seconds)

    async def _read(self, client: aiomqtt.Client, conn: _Connection) -> None:
        """Returns (raises MqttError) when the connection is lost: messages go to _receive as they arrive."""
        async for _ in client.messages:
            pass

    def _receive(self, message: aiomqtt.Message, conn: _Connection) -> None:
        """Called by paho's read callback on the event loop, for each message in arrival order."""
        if conn.closed or conn.failed.is_set() or self._stop.is_set():
            return  # not acknowledged: the broker redelivers it to the next session
        loop = asyncio.get_running_loop()
        pending = None
        if message.qos > 0:
            pending = _Pending(message.mid, loop.time())
            conn.queue.append(pending)
        task = loop.create_task(self._handle(message, conn, pending))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _watch(self, conn: _Connection) -> None:
        """Once a second: the in-flight gauge; a reading not committed within ack_timeout_seconds (restart the
        connection, so the broker redelivers it); falling behind, i.e. the in-flight window stayed full (the
        broker holds back and queues the rest)."""
        window = self.config.receive_maximum
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(1.0)
            now = loop.time()
            telemetry.mqtt_inflight(self.name, len(conn.queue))
            if conn.queue and now - conn.queue[0].received > self.config.ack_timeout_seconds:
                telemetry.mqtt_ack_withheld(self.name, self.broker, "timed out waiting for the journal")
                conn.failed.set()
            if len(conn.queue) >= window:
                if conn.full_since is None:
                    conn.full_since = now
                elif not conn.behind_reported and now - conn.full_since >= self.config.behind_after_seconds:
                    conn.behind_reported = True
                    telemetry.mqtt_behind(self.name, self.broker, window, now - conn.full_since)
            else:
                if conn.behind_reported:
                    telemetry.mqtt_caught_up(self.name, self.broker)
                conn.full_since = None
                conn.behind_reported = False

    # -- one message -----------------------------------------------------------------------------------------

    async def _handle(self, message: aiomqtt.Message, conn: _Connection, pending: _Pending | None) -> None:
        started = time.perf_counter()
        self._received.inc()
        payload = message.payload if isinstance(message.payload, bytes | bytearray) else b""
        payload = bytes(payload)
        metadata = {"topic": message.topic.value}
        limit = self.config.max_payload_bytes
        if len(payload) > limit:
            metadata["truncated_from"] = str(len(payload))
            payload = payload[:limit]
        env = Envelope(
            id=uuid7(),
            source=self.name,
            kind=InputKind.MQTT,
            received_at=datetime.now(UTC),
            payload=payload,
            peer=self.broker,
            metadata=metadata,
        )
        try:
            result = await self.submitter.submit(env)  # the ack timeout is _watch's: no timer per reading
        except Exception as exc:  # the per-message boundary: no PUBACK, the broker redelivers
            telemetry.internal_error(
                f"Submitting a reading from {self.broker} on {self.name} failed unexpectedly",
                exc,
                source=self.name,
                peer=self.broker,
            )
            result = SubmitResult(Outcome.ERRORED, reason="internal error")
        if result.outcome is Outcome.ERRORED:
            if not conn.failed.is_set():
                telemetry.mqtt_ack_withheld(self.name, self.broker, result.reason)
            conn.failed.set()
        else:
            self._ack_seconds.observe(time.perf_counter() - started)
            self._acks[result.outcome].inc()
        if pending is not None:
            pending.done = True
            pending.ok = result.outcome is not Outcome.ERRORED
            if not conn.flush_scheduled:
                # Every reading of a group commit resumes in this loop turn: acknowledge them together after it.
                conn.flush_scheduled = True
                asyncio.get_running_loop().call_soon(self._release, conn)

    def _release(self, conn: _Connection) -> None:
        """Send the PUBACKs at the head of the queue whose commits are done, in arrival order, in one write.
        After a failed commit nothing more is acknowledged on this connection: the broker redelivers all of it
        (a PUBACK queued on a connection that is gone is dropped with it, and the dedup key answers the
        redelivery)."""
        conn.flush_scheduled = False
        queue = conn.queue
        mids: list[int] = []
        while queue and queue[0].done:
            p = queue.popleft()
            if p.ok and not conn.failed.is_set():
                mids.append(p.mid)
        if mids and not conn.failed.is_set() and not conn.closed:
            conn.send_pubacks(mids)
