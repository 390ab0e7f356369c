"""HL7 v2 acknowledgements (ACK) built from the inbound message's header.

The ACK mirrors the inbound MSH so the sender can match and read it: the same delimiters (MSH-1/MSH-2), the
same character set (MSH-18), version (MSH-12) and processing id (MSH-11), sending and receiving application
and facility swapped, and MSA-2 set to the inbound control id (MSH-10). Negative acknowledgements carry an ERR
segment with an HL7 table 0357 error code, laid out for the inbound version (ERR-1 ELD before v2.5, ERR-2..8
from v2.5 on).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from datetime import UTC, datetime

from gateway.hl7v2.parse import DEFAULT_ENCODING, Encoding, HL7ParseError, Message, charset_codec, parse

__all__ = ["ACK_CODES", "ERROR_CODES", "build_ack"]

ACK_CODES = frozenset({"AA", "AE", "AR", "CA", "CE", "CR"})

# HL7 table 0357, message error condition codes.
ERROR_CODES: dict[str, str] = {
    "0": "Message accepted",
    "100": "Segment sequence error",
    "101": "Required field missing",
    "102": "Data type error",
    "103": "Table value not found",
    "200": "Unsupported message type",
    "201": "Unsupported event code",
    "202": "Unsupported processing id",
    "203": "Unsupported version id",
    "204": "Unknown key identifier",
    "205": "Duplicate key identifier",
    "206": "Application record locked",
    "207": "Application internal error",
}

_DEFAULT_ERROR_CODE = "207"
_DEFAULT_VERSION = "2.5"
_MSA_TEXT_MAX = 80  # MSA-3 is ST(80)
_ERR_TEXT_MAX = 250  # ERR-8 is TX(250)
_NOT_PRINTABLE_ASCII = re.compile(r"[^\x20-\x7e]")
# C0 controls and DEL in a field copied from the inbound header: a stray 0x1C or 0x0B in MSH-10 echoed into the
# ACK would end or restart the MLLP frame at the sender's side, and CR/LF would start a new segment.
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_VERSION_NUMBERS = re.compile(r"\d+")


def build_ack(
    msg: Message | None,
    code: str,
    *,
    text: str = "",
    error_code: str = "",
    control_id: str,
    now: datetime | None = None,
    raw_header: bytes = b"",
    error_location: Sequence[str] = (),
) -> bytes:
    """Build the acknowledgement of ``msg`` as bytes, without MLLP framing; every segment ends with CR.

    ``code`` is the MSA-1 acknowledgement code: AA/AE/AR (original mode) or CA/CE/CR (enhanced mode); any
    other value raises ValueError. ``control_id`` becomes MSH-10 (the caller supplies a fresh id). ``now``
    (default: the current time) becomes MSH-7 in UTC as ``YYYYMMDDHHMMSS+0000``; a naive datetime is read as
    UTC.

    The MSH copies from the inbound MSH: MSH-1/MSH-2 (the delimiters), MSH-5/MSH-6 into MSH-3/MSH-4 and
    MSH-3/MSH-4 into MSH-5/MSH-6 (raw text, components kept), MSH-11 (default "P"), MSH-12 (default "2.5")
    and MSH-18. MSH-9 is ``ACK^<inbound MSH-9.2>^ACK`` (``ACK^<MSH-9.2>`` before v2.3.1, which has no
    message structure component), or ``ACK`` when the inbound has no trigger event. The bytes are encoded in
    the MSH-18 character set when Python knows it, otherwise UTF-8.

    MSA is ``MSA|code|<inbound MSH-10>|text`` (without MSA-3 from v2.7 on, where it is withdrawn). For
    AE/AR/CE/CR an ERR segment follows, with ``error_code`` from HL7 table 0357 (default "207", Application
    internal error), severity E and ``text`` as the user message:
    ``ERR||<location>|<code>^<name>^HL70357|E||||<text>`` for v2.5 and later,
    ``ERR|<segment>^<sequence>^<field>^<code>&<name>&HL70357`` before.
    ``error_location`` gives the location's components (segment id, segment sequence, field position, ...)
    when known. ``text`` is reduced to printable ASCII, cut to 80 characters in MSA-3 and 250 in ERR-8, and
    escaped, so no delimiter in it can change the ACK's structure.

    When ``msg`` is None the ACK is generic (``|^~\\&``, version 2.5, empty applications and MSA-2) unless
    ``raw_header`` (the first bytes of an oversized or unparseable frame) starts with an MSH that the
    tokenizer can read; then that MSH is used as above.
    """
    if code not in ACK_CODES:
        raise ValueError(f"unknown acknowledgement code {code!r}")
    if msg is None and raw_header:
        msg = _header_message(raw_header)

    enc = msg.encoding if msg is not None else DEFAULT_ENCODING
    fs, cs = enc.field, enc.component
    when = now if now is not None else datetime.now(UTC)
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    timestamp = when.astimezone(UTC).strftime("%Y%m%d%H%M%S") + "+0000"

    if msg is not None:
        msh = msg.msh
        trigger = [_echo(t) for t in msh.field(9).raw.split(cs)[1:2]]
        msh_fields = [
            _echo(msh.raw(5)),
            _echo(msh.raw(6)),
            _echo(msh.raw(3)),
            _echo(msh.raw(4)),
            timestamp,
            "",
            f"ACK{cs}{trigger[0]}{cs}ACK" if trigger and trigger[0] else "ACK",
            _escape(control_id, enc),
            _echo(msh.raw(11)) or "P",
            _echo(msh.raw(12)) or _DEFAULT_VERSION,
            "",
            "",
            "",
            "",
            "",
            _echo(msh.raw(18)),
        ]
        inbound_id = _echo(msh.raw(10))
        version = msg.version or _DEFAULT_VERSION
        if trigger and trigger[0] and _version_tuple(version) < (2, 3, 1):
            msh_fields[6] = f"ACK{cs}{trigger[0]}"  # MSH-9.3 (message structure) arrived in v2.3.1
        codec = charset_codec(msh.get(18)) or "utf-8"
    else:
        msh_fields = ["", "", "", "", timestamp, "", "ACK", _escape(control_id, enc), "P", _DEFAULT_VERSION]
        inbound_id = ""
        version = _DEFAULT_VERSION
        codec = "utf-8"

    # MSA-3 is withdrawn from v2.7 on: the text then travels in ERR-8 only.
    msa_text = _escape(text[:_MSA_TEXT_MAX], enc) if _version_tuple(version) < (2, 7) else ""
    segments = [
        "MSH" + fs + enc.msh2 + fs + fs.join(msh_fields),
        fs.join(["MSA", code, inbound_id, msa_text]),
    ]
    if code[1] in "ER":
        segments.append(_err_segment(enc, version, error_code or _DEFAULT_ERROR_CODE, text, error_location))
    out = "".join(_strip_trailing(s, fs) + "\r" for s in segments)
    try:
        return out.encode(codec)
    except (UnicodeEncodeError, LookupError):
        return out.encode("utf-8")


def _err_segment(enc: Encoding, version: str, error_code: str, text: str, location: Sequence[str]) -> str:
    fs, cs, ss = enc.field, enc.component, enc.subcomponent
    name = ERROR_CODES.get(error_code, "")
    loc = [_escape(part, enc) for part in location]
    if _version_tuple(version) >= (2, 5):
        cwe = cs.join([_escape(error_code, enc), _escape(name, enc), "HL70357"])
        user_message = _escape(text[:_ERR_TEXT_MAX], enc)
        return fs.join(["ERR", "", cs.join(loc), cwe, "E", "", "", "", user_message])
    # ERR-1 (ELD): segment id ^ sequence ^ field position ^ code identifying error (CE, as subcomponents).
    if ss:
        ce = ss.join([_escape(error_code, enc), _escape(name, enc), "HL70357"])
    else:  # no subcomponent separator declared: the code alone
        ce = _escape(error_code, enc)
    eld = cs.join([*(loc[:3] + [""] * (3 - len(loc[:3]))), ce])
    return fs.join(["ERR", eld])


def _echo(raw: str) -> str:
    """A field copied from the inbound MSH as it was (delimiters and escapes kept), without control characters."""
    return _CONTROL.sub("", raw) if _CONTROL.search(raw) else raw


def _escape(value: str, enc: Encoding) -> str:
    """Printable ASCII with every delimiter written as its HL7 escape sequence (or as a space when the message
    declares no escape character)."""
    value = _NOT_PRINTABLE_ASCII.sub(lambda m: " " if m.group() in "\r\n\t" else "?", value)
    esc = enc.escape
    table = {
        enc.field: "F",
        enc.component: "S",
        enc.repetition: "R",
        enc.subcomponent: "T",
        enc.truncation: "P",
    }
    table.pop("", None)
    if not esc:
        return "".join(" " if c in table else c for c in value)
    table[esc] = "E"
    if not any(c in table for c in value):
        return value
    return "".join(f"{esc}{table[c]}{esc}" if c in table else c for c in value)


def _strip_trailing(segment: str, fs: str) -> str:
    """Drop trailing empty fields (never the MSH's own delimiters)."""
    stripped = segment.rstrip(fs)
    return stripped if len(stripped) >= 4 else segment[:4]


def _version_tuple(version: str) -> tuple[int, ...]:
    numbers = tuple(int(n) for n in _VERSION_NUMBERS.findall(version)[:3])
    return numbers or (2, 5)


def _header_message(raw_header: bytes) -> Message | None:
    """The MSH at the start of ``raw_header`` as a Message, or None when there is none the tokenizer reads."""
    head = raw_header.removeprefix(b"\xef\xbb\xbf").lstrip(b" \t\r\n")
    cut = len(head)
    for terminator in (b"\r", b"\n"):
        i = head.find(terminator)
        if 0 <= i < cut:
            cut = i
    try:
        return parse(head[:cut])
    except HL7ParseError:
        return None
