"""Migration s0003 on SQLite and MariaDB: a store created with generated search columns (s0002) keeps its values
when they become ordinary columns, the sink's own computation (adapters/sqlstore/search.py) gives the values the
database gave, and the schema matches adapters/sqlstore/schema.py."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any

import orjson
import pytest
from sqlalchemy import Connection, inspect, text

from adapters.sqlstore.config import SqlStoreConfig
from adapters.sqlstore.schema import resources
from adapters.sqlstore.search import COLUMNS, search_values
from adapters.sqlstore.sink import MIGRATIONS, VERSION_TABLE
from gateway import migrate
from gateway.contracts import InputKind, OutboxItem
from gateway.db import Database, open_database
from gateway.ids import uuid7
from gateway.normalise.hl7v2.normaliser import Hl7v2Normaliser

ADT = (
    b"MSH|^~\\&|LAB|HOSP|GW|HOSP|20261124120000||ADT^A01^ADT_A01|C1|P|2.5.1\r"
    b"EVN|A01|20261124120000\r"
    b"PID|1||MRN-7^^^HOSP^MR||Everyman^Adam||19800101|M\r"
    b"NK1|1|Jones^Barbara|SPO^Spouse^HL70063\r"
    b"PV1|1|I|2000^2012^01||||004777^Attend^Aaron|||SUR||||7|A0||IP|V9^^^HOSP^VN\r"
    b"AL1|1||^ASPIRIN\r"
)
EDGE_CASES: list[dict[str, Any]] = [
    {"resourceType": "Observation", "id": "o-period", "code": {"coding": [{"system": "http://loinc.org",
     "code": "8867-4"}]}, "subject": {"reference": "Patient/x"}, "effectivePeriod": {"start": "2026-01-02"}},
    {"resourceType": "Observation", "id": "o-issued", "issued": "2026-01-03T00:00:00Z"},
    {"resourceType": "DiagnosticReport", "id": "dr", "issued": "2026-01-04", "code": {"coding": [{"code": "x"}]}},
    {"resourceType": "Condition", "id": "c", "recordedDate": "2026-01-05", "subject": {"reference": "Patient/y"}},
    {"resourceType": "Procedure", "id": "pr", "performedPeriod": {"start": "2026-01-06"}},
    {"resourceType": "Immunization", "id": "im", "patient": {"reference": "Patient/z"}, "occurrenceDateTime": "2025"},
    {"resourceType": "CarePlan", "id": "cp", "period": {"start": "2026-01-07"}, "subject": {"reference": "Group/g"}},
    {"resourceType": "Patient", "id": "num", "identifier": [{"system": "urn:n", "value": 12345}],
     "subject": {"reference": "not searched for a Patient"}},
    {"resourceType": "Patient", "id": "long", "identifier": [{"system": "urn:" + "s" * 300, "value": "v" * 300}]},
    {"resourceType": "Patient", "id": "none"},
    {"resourceType": "Observation", "id": "o-code-nested", "code": {"coding": [{"display": "no code"}]}},
]  # fmt: skip


def corpus() -> list[dict[str, Any]]:
    from gateway.contracts import Envelope

    env = Envelope(uuid7(), "test", InputKind.HL7V2, datetime.now(UTC), ADT, "127.0.0.1:1")
    bundle = Hl7v2Normaliser().prepare(env).bundle
    assert bundle is not None
    return [e["resource"] for e in bundle["entry"]] + EDGE_CASES


@pytest.fixture
async def db(db_url: str) -> AsyncIterator[Database]:
    d = open_database(db_url)
    try:
        yield d
    finally:
        await d.dispose()


def insert_base_rows(conn: Connection, docs: list[dict[str, Any]]) -> None:
    # What the sink wrote under s0002: the base columns only; the database computed the search columns.
    conn.execute(
        text(
            "INSERT INTO fhir_resources (resource_type, id, version, last_updated, content_hash, message_id, json) "
            "VALUES (:t, :i, 1, :lu, 'h', '00000000-0000-0000-0000-000000000000', :j)"
        ),
        [
            {"t": d["resourceType"], "i": d["id"], "lu": datetime(2026, 11, 24), "j": orjson.dumps(d).decode()}
            for d in docs
        ],
    )


def search_rows(conn: Connection) -> dict[str, dict[str, Any]]:
    cols = ", ".join(COLUMNS)
    return {
        r.id: {c: getattr(r, c) for c in COLUMNS} for r in conn.execute(text(f"SELECT id, {cols} FROM fhir_resources"))
    }


async def test_s0003_keeps_the_values_and_the_sink_computes_the_same_ones(db: Database, db_url: str) -> None:
    docs = corpus()
    await migrate.upgrade(db, MIGRATIONS, VERSION_TABLE, revision="s0002")
    await db.transaction(lambda conn: insert_base_rows(conn, docs))
    generated = await db.read(search_rows)
    # The sink's rules are the database's rules of s0002, value for value.
    assert {d["id"]: search_values(d) for d in docs} == generated
    assert generated["long"]["identifier_value"] == "v" * 128 and generated["num"]["identifier_value"] == "12345"

    await migrate.upgrade(db, MIGRATIONS, VERSION_TABLE)
    assert await migrate.current(db, VERSION_TABLE) == "s0003"
    assert await db.read(search_rows) == generated

    def shape(conn: Connection) -> tuple[list[str], set[str], dict[str, Any]]:
        insp = inspect(conn)
        columns = insp.get_columns("fhir_resources")
        return (
            [c["name"] for c in columns],
            {i["name"] for i in insp.get_indexes("fhir_resources") if i["name"]},
            {c["name"]: c.get("computed") for c in columns},
        )

    names, indexes, computed = await db.read(shape)
    assert names == [c.name for c in resources.columns]  # adapters/sqlstore/schema.py describes the table
    assert not any(computed.values())  # ordinary columns now
    assert {
        "ix_fhir_resources_identifier",
        "ix_fhir_resources_subject",
        "ix_fhir_resources_code",
        "ix_fhir_resources_effective",
        "ix_fhir_resources_type_updated",
        "ix_fhir_resources_last_updated",
    } <= indexes

    # The sink writes them from now on, also when it updates a row the migration copied.
    sink = SqlStoreConfig(type="sql_store", url=db_url).build("store")
    await sink.start()
    try:
        changed = {**docs[-2], "identifier": [{"system": "urn:new", "value": "N-1"}]}
        await sink.deliver(OutboxItem(1, uuid7(), "store", 0, InputKind.HL7V2, "test", b"", [changed]))
    finally:
        await sink.close()
    after = await db.read(search_rows)
    assert (after["none"]["identifier_system"], after["none"]["identifier_value"]) == ("urn:new", "N-1")

    # And back: generated columns again, computed by the database from the JSON.
    await migrate.upgrade(db, MIGRATIONS, VERSION_TABLE, revision="s0003")

    def downgrade(conn: Connection) -> None:
        from alembic import command

        cfg = migrate.alembic_config(MIGRATIONS, VERSION_TABLE)
        cfg.attributes["connection"] = conn
        command.downgrade(cfg, "s0002")

    await db.transaction(downgrade)
    back = await db.read(search_rows)
    assert back == after
    _, _, computed = await db.read(shape)
    assert all(computed[c] for c in COLUMNS)
