"""The DICOM forward destination: C-STORE SCU to a downstream PACS, the stored instance exactly as received.

Each outbox item of a DICOM source's instance message names its file (``path``) and the SHA-256 of its dataset;
the sink reads the file, checks the hash, and sends the dataset in its own transfer syntax (no transcoding).
Other DICOM messages (study summaries, conflicting copies kept aside) have nothing to forward and are done.

Errors: a failed association, a network error, or a 0xA7xx status (the PACS is out of resources) is transient
(retried with backoff); a missing or changed file, a PACS that does not accept the SOP class or transfer syntax,
or a failure status other than 0xA7xx is permanent (dead letter, with the status in the reason).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import socket
import ssl
import threading
import time
from pathlib import Path
from typing import Any

import orjson
from pynetdicom import AE, _config, evt
from pynetdicom.association import Association

from gateway.contracts import OutboxItem
from gateway.errors import PermanentError, TransientError
from gateway.normalise.dicom import INSTANCE_FORMAT, POLICY_KEPT, POLICY_REJECTED
from gateway.tls import client_context

from . import sockets  # noqa: F401  (closes association sockets whose peer is gone)
from .config import DicomForwardConfig

log = logging.getLogger(__name__)

# Send a file's dataset bytes as they are stored (pynetdicom reads them from the file in chunks) instead of
# decoding and re-encoding them: what the PACS receives is byte for byte what the modality sent.
_config.STORE_SEND_CHUNKED_DATASET = True


class DicomForwardSink:
    def __init__(self, name: str, config: DicomForwardConfig) -> None:
        self.name = name
        self.config = config
        self._lock = threading.Lock()  # one association, used by one delivery at a time
        self._assoc: Association | None = None
        self._contexts: set[tuple[str, str]] = set()
        self._last_used = 0.0
        self._socket: socket.socket | None = None
        self._ssl: ssl.SSLContext | None = None

    async def start(self) -> None:
        if self.config.tls is not None:
            self._ssl = client_context(self.config.tls)  # reads the files: ConfigError names a bad one

    async def close(self) -> None:
        await asyncio.to_thread(self._release)

    async def deliver(self, item: OutboxItem) -> None:
        try:
            doc = orjson.loads(item.raw)
        except orjson.JSONDecodeError:
            raise PermanentError(f"destination {self.name}: the message is not a DICOM instance descriptor") from None
        if not isinstance(doc, dict) or doc.get("format") != INSTANCE_FORMAT or doc.get("error"):
            return  # a study summary or a quarantined instance: nothing to forward
        if doc.get("policy") in (POLICY_KEPT, POLICY_REJECTED):
            return
        await asyncio.to_thread(self._send, doc)

    # -- in a worker thread ----------------------------------------------------------------------------------

    def _send(self, doc: dict[str, Any]) -> None:
        path = Path(str(doc.get("path", "")))
        try:
            data = path.read_bytes()
        except OSError as exc:
            why = exc.strerror or type(exc).__name__
            raise PermanentError(f"destination {self.name}: the stored instance cannot be read ({why})") from None
        dataset_bytes = data[_end_of_meta(data) :]
        if hashlib.sha256(dataset_bytes).hexdigest() != doc.get("sha256"):
            raise PermanentError(f"destination {self.name}: the stored instance does not match its hash")
        sop_class = str(doc.get("sop_class_uid", ""))
        ts = str(doc.get("transfer_syntax", ""))
        with self._lock:
            assoc = self._association(sop_class, ts)
            cx_ok = any(
                cx.abstract_syntax == sop_class and cx.transfer_syntax[0] == ts for cx in assoc.accepted_contexts
            )
            if not cx_ok:
                raise PermanentError(
                    f"destination {self.name}: the PACS does not accept this SOP class in transfer syntax {ts}"
                )
            try:
                status = assoc.send_c_store(path)
            except (OSError, RuntimeError, ValueError) as exc:
                self._drop()
                raise TransientError(f"destination {self.name}: C-STORE failed ({type(exc).__name__})") from exc
            self._last_used = time.monotonic()
            if not status or "Status" not in status:
                self._drop()
                raise TransientError(f"destination {self.name}: no C-STORE response (timeout or abort)")
            code = int(status.Status)
        if code == 0x0000 or 0xB000 <= code <= 0xBFFF:
            return
        if 0xA700 <= code <= 0xA7FF:
            raise TransientError(f"destination {self.name}: the PACS is out of resources (status {code:#06x})")
        raise PermanentError(f"destination {self.name}: the PACS refused the instance (status {code:#06x})")

    def _association(self, sop_class: str, ts: str) -> Association:
        """The open association, or a new one proposing every (SOP class, transfer syntax) seen so far."""
        idle = time.monotonic() - self._last_used > self.config.idle_close_seconds
        if self._assoc is not None and (not self._assoc.is_established or idle):
            self._drop()
        if self._assoc is not None and (sop_class, ts) not in self._contexts:
            self._release()
        self._contexts.add((sop_class, ts))
        if self._assoc is not None:
            return self._assoc
        # pynetdicom leaks its socket when the connection is refused: find out first, with a socket we close.
        try:
            socket.create_connection((self.config.host, self.config.port), self.config.acse_timeout_seconds).close()
        except OSError as exc:
            why = exc.strerror or type(exc).__name__
            raise TransientError(f"destination {self.name}: the PACS cannot be reached ({why})") from None
        ae = AE(ae_title=self.config.calling_ae)
        ae.acse_timeout = self.config.acse_timeout_seconds
        ae.dimse_timeout = self.config.dimse_timeout_seconds
        ae.network_timeout = self.config.network_timeout_seconds
        ae.maximum_pdu_size = self.config.max_pdu_bytes
        # One presentation context per (SOP class, transfer syntax), at most 128 (PS3.8: odd ids 1..255).
        for cls, syntax in sorted(self._contexts)[-128:]:
            ae.add_requested_context(cls, [syntax])
        assoc = ae.associate(
            self.config.host,
            self.config.port,
            ae_title=self.config.called_ae,
            evt_handlers=[(evt.EVT_CONN_OPEN, self._on_open)],
            tls_args=self._tls_args(),
        )
        if not assoc.is_established:
            why = "rejected the association" if assoc.is_rejected else "could not be reached or aborted"
            raise TransientError(f"destination {self.name}: the PACS {why}")
        self._assoc = assoc
        self._last_used = time.monotonic()
        return assoc

    def _tls_args(self) -> tuple[ssl.SSLContext, str] | None:
        if self.config.tls is None:
            return None
        if self._ssl is None:
            self._ssl = client_context(self.config.tls)
        return self._ssl, self.config.tls.server_hostname or self.config.host

    def _on_open(self, event: evt.Event) -> None:
        sock = getattr(event.assoc.dul.socket, "socket", None)
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self._socket = sock

    def _release(self) -> None:
        if self._assoc is not None and self._assoc.is_established:
            try:
                self._assoc.release()
            except Exception as exc:  # releasing a broken association: nothing left to do with it
                log.debug("Releasing the association of %s failed: %s", self.name, type(exc).__name__)
        self._close()

    def _drop(self) -> None:
        if self._assoc is not None and self._assoc.is_established:
            self._assoc.abort()
        self._close()

    def _close(self) -> None:
        # pynetdicom leaves the socket open when the peer reset the connection (its shutdown() raises before
        # its close()): a PACS that keeps dropping us must not cost a file descriptor per attempt.
        self._assoc = None
        if self._socket is not None:
            self._socket.close()
            self._socket = None


def _end_of_meta(data: bytes) -> int:
    """Offset of the dataset in a Part 10 file written by the source: after the preamble, "DICM" and the meta
    group, whose length (0002,0000) is the first element."""
    if data[128:132] != b"DICM" or data[132:136] != b"\x02\x00\x00\x00":
        raise PermanentError("the stored file has no File Meta Information group length")
    group_length = int.from_bytes(data[140:144], "little")
    return 144 + group_length
