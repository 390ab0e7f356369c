"""HL7 v2 data types to FHIR R4 data types, as plain JSON-ready dicts, after the v2-to-FHIR IG datatype maps
(mappings/datatypes/*.csv): CX -> Identifier, XPN -> HumanName, XAD -> Address, XTN -> ContactPoint,
CWE/CE/IS -> CodeableConcept, XCN -> Identifier + HumanName, DTM/TS -> date/dateTime.

Every function returns None (or an empty list) rather than an empty element: FHIR forbids empty strings,
arrays and objects. Strings are trimmed, codes have their inner whitespace collapsed (the FHIR ``code``
pattern), and whitespace other than space, tab, CR and LF becomes a space (the FHIR ``string`` pattern).

Identifier systems (CX-4, XCN-9, the HD assigning authority), a config-free and deterministic choice:

- HD-3 ``ISO`` with a well-formed OID in HD-2 -> ``urn:oid:<HD-2>``;
- HD-3 ``UUID``/``GUID`` with a UUID in HD-2 -> ``urn:uuid:<uuid>``; HD-3 ``URI`` with an absolute URI -> the
  URI;
- otherwise the authority's name (HD-1, else HD-2) -> ``urn:hl7v2:authority:<percent-encoded name>``, a stable
  name-based URN: the same name always gives the same system, and operators who know the authority's real URI
  can rewrite it downstream;
- no assigning authority -> no system.

Dates: an HL7 DTM ``YYYY[MM[DD[HH[MM[SS[.S+]]]]]][+/-ZZZZ]`` keeps its precision. FHIR requires a time zone
when a dateTime has a time, and HL7 says a DTM without an offset is in the sender's local time; the sender's
offset is taken from MSH-7 (the caller passes it as ``default_offset``). When MSH-7 has no offset either, the
value is cut to date precision rather than assuming UTC: it never claims a time it does not know. (An offset
taken from MSH-7 may be an hour off for a time on the other side of a daylight-saving change from the
message.) A value that is not a valid DTM (bad digits, month 13, 30 February, offset beyond 14:00) is dropped.
"""

from __future__ import annotations

import datetime as _dt
import re
from typing import Any
from urllib.parse import quote

from gateway.hl7v2.parse import Field, unescape

from .tables import (
    ADDRESS_TYPE,
    ADDRESS_USE,
    CODING_SYSTEMS,
    IDENTIFIER_TYPE,
    NAME_USE,
    TELECOM_SYSTEM,
    TELECOM_USE,
    V2_0203,
)

Json = dict[str, Any]

AUTHORITY_URN = "urn:hl7v2:authority:"

_BAD_WHITESPACE = re.compile(r"[^\S \t\r\n]")
_DTM = re.compile(
    r"(\d{4})(?:(\d{2})(?:(\d{2})(?:(\d{2})(?:(\d{2})(?:(\d{2})(?:\.(\d{1,9}))?)?)?)?)?)?(?:([+-])(\d{2})(\d{2}))?"
)
_OID = re.compile(r"[0-2](?:\.(?:0|[1-9][0-9]*))+")
_UUID = re.compile(r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}")
_URI = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*:\S+")


def clean(value: str) -> str:
    """A FHIR string: trimmed, with exotic whitespace (vertical tab, no-break space...) turned into spaces."""
    if not value:
        return ""
    if not value.isprintable():  # fast path: plain text needs no regex
        value = _BAD_WHITESPACE.sub(" ", value)
    return value.strip()


def code(value: str) -> str:
    """A FHIR code: no leading, trailing or repeated whitespace."""
    return " ".join(value.split()) if value else ""


def components(f: Field) -> list[str]:
    """Every component's first subcomponent, unescaped and cleaned: ``Field.components()`` in one pass (the
    mapping reads most components of the fields it touches, and this is its hottest loop)."""
    raw = f.raw
    if not raw:
        return []
    enc = f.enc
    sub, esc = enc.subcomponent, enc.escape
    out = raw.split(enc.component)
    for i, c in enumerate(out):
        if not c:
            continue
        if sub and sub in c:
            c = c.split(sub, 1)[0]
        if c == '""':
            out[i] = ""
            continue
        if esc and esc in c:
            c = unescape(c, enc)
        out[i] = clean(c)
    return out


