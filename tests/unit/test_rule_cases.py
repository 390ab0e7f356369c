"""Rule behaviour as data (rules/tests/*.cases.yaml), the committed JSON Schema, and the `gateway rules` commands."""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import pytest
import yaml

from gateway import rulecases, signing
from gateway.cli import main
from gateway.commands.rules import schema, schema_text

REPO = Path(__file__).resolve().parents[2]
CASE_FILES = sorted((REPO / "rules" / "tests").glob("*.cases.yaml"))
CASES = [(f, c) for f in CASE_FILES for c in rulecases.load_cases(f)[1].cases]


def test_there_are_cases_for_every_input_kind() -> None:
    kinds = set()
    for f, c in CASES:
        if c.input.kind:
            kinds.add(c.input.kind)
        elif c.input.file:
            path = f.parent / c.input.file
            kinds.add(rulecases.guess_kind(path, path.read_bytes()).value)
    assert {"hl7v2", "dicom", "mqtt"} <= kinds


@pytest.mark.parametrize(("case_file", "case"), CASES, ids=[f"{f.stem}: {c.name}" for f, c in CASES])
def test_rule_case(case_file: Path, case: rulecases.Case) -> None:
    rules_path, _ = rulecases.load_cases(case_file)
    router = rulecases.load_rules(rules_path).router()
    result, diffs = rulecases.run_case(router, case, case_file.parent)
    assert not diffs, f"{case.name}: {diffs} (got {result.as_dict()})"


def test_a_case_that_expects_something_else_fails(tmp_path: Path) -> None:
    (tmp_path / "c.yaml").write_text(
        yaml.safe_dump(
            {
                "rules": str(REPO / "rules/demo.yaml"),
                "cases": [
                    {"name": "wrong", "input": {"kind": "hl7v2", "mapped": True}, "expect": {"destinations": []}}
                ],
            }
        )
    )
    ((_case, _, diffs),) = rulecases.run_case_file(tmp_path / "c.yaml")
    assert diffs == ["destinations: expected [], got ['store']"]
    assert main(["rules", "test", "--cases", str(tmp_path / "c.yaml")]) == 1


def test_the_committed_schema_is_the_models_schema() -> None:
    committed = (REPO / "rules" / "rules.schema.json").read_text()
    assert committed == schema_text(), "run: gateway rules schema > rules/rules.schema.json"


@pytest.mark.parametrize("path", ["rules/demo.yaml", "rules/examples/hospital.yaml"])
def test_the_shipped_rule_sets_validate_against_the_schema(path: str) -> None:
    jsonschema.validate(yaml.safe_load((REPO / path).read_text()), schema())


def test_the_schema_refuses_what_the_loader_refuses() -> None:
    doc = yaml.safe_load((REPO / "rules/demo.yaml").read_text())
    doc["routes"][0]["match"]["colour"] = "blue"
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(doc, schema())


# -- the commands ----------------------------------------------------------------------------------------------


