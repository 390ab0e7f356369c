"""Coverage-guided fuzzing (atheris, libFuzzer) of what a network peer reaches first: MLLP deframing of a byte
stream split at fuzzer-chosen points, HL7 v2 tokenizing of every frame, and the ACK that answers it.

Run for a bounded time (tests/fuzz/test_atheris.py does this for a few seconds in the test suite):

    .venv/bin/python tests/fuzz/fuzz_mllp.py -max_total_time=300 -rss_limit_mb=2048 -timeout=5 CORPUS_DIR

CORPUS_DIR gets the inputs that found new coverage; seed it with copies of ../shared/corpora/hl7v2/tricky and
fhir-converter/input (libFuzzer writes into it, so not the read-only corpora themselves). A crash leaves
crash-<sha1> in the working directory: a reproducer to add to the tests.
"""

from __future__ import annotations

import contextlib
import sys
from pathlib import Path

import atheris

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

with atheris.instrument_imports(include=["adapters.mllp", "gateway.hl7v2"]):
    from adapters.mllp.framing import Deframer, FrameTooLarge
    from adapters.mllp.source import framing_safe, parse_header
    from gateway.hl7v2.ack import build_ack
    from gateway.hl7v2.parse import HL7ParseError, Message, parse


def touch(msg: Message) -> None:
    """Read every value the mapping could read, so lazy splitting and unescaping run too."""
    _ = (msg.message_type, msg.trigger_event, msg.control_id, msg.version)
    for seg in msg.segments:
        for n in range(1, len(seg) + 1):
            for rep in seg.repetitions(n):
                for c in range(1, len(rep.components()) + 1):
                    rep.subcomponents(c)


def answer(event: bytes | FrameTooLarge) -> None:
    head = event.head if isinstance(event, FrameTooLarge) else event
    header = parse_header(head)
    for code in ("AA", "AR"):
        ack = framing_safe(build_ack(header, code, text="x", error_code="207", control_id="F1", raw_header=head))
        if b"\x1c\r" in ack:
            raise AssertionError("an ACK carries an MLLP end block")
        parsed = parse(ack)  # our own ACK must always be readable
        msa = parsed.first("MSA")
        if msa is None or msa.get(1) != code:
            raise AssertionError("an ACK without its MSA code")
    if isinstance(event, bytes):
        with contextlib.suppress(HL7ParseError):
            touch(parse(event))


def one_input(data: bytes) -> None:
    fdp = atheris.FuzzedDataProvider(data)
    limit = fdp.ConsumeIntInRange(0, 1 << 16)
    cuts = sorted(fdp.ConsumeIntInRange(0, 1 << 16) for _ in range(fdp.ConsumeIntInRange(0, 8)))
    stream = fdp.ConsumeBytes(fdp.remaining_bytes())
    if b"\x0b" not in stream[:1]:
        stream = b"\x0b" + stream + b"\x1c\r"  # most inputs as one frame, so the tokenizer sees them whole
    deframer = Deframer(max_frame_bytes=limit)
    pos = 0
    for cut in [*cuts, len(stream)]:
        cut = min(max(cut, pos), len(stream))
        for event in deframer.feed(stream[pos:cut]):
            answer(event)
        pos = cut
    if deframer.pending > max(limit, 4096) + 1:
        raise AssertionError("the deframer holds more than its limit")


def main() -> None:
    atheris.Setup(sys.argv, one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
