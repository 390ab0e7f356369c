"""DeliveryWorker and RetryPolicy against a real journal (SQLite) and hand-written sinks: done, retry with
backoff, dead letters, unexpected sink errors, batch sinks with per-item results, and requeueing dead letters.
Every round is driven with ``run_once`` so the tests are deterministic."""

from __future__ import annotations

import asyncio
import random
import secrets
from collections.abc import AsyncIterator, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import select

from gateway.contracts import BatchSink, Envelope, InputKind, OutboxItem, Sink
from gateway.delivery import DeliveryWorker, RetryPolicy
from gateway.errors import PermanentError, TransientError
from gateway.ids import uuid7
from gateway.journal import Journal, JournalRecord, utcnow
from gateway.journal.schema import outbox

BUNDLE = b'{"resourceType":"Bundle","type":"transaction","entry":[{"resource":{"resourceType":"Patient","id":"p1"}}]}'


def record(dest: str, n: int = 0) -> JournalRecord:
    env = Envelope(uuid7(), "test", InputKind.HL7V2, datetime.now(UTC), f"MSH|^~\\&|A|B|{n}\r".encode(), "peer:1")
    return JournalRecord(env, "accepted", message_type="ADT^A01", control_id=f"c{n}", destinations=(dest,), fhir=BUNDLE)


@pytest.fixture
async def journal(sqlite_url: str) -> AsyncIterator[Journal]:
    j = Journal(sqlite_url)
    await j.open()
    try:
        yield j
    finally:
        await j.close()


async def enqueue(journal: Journal, dest: str, n: int = 1) -> list[str]:
    ids = []
    for i in range(n):
        res = await journal.commit(record(dest, i))
        ids.append(res.message_id)
    return ids


async def rows(journal: Journal, dest: str) -> list[dict[str, Any]]:
    assert journal.db is not None
    stmt = select(outbox).where(outbox.c.destination == dest).order_by(outbox.c.id)
    return await journal.db.read(lambda conn: [dict(r._mapping) for r in conn.execute(stmt)])


def dest_name() -> str:
    return f"d-{secrets.token_hex(4)}"


class ScriptedSink:
    """A Sink whose ``deliver`` raises the scripted errors in turn (None: delivered); delivered when the script
    is used up."""

    def __init__(self, name: str, *script: BaseException | None) -> None:
        self.name = name
        self.script = list(script)
        self.calls: list[OutboxItem] = []

    async def start(self) -> None:
        pass

    async def close(self) -> None:
        pass

    async def deliver(self, item: OutboxItem) -> None:
        self.calls.append(item)
        outcome = self.script.pop(0) if self.script else None
        if outcome is not None:
            raise outcome


class ScriptedBatchSink(ScriptedSink):
    """A BatchSink: each ``deliver_many`` call returns (or raises) the next scripted answer."""

    def __init__(self, name: str, *answers: list[Exception | None] | BaseException) -> None:
        super().__init__(name)
        self.answers = list(answers)
        self.batches: list[list[OutboxItem]] = []

    async def deliver_many(self, items: Sequence[OutboxItem]) -> list[Exception | None]:
        self.batches.append(list(items))
        none: list[Exception | None] = [None] * len(items)
        answer = self.answers.pop(0) if self.answers else none
        if isinstance(answer, BaseException):
            raise answer
        return answer


def test_the_fakes_implement_the_sink_protocols() -> None:
    assert isinstance(ScriptedSink("x"), Sink)
    assert not isinstance(ScriptedSink("x"), BatchSink)
    assert isinstance(ScriptedBatchSink("x"), BatchSink)


# -- outcomes --------------------------------------------------------------------------------------------------


async def test_a_delivered_item_is_done(journal: Journal) -> None:
    name = dest_name()
    (mid,) = await enqueue(journal, name)
    sink = ScriptedSink(name)
    worker = DeliveryWorker(journal, sink, RetryPolicy())
    assert await worker.run_once() == 1
    (item,) = sink.calls
    assert item.message_id == mid and item.destination == name and item.attempts == 0
    assert item.resources == [{"resourceType": "Patient", "id": "p1"}]
    (row,) = await rows(journal, name)
    assert row["status"] == "done" and row["lease_until"] is None
    assert await worker.run_once() == 0, "a done item is not delivered again"
    assert len(sink.calls) == 1


