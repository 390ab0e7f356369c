"""A fast HL7 v2 tokenizer.

Why not hl7apy on the hot path: hl7apy builds a validated object tree and parses a 1 KB ADT in about 20 ms on
our 2-core machine (50 messages/s per core), while the gateway must sustain thousands of messages per second.
This module only splits text on the delimiters declared in MSH-1/MSH-2 (str.split runs in C) and unescapes a
value when it is read, so a message costs tens of microseconds. hl7apy stays where it is good: it is the
reference in the property tests that compare field values on the corpus (tests/unit/test_hl7v2_parse.py), and
the optional strict-validation mode (``gateway.hl7v2.strict``).

Numbering follows the standard: ``segment.get(3)`` is PID-3, components and subcomponents count from 1, and for
MSH, field 1 is the field separator and field 2 the encoding characters, so ``msh.get(9, 1)`` is MSH-9.1.
Values returned by :meth:`Segment.get` and :class:`Field` are unescaped; ``raw`` accessors are not. The HL7
explicit null ``""`` is returned as the empty string by ``get``; ``is_null`` tells it apart.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from gateway.errors import PermanentError

__all__ = ["Encoding", "Field", "HL7ParseError", "Message", "Segment", "decode", "parse", "unescape"]


class HL7ParseError(PermanentError):
    """The bytes are not an HL7 v2 message in ER7 (pipe) encoding. ``no_header``: there is no MSH segment at
    all (HL7 error 100), as opposed to an MSH or a segment that cannot be read (102)."""

    def __init__(self, message: str, *, no_header: bool = False) -> None:
        super().__init__(message)
        self.no_header = no_header


@dataclass(frozen=True, slots=True)
class Encoding:
    """The delimiters a message declares in MSH-1 and MSH-2."""

    field: str = "|"
    component: str = "^"
    repetition: str = "~"
    escape: str = "\\"
    subcomponent: str = "&"
    truncation: str = ""  # v2.7+: the fifth character of MSH-2, usually '#'

    @property
    def msh2(self) -> str:
        return self.component + self.repetition + self.escape + self.subcomponent + self.truncation


DEFAULT_ENCODING = Encoding()

# Formatting escapes that carry no text of their own (highlighting, character-set switches, indentation).
_DROPPED_ESCAPES = ("H", "N", ".in", ".ti", ".sk", ".ce", ".fi", ".nf")


def unescape(value: str, enc: Encoding) -> str:
    """Resolve HL7 escape sequences: \\F\\ \\S\\ \\T\\ \\R\\ \\E\\ \\P\\, \\Xhh..\\ (hex bytes), \\.br\\ and
    \\.sp\\ (line breaks). Highlighting and character-set escapes are dropped; anything unrecognised or
    unterminated is kept literally, so no input is lost."""
    esc = enc.escape
    if not esc or esc not in value:
        return value
    out: list[str] = []
    i, n = 0, len(value)
    while i < n:
        j = value.find(esc, i)
        if j < 0:
            out.append(value[i:])
            break
        out.append(value[i:j])
        k = value.find(esc, j + 1)
        if k < 0:  # unterminated: keep the rest as it is
            out.append(value[j:])
            break
        seq = value[j + 1 : k]
        rep = _escape_text(seq, enc)
        if rep is None:  # not an escape we know: keep the escape character and go on after it
            out.append(esc)
            i = j + 1
            continue
        out.append(rep)
        i = k + 1
    return "".join(out)


def _escape_text(seq: str, enc: Encoding) -> str | None:
    match seq:
        case "F":
            return enc.field
        case "S":
            return enc.component
        case "T":
            return enc.subcomponent
        case "R":
            return enc.repetition
        case "E":
            return enc.escape
        case "P":
            return enc.truncation or None
        case ".br" | ".sp":
            return "\n"
        case "":
            return None
    if seq[0] == "X" and len(seq) > 1 and len(seq) % 2 == 1:
        try:
            data = bytes.fromhex(seq[1:])
        except ValueError:
            return None
        try:
            return data.decode("utf-8")
        except UnicodeDecodeError:
            return data.decode("latin-1")
    if seq in _DROPPED_ESCAPES or (seq[0] in "CM" and all(c in "0123456789ABCDEFabcdef" for c in seq[1:])):
        return ""
    if seq.startswith((".sk", ".ti", ".in")):
        return ""
    return None


class Field:
    """One repetition of a field: components and subcomponents, unescaped on access."""

    __slots__ = ("_comps", "enc", "raw")

    def __init__(self, raw: str, enc: Encoding) -> None:
        self.raw = raw
        self.enc = enc
        self._comps: list[str] | None = None

    def _components(self) -> list[str]:
        if self._comps is None:
            self._comps = self.raw.split(self.enc.component)
        return self._comps

    def get(self, component: int = 1, subcomponent: int = 1) -> str:
        """Component (and subcomponent) value, unescaped; "" when absent or the explicit null."""
        comps = self._components()
        if component < 1 or component > len(comps):
            return ""
        c = comps[component - 1]
        if self.enc.subcomponent and self.enc.subcomponent in c:
            subs = c.split(self.enc.subcomponent)
            if subcomponent < 1 or subcomponent > len(subs):
                return ""
            c = subs[subcomponent - 1]
        elif subcomponent != 1:
            return ""
        if c == '""':
            return ""
        return unescape(c, self.enc)

    def components(self) -> list[str]:
        """Every component's first subcomponent, unescaped (index 0 is component 1)."""
        return [self.get(i) for i in range(1, len(self._components()) + 1)]

    def subcomponents(self, component: int) -> list[str]:
        comps = self._components()
        if component < 1 or component > len(comps):
            return []
        c = comps[component - 1]
        parts = c.split(self.enc.subcomponent) if self.enc.subcomponent else [c]
        return [unescape(p, self.enc) if p != '""' else "" for p in parts]

    @property
    def is_empty(self) -> bool:
        return self.raw == "" or self.raw == '""'

    def __repr__(self) -> str:  # never shows the value: it may be PHI
        return f"<Field {len(self.raw)} chars>"


