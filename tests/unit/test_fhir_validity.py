"""Every bundle the HL7 v2 mapping produces is valid FHIR: fhir.resources R4B models (each resource by its
model class, and the Bundle), the official R4 JSON schema per resource, and no empty values. The mapping
itself never raises anything but MappingError on any corpus input (HL7ParseError stays the parser's)."""

from __future__ import annotations

import json
import os
import random
from collections.abc import Iterator
from datetime import UTC, datetime
from functools import cache
from pathlib import Path
from typing import Any

import jsonschema
import pytest
from fhir.resources.R4B import get_fhir_model_class
from fhir.resources.R4B.bundle import Bundle

from gateway.hl7v2.parse import HL7ParseError, Message, parse
from gateway.normalise import MapContext, MappingError
from gateway.normalise.hl7v2 import map_hl7v2
from gateway.normalise.validate import validate_bundle

CORPORA = Path(os.environ.get("GATEWAY_CORPORA", Path(__file__).resolve().parents[3] / "shared" / "corpora"))
CONVERTER_INPUT = CORPORA / "hl7v2" / "fhir-converter" / "input"
TRICKY = CORPORA / "hl7v2" / "tricky"
SCHEMA = CORPORA / "fhir-schema" / "fhir.schema.json"
CTX = MapContext("01900000-0000-7000-8000-000000000001", "mllp-main", datetime(2024, 1, 5, tzinfo=UTC))

# The corpora are part of the test environment (../shared/corpora): missing ones are a failure, not a skip.
assert CONVERTER_INPUT.is_dir() and SCHEMA.is_file(), f"corpora not found under {CORPORA}"


def read_message(path: Path) -> bytes:
    return path.read_bytes().replace(b"\r\n", b"\r").replace(b"\n", b"\r")


def try_parse(data: bytes) -> Message | None:
    try:
        return parse(data)
    except HL7ParseError:
        return None


def corpus_files() -> list[Path]:
    return sorted(CONVERTER_INPUT.glob("*.hl7")) if CONVERTER_INPUT.is_dir() else []


def mapped_corpus_files() -> list[Path]:
    """Corpus files whose MSH-9 is a mapped event (decided by the mapping, not the file name)."""
    out = []
    for path in corpus_files():
        msg = try_parse(read_message(path))
        if msg is None:
            continue
        try:
            if map_hl7v2(msg, CTX) is not None:
                out.append(path)
        except MappingError:
            out.append(path)  # a mapped event that fails to map must fail the validity test, not vanish
    return out


def tricky_inputs() -> list[tuple[str, bytes]]:
    """Each tricky file whole, and each MSH-started chunk of it (batches and files hold several messages)."""
    if not TRICKY.is_dir():
        return []
    out = []
    for path in sorted(TRICKY.iterdir()):
        if path.suffix not in (".hl7", ".txt", ".bin"):
            continue
        data = read_message(path)
        out.append((path.name, data))
        chunks = data.split(b"\rMSH")
        if len(chunks) > 1:
            out += [(f"{path.name}#{i}", b"MSH" + c) for i, c in enumerate(chunks[1:], 1)]
    return out


@cache
def schema_definitions() -> dict[str, Any]:
    definitions: dict[str, Any] = json.loads(SCHEMA.read_text(encoding="utf-8"))["definitions"]
    return definitions


@cache
def schema_validator(resource_type: str) -> jsonschema.Draft6Validator:
    """One validator per resource type (building one costs about 0.2 s)."""
    schema = {"$ref": f"#/definitions/{resource_type}", "definitions": schema_definitions()}
    return jsonschema.Draft6Validator(schema)


def empty_values(node: Any, path: str = "") -> Iterator[str]:
    if isinstance(node, dict):
        if not node:
            yield path
        for key, value in node.items():
            yield from empty_values(value, f"{path}.{key}")
    elif isinstance(node, list):
        if not node:
            yield path
        for i, value in enumerate(node):
            yield from empty_values(value, f"{path}[{i}]")
    elif isinstance(node, str) and not node.strip():
        yield path


def assert_valid(bundle: dict[str, Any]) -> None:
    Bundle.model_validate(bundle)
    for entry in bundle["entry"]:
        resource = entry["resource"]
        resource_type = resource["resourceType"]
        get_fhir_model_class(resource_type).model_validate(resource)
        errors = [
            f"{'/'.join(map(str, e.absolute_path))}: {e.message[:200]}"
            for e in schema_validator(resource_type).iter_errors(resource)
        ]
        assert not errors, f"{resource_type} fails the R4 JSON schema: {errors[:5]}"
        assert entry["request"]["url"] == f"{resource_type}/{resource['id']}"
    assert not list(empty_values(bundle)), "FHIR JSON forbids empty strings, arrays and objects"
    full_urls = [e["fullUrl"] for e in bundle["entry"]]
    assert len(full_urls) == len(set(full_urls))
    validate_bundle(bundle)  # the run-time validation mode agrees


