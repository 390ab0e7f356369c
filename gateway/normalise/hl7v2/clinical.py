"""Patient-level segments, after the IG segment maps: NK1 -> RelatedPerson, AL1 -> AllergyIntolerance,
DG1 -> Condition, IN1 -> Coverage (+ the insurer Organization), PD1 -> Patient.generalPractitioner,
ROL -> PractitionerRole (+ Encounter.participant), MRG -> the merged-away Patient (A40).

Each function takes the segment, its position (for error messages) and the walk state; it adds what it maps to
the state's bundle. Segments that carry nothing to map (all the fields the resource needs are empty) add
nothing rather than an empty resource.
"""

from __future__ import annotations

from gateway.hl7v2.parse import Segment, unescape
from gateway.ids import resource_id

from .. import MappingError
from .common import (
    EMPTY,
    cc,
    dt,
    ei_identifier,
    first,
    new_resource,
    organization,
    practitioner,
    ref,
    reps,
    value,
    where,
)
from .datatypes import Json, address, clean, contact_point, human_name, identifier, subcomponents
from .dates import period, to_date
from .state import State
from .tables import (
    ADMINISTRATIVE_SEX,
    ALLERGY_CATEGORY,
    ALLERGY_CLINICAL,
    ALLERGY_CRITICALITY,
    V2_0063,
)

_CONDITION_CATEGORY = "http://terminology.hl7.org/CodeSystem/condition-category"
_COVERAGE_CLASS = "http://terminology.hl7.org/CodeSystem/coverage-class"
_V2_0131 = "http://terminology.hl7.org/CodeSystem/v2-0131"


def _patient_or_error(st: State, seg: Segment, index: int) -> Json:
    if st.patient is None:
        raise MappingError(f"{where(seg, index)} comes before any PID: no patient to attach it to")
    return st.patient


def nk1(seg: Segment, index: int, st: State) -> None:
    """NK1 -> RelatedPerson: name NK1-2, relationship NK1-3 (table 0063), address NK1-4, phones NK1-5/6,
    period NK1-8/9, gender NK1-15, birth date NK1-16, identifiers NK1-33."""
    patient = _patient_or_error(st, seg, index)
    scope, enc, tz = st.scope, seg.enc, st.scope.offset
    names = [n for rep in reps(seg, 2) if (n := human_name(rep, enc, tz)) is not None]
    relationship = cc(seg, 3, scope)
    if relationship is not None and "coding" in relationship:
        for coding in relationship["coding"]:
            if "system" not in coding:
                coding["system"] = V2_0063
    if not names and relationship is None:
        return
    rp = new_resource(
        "RelatedPerson",
        scope.mint("RelatedPerson", patient["id"], first(seg, 2), first(seg, 3).split(enc.component, 1)[0]),
        scope,
    )
    idents = [i for rep in reps(seg, 33) if (i := identifier(rep, enc, tz, None, scope.settings)) is not None]
    if idents:
        rp["identifier"] = idents
    rp["patient"] = ref(patient)
    if relationship is not None:
        rp["relationship"] = [relationship]
    if names:
        rp["name"] = names
    telecom = [
        c for f, use in ((5, "home"), (6, "work")) for rep in reps(seg, f) if (c := contact_point(rep, enc, use, tz))
    ]
    if telecom:
        rp["telecom"] = telecom
    gender = ADMINISTRATIVE_SEX.get(value(seg, 15).strip().upper())
    if gender:
        rp["gender"] = gender
    birth = to_date(value(seg, 16))
    if birth:
        rp["birthDate"] = birth
    addresses = [a for rep in reps(seg, 4) if (a := address(rep, enc, tz)) is not None]
    if addresses:
        rp["address"] = addresses
    p = period(dt(seg, 8, scope), dt(seg, 9, scope))
    if p:
        rp["period"] = p
    st.bundle.add(rp)


def al1(seg: Segment, index: int, st: State) -> None:
    """AL1 -> AllergyIntolerance: allergen AL1-3, category AL1-2 (table 0127), criticality AL1-4 (table
    0128), reactions AL1-5, onset AL1-6."""
    patient = _patient_or_error(st, seg, index)
    scope = st.scope
    allergen = cc(seg, 3, scope)
    if allergen is None:
        return
    c3 = first(seg, 3).split(seg.enc.component)
    key = (c3[0], c3[2] if len(c3) > 2 else "") if c3[0] else ("text", first(seg, 3))
    ai = new_resource("AllergyIntolerance", scope.mint("AllergyIntolerance", patient["id"], *key), scope)
    ai["clinicalStatus"] = {"coding": [{"system": ALLERGY_CLINICAL, "code": "active", "display": "Active"}]}
    category = ALLERGY_CATEGORY.get(value(seg, 2).strip().upper())
    if category:
        ai["category"] = [category]
    criticality = ALLERGY_CRITICALITY.get(value(seg, 4).strip().upper())
    if criticality:
        ai["criticality"] = criticality
    ai["code"] = allergen
    ai["patient"] = ref(patient)
    onset = to_date(value(seg, 6))
    if onset:
        ai["onsetDateTime"] = onset
    manifestations = [{"text": t} for rep in reps(seg, 5) if rep not in EMPTY and (t := _text(rep, seg))]
    if manifestations:
        ai["reaction"] = [{"manifestation": manifestations}]
    st.bundle.add(ai)
    st.last = ai


