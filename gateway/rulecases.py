"""Dry runs of a rule set: what it decides for a message, without a daemon, a journal or a network.

``gateway rules test RULES MESSAGE...`` normalises each file as the daemon would (HL7 v2, a DICOM descriptor,
an MQTT sensor payload) and prints the routes that matched, the destinations with the resource types each
would receive, and the dedup key. ``gateway rules test RULES --cases FILE`` runs rule tests written as data
(rules/tests/*.yaml, docs/rules.md): each case gives an input and the decision expected, like Vector's and
Benthos's config unit tests.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

import orjson
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from gateway.contracts import Envelope, InputKind
from gateway.errors import ConfigError
from gateway.normalise import Normaliser, Prepared, Rejected
from gateway.routing import Decision, Router, resource_types_of
from gateway.rules import load_rules, parse_duration


def normalisers(config_path: str | None = None) -> dict[InputKind, Normaliser]:
    """The daemon's normalisers: with ``config_path``, built from that config's ``[normalise]`` settings
    (identifier systems, code maps, time zone, strict mode), so a dry run maps a message as the daemon would."""
    if config_path:
        from gateway.config import load_config
        from gateway.normalisers import build_normalisers

        return build_normalisers(load_config(config_path))
    from gateway.normalise.dicom.normaliser import DicomNormaliser
    from gateway.normalise.hl7v2.normaliser import Hl7v2Normaliser
    from gateway.normalise.sensors import SensorNormaliser

    return {InputKind.HL7V2: Hl7v2Normaliser(), InputKind.DICOM: DicomNormaliser(), InputKind.MQTT: SensorNormaliser()}


def guess_kind(path: Path, data: bytes) -> InputKind:
    """HL7 v2 for anything starting with MSH (or a BOM and MSH); a JSON object with a DICOM descriptor format
    is DICOM; other JSON is an MQTT sensor payload."""
    head = data.lstrip(b"\xef\xbb\xbf").lstrip()
    if head.startswith(b"MSH") or path.suffix.lower() in (".hl7", ".er7"):
        return InputKind.HL7V2
    if head.startswith(b"{"):
        try:
            doc = orjson.loads(data)
        except orjson.JSONDecodeError:
            return InputKind.MQTT
        if isinstance(doc, dict) and str(doc.get("format", "")).startswith("gateway.dicom"):
            return InputKind.DICOM
    return InputKind.MQTT


def envelope(kind: InputKind, source: str, payload: bytes, metadata: dict[str, str] | None = None) -> Envelope:
    if kind is InputKind.HL7V2:
        payload = payload.lstrip(b"\xef\xbb\xbf").replace(b"\r\n", b"\r").replace(b"\n", b"\r")
    return Envelope(
        id="00000000-0000-7000-8000-000000000000",
        source=source,
        kind=kind,
        received_at=datetime.now(UTC),
        payload=payload,
        peer="dry-run",
        metadata=metadata or {},
    )


@dataclass
class DryRun:
    """One message's outcome: the decision, or the quarantine reason from normalising."""

    name: str
    kind: InputKind
    message_type: str = ""
    decision: Decision | None = None
    rejected: str = ""
    resource_types: frozenset[str] = frozenset()
    deliveries: dict[str, list[str]] = field(default_factory=dict)  # destination -> resource types it would get

    def as_dict(self) -> dict[str, Any]:
        d = self.decision
        if d is None:
            return {"input": self.name, "kind": self.kind.value, "action": "quarantine", "reason": self.rejected}
        return {
            "input": self.name,
            "kind": self.kind.value,
            "message_type": self.message_type,
            "action": d.action,
            "routes": list(d.routes),
            "destinations": self.deliveries,
            "reason": d.reason,
            "dedup_key": d.dedup_key,
            "dedup_rule": d.dedup_rule or "(normaliser default)",
            "dedup_window_seconds": d.dedup_window.total_seconds() if d.dedup_window else None,
        }


def decide(router: Router, env: Envelope, prepared: Prepared, name: str) -> DryRun:
    decision = router.route(env, prepared)
    present = resource_types_of(prepared.bundle)
    deliveries = {
        dest: sorted(present & decision.resource_types[dest] if dest in decision.resource_types else present)
        for dest in decision.destinations
    }
    return DryRun(name, env.kind, prepared.message_type, decision, "", present, deliveries)


def dry_run(router: Router, env: Envelope, name: str, by_kind: dict[InputKind, Normaliser] | None = None) -> DryRun:
    normaliser = (by_kind or normalisers())[env.kind]
    try:
        prepared = normaliser.prepare(env)
    except Rejected as rej:
        return DryRun(name, env.kind, rejected=f"{rej.code.value}: {rej.reason}")
    return decide(router, env, prepared, name)


# -- rule tests as data -----------------------------------------------------------------------------------------


