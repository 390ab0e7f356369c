"""Delivery workers: move outbox items to their destinations, with retries and dead letters.

One worker per destination claims due items in outbox order, hands them to the sink and records the result:
done; a transient failure is retried after a capped exponential backoff with full jitter; a permanent failure,
or the last allowed attempt, or a failure of an item older than the age limit, puts the item in the
dead-letter state with its reason (``gateway dlq``). Egress never gates the ACK: this runs after the commit, on
its own schedule.

A sink may say more than "retry": :class:`RetryLater` carries the time before which the destination does not
want the item again (HTTP 429/503 with Retry-After); the next attempt is not scheduled earlier. A sink may also
ask, through two optional attributes, for FIFO claims per ordering key (``ordered = True``: an update for a
patient never overtakes the create before it, also under retries) and for several deliveries in flight at once
(``concurrency = N``, for sinks without a batch call).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Protocol

from gateway import telemetry
from gateway.config import DeliveryConfig
from gateway.contracts import BatchSink, OutboxItem, Sink
from gateway.errors import GatewayError, PermanentError, TransientError
from gateway.journal import utcnow

log = logging.getLogger(__name__)

MAX_RETRY_AFTER = 3600.0  # a destination's Retry-After is honoured up to an hour; beyond that, the backoff rules


class RetryLater(TransientError):
    """A transient failure with the destination's own "not before": the item's next attempt is scheduled no
    earlier than ``not_before`` (naive UTC), and no earlier than the backoff would schedule it either."""

    def __init__(self, message: str, not_before: datetime) -> None:
        super().__init__(message)
        self.not_before = not_before


class Outbox(Protocol):
    """What a delivery worker needs from the journal (gateway.journal.Journal in the daemon; a client that
    asks the daemon over its socket in the delivery process)."""

    async def claim(
        self, destination: str, limit: int, lease: timedelta, *, ordered: bool = False
    ) -> list[OutboxItem]: ...

    async def mark_done(self, ids: Sequence[int]) -> None: ...

    async def mark_retry(
        self, item_id: int, error: str, next_attempt_at: datetime, *, give_up_before: datetime | None = None
    ) -> bool: ...

    async def mark_dead(self, item_id: int, error: str) -> None: ...


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    max_attempts: int = 10
    initial: float = 1.0
    cap: float = 300.0

    def delay(self, attempt: int, rng: random.Random | None = None) -> float:
        """Seconds to wait after failed attempt number ``attempt`` (1-based): uniformly between half and all
        of min(cap, initial * 2**(attempt-1)) ("equal jitter"), so retries from many items do not arrive in
        lockstep and none comes back sooner than half the schedule."""
        # Cap the exponent first: 2**1024 does not fit in a float.
        ceiling = min(self.cap, self.initial * 2.0 ** min(max(0, attempt - 1), 60))
        return (rng or random).uniform(ceiling / 2, ceiling)


class DeliveryWorker:
    def __init__(
        self,
        journal: Outbox,
        sink: Sink,
        policy: RetryPolicy,
        *,
        batch_size: int = 200,
        lease: timedelta = timedelta(seconds=60),
        poll_interval: float = 1.0,
        linger: float = 0.05,
        max_age: timedelta | None = None,
    ) -> None:
        self.journal = journal
        self.sink = sink
        self.policy = policy
        self.max_age = max_age
        self.ordered = bool(getattr(sink, "ordered", False))
        self.concurrency = max(1, int(getattr(sink, "concurrency", 1)))
        self.batch_size = batch_size
        self.lease = lease
        self.poll_interval = poll_interval
        self.linger = linger
        self._wake = asyncio.Event()
        self._stopping = False

    def wake(self) -> None:
        self._wake.set()

    def stop(self) -> None:
        self._stopping = True
        self._wake.set()

    async def run(self) -> None:
        """Deliver until stopped. A round that fails (journal unreachable) is logged and retried after the
        poll interval; the worker itself never dies of a delivery error."""
        name = self.sink.name
        while not self._stopping:
            try:
                n = await self.run_once()
                telemetry.delivery_round_done(name)
            except GatewayError as exc:
                telemetry.delivery_round_failed(name, str(exc))
                n = 0
            except Exception as exc:  # the supervisor boundary: log once, keep delivering
                telemetry.internal_error(f"A delivery round for {name} failed unexpectedly", exc, destination=name)
                n = 0
            if self._stopping:
                break
            if n == 0:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), self.poll_interval)
                self._wake.clear()
            elif n < self.batch_size and self.linger > 0:
                # A part-filled batch: let more arrive before the next round. Each round has a fixed cost
                # (claim, sink transaction, bookkeeping) that would otherwise be paid for every few messages,
                # on the same core that acknowledges incoming ones.
                await asyncio.sleep(self.linger)

    async def run_once(self) -> int:
        """Claim and deliver one batch; returns how many items were claimed."""
        items = await self.journal.claim(self.sink.name, self.batch_size, self.lease, ordered=self.ordered)
        if not items:
            return 0
        results = await self._deliver(items)
        done: list[int] = []
        # Done marks first: should a later bookkeeping call fail, what was delivered is not delivered again.
        await self.journal.mark_done([item.id for item, err in zip(items, results, strict=True) if err is None])
        for item, err in zip(items, results, strict=True):
            if err is None:
                done.append(item.id)
                continue
            attempt = item.attempts + 1
            reason = str(err) or type(err).__name__
            if isinstance(err, PermanentError) or attempt >= self.policy.max_attempts:
                # A sink's ``detail`` (what the destination answered, e.g. an OperationOutcome) is kept with
                # the dead letter for the operator but not logged: it may quote patient data.
                detail = getattr(err, "detail", "")
                await self.journal.mark_dead(item.id, f"{reason}: {detail}" if detail else reason)
                telemetry.dead_lettered(self.sink.name, item.message_id, reason)
                continue
            delay = self.next_delay(attempt, err)
            now = utcnow()
            give_up_before = now - self.max_age if self.max_age is not None else None
            if await self.journal.mark_retry(
                item.id, reason, now + timedelta(seconds=delay), give_up_before=give_up_before
            ):
                telemetry.dead_lettered(self.sink.name, item.message_id, f"older than the age limit: {reason}")
            else:
                telemetry.delivery_retry(self.sink.name, item.message_id, attempt, delay, reason)
        telemetry.delivered(self.sink.name, len(done))
        return len(items)

    def next_delay(self, attempt: int, err: Exception) -> float:
        """Seconds until the next attempt: the backoff, or the destination's Retry-After when that is later."""
        delay = self.policy.delay(attempt)
        if isinstance(err, RetryLater):
            wanted = (err.not_before - utcnow()).total_seconds()
            delay = max(delay, min(wanted, MAX_RETRY_AFTER))
        return delay

    async def _deliver(self, items: Sequence[OutboxItem]) -> list[Exception | None]:
        if isinstance(self.sink, BatchSink):
            try:
                return await self.sink.deliver_many(items)
            except GatewayError as exc:
                return [exc] * len(items)
            except Exception as exc:  # a sink bug: every item is retried (and dead-lettered in the end)
                telemetry.internal_error(
                    f"Destination {self.sink.name} raised an unexpected error", exc, destination=self.sink.name
                )
                return [TransientError(f"unexpected sink error ({type(exc).__name__})")] * len(items)
        if self.concurrency == 1:
            return [await self._deliver_one(item) for item in items]
        # Several in flight at once. With FIFO claims every claimed item heads its own key, so items of one
        # key are never in flight together.
        window = asyncio.Semaphore(self.concurrency)

        async def one(item: OutboxItem) -> Exception | None:
            async with window:
                return await self._deliver_one(item)

        return list(await asyncio.gather(*(one(item) for item in items)))

    async def _deliver_one(self, item: OutboxItem) -> Exception | None:
        try:
            await self.sink.deliver(item)
            return None
        except GatewayError as exc:
            return exc
        except Exception as exc:  # a sink bug: treat as transient so nothing is lost, and log it
            telemetry.internal_error(
                f"Destination {self.sink.name} raised an unexpected error", exc, destination=self.sink.name
            )
            return TransientError(f"unexpected sink error ({type(exc).__name__})")


def build_workers(outbox: Outbox, sinks: Sequence[Sink], config: DeliveryConfig) -> list[DeliveryWorker]:
    """One worker per destination, tuned by the ``[delivery]`` config."""
    policy = RetryPolicy(config.max_attempts, config.backoff_initial_seconds, config.backoff_max_seconds)
    return [
        DeliveryWorker(
            outbox,
            sink,
            policy,
            batch_size=config.batch_size,
            lease=timedelta(seconds=config.lease_seconds),
            poll_interval=config.poll_interval_seconds,
            linger=config.linger_seconds,
            max_age=timedelta(seconds=config.max_age_seconds) if config.max_age_seconds else None,
        )
        for sink in sinks
    ]
