"""HL7 v2 batches (HL7 v2.5 chapter 2.10.3): ``[FHS] {BHS {MSH...} BTS} [FTS]`` split into messages, and the
batch acknowledgement.

A batch travels as one MLLP block. Each message in it is journaled and acknowledged on its own: the answer is
an acknowledgement batch (BHS, one ACK per message, BTS with the count; wrapped in FHS/FTS when the input had
them), whose BHS-12 / FHS-12 (reference control id) name the batch it answers, as the standard describes for
"a batch of acknowledgements". Splitting is pure and keeps each message's bytes exactly as sent (its own
segment separators, escapes and character set), so a message split from a batch journals the same as if it
had been sent alone.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from datetime import UTC, datetime

from .parse import DEFAULT_ENCODING, HL7ParseError

__all__ = ["Batch", "BatchError", "build_batch_ack", "is_batch", "split_batch", "split_messages"]

_SEGMENT_END = re.compile(rb"\r\n|\r|\n")
_BATCH_HEADERS = (b"FHS", b"BHS")


class BatchError(HL7ParseError):
    """The bytes start like a batch but do not follow its structure (a nested BHS, a BHS without messages...).
    The whole block is then journaled as one unparseable message and answered AR."""


@dataclass(slots=True)
class Batch:
    """A split batch: the header segments as sent (for the acknowledgement) and each message's bytes."""

    fhs: bytes = b""
    bhs: bytes = b""
    messages: list[bytes] = field(default_factory=list)
    declared_count: int | None = None  # BTS-1, when valued


def is_batch(data: bytes) -> bool:
    """True when the block starts with FHS or BHS (after a BOM or blank lines)."""
    head = data[:16].lstrip(b"\xef\xbb\xbf \t\r\n")
    return head.startswith(_BATCH_HEADERS)


def _segments(data: bytes) -> list[tuple[bytes, bytes]]:
    """(segment, the separator that followed it) pairs; blank lines dropped."""
    out: list[tuple[bytes, bytes]] = []
    pos = 0
    for m in _SEGMENT_END.finditer(data):
        seg = data[pos : m.start()]
        if seg.strip():
            out.append((seg, m.group()))
        pos = m.end()
    tail = data[pos:]
    if tail.strip():
        out.append((tail, b""))
    return out


def split_batch(data: bytes) -> Batch:
    """Split an FHS/BHS batch into its messages. Raises BatchError for a nested FHS or BHS, a message outside
    a BHS when there is one, or a batch without any message."""
    if data.startswith(b"\xef\xbb\xbf"):
        data = data[3:]
    batch = Batch()
    current: list[bytes] = []
    in_batch = False
    seen_bhs = False
    for seg, sep in _segments(data):
        name = seg[:3]
        if name == b"FHS":
            if batch.fhs or seen_bhs or current:
                raise BatchError("a file header (FHS) inside a file")
            batch.fhs = seg
        elif name == b"BHS":
            if in_batch:
                raise BatchError("a batch header (BHS) inside a batch: nested batches are not allowed")
            if batch.bhs and not batch.fhs:
                raise BatchError("a second batch (BHS) without a file header (FHS)")
            batch.bhs = batch.bhs or seg
            in_batch = seen_bhs = True
        elif name == b"BTS":
            _close(current, batch)
            current = []
            in_batch = False
            count = seg[4:].split(seg[3:4] or b"|")[0].strip() if len(seg) > 4 else b""
            if count.isdigit():
                batch.declared_count = (batch.declared_count or 0) + int(count)
        elif name == b"FTS":
            _close(current, batch)
            current = []
        elif name == b"MSH":
            _close(current, batch)
            if seen_bhs and not in_batch:
                raise BatchError("a message (MSH) after the batch trailer (BTS)")
            current = [seg + (sep or b"\r")]
        else:
            if not current:
                raise BatchError(f"a {name.decode('latin-1', 'replace')!r} segment outside any message")
            current.append(seg + (sep or b"\r"))
    _close(current, batch)
    if not batch.messages:
        raise BatchError("the batch holds no message (no MSH)")
    return batch


def _close(current: list[bytes], batch: Batch) -> None:
    if current:
        batch.messages.append(b"".join(current))


def split_messages(data: bytes) -> list[bytes]:
    """A file's messages: an FHS/BHS batch split by ``split_batch``, otherwise one message per MSH (files of
    several messages without batch headers, as interface engines export them). Raises BatchError like
    ``split_batch``."""
    if is_batch(data):
        return split_batch(data).messages
    if data.startswith(b"\xef\xbb\xbf"):
        data = data[3:]
    out: list[list[bytes]] = []
    for seg, sep in _segments(data):
        if seg.startswith(b"MSH") or not out:
            out.append([])
        out[-1].append(seg + (sep or b"\r"))
    return [b"".join(m) for m in out]


def _fields(seg: bytes) -> list[bytes]:
    fs = seg[3:4] or b"|"
    return [seg[:3], fs, *seg[4:].split(fs)]


def build_batch_ack(batch: Batch, acks: list[bytes], *, control_id: str, now: datetime | None = None) -> bytes:
    """The acknowledgement batch for ``batch``: [FHS] BHS, the ACKs (each as built for its message), BTS with
    their count, [FTS]. Sending and receiving application/facility are swapped from the input's headers, and
    BHS-12 / FHS-12 carry the input's BHS-11 / FHS-11."""
    stamp = (now or datetime.now(UTC)).strftime("%Y%m%d%H%M%S+0000")
    out: list[bytes] = []

    def header(seg: bytes, name: bytes) -> bytes:
        f = _fields(seg) if seg else [name, b"|", DEFAULT_ENCODING.msh2.encode()]
        fs = f[1]
        f += [b""] * (13 - len(f))
        # fields[n] is XXX-n: 3/4 sending app/facility, 5/6 receiving, 7 time, 11 control id, 12 reference id
        values = [name, f[2], f[5], f[6], f[3], f[4], stamp.encode(), b"", b"", b"", control_id.encode(), f[11]]
        return (name + fs + fs.join(values[1:])).rstrip(fs)

    fs = _fields(batch.bhs or batch.fhs)[1] if (batch.bhs or batch.fhs) else b"|"
    if batch.fhs:
        out.append(header(batch.fhs, b"FHS"))
    out.append(header(batch.bhs, b"BHS"))
    body = b"".join(a if a.endswith(b"\r") else a + b"\r" for a in acks)
    trailer = [b"BTS" + fs + str(len(acks)).encode()]
    if batch.fhs:
        trailer.append(b"FTS" + fs + b"1")
    return b"\r".join(out) + b"\r" + body + b"\r".join(trailer) + b"\r"
