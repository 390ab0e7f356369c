"""HL7 v2 ADT -> FHIR R4 golden cases, field checks and id determinism (gateway.normalise.hl7v2).

Golden files live in tests/unit/golden/hl7v2/. ``UPDATE_GOLDEN=1 pytest tests/unit/test_normalise_hl7v2.py``
rewrites them; review the diff against the v2-to-FHIR IG before committing it.
"""

from __future__ import annotations

import json
import os
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from gateway.hl7v2.parse import parse
from gateway.ids import resource_id
from gateway.normalise import MapContext, MappingError
from gateway.normalise.hl7v2 import MAPPED_EVENTS, map_hl7v2
from gateway.normalise.hl7v2.datatypes import hd_system
from gateway.normalise.hl7v2.dates import offset_of, to_date, to_datetime

CORPORA = Path(os.environ.get("GATEWAY_CORPORA", Path(__file__).resolve().parents[3] / "shared" / "corpora"))
CONVERTER_INPUT = CORPORA / "hl7v2" / "fhir-converter" / "input"
GOLDEN = Path(__file__).parent / "golden" / "hl7v2"
CTX = MapContext(
    message_id="01900000-0000-7000-8000-000000000001",
    source="mllp-main",
    received_at=datetime(2024, 1, 5, 9, 30, tzinfo=UTC),
)

# The corpora are part of the test environment: a missing corpus fails instead of skipping.
assert CONVERTER_INPUT.is_dir(), f"HL7 v2 corpus not found: {CORPORA}"


def corpus_message(name: str) -> bytes:
    return (CONVERTER_INPUT / name).read_bytes().replace(b"\r\n", b"\r").replace(b"\n", b"\r")


def hl7(text: str) -> bytes:
    """A hand-written message: one segment per line, leading whitespace ignored."""
    return "\r".join(line.strip() for line in text.strip().splitlines()).encode()


def segment(name: str, fields: dict[int, str]) -> str:
    """A segment with the given fields (HL7 numbering) and every other field empty."""
    values = [""] * max(fields)
    for n, value in fields.items():
        values[n - 1] = value
    return "|".join([name, *values])


def mapped(data: bytes, ctx: MapContext = CTX) -> dict[str, Any]:
    bundle = map_hl7v2(parse(data), ctx)
    assert bundle is not None
    return bundle


def resources(bundle: dict[str, Any], resource_type: str) -> list[dict[str, Any]]:
    return [e["resource"] for e in bundle["entry"] if e["resource"]["resourceType"] == resource_type]


def one(bundle: dict[str, Any], resource_type: str) -> dict[str, Any]:
    (resource,) = resources(bundle, resource_type)
    return resource


# --- hand-written messages ----------------------------------------------------------------------------------

# ADT^A04 with the v2.5 three-part MSH-9, escapes (\T\ \S\), repetitions, no time zone anywhere (so times are
# cut to dates), the same doctor as attending and admitting, and a doctor known only by name.
ESCAPES_A04 = "\r".join(
    [
        r"MSH|^~\&|REG|ST MARY^1.2.3.4^ISO|GW|GW|20240105093000|SECURITY|ADT^A04^ADT_A01|MSG0001|P|2.5.1",
        r"EVN|A04|20240105093000",
        r"PID|1||555001^^^ST MARY&1.2.3.4&ISO^MR~AB123^^^NHS^NH"
        r"||O\T\Brien^Mary^Ann^^Ms^^L~Smith^Mary^^^^^M||19800229|F"
        r"|||1 Main St\S\Unit 2^^Springfield^IL^62701^USA^H~PO Box 5^^Springfield^IL^62702^USA^M"
        r"||^PRN^PH^^1^217^5551234~^NET^Internet^mary@example.org|^WPN^PH^^^217^5559999^12||S",
        segment(
            "PV1",
            {
                1: "1",
                2: "O",
                3: "CLINIC A^101^1^ST MARY",
                7: "1234^Welby^Marcus^^^Dr^MD^^ST MARY&1.2.3.4&ISO",
                8: "^Kildare^James",
                17: "1234^Welby^Marcus^^^Dr^MD^^ST MARY&1.2.3.4&ISO",
                19: "V5001^^^ST MARY&1.2.3.4&ISO^VN",
                44: "202401050900",
            },
        ),
    ]
).encode()

