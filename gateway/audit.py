"""The audit trail: who did what and when, append-only, hash-chained so that tampering is detectable.

One JSON object per line. Each record carries the SHA-256 of the record before it (``prev``) and its own hash
over its canonical JSON and ``prev``; changing, removing or reordering a line breaks the chain from there on,
which ``gateway audit verify FILE`` reports. Several processes (the daemon, an operator's CLI) append safely:
each append takes an exclusive lock on the file, reads the last hash and writes with fsync.

Records name peers, operators and actions, never message content.
"""

from __future__ import annotations

import fcntl
import getpass
import hashlib
import os
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson

GENESIS = "0" * 64


def _digest(prev: str, body: dict[str, Any]) -> str:
    return hashlib.sha256(prev.encode() + orjson.dumps(body, option=orjson.OPT_SORT_KEYS)).hexdigest()


def operator() -> str:
    """Who runs this process: the login user, for CLI actions."""
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return f"uid:{os.getuid()}"


class AuditLog:
    def __init__(self, path: Path) -> None:
        self.path = path

    def append(self, action: str, actor: str, **fields: str | int) -> str:
        """Append one record and return its hash. Raises OSError when the file cannot be written."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o640)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            prev, seq = _last(fd)
            body = {
                "seq": seq + 1,
                "ts": datetime.now(UTC).isoformat(timespec="microseconds"),
                "action": action,
                "actor": actor,
                "fields": fields,
                "prev": prev,
            }
            digest = _digest(prev, body)
            os.write(fd, orjson.dumps({**body, "hash": digest}) + b"\n")
            os.fsync(fd)
            return digest
        finally:
            os.close(fd)  # releases the lock


def _last(fd: int) -> tuple[str, int]:
    """(hash, seq) of the last record, or the genesis values for an empty file."""
    size = os.fstat(fd).st_size
    if size == 0:
        return GENESIS, 0
    chunk = min(size, 64 * 1024)
    data = os.pread(fd, chunk, size - chunk).rstrip(b"\n")
    line = data.rsplit(b"\n", 1)[-1]
    record = orjson.loads(line)
    return str(record["hash"]), int(record["seq"])


@dataclass(frozen=True, slots=True)
class Verdict:
    ok: bool
    records: int
    line: int = 0  # the first bad line (1-based) when not ok
    reason: str = ""


def verify(path: Path) -> Verdict:
    """Check the whole chain: every line parses, sequence numbers count up from 1, each ``prev`` is the hash
    of the line before, and each hash matches its record."""
    prev, n = GENESIS, 0
    for n, line in _lines(path):
        try:
            record = orjson.loads(line)
            claimed = record.pop("hash")
        except (orjson.JSONDecodeError, KeyError, TypeError, AttributeError):
            return Verdict(False, n - 1, n, "not an audit record")
        if record.get("seq") != n:
            return Verdict(False, n - 1, n, f"sequence number {record.get('seq')!r}, expected {n}")
        if record.get("prev") != prev:
            return Verdict(False, n - 1, n, "does not follow the record before it (a record was removed or moved)")
        if _digest(prev, record) != claimed:
            return Verdict(False, n - 1, n, "its content does not match its hash (the record was changed)")
        prev = claimed
    return Verdict(True, n)


def _lines(path: Path) -> Iterator[tuple[int, bytes]]:
    with path.open("rb") as f:
        for n, line in enumerate(f, 1):
            yield n, line.rstrip(b"\n")
