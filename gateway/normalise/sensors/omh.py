"""Open mHealth data points (https://www.openmhealth.org/) for five vital signs.

A data point is ``{"header": {...}, "body": {...}}``. The header says what the body is (``schema_id``: namespace
``omh``, name, version) and carries the point's ``id`` (the dedup key). An OmH body names no patient and no
device, so the gateway reads them from the data point as follows (docs/mqtt.md):

- device: top-level ``deviceId``, else ``header.acquisition_provenance.source_name``;
- patient: top-level ``patient`` (system and value) or ``patientId``, else ``header.user_id``;
- time: the body's ``effective_time_frame``, else the top-level ``effective`` (OmH 1.x bodies may have none, the
  FHIR vital-signs profile needs one).

The rules of each schema version that the Open mHealth test data exercises are checked here: units, the
required time frame from the versions that require it, the value sets of the descriptive fields, and the
``date`` + ``part_of_day`` time interval that only the 1.x time frame allows.
"""

from __future__ import annotations

from typing import Any

from gateway.contracts import RejectCode

from .. import Rejected
from .codes import BODY_TEMP, BP_PANEL, DIASTOLIC, HEART_RATE, O2_FLOW, RESP_RATE, SPO2, SYSTOLIC, Vital
from .payload import Document, Effective, Quantity, Reading, date_time, invalid, number, token

# name -> (body key of the value, vital, {OmH unit: UCUM unit}, first version that requires effective_time_frame)
_MEASURES: dict[str, tuple[str, Vital, dict[str, str], int]] = {
    "heart-rate": ("heart_rate", HEART_RATE, {"beats/min": "/min"}, 2),
    "oxygen-saturation": ("oxygen_saturation", SPO2, {"%": "%"}, 2),
    "respiratory-rate": ("respiratory_rate", RESP_RATE, {"breaths/min": "/min"}, 2),
    "body-temperature": ("body_temperature", BODY_TEMP, {"C": "Cel", "F": "[degF]", "K": "K"}, 3),
    "blood-pressure": ("systolic_blood_pressure", BP_PANEL, {"mmHg": "mm[Hg]"}, 3),
}
_ACTIVITY = frozenset({"at rest", "active", "before exercise", "during exercise", "after exercise"})
_SLEEP = frozenset({"before sleeping", "during sleep", "on waking"})
_STATISTIC = frozenset(
    {
        "average", "count", "maximum", "median", "minimum", "standard deviation", "sum", "variance",
        "20th percentile", "80th percentile", "lower quartile", "upper quartile", "quartile deviation",
        "1st quintile", "2nd quintile", "3rd quintile", "4th quintile",
    }
)  # fmt: skip
_POSTURE = frozenset({"sitting", "lying down", "standing", "sleeping", "semi-recumbent"})
_PART_OF_DAY = frozenset({"morning", "afternoon", "evening", "night"})
_ENUMS = {
    "temporal_relationship_to_physical_activity": _ACTIVITY,
    "temporal_relationship_to_sleep": _SLEEP,
    "descriptive_statistic": _STATISTIC,
    "body_posture": _POSTURE,
    "position_during_measurement": _POSTURE,
    "system": frozenset({"peripheral capillary"}),
    "measurement_method": frozenset({"pulse oximetry"}),
    "oxygen_therapy_mode_of_administration": frozenset({"nasal cannula"}),
}
_TEMP_LOCATIONS = frozenset(
    {"axillary", "finger", "forehead", "oral", "rectal", "temporal artery", "toe", "tympanic", "wrist", "vagina"}
)
_TOP_KEYS = frozenset({"header", "body", "deviceId", "patientId", "patient", "effective"})


def parse_data_point(data: dict[str, Any]) -> Document:
    extra = data.keys() - _TOP_KEYS
    if extra:
        raise invalid(f"unknown key {sorted(extra)[0]!r} beside an Open mHealth header and body")
    header, body = data["header"], data["body"]
    if not isinstance(header, dict) or not isinstance(body, dict):
        raise invalid("Open mHealth header and body must be objects")
    schema = header.get("schema_id")
    if not isinstance(schema, dict) or schema.get("namespace") != "omh":
        raise invalid("header.schema_id must name an Open mHealth (namespace omh) schema")
    name, version = schema.get("name"), schema.get("version")
    if name not in _MEASURES:
        raise Rejected(
            RejectCode.UNKNOWN_CODE, f"Open mHealth schema {str(name)[:40]!r} is not one of {', '.join(_MEASURES)}"
        )
    if not isinstance(version, str) or not version.partition(".")[0].isdigit():
        raise invalid("header.schema_id.version must be a version such as 2.0")
    major = int(version.partition(".")[0])
    message_id = token(header, "id", "header.", 128, required=False)
    provenance = header.get("acquisition_provenance")
    if "deviceId" in data:
        device = token(data, "deviceId", "", 64)
    elif isinstance(provenance, dict) and "source_name" in provenance:
        device = token(provenance, "source_name", "header.acquisition_provenance.", 64)
    else:
        raise invalid("no device: give deviceId or header.acquisition_provenance.source_name")
    system, patient = _patient(data, header)
    fallback = date_time(data["effective"], "effective") if "effective" in data else ""
    reading = _body(name, major, body, fallback)
    return Document("omh", device, system, patient, message_id, [reading])