@pytest.mark.parametrize("path", mapped_corpus_files(), ids=lambda p: p.name)
def test_mapped_corpus_message_is_valid_fhir(path: Path) -> None:
    msg = parse(read_message(path))
    bundle = map_hl7v2(msg, CTX)
    assert bundle is not None
    assert_valid(bundle)


def test_the_corpus_has_mapped_messages() -> None:
    names = {p.name for p in mapped_corpus_files()}
    assert {"ADT-A01-01.hl7", "ADT-A03-01.hl7", "ADT-A04-01.hl7", "ADT-A08-01.hl7", "ADT01-23.hl7"} <= names
    assert {"ADT-A02-01.hl7", "ADT-A40-01.hl7", "LAB-ORU-1.hl7", "ORM-O01-01.hl7", "OML-O21-01.hl7"} <= names
    assert {"VXU-V04-01.hl7", "MDM-T02-01.hl7", "SIU-S12-01.hl7", "SIU-S15-01.hl7"} <= names
    assert "ADT-A14-01.hl7" not in names and "BAR-P01-01.hl7" not in names


@pytest.mark.parametrize("path", corpus_files(), ids=lambda p: p.name)
def test_corpus_message_maps_or_says_why(path: Path) -> None:
    msg = try_parse(read_message(path))
    if msg is None:
        return
    try:
        bundle = map_hl7v2(msg, CTX)
    except MappingError:
        return
    if bundle is not None:
        assert_valid(bundle)


@pytest.mark.parametrize(("name", "data"), tricky_inputs(), ids=[n for n, _ in tricky_inputs()])
def test_tricky_input_maps_or_says_why(name: str, data: bytes) -> None:
    msg = try_parse(data)
    if msg is None:
        return
    try:
        bundle = map_hl7v2(msg, CTX)
    except MappingError:
        return
    if bundle is not None:
        assert_valid(bundle)


# Values that have broken mappers: delimiters, escapes, explicit nulls, odd whitespace, near-miss dates.
_JUNK = [
    "",
    '""',
    "^",
    "&",
    "~",
    "^^^^^^^^^^^^^^^^^^^^^^^^^^",
    "&&&&",
    "\\",
    "\\X00\\",
    "\\.br\\",
    "\\H\\x\\N\\",
    " ",
    "\x0b",
    "\u00a0x\u00a0",
    "a  b",
    "2024",
    "20240230",
    "2024010112+9999",
    "20240101120000.123456789+0100",
    "99999999999999",
    "-1",
    "0",
    "2147483648",
    "Y",
    "N",
    "P",
    "urn:oid:1.2",
    "1.2.3^^ISO",
    "x&1.2.3&ISO",
    "x&not an oid&ISO",
    "@^NET^Internet^",
    "^^CP^^^^^^^^^^^^^^^^0",
]


def test_mutated_messages_map_validly_or_raise_mapping_error() -> None:
    base = read_message(CONVERTER_INPUT / "ADT-A01-01.hl7").decode("utf-8").split("\r")
    rng = random.Random(20240105)
    outcomes = {"bundle": 0, "mapping_error": 0, "unparsed": 0}
    for _ in range(300):
        segments = [s.split("|") for s in base if s]
        for _ in range(rng.randint(1, 6)):
            seg = rng.choice([s for s in segments if s[0] in ("MSH", "PID", "PV1", "EVN")])
            # in MSH, list index n is MSH-(n+1): mutate MSH-4, MSH-7 and MSH-12 only
            field = rng.choice([3, 6, 11]) if seg[0] == "MSH" else rng.randint(1, len(seg) + 2)
            while len(seg) <= field:
                seg.append("")
            junk = rng.choice(_JUNK)
            if rng.random() < 0.5 and seg[field]:
                parts = seg[field].split("^")
                parts[rng.randrange(len(parts))] = junk
                seg[field] = "^".join(parts)
            else:
                seg[field] = junk
        if rng.random() < 0.1:
            segments = [s for s in segments if s[0] != "PV1"]
        data = "\r".join("|".join(s) for s in segments).encode()
        msg = try_parse(data)
        if msg is None:
            outcomes["unparsed"] += 1
            continue
        try:
            bundle = map_hl7v2(msg, CTX)
        except MappingError:
            outcomes["mapping_error"] += 1
            continue
        assert bundle is not None
        assert_valid(bundle)
        outcomes["bundle"] += 1
    assert outcomes["bundle"] > 200, outcomes  # the mutations must mostly exercise the mapping, not the parser


def test_validate_bundle_names_problems_without_values() -> None:
    bundle = map_hl7v2(parse(read_message(CONVERTER_INPUT / "ADT04-251.hl7")), CTX)
    assert bundle is not None
    patient = bundle["entry"][0]["resource"]
    patient["birthDate"] = "1978-13-01"
    patient["name"][0]["given"] = []
    with pytest.raises(MappingError) as info:
        validate_bundle(bundle)
    reason = str(info.value)
    assert "entry[0].resource(Patient).birthDate" in reason
    assert "name[0].given: empty array" in reason
    assert "1978-13-01" not in reason and "Doe" not in reason
    assert info.value.__cause__ is None and info.value.__context__ is None
