"""The journal: every received message, its dedup key and its outbox items, committed together.

Group commit: :meth:`Journal.commit` queues a record and waits for it. One committer task takes everything
queued while the previous transaction was running and writes it in one transaction (one fsync), then wakes
exactly the callers whose records were in that group. A caller therefore never waits for a later group, and
throughput does not pay one fsync per message.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import orjson
from sqlalchemy import Connection, and_, delete, func, or_, select, update
from sqlalchemy.exc import IntegrityError, SQLAlchemyError

from gateway import migrate, telemetry
from gateway.contracts import Envelope, InputKind, OutboxItem
from gateway.db import Database, SqliteDatabase, is_sqlite, open_database, translate
from gateway.errors import GatewayError, TransientError, UnavailableError
from gateway.journal.fastpath import FastPath
from gateway.journal.schema import dedup_keys, messages, outbox

log = logging.getLogger(__name__)

MIGRATIONS = Path(__file__).parent / "migrations"
VERSION_TABLE = "gateway_journal_version"

CHECKPOINT_INTERVAL = 1.0  # seconds between WAL checkpoints of a SQLite journal
PURGE_EVERY = 60  # checkpoint intervals between purges of expired dedup keys

STATUS_ACCEPTED = "accepted"  # mapped (or raw-routed) and queued for delivery
STATUS_NOT_MAPPED = "not_mapped"  # a type we do not map: kept, routed as raw where rules say so
STATUS_QUARANTINED = "quarantined"  # could not be parsed or mapped: kept with the reason, for replay


def utcnow() -> datetime:
    """Naive UTC, the form every timestamp column holds."""
    return datetime.now(UTC).replace(tzinfo=None)


@dataclass(frozen=True, slots=True)
class JournalRecord:
    """What the pipeline decided about one envelope, ready to be committed."""

    envelope: Envelope
    status: str
    message_type: str = ""
    control_id: str = ""
    meta: dict[str, str] = field(default_factory=dict)
    fhir: bytes | None = None
    dedup_key: str | None = None
    destinations: Sequence[str] = ()
    ordering_key: str = ""
    reject_code: str | None = None
    error: str | None = None


@dataclass(frozen=True, slots=True)
class CommitResult:
    duplicate: bool  # a committed message with the same dedup key exists; nothing was written
    message_id: str  # the id of the committed message (the original one for a duplicate)


@dataclass(frozen=True, slots=True)
class Claimed:
    """A claimed outbox row as stored: the mapped bundle still JSON bytes."""

    id: int
    message_id: str
    attempts: int
    ordering_key: str
    kind: str
    source: str
    raw: bytes
    fhir: bytes | None

    def item(self, destination: str) -> OutboxItem:
        bundle = orjson.loads(self.fhir) if self.fhir else None
        resources = [e["resource"] for e in bundle.get("entry", [])] if bundle else []
        return OutboxItem(
            id=self.id,
            message_id=self.message_id,
            destination=destination,
            attempts=self.attempts,
            kind=InputKind(self.kind),
            source=self.source,
            raw=self.raw,
            resources=resources,
            ordering_key=self.ordering_key,
        )


class _Stop:
    pass


_STOP = _Stop()


class Journal:
    def __init__(
        self,
        url: str,
        *,
        group_commit_max: int = 512,
        dedup_window: timedelta = timedelta(days=7),
        pool_size: int = 5,
    ) -> None:
        self.url = url
        self.group_commit_max = group_commit_max
        self.dedup_window = dedup_window
        self.pool_size = pool_size
        self.db: Database | None = None
        self._queue: asyncio.Queue[tuple[JournalRecord, asyncio.Future[CommitResult]] | _Stop] = asyncio.Queue()
        self._committer: asyncio.Task[None] | None = None
        self.committed = asyncio.Event()  # set after every commit that queued outbox items
        self.groups = 0  # transactions committed (for tests and metrics)
        self._fast: FastPath | None = None
        self._maintainer: asyncio.Task[None] | None = None

    # -- lifecycle -------------------------------------------------------------------------------------------

    async def open(self, *, migrate_schema: bool = True) -> None:
        """Connect, apply migrations, start the committer. Raises TransientError when the database cannot be
        reached."""
        self.db = open_database(self.url, pool_size=self.pool_size, background_checkpoints=True)
        try:
            if migrate_schema:
                await migrate.upgrade(self.db, MIGRATIONS, VERSION_TABLE)
            else:
                await self.db.read(lambda conn: conn.execute(select(func.count()).select_from(messages)).scalar())
        except (SQLAlchemyError, OSError) as exc:
            await self.db.dispose()
            self.db = None
            raise translate(exc, "opening the journal") from exc
        self._committer = asyncio.create_task(self._commit_loop(), name="journal-committer")
        self._maintainer = asyncio.create_task(self._maintenance_loop(), name="journal-maintenance")

    async def _maintenance_loop(self) -> None:
        """SQLite WAL checkpoints every second; expired dedup keys purged every minute."""
        ticks = 0
        while True:
            await asyncio.sleep(CHECKPOINT_INTERVAL)
            ticks += 1
            try:
                if isinstance(self.db, SqliteDatabase):
                    await self.db.checkpoint()
                if ticks % PURGE_EVERY == 0:
                    while await self.purge_expired_dedup_keys() >= 10_000:
                        pass
            except (GatewayError, SQLAlchemyError, OSError) as exc:
                log.warning("Journal maintenance failed; it runs again shortly: %s", exc)

    async def ping(self) -> None:
        """A cheap round trip to the database, for health checks. Raises when it is not reachable."""
        if self._committer is None or self._committer.done():
            raise UnavailableError("the journal's committer is not running")
        try:
            await self._db().read(lambda conn: conn.exec_driver_sql("SELECT 1").scalar())
        except (SQLAlchemyError, OSError) as exc:
            raise translate(exc, "checking the journal") from exc

    async def close(self) -> None:
        """Commit everything already queued, then stop the committer and close the connections."""
        if self._maintainer is not None:
            self._maintainer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._maintainer
            self._maintainer = None
        if self._committer is not None:
            self._queue.put_nowait(_STOP)
            with contextlib.suppress(asyncio.CancelledError):
                await self._committer
            self._committer = None
        if self.db is not None:
            await self.db.dispose()
            self.db = None

    @property
    def is_sqlite(self) -> bool:
        return is_sqlite(self.url)

    def _db(self) -> Database:
        if self.db is None:
            raise UnavailableError("the journal is not open")
        return self.db

    # -- ingest ----------------------------------------------------------------------------------------------

    async def commit(self, record: JournalRecord) -> CommitResult:
        """Commit one record durably, grouped with whatever else is waiting. Returns when its group's
        transaction has committed. Raises TransientError when it could not be committed."""
        if self._committer is None or self._committer.done():
            raise TransientError("the journal is not accepting messages")
        fut: asyncio.Future[CommitResult] = asyncio.get_running_loop().create_future()
        self._queue.put_nowait((record, fut))
        # The commit must finish even if the caller is cancelled (a sender hung up): the committer owns it.
        return await asyncio.shield(fut)

    async def _commit_loop(self) -> None:
        stopping = False
        while not stopping:
            first = await self._queue.get()
            if isinstance(first, _Stop):
                break
            group = [first]
            while len(group) < self.group_commit_max and not self._queue.empty():
                item = self._queue.get_nowait()
                if isinstance(item, _Stop):
                    stopping = True  # finish this group, then stop
                    break
                group.append(item)
            await self._commit_group(group)

    async def _commit_group(self, group: list[tuple[JournalRecord, asyncio.Future[CommitResult]]]) -> None:
        records = [r for r, _ in group]
        started = time.perf_counter()
        try:
            results = await self._write(records)
        except Exception as exc:  # the per-group boundary: every waiting sender must get an answer
            if not isinstance(exc, GatewayError):
                telemetry.internal_error(f"Committing a group of {len(group)} messages failed unexpectedly", exc)
                exc = TransientError(f"committing to the journal: {type(exc).__name__}")
            if len(group) > 1 and not isinstance(exc, UnavailableError):
                # One bad record must not fail its neighbours: commit them one by one.
                for one in group:
                    await self._commit_group([one])
                return
            for _, fut in group:
                if not fut.done():
                    fut.set_exception(exc)
            return
        self.groups += 1
        telemetry.group_committed(len(group), time.perf_counter() - started)
        if any(r.destinations for r in records):
            self.committed.set()
        for (_, fut), res in zip(group, results, strict=True):
            if not fut.done():
                fut.set_result(res)

    async def _write(self, records: list[JournalRecord], retry_conflict: bool = True) -> list[CommitResult]:
        db = self._db()
        try:
            results = await db.transaction(lambda conn: self._write_in(conn, records, utcnow()))
        except IntegrityError as exc:
            # Another instance committed one of these dedup keys between our check and our insert: once more,
            # and this time the check sees it.
            if retry_conflict:
                return await self._write(records, retry_conflict=False)
            raise translate(exc, "committing to the journal") from exc
        except (SQLAlchemyError, OSError) as exc:
            raise translate(exc, "committing to the journal") from exc
        return results

    def _write_in(self, conn: Connection, records: list[JournalRecord], now: datetime) -> list[CommitResult]:
        fast = self._fastpath(conn)
        keys = list({r.dedup_key for r in records if r.dedup_key})
        existing: dict[str, str] = {}
        if keys:
            existing, expired = fast.existing_keys(conn, keys, now)
            if expired:
                fast.delete_keys(conn, expired)
        ts = fast.to_db
        now_db = ts(now)
        expires_db = ts(now + self.dedup_window)
        values: dict[str, Any] = {}
        msg_rows: list[tuple[Any, ...]] = []
        key_rows: list[tuple[Any, ...]] = []
        box_rows: list[tuple[Any, ...]] = []
        results: list[CommitResult] = []
        for r in records:
            env = r.envelope
            if r.dedup_key and r.dedup_key in existing:
                results.append(CommitResult(True, existing[r.dedup_key]))
                continue
            if r.dedup_key:
                existing[r.dedup_key] = env.id  # a second copy inside this same group is a duplicate too
                values = {"dedup_key": r.dedup_key, "message_id": env.id, "expires_at": expires_db}
                key_rows.append(tuple(values[c] for c in fast.dedup_columns))
            values = {
                "id": env.id,
                "source": env.source,
                "kind": str(env.kind),
                "peer": env.peer,
                "received_at": ts(env.received_at.astimezone(UTC).replace(tzinfo=None)),
                "committed_at": now_db,
                "raw": env.payload,
                "meta": orjson.dumps(r.meta).decode(),
                "message_type": r.message_type[:32],
                "control_id": r.control_id[:199],
                "status": r.status,
                "reject_code": r.reject_code,
                "error": r.error,
                "fhir": r.fhir,
                "dedup_key": r.dedup_key,
            }
            msg_rows.append(tuple(values[c] for c in fast.message_columns))
            for dest in r.destinations:
                values = {
                    "message_id": env.id,
                    "destination": dest,
                    "status": "pending",
                    "attempts": 0,
                    "next_attempt_at": now_db,
                    "lease_until": None,
                    "ordering_key": r.ordering_key[:128],
                    "last_error": None,
                    "created_at": now_db,
                    "updated_at": now_db,
                }
                box_rows.append(tuple(values[c] for c in fast.outbox_columns))
            results.append(CommitResult(False, env.id))
        if msg_rows:
            fast.insert_many(conn, fast.insert_messages, msg_rows)
        if key_rows:
            fast.insert_many(conn, fast.insert_dedup, key_rows)
        if box_rows:
            fast.insert_many(conn, fast.insert_outbox, box_rows)
        return results

    def _fastpath(self, conn: Connection) -> FastPath:
        if self._fast is None:
            self._fast = FastPath(conn.dialect)
        return self._fast

    # -- delivery --------------------------------------------------------------------------------------------

    async def claim(self, destination: str, limit: int, lease: timedelta) -> list[OutboxItem]:
        """Reserve up to ``limit`` due items of ``destination`` for this instance, oldest first. On MySQL the
        rows are locked with SKIP LOCKED, so instances sharing the database never claim the same item; a claim
        lapses after ``lease`` (the instance died) and the item becomes due again."""
        return [c.item(destination) for c in await self.claim_rows(destination, limit, lease)]

    async def claim_rows(self, destination: str, limit: int, lease: timedelta) -> list[Claimed]:
        """``claim`` without decoding the stored bundles (for handing items to another process)."""

        def claim(conn: Connection) -> list[Claimed]:
            now = utcnow()
            due = (
                select(outbox.c.id)
                .where(
                    outbox.c.destination == destination,
                    outbox.c.status == "pending",
                    outbox.c.next_attempt_at <= now,
                    or_(outbox.c.lease_until.is_(None), outbox.c.lease_until < now),
                )
                .order_by(outbox.c.id)
                .limit(limit)
                .with_for_update(skip_locked=True)
            )
            ids = [row[0] for row in conn.execute(due)]
            if not ids:
                return []
            conn.execute(update(outbox).where(outbox.c.id.in_(ids)).values(lease_until=now + lease, updated_at=now))
            rows = conn.execute(
                select(
                    outbox.c.id,
                    outbox.c.message_id,
                    outbox.c.attempts,
                    outbox.c.ordering_key,
                    messages.c.kind,
                    messages.c.source,
                    messages.c.raw,
                    messages.c.fhir,
                )
                .join(messages, messages.c.id == outbox.c.message_id)
                .where(outbox.c.id.in_(ids))
                .order_by(outbox.c.id)
            )
            return [
                Claimed(row.id, row.message_id, row.attempts, row.ordering_key, row.kind, row.source, row.raw, row.fhir)
                for row in rows
            ]

        try:
            # Not flushed: a lease lost in a power failure only means the item is claimed again.
            return await self._db().transaction(claim, durable=False)
        except (SQLAlchemyError, OSError) as exc:
            raise translate(exc, "claiming outbox items") from exc

    async def release(self, ids: Sequence[int]) -> None:
        """Give claimed items back unattempted: due again at once for the next claim."""
        if ids:
            await self._update(update(outbox).where(outbox.c.id.in_(list(ids))).values(lease_until=None))

    async def mark_done(self, ids: Sequence[int]) -> None:
        if not ids:
            return
        now = utcnow()
        await self._update(
            update(outbox)
            .where(outbox.c.id.in_(list(ids)))
            .values(status="done", lease_until=None, updated_at=now, attempts=outbox.c.attempts + 1)
        )

    async def mark_retry(self, item_id: int, error: str, next_attempt_at: datetime) -> None:
        now = utcnow()
        await self._update(
            update(outbox)
            .where(outbox.c.id == item_id)
            .values(
                attempts=outbox.c.attempts + 1,
                last_error=error[:2000],
                next_attempt_at=next_attempt_at,
                lease_until=None,
                updated_at=now,
            )
        )

    async def mark_dead(self, item_id: int, error: str) -> None:
        now = utcnow()
        await self._update(
            update(outbox)
            .where(outbox.c.id == item_id)
            .values(
                status="dead",
                attempts=outbox.c.attempts + 1,
                last_error=error[:2000],
                lease_until=None,
                updated_at=now,
            )
        )

    async def _update(self, stmt: Any) -> None:
        # Outbox bookkeeping is not flushed on its own: if a power failure loses it, the item is delivered
        # again, and every sink's delivery is idempotent (the SQL store compares content, FHIR uses PUT).
        try:
            await self._db().transaction(lambda conn: conn.execute(stmt), durable=False)
        except (SQLAlchemyError, OSError) as exc:
            raise translate(exc, "updating the outbox") from exc

    # -- operations ------------------------------------------------------------------------------------------

    async def dead_letters(self, destination: str | None = None, limit: int = 100) -> list[dict[str, Any]]:
        stmt = (
            select(
                outbox.c.id,
                outbox.c.message_id,
                outbox.c.destination,
                outbox.c.attempts,
                outbox.c.last_error,
                outbox.c.updated_at,
                messages.c.message_type,
                messages.c.control_id,
            )
            .join(messages, messages.c.id == outbox.c.message_id)
            .where(outbox.c.status == "dead")
            .order_by(outbox.c.id)
            .limit(limit)
        )
        if destination:
            stmt = stmt.where(outbox.c.destination == destination)
        return await self._db().read(lambda conn: [dict(r._mapping) for r in conn.execute(stmt)])

    async def retry_dead(self, ids: Sequence[int] | None = None) -> int:
        """Put dead letters back in the queue (all of them when ``ids`` is None); returns how many."""
        cond = outbox.c.status == "dead"
        if ids is not None:
            cond = and_(cond, outbox.c.id.in_(list(ids)))
        stmt = (
            update(outbox).where(cond).values(status="pending", attempts=0, next_attempt_at=utcnow(), lease_until=None)
        )
        n = await self._db().transaction(lambda conn: int(conn.execute(stmt).rowcount))
        self.committed.set()
        return n

    async def outbox_state(self) -> dict[str, tuple[int, float]]:
        """Per destination: pending items and the age in seconds of the oldest one."""

        def state(conn: Connection) -> dict[str, tuple[int, float]]:
            now = utcnow()
            rows = conn.execute(
                select(outbox.c.destination, func.count(), func.min(outbox.c.created_at))
                .where(outbox.c.status == "pending")
                .group_by(outbox.c.destination)
            )
            out: dict[str, tuple[int, float]] = {}
            for dest, n, oldest in rows:
                age = (now - oldest).total_seconds() if isinstance(oldest, datetime) else 0.0
                out[str(dest)] = (int(n), max(0.0, age))
            return out

        return await self._db().read(state)

    async def counts(self) -> dict[str, int]:
        """Messages by status and outbox items by status, for health and tests."""

        def counts(conn: Connection) -> dict[str, int]:
            out: dict[str, int] = {}
            for status, n in conn.execute(select(messages.c.status, func.count()).group_by(messages.c.status)):
                out[f"messages.{status}"] = int(n)
            for status, n in conn.execute(select(outbox.c.status, func.count()).group_by(outbox.c.status)):
                out[f"outbox.{status}"] = int(n)
            return out

        return await self._db().read(counts)

    async def purge_expired_dedup_keys(self, limit: int = 10_000) -> int:
        """Delete up to ``limit`` expired dedup keys; returns how many (the maintenance loop repeats while full)."""

        def purge(conn: Connection) -> int:
            sub = select(dedup_keys.c.dedup_key).where(dedup_keys.c.expires_at <= utcnow()).limit(limit)
            keys = [r[0] for r in conn.execute(sub)]
            if keys:
                conn.execute(delete(dedup_keys).where(dedup_keys.c.dedup_key.in_(keys)))
            return len(keys)

        return await self._db().transaction(purge)
