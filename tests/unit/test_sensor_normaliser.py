"""The sensor normaliser: Open mHealth test data (shouldPass -> valid vital-signs Observations, shouldFail ->
Rejected with a reason), the gateway's reading-v1 payload, the hand validator against the JSON Schema file, and
dedup keys. Every bundle is validated with fhir.resources (R4B) and the official R4 JSON schema."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import jsonschema
import orjson
import pytest

from gateway.contracts import Envelope, InputKind, RejectCode
from gateway.normalise import Prepared, Rejected
from gateway.normalise.sensors import SensorNormaliser, schema_text
from tests.unit.test_fhir_validity import CORPORA, assert_valid

OMH = CORPORA / "sensors" / "openmhealth" / "test-data" / "omh"
assert OMH.is_dir(), f"corpus missing: {OMH}"
MDC = "urn:iso:std:iso:11073:10101"
LOINC = "http://loinc.org"
VITALSIGNS = "http://hl7.org/fhir/StructureDefinition/vitalsigns"

# Open mHealth's own shouldPass sample that FHIR cannot take: its time interval ends (2020) before it starts
# (2023), which breaks FHIR's Period invariant per-1. It is quarantined with that reason.
PERIOD_BACKWARDS = "body-temperature/4.0/shouldPass/valid-temperature-with-statistic.json"


def samples(kind: str) -> list[Path]:
    return sorted(OMH.glob(f"*/*/{kind}/*.json"))


def envelope(payload: bytes, topic: str = "devices/d1/observations") -> Envelope:
    return Envelope("0190a000-0000-7000-8000-000000000001", "mqtt-main", InputKind.MQTT, datetime.now(UTC), payload,
                    "127.0.0.1:1883", {"topic": topic})  # fmt: skip


def data_point(path: Path, **extra: Any) -> bytes:
    name, version = path.parts[-4], path.parts[-3]
    doc = {
        "header": {"id": f"dp-{name}-{version}-{path.stem}", "schema_id": {"namespace": "omh", "name": name,
                   "version": version}, "acquisition_provenance": {"source_name": "watch-7"}},
        "body": json.loads(path.read_text()),
        "patient": {"system": "urn:oid:1.2.36.1", "value": "MRN-7"},
        **extra,
    }  # fmt: skip
    return orjson.dumps(doc)


def prepare(payload: bytes) -> Prepared:
    return SensorNormaliser().prepare(envelope(payload))


def observations(p: Prepared) -> list[dict[str, Any]]:
    assert p.bundle is not None
    return [e["resource"] for e in p.bundle["entry"] if e["resource"]["resourceType"] == "Observation"]


def test_the_corpus_has_both_kinds() -> None:
    assert len(samples("shouldPass")) >= 40 and len(samples("shouldFail")) >= 30


@pytest.mark.parametrize("path", samples("shouldPass"), ids=lambda p: "/".join(p.parts[-4:]))
def test_open_mhealth_should_pass_samples_become_valid_vital_signs(path: Path) -> None:
    # OmH 1.x bodies may carry no time; the data point's effective supplies it (the profile needs one).
    payload = data_point(path, effective="2024-01-01T00:00:00Z")
    if "/".join(path.parts[-4:]) == PERIOD_BACKWARDS:
        with pytest.raises(Rejected, match="ends before it starts"):
            prepare(payload)
        return
    p = prepare(payload)
    assert p.bundle is not None
    assert_valid(p.bundle)
    assert p.message_type == "MQTT^omh" and p.meta["device_id"] == "watch-7"
    assert p.dedup_key == f"mqtt|watch-7|dp-{path.parts[-4]}-{path.parts[-3]}-{path.stem}"
    (obs,) = observations(p)
    assert_vital_sign(obs)


@pytest.mark.parametrize("path", samples("shouldFail"), ids=lambda p: "/".join(p.parts[-4:]))
def test_open_mhealth_should_fail_samples_are_rejected_with_a_reason(path: Path) -> None:
    with pytest.raises(Rejected) as info:
        prepare(data_point(path, effective="2024-01-01T00:00:00Z"))
    assert info.value.code is RejectCode.INVALID_PAYLOAD
    assert info.value.reason and info.value.meta["topic"] == "devices/d1/observations"


def assert_vital_sign(obs: dict[str, Any]) -> None:
    """The R4 vital-signs profile's must-haves."""
    assert VITALSIGNS in obs["meta"]["profile"]
    assert obs["status"] == "final"
    assert obs["category"][0]["coding"][0]["code"] == "vital-signs"
    assert any(c["system"] == LOINC for c in obs["code"]["coding"])
    assert obs["subject"]["reference"].startswith("Patient/")
    assert "effectiveDateTime" in obs or "effectivePeriod" in obs
    assert obs["device"]["reference"].startswith("Device/")
    quantities = [obs["valueQuantity"]] if "valueQuantity" in obs else []
    quantities += [c["valueQuantity"] for c in obs.get("component", [])]
    assert quantities and all(q["system"] == "http://unitsofmeasure.org" and q["code"] for q in quantities)


