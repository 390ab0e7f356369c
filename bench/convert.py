"""HL7 v2 -> FHIR conversion throughput per core (parse + map, one process, one thread), by message type, over
the FHIR-Converter corpus, plus a synthetic ORU^R01 with 10 OBX and the benchmark ADT; with and without
runtime validation (fhir.resources models, as ``validate_fhir = true`` does).

Targets (issue #3): >= 3,000 ADT/s and >= 1,000 ORU^R01 (10 OBX)/s per core without validation.

    .venv/bin/python bench/convert.py [--quick]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import defaultdict
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.mllp_throughput import ADT  # noqa: E402
from gateway.hl7v2.parse import parse  # noqa: E402
from gateway.normalise import MapContext  # noqa: E402
from gateway.normalise.hl7v2 import MAPPED_EVENTS, map_hl7v2, message_event  # noqa: E402
from gateway.normalise.validate import validate_bundle  # noqa: E402

CORPUS = REPO.parent / "shared" / "corpora" / "hl7v2" / "fhir-converter" / "input"
CTX = MapContext("01900000-0000-7000-8000-000000000001", "bench", datetime(2024, 1, 5, tzinfo=UTC))

ORU_10 = (
    "MSH|^~\\&|LAB|HOSP^1.2.3^ISO|GW|GW|20240105093000+0100||ORU^R01^ORU_R01|C1|P|2.5.1\r"
    "PID|1||77^^^HOSP&1.2.3&ISO^MR||Doe^Jane^A||19700101|F|||1 Main St^^Town^ST^12345\r"
    "PV1|1|O|CLINIC^1^A|||||1234^Smith^John^^^Dr|||||||||||V55^^^HOSP^VN\r"
    "ORC|RE|P1^LIS|F1^LAB\r"
    "OBR|1|P1^LIS|F1^LAB|24323-8^Comprehensive metabolic panel^LN|||20240105080000+0100|||||||||1234^Smith^John"
    "||||||20240105090000+0100|||F\r"
    + "".join(
        f"OBX|{i}|NM|{code}^Analyte {i}^LN|1|{4 + i / 10:.1f}|mmol/L^^UCUM|3.5-5.5|N|||F|||20240105080000+0100\r"
        for i, code in enumerate(
            ["2345-7", "2160-0", "3094-0", "2951-2", "2823-3", "2075-0", "2028-9", "17861-6", "2885-2", "1751-7"], 1
        )
    )
).encode()


def rate(fn: Callable[[], object], seconds: float) -> float:
    """Calls per second, best of three runs of about ``seconds`` / 3 each."""
    best = 0.0
    for _ in range(3):
        n, start = 0, time.perf_counter()
        while (elapsed := time.perf_counter() - start) < seconds / 3:
            for _ in range(20):
                fn()
            n += 20
        best = max(best, n / elapsed)
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="about 0.3 s per measurement instead of 1.5 s")
    ap.add_argument("--targets-only", action="store_true", help="only the two messages of the targets, no corpus")
    ap.add_argument("--json", type=Path, help="also write the results to this file as JSON (for bench/run_all.py)")
    args = ap.parse_args()
    seconds = 0.3 if args.quick else 1.5
    rows = []
    by_type: dict[str, list[bytes]] = defaultdict(list)
    for path in sorted(CORPUS.glob("*.hl7")):
        data = path.read_bytes().replace(b"\r\n", b"\r").replace(b"\n", b"\r")
        event = message_event(parse(data))
        if event in MAPPED_EVENTS:
            by_type[f"{event[0]}^{event[1]}"].append(data)
    cases: list[tuple[str, list[bytes]]] = [("ADT^A01 (bench ADT)", [ADT]), ("ORU^R01 (10 OBX)", [ORU_10])]
    if not args.targets_only:
        cases += sorted(by_type.items())
    print(f"{'message type':<24} {'msgs':>5} {'msg/s':>9} {'msg/s validated':>16}")
    for name, messages in cases:

        def convert(ms: list[bytes] = messages) -> None:
            for m in ms:
                map_hl7v2(parse(m), CTX)

        def convert_validated(ms: list[bytes] = messages) -> None:
            for m in ms:
                b = map_hl7v2(parse(m), CTX)
                if b is not None:
                    validate_bundle(b)

        plain = rate(convert, seconds) * len(messages)
        validated = rate(convert_validated, seconds / 3) * len(messages)
        print(f"{name:<24} {len(messages):>5} {plain:>9.0f} {validated:>16.0f}")
        rows.append({"message_type": name, "messages": len(messages), "rate": plain, "rate_validated": validated})
    adt = rate(lambda: map_hl7v2(parse(ADT), CTX), seconds)
    oru = rate(lambda: map_hl7v2(parse(ORU_10), CTX), seconds)
    print(f"\ntargets: ADT {adt:.0f}/s (>= 3000: {adt / 3000:.2f}x)", end=", ")
    print(f"ORU^R01 10 OBX {oru:.0f}/s (>= 1000: {oru / 1000:.2f}x)")
    if args.json:
        args.json.write_text(json.dumps({"adt_rate": adt, "oru10_rate": oru, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
