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
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar

import orjson
from sqlalchemy import Connection, and_, case, delete, func, select, update
from sqlalchemy.exc import IntegrityError, SQLAlchemyError

from gateway import migrate, telemetry
from gateway.contracts import Envelope, InputKind, OutboxItem
from gateway.crypto import Keyring, open_value, row_aad
from gateway.db import Database, SqliteDatabase, is_sqlite, lock_conflict_code, open_database, translate
from gateway.errors import GatewayError, PermanentError, TransientError, UnavailableError
from gateway.journal.fastpath import FastPath
from gateway.journal.schema import dedup_keys, messages, outbox
from gateway.routing import restrict_bundle

log = logging.getLogger(__name__)
T = TypeVar("T")

MIGRATIONS = Path(__file__).parent / "migrations"
VERSION_TABLE = "gateway_journal_version"

CHECKPOINT_INTERVAL = 1.0  # seconds between WAL checkpoints of a SQLite journal
# After a group commit fails for the database's sake (disk full, connection lost), the health check reports the
# journal unavailable for this long, unless a commit succeeds first: its round trip (SELECT 1) still works on a
# full disk. Then the round trip alone decides again, so a load balancer that took the instance out sends it
# traffic again, which tests the journal for real.
COMMIT_FAILURE_HOLD = 30.0
PURGE_EVERY = 60  # checkpoint intervals between purges of expired dedup keys
# A group commit aborted by the database for a lock conflict (MySQL deadlock, lock wait timeout) is retried this
# many times, after a jittered exponential backoff starting at LOCK_CONFLICT_BACKOFF seconds (about 0.3 s in all).
LOCK_CONFLICT_RETRIES = 5
LOCK_CONFLICT_BACKOFF = 0.01

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
    dedup_window: timedelta | None = None  # how long the key is remembered; None: the journal's default
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


def _incremental_vacuum_for_new_file(url: str) -> None:
    """A new SQLite journal is created with ``auto_vacuum=INCREMENTAL``, so retention can give space back
    (``Journal.reclaim_space``). SQLite fixes this mode when the first table is created; an existing journal
    without it keeps its size until an offline ``VACUUM`` (docs/delivery.md)."""
    import sqlite3

    from sqlalchemy.engine import make_url

    path = make_url(url).database
    if not path or path == ":memory:" or path.startswith("file:"):
        return
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    conn = sqlite3.connect(path, timeout=30, isolation_level=None)
    try:
        if conn.execute("SELECT count(*) FROM sqlite_master").fetchone()[0] == 0:
            conn.execute("PRAGMA auto_vacuum=INCREMENTAL")
            conn.execute("VACUUM")  # writes the header, so the mode holds for the connections that follow
    finally:
        conn.close()


_STOP = _Stop()


