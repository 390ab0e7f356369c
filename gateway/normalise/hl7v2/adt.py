"""ADT^A01/A03/A04/A08 -> Patient (PID), Encounter (PV1) and the Encounter's Practitioners (PV1-7/8/9/17),
after the v2-to-FHIR IG segment maps PID[Patient] and PV1[Encounter].

Resource ids (``gateway.ids.resource_id``) come from business identifiers, so a resent or updated message
(A08) PUTs the same resources:

- Patient: the first PID-3 identifier typed MR, else the first PID-3 identifier, else PID-2, else PID-4; keyed
  by its system (assigning authority) and value. No identifier at all is a MappingError: a patient we cannot
  identify would become a new twin on every message.
- Encounter: PV1-19 visit number (authority + value); else the patient id + PV1-44 admit time + the sending
  facility (so an undated visit without a number is "this patient's visit at that facility").
- Practitioner: XCN-1 + XCN-9 authority; else the name (XCN-2..6).
- An identifier without an assigning authority is scoped by the sending facility (MSH-4, else MSH-3): that is
  who assigned it, and two hospitals' "12345" must not be one patient.

A placeholder PV1 (``PV1|1|N``: class empty or N, no visit number, no admit time) gives no Encounter.
Encounter.status: finished for A03 or when PV1-45 (discharge time) is valued; otherwise by the IG's
PatientClass[EncounterStatus] map: planned for class P (preadmit), unknown for class U, in-progress for the
rest. PID-10/22 (race, ethnicity: realm-specific extensions) and PID-19/20 (SSN, driver's licence) are not
mapped.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any

from gateway.hl7v2.parse import Encoding, Field, Message, Segment, unescape
from gateway.ids import resource_id

from .. import MapContext, MappingError
from .bundle import TransactionBundle, meta_for
from .datatypes import (
    Json,
    address,
    clean,
    code,
    codeable_concept,
    components,
    contact_point,
    hd_system,
    human_name,
    identifier,
    subcomponents,
    xcn_identifier,
    xcn_name,
)
from .dates import offset_of, period, to_datetime
from .tables import (
    ADMINISTRATIVE_SEX,
    ADMISSION_TYPE,
    MARITAL_STATUS,
    PATIENT_CLASS,
    PV1_PARTICIPANTS,
    UNKNOWN_CLASS,
    V2_0203,
    V3_PARTICIPATION_TYPE,
    YES_NO,
)

_V2_0002 = "http://terminology.hl7.org/CodeSystem/v2-0002"
_V2_0007 = "http://terminology.hl7.org/CodeSystem/v2-0007"
_BIRTH_TIME = "http://hl7.org/fhir/StructureDefinition/patient-birthTime"
_MOTHERS_MAIDEN_NAME = "http://hl7.org/fhir/StructureDefinition/patient-mothersMaidenName"


class _Scope:
    """What every resource of one message shares: the sender's offset (from MSH-7), the facility that scopes
    unqualified identifiers, and meta.source."""

    __slots__ = ("facility", "meta_source", "offset")

    def __init__(self, msg: Message, ctx: MapContext) -> None:
        msh = msg.msh
        self.offset = offset_of(_value(msh, 7))
        self.facility = _facility(_first(msh, 4), msh.enc) or _facility(_first(msh, 3), msh.enc) or ""
        self.meta_source = meta_for(ctx)

    def key(self, ident: Json) -> tuple[str, str, str]:
        """The id parts for an Identifier: its system, or the sending facility when it has none."""
        system = ident.get("system")
        if system:
            return ("system", system, ident["value"])
        return ("facility", self.facility, ident["value"])


def _facility(raw: str, enc: Encoding) -> str | None:
    """hd_system of an HD field (MSH-3, MSH-4; its first repetition's raw text), its components read as
    ``msh.get(n, 1..3)`` reads them."""
    if enc.escape and enc.escape in raw:  # rare: let Field unescape
        f = Field(raw, enc)
        return hd_system(f.get(1), f.get(2), f.get(3))
    return _facility_text(raw, enc.component, enc.subcomponent)


@lru_cache(maxsize=256)
def _facility_text(raw: str, comp: str, sub: str) -> str | None:
    # The sending application and facility are the same in every message of a sender: cached by raw text.
    hd = [""] * 3
    for i, c in enumerate(raw.split(comp, 3)[:3]):
        if sub:
            c = c.split(sub, 1)[0]
        hd[i] = "" if c == '""' else c
    return hd_system(*hd)


# Raw field access. The datatype maps take a repetition's raw text and the encoding: reading
# ``Segment.fields`` directly costs a fraction of ``Segment.repetitions`` / ``Segment.field``, which build a
# Field object per repetition.
# Not for MSH-1/2, which need ``Segment``'s special case.


def _reps(seg: Segment, n: int) -> list[str]:
    """Field n's repetitions as raw text, empty ones kept: ``[r.raw for r in seg.repetitions(n)]``."""
    fields = seg.fields
    raw = fields[n] if n < len(fields) else ""
    return raw.split(seg.enc.repetition) if raw else []


def _first(seg: Segment, n: int) -> str:
    """The raw text of field n's first repetition ("" when absent): ``seg.field(n).raw``."""
    fields = seg.fields
    raw = fields[n] if n < len(fields) else ""
    rep = seg.enc.repetition
    return raw.split(rep, 1)[0] if rep in raw else raw


def _value(seg: Segment, n: int) -> str:
    """``seg.get(n)``: field n's first component (its first subcomponent, of the first repetition), unescaped;
    "" when absent or the explicit null. Without ``Segment.get``'s Field and calls."""
    fields = seg.fields
    raw = fields[n] if n < len(fields) else ""
    if not raw:
        return ""
    enc = seg.enc
    if enc.repetition in raw:
        raw = raw.split(enc.repetition, 1)[0]
    if enc.component in raw:
        raw = raw.split(enc.component, 1)[0]
    sub, esc = enc.subcomponent, enc.escape
    if sub and sub in raw:
        raw = raw.split(sub, 1)[0]
    if raw == '""':
        return ""
    return unescape(raw, enc) if esc and esc in raw else raw


# A field with one of these raw values is empty (``Field.is_empty``): absent, or the explicit null.
_EMPTY = ("", '""')


def map_adt(msg: Message, ctx: MapContext, trigger: str) -> dict[str, Any]:
    """One transaction Bundle: Patient, then Encounter (when there is a PV1), then its Practitioners.
    Raises MappingError when there is no PID or the PID identifies no patient."""
    pid = msg.first("PID")
    if pid is None:
        raise MappingError(f"ADT^{trigger} has no PID segment")
    scope = _Scope(msg, ctx)
    bundle = TransactionBundle()
    patient = _patient(pid, scope)
    bundle.add(patient)
    pv1 = msg.first("PV1")
    mapped = _encounter(pv1, trigger, patient["id"], scope) if pv1 is not None else None
    if mapped is not None:
        encounter, practitioners = mapped
        bundle.add(encounter)
        for practitioner in practitioners:
            bundle.add(practitioner)
    return bundle.build()


# --- Patient ------------------------------------------------------------------------------------------------


def _patient(pid: Segment, scope: _Scope) -> Json:
    tz = scope.offset
    enc = pid.enc
    identifiers: list[Json] = []
    first: dict[int, Json] = {}  # field number -> its first identifier
    chosen: Json | None = None  # the first PID-3 identifier typed MR
    for field_no in (2, 3, 4):
        for rep in _reps(pid, field_no):
            ident = identifier(rep, enc, tz)
            if ident is None:
                continue
            if ident not in identifiers:  # PID-2 often repeats a PID-3 identifier
                identifiers.append(ident)
            first.setdefault(field_no, ident)
            if chosen is None and field_no == 3 and subcomponents(rep, enc, 5, 1)[0].strip() == "MR":
                chosen = ident
    key_ident = chosen or first.get(3) or first.get(2) or first.get(4)
    if key_ident is None:
        raise MappingError("PID has no patient identifier in PID-2, PID-3 or PID-4")
    patient: Json = {
        "resourceType": "Patient",
        "id": resource_id("Patient", *scope.key(key_ident)),
        "meta": {"source": scope.meta_source},
        "identifier": identifiers,
    }
    names: list[Json] = []
    for f in (5, 9):
        for rep in _reps(pid, f):
            name = human_name(rep, enc, tz)
            if name is not None and name not in names:
                names.append(name)
    if names:
        patient["name"] = names
    telecom = [
        cp
        for f, use in ((13, "home"), (14, "work"), (40, None))
        for rep in _reps(pid, f)
        if (cp := contact_point(rep, enc, use, tz)) is not None
    ]
    if telecom:
        patient["telecom"] = telecom
    gender = ADMINISTRATIVE_SEX.get(_value(pid, 8).strip().upper())
    if gender:
        patient["gender"] = gender
    _birth(pid, patient, tz)
    _deceased(pid, patient, tz)
    addresses = [a for rep in _reps(pid, 11) if (a := address(rep, enc, tz)) is not None]
    county = clean(_value(pid, 12))
    if county:  # PID-12 county code fills the district of a single address that has none (IG PID map)
        if not addresses:
            addresses.append({"district": county})
        elif len(addresses) == 1 and "district" not in addresses[0]:
            addresses[0]["district"] = county
    if addresses:
        patient["address"] = addresses
    marital = _first(pid, 16)
    if marital not in _EMPTY:
        cc = codeable_concept(marital, enc, MARITAL_STATUS.get(_value(pid, 16).strip()), _V2_0002)
        if cc:
            patient["maritalStatus"] = cc
    _multiple_birth(pid, patient)
    language = _first(pid, 15)
    if language not in _EMPTY:
        cc = codeable_concept(language, enc)
        if cc:
            patient["communication"] = [{"language": cc}]
    maiden = clean(_value(pid, 6))  # PID-6.1.1: the family name
    if maiden:
        patient["extension"] = [{"url": _MOTHERS_MAIDEN_NAME, "valueString": maiden}]
    return patient


def _birth(pid: Segment, patient: Json, tz: str | None) -> None:
    """PID-7 -> birthDate (the local date as sent), and a time of birth -> the patient-birthTime extension
    (IG: IF PID-7 LENGTH GREATER THAN 8). An invalid PID-7 gives neither."""
    # One parse: PID-7 is valid whatever the offset (the offset only decides whether a time is kept), the
    # dateTime starts with the date, and has a "T" exactly when it keeps a time (so PID-7 is longer than 8).
    birth = to_datetime(_value(pid, 7), tz)
    if birth is None:  # absent or not a valid DTM
        return
    birth_date, t, _ = birth.partition("T")
    patient["birthDate"] = birth_date
    if t:
        patient["_birthDate"] = {"extension": [{"url": _BIRTH_TIME, "valueDateTime": birth}]}


def _deceased(pid: Segment, patient: Json, tz: str | None) -> None:
    death = to_datetime(_value(pid, 29), tz)
    if death:
        patient["deceasedDateTime"] = death
        return
    flag = YES_NO.get(_value(pid, 30).strip().upper())
    if flag is not None:
        patient["deceasedBoolean"] = flag


def _multiple_birth(pid: Segment, patient: Json) -> None:
    order = _value(pid, 25).strip()
    if order.isdigit() and 0 < int(order) < 2**31:  # a birth order counts from 1
        patient["multipleBirthInteger"] = int(order)
        return
    flag = YES_NO.get(_value(pid, 24).strip().upper())
    if flag is not None:
        patient["multipleBirthBoolean"] = flag


# --- Encounter and Practitioners ----------------------------------------------------------------------------


def _encounter(pv1: Segment, trigger: str, patient_id: str, scope: _Scope) -> tuple[Json, list[Json]] | None:
    """The Encounter and the Practitioners its participants reference (possibly repeated: the bundle
    dedups); None for a placeholder PV1.

    A placeholder PV1 names no visit (no PV1-19 number, no PV1-44 admit time) and its class is empty or N
    (not applicable): the filler PV1 the ADT structures require (``PV1|1|N``), which maps to no Encounter."""
    tz = scope.offset
    enc = pv1.enc
    class_code = _value(pv1, 2).strip().upper()
    admit = _value(pv1, 44).strip()
    if class_code in ("", "N") and not admit and not _value(pv1, 19).strip():
        return None
    mapped_class = PATIENT_CLASS.get(class_code)
    if mapped_class is not None:
        enc_class = {"system": mapped_class[0], "code": mapped_class[1], "display": mapped_class[2]}
    elif class_code:
        enc_class = {"code": " ".join(class_code.split())}
    else:
        enc_class = {"system": UNKNOWN_CLASS[0], "code": UNKNOWN_CLASS[1], "display": UNKNOWN_CLASS[2]}
    discharge = _value(pv1, 45)
    if trigger == "A03" or discharge.strip():
        status = "finished"
    elif class_code == "P":
        status = "planned"
    elif class_code == "U":
        status = "unknown"
    else:
        status = "in-progress"

    identifiers: list[Json] = []
    visit_number = _first(pv1, 19)
    visit = identifier(visit_number, enc, tz, type_override=_visit_number_type()) if visit_number else None
    if visit is not None:
        identifiers.append(visit)
    identifiers += [i for rep in _reps(pv1, 50) if (i := identifier(rep, enc, tz)) is not None]
    if visit is not None:
        encounter_id = resource_id("Encounter", "visit", *scope.key(visit))
    else:
        encounter_id = resource_id("Encounter", "patient", patient_id, admit, scope.facility)

    encounter: Json = {"resourceType": "Encounter", "id": encounter_id, "meta": {"source": scope.meta_source}}
    if identifiers:
        encounter["identifier"] = identifiers
    encounter["status"] = status
    encounter["class"] = enc_class
    admission_type = _first(pv1, 4)
    if admission_type not in _EMPTY:
        cc = codeable_concept(admission_type, enc, ADMISSION_TYPE.get(_value(pv1, 4).strip()), _V2_0007)
        if cc:
            encounter["type"] = [cc]
    service = _first(pv1, 10)
    if service not in _EMPTY and (cc := codeable_concept(service, enc)):
        encounter["serviceType"] = cc
    encounter["subject"] = {"reference": f"Patient/{patient_id}"}

    participants: list[Json] = []
    practitioners: list[Json] = []
    # The same doctor is often both attending and admitting: map an XCN once per message (the bundle keeps
    # the first of equal resources anyway, so reusing the dict changes nothing in the output).
    by_xcn: dict[str, Json | None] = {}
    for field_no, type_code, display in PV1_PARTICIPANTS:
        for rep in _reps(pv1, field_no):
            if rep in by_xcn:
                practitioner = by_xcn[rep]
            else:
                practitioner = by_xcn[rep] = _practitioner(rep, enc, scope)
            if practitioner is None:
                continue
            practitioners.append(practitioner)
            participants.append(
                {
                    "type": [{"coding": [{"system": V3_PARTICIPATION_TYPE, "code": type_code, "display": display}]}],
                    "individual": {"reference": f"Practitioner/{practitioner['id']}"},
                }
            )
    if participants:
        encounter["participant"] = participants

    start, end = to_datetime(admit, tz), to_datetime(discharge, tz)
    if start or end:
        encounter["period"] = period(start, end)

    hospitalization: Json = {}
    pre_admit = identifier(_first(pv1, 5), enc, tz)
    if pre_admit is not None:
        hospitalization["preAdmissionIdentifier"] = pre_admit
    for key, field_no in (("reAdmission", 13), ("admitSource", 14), ("dischargeDisposition", 36)):
        f = _first(pv1, field_no)
        if f not in _EMPTY and (cc := codeable_concept(f, enc)):
            hospitalization[key] = cc
    if hospitalization:
        encounter["hospitalization"] = hospitalization

    locations: list[Json] = []
    for field_no, loc_status in ((3, "planned" if class_code == "P" else "active"), (6, "completed")):
        display = _location_display(_first(pv1, field_no), enc)
        if display:
            locations.append({"location": {"display": display}, "status": loc_status})
    if locations:
        encounter["location"] = locations
    return encounter, practitioners


def _visit_number_type() -> Json:
    """PV1-19's Identifier.type, assigned by the IG whatever CX-5 says."""
    return {"coding": [{"system": V2_0203, "code": "VN"}], "text": "visit number"}


def _location_display(raw: str, enc: Encoding) -> str:
    """PL as text: point of care, room, bed, building, floor, facility (PL-1, 2, 3, 7, 8, 4); PL-9 if given.
    The IG wants Location resources per level; a display keeps the bundle self-contained and valid."""
    if raw in _EMPTY:
        return ""
    c, _ = components(raw, enc, 9)
    if c[9]:
        return c[9]
    return ", ".join(filter(None, (c[1], c[2], c[3], c[7], c[8], c[4])))


def _practitioner(raw: str, enc: Encoding, scope: _Scope) -> Json | None:
    """XCN -> Practitioner (IG XCN[Practitioner]); None when it has neither an identifier nor a name."""
    c, n = components(raw, enc, 21)
    ident = xcn_identifier(raw, enc, c, n)
    name = xcn_name(c)
    if ident is not None:
        practitioner_id = resource_id("Practitioner", *scope.key(ident))
    elif name is not None:
        practitioner_id = resource_id("Practitioner", "name", scope.facility, *c[2:7])  # XCN-2..6
    else:
        return None
    practitioner: Json = {
        "resourceType": "Practitioner",
        "id": practitioner_id,
        "meta": {"source": scope.meta_source},
    }
    if ident is not None:
        practitioner["identifier"] = [ident]
    if name is not None:
        practitioner["name"] = [name]
    degree = c[7]
    if degree:
        practitioner["qualification"] = [{"code": {"coding": [{"code": code(degree)}]}}]
    return practitioner
