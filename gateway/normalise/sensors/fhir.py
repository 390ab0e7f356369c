"""A checked sensor Document -> one transaction Bundle: a Device, then one Observation per reading.

Observations follow the FHIR R4 vital-signs profile (http://hl7.org/fhir/R4/vitalsigns.html): status final,
category vital-signs, the LOINC code the profile requires plus the device's MDC code, UCUM quantities, subject,
effective[x] and the device. Blood pressure is the 85354-9 panel with systolic and diastolic components and no
value of its own. Ids are deterministic (device + message id + position), so a redelivered reading updates the
same resources instead of adding twins.
"""

from __future__ import annotations

from typing import Any

from gateway.ids import resource_id

from .. import MapContext
from ..hl7v2.bundle import TransactionBundle, meta_for
from .codes import PROFILE_BASE, UCUM
from .payload import Document, Quantity, Reading

Json = dict[str, Any]

_CATEGORY = [
    {
        "coding": [
            {
                "system": "http://terminology.hl7.org/CodeSystem/observation-category",
                "code": "vital-signs",
                "display": "Vital Signs",
            }
        ],
        "text": "Vital Signs",
    }
]
_VITALSIGNS = PROFILE_BASE + "vitalsigns"


def device_id_for(device: str) -> str:
    return resource_id("Device", "mqtt", device)


def subject_for(doc: Document) -> Json:
    """A reference to the Patient. With an identifier system it points at the id the HL7 v2 mapping gives the
    same identifier (so readings join the Patient an ADT feed created); a bare patientId can only be a logical
    reference by identifier."""
    if doc.patient_system:
        pid = resource_id("Patient", "system", doc.patient_system, doc.patient_value)
        return {
            "reference": f"Patient/{pid}",
            "identifier": {"system": doc.patient_system, "value": doc.patient_value},
        }
    return {"identifier": {"value": doc.patient_value}}


def _quantity(q: Quantity) -> Json:
    return {"value": q.value, "unit": q.unit, "system": UCUM, "code": q.unit}


def _observation(reading: Reading, obs_id: str, subject: Json, device_ref: Json, source: str) -> Json:
    vital = reading.vital
    obs: Json = {
        "resourceType": "Observation",
        "id": obs_id,
        "meta": {"profile": [_VITALSIGNS, PROFILE_BASE + vital.profile], "source": source},
        "status": "final",
        "category": _CATEGORY,
        "code": {"coding": vital.coding(), "text": vital.loinc_display},
        "subject": subject,
    }
    eff = reading.effective
    if eff.at:
        obs["effectiveDateTime"] = eff.at
    else:
        obs["effectivePeriod"] = {"start": eff.start, "end": eff.end}
    obs["device"] = device_ref
    if reading.value is not None:
        obs["valueQuantity"] = _quantity(reading.value)
    if reading.components:
        obs["component"] = [
            {"code": {"coding": q.vital.coding(), "text": q.vital.loinc_display}, "valueQuantity": _quantity(q)}
            for q in reading.components
        ]
    if reading.note:
        obs["note"] = [{"text": reading.note}]
    return obs


def bundle_for(doc: Document, ctx: MapContext, reading_key: str) -> Json:
    """The Bundle for one payload. ``reading_key`` identifies the payload for the Observation ids (its message
    id, or the content hash when it has none)."""
    source = meta_for(ctx)
    bundle = TransactionBundle()
    dev_id = device_id_for(doc.device_id)
    bundle.add(
        {
            "resourceType": "Device",
            "id": dev_id,
            "meta": {"source": source},
            "identifier": [{"value": doc.device_id}],
            "status": "active",
        }
    )
    subject = subject_for(doc)
    device_ref = {"reference": f"Device/{dev_id}"}
    for i, reading in enumerate(doc.readings):
        obs_id = resource_id("Observation", "mqtt", doc.device_id, reading_key, str(i))
        bundle.add(_observation(reading, obs_id, subject, device_ref, source))
    return bundle.build()
