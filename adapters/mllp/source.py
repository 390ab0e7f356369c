"""The MLLP listener: HL7 v2 messages in, acknowledgements out, each ACK only after its message is durable.

One message is in flight per connection: a sender that pipelines several frames gets their ACKs in order, each
after its own commit. Negative acknowledgements follow the DESIGN table: AE (transient: the journal could not
commit, resend) and AR (permanent: quarantined, do not resend), both with an ERR segment.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import time
from datetime import UTC, datetime

from adapters.mllp.config import MllpSourceConfig
from adapters.mllp.framing import Deframer, FrameTooLarge, frame
from gateway import telemetry
from gateway.contracts import Envelope, InputKind, Outcome, RejectCode, SubmitResult, Submitter
from gateway.errors import ConfigError
from gateway.hl7v2.ack import build_ack
from gateway.hl7v2.parse import HL7ParseError, Message, parse
from gateway.ids import uuid7

log = logging.getLogger(__name__)

# HL7 table 0357 codes for the ERR segment of an AR/AE.
ERR_CODES = {
    RejectCode.UNPARSEABLE: "102",  # data type error
    RejectCode.NO_HEADER: "100",  # segment sequence error
    RejectCode.UNSUPPORTED_VERSION: "203",
    RejectCode.UNSUPPORTED_TYPE: "200",
    RejectCode.MAPPING_FAILED: "207",  # application internal error
    RejectCode.TOO_LARGE: "207",
}
ERR_TRANSIENT = "207"
_ACK_CODES = {Outcome.DELIVERED: "AA", Outcome.ERRORED: "AE", Outcome.REJECTED: "AR"}

_HEADER_SCAN = 64 * 1024


def parse_header(payload: bytes) -> Message | None:
    """The MSH segment alone, enough to address an ACK; None when there is none."""
    head = payload[:_HEADER_SCAN]
    cut = len(head)
    for sep in (b"\r", b"\n"):
        i = head.find(sep, 1)
        if 0 < i < cut:
            cut = i
    try:
        return parse(head[:cut])
    except HL7ParseError:
        return None


class MllpSource:
    def __init__(self, config: MllpSourceConfig, submitter: Submitter) -> None:
        self.config = config
        self.name = config.name
        self.submitter = submitter
        self._server: asyncio.Server | None = None
        self._connections: dict[asyncio.Task[None], bool] = {}  # task -> busy with a message
        self._last_seen: dict[asyncio.Task[None], float] = {}  # task -> loop time of its last data
        self._evicted: set[asyncio.Task[None]] = set()
        self._stopping = False

    @property
    def port(self) -> int:
        """The bound port (useful with port 0)."""
        assert self._server is not None
        return int(self._server.sockets[0].getsockname()[1])

    async def start(self) -> None:
        try:
            self._server = await asyncio.start_server(
                self._on_connection, self.config.host, self.config.port, backlog=512, limit=1 << 20
            )
        except OSError as exc:
            raise ConfigError(
                f"cannot listen on {self.config.host}:{self.config.port}: {exc.strerror}",
                f"sources.{self.name}",
            ) from None
        log.info(
            "MLLP source %s is listening on %s:%d.",
            self.name,
            self.config.host,
            self.port,
            extra={"source": self.name},
        )

    async def stop(self, drain_timeout: float) -> None:
        """Stop accepting; let connections that are processing a message finish it and send its ACK; close
        idle connections at once; after ``drain_timeout`` close whatever is left."""
        self._stopping = True
        if self._server is not None:
            self._server.close()
        for task, busy in list(self._connections.items()):
            if not busy:
                task.cancel()
        if self._connections:
            _, pending = await asyncio.wait(list(self._connections), timeout=drain_timeout)
            for task in pending:
                task.cancel()
            if pending:
                await asyncio.wait(pending, timeout=1.0)
        if self._server is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 1.0)

    async def _on_connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        peer = _peer_name(writer)
        if not self._stopping and len(self._connections) >= self.config.max_connections:
            self._evict_one_idle()
        if self._stopping or len(self._connections) >= self.config.max_connections:
            telemetry.connection_refused(self.name, peer, self.config.max_connections)
            writer.close()
            return
        sock = writer.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._connections[task] = False
        self._last_seen[task] = asyncio.get_running_loop().time()
        telemetry.connection_opened(self.name, peer)
        reason = "closed by peer"
        try:
            reason = await self._serve(task, reader, writer, peer)
        except asyncio.CancelledError:
            if task in self._evicted:
                self._evicted.discard(task)
                reason = "evicted"
                telemetry.protocol_error(
                    self.name,
                    peer,
                    "evicted",
                    "closed this silent connection to admit a new one at the connection limit",
                )
            else:
                reason = "shutting down"
        except (ConnectionError, OSError) as exc:
            reason = f"connection error ({type(exc).__name__})"
        finally:
            self._connections.pop(task, None)
            self._last_seen.pop(task, None)
            telemetry.connection_closed(self.name, peer, reason)
            writer.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(writer.wait_closed(), 1.0)

    def _evict_one_idle(self) -> None:
        """At the connection limit, close the connection that has been silent longest, if it has been silent
        for ``evict_idle_seconds``: a sender whose old connections hang (a crashed interface engine, a NAT that
        dropped them) must not lock out the connection that would deliver its messages now."""
        now = asyncio.get_running_loop().time()
        idle = [(seen, t) for t, seen in self._last_seen.items() if not self._connections.get(t, True)]
        if not idle:
            return
        seen, task = min(idle, key=lambda x: x[0])
        if now - seen >= self.config.evict_idle_seconds:
            self._connections.pop(task, None)  # its slot is free now; the task finishes closing on its own
            self._last_seen.pop(task, None)
            self._evicted.add(task)
            task.cancel()

    async def _serve(
        self, task: asyncio.Task[None], reader: asyncio.StreamReader, writer: asyncio.StreamWriter, peer: str
    ) -> str:
        deframer = Deframer(self.config.max_frame_bytes)
        idle = self.config.idle_timeout_seconds
        while not self._stopping:
            try:
                data = await asyncio.wait_for(reader.read(1 << 16), idle)
                self._last_seen[task] = asyncio.get_running_loop().time()
            except TimeoutError:
                telemetry.protocol_error(self.name, peer, "idle-timeout", f"no data for {idle:g} s, closing")
                return "idle timeout"
            if not data:
                if deframer.pending:
                    telemetry.protocol_error(
                        self.name,
                        peer,
                        "truncated",
                        f"connection closed inside a frame ({deframer.pending} bytes)",
                    )
                return "closed by peer"
            before = deframer.discarded
            events = deframer.feed(data)
            if deframer.discarded > before:
                telemetry.protocol_error(
                    self.name,
                    peer,
                    "garbage",
                    f"discarded {deframer.discarded - before} bytes outside any frame",
                )
            for event in events:
                self._connections[task] = True
                try:
                    ack = await self._answer(event, peer)
                    writer.write(frame(ack))
                    await writer.drain()
                finally:
                    self._connections[task] = False
            if self._stopping:
                break
        return "shutting down"

    async def _answer(self, event: bytes | FrameTooLarge, peer: str) -> bytes:
        started = time.perf_counter()
        telemetry.received(self.name)
        if isinstance(event, FrameTooLarge):
            telemetry.protocol_error(
                self.name,
                peer,
                "too-large",
                f"a frame of at least {event.size} bytes exceeds the limit of {self.config.max_frame_bytes}",
            )
            header = parse_header(event.head)
            telemetry.acked(self.name, time.perf_counter() - started, "AR")
            return build_ack(
                header,
                "AR",
                text="message exceeds the size limit",
                error_code=ERR_CODES[RejectCode.TOO_LARGE],
                control_id=uuid7(),
                raw_header=event.head,
            )
        header = parse_header(event)
        env = Envelope(
            id=uuid7(),
            source=self.name,
            kind=InputKind.HL7V2,
            received_at=datetime.now(UTC),
            payload=event,
            peer=peer,
        )
        try:
            async with asyncio.timeout(self.config.ack_timeout_seconds):
                result = await self.submitter.submit(env)
        except TimeoutError:
            result = SubmitResult(Outcome.ERRORED, reason="timed out waiting for the journal")
        except Exception as exc:  # the per-message boundary: the sender still gets an answer, and may resend
            telemetry.internal_error(
                f"Submitting a message from {peer} on {self.name} failed unexpectedly", exc, source=self.name, peer=peer
            )
            result = SubmitResult(Outcome.ERRORED, reason="internal error, resend later")
        ack = self._ack_for(header, result)
        telemetry.acked(self.name, time.perf_counter() - started, _ACK_CODES[result.outcome])
        return ack

    @staticmethod
    def _ack_for(header: Message | None, result: SubmitResult) -> bytes:
        if result.outcome is Outcome.DELIVERED:
            return build_ack(header, "AA", control_id=uuid7())
        if result.outcome is Outcome.ERRORED:
            return build_ack(header, "AE", text=result.reason, error_code=ERR_TRANSIENT, control_id=uuid7())
        code = ERR_CODES.get(result.code or RejectCode.UNPARSEABLE, "207")
        return build_ack(header, "AR", text=result.reason, error_code=code, control_id=uuid7())


def _peer_name(writer: asyncio.StreamWriter) -> str:
    addr = writer.get_extra_info("peername")
    if isinstance(addr, tuple) and len(addr) >= 2:
        host = addr[0]
        return f"[{host}]:{addr[1]}" if ":" in str(host) else f"{host}:{addr[1]}"
    return str(addr or "unknown")
