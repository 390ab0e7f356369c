"""SQLite memory that must stay bounded under steady load: the journal's WAL (and the wal-index every connection
maps) and the store's prepared statements.

A SQLite database with background checkpoints keeps its WAL bounded while readers and writers overlap.

PASSIVE checkpoints alone never reset the log under steady load: a checkpoint cannot copy past a reader's
snapshot, and the next write then begins with frames still uncopied, so SQLite appends instead of starting over.
"""

from __future__ import annotations

import asyncio
import os
import sqlite3
import threading
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, event, text
from sqlalchemy.engine import make_url

from adapters.sqlstore.config import SqlStoreConfig
from gateway.contracts import InputKind, OutboxItem
from gateway.db import SqliteDatabase
from gateway.ids import uuid7

LIMIT = 256 * 1024
BLOB = 64 * 1024


async def test_the_wal_is_reset_once_it_outgrows_the_limit_although_reads_overlap_every_checkpoint(
    tmp_path: Path,
) -> None:
    path = tmp_path / "j.db"
    db = SqliteDatabase(
        make_url(f"sqlite:///{path}"), synchronous="NORMAL", background_checkpoints=True, wal_limit_bytes=LIMIT
    )
    wal = Path(f"{path}-wal")
    sizes: list[int] = []
    try:
        await db.transaction(lambda c: c.execute(text("CREATE TABLE t (b BLOB)")))
        for _ in range(20):
            await db.transaction(lambda c: c.execute(text("INSERT INTO t VALUES (randomblob(:n))"), {"n": BLOB}))
            # A reader (the delivery loop, the health check) holds a snapshot while a commit lands and the
            # checkpoint runs, then finishes a moment later (10 ms, within the reset's wait for readers), as under load.
            reader = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
            reader.execute("BEGIN")
            reader.execute("SELECT count(*) FROM t").fetchall()
            await db.transaction(lambda c: c.execute(text("INSERT INTO t VALUES (randomblob(:n))"), {"n": BLOB}))
            done = threading.Timer(0.01, lambda r=reader: (r.rollback(), r.close()))
            done.start()
            await db.checkpoint()
            done.join()
            sizes.append(await asyncio.to_thread(os.path.getsize, wal))
    finally:
        await db.dispose()
    # 20 rounds write about 2.6 MB of log; reset at 256 KiB, the file never holds much more than that.
    assert max(sizes) < 2 * LIMIT + 4 * BLOB, sizes


async def test_the_store_prepares_a_few_statements_for_its_key_lookup_whatever_the_batch_sizes(
    tmp_path: Path,
) -> None:
    """The IN list's length is part of the SQL text, and the driver keeps up to 128 statements prepared per
    connection: one lookup statement per batch size held up to 20 MB of SQLite heap in the delivery process."""
    sink = SqlStoreConfig(type="sql_store", url=f"sqlite:///{tmp_path / 'store.db'}").build("store")
    lookups: set[str] = set()

    def seen(_conn: Any, _cursor: Any, statement: str, *_: Any) -> None:
        if statement.lstrip().upper().startswith("SELECT") and " IN " in statement:
            lookups.add(statement)

    await sink.start()
    event.listen(Engine, "before_cursor_execute", seen)
    try:
        for size in range(1, 70):
            patients = [{"resourceType": "Patient", "id": f"p{size}-{k}"} for k in range(size)]
            item = OutboxItem(size, uuid7(), "store", 0, InputKind.HL7V2, "test", b"", patients)
            assert await sink.deliver_many([item]) == [None]
    finally:
        event.remove(Engine, "before_cursor_execute", seen)
        await sink.close()
    assert 1 <= len(lookups) <= 5, len(lookups)  # 8, 16, 32, 64, 128


def test_in_lists_are_padded_to_a_few_lengths_with_the_same_members() -> None:
    from gateway.journal.fastpath import padded

    assert padded([]) == []
    lengths = set()
    for n in range(1, 600):
        values = list(range(n))
        out = padded(values)
        assert out[:n] == values and set(out) == set(values)
        lengths.add(len(out))
    assert lengths == {8, 16, 32, 64, 128, 256, 512, 1024}


async def test_a_wal_grown_large_is_cut_back_to_the_limit_when_it_starts_over(tmp_path: Path) -> None:
    path = tmp_path / "j.db"
    db = SqliteDatabase(
        make_url(f"sqlite:///{path}"), synchronous="NORMAL", background_checkpoints=True, wal_limit_bytes=LIMIT
    )
    wal = Path(f"{path}-wal")
    try:
        await db.transaction(lambda c: c.execute(text("CREATE TABLE t (b BLOB)")))
        # A reader that never lets go keeps every checkpoint from resetting the log: it grows well past the limit,
        # as under an older version.
        reader = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        reader.execute("BEGIN")
        reader.execute("SELECT count(*) FROM t").fetchall()
        for _ in range(30):
            await db.transaction(lambda c: c.execute(text("INSERT INTO t VALUES (randomblob(:n))"), {"n": BLOB}))
            await db.checkpoint()
        grown = await asyncio.to_thread(os.path.getsize, wal)
        reader.rollback()
        reader.close()
        await db.checkpoint()  # copies everything and starts the log over
        await db.transaction(lambda c: c.execute(text("INSERT INTO t VALUES (randomblob(:n))"), {"n": BLOB}))
        after = await asyncio.to_thread(os.path.getsize, wal)
    finally:
        await db.dispose()
    assert grown > 4 * LIMIT
    assert after <= LIMIT + 2 * BLOB, (grown, after)
