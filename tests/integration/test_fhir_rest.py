"""The FHIR REST sink against a real HTTP FHIR server (aiohttp) with programmable failures, through the real
journal and delivery worker."""

from __future__ import annotations

import random
from collections.abc import AsyncIterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import orjson
import pytest
from sqlalchemy import select

from adapters.fhir_rest.config import FhirRestConfig
from adapters.fhir_rest.sink import FhirRestSink
from gateway.delivery import DeliveryWorker, RetryPolicy
from gateway.journal import Journal, utcnow
from gateway.journal.schema import outbox
from tests.integration.delivery_helpers import FhirReceiver, drain, patient_record

DEST = "ehr"


@pytest.fixture
async def receiver() -> AsyncIterator[FhirReceiver]:
    r = FhirReceiver()
    await r.start()
    yield r
    await r.stop()


@pytest.fixture
async def journal(db_url: str) -> AsyncIterator[Journal]:
    j = Journal(db_url)
    await j.open()
    yield j
    await j.close()


async def make_sink(**cfg: Any) -> FhirRestSink:
    sink = FhirRestConfig.model_validate({"type": "fhir_rest", **cfg}).build(DEST)
    await sink.start()
    return sink


def worker(journal: Journal, sink: FhirRestSink, max_attempts: int = 10) -> DeliveryWorker:
    return DeliveryWorker(journal, sink, RetryPolicy(max_attempts, 0.05, 0.2), batch_size=50, linger=0)


async def items(journal: Journal) -> list[Any]:
    assert journal.db is not None
    return await journal.db.read(lambda c: list(c.execute(select(outbox).order_by(outbox.c.id))))


async def test_a_message_is_posted_as_one_transaction_bundle(journal: Journal, receiver: FhirReceiver) -> None:
    sink = await make_sink(base_url=receiver.url, headers={"X-Site": "north"})
    try:
        await journal.commit(patient_record("p1", 1, (DEST,)))
        await drain(journal, worker(journal, sink))
    finally:
        await sink.close()
    assert receiver.accepted == [("p1", 1)]
    body = receiver.bodies[0]
    assert body["type"] == "transaction"
    assert [e["request"] for e in body["entry"]] == [
        {"method": "PUT", "url": "Patient/p1"},
        {"method": "PUT", "url": "Observation/p1-1"},
    ]
    assert all(e["fullUrl"].startswith("urn:uuid:") for e in body["entry"])
    assert receiver.headers[0]["Content-Type"] == "application/fhir+json"
    assert receiver.headers[0]["X-Site"] == "north"
    assert [r.status for r in await items(journal)] == ["done"]


async def test_put_mode_sends_each_resource_to_its_url(journal: Journal, receiver: FhirReceiver) -> None:
    sink = await make_sink(base_url=receiver.url, mode="put")
    try:
        await journal.commit(patient_record("p1", 1, (DEST,)))
        await drain(journal, worker(journal, sink))
    finally:
        await sink.close()
    assert [b["resourceType"] for b in receiver.bodies] == ["Patient", "Observation"]
    assert receiver.accepted == [("p1", 1)]


@pytest.mark.parametrize("status", ["429", "503"])
async def test_429_and_503_are_retried_no_earlier_than_retry_after(
    journal: Journal, receiver: FhirReceiver, status: str
) -> None:
    receiver.script.extend([status])
    receiver.retry_after = "2"
    sink = await make_sink(base_url=receiver.url)
    w = worker(journal, sink)
    try:
        await journal.commit(patient_record("p1", 1, (DEST,)))
        before = utcnow()
        assert await w.run_once() == 1
        (row,) = await items(journal)
        assert row.status == "pending" and row.attempts == 1
        # the backoff alone would be 0.05-0.2 s; the server asked for 2 s
        assert row.next_attempt_at >= before + timedelta(seconds=1.9)
        assert f"HTTP {status}" in row.last_error
        assert await w.run_once() == 0  # not due yet
        await drain(journal, w)
    finally:
        await sink.close()
    (_, first_at), (second, at) = receiver.requests[0], receiver.requests[1]
    assert second == "ok"
    assert at - first_at >= timedelta(seconds=1.9)
    assert receiver.accepted == [("p1", 1)]


async def test_an_http_date_retry_after_is_honoured(journal: Journal, receiver: FhirReceiver) -> None:
    from email.utils import format_datetime

    from gateway.journal import utcnow as now

    receiver.script.extend(["429"])
    receiver.retry_after = format_datetime(
        (now() + timedelta(seconds=3)).replace(tzinfo=__import__("datetime").UTC), usegmt=True
    )
    sink = await make_sink(base_url=receiver.url)
    try:
        await journal.commit(patient_record("p1", 1, (DEST,)))
        before = now()
        await worker(journal, sink).run_once()
        (row,) = await items(journal)
        assert row.next_attempt_at >= before + timedelta(seconds=1.5)
    finally:
        await sink.close()