class CaseInput(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    file: str | None = Field(None, description="A message file, normalised as the daemon would (relative path).")
    kind: Literal["hl7v2", "dicom", "mqtt"] | None = Field(None, description="Input kind (default: guessed).")
    source: str = Field("test", description="Source name the message arrives on.")
    topic: str = Field("", description="MQTT topic (envelope metadata) for an MQTT file.")
    # Without a file: the normaliser's result, written out (for kinds whose normaliser is elsewhere).
    message_type: str = ""
    control_id: str = ""
    meta: dict[str, str] = Field(default_factory=dict)
    resource_types: tuple[str, ...] = Field((), description="Resource types of the bundle (one resource each).")
    bundle: dict[str, Any] | None = None
    mapped: bool | None = Field(None, description="Without bundle or resource_types: an empty mapped bundle.")
    dedup_key: str | None = Field(None, description="The normaliser's default dedup key.")


class CaseExpect(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    action: Literal["deliver", "drop", "quarantine"] | None = None
    routes: tuple[str, ...] | None = None
    destinations: tuple[str, ...] | None = None
    resource_types: dict[str, tuple[str, ...]] | None = Field(
        None, description="Per destination, the resource types it receives (sorted)."
    )
    dedup_key: str | None = None
    dedup_window: str | float | None = None
    reason_contains: str | None = None


class Case(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    input: CaseInput
    expect: CaseExpect


class CaseFile(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    rules: str = Field(description="The rule set under test, relative to this file.")
    cases: tuple[Case, ...] = Field(min_length=1)


def load_cases(path: Path) -> tuple[Path, CaseFile]:
    try:
        cases = CaseFile.model_validate(yaml.safe_load(path.read_text(encoding="utf-8")))
        return path.parent / cases.rules, cases
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(f"cannot read the rule tests: {exc}", str(path)) from None
    except ValidationError as exc:
        err = exc.errors()[0]
        raise ConfigError(f"{err['msg']} at {'.'.join(map(str, err['loc']))}", str(path)) from None


def run_case(
    router: Router, case: Case, base: Path, by_kind: dict[InputKind, Normaliser] | None = None
) -> tuple[DryRun, list[str]]:
    """The dry run of one case and the differences from what it expects (empty: it passes)."""
    inp = case.input
    if inp.file is not None:
        f = base / inp.file
        data = f.read_bytes()
        kind = InputKind(inp.kind) if inp.kind else guess_kind(f, data)
        env = envelope(kind, inp.source, data, {"topic": inp.topic} if inp.topic else {})
        result = dry_run(router, env, case.name, by_kind)
    else:
        kind = InputKind(inp.kind or "hl7v2")
        bundle = inp.bundle
        if bundle is None and (inp.resource_types or inp.mapped):
            bundle = {
                "resourceType": "Bundle",
                "type": "transaction",
                "entry": [{"resource": {"resourceType": t, "id": f"t{i}"}} for i, t in enumerate(inp.resource_types)],
            }
        meta = dict(inp.meta)
        if inp.topic:
            meta.setdefault("topic", inp.topic)
        prepared = Prepared(inp.message_type, inp.control_id, meta, bundle, inp.dedup_key)
        result = decide(router, envelope(kind, inp.source, b""), prepared, case.name)
    return result, compare(result, case.expect)


def compare(result: DryRun, exp: CaseExpect) -> list[str]:
    got = result.as_dict()
    diffs: list[str] = []

    def check(what: str, want: Any, have: Any) -> None:
        if want is not None and want != have:
            diffs.append(f"{what}: expected {want!r}, got {have!r}")

    check("action", exp.action, got["action"])
    check("routes", list(exp.routes) if exp.routes is not None else None, got.get("routes"))
    have_dests = got.get("destinations") or {}
    check("destinations", list(exp.destinations) if exp.destinations is not None else None, list(have_dests))
    if exp.resource_types is not None:
        for dest, types in exp.resource_types.items():
            check(f"resource types to {dest}", sorted(types), have_dests.get(dest))
    check("dedup_key", exp.dedup_key, got.get("dedup_key"))
    if exp.dedup_window is not None:
        check("dedup window (s)", parse_duration(exp.dedup_window), got.get("dedup_window_seconds"))
    if exp.reason_contains is not None and exp.reason_contains not in str(got.get("reason", "")):
        diffs.append(f"reason: expected it to contain {exp.reason_contains!r}, got {got.get('reason')!r}")
    return diffs


def run_case_file(
    path: Path, by_kind: dict[InputKind, Normaliser] | None = None
) -> list[tuple[Case, DryRun, list[str]]]:
    rules_path, cases = load_cases(path)
    router = load_rules(rules_path).router()
    by_kind = by_kind or normalisers()
    return [(c, *run_case(router, c, path.parent, by_kind)) for c in cases.cases]
