"""HL7 v2 data types to FHIR R4 data types, as plain JSON-ready dicts, after the v2-to-FHIR IG datatype maps
(mappings/datatypes/*.csv): CX -> Identifier, XPN -> HumanName, XAD -> Address, XTN -> ContactPoint,
CWE/CE/IS -> CodeableConcept, XCN -> Identifier + HumanName (DTM/TS -> date/dateTime: ``dates``).

Every function returns None (or an empty list) rather than an empty element: FHIR forbids empty strings,
arrays and objects. Strings are trimmed, codes have their inner whitespace collapsed (the FHIR ``code``
pattern), and whitespace other than space, tab, CR and LF becomes a space (the FHIR ``string`` pattern).

Identifier systems (CX-4, XCN-9, the HD assigning authority), a config-free and deterministic choice:

- HD-3 ``ISO`` with a well-formed OID in HD-2 -> ``urn:oid:<HD-2>``;
- HD-3 ``UUID``/``GUID`` with a UUID in HD-2 -> ``urn:uuid:<uuid>``; HD-3 ``URI`` with an absolute URI -> the
  URI;
- a namespace with a system in the FHIR identifier registry (USSSA -> us-ssn, NPI -> us-npi) -> that system;
- otherwise the authority's name (HD-1, else HD-2) -> ``urn:hl7v2:authority:<percent-encoded name>``, a stable
  name-based URN: the same name always gives the same system, and operators who know the authority's real URI
  can rewrite it downstream;
- no assigning authority -> no system.
"""

from __future__ import annotations

import re
from functools import lru_cache
from typing import Any
from urllib.parse import quote

from gateway.hl7v2.parse import Encoding, unescape

from .dates import period, to_datetime
from .settings import DEFAULT_SETTINGS, MappingSettings
from .tables import (
    ADDRESS_TYPE,
    ADDRESS_USE,
    CODING_SYSTEMS,
    IDENTIFIER_REGISTRY,
    IDENTIFIER_TYPE,
    NAME_USE,
    TELECOM_SYSTEM,
    TELECOM_USE,
    V2_0203,
)

Json = dict[str, Any]

AUTHORITY_URN = "urn:hl7v2:authority:"

# Whitespace FHIR strings may not hold (all but space, tab, CR, LF) and C0/DEL controls they should not hold.
_BAD_CHARS = re.compile(r"[^\S \t\r\n]|[\x00-\x08\x0e-\x1f\x7f]")
_OID = re.compile(r"[0-2](?:\.(?:0|[1-9][0-9]*))+")
_UUID = re.compile(r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}")
_URI = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*:\S+")


def clean(value: str) -> str:
    """A FHIR string: trimmed, with control characters and exotic whitespace (vertical tab, no-break space...)
    turned into spaces (an HL7 \\X00\\ escape must not put a NUL into the journal)."""
    if not value:
        return ""
    if not value.isprintable():  # fast path: plain text needs no regex
        value = _BAD_CHARS.sub(" ", value)
    return value.strip()


def code(value: str) -> str:
    """A FHIR code: no leading, trailing or repeated whitespace."""
    if not value:
        return ""
    if " " not in value and value.isprintable():  # no whitespace at all (see ``components``): as it is
        return value
    return " ".join(value.split())


def components(raw: str, enc: Encoding, size: int) -> tuple[list[str], int]:
    """The components of one field repetition (its raw text): each one's first subcomponent, unescaped and
    cleaned (what ``clean(Field(raw, enc).get(i))`` gives for each i), and how many components it has.

    The list is 1-based and padded: ``c[i]`` is component i for every i up to ``size`` ("" when absent; ``c[0]``
    is always ""), so callers index it directly instead of bounds-checking each read. This is the mapping's
    hottest function: most fields hold plain text, which is split once and needs nothing more."""
    if not raw:
        return [""] * (size + 1), 0
    comp, esc = enc.component, enc.escape
    if (esc and esc in raw) or not raw.isprintable():
        out = [""]
        for c in raw.split(comp):
            if c:
                if enc.subcomponent and enc.subcomponent in c:
                    c = c.split(enc.subcomponent, 1)[0]
                if c == '""':
                    c = ""
                else:
                    if esc and esc in c:
                        c = unescape(c, enc)
                    c = clean(c)
            out.append(c)
    else:
        # No escape and no control character or exotic whitespace (those are not printable): the components
        # only need their other subcomponents cut off, spaces trimmed where a component starts or ends with
        # one, and the explicit null "" read as "". Each step runs only when the text calls for it.
        sub = enc.subcomponent
        if sub and sub in raw:
            tail = _STANDARD_TAIL if comp == "^" and sub == "&" else _after_first_subcomponent(comp, sub)
            raw = tail.sub("", raw)
        out = (comp + raw).split(comp)  # a leading "" for c[0]
        if '""' in raw or (" " in raw and (raw[0] == " " or raw[-1] == " " or " " + comp in raw or comp + " " in raw)):
            out = ["" if c == '""' else c.strip() for c in out]
    n = len(out) - 1
    if n < size:
        out += _PADDING[size - n]
    return out, n