class Segment:
    """One segment: ``fields[n]`` is the raw text of field n (``fields[0]`` is the segment name)."""

    __slots__ = ("enc", "fields", "name")

    def __init__(self, name: str, fields: list[str], enc: Encoding) -> None:
        self.name = name
        self.fields = fields
        self.enc = enc

    def raw(self, n: int) -> str:
        """The raw (escaped, undivided) text of field n, "" when absent."""
        return self.fields[n] if 0 <= n < len(self.fields) else ""

    def repetitions(self, n: int) -> list[Field]:
        """Field n's repetitions (empty ones kept, so positions line up); [] when the field is empty.
        MSH-1 and MSH-2 are never split."""
        raw = self.raw(n)
        if not raw:
            return []
        if self.name == "MSH" and n <= 2:
            return [Field(raw, _LITERAL)]
        return [Field(r, self.enc) for r in raw.split(self.enc.repetition)]

    def field(self, n: int, repetition: int = 1) -> Field:
        """One repetition of field n (an empty Field when absent)."""
        raw = self.raw(n)
        if self.name == "MSH" and n <= 2:
            return Field(raw, _LITERAL)
        if self.enc.repetition in raw:
            reps = raw.split(self.enc.repetition)
            raw = reps[repetition - 1] if 0 < repetition <= len(reps) else ""
        elif repetition != 1:
            raw = ""
        return Field(raw, self.enc)

    def get(self, n: int, component: int = 1, subcomponent: int = 1, repetition: int = 1) -> str:
        """The unescaped value at field n, component, subcomponent of one repetition; "" when absent."""
        raw = self.raw(n)
        if not raw:
            return ""
        if self.name == "MSH" and n <= 2:
            return raw
        enc = self.enc
        if enc.repetition in raw or enc.component in raw or (enc.subcomponent and enc.subcomponent in raw):
            return self.field(n, repetition).get(component, subcomponent)
        if component != 1 or subcomponent != 1 or repetition != 1 or raw == '""':
            return ""
        return unescape(raw, enc)

    def is_null(self, n: int) -> bool:
        """True when field n holds the explicit HL7 null ``""`` (meaning: delete the value)."""
        return self.raw(n) == '""'

    def __len__(self) -> int:
        return len(self.fields) - 1

    def __repr__(self) -> str:  # never shows values: they may be PHI
        return f"<Segment {self.name} {len(self)} fields>"


# MSH-1 and MSH-2 hold delimiters literally; an encoding with no delimiters reads them as they are.
_LITERAL = Encoding(field="", component="\x00", repetition="\x00", escape="", subcomponent="")


class Message:
    """A tokenized HL7 v2 message: its segments in order and the encoding it declared."""

    __slots__ = ("_index", "encoding", "segments")

    def __init__(self, encoding: Encoding, segments: list[Segment]) -> None:
        self.encoding = encoding
        self.segments = segments
        index: dict[str, list[Segment]] = {}
        for s in segments:
            index.setdefault(s.name, []).append(s)
        self._index = index

    @property
    def msh(self) -> Segment:
        return self.segments[0]

    def first(self, name: str) -> Segment | None:
        segs = self._index.get(name)
        return segs[0] if segs else None

    def all(self, name: str) -> list[Segment]:
        return self._index.get(name, [])

    @property
    def message_type(self) -> str:
        """MSH-9.1, e.g. "ADT"."""
        return self.msh.get(9, 1)

    @property
    def trigger_event(self) -> str:
        """MSH-9.2, e.g. "A01"."""
        return self.msh.get(9, 2)

    @property
    def control_id(self) -> str:
        """MSH-10."""
        return self.msh.get(10)

    @property
    def version(self) -> str:
        """MSH-12.1, e.g. "2.5.1"."""
        return self.msh.get(12, 1)

    def __repr__(self) -> str:
        return f"<Message {self.message_type}^{self.trigger_event} {len(self.segments)} segments>"


_HEADER_SEGMENTS = frozenset({"MSH", "BHS", "FHS"})
_SEGMENT_NAME = re.compile(r"[A-Z][A-Z0-9]{2}\Z")
_SEGMENT_SPLIT = re.compile(r"\r\n|\r|\n")

