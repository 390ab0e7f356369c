"""The HL7 v2 map over the whole corpora: FHIR-Converter's 139 inputs convert; key facts agree with its expected
bundles (with the deliberate differences listed here and in docs/mapping.md); every tricky input converts or is
rejected with a clear error, in bounded time; no two distinct source entities share an id.

Validity (fhir.resources and the R4 JSON schema, one resource at a time) is tests/unit/test_fhir_validity.py.
"""

from __future__ import annotations

import json
import os
import re
import time
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from gateway.commands.convert import ConversionError, convert_message
from gateway.hl7v2.batch import BatchError, split_messages
from gateway.hl7v2.parse import HL7ParseError, parse
from gateway.normalise import MapContext
from gateway.normalise.hl7v2 import MAPPED_EVENTS, map_hl7v2, message_event

CORPORA = Path(os.environ.get("GATEWAY_CORPORA", Path(__file__).resolve().parents[3] / "shared" / "corpora"))
CONVERTER = CORPORA / "hl7v2" / "fhir-converter"
TRICKY = CORPORA / "hl7v2" / "tricky"
CTX = MapContext("01900000-0000-7000-8000-000000000001", "mllp-main", datetime(2024, 1, 5, tzinfo=UTC))
assert CONVERTER.is_dir() and TRICKY.is_dir(), f"corpora not found under {CORPORA}"

# Resource types whose counts we compare with FHIR-Converter: the ones both sides derive from one segment each.
COUNTED = (
    "Patient",
    "Encounter",
    "Observation",
    "DiagnosticReport",
    "Immunization",
    "Appointment",
    "DocumentReference",
)

# Deliberate differences in counts, by (message type, trigger or "*", resource type), and why (docs/mapping.md).
DIFFERENT_COUNTS: dict[tuple[str, str, str], str] = {
    ("ORU", "*", "Observation"): "FHIR-Converter merges OBX whose generated ids collide; we keep every OBX (>=)",
    ("VXU", "*", "Observation"): "FHIR-Converter merges OBX whose generated ids collide; we keep every OBX (>=)",
    ("ADT", "*", "Observation"): "FHIR-Converter also makes Observations from PRB/GOL/PV2 fields; we map OBX",
    ("ORM", "*", "Observation"): "FHIR-Converter also makes Observations from PRB/GOL fields; we map OBX",
    ("OML", "*", "Observation"): "FHIR-Converter drops or merges OBX of other order groups; we map each OBX",
    ("MDM", "*", "Observation"): "an MDM's text OBX are lines of the document: DocumentReference.content",
    ("MDM", "*", "DiagnosticReport"): "an MDM's OBR is the order the document answers: a ServiceRequest",
    ("SIU", "*", "Observation"): "an SIU's OBX describe the request, not results: not mapped",
    ("ADT", "A40", "Patient"): "A40 is Patient.link replaces / replaced-by (IG), not a Linkage resource",
    ("ORM", "*", "DiagnosticReport"): "an order message's OBR is the order (a ServiceRequest), not a report",
    ("OML", "*", "DiagnosticReport"): "an order message's OBR is the order (a ServiceRequest), not a report",
    ("VXU", "*", "DocumentReference"): "an OBX RP/ED in a VXU is not a document; we keep OBX as Observations",
}
# And in single files: (file, resource type) -> why.
DIFFERENT_IN_FILE: dict[tuple[str, str], str] = {
    ("ORU-R01-01.hl7", "DiagnosticReport"): "FHIR-Converter makes reports for ORC/OBX groups without OBR; a report "
    "needs OBR-4 (its code), so those OBX are Observations of the patient and the ED its presentedForm",
    ("ORU-R01-01.hl7", "DocumentReference"): "a TXA inside an ORU is not mapped (MDM maps TXA)",
}


def read(path: Path) -> bytes:
    return path.read_bytes().replace(b"\r\n", b"\r").replace(b"\n", b"\r")


def inputs() -> list[Path]:
    return sorted((CONVERTER / "input").glob("*.hl7"))


def expected_pairs() -> list[tuple[Path, Path]]:
    """(input, expected bundle) for each mapped input that FHIR-Converter's tests pair with an expectation."""
    pairs = []
    for path in inputs():
        found = list((CONVERTER / "expected").glob(f"*/{path.stem}-expected.json"))
        if found and message_event(parse(read(path))) in MAPPED_EVENTS:
            pairs.append((path, found[0]))
    return pairs