def v1(**over: Any) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "messageId": "m-1",
        "deviceId": "monitor-3",
        "patient": {"system": "urn:oid:1.2.36.1", "value": "MRN-7"},
        "effective": "2024-05-01T10:15:00+02:00",
        "readings": [
            {"code": {"system": MDC, "code": "147842"}, "value": 72, "unit": "/min"},
            {"code": {"system": MDC, "code": "150456"}, "value": 97.5, "unit": "%"},
            {"code": {"system": LOINC, "code": "9279-1"}, "value": 16, "unit": "/min"},
            {"code": {"system": MDC, "code": "150364"}, "value": 37.2, "unit": "Cel",
             "effective": "2024-05-01T10:14:00Z"},
            {"code": {"system": MDC, "code": "150020"}, "components": [
                {"code": {"system": MDC, "code": "150021"}, "value": 120, "unit": "mm[Hg]"},
                {"code": {"system": MDC, "code": "150022"}, "value": 80, "unit": "mm[Hg]"}]},
            {"code": {"system": LOINC, "code": "85354-9"}, "systolic": 118, "diastolic": 79, "mean": 92,
             "unit": "mm[Hg]"},
        ],
    }  # fmt: skip
    doc.update(over)
    return doc


def test_a_reading_v1_payload_maps_every_vital_with_both_codes() -> None:
    p = prepare(orjson.dumps(v1()))
    assert p.bundle is not None
    assert_valid(p.bundle)
    obs = observations(p)
    assert len(obs) == 6
    for o in obs:
        assert_vital_sign(o)
        systems = {c["system"] for c in o["code"]["coding"]}
        assert systems == {LOINC, MDC}
    bp = obs[4]
    assert bp["code"]["coding"][0]["code"] == "85354-9" and "valueQuantity" not in bp
    assert [c["code"]["coding"][0]["code"] for c in bp["component"]] == ["8480-6", "8462-4"]
    assert [c["code"]["coding"][0]["code"] for c in obs[5]["component"]] == ["8480-6", "8462-4", "8478-0"]
    assert obs[3]["effectiveDateTime"] == "2024-05-01T10:14:00Z"
    devices = [e["resource"] for e in p.bundle["entry"] if e["resource"]["resourceType"] == "Device"]
    assert len(devices) == 1 and devices[0]["identifier"] == [{"value": "monitor-3"}]
    assert p.meta == {"topic": "devices/d1/observations", "device_id": "monitor-3", "format": "reading-v1",
                      "message_type": "MQTT^reading-v1", "control_id": "m-1", "readings": "6"}  # fmt: skip
    assert "MRN-7" not in json.dumps(p.meta)


def test_resent_readings_map_to_the_same_ids_and_a_missing_message_id_hashes_the_content() -> None:
    a, b = prepare(orjson.dumps(v1())), prepare(orjson.dumps(v1()))
    assert a.bundle == b.bundle or [e["fullUrl"] for e in a.bundle["entry"]] == [
        e["fullUrl"] for e in b.bundle["entry"]
    ]  # type: ignore[index]
    doc = v1()
    del doc["messageId"]
    k1 = prepare(orjson.dumps(doc)).dedup_key
    assert k1 == prepare(orjson.dumps(doc)).dedup_key and k1 is not None and k1.startswith("mqtt|monitor-3|sha256:")
    doc["readings"][0]["value"] = 73
    assert prepare(orjson.dumps(doc)).dedup_key != k1


