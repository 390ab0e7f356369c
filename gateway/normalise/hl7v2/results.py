"""Orders and results, after the IG's ORC/OBR/OBX/SPM/NTE maps: ORC+OBR -> ServiceRequest (orders) or
DiagnosticReport (results), OBX -> Observation with value[x] by OBX-2, SPM -> Specimen, NTE -> note.

Ids: a ServiceRequest or DiagnosticReport is keyed by its placer or filler order number (ORC-2/3, OBR-2/3,
with their assigning authorities), else by patient + OBR-4 + OBR-7; an Observation by its report (or order,
or immunization, or patient) + OBX-3 + OBX-4, with the occurrence number when that recurs (``Scope.mint``); a
Specimen by SPM-2, else by its order + SPM-1.
"""

from __future__ import annotations

import base64
import binascii

from gateway.hl7v2.parse import Encoding, Segment

from .. import MappingError
from .common import (
    EMPTY,
    cc,
    ccs,
    dt,
    ei_identifier,
    first,
    instant,
    new_resource,
    practitioner,
    ref,
    reps,
    text_of,
    value,
    where,
)
from .datatypes import Json, authority_system, clean, codeable_concept, components, subcomponents
from .dates import period, to_datetime
from .state import State
from .tables import (
    INTERPRETATION,
    OBSERVATION_STATUS,
    ORDER_CONTROL_STATUS,
    ORDER_STATUS,
    PRIORITY,
    REPORT_STATUS,
    V2_0074,
    V2_0078,
    V2_0203,
    V3_INTERPRETATION,
)
from .units import number, quantity, reference_range

_TEXT_TYPES = frozenset({"ST", "TX", "FT"})
_CODED_TYPES = frozenset({"CE", "CWE", "CNE", "CF", "IS", "ID"})
_SN_SEPARATORS = {"-": "range", ":": "ratio", "/": "ratio"}
_COMPARATORS = {"<": "<", ">": ">", "<=": "<=", ">=": ">="}


# --- orders -------------------------------------------------------------------------------------------------


def _order_numbers(orc: Segment | None, obr: Segment | None, st: State) -> tuple[Json | None, Json | None]:
    """(placer, filler) order number Identifiers, from ORC-2/3 else OBR-2/3."""
    scope = st.scope
    placer = filler = None
    for seg in (orc, obr):
        if seg is None:
            continue
        if placer is None:
            placer = ei_identifier(first(seg, 2), seg.enc, scope, "PLAC")
        if filler is None:
            filler = ei_identifier(first(seg, 3), seg.enc, scope, "FILL")
    return placer, filler


def _order_key(placer: Json | None, filler: Json | None, st: State, obr: Segment | None) -> tuple[str, ...]:
    scope = st.scope
    for kind, ident in (("placer", placer), ("filler", filler)):
        if ident is not None:
            return (kind, *scope.key(ident))
    patient_id = st.patient["id"] if st.patient is not None else ""
    if obr is not None:
        return ("patient", patient_id, first(obr, 4).split(obr.enc.component, 1)[0], value(obr, 7))
    return ("patient", patient_id)


def orc(seg: Segment, index: int, st: State) -> None:
    """ORC opens an order group. In order messages the ServiceRequest is made with the OBR that follows, or
    from the ORC alone when the group ends without one (``flush_order``)."""
    flush_order(st)
    st.order = None
    st.report = None
    st.specimens = []
    st.pending_orc, st.pending_index = seg, index


def flush_order(st: State) -> None:
    """An order message's ORC that no OBR followed still orders something: its ServiceRequest."""
    if st.pending_orc is not None and st.message_type in ("ORM", "OML", "MDM"):
        service_request(st.pending_orc, None, st.pending_index, st)
    st.pending_orc = None