def resources(bundle: dict[str, Any], resource_type: str) -> list[dict[str, Any]]:
    return [e["resource"] for e in bundle.get("entry", []) if e["resource"]["resourceType"] == resource_type]


def utc(value: str | None) -> str | None:
    """A FHIR dateTime as a UTC instant string (FHIR-Converter shifts zones), or the date as it is."""
    if not value or "T" not in value:
        return value
    return datetime.fromisoformat(value.replace("Z", "+00:00")).astimezone(UTC).isoformat()


@pytest.mark.parametrize("path", inputs(), ids=lambda p: p.name)
def test_every_converter_input_converts_or_is_a_type_we_do_not_map(path: Path) -> None:
    msg = parse(read(path))
    bundle = map_hl7v2(msg, CTX)  # MappingError would fail the test
    if message_event(msg) in MAPPED_EVENTS:
        assert bundle is not None and bundle["type"] == "transaction"
        assert resources(bundle, "Provenance"), "every mapped message has its Provenance"
    else:
        assert bundle is None


def test_the_corpus_covers_every_mapped_message_family() -> None:
    families = {message_event(parse(read(p)))[0] for p in inputs() if message_event(parse(read(p))) in MAPPED_EVENTS}
    assert families == {"ADT", "ORU", "ORM", "OML", "VXU", "MDM", "SIU"}
    assert len(expected_pairs()) >= 70


@pytest.mark.parametrize(("path", "expected"), expected_pairs(), ids=lambda p: p.name)
def test_key_facts_agree_with_fhir_converter(path: Path, expected: Path) -> None:
    ours = map_hl7v2(parse(read(path)), CTX)
    assert ours is not None
    theirs = json.loads(expected.read_text(encoding="utf-8"))
    for p_ours, p_theirs in zip(resources(ours, "Patient")[:1], resources(theirs, "Patient")[:1], strict=False):
        # (FHIR-Converter adds identifiers and names from other segments: compare ours, PID-2/3/4 and PID-5.)
        assert {i["value"] for i in p_ours["identifier"]} <= {i["value"] for i in p_theirs.get("identifier", [])}
        if "name" in p_ours:
            assert p_ours["name"][0].get("family") in {n.get("family") for n in p_theirs.get("name", [])}
        assert p_ours.get("birthDate") == p_theirs.get("birthDate")
        assert p_ours.get("gender") == p_theirs.get("gender")
    for e_ours, e_theirs in zip(resources(ours, "Encounter")[:1], resources(theirs, "Encounter")[:1], strict=False):
        if "class" in e_theirs and e_theirs["class"].get("code"):
            assert e_ours["class"]["code"] == e_theirs["class"]["code"]
        for end in ("start", "end"):
            theirs_t = e_theirs.get("period", {}).get(end)
            if theirs_t and "period" in e_ours and end in e_ours["period"]:
                assert utc(e_ours["period"][end]) == utc(theirs_t)
    family, trigger = message_event(parse(read(path)))
    if family in ("ORU", "VXU"):
        mine, other = _observations(ours), _observations(theirs)
        assert not Counter({k[0]: v for k, v in other.items()}) - Counter({k[0]: v for k, v in mine.items()})
        for (obs_code, value, unit), _n in other.items():  # the values both sides give as a Quantity agree
            if value is not None:
                assert (obs_code, value, unit) in mine
    for resource_type in COUNTED:
        n_ours, n_theirs = len(resources(ours, resource_type)), len(resources(theirs, resource_type))
        reason = (
            DIFFERENT_COUNTS.get((family, trigger, resource_type))
            or DIFFERENT_COUNTS.get((family, "*", resource_type))
            or DIFFERENT_IN_FILE.get((path.name, resource_type))
        )
        if reason is not None:
            if "(>=)" in reason:
                assert n_ours >= n_theirs, reason
            continue
        assert n_ours == n_theirs, f"{resource_type}: ours {n_ours}, FHIR-Converter {n_theirs}"


def _type(ident: dict[str, Any]) -> str:
    codings = ident.get("type", {}).get("coding", [])
    return str(codings[0].get("code", "")) if codings else ""


