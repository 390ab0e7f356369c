"""The HL7 ACK builder: header swap, MSA/ERR layout per version, encoding characters and charset, escaping,
and the generic ACK for frames without a readable MSH. Each ACK is read back with our tokenizer, and the ones
hl7apy knows a structure for are validated strictly against hl7apy's v2 tables."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

import pytest
from hl7apy.consts import VALIDATION_LEVEL
from hl7apy.parser import parse_message

from gateway.hl7v2.ack import ERROR_CODES, build_ack
from gateway.hl7v2.parse import Message, parse

NOW = datetime(2024, 3, 5, 7, 8, 9, tzinfo=UTC)
STAMP = "20240305070809+0000"

INBOUND = (
    "MSH|^~\\&|SENDAPP^1.2.3&x^ISO|SENDFAC|RECVAPP|RECVFAC^2.16.840.1^ISO|20240305070000||ADT^A01^ADT_A01|"
    "CTRL-42|T|2.5.1|||AL|NE||UNICODE UTF-8\r"
    "EVN|A01|20240305070000\r"
    "PID|1||123^^^HOSP^MR||DOE^JOHN"
)


def _inbound(version: str = "2.5", msh9: str = "ADT^A01^ADT_A01", extra: str = "") -> Message:
    return parse(f"MSH|^~\\&|SA|SF|RA|RF|20240305070000||{msh9}|C1|P|{version}{extra}\rPID|1")


def _ack(msg: Message | None, code: str = "AA", **kw: object) -> bytes:
    kw.setdefault("control_id", "ACK-1")
    kw.setdefault("now", NOW)
    return build_ack(msg, code, **kw)  # type: ignore[arg-type]


def _segments(ack: bytes, codec: str = "utf-8") -> list[str]:
    assert ack.endswith(b"\r"), "every segment, the last included, ends with CR"
    assert b"\n" not in ack
    return ack.decode(codec).split("\r")[:-1]


def test_header_fields_are_swapped_and_copied() -> None:
    ack = _ack(parse(INBOUND), "AA", control_id="NEW-ID-7")
    back = parse(ack)
    msh = back.msh
    assert msh.raw(3) == "RECVAPP"
    assert msh.raw(4) == "RECVFAC^2.16.840.1^ISO"  # raw text, components kept
    assert msh.raw(5) == "SENDAPP^1.2.3&x^ISO"  # subcomponents kept too
    assert msh.raw(6) == "SENDFAC"
    assert msh.raw(7) == STAMP
    assert msh.raw(9) == "ACK^A01^ACK"
    assert msh.raw(10) == "NEW-ID-7"
    assert msh.raw(11) == "T"
    assert msh.raw(12) == "2.5.1"
    assert msh.raw(15) == msh.raw(16) == ""  # an ACK asks for no acknowledgement
    assert msh.raw(18) == "UNICODE UTF-8"
    msa = back.first("MSA")
    assert msa is not None
    assert msa.raw(1) == "AA"
    assert msa.raw(2) == "CTRL-42"
    assert back.first("ERR") is None
    assert [s.name for s in back.segments] == ["MSH", "MSA"]


def test_exact_bytes_of_a_simple_aa() -> None:
    assert _ack(_inbound()) == (f"MSH|^~\\&|RA|RF|SA|SF|{STAMP}||ACK^A01^ACK|ACK-1|P|2.5\rMSA|AA|C1\r".encode())


@pytest.mark.parametrize(
    ("now", "expected"),
    [
        (datetime(2024, 3, 5, 9, 8, 9, tzinfo=timezone(timedelta(hours=2))), STAMP),
        (datetime(2024, 3, 5, 7, 8, 9), STAMP),  # naive: read as UTC
        (datetime(2024, 12, 31, 23, 59, 59, 999999, tzinfo=UTC), "20241231235959+0000"),
    ],
    ids=["aware-plus-two", "naive", "microseconds-dropped"],
)
def test_timestamp_is_utc(now: datetime, expected: str) -> None:
    assert parse(_ack(_inbound(), now=now)).msh.raw(7) == expected


def test_timestamp_defaults_to_now() -> None:
    before = datetime.now(UTC).replace(microsecond=0)
    stamp = parse(build_ack(_inbound(), "AA", control_id="x")).msh.raw(7)
    after = datetime.now(UTC)
    assert stamp.endswith("+0000")
    assert before <= datetime.strptime(stamp[:14], "%Y%m%d%H%M%S").replace(tzinfo=UTC) <= after


@pytest.mark.parametrize(
    ("version", "msh9", "expected"),
    [
        ("2.5", "ADT^A01^ADT_A01", "ACK^A01^ACK"),
        ("2.5", "ORU^R01", "ACK^R01^ACK"),
        ("2.5", "ADT", "ACK"),
        ("2.5", "ADT^^ADT_A01", "ACK"),
        ("2.3.1", "ADT^A04", "ACK^A04^ACK"),
        ("2.3", "ADT^A04", "ACK^A04"),  # MSH-9.3 (message structure) arrived in v2.3.1
        ("2.2", "ORU^R01", "ACK^R01"),
    ],
)
def test_message_type(version: str, msh9: str, expected: str) -> None:
    assert parse(_ack(_inbound(version, msh9))).msh.raw(9) == expected


def test_defaults_when_processing_id_and_version_are_absent() -> None:
    msg = parse("MSH|^~\\&|SA|SF|RA|RF|20240305||ADT^A01|C9\rPID|1")
    msh = parse(_ack(msg)).msh
    assert msh.raw(11) == "P"
    assert msh.raw(12) == "2.5"
    assert msh.raw(18) == ""


def test_version_with_components_is_copied_raw() -> None:
    msh = parse(_ack(_inbound("2.5^USA&&ISO3166"))).msh
    assert msh.raw(12) == "2.5^USA&&ISO3166"


@pytest.mark.parametrize("code", ["AA", "AE", "AR", "CA", "CE", "CR"])
def test_acknowledgement_codes(code: str) -> None:
    back = parse(_ack(_inbound(), code))
    msa = back.first("MSA")
    assert msa is not None
    assert msa.raw(1) == code
    assert (back.first("ERR") is not None) == (code[1] != "A")


@pytest.mark.parametrize("code", ["", "aa", "AX", "NAK"])
def test_unknown_code_is_rejected(code: str) -> None:
    with pytest.raises(ValueError):
        _ack(_inbound(), code)


@pytest.mark.parametrize("version", ["2.5", "2.5.1", "2.6", "2.7", "2.8.2"])
def test_err_layout_from_v25(version: str) -> None:
    ack = _ack(_inbound(version), "AE", error_code="101", text="PID-3 missing")
    err = _segments(ack)[2]
    assert err == "ERR|||101^Required field missing^HL70357|E||||PID-3 missing"


def test_err_layout_from_v25_with_location() -> None:
    ack = _ack(_inbound("2.5"), "AR", error_code="102", text="bad date", error_location=("PID", "1", "7"))
    assert _segments(ack)[2] == "ERR||PID^1^7|102^Data type error^HL70357|E||||bad date"


@pytest.mark.parametrize("version", ["2.1", "2.2", "2.3", "2.3.1", "2.4"])
def test_err_layout_before_v25(version: str) -> None:
    ack = _ack(_inbound(version), "AR", error_code="200", text="no ORM here")
    segs = _segments(ack)
    assert segs[1] == "MSA|AR|C1|no ORM here"
    assert segs[2] == "ERR|^^^200&Unsupported message type&HL70357"


def test_err_layout_before_v25_with_location() -> None:
    ack = _ack(_inbound("2.4"), "AE", error_code="101", error_location=["PID", "1", "3"])
    assert _segments(ack)[2] == "ERR|PID^1^3^101&Required field missing&HL70357"


def test_default_error_code_is_application_internal_error() -> None:
    assert _segments(_ack(_inbound(), "AE"))[2] == "ERR|||207^Application internal error^HL70357|E"
    assert _segments(_ack(_inbound("2.3"), "AR"))[2] == "ERR|^^^207&Application internal error&HL70357"


def test_unknown_error_code_is_sent_without_a_name() -> None:
    assert _segments(_ack(_inbound(), "AE", error_code="999"))[2] == "ERR|||999^^HL70357|E"


def test_error_code_table_0357() -> None:
    assert ERROR_CODES["0"] == "Message accepted"
    assert ERROR_CODES["206"] == "Application record locked"
    assert ERROR_CODES["207"] == "Application internal error"
    assert set(ERROR_CODES) == {"0", "100", "101", "102", "103", *(str(n) for n in range(200, 208))}


def test_msa_text_is_withdrawn_from_v27() -> None:
    segs = _segments(_ack(_inbound("2.7"), "AE", text="try later"))
    assert segs[1] == "MSA|AE|C1"
    assert segs[2].endswith("|try later")
    assert _segments(_ack(_inbound("2.8"), "AA", text="fine"))[1] == "MSA|AA|C1"


def test_text_with_delimiters_is_escaped() -> None:
    text = "bad|field^comp~rep&sub\\esc"
    ack = _ack(_inbound(), "AE", text=text)
    segs = _segments(ack)
    escaped = "bad\\F\\field\\S\\comp\\R\\rep\\T\\sub\\E\\esc"
    assert segs[1] == f"MSA|AE|C1|{escaped}"
    assert segs[2].endswith(f"|E||||{escaped}")
    back = parse(ack)
    assert back.segments[1].get(3) == text
    assert back.segments[2].get(8) == text
    assert len(back.segments) == 3


def test_text_is_short_printable_ascii() -> None:
    text = "Zeile 1\r\nZeile 2 \u00fcber\x00" + "x" * 300
    segs = _segments(_ack(_inbound("2.5"), "AE", text=text))
    msa_text = segs[1].split("|")[3]
    assert msa_text.startswith("Zeile 1  Zeile 2 ?ber?")
    assert len(msa_text) == 80
    assert len(segs[2].split("|")[8]) == 250
    assert all(" " <= c <= "~" for seg in segs for c in seg)


def test_control_id_is_escaped() -> None:
    assert parse(_ack(_inbound(), control_id="a|b")).msh.get(10) == "a|b"


CUSTOM = "MSH$%*\\!$SND%APP$SFAC$RCV$RFAC$20240305$$ADT%A01%ADT_A01$C-7$P$2.5\rPID$1$$123%%%H!X"


def test_custom_encoding_characters_are_preserved() -> None:
    msg = parse(CUSTOM)
    ack = _ack(msg, "AE", text="x$y%z", error_location=("PID", "1", "3"))
    segs = _segments(ack)
    assert segs[0] == f"MSH$%*\\!$RCV$RFAC$SND%APP$SFAC${STAMP}$$ACK%A01%ACK$ACK-1$P$2.5"
    assert segs[1] == "MSA$AE$C-7$x\\F\\y\\S\\z"
    assert segs[2] == "ERR$$PID%1%3$207%Application internal error%HL70357$E$$$$x\\F\\y\\S\\z"
    back = parse(ack)
    assert back.encoding == msg.encoding
    assert back.segments[1].get(3) == "x$y%z"


def test_custom_encoding_before_v25_uses_its_subcomponent_separator() -> None:
    msg = parse(CUSTOM.replace("$2.5", "$2.4"))
    assert _segments(_ack(msg, "AR"))[2] == "ERR$%%%207!Application internal error!HL70357"


def test_doubled_backslash_in_msh2_is_answered_with_a_single_one() -> None:
    msg = parse(b"MSH|^~\\\\&|SA|SF|RA|RF|20240305||ADT^A01|C1|P|2.6\rPID|1")
    assert _ack(msg).startswith(b"MSH|^~\\&|RA|RF|SA|SF|")


def test_truncation_character_is_kept_and_escaped() -> None:
    msg = parse("MSH|^~\\&#|SA|SF|RA|RF|20240305||ADT^A01^ADT_A01|C1|P|2.7\rPID|1")
    segs = _segments(_ack(msg, "AE", text="50# off"))
    assert segs[0].startswith("MSH|^~\\&#|RA|")
    assert segs[2].endswith("|50\\P\\ off")
    assert parse(_ack(msg, "AE", text="50# off")).segments[2].get(8) == "50# off"


def test_no_escape_character_means_delimiters_become_spaces() -> None:
    msg = parse("MSH|^~|SA|SF|RA|RF|20240305||ADT^A01|C1|P|2.5\rPID|1")
    segs = _segments(_ack(msg, "AE", text="a|b^c"))
    assert segs[0].startswith("MSH|^~|RA|RF|SA|SF|")
    assert segs[1] == "MSA|AE|C1|a b c"


@pytest.mark.parametrize(
    ("msh18", "codec"),
    [("8859/1", "latin-1"), ("UNICODE UTF-8", "utf-8"), ("", "utf-8"), ("NO SUCH CHARSET", "utf-8")],
)
def test_charset_follows_msh18(msh18: str, codec: str) -> None:
    inbound = f"MSH|^~\\&|Caf\u00e9|SF|RA|RF|20240305||ADT^A01|C1|P|2.5||||||{msh18}\rPID|1"
    ack = _ack(parse(inbound.encode(codec)))
    assert "|RA|RF|Caf\u00e9|SF|".encode(codec) in ack
    assert parse(ack).msh.raw(5) == "Caf\u00e9"
    assert parse(ack).msh.raw(18) == msh18


def test_generic_ack_without_a_message() -> None:
    ack = _ack(None, "AR", error_code="100", text="no MSH")
    segs = _segments(ack)
    assert segs == [
        f"MSH|^~\\&|||||{STAMP}||ACK|ACK-1|P|2.5",
        "MSA|AR||no MSH",
        "ERR|||100^Segment sequence error^HL70357|E||||no MSH",
    ]
    back = parse(ack)
    assert back.message_type == "ACK"
    assert back.version == "2.5"
    assert back.control_id == "ACK-1"
    assert back.segments[1].get(2) == ""


def test_generic_ack_reads_the_msh_in_raw_header() -> None:
    big = INBOUND.encode() + b"\rOBX|1|ED|" + b"x" * 10_000
    ack = _ack(None, "AR", error_code="207", text="too large", raw_header=big[:4096])
    back = parse(ack)
    assert back.msh.raw(5) == "SENDAPP^1.2.3&x^ISO"
    assert back.msh.raw(12) == "2.5.1"
    assert back.segments[1].raw(2) == "CTRL-42"


@pytest.mark.parametrize(
    "header",
    [
        b"\xef\xbb\xbf" + INBOUND.encode(),
        b"\r\n" + INBOUND.encode(),
        INBOUND.encode().split(b"|ADT^A01")[0] + b"|ADT^A01^ADT_A01|CTRL-42|T|2.",  # cut inside MSH-12
        INBOUND.replace("\r", "\n").encode(),
        INBOUND.encode().split(b"\r")[0] + b"\rthis is not a segment",
    ],
    ids=["bom", "leading-newline", "cut-inside-msh", "lf-separators", "garbage-after-msh"],
)
def test_raw_header_variants(header: bytes) -> None:
    assert parse(_ack(None, "AR", raw_header=header)).segments[1].raw(2) == "CTRL-42"


@pytest.mark.parametrize(
    "header",
    [b"", b"\x00\x01\x02", b"PID|1||123", b"MSH|^&&^|A|B", b"MSH", b"\xff\xfe" * 100],
    ids=["empty", "binary", "no-msh", "bad-encoding-chars", "just-msh", "utf16-bom-junk"],
)
def test_unusable_raw_header_gives_the_generic_ack(header: bytes) -> None:
    segs = _segments(_ack(None, "AR", raw_header=header))
    assert segs[0] == f"MSH|^~\\&|||||{STAMP}||ACK|ACK-1|P|2.5"
    assert segs[1] == "MSA|AR"


def test_message_wins_over_raw_header() -> None:
    ack = _ack(_inbound(), raw_header=INBOUND.encode())
    assert parse(ack).segments[1].raw(2) == "C1"


@pytest.mark.parametrize("version", ["2.3.1", "2.4", "2.5", "2.5.1", "2.6", "2.7", "2.8"])
@pytest.mark.parametrize("code", ["AA", "AE", "AR"])
def test_hl7apy_validates_the_ack_strictly(version: str, code: str) -> None:
    """hl7apy (the reference) accepts the ACK against its v2 tables. It has no ACK structure before v2.3.1."""
    ack = _ack(_inbound(version), code, error_code="101", text="bad | thing", error_location=("PID", "1", "3"))
    message = parse_message(ack.decode(), validation_level=VALIDATION_LEVEL.STRICT)
    assert message.validate()
    assert message.msa.msa_2.to_er7() == "C1"


def test_control_characters_in_echoed_header_fields_are_dropped() -> None:
    # 0x1C/0x0B would end or restart the MLLP frame at the sender; the fields are otherwise copied as they came.
    inbound = parse("MSH|^~\\&|S\x0bA|S\x1cF|R\x01A|RF|20240305070000||ADT^A\x0001|C\x1c1\x7f|P|2.5\rPID|1")
    ack = _ack(inbound)
    assert not any(b < 0x20 and b != 0x0D for b in ack) and b"\x7f" not in ack
    back = parse(ack)
    assert [back.msh.raw(i) for i in (3, 4, 5, 6, 9)] == ["RA", "RF", "SA", "SF", "ACK^A01^ACK"]
    msa = back.first("MSA")
    assert msa is not None and msa.raw(2) == "C1"
