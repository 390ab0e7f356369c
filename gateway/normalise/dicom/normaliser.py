"""The DICOM normaliser: instance descriptors and study summaries (see ``gateway.normalise.dicom``).

An instance descriptor is journaled unmapped (``bundle=None``) under message type ``DICOM^<modality>``, so
routes can send it to a DICOM forward destination; a study summary is mapped to Patient + ImagingStudy under
``IMAGINGSTUDY^<modality>``. Meta carries only routing facts (AE titles, modality, UIDs, transfer syntax),
never patient data.
"""

from __future__ import annotations

import hashlib
from typing import Any

import orjson

from gateway.contracts import Envelope, RejectCode

from .. import MapContext, MappingError, Prepared, Rejected
from . import INSTANCE_FORMAT, POLICY_KEPT, POLICY_REJECTED, STUDY_FORMAT
from .mapping import map_study


class DicomNormaliser:
    def offload(self, env: Envelope) -> bool:
        # A study summary of a large study (thousands of instances) is worth a worker thread.
        return len(env.payload) > 256 * 1024

    def prepare(self, env: Envelope) -> Prepared:
        try:
            doc = orjson.loads(env.payload)
        except orjson.JSONDecodeError:
            raise Rejected(RejectCode.UNPARSEABLE, "the DICOM payload is not a gateway descriptor") from None
        if not isinstance(doc, dict):
            raise Rejected(RejectCode.UNPARSEABLE, "the DICOM payload is not a gateway descriptor")
        fmt = doc.get("format")
        if fmt == INSTANCE_FORMAT:
            return self._instance(doc)
        if fmt == STUDY_FORMAT:
            return self._study(env, doc)
        raise Rejected(RejectCode.UNPARSEABLE, "unknown DICOM descriptor format")

    @staticmethod
    def _instance(doc: dict[str, Any]) -> Prepared:
        header = doc.get("header") or {}
        modality = _token(header.get("Modality")) or "OT"
        sop_uid = str(doc.get("sop_instance_uid") or "")
        meta = {
            "message_type": f"DICOM^{modality}",
            "control_id": sop_uid,
            "calling_ae": str(doc.get("calling_ae") or ""),
            "called_ae": str(doc.get("called_ae") or ""),
            "modality": modality,
            "sop_class_uid": str(doc.get("sop_class_uid") or ""),
            "study_instance_uid": str(doc.get("study_instance_uid") or ""),
            "series_instance_uid": str(doc.get("series_instance_uid") or ""),
            "transfer_syntax": str(doc.get("transfer_syntax") or ""),
            "policy": str(doc.get("policy") or ""),
        }
        error = doc.get("error")
        if error:
            code = (
                RejectCode.UNSUPPORTED_TYPE if doc.get("error_code") == "sop-class-mismatch" else RejectCode.UNPARSEABLE
            )
            raise Rejected(code, str(error), meta)
        policy = meta["policy"]
        if policy == POLICY_REJECTED:
            raise Rejected(RejectCode.CONFLICT, "this SOP Instance UID is already stored with different content", meta)
        digest = str(doc.get("sha256") or "")
        return Prepared(
            # A conflicting copy kept aside is journaled (nothing is lost) but not routed as the instance.
            message_type=f"DICOM-KEPT^{modality}" if policy == POLICY_KEPT else meta["message_type"],
            control_id=sop_uid,
            meta=meta,
            bundle=None,
            # Same UID and same bytes: a resend, acknowledged without a second copy.
            dedup_key=f"dicom|{sop_uid}|{digest[:64]}" if sop_uid and digest else None,
        )

    @staticmethod
    def _study(env: Envelope, doc: dict[str, Any]) -> Prepared:
        series = doc.get("series") or []
        modalities = []
        for s in series:
            m = _token((s.get("header") or {}).get("Modality")) or "OT"
            if m not in modalities:
                modalities.append(m)
        modality = modalities[0] if modalities else "OT"
        study_uid = str(doc.get("study_instance_uid") or "")
        meta = {
            "message_type": f"IMAGINGSTUDY^{modality}",
            "control_id": study_uid,
            "calling_ae": str(doc.get("calling_ae") or ""),
            "called_ae": str(doc.get("called_ae") or ""),
            "modality": modality,
            "modalities": "\\".join(modalities)[:200],
            "study_instance_uid": study_uid,
            "series": str(len(series)),
            "instances": str(sum(len(s.get("instances") or []) for s in series)),
        }
        ctx = MapContext(message_id=env.id, source=env.source, received_at=env.received_at)
        try:
            bundle = map_study(doc, ctx)
        except MappingError as exc:
            raise Rejected(RejectCode.MAPPING_FAILED, f"cannot map: {exc}", meta) from None
        # The same summary emitted twice (a restart between emitting and recording it) is one message.
        digest = hashlib.sha256(orjson.dumps(doc, option=orjson.OPT_SORT_KEYS)).hexdigest()[:32]
        return Prepared(
            message_type=meta["message_type"],
            control_id=study_uid,
            meta=meta,
            bundle=bundle,
            dedup_key=f"dicom-study|{study_uid}|{digest}" if study_uid else None,
        )


def _token(value: object) -> str:
    """A modality code safe for a message type (CS: upper case, digits, space, underscore; 16 characters)."""
    if not isinstance(value, str):
        return ""
    v = value.strip().upper()
    return v[:16] if v and all(c.isalnum() or c in " _" for c in v) else ""
