"""Property tests of the input path a network attacker reaches first: the MLLP deframer (against a reference
model written here), the HL7 v2 tokenizer (a round trip through escaping with any delimiters), and the header
reader and ACK builder that answer whatever arrives."""

from __future__ import annotations

from dataclasses import dataclass

from hypothesis import example, given, settings
from hypothesis import strategies as st

from adapters.mllp.framing import Deframer, FrameTooLarge
from adapters.mllp.source import framing_safe, parse_header
from gateway.hl7v2.ack import build_ack
from gateway.hl7v2.parse import HL7ParseError, parse

# -- the deframer against a model --------------------------------------------------------------------------------


@dataclass
class Model:
    events: list[bytes | FrameTooLarge]
    discarded: int
    pending: int


def reference_deframe(stream: bytes, limit: int) -> Model:
    """MLLP as the standard states it, over the whole stream at once: bytes before 0x0B are discarded; a frame
    runs to the first 0x1C 0x0D; a message over ``limit`` becomes FrameTooLarge with its first 4096 bytes."""
    events: list[bytes | FrameTooLarge] = []
    discarded = pos = 0
    while pos < len(stream):
        start = stream.find(b"\x0b", pos)
        if start < 0:
            discarded += len(stream) - pos
            return Model(events, discarded, 0)
        discarded += start - pos
        end = stream.find(b"\x1c\r", start + 1)
        if end < 0:
            body = stream[start + 1 :]
            # The deframer holds an unfinished frame (only its head once it is over the limit; a trailing 0x1C
            # may be half an end block and is not counted against the limit yet).
            over = len(body) - (1 if body.endswith(b"\x1c") else 0) > limit
            return Model(events, discarded, min(len(body), 4096) if over else len(body))
        body = stream[start + 1 : end]
        events.append(body if len(body) <= limit else FrameTooLarge(head=body[:4096], size=len(body)))
        pos = end + 2
    return Model(events, discarded, 0)


# Streams rich in framing bytes: garbage, stray 0x0B/0x1C/0x0D, end blocks in odd places.
_pieces = st.sampled_from([b"\x0b", b"\x1c", b"\r", b"\x1c\r", b"MSH|^~\\&|", b"PID|1", b"\n", b"\x00"])
_streams = st.lists(st.one_of(_pieces, st.binary(max_size=40)), max_size=40).map(b"".join)


@settings(max_examples=1000, deadline=None)
@given(stream=_streams, limit=st.integers(min_value=0, max_value=64), cuts=st.lists(st.integers(0, 2000), max_size=20))
def test_the_deframer_agrees_with_the_reference_model_however_the_stream_is_split(
    stream: bytes, limit: int, cuts: list[int]
) -> None:
    points = sorted({min(c, len(stream)) for c in cuts})
    deframer = Deframer(max_frame_bytes=limit)
    events: list[bytes | FrameTooLarge] = []
    for a, b in zip([0, *points], [*points, len(stream)], strict=True):
        events += deframer.feed(stream[a:b])
    model = reference_deframe(stream, limit)
    assert events == model.events
    assert deframer.discarded == model.discarded
    assert deframer.pending == model.pending


@settings(max_examples=200, deadline=None)
@given(size=st.integers(min_value=5000, max_value=200_000), chunk=st.integers(min_value=1, max_value=70_000))
def test_an_endless_frame_is_held_in_bounded_memory(size: int, chunk: int) -> None:
    """A sender that never ends its frame costs at most the head the deframer keeps (4096 bytes)."""
    deframer = Deframer(max_frame_bytes=1024)
    data = b"\x0b" + b"A" * size
    for i in range(0, len(data), chunk):
        assert deframer.feed(data[i : i + chunk]) == []
        assert deframer.pending <= 4096


# -- the tokenizer: any content survives escaping, with any legal delimiters -------------------------------------

_DELIMS = "|^~\\&!#$%*+/:;<=>?@_`{}'"
_text = st.text(alphabet=st.characters(blacklist_categories=["Cs", "Cc"], blacklist_characters="\r"), max_size=12)
_leaf = st.one_of(_text, st.sampled_from(["|", "^", "~", "\\", "&", "!", "\n", "a^b", "x\\y", '"', "\\F\\"]))
_leaves = st.lists(_leaf, min_size=1, max_size=3).filter(lambda xs: '""' not in xs)