def test_keygen_sign_verify_encrypt_decrypt(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rules = tmp_path / "rules.yaml"
    rules.write_bytes((REPO / "rules/examples/hospital.yaml").read_bytes())
    assert main(["rules", "keygen", "--key-id", "ops-1", "--out", str(tmp_path / "ops")]) == 0
    assert main(["rules", "sign", "--key", str(tmp_path / "ops.key"), str(rules)]) == 0
    assert (tmp_path / "rules.yaml.sig").read_text().startswith("ed25519-sig ops-1 ")
    assert main(["rules", "verify", str(rules), "--trust", str(tmp_path / "ops.pub")]) == 0
    assert "serial 7, signed by key ops-1" in capsys.readouterr().out

    key = tmp_path / "rules.aes"
    assert main(["keys", "generate", str(key)]) == 0
    assert main(["rules", "encrypt", "--key", str(key), str(rules)]) == 0
    enc = tmp_path / "rules.yaml.enc"
    assert signing.is_encrypted(enc.read_bytes()) and b"pacs.example.org" not in enc.read_bytes()
    args = ["rules", "verify", str(enc), "--trust", str(tmp_path / "ops.pub"), "--decryption-key", str(key)]
    assert main(args) == 0  # rules.yaml.sig, found by dropping .enc, is over the plaintext
    capsys.readouterr()
    assert main(["rules", "decrypt", "--key", str(key), str(enc)]) == 0
    assert capsys.readouterr().out == rules.read_text()

    rules.write_text(rules.read_text().replace("serial: 7", "serial: 8"))
    assert main(["rules", "verify", str(rules), "--trust", str(tmp_path / "ops.pub")]) == 2
    assert "signature check failed" in capsys.readouterr().err


def test_sign_refuses_an_invalid_rule_set(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    signing.keygen("k", tmp_path / "k.key", tmp_path / "k.pub")
    bad = tmp_path / "bad.yaml"
    bad.write_text("serial: 1\ndestinations: {}\nroutes: [{name: r, to: [nowhere]}]\n")
    assert main(["rules", "sign", "--key", str(tmp_path / "k.key"), str(bad)]) == 2
    assert "unknown destination 'nowhere'" in capsys.readouterr().err
    assert not (tmp_path / "bad.yaml.sig").exists()


def test_schema_command_prints_the_schema(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["rules", "schema"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["title"] == "hl7-gateway rule set" and "routes" in doc["properties"]


def test_dry_run_of_messages(capsys: pytest.CaptureFixture[str]) -> None:
    inputs = REPO / "rules/tests/inputs"
    args = ["rules", "test", str(REPO / "rules/examples/hospital.yaml"), str(inputs / "oru_r01.hl7"), "--json"]
    assert main(args) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["routes"] == ["lab-results", "lab-research-copy"]
    assert out["destinations"]["research"] == ["DiagnosticReport", "Observation"]
    assert out["dedup_key"] == "hl7-facility-control-id|HOSP|LAB-0001" and out["dedup_window_seconds"] == 86400
    args = ["rules", "test", str(REPO / "rules/examples/hospital.yaml"), str(inputs / "ct-instance.json")]
    assert main(args) == 0
    text = capsys.readouterr().out
    assert "ct-and-mr-to-archive" in text and "-> pacs" in text


def test_dry_run_of_a_message_that_would_be_quarantined(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "bad.hl7").write_bytes(b"not hl7 at all")
    assert main(["rules", "test", str(REPO / "rules/demo.yaml"), str(tmp_path / "bad.hl7"), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["action"] == "quarantine" and out["reason"].startswith("no-header")


def test_dry_run_maps_with_the_daemon_config_given(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # A condition on an identifier system that only the daemon's [normalise] table produces: without --config the
    # dry run maps as a bare default and the route does not match; with it, as the daemon does, and it matches.
    (tmp_path / "rules.yaml").write_text(
        "serial: 1\n"
        "destinations:\n  store: {type: sql_store, url: 'sqlite:///store.db'}\n"
        "routes:\n"
        "  - name: mrn-from-our-oid\n"
        "    match:\n"
        "      condition: \"Bundle.entry.resource.ofType(Patient).identifier.where(system = 'urn:oid:1.2.3.4')"
        '.exists()"\n'
        "    to: [store]\n"
    )
    (tmp_path / "gateway.toml").write_text(
        'rules = "rules.yaml"\n'
        '[normalise.identifier_systems]\nHOSP = "urn:oid:1.2.3.4"\n'
        '[[sources]]\ntype = "mllp"\nname = "in"\nport = 0\n'
    )
    message = str(REPO / "rules/tests/inputs/oru_r01.hl7")
    assert main(["rules", "test", str(tmp_path / "rules.yaml"), message, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["routes"] == []
    config = str(tmp_path / "gateway.toml")
    assert main(["rules", "test", str(tmp_path / "rules.yaml"), message, "--json", "--config", config]) == 0
    assert json.loads(capsys.readouterr().out)["routes"] == ["mrn-from-our-oid"]
