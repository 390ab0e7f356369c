"""The outbox engine on real databases: claims shared by instances, leases taken over after a crash, FIFO per
ordering key, limits by attempts and age, dead letters listed, retried and dropped, retention."""

from __future__ import annotations

import asyncio
import os
from collections import Counter
from collections.abc import AsyncIterator
from datetime import timedelta
from typing import Any

import pytest
from sqlalchemy import select, update

from adapters.fhir_rest.config import FhirRestConfig
from adapters.fhir_rest.sink import FhirRestSink
from gateway.delivery import DeliveryWorker, RetryPolicy
from gateway.journal import Journal, utcnow
from gateway.journal.schema import messages, outbox
from tests.integration.delivery_helpers import FhirReceiver, drain, patient_record

DEST = "ehr"


@pytest.fixture
async def receiver() -> AsyncIterator[FhirReceiver]:
    r = FhirReceiver()
    await r.start()
    yield r
    await r.stop()


async def sink_for(receiver: FhirReceiver, **cfg: Any) -> FhirRestSink:
    sink = FhirRestConfig.model_validate({"type": "fhir_rest", "base_url": receiver.url, **cfg}).build(DEST)
    await sink.start()
    return sink


async def outbox_rows(j: Journal) -> list[Any]:
    assert j.db is not None
    return await j.db.read(lambda c: list(c.execute(select(outbox).order_by(outbox.c.id))))


@pytest.mark.parametrize("ordered", [False, True])
async def test_two_instances_on_one_mariadb_deliver_every_item_exactly_once(
    mariadb_url: str, receiver: FhirReceiver, ordered: bool
) -> None:
    a, b = Journal(mariadb_url), Journal(mariadb_url)
    await a.open()
    await b.open()
    sinks = [await sink_for(receiver, ordered=ordered, concurrency=4, headers={"X-Instance": n}) for n in "ab"]
    try:
        for seq in range(300):
            await (a if seq % 2 else b).commit(patient_record(f"p{seq % 7}", seq, (DEST,)))
        workers = [
            DeliveryWorker(j, s, RetryPolicy(10, 0.05, 0.2), batch_size=20, linger=0, poll_interval=0.05)
            for j, s in zip((a, b), sinks, strict=True)
        ]
        tasks = [asyncio.create_task(w.run()) for w in workers]
        try:
            async with asyncio.timeout(60):
                # Polling the shared database: the two instances' progress has no event to wait on.
                while (await a.counts()).get("outbox.pending"):  # noqa: ASYNC110
                    await asyncio.sleep(0.1)
        finally:
            for w in workers:
                w.stop()
            await asyncio.gather(*tasks)
        rows = await outbox_rows(a)
    finally:
        for s in sinks:
            await s.close()
        await a.close()
        await b.close()
    assert {r.status for r in rows} == {"done"}
    assert all(r.attempts == 1 for r in rows)
    seen = Counter(receiver.accepted)
    assert len(seen) == 300 and set(seen.values()) == {1}
    assert len(receiver.requests) == 300
    by_instance = Counter(h["X-Instance"] for h in receiver.headers)
    if not ordered:
        # Unordered, both instances claim batches side by side. Ordered, with seven patient queues one instance
        # may legitimately hold every queue's head for the whole run, so taking part is not required there.
        assert by_instance["a"] > 0 and by_instance["b"] > 0
    if ordered:
        for p in range(7):
            got = [seq for q, seq in receiver.accepted if q == f"p{p}"]
            assert got == sorted(got)


async def test_a_crashed_instances_claims_are_taken_over_after_the_lease(db_url: str) -> None:
    a, b = Journal(db_url), Journal(db_url)
    await a.open()
    await b.open()
    try:
        for seq in range(3):
            await a.commit(patient_record("p1", seq, (DEST,)))
        claimed = await a.claim(DEST, 10, timedelta(seconds=1))
        assert len(claimed) == 3
        # a dies here without marking anything: until its lease ends nobody else may take the items
        assert await b.claim(DEST, 10, timedelta(seconds=30)) == []
        await asyncio.sleep(1.2)
        taken = await b.claim(DEST, 10, timedelta(seconds=30))
        assert [i.id for i in taken] == [i.id for i in claimed]
    finally:
        await a.close()
        await b.close()


async def test_fifo_claims_hold_a_keys_followers_while_its_head_waits(db_url: str) -> None:
    j = Journal(db_url)
    await j.open()
    try:
        await j.commit(patient_record("p1", 1, (DEST,)))
        await j.commit(patient_record("p1", 2, (DEST,)))
        await j.commit(patient_record("p2", 3, (DEST,)))
        rec = patient_record("x", 4, (DEST,))
        await j.commit(type(rec)(**{**{f: getattr(rec, f) for f in rec.__dataclass_fields__}, "ordering_key": ""}))
        first = await j.claim(DEST, 10, timedelta(seconds=30), ordered=True)
        assert [(i.ordering_key, i.attempts) for i in first] == [("Patient/p1", 0), ("Patient/p2", 0), ("", 0)]
        head = first[0]
        # the head fails and waits for its retry: its follower must not overtake it
        await j.mark_retry(head.id, "HTTP 500", utcnow() + timedelta(seconds=1))
        await j.mark_done([first[1].id, first[2].id])
        assert await j.claim(DEST, 10, timedelta(seconds=30), ordered=True) == []
        await asyncio.sleep(1.1)
        again = await j.claim(DEST, 10, timedelta(seconds=30), ordered=True)
        assert [i.id for i in again] == [head.id]
        await j.mark_done([head.id])
        follower = await j.claim(DEST, 10, timedelta(seconds=30), ordered=True)
        assert [i.ordering_key for i in follower] == ["Patient/p1"] and follower[0].id > head.id
        # unordered claims take everything due, follower or not
        await j.release([follower[0].id])
        assert len(await j.claim(DEST, 10, timedelta(seconds=30))) == 1
    finally:
        await j.close()


