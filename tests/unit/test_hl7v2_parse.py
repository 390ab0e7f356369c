"""The HL7 v2 tokenizer (gateway.hl7v2.parse): escapes, encoding characters, separators and charsets, hostile
input, and a leaf-by-leaf comparison with hl7apy (the reference) over the fhir-converter corpus."""

from __future__ import annotations

import os
import re
import signal
from collections.abc import Iterator
from contextlib import contextmanager
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from hl7apy.consts import VALIDATION_LEVEL
from hl7apy.parser import parse_message
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.hl7v2.parse import (
    DEFAULT_ENCODING,
    Encoding,
    Field,
    HL7ParseError,
    Message,
    Segment,
    charset_codec,
    decode,
    parse,
    unescape,
)

# Same location rule as tests/conftest.py: GATEWAY_CORPORA, else ../shared/corpora next to the repository.
CORPORA = Path(os.environ.get("GATEWAY_CORPORA", Path(__file__).resolve().parents[3] / "shared" / "corpora")) / "hl7v2"
TRICKY = CORPORA / "tricky"
FHIR_CONVERTER = CORPORA / "fhir-converter" / "input"

# The corpora are part of the test environment: missing ones are a failure, not a skip.
assert CORPORA.is_dir(), f"the HL7 v2 corpora are not at {CORPORA}"


def _read(path: Path) -> bytes:
    return path.read_bytes()


@contextmanager
def _deadline(seconds: float) -> Iterator[None]:
    """Fail the enclosed call when it runs longer than ``seconds`` (pure-Python loops are interrupted)."""

    def _expired(signum: int, frame: Any) -> None:
        raise TimeoutError(f"call did not finish within {seconds} s")

    previous = signal.signal(signal.SIGALRM, _expired)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


# --- escapes -----------------------------------------------------------------------------------------------

ESCAPES = [
    ("field", r"a\F\b", "a|b"),
    ("component", r"a\S\b", "a^b"),
    ("subcomponent", r"a\T\b", "a&b"),
    ("repetition", r"a\R\b", "a~b"),
    ("escape", r"C:\E\temp", "C:\\temp"),
    ("all-delimiters", r"\F\\S\\T\\R\\E\ ".strip(), "|^&~\\"),
    ("hex-one-byte", r"\X41\ ".strip(), "A"),
    ("hex-crlf", r"line1\X0D0A\line2", "line1\r\nline2"),
    ("hex-lower-case", r"\X0d0a\ ".strip(), "\r\n"),
    ("hex-utf8-sequence", r"caf\XC3A9\ ".strip(), "caf\u00e9"),
    ("hex-not-utf8-is-latin1", r"caf\XE9\ ".strip(), "caf\u00e9"),
    ("hex-odd-digits-kept", r"\X4\ ".strip(), "\\X4\\"),
    ("hex-not-hex-kept", r"\XZZ\ ".strip(), "\\XZZ\\"),
    ("line-break", r"one\.br\two", "one\ntwo"),
    ("space-line", r"one\.sp\two", "one\ntwo"),
    ("highlight-dropped", r"\H\bold\N\ normal", "bold normal"),
    ("charset-switch-dropped", r"\C2842\kanji\M2442\ ".strip(), "kanji"),
    ("indent-dropped", r"\.in+4\text", "text"),
    ("unterminated-kept", r"abc\F", "abc\\F"),
    ("lone-escape-kept", "a\\", "a\\"),
    ("unknown-kept", r"a\Q\b", "a\\Q\\b"),
    ("empty-sequence-kept", r"a\\b", "a\\\\b"),
    ("truncation-without-declaration-kept", r"50\P\ ".strip(), "50\\P\\"),
    ("no-escape-at-all", "plain text", "plain text"),
    ("unicode-untouched", "\u00c5ngstr\u00f6m", "\u00c5ngstr\u00f6m"),
]


@pytest.mark.parametrize(("escaped", "expected"), [e[1:] for e in ESCAPES], ids=[e[0] for e in ESCAPES])
def test_unescape(escaped: str, expected: str) -> None:
    assert unescape(escaped, DEFAULT_ENCODING) == expected


