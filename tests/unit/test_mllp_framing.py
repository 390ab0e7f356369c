"""MLLP framing and deframing: table cases on split reads, garbage, several frames per read and the size
limit, then properties over random payloads and random split points."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from adapters.mllp.framing import END, START, Deframer, FrameTooLarge, frame

MSG_A = b"MSH|^~\\&|SND|FAC|RCV|FAC|20240101120000||ADT^A01^ADT_A01|A1|P|2.5\rPID|1||123^^^H^MR"
MSG_B = b"MSH|^~\\&|SND|FAC|RCV|FAC|20240101120001||ADT^A08^ADT_A01|B2|P|2.5\rPID|1||456^^^H^MR"
BIG = b"MSH|^~\\&|SND|FAC|RCV|FAC|20240101120000||ORU^R01^ORU_R01|BIG|P|2.5\r" + b"OBX|1|ED|" + b"x" * 10_000


def test_frame_wraps_in_start_and_end_blocks() -> None:
    assert START == b"\x0b"
    assert END == b"\x1c\x0d"
    assert frame(b"abc") == b"\x0babc\x1c\x0d"
    assert frame(b"") == b"\x0b\x1c\x0d"


@dataclass(frozen=True)
class Case:
    id: str
    reads: list[bytes]
    expected: list[bytes | FrameTooLarge]
    discarded: int = 0
    max_frame_bytes: int = 1 << 20
    pending: int = 0


CASES = [
    Case("one-frame", [frame(MSG_A)], [MSG_A]),
    Case("several-frames-one-read", [frame(MSG_A) + frame(MSG_B) + frame(MSG_A)], [MSG_A, MSG_B, MSG_A]),
    Case("frame-split-in-three-reads", [frame(MSG_A)[:5], frame(MSG_A)[5:40], frame(MSG_A)[40:]], [MSG_A]),
    Case("garbage-before-start-block", [b"GET / HTTP/1.0\r\n" + frame(MSG_A)], [MSG_A], discarded=16),
    Case("garbage-in-its-own-read", [b"\r\n\r\n", frame(MSG_A)], [MSG_A], discarded=4),
    Case("garbage-between-frames", [frame(MSG_A) + b"\n\n" + frame(MSG_B)], [MSG_A, MSG_B], discarded=2),
    Case("only-garbage", [b"abc", b"def\x1c\x0d"], [], discarded=8),
    Case("fs-without-cr-is-payload", [frame(b"a\x1cb\x1c")], [b"a\x1cb\x1c"]),
    Case("cr-without-fs-is-payload", [frame(b"MSH|1\rPID|2\r")], [b"MSH|1\rPID|2\r"]),
    Case("start-byte-inside-frame-is-payload", [b"\x0ba\x0bb\x1c\x0d"], [b"a\x0bb"]),
    Case("split-between-fs-and-cr", [b"\x0b" + MSG_A + b"\x1c", b"\x0d"], [MSG_A]),
    Case("split-after-fs-that-is-payload", [b"\x0bab\x1c", b"c\x1c\x0d"], [b"ab\x1cc"]),
    Case("split-fs-fs-cr", [b"\x0bab\x1c", b"\x1c\x0d"], [b"ab\x1c"]),
    Case("split-before-start-block", [b"zz", b"\x0bab\x1c\x0d"], [b"ab"], discarded=2),
    Case("empty-frame", [b"\x0b\x1c\x0d"], [b""]),
    Case("empty-frame-split", [b"\x0b", b"\x1c", b"\x0d"], [b""]),
    Case("incomplete-frame-is-pending", [b"\x0b" + MSG_A[:30]], [], pending=30),
    Case("incomplete-then-garbage-stays-pending", [b"\x0babc", b"def"], [], pending=6),
    Case("at-limit-passes", [frame(b"x" * 16)], [b"x" * 16], max_frame_bytes=16),
    Case(
        "at-limit-split-between-fs-and-cr",
        [b"\x0b" + b"x" * 16 + b"\x1c", b"\x0d"],
        [b"x" * 16],
        max_frame_bytes=16,
    ),
    Case(
        "limit-plus-one-then-next-frame-decoded",
        [frame(b"y" * 17) + frame(b"ok")],
        [FrameTooLarge(head=b"y" * 17, size=17), b"ok"],
        max_frame_bytes=16,
    ),
    Case(
        "limit-plus-one-across-reads",
        [b"\x0b" + b"y" * 10, b"y" * 7, b"\x1c\x0d" + frame(b"ok")],
        [FrameTooLarge(head=b"y" * 17, size=17), b"ok"],
        max_frame_bytes=16,
    ),
    Case(
        "limit-fs-at-boundary-was-payload",
        [b"\x0b" + b"x" * 16 + b"\x1c", b"z\x1c", b"\x0d"],
        [FrameTooLarge(head=b"x" * 16 + b"\x1cz", size=18)],
        max_frame_bytes=16,
    ),
    Case(
        "too-large-keeps-4096-byte-head",
        [frame(BIG) + frame(MSG_B)],
        [FrameTooLarge(head=BIG[:4096], size=len(BIG)), MSG_B],
        max_frame_bytes=8192,
    ),
    Case(
        "too-large-in-small-reads",
        [frame(BIG)[i : i + 1000] for i in range(0, len(BIG) + 3, 1000)],
        [FrameTooLarge(head=BIG[:4096], size=len(BIG))],
        max_frame_bytes=8192,
    ),
    Case(
        "zero-limit-allows-only-empty",
        [frame(b"") + frame(b"a")],
        [b"", FrameTooLarge(b"a", 1)],
        max_frame_bytes=0,
    ),
]


def _feed_all(deframer: Deframer, reads: list[bytes]) -> list[bytes | FrameTooLarge]:
    events: list[bytes | FrameTooLarge] = []
    for read in reads:
        events.extend(deframer.feed(read))
    return events


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_deframer_table(case: Case) -> None:
    deframer = Deframer(max_frame_bytes=case.max_frame_bytes)
    assert _feed_all(deframer, case.reads) == case.expected
    assert deframer.discarded == case.discarded
    assert deframer.pending == case.pending


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_deframer_table_one_byte_at_a_time(case: Case) -> None:
    """Every case gives the same events when the bytes arrive one per read."""
    data = b"".join(case.reads)
    deframer = Deframer(max_frame_bytes=case.max_frame_bytes)
    assert _feed_all(deframer, [data[i : i + 1] for i in range(len(data))]) == case.expected
    assert deframer.discarded == case.discarded
    assert deframer.pending == case.pending


def test_two_frames_split_at_every_byte_boundary() -> None:
    data = frame(MSG_A) + frame(MSG_B)
    for i in range(len(data) + 1):
        deframer = Deframer()
        assert _feed_all(deframer, [data[:i], data[i:]]) == [MSG_A, MSG_B], f"split at {i}"
        assert deframer.pending == 0
        assert deframer.discarded == 0


def test_short_frames_split_at_every_pair_of_boundaries() -> None:
    """Three reads, every pair of cut points, over frames dense in framing bytes (empty, payload 0x1C)."""
    data = b"g" + frame(b"a\x1cb") + frame(b"") + frame(b"\x1c") + frame(b"c")
    expected: list[bytes | FrameTooLarge] = [b"a\x1cb", b"", b"\x1c", b"c"]
    for i in range(len(data) + 1):
        for j in range(i, len(data) + 1):
            deframer = Deframer()
            assert _feed_all(deframer, [data[:i], data[i:j], data[j:]]) == expected, f"cuts at {i}, {j}"
            assert deframer.discarded == 1


def test_oversized_frame_is_not_buffered() -> None:
    deframer = Deframer(max_frame_bytes=8192)
    deframer.feed(b"\x0b")
    for _ in range(100):
        assert deframer.feed(b"z" * 10_000) == []
        assert deframer.pending <= 4096
    events = deframer.feed(b"\x1c\x0d")
    assert events == [FrameTooLarge(head=b"z" * 4096, size=1_000_000)]
    assert deframer.pending == 0


def test_frame_too_large_repr_hides_the_head() -> None:
    assert "MSH" not in repr(FrameTooLarge(head=b"MSH|secret", size=10))


def test_negative_limit_is_rejected() -> None:
    with pytest.raises(ValueError):
        Deframer(max_frame_bytes=-1)


# Payloads with no framing bytes at all (the usual HL7 text), and ones holding anything but an end block.
_plain_payloads = st.lists(st.binary(max_size=300).map(lambda b: b.replace(b"\x0b", b"").replace(b"\x1c", b"")))
_any_payloads = st.lists(st.binary(max_size=300).filter(lambda b: END not in b))


def _split(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({min(c, len(data)) for c in cuts})
    return [data[a:b] for a, b in zip([0, *points], [*points, len(data)], strict=True)]


@settings(max_examples=300, deadline=None)
@given(payloads=_plain_payloads, cuts=st.lists(st.integers(min_value=0, max_value=4000), max_size=12))
def test_property_random_payloads_and_splits(payloads: list[bytes], cuts: list[int]) -> None:
    data = b"".join(frame(p) for p in payloads)
    deframer = Deframer()
    assert _feed_all(deframer, _split(data, cuts)) == payloads
    assert deframer.pending == 0
    assert deframer.discarded == 0


@settings(max_examples=300, deadline=None)
@given(payloads=_any_payloads, cuts=st.lists(st.integers(min_value=0, max_value=4000), max_size=12))
def test_property_payloads_with_framing_bytes_inside(payloads: list[bytes], cuts: list[int]) -> None:
    """0x0B, 0x1C and 0x0D inside a payload are data, as long as the payload holds no end block."""
    data = b"".join(frame(p) for p in payloads)
    assert _feed_all(Deframer(), _split(data, cuts)) == payloads


@settings(max_examples=300, deadline=None)
@given(
    payloads=_plain_payloads,
    limit=st.integers(min_value=0, max_value=200),
    cuts=st.lists(st.integers(min_value=0, max_value=4000), max_size=12),
)
def test_property_limit(payloads: list[bytes], limit: int, cuts: list[int]) -> None:
    data = b"".join(frame(p) for p in payloads)
    expected = [p if len(p) <= limit else FrameTooLarge(head=p[:4096], size=len(p)) for p in payloads]
    assert _feed_all(Deframer(max_frame_bytes=limit), _split(data, cuts)) == expected
