"""The group commit's statements, compiled once from the Core tables and run on the DBAPI cursor.

SQLAlchemy's execution layer costs about 100-150 us of CPU per statement (parameter processing, result
set-up, events) in the same process that reads and acknowledges messages; a group commit runs five statements.
The statements here are generated from the same Table objects (so the schema has one source of truth) and
executed on the driver's cursor of the SQLAlchemy connection, inside the transaction SQLAlchemy began. That
cursor is sqlite3's own, or SQLAlchemy's adapter over aiomysql (run in the greenlet of ``run_sync``), so this
is the same code for both backends.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from datetime import datetime
from operator import itemgetter
from typing import Any, TypeVar

from sqlalchemy import Connection, DateTime, Integer, String, Table, bindparam, exists, insert, or_, select
from sqlalchemy.engine import Dialect
from sqlalchemy.exc import DBAPIError

from gateway.journal.schema import dedup_keys, messages, outbox

T = TypeVar("T")

# SQLAlchemy's SQLite DATETIME storage format: rows written here read back through Core like any other.
_SQLITE_DATETIME = "%Y-%m-%d %H:%M:%S.%f"


def compile_insert(table: Table, dialect: Dialect, skip: Sequence[str] = ()) -> tuple[str, list[str]]:
    """An INSERT for every column of ``table`` but ``skip``, as driver SQL, and the column order of its
    parameters."""
    columns = [c.name for c in table.columns if c.name not in skip]
    compiled = insert(table).values({c: None for c in columns}).compile(dialect=dialect)
    return str(compiled), list(compiled.positiontup or columns)


def datetime_to_db(dialect: Dialect) -> Callable[[datetime], Any]:
    """How a datetime is bound on the driver cursor: SQLite stores SQLAlchemy's text format."""
    # isoformat gives the same text for the naive UTC datetimes bound here, at a tenth of strftime's cost.
    return (lambda d: d.isoformat(" ", "microseconds")) if dialect.name == "sqlite" else (lambda d: d)


def driver_execute(conn: Connection, sql: str, params: Any, many: bool = False) -> list[Any]:
    """Execute on the driver's cursor; driver errors are wrapped as SQLAlchemy wraps them (IntegrityError,
    OperationalError, ...), so callers handle one family of exceptions."""
    return _on_cursor(conn, sql, params, many)[0]


def driver_rowcount(conn: Connection, sql: str, params: Any) -> int:
    """:func:`driver_execute` for an UPDATE or DELETE: the number of rows it matched."""
    return _on_cursor(conn, sql, params, False)[1]


def _on_cursor(conn: Connection, sql: str, params: Any, many: bool) -> tuple[list[Any], int]:
    dbapi_conn = conn.connection.dbapi_connection
    assert dbapi_conn is not None
    cur = dbapi_conn.cursor()
    try:
        if many:
            cur.executemany(sql, params)
            return [], -1
        cur.execute(sql, params)
        return (list(cur.fetchall()) if cur.description else []), cur.rowcount
    except conn.dialect.loaded_dbapi.Error as exc:
        raise DBAPIError.instance(sql, None, exc, conn.dialect.loaded_dbapi.Error) from exc
    finally:
        cur.close()


def padded(values: Sequence[T]) -> list[T]:
    """``values`` made up to the next power of two (at least 8) by repeating the last one, for an ``IN (...)``
    list, which means the same with repeats. The list's length is part of the SQL text, and sqlite3 keeps the
    last 128 distinct statements prepared on each connection: one per batch size, a prepared IN list of 100 keys
    taking about 40 KB and of 300 about 90 KB. That grew the delivery process's SQLite heap from 10 to 21 MB in
    2.5 minutes of the soak (the store's lookup), and its RSS with it. Rounded, the lengths make a dozen
    statements at most."""
    if not values:
        return []
    n = max(8, 1 << (len(values) - 1).bit_length())
    return [*values, *[values[-1]] * (n - len(values))]


def _row_getter(columns: Sequence[str]) -> Callable[[dict[str, Any]], tuple[Any, ...]]:
    get = itemgetter(*columns)
    return get if len(columns) > 1 else (lambda values: (get(values),))


