"""Identifiers: time-ordered message ids and deterministic FHIR resource ids."""

from __future__ import annotations

import hashlib
import os
import threading
import time

_lock = threading.Lock()
_last_ms = 0
_counter = 0


def uuid7() -> str:
    """A UUIDv7 (RFC 9562) string: 48-bit Unix milliseconds, then a 12-bit counter that keeps ids minted in the
    same millisecond in order, then 62 random bits. Monotonic within this process."""
    global _last_ms, _counter
    entropy = int.from_bytes(os.urandom(10))  # one system call for both random parts
    with _lock:
        ms = time.time_ns() // 1_000_000
        if ms > _last_ms:
            _last_ms, _counter = ms, (entropy >> 64) & 0x3FF  # leave room to count up
        else:
            _counter += 1
            if _counter > 0xFFF:  # counter exhausted: borrow the next millisecond
                _last_ms, _counter = _last_ms + 1, 0
            ms = _last_ms
        rand = entropy & ((1 << 62) - 1)
        value = (ms << 80) | (0x7 << 76) | (_counter << 64) | (0b10 << 62) | rand
    h = f"{value:032x}"
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


def resource_id(resource_type: str, *parts: str) -> str:
    """A deterministic FHIR id from business identifiers: the same identifiers always give the same id, so a
    resent or updated message updates the resource instead of creating a twin. 32 hex characters (128 bits) of
    SHA-256 over the type and the parts, separated by a byte that cannot occur in HL7 text."""
    h = hashlib.sha256(resource_type.encode())
    for p in parts:
        h.update(b"\x1f")
        h.update(p.encode())
    return h.hexdigest()[:32]