@pytest.mark.parametrize("failure", ["500", "slow", "drop", "408"])
async def test_server_errors_timeouts_and_dropped_connections_are_retried(
    journal: Journal, receiver: FhirReceiver, failure: str
) -> None:
    receiver.script.extend([failure, failure])
    receiver.slow_seconds = 1.0
    sink = await make_sink(base_url=receiver.url, timeout_seconds=0.3)
    try:
        await journal.commit(patient_record("p1", 1, (DEST,)))
        await drain(journal, worker(journal, sink))
    finally:
        await sink.close()
    (row,) = await items(journal)
    assert row.status == "done"
    assert row.attempts == 3
    assert [a for a, _ in receiver.requests] == [failure, failure, "ok"]
    assert receiver.accepted == [("p1", 1)]


async def test_a_4xx_is_a_dead_letter_with_the_operation_outcome(journal: Journal, receiver: FhirReceiver) -> None:
    receiver.script.extend(["400"])
    sink = await make_sink(base_url=receiver.url)
    try:
        await journal.commit(patient_record("p1", 1, (DEST,)))
        await drain(journal, worker(journal, sink))
        (row,) = await items(journal)
        assert row.status == "dead"
        assert "HTTP 400" in row.last_error
        assert '"resourceType":"OperationOutcome"' in row.last_error
        assert "Observation.status is required" in row.last_error
        assert len(receiver.requests) == 1  # not retried
        # the fix: the operator retries the dead letter; it is delivered once
        assert await journal.retry_dead([row.id]) == 1
        await drain(journal, worker(journal, sink))
        await drain(journal, worker(journal, sink))
    finally:
        await sink.close()
    assert receiver.accepted == [("p1", 1)]
    assert [r.status for r in await items(journal)] == ["done"]


async def test_a_failing_server_exhausts_bounded_attempts(journal: Journal, receiver: FhirReceiver) -> None:
    receiver.policy = lambda doc: "500"
    sink = await make_sink(base_url=receiver.url)
    try:
        await journal.commit(patient_record("p1", 1, (DEST,)))
        await drain(journal, worker(journal, sink, max_attempts=4))
    finally:
        await sink.close()
    (row,) = await items(journal)
    assert row.status == "dead" and row.attempts == 4
    assert len(receiver.requests) == 4


async def test_no_loss_bounded_retries_and_per_patient_order_under_failures(
    journal: Journal, receiver: FhirReceiver
) -> None:
    rng = random.Random(7)
    receiver.policy = lambda doc: rng.choice(["ok", "ok", "ok", "500", "drop", "503", "slow"])
    receiver.retry_after = "0"
    receiver.slow_seconds = 0.5
    patients = [f"p{i}" for i in range(5)]
    sent: dict[str, list[int]] = {p: [] for p in patients}
    for seq in range(40):
        p = patients[seq % len(patients)] if seq % 3 else patients[0]
        sent[p].append(seq)
        await journal.commit(patient_record(p, seq, (DEST,)))
    sink = await make_sink(base_url=receiver.url, timeout_seconds=0.2, concurrency=4)
    try:
        await drain(journal, worker(journal, sink, max_attempts=50), within=90)
    finally:
        await sink.close()
    rows = await items(journal)
    assert {r.status for r in rows} == {"done"}
    assert len(receiver.requests) == sum(r.attempts for r in rows) <= 40 * 50
    # Every message arrived; each patient's messages were accepted in the order they were committed, although
    # their deliveries failed and were retried (a slow answer may be accepted twice: idempotent PUTs).
    for p in patients:
        got = [seq for q, seq in receiver.accepted if q == p]
        assert sorted(set(got)) == sent[p]
        firsts = list(dict.fromkeys(got))
        assert firsts == sent[p], p


async def test_bearer_token_is_sent(journal: Journal, receiver: FhirReceiver, tmp_path: Path) -> None:
    (tmp_path / "token").write_text("s3cret-token\n")
    sink = await make_sink(base_url=receiver.url, auth={"type": "bearer", "token_file": str(tmp_path / "token")})
    try:
        await journal.commit(patient_record("p1", 1, (DEST,)))
        await drain(journal, worker(journal, sink))
    finally:
        await sink.close()
    assert receiver.headers[0]["Authorization"] == "Bearer s3cret-token"