def _patient(data: dict[str, Any], header: dict[str, Any]) -> tuple[str, str]:
    if "patient" in data:
        p = data["patient"]
        if not isinstance(p, dict) or p.keys() != {"system", "value"} or not isinstance(p["system"], str):
            raise invalid("patient must be an object with exactly system and value")
        if not 1 <= len(p["system"]) <= 255 or any(c.isspace() for c in p["system"]):
            raise invalid("patient.system must be a URI of 1 to 255 characters")
        return p["system"], token(p, "value", "patient.", 64)
    if "patientId" in data:
        return "", token(data, "patientId", "", 64)
    if "user_id" in header:
        return "", token(header, "user_id", "header.", 64)
    raise invalid("no patient: give patient, patientId or header.user_id")


def _body(name: str, major: int, body: dict[str, Any], fallback: str) -> Reading:
    key, vital, units, _ = _MEASURES[name]
    for field, allowed in _ENUMS.items():
        if field in body and body[field] not in allowed:
            raise invalid(f"body.{field} is not one of the Open mHealth values")
    if name == "body-temperature" and body.get("measurement_location", "oral") not in _TEMP_LOCATIONS:
        raise invalid("body.measurement_location is not one of the Open mHealth values")
    note = (
        f"Open mHealth descriptive statistic: {body['descriptive_statistic']}"
        if "descriptive_statistic" in body
        else ""
    )
    if vital is BP_PANEL:
        systolic = _unit_value(body, "systolic_blood_pressure", SYSTOLIC, units)
        diastolic = _unit_value(body, "diastolic_blood_pressure", DIASTOLIC, units)
        return Reading(vital, _effective(name, major, body, fallback), components=(systolic, diastolic), note=note)
    value = _unit_value(body, key, vital, units)
    components: tuple[Quantity, ...] = ()
    if name == "oxygen-saturation" and "supplemental_oxygen_flow_rate" in body:
        components = (_unit_value(body, "supplemental_oxygen_flow_rate", O2_FLOW, {"L/min": "L/min"}),)
    if value.unit == "K":  # the FHIR body temperature profile knows Cel and [degF] only
        value = Quantity(vital, round(float(value.value) - 273.15, 4), "Cel")
    return Reading(vital, _effective(name, major, body, fallback), value=value, components=components, note=note)


def _effective(name: str, major: int, body: dict[str, Any], fallback: str) -> Effective:
    if "effective_time_frame" in body:
        return _time_frame(body["effective_time_frame"], major)
    if major >= _MEASURES[name][3]:
        raise invalid(f"body.effective_time_frame is required by {name} {major}.x")
    if fallback:
        return Effective(at=fallback)
    raise invalid("no time: the body has no effective_time_frame and the data point no effective")


def _unit_value(body: dict[str, Any], key: str, vital: Vital, units: dict[str, str]) -> Quantity:
    uv = body.get(key)
    if not isinstance(uv, dict) or "value" not in uv or "unit" not in uv:
        raise invalid(f"body.{key} is required, with value and unit")
    value = number(uv["value"], f"body.{key}.value")
    if value < 0:
        raise invalid(f"body.{key}.value must not be negative")
    ucum = units.get(uv["unit"]) if isinstance(uv["unit"], str) else None
    if ucum is None:
        raise invalid(f"body.{key}.unit is not an Open mHealth unit of it ({', '.join(units)})")
    return Quantity(vital, value, ucum)


def _time_frame(tf: Any, major: int) -> Effective:
    if not isinstance(tf, dict) or len(tf) != 1:
        raise invalid("body.effective_time_frame must have exactly one of date_time and time_interval")
    if "date_time" in tf:
        return Effective(at=date_time(tf["date_time"], "body.effective_time_frame.date_time"))
    ti = tf.get("time_interval")
    if not isinstance(ti, dict):
        raise invalid("body.effective_time_frame must have exactly one of date_time and time_interval")
    where = "body.effective_time_frame.time_interval"
    if ti.keys() == {"start_date_time", "end_date_time"}:
        start = date_time(ti["start_date_time"], f"{where}.start_date_time")
        end = date_time(ti["end_date_time"], f"{where}.end_date_time")
        if _instant(end) < _instant(start):
            # FHIR Period invariant per-1: the start is not after the end.
            raise invalid(f"{where} ends before it starts")
        return Effective(start=start, end=end)
    if ti.keys() == {"date", "part_of_day"} and major == 1:
        date = ti["date"]
        if not isinstance(date, str) or len(date) != 10 or ti["part_of_day"] not in _PART_OF_DAY:
            raise invalid(f"{where} has an invalid date or part_of_day")
        try:
            _instant(date + "T00:00:00Z")
        except Rejected:
            raise invalid(f"{where}.date is not a valid date") from None
        return Effective(at=date)  # FHIR dateTime at day precision; the part of day has no FHIR field
    raise invalid(f"{where} must have start_date_time and end_date_time (durations are not supported)")


def _instant(text: str) -> float:
    from datetime import datetime

    try:
        return datetime.fromisoformat(text.replace("Z", "+00:00")[:19] + text.replace("Z", "+00:00")[-6:]).timestamp()
    except ValueError:
        raise invalid("not a valid date-time") from None