@pytest.mark.parametrize(("escaped", "expected"), [e[1:] for e in ESCAPES], ids=[e[0] for e in ESCAPES])
def test_escapes_through_segment_get(escaped: str, expected: str) -> None:
    """The same values read from a field (no delimiter in them, so get() goes through its fast path)."""
    msg = parse(f"MSH|^~\\&|A|B|C|D|20240101||ADT^A01|1|P|2.5\rNTE|1||{escaped}")
    assert msg.segments[1].raw(3) == escaped
    assert msg.segments[1].get(3) == expected


def test_escaped_delimiters_do_not_split() -> None:
    msg = parse("MSH|^~\\&|A|B|C|D|20240101||ADT^A01|1|P|2.5\rNTE|1||x\\S\\y^z\\T\\w~v\\R\\u")
    nte = msg.segments[1]
    assert len(nte.repetitions(3)) == 2
    assert nte.get(3, 1) == "x^y"
    assert nte.get(3, 2) == "z&w"
    assert nte.get(3, 1, repetition=2) == "v~u"


def test_truncation_escape_with_declared_truncation_character() -> None:
    enc = parse("MSH|^~\\&#|A|B|C|D|20240101||RSP^K22^RSP_K21|1|P|2.7\rNTE|1").encoding
    assert enc.truncation == "#"
    assert unescape(r"50\P\ off", enc) == "50# off"


def test_hapi_escape_oracle_pair() -> None:
    """HAPI's EscapeTest pair: the escaped field decodes to the stored text (stored with LF line ends)."""
    escaped = _read(TRICKY / "hapi_escape_pair_ESCAPED.txt").decode("ascii")
    unescaped = _read(TRICKY / "hapi_escape_pair_UNESCAPED.txt").decode("ascii")
    assert unescape(escaped, DEFAULT_ENCODING).replace("\r\n", "\n") == unescaped


def test_explicit_null() -> None:
    msg = parse('MSH|^~\\&|A|B|C|D|20240101||ADT^A01|1|P|2.5\rPID|1||""|x^""^y')
    pid = msg.segments[1]
    assert pid.is_null(3)
    assert pid.get(3) == ""
    assert pid.raw(3) == '""'
    assert pid.get(4, 2) == ""
    assert pid.field(4).components() == ["x", "", "y"]
    assert not pid.is_null(4)


# --- encoding characters -----------------------------------------------------------------------------------

INLINE_CUSTOM = "MSH$%*\\!$SND%APP$SFAC$RCV$RFAC$20240305$$ADT%A01$C-7$P$2.5\rPID$1$$123%%%H!X!ISO*456$DOE%J\\F\\N\\S\\"


def test_inline_custom_encoding_characters() -> None:
    msg = parse(INLINE_CUSTOM)
    assert msg.encoding == Encoding(field="$", component="%", repetition="*", escape="\\", subcomponent="!")
    assert msg.msh.get(1) == "$"
    assert msg.msh.get(2) == "%*\\!"
    assert msg.message_type == "ADT"
    assert msg.trigger_event == "A01"
    assert msg.control_id == "C-7"
    pid = msg.segments[1]
    assert [r.raw for r in pid.repetitions(3)] == ["123%%%H!X!ISO", "456"]
    assert pid.get(3, 4, 2) == "X"
    assert pid.field(3).subcomponents(4) == ["H", "X", "ISO"]
    assert pid.get(3, repetition=2) == "456"
    assert pid.get(4, 2) == "J$N%"  # \F\ and \S\ mean this message's delimiters


def test_hapi_msh2_with_brace_as_subcomponent_separator() -> None:
    msg = parse(_read(TRICKY / "hapi_split_bar_p01_MSH2_caret_tilde_bslash_brace.hl7"))
    assert msg.encoding == Encoding("|", "^", "~", "\\", "}")
    assert msg.message_type == "BAR"
    assert msg.control_id == "589888ADT30502184808"
    assert [s.name for s in msg.segments] == ["MSH", "EVN", "PID", "NK1", "PV1", "GT1", "IN1", "DST"]
    pid = msg.segments[2]
    assert pid.get(3, 1) == "429314294"
    assert pid.get(3, 3) == "M10"
    assert pid.get(5) == "WASHINGTON-HARPER"
    assert pid.get(11, 2) == ""  # "" explicit null in a component
    assert pid.get(11, 3) == "ST.LOUIS"
    assert [r.raw for r in pid.repetitions(13)] == ["(314)389-8628", "", ""]