async def test_client_credentials_token_is_cached_and_renewed_after_401(
    journal: Journal, receiver: FhirReceiver, tmp_path: Path
) -> None:
    (tmp_path / "secret").write_text("client-secret\n")
    receiver.require_token = True
    sink = await make_sink(
        base_url=receiver.url,
        auth={
            "type": "oauth2_client_credentials",
            "token_url": f"http://127.0.0.1:{receiver.port}/token",
            "client_id": "gateway",
            "scope": "system/Patient.cu system/Observation.cu",
            "client_secret_file": str(tmp_path / "secret"),
        },
    )
    w = worker(journal, sink)
    try:
        for seq in range(3):
            await journal.commit(patient_record(f"p{seq}", seq, (DEST,)))
        await drain(journal, w)
        assert receiver.tokens_issued == 1  # one token for three requests
        receiver.valid_tokens.clear()  # revoked: the next request gets 401, the sink fetches a new token
        await journal.commit(patient_record("p9", 9, (DEST,)))
        await drain(journal, w)
    finally:
        await sink.close()
    assert receiver.tokens_issued == 2
    assert receiver.token_forms[0]["grant_type"] == "client_credentials"
    assert receiver.token_forms[0]["basic"] == "gateway:client-secret"
    assert receiver.token_forms[0]["scope"] == "system/Patient.cu system/Observation.cu"
    assert len(receiver.accepted) == 4


@pytest.mark.parametrize("algorithm", ["RS384", "ES384"])
async def test_private_key_jwt_assertion_verifies_with_the_public_key(
    journal: Journal, receiver: FhirReceiver, tmp_path: Path, algorithm: str
) -> None:
    import base64

    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
    from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

    key: Any = (
        rsa.generate_private_key(65537, 2048) if algorithm == "RS384" else ec.generate_private_key(ec.SECP384R1())
    )
    (tmp_path / "key.pem").write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    token_url = f"http://127.0.0.1:{receiver.port}/token"
    sink = await make_sink(
        base_url=receiver.url,
        auth={
            "type": "oauth2_client_credentials",
            "token_url": token_url,
            "client_id": "gw-1",
            "method": "private_key_jwt",
            "private_key": str(tmp_path / "key.pem"),
            "key_id": "k1",
            "algorithm": algorithm,
        },
    )
    try:
        await journal.commit(patient_record("p1", 1, (DEST,)))
        await drain(journal, worker(journal, sink))
    finally:
        await sink.close()
    form = receiver.token_forms[0]
    assert form["client_assertion_type"] == "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"

    def unb64(s: str) -> bytes:
        return base64.urlsafe_b64decode(s + "=" * (-len(s) % 4))

    head, claims, sig = form["client_assertion"].split(".")
    assert orjson.loads(unb64(head)) == {"alg": algorithm, "typ": "JWT", "kid": "k1"}
    c = orjson.loads(unb64(claims))
    assert c["iss"] == c["sub"] == "gw-1" and c["aud"] == token_url and c["exp"] - c["iat"] <= 300
    signed = f"{head}.{claims}".encode()
    raw = unb64(sig)
    if algorithm == "RS384":
        key.public_key().verify(raw, signed, padding.PKCS1v15(), hashes.SHA384())
    else:
        assert len(raw) == 96
        der = encode_dss_signature(int.from_bytes(raw[:48], "big"), int.from_bytes(raw[48:], "big"))
        key.public_key().verify(der, signed, ec.ECDSA(hashes.SHA384()))
    assert receiver.headers[0]["Authorization"] == "Bearer tok1"


async def test_mutual_tls_and_verification_on_by_default(journal: Journal, tmp_path: Path) -> None:
    import ssl

    from tests.pki import make_pki

    pki = make_pki(tmp_path / "pki")
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(pki.p("server.pem"), pki.p("server.key"))
    server_ctx.load_verify_locations(pki.p("ca.pem"))
    server_ctx.verify_mode = ssl.CERT_REQUIRED
    receiver = FhirReceiver()
    await receiver.start(server_ctx)
    url = f"https://localhost:{receiver.port}/fhir"
    try:
        await journal.commit(patient_record("p1", 1, (DEST,)))
        # No CA configured: the test CA is not in the system store, the certificate check fails, nothing is sent.
        unverified = await make_sink(base_url=url)
        try:
            await worker(journal, unverified).run_once()
        finally:
            await unverified.close()
        (row,) = await items(journal)
        assert row.status == "pending" and "certificate" in row.last_error
        assert receiver.requests == []
        sink = await make_sink(
            base_url=url, tls={"ca": pki.p("ca.pem"), "cert": pki.p("client.pem"), "key": pki.p("client.key")}
        )
        try:
            await drain(journal, worker(journal, sink))
        finally:
            await sink.close()
    finally:
        await receiver.stop()
    assert receiver.accepted == [("p1", 1)]
