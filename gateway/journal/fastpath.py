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
from typing import Any

from sqlalchemy import Connection, Table, insert
from sqlalchemy.engine import Dialect
from sqlalchemy.exc import DBAPIError

from gateway.journal.schema import dedup_keys, messages, outbox

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
    return (lambda d: d.strftime(_SQLITE_DATETIME)) if dialect.name == "sqlite" else (lambda d: d)


def driver_execute(conn: Connection, sql: str, params: Any, many: bool = False) -> list[Any]:
    """Execute on the driver's cursor; driver errors are wrapped as SQLAlchemy wraps them (IntegrityError,
    OperationalError, ...), so callers handle one family of exceptions."""
    dbapi_conn = conn.connection.dbapi_connection
    assert dbapi_conn is not None
    cur = dbapi_conn.cursor()
    try:
        if many:
            cur.executemany(sql, params)
            return []
        cur.execute(sql, params)
        return list(cur.fetchall()) if cur.description else []
    except conn.dialect.loaded_dbapi.Error as exc:
        raise DBAPIError.instance(sql, None, exc, conn.dialect.loaded_dbapi.Error) from exc
    finally:
        cur.close()


class FastPath:
    def __init__(self, dialect: Dialect) -> None:
        self.placeholder = "?" if dialect.paramstyle == "qmark" else "%s"
        self.to_db = datetime_to_db(dialect)
        self.insert_messages, self.message_columns = compile_insert(messages, dialect)
        self.insert_dedup, self.dedup_columns = compile_insert(dedup_keys, dialect)
        self.insert_outbox, self.outbox_columns = compile_insert(outbox, dialect, skip=("id",))
        self.select_dedup = "SELECT dedup_key, message_id, expires_at FROM dedup_keys WHERE dedup_key IN ({})"
        self.delete_dedup = "DELETE FROM dedup_keys WHERE dedup_key IN ({})"

    def in_list(self, template: str, n: int) -> str:
        return template.format(", ".join([self.placeholder] * n))

    def existing_keys(self, conn: Connection, keys: list[str], now: datetime) -> tuple[dict[str, str], list[str]]:
        """(live keys -> message id, expired keys) among ``keys``."""
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
        driver_execute(conn, self.in_list(self.delete_dedup, len(keys)), keys)

    def insert_many(self, conn: Connection, sql: str, rows: list[tuple[Any, ...]]) -> None:
        driver_execute(conn, sql, rows, many=True)