_PADDING = tuple(("",) * k for k in range(32))  # components' padding, allocated once (sizes up to 21 are used)


@lru_cache(maxsize=16)
def _after_first_subcomponent(comp: str, sub: str) -> re.Pattern[str]:
    """What follows the first subcomponent of each component: deleting it leaves the first subcomponents,
    in one pass over the text instead of a split per component."""
    return re.compile(re.escape(sub) + "[^" + re.escape(comp) + "]*")


_STANDARD_TAIL = _after_first_subcomponent("^", "&")  # the usual delimiters, without the cache lookup


def subcomponents(raw: str, enc: Encoding, component: int, size: int = 0) -> list[str]:
    """``Field(raw, enc).subcomponents(component)`` (unescaped, "" for the explicit null, [] when the component
    is absent), padded with "" to at least ``size`` items: ``s[j - 1]`` is ``Field(raw, enc).get(component, j)``.
    Without the Field, and without a call per subcomponent when there is nothing to unescape."""
    parts = raw.split(enc.component, component)
    subs: list[str] = []
    if len(parts) >= component:
        text = parts[component - 1]
        sub, esc = enc.subcomponent, enc.escape
        subs = text.split(sub) if sub else [text]
        if esc and esc in text:
            subs = [unescape(s, enc) if s != '""' else "" for s in subs]
        elif '""' in text:
            subs = ["" if s == '""' else s for s in subs]
    if len(subs) < size:
        subs += _PADDING[size - len(subs)]
    return subs


def _hd(raw: str, enc: Encoding, component: int, settings: MappingSettings = DEFAULT_SETTINGS) -> str | None:
    """``hd_system`` of an HD held in the subcomponents of one component (CX-4, XCN-9), after the configured
    ``identifier_systems`` table when there is one."""
    parts = raw.split(enc.component, component)
    if len(parts) < component:
        return None
    text = parts[component - 1]
    if settings.identifier_systems:
        subs = subcomponents(raw, enc, component, 3)
        return authority_system(subs[0], subs[1], subs[2], settings)
    if enc.escape and enc.escape in text:  # unescape each subcomponent first (rare)
        return _hd_subcomponents(subcomponents(raw, enc, component))
    return _hd_text(text, enc.subcomponent)


@lru_cache(maxsize=1024)
def _hd_text(text: str, sub: str) -> str | None:
    # An HD without escapes, keyed by its raw text: an authority recurs in every message of a sender, and
    # this skips the split as well as ``hd_system``.
    return _hd_subcomponents([s if s != '""' else "" for s in (text.split(sub, 3) if sub else [text])])


def _hd_subcomponents(subs: list[str]) -> str | None:
    """``hd_system`` of HD-1..3 as ``Field.subcomponents`` reads them (absent ones are "")."""
    n = len(subs)
    return hd_system(subs[0] if n else "", subs[1] if n > 1 else "", subs[2] if n > 2 else "")


# --- identifiers --------------------------------------------------------------------------------------------


# Pure, and a sender uses a handful of assigning authorities: caching skips the regexes and percent-encoding
# that would otherwise run for every identifier of every message.
@lru_cache(maxsize=1024)
def hd_system(namespace: str, universal_id: str, universal_id_type: str) -> str | None:
    """The Identifier.system for an HD assigning authority (see the module docstring)."""
    namespace, universal_id = namespace.strip(), universal_id.strip()
    if universal_id:
        kind = universal_id_type.strip().upper()
        if kind == "ISO" and _OID.fullmatch(universal_id):
            return "urn:oid:" + universal_id
        if kind in ("UUID", "GUID") and _UUID.fullmatch(universal_id):
            return "urn:uuid:" + universal_id.lower()
        if kind == "URI" and _URI.fullmatch(universal_id):
            return universal_id
    registered = IDENTIFIER_REGISTRY.get(namespace)
    if registered:
        return registered
    name = namespace or universal_id
    return AUTHORITY_URN + quote(name, safe="") if name else None


