"""Reading an MQTT sensor payload: JSON bytes -> a checked :class:`Document`, or :class:`Rejected` with the reason.

Two formats are accepted, told apart by their keys:

- the gateway's own contract, ``reading-v1.schema.json`` (next to this file): ``deviceId``, ``patientId`` or
  ``patient``, ``effective``, ``readings``;
- an Open mHealth data point (``header`` + ``body``) for heart rate, blood pressure, oxygen saturation, body
  temperature and respiratory rate (see :mod:`.omh`).

The JSON Schema file is the contract; it is checked here by hand because a generic validator costs more per
message than everything else on the ingest path (tests/unit/test_sensor_schema.py proves the two agree on
valid and invalid examples). Reasons name the field and the rule, never the value: a value may be a patient
identifier.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import orjson

from gateway.contracts import RejectCode

from .. import Rejected
from .codes import BP_PANEL, BY_CODE, COMPONENT_BY_CODE, DIASTOLIC, LOINC, MDC, MEAN_BP, SYSTOLIC, Vital

_DATETIME = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}(\.[0-9]{1,9})?(Z|[+-][0-9]{2}:[0-9]{2})")
_LOCAL_TIME = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}[T ][0-9]{2}:[0-9]{2}(:[0-9]{2}(\.[0-9]+)?)?")
_TOKEN = re.compile(r"[\x21-\x7e]+")
_NO_SPACE = re.compile(r"\S+")
_SYSTEMS = (MDC, LOINC)

_TOP_KEYS = frozenset({"version", "messageId", "deviceId", "patientId", "patient", "effective", "readings"})
_READING_KEYS = frozenset({"code", "value", "unit", "components", "systolic", "diastolic", "mean", "effective"})


@dataclass(frozen=True, slots=True)
class Quantity:
    vital: Vital
    value: float | int
    unit: str


@dataclass(frozen=True, slots=True)
class Effective:
    """When a reading was taken: one instant (``at``) or a period (``start``, ``end``). FHIR dateTime text."""

    at: str = ""
    start: str = ""
    end: str = ""

    def key(self) -> str:
        return self.at or f"{self.start}/{self.end}"


@dataclass(frozen=True, slots=True)
class Reading:
    vital: Vital
    effective: Effective
    value: Quantity | None = None  # a simple vital
    components: tuple[Quantity, ...] = ()  # blood pressure
    note: str = ""  # e.g. an Open mHealth descriptive statistic: the value is a minimum, not a single reading


@dataclass(slots=True)
class Document:
    """One payload, checked: who, which device, what was measured."""

    format: str  # "reading-v1" | "omh"
    device_id: str
    patient_system: str  # "" when the payload gave a bare patientId
    patient_value: str
    message_id: str = ""
    readings: list[Reading] = field(default_factory=list)


def invalid(reason: str) -> Rejected:
    return Rejected(RejectCode.INVALID_PAYLOAD, reason)


def load_json(payload: bytes) -> Any:
    try:
        return orjson.loads(payload)
    except orjson.JSONDecodeError as exc:
        # orjson's message names the position and the rule (NaN and Infinity are not JSON), not the text.
        raise Rejected(RejectCode.UNPARSEABLE, f"payload is not JSON: {str(exc).split(':')[0]}") from None


def token(obj: dict[str, Any], key: str, where: str, max_len: int, required: bool = True) -> str:
    v = obj.get(key)
    if v is None:
        if required:
            raise invalid(f"{where}{key} is required")
        return ""
    if not isinstance(v, str) or not 1 <= len(v) <= max_len or not _TOKEN.fullmatch(v):
        raise invalid(f"{where}{key} must be 1 to {max_len} printable ASCII characters without spaces")
    return v


def number(v: Any, where: str) -> float | int:
    if isinstance(v, bool) or not isinstance(v, int | float):
        raise invalid(f"{where} must be a number")
    if isinstance(v, float) and not math.isfinite(v):  # orjson refuses NaN, but a caller may not use orjson
        raise invalid(f"{where} must be a finite number")
    return v


def date_time(v: Any, where: str) -> str:
    """An RFC 3339 date-time with its zone, as FHIR dateTime text. A local time (no zone) is refused: the
    gateway cannot know which instant it means."""
    if not isinstance(v, str):
        raise invalid(f"{where} must be an RFC 3339 date-time string")
    if not _DATETIME.fullmatch(v):
        if _LOCAL_TIME.fullmatch(v):
            raise invalid(f"{where} has no time zone (RFC 3339 needs Z or an offset such as +01:00)")
        raise invalid(f"{where} is not an RFC 3339 date-time")
    zone = "+00:00" if v.endswith("Z") else v[-6:]
    try:
        datetime.fromisoformat(v[:19] + zone)
    except ValueError:
        raise invalid(f"{where} is not a valid calendar date and time") from None
    if zone[1:] > "14:00" or zone[4:] > "59":  # FHIR's dateTime allows offsets from -14:00 to +14:00
        raise invalid(f"{where} has an invalid zone offset")
    return v


def parse(payload: bytes) -> Document:
    """Parse and check one payload; Rejected (not JSON, wrong shape, unknown code, bad unit, no zone)."""
    data = load_json(payload)
    if not isinstance(data, dict):
        raise invalid("payload must be a JSON object")
    if "header" in data and "body" in data:
        from .omh import parse_data_point

        return parse_data_point(data)
    return parse_reading_v1(data)


def _code(obj: Any, where: str) -> tuple[str, str]:
    if not isinstance(obj, dict):
        raise invalid(f"{where}code must be an object with system and code")
    extra = obj.keys() - {"system", "code"}
    if extra:
        raise invalid(f"{where}code has unknown key {sorted(extra)[0]!r}")
    system, code = obj.get("system"), obj.get("code")
    if system not in _SYSTEMS:
        raise invalid(f"{where}code.system must be {MDC} or {LOINC}")
    if not isinstance(code, str) or not 1 <= len(code) <= 32:
        raise invalid(f"{where}code.code must be a string of 1 to 32 characters")
    return system, code


def _unit(obj: dict[str, Any], vital: Vital, where: str) -> str:
    unit = obj.get("unit")
    if not isinstance(unit, str) or not 1 <= len(unit) <= 32:
        raise invalid(f"{where}unit must be a UCUM unit code")
    if unit not in vital.units:
        raise Rejected(
            RejectCode.INVALID_PAYLOAD, f"{where}unit is not a UCUM unit of {vital.key} ({', '.join(vital.units)})"
        )
    return unit


def parse_reading_v1(data: dict[str, Any]) -> Document:
    """The gateway's own payload (reading-v1.schema.json), checked by hand."""
    extra = data.keys() - _TOP_KEYS
    if extra:
        raise invalid(f"unknown key {sorted(extra)[0]!r} (reading-v1 allows no other keys)")
    if "version" in data and (data["version"] != 1 or isinstance(data["version"], bool)):
        raise invalid("version must be 1 (the only version of this payload contract)")
    device_id = token(data, "deviceId", "", 64)
    message_id = token(data, "messageId", "", 128, required=False)
    if ("patientId" in data) == ("patient" in data):
        raise invalid("exactly one of patientId and patient is required")
    if "patient" in data:
        p = data["patient"]
        if not isinstance(p, dict) or p.keys() != {"system", "value"}:
            raise invalid("patient must be an object with exactly system and value")
        system = p["system"]
        if not isinstance(system, str) or not 1 <= len(system) <= 255 or not _NO_SPACE.fullmatch(system):
            raise invalid("patient.system must be a URI of 1 to 255 characters")
        patient = (system, token(p, "value", "patient.", 64))
    else:
        patient = ("", token(data, "patientId", "", 64))
    default_effective = date_time(data["effective"], "effective") if "effective" in data else ""
    readings = data.get("readings")
    if not isinstance(readings, list) or not 1 <= len(readings) <= 64:
        raise invalid("readings must be an array of 1 to 64 readings")
    doc = Document("reading-v1", device_id, patient[0], patient[1], message_id)
    for i, r in enumerate(readings):
        doc.readings.append(_reading_v1(r, f"readings[{i}].", default_effective))
    return doc