class Journal:
    def __init__(
        self,
        url: str,
        *,
        group_commit_max: int = 512,
        dedup_window: timedelta = timedelta(days=7),
        pool_size: int = 5,
        keyring: Keyring | None = None,
    ) -> None:
        self.url = url
        # Encryption at rest (gateway/crypto.py): raw and fhir are sealed on write and opened on read; None
        # stores them in clear and refuses to return sealed values.
        self.keyring = keyring
        self.group_commit_max = group_commit_max
        self.dedup_window = dedup_window
        self.pool_size = pool_size
        self.db: Database | None = None
        self._queue: asyncio.Queue[tuple[JournalRecord, asyncio.Future[CommitResult]] | _Stop] = asyncio.Queue()
        self._committer: asyncio.Task[None] | None = None
        self.committed = asyncio.Event()  # set after every commit that queued outbox items
        self.groups = 0  # transactions committed (for tests and metrics)
        self._commit_failure: tuple[float, str] | None = None  # (when, why) of the last failed group
        self._fast: FastPath | None = None
        self._maintainer: asyncio.Task[None] | None = None

    # -- lifecycle -------------------------------------------------------------------------------------------

    async def open(self, *, migrate_schema: bool = True) -> None:
        """Connect, apply migrations, start the committer. Raises TransientError when the database cannot be
        reached."""
        if self.is_sqlite:
            await asyncio.to_thread(_incremental_vacuum_for_new_file, self.url)
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
            except Exception as exc:  # the supervisor boundary: checkpoints and purges must go on
                telemetry.internal_error("Journal maintenance failed unexpectedly; it runs again shortly", exc)

    async def ping(self) -> None:
        """A cheap round trip to the database, for health checks. Raises when it is not reachable."""
        if self._committer is None or self._committer.done():
            raise UnavailableError("the journal's committer is not running")
        try:
            await self._db().read(lambda conn: conn.exec_driver_sql("SELECT 1").scalar())
        except (SQLAlchemyError, OSError) as exc:
            raise translate(exc, "checking the journal") from exc
        failure = self._commit_failure
        if failure is not None and time.monotonic() - failure[0] < COMMIT_FAILURE_HOLD:
            raise UnavailableError(f"the last commit failed {time.monotonic() - failure[0]:.0f} s ago: {failure[1]}")

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

    async def _read(self, fn: Callable[[Connection], T], what: str) -> T:
        """A read whose database errors come out as the gateway's (UnavailableError when the database is gone),
        so a caller's ``except GatewayError`` holds: a raw driver error once ended the daemon from its metrics
        task when MariaDB went away."""
        try:
            return await self._db().read(fn)
        except (SQLAlchemyError, OSError) as exc:
            raise translate(exc, what) from exc

    async def _transact(self, fn: Callable[[Connection], T], what: str) -> T:
        """A transaction outside the group commit (tools, maintenance), errors translated as for :meth:`_read`."""
        try:
            return await self._db().transaction(fn)
        except (SQLAlchemyError, OSError) as exc:
            raise translate(exc, what) from exc

    # -- ingest ----------------------------------------------------------------------------------------------

    async def commit(self, record: JournalRecord) -> CommitResult:
        """Commit one record durably, grouped with whatever else is waiting. Returns when its group's
        transaction has committed. Raises TransientError when it could not be committed."""
        if self._committer is None or self._committer.done():
            raise TransientError("the journal is not accepting messages")
        fut: asyncio.Future[CommitResult] = asyncio.get_running_loop().create_future()
        self._queue.put_nowait((record, fut))
        # The commit finishes even if the caller is cancelled (a sender hung up): the record is queued and the
        # committer owns it; cancelling cancels only this future, which the committer then leaves alone. (No
        # asyncio.shield: its extra future and callbacks cost more than the rest of this method, per message.)
        return await fut

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
            if isinstance(exc, UnavailableError):
                self._commit_failure = (time.monotonic(), str(exc))
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
        self._commit_failure = None
        telemetry.group_committed(len(group), time.perf_counter() - started)
        if any(r.destinations for r in records):
            self.committed.set()
        for (_, fut), res in zip(group, results, strict=True):
            if not fut.done():
                fut.set_result(res)

    async def _write(self, records: list[JournalRecord], retry_conflict: bool = True) -> list[CommitResult]:
        db = self._db()
        lock_conflicts = 0
        while True:
            try:
                return await db.transaction(lambda conn: self._write_in(conn, records, utcnow()))
            except IntegrityError as exc:
                # Another instance committed one of these dedup keys between our check and our insert: once
                # more, and this time the check sees it.
                if retry_conflict:
                    retry_conflict = False
                    continue
                raise translate(exc, "committing to the journal") from exc
            except (SQLAlchemyError, OSError) as exc:
                code = lock_conflict_code(exc)
                if code is None:
                    raise translate(exc, "committing to the journal") from exc
                # On MySQL in REPEATABLE READ a delivery claim (SELECT ... FOR UPDATE, then UPDATE ... WHERE id IN)
                # takes next-key locks on the outbox indexes, and our outbox INSERT waits for them while the
                # claim's UPDATE waits for a row we just inserted: InnoDB breaks the cycle by aborting one of
                # the two, often this commit. Nothing of it was written, and the same transaction a moment
                # later succeeds; answering AE instead would make every sender resend for a lost coin toss.
                lock_conflicts += 1
                if lock_conflicts > LOCK_CONFLICT_RETRIES:
                    telemetry.journal_lock_conflict(code, lock_conflicts, len(records), None)
                    raise translate(exc, "committing to the journal") from exc
                delay = LOCK_CONFLICT_BACKOFF * 2 ** (lock_conflicts - 1) * random.uniform(0.5, 1.5)
                telemetry.journal_lock_conflict(code, lock_conflicts, len(records), delay)
                await asyncio.sleep(delay)

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
        default_expiry = ts(now + self.dedup_window)
        values: dict[str, Any] = {}
        msg_rows: list[tuple[Any, ...]] = []
        key_rows: list[tuple[Any, ...]] = []
        box_rows: list[tuple[Any, ...]] = []
        results: list[CommitResult] = []
        seal = self.keyring.seal if self.keyring is not None else None
        for r in records:
            env = r.envelope
            if r.dedup_key and r.dedup_key in existing:
                results.append(CommitResult(True, existing[r.dedup_key]))
                continue
            if r.dedup_key:
                existing[r.dedup_key] = env.id  # a second copy inside this same group is a duplicate too
                expires_db = default_expiry if r.dedup_window is None else ts(now + r.dedup_window)
                values = {"dedup_key": r.dedup_key, "message_id": env.id, "expires_at": expires_db}
                key_rows.append(fast.dedup_row(values))
            values = {
                "id": env.id,
                "source": env.source,
                "kind": str(env.kind),
                "peer": env.peer,
                "received_at": ts(env.received_at.astimezone(UTC).replace(tzinfo=None)),
                "committed_at": now_db,
                "raw": seal(env.payload, row_aad("messages", "raw", env.id)) if seal else env.payload,
                "meta": orjson.dumps(r.meta).decode(),
                "message_type": r.message_type[:32],
                "control_id": r.control_id[:199],
                "status": r.status,
                "reject_code": r.reject_code,
                "error": r.error,
                "fhir": seal(r.fhir, row_aad("messages", "fhir", env.id)) if seal and r.fhir is not None else r.fhir,
                "dedup_key": r.dedup_key,
            }
            msg_rows.append(fast.message_row(values))
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
                box_rows.append(fast.outbox_row(values))
            results.append(CommitResult(False, env.id))
        if msg_rows:
            fast.insert_many(conn, fast.insert_messages, msg_rows)
        if key_rows:
            fast.insert_many(conn, fast.insert_dedup, key_rows)
        if box_rows:
            fast.insert_many(conn, fast.insert_outbox, box_rows)
        return results

    def open_stored(self, message_id: str, column: str, value: bytes) -> bytes:
        """The plaintext of a stored ``messages.raw`` or ``messages.fhir`` value (every read path goes through
        here: claims, replay, dead letters). Raises gateway.crypto.UndecryptableError (a PermanentError) when
        its key is not configured or it was altered."""
        return open_value(self.keyring, value, row_aad("messages", column, message_id))

    def _fastpath(self, conn: Connection) -> FastPath:
        if self._fast is None:
            self._fast = FastPath(conn.dialect)
        return self._fast

    # -- delivery --------------------------------------------------------------------------------------------

    async def claim(self, destination: str, limit: int, lease: timedelta, *, ordered: bool = False) -> list[OutboxItem]:
        """Reserve up to ``limit`` due items of ``destination`` for this instance, oldest first. On MySQL the
        rows are locked with SKIP LOCKED, so instances sharing the database never claim the same item; a claim
        lapses after ``lease`` (the instance died) and the item becomes due again.

        ``ordered``: FIFO per ordering key. An item is only claimed when no earlier item with the same
        (non-empty) key is still pending for this destination, whether that one is waiting for a retry or
        claimed by another instance: an update never overtakes the create before it. A dead letter no longer
        holds its key back (an operator decides about it; the queue behind it moves on)."""
        return [c.item(destination) for c in await self.claim_rows(destination, limit, lease, ordered=ordered)]

    async def claim_rows(
        self, destination: str, limit: int, lease: timedelta, *, ordered: bool = False
    ) -> list[Claimed]:
        """``claim`` without decoding the stored bundles (for handing items to another process)."""

        def claim(conn: Connection) -> list[Claimed]:
            now = utcnow()
            # On MySQL the due ids are selected FOR UPDATE SKIP LOCKED; with ``ordered``, the subquery for an
            # earlier pending item of the same key is a non-locking read: a head item locked by another
            # instance's claim is still seen as pending there, so its followers stay back (the statements are
            # in gateway/journal/fastpath.py).
            rows = self._fastpath(conn).claim(conn, destination, limit, now, now + lease, ordered=ordered)
            return [
                Claimed(
                    item_id,
                    message_id,
                    attempts,
                    ordering_key,
                    kind,
                    source,
                    self.open_stored(message_id, "raw", raw),
                    # A route may restrict which resource types this destination receives (issue #6).
                    restrict_bundle(
                        meta, destination, None if fhir is None else self.open_stored(message_id, "fhir", fhir)
                    ),
                )
                for item_id, message_id, attempts, ordering_key, kind, source, raw, fhir, meta in rows
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
        # Not flushed, as in _update; on the driver cursor (fastpath), as the claim that preceded it.
        try:
            await self._db().transaction(lambda conn: self._fastpath(conn).mark_done(conn, ids, now), durable=False)
        except (SQLAlchemyError, OSError) as exc:
            raise translate(exc, "updating the outbox") from exc

    async def mark_retry(
        self, item_id: int, error: str, next_attempt_at: datetime, *, give_up_before: datetime | None = None
    ) -> bool:
        """Record a failed attempt and when to try again. With ``give_up_before``, an item queued before that
        time goes to the dead-letter state instead (the age limit); returns True when it did."""
        now = utcnow()
        values: dict[str, Any] = {
            "attempts": outbox.c.attempts + 1,
            "last_error": error[:2000],
            "next_attempt_at": next_attempt_at,
            "lease_until": None,
            "updated_at": now,
        }
        if give_up_before is None:
            await self._update(update(outbox).where(outbox.c.id == item_id).values(**values))
            return False
        expired = outbox.c.created_at < give_up_before
        values["status"] = case((expired, "dead"), else_=outbox.c.status)
        values["last_error"] = case(
            (expired, f"gave up: older than the age limit; last error: {error}"[:2000]), else_=error[:2000]
        )

        def retry(conn: Connection) -> bool:
            conn.execute(update(outbox).where(outbox.c.id == item_id).values(**values))
            return conn.execute(select(outbox.c.status).where(outbox.c.id == item_id)).scalar() == "dead"

        try:
            return await self._db().transaction(retry, durable=False)
        except (SQLAlchemyError, OSError) as exc:
            raise translate(exc, "updating the outbox") from exc

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
        return await self._read(lambda conn: [dict(r._mapping) for r in conn.execute(stmt)], "listing dead letters")

    async def retry_dead(self, ids: Sequence[int] | None = None, destination: str | None = None) -> int:
        """Put dead letters back in the queue (all of them when ``ids`` is None, optionally of one
        destination); returns how many. Their attempt count starts again from zero."""
        cond = outbox.c.status == "dead"
        if ids is not None:
            cond = and_(cond, outbox.c.id.in_(list(ids)))
        if destination:
            cond = and_(cond, outbox.c.destination == destination)
        stmt = (
            update(outbox).where(cond).values(status="pending", attempts=0, next_attempt_at=utcnow(), lease_until=None)
        )
        n = await self._transact(lambda conn: int(conn.execute(stmt).rowcount), "queueing dead letters again")
        self.committed.set()
        return n

    async def drop_dead(self, ids: Sequence[int] | None = None, destination: str | None = None) -> int:
        """Give up on dead letters for good: status ``dropped`` (kept for the record until retention purges
        the message). All of them when ``ids`` is None, optionally of one destination; returns how many."""
        cond = outbox.c.status == "dead"
        if ids is not None:
            cond = and_(cond, outbox.c.id.in_(list(ids)))
        if destination:
            cond = and_(cond, outbox.c.destination == destination)
        stmt = update(outbox).where(cond).values(status="dropped", lease_until=None, updated_at=utcnow())
        return await self._transact(lambda conn: int(conn.execute(stmt).rowcount), "dropping dead letters")

    async def outbox_item(self, item_id: int) -> dict[str, Any] | None:
        """One outbox item with its message's header facts (no payload), for `gateway dlq show`."""
        stmt = (
            select(
                outbox.c.id,
                outbox.c.message_id,
                outbox.c.destination,
                outbox.c.status,
                outbox.c.attempts,
                outbox.c.ordering_key,
                outbox.c.last_error,
                outbox.c.created_at,
                outbox.c.updated_at,
                outbox.c.next_attempt_at,
                messages.c.source,
                messages.c.kind,
                messages.c.peer,
                messages.c.received_at,
                messages.c.message_type,
                messages.c.control_id,
                messages.c.status.label("message_status"),
                func.length(messages.c.raw).label("raw_bytes"),
            )
            .join(messages, messages.c.id == outbox.c.message_id)
            .where(outbox.c.id == item_id)
        )
        rows = await self._read(lambda conn: [dict(r._mapping) for r in conn.execute(stmt)], "reading an outbox item")
        return rows[0] if rows else None

    async def destination_state(self) -> dict[str, dict[str, float]]:
        """Per destination: pending items (and how many of them are waiting for a retry), the age in seconds
        of the oldest pending one, and dead letters. For `gateway status`."""

        def state(conn: Connection) -> dict[str, dict[str, float]]:
            now = utcnow()
            out: dict[str, dict[str, float]] = {}
            rows = conn.execute(
                select(
                    outbox.c.destination,
                    outbox.c.status,
                    func.count(),
                    func.min(outbox.c.created_at),
                    func.sum(case((outbox.c.attempts > 0, 1), else_=0)),
                )
                .where(outbox.c.status.in_(["pending", "dead"]))
                .group_by(outbox.c.destination, outbox.c.status)
            )
            for dest, status, n, oldest, retrying in rows:
                d = out.setdefault(str(dest), {"pending": 0, "retrying": 0, "oldest_seconds": 0.0, "dead": 0})
                if status == "dead":
                    d["dead"] = int(n)
                    continue
                d["pending"] = int(n)
                d["retrying"] = int(retrying or 0)
                d["oldest_seconds"] = max(0.0, (now - oldest).total_seconds()) if isinstance(oldest, datetime) else 0.0
            return out

        return await self._read(state, "reading the delivery state")

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

        return await self._read(state, "reading the outbox state")

    async def counts(self) -> dict[str, int]:
        """Messages by status and outbox items by status, for health and tests."""

        def counts(conn: Connection) -> dict[str, int]:
            out: dict[str, int] = {}
            for status, n in conn.execute(select(messages.c.status, func.count()).group_by(messages.c.status)):
                out[f"messages.{status}"] = int(n)
            for status, n in conn.execute(select(outbox.c.status, func.count()).group_by(outbox.c.status)):
                out[f"outbox.{status}"] = int(n)
            return out

        return await self._read(counts, "counting messages")

    # -- retention and replay --------------------------------------------------------------------------------

    async def purge_messages(self, received_before: datetime, statuses: Sequence[str], limit: int = 1000) -> int:
        """Delete up to ``limit`` messages received before ``received_before`` with one of ``statuses`` whose
        outbox items are all finished (done or dropped; none pending, none dead), with those outbox items, in
        one short transaction; returns how many messages. Oldest first; the caller repeats while it gets
        ``limit``. Dedup keys are left to expire on their own."""

        def purge(conn: Connection) -> int:
            unfinished = (
                select(outbox.c.id)
                .where(outbox.c.message_id == messages.c.id, outbox.c.status.in_(["pending", "dead"]))
                .exists()
            )
            ids = [
                r[0]
                for r in conn.execute(
                    select(messages.c.id)
                    .where(messages.c.received_at < received_before, messages.c.status.in_(list(statuses)), ~unfinished)
                    .order_by(messages.c.received_at)
                    .limit(limit)
                )
            ]
            if ids:
                conn.execute(delete(outbox).where(outbox.c.message_id.in_(ids)))
                conn.execute(delete(messages).where(messages.c.id.in_(ids)))
            return len(ids)

        try:
            return await self._db().transaction(purge)
        except (SQLAlchemyError, OSError) as exc:
            raise translate(exc, "purging old messages") from exc

    async def reclaim_space(self, max_pages: int = 4096) -> int:
        """Give free pages back to the file system after a purge: on SQLite with ``auto_vacuum=INCREMENTAL``
        (every journal created by this version), move up to ``max_pages`` free pages to the end of the file and
        truncate it; the file shrinks at the next WAL checkpoint. Returns the pages freed. On MySQL/MariaDB
        InnoDB reuses the freed pages for new rows, so the tablespace stops growing instead of shrinking (see
        docs/delivery.md); this returns 0 there."""
        db = self._db()
        if not isinstance(db, SqliteDatabase):
            return 0

        def vacuum(conn: Connection) -> int:
            if conn.exec_driver_sql("PRAGMA auto_vacuum").scalar() != 2:
                return 0
            free = int(conn.exec_driver_sql("PRAGMA freelist_count").scalar() or 0)
            dbapi = conn.connection.dbapi_connection
            assert dbapi is not None
            # Each step of this pragma frees one page, and the driver steps a statement without result columns
            # only once: one execution per page (about 15 us each), in the writer's own transaction.
            n = min(free, max_pages)
            for _ in range(n):
                dbapi.execute("PRAGMA incremental_vacuum(1)").close()
            return n

        try:
            return await db.transaction(vacuum)
        except (SQLAlchemyError, OSError) as exc:
            raise translate(exc, "reclaiming free space") from exc

    async def replay_candidates(
        self,
        *,
        message_id: str | None = None,
        source: str | None = None,
        since: datetime | None = None,
        until: datetime | None = None,
        after_id: str = "",
        limit: int = 200,
    ) -> list[Envelope]:
        """Stored messages as envelopes (raw bytes opened), in id order, for `gateway replay`: one message by
        id, or those of ``source`` received in [since, until), from after ``after_id`` (paging)."""
        stmt = (
            select(
                messages.c.id,
                messages.c.source,
                messages.c.kind,
                messages.c.peer,
                messages.c.received_at,
                messages.c.raw,
                messages.c.meta,
            )
            .order_by(messages.c.id)
            .limit(limit)
        )
        if message_id is not None:
            stmt = stmt.where(messages.c.id == message_id)
        if source is not None:
            stmt = stmt.where(messages.c.source == source)
        if since is not None:
            stmt = stmt.where(messages.c.received_at >= since)
        if until is not None:
            stmt = stmt.where(messages.c.received_at < until)
        if after_id:
            stmt = stmt.where(messages.c.id > after_id)
        rows = await self._read(lambda conn: list(conn.execute(stmt)), "listing messages")
        out = []
        for r in rows:
            meta = orjson.loads(r.meta) if r.meta else {}
            out.append(
                Envelope(
                    id=r.id,
                    source=r.source,
                    kind=InputKind(r.kind),
                    received_at=r.received_at.replace(tzinfo=UTC),
                    payload=self.open_stored(r.id, "raw", r.raw),
                    peer=r.peer,
                    metadata={str(k): str(v) for k, v in meta.items()} if isinstance(meta, dict) else {},
                )
            )
        return out

    async def pending_destinations(self, message_id: str) -> set[str]:
        """Destinations that have a pending outbox item for this message (a replay queues no second one)."""
        return await self._read(lambda conn: _pending_destinations(conn, message_id), "reading the outbox")

    async def replace(self, record: JournalRecord) -> int:
        """Replay: store what the current rules made of an already journaled message (status, header facts,
        bundle, reason) over its row, and queue it for the destinations they route it to. A destination that
        still has a pending item for this message gets no second one. Returns the outbox items queued. The
        dedup key and the raw bytes stay as they were."""
        env = record.envelope
        seal = self.keyring.seal if self.keyring is not None else None
        fhir = record.fhir
        if seal is not None and fhir is not None:
            fhir = seal(fhir, row_aad("messages", "fhir", env.id))

        def write(conn: Connection) -> int:
            now = utcnow()
            found = conn.execute(
                update(messages)
                .where(messages.c.id == env.id)
                .values(
                    status=record.status,
                    message_type=record.message_type[:32],
                    control_id=record.control_id[:199],
                    meta=orjson.dumps(record.meta).decode(),
                    reject_code=record.reject_code,
                    error=record.error,
                    fhir=fhir,
                )
            ).rowcount
            if not found:
                raise PermanentError(f"message {env.id} is not in the journal")
            pending = _pending_destinations(conn, env.id)
            rows = [
                {
                    "message_id": env.id,
                    "destination": dest,
                    "status": "pending",
                    "attempts": 0,
                    "next_attempt_at": now,
                    "lease_until": None,
                    "ordering_key": record.ordering_key[:128],
                    "last_error": None,
                    "created_at": now,
                    "updated_at": now,
                }
                for dest in dict.fromkeys(record.destinations)
                if dest not in pending
            ]
            if rows:
                conn.execute(outbox.insert(), rows)
            return len(rows)

        try:
            n = await self._db().transaction(write)
        except (SQLAlchemyError, OSError) as exc:
            raise translate(exc, "replaying a message") from exc
        if n:
            self.committed.set()
        return n

    async def purge_expired_dedup_keys(self, limit: int = 10_000) -> int:
        """Delete up to ``limit`` expired dedup keys; returns how many (the maintenance loop repeats while full)."""

        def purge(conn: Connection) -> int:
            sub = select(dedup_keys.c.dedup_key).where(dedup_keys.c.expires_at <= utcnow()).limit(limit)
            keys = [r[0] for r in conn.execute(sub)]
            if keys:
                conn.execute(delete(dedup_keys).where(dedup_keys.c.dedup_key.in_(keys)))
            return len(keys)

        return await self._transact(purge, "purging expired dedup keys")


def _pending_destinations(conn: Connection, message_id: str) -> set[str]:
    stmt = select(outbox.c.destination).where(outbox.c.message_id == message_id, outbox.c.status == "pending")
    return {str(r[0]) for r in conn.execute(stmt)}
