"""The DICOM normaliser and mapping as pure functions: descriptors to Prepared, study summaries to Patient +
ImagingStudy (valid FHIR), dates and names, and no patient data in meta."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import orjson
import pytest

from gateway.contracts import Envelope, InputKind, RejectCode
from gateway.normalise import MapContext, MappingError, Rejected
from gateway.normalise.dicom import INSTANCE_FORMAT, STUDY_FORMAT
from gateway.normalise.dicom.mapping import _datetime, _human_names, map_study
from gateway.normalise.dicom.normaliser import DicomNormaliser
from tests.unit.test_fhir_validity import assert_valid

CTX = MapContext("01900000-0000-7000-8000-000000000001", "dicom-main", datetime(2026, 1, 5, tzinfo=UTC))
HEADER = {
    "PatientID": "PID-42",
    "IssuerOfPatientID": "HOSP",
    "PatientName": "Yamada^Tarou=山田^太郎=やまだ^たろう",
    "PatientBirthDate": "19700131",
    "PatientSex": "M",
    "StudyDate": "20260105",
    "StudyTime": "101530.25",
    "TimezoneOffsetFromUTC": "+0100",
    "AccessionNumber": "ACC1",
    "StudyDescription": "Chest",
    "ReferringPhysicianName": "House^Gregory^^Dr",
}


def envelope(doc: dict[str, Any]) -> Envelope:
    return Envelope(
        id=CTX.message_id,
        source="dicom-main",
        kind=InputKind.DICOM,
        received_at=CTX.received_at,
        payload=orjson.dumps(doc),
        peer="10.0.0.5:40000",
    )


def summary(**extra: Any) -> dict[str, Any]:
    return {
        "format": STUDY_FORMAT,
        "study_instance_uid": "1.2.3.4",
        "calling_ae": "CT1",
        "called_ae": "GATEWAY",
        "header": HEADER,
        "series": [
            {
                "uid": "1.2.3.4.1",
                "header": {"SeriesNumber": "2", "Modality": "CT", "SeriesDescription": "Axial"},
                "instances": [
                    {"uid": "1.2.3.4.1.1", "sop_class_uid": "1.2.840.10008.5.1.4.1.1.2", "number": "1"},
                    {"uid": "1.2.3.4.1.2", "sop_class_uid": "1.2.840.10008.5.1.4.1.1.2", "number": "2"},
                ],
            },
            {
                "uid": "1.2.3.4.2",
                "header": {"Modality": "SR"},
                "instances": [{"uid": "1.2.3.4.2.1", "sop_class_uid": "1.2.840.10008.5.1.4.1.1.88.11"}],
            },
        ],
        **extra,
    }


def test_a_study_summary_maps_to_a_valid_patient_and_imaging_study() -> None:
    bundle = map_study(summary(), CTX)
    assert_valid(bundle)
    patient, study = (e["resource"] for e in bundle["entry"])
    assert patient["identifier"] == [{"system": "urn:hl7v2:authority:HOSP", "value": "PID-42"}]
    assert patient["gender"] == "male" and patient["birthDate"] == "1970-01-31"
    assert [n.get("family") for n in patient["name"]] == ["Yamada", "山田", "やまだ"]
    assert study["started"] == "2026-01-05T10:15:30.25+01:00"
    assert study["numberOfSeries"] == 2 and study["numberOfInstances"] == 3
    assert [m["code"] for m in study["modality"]] == ["CT", "SR"]
    assert study["referrer"] == {"display": "Dr Gregory House"}
    assert study["identifier"][1]["value"] == "ACC1"


def test_ids_are_deterministic_and_the_issuer_scopes_the_patient() -> None:
    a = map_study(summary(), CTX)
    b = map_study(summary(calling_ae="OTHER"), CTX)
    assert a["entry"][0]["resource"]["id"] == b["entry"][0]["resource"]["id"]  # issuer given: AE irrelevant
    no_issuer = summary()
    no_issuer["header"] = {k: v for k, v in HEADER.items() if k != "IssuerOfPatientID"}
    c = map_study(no_issuer, CTX)
    d = map_study({**no_issuer, "calling_ae": "OTHER"}, CTX)
    assert c["entry"][0]["resource"]["id"] != d["entry"][0]["resource"]["id"]  # scoped by the calling AE


@pytest.mark.parametrize(
    ("date", "time", "tz", "expected"),
    [
        ("20260105", "1015", "-0500", "2026-01-05T10:15:00-05:00"),
        ("20260105", "101530", "", "2026-01-05"),  # no offset: the date alone, never a guessed zone
        ("20261305", "101530", "+0000", ""),
        ("", "101530", "+0000", ""),
        ("20260105", "256000", "+0000", "2026-01-05"),
    ],
)
def test_dicom_date_and_time(date: str, time: str, tz: str, expected: str) -> None:
    assert _datetime(date, time, tz) == expected


def test_empty_person_name_groups_give_no_names() -> None:
    assert _human_names("^^^^") == []
    assert _human_names("Wang^XiaoDong=王^小東=")[1]["extension"][0]["valueCode"] == "IDE"


def test_a_summary_without_a_valid_study_uid_is_a_mapping_error() -> None:
    with pytest.raises(MappingError):
        map_study(summary(study_instance_uid="not a uid"), CTX)


def test_an_instance_descriptor_is_unmapped_routed_by_modality_with_a_dedup_key() -> None:
    doc = {
        "format": INSTANCE_FORMAT,
        "sop_instance_uid": "1.2.3.4.1.1",
        "sop_class_uid": "1.2.840.10008.5.1.4.1.1.2",
        "calling_ae": "CT1",
        "called_ae": "GATEWAY",
        "sha256": "ab" * 32,
        "policy": "new",
        "header": HEADER | {"Modality": "CT"},
    }
    prepared = DicomNormaliser().prepare(envelope(doc))
    assert prepared.bundle is None and prepared.message_type == "DICOM^CT"
    assert prepared.control_id == "1.2.3.4.1.1"
    assert prepared.dedup_key == "dicom|1.2.3.4.1.1|" + "ab" * 32
    assert prepared.meta["calling_ae"] == "CT1" and prepared.meta["called_ae"] == "GATEWAY"
    assert prepared.meta["modality"] == "CT"
    for value in ("PID-42", "Yamada", "19700131"):
        assert value not in orjson.dumps(prepared.meta).decode()
    kept = DicomNormaliser().prepare(envelope({**doc, "policy": "kept"}))
    assert kept.message_type == "DICOM-KEPT^CT"
    with pytest.raises(Rejected) as rej:
        DicomNormaliser().prepare(envelope({**doc, "policy": "rejected"}))
    assert rej.value.code is RejectCode.CONFLICT
    with pytest.raises(Rejected) as rej:
        DicomNormaliser().prepare(envelope({**doc, "error": "the dataset is truncated"}))
    assert rej.value.code is RejectCode.UNPARSEABLE


def test_a_study_summary_is_mapped_with_a_content_dedup_key() -> None:
    prepared = DicomNormaliser().prepare(envelope(summary()))
    assert prepared.message_type == "IMAGINGSTUDY^CT" and prepared.bundle is not None
    again = DicomNormaliser().prepare(envelope(summary()))
    changed = DicomNormaliser().prepare(envelope(summary(calling_ae="X")))
    assert prepared.dedup_key == again.dedup_key != changed.dedup_key


@pytest.mark.parametrize("payload", [b"", b"\x00garbage", b"[1,2]", b'{"format": "other"}'])
def test_anything_else_is_quarantined_as_unparseable(payload: bytes) -> None:
    env = envelope({})
    env = Envelope(env.id, env.source, env.kind, env.received_at, payload, env.peer)
    with pytest.raises(Rejected) as rej:
        DicomNormaliser().prepare(env)
    assert rej.value.code is RejectCode.UNPARSEABLE