def service_request(orc_seg: Segment | None, obr: Segment | None, index: int, st: State) -> Json:
    """ORC + OBR -> ServiceRequest: identifiers (placer, filler, ORC-4 requisition), status ORC-5 (table
    0038) else ORC-1 (table 0119), intent order, code OBR-4, priority ORC-7.6 / TQ1-9, authoredOn ORC-9,
    requester ORC-12 / OBR-16, reasons OBR-31."""
    scope = st.scope
    if st.patient is None:
        seg = obr or orc_seg
        assert seg is not None
        raise MappingError(f"{where(seg, index)} comes before any PID: an order needs a patient")
    placer, filler = _order_numbers(orc_seg, obr, st)
    key = _order_key(placer, filler, st, obr)
    sr = new_resource("ServiceRequest", scope.mint("ServiceRequest", *key), scope)
    st.bundle.add(sr)
    st.order, st.order_key = sr, key
    idents = [i for i in (placer, filler) if i is not None]
    if idents:
        sr["identifier"] = idents
    if orc_seg is not None:
        requisition = ei_identifier(first(orc_seg, 4), orc_seg.enc, scope, "PGN")
        if requisition is not None:
            sr["requisition"] = requisition
    status = ""
    if orc_seg is not None:
        status = ORDER_STATUS.get(value(orc_seg, 5).strip().upper(), "") or ORDER_CONTROL_STATUS.get(
            value(orc_seg, 1).strip().upper(), ""
        )
    sr["status"] = status or "unknown"
    sr["intent"] = "order"
    if orc_seg is not None:
        priority = PRIORITY.get(subcomponents(first(orc_seg, 7), orc_seg.enc, 6, 1)[0].strip().upper())
        if priority:
            sr["priority"] = priority
    if obr is not None:
        code_cc = cc(obr, 4, scope)
        if code_cc is not None:
            sr["code"] = code_cc
    sr["subject"] = ref(st.patient)
    if st.encounter is not None:
        sr["encounter"] = ref(st.encounter)
    if obr is not None:
        when = dt(obr, 7, scope)
        if when:
            sr["occurrenceDateTime"] = when
    if orc_seg is not None:
        authored = dt(orc_seg, 9, scope)
        if authored:
            sr["authoredOn"] = authored
    for seg, n in ((orc_seg, 12), (obr, 16)):
        if seg is not None and "requester" not in sr and first(seg, n) not in EMPTY:
            doctor = practitioner(first(seg, n), seg.enc, scope)
            if doctor is not None:
                st.bundle.add(doctor)
                sr["requester"] = ref(doctor)
    if obr is not None:
        reasons = ccs(obr, 31, scope)
        if reasons:
            sr["reasonCode"] = reasons
    st.last = sr
    return sr


def tq1(seg: Segment, index: int, st: State) -> None:
    """TQ1 (v2.5+ timing) on the open order: priority TQ1-9, start TQ1-7 as occurrence."""
    sr = st.order
    if sr is None:
        return
    priority = PRIORITY.get(value(seg, 9).strip().upper())
    if priority:
        sr["priority"] = priority
    start = dt(seg, 7, st.scope)
    if start and "occurrenceDateTime" not in sr:
        sr["occurrenceDateTime"] = start


def obr(seg: Segment, index: int, st: State) -> None:
    """OBR: a DiagnosticReport in results messages (ORU), the ServiceRequest's detail in orders."""
    orc_seg, st.pending_orc = st.pending_orc, None
    if st.message_type in ("ORM", "OML", "MDM"):
        st.specimens = []
        service_request(orc_seg, seg, index, st)
        return
    diagnostic_report(orc_seg, seg, index, st)


def diagnostic_report(orc_seg: Segment | None, obr_seg: Segment, index: int, st: State) -> None:
    """OBR -> DiagnosticReport: identifiers OBR-2/3, status OBR-25 (table 0123), category OBR-24 (table 0074),
    code OBR-4, effective OBR-7 (to OBR-8), issued OBR-22."""
    scope = st.scope
    if st.patient is None:
        raise MappingError(f"{where(obr_seg, index)} comes before any PID: a report needs a patient")
    code_cc = cc(obr_seg, 4, scope)
    if code_cc is None:
        raise MappingError(f"{where(obr_seg, index, 4)}: the universal service identifier (report code) is empty")
    placer, filler = _order_numbers(orc_seg, obr_seg, st)
    key = _order_key(placer, filler, st, obr_seg)
    dr = new_resource("DiagnosticReport", scope.mint("DiagnosticReport", *key), scope)
    idents = [i for i in (placer, filler) if i is not None]
    if idents:
        dr["identifier"] = idents
    dr["status"] = REPORT_STATUS.get(value(obr_seg, 25).strip().upper(), "unknown")
    section = first(obr_seg, 24)
    if section not in EMPTY:
        category = cc(obr_seg, 24, scope)
        if category is not None:
            for coding in category.get("coding", []):
                coding.setdefault("system", V2_0074)
            dr["category"] = [category]
    dr["code"] = code_cc
    dr["subject"] = ref(st.patient)
    if st.encounter is not None:
        dr["encounter"] = ref(st.encounter)
    start, end = dt(obr_seg, 7, scope), dt(obr_seg, 8, scope)
    if start and end and end != start:
        dr["effectivePeriod"] = {"start": start, "end": end}
    elif start:
        dr["effectiveDateTime"] = start
    issued = instant(obr_seg, 22, scope)
    if issued:
        dr["issued"] = issued
    st.bundle.add(dr)
    st.report = dr
    st.specimens = []
    st.last = None  # NTE after OBR: a DiagnosticReport has no note in R4


