"""One walk over a message's segments, in order, handing each to its segment map, then a Provenance.

The segment maps are shared by every message type (a PID is a Patient in an ADT, an ORU or a VXU alike); the
message type decides only what an ORC/OBR/OBX means (order, result, immunization observation, document line)
and the events' statuses. Segments without a map (EVN, PV2, Z-segments, ...) are skipped: they stay in the
journal's raw message (routes and MLLP forwards carry them), so a map added later can replay them.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from typing import Any

from gateway.hl7v2.parse import Message, Segment, unescape

from .. import MapContext, MappingError
from .adt import encounter_resources, patient_resource
from .bundle import TransactionBundle
from .clinical import al1, dg1, in1, mrg, nk1, pd1, rol
from .common import Scope, first, new_resource, value, where
from .datatypes import Json, clean
from .dates import to_datetime
from .events import ai_resource, appointment_tq1, finish_appointment, finish_document, rxa, rxr, sch, txa
from .results import flush_order, nte, obr, obx, orc, spm, tq1
from .settings import MappingSettings
from .state import State
from .tables import V2_0003

_PROVENANCE_AGENT = "http://terminology.hl7.org/CodeSystem/provenance-participant-type"


def _pid(seg: Segment, index: int, st: State) -> None:
    finish_document(st)
    st.patient = patient = patient_resource(seg, st.scope)
    st.bundle.add(patient)
    st.encounter = None
    st.order = st.report = st.immunization = None
    st.last = None
    if st.appointment is not None:
        pass  # SIU: the patient joins the open appointment when it closes


def _pv1(seg: Segment, index: int, st: State) -> None:
    if st.patient is None:
        raise MappingError(f"{where(seg, index)} comes before any PID: a visit needs a patient")
    mapped = encounter_resources(seg, st.trigger, st.patient["id"], st.scope)
    if mapped is None:
        return
    encounter, practitioners = mapped
    st.bundle.add(encounter)
    for p in practitioners:
        st.bundle.add(p)
    st.encounter = encounter


def _mrg(seg: Segment, index: int, st: State) -> None:
    if st.trigger == "A40":  # A06/A07 carry an MRG about the prior visit, not a patient merge
        mrg(seg, index, st)


def _obx(seg: Segment, index: int, st: State) -> None:
    if st.message_type == "SIU":
        return  # observations about an appointment request: not mapped (IG leaves them to the order)
    obx(seg, index, st)


def _tq1(seg: Segment, index: int, st: State) -> None:
    if st.appointment is not None:
        appointment_tq1(seg, index, st)
    else:
        tq1(seg, index, st)


def _orc(seg: Segment, index: int, st: State) -> None:
    finish_document(st)
    st.immunization = None
    orc(seg, index, st)


SEGMENT_MAPS: dict[str, Callable[[Segment, int, State], None]] = {
    "PID": _pid,
    "PD1": pd1,
    "NK1": nk1,
    "PV1": _pv1,
    "ROL": rol,
    "AL1": al1,
    "DG1": dg1,
    "IN1": in1,
    "MRG": _mrg,
    "ORC": _orc,
    "OBR": obr,
    "TQ1": _tq1,
    "OBX": _obx,
    "SPM": spm,
    "NTE": nte,
    "RXA": rxa,
    "RXR": rxr,
    "TXA": txa,
    "SCH": sch,
    "AIS": ai_resource,
    "AIG": ai_resource,
    "AIL": ai_resource,
    "AIP": ai_resource,
}

# Segments each message type maps (others are skipped: e.g. an ADT's OBR is not an order we were sent).
_COMMON = frozenset({"PID", "PD1", "NK1", "PV1", "ROL", "AL1", "DG1", "IN1", "NTE"})
MESSAGE_SEGMENTS: dict[str, frozenset[str]] = {
    "ADT": _COMMON | {"MRG", "OBX"},
    "ORU": _COMMON | {"ORC", "OBR", "OBX", "SPM", "TQ1"},
    "ORM": _COMMON | {"ORC", "OBR", "OBX", "SPM", "TQ1"},
    "OML": _COMMON | {"ORC", "OBR", "OBX", "SPM", "TQ1"},
    "VXU": _COMMON | {"ORC", "RXA", "RXR", "OBX", "TQ1"},
    "MDM": _COMMON | {"ORC", "OBR", "TXA", "OBX", "TQ1"},
    "SIU": _COMMON | {"SCH", "TQ1", "AIS", "AIG", "AIL", "AIP", "OBX"},
}
# (a configured Z-segment name never collides with these: they are all standard segments)


def map_message(
    msg: Message, ctx: MapContext, message_type: str, trigger: str, settings: MappingSettings
) -> dict[str, Any]:
    """The transaction Bundle for one message of a mapped type; MappingError names the segment and field."""
    scope = Scope(msg, ctx, settings)
    bundle = TransactionBundle()
    st = State(scope=scope, bundle=bundle, message_type=message_type, trigger=trigger)
    if message_type != "SIU" and msg.first("PID") is None:
        raise MappingError(f"{message_type}^{trigger} has no PID segment")
    wanted = MESSAGE_SEGMENTS[message_type]
    maps = SEGMENT_MAPS
    z_segments = settings.z_segments
    for index, seg in enumerate(msg.segments):
        name = seg.name
        if name in wanted:
            if name == "SCH":
                finish_appointment(st)
            maps[name](seg, index, st)
        elif z_segments and name in z_segments:
            z_segment(seg, z_segments[name], st)
        elif name in ("MSH", "BHS", "FHS") and index:
            raise MappingError(f"{where(seg, index)}: a second header inside one message (a batch must be split first)")
    flush_order(st)
    finish_document(st)
    finish_appointment(st)
    if st.patient is None and message_type != "SIU":
        raise MappingError(f"{message_type}^{trigger} has no PID segment")
    if not bundle.entries:
        raise MappingError(f"{message_type}^{trigger} has nothing to map")
    bundle.add(provenance(msg, ctx, scope, message_type, trigger, bundle.entries))
    return bundle.build()


def z_segment(seg: Segment, url: str, st: State) -> None:
    """A configured Z-segment -> an extension on the resource it follows (else the patient): one nested
    extension per valued field, named ``ZXX.n``, with the field's text."""
    target = st.last or st.encounter or st.patient
    if target is None:
        return
    parts = [
        {"url": f"{seg.name}.{n}", "valueString": text}
        for n in range(1, len(seg.fields))
        if seg.raw(n) != '""' and (text := clean(unescape(seg.raw(n), seg.enc)))
    ]
    if parts:
        target.setdefault("extension", []).append({"url": url, "extension": parts})


