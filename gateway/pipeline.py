"""submit(envelope): parse, map, route, then commit to the journal; the Outcome decides the sender's reply.

Everything before the commit is pure CPU work on the message; nothing is acknowledged before the commit.
A message that cannot be parsed or mapped is still committed, as quarantined with its reason, and rejected.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import re
from collections.abc import Callable
from typing import Any

import orjson

from gateway import telemetry
from gateway.contracts import Envelope, InputKind, Outcome, RejectCode, SubmitResult
from gateway.errors import PermanentError, TransientError
from gateway.hl7v2.parse import HL7ParseError, Message, decode, parse
from gateway.journal import (
    STATUS_ACCEPTED,
    STATUS_NOT_MAPPED,
    STATUS_QUARANTINED,
    Journal,
    JournalRecord,
)
from gateway.normalise import MapContext, MappingError
from gateway.normalise.hl7v2 import map_hl7v2
from gateway.routing import Router

log = logging.getLogger(__name__)

# HL7 v2 versions we read (MSH-12.1). Anything else is answered AR 203 "unsupported version id".
SUPPORTED_HL7_VERSIONS = frozenset(
    [
        "2.1",
        "2.2",
        "2.3",
        "2.3.1",
        "2.4",
        "2.5",
        "2.5.1",
        "2.6",
        "2.7",
        "2.7.1",
        "2.8",
        "2.8.1",
        "2.8.2",
        "2.9",
    ]
)

_SEGMENT_BREAK = re.compile(r"\r\n|\n|\r")

# Messages larger than this are parsed and mapped in a worker thread so the event loop keeps serving.
EXECUTOR_THRESHOLD = 256 * 1024


class Rejected(Exception):
    def __init__(self, code: RejectCode, reason: str) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason


class Pipeline:
    """The core's one entry point for sources (implements gateway.contracts.Submitter)."""

    def __init__(
        self,
        journal: Journal,
        router: Router,
        *,
        validate_fhir: bool = False,
        hl7_strict: bool = False,
    ) -> None:
        self.journal = journal
        self.router = router
        self.validate_fhir = validate_fhir
        self.hl7_strict = hl7_strict
        self._validator: Callable[[dict[str, Any]], None] | None = None
        if validate_fhir:
            from gateway.normalise.validate import validate_bundle

            self._validator = validate_bundle

    async def submit(self, envelope: Envelope) -> SubmitResult:
        """Commit the envelope and say what the sender should hear.

        DELIVERED: committed (or a duplicate of a committed message). REJECTED: committed to quarantine, do
        not resend. ERRORED: nothing was committed (the journal is unavailable), resend later."""
        if len(envelope.payload) > EXECUTOR_THRESHOLD or self.hl7_strict:
            record = await asyncio.get_running_loop().run_in_executor(None, self.prepare, envelope)
        else:
            record = self.prepare(envelope)
        try:
            result = await self.journal.commit(record)
        except PermanentError as exc:
            # The database refused this record (e.g. a header field too long for its column): keep the raw
            # bytes in quarantine instead, so the sender is told AR, not to resend forever.
            record = _quarantined(envelope, {}, RejectCode.UNPARSEABLE, f"the journal refused the message: {exc}")
            try:
                result = await self.journal.commit(record)
            except (TransientError, PermanentError) as again:
                telemetry.journal_failed(envelope.source, str(again))
                return SubmitResult(Outcome.ERRORED, reason="journal unavailable, resend later")
        except TransientError as exc:
            telemetry.journal_failed(envelope.source, str(exc))
            return SubmitResult(Outcome.ERRORED, reason="journal unavailable, resend later")
        if result.duplicate:
            telemetry.duplicate(envelope.source, envelope.kind, envelope.peer)
            return SubmitResult(Outcome.DELIVERED, duplicate=True)
        telemetry.committed(envelope.source, envelope.kind, record.status)
        if record.status == STATUS_QUARANTINED:
            code = RejectCode(record.reject_code) if record.reject_code else RejectCode.UNPARSEABLE
            telemetry.quarantined(envelope.source, envelope.peer, code, record.error or "")
            return SubmitResult(Outcome.REJECTED, reason=record.error or "", code=code)
        return SubmitResult(Outcome.DELIVERED)

    def prepare(self, envelope: Envelope) -> JournalRecord:
        """Pure: decide everything about the envelope that gets committed with it."""
        if envelope.kind is InputKind.HL7V2:
            return self._prepare_hl7v2(envelope)
        raise TransientError(f"no normaliser for input kind {envelope.kind}")  # pragma: no cover

    def _prepare_hl7v2(self, env: Envelope) -> JournalRecord:
        msg: Message | None = None
        meta: dict[str, str] = {}
        try:
            try:
                msg = parse(env.payload)
            except HL7ParseError as exc:
                raise Rejected(RejectCode.NO_HEADER if exc.no_header else RejectCode.UNPARSEABLE, str(exc)) from None
            meta = _hl7_meta(msg)
            version = msg.version
            if version not in SUPPORTED_HL7_VERSIONS:
                raise Rejected(RejectCode.UNSUPPORTED_VERSION, "unsupported HL7 version in MSH-12")
            if not msg.message_type:
                raise Rejected(RejectCode.UNSUPPORTED_TYPE, "MSH-9 message type is missing")
            if self.hl7_strict:
                from gateway.hl7v2.strict import StrictValidationError, validate_strict

                try:
                    validate_strict(_SEGMENT_BREAK.sub("\r", decode(env.payload).lstrip("\ufeff").strip()))
                except StrictValidationError as exc:
                    raise Rejected(RejectCode.UNPARSEABLE, str(exc)) from None
            ctx = MapContext(message_id=env.id, source=env.source, received_at=env.received_at)
            try:
                bundle = map_hl7v2(msg, ctx)
            except MappingError as exc:
                raise Rejected(RejectCode.MAPPING_FAILED, f"cannot map: {exc}") from None
            if bundle is not None and self._validator is not None:
                try:
                    self._validator(bundle)
                except MappingError as exc:
                    raise Rejected(RejectCode.MAPPING_FAILED, f"mapped bundle is invalid: {exc}") from None
        except Rejected as rej:
            return _quarantined(env, meta, rej.code, rej.reason)
        except Exception as exc:  # a mapping bug must not take the listener down: quarantine and say so
            telemetry.internal_error(
                f"Mapping a message from {env.peer} on {env.source} failed unexpectedly",
                exc,
                source=env.source,
                peer=env.peer,
            )
            return _quarantined(env, meta, RejectCode.MAPPING_FAILED, f"internal mapping error ({type(exc).__name__})")
        mapped = bundle is not None
        destinations = self.router.destinations(
            source=env.source, kind=env.kind, message_type=meta["message_type"], mapped=mapped
        )
        control_id = meta["control_id"]
        dedup_key = _dedup_key(meta, env.payload) if control_id else None
        return JournalRecord(
            envelope=env,
            status=STATUS_ACCEPTED if mapped else STATUS_NOT_MAPPED,
            message_type=meta["message_type"],
            control_id=control_id,
            meta=meta,
            fhir=orjson.dumps(bundle) if bundle is not None else None,
            dedup_key=dedup_key,
            destinations=destinations,
            ordering_key=_patient_key(bundle),
        )


