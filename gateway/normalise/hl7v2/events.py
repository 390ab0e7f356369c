"""Immunizations (VXU: RXA/RXR), documents (MDM: TXA + OBX content) and appointments (SIU: SCH, TQ1,
AIS/AIG/AIL/AIP), after the IG's RXA[Immunization], TXA[DocumentReference] and SCH[Appointment] maps."""

from __future__ import annotations

import base64
import datetime as _dt

from gateway.hl7v2.parse import Segment

from .. import MappingError
from .common import (
    EMPTY,
    cc,
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
from .datatypes import Json, components
from .dates import to_datetime
from .results import attachment
from .state import State
from .tables import (
    APPOINTMENT_EVENT_STATUS,
    APPOINTMENT_STATUS,
    DOCUMENT_STATUS,
    IMMUNIZATION_STATUS,
    V2_0443,
)
from .units import quantity

_CVX_UNKNOWN_UNITS = ("", "999")

# --- VXU: immunizations ---------------------------------------------------------------------------------------


def rxa(seg: Segment, index: int, st: State) -> None:
    """RXA -> Immunization: vaccine RXA-5, occurrence RXA-3, dose RXA-6/7, performer RXA-10 (administering)
    and ORC-12 (ordering), primary source from RXA-9 (NIP001 "00" = new record), lot RXA-15, expiry RXA-16,
    manufacturer RXA-17, status RXA-20 (table 0322) or RXA-21 "D" (entered in error), status reason RXA-18."""
    scope = st.scope
    if st.patient is None:
        raise MappingError(f"{where(seg, index)} comes before any PID: an immunization needs a patient")
    vaccine = cc(seg, 5, scope)
    if vaccine is None:
        raise MappingError(f"{where(seg, index, 5)}: the administered code (vaccine) is empty")
    when = dt(seg, 3, scope)
    if when is None:
        raise MappingError(f"{where(seg, index, 3)}: the administration date is absent or not a valid date")
    orc_seg, st.pending_orc = st.pending_orc, None
    filler = ei_identifier(first(orc_seg, 3), orc_seg.enc, scope, "FILL") if orc_seg is not None else None
    placer = ei_identifier(first(orc_seg, 2), orc_seg.enc, scope, "PLAC") if orc_seg is not None else None
    if filler is not None:
        key: tuple[str, ...] = ("filler", *scope.key(filler))
    else:
        c5 = first(seg, 5).split(seg.enc.component)
        key = ("patient", st.patient["id"], c5[0], c5[2] if len(c5) > 2 else "", value(seg, 3))
    imm = new_resource("Immunization", scope.mint("Immunization", *key), scope)
    idents = [i for i in (placer, filler) if i is not None]
    if idents:
        imm["identifier"] = idents
    action = value(seg, 21).strip().upper()
    status = "entered-in-error" if action == "D" else IMMUNIZATION_STATUS.get(value(seg, 20).strip().upper())
    imm["status"] = status or "completed"
    if imm["status"] == "not-done":
        reason = cc(seg, 18, scope)
        if reason is not None:
            imm["statusReason"] = reason
    imm["vaccineCode"] = vaccine
    imm["patient"] = ref(st.patient)
    if st.encounter is not None:
        imm["encounter"] = ref(st.encounter)
    imm["occurrenceDateTime"] = when
    recorded = dt(seg, 22, scope)
    if recorded:
        imm["recorded"] = recorded
    source = value(seg, 9).strip()
    if source:
        imm["primarySource"] = source == "00"
        origin = cc(seg, 9, scope)
        if origin is not None and source != "00":
            imm["reportOrigin"] = origin
    lot = value(seg, 15).strip()
    if lot:
        imm["lotNumber"] = lot
    expiry = dt(seg, 16, scope)
    if expiry:
        imm["expirationDate"] = expiry[:10]
    manufacturer = first(seg, 17)
    if manufacturer not in EMPTY:
        c, _ = components(manufacturer, seg.enc, 3)
        if c[1] or c[2]:
            m: Json = {}
            if c[1]:
                m["identifier"] = (
                    {"system": "http://hl7.org/fhir/sid/mvx", "value": c[1]} if c[3] == "MVX" else {"value": c[1]}
                )
            if c[2]:
                m["display"] = c[2]
            imm["manufacturer"] = m
    amount = value(seg, 6).strip()
    try:
        dose = float(amount) if amount and amount not in _CVX_UNKNOWN_UNITS else None
    except ValueError:
        dose = None
    if dose is not None and dose == dose and abs(dose) < 1e12:
        q: Json = {"value": int(dose) if dose.is_integer() and "." not in amount else dose}
        units = first(seg, 7)
        if units not in EMPTY:
            uc, _ = components(units, seg.enc, 3)
            q = quantity(q["value"], uc[1], uc[2], uc[3])
        imm["doseQuantity"] = q
    performers: list[Json] = []
    for function, seg_, n in (("AP", seg, 10), ("OP", orc_seg, 12)):
        if seg_ is None:
            continue
        for rep in reps(seg_, n):
            doctor = practitioner(rep, seg_.enc, scope) if rep not in EMPTY else None
            if doctor is not None:
                st.bundle.add(doctor)
                display = "Administering Provider" if function == "AP" else "Ordering Provider"
                performers.append(
                    {
                        "function": {"coding": [{"system": V2_0443, "code": function, "display": display}]},
                        "actor": ref(doctor),
                    }
                )
    if performers:
        imm["performer"] = performers
    st.bundle.add(imm)
    st.immunization = imm
    st.last = imm


def rxr(seg: Segment, index: int, st: State) -> None:
    """RXR -> Immunization.route (RXR-1) and site (RXR-2)."""
    imm = st.immunization
    if imm is None:
        return
    route = cc(seg, 1, st.scope)
    if route is not None:
        imm["route"] = route
    site = cc(seg, 2, st.scope)
    if site is not None:
        imm["site"] = site


# --- MDM: documents -------------------------------------------------------------------------------------------


def txa(seg: Segment, index: int, st: State) -> None:
    """TXA -> DocumentReference: type TXA-2, date TXA-4 (activity) or TXA-6 (origination), author TXA-9 /
    TXA-5, unique document number TXA-12 (masterIdentifier), placer/filler TXA-14/15, completion status TXA-17
    (docStatus), availability TXA-19 (OB/OBsolete -> superseded; CA completion -> entered-in-error). The
    content comes from the OBX segments that follow."""
    scope = st.scope
    if st.patient is None:
        raise MappingError(f"{where(seg, index)} comes before any PID: a document needs a patient")
    master = ei_identifier(first(seg, 12), seg.enc, scope)
    if master is not None:
        key: tuple[str, ...] = ("document", *scope.key(master))
    else:
        key = ("patient", st.patient["id"], first(seg, 2), value(seg, 4), value(seg, 6), value(seg, 1))
    doc = new_resource("DocumentReference", scope.mint("DocumentReference", *key), scope)
    if master is not None:
        doc["masterIdentifier"] = master
    idents = [
        i
        for n, t in ((14, "PLAC"), (15, "FILL"))
        for rep in reps(seg, n)[:1]
        if (i := ei_identifier(rep, seg.enc, scope, t)) is not None
    ]
    if idents:
        doc["identifier"] = idents
    completion = value(seg, 17).strip().upper()
    availability = value(seg, 19).strip().upper()
    if completion == "CA":
        doc["status"] = "entered-in-error"
    elif availability in ("OB", "RE"):
        doc["status"] = "superseded"
    else:
        doc["status"] = "current"
    doc_status = DOCUMENT_STATUS.get(completion)
    if doc_status:
        doc["docStatus"] = doc_status
    doc_type = cc(seg, 2, scope)
    if doc_type is not None:
        doc["type"] = doc_type
    doc["subject"] = ref(st.patient)
    date = instant(seg, 4, scope) or instant(seg, 6, scope)
    if date:
        doc["date"] = date
    authors = []
    for n in (9, 5):
        for rep in reps(seg, n):
            doctor = practitioner(rep, seg.enc, scope) if rep not in EMPTY else None
            if doctor is not None:
                st.bundle.add(doctor)
                if ref(doctor) not in authors:
                    authors.append(ref(doctor))
        if authors:
            break
    if authors:
        doc["author"] = authors
    for rep in reps(seg, 22)[:1]:
        doctor = practitioner(rep, seg.enc, scope) if rep not in EMPTY else None
        if doctor is not None:
            st.bundle.add(doctor)
            doc["authenticator"] = ref(doctor)
    if st.encounter is not None:
        doc["context"] = {"encounter": [ref(st.encounter)]}
    st.bundle.add(doc)
    st.document = doc
    st.document_text = []
    st.last = None


def document_content(seg: Segment, index: int, st: State) -> bool:
    """An OBX of an MDM document: text (TX/FT/ST/CE) becomes a line of the text/plain attachment, ED/RP its
    own attachment. Returns False for anything else (mapped as an Observation)."""
    doc = st.document
    assert doc is not None
    value_type = value(seg, 2).strip().upper()
    if value_type in ("TX", "FT", "ST", ""):
        line = text_of(seg, 5)
        st.document_text.append(line)
        return True
    if value_type in ("ED", "RP"):
        att = attachment(first(seg, 5), seg, index, value_type)
        if att is not None:
            doc.setdefault("content", []).append({"attachment": att})
        return True
    return False


def finish_document(st: State) -> None:
    """Close the open document: its text lines become one UTF-8 text/plain attachment. A DocumentReference
    needs content: a document with none gets an attachment saying so (FHIR: title only is allowed)."""
    doc = st.document
    if doc is None:
        return
    if st.document_text:
        text = "\n".join(st.document_text)
        doc.setdefault("content", []).insert(
            0,
            {
                "attachment": {
                    "contentType": "text/plain; charset=utf-8",
                    "data": base64.b64encode(text.encode()).decode(),
                }
            },
        )
    if "content" not in doc:
        doc["content"] = [{"attachment": {"title": "no content in the message"}}]
    st.document = None
    st.document_text = []


# --- SIU: appointments ----------------------------------------------------------------------------------------


def sch(seg: Segment, index: int, st: State) -> None:
    """SCH -> Appointment: identifiers SCH-1 (placer) / SCH-2 (filler), reason SCH-7, type SCH-8, duration
    SCH-9/10, start/end SCH-11.4/11.5 (TQ, to v2.5), status SCH-25 (table 0278) else the trigger event. The
    patient and resources (PID, AIS, AIG, AIL, AIP) join as participants."""
    scope = st.scope
    placer = ei_identifier(first(seg, 1), seg.enc, scope, "PLAC")
    filler = ei_identifier(first(seg, 2), seg.enc, scope, "FILL")
    if filler is not None:
        key: tuple[str, ...] = ("filler", *scope.key(filler))
    elif placer is not None:
        key = ("placer", *scope.key(placer))
    else:
        raise MappingError(
            f"{where(seg, index, 1)}: the appointment has neither a placer (SCH-1) nor a filler (SCH-2) id"
        )
    appt = new_resource("Appointment", scope.mint("Appointment", *key), scope)
    idents = [i for i in (placer, filler) if i is not None]
    appt["identifier"] = idents
    filler_status = value(seg, 25).strip().upper()
    appt["status"] = APPOINTMENT_STATUS.get(filler_status) or APPOINTMENT_EVENT_STATUS.get(st.trigger, "booked")
    reason = cc(seg, 7, scope)
    if reason is not None:
        appt["reasonCode"] = [reason]
    appt_type = cc(seg, 8, scope)
    if appt_type is not None:
        appt["appointmentType"] = appt_type
    tq = first(seg, 11)
    if tq not in EMPTY:
        c, _ = components(tq, seg.enc, 5)
        start, end = to_datetime(c[4], scope.offset), to_datetime(c[5], scope.offset)
        if start and "T" in start:
            appt["start"] = start
        if end and "T" in end:
            appt["end"] = end
    minutes = _minutes(value(seg, 9), value(seg, 10))
    if minutes:
        appt["minutesDuration"] = minutes
    appt["participant"] = []
    st.appointment = appt
    st.bundle.add(appt)
    st.last = appt


def _minutes(amount: str, units: str) -> int | None:
    a = amount.strip()
    if not a.isdigit():
        return None
    n = int(a)
    u = units.strip().upper()
    factor = {"S": 0, "SEC": 0, "M": 1, "MIN": 1, "MINUTES": 1, "H": 60, "HR": 60, "HOURS": 60, "": 1}.get(u)
    if factor is None or factor == 0:
        return None
    minutes = n * factor
    return minutes if 0 < minutes < 2**31 else None


def appointment_tq1(seg: Segment, index: int, st: State) -> None:
    """TQ1 (v2.6+) on an appointment: start TQ1-7, end TQ1-8."""
    appt = st.appointment
    if appt is None:
        return
    start, end = instant(seg, 7, st.scope), instant(seg, 8, st.scope)
    if start:
        appt["start"] = start
    if end:
        appt["end"] = end


def ai_resource(seg: Segment, index: int, st: State) -> None:
    """AIS (service: serviceType, start AIS-4 + duration AIS-7/8), AIG (resource AIG-3), AIL (location AIL-3)
    and AIP (person AIP-3) -> Appointment.participant (status from AI*-filler status, else accepted)."""
    appt = st.appointment
    if appt is None:
        return
    scope = st.scope
    name = seg.name
    actor: Json | None = None
    if name == "AIS":
        service = cc(seg, 3, scope)
        if service is not None:
            appt.setdefault("serviceType", []).append(service)
        if "start" not in appt:
            start = instant(seg, 4, scope)
            if start:
                appt["start"] = start
                minutes = _minutes(value(seg, 7), value(seg, 8))
                if minutes and "end" not in appt:
                    appt["end"] = _plus_minutes(start, minutes)
        return
    if name == "AIP":
        for rep in reps(seg, 3):
            doctor = practitioner(rep, seg.enc, scope) if rep not in EMPTY else None
            if doctor is not None:
                st.bundle.add(doctor)
                actor = ref(doctor)
                break
    elif name == "AIL":
        c, _ = components(first(seg, 3), seg.enc, 9)
        display = c[9] or ", ".join(filter(None, (c[1], c[2], c[3], c[4])))
        if display:
            actor = {"display": display}
    elif name == "AIG":
        c, _ = components(first(seg, 3), seg.enc, 2)
        display = c[2] or c[1]
        if display:
            actor = {"display": display}
    if actor is None:
        return
    participant: Json = {}
    role = cc(seg, 4, scope)
    if role is not None:
        participant["type"] = [role]
    participant["actor"] = actor
    participant["status"] = "accepted"
    appt["participant"].append(participant)
    if "start" not in appt and name in ("AIP", "AIL", "AIG"):
        start_n, dur_n, unit_n = (8, 11, 12) if name == "AIG" else (6, 9, 10)
        start = instant(seg, start_n, scope)
        if start:
            appt["start"] = start
            minutes = _minutes(value(seg, dur_n), value(seg, unit_n))
            if minutes:
                appt["end"] = _plus_minutes(start, minutes)


def _plus_minutes(start: str, minutes: int) -> str:
    return (_dt.datetime.fromisoformat(start) + _dt.timedelta(minutes=minutes)).isoformat()


def finish_appointment(st: State) -> None:
    """Close the open appointment: the patient joins the participants, and FHIR's rule that a booked
    appointment has a start and an end is kept (app-3): without both, a booked appointment keeps neither and
    becomes "proposed" (documented in docs/mapping.md); app-2 likewise needs both or neither."""
    appt = st.appointment
    if appt is None:
        return
    if st.patient is not None:
        appt["participant"].insert(0, {"actor": ref(st.patient), "status": "accepted"})
    if not appt["participant"]:
        appt["participant"].append({"type": [{"text": "unknown"}], "status": "needs-action"})
    if "start" in appt and "end" in appt and appt["end"] < appt["start"]:
        del appt["end"]
    if ("start" in appt) != ("end" in appt):
        if "start" in appt and appt.get("minutesDuration"):
            appt["end"] = _plus_minutes(appt["start"], appt["minutesDuration"])
        else:
            appt.pop("start", None)
            appt.pop("end", None)
    if "start" not in appt and appt["status"] not in ("proposed", "cancelled", "waitlist"):
        appt["status"] = "proposed"
    st.appointment = None