def comp(c: list[str], i: int) -> str:
    """Component i (1-based) of a ``components`` list; "" when absent."""
    return c[i - 1] if i <= len(c) else ""


# --- dates --------------------------------------------------------------------------------------------------


def _date_part(m: re.Match[str]) -> str | None:
    year, month, day = m.group(1, 2, 3)
    if year == "0000":
        return None
    if month is None:
        return year
    if not "01" <= month <= "12":
        return None
    if day is None:
        return f"{year}-{month}"
    try:
        _dt.date(int(year), int(month), int(day))
    except ValueError:
        return None
    return f"{year}-{month}-{day}"


def _offset(sign: str, hh: str, mm: str) -> str | None:
    if hh > "14" or mm > "59" or (hh == "14" and mm != "00"):
        return None
    return f"{sign}{hh}:{mm}"


def to_date(value: str) -> str | None:
    """An HL7 DT/DTM as a FHIR date (YYYY, YYYY-MM or YYYY-MM-DD); None when absent or invalid."""
    m = _DTM.fullmatch(value.strip()) if value else None
    return _date_part(m) if m else None


def to_datetime(value: str, default_offset: str | None) -> str | None:
    """An HL7 DTM/TS as a FHIR dateTime with the precision it has; see the module docstring for time zones."""
    m = _DTM.fullmatch(value.strip()) if value else None
    if m is None:
        return None
    date = _date_part(m)
    if date is None:
        return None
    hour, minute, second, fraction, sign = m.group(4, 5, 6, 7, 8)
    if hour is None:
        if sign is not None and _offset(sign, m.group(9), m.group(10)) is None:
            return None
        return date
    minute = minute or "00"
    second = second or "00"
    if hour > "23" or minute > "59" or second > "59":
        return None
    if sign is not None:
        offset = _offset(sign, m.group(9), m.group(10))
        if offset is None:
            return None
    elif default_offset is not None:
        offset = default_offset
    else:
        return date
    frac = f".{fraction}" if fraction else ""
    return f"{date}T{hour}:{minute}:{second}{frac}{offset}"


def offset_of(value: str) -> str | None:
    """The UTC offset a DTM declares (e.g. MSH-7), as "+HH:MM"; None when it has none or it is invalid."""
    m = _DTM.fullmatch(value.strip()) if value else None
    if m is None or m.group(8) is None:
        return None
    return _offset(m.group(8), m.group(9), m.group(10))


def period(start: str | None, end: str | None) -> Json | None:
    p: Json = {}
    if start:
        p["start"] = start
    if end:
        p["end"] = end
    return p or None


# --- identifiers --------------------------------------------------------------------------------------------


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
    name = namespace or universal_id
    return AUTHORITY_URN + quote(name, safe="") if name else None


def identifier_type(type_code: str) -> Json:
    """Identifier.type from an HL7 table 0203 code; a code outside the table is kept without a system."""
    display = IDENTIFIER_TYPE.get(type_code)
    if display is None:
        return {"coding": [{"code": type_code}]}
    return {"coding": [{"system": V2_0203, "code": type_code, "display": display}]}


def identifier(f: Field, default_offset: str | None, type_override: Json | None = None) -> Json | None:
    """CX -> Identifier: CX-1 value, CX-4 system, CX-5 type, CX-7/8 period. None without a value."""
    c = components(f)
    value = comp(c, 1)
    if not value:
        return None
    ident: Json = {}
    if type_override is not None:
        ident["type"] = type_override
    else:
        type_code = code(comp(c, 5))
        if type_code:
            ident["type"] = identifier_type(type_code)
    system = hd_system(f.get(4, 1), f.get(4, 2), f.get(4, 3)) if len(c) >= 4 else None
    if system:
        ident["system"] = system
    ident["value"] = value
    if len(c) >= 7:
        p = period(to_datetime(comp(c, 7), default_offset), to_datetime(comp(c, 8), default_offset))
        if p:
            ident["period"] = p
    return ident


