"""MLLP framing and deframing as pure functions over bytes.

A frame is ``0x0B`` (start block), the message, then ``0x1C 0x0D`` (end block), as in HL7 v2.5.1
Appendix C (MLLP release 2 without the commit acknowledgement block). Everything between the start block and
the end block is the message; a ``0x1C`` not followed by ``0x0D`` is payload. Nothing here does I/O: the
source adapter feeds whatever it read from the socket and gets back complete messages.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["END", "START", "Deframer", "FrameTooLarge", "frame"]

START = b"\x0b"
END = b"\x1c\x0d"

_FS = 0x1C
_CR = 0x0D
_HEAD_BYTES = 4096


def frame(message: bytes) -> bytes:
    """Wrap one message in MLLP framing: 0x0B + message + 0x1C 0x0D. The message is sent as it is."""
    return START + message + END


@dataclass(frozen=True, slots=True)
class FrameTooLarge:
    """A frame whose message exceeded the deframer's limit; its body was discarded.

    ``head`` is the first (up to 4096) bytes of the message, enough to read its MSH and answer with an AR;
    ``size`` is the number of message bytes seen between the start block and the end block."""

    head: bytes
    size: int

    def __repr__(self) -> str:  # never shows the head: it may be PHI
        return f"FrameTooLarge(size={self.size}, head={len(self.head)} bytes)"


class Deframer:
    """Incremental MLLP deframer.

    ``feed(data)`` returns the events completed by ``data``, in order: ``bytes`` for one complete message
    (without the framing bytes; ``b""`` for an empty frame) or a :class:`FrameTooLarge`. Reads may be split
    anywhere, including between 0x1C and 0x0D, and one read may hold several frames.

    Bytes outside a frame (before a start block) are discarded and counted in :attr:`discarded`. A message
    longer than ``max_frame_bytes`` is not buffered: the deframer keeps its first 4096 bytes, discards the
    rest up to the end block, and then emits one :class:`FrameTooLarge`. A message of exactly
    ``max_frame_bytes`` is delivered.
    """

    __slots__ = ("_buf", "_in_frame", "_oversize", "_size", "_trail_fs", "discarded", "max_frame_bytes")

    def __init__(self, max_frame_bytes: int = 1 << 20) -> None:
        if max_frame_bytes < 0:
            raise ValueError("max_frame_bytes must not be negative")
        self.max_frame_bytes = max_frame_bytes
        self.discarded = 0
        self._buf = bytearray()  # the current frame's message bytes; only its head once it is oversized
        self._in_frame = False
        self._size = 0  # message bytes seen in the current frame (a trailing 0x1C included)
        self._oversize = False
        self._trail_fs = False  # the last byte seen in the frame was 0x1C: maybe the first half of the end block

    @property
    def pending(self) -> int:
        """Message bytes held for the incomplete current frame (0 between frames)."""
        return len(self._buf)

    def feed(self, data: bytes) -> list[bytes | FrameTooLarge]:
        """Consume ``data`` and return the events it completes (see the class docstring)."""
        events: list[bytes | FrameTooLarge] = []
        pos, n = 0, len(data)
        while pos < n:
            if not self._in_frame:
                start = data.find(START, pos)
                if start < 0:
                    self.discarded += n - pos
                    break
                self.discarded += start - pos
                pos = start + 1
                self._in_frame = True
                continue
            if self._trail_fs and data[pos] == _CR:
                # The end block straddled two reads: the 0x1C seen last was its first byte, not payload.
                self._size -= 1
                del self._buf[self._size :]
                events.append(self._finish())
                pos += 1
                continue
            end = data.find(END, pos)
            if end >= 0 and not self._buf and end - pos <= self.max_frame_bytes:
                events.append(data[pos:end])  # the common case: a whole frame in one read, no copy to the buffer
                self._in_frame = False
                pos = end + 2
                continue
            stop = n if end < 0 else end
            size = self._size + stop - pos
            if not self._oversize:
                # A trailing 0x1C may be the end block's first byte: it does not count against the limit yet.
                slack = 1 if end < 0 and data[n - 1] == _FS else 0
                if size > self.max_frame_bytes + slack:
                    self._oversize = True
                    del self._buf[_HEAD_BYTES:]
            room = _HEAD_BYTES - len(self._buf) if self._oversize else stop - pos
            if room > 0:
                self._buf += data[pos : pos + min(room, stop - pos)]
            self._size = size
            if end < 0:
                self._trail_fs = data[n - 1] == _FS
                break
            events.append(self._finish())
            pos = end + 2
        return events

    def _finish(self) -> bytes | FrameTooLarge:
        event: bytes | FrameTooLarge = (
            FrameTooLarge(head=bytes(self._buf), size=self._size) if self._oversize else bytes(self._buf)
        )
        self._buf.clear()
        self._in_frame = self._oversize = self._trail_fs = False
        self._size = 0
        return event