class FastPath:
    def __init__(self, dialect: Dialect) -> None:
        self.placeholder = "?" if dialect.paramstyle == "qmark" else "%s"
        self.to_db = datetime_to_db(dialect)
        self.insert_messages, self.message_columns = compile_insert(messages, dialect)
        self.insert_dedup, self.dedup_columns = compile_insert(dedup_keys, dialect)
        self.insert_outbox, self.outbox_columns = compile_insert(outbox, dialect, skip=("id",))
        # A row's values in its INSERT's parameter order, from a dict by column name (itemgetter: in C).
        self.message_row = _row_getter(self.message_columns)
        self.dedup_row = _row_getter(self.dedup_columns)
        self.outbox_row = _row_getter(self.outbox_columns)
        self.select_dedup = "SELECT dedup_key, message_id, expires_at FROM dedup_keys WHERE dedup_key IN ({})"
        self.delete_dedup = "DELETE FROM dedup_keys WHERE dedup_key IN ({})"
        # Delivery claims: at 50-100 items per claim, SQLAlchemy building and executing the claim's statements
        # cost several times what the database does, in the process that acknowledges messages.
        self.due = {ordered: compile_due(dialect, ordered) for ordered in (False, True)}
        p = self.placeholder
        self.lease_sql = f"UPDATE outbox SET lease_until = {p}, updated_at = {p} WHERE id IN ({{}})"
        self.claimed_sql = (
            "SELECT outbox.id, outbox.message_id, outbox.attempts, outbox.ordering_key, messages.kind, "
            "messages.source, messages.raw, messages.fhir, messages.meta FROM outbox "
            "JOIN messages ON messages.id = outbox.message_id WHERE outbox.id IN ({}) ORDER BY outbox.id"
        )
        self.done_sql = (
            f"UPDATE outbox SET status = 'done', lease_until = NULL, updated_at = {p}, attempts = attempts + 1 "
            "WHERE id IN ({})"
        )

    def in_list(self, template: str, n: int) -> str:
        return template.format(", ".join([self.placeholder] * n))

    def existing_keys(self, conn: Connection, keys: list[str], now: datetime) -> tuple[dict[str, str], list[str]]:
        """(live keys -> message id, expired keys) among ``keys``."""
        keys = padded(keys)
        rows = driver_execute(conn, self.in_list(self.select_dedup, len(keys)), keys)
        now_db = self.to_db(now)
        live: dict[str, str] = {}
        expired: list[str] = []
        for key, mid, expires in rows:
            if expires > now_db:
                live[key] = mid
            else:
                expired.append(key)
        return live, expired

    def delete_keys(self, conn: Connection, keys: list[str]) -> None:
        keys = padded(keys)
        driver_execute(conn, self.in_list(self.delete_dedup, len(keys)), keys)

    def insert_many(self, conn: Connection, sql: str, rows: list[tuple[Any, ...]]) -> None:
        driver_execute(conn, sql, rows, many=True)

    def claim(
        self, conn: Connection, destination: str, limit: int, now: datetime, lease_until: datetime, *, ordered: bool
    ) -> list[Any]:
        """Lease up to ``limit`` due items of ``destination`` (the statements of ``Journal.claim_rows``) and
        return their rows: id, message_id, attempts, ordering_key, kind, source, raw, fhir, meta."""
        sql, order, defaults = self.due[ordered]
        values = {**defaults, "destination": destination, "now": self.to_db(now), "limit": limit}
        ids = padded([row[0] for row in driver_execute(conn, sql, [values[name] for name in order])])
        if not ids:
            return []
        marks = ", ".join([self.placeholder] * len(ids))
        driver_execute(conn, self.lease_sql.format(marks), [self.to_db(lease_until), self.to_db(now), *ids])
        return driver_execute(conn, self.claimed_sql.format(marks), ids)

    def mark_done(self, conn: Connection, ids: Sequence[int], now: datetime) -> None:
        ids = padded(ids)
        driver_execute(conn, self.done_sql.format(", ".join([self.placeholder] * len(ids))), [self.to_db(now), *ids])


def compile_due(dialect: Dialect, ordered: bool) -> tuple[str, list[str], dict[str, Any]]:
    """The claim's SELECT of due outbox ids (FOR UPDATE SKIP LOCKED where the database has it) as driver SQL,
    its parameter names in order, and the values of its constant parameters. ``ordered``: FIFO per ordering
    key (see ``Journal.claim_rows``)."""
    now = bindparam("now", type_=DateTime())
    destination = bindparam("destination", type_=String())
    conditions = [
        outbox.c.destination == destination,
        outbox.c.status == "pending",
        outbox.c.next_attempt_at <= now,
        or_(outbox.c.lease_until.is_(None), outbox.c.lease_until < now),
    ]
    if ordered:
        earlier = outbox.alias("earlier")
        conditions.append(
            or_(
                outbox.c.ordering_key == "",
                ~exists().where(
                    earlier.c.destination == destination,
                    earlier.c.ordering_key == outbox.c.ordering_key,
                    earlier.c.status == "pending",
                    earlier.c.id < outbox.c.id,
                ),
            )
        )
    due = (
        select(outbox.c.id)
        .where(*conditions)
        .order_by(outbox.c.id)
        .limit(bindparam("limit", type_=Integer()))
        .with_for_update(skip_locked=True)
    )
    compiled = due.compile(dialect=dialect)
    defaults = compiled.construct_params({"now": None, "destination": "", "limit": 0})
    return str(compiled), list(compiled.positiontup or []), dict(defaults)
