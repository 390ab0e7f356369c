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
from gateway.errors import TransientError
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


async def test_a_batch_of_updates_replaces_each_current_row_once(sink: SqlStoreSink) -> None:
    def pat(n: int, family: str) -> dict[str, Any]:
        return {**patient(f"p{n}", family), "identifier": [{"system": "urn:mrn", "value": f"{family}-{n}"}]}

    await sink.deliver_many([item(n, pat(n, "A")) for n in range(20)])
    # All twenty changed, p0 twice in the same batch, one unchanged, one new.
    batch = [item(100 + n, pat(n, "B")) for n in range(19)] + [item(200, pat(0, "C")), item(201, pat(30, "N"))]
    assert await sink.deliver_many(batch) == [None] * len(batch)
    cur = {r.id: r for r in await rows(sink, resources)}
    assert len(cur) == 21
    assert (cur["p0"].version, orjson.loads(cur["p0"].json)["name"][0]["family"]) == (3, "C")
    assert cur["p0"].identifier_value == "C-0"  # the search columns follow the content
    assert all((cur[f"p{n}"].version, cur[f"p{n}"].identifier_value) == (2, f"B-{n}") for n in range(1, 19))
    assert (cur["p19"].version, cur["p19"].identifier_value) == (1, "A-19")
    assert cur["p30"].version == 1
    assert all(orjson.loads(r.json)["meta"]["versionId"] == str(r.version) for r in cur.values())
    hist = await rows(sink, history)
    assert len(hist) == 20 + 19 + 1 + 1
    assert sorted(r.version for r in hist if r.id == "p0") == [1, 2, 3]


async def test_text_is_stored_exactly(sink: SqlStoreSink) -> None:
    # Quotes, backslashes (orjson writes "\\" and "\n" escapes), control characters and non-ASCII text: the
    # store's MariaDB connections send string literals without backslash escapes, so this checks that every
    # character still arrives as it was, on an insert and on an update.
    tricky = "O'Brien \"Jr\" \\ C:\\path\n\ttab \x00 nul \u00e9\u00e8 \U0001f600 ''; --"
    res = {**patient("q1", tricky), "identifier": [{"system": "urn:x'y", "value": tricky[:40]}]}
    for n, family in enumerate((tricky, tricky + " again")):
        await sink.deliver(item(n, {**res, "name": [{"family": family}]}))
        (row,) = await rows(sink, resources)
        doc = orjson.loads(row.json)
        assert doc["name"][0]["family"] == family
        assert (row.identifier_system, row.identifier_value) == ("urn:x'y", tricky[:40])
    hist = await rows(sink, history)
    assert sorted(orjson.loads(r.json)["name"][0]["family"] for r in hist) == [tricky, tricky + " again"]


class _InterleavedWriter(SqlStoreSink):
    """Another writer commits a new version of p1 after this sink read the current rows and before it writes."""

    def _update_current(self, conn: Any, updates: Any, read_versions: Any) -> None:
        import pymysql

        if ("Patient", "p1") not in updates:
            return super()._update_current(conn, updates, read_versions)
        other = pymysql.connect(host="127.0.0.1", user="root", password="", database=conn.engine.url.database)
        try:
            with other.cursor() as cur:
                cur.execute("UPDATE fhir_resources SET version = version + 1, json = '{}' WHERE id = 'p1'")
            other.commit()
        finally:
            other.close()
        super()._update_current(conn, updates, read_versions)


async def test_a_version_written_by_another_writer_meanwhile_is_not_overwritten(mariadb_url: str) -> None:
    racing = _InterleavedWriter("store", SqlStoreConfig(type="sql_store", url=mariadb_url))
    await racing.start()
    try:
        await racing.deliver_many([item(1, patient("p1", "A")), item(2, patient("p2", "A"))])
        results = await racing.deliver_many([item(3, patient("p1", "B")), item(4, patient("p2", "B"))])
        # The batch lost the race and rolled back; alone, p2 is written and p1 loses again (to a third version).
        assert results[1] is None
        assert isinstance(results[0], TransientError) and "concurrently" in str(results[0])
        cur = {r.id: r for r in await rows(racing, resources)}
        assert cur["p1"].json == "{}" and cur["p1"].version == 3
        assert orjson.loads(cur["p2"].json)["name"][0]["family"] == "B" and cur["p2"].version == 2
    finally:
        await racing.close()
    # Without the interleaved writer, the retry applies on top of what that writer left.
    plain = SqlStoreConfig(type="sql_store", url=mariadb_url).build("store")
    await plain.start()
    try:
        await plain.deliver(item(5, patient("p1", "B")))
        cur = {r.id: r for r in await rows(plain, resources)}
        assert cur["p1"].version == 4 and orjson.loads(cur["p1"].json)["name"][0]["family"] == "B"
    finally:
        await plain.close()