def test_hapi_msh2_with_only_three_characters() -> None:
    msg = parse(_read(TRICKY / "hapi_split_bar_p0x_MSH2_only_3_chars.hl7"))
    assert msg.encoding == Encoding("|", "^", "~", "}", "")
    assert msg.msh.get(2) == "^~}"
    assert msg.control_id == "908594ADT30502185327"
    pid = msg.segments[2]
    assert pid.get(5, 1) == "CRESWELL"
    assert pid.get(5, 1, 2) == ""  # no subcomponent separator: nothing beyond subcomponent 1
    assert pid.field(5).subcomponents(1) == ["CRESWELL"]


def test_hapi_caret_as_field_separator_with_crlf() -> None:
    msg = parse(_read(TRICKY / "hapi_adt_a24_crlf.hl7"))
    assert msg.encoding == Encoding("^", "~", "|", "\\", "&")
    assert msg.message_type == "ADT"
    assert msg.trigger_event == "A24"
    assert [s.name for s in msg.segments] == ["MSH", "EVN", "PID", "PID"]
    pid = msg.segments[2]
    reps = pid.repetitions(3)
    assert [r.raw for r in reps] == ["11111~~~FOO&&0363~NI~FACILITY ID&200M&L"]  # '|' is the repetition here
    assert pid.get(3, 4, 3) == "0363"
    assert pid.get(3, 6, 2) == "200M"
    assert pid.get(5, 2) == "JOHN"


def test_pyhl7_repetitions_and_subcomponents() -> None:
    msg = parse(_read(TRICKY / "pyhl7_repetition_subcomponent.hl7"))
    pid = msg.segments[1]
    assert pid.get(1) == "Field1"
    assert pid.field(2).components() == ["Component1", "Component2"]
    assert pid.get(3, 2) == "Sub-Component1"
    assert pid.get(3, 2, 2) == "Sub-Component2"
    assert pid.get(3, 2, 3) == ""
    assert pid.get(3, 3) == "Component3"
    assert [r.get() for r in pid.repetitions(4)] == ["Repeat1", "Repeat2"]
    assert pid.get(4, repetition=2) == "Repeat2"
    assert pid.get(4, repetition=3) == ""
    assert pid.get(99) == ""
    assert pid.repetitions(99) == []


def test_truncation_character_v27() -> None:
    msg = parse(_read(TRICKY / "hl7apy_rsp_k22_v27_truncation_char.hl7"))
    assert msg.encoding.truncation == "#"
    assert msg.encoding.msh2 == "^~\\&#"
    assert msg.version == "2.7"
    assert msg.segments[4].get(3, 4, 2) == "1.3.6.1.4.1.21367.2011.2.5.17"


@pytest.mark.parametrize(
    "source",
    [
        CORPORA / "linuxforhealth" / "sample_unix.hl7",
        b"MSH|^~\\\\&|A|B|C|D|20240101||ADT^A01|1|P|2.6\rPID|1||X\\T\\Y",
    ],
    ids=["linuxforhealth-sample-unix", "inline"],
)
def test_doubled_backslash_in_msh2_is_one_escape_character(source: Path | bytes) -> None:
    msg = parse(source if isinstance(source, bytes) else _read(source))
    assert msg.encoding == DEFAULT_ENCODING
    assert msg.msh.raw(2) == "^~\\\\&"  # the raw field is left as it was sent
    assert msg.version == "2.6"


def test_doubled_backslash_unescapes_with_the_single_escape() -> None:
    msg = parse(b"MSH|^~\\\\&|A|B|C|D|20240101||ADT^A01|1|P|2.6\rPID|1||X\\T\\Y")
    assert msg.segments[1].get(3) == "X&Y"


