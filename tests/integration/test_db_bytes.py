"""Binary parameters on MySQL/MariaDB are bound as hex literals (gateway/db.py ``bytes_as_hex``) and stored byte
for byte, on the single-row and the multi-row (executemany) paths the journal uses."""

from __future__ import annotations

import os

import pytest
from sqlalchemy import Column, Connection, Integer, LargeBinary, MetaData, Table, insert, select
from sqlalchemy.dialects.mysql import LONGBLOB

from gateway.db import AsyncDatabase, open_database

pytestmark = pytest.mark.mariadb

TABLE = Table(
    "blobs",
    MetaData(),
    Column("id", Integer, primary_key=True, autoincrement=False),
    Column("data", LargeBinary().with_variant(LONGBLOB(), "mysql", "mariadb")),
)
VALUES = [bytes(range(256)), b"", b"'\\\x00\x1a\"x'00'", os.urandom(100_000), bytes(range(256)) * 40]


async def test_every_byte_value_and_random_blobs_round_trip(mariadb_url: str) -> None:
    db = open_database(mariadb_url)
    assert isinstance(db, AsyncDatabase)
    try:
        await db.transaction(lambda c: TABLE.create(c))
        await db.transaction(lambda c: c.execute(insert(TABLE), {"id": 0, "data": VALUES[0]}))
        rows = [{"id": i, "data": v} for i, v in enumerate(VALUES) if i]
        await db.transaction(lambda c: c.execute(insert(TABLE), rows))
        stored = await db.read(lambda c: c.execute(select(TABLE.c.data).order_by(TABLE.c.id)).scalars().all())
        assert [bytes(v) for v in stored] == VALUES

        def escaped(c: Connection) -> str:
            raw = c.connection.dbapi_connection._connection  # type: ignore[union-attr]
            return str(raw.escape(b"\x80'\\"))

        assert await db.read(escaped) == "x'80275c'"  # the fast path is in place on pooled connections
    finally:
        await db.dispose()
