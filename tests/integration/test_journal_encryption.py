"""The journal with encryption at rest, on SQLite and MariaDB: no patient name reaches the database files, claims
return plaintext, and a key rotation running beside live commits re-seals every row so that the new key opens
old rows and the old key alone no longer does."""

from __future__ import annotations

import asyncio
import os
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy import select

from gateway.commands.keys import key_usage, rotate
from gateway.contracts import Envelope, InputKind
from gateway.crypto import Keyring, UndecryptableError, sealed_key_id
from gateway.ids import uuid7
from gateway.journal import Journal, JournalRecord
from gateway.journal.schema import messages

NAME = b"Zebediah^Quixotefield"


def rec(i: int) -> JournalRecord:
    payload = f"MSH|^~\\&|A|B|C|D|20240101||ADT^A01|C{i}|P|2.5\rPID|1||MRN-{i}||".encode() + NAME + b"||19800101|F\r"
    env = Envelope(uuid7(), "enc", InputKind.HL7V2, datetime.now(UTC), payload, "127.0.0.1:1")
    bundle = (
        b'{"resourceType":"Bundle","entry":[{"resource":{"resourceType":"Patient",'
        b'"name":[{"family":"Quixotefield"}]}}]}'
    )
    return JournalRecord(env, "accepted", "ADT^A01", f"C{i}", fhir=bundle, dedup_key=f"k{i}", destinations=["d"])


def journal_files(directory: Path) -> bytes:
    """journal.db with its -wal and -shm files."""
    return b"".join(p.read_bytes() for p in directory.iterdir() if p.name.startswith("journal.db"))


async def test_no_plaintext_patient_data_on_disk_and_claims_are_plaintext(tmp_path: Path) -> None:
    db_file = tmp_path / "journal.db"
    ring = Keyring(os.urandom(32))
    j = Journal(f"sqlite:///{db_file}", keyring=ring)
    await j.open()
    try:
        await asyncio.gather(*(j.commit(rec(i)) for i in range(50)))
        items = await j.claim("d", 100, timedelta(seconds=60))
        assert len(items) == 50
        assert all(NAME in it.raw for it in items)
        assert all(it.resources[0]["name"][0]["family"] == "Quixotefield" for it in items)
        on_disk = journal_files(tmp_path)
        assert b"C49" in on_disk  # the files do hold the rows (control ids are not encrypted)
        assert b"Quixotefield" not in on_disk and b"Zebediah" not in on_disk
    finally:
        await j.close()
    on_disk = journal_files(tmp_path)
    assert b"Quixotefield" not in on_disk and b"Zebediah" not in on_disk
    # Without the key the rows are refused, not handed out as if they were messages.
    j = Journal(f"sqlite:///{db_file}")
    await j.open()
    try:
        assert j.db is not None
        await j.db.transaction(lambda c: c.exec_driver_sql("UPDATE outbox SET lease_until = NULL"))
        with pytest.raises(UndecryptableError, match="encryption is off"):
            await j.claim("d", 10, timedelta(seconds=60))
    finally:
        await j.close()


async def test_rotation_beside_live_commits(db_url: str) -> None:
    old_key, new_key = os.urandom(32), os.urandom(32)
    old = Keyring(old_key)
    j = Journal(db_url, keyring=old)
    await j.open()
    try:
        await asyncio.gather(*(j.commit(rec(i)) for i in range(300)))
    finally:
        await j.close()
    # Before a rotation, clear rows from a time before encryption was on are there too.
    plain = Journal(db_url)
    await plain.open()
    await asyncio.gather(*(plain.commit(rec(i)) for i in range(300, 320)))
    await plain.close()

    both = Keyring(new_key, [old_key])
    j = Journal(db_url, keyring=both)  # the daemon restarted with the new key current and the old one kept
    await j.open()
    try:
        assert j.db is not None
        usage = await key_usage(j.db)
        assert usage == {old.current_key_id: 300, "clear": 20}

        async def live() -> None:
            for i in range(320, 420):
                await j.commit(rec(i))

        report, _ = await asyncio.gather(rotate(j.db, both, batch=37), live())
        assert report.scanned >= 320 and report.resealed >= 320
        # A second pass finds nothing left (new commits were sealed with the new key already).
        again = await rotate(j.db, both)
        assert again.resealed == 0 and again.scanned == 420
        assert await key_usage(j.db) == {both.current_key_id: 420}
        rows = await j.db.read(lambda c: c.execute(select(messages.c.raw, messages.c.fhir)).all())
        assert all(
            sealed_key_id(r.raw) == both.current_key_id and sealed_key_id(r.fhir) == both.current_key_id for r in rows
        )
        items = await j.claim("d", 1000, timedelta(seconds=60))
        assert len(items) == 420 and all(NAME in it.raw for it in items)
    finally:
        await j.close()
    # The old key alone no longer opens anything: it can be retired.
    j = Journal(db_url, keyring=old)
    await j.open()
    try:
        assert j.db is not None
        await j.db.transaction(lambda c: c.exec_driver_sql("UPDATE outbox SET lease_until = NULL"))
        with pytest.raises(UndecryptableError, match="not configured"):
            await j.claim("d", 10, timedelta(seconds=60))
    finally:
        await j.close()