# ADT^A08 (v2.3, two-part MSH-9) with no PV1: an update of the patient only; MSH-7 carries the sender's
# offset.
UPDATE_NO_PV1 = "\r".join(
    [
        r"MSH|^~\&|REG|ST MARY|GW|GW|20240106101500+0100||ADT^A08|MSG0002|P|2.3",
        r"EVN|A08|20240106101500",
        segment(
            "PID",
            {
                1: "1",
                3: "555001^^^ST MARY&1.2.3.4&ISO^MR",
                5: "O'Brien^Mary^Ann",
                7: "198002291315",
                8: "F",
                11: "2 High St^^Springfield^IL^62701",
                13: "555-1234",
                16: "M",
                24: "Y",
                25: "2",
                29: "20240106",
            },
        ),
    ]
).encode()


@pytest.mark.parametrize(
    ("name", "data"),
    [
        pytest.param("escapes_a04", ESCAPES_A04, id="escapes_a04"),
        pytest.param("update_no_pv1", UPDATE_NO_PV1, id="update_no_pv1"),
    ],
)
def test_hand_written_golden(name: str, data: bytes) -> None:
    assert_golden(name, mapped(data))


GOLDEN_CORPUS = [
    "ADT-A01-01.hl7",  # v2.8, every PID/PV1 field valued
    "ADT-A03-01.hl7",  # discharge: finished, period.end
    "ADT-A04-02.hl7",  # register with a discharge time
    "ADT-A08-01.hl7",  # update
    "ADT01-23.hl7",  # v2.3, MSH-9 without structure
    "ADT04-251.hl7",  # v2.3 ADT^A04, sparse PV1
    "ADT04-28.hl7",  # PID-3 repetitions whose authority is in CX-4 only
]


@pytest.mark.parametrize("name", GOLDEN_CORPUS)
def test_corpus_golden(name: str) -> None:
    assert_golden(name.removesuffix(".hl7"), mapped(corpus_message(name)))