def _quarantined(env: Envelope, meta: dict[str, str], code: RejectCode, reason: str) -> JournalRecord:
    """Kept with its reason and its raw bytes, delivered nowhere, answered negatively."""
    return JournalRecord(
        envelope=env,
        status=STATUS_QUARANTINED,
        message_type=meta.get("message_type", ""),
        control_id=meta.get("control_id", ""),
        meta=meta,
        reject_code=code.value,
        error=reason,
    )


def _hl7_meta(msg: Message) -> dict[str, str]:
    """MSH fields kept as message metadata: routing and operations need them; none of them is PHI. Each is
    capped (MSH-10 at HL7's 199 characters, the others at 200) so a hostile header cannot overflow a column."""
    msh = msg.msh
    mt = msg.message_type
    trig = msg.trigger_event
    return {
        "message_type": (f"{mt}^{trig}" if trig else mt)[:32],
        "control_id": msg.control_id[:199],
        "version": msg.version[:20],
        "sending_application": msh.raw(3)[:200],
        "sending_facility": msh.raw(4)[:200],
        "receiving_application": msh.raw(5)[:200],
        "receiving_facility": msh.raw(6)[:200],
        "processing_id": msh.get(11)[:20],
    }


def _dedup_key(meta: dict[str, str], payload: bytes) -> str:
    """Sending application, facility and MSH-10, plus a hash of the content without MSH-7. A resend (the same
    message, perhaps with a new MSH-7 timestamp) has the same key and is acknowledged without a second copy; a
    different message under a reused control id (a sender whose counter restarted) has another key and is
    stored, instead of being acknowledged and dropped."""
    head, sep, rest = payload.partition(b"\r") if b"\r" in payload[:4096] else payload.partition(b"\n")
    fs = head[3:4] or b"|"
    fields = head.split(fs)
    if len(fields) > 6:
        fields[6] = b""  # MSH-7 (fields[0] is "MSH", fields[1] MSH-2)
    digest = hashlib.sha256(fs.join(fields) + sep + rest).hexdigest()[:32]
    who = f"hl7v2|{meta['sending_application']}|{meta['sending_facility']}|{meta['control_id']}"
    if len(who) > 200:  # keep the key within its column; the hash of the long part keeps it unique
        who = who[:160] + "|" + hashlib.sha256(who.encode()).hexdigest()[:32]
    return f"{who}|{digest}"


def _patient_key(bundle: dict[str, Any] | None) -> str:
    if not bundle:
        return ""
    for entry in bundle.get("entry", ()):
        res = entry.get("resource", {})
        if res.get("resourceType") == "Patient":
            return f"Patient/{res.get('id', '')}"
    return ""
