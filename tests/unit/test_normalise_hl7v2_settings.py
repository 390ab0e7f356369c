"""The HL7 v2 map's configuration (identifier systems, coding systems, code maps, default zone), the offline
converter `gateway convert`, and field checks for the message types beyond ADT."""

from __future__ import annotations

import base64
import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from gateway.cli import main
from gateway.config import NormaliseConfig
from gateway.errors import ConfigError
from gateway.hl7v2.parse import parse
from gateway.normalise import MapContext
from gateway.normalise.hl7v2 import map_hl7v2
from gateway.normalise.hl7v2.settings import MappedCode, MappingSettings

CTX = MapContext("01900000-0000-7000-8000-000000000001", "mllp-main", datetime(2024, 1, 5, tzinfo=UTC))

ORU = (
    "MSH|^~\\&|LAB|ST MARY|GW|GW|20240105093000||ORU^R01^ORU_R01|C1|P|2.5.1\r"
    "PID|1||77^^^ST MARY^MR||Doe^Jane||19700101|F\r"
    "OBR|1|P1^LIS|F1^LAB|GLU^Glucose^99LAB|||202401050800\r"
    "OBX|1|NM|GLU^Glucose^99LAB|1|5.4|mmol/L|3.9-6.1|N|||F|||202401050800\r"
    "OBX|2|SN|PLT^Platelets^99LAB|1|<^10|10*3/uL||L|||C\r"
    "OBX|3|SN|TIT^Titer^99LAB|1|^1^:^128\r"
    "OBX|4|ST|CMT^Comment^99LAB|1|see note||||||P\r"
    "NTE|1||checked twice\r"
)


def bundle_of(text: str, settings: MappingSettings | None = None) -> dict[str, Any]:
    b = map_hl7v2(parse(text.encode()), CTX, settings) if settings else map_hl7v2(parse(text.encode()), CTX)
    assert b is not None
    return b


def of_type(bundle: dict[str, Any], t: str) -> list[dict[str, Any]]:
    return [e["resource"] for e in bundle["entry"] if e["resource"]["resourceType"] == t]


def test_oru_values_units_ranges_interpretation_status_and_notes() -> None:
    b = bundle_of(ORU)
    report = of_type(b, "DiagnosticReport")[0]
    glu, plt, tit, cmt = of_type(b, "Observation")
    assert report["result"] == [{"reference": f"Observation/{o['id']}"} for o in (glu, plt, tit, cmt)]
    assert glu["valueQuantity"] == {
        "value": 5.4,
        "unit": "mmol/L",
        "system": "http://unitsofmeasure.org",
        "code": "mmol/L",
    }
    assert glu["referenceRange"][0]["low"]["value"] == 3.9 and glu["referenceRange"][0]["high"]["value"] == 6.1
    assert glu["interpretation"][0]["coding"][0]["code"] == "N" and glu["status"] == "final"
    assert plt["valueQuantity"]["comparator"] == "<" and plt["valueQuantity"]["code"] == "10*3/uL"
    assert plt["status"] == "corrected"
    assert tit["valueRatio"] == {"numerator": {"value": 1}, "denominator": {"value": 128}}
    assert cmt["valueString"] == "see note" and cmt["note"] == [{"text": "checked twice"}]
    assert "system" not in glu["code"]["coding"][0]  # a local coding system without configuration: no guess
    # no offset anywhere and no default zone: times are cut to their date
    assert glu["effectiveDateTime"] == "2024-01-05"


def test_configured_tables_apply() -> None:
    settings = MappingSettings(
        identifier_systems={"ST MARY": "https://stmary.example.org/mrn"},
        coding_systems={"99LAB": "https://lab.example.org/codes"},
        code_maps={("99LAB", "GLU"): MappedCode("http://loinc.org", "2345-7", "Glucose")},
        default_timezone="Europe/London",
    )
    b = bundle_of(ORU, settings)
    patient = of_type(b, "Patient")[0]
    assert patient["identifier"][0]["system"] == "https://stmary.example.org/mrn"
    glu = of_type(b, "Observation")[0]
    assert glu["code"]["coding"][0] == {"system": "http://loinc.org", "code": "2345-7", "display": "Glucose"}
    assert glu["code"]["coding"][1]["system"] == "https://lab.example.org/codes"
    assert glu["effectiveDateTime"] == "2024-01-05T08:00:00+00:00"  # January in London


def test_normalise_config_builds_the_settings_and_rejects_a_bad_zone() -> None:
    cfg = NormaliseConfig.model_validate(
        {
            "identifier_systems": {"ST MARY": "https://stmary.example.org/mrn"},
            "code_maps": [
                {"source_system": "99LAB", "code": "GLU", "target_system": "http://loinc.org", "target_code": "2345-7"}
            ],
            "default_timezone": "+01:00",
        }
    )
    s = cfg.mapping_settings()
    assert s.code_maps[("99LAB", "GLU")].code == "2345-7" and s.default_offset("20240105") == "+01:00"
    with pytest.raises(Exception, match="IANA"):
        NormaliseConfig.model_validate({"default_timezone": "Mars/Olympus"})
    with pytest.raises(ConfigError):
        MappingSettings(default_timezone="+25:00")


