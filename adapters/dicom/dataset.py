"""Reading a received dataset: is it complete, which instance is it, and the header attributes the mapping needs.

One pass over the raw bytes does both. pydicom reads a truncated dataset without complaint (the last value
simply comes out short), so completeness is checked by walking the element structure: every defined length must
fit, and every undefined-length sequence, item and encapsulated pixel data must be closed by its delimiter. The
same walk keeps the raw values of the few top-level elements the mapping needs, which are then decoded with
pydicom's character set functions (Specific Character Set, ISO 2022 escapes, PN component groups). Reading the
whole dataset with pydicom instead cost twice as much CPU, in the thread that holds up the sender's next image.
"""

from __future__ import annotations

import hashlib
import re
import struct
import zlib
from dataclasses import dataclass
from io import BytesIO

from pydicom import config as pydicom_config
from pydicom.charset import convert_encodings, decode_bytes
from pydicom.datadict import dictionary_VR, tag_for_keyword
from pydicom.filereader import read_dataset
from pydicom.valuerep import PersonName

from gateway.normalise.dicom import HEADER_KEYWORDS

IMPLICIT_LE = "1.2.840.10008.1.2"
EXPLICIT_LE = "1.2.840.10008.1.2.1"
DEFLATED_LE = "1.2.840.10008.1.2.1.99"
# JPIP Referenced Deflate and JPIP HTJ2K Referenced Deflate deflate the dataset too (PS3.5 A.6); pydicom does not
# say so, so for them a dataset that does not inflate is read as it is.
JPIP_DEFLATED = frozenset({"1.2.840.10008.1.2.4.95", "1.2.840.10008.1.2.4.205"})
EXPLICIT_BE = "1.2.840.10008.1.2.2"
IMPLEMENTATION_CLASS_UID = "2.25.87443032571812691419296678036486083553"  # this gateway (a UUID-derived UID)
IMPLEMENTATION_VERSION = "GATEWAY_01"

# A modality's slightly non-conformant value must not fail the store, nor log a warning per instance.
pydicom_config.settings.reading_validation_mode = pydicom_config.IGNORE