@pytest.mark.parametrize(
    "source",
    [
        _read(TRICKY / "hl7apy_BAD_duplicate_encoding_chars.hl7") if TRICKY.is_dir() else b"",
        b"MSH|^^\\&|A",
        b"MSH|^~\\~|A",
        b"MSH|^|\\&|A",  # the field separator again
        b"MSH|^~A&|A",  # alphanumeric
        b"MSH|^|A|B",  # one character
        b"MSH||A|B",
    ],
    ids=[
        "hl7apy-duplicate",
        "dup-component",
        "dup-repetition",
        "field-sep-in-msh2",
        "alnum",
        "one-char",
        "empty",
    ],
)
def test_unusable_encoding_characters_are_rejected(source: bytes) -> None:
    with pytest.raises(HL7ParseError):
        parse(source)


@pytest.mark.parametrize(
    "source",
    [
        b"",
        b"   \r\n",
        b"PID|1||123",
        b"MSH",
        b"MSH|^~\\",  # too short
        b"MSHA^~\\&|",  # alphanumeric field separator
        b"MSH ^~\\&",
        b"\x00\x01\x02MSH|^~\\&|A",
        "\ufeffEVN|A01".encode(),
    ],
    ids=[
        "empty",
        "blank",
        "pid-first",
        "just-msh",
        "too-short",
        "alnum-fs",
        "space-fs",
        "junk-first",
        "bom-evn",
    ],
)
def test_no_msh_is_rejected(source: bytes) -> None:
    with pytest.raises(HL7ParseError):
        parse(source)


@pytest.mark.parametrize(
    "name",
    [
        "pyhl7_BAD_batch_no_MSH.hl7",
        "pyhl7_batch_BHS_2msgs_BTS.hl7",
        "pyhl7_file_FHS_2batches_FTS.hl7",
        "hapi_messages_txt_18msgs_comments_custom_encchars.txt",
    ],
)
def test_batch_and_file_headers_are_not_a_message(name: str) -> None:
    with pytest.raises(HL7ParseError):
        parse(_read(TRICKY / name))


def test_invalid_segment_name_is_rejected() -> None:
    with pytest.raises(HL7ParseError, match="segment 2"):
        parse("MSH|^~\\&|A|B|C|D|20240101||ADT^A01|1|P|2.5\rpid|1")


def test_segment_name_surrounded_by_spaces_is_accepted() -> None:
    msg = parse("MSH|^~\\&|A|B|C|D|20240101||ADT^A01|1|P|2.5\r PID|1")
    assert msg.segments[1].name == "PID"


# --- hostile input -----------------------------------------------------------------------------------------

FUZZ = sorted(TRICKY.glob("nhapi_FUZZ_*.bin")) if TRICKY.is_dir() else []


@pytest.mark.parametrize("path", FUZZ, ids=[p.name for p in FUZZ])
def test_nhapi_fuzz_crashers_give_a_message_or_a_parse_error(path: Path) -> None:
    data = _read(path)
    with _deadline(2.0):
        try:
            msg = parse(data)
        except HL7ParseError:
            return
        _touch_everything(msg)


def test_fuzz_corpus_is_there() -> None:
    assert len(FUZZ) == 10


def _touch_everything(msg: Message) -> None:
    for seg in msg.segments:
        for n in range(len(seg) + 2):
            seg.get(n)
            seg.get(n, 2, 2, 2)
            for rep in seg.repetitions(n):
                rep.components()
                rep.subcomponents(1)
    assert isinstance(msg.message_type, str)
    assert isinstance(msg.control_id, str)
    assert isinstance(msg.version, str)


_hl7ish = st.text(alphabet=st.sampled_from([*"MSH|^~\\&#$%!*\r\nPIDXF0A1.br ", "\ufeff", "\u00e9", "\x00"]))


@settings(max_examples=500, deadline=None)
@given(
    st.one_of(
        st.binary(max_size=120),
        _hl7ish.map(lambda s: "MSH" + s),
        st.binary(max_size=120).map(lambda b: b"MSH|^~\\&|" + b),
    )
)
def test_property_any_input_gives_a_message_or_a_parse_error(data: bytes | str) -> None:
    with _deadline(2.0):
        try:
            msg = parse(data)
        except HL7ParseError:
            return
        _touch_everything(msg)