# --- observations -------------------------------------------------------------------------------------------


def obx(seg: Segment, index: int, st: State) -> None:
    """OBX -> Observation (or, in MDM, a line of the document)."""
    if st.document is not None:
        from .events import document_content

        if document_content(seg, index, st):
            return
    observation(seg, index, st)


def observation(seg: Segment, index: int, st: State) -> Json | None:
    """OBX -> Observation: status OBX-11 (table 0085), code OBX-3, value[x] by OBX-2 from OBX-5, units OBX-6,
    reference range OBX-7, interpretation OBX-8, effective OBX-14 (else the report's), performer OBX-16,
    method OBX-17. Linked to the open report (result), order (supportingInfo) or immunization (partOf)."""
    scope = st.scope
    if st.patient is None:
        raise MappingError(f"{where(seg, index)} comes before any PID: an observation needs a patient")
    code_cc = cc(seg, 3, scope)
    if code_cc is None:
        if value(seg, 2).strip().upper() in ("ED", "RP"):  # a report's document without a name of its own
            _attachment(seg, index, first(seg, 5), value(seg, 2).strip().upper(), st)
            return None
        raise MappingError(f"{where(seg, index, 3)}: the observation identifier is empty")
    parent = st.report or st.immunization or st.order or st.patient
    c3 = first(seg, 3).split(seg.enc.component)
    obs = new_resource(
        "Observation",
        scope.mint(
            "Observation", parent["resourceType"], parent["id"], c3[0], c3[2] if len(c3) > 2 else "", value(seg, 4)
        ),
        scope,
    )
    if st.immunization is not None and parent is st.immunization:
        obs["partOf"] = [ref(st.immunization)]
    obs["status"] = OBSERVATION_STATUS.get(value(seg, 11).strip().upper(), "unknown")
    obs["code"] = code_cc
    obs["subject"] = ref(st.patient)
    if st.encounter is not None:
        obs["encounter"] = ref(st.encounter)
    effective = dt(seg, 14, scope)
    if effective:
        obs["effectiveDateTime"] = effective
    elif st.report is not None:
        if "effectiveDateTime" in st.report:
            obs["effectiveDateTime"] = st.report["effectiveDateTime"]
        elif "effectivePeriod" in st.report:
            obs["effectivePeriod"] = st.report["effectivePeriod"]
    if st.report is not None and "issued" in st.report:
        obs["issued"] = st.report["issued"]
    performers = []
    for rep in reps(seg, 16):
        doctor = practitioner(rep, seg.enc, scope) if rep not in EMPTY else None
        if doctor is not None:
            st.bundle.add(doctor)
            performers.append(ref(doctor))
    if performers:
        obs["performer"] = performers
    unit = _unit(seg)
    _value_x(seg, index, obs, unit, st)
    interpretation = _interpretation(seg)
    if interpretation:
        obs["interpretation"] = interpretation
    method = cc(seg, 17, scope)
    if method is not None:
        obs["method"] = method
    if st.specimens:
        obs["specimen"] = ref(st.specimens[0])
    rr = reference_range(value(seg, 7) if seg.enc.component not in first(seg, 7) else text_of(seg, 7), unit)
    if rr is not None:
        obs["referenceRange"] = [rr]
    st.bundle.add(obs)
    if st.report is not None:
        st.report.setdefault("result", []).append(ref(obs))
    elif st.order is not None and st.immunization is None:
        st.order.setdefault("supportingInfo", []).append(ref(obs))
    st.last = obs
    return obs


def _unit(seg: Segment) -> Json | None:
    """OBX-6 as the unit part of a Quantity (no value), None when empty."""
    raw = first(seg, 6)
    if raw in EMPTY:
        return None
    c, _ = components(raw, seg.enc, 3)
    if not (c[1] or c[2]):
        return None
    q = quantity(0, c[1], c[2], c[3])
    del q["value"]
    return q