def _observations(bundle: dict[str, Any]) -> Counter[tuple[Any, ...]]:
    """Each Observation's first code, and its value and unit when it is a Quantity."""
    out: Counter[tuple[Any, ...]] = Counter()
    for obs in resources(bundle, "Observation"):
        coding = obs.get("code", {}).get("coding", [{}])[0]
        q = obs.get("valueQuantity", {})
        out[(coding.get("code"), q.get("value"), q.get("unit"))] += 1
    return out


def tricky_files() -> list[Path]:
    return sorted(p for p in TRICKY.iterdir() if p.suffix in (".hl7", ".txt", ".bin"))


@pytest.mark.parametrize("path", tricky_files(), ids=lambda p: p.name)
def test_every_tricky_file_converts_or_is_rejected_clearly_in_bounded_time(path: Path) -> None:
    started = time.perf_counter()
    try:
        messages = split_messages(path.read_bytes())
    except BatchError as exc:
        assert re.search(r"batch|segment|MSH|BHS|FHS", str(exc)), str(exc)
        messages = []
    for message in messages:
        try:
            bundle = convert_message(message)
        except ConversionError as exc:
            # a clear reason: what is wrong and where (segment / field), never a Python repr
            assert re.search(r"MSH|segment|[A-Z][A-Z0-9]{2}-\d+|PID|delimiters|not a message type", str(exc)), str(exc)
            continue
        assert bundle["type"] == "transaction" and bundle["entry"]
    assert time.perf_counter() - started < 5.0, "a tricky input must not hang the converter"


def test_batches_split_into_their_messages() -> None:
    assert len(split_messages(read(TRICKY / "pyhl7_batch_BHS_2msgs_BTS.hl7"))) == 2
    assert len(split_messages(read(TRICKY / "pyhl7_file_FHS_2batches_FTS.hl7"))) >= 2
    for bad in ("pyhl7_BAD_batch_nested_BHS.hl7", "pyhl7_BAD_file_nested_FHS.hl7", "pyhl7_BAD_batch_no_MSH.hl7"):
        with pytest.raises(BatchError):
            split_messages(read(TRICKY / bad))


def _identity(resource: dict[str, Any]) -> tuple[Any, ...]:
    """What makes a resource the same source entity: its identifiers when it has any (the business key),
    else what it is about (code, subject). Values and times may change: a corrected result (LAB-ORU-2 corrects
    LAB-ORU-1) must update the same Observation. Two resources with one id must agree on this."""
    rt = resource["resourceType"]
    if rt == "Provenance":
        return (tuple(t["reference"] for t in resource["target"]),)
    if not resource.get("identifier") and rt in (
        "Observation",
        "AllergyIntolerance",
        "Condition",
        "Immunization",
        "Specimen",
        "RelatedPerson",
    ):
        return (
            json.dumps(resource.get("code") or resource.get("vaccineCode") or resource.get("type"), sort_keys=True),
            json.dumps(resource.get("subject") or resource.get("patient"), sort_keys=True),
            json.dumps(resource.get("name"), sort_keys=True),
        )
    key = resource.get("identifier") or resource.get("masterIdentifier")
    if key:
        first = key[0] if isinstance(key, list) else key
        return (first.get("system"), first["value"])
    return (json.dumps(resource.get("name"), sort_keys=True), json.dumps(resource.get("code"), sort_keys=True))


