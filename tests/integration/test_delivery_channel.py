"""The socketpair protocol between the daemon and its delivery process, both ends in one test process."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from prometheus_client import REGISTRY

from gateway.contracts import Envelope, InputKind
from gateway.deliveryproc import DeliveryProcess, RemoteOutbox, _recv
from gateway.errors import UnavailableError
from gateway.ids import uuid7
from gateway.journal import Journal, JournalRecord, utcnow
from gateway.rules import LoadedRules, parse_rules

RULES = parse_rules("serial: 1\ndestinations: {}\nroutes: []\n", "rules.yaml")


@pytest.fixture
async def pair(sqlite_url: str) -> AsyncIterator[tuple[Journal, RemoteOutbox, asyncio.StreamWriter]]:
    journal = Journal(sqlite_url)
    await journal.open()
    rules = LoadedRules(RULES, RULES.router(), Path("rules.yaml"), 1, "", "", False, "")
    parent = DeliveryProcess(Path("unused.toml"), journal, rules, config_text="")  # no child is started
    a, b = socket.socketpair()
    p_reader, p_writer = await asyncio.open_connection(sock=a)
    c_reader, c_writer = await asyncio.open_connection(sock=b)
    serving = asyncio.create_task(parent._serve(p_reader, p_writer))
    outbox = RemoteOutbox(c_writer)

    async def child_listen() -> None:
        while (msg := await _recv(c_reader)) is not None:
            if msg.get("t") == "res":
                outbox.resolve(msg)
        outbox.close()

    listening = asyncio.create_task(child_listen())
    try:
        yield journal, outbox, p_writer
    finally:
        c_writer.close()
        p_writer.close()
        for t in (serving, listening):
            t.cancel()
        await asyncio.gather(serving, listening, return_exceptions=True)
        await journal.close()


async def commit(journal: Journal, raw: bytes, fhir: bytes | None) -> str:
    env = Envelope(uuid7(), "t", InputKind.HL7V2, datetime.now(UTC), raw, "127.0.0.1:1")
    await journal.commit(JournalRecord(env, "accepted", destinations=["store"], fhir=fhir))
    return env.id


async def test_claim_carries_every_byte_and_the_bundle(
    pair: tuple[Journal, RemoteOutbox, asyncio.StreamWriter],
) -> None:
    journal, outbox, _ = pair
    raw = bytes(range(256))
    fhir = b'{"resourceType":"Bundle","type":"transaction","entry":[{"resource":{"resourceType":"Patient","id":"p1"}}]}'
    mid = await commit(journal, raw, fhir)
    (item,) = await outbox.claim("store", 10, timedelta(seconds=60))
    assert item.message_id == mid and item.raw == raw and item.kind is InputKind.HL7V2
    assert item.resources == [{"resourceType": "Patient", "id": "p1"}]
    assert await outbox.claim("store", 10, timedelta(seconds=60)) == []  # leased


async def test_done_retry_and_dead_are_recorded_by_the_daemon(
    pair: tuple[Journal, RemoteOutbox, asyncio.StreamWriter],
) -> None:
    journal, outbox, _ = pair
    for _ in range(3):
        await commit(journal, b"MSH|", None)
    a, b, c = await outbox.claim("store", 10, timedelta(seconds=60))
    await outbox.mark_done([a.id])
    await outbox.mark_retry(b.id, "busy", utcnow() - timedelta(seconds=1))
    await outbox.mark_dead(c.id, "refused")
    counts = await journal.counts()
    assert counts["outbox.done"] == 1 and counts["outbox.dead"] == 1 and counts["outbox.pending"] == 1
    (again,) = await outbox.claim("store", 10, timedelta(seconds=60))
    assert again.id == b.id and again.attempts == 1
    assert [d["last_error"] for d in await journal.dead_letters()] == ["refused"]


async def test_delivery_events_are_counted_in_the_daemon(
    pair: tuple[Journal, RemoteOutbox, asyncio.StreamWriter],
) -> None:
    _, outbox, _ = pair
    name = f"dest-{uuid7()[-8:]}"
    from gateway.deliveryproc import _send

    _send(outbox.writer, {"t": "ev", "e": "delivered", "d": name, "v": 7})
    _send(outbox.writer, {"t": "ev", "e": "dead", "d": name, "v": 1})
    for _ in range(100):
        if REGISTRY.get_sample_value("gateway_dead_letters_total", {"destination": name}) == 1.0:
            break
        await asyncio.sleep(0.01)
    assert REGISTRY.get_sample_value("gateway_delivered_total", {"destination": name}) == 7.0
    assert REGISTRY.get_sample_value("gateway_dead_letters_total", {"destination": name}) == 1.0


async def test_requests_fail_as_unavailable_when_the_daemon_is_gone(
    pair: tuple[Journal, RemoteOutbox, asyncio.StreamWriter],
) -> None:
    _, outbox, parent_writer = pair
    parent_writer.close()  # the daemon died
    with pytest.raises(UnavailableError):
        await asyncio.wait_for(outbox.claim("store", 10, timedelta(seconds=60)), 5)


async def test_a_claim_of_large_messages_is_handed_over_in_parts(
    pair: tuple[Journal, RemoteOutbox, asyncio.StreamWriter], monkeypatch: pytest.MonkeyPatch
) -> None:
    import gateway.deliveryproc as dp

    monkeypatch.setattr(dp, "CLAIM_BUDGET", 25_000)
    journal, outbox, _ = pair
    for _ in range(5):
        await commit(journal, b"x" * 10_000, None)
    first = await outbox.claim("store", 10, timedelta(seconds=60))
    second = await outbox.claim("store", 10, timedelta(seconds=60))
    third = await outbox.claim("store", 10, timedelta(seconds=60))
    assert [len(first), len(second), len(third)] == [2, 2, 1]
    assert len({i.id for i in first + second + third}) == 5


async def test_fifo_claims_and_the_age_limit_travel_over_the_channel(
    pair: tuple[Journal, RemoteOutbox, asyncio.StreamWriter],
) -> None:
    journal, outbox, _ = pair
    for _ in range(2):
        env = Envelope(uuid7(), "t", InputKind.HL7V2, datetime.now(UTC), b"MSH|", "127.0.0.1:1")
        await journal.commit(JournalRecord(env, "accepted", destinations=["store"], ordering_key="Patient/p1"))
    (head,) = await outbox.claim("store", 10, timedelta(seconds=60), ordered=True)
    # not past the age limit: a retry, and the follower still waits behind it
    dead = await outbox.mark_retry(head.id, "busy", utcnow(), give_up_before=utcnow() - timedelta(hours=1))
    assert dead is False
    assert [i.id for i in await outbox.claim("store", 10, timedelta(seconds=60), ordered=True)] == [head.id]
    # past it: a dead letter, which lets the follower go
    assert await outbox.mark_retry(head.id, "busy", utcnow(), give_up_before=utcnow() + timedelta(seconds=1))
    (follower,) = await outbox.claim("store", 10, timedelta(seconds=60), ordered=True)
    assert follower.id > head.id
    (letter,) = await journal.dead_letters()
    assert "age limit" in letter["last_error"] and "busy" in letter["last_error"]