def assert_golden(name: str, bundle: dict[str, Any]) -> None:
    path = GOLDEN / f"{name}.json"
    if os.environ.get("UPDATE_GOLDEN") == "1":
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(bundle, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        return
    assert path.exists(), f"no golden file {path}; run with UPDATE_GOLDEN=1 and review it"
    assert bundle == json.loads(path.read_text(encoding="utf-8"))


# --- field checks -------------------------------------------------------------------------------------------


def test_escapes_repetitions_and_names() -> None:
    bundle = mapped(ESCAPES_A04)
    patient = one(bundle, "Patient")
    assert patient["name"][0] == {
        "use": "official",
        "family": "O&Brien",
        "given": ["Mary", "Ann"],
        "prefix": ["Ms"],
    }
    assert patient["name"][1] == {"use": "maiden", "family": "Smith", "given": ["Mary"]}
    assert patient["gender"] == "female"
    assert patient["birthDate"] == "1980-02-29"
    assert patient["identifier"][0] == {
        "type": {
            "coding": [
                {
                    "system": "http://terminology.hl7.org/CodeSystem/v2-0203",
                    "code": "MR",
                    "display": "Medical record number",
                }
            ]
        },
        "system": "urn:oid:1.2.3.4",
        "value": "555001",
    }
    assert patient["identifier"][1]["system"] == "urn:hl7v2:authority:NHS"
    assert patient["address"][0]["line"] == ["1 Main St^Unit 2"]
    assert patient["address"][0]["use"] == "home"
    assert patient["address"][1]["type"] == "postal"
    assert patient["telecom"] == [
        {"system": "phone", "value": "+1 217 5551234", "use": "home"},
        {"system": "email", "value": "mary@example.org"},
        {"system": "phone", "value": "217 5559999 X12", "use": "work"},
    ]
    assert patient["maritalStatus"]["coding"][0]["code"] == "S"


def test_encounter_class_status_and_participants() -> None:
    bundle = mapped(ESCAPES_A04)
    patient, encounter = one(bundle, "Patient"), one(bundle, "Encounter")
    assert encounter["class"]["code"] == "AMB"
    assert encounter["class"]["system"] == "http://terminology.hl7.org/CodeSystem/v3-ActCode"
    assert encounter["status"] == "in-progress"
    assert encounter["subject"] == {"reference": f"Patient/{patient['id']}"}
    assert encounter["identifier"][0]["value"] == "V5001"
    assert encounter["identifier"][0]["type"]["coding"][0]["code"] == "VN"
    # No offset in the value or in MSH-7: the admit time is cut to its date rather than guessed.
    assert encounter["period"] == {"start": "2024-01-05"}
    assert encounter["location"] == [{"location": {"display": "CLINIC A, 101, 1, ST MARY"}, "status": "active"}]
    types = [p["type"][0]["coding"][0]["code"] for p in encounter["participant"]]
    assert types == ["ATND", "REF", "ADM"]
    practitioners = {p["id"]: p for p in resources(bundle, "Practitioner")}
    # attending and admitting are the same doctor: one Practitioner entry, referenced twice
    assert len(practitioners) == 2
    refs = [p["individual"]["reference"] for p in encounter["participant"]]
    assert refs[0] == refs[2]
    for ref in refs:
        kind, _, pid = ref.partition("/")
        assert kind == "Practitioner" and pid in practitioners
    welby = practitioners[refs[0].partition("/")[2]]
    assert welby["identifier"] == [{"system": "urn:oid:1.2.3.4", "value": "1234"}]
    assert welby["name"] == [{"family": "Welby", "given": ["Marcus"], "prefix": ["Dr"]}]
    assert welby["qualification"] == [{"code": {"coding": [{"code": "MD"}]}}]
    kildare = practitioners[refs[1].partition("/")[2]]
    assert "identifier" not in kildare and kildare["name"] == [{"family": "Kildare", "given": ["James"]}]


def test_bundle_shape() -> None:
    bundle = mapped(ESCAPES_A04)
    assert bundle["resourceType"] == "Bundle" and bundle["type"] == "transaction"
    assert [e["resource"]["resourceType"] for e in bundle["entry"]][:-1] == [
        "Patient",
        "Encounter",
        "Practitioner",
        "Practitioner",
    ]
    full_urls = [e["fullUrl"] for e in bundle["entry"]]
    assert len(set(full_urls)) == len(full_urls)
    for entry in bundle["entry"]:
        res = entry["resource"]
        assert entry["request"] == {"method": "PUT", "url": f"{res['resourceType']}/{res['id']}"}
        assert entry["fullUrl"].startswith("urn:uuid:")
        assert res["meta"] == {"source": "mllp-main#01900000-0000-7000-8000-000000000001"}


def test_update_without_pv1_maps_patient_only() -> None:
    bundle = mapped(UPDATE_NO_PV1)
    assert [e["resource"]["resourceType"] for e in bundle["entry"]][:-1] == ["Patient"]
    patient = one(bundle, "Patient")
    # the birth time has no offset of its own: MSH-7's +01:00 is the sender's local offset
    assert patient["_birthDate"]["extension"][0]["valueDateTime"] == "1980-02-29T13:15:00+01:00"
    assert patient["telecom"] == [{"system": "phone", "value": "555-1234", "use": "home"}]
    assert patient["multipleBirthInteger"] == 2
    assert patient["deceasedDateTime"] == "2024-01-06"


@pytest.mark.parametrize("pv1", ["PV1|1|N", "PV1|1", "PV1"])
def test_placeholder_pv1_gives_no_encounter(pv1: str) -> None:
    data = UPDATE_NO_PV1 + b"\r" + pv1.encode()
    assert [e["resource"]["resourceType"] for e in mapped(data)["entry"]] == ["Patient", "Provenance"]
    with_visit = UPDATE_NO_PV1 + b"\r" + segment("PV1", {1: "1", 2: "N", 19: "V1"}).encode()
    assert one(mapped(with_visit), "Encounter")["class"]["code"] == "N"


def test_corpus_a01_fields() -> None:
    bundle = mapped(corpus_message("ADT-A01-01.hl7"))
    patient, encounter = one(bundle, "Patient"), one(bundle, "Encounter")
    assert patient["name"][0]["family"] == "EVERYMAN"
    assert patient["gender"] == "male"
    # PID-3's MR identifier decides the id; PID-2 comes first in the list (IG order identifier[1..3])
    assert patient["identifier"][1]["system"] == "urn:hl7v2:authority:test1"
    assert patient["identifier"][1]["value"] == "PATID1234"
    assert patient["id"] == resource_id("Patient", "system", "urn:hl7v2:authority:test1", "PATID1234")
    assert patient["birthDate"] == "1988-08-18"
    assert patient["deceasedDateTime"] == "2008-08-25T11:16:30+01:15"
    assert encounter["class"]["code"] == "PRENC"  # PV1-2 P: preadmit
    assert encounter["status"] == "planned"
    assert encounter["period"] == {"start": "2015-02-08T11:34:19+01:10"}
    attending = encounter["participant"][0]
    assert attending["type"][0]["coding"][0]["code"] == "ATND"
    practitioner_ids = [p["id"] for p in resources(bundle, "Practitioner")]
    assert attending["individual"]["reference"].removeprefix("Practitioner/") in practitioner_ids
    assert encounter["subject"]["reference"] == f"Patient/{patient['id']}"


def test_corpus_discharge_is_finished() -> None:
    encounter = one(mapped(corpus_message("ADT-A03-01.hl7")), "Encounter")
    assert encounter["status"] == "finished"
    assert encounter["period"]["end"] == "2015-02-09T11:34:19+01:10"
    # an A04 whose PV1-45 is valued is finished too
    assert one(mapped(corpus_message("ADT-A04-02.hl7")), "Encounter")["status"] == "finished"
    assert one(mapped(corpus_message("ADT04-251.hl7")), "Encounter")["class"]["code"] == "EMER"
    assert one(mapped(corpus_message("ADT01-23.hl7")), "Encounter")["class"]["code"] == "IMP"


# --- events, errors -----------------------------------------------------------------------------------------


def test_mapped_events() -> None:
    adt = {("ADT", f"A{n:02d}") for n in range(1, 14)} | {("ADT", t) for t in ("A17", "A28", "A31", "A40")}
    others = {("ORU", "R01"), ("ORM", "O01"), ("OML", "O21"), ("VXU", "V04"), ("MDM", "T02")}
    assert adt | others | {("SIU", f"S{n}") for n in range(12, 16)} <= MAPPED_EVENTS
    assert ("ADT", "A14") not in MAPPED_EVENTS and ("SIU", "S16") not in MAPPED_EVENTS


@pytest.mark.parametrize("msh9", ["ORU^R02^ORU_R01", "ADT^A14^ADT_A05", "ADT^A41", "ACK", ""])
def test_unmapped_types_give_none(msh9: str) -> None:
    data = ESCAPES_A04.replace(b"ADT^A04^ADT_A01", msh9.encode())
    assert map_hl7v2(parse(data), CTX) is None


def test_trigger_from_evn_when_msh9_has_only_the_type() -> None:
    data = ESCAPES_A04.replace(b"ADT^A04^ADT_A01", b"ADT")
    assert one(mapped(data), "Encounter")["status"] == "in-progress"


def test_adt_without_pid_is_a_mapping_error() -> None:
    data = hl7(r"""
        MSH|^~\&|REG|ST MARY|GW|GW|20240105093000||ADT^A01|MSG0003|P|2.5
        EVN|A01|20240105093000
        PV1|1|I|W1^1^1
    """)
    with pytest.raises(MappingError, match="no PID"):
        map_hl7v2(parse(data), CTX)


def test_pid_without_identifier_is_a_mapping_error() -> None:
    data = hl7(r"""
        MSH|^~\&|REG|ST MARY|GW|GW|20240105093000||ADT^A08|MSG0004|P|2.5
        PID|1||^^^ST MARY^MR||Doe^John
    """)
    with pytest.raises(MappingError, match="no patient identifier") as info:
        map_hl7v2(parse(data), CTX)
    assert "Doe" not in str(info.value)


def test_invalid_dates_are_dropped() -> None:
    data = "\r".join(
        [
            r"MSH|^~\&|REG|ST MARY|GW|GW|20240105093000+0000||ADT^A01|MSG0005|P|2.5",
            segment("PID", {1: "1", 3: "42^^^ST MARY^MR", 5: "Doe^John", 7: "19801345", 8: "X", 29: "2024023012"}),
            segment("PV1", {1: "1", 2: "I", 44: "20240105256000", 45: "2024-01-06"}),
        ]
    ).encode()
    bundle = mapped(data)
    patient, encounter = one(bundle, "Patient"), one(bundle, "Encounter")
    assert "birthDate" not in patient and "gender" not in patient and "deceasedDateTime" not in patient
    assert "period" not in encounter
    assert encounter["status"] == "finished"  # PV1-45 is valued, even if not as a date


# --- dates and systems --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "offset", "expected"),
    [
        ("2024", None, "2024"),
        ("202402", None, "2024-02"),
        ("20240229", None, "2024-02-29"),
        ("2024022913", "+01:00", "2024-02-29T13:00:00+01:00"),
        ("202402291315", None, "2024-02-29"),
        ("20240229131559.1234-0500", None, "2024-02-29T13:15:59.1234-05:00"),
        ("20240229131559+1400", None, "2024-02-29T13:15:59+14:00"),
        ("20240229131559+1401", None, None),
        ("20240229131559+0575", None, None),
        ("20230229", None, None),
        ("20241301", None, None),
        ("00000101", None, None),
        ("2024022925", "+00:00", None),
        ("20240229T1315", None, None),
        ("", None, None),
        ("2024-02-29", None, None),
    ],
)
def test_to_datetime(value: str, offset: str | None, expected: str | None) -> None:
    assert to_datetime(value, offset) == expected


