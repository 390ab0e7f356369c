"""The DICOM listener: C-ECHO and C-STORE SCP; each instance is on disk and in the journal before Success.

pynetdicom runs every association in its own threads; the C-STORE handler runs there. It checks that the
dataset is complete, reads its UIDs and header attributes, and writes the file durably, all in that thread;
then it hands the journal work to the event loop (``asyncio.run_coroutine_threadsafe``) and waits for the
answer, so nothing blocks the loop and each association waits only for its own instance.

Statuses (PS3.4 B.2.3), from the outcome of ``submit``:

- 0x0000 Success: the file is fsynced, the instance is committed to the journal (or is a resend of a committed
  one) and recorded in the study index;
- 0xA700 Refused, out of resources: the disk or the journal failed or did not answer in time; resend later;
- 0xC000 Cannot understand: the dataset is truncated or cannot be decoded (its bytes are kept under
  ``unreadable/`` and the message is quarantined with the reason);
- 0xA900 Data set does not match SOP class: the dataset's SOP Class or Instance UID is not the one in the
  request;
- 0x0111 Duplicate SOP instance: the UID is already stored with other content and the policy is ``reject``.

Association policy, checked when the A-ASSOCIATE-RQ arrives: the called AE title, the calling AE title (and the
address it may call from), the number of associations; each rejection is an A-ASSOCIATE-RJ with its proper
reason and a log line naming the peer.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import hashlib
import logging
import socket
import ssl
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from io import BytesIO
from pathlib import Path
from typing import Any, cast

import orjson
from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, _config, evt
from pynetdicom.association import Association
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.presentation import AllStoragePresentationContexts
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]
from pynetdicom.transport import ThreadedAssociationServer

from gateway import telemetry
from gateway.contracts import Envelope, InputKind, Outcome, RejectCode, SubmitResult, Submitter
from gateway.errors import ConfigError, GatewayError, TransientError
from gateway.ids import uuid7
from gateway.normalise.dicom import INSTANCE_FORMAT
from gateway.tls import ReloadableContext, peer_certificate
from gateway.worker import current_role

from . import reactor, sockets  # noqa: F401  (sockets: closes association sockets whose peer is gone)
from .config import DicomSourceConfig
from .dataset import DatasetError, file_meta, inspect
from .index import IndexedInstance, StudyIndex, study_summary
from .storage import instance_path, unreadable_path, write_durably

log = logging.getLogger(__name__)

SUCCESS = 0x0000
OUT_OF_RESOURCES = 0xA700
MISMATCH = 0xA900
CANNOT_UNDERSTAND = 0xC000
DUPLICATE_SOP_INSTANCE = 0x0111
_REJECT_STATUS = {RejectCode.CONFLICT: DUPLICATE_SOP_INSTANCE, RejectCode.UNSUPPORTED_TYPE: MISMATCH}

# A-ASSOCIATE-RJ (result, source, diagnostic), PS3.8 9.3.4.
RJ_CALLED_AE = (0x01, 0x01, 0x07)  # rejected-permanent, service-user, called-AE-title-not-recognized
RJ_CALLING_AE = (0x01, 0x01, 0x03)  # rejected-permanent, service-user, calling-AE-title-not-recognized
RJ_BUSY = (0x02, 0x01, 0x01)  # rejected-transient, service-user, no-reason-given (shutting down)

# pynetdicom's own log handlers write identifiers (UIDs, sometimes patient attributes) at INFO: off.
_config.LOG_HANDLER_LEVEL = "none"
_config.LOG_REQUEST_IDENTIFIERS = False
_config.LOG_RESPONSE_IDENTIFIERS = False
logging.getLogger("pynetdicom").setLevel(logging.WARNING)


class _Server(ThreadedAssociationServer):
    """pynetdicom's threaded server with two changes.

    The TLS handshake moves out of the accepting thread: pynetdicom's ``get_request`` wraps each accepted socket
    with a handshake on a blocking socket without a timeout, in the one thread that accepts connections, so a
    client that connects and sends nothing (a port scan, a half-open load balancer check) stopped every later
    association until it went away. Here the socket is wrapped without a handshake and each connection's own
    thread performs it, bounded by ``handshake_timeout``; a failure or a timeout is logged with the peer and
    counted (``gateway_tls_refused_total``), as on the MLLP listener.

    At most ``max_handshakes`` handshakes run at once (the association limit): a further connection is closed at
    once, logged and counted as refused, so a flood of silent connections cannot hold a thread each.

    With ``shared_port`` (the workers of one supervisor) the listening socket also gets SO_REUSEPORT, which must
    be set before the bind; pynetdicom sets SO_REUSEADDR only."""

    shared_port = False
    source_name = ""
    handshake_timeout = 30.0
    max_handshakes = 0  # 0: no limit

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._handshaking = 0
        self._handshake_lock = threading.Lock()
        super().__init__(*args, **kwargs)

    def server_bind(self) -> None:
        assert self.socket is not None
        if self.shared_port:
            self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        super().server_bind()

    def get_request(self) -> tuple[socket.socket, tuple[str, int]]:
        assert self.socket is not None
        sock, address = self.socket.accept()
        if self.ssl_context:
            try:
                sock = self.ssl_context.wrap_socket(sock, server_side=True, do_handshake_on_connect=False)
            except OSError:
                sock.close()
                raise
        return sock, address

    def process_request(self, request: Any, client_address: Any) -> None:
        """In the accepting thread, before the connection's thread starts: the limit on handshakes under way."""
        if isinstance(request, ssl.SSLSocket) and self.max_handshakes:
            with self._handshake_lock:
                refused = self._handshaking >= self.max_handshakes
                if not refused:
                    self._handshaking += 1
            if refused:
                with contextlib.suppress(OSError):
                    request.close()
                peer = telemetry.peer_name(client_address[0], client_address[1])
                telemetry.connection_refused(self.source_name, peer, self.max_handshakes)
                return
            try:
                super().process_request(request, client_address)
            except BaseException:  # no thread started: its handshake will not end the count
                with self._handshake_lock:
                    self._handshaking -= 1
                raise
            return
        super().process_request(request, client_address)

    def finish_request(self, request: Any, client_address: Any) -> None:
        """In the connection's thread: the TLS handshake (if any), then pynetdicom's handling (which closes the
        socket when the association ends); a connection whose handshake fails is closed here."""
        if isinstance(request, ssl.SSLSocket):
            try:
                refusal = self._handshake(request)
            finally:
                if self.max_handshakes:
                    with self._handshake_lock:
                        self._handshaking -= 1
            if refusal is not None:
                with contextlib.suppress(OSError):
                    request.close()
                peer = telemetry.peer_name(client_address[0], client_address[1])
                telemetry.tls_refused(self.source_name, peer, *refusal)
                return
        super().finish_request(request, client_address)

    def _handshake(self, sock: ssl.SSLSocket) -> tuple[str, str] | None:
        """None once the handshake is done, else (reason, detail) for the log line."""
        previous = sock.gettimeout()
        sock.settimeout(self.handshake_timeout)
        try:
            sock.do_handshake()
        except TimeoutError:
            return "handshake-timeout", f"no TLS handshake within {self.handshake_timeout:g} s"
        except (ssl.SSLError, OSError) as exc:
            return "handshake-failed", str(getattr(exc, "reason", None) or exc.strerror or type(exc).__name__)
        sock.settimeout(previous)
        return None


