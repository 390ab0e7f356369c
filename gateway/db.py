"""Async SQLAlchemy engines for SQLite and MySQL/MariaDB, set up the same way for the journal and the SQL sinks."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sqlalchemy import event
from sqlalchemy.engine import make_url
from sqlalchemy.exc import (
    DataError,
    DBAPIError,
    IntegrityError,
    InterfaceError,
    OperationalError,
    SQLAlchemyError,
    TimeoutError as PoolTimeoutError,
)
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from gateway.errors import ConfigError, PermanentError, TransientError, UnavailableError


def is_sqlite(url: str) -> bool:
    return make_url(url).get_backend_name() == "sqlite"


def create_engine(url: str, *, pool_size: int = 5, synchronous: str = "FULL") -> AsyncEngine:
    """An engine for ``url``. SQLite files get WAL, the given synchronous level, a busy timeout, and write
    transactions that start with BEGIN IMMEDIATE: with WAL, a deferred transaction that reads and then writes
    fails at once with SQLITE_BUSY when another connection committed meanwhile, and the busy timeout cannot help;
    taking the write lock up front makes writers queue instead."""
    try:
        u = make_url(url)
    except Exception as exc:
        raise ConfigError(f"not a database URL: {exc}") from None
    backend = u.get_backend_name()
    if backend == "sqlite":
        db = u.database or ""
        if db and db != ":memory:" and not db.startswith("file:"):
            Path(db).parent.mkdir(parents=True, exist_ok=True)
        engine = create_async_engine(u, pool_size=pool_size, max_overflow=0, pool_pre_ping=False)
        _sqlite_setup(engine, synchronous)
        return engine
    if backend in ("mysql", "mariadb"):
        kwargs: dict[str, Any] = {"pool_size": pool_size, "max_overflow": pool_size, "pool_recycle": 3600,
                                  "pool_pre_ping": True}
        return create_async_engine(u, **kwargs)
    raise ConfigError(f"unsupported database backend {backend!r}: use sqlite+aiosqlite or mysql+aiomysql")


def _sqlite_setup(engine: AsyncEngine, synchronous: str) -> None:
    @event.listens_for(engine.sync_engine, "connect")
    def on_connect(dbapi_conn: Any, _record: Any) -> None:
        # Take transaction control from the driver so BEGIN IMMEDIATE below is the only BEGIN.
        dbapi_conn.isolation_level = None
        cur = dbapi_conn.cursor()
        cur.execute("PRAGMA journal_mode=WAL")
        cur.execute(f"PRAGMA synchronous={synchronous}")
        cur.execute("PRAGMA busy_timeout=30000")
        cur.execute("PRAGMA foreign_keys=ON")
        cur.close()

    @event.listens_for(engine.sync_engine, "begin")
    def on_begin(conn: Any) -> None:
        conn.exec_driver_sql("BEGIN IMMEDIATE")


def translate(exc: BaseException, what: str) -> TransientError | PermanentError:
    """A database exception as the gateway's error: connection, lock and timeout problems are transient; a row
    the database refuses for its content is permanent. Unique-key races are transient (a retry re-reads)."""
    if isinstance(exc, DataError):
        return PermanentError(f"{what}: the database refused the data ({type(exc.orig).__name__})")
    if isinstance(exc, IntegrityError):
        return TransientError(f"{what}: concurrent write conflict, will retry")
    if isinstance(exc, OperationalError | InterfaceError | PoolTimeoutError | OSError | TimeoutError):
        return UnavailableError(f"{what}: database unavailable ({_short(exc)})")
    if isinstance(exc, DBAPIError) and exc.connection_invalidated:
        return UnavailableError(f"{what}: database connection lost")
    if isinstance(exc, SQLAlchemyError):
        return TransientError(f"{what}: database error ({_short(exc)})")
    return TransientError(f"{what}: {type(exc).__name__}")


def _short(exc: BaseException) -> str:
    orig = getattr(exc, "orig", None)
    text = str(orig if orig is not None else exc).splitlines()[0] if str(exc) else type(exc).__name__
    return text[:200]