# --- names, addresses, telecom ------------------------------------------------------------------------------


def _name_parts(
    name: Json, family: str, given: tuple[str, ...], prefix: str, suffix: tuple[str, ...]
) -> None:
    if family:
        name["family"] = family
    g = [x for x in given if x]
    if g:
        name["given"] = g
    if prefix:
        name["prefix"] = [prefix]
    s = [x for x in suffix if x]
    if s:
        name["suffix"] = s


def human_name(f: Field, default_offset: str | None) -> Json | None:
    """XPN -> HumanName: family XPN-1, given XPN-2/3, suffix XPN-4/6/14, prefix XPN-5, use XPN-7 (table 0200),
    period XPN-12/13 else XPN-10. None when no name part is valued."""
    c = components(f)
    name: Json = {}
    use = NAME_USE.get(comp(c, 7))
    if use:
        name["use"] = use
    _name_parts(name, comp(c, 1), (comp(c, 2), comp(c, 3)), comp(c, 5), (comp(c, 4), comp(c, 6), comp(c, 14)))
    if len(name) == (1 if use else 0):
        return None
    if len(c) >= 10:
        start, end = comp(c, 12), comp(c, 13)
        if not start and not end:
            start, end = clean(f.get(10, 1)), clean(f.get(10, 2))
        p = period(to_datetime(start, default_offset), to_datetime(end, default_offset))
        if p:
            name["period"] = p
    return name


def xcn_name(c: list[str]) -> Json | None:
    """XCN name components -> HumanName: family XCN-2, given XCN-3/4, suffix XCN-5/21, prefix XCN-6,
    use XCN-10 (table 0200)."""
    name: Json = {}
    use = NAME_USE.get(comp(c, 10))
    if use:
        name["use"] = use
    _name_parts(name, comp(c, 2), (comp(c, 3), comp(c, 4)), comp(c, 6), (comp(c, 5), comp(c, 21)))
    if len(name) == (1 if use else 0):
        return None
    return name


def address(f: Field, default_offset: str | None) -> Json | None:
    """XAD -> Address: lines from XAD-1 (SAD street / name / dwelling), XAD-2 and XAD-19; city, state, postal
    code, country from XAD-3..6; XAD-7 as use or type (table 0190); district XAD-9; period XAD-12 or
    XAD-13/14."""
    c = components(f)
    addr: Json = {}
    lines = [clean(s) for s in f.subcomponents(1)[:3]] if c else []
    lines += [comp(c, 2), comp(c, 19)]
    lines = [x for x in lines if x]
    kind = comp(c, 7)
    use = ADDRESS_USE.get(kind)
    if use:
        addr["use"] = use
    addr_type = ADDRESS_TYPE.get(kind)
    if addr_type:
        addr["type"] = addr_type
    if lines:
        addr["line"] = lines
    for key, i in (("city", 3), ("state", 4), ("postalCode", 5), ("country", 6)):
        v = comp(c, i)
        if v:
            addr[key] = v
    if len(c) >= 9:  # CWE -> string: original text, else text, else the code
        district = clean(f.get(9, 9)) or clean(f.get(9, 2)) or clean(f.get(9, 1))
        if district:
            addr["district"] = district
    if len(c) >= 12:
        start, end = clean(f.get(12, 1)), clean(f.get(12, 2))
        if not start and not end:
            start, end = comp(c, 13), comp(c, 14)
        p = period(to_datetime(start, default_offset), to_datetime(end, default_offset))
        if p:
            addr["period"] = p
    if len(addr) == (1 if use else 0) + (1 if addr_type else 0):
        return None
    return addr