def _reading_v1(r: Any, where: str, default_effective: str) -> Reading:
    if not isinstance(r, dict):
        raise invalid(f"{where[:-1]} must be an object")
    extra = r.keys() - _READING_KEYS
    if extra:
        raise invalid(f"{where}{sorted(extra)[0]} is not a reading key")
    if "code" not in r:
        raise invalid(f"{where}code is required")
    key = _code(r["code"], where)
    forms = ("value" in r) + ("components" in r) + ("systolic" in r)
    if forms != 1:
        raise invalid(f"{where[:-1]} needs exactly one of value, components, or systolic and diastolic")
    if "value" in r:
        if not {"components", "systolic", "diastolic", "mean"}.isdisjoint(r) or "unit" not in r:
            raise invalid(f"{where[:-1]}: a value needs a unit and no components, systolic, diastolic or mean")
        value = number(r["value"], f"{where}value")
    elif "components" in r:
        if not {"value", "unit", "systolic", "diastolic", "mean"}.isdisjoint(r):
            raise invalid(f"{where[:-1]}: components go without value, unit, systolic, diastolic or mean")
    elif "diastolic" not in r or "unit" not in r:
        raise invalid(f"{where[:-1]}: systolic needs diastolic and unit")
    if "effective" in r:
        effective = date_time(r["effective"], f"{where}effective")
    elif default_effective:
        effective = default_effective
    else:
        raise invalid(f"{where}effective is required (here or at the top level)")
    vital = BY_CODE.get(key)
    if vital is None:
        raise Rejected(RejectCode.UNKNOWN_CODE, f"{where}code {key[1]} of {key[0]} is not a supported vital sign")
    eff = Effective(at=effective)
    if vital is BP_PANEL:
        if "value" in r:
            raise invalid(f"{where[:-1]}: blood pressure needs components or systolic and diastolic, not one value")
        if "systolic" in r:
            unit = _unit(r, SYSTOLIC, where)
            comps = [Quantity(SYSTOLIC, number(r["systolic"], f"{where}systolic"), unit)]
            comps.append(Quantity(DIASTOLIC, number(r["diastolic"], f"{where}diastolic"), unit))
            if "mean" in r:
                comps.append(Quantity(MEAN_BP, number(r["mean"], f"{where}mean"), unit))
            return Reading(vital, eff, components=tuple(comps))
        return Reading(vital, eff, components=_components(r["components"], where))
    if "value" not in r:
        raise invalid(f"{where[:-1]}: {vital.key} needs a value and a unit")
    return Reading(vital, eff, value=Quantity(vital, value, _unit(r, vital, where)))


def _components(comps: Any, where: str) -> tuple[Quantity, ...]:
    if not isinstance(comps, list) or not 1 <= len(comps) <= 8:
        raise invalid(f"{where}components must be an array of 1 to 8 quantities")
    out: list[Quantity] = []
    for j, c in enumerate(comps):
        w = f"{where}components[{j}]."
        if not isinstance(c, dict) or c.keys() != {"code", "value", "unit"}:
            raise invalid(f"{w[:-1]} must be an object with exactly code, value and unit")
        key = _code(c["code"], w)
        value = number(c["value"], f"{w}value")
        vital = COMPONENT_BY_CODE.get(key)
        if vital is None:
            raise Rejected(RejectCode.UNKNOWN_CODE, f"{w}code {key[1]} of {key[0]} is not a blood pressure component")
        if any(q.vital is vital for q in out):
            raise invalid(f"{w}code repeats a component")
        out.append(Quantity(vital, value, _unit(c, vital, w)))
    if not {SYSTOLIC, DIASTOLIC} <= {q.vital for q in out}:
        raise invalid(f"{where}components need both systolic and diastolic")
    return tuple(out)