def _value_x(seg: Segment, index: int, obs: Json, unit: Json | None, st: State) -> None:
    """OBX-5 by OBX-2 (IG OBX[Observation] value[x] rows); an ED goes to the report's presentedForm."""
    value_type = value(seg, 2).strip().upper()
    raw = seg.raw(5)
    if raw in EMPTY:
        return
    enc = seg.enc
    first_rep = first(seg, 5)
    if value_type == "NM":
        n = number(value(seg, 5))
        if n is None:
            text = text_of(seg, 5)
            if text:
                obs["valueString"] = text
            return
        obs["valueQuantity"] = {"value": n, **(unit or {})}
    elif value_type == "SN":
        _structured_numeric(first_rep, enc, obs, unit)
    elif value_type in _CODED_TYPES:
        concept = codeable_concept(first_rep, enc, None, None, st.scope.settings)
        if concept is not None:
            obs["valueCodeableConcept"] = concept
    elif value_type in ("DT", "TS", "DTM"):
        when = to_datetime(value(seg, 5), st.scope.offset)
        if when:
            obs["valueDateTime"] = when
    elif value_type == "TM":
        t = _time(value(seg, 5))
        if t:
            obs["valueTime"] = t
    elif value_type in ("ED", "RP"):
        _attachment(seg, index, first_rep, value_type, st)
    else:  # ST, TX, FT and anything else: the text
        text = text_of(seg, 5)
        if value_type not in _TEXT_TYPES:
            text = clean(text.replace(enc.component, " "))
        if text:
            obs["valueString"] = text


def _structured_numeric(raw: str, enc: Encoding, obs: Json, unit: Json | None) -> None:
    """SN (comparator^num1^separator^num2): "<^5" a Quantity with comparator, "^1^-^5" a Range, "^1^:^128" a
    Ratio; anything else the text."""
    c, _ = components(raw, enc, 4)
    comparator, n1, sep, n2 = c[1], number(c[2]), c[3], number(c[4]) if c[4] else None
    u = unit or {}
    if sep and n1 is not None and n2 is not None and sep in _SN_SEPARATORS:
        if _SN_SEPARATORS[sep] == "range":
            obs["valueRange"] = {"low": {**u, "value": n1}, "high": {**u, "value": n2}}
        else:
            obs["valueRatio"] = {"numerator": {"value": n1}, "denominator": {"value": n2}}
        return
    if n1 is not None and not sep and (not comparator or comparator in _COMPARATORS or comparator == "="):
        q: Json = {"value": n1, **u}
        if comparator in _COMPARATORS:
            q["comparator"] = _COMPARATORS[comparator]
        obs["valueQuantity"] = q
        return
    text = " ".join(x for x in c[1:5] if x)
    if text:
        obs["valueString"] = text


def _time(value_: str) -> str | None:
    t = value_.strip().split("+")[0].split("-")[0]
    if len(t) < 4 or not t[:4].isdigit():
        return None
    hh, mm = t[:2], t[2:4]
    ss = t[4:6] if len(t) >= 6 and t[4:6].isdigit() else "00"
    if hh > "23" or mm > "59" or ss > "59":
        return None
    return f"{hh}:{mm}:{ss}"


def _attachment(seg: Segment, index: int, raw: str, value_type: str, st: State) -> None:
    """ED/RP in a result: the report's presentedForm (R4 Observation has no Attachment value)."""
    att = attachment(raw, seg, index, value_type)
    if att is None:
        return
    if st.report is not None:
        st.report.setdefault("presentedForm", []).append(att)


def attachment(raw: str, seg: Segment, index: int, value_type: str) -> Json | None:
    """ED (source^type^subtype^encoding^data) or RP (pointer^application^type^subtype) -> Attachment."""
    c, _ = components(raw, seg.enc, 5)
    if value_type == "RP":
        if not c[1]:
            return None
        att: Json = {"url": c[1]} if ":" in c[1] else {"title": c[1]}
        if c[3] and c[4]:
            att["contentType"] = f"{c[3].lower()}/{c[4].lower()}"
        return att
    data = c[5]
    if not data:
        return None
    content_type = _content_type(c[2], c[3])
    if c[4].upper() == "BASE64":
        compact = "".join(data.split())
        try:
            base64.b64decode(compact, validate=True)
        except (binascii.Error, ValueError):
            raise MappingError(f"{where(seg, index, 5)}: the encapsulated data is not valid Base64") from None
        return {"contentType": content_type, "data": compact}
    return {"contentType": content_type, "data": base64.b64encode(data.encode()).decode()}