# MSH-18 character sets (HL7 table 0211) and the Python codecs that read them.
_CHARSETS = {
    "ASCII": "ascii",
    "8859/1": "latin-1",
    "8859/2": "iso8859-2",
    "8859/3": "iso8859-3",
    "8859/4": "iso8859-4",
    "8859/5": "iso8859-5",
    "8859/6": "iso8859-6",
    "8859/7": "iso8859-7",
    "8859/8": "iso8859-8",
    "8859/9": "iso8859-9",
    "8859/15": "iso8859-15",
    "UNICODE UTF-8": "utf-8",
    "UNICODE": "utf-8",
    "UTF-8": "utf-8",
    "ISO IR6": "ascii",
    "ISO IR100": "latin-1",
    "ISO IR192": "utf-8",
    "ISO IR87": "iso2022_jp",
    "ISO IR159": "iso2022_jp_2",
    "GB 18030-2000": "gb18030",
    "KS X 1001": "euc_kr",
    "CNS 11643-1992": "big5",
    "BIG-5": "big5",
    "UNICODE UTF-16": "utf-16",
    "UNICODE UTF-32": "utf-32",
}


def charset_codec(msh18: str) -> str | None:
    """The Python codec for an MSH-18 value (first repetition), or None when unknown or absent."""
    return _CHARSETS.get(msh18.strip().upper()) if msh18 else None


def decode(data: bytes) -> str:
    """Bytes as received to text: a UTF-8 BOM is dropped; the charset named in MSH-18 is used when it is
    known; otherwise UTF-8, and Latin-1 (which never fails) when the bytes are not UTF-8."""
    if data.startswith(b"\xef\xbb\xbf"):
        data = data[3:]
    codec = None
    head = data[:4096].lstrip(b" \t\r\n")
    if head.startswith(b"MSH"):
        first = _SEGMENT_SPLIT.split(head.decode("latin-1"), maxsplit=1)[0]
        if len(first) > 3:
            parts = first.split(first[3])
            if len(parts) > 17:  # parts[n] is MSH-(n+1); parts[1][1] is the repetition separator
                rep = parts[1][1:2]
                codec = charset_codec(parts[17].split(rep)[0] if rep else parts[17])
    if codec:
        try:
            return data.decode(codec)
        except (UnicodeDecodeError, LookupError):
            pass
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return data.decode("latin-1")


def parse(message: str | bytes) -> Message:
    """Tokenize one HL7 v2 message. Segments may be separated by CR, LF or CRLF; empty lines are skipped.

    Raises HL7ParseError when the first segment is not MSH, when MSH-1/MSH-2 do not declare distinct
    delimiters, or when a segment name is not three upper-case letters or digits.
    """
    text = decode(message) if isinstance(message, bytes) else message
    text = text.lstrip("\ufeff \t\r\n")
    if not text.startswith("MSH") or len(text) < 8:
        raise HL7ParseError("the message does not start with an MSH segment", no_header=True)
    fs = text[3]
    if fs.isalnum() or fs in "\r\n ":
        raise HL7ParseError("MSH-1 does not declare a usable field separator")
    lines = [ln for ln in _SEGMENT_SPLIT.split(text) if ln.strip()]
    header = lines[0]
    end = header.find(fs, 4)
    msh2 = header[4:] if end < 0 else header[4:end]
    enc = _encoding(fs, msh2)
    msh_fields = ["MSH", fs, *header[4:].split(fs)]
    segments = [Segment("MSH", msh_fields, enc)]
    for line in lines[1:]:
        fields = line.split(fs)
        name = fields[0]
        if name in _HEADER_SEGMENTS:
            # Like MSH, batch and file headers count their field separator as field 1.
            fields = [name, fs, *fields[1:]]
        if not _SEGMENT_NAME.match(name):
            stripped = name.strip()
            if not _SEGMENT_NAME.match(stripped):
                raise HL7ParseError(f"segment {len(segments) + 1} has an invalid name")
            fields[0] = name = stripped
        segments.append(Segment(name, fields, enc))
    return Message(enc, segments)


def _encoding(fs: str, msh2: str) -> Encoding:
    # Some senders double the escape character in MSH-2 ("^~\\&"), an artefact of string literals; read it as one.
    if len(msh2) == 5 and msh2[2] == msh2[3] == "\\":
        msh2 = msh2[:3] + msh2[4:]
    if len(msh2) < 2:
        raise HL7ParseError("MSH-2 declares fewer than two encoding characters")
    chars = list(msh2[:5])
    if len(set(chars)) != len(chars) or fs in chars or any(c.isalnum() or c in "\r\n" for c in chars):
        raise HL7ParseError("MSH-2 encoding characters are not distinct delimiters")
    comp, rep = chars[0], chars[1]
    esc = chars[2] if len(chars) > 2 else ""
    sub = chars[3] if len(chars) > 3 else ""
    trunc = chars[4] if len(chars) > 4 else ""
    return Encoding(field=fs, component=comp, repetition=rep, escape=esc, subcomponent=sub, truncation=trunc)
