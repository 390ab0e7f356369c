"""The MLLP listener: HL7 v2 messages in, acknowledgements out, each ACK only after its message is durable.

One message is in flight per connection: a sender that pipelines several frames gets their ACKs in order, each
after its own commit. Negative acknowledgements follow the DESIGN table: AE (transient: the journal could not
commit, resend) and AR (permanent: quarantined, do not resend), both with an ERR segment.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import re
import socket
import time
from datetime import UTC, datetime

from adapters.mllp.config import MllpSourceConfig
from adapters.mllp.framing import Deframer, FrameTooLarge, frame
from gateway import telemetry
from gateway.contracts import Envelope, InputKind, Outcome, RejectCode, SubmitResult, Submitter
from gateway.errors import ConfigError
from gateway.hl7v2.ack import build_ack
from gateway.hl7v2.batch import Batch, BatchError, build_batch_ack, is_batch, split_batch
from gateway.hl7v2.parse import HL7ParseError, Message, parse
from gateway.ids import uuid7
from gateway.tls import ReloadableContext, handshake_failure, peer_certificate, tls_server_protocol
from gateway.worker import current_role

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


_FS_BEFORE_CR = re.compile(rb"\x1c+\r")


def framing_safe(ack: bytes) -> bytes:
    """An ACK echoes header fields of the message it answers; a sender can end one with 0x1C (and end its
    segments with LF, so its own frame is not cut), and the ACK's CR after that field would make an MLLP end
    block before the ACK's real end. 0x1C before a CR is dropped; elsewhere (a sender may even declare it as a
    delimiter) it is kept."""
    return _FS_BEFORE_CR.sub(b"\r", ack) if b"\x1c\r" in ack else ack


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
        self._per_peer: dict[str, int] = {}  # peer IP address -> open connections
        self._networks = config.networks()
        self._handshaking = 0  # TLS handshakes under way (not yet in _connections)
        self._tls: ReloadableContext | None = None
        self._stopping = False

    @property
    def port(self) -> int:
        """The bound port (useful with port 0)."""
        assert self._server is not None
        return int(self._server.sockets[0].getsockname()[1])

    async def start(self) -> None:
        if self.config.tls is not None:
            # Read the certificate files now (a ConfigError stops the start); SIGHUP re-reads them for new
            # connections (gateway.tls.reload_all).
            self._tls = ReloadableContext.server(self.config.tls, f"source {self.name}")
        loop = asyncio.get_running_loop()
        holder, tls = self._tls, self.config.tls

        def protocol() -> asyncio.BaseProtocol:
            # asyncio.start_server's factory; with TLS, each connection takes the certificates current now and
            # reaches _on_connection only after its handshake.
            reader = asyncio.StreamReader(limit=1 << 20, loop=loop)
            app = asyncio.StreamReaderProtocol(reader, self._on_connection, loop=loop)
            if holder is None or tls is None:
                return app
            return tls_server_protocol(
                app,
                holder.context,
                handshake_timeout=tls.handshake_timeout_seconds,
                on_failure=self._tls_failed,
                admit=self._admit_handshake,
            )

        try:
            # Workers of one supervisor share the port (the kernel spreads connections); a lone daemon binds
            # exclusively so a stray second one is refused.
            self._server = await loop.create_server(
                protocol, self.config.host, self.config.port, backlog=512, reuse_port=current_role() is not None
            )
        except OSError as exc:
            raise ConfigError(
                f"cannot listen on {self.config.host}:{self.config.port}: {exc.strerror}",
                f"sources.{self.name}",
            ) from None
        log.info(
            "MLLP source %s is listening on %s:%d (%s).",
            self.name,
            self.config.host,
            self.port,
            "plain TCP"
            if self._tls is None
            else "TLS" + (" with client certificates" if self.config.tls and self.config.tls.client_ca else ""),
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
        if self._tls is not None:
            self._handshaking = max(0, self._handshaking - 1)  # its handshake succeeded
        # Per-address checks first: a sender that may not connect must not evict anyone at the limit.
        address = _peer_address(writer)
        if self._networks and not _address_in(address, self._networks):
            telemetry.limit_hit(self.name, peer, "address-not-allowed", "the address is not in allowed_peers, closing")
            writer.close()
            return
        if self._per_peer.get(address, 0) >= self.config.max_connections_per_peer:
            telemetry.limit_hit(
                self.name,
                peer,
                "per-peer-connections",
                f"{self.config.max_connections_per_peer} connections from this address are open already, closing",
            )
            writer.close()
            return
        if not self._stopping and len(self._connections) >= self.config.max_connections:
            self._evict_one_idle()
        if self._stopping or len(self._connections) >= self.config.max_connections:
            telemetry.connection_refused(self.name, peer, self.config.max_connections)
            if not self._stopping:
                telemetry.limit_counted(self.name, "max-connections")
            writer.close()
            return
        self._per_peer[address] = self._per_peer.get(address, 0) + 1
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
            left = self._per_peer.pop(address, 1) - 1
            if left > 0:
                self._per_peer[address] = left
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
        if self._tls is not None:
            refused = self._check_client(writer, peer)
            if refused:
                return refused
        deframer = Deframer(self.config.max_frame_bytes)
        idle = self.config.idle_timeout_seconds
        read_limit = self.config.read_timeout_seconds
        loop = asyncio.get_running_loop()
        # A message must be whole within read_limit of its first byte (bytes outside frames count too), so a
        # sender dribbling a byte now and then cannot hold a connection for ever under the idle timeout.
        deadline: float | None = None
        while not self._stopping:
            wait = idle if deadline is None else min(idle, deadline - loop.time())
            try:
                if wait <= 0:
                    raise TimeoutError
                # asyncio.timeout, not wait_for: wait_for wraps the read in a Task of its own (and a loop
                # iteration to start it), for every read of every message.
                async with asyncio.timeout(wait):
                    data = await reader.read(1 << 16)
                self._last_seen[task] = now = loop.time()
            except TimeoutError:
                if deadline is not None and loop.time() >= deadline:
                    telemetry.limit_hit(
                        self.name, peer, "read-timeout", f"a message was not complete within {read_limit:g} s, closing"
                    )
                    return "read timeout"
                telemetry.protocol_error(self.name, peer, "idle-timeout", f"no data for {idle:g} s, closing")
                telemetry.limit_counted(self.name, "idle-timeout")
                return "idle timeout"
            if deadline is None:
                deadline = now + read_limit
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
                    writer.write(frame(framing_safe(ack)))
                    try:
                        if writer.transport.get_write_buffer_size() == 0:
                            # The kernel took the whole ACK: drain() cannot block (it still raises on a
                            # lost connection), so no timer for it.
                            await writer.drain()
                        else:
                            async with asyncio.timeout(read_limit):
                                await writer.drain()
                    except TimeoutError:
                        telemetry.limit_hit(
                            self.name, peer, "write-timeout", f"the sender took no ACK for {read_limit:g} s, closing"
                        )
                        return "write timeout"
                finally:
                    self._connections[task] = False
            if events:
                deadline = None if deframer.pending == 0 else loop.time() + read_limit
            if self._stopping:
                break
        return "shutting down"

    def _admit_handshake(self, address: str, peer: str) -> bool:
        """Before a TLS handshake: refuse addresses outside allowed_peers, and more handshakes at once than
        max_connections, so neither costs a handshake (or a file descriptor held for its timeout)."""
        if self._stopping:
            return False
        if self._networks and not _address_in(address, self._networks):
            telemetry.limit_hit(self.name, peer, "address-not-allowed", "the address is not in allowed_peers, closing")
            return False
        if self._handshaking >= self.config.max_connections:
            telemetry.limit_hit(
                self.name, peer, "pending-handshakes", f"{self._handshaking} TLS handshakes are under way, closing"
            )
            return False
        self._handshaking += 1
        return True

    def _tls_failed(self, peer: str, exc: BaseException | None) -> None:
        """A TLS handshake failed: certificates from an unknown CA, expired ones, none where one is required,
        no common protocol version, or too slow. The connection never reached _on_connection."""
        self._handshaking = max(0, self._handshaking - 1)
        reason, detail = handshake_failure(exc)
        telemetry.tls_refused(self.name, peer, reason, detail)
        if reason == "handshake-timeout":
            telemetry.limit_counted(self.name, reason)

    def _check_client(self, writer: asyncio.StreamWriter, peer: str) -> str | None:
        """After a successful handshake: the allow-list. Returns why the client is refused, or None."""
        assert self.config.tls is not None
        ssl_object = writer.get_extra_info("ssl_object")
        cert = peer_certificate(ssl_object)
        refusal = self.config.tls.refusal(cert)
        if refusal is not None:
            telemetry.tls_refused(self.name, peer, "not-allowed", refusal)
            return "TLS client not allowed"
        version = str(ssl_object.version()) if ssl_object is not None else "?"
        telemetry.tls_accepted(self.name, peer, version, cert.subject if cert else "")
        return None

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
            telemetry.limit_counted(self.name, "frame-size")
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
        if is_batch(event):
            try:
                batch = split_batch(event)
            except BatchError as exc:  # journaled whole below, as an unparseable message, and answered AR
                telemetry.protocol_error(self.name, peer, "bad-batch", str(exc))
            else:
                return await self._answer_batch(batch, peer, started)
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
            # The commit may still land (it is not cancelled half-way): a resend is then answered as a duplicate.
            telemetry.journal_failed(self.name, f"no journal answer within {self.config.ack_timeout_seconds:g} s")
            result = SubmitResult(Outcome.ERRORED, reason="timed out waiting for the journal")
        except Exception as exc:  # the per-message boundary: the sender still gets an answer, and may resend
            telemetry.internal_error(
                f"Submitting a message from {peer} on {self.name} failed unexpectedly", exc, source=self.name, peer=peer
            )
            result = SubmitResult(Outcome.ERRORED, reason="internal error, resend later")
        ack = self._ack_for(header, result)
        telemetry.acked(self.name, time.perf_counter() - started, _ACK_CODES[result.outcome])
        return ack

    async def _answer_batch(self, batch: Batch, peer: str, started: float) -> bytes:
        """An FHS/BHS batch: each message is submitted (in order, so their commits group) and acknowledged on
        its own, and the answer is an acknowledgement batch (gateway.hl7v2.batch)."""
        for _ in batch.messages[1:]:
            telemetry.received(self.name)
        headers = [parse_header(m) for m in batch.messages]
        envelopes = [
            Envelope(
                id=uuid7(), source=self.name, kind=InputKind.HL7V2, received_at=datetime.now(UTC), payload=m, peer=peer
            )
            for m in batch.messages
        ]

        async def one(env: Envelope) -> SubmitResult:
            try:
                async with asyncio.timeout(self.config.ack_timeout_seconds):
                    return await self.submitter.submit(env)
            except TimeoutError:
                telemetry.journal_failed(self.name, f"no journal answer within {self.config.ack_timeout_seconds:g} s")
                return SubmitResult(Outcome.ERRORED, reason="timed out waiting for the journal")
            except Exception as exc:  # the per-message boundary, as in _answer
                telemetry.internal_error(
                    f"Submitting a batched message from {peer} on {self.name} failed unexpectedly",
                    exc,
                    source=self.name,
                    peer=peer,
                )
                return SubmitResult(Outcome.ERRORED, reason="internal error, resend later")

        results = await asyncio.gather(*(one(env) for env in envelopes))
        acks = [self._ack_for(h, r) for h, r in zip(headers, results, strict=True)]
        for r in results:
            telemetry.acked(self.name, time.perf_counter() - started, _ACK_CODES[r.outcome])
        return build_batch_ack(batch, acks, control_id=uuid7())

    @staticmethod
    def _ack_for(header: Message | None, result: SubmitResult) -> bytes:
        if result.outcome is Outcome.DELIVERED:
            return build_ack(header, "AA", control_id=uuid7())
        if result.outcome is Outcome.ERRORED:
            return build_ack(header, "AE", text=result.reason, error_code=ERR_TRANSIENT, control_id=uuid7())
        code = ERR_CODES.get(result.code or RejectCode.UNPARSEABLE, "207")
        return build_ack(header, "AR", text=result.reason, error_code=code, control_id=uuid7())


def _address_in(address: str, networks: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]) -> bool:
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped  # an IPv4 sender on a dual-stack socket
    return any(ip in net for net in networks)


def _peer_address(writer: asyncio.StreamWriter) -> str:
    """The sender's IP address alone: the unit of the per-peer connection limit."""
    addr = writer.get_extra_info("peername")
    return str(addr[0]) if isinstance(addr, tuple) and addr else str(addr or "unknown")


def _peer_name(writer: asyncio.StreamWriter) -> str:
    addr = writer.get_extra_info("peername")
    if isinstance(addr, tuple) and len(addr) >= 2:
        return telemetry.peer_name(addr[0], addr[1])
    return str(addr or "unknown")