# --- separators, BOM, charsets -----------------------------------------------------------------------------

BASE = "MSH|^~\\&|A|B|C|D|20240101||ADT^A01^ADT_A01|X1|P|2.5\rEVN|A01\rPID|1||123^^^H^MR||DOE^JANE\rPV1|1|I"


@pytest.mark.parametrize(
    "variant",
    [
        BASE.encode(),
        BASE.replace("\r", "\n").encode(),
        BASE.replace("\r", "\r\n").encode(),
        BASE.replace("\r", "\r\n") + "\r\n",
        b"\xef\xbb\xbf" + BASE.encode(),
        "\ufeff" + BASE,
        ("\r\n\r\n" + BASE.replace("\r", "\r\r") + "\r").encode(),
        BASE.replace("\rPID", "\nPID").replace("\rPV1", "\r\nPV1").encode(),
    ],
    ids=["cr", "lf", "crlf", "crlf-str-trailing", "bom-bytes", "bom-str", "blank-lines", "mixed"],
)
def test_segment_separators_and_bom(variant: bytes | str) -> None:
    msg = parse(variant)
    assert [s.name for s in msg.segments] == ["MSH", "EVN", "PID", "PV1"]
    assert msg.msh.get(3) == "A"
    assert msg.segments[2].get(5, 2) == "JANE"
    assert msg.segments[3].get(2) == "I"
    assert msg.control_id == "X1"


def _with_charset(msh18: str, body: bytes) -> bytes:
    return b"MSH|^~\\&|A|B|C|D|20240101||ADT^A01|1|P|2.5||||||" + msh18.encode() + b"\rPID|1||1||" + body


@pytest.mark.parametrize(
    ("msh18", "body", "expected"),
    [
        ("8859/1", b"M\xfcller^Ren\xe9e", ("M\u00fcller", "Ren\u00e9e")),
        ("8859/1", b"\xc3\xa9^x", ("\u00c3\u00a9", "x")),  # valid UTF-8 bytes, read as the declared Latin-1
        ("8859/15", b"\xa4uro^x", ("\u20acuro", "x")),
        ("8859/5", "\u0418\u0432\u0430\u043d^x".encode("iso8859-5"), ("\u0418\u0432\u0430\u043d", "x")),
        ("UNICODE UTF-8", "M\u00fcller^\u65e5\u672c".encode(), ("M\u00fcller", "\u65e5\u672c")),
        ("", "M\u00fcller^x".encode(), ("M\u00fcller", "x")),  # no MSH-18: UTF-8
        ("", b"M\xfcller^x", ("M\u00fcller", "x")),  # no MSH-18 and not UTF-8: Latin-1
        ("NO SUCH SET", b"M\xfcller^x", ("M\u00fcller", "x")),
    ],
    ids=[
        "latin1",
        "latin1-over-utf8",
        "latin9-euro",
        "cyrillic",
        "utf8",
        "default-utf8",
        "fallback",
        "unknown",
    ],
)
def test_msh18_charset(msh18: str, body: bytes, expected: tuple[str, str]) -> None:
    msg = parse(_with_charset(msh18, body))
    assert msg.msh.get(18) == msh18
    assert (msg.segments[1].get(5, 1), msg.segments[1].get(5, 2)) == expected


def test_charset_codec_table() -> None:
    assert charset_codec("8859/1") == "latin-1"
    assert charset_codec(" unicode utf-8 ") == "utf-8"
    assert charset_codec("") is None
    assert charset_codec("EBCDIC") is None


def test_latin_a_grave_in_msh() -> None:
    msg = parse(_read(TRICKY / "hapi_oru_r01_latin_a_grave_in_msh.hl7"))
    assert msg.msh.raw(5) == "DMCRES\u00e0"  # UTF-8 bytes without MSH-18
    assert msg.version == "2.2"


