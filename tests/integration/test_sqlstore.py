"""The SQL resource store sink on real databases (SQLite and MariaDB)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import orjson
import pytest
from sqlalchemy import func, select

from adapters.sqlstore.config import SqlStoreConfig
from adapters.sqlstore.schema import history, resources
from adapters.sqlstore.sink import SqlStoreSink
from gateway.contracts import BatchSink, InputKind, OutboxItem, Sink
from gateway.ids import uuid7


def patient(pid: str, family: str) -> dict[str, Any]:
    return {"resourceType": "Patient", "id": pid, "name": [{"family": family}]}


def item(n: int, *res: dict[str, Any]) -> OutboxItem:
    return OutboxItem(
        id=n,
        message_id=uuid7(),
        destination="store",
        attempts=0,
        kind=InputKind.HL7V2,
        source="test",
        raw=b"",
        resources=list(res),
    )


@pytest.fixture
async def sink(db_url: str) -> AsyncIterator[SqlStoreSink]:
    s = SqlStoreConfig(type="sql_store", url=db_url).build("store")
    await s.start()
    try:
        yield s
    finally:
        await s.close()


async def rows(s: SqlStoreSink, table: Any) -> list[Any]:
    assert s.db is not None
    return await s.db.read(lambda conn: list(conn.execute(select(table))))


async def test_implements_the_sink_protocols(sink: SqlStoreSink) -> None:
    assert isinstance(sink, Sink) and isinstance(sink, BatchSink)


async def test_upsert_bumps_version_only_when_content_changes(sink: SqlStoreSink) -> None:
    await sink.deliver(item(1, patient("p1", "Everyman")))
    await sink.deliver(item(2, patient("p1", "Everyman")))  # same content: no new version
    cur = await rows(sink, resources)
    assert [(r.resource_type, r.id, r.version) for r in cur] == [("Patient", "p1", 1)]
    await sink.deliver(item(3, patient("p1", "Everywoman")))
    cur = await rows(sink, resources)
    assert [r.version for r in cur] == [2]
    doc = orjson.loads(cur[0].json)
    assert doc["name"][0]["family"] == "Everywoman"
    assert doc["meta"]["versionId"] == "2" and doc["meta"]["lastUpdated"].endswith("Z")
    hist = await rows(sink, history)
    assert sorted(r.version for r in hist) == [1, 2]
    assert orjson.loads(next(r for r in hist if r.version == 1).json)["name"][0]["family"] == "Everyman"


async def test_a_batch_applies_in_order_and_counts_versions(sink: SqlStoreSink) -> None:
    results = await sink.deliver_many(
        [
            item(1, patient("p1", "A")),
            item(2, patient("p1", "B"), patient("p2", "X")),
            item(3, patient("p1", "C")),
        ]
    )
    assert results == [None, None, None]
    cur = {r.id: r for r in await rows(sink, resources)}
    assert cur["p1"].version == 3 and orjson.loads(cur["p1"].json)["name"][0]["family"] == "C"
    assert cur["p2"].version == 1
    assert len(await rows(sink, history)) == 4
    read = await sink.read("Patient")
    assert {d["id"] for d in read} == {"p1", "p2"}


async def test_meta_from_the_mapping_does_not_count_as_a_change(sink: SqlStoreSink) -> None:
    p = patient("p1", "A")
    await sink.deliver(item(1, p))
    await sink.deliver(item(2, {**p, "meta": {"source": "elsewhere"}}))
    assert [r.version for r in await rows(sink, resources)] == [1]


async def test_a_bad_item_does_not_block_the_batch(sink: SqlStoreSink) -> None:
    bad = {"resourceType": "Patient", "id": "x" * 200}  # longer than the id column: refused by MariaDB only
    results = await sink.deliver_many([item(1, patient("ok1", "A")), item(2, bad), item(3, patient("ok2", "B"))])
    assert results[0] is None and results[2] is None
    assert sink.db is not None
    n = await sink.db.read(lambda conn: conn.execute(select(func.count()).select_from(resources)).scalar_one())
    assert n == (2 if sink.db.dialect != "sqlite" else 3)
    if sink.db.dialect != "sqlite":
        assert results[1] is not None


async def test_a_late_older_message_does_not_overwrite_newer_content(sink: SqlStoreSink) -> None:
    older = item(1, patient("p1", "Before"))
    newer = item(2, patient("p1", "After"))  # minted later: a larger UUIDv7
    assert older.message_id < newer.message_id
    await sink.deliver(newer)
    await sink.deliver(older)  # redelivered late, e.g. a dead letter retried
    (row,) = await rows(sink, resources)
    assert orjson.loads(row.json)["name"][0]["family"] == "After" and row.version == 1