async def test_a_dead_head_lets_its_followers_go(sqlite_url: str) -> None:
    j = Journal(sqlite_url)
    await j.open()
    try:
        await j.commit(patient_record("p1", 1, (DEST,)))
        await j.commit(patient_record("p1", 2, (DEST,)))
        (head,) = await j.claim(DEST, 10, timedelta(seconds=30), ordered=True)
        await j.mark_dead(head.id, "HTTP 400")
        (nxt,) = await j.claim(DEST, 10, timedelta(seconds=30), ordered=True)
        assert nxt.id > head.id
    finally:
        await j.close()


async def test_an_item_past_the_age_limit_is_a_dead_letter_instead_of_a_retry(
    db_url: str, receiver: FhirReceiver
) -> None:
    receiver.policy = lambda doc: "500"
    j = Journal(db_url)
    await j.open()
    sink = await sink_for(receiver)
    try:
        await j.commit(patient_record("p1", 1, (DEST,)))
        w = DeliveryWorker(j, sink, RetryPolicy(100, 0.05, 0.1), linger=0, max_age=timedelta(seconds=0.5))
        await w.run_once()
        (row,) = await outbox_rows(j)
        assert row.status == "pending"
        await asyncio.sleep(0.6)
        await drain(j, w)
        (row,) = await outbox_rows(j)
        assert row.status == "dead" and row.attempts == 2
        assert "age limit" in row.last_error and "HTTP 500" in row.last_error
    finally:
        await sink.close()
        await j.close()


async def test_dead_letters_show_retry_and_drop(db_url: str) -> None:
    j = Journal(db_url)
    await j.open()
    try:
        for seq in range(3):
            await j.commit(patient_record(f"p{seq}", seq, (DEST, "other")))
        items = await j.claim(DEST, 10, timedelta(seconds=30))
        for i in items:
            await j.mark_dead(i.id, "HTTP 422: {'resourceType':'OperationOutcome'}")
        listed = await j.dead_letters(DEST)
        assert [r["id"] for r in listed] == [i.id for i in items]
        shown = await j.outbox_item(items[0].id)
        assert shown is not None and shown["status"] == "dead" and shown["raw_bytes"] > 0
        assert shown["message_type"] == "ORU^R01" and "OperationOutcome" in shown["last_error"]
        state = await j.destination_state()
        assert state[DEST]["dead"] == 3 and state["other"]["pending"] == 3
        assert await j.drop_dead([items[0].id]) == 1
        assert await j.retry_dead(destination=DEST) == 2
        assert await j.retry_dead(destination=DEST) == 0
        rows = {r.id: r for r in await outbox_rows(j)}
        assert rows[items[0].id].status == "dropped"
        assert rows[items[1].id].status == rows[items[2].id].status == "pending"
        assert rows[items[1].id].attempts == 0
    finally:
        await j.close()


async def test_retention_purges_only_finished_old_messages(db_url: str) -> None:
    j = Journal(db_url)
    await j.open()
    try:
        recs = [patient_record(f"p{i}", i, (DEST,)) for i in range(4)]
        for r in recs:
            await j.commit(r)
        items = await j.claim(DEST, 10, timedelta(seconds=30))
        await j.mark_done([items[0].id, items[1].id])
        await j.mark_dead(items[2].id, "HTTP 400")  # a dead letter is kept until an operator decides
        await j.drop_dead([items[2].id])  # ... and purged once dropped
        # items[3] stays pending
        assert j.db is not None
        old = recs[0].envelope.id
        await j.db.transaction(
            lambda c: c.execute(
                update(messages).where(messages.c.id == old).values(received_at=utcnow() - timedelta(days=40))
            )
        )
        assert await j.purge_messages(utcnow() - timedelta(days=30), ["accepted"]) == 1
        assert await j.purge_messages(utcnow() + timedelta(seconds=1), ["accepted"], limit=1) == 1
        assert await j.purge_messages(utcnow() + timedelta(seconds=1), ["accepted"]) == 1
        assert await j.purge_messages(utcnow() + timedelta(seconds=1), ["accepted"]) == 0
        left = await j.db.read(lambda c: [r[0] for r in c.execute(select(messages.c.id))])
        assert left == [recs[3].envelope.id]
        assert [r.message_id for r in await outbox_rows(j)] == [recs[3].envelope.id]
    finally:
        await j.close()


async def test_retention_gives_the_space_back_on_sqlite(sqlite_url: str, tmp_path: Any) -> None:
    j = Journal(sqlite_url)
    await j.open()
    path = tmp_path / "journal.db"
    try:
        big = os.urandom(200_000)
        for i in range(60):
            rec = patient_record(f"p{i}", i, ())
            env = rec.envelope
            await j.commit(
                type(rec)(
                    **{
                        **{f: getattr(rec, f) for f in rec.__dataclass_fields__},
                        "envelope": type(env)(
                            env.id, env.source, env.kind, env.received_at, big + bytes([i]), env.peer
                        ),
                    }
                )
            )
        assert j.db is not None
        await j.db.checkpoint()  # type: ignore[attr-defined]
        await asyncio.sleep(0.1)
        full = path.stat().st_size
        assert full > 10_000_000
        while await j.purge_messages(utcnow() + timedelta(seconds=1), ["accepted"], limit=25):
            pass
        freed = 0
        while n := await j.reclaim_space(max_pages=1000):
            freed += n
        assert freed > 2000
        await j.db.checkpoint()  # type: ignore[attr-defined]
    finally:
        await j.close()
    assert path.stat().st_size < full / 5