def _text(raw: str, seg: Segment) -> str:
    return clean(unescape(raw.replace(seg.enc.component, " "), seg.enc))


def dg1(seg: Segment, index: int, st: State) -> None:
    """DG1 -> Condition (category encounter-diagnosis): code DG1-3 (else DG1-4 text), onset DG1-5, identifier
    DG1-20, asserter DG1-16; and Encounter.diagnosis with rank DG1-15 when there is a visit."""
    patient = _patient_or_error(st, seg, index)
    scope = st.scope
    code_cc = cc(seg, 3, scope)
    if code_cc is None:
        description = value(seg, 4).strip()
        code_cc = {"text": description} if description else None
    if code_cc is None:
        return
    ident = ei_identifier(first(seg, 20), seg.enc, scope)
    if ident is not None:
        # (with the patient: senders reuse diagnosis identifiers across patients)
        condition_id = scope.mint("Condition", "id", patient["id"], *scope.key(ident))
    else:
        c3 = first(seg, 3).split(seg.enc.component)
        condition_id = scope.mint(
            "Condition", patient["id"], c3[0], c3[2] if len(c3) > 2 else "", value(seg, 4), value(seg, 6)
        )
    condition = new_resource("Condition", condition_id, scope)
    if ident is not None:
        condition["identifier"] = [ident]
    condition["category"] = [
        {"coding": [{"system": _CONDITION_CATEGORY, "code": "encounter-diagnosis", "display": "Encounter Diagnosis"}]}
    ]
    condition["code"] = code_cc
    condition["subject"] = ref(patient)
    if st.encounter is not None:
        condition["encounter"] = ref(st.encounter)
    onset = dt(seg, 5, scope)
    if onset:
        condition["onsetDateTime"] = onset
    doctor = practitioner(first(seg, 16), seg.enc, scope) if first(seg, 16) not in EMPTY else None
    if doctor is not None:
        st.bundle.add(doctor)
        condition["asserter"] = ref(doctor)
    st.bundle.add(condition)
    if st.encounter is not None:
        diagnosis: Json = {"condition": ref(condition)}
        rank = value(seg, 15).strip()
        if rank.isdigit() and 0 < int(rank) < 2**31:
            diagnosis["rank"] = int(rank)
        st.encounter.setdefault("diagnosis", []).append(diagnosis)


def in1(seg: Segment, index: int, st: State) -> None:
    """IN1 -> Coverage and the insurer's Organization (IN1-3 id, IN1-4 name, IN1-5 address, IN1-7 phone):
    policy number IN1-36, plan IN1-2, group IN1-8/9, period IN1-12/13, plan type IN1-15, relationship to
    the insured IN1-17 (table 0063), order IN1-22. An IN1 naming no insurer maps to nothing (Coverage.payor is
    required, and a guessed payor would be wrong)."""
    patient = _patient_or_error(st, seg, index)
    scope, enc, tz = st.scope, seg.enc, st.scope.offset
    ids = [i for rep in reps(seg, 3) if (i := identifier(rep, enc, tz, None, scope.settings)) is not None]
    name_raw = first(seg, 4)
    name = value(seg, 4).strip()
    if ids:
        payor_id = resource_id("Organization", *scope.key(ids[0]))
    elif name:
        payor_id = resource_id("Organization", "name", scope.facility, name)
    else:
        return
    payor = new_resource("Organization", payor_id, scope)
    if ids:
        payor["identifier"] = ids
    if name_raw not in EMPTY and name:
        payor["name"] = name
    telecom = [c for rep in reps(seg, 7) if (c := contact_point(rep, enc, "work", tz))]
    if telecom:
        payor["telecom"] = telecom
    addresses = [a for rep in reps(seg, 5) if (a := address(rep, enc, tz)) is not None]
    if addresses:
        payor["address"] = addresses
    st.bundle.add(payor)

    policy = value(seg, 36).strip()
    plan = value(seg, 2).strip()
    coverage = new_resource(
        "Coverage", scope.mint("Coverage", patient["id"], payor_id, plan, policy, value(seg, 8)), scope
    )
    if policy:
        coverage["identifier"] = [{"value": policy}]
    coverage["status"] = "active"
    plan_type = cc(seg, 15, scope)
    if plan_type is not None:
        coverage["type"] = plan_type
    subscriber = value(seg, 49).strip()
    if subscriber:
        coverage["subscriberId"] = subscriber
    coverage["beneficiary"] = ref(patient)
    relationship = cc(seg, 17, scope)
    if relationship is not None:
        for coding in relationship.get("coding", []):
            coding.setdefault("system", V2_0063)
        coverage["relationship"] = relationship
    p = period(to_date(value(seg, 12)), to_date(value(seg, 13)))
    if p:
        coverage["period"] = p
    coverage["payor"] = [ref(payor)]
    classes = []
    plan_name = subcomponents(first(seg, 2), seg.enc, 2, 1)[0].strip()
    for class_code, val, label in (("plan", plan, plan_name), ("group", value(seg, 8).strip(), value(seg, 9).strip())):
        if val:
            entry: Json = {"type": {"coding": [{"system": _COVERAGE_CLASS, "code": class_code}]}, "value": val}
            if label:
                entry["name"] = label
            classes.append(entry)
    if classes:
        coverage["class"] = classes
    order = value(seg, 22).strip()
    if order.isdigit() and 0 < int(order) < 2**31:
        coverage["order"] = int(order)
    st.bundle.add(coverage)


