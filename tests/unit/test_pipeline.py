"""Pipeline.prepare: what gets committed for each kind of input (pure, no database needed)."""

from __future__ import annotations

from datetime import UTC, datetime

import orjson
import pytest

from gateway.contracts import Envelope, InputKind, Outcome
from gateway.errors import PermanentError
from gateway.ids import uuid7
from gateway.journal import CommitResult, Journal, JournalRecord
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
    assert rec.dedup_key is not None and rec.dedup_key.startswith("hl7v2|ADMIT|HOSP|C1|")
    assert list(rec.destinations) == ["store"]
    bundle = orjson.loads(rec.fhir or b"{}")
    types = [e["resource"]["resourceType"] for e in bundle["entry"]]
    assert "Patient" in types and "Encounter" in types
    assert rec.ordering_key.startswith("Patient/")
    assert rec.meta["version"] == "2.5" and rec.meta["sending_facility"] == "HOSP"


def test_an_unmapped_type_is_journaled_as_not_mapped_without_destinations() -> None:
    rec = pipeline().prepare(envelope(ADT.replace(b"ADT^A01^ADT_A01", b"BAR^P01^BAR_P01")))
    assert rec.status == "not_mapped" and rec.fhir is None and list(rec.destinations) == []
    assert rec.dedup_key is not None and rec.dedup_key.startswith("hl7v2|ADMIT|HOSP|C1|")


@pytest.mark.parametrize(
    ("payload", "code"),
    [
        (b"garbage", "no-header"),
        (b"MSH|^^^^|A|B|C|D|20260101||ADT^A01|C3|P|2.5\r", "unparseable"),  # MSH-2 delimiters not distinct
        (ADT.replace(b"|P|2.5\r", b"|P|3.0\r"), "unsupported-version"),
        (ADT.replace(b"ADT^A01^ADT_A01", b""), "unsupported-type"),
        (b"MSH|^~\\&|A|B|C|D|20260101||ADT^A01|C2|P|2.5\rEVN|A01\r", "mapping-failed"),
    ],
    ids=["no-msh", "bad-msh2", "version", "no-type", "no-pid"],
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


def test_a_resend_has_the_same_dedup_key_even_with_a_new_msh7_but_a_reused_control_id_does_not() -> None:
    p = pipeline()
    first = p.prepare(envelope(ADT)).dedup_key
    resent = p.prepare(envelope(ADT.replace(b"20260101120000+0100||ADT", b"20260101120500+0100||ADT"))).dedup_key
    other_patient = p.prepare(envelope(ADT.replace(b"123^^^HOSP^MR||Doe^John", b"456^^^HOSP^MR||Roe^Jane"))).dedup_key
    assert first == resent
    assert other_patient != first and other_patient is not None and other_patient.startswith("hl7v2|ADMIT|HOSP|C1|")


def test_a_resend_framed_differently_has_the_same_dedup_key() -> None:
    # `gateway send` ends the last segment with CR, `mllp_send --loose` sends it without, other tools use LF or
    # CR LF: the README's "sent again ... not stored twice" stored the mllp_send copy a second time.
    p = pipeline()
    keys = {
        p.prepare(envelope(framed)).dedup_key
        for framed in (ADT, ADT.rstrip(b"\r"), ADT.replace(b"\r", b"\n"), ADT.replace(b"\r", b"\r\n"), ADT + b"\r")
    }
    assert len(keys) == 1 and None not in keys
    # a segment's content still counts, to the byte
    assert p.prepare(envelope(ADT.replace(b"Doe^John", b"Doe^Johm"))).dedup_key not in keys


def test_a_huge_header_field_is_capped_so_it_fits_its_column() -> None:
    huge = ADT.replace(b"|ADMIT|HOSP|", b"|" + b"A" * 70_000 + b"|HOSP|")
    rec = pipeline().prepare(envelope(huge))
    assert rec.status == "accepted"
    assert all(len(v) <= 200 for v in rec.meta.values())
    assert rec.dedup_key is not None and len(rec.dedup_key) <= 255


class RefusingJournal(Journal):
    """Failure injection: the database refuses the first record (as MySQL does for data too long)."""

    def __init__(self) -> None:
        super().__init__("sqlite:///:memory:")
        self.seen: list[str] = []

    async def commit(self, record: JournalRecord) -> CommitResult:
        self.seen.append(record.status)
        if len(self.seen) == 1:
            raise PermanentError("writing: the database refused the data (DataError)")
        return CommitResult(False, record.envelope.id)


async def test_a_record_the_database_refuses_is_quarantined_and_answered_ar() -> None:
    journal = RefusingJournal()
    p = Pipeline(journal, Router([Route("r", ("store",), mapped=True)]))
    result = await p.submit(envelope(ADT))
    assert journal.seen == ["accepted", "quarantined"]
    assert result.outcome is Outcome.REJECTED and "refused" in result.reason