def provenance(
    msg: Message, ctx: MapContext, scope: Scope, message_type: str, trigger: str, entries: list[dict[str, Any]]
) -> Json:
    """A Provenance for the message: every resource it wrote (target), when the sender says it happened
    (MSH-7), when the gateway received it, the event (table 0003), the sending application and facility
    (author) and the gateway source (assembler), and the message itself as the source entity (MSH-10).
    Its id hashes the sender, the control id and the whole text, so a resend updates it."""
    msh = msg.msh
    digest = hashlib.sha256()
    for seg in msg.segments:
        digest.update("\x1f".join(seg.fields).encode("utf-8", "surrogatepass"))
        digest.update(b"\r")
    control_id = value(msh, 10)
    prov = new_resource("Provenance", scope.mint("Provenance", scope.facility, control_id, digest.hexdigest()), scope)
    prov["target"] = [{"reference": f"{e['resource']['resourceType']}/{e['resource']['id']}"} for e in entries]
    occurred = to_datetime(value(msh, 7), scope.offset)
    if occurred:
        prov["occurredDateTime"] = occurred
    prov["recorded"] = ctx.received_at.isoformat()
    activity: Json = {"coding": [{"system": V2_0003, "code": trigger}]} if trigger else {}
    activity["text"] = f"{message_type}^{trigger}" if trigger else message_type
    prov["activity"] = activity
    sender = " ".join(filter(None, (_hd_text(first(msh, 3), msh), _hd_text(first(msh, 4), msh))))
    prov["agent"] = [
        {
            "type": {"coding": [{"system": _PROVENANCE_AGENT, "code": "author", "display": "Author"}]},
            "who": {"display": sender or "unnamed sending application"},
        },
        {
            "type": {"coding": [{"system": _PROVENANCE_AGENT, "code": "assembler", "display": "Assembler"}]},
            "who": {"display": f"hl7-gateway source {ctx.source}"},
        },
    ]
    what: Json = {"display": f"HL7 v2 {activity['text']} message"}
    if control_id.strip():
        what["identifier"] = {"value": control_id.strip()}
    prov["entity"] = [{"role": "source", "what": what}]
    return prov


def _hd_text(raw: str, msh: Segment) -> str:
    from .datatypes import components

    c, _ = components(raw, msh.enc, 2)
    return c[1] or c[2]
