"""Pipeline.prepare: what gets committed for each kind of input (pure, no database needed)."""

from __future__ import annotations

from datetime import UTC, datetime

import orjson
import pytest

from gateway.contracts import Envelope, InputKind
from gateway.ids import uuid7
from gateway.journal import Journal
from gateway.pipeline import Pipeline
from gateway.routing import Route, Router

ADT = (
    b"MSH|^~\\&|ADMIT|HOSP|GW|HOSP|20260101120000+0100||ADT^A01^ADT_A01|C1|P|2.5\r"
    b"EVN|A01|20260101120000+0100\r"
    b"PID|1||123^^^HOSP^MR||Doe^John||19800101|M\r"
    b"PV1|1|I|W1^1^A||||9^Attend^Ann|||MED|||||||||V1^^^HOSP^VN\r"
)


def envelope(payload: bytes) -> Envelope:
    return Envelope(uuid7(), "src", InputKind.HL7V2, datetime.now(UTC), payload, "127.0.0.1:9")


def pipeline(**kw: bool) -> Pipeline:
    return Pipeline(Journal("sqlite:///:memory:"), Router([Route("r", ("store",), mapped=True)]), **kw)


def test_a_mapped_message_is_accepted_with_bundle_dedup_key_and_destinations() -> None:
    rec = pipeline().prepare(envelope(ADT))
    assert rec.status == "accepted"
    assert rec.message_type == "ADT^A01" and rec.control_id == "C1"
    assert rec.dedup_key == "hl7v2|ADMIT|HOSP|C1"
    assert list(rec.destinations) == ["store"]
    bundle = orjson.loads(rec.fhir or b"{}")
    types = [e["resource"]["resourceType"] for e in bundle["entry"]]
    assert "Patient" in types and "Encounter" in types
    assert rec.ordering_key.startswith("Patient/")
    assert rec.meta["version"] == "2.5" and rec.meta["sending_facility"] == "HOSP"


def test_an_unmapped_type_is_journaled_as_not_mapped_without_destinations() -> None:
    rec = pipeline().prepare(envelope(ADT.replace(b"ADT^A01^ADT_A01", b"ORU^R01^ORU_R01")))
    assert rec.status == "not_mapped" and rec.fhir is None and list(rec.destinations) == []
    assert rec.dedup_key == "hl7v2|ADMIT|HOSP|C1"


@pytest.mark.parametrize(
    ("payload", "code"),
    [
        (b"garbage", "no-header"),
        (ADT.replace(b"|P|2.5\r", b"|P|3.0\r"), "unsupported-version"),
        (ADT.replace(b"ADT^A01^ADT_A01", b""), "unsupported-type"),
        (b"MSH|^~\\&|A|B|C|D|20260101||ADT^A01|C2|P|2.5\rEVN|A01\r", "mapping-failed"),
    ],
    ids=["no-msh", "version", "no-type", "no-pid"],
)
def test_bad_input_is_quarantined_with_its_reason_and_no_dedup_key(payload: bytes, code: str) -> None:
    rec = pipeline().prepare(envelope(payload))
    assert rec.status == "quarantined" and rec.reject_code == code and rec.error
    assert rec.dedup_key is None and list(rec.destinations) == []
    assert rec.envelope.payload == payload


def test_strict_mode_accepts_a_standard_message_and_quarantines_a_broken_structure() -> None:
    strict = pipeline(hl7_strict=True)
    assert strict.prepare(envelope(ADT)).status == "accepted"
    broken = ADT.replace(b"PID|1||123^^^HOSP^MR||Doe^John", b"PID|1||||Doe^John")
    rec = strict.prepare(envelope(broken))
    assert rec.status == "quarantined" and rec.reject_code == "unparseable"
    assert rec.error and "PID_3" in rec.error and "Doe" not in rec.error
    # without strict mode the same message is judged by the mapping: no patient identifier, so it cannot map
    assert pipeline().prepare(envelope(broken)).reject_code == "mapping-failed"


def test_runtime_fhir_validation_passes_valid_bundles() -> None:
    rec = pipeline(validate_fhir=True).prepare(envelope(ADT))
    assert rec.status == "accepted"