def test_decode_drops_bom_and_uses_msh18() -> None:
    assert decode(b"\xef\xbb\xbf" + _with_charset("8859/1", b"\xe9")).endswith("\u00e9")


# --- regressions: tokenizer bugs found by these tests, now fixed -------------------------------------------


def test_leading_newline_keeps_msh18_charset() -> None:
    msg = parse(b"\r\n" + _with_charset("8859/5", "\u0418\u0432\u0430\u043d".encode("iso8859-5")))
    assert msg.segments[1].get(5) == "\u0418\u0432\u0430\u043d"


def test_second_msh_is_numbered_like_msh_or_rejected() -> None:
    try:
        msg = parse(_read(TRICKY / "pyhl7_batch_no_header_2msgs.hl7"))
    except HL7ParseError:
        return
    second = msg.all("MSH")[1]
    assert second.get(10) == "12334456778891"
    assert second.get(9, 2) == "A04"


def test_subcomponent_zero_is_absent() -> None:
    assert Field("a&b", DEFAULT_ENCODING).get(1, 0) == ""


# --- hl7apy comparison -------------------------------------------------------------------------------------
#
# How hl7apy 1.3.5 (parse_message, TOLERANT, find_groups=False) represents what it reads, as found on this
# corpus:
# - Segments: one child per segment, in order, with the same names.
# - Fields: a field whose text is blank (empty or whitespace only) is dropped; every repetition of a non-blank
#   field is kept, empty repetitions included, in document order. A field is named SEG_n only when the
#   version's tables know position n; others (e.g. PID-28 in v2.8, withdrawn) are kept unnamed, in order. So
#   the non-blank fields' repetitions line up one to one with hl7apy's field children (713 unnamed here).
# - Components and subcomponents: named DT_n by position, or unnamed (base data types, unknown positions);
#   blank ones are dropped where named and kept where unnamed. Leaves therefore line up once blank leaves are
#   dropped on both sides, and the DT_n names must agree with our positions (about 61,000 leaves here).
# - Values are not unescaped by hl7apy (the raw escaped text is stored); DTM/DT/TM leaves are converted to
#   datetime and NM/SI to Decimal/int. to_er7() of a textual leaf re-escapes it, so str leaves are compared as
#   stored and converted ones through to_er7() (datetimes round-trip exactly on this corpus).
# Systematic differences, allowed for below:
# - hl7apy strips each segment's text, so trailing whitespace of a segment's last field is lost (52 segments
#   in 32 files here: PD1, PID, IN1, IN2, ORC, PRB, NTE).
# - numeric leaves are normalised (SI "001" -> 1), so they are compared as numbers (35 leaves here).
# - to_er7() of a whole field is not positional (unnamed components go last, trailing separators differ), so
#   fields are compared leaf by leaf, not by to_er7().
# - hl7apy cannot read 3 files (segment PRT unknown to its v2.5 tables): for those the test checks that hl7apy
#   still fails the same way, so a newer hl7apy that reads them makes the test ask to be updated.

HL7APY_CANNOT_READ = frozenset({"MDHHS-OML-O21-1.hl7", "MDHHS-OML-O21-2.hl7", "ORU-R01-01.hl7"})

CORPUS = sorted(FHIR_CONVERTER.glob("*.hl7")) if FHIR_CONVERTER.is_dir() else []
_POSITION = re.compile(r"_(\d+)$")


def _corpus_text(path: Path) -> str:
    return _read(path).decode("utf-8-sig").replace("\r\n", "\r").replace("\n", "\r")


def _position(name: str | None) -> int | None:
    match = _POSITION.search(name) if name else None
    return int(match.group(1)) if match else None


def _leaf(sub: Any) -> tuple[str, Any]:
    value = sub.value.value if hasattr(sub.value, "value") else sub.value
    return (value if isinstance(value, str) else sub.to_er7()), value


# Only the standard delimiter escapes, written independently of the tokenizer's unescape().
_REFERENCE_ESCAPES = {"F": "|", "S": "^", "T": "&", "R": "~", "E": "\\"}
_ANY_ESCAPE = re.compile(r"\\([^\\]*)\\")


