"""The audit trail's hash chain: intact chains verify; any change, removal or reordering is found."""

from __future__ import annotations

import multiprocessing
from pathlib import Path

import orjson
import pytest

from gateway.audit import AuditLog, verify


def write(path: Path, n: int) -> AuditLog:
    log = AuditLog(path)
    for i in range(n):
        log.append("connection.open", "gateway:test", peer=f"10.0.0.{i}:5000", source="mllp")
    return log


def test_an_intact_chain_verifies(tmp_path: Path) -> None:
    path = tmp_path / "audit.log"
    write(path, 5)
    verdict = verify(path)
    assert verdict.ok and verdict.records == 5
    first = orjson.loads(path.read_bytes().splitlines()[0])
    assert first["seq"] == 1 and first["prev"] == "0" * 64 and first["action"] == "connection.open"


@pytest.mark.parametrize("offset", [10, 60, 120, -3])
def test_a_one_byte_change_anywhere_in_a_record_is_detected(tmp_path: Path, offset: int) -> None:
    path = tmp_path / "audit.log"
    write(path, 5)
    lines = path.read_bytes().splitlines(keepends=True)
    line = bytearray(lines[2])
    pos = offset % (len(line) - 1)
    line[pos] = ord("x") if line[pos] != ord("x") else ord("y")
    lines[2] = bytes(line)
    path.write_bytes(b"".join(lines))
    verdict = verify(path)
    assert not verdict.ok and verdict.line == 3 and verdict.records == 2


def test_a_removed_or_reordered_record_is_detected(tmp_path: Path) -> None:
    path = tmp_path / "audit.log"
    write(path, 5)
    lines = path.read_bytes().splitlines(keepends=True)
    path.write_bytes(b"".join(lines[:2] + lines[3:]))
    assert not verify(path).ok
    path.write_bytes(b"".join([lines[1], lines[0], *lines[2:]]))
    assert verify(path).line == 1


def _append_many(path: str) -> None:
    write(Path(path), 50)


def test_several_processes_append_to_one_chain(tmp_path: Path) -> None:
    path = tmp_path / "audit.log"
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_append_many, args=(str(path),)) for _ in range(3)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    assert verify(path).ok and verify(path).records == 150
