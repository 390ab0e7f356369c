"""Delivers mapped FHIR resources into SQL tables: upsert by (type, id), version bumped only on a change.

Each resource's content is hashed without its ``meta`` (which this store owns: versionId, lastUpdated); a
message that carries the same content again (a resend, an A08 with nothing new) leaves the version alone. Every
new version is also written to the history table, so the store can answer "what did we know when".
Concurrent writers (several workers or instances) are safe: an update only applies to the version it read
(optimistic check), and a lost race is a TransientError that the delivery loop retries.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson
from sqlalchemy import Connection, insert, select, tuple_, update
from sqlalchemy.exc import SQLAlchemyError

from adapters.sqlstore.config import SqlStoreConfig
from adapters.sqlstore.schema import history, resources
from gateway import migrate
from gateway.contracts import OutboxItem
from gateway.db import Database, open_database, translate
from gateway.errors import TransientError, UnavailableError

log = logging.getLogger(__name__)

MIGRATIONS = Path(__file__).parent / "migrations"
VERSION_TABLE = "gateway_store_version"


class _LostRace(Exception):
    pass


def content_hash(resource: Mapping[str, Any]) -> str:
    body = {k: v for k, v in resource.items() if k != "meta"}
    return hashlib.sha256(orjson.dumps(body, option=orjson.OPT_SORT_KEYS)).hexdigest()


class SqlStoreSink:
    """Sink protocol implementation (also a BatchSink: ``deliver_many`` writes a batch in one transaction)."""

    def __init__(self, name: str, config: SqlStoreConfig) -> None:
        self.name = name
        self.config = config
        self.db: Database | None = None

    async def start(self) -> None:
        self.db = open_database(self.config.url, pool_size=self.config.pool_size)
        try:
            await migrate.upgrade(self.db, MIGRATIONS, VERSION_TABLE)
        except (SQLAlchemyError, OSError) as exc:
            raise translate(exc, f"opening destination {self.name}") from exc

    async def close(self) -> None:
        if self.db is not None:
            await self.db.dispose()
            self.db = None

    async def deliver(self, item: OutboxItem) -> None:
        result = (await self.deliver_many([item]))[0]
        if result is not None:
            raise result

    async def deliver_many(self, items: Sequence[OutboxItem]) -> list[Exception | None]:
        """One transaction for the whole batch; when it fails for a reason other than an unreachable
        database, each item is tried alone so one bad item cannot hold back the others."""
        if self.db is None:
            raise TransientError(f"destination {self.name} is not started")
        try:
            await self._write(items)
            return [None] * len(items)
        except (SQLAlchemyError, OSError, _LostRace) as exc:
            if len(items) == 1:
                return [_as_gateway_error(exc, self.name)]
            err = _as_gateway_error(exc, self.name)
            if isinstance(err, UnavailableError):
                return [err] * len(items)
        out: list[Exception | None] = []
        for item in items:
            try:
                await self._write([item])
                out.append(None)
            except (SQLAlchemyError, OSError, _LostRace) as exc:
                out.append(_as_gateway_error(exc, self.name))
        return out

    async def _write(self, items: Sequence[OutboxItem]) -> None:
        assert self.db is not None
        await self.db.transaction(lambda conn: self._write_in(conn, items))

    def _write_in(self, conn: Connection, items: Sequence[OutboxItem]) -> None:
        now = datetime.now(UTC).replace(tzinfo=None)
        stamp = now.strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"
        keys = {(r["resourceType"], r["id"]) for item in items for r in item.resources}
        if not keys:
            return
        current: dict[tuple[str, str], tuple[int, str, str]] = {}
        for rtype, rid, version, chash, mid in conn.execute(
            select(
                resources.c.resource_type,
                resources.c.id,
                resources.c.version,
                resources.c.content_hash,
                resources.c.message_id,
            ).where(tuple_(resources.c.resource_type, resources.c.id).in_(list(keys)))
        ):
            current[(rtype, rid)] = (version, chash, mid)
        read_versions = {k: v[0] for k, v in current.items()}
        inserts: dict[tuple[str, str], dict[str, Any]] = {}
        updates: dict[tuple[str, str], dict[str, Any]] = {}
        hist: list[dict[str, Any]] = []
        for item in items:  # in outbox order: a later message's content wins
            for res in item.resources:
                key = (res["resourceType"], res["id"])
                chash = content_hash(res)
                prev = current.get(key)
                if prev is not None and (prev[1] == chash or prev[2] > item.message_id):
                    # Same content: nothing new. Written by a later message (message ids are time-ordered
                    # UUIDv7): this item is late (a redelivery after a crash, a dead letter retried) and must
                    # not turn the resource back to older data.
                    continue
                version = prev[0] + 1 if prev else 1
                doc = dict(res)
                doc["meta"] = {**res.get("meta", {}), "versionId": str(version), "lastUpdated": stamp}
                row = {
                    "resource_type": key[0],
                    "id": key[1],
                    "version": version,
                    "last_updated": now,
                    "content_hash": chash,
                    "message_id": item.message_id,
                    "json": orjson.dumps(doc).decode(),
                }
                current[key] = (version, chash, item.message_id)
                if key in read_versions:
                    updates[key] = row
                else:
                    inserts[key] = row
                hist.append(
                    {k: row[k] for k in ("resource_type", "id", "version", "last_updated", "message_id", "json")}
                )
        if inserts:
            conn.execute(insert(resources), list(inserts.values()))
        for key, row in updates.items():
            res_update = conn.execute(
                update(resources)
                .where(
                    resources.c.resource_type == key[0],
                    resources.c.id == key[1],
                    resources.c.version == read_versions[key],
                )
                .values(
                    version=row["version"],
                    last_updated=row["last_updated"],
                    content_hash=row["content_hash"],
                    message_id=row["message_id"],
                    json=row["json"],
                )
            )
            if res_update.rowcount != 1:
                raise _LostRace(f"{key[0]} changed concurrently")
        if hist:
            conn.execute(insert(history), hist)

    # -- reading, for the CLI and tests ----------------------------------------------------------------------

    async def read(self, resource_type: str | None = None, limit: int = 100) -> list[dict[str, Any]]:
        assert self.db is not None
        stmt = select(resources.c.json).order_by(resources.c.last_updated.desc()).limit(limit)
        if resource_type:
            stmt = stmt.where(resources.c.resource_type == resource_type)
        return await self.db.read(lambda conn: [orjson.loads(r[0]) for r in conn.execute(stmt)])


def _as_gateway_error(exc: BaseException, name: str) -> Exception:
    if isinstance(exc, _LostRace):
        return TransientError(f"destination {name}: {exc}, will retry")
    return translate(exc, f"writing to destination {name}")
