"""The resource store's generated search columns and their indexes, with the example queries of docs/mysql.md,
on SQLite and MariaDB."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest
from sqlalchemy import text

from adapters.sqlstore.config import SqlStoreConfig
from adapters.sqlstore.sink import SqlStoreSink
from gateway.contracts import InputKind, OutboxItem
from gateway.ids import uuid7


def item(*res: dict[str, Any]) -> OutboxItem:
    return OutboxItem(1, uuid7(), "store", 0, InputKind.HL7V2, "test", b"", list(res))


PATIENT = {
    "resourceType": "Patient",
    "id": "pat1",
    "identifier": [{"system": "urn:oid:1.2.3.4", "value": "MRN-0042"}, {"system": "urn:ssn", "value": "x"}],
}
OBS = {
    "resourceType": "Observation",
    "id": "obs1",
    "status": "final",
    "code": {"coding": [{"system": "http://loinc.org", "code": "8867-4"}]},
    "subject": {"reference": "Patient/pat1"},
    "effectiveDateTime": "2026-03-01T10:00:00+01:00",
}
ORDER = {
    "resourceType": "ServiceRequest",
    "id": "sr1",
    "status": "active",
    "intent": "order",
    "code": {"coding": [{"system": "http://loinc.org", "code": "24323-8"}]},
    "subject": {"reference": "Patient/pat1"},
    "authoredOn": "2026-02-27",
}
IMMUNIZATION = {
    "resourceType": "Immunization",
    "id": "imm1",
    "patient": {"reference": "Patient/pat1"},
    "occurrenceDateTime": "2025-10-01",
}


@pytest.fixture
async def store(db_url: str) -> AsyncIterator[SqlStoreSink]:
    s = SqlStoreConfig(type="sql_store", url=db_url).build("store")
    await s.start()
    await s.deliver(item(PATIENT, OBS, ORDER, IMMUNIZATION))
    try:
        yield s
    finally:
        await s.close()


async def query(s: SqlStoreSink, sql: str, **params: Any) -> list[Any]:
    assert s.db is not None
    return await s.db.read(lambda c: list(c.execute(text(sql), params)))


async def test_generated_columns_hold_the_search_values(store: SqlStoreSink) -> None:
    rows = {
        r.id: r
        for r in await query(
            store, "SELECT id, identifier_system, identifier_value, subject_ref, code, effective FROM fhir_resources"
        )
    }
    assert (rows["pat1"].identifier_system, rows["pat1"].identifier_value) == ("urn:oid:1.2.3.4", "MRN-0042")
    assert (rows["obs1"].subject_ref, rows["obs1"].code) == ("Patient/pat1", "8867-4")
    assert rows["obs1"].effective == "2026-03-01T10:00:00+01:00"
    assert rows["sr1"].effective == "2026-02-27"
    assert (rows["imm1"].subject_ref, rows["imm1"].effective) == ("Patient/pat1", "2025-10-01")
    assert rows["pat1"].subject_ref is None


async def test_the_documented_example_queries(store: SqlStoreSink) -> None:
    # docs/mysql.md: a patient by MRN, then everything about them, newest first
    (pat,) = await query(
        store,
        "SELECT id FROM fhir_resources WHERE identifier_value = :mrn AND identifier_system = :sys "
        "AND resource_type = 'Patient'",
        mrn="MRN-0042",
        sys="urn:oid:1.2.3.4",
    )
    about = await query(
        store,
        "SELECT resource_type, id FROM fhir_resources WHERE subject_ref = :ref ORDER BY effective DESC",
        ref=f"Patient/{pat.id}",
    )
    assert [r.id for r in about] == ["obs1", "sr1", "imm1"]
    # heart rates in a date range
    hr = await query(
        store,
        "SELECT id FROM fhir_resources WHERE code = '8867-4' AND effective >= :since AND effective < :until",
        since="2026-03-01",
        until="2026-03-02",
    )
    assert [r.id for r in hr] == ["obs1"]
    # what changed lately, by type
    recent = await query(
        store,
        "SELECT id FROM fhir_resources WHERE resource_type = 'Observation' ORDER BY last_updated DESC LIMIT 10",
    )
    assert [r.id for r in recent] == ["obs1"]


async def test_the_searches_use_their_indexes(store: SqlStoreSink) -> None:
    assert store.db is not None
    if store.db.dialect == "sqlite":
        plan = await query(store, "EXPLAIN QUERY PLAN SELECT id FROM fhir_resources WHERE identifier_value = 'x'")
        assert "ix_fhir_resources_identifier" in " ".join(str(r[-1]) for r in plan)
        plan = await query(store, "EXPLAIN QUERY PLAN SELECT id FROM fhir_resources WHERE subject_ref = 'x'")
        assert "ix_fhir_resources_subject" in " ".join(str(r[-1]) for r in plan)
        return
    # A table of four rows is scanned whatever the indexes; FORCE INDEX shows each index exists and can serve
    # its search (MariaDB refuses an index it cannot use for the WHERE clause by falling back to a scan).
    for where, index in [
        ("identifier_value = 'x'", "ix_fhir_resources_identifier"),
        ("subject_ref = 'x'", "ix_fhir_resources_subject"),
        ("code = 'x'", "ix_fhir_resources_code"),
        ("resource_type = 'Observation' AND effective > '2026'", "ix_fhir_resources_effective"),
        ("resource_type = 'Observation' AND last_updated > '2026-01-01'", "ix_fhir_resources_type_updated"),
    ]:
        (plan,) = await query(store, f"EXPLAIN SELECT id FROM fhir_resources FORCE INDEX ({index}) WHERE {where}")
        assert plan._mapping["key"] == index, (where, plan)


async def test_a_value_longer_than_its_column_is_cut_not_refused(store: SqlStoreSink) -> None:
    long_ref = "Patient/" + "x" * 500
    await store.deliver(item({**OBS, "id": "obs2", "subject": {"reference": long_ref}}))
    (row,) = await query(store, "SELECT subject_ref, json FROM fhir_resources WHERE id = 'obs2'")
    assert row.subject_ref == long_ref[:128]
    assert long_ref in row.json