def _start_server(
    ae: AE,
    address: tuple[str, int],
    handlers: list[Any],
    ssl_context: ssl.SSLContext | None,
    *,
    source_name: str,
    handshake_timeout: float,
    max_handshakes: int,
    shared_port: bool,
) -> ThreadedAssociationServer:
    """``AE.start_server(block=False)`` with the server class above (start_server takes no server class)."""
    server_class = type(
        "GatewayAssociationServer",
        (_Server,),
        {
            "shared_port": shared_port,
            "source_name": source_name,
            "handshake_timeout": handshake_timeout,
            "max_handshakes": max_handshakes,
        },
    )
    server = ae.make_server(address, evt_handlers=handlers, ssl_context=ssl_context, server_class=server_class)
    threading.Thread(target=server.serve_forever, name=f"AcceptorServer@{address[1]}", daemon=True).start()
    ae._servers.append(server)  # as start_server does: the server's shutdown() removes it again
    return server


def status_for(result: SubmitResult) -> int:
    if result.outcome is Outcome.DELIVERED:
        return SUCCESS
    if result.outcome is Outcome.ERRORED:
        return OUT_OF_RESOURCES
    return _REJECT_STATUS.get(result.code or RejectCode.UNPARSEABLE, CANNOT_UNDERSTAND)


