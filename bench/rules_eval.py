"""Rule evaluation per message: a 50-route rule set, without and with FHIRPath conditions.

What is timed is ``Router.route(envelope, prepared)``, everything the pipeline asks of the rules for one message
(every route's match, destinations, resource-type restrictions, the dedup rule and key), on prepared messages of
the three input kinds: HL7 v2 ADT and ORU mapped by the real normaliser, DICOM instance descriptors and MQTT
sensor readings mapped by theirs. Every message is evaluated against all 50 routes (none has ``stop``), so this
is the worst case for its set.

Figures, per message (median of --repeat runs of --n messages each, in CPU time of this process):
- floor: a 1-route set (the least the pipeline can pay for routing);
- 50 routes, no FHIRPath (target: <= 50 us);
- 50 routes of which --fhirpath carry a FHIRPath condition (compiled once at load, evaluated per message that
  reaches them);
- for scale: normalising the same HL7 messages (the step before routing).

    .venv/bin/python bench/rules_eval.py [--n 20000] [--repeat 5] [--fhirpath 10]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from gateway.contracts import Envelope, InputKind  # noqa: E402
from gateway.normalise import Prepared  # noqa: E402
from gateway.normalise.dicom.normaliser import DicomNormaliser  # noqa: E402
from gateway.normalise.hl7v2.normaliser import Hl7v2Normaliser  # noqa: E402
from gateway.normalise.sensors import SensorNormaliser  # noqa: E402
from gateway.routing import Router  # noqa: E402
from gateway.rules import RuleSet  # noqa: E402

INPUTS = REPO / "rules" / "tests" / "inputs"
CONDITIONS = [
    "Bundle.entry.resource.ofType(Patient).gender = 'female'",
    "Bundle.entry.resource.ofType(Observation).exists()",
    "Bundle.entry.resource.ofType(Encounter).class.code = 'IMP'",
    "Bundle.entry.resource.ofType(Patient).birthDate < @1950-01-01",
    "Bundle.entry.count() > 3",
]


def routes(n: int, fhirpath: int) -> list[dict[str, Any]]:
    """n routes shaped like a site's: per-feed HL7 routes with type globs, DICOM routes by AE and modality, MQTT
    routes by topic, resource-type routes with restrictions; the first ``fhirpath`` get a condition."""
    out: list[dict[str, Any]] = []
    for i in range(n):
        dest = f"d{i % 8}"
        shape = i % 5
        if shape == 0:
            match: dict[str, Any] = {
                "kinds": ["hl7v2"],
                "sources": [f"mllp-{i}", "mllp-ehr"],
                "message_types": ["ADT^A0*"],
            }
        elif shape == 1:
            match = {"message_types": ["ORU^R01", f"Z{i:02d}*"], "resource_types": ["Observation"]}
        elif shape == 2:
            match = {"kinds": ["dicom"], "calling_ae": [f"CT_{i}*", "CT_SCANNER_*"], "modalities": ["CT", "MR"]}
        elif shape == 3:
            match = {"kinds": ["mqtt"], "topics": [f"devices/+/obs{i}", "devices/+/observations"]}
        else:
            match = {"mapped": True, "meta": {"processing_id": ["P"]}, "resource_types": ["Patient", "Device"]}
        route: dict[str, Any] = {"name": f"r{i}", "match": match, "to": [dest]}
        if i % 3 == 0:
            route["resource_types"] = ["Patient", "Observation", "Encounter"]
        if i < fhirpath:
            route["match"] = {**match, "condition": CONDITIONS[i % len(CONDITIONS)]}
        out.append(route)
    return out


def rule_set(n: int, fhirpath: int) -> Router:
    dests = {f"d{i}": {"type": "sql_store", "url": f"sqlite:///d{i}.db"} for i in range(8)}
    dedup = [
        {"name": "hl7", "match": {"kinds": ["hl7v2"]}, "key": "{meta.sending_facility}|{control_id}", "window": "24h"},
        {"name": "dicom", "match": {"kinds": ["dicom"]}, "key": "{control_id}", "window": "30d"},
        {"name": "mqtt", "match": {"kinds": ["mqtt"]}, "key": "{meta.device_id}|{control_id}", "window": "2h"},
    ]
    doc = {"serial": 1, "destinations": dests, "routes": routes(n, fhirpath), "dedup": dedup}
    return RuleSet.model_validate(doc).router()


def envelope(kind: InputKind, payload: bytes, source: str, **meta: str) -> Envelope:
    return Envelope("00000000-0000-7000-8000-000000000000", source, kind, datetime.now(UTC), payload, "b:1", meta)


def messages() -> tuple[list[tuple[Envelope, Prepared]], list[Envelope]]:
    hl7 = [
        envelope(InputKind.HL7V2, (INPUTS / f).read_bytes(), "mllp-ehr")
        for f in ("adt_a04_male.hl7", "adt_a04_female.hl7", "oru_r01.hl7", "adt_a01_test_system.hl7")
    ]
    adt = (REPO / "tests/data/adt_a01.hl7").read_bytes().replace(b"\n", b"\r")
    hl7.append(envelope(InputKind.HL7V2, adt, "mllp-ehr"))
    h = Hl7v2Normaliser()
    out = [(e, h.prepare(e)) for e in hl7]
    dicom = envelope(InputKind.DICOM, (INPUTS / "ct-instance.json").read_bytes(), "dicom-main")
    out.append((dicom, DicomNormaliser().prepare(dicom)))
    for topic in ("devices/pulseox-01/observations", "lab/x/y"):
        m = envelope(InputKind.MQTT, (INPUTS / "pulse-reading.json").read_bytes(), "mqtt-main", topic=topic)
        out.append((m, SensorNormaliser().prepare(m)))
    return out, hl7


def per_message_us(fn: Callable[[], None], n: int, repeat: int) -> float:
    runs = []
    for _ in range(repeat):
        # CPU time of this process: the figure does not depend on what else the machine runs at the moment.
        started = time.process_time()
        fn()
        runs.append((time.process_time() - started) / n * 1e6)
    return statistics.median(runs)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=20_000, help="messages per run")
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--routes", type=int, default=50)
    ap.add_argument("--fhirpath", type=int, default=10, help="routes with a FHIRPath condition in the second set")
    ap.add_argument("--json", type=Path, help="also write the results to this file as JSON (for bench/run_all.py)")
    args = ap.parse_args()

    batch, hl7 = messages()
    work = [batch[i % len(batch)] for i in range(args.n)]

    def timed(router: Router) -> float:
        route = router.route

        def run() -> None:
            for env, prepared in work:
                route(env, prepared)

        run()  # warm up
        return per_message_us(run, args.n, args.repeat)

    floor = timed(rule_set(1, 0))
    plain = timed(rule_set(args.routes, 0))
    with_fp = timed(rule_set(args.routes, args.fhirpath))
    norm = Hl7v2Normaliser()
    hl7_work = [hl7[i % len(hl7)] for i in range(args.n // 10)]
    normalise = per_message_us(lambda: [norm.prepare(e) for e in hl7_work], len(hl7_work), args.repeat)

    decisions = {
        name: rule_set(args.routes, args.fhirpath).route(e, p).routes
        for name, (e, p) in zip("abcdefgh", batch, strict=False)
    }
    print(
        f"python {platform.python_version()} on {platform.machine()}; {args.n} messages x {args.repeat} runs "
        f"(median); {len(batch)} distinct messages of 3 kinds"
    )
    print(f"routes matched per message (FHIRPath set): {[len(v) for v in decisions.values()]}")
    print(f"  1 route (floor)                        {floor:8.2f} us/message")
    print(
        f"  {args.routes} routes, no FHIRPath              {plain:8.2f} us/message  ({plain / floor:.1f}x floor; "
        f"target <= 50 us: {'met' if plain <= 50 else 'NOT met'})"
    )
    print(
        f"  {args.routes} routes, {args.fhirpath} with FHIRPath         {with_fp:8.2f} us/message  "
        f"({with_fp / plain:.1f}x without)"
    )
    print(
        f"  for scale: HL7 v2 normalise            {normalise:8.2f} us/message  "
        f"(rules without FHIRPath: {plain / normalise:.1%} of it)"
    )
    if args.json:
        out = {"routes": args.routes, "fhirpath": args.fhirpath, "floor_us": floor, "plain_us": plain}
        out |= {"fhirpath_us": with_fp, "normalise_us": normalise}
        args.json.write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
