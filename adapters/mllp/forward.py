"""The MLLP forward sink: the message as received, to a downstream MLLP receiver, confirmed by its own ACK.

One persistent connection, one message in flight: send, then read frames until the ACK whose MSA-2 is the sent
MSH-10. An ACK for any other control id (a late answer to an earlier message, a receiver that mixes up its
replies) is never credited to this message: the connection is closed and the message retried. AA (or CA) is
done; AE (CE) is retried with backoff; AR (CR) is a dead letter with MSA-3 and ERR kept for the operator. No ACK
within ``ack_timeout_seconds``: the connection is closed, so a late ACK cannot arrive on the next message's
connection, and the message is retried with backoff (the outbox's, so a slow receiver is not flooded).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from adapters.mllp.forward_config import MllpForwardConfig
from adapters.mllp.framing import Deframer, FrameTooLarge, frame
from gateway.contracts import InputKind, OutboxItem
from gateway.errors import PermanentError, TransientError
from gateway.hl7v2.parse import HL7ParseError, parse
from gateway.tls import ReloadableContext

log = logging.getLogger(__name__)


class AckRefused(PermanentError):
    """The receiver answered AR. ``detail`` (MSA-3 and ERR) is kept with the dead letter, not logged."""

    def __init__(self, message: str, detail: str) -> None:
        super().__init__(message)
        self.detail = detail


def ack_verdict(destination: str, control_id: str, ack: bytes) -> Exception | None:
    """What one ACK frame means for the message sent with ``control_id`` (None: accepted)."""
    try:
        msg = parse(ack)
    except HL7ParseError as exc:
        return TransientError(f"{destination} answered with something that is not an HL7 ACK ({exc})")
    msa = msg.first("MSA")
    if msa is None:
        return TransientError(f"{destination} answered without an MSA segment")
    code, acked = msa.get(1), msa.get(2)
    if acked != control_id:
        return TransientError(f"{destination} acknowledged control id {acked!r}, not the one sent")
    if code in ("AA", "CA"):
        return None
    err = msg.first("ERR")
    detail = " ".join(p for p in (msa.get(3), err.get(3, 1) if err else "", err.get(8) if err else "") if p)
    if code in ("AR", "CR"):
        return AckRefused(f"{destination} rejected the message ({code})", detail)
    if code in ("AE", "CE"):
        return TransientError(f"{destination} answered {code} (application error), will retry")
    return TransientError(f"{destination} answered an unknown acknowledgement code {code!r}")


class MllpForwardSink:
    """Sink protocol implementation. ``ordered`` asks the delivery worker for FIFO claims per patient."""

    def __init__(self, name: str, config: MllpForwardConfig) -> None:
        self.name = name
        self.config = config
        self.ordered = config.ordered
        self.concurrency = 1
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._deframer = Deframer(config.max_ack_bytes)
        self._lock = asyncio.Lock()
        self._tls: ReloadableContext | None = None

    @property
    def peer(self) -> str:
        return f"{self.config.host}:{self.config.port}"

    async def start(self) -> None:
        """Read the TLS files now (ConfigError); the connection is made on the first item."""
        if self.config.tls is not None:
            self._tls = ReloadableContext.client(self.config.tls, f"destination {self.name}")

    async def close(self) -> None:
        await self._disconnect()

    async def _disconnect(self) -> None:
        writer, self._writer, self._reader = self._writer, None, None
        self._deframer = Deframer(self.config.max_ack_bytes)  # nothing of the old connection is read again
        if writer is not None:
            writer.close()
            with contextlib.suppress(OSError, TimeoutError, asyncio.TimeoutError):
                await asyncio.wait_for(writer.wait_closed(), 2.0)

    async def _connect(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        if self._reader is not None and self._writer is not None and not self._writer.is_closing():
            return self._reader, self._writer
        tls = self.config.tls
        try:
            reader, writer = await asyncio.wait_for(
                asyncio.open_connection(
                    self.config.host,
                    self.config.port,
                    ssl=self._tls.context if self._tls is not None else None,
                    server_hostname=(tls.server_hostname or self.config.host) if tls is not None else None,
                ),
                self.config.connect_timeout_seconds,
            )
        except TimeoutError as exc:
            raise TransientError(f"{self.name}: connecting to {self.peer} timed out") from exc
        except OSError as exc:
            raise TransientError(f"{self.name}: cannot connect to {self.peer} ({exc.strerror or exc})") from exc
        self._reader, self._writer = reader, writer
        log.info("Connected to %s for destination %s.", self.peer, self.name, extra={"destination": self.name})
        return reader, writer

    async def deliver(self, item: OutboxItem) -> None:
        if item.kind != InputKind.HL7V2:
            raise PermanentError(f"{self.name} forwards HL7 v2 messages only, not {item.kind}")
        try:
            control_id = parse(item.raw).control_id
        except HL7ParseError as exc:
            raise PermanentError(f"message {item.message_id} cannot be forwarded: {exc}") from exc
        async with self._lock:
            try:
                await self._exchange(item.raw, control_id)
            except BaseException:
                # Whatever went wrong, the connection's state is unknown: the next message starts on a new one.
                await self._disconnect()
                raise

    async def _exchange(self, raw: bytes, control_id: str) -> None:
        reader, writer = await self._connect()
        try:
            writer.write(frame(raw))
            await writer.drain()
        except OSError as exc:
            raise TransientError(f"{self.name}: the connection to {self.peer} dropped while sending") from exc
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.config.ack_timeout_seconds
        while True:
            remaining = deadline - loop.time()
            try:
                chunk = await asyncio.wait_for(reader.read(65536), max(0.0, remaining))
            except TimeoutError as exc:
                raise TransientError(
                    f"{self.name}: no ACK from {self.peer} within {self.config.ack_timeout_seconds:g} s"
                ) from exc
            except OSError as exc:
                raise TransientError(f"{self.name}: the connection to {self.peer} dropped before the ACK") from exc
            if not chunk:
                raise TransientError(f"{self.name}: {self.peer} closed the connection before the ACK")
            for event in self._deframer.feed(chunk):
                if isinstance(event, FrameTooLarge):
                    raise TransientError(f"{self.name}: an ACK of {event.size} bytes from {self.peer} is too large")
                err = ack_verdict(self.name, control_id, event)
                if err is not None:
                    raise err
                return