def test_to_date_and_offset() -> None:
    assert to_date("19880818") == "1988-08-18"
    assert to_date("1988081811") == "1988-08-18"
    assert to_date("19880832") is None
    assert offset_of("198908181126+0215") == "+02:15"
    assert offset_of("198908181126") is None


@pytest.mark.parametrize(
    ("hd", "expected"),
    [
        (("", "2.16.840.1.113883.19", "ISO"), "urn:oid:2.16.840.1.113883.19"),
        (("NS", "2.16.840.1.113883.19", "ISO"), "urn:oid:2.16.840.1.113883.19"),
        (("NS", "r2.3", "ISO"), "urn:hl7v2:authority:NS"),  # not an OID: the name
        (("", "r2.3", "ISO"), "urn:hl7v2:authority:r2.3"),
        (("NS", "2.16.1", "HCD"), "urn:hl7v2:authority:NS"),
        (
            ("", "A0B1C2D3-0000-4000-8000-000000000000", "UUID"),
            "urn:uuid:a0b1c2d3-0000-4000-8000-000000000000",
        ),
        (("", "https://id.example.org/mrn", "URI"), "https://id.example.org/mrn"),
        (("ST MARY/EAST", "", ""), "urn:hl7v2:authority:ST%20MARY%2FEAST"),
        (("", "", ""), None),
    ],
)
def test_hd_system(hd: tuple[str, str, str], expected: str | None) -> None:
    assert hd_system(*hd) == expected