def test_a40_merge_links_both_patients() -> None:
    text = (
        "MSH|^~\\&|REG|HOSP|GW|GW|20240105093000+0100||ADT^A40^ADT_A39|C9|P|2.5.1\r"
        "EVN|A40|20240105093000+0100\r"
        "PID|1||NEW1^^^HOSP^MR||Doe^Jane\r"
        "MRG|OLD1^^^HOSP^MR\r"
    )
    b = bundle_of(text)
    survivor, old = of_type(b, "Patient")
    assert survivor["link"] == [{"other": {"reference": f"Patient/{old['id']}"}, "type": "replaces"}]
    assert old["link"] == [{"other": {"reference": f"Patient/{survivor['id']}"}, "type": "replaced-by"}]
    assert old["active"] is False


def test_convert_cli_writes_bundles_and_names_the_failure(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    good = tmp_path / "good.hl7"
    good.write_bytes(ORU.replace("\r", "\n").encode())
    bad = tmp_path / "bad.hl7"
    bad.write_bytes(ORU.replace("GLU^Glucose^99LAB|||", "|||").encode())  # OBR-4 empty
    out = tmp_path / "out"
    assert main(["convert", str(good), "--out", str(out)]) == 0
    bundle = json.loads((out / "good.json").read_text())
    assert bundle["type"] == "transaction"
    assert main(["convert", str(good), str(bad), "--ndjson"]) == 1
    captured = capsys.readouterr()
    assert f"{bad}: message 1: OBR (segment 3), OBR-4" in captured.err
    assert len([line for line in captured.out.splitlines() if line.startswith("{")]) == 1


def test_input_realities_bom_lf_latin1_custom_delimiters_and_z_segments() -> None:
    text = (
        "MSH#:~!&#REG#HOSP#GW#GW#20240105093000+0100##ADT:A04:ADT_A01#C2#P#2.5.1####8859/1\n"
        "PID#1##55:::HOSP:MR##M\u00fcller:J\u00fcrgen##19600101#M\n"
        "ZPI#1#anything:at:all\n"
    )
    data = b"\xef\xbb\xbf" + text.encode("latin-1")
    b = map_hl7v2(parse(data), CTX)
    assert b is not None
    patient = of_type(b, "Patient")[0]
    assert patient["name"][0] == {"family": "M\u00fcller", "given": ["J\u00fcrgen"]}
    assert patient["identifier"][0]["value"] == "55"
    assert [e["resource"]["resourceType"] for e in b["entry"]] == ["Patient", "Provenance"]  # the Z-segment: skipped


def test_vxu_immunization_fields() -> None:
    text = (
        "MSH|^~\\&|EHR|CLINIC|IIS|IIS|20240105093000-0500||VXU^V04^VXU_V04|V1|P|2.5.1\r"
        "PID|1||P1^^^CLINIC^MR||Kid^Amy||20200101|F\r"
        "ORC|RE|O1^EHR|IZ-1^CLINIC\r"
        "RXA|0|1|20240105||08^HepB^CVX|0.5|mL^mL^UCUM||00^New record^NIP001|1234^Nurse^Ann|||||LOT1|20250101"
        "|MSK^Merck^MVX|||CP|A\r"
        "RXR|IM^Intramuscular^HL70162|LA^Left arm^HL70163\r"
        "OBX|1|CE|64994-7^Eligibility^LN|1|V02^VFC eligible^HL70064||||||F\r"
    )
    b = bundle_of(text)
    (imm,) = of_type(b, "Immunization")
    assert imm["status"] == "completed" and imm["primarySource"] is True
    assert imm["vaccineCode"]["coding"][0] == {"system": "http://hl7.org/fhir/sid/cvx", "code": "08", "display": "HepB"}
    assert imm["occurrenceDateTime"] == "2024-01-05" and imm["lotNumber"] == "LOT1"
    assert imm["doseQuantity"] == {"value": 0.5, "unit": "mL", "system": "http://unitsofmeasure.org", "code": "mL"}
    assert imm["route"]["coding"][0]["code"] == "IM" and imm["site"]["coding"][0]["code"] == "LA"
    assert imm["manufacturer"]["identifier"] == {"system": "http://hl7.org/fhir/sid/mvx", "value": "MSK"}
    (obs,) = of_type(b, "Observation")
    assert obs["partOf"] == [{"reference": f"Immunization/{imm['id']}"}]


def test_siu_appointment_and_mdm_document() -> None:
    siu = (
        "MSH|^~\\&|SCHED|CLINIC|GW|GW|20240105093000+0100||SIU^S12^SIU_S12|S1|P|2.5.1\r"
        "SCH|A1^SCHED|F1^SCHED|||||CHECKUP^Check-up|ROUTINE^Routine|30|min|^^^20240110100000+0100^20240110103000+0100"
        "|||||||||||||||Booked\r"
        "PID|1||P1^^^CLINIC^MR||Doe^Jane\r"
        "AIP|1||99^Smith^John^^^Dr|D^Doctor\r"
    )
    (appt,) = of_type(bundle_of(siu), "Appointment")
    assert appt["status"] == "booked" and appt["minutesDuration"] == 30
    assert appt["start"] == "2024-01-10T10:00:00+01:00" and appt["end"] == "2024-01-10T10:30:00+01:00"
    assert appt["participant"][0]["actor"]["reference"].startswith("Patient/")
    assert appt["participant"][1]["actor"]["reference"].startswith("Practitioner/")
    mdm = (
        "MSH|^~\\&|DOCS|CLINIC|GW|GW|20240105093000+0100||MDM^T02^MDM_T02|D1|P|2.5.1\r"
        "EVN|T02|20240105093000+0100\r"
        "PID|1||P1^^^CLINIC^MR||Doe^Jane\r"
        "TXA|1|DS^Discharge summary|TX|20240105090000+0100||||||||DOC-1^DOCS|||||AU\r"
        "OBX|1|TX|||Line one\r"
        "OBX|2|TX|||Line two\r"
    )
    (doc,) = of_type(bundle_of(mdm), "DocumentReference")
    assert doc["masterIdentifier"]["value"] == "DOC-1" and doc["docStatus"] == "final"
    assert doc["date"] == "2024-01-05T09:00:00+01:00"
    att = doc["content"][0]["attachment"]
    assert base64.b64decode(att["data"]).decode() == "Line one\nLine two"


def test_with_every_table_configured_the_corpus_still_maps_to_valid_fhir() -> None:
    from tests.unit.test_fhir_validity import assert_valid, mapped_corpus_files, read_message

    settings = MappingSettings(
        identifier_systems={"test": "https://example.org/ids/test", "HOSP": "https://example.org/ids/hosp"},
        coding_systems={"L": "https://example.org/codes/local", "99zzz": "https://example.org/codes/zzz"},
        code_maps={("LN", "8867-4"): MappedCode("http://snomed.info/sct", "364075005", "Heart rate")},
        default_timezone="America/New_York",
    )
    for path in mapped_corpus_files():
        bundle = map_hl7v2(parse(read_message(path)), CTX, settings)
        assert bundle is not None
        assert_valid(bundle)


def test_a17_swap_maps_both_patients_and_visits() -> None:
    text = (
        "MSH|^~\\&|REG|HOSP|GW|GW|20240105093000+0100||ADT^A17^ADT_A17|C5|P|2.5.1\r"
        "EVN|A17|20240105093000+0100\r"
        "PID|1||A1^^^HOSP^MR||One^Ann\r"
        "PV1|1|I|W1^1^A||||||||||||||||V1^^^HOSP^VN\r"
        "PID|2||B2^^^HOSP^MR||Two^Bea\r"
        "PV1|1|I|W1^1^B||||||||||||||||V2^^^HOSP^VN\r"
    )
    b = bundle_of(text)
    patients, encounters = of_type(b, "Patient"), of_type(b, "Encounter")
    assert len(patients) == 2 and len(encounters) == 2
    assert [e["subject"]["reference"] for e in encounters] == [f"Patient/{p['id']}" for p in patients]
    assert [e["location"][0]["location"]["display"] for e in encounters] == ["W1, 1, A", "W1, 1, B"]


def test_a_configured_z_segment_becomes_an_extension_and_others_are_skipped() -> None:
    text = (
        "MSH|^~\\&|REG|HOSP|GW|GW|20240105093000+0100||ADT^A04^ADT_A01|C7|P|2.5.1\r"
        "PID|1||A1^^^HOSP^MR||One^Ann\r"
        "ZPI|1|VIP^Very important|\\T\\ok\r"
        "ZXX|secret\r"
    )
    cfg = NormaliseConfig.model_validate({"z_segments": {"ZPI": "https://example.org/fhir/ext/zpi"}})
    patient = of_type(bundle_of(text, cfg.mapping_settings()), "Patient")[0]
    assert patient["extension"] == [
        {
            "url": "https://example.org/fhir/ext/zpi",
            "extension": [
                {"url": "ZPI.1", "valueString": "1"},
                {"url": "ZPI.2", "valueString": "VIP^Very important"},
                {"url": "ZPI.3", "valueString": "&ok"},
            ],
        }
    ]
    assert "extension" not in of_type(bundle_of(text), "Patient")[0]
    with pytest.raises(Exception, match="not Z-segment names"):
        NormaliseConfig.model_validate({"z_segments": {"PID": "https://example.org/x"}})