async def test_a_transient_failure_is_retried_after_the_backoff_then_done(journal: Journal) -> None:
    name = dest_name()
    await enqueue(journal, name)
    sink = ScriptedSink(name, TransientError("downstream busy"))
    policy = RetryPolicy(max_attempts=5, initial=0.2, cap=10)
    worker = DeliveryWorker(journal, sink, policy)

    before = utcnow()
    assert await worker.run_once() == 1
    after = utcnow()
    (row,) = await rows(journal, name)
    assert row["status"] == "pending"
    assert row["attempts"] == 1
    assert row["last_error"] == "downstream busy"
    assert row["lease_until"] is None
    # attempt 1: ceiling = initial, delay in [initial/2, initial]
    assert before + timedelta(seconds=0.1) <= row["next_attempt_at"] <= after + timedelta(seconds=0.2)

    assert await worker.run_once() == 0, "not due yet"
    assert len(sink.calls) == 1
    await asyncio.sleep(0.25)
    assert await worker.run_once() == 1
    assert [c.attempts for c in sink.calls] == [0, 1]
    (row,) = await rows(journal, name)
    assert row["status"] == "done"
    assert row["attempts"] == 2


async def test_a_permanent_error_is_a_dead_letter_at_once(journal: Journal) -> None:
    name = dest_name()
    (mid,) = await enqueue(journal, name)
    other = dest_name()
    await enqueue(journal, other)
    sink = ScriptedSink(name, PermanentError("resource rejected: invalid id"))
    worker = DeliveryWorker(journal, sink, RetryPolicy(max_attempts=10))
    assert await worker.run_once() == 1
    (row,) = await rows(journal, name)
    assert row["status"] == "dead" and row["attempts"] == 1
    (dead,) = await journal.dead_letters()
    assert dead["message_id"] == mid
    assert dead["destination"] == name
    assert dead["last_error"] == "resource rejected: invalid id"
    assert dead["message_type"] == "ADT^A01"
    assert await journal.dead_letters(destination=other) == []
    assert await worker.run_once() == 0, "a dead letter is not retried"


async def test_the_last_allowed_attempt_makes_a_dead_letter(journal: Journal) -> None:
    name = dest_name()
    await enqueue(journal, name)
    sink = ScriptedSink(name, *[TransientError(f"try {i}") for i in range(10)])
    worker = DeliveryWorker(journal, sink, RetryPolicy(max_attempts=3, initial=0.01, cap=0.02))
    for expected in ("pending", "pending", "dead"):
        assert await worker.run_once() == 1
        (row,) = await rows(journal, name)
        assert row["status"] == expected
        await asyncio.sleep(0.03)
    assert await worker.run_once() == 0
    assert len(sink.calls) == 3, "max_attempts counts every delivery attempt"
    (dead,) = await journal.dead_letters(destination=name)
    assert dead["attempts"] == 3
    assert dead["last_error"] == "try 2"


async def test_an_unexpected_sink_exception_is_transient(journal: Journal) -> None:
    name = dest_name()
    await enqueue(journal, name)
    sink = ScriptedSink(name, ValueError("sink bug"))
    worker = DeliveryWorker(journal, sink, RetryPolicy(initial=0.02, cap=0.05))
    assert await worker.run_once() == 1
    (row,) = await rows(journal, name)
    assert row["status"] == "pending"
    assert row["attempts"] == 1
    assert "ValueError" in row["last_error"]
    await asyncio.sleep(0.06)
    assert await worker.run_once() == 1
    (row,) = await rows(journal, name)
    assert row["status"] == "done"


async def test_an_error_without_text_is_recorded_by_its_type(journal: Journal) -> None:
    name = dest_name()
    await enqueue(journal, name)
    worker = DeliveryWorker(journal, ScriptedSink(name, PermanentError()), RetryPolicy())
    await worker.run_once()
    (row,) = await rows(journal, name)
    assert row["last_error"] == "PermanentError"


async def test_one_failing_item_does_not_hold_back_the_others(journal: Journal) -> None:
    name = dest_name()
    await enqueue(journal, name, 3)
    sink = ScriptedSink(name, None, TransientError("busy"), None)
    worker = DeliveryWorker(journal, sink, RetryPolicy(initial=5))
    assert await worker.run_once() == 3
    assert [r["status"] for r in await rows(journal, name)] == ["done", "pending", "done"]
    assert [c.message_id for c in sink.calls] == [r["message_id"] for r in await rows(journal, name)]


async def test_batch_size_limits_one_round(journal: Journal) -> None:
    name = dest_name()
    await enqueue(journal, name, 5)
    sink = ScriptedSink(name)
    worker = DeliveryWorker(journal, sink, RetryPolicy(), batch_size=2)
    assert [await worker.run_once() for _ in range(4)] == [2, 2, 1, 0]
    ids = [r["id"] for r in await rows(journal, name)]
    assert [c.id for c in sink.calls] == ids, "items are delivered oldest first"


# -- batch sinks -----------------------------------------------------------------------------------------------


async def test_a_batch_sink_gets_one_call_and_each_item_its_own_outcome(journal: Journal) -> None:
    name = dest_name()
    await enqueue(journal, name, 4)
    sink = ScriptedBatchSink(name, [None, TransientError("locked"), PermanentError("bad resource"), ValueError("odd")])
    worker = DeliveryWorker(journal, sink, RetryPolicy(initial=5))
    assert await worker.run_once() == 4
    assert len(sink.batches) == 1 and len(sink.batches[0]) == 4
    assert sink.calls == [], "a batch sink is not called item by item"
    got = [(r["status"], r["attempts"], r["last_error"]) for r in await rows(journal, name)]
    assert got == [
        ("done", 1, None),
        ("pending", 1, "locked"),
        ("dead", 1, "bad resource"),
        ("pending", 1, "odd"),
    ]