def test_no_id_collision_across_the_corpus() -> None:
    """Across all mapped corpus messages (and within each bundle, where the bundle would silently keep only the
    first), one id always means one source entity; and every OBX, AL1, RXA, TXA and SCH gives its own
    resource."""
    seen: dict[tuple[str, str], tuple[Any, ...]] = {}
    paths = [p for p in inputs() if message_event(parse(read(p))) in MAPPED_EVENTS]
    for path in paths:
        data = read(path)
        msg = parse(data)
        bundle = map_hl7v2(msg, CTX)
        assert bundle is not None
        in_bundle: dict[tuple[str, str], tuple[Any, ...]] = {}
        for e in bundle["entry"]:
            r = e["resource"]
            key = (r["resourceType"], r["id"])
            identity = _identity(r)
            assert key not in in_bundle, f"{path.name}: {key} twice in one bundle"
            in_bundle[key] = identity
            if r["resourceType"] in ("Patient", "Practitioner", "Organization", "Provenance"):
                continue  # shared across messages by design (the same person, the same sender)
            assert seen.setdefault(key, identity) == identity, f"{path.name}: {key} names two entities"
        family = message_event(msg)[0]
        segments = Counter(s.name for s in msg.segments)
        counts = Counter(e["resource"]["resourceType"] for e in bundle["entry"])
        if family == "ORU":
            coded = sum(1 for s in msg.all("OBX") if s.get(3))
            assert counts["Observation"] == coded, path.name
        if family == "VXU":
            assert counts["Immunization"] == segments["RXA"], path.name
        if family == "SIU":
            assert counts["Appointment"] == segments["SCH"], path.name
        if family == "MDM":
            assert counts["DocumentReference"] == segments["TXA"], path.name
        coded_al1 = sum(1 for s in msg.all("AL1") if s.get(3))
        assert counts["AllergyIntolerance"] == coded_al1, path.name


def test_two_obx_with_the_same_code_and_sub_id_stay_two_observations() -> None:
    base = (
        "MSH|^~\\&|LAB|HOSP|GW|GW|20240105093000+0100||ORU^R01^ORU_R01|C1|P|2.5.1\r"
        "PID|1||77^^^HOSP^MR||Doe^Jane||19700101|F\r"
        "OBR|1|P1^LIS|F1^LAB|24331-1^Lipid panel^LN|||20240105080000\r"
        "OBX|1|NM|2093-3^Cholesterol^LN|1|180|mg/dL^^UCUM|<200|N|||F\r"
        "OBX|2|NM|2093-3^Cholesterol^LN|1|190|mg/dL^^UCUM|<200|N|||F\r"
    )
    bundle = map_hl7v2(parse(base.encode()), CTX)
    assert bundle is not None
    observations = resources(bundle, "Observation")
    assert len({o["id"] for o in observations}) == 2
    again = map_hl7v2(parse(base.encode()), CTX)
    assert again is not None and [o["id"] for o in resources(again, "Observation")] == [o["id"] for o in observations]


_JUNK = [
    "",
    '""',
    "^",
    "&",
    "~",
    "\\",
    "\\X00\\",
    " ",
    "2024",
    "20240230",
    "99999999999999",
    "-1",
    "1e999",
    "<^",
    "^1^:^0",
    "^^^^^^^^^^^^^^^^^^^^",
    "x&1.2.3&ISO",
    "ED^^^Base64^!!notbase64",
    "NM",
    "SN",
    "ED",
    "TM",
    "CWE",
    "2500",
    "D",
]


@pytest.mark.parametrize(
    "name", ["LAB-ORU-1.hl7", "VXU-V04-01.hl7", "SIU-S12-01.hl7", "MDM-T02-01.hl7", "OML-O21-01.hl7", "ADT-A40-02.hl7"]
)
def test_mutated_messages_of_every_family_map_validly_or_raise_mapping_error(name: str) -> None:
    """Seeded mutations of the segments the new maps read: every outcome is a valid bundle or a MappingError
    (never another exception)."""
    import random

    from gateway.normalise import MappingError
    from tests.unit.test_fhir_validity import assert_valid

    base = read(CONVERTER / "input" / name).decode("utf-8").lstrip("\ufeff").split("\r")
    rng = random.Random(name)
    outcomes = Counter[str]()
    for _ in range(40):
        segments = [s.split("|") for s in base if s]
        targets = [s for s in segments if s[0] not in ("MSH",)]
        for _ in range(rng.randint(1, 5)):
            seg = rng.choice(targets)
            field = rng.randint(1, len(seg) + 2)
            while len(seg) <= field:
                seg.append("")
            seg[field] = rng.choice(_JUNK)
        data = "\r".join("|".join(s) for s in segments).encode()
        try:
            msg = parse(data)
        except HL7ParseError:
            outcomes["unparsed"] += 1
            continue
        try:
            bundle = map_hl7v2(msg, CTX)
        except MappingError:
            outcomes["mapping_error"] += 1
            continue
        if bundle is None:
            outcomes["not_mapped"] += 1
            continue
        assert_valid(bundle)
        outcomes["bundle"] += 1
    assert outcomes["bundle"] >= 15, outcomes
