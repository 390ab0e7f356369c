"""Search columns become ordinary columns that the sink writes (adapters/sqlstore/search.py).

As generated columns they cost more than half of every write: each index on one parses the JSON text again, and an
update parses the old and the new document (docs/mysql.md, "Cost"). Same names, lengths and indexes, so every
query keeps working; the existing values are copied once from the generated columns, which computes them by the
rules of s0002. That copy rewrites every row: on a large store run ``gateway db upgrade`` in a quiet hour.

Revision ID: s0003
Revises: s0002
Create Date: 2026-11-24
"""

import importlib.util
from pathlib import Path

from alembic import op

revision = "s0003"
down_revision = "s0002"
branch_labels = None
depends_on = None

COLUMNS = {
    "identifier_system": 255,
    "identifier_value": 128,
    "subject_ref": 128,
    "code_system": 255,
    "code": 64,
    "effective": 35,
}
INDEXES = {
    "ix_fhir_resources_identifier": ("identifier_value", "identifier_system"),
    "ix_fhir_resources_subject": ("subject_ref", "resource_type", "effective"),
    "ix_fhir_resources_code": ("code", "code_system", "effective"),
    "ix_fhir_resources_effective": ("resource_type", "effective"),
    "ix_fhir_resources_type_updated": ("resource_type", "last_updated"),
}


def upgrade() -> None:
    sqlite = op.get_bind().dialect.name == "sqlite"
    copy = ", ".join(f"{name}_plain = {name}" for name in COLUMNS)
    if sqlite:
        # SQLite alters one thing per statement; it cannot drop a column an index uses.
        for name, length in COLUMNS.items():
            op.execute(f"ALTER TABLE fhir_resources ADD COLUMN {name}_plain VARCHAR({length})")
        op.execute(f"UPDATE fhir_resources SET {copy}")
        for index in INDEXES:
            op.execute(f"DROP INDEX {index}")
        for name in COLUMNS:
            op.execute(f"ALTER TABLE fhir_resources DROP COLUMN {name}")
            op.execute(f"ALTER TABLE fhir_resources RENAME COLUMN {name}_plain TO {name}")
        for index, cols in INDEXES.items():
            op.execute(f"CREATE INDEX {index} ON fhir_resources ({', '.join(cols)})")
        return
    # MySQL/MariaDB: three statements, so the table is rebuilt once (adding columns at the end is instant).
    op.execute(
        "ALTER TABLE fhir_resources "
        + ", ".join(f"ADD COLUMN {name}_plain VARCHAR({length}) NULL" for name, length in COLUMNS.items())
    )
    op.execute(f"UPDATE fhir_resources SET {copy}")
    op.execute(
        "ALTER TABLE fhir_resources "
        + ", ".join(
            [f"DROP INDEX {index}" for index in INDEXES]
            + [f"DROP COLUMN {name}" for name in COLUMNS]
            + [f"CHANGE COLUMN {name}_plain {name} VARCHAR({length}) NULL" for name, length in COLUMNS.items()]
            + [f"ADD INDEX {index} ({', '.join(cols)})" for index, cols in INDEXES.items()]
        )
    )


def downgrade() -> None:
    sqlite = op.get_bind().dialect.name == "sqlite"
    for index in INDEXES:
        op.execute(f"DROP INDEX {index}" if sqlite else f"DROP INDEX {index} ON fhir_resources")
    for name in COLUMNS:
        op.execute(f"ALTER TABLE fhir_resources DROP COLUMN {name}")
    # Back to the generated columns and their indexes, exactly as s0002 makes them.
    spec = importlib.util.spec_from_file_location("s0002", Path(__file__).with_name("0002_search_columns.py"))
    assert spec is not None and spec.loader is not None
    s0002 = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(s0002)
    s0002.upgrade()