@pytest.mark.parametrize(
    ("payload", "code", "reason"),
    [
        (b"\xff\xfe", RejectCode.UNPARSEABLE, "not JSON"),
        (b'{"deviceId": "d", "readings": [{"value": NaN}]}', RejectCode.UNPARSEABLE, "not JSON"),
        (b"[]", RejectCode.INVALID_PAYLOAD, "JSON object"),
        (orjson.dumps(v1(effective="2024-05-01T10:15:00")), RejectCode.INVALID_PAYLOAD, "no time zone"),
        (orjson.dumps(v1(effective="2024-02-30T10:15:00Z")), RejectCode.INVALID_PAYLOAD, "calendar"),
        (orjson.dumps(v1(readings=[{"code": {"system": MDC, "code": "999999"}, "value": 1, "unit": "%"}])),
         RejectCode.UNKNOWN_CODE, "not a supported vital sign"),
        (orjson.dumps(v1(readings=[{"code": {"system": MDC, "code": "150456"}, "value": 97, "unit": "percent"}])),
         RejectCode.INVALID_PAYLOAD, "UCUM"),
        (orjson.dumps(v1(readings=[{"code": {"system": MDC, "code": "150456"}, "value": "97", "unit": "%"}])),
         RejectCode.INVALID_PAYLOAD, "number"),
        (orjson.dumps(v1(patientId="MRN-7")), RejectCode.INVALID_PAYLOAD, "exactly one of patientId and patient"),
    ],
)  # fmt: skip
def test_bad_payloads_are_rejected_with_a_reason_that_holds_no_values(
    payload: bytes, code: RejectCode, reason: str
) -> None:
    with pytest.raises(Rejected) as info:
        prepare(payload)
    assert info.value.code is code and reason in info.value.reason
    assert "MRN-7" not in info.value.reason


def test_a_payload_cut_at_the_size_limit_is_rejected_as_too_large() -> None:
    env = envelope(b"{" * 10)
    env = Envelope(env.id, env.source, env.kind, env.received_at, env.payload, env.peer,
                   {"topic": "t", "truncated_from": "70000"})  # fmt: skip
    with pytest.raises(Rejected) as info:
        SensorNormaliser().prepare(env)
    assert info.value.code is RejectCode.TOO_LARGE and "70000" in info.value.reason


# -- the schema file is the contract: the hand validator must agree with it ------------------------------------

SCHEMA = json.loads(schema_text())
VALID = [
    v1(),
    v1(patient=None) | {"patientId": "P1"},
    {"deviceId": "d", "patientId": "p", "readings": [{"code": {"system": LOINC, "code": "8867-4"}, "value": 60,
                                                       "unit": "/min", "effective": "2024-01-01T00:00:00.123-05:00"}]},
    {"version": 1, "deviceId": "d", "patientId": "p", "effective": "2024-01-01T00:00:00Z",
     "readings": [{"code": {"system": MDC, "code": "150020"}, "systolic": 1, "diastolic": 2, "unit": "mm[Hg]"}]},
]  # fmt: skip
INVALID = [
    {},
    v1(extra=1),
    v1(version=2),
    v1(deviceId=""),
    v1(deviceId="has space"),
    v1(deviceId="x" * 65),
    v1(messageId=7),
    v1(patientId="P1"),
    {k: v for k, v in v1().items() if k != "patient"},
    v1(patient={"system": "urn:x"}),
    v1(effective="2024-05-01 10:15:00Z"),
    v1(effective="2024-05-01T10:15Z"),
    v1(readings=[]),
    v1(readings=[{"code": {"system": "http://snomed.info/sct", "code": "1"}, "value": 1, "unit": "%"}]),
    v1(readings=[{"code": {"system": MDC, "code": "150456"}, "value": 1}]),
    v1(readings=[{"code": {"system": MDC, "code": "150456"}, "value": True, "unit": "%"}]),
    v1(readings=[{"code": {"system": MDC, "code": "150456"}, "value": 1, "unit": "%", "mean": 3}]),
    v1(readings=[{"code": {"system": MDC, "code": "150020"}, "systolic": 1, "unit": "mm[Hg]"}]),
    v1(readings=[{"code": {"system": MDC, "code": "150020"}, "components": [], "unit": "mm[Hg]"}]),
    v1(readings=[{"value": 1, "unit": "%"}]),
    v1(readings=[{"code": {"system": MDC, "code": "150456"}, "value": 1, "unit": "%", "note": "x"}]),
]


def _clean(doc: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in doc.items() if v is not None}


@pytest.mark.parametrize("doc", VALID, ids=range(len(VALID)))
def test_payloads_the_schema_accepts_the_normaliser_accepts(doc: dict[str, Any]) -> None:
    doc = _clean(doc)
    jsonschema.Draft7Validator(SCHEMA).validate(doc)
    prepare(orjson.dumps(doc))


@pytest.mark.parametrize("doc", INVALID, ids=range(len(INVALID)))
def test_payloads_the_schema_refuses_the_normaliser_refuses(doc: dict[str, Any]) -> None:
    doc = _clean(doc)
    assert not jsonschema.Draft7Validator(SCHEMA).is_valid(doc)
    with pytest.raises(Rejected) as info:
        prepare(orjson.dumps(doc))
    assert info.value.code is RejectCode.INVALID_PAYLOAD