class DicomSource:
    def __init__(self, config: DicomSourceConfig, submitter: Submitter) -> None:
        self.config = config
        self.name = config.name
        self.submitter = submitter
        self.root: Path = config.storage_path
        self.index = StudyIndex(config.index_database_url)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server: ThreadedAssociationServer | None = None
        self._ae: AE | None = None
        self._stopping = False
        self._inflight = 0
        self._lock = threading.Lock()
        self._requested: set[int] = set()
        self._aggregator: asyncio.Task[None] | None = None
        self._tls: ReloadableContext | None = None

    @property
    def port(self) -> int:
        """The bound port (useful with port 0)."""
        assert self._server is not None
        return int(self._server.server_address[1])

    # -- lifecycle -------------------------------------------------------------------------------------------

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        try:
            await self._loop.run_in_executor(None, lambda: self.root.mkdir(parents=True, exist_ok=True))
        except OSError as exc:
            raise ConfigError(
                f"cannot create the storage directory {self.root}: {exc.strerror}", f"sources.{self.name}"
            ) from None
        await self.index.open()
        ae = AE(ae_title=self.config.ae_title)
        ae.maximum_associations = self.config.max_associations
        ae.maximum_pdu_size = self.config.max_pdu_bytes
        ae.acse_timeout = self.config.acse_timeout_seconds
        ae.dimse_timeout = self.config.dimse_timeout_seconds
        ae.network_timeout = self.config.network_timeout_seconds
        ae.require_called_aet = False  # checked in _on_requested, with a log line
        for cx in AllStoragePresentationContexts:
            assert cx.abstract_syntax is not None
            ae.add_supported_context(cx.abstract_syntax, ALL_TRANSFER_SYNTAXES)
        ae.add_supported_context(Verification, ALL_TRANSFER_SYNTAXES)
        handlers = [
            (evt.EVT_CONN_OPEN, self._on_open),
            (evt.EVT_CONN_CLOSE, self._on_close),
            (evt.EVT_REQUESTED, self._on_requested),
            (evt.EVT_REJECTED, self._on_rejected),
            (evt.EVT_ABORTED, self._on_aborted),
            (evt.EVT_C_ECHO, self._on_echo),
            (evt.EVT_C_STORE, self._on_store),
        ]
        ssl_context = None
        if self.config.tls is not None:
            # pynetdicom takes one context at bind time; the listening context switches each handshake to the
            # current certificate, so a reload (SIGHUP) applies to new associations.
            self._tls = ReloadableContext.server(self.config.tls, f"source {self.name}")
            ssl_context = self._tls.listening_context()
        server: ThreadedAssociationServer | None
        try:
            server = _start_server(
                ae,
                (self.config.host, self.config.port),
                handlers,
                ssl_context,
                source_name=self.name,
                handshake_timeout=self.config.acse_timeout_seconds,
                max_handshakes=self.config.max_associations,
                shared_port=current_role() is not None,  # a worker of `workers = N` shares the port
            )
        except OSError as exc:
            await self.index.close()
            raise ConfigError(
                f"cannot listen on {self.config.host}:{self.config.port}: {exc.strerror}", f"sources.{self.name}"
            ) from None
        assert server is not None
        self._ae, self._server = ae, server
        self._aggregator = asyncio.create_task(self._aggregate(), name=f"source[{self.name}].studies")
        log.info(
            "DICOM source %s (AE title %s) is listening on %s:%d%s.",
            self.name,
            self.config.ae_title,
            self.config.host,
            self.port,
            " with TLS" if self._tls is not None else "",
            extra={"source": self.name},
        )

    async def stop(self, drain_timeout: float) -> None:
        """Stop accepting associations; let instances being stored finish (commit and status) within
        ``drain_timeout``; instances that arrive meanwhile are answered 0xA700; then abort what is left."""
        self._stopping = True
        loop = asyncio.get_running_loop()
        server = self._server
        if server is not None:
            await loop.run_in_executor(None, server.shutdown)
        deadline = loop.time() + drain_timeout
        while self._inflight and loop.time() < deadline:  # noqa: ASYNC110 (counted in pynetdicom's threads)
            await asyncio.sleep(0.02)
        if server is not None:
            for assoc in server.active_associations:
                with contextlib.suppress(Exception):
                    await loop.run_in_executor(None, assoc.abort)
        self._server = None
        if self._aggregator is not None:
            self._aggregator.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._aggregator
            self._aggregator = None
        await self.index.close()

    # -- association events (pynetdicom threads) -------------------------------------------------------------

    @staticmethod
    def _peer(assoc: Association) -> str:
        return telemetry.peer_name(assoc.requestor.address, assoc.requestor.port)

    def _on_open(self, event: evt.Event) -> None:
        sock = event.assoc.dul.socket
        raw = getattr(sock, "socket", None) if sock is not None else None
        if raw is not None and raw.family in (socket.AF_INET, socket.AF_INET6):
            # Nagle plus delayed ACK holds every small PDU (the C-STORE response) for up to 40 ms: ~20
            # instances/s instead of hundreds.
            raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        # pynetdicom's DUL thread sleeps this long whenever it finds nothing to do; its default of 1 ms, paid
        # twice per C-STORE, held a bare pynetdicom SCP to 340 instances/s here, 0.2 ms gives 530/s.
        event.assoc.dul._run_loop_delay = self.config.reactor_poll_seconds
        # pynetdicom's association thread polls for each decoded message every 1 ms, its network thread sleeps
        # and polls the socket: these wait for their work instead (reactor.py).
        reactor.install(event.assoc)
        reactor.install_dul(event.assoc)
        telemetry.connection_opened(self.name, self._peer(event.assoc))
        if self.config.tls is not None and isinstance(raw, ssl.SSLSocket):
            cert = peer_certificate(raw)
            refusal = self.config.tls.refusal(cert)
            if refusal is not None:
                telemetry.tls_refused(self.name, self._peer(event.assoc), "not-allowed", refusal)
                self._requested.add(id(event.assoc))  # refused already: no "no association request" line
                with contextlib.suppress(OSError):
                    raw.shutdown(socket.SHUT_RDWR)  # the association ends before its request is read
                return
            telemetry.tls_accepted(self.name, self._peer(event.assoc), str(raw.version()), cert.subject if cert else "")

    def _on_close(self, event: evt.Event) -> None:
        assoc = event.assoc
        peer = self._peer(assoc)
        if id(assoc) not in self._requested and not assoc.is_rejected:
            telemetry.protocol_error(
                self.name,
                peer,
                "no-association-request",
                f"no association request within {self.config.acse_timeout_seconds:g} s, closed the connection",
            )
        self._requested.discard(id(assoc))
        if assoc.is_released:
            reason = "released"
        elif assoc.is_aborted:
            reason = "aborted"
        elif assoc.is_rejected:
            reason = "rejected"
        else:
            reason = "closed"
        telemetry.connection_closed(self.name, peer, reason)

    def _on_requested(self, event: evt.Event) -> None:
        assoc = event.assoc
        self._requested.add(id(assoc))
        calling, called = _ae_titles(assoc)
        address = str(assoc.requestor.address)
        if self._stopping:
            self._reject(assoc, RJ_BUSY, "the gateway is shutting down")
        elif self.config.require_called_ae and called != self.config.ae_title:
            self._reject(assoc, RJ_CALLED_AE, f"called AE title {called!r} is not {self.config.ae_title!r}")
        elif self.config.allowed_peers:
            peers = [p for p in self.config.allowed_peers if p.ae_title == calling]
            if not peers:
                self._reject(assoc, RJ_CALLING_AE, f"calling AE title {calling!r} is not in allowed_peers")
            elif not any(p.allows(address) for p in peers):
                self._reject(
                    assoc, RJ_CALLING_AE, f"calling AE title {calling!r} is not allowed from address {address}"
                )

    def _reject(self, assoc: Association, rsd: tuple[int, int, int], why: str) -> None:
        result, source, diagnostic = rsd
        calling, _ = _ae_titles(assoc)
        telemetry.protocol_error(
            self.name,
            self._peer(assoc),
            "association-rejected",
            f"rejected the association of calling AE {calling!r} "
            f"({'permanent' if result == 1 else 'transient'}, reason {diagnostic}): {why}",
        )
        assoc.acse.send_reject(result, source, diagnostic)
        # Wait until the A-ASSOCIATE-RJ is on the wire and the peer has closed (or the ARTIM timer expired),
        # as pynetdicom does for its own rejections: otherwise the connection can be closed before it is sent.
        assoc.kill()

    def _on_rejected(self, event: evt.Event) -> None:
        # pynetdicom rejects by itself only at the association limit (our own checks log in _reject).
        rj = event.assoc.acceptor.primitive
        if rj is not None and (rj.result, rj.result_source, rj.diagnostic) == (0x02, 0x03, 0x02):
            telemetry.connection_refused(self.name, self._peer(event.assoc), self.config.max_associations)
            telemetry.limit_counted(self.name, "max-connections")

    def _on_aborted(self, event: evt.Event) -> None:
        assoc = event.assoc
        if getattr(assoc, "idle_timed_out", False) or assoc.dul.idle_timer_expired():
            detail = f"no data for {self.config.network_timeout_seconds:g} s, aborted the association"
            telemetry.protocol_error(self.name, self._peer(assoc), "idle-timeout", detail)
        else:
            telemetry.protocol_error(self.name, self._peer(assoc), "aborted", "the association was aborted")

    def _on_echo(self, event: evt.Event) -> int:
        return SUCCESS

    def _on_store(self, event: evt.Event) -> int:
        """The C-STORE handler (a pynetdicom association thread). Returns 0x0000 only once the instance is
        durable; see the module docstring for the other statuses."""
        if self._stopping:
            return OUT_OF_RESOURCES
        with self._lock:
            self._inflight += 1
        started = time.perf_counter()
        telemetry.received(self.name)
        peer = self._peer(event.assoc)
        try:
            status = self._store(event, peer)
        except Exception as exc:  # the per-instance boundary: the sender gets an answer and may resend
            telemetry.internal_error(
                f"Storing an instance from {peer} on {self.name} failed unexpectedly", exc, source=self.name, peer=peer
            )
            status = OUT_OF_RESOURCES
        finally:
            with self._lock:
                self._inflight -= 1
        telemetry.acked(self.name, time.perf_counter() - started, f"{status:#06x}")
        return status

    def _store(self, event: evt.Event, peer: str) -> int:
        assoc = event.assoc
        calling, called = _ae_titles(assoc)
        request = cast(C_STORE, event.request)
        raw = cast(BytesIO, request.DataSet).getvalue()
        limit = self.config.max_dataset_bytes
        if limit and len(raw) > limit:
            # pynetdicom has buffered the dataset by now; the limit keeps it off the disk and the journal.
            telemetry.limit_hit(self.name, peer, "dataset-size", f"a {len(raw)}-byte dataset over {limit} bytes")
            return OUT_OF_RESOURCES
        ts = str(event.context.transfer_syntax)
        base: dict[str, Any] = {
            "format": INSTANCE_FORMAT,
            "transfer_syntax": ts,
            "calling_ae": calling,
            "called_ae": called,
            "sop_class_uid": str(request.AffectedSOPClassUID or ""),
            "sop_instance_uid": str(request.AffectedSOPInstanceUID or ""),
            "size": len(raw),
        }
        try:
            ins = inspect(raw, ts)
        except DatasetError as exc:
            return self._store_unreadable(raw, base, str(exc), "unparseable", peer)
        if ins.sop_class_uid != base["sop_class_uid"] or ins.sop_instance_uid != base["sop_instance_uid"]:
            return self._store_unreadable(
                raw,
                base,
                "the dataset's SOP Class or Instance UID differs from the C-STORE request's",
                "sop-class-mismatch",
                peer,
            )
        path = instance_path(self.root, ins.study_instance_uid, ins.sop_instance_uid, ins.sha256)
        env_id = uuid7()
        header = {**ins.header, "_calling_ae": calling, "_called_ae": called}
        indexed = IndexedInstance(
            sop_instance_uid=ins.sop_instance_uid,
            study_instance_uid=ins.study_instance_uid,
            series_instance_uid=ins.series_instance_uid,
            sop_class_uid=ins.sop_class_uid,
            sha256=ins.sha256,
            path=str(path),
            message_id=env_id,
            source=self.name,
            header=header,
        )
        # The file first, then its index record: a record must never name a file that is not on disk. (The record
        # used to be made while the file was written, to overlap the two waits; when the write then failed, on a
        # full disk, the index kept a record of an instance answered 0xA700: ImagingStudy counted it, and a resend
        # with other bytes was "kept" in favour of a file that did not exist.)
        assert self._loop is not None
        try:
            write_durably(path, (file_meta(ins, ts, calling), raw))
        except TransientError as exc:
            telemetry.storage_failed(self.name, "file", f"{exc} (from {peer})")
            return OUT_OF_RESOURCES
        decided = asyncio.run_coroutine_threadsafe(self._decide(indexed, peer), self._loop)
        try:
            policy = decided.result(timeout=self.config.ack_timeout_seconds)
        except (TimeoutError, concurrent.futures.TimeoutError):
            policy = None
        if policy is None:
            return OUT_OF_RESOURCES
        doc = {
            **base,
            "study_instance_uid": ins.study_instance_uid,
            "series_instance_uid": ins.series_instance_uid,
            "path": str(path),
            "sha256": ins.sha256,
            "policy": policy,
            "header": ins.header,
        }
        # The study index flushes its record in this thread while the loop commits the journal: Success needs
        # both on disk, and the two flushes overlap instead of following each other.
        return self._bridge(self._submit_only(doc, peer, env_id), meanwhile=self.index.flush)

    def _store_unreadable(self, raw: bytes, base: dict[str, Any], reason: str, code: str, peer: str) -> int:
        """Keep the bytes and quarantine the message: nothing received is lost, and the sender learns not to
        resend it as it is."""
        digest = hashlib.sha256(raw).hexdigest()
        path = unreadable_path(self.root, digest)
        try:
            write_durably(path, (raw,))
        except TransientError as exc:
            telemetry.storage_failed(self.name, "file", f"{exc} (from {peer})")
            return OUT_OF_RESOURCES
        doc = {**base, "path": str(path), "sha256": digest, "error": reason, "error_code": code}
        return self._bridge(self._submit_only(doc, peer))

    def _bridge(self, coro: Any, meanwhile: Callable[[], None] | None = None) -> int:
        """Run ``coro`` on the event loop and return its status; ``meanwhile`` runs in this thread as it does, and
        its failure (GatewayError) makes the status 0xA700."""
        assert self._loop is not None
        future = asyncio.run_coroutine_threadsafe(coro, self._loop)
        failed = False
        if meanwhile is not None:
            try:
                meanwhile()
            except GatewayError as exc:
                telemetry.storage_failed(self.name, "index", str(exc))
                failed = True
        try:
            status = int(future.result(timeout=self.config.ack_timeout_seconds))
        except (TimeoutError, concurrent.futures.TimeoutError):
            # The commit itself is shielded and still completes; the sender resends and the dedup key answers.
            telemetry.journal_failed(self.name, f"no journal answer within {self.config.ack_timeout_seconds:g} s")
            return OUT_OF_RESOURCES
        return OUT_OF_RESOURCES if failed else status

    # -- on the event loop -----------------------------------------------------------------------------------

    def _envelope(self, doc: dict[str, Any], peer: str, env_id: str | None = None) -> Envelope:
        return Envelope(
            id=env_id or uuid7(),
            source=self.name,
            kind=InputKind.DICOM,
            received_at=datetime.now(UTC),
            payload=orjson.dumps(doc),
            peer=peer,
        )

    async def _submit_only(self, doc: dict[str, Any], peer: str, env_id: str | None = None) -> int:
        return status_for(await self.submitter.submit(self._envelope(doc, peer, env_id)))

    async def _decide(self, inst: IndexedInstance, peer: str) -> str | None:
        """The instance's policy outcome, recorded in the study index; None when the index is unavailable."""
        try:
            return await self.index.record(inst, self.config.duplicate_policy)
        except GatewayError as exc:
            telemetry.storage_failed(self.name, "index", f"{exc} (from {peer})")
            return None

    async def _aggregate(self) -> None:
        """Summarise studies that have been quiet for ``study_quiet_seconds`` into Patient + ImagingStudy."""
        quiet = self.config.study_quiet_seconds
        interval = min(1.0, quiet / 4)
        wait = interval
        while True:
            await asyncio.sleep(wait)
            # A failing round (the index or the journal cannot be written, e.g. a full disk) backs off up to 30 s:
            # it used to run again every half second, resubmitting the same summary each time.
            wait = min(30.0, wait * 2)
            try:
                for due in await self.index.due(quiet):
                    rows = await self.index.study_instances(due.study_instance_uid)
                    if rows:
                        summary = study_summary(due.study_instance_uid, rows)
                        env = self._envelope(summary, "study-aggregator")
                        result = await self.submitter.submit(env)
                        if result.outcome is Outcome.ERRORED:
                            break  # the journal is unavailable: try again on the next round
                        log.info(
                            "Summarised a quiet study from %s on %s: %d series, %d instances (%s).",
                            summary["calling_ae"] or "an unknown AE",
                            self.name,
                            len(summary["series"]),
                            sum(len(s["instances"]) for s in summary["series"]),
                            "a resend of the last summary" if result.duplicate else result.outcome.value,
                            extra={"source": self.name},
                        )
                    await self.index.mark_emitted(due.study_instance_uid, due.change_seq)
                else:
                    wait = interval  # every due study summarised (or none due): back to the normal pace
            except GatewayError as exc:
                log.warning("Summarising quiet studies on %s failed; it runs again in %.0f s: %s", self.name, wait, exc)
            except Exception as exc:  # the supervisor boundary: the aggregator must not end with one bad study
                telemetry.internal_error(f"Summarising quiet studies on {self.name} failed unexpectedly", exc)


def _ae_titles(assoc: Association) -> tuple[str, str]:
    """(calling, called) AE titles of the association request."""
    rq = assoc.requestor.primitive
    if rq is None:
        return "", ""
    return str(rq.calling_ae_title).strip(), str(rq.called_ae_title).strip()