def authority_system(
    namespace: str, universal_id: str, universal_id_type: str, settings: MappingSettings
) -> str | None:
    """``hd_system``, after the configured table: HD-1 (namespace) first, then HD-2 (universal id)."""
    table = settings.identifier_systems
    if table:
        system = table.get(namespace.strip()) or table.get(universal_id.strip())
        if system:
            return system
    return hd_system(namespace, universal_id, universal_id_type)


def identifier_type(type_code: str) -> Json:
    """Identifier.type from an HL7 table 0203 code; a code outside the table is kept without a system."""
    display = IDENTIFIER_TYPE.get(type_code)
    if display is None:
        return {"coding": [{"code": type_code}]}
    return {"coding": [{"system": V2_0203, "code": type_code, "display": display}]}


def identifier(
    raw: str,
    enc: Encoding,
    default_offset: str | None,
    type_override: Json | None = None,
    settings: MappingSettings = DEFAULT_SETTINGS,
) -> Json | None:
    """CX (one repetition's raw text) -> Identifier: CX-1 value, CX-4 system, CX-5 type, CX-7/8 period. None
    without a value."""
    c, n = components(raw, enc, 8)
    value = c[1]
    if not value:
        return None
    ident: Json = {}
    if type_override is not None:
        ident["type"] = type_override
    else:
        type_code = code(c[5])
        if type_code:
            ident["type"] = identifier_type(type_code)
    system = _hd(raw, enc, 4, settings) if n >= 4 else None
    if system:
        ident["system"] = system
    ident["value"] = value
    if c[7] or c[8]:
        p = period(to_datetime(c[7], default_offset), to_datetime(c[8], default_offset))
        if p:
            ident["period"] = p
    return ident


# --- names, addresses, telecom ------------------------------------------------------------------------------


def _name_parts(name: Json, family: str, given: tuple[str, str], prefix: str, suffix: tuple[str, ...]) -> None:
    if family:
        name["family"] = family
    # (``filter`` rather than a comprehension, which is a function call of its own before Python 3.12; ``any``
    # first for the suffixes, which are usually all empty.)
    if given[0] or given[1]:
        name["given"] = [*filter(None, given)]
    if prefix:
        name["prefix"] = [prefix]
    if any(suffix):
        name["suffix"] = [*filter(None, suffix)]


def human_name(raw: str, enc: Encoding, default_offset: str | None) -> Json | None:
    """XPN -> HumanName: family XPN-1, given XPN-2/3, suffix XPN-4/6/14, prefix XPN-5, use XPN-7 (table 0200),
    period XPN-12/13 else XPN-10. None when no name part is valued."""
    c, n = components(raw, enc, 14)
    name: Json = {}
    use = NAME_USE.get(c[7])
    if use:
        name["use"] = use
    _name_parts(name, c[1], (c[2], c[3]), c[5], (c[4], c[6], c[14]))
    if len(name) == (1 if use else 0):
        return None
    if n >= 10:
        start, end = c[12], c[13]
        if not start and not end:
            dr = subcomponents(raw, enc, 10, 2)
            start, end = clean(dr[0]), clean(dr[1])
        if start or end:
            p = period(to_datetime(start, default_offset), to_datetime(end, default_offset))
            if p:
                name["period"] = p
    return name


def xcn_name(c: list[str]) -> Json | None:
    """XCN name components (``components(raw, enc, 21)[0]``) -> HumanName: family XCN-2, given XCN-3/4, suffix
    XCN-5/21, prefix XCN-6, use XCN-10 (table 0200)."""
    name: Json = {}
    use = NAME_USE.get(c[10])
    if use:
        name["use"] = use
    _name_parts(name, c[2], (c[3], c[4]), c[6], (c[5], c[21]))
    if len(name) == (1 if use else 0):
        return None
    return name


