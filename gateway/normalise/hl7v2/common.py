"""What every HL7 v2 map shares: the per-message scope (sender offset, facility, settings, id minting), raw field
access without Field objects, patient and practitioner helpers.

Ids (``Scope.mint``): a deterministic hash of the resource type and business identifiers
(``gateway.ids.resource_id``). When the same business key recurs inside one message for entities the message
keeps apart (two OBX with the same code and sub-id under one OBR, two AL1 for one allergen), the second and
later get their occurrence number in the key, so distinct segments never merge into one resource while a resent
message still gives the very same ids.
"""

from __future__ import annotations

from functools import lru_cache

from gateway.hl7v2.parse import Encoding, Field, Message, Segment, unescape
from gateway.ids import resource_id

from .. import MapContext
from .bundle import meta_for
from .datatypes import (
    Json,
    authority_system,
    clean,
    code,
    codeable_concept,
    components,
    hd_system,
    subcomponents,
    xcn_identifier,
    xcn_name,
)
from .dates import offset_of, to_datetime
from .settings import DEFAULT_SETTINGS, MappingSettings
from .tables import V2_0203


class Scope:
    """What every resource of one message shares: the sender's offset (from MSH-7), the facility that scopes
    unqualified identifiers, and meta.source."""

    __slots__ = ("_minted", "facility", "meta_source", "msg", "offset", "settings")

    def __init__(self, msg: Message, ctx: MapContext, settings: MappingSettings = DEFAULT_SETTINGS) -> None:
        msh = msg.msh
        self.msg = msg
        msh7 = value(msh, 7)
        self.offset = offset_of(msh7)
        if self.offset is None and settings.default_timezone:
            self.offset = settings.default_offset(msh7)
        self.facility = _facility(first(msh, 4), msh.enc) or _facility(first(msh, 3), msh.enc) or ""
        self.meta_source = meta_for(ctx)
        self.settings = settings
        self._minted: dict[tuple[str, ...], int] = {}

    def mint(self, resource_type: str, *parts: str) -> str:
        """A deterministic id for a resource whose business key is ``parts``; a key seen before in this
        message gets its occurrence number appended (see the module docstring)."""
        key = (resource_type, *parts)
        seen = self._minted.get(key, 0)
        self._minted[key] = seen + 1
        if seen:
            return resource_id(resource_type, *parts, f"#{seen + 1}")
        return resource_id(resource_type, *parts)

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


def reps(seg: Segment, n: int) -> list[str]:
    """Field n's repetitions as raw text, empty ones kept: ``[r.raw for r in seg.repetitions(n)]``."""
    fields = seg.fields
    raw = fields[n] if n < len(fields) else ""
    return raw.split(seg.enc.repetition) if raw else []


def first(seg: Segment, n: int) -> str:
    """The raw text of field n's first repetition ("" when absent): ``seg.field(n).raw``."""
    fields = seg.fields
    raw = fields[n] if n < len(fields) else ""
    rep = seg.enc.repetition
    return raw.split(rep, 1)[0] if rep in raw else raw


def value(seg: Segment, n: int) -> str:
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
EMPTY = ("", '""')


def practitioner(raw: str, enc: Encoding, scope: Scope) -> Json | None:
    """XCN -> Practitioner (IG XCN[Practitioner]); None when it has neither an identifier nor a name."""
    c, n = components(raw, enc, 21)
    ident = xcn_identifier(raw, enc, c, n, scope.settings)
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


# --- helpers every segment map uses ---------------------------------------------------------------------------


def where(seg: Segment, index: int, n: int | None = None) -> str:
    """A location for error messages: segment name, its position in the message (1-based) and the field, e.g.
    "OBR #2 (segment 7), OBR-4". No value: it may be PHI."""
    at = f"{seg.name} (segment {index + 1})"
    return f"{at}, {seg.name}-{n}" if n is not None else at


def cc(
    seg: Segment, n: int, scope: Scope, mapped: tuple[str, str, str] | None = None, system: str | None = None
) -> Json | None:
    """Field n's first repetition (CWE/CE/CNE/IS) as a CodeableConcept, with the scope's settings."""
    raw = first(seg, n)
    if raw in EMPTY:
        return None
    return codeable_concept(raw, seg.enc, mapped, system, scope.settings)


def ccs(seg: Segment, n: int, scope: Scope) -> list[Json]:
    """Every repetition of field n as a CodeableConcept."""
    return [
        c
        for rep in reps(seg, n)
        if rep not in EMPTY and (c := codeable_concept(rep, seg.enc, None, None, scope.settings))
    ]


def dt(seg: Segment, n: int, scope: Scope) -> str | None:
    """Field n (DTM/TS, its first component) as a FHIR dateTime."""
    return to_datetime(value(seg, n), scope.offset)


def instant(seg: Segment, n: int, scope: Scope) -> str | None:
    """Field n as a FHIR instant: only when it has a time and a known offset (an instant cannot be partial)."""
    v = to_datetime(value(seg, n), scope.offset)
    return v if v and "T" in v else None


def ei_identifier(raw: str, enc: Encoding, scope: Scope, type_code: str = "") -> Json | None:
    """EI (entity identifier^namespace^universal id^type) -> Identifier, the assigning authority as system."""
    if raw in EMPTY:
        return None
    c, _ = components(raw, enc, 4)
    if not c[1]:
        return None
    ident: Json = {}
    if type_code:
        ident["type"] = {"coding": [{"system": V2_0203, "code": type_code}]}
    system = authority_system(c[2], c[3], c[4], scope.settings) if (c[2] or c[3]) else None
    if system:
        ident["system"] = system
    ident["value"] = c[1]
    return ident


def text_of(seg: Segment, n: int) -> str:
    """Every repetition of field n, unescaped and joined by newlines (ST/TX/FT text)."""
    enc = seg.enc
    out = []
    for rep in reps(seg, n):
        if rep in EMPTY:
            continue
        t = clean(unescape(rep, enc))
        if t:
            out.append(t)
    return "\n".join(out)


def ref(resource: Json) -> Json:
    return {"reference": f"{resource['resourceType']}/{resource['id']}"}


def new_resource(resource_type: str, resource_id: str, scope: Scope) -> Json:
    return {"resourceType": resource_type, "id": resource_id, "meta": {"source": scope.meta_source}}


def organization(raw: str, enc: Encoding, scope: Scope) -> Json | None:
    """XON (name^type^id^check digit^scheme^authority^id type^facility^rep code^id) -> Organization; None
    without a name or identifier."""
    if raw in EMPTY:
        return None
    c, _ = components(raw, enc, 10)
    name = c[1]
    value_ = c[10] or c[3]
    ident: Json | None = None
    if value_:
        subs = subcomponents(raw, enc, 6, 3)
        ident = {"value": value_}
        system = authority_system(subs[0], subs[1], subs[2], scope.settings) if (subs[0] or subs[1]) else None
        if system:
            ident = {"system": system, "value": value_}
    if ident is not None:
        org_id = resource_id("Organization", *scope.key(ident))
    elif name:
        org_id = resource_id("Organization", "name", scope.facility, name)
    else:
        return None
    org = new_resource("Organization", org_id, scope)
    if ident is not None:
        org["identifier"] = [ident]
    if name:
        org["name"] = name
    return org
