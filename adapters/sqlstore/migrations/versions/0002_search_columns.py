"""Search columns on fhir_resources: generated from the JSON, indexed for the searches users run first.

patient identifier (first identifier's system and value), subject reference (subject or patient), code (first
coding of code), the clinically relevant date (effective[x], authoredOn, occurrence[x], period.start ... by
resource type), and the type with last_updated. MySQL 8 and MariaDB 10.2+: VIRTUAL generated columns over
JSON_EXTRACT (both accept an index on a virtual column; the JSON is LONGTEXT, which both JSON functions read).
Values are cut to the column length with LEFT so that a long value can never make an INSERT fail under strict
mode. SQLite 3.31+: the same with json_extract.

Revision ID: s0002
Revises: s0001
Create Date: 2026-11-24
"""

from alembic import op

revision = "s0002"
down_revision = "s0001"
branch_labels = None
depends_on = None

# Resource types that are not about one patient: no subject, no clinical code, no clinical date.
NOT_CLINICAL = (
    "Patient", "Practitioner", "PractitionerRole", "Organization", "Location", "RelatedPerson", "Device",
    "Endpoint", "HealthcareService", "Group", "Bundle",
)  # fmt: skip
# Each column: (length, [(resource types or None for "any other", JSON paths tried in order)], default).
# The paths are chosen by resource type so that a resource is scanned only for fields it can have: the JSON
# functions read the text from the start every time, and a path that is absent costs a scan of the whole
# document (13 scans per Patient with one COALESCE for all types halved the store's write rate on MariaDB).
COLUMNS: dict[str, tuple[int, list[tuple[tuple[str, ...] | None, tuple[str, ...]]]]] = {
    "identifier_system": (255, [(None, ("$.identifier[0].system",))]),
    "identifier_value": (128, [(None, ("$.identifier[0].value",))]),
    "subject_ref": (
        128,
        [
            (NOT_CLINICAL, ()),
            (("Immunization", "AllergyIntolerance", "Coverage", "Account"), ("$.patient.reference",)),
            (None, ("$.subject.reference",)),
        ],
    ),
    "code_system": (255, [(NOT_CLINICAL, ()), (None, ("$.code.coding[0].system",))]),
    "code": (64, [(NOT_CLINICAL, ()), (None, ("$.code.coding[0].code",))]),
    "effective": (
        35,
        [
            (NOT_CLINICAL, ()),
            (("Observation",), ("$.effectiveDateTime", "$.effectivePeriod.start", "$.effectiveInstant", "$.issued")),
            (("DiagnosticReport",), ("$.effectiveDateTime", "$.effectivePeriod.start", "$.issued")),
            (("ServiceRequest", "MedicationRequest", "DeviceRequest", "NutritionOrder"), ("$.authoredOn",)),
            (("Immunization", "MedicationAdministration"), ("$.occurrenceDateTime", "$.effectiveDateTime")),
            (("Encounter", "EpisodeOfCare"), ("$.period.start",)),
            (("Procedure",), ("$.performedDateTime", "$.performedPeriod.start")),
            (("Condition",), ("$.onsetDateTime", "$.recordedDate")),
            (("AllergyIntolerance",), ("$.onsetDateTime", "$.recordedDate")),
            (("DocumentReference",), ("$.date",)),
            (("ImagingStudy",), ("$.started",)),
            (None, ("$.effectiveDateTime", "$.authoredOn", "$.occurrenceDateTime", "$.period.start")),
        ],
    ),
}

INDEXES = {
    "ix_fhir_resources_identifier": ("identifier_value", "identifier_system"),
    "ix_fhir_resources_subject": ("subject_ref", "resource_type", "effective"),
    "ix_fhir_resources_code": ("code", "code_system", "effective"),
    "ix_fhir_resources_effective": ("resource_type", "effective"),
    "ix_fhir_resources_type_updated": ("resource_type", "last_updated"),
}


def _expression(cases: list[tuple[tuple[str, ...] | None, tuple[str, ...]]], extract: str, coalesce: str) -> str:
    """CASE resource_type WHEN ... THEN COALESCE(extract(path), ...) ... END, paths in the given order."""

    def value(paths: tuple[str, ...]) -> str:
        if not paths:
            return "NULL"
        calls = [extract.format(path=p) for p in paths]
        return calls[0] if len(calls) == 1 else f"{coalesce}({', '.join(calls)})"

    if len(cases) == 1:
        return value(cases[0][1])
    arms = []
    otherwise = "NULL"
    for types, paths in cases:
        if types is None:
            otherwise = value(paths)
        else:
            listed = ", ".join(f"'{t}'" for t in types)
            arms.append(f"WHEN resource_type IN ({listed}) THEN {value(paths)}")
    return f"CASE {' '.join(arms)} ELSE {otherwise} END"


def _mysql(length: int, cases: list[tuple[tuple[str, ...] | None, tuple[str, ...]]]) -> str:
    expr = _expression(cases, "JSON_UNQUOTE(JSON_EXTRACT(`json`, '{path}'))", "COALESCE")
    return f"VARCHAR({length}) AS (LEFT({expr}, {length})) VIRTUAL"


def _sqlite(length: int, cases: list[tuple[tuple[str, ...] | None, tuple[str, ...]]]) -> str:
    expr = _expression(cases, "json_extract(json, '{path}')", "coalesce")
    return f"TEXT GENERATED ALWAYS AS (substr({expr}, 1, {length})) VIRTUAL"


def upgrade() -> None:
    sqlite = op.get_bind().dialect.name == "sqlite"
    for name, (length, cases) in COLUMNS.items():
        spec = _sqlite(length, cases) if sqlite else _mysql(length, cases)
        op.execute(f"ALTER TABLE fhir_resources ADD COLUMN {name} {spec}")
    for name, cols in INDEXES.items():
        op.execute(f"CREATE INDEX {name} ON fhir_resources ({', '.join(cols)})")


def downgrade() -> None:
    sqlite = op.get_bind().dialect.name == "sqlite"
    for name in INDEXES:
        op.execute(f"DROP INDEX {name}" if sqlite else f"DROP INDEX {name} ON fhir_resources")
    for name in COLUMNS:
        op.execute(f"ALTER TABLE fhir_resources DROP COLUMN {name}")