def address(raw: str, enc: Encoding, default_offset: str | None) -> Json | None:
    """XAD -> Address: lines from XAD-1 (SAD street / name / dwelling), XAD-2 and XAD-19; city, state, postal
    code, country from XAD-3..6; XAD-7 as use or type (table 0190); district XAD-9; period XAD-12 or
    XAD-13/14."""
    c, n = components(raw, enc, 19)
    addr: Json = {}
    if enc.subcomponent and enc.subcomponent in raw:
        lines = [clean(s) for s in subcomponents(raw, enc, 1)[:3]]
    else:  # no subcomponents: XAD-1's one line is component 1 as ``components`` read it
        lines = [c[1]] if n else []
    lines += [c[2], c[19]]
    lines = [*filter(None, lines)]
    kind = c[7]
    use = ADDRESS_USE.get(kind)
    if use:
        addr["use"] = use
    addr_type = ADDRESS_TYPE.get(kind)
    if addr_type:
        addr["type"] = addr_type
    if lines:
        addr["line"] = lines
    for key, i in (("city", 3), ("state", 4), ("postalCode", 5), ("country", 6)):
        v = c[i]
        if v:
            addr[key] = v
    if n >= 9:  # CWE -> string: original text, else text, else the code
        cwe = subcomponents(raw, enc, 9, 9)
        district = clean(cwe[8]) or clean(cwe[1]) or clean(cwe[0])
        if district:
            addr["district"] = district
    if n >= 12:
        dr = subcomponents(raw, enc, 12, 2)
        start, end = clean(dr[0]), clean(dr[1])
        if not start and not end:
            start, end = c[13], c[14]
        if start or end:
            p = period(to_datetime(start, default_offset), to_datetime(end, default_offset))
            if p:
                addr["period"] = p
    if len(addr) == (1 if use else 0) + (1 if addr_type else 0):
        return None
    return addr


def contact_point(raw: str, enc: Encoding, default_use: str | None, default_offset: str | None) -> Json | None:
    """XTN -> ContactPoint. System from XTN-3 (table 0202); when XTN-3 is empty (usual before v2.7) an address
    with '@' or use NET is an email, anything else a phone (the fields that carry XTN are phone fields).
    Value: XTN-4 for email, else XTN-12, else XTN-5/6/7/8 composed as the IG shows, else XTN-1. Use from XTN-2
    (table 0201), else mobile for a CP, else (XTN-2 empty) the field's default (home for PID-13, work for
    PID-14). None without value."""
    c, _ = components(raw, enc, 18)
    equipment = c[3]
    use_code = c[2]
    system = TELECOM_SYSTEM.get(equipment)
    if system is None:
        if equipment:
            system = "other"
        elif use_code == "NET" or "@" in c[4] or "@" in c[1]:
            system = "email"
        else:
            system = "phone"
    if system == "email":
        value = c[4]
        if not value and "@" in c[1]:  # some senders put the address in XTN-1
            value = c[1]
    else:
        value = c[12]
        if not value and c[7]:
            # "[+country ][area ]local": the valued parts of XTN-5, 6 and 7 joined by spaces
            value = c[6] + " " + c[7] if c[6] else c[7]
            country = c[5]
            if country:
                value = "+" + country.lstrip("+") + " " + value
            ext = c[8]
            if ext:
                value += " X" + ext
        if not value:
            value = c[1]
    if not value:
        return None
    cp: Json = {"system": system, "value": value}
    use = TELECOM_USE.get(use_code) or ("mobile" if equipment == "CP" else None)
    if use is None and not use_code:
        use = default_use
    if use:
        cp["use"] = use
    rank = c[18]
    if rank.isdigit() and 0 < int(rank) < 2**31:
        cp["rank"] = int(rank)
    if c[13] or c[14]:
        p = period(to_datetime(c[13], default_offset), to_datetime(c[14], default_offset))
        if p:
            cp["period"] = p
    return cp


# --- coded values -------------------------------------------------------------------------------------------


@lru_cache(maxsize=1024)  # pure, over a sender's few coding system names
def coding_system(name: str, oid: str = "") -> str | None:
    """A FHIR code system URI for a table 0396 coding system name (or a CWE-14 style OID); None when
    unknown."""
    if name:
        uri = CODING_SYSTEMS.get(name)
        if uri:
            return uri
        if len(name) == 7 and name.startswith("HL7") and name[3:].isdigit():
            return "http://terminology.hl7.org/CodeSystem/v2-" + name[3:]
    if oid and _OID.fullmatch(oid):
        return "urn:oid:" + oid
    return None


