"""An FHS/BHS batch over a real MLLP socket: each message is submitted on its own, and the answer is an
acknowledgement batch (BHS-12 names the input batch, one ACK per message in order, BTS with the count). A batch
that breaks the structure is journaled whole and answered AR."""

from __future__ import annotations

import asyncio

from adapters.mllp.config import MllpSourceConfig
from adapters.mllp.source import MllpSource
from gateway.contracts import Envelope, Outcome, RejectCode, SubmitResult

START, END = b"\x0b", b"\x1c\r"


def message(control_id: str) -> bytes:
    return (
        f"MSH|^~\\&|SENDAPP|SENDFAC|GW|GWFAC|20240101120000||ADT^A01^ADT_A01|{control_id}|P|2.5.1\r"
        "PID|1||MRN-1^^^HOSP^MR||Doe^John||19800101|M\r"
    ).encode()


class RejectsBad:
    """Delivers every message except one whose control id is BAD (rejected, as a quarantine would be)."""

    def __init__(self) -> None:
        self.seen: list[bytes] = []

    async def submit(self, envelope: Envelope) -> SubmitResult:
        self.seen.append(envelope.payload)
        if b"|BAD|" in envelope.payload:
            return SubmitResult(Outcome.REJECTED, reason="cannot map", code=RejectCode.MAPPING_FAILED)
        if not envelope.payload.startswith(b"MSH"):
            return SubmitResult(Outcome.REJECTED, reason="no MSH", code=RejectCode.NO_HEADER)
        return SubmitResult(Outcome.DELIVERED)


async def exchange(payload: bytes, submitter: RejectsBad) -> bytes:
    source = MllpSource(MllpSourceConfig(type="mllp", name="batch-test", host="127.0.0.1", port=0), submitter)
    await source.start()
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", source.port)
        writer.write(START + payload + END)
        await writer.drain()
        reply = await asyncio.wait_for(reader.readuntil(END), 5.0)
        writer.close()
        await writer.wait_closed()
        return reply[1 : -len(END)]
    finally:
        await source.stop(1.0)


async def test_a_batch_is_split_submitted_per_message_and_answered_with_an_ack_batch() -> None:
    submitter = RejectsBad()
    batch = (
        b"FHS|^~\\&|SENDAPP|SENDFAC|GW|GWFAC|20240101120000||||F-77\r"
        b"BHS|^~\\&|SENDAPP|SENDFAC|GW|GWFAC|20240101120000||||B-42\r"
        + message("M1")
        + message("BAD")
        + message("M3")
        + b"BTS|3\rFTS|1\r"
    )
    reply = await exchange(batch, submitter)
    assert [p.split(b"|")[9] for p in submitter.seen] == [b"M1", b"BAD", b"M3"]  # each alone, in order
    segments = reply.rstrip(b"\r").split(b"\r")
    assert segments[0].startswith(b"FHS|^~\\&|GW|GWFAC|SENDAPP|SENDFAC|")
    assert segments[0].split(b"|")[11] == b"F-77"  # FHS-12: the file it answers
    assert segments[1].startswith(b"BHS|^~\\&|GW|GWFAC|SENDAPP|SENDFAC|")
    assert segments[1].split(b"|")[11] == b"B-42"  # BHS-12: the batch it answers
    msa = [s for s in segments if s.startswith(b"MSA|")]
    assert [m.split(b"|")[1:3] for m in msa] == [[b"AA", b"M1"], [b"AR", b"BAD"], [b"AA", b"M3"]]
    assert segments[-2] == b"BTS|3" and segments[-1] == b"FTS|1"


async def test_a_broken_batch_is_journaled_whole_and_rejected() -> None:
    submitter = RejectsBad()
    nested = b"BHS|^~\\&|A|B\r" + message("M1") + b"BHS|^~\\&|A|B\r" + message("M2") + b"BTS|1\rBTS|1\r"
    reply = await exchange(nested, submitter)
    assert len(submitter.seen) == 1 and submitter.seen[0] == nested
    assert b"MSA|AR" in reply