_LONG_VRS = frozenset({b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"})
_VR = re.compile(rb"[A-Z]{2}")
UID_RE = re.compile(r"[0-9]+(?:\.[0-9]+)*")
_ITEM, _ITEM_END, _SEQ_END = 0xFFFEE000, 0xFFFEE00D, 0xFFFEE0DD
_UNDEFINED = 0xFFFFFFFF
_CHARSET = 0x00080005
_QUALIFIERS = 0x00100024  # Issuer of Patient ID Qualifiers Sequence: read with pydicom when present
_UIDS = {
    0x00080016: "SOPClassUID",
    0x00080018: "SOPInstanceUID",
    0x0020000D: "StudyInstanceUID",
    0x0020000E: "SeriesInstanceUID",
}
_HEADER_TAGS: dict[int, str] = {}
for _kw in HEADER_KEYWORDS:
    _t = tag_for_keyword(_kw)
    assert _t is not None, _kw
    _HEADER_TAGS[int(_t)] = _kw
_WANTED = frozenset({_CHARSET, _QUALIFIERS, *_UIDS, *_HEADER_TAGS})
_TEXT_VRS = frozenset({"LO", "SH", "ST", "LT", "UT", "UC"})
_BACKSLASH = {0x5C}
_U16 = {True: struct.Struct("<H"), False: struct.Struct(">H")}
_U32 = {True: struct.Struct("<I"), False: struct.Struct(">I")}
_TAG = {True: struct.Struct("<HHI"), False: struct.Struct(">HHI")}


class DatasetError(Exception):
    """The dataset cannot be understood; the reason is free of patient data."""


@dataclass(frozen=True, slots=True)
class Inspected:
    sop_class_uid: str
    sop_instance_uid: str
    study_instance_uid: str
    series_instance_uid: str
    header: dict[str, str]
    sha256: str  # of the dataset bytes as received


def check_complete(raw: bytes, transfer_syntax: str) -> None:
    """Raise DatasetError unless ``raw`` is a structurally complete dataset in ``transfer_syntax``."""
    _scan(raw, transfer_syntax)


def _scan(raw: bytes, transfer_syntax: str) -> tuple[bytes, dict[int, tuple[str, bytes]]]:
    if transfer_syntax == DEFLATED_LE:
        data = _inflate(raw)
    elif transfer_syntax in JPIP_DEFLATED:
        try:
            data = _inflate(raw)
        except DatasetError:
            data = raw
    else:
        data = raw
    if not data:
        raise DatasetError("the dataset is empty")
    found: dict[int, tuple[str, bytes]] = {}
    little = transfer_syntax != EXPLICIT_BE
    end = _walk(data, 0, len(data), transfer_syntax == IMPLICIT_LE, little, None, 0, found)
    if end != len(data):
        raise DatasetError("the dataset is truncated")
    return data, found


def _inflate(raw: bytes) -> bytes:
    try:
        return zlib.decompress(raw, -zlib.MAX_WBITS)
    except zlib.error:
        raise DatasetError("the deflated dataset cannot be inflated") from None


def _walk(
    data: bytes,
    pos: int,
    end: int,
    implicit: bool,
    little: bool,
    until: int | None,
    depth: int,
    found: dict[int, tuple[str, bytes]] | None,
) -> int:
    """Walk elements from ``pos``; return the position after the last one (or after the ``until`` delimiter).
    Top-level elements in ``_WANTED`` are put into ``found`` as (VR, value bytes)."""
    if depth > 64:
        raise DatasetError("sequences are nested too deeply")
    tag_s, u16, u32 = _TAG[little], _U16[little], _U32[little]
    while pos < end:
        if pos + 8 > end:
            raise DatasetError("the dataset is truncated inside an element header")
        group, elem, length = tag_s.unpack_from(data, pos)
        tag = (group << 16) | elem
        if group == 0xFFFE:
            pos += 8
            if tag == until:
                return pos
            raise DatasetError("an item delimiter outside a sequence")
        if implicit:
            vr = b""
            pos += 8
        else:
            vr = data[pos + 4 : pos + 6]
            if vr in _LONG_VRS:
                if pos + 12 > end:
                    raise DatasetError("the dataset is truncated inside an element header")
                (length,) = u32.unpack_from(data, pos + 8)
                pos += 12
            else:
                if not _VR.fullmatch(vr):
                    raise DatasetError("an element has no valid value representation")
                (length,) = u16.unpack_from(data, pos + 6)
                pos += 8
        if length == _UNDEFINED:
            # A sequence, encapsulated pixel data, or UN of undefined length (whose content is implicit LE).
            un = vr == b"UN"
            pos = _items(data, pos, end, implicit or un, little or un, depth)
            continue
        if found is not None and tag in _WANTED:
            found[tag] = (vr.decode("ascii") if vr else "", data[pos : pos + length])
        pos += length
        if pos > end:
            raise DatasetError("the dataset is truncated inside a value")
    if until is not None:
        raise DatasetError("a sequence or item is not closed (truncated)")
    return pos


def _items(data: bytes, pos: int, end: int, implicit: bool, little: bool, depth: int) -> int:
    tag_s = _TAG[little]
    while True:
        if pos + 8 > end:
            raise DatasetError("a sequence is not closed (truncated)")
        group, elem, length = tag_s.unpack_from(data, pos)
        tag = (group << 16) | elem
        pos += 8
        if tag == _SEQ_END:
            return pos
        if tag != _ITEM:
            raise DatasetError("a sequence holds something other than items")
        if length == _UNDEFINED:
            pos = _walk(data, pos, end, implicit, little, _ITEM_END, depth + 1, None)
        else:
            pos += length
            if pos > end:
                raise DatasetError("the dataset is truncated inside a sequence item")


def inspect(raw: bytes, transfer_syntax: str) -> Inspected:
    """The identifying UIDs and the mapping's header attributes (decoded with the dataset's Specific Character
    Set). Raises DatasetError for a truncated or unreadable dataset or one without its UIDs."""
    data, found = _scan(raw, transfer_syntax)
    try:
        charset = found.get(_CHARSET)
        encodings = convert_encodings(_strings(charset[1]) if charset else None)
        uids = [_uid(found, tag, kw) for tag, kw in _UIDS.items()]
        header: dict[str, str] = {}
        for tag, kw in _HEADER_TAGS.items():
            if tag in found:
                vr, value = found[tag]
                text = _decode(vr or str(dictionary_VR(tag)), value, encodings)
                if text:
                    header[kw] = text
        if _QUALIFIERS in found:
            header.update(_qualifiers(data, transfer_syntax))
    except DatasetError:
        raise
    except Exception as exc:  # pydicom raises many types for malformed values; the reason names only the type
        raise DatasetError(f"the dataset cannot be decoded ({type(exc).__name__})") from None
    sop_class, sop_instance, study, series = uids
    return Inspected(sop_class, sop_instance, study, series, header, hashlib.sha256(raw).hexdigest())


def _strings(value: bytes) -> list[str]:
    return [v.strip() for v in value.decode("ascii", "replace").rstrip("\0 ").split("\\")]


def _decode(vr: str, value: bytes, encodings: list[str]) -> str:
    if vr == "PN":
        return str(PersonName(value, encodings)).strip().rstrip("=")  # no empty trailing component groups
    if vr in _TEXT_VRS:
        return decode_bytes(value, encodings, _BACKSLASH).strip()
    return value.decode("ascii", "replace").strip("\0 ")


def _uid(found: dict[int, tuple[str, bytes]], tag: int, keyword: str) -> str:
    text = found[tag][1].decode("ascii", "replace").strip("\0 ") if tag in found else ""
    if not text:
        raise DatasetError(f"the dataset has no {keyword}")
    if len(text) > 64:
        raise DatasetError(f"the {keyword} is longer than 64 characters")
    return text


def _qualifiers(data: bytes, transfer_syntax: str) -> dict[str, str]:
    """Universal Entity ID (and its type) of the issuer of the Patient ID: a sequence, so read with pydicom."""
    ds = read_dataset(
        BytesIO(data),
        transfer_syntax == IMPLICIT_LE,
        transfer_syntax != EXPLICIT_BE,
        stop_when=lambda tag, vr, length: int(tag) > _QUALIFIERS,
    )
    out: dict[str, str] = {}
    seq = ds.get("IssuerOfPatientIDQualifiersSequence")
    if seq:
        item = seq[0]
        for kw, key in (
            ("UniversalEntityID", "IssuerUniversalEntityID"),
            ("UniversalEntityIDType", "IssuerUniversalEntityIDType"),
        ):
            v = item.get(kw)
            if v:
                out[key] = str(v).strip()
    return out


def file_meta(inspected: Inspected, transfer_syntax: str, calling_ae: str) -> bytes:
    """The Part 10 preamble, prefix and File Meta Information (explicit VR little endian, PS3.10 7.1) for a
    received dataset. Encoded by hand: pydicom's writer took as long as checking the whole dataset."""
    body = b"".join(
        (
            b"\x02\x00\x01\x00OB\x00\x00" + struct.pack("<I", 2) + b"\x00\x01",
            _short(0x0002, "UI", inspected.sop_class_uid),
            _short(0x0003, "UI", inspected.sop_instance_uid),
            _short(0x0010, "UI", transfer_syntax),
            _short(0x0012, "UI", IMPLEMENTATION_CLASS_UID),
            _short(0x0013, "SH", IMPLEMENTATION_VERSION),
            _short(0x0016, "AE", calling_ae) if calling_ae else b"",
        )
    )
    group_length = b"\x02\x00\x00\x00UL\x04\x00" + struct.pack("<I", len(body))
    return b"\x00" * 128 + b"DICM" + group_length + body


def _short(element: int, vr: str, text: str) -> bytes:
    value = text.encode("ascii", "replace")
    if len(value) % 2:
        value += b"\x00" if vr == "UI" else b" "
    return struct.pack("<HH", 0x0002, element) + vr.encode() + struct.pack("<H", len(value)) + value
