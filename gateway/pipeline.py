"""submit(envelope): normalise, route, then commit to the journal; the Outcome decides the sender's reply.

Everything before the commit is pure CPU work on the message; nothing is acknowledged before the commit.
A message that cannot be parsed or mapped is still committed, as quarantined with its reason, and rejected.

Each input kind has a :class:`~gateway.normalise.Normaliser` (HL7 v2 here, DICOM and MQTT in their own
packages): it turns an envelope into a :class:`~gateway.normalise.Prepared` (header facts, the FHIR bundle, the
dedup key) or raises :class:`~gateway.normalise.Rejected`. What follows is the same for every kind: optional
FHIR validation, routing, and one journal record.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import Callable, Mapping
from typing import Any

import orjson

from gateway import telemetry
from gateway.contracts import Envelope, InputKind, Outcome, RejectCode, SubmitResult
from gateway.errors import PermanentError, TransientError
from gateway.journal import (
    STATUS_ACCEPTED,
    STATUS_NOT_MAPPED,
    STATUS_QUARANTINED,
    Journal,
    JournalRecord,
)
from gateway.normalise import MappingError, Normaliser, Prepared, Rejected
from gateway.normalise.hl7v2.normaliser import SUPPORTED_HL7_VERSIONS, Hl7v2Normaliser
from gateway.routing import RESOURCE_TYPES_META, STATUS_DROPPED, Router, encode_restrictions

__all__ = ["SUPPORTED_HL7_VERSIONS", "Pipeline", "Rejected"]

log = logging.getLogger(__name__)


class Pipeline:
    """The core's one entry point for sources (implements gateway.contracts.Submitter)."""

    def __init__(
        self,
        journal: Journal,
        router: Router,
        *,
        normalisers: Mapping[InputKind, Normaliser] | None = None,
        validate_fhir: bool = False,
        hl7_strict: bool = False,
    ) -> None:
        self.journal = journal
        self.router = router
        self.validate_fhir = validate_fhir
        self.normalisers: dict[InputKind, Normaliser] = {InputKind.HL7V2: Hl7v2Normaliser(strict=hl7_strict)}
        self.normalisers.update(normalisers or {})
        self._validator: Callable[[dict[str, Any]], None] | None = None
        if validate_fhir:
            from gateway.normalise.validate import validate_bundle

            self._validator = validate_bundle

    async def submit(self, envelope: Envelope) -> SubmitResult:
        """Commit the envelope and say what the sender should hear.

        DELIVERED: committed (or a duplicate of a committed message). REJECTED: committed to quarantine, do
        not resend. ERRORED: nothing was committed (the journal is unavailable), resend later."""
        normaliser = self.normalisers.get(envelope.kind)
        if normaliser is not None and normaliser.offload(envelope):
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
            # An MQTT reading's sender is its topic (the peer is the broker): the topic goes into the log line.
            topic = (envelope.metadata or {}).get("topic")
            where = f"{envelope.peer} (topic {topic})" if topic else envelope.peer
            telemetry.quarantined(envelope.source, where, code, record.error or "")
            return SubmitResult(Outcome.REJECTED, reason=record.error or "", code=code)
        return SubmitResult(Outcome.DELIVERED)

    def prepare(self, env: Envelope) -> JournalRecord:
        """Pure: decide everything about the envelope that gets committed with it."""
        normaliser = self.normalisers.get(env.kind)
        if normaliser is None:
            return _quarantined(env, {}, RejectCode.UNSUPPORTED_TYPE, f"no normaliser for input kind {env.kind}")
        try:
            prepared = normaliser.prepare(env)
            if prepared.bundle is not None and self._validator is not None:
                try:
                    self._validator(prepared.bundle)
                except MappingError as exc:
                    raise Rejected(
                        RejectCode.MAPPING_FAILED, f"mapped bundle is invalid: {exc}", prepared.meta
                    ) from None
        except Rejected as rej:
            return _quarantined(env, rej.meta, rej.code, rej.reason)
        except Exception as exc:  # a mapping bug must not take the listener down: quarantine and say so
            telemetry.internal_error(
                f"Mapping a message from {env.peer} on {env.source} failed unexpectedly",
                exc,
                source=env.source,
                peer=env.peer,
            )
            return _quarantined(env, {}, RejectCode.MAPPING_FAILED, f"internal mapping error ({type(exc).__name__})")
        return self.record(env, prepared)

    def record(self, env: Envelope, prepared: Prepared) -> JournalRecord:
        """Route a prepared message and make its journal record. The router is read once: a rule set swapped
        in by a reload applies to the next message, never to half of this one."""
        decision = self.router.route(env, prepared)
        mapped = prepared.bundle is not None
        fhir = orjson.dumps(prepared.bundle) if prepared.bundle is not None else None
        meta = prepared.meta
        if decision.action == "quarantine":
            telemetry.route_action("quarantine", env.source, env.peer, decision.routes[-1], decision.reason)
            record = _quarantined(env, meta, RejectCode.UNSUPPORTED_TYPE, f"quarantined by rule: {decision.reason}")
            return dataclasses.replace(
                record, message_type=prepared.message_type, control_id=prepared.control_id, fhir=fhir
            )
        if decision.action == "drop":
            telemetry.route_action("drop", env.source, env.peer, decision.routes[-1], decision.reason)
            status = STATUS_DROPPED
        else:
            status = STATUS_ACCEPTED if mapped else STATUS_NOT_MAPPED
        if decision.resource_types:
            meta = {**meta, RESOURCE_TYPES_META: encode_restrictions(decision.resource_types)}
        return JournalRecord(
            envelope=env,
            status=status,
            message_type=prepared.message_type,
            control_id=prepared.control_id,
            meta=meta,
            fhir=fhir,
            dedup_key=decision.dedup_key,
            dedup_window=decision.dedup_window,
            destinations=decision.destinations,
            ordering_key=prepared.ordering_key or _patient_key(prepared.bundle),
            error=decision.reason or None,
        )


def _quarantined(env: Envelope, meta: Mapping[str, str], code: RejectCode, reason: str) -> JournalRecord:
    """Kept with its reason and its raw bytes, delivered nowhere, answered negatively."""
    return JournalRecord(
        envelope=env,
        status=STATUS_QUARANTINED,
        message_type=meta.get("message_type", ""),
        control_id=meta.get("control_id", ""),
        meta=dict(meta),
        reject_code=code.value,
        error=reason,
    )


def _patient_key(bundle: dict[str, Any] | None) -> str:
    if not bundle:
        return ""
    for entry in bundle.get("entry", ()):
        res = entry.get("resource", {})
        if res.get("resourceType") == "Patient":
            return f"Patient/{res.get('id', '')}"
    return ""
