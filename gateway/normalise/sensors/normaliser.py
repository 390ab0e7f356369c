"""The Normaliser for ``InputKind.MQTT``: a sensor payload -> Prepared (meta, FHIR bundle, dedup key).

Meta holds what routing and operators need and nothing that identifies a patient: the topic (the rules match on
it), the device id, the payload format and the number of readings. The source puts the topic into the
envelope's metadata; a payload the source cut at its size limit arrives with ``truncated_from`` and is rejected
here, so it is still journaled (its first bytes) with the reason.
"""

from __future__ import annotations

import hashlib

from gateway.contracts import Envelope, RejectCode

from .. import MapContext, Prepared, Rejected
from .fhir import bundle_for
from .payload import Document, parse

MESSAGE_TYPES = {"reading-v1": "MQTT^reading-v1", "omh": "MQTT^omh"}


class SensorNormaliser:
    def offload(self, env: Envelope) -> bool:
        return False  # payloads are capped by the source (64 KiB by default): cheaper than a thread hop

    def prepare(self, env: Envelope) -> Prepared:
        meta = {"topic": env.metadata.get("topic", "")[:255]}
        if "truncated_from" in env.metadata:
            raise Rejected(
                RejectCode.TOO_LARGE,
                f"payload of {env.metadata['truncated_from']} bytes exceeds the limit of {len(env.payload)} bytes"
                " (its first bytes are kept)",
                meta,
            )
        try:
            doc = parse(env.payload)
        except Rejected as rej:
            raise Rejected(rej.code, rej.reason, meta) from None
        message_type = MESSAGE_TYPES[doc.format]
        meta.update(
            device_id=doc.device_id,
            format=doc.format,
            message_type=message_type,
            control_id=doc.message_id,
            readings=str(len(doc.readings)),
        )
        key = doc.message_id or content_hash(doc)
        ctx = MapContext(message_id=env.id, source=env.source, received_at=env.received_at)
        bundle = bundle_for(doc, ctx, key)
        return Prepared(
            message_type=message_type,
            control_id=doc.message_id,
            meta=meta,
            bundle=bundle,
            dedup_key=dedup_key(doc, key),
            ordering_key=f"Device/{bundle['entry'][0]['resource']['id']}",
        )


def content_hash(doc: Document) -> str:
    """For a payload without a message id: device, codes, times and values. The same reading sent twice has
    the same hash; two different readings do not."""
    h = hashlib.sha256(doc.device_id.encode())
    for r in doc.readings:
        parts = [r.vital.loinc, r.effective.key()]
        quantities = ([r.value] if r.value is not None else []) + list(r.components)
        parts += [f"{q.vital.loinc}={q.value!r}{q.unit}" for q in quantities]
        h.update(("\x1f" + "\x1e".join(parts)).encode())
    return "sha256:" + h.hexdigest()[:40]


def dedup_key(doc: Document, key: str) -> str:
    """``mqtt|<device id>|<message id or content hash>``: within the journal's 255-character column (device ids
    are at most 64 characters, message ids 128)."""
    return f"mqtt|{doc.device_id}|{key}"
