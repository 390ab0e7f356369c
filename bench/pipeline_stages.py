"""Per-message CPU cost of each ingest stage, in microseconds, on corpus messages and the benchmark ADT.

Compares our tokenizer with hl7apy (the floor here is the reference parser the issue measured at about 20 ms),
and shows what runtime FHIR validation with fhir.resources would add.

    .venv/bin/python bench/pipeline_stages.py
"""

from __future__ import annotations

import sys
import timeit
from datetime import UTC, datetime
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.mllp_throughput import ADT  # noqa: E402
from gateway.hl7v2.ack import build_ack  # noqa: E402
from gateway.hl7v2.parse import parse  # noqa: E402
from gateway.normalise import MapContext  # noqa: E402
from gateway.normalise.hl7v2 import map_hl7v2  # noqa: E402
from gateway.normalise.validate import validate_bundle  # noqa: E402

CORPUS = REPO.parent / "shared" / "corpora" / "hl7v2" / "fhir-converter" / "input"


def per_call_us(fn: object, number: int) -> float:
    best = min(timeit.repeat(fn, number=number, repeat=5))  # type: ignore[arg-type]
    return best / number * 1e6


def main() -> None:
    from hl7apy.consts import VALIDATION_LEVEL
    from hl7apy.parser import parse_message

    ctx = MapContext("01a20c21-0000-7000-8000-000000000000", "bench", datetime.now(UTC))
    samples = {"bench ADT^A01": ADT.format(cid="c1", mrn="0000000001").encode()}
    corpus_file = CORPUS / "ADT-A01-01.hl7"
    if corpus_file.exists():
        samples["ADT-A01-01.hl7"] = corpus_file.read_bytes().replace(b"\n", b"\r")
    print(f"{'message':<16} {'bytes':>6} {'parse':>8} {'map':>8} {'validate':>9} {'ack':>7} {'hl7apy':>9}  (us)")
    for name, data in samples.items():
        msg = parse(data)
        bundle = map_hl7v2(msg, ctx)
        assert bundle is not None
        text = data.decode("utf-8-sig")
        t_parse = per_call_us(lambda: parse(data), 2000)  # noqa: B023
        t_map = per_call_us(lambda: map_hl7v2(msg, ctx), 2000)  # noqa: B023
        t_val = per_call_us(lambda: validate_bundle(bundle), 50)  # noqa: B023
        t_ack = per_call_us(lambda: build_ack(msg, "AA", control_id="x"), 2000)  # noqa: B023
        t_ref = per_call_us(
            lambda: parse_message(text, find_groups=False, validation_level=VALIDATION_LEVEL.TOLERANT),  # noqa: B023
            10,
        )
        print(f"{name:<16} {len(data):>6} {t_parse:>8.1f} {t_map:>8.1f} {t_val:>9.1f} {t_ack:>7.1f} {t_ref:>9.1f}")
        print(f"{'':<16} {'':>6} resources in the bundle: {len(bundle['entry'])}")


if __name__ == "__main__":
    main()