async def test_a_batch_sink_raising_a_gateway_error_fails_every_item_alike(journal: Journal) -> None:
    name = dest_name()
    await enqueue(journal, name, 3)
    sink = ScriptedBatchSink(name, TransientError("store unreachable"))
    worker = DeliveryWorker(journal, sink, RetryPolicy(initial=5))
    assert await worker.run_once() == 3
    assert [(r["status"], r["last_error"]) for r in await rows(journal, name)] == [("pending", "store unreachable")] * 3


async def test_a_batch_sink_raising_an_unexpected_exception_is_transient(journal: Journal) -> None:
    name = dest_name()
    await enqueue(journal, name, 2)
    sink = ScriptedBatchSink(name, KeyError("id"))
    worker = DeliveryWorker(journal, sink, RetryPolicy(initial=5))
    assert await worker.run_once() == 2
    assert [(r["status"], r["attempts"]) for r in await rows(journal, name)] == [("pending", 1)] * 2
    assert all("KeyError" in r["last_error"] for r in await rows(journal, name))


# -- dead letters ----------------------------------------------------------------------------------------------


async def test_retry_dead_requeues_dead_letters(journal: Journal) -> None:
    name = dest_name()
    await enqueue(journal, name, 3)
    sink = ScriptedSink(name, PermanentError("no"), PermanentError("no"), PermanentError("no"))
    worker = DeliveryWorker(journal, sink, RetryPolicy())
    await worker.run_once()
    dead = await journal.dead_letters(destination=name)
    assert len(dead) == 3

    journal.committed.clear()
    assert await journal.retry_dead([dead[0]["id"]]) == 1
    assert journal.committed.is_set(), "requeueing wakes the workers"
    assert [r["status"] for r in await rows(journal, name)] == ["pending", "dead", "dead"]
    assert await worker.run_once() == 1
    assert [r["status"] for r in await rows(journal, name)] == ["done", "dead", "dead"]

    assert await journal.retry_dead() == 2
    row = (await rows(journal, name))[1]
    assert row["attempts"] == 0, "a requeued item gets its full number of attempts again"
    assert await worker.run_once() == 2
    assert [r["status"] for r in await rows(journal, name)] == ["done", "done", "done"]
    assert await journal.dead_letters(destination=name) == []
    assert await journal.retry_dead() == 0


# -- the worker loop -------------------------------------------------------------------------------------------


async def test_run_delivers_when_woken_and_stops(journal: Journal) -> None:
    name = dest_name()
    sink = ScriptedSink(name)
    worker = DeliveryWorker(journal, sink, RetryPolicy(), poll_interval=30, linger=0)
    task = asyncio.create_task(worker.run())
    try:
        await asyncio.sleep(0.05)
        await enqueue(journal, name, 2)
        worker.wake()
        for _ in range(100):
            if len(sink.calls) == 2:
                break
            await asyncio.sleep(0.02)
        assert len(sink.calls) == 2, "wake() starts a round long before the 30 s poll interval"
    finally:
        worker.stop()
        await asyncio.wait_for(task, 5)
    assert [r["status"] for r in await rows(journal, name)] == ["done", "done"]


# -- RetryPolicy -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("attempt", range(1, 21))
def test_delay_is_jittered_between_half_and_the_whole_ceiling(attempt: int) -> None:
    policy = RetryPolicy(initial=1.0, cap=300.0)
    ceiling = min(300.0, 2.0 ** (attempt - 1))
    rng = random.Random(attempt)
    delays = [policy.delay(attempt, rng) for _ in range(200)]
    assert all(ceiling / 2 <= d <= ceiling for d in delays)
    assert all(d <= policy.cap for d in delays)
    assert max(delays) - min(delays) > ceiling / 4, "the delays are spread out, not one fixed value"


def test_delay_grows_then_stays_at_the_cap() -> None:
    policy = RetryPolicy(initial=0.5, cap=10.0)

    class Top(random.Random):
        def uniform(self, a: float, b: float) -> float:
            return b

    top = Top()
    assert [policy.delay(a, top) for a in range(1, 8)] == [0.5, 1.0, 2.0, 4.0, 8.0, 10.0, 10.0]
    assert policy.delay(0, top) == 0.5, "attempt 0 is treated like the first"


def test_delay_stays_at_the_cap_for_very_many_attempts() -> None:
    policy = RetryPolicy(max_attempts=5000, initial=1.0, cap=300.0)
    assert 150.0 <= policy.delay(1100, random.Random(1)) <= 300.0