def _content_type(type_of_data: str, subtype: str) -> str:
    t, s = type_of_data.strip().lower(), subtype.strip().lower()
    if s and "/" in s:
        return s
    if t in ("application", "image", "audio", "video", "text", "multipart") and s:
        return f"{t}/{s}"
    if s in ("pdf", "rtf", "xml", "json", "dicom", "octet-stream", "msword"):
        return f"application/{s}"
    if s in ("jpeg", "png", "gif", "tiff"):
        return f"image/{s}"
    if t == "tx" or s in ("plain", "html"):
        return f"text/{s or 'plain'}"
    return "application/octet-stream"


def _interpretation(seg: Segment) -> list[Json]:
    out = []
    for rep in reps(seg, 8):
        if rep in EMPTY:
            continue
        c, _ = components(rep, seg.enc, 2)
        code_ = c[1]
        if not code_:
            continue
        system = V3_INTERPRETATION if code_ in INTERPRETATION else V2_0078
        coding: Json = {"system": system, "code": " ".join(code_.split())}
        if c[2]:
            coding["display"] = c[2]
        out.append({"coding": [coding]})
    return out


# --- specimens and notes ------------------------------------------------------------------------------------


def spm(seg: Segment, index: int, st: State) -> None:
    """SPM -> Specimen: identifiers SPM-2 (placer&filler), type SPM-4, collection SPM-17 and body site SPM-8,
    received SPM-18; linked from the open report or order and its observations."""
    scope = st.scope
    if st.patient is None:
        raise MappingError(f"{where(seg, index)} comes before any PID: a specimen needs a patient")
    enc = seg.enc
    raw_id = first(seg, 2)
    idents: list[Json] = []
    if raw_id not in EMPTY:
        # EIP: placer assigned id ^ filler assigned id, each an EI in subcomponents
        for comp, type_code in ((1, "PLAC"), (2, "FILL")):
            subs = subcomponents(raw_id, enc, comp, 4)
            if subs[0].strip():
                ident: Json = {"type": {"coding": [{"system": V2_0203, "code": type_code}]}}
                system = authority_system(subs[1], subs[2], subs[3], scope.settings) if (subs[1] or subs[2]) else None
                if system:
                    ident["system"] = system
                ident["value"] = clean(subs[0])
                idents.append(ident)
    parent = st.report or st.order
    if idents:
        key: tuple[str, ...] = ("id", *(part for i in idents for part in scope.key(i)))
    else:
        key = ("in", parent["id"] if parent else st.patient["id"], value(seg, 1))
    specimen = new_resource("Specimen", scope.mint("Specimen", *key), scope)
    if idents:
        specimen["identifier"] = idents
    specimen_type = cc(seg, 4, scope)
    if specimen_type is not None:
        specimen["type"] = specimen_type
    specimen["subject"] = ref(st.patient)
    received = dt(seg, 18, scope)
    if received:
        specimen["receivedTime"] = received
    collection: Json = {}
    raw17 = first(seg, 17)
    if raw17 not in EMPTY:
        dr = subcomponents(raw17, enc, 1, 1)[0]
        end = subcomponents(raw17, enc, 2, 1)[0]
        start_dt, end_dt = to_datetime(clean(dr), scope.offset), to_datetime(clean(end), scope.offset)
        if start_dt and end_dt and start_dt != end_dt:
            collection["collectedPeriod"] = period(start_dt, end_dt)
        elif start_dt:
            collection["collectedDateTime"] = start_dt
    site = cc(seg, 8, scope)
    if site is not None:
        collection["bodySite"] = site
    if collection:
        specimen["collection"] = collection
    if st.order is not None and st.report is None:
        specimen["request"] = [ref(st.order)]
    st.bundle.add(specimen)
    st.specimens.append(specimen)
    if st.report is not None:
        st.report.setdefault("specimen", []).append(ref(specimen))
    elif st.order is not None:
        st.order.setdefault("specimen", []).append(ref(specimen))
    st.last = None


def nte(seg: Segment, index: int, st: State) -> None:
    """NTE -> an Annotation on the resource before it (Observation, ServiceRequest, AllergyIntolerance,
    Immunization, Appointment via comment); ignored where the resource has no note."""
    target = st.last
    if target is None:
        return
    text = text_of(seg, 3)
    if not text:
        return
    if target["resourceType"] in ("Observation", "ServiceRequest", "AllergyIntolerance", "Immunization", "Specimen"):
        target.setdefault("note", []).append({"text": text})
    elif target["resourceType"] == "Appointment":
        target["comment"] = f"{target['comment']}\n{text}" if "comment" in target else text
