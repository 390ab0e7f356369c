"""The study index: which instances each study has, and which studies changed since their last summary.

It is what lets ImagingStudy aggregation survive a restart, and it decides the duplicate policy: an instance is
recorded here (once its file is on disk) and then journaled; its C-STORE is answered Success only after
both. The index lives in the database named by the source's ``index_url`` (several gateway instances behind one
load balancer share it, like the journal). Recording is idempotent (keyed by SOP Instance UID and content hash):
if the journal commit fails after the record, the sender is answered 0xA700, resends, and the resend is
recorded as identical and journaled.

Records are committed in groups, as the journal's messages are: associations that record at the same time share
one transaction, each decided in turn as if alone. On SQLite the commit does not wait for the disk; ``flush``
does, and the source runs it in the association's thread while the journal commits, so an instance's Success
still waits for its record to be on disk but no longer for two flushes in a row. (A commit that is not flushed
survives the process being killed, only not a power failure; MySQL/MariaDB flush every commit.)
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import orjson
from sqlalchemy import Connection, select, update
from sqlalchemy.engine import Dialect
from sqlalchemy.exc import IntegrityError, SQLAlchemyError

from gateway import migrate
from gateway.db import Database, open_database, translate
from gateway.errors import TransientError
from gateway.journal.fastpath import compile_insert, datetime_to_db, driver_execute, driver_rowcount
from gateway.normalise.dicom import (
    POLICY_IDENTICAL,
    POLICY_KEPT,
    POLICY_NEW,
    POLICY_OVERWRITE,
    POLICY_REJECTED,
    STUDY_FORMAT,
)

from .schema import instances, studies

MIGRATIONS = Path(__file__).parent / "migrations"
VERSION_TABLE = "gateway_dicom_version"


def utcnow() -> datetime:
    return datetime.now(UTC).replace(tzinfo=None)


@dataclass(frozen=True, slots=True)
class IndexedInstance:
    sop_instance_uid: str
    study_instance_uid: str
    series_instance_uid: str
    sop_class_uid: str
    sha256: str
    path: str
    message_id: str
    source: str
    header: dict[str, str]  # also carries calling_ae / called_ae under "_calling_ae" / "_called_ae"


@dataclass(frozen=True, slots=True)
class DueStudy:
    study_instance_uid: str
    change_seq: int


class StudyIndex:
    def __init__(self, url: str) -> None:
        self.url = url
        self.db: Database | None = None
        self._waiting: list[tuple[IndexedInstance, str, asyncio.Future[str]]] = []
        self._committer: asyncio.Task[None] | None = None
        self._statements: _RecordSql | None = None

    async def open(self) -> None:
        self.db = open_database(self.url, pool_size=4)
        try:
            await migrate.upgrade(self.db, MIGRATIONS, VERSION_TABLE)
        except (SQLAlchemyError, OSError) as exc:
            await self.db.dispose()
            self.db = None
            raise translate(exc, "opening the DICOM study index") from exc

    async def close(self) -> None:
        if self._committer is not None:
            with contextlib.suppress(Exception):
                await self._committer
        if self.db is not None:
            await self.db.dispose()
            self.db = None

    def _db(self) -> Database:
        if self.db is None:
            raise TransientError("the DICOM study index is not open")
        return self.db

    async def record(self, inst: IndexedInstance, policy: str) -> str:
        """Decide what ``inst`` is, given what the index holds under its SOP Instance UID, and record it:
        POLICY_NEW (recorded), POLICY_IDENTICAL (same bytes: nothing to do), or for other bytes, by ``policy``
        (keep | overwrite | reject): POLICY_OVERWRITE (recorded in place of the old one), POLICY_KEPT or
        POLICY_REJECTED (not recorded). A recorded instance marks its study changed. Committed (with whatever
        else is being recorded at the same time) before it returns, on disk once :meth:`flush` returns; raises
        TransientError."""
        decided: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        self._waiting.append((inst, policy, decided))
        if self._committer is None:
            self._committer = asyncio.create_task(self._commit_waiting(), name="dicom-index-commit")
        return await decided

    async def _commit_waiting(self) -> None:
        """Commit what is waiting, as one group, until nothing is: what arrives during a commit is the next group."""
        try:
            while self._waiting:
                group, self._waiting = self._waiting, []
                await self._commit_group(group)
        finally:
            self._committer = None

    async def _commit_group(self, group: list[tuple[IndexedInstance, str, asyncio.Future[str]]]) -> None:
        if len(group) > 1:
            now = utcnow()
            try:
                results = await self._db().transaction(
                    lambda conn: [self._record(conn, inst, policy, now) for inst, policy, _ in group],
                    durable=False,
                )
            except (SQLAlchemyError, OSError, TransientError):
                pass  # decided one by one below, so one failure (or a concurrent insert) fails only its own
            else:
                for (_, _, decided), result in zip(group, results, strict=True):
                    if not decided.done():
                        decided.set_result(result)
                return
        for inst, policy, decided in group:
            try:
                result = await self._record_one(inst, policy)
            except Exception as exc:  # the record's own failure goes to its own caller
                if not decided.done():
                    decided.set_exception(exc)
            else:
                if not decided.done():
                    decided.set_result(result)

    async def _record_one(self, inst: IndexedInstance, policy: str) -> str:
        for attempt in (1, 2):
            try:
                return await self._db().transaction(
                    lambda conn: self._record(conn, inst, policy, utcnow()), durable=False
                )
            except IntegrityError as exc:  # a concurrent first insert of the same instance or study: once more
                if attempt == 2:
                    raise translate(exc, "writing the DICOM study index") from exc
            except (SQLAlchemyError, OSError) as exc:
                raise translate(exc, "writing the DICOM study index") from exc
        raise AssertionError("unreachable")

    def flush(self) -> None:
        """Return once every record committed before this call is on disk (blocking: the caller's thread does
        the fsync, which several threads may do at once and the file system then shares); raises TransientError.
        MySQL/MariaDB flushed the commit already."""
        db = self.db
        path = getattr(db, "path", None)
        if db is None or db.dialect != "sqlite" or not isinstance(path, Path):
            return
        try:
            _flush_sqlite(path)
        except OSError as exc:
            raise TransientError(f"cannot flush the DICOM study index: {exc.strerror}") from exc

    def _record(self, conn: Connection, inst: IndexedInstance, policy: str, now: datetime) -> str:
        sql = self._sql(conn.dialect)
        current = driver_execute(conn, sql.select_current, (inst.sop_instance_uid,))
        if current and current[0][0] == inst.sha256:
            return POLICY_IDENTICAL
        if current and policy != "overwrite":
            return POLICY_KEPT if policy == "keep" else POLICY_REJECTED
        stamp = sql.to_db(now)
        row: dict[str, Any] = {
            "sop_instance_uid": inst.sop_instance_uid,
            "study_instance_uid": inst.study_instance_uid,
            "series_instance_uid": inst.series_instance_uid,
            "sop_class_uid": inst.sop_class_uid,
            "sha256": inst.sha256,
            "path": inst.path,
            "message_id": inst.message_id,
            "source": inst.source,
            "received_at": stamp,
            "header": orjson.dumps(inst.header).decode(),
        }
        if not current:
            driver_execute(conn, sql.insert_instance, [row[c] for c in sql.instance_columns])
        else:
            driver_execute(conn, sql.update_instance, [*(row[c] for c in sql.update_columns), inst.sop_instance_uid])
        touched = {inst.study_instance_uid} | ({current[0][1]} if current else set())
        for study_uid in touched:
            if not driver_rowcount(conn, sql.touch_study, (stamp, True, study_uid)):
                values = {
                    "study_instance_uid": study_uid,
                    "source": inst.source,
                    "last_received_at": stamp,
                    "change_seq": 1,
                    "emitted_seq": 0,
                    "pending": True,
                }
                driver_execute(conn, sql.insert_study, [values[c] for c in sql.study_columns])
        return POLICY_NEW if not current else POLICY_OVERWRITE

    def _sql(self, dialect: Dialect) -> _RecordSql:
        if self._statements is None or self._statements.dialect is not dialect:
            self._statements = _RecordSql(dialect)
        return self._statements

    async def due(self, quiet_seconds: float, limit: int = 50) -> list[DueStudy]:
        """Studies changed since their last summary and quiet for ``quiet_seconds``, oldest first."""
        cutoff = utcnow() - timedelta(seconds=quiet_seconds)
        stmt = (
            select(studies.c.study_instance_uid, studies.c.change_seq)
            .where(studies.c.pending.is_(True), studies.c.last_received_at <= cutoff)
            .order_by(studies.c.last_received_at)
            .limit(limit)
        )
        try:
            rows = await self._db().read(lambda conn: list(conn.execute(stmt)))
        except (SQLAlchemyError, OSError) as exc:
            raise translate(exc, "reading the DICOM study index") from exc
        return [DueStudy(r[0], int(r[1])) for r in rows]

    async def study_instances(self, study_uid: str) -> list[dict[str, Any]]:
        stmt = (
            select(
                instances.c.sop_instance_uid,
                instances.c.series_instance_uid,
                instances.c.sop_class_uid,
                instances.c.received_at,
                instances.c.header,
            )
            .where(instances.c.study_instance_uid == study_uid)
            .order_by(instances.c.received_at, instances.c.sop_instance_uid)
        )
        try:
            rows = await self._db().read(lambda conn: [dict(r._mapping) for r in conn.execute(stmt)])
        except (SQLAlchemyError, OSError) as exc:
            raise translate(exc, "reading the DICOM study index") from exc
        for r in rows:
            r["header"] = orjson.loads(r["header"])
        return rows

    async def mark_emitted(self, study_uid: str, seq: int) -> None:
        """The summary of ``seq`` is journaled; still pending if more arrived meanwhile."""
        stmt = (
            update(studies)
            .where(studies.c.study_instance_uid == study_uid)
            .values(
                emitted_seq=seq,
                emitted_at=utcnow(),
                pending=studies.c.change_seq > seq,
            )
        )
        try:
            await self._db().transaction(lambda conn: conn.execute(stmt))
        except (SQLAlchemyError, OSError) as exc:
            raise translate(exc, "writing the DICOM study index") from exc


class _RecordSql:
    """The statements of :meth:`StudyIndex._record`, compiled once from the tables and run on the driver's
    cursor as the journal's group commit does (gateway/journal/fastpath.py): through SQLAlchemy's execution
    layer the three or four statements of one record cost about 0.9 ms of CPU (measured per instance, one
    storescu association), in the process whose threads also answer the association."""

    def __init__(self, dialect: Dialect) -> None:
        self.dialect = dialect
        p = "?" if dialect.paramstyle == "qmark" else "%s"
        self.to_db = datetime_to_db(dialect)
        self.select_current = f"SELECT sha256, study_instance_uid FROM {instances.name} WHERE sop_instance_uid = {p}"
        self.insert_instance, self.instance_columns = compile_insert(instances, dialect)
        self.update_columns = [c for c in self.instance_columns if c != "sop_instance_uid"]
        assignments = ", ".join(f"{c} = {p}" for c in self.update_columns)
        self.update_instance = f"UPDATE {instances.name} SET {assignments} WHERE sop_instance_uid = {p}"
        self.touch_study = (
            f"UPDATE {studies.name} SET last_received_at = {p}, change_seq = change_seq + 1, "
            f"pending = {p} WHERE study_instance_uid = {p}"
        )
        self.insert_study, self.study_columns = compile_insert(studies, dialect, skip=("emitted_at",))


def _flush_sqlite(path: Path) -> None:
    """Flush what SQLite committed without flushing (synchronous=NORMAL in WAL mode): its commits are in the
    write-ahead log, ``<database>-wal``, so an fsync of that file is the fsync synchronous=FULL would have done
    at commit. Frames already checkpointed into the database file were flushed there by the checkpoint (SQLite
    syncs the log before and the database after each checkpoint); without a log, the database file is flushed."""
    wal = path.with_name(path.name + "-wal")
    try:
        fd = os.open(wal, os.O_RDONLY)
    except FileNotFoundError:
        fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def study_summary(study_uid: str, rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The STUDY_FORMAT document for a study's indexed instances: study- and patient-level attributes from the
    latest instance, each series' attributes from its latest instance, instances ordered by number."""
    latest = rows[-1]["header"] if rows else {}
    series: dict[str, dict[str, Any]] = {}
    for r in rows:  # oldest first: later instances overwrite the series header
        s = series.setdefault(r["series_instance_uid"], {"uid": r["series_instance_uid"], "instances": []})
        s["header"] = {k: v for k, v in r["header"].items() if k in _SERIES_KEYS}
        s["instances"].append(
            {
                "uid": r["sop_instance_uid"],
                "sop_class_uid": r["sop_class_uid"],
                "number": r["header"].get("InstanceNumber", ""),
            }
        )
    out_series = sorted(series.values(), key=lambda s: (_num(s["header"].get("SeriesNumber")), s["uid"]))
    for s in out_series:
        s["instances"].sort(key=lambda i: (_num(i["number"]), i["uid"]))
    return {
        "format": STUDY_FORMAT,
        "study_instance_uid": study_uid,
        "calling_ae": latest.get("_calling_ae", ""),
        "called_ae": latest.get("_called_ae", ""),
        "header": {k: v for k, v in latest.items() if k not in _SERIES_KEYS and not k.startswith("_")},
        "series": out_series,
    }


_SERIES_KEYS = frozenset(
    {"SeriesNumber", "SeriesDescription", "SeriesDate", "SeriesTime", "Modality", "BodyPartExamined", "InstanceNumber"}
)


def _num(value: object) -> int:
    try:
        return int(str(value).strip())
    except ValueError:
        return 2**31