@st.composite
def delimiters(draw: st.DrawFn) -> tuple[str, str, str, str, str]:
    chars = draw(st.permutations(list(_DELIMS)))
    return chars[0], chars[1], chars[2], chars[3], chars[4]  # field, component, repetition, escape, subcomponent


def escape(value: str, fs: str, cs: str, rs: str, es: str, ss: str) -> str:
    """HL7 escaping, written independently of the parser."""
    table = {es: f"{es}E{es}", fs: f"{es}F{es}", cs: f"{es}S{es}", rs: f"{es}R{es}", ss: f"{es}T{es}"}
    out = "".join(table.get(ch, ch) for ch in value)
    return out.replace("\n", f"{es}.br{es}")


@settings(max_examples=400, deadline=None)
@given(
    delims=delimiters(),
    segments=st.lists(
        st.tuples(
            st.sampled_from(["PID", "OBX", "NTE", "ZX1", "PV1"]),
            st.lists(st.lists(st.lists(_leaves, min_size=1, max_size=3), min_size=1, max_size=3), max_size=6),
        ),
        min_size=1,
        max_size=5,
    ),
)
def test_every_value_survives_escaping_and_tokenizing(
    delims: tuple[str, str, str, str, str], segments: list[tuple[str, list[list[list[list[str]]]]]]
) -> None:
    fs, cs, rs, es, ss = delims
    lines = [f"MSH{fs}{cs}{rs}{es}{ss}{fs}APP{fs}FAC{fs}{fs}{fs}20240101{fs}{fs}ADT{cs}A01{fs}ID1{fs}P{fs}2.5"]
    for name, fields in segments:
        encoded = [
            rs.join(cs.join(ss.join(escape(v, *delims) for v in comp) for comp in rep) for rep in field)
            for field in fields
        ]
        lines.append(fs.join([name, *encoded]))
    msg = parse("\r".join(lines))
    assert msg.control_id == "ID1" and msg.message_type == "ADT" and msg.trigger_event == "A01"
    assert [s.name for s in msg.segments[1:]] == [name for name, _ in segments]
    for seg, (_, fields) in zip(msg.segments[1:], segments, strict=True):
        for n, field in enumerate(fields, 1):
            for r, rep in enumerate(field, 1):
                for c, comp in enumerate(rep, 1):
                    for s, value in enumerate(comp, 1):
                        assert seg.get(n, c, s, r) == value, (n, r, c, s)


# -- whatever arrives is answered -------------------------------------------------------------------------------

_junk_headers = st.one_of(
    st.binary(max_size=200),
    st.binary(max_size=200).map(lambda b: b"MSH|^~\\&|" + b),
    st.text(max_size=120).map(lambda t: ("MSH|^~\\&|" + t).encode("utf-8", "surrogatepass")),
    st.lists(st.sampled_from(["|", "^", "~", "\\", "&", "MSH", "2.5", "2.7", "ACK", "\r", "A", ""]), max_size=40)
    .map("".join)
    .map(lambda t: ("MSH" + t).encode()),
)


@settings(max_examples=1000, deadline=None)
@given(data=_junk_headers, code=st.sampled_from(["AA", "AE", "AR", "CA", "CE", "CR"]))
# Found by the atheris harness: 0x1C declared as the component separator must survive in the ACK's MSH-2.
@example(data=b"MSH|\x1c&|\x07\x00\x00END FAC|REC APAP\x01\x00AL\r", code="AA")
@example(data=b"MSH|^~\\&|A\x1c|B|C|D|20240101||ADT^A01|X1\x1c|P|2.5\x1c\nPID|1", code="AR")
def test_any_input_gets_a_well_formed_ack(data: bytes, code: str) -> None:
    header = parse_header(data)
    ack = framing_safe(
        build_ack(header, code, text="reason", error_code="207", control_id="ACK1", raw_header=data[:4096])
    )
    assert b"\x1c\r" not in ack  # the sender's deframer reads the whole ACK as one frame
    try:
        parsed = parse(ack)
    except HL7ParseError as exc:  # pragma: no cover - the assertion below names the input
        raise AssertionError(f"the ACK for {data[:60]!r} does not parse: {exc}") from exc
    msa = parsed.first("MSA")
    assert msa is not None and msa.get(1) == code
    if code not in ("AA", "CA"):
        assert parsed.first("ERR") is not None