def contact_point(f: Field, default_use: str | None, default_offset: str | None) -> Json | None:
    """XTN -> ContactPoint. System from XTN-3 (table 0202); when XTN-3 is empty (usual before v2.7) an address
    with '@' or use NET is an email, anything else a phone (the fields that carry XTN are phone fields).
    Value: XTN-4 for email, else XTN-12, else XTN-5/6/7/8 composed as the IG shows, else XTN-1. Use from XTN-2
    (table 0201), else mobile for a CP, else the field's default (home for PID-13, work for PID-14). None
    without value."""
    c = components(f)
    equipment = comp(c, 3)
    use_code = comp(c, 2)
    system = TELECOM_SYSTEM.get(equipment)
    if system is None:
        if equipment:
            system = "other"
        elif use_code == "NET" or "@" in comp(c, 4) or "@" in comp(c, 1):
            system = "email"
        else:
            system = "phone"
    if system == "email":
        value = comp(c, 4)
        if not value and "@" in comp(c, 1):  # some senders put the address in XTN-1
            value = comp(c, 1)
    else:
        value = comp(c, 12)
        if not value and comp(c, 7):
            parts = [comp(c, 6), comp(c, 7)]
            country = comp(c, 5)
            if country:
                parts.insert(0, "+" + country.lstrip("+"))
            value = " ".join(x for x in parts if x)
            ext = comp(c, 8)
            if ext:
                value += " X" + ext
        if not value:
            value = comp(c, 1)
    if not value:
        return None
    cp: Json = {"system": system, "value": value}
    use = TELECOM_USE.get(use_code) or ("mobile" if equipment == "CP" else default_use)
    if use:
        cp["use"] = use
    rank = comp(c, 18)
    if rank.isdigit() and 0 < int(rank) < 2**31:
        cp["rank"] = int(rank)
    if len(c) >= 13:
        p = period(to_datetime(comp(c, 13), default_offset), to_datetime(comp(c, 14), default_offset))
        if p:
            cp["period"] = p
    return cp


# --- coded values -------------------------------------------------------------------------------------------


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


def coding(system: str | None, code_value: str, display: str, version: str = "") -> Json | None:
    if not code_value:
        return None
    c: Json = {}
    if system:
        c["system"] = system
    if version:
        c["version"] = version
    c["code"] = code_value
    if display:
        c["display"] = display
    return c


def codeable_concept(
    f: Field, mapped: tuple[str, str, str] | None = None, table_system: str | None = None
) -> Json | None:
    """CWE/CE/IS -> CodeableConcept: the IG's vocabulary-mapped coding first (when the table maps the code),
    then the sender's codings (CWE-1..3 + 7, CWE-4..6 + 8, CWE-10..13), text from CWE-9, else CWE-2 when the
    first triplet has no code. None when nothing is valued. When the table mapped the code and the sender
    named no coding system, the sender's code is from the field's v2 table: it gets ``table_system``, and is
    left out when that makes it the mapped coding again."""
    c = components(f)
    codings: list[Json] = []
    if mapped is not None:
        codings.append({"system": mapped[0], "code": mapped[1], "display": mapped[2]})
    text = comp(c, 9)
    for ci, di, si, vi, oi in ((1, 2, 3, 7, 14), (4, 5, 6, 8, 17), (10, 11, 12, 13, 20)):
        if ci > len(c):
            break
        cd = code(comp(c, ci))
        if not cd:
            if ci == 1 and not text:
                text = comp(c, di)
            continue
        system = coding_system(comp(c, si), comp(c, oi))
        if system is None and ci == 1 and mapped is not None and not comp(c, si):
            system = table_system
        if mapped is not None and system == mapped[0] and cd == mapped[1]:
            continue
        cg = coding(system, cd, comp(c, di), comp(c, vi))
        if cg is not None:
            codings.append(cg)
    cc: Json = {}
    if codings:
        cc["coding"] = codings
    if text:
        cc["text"] = text
    return cc or None


def xcn_identifier(f: Field) -> Json | None:
    """XCN -> Identifier: XCN-1 value, XCN-9 assigning authority as system, XCN-13 type (table 0203)."""
    c = components(f)
    value = comp(c, 1)
    if not value:
        return None
    ident: Json = {}
    type_code = code(comp(c, 13))
    if type_code:
        ident["type"] = identifier_type(type_code)
    system = hd_system(f.get(9, 1), f.get(9, 2), f.get(9, 3)) if len(c) >= 9 else None
    if system:
        ident["system"] = system
    ident["value"] = value
    return ident
