"""The resource store's search columns, computed from each resource when it is written.

Until migration s0003 the database computed these as generated columns over the JSON text. Measured on MariaDB
10.11 and SQLite 3.40, that was most of the cost of a write: every index on a generated column parses the
document again, twice on an update (the old entry and the new one). Here they are a few dictionary lookups on the
resource the sink already holds. The rules are the ones s0002 gave the database (docs/mysql.md), so the values are
the same, except that a JSON ``null`` is NULL on every database (MariaDB's JSON_UNQUOTE made it the text 'null').
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import orjson

Path = tuple[str | int, ...]

# Resource types that are not about one patient: no subject, no clinical code, no clinical date.
NOT_CLINICAL = frozenset(
    {
        "Patient", "Practitioner", "PractitionerRole", "Organization", "Location", "RelatedPerson", "Device",
        "Endpoint", "HealthcareService", "Group", "Bundle",
    }
)  # fmt: skip

_EFFECTIVE: dict[str | None, tuple[Path, ...]] = {
    "Observation": (("effectiveDateTime",), ("effectivePeriod", "start"), ("effectiveInstant",), ("issued",)),
    "DiagnosticReport": (("effectiveDateTime",), ("effectivePeriod", "start"), ("issued",)),
    "ServiceRequest": (("authoredOn",),),
    "MedicationRequest": (("authoredOn",),),
    "DeviceRequest": (("authoredOn",),),
    "NutritionOrder": (("authoredOn",),),
    "Immunization": (("occurrenceDateTime",), ("effectiveDateTime",)),
    "MedicationAdministration": (("occurrenceDateTime",), ("effectiveDateTime",)),
    "Encounter": (("period", "start"),),
    "EpisodeOfCare": (("period", "start"),),
    "Procedure": (("performedDateTime",), ("performedPeriod", "start")),
    "Condition": (("onsetDateTime",), ("recordedDate",)),
    "AllergyIntolerance": (("onsetDateTime",), ("recordedDate",)),
    "DocumentReference": (("date",),),
    "ImagingStudy": (("started",),),
    None: (("effectiveDateTime",), ("authoredOn",), ("occurrenceDateTime",), ("period", "start")),
}
_PATIENT_REF = (("patient", "reference"),)
COLUMNS: dict[str, tuple[int, bool, dict[str | None, tuple[Path, ...]]]] = {
    # name: (length, NULL for NOT_CLINICAL types, {resource type or None for any other: paths tried in order})
    "identifier_system": (255, False, {None: (("identifier", 0, "system"),)}),
    "identifier_value": (128, False, {None: (("identifier", 0, "value"),)}),
    "subject_ref": (
        128,
        True,
        {
            "Immunization": _PATIENT_REF,
            "AllergyIntolerance": _PATIENT_REF,
            "Coverage": _PATIENT_REF,
            "Account": _PATIENT_REF,
            None: (("subject", "reference"),),
        },
    ),
    "code_system": (255, True, {None: (("code", "coding", 0, "system"),)}),
    "code": (64, True, {None: (("code", "coding", 0, "code"),)}),
    "effective": (35, True, _EFFECTIVE),
}


def _at(doc: Any, path: Path) -> Any:
    for step in path:
        if isinstance(step, int):
            if not isinstance(doc, list) or len(doc) <= step:
                return None
        elif not isinstance(doc, dict):
            return None
        doc = doc[step] if isinstance(step, int) else doc.get(step)
        if doc is None:
            return None
    return doc


def _text(value: Any) -> str:
    # As JSON_UNQUOTE(JSON_EXTRACT(...)) gives it: a string as is, anything else as its JSON text.
    return value if isinstance(value, str) else orjson.dumps(value).decode()


def search_values(resource: Mapping[str, Any]) -> dict[str, str | None]:
    """The search columns of ``resource``, each cut to its column's length (a long value is cut, never
    refused: under strict SQL mode a too-long value would fail the whole batch's INSERT)."""
    rtype = str(resource.get("resourceType", ""))
    out: dict[str, str | None] = {}
    for name, (length, clinical, by_type) in COLUMNS.items():
        value = None
        if not (clinical and rtype in NOT_CLINICAL):
            for path in by_type.get(rtype, by_type[None]):
                found = _at(resource, path)
                if found is not None:
                    value = _text(found)[:length]
                    break
        out[name] = value
    return out
