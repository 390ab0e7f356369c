"""The MLLP forward sink against a real MLLP receiver (written in the tests) that answers AA, AE, AR, a wrong
MSA-2, late, or nothing, through the real journal and delivery worker."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select

from adapters.mllp.forward import MllpForwardSink, ack_verdict
from adapters.mllp.forward_config import MllpForwardConfig
from gateway.delivery import DeliveryWorker, RetryPolicy
from gateway.errors import PermanentError, TransientError
from gateway.journal import Journal
from gateway.journal.schema import outbox
from tests.integration.delivery_helpers import MllpReceiver, drain, patient_record

DEST = "ehr-mllp"


@pytest.fixture
async def receiver() -> AsyncIterator[MllpReceiver]:
    r = MllpReceiver()
    await r.start()
    yield r
    await r.stop()


@pytest.fixture
async def journal(sqlite_url: str) -> AsyncIterator[Journal]:
    j = Journal(sqlite_url)
    await j.open()
    yield j
    await j.close()


async def make_sink(receiver: MllpReceiver, **cfg: Any) -> MllpForwardSink:
    sink = MllpForwardConfig.model_validate(
        {"type": "mllp_forward", "host": "127.0.0.1", "port": receiver.port, **cfg}
    ).build(DEST)
    await sink.start()
    return sink


def worker(journal: Journal, sink: MllpForwardSink, max_attempts: int = 10) -> DeliveryWorker:
    return DeliveryWorker(journal, sink, RetryPolicy(max_attempts, 0.05, 0.2), batch_size=50, linger=0)


async def rows(journal: Journal) -> list[Any]:
    assert journal.db is not None
    return await journal.db.read(lambda c: list(c.execute(select(outbox).order_by(outbox.c.id))))


async def test_messages_go_one_at_a_time_on_one_connection(journal: Journal, receiver: MllpReceiver) -> None:
    sink = await make_sink(receiver)
    try:
        for seq in range(5):
            await journal.commit(patient_record(f"p{seq}", seq, (DEST,)))
        await drain(journal, worker(journal, sink))
    finally:
        await sink.close()
    assert receiver.accepted == [f"C{seq:05d}p{seq}" for seq in range(5)]
    assert receiver.connections == 1
    assert {r.status for r in await rows(journal)} == {"done"}


async def test_ae_is_retried_and_ar_is_a_dead_letter_with_the_reason(journal: Journal, receiver: MllpReceiver) -> None:
    receiver.script.extend(["AE", "AR", "AA"])  # round 1: p1 AE, p2 AR; round 2: p1 AA
    sink = await make_sink(receiver)
    try:
        await journal.commit(patient_record("p1", 1, (DEST,)))
        await journal.commit(patient_record("p2", 2, (DEST,)))
        await drain(journal, worker(journal, sink))
    finally:
        await sink.close()
    first, second = await rows(journal)
    assert (first.status, first.attempts) == ("done", 2)
    assert second.status == "dead"
    assert "rejected the message (AR)" in second.last_error
    assert "rejected in test" in second.last_error  # ERR-8 kept with the dead letter
    assert receiver.received == ["C00001p1", "C00002p2", "C00001p1"]


async def test_a_wrong_msa2_is_never_credited_and_the_message_is_resent(
    journal: Journal, receiver: MllpReceiver
) -> None:
    receiver.script.extend(["wrong"])
    sink = await make_sink(receiver)
    try:
        await journal.commit(patient_record("p1", 1, (DEST,)))
        await drain(journal, worker(journal, sink))
    finally:
        await sink.close()
    (row,) = await rows(journal)
    assert (row.status, row.attempts) == ("done", 2)
    assert receiver.received == ["C00001p1", "C00001p1"]
    assert receiver.connections == 2  # the connection with the confused answer was closed


@pytest.mark.parametrize("answer", ["none", "late"])
async def test_no_ack_in_time_closes_the_connection_and_retries_without_flooding(
    journal: Journal, receiver: MllpReceiver, answer: str
) -> None:
    receiver.script.extend([answer])
    receiver.late_seconds = 0.6
    sink = await make_sink(receiver, ack_timeout_seconds=0.3)
    try:
        await journal.commit(patient_record("p1", 1, (DEST,)))
        await journal.commit(patient_record("p2", 2, (DEST,)))
        await drain(journal, worker(journal, sink))
    finally:
        await sink.close()
    first, second = await rows(journal)
    assert first.status == second.status == "done"
    assert first.attempts == 2 and second.attempts == 1
    # The late AA for the first message went to a closed connection: it was not taken for the second's.
    assert receiver.received == ["C00001p1", "C00002p2", "C00001p1"]
    assert receiver.connections == 2


async def test_per_patient_order_holds_under_retries(journal: Journal, receiver: MllpReceiver) -> None:
    # The first message of p1 is refused transiently twice; p1's later messages must wait for it, p2's not.
    receiver.script.extend(["AE"])
    sink = await make_sink(receiver)
    try:
        await journal.commit(patient_record("p1", 1, (DEST,)))
        await journal.commit(patient_record("p1", 2, (DEST,)))
        await journal.commit(patient_record("p2", 3, (DEST,)))
        await journal.commit(patient_record("p1", 4, (DEST,)))
        await drain(journal, worker(journal, sink))
    finally:
        await sink.close()
    p1 = [c for c in receiver.accepted if c.endswith("p1")]
    assert p1 == ["C00001p1", "C00002p1", "C00004p1"]
    assert "C00003p2" in receiver.accepted


async def test_an_unreachable_receiver_is_a_transient_error(journal: Journal) -> None:
    receiver = MllpReceiver()
    await receiver.start()
    port = receiver.port
    await receiver.stop()
    sink = MllpForwardConfig(type="mllp_forward", host="127.0.0.1", port=port).build(DEST)
    await sink.start()
    try:
        await journal.commit(patient_record("p1", 1, (DEST,)))
        await worker(journal, sink).run_once()
    finally:
        await sink.close()
    (row,) = await rows(journal)
    assert row.status == "pending" and "cannot connect" in row.last_error


def test_ack_verdicts() -> None:
    def ack(code: str, acked: str) -> bytes:
        return f"MSH|^~\\&|A|B|C|D|20260101||ACK|X|P|2.5\rMSA|{code}|{acked}\r".encode()

    assert ack_verdict("d", "42", ack("AA", "42")) is None
    assert ack_verdict("d", "42", ack("CA", "42")) is None
    assert isinstance(ack_verdict("d", "42", ack("AE", "42")), TransientError)
    assert isinstance(ack_verdict("d", "42", ack("AR", "42")), PermanentError)
    assert isinstance(ack_verdict("d", "42", ack("AA", "41")), TransientError)
    assert isinstance(ack_verdict("d", "42", b"garbage"), TransientError)
    assert isinstance(ack_verdict("d", "42", b"MSH|^~\\&|A\r"), TransientError)


async def test_tls_with_a_client_certificate_and_verification_on(journal: Journal, tmp_path: Path) -> None:
    import ssl

    from tests.pki import make_pki

    pki = make_pki(tmp_path / "pki")
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(pki.p("server.pem"), pki.p("server.key"))
    server_ctx.load_verify_locations(pki.p("ca.pem"))
    server_ctx.verify_mode = ssl.CERT_REQUIRED
    receiver = MllpReceiver()
    await receiver.start(server_ctx)
    try:
        await journal.commit(patient_record("p1", 1, (DEST,)))
        # The server's certificate is checked: against the system store (which lacks the test CA) it fails.
        unverified = await make_sink(receiver, host="localhost", tls={})
        try:
            await worker(journal, unverified).run_once()
        finally:
            await unverified.close()
        (row,) = await rows(journal)
        assert row.status == "pending" and receiver.received == []
        sink = await make_sink(
            receiver,
            host="localhost",
            tls={"ca": pki.p("ca.pem"), "cert": pki.p("client.pem"), "key": pki.p("client.key")},
        )
        try:
            await drain(journal, worker(journal, sink))
        finally:
            await sink.close()
    finally:
        await receiver.stop()
    assert receiver.accepted == ["C00001p1"]