def _reference_unescape(raw: str) -> str | None:
    """None when the value holds an escape other than the five delimiter ones."""
    if any(seq not in _REFERENCE_ESCAPES for seq in _ANY_ESCAPE.findall(raw)):
        return None
    return _ANY_ESCAPE.sub(lambda m: _REFERENCE_ESCAPES[m.group(1)], raw)


@pytest.mark.parametrize("path", CORPUS, ids=[p.name for p in CORPUS])
def test_fields_match_hl7apy(path: Path) -> None:
    text = _corpus_text(path)
    if path.name in HL7APY_CANNOT_READ:
        with pytest.raises(Exception, match="PRT"):
            parse_message(text, find_groups=False, validation_level=VALIDATION_LEVEL.TOLERANT)
        assert parse(text).first("PRT") is not None  # we read what hl7apy cannot
        return
    reference = parse_message(text, find_groups=False, validation_level=VALIDATION_LEVEL.TOLERANT)
    ours = parse(text)
    enc = ours.encoding
    assert [s.name for s in reference.children] == [s.name for s in ours.segments]

    for ref_seg, seg in zip(reference.children, ours.segments, strict=True):
        last = len(seg)
        ours_reps: list[tuple[int, int, str]] = []
        for n in range(1, last + 1):
            raw = seg.raw(n).rstrip() if n == last else seg.raw(n)  # hl7apy strips the segment's text
            if not raw.strip():
                continue
            if seg.name == "MSH" and n <= 2:
                ours_reps.append((n, 1, raw))
            else:
                ours_reps.extend((n, r, rep) for r, rep in enumerate(raw.split(enc.repetition), 1))
        assert len(ours_reps) == len(ref_seg.children), f"{seg.name}: field repetitions differ"

        for (n, r, raw_rep), ref_field in zip(ours_reps, ref_seg.children, strict=True):
            where = f"{seg.name}-{n}[{r}]"
            if ref_field.name is not None:
                assert _position(ref_field.name) == n, where
            if seg.name == "MSH" and n <= 2:
                assert ref_field.to_er7() == raw_rep == seg.raw(n), where
                continue
            _compare_leaves(seg, n, r, raw_rep, ref_field, enc, where)


def _compare_leaves(seg: Segment, n: int, r: int, raw_rep: str, ref_field: Any, enc: Encoding, where: str) -> None:
    leaves = [
        (c, s, sub)
        for c, comp in enumerate(raw_rep.split(enc.component), 1)
        for s, sub in enumerate(comp.split(enc.subcomponent), 1)
        if sub.strip()
    ]
    ref_leaves = [(comp, sub, *_leaf(sub)) for comp in ref_field.children for sub in comp.children]
    ref_leaves = [leaf for leaf in ref_leaves if leaf[2].strip()]
    assert len(leaves) == len(ref_leaves), f"{where}: {len(leaves)} leaves, hl7apy {len(ref_leaves)}"

    for (c, s, raw), (ref_comp, ref_sub, ref_text, ref_value) in zip(leaves, ref_leaves, strict=True):
        at = f"{where}.{c}.{s}"
        if isinstance(ref_value, int | Decimal) and not isinstance(ref_value, bool):
            assert type(ref_value)(raw) == ref_value, at  # hl7apy normalises numbers
        else:
            assert ref_text == raw, at
        if _position(ref_comp.name) is not None:
            assert _position(ref_comp.name) == c, at
        if _position(ref_sub.name) is not None:
            assert _position(ref_sub.name) == s, at
        if seg.name in ("MSH", "PID", "PV1", "OBX"):
            expected = "" if raw == '""' else _reference_unescape(raw)
            got = seg.get(n, c, s, r)
            if expected is not None:
                assert (got.rstrip() if n == len(seg) else got) == expected, at


def test_hl7apy_comparison_covered_the_corpus() -> None:
    """At least 100 of the 139 files are compared field by field."""
    assert len(CORPUS) == 139
    assert len(HL7APY_CANNOT_READ) <= len(CORPUS) - 100
    assert all((FHIR_CONVERTER / name).is_file() for name in HL7APY_CANNOT_READ)