def pd1(seg: Segment, index: int, st: State) -> None:
    """PD1 -> Patient.generalPractitioner: the primary facility PD1-3 (Organization) and primary care provider
    PD1-4 (Practitioner)."""
    patient = _patient_or_error(st, seg, index)
    scope = st.scope
    gps: list[Json] = []
    for rep in reps(seg, 3):
        org = organization(rep, seg.enc, scope)
        if org is not None:
            st.bundle.add(org)
            gps.append(ref(org))
    for rep in reps(seg, 4):
        doctor = practitioner(rep, seg.enc, scope) if rep not in EMPTY else None
        if doctor is not None:
            st.bundle.add(doctor)
            gps.append(ref(doctor))
    if gps:
        existing = patient.setdefault("generalPractitioner", [])
        existing += [g for g in gps if g not in existing]


def rol(seg: Segment, index: int, st: State) -> None:
    """ROL -> Practitioner (ROL-4) and PractitionerRole (role ROL-3, period ROL-5/6); after a PV1 the role
    also joins Encounter.participant."""
    scope = st.scope
    doctor = None
    for rep in reps(seg, 4):
        if rep not in EMPTY:
            doctor = practitioner(rep, seg.enc, scope)
            if doctor is not None:
                break
    if doctor is None:
        return
    st.bundle.add(doctor)
    role_cc = cc(seg, 3, scope)
    role_code = first(seg, 3).split(seg.enc.component, 1)[0]
    role = new_resource("PractitionerRole", scope.mint("PractitionerRole", doctor["id"], role_code), scope)
    role["practitioner"] = ref(doctor)
    if role_cc is not None:
        role["code"] = [role_cc]
    p = period(dt(seg, 5, scope), dt(seg, 6, scope))
    if p:
        role["period"] = p
    st.bundle.add(role)
    if st.encounter is not None and not st.order and not st.report:
        participant: Json = {"individual": ref(role)}
        if role_cc is not None:
            participant["type"] = [role_cc]
        if p:
            participant["period"] = p
        st.encounter.setdefault("participant", []).append(participant)


def mrg(seg: Segment, index: int, st: State) -> None:
    """MRG (A40 merge) -> the merged-away Patient: identifiers MRG-1 (else MRG-4, MRG-2), active false, link
    replaced-by the surviving patient; the surviving patient gets link replaces. The old id follows the same
    rule as a PID's, so it is the id the old patient was given when it was first sent."""
    survivor = _patient_or_error(st, seg, index)
    scope, enc, tz = st.scope, seg.enc, st.scope.offset
    chosen: Json | None = None
    idents: list[Json] = []
    for n in (1, 4, 2):
        for rep in reps(seg, n):
            ident = identifier(rep, enc, tz, None, scope.settings)
            if ident is None:
                continue
            if ident not in idents:
                idents.append(ident)
            if chosen is None and n == 1 and subcomponents(rep, enc, 5, 1)[0].strip() == "MR":
                chosen = ident
    key = chosen or (idents[0] if idents else None)
    if key is None:
        raise MappingError(f"{where(seg, index, 1)}: the merge names no prior patient identifier")
    old = new_resource("Patient", resource_id("Patient", *scope.key(key)), scope)
    if old["id"] == survivor["id"]:
        raise MappingError(f"{where(seg, index, 1)}: the prior patient is the surviving patient")
    old["identifier"] = idents
    old["active"] = False
    old["link"] = [{"other": ref(survivor), "type": "replaced-by"}]
    survivor.setdefault("link", []).append({"other": ref(old), "type": "replaces"})
    st.bundle.add(old)
