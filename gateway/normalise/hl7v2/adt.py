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

from gateway.hl7v2.parse import Encoding, Segment
from gateway.ids import resource_id

from .. import MappingError
from .common import EMPTY as _EMPTY
from .common import Scope as _Scope
from .common import first as _first
from .common import practitioner as _practitioner
from .common import reps as _reps
from .common import value as _value
from .datatypes import (
    Json,
    address,
    clean,
    codeable_concept,
    components,
    contact_point,
    human_name,
    identifier,
    subcomponents,
)
from .dates import period, to_datetime
from .tables import (
    ADMINISTRATIVE_SEX,
    ADMISSION_TYPE,
    EVENT_ENCOUNTER_STATUS,
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


def patient_resource(pid: Segment, scope: _Scope) -> Json:
    """PID -> Patient (see the module docstring for its id)."""
    return _patient(pid, scope)


def encounter_resources(pv1: Segment, trigger: str, patient_id: str, scope: _Scope) -> tuple[Json, list[Json]] | None:
    """PV1 -> the Encounter and its Practitioners; None for a placeholder PV1."""
    return _encounter(pv1, trigger, patient_id, scope)


# --- Patient ------------------------------------------------------------------------------------------------


def _patient(pid: Segment, scope: _Scope) -> Json:
    tz = scope.offset
    enc = pid.enc
    identifiers: list[Json] = []
    first: dict[int, Json] = {}  # field number -> its first identifier
    chosen: Json | None = None  # the first PID-3 identifier typed MR
    for field_no in (2, 3, 4):
        for rep in _reps(pid, field_no):
            ident = identifier(rep, enc, tz, None, scope.settings)
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
        cc = codeable_concept(marital, enc, MARITAL_STATUS.get(_value(pid, 16).strip()), _V2_0002, scope.settings)
        if cc:
            patient["maritalStatus"] = cc
    _multiple_birth(pid, patient)
    language = _first(pid, 15)
    if language not in _EMPTY:
        cc = codeable_concept(language, enc, None, None, scope.settings)
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
    event_status = EVENT_ENCOUNTER_STATUS.get(trigger)
    if event_status is not None and trigger != "A03":
        status = event_status
    elif trigger == "A03" or discharge.strip():
        status = "finished"
    elif class_code == "P":
        status = "planned"
    elif class_code == "U":
        status = "unknown"
    else:
        status = "in-progress"

    identifiers: list[Json] = []
    visit_number = _first(pv1, 19)
    visit = identifier(visit_number, enc, tz, _visit_number_type(), scope.settings) if visit_number else None
    if visit is not None:
        identifiers.append(visit)
    identifiers += [i for rep in _reps(pv1, 50) if (i := identifier(rep, enc, tz, None, scope.settings)) is not None]
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
        cc = codeable_concept(admission_type, enc, ADMISSION_TYPE.get(_value(pv1, 4).strip()), _V2_0007, scope.settings)
        if cc:
            encounter["type"] = [cc]
    service = _first(pv1, 10)
    if service not in _EMPTY and (cc := codeable_concept(service, enc, None, None, scope.settings)):
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
    pre_admit = identifier(_first(pv1, 5), enc, tz, None, scope.settings)
    if pre_admit is not None:
        hospitalization["preAdmissionIdentifier"] = pre_admit
    for key, field_no in (("reAdmission", 13), ("admitSource", 14), ("dischargeDisposition", 36)):
        f = _first(pv1, field_no)
        if f not in _EMPTY and (cc := codeable_concept(f, enc, None, None, scope.settings)):
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