# CWE triplets: (code, display, coding system, version, OID) component numbers.
_CWE_TRIPLETS = ((1, 2, 3, 7, 14), (4, 5, 6, 8, 17), (10, 11, 12, 13, 20))


def codeable_concept(
    raw: str,
    enc: Encoding,
    mapped: tuple[str, str, str] | None = None,
    table_system: str | None = None,
    settings: MappingSettings = DEFAULT_SETTINGS,
) -> Json | None:
    """CWE/CE/IS -> CodeableConcept: the IG's vocabulary-mapped coding first (when the table maps the code),
    then the sender's codings (CWE-1..3 + 7, CWE-4..6 + 8, CWE-10..13), text from CWE-9, else CWE-2 when the
    first triplet has no code. None when nothing is valued. When the table mapped the code and the sender
    named no coding system, the sender's code is from the field's v2 table: it gets ``table_system``, and is
    left out when that makes it the mapped coding again. With ``settings``, configured coding system names give
    their URIs, and a configured code map adds its standard coding in front of the sender's."""
    c, n = components(raw, enc, 20)
    if settings.customised:
        return _custom_codeable_concept(c, n, mapped, table_system, settings)
    codings: list[Json] = []
    if mapped is not None:
        codings.append({"system": mapped[0], "code": mapped[1], "display": mapped[2]})
    text = c[9]
    for ci, di, si, vi, oi in _CWE_TRIPLETS:
        if ci > n:
            break
        cd = code(c[ci])
        if not cd:
            if ci == 1 and not text:
                text = c[di]
            continue
        system = coding_system(c[si], c[oi]) if c[si] or c[oi] else None
        if system is None and ci == 1 and mapped is not None and not c[si]:
            system = table_system
        if mapped is not None and system == mapped[0] and cd == mapped[1]:
            continue
        codings.append(_coding(system, c[vi], cd, c[di]))
    return _concept(codings, text)


def _coding(system: str | None, version: str, code_: str, display: str) -> Json:
    """Coding: system, version, code, display (the code is valued)."""
    cg: Json = {"system": system} if system else {}
    if version:
        cg["version"] = version
    cg["code"] = code_
    if display:
        cg["display"] = display
    return cg


def _concept(codings: list[Json], text: str) -> Json | None:
    cc: Json = {}
    if codings:
        cc["coding"] = codings
    if text:
        cc["text"] = text
    return cc or None


def _custom_codeable_concept(
    c: list[str], n: int, mapped: tuple[str, str, str] | None, table_system: str | None, settings: MappingSettings
) -> Json | None:
    """``codeable_concept`` with the configured coding systems and code maps (the general, slower path)."""
    codings: list[Json] = []
    if mapped is not None:
        codings.append({"system": mapped[0], "code": mapped[1], "display": mapped[2]})
    text = c[9]
    local: list[Json] = []
    for ci, di, si, vi, oi in _CWE_TRIPLETS:
        if ci > n:
            break
        cd = code(c[ci])
        if not cd:
            if ci == 1 and not text:
                text = c[di]
            continue
        name = c[si]
        target = settings.code_maps.get((name, cd)) if settings.code_maps else None
        if target is not None:
            cg_mapped: Json = {"system": target.system, "code": target.code}
            if target.display:
                cg_mapped["display"] = target.display
            if cg_mapped not in codings:
                codings.append(cg_mapped)
        system = (settings.coding_systems.get(name) if name else None) or (
            coding_system(name, c[oi]) if name or c[oi] else None
        )
        if system is None and ci == 1 and mapped is not None and not name:
            system = table_system
        if mapped is not None and system == mapped[0] and cd == mapped[1]:
            continue
        local.append(_coding(system, c[vi], cd, c[di]))
    return _concept(codings + local, text)


def xcn_identifier(
    raw: str, enc: Encoding, c: list[str], n: int, settings: MappingSettings = DEFAULT_SETTINGS
) -> Json | None:
    """XCN -> Identifier: XCN-1 value, XCN-9 assigning authority as system, XCN-13 type (table 0203).
    ``c, n`` are ``components(raw, enc, size)`` with size 13 or more (the caller reads the name from them
    too)."""
    value = c[1]
    if not value:
        return None
    ident: Json = {}
    type_code = code(c[13])
    if type_code:
        ident["type"] = identifier_type(type_code)
    system = _hd(raw, enc, 9, settings) if n >= 9 else None
    if system:
        ident["system"] = system
    ident["value"] = value
    return ident