# --- determinism --------------------------------------------------------------------------------------------


def ids(bundle: dict[str, Any]) -> list[str]:
    return [e["request"]["url"] for e in bundle["entry"]]


def test_same_message_twice_gives_same_bundle() -> None:
    other_ctx = MapContext("01900000-0000-7000-8000-000000000002", "mllp-main", CTX.received_at)
    first, second = mapped(ESCAPES_A04), mapped(ESCAPES_A04, other_ctx)
    assert ids(first) == ids(second)
    assert [e["fullUrl"] for e in first["entry"]] == [e["fullUrl"] for e in second["entry"]]
    assert mapped(ESCAPES_A04) == first


def test_update_of_same_patient_keeps_ids() -> None:
    a04 = mapped(ESCAPES_A04)
    a08 = mapped(
        ESCAPES_A04.replace(b"ADT^A04^ADT_A01", b"ADT^A08^ADT_A01")
        .replace(b"O\\T\\Brien^Mary", b"Byrne^Mary")
        .replace(b"1 Main St", b"9 Elm St")
    )
    assert one(a08, "Patient")["name"][0]["family"] == "Byrne"
    assert one(a04, "Patient")["id"] == one(a08, "Patient")["id"]
    assert one(a04, "Encounter")["id"] == one(a08, "Encounter")["id"]
    # the v2.3 A08 without PV1 identifies the patient by the same MR
    assert one(mapped(UPDATE_NO_PV1), "Patient")["id"] == one(a04, "Patient")["id"]


def test_different_patients_get_different_ids() -> None:
    base = one(mapped(ESCAPES_A04), "Patient")["id"]
    other_value = one(mapped(ESCAPES_A04.replace(b"555001", b"555002")), "Patient")["id"]
    other_authority = one(mapped(ESCAPES_A04.replace(b"ST MARY&1.2.3.4&ISO^MR", b"ST JUDE&1.2.3.5&ISO^MR")), "Patient")
    assert len({base, other_value, other_authority["id"]}) == 3


def test_identifier_without_authority_is_scoped_by_sending_facility() -> None:
    msg = "\r".join(
        [
            r"MSH|^~\&|REG|FACILITY_A|GW|GW|20240105093000||ADT^A01|MSG0006|P|2.5",
            segment("PID", {1: "1", 3: "1001^^^^MR", 5: "Doe^John"}),
            segment("PV1", {1: "1", 2: "I", 3: "W1^1^1", 44: "20240105"}),
        ]
    ).encode()
    a = mapped(msg)
    b = mapped(msg.replace(b"FACILITY_A", b"FACILITY_B"))
    assert one(a, "Patient")["id"] != one(b, "Patient")["id"]
    assert "system" not in one(a, "Patient")["identifier"][0]
    # no visit number: the Encounter is the patient's visit admitted at that time at that facility
    assert one(a, "Encounter")["id"] != one(b, "Encounter")["id"]
    assert one(mapped(msg), "Encounter")["id"] == one(a, "Encounter")["id"]
    assert one(a, "Encounter")["period"] == {"start": "2024-01-05"}
    later = mapped(msg.replace(b"|20240105", b"|20240107"))
    assert one(later, "Encounter")["id"] != one(a, "Encounter")["id"]
    assert one(later, "Patient")["id"] == one(a, "Patient")["id"]


def test_corpus_update_and_admit_share_the_patient() -> None:
    a01 = mapped(corpus_message("ADT-A01-01.hl7"))
    a08 = mapped(corpus_message("ADT-A08-01.hl7"))
    assert one(a01, "Patient")["id"] == one(a08, "Patient")["id"]
    assert one(a01, "Encounter")["id"] == one(a08, "Encounter")["id"]
    other = mapped(corpus_message("ADT01-23.hl7"))
    assert one(other, "Patient")["id"] != one(a01, "Patient")["id"]
